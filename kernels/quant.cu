// The reference numerics' QAT roundings (spec 4.4), in place, matching the CPU's bit
// arithmetic: E4M3 with a power-of-two scale per block, and for the indexer's queries and
// keys a Hadamard rotation followed by E2M1 in blocks of 32.
#include "common.cuh"

// Smallest E8M0 byte s with 2^(s-127) >= x, for a positive normal x; 0 otherwise.
__device__ __forceinline__ u32 e8m0_ceil(float x) {
    if (!(x > 0.0f)) return 0;
    u32 b = __float_as_uint(x);
    u32 exp = (b >> 23) & 0xff;
    if (exp == 0) return 0;  // subnormal: the smallest scale
    int e = (int)exp - 127 + ((b & 0x7fffff) != 0);
    return (u32)min(max(e + 127, 0), 254);
}

// Round to the E4M3FN grid, saturating at 448 (RNE; bit-identical to the CPU's round_e4m3).
__device__ __forceinline__ float round_e4m3(float x) {
    float a = fabsf(x);
    float r;
    if (a != a) return __uint_as_float(0x7fc00000u);
    if (a >= 448.0f) {
        r = 448.0f;
    } else if (a < 0.015625f) {
        const float M = 12582912.0f;  // 1.5 * 2^23: round half to even on the 2^-9 grid
        r = (__fadd_rn(__fmul_rn(a, 512.0f), M) - M) / 512.0f;
    } else {
        u32 b = __float_as_uint(a);
        u32 half = (1u << 19) - 1 + ((b >> 20) & 1);
        r = fminf(__uint_as_float((b + half) & ~((1u << 20) - 1)), 448.0f);
    }
    return signbit(x) ? -r : r;
}

// E2M1 nearest value, ties to the even code: 0, .5, 1, 1.5, 2, 3, 4, 6 (|x| <= 6).
__device__ __forceinline__ float round_e2m1(float x) {
    float a = fminf(fabsf(x), 6.0f), r;
    if (a <= 0.25f) r = 0.0f;
    else if (a < 0.75f) r = 0.5f;
    else if (a <= 1.25f) r = 1.0f;
    else if (a < 1.75f) r = 1.5f;
    else if (a <= 2.5f) r = 2.0f;
    else if (a < 3.5f) r = 3.0f;
    else if (a <= 5.0f) r = 4.0f;
    else r = 6.0f;
    return (signbit(x) && r != 0.0f) ? -r : r;
}

// One warp per block of `block` values (block <= 1024, a multiple of 32 or the row tail):
// blocks of the first `len` values of each row of `width`. Grid (ceil(len / block), rows),
// blockDim.x = 32.
extern "C" __global__ void quant_e4m3(float* x, int width, int len, int block) {
    float* p = x + (size_t)blockIdx.y * width + (size_t)blockIdx.x * block;
    int n = min(block, len - (int)blockIdx.x * block);
    float amax = 1e-4f;
    for (int i = threadIdx.x; i < n; i += WARP) amax = fmaxf(amax, fabsf(p[i]));
    amax = warp_max(amax);
    float s = e8m0_to_f32((u8)e8m0_ceil(amax / 448.0f));
    float inv = 1.0f / s;
    for (int i = threadIdx.x; i < n; i += WARP)
        p[i] = round_e4m3(fminf(fmaxf(p[i] * inv, -448.0f), 448.0f)) * s;
}

// Hadamard (Sylvester order, orthonormal) then E2M1 per 32 values, one row per block of n
// threads (n a power of two, at most 1024). Grid rows.
extern "C" __global__ void hadamard_e2m1(float* x, int n) {
    __shared__ float v[1024];
    float* row = x + (size_t)blockIdx.x * n;
    int i = threadIdx.x;
    v[i] = row[i];
    __syncthreads();
    for (int h = 1; h < n; h *= 2) {
        float a = 0.0f, b = 0.0f;
        int lo = (i / (2 * h)) * 2 * h + (i % h);  // the pair this thread's element is in
        bool first = (i % (2 * h)) < h;
        a = v[lo];
        b = v[lo + h];
        __syncthreads();
        v[i] = first ? a + b : a - b;
        __syncthreads();
    }
    float y = v[i] * (1.0f / sqrtf((float)n));
    // E2M1 in 32-blocks: each warp is one block.
    float amax = warp_max(fabsf(y));
    amax = fmaxf(amax, 6.0f * 1.1754944e-38f);  // 6 * 2^-126
    float s = e8m0_to_f32((u8)e8m0_ceil(amax / 6.0f));
    row[i] = round_e2m1(fminf(fmaxf(y / s, -6.0f), 6.0f)) * s;
}

// 2^k for -149 <= k <= 127, from its bits (exact; as formats::pow2).
__device__ __forceinline__ float pow2i(int k) {
    return k >= -126 ? __uint_as_float((u32)(k + 127) << 23) : __uint_as_float(1u << (k + 149));
}

// The smallest k with amax <= 127 * 2^k, at least -126 (formats::i8_block_exponent).
__device__ __forceinline__ int i8_block_exponent(float amax) {
    if (!isfinite(amax)) return 127;
    u32 b = __float_as_uint(fabsf(amax));
    int exp = (int)(b >> 23);
    if (exp == 0) return -126;
    return max(exp - 127 - 6 + ((b & 0x7fffff) > 0x7e0000 ? 1 : 0), -126);
}

// The fast numerics' int8 grid: per block, values to q * 2^k with integer |q| <= 127 (ties
// to even), k from the block's largest magnitude. Launched as quant_e4m3 is.
extern "C" __global__ void quant_i8(float* x, int width, int len, int block) {
    float* p = x + (size_t)blockIdx.y * width + (size_t)blockIdx.x * block;
    int n = min(block, len - (int)blockIdx.x * block);
    float amax = 0.0f;
    for (int i = threadIdx.x; i < n; i += WARP) amax = fmaxf(amax, fabsf(p[i]));
    amax = warp_max(amax);
    int k = i8_block_exponent(amax);
    float s = pow2i(k), inv = pow2i(-k);
    for (int i = threadIdx.x; i < n; i += WARP) p[i] = __fmul_rn(rintf(__fmul_rn(p[i], inv)), s);
}
