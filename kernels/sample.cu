// Sampling helpers over the vocabulary, one block per row of logits (blockDim.x = 1024).
#include "common.cuh"

// Greedy: index of the largest logit (lowest index on ties).
extern "C" __global__ void argmax(const float* __restrict__ logits, int n, int* __restrict__ out) {
    const float* l = logits + (size_t)blockIdx.x * n;
    float best = -__int_as_float(0x7f800000);
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = l[i];
        if (v > best || (v == best && i < bi)) { best = v; bi = i; }
    }
    for (int o = WARP / 2; o > 0; o /= 2) {
        float ov = __shfl_xor_sync(0xffffffffu, best, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > best || (ov == best && oi < bi)) { best = ov; bi = oi; }
    }
    __shared__ float wv[32];
    __shared__ int wi[32];
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP;
    if (lane == 0) { wv[w] = best; wi[w] = bi; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int q = 1; q < (int)(blockDim.x / WARP); q++)
            if (wv[q] > wv[0] || (wv[q] == wv[0] && wi[q] < wi[0])) { wv[0] = wv[q]; wi[0] = wi[q]; }
        out[blockIdx.x] = wi[0];
    }
}

// probs = softmax(logits / temperature), in place.
extern "C" __global__ void softmax_temp(float* logits, int n, float temperature) {
    float* l = logits + (size_t)blockIdx.x * n;
    float inv_t = 1.0f / temperature;
    float m = -__int_as_float(0x7f800000);
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, l[i] * inv_t);
    m = block_max(m);
    float s = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float e = expf(l[i] * inv_t - m);
        l[i] = e;
        s += e;
    }
    s = block_sum(s);
    float inv = 1.0f / s;
    for (int i = threadIdx.x; i < n; i += blockDim.x) l[i] *= inv;
}
