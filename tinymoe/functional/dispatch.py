"""Dispatch primitives of an MoE layer: route rows to experts and combine them back.

    gather_rows(x, index)           out[i] = x[index[i]]                      x (N, d), index (M,)
    combine_rows(y, index, w)       out[t] = Σ_j w[t, j] · y[index[t, j]]     y (M, d), index (T, K), −1 = none
    routing_plan(expert_ids, E)     the stable expert-sorted order of (T, K) choices and its inverse

Each runs on the kernel implementation chosen in `tinymoe.kernels` (NumPy reference, Numba, CuPy).
When the index comes from a routing plan, pass its inverse: then both backwards are gathers in which every
output row has one owner (no scatter, no atomics, deterministic).
"""
from __future__ import annotations

from ..engine.backend import array_module
from ..engine.checks import as_index_array, check_index_range, require_int, require_tensor
from ..engine.function import Function
from ..kernels.registry import kernel


class GatherRows(Function):
    """out[i] = x[index[i]].

    Backward: dx[n] = Σ_{i: index[i] = n} g[i]. With `inverse` (N, K) listing for each n the rows i that
    read it (−1 = none), that is the gather dx[n] = Σ_j g[inverse[n, j]]; else a deterministic scatter-add.
    """

    @staticmethod
    def forward(ctx, x, index, inverse=None):
        ctx.index, ctx.inverse, ctx.n_rows = index, inverse, x.shape[0]
        return kernel("gather_rows", x)(x, index)

    @staticmethod
    def backward(ctx, grad):
        if ctx.inverse is not None:
            return kernel("combine_rows", grad)(grad, ctx.inverse, None)
        return kernel("scatter_add_rows", grad)(grad, ctx.index, ctx.n_rows)


class CombineRows(Function):
    """out[t] = Σ_j w[t, j] · y[index[t, j]] (index −1 contributes nothing).

    Backward: dw[t, j] = <g[t], y[index[t, j]]>;  dy[r] = w[a] · g[t(a)] for the assignment a = t·K + j
    that reads row r (`inverse[r]`, −1 = unread): a gather. Without `inverse`, dy is a scatter-add.
    """

    @staticmethod
    def forward(ctx, y, weights, index, inverse=None):
        ctx.has_weights = weights is not None
        weights = None if weights is None else weights.astype(y.dtype, copy=False)
        ctx.save_for_backward(y, weights)
        ctx.index, ctx.inverse = index, inverse
        return kernel("combine_rows", y)(y, index, weights)

    @staticmethod
    def backward(ctx, grad):
        y, weights = ctx.saved_tensors
        xp, index, inverse = ctx.xp, ctx.index, ctx.inverse
        top_k = index.shape[1]
        grad_y = grad_weights = None
        if ctx.needs_input_grad[0]:
            flat_weights = None if weights is None else weights.reshape(-1)
            if inverse is not None:
                read = inverse >= 0
                owner = xp.where(read, inverse, 0)
                scale = None if weights is None else flat_weights[owner]
                grad_y = kernel("gather_rows", grad)(grad, owner // top_k, scale)
                grad_y[~read] = 0  # rows no assignment reads get no gradient (not 0 · g, which is NaN for inf g)
            else:
                flat = index.reshape(-1)
                present = xp.nonzero(flat >= 0)[0]
                scale = None if weights is None else flat_weights[present]
                per_assignment = kernel("gather_rows", grad)(grad, present // top_k, scale)
                grad_y = kernel("scatter_add_rows", grad)(per_assignment, flat[present], y.shape[0])
        if ctx.has_weights and ctx.needs_input_grad[-1]:
            grad_weights = kernel("combine_weights_grad", grad)(grad, y, index)
        return (grad_y, grad_weights) if ctx.has_weights else grad_y


def _index(values, argument, op, like, ndim):
    index = as_index_array(values, argument, op, device=like.device)
    if index.ndim != ndim:
        raise ValueError(f"{op}: {argument} must have {ndim} dimension(s), got shape {tuple(index.shape)}")
    return index


def gather_rows(x, index, inverse=None):
    """Rows of `x` picked by `index`: out[i] = x[index[i]]. x Tensor (N, d); index int array (M,).

    inverse: optional (N, K) int array, for each row n of x the positions i with index[i] = n (−1 pads);
    a routing plan's `assignment_row`. Makes the backward a gather instead of a scatter-add.
    """
    op = "gather_rows"
    require_tensor(x, "x", op, ndim=2)
    index = _index(index, "index", op, x, 1)
    check_index_range(index, x.shape[0], "index", op)
    if inverse is not None:
        inverse = _index(inverse, "inverse", op, x, 2)
        if inverse.shape[0] != x.shape[0]:
            raise ValueError(f"{op}: inverse must have one row per row of x ({x.shape[0]}), got shape {inverse.shape}")
        check_index_range(inverse, index.shape[0], "inverse", op, ignore_index=-1)
    return GatherRows.apply(x, index, inverse)


def combine_rows(y, index, weights=None, inverse=None):
    """Weighted sums of rows of `y`: out[t] = Σ_j weights[t, j] · y[index[t, j]], skipping index −1.

    y Tensor (M, d); index int array (T, K); weights Tensor (T, K) or None (all ones).
    inverse: optional (M,) int array, for each row r of y the flat position t·K + j that reads it (−1 = none);
    a routing plan's `row_assignment`. Makes the backward to y a gather instead of a scatter-add.
    """
    op = "combine_rows"
    require_tensor(y, "y", op, ndim=2)
    index = _index(index, "index", op, y, 2)
    check_index_range(index, y.shape[0], "index", op, ignore_index=-1)
    if weights is not None:
        require_tensor(weights, "weights", op, ndim=2)
        if weights.shape != tuple(index.shape):
            raise ValueError(f"{op}: weights has shape {weights.shape} but index has shape {tuple(index.shape)}")
    if inverse is not None:
        inverse = _index(inverse, "inverse", op, y, 1)
        if inverse.shape[0] != y.shape[0]:
            raise ValueError(f"{op}: inverse must have one entry per row of y ({y.shape[0]}), got {inverse.shape[0]}")
        check_index_range(inverse, index.size, "inverse", op, ignore_index=-1)
    return CombineRows.apply(y, weights, index, inverse)


def routing_plan(expert_ids, n_experts, capacity=None, valid=None):
    """The RoutingPlan of (T, K) expert choices: stable expert-sorted order, offsets, inverse, capacity.

    expert_ids: int array (T, K) on the data's device; capacity: rows kept per expert (None = dropless);
    valid: optional bool (T, K) of the assignments to consider. See `tinymoe.kernels.plan`.
    """
    op = "routing_plan"
    n_experts = require_int(n_experts, "n_experts", op, low=1)
    expert_ids = as_index_array(expert_ids, "expert_ids", op)
    if expert_ids.ndim != 2:
        raise ValueError(f"{op}: expert_ids must be a 2-D array (T, K), got shape {tuple(expert_ids.shape)}")
    check_index_range(expert_ids, n_experts, "expert_ids", op)
    if capacity is not None:
        capacity = require_int(capacity, "capacity", op, low=0)
    if valid is not None:
        valid = array_module(expert_ids).asarray(valid)
        if valid.shape != expert_ids.shape or valid.dtype != bool:
            raise ValueError(f"{op}: valid must be a bool array of shape {tuple(expert_ids.shape)}, "
                             f"got {valid.dtype.name} {tuple(valid.shape)}")
    return kernel("routing_plan", expert_ids)(expert_ids, n_experts, capacity, valid)
