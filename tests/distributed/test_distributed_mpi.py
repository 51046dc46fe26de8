"""Multi-rank tests: pytest launches `mpiexec -n P python tests/distributed/mpi_cases.py` (P = 2 and 4,
oversubscribed on small machines, which MPICH allows without a flag) and an abort check. Skipped, with the
reason shown, where mpi4py or mpiexec is missing (`pip install 'tinymoe[mpi]'` provides both)."""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

MPIEXEC = shutil.which("mpiexec") or shutil.which(str(Path(sys.executable).with_name("mpiexec")))
needs_mpi = pytest.mark.skipif(
    importlib.util.find_spec("mpi4py") is None or MPIEXEC is None,
    reason="needs mpi4py and mpiexec: pip install 'tinymoe[mpi]'",
)
CASES = Path(__file__).with_name("mpi_cases.py")
TIMEOUT_S = 60


def launch(n_ranks, *arguments):
    # A pytest that itself runs under a launcher must not hand its PMI variables to the new job.
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "MV2_", "MPI_"))}
    return subprocess.run([MPIEXEC, "-n", str(n_ranks), sys.executable, *arguments], capture_output=True,
                          text=True, timeout=TIMEOUT_S, env=environment)


@needs_mpi
@pytest.mark.parametrize("n_ranks", [2, 4])
def test_collectives_and_exchange_on_several_ranks(n_ranks):
    result = launch(n_ranks, str(CASES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"cases passed on {n_ranks} ranks" in result.stdout


RAISE_ON_RANK_1 = """
import time
from tinymoe.distributed import run_on_all_ranks, world
def step(comm):
    if comm.rank == 1:
        raise ValueError("expert 3 got a NaN")
    comm.barrier()          # rank 0 waits here for a rank that will never come
    time.sleep(120)
run_on_all_ranks(step, world())
"""


@needs_mpi
def test_an_error_on_one_rank_ends_every_rank_with_its_message():
    result = launch(2, "-c", RAISE_ON_RANK_1)  # a hang would raise TimeoutExpired after 60 s
    assert result.returncode != 0
    assert "rank 1: ValueError: expert 3 got a NaN" in result.stderr
    assert "rank 0:" not in result.stderr


@needs_mpi
def test_world_is_mpi_under_mpiexec():
    script = ("import numpy as np; from tinymoe.distributed import MPICommunicator, world; c = world()\n"
              "assert isinstance(c, MPICommunicator) and c.size == 3, c\n"
              "ranks = c.allgather_rows(np.array([c.rank]))\n"
              "print('ranks', ranks.tolist()) if c.rank == 0 else None\n")
    result = launch(3, "-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ranks [0, 1, 2]"
