//! [`Ops`] on the CPU: activations are host vectors, products go through an [`Exec`] (which
//! still runs a product on the device when its weight is resident there, for layers whose
//! other ops stay on the host), everything else through the CPU kernels, in parallel over
//! rows. The spec's traps (tests only) reach it as `Deviations` flags.

use super::attention::AttnState;
use super::indexer;
use super::moe;
use super::numerics::Numerics;
use super::ops::{HcDims, HcHeadParams, Maybe, Ops, QueryKeys, Routing, RowWeights};
use super::rope::Rope;
use super::traps::Deviations;
use crate::backend::cpu::{attend_sink_heads, axpy, hc, rms_norm, rms_norm_unweighted, swiglu};
use crate::backend::exec::Exec;
use crate::model::config::ModelConfig;
use crate::model::weights::{HcParams, MoeWeights, Weight};
use rayon::prelude::*;
use std::borrow::Cow;
use std::convert::Infallible;
use std::ops::Range;

/// Attention heads per parallel task (a multiple of the kernel's block of 8).
const HEADS_PER_TASK: usize = 16;

/// The host's operations; products through `ex`.
pub(crate) struct Host<'a> {
    pub ex: &'a Exec,
    pub dv: Deviations,
}

type R<T> = Result<T, Infallible>;

/// The factors of `f` for rows `0..n`, as host values.
fn factors<'a>(f: &'a RowWeights<Vec<f32>>, n: usize) -> Option<&'a [f32]> {
    match f {
        RowWeights::One => None,
        RowWeights::Host(w) => Some(&w[..n]),
        RowWeights::At(v, off) => Some(&v[*off..*off + n]),
    }
}

impl Ops for Host<'_> {
    type T = Vec<f32>;
    type Err = Infallible;

    fn on_device(&self) -> bool {
        false
    }

    fn upload(&self, v: Vec<f32>) -> R<Vec<f32>> {
        Ok(v)
    }

    fn read(&self, keep: &[&Vec<f32>], take: Vec<Vec<f32>>) -> R<Vec<Vec<f32>>> {
        Ok(keep.iter().map(|x| x.to_vec()).chain(take).collect())
    }

    fn rows(&self, x: &Vec<f32>, rows: Range<usize>, width: usize) -> R<Vec<f32>> {
        Ok(x[rows.start * width..rows.end * width].to_vec())
    }

    fn gather_rows(&self, x: &Vec<f32>, idx: &[usize], width: usize) -> R<Vec<f32>> {
        let mut out = vec![0f32; idx.len() * width];
        for (o, &i) in out.chunks_mut(width).zip(idx) {
            o.copy_from_slice(&x[i * width..(i + 1) * width]);
        }
        Ok(out)
    }

    fn linear(&self, w: &Weight, x: &Vec<f32>, t: usize) -> R<Vec<f32>> {
        Ok(self.ex.linear(w, x, t))
    }

    fn linear_grouped(
        &self,
        w: &Weight,
        x: &Vec<f32>,
        t: usize,
        groups: usize,
        hd: usize,
        interleaved: bool,
    ) -> R<Vec<f32>> {
        let (gin, ol) = (w.cols(), w.rows() / groups);
        let width = groups * gin;
        let (hpg, h) = (gin / hd, width / hd);
        let mut y = vec![0f32; t * groups * ol];
        let mut xg = vec![0f32; t * gin];
        let mut yg = vec![0f32; t * ol];
        for gi in 0..groups {
            for k in 0..t {
                let row = &x[k * width..(k + 1) * width];
                let dst = &mut xg[k * gin..(k + 1) * gin];
                if interleaved {
                    for j in 0..hpg {
                        let head = j * groups + gi;
                        debug_assert!(head < h);
                        dst[j * hd..(j + 1) * hd].copy_from_slice(&row[head * hd..(head + 1) * hd]);
                    }
                } else {
                    dst.copy_from_slice(&row[gi * gin..(gi + 1) * gin]);
                }
            }
            self.ex
                .linear_range(w, gi * ol..(gi + 1) * ol, &xg, t, &mut yg);
            for k in 0..t {
                y[k * groups * ol + gi * ol..k * groups * ol + (gi + 1) * ol]
                    .copy_from_slice(&yg[k * ol..(k + 1) * ol]);
            }
        }
        Ok(y)
    }

    fn gemm_input<'a>(
        &self,
        num: Numerics,
        x: &'a Vec<f32>,
        cols: usize,
    ) -> R<Maybe<'a, Vec<f32>>> {
        Ok(match num.gemm_input(x, cols) {
            Cow::Borrowed(_) => Maybe::Same(x),
            Cow::Owned(v) => Maybe::Own(v),
        })
    }

    fn rms_norm(&self, x: &mut Vec<f32>, w: Option<&[f32]>, n: usize, eps: f32) -> R<()> {
        x.par_chunks_mut(n).for_each(|row| match w {
            Some(w) => rms_norm(row, w, eps),
            None => rms_norm_unweighted(row, eps),
        });
        Ok(())
    }

    fn rope(
        &self,
        rope: &Rope,
        x: &mut Vec<f32>,
        width: usize,
        pos0: usize,
        rows_per_pos: usize,
        inverse: bool,
    ) -> R<()> {
        x.par_chunks_mut(width * rows_per_pos)
            .enumerate()
            .for_each(|(k, rows)| {
                for row in rows.chunks_mut(width) {
                    rope.apply(row, pos0 + k, inverse);
                }
            });
        Ok(())
    }

    fn kv_rows(&self, num: Numerics, x: &mut Vec<f32>, width: usize, nope: usize) -> R<()> {
        x.chunks_mut(width).for_each(|row| num.kv_row(row, nope));
        Ok(())
    }

    fn indexer_vecs(&self, num: Numerics, x: &mut Vec<f32>, n: usize) -> R<()> {
        x.chunks_mut(n).for_each(|v| num.indexer_vec(v));
        Ok(())
    }

    fn hc_mix(&self, p: &HcParams, x: &Vec<f32>, k: HcDims) -> R<Vec<f32>> {
        let (hc, dv) = (k.hc, self.dv);
        let mut out = vec![0f32; x.len() / (hc * k.d) * k.mix_len()];
        out.par_chunks_mut(k.mix_len())
            .zip(x.par_chunks(hc * k.d))
            .for_each(|(c, xt)| {
                c.copy_from_slice(&hc::coefficients(
                    &p.fn_, &p.base, &p.scale, xt, hc, k.iters, k.norm_eps, k.hc_eps,
                ));
                if dv.pre_normalised {
                    let s: f32 = c[..hc].iter().sum();
                    c[..hc].iter_mut().for_each(|v| *v /= s);
                }
                if dv.post_no_double {
                    c[hc..2 * hc].iter_mut().for_each(|v| *v *= 0.5);
                }
            });
        Ok(out)
    }

    fn hc_collapse(&self, x: &Vec<f32>, coef: &Vec<f32>, k: HcDims) -> R<Vec<f32>> {
        let (hc, d) = (k.hc, k.d);
        let stride = coef.len() / (x.len() / (hc * d)).max(1);
        let mut u = vec![0f32; x.len() / hc];
        u.par_chunks_mut(d)
            .zip(x.par_chunks(hc * d))
            .zip(coef.par_chunks(stride))
            .for_each(|((ut, xt), c)| {
                // The trap: the collapse of the RMS-normalised copies.
                let rho = if self.dv.collapse_normalised {
                    let ms = xt.iter().map(|v| v * v).sum::<f32>() / xt.len() as f32;
                    1.0 / (ms + k.norm_eps).sqrt()
                } else {
                    1.0
                };
                ut.copy_from_slice(&hc::collapse(&c[..hc], xt, d, rho));
            });
        Ok(u)
    }

    fn hc_expand(&self, x: &mut Vec<f32>, f: &Vec<f32>, coef: &Vec<f32>, k: HcDims) -> R<()> {
        let (hc, d) = (k.hc, k.d);
        let untransposed = self.dv.comb_untransposed;
        x.par_chunks_mut(hc * d)
            .zip(f.par_chunks(d))
            .zip(coef.par_chunks(k.mix_len()))
            .for_each(|((xt, ft), c)| {
                hc::expand(&c[hc..2 * hc], &c[2 * hc..], ft, xt, d, untransposed)
            });
        Ok(())
    }

    fn hc_head(
        &self,
        (fn_, base, scale): HcHeadParams,
        x: &Vec<f32>,
        rows: Range<usize>,
        k: HcDims,
    ) -> R<Vec<f32>> {
        let (hc, d) = (k.hc, k.d);
        let two = if self.dv.hc_head_two_sigmoid {
            2.0
        } else {
            1.0
        };
        let x = &x[rows.start * hc * d..rows.end * hc * d];
        let mut h = vec![0f32; rows.len() * d];
        h.par_chunks_mut(d)
            .zip(x.par_chunks(hc * d))
            .for_each(|(h, xt)| {
                let pre = hc::head_weights(fn_, base, scale, xt, (k.norm_eps, k.hc_eps), two);
                h.copy_from_slice(&hc::collapse(&pre, xt, d, 1.0));
            });
        Ok(h)
    }

    fn indexer_topk(
        &self,
        st: &AttnState,
        iq: &Vec<f32>,
        iw: &[f32],
        queries: &[(usize, usize)],
        (ih, ihd): (usize, usize),
        topk: usize,
    ) -> R<Vec<Vec<usize>>> {
        let Some(is) = st.index.as_ref() else {
            return Ok(queries.iter().map(|_| Vec::new()).collect());
        };
        Ok(queries
            .par_iter()
            .map(|&(j, n)| {
                let q = indexer::IndexerQuery {
                    q: &iq[j * ih * ihd..(j + 1) * ih * ihd],
                    w: &iw[j * ih..(j + 1) * ih],
                };
                indexer::select(is, &q, n, ihd, topk, self.dv)
            })
            .collect())
    }

    fn attend(
        &self,
        st: &mut AttnState,
        q: &Vec<f32>,
        kv: &Vec<f32>,
        keys: &[QueryKeys],
        sink: &[f32],
        t0: usize,
        (h, hd): (usize, usize),
    ) -> R<Vec<f32>> {
        let st = &*st;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut o = vec![0f32; keys.len() * h * hd];
        o.par_chunks_mut(h * hd)
            .zip(keys)
            .enumerate()
            .for_each(|(k, (ok, qk))| {
                let mut rows: Vec<&[f32]> = qk
                    .window
                    .clone()
                    .map(|j| match j.checked_sub(t0) {
                        Some(i) => &kv[i * hd..(i + 1) * hd],
                        None => st.window.get(j),
                    })
                    .collect();
                if let Some(cs) = &st.comp {
                    rows.extend(qk.comp.iter().map(|&i| cs.rows.row(i)));
                }
                // Heads in parallel too, a block of them per task (each key is read once per
                // block): in decode (one token) this is the only parallel loop, and with a
                // long context each head reads hundreds of keys.
                let (rows, qk) = (&rows, &q[k * h * hd..(k + 1) * h * hd]);
                ok.par_chunks_mut(HEADS_PER_TASK * hd)
                    .enumerate()
                    .for_each_init(
                        || Vec::with_capacity(HEADS_PER_TASK * rows.len()),
                        |logits, (b, ob)| {
                            let (h0, nh) = (b * HEADS_PER_TASK, ob.len() / hd);
                            let qb = &qk[h0 * hd..(h0 + nh) * hd];
                            attend_sink_heads(qb, rows, &sink[h0..h0 + nh], scale, logits, ob);
                        },
                    );
            });
        Ok(o)
    }

    fn route<'a>(
        &self,
        cfg: &ModelConfig,
        w: &MoeWeights,
        logits: &Vec<f32>,
        x: &'a Vec<f32>,
        tokens: &[u32],
    ) -> R<Routing<'a, Vec<f32>>> {
        let routes = moe::route(cfg, w, logits, tokens, self.dv);
        let weights = routes.iter().flat_map(|r| r.weights.clone()).collect();
        Ok((routes, weights, Cow::Borrowed(x)))
    }

    fn swiglu(
        &self,
        g: &Vec<f32>,
        u: &Vec<f32>,
        f: RowWeights<Vec<f32>>,
        width: usize,
        limit: f32,
        lower: f32,
    ) -> R<Vec<f32>> {
        let f = factors(&f, g.len() / width);
        let mut out: Vec<f32> = g
            .iter()
            .zip(u)
            .map(|(&g, &u)| swiglu(g, u, limit, lower))
            .collect();
        if let Some(f) = f {
            for (row, &wt) in out.chunks_mut(width).zip(f) {
                row.iter_mut().for_each(|v| *v *= wt);
            }
        }
        Ok(out)
    }

    fn add_rows(
        &self,
        y: &mut Vec<f32>,
        x: &Vec<f32>,
        x_off: usize,
        idx: Option<&[usize]>,
        f: RowWeights<Vec<f32>>,
        n: usize,
        width: usize,
    ) -> R<()> {
        let f = factors(&f, n);
        for j in 0..n {
            let r = idx.map_or(j, |i| i[j]);
            let a = f.map_or(1.0, |f| f[j]);
            let src = &x[x_off + j * width..x_off + (j + 1) * width];
            axpy(&mut y[r * width..(r + 1) * width], a, src);
        }
        Ok(())
    }
}
