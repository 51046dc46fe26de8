"""Elementwise activations: relu, gelu (exact and tanh), silu, sigmoid, softplus, tanh, exp, log.

Each is a Function whose backward is dx = g · f'(x), with f' written out in its docstring. The raw formulas
(a stable sigmoid, the float64-accurate erf NumPy lacks, and relu/silu/exact gelu as (f, f') pairs, shared
with the experts) live in tinymoe.engine.array_math; relu, silu and exact gelu keep f'(x) from forward.
"""
from __future__ import annotations

import math

from ..engine import array_math
from ..engine.checks import require_tensor
from ..engine.function import Function
from ..engine.tensor import Tensor

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_CUBIC = 0.044715

# ----- ops ---------------------------------------------------------------------------------------------


class ReLU(Function):
    """y = max(x, 0);  dx = g · [x > 0]  (0 at x = 0, like torch)"""

    @staticmethod
    def forward(ctx, x):
        y, slope = array_math.relu_with_derivative(x)
        ctx.save_for_backward(slope)
        return y

    @staticmethod
    def backward(ctx, grad):
        (slope,) = ctx.saved_tensors
        return grad * slope


class GELU(Function):
    """exact: y = x·Φ(x), Φ(x) = (1 + erf(x/√2))/2;  dx = g·(Φ(x) + x·φ(x)), φ(x) = exp(−x²/2)/√(2π)

    tanh:  y = x·(1 + t)/2, t = tanh(u), u = √(2/π)·(x + 0.044715·x³);
           dx = g·((1 + t)/2 + x·(1 − t²)·√(2/π)·(1 + 3·0.044715·x²)/2)
    """

    @staticmethod
    def forward(ctx, x, approximate):
        ctx.approximate = approximate
        if approximate == "tanh":
            ctx.save_for_backward(x)
            return 0.5 * x * (1.0 + ctx.xp.tanh(_SQRT_2_OVER_PI * (x + _GELU_TANH_CUBIC * x**3)))
        y, slope = array_math.gelu_with_derivative(x)
        ctx.save_for_backward(slope)
        return y

    @staticmethod
    def backward(ctx, grad):
        if ctx.approximate != "tanh":
            (slope,) = ctx.saved_tensors
            return grad * slope
        (x,) = ctx.saved_tensors
        t = ctx.xp.tanh(_SQRT_2_OVER_PI * (x + _GELU_TANH_CUBIC * x**3))
        du_dx = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_CUBIC * x * x)
        return grad * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du_dx)


class SiLU(Function):
    """y = x·σ(x);  dx = g·σ(x)·(1 + x·(1 − σ(x)))"""

    @staticmethod
    def forward(ctx, x):
        y, slope = array_math.silu_with_derivative(x)
        ctx.save_for_backward(slope)
        return y

    @staticmethod
    def backward(ctx, grad):
        (slope,) = ctx.saved_tensors
        return grad * slope


class Sigmoid(Function):
    """y = 1/(1 + exp(−x));  dx = g·y·(1 − y)"""

    @staticmethod
    def forward(ctx, x):
        y = array_math.sigmoid(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * y * (1.0 - y)


class Softplus(Function):
    """y = log(1 + exp(x)) = max(x, 0) + log1p(exp(−|x|)) (no overflow at any x);  dx = g·σ(x)"""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return array_math.softplus(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * array_math.sigmoid(x)


class Tanh(Function):
    """y = tanh(x);  dx = g·(1 − y²)"""

    @staticmethod
    def forward(ctx, x):
        y = ctx.xp.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1.0 - y * y)


class Exp(Function):
    """y = exp(x);  dx = g·y"""

    @staticmethod
    def forward(ctx, x):
        y = ctx.xp.exp(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * y


class Log(Function):
    """y = log(x) (NaN for x < 0, −inf at 0, as NumPy);  dx = g / x"""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return ctx.xp.log(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad / x


# ----- public wrappers ---------------------------------------------------------------------------------


def relu(x: Tensor) -> Tensor:
    """max(x, 0), elementwise."""
    return ReLU.apply(require_tensor(x, "x", "relu"))


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """x·Φ(x) (approximate="none", exact via erf) or its tanh approximation (approximate="tanh")."""
    require_tensor(x, "x", "gelu")
    if not isinstance(approximate, str) or approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate={approximate!r} must be 'none' or 'tanh'")
    return GELU.apply(x, approximate)


def silu(x: Tensor) -> Tensor:
    """x·sigmoid(x) (also called swish), elementwise."""
    return SiLU.apply(require_tensor(x, "x", "silu"))


def sigmoid(x: Tensor) -> Tensor:
    """1 / (1 + exp(−x)), elementwise, without overflow for large |x|."""
    return Sigmoid.apply(require_tensor(x, "x", "sigmoid"))


def softplus(x: Tensor) -> Tensor:
    """log(1 + exp(x)), elementwise; finite and exact for large |x| (softplus(1000) = 1000)."""
    return Softplus.apply(require_tensor(x, "x", "softplus"))


def tanh(x: Tensor) -> Tensor:
    """Hyperbolic tangent, elementwise."""
    return Tanh.apply(require_tensor(x, "x", "tanh"))


def exp(x: Tensor) -> Tensor:
    """e**x, elementwise."""
    return Exp.apply(require_tensor(x, "x", "exp"))


def log(x: Tensor) -> Tensor:
    """Natural log, elementwise (NaN for negative entries, −inf at 0, as NumPy)."""
    return Log.apply(require_tensor(x, "x", "log"))
