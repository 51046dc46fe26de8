"""Data- and expert-parallel training over a Communicator: what the training loop calls when P > 1.

Every rank builds the same model from the same seed, then `expert_parallel(model, comm)` keeps E/P experts
of each MoE layer per rank (`tinymoe.nn.expert_parallel`); everything else is replicated. One step:

    inputs_r, targets_r = split_batch(inputs, targets, comm)   rank r: sequences [r·B/P, (r+1)·B/P)
    L_r = model.loss(inputs_r, targets_r)                        a mean over r's tokens
    L_r.backward()                                               exchanges run reversed inside
    reduce_gradients(model, comm)                                replicated: mean over ranks; experts: / P
    clip_grad_norm_distributed(...)                              the norm of the global gradient
    optimizer.step()

so the parameters follow dJ/dθ of J = (1/P) Σ_r L_r, which with B/P sequences per rank is the single-process
loss of the whole batch. With grad_accum = N (`--grad-accum`) the global batch holds N·B sequences: micro-batch
j is sequences [j·B, (j+1)·B), split over the ranks as above, and `accumulate_gradients` sums Σ_j ∇(L_rj / N)
on every rank (its counting pass all-reduces balance="global"'s counts over the ranks, and its forwards'
all-to-alls count in the exchange statistics, as the real traffic they are; the sigmoid bias steps once per
step from the load of every micro-batch and rank): the one-process --grad-accum N step, hence the N·B batch's
for dropless routing. So a run under P ranks equals the one-process run up to rounding (dropless
routing; capacity and expert choice act per rank's token group, see ExpertParallelMoE). Same seed and P give
the same bits every run (the collectives reduce in rank order).

Checkpoints keep the one-process format: `gather_model_state` / `gather_optimizer_state` concatenate the
expert tensors of every rank in rank order (= expert order), so rank 0 writes exactly what a one-process run
writes and `tinymoe sample` reads it; `localize_checkpoint` slices a loaded one for this rank, so a run can
resume under any P that divides E (2 → 4 → 1). Every rank reads the checkpoint file itself (one node, or a
shared file system).
"""
from __future__ import annotations

import math

import numpy as np

from ..distributed import Communicator
from ..engine.autograd import no_grad
from ..engine.backend import array_module
from ..nn.expert_parallel import ExpertParallelMoE, expert_parallel
from .accumulation import (accumulate_gradients, mean_over_micro_batches, merge_layer_counts, merge_loss_parts,
                           split_micro_batches)
from .checkpoint import Checkpoint
from .micro_batches import moe_counts

__all__ = ["ParallelTraining", "clip_grad_norm_distributed", "distributed_evaluate", "distributed_train_step",
           "expert_parallel", "expert_shards", "gather_model_state", "gather_optimizer_state", "localize_checkpoint",
           "reduce_gradients", "sharded_parameters", "split_batch", "step_statistics"]


def expert_shards(model) -> dict:
    """{state-dict name: (layer, parameter)} of every expert tensor this rank holds a slice of (axis 0)."""
    shards = {}
    for module_name, module in model.named_modules():
        if isinstance(module, ExpertParallelMoE):
            prefix = f"{module_name}.experts" if module_name else "experts"
            for name, parameter in module.experts._parameters.items():
                shards[f"{prefix}.{name}"] = (module, parameter)
    return shards


def sharded_parameters(model) -> set:
    """ids of the expert Parameters (local slices); every other parameter is replicated."""
    return {id(parameter) for _, parameter in expert_shards(model).values()}


def split_batch(inputs, targets, comm: Communicator):
    """Rank r's share of a global batch (B, L): sequences [r·B/P, (r+1)·B/P). B must be divisible by P (so
    every rank's loss is a mean over as many tokens, and their mean is the batch's mean)."""
    batch = int(np.shape(inputs)[0])
    if np.shape(targets)[:1] != (batch,):
        raise ValueError(f"split_batch: inputs hold {batch} sequences but targets have shape {np.shape(targets)}")
    if batch % comm.size:
        raise ValueError(f"split_batch: the batch of {batch} sequences (--batch-size) is not divisible by the "
                         f"{comm.size} ranks; choose a batch size that is a multiple of {comm.size}")
    share = batch // comm.size
    rows = slice(comm.rank * share, (comm.rank + 1) * share)
    return inputs[rows], targets[rows]


def reduce_gradients(parameters, comm: Communicator, sharded: set) -> None:
    """After backward: replicated gradients become their mean over ranks (one rank-order all-reduce per
    dtype, deterministic); expert gradients (ids in `sharded`) are divided by P (they already sum the
    contributions of every rank's tokens). A replicated parameter without a gradient counts as zeros."""
    replicated = [p for p in parameters if id(p) not in sharded]
    for parameter in parameters:
        if id(parameter) in sharded and parameter.grad is not None:
            parameter.grad /= comm.size
    for dtype in sorted({p.dtype.str for p in replicated}):
        group = [p for p in replicated if p.dtype.str == dtype]
        xp = group[0].xp
        for p in group:
            if p.grad is None:
                p.grad = xp.zeros(p.shape, dtype=p.dtype)
        flat = xp.concatenate([p.grad.reshape(-1) for p in group])
        flat = comm.allreduce_mean(flat)
        start = 0
        for p in group:
            p.grad = flat[start:start + p.size].reshape(p.shape).copy()
            start += p.size


def clip_grad_norm_distributed(parameters, max_norm: float, comm: Communicator, sharded: set) -> float:
    """`tinymoe.optim.clip_grad_norm` of the global gradient: ‖g‖² = Σ replicated g² (the same on every rank)
    + Σ over ranks of Σ local expert g². Scales every gradient by min(1, max_norm/‖g‖); returns ‖g‖."""
    if not (isinstance(max_norm, (int, float)) and max_norm > 0):
        raise ValueError(f"clip_grad_norm_distributed: max_norm={max_norm!r} must be a positive number")
    grads = [(id(p) in sharded, p.grad) for p in parameters if p.grad is not None]
    squares = np.zeros(2)  # (replicated, sharded)
    for is_shard, grad in grads:
        squares[int(is_shard)] += float((grad.astype(array_module(grad).float64) ** 2).sum())
    total = math.sqrt(squares[0] + float(comm.allreduce_sum(squares[1:])[0]))
    if math.isfinite(total) and total > max_norm:
        scale = max_norm / (total + 1e-12)
        for _, grad in grads:
            grad *= scale
    return total


PART_NAMES = ("total", "cross_entropy", "aux", "z", "noisy")


def distributed_train_step(model, optimizer, inputs, targets, comm: Communicator, grad_clip: float,
                           sharded: set | None = None, grad_accum: int = 1, layer_counts: list | None = None) -> dict:
    """One data- and expert-parallel optimizer step on the global batch (inputs, targets) (grad_accum·B, L), the
    same arrays on every rank (draw them from one generator state), in grad_accum micro-batches (module
    docstring). Returns the loss parts of model.loss averaged over micro-batches and ranks (the global batch's
    values) and "grad_norm". layer_counts: a list to fill with this rank's per-MoE-layer (kept per expert,
    dropped fraction, experts-per-token histogram) of the step, summed (dropped: averaged) over the
    micro-batches. Collective: every rank calls it each step. Raises FloatingPointError, on every rank alike,
    when a global loss is not finite (before its backward)."""
    sharded = sharded_parameters(model) if sharded is None else sharded

    def micro_loss(batch):
        total, parts = model.loss(*split_batch(*batch, comm))
        parts = global_parts(parts, comm)
        if not math.isfinite(parts["total"]):
            raise FloatingPointError(f"the loss became {parts['total']} (mean over {comm.size} ranks); "
                                     "lower --lr or raise --grad-clip")
        return total, parts

    micro_counts = []
    optimizer.zero_grad()
    results = accumulate_gradients(model, micro_loss, split_micro_batches((inputs, targets), grad_accum),
                                   all_reduce=comm.allreduce_sum,
                                   after_each=lambda index, result: micro_counts.append(moe_counts(model)))
    parts = merge_loss_parts([result[1] for result in results])
    if layer_counts is not None:
        layer_counts[:] = merge_layer_counts(micro_counts)
    parameters = optimizer.parameters()
    reduce_gradients(parameters, comm, sharded)
    parts["grad_norm"] = clip_grad_norm_distributed(parameters, grad_clip, comm, sharded)
    optimizer.step()
    return parts


def global_parts(parts: dict, comm: Communicator) -> dict:
    """The mean over ranks of model.loss's float parts (one all-reduce)."""
    values = comm.allreduce_mean(np.array([float(parts.get(name, 0.0)) for name in PART_NAMES]))
    return dict(parts, **{name: float(value) for name, value in zip(PART_NAMES, values) if name in parts})


def distributed_evaluate(model, batches, comm: Communicator, grad_accum: int = 1) -> float:
    """Mean cross-entropy over `batches` (each a global (inputs, targets), in grad_accum equal micro-batches,
    each split over ranks: the token groups of training); the same value on every rank. Every rank runs every
    forward (the MoE layers exchange rows)."""
    was_training = model.training
    model.eval()
    with no_grad():
        mean = mean_over_micro_batches(model.loss(*split_batch(*micro, comm))[1]["cross_entropy"]
                                       for batch in batches for micro in split_micro_batches(batch, grad_accum))
    model.train(was_training)
    return float(comm.allreduce_mean(np.array([mean]))[0])


def step_statistics(model, comm: Communicator, layer_counts: list | None = None) -> dict:
    """Routing and exchange statistics of the last step, the same dict on every rank (for metrics.jsonl):
    tokens_per_expert (per MoE layer, global counts), dropped_fraction (per layer, mean over ranks),
    experts_per_token_histogram (per layer, summed over ranks), and per layer and rank: rows_received,
    bytes_sent, bytes_received, exchange_seconds. Resets the exchange meters. layer_counts: this rank's
    (kept, dropped, histogram) per layer (distributed_train_step's, over micro-batches); None: the last forward's."""
    layers = [module for _, module in model.named_modules() if isinstance(module, ExpertParallelMoE)]
    if not layers:
        return {}
    layer_counts = [(layer.stats.kept_per_expert, layer.stats.dropped_fraction, layer.stats.experts_per_token_histogram)
                    for layer in layers] if layer_counts is None else layer_counts
    kept = comm.allreduce_sum(np.stack([counts[0] for counts in layer_counts]))
    dropped = comm.allreduce_mean(np.array([counts[1] for counts in layer_counts], dtype=np.float64))
    histograms = [np.asarray(counts[2], dtype=np.int64) for counts in layer_counts]
    summed = comm.allreduce_sum(np.concatenate(histograms))  # one reduction; layers may differ in K
    bounds = np.cumsum([0] + [h.size for h in histograms])
    fields = ("rows_received", "bytes_sent", "bytes_received", "seconds")
    mine = np.array([[float(getattr(layer.exchange_stats, name)) for name in fields] for layer in layers])
    every = comm.allgather_rows(mine[None])  # (P, layers, fields)
    for layer in layers:
        layer.reset_exchange_stats()
    stats = {"tokens_per_expert": kept.tolist(), "dropped_fraction": dropped.tolist(),
             "experts_per_token_histogram": [summed[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]}
    for index, name in enumerate(fields):
        key = "exchange_seconds" if name == "seconds" else name
        column = every[:, :, index].T  # (layers, P)
        stats[key] = column.tolist() if name == "seconds" else column.astype(np.int64).tolist()
    return stats


# ----- checkpoints in the one-process format ------------------------------------------------------------------
def gather_model_state(model, comm: Communicator) -> dict:
    """model.state_dict() with every expert tensor whole (E, ...): this rank's slice and the others',
    concatenated in rank order. Collective; every rank gets the whole state (rank 0 writes it)."""
    state, shards = model.state_dict(), expert_shards(model)
    for name in sorted(shards):
        state[name] = comm.allgather_rows(np.ascontiguousarray(state[name]))
    return state


def gather_optimizer_state(optimizer, model, comm: Communicator) -> dict:
    """optimizer.state_dict() with the per-parameter arrays of the expert tensors (Adam's moments) whole.
    Collective: every rank must hold state for the same parameters (true after the same steps)."""
    state = optimizer.state_dict()
    sharded = sharded_parameters(model)
    for position, parameter in enumerate(optimizer.parameters()):
        if id(parameter) in sharded and position in state["state"]:
            entry = state["state"][position]
            for name in sorted(entry):
                if np.ndim(entry[name]) and np.shape(entry[name]) == tuple(parameter.shape):
                    entry[name] = comm.allgather_rows(np.ascontiguousarray(entry[name]))
    return state


def _local_slice(array, layer: ExpertParallelMoE, what: str):
    if np.ndim(array) == 0 or np.shape(array)[0] != layer.n_experts:
        raise ValueError(f"localize_checkpoint: {what} has shape {np.shape(array)}; expected the whole "
                         f"{layer.n_experts} experts on axis 0 (a checkpoint in the one-process format)")
    return np.ascontiguousarray(array[layer.expert_range.start:layer.expert_range.stop])


def localize_checkpoint(checkpoint: Checkpoint, model, optimizer, comm: Communicator) -> Checkpoint:
    """The checkpoint (one-process format, whole experts) with this rank's slice of every expert tensor and
    of its optimizer moments: load it with model.load_state_dict / optimizer.load_state_dict as usual.
    Works under any P dividing E, whatever P wrote it. `comm` is the model's (checked)."""
    shards = expert_shards(model)
    for layer, _ in shards.values():
        if layer.comm.size != comm.size or layer.comm.rank != comm.rank:
            raise ValueError(f"localize_checkpoint: the model's layers run on {layer.comm}, not on {comm}")
    model_state = dict(checkpoint.model_state)
    for name, (layer, _) in shards.items():
        if name in model_state:
            model_state[name] = _local_slice(model_state[name], layer, f"model/{name}")
    optimizer_state = checkpoint.optimizer_state
    if optimizer_state is not None and optimizer is not None:
        layer_of = {id(parameter): layer for layer, parameter in shards.values()}
        optimizer_state = dict(optimizer_state, state={p: dict(e) for p, e in optimizer_state["state"].items()})
        parameters = optimizer.parameters()
        for position, entry in optimizer_state["state"].items():
            position = int(position)
            if position < len(parameters) and id(parameters[position]) in layer_of:
                layer = layer_of[id(parameters[position])]
                for name, value in entry.items():
                    if np.ndim(value):
                        entry[name] = _local_slice(value, layer, f"optimizer/{position}/{name}")
    return Checkpoint(meta=checkpoint.meta, model_state=model_state, optimizer_state=optimizer_state)


class ParallelTraining:
    """Everything the training loop needs for P > 1 ranks, one method per place it changes (see the module
    docstring). The loop keeps its one-process code when `comm.size == 1`, so one-process runs are unchanged.

        parallel = ParallelTraining(comm, batch_size)   # checks --batch-size against P
        model = parallel.prepare(model)                 # before building the optimizer
        parts = parallel.step(model, optimizer, inputs, targets, grad_clip)
        layer_counts, exchange = parallel.layer_statistics(model)
        val = parallel.evaluate(model, batches)
        model_state, optimizer_state = parallel.checkpoint_state(model, optimizer)   # then rank 0 writes
        checkpoint = parallel.localize(checkpoint, model, optimizer)                   # after load_checkpoint
        if parallel.any(interrupt.requested): ...       # every rank stops at the same step
        if parallel.root_decides(self._checkpoint_due()): ...   # time-based decisions taken by rank 0
    """

    def __init__(self, comm: Communicator, batch_size: int, grad_accum: int = 1):
        if not isinstance(comm, Communicator):
            raise TypeError(f"ParallelTraining: comm must be a tinymoe.distributed.Communicator, got "
                            f"{type(comm).__name__}")
        if batch_size % comm.size:
            raise ValueError(f"--batch-size {batch_size} is not divisible by the {comm.size} ranks of "
                             f"--expert-parallel {comm.size}: every rank takes batch_size/P sequences")
        self.comm, self.sharded, self.grad_accum, self.layer_counts = comm, set(), grad_accum, []

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, writes files and plots."""
        return self.comm.rank == 0

    def prepare(self, model):
        """Make every MoE layer of `model` expert-parallel (n_experts must be divisible by P)."""
        expert_parallel(model, self.comm)
        self.sharded = sharded_parameters(model)
        return model

    def step(self, model, optimizer, inputs, targets, grad_clip: float) -> dict:
        return distributed_train_step(model, optimizer, inputs, targets, self.comm, grad_clip, self.sharded,
                                      self.grad_accum, self.layer_counts)

    def layer_statistics(self, model):
        """(per MoE layer (global kept rows per expert, dropped fraction, experts-per-token histogram summed over
        ranks), exchange statistics) of the step."""
        stats = step_statistics(model, self.comm, self.layer_counts or None)
        counts = [np.asarray(layer, dtype=np.int64) for layer in stats.pop("tokens_per_expert")]
        histograms = [np.asarray(layer, dtype=np.int64) for layer in stats.pop("experts_per_token_histogram")]
        return list(zip(counts, stats.pop("dropped_fraction"), histograms)), stats

    def evaluate(self, model, batches) -> float:
        return distributed_evaluate(model, batches, self.comm, self.grad_accum)

    def checkpoint_state(self, model, optimizer):
        """(model state, optimizer state) in the one-process format: whole experts, gathered (collective)."""
        return gather_model_state(model, self.comm), gather_optimizer_state(optimizer, model, self.comm)

    def localize(self, checkpoint: Checkpoint, model, optimizer) -> Checkpoint:
        return localize_checkpoint(checkpoint, model, optimizer, self.comm)

    def num_parameters(self, model) -> int:
        """Parameters of the whole model (every rank's experts counted once)."""
        local = sum(parameter.size for parameter in model.parameters())
        experts = sum(parameter.size for parameter in model.parameters() if id(parameter) in self.sharded)
        return int(local + (self.comm.size - 1) * experts)

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any (one tiny all-reduce)."""
        return bool(self.comm.allreduce_sum(np.array([int(bool(flag))], dtype=np.int64))[0])

    def root_decides(self, flag: bool) -> bool:
        """Rank 0's `flag` on every rank (for decisions from clocks, which differ between ranks)."""
        return bool(self.comm.broadcast(np.array([int(bool(flag))], dtype=np.int64), root=0)[0])

    def progress_stream(self, stream):
        """`stream` on rank 0; on the other ranks a stream that discards what it is given."""
        return stream if self.is_main else _Discard()


class _Discard:
    """A text stream that keeps nothing (the progress of ranks other than 0)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        return None

    def isatty(self) -> bool:
        return False
