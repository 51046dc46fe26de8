"""softmax, log_softmax and logsumexp along one axis, stable for logits of any magnitude.

All three subtract the maximum along the axis before exponentiating, so exp never overflows: logits of
±1e4 (or ±1e300) give finite values and gradients. The shift is taken as 0 where the maximum is ±inf, so a
row of −inf gives logsumexp = −inf (and softmax 0/0 = NaN, as in torch) instead of NaN from inf − inf.
The raw-array formulas live in tinymoe.engine.array_math (shared with cross_entropy, attention and the router).
"""
from __future__ import annotations

from ..engine.array_math import log_softmax as log_softmax_array
from ..engine.array_math import logsumexp as logsumexp_array
from ..engine.array_math import softmax as softmax_array
from ..engine.array_math import softmax_backward
from ..engine.checks import normalize_axis, require_bool, require_tensor
from ..engine.function import Function
from ..engine.tensor import Tensor


class _NormalizeAlongAxis(Function):
    """softmax and log_softmax: y = f(x, axis) is kept with the axis, and the backward is a one-line
    vector-Jacobian product of it, `vjp(xp, g, y, axis)`; the subclass sets both."""

    @classmethod
    def forward(cls, ctx, x, axis):
        y = cls.f(x, axis)
        ctx.save_for_backward(y)
        ctx.axis = axis
        return y

    @classmethod
    def backward(cls, ctx, grad):
        (y,) = ctx.saved_tensors
        return cls.vjp(ctx.xp, grad, y, ctx.axis)


class Softmax(_NormalizeAlongAxis):
    """y = exp(x − max) / sum(exp(x − max), axis);  dx = y · (g − sum(g · y, axis))"""

    f = staticmethod(softmax_array)
    vjp = staticmethod(lambda xp, grad, y, axis: softmax_backward(y, grad, axis))


class LogSoftmax(_NormalizeAlongAxis):
    """y = x − logsumexp(x, axis);  dx = g − exp(y) · sum(g, axis)"""

    f = staticmethod(log_softmax_array)
    vjp = staticmethod(lambda xp, grad, y, axis: grad - xp.exp(y) * grad.sum(axis=axis, keepdims=True))


class LogSumExp(Function):
    """y = max + log(sum(exp(x − max), axis));  dx = g · softmax(x, axis) (g broadcast back along axis)"""

    @staticmethod
    def forward(ctx, x, axis, keepdims):
        y_kept = logsumexp_array(x, axis, keepdims=True)
        ctx.save_for_backward(x, y_kept)
        ctx.axis, ctx.keepdims = axis, keepdims
        return y_kept if keepdims else y_kept.squeeze(axis)

    @staticmethod
    def backward(ctx, grad):
        x, y_kept = ctx.saved_tensors
        grad_kept = grad if ctx.keepdims else ctx.xp.expand_dims(grad, ctx.axis)
        return grad_kept * ctx.xp.exp(x - y_kept)


def _checked(x, axis, op: str):
    require_tensor(x, "x", op)
    if x.ndim == 0:
        raise ValueError(f"{op}: x is 0-d; it needs at least one axis")
    axis = normalize_axis(axis, x.ndim, op)
    if x.shape[axis] == 0:
        raise ValueError(f"{op}: axis={axis} of x (shape {x.shape}) is empty; there is nothing to normalize over")
    return axis


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    """exp(x) / sum(exp(x), axis): the entries along `axis` become positive and sum to 1."""
    return Softmax.apply(x, _checked(x, axis, "softmax"))


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    """log(softmax(x, axis)), computed without forming the softmax (exact for very negative entries)."""
    return LogSoftmax.apply(x, _checked(x, axis, "log_softmax"))


def logsumexp(x: Tensor, axis: int = -1, keepdims: bool = False) -> Tensor:
    """log(sum(exp(x), axis)); the axis is dropped unless keepdims."""
    axis = _checked(x, axis, "logsumexp")
    keepdims = require_bool(keepdims, "keepdims", "logsumexp")
    return LogSumExp.apply(x, axis, keepdims)
