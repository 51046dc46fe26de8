"""Numba CPU kernels of the fused SwiGLU, h = silu(a) · b, and its backward, for the expert blocks.

Part of the "numba" implementation (`tinymoe.kernels.numba_cpu` re-exports `swiglu` and `swiglu_backward`);
same results as `tinymoe.kernels.reference`. Owner-computes loops over rows: no races, fixed order. The
kernels release the GIL; the wrappers run one range of rows per core on `tinymoe.kernels.cpu_threads`' pool
(why not Numba's parallel threads: `tinymoe.kernels.numba_cpu`); small outputs and calls from a pool worker
(an expert block) run inline on the calling thread. The backward can also run in place (the experts' backward
writes [da | db] over its saved [a | b] and h over dh: a third less memory traffic).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.extending import intrinsic, overload
from numba.np.numpy_support import as_dtype

from ..engine import workspace
from .cpu_threads import for_rows


# ----- SwiGLU ------------------------------------------------------------------------------------------
# One kernel per op, one pass over the elements; only σ differs by dtype, picked when Numba compiles the kernel
# for a dtype (the overload of `_sigmoid` below), so the choice costs nothing at run time:
#   float32: `_sigmoid_float32`, branch-free arithmetic that LLVM turns into SIMD code;
#   others:  `_sigmoid_exact`, from the libm exp (a scalar call).
@njit(inline="always")
def _sigmoid_exact(gate, one):
    decay = math.exp(-abs(gate))  # never overflows
    return one / (one + decay) if gate >= 0 else decay / (one + decay)


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose IEEE-754 bit pattern is the int32 `bits` (a register move; compiled code only)."""
    if bits != types.int32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))
    return types.float32(types.int32), codegen


# float32 SwiGLU spends its time in exp(), which the scalar libm call keeps from vectorising; this σ vectorises
# (2.5x faster on the whole kernel, same accuracy):
#   e^x for x = −|a| ≥ −87: n = round(x·log2 e), r = x − n·ln 2 (in two parts, so r is exact), |r| ≤ ln2/2;
#   e^r by its Taylor series to r⁷ (relative error < 1e-8); 2^n by writing n + 127 into the exponent bits.
_LOG2_E, _LN2_HIGH, _LN2_LOW = np.float32(1.4426950408889634), np.float32(0.693359375), np.float32(-2.12194440e-4)
_TAYLOR = tuple(np.float32(1 / math.factorial(power)) for power in range(7, -1, -1))  # 1/7!, 1/6!, ..., 1/0!


def _sigmoid_float32(gate):
    """σ(gate) for a float32 gate (see above); compiled through the overload of `_sigmoid` only."""
    one, half = np.float32(1), np.float32(0.5)
    x = max(-abs(gate), np.float32(-87))
    n = np.floor(x * _LOG2_E + half)
    r = (x - n * _LN2_HIGH) - n * _LN2_LOW
    c7, c6, c5, c4, c3, c2, c1, c0 = _TAYLOR
    series = ((((((c7 * r + c6) * r + c5) * r + c4) * r + c3) * r + c2) * r + c1) * r + c0
    decay = series * _float32_from_bits(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))  # e^(−|a|)
    inverse = one / (one + decay)
    return inverse if gate >= 0 else decay * inverse


def _sigmoid(gate):
    """σ(gate) in gate's dtype (see above). Compiled code only."""
    raise NotImplementedError("runs inside Numba kernels only")


@overload(_sigmoid, inline="always")
def _sigmoid_for_dtype(gate):
    if gate == types.float32:
        return _sigmoid_float32

    one = as_dtype(gate).type(1)  # a constant of the data's dtype

    def exact(gate):
        return _sigmoid_exact(gate, one)
    return exact


# Operands are often the halves [a | b] of one (n, 2ff) buffer (the experts' fused gate/up product); strided
# 2-D views compile to code that cannot assume unit steps (~4x slower), so each 2-D operand travels as a flat
# contiguous view of its memory and its row step: row r = flat[r·step : r·step + width], a slice that vectorises.
@njit(inline="always")
def _row(flat, step, row, width):
    return flat[row * step:row * step + width]


@njit(nogil=True, cache=True, error_model="numpy")
def _swiglu(a, a_step, b, b_step, h, h_step, n_rows, width):
    for row in range(n_rows):
        gates, ups, out = _row(a, a_step, row, width), _row(b, b_step, row, width), _row(h, h_step, row, width)
        for column in range(width):
            gate = gates[column]
            out[column] = gate * _sigmoid(gate) * ups[column]  # (a·σ)·b, as below


@njit(nogil=True, cache=True, error_model="numpy")
def _swiglu_backward(a, a_step, b, b_step, g, g_step, grad_a, da_step, grad_b, db_step, h, h_step, n_rows, width):
    for row in range(n_rows):
        _swiglu_backward_row(_row(a, a_step, row, width), _row(b, b_step, row, width), _row(g, g_step, row, width),
                             _row(grad_a, da_step, row, width), _row(grad_b, db_step, row, width),
                             _row(h, h_step, row, width))


# In place: da over a, db over b, h over g. Each element is read before it is written, in one iteration, and
# each pair is one array here: LLVM then sees a distance-0 dependence and vectorises (passed as two arrays of
# the same address, its run-time overlap check sends the loop to scalar code: a cpu-small step took ~8% longer).
@njit(nogil=True, cache=True, error_model="numpy")
def _swiglu_backward_in_place(a, a_step, b, b_step, g, g_step, n_rows, width):
    for row in range(n_rows):
        gates, ups, grads = _row(a, a_step, row, width), _row(b, b_step, row, width), _row(g, g_step, row, width)
        _swiglu_backward_row(gates, ups, grads, gates, ups, grads)


@njit(inline="always")
def _swiglu_backward_row(gates, ups, grads, grad_gates, grad_ups, out):
    one = gates.dtype.type(1)
    for column in range(gates.shape[0]):
        gate, up, grad = gates[column], ups[column], grads[column]
        sigma = _sigmoid(gate)
        silu = gate * sigma
        grad_ups[column] = grad * silu
        grad_gates[column] = grad * up * sigma * (one + gate * (one - sigma))
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


def swiglu_backward(a, b, grad_h, out=None, h_out=None):
    """(da, db, h): da = g · b · σ(a)·(1 + a·(1 − σ(a))), db = g · a·σ(a), h = a·σ(a)·b, in one pass.

    out: None or (da, db), h_out: None or h, to write into and return: 2-D NumPy arrays of a's shape and the
    result dtype, each row contiguous (e.g. the two halves of one (n, 2ff) buffer), sharing no memory with the
    inputs, or all three the inputs themselves, out=(a, b) and h_out=grad_h: computed in place.
    """
    dtype = np.result_type(a, b, grad_h)
    a_rows, b_rows, grad_rows = _as_rows(a, dtype), _as_rows(b, dtype), _as_rows(grad_h, dtype)
    given = (() if out is None else (("out da", out[0]), ("out db", out[1])))
    given += () if h_out is None else (("h_out", h_out),)
    for name, array in given:
        if not isinstance(array, np.ndarray) or array.shape != np.shape(a) or _as_rows(array, dtype) is not array:
            got = f"{getattr(array, 'shape', array)} {getattr(array, 'dtype', '')}"
            raise ValueError(f"swiglu_backward: {name} must be a 2-D {dtype} NumPy array of shape {np.shape(a)} "
                             f"with contiguous rows, got {got}")
    inputs = (a_rows, b_rows, grad_rows)
    in_place = out is not None and h_out is not None and all(
        _same_elements(output, source) for output, source in zip((*out, h_out), inputs))
    if in_place:  # an element written before another input's element at that address was read: wrong results
        _require_apart("inputs computed in place", zip(("a", "b", "grad_h"), inputs))
    else:
        _require_apart("outputs", given)
        for name, array in given:
            for input_name, rows in zip(("a", "b", "grad_h"), inputs):
                if np.shares_memory(array, rows):
                    raise ValueError(f"swiglu_backward: {name} shares memory with {input_name}; outputs must be "
                                     "apart from the inputs, or all three the inputs themselves (out=(a, b), "
                                     "h_out=grad_h: in place)")
    grad_a, grad_b = (workspace.empty(a_rows.shape, dtype) for _ in range(2)) if out is None else out
    h = workspace.empty(a_rows.shape, dtype) if h_out is None else h_out
    if h.size:
        def rows(start, stop):
            if in_place:
                _swiglu_backward_in_place(*(piece for array in inputs for piece in _flat(array[start:stop])),
                                          stop - start, h.shape[1])
            else:
                _swiglu_backward(*(piece for array in (*inputs, grad_a, grad_b, h)
                                   for piece in _flat(array[start:stop])), stop - start, h.shape[1])
        for_rows(h.shape[0], rows, h.size)
    return grad_a.reshape(np.shape(a)), grad_b.reshape(np.shape(a)), h.reshape(np.shape(a))


def _require_apart(what, named_arrays) -> None:
    """ValueError naming the first two of `named_arrays` ((name, array) pairs) that share memory."""
    named_arrays = list(named_arrays)
    for position, (name, array) in enumerate(named_arrays):
        for other_name, other in named_arrays[position + 1:]:
            if np.shares_memory(array, other):
                raise ValueError(f"swiglu_backward: {name} and {other_name} share memory; {what} must be apart "
                                 "from each other")


def _same_elements(x, y) -> bool:
    """Whether two arrays view the same elements in the same order (same start, shape and strides)."""
    return (x.__array_interface__["data"][0] == y.__array_interface__["data"][0] and x.shape == y.shape
            and x.strides == y.strides)
