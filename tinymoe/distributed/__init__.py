"""tinymoe.distributed: collectives for running one model over several processes (MPI), NumPy-only to import.

    comm = tinymoe.distributed.world()    # MPICommunicator under `mpiexec -n P` (P > 1), else LocalCommunicator
    with tinymoe.distributed.abort_on_error(comm):
        ...                               # an exception on any rank ends every rank with its message

`Communicator` (communicator.py) offers alltoall_counts, alltoallv_rows, allgather_rows, allreduce_sum/mean,
broadcast, barrier and abort; `LocalCommunicator` is one process; `MPICommunicator` (mpi.py) wraps mpi4py,
imported only when one is made (`pip install 'tinymoe[mpi]'`); `NCCLCommunicator` is a documented seam.
Layer: this package imports only from `tinymoe.engine`; `tinymoe.functional.all_to_all` builds on it.

Expert parallelism, the plan for tinymoe.nn.MoE (not wired in yet). P ranks, E experts, E % P == 0.
Rank r holds experts [r·E/P, (r+1)·E/P) (`local_experts`) and its own tokens. One MoE forward on rank r:

 1. Route as today: the routing plan sorts the (token, slot) assignments stably by expert, so the dispatched
    buffer (M_r, d) is expert-major over all E experts, hence also grouped by destination rank.
 2. `plan_expert_exchange(plan.kept_per_expert, comm)`: one alltoall of the (P, E/P) per-expert counts. It
    gives send_counts[p] = Σ of kept_per_expert over p's experts (`destination_counts`), recv_counts[s], and
    counts_from_sources[s, e] for the local experts.
 3. `exchange_rows(dispatched, send_counts, recv_counts, comm)`: alltoallv of the rows. They arrive
    source-major (all of source 0's rows for my experts, in expert order, then source 1's, ...).
 4. `gather_rows(received, order)`: the stable local permutation to expert-major (`expert_major_order`);
    local expert e computes on rows [expert_offsets[e], expert_offsets[e+1]).
 5. `gather_rows(expert_out, inverse)`: back to source-major; `exchange_rows(..., recv_counts, send_counts)`:
    the reverse exchange, so every row returns to the rank and position it came from.
 6. Combine with the routing plan's weights exactly as in one process.

Backward runs the same two exchanges reversed (each exchange's backward is the other direction), and the two
permutations' backwards are gathers by the inverse permutation: no scatter anywhere. The load-balance loss
must see global statistics: all-reduce tokens_per_expert (counts, exact in int64) and the summed router
probabilities before forming f_e and P_e, so the loss (and its gradient) equals the one-process value.
Dense parameters (attention, router, shared experts) are data-parallel: `allreduce_mean` of their gradients,
deterministic in rank order by default. Every rank must run the same sequence of collectives, backward
included: the engine calls a node's backward only when the loss depends on its output, so each rank's
exchange output must feed its loss (it does through the combine, even with zero rows on that rank); a rank
that skips the layer, or whose loss ignores it, leaves the others waiting.
"""
from .communicator import Communicator, LocalCommunicator
from .expert_parallel import (
    ExpertExchangePlan,
    counts_per_destination_expert,
    destination_counts,
    expert_major_order,
    inverse_permutation,
    local_experts,
    plan_expert_exchange,
)
from .launch import LAUNCHER_SIZE_VARIABLES, abort_on_error, launcher_world_size, run_on_all_ranks, world
from .mpi import MPICommunicator, NCCLCommunicator, import_mpi  # mpi4py itself is imported on first use


__all__ = [
    "Communicator", "LocalCommunicator", "MPICommunicator", "NCCLCommunicator", "import_mpi",
    "ExpertExchangePlan", "counts_per_destination_expert", "destination_counts", "expert_major_order",
    "inverse_permutation", "local_experts", "plan_expert_exchange",
    "LAUNCHER_SIZE_VARIABLES", "abort_on_error", "launcher_world_size", "run_on_all_ranks", "world",
]
