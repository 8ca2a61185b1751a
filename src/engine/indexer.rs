//! Lightning indexer (spec §5.7): scores every visible compressed row of a ratio-4 layer for
//! a query and keeps the top-k. score(p, i) = Σ_h w_h · ReLU(q_h · K_i), with
//! w = weights_proj · x · ihd^-½ · IH^-½. Selected indices address the main compressor's rows.

use super::compressor::CompressorState;
use super::traps::Deviations;
use crate::backend::cpu::{indexer_scores, top_k};
use rayon::prelude::*;

/// Compressed rows scored per parallel task (one row: IH dot products of ihd).
const SCORE_ROWS_PER_TASK: usize = 256;

/// Per-query inputs of the indexer (one token).
pub struct IndexerQuery<'a> {
    /// [IH, ihd] query heads, RoPE'd (and rounded, in reference numerics).
    pub q: &'a [f32],
    /// [IH] head weights, already scaled.
    pub w: &'a [f32],
}

/// Scores of the first `n_vis` indexer rows for one query.
pub fn scores(
    st: &CompressorState,
    q: &IndexerQuery,
    n_vis: usize,
    ihd: usize,
    dv: Deviations,
) -> Vec<f32> {
    let relu_after = dv.indexer_relu_after_sum;
    // Rows in parallel (each score is independent, so the result does not depend on the
    // split): in decode the query is one token and the rows grow with the context.
    let mut s = vec![0f32; n_vis];
    s.par_chunks_mut(SCORE_ROWS_PER_TASK)
        .enumerate()
        .for_each(|(c, out)| {
            let first = c * SCORE_ROWS_PER_TASK;
            indexer_scores(q.q, q.w, |i| st.rows.row(i), first, ihd, relu_after, out);
        });
    s
}

/// The rows a query attends to: all of them while there are at most `topk`, else the
/// `topk` best-scoring, in ascending index order.
pub fn select(
    st: &CompressorState,
    q: &IndexerQuery,
    n_vis: usize,
    ihd: usize,
    topk: usize,
    dv: Deviations,
) -> Vec<usize> {
    if n_vis <= topk {
        return (0..n_vis).collect();
    }
    let s = scores(st, q, n_vis, ihd, dv);
    let mut idx = top_k(&s, topk);
    idx.sort_unstable();
    idx
}
