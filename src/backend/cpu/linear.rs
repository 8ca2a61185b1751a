//! y = x · Wᵀ for a weight in its stored format.

use super::{Kernels, bf16dot, q8dot, rowdot};
use crate::model::formats::{
    FP4_GROUP, FP8_BLOCK, dequant_bf16_row, dequant_fp4_row, dequant_fp8_row,
};
use crate::model::weights::Weight;
use rayon::prelude::*;
use std::ops::Range;

/// Rows dequantized together (and handed to one rayon task).
const TILE_ROWS: usize = 16;
/// The same for the bf16 GEMM (its register block is 4 rows; more rows per tile re-use each
/// k-block of the inputs from L2 more often).
const TILE_ROWS_BF16: usize = 32;
/// Up to this many input rows, quantized weights are read by the fused row-dot kernels
/// (decode); above it, a tile is dequantized once and reused across the rows (prefill). FP4
/// 2048x4096 on a 2-core Zen 3: the fused kernels 30-32 GFLOP/s at 1-4 inputs, the blocked
/// GEMM 28, 35 and 50 at 2, 3 and 4 (a prefill chunk's routed experts often get that few).
const FUSED_MAX_T: usize = 2;
/// With bf16 dot products the fused path converts each weight once per 8 inputs, which
/// beats dequantizing a tile up to this many inputs (the routed experts during prefill).
const FUSED_MAX_T_BF16: usize = 16;
/// Weight bytes per rayon task in the fused path (measured on 2 cores: 64-256 KB tasks
/// stream best; 1 MB tasks lose up to 40 % on the 8 KB rows of wo_b).
const FUSED_TASK_BYTES: usize = 128 << 10;

/// One row of a weight in its stored form: the bytes and scales a row kernel reads.
pub(super) enum Row<'a> {
    /// E4M3 codes and the row's 128-column block scales.
    Fp8 {
        codes: &'a [u8],
        scales: &'a [u8],
    },
    /// Packed E2M1 (cols/2 bytes) and one scale per 32 columns.
    Fp4 {
        packed: &'a [u8],
        scales: &'a [u8],
    },
    Bf16(&'a [u8]),
}

/// Row `r` of `w`.
#[inline]
pub(super) fn row(w: &Weight, r: usize) -> Row<'_> {
    match w {
        Weight::Fp8 {
            cols,
            codes,
            scales,
            ..
        } => {
            let bc = cols.div_ceil(FP8_BLOCK);
            Row::Fp8 {
                codes: &codes[r * cols..(r + 1) * cols],
                scales: &scales[(r / FP8_BLOCK) * bc..(r / FP8_BLOCK + 1) * bc],
            }
        }
        Weight::Fp4 {
            cols,
            packed,
            scales,
            ..
        } => {
            let g = cols / FP4_GROUP;
            Row::Fp4 {
                packed: &packed[r * cols / 2..(r + 1) * cols / 2],
                scales: &scales[r * g..(r + 1) * g],
            }
        }
        Weight::Bf16 { cols, data, .. } => Row::Bf16(&data[r * cols * 2..(r + 1) * cols * 2]),
    }
}

/// Dequantize row `r` of `w` into `out` (`w.cols()` values).
#[inline]
pub fn dequant_row(w: &Weight, r: usize, out: &mut [f32]) {
    match row(w, r) {
        Row::Fp8 { codes, scales } => dequant_fp8_row(codes, scales, out),
        Row::Fp4 { packed, scales } => dequant_fp4_row(packed, scales, out),
        Row::Bf16(data) => dequant_bf16_row(data, out),
    }
}

/// The input of a decode-sized product ([`linear_range`] with few inputs) prepared for its
/// fused kernel: int8 blocks (`--numerics fast`, FP4), bf16 in the kernel's lane order (the
/// reference numerics, FP8/FP4), other fp32 inputs of FP8/FP4 products as bf16 pieces, or
/// the fp32 input itself for the row-dot kernels. `linear_range` prepares on every call; a
/// caller that applies one input to the same rows many times (the benchmark's in-cache
/// ceilings) prepares once, as a long matrix amortizes it.
pub struct Prepared<'a> {
    input: PreparedInput<'a>,
    cols: usize,
    t: usize,
}

enum PreparedInput<'a> {
    Q8(Vec<q8dot::Q8Input>),
    Bf16(Vec<Vec<u16>>),
    /// fp32 inputs of FP8/FP4 products as three bf16 pieces each (see `add_pieces`).
    Split(Vec<Vec<u16>>),
    F32(&'a [f32]),
}

impl<'a> Prepared<'a> {
    /// `x` [t, cols] prepared for `w`'s fused kernel; `None` for batches (`linear_range` runs
    /// those as a GEMM).
    pub fn new(k: Kernels, w: &Weight, x: &'a [f32], t: usize) -> Option<Prepared<'a>> {
        let input = if let Some(q) = prepare_q8(k, w, x, t) {
            PreparedInput::Q8(q)
        } else if let Some(xb) = prepare_bf16(k, w, x, t) {
            PreparedInput::Bf16(xb)
        } else if let Some(x3) = prepare_bf16_split(k, w, x, t) {
            PreparedInput::Split(x3)
        } else if t <= FUSED_MAX_T {
            PreparedInput::F32(x)
        } else {
            return None;
        };
        Some(Prepared {
            input,
            cols: w.cols(),
            t,
        })
    }

    /// What `linear_range(w, rows, x, t, y)` computes, on the calling thread alone; `w` must
    /// have the columns the input was prepared for.
    pub fn rows_serial(&self, w: &Weight, rows: Range<usize>, y: &mut [f32]) {
        self.run(w, rows, y, true)
    }

    fn run(&self, w: &Weight, rows: Range<usize>, y: &mut [f32], serial: bool) {
        assert_eq!(w.cols(), self.cols, "prepared for another width");
        assert!(rows.end <= w.rows(), "row range past the weight");
        assert_eq!(y.len(), self.t * rows.len(), "output shape");
        match &self.input {
            PreparedInput::Q8(q) => linear_fused_q8(w, rows, q, y, serial),
            PreparedInput::Bf16(xb) => linear_fused_bf16(w, rows, xb, y, serial),
            PreparedInput::Split(x3) => {
                let mut y3 = vec![0f32; 3 * y.len()];
                linear_fused_bf16(w, rows, x3, &mut y3, serial);
                add_pieces(&y3, y)
            }
            PreparedInput::F32(x) => linear_fused(w, rows, x, self.t, y, serial),
        }
    }
}

/// y[t, j] = Σ_c W[rows.start + j, c] · x[t, c] for t < `t`: rows `rows` of the weight applied
/// to `t` input rows, on the kernels `k` allows. `x` is [t, cols], `y` is [t, rows.len()].
pub fn linear_range(
    k: Kernels,
    w: &Weight,
    rows: Range<usize>,
    x: &[f32],
    t: usize,
    y: &mut [f32],
) {
    let cols = w.cols();
    let n = rows.len();
    assert!(rows.end <= w.rows(), "row range past the weight");
    assert_eq!(x.len(), t * cols, "input shape");
    assert_eq!(y.len(), t * n, "output shape");
    if t == 0 || n == 0 {
        return;
    }
    if let Some(p) = Prepared::new(k, w, x, t) {
        return p.run(w, rows, y, false);
    }
    // Inputs that are exactly bf16 (the reference numerics) multiply on bf16 dot products:
    // every dequantized FP8/FP4/BF16 weight is exactly a bf16 too, so only the order of the
    // fp32 sums changes.
    let bf16 = k.bf16() && cols.is_multiple_of(32);
    if bf16 && let Some(xb) = bf16dot::exact_rows(x) {
        return gemm_bf16(w, rows, &xb, t, y);
    }
    // Other fp32 inputs (the attention output into wo_a; BF16 weights' inputs; everything
    // under `--numerics ideal`) as three exact bf16 pieces, 3t inputs on the same GEMM (as
    // the decode path does): one core's fp32 tile streams the inputs from memory for every
    // two rows, the bf16 GEMM keeps a block of them in L1.
    if bf16 && let Some(x3) = split_rows(x) {
        let mut y3 = vec![0f32; 3 * t * n];
        gemm_bf16(w, rows, &x3, 3 * t, &mut y3);
        return add_pieces(&y3, y);
    }
    #[cfg(target_arch = "x86_64")]
    if super::gemm::available() {
        return super::gemm::gemm(w, rows, x, t, y);
    }
    // Work in [rows, t] so each task owns a contiguous output block, then transpose.
    let mut yt = vec![0f32; n * t];
    yt.par_chunks_mut(TILE_ROWS * t).enumerate().for_each_init(
        || vec![0f32; TILE_ROWS * cols],
        |wbuf, (tile, out)| {
            let r0 = rows.start + tile * TILE_ROWS;
            let nr = out.len() / t;
            for i in 0..nr {
                dequant_row(w, r0 + i, &mut wbuf[i * cols..(i + 1) * cols]);
            }
            gemm_tile_portable(&wbuf[..nr * cols], nr, x, t, cols, out);
        },
    );
    transpose_into(&yt, n, t, y);
}

/// The prefill product on bf16 dot products: y [t, rows.len()] for inputs `xb` [t, cols] (bf16
/// bits), tiles of the weight dequantized to bf16 once and multiplied with every input.
fn gemm_bf16(w: &Weight, rows: Range<usize>, xb: &[u16], t: usize, y: &mut [f32]) {
    let (cols, n) = (w.cols(), rows.len());
    let mut yt = vec![0f32; n * t];
    yt.par_chunks_mut(TILE_ROWS_BF16 * t)
        .enumerate()
        .for_each_init(
            || (vec![0f32; cols], vec![0u16; TILE_ROWS_BF16 * cols]),
            |(row, wbuf), (tile, out)| {
                let r0 = rows.start + tile * TILE_ROWS_BF16;
                let nr = out.len() / t;
                for i in 0..nr {
                    dequant_row(w, r0 + i, row);
                    for (d, v) in wbuf[i * cols..(i + 1) * cols].iter_mut().zip(row.iter()) {
                        *d = (v.to_bits() >> 16) as u16;
                    }
                }
                bf16dot::gemm_tile(&wbuf[..nr * cols], nr, xb, t, cols, out);
            },
        );
    transpose_into(&yt, n, t, y);
}

/// y [t, n] from the products of the three pieces of each input, y3 [3t, n] (the hi pieces'
/// outputs, then the mid ones', then the lo ones'): hi + (mid + lo), the two small partial
/// sums first.
fn add_pieces(y3: &[f32], y: &mut [f32]) {
    let (hi, rest) = y3.split_at(y.len());
    let (mid, lo) = rest.split_at(y.len());
    for (((o, h), m), l) in y.iter_mut().zip(hi).zip(mid).zip(lo) {
        *o = h + (m + l);
    }
}

/// x [t, cols] as 3t rows of bf16 bits: every row's hi pieces, then the mid ones, then the
/// lo ones ([`bf16dot::split3`]: hi + mid + lo is the value); None where a piece is not a
/// normal bf16 (values below ~2^-110 in magnitude).
fn split_rows(x: &[f32]) -> Option<Vec<u16>> {
    let mut out = vec![0u16; 3 * x.len()];
    let (hi, rest) = out.split_at_mut(x.len());
    let (mid, lo) = rest.split_at_mut(x.len());
    for (i, &v) in x.iter().enumerate() {
        let [a, b, c] = bf16dot::split3(v).map(bf16dot::exact_bf16);
        (hi[i], mid[i], lo[i]) = (a?, b?, c?);
    }
    Some(out)
}

/// out[i, tt] = W[i] · x[tt] for a dequantized tile `w` [nr, cols] and inputs `x` [t, cols],
/// every output in one summation order ([`lane_dot`]), register-blocked 2 rows x 4 inputs at a
/// time. The yardstick of the blocked AVX2 GEMM (`gemm`), which adds in the same order, and
/// the product where the CPU has no AVX2.
pub(super) fn gemm_tile_portable(
    w: &[f32],
    nr: usize,
    x: &[f32],
    t: usize,
    cols: usize,
    out: &mut [f32],
) {
    const R: usize = 2;
    const T: usize = 4;
    let k8 = cols / 8 * 8;
    let mut i = 0;
    while i + R <= nr {
        let mut tt = 0;
        while tt + T <= t {
            let mut acc = [[[0f32; 8]; T]; R];
            let ws: [&[f32]; R] = std::array::from_fn(|a| &w[(i + a) * cols..(i + a) * cols + k8]);
            let xs: [&[f32]; T] =
                std::array::from_fn(|b| &x[(tt + b) * cols..(tt + b) * cols + k8]);
            for k in (0..k8).step_by(8) {
                for a in 0..R {
                    let wv = &ws[a][k..k + 8];
                    for b in 0..T {
                        let xv = &xs[b][k..k + 8];
                        for l in 0..8 {
                            acc[a][b][l] += wv[l] * xv[l];
                        }
                    }
                }
            }
            for a in 0..R {
                for b in 0..T {
                    let mut s = acc[a][b].iter().sum::<f32>();
                    for k in k8..cols {
                        s += w[(i + a) * cols + k] * x[(tt + b) * cols + k];
                    }
                    out[(i + a) * t + tt + b] = s;
                }
            }
            tt += T;
        }
        for b in tt..t {
            for a in 0..R {
                out[(i + a) * t + b] = lane_dot(
                    &w[(i + a) * cols..(i + a + 1) * cols],
                    &x[b * cols..(b + 1) * cols],
                );
            }
        }
        i += R;
    }
    for a in i..nr {
        for b in 0..t {
            out[a * t + b] = lane_dot(&w[a * cols..(a + 1) * cols], &x[b * cols..(b + 1) * cols]);
        }
    }
}

/// Σ w[k]·x[k] in the prefill products' order: 8 partial sums (lane l takes k ≡ l mod 8, in
/// increasing k, up to the last multiple of 8), added in lane order from -0.0, then the
/// remaining columns one by one.
fn lane_dot(w: &[f32], x: &[f32]) -> f32 {
    let k8 = w.len() / 8 * 8;
    let mut acc = [0f32; 8];
    for (wc, xc) in w[..k8].chunks_exact(8).zip(x[..k8].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += wc[l] * xc[l];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for k in k8..w.len() {
        s += w[k] * x[k];
    }
    s
}

/// The fused paths' driver: rows `rows` of `w` in parallel tasks of about
/// [`FUSED_TASK_BYTES`], `dot(r0..r1, out)` filling out [r1 - r0, t] row-major; y [t,
/// rows.len()] is transposed from the work.
fn fused_rows(
    w: &Weight,
    rows: Range<usize>,
    t: usize,
    y: &mut [f32],
    serial: bool,
    dot: impl Fn(Range<usize>, &mut [f32]) + Sync,
) {
    let n = rows.len();
    let task = (FUSED_TASK_BYTES * w.rows() / w.stored_bytes().max(1)).max(1);
    let mut yt = vec![0f32; n * t];
    let block = |(ci, out): (usize, &mut [f32])| {
        let r0 = rows.start + ci * task;
        dot(r0..r0 + out.len() / t, out);
    };
    if serial {
        yt.chunks_mut(task * t).enumerate().for_each(block);
    } else {
        yt.par_chunks_mut(task * t).enumerate().for_each(block);
    }
    transpose_into(&yt, n, t, y);
}

/// Run a kernel that serves at most `max` inputs over out [rows, t] (row-major) in groups of
/// inputs: `k(g, o)` fills o [rows, g.len()] for the inputs `g`.
fn in_groups(t: usize, max: usize, out: &mut [f32], mut k: impl FnMut(Range<usize>, &mut [f32])) {
    if t <= max {
        return k(0..t, out);
    }
    let rows = out.len() / t;
    let mut buf = vec![0f32; rows * max];
    for g0 in (0..t).step_by(max) {
        let g = g0..(g0 + max).min(t);
        let o = &mut buf[..rows * g.len()];
        k(g.clone(), o);
        for (dst, src) in out.chunks_exact_mut(t).zip(o.chunks_exact(g.len())) {
            dst[g.clone()].copy_from_slice(src);
        }
    }
}

/// The decode path: each row dotted straight from its stored bytes (no scratch), rows in
/// parallel.
fn linear_fused(w: &Weight, rows: Range<usize>, x: &[f32], t: usize, y: &mut [f32], serial: bool) {
    let cols = w.cols();
    fused_rows(w, rows, t, y, serial, |rs, out| {
        for (r, o) in rs.zip(out.chunks_exact_mut(t)) {
            let wr = row(w, r);
            for (tt, out) in o.iter_mut().enumerate() {
                let xt = &x[tt * cols..(tt + 1) * cols];
                *out = match wr {
                    Row::Fp4 { packed, scales } => rowdot::fp4_row_dot(packed, scales, xt),
                    Row::Fp8 { codes, scales } => rowdot::fp8_row_dot(codes, scales, xt),
                    Row::Bf16(data) => rowdot::bf16_row_dot(data, xt),
                };
            }
        }
    });
}

/// `x` in the int8 kernel's layout when it applies: an FP4 weight, this CPU, at most
/// [`FUSED_MAX_T_BF16`] inputs, every input on the int8 grid (`--numerics fast`).
fn prepare_q8(k: Kernels, w: &Weight, x: &[f32], t: usize) -> Option<Vec<q8dot::Q8Input>> {
    if t > FUSED_MAX_T_BF16 || !k.q8() || !matches!(w, Weight::Fp4 { .. }) {
        return None;
    }
    x.chunks(w.cols()).map(q8dot::prepare).collect()
}

/// The fused path on int8 dot products (FP4 weights only).
fn linear_fused_q8(
    w: &Weight,
    rows: Range<usize>,
    xq: &[q8dot::Q8Input],
    y: &mut [f32],
    serial: bool,
) {
    let Weight::Fp4 {
        cols,
        packed,
        scales,
        ..
    } = w
    else {
        unreachable!("prepare_q8 takes FP4 weights only")
    };
    let (cols, t) = (*cols, xq.len());
    let xs: Vec<&q8dot::Q8Input> = xq.iter().collect();
    fused_rows(w, rows, t, y, serial, |rs, out| {
        let p = &packed[rs.start * cols / 2..rs.end * cols / 2];
        let s = &scales[rs.start * cols / 32..rs.end * cols / 32];
        in_groups(t, q8dot::MAX_INPUTS, out, |g, o| {
            q8dot::fp4_block(p, s, cols, &xs[g], o)
        });
    });
}

/// `x` in the bf16 kernels' layout when they apply: an FP4/FP8 weight, this CPU, at most
/// [`FUSED_MAX_T_BF16`] inputs, and every input exactly a bf16 (the reference numerics).
fn prepare_bf16(k: Kernels, w: &Weight, x: &[f32], t: usize) -> Option<Vec<Vec<u16>>> {
    if t > FUSED_MAX_T_BF16 || !k.bf16() {
        return None;
    }
    let cols = w.cols();
    match w {
        Weight::Fp4 { .. } => x.chunks(cols).map(bf16dot::prepare_fp4).collect(),
        Weight::Fp8 { .. } => x.chunks(cols).map(bf16dot::prepare_fp8).collect(),
        Weight::Bf16 { .. } => None,
    }
}

/// Inputs that are not exactly bf16 (the attention output into `wo_a`, or any input under
/// `--numerics ideal`) for the bf16 kernels: each as three bf16 pieces ([`bf16dot::split3`]),
/// 3t inputs, when 3t <= [`FUSED_MAX_T_BF16`]. One core on an FP8 4096-column row: the fp32
/// kernel is bound by its E4M3 -> fp32 conversions at ~20 GB/s; the bf16 kernel turns each
/// code into bf16 once for all three pieces.
fn prepare_bf16_split(k: Kernels, w: &Weight, x: &[f32], t: usize) -> Option<Vec<Vec<u16>>> {
    if 3 * t > FUSED_MAX_T_BF16 || !k.bf16() || matches!(w, Weight::Bf16 { .. }) {
        return None;
    }
    // Every input's hi piece, then the mid ones, then the lo ones (see `add_pieces`).
    let mut p = [
        vec![0f32; x.len()],
        vec![0f32; x.len()],
        vec![0f32; x.len()],
    ];
    for (c, &v) in x.iter().enumerate() {
        let [a, b, d] = bf16dot::split3(v);
        (p[0][c], p[1][c], p[2][c]) = (a, b, d);
    }
    p.iter()
        .flat_map(|piece| piece.chunks(w.cols()))
        .map(|row| match w {
            Weight::Fp4 { .. } => bf16dot::prepare_fp4(row),
            _ => bf16dot::prepare_fp8(row),
        })
        .collect()
}

/// The fused path on bf16 dot products: each row's weights become bf16 once per group of up
/// to 8 inputs and are dotted with all of them.
fn linear_fused_bf16(w: &Weight, rows: Range<usize>, xb: &[Vec<u16>], y: &mut [f32], serial: bool) {
    let (cols, t) = (w.cols(), xb.len());
    let xs: Vec<&[u16]> = xb.iter().map(|v| v.as_slice()).collect();
    fused_rows(w, rows, t, y, serial, |rs, out| {
        in_groups(t, bf16dot::MAX_INPUTS, out, |g, o| match w {
            Weight::Fp4 { packed, scales, .. } => bf16dot::fp4_block(
                &packed[rs.start * cols / 2..rs.end * cols / 2],
                &scales[rs.start * cols / 32..rs.end * cols / 32],
                cols,
                &xs[g],
                o,
            ),
            Weight::Fp8 { codes, scales, .. } => bf16dot::fp8_block(
                &codes[rs.start * cols..rs.end * cols],
                scales,
                rs.start,
                cols,
                &xs[g],
                o,
            ),
            Weight::Bf16 { .. } => unreachable!("prepare_bf16 refuses BF16 weights"),
        })
    });
}

/// y [t, n] from yt [n, t].
fn transpose_into(yt: &[f32], n: usize, t: usize, y: &mut [f32]) {
    if t == 1 {
        y.copy_from_slice(yt);
        return;
    }
    // Blocks of 16 outputs' rows in parallel: each reads one 64-byte line of `yt` per column
    // and writes 16 sequential streams.
    const B: usize = 16;
    y.par_chunks_mut(B * n).enumerate().for_each(|(blk, ys)| {
        let t0 = blk * B;
        let tb = ys.len() / n;
        for j in 0..n {
            let src = &yt[j * t + t0..j * t + t0 + tb];
            for (k, &v) in src.iter().enumerate() {
                ys[k * n + j] = v;
            }
        }
    });
}

/// y = x · Wᵀ over all rows: `x` [t, cols] -> [t, rows].
pub fn linear(w: &Weight, x: &[f32], t: usize) -> Vec<f32> {
    let mut y = vec![0f32; t * w.rows()];
    linear_range(Kernels::Any, w, 0..w.rows(), x, t, &mut y);
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synth::{SplitMix64, random_weight_scaled};

    /// f64 reference and the magnitude bound for the summation-order tolerance.
    fn reference(w: &[f32], x: &[f32], cols: usize, i: usize, b: usize) -> (f64, f64) {
        let (mut s, mut m) = (0f64, 0f64);
        for k in 0..cols {
            let p = w[i * cols + k] as f64 * x[b * cols + k] as f64;
            s += p;
            m += p.abs();
        }
        (s, m)
    }

    /// The portable tile adds every output in one order (its register blocks and its
    /// remainders alike: `lane_dot`), within the fp32 bound of an f64 sum.
    #[test]
    fn portable_tile_has_one_order_and_matches_f64() {
        let mut r = SplitMix64::new(11);
        for (nr, t, cols) in [
            (5usize, 7usize, 37usize),
            (16, 9, 256),
            (3, 4, 8),
            (1, 1, 5),
        ] {
            let w: Vec<f32> = (0..nr * cols).map(|_| r.uniform()).collect();
            let x: Vec<f32> = (0..t * cols).map(|_| r.uniform()).collect();
            let mut a = vec![0f32; nr * t];
            gemm_tile_portable(&w, nr, &x, t, cols, &mut a);
            for i in 0..nr {
                for tt in 0..t {
                    let one =
                        lane_dot(&w[i * cols..(i + 1) * cols], &x[tt * cols..(tt + 1) * cols]);
                    let v = a[i * t + tt];
                    assert_eq!(v.to_bits(), one.to_bits(), "{nr}x{t}x{cols} [{i},{tt}]");
                    let (s, m) = reference(&w, &x, cols, i, tt);
                    assert!(
                        (v as f64 - s).abs() <= 1e-6 * m.max(1e-30),
                        "{nr}x{t}x{cols} [{i},{tt}]: {v} vs {s}"
                    );
                }
            }
        }
    }

    #[test]
    fn fused_and_tiled_paths_agree() {
        // The decode path (fused row dots, t <= 2; with fp32 inputs on bf16 CPUs up to 5,
        // as three bf16 pieces each) and the prefill path (tile + GEMM) on the same FP4, FP8
        // and BF16 weights.
        let mut r = SplitMix64::new(12);
        let (rows, cols) = (130usize, 256usize);
        let ws = ["fp4", "fp8", "bf16"]
            .map(|kind| random_weight_scaled(kind, rows, cols, &mut r, |b| 115 + b % 20));
        let x: Vec<f32> = (0..6 * cols).map(|_| r.uniform()).collect();
        for w in &ws {
            let tiled = linear(w, &x, 6); // t = 6: tiled
            let mut deq = vec![0f32; cols];
            for tt in 0..6 {
                let fused = linear(w, &x[tt * cols..(tt + 1) * cols], 1); // t = 1: fused
                for row in 0..rows {
                    dequant_row(w, row, &mut deq);
                    let m: f32 = deq
                        .iter()
                        .zip(&x[tt * cols..])
                        .map(|(a, b)| (a * b).abs())
                        .sum();
                    let (f, g) = (fused[row], tiled[tt * rows + row]);
                    assert!((f - g).abs() <= 1e-5 * m.max(1e-30), "{row}: {f} vs {g}");
                }
            }
        }
    }

    /// A prepared input applied to a row range on the calling thread (the benchmark's in-cache
    /// passes) gives what `linear_range` gives, and both match an f64 sum of the dequantized
    /// weights, for every prepared form: int8 blocks, E4M3 values as bf16, fp32 as bf16
    /// pieces, and the fp32 row dots of a BF16 weight.
    #[test]
    fn prepared_rows_serial_match_linear_range_and_f64() {
        use crate::model::formats::{fake_quant_e4m3_blocks, fake_quant_i8_blocks};
        let mut r = SplitMix64::new(31);
        let (rows, cols, range) = (200usize, 4096usize, 7..123);
        for kind in ["fp4", "fp8", "bf16"] {
            let w = random_weight_scaled(kind, rows, cols, &mut r, |b| 115 + b % 20);
            let mut deq = vec![0f32; rows * cols];
            for (row, d) in deq.chunks_exact_mut(cols).enumerate() {
                dequant_row(&w, row, d);
            }
            // Three inputs are decode-sized where the bf16 kernels take them; the fp32 row
            // dots take at most FUSED_MAX_T.
            let most = if Kernels::Any.bf16() { 3 } else { FUSED_MAX_T };
            let forms = [(0, 1), (1, 1), (2, 2), (0, most)];
            for ((form, t), k) in forms
                .into_iter()
                .flat_map(|f| [(f, Kernels::Any), (f, Kernels::Fp32)])
            {
                let mut x: Vec<f32> = (0..t * cols).map(|_| r.uniform() - 0.5).collect();
                match form {
                    0 => fake_quant_e4m3_blocks(&mut x, 128),
                    1 => fake_quant_i8_blocks(&mut x, 32),
                    _ => {}
                }
                let p = Prepared::new(k, &w, &x, t).expect("a decode-sized input");
                let n = range.len();
                let (mut a, mut b) = (vec![0f32; t * n], vec![0f32; t * n]);
                p.rows_serial(&w, range.clone(), &mut a);
                linear_range(k, &w, range.clone(), &x, t, &mut b);
                assert!(a.iter().zip(&b).all(|(u, v)| u.to_bits() == v.to_bits()));
                for (j, row) in range.clone().enumerate() {
                    for tt in 0..t {
                        let (s, m) = reference(&deq, &x, cols, row, tt);
                        let v = a[tt * n + j] as f64;
                        assert!(
                            (v - s).abs() <= 1e-6 * m.max(1e-30),
                            "{kind} form {form} t {t} row {row}: {v} vs {s}"
                        );
                    }
                }
            }
        }
    }

    /// `linear(w, x, t)` against an f64 sum of the dequantized weights times x, within the
    /// fp32 summation bound of the products' magnitudes.
    fn assert_linear_matches_f64(w: &Weight, x: &[f32], t: usize) {
        let (rows, cols) = (w.rows(), w.cols());
        let y = linear(w, x, t);
        let mut deq = vec![0f32; rows * cols];
        for (row, d) in deq.chunks_exact_mut(cols).enumerate() {
            dequant_row(w, row, d);
        }
        for row in 0..rows {
            for tt in 0..t {
                let (s, m) = reference(&deq, x, cols, row, tt);
                let v = y[tt * rows + row] as f64;
                assert!(
                    (v - s).abs() <= 1e-6 * m.max(1e-30),
                    "t {t} row {row}: {v} vs {s}"
                );
            }
        }
    }

    #[test]
    fn fp32_inputs_as_three_bf16_pieces_match_f64() {
        // Inputs off every grid (and a few exact zeros and tiny values) take the bf16 kernels
        // as three pieces each: the fused row kernels for t <= 5, the bf16 GEMM above (40: a
        // prefill chunk); a value too small for its pieces to be normal bf16 values sends the
        // product to the fp32 kernels. All within the fp32 summation bound of an f64 sum.
        let mut r = SplitMix64::new(14);
        let (rows, cols) = (70usize, 256usize);
        let ws = ["fp4", "fp8", "bf16"]
            .map(|kind| random_weight_scaled(kind, rows, cols, &mut r, |b| 115 + b % 20));
        for (t, tiny) in [
            (1usize, 1e-20f32),
            (2, 1e-20),
            (5, 1e-20),
            (6, 1e-20),
            (40, 1e-20),
            (40, 1e-37),
        ] {
            let mut x: Vec<f32> = (0..t * cols).map(|_| r.uniform() * 3.0 - 1.5).collect();
            x[3] = 0.0;
            x[7] = tiny;
            x[11] = -3.0e-7;
            assert!(
                x.iter().any(|v| v.to_bits() & 0xFFFF != 0),
                "inputs off the bf16 grid"
            );
            assert_eq!(
                split_rows(&x).is_some(),
                tiny > 1e-30,
                "t {t}: split or not"
            );
            for w in &ws {
                assert_linear_matches_f64(w, &x, t);
            }
        }
    }

    #[test]
    fn three_bf16_pieces_sum_to_the_value() {
        let mut r = SplitMix64::new(15);
        for _ in 0..100_000 {
            let v = f32::from_bits(r.next_u64() as u32 & 0x7FFF_FFFF)
                * if r.uniform() < 0.5 { -1.0 } else { 1.0 };
            if !v.is_finite() || v.abs() < 1e-30 {
                continue;
            }
            let p = bf16dot::split3(v);
            assert!(p.iter().all(|q| q.to_bits() & 0xFFFF == 0), "{v}: {p:?}");
            assert_eq!(p[0] as f64 + p[1] as f64 + p[2] as f64, v as f64, "{v}");
        }
    }

    #[test]
    fn every_path_on_grid_inputs_matches_f64() {
        // Inputs on the reference numerics' grid take the bf16 kernels where the CPU has
        // them: fused for t <= 16 (one and several inputs per pass), tiled above.
        let mut r = SplitMix64::new(13);
        let (rows, cols) = (70usize, 256usize);
        let ws = ["fp4", "fp8"]
            .map(|kind| random_weight_scaled(kind, rows, cols, &mut r, |b| 115 + b % 20));
        for t in [1usize, 5, 16, 17, 40] {
            let mut x: Vec<f32> = (0..t * cols).map(|_| r.uniform()).collect();
            crate::model::formats::fake_quant_e4m3_blocks(&mut x, 128);
            for w in &ws {
                assert_linear_matches_f64(w, &x, t);
            }
        }
    }
}
