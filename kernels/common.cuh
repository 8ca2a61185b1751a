// Shared helpers for every kernel: the stored number formats and warp/block reductions.
// No CUDA headers are included (NVRTC compiles these with its built-ins only), so the file
// works with any toolkit version and on every architecture from sm_80 up.
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

#define FP4_GROUP 32
#define FP8_BLOCK 128
#define WARP 32

// E8M0 scale: 2^(s-127); 0 is 2^-127 (an f32 subnormal), 255 is NaN.
__device__ __forceinline__ float e8m0_to_f32(u8 s) {
    if (s == 0) return __uint_as_float(0x00400000u);
    if (s == 255) return __uint_as_float(0x7fc00000u);
    return __uint_as_float((u32)s << 23);
}

// E4M3FN: 1 sign, 4 exponent (bias 7), 3 mantissa; 0x7F/0xFF are NaN, no infinities.
__device__ __forceinline__ float e4m3_to_f32(u8 c) {
    u32 sign = (u32)(c & 0x80) << 24;
    u32 e = (c >> 3) & 15, m = c & 7;
    if (e == 15 && m == 7) return __uint_as_float(0x7fc00000u);
    if (e == 0) {
        float v = (float)m * 0.001953125f;  // m * 2^-9, exact
        return __uint_as_float(__float_as_uint(v) | sign);
    }
    return __uint_as_float(sign | ((e + 120) << 23) | (m << 20));
}

// E2M1 nibble (bit 3 = sign): 0, 0.5, 1, 1.5, 2, 3, 4, 6.
__device__ __forceinline__ float e2m1_to_f32(u32 n) {
    // Magnitudes times 2 packed as bytes: 0,1,2,3,4,6,8,12.
    const unsigned long long twice = 0x0c08060403020100ull;
    float v = (float)((twice >> (8 * (n & 7))) & 0xff) * 0.5f;
    return (n & 8) ? -v : v;
}

__device__ __forceinline__ float bf16_to_f32(u16 b) { return __uint_as_float((u32)b << 16); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = WARP / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = WARP / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float part[32];
    v = warp_sum(v);
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP;
    __syncthreads();
    if (lane == 0) part[w] = v;
    __syncthreads();
    int nw = blockDim.x / WARP;
    v = lane < nw ? part[lane] : 0.0f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v) {
    __shared__ float part[32];
    v = warp_max(v);
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP;
    __syncthreads();
    if (lane == 0) part[w] = v;
    __syncthreads();
    int nw = blockDim.x / WARP;
    v = lane < nw ? part[lane] : -__int_as_float(0x7f800000);
    return warp_max(v);
}

// Index of the largest of v[0..n) over the block (lowest index on ties), to every thread.
__device__ __forceinline__ int block_argmax(const float* v, int n) {
    __shared__ float wv[32];
    __shared__ int wi[32];
    float best = -__int_as_float(0x7f800000);
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float x = v[i];
        if (x > best || (x == best && i < bi)) { best = x; bi = i; }
    }
    for (int o = WARP / 2; o > 0; o /= 2) {
        float ov = __shfl_xor_sync(0xffffffffu, best, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > best || (ov == best && oi < bi)) { best = ov; bi = oi; }
    }
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP;
    __syncthreads();
    if (lane == 0) { wv[w] = best; wi[w] = bi; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int q = 1; q < (int)(blockDim.x / WARP); q++)
            if (wv[q] > wv[0] || (wv[q] == wv[0] && wi[q] < wi[0])) { wv[0] = wv[q]; wi[0] = wi[q]; }
    }
    __syncthreads();
    return wi[0];
}
