"""`ExpertParallelMoE`: an MoE layer whose E experts are split over the P ranks of a Communicator.

Rank r holds experts [r·E/P, (r+1)·E/P) and routes its own tokens (its "token group"); the router, the
shared experts and everything outside the layer are replicated (data-parallel). One forward on rank r:

    routing = router(x_r)                      replicated router, r's T_r tokens
    plan    = routing_plan(expert_ids)         expert-major, hence destination-major
    xs      = gather_rows(x_r, plan)           (M_r, d)
    xplan   = plan_expert_exchange(kept, comm) all-to-all of the (P, E/P) counts
    recv    = exchange_rows(xs, xplan)         all-to-all of the rows, source-major
    ys      = experts(recv[order])             local experts on expert-major rows
    back    = exchange_rows(ys[inverse])       the reverse all-to-all: every row returns where it came from
    y_r[t]  = Σ_j w[t, j] · back[row(t, j)] (+ shared(x_r[t]))

Backward runs both exchanges reversed (`exchange_rows`' own backward); the two permutations' backwards are
gathers. Every rank must call forward and backward of the layer, in the same order (design note in
`tinymoe.distributed`).

Global statistics, so the objective J = (1/P) Σ_r L_r (L_r: rank r's loss, a mean over its tokens) equals
the single-process loss on the concatenated batch (equal T_r on every rank):
  aux_loss   E · Σ_e f_e · P_e^r with f_e from the all-reduced counts and P_e^r rank r's mean probability;
             (1/P) Σ_r aux_r = E · Σ_e f_e P_e, the global value, and so is its gradient.
             balance="global" (Qiu et al. 2025): f_e from `router.global_load` when set, the counts of every
             micro-batch of the optimizer step summed and all-reduced over the ranks by
             `tinymoe.train.accumulate_gradients(..., all_reduce=comm.allreduce_sum)`; the mean over
             micro-batches and ranks is then E · Σ_e f_e^global · P̄_e, the loss of the whole step's batch. Without
             it (global_load None) f_e counts this forward on every rank, as balance="batch".
             balance="sequence" (DeepSeek-V3 eq. 17–20): the batch is split over ranks by whole sequences, so
             each rank's per-sequence loss (its x (..., L, d) of B_r sequences) needs nothing from the others;
             with equal B_r the mean over ranks of those means is the mean over every sequence: exact.
  importance / load (noisy)  CV² of the global sums: the (T_r, E) inputs are all-gathered (`AllGatherRows`,
             backward: all-reduce then take my rows), so every rank evaluates the single-process loss.
  sigmoid bias  the aux-free update (DeepSeek-V3) sees the global load, identical on every rank; under the
             router's `defer_updates` (gradient accumulation) the global load is added to `pending_load`.
  capacity   per token group, C = ceil(cf·T_r·k/E) on rank r (GShard's groups): equal to the single-process
             layer applied to each group separately, not to one call on the concatenated batch.
  expert choice  each expert takes its top C tokens of each group (C from T_r): again per group.
  noise, jitter  drawn per rank from the replicated generator (identical streams, T_r rows each); in eval
             mode there is none, and the layer then equals the single-process one.
Gradient scaling (done by `tinymoe.train.distributed.reduce_gradients`): replicated gradients are averaged
over ranks; a local expert's gradient already sums the contributions of every rank's tokens (they came
through the exchange), so it is divided by P.
Not supported (refused with a ValueError naming the option): n_null_experts (the aux loss here counts the E
real experts only), capacity_per="sequence", and router="relu" over P > 1 ranks
(its L1 coefficient would step on each rank's own sparsity, so the replicated routers would drift apart).
Bad input x and a non-finite output raise as MoE.forward does, the same types and messages (FloatingPointError
naming the layer; `tinymoe.set_finite_checks`), on the rank that sees them: run under `abort_on_error`.
`stats` holds this rank's routing; `exchange_stats` the rows and bytes this rank exchanged and the seconds
spent in the all-to-alls (forward and backward; `ExchangeStats.record` is the exchanges' meter).
"""
from __future__ import annotations

import numpy as np

from ..distributed.communicator import Communicator
from ..distributed.expert_parallel import plan_expert_exchange
from ..engine.backend import to_numpy
from ..engine.checks import check_finite
from ..engine.function import Function
from ..engine.random import standard_normal, uniform
from ..engine.tensor import Tensor
from ..functional import linear
from ..functional.activations import sigmoid
from ..functional.all_to_all import ExchangeRows
from ..functional.dispatch import combine_rows_unchecked, gather_rows_unchecked, routing_plan_unchecked
from .experts import NON_FINITE_ADVICE
from .module import Module, Parameter
from .moe import MoE
from .moe_stats import MoEStats
from .router_losses import ImportanceLoss, LoadBalanceLoss, NoisyLoadLoss

__all__ = ["AllGatherRows", "ExchangeStats", "ExpertParallelMoE", "expert_parallel"]


class ExchangeStats:
    """What one rank's exchanges moved since the layer's last `reset_exchange_stats()` (forward and backward
    of every exchange; `tinymoe.train.distributed.step_statistics` reads and resets it once per step).

    rows_sent, rows_received: dispatched rows of the forward; bytes_sent, bytes_received: every all-to-all
    of rows (forward and backward); seconds: wall time inside those all-to-alls (includes waiting for the
    slowest rank, so load imbalance shows here)."""

    def __init__(self):
        self.rows_sent = self.rows_received = self.bytes_sent = self.bytes_received = 0
        self.seconds = 0.0

    def as_dict(self) -> dict:
        return {"rows_sent": self.rows_sent, "rows_received": self.rows_received, "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received, "seconds": self.seconds}

    def record(self, rows, send_counts, recv_counts, seconds) -> None:
        """The meter of `ExchangeRows`: called after each all-to-all of rows, forward or backward."""
        self.seconds += seconds
        row_bytes = rows.dtype.itemsize * (rows.shape[1] if rows.ndim > 1 else 1)
        self.bytes_sent += int(send_counts.sum()) * row_bytes
        self.bytes_received += int(recv_counts.sum()) * row_bytes

    def __repr__(self):
        return f"ExchangeStats({self.as_dict()})"


class AllGatherRows(Function):
    """out = concat_s rows_s (every rank's rows, in rank order), the same (N, ...) array on every rank.

    Every rank's loss may use all of out, so rows_r's gradient sums every rank's cotangent for its rows:
    d rows_r = (Σ_s g_s)[o_r : o_r + n_r], an all-reduce (rank order: deterministic) and a slice."""

    @staticmethod
    def forward(ctx, rows, comm):
        counts = comm.allgather_rows(np.array([rows.shape[0]], dtype=np.int64))
        ctx.comm, ctx.start = comm, int(counts[:comm.rank].sum())
        ctx.stop = ctx.start + rows.shape[0]
        return comm.allgather_rows(rows)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.allreduce_sum(ctx.xp.ascontiguousarray(grad))[ctx.start:ctx.stop].copy()


def _shallow_copy(module: Module, cls=None) -> Module:
    """A new module object (of `cls`, default module's class) with the same attributes and its own
    registries holding the same Parameter objects."""
    copy = (cls or type(module)).__new__(cls or type(module))
    for key, value in module.__dict__.items():
        object.__setattr__(copy, key, value.copy() if key in ("_parameters", "_buffers", "_modules") else value)
    return copy


class ExpertParallelMoE(MoE):
    """MoE over P ranks (module docstring). Build it like MoE, plus `comm=`; every rank builds the whole
    layer from the same generator (so the weights equal the single-process layer's) and keeps its E/P
    experts: `experts.w1` is (E/P, ff, d) on every rank, experts `expert_range` of the full layer.

        layer = ExpertParallelMoE(config, comm=tinymoe.distributed.world(), generator=0)
        layer = ExpertParallelMoE.from_moe(moe, comm)      # from a built MoE (which stays unchanged)
    """

    def __init__(self, config=None, *sizes, comm, device="cpu", generator=None, seed=None, name="MoE", **options):
        super().__init__(config, *sizes, device=device, generator=generator, seed=seed, name=name, **options)
        self._shard(comm)

    @classmethod
    def from_moe(cls, moe: MoE, comm: Communicator) -> "ExpertParallelMoE":
        """The expert-parallel layer holding moe's router and shared experts (the same Parameter objects) and
        this rank's slice of its experts (copies): the given layer itself is not changed."""
        if not isinstance(moe, MoE) or isinstance(moe, ExpertParallelMoE):
            raise TypeError(f"ExpertParallelMoE.from_moe: moe must be a single-process MoE, got {type(moe).__name__}")
        layer = _shallow_copy(moe, cls)
        layer._modules["experts"] = _shallow_copy(moe.experts)
        layer._shard(comm)
        return layer

    def _shard(self, comm) -> None:
        if not isinstance(comm, Communicator):
            raise TypeError(f"{self.name}: comm must be a tinymoe.distributed.Communicator, got {type(comm).__name__}")
        if self.n_experts % comm.size:
            raise ValueError(f"{self.name}: n_experts={self.n_experts} is not divisible by the {comm.size} ranks "
                             "of comm; expert parallelism gives every rank E/P experts (choose P dividing E)")
        _refuse_unsupported_options(self.config, comm.size, self.name)
        per_rank = self.n_experts // comm.size
        self.comm, self.expert_range = comm, range(comm.rank * per_rank, (comm.rank + 1) * per_rank)
        experts = self.experts
        for name, parameter in list(experts._parameters.items()):
            local = parameter.xp.ascontiguousarray(parameter.data[self.expert_range.start:self.expert_range.stop])
            setattr(experts, name, Parameter(local.copy()))
        experts.n_experts = per_rank
        experts.parameters_replaced()  # this rank's w1 and w3 as halves of one array again
        self.exchange_stats = ExchangeStats()

    def reset_exchange_stats(self) -> None:
        self.exchange_stats = ExchangeStats()

    def forward(self, x):
        # Every check below raises on this rank only (the others then wait in the next collective): run the
        # layer under tinymoe.distributed.abort_on_error, which ends every rank with this rank's traceback.
        label = self.label
        rows = self._checked_rows(x, label)
        comm, router, xp = self.comm, self.router, rows.xp

        noise_state = router.generator.bit_generator.state if router.kind == "noisy" else None
        rate, router.bias_update_rate = router.bias_update_rate, None  # the update must see the global load
        pending_load = router.pending_load  # deferred: the router adds its local load; the global one goes in
        try:
            routing = router(rows, layer_name=label, sequence_length=x.shape[-2] if x.ndim >= 2 else None)
        finally:
            router.bias_update_rate, router.pending_load = rate, pending_load
        requested = to_numpy(routing.requested_per_expert).astype(np.int64)
        global_requested = comm.allreduce_sum(requested)
        if router.balance == "sequence":  # whole sequences on every rank: the router's own loss is exact
            aux_loss = routing.aux_loss
        else:  # "global" with the step's counts (micro-batches and ranks), else this forward's on every rank
            counts = global_requested if router.balance == "batch" or router.global_load is None else \
                np.asarray(router.global_load, dtype=np.float64)
            fraction = counts / max(counts.sum(), 1)
            aux_loss = LoadBalanceLoss.apply(routing.probs, xp.asarray(fraction.astype(routing.probs.dtype)))
        if self.training and router.kind == "sigmoid":
            router.last_load = global_requested
            if router.defer_updates:
                router.pending_load = global_requested if pending_load is None else pending_load + global_requested
            elif rate is not None:
                router.update_bias()

        plan = routing_plan_unchecked(routing.expert_ids, self.n_experts, routing.capacity, routing.valid)
        self.last_decisions = (routing.expert_ids, plan.assignment_row >= 0)  # this rank's tokens, as MoE's
        dispatched = gather_rows_unchecked(rows, plan.row_token, token_rows=plan.assignment_row)
        exchange = plan_expert_exchange(plan.kept_per_expert, comm)
        meter = self.exchange_stats
        meter.rows_sent += int(exchange.send_counts.sum())
        meter.rows_received += exchange.n_received
        received = ExchangeRows.apply(dispatched, exchange.send_counts, exchange.recv_counts, comm, meter.record)
        order, inverse = xp.asarray(exchange.order), xp.asarray(exchange.inverse)
        expert_major = gather_rows_unchecked(received, order, token_rows=inverse[:, None])
        expert_out = self.experts(expert_major, exchange.expert_offsets)
        source_major = gather_rows_unchecked(expert_out, inverse, token_rows=order[:, None])
        returned = ExchangeRows.apply(source_major, exchange.recv_counts, exchange.send_counts, comm, meter.record)
        out = combine_rows_unchecked(returned, plan.assignment_row, routing.weights, row_assignment=plan.row_assignment)
        if self.n_shared_experts:
            shared = self.shared(rows)
            if hasattr(self, "shared_gate"):
                shared = shared * sigmoid(linear(rows, self.shared_gate))  # (T, d) · (T, 1), as MoE
            out = out + shared
        # As MoE.forward: the logits were finite (the router checked them), so NaN or inf came from the experts.
        check_finite(out.data, lambda: f"{label}: expert output is not finite (NaN or inf); {NON_FINITE_ADVICE}")

        importance = load = None
        if router.kind == "noisy":
            importance, load = self._global_noisy_losses(rows, routing, noise_state)
        self._losses = (aux_loss, routing.z_loss, importance, load,  # what MoE's loss properties read
                        routing.entropy_loss, routing.l1_loss)
        self.stats = MoEStats(routing.probs.data, routing.requested_per_expert, routing.valid,
                              plan.kept_per_expert, plan.n_tokens, plan.dropped_fraction,
                              n_slots=routing.expert_ids.shape[1], expert_choice=router.kind == "expert_choice")
        self.global_requested_per_expert = global_requested
        return out.reshape(*x.shape)

    def _global_noisy_losses(self, rows, routing, noise_state):
        """Importance and load losses (Shazeer et al. 2017) of the global batch: their inputs all-gathered.

        The router does not return its noise, so it is drawn again from the generator state it started from,
        exactly as Router.forward draws it (jitter first, then the (T, E) normal noise, training mode only)."""
        router, comm, xp = self.router, self.comm, rows.xp
        replay = np.random.Generator(type(router.generator.bit_generator)())
        replay.bit_generator.state = noise_state
        routed_input = rows.astype(router.weight.dtype)
        if self.training and router.jitter > 0:
            jitter = uniform(replay, routed_input.shape, xp, routed_input.dtype, 1 - router.jitter, 1 + router.jitter)
            routed_input = routed_input * Tensor(jitter)
        noise_logits = linear(routed_input, router.noise_weight)
        shape = tuple(routing.logits.shape)
        dtype = routing.logits.dtype
        noise = standard_normal(replay, shape, xp, dtype) if self.training else xp.zeros(shape, dtype)
        weights = AllGatherRows.apply(routing.weights, comm)
        expert_ids = comm.allgather_rows(xp.ascontiguousarray(routing.expert_ids))
        importance = ImportanceLoss.apply(weights, expert_ids, self.n_experts)
        load = NoisyLoadLoss.apply(AllGatherRows.apply(routing.logits, comm), AllGatherRows.apply(noise_logits, comm),
                                   comm.allgather_rows(noise), self.top_k)
        return importance, load

    def extra_repr(self):
        return f"{super().extra_repr()}, experts {self.expert_range.start}..{self.expert_range.stop - 1} of " \
               f"{self.n_experts} on rank {self.comm.rank}/{self.comm.size}"


def _refuse_unsupported_options(config, n_ranks: int, name: str) -> None:
    """ValueError naming the first MoEConfig option this layer would silently get wrong (module docstring)."""
    if config.n_null_experts:
        raise ValueError(f"{name}: ExpertParallelMoE does not support n_null_experts={config.n_null_experts} yet "
                         "(its global aux loss counts the E real experts, the router's probabilities cover E + m "
                         "outputs); use n_null_experts=0 or the single-process MoE")
    if config.capacity_per != "batch":
        raise ValueError(f"{name}: ExpertParallelMoE counts capacity per rank's token group; "
                         f"capacity_per={config.capacity_per!r} is not supported (use 'batch')")
    if config.router == "relu" and n_ranks > 1:
        raise ValueError(f"{name}: router='relu' is not supported over {n_ranks} ranks yet: its L1 coefficient "
                         "would step on each rank's own sparsity and the replicated routers would drift apart")


def expert_parallel(model: Module, comm: Communicator) -> Module:
    """Replace every MoE layer inside `model` (in place) by its ExpertParallelMoE over `comm`; returns model.

    Build the model the same way on every rank (same seed) first, and the optimizer after this call: the
    expert parameters are new (sliced) Parameter objects. A model that is itself an MoE is returned converted."""
    if isinstance(model, MoE) and not isinstance(model, ExpertParallelMoE):
        return ExpertParallelMoE.from_moe(model, comm)
    for _, module in list(model.named_modules()):
        for name, child in list(module._modules.items()):
            if isinstance(child, MoE) and not isinstance(child, ExpertParallelMoE):
                module._modules[name] = ExpertParallelMoE.from_moe(child, comm)
    return model
