//! The prefill product on fp32 FMAs (AVX2): y [t, n] = x [t, cols] · Wᵀ for rows of a weight in
//! its stored format, blocked for the caches.
//!
//! The inputs go in blocks of [`TB`]; every task passes its [`TILE`] rows over one block
//! before the next, so the block stays in the caches while the weight streams. A task walks
//! the columns in blocks of [`KC`]: its rows' block is dequantized once (SIMD) into a panel
//! that interleaves each pair of rows by 8 columns, then every group of [`TR`] inputs
//! (packed the same way, 8 columns of each in turn) passes over it, [`MR`] rows at a time: the
//! register block reads two sequential streams, the group's from L1. Each output keeps 8
//! partial sums (lane `l` sums the columns `≡ l (mod 8)` in increasing order) across the column
//! blocks, added lane by lane at the end and followed by the columns past the last multiple of
//! 8: the summation order of [`super::linear`]'s portable tile, so where every product is exact
//! (the reference numerics: E4M3-rounded inputs times E2M1/E4M3/BF16 weights) the two give the
//! same bits.
//!
//! With few inputs (a routed expert's share of a prefill chunk) the dequantization costs about
//! as much as the multiply-adds. For FP4 the first group's register block then decodes its
//! pair of rows itself, 8 columns at a time (a permute of the group's scaled E2M1 table), so
//! the decoding's instructions interleave with the multiply-adds; it leaves the values in the
//! panel for the groups after it.

use super::linear::{Row, row};
use super::rowdot::x86::e4m3x16_to_f16;
use crate::model::formats::{E2M1_TABLE, FP4_GROUP, FP8_BLOCK, e8m0_to_f32};
use crate::model::weights::Weight;
use rayon::prelude::*;
use std::ops::Range;

/// Rows per task.
const TILE: usize = 32;
/// Columns per block: a multiple of the FP8 block and the FP4 group, so a block's scales are
/// whole. A group's 6 inputs of 512 columns (12 KB) stay in L1, the tile's panel (64 KB) and
/// the block's partial sums in L2.
const KC: usize = 512;
/// Inputs per pass of the tiles.
const TB: usize = 96;
/// Rows and inputs of the register block: 12 accumulators, 2 weight vectors, 1 input vector.
const MR: usize = 2;
const TR: usize = 6;

/// Whether [`gemm`] runs here (AVX2, FMA and F16C).
pub(crate) fn available() -> bool {
    super::has_x86!("avx2", "fma", "f16c")
}

/// y [t, rows.len()] for inputs `x` [t, cols]. Needs [`available`].
pub(crate) fn gemm(w: &Weight, rows: Range<usize>, x: &[f32], t: usize, y: &mut [f32]) {
    let (cols, n) = (w.cols(), rows.len());
    assert!(available(), "the blocked GEMM needs AVX2, FMA and F16C");
    assert!(rows.end <= w.rows() && x.len() == t * cols && y.len() == n * t);
    if t == 0 || rows.is_empty() {
        return;
    }
    let out = Out {
        y: y.as_mut_ptr(),
        n,
        t,
    };
    let xp = pack_inputs(x, t, cols);
    for tb in (0..t).step_by(TB) {
        let tbn = TB.min(t - tb);
        let inputs = Inputs {
            x: &xp[tb * cols..(tb + tbn) * cols],
            n: tbn,
        };
        (0..n.div_ceil(TILE)).into_par_iter().for_each_init(
            || Scratch {
                panel: vec![0f32; TILE.next_multiple_of(MR) * KC],
                luts: vec![0f32; MR * KC / FP4_GROUP * 8],
                tails: vec![0f32; TILE * 8],
                acc: vec![0f32; TILE * tbn * 8],
                sums: vec![0f32; TILE * tbn],
            },
            |sc, tile| {
                let j0 = tile * TILE;
                let nr = TILE.min(n - j0);
                // SAFETY: the CPU has AVX2, FMA and F16C (asserted above); `tile_product`
                // checks the buffers' lengths.
                unsafe { tile_product(w, rows.start + j0, nr, &inputs, sc) };
                // SAFETY: this task alone writes outputs j0..j0+nr of inputs
                // tb..tb+tbn, inside y (n x t).
                unsafe { out.put(j0, nr, tb, tbn, &sc.sums) };
            },
        );
    }
}

/// A task's buffers: the tile's panel, a pair of FP4 rows' group tables, its rows' columns
/// past the last multiple of 8, the partial sums, the outputs [nr, inputs].
struct Scratch {
    panel: Vec<f32>,
    luts: Vec<f32>,
    tails: Vec<f32>,
    acc: Vec<f32>,
    sums: Vec<f32>,
}

/// The product's output y [t, n], written by the tasks in disjoint rectangles.
struct Out {
    y: *mut f32,
    n: usize,
    t: usize,
}

// SAFETY: the tasks write disjoint elements (`put`'s contract); the buffer outlives them.
unsafe impl Sync for Out {}

impl Out {
    /// y[tb + k, j0 + i] = sums[i * tbn + k].
    ///
    /// # Safety
    /// No other thread writes or reads these elements meanwhile.
    unsafe fn put(&self, j0: usize, nr: usize, tb: usize, tbn: usize, sums: &[f32]) {
        assert!(j0 + nr <= self.n && tb + tbn <= self.t && sums.len() >= nr * tbn);
        for k in 0..tbn {
            // SAFETY: row tb + k, columns j0..j0+nr of y lie inside it (asserted).
            let row =
                unsafe { std::slice::from_raw_parts_mut(self.y.add((tb + k) * self.n + j0), nr) };
            for (i, v) in row.iter_mut().enumerate() {
                *v = sums[i * tbn + k];
            }
        }
    }
}

/// The groups of a register block's inputs among `n`: (first, count), as even as [`TR`]
/// allows (7 inputs as 4 + 3, not 6 + 1: a block of few inputs waits on its few sums).
fn groups(n: usize) -> impl Iterator<Item = (usize, usize)> {
    let ng = n.div_ceil(TR);
    let (base, extra) = (n / ng.max(1), n % ng.max(1));
    (0..ng).map(move |g| (g * base + g.min(extra), base + usize::from(g < extra)))
}

/// Where a group of inputs lies in a packed block of `kw` columns: the group starting at input
/// `tt` (of [`groups`]) has its inputs' columns 8 at a time, each input in turn, up to the last
/// multiple of 8, then each input's remaining columns.
fn group_at(tt: usize, kw: usize) -> usize {
    tt * kw
}

/// x [t, cols] as blocks of [`TB`] inputs, each block as [cols / KC column blocks][groups] in
/// [`group_at`]'s layout (the last column block as wide as the columns left).
fn pack_inputs(x: &[f32], t: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for tb in (0..t).step_by(TB) {
        let tbn = TB.min(t - tb);
        for kb in (0..cols).step_by(KC) {
            let kw = KC.min(cols - kb);
            let k8 = kw / 8 * 8;
            let blk = &mut out[tb * cols + kb * tbn..tb * cols + (kb + kw) * tbn];
            for (tt, tn) in groups(tbn) {
                let g = &mut blk[group_at(tt, kw)..group_at(tt, kw) + tn * kw];
                let (inter, tails) = g.split_at_mut(tn * k8);
                for j in 0..tn {
                    let src = &x[(tb + tt + j) * cols + kb..(tb + tt + j) * cols + kb + kw];
                    for (c, v) in src[..k8].chunks_exact(8).enumerate() {
                        inter[(c * tn + j) * 8..(c * tn + j + 1) * 8].copy_from_slice(v);
                    }
                    tails[j * (kw - k8)..(j + 1) * (kw - k8)].copy_from_slice(&src[k8..]);
                }
            }
        }
    }
    out
}

/// One block of inputs for [`tile_product`]: `n` inputs in [`pack_inputs`]'s layout.
struct Inputs<'a> {
    x: &'a [f32],
    n: usize,
}

/// Rows r0..r0+nr of `w` times a block of inputs into `sc.sums` [nr, inputs].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_product(w: &Weight, r0: usize, nr: usize, inp: &Inputs, sc: &mut Scratch) {
    let (cols, tbn) = (w.cols(), inp.n);
    let Scratch {
        panel,
        luts,
        tails,
        acc,
        sums,
    } = sc;
    // (Whole groups only: the checkpoint's FP4 rows are; the panel's way takes any width.)
    let fp4 = matches!(row(w, r0), Row::Fp4 { .. }) && cols.is_multiple_of(FP4_GROUP);
    assert!(nr <= TILE && panel.len() >= nr.next_multiple_of(MR) * KC);
    assert!(tails.len() >= nr * 8 && acc.len() >= nr * tbn * 8);
    assert!(inp.x.len() == tbn * cols && sums.len() >= nr * tbn);
    let mut kb = 0;
    while kb < cols {
        let kw = KC.min(cols - kb);
        let k8 = kw / 8 * 8;
        let xb = &inp.x[tbn * kb..tbn * (kb + kw)];
        let at = BlockAt {
            kw,
            tbn,
            first: kb == 0,
        };
        if tbn <= FEW && fp4 && groups(tbn).next().is_some_and(|g| g.1 <= FUSED_TR) {
            // Few inputs, FP4: the first group's register block decodes each pair's weights
            // itself (its instructions interleave with the multiply-adds) and leaves them in
            // the panel for the other groups.
            for i in (0..nr).step_by(MR) {
                let rn = MR.min(nr - i);
                let f = fp4_pair(w, (r0, nr), i..i + rn, kb, luts);
                let mut gs = groups(tbn);
                let Some(first) = gs.next() else { break };
                let more = first.1 < tbn;
                // SAFETY: the CPU has AVX2 and FMA (the caller's features).
                unsafe {
                    match more {
                        true => block_product::<FP4_STORE>(panel, xb, acc, at, (i, rn), first, f),
                        false => block_product::<FP4>(panel, xb, acc, at, (i, rn), first, f),
                    }
                    for g in gs {
                        block_product::<PANEL>(panel, xb, acc, at, (i, rn), g, f);
                    }
                }
            }
        } else if tbn <= FEW {
            // Few inputs: all of the block's fit in L1 next to a pair of rows, so each pair is
            // dequantized right before its products, while its panel rows are in L1.
            for i in (0..nr).step_by(MR) {
                let rn = MR.min(nr - i);
                dequant_rows(w, (r0, nr), i..i + rn, kb, panel, tails);
                for g in groups(tbn) {
                    // SAFETY: the CPU has AVX2 and FMA (the caller's features).
                    unsafe { block_product::<PANEL>(panel, xb, acc, at, (i, rn), g, NO_FP4) };
                }
            }
        } else {
            // A group of inputs stays in L1 while every pair of rows passes.
            dequant_rows(w, (r0, nr), 0..nr, kb, panel, tails);
            for g in groups(tbn) {
                for i in (0..nr).step_by(MR) {
                    // SAFETY: the CPU has AVX2 and FMA (the caller's features).
                    unsafe {
                        block_product::<PANEL>(panel, xb, acc, at, (i, MR.min(nr - i)), g, NO_FP4)
                    };
                }
            }
        }
        if kb + kw == cols {
            // The lanes in order, then the columns past the last multiple of 8.
            let rest = kw - k8;
            for i in 0..nr {
                let sums = &mut sums[i * tbn..(i + 1) * tbn];
                lane_sums(&acc[i * tbn * 8..(i + 1) * tbn * 8], sums);
                for (tt, s) in sums.iter_mut().enumerate().filter(|_| rest > 0) {
                    let (g, tn) = groups(tbn).find(|&(g, tn)| tt < g + tn).unwrap_or((tt, 1));
                    let xt = &xb[group_at(g, kw) + tn * k8 + (tt - g) * rest..];
                    for k in 0..rest {
                        *s += tails[i * 8 + k] * xt[k];
                    }
                }
            }
        }
        kb += kw;
    }
}

/// Prefetch into the caches the stored bytes of columns k0..k0+KC of row `r` (a hint: no
/// effect on the values).
#[cfg(target_arch = "x86_64")]
fn prefetch_block(w: &Weight, r: usize, k0: usize) {
    prefetch_row_block(&row(w, r), k0, KC.min(w.cols() - k0));
}

/// After row i of a tile (first row r0, nr rows; `rw`, its stored form) has had its block
/// from column kb: each row's bytes of a block are a few cache lines, too short a run for the
/// hardware prefetcher, so ask for the row's next block (or, after the last, the first of the
/// row a tile below) while this one computes.
#[cfg(target_arch = "x86_64")]
fn prefetch_next(w: &Weight, rw: &Row, (r0, nr): (usize, usize), i: usize, kb: usize) {
    let (cols, next) = (w.cols(), kb + KC.min(w.cols() - kb));
    match next < cols {
        true => prefetch_row_block(rw, next, KC.min(cols - next)),
        false if r0 + nr + i < w.rows() => prefetch_block(w, r0 + nr + i, 0),
        false => {}
    }
}

/// [`prefetch_block`] for a row at hand, columns k0..k0+kw.
#[cfg(target_arch = "x86_64")]
fn prefetch_row_block(rw: &Row, k0: usize, kw: usize) {
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    let bytes: &[u8] = match *rw {
        Row::Fp4 { packed, scales } => {
            // The group scales too: a row's lie in one or two lines apart from its bytes.
            // SAFETY: a prefetch of an address inside `scales` reads nothing.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(scales[k0 / FP4_GROUP..].as_ptr() as *const i8) };
            &packed[k0 / 2..(k0 + kw) / 2]
        }
        Row::Fp8 { codes, .. } => &codes[k0..k0 + kw],
        Row::Bf16(data) => &data[k0 * 2..(k0 + kw) * 2],
    };
    for line in bytes.chunks(64) {
        // SAFETY: a prefetch of an address inside `bytes` reads nothing.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr() as *const i8) };
    }
}

/// sums[j] = the 8 lanes of acc[8j..8j+8] added in order, from -0.0 (as `Iterator::sum`
/// does): eight outputs at a time by an 8x8 transpose, the rest one by one.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn lane_sums(acc: &[f32], sums: &mut [f32]) {
    use std::arch::x86_64::*;
    assert_eq!(acc.len(), sums.len() * 8);
    let n8 = sums.len() / 8 * 8;
    for j in (0..n8).step_by(8) {
        // SAFETY: rows j..j+8 of acc (64 floats) and sums[j..j+8] lie inside the slices.
        unsafe {
            let r: [__m256; 8] =
                std::array::from_fn(|q| _mm256_loadu_ps(acc.as_ptr().add((j + q) * 8)));
            // Transpose: column l of r (lane l of each output) into one vector.
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            let lanes = [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ];
            let mut s = _mm256_set1_ps(-0.0);
            for l in lanes {
                s = _mm256_add_ps(s, l);
            }
            _mm256_storeu_ps(sums.as_mut_ptr().add(j), s);
        }
    }
    for (j, s) in sums.iter_mut().enumerate().skip(n8) {
        *s = acc[j * 8..j * 8 + 8].iter().sum();
    }
}

/// Up to this many inputs a block's inputs (with 512 columns: 32 KB) stay in L1.
const FEW: usize = 16;
/// The most inputs of a register block that decodes FP4 itself. Measured on Zen 3: with 6
/// (12 accumulators) it is no faster than the panel's way, and slower as the first of two
/// groups; with 3-5 the product is 4-18 % faster (3-10 inputs in all).
const FUSED_TR: usize = 5;

/// Rows `rows` of the tile (its first row r0, nr rows) dequantized for columns kb..kb+KC into
/// the panel and the tails.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn dequant_rows(
    w: &Weight,
    (r0, nr): (usize, usize),
    rows: Range<usize>,
    kb: usize,
    panel: &mut [f32],
    tails: &mut [f32],
) {
    let cols = w.cols();
    let kw = KC.min(cols - kb);
    for i in rows {
        // Chunk c of row i at pair (i / MR), slot (i % MR).
        let base = (i / MR) * MR * KC + (i % MR) * 8;
        let tail = &mut tails[i * 8..i * 8 + 8];
        dequant_block(w, r0 + i, kb, kw, &mut panel[base..], MR * 8, tail);
        prefetch_next(w, &row(w, r0 + i), (r0, nr), i, kb);
    }
}

/// Where a register block works in a column block: its width, the inputs, whether the
/// partial sums start from zero.
#[derive(Clone, Copy)]
struct BlockAt {
    kw: usize,
    tbn: usize,
    first: bool,
}

/// The register block of rows i..i+rn of the panel and inputs tt..tt+tn of the column
/// block `xb`, into their partial sums.
///
/// # Safety
/// Needs AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_product<const S: u8>(
    panel: &mut [f32],
    xb: &[f32],
    acc: &mut [f32],
    at: BlockAt,
    (i, rn): (usize, usize),
    (tt, tn): (usize, usize),
    fp4: Fp4Rows,
) {
    let blk = Block {
        w: &mut panel[i * KC..],
        x: &xb[group_at(tt, at.kw)..],
        k8: at.kw / 8 * 8,
        acc: &mut acc[(i * at.tbn + tt) * 8..],
        acc_stride: at.tbn * 8,
        first: at.first,
    };
    // SAFETY: the CPU has AVX2 and FMA (the caller's contract); `Block::check` bounds every
    // access.
    unsafe {
        match (rn, tn) {
            (2, 6) => micro::<2, 6, S>(blk, fp4),
            (2, 5) => micro::<2, 5, S>(blk, fp4),
            (2, 4) => micro::<2, 4, S>(blk, fp4),
            (2, 3) => micro::<2, 3, S>(blk, fp4),
            (2, 2) => micro::<2, 2, S>(blk, fp4),
            (2, _) => micro::<2, 1, S>(blk, fp4),
            (_, 6) => micro::<1, 6, S>(blk, fp4),
            (_, 5) => micro::<1, 5, S>(blk, fp4),
            (_, 4) => micro::<1, 4, S>(blk, fp4),
            (_, 3) => micro::<1, 3, S>(blk, fp4),
            (_, 2) => micro::<1, 2, S>(blk, fp4),
            (_, _) => micro::<1, 1, S>(blk, fp4),
        }
    }
}

/// One register block's operands: a pair of rows of the panel `w` (8 columns of each in
/// turn, the second slot unused for a last odd row), a group of inputs `x` (8 columns of each
/// in turn), the partial sums `acc` (8 lanes per input, `acc_stride` apart per row), `k8`
/// columns; `first`: start from zero.
struct Block<'a> {
    w: &'a mut [f32],
    x: &'a [f32],
    k8: usize,
    acc: &'a mut [f32],
    acc_stride: usize,
    first: bool,
}

impl Block<'_> {
    fn check(&self, r: usize, t: usize) {
        assert!(self.k8 <= KC && self.k8.is_multiple_of(8) && r <= MR);
        assert!(self.w.len() >= self.k8 * MR);
        assert!(self.x.len() >= self.k8 * t);
        assert!(self.acc.len() >= (r - 1) * self.acc_stride + t * 8);
    }
}

/// acc[a][j] += Σ_k w[a][k] · x[j][k] lane-wise over k < k8, for R rows and T inputs.
#[allow(clippy::needless_range_loop)] // j and a index the accumulators and the pointers
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn micro<const R: usize, const T: usize, const S: u8>(b: Block, f: Fp4Rows) {
    use std::arch::x86_64::*;
    b.check(R, T);
    if S != PANEL {
        f.check(R, b.k8);
    }
    // SAFETY (whole block): `check` bounds every offset read and written below.
    unsafe {
        let mut c = [[_mm256_setzero_ps(); T]; R];
        let ap = b.acc.as_mut_ptr();
        if !b.first {
            for (a, row) in c.iter_mut().enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(ap.add(a * b.acc_stride + j * 8));
                }
            }
        }
        let (mut wp, mut xp) = (b.w.as_mut_ptr(), b.x.as_ptr());
        for ck in 0..b.k8 / 8 {
            let wv: [__m256; R] = std::array::from_fn(|a| match S {
                PANEL => _mm256_loadu_ps(wp.add(a * 8)),
                _ => {
                    let v = fp4_chunk(f.bytes[a], f.luts[a], ck);
                    if S == FP4_STORE {
                        _mm256_storeu_ps(wp.add(a * 8), v);
                    }
                    v
                }
            });
            for j in 0..T {
                let xv = _mm256_loadu_ps(xp.add(j * 8));
                for a in 0..R {
                    c[a][j] = _mm256_fmadd_ps(wv[a], xv, c[a][j]);
                }
            }
            wp = wp.add(MR * 8);
            xp = xp.add(T * 8);
        }
        for (a, row) in c.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                _mm256_storeu_ps(ap.add(a * b.acc_stride + j * 8), *v);
            }
        }
    }
}

/// Where a register block's weight vectors come from: the panel, or a pair of FP4 rows
/// decoded in the register block (and also stored into the panel for the groups after it).
const PANEL: u8 = 0;
const FP4: u8 = 1;
const FP4_STORE: u8 = 2;

/// A pair of FP4 rows' column block for a register block that decodes them: each row's
/// packed bytes from the block's first column and its groups' tables (8 floats per group:
/// the group's row of [`SCALED_E2M1`]); a last odd row's second slot repeats the first.
#[derive(Clone, Copy)]
struct Fp4Rows<'a> {
    bytes: [&'a [u8]; MR],
    luts: [&'a [f32]; MR],
}

/// For the register blocks that read the panel only.
const NO_FP4: Fp4Rows = Fp4Rows {
    bytes: [&[]; MR],
    luts: [&[]; MR],
};

impl Fp4Rows<'_> {
    fn check(&self, r: usize, k8: usize) {
        assert!(r <= MR);
        for a in 0..r {
            assert!(self.bytes[a].len() >= k8 / 2);
            assert!(self.luts[a].len() >= k8.div_ceil(FP4_GROUP) * 8);
        }
    }
}

/// Columns 8c..8c+8 of an FP4 row as f32: each nibble's magnitude picked by a permute from
/// its group's table (`lut[8g..8g + 8]`, g = c / 4: a row of [`SCALED_E2M1`]), its sign bit
/// moved to the float's. The values of [`crate::model::formats::dequant_fp4_row`].
///
/// # Safety
/// Needs AVX2; `bytes` holds 4c + 4 bytes and `lut` 8 (c / 4 + 1) floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn fp4_chunk(bytes: &[u8], lut: &[f32], c: usize) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // SAFETY: 4 bytes at 4c and 8 floats at 8 (c / 4) lie inside the slices (the contract).
    unsafe {
        let w = _mm256_set1_epi32(bytes.as_ptr().add(4 * c).cast::<i32>().read_unaligned());
        // Nibble l (column 8c + l) in the low bits of lane l; its sign (bit 3) at bit 31.
        let idx = _mm256_srlv_epi32(w, _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
        let sign = _mm256_sllv_epi32(w, _mm256_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0));
        let sign = _mm256_and_si256(sign, _mm256_set1_epi32(i32::MIN));
        let mag = _mm256_permutevar8x32_ps(_mm256_loadu_ps(lut.as_ptr().add(8 * (c / 4))), idx);
        _mm256_xor_ps(mag, _mm256_castsi256_ps(sign))
    }
}

/// Rows `rows` (a pair, or a last odd row) of the tile (its first row r0, nr rows), FP4 of
/// whole groups, for columns kb..kb+KC: their groups' tables into `luts` (a slot of KC / 4
/// floats per row); the rows' next block prefetched as [`dequant_rows`] does.
#[cfg(target_arch = "x86_64")]
fn fp4_pair<'a>(
    w: &'a Weight,
    (r0, nr): (usize, usize),
    rows: Range<usize>,
    kb: usize,
    luts: &'a mut [f32],
) -> Fp4Rows<'a> {
    let cols = w.cols();
    let kw = KC.min(cols - kb);
    let slot = KC / FP4_GROUP * 8;
    assert!(!rows.is_empty() && rows.len() <= MR && luts.len() >= MR * slot);
    assert!(kw.is_multiple_of(FP4_GROUP));
    let mut bytes = NO_FP4.bytes;
    for (a, i) in rows.clone().enumerate() {
        let rw = row(w, r0 + i);
        let Row::Fp4 { packed, scales } = rw else {
            unreachable!("fp4_pair is called for FP4 weights")
        };
        bytes[a] = &packed[kb / 2..(kb + kw) / 2];
        let sc = &scales[kb / FP4_GROUP..(kb + kw).div_ceil(FP4_GROUP)];
        for (t, &s) in luts[a * slot..(a + 1) * slot].chunks_exact_mut(8).zip(sc) {
            t.copy_from_slice(&SCALED_E2M1[s as usize]);
        }
        prefetch_next(w, &rw, (r0, nr), i, kb);
    }
    let (l0, l1) = luts.split_at(slot);
    match rows.len() {
        1 => Fp4Rows {
            bytes: [bytes[0]; MR],
            luts: [l0; MR],
        },
        _ => Fp4Rows {
            bytes,
            luts: [l0, &l1[..slot]],
        },
    }
}

/// The E2M1 magnitudes times each E8M0 scale: row s is the first 8 entries of
/// [`E2M1_TABLE`] times 2^(s - 127) (0: the subnormal 2^-127, 255: NaN, as
/// [`e8m0_to_f32`]), the table an FP4 register block permutes by nibble. Every product is
/// exact, so these are the portable decoder's values.
static SCALED_E2M1: [[f32; 8]; 256] = scaled_e2m1();

const fn scaled_e2m1() -> [[f32; 8]; 256] {
    let mut t = [[0f32; 8]; 256];
    let mut s = 0;
    while s < 256 {
        let scale = match s {
            0 => f32::from_bits(0x0040_0000),
            255 => f32::NAN,
            _ => f32::from_bits((s as u32) << 23),
        };
        let mut j = 0;
        while j < 8 {
            t[s][j] = E2M1_TABLE[j] * scale;
            j += 1;
        }
        s += 1;
    }
    t
}

/// Columns k0..k0+kw of row `r` of `w` as f32 (k0 a multiple of [`KC`]), the same values
/// as [`super::dequant_row`]: 8 columns at a time into `panel`, chunk c at `c * stride`, the
/// columns past the last multiple of 8 into `tail`.
#[allow(clippy::needless_range_loop)] // g also drives the byte offsets and the chunks
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn dequant_block(
    w: &Weight,
    r: usize,
    k0: usize,
    kw: usize,
    panel: &mut [f32],
    stride: usize,
    tail: &mut [f32],
) {
    use std::arch::x86_64::*;
    let k8 = kw / 8 * 8;
    assert!(k8 == 0 || panel.len() >= (k8 / 8 - 1) * stride + 8);
    assert!(tail.len() >= kw - k8 && k0 + kw <= w.cols() && r < w.rows());
    let pp = panel.as_mut_ptr();
    // Chunk c of the columns: one 8-float store, at most k8 / 8 chunks (asserted above).
    // SAFETY: each caller passes c < k8 / 8.
    let put = |c: usize, v: __m256| unsafe { _mm256_storeu_ps(pp.add(c * stride), v) };
    // Columns from `done` on, by the portable dequantizer: into the panel and the tail.
    let mut rest = |done: usize, f: &dyn Fn(&mut [f32])| {
        let mut tmp = vec![0f32; kw - done];
        f(&mut tmp);
        for (i, v) in tmp.iter().enumerate() {
            let k = done + i;
            if k < k8 {
                panel[k / 8 * stride + k % 8] = *v;
            } else {
                tail[k - k8] = *v;
            }
        }
    };
    // The row's stored form from column k0 on (k0 is a multiple of the FP8 block and the FP4
    // group, so the scales start with k0's block).
    match row(w, r) {
        Row::Fp4 { packed, scales } => {
            let p = &packed[k0 / 2..(k0 + kw) / 2];
            let s = &scales[k0 / FP4_GROUP..(k0 + kw).div_ceil(FP4_GROUP)];
            let whole = kw / FP4_GROUP;
            for g in 0..whole {
                let (bytes, lut) = (&p[g * 16..g * 16 + 16], &SCALED_E2M1[s[g] as usize]);
                for j in 0..4 {
                    // SAFETY: chunk j < 4 of the group's 16 bytes, its table's 8 floats.
                    put(4 * g + j, unsafe { fp4_chunk(bytes, lut, j) });
                }
            }
            let done = whole * FP4_GROUP;
            if done < kw {
                let f = |o: &mut [f32]| {
                    crate::model::formats::dequant_fp4_row(&p[done / 2..], &s[whole..], o)
                };
                rest(done, &f);
            }
        }
        Row::Fp8 { codes, scales } => {
            let srow = &scales[k0 / FP8_BLOCK..];
            let c = &codes[k0..k0 + kw];
            let n16 = kw / 16 * 16;
            for k in (0..n16).step_by(16) {
                let sc = _mm256_set1_ps(e8m0_to_f32(srow[k / FP8_BLOCK]) * 256.0);
                // SAFETY: k + 16 <= n16 <= kw codes.
                let v = unsafe { _mm_loadu_si128(c.as_ptr().add(k) as *const __m128i) };
                let h = e4m3x16_to_f16(v);
                let f0 = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
                let f1 = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
                put(k / 8, _mm256_mul_ps(f0, sc));
                put(k / 8 + 1, _mm256_mul_ps(f1, sc));
            }
            if n16 < kw {
                // The columns left lie inside one scale block (n16 and kw share it).
                let b = n16 / FP8_BLOCK;
                let from = n16 - b * FP8_BLOCK;
                let f = |o: &mut [f32]| {
                    let mut blk = vec![0f32; from + o.len()];
                    crate::model::formats::dequant_fp8_row(
                        &c[b * FP8_BLOCK..],
                        &srow[b..],
                        &mut blk,
                    );
                    o.copy_from_slice(&blk[from..]);
                };
                rest(n16, &f);
            }
        }
        Row::Bf16(data) => {
            let d = &data[k0 * 2..(k0 + kw) * 2];
            for k in (0..k8).step_by(8) {
                // SAFETY: k + 8 <= k8 <= kw values, 2 bytes each.
                let v = unsafe { _mm_loadu_si128(d.as_ptr().add(2 * k) as *const __m128i) };
                let f = _mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16);
                put(k / 8, _mm256_castsi256_ps(f));
            }
            let f = |o: &mut [f32]| crate::model::formats::dequant_bf16_row(&d[2 * k8..], o);
            if k8 < kw {
                rest(k8, &f);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::formats::fake_quant_e4m3_blocks;
    use crate::model::synth::{SplitMix64, random_weight_scaled};

    /// Rows of `w` dequantized by the portable code, the portable tile's products with x [t,
    /// cols], as y [t, rows.len()].
    fn portable(w: &Weight, rows: Range<usize>, x: &[f32], t: usize) -> Vec<f32> {
        let (cols, n) = (w.cols(), rows.len());
        let mut deq = vec![0f32; n * cols];
        for (i, d) in deq.chunks_exact_mut(cols).enumerate() {
            super::super::dequant_row(w, rows.start + i, d);
        }
        let mut yt = vec![0f32; n * t];
        super::super::linear::gemm_tile_portable(&deq, n, x, t, cols, &mut yt);
        let mut y = vec![0f32; n * t];
        for j in 0..n {
            for tt in 0..t {
                y[tt * n + j] = yt[j * t + tt];
            }
        }
        y
    }

    /// Ragged shapes: rows past a whole tile and odd (a last register block of one row),
    /// columns past a column block, not a multiple of 8, 16 or an FP8 block, inputs past an
    /// input block and not a multiple of a register block's 6.
    fn shapes(kind: &str) -> Vec<(usize, usize, usize)> {
        let cols: &[usize] = match kind {
            "fp4" => &[32, 96, 544, 1056],
            "fp8" => &[37, 136, 520, 1003, 1024],
            _ => &[13, 515, 1032],
        };
        let mut v = Vec::new();
        for (i, &c) in cols.iter().enumerate() {
            let (rows, t) = [(1, 1), (33, 7), (70, 97), (5, 13), (40, 193)][i % 5];
            v.push((rows, c, t));
        }
        v.push((3, cols[0], 2));
        if kind == "fp4" {
            // The register blocks that decode FP4 themselves: one group of inputs (3, 4, 5)
            // or the first of several (10: 5 + 5), a last odd row.
            v.extend([(7, 544, 5), (4, 1056, 3), (9, 96, 10), (5, 544, 4)]);
        }
        v
    }

    /// With the reference numerics' inputs (E4M3 values times a power of two per 128) every
    /// product of an E2M1, E4M3 or BF16 weight is exact, so the blocked GEMM and the portable
    /// tile, which add in the same order, give the same bits, on every row range and with an
    /// all-zero input among the others.
    #[test]
    fn blocked_gemm_equals_portable_tile_bit_for_bit() {
        if !available() {
            eprintln!("skipped: no AVX2/FMA/F16C here");
            return;
        }
        let mut r = SplitMix64::new(71);
        for kind in ["fp4", "fp8", "bf16"] {
            for (rows, cols, t) in shapes(kind) {
                let w = random_weight_scaled(kind, rows + 2, cols, &mut r, |b| 115 + b % 20);
                let mut x: Vec<f32> = (0..t * cols).map(|_| r.uniform() - 0.5).collect();
                fake_quant_e4m3_blocks(&mut x, 128);
                x[(t / 2) * cols..(t / 2 + 1) * cols].fill(0.0);
                for range in [0..rows, 2..rows + 2] {
                    let want = portable(&w, range.clone(), &x, t);
                    let mut got = vec![f32::NAN; want.len()];
                    gemm(&w, range.clone(), &x, t, &mut got);
                    for (k, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert_eq!(
                            a.to_bits(),
                            b.to_bits(),
                            "{kind} {rows}x{cols} t={t} rows {range:?}, output {k}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    /// The compile-time table of scaled E2M1 magnitudes holds what the decoder computes at
    /// run time: the magnitude times `e8m0_to_f32` of the scale, for all 256 scale bytes.
    #[test]
    fn scaled_e2m1_is_each_magnitude_times_each_scale() {
        for s in 0..=255u8 {
            for j in 0..8 {
                let want = E2M1_TABLE[j] * e8m0_to_f32(s);
                let got = SCALED_E2M1[s as usize][j];
                assert!(
                    got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                    "scale {s}, magnitude {j}: {got} vs {want}"
                );
            }
        }
    }

    /// Any fp32 input: within the fp32 summation bound of an f64 sum of the same products.
    #[test]
    fn blocked_gemm_matches_f64_for_any_input() {
        if !available() {
            eprintln!("skipped: no AVX2/FMA/F16C here");
            return;
        }
        let mut r = SplitMix64::new(72);
        for kind in ["fp4", "fp8", "bf16"] {
            for (rows, cols, t) in shapes(kind) {
                let w = random_weight_scaled(kind, rows, cols, &mut r, |b| 115 + b % 20);
                let x: Vec<f32> = (0..t * cols).map(|_| r.uniform() - 0.5).collect();
                let mut got = vec![f32::NAN; rows * t];
                gemm(&w, 0..rows, &x, t, &mut got);
                let mut deq = vec![0f32; cols];
                for i in 0..rows {
                    super::super::dequant_row(&w, i, &mut deq);
                    for tt in 0..t {
                        let (mut s, mut m) = (0f64, 0f64);
                        for (a, b) in deq.iter().zip(&x[tt * cols..(tt + 1) * cols]) {
                            s += *a as f64 * *b as f64;
                            m += (*a as f64 * *b as f64).abs();
                        }
                        let v = got[tt * rows + i] as f64;
                        assert!(
                            (v - s).abs() <= 1e-6 * m.max(1e-30),
                            "{kind} {rows}x{cols} t={t} [{i},{tt}]: {v} vs {s}"
                        );
                    }
                }
            }
        }
    }
}
