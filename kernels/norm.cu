// RMSNorm over rows: y[r, :] = w * x[r, :] / sqrt(mean(x[r, :]^2) + eps); `w` may be null
// (unweighted). One block per row, blockDim.x = 256. In place when y == x.
#include "common.cuh"

extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w,
                                    float* y, int n, float eps) {
    const float* xr = x + (size_t)blockIdx.x * n;
    float* yr = y + (size_t)blockIdx.x * n;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss);
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = xr[i] * r;
        yr[i] = w ? w[i] * v : v;
    }
}
