"""Selecting and assembling: embedding, concatenate, stack, where, topk, one_hot."""
from __future__ import annotations

import numbers

import numpy as np

from ..engine.array_math import scatter_add, stable_argsort
from ..engine.backend import device_of, module_for_device, normalize_dtype
from ..engine.basic_ops import unbroadcast
from ..engine.checks import (as_index_array, check_index_range, describe, normalize_axis, require_bool, require_int,
                             require_same_dtype, require_tensor)
from ..engine.function import DeviceMismatchError, Function
from ..engine.tensor import Tensor


class Embedding(Function):
    """out[..., :] = weight[indices[...], :];  d_weight = scatter-add of g's rows at `indices` (repeats summed)

    indices (...) integer, weight (V, D) -> out (..., D).
    """

    fresh_gradients = True

    @staticmethod
    def forward(ctx, indices, weight):
        ctx.indices, ctx.weight_shape = indices, weight.shape
        return weight[indices]

    @staticmethod
    def backward(ctx, grad):
        grad_weight = ctx.xp.zeros(ctx.weight_shape, dtype=grad.dtype)
        rows = ctx.indices.size
        scatter_add(ctx.xp, grad_weight, ctx.indices.reshape(rows), grad.reshape(rows, ctx.weight_shape[1]))
        return grad_weight


def embedding(indices, weight: Tensor) -> Tensor:
    """Rows of `weight` (V, D) picked by integer `indices` (...) -> (..., D)."""
    require_tensor(weight, "weight", "embedding")
    if weight.ndim != 2:
        raise ValueError(f"embedding: weight must have shape (num_embeddings, dim), got shape {weight.shape}")
    indices = as_index_array(indices, "indices", "embedding", device=weight.device)
    check_index_range(indices, weight.shape[0], "indices", "embedding")
    return Embedding.apply(indices, weight)


class Concatenate(Function):
    """out = concatenate(xs, axis);  dx_i = the slice of g that x_i filled"""

    @staticmethod
    def forward(ctx, *arrays, axis):
        ctx.axis, ctx.sizes = axis, [array.shape[axis] for array in arrays]
        return ctx.xp.concatenate(arrays, axis=axis)

    @staticmethod
    def backward(ctx, grad):
        boundaries = np.cumsum(ctx.sizes)[:-1].tolist()
        return tuple(ctx.xp.split(grad, boundaries, axis=ctx.axis))


def _require_tensor_list(tensors, op: str) -> list:
    if isinstance(tensors, Tensor) or not isinstance(tensors, (list, tuple)) or not tensors:
        raise TypeError(f"{op}: tensors must be a non-empty list or tuple of Tensors, got {describe(tensors)}")
    for position, tensor in enumerate(tensors):
        require_tensor(tensor, f"tensors[{position}]", op)
        require_same_dtype(op, **{"tensors[0]": tensors[0], f"tensors[{position}]": tensor})
    return list(tensors)


def concatenate(tensors, axis: int = 0) -> Tensor:
    """Join tensors of equal shape except along `axis`."""
    tensors = _require_tensor_list(tensors, "concatenate")
    first = tensors[0]
    if first.ndim == 0:
        raise ValueError("concatenate: tensors are 0-d; there is no axis to join along (use stack)")
    axis = normalize_axis(axis, first.ndim, "concatenate")
    for position, tensor in enumerate(tensors[1:], start=1):
        others = [size for index, size in enumerate(tensor.shape) if index != axis]
        if tensor.ndim != first.ndim or others != [s for index, s in enumerate(first.shape) if index != axis]:
            raise ValueError(
                f"concatenate: tensors[{position}] has shape {tensor.shape} but tensors[0] has shape {first.shape}; "
                f"they must match except along axis={axis}"
            )
    return Concatenate.apply(*tensors, axis=axis)


class Stack(Function):
    """out = stack(xs, axis) (a new axis);  dx_i = g taken at position i of that axis"""

    @staticmethod
    def forward(ctx, *arrays, axis):
        ctx.axis = axis
        return ctx.xp.stack(arrays, axis=axis)

    @staticmethod
    def backward(ctx, grad):
        per_input = ctx.xp.moveaxis(grad, ctx.axis, 0)
        return tuple(per_input[position] for position in range(per_input.shape[0]))


def stack(tensors, axis: int = 0) -> Tensor:
    """Stack tensors of one shape along a new `axis` in [-(ndim + 1), ndim]."""
    tensors = _require_tensor_list(tensors, "stack")
    first = tensors[0]
    for position, tensor in enumerate(tensors[1:], start=1):
        if tensor.shape != first.shape:
            raise ValueError(f"stack: tensors[{position}] has shape {tensor.shape} but tensors[0] has {first.shape}")
    axis = normalize_axis(axis, first.ndim + 1, "stack")
    return Stack.apply(*tensors, axis=axis)


class Where(Function):
    """out = where(condition, a, b) (broadcast);  da = unbroadcast(g · condition), db = unbroadcast(g · ¬condition)"""

    @staticmethod
    def forward(ctx, condition, a, b):
        ctx.condition, ctx.shapes = condition, (a.shape, b.shape)
        return ctx.xp.where(condition, a, b)

    @staticmethod
    def backward(ctx, grad):
        xp, (a_shape, b_shape) = ctx.xp, ctx.shapes
        grad_a = unbroadcast(xp.where(ctx.condition, grad, 0), a_shape) if ctx.needs_input_grad[0] else None
        grad_b = unbroadcast(xp.where(ctx.condition, 0, grad), b_shape) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def _where_operand(value, like: Tensor, argument: str) -> Tensor:
    if isinstance(value, Tensor):
        return require_tensor(value, argument, "where")
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return Tensor(like.xp.asarray(float(value), dtype=like.dtype))  # a constant: no gradient
    raise TypeError(f"where: {argument} must be a Tensor or a real scalar, got {describe(value)}")


def where(condition, a, b) -> Tensor:
    """Elements of `a` where `condition` holds, else of `b`; all three broadcast together.

    condition: a bool array or a bool Tensor (e.g. `x > 0`); a, b: Tensors or real scalars (at least one Tensor).
    """
    like = a if isinstance(a, Tensor) else b
    if not isinstance(like, Tensor):
        raise TypeError(f"where: at least one of a, b must be a Tensor, got a={describe(a)} and b={describe(b)}")
    a, b = _where_operand(a, like, "a"), _where_operand(b, like, "b")
    require_same_dtype("where", a=a, b=b)
    if isinstance(condition, Tensor):
        condition = condition.data
    if hasattr(condition, "dtype") and device_of(condition) != like.device:
        raise DeviceMismatchError(f"where: condition is on {device_of(condition)!r} but the tensors on {like.device!r}")
    condition = like.xp.asarray(condition)
    if condition.dtype != np.bool_:
        raise TypeError(f"where: condition must be a bool array or bool Tensor, got {describe(condition)}")
    try:
        np.broadcast_shapes(condition.shape, a.shape, b.shape)
    except ValueError:
        raise ValueError(
            f"where: shapes do not broadcast: condition {condition.shape}, a {a.shape}, b {b.shape}"
        ) from None
    return Where.apply(condition, a, b)


class TopK(Function):
    """values, indices = the k largest (or smallest) entries along `axis`, sorted, ties to the lower index;
    dx = g placed back at `indices` (zeros elsewhere; each position is picked at most once)."""

    @staticmethod
    def forward(ctx, x, k, axis, largest):
        xp = ctx.xp
        along_last = xp.moveaxis(x, axis, -1)
        order = stable_argsort(-along_last if largest else along_last, axis=-1)[..., :k]
        values = xp.take_along_axis(along_last, order, axis=-1)
        ctx.order, ctx.axis, ctx.moved_shape = order, axis, along_last.shape
        indices = xp.ascontiguousarray(xp.moveaxis(order, -1, axis))
        return xp.ascontiguousarray(xp.moveaxis(values, -1, axis)), indices

    @staticmethod
    def backward(ctx, grad_values):
        xp, order = ctx.xp, ctx.order
        rows, k = int(np.prod(ctx.moved_shape[:-1])), order.shape[-1]
        grad_x = xp.zeros((rows, ctx.moved_shape[-1]), dtype=grad_values.dtype)
        row_ids = xp.arange(rows)[:, None]
        grad_x[row_ids, order.reshape(rows, k)] = xp.moveaxis(grad_values, ctx.axis, -1).reshape(rows, k)
        return xp.moveaxis(grad_x.reshape(ctx.moved_shape), -1, ctx.axis)


def topk(x: Tensor, k: int, axis: int = -1, largest: bool = True):
    """The k largest (largest=False: smallest) entries of `x` along `axis`, best first.

    Returns (values: Tensor, differentiable; indices: integer array of the same shape, on x's device).
    Ties go to the lower index, so the result is deterministic.
    """
    require_tensor(x, "x", "topk")
    if x.ndim == 0:
        raise ValueError("topk: x is 0-d; it needs at least one axis")
    axis = normalize_axis(axis, x.ndim, "topk")
    k = require_int(k, "k", "topk", low=1, high=x.shape[axis])
    largest = require_bool(largest, "largest", "topk")
    return TopK.apply(x, k, axis, largest)


def one_hot(indices, num_classes: int, dtype="float32") -> Tensor:
    """(..., num_classes) Tensor with 1 at each index and 0 elsewhere, on the indices' device; no gradient."""
    indices = as_index_array(indices, "indices", "one_hot")
    num_classes = require_int(num_classes, "num_classes", "one_hot", low=1)
    check_index_range(indices, num_classes, "indices", "one_hot")
    device = device_of(indices)
    dtype = normalize_dtype(dtype, device, argument="one_hot: dtype")
    xp = module_for_device(device)
    return Tensor((indices[..., None] == xp.arange(num_classes)).astype(dtype))
