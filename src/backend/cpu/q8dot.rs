//! FP4 decode kernel on int8 dot products (AVX-512 VNNI, `vpdpbusd`: 64 multiply-adds per
//! instruction, twice the bf16 instruction's) for inputs on the int8 grid of
//! `--numerics fast`: per 32 columns, integers |q| <= 127 times one power of two
//! ([`crate::model::formats::fake_quant_i8_blocks`]).
//!
//! Every E2M1 value times 2 is an integer in [-12, 12], so a group's 32 products sum exactly
//! in int32; the group's sum times its two scales (both powers of two) is exact in fp32, and
//! only the fp32 sum over groups rounds: the fp32 kernels' contract, with fewer roundings.
//! The instruction multiplies unsigned by signed bytes, so the weights enter as 2·w + 12
//! (0..=24) and each dword's accumulator starts at -12·Σq over its columns.
//!
//! An input is prepared once per matvec ([`prepare`]); one that is not on the grid gives
//! `None` and the bf16 or fp32 kernels run.

use crate::model::formats::{E2M1_TABLE, I8_BLOCK, i8_block_exponent, pow2};

/// Columns per step (two 64-byte halves of int8: even and odd columns).
pub const CHUNK: usize = 128;
/// Most inputs one pass over a row serves.
pub const MAX_INPUTS: usize = 8;

/// Whether the kernel runs here: AVX-512 F/BW/VBMI and VNNI. Whether a product may use it
/// is the caller's choice ([`super::Kernels`]).
pub fn available() -> bool {
    cpu_has()
}

fn cpu_has() -> bool {
    super::has_x86!("avx512f", "avx512bw", "avx512vbmi", "avx512vnni")
}

/// An input in the kernel's layout.
#[derive(Debug, Clone)]
pub struct Q8Input {
    /// Per 128 columns: 64 bytes of the even columns (0, 2, .., 126), then 64 of the odd
    /// ones: the order the nibble split of 64 packed bytes produces.
    q: Vec<i8>,
    /// Per 8 columns 8c..8c+8 (one dword lane of the product): -12·Σq, the weight offset's
    /// share.
    corr: Vec<i32>,
    /// Per 32-column group: 2^k / 2 (the grid's step, halved for the doubled weights).
    step: Vec<f32>,
}

/// `x` in the kernel's layout when it is on the int8 grid (every 32-block: q·2^k with the
/// block's own [`i8_block_exponent`]) and its length a multiple of 128; None otherwise.
pub fn prepare(x: &[f32]) -> Option<Q8Input> {
    #[cfg(target_arch = "x86_64")]
    if cpu_has() {
        // SAFETY: the CPU has AVX-512 F/BW (cpu_has).
        return prepare_by(x, |b, e, o, c| unsafe { x86::quantize_block(b, e, o, c) });
    }
    prepare_portable(x)
}

/// [`prepare`] one value at a time (the reference for the SIMD form; any CPU).
pub fn prepare_portable(x: &[f32]) -> Option<Q8Input> {
    prepare_by(x, quantize_block)
}

/// One 32-value block of [`prepare`]: the int8 values (even columns to `even`, odd ones to
/// `odd`), the four dword corrections, and the block exponent; None when the block is not
/// on the int8 grid.
type BlockFn = fn(&[f32; 32], &mut [i8; 16], &mut [i8; 16], &mut [i32; 4]) -> Option<i32>;

/// The layout of [`Q8Input`] filled block by block with `block`.
fn prepare_by(x: &[f32], block: BlockFn) -> Option<Q8Input> {
    if !x.len().is_multiple_of(CHUNK) {
        return None;
    }
    let mut q = vec![0i8; x.len()];
    let mut corr = vec![0i32; x.len() / 8];
    let mut step = vec![0f32; x.len() / I8_BLOCK];
    let blocks = x.chunks_exact(CHUNK).zip(q.chunks_exact_mut(CHUNK));
    for (ci, (xc, qc)) in blocks.enumerate() {
        // Columns 32gi + 2m (even) go to 16gi + m, the odd ones to 64 + 16gi + m.
        let (even, odd) = qc.split_at_mut(CHUNK / 2);
        for gi in 0..CHUNK / I8_BLOCK {
            let c = 16 * ci + 4 * gi;
            let k = block(
                xc[32 * gi..32 * gi + 32].try_into().ok()?,
                (&mut even[16 * gi..16 * gi + 16]).try_into().ok()?,
                (&mut odd[16 * gi..16 * gi + 16]).try_into().ok()?,
                (&mut corr[c..c + 4]).try_into().ok()?,
            )?;
            step[4 * ci + gi] = pow2(k - 1);
        }
    }
    Some(Q8Input { q, corr, step })
}

/// The portable [`BlockFn`].
fn quantize_block(
    blk: &[f32; 32],
    even: &mut [i8; 16],
    odd: &mut [i8; 16],
    corr: &mut [i32; 4],
) -> Option<i32> {
    // Magnitudes order like their bits (NaN above infinity): an integer max.
    let amax = f32::from_bits(
        blk.iter()
            .fold(0u32, |m, v| m.max(v.to_bits() & 0x7FFF_FFFF)),
    );
    if !amax.is_finite() {
        return None;
    }
    let k = i8_block_exponent(amax);
    let inv = pow2(-k);
    let mut ok = true;
    for ((pair, e), o) in blk.chunks_exact(2).zip(even.iter_mut()).zip(odd.iter_mut()) {
        let (a, b) = (pair[0] * inv, pair[1] * inv);
        // |v| <= 127 and integral (the truncating conversion is then exact).
        ok &= a.abs() <= 127.0 && (a as i32) as f32 == a;
        ok &= b.abs() <= 127.0 && (b as i32) as f32 == b;
        (*e, *o) = (a as i32 as i8, b as i32 as i8);
    }
    // Dword lane d covers 8 consecutive columns: 4 even and 4 odd ones.
    for (d, c) in corr.iter_mut().enumerate() {
        let sum: i32 = (0..4)
            .map(|m| i32::from(even[4 * d + m]) + i32::from(odd[4 * d + m]))
            .sum();
        *c = -12 * sum;
    }
    ok.then_some(k)
}

/// Unsigned weight byte for each nibble: 2·E2M1 + 12.
const W_U8: [u8; 16] = {
    let mut t = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        t[i] = (2.0 * E2M1_TABLE[i] + 12.0) as u8;
        i += 1;
    }
    t
};

/// out[i·n + j] = Σ_c W[i][c]·x_j[c] (n = xs.len()) for consecutive FP4 rows (`packed`
/// cols/2 bytes each, one E8M0 scale per 32 columns) and up to [`MAX_INPUTS`] prepared
/// inputs. Needs [`available`].
pub fn fp4_block(packed: &[u8], scales: &[u8], cols: usize, xs: &[&Q8Input], out: &mut [f32]) {
    let rows = out.len().checked_div(xs.len()).unwrap_or(0);
    assert!(
        available()
            && cols.is_multiple_of(CHUNK)
            && packed.len() == rows * cols / 2
            && scales.len() == rows * cols / I8_BLOCK
            && xs.len() <= MAX_INPUTS
            && xs.iter().all(|x| x.q.len() == cols),
        "fp4 int8 row shapes"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the instructions are available and the shapes match (asserted above).
    unsafe {
        super::bf16dot::by_len!(xs, &Q8Input, |a| x86::fp4_block(
            packed, scales, cols, a, out
        ))
    }
}

/// One row, several inputs.
#[cfg(test)]
pub fn fp4_rows_dot(packed: &[u8], scales: &[u8], xs: &[&Q8Input], out: &mut [f32]) {
    fp4_block(packed, scales, 2 * packed.len(), xs, out)
}

/// The single-input form (decode).
#[cfg(test)]
pub fn fp4_row_dot(packed: &[u8], scales: &[u8], x: &Q8Input) -> f32 {
    let mut o = [0f32];
    fp4_rows_dot(packed, scales, &[x], &mut o);
    o[0]
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Q8Input, W_U8};
    use crate::backend::cpu::bf16dot::x86::e8m0x16;
    use std::arch::x86_64::*;

    /// Bytes ahead of the current load that are prefetched into L2 (a hint: past the end is
    /// harmless), far enough to cover the DRAM latency: one core streaming the FP4 experts
    /// from memory went from 18 to 23 GB/s at 8 KB ahead instead of 1 KB.
    const PREFETCH: usize = 8192;

    /// The AVX-512 form of the portable block quantizer (see `BlockFn`).
    ///
    /// # Safety
    /// Needs AVX-512 F/BW.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn quantize_block(
        x: &[f32; 32],
        even: &mut [i8; 16],
        odd: &mut [i8; 16],
        corr: &mut [i32; 4],
    ) -> Option<i32> {
        use crate::model::formats::{i8_block_exponent, pow2};
        // SAFETY: every load and store is of the fixed-size arrays passed in.
        unsafe {
            let (a, b) = (
                _mm512_loadu_ps(x.as_ptr()),
                _mm512_loadu_ps(x.as_ptr().add(16)),
            );
            // Magnitudes order like their bits (NaN above infinity): an integer max.
            let abs = _mm512_set1_epi32(0x7FFF_FFFF);
            let m = _mm512_max_epu32(
                _mm512_and_si512(_mm512_castps_si512(a), abs),
                _mm512_and_si512(_mm512_castps_si512(b), abs),
            );
            let amax = f32::from_bits(_mm512_reduce_max_epu32(m));
            if !amax.is_finite() {
                return None;
            }
            let k = i8_block_exponent(amax);
            let inv = _mm512_set1_ps(pow2(-k));
            let (sa, sb) = (_mm512_mul_ps(a, inv), _mm512_mul_ps(b, inv));
            // |s| <= 127 by the choice of k; on the grid iff the truncation is exact.
            let (ia, ib) = (_mm512_cvttps_epi32(sa), _mm512_cvttps_epi32(sb));
            let exact = _mm512_cmpeq_ps_mask(_mm512_cvtepi32_ps(ia), sa)
                & _mm512_cmpeq_ps_mask(_mm512_cvtepi32_ps(ib), sb);
            if exact != 0xFFFF {
                return None;
            }
            let ev = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
            let od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
            let store = |v: __m512i, p: *mut i8| {
                _mm_storeu_si128(p as *mut __m128i, _mm512_cvtepi32_epi8(v))
            };
            store(_mm512_permutex2var_epi32(ia, ev, ib), even.as_mut_ptr());
            store(_mm512_permutex2var_epi32(ia, od, ib), odd.as_mut_ptr());
            // Dword lane d covers 8 consecutive columns: a's halves, then b's.
            *corr = [
                _mm512_mask_reduce_add_epi32(0x00FF, ia),
                _mm512_mask_reduce_add_epi32(0xFF00, ia),
                _mm512_mask_reduce_add_epi32(0x00FF, ib),
                _mm512_mask_reduce_add_epi32(0xFF00, ib),
            ]
            .map(|s| -12 * s);
            Some(k)
        }
    }

    /// Row after row of [`fp4_rows`] into out [rows, T].
    ///
    /// # Safety
    /// As [`fp4_rows`] for each row; `packed`/`scales` hold out.len()/T rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")]
    pub unsafe fn fp4_block<const T: usize>(
        packed: &[u8],
        scales: &[u8],
        cols: usize,
        xs: [&Q8Input; T],
        out: &mut [f32],
    ) {
        let (pb, sb) = (cols / 2, cols / 32);
        for (i, o) in out.chunks_exact_mut(T).enumerate() {
            let (p, s) = (&packed[i * pb..(i + 1) * pb], &scales[i * sb..(i + 1) * sb]);
            // SAFETY: one row of the shapes the caller checked.
            o.copy_from_slice(&unsafe { fp4_rows(p, s, xs) });
        }
    }

    /// # Safety
    /// Needs AVX-512 F/BW/VBMI/VNNI; `packed` = cols/2, `scales` = cols/32, every input prepared
    /// for cols columns, cols % 128 == 0 (checked by the caller).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")]
    pub unsafe fn fp4_rows<const T: usize>(
        packed: &[u8],
        scales: &[u8],
        xs: [&Q8Input; T],
    ) -> [f32; T] {
        let groups = scales.len();
        let chunks = packed.len() / 64;
        // SAFETY (whole block): per 128 columns the loads read 64 bytes of `packed`, 128 of
        // each input's q and 16 of its corr; scales and steps are read by masked loads of
        // what is left of them. All inside the lengths the caller checked.
        unsafe {
            // The byte permute reads bits 5..0 of each index: with the 16-entry table four
            // times over, only the low nibble counts, so neither nibble needs a mask.
            let lut = _mm512_broadcast_i32x4(_mm_loadu_si128(W_U8.as_ptr() as *const __m128i));
            // Group 4q + j's scale over the four dword lanes of 128-bit lane j.
            let sidx: [__m512i; 4] = std::array::from_fn(|q| {
                _mm512_add_epi32(
                    _mm512_set1_epi32(4 * q as i32),
                    _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
                )
            });
            let mut total = [[_mm512_setzero_ps(); 2]; T];
            for c4 in (0..chunks).step_by(4) {
                // Sixteen groups' weight scales times each input's steps.
                let left = groups - 4 * c4;
                let ws = e8m0x16(scales.as_ptr().add(4 * c4), left);
                let m: __mmask16 = if left >= 16 {
                    0xFFFF
                } else {
                    (1u16 << left) - 1
                };
                let sv: [__m512; T] = std::array::from_fn(|t| {
                    _mm512_mul_ps(
                        ws,
                        _mm512_maskz_loadu_ps(m, xs[t].step.as_ptr().add(4 * c4)),
                    )
                });
                for (qi, &si) in sidx.iter().enumerate().take(chunks - c4) {
                    let c = c4 + qi;
                    let b = _mm512_loadu_si512(packed.as_ptr().add(64 * c) as *const __m512i);
                    _mm_prefetch::<_MM_HINT_T1>(
                        packed.as_ptr().wrapping_add(64 * c + PREFETCH) as *const i8
                    );
                    // Byte k of the load holds columns 2k (low nibble) and 2k + 1 (high).
                    let even = _mm512_permutexvar_epi8(b, lut);
                    let odd = _mm512_permutexvar_epi8(_mm512_srli_epi16(b, 4), lut);
                    for t in 0..T {
                        let q = xs[t].q.as_ptr().add(128 * c) as *const __m512i;
                        let mut acc =
                            _mm512_loadu_si512(xs[t].corr.as_ptr().add(16 * c) as *const __m512i);
                        acc = _mm512_dpbusd_epi32(acc, even, _mm512_loadu_si512(q));
                        acc = _mm512_dpbusd_epi32(acc, odd, _mm512_loadu_si512(q.add(1)));
                        let s = _mm512_permutexvar_ps(si, sv[t]);
                        total[t][qi & 1] =
                            _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), s, total[t][qi & 1]);
                    }
                }
            }
            total.map(|[a, b]| _mm512_reduce_add_ps(_mm512_add_ps(a, b)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::rowdot::fp4_row_dot_portable;
    use crate::model::formats::{e8m0_to_f32, fake_quant_i8_blocks};
    use crate::model::synth::SplitMix64;

    /// An input on the fast numerics' grid, with blocks of very different magnitudes.
    fn grid_input(r: &mut SplitMix64, n: usize) -> Vec<f32> {
        let mut x: Vec<f32> = (0..n)
            .map(|i| r.uniform() * 3.0 * if i % 64 < 32 { 1.0 } else { 1e-3 })
            .collect();
        fake_quant_i8_blocks(&mut x, 32);
        x
    }

    fn weights(r: &mut SplitMix64, cols: usize) -> (Vec<u8>, Vec<u8>) {
        let packed = (0..cols / 2).map(|_| r.next_u64() as u8).collect();
        let scales = (0..cols / 32)
            .map(|_| 110 + (r.next_u64() % 30) as u8)
            .collect();
        (packed, scales)
    }

    /// Σ W·x in f64 and Σ |W·x| (the bound's scale).
    fn exact(packed: &[u8], scales: &[u8], x: &[f32]) -> (f64, f64) {
        let (mut s, mut m) = (0f64, 0f64);
        for (c, &xv) in x.iter().enumerate() {
            let b = packed[c / 2];
            let n = if c % 2 == 0 { b & 15 } else { b >> 4 };
            let p = f64::from(E2M1_TABLE[n as usize])
                * f64::from(xv)
                * f64::from(e8m0_to_f32(scales[c / 32]));
            s += p;
            m += p.abs();
        }
        (s, m)
    }

    #[test]
    fn grid_gate() {
        let mut r = SplitMix64::new(3);
        assert!(prepare(&grid_input(&mut r, 256)).is_some());
        let off: Vec<f32> = (0..256).map(|i| i as f32 * 0.01 + 0.001).collect();
        assert!(prepare(&off).is_none(), "not on the grid");
        assert!(prepare(&[0.5; 96]).is_none(), "cols not a multiple of 128");
        let mut nan = grid_input(&mut r, 128);
        nan[5] = f32::NAN;
        assert!(prepare(&nan).is_none(), "NaN");
        // Layout: even columns first, corr = -12·Σq per 8 columns, step = 2^k / 2.
        let mut x = vec![0f32; 128];
        x[0] = 1.0; // block 0: k = -6, q = 64
        x[3] = -0.5; // q = -32
        let p = prepare(&x).expect("grid");
        assert_eq!((p.q[0], p.q[64 + 1]), (64, -32));
        assert_eq!(p.corr[0], -12 * (64 - 32));
        assert_eq!(p.step[0], 1.0 / 128.0);
    }

    #[test]
    fn simd_prepare_equals_portable() {
        let mut r = SplitMix64::new(33);
        for n in [128usize, 512, 4096] {
            let x = grid_input(&mut r, n);
            let (a, b) = (
                prepare(&x).expect("grid"),
                prepare_portable(&x).expect("grid"),
            );
            assert_eq!((a.q, a.corr, a.step), (b.q, b.corr, b.step), "{n}");
            let mut off = x.clone();
            off[n - 3] += off[n - 3].abs() * 1e-3 + 1e-30;
            assert!(prepare(&off).is_none() && prepare_portable(&off).is_none());
        }
    }

    #[test]
    fn fp4_matches_f64_and_portable() {
        if !available() {
            eprintln!("no AVX-512 VNNI on this CPU: kernel not exercised");
            return;
        }
        let mut r = SplitMix64::new(31);
        for cols in [128usize, 256, 384, 2048, 4096] {
            let (packed, scales) = weights(&mut r, cols);
            let x = grid_input(&mut r, cols);
            let got = fp4_row_dot(&packed, &scales, &prepare(&x).expect("grid"));
            let (want, mag) = exact(&packed, &scales, &x);
            // Exact per group; only the fp32 sum over cols/32 groups rounds.
            let bound = (cols / 32) as f64 * f64::from(f32::EPSILON) * mag;
            assert!(
                (f64::from(got) - want).abs() <= bound,
                "cols {cols}: {got} vs {want}"
            );
            let p = fp4_row_dot_portable(&packed, &scales, &x);
            assert!(
                (p - got).abs() as f64 <= 1e-6 * mag,
                "cols {cols}: portable {p}"
            );
        }
        crate::backend::cpu::rowdot::check_fp4_one_hot(|p, s, x| {
            fp4_row_dot(p, s, &prepare(x).expect("grid"))
        });
    }

    #[test]
    fn several_inputs_per_pass_equal_one_at_a_time() {
        if !available() {
            eprintln!("no AVX-512 VNNI on this CPU: kernel not exercised");
            return;
        }
        let mut r = SplitMix64::new(32);
        let cols = 640; // not a multiple of 512: a partial scale vector at the end
        let (packed, scales) = weights(&mut r, cols);
        let xs: Vec<Q8Input> = (0..MAX_INPUTS)
            .map(|_| prepare(&grid_input(&mut r, cols)).expect("grid"))
            .collect();
        for n in 1..=MAX_INPUTS {
            let refs: Vec<&Q8Input> = xs[..n].iter().collect();
            let mut o = vec![0f32; n];
            fp4_rows_dot(&packed, &scales, &refs, &mut o);
            for j in 0..n {
                assert_eq!(
                    o[j],
                    fp4_row_dot(&packed, &scales, refs[j]),
                    "{n} inputs, #{j}"
                );
            }
        }
    }
}
