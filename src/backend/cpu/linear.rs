//! y = x · Wᵀ for a weight in its stored format.

use super::ops::dot;
use super::rowdot;
use crate::model::formats::{
    FP4_GROUP, FP8_BLOCK, dequant_bf16_row, dequant_fp4_row, dequant_fp8_row,
};
use crate::model::weights::Weight;
use rayon::prelude::*;
use std::ops::Range;

/// Rows dequantized together (and handed to one rayon task).
const TILE_ROWS: usize = 16;
/// Up to this many input rows, quantized weights are read by the fused row-dot kernels
/// (decode); above it, a tile is dequantized once and reused across the rows (prefill).
const FUSED_MAX_T: usize = 4;
/// Rows per rayon task in the fused path.
const FUSED_ROWS: usize = 64;

/// Dequantize row `r` of `w` into `out` (`w.cols()` values).
#[inline]
pub fn dequant_row(w: &Weight, r: usize, out: &mut [f32]) {
    match w {
        Weight::Fp8 {
            cols,
            codes,
            scales,
            ..
        } => {
            let bc = cols.div_ceil(FP8_BLOCK);
            let srow = &scales[(r / FP8_BLOCK) * bc..(r / FP8_BLOCK + 1) * bc];
            dequant_fp8_row(&codes[r * cols..(r + 1) * cols], srow, out);
        }
        Weight::Fp4 {
            cols,
            packed,
            scales,
            ..
        } => {
            let g = cols / FP4_GROUP;
            dequant_fp4_row(
                &packed[r * cols / 2..(r + 1) * cols / 2],
                &scales[r * g..(r + 1) * g],
                out,
            );
        }
        Weight::Bf16 { cols, data, .. } => {
            dequant_bf16_row(&data[r * cols * 2..(r + 1) * cols * 2], out);
        }
    }
}

/// y[t, j] = Σ_c W[rows.start + j, c] · x[t, c] for t < `t`: rows `rows` of the weight applied
/// to `t` input rows. `x` is [t, cols], `y` is [t, rows.len()].
pub fn linear_range(w: &Weight, rows: Range<usize>, x: &[f32], t: usize, y: &mut [f32]) {
    let cols = w.cols();
    let n = rows.len();
    assert!(rows.end <= w.rows(), "row range past the weight");
    assert_eq!(x.len(), t * cols, "input shape");
    assert_eq!(y.len(), t * n, "output shape");
    if t == 0 || n == 0 {
        return;
    }
    if t <= FUSED_MAX_T {
        return linear_fused(w, rows, x, t, y);
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
            for i in 0..nr {
                let wr = &wbuf[i * cols..(i + 1) * cols];
                for tt in 0..t {
                    out[i * t + tt] = dot(wr, &x[tt * cols..(tt + 1) * cols]);
                }
            }
        },
    );
    if t == 1 {
        y.copy_from_slice(&yt);
    } else {
        for j in 0..n {
            for tt in 0..t {
                y[tt * n + j] = yt[j * t + tt];
            }
        }
    }
}

/// The decode path: each row dotted straight from its stored bytes (no scratch), rows in
/// parallel.
fn linear_fused(w: &Weight, rows: Range<usize>, x: &[f32], t: usize, y: &mut [f32]) {
    let cols = w.cols();
    let n = rows.len();
    let mut yt = vec![0f32; n * t];
    yt.par_chunks_mut(FUSED_ROWS * t)
        .enumerate()
        .for_each(|(ci, out)| {
            let r0 = rows.start + ci * FUSED_ROWS;
            for i in 0..out.len() / t {
                let r = r0 + i;
                for tt in 0..t {
                    let xt = &x[tt * cols..(tt + 1) * cols];
                    out[i * t + tt] = match w {
                        Weight::Fp4 { packed, scales, .. } => {
                            let g = cols / FP4_GROUP;
                            rowdot::fp4_row_dot(
                                &packed[r * cols / 2..(r + 1) * cols / 2],
                                &scales[r * g..(r + 1) * g],
                                xt,
                            )
                        }
                        Weight::Fp8 { codes, scales, .. } => {
                            let bc = cols.div_ceil(FP8_BLOCK);
                            let srow = &scales[(r / FP8_BLOCK) * bc..(r / FP8_BLOCK + 1) * bc];
                            rowdot::fp8_row_dot(&codes[r * cols..(r + 1) * cols], srow, xt)
                        }
                        Weight::Bf16 { data, .. } => {
                            rowdot::bf16_row_dot(&data[r * cols * 2..(r + 1) * cols * 2], xt)
                        }
                    };
                }
            }
        });
    for j in 0..n {
        for tt in 0..t {
            y[tt * n + j] = yt[j * t + tt];
        }
    }
}

/// y = x · Wᵀ over all rows: `x` [t, cols] -> [t, rows].
pub fn linear(w: &Weight, x: &[f32], t: usize) -> Vec<f32> {
    let mut y = vec![0f32; t * w.rows()];
    linear_range(w, 0..w.rows(), x, t, &mut y);
    y
}
