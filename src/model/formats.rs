//! Number formats of the official checkpoint (spec §4): E4M3FN, E8M0, E2M1, BF16, and the
//! two block layouts built from them (FP8 weights with 128x128 scales, FP4 rows with 1x32
//! scales). Small, branch-free building blocks: lookup tables for decoding, exact encoders
//! for the QAT simulation and for `dsflash synth`.

/// Largest finite E4M3FN magnitude.
pub const E4M3_MAX: f32 = 448.0;
/// Largest E2M1 magnitude.
pub const E2M1_MAX: f32 = 6.0;
/// FP8 weight block edge (both dimensions).
pub const FP8_BLOCK: usize = 128;
/// FP4 scale group along the input dimension.
pub const FP4_GROUP: usize = 32;

const fn e4m3_decode_const(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((b >> 3) & 0x0F) as i32;
    let m = (b & 0x07) as f32;
    if e == 15 && (b & 0x07) == 7 {
        return f32::NAN;
    }
    // Exact powers of two built from the exponent field (const-evaluable).
    let mut p = 1.0f32;
    let mut k = if e == 0 { -6 } else { e - 7 };
    while k > 0 {
        p *= 2.0;
        k -= 1;
    }
    while k < 0 {
        p *= 0.5;
        k += 1;
    }
    let frac = if e == 0 { m / 8.0 } else { 1.0 + m / 8.0 };
    sign * frac * p
}

pub(crate) const fn build_e4m3_table() -> [f32; 256] {
    let mut t = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = e4m3_decode_const(i as u8);
        i += 1;
    }
    t
}

/// E4M3FN code -> value (index = byte). 0x7F and 0xFF are NaN.
pub static E4M3_TABLE: [f32; 256] = build_e4m3_table();

/// E2M1 nibble -> value (bit 3 = sign).
pub const E2M1_TABLE: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Decode one E4M3FN byte.
#[inline(always)]
pub fn e4m3_to_f32(b: u8) -> f32 {
    E4M3_TABLE[b as usize]
}

/// Decode one E8M0 scale byte: 2^(s-127); 255 is NaN; 0 is 2^-127 (an f32 subnormal).
#[inline(always)]
pub fn e8m0_to_f32(s: u8) -> f32 {
    match s {
        0 => f32::from_bits(0x0040_0000),
        255 => f32::NAN,
        _ => f32::from_bits((s as u32) << 23),
    }
}

/// BF16 bits -> f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// f32 -> BF16 bits, round to nearest even (NaN stays NaN).
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

/// Read little-endian BF16 element `i` of a byte slice.
#[inline(always)]
pub fn bf16_at(bytes: &[u8], i: usize) -> f32 {
    bf16_to_f32(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]))
}

/// Read little-endian f32 element `i` of a byte slice.
#[inline(always)]
pub fn f32_at(bytes: &[u8], i: usize) -> f32 {
    f32::from_le_bytes([
        bytes[4 * i],
        bytes[4 * i + 1],
        bytes[4 * i + 2],
        bytes[4 * i + 3],
    ])
}

/// Read little-endian i64 element `i` of a byte slice.
#[inline(always)]
pub fn i64_at(bytes: &[u8], i: usize) -> i64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&bytes[8 * i..8 * i + 8]);
    i64::from_le_bytes(a)
}

/// Encode f32 to E4M3FN with round-to-nearest-even, saturating at ±448 (the clamp the
/// reference applies before casting). NaN maps to the NaN code 0x7F.
#[cfg(test)]
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7F;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs();
    if a >= E4M3_MAX {
        return sign | 0x7E;
    }
    let min_normal = 2f32.powi(-6);
    let code = if a < min_normal {
        // Subnormal grid: multiples of 2^-9; 8 * 2^-9 rounds up into the first normal (code 8).
        (a * 512.0).round_ties_even() as u8
    } else {
        let e = a.log2().floor() as i32;
        // log2 may be off by one ulp near powers of two: fix the exponent exactly.
        let e = if 2f32.powi(e) > a {
            e - 1
        } else if 2f32.powi(e + 1) <= a {
            e + 1
        } else {
            e
        };
        let mant = a / 2f32.powi(e) - 1.0; // in [0, 1), exact
        let q = (mant * 8.0).round_ties_even() as i32;
        let (e, q) = if q == 8 { (e + 1, 0) } else { (e, q) };
        (((e + 7) as u8) << 3) | q as u8
    };
    sign | code.min(0x7E)
}

/// Round f32 to the E4M3FN grid (saturating), returned as f32.
#[inline]
pub fn round_e4m3(x: f32) -> f32 {
    // Bit arithmetic, equal to e4m3_to_f32(f32_to_e4m3(x)) for every input (tested).
    let a = x.abs();
    if a.is_nan() {
        return e4m3_to_f32(0x7F);
    }
    let r = if a >= E4M3_MAX {
        E4M3_MAX
    } else if a < 0.015625 {
        // Subnormal grid, multiples of 2^-9: round half to even with the 1.5·2^23 trick.
        const M: f32 = 12_582_912.0;
        ((a * 512.0 + M) - M) / 512.0
    } else {
        // Keep 3 mantissa bits, rounding half to even (a carry moves into the exponent).
        let b = a.to_bits();
        let half = (1u32 << 19) - 1 + ((b >> 20) & 1);
        f32::from_bits((b + half) & !((1u32 << 20) - 1)).min(E4M3_MAX)
    };
    if x.is_sign_negative() { -r } else { r }
}

/// Encode |x| <= 6 to an E2M1 nibble: nearest value, ties to the even code.
pub fn f32_to_e2m1(x: f32) -> u8 {
    let a = x.abs().min(E2M1_MAX);
    let mut best = 0usize;
    let mut best_d = f32::INFINITY;
    for (code, v) in E2M1_TABLE[..8].iter().enumerate() {
        let d = (a - v).abs();
        if d < best_d || (d == best_d && code % 2 == 0) {
            best = code;
            best_d = d;
        }
    }
    let sign = if x.is_sign_negative() && best != 0 {
        8
    } else {
        0
    };
    (best as u8) | sign
}

/// Smallest power-of-two scale byte (E8M0) with 2^(s-127) >= x, for x > 0.
pub fn e8m0_ceil(x: f32) -> u8 {
    if x.is_nan() || x <= 0.0 {
        return 0;
    }
    if x.is_infinite() {
        // No finite scale covers it: the NaN code, so the overflow shows in the result
        // (as the reference's cast to float8_e8m0fnu gives) instead of saturating.
        return 255;
    }
    let b = x.to_bits();
    let exp = (b >> 23) & 0xFF;
    if (1..255).contains(&exp) {
        // A normal float: 2^(exp-127) times 1.m; the ceiling adds one unless m is 0.
        let e = exp as i32 - 127 + i32::from(b & 0x7F_FFFF != 0);
        return (e + 127).clamp(0, 254) as u8;
    }
    e8m0_ceil_by_log(x)
}

/// [`e8m0_ceil`] through log2 with exact corrections: what the bit arithmetic replaces for
/// normal floats (and the check it is tested against); subnormals still take this path.
fn e8m0_ceil_by_log(x: f32) -> u8 {
    let mut e = x.log2().ceil() as i32;
    if 2f64.powi(e) < x as f64 {
        e += 1;
    }
    if 2f64.powi(e - 1) >= x as f64 {
        e -= 1;
    }
    (e + 127).clamp(0, 254) as u8
}

/// Dequantize one row of an FP8 weight: `codes` is the row (in elements), `scale_row` the
/// row of the `.scale` tensor for this row's 128-row block (one byte per 128 columns).
pub fn dequant_fp8_row(codes: &[u8], scale_row: &[u8], out: &mut [f32]) {
    debug_assert_eq!(codes.len(), out.len());
    for (b, (cs, os)) in codes
        .chunks(FP8_BLOCK)
        .zip(out.chunks_mut(FP8_BLOCK))
        .enumerate()
    {
        let s = e8m0_to_f32(scale_row[b]);
        for (o, &c) in os.iter_mut().zip(cs) {
            *o = e4m3_to_f32(c) * s;
        }
    }
}

/// Dequantize one row of an FP4 weight: `packed` holds cols/2 bytes (low nibble = even
/// column), `scales` one E8M0 byte per 32 columns; `out` has cols elements.
pub fn dequant_fp4_row(packed: &[u8], scales: &[u8], out: &mut [f32]) {
    debug_assert_eq!(packed.len() * 2, out.len());
    for (g, (ps, os)) in packed
        .chunks(FP4_GROUP / 2)
        .zip(out.chunks_mut(FP4_GROUP))
        .enumerate()
    {
        let s = e8m0_to_f32(scales[g]);
        for (k, &b) in ps.iter().enumerate() {
            os[2 * k] = E2M1_TABLE[(b & 0x0F) as usize] * s;
            os[2 * k + 1] = E2M1_TABLE[(b >> 4) as usize] * s;
        }
    }
}

/// Dequantize one BF16 row.
pub fn dequant_bf16_row(bytes: &[u8], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = bf16_to_f32(u16::from_le_bytes([b[0], b[1]]));
    }
}

/// Quantize an f32 matrix [rows, cols] to FP8 E4M3 codes + E8M0 128x128 block scales
/// (scale = smallest power of two with amax/scale <= 448), as the release stores weights.
#[cfg(test)]
pub fn quantize_fp8_matrix(w: &[f32], rows: usize, cols: usize) -> (Vec<u8>, Vec<u8>) {
    let br = rows.div_ceil(FP8_BLOCK);
    let bc = cols.div_ceil(FP8_BLOCK);
    let mut scales = vec![0u8; br * bc];
    let mut codes = vec![0u8; rows * cols];
    for bi in 0..br {
        for bj in 0..bc {
            let mut amax = 0f32;
            for r in bi * FP8_BLOCK..((bi + 1) * FP8_BLOCK).min(rows) {
                for c in bj * FP8_BLOCK..((bj + 1) * FP8_BLOCK).min(cols) {
                    amax = amax.max(w[r * cols + c].abs());
                }
            }
            let s = e8m0_ceil(amax.max(1e-30) / E4M3_MAX);
            scales[bi * bc + bj] = s;
            let inv = 1.0 / e8m0_to_f32(s);
            for r in bi * FP8_BLOCK..((bi + 1) * FP8_BLOCK).min(rows) {
                for c in bj * FP8_BLOCK..((bj + 1) * FP8_BLOCK).min(cols) {
                    codes[r * cols + c] = f32_to_e4m3(w[r * cols + c] * inv);
                }
            }
        }
    }
    (codes, scales)
}

/// Quantize an f32 matrix [rows, cols] to packed E2M1 + E8M0 1x32 scales.
#[cfg(test)]
pub fn quantize_fp4_matrix(w: &[f32], rows: usize, cols: usize) -> (Vec<u8>, Vec<u8>) {
    let groups = cols / FP4_GROUP;
    let mut scales = vec![0u8; rows * groups];
    let mut packed = vec![0u8; rows * cols / 2];
    for r in 0..rows {
        for g in 0..groups {
            let blk = &w[r * cols + g * FP4_GROUP..r * cols + (g + 1) * FP4_GROUP];
            let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = e8m0_ceil(amax.max(1e-30) / E2M1_MAX);
            scales[r * groups + g] = s;
            let inv = 1.0 / e8m0_to_f32(s);
            for k in 0..FP4_GROUP / 2 {
                let lo = f32_to_e2m1(blk[2 * k] * inv);
                let hi = f32_to_e2m1(blk[2 * k + 1] * inv);
                packed[(r * cols + g * FP4_GROUP) / 2 + k] = lo | (hi << 4);
            }
        }
    }
    (packed, scales)
}

/// Values per block of the int8 activation grid (`--numerics fast`), one power-of-two scale
/// each: the FP4 weights' scale group, so one integer dot product serves a whole group.
pub const I8_BLOCK: usize = 32;
/// Smallest block exponent: 2^-126 is the smallest normal f32, so scaling by it is exact.
const I8_MIN_EXP: i32 = -126;

/// The int8 grid's exponent for a block with largest magnitude `amax`: the smallest k >=
/// -126 with amax <= 127·2^k (so every value of the block is q·2^k, |q| <= 127, after
/// rounding). NaN or infinite `amax` gives the largest exponent (the values stay NaN/inf).
pub fn i8_block_exponent(amax: f32) -> i32 {
    if !amax.is_finite() {
        return 127;
    }
    let b = amax.abs().to_bits();
    let exp = (b >> 23) as i32;
    if exp == 0 {
        // Zero or subnormal: below 2^-126 <= 127·2^-126.
        return I8_MIN_EXP;
    }
    // amax = 1.m·2^e: 127·2^(e-6) = (1 + 63/64)·2^e covers it iff the mantissa field is at
    // most 63/64·2^23; otherwise 127·2^(e-5) does.
    let e = exp - 127;
    (e - 6 + i32::from(b & 0x7F_FFFF > 0x7E_0000)).max(I8_MIN_EXP)
}

/// 2^k as f32 for -149 <= k <= 127, built from its bits (exact).
pub fn pow2(k: i32) -> f32 {
    if k >= -126 {
        f32::from_bits(((k + 127) as u32) << 23)
    } else {
        f32::from_bits(1u32 << (k + 149))
    }
}

/// `--numerics fast` activation rounding: per block of `block` values, the values become
/// q·2^k with integer |q| <= 127 ([`i8_block_exponent`], ties to even). Every such value is
/// exactly a bf16, and an int8 dot-product kernel multiplies it exactly.
pub fn fake_quant_i8_blocks(x: &mut [f32], block: usize) {
    for blk in x.chunks_mut(block) {
        let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let k = i8_block_exponent(amax);
        let (s, inv) = (pow2(k), pow2(-k));
        for v in blk.iter_mut() {
            *v = (*v * inv).round_ties_even() * s;
        }
    }
}

/// QAT simulation (spec §4.4 item 1 and 2): per block of `block` values, scale = the smallest
/// power of two >= amax/448 (amax floored at 1e-4), values rounded to E4M3 and scaled back.
pub fn fake_quant_e4m3_blocks(x: &mut [f32], block: usize) {
    for blk in x.chunks_mut(block) {
        let amax = blk.iter().fold(1e-4f32, |m, v| m.max(v.abs()));
        let s = e8m0_to_f32(e8m0_ceil(amax / E4M3_MAX));
        let inv = 1.0 / s;
        for v in blk.iter_mut() {
            *v = round_e4m3((*v * inv).clamp(-E4M3_MAX, E4M3_MAX)) * s;
        }
    }
}

/// QAT simulation (spec §4.4 item 3): E2M1 in blocks of 32, amax floored at 6·2^-126.
pub fn fake_quant_e2m1_blocks(x: &mut [f32], block: usize) {
    let floor = 6.0 * 2f32.powi(-126);
    for blk in x.chunks_mut(block) {
        let amax = blk.iter().fold(floor, |m, v| m.max(v.abs()));
        let s = e8m0_to_f32(e8m0_ceil(amax / E2M1_MAX));
        let inv = 1.0 / s;
        for v in blk.iter_mut() {
            let c = f32_to_e2m1((*v * inv).clamp(-E2M1_MAX, E2M1_MAX));
            *v = E2M1_TABLE[c as usize] * s;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn int8_grid_by_hand() {
        use super::*;
        // amax <= 127·2^k, smallest such k.
        assert_eq!(i8_block_exponent(127.0), 0);
        assert_eq!(i8_block_exponent(127.5), 1);
        assert_eq!(i8_block_exponent(1.0), -6); // 127/64 = 1.98 >= 1
        assert_eq!(i8_block_exponent(1.984375), -6); // = 127/64 exactly
        assert_eq!(i8_block_exponent(1.99), -5);
        assert_eq!(i8_block_exponent(2.0), -5);
        assert_eq!(i8_block_exponent(0.0), -126);
        assert_eq!(i8_block_exponent(1e-45), -126);
        assert_eq!(pow2(-149), f32::from_bits(1));
        // Against the definition, in f64, over a sweep of magnitudes.
        let mut a = 1e-40f32;
        while a < 1e30 {
            for v in [a, a.next_up(), 127.0 * a, (127.0 * a).next_up()] {
                let k = i8_block_exponent(v);
                let fits = |k: i32| f64::from(v) <= 127.0 * 2f64.powi(k);
                assert!(fits(k) && (k == -126 || !fits(k - 1)), "{v:e} -> {k}");
            }
            a *= 1.37;
        }
        assert_eq!(pow2(3), 8.0);
        // Block max 1.0 -> step 1/64: 0.3 -> 19/64; 2.5/64 ties to even -> 2/64; -1 stays.
        let mut x = [1.0, 0.3, 2.5 / 64.0, -1.0, 3.5 / 64.0];
        fake_quant_i8_blocks(&mut x, 32);
        assert_eq!(x, [1.0, 19.0 / 64.0, 2.0 / 64.0, -1.0, 4.0 / 64.0]);
        // Two blocks, each with its own scale.
        let mut y = [100.0, 0.7, 0.5, 0.26];
        fake_quant_i8_blocks(&mut y, 2);
        assert_eq!(y, [100.0, 1.0, 0.5, 33.0 / 128.0]); // 0.7 at step 1 -> 1; 0.26·128 = 33.28 -> 33
    }

    use super::*;

    #[test]
    fn fast_e4m3_rounding_and_scale_ceiling_equal_the_reference_forms() {
        let slow_round = |x: f32| e4m3_to_f32(f32_to_e4m3(x));
        let mut r = crate::model::synth::SplitMix64::new(17);
        let check = |x: f32| {
            let (a, b) = (round_e4m3(x), slow_round(x));
            assert!(
                a == b || (a.is_nan() && b.is_nan()),
                "round_e4m3({x:e}): {a:e} vs {b:e}"
            );
            if x > 0.0 && x.is_finite() && x.is_normal() {
                assert_eq!(e8m0_ceil(x), e8m0_ceil_by_log(x), "e8m0_ceil({x:e})");
            }
        };
        // Every E4M3 value, the midpoints between neighbours and one ulp either side.
        for c in 0u8..0x7F {
            let v = e4m3_to_f32(c);
            let next = if c < 0x7E { e4m3_to_f32(c + 1) } else { 480.0 };
            let mid = (v + next) / 2.0;
            for y in [
                v,
                mid,
                f32::from_bits(mid.to_bits() - 1),
                f32::from_bits(mid.to_bits() + 1),
            ] {
                check(y);
                check(-y);
            }
        }
        for _ in 0..200_000 {
            let e = (r.next_u64() % 40) as i32 - 30;
            check((r.uniform() * 2.0 - 1.0) * 2f32.powi(e));
        }
        for x in [
            0.0,
            -0.0,
            448.0,
            464.0,
            500.0,
            f32::INFINITY,
            f32::NAN,
            1e-30,
            0.015625,
        ] {
            check(x);
        }
    }

    #[test]
    fn e4m3_spec_examples() {
        // Spec §4.1: largest finite 448 = (1 + 6/8)·2^8 (0x7E); smallest subnormal 2^-9 (0x01);
        // smallest normal 2^-6 (0x08); 1.0 = e 7, m 0 (0x38); NaN at 0x7F/0xFF.
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0xFE), -448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x07), 7.0 / 8.0 * 2f32.powi(-6));
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0x3C), 1.5);
        assert_eq!(e4m3_to_f32(0xC0), -2.0);
        assert!(e4m3_to_f32(0x7F).is_nan() && e4m3_to_f32(0xFF).is_nan());
        assert_eq!(e4m3_to_f32(0x80), 0.0);
        assert!(e4m3_to_f32(0x80).is_sign_negative());
    }

    #[test]
    fn e4m3_encode_roundtrip_and_ties() {
        for b in 0u8..=255 {
            let v = e4m3_to_f32(b);
            if v.is_nan() {
                continue;
            }
            let back = f32_to_e4m3(v);
            // -0 and +0 both decode to zero; every other finite code is its own preimage.
            if v == 0.0 {
                assert_eq!(back & 0x7F, 0);
            } else {
                assert_eq!(back, b, "code {b:#04x} value {v}");
            }
        }
        // 1 + 1/16 lies halfway between 1.0 (m=0, even) and 1.125 (m=1): ties go to even.
        assert_eq!(f32_to_e4m3(1.0625), 0x38);
        // 1 + 3/16 lies halfway between 1.125 (m=1) and 1.25 (m=2): ties go to m=2.
        assert_eq!(f32_to_e4m3(1.1875), 0x3A);
        assert_eq!(f32_to_e4m3(1e9), 0x7E);
        assert_eq!(f32_to_e4m3(-1e9), 0xFE);
        // 31/32 sits halfway between 0.9375 (0x37, odd mantissa) and 1.0 (0x38, the exponent
        // carry, even): ties go to 0x38.
        assert_eq!(f32_to_e4m3(0.96875), 0x38);
        // Subnormal grid: 1.5·2^-9 is halfway between codes 1 and 2: ties to 2.
        assert_eq!(f32_to_e4m3(1.5 * 2f32.powi(-9)), 0x02);
    }

    #[test]
    fn e8m0_values() {
        assert_eq!(e8m0_to_f32(127), 1.0);
        assert_eq!(e8m0_to_f32(128), 2.0);
        assert_eq!(e8m0_to_f32(120), 2f32.powi(-7));
        assert_eq!(e8m0_to_f32(254), 2f32.powi(127));
        assert_eq!(e8m0_to_f32(0), 2f32.powi(-127));
        assert!(e8m0_to_f32(255).is_nan());
        assert_eq!(e8m0_ceil(1.0), 127);
        assert_eq!(e8m0_ceil(f32::INFINITY), 255, "overflow stays visible");
        assert_eq!(e8m0_ceil(1.0001), 128);
        assert_eq!(e8m0_ceil(0.75), 127);
        assert_eq!(e8m0_ceil(0.5), 126);
    }

    #[test]
    fn e2m1_encode_ties_to_even_code() {
        for n in 0u8..16 {
            let v = E2M1_TABLE[n as usize];
            let back = f32_to_e2m1(v);
            if v == 0.0 {
                assert_eq!(back, 0);
            } else {
                assert_eq!(back, n);
            }
        }
        assert_eq!(f32_to_e2m1(0.25), 0); // between 0 (code 0) and 0.5 (code 1)
        assert_eq!(f32_to_e2m1(0.75), 2); // between 0.5 (1) and 1.0 (2)
        assert_eq!(f32_to_e2m1(2.5), 4); // between 2 (4) and 3 (5)
        assert_eq!(f32_to_e2m1(5.0), 6); // between 4 (6) and 6 (7)
        assert_eq!(f32_to_e2m1(-5.0), 14);
    }

    #[test]
    fn fp8_and_fp4_rows_follow_spec_layout() {
        // FP8: value = e4m3(code) · 2^(s-127), one scale byte per 128 columns.
        let codes: Vec<u8> = (0..256)
            .map(|i| if i < 128 { 0x38 } else { 0xC0 })
            .collect();
        let mut out = vec![0f32; 256];
        dequant_fp8_row(&codes, &[128, 125], &mut out);
        assert_eq!(out[0], 2.0); // 1.0 · 2^1
        assert_eq!(out[200], -0.5); // -2.0 · 2^(125-127)
        // FP4: low nibble = even column. 0x72: low 2 -> 1.0, high 7 -> 6.0.
        let mut packed = vec![0u8; 32];
        packed[0] = 0x72;
        packed[16] = 0x9F; // col 32 = -6, col 33 = -0.5
        let mut out = vec![0f32; 64];
        dequant_fp4_row(&packed, &[127, 126], &mut out);
        assert_eq!(&out[..2], &[1.0, 6.0]);
        assert_eq!(&out[32..34], &[-3.0, -0.25]);
    }

    #[test]
    fn quantizers_roundtrip_exactly() {
        // A matrix already on the FP8 grid is reproduced bit for bit.
        let rows = 130;
        let cols = 256;
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919) % 97) as f32 / 16.0 - 3.0)
            .collect();
        let (c, s) = quantize_fp8_matrix(&w, rows, cols);
        let mut deq = vec![0f32; rows * cols];
        for r in 0..rows {
            let sr = &s[(r / 128) * 2..(r / 128) * 2 + 2];
            dequant_fp8_row(
                &c[r * cols..(r + 1) * cols],
                sr,
                &mut deq[r * cols..(r + 1) * cols],
            );
        }
        let (c2, s2) = quantize_fp8_matrix(&deq, rows, cols);
        assert_eq!((c, s), (c2, s2));
        let (p, s) = quantize_fp4_matrix(&w[..64 * 4], 4, 64);
        let mut d = vec![0f32; 64 * 4];
        for r in 0..4 {
            dequant_fp4_row(
                &p[r * 32..(r + 1) * 32],
                &s[r * 2..r * 2 + 2],
                &mut d[r * 64..(r + 1) * 64],
            );
        }
        let (p2, s2) = quantize_fp4_matrix(&d, 4, 64);
        assert_eq!((p, s), (p2, s2));
    }

    #[test]
    fn fake_quant_matches_grid() {
        let mut x = vec![0.3f32, -1.7, 100.0, 1e-6];
        fake_quant_e4m3_blocks(&mut x, 64);
        // amax 100 -> scale 2^-2 (100/448 = 0.223 -> 0.25); 0.3/0.25 = 1.2 -> 1.25 -> 0.3125.
        assert_eq!(x[0], 0.3125);
        // 100/0.25 = 400, halfway between 384 (m=4, even) and 416 (m=5): 384 -> 96.
        assert_eq!(x[2], 96.0);
        let mut y = vec![0.7f32, 3.0, -12.0];
        fake_quant_e2m1_blocks(&mut y, 32);
        // amax 12 -> scale 2 (12/6); 0.35 -> 0.5 -> 1.0; 1.5 -> 3.0; -6 -> -12.
        assert_eq!(y, vec![1.0, 3.0, -12.0]);
    }
}
