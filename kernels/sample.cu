// Sampling helpers over the vocabulary, one block per row of logits (blockDim.x = 1024).
#include "common.cuh"

// Greedy: index of the largest logit (lowest index on ties).
extern "C" __global__ void argmax(const float* __restrict__ logits, int n, int* __restrict__ out) {
    int i = block_argmax(logits + (size_t)blockIdx.x * n, n);
    if (threadIdx.x == 0) out[blockIdx.x] = i;
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
