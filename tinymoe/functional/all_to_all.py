"""All-to-all of rows between ranks, with its backward: the exchange of expert parallelism.

    exchange_rows(rows, send_counts, recv_counts, comm)     rows (N, d) -> (Σ recv_counts, d)

Forward: rows [o_p, o_p + send_counts[p]) go to rank p (o = exclusive cumsum of send_counts); the result
holds recv_counts[s] rows from each rank s, in rank order. It is a permutation of rows across the ranks, so
its backward is the inverse permutation: the same exchange with the counts swapped, each gradient row sent
back to the rank and position its row came from,

    d rows = alltoallv(g, send_counts=recv_counts, recv_counts=send_counts).

Collective in both directions: every rank of `comm` runs forward and backward of each exchange in the same
order (see `tinymoe.distributed`). With a LocalCommunicator it is the identity.

meter (optional): a callable told of every all-to-all the exchange runs, forward and backward alike,
`meter(rows, send_counts, recv_counts, seconds)` with the rows sent, that direction's counts and the wall time
of the call (`tinymoe.nn.expert_parallel.ExchangeStats.record` counts bytes and seconds this way).
"""
from __future__ import annotations

import time

from ..distributed.communicator import Communicator, check_counts
from ..engine.checks import require_tensor
from ..engine.function import Function


class ExchangeRows(Function):
    """out = alltoallv(rows, send_counts, recv_counts). Backward: alltoallv(g, recv_counts, send_counts).

    meter: None, or a callable told of both all-to-alls (module docstring)."""

    fresh_gradients = True  # alltoallv_rows always returns a new array

    @staticmethod
    def forward(ctx, rows, send_counts, recv_counts, comm, meter=None):
        ctx.send_counts, ctx.recv_counts, ctx.comm, ctx.meter = send_counts, recv_counts, comm, meter
        return _alltoallv(comm, rows, send_counts, recv_counts, meter)

    @staticmethod
    def backward(ctx, grad):
        return _alltoallv(ctx.comm, grad, ctx.recv_counts, ctx.send_counts, ctx.meter)


def _alltoallv(comm, rows, send_counts, recv_counts, meter):
    if meter is None:
        return comm.alltoallv_rows(rows, send_counts, recv_counts)
    started = time.perf_counter()
    out = comm.alltoallv_rows(rows, send_counts, recv_counts)
    meter(rows, send_counts, recv_counts, time.perf_counter() - started)
    return out


def exchange_rows(rows, send_counts, recv_counts, comm: Communicator, meter=None):
    """Send send_counts[p] consecutive rows of `rows` to rank p; receive recv_counts[s] rows from rank s.

    rows: Tensor (N, d), N = Σ send_counts; send_counts, recv_counts: int (P,) with P = comm.size, recv_counts
    from `comm.alltoall_counts(send_counts)`; meter: None or meter(rows, send_counts, recv_counts, seconds),
    called after each all-to-all (module docstring). Returns a Tensor (Σ recv_counts, d), source-major.
    """
    op = "exchange_rows"
    require_tensor(rows, "rows", op, ndim=2)
    if not isinstance(comm, Communicator):
        raise TypeError(f"{op}: comm must be a tinymoe.distributed.Communicator, got {type(comm).__name__}")
    if meter is not None and not callable(meter):
        raise TypeError(f"{op}: meter must be None or a callable meter(rows, send_counts, recv_counts, seconds), "
                        f"got {type(meter).__name__}")
    send_counts = check_counts(send_counts, "send_counts", op, comm.size)
    recv_counts = check_counts(recv_counts, "recv_counts", op, comm.size)
    if int(send_counts.sum()) != rows.shape[0]:
        raise ValueError(f"{op}: send_counts={send_counts.tolist()} sum to {int(send_counts.sum())} "
                         f"but rows has {rows.shape[0]} rows")
    return ExchangeRows.apply(rows, send_counts, recv_counts, comm, meter)
