"""Numerically stable formulas on raw arrays of any array module (NumPy or CuPy).

Functions' forwards and backwards are written with these; they never build a graph. Each takes arrays and
finds their module itself.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np

from .backend import array_module

_SQRT_2 = math.sqrt(2.0)
_SQRT_PI = math.sqrt(math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def ignore_float_errors(xp):
    """Silence NumPy's overflow/invalid warnings in a block whose inf or NaN are clipped or replaced right after."""
    if xp.__name__ == "numpy":
        return np.errstate(over="ignore", divide="ignore", invalid="ignore")
    return contextlib.nullcontext()


def stable_argsort(keys, axis: int = -1):
    """Ascending order along `axis`; equal keys keep their index order (CuPy's sort is always stable)."""
    xp = array_module(keys)
    if xp is np:
        return np.argsort(keys, axis=axis, kind="stable")
    return xp.argsort(keys, axis=axis)


def stable_top_k(scores, k: int, axis: int = -1):
    """Indices of the k largest scores along `axis` (-1/1 of a 2-D array, or 0), largest first; ties go to the
    lower index, so the selection is deterministic on every device."""
    order = stable_argsort(-scores, axis=axis)
    return order[:, :k] if axis in (-1, 1) else order[:k]


def scatter_add(xp, target, index, values):
    """target[index] += values in place, summing repeated indices (NumPy add.at; cupyx.scatter_add on CuPy)."""
    if xp.__name__ == "numpy":
        xp.add.at(target, index, values)
    else:
        import cupyx

        cupyx.scatter_add(target, index, values)


# ----- softmax family: shift by the maximum so exp never overflows (|x| ~ 1e4 stays finite) ------------


def _shift(x, axis: int):
    """max(x, axis) (keepdims), replaced by 0 where it is not finite (a row of −inf stays −inf, not NaN)."""
    xp = array_module(x)
    peak = x.max(axis=axis, keepdims=True)
    return xp.where(xp.isfinite(peak), peak, 0)


def logsumexp(x, axis: int = -1, keepdims: bool = False):
    """log Σ exp(x) along `axis`, computed as m + log Σ exp(x − m)."""
    xp = array_module(x)
    peak = _shift(x, axis)
    out = peak + xp.log(xp.exp(x - peak).sum(axis=axis, keepdims=True))
    return out if keepdims else out.squeeze(axis)


def log_softmax(x, axis: int = -1):
    """x − logsumexp(x), computed as (x − m) − log Σ exp(x − m)."""
    xp = array_module(x)
    shifted = x - _shift(x, axis)
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


def softmax(x, axis: int = -1, masked_rows_to_zero: bool = False):
    """exp(x − m) / Σ exp(x − m).

    A row whose entries are all −inf gives 0/0 = NaN (as torch), or zeros with masked_rows_to_zero=True
    (attention: a query that may attend no key gets no weight, and so a zero output and gradient).
    """
    xp = array_module(x)
    weights = xp.exp(x - _shift(x, axis))
    total = weights.sum(axis=axis, keepdims=True)
    if masked_rows_to_zero:
        total = xp.where(total > 0, total, 1)
    return weights / total


def softmax_in_place(x, masked_rows_to_zero: bool = True):
    """x ← softmax(x) along the last axis, in x's own buffer: softmax's formula step for step (so bitwise the
    same), for a caller that owns a large array (attention's scores). On NumPy the row maximum is fmax.reduce,
    faster than max and equal to it except on a row holding NaN, which comes out all NaN either way."""
    xp = array_module(x)
    peak = np.fmax.reduce(x, axis=-1, keepdims=True) if xp is np else x.max(axis=-1, keepdims=True)
    x -= xp.where(xp.isfinite(peak), peak, 0)  # a row of −inf keeps −inf (not NaN) and gives exp = 0
    xp.exp(x, out=x)
    total = x.sum(axis=-1, keepdims=True)
    x /= xp.where(total > 0, total, 1) if masked_rows_to_zero else total
    return x


def softmax_backward(y, grad, axis: int = -1):
    """dx = y · (g − Σ g·y) for y = softmax(x)."""
    return y * (grad - (grad * y).sum(axis=axis, keepdims=True))


# ----- elementwise ---------------------------------------------------------------------------------------


def sigmoid(x):
    """1 / (1 + exp(−x)) without overflow: exp only ever sees −|x|."""
    xp = array_module(x)
    decay = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + decay), decay / (1.0 + decay))


def softplus(x):
    """log(1 + exp(x)) = max(x, 0) + log1p(exp(−|x|)), finite for any x."""
    xp = array_module(x)
    return xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))


def relu_with_derivative(x):
    """(relu(x), relu'(x)) = (max(x, 0), 1[x > 0])."""
    return array_module(x).maximum(x, 0), (x > 0).astype(x.dtype)


def silu_with_derivative(x):
    """(silu(x), silu'(x)) = (x·σ(x), σ(x)·(1 + x·(1 − σ(x))))."""
    sigma = sigmoid(x)
    return x * sigma, sigma * (1 + x * (1 - sigma))


def gelu_with_derivative(x):
    """Exact GELU (Hendrycks & Gimpel 2016): (x·Φ(x), Φ(x) + x·φ(x))."""
    cdf = normal_cdf(x)
    return x * cdf, cdf + x * normal_pdf(x)


def clamped_swiglu_with_derivative(gate, up, alpha: float, limit: float):
    """GPT-OSS's gated activation: (h, ∂h/∂gate, ∂h/∂up) of h = (clip(up, ±limit) + 1) · g·σ(alpha·g),
    g = min(gate, limit).

    ∂h/∂gate = (up' + 1) · (σ + alpha·g·σ·(1 − σ)) where gate ≤ limit, else 0;
    ∂h/∂up = g·σ(alpha·g) where |up| ≤ limit, else 0.
    """
    clamped_gate = gate.clip(None, limit)
    clamped_up = up.clip(-limit, limit)
    sigma = sigmoid(alpha * clamped_gate)
    glu = clamped_gate * sigma
    out = (clamped_up + 1) * glu
    gate_slope = (clamped_up + 1) * (sigma + alpha * clamped_gate * sigma * (1 - sigma)) * (gate <= limit)
    up_slope = glu * ((up >= -limit) & (up <= limit))
    return out, gate_slope.astype(gate.dtype, copy=False), up_slope.astype(up.dtype, copy=False)


def swiglu_with_derivative(gate, up):
    """(h, ∂h/∂gate, ∂h/∂up) of h = silu(gate) · up."""
    activated, slope = silu_with_derivative(gate)
    return activated * up, slope * up, activated


ACTIVATIONS_WITH_DERIVATIVE = {
    "relu": relu_with_derivative,
    "silu": silu_with_derivative,
    "gelu": gelu_with_derivative,
}


def normal_pdf(z):
    """φ(z) = exp(−z²/2) / sqrt(2π)."""
    return array_module(z).exp(-0.5 * z * z) * _INV_SQRT_2PI


def normal_cdf(z):
    """Φ(z) = (1 + erf(z / sqrt(2))) / 2."""
    return 0.5 * (1.0 + erf(z / _SQRT_2))


# ----- erf ---------------------------------------------------------------------------------------------

# erf(x) = 2/√π · x · exp(−x²) · Σ_n c_n x^(2n),  c_n = 2^n / (1·3·5···(2n+1))   (Abramowitz & Stegun 7.1.6).
# Every term is positive, so the sum has no cancellation; 38 terms reach float64 precision for |x| < 2.5.
_SERIES_TERMS = 38
_SERIES_COEFFICIENTS = [1.0]
for _n in range(1, _SERIES_TERMS):
    _SERIES_COEFFICIENTS.append(_SERIES_COEFFICIENTS[-1] * 2.0 / (2 * _n + 1))
_SERIES_LIMIT = 2.5
# erfc(x) = exp(−x²)/√π · 1/(x + (1/2)/(x + (2/2)/(x + (3/2)/(x + ...))))   (Laplace's continued fraction,
# A&S 7.1.14), evaluated bottom-up from a fixed depth; at x >= 2.5 depth 30 is exact to float64 rounding.
_FRACTION_DEPTH = 30


def _erf_numpy(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    magnitude = np.abs(x)
    near = magnitude < _SERIES_LIMIT

    x_near = x[near]
    x_near_sq = x_near * x_near
    series = np.zeros_like(x_near)
    for coefficient in reversed(_SERIES_COEFFICIENTS):  # Horner in x²
        series = series * x_near_sq + coefficient
    out[near] = (2.0 / _SQRT_PI) * x_near * np.exp(-x_near_sq) * series

    far = ~near  # also NaN, which the fraction carries through
    # 1 − erfc(6) already rounds to 1.0; clamping there keeps x² from overflowing for huge |x|.
    x_far = np.minimum(magnitude[far], 6.0)
    denominator = x_far.copy()
    for depth in range(_FRACTION_DEPTH, 0, -1):
        denominator = x_far + (depth / 2.0) / denominator
    erfc_far = np.exp(-x_far * x_far) / _SQRT_PI / denominator
    out[far] = np.copysign(1.0 - erfc_far, x[far])
    return out


def erf(values):
    """The error function of a NumPy or CuPy array (float64-accurate; the result has the input's dtype)."""
    xp = array_module(values)
    if xp is np:
        values = np.asarray(values)
        dtype = values.dtype if values.dtype.kind == "f" else np.dtype(np.float64)
        return _erf_numpy(values).astype(dtype, copy=False)
    from cupyx.scipy.special import erf as cupy_erf  # only on the CuPy path

    return cupy_erf(values)
