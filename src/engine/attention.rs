//! Attention of one block (spec §5.4–5.9): low-rank query with per-head RMS, one shared K=V
//! head, partial interleaved RoPE, a 128-key sliding window plus compressed rows (all of
//! them for HCA, the indexer's top-k for CSA), per-head sinks, inverse RoPE on the output
//! and the grouped output projection.

use super::compressor::CompressorState;
use super::indexer::{self, IndexerQuery};
use super::kv_cache::WindowRing;
use super::numerics::Numerics;
use super::offload::{self, Act};
use super::rope::Rope;
use super::traps::{Trap, Traps};
use crate::backend::cpu::{attend_sink_heads, rms_norm, rms_norm_rows, rms_norm_unweighted};
use crate::backend::exec::Exec;
use crate::model::config::{AttnKind, ModelConfig};
use crate::model::weights::AttnWeights;
use rayon::prelude::*;

/// Attention heads per parallel task (a multiple of the kernel's block of 8).
const HEADS_PER_TASK: usize = 16;

/// Decode state of one block's attention.
#[derive(Debug)]
pub struct AttnState {
    pub window: WindowRing,
    /// The device's key table for this block (see `Exec::table`): its name, and the
    /// position up to which the window ring's rows are in it (None: none known there).
    table: u64,
    ring_synced: Option<usize>,
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

    /// Identities of the row stores a device may hold copies of (see `Exec::table`).
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
    pub traps: &'a Traps,
    pub exec: &'a Exec,
}

/// Attention for `t` tokens at positions t0..t0+t. `x` is the normed block input [t, D];
/// returns [t, D]. Updates the window, compressors and indexer state.
pub fn forward(
    ctx: &AttnCtx,
    w: &AttnWeights,
    st: &mut AttnState,
    x: &[f32],
    t0: usize,
    t: usize,
) -> Vec<f32> {
    let cfg = ctx.cfg;
    let (d, h, hd) = (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim);
    let nope = cfg.nope_dim();
    let eps = cfg.rms_norm_eps;
    let num = ctx.numerics;
    let ex = ctx.exec;

    // Query path: q_lat = q_norm(wq_a x); q = wq_b q_lat; per-head RMS; RoPE.
    // The FP8 GEMM input (rounded once in reference numerics), shared by wq_a and wkv.
    let xq = num.gemm_input(x, d);
    let mut q_lat = ex.linear(&w.wq_a, &xq, t);
    let ql = cfg.q_lora_rank;
    rms_norm_rows(&mut q_lat, &w.q_norm, eps);
    let mut q = ex.linear(&w.wq_b, &num.gemm_input(&q_lat, ql), t);
    for (k, qt) in q.chunks_mut(h * hd).enumerate() {
        for head in qt.chunks_mut(hd) {
            if !ctx.traps.has(Trap::NoQHeadNorm) {
                rms_norm_unweighted(head, eps);
            }
            ctx.rope.apply(head, t0 + k, false);
        }
    }

    // Key/value path: kv = kv_norm(wkv x), RoPE on the trailing dims, (QAT) FP8 nope dims.
    let mut kv = ex.linear(&w.wkv, &xq, t);
    for (k, row) in kv.chunks_mut(hd).enumerate() {
        rms_norm(row, &w.kv_norm, eps);
        ctx.rope.apply(row, t0 + k, false);
        num.kv_row(row, nope);
    }

    // Compressors run on the same normed x; rows completed in this chunk are visible to the
    // later queries of the chunk by the causality rule.
    let comp_in = w
        .compressor
        .as_ref()
        .map(|cw| (ex.linear(&cw.wkv, x, t), ex.linear(&cw.wgate, x, t)));
    let index_in = w.indexer.as_ref().map(|iwts| {
        let c = &iwts.compressor;
        (ex.linear(&c.wkv, x, t), ex.linear(&c.wgate, x, t))
    });
    feed_compressors(ctx, w, st, comp_in, index_in, t0);
    let mut iq = Vec::new();
    let mut iw = Vec::new();
    let (ih, ihd) = (cfg.index_n_heads, cfg.index_head_dim);
    if let Some(iwts) = &w.indexer {
        iq = ex.linear(&iwts.wq_b, &num.gemm_input(&q_lat, ql), t);
        for (k, qt) in iq.chunks_mut(ih * ihd).enumerate() {
            for head in qt.chunks_mut(ihd) {
                ctx.rope.apply(head, t0 + k, false);
                num.indexer_vec(head);
            }
        }
        iw = ex.linear(&iwts.weights_proj, x, t);
        let s = (ihd as f32).powf(-0.5) * (ih as f32).powf(-0.5);
        iw.iter_mut().for_each(|v| *v *= s);
    }

    // Core attention, one query at a time (in parallel).
    let win = st.window.size();
    let scale = 1.0 / (hd as f32).sqrt();
    let st_ro = &*st;
    let kv_ro = &kv;
    let sinks: std::borrow::Cow<[f32]> = if ctx.traps.has(Trap::NoSink) {
        vec![f32::NEG_INFINITY; h].into()
    } else {
        w.sink.as_slice().into()
    };
    let mut o = vec![0f32; t * h * hd];
    o.par_chunks_mut(h * hd).enumerate().for_each(|(k, ok)| {
        let p = t0 + k;
        // Keys: the window p-win+1..=p (earlier chunks from the ring), then compressed rows.
        let win = if ctx.traps.has(Trap::Window127) {
            win - 1
        } else {
            win
        };
        let lo = (p + 1).saturating_sub(win);
        let mut keys: Vec<&[f32]> = (lo..=p)
            .map(|j| {
                if j >= t0 {
                    &kv_ro[(j - t0) * hd..(j - t0 + 1) * hd]
                } else {
                    st_ro.window.get(j)
                }
            })
            .collect();
        if let Some(cs) = &st_ro.comp {
            let mut n_vis = cs.visible(p);
            if ctx.traps.has(Trap::CompressedSeesIncomplete) {
                n_vis = (n_vis + 1).min(cs.rows.len());
            }
            // Trap: drop rows whose tokens are still inside the window.
            let skip_inside = |i: &usize| {
                !(ctx.traps.has(Trap::CompressedSkipInsideWindow) && (i + 1) * cs.ratio() > lo)
            };
            match ctx.kind {
                AttnKind::Hca => {
                    keys.extend((0..n_vis).filter(skip_inside).map(|i| cs.rows.row(i)))
                }
                AttnKind::Csa => {
                    let is = st_ro.index.as_ref().expect("CSA layer has an indexer");
                    let query = IndexerQuery {
                        q: &iq[k * ih * ihd..(k + 1) * ih * ihd],
                        w: &iw[k * ih..(k + 1) * ih],
                    };
                    let sel = indexer::select(is, &query, n_vis, ihd, cfg.index_topk, ctx.traps);
                    keys.extend(sel.into_iter().filter(skip_inside).map(|i| cs.rows.row(i)));
                }
                AttnKind::Window => {}
            }
        }
        // Heads in parallel too, a block of them per task (each key is read once per block):
        // in decode (one token) this is the only parallel loop, and with a long context each
        // head reads hundreds of keys.
        let keys = &keys;
        let qk = &q[k * h * hd..(k + 1) * h * hd];
        ok.par_chunks_mut(HEADS_PER_TASK * hd)
            .enumerate()
            .for_each_init(
                || Vec::with_capacity(HEADS_PER_TASK * keys.len()),
                |logits, (b, ob)| {
                    let h0 = b * HEADS_PER_TASK;
                    let nh = ob.len() / hd;
                    let qb = &qk[h0 * hd..(h0 + nh) * hd];
                    attend_sink_heads(qb, keys, &sinks[h0..h0 + nh], scale, logits, ob);
                    // Inverse RoPE at the query's position makes the value contribution
                    // relative.
                    if !ctx.traps.has(Trap::NoInverseRope) {
                        for oh in ob.chunks_mut(hd) {
                            ctx.rope.apply(oh, p, true);
                        }
                    }
                },
            );
    });

    // The window ring now takes this chunk's keys (after every query read the old ones).
    for k in t.saturating_sub(win)..t {
        st.window.put(t0 + k, &kv[k * hd..(k + 1) * hd]);
    }

    // Grouped output projection: group g = heads g·H/G.., rows g·o_lora.. of wo_a.
    let (g, ol) = (cfg.o_groups, cfg.o_lora_rank);
    let gin = h * hd / g;
    let mut y = vec![0f32; t * g * ol];
    let mut xg = vec![0f32; t * gin];
    let mut yg = vec![0f32; t * ol];
    let hpg = h / g;
    for gi in 0..g {
        for k in 0..t {
            if ctx.traps.has(Trap::GroupsInterleaved) {
                for j in 0..hpg {
                    let head = j * g + gi;
                    xg[k * gin + j * hd..k * gin + (j + 1) * hd]
                        .copy_from_slice(&o[(k * h + head) * hd..(k * h + head + 1) * hd]);
                }
            } else {
                xg[k * gin..(k + 1) * gin]
                    .copy_from_slice(&o[k * h * hd + gi * gin..k * h * hd + (gi + 1) * gin]);
            }
        }
        ex.linear_range(&w.wo_a, gi * ol..(gi + 1) * ol, &xg, t, &mut yg);
        for k in 0..t {
            y[k * g * ol + gi * ol..k * g * ol + (gi + 1) * ol]
                .copy_from_slice(&yg[k * ol..(k + 1) * ol]);
        }
    }
    ex.linear(&w.wo_b, &num.gemm_input(&y, g * ol), t)
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
        cs.feed_chunk(cw, ctx.rope, eps, &a, &z, t0, ctx.traps, |row| {
            num.kv_row(row, nope)
        });
    }
    if let (Some(iwts), Some(is), Some((a, z))) = (&w.indexer, st.index.as_mut(), index_in) {
        let c = &iwts.compressor;
        is.feed_chunk(c, ctx.rope, eps, &a, &z, t0, ctx.traps, |row| {
            num.indexer_vec(row)
        });
    }
}

/// [`forward`] with every op on the device and the activations kept there: `x` [t, D] in,
/// [t, D] out. The host gets the new KV rows (for its window ring), the compressors' inputs
/// (their pooling state lives on the host) and the indexer's choices; nothing else comes
/// back. None when the device could not run a step: the state may then be part-updated, and
/// the caller restores it (`AttnState::step_mark`) before the host computes the step.
pub fn forward_on_device<'e>(
    ctx: &AttnCtx<'e>,
    w: &AttnWeights,
    st: &mut AttnState,
    x: &Act<'e>,
    t0: usize,
    t: usize,
) -> Option<Act<'e>> {
    let cfg = ctx.cfg;
    let (d, h, hd) = (cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim);
    let (ql, nope, eps, num, ex) = (
        cfg.q_lora_rank,
        cfg.nope_dim(),
        cfg.rms_norm_eps,
        ctx.numerics,
        ctx.exec,
    );
    // Query path.
    let xq = offload::gemm_input(ex, num, x, d)?;
    let q_lat = offload::linear(ex, &w.wq_a, &xq, t)?;
    offload::rms_norm_rows(ex, &q_lat, Some(&w.q_norm), ql, eps)?;
    let q_in = offload::gemm_input(ex, num, &q_lat, ql)?;
    let q = offload::linear(ex, &w.wq_b, &q_in, t)?;
    offload::rms_norm_rows(ex, &q, None, hd, eps)?;
    offload::rope_rows(ex, ctx.rope, &q, hd, t0, h, false)?;
    // Key/value path; the host keeps a copy of the new rows for its window ring.
    let kv = offload::linear(ex, &w.wkv, &xq, t)?;
    drop(xq);
    offload::rms_norm_rows(ex, &kv, Some(&w.kv_norm), hd, eps)?;
    offload::rope_rows(ex, ctx.rope, &kv, hd, t0, 1, false)?;
    offload::kv_rows(ex, num, &kv, hd, nope)?;
    // The compressors' inputs and the indexer's query; then what the host needs (the new
    // KV rows for its window ring, the compressors' inputs for their pooling state, the
    // indexer's head weights) comes back in one copy.
    let comp = match &w.compressor {
        Some(cw) => Some((
            offload::linear(ex, &cw.wkv, x, t)?,
            offload::linear(ex, &cw.wgate, x, t)?,
        )),
        None => None,
    };
    let (ih, ihd) = (cfg.index_n_heads, cfg.index_head_dim);
    let index = match &w.indexer {
        Some(iwts) => {
            let a = offload::linear(ex, &iwts.compressor.wkv, x, t)?;
            let z = offload::linear(ex, &iwts.compressor.wgate, x, t)?;
            let iq = offload::linear(ex, &iwts.wq_b, &q_in, t)?;
            offload::rope_rows(ex, ctx.rope, &iq, ihd, t0, ih, false)?;
            offload::indexer_vecs(ex, num, &iq, ihd)?;
            let iw = offload::linear(ex, &iwts.weights_proj, x, t)?;
            Some((a, z, iq, iw))
        }
        None => None,
    };
    let mut parts = vec![(kv.buf(), kv.len())];
    let pairs = comp.iter().map(|(a, z)| (a, z));
    for (a, z) in pairs.chain(index.iter().map(|(a, z, _, _)| (a, z))) {
        parts.extend([(a.buf(), a.len()), (z.buf(), z.len())]);
    }
    if let Some((_, _, _, iw)) = &index {
        parts.push((iw.buf(), iw.len()));
    }
    let mut back = offload::read_together(ex, &parts)?.into_iter();
    let kv_host = back.next()?;
    let comp_in = match comp {
        Some(_) => Some((back.next()?, back.next()?)),
        None => None,
    };
    let index_in = match index {
        Some(_) => Some((back.next()?, back.next()?)),
        None => None,
    };
    feed_compressors(ctx, w, st, comp_in, index_in, t0);
    let mut index_q = None;
    if let Some((_, _, iq, _)) = index {
        let mut iw = back.next()?;
        let s = (ihd as f32).powf(-0.5) * (ih as f32).powf(-0.5);
        iw.iter_mut().for_each(|v| *v *= s);
        index_q = Some((iq, iw));
    }
    drop(comp);
    drop(q_in);
    let o = core_on_device(ctx, w, st, &kv, &q, index_q.as_ref(), t0, t)?;
    // The window ring now takes this chunk's keys (after every query read the old ones).
    let win = st.window.size();
    for k in t.saturating_sub(win)..t {
        st.window.put(t0 + k, &kv_host[k * hd..(k + 1) * hd]);
    }
    // Grouped output projection: group g's columns of o into wo_a's rows g·o_lora.. .
    let (g, ol) = (cfg.o_groups, cfg.o_lora_rank);
    let gin = h * hd / g;
    let y = Act::new(ex, t * g * ol)?;
    let xg = Act::new(ex, t * gin)?;
    let yg = Act::new(ex, t * ol)?;
    for gi in 0..g {
        let ok = ex.launch(&[offload::copy(
            o.buf(),
            gi * gin,
            h * hd,
            xg.buf(),
            0,
            gin,
            t,
            gin,
        )]) && ex.linear_on_device(&w.wo_a, gi * ol..(gi + 1) * ol, xg.buf(), yg.buf(), t)
            && ex.launch(&[offload::copy(
                yg.buf(),
                0,
                ol,
                y.buf(),
                gi * ol,
                g * ol,
                t,
                ol,
            )]);
        if !ok {
            return None;
        }
    }
    let y_in = offload::gemm_input(ex, num, &y, g * ol)?;
    offload::linear(ex, &w.wo_b, &y_in, t)
}

/// Positions split into runs of consecutive ring slots (slot = position mod `win`; a run
/// ends where the slot wraps): at most two for a range no longer than the window.
fn slot_runs(
    r: std::ops::Range<usize>,
    win: usize,
) -> impl Iterator<Item = std::ops::Range<usize>> {
    let end = r.end;
    std::iter::successors(Some(r.start), move |&p| Some(end.min((p / win + 1) * win)))
        .take_while(move |&p| p < end)
        .map(move |p| p..end.min((p / win + 1) * win))
}

/// The device path's core attention: one key table per block (the window ring at slot
/// position mod win, the chunk's rows after it, then every compressed row, kept there across
/// steps), each query's rows as indices into it (the indexer choosing on the device for CSA
/// layers), the sink attention and the inverse RoPE. The chunk's rows are copied into the
/// table from `kv` on the device, and afterwards into their ring slots, so the next step
/// finds them there.
#[allow(clippy::too_many_arguments)] // the layer, its state, the chunk's activations, where
fn core_on_device<'e>(
    ctx: &AttnCtx<'e>,
    w: &AttnWeights,
    st: &mut AttnState,
    kv: &Act,
    q: &Act,
    index_q: Option<&(Act, Vec<f32>)>,
    t0: usize,
    t: usize,
) -> Option<Act<'e>> {
    let cfg = ctx.cfg;
    let (h, hd, win) = (cfg.num_attention_heads, cfg.head_dim, st.window.size());
    let (ih, ihd) = (cfg.index_n_heads, cfg.index_head_dim);
    let ex = ctx.exec;
    let first = t0.saturating_sub(win - 1);
    let (n, version) = st
        .comp
        .as_ref()
        .map_or((0, 0), |cs| (cs.rows.len(), cs.rows.identity().1));
    let rows =
        |r: std::ops::Range<usize>| st.comp.as_ref().map_or(Vec::new(), |cs| cs.rows.rows(r));
    let (buf, comp_at, fresh) = ex.table(st.table, version, hd, win + t, n, rows)?;
    let from = match st.ring_synced {
        Some(p) if !fresh => p.max(first),
        _ => first,
    };
    // Ring positions the table lacks (after a fresh start or a rewind), from the host's ring.
    for r in slot_runs(from..t0, win) {
        let slot = r.start % win;
        let run: Vec<f32> = r.flat_map(|p| st.window.get(p).iter().copied()).collect();
        if !ex.write_rows(buf, slot, hd, &run) {
            return None;
        }
    }
    st.ring_synced = None;
    if !ex.launch(&[offload::copy(kv.buf(), 0, hd, buf, win * hd, hd, t, hd)]) {
        return None;
    }
    let index_keys = match (&st.index, ctx.kind) {
        (Some(is), AttnKind::Csa) => {
            let (id, version) = is.rows.identity();
            let n = is.rows.len();
            Some(ex.table(id, version, ihd, 0, n, |r| is.rows.rows(r))?.0)
        }
        _ => None,
    };
    // The CSA queries that choose among more rows than the top k: all their choices made on
    // the device and brought back in one read.
    let topk = cfg.index_topk;
    let choosing: Vec<(usize, usize)> = match (&st.comp, ctx.kind) {
        (Some(cs), AttnKind::Csa) => (0..t)
            .map(|k| (k, cs.visible(t0 + k)))
            .filter(|&(_, n_vis)| n_vis > topk)
            .collect(),
        _ => Vec::new(),
    };
    let mut chosen = if choosing.is_empty() {
        Vec::new()
    } else {
        let (iq, iw) = index_q?;
        offload::indexer_select(ex, iq, iw, index_keys?, &choosing, (ih, ihd), topk)?
    }
    .into_iter();
    let mut idx: Vec<Vec<usize>> = Vec::with_capacity(t);
    for k in 0..t {
        let p = t0 + k;
        let lo = (p + 1).saturating_sub(win);
        let mut v: Vec<usize> = (lo..=p)
            .map(|j| if j < t0 { j % win } else { win + j - t0 })
            .collect();
        if let Some(cs) = &st.comp {
            let n_vis = cs.visible(p);
            match ctx.kind {
                AttnKind::Hca => v.extend((0..n_vis).map(|i| comp_at + i)),
                AttnKind::Csa => {
                    let sel = if n_vis <= topk {
                        (0..n_vis).collect()
                    } else {
                        chosen.next()?
                    };
                    v.extend(sel.into_iter().map(|i| comp_at + i));
                }
                AttnKind::Window => {}
            }
        }
        idx.push(v);
    }
    let scale = 1.0 / (hd as f32).sqrt();
    let o = offload::attend(ex, q, buf, &idx, &w.sink, scale, h, hd)?;
    offload::rope_rows(ex, ctx.rope, &o, hd, t0, h, true)?;
    // The chunk's last rows into their ring slots, so the next step needs no copy from the
    // host.
    let last = (t0 + t).saturating_sub(win).max(t0)..t0 + t;
    let copies: Vec<_> = slot_runs(last, win)
        .map(|r| {
            offload::copy(
                kv.buf(),
                (r.start - t0) * hd,
                hd,
                buf,
                (r.start % win) * hd,
                hd,
                r.len(),
                hd,
            )
        })
        .collect();
    if !ex.launch(&copies) {
        return None;
    }
    st.ring_synced = Some(t0 + t);
    Some(o)
}
