//! Mixture of experts (spec §5.10): an fp32 router with sqrt(softplus) scores (selection
//! bias only for choosing; hash layers take their experts from tid2eid), top-k weights
//! normalised and scaled, SwiGLU experts with clamps, plus the shared expert.

use super::numerics::Numerics;
use super::offload::{self, Act, RowWeights};
use super::traps::{Trap, Traps};
use crate::backend::cpu::{RouteRule, axpy, route_token};
use crate::backend::exec::Exec;
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
    let xin = num.gemm_input(x, d);
    let g = ex.linear(&e.w1, &xin, t);
    let u = ex.linear(&e.w3, &xin, t);
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
    ex.linear(&e.w2, &num.gemm_input(&act, inter), t)
}

/// [`expert`] on the device: x [t, D] there, the three matrices resident; `pre` the routing
/// weights the activation is scaled by in reference numerics.
fn expert_on_device<'e>(
    ex: &'e Exec,
    e: &ExpertWeights,
    x: &Act,
    t: usize,
    limit: f32,
    num: Numerics,
    pre: RowWeights,
) -> Option<Act<'e>> {
    let xin = offload::gemm_input(ex, num, x, e.w1.cols())?;
    let g = offload::linear(ex, &e.w1, &xin, t)?;
    let u = offload::linear(ex, &e.w3, &xin, t)?;
    drop(xin);
    let inter = e.w1.rows();
    let act = offload::swiglu(ex, &g, &u, pre, inter, limit)?;
    drop((g, u));
    let a_in = offload::gemm_input(ex, num, &act, inter)?;
    offload::linear(ex, &e.w2, &a_in, t)
}

/// What one MoE site needs besides its weights and inputs.
pub struct MoeCtx<'a> {
    pub cfg: &'a ModelConfig,
    pub ex: &'a Exec,
    /// All products on the CPU (misses of the device's expert cache).
    pub host: &'a Exec,
    pub num: Numerics,
    pub traps: &'a Traps,
    /// The block index (the expert cache keys experts by layer).
    pub layer: usize,
}

/// Where a chunk's routed experts run: the tokens each expert got, the experts with tokens
/// (ascending), and which of them run on the device.
struct Dispatch {
    /// (token, routing weight) per expert.
    groups: Vec<Vec<(usize, f32)>>,
    active: Vec<usize>,
    on_dev: Vec<usize>,
    on_cpu: Vec<usize>,
    /// Experts streamed to the device for this chunk (released by `finish`).
    streamed: Vec<(usize, [crate::model::weights::Weight; 3])>,
}

impl Dispatch {
    /// The cache sees every selection before the experts run (a hash layer's were given to
    /// it ahead of the forward pass, `Engine::forward`); its hits run on the device (experts
    /// it promotes now serve later tokens: the copy runs in the background), as do experts
    /// streamed in for a prefill chunk where the cost model finds that cheaper than their
    /// tokens on the CPU; with fixed residency, the resident ones.
    fn new(ctx: &MoeCtx, w: &MoeWeights, routes: &[Route]) -> Dispatch {
        let ex = ctx.ex;
        let mut groups: Vec<Vec<(usize, f32)>> = vec![Vec::new(); ctx.cfg.n_routed_experts];
        for (ti, r) in routes.iter().enumerate() {
            for (&e, &wt) in r.experts.iter().zip(&r.weights) {
                groups[e].push((ti, wt));
            }
        }
        let active: Vec<usize> = (0..groups.len())
            .filter(|&e| !groups[e].is_empty())
            .collect();
        let mats = |e: usize| {
            let x = &w.experts[e];
            [&x.w1, &x.w3, &x.w2]
        };
        let prefetched = w.tid2eid.is_some() && ctx.traps.none();
        let hits = if prefetched {
            None
        } else {
            ex.experts_selected(
                ctx.layer,
                routes.iter().flat_map(|r| r.experts.iter().copied()),
                mats,
            )
        };
        let counts: Vec<(usize, usize)> = active.iter().map(|&e| (e, groups[e].len())).collect();
        let streamed = if routes.len() > 1 {
            ex.stream_for_chunk(&counts, mats)
        } else {
            Vec::new()
        };
        // (A hit whose promotion copy is still being made runs on the CPU.)
        let on_device = |e: usize| {
            let placed = match &hits {
                Some(h) => h.contains(&e) || streamed.iter().any(|(s, _)| *s == e),
                None => true,
            };
            placed && mats(e).iter().all(|m| ex.is_resident(m))
        };
        let (on_dev, on_cpu) = active
            .iter()
            .partition(|&&e| ex.device().is_some() && on_device(e));
        Dispatch {
            groups,
            active,
            on_dev,
            on_cpu,
            streamed,
        }
    }

    fn finish(self, ex: &Exec) {
        ex.release_streamed(self.streamed);
    }

    /// Expert `e` over its tokens' rows of x [t, D] (host values), through `on`: [n, D] in
    /// the order of `groups[e]`.
    #[allow(clippy::too_many_arguments)] // the expert, its tokens' rows and the numerics
    fn run_on_host(
        &self,
        on: &Exec,
        w: &ExpertWeights,
        e: usize,
        x: &[f32],
        d: usize,
        clamps: (f32, f32),
        num: Numerics,
    ) -> Vec<f32> {
        let members = &self.groups[e];
        let mut xe = vec![0f32; members.len() * d];
        for (j, &(ti, _)) in members.iter().enumerate() {
            xe[j * d..(j + 1) * d].copy_from_slice(&x[ti * d..(ti + 1) * d]);
        }
        let wts: Vec<f32> = members.iter().map(|m| m.1).collect();
        let pre = (num == Numerics::Reference).then_some(wts.as_slice());
        expert(on, w, &xe, members.len(), clamps, num, pre)
    }
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
    let routes = route(cfg, w, &logits, tokens, traps);
    let plan = Dispatch::new(ctx, w, &routes);
    // Shared expert on every token, weight 1, clamped like the routed ones.
    let shared_limit = if traps.has(Trap::SharedNoClamp) {
        f32::INFINITY
    } else {
        limit
    };
    let mut y = expert(ex, &w.shared, x, t, (shared_limit, lower), num, None);
    let groups = &plan.groups;
    // `on`: the executor the expert's products go through (the CPU one for misses whose
    // promotion copy is still in flight).
    let run =
        |e: usize, on: &Exec| plan.run_on_host(on, &w.experts[e], e, x, d, (limit, lower), num);
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
    if plan.on_dev.is_empty() {
        // CPU only: each expert's output is added as soon as it is computed.
        for &e in &plan.active {
            // With a device, an expert not on it runs on the CPU even if a copy is in flight.
            let out = if ex.device().is_some() {
                ex.time_cpu(|| run(e, ctx.host))
            } else {
                run(e, ex)
            };
            add(e, &out);
        }
    } else {
        // Hits on the device and misses on the CPU at the same time; the outputs are then
        // added in expert order, as above, so the sum is the same to the last bit.
        let (dev_out, cpu_out) = rayon::join(
            || {
                plan.on_dev
                    .iter()
                    .map(|&e| (e, run(e, ex)))
                    .collect::<Vec<_>>()
            },
            || {
                ex.time_cpu(|| {
                    plan.on_cpu
                        .iter()
                        .map(|&e| (e, run(e, ctx.host)))
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
    plan.finish(ex);
    y
}

/// [`forward`] with the activations on the device: x [t, D] there, [t, D] returned there.
/// Routing runs on the device and comes back (the routes and their weights); the device's
/// experts (cache hits, streamed ones) run there while the CPU computes the others from the
/// host copy of x (read only when there are any); their outputs go up in one copy and every
/// expert's output is added on the device, in expert order as on the host. None when the
/// device could not run a step (the caller computes it on the host).
pub fn forward_on_device<'e>(
    ctx: &MoeCtx<'e>,
    w: &MoeWeights,
    x: &Act<'e>,
    tokens: &[u32],
) -> Option<Act<'e>> {
    let ex = ctx.ex;
    let logits = offload::linear(ex, &w.gate, x, tokens.len())?;
    let (routes, route_w, x_host) = offload::route(ex, ctx.cfg, w, &logits, x, tokens)?;
    drop(logits);
    let plan = Dispatch::new(ctx, w, &routes);
    let y = run_on_device(ctx, w, (x, &x_host), &routes, &route_w, &plan);
    plan.finish(ex);
    y
}

/// The experts of [`forward_on_device`] once they are placed.
fn run_on_device<'e>(
    ctx: &MoeCtx<'e>,
    w: &MoeWeights,
    (x, x_host): (&Act<'e>, &[f32]),
    routes: &[Route],
    route_w: &Act,
    plan: &Dispatch,
) -> Option<Act<'e>> {
    let (cfg, ex, num) = (ctx.cfg, ctx.ex, ctx.num);
    let (d, t, limit) = (cfg.hidden_size, routes.len(), cfg.swiglu_limit);
    let groups = &plan.groups;
    let reference = num == Numerics::Reference;
    let y = expert_on_device(ex, &w.shared, x, t, limit, num, RowWeights::One)?;
    // The routing weights of an expert's tokens scale its activation (reference numerics)
    // or its output as it is added (the others). For one token, an expert's input is x
    // itself and its weight sits in the routing's weights on the device (slot i of the
    // token's route); otherwise the rows are gathered and the weights sent.
    let host_weights = |e: usize| groups[e].iter().map(|m| m.1).collect::<Vec<f32>>();
    fn route_weights<'a>(
        routes: &[Route],
        on_dev: &Act,
        e: usize,
        wts: &'a [f32],
    ) -> RowWeights<'a> {
        match routes {
            [r] => {
                let slot = r.experts.iter().position(|&x| x == e);
                RowWeights::Dev(on_dev.buf(), slot.unwrap_or(0))
            }
            _ => RowWeights::Host(wts),
        }
    }
    let token_ids = |e: usize| groups[e].iter().map(|m| m.0).collect::<Vec<usize>>();
    let run_dev = |e: usize| -> Option<Act<'e>> {
        let n = groups[e].len();
        let wts = host_weights(e);
        let pre = match reference {
            true => route_weights(routes, route_w, e, &wts),
            false => RowWeights::One,
        };
        if t == 1 {
            expert_on_device(ex, &w.experts[e], x, n, limit, num, pre)
        } else {
            let xe = offload::gather_rows(ex, x, &token_ids(e), d)?;
            expert_on_device(ex, &w.experts[e], &xe, n, limit, num, pre)
        }
    };
    let clamps = (limit, f32::NEG_INFINITY);
    let run_cpu = |e: usize| plan.run_on_host(ctx.host, &w.experts[e], e, x_host, d, clamps, num);
    let (dev_out, cpu_out) = rayon::join(
        || {
            plan.on_dev
                .iter()
                .map(|&e| Some((e, run_dev(e)?)))
                .collect::<Option<Vec<_>>>()
        },
        || {
            ex.time_cpu(|| {
                plan.on_cpu
                    .iter()
                    .map(|&e| (e, run_cpu(e)))
                    .collect::<Vec<_>>()
            })
        },
    );
    let dev_out = dev_out?;
    // The CPU's outputs go up in one copy; x_off of each expert's rows in it.
    let mut cpu_rows = Vec::new();
    let mut cpu_at = std::collections::HashMap::new();
    for (e, out) in &cpu_out {
        cpu_at.insert(*e, cpu_rows.len());
        cpu_rows.extend_from_slice(out);
    }
    let cpu_buf = if cpu_rows.is_empty() {
        None
    } else {
        Some(Act::upload(ex, &cpu_rows)?)
    };
    for &e in &plan.active {
        let (src, x_off) = match dev_out.iter().find(|(de, _)| *de == e) {
            Some((_, a)) => (a.buf(), 0),
            None => (cpu_buf.as_ref()?.buf(), *cpu_at.get(&e)?),
        };
        let n = groups[e].len();
        let wts = host_weights(e);
        let weights = match reference {
            true => RowWeights::One,
            false => route_weights(routes, route_w, e, &wts),
        };
        let ids = token_ids(e);
        let idx = (t > 1).then_some(ids.as_slice());
        offload::add_rows(ex, &y, src, x_off, idx, weights, n, d)?;
    }
    Some(y)
}
