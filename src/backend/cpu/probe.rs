//! Machine bounds measured in the same run as the kernels (the machines are shared and
//! noisy, so kernel figures are reported as ratios to these): read bandwidth and FMA peak.

use rayon::prelude::*;
use std::time::Instant;

/// Streaming read bandwidth in GB/s: every thread sums its share of a `bytes`-sized buffer
/// (far larger than the caches); best of `reps`.
pub fn read_bandwidth(bytes: usize, reps: usize) -> f64 {
    let n = bytes / 8;
    let buf: Vec<u64> = (0..n as u64).collect();
    let chunk = (n / rayon::current_num_threads().max(1) / 8).max(1 << 16);
    let mut best = 0f64;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        let s: u64 = buf
            .par_chunks(chunk)
            .map(|c| {
                // Four independent lanes so the adds are not the bottleneck.
                let mut a = [0u64; 4];
                for q in c.chunks_exact(4) {
                    for k in 0..4 {
                        a[k] = a[k].wrapping_add(q[k]);
                    }
                }
                a[0].wrapping_add(a[1])
                    .wrapping_add(a[2])
                    .wrapping_add(a[3])
            })
            .reduce(|| 0, u64::wrapping_add);
        let dt = t.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max(bytes as f64 / dt / 1e9);
    }
    best
}

/// Peak fp32 FMA throughput in GFLOP/s (2 flops per FMA) over all threads, ~`seconds` long.
pub fn fma_peak(seconds: f64) -> f64 {
    let threads = rayon::current_num_threads();
    let iters = 20_000_000u64;
    let flops_per_iter = fma_flops_per_iter();
    // Calibrate on one thread, then run all threads for about `seconds`.
    let t = Instant::now();
    std::hint::black_box(fma_loop(iters / 10));
    let per_iter = t.elapsed().as_secs_f64() / (iters / 10) as f64;
    let n = ((seconds / per_iter) as u64).max(1000);
    let t = Instant::now();
    let s: f32 = (0..threads).into_par_iter().map(|_| fma_loop(n)).sum();
    let dt = t.elapsed().as_secs_f64();
    std::hint::black_box(s);
    (n as f64 * threads as f64 * flops_per_iter) / dt / 1e9
}

fn fma_flops_per_iter() -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return 10.0 * 8.0 * 2.0;
        }
    }
    10.0 * 2.0
}

fn fma_loop(n: u64) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { fma_loop_avx2(n) };
        }
    }
    let mut a = [1.0f32; 10];
    for _ in 0..n {
        for v in a.iter_mut() {
            *v = v.mul_add(0.999_999, 1e-7);
        }
    }
    a.iter().sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_loop_avx2(n: u64) -> f32 {
    use std::arch::x86_64::*;
    let m = _mm256_set1_ps(0.999_999);
    let c = _mm256_set1_ps(1e-7);
    let mut a = [_mm256_set1_ps(1.0); 10];
    for _ in 0..n {
        for v in a.iter_mut() {
            *v = _mm256_fmadd_ps(*v, m, c);
        }
    }
    let mut out = [0f32; 8];
    let mut s = a[0];
    for v in &a[1..] {
        s = _mm256_add_ps(s, *v);
    }
    // SAFETY: out has 8 f32 slots.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
    out.iter().sum()
}
