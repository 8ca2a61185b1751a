// MoE routing for one token per block (spec 5.10): scores = sqrt(softplus(logits)); the top
// k of scores + bias (bias may be null) are chosen, or the given hash-routed experts; their
// unbiased scores, normalised to sum 1 and times `scale`, are the weights.
// blockDim.x = 256, one block per token. n_experts <= 1024, k <= 16.
#include "common.cuh"

__device__ __forceinline__ float softplus(float v) { return v > 20.0f ? v : log1pf(expf(v)); }

extern "C" __global__ void route_topk(const float* __restrict__ logits,
                                      const float* __restrict__ bias,
                                      const int* __restrict__ hashed,  // [tokens, k] or null
                                      int n_experts, int k, float scale,
                                      int* __restrict__ experts, float* __restrict__ weights) {
    __shared__ float score[1024];
    __shared__ float key[1024];
    __shared__ int chosen[16];
    const float* l = logits + (size_t)blockIdx.x * n_experts;
    for (int i = threadIdx.x; i < n_experts; i += blockDim.x) {
        float s = sqrtf(softplus(l[i]));
        score[i] = s;
        key[i] = bias ? s + bias[i] : s;
    }
    __syncthreads();
    for (int m = 0; m < k; m++) {
        if (hashed) {
            if (threadIdx.x == 0) chosen[m] = hashed[(size_t)blockIdx.x * k + m];
            __syncthreads();
            continue;
        }
        // Arg-max with the lowest index on ties, as a stable sort would pick.
        int bi = block_argmax(key, n_experts);
        if (threadIdx.x == 0) {
            chosen[m] = bi;
            key[bi] = -__int_as_float(0x7f800000);
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        float sum = 1e-20f;
        for (int m = 0; m < k; m++) sum += score[chosen[m]];
        for (int m = 0; m < k; m++) {
            experts[(size_t)blockIdx.x * k + m] = chosen[m];
            weights[(size_t)blockIdx.x * k + m] = score[chosen[m]] / sum * scale;
        }
    }
}
