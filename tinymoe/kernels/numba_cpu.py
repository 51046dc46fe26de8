"""Numba CPU kernels of the dispatch primitives: loops over output rows, float32 and float64.

Same names, signatures and results as `tinymoe.kernels.reference`, which defines them. Every loop is
owner-computes: iteration i alone writes output row i, so there are no races and no atomics, and each sum
is taken in a fixed order: results are identical run to run whatever the thread count. Wrappers only make
the inputs contiguous (indices int64), allocate the output (large ones on `tinymoe.engine.workspace`'s reused
memory) and call the kernel.

Threads: each kernel is a plain compiled loop that releases the GIL (`nogil`); the wrappers split the output
rows into one range per core and run the kernel on each range from `tinymoe.kernels.cpu_threads`' pool
(small outputs: one call on the calling thread). Numba's own `parallel=True` threads are never started:
their OpenMP layer leaves them spinning after every region (libgomp's default wait policy, process-wide,
which a library must not change), taking the cores the OpenBLAS matmuls next to them need, and even on one
thread a parallel launch costs ~10 µs, which a decoding step (one token) pays per kernel. The kernels use
NumPy's error model, as `parallel=True` implies: a division by zero gives inf/NaN instead of a Python
exception check in the loop, which would keep LLVM from vectorising it (SwiGLU 3x slower).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..engine import workspace
from .cpu_threads import for_rows
from .numba_swiglu import swiglu, swiglu_backward  # noqa: F401  (this implementation's SwiGLU kernels)
from .plan import RoutingPlan


# ----- routing plan ------------------------------------------------------------------------------------
@njit(cache=True)
def _routing_plan(expert_ids, valid, n_experts, capacity):
    """Serial counting sort of the slot-major assignments q = j·T + t by expert (see plan.py); O(T·K)."""
    n_tokens, top_k = expert_ids.shape
    requested = np.zeros(n_experts, np.int64)
    for slot in range(top_k):
        for token in range(n_tokens):
            if valid[token, slot]:
                requested[expert_ids[token, slot]] += 1
    expert_offsets = np.zeros(n_experts + 1, np.int64)
    for expert in range(n_experts):
        kept = requested[expert] if capacity < 0 else min(requested[expert], capacity)
        expert_offsets[expert + 1] = expert_offsets[expert] + kept
    n_rows = expert_offsets[n_experts]
    row_token = np.empty(n_rows, np.int64)
    row_assignment = np.empty(n_rows, np.int64)
    assignment_row = np.full((n_tokens, top_k), -1, np.int64)
    filled = np.zeros(n_experts, np.int64)
    # Visiting assignments in slot-major order and appending makes the sort stable: choice rank first, then
    # token order, so capacity keeps exactly the first C rows per expert of that order.
    for slot in range(top_k):
        for token in range(n_tokens):
            if not valid[token, slot]:
                continue
            expert = expert_ids[token, slot]
            rank = filled[expert]
            filled[expert] = rank + 1
            row = expert_offsets[expert] + rank
            if row < expert_offsets[expert + 1]:
                row_token[row] = token
                row_assignment[row] = token * top_k + slot
                assignment_row[token, slot] = row
    return requested, expert_offsets, row_token, row_assignment, assignment_row


def routing_plan(expert_ids, n_experts: int, capacity=None, valid=None) -> RoutingPlan:
    """Counting-sort the (T, K) assignments by expert, stably, in slot-major order (see plan.py)."""
    expert_ids = np.ascontiguousarray(expert_ids, dtype=np.int64)
    _check_rows(expert_ids, n_experts, "expert_ids")
    n_tokens, top_k = expert_ids.shape
    valid_mask = np.ones(expert_ids.shape, bool) if valid is None else np.ascontiguousarray(valid, dtype=bool)
    requested, expert_offsets, row_token, row_assignment, assignment_row = _routing_plan(
        expert_ids, valid_mask, n_experts, -1 if capacity is None else capacity)
    return RoutingPlan(
        n_tokens=n_tokens, top_k=top_k, n_experts=n_experts, capacity=capacity,
        requested_per_expert=requested, expert_offsets=expert_offsets, expert_offsets_host=expert_offsets.copy(),
        row_token=row_token, row_assignment=row_assignment, assignment_row=assignment_row,
        n_requested=int(requested.sum()),
    )


# ----- gather and combine ------------------------------------------------------------------------------
def _check_rows(index, n_rows: int, name: str, allow_none: bool = False) -> None:
    """Numba does not bounds-check: refuse an index outside [0, n_rows) (or −1 where allowed) up front."""
    if index.size:
        low, high = int(index.min()), int(index.max())
        if low < (-1 if allow_none else 0) or high >= n_rows:
            raise IndexError(f"{name} holds {low if low < 0 else high}, outside [0, {n_rows})")


@njit(cache=True)
def _sort_by_target(index, n_rows):
    """Stable counting sort of `index`: positions i grouped by index[i], each group in increasing i.

    Returns starts (n_rows + 1,) and order (M,): the i with index[i] = n are order[starts[n]:starts[n + 1]].
    """
    starts = np.zeros(n_rows + 1, np.int64)
    for i in range(index.shape[0]):
        starts[index[i] + 1] += 1
    for row in range(n_rows):
        starts[row + 1] += starts[row]
    order = np.empty(index.shape[0], np.int64)
    filled = starts[:-1].copy()
    for i in range(index.shape[0]):  # increasing i: stable, so segment sums run in index order
        order[filled[index[i]]] = i
        filled[index[i]] += 1
    return starts, order


@njit(nogil=True, cache=True, error_model="numpy")
def _gather_rows(x, starts, order, scale, out):
    # Source-major: iteration n reads x[n] once and writes every output row that takes it (K of them in an
    # MoE dispatch), instead of reading x[n] K times from memory; each output row still has one writer.
    for source in range(x.shape[0]):
        for position in range(starts[source], starts[source + 1]):
            i = order[position]
            if scale is None:
                out[i, :] = x[source, :]
            else:
                factor = scale[i]
                for column in range(x.shape[1]):
                    out[i, column] = factor * x[source, column]


def gather_rows(x, index, scale=None):
    """out[i] = scale[i] · x[index[i]];  x (N, d), index (M,) in [0, N), scale (M,) or None → (M, d).

    scale is taken in x's dtype.
    """
    x = np.ascontiguousarray(x)
    index = np.ascontiguousarray(index, dtype=np.int64)
    _check_rows(index, x.shape[0], "index")
    if scale is not None:
        scale = np.ascontiguousarray(scale, dtype=x.dtype)
    starts, order = _sort_by_target(index, x.shape[0])
    out = workspace.empty((index.shape[0], x.shape[1]), x.dtype)
    for_rows(x.shape[0], lambda start, stop: _gather_rows(x[start:stop], starts[start:stop + 1], order, scale, out),
               out.size)
    return out


@njit(nogil=True, cache=True, error_model="numpy")
def _combine_rows(y, index, weights, out):
    zero = out.dtype.type(0)
    for token in range(index.shape[0]):
        out[token, :] = zero  # then add slot by slot: the reference's order of additions exactly
        for slot in range(index.shape[1]):
            row = index[token, slot]
            if row < 0:
                continue
            if weights is None:
                for column in range(y.shape[1]):
                    out[token, column] += y[row, column]
            else:
                weight = weights[token, slot]
                for column in range(y.shape[1]):
                    out[token, column] += weight * y[row, column]


def combine_rows(y, index, weights=None):
    """out[t] = Σ_j weights[t, j] · y[index[t, j]], skipping index −1;  y (M, d), index (T, K) → (T, d).

    weights (T, K) or None (all ones), taken in y's dtype.
    """
    y = np.ascontiguousarray(y)
    index = np.ascontiguousarray(index, dtype=np.int64)
    _check_rows(index, y.shape[0], "index", allow_none=True)
    if weights is not None:
        weights = np.ascontiguousarray(weights, dtype=y.dtype)
    out = workspace.empty((index.shape[0], y.shape[1]), y.dtype)
    for_rows(index.shape[0], lambda start, stop: _combine_rows(
        y, index[start:stop], None if weights is None else weights[start:stop], out[start:stop]), out.size)
    return out


# reassoc lets LLVM split the dot product into vector partial sums; the split is fixed when the kernel is
# compiled, so results stay identical run to run (and each dw[t, j] still has one owner).
@njit(nogil=True, cache=True, error_model="numpy", fastmath={"reassoc", "contract"})
def _combine_weights_grad(grad_out, y, index, grad_weights):
    zero = grad_weights.dtype.type(0)
    for token in range(index.shape[0]):
        for slot in range(index.shape[1]):
            row = index[token, slot]
            total = zero
            if row >= 0:
                for column in range(y.shape[1]):
                    total += grad_out[token, column] * y[row, column]
            grad_weights[token, slot] = total


def combine_weights_grad(grad_out, y, index):
    """dw[t, j] = <grad_out[t], y[index[t, j]]>, 0 where index is −1.

    grad_out (T, d), y (M, d), index (T, K) → (T, K) in y's dtype.
    """
    y = np.ascontiguousarray(y)
    grad_out = np.ascontiguousarray(grad_out, dtype=y.dtype)
    index = np.ascontiguousarray(index, dtype=np.int64)
    _check_rows(index, y.shape[0], "index", allow_none=True)
    grad_weights = np.empty(index.shape, dtype=y.dtype)
    for_rows(index.shape[0], lambda start, stop: _combine_weights_grad(
        grad_out[start:stop], y, index[start:stop], grad_weights[start:stop]), index.size * y.shape[1])
    return grad_weights


# ----- scatter-add -------------------------------------------------------------------------------------
@njit(nogil=True, cache=True, error_model="numpy")
def _sum_segments(values, starts, order, out):
    zero = out.dtype.type(0)
    for row in range(out.shape[0]):
        out[row, :] = zero
        for position in range(starts[row], starts[row + 1]):
            source = order[position]
            for column in range(values.shape[1]):
                out[row, column] += values[source, column]


def scatter_add_rows(values, index, n_rows: int):
    """out[n] = Σ_{i: index[i] = n} values[i], summed in increasing i;  values (M, d), index (M,) → (n_rows, d).

    Deterministic without atomics: sort the positions by target row, then each output row sums its own segment.
    """
    values = np.ascontiguousarray(values)
    index = np.ascontiguousarray(index, dtype=np.int64)
    _check_rows(index, n_rows, "index")
    starts, order = _sort_by_target(index, n_rows)
    out = workspace.empty((n_rows, values.shape[1]), values.dtype)
    for_rows(n_rows, lambda start, stop: _sum_segments(values, starts[start:stop + 1], order, out[start:stop]),
               out.size)
    return out
