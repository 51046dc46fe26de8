"""Numba CPU kernels of the dispatch primitives: parallel loops over output rows, float32 and float64.

Same names, signatures and results as `tinymoe.kernels.reference`, which defines them. Every parallel loop
is owner-computes: iteration i alone writes output row i, so there are no races and no atomics, and each
sum is taken in a fixed order: results are identical run to run whatever the thread count. Wrappers only
make the inputs contiguous (indices int64), allocate the output and call the kernel.

Threads: with Numba's OpenMP layer, idle workers spin after each parallel region by default and hold the
cores the OpenBLAS matmuls between kernel calls need; on a busy 2-core machine an MoE step then runs several
times slower. The remedy, OMP_WAIT_POLICY=PASSIVE, is process-wide (libgomp reads it once, when it loads,
and torch or any other OpenMP user shares it), so this library does not set it: programs set it themselves,
before the first parallel call (an application such as the `tinymoe` command line may).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

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


@njit(parallel=True, cache=True)
def _gather_rows(x, starts, order, scale, out):
    # Source-major: iteration n reads x[n] once and writes every output row that takes it (K of them in an
    # MoE dispatch), instead of reading x[n] K times from memory; each output row still has one writer.
    for source in prange(x.shape[0]):
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
    out = np.empty((index.shape[0], x.shape[1]), dtype=x.dtype)
    _gather_rows(x, starts, order, scale, out)
    return out


@njit(parallel=True, cache=True)
def _combine_rows(y, index, weights, out):
    zero = out.dtype.type(0)
    for token in prange(index.shape[0]):
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
    out = np.empty((index.shape[0], y.shape[1]), dtype=y.dtype)
    _combine_rows(y, index, weights, out)
    return out


# reassoc lets LLVM split the dot product into vector partial sums; the split is fixed when the kernel is
# compiled, so results stay identical run to run (and each dw[t, j] still has one owner).
@njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
def _combine_weights_grad(grad_out, y, index, grad_weights):
    zero = grad_weights.dtype.type(0)
    for token in prange(index.shape[0]):
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
    _combine_weights_grad(grad_out, y, index, grad_weights)
    return grad_weights


# ----- scatter-add -------------------------------------------------------------------------------------
@njit(parallel=True, cache=True)
def _sum_segments(values, starts, order, out):
    zero = out.dtype.type(0)
    for row in prange(out.shape[0]):
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
    out = np.empty((n_rows, values.shape[1]), dtype=values.dtype)
    _sum_segments(values, starts, order, out)
    return out


# ----- SwiGLU ------------------------------------------------------------------------------------------
# One kernel per op; only σ differs by dtype, picked when Numba compiles the kernel for a dtype (the
# overloads below), so the choice costs nothing at run time. Each row first calls `_precompute_sigmoid`,
# then reads σ of each element with `_sigmoid_at`:
#   float32: the whole row's σ is computed into the output row by the vectorisable `_sigmoid_row_float32`
#            (the output element is overwritten only after its σ was read);
#   others:  nothing is precomputed and σ comes from the libm exp, element by element, fused with the rest
#            of the arithmetic (a separate σ pass would cost float64 45% more).
@njit(inline="always")
def _sigmoid_exact(gate, one):
    decay = math.exp(-abs(gate))  # never overflows
    return one / (one + decay) if gate >= 0 else decay / (one + decay)


# float32 SwiGLU spends its time in exp(), which the scalar libm call keeps from vectorising. This sigmoid
# is branch-free arithmetic LLVM turns into SIMD code (2.5x faster on the whole kernel, same accuracy):
#   e^x for x = −|a| ≥ −87: n = round(x·log2 e), r = x − n·ln 2 (in two parts, so r is exact), |r| ≤ ln2/2;
#   e^r by its Taylor series to r⁷ (relative error < 1e-8); 2^n by writing n + 127 into the exponent bits.
_LOG2_E, _LN2_HIGH, _LN2_LOW = np.float32(1.4426950408889634), np.float32(0.693359375), np.float32(-2.12194440e-4)


def _sigmoid_row_float32(gates, sigma):
    """sigma[c] = σ(gates[c]) for one float32 row, vectorisable (see above)."""
    one, half = np.float32(1), np.float32(0.5)
    exponent_bits = np.empty(gates.shape[0], np.int32)
    for column in range(gates.shape[0]):
        x = max(-abs(gates[column]), np.float32(-87))
        n = np.floor(x * _LOG2_E + half)
        exponent_bits[column] = (np.int32(n) + np.int32(127)) << np.int32(23)
        sigma[column] = (x - n * _LN2_HIGH) - n * _LN2_LOW
    powers_of_two = exponent_bits.view(np.float32)
    for column in range(gates.shape[0]):
        r = sigma[column]
        series = np.float32(1 / 5040)
        for coefficient in (1 / 720, 1 / 120, 1 / 24, 1 / 6, 1 / 2, 1.0, 1.0):
            series = series * r + np.float32(coefficient)
        decay = series * powers_of_two[column]  # e^(−|a|) in (0, 1]
        inverse = one / (one + decay)
        sigma[column] = inverse if gates[column] >= 0 else decay * inverse


def _precompute_sigmoid(gates, sigma):
    """float32: sigma[c] = σ(gates[c]) for the row; other dtypes: nothing. Compiled code only."""
    raise NotImplementedError("runs inside Numba kernels only")


def _sigmoid_at(gates, sigma, column):
    """σ(gates[column]): read from `sigma` (float32, precomputed) or computed now. Compiled code only."""
    raise NotImplementedError("runs inside Numba kernels only")


@overload(_precompute_sigmoid, inline="always")
def _precompute_sigmoid_for_dtype(gates, sigma):
    if gates.dtype == types.float32:
        return _sigmoid_row_float32

    def nothing_to_precompute(gates, sigma):
        pass
    return nothing_to_precompute


@overload(_sigmoid_at, inline="always")
def _sigmoid_at_for_dtype(gates, sigma, column):
    if gates.dtype == types.float32:
        def precomputed(gates, sigma, column):
            return sigma[column]
        return precomputed

    def computed(gates, sigma, column):
        return _sigmoid_exact(gates[column], sigma.dtype.type(1))  # a constant of the data's dtype
    return computed


@njit(parallel=True, cache=True)
def _swiglu(a, b, h):
    for row in prange(a.shape[0]):
        gates, out = a[row], h[row]
        _precompute_sigmoid(gates, out)
        for column in range(a.shape[1]):
            out[column] = gates[column] * _sigmoid_at(gates, out, column) * b[row, column]  # (a·σ)·b, as below


@njit(parallel=True, cache=True)
def _swiglu_backward(a, b, grad_h, grad_a, grad_b, h):
    one = grad_a.dtype.type(1)
    for row in prange(a.shape[0]):
        gates, out = a[row], h[row]
        _precompute_sigmoid(gates, out)
        for column in range(a.shape[1]):
            gate, up, sigma = gates[column], b[row, column], _sigmoid_at(gates, out, column)
            silu = gate * sigma
            grad = grad_h[row, column]
            grad_b[row, column] = grad * silu
            grad_a[row, column] = grad * up * sigma * (one + gate * (one - sigma))
            out[column] = silu * up


def _as_rows(array, dtype):
    """A C-contiguous 2-D view (rows, last axis) of `array` in `dtype`, for the row-parallel loops."""
    array = np.ascontiguousarray(array, dtype=dtype)
    width = array.shape[-1] if array.ndim and array.shape[-1] else 1
    return array.reshape(array.size // width, width)


def swiglu(a, b):
    """h = silu(a) · b = a · σ(a) · b, elementwise; a, b of one shape."""
    dtype = np.result_type(a, b)
    a_rows, b_rows = _as_rows(a, dtype), _as_rows(b, dtype)
    h = np.empty(a_rows.shape, dtype)
    _swiglu(a_rows, b_rows, h)
    return h.reshape(np.shape(a))


def swiglu_backward(a, b, grad_h):
    """(da, db, h): da = g · b · σ(a)·(1 + a·(1 − σ(a))), db = g · a·σ(a), h = a·σ(a)·b, in one pass."""
    dtype = np.result_type(a, b, grad_h)
    a_rows, b_rows, grad_rows = _as_rows(a, dtype), _as_rows(b, dtype), _as_rows(grad_h, dtype)
    grad_a, grad_b, h = (np.empty(a_rows.shape, dtype) for _ in range(3))
    _swiglu_backward(a_rows, b_rows, grad_rows, grad_a, grad_b, h)
    shape = np.shape(a)
    return grad_a.reshape(shape), grad_b.reshape(shape), h.reshape(shape)
