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

/// Whether these kernels run here: the CPU has the instructions (AVX-512 F/BW/VBMI and
/// BF16). Whether a product may use them is the caller's choice ([`super::Kernels`]).
pub fn available() -> bool {
    cpu_has()
}

fn cpu_has() -> bool {
    super::has_x86!("avx512f", "avx512bw", "avx512vbmi", "avx512bf16")
}

/// `v` as bf16 bits when the conversion is exact and the value is not a bf16 subnormal
/// (which the instruction would read as zero).
pub(crate) fn exact_bf16(v: f32) -> Option<u16> {
    let b = v.to_bits();
    let exp = (b >> 23) & 0xFF;
    (b & 0xFFFF == 0 && (exp != 0 || b & 0x7FFF_FFFF == 0)).then_some((b >> 16) as u16)
}

/// Input for [`fp4_row_dot`]: per 128 columns (four 32-groups, `j` = 0..4), four runs of 32
/// values; run `s` (offset `o` = 16·(s&1), parity `p` = s>>1) holds at `8j + k` the column
/// `32j + o + 2k + p`, k < 8. This is the order in which the kernel's byte shuffles and
/// unpacks lay out the weights, so both operands line up lane by lane.
pub fn prepare_fp4(x: &[f32]) -> Option<Vec<u16>> {
    if !x.len().is_multiple_of(CHUNK) || !all_exact_bf16(x) {
        return None;
    }
    let mut out = vec![0u16; x.len()];
    for (xc, oc) in x.chunks_exact(CHUNK).zip(out.chunks_exact_mut(CHUNK)) {
        for (m, q) in xc.chunks_exact(4).enumerate() {
            for (i, v) in q.iter().enumerate() {
                oc[32 * i + m] = (v.to_bits() >> 16) as u16;
            }
        }
    }
    Some(out)
}

/// Whether every value is exactly a bf16 and none a bf16 subnormal ([`exact_bf16`] for all),
/// in one branch-free pass the compiler vectorizes.
fn all_exact_bf16(x: &[f32]) -> bool {
    x.iter().fold(true, |ok, v| {
        let b = v.to_bits();
        let low_zero = b & 0xFFFF == 0;
        let normal_or_zero = b & 0x7F80_0000 != 0 || b & 0x7FFF_FFFF == 0;
        ok & low_zero & normal_or_zero
    })
}

/// `v` as three bf16 values (returned as f32) with v = hi + mid + lo exactly: hi and mid are
/// truncations of v and of v - hi to 8 significant bits, so both differences are exact in
/// fp32 and lo keeps the last 8 bits. An fp32 input of an FP8/FP4 product runs on the bf16
/// kernels as these three inputs, every product exact; [`prepare_fp8`] / [`prepare_fp4`]
/// refuse the pieces only where one falls below the bf16 normal range (|v| < ~2^-110).
pub fn split3(v: f32) -> [f32; 3] {
    let trunc = |v: f32| f32::from_bits(v.to_bits() & 0xFFFF_0000);
    let hi = trunc(v);
    let r = v - hi;
    let mid = trunc(r);
    [hi, mid, r - mid]
}

/// Input for [`fp8_row_dot`]: per 64 columns, two runs of 32; run `s` holds at `8j + k` the
/// column `16j + 8s + k` (j < 4, k < 8).
pub fn prepare_fp8(x: &[f32]) -> Option<Vec<u16>> {
    if !x.len().is_multiple_of(CHUNK) || !all_exact_bf16(x) {
        return None;
    }
    let mut out = vec![0u16; x.len()];
    for (xc, oc) in x.chunks_exact(64).zip(out.chunks_exact_mut(64)) {
        for (j, q) in xc.chunks_exact(16).enumerate() {
            for (k, v) in q.iter().enumerate() {
                // Column 16j + 8s + k to 32s + 8j + k.
                oc[32 * (k / 8) + 8 * j + k % 8] = (v.to_bits() >> 16) as u16;
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

/// Most inputs one pass over a row serves (each chunk of weights is turned into bf16 once
/// and dotted with all of them).
pub const MAX_INPUTS: usize = 8;

/// out[i·n + j] = Σ_c W[i][c]·xs[j][c] (n = xs.len()) for consecutive FP4 rows (`packed`
/// cols/2 bytes each, one E8M0 scale per 32 columns) and up to [`MAX_INPUTS`] inputs laid
/// out by [`prepare_fp4`]. Needs [`available`] and cols % 128 == 0.
pub fn fp4_block(packed: &[u8], scales: &[u8], cols: usize, xs: &[&[u16]], out: &mut [f32]) {
    let rows = out.len().checked_div(xs.len()).unwrap_or(0);
    assert!(
        available()
            && cols.is_multiple_of(CHUNK)
            && packed.len() == rows * cols / 2
            && scales.len() == rows * cols / 32
            && xs.len() <= MAX_INPUTS
            && xs.iter().all(|x| x.len() == cols),
        "fp4 bf16 row shapes"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the instructions are available and the shapes match (asserted above).
    unsafe {
        by_len!(xs, &[u16], |a| x86::fp4_block(packed, scales, cols, a, out))
    }
}

/// out[i·n + j] = Σ_c W[r0 + i][c]·xs[j][c] for consecutive FP8 rows r0.. (`codes` cols
/// bytes each; `scales` the whole weight's 128x128 block scales, `cols`/128 per row block) and
/// up to [`MAX_INPUTS`] inputs laid out by [`prepare_fp8`]. Needs [`available`] and
/// cols % 128 == 0.
pub fn fp8_block(
    codes: &[u8],
    scales: &[u8],
    r0: usize,
    cols: usize,
    xs: &[&[u16]],
    out: &mut [f32],
) {
    let rows = out.len().checked_div(xs.len()).unwrap_or(0);
    let bc = cols / FP8_BLOCK;
    assert!(
        available()
            && cols.is_multiple_of(CHUNK)
            && codes.len() == rows * cols
            && (rows == 0 || scales.len() >= (r0 + rows - 1) / FP8_BLOCK * bc + bc)
            && xs.len() <= MAX_INPUTS
            && xs.iter().all(|x| x.len() == cols),
        "fp8 bf16 row shapes"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the instructions are available and the shapes match (asserted above).
    unsafe {
        by_len!(xs, &[u16], |a| x86::fp8_block(
            codes, scales, r0, cols, a, out
        ))
    }
}

/// One row, several inputs.
#[cfg(test)]
pub fn fp4_rows_dot(packed: &[u8], scales: &[u8], xs: &[&[u16]], out: &mut [f32]) {
    fp4_block(packed, scales, 2 * packed.len(), xs, out)
}

#[cfg(test)]
pub fn fp8_rows_dot(codes: &[u8], scale_row: &[u8], xs: &[&[u16]], out: &mut [f32]) {
    fp8_block(codes, scale_row, 0, codes.len(), xs, out)
}

/// Single-input forms (what decode uses).
#[cfg(test)]
pub fn fp4_row_dot(packed: &[u8], scales: &[u8], xp: &[u16]) -> f32 {
    let mut o = [0f32];
    fp4_rows_dot(packed, scales, &[xp], &mut o);
    o[0]
}

#[cfg(test)]
pub fn fp8_row_dot(codes: &[u8], scale_row: &[u8], xp: &[u16]) -> f32 {
    let mut o = [0f32];
    fp8_rows_dot(codes, scale_row, &[xp], &mut o);
    o[0]
}

/// Run `$call` with `$a` bound to `$xs` as an array, so the kernel is instantiated for the
/// number of inputs (0..=MAX_INPUTS, asserted by the callers).
macro_rules! by_len {
    ($xs:expr, $ty:ty, |$a:ident| $body:expr) => {
        match $xs.len() {
            0 => {}
            1 => {
                let $a: [$ty; 1] = std::array::from_fn(|i| $xs[i]);
                $body
            }
            2 => {
                let $a: [$ty; 2] = std::array::from_fn(|i| $xs[i]);
                $body
            }
            3 => {
                let $a: [$ty; 3] = std::array::from_fn(|i| $xs[i]);
                $body
            }
            4 => {
                let $a: [$ty; 4] = std::array::from_fn(|i| $xs[i]);
                $body
            }
            5 => {
                let $a: [$ty; 5] = std::array::from_fn(|i| $xs[i]);
                $body
            }
            6 => {
                let $a: [$ty; 6] = std::array::from_fn(|i| $xs[i]);
                $body
            }
            7 => {
                let $a: [$ty; 7] = std::array::from_fn(|i| $xs[i]);
                $body
            }
            8 => {
                let $a: [$ty; 8] = std::array::from_fn(|i| $xs[i]);
                $body
            }
            _ => unreachable!("at most MAX_INPUTS inputs (asserted)"),
        }
    };
}
pub(crate) use by_len;

/// `x` as bf16 bits in its own order when every value is exactly a bf16 (see
/// [`prepare_fp4`]); None otherwise.
pub fn exact_rows(x: &[f32]) -> Option<Vec<u16>> {
    x.iter().map(|&v| exact_bf16(v)).collect()
}

/// Columns per k-block of the GEMM: each output's register sum is reduced across its lanes
/// and added once per k-block, so longer blocks cost fewer reductions, while a block of 6
/// inputs (48 KB) and the tile's 32 rows (256 KB) of it stay in L2. A 2048-token prefill on
/// the bench model: 27-28 s at 1024 columns, 23-24 s at 4096 (8192: no further gain).
const GEMM_KB: usize = 4096;

/// out[i, j] = W[i] · x[j] for a bf16 tile `w` [nr, cols] and inputs `x` [t, cols] (bf16
/// bits), fp32 accumulation: 4 weight rows x 6 inputs per register block, k-blocked.
/// Needs [`available`] and cols % 32 == 0.
pub fn gemm_tile(w: &[u16], nr: usize, x: &[u16], t: usize, cols: usize, out: &mut [f32]) {
    assert!(
        available()
            && cols.is_multiple_of(32)
            && w.len() >= nr * cols
            && x.len() >= t * cols
            && out.len() >= nr * t,
        "bf16 gemm tile shapes"
    );
    out[..nr * t].fill(0.0);
    #[cfg(target_arch = "x86_64")]
    for k0 in (0..cols).step_by(GEMM_KB) {
        let kn = GEMM_KB.min(cols - k0);
        // SAFETY: the instructions are available and every index stays inside the shapes
        // asserted above (k0 + kn <= cols).
        unsafe { x86::gemm_block(w, nr, x, t, cols, k0, kn, out) };
    }
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
pub(crate) mod x86 {
    use super::{E2M1_BF16, E4M3_BF16};
    use crate::model::formats::{FP8_BLOCK, e8m0_to_f32};
    use std::arch::x86_64::*;

    /// Bytes ahead of the current load that are prefetched (a hint: past the end is harmless):
    /// into L2 far enough ahead to cover the DRAM latency (one core streaming wo_b from
    /// memory: 13.5 GB/s at 1 KB ahead, 28 GB/s at 8 KB), and for the FP4 kernel also into
    /// L1 just ahead (one core streaming the experts, `cargo bench --bench kernels`, paired
    /// with the read loop: 71 % of the loop with the L1 hint alone, 79 % with the L2 one
    /// alone, 84-90 % with both).
    const PREFETCH: usize = 1024;
    const PREFETCH_L2: usize = 8192;

    fn byte_tables<const N: usize>(t: &[u16; N]) -> ([u8; N], [u8; N]) {
        (t.map(|v| v as u8), t.map(|v| (v >> 8) as u8))
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn bh(v: __m512i) -> __m512bh {
        // SAFETY: both are 512-bit plain-data vectors.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
    }

    /// Row after row of [`fp4_rows`] into out [rows, T].
    ///
    /// # Safety
    /// As [`fp4_rows`] for each row; `packed`/`scales` hold out.len()/T rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn fp4_block<const T: usize>(
        packed: &[u8],
        scales: &[u8],
        cols: usize,
        xp: [&[u16]; T],
        out: &mut [f32],
    ) {
        let (pb, sb) = (cols / 2, cols / 32);
        for (i, o) in out.chunks_exact_mut(T).enumerate() {
            let (p, s) = (&packed[i * pb..(i + 1) * pb], &scales[i * sb..(i + 1) * sb]);
            // SAFETY: one row of the shapes the caller checked.
            o.copy_from_slice(&unsafe { fp4_rows(p, s, xp) });
        }
    }

    /// Row after row of [`fp8_rows`] into out [rows, T], rows r0.. of the weight.
    ///
    /// # Safety
    /// As [`fp8_rows`] for each row; `codes` holds out.len()/T rows, `scales` their blocks.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512bf16")]
    pub unsafe fn fp8_block<const T: usize>(
        codes: &[u8],
        scales: &[u8],
        r0: usize,
        cols: usize,
        xp: [&[u16]; T],
        out: &mut [f32],
    ) {
        let bc = cols / FP8_BLOCK;
        for (i, o) in out.chunks_exact_mut(T).enumerate() {
            let sr = (r0 + i) / FP8_BLOCK * bc;
            let (c, s) = (&codes[i * cols..(i + 1) * cols], &scales[sr..sr + bc]);
            // SAFETY: one row of the shapes the caller checked.
            o.copy_from_slice(&unsafe { fp8_rows(c, s, xp) });
        }
    }

    /// # Safety
    /// Needs AVX-512 F/BW/BF16; `packed` = cols/2, `scales` = cols/32, `xp` = cols,
    /// cols % 128 == 0 (checked by the caller).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn fp4_rows<const T: usize>(
        packed: &[u8],
        scales: &[u8],
        xp: [&[u16]; T],
    ) -> [f32; T] {
        let groups = scales.len();
        let cols = 2 * packed.len();
        // SAFETY (whole block): per 128 columns the loads read 64 bytes of `packed`, 128 u16
        // of each input and the chunk's 4 scale bytes (or 16 by a load masked to the `groups`
        // bytes there are). All inside the lengths the caller checked.
        unsafe {
            // The word permute reads bits 4..0 of each index: with the 16-entry table twice
            // over, bit 4 (the next nibble's lowest bit) does not matter, so the nibble planes
            // need shifts but no masks.
            let half = _mm256_loadu_si256(E2M1_BF16.as_ptr() as *const __m256i);
            let lut = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(half), half);
            let mut total = [_mm512_setzero_ps(); T];
            let mut s16 = _mm512_setzero_ps();
            let sidx: [__m512i; 4] = std::array::from_fn(|q| {
                let q = 4 * q as i32;
                _mm512_add_epi32(
                    _mm512_set1_epi32(q),
                    _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
                )
            });
            // Without 0 or 255 among the row's scales (all real ones), a chunk's scale vector
            // comes without a permute (`e8m0x4_lanes`): the permute unit is what limits this
            // kernel.
            let plain = plain_e8m0(scales);
            for c in 0..cols / 128 {
                let sv = if plain {
                    e8m0x4_lanes(scales.as_ptr().add(4 * c))
                } else {
                    if c % 4 == 0 {
                        s16 = e8m0x16(scales.as_ptr().add(4 * c), groups - 4 * c);
                    }
                    // Group 4c + j's scale over the four fp32 lanes of 128-bit lane j.
                    _mm512_permutexvar_ps(sidx[c % 4], s16)
                };
                // Word m of the 64 bytes holds columns 4m..4m+4 of the chunk, one per nibble;
                // the four nibble planes become bf16 once and serve every input.
                let b = _mm512_loadu_si512(packed.as_ptr().add(64 * c) as *const __m512i);
                // The stream runs ahead of the hardware prefetcher at row starts.
                _mm_prefetch::<_MM_HINT_T0>(
                    packed.as_ptr().wrapping_add(64 * c + PREFETCH) as *const i8
                );
                _mm_prefetch::<_MM_HINT_T1>(
                    packed.as_ptr().wrapping_add(64 * c + PREFETCH_L2) as *const i8
                );
                let w = [
                    b,
                    _mm512_srli_epi16(b, 4),
                    _mm512_srli_epi16(b, 8),
                    _mm512_srli_epi16(b, 12),
                ]
                .map(|n| bh(_mm512_permutexvar_epi16(n, lut)));
                for tt in 0..T {
                    let x = xp[tt].as_ptr().add(128 * c) as *const __m512i;
                    // One chain per chunk: chunks are independent, so the out-of-order core
                    // overlaps their latencies and no add joins two partial sums.
                    let mut acc = _mm512_setzero_ps();
                    for (i, &wi) in w.iter().enumerate() {
                        acc = _mm512_dpbf16_ps(acc, wi, bh(_mm512_loadu_si512(x.add(i))));
                    }
                    total[tt] = _mm512_fmadd_ps(acc, sv, total[tt]);
                }
            }
            total.map(|v| _mm512_reduce_add_ps(v))
        }
    }

    /// The four E8M0 bytes at `p` as f32 over the four fp32 lanes of 128-bit lane j (byte j),
    /// by one rotate and one mask: every dword holds the four bytes, and lane j rotates byte j
    /// into the exponent field. Exactly 2^(s-127) for the codes 1..=254 (see [`plain_e8m0`]).
    ///
    /// # Safety
    /// Needs AVX-512 F; `p` valid for 4 bytes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn e8m0x4_lanes(p: *const u8) -> __m512 {
        // SAFETY: 4 readable bytes (the caller's contract).
        let d = unsafe { (p as *const i32).read_unaligned() };
        let rot = _mm512_set_epi32(31, 31, 31, 31, 7, 7, 7, 7, 15, 15, 15, 15, 23, 23, 23, 23);
        _mm512_castsi512_ps(_mm512_and_si512(
            _mm512_rolv_epi32(_mm512_set1_epi32(d), rot),
            _mm512_set1_epi32(0x7F80_0000),
        ))
    }

    /// Whether no scale byte is 0 or 255 (the two E8M0 codes that are not 2^(s-127) with a
    /// normal f32 exponent field).
    ///
    /// # Safety
    /// Needs AVX-512 F/BW.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn plain_e8m0(scales: &[u8]) -> bool {
        let mut odd = 0u64;
        for c in scales.chunks(64) {
            let m = u64::MAX >> (64 - c.len());
            // SAFETY: the masked load touches only the chunk's bytes.
            let v = unsafe { _mm512_maskz_loadu_epi8(m, c.as_ptr() as *const i8) };
            odd |= _mm512_mask_cmpeq_epi8_mask(m, v, _mm512_setzero_si512())
                | _mm512_mask_cmpeq_epi8_mask(m, v, _mm512_set1_epi8(-1));
        }
        odd == 0
    }

    /// Up to 16 E8M0 bytes at `p` (`avail` of them readable) as f32, exactly as
    /// `e8m0_to_f32`: 2^(s-127), 0 -> 2^-127, 255 -> NaN.
    ///
    /// # Safety
    /// Needs AVX-512 F/BW; `p` valid for min(avail, 16) bytes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(crate) unsafe fn e8m0x16(p: *const u8, avail: usize) -> __m512 {
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

    /// Adds the k-block [k0, k0 + kn) of every out[i, j] (see `gemm_tile`).
    ///
    /// # Safety
    /// Needs AVX-512 F/BF16; w [nr, cols], x [t, cols], out [nr, t]; k0 + kn <= cols,
    /// kn % 32 == 0 (checked by the caller).
    #[allow(clippy::too_many_arguments)] // the two operands, their shapes and the k-block
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn gemm_block(
        w: &[u16],
        nr: usize,
        x: &[u16],
        t: usize,
        cols: usize,
        k0: usize,
        kn: usize,
        out: &mut [f32],
    ) {
        // Inputs outer, rows inner: a block of 6 inputs (12 KB of this k-block) stays in L1
        // while every row of the tile (in L2) passes over it, so the inputs are read once
        // per tile; rows outer read all t inputs again for every 4 rows, from beyond L2 once
        // t is large (a 2048-token chunk: 4 MB per k-block). Each out[i, j] sums the same
        // products in the same order either way.
        let mut j = 0;
        while j < t {
            let c = (t - j).min(6);
            let mut i = 0;
            while i < nr {
                let r = (nr - i).min(4);
                // SAFETY: rows i..i+r of w, inputs j..j+c of x, columns k0..k0+kn: inside
                // the shapes the caller checked.
                unsafe {
                    match (r, c) {
                        (4, 6) => block::<4, 6>(w, x, cols, i, j, k0, kn, out, t),
                        (4, _) => block_dyn::<4>(w, x, cols, i, j, c, k0, kn, out, t),
                        (3, _) => block_dyn::<3>(w, x, cols, i, j, c, k0, kn, out, t),
                        (2, _) => block_dyn::<2>(w, x, cols, i, j, c, k0, kn, out, t),
                        _ => block_dyn::<1>(w, x, cols, i, j, c, k0, kn, out, t),
                    }
                }
                i += r;
            }
            j += c;
        }
    }

    /// R rows x C inputs over one k-block, accumulated in registers, added to `out`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn block<const R: usize, const C: usize>(
        w: &[u16],
        x: &[u16],
        cols: usize,
        i: usize,
        j: usize,
        k0: usize,
        kn: usize,
        out: &mut [f32],
        t: usize,
    ) {
        // SAFETY: see gemm_block; pointers index rows/inputs within their slices.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); C]; R];
            let wp: [*const u16; R] = std::array::from_fn(|a| w.as_ptr().add((i + a) * cols + k0));
            let xp: [*const u16; C] = std::array::from_fn(|b| x.as_ptr().add((j + b) * cols + k0));
            let mut k = 0;
            while k < kn {
                let wv: [__m512i; R] =
                    std::array::from_fn(|a| _mm512_loadu_si512(wp[a].add(k) as *const _));
                for b in 0..C {
                    let xv = bh(_mm512_loadu_si512(xp[b].add(k) as *const _));
                    for a in 0..R {
                        acc[a][b] = _mm512_dpbf16_ps(acc[a][b], bh(wv[a]), xv);
                    }
                }
                k += 32;
            }
            for a in 0..R {
                for b in 0..C {
                    out[(i + a) * t + j + b] += _mm512_reduce_add_ps(acc[a][b]);
                }
            }
        }
    }

    /// `block` for a ragged edge (c < 6 inputs), one input at a time.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn block_dyn<const R: usize>(
        w: &[u16],
        x: &[u16],
        cols: usize,
        i: usize,
        j: usize,
        c: usize,
        k0: usize,
        kn: usize,
        out: &mut [f32],
        t: usize,
    ) {
        for b in 0..c {
            // SAFETY: as in `block`, for the single input j + b.
            unsafe { block::<R, 1>(w, x, cols, i, j + b, k0, kn, out, t) };
        }
    }

    /// # Safety
    /// Needs AVX-512 F/BW/VBMI/BF16; `codes` = `xp` = cols, `scale_row` = cols/128,
    /// cols % 128 == 0 (checked by the caller).
    #[allow(clippy::needless_range_loop)] // blk and half also drive the column offsets
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512bf16")]
    pub unsafe fn fp8_rows<const T: usize>(
        codes: &[u8],
        scale_row: &[u8],
        xp: [&[u16]; T],
    ) -> [f32; T] {
        let (lo_t, hi_t) = byte_tables(&E4M3_BF16);
        // SAFETY (whole block): per 128-column block the loads read 128 bytes of `codes` and
        // 128 u16 of each input, inside the lengths the caller checked.
        unsafe {
            let ld = |t: &[u8; 128], h: usize| _mm512_loadu_si512(t.as_ptr().add(64 * h) as _);
            let (l0, l1, h0, h1) = (ld(&lo_t, 0), ld(&lo_t, 1), ld(&hi_t, 0), ld(&hi_t, 1));
            let sign = _mm512_set1_epi8(0x80u8 as i8);
            let mut total = [_mm512_setzero_ps(); T];
            for blk in 0..codes.len() / FP8_BLOCK {
                let mut acc = [[_mm512_setzero_ps(); 2]; T];
                for half in 0..2 {
                    let c0 = FP8_BLOCK * blk + 64 * half;
                    // Lane j = codes c0 + 16j .. c0 + 16j + 16.
                    let b = _mm512_loadu_si512(codes.as_ptr().add(c0) as *const __m512i);
                    _mm_prefetch::<_MM_HINT_T1>(
                        codes.as_ptr().wrapping_add(c0 + PREFETCH_L2) as *const i8
                    );
                    // The two-table byte permute reads bits 6..0 of each index: the code's
                    // magnitude, so the sign bit needs no mask. It goes to the high byte
                    // in one ternary bitwise op: table | (code & 0x80), imm 0xF8 = A | (B & C).
                    let l = _mm512_permutex2var_epi8(l0, b, l1);
                    let h = _mm512_ternarylogic_epi32::<0xF8>(
                        _mm512_permutex2var_epi8(h0, b, h1),
                        b,
                        sign,
                    );
                    let (w0, w1) = (
                        bh(_mm512_unpacklo_epi8(l, h)),
                        bh(_mm512_unpackhi_epi8(l, h)),
                    );
                    for tt in 0..T {
                        let x = xp[tt].as_ptr().add(c0) as *const __m512i;
                        acc[tt][half] =
                            _mm512_dpbf16_ps(acc[tt][half], w0, bh(_mm512_loadu_si512(x)));
                        acc[tt][half] =
                            _mm512_dpbf16_ps(acc[tt][half], w1, bh(_mm512_loadu_si512(x.add(1))));
                    }
                }
                let sc = _mm512_set1_ps(e8m0_to_f32(scale_row[blk]));
                for tt in 0..T {
                    total[tt] =
                        _mm512_fmadd_ps(_mm512_add_ps(acc[tt][0], acc[tt][1]), sc, total[tt]);
                }
            }
            total.map(|v| _mm512_reduce_add_ps(v))
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
        crate::backend::cpu::rowdot::check_fp4_one_hot(|p, s, x| {
            fp4_row_dot(p, s, &prepare_fp4(x).expect("grid"))
        });
    }

    /// Every E8M0 code in every group position of a row whose other scales are ordinary and
    /// distinct: the codes 0 (2^-127, a subnormal scale) and 255 (NaN) take the kernel's
    /// general scale path, the rest the rotated one; both must give E2M1 · x · 2^(s-127)
    /// exactly, each group with its own scale.
    #[test]
    fn fp4_every_scale_code() {
        if !available() {
            eprintln!("no AVX-512 BF16 on this CPU: kernel not exercised");
            return;
        }
        for g in 0..8 {
            let h = (g + 5) % 8;
            for code in 0..=255u8 {
                let mut scales: Vec<u8> = (0..8).map(|i| 116 + i as u8).collect();
                scales[g] = code;
                // Column 32g + 4 holds nibble 5 (3.0), column 32h + 15 nibble 11 (-1.5).
                let mut packed = vec![0u8; 128];
                packed[16 * g + 2] = 0x05;
                packed[16 * h + 7] = 0xB0;
                let mut x = vec![0f32; 256];
                x[32 * g + 4] = 0.75;
                x[32 * h + 15] = -1.25;
                let want = 3.0 * 0.75 * e8m0_to_f32(code) + -1.5 * -1.25 * e8m0_to_f32(scales[h]);
                let got = fp4_row_dot(&packed, &scales, &prepare_fp4(&x).expect("bf16"));
                assert!(
                    got == want || (got.is_nan() && want.is_nan()),
                    "group {g}, scale code {code}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn several_inputs_per_pass_equal_one_at_a_time() {
        if !available() {
            eprintln!("no AVX-512 BF16 on this CPU: kernel not exercised");
            return;
        }
        let mut r = SplitMix64::new(23);
        let cols = 1024;
        let packed: Vec<u8> = (0..cols / 2).map(|_| r.next_u64() as u8).collect();
        let s4: Vec<u8> = (0..cols / 32)
            .map(|_| 115 + (r.next_u64() % 20) as u8)
            .collect();
        let codes: Vec<u8> = (0..cols)
            .map(|_| r.next_u64() as u8)
            .map(|c| if c & 0x7F == 0x7F { 0 } else { c })
            .collect();
        let s8: Vec<u8> = (0..cols / 128)
            .map(|_| 120 + (r.next_u64() % 10) as u8)
            .collect();
        let xs: Vec<Vec<f32>> = (0..MAX_INPUTS).map(|_| grid_input(&mut r, cols)).collect();
        for n in 1..=MAX_INPUTS {
            let p4: Vec<Vec<u16>> = xs[..n]
                .iter()
                .map(|x| prepare_fp4(x).expect("grid"))
                .collect();
            let p8: Vec<Vec<u16>> = xs[..n]
                .iter()
                .map(|x| prepare_fp8(x).expect("grid"))
                .collect();
            let r4: Vec<&[u16]> = p4.iter().map(|v| v.as_slice()).collect();
            let r8: Vec<&[u16]> = p8.iter().map(|v| v.as_slice()).collect();
            let (mut o4, mut o8) = (vec![0f32; n], vec![0f32; n]);
            fp4_rows_dot(&packed, &s4, &r4, &mut o4);
            fp8_rows_dot(&codes, &s8, &r8, &mut o8);
            for j in 0..n {
                // Same instructions in the same order per input: bit-identical.
                assert_eq!(
                    o4[j],
                    fp4_row_dot(&packed, &s4, r4[j]),
                    "fp4 {n} inputs, #{j}"
                );
                assert_eq!(
                    o8[j],
                    fp8_row_dot(&codes, &s8, r8[j]),
                    "fp8 {n} inputs, #{j}"
                );
                let p = fp4_row_dot_portable(&packed, &s4, &xs[j]);
                assert!(
                    (o4[j] - p).abs() <= 1e-5 * p.abs().max(1.0),
                    "fp4 vs portable"
                );
            }
        }
    }

    #[test]
    fn gemm_tile_equals_f64_reference() {
        if !available() {
            eprintln!("no AVX-512 BF16 on this CPU: kernel not exercised");
            return;
        }
        let mut r = SplitMix64::new(24);
        // Ragged shapes: rows not a multiple of 4, inputs not of 6, cols across k-blocks.
        for (nr, t, cols) in [
            (7usize, 13usize, 1056usize),
            (4, 6, 64),
            (1, 1, 32),
            (9, 5, 2080),
            (5, 7, 4096 + 2080),
        ] {
            let w: Vec<f32> =
                grid_input(&mut r, nr * cols.div_ceil(128) * 128)[..nr * cols].to_vec();
            let x: Vec<f32> = grid_input(&mut r, t * cols.div_ceil(128) * 128)[..t * cols].to_vec();
            let (wb, xb) = (exact_rows(&w).expect("grid"), exact_rows(&x).expect("grid"));
            let mut out = vec![f32::NAN; nr * t];
            gemm_tile(&wb, nr, &xb, t, cols, &mut out);
            for i in 0..nr {
                for j in 0..t {
                    let (mut s, mut m) = (0f64, 0f64);
                    for k in 0..cols {
                        let p = w[i * cols + k] as f64 * x[j * cols + k] as f64;
                        s += p;
                        m += p.abs();
                    }
                    let v = out[i * t + j] as f64;
                    assert!(
                        (v - s).abs() <= 1e-6 * m.max(1e-30),
                        "{nr}x{t}x{cols} [{i},{j}]: {v} vs {s}"
                    );
                }
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
