"""The primitive ops behind Tensor's operators and methods, each forward beside its backward.

Tensor reaches them through `Tensor._ops`, which engine/__init__.py binds to this module (tensor.py cannot
import it: these ops import Function, which imports Tensor).
"""
from __future__ import annotations

from .array_math import ignore_float_errors, scatter_add
from .checks import normalize_axes, normalize_permutation
from .function import Function


def unbroadcast(grad, shape):
    """Sum `grad` over the axes that broadcasting added or stretched, so it has `shape` again."""
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(axis for axis, size in enumerate(shape) if size == 1 and grad.shape[axis] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad.reshape(shape)


def expand_reduced(grad, shape, axes):
    """Broadcast a gradient of a reduction over `axes` (keepdims or not) back to the input `shape`."""
    kept_shape = tuple(1 if axis in axes else size for axis, size in enumerate(shape))
    return grad.reshape(kept_shape)


class Add(Function):
    """out = a + b;  da = unbroadcast(g), db = unbroadcast(g)"""

    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = (a.shape, b.shape)
        return a + b

    @staticmethod
    def backward(ctx, grad):
        a_shape, b_shape = ctx.shapes
        return unbroadcast(grad, a_shape), unbroadcast(grad, b_shape)


class Sub(Function):
    """out = a - b;  da = g, db = -g (un-broadcast)"""

    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = (a.shape, b.shape)
        return a - b

    @staticmethod
    def backward(ctx, grad):
        a_shape, b_shape = ctx.shapes
        return unbroadcast(grad, a_shape), unbroadcast(-grad, b_shape)


class Mul(Function):
    """out = a * b;  da = g * b, db = g * a (un-broadcast)"""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a = unbroadcast(grad * b, a.shape) if ctx.needs_input_grad[0] else None
        grad_b = unbroadcast(grad * a, b.shape) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


class Div(Function):
    """out = a / b;  da = g / b, db = -g * a / b**2 (un-broadcast)"""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a / b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a = unbroadcast(grad / b, a.shape) if ctx.needs_input_grad[0] else None
        grad_b = unbroadcast(-grad * a / (b * b), b.shape) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


class Pow(Function):
    """out = a ** b;  da = g * b * a**(b-1), db = g * out * log(a)"""

    @staticmethod
    def forward(ctx, base, exponent):
        out = base**exponent
        ctx.save_for_backward(base, exponent, out)
        return out

    @staticmethod
    def backward(ctx, grad):
        base, exponent, out = ctx.saved_tensors
        grad_base = grad_exponent = None
        if ctx.needs_input_grad[0]:
            xp = ctx.xp
            with ignore_float_errors(xp):  # x**0 has slope 0 everywhere, also at x = 0 where 0 * 0**-1 would be NaN
                slope = xp.where(exponent == 0, 0, exponent * base ** (exponent - 1))
            grad_base = unbroadcast(grad * slope, base.shape)
        if ctx.needs_input_grad[1]:
            grad_exponent = unbroadcast(grad * out * ctx.xp.log(base), exponent.shape)
        return grad_base, grad_exponent


class Neg(Function):
    """out = -a;  da = -g"""

    @staticmethod
    def forward(ctx, a):
        return -a

    @staticmethod
    def backward(ctx, grad):
        return -grad


class MatMul(Function):
    """out = a @ b (NumPy matmul: batched, broadcast batch axes, 1-D operands promoted then squeezed).

    da = g @ b^T, db = a^T @ g over the last two axes, then un-broadcast over the batch axes.
    """

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a @ b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b[:, None] if b.ndim == 1 else b
        if b.ndim == 1:  # restore the squeezed axes, last one first (both are gone for vector @ vector)
            grad = grad[..., None]
        if a.ndim == 1:
            grad = grad[..., None, :]
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = unbroadcast(grad @ b2.swapaxes(-1, -2), a2.shape).reshape(a.shape)
        if ctx.needs_input_grad[1]:
            grad_b = unbroadcast(a2.swapaxes(-1, -2) @ grad, b2.shape).reshape(b.shape)
        return grad_a, grad_b


def _is_basic_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return all(part is None or part is Ellipsis or isinstance(part, (int, slice)) for part in parts)


class GetItem(Function):
    """out = x[index] (NumPy indexing);  dx = zeros with g added at `index` (repeated indices summed)."""

    @staticmethod
    def forward(ctx, x, index):
        ctx.index, ctx.shape, ctx.dtype = index, x.shape, x.dtype
        return x[index]

    @staticmethod
    def backward(ctx, grad):
        grad_x = ctx.xp.zeros(ctx.shape, dtype=ctx.dtype)
        if _is_basic_index(ctx.index):
            grad_x[ctx.index] = grad  # basic indexing selects each element at most once
        else:
            scatter_add(ctx.xp, grad_x, ctx.index, grad)
        return grad_x


class Sum(Function):
    """out = sum(x, axis);  dx = g broadcast back over the summed axes"""

    @staticmethod
    def forward(ctx, x, axis=None, keepdims=False):
        ctx.shape, ctx.axes = x.shape, normalize_axes(axis, x.ndim, "sum")
        return x.sum(axis=ctx.axes, keepdims=keepdims)

    @staticmethod
    def backward(ctx, grad):
        return ctx.xp.broadcast_to(expand_reduced(grad, ctx.shape, ctx.axes), ctx.shape)


class Mean(Function):
    """out = mean(x, axis);  dx = g / n broadcast back, n = number of elements averaged"""

    @staticmethod
    def forward(ctx, x, axis=None, keepdims=False):
        ctx.shape, ctx.axes = x.shape, normalize_axes(axis, x.ndim, "mean")
        count = 1
        for axis_index in ctx.axes:
            count *= x.shape[axis_index]
        if count == 0:
            raise ValueError(f"mean over axis={axis!r} of an empty input of shape {x.shape}")
        ctx.count = count
        return x.mean(axis=ctx.axes, keepdims=keepdims)

    @staticmethod
    def backward(ctx, grad):
        return ctx.xp.broadcast_to(expand_reduced(grad, ctx.shape, ctx.axes) / ctx.count, ctx.shape)


class Max(Function):
    """out = max(x, axis);  dx = g at the maxima, shared equally between tied maxima"""

    @staticmethod
    def forward(ctx, x, axis=None, keepdims=False):
        axes = normalize_axes(axis, x.ndim, "max")
        if x.size == 0:
            raise ValueError(f"max of an empty input of shape {x.shape}")
        out_kept = x.max(axis=axes, keepdims=True)
        ctx.save_for_backward(x, out_kept)
        ctx.axes = axes
        return out_kept if keepdims else out_kept.reshape([s for a, s in enumerate(x.shape) if a not in axes])

    @staticmethod
    def backward(ctx, grad):
        x, out_kept = ctx.saved_tensors
        is_max = x == out_kept
        ties = is_max.sum(axis=ctx.axes, keepdims=True)
        return is_max * (expand_reduced(grad, x.shape, ctx.axes) / ties)


class Reshape(Function):
    """out = x.reshape(shape);  dx = g.reshape(x.shape)"""

    gradient_views = True

    @staticmethod
    def forward(ctx, x, shape):
        ctx.shape = x.shape
        try:
            return x.reshape(shape)
        except ValueError:
            raise ValueError(f"reshape: cannot reshape an input of shape {x.shape} into shape {shape}") from None

    @staticmethod
    def backward(ctx, grad):
        return grad.reshape(ctx.shape)


class Transpose(Function):
    """out = x.transpose(axes) (reversed axes by default);  dx = g.transpose(inverse permutation)"""

    @staticmethod
    def forward(ctx, x, axes=None):
        axes = tuple(reversed(range(x.ndim))) if axes is None else normalize_permutation(axes, x.ndim, "transpose")
        ctx.axes = axes
        return x.transpose(axes)

    @staticmethod
    def backward(ctx, grad):
        inverse = [0] * len(ctx.axes)
        for position, axis in enumerate(ctx.axes):
            inverse[axis] = position
        return grad.transpose(inverse)


class Cast(Function):
    """out = x.astype(dtype);  dx = g.astype(x.dtype)"""

    @staticmethod
    def forward(ctx, x, dtype):
        ctx.dtype = x.dtype
        return x.astype(dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad.astype(ctx.dtype)
