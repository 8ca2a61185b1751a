// KV compressor pooling (spec 5.6) of `windows` completed windows: per channel e < d, a softmax
// over the slots' gates weights their values. The slots are the previous window's kept halves
// (prev_kv / prev_gate [windows, r, d], or none when null), then the current window's rows
// (kv / gate [windows, r, cd], the half starting at column `off`). Gates already hold ape.
// Grid (ceil(d / 256), windows), blockDim.x = 256.
#include "common.cuh"

extern "C" __global__ void compress_pool(const float* __restrict__ kv, const float* __restrict__ gate,
                                         const float* __restrict__ prev_kv,
                                         const float* __restrict__ prev_gate,
                                         float* __restrict__ out, int r, int d, int cd, int off) {
    int e = blockIdx.x * blockDim.x + threadIdx.x, w = blockIdx.y;
    if (e >= d) return;
    const float* cv = kv + (size_t)w * r * cd + off + e;
    const float* cg = gate + (size_t)w * r * cd + off + e;
    float m = -__int_as_float(0x7f800000);
    for (int t = 0; t < r; t++) m = fmaxf(m, cg[(size_t)t * cd]);
    const float* pv = prev_kv ? prev_kv + (size_t)w * r * d + e : 0;
    const float* pg = prev_gate ? prev_gate + (size_t)w * r * d + e : 0;
    if (pg)
        for (int t = 0; t < r; t++) m = fmaxf(m, pg[(size_t)t * d]);
    float den = 0.0f, num = 0.0f;
    if (pg)
        for (int t = 0; t < r; t++) {
            float ex = expf(pg[(size_t)t * d] - m);
            den += ex;
            num += ex * pv[(size_t)t * d];
        }
    for (int t = 0; t < r; t++) {
        float ex = expf(cg[(size_t)t * cd] - m);
        den += ex;
        num += ex * cv[(size_t)t * cd];
    }
    out[(size_t)w * d + e] = num / den;
}
