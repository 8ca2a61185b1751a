// Manifold-constrained hyper-connections (spec 5.3) and the HC head (5.11). The residual of a
// token is hc copies of a D-vector, x[t, hc, D]; coefficients per token are laid out as
// [pre hc | post hc | comb hc*hc] (comb row-major, row = source copy).
#include "common.cuh"

#define MAX_MIX 96  // 2 hc + hc^2 for hc <= 8

__device__ __forceinline__ float sigm(float v) { return 1.0f / (1.0f + expf(-v)); }

// m[r] = (fn[r, :] . x[t]) * rho with rho = 1/sqrt(mean(x[t]^2) + eps), r < rows, into shared.
__device__ void project(const float* xt, const float* fn, int rows, int n, float eps, float* m) {
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += xt[i] * xt[i];
    ss = block_sum(ss);
    float rho = 1.0f / sqrtf(ss / (float)n + eps);
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP, nw = blockDim.x / WARP;
    for (int r = w; r < rows; r += nw) {
        const float* fr = fn + (size_t)r * n;
        float d = 0.0f;
        for (int i = lane; i < n; i += WARP) d += fr[i] * xt[i];
        d = warp_sum(d);
        if (lane == 0) m[r] = d * rho;
    }
    __syncthreads();
}

// Sinkhorn-Knopp as the reference: row softmax + eps, a column normalisation, then
// (iters - 1) x (row, column) normalisations, eps in every denominator. One thread.
__device__ void sinkhorn(float* c, int hc, int iters, float eps) {
    for (int i = 0; i < hc; i++) {
        float mx = -__int_as_float(0x7f800000), s = 0.0f;
        for (int k = 0; k < hc; k++) mx = fmaxf(mx, c[i * hc + k]);
        for (int k = 0; k < hc; k++) { c[i * hc + k] = expf(c[i * hc + k] - mx); s += c[i * hc + k]; }
        for (int k = 0; k < hc; k++) c[i * hc + k] = c[i * hc + k] / s + eps;
    }
    for (int it = 0; it < iters; it++) {
        if (it > 0) {
            for (int i = 0; i < hc; i++) {
                float s = eps;
                for (int k = 0; k < hc; k++) s += c[i * hc + k];
                for (int k = 0; k < hc; k++) c[i * hc + k] /= s;
            }
        }
        for (int k = 0; k < hc; k++) {
            float s = eps;
            for (int i = 0; i < hc; i++) s += c[i * hc + k];
            for (int i = 0; i < hc; i++) c[i * hc + k] /= s;
        }
    }
}

// Coefficients of one mHC site per token. Grid t, blockDim.x = 256. hc <= 8.
extern "C" __global__ void hc_mix(const float* __restrict__ x, const float* __restrict__ fn,
                                  const float* __restrict__ base, float s0, float s1, float s2,
                                  float* __restrict__ out, int hc, int d, int iters,
                                  float norm_eps, float hc_eps) {
    __shared__ float m[MAX_MIX];
    int mix = 2 * hc + hc * hc, n = hc * d;
    project(x + (size_t)blockIdx.x * n, fn, mix, n, norm_eps, m);
    if (threadIdx.x == 0) {
        float* o = out + (size_t)blockIdx.x * mix;
        for (int i = 0; i < hc; i++) {
            o[i] = sigm(m[i] * s0 + base[i]) + hc_eps;
            o[hc + i] = 2.0f * sigm(m[hc + i] * s1 + base[hc + i]);
        }
        for (int q = 0; q < hc * hc; q++) o[2 * hc + q] = m[2 * hc + q] * s2 + base[2 * hc + q];
        sinkhorn(o + 2 * hc, hc, iters, hc_eps);
    }
}

// The HC head's collapse weights per token: sigmoid(m_i * scale + base_i) + eps, out [t, hc].
extern "C" __global__ void hc_head(const float* __restrict__ x, const float* __restrict__ fn,
                                   const float* __restrict__ base, float scale,
                                   float* __restrict__ out, int hc, int d, float norm_eps,
                                   float hc_eps) {
    __shared__ float m[MAX_MIX];
    int n = hc * d;
    project(x + (size_t)blockIdx.x * n, fn, hc, n, norm_eps, m);
    if (threadIdx.x < hc)
        out[(size_t)blockIdx.x * hc + threadIdx.x] = sigm(m[threadIdx.x] * scale + base[threadIdx.x]) + hc_eps;
}

// u[t, e] = sum_i coef[t * stride + i] * x[t, i, e]. Grid (ceil(d / 256), t).
extern "C" __global__ void hc_collapse(const float* __restrict__ x, const float* __restrict__ coef,
                                       int stride, float* __restrict__ u, int hc, int d) {
    int e = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y;
    if (e >= d) return;
    const float* c = coef + (size_t)t * stride;
    const float* xt = x + (size_t)t * hc * d;
    float s = 0.0f;
    for (int i = 0; i < hc; i++) s += c[i] * xt[i * d + e];
    u[(size_t)t * d + e] = s;
}

// x[t, k, e] = post_k f[t, e] + sum_i comb[i][k] x[t, i, e], in place (each thread owns one
// channel e of one token, reading its hc old values first). Grid (ceil(d / 256), t).
extern "C" __global__ void hc_expand(float* x, const float* __restrict__ f,
                                     const float* __restrict__ coef, int hc, int d) {
    int e = blockIdx.x * blockDim.x + threadIdx.x, t = blockIdx.y;
    if (e >= d) return;
    const float* c = coef + (size_t)t * (2 * hc + hc * hc);
    float* xt = x + (size_t)t * hc * d;
    float old[8];
    for (int i = 0; i < hc; i++) old[i] = xt[i * d + e];
    float fv = f[(size_t)t * d + e];
    for (int k = 0; k < hc; k++) {
        float s = c[hc + k] * fv;
        for (int i = 0; i < hc; i++) s += c[2 * hc + i * hc + k] * old[i];
        xt[k * d + e] = s;
    }
}
