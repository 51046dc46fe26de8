"""rms_norm (Zhang & Sennrich 2019) and layer_norm (Ba et al. 2016) over the last axis, one Function each,
sharing one backward.

With x̂ the normalized input, r = 1/sqrt(statistic + eps) and ĝ = g · weight (g where there is no weight),
over the last axis of size D (means are over that axis):
    rms_norm:   x̂ = x·r, r = 1/sqrt(mean(x²) + eps);        dx = r·(ĝ − x̂·mean(ĝ·x̂))
    layer_norm: x̂ = (x − μ)·r, r = 1/sqrt(var(x) + eps);    dx = r·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))
    both:       d weight = Σ_rows g·x̂;  d bias = Σ_rows g   (rows: every leading index of x)
"""
from __future__ import annotations

from ..engine.function import Function
from ..engine.tensor import Tensor
from ..engine.checks import require_number, require_same_dtype, require_tensor


class _Normalization(Function):
    """The backward rms_norm and layer_norm share. Forward keeps (x̂, r, weight), `ctx.subtracts_mean`
    (layer_norm: x̂ is centred, so dx also loses mean(ĝ)) and `ctx.has_bias`; with ĝ = g · weight:
        dx = r·(ĝ − [mean(ĝ)] − x̂·mean(ĝ·x̂)),  d weight = Σ_rows g·x̂,  d bias = Σ_rows g
    Returns (dx, [d weight], [d bias]) in input order, None for inputs that need no gradient."""

    @staticmethod
    def backward(ctx, grad):
        normalized, inverse_scale, weight = ctx.saved_tensors
        grad_normalized = grad if weight is None else grad * weight
        grads = [None]
        if ctx.needs_input_grad[0]:
            xp = ctx.xp
            centered_grad = grad_normalized
            if ctx.subtracts_mean:
                centered_grad = grad_normalized - grad_normalized.mean(axis=-1, keepdims=True)
            grad_x = grad_normalized * normalized  # one (..., D) buffer becomes dx: the formula, op for op
            projection = grad_x.mean(axis=-1, keepdims=True)
            xp.multiply(normalized, projection, out=grad_x)
            xp.subtract(centered_grad, grad_x, out=grad_x)
            grad_x *= inverse_scale
            grads[0] = grad_x
        width = normalized.shape[-1]
        if weight is not None:
            needed = ctx.needs_input_grad[len(grads)]
            grads.append((grad * normalized).reshape(-1, width).sum(axis=0) if needed else None)
        if ctx.has_bias:
            needed = ctx.needs_input_grad[len(grads)]
            grads.append(grad.reshape(-1, width).sum(axis=0) if needed else None)
        return tuple(grads)


class RMSNorm(_Normalization):
    """y = x / sqrt(mean(x², -1) + eps) · weight;  dx = r·(ĝ − x̂·mean(ĝ·x̂)), d weight = Σ_rows g·x̂
    (backward: _Normalization's, without the mean(ĝ) term)"""

    @staticmethod
    def forward(ctx, x, weight, eps):
        # For float32 and float64, sum / D is mean's own arithmetic (a sum in x's dtype, then one division),
        # bit for bit, at half its call cost: decoding calls this ~4 times per layer on one row. float16's
        # mean sums in float32 (a float16 sum of squares overflows at 65504), so it keeps mean.
        squares = x * x
        if x.dtype.itemsize >= 4:
            mean_square = squares.sum(axis=-1, keepdims=True) / x.shape[-1]
        else:
            mean_square = squares.mean(axis=-1, keepdims=True)
        inverse_rms = 1.0 / ctx.xp.sqrt(mean_square + eps)
        normalized = x * inverse_rms
        ctx.save_for_backward(normalized, inverse_rms, weight)
        ctx.subtracts_mean, ctx.has_bias = False, False
        return normalized if weight is None else normalized * weight


class LayerNorm(_Normalization):
    """y = (x − mean) / sqrt(var + eps) · weight + bias;  dx = r·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂))
    (backward: _Normalization's)"""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        centered = x - x.mean(axis=-1, keepdims=True)
        inverse_std = 1.0 / ctx.xp.sqrt((centered * centered).mean(axis=-1, keepdims=True) + eps)
        normalized = centered * inverse_std
        ctx.save_for_backward(normalized, inverse_std, weight)
        ctx.subtracts_mean, ctx.has_bias = True, bias is not None
        y = normalized if weight is None else normalized * weight
        return y if bias is None else y + bias


def _check_affine(x, parameter, argument: str, op: str) -> None:
    if parameter is None:
        return
    require_tensor(parameter, argument, op)
    if parameter.shape != (x.shape[-1],):
        raise ValueError(f"{op}: {argument} has shape {parameter.shape}, expected ({x.shape[-1]},) = x's last axis")
    require_same_dtype(op, x=x, **{argument: parameter})


def _check_input(x, eps, op: str) -> float:
    require_tensor(x, "x", op)
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have shape (..., D) with D >= 1, got shape {x.shape}")
    return require_number(eps, "eps", op, low=0.0)


def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """x / sqrt(mean(x², -1) + eps) · weight.  x (..., D), weight (D,) or None -> (..., D)."""
    eps = _check_input(x, eps, "rms_norm")
    _check_affine(x, weight, "weight", "rms_norm")
    return RMSNorm.apply(x, weight, eps)


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """(x − mean) / sqrt(var + eps) · weight + bias over the last axis (biased variance, like torch).

    x (..., D), weight (D,) or None, bias (D,) or None -> (..., D).
    """
    eps = _check_input(x, eps, "layer_norm")
    _check_affine(x, weight, "weight", "layer_norm")
    _check_affine(x, bias, "bias", "layer_norm")
    return LayerNorm.apply(x, weight, bias, eps)
