"""Numba CPU kernels of the fused SwiGLU, h = silu(a) · b, and its backward, for the expert blocks.

Part of the "numba" implementation (`tinymoe.kernels.numba_cpu` re-exports `swiglu` and `swiglu_backward`);
same results as `tinymoe.kernels.reference`. Owner-computes loops over rows: no races, fixed order. The
kernels release the GIL; the wrappers run one range of rows per core on `tinymoe.kernels.cpu_threads`' pool
(why not Numba's parallel threads: `tinymoe.kernels.numba_cpu`); small outputs and calls from a pool worker
(an expert block) run inline on the calling thread.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.extending import overload

from ..engine import workspace
from .cpu_threads import for_rows


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


def _sigmoid_row_float32(gates, sigma, scratch):
    """sigma[c] = σ(gates[c]) for one float32 row, vectorisable (see above); scratch: int32 of the row's width
    for the exponent bits (allocated once per kernel call, not per row: 15% of the kernel)."""
    exponent_bits = scratch
    one, half = np.float32(1), np.float32(0.5)
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


def _precompute_sigmoid(gates, sigma, scratch):
    """float32: sigma[c] = σ(gates[c]) for the row (scratch: int32, the row's width); other dtypes: nothing.
    Compiled code only."""
    raise NotImplementedError("runs inside Numba kernels only")


def _sigmoid_at(gates, sigma, column):
    """σ(gates[column]): read from `sigma` (float32, precomputed) or computed now. Compiled code only."""
    raise NotImplementedError("runs inside Numba kernels only")


@overload(_precompute_sigmoid, inline="always")
def _precompute_sigmoid_for_dtype(gates, sigma, scratch):
    if gates.dtype == types.float32:
        return _sigmoid_row_float32

    def nothing_to_precompute(gates, sigma, scratch):
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


# Operands are often the halves [a | b] of one (n, 2ff) buffer (the experts' fused gate/up product); strided
# 2-D views compile to code that cannot assume unit steps (~4x slower), so each 2-D operand travels as a flat
# contiguous view of its memory and its row step: row r = flat[r·step : r·step + width], a slice that vectorises.
@njit(inline="always")
def _row(flat, step, row, width):
    return flat[row * step:row * step + width]


@njit(nogil=True, cache=True, error_model="numpy")
def _swiglu(a, a_step, b, b_step, h, h_step, n_rows, width):
    scratch = np.empty(width, np.int32)
    for row in range(n_rows):
        gates, ups, out = _row(a, a_step, row, width), _row(b, b_step, row, width), _row(h, h_step, row, width)
        _precompute_sigmoid(gates, out, scratch)
        for column in range(width):
            out[column] = gates[column] * _sigmoid_at(gates, out, column) * ups[column]  # (a·σ)·b, as below


@njit(nogil=True, cache=True, error_model="numpy")
def _swiglu_backward(a, a_step, b, b_step, g, g_step, grad_a, da_step, grad_b, db_step, h, h_step, n_rows, width):
    one = grad_a.dtype.type(1)
    scratch = np.empty(width, np.int32)
    for row in range(n_rows):
        gates, ups, out = _row(a, a_step, row, width), _row(b, b_step, row, width), _row(h, h_step, row, width)
        grads, grad_gates, grad_ups = (_row(g, g_step, row, width), _row(grad_a, da_step, row, width),
                                       _row(grad_b, db_step, row, width))
        _precompute_sigmoid(gates, out, scratch)
        for column in range(width):
            gate, up, sigma = gates[column], ups[column], _sigmoid_at(gates, out, column)
            silu = gate * sigma
            grad_ups[column] = grads[column] * silu
            grad_gates[column] = grads[column] * up * sigma * (one + gate * (one - sigma))
            out[column] = silu * up


def _as_rows(array, dtype):
    """`array` as 2-D rows in `dtype`: kept as a view when 2-D with each row contiguous and rows apart."""
    array = np.asarray(array)
    if array.ndim == 2 and array.dtype == dtype:
        (n_rows, width), (row_stride, column_stride), size = array.shape, array.strides, array.itemsize
        if array.size == 0 or ((width <= 1 or column_stride == size)
                               and (n_rows <= 1 or (row_stride % size == 0 and row_stride >= width * size))):
            return array
    array = np.ascontiguousarray(array, dtype=dtype)
    width = array.shape[-1] if array.ndim and array.shape[-1] else 1
    return array.reshape(array.size // width, width)


def _flat(rows):
    """(flat, step) of rows from `_as_rows` (see above)."""
    n_rows, width = rows.shape
    if rows.flags.c_contiguous:
        return rows.reshape(-1), width  # a view, without as_strided's cost (~2 µs, paid per call when decoding)
    step = rows.strides[0] // rows.itemsize if n_rows > 1 else width
    length = (n_rows - 1) * step + width if n_rows else 0
    return np.lib.stride_tricks.as_strided(rows, shape=(length,), strides=(rows.itemsize,)), step


def swiglu(a, b):
    """h = silu(a) · b = a · σ(a) · b, elementwise; a, b of one shape (2-D row views are read in place)."""
    dtype = np.result_type(a, b)
    a_rows, b_rows = _as_rows(a, dtype), _as_rows(b, dtype)
    h = workspace.empty(a_rows.shape, dtype)
    if h.size:
        for_rows(h.shape[0], lambda start, stop: _swiglu(
            *_flat(a_rows[start:stop]), *_flat(b_rows[start:stop]), *_flat(h[start:stop]), stop - start, h.shape[1]),
            h.size)
    return h.reshape(np.shape(a))


def swiglu_backward(a, b, grad_h, out=None):
    """(da, db, h): da = g · b · σ(a)·(1 + a·(1 − σ(a))), db = g · a·σ(a), h = a·σ(a)·b, in one pass.

    out: None or (da, db) to write into and return: 2-D NumPy arrays of a's shape and the result dtype, each
    row contiguous (e.g. the two halves of one (n, 2ff) buffer).
    """
    dtype = np.result_type(a, b, grad_h)
    a_rows, b_rows, grad_rows = _as_rows(a, dtype), _as_rows(b, dtype), _as_rows(grad_h, dtype)
    grad_a, grad_b = (workspace.empty(a_rows.shape, dtype) for _ in range(2)) if out is None else out
    for name, array in () if out is None else (("da", grad_a), ("db", grad_b)):
        if not isinstance(array, np.ndarray) or array.shape != np.shape(a) or _as_rows(array, dtype) is not array:
            raise ValueError(f"swiglu_backward: out {name} must be a 2-D {dtype} NumPy array of shape {np.shape(a)} "
                             f"with contiguous rows, got {getattr(array, 'shape', array)} {getattr(array, 'dtype', '')}")
    h = workspace.empty(a_rows.shape, dtype)
    if h.size:
        def rows(start, stop):
            _swiglu_backward(*(piece for array in (a_rows, b_rows, grad_rows, grad_a, grad_b, h)
                               for piece in _flat(array[start:stop])), stop - start, h.shape[1])
        for_rows(h.shape[0], rows, h.size)
    return grad_a.reshape(np.shape(a)), grad_b.reshape(np.shape(a)), h.reshape(np.shape(a))
