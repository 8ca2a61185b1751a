// Lightning indexer (spec 5.7): score(i) = sum_h w[h] * ReLU(q[h, :] . K[i, :]) for every
// visible compressed row i, then the top k rows in ascending index order.
#include "common.cuh"

// One warp per key row. Grid ceil(n / 8), blockDim.x = 256. q [ih, ihd], w [ih], keys [n, ihd].
extern "C" __global__ void indexer_scores(const float* __restrict__ q, const float* __restrict__ w,
                                          const float* __restrict__ keys, float* __restrict__ out,
                                          int n, int ih, int ihd) {
    int i = blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP;
    int lane = threadIdx.x % WARP;
    if (i >= n) return;
    const float* k = keys + (size_t)i * ihd;
    float s = 0.0f;
    for (int h = 0; h < ih; h++) {
        const float* qh = q + (size_t)h * ihd;
        float d = 0.0f;
        for (int c = lane; c < ihd; c += WARP) d += qh[c] * k[c];
        d = warp_sum(d);
        s += w[h] * fmaxf(d, 0.0f);
    }
    if (lane == 0) out[i] = s;
}

// Order-preserving key of a float (larger value, larger key); NaN ranks lowest.
__device__ __forceinline__ u32 fkey(float v) {
    u32 b = __float_as_uint(v);
    if (v != v) return 0;
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Exclusive prefix sum of one value per thread over the block (Hillis-Steele in `tmp`, one
// slot per thread).
__device__ int exclusive_scan(int v, int* tmp) {
    int tid = threadIdx.x;
    __syncthreads();
    tmp[tid] = v;
    __syncthreads();
    for (int off = 1; off < (int)blockDim.x; off <<= 1) {
        int u = tid >= off ? tmp[tid - off] : 0;
        __syncthreads();
        tmp[tid] += u;
        __syncthreads();
    }
    return tmp[tid] - v;
}

// The k largest of scores[0..n) (ties to the lower index), written to out[0..k) in ascending
// index order. One block of 1024 threads: a radix select finds the k-th largest key byte by
// byte, then a block-wide scan writes the chosen indices in order. k <= n.
extern "C" __global__ void topk_select(const float* __restrict__ scores, int n, int k,
                                       int* __restrict__ out) {
    __shared__ u32 hist[256];
    __shared__ u32 prefix, prefix_mask;
    __shared__ int remaining;
    __shared__ int counts[1024];
    int tid = threadIdx.x, nt = blockDim.x;
    if (tid == 0) { prefix = 0; prefix_mask = 0; remaining = k; }
    __syncthreads();
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = tid; b < 256; b += nt) hist[b] = 0;
        __syncthreads();
        for (int i = tid; i < n; i += nt) {
            u32 key = fkey(scores[i]);
            if ((key & prefix_mask) == prefix) atomicAdd(&hist[(key >> shift) & 255], 1u);
        }
        __syncthreads();
        if (tid == 0) {
            int need = remaining;
            int b = 255;
            for (; b > 0; b--) {
                if ((int)hist[b] >= need) break;
                need -= hist[b];
            }
            prefix |= (u32)b << shift;
            prefix_mask |= 255u << shift;
            remaining = need;  // how many with key == threshold (so far) are still needed
        }
        __syncthreads();
    }
    u32 thr = prefix;
    int need_eq = remaining;  // elements equal to thr to take, lowest indices first
    // Contiguous segments per thread keep index order through the scan.
    int seg = (n + nt - 1) / nt, lo = tid * seg, hi = min(n, lo + seg);
    int gt = 0, eq = 0;
    for (int i = lo; i < hi; i++) {
        u32 key = fkey(scores[i]);
        gt += key > thr;
        eq += key == thr;
    }
    // Rank the equal elements, then place every thread's chosen ones.
    int eq_before = exclusive_scan(eq, counts);
    int take_eq = max(0, min(eq, need_eq - eq_before));
    int pos = exclusive_scan(gt + take_eq, counts);
    for (int i = lo; i < hi; i++) {
        u32 key = fkey(scores[i]);
        if (key > thr) {
            out[pos++] = i;
        } else if (key == thr && take_eq > 0) {
            out[pos++] = i;
            take_eq--;
        }
    }
}
