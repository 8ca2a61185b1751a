//! Attention of one block (spec §5.4–5.9): low-rank query with per-head RMS, one shared K=V
//! head, partial interleaved RoPE, a 128-key sliding window plus compressed rows (all of
//! them for HCA, the indexer's top-k for CSA), per-head sinks, inverse RoPE on the output
//! and the grouped output projection.

use super::compressor::CompressorState;
use super::kv_cache::WindowRing;
use super::numerics::Numerics;
use super::ops::{Ops, QueryKeys};
use super::rope::Rope;
use super::sections::Section;
use super::snapshot::{Dec, Enc, SnapshotError, damaged};
use super::traps::Deviations;
use crate::model::config::{AttnKind, ModelConfig};
use crate::model::weights::AttnWeights;

/// Decode state of one block's attention.
#[derive(Debug)]
pub struct AttnState {
    pub window: WindowRing,
    /// The device's key table for this block (see `KeyTables::get`): its name, and the
    /// position up to which the window ring's rows are in it (None: none known there).
    pub(super) table: u64,
    pub(super) ring_synced: Option<usize>,
    /// Main compressor (CSA and HCA layers).
    pub comp: Option<CompressorState>,
    /// The indexer's own compressor (CSA layers).
    pub index: Option<CompressorState>,
}

/// A block's attention state at some position: the window ring (a copy) and the compressors'
/// marks. Costs the ring (window x head_dim floats), not the context.
#[derive(Debug, Clone)]
pub struct AttnMark {
    window: WindowRing,
    comp: Option<super::compressor::CompressorMark>,
    index: Option<super::compressor::CompressorMark>,
}

/// What one step at positions t0..t0+t may change in a block's state (see
/// [`AttnState::step_mark`]): the compressors' marks and the ring rows the step overwrites.
#[derive(Debug)]
pub struct StepMark {
    ring: Vec<(usize, Vec<f32>)>,
    comp: Option<super::compressor::CompressorMark>,
    index: Option<super::compressor::CompressorMark>,
}

impl AttnState {
    /// Undo information for a step of `t` tokens from `t0`: costs the ring rows it overwrites
    /// (at most the window) and the compressors' carry-over, not the context.
    pub fn step_mark(&self, t0: usize, t: usize) -> StepMark {
        let win = self.window.size();
        let from = (t0 + t).saturating_sub(win).max(t0);
        StepMark {
            ring: (from..t0 + t)
                .map(|p| (p, self.window.get(p).to_vec()))
                .collect(),
            comp: self.comp.as_ref().map(|c| c.mark()),
            index: self.index.as_ref().map(|c| c.mark()),
        }
    }

    /// Put the state back as [`AttnState::step_mark`] saw it (the device's copy of the ring
    /// is then no longer trusted).
    pub fn step_restore(&mut self, m: StepMark) {
        for (p, row) in &m.ring {
            self.window.put(*p, row);
        }
        self.ring_synced = None;
        if let (Some(c), Some(cm)) = (self.comp.as_mut(), &m.comp) {
            c.restore(cm);
        }
        if let (Some(c), Some(cm)) = (self.index.as_mut(), &m.index) {
            c.restore(cm);
        }
    }

    pub fn mark(&self) -> AttnMark {
        AttnMark {
            window: self.window.clone(),
            comp: self.comp.as_ref().map(|c| c.mark()),
            index: self.index.as_ref().map(|c| c.mark()),
        }
    }

    pub fn restore(&mut self, m: &AttnMark) {
        self.window.clone_from(&m.window);
        self.ring_synced = None;
        if let (Some(c), Some(cm)) = (self.comp.as_mut(), &m.comp) {
            c.restore(cm);
        }
        if let (Some(c), Some(cm)) = (self.index.as_mut(), &m.index) {
            c.restore(cm);
        }
    }

    /// State for at most `max_ctx` tokens: the ring holds the window, or the whole context
    /// where that is shorter (the same attention: no query reaches back further).
    pub fn new(cfg: &ModelConfig, w: &AttnWeights, max_ctx: usize) -> AttnState {
        AttnState {
            window: WindowRing::new(cfg.sliding_window.min(max_ctx.max(1)), cfg.head_dim),
            table: super::kv_cache::next_id(),
            ring_synced: None,
            comp: w.compressor.as_ref().map(CompressorState::new),
            index: w
                .indexer
                .as_ref()
                .map(|ix| CompressorState::new(&ix.compressor)),
        }
    }

    /// Write what a continuation after `len` tokens needs (see `snapshot`).
    pub(super) fn save(&self, e: &mut Enc, len: usize) -> std::io::Result<()> {
        self.window.save(e, len)?;
        for c in [&self.comp, &self.index] {
            e.u8(c.is_some() as u8)?;
            if let Some(c) = c {
                c.save(e)?;
            }
        }
        Ok(())
    }

    /// Read back the state `save` wrote at `len` into this fresh state.
    pub(super) fn load(
        &mut self,
        d: &mut Dec,
        len: usize,
        window: usize,
    ) -> Result<(), SnapshotError> {
        self.window.load(d, len, window)?;
        for c in [&mut self.comp, &mut self.index] {
            if d.u8()? != c.is_some() as u8 {
                return Err(damaged(
                    "a compressor where the model has none, or none where it has one",
                ));
            }
            if let Some(c) = c {
                c.load(d, len)?;
            }
        }
        Ok(())
    }

    /// Identities of the row stores a device may hold copies of (see `KeyTables::get`).
    pub fn store_ids(&self) -> Vec<u64> {
        let index = self.index.as_ref().map(|c| c.rows.identity().0);
        std::iter::once(self.table).chain(index).collect()
    }

    pub fn allocated_bytes(&self) -> usize {
        self.window.allocated_bytes()
            + self.comp.as_ref().map_or(0, |c| c.allocated_bytes())
            + self.index.as_ref().map_or(0, |c| c.allocated_bytes())
    }
}

/// What a block's attention needs besides weights and state.
pub struct AttnCtx<'a> {
    pub cfg: &'a ModelConfig,
    pub kind: AttnKind,
    pub rope: &'a Rope,
    pub numerics: Numerics,
    pub dv: Deviations,
    pub clock: &'a super::sections::SectionClock,
}

/// Attention for `t` tokens at positions t0..t0+t (§5.4-5.9). `x` is the normed block
/// input [t, D]; returns [t, D]. Updates the window ring, the compressors and the indexer.
pub(crate) fn forward<O: Ops>(
    o: &O,
    ctx: &AttnCtx,
    w: &AttnWeights,
    st: &mut AttnState,
    x: &O::T,
    t0: usize,
    t: usize,
) -> Result<O::T, O::Err> {
    let (cfg, num, rope, dv) = (ctx.cfg, ctx.numerics, ctx.rope, ctx.dv);
    let (d, h, hd) = (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim);
    let (ql, eps) = (cfg.q_lora_rank, cfg.rms_norm_eps);

    // Query (§5.4): q = wq_b(q_norm(wq_a x)), per-head RMS, RoPE on the trailing dims. The
    // FP8 product input (rounded once in reference numerics) is shared by wq_a and wkv.
    let xq = o.gemm_input(num, x, d)?;
    let mut q_lat = o.linear(&w.wq_a, &xq, t)?;
    o.rms_norm(&mut q_lat, Some(&w.q_norm), ql, eps)?;
    let q_in = o.gemm_input(num, &q_lat, ql)?;
    let mut q = o.linear(&w.wq_b, &q_in, t)?;
    if !dv.no_q_head_norm {
        o.rms_norm(&mut q, None, hd, eps)?;
    }
    o.rope(rope, &mut q, hd, t0, h, false)?;

    // The one KV head (§5.5): kv = kv_norm(wkv x), RoPE, (QAT) FP8 rounding of the nope dims.
    let mut kv = o.linear(&w.wkv, &xq, t)?;
    drop(xq);
    o.rms_norm(&mut kv, Some(&w.kv_norm), hd, eps)?;
    o.rope(rope, &mut kv, hd, t0, 1, false)?;
    o.kv_rows(num, &mut kv, hd, cfg.nope_dim())?;

    // The compressors' inputs (§5.6) from the same normed x, and the indexer's query (§5.7).
    let comp = match &w.compressor {
        Some(cw) => Some([o.linear(&cw.wkv, x, t)?, o.linear(&cw.wgate, x, t)?]),
        None => None,
    };
    let (ih, ihd) = (cfg.index_n_heads, cfg.index_head_dim);
    let index = match &w.indexer {
        Some(iw) => {
            let c = &iw.compressor;
            let mut iq = o.linear(&iw.wq_b, &q_in, t)?;
            o.rope(rope, &mut iq, ihd, t0, ih, false)?;
            o.indexer_vecs(num, &mut iq, ihd)?;
            let inputs = [
                o.linear(&c.wkv, x, t)?,
                o.linear(&c.wgate, x, t)?,
                o.linear(&iw.weights_proj, x, t)?,
            ];
            Some((iq, inputs))
        }
        None => None,
    };
    drop(q_in);
    // What the host keeps comes back in one read: the new KV rows (for the window ring), the
    // compressors' inputs (their pooling state) and the indexer's head weights.
    let has_comp = comp.is_some();
    let mut handed: Vec<O::T> = comp.into_iter().flatten().collect();
    let iq = index.map(|(iq, inputs)| {
        handed.extend(inputs);
        iq
    });
    let mut back = o.read(&[&kv], handed)?.into_iter();
    let mut next = || back.next().unwrap_or_default();
    let kv_rows = next();
    let comp_in = has_comp.then(|| (next(), next()));
    let index_in = iq.as_ref().map(|_| (next(), next()));
    let index_q = iq.map(|iq| {
        let s = (ihd as f32).powf(-0.5) * (ih as f32).powf(-0.5);
        (iq, next().into_iter().map(|v| v * s).collect::<Vec<f32>>())
    });
    let clock = ctx.clock;
    clock.time(Section::Compressors, || {
        feed_compressors(ctx, w, st, comp_in, index_in, t0)
    });

    // Core attention (§5.8) over each query's keys, then the inverse RoPE at the query's
    // position, which makes the values' rotation relative.
    let keys = clock.time(Section::Indexer, || {
        query_keys(o, ctx, st, index_q.as_ref(), t0, t)
    })?;
    let mut att = clock.time(Section::AttnCore, || {
        o.attend(st, &q, &kv, &keys, &w.sink, t0, (h, hd))
    })?;
    if !dv.no_inverse_rope {
        o.rope(rope, &mut att, hd, t0, h, true)?;
    }
    // The window ring now takes this step's rows (after every query read the old ones).
    let win = st.window.size();
    for k in t.saturating_sub(win)..t {
        st.window.put(t0 + k, &kv_rows[k * hd..(k + 1) * hd]);
    }

    // Output (§5.9): the grouped wo_a (group g: heads g·H/G.., rows g·o_lora..), then wo_b.
    let groups = cfg.o_groups;
    let interleaved = dv.groups_interleaved;
    let y = o.linear_grouped(&w.wo_a, &att, t, groups, hd, interleaved)?;
    let y_in = o.gemm_input(num, &y, groups * cfg.o_lora_rank)?;
    o.linear(&w.wo_b, &y_in, t)
}

/// The keys of each query p = t0 + k (§5.8): the window p-win+1..=p, then the compressed
/// rows complete before it (§6.1): every one in HCA layers, the indexer's top k of them in
/// CSA layers once there are more than k.
fn query_keys<O: Ops>(
    o: &O,
    ctx: &AttnCtx,
    st: &AttnState,
    index_q: Option<&(O::T, Vec<f32>)>,
    t0: usize,
    t: usize,
) -> Result<Vec<QueryKeys>, O::Err> {
    let (cfg, dv) = (ctx.cfg, ctx.dv);
    let win = st.window.size();
    let cs = st.comp.as_ref();
    let visible = |p: usize| {
        cs.map_or(0, |cs| match dv.compressed_sees_incomplete {
            true => (cs.visible(p) + 1).min(cs.rows.len()),
            false => cs.visible(p),
        })
    };
    // The CSA queries that choose among more rows than the top k: chosen together.
    let topk = cfg.index_topk;
    let choosing: Vec<(usize, usize)> = match ctx.kind {
        AttnKind::Csa => (0..t)
            .map(|k| (k, visible(t0 + k)))
            .filter(|&(_, n)| n > topk)
            .collect(),
        _ => Vec::new(),
    };
    let mut chosen = match (choosing.is_empty(), index_q) {
        (false, Some((iq, iw))) => {
            let heads = (cfg.index_n_heads, cfg.index_head_dim);
            o.indexer_topk(st, iq, iw, &choosing, heads, topk)?
        }
        _ => Vec::new(),
    }
    .into_iter();
    let mut chosen_for = choosing.iter().map(|c| c.0).peekable();
    Ok((0..t)
        .map(|k| {
            let p = t0 + k;
            let lo = (p + 1).saturating_sub(win);
            let n = visible(p);
            let comp: Vec<usize> = match ctx.kind {
                AttnKind::Window => Vec::new(),
                AttnKind::Hca => (0..n).collect(),
                AttnKind::Csa if chosen_for.next_if_eq(&k).is_some() => {
                    chosen.next().unwrap_or_default()
                }
                AttnKind::Csa => (0..n).collect(),
            };
            // The trap: rows whose tokens are still inside the window are not attended.
            let ratio = cs.map_or(1, |cs| cs.ratio());
            let inside = |i: &usize| (i + 1) * ratio > lo;
            let comp = match dv.compressed_skip_inside_window {
                true => comp.into_iter().filter(|i| !inside(i)).collect(),
                false => comp,
            };
            QueryKeys {
                window: lo..p + 1,
                comp,
            }
        })
        .collect())
}

/// Feed a chunk's compressor inputs (a, z [t, coff·dim] for the main compressor and for the
/// indexer's) to the block's compressors: completed rows are rounded as the numerics say and
/// stored, visible to the chunk's later queries.
fn feed_compressors(
    ctx: &AttnCtx,
    w: &AttnWeights,
    st: &mut AttnState,
    comp_in: Option<(Vec<f32>, Vec<f32>)>,
    index_in: Option<(Vec<f32>, Vec<f32>)>,
    t0: usize,
) {
    let (eps, num, nope) = (ctx.cfg.rms_norm_eps, ctx.numerics, ctx.cfg.nope_dim());
    if let (Some(cw), Some(cs), Some((a, z))) = (&w.compressor, st.comp.as_mut(), comp_in) {
        cs.feed_chunk(cw, ctx.rope, eps, &a, &z, t0, ctx.dv, |row| {
            num.kv_row(row, nope)
        });
    }
    if let (Some(iwts), Some(is), Some((a, z))) = (&w.indexer, st.index.as_mut(), index_in) {
        let c = &iwts.compressor;
        is.feed_chunk(c, ctx.rope, eps, &a, &z, t0, ctx.dv, |row| {
            num.indexer_vec(row)
        });
    }
}
