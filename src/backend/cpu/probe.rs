//! Machine bounds measured in the same run as the kernels (the machines are shared and
//! noisy, so kernel figures are reported as ratios to these): read bandwidth and FMA peak.

use rayon::prelude::*;
use std::time::Instant;

/// Streaming read bandwidth in GB/s: every thread sums its share of a `bytes`-sized buffer
/// (far larger than the caches); best of `reps`.
pub fn read_bandwidth(bytes: usize, reps: usize) -> f64 {
    ReadProbe::new(bytes).best_of(reps)
}

/// The read-bandwidth loop over a buffer kept for repeated passes, so a benchmark can measure
/// the bound right next to each kernel: on a shared machine the bandwidth a neighbour leaves
/// moves within seconds, and a kernel compared with a bound measured a minute earlier reads
/// as that drift.
pub struct ReadProbe {
    buf: Vec<u64>,
}

impl ReadProbe {
    /// A probe over `bytes` (make it far larger than the caches).
    pub fn new(bytes: usize) -> Self {
        ReadProbe {
            buf: (0..(bytes / 8) as u64).collect(),
        }
    }

    /// The best of `reps` passes (at least one): GB/s.
    pub fn best_of(&self, reps: usize) -> f64 {
        (0..reps.max(1)).map(|_| self.pass()).fold(0f64, f64::max)
    }

    /// One pass with all threads: GB/s.
    pub fn pass(&self) -> f64 {
        let n = self.buf.len();
        let chunk = (n / rayon::current_num_threads().max(1) / 8).max(1 << 16);
        let t = Instant::now();
        let s: u64 = self
            .buf
            .par_chunks(chunk)
            .map(sum_chunk)
            .reduce(|| 0, u64::wrapping_add);
        let dt = t.elapsed().as_secs_f64();
        std::hint::black_box(s);
        (8 * n) as f64 / dt / 1e9
    }
}

/// Sum a chunk with the widest loads available, so the loop is limited by memory, not by
/// the adds (a baseline-SSE2 loop can measure the core instead of the bandwidth).
fn sum_chunk(c: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is available (checked).
            return unsafe { sum_chunk_avx2(c) };
        }
    }
    let mut a = [0u64; 4];
    for q in c.chunks_exact(4) {
        for k in 0..4 {
            a[k] = a[k].wrapping_add(q[k]);
        }
    }
    a.iter()
        .chain(&c[c.len() / 4 * 4..])
        .fold(0u64, |x, &y| x.wrapping_add(y))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_chunk_avx2(c: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    let n = c.len() / 16 * 16;
    let mut acc = [_mm256_setzero_si256(); 4];
    let mut i = 0;
    while i < n {
        for (k, a) in acc.iter_mut().enumerate() {
            // SAFETY: i + 4k + 4 <= n <= c.len().
            let v = unsafe { _mm256_loadu_si256(c.as_ptr().add(i + 4 * k) as *const __m256i) };
            *a = _mm256_add_epi64(*a, v);
        }
        i += 16;
    }
    let mut out = [0u64; 4];
    let s = _mm256_add_epi64(
        _mm256_add_epi64(acc[0], acc[1]),
        _mm256_add_epi64(acc[2], acc[3]),
    );
    // SAFETY: `out` holds 4 u64.
    unsafe { _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, s) };
    out.iter()
        .chain(&c[n..])
        .fold(0u64, |x, &y| x.wrapping_add(y))
}

/// Peak fp32 FMA throughput in GFLOP/s (2 flops per FMA) over all threads, ~`seconds` long.
pub fn fma_peak(seconds: f64) -> f64 {
    loop_peak(seconds, 2_000_000, fma_flops_per_iter(), fma_loop)
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

/// Peak GFLOP/s (2 per multiply-add) of bf16 dot-product instructions (`vdpbf16ps`, 32
/// multiply-adds each) on all threads, or None where the CPU has none. The bound for the
/// prefill GEMM when it runs on them.
pub fn bf16_dot_peak(seconds: f64) -> Option<f64> {
    if !super::bf16dot::available() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the CPU has AVX-512 BF16 (checked by available()).
        let f = |n| unsafe { dp_loop(n) };
        Some(loop_peak(seconds, 2_000_000, 12.0 * 32.0 * 2.0, f))
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// Peak GOP/s (2 per multiply-add) of int8 dot-product instructions (`vpdpbusd`, 64
/// multiply-adds each) on all threads, or None where the CPU has none.
pub fn int8_dot_peak(seconds: f64) -> Option<f64> {
    if !super::q8dot::available() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the CPU has AVX-512 VNNI (checked by available()).
        let f = |n| unsafe { dpbusd_loop(n) };
        Some(loop_peak(seconds, 2_000_000, 12.0 * 64.0 * 2.0, f))
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// Operations per second (in 1e9) of `f(n)`, a loop of `ops_per_iter` per iteration, on all
/// threads for about `seconds`: calibrated on one thread over `iters`.
fn loop_peak(seconds: f64, iters: u64, ops_per_iter: f64, f: impl Fn(u64) -> f32 + Sync) -> f64 {
    let threads = rayon::current_num_threads();
    let t = Instant::now();
    std::hint::black_box(f(iters));
    let per_iter = t.elapsed().as_secs_f64() / iters as f64;
    let n = ((seconds / per_iter) as u64).max(1000);
    let t = Instant::now();
    let s: f32 = (0..threads).into_par_iter().map(|_| f(n)).sum();
    let dt = t.elapsed().as_secs_f64();
    std::hint::black_box(s);
    n as f64 * threads as f64 * ops_per_iter / dt / 1e9
}

/// 12 independent chains of `vpdpbusd`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn dpbusd_loop(n: u64) -> f32 {
    use std::arch::x86_64::*;
    let a = _mm512_set1_epi8(1);
    let b = _mm512_set1_epi8(1);
    let mut acc = [_mm512_setzero_si512(); 12];
    for _ in 0..n {
        for v in acc.iter_mut() {
            *v = _mm512_dpbusd_epi32(*v, a, b);
        }
    }
    let mut s = acc[0];
    for v in &acc[1..] {
        s = _mm512_add_epi32(s, *v);
    }
    _mm512_reduce_add_epi32(s) as f32
}

/// 12 independent chains of `vdpbf16ps`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dp_loop(n: u64) -> f32 {
    use std::arch::x86_64::*;
    // SAFETY: plain-data vector reinterpretation.
    let bh = |v: __m512i| unsafe { std::mem::transmute::<__m512i, __m512bh>(v) };
    let a = bh(_mm512_set1_epi16(0x3F80)); // 1.0
    let b = bh(_mm512_set1_epi16(0x3400)); // 2^-23: the sums stay finite
    let mut acc = [_mm512_setzero_ps(); 12];
    for _ in 0..n {
        for v in acc.iter_mut() {
            *v = _mm512_dpbf16_ps(*v, a, b);
        }
    }
    let mut s = acc[0];
    for v in &acc[1..] {
        s = _mm512_add_ps(s, *v);
    }
    _mm512_reduce_add_ps(s)
}

#[cfg(test)]
mod tests {
    #[test]
    fn chunk_sums_agree() {
        let v: Vec<u64> = (0..1003u64).map(|i| i * 2654435761).collect();
        let want = v.iter().fold(0u64, |a, &b| a.wrapping_add(b));
        assert_eq!(super::sum_chunk(&v), want);
    }
}
