// Element-wise ops of the forward pass. blockDim.x = 256, gridDim.x = ceil(n / 256).
#include "common.cuh"

__device__ __forceinline__ float silu(float v) { return v / (1.0f + expf(-v)); }

// Clamped SwiGLU (spec 5.10 step 5): out = SiLU(min(g, limit)) * clamp(u, -limit, limit),
// optionally times a per-row routing weight (`row_w` [n / width], may be null).
extern "C" __global__ void swiglu(const float* __restrict__ g, const float* __restrict__ u,
                                  const float* __restrict__ row_w, float* __restrict__ out,
                                  int n, int width, float limit) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float a = silu(fminf(g[i], limit)) * fminf(fmaxf(u[i], -limit), limit);
    out[i] = row_w ? a * row_w[i / width] : a;
}

// y[i] += a * x[i]
extern "C" __global__ void axpy(float* __restrict__ y, const float* __restrict__ x, float a,
                                int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += a * x[i];
}

// Interleaved partial RoPE on the trailing rope_dim values of each `width`-wide row:
// pairs (2j, 2j+1) rotated by p * inv_freq[j] (negated when `inverse`), where row r is at
// p = pos + r / rows_per_pos (the heads of one token share a position); blockIdx.x = row,
// threadIdx.x = pair j. The angle is formed in fp32 as the reference's complex64 table is,
// its sine and cosine in double.
extern "C" __global__ void rope(float* x, const float* __restrict__ inv_freq, int width,
                                int rope_dim, int pos, int rows_per_pos, int inverse) {
    int j = threadIdx.x;
    if (j >= rope_dim / 2) return;
    float* z = x + (size_t)blockIdx.x * width + (width - rope_dim);
    int p = pos + (int)blockIdx.x / max(rows_per_pos, 1);
    float ang = (float)p * inv_freq[j];
    double s, c;
    sincos((double)ang, &s, &c);
    float sf = inverse ? -(float)s : (float)s, cf = (float)c;
    float a = z[2 * j], b = z[2 * j + 1];
    z[2 * j] = a * cf - b * sf;
    z[2 * j + 1] = a * sf + b * cf;
}

// Strided row copy: dst[r * dst_stride + c] = src[r * src_stride + c] (offsets already
// applied to the pointers); blockIdx.y = row, x-threads over the `width` columns.
extern "C" __global__ void copy_rows(const float* __restrict__ src, int src_stride,
                                     float* __restrict__ dst, int dst_stride, int width) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= width) return;
    size_t r = blockIdx.y;
    dst[r * dst_stride + c] = src[r * src_stride + c];
}

// out[j, :] = x[idx[j], :]; blockIdx.y = j, x-threads over the columns.
extern "C" __global__ void gather_rows(const float* __restrict__ x, const int* __restrict__ idx,
                                       float* __restrict__ out, int width) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= width) return;
    size_t j = blockIdx.y;
    out[j * width + c] = x[(size_t)idx[j] * width + c];
}

// For j = 0..n-1 in order: y[r_j, c] += f_j * x[j, c], r_j = idx ? idx[j] : j,
// f_j = w ? w[j] : 1. One thread per column walks the rows in order, so repeated rows add
// in the CPU's order; the product is rounded before the add (no contraction), as the CPU's.
extern "C" __global__ void add_rows(float* __restrict__ y, const float* __restrict__ x,
                                    const int* __restrict__ idx, const float* __restrict__ w,
                                    int n, int width) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= width) return;
    for (int j = 0; j < n; j++) {
        size_t r = idx ? (size_t)idx[j] : (size_t)j;
        float f = w ? w[j] : 1.0f;
        y[r * width + c] = __fadd_rn(y[r * width + c], __fmul_rn(f, x[(size_t)j * width + c]));
    }
}
