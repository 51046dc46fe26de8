// CUDA kernels of tinymoe's dispatch primitives (tinymoe/kernels/cuda.py launches them; the NumPy reference
// tinymoe/kernels/reference.py defines what they compute). Compiled by NVRTC on first use, once per dtype,
// with one of TINYMOE_FLOAT32, TINYMOE_FLOAT64, TINYMOE_FLOAT16 defined in front of this file.
//
// Storage type T, accumulation type A, and the conversions between them, per dtype. float16 travels as its
// 16 bits (unsigned short) and is converted with PTX cvt, so no CUDA header is needed.
#if defined(TINYMOE_FLOAT32)
typedef float T; typedef float A;
__device__ __forceinline__ A to_acc(T v) { return v; }
__device__ __forceinline__ T from_acc(A v) { return v; }
#elif defined(TINYMOE_FLOAT64)
typedef double T; typedef double A;
__device__ __forceinline__ A to_acc(T v) { return v; }
__device__ __forceinline__ T from_acc(A v) { return v; }
#elif defined(TINYMOE_FLOAT16)
typedef unsigned short T; typedef float A;
__device__ __forceinline__ A to_acc(T v) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v)); return f; }
__device__ __forceinline__ T from_acc(A v) {
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v)); return h; }
#else
#error "define TINYMOE_FLOAT32, TINYMOE_FLOAT64 or TINYMOE_FLOAT16 before this source"
#endif

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
