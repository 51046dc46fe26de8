"""Which communicator a process belongs to (`world()`), and ending every rank when one fails.

A launcher (mpiexec, srun) tells each process the job's size in an environment variable before MPI starts,
so `world()` can decide without importing mpi4py: it reads, in order,

    PMI_SIZE               MPICH's Hydra mpiexec, Intel MPI, Slurm's srun --mpi=pmi2
    OMPI_COMM_WORLD_SIZE   Open MPI's mpirun
    MV2_COMM_WORLD_SIZE    MVAPICH2's mpirun_rsh

(MPI_LOCALNRANKS is not used: it counts the ranks on this node only.) A size above 1 gives an
MPICommunicator over COMM_WORLD; no variable, or size 1, gives the LocalCommunicator.

An exception on one rank of an SPMD program leaves the others waiting in their next collective forever.
`abort_on_error` (a context manager) and `run_on_all_ranks(fn)` catch it, print its traceback with every
line prefixed "rank R: " to stderr, and call MPI_Abort(1), which ends every rank (mpi4py.run's rule).
With one rank the exception simply propagates.
"""
from __future__ import annotations

import os
import traceback
from contextlib import contextmanager

from .communicator import Communicator, LocalCommunicator

LAUNCHER_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")

_world = None


def launcher_world_size(environ=None) -> int:
    """The job size the launcher announced in the environment (see the module docstring); 1 if none."""
    environ = os.environ if environ is None else environ
    for name in LAUNCHER_SIZE_VARIABLES:
        value = environ.get(name)
        if value is None:
            continue
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"world: the environment variable {name}={value!r} is not an integer job size") from None
        if size < 1:
            raise ValueError(f"world: the environment variable {name}={value!r} must be a job size >= 1")
        return size
    return 1


def world() -> Communicator:
    """The communicator of every process of this job: MPICommunicator(COMM_WORLD) under a launcher with more
    than one rank, else LocalCommunicator. Made once per process and then reused."""
    global _world
    if _world is None:
        expected = launcher_world_size()
        if expected == 1:
            _world = LocalCommunicator()
        else:
            from .mpi import MPICommunicator  # imports mpi4py: only under a launcher

            communicator = MPICommunicator()
            if communicator.size != expected:
                raise RuntimeError(
                    f"world: the launcher started {expected} ranks but mpi4py's MPI sees {communicator.size}: "
                    "mpi4py is built against a different MPI than the mpiexec that started this job"
                )
            _world = communicator
    return _world


@contextmanager
def abort_on_error(comm: Communicator | None = None):
    """Run the block; an exception in it ends every rank with this rank's traceback (see module docstring).

        with abort_on_error(comm):
            train(comm)

    SystemExit with status 0 (or None) passes through; any other status aborts with that status.
    """
    comm = world() if comm is None else comm
    try:
        yield comm
    except SystemExit as stop:
        if stop.code in (None, 0) or comm.size == 1:
            raise
        status = stop.code if isinstance(stop.code, int) else 1
        comm.abort(f"exited with status {stop.code}", code=status)
    except BaseException as error:
        if comm.size == 1:
            raise
        lines = traceback.format_exception(type(error), error, error.__traceback__)
        text = "".join(lines).rstrip("\n").replace("\n", f"\nrank {comm.rank}: ")
        comm.abort(text, code=1)


def run_on_all_ranks(fn, *args, comm: Communicator | None = None, **kwargs):
    """fn(*args, **kwargs) inside `abort_on_error(comm)`: its result, or every rank ends if it raises."""
    with abort_on_error(comm):
        return fn(*args, **kwargs)


def _reset_world_for_tests() -> None:
    global _world
    _world = None


__all__ = ["LAUNCHER_SIZE_VARIABLES", "abort_on_error", "launcher_world_size", "run_on_all_ranks", "world"]
