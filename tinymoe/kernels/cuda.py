"""CuPy RawKernels of the dispatch primitives for float32, float64 and float16 (float16 summed in float32).

Same names, signatures and results as `tinymoe.kernels.reference`, which defines them. Every kernel is
owner-computes: one thread block owns an output row (one warp owns a dot product in combine_weights_grad,
one thread an element of SwiGLU), so there are no atomics, no races, and each sum runs in a fixed order.
Columns are read by consecutive threads (coalesced), 16 bytes at a time when rows allow it. The source below
is compiled by NVRTC on first use, once per dtype; CuPy is imported only then (`import_cupy`).
"""
from __future__ import annotations

import numpy as np

from ..engine.backend import import_cupy
from . import reference

_VECTOR_BYTES = 16
_ROW_THREADS = 256   # most threads per block on a row; fewer for short rows
_MAX_BLOCKS = 1 << 20  # grid-stride loops cover the rest

# Storage type T, accumulation type A, and the conversions between them, per dtype. float16 travels as its
# 16 bits (unsigned short) and is converted with PTX cvt, so no CUDA header is needed.
_TYPES = {
    "float32": "typedef float T; typedef float A;\n"
               "__device__ __forceinline__ A to_acc(T v) { return v; }\n"
               "__device__ __forceinline__ T from_acc(A v) { return v; }\n",
    "float64": "typedef double T; typedef double A;\n"
               "__device__ __forceinline__ A to_acc(T v) { return v; }\n"
               "__device__ __forceinline__ T from_acc(A v) { return v; }\n",
    "float16": "typedef unsigned short T; typedef float A;\n"
               "__device__ __forceinline__ A to_acc(T v) {\n"
               "    float f; asm(\"cvt.f32.f16 %0, %1;\" : \"=f\"(f) : \"h\"(v)); return f; }\n"
               "__device__ __forceinline__ T from_acc(A v) {\n"
               "    unsigned short h; asm(\"cvt.rn.f16.f32 %0, %1;\" : \"=h\"(h) : \"f\"(v)); return h; }\n",
}

_SOURCE = r"""
constexpr int PACK = 16 / sizeof(T);  // elements in one 16-byte load
template <int W> struct alignas(sizeof(T) * W) Vec { T v[W]; };

__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }

// sigma(a) without overflow: exp(-|a|) <= 1.
__device__ __forceinline__ A sigmoid_acc(A a) {
    const A decay = exp_acc(a >= A(0) ? -a : a);
    return a >= A(0) ? A(1) / (A(1) + decay) : decay / (A(1) + decay);
}

// out[i] = scale[i] * x[index[i]]; block b owns output rows b, b + gridDim.x, ...; `width` counts Vec<W>.
template <int W>
__device__ void gather_rows_impl(const T* x, const long long* index, const A* scale, T* out,
                                 long long n_out, long long width) {
    const Vec<W>* x_vec = reinterpret_cast<const Vec<W>*>(x);
    Vec<W>* out_vec = reinterpret_cast<Vec<W>*>(out);
    for (long long row = blockIdx.x; row < n_out; row += gridDim.x) {
        const Vec<W>* source = x_vec + index[row] * width;
        Vec<W>* target = out_vec + row * width;
        const A factor = scale ? scale[row] : A(1);
        for (long long c = threadIdx.x; c < width; c += blockDim.x) {
            Vec<W> v = source[c];
            if (scale) {
                #pragma unroll
                for (int k = 0; k < W; ++k) v.v[k] = from_acc(factor * to_acc(v.v[k]));
            }
            target[c] = v;
        }
    }
}

// out[t] = sum_j weights[t, j] * y[index[t, j]] over index >= 0, slot by slot; block owns token rows.
template <int W>
__device__ void combine_rows_impl(const T* y, const long long* index, const T* weights, T* out,
                                  long long n_tokens, long long top_k, long long width) {
    const Vec<W>* y_vec = reinterpret_cast<const Vec<W>*>(y);
    Vec<W>* out_vec = reinterpret_cast<Vec<W>*>(out);
    for (long long token = blockIdx.x; token < n_tokens; token += gridDim.x) {
        for (long long c = threadIdx.x; c < width; c += blockDim.x) {
            A total[W];
            #pragma unroll
            for (int k = 0; k < W; ++k) total[k] = A(0);
            for (long long slot = 0; slot < top_k; ++slot) {
                const long long row = index[token * top_k + slot];
                if (row < 0) continue;
                const A weight = weights ? to_acc(weights[token * top_k + slot]) : A(1);
                const Vec<W> v = y_vec[row * width + c];
                #pragma unroll
                for (int k = 0; k < W; ++k) total[k] += weight * to_acc(v.v[k]);
            }
            Vec<W> result;
            #pragma unroll
            for (int k = 0; k < W; ++k) result.v[k] = from_acc(total[k]);
            out_vec[token * width + c] = result;
        }
    }
}

// dw[a] = <grad_out[a / top_k], y[index[a]]> (0 where index is -1); one warp owns assignment a and reduces
// its lanes with a fixed butterfly, so the result does not depend on scheduling.
template <int W>
__device__ void combine_weights_grad_impl(const T* grad_out, const T* y, const long long* index, T* grad_weights,
                                          long long n_assignments, long long top_k, long long width) {
    const Vec<W>* grad_vec = reinterpret_cast<const Vec<W>*>(grad_out);
    const Vec<W>* y_vec = reinterpret_cast<const Vec<W>*>(y);
    const int lane = threadIdx.x % 32;
    const long long warps_per_block = blockDim.x / 32;
    const long long n_warps = (long long)gridDim.x * warps_per_block;
    for (long long a = blockIdx.x * warps_per_block + threadIdx.x / 32; a < n_assignments; a += n_warps) {
        const long long row = index[a];
        A total = A(0);
        if (row >= 0) {
            const Vec<W>* g = grad_vec + (a / top_k) * width;
            const Vec<W>* r = y_vec + row * width;
            for (long long c = lane; c < width; c += 32) {
                const Vec<W> gv = g[c], rv = r[c];
                #pragma unroll
                for (int k = 0; k < W; ++k) total += to_acc(gv.v[k]) * to_acc(rv.v[k]);
            }
        }
        #pragma unroll
        for (int offset = 16; offset > 0; offset /= 2) total += __shfl_xor_sync(0xffffffffu, total, offset);
        if (lane == 0) grad_weights[a] = from_acc(total);
    }
}

// out[n] = sum of values[order[p]] for p in [starts[n], starts[n + 1]), in p order; block owns row n.
template <int W>
__device__ void sum_segments_impl(const T* values, const long long* starts, const long long* order, T* out,
                                  long long n_rows, long long width) {
    const Vec<W>* values_vec = reinterpret_cast<const Vec<W>*>(values);
    Vec<W>* out_vec = reinterpret_cast<Vec<W>*>(out);
    for (long long row = blockIdx.x; row < n_rows; row += gridDim.x) {
        const long long begin = starts[row], end = starts[row + 1];
        for (long long c = threadIdx.x; c < width; c += blockDim.x) {
            A total[W];
            #pragma unroll
            for (int k = 0; k < W; ++k) total[k] = A(0);
            for (long long p = begin; p < end; ++p) {
                const Vec<W> v = values_vec[order[p] * width + c];
                #pragma unroll
                for (int k = 0; k < W; ++k) total[k] += to_acc(v.v[k]);
            }
            Vec<W> result;
            #pragma unroll
            for (int k = 0; k < W; ++k) result.v[k] = from_acc(total[k]);
            out_vec[row * width + c] = result;
        }
    }
}

// h = a * sigma(a) * b, elementwise over n Vec<W>.
template <int W>
__device__ void swiglu_impl(const T* a, const T* b, T* h, long long n) {
    const Vec<W>* a_vec = reinterpret_cast<const Vec<W>*>(a);
    const Vec<W>* b_vec = reinterpret_cast<const Vec<W>*>(b);
    Vec<W>* h_vec = reinterpret_cast<Vec<W>*>(h);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += stride) {
        const Vec<W> av = a_vec[i], bv = b_vec[i];
        Vec<W> hv;
        #pragma unroll
        for (int k = 0; k < W; ++k) {
            const A gate = to_acc(av.v[k]);
            hv.v[k] = from_acc(gate * sigmoid_acc(gate) * to_acc(bv.v[k]));
        }
        h_vec[i] = hv;
    }
}

// da = g * b * s * (1 + a * (1 - s)), db = g * a * s and h = a * s * b, with s = sigma(a).
template <int W>
__device__ void swiglu_backward_impl(const T* a, const T* b, const T* grad_h, T* grad_a, T* grad_b, T* h,
                                     long long n) {
    const Vec<W>* a_vec = reinterpret_cast<const Vec<W>*>(a);
    const Vec<W>* b_vec = reinterpret_cast<const Vec<W>*>(b);
    const Vec<W>* g_vec = reinterpret_cast<const Vec<W>*>(grad_h);
    Vec<W>* da_vec = reinterpret_cast<Vec<W>*>(grad_a);
    Vec<W>* db_vec = reinterpret_cast<Vec<W>*>(grad_b);
    Vec<W>* h_vec = reinterpret_cast<Vec<W>*>(h);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += stride) {
        const Vec<W> av = a_vec[i], bv = b_vec[i], gv = g_vec[i];
        Vec<W> da, db, hv;
        #pragma unroll
        for (int k = 0; k < W; ++k) {
            const A gate = to_acc(av.v[k]), up = to_acc(bv.v[k]), g = to_acc(gv.v[k]);
            const A s = sigmoid_acc(gate);
            db.v[k] = from_acc(g * (gate * s));
            da.v[k] = from_acc(g * up * s * (A(1) + gate * (A(1) - s)));
            hv.v[k] = from_acc(gate * s * up);
        }
        da_vec[i] = da;
        db_vec[i] = db;
        h_vec[i] = hv;
    }
}

#define ENTRY(name, params, args) \
    extern "C" __global__ void name##_vec params { name##_impl<PACK> args; } \
    extern "C" __global__ void name##_scalar params { name##_impl<1> args; }

ENTRY(gather_rows, (const T* x, const long long* index, const A* scale, T* out, long long n_out, long long width),
      (x, index, scale, out, n_out, width))
ENTRY(combine_rows, (const T* y, const long long* index, const T* weights, T* out, long long n_tokens, long long top_k,
      long long width), (y, index, weights, out, n_tokens, top_k, width))
ENTRY(combine_weights_grad, (const T* grad_out, const T* y, const long long* index, T* grad_weights,
      long long n_assignments, long long top_k, long long width),
      (grad_out, y, index, grad_weights, n_assignments, top_k, width))
ENTRY(sum_segments, (const T* values, const long long* starts, const long long* order, T* out, long long n_rows,
      long long width), (values, starts, order, out, n_rows, width))
ENTRY(swiglu, (const T* a, const T* b, T* h, long long n), (a, b, h, n))
ENTRY(swiglu_backward, (const T* a, const T* b, const T* grad_h, T* grad_a, T* grad_b, T* h, long long n),
      (a, b, grad_h, grad_a, grad_b, h, n))
"""

_modules = {}    # dtype name -> cupy.RawModule
_functions = {}  # (kernel name, dtype name) -> cupy.RawKernel


def _kernel(name: str, dtype):
    """The compiled kernel `name` ("gather_rows_vec", ...) for `dtype`, compiling its dtype's module once."""
    dtype = np.dtype(dtype).name
    key = (name, dtype)
    if key not in _functions:
        if dtype not in _TYPES:
            raise TypeError(f"the CuPy kernels take float16, float32 or float64 data, got {dtype}")
        if dtype not in _modules:
            _modules[dtype] = import_cupy().RawModule(code=_TYPES[dtype] + _SOURCE)
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
