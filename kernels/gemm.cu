// Matrix-matrix products for prefill and batched experts: y[t, r] = W[r, :] . x[t, :] for
// t input rows, weights dequantized from their stored format as tiles are loaded into shared
// memory (each weight byte is read once per 64 tokens). Tile 64 rows x 64 tokens x 32 columns,
// 256 threads, 4x4 outputs each. Launch: blockDim.x = 256,
// gridDim = (ceil(rows / 64), ceil(t / 64)). cols % 32 == 0.
#include "common.cuh"

#define BM 64
#define BN 64
#define BK 32

enum { FMT_FP4 = 0, FMT_FP8 = 1, FMT_BF16 = 2 };

// 8 consecutive weights W[r, c .. c+8] (c % 8 == 0) as floats.
template <int FMT>
__device__ __forceinline__ void load8(const u8* w, const u8* scales, int r, int c, int cols,
                                      float out[8]) {
    if (FMT == FMT_FP4) {
        u32 q = *(const u32*)(w + (size_t)r * (cols / 2) + c / 2);
        float s = e8m0_to_f32(scales[(size_t)r * (cols / FP4_GROUP) + c / FP4_GROUP]);
#pragma unroll
        for (int k = 0; k < 8; k++) out[k] = e2m1_to_f32((q >> (4 * k)) & 15) * s;
    } else if (FMT == FMT_FP8) {
        const u32* p = (const u32*)(w + (size_t)r * cols + c);
        u32 a = p[0], b = p[1];
        int bc = (cols + FP8_BLOCK - 1) / FP8_BLOCK;
        float s = e8m0_to_f32(scales[(size_t)(r / FP8_BLOCK) * bc + c / FP8_BLOCK]);
#pragma unroll
        for (int k = 0; k < 4; k++) {
            out[k] = e4m3_to_f32((a >> (8 * k)) & 255) * s;
            out[4 + k] = e4m3_to_f32((b >> (8 * k)) & 255) * s;
        }
    } else {
        const u32* p = (const u32*)(w + 2 * ((size_t)r * cols + c));
#pragma unroll
        for (int k = 0; k < 4; k++) {
            u32 v = p[k];
            out[2 * k] = __uint_as_float(v << 16);
            out[2 * k + 1] = __uint_as_float(v & 0xffff0000u);
        }
    }
}

template <int FMT>
__device__ void gemm_tile(const u8* __restrict__ w, const u8* __restrict__ scales,
                          const float* __restrict__ x, float* __restrict__ y, int rows, int cols,
                          int t) {
    __shared__ float ws[BK][BM + 4];
    __shared__ float xs[BK][BN + 4];
    int r0 = blockIdx.x * BM, t0 = blockIdx.y * BN;
    int tid = threadIdx.x;
    int tr = (tid / 16) * 4, tt = (tid % 16) * 4;  // this thread's 4 rows x 4 tokens
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;
    // Loader roles: 64 rows x 4 runs of 8 columns = 256 threads.
    int lr = tid / 4, lc = (tid % 4) * 8;
    for (int k0 = 0; k0 < cols; k0 += BK) {
        float v[8];
        if (r0 + lr < rows) {
            load8<FMT>(w, scales, r0 + lr, k0 + lc, cols, v);
        } else {
#pragma unroll
            for (int k = 0; k < 8; k++) v[k] = 0.0f;
        }
#pragma unroll
        for (int k = 0; k < 8; k++) ws[lc + k][lr] = v[k];
        if (t0 + lr < t) {
            const float4* xp = (const float4*)(x + (size_t)(t0 + lr) * cols + k0 + lc);
            float4 a = xp[0], b = xp[1];
            xs[lc + 0][lr] = a.x; xs[lc + 1][lr] = a.y; xs[lc + 2][lr] = a.z; xs[lc + 3][lr] = a.w;
            xs[lc + 4][lr] = b.x; xs[lc + 5][lr] = b.y; xs[lc + 6][lr] = b.z; xs[lc + 7][lr] = b.w;
        } else {
#pragma unroll
            for (int k = 0; k < 8; k++) xs[lc + k][lr] = 0.0f;
        }
        __syncthreads();
#pragma unroll 8
        for (int k = 0; k < BK; k++) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; i++) a[i] = ws[k][tr + i];
#pragma unroll
            for (int j = 0; j < 4; j++) b[j] = xs[k][tt + j];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int r = r0 + tr + i, tk = t0 + tt + j;
            if (r < rows && tk < t) y[(size_t)tk * rows + r] = acc[i][j];
        }
}

extern "C" __global__ void gemm_fp4(const u8* w, const u8* scales, const float* x, float* y,
                                    int rows, int cols, int t) {
    gemm_tile<FMT_FP4>(w, scales, x, y, rows, cols, t);
}

extern "C" __global__ void gemm_fp8(const u8* w, const u8* scales, const float* x, float* y,
                                    int rows, int cols, int t) {
    gemm_tile<FMT_FP8>(w, scales, x, y, rows, cols, t);
}

extern "C" __global__ void gemm_bf16(const u8* w, const float* x, float* y, int rows, int cols,
                                     int t) {
    gemm_tile<FMT_BF16>(w, (const u8*)0, x, y, rows, cols, t);
}
