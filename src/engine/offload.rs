//! [`Ops`] on a device ([`Dev`]), with the activations kept there ([`Act`]): a layer's ops
//! read and write device buffers, and only the few values the host needs come back (the
//! routing, the new KV and compressor rows, the indexer's choices). Each op is built here
//! from the device's `Op`s (`backend::device`). An op the device cannot run (no room, an
//! error) returns [`GaveUp`]; the engine then computes the step on the host
//! (`Engine::forward`), so a device problem never changes an answer.

use super::attention::AttnState;
use super::moe::Route;
use super::numerics::Numerics;
use super::ops::{HcDims, HcHeadParams, Maybe, Ops, QueryKeys, Routing, RowWeights};
use super::rope::Rope;
use crate::backend::device::{Buf, Op, bytes_i32, f32_bytes, f32_bytes_mut};
use crate::backend::exec::{Arg, Exec};
use crate::model::config::ModelConfig;
use crate::model::formats::I8_BLOCK;
use crate::model::weights::{HcParams, MoeWeights, Weight};
use std::borrow::Cow;
use std::ops::Range;

fn i32_bytes(v: impl IntoIterator<Item = usize>) -> Vec<u8> {
    v.into_iter()
        .flat_map(|x| (x as i32).to_le_bytes())
        .collect()
}

/// An activation on the device: `len` f32 values in a buffer freed when dropped.
pub struct Act<'e> {
    ex: &'e Exec,
    buf: Buf,
    len: usize,
}

impl<'e> Act<'e> {
    /// Room for `len` values (unset).
    pub fn new(ex: &'e Exec, len: usize) -> Option<Act<'e>> {
        Some(Act {
            ex,
            buf: ex.alloc(4 * len)?,
            len,
        })
    }

    /// A copy of host values.
    pub fn upload(ex: &'e Exec, v: &[f32]) -> Option<Act<'e>> {
        Some(Act {
            ex,
            buf: ex.upload(f32_bytes(v))?,
            len: v.len(),
        })
    }

    /// The values, copied to the host.
    pub fn read(&self) -> Option<Vec<f32>> {
        let mut v = vec![0f32; self.len];
        self.ex
            .read_back(self.buf, f32_bytes_mut(&mut v))
            .then_some(v)
    }
}

impl Drop for Act<'_> {
    fn drop(&mut self) {
        self.ex.release(self.buf);
    }
}

/// The argument for `offload_ops` of per-row factors, and the offset into it.
fn row_arg<'a>(f: &'a RowWeights<Act>) -> (Arg<'a>, usize) {
    match f {
        RowWeights::One => (Arg::Absent, 0),
        RowWeights::At(a, off) => (Arg::Dev(a.buf), *off),
        RowWeights::Host(w) => (Arg::In(f32_bytes(w)), 0),
    }
}

/// Several device values brought back in one copy (each read is a synchronisation, so a
/// layer gathers what the host needs first): `parts` are (buffer, values), copied one after
/// the other into one buffer and read; returns them split again. i32 parts come back as the
/// f32 values with their bits (`f32::to_bits`).
fn read_together(ex: &Exec, parts: &[(Buf, usize)]) -> Option<Vec<Vec<f32>>> {
    let total: usize = parts.iter().map(|p| p.1).sum();
    let all = Act::new(ex, total)?;
    let mut at = 0;
    let ops: Vec<Op> = parts
        .iter()
        .map(|&(b, n)| {
            let op = copy(b, 0, n, all.buf, at, n, 1, n);
            at += n;
            op
        })
        .collect();
    if !ex.launch(&ops) {
        return None;
    }
    let v = all.read()?;
    let mut out = Vec::with_capacity(parts.len());
    let mut rest = &v[..];
    for &(_, n) in parts {
        let (a, b) = rest.split_at(n);
        out.push(a.to_vec());
        rest = b;
    }
    Some(out)
}

/// y = x · Wᵀ for `t` rows, `w` resident on the device.
fn linear<'e>(ex: &'e Exec, w: &Weight, x: &Act, t: usize) -> Option<Act<'e>> {
    let y = Act::new(ex, t * w.rows())?;
    ex.linear_bufs(w, 0..w.rows(), x.buf, y.buf, t).then_some(y)
}

/// In place, per row of `n`: RMSNorm with weight `w` (None: unweighted).
fn rms_norm_rows(ex: &Exec, x: &Act, w: Option<&[f32]>, n: usize, eps: f32) -> Option<()> {
    let rows = x.len / n;
    ex.offload(
        &mut [Arg::Dev(x.buf), Arg::maybe_param(w.map(f32_bytes))],
        |b| Op::RmsNorm {
            x: b[0],
            w: b.opt(1),
            y: b[0],
            rows,
            n,
            eps,
        },
    )
    .then_some(())
}

/// In place: RoPE on the trailing dims of each `width` row, row r at pos0 + r / rows_per_pos.
fn rope_rows(
    ex: &Exec,
    rope: &Rope,
    x: &Act,
    width: usize,
    pos0: usize,
    rows_per_pos: usize,
    inverse: bool,
) -> Option<()> {
    let rows = x.len / width;
    let rope_dim = rope.rope_dim();
    (rope.is_plain_formula()
        && ex.offload(
            &mut [Arg::Dev(x.buf), Arg::Param(f32_bytes(&rope.inv_freq))],
            |b| Op::Rope {
                x: b[0],
                inv_freq: b[1],
                rows,
                width,
                rope_dim,
                pos: pos0,
                rows_per_pos,
                inverse,
            },
        ))
    .then_some(())
}

/// Stored KV rows ([`Numerics::kv_row`] on each row of `width`).
fn kv_rows(ex: &Exec, num: Numerics, kv: &Act, width: usize, nope: usize) -> Option<()> {
    match num {
        Numerics::Ideal | Numerics::Fast => Some(()),
        Numerics::Reference => ex
            .launch(&[Op::QuantE4m3 {
                x: kv.buf,
                rows: kv.len / width,
                width,
                len: nope,
                block: 64,
            }])
            .then_some(()),
    }
}

/// Indexer query heads / keys ([`Numerics::indexer_vec`] on each row of `n`).
fn indexer_vecs(ex: &Exec, num: Numerics, v: &Act, n: usize) -> Option<()> {
    match num {
        Numerics::Ideal | Numerics::Fast => Some(()),
        Numerics::Reference => ex
            .launch(&[Op::HadamardE2m1 {
                x: v.buf,
                rows: v.len / n,
                n,
            }])
            .then_some(()),
    }
}

/// The strided row copy op (offsets, strides and width in f32 values).
#[allow(clippy::too_many_arguments)] // the op's own fields
fn copy(
    src: Buf,
    src_off: usize,
    src_stride: usize,
    dst: Buf,
    dst_off: usize,
    dst_stride: usize,
    rows: usize,
    width: usize,
) -> Op {
    Op::CopyRows {
        src,
        src_off,
        src_stride,
        dst,
        dst_off,
        dst_stride,
        rows,
        width,
    }
}

/// out[j] = x[idx[j]] for rows of `width`.
fn gather_rows<'e>(ex: &'e Exec, x: &Act, idx: &[usize], width: usize) -> Option<Act<'e>> {
    let out = Act::new(ex, idx.len() * width)?;
    let ib = i32_bytes(idx.iter().copied());
    ex.offload(
        &mut [Arg::Dev(x.buf), Arg::In(&ib), Arg::Dev(out.buf)],
        |b| Op::GatherRows {
            x: b[0],
            idx: b[1],
            out: b[2],
            n: idx.len(),
            width,
        },
    )
    .then_some(out)
}

/// y[idx[j]] += f_j · x[x_off + j·width ..] for j < n in order (idx None: row j).
#[allow(clippy::too_many_arguments)] // the op's own fields
fn add_rows(
    ex: &Exec,
    y: &Act,
    x: Buf,
    x_off: usize,
    idx: Option<&[usize]>,
    weights: &RowWeights<Act>,
    n: usize,
    width: usize,
) -> Option<()> {
    let ib = idx.map(|i| i32_bytes(i.iter().copied()));
    let (wa, w_off) = row_arg(weights);
    ex.offload(
        &mut [Arg::Dev(y.buf), Arg::Dev(x), Arg::maybe(ib.as_deref()), wa],
        |b| Op::AddRows {
            y: b[0],
            x: b[1],
            x_off,
            idx: b.opt(2),
            weights: b.opt(3),
            w_off,
            n,
            width,
        },
    )
    .then_some(())
}

/// Element-wise clamped SwiGLU of g, u, times a weight per row of `width` if given.
fn swiglu<'e>(
    ex: &'e Exec,
    g: &Act,
    u: &Act,
    row_w: &RowWeights<Act>,
    width: usize,
    limit: f32,
) -> Option<Act<'e>> {
    let n = g.len;
    let out = Act::new(ex, n)?;
    let (wa, row_w_off) = row_arg(row_w);
    ex.offload(
        &mut [Arg::Dev(g.buf), Arg::Dev(u.buf), wa, Arg::Dev(out.buf)],
        |b| Op::Swiglu {
            g: b[0],
            u: b[1],
            row_w: b.opt(2),
            row_w_off,
            out: b[3],
            n,
            width,
            limit,
        },
    )
    .then_some(out)
}

/// mHC coefficients of the states x [t, hc·d]: [t, 2hc + hc²] = [pre | post | comb].
fn hc_mix<'e>(ex: &'e Exec, p: &HcParams, x: &Act, k: HcDims) -> Option<Act<'e>> {
    let t = x.len / (k.hc * k.d);
    let out = Act::new(ex, t * (2 * k.hc + k.hc * k.hc))?;
    let scale = [p.scale[0], p.scale[1], p.scale[2]];
    ex.offload(
        &mut [
            Arg::Dev(x.buf),
            Arg::Param(f32_bytes(&p.fn_)),
            Arg::Param(f32_bytes(&p.base)),
            Arg::Dev(out.buf),
        ],
        |b| Op::HcMix {
            x: b[0],
            fn_: b[1],
            base: b[2],
            scale,
            out: b[3],
            t,
            hc: k.hc,
            d: k.d,
            iters: k.iters,
            norm_eps: k.norm_eps,
            hc_eps: k.hc_eps,
        },
    )
    .then_some(out)
}

/// u[t] = Σ_i coef[t·stride + i] · x[t, i].
fn hc_collapse<'e>(
    ex: &'e Exec,
    x: &Act,
    coef: &Act,
    stride: usize,
    hc: usize,
    d: usize,
) -> Option<Act<'e>> {
    let t = x.len / (hc * d);
    let u = Act::new(ex, t * d)?;
    ex.launch(&[Op::HcCollapse {
        x: x.buf,
        coef: coef.buf,
        stride,
        u: u.buf,
        t,
        hc,
        d,
    }])
    .then_some(u)
}

/// In place: x[t, k] = post_k f[t] + Σ_i comb[i][k] x[t, i], coef as [`hc_mix`] returns it.
fn hc_expand(ex: &Exec, x: &Act, f: &Act, coef: &Act, hc: usize, d: usize) -> Option<()> {
    ex.launch(&[Op::HcExpand {
        x: x.buf,
        f: f.buf,
        coef: coef.buf,
        t: x.len / (hc * d),
        hc,
        d,
    }])
    .then_some(())
}

/// The HC head's collapse weights for each state of x [t, hc·d]: [t, hc].
fn hc_head<'e>(
    ex: &'e Exec,
    (fn_, base, scale): (&[f32], &[f32], f32),
    x: &Act,
    k: HcDims,
) -> Option<Act<'e>> {
    let t = x.len / (k.hc * k.d);
    let out = Act::new(ex, t * k.hc)?;
    ex.offload(
        &mut [
            Arg::Dev(x.buf),
            Arg::Param(f32_bytes(fn_)),
            Arg::Param(f32_bytes(base)),
            Arg::Dev(out.buf),
        ],
        |b| Op::HcHead {
            x: b[0],
            fn_: b[1],
            base: b[2],
            scale,
            out: b[3],
            t,
            hc: k.hc,
            d: k.d,
            norm_eps: k.norm_eps,
            hc_eps: k.hc_eps,
        },
    )
    .then_some(out)
}

/// Attention of the queries q [t, heads, hd] over rows of the device key table `keys`
/// [_, hd]: query j sees the rows `idx[j]`. Returns [t, heads, hd].
#[allow(clippy::too_many_arguments)] // queries, keys, their selection, sinks and shapes
fn attend<'e>(
    ex: &'e Exec,
    q: &Act,
    keys: Buf,
    idx: &[Vec<usize>],
    sink: &[f32],
    scale: f32,
    heads: usize,
    hd: usize,
) -> Option<Act<'e>> {
    let t = idx.len();
    let max_keys = idx.iter().map(|v| v.len()).max().unwrap_or(0).max(1);
    let flat = i32_bytes(
        idx.iter()
            .flat_map(|v| v.iter().copied().chain(std::iter::repeat(0)).take(max_keys)),
    );
    let counts = i32_bytes(idx.iter().map(|v| v.len()));
    let out = Act::new(ex, t * heads * hd)?;
    ex.offload(
        &mut [
            Arg::Dev(q.buf),
            Arg::Dev(keys),
            Arg::In(&flat),
            Arg::In(&counts),
            Arg::Param(f32_bytes(sink)),
            Arg::Dev(out.buf),
        ],
        |b| Op::AttendSink {
            q: b[0],
            keys: b[1],
            idx: b[2],
            n_keys: b[3],
            max_keys,
            sink: b[4],
            scale,
            out: b[5],
            t,
            heads,
            hd,
        },
    )
    .then_some(out)
}

/// Indexer: for each (query j, n) of `queries`, the top `k` of the scores of the first n rows
/// [n, ihd] of the device table `keys` for query j's heads (`iq` [t, ih, ihd] on the device,
/// weights `w` [t, ih]), ascending. Every query's choice is made on the device and they come
/// back together in one read.
fn indexer_select(
    ex: &Exec,
    iq: &Act,
    w: &[f32],
    keys: Buf,
    queries: &[(usize, usize)],
    (ih, ihd): (usize, usize),
    k: usize,
) -> Option<Vec<Vec<usize>>> {
    let most = queries.iter().map(|q| q.1).max().unwrap_or(0);
    let mut out = vec![0u8; 4 * k * queries.len()];
    let ok = ex.offload_ops(
        &mut [
            Arg::Dev(iq.buf),
            Arg::In(f32_bytes(w)),
            Arg::Dev(keys),
            Arg::Temp(4 * ih * ihd),
            Arg::Temp(4 * ih),
            Arg::Temp(4 * most),
            Arg::Temp(4 * k),
            Arg::Out(&mut out),
        ],
        |b| {
            let (q, wq, scores, sel) = (b[3], b[4], b[5], b[6]);
            queries
                .iter()
                .enumerate()
                .flat_map(|(i, &(j, n))| {
                    [
                        copy(b[0], j * ih * ihd, 0, q, 0, 0, 1, ih * ihd),
                        copy(b[1], j * ih, 0, wq, 0, 0, 1, ih),
                        Op::IndexerScores {
                            q,
                            w: wq,
                            keys: b[2],
                            out: scores,
                            n,
                            ih,
                            ihd,
                        },
                        Op::TopkSelect {
                            scores,
                            n,
                            k,
                            out: sel,
                        },
                        copy(sel, 0, 0, b[7], i * k, 0, 1, k),
                    ]
                })
                .collect()
        },
    );
    ok.then(|| {
        bytes_i32(&out)
            .chunks(k)
            .map(|c| c.iter().map(|&i| i as usize).collect())
            .collect()
    })
}

/// MoE routing of the tokens (logits [t, E]): sqrt-softplus scores, the top k of score + bias
/// or the hash layer's experts, normalised and scaled weights. The routes come to the host
/// in one copy together with `x` (the MoE input, for the CPU's experts): the one read a MoE
/// site makes. The weights [t, k] also stay on the device.
fn route<'e>(
    ex: &'e Exec,
    cfg: &ModelConfig,
    w: &MoeWeights,
    logits: &Act,
    x: &Act,
    tokens: &[u32],
) -> Option<(Vec<Route>, Act<'e>, Vec<f32>)> {
    let (t, n_experts, k) = (tokens.len(), cfg.n_routed_experts, cfg.num_experts_per_tok);
    let hashed: Option<Vec<u8>> = w.tid2eid.as_ref().map(|_| {
        i32_bytes(
            tokens
                .iter()
                .flat_map(|&tok| w.hashed_experts(tok, k).unwrap_or_default()),
        )
    });
    let weights = Act::new(ex, t * k)?;
    let experts = Act::new(ex, t * k)?;
    let ok = ex.offload(
        &mut [
            Arg::Dev(logits.buf),
            Arg::maybe_param(w.bias.as_deref().map(f32_bytes)),
            Arg::maybe(hashed.as_deref()),
            Arg::Dev(experts.buf),
            Arg::Dev(weights.buf),
        ],
        |b| Op::RouteTopk {
            logits: b[0],
            bias: b.opt(1),
            hashed: b.opt(2),
            tokens: t,
            n_experts,
            k,
            scale: cfg.routed_scaling_factor,
            experts: b[3],
            weights: b[4],
        },
    );
    if !ok {
        return None;
    }
    let mut got = read_together(
        ex,
        &[(experts.buf, t * k), (weights.buf, t * k), (x.buf, x.len)],
    )?;
    let x_host = got.pop()?;
    let (ids, wts) = (&got[0], &got[1]);
    let routes = (0..t)
        .map(|j| Route {
            experts: ids[j * k..(j + 1) * k]
                .iter()
                .map(|&e| e.to_bits() as usize)
                .collect(),
            weights: wts[j * k..(j + 1) * k].to_vec(),
        })
        .collect();
    Some((routes, weights, x_host))
}

/// The device could not run an op (no room, an error): the step is computed on the host.
#[derive(Debug)]
pub(crate) struct GaveUp;

type R<T> = Result<T, GaveUp>;

fn ok<T>(v: Option<T>) -> R<T> {
    v.ok_or(GaveUp)
}

/// [`Ops`] on `ex`'s device, activations in device buffers.
pub(crate) struct Dev<'e> {
    pub ex: &'e Exec,
}

/// Positions split into runs of consecutive ring slots (slot = position mod `win`; a run
/// ends where the slot wraps): at most two for a range no longer than the window.
fn slot_runs(r: Range<usize>, win: usize) -> impl Iterator<Item = Range<usize>> {
    let end = r.end;
    std::iter::successors(Some(r.start), move |&p| Some(end.min((p / win + 1) * win)))
        .take_while(move |&p| p < end)
        .map(move |p| p..end.min((p / win + 1) * win))
}

impl<'e> Ops for Dev<'e> {
    type T = Act<'e>;
    type Err = GaveUp;

    fn on_device(&self) -> bool {
        true
    }

    fn upload(&self, v: Vec<f32>) -> R<Act<'e>> {
        ok(Act::upload(self.ex, &v))
    }

    fn read(&self, keep: &[&Act<'e>], take: Vec<Act<'e>>) -> R<Vec<Vec<f32>>> {
        let all: Vec<&Act> = keep.iter().copied().chain(&take).collect();
        match all[..] {
            [x] => ok(x.read().map(|v| vec![v])),
            _ => {
                let parts: Vec<(Buf, usize)> = all.iter().map(|x| (x.buf, x.len)).collect();
                ok(read_together(self.ex, &parts))
            }
        }
    }

    fn rows(&self, x: &Act<'e>, rows: Range<usize>, width: usize) -> R<Act<'e>> {
        let out = ok(Act::new(self.ex, rows.len() * width))?;
        let n = rows.len();
        let c = copy(
            x.buf,
            rows.start * width,
            width,
            out.buf,
            0,
            width,
            n,
            width,
        );
        ok(self.ex.launch(&[c]).then_some(out))
    }

    fn gather_rows(&self, x: &Act<'e>, idx: &[usize], width: usize) -> R<Act<'e>> {
        ok(gather_rows(self.ex, x, idx, width))
    }

    /// On the device when `w` is resident there; otherwise on the CPU (x read back, the
    /// product uploaded).
    fn linear(&self, w: &Weight, x: &Act<'e>, t: usize) -> R<Act<'e>> {
        if self.ex.is_resident(w) {
            return ok(linear(self.ex, w, x, t));
        }
        let xh = ok(x.read())?;
        ok(Act::upload(self.ex, &self.ex.linear(w, &xh, t)))
    }

    fn linear_grouped(
        &self,
        w: &Weight,
        x: &Act<'e>,
        t: usize,
        groups: usize,
        _hd: usize,
        interleaved: bool,
    ) -> R<Act<'e>> {
        if interleaved {
            return Err(GaveUp);
        }
        let ex = self.ex;
        let (gin, ol) = (w.cols(), w.rows() / groups);
        let width = groups * gin;
        // An FP8 product starts at a whole 128-row scale block (the op's contract): a group
        // that starts inside one computes from the block's start and keeps its own rows.
        let align = if matches!(w, Weight::Fp8 { .. }) {
            128
        } else {
            1
        };
        let y = ok(Act::new(ex, t * groups * ol))?;
        let xg = ok(Act::new(ex, t * gin))?;
        let yg = ok(Act::new(ex, t * (ol + align - 1)))?;
        for gi in 0..groups {
            let first = gi * ol - gi * ol % align;
            let (skip, n) = (gi * ol - first, (gi + 1) * ol - first);
            let done = ex.launch(&[copy(x.buf, gi * gin, width, xg.buf, 0, gin, t, gin)])
                && ex.linear_bufs(w, first..(gi + 1) * ol, xg.buf, yg.buf, t)
                && ex.launch(&[copy(yg.buf, skip, n, y.buf, gi * ol, groups * ol, t, ol)]);
            if !done {
                return Err(GaveUp);
            }
        }
        Ok(y)
    }

    /// x itself (ideal) or a copy rounded per 128-block to E4M3 (reference) or per 32-block
    /// to the int8 grid (fast).
    fn gemm_input<'a>(&self, num: Numerics, x: &'a Act<'e>, cols: usize) -> R<Maybe<'a, Act<'e>>> {
        let round = |x_: Buf, rows: usize| match num {
            Numerics::Fast => Op::QuantI8 {
                x: x_,
                rows,
                width: cols,
                len: cols,
                block: I8_BLOCK,
            },
            _ => Op::QuantE4m3 {
                x: x_,
                rows,
                width: cols,
                len: cols,
                block: 128,
            },
        };
        match num {
            Numerics::Ideal => Ok(Maybe::Same(x)),
            Numerics::Reference | Numerics::Fast => {
                let y = ok(Act::new(self.ex, x.len))?;
                let rows = x.len / cols;
                let ops = [
                    copy(x.buf, 0, cols, y.buf, 0, cols, rows, cols),
                    round(y.buf, rows),
                ];
                ok(self.ex.launch(&ops).then_some(Maybe::Own(y)))
            }
        }
    }

    fn rms_norm(&self, x: &mut Act<'e>, w: Option<&[f32]>, n: usize, eps: f32) -> R<()> {
        ok(rms_norm_rows(self.ex, x, w, n, eps))
    }

    fn rope(
        &self,
        rope: &Rope,
        x: &mut Act<'e>,
        width: usize,
        pos0: usize,
        rows_per_pos: usize,
        inverse: bool,
    ) -> R<()> {
        ok(rope_rows(
            self.ex,
            rope,
            x,
            width,
            pos0,
            rows_per_pos,
            inverse,
        ))
    }

    fn kv_rows(&self, num: Numerics, x: &mut Act<'e>, width: usize, nope: usize) -> R<()> {
        ok(kv_rows(self.ex, num, x, width, nope))
    }

    fn indexer_vecs(&self, num: Numerics, x: &mut Act<'e>, n: usize) -> R<()> {
        ok(indexer_vecs(self.ex, num, x, n))
    }

    fn hc_mix(&self, p: &HcParams, x: &Act<'e>, k: HcDims) -> R<Act<'e>> {
        ok(hc_mix(self.ex, p, x, k))
    }

    fn hc_collapse(&self, x: &Act<'e>, coef: &Act<'e>, k: HcDims) -> R<Act<'e>> {
        let t = (x.len / (k.hc * k.d)).max(1);
        ok(hc_collapse(self.ex, x, coef, coef.len / t, k.hc, k.d))
    }

    fn hc_expand(&self, x: &mut Act<'e>, f: &Act<'e>, coef: &Act<'e>, k: HcDims) -> R<()> {
        ok(hc_expand(self.ex, x, f, coef, k.hc, k.d))
    }

    fn hc_head(&self, p: HcHeadParams, x: &Act<'e>, rows: Range<usize>, k: HcDims) -> R<Act<'e>> {
        let width = k.hc * k.d;
        let part;
        let xs = if rows.len() * width == x.len {
            x
        } else {
            part = self.rows(x, rows, width)?;
            &part
        };
        let pre = ok(hc_head(self.ex, p, xs, k))?;
        ok(hc_collapse(self.ex, xs, &pre, k.hc, k.hc, k.d))
    }

    /// Every query's choice made on the device (over the block's indexer rows, kept there
    /// in a table across steps) and brought back in one read.
    fn indexer_topk(
        &self,
        st: &AttnState,
        iq: &Act<'e>,
        iw: &[f32],
        queries: &[(usize, usize)],
        heads: (usize, usize),
        topk: usize,
    ) -> R<Vec<Vec<usize>>> {
        let is = st.index.as_ref().ok_or(GaveUp)?;
        let (id, version) = is.rows.identity();
        let n = is.rows.len();
        let ex = self.ex;
        let keys = ok(ex
            .tables
            .get(ex, id, version, heads.1, 0, n, |r| is.rows.rows(r)))?
        .0;
        ok(indexer_select(self.ex, iq, iw, keys, queries, heads, topk))
    }

    /// Over one key table per block kept on the device across steps: the window ring at slot
    /// position mod win, this step's rows after it, then every compressed row. This step's
    /// rows are copied into the table from `kv`, and afterwards into their ring slots, so
    /// the next step finds them there; ring rows the table lacks (after a fresh start or a
    /// rewind) come from the host's ring.
    fn attend(
        &self,
        st: &mut AttnState,
        q: &Act<'e>,
        kv: &Act<'e>,
        keys: &[QueryKeys],
        sink: &[f32],
        t0: usize,
        (h, hd): (usize, usize),
    ) -> R<Act<'e>> {
        let ex = self.ex;
        let (t, win) = (keys.len(), st.window.size());
        let first = t0.saturating_sub(win - 1);
        let (n, version) = st
            .comp
            .as_ref()
            .map_or((0, 0), |cs| (cs.rows.len(), cs.rows.identity().1));
        let rows = |r: Range<usize>| st.comp.as_ref().map_or(Vec::new(), |cs| cs.rows.rows(r));
        let (buf, comp_at, fresh) = ok(ex.tables.get(ex, st.table, version, hd, win + t, n, rows))?;
        let from = match st.ring_synced {
            Some(p) if !fresh => p.max(first),
            _ => first,
        };
        for r in slot_runs(from..t0, win) {
            let slot = r.start % win;
            let run: Vec<f32> = r.flat_map(|p| st.window.get(p).iter().copied()).collect();
            if !ex.write_rows(buf, slot, hd, &run) {
                return Err(GaveUp);
            }
        }
        st.ring_synced = None;
        if !ex.launch(&[copy(kv.buf, 0, hd, buf, win * hd, hd, t, hd)]) {
            return Err(GaveUp);
        }
        let idx: Vec<Vec<usize>> = keys
            .iter()
            .map(|k| {
                let window = k.window.clone();
                let window = window.map(|j| if j < t0 { j % win } else { win + j - t0 });
                window.chain(k.comp.iter().map(|&i| comp_at + i)).collect()
            })
            .collect();
        let scale = 1.0 / (hd as f32).sqrt();
        let o = ok(attend(ex, q, buf, &idx, sink, scale, h, hd))?;
        // This step's last rows into their ring slots, so the next step needs no copy from
        // the host.
        let last = (t0 + t).saturating_sub(win).max(t0)..t0 + t;
        let copies: Vec<Op> = slot_runs(last, win)
            .map(|r| {
                let (src, dst) = ((r.start - t0) * hd, (r.start % win) * hd);
                copy(kv.buf, src, hd, buf, dst, hd, r.len(), hd)
            })
            .collect();
        if !ex.launch(&copies) {
            return Err(GaveUp);
        }
        st.ring_synced = Some(t0 + t);
        Ok(o)
    }

    fn route<'a>(
        &self,
        cfg: &ModelConfig,
        w: &MoeWeights,
        logits: &Act<'e>,
        x: &'a Act<'e>,
        tokens: &[u32],
    ) -> R<Routing<'a, Act<'e>>> {
        let (routes, weights, x_host) = ok(route(self.ex, cfg, w, logits, x, tokens))?;
        Ok((routes, weights, Cow::Owned(x_host)))
    }

    fn swiglu(
        &self,
        g: &Act<'e>,
        u: &Act<'e>,
        f: RowWeights<Act<'e>>,
        width: usize,
        limit: f32,
        lower: f32,
    ) -> R<Act<'e>> {
        // The kernel clamps the gate from above only (a two-sided clamp is a trap).
        if lower != f32::NEG_INFINITY {
            return Err(GaveUp);
        }
        ok(swiglu(self.ex, g, u, &f, width, limit))
    }

    fn add_rows(
        &self,
        y: &mut Act<'e>,
        x: &Act<'e>,
        x_off: usize,
        idx: Option<&[usize]>,
        f: RowWeights<Act<'e>>,
        n: usize,
        width: usize,
    ) -> R<()> {
        ok(add_rows(self.ex, y, x.buf, x_off, idx, &f, n, width))
    }
}
