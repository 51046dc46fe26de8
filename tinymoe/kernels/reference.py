"""Reference implementations of the dispatch primitives, written with the array module `xp` only.

They run on NumPy and on CuPy arrays, define what every faster implementation must compute, and are what
runs when neither Numba nor CuPy kernels are available. Inputs are assumed valid (the public wrappers in
`tinymoe.functional.dispatch` check them); index arrays are integer arrays of the data's module.
"""
from __future__ import annotations

import numpy as np

from ..engine.array_math import scatter_add, sigmoid, stable_argsort
from ..engine.backend import array_module, to_numpy
from .plan import RoutingPlan


def routing_plan(expert_ids, n_experts: int, capacity=None, valid=None) -> RoutingPlan:
    """Counting-sort the (T, K) assignments by expert, stably, in slot-major order (see plan.py).

    expert_ids (T, K) int in [0, n_experts); valid (T, K) bool or None: assignments to consider at all
    (expert-choice routing passes its selection here); capacity: rows each expert keeps, None = all.
    """
    xp = array_module(expert_ids)
    n_tokens, top_k = expert_ids.shape
    slot_major = expert_ids.T.reshape(-1).astype(xp.int64)          # q = j·T + t
    if valid is not None:
        slot_major = xp.where(valid.T.reshape(-1), slot_major, n_experts)  # invalid → sentinel expert E
    order = stable_argsort(slot_major)                  # stable: keeps choice rank, then token order
    counts = xp.bincount(slot_major, minlength=n_experts + 1)
    requested = counts[:n_experts]
    kept = requested if capacity is None else xp.minimum(requested, capacity)

    sorted_expert = slot_major[order]
    group_start = xp.concatenate([xp.zeros(1, dtype=xp.int64), xp.cumsum(counts)[:-1]])
    rank_in_expert = xp.arange(order.size, dtype=xp.int64) - group_start[sorted_expert]
    keep = sorted_expert < n_experts
    if capacity is not None:
        keep &= rank_in_expert < capacity
    kept_positions = order[keep]
    row_token = kept_positions % n_tokens
    row_assignment = row_token * top_k + kept_positions // n_tokens

    expert_offsets = xp.concatenate([xp.zeros(1, dtype=xp.int64), xp.cumsum(kept)]).astype(xp.int64)
    assignment_row = xp.full(n_tokens * top_k, -1, dtype=xp.int64)
    assignment_row[row_assignment] = xp.arange(row_assignment.size, dtype=xp.int64)
    return RoutingPlan(
        n_tokens=n_tokens, top_k=top_k, n_experts=n_experts, capacity=capacity,
        requested_per_expert=requested.astype(xp.int64), expert_offsets=expert_offsets,
        expert_offsets_host=np.asarray(to_numpy(expert_offsets), dtype=np.int64),
        row_token=row_token, row_assignment=row_assignment,
        assignment_row=assignment_row.reshape(n_tokens, top_k),
        n_requested=int(counts[:n_experts].sum()) if valid is not None else n_tokens * top_k,
    )


def gather_rows(x, index, scale=None):
    """out[i] = scale[i] · x[index[i]];  x (N, d), index (M,), scale (M,) or None → (M, d)."""
    out = x[index]
    if scale is not None:
        out *= scale[:, None]
    return out


def combine_rows(y, index, weights=None):
    """out[t] = Σ_j weights[t, j] · y[index[t, j]], skipping index −1;  y (M, d), index (T, K) → (T, d)."""
    xp = array_module(y)
    n_tokens, top_k = index.shape
    out = xp.zeros((n_tokens, y.shape[1]), dtype=y.dtype)
    if y.shape[0] == 0:
        return out
    for slot in range(top_k):
        rows = index[:, slot]
        present = rows >= 0
        picked = y[xp.where(present, rows, 0)]
        factor = present.astype(y.dtype) if weights is None else xp.where(present, weights[:, slot], 0).astype(y.dtype)
        out += xp.where(present[:, None], picked * factor[:, None], 0)
    return out


def combine_weights_grad(grad_out, y, index):
    """dw[t, j] = <grad_out[t], y[index[t, j]]>, 0 where index is −1;  → (T, K) in y's dtype."""
    xp = array_module(y)
    grad_weights = xp.zeros(index.shape, dtype=y.dtype)
    if y.shape[0] == 0:
        return grad_weights
    for slot in range(index.shape[1]):
        rows = index[:, slot]
        present = rows >= 0
        dots = (grad_out * y[xp.where(present, rows, 0)]).sum(axis=1)
        grad_weights[:, slot] = xp.where(present, dots, 0)
    return grad_weights


def scatter_add_rows(values, index, n_rows: int):
    """out[n] = Σ_{i: index[i] = n} values[i];  values (M, d), index (M,) → (n_rows, d)."""
    xp = array_module(values)
    out = xp.zeros((n_rows, values.shape[1]), dtype=values.dtype)
    scatter_add(xp, out, index, values)
    return out


def swiglu(a, b):
    """h = silu(a) · b = a · σ(a) · b."""
    return a * sigmoid(a) * b


def swiglu_backward(a, b, grad_h, out=None, h_out=None):
    """(da, db, h): da = g · b · σ(a)·(1 + a·(1 − σ(a))), db = g · a·σ(a), and h = a·σ(a)·b itself, from
    the same σ(a) (the experts' backward needs h for dw2; returning it saves a second pass).

    out: None, or (da, db) arrays of a's shape to write into (e.g. the two halves of one (n, 2ff) buffer);
    h_out: None, or an array of a's shape for h. Outputs may be the inputs themselves (every result is computed
    before any is written).
    """
    sigma = sigmoid(a)
    silu = a * sigma
    results = (grad_h * b * sigma * (1 + a * (1 - sigma)), grad_h * silu, silu * b)
    targets = (*(out if out is not None else (None, None)), h_out)
    for target, result in zip(targets, results):
        if target is not None:
            target[...] = result
    return tuple(result if target is None else target for target, result in zip(targets, results))
