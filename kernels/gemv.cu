// Matrix-vector products for decode, reading the stored formats: y[t, r] = W[r, :] . x[t, :].
// One warp per weight row; blockIdx.y = input row t (t is small at decode). Launch with
// blockDim.x = 256 (8 rows per block) and gridDim = (ceil(rows / 8), t).
#include "common.cuh"

// FP4: `packed` [rows, cols/2] (low nibble = even column), `scales` [rows, cols/32] E8M0.
// cols % 32 == 0. Each lane takes whole 32-column groups (16 bytes, one uint4 load).
extern "C" __global__ void gemv_fp4(const u8* __restrict__ packed, const u8* __restrict__ scales,
                                    const float* __restrict__ x, float* __restrict__ y,
                                    int rows, int cols) {
    int r = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (r >= rows) return;
    const float* xt = x + (size_t)blockIdx.y * cols;
    int groups = cols / FP4_GROUP;
    const uint4* prow = (const uint4*)(packed + (size_t)r * (cols / 2));
    const u8* srow = scales + (size_t)r * groups;
    float acc = 0.0f;
    for (int g = lane; g < groups; g += WARP) {
        uint4 q = prow[g];
        u32 words[4] = {q.x, q.y, q.z, q.w};
        const float4* xv = (const float4*)(xt + g * FP4_GROUP);
        float part = 0.0f;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            u32 w = words[k];  // 8 nibbles = columns 8k .. 8k+8 of the group
            float4 a = xv[2 * k], b = xv[2 * k + 1];
            part += e2m1_to_f32(w & 15) * a.x + e2m1_to_f32((w >> 4) & 15) * a.y +
                    e2m1_to_f32((w >> 8) & 15) * a.z + e2m1_to_f32((w >> 12) & 15) * a.w +
                    e2m1_to_f32((w >> 16) & 15) * b.x + e2m1_to_f32((w >> 20) & 15) * b.y +
                    e2m1_to_f32((w >> 24) & 15) * b.z + e2m1_to_f32(w >> 28) * b.w;
        }
        acc += part * e8m0_to_f32(srow[g]);
    }
    acc = warp_sum(acc);
    if (lane == 0) y[(size_t)blockIdx.y * rows + r] = acc;
}

// FP8: `codes` [rows, cols] E4M3, `scales` [ceil(rows/128), ceil(cols/128)] E8M0.
// cols % 16 == 0. Each lane takes 16 codes (one uint4) per step.
extern "C" __global__ void gemv_fp8(const u8* __restrict__ codes, const u8* __restrict__ scales,
                                    const float* __restrict__ x, float* __restrict__ y,
                                    int rows, int cols) {
    int r = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (r >= rows) return;
    const float* xt = x + (size_t)blockIdx.y * cols;
    int bc = (cols + FP8_BLOCK - 1) / FP8_BLOCK;
    const u8* srow = scales + (size_t)(r / FP8_BLOCK) * bc;
    const uint4* crow = (const uint4*)(codes + (size_t)r * cols);
    float acc = 0.0f;
    for (int c = lane; c < cols / 16; c += WARP) {
        uint4 q = crow[c];
        u32 words[4] = {q.x, q.y, q.z, q.w};
        const float4* xv = (const float4*)(xt + c * 16);
        float part = 0.0f;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            u32 w = words[k];
            float4 a = xv[k];
            part += e4m3_to_f32(w & 255) * a.x + e4m3_to_f32((w >> 8) & 255) * a.y +
                    e4m3_to_f32((w >> 16) & 255) * a.z + e4m3_to_f32(w >> 24) * a.w;
        }
        acc += part * e8m0_to_f32(srow[(c * 16) / FP8_BLOCK]);
    }
    acc = warp_sum(acc);
    if (lane == 0) y[(size_t)blockIdx.y * rows + r] = acc;
}

// BF16: `data` [rows, cols] little-endian bf16 (head, router, compressors). cols % 8 == 0.
extern "C" __global__ void gemv_bf16(const u16* __restrict__ data, const float* __restrict__ x,
                                     float* __restrict__ y, int rows, int cols) {
    int r = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (r >= rows) return;
    const float* xt = x + (size_t)blockIdx.y * cols;
    const uint4* row = (const uint4*)(data + (size_t)r * cols);
    float acc = 0.0f;
    for (int c = lane; c < cols / 8; c += WARP) {
        uint4 q = row[c];
        u32 words[4] = {q.x, q.y, q.z, q.w};
        const float4* xv = (const float4*)(xt + c * 8);
        float4 a = xv[0], b = xv[1];
        float xs[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
        for (int k = 0; k < 4; k++) {
            acc += __uint_as_float(words[k] << 16) * xs[2 * k] +
                   __uint_as_float(words[k] & 0xffff0000u) * xs[2 * k + 1];
        }
    }
    acc = warp_sum(acc);
    if (lane == 0) y[(size_t)blockIdx.y * rows + r] = acc;
}
