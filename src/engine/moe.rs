//! Mixture of experts (spec §5.10): an fp32 router with sqrt(softplus) scores (selection
//! bias only for choosing; hash layers take their experts from tid2eid), top-k weights
//! normalised and scaled, SwiGLU experts with clamps, plus the shared expert.

use super::numerics::Numerics;
use super::offload;
use super::traps::{Trap, Traps};
use crate::backend::cpu::{RouteRule, axpy, route_token};
use crate::backend::exec::Exec;
use crate::model::config::ModelConfig;
use crate::model::weights::{ExpertWeights, MoeWeights};

/// All products on the CPU (for experts that must not wait for a copy in flight).
static CPU: std::sync::LazyLock<Exec> = std::sync::LazyLock::new(Exec::cpu);

/// Experts chosen for one token and their weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub experts: Vec<usize>,
    pub weights: Vec<f32>,
}

/// Route `t` tokens given router logits [t, E].
pub fn route(
    cfg: &ModelConfig,
    w: &MoeWeights,
    logits: &[f32],
    tokens: &[u32],
    traps: &Traps,
) -> Vec<Route> {
    let e = cfg.n_routed_experts;
    let k = cfg.num_experts_per_tok;
    logits
        .chunks_exact(e)
        .zip(tokens)
        .map(|(l, &tok)| {
            let hashed = if traps.has(Trap::HashAsScore) {
                None
            } else {
                w.hashed_experts(tok, k)
            };
            let rule = RouteRule {
                k,
                scale: if traps.has(Trap::RouterNoScale) {
                    1.0
                } else {
                    cfg.routed_scaling_factor
                },
                bias_in_weights: traps.has(Trap::RouterBiasInWeights),
                normalize: !traps.has(Trap::RouterNoNormalize),
            };
            let (experts, weights) = route_token(l, w.bias.as_deref(), hashed, rule);
            Route { experts, weights }
        })
        .collect()
}

pub use crate::backend::cpu::swiglu;

/// SwiGLU expert on `t` rows: w2 · (SiLU(min(w1 x, L)) ⊙ clamp(w3 x, ±L)). In reference
/// numerics the routing weight multiplies the activation before the FP8-rounded w2 input
/// (as the official code does); otherwise it is applied by the caller.
fn expert(
    ex: &Exec,
    e: &ExpertWeights,
    x: &[f32],
    t: usize,
    (limit, gate_lower): (f32, f32),
    num: Numerics,
    pre_weights: Option<&[f32]>,
) -> Vec<f32> {
    let d = e.w1.cols();
    let xin = offload::gemm_input(ex, num, x, d);
    let g = ex.linear(&e.w1, &xin, t);
    let u = ex.linear(&e.w3, &xin, t);
    let inter = e.w1.rows();
    // On the device in whole-model mode (the gate's lower clamp is fault injection only).
    let on_device = if gate_lower == f32::NEG_INFINITY {
        offload::swiglu(ex, &g, &u, pre_weights, inter, limit)
    } else {
        None
    };
    let act = on_device.unwrap_or_else(|| {
        let mut act: Vec<f32> = g
            .iter()
            .zip(&u)
            .map(|(&g, &u)| swiglu(g, u, limit, gate_lower))
            .collect();
        if let Some(pw) = pre_weights {
            for (row, &wt) in act.chunks_mut(inter).zip(pw) {
                row.iter_mut().for_each(|v| *v *= wt);
            }
        }
        act
    });
    ex.linear(&e.w2, &offload::gemm_input(ex, num, &act, inter), t)
}

/// What one MoE site needs besides its weights and inputs.
pub struct MoeCtx<'a> {
    pub cfg: &'a ModelConfig,
    pub ex: &'a Exec,
    pub num: Numerics,
    pub traps: &'a Traps,
    /// The block index (the expert cache keys experts by layer).
    pub layer: usize,
}

/// MoE output for `t` tokens: x [t, D] -> [t, D].
pub fn forward(ctx: &MoeCtx, w: &MoeWeights, x: &[f32], tokens: &[u32]) -> Vec<f32> {
    let (cfg, ex, num, traps) = (ctx.cfg, ctx.ex, ctx.num, ctx.traps);
    let d = cfg.hidden_size;
    let t = tokens.len();
    let limit = cfg.swiglu_limit;
    // The gate is clamped from above only.
    let lower = if traps.has(Trap::GateClampBothSides) {
        -limit
    } else {
        f32::NEG_INFINITY
    };
    // Router in fp32 on the BF16 weight (no activation rounding: it is not an FP8 GEMM).
    let logits = ex.linear(&w.gate, x, t);
    let routes = if ex.ops_on_device() && traps.none() {
        offload::route(ex, cfg, w, &logits, tokens)
            .unwrap_or_else(|| route(cfg, w, &logits, tokens, traps))
    } else {
        route(cfg, w, &logits, tokens, traps)
    };
    // The expert cache sees every selection before the experts run (hits on the device);
    // a hash layer's were given to it ahead of the forward pass (Engine::forward).
    let prefetched = w.tid2eid.is_some() && traps.none();
    // Experts that run on the device: the cache's hits (experts it promotes now serve later
    // tokens: the copy runs in the background); with fixed residency, whatever is resident.
    let hits = if prefetched {
        None
    } else {
        ex.experts_selected(
            ctx.layer,
            routes.iter().flat_map(|r| r.experts.iter().copied()),
            |e| {
                let x = &w.experts[e];
                [&x.w1, &x.w3, &x.w2]
            },
        )
    };
    // Shared expert on every token, weight 1, clamped like the routed ones.
    let shared_limit = if traps.has(Trap::SharedNoClamp) {
        f32::INFINITY
    } else {
        limit
    };
    let mut y = expert(ex, &w.shared, x, t, (shared_limit, lower), num, None);
    // Group tokens by expert so each expert's weights are read once per chunk.
    let mut groups: Vec<Vec<(usize, f32)>> = vec![Vec::new(); cfg.n_routed_experts];
    for (ti, r) in routes.iter().enumerate() {
        for (&e, &wt) in r.experts.iter().zip(&r.weights) {
            groups[e].push((ti, wt));
        }
    }
    // One expert over its tokens: [n, D] out, in the order of `groups[e]`.
    // `on`: the executor the expert's products go through (the CPU one for misses whose
    // promotion copy is still in flight).
    let run = |e: usize, on: &Exec| -> Vec<f32> {
        let members = &groups[e];
        let n = members.len();
        let mut xe = vec![0f32; n * d];
        for (j, &(ti, _)) in members.iter().enumerate() {
            xe[j * d..(j + 1) * d].copy_from_slice(&x[ti * d..(ti + 1) * d]);
        }
        let wts: Vec<f32> = members.iter().map(|m| m.1).collect();
        let pre = (num == Numerics::Reference).then_some(wts.as_slice());
        expert(on, &w.experts[e], &xe, n, (limit, lower), num, pre)
    };
    let mut add = |e: usize, out: &[f32]| {
        for (j, &(ti, wt)) in groups[e].iter().enumerate() {
            let scale = if num == Numerics::Reference { 1.0 } else { wt };
            axpy(
                &mut y[ti * d..(ti + 1) * d],
                scale,
                &out[j * d..(j + 1) * d],
            );
        }
    };
    let active: Vec<usize> = (0..groups.len())
        .filter(|&e| !groups[e].is_empty())
        .collect();
    // Prefill: experts missing from the device are streamed in for this chunk where that is
    // cheaper than their tokens on the CPU (the cost model in Exec::stream_for_chunk).
    let counts: Vec<(usize, usize)> = active.iter().map(|&e| (e, groups[e].len())).collect();
    let streamed = if t > 1 {
        ex.stream_for_chunk(&counts, |e| {
            let x = &w.experts[e];
            [&x.w1, &x.w3, &x.w2]
        })
    } else {
        Vec::new()
    };
    let on_device = |e: usize| match &hits {
        Some(h) => h.contains(&e) || streamed.iter().any(|(s, _)| *s == e),
        None => ex.is_resident(&w.experts[e].w1),
    };
    let (on_dev, on_cpu): (Vec<usize>, Vec<usize>) = active
        .iter()
        .partition(|&&e| ex.device().is_some() && on_device(e));
    if on_dev.is_empty() {
        // CPU only: each expert's output is added as soon as it is computed.
        for e in active {
            // With a device, an expert not on it runs on the CPU even if a copy is in flight.
            let out = if ex.device().is_some() {
                ex.time_cpu(|| run(e, &CPU))
            } else {
                run(e, ex)
            };
            add(e, &out);
        }
    } else {
        // Hits on the device and misses on the CPU at the same time; the outputs are then
        // added in expert order, as above, so the sum is the same to the last bit.
        let (dev_out, cpu_out) = rayon::join(
            || on_dev.iter().map(|&e| (e, run(e, ex))).collect::<Vec<_>>(),
            || {
                ex.time_cpu(|| {
                    on_cpu
                        .iter()
                        .map(|&e| (e, run(e, &CPU)))
                        .collect::<Vec<_>>()
                })
            },
        );
        let mut outs: Vec<(usize, Vec<f32>)> = dev_out.into_iter().chain(cpu_out).collect();
        outs.sort_by_key(|(e, _)| *e);
        for (e, out) in outs {
            add(e, &out);
        }
    }
    ex.release_streamed(streamed);
    y
}
