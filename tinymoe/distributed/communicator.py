"""`Communicator`: the few collectives expert and data parallelism need, and `LocalCommunicator` (one rank).

Every collective is SPMD: all ranks of the communicator call it, in the same order, or the program hangs.
Arguments are checked here, once, for every implementation; the subclasses (`LocalCommunicator` here,
`MPICommunicator` in `tinymoe.distributed.mpi`) only move the data.

    alltoall_counts(c)            (P, ...) ints; block p goes to rank p   -> (P, ...) block s came from rank s
    alltoallv_rows(x, s, r)       x (N, ...) rows; s[p] rows go to rank p -> (Σ r, ...) rows, source-major
    allgather_rows(x)             x (n_r, ...) on rank r                  -> (Σ_r n_r, ...) in rank order
    allreduce_sum(a) / _mean(a)   a of one shape on every rank            -> Σ_r a_r (in rank order, see MPI)
    broadcast(a, root)            root's a                                -> a copy of it on every rank

Arrays are NumPy or CuPy; results come back on the array's device.
"""
from __future__ import annotations

import sys

import numpy as np

from ..engine.backend import array_module, to_numpy


class Communicator:
    """A group of `size` processes; this one is `rank`. Subclasses implement the `_`-prefixed methods."""

    rank: int = 0
    size: int = 1

    # ----- public collectives: argument checks, then the implementation --------------------------------

    def alltoall_counts(self, send_counts):
        """Send block p of `send_counts` (int (P,) or (P, k)) to rank p; return the blocks received, row s
        from rank s. With (P,) counts of rows this tells each rank how many rows it will receive."""
        counts = check_counts(send_counts, "send_counts", "alltoall_counts", self.size, ndim=None)
        return self._alltoall_counts(counts)

    def alltoallv_rows(self, send, send_counts, recv_counts):
        """Uneven all-to-all of rows: rows [o_p, o_p + send_counts[p]) of `send` go to rank p (o = exclusive
        cumsum); the result holds recv_counts[s] rows from each rank s, in rank order (source-major).

        send: (N, ...) array of any numeric dtype, N = Σ send_counts; send_counts, recv_counts: int (P,),
        recv_counts as returned by `alltoall_counts(send_counts)` (other values are an error MPI may not catch).
        Data moves as raw bytes, so no dtype needs an MPI datatype and nothing is pickled.
        """
        op = "alltoallv_rows"
        send = _require_rows(send, "send", op)
        send_counts = check_counts(send_counts, "send_counts", op, self.size)
        recv_counts = check_counts(recv_counts, "recv_counts", op, self.size)
        if int(send_counts.sum()) != send.shape[0]:
            raise ValueError(f"{op}: send_counts sum to {int(send_counts.sum())} but send has {send.shape[0]} rows")
        return self._alltoallv_rows(array_module(send).ascontiguousarray(send), send_counts, recv_counts)

    def allgather_rows(self, rows):
        """Concatenate every rank's `rows` (n_r, ...) in rank order; trailing shapes and dtypes must agree."""
        return self._allgather_rows(array_module(rows).ascontiguousarray(_require_rows(rows, "rows", "allgather_rows")))

    def allreduce_sum(self, array, *, inplace: bool = False):
        """Σ over ranks of `array` (same shape and dtype everywhere). `inplace=True` writes the sum into
        `array` (which must then be contiguous and writeable) and returns it; else a new array."""
        array = _require_numeric(array, "array", "allreduce_sum", inplace)
        return self._allreduce_sum(array, inplace)

    def allreduce_mean(self, array, *, inplace: bool = False):
        """(Σ over ranks of `array`) / size, for floating arrays (gradients in data parallelism)."""
        array = _require_numeric(array, "array", "allreduce_mean", inplace)
        if array.dtype.kind != "f":
            raise TypeError(f"allreduce_mean: array is {array.dtype.name}; a mean needs a floating array")
        total = self._allreduce_sum(array, inplace)
        total /= self.size
        return total

    def broadcast(self, array, root: int = 0):
        """Root's `array` on every rank. Other ranks pass an array of the same shape and dtype (filled in
        place when contiguous) or None (a new one is made)."""
        if isinstance(root, bool) or not isinstance(root, (int, np.integer)) or not 0 <= root < self.size:
            raise ValueError(f"broadcast: root={root!r} must be a rank in [0, {self.size})")
        if self.rank == root and array is None:
            raise ValueError(f"broadcast: the root rank {root} passed array=None; it must pass the array to send")
        if array is not None:
            array = _require_numeric(array, "array", "broadcast", inplace=False)
        return self._broadcast(array, int(root))

    def barrier(self) -> None:
        """Wait until every rank has called barrier()."""
        self._barrier()

    def abort(self, message: str, code: int = 1):
        """Print "rank R: message" to stderr and end every rank with exit status `code` (MPI_Abort)."""
        sys.stderr.write(f"rank {self.rank}: {message}\n")
        sys.stderr.flush()
        self._abort(int(code))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"

    # ----- implementations -------------------------------------------------------------------------------

    def _alltoall_counts(self, counts):
        raise NotImplementedError

    def _alltoallv_rows(self, send, send_counts, recv_counts):
        raise NotImplementedError

    def _allgather_rows(self, rows):
        raise NotImplementedError

    def _allreduce_sum(self, array, inplace):
        raise NotImplementedError

    def _broadcast(self, array, root):
        raise NotImplementedError

    def _barrier(self):
        raise NotImplementedError

    def _abort(self, code):
        raise NotImplementedError


class LocalCommunicator(Communicator):
    """One process, no MPI: every collective is the identity (a copy, so results never alias inputs).
    The default when a program is not started by mpiexec."""

    rank, size = 0, 1

    def _alltoall_counts(self, counts):
        return counts.copy()

    def _alltoallv_rows(self, send, send_counts, recv_counts):
        if int(recv_counts[0]) != send.shape[0]:
            raise ValueError(f"alltoallv_rows: on one rank recv_counts must equal send_counts ({send.shape[0]} "
                             f"rows), got recv_counts={recv_counts.tolist()}")
        return send.copy()

    def _allgather_rows(self, rows):
        return rows.copy()

    def _allreduce_sum(self, array, inplace):
        return array if inplace else array.copy()

    def _broadcast(self, array, root):
        return array

    def _barrier(self):
        return None

    def _abort(self, code):
        raise SystemExit(code)


# ----- argument checks shared by every implementation ------------------------------------------------------


def check_counts(values, argument: str, op: str, size: int, ndim: int | None = 1) -> np.ndarray:
    """`values` as a host int64 array with `size` rows (and `ndim` axes when given), every entry >= 0."""
    counts = to_numpy(values) if hasattr(values, "dtype") else np.asarray(values)
    if counts.dtype.kind not in "iu":
        raise TypeError(f"{op}: {argument} must hold integers, got {counts.dtype.name} {tuple(counts.shape)}")
    if counts.ndim == 0 or counts.shape[0] != size or (ndim is not None and counts.ndim != ndim):
        expected = f"({size},)" if ndim == 1 else f"({size}, ...)"
        raise ValueError(f"{op}: {argument} has shape {tuple(counts.shape)}; expected {expected}, one entry per rank")
    if (counts < 0).any():
        raise ValueError(f"{op}: {argument}={counts.tolist()} holds a negative count")
    return np.ascontiguousarray(counts, dtype=np.int64)


def exclusive_cumsum(counts: np.ndarray) -> np.ndarray:
    """offsets[p] = Σ_{q<p} counts[q]: where block p starts."""
    offsets = np.zeros_like(counts)
    np.cumsum(counts[:-1], out=offsets[1:])
    return offsets


def _require_rows(array, argument: str, op: str):
    if not hasattr(array, "dtype") or not hasattr(array, "shape"):
        raise TypeError(f"{op}: {argument} must be a NumPy or CuPy array, got {type(array).__name__}")
    if array.ndim == 0:
        raise ValueError(f"{op}: {argument} must have a row axis, got a 0-d array")
    if array.dtype.kind not in "biufc":
        raise TypeError(f"{op}: {argument} has dtype {array.dtype}; expected booleans or numbers")
    return array


def _require_numeric(array, argument: str, op: str, inplace: bool):
    if not hasattr(array, "dtype") or not hasattr(array, "shape"):
        raise TypeError(f"{op}: {argument} must be a NumPy or CuPy array, got {type(array).__name__}")
    if array.dtype.kind not in "iufc":
        raise TypeError(f"{op}: {argument} has dtype {array.dtype}; expected numbers")
    if inplace and not (array.flags.c_contiguous and getattr(array.flags, "writeable", True)):
        raise ValueError(f"{op}: inplace=True needs a C-contiguous, writeable {argument}")
    return array
