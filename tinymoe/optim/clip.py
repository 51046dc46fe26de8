"""Global-norm gradient clipping."""
from __future__ import annotations

import math

from ..engine.backend import array_module


def clip_grad_norm(parameters, max_norm: float) -> float:
    """Scale all gradients by min(1, max_norm / ‖g‖) with ‖g‖ the norm of every gradient together.

    Returns ‖g‖ before clipping (inf or nan when a gradient is not finite; nothing is scaled then).
    The squares are summed in float64 on each gradient's device: one host transfer per device, not per tensor.
    """
    if not (isinstance(max_norm, (int, float)) and max_norm > 0):
        raise ValueError(f"max_norm={max_norm!r} must be a positive number")
    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    if not grads:
        return 0.0
    squares_by_module = {}
    for grad in grads:
        xp = array_module(grad)
        squares_by_module.setdefault(xp, []).append((grad.astype(xp.float64) ** 2).sum())
    total = math.sqrt(sum(float(xp.stack(squares).sum()) for xp, squares in squares_by_module.items()))
    if math.isfinite(total) and total > max_norm:
        scale = max_norm / (total + 1e-12)
        for grad in grads:
            grad *= scale
    return total
