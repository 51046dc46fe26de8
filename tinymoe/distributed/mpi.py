"""`MPICommunicator`: the `Communicator` collectives over mpi4py's buffer API (no pickling of data).

mpi4py is imported the first time an MPICommunicator is made (`import tinymoe` never imports it); when it is
missing the error names `pip install 'tinymoe[mpi]'`.

Data moves as raw bytes (`MPI.BYTE`, counts and displacements in bytes = rows · row size), so every dtype
works, float16 and bool included, and nothing needs an MPI datatype; mpi4py ≥ 4 switches to MPI-4's
large-count calls by itself when a count passes 2³¹.

Reduction order. MPI does not promise the order in which MPI_Allreduce adds the ranks' values: it may change
with the message size, the number of ranks and the library, and in floating point a different order is a
different result. With `deterministic=True` (the default) `allreduce_sum` instead all-gathers the P arrays
and adds them on every rank in rank order, ((a_0 + a_1) + a_2) + ...: the same bits on every rank and in
every run, for P times the memory and traffic of the array. `deterministic=False` calls MPI_Allreduce(SUM).

CuPy arrays. By default they are staged through the host (cupy.asnumpy -> MPI -> cupy.asarray), which works
with any MPI. With a CUDA-aware MPI, pass `cuda_aware=True` (or set TINYMOE_MPI_CUDA_AWARE=1): device buffers
then go to MPI directly after a synchronisation of CuPy's current stream (MPI does not know CUDA streams).
mpi4py has no query for CUDA awareness (MPIX_Query_cuda_support is an extension it does not wrap), so this is
the user's statement, not detected. Neither CuPy path is tested on the development machine (no GPU).
"""
from __future__ import annotations

import os

import numpy as np

from ..engine.backend import BackendUnavailableError, array_module, device_of, import_cupy, import_optional
from .communicator import Communicator, exclusive_cumsum


def import_mpi():
    """Return `mpi4py.MPI`, importing it (and so initialising MPI) on first use; a clear error if missing."""
    try:
        return import_optional("mpi4py.MPI", "'tinymoe[mpi]'",
                               "tinymoe.distributed over MPI needs mpi4py (and an MPI library)")
    except RuntimeError as error:  # mpi4py is there but cannot load or initialise its MPI library
        raise BackendUnavailableError(f"mpi4py is installed but MPI could not be initialised: {error}") from error


class MPICommunicator(Communicator):
    """The collectives over an mpi4py communicator (COMM_WORLD by default; see `from_mpi`).

    deterministic: allreduce in rank order, bitwise reproducible (see the module docstring).
    cuda_aware: hand CuPy buffers to MPI directly (None: TINYMOE_MPI_CUDA_AWARE=1 says so; default host staging).
    """

    def __init__(self, comm=None, *, deterministic: bool = True, cuda_aware: bool | None = None):
        MPI = import_mpi()
        comm = MPI.COMM_WORLD if comm is None else comm
        if not isinstance(comm, MPI.Comm):
            raise TypeError(f"MPICommunicator: comm must be an mpi4py Comm, got {type(comm).__name__}")
        if cuda_aware is None:
            cuda_aware = os.environ.get("TINYMOE_MPI_CUDA_AWARE", "0").strip().lower() in ("1", "true", "yes")
        self.comm, self.deterministic, self.cuda_aware = comm, bool(deterministic), bool(cuda_aware)
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self._MPI = MPI

    @classmethod
    def from_mpi(cls, comm=None, **options) -> "MPICommunicator":
        """Wrap an mpi4py communicator; None means MPI.COMM_WORLD."""
        return cls(comm, **options)

    # ----- device staging: the only place that knows about CuPy ------------------------------------------

    def _to_transport(self, array):
        """(a contiguous buffer MPI can read, the module the result must come back in)."""
        xp = array_module(array)
        if xp is not np and self.cuda_aware:
            xp.cuda.get_current_stream().synchronize()  # MPI reads the memory now; pending kernels must be done
            return xp.ascontiguousarray(array), xp
        if xp is not np:
            return np.ascontiguousarray(xp.asnumpy(array)), xp
        return np.ascontiguousarray(array), np

    @staticmethod
    def _from_transport(result, xp):
        return result if array_module(result) is xp else xp.asarray(result)

    # ----- collectives ----------------------------------------------------------------------------------

    def _alltoall_counts(self, counts):
        MPI = self._MPI
        received = np.empty_like(counts)
        self.comm.Alltoall([counts, MPI.INT64_T], [received, MPI.INT64_T])
        return received

    def _alltoallv_rows(self, send, send_counts, recv_counts):
        MPI = self._MPI
        buffer, xp = self._to_transport(send)
        row_shape, row_bytes = send.shape[1:], _row_bytes(send)
        received = array_module(buffer).empty((int(recv_counts.sum()),) + row_shape, dtype=send.dtype)
        self.comm.Alltoallv(_blocks(buffer, send_counts, row_bytes, MPI),
                            _blocks(received, recv_counts, row_bytes, MPI))
        return self._from_transport(received, xp)

    def _allgather_rows(self, rows):
        MPI = self._MPI
        mine = np.array([rows.shape[0], _row_bytes(rows)], dtype=np.int64)
        every = np.empty((self.size, 2), dtype=np.int64)
        self.comm.Allgather([mine, MPI.INT64_T], [every, MPI.INT64_T])
        if (every[:, 1] != every[0, 1]).any():  # every rank sees the same table, so every rank raises
            raise ValueError(f"allgather_rows: the ranks' rows differ in size (bytes per row by rank: "
                             f"{every[:, 1].tolist()}); every rank must pass the same trailing shape and dtype")
        buffer, xp = self._to_transport(rows)
        counts = every[:, 0]
        gathered = array_module(buffer).empty((int(counts.sum()),) + rows.shape[1:], dtype=rows.dtype)
        self.comm.Allgatherv([_as_bytes(buffer), MPI.BYTE], _blocks(gathered, counts, int(every[0, 1]), MPI))
        return self._from_transport(gathered, xp)

    def _allreduce_sum(self, array, inplace):
        MPI = self._MPI
        buffer, xp = self._to_transport(array)
        bxp = array_module(buffer)
        if self.deterministic:
            gathered = bxp.empty((self.size,) + buffer.shape, dtype=buffer.dtype)
            self.comm.Allgather([_as_bytes(buffer), MPI.BYTE], [_as_bytes(gathered), MPI.BYTE])
            total = gathered[0].copy()
            for rank in range(1, self.size):
                total += gathered[rank]  # rank order, the same on every rank
        else:
            total = bxp.empty_like(buffer)
            self.comm.Allreduce(buffer, total, op=MPI.SUM)
        total = self._from_transport(total, xp)
        if inplace:
            array[...] = total
            return array
        return total

    def _broadcast(self, array, root):
        MPI = self._MPI
        meta = (tuple(array.shape), array.dtype.str, device_of(array)) if self.rank == root else None
        shape, dtype, device = self.comm.bcast(meta, root=root)  # three small Python values, pickled
        if array is not None and (tuple(array.shape) != shape or array.dtype.str != dtype):
            raise ValueError(f"broadcast: rank {self.rank} passed an array of shape {tuple(array.shape)} and dtype "
                             f"{array.dtype}, but root {root} sends shape {shape} and dtype {np.dtype(dtype)}")
        if self.rank == root:
            buffer, _ = self._to_transport(array)
            self.comm.Bcast([_as_bytes(buffer), MPI.BYTE], root=root)
            return array
        xp = array_module(array) if array is not None else (import_cupy() if device == "cuda" else np)
        staged_module = xp if (xp is np or self.cuda_aware) else np
        received = staged_module.empty(shape, dtype=np.dtype(dtype))
        self.comm.Bcast([_as_bytes(received), MPI.BYTE], root=root)
        received = self._from_transport(received, xp)
        if array is None:
            return received
        array[...] = received
        return array

    def _barrier(self):
        self.comm.Barrier()

    def _abort(self, code):
        self.comm.Abort(code)


class NCCLCommunicator(Communicator):
    """Seam for GPU-to-GPU collectives over NCCL (`cupy.cuda.nccl`). Not implemented.

    The plan: an uneven all-to-all is NCCL's grouped point-to-point, inside ncclGroupStart/End one
    `send(rows for p)` and one `recv(rows from p)` per peer p (NCCL ≥ 2.7), on CuPy's current stream, with the
    counts exchanged first (a small alltoall, or the MPI communicator that bootstrapped the NCCL unique id).
    allreduce maps to ncclAllReduce (whose order is fixed for a given topology but differs from the rank-order
    sum of MPICommunicator), broadcast to ncclBroadcast. Until then, `MPICommunicator` stages CuPy arrays
    through the host, or passes them directly with a CUDA-aware MPI.
    """

    def __init__(self, *args, **kwargs):
        raise NotImplementedError(
            "NCCLCommunicator is a documented seam, not implemented yet: use MPICommunicator, which stages CuPy "
            "arrays through the host or, with cuda_aware=True and a CUDA-aware MPI, passes them directly"
        )


def _row_bytes(array) -> int:
    return int(array.dtype.itemsize * int(np.prod(array.shape[1:], dtype=np.int64)))


def _blocks(array, counts, row_bytes: int, MPI):
    """mpi4py's [buffer, counts, displacements, type] for blocks of counts[p] rows, in bytes."""
    return [_as_bytes(array), (counts * row_bytes).tolist(), (exclusive_cumsum(counts) * row_bytes).tolist(), MPI.BYTE]


def _as_bytes(array):
    """A flat uint8 view of a C-contiguous array (what MPI.BYTE counts)."""
    return array.reshape(-1).view(array_module(array).uint8)
