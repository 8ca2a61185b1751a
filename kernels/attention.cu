// Core attention with a per-head sink (spec 5.8), for decode and chunked prefill alike: query
// j (of t) and head h attend to the n_keys[j] key rows listed in idx[j, :] of `keys` (window
// rows and compressed rows gathered into one table; keys are also the values: one KV head).
//   logit_i = q[j,h,:] . K[idx[j,i],:] * scale
//   out[j,h,:] = sum_i exp(logit_i - M) K[idx[j,i],:] / (exp(sink[h] - M) + sum_i exp(logit_i - M))
// The sink only enlarges the denominator. Each warp runs an online softmax over every 8th
// key; the 8 partial states are merged at the end.
// Grid (t, heads), blockDim.x = 256. hd a multiple of 32, at most 512.
#include "common.cuh"

#define MAX_HD 512
#define NWARP 8

extern "C" __global__ void attend_sink(const float* __restrict__ q, const float* __restrict__ keys,
                                       const int* __restrict__ idx, const int* __restrict__ n_keys,
                                       int max_keys, const float* __restrict__ sink, float scale,
                                       float* __restrict__ out, int heads, int hd) {
    __shared__ float part_acc[NWARP][MAX_HD];
    __shared__ float part_m[NWARP], part_l[NWARP];
    int j = blockIdx.x, h = blockIdx.y;
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP;
    int per = hd / WARP;  // values per lane, <= 16
    const float* qh = q + ((size_t)j * heads + h) * hd;
    const int* ix = idx + (size_t)j * max_keys;
    int n = n_keys[j];
    float qv[MAX_HD / WARP], acc[MAX_HD / WARP];
#pragma unroll
    for (int k = 0; k < MAX_HD / WARP; k++) {
        qv[k] = k < per ? qh[lane + WARP * k] : 0.0f;
        acc[k] = 0.0f;
    }
    const float neg_inf = -__int_as_float(0x7f800000);
    float m = neg_inf, l = 0.0f;
    for (int i = w; i < n; i += NWARP) {
        const float* kr = keys + (size_t)ix[i] * hd;
        float d = 0.0f;
#pragma unroll
        for (int k = 0; k < MAX_HD / WARP; k++)
            if (k < per) d += qv[k] * kr[lane + WARP * k];
        d = warp_sum(d) * scale;
        float mn = fmaxf(m, d);
        float c = m == neg_inf ? 0.0f : expf(m - mn);
        float e = expf(d - mn);
#pragma unroll
        for (int k = 0; k < MAX_HD / WARP; k++)
            if (k < per) acc[k] = acc[k] * c + e * kr[lane + WARP * k];
        l = l * c + e;
        m = mn;
    }
#pragma unroll
    for (int k = 0; k < MAX_HD / WARP; k++)
        if (k < per) part_acc[w][lane + WARP * k] = acc[k];
    if (lane == 0) { part_m[w] = m; part_l[w] = l; }
    __syncthreads();
    float s = sink[h];
    float mm = s;
    for (int q2 = 0; q2 < NWARP; q2++) mm = fmaxf(mm, part_m[q2]);
    float den = expf(s - mm);
    float f[NWARP];
    for (int q2 = 0; q2 < NWARP; q2++) {
        f[q2] = part_m[q2] == neg_inf ? 0.0f : expf(part_m[q2] - mm);
        den += part_l[q2] * f[q2];
    }
    float* o = out + ((size_t)j * heads + h) * hd;
    for (int e = threadIdx.x; e < hd; e += blockDim.x) {
        float v = 0.0f;
        for (int q2 = 0; q2 < NWARP; q2++) v += part_acc[q2][e] * f[q2];
        o[e] = v / den;
    }
}
