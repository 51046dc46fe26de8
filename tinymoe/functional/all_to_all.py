"""All-to-all of rows between ranks, with its backward: the exchange of expert parallelism.

    exchange_rows(rows, send_counts, recv_counts, comm)     rows (N, d) -> (Σ recv_counts, d)

Forward: rows [o_p, o_p + send_counts[p]) go to rank p (o = exclusive cumsum of send_counts); the result
holds recv_counts[s] rows from each rank s, in rank order. It is a permutation of rows across the ranks, so
its backward is the inverse permutation: the same exchange with the counts swapped, each gradient row sent
back to the rank and position its row came from,

    d rows = alltoallv(g, send_counts=recv_counts, recv_counts=send_counts).

Collective in both directions: every rank of `comm` runs forward and backward of each exchange in the same
order (see `tinymoe.distributed`). With a LocalCommunicator it is the identity.
"""
from __future__ import annotations

from ..distributed.communicator import Communicator, check_counts
from ..engine.checks import require_tensor
from ..engine.function import Function


class ExchangeRows(Function):
    """out = alltoallv(rows, send_counts, recv_counts). Backward: alltoallv(g, recv_counts, send_counts)."""

    fresh_gradients = True  # alltoallv_rows always returns a new array

    @staticmethod
    def forward(ctx, rows, send_counts, recv_counts, comm):
        ctx.send_counts, ctx.recv_counts, ctx.comm = send_counts, recv_counts, comm
        return comm.alltoallv_rows(rows, send_counts, recv_counts)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.alltoallv_rows(grad, ctx.recv_counts, ctx.send_counts)


def exchange_rows(rows, send_counts, recv_counts, comm: Communicator):
    """Send send_counts[p] consecutive rows of `rows` to rank p; receive recv_counts[s] rows from rank s.

    rows: Tensor (N, d), N = Σ send_counts; send_counts, recv_counts: int (P,) with P = comm.size, recv_counts
    from `comm.alltoall_counts(send_counts)`. Returns a Tensor (Σ recv_counts, d), source-major.
    """
    op = "exchange_rows"
    require_tensor(rows, "rows", op, ndim=2)
    if not isinstance(comm, Communicator):
        raise TypeError(f"{op}: comm must be a tinymoe.distributed.Communicator, got {type(comm).__name__}")
    send_counts = check_counts(send_counts, "send_counts", op, comm.size)
    recv_counts = check_counts(recv_counts, "recv_counts", op, comm.size)
    if int(send_counts.sum()) != rows.shape[0]:
        raise ValueError(f"{op}: send_counts={send_counts.tolist()} sum to {int(send_counts.sum())} "
                         f"but rows has {rows.shape[0]} rows")
    return ExchangeRows.apply(rows, send_counts, recv_counts, comm)
