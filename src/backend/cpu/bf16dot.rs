//! Decode kernels on bf16 dot-product instructions (AVX-512 BF16, `vdpbf16ps`: 32
//! multiply-adds per instruction, fp32 accumulation) for inputs that are exactly bf16.
//!
//! Every E2M1 and E4M3 value is exactly a bf16, and so is every activation the default
//! `--numerics reference` feeds an FP8/FP4 GEMM (an E4M3 value times a power of two). For such
//! inputs each product is exact and only the summation order differs from the fp32 kernels:
//! the same "equal within a few ulp of the row's magnitude" contract, at a third of the
//! instructions. Inputs that are not exactly bf16 (`--numerics ideal`) never come here:
//! [`prepare_fp4`] / [`prepare_fp8`] return `None` and the fp32 kernels run.
//!
//! The weights are turned into bf16 in registers with in-lane table lookups; the input is
//! stored once per matvec in the matching (permuted) order, described at each `prepare_*`.

use crate::model::formats::{E2M1_TABLE, FP8_BLOCK, build_e4m3_table};

/// Columns handled per step by both kernels; rows whose length is not a multiple of this use
/// the fp32 kernels.
pub const CHUNK: usize = 128;

/// Whether this CPU has the instructions (AVX-512 F/BW/VBMI and BF16).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static HAS: OnceLock<bool> = OnceLock::new();
        *HAS.get_or_init(|| {
            std::is_x86_feature_detected!("avx512f")
                && std::is_x86_feature_detected!("avx512bw")
                && std::is_x86_feature_detected!("avx512vbmi")
                && std::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `v` as bf16 bits when the conversion is exact and the value is not a bf16 subnormal
/// (which the instruction would read as zero).
fn exact_bf16(v: f32) -> Option<u16> {
    let b = v.to_bits();
    let exp = (b >> 23) & 0xFF;
    (b & 0xFFFF == 0 && (exp != 0 || b & 0x7FFF_FFFF == 0)).then_some((b >> 16) as u16)
}

/// Input for [`fp4_row_dot`]: per 128 columns (four 32-groups, `j` = 0..4), four runs of 32
/// values; run `s` (offset `o` = 16·(s&1), parity `p` = s>>1) holds at `8j + k` the column
/// `32j + o + 2k + p`, k < 8. This is the order in which the kernel's byte shuffles and
/// unpacks lay out the weights, so both operands line up lane by lane.
pub fn prepare_fp4(x: &[f32]) -> Option<Vec<u16>> {
    if !x.len().is_multiple_of(CHUNK) {
        return None;
    }
    let mut out = vec![0u16; x.len()];
    for (xc, oc) in x.chunks_exact(CHUNK).zip(out.chunks_exact_mut(CHUNK)) {
        for i in 0..4 {
            for m in 0..32 {
                oc[32 * i + m] = exact_bf16(xc[4 * m + i])?;
            }
        }
    }
    Some(out)
}

/// Input for [`fp8_row_dot`]: per 64 columns, two runs of 32; run `s` holds at `8j + k` the
/// column `16j + 8s + k` (j < 4, k < 8).
pub fn prepare_fp8(x: &[f32]) -> Option<Vec<u16>> {
    if !x.len().is_multiple_of(CHUNK) {
        return None;
    }
    let mut out = vec![0u16; x.len()];
    for (xc, oc) in x.chunks_exact(64).zip(out.chunks_exact_mut(64)) {
        for s in 0..2 {
            for j in 0..4 {
                for k in 0..8 {
                    oc[32 * s + 8 * j + k] = exact_bf16(xc[16 * j + 8 * s + k])?;
                }
            }
        }
    }
    Some(out)
}

/// bf16 bits of an f32 that is exactly a bf16.
const fn hi16(v: f32) -> u16 {
    (v.to_bits() >> 16) as u16
}

/// E2M1 nibble -> bf16 bits, split into low and high bytes for two in-lane byte shuffles.
const E2M1_BF16: [u16; 16] = {
    let mut t = [0u16; 16];
    let mut i = 0;
    while i < 16 {
        t[i] = hi16(E2M1_TABLE[i]);
        i += 1;
    }
    t
};

/// Σ_c W[c]·x[c] for one FP4 row (`packed` cols/2 bytes, one E8M0 scale per 32 columns) and an
/// input laid out by [`prepare_fp4`]. Needs [`available`] and cols % 128 == 0.
pub fn fp4_row_dot(packed: &[u8], scales: &[u8], xp: &[u16]) -> f32 {
    let cols = xp.len();
    assert!(
        available()
            && cols.is_multiple_of(CHUNK)
            && packed.len() == cols / 2
            && scales.len() == cols / 32,
        "fp4 bf16 row shapes"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the instructions are available and the shapes match (asserted above).
    unsafe {
        x86::fp4_row_dot(packed, scales, xp)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("available() is false off x86_64")
}

/// Σ_c W[c]·x[c] for one FP8 row (E4M3 codes, the row's 128-block scales) and an input laid out
/// by [`prepare_fp8`]. Needs [`available`] and cols % 128 == 0.
pub fn fp8_row_dot(codes: &[u8], scale_row: &[u8], xp: &[u16]) -> f32 {
    let cols = xp.len();
    assert!(
        available()
            && cols.is_multiple_of(CHUNK)
            && codes.len() == cols
            && scale_row.len() == cols / FP8_BLOCK,
        "fp8 bf16 row shapes"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the instructions are available and the shapes match (asserted above).
    unsafe {
        x86::fp8_row_dot(codes, scale_row, xp)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("available() is false off x86_64")
}

/// E4M3 magnitude (7 bits) -> bf16 bits of the value (sign added separately): subnormals
/// become normal bf16 values, 0x7F the NaN.
const E4M3_BF16: [u16; 128] = {
    let v = build_e4m3_table();
    let mut t = [0u16; 128];
    let mut i = 0;
    while i < 128 {
        t[i] = hi16(v[i]);
        i += 1;
    }
    t
};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{E2M1_BF16, E4M3_BF16};
    use crate::model::formats::{FP8_BLOCK, e8m0_to_f32};
    use std::arch::x86_64::*;

    fn byte_tables<const N: usize>(t: &[u16; N]) -> ([u8; N], [u8; N]) {
        (t.map(|v| v as u8), t.map(|v| (v >> 8) as u8))
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn bh(v: __m512i) -> __m512bh {
        // SAFETY: both are 512-bit plain-data vectors.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    }

    /// # Safety
    /// Needs AVX-512 F/BW/BF16; `packed` = cols/2, `scales` = cols/32, `xp` = cols,
    /// cols % 128 == 0 (checked by the caller).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn fp4_row_dot(packed: &[u8], scales: &[u8], xp: &[u16]) -> f32 {
        let groups = scales.len();
        // SAFETY (whole block): per 128 columns the loads read 64 bytes of `packed` and
        // 128 u16 of `xp`; the scale load is masked to the `groups` bytes there are. All
        // inside the lengths the caller checked.
        unsafe {
            let lut =
                _mm512_castsi256_si512(_mm256_loadu_si256(E2M1_BF16.as_ptr() as *const __m256i));
            let nib = _mm512_set1_epi16(0x0F);
            let mut total = _mm512_setzero_ps();
            let mut s16 = _mm512_setzero_ps();
            let sidx: [__m512i; 4] = std::array::from_fn(|q| {
                let q = 4 * q as i32;
                _mm512_add_epi32(
                    _mm512_set1_epi32(q),
                    _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
                )
            });
            for c in 0..xp.len() / 128 {
                if c % 4 == 0 {
                    s16 = e8m0x16(scales.as_ptr().add(4 * c), groups - 4 * c);
                }
                // Word m of the 64 bytes holds columns 4m..4m+4 of the chunk, one per nibble.
                let b = _mm512_loadu_si512(packed.as_ptr().add(64 * c) as *const __m512i);
                let x = xp.as_ptr().add(128 * c) as *const __m512i;
                let n = [
                    _mm512_and_si512(b, nib),
                    _mm512_and_si512(_mm512_srli_epi16(b, 4), nib),
                    _mm512_and_si512(_mm512_srli_epi16(b, 8), nib),
                    _mm512_srli_epi16(b, 12),
                ];
                let mut acc = [_mm512_setzero_ps(); 2];
                for i in 0..4 {
                    let w = _mm512_permutexvar_epi16(n[i], lut);
                    acc[i & 1] =
                        _mm512_dpbf16_ps(acc[i & 1], bh(w), bh(_mm512_loadu_si512(x.add(i))));
                }
                // Group 4c + j's scale over the four fp32 lanes of 128-bit lane j.
                let sv = _mm512_permutexvar_ps(sidx[c % 4], s16);
                total = _mm512_fmadd_ps(_mm512_add_ps(acc[0], acc[1]), sv, total);
            }
            _mm512_reduce_add_ps(total)
        }
    }

    /// Up to 16 E8M0 bytes at `p` (`avail` of them readable) as f32, exactly as
    /// `e8m0_to_f32`: 2^(s-127), 0 -> 2^-127, 255 -> NaN.
    ///
    /// # Safety
    /// Needs AVX-512 F/BW; `p` valid for min(avail, 16) bytes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn e8m0x16(p: *const u8, avail: usize) -> __m512 {
        let m: __mmask16 = if avail >= 16 {
            0xFFFF
        } else {
            (1u16 << avail) - 1
        };
        // SAFETY: the masked load touches only the first `avail` bytes.
        let b = unsafe { _mm_maskz_loadu_epi8(m, p as *const i8) };
        let e = _mm512_cvtepu8_epi32(b);
        let mut f = _mm512_slli_epi32(e, 23);
        f = _mm512_mask_mov_epi32(
            f,
            _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512()),
            _mm512_set1_epi32(0x0040_0000),
        );
        f = _mm512_mask_mov_epi32(
            f,
            _mm512_cmpeq_epi32_mask(e, _mm512_set1_epi32(255)),
            _mm512_set1_epi32(f32::NAN.to_bits() as i32),
        );
        _mm512_castsi512_ps(f)
    }

    /// # Safety
    /// Needs AVX-512 F/BW/VBMI/BF16; `codes` = `xp` = cols, `scale_row` = cols/128,
    /// cols % 128 == 0 (checked by the caller).
    #[allow(clippy::needless_range_loop)] // blk and half also drive the column offsets
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512bf16")]
    pub unsafe fn fp8_row_dot(codes: &[u8], scale_row: &[u8], xp: &[u16]) -> f32 {
        let (lo_t, hi_t) = byte_tables(&E4M3_BF16);
        // SAFETY (whole block): per 128-column block the loads read 128 bytes of `codes` and
        // 128 u16 of `xp`, inside the lengths the caller checked.
        unsafe {
            let ld = |t: &[u8; 128], h: usize| _mm512_loadu_si512(t.as_ptr().add(64 * h) as _);
            let (l0, l1, h0, h1) = (ld(&lo_t, 0), ld(&lo_t, 1), ld(&hi_t, 0), ld(&hi_t, 1));
            let mag = _mm512_set1_epi8(0x7F);
            let sign = _mm512_set1_epi8(0x80u8 as i8);
            let mut total = _mm512_setzero_ps();
            for blk in 0..codes.len() / FP8_BLOCK {
                let mut acc = [_mm512_setzero_ps(); 2];
                for half in 0..2 {
                    let c0 = FP8_BLOCK * blk + 64 * half;
                    // Lane j = codes c0 + 16j .. c0 + 16j + 16.
                    let b = _mm512_loadu_si512(codes.as_ptr().add(c0) as *const __m512i);
                    let m = _mm512_and_si512(b, mag);
                    let l = _mm512_permutex2var_epi8(l0, m, l1);
                    let h = _mm512_or_si512(
                        _mm512_permutex2var_epi8(h0, m, h1),
                        _mm512_and_si512(b, sign),
                    );
                    let x = xp.as_ptr().add(c0) as *const __m512i;
                    acc[half] = _mm512_dpbf16_ps(
                        acc[half],
                        bh(_mm512_unpacklo_epi8(l, h)),
                        bh(_mm512_loadu_si512(x)),
                    );
                    acc[half] = _mm512_dpbf16_ps(
                        acc[half],
                        bh(_mm512_unpackhi_epi8(l, h)),
                        bh(_mm512_loadu_si512(x.add(1))),
                    );
                }
                let sc = _mm512_set1_ps(e8m0_to_f32(scale_row[blk]));
                total = _mm512_fmadd_ps(_mm512_add_ps(acc[0], acc[1]), sc, total);
            }
            _mm512_reduce_add_ps(total)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::rowdot::{fp4_row_dot_portable, fp8_row_dot_portable};
    use crate::model::formats::{e4m3_to_f32, e8m0_to_f32, fake_quant_e4m3_blocks};
    use crate::model::synth::SplitMix64;

    /// An input on the reference numerics' grid: E4M3 per 128-block, power-of-two scale.
    fn grid_input(r: &mut SplitMix64, n: usize) -> Vec<f32> {
        let mut x: Vec<f32> = (0..n).map(|_| r.uniform() * 3.0).collect();
        fake_quant_e4m3_blocks(&mut x, 128);
        x
    }

    #[test]
    fn exactness_gate() {
        assert_eq!(exact_bf16(1.5), Some(0x3FC0));
        assert_eq!(exact_bf16(-0.0), Some(0x8000));
        assert_eq!(exact_bf16(0.1), None); // needs more than 8 significant bits
        assert_eq!(exact_bf16(f32::from_bits(0x0001_0000)), None); // bf16 subnormal
        let mut r = SplitMix64::new(1);
        assert!(prepare_fp4(&grid_input(&mut r, 256)).is_some());
        assert!(prepare_fp8(&grid_input(&mut r, 256)).is_some());
        let off_grid: Vec<f32> = (0..256).map(|i| i as f32 * 0.01).collect();
        assert!(prepare_fp4(&off_grid).is_none() && prepare_fp8(&off_grid).is_none());
        assert!(
            prepare_fp4(&[0.5; 96]).is_none(),
            "cols not a multiple of 128"
        );
    }

    #[test]
    fn fp4_equals_portable() {
        if !available() {
            eprintln!("no AVX-512 BF16 on this CPU: kernel not exercised");
            return;
        }
        let mut r = SplitMix64::new(21);
        for cols in [128usize, 256, 2048, 4096] {
            let packed: Vec<u8> = (0..cols / 2).map(|_| r.next_u64() as u8).collect();
            let scales: Vec<u8> = (0..cols / 32)
                .map(|_| 110 + (r.next_u64() % 30) as u8)
                .collect();
            let x = grid_input(&mut r, cols);
            let p = fp4_row_dot_portable(&packed, &scales, &x);
            let s = fp4_row_dot(&packed, &scales, &prepare_fp4(&x).expect("on the grid"));
            let mut mag = 0f32;
            for c in 0..cols {
                let b = packed[c / 2];
                let n = if c % 2 == 0 { b & 15 } else { b >> 4 };
                mag += (E2M1_TABLE[n as usize] * x[c] * e8m0_to_f32(scales[c / 32])).abs();
            }
            assert!((p - s).abs() <= 1e-6 * mag, "cols {cols}: {p} vs {s}");
        }
        // One-hot: each column position and nibble lands on its own input.
        for c in [0usize, 1, 17, 30, 31, 32, 77, 127, 200] {
            for n in 0u8..16 {
                let mut packed = vec![0u8; 128];
                packed[c / 2] = if c % 2 == 0 { n } else { n << 4 };
                let scales: Vec<u8> = (0..8).map(|g| 120 + g as u8).collect();
                let mut x = vec![0f32; 256];
                x[c] = 0.75;
                let want = E2M1_TABLE[n as usize] * 0.75 * e8m0_to_f32(scales[c / 32]);
                let got = fp4_row_dot(&packed, &scales, &prepare_fp4(&x).expect("grid"));
                assert_eq!(got, want, "column {c}, nibble {n}");
            }
        }
    }

    #[test]
    fn fp8_equals_portable_for_every_code() {
        if !available() {
            eprintln!("no AVX-512 BF16 on this CPU: kernel not exercised");
            return;
        }
        // Every E4M3 code but the NaNs, both signs, subnormals included.
        let codes: Vec<u8> = (0..1024u32)
            .map(|i| (i * 37 % 256) as u8)
            .map(|c| if c & 0x7F == 0x7F { 0 } else { c })
            .collect();
        let scales = [127u8, 120, 130, 125, 127, 127, 127, 127];
        let mut r = SplitMix64::new(3);
        let x = grid_input(&mut r, 1024);
        let p = fp8_row_dot_portable(&codes, &scales, &x);
        let s = fp8_row_dot(&codes, &scales, &prepare_fp8(&x).expect("grid"));
        let mag: f32 = codes
            .iter()
            .zip(&x)
            .enumerate()
            .map(|(i, (&c, &v))| (e4m3_to_f32(c) * v * e8m0_to_f32(scales[i / 128])).abs())
            .sum();
        assert!((p - s).abs() <= 1e-6 * mag, "{p} vs {s}");
        for c in 0u8..=255 {
            if c & 0x7F == 0x7F {
                continue;
            }
            for pos in [0usize, 9, 16, 63, 64, 100, 127] {
                let mut row = vec![0u8; 128];
                row[pos] = c;
                let mut xv = vec![0f32; 128];
                xv[pos] = 1.0;
                let got = fp8_row_dot(&row, &[127], &prepare_fp8(&xv).expect("grid"));
                assert_eq!(got, e4m3_to_f32(c), "code {c:#04x} at {pos}");
            }
        }
    }
}
