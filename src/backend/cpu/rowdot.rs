//! Fused dequantize-and-dot of one weight row with an f32 vector, straight from the stored
//! bytes (no scratch row): the matrix-vector (decode) kernels. Runtime dispatch picks AVX2+FMA
//! (+F16C for FP8) where the CPU has it; the portable versions are the reference the SIMD
//! paths are tested against (same math, different summation order: equal within a few ulp
//! of the row's magnitude).

use crate::model::formats::{E2M1_TABLE, FP4_GROUP, FP8_BLOCK, e4m3_to_f32, e8m0_to_f32};

/// Σ_c W[c]·x[c] for one FP4 row: `packed` cols/2 bytes (low nibble = even column), one E8M0
/// scale per 32 columns.
pub fn fp4_row_dot(packed: &[u8], scales: &[u8], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is available (checked); slices are bounds-checked inside.
            return unsafe { x86::fp4_row_dot_avx512(packed, scales, x) };
        }
        if has_avx2_fma() {
            // SAFETY: AVX2 and FMA are available (checked); slices are bounds-checked inside.
            return unsafe { x86::fp4_row_dot_avx2(packed, scales, x) };
        }
    }
    fp4_row_dot_portable(packed, scales, x)
}

/// Σ_c W[c]·x[c] for one FP8 row: E4M3 codes and the row's block scales (one per 128 columns).
pub fn fp8_row_dot(codes: &[u8], scale_row: &[u8], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if codes.len().is_multiple_of(16)
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx2")
        {
            // SAFETY: AVX-512F and AVX2 are available (checked).
            return unsafe { x86::fp8_row_dot_avx512(codes, scale_row, x) };
        }
        if codes.len().is_multiple_of(16) && has_avx2_fma() && std::is_x86_feature_detected!("f16c")
        {
            // SAFETY: AVX2, FMA and F16C are available (checked).
            return unsafe { x86::fp8_row_dot_avx2(codes, scale_row, x) };
        }
    }
    fp8_row_dot_portable(codes, scale_row, x)
}

/// Σ_c W[c]·x[c] for one BF16 row (little-endian bytes).
pub fn bf16_row_dot(bytes: &[u8], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if bytes.len().is_multiple_of(32) && std::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is available (checked).
            return unsafe { x86::bf16_row_dot_avx512(bytes, x) };
        }
        if bytes.len().is_multiple_of(32) && has_avx2_fma() {
            // SAFETY: AVX2 and FMA are available (checked).
            return unsafe { x86::bf16_row_dot_avx2(bytes, x) };
        }
    }
    bf16_row_dot_portable(bytes, x)
}

pub fn bf16_row_dot_portable(bytes: &[u8], x: &[f32]) -> f32 {
    bytes
        .chunks_exact(2)
        .zip(x)
        .map(|(b, &v)| crate::model::formats::bf16_to_f32(u16::from_le_bytes([b[0], b[1]])) * v)
        .sum()
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

pub fn fp4_row_dot_portable(packed: &[u8], scales: &[u8], x: &[f32]) -> f32 {
    let mut total = 0f32;
    for (g, (ps, xs)) in packed
        .chunks(FP4_GROUP / 2)
        .zip(x.chunks(FP4_GROUP))
        .enumerate()
    {
        let mut acc = 0f32;
        for (k, &b) in ps.iter().enumerate() {
            acc += E2M1_TABLE[(b & 0x0F) as usize] * xs[2 * k]
                + E2M1_TABLE[(b >> 4) as usize] * xs[2 * k + 1];
        }
        total += acc * e8m0_to_f32(scales[g]);
    }
    total
}

pub fn fp8_row_dot_portable(codes: &[u8], scale_row: &[u8], x: &[f32]) -> f32 {
    let mut total = 0f32;
    for (b, (cs, xs)) in codes.chunks(FP8_BLOCK).zip(x.chunks(FP8_BLOCK)).enumerate() {
        let mut acc = 0f32;
        for (&c, &v) in cs.iter().zip(xs) {
            acc += e4m3_to_f32(c) * v;
        }
        total += acc * e8m0_to_f32(scale_row[b]);
    }
    total
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use super::{FP4_GROUP, FP8_BLOCK};
    use crate::model::formats::e8m0_to_f32;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// E2M1 values times 2 as int8 (exact: 0.5 -> 1 ... 6 -> 12); the 0.5 goes into the scale.
    const LUT2: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

    /// E2M1 values as f32, for a 16-entry permute.
    const LUT_F32: [f32; 16] = [
        0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
    ];

    /// The nibbles index a 16-float table held in one register (`vpermps`), so no
    /// integer-to-float conversion is needed.
    ///
    /// # Safety
    /// Needs AVX-512F.
    #[allow(clippy::needless_range_loop)] // g also drives the pointer offsets
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fp4_row_dot_avx512(packed: &[u8], scales: &[u8], x: &[f32]) -> f32 {
        let groups = packed.len() / (FP4_GROUP / 2);
        assert!(
            x.len() >= groups * FP4_GROUP && scales.len() >= groups,
            "fp4 row shapes"
        );
        // SAFETY (whole block): loads stay inside `packed` / `x` (lengths checked above).
        unsafe {
            let lut = _mm512_loadu_ps(LUT_F32.as_ptr());
            let mask = _mm_set1_epi8(0x0F);
            let mut total = _mm512_setzero_ps();
            for g in 0..groups {
                let b = _mm_loadu_si128(packed.as_ptr().add(g * 16) as *const __m128i);
                let lo = _mm_and_si128(b, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
                // Columns in order: even = low nibble, odd = high nibble.
                let i0 = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi));
                let i1 = _mm512_cvtepu8_epi32(_mm_unpackhi_epi8(lo, hi));
                let w0 = _mm512_permutexvar_ps(i0, lut);
                let w1 = _mm512_permutexvar_ps(i1, lut);
                let xp = x.as_ptr().add(g * FP4_GROUP);
                let acc = _mm512_fmadd_ps(
                    w1,
                    _mm512_loadu_ps(xp.add(16)),
                    _mm512_mul_ps(w0, _mm512_loadu_ps(xp)),
                );
                total = _mm512_fmadd_ps(acc, _mm512_set1_ps(e8m0_to_f32(scales[g])), total);
            }
            _mm512_reduce_add_ps(total)
        }
    }

    /// # Safety
    /// Needs AVX2 and FMA.
    #[allow(clippy::needless_range_loop)] // g also drives the pointer offsets
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fp4_row_dot_avx2(packed: &[u8], scales: &[u8], x: &[f32]) -> f32 {
        let groups = packed.len() / (FP4_GROUP / 2);
        assert!(
            x.len() >= groups * FP4_GROUP && scales.len() >= groups,
            "fp4 row shapes"
        );
        // SAFETY (whole block): every load below reads inside `packed` / `x`, whose lengths
        // were checked above against `groups`.
        unsafe {
            let lut = _mm_loadu_si128(LUT2.as_ptr() as *const __m128i);
            let mask = _mm_set1_epi8(0x0F);
            let mut total = _mm256_setzero_ps();
            for g in 0..groups {
                let b = _mm_loadu_si128(packed.as_ptr().add(g * 16) as *const __m128i);
                let lo = _mm_shuffle_epi8(lut, _mm_and_si128(b, mask));
                let hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16(b, 4), mask));
                // Columns 0..16 and 16..32 in order: even = low nibble, odd = high nibble.
                let w0 = _mm_unpacklo_epi8(lo, hi);
                let w1 = _mm_unpackhi_epi8(lo, hi);
                let xp = x.as_ptr().add(g * FP4_GROUP);
                let f0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w0));
                let f1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(w0, 8)));
                let f2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w1));
                let f3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(w1, 8)));
                let mut acc = _mm256_mul_ps(f0, _mm256_loadu_ps(xp));
                acc = _mm256_fmadd_ps(f1, _mm256_loadu_ps(xp.add(8)), acc);
                acc = _mm256_fmadd_ps(f2, _mm256_loadu_ps(xp.add(16)), acc);
                acc = _mm256_fmadd_ps(f3, _mm256_loadu_ps(xp.add(24)), acc);
                let s = _mm256_set1_ps(e8m0_to_f32(scales[g]) * 0.5);
                total = _mm256_fmadd_ps(acc, s, total);
            }
            hsum(total)
        }
    }

    /// Bytes ahead that the BF16 kernels prefetch into L2: the hardware prefetcher stops at
    /// 4 KB pages. One core streaming the head (`cargo bench --bench kernels`, paired with
    /// the read loop): 60 % of the loop without, 75-83 % at 4-8 KB, 91-109 % at 16 KB.
    const PF: usize = 16384;

    /// The AVX-512 form of [`bf16_row_dot_avx2`]: 32 columns per step on four accumulators.
    ///
    /// # Safety
    /// Needs AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn bf16_row_dot_avx512(bytes: &[u8], x: &[f32]) -> f32 {
        let n = bytes.len() / 2;
        assert!(x.len() >= n && n.is_multiple_of(16), "bf16 row shapes");
        let f32s =
            |h: __m256i| _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        // SAFETY (whole block): 16 elements per load inside `bytes` and `x`.
        unsafe {
            let mut a = [_mm512_setzero_ps(); 4];
            let mut c = 0;
            while c + 64 <= n {
                for l in 0..2 {
                    _mm_prefetch::<_MM_HINT_T1>(
                        bytes.as_ptr().wrapping_add(2 * c + 64 * l + PF) as *const i8
                    );
                }
                #[allow(clippy::needless_range_loop)] // k also drives the offsets
                for k in 0..4 {
                    let h =
                        _mm256_loadu_si256(bytes.as_ptr().add(2 * (c + 16 * k)) as *const __m256i);
                    a[k] =
                        _mm512_fmadd_ps(f32s(h), _mm512_loadu_ps(x.as_ptr().add(c + 16 * k)), a[k]);
                }
                c += 64;
            }
            while c < n {
                let h = _mm256_loadu_si256(bytes.as_ptr().add(2 * c) as *const __m256i);
                a[0] = _mm512_fmadd_ps(f32s(h), _mm512_loadu_ps(x.as_ptr().add(c)), a[0]);
                c += 16;
            }
            _mm512_reduce_add_ps(_mm512_add_ps(
                _mm512_add_ps(a[0], a[1]),
                _mm512_add_ps(a[2], a[3]),
            ))
        }
    }

    /// Four accumulators: one FMA chain would wait on its own latency every 16 columns
    /// (4 cycles per 32 bytes, ~30 GB/s per core at 3.7 GHz: the head's old ceiling).
    ///
    /// # Safety
    /// Needs AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn bf16_row_dot_avx2(bytes: &[u8], x: &[f32]) -> f32 {
        let n = bytes.len() / 2;
        assert!(x.len() >= n && n.is_multiple_of(16), "bf16 row shapes");
        // bf16 -> f32: the 16 bits become the high half of the float.
        let f32s =
            |h: __m128i| _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        // SAFETY (whole block): 16 or 32 elements per step inside `bytes` and `x`.
        unsafe {
            let mut a = [_mm256_setzero_ps(); 4];
            let mut c = 0;
            while c + 32 <= n {
                _mm_prefetch::<_MM_HINT_T1>(bytes.as_ptr().wrapping_add(2 * c + PF) as *const i8);
                for k in 0..2 {
                    let h =
                        _mm256_loadu_si256(bytes.as_ptr().add(2 * c + 32 * k) as *const __m256i);
                    let xp = x.as_ptr().add(c + 16 * k);
                    a[2 * k] = _mm256_fmadd_ps(
                        f32s(_mm256_castsi256_si128(h)),
                        _mm256_loadu_ps(xp),
                        a[2 * k],
                    );
                    a[2 * k + 1] = _mm256_fmadd_ps(
                        f32s(_mm256_extracti128_si256(h, 1)),
                        _mm256_loadu_ps(xp.add(8)),
                        a[2 * k + 1],
                    );
                }
                c += 32;
            }
            if c < n {
                let h = _mm256_loadu_si256(bytes.as_ptr().add(2 * c) as *const __m256i);
                let xp = x.as_ptr().add(c);
                a[0] = _mm256_fmadd_ps(f32s(_mm256_castsi256_si128(h)), _mm256_loadu_ps(xp), a[0]);
                a[1] = _mm256_fmadd_ps(
                    f32s(_mm256_extracti128_si256(h, 1)),
                    _mm256_loadu_ps(xp.add(8)),
                    a[1],
                );
            }
            hsum(_mm256_add_ps(
                _mm256_add_ps(a[0], a[1]),
                _mm256_add_ps(a[2], a[3]),
            ))
        }
    }

    /// 16 E4M3 codes -> 16 f16 bit patterns: sign to bit 15, exponent and mantissa shifted
    /// by 7. The value is 2^-8 of the code's (the bias difference goes into the block scale);
    /// exact for every finite code, subnormals included.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(in crate::backend::cpu) fn e4m3x16_to_f16(codes: __m128i) -> __m256i {
        let b = _mm256_cvtepu8_epi16(codes);
        _mm256_or_si256(
            _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8),
            _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7F)), 7),
        )
    }

    /// 16 codes per step: E4M3 -> f16 bits in a 256-bit register, one `vcvtph2ps` to 16 floats.
    ///
    /// # Safety
    /// Needs AVX-512F and AVX2.
    #[allow(clippy::needless_range_loop)] // blk also drives the column range
    #[target_feature(enable = "avx512f,avx2")]
    pub unsafe fn fp8_row_dot_avx512(codes: &[u8], scale_row: &[u8], x: &[f32]) -> f32 {
        let n = codes.len();
        assert!(
            x.len() >= n && n.is_multiple_of(16) && scale_row.len() >= n.div_ceil(FP8_BLOCK),
            "fp8 row shapes"
        );
        // SAFETY (whole block): loads stay inside `codes` (16 at a time) and `x`.
        unsafe {
            let mut total = _mm512_setzero_ps();
            for blk in 0..n.div_ceil(FP8_BLOCK) {
                let end = ((blk + 1) * FP8_BLOCK).min(n);
                let mut acc = _mm512_setzero_ps();
                let mut c = blk * FP8_BLOCK;
                while c < end {
                    let h =
                        e4m3x16_to_f16(_mm_loadu_si128(codes.as_ptr().add(c) as *const __m128i));
                    acc = _mm512_fmadd_ps(
                        _mm512_cvtph_ps(h),
                        _mm512_loadu_ps(x.as_ptr().add(c)),
                        acc,
                    );
                    c += 16;
                }
                total = _mm512_fmadd_ps(
                    acc,
                    _mm512_set1_ps(e8m0_to_f32(scale_row[blk]) * 256.0),
                    total,
                );
            }
            _mm512_reduce_add_ps(total)
        }
    }

    /// # Safety
    /// Needs AVX2, FMA and F16C.
    #[allow(clippy::needless_range_loop)] // blk also drives the column range
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn fp8_row_dot_avx2(codes: &[u8], scale_row: &[u8], x: &[f32]) -> f32 {
        let n = codes.len();
        assert!(
            x.len() >= n && n.is_multiple_of(16) && scale_row.len() >= n.div_ceil(FP8_BLOCK),
            "fp8 row shapes"
        );
        // SAFETY (whole block): loads stay inside `codes` (16 at a time, n % 16 == 0) and `x`.
        unsafe {
            let mut total = _mm256_setzero_ps();
            for blk in 0..n.div_ceil(FP8_BLOCK) {
                let end = ((blk + 1) * FP8_BLOCK).min(n);
                let mut acc = _mm256_setzero_ps();
                let mut c = blk * FP8_BLOCK;
                while c < end {
                    let h =
                        e4m3x16_to_f16(_mm_loadu_si128(codes.as_ptr().add(c) as *const __m128i));
                    let f0 = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
                    let f1 = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
                    let xp = x.as_ptr().add(c);
                    acc = _mm256_fmadd_ps(f0, _mm256_loadu_ps(xp), acc);
                    acc = _mm256_fmadd_ps(f1, _mm256_loadu_ps(xp.add(8)), acc);
                    c += 16;
                }
                let s = _mm256_set1_ps(e8m0_to_f32(scale_row[blk]) * 256.0);
                total = _mm256_fmadd_ps(acc, s, total);
            }
            hsum(total)
        }
    }
}

/// Checks an FP4 row kernel `dot(packed, scales, x)` on one-hot rows of 256 columns: every
/// column position (both nibbles of a byte, group edges) and every nibble lands on its own
/// input, times its group's scale, exactly.
#[cfg(test)]
pub(crate) fn check_fp4_one_hot(dot: impl Fn(&[u8], &[u8], &[f32]) -> f32) {
    use crate::model::formats::{E2M1_TABLE, e8m0_to_f32};
    for c in [0usize, 1, 17, 30, 31, 32, 77, 126, 127, 200, 255] {
        for n in 0u8..16 {
            let mut packed = vec![0u8; 128];
            packed[c / 2] = if c % 2 == 0 { n } else { n << 4 };
            let scales: Vec<u8> = (0..8).map(|g| 120 + g as u8).collect();
            let mut x = vec![0f32; 256];
            x[c] = 0.75;
            let want = E2M1_TABLE[n as usize] * 0.75 * e8m0_to_f32(scales[c / 32]);
            assert_eq!(dot(&packed, &scales, &x), want, "column {c}, nibble {n}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synth::SplitMix64;

    fn close(a: f32, b: f32, scale: f32) -> bool {
        (a - b).abs() <= 1e-5 * scale.max(1e-30)
    }

    #[test]
    fn simd_fp4_equals_portable() {
        let mut r = SplitMix64::new(9);
        for cols in [32usize, 64, 2048, 4096] {
            let packed: Vec<u8> = (0..cols / 2).map(|_| r.next_u64() as u8).collect();
            let scales: Vec<u8> = (0..cols / 32)
                .map(|_| 110 + (r.next_u64() % 30) as u8)
                .collect();
            let x: Vec<f32> = (0..cols).map(|_| r.uniform()).collect();
            let p = fp4_row_dot_portable(&packed, &scales, &x);
            let s = fp4_row_dot(&packed, &scales, &x);
            // Each SIMD level this CPU has, not only the one dispatch picks.
            #[cfg(target_arch = "x86_64")]
            let extra: Vec<f32> = {
                let mut v = Vec::new();
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: features checked.
                    v.push(unsafe { super::x86::fp4_row_dot_avx2(&packed, &scales, &x) });
                }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: feature checked.
                    v.push(unsafe { super::x86::fp4_row_dot_avx512(&packed, &scales, &x) });
                }
                v
            };
            #[cfg(not(target_arch = "x86_64"))]
            let extra: Vec<f32> = Vec::new();
            // Bound: sum of |terms| (the summation order differs).
            let mut mag = 0f32;
            for (g, ps) in packed.chunks(16).enumerate() {
                for (k, &b) in ps.iter().enumerate() {
                    let sc = e8m0_to_f32(scales[g]);
                    mag += (E2M1_TABLE[(b & 15) as usize] * x[g * 32 + 2 * k] * sc).abs();
                    mag += (E2M1_TABLE[(b >> 4) as usize] * x[g * 32 + 2 * k + 1] * sc).abs();
                }
            }
            assert!(close(p, s, mag), "cols {cols}: {p} vs {s}");
            for e in extra {
                assert!(close(p, e, mag), "cols {cols}: {p} vs {e}");
            }
        }
    }

    #[test]
    fn simd_bf16_equals_portable() {
        let mut r = SplitMix64::new(4);
        // 4096 columns, and lengths that leave each SIMD loop a tail (16, 32, 48 columns).
        for n in [4096usize, 4112, 4128, 4144, 16] {
            let bytes: Vec<u8> = (0..n * 2).map(|_| (r.next_u64() as u8) & 0xBF).collect();
            let x: Vec<f32> = (0..n).map(|_| r.uniform()).collect();
            let p = bf16_row_dot_portable(&bytes, &x);
            let mag: f32 = bytes
                .chunks_exact(2)
                .zip(&x)
                .map(|(b, v)| {
                    (crate::model::formats::bf16_to_f32(u16::from_le_bytes([b[0], b[1]])) * v).abs()
                })
                .sum();
            let mut got = vec![bf16_row_dot(&bytes, &x)];
            #[cfg(target_arch = "x86_64")]
            {
                if has_avx2_fma() {
                    // SAFETY: AVX2 and FMA are available (checked).
                    got.push(unsafe { x86::bf16_row_dot_avx2(&bytes, &x) });
                }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: AVX-512F is available (checked).
                    got.push(unsafe { x86::bf16_row_dot_avx512(&bytes, &x) });
                }
            }
            for s in got {
                assert!(close(p, s, mag), "{n} columns: {p} vs {s}");
            }
        }
    }

    #[test]
    fn simd_fp8_equals_portable_for_every_code() {
        // Every finite E4M3 code appears (incl. subnormals, both signs).
        let codes: Vec<u8> = (0..1024u32)
            .map(|i| (i * 37 % 256) as u8)
            .map(|c| if c & 0x7F == 0x7F { 0 } else { c })
            .collect();
        let scales = [127u8, 120, 130, 125, 127, 127, 127, 127];
        let mut r = SplitMix64::new(3);
        let x: Vec<f32> = (0..1024).map(|_| r.uniform()).collect();
        let p = fp8_row_dot_portable(&codes, &scales, &x);
        let s = fp8_row_dot(&codes, &scales, &x);
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            // SAFETY: features checked; the AVX2 level is tested even where AVX-512 is picked.
            let a = unsafe { super::x86::fp8_row_dot_avx2(&codes, &scales, &x) };
            let mag: f32 = codes
                .iter()
                .zip(&x)
                .map(|(&c, &v)| (e4m3_to_f32(c) * v * 2.0).abs())
                .sum();
            assert!(close(p, a, mag), "avx2 {p} vs {a}");
        }
        let mag: f32 = codes
            .iter()
            .zip(&x)
            .enumerate()
            .map(|(i, (&c, &v))| (e4m3_to_f32(c) * v * e8m0_to_f32(scales[i / 128])).abs())
            .sum();
        assert!(close(p, s, mag), "{p} vs {s}");
        // One-hot rows check each code's value exactly.
        for c in 0u8..=255 {
            if c & 0x7F == 0x7F {
                continue;
            }
            let mut row = vec![0u8; 16];
            row[3] = c;
            let mut xv = vec![0f32; 16];
            xv[3] = 1.0;
            assert_eq!(
                fp8_row_dot(&row, &[127], &xv),
                e4m3_to_f32(c),
                "code {c:#04x}"
            );
        }
    }
}
