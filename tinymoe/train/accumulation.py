"""Gradient accumulation: one optimizer step over N micro-batches that equals one step over their union.

    optimizer.zero_grad()
    results = accumulate_gradients(model, loss_fn, split_micro_batches((inputs, targets), N))   # Σ_j ∇(loss_j / N)
    clip_grad_norm(...); optimizer.step()
    parts = merge_loss_parts([result[1] for result in results])   # the step's values: means over micro-batches

With micro-batches of equal size and a loss that is a mean over tokens, Σ_j ∇(loss_j / N) is the gradient of
the mean loss over the whole batch. Three router parts of the step are not gradients, and the helper makes them
per step, not per micro-batch:

- the sigmoid router's aux-free bias (DeepSeek-V3) and the relu router's L1 coefficient (ReMoE): during the
  step every router has `defer_updates = True`, so a training forward only adds its load (or active gates) to
  the router's pending sum; after the last micro-batch `update_bias()` (when `bias_update_rate` is set) and
  `update_l1_coefficient()` run once, from the sums: the same update one big forward would have made.
- balance="global" (Qiu et al. 2025): f_e must count every micro-batch of the step (and every rank). The
  helper first runs the micro-batches under no_grad (a counting pass: one extra forward per micro-batch, only
  when some layer has balance="global"), sums each such router's `last_choice_counts`, passes the sums
  through `all_reduce` (e.g. a Communicator's `allreduce_sum`) and sets `router.global_load` for the real
  pass; the loss of micro-batch j is then E·Σ_e f_e^global·P_e^j, and their mean is E·Σ_e f_e^global·P̄_e,
  the global-batch loss. The routers' noise generators are rewound after the counting pass, so it routes
  exactly as the real pass when the routers are the only randomness of the forward (dropout elsewhere makes
  the counts an estimate from an independent draw).

Without this helper the layers keep their old behaviour (updates at the end of every training forward;
balance="global" counting one forward).
"""
from __future__ import annotations

import copy

import numpy as np

from ..engine.autograd import no_grad
from ..engine.checks import require_int
from ..nn.router import Router

__all__ = ["accumulate_gradients", "mean_over_micro_batches", "merge_layer_counts", "merge_loss_parts",
           "routers_of", "split_micro_batches"]


def routers_of(model) -> list:
    """Every Router inside `model` (a Module), in module order."""
    return [module for _, module in model.named_modules() if isinstance(module, Router)]


def split_micro_batches(arrays, n_micro_batches: int) -> list:
    """Split every array of `arrays` (a tuple of arrays with the same leading size B) into n equal
    micro-batches along axis 0: a list of n tuples. B must be a multiple of n (equal sizes keep the
    accumulated gradient equal to the big batch's). (The rows of one rank under data parallelism:
    tinymoe.train.distributed.split_batch.)"""
    require_int(n_micro_batches, "n_micro_batches", "split_micro_batches", low=1)
    sizes = {len(array) for array in arrays}
    if len(sizes) != 1:
        raise ValueError(f"split_micro_batches: the arrays have different leading sizes {sorted(sizes)}")
    (size,) = sizes
    if size % n_micro_batches:
        raise ValueError(f"split_micro_batches: batch size {size} is not a multiple of "
                         f"n_micro_batches={n_micro_batches} (micro-batches must be equal for the step to equal "
                         "one big batch)")
    step = size // n_micro_batches
    return [tuple(array[i * step:(i + 1) * step] for array in arrays) for i in range(n_micro_batches)]


# ----- a step's values from its micro-batches' (equal sizes: the mean of their means is the batch's mean) -----
def mean_over_micro_batches(values) -> float:
    """The mean of per-micro-batch floats (a loss, an aux loss) as a Python float: np.mean, pairwise summed."""
    return float(np.mean(list(values)))


def merge_loss_parts(parts: list) -> dict:
    """{name: mean over micro-batches} of a list of loss-part dicts (model.loss's `parts`, one per micro-batch,
    with the same keys as the first)."""
    return {key: mean_over_micro_batches(part[key] for part in parts) for key in parts[0]}


def merge_layer_counts(counts: list) -> list:
    """Per MoE layer, the step's (kept rows per expert (E,), dropped fraction, experts-per-token histogram
    (K+1,)) from a list, one per micro-batch, of per-layer triples (micro_batches.moe_counts): kept and the
    histogram summed, the dropped fraction averaged."""
    return [(sum(micro[layer][0] for micro in counts), mean_over_micro_batches(micro[layer][1] for micro in counts),
             sum(micro[layer][2] for micro in counts)) for layer in range(len(counts[0]))]


def accumulate_gradients(model, loss_fn, micro_batches, *, all_reduce=None, after_each=None) -> list:
    """Run loss_fn on each micro-batch and backpropagate loss / N into the parameters' .grad (added to what is
    there: zero the gradients before). loss_fn(micro_batch) returns a scalar Tensor, or a tuple whose first
    item is one. Then runs the per-step router updates (see the module docstring). all_reduce: a function
    summing a NumPy array over ranks, for balance="global" under data parallelism (None: one process).
    after_each(index, result): called after each micro-batch's backward (read the layers' stats there: the
    counting pass also calls loss_fn, under no_grad, so loss_fn itself should have no side effects).
    Returns what loss_fn returned for each micro-batch."""
    micro_batches = list(micro_batches)
    if not micro_batches:
        raise ValueError("accumulate_gradients: micro_batches is empty")
    routers = routers_of(model)
    deferred = [router.defer_updates for router in routers]
    scale = 1.0 / len(micro_batches)
    try:
        for router in routers:
            router.defer_updates, router.global_load = True, None
        global_routers = [router for router in routers if router.balance == "global"]
        if global_routers:
            _set_global_load(global_routers, routers, loss_fn, micro_batches, all_reduce)
        results = []
        for index, batch in enumerate(micro_batches):
            result = loss_fn(batch)
            loss = result[0] if isinstance(result, tuple) else result
            (loss * scale).backward()
            results.append(result)
            if after_each is not None:
                after_each(index, result)
        for router in routers:
            if router.kind == "sigmoid" and router.bias_update_rate is not None and router.pending_load is not None:
                router.update_bias()
            elif router.kind == "relu" and router.pending_gates is not None:
                router.update_l1_coefficient()
        return results
    finally:
        for router, flag in zip(routers, deferred):  # a failed step leaves no partial sums for the next one
            router.defer_updates, router.global_load = flag, None
            router.pending_load = router.pending_gates = None


_COUNTING_STATE = ("generator", "last_load", "pending_load", "last_sparsity", "pending_gates", "last_choice_counts")


def _set_global_load(global_routers, routers, loss_fn, micro_batches, all_reduce) -> None:
    """The counting pass: route every micro-batch under no_grad, sum the global routers' counts, reduce them
    over ranks, set router.global_load. Every router's state is put back as it was before the pass."""
    saved = [{name: copy.deepcopy(getattr(router, name)) for name in _COUNTING_STATE} for router in routers]
    totals = [None] * len(global_routers)
    try:
        with no_grad():
            for batch in micro_batches:
                loss_fn(batch)
                for index, router in enumerate(global_routers):
                    counts = router.last_choice_counts
                    totals[index] = counts if totals[index] is None else totals[index] + counts
    finally:
        for router, state in zip(routers, saved):
            for name, value in state.items():
                setattr(router, name, value)
    for router, total in zip(global_routers, totals):
        router.global_load = total if all_reduce is None else all_reduce(total)
