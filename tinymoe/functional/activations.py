"""Elementwise activations: relu, gelu (exact and tanh), silu, sigmoid, softplus, tanh, exp, log.

Each is a Function whose backward is dx = g · f'(x), with f' written out in its docstring. Two small shapes
serve all but gelu: `_SlopeFromForward` (relu, silu: forward keeps f'(x) from an (f, f') pair) and
`_Elementwise` (sigmoid, softplus, tanh, exp, log: f and a one-line vector-Jacobian product of the saved
output or input). The raw formulas (a stable sigmoid, the float64-accurate erf NumPy lacks, and relu/silu/exact
gelu as (f, f') pairs, shared with the experts) live in tinymoe.engine.array_math; exact gelu keeps f'(x) too.
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


class _SlopeFromForward(Function):
    """An activation whose (f, f') pair is one array_math function (`f_with_derivative`, set by the subclass):
    forward: y, s = f_with_derivative(x), keeping the slope s = f'(x);  backward: dx = g · s."""

    f_with_derivative = None  # x -> (f(x), f'(x)), e.g. array_math.relu_with_derivative

    @classmethod
    def forward(cls, ctx, x):
        y, slope = cls.f_with_derivative(x)
        ctx.save_for_backward(slope)
        return y

    @staticmethod
    def backward(ctx, grad):
        (slope,) = ctx.saved_tensors
        return grad * slope


class ReLU(_SlopeFromForward):
    """y = max(x, 0);  dx = g · [x > 0]  (0 at x = 0, like torch)"""

    f_with_derivative = staticmethod(array_math.relu_with_derivative)


class SiLU(_SlopeFromForward):
    """y = x·σ(x);  dx = g·σ(x)·(1 + x·(1 − σ(x)))"""

    f_with_derivative = staticmethod(array_math.silu_with_derivative)


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


class _Elementwise(Function):
    """An activation y = f(x) whose backward is a one-line vector-Jacobian product of one saved array: the
    subclass sets `f(xp, x)` and either `vjp_from_output(g, y)` (forward keeps y) or `vjp_from_input(g, x)`
    (forward keeps x). Only that one array is kept, so an op never holds its input alive without need."""

    vjp_from_output = None
    vjp_from_input = None

    @classmethod
    def forward(cls, ctx, x):
        y = cls.f(ctx.xp, x)
        ctx.save_for_backward(y if cls.vjp_from_output is not None else x)
        return y

    @classmethod
    def backward(cls, ctx, grad):
        (saved,) = ctx.saved_tensors
        vjp = cls.vjp_from_output if cls.vjp_from_output is not None else cls.vjp_from_input
        return vjp(grad, saved)


class Sigmoid(_Elementwise):
    """y = 1/(1 + exp(−x));  dx = g·y·(1 − y)"""

    f = staticmethod(lambda xp, x: array_math.sigmoid(x))
    vjp_from_output = staticmethod(lambda grad, y: grad * y * (1.0 - y))


class Softplus(_Elementwise):
    """y = log(1 + exp(x)) = max(x, 0) + log1p(exp(−|x|)) (no overflow at any x);  dx = g·σ(x)"""

    f = staticmethod(lambda xp, x: array_math.softplus(x))
    vjp_from_input = staticmethod(lambda grad, x: grad * array_math.sigmoid(x))


class Tanh(_Elementwise):
    """y = tanh(x);  dx = g·(1 − y²)"""

    f = staticmethod(lambda xp, x: xp.tanh(x))
    vjp_from_output = staticmethod(lambda grad, y: grad * (1.0 - y * y))


class Exp(_Elementwise):
    """y = exp(x);  dx = g·y"""

    f = staticmethod(lambda xp, x: xp.exp(x))
    vjp_from_output = staticmethod(lambda grad, y: grad * y)


class Log(_Elementwise):
    """y = log(x) (NaN for x < 0, −inf at 0, as NumPy);  dx = g / x"""

    f = staticmethod(lambda xp, x: xp.log(x))
    vjp_from_input = staticmethod(lambda grad, x: grad / x)


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
