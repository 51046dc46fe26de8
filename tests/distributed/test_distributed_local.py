"""tinymoe.distributed in one process: LocalCommunicator, argument checks, world() detection, lazy mpi4py."""
import os
import subprocess
import sys

import numpy as np
import pytest

import tinymoe.distributed as dist
from tinymoe.distributed import LocalCommunicator, launch
from tinymoe.engine.backend import BackendUnavailableError


def test_local_collectives_are_copies_of_their_input():
    comm = LocalCommunicator()
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    for result in (comm.alltoallv_rows(rows, [4], [4]), comm.allgather_rows(rows), comm.allreduce_sum(rows)):
        np.testing.assert_array_equal(result, rows)
        assert result is not rows and not np.shares_memory(result, rows)
    np.testing.assert_array_equal(comm.alltoall_counts(np.array([7])), [7])
    np.testing.assert_array_equal(comm.allreduce_mean(rows), rows)
    assert comm.allreduce_sum(rows, inplace=True) is rows
    assert comm.broadcast(rows) is rows
    comm.barrier()
    assert (comm.rank, comm.size) == (0, 1)


def test_local_abort_prints_the_rank_and_exits(capsys):
    with pytest.raises(SystemExit) as stop:
        LocalCommunicator().abort("out of memory", code=3)
    assert stop.value.code == 3
    assert capsys.readouterr().err == "rank 0: out of memory\n"


@pytest.mark.parametrize("call, message", [
    (lambda c: c.alltoallv_rows(np.zeros((3, 2)), [2], [2]), "send_counts sum to 2 but send has 3 rows"),
    (lambda c: c.alltoallv_rows(np.zeros((3, 2)), [3], [4]), "recv_counts must equal send_counts"),
    (lambda c: c.alltoallv_rows(np.zeros((3, 2)), [3, 0], [3]), r"send_counts has shape \(2,\); expected \(1,\)"),
    (lambda c: c.alltoallv_rows(np.zeros((3, 2)), [3.0], [3]), "send_counts must hold integers"),
    (lambda c: c.alltoall_counts([-1]), "holds a negative count"),
    (lambda c: c.alltoallv_rows(np.float64(1.0), [1], [1]), "must have a row axis"),
    (lambda c: c.alltoallv_rows([[1.0]], [1], [1]), "must be a NumPy or CuPy array"),
    (lambda c: c.allreduce_mean(np.arange(3)), "a mean needs a floating array"),
    (lambda c: c.allreduce_sum(np.zeros((4, 4))[:, 0], inplace=True), "C-contiguous"),
    (lambda c: c.broadcast(np.zeros(2), root=1), r"root=1 must be a rank in \[0, 1\)"),
    (lambda c: c.broadcast(None), "passed array=None"),
])
def test_bad_arguments_raise_early_with_the_argument_named(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call(LocalCommunicator())


@pytest.mark.parametrize("environ, size", [
    ({}, 1), ({"PMI_SIZE": "4"}, 4), ({"OMPI_COMM_WORLD_SIZE": "2"}, 2), ({"MV2_COMM_WORLD_SIZE": "3"}, 3),
    ({"PMI_SIZE": "1", "OMPI_COMM_WORLD_SIZE": "8"}, 1), ({"MPI_LOCALNRANKS": "2"}, 1),
])
def test_launcher_world_size_reads_the_launchers_variables(environ, size):
    assert dist.launcher_world_size(environ) == size


def test_launcher_world_size_rejects_garbage():
    with pytest.raises(ValueError, match="PMI_SIZE='four'"):
        dist.launcher_world_size({"PMI_SIZE": "four"})


def test_world_is_local_without_a_launcher(monkeypatch):
    for name in dist.LAUNCHER_SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(launch, "_world", None)
    assert isinstance(dist.world(), LocalCommunicator)
    assert dist.world() is dist.world()


def hide_mpi4py(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # None in sys.modules makes the import fail
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", None)


def test_a_missing_mpi4py_names_the_extra_to_install(monkeypatch):
    hide_mpi4py(monkeypatch)
    with pytest.raises(BackendUnavailableError, match=r"pip install 'tinymoe\[mpi\]'"):
        dist.MPICommunicator()
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setattr(launch, "_world", None)
    with pytest.raises(BackendUnavailableError, match=r"pip install 'tinymoe\[mpi\]'"):
        dist.world()
    monkeypatch.setattr(launch, "_world", None)


def test_import_tinymoe_never_imports_mpi4py():
    code = ("import sys, tinymoe, tinymoe.distributed, tinymoe.functional.all_to_all\n"
            "tinymoe.distributed.world()\n"
            "assert 'mpi4py' not in sys.modules, 'mpi4py was imported'\n")
    environment = {k: v for k, v in os.environ.items() if k not in dist.LAUNCHER_SIZE_VARIABLES}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=environment)
    assert result.returncode == 0, result.stderr


def test_abort_on_error_with_one_rank_lets_the_exception_through():
    with pytest.raises(KeyError, match="missing"):
        dist.run_on_all_ranks(lambda: {}["missing"], comm=LocalCommunicator())
    assert dist.run_on_all_ranks(lambda a, b=0: a + b, 2, b=3, comm=LocalCommunicator()) == 5


def test_nccl_communicator_is_an_honest_stub():
    with pytest.raises(NotImplementedError, match="not implemented yet"):
        dist.NCCLCommunicator()
