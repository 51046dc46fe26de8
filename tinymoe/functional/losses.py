"""Losses: cross_entropy (from logits, with ignore_index) and mse_loss."""
from __future__ import annotations

from ..engine.function import Function
from ..engine.tensor import Tensor
from ..engine.checks import as_index_array, check_index_range, require_int, require_same_dtype, require_tensor
from ..engine.array_math import log_softmax

REDUCTIONS = ("mean", "sum", "none")


class CrossEntropy(Function):
    """loss_i = −log_softmax(logits_i)[t_i] for targets t_i ≠ ignore_index (0 for ignored ones), reduced.

    logits (..., C), targets (...). mean divides by the number of non-ignored targets (n); when n = 0 the
    mean is 0 with zero gradient, never NaN.
    d logits_i = (softmax(logits_i) − onehot(t_i)) · [t_i kept] · w_i,  w_i = g_i (none), g (sum), g / n (mean)
    """

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, reduction):
        xp = ctx.xp
        log_probs = log_softmax(logits, -1)
        kept = targets != ignore_index
        safe_targets = xp.where(kept, targets, 0)
        target_log_probs = xp.take_along_axis(log_probs, safe_targets[..., None], axis=-1)[..., 0]
        losses = xp.where(kept, -target_log_probs, 0)
        # A device array, not int(): the mean needs no host sync. max(n, 1): all ignored gives 0 / 1 = 0.
        kept_count = xp.maximum(kept.sum(), 1).astype(logits.dtype)
        ctx.save_for_backward(log_probs)
        ctx.safe_targets, ctx.kept, ctx.kept_count, ctx.reduction = safe_targets, kept, kept_count, reduction
        if reduction == "none":
            return losses
        total = losses.sum()
        return total / kept_count if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad):
        xp = ctx.xp
        (log_probs,) = ctx.saved_tensors
        num_classes = log_probs.shape[-1]
        weight = ctx.kept * (grad / ctx.kept_count if ctx.reduction == "mean" else grad)
        target_one_hot = ctx.safe_targets[..., None] == xp.arange(num_classes)
        return (xp.exp(log_probs) - target_one_hot) * weight[..., None]


def cross_entropy(logits: Tensor, targets, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Softmax cross-entropy of `logits` (..., C) against integer class `targets` (...).

    Targets equal to `ignore_index` contribute nothing. reduction: "mean" over the non-ignored targets
    (0.0 with zero gradient when every target is ignored), "sum", or "none" (shape (...), 0 where ignored).
    """
    op = "cross_entropy"
    require_tensor(logits, "logits", op)
    if logits.ndim == 0 or logits.shape[-1] == 0:
        raise ValueError(f"{op}: logits must have shape (..., C) with C >= 1 classes, got shape {logits.shape}")
    targets = as_index_array(targets, "targets", op, device=logits.device)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"{op}: targets has shape {tuple(targets.shape)} but logits of shape {logits.shape} "
            f"need targets of shape {logits.shape[:-1]}"
        )
    ignore_index = require_int(ignore_index, "ignore_index", op)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction={reduction!r} must be one of {REDUCTIONS}")
    check_index_range(targets, logits.shape[-1], "targets", op, ignore_index=int(ignore_index))
    return CrossEntropy.apply(logits, targets, int(ignore_index), reduction)


class MSELoss(Function):
    """loss = reduce((input − target)²);  d input = 2·(input − target)·g / n (n = size for mean, 1 for sum),
    d target = −d input"""

    @staticmethod
    def forward(ctx, input, target, reduction):
        difference = input - target
        ctx.save_for_backward(difference)
        ctx.reduction = reduction
        squared = difference * difference
        if reduction == "none":
            return squared
        return squared.mean() if reduction == "mean" else squared.sum()

    @staticmethod
    def backward(ctx, grad):
        (difference,) = ctx.saved_tensors
        scale = 2.0 / max(difference.size, 1) if ctx.reduction == "mean" else 2.0
        grad_input = scale * difference * grad
        return (grad_input if ctx.needs_input_grad[0] else None,
                -grad_input if ctx.needs_input_grad[1] else None)


def mse_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Squared error between two Tensors of the same shape; reduction "mean", "sum" or "none"."""
    require_tensor(input, "input", "mse_loss")
    require_tensor(target, "target", "mse_loss")
    require_same_dtype("mse_loss", input=input, target=target)
    if input.shape != target.shape:
        raise ValueError(f"mse_loss: target has shape {target.shape} but input has shape {input.shape}; expected equal")
    if reduction not in REDUCTIONS:
        raise ValueError(f"mse_loss: reduction={reduction!r} must be one of {REDUCTIONS}")
    return MSELoss.apply(input, target, reduction)
