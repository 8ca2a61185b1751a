//! The forward pass's ops on the device with the activations kept there ([`Act`]): a layer's
//! ops read and write device buffers, and only the few values the host needs come back (the
//! routing, the new KV and compressor rows, the indexer's choices). Every helper returns None
//! when the device cannot run it (no room, an error); the caller then abandons its device
//! path and the step is computed on the host (`Engine::forward`), so a device problem never
//! changes an answer.

use super::moe::Route;
use super::numerics::Numerics;
use super::rope::Rope;
use crate::backend::device::{Buf, Op, bytes_i32, f32_bytes, f32_bytes_mut};
use crate::backend::exec::{Arg, Exec};
use crate::model::config::ModelConfig;
use crate::model::formats::I8_BLOCK;
use crate::model::weights::{HcParams, MoeWeights, Weight};

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

    pub fn buf(&self) -> Buf {
        self.buf
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Act<'_> {
    fn drop(&mut self) {
        self.ex.release(self.buf);
    }
}

/// An activation or a rounded copy of it (see [`gemm_input`]).
pub enum Input<'a, 'e> {
    Same(&'a Act<'e>),
    Rounded(Act<'e>),
}

impl<'e> std::ops::Deref for Input<'_, 'e> {
    type Target = Act<'e>;
    fn deref(&self) -> &Act<'e> {
        match self {
            Input::Same(a) => a,
            Input::Rounded(a) => a,
        }
    }
}

/// Per-row factors of [`swiglu`] and [`add_rows`].
#[derive(Clone, Copy)]
pub enum RowWeights<'a> {
    One,
    /// Values on the device from this offset on (e.g. the routing's weights).
    Dev(Buf, usize),
    Host(&'a [f32]),
}

impl RowWeights<'_> {
    /// The argument for `offload_ops` and the offset into it.
    fn arg(&self) -> (Arg<'_>, usize) {
        match *self {
            RowWeights::One => (Arg::Absent, 0),
            RowWeights::Dev(b, off) => (Arg::Dev(b), off),
            RowWeights::Host(w) => (Arg::In(f32_bytes(w)), 0),
        }
    }
}

/// Several device values brought back in one copy (each read is a synchronisation, so a
/// layer gathers what the host needs first): `parts` are (buffer, values), copied one after
/// the other into one buffer and read; returns them split again. i32 parts come back as the
/// f32 values with their bits (`f32::to_bits`).
pub fn read_together(ex: &Exec, parts: &[(Buf, usize)]) -> Option<Vec<Vec<f32>>> {
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
pub fn linear<'e>(ex: &'e Exec, w: &Weight, x: &Act, t: usize) -> Option<Act<'e>> {
    let y = Act::new(ex, t * w.rows())?;
    ex.linear_on_device(w, 0..w.rows(), x.buf, y.buf, t)
        .then_some(y)
}

/// In place, per row of `n`: RMSNorm with weight `w` (None: unweighted).
pub fn rms_norm_rows(ex: &Exec, x: &Act, w: Option<&[f32]>, n: usize, eps: f32) -> Option<()> {
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
pub fn rope_rows(
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

/// The input of an FP8/FP4 product ([`Numerics::gemm_input`]): x itself (ideal) or a copy
/// rounded per 128-block to E4M3 (reference) or per 32-block to the int8 grid (fast).
pub fn gemm_input<'a, 'e>(
    ex: &'e Exec,
    num: Numerics,
    x: &'a Act<'e>,
    cols: usize,
) -> Option<Input<'a, 'e>> {
    match num {
        Numerics::Ideal => Some(Input::Same(x)),
        Numerics::Reference | Numerics::Fast => {
            let y = Act::new(ex, x.len)?;
            let rows = x.len / cols;
            let (x_, width, len) = (y.buf, cols, cols);
            let round = match num {
                Numerics::Fast => Op::QuantI8 {
                    x: x_,
                    rows,
                    width,
                    len,
                    block: I8_BLOCK,
                },
                _ => Op::QuantE4m3 {
                    x: x_,
                    rows,
                    width,
                    len,
                    block: 128,
                },
            };
            ex.launch(&[copy(x.buf, 0, cols, y.buf, 0, cols, rows, cols), round])
                .then_some(Input::Rounded(y))
        }
    }
}

/// Stored KV rows ([`Numerics::kv_row`] on each row of `width`).
pub fn kv_rows(ex: &Exec, num: Numerics, kv: &Act, width: usize, nope: usize) -> Option<()> {
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
pub fn indexer_vecs(ex: &Exec, num: Numerics, v: &Act, n: usize) -> Option<()> {
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
pub fn copy(
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
pub fn gather_rows<'e>(ex: &'e Exec, x: &Act, idx: &[usize], width: usize) -> Option<Act<'e>> {
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
pub fn add_rows(
    ex: &Exec,
    y: &Act,
    x: Buf,
    x_off: usize,
    idx: Option<&[usize]>,
    weights: RowWeights,
    n: usize,
    width: usize,
) -> Option<()> {
    let ib = idx.map(|i| i32_bytes(i.iter().copied()));
    let (wa, w_off) = weights.arg();
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
pub fn swiglu<'e>(
    ex: &'e Exec,
    g: &Act,
    u: &Act,
    row_w: RowWeights,
    width: usize,
    limit: f32,
) -> Option<Act<'e>> {
    let n = g.len;
    let out = Act::new(ex, n)?;
    let (wa, row_w_off) = row_w.arg();
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

/// The mHC constants of a model: (hc, d, sinkhorn iterations, norm eps, hc eps).
#[derive(Clone, Copy)]
pub struct HcDims {
    pub hc: usize,
    pub d: usize,
    pub iters: usize,
    pub norm_eps: f32,
    pub hc_eps: f32,
}

/// mHC coefficients of the states x [t, hc·d]: [t, 2hc + hc²] = [pre | post | comb].
pub fn hc_mix<'e>(ex: &'e Exec, p: &HcParams, x: &Act, k: HcDims) -> Option<Act<'e>> {
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
pub fn hc_collapse<'e>(
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
pub fn hc_expand(ex: &Exec, x: &Act, f: &Act, coef: &Act, hc: usize, d: usize) -> Option<()> {
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
pub fn hc_head<'e>(
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
pub fn attend<'e>(
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
pub fn indexer_select(
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
pub fn route<'e>(
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
