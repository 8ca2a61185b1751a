//! The forward pass's non-matrix ops in whole-model mode: each helper runs its op on the
//! device through [`Exec::offload`] and falls back to the CPU code the engine otherwise runs
//! (the same functions the CPU device implements the ops with), so the model code reads the
//! same either way. Fault injection (`traps`) always takes the CPU path.

use super::numerics::Numerics;
use super::rope::Rope;
use crate::backend::cpu::{hc, rms_norm, rms_norm_unweighted};
use crate::backend::device::{Buf, Op, f32_bytes, f32_bytes_mut};
use crate::backend::exec::{Arg, Exec};
use crate::model::weights::HcParams;
use std::borrow::Cow;

fn i32_bytes(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// In place, per row of `n`: RMSNorm with weight `w` (None: unweighted; a model parameter,
/// kept on the device after its first use).
pub fn rms_norm_rows(ex: &Exec, x: &mut [f32], w: Option<&[f32]>, n: usize, eps: f32) {
    let rows = x.len() / n;
    let done = ex.offload(
        &mut [
            Arg::InOut(f32_bytes_mut(x)),
            Arg::maybe_param(w.map(f32_bytes)),
        ],
        |b| Op::RmsNorm {
            x: b[0],
            w: b.opt(1),
            y: b[0],
            rows,
            n,
            eps,
        },
    );
    if !done {
        for row in x.chunks_mut(n) {
            match w {
                Some(w) => rms_norm(row, w, eps),
                None => rms_norm_unweighted(row, eps),
            }
        }
    }
}

/// In place: RoPE on the trailing dims of each `width` row, row r at pos0 + r / rows_per_pos.
pub fn rope_rows(
    ex: &Exec,
    rope: &Rope,
    x: &mut [f32],
    width: usize,
    pos0: usize,
    rows_per_pos: usize,
    inverse: bool,
) {
    let rows = x.len() / width;
    let rope_dim = rope.rope_dim();
    let exact = rope.is_plain_formula();
    let done = exact
        && ex.offload(
            &mut [
                Arg::InOut(f32_bytes_mut(x)),
                Arg::Param(f32_bytes(&rope.inv_freq)),
            ],
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
        );
    if !done {
        for (r, row) in x.chunks_mut(width).enumerate() {
            rope.apply(row, pos0 + r / rows_per_pos, inverse);
        }
    }
}

/// The residual streams x [t, hc·d] of a forward pass, also kept on the device while its
/// layers run there, so the mHC ops need not send x up each time. The host copy stays the
/// reference: it is read back after every device expand (and when that read fails the expand
/// is redone on the host), so a device error never loses the state.
#[derive(Default)]
pub struct Residual {
    /// The device copy and whether it equals the host's.
    buf: Option<Buf>,
    current: bool,
}

impl Residual {
    /// The device copy of `x`, sent up if the host's changed since; None when ops do not
    /// run on the device here or it has no room (the ops then take the host copy).
    fn device(&mut self, ex: &Exec, x: &[f32]) -> Option<Buf> {
        if !ex.ops_on_device() {
            return None;
        }
        match self.buf {
            Some(b) if self.current => Some(b),
            Some(b) => {
                self.current = ex.rewrite(b, f32_bytes(x));
                self.current.then_some(b)
            }
            None => {
                self.buf = ex.upload(f32_bytes(x));
                self.current = self.buf.is_some();
                self.buf
            }
        }
    }

    /// The host copy was changed by CPU code.
    pub fn host_changed(&mut self) {
        self.current = false;
    }

    /// Free the device copy (end of the forward pass).
    pub fn release(self, ex: &Exec) {
        if let Some(b) = self.buf {
            ex.release(b);
        }
    }
}

/// mHC coefficients of `t` tokens' states x [t, hc·d]: [t, 2hc + hc²] = [pre | post | comb].
#[allow(clippy::too_many_arguments)] // the site, the states and the model's constants
pub fn hc_mix(
    ex: &Exec,
    p: &HcParams,
    x: &[f32],
    res: &mut Residual,
    hc: usize,
    d: usize,
    iters: usize,
    norm_eps: f32,
    hc_eps: f32,
) -> Vec<f32> {
    let t = x.len() / (hc * d);
    let mix = 2 * hc + hc * hc;
    let mut out = vec![0f32; t * mix];
    let scale = [p.scale[0], p.scale[1], p.scale[2]];
    let xa = res.device(ex, x).map_or(Arg::In(f32_bytes(x)), Arg::Dev);
    let done = ex.offload(
        &mut [
            xa,
            Arg::Param(f32_bytes(&p.fn_)),
            Arg::Param(f32_bytes(&p.base)),
            Arg::Out(f32_bytes_mut(&mut out)),
        ],
        |b| Op::HcMix {
            x: b[0],
            fn_: b[1],
            base: b[2],
            scale,
            out: b[3],
            t,
            hc,
            d,
            iters,
            norm_eps,
            hc_eps,
        },
    );
    if !done {
        for (xt, o) in x.chunks(hc * d).zip(out.chunks_mut(mix)) {
            o.copy_from_slice(&hc::coefficients(
                &p.fn_, &p.base, &p.scale, xt, hc, iters, norm_eps, hc_eps,
            ));
        }
    }
    out
}

/// u[t] = Σ_i coef[t·stride + i] · x[t, i].
pub fn hc_collapse(
    ex: &Exec,
    x: &[f32],
    res: Option<&mut Residual>,
    coef: &[f32],
    stride: usize,
    hc: usize,
    d: usize,
) -> Vec<f32> {
    let t = x.len() / (hc * d);
    let mut u = vec![0f32; t * d];
    let xa = res
        .and_then(|r| r.device(ex, x))
        .map_or(Arg::In(f32_bytes(x)), Arg::Dev);
    let done = ex.offload(
        &mut [
            xa,
            Arg::In(f32_bytes(coef)),
            Arg::Out(f32_bytes_mut(&mut u)),
        ],
        |b| Op::HcCollapse {
            x: b[0],
            coef: b[1],
            stride,
            u: b[2],
            t,
            hc,
            d,
        },
    );
    if !done {
        for (k, (xt, ut)) in x.chunks(hc * d).zip(u.chunks_mut(d)).enumerate() {
            ut.copy_from_slice(&hc::collapse(
                &coef[k * stride..k * stride + hc],
                xt,
                d,
                1.0,
            ));
        }
    }
    u
}

/// In place: x[t, k] = post_k f[t] + Σ_i comb[i][k] x[t, i], coef as `hc_mix` returns it.
/// With the device copy of x current, the op updates it there and the host copy is read
/// back; should that read fail, the host (still holding the old x) computes it instead.
pub fn hc_expand(
    ex: &Exec,
    x: &mut [f32],
    res: &mut Residual,
    f: &[f32],
    coef: &[f32],
    hc: usize,
    d: usize,
) {
    let t = x.len() / (hc * d);
    let mix = 2 * hc + hc * hc;
    let op = |xb: Buf, b: &crate::backend::exec::Bufs| Op::HcExpand {
        x: xb,
        f: b[0],
        coef: b[1],
        t,
        hc,
        d,
    };
    let done = match res.device(ex, x) {
        Some(xb) => {
            let args = &mut [Arg::In(f32_bytes(f)), Arg::In(f32_bytes(coef))];
            let ran = ex.offload(args, |b| op(xb, b));
            // Until the read succeeds the two copies differ.
            res.current = false;
            let back = ran && ex.read_back(xb, f32_bytes_mut(x));
            res.current = back;
            back
        }
        None => ex.offload(
            &mut [
                Arg::In(f32_bytes(f)),
                Arg::In(f32_bytes(coef)),
                Arg::InOut(f32_bytes_mut(x)),
            ],
            |b| op(b[2], b),
        ),
    };
    if !done {
        for (k, xt) in x.chunks_mut(hc * d).enumerate() {
            let c = &coef[k * mix..(k + 1) * mix];
            hc::expand(
                &c[hc..2 * hc],
                &c[2 * hc..],
                &f[k * d..(k + 1) * d],
                xt,
                d,
                false,
            );
        }
    }
}

/// The HC head's collapse weights for each of `t` states: [t, hc].
#[allow(clippy::too_many_arguments)] // the head's parameters, the states and the constants
pub fn hc_head(
    ex: &Exec,
    fn_: &[f32],
    base: &[f32],
    scale: f32,
    x: &[f32],
    hc: usize,
    d: usize,
    eps: (f32, f32),
) -> Vec<f32> {
    let t = x.len() / (hc * d);
    let mut out = vec![0f32; t * hc];
    let done = ex.offload(
        &mut [
            Arg::In(f32_bytes(x)),
            Arg::Param(f32_bytes(fn_)),
            Arg::Param(f32_bytes(base)),
            Arg::Out(f32_bytes_mut(&mut out)),
        ],
        |b| Op::HcHead {
            x: b[0],
            fn_: b[1],
            base: b[2],
            scale,
            out: b[3],
            t,
            hc,
            d,
            norm_eps: eps.0,
            hc_eps: eps.1,
        },
    );
    if !done {
        for (xt, o) in x.chunks(hc * d).zip(out.chunks_mut(hc)) {
            o.copy_from_slice(&hc::head_weights(fn_, base, scale, xt, eps, 1.0));
        }
    }
    out
}

/// A key table for [`attend`]: host rows, or a device buffer of so many rows (`Exec::table`).
#[derive(Clone, Copy)]
pub enum Keys<'a> {
    Host(&'a [f32]),
    Device(Buf, usize),
}

/// Attention of the queries q [t, heads, hd] over rows of a key table [n, hd]: query j sees
/// the rows `idx[j]`. Returns [t, heads, hd]; None when not offloaded (the caller runs its own
/// CPU loop, which gathers keys without building the table).
#[allow(clippy::too_many_arguments)] // queries, keys, their selection, sinks and shapes
pub fn attend(
    ex: &Exec,
    q: &[f32],
    table: Keys,
    idx: &[Vec<usize>],
    sink: &[f32],
    scale: f32,
    heads: usize,
    hd: usize,
) -> Option<Vec<f32>> {
    if !ex.ops_on_device() {
        return None;
    }
    let t = idx.len();
    let max_keys = idx.iter().map(|v| v.len()).max().unwrap_or(0).max(1);
    let mut flat = vec![0i32; t * max_keys];
    for (j, v) in idx.iter().enumerate() {
        for (i, &r) in v.iter().enumerate() {
            flat[j * max_keys + i] = r as i32;
        }
    }
    let counts: Vec<i32> = idx.iter().map(|v| v.len() as i32).collect();
    let (fb, cb) = (i32_bytes(&flat), i32_bytes(&counts));
    let mut out = vec![0f32; t * heads * hd];
    let keys = match table {
        Keys::Host(k) => Arg::In(f32_bytes(k)),
        Keys::Device(b, _) => Arg::Dev(b),
    };
    ex.offload(
        &mut [
            Arg::In(f32_bytes(q)),
            keys,
            Arg::In(&fb),
            Arg::In(&cb),
            Arg::Param(f32_bytes(sink)),
            Arg::Out(f32_bytes_mut(&mut out)),
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

/// Indexer: the top `k` of the scores of the first `n` rows [n, ihd] of the device table
/// `keys` for one query (q [ih, ihd], w [ih]), ascending. None when not offloaded.
pub fn indexer_select(
    ex: &Exec,
    q: &[f32],
    w: &[f32],
    keys: Buf,
    n: usize,
    ihd: usize,
    k: usize,
) -> Option<Vec<usize>> {
    if !ex.ops_on_device() {
        return None;
    }
    let ih = w.len();
    // Scores and their top k in one go: the scores stay on the device.
    let mut out = vec![0u8; 4 * k];
    ex.offload_ops(
        &mut [
            Arg::In(f32_bytes(q)),
            Arg::In(f32_bytes(w)),
            Arg::Dev(keys),
            Arg::Temp(4 * n),
            Arg::Out(&mut out),
        ],
        |b| {
            vec![
                Op::IndexerScores {
                    q: b[0],
                    w: b[1],
                    keys: b[2],
                    out: b[3],
                    n,
                    ih,
                    ihd,
                },
                Op::TopkSelect {
                    scores: b[3],
                    n,
                    k,
                    out: b[4],
                },
            ]
        },
    )
    .then(|| {
        crate::backend::device::bytes_i32(&out)
            .into_iter()
            .map(|i| i as usize)
            .collect()
    })
}

/// Element-wise clamped SwiGLU of g, u (optionally times a weight per row of `width`).
pub fn swiglu(
    ex: &Exec,
    g: &[f32],
    u: &[f32],
    row_w: Option<&[f32]>,
    width: usize,
    limit: f32,
) -> Option<Vec<f32>> {
    if !ex.ops_on_device() {
        return None;
    }
    let n = g.len();
    let mut out = vec![0f32; n];
    let ok = ex.offload(
        &mut [
            Arg::In(f32_bytes(g)),
            Arg::In(f32_bytes(u)),
            Arg::maybe(row_w.map(f32_bytes)),
            Arg::Out(f32_bytes_mut(&mut out)),
        ],
        |b| Op::Swiglu {
            g: b[0],
            u: b[1],
            row_w: b.opt(2),
            out: b[3],
            n,
            width,
            limit,
        },
    );
    ok.then_some(out)
}

/// MoE routing of `t` tokens (logits [t, E]) on the device: sqrt-softplus scores, the top k
/// of score + bias or the hash layer's experts, normalised and scaled weights. None when not
/// offloaded.
pub fn route(
    ex: &Exec,
    cfg: &crate::model::config::ModelConfig,
    w: &crate::model::weights::MoeWeights,
    logits: &[f32],
    tokens: &[u32],
) -> Option<Vec<super::moe::Route>> {
    if !ex.ops_on_device() {
        return None;
    }
    let (t, n_experts, k) = (tokens.len(), cfg.n_routed_experts, cfg.num_experts_per_tok);
    let hashed: Option<Vec<u8>> = w.tid2eid.as_ref().map(|_| {
        let ids: Vec<i32> = tokens
            .iter()
            .flat_map(|&tok| w.hashed_experts(tok, k).unwrap_or_default())
            .map(|e| e as i32)
            .collect();
        i32_bytes(&ids)
    });
    let mut experts = vec![0u8; 4 * t * k];
    let mut weights = vec![0f32; t * k];
    let scale = cfg.routed_scaling_factor;
    let ok = ex.offload(
        &mut [
            Arg::In(f32_bytes(logits)),
            Arg::maybe_param(w.bias.as_deref().map(f32_bytes)),
            Arg::maybe(hashed.as_deref()),
            Arg::Out(&mut experts),
            Arg::Out(f32_bytes_mut(&mut weights)),
        ],
        |b| Op::RouteTopk {
            logits: b[0],
            bias: b.opt(1),
            hashed: b.opt(2),
            tokens: t,
            n_experts,
            k,
            scale,
            experts: b[3],
            weights: b[4],
        },
    );
    if !ok {
        return None;
    }
    let ex_ids = crate::backend::device::bytes_i32(&experts);
    Some(
        (0..t)
            .map(|j| super::moe::Route {
                experts: ex_ids[j * k..(j + 1) * k]
                    .iter()
                    .map(|&e| e as usize)
                    .collect(),
                weights: weights[j * k..(j + 1) * k].to_vec(),
            })
            .collect(),
    )
}

/// The input of an FP8/FP4 product ([`Numerics::gemm_input`]), rounded on the device.
pub fn gemm_input<'a>(ex: &Exec, num: Numerics, x: &'a [f32], cols: usize) -> Cow<'a, [f32]> {
    if num == Numerics::Reference && ex.ops_on_device() {
        let mut v = x.to_vec();
        let rows = x.len() / cols;
        if ex.offload(&mut [Arg::InOut(f32_bytes_mut(&mut v))], |b| {
            Op::QuantE4m3 {
                x: b[0],
                rows,
                width: cols,
                len: cols,
                block: 128,
            }
        }) {
            return Cow::Owned(v);
        }
    }
    num.gemm_input(x, cols)
}

/// Stored KV rows ([`Numerics::kv_row`] on each row of `width`), rounded on the device.
pub fn kv_rows(ex: &Exec, num: Numerics, kv: &mut [f32], width: usize, nope: usize) {
    let rows = kv.len() / width;
    let done = num == Numerics::Reference
        && ex.ops_on_device()
        && ex.offload(&mut [Arg::InOut(f32_bytes_mut(kv))], |b| Op::QuantE4m3 {
            x: b[0],
            rows,
            width,
            len: nope,
            block: 64,
        });
    if !done {
        kv.chunks_mut(width).for_each(|row| num.kv_row(row, nope));
    }
}

/// Indexer query heads / keys ([`Numerics::indexer_vec`] on each row of `n`), on the device.
pub fn indexer_vecs(ex: &Exec, num: Numerics, v: &mut [f32], n: usize) {
    let rows = v.len() / n;
    let done = num == Numerics::Reference
        && ex.ops_on_device()
        && ex.offload(&mut [Arg::InOut(f32_bytes_mut(v))], |b| Op::HadamardE2m1 {
            x: b[0],
            rows,
            n,
        });
    if !done {
        v.chunks_mut(n).for_each(|row| num.indexer_vec(row));
    }
}
