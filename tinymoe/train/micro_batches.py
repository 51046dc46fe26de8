"""`tinymoe train --grad-accum N`: one optimizer step of the Trainer over N micro-batches of batch_size sequences
(the gradient of the whole batch's mean loss, tinymoe.train.accumulation), and the validation loss of a batch
computed in the same micro-batches (equal sizes: the mean of their means is the batch's mean)."""
from __future__ import annotations

import math

from ..optim import clip_grad_norm
from .accumulation import (accumulate_gradients, mean_over_micro_batches, merge_layer_counts, merge_loss_parts,
                           split_micro_batches)


def accumulated_step(model, optimizer, inputs, targets, n_micro_batches: int, grad_clip: float, diverged):
    """zero_grad, accumulate over n micro-batches, clip, step. diverged(loss) -> the exception to raise when a
    micro-batch's loss is not finite (before its backward: nothing non-finite reaches the weights).
    Returns (parts averaged over the micro-batches, per MoE layer (kept per expert summed over them, dropped
    fraction averaged, experts-per-token histogram summed)))."""

    def micro_loss(batch):
        total, parts = model.loss(*batch)
        if not math.isfinite(parts["total"]):
            raise diverged(parts["total"])
        return total, parts, moe_counts(model)

    optimizer.zero_grad()
    results = accumulate_gradients(model, micro_loss, split_micro_batches((inputs, targets), n_micro_batches))
    clip_grad_norm(optimizer.parameters(), grad_clip)
    optimizer.step()
    return merge_loss_parts([result[1] for result in results]), merge_layer_counts([result[2] for result in results])


def moe_counts(model) -> list:
    """Per MoE layer of the last forward: (kept per expert (E,) int64, dropped fraction, experts-per-token
    histogram (K+1,) int64): host values (the histogram syncs one bincount for the routers whose count varies)."""
    return [(layer.stats.kept_per_expert, float(layer.stats.dropped_fraction),
             layer.stats.experts_per_token_histogram) for layer in model.moe_layers()]


def micro_batched_loss(model, inputs, targets, n_micro_batches: int) -> float:
    """The cross-entropy of (inputs, targets) as the mean over n equal micro-batches (call under no_grad); for
    n = 1 exactly model.loss's."""
    return mean_over_micro_batches(model.loss(*micro)[1]["cross_entropy"]
                                   for micro in split_micro_batches((inputs, targets), n_micro_batches))
