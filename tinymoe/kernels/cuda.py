"""CuPy RawKernels of the dispatch primitives for float32, float64 and float16 (float16 summed in float32).

Same names, signatures and results as `tinymoe.kernels.reference`, which defines them. Every kernel is
owner-computes: one thread block owns an output row (one warp owns a dot product in combine_weights_grad,
one thread an element of SwiGLU), so there are no atomics, no races, and each sum runs in a fixed order.
Columns are read by consecutive threads (coalesced), 16 bytes at a time when rows allow it. The source,
tinymoe/kernels/cuda/dispatch.cu (package data), is compiled by NVRTC on first use, once per dtype; CuPy is
imported only then (`import_cupy`).
"""
from __future__ import annotations

from importlib import resources

import numpy as np

from ..engine.backend import import_cupy
from . import reference

_VECTOR_BYTES = 16
_ROW_THREADS = 256   # most threads per block on a row; fewer for short rows
_MAX_BLOCKS = 1 << 20  # grid-stride loops cover the rest

_SOURCE_FILE = "dispatch.cu"  # in the package folder tinymoe/kernels/cuda/
_DTYPE_MACROS = {"float32": "TINYMOE_FLOAT32", "float64": "TINYMOE_FLOAT64", "float16": "TINYMOE_FLOAT16"}
_source_text = None


def source(dtype) -> str:
    """The CUDA source compiled for `dtype`: a `#define` choosing its types, then cuda/dispatch.cu."""
    global _source_text
    dtype = np.dtype(dtype).name
    if dtype not in _DTYPE_MACROS:
        raise TypeError(f"the CuPy kernels take float16, float32 or float64 data, got {dtype}")
    if _source_text is None:
        _source_text = resources.files(__package__).joinpath("cuda", _SOURCE_FILE).read_text(encoding="utf-8")
    return f"#define {_DTYPE_MACROS[dtype]}\n" + _source_text


_modules = {}    # dtype name -> cupy.RawModule
_functions = {}  # (kernel name, dtype name) -> cupy.RawKernel


def _kernel(name: str, dtype):
    """The compiled kernel `name` ("gather_rows_vec", ...) for `dtype`, compiling its dtype's module once."""
    dtype = np.dtype(dtype).name
    key = (name, dtype)
    if key not in _functions:
        if dtype not in _modules:
            _modules[dtype] = import_cupy().RawModule(code=source(dtype))
        _functions[key] = _modules[dtype].get_function(name)
    return _functions[key]


def _accumulate_dtype(dtype):
    return np.dtype(np.float32) if np.dtype(dtype) == np.float16 else np.dtype(dtype)


def _vector_width(dtype, width: int, *arrays) -> int:
    """Elements per load: a 16-byte pack when every row starts 16-byte aligned, else 1."""
    pack = _VECTOR_BYTES // np.dtype(dtype).itemsize
    aligned = all(array.data.ptr % _VECTOR_BYTES == 0 for array in arrays if array.size)
    return pack if width % pack == 0 and aligned else 1


def _launch_rows(name, dtype, n_rows: int, width: int, arrays, args):
    """One block per row (grid-stride), threads across the row's columns in packs."""
    if n_rows == 0 or width == 0:
        return
    vector = _vector_width(dtype, width, *arrays)
    n_packs = width // vector
    threads = min(_ROW_THREADS, max(32, -(-n_packs // 32) * 32))
    kernel = _kernel(f"{name}_vec" if vector > 1 else f"{name}_scalar", dtype)
    kernel((min(n_rows, _MAX_BLOCKS),), (threads,), (*args, np.int64(n_packs)))


def _launch_elements(name, dtype, n: int, arrays, args):
    """Grid-stride over n elements, in packs when the flat buffers allow it."""
    if n == 0:
        return
    vector = _vector_width(dtype, n, *arrays)
    n_packs = n // vector
    kernel = _kernel(f"{name}_vec" if vector > 1 else f"{name}_scalar", dtype)
    kernel((min(-(-n_packs // _ROW_THREADS), _MAX_BLOCKS),), (_ROW_THREADS,), (*args, np.int64(n_packs)))


def _indices(cupy, index):
    return cupy.ascontiguousarray(index, dtype=cupy.int64)


def routing_plan(expert_ids, n_experts: int, capacity=None, valid=None):
    """The reference's stable sort (CuPy's argsort, bincount, cumsum): not bandwidth-critical, O(T·K)."""
    return reference.routing_plan(expert_ids, n_experts, capacity, valid)


def gather_rows(x, index, scale=None):
    """out[i] = scale[i] · x[index[i]];  x (N, d), index (M,) in [0, N), scale (M,) or None → (M, d)."""
    cupy = import_cupy()
    x, index = cupy.ascontiguousarray(x), _indices(cupy, index)
    if scale is not None:
        scale = cupy.ascontiguousarray(scale, dtype=_accumulate_dtype(x.dtype))
    out = cupy.empty((index.shape[0], x.shape[1]), dtype=x.dtype)
    _launch_rows("gather_rows", x.dtype, index.shape[0], x.shape[1], (x, out),
                 (x, index, scale, out, np.int64(index.shape[0])))
    return out


def combine_rows(y, index, weights=None):
    """out[t] = Σ_j weights[t, j] · y[index[t, j]], skipping index −1;  y (M, d), index (T, K) → (T, d)."""
    cupy = import_cupy()
    y, index = cupy.ascontiguousarray(y), _indices(cupy, index)
    if weights is not None:
        weights = cupy.ascontiguousarray(weights, dtype=y.dtype)
    n_tokens, top_k = index.shape
    out = cupy.empty((n_tokens, y.shape[1]), dtype=y.dtype)
    if top_k == 0:
        out.fill(0)
        return out
    _launch_rows("combine_rows", y.dtype, n_tokens, y.shape[1], (y, out),
                 (y, index, weights, out, np.int64(n_tokens), np.int64(top_k)))
    return out


def combine_weights_grad(grad_out, y, index):
    """dw[t, j] = <grad_out[t], y[index[t, j]]>, 0 where index is −1;  → (T, K) in y's dtype."""
    cupy = import_cupy()
    y, index = cupy.ascontiguousarray(y), _indices(cupy, index)
    grad_out = cupy.ascontiguousarray(grad_out, dtype=y.dtype)
    grad_weights = cupy.empty(index.shape, dtype=y.dtype)
    n_assignments, width = index.size, y.shape[1]
    if n_assignments == 0:
        return grad_weights
    if width == 0:
        grad_weights.fill(0)
        return grad_weights
    vector = _vector_width(y.dtype, width, y, grad_out)
    warps_per_block = _ROW_THREADS // 32
    blocks = min(-(-n_assignments // warps_per_block), _MAX_BLOCKS)
    kernel = _kernel("combine_weights_grad_vec" if vector > 1 else "combine_weights_grad_scalar", y.dtype)
    kernel((blocks,), (_ROW_THREADS,), (grad_out, y, index, grad_weights, np.int64(n_assignments),
                                        np.int64(index.shape[1]), np.int64(width // vector)))
    return grad_weights


def scatter_add_rows(values, index, n_rows: int):
    """out[n] = Σ_{i: index[i] = n} values[i], summed in increasing i;  values (M, d), index (M,) → (n_rows, d).

    A stable sort groups the positions by target row; then each output row's block sums its own segment.
    """
    cupy = import_cupy()
    values, index = cupy.ascontiguousarray(values), _indices(cupy, index)
    out = cupy.empty((n_rows, values.shape[1]), dtype=values.dtype)
    if index.size == 0:
        out.fill(0)
        return out
    order = cupy.argsort(index, kind="stable").astype(cupy.int64, copy=False)  # stable: rows add in increasing i
    counts = cupy.bincount(index, minlength=n_rows)[:n_rows]
    starts = cupy.concatenate([cupy.zeros(1, dtype=cupy.int64), cupy.cumsum(counts).astype(cupy.int64, copy=False)])
    _launch_rows("sum_segments", values.dtype, n_rows, values.shape[1], (values, out),
                 (values, starts, order, out, np.int64(n_rows)))
    return out


def swiglu(a, b):
    """h = silu(a) · b = a · σ(a) · b, elementwise; a, b of one shape."""
    cupy = import_cupy()
    dtype, shape = cupy.result_type(a, b), a.shape
    a, b = cupy.ascontiguousarray(a, dtype=dtype), cupy.ascontiguousarray(b, dtype=dtype)
    h = cupy.empty(a.shape, dtype=dtype)
    _launch_elements("swiglu", dtype, a.size, (a, b, h), (a, b, h))
    return h.reshape(shape)


def swiglu_backward(a, b, grad_h):
    """(da, db, h): da = g · b · σ(a)·(1 + a·(1 − σ(a))), db = g · a·σ(a), h = a·σ(a)·b, in one pass."""
    cupy = import_cupy()
    dtype, shape = cupy.result_type(a, b, grad_h), a.shape
    a, b, grad_h = (cupy.ascontiguousarray(array, dtype=dtype) for array in (a, b, grad_h))
    grad_a, grad_b, h = (cupy.empty(a.shape, dtype=dtype) for _ in range(3))
    buffers = (a, b, grad_h, grad_a, grad_b, h)
    _launch_elements("swiglu_backward", dtype, a.size, buffers, buffers)
    return grad_a.reshape(shape), grad_b.reshape(shape), h.reshape(shape)
