"""Dispatch primitives of an MoE layer: route rows to experts and combine them back.

    gather_rows(x, index)           out[i] = x[index[i]]                      x (N, d), index (M,)
    combine_rows(y, index, w)       out[t] = Σ_j w[t, j] · y[index[t, j]]     y (M, d), index (T, K), −1 = none
    routing_plan(expert_ids, E)     the stable expert-sorted order of (T, K) choices and its inverse

Each runs on the kernel implementation chosen in `tinymoe.kernels` (NumPy reference, Numba, CuPy), looked up
once in forward and kept on `ctx` for backward. When the index comes from a routing plan, pass its inverse
(`token_rows=plan.assignment_row` to gather, `row_assignment=plan.row_assignment` to combine): then both
backwards are gathers in which every output row has one owner (no scatter, no atomics, deterministic).

The public functions check their arguments, including that an inverse really inverts its index (a wrong one
would give silently wrong gradients). The `*_unchecked` entries take the same arguments and check nothing:
inputs trusted, they come from a RoutingPlan (the MoE layer's hot path calls them).
"""
from __future__ import annotations

from ..engine.backend import array_module
from ..engine.checks import as_index_array, check_index_range, require_int, require_same_dtype, require_tensor
from ..engine.function import Function
from ..kernels.registry import implementation


class GatherRows(Function):
    """out[i] = x[index[i]].

    Backward: dx[n] = Σ_{i: index[i] = n} g[i]. With `token_rows` (N, K) listing for each n the positions i
    that read it (−1 = none), that is the gather dx[n] = Σ_j g[token_rows[n, j]]; else a deterministic
    scatter-add.
    """

    @staticmethod
    def forward(ctx, x, index, token_rows=None):
        ctx.kernels = implementation(x)
        ctx.index, ctx.token_rows, ctx.n_rows = index, token_rows, x.shape[0]
        return ctx.kernels.gather_rows(x, index)

    @staticmethod
    def backward(ctx, grad):
        if ctx.token_rows is not None:
            return ctx.kernels.combine_rows(grad, ctx.token_rows, None)
        return ctx.kernels.scatter_add_rows(grad, ctx.index, ctx.n_rows)


class CombineRows(Function):
    """out[t] = Σ_j w[t, j] · y[index[t, j]] (index −1 contributes nothing).

    Backward: dw[t, j] = <g[t], y[index[t, j]]>;  dy[r] = w[a] · g[t(a)] for the assignment a = t·K + j
    that reads row r (`row_assignment[r]`, −1 = unread): a gather. Without it, dy is a scatter-add.
    Weights are taken in y's dtype: the MoE layer combines its router's float32 weights into float16 rows
    this way (the engine casts dw back to the weights' dtype). The public `combine_rows` refuses the mix.
    """

    @staticmethod
    def forward(ctx, y, weights, index, row_assignment=None):
        ctx.kernels = implementation(y)
        ctx.has_weights = weights is not None
        weights = None if weights is None else weights.astype(y.dtype, copy=False)
        ctx.save_for_backward(y, weights)
        ctx.index, ctx.row_assignment = index, row_assignment
        return ctx.kernels.combine_rows(y, index, weights)

    @staticmethod
    def backward(ctx, grad):
        y, weights = ctx.saved_tensors
        xp, kernels, index, row_assignment = ctx.xp, ctx.kernels, ctx.index, ctx.row_assignment
        top_k = index.shape[1]
        grad_y = grad_weights = None
        if ctx.needs_input_grad[0]:
            flat_weights = None if weights is None else weights.reshape(-1)
            if row_assignment is not None:
                read = row_assignment >= 0
                owner = xp.where(read, row_assignment, 0)
                scale = None if weights is None else flat_weights[owner]
                grad_y = kernels.gather_rows(grad, owner // top_k, scale)
                grad_y[~read] = 0  # rows no assignment reads get no gradient (not 0 · g, which is NaN for inf g)
            else:
                flat = index.reshape(-1)
                present = xp.nonzero(flat >= 0)[0]
                scale = None if weights is None else flat_weights[present]
                per_assignment = kernels.gather_rows(grad, present // top_k, scale)
                grad_y = kernels.scatter_add_rows(per_assignment, flat[present], y.shape[0])
        if ctx.has_weights and ctx.needs_input_grad[-1]:
            grad_weights = kernels.combine_weights_grad(grad, y, index)
        return (grad_y, grad_weights) if ctx.has_weights else grad_y


# ----- unchecked entries: inputs trusted, they come from a RoutingPlan ------------------------------------
def gather_rows_unchecked(x, index, *, token_rows=None):
    """`gather_rows` without any check. Inputs trusted: they come from a RoutingPlan
    (index = plan.row_token, token_rows = plan.assignment_row)."""
    return GatherRows.apply(x, index, token_rows)


def combine_rows_unchecked(y, index, weights=None, *, row_assignment=None):
    """`combine_rows` without any check. Inputs trusted: they come from a RoutingPlan (index =
    plan.assignment_row, row_assignment = plan.row_assignment). Unlike `combine_rows`, weights of another
    float dtype are accepted and cast to y's (float32 router weights into float16 expert rows)."""
    return CombineRows.apply(y, weights, index, row_assignment)


def routing_plan_unchecked(expert_ids, n_experts, capacity=None, valid=None):
    """`routing_plan` without any check. Inputs trusted: they come from a router (ids in range, int array)."""
    return implementation(expert_ids).routing_plan(expert_ids, n_experts, capacity, valid)


# ----- validated public functions ---------------------------------------------------------------------------
def _index(values, argument, op, like, ndim):
    index = as_index_array(values, argument, op, device=like.device)
    if index.ndim != ndim:
        raise ValueError(f"{op}: {argument} must have {ndim} dimension(s), got shape {tuple(index.shape)}")
    return index


def _check_token_rows(token_rows, index, op):
    """Every position i of `index` appears exactly once in `token_rows`, and in row index[i]."""
    xp = array_module(index)
    listed = token_rows >= 0
    positions, rows = token_rows[listed], xp.nonzero(listed)[0]
    wrong_row = positions[index[positions] != rows]
    if wrong_row.size:
        i = int(wrong_row[0])
        raise ValueError(f"{op}: token_rows does not invert index: it lists position {i} under another row "
                         f"than index[{i}] = {int(index[i])}")
    times_listed = xp.bincount(positions, minlength=index.shape[0])
    if index.shape[0] and not bool((times_listed == 1).all()):
        i = int(xp.nonzero(times_listed != 1)[0][0])
        raise ValueError(f"{op}: token_rows does not invert index: position {i} is listed "
                         f"{int(times_listed[i])} times; every position of index must appear exactly once")


def _check_row_assignment(row_assignment, index, op):
    """row_assignment[r] = a (≠ −1) has index.flat[a] = r, and every entry a of index reading r has
    row_assignment[r] = a (so no row of y is read twice)."""
    xp = array_module(index)
    flat = index.reshape(-1)
    owned = xp.nonzero(row_assignment >= 0)[0]
    wrong = owned[flat[row_assignment[owned]] != owned]
    if wrong.size:
        r = int(wrong[0])
        a = int(row_assignment[r])
        raise ValueError(f"{op}: row_assignment does not invert index: row_assignment[{r}] = {a} but "
                         f"index.flat[{a}] = {int(flat[a])}")
    present = xp.nonzero(flat >= 0)[0]
    uncovered = present[row_assignment[flat[present]] != present]
    if uncovered.size:
        a = int(uncovered[0])
        raise ValueError(f"{op}: row_assignment does not invert index: index.flat[{a}] = {int(flat[a])} but "
                         f"row_assignment[{int(flat[a])}] = {int(row_assignment[flat[a]])} (with row_assignment, "
                         "each row of y must be read by at most one entry of index)")


def gather_rows(x, index, *, token_rows=None):
    """Rows of `x` picked by `index`: out[i] = x[index[i]]. x Tensor (N, d); index int array (M,) → (M, d).

    token_rows: optional (N, K) int array listing for each row n of x the positions i with index[i] = n
    (−1 pads); a routing plan's `assignment_row`. Makes the backward a gather instead of a scatter-add.
    """
    op = "gather_rows"
    require_tensor(x, "x", op, ndim=2)
    index = _index(index, "index", op, x, 1)
    check_index_range(index, x.shape[0], "index", op)
    if token_rows is not None:
        token_rows = _index(token_rows, "token_rows", op, x, 2)
        if token_rows.shape[0] != x.shape[0]:
            raise ValueError(f"{op}: token_rows must have one row per row of x ({x.shape[0]}), "
                             f"got shape {tuple(token_rows.shape)}")
        check_index_range(token_rows, index.shape[0], "token_rows", op, ignore_index=-1)
        _check_token_rows(token_rows, index, op)
    return gather_rows_unchecked(x, index, token_rows=token_rows)


def combine_rows(y, index, weights=None, *, row_assignment=None):
    """Weighted sums of rows of `y`: out[t] = Σ_j weights[t, j] · y[index[t, j]], skipping index −1.

    y Tensor (M, d); index int array (T, K); weights Tensor (T, K) of y's dtype, or None (all ones) → (T, d).
    row_assignment: optional (M,) int array, for each row r of y the flat position t·K + j that reads it
    (−1 = none); a routing plan's `row_assignment`. Makes the backward to y a gather instead of a scatter-add.
    """
    op = "combine_rows"
    require_tensor(y, "y", op, ndim=2)
    index = _index(index, "index", op, y, 2)
    check_index_range(index, y.shape[0], "index", op, ignore_index=-1)
    if weights is not None:
        require_tensor(weights, "weights", op, ndim=2)
        require_same_dtype(op, y=y, weights=weights)
        if weights.shape != tuple(index.shape):
            raise ValueError(f"{op}: weights has shape {weights.shape} but index has shape {tuple(index.shape)}")
    if row_assignment is not None:
        row_assignment = _index(row_assignment, "row_assignment", op, y, 1)
        if row_assignment.shape[0] != y.shape[0]:
            raise ValueError(f"{op}: row_assignment must have one entry per row of y ({y.shape[0]}), "
                             f"got {row_assignment.shape[0]}")
        check_index_range(row_assignment, index.size, "row_assignment", op, ignore_index=-1)
        _check_row_assignment(row_assignment, index, op)
    return combine_rows_unchecked(y, index, weights, row_assignment=row_assignment)


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
    return routing_plan_unchecked(expert_ids, n_experts, capacity, valid)
