//! Mixture of experts (spec §5.10): an fp32 router with sqrt(softplus) scores (selection
//! bias only for choosing; hash layers take their experts from tid2eid), top-k weights
//! normalised and scaled, SwiGLU experts with clamps, plus the shared expert.

use super::numerics::Numerics;
use super::traps::{Trap, Traps};
use crate::backend::cpu::{axpy, linear, silu, softplus, top_k};
use crate::model::config::ModelConfig;
use crate::model::weights::{ExpertWeights, MoeWeights};

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
            let scores: Vec<f32> = l.iter().map(|&v| softplus(v).sqrt()).collect();
            let hashed = if traps.has(Trap::HashAsScore) {
                None
            } else {
                w.hashed_experts(tok, k)
            };
            let experts = match (&w.bias, hashed) {
                (_, Some(hashed)) => hashed,
                (Some(bias), None) => {
                    let biased: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
                    top_k(&biased, k)
                }
                (None, None) => top_k(&scores, k),
            };
            let score = |i: usize| match &w.bias {
                Some(b) if traps.has(Trap::RouterBiasInWeights) => scores[i] + b[i],
                _ => scores[i],
            };
            let sum: f32 = if traps.has(Trap::RouterNoNormalize) {
                1.0
            } else {
                experts.iter().map(|&i| score(i)).sum::<f32>() + 1e-20
            };
            let scale = if traps.has(Trap::RouterNoScale) {
                1.0
            } else {
                cfg.routed_scaling_factor
            };
            let weights = experts.iter().map(|&i| score(i) / sum * scale).collect();
            Route { experts, weights }
        })
        .collect()
}

/// The clamped SwiGLU activation: SiLU(min(g, L)) · clamp(u, -L, L). The gate is clamped
/// from above only (spec §5.10 step 5, trap 13); `gate_lower` exists for fault injection.
#[inline]
pub fn swiglu(g: f32, u: f32, limit: f32, gate_lower: f32) -> f32 {
    silu(g.clamp(gate_lower, limit)) * u.clamp(-limit, limit)
}

/// SwiGLU expert on `t` rows: w2 · (SiLU(min(w1 x, L)) ⊙ clamp(w3 x, ±L)). In reference
/// numerics the routing weight multiplies the activation before the FP8-rounded w2 input
/// (as the official code does); otherwise it is applied by the caller.
fn expert(
    e: &ExpertWeights,
    x: &[f32],
    t: usize,
    limit: f32,
    num: Numerics,
    pre_weights: Option<&[f32]>,
    gate_lower: f32,
) -> Vec<f32> {
    let d = e.w1.cols();
    let xin = num.gemm_input(x, d);
    let g = linear(&e.w1, &xin, t);
    let u = linear(&e.w3, &xin, t);
    let inter = e.w1.rows();
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
    linear(&e.w2, &num.gemm_input(&act, inter), t)
}

/// MoE output for `t` tokens: x [t, D] -> [t, D].
pub fn forward(
    cfg: &ModelConfig,
    w: &MoeWeights,
    x: &[f32],
    tokens: &[u32],
    num: Numerics,
    traps: &Traps,
) -> Vec<f32> {
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
    let logits = linear(&w.gate, x, t);
    let routes = route(cfg, w, &logits, tokens, traps);
    // Shared expert on every token, weight 1, clamped like the routed ones.
    let shared_limit = if traps.has(Trap::SharedNoClamp) {
        f32::INFINITY
    } else {
        limit
    };
    let mut y = expert(&w.shared, x, t, shared_limit, num, None, lower);
    // Group tokens by expert so each expert's weights are read once per chunk.
    let mut groups: Vec<Vec<(usize, f32)>> = vec![Vec::new(); cfg.n_routed_experts];
    for (ti, r) in routes.iter().enumerate() {
        for (&e, &wt) in r.experts.iter().zip(&r.weights) {
            groups[e].push((ti, wt));
        }
    }
    for (e, members) in groups.iter().enumerate() {
        if members.is_empty() {
            continue;
        }
        let n = members.len();
        let mut xe = vec![0f32; n * d];
        for (j, &(ti, _)) in members.iter().enumerate() {
            xe[j * d..(j + 1) * d].copy_from_slice(&x[ti * d..(ti + 1) * d]);
        }
        let wts: Vec<f32> = members.iter().map(|m| m.1).collect();
        let pre = (num == Numerics::Reference).then_some(wts.as_slice());
        let out = expert(&w.experts[e], &xe, n, limit, num, pre, lower);
        for (j, &(ti, wt)) in members.iter().enumerate() {
            let scale = if pre.is_some() { 1.0 } else { wt };
            axpy(
                &mut y[ti * d..(ti + 1) * d],
                scale,
                &out[j * d..(j + 1) * d],
            );
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swiglu_clamps_gate_above_only_and_up_both_sides() {
        // Hand-computed: silu(10) = 10·σ(10) = 9.999546; silu(-30) = -30·σ(-30) = -2.8072e-12.
        let lo = f32::NEG_INFINITY;
        assert!((swiglu(50.0, 1.0, 10.0, lo) - 9.999_546).abs() < 1e-5);
        assert!((swiglu(-30.0, 1.0, 10.0, lo) - (-2.807_2e-12)).abs() < 1e-15);
        // A gate clamped below at -10 would give silu(-10) = -4.54e-4 instead.
        assert!((swiglu(-30.0, 1.0, 10.0, -10.0) - (-4.539_8e-4)).abs() < 1e-7);
        assert_eq!(swiglu(1.0, 25.0, 10.0, lo), silu(1.0) * 10.0);
        assert_eq!(swiglu(1.0, -25.0, 10.0, lo), silu(1.0) * -10.0);
    }
}
