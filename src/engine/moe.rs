//! Mixture of experts (spec §5.10): an fp32 router with sqrt(softplus) scores (selection
//! bias only for choosing; hash layers take their experts from tid2eid), top-k weights
//! normalised and scaled, SwiGLU experts with clamps, plus the shared expert.

use super::host::Host;
use super::numerics::Numerics;
use super::ops::{Ops, RowWeights};
use super::traps::Deviations;
use crate::backend::cpu::{RouteRule, route_token};
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
    dv: Deviations,
) -> Vec<Route> {
    let e = cfg.n_routed_experts;
    let k = cfg.num_experts_per_tok;
    logits
        .chunks_exact(e)
        .zip(tokens)
        .map(|(l, &tok)| {
            let rule = RouteRule {
                k,
                scale: cfg.routed_scaling_factor,
                bias_in_weights: dv.router_bias_in_weights,
                normalize: !dv.router_no_normalize,
            };
            let hashed = w.hashed_experts(tok, k);
            let (experts, weights) = route_token(l, w.bias.as_deref(), hashed, rule);
            Route { experts, weights }
        })
        .collect()
}

/// SwiGLU expert (§5.10) on `t` rows: w2 · (SiLU(min(w1 x, L)) ⊙ clamp(w3 x, ±L)). `pre`:
/// factors the activation is scaled by before the rounded w2 input (the routing weights in
/// reference numerics, as the official code does; otherwise they scale the output as it is
/// added).
#[allow(clippy::too_many_arguments)] // the expert, its rows, clamps, numerics and factors
fn expert<O: Ops>(
    o: &O,
    e: &ExpertWeights,
    x: &O::T,
    t: usize,
    (limit, lower): (f32, f32),
    num: Numerics,
    pre: RowWeights<O::T>,
) -> Result<O::T, O::Err> {
    let xin = o.gemm_input(num, x, e.w1.cols())?;
    let g = o.linear(&e.w1, &xin, t)?;
    let u = o.linear(&e.w3, &xin, t)?;
    drop(xin);
    let inter = e.w1.rows();
    let act = o.swiglu(&g, &u, pre, inter, limit, lower)?;
    drop((g, u));
    let a_in = o.gemm_input(num, &act, inter)?;
    o.linear(&e.w2, &a_in, t)
}

/// What one MoE site needs besides its weights and inputs.
pub struct MoeCtx<'a> {
    pub cfg: &'a ModelConfig,
    pub ex: &'a Exec,
    /// All products on the CPU (misses of the device's expert cache).
    pub host: &'a Exec,
    /// Where the CPU's experts come from under `--ram` (None: the mapped views).
    pub ram: Option<&'a crate::backend::ram_tier::RamTier>,
    pub num: Numerics,
    pub dv: Deviations,
    /// The block index (the expert cache keys experts by layer).
    pub layer: usize,
    /// Counts the routed experts' tokens when switched on.
    pub clock: &'a super::sections::SectionClock,
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
        let mats = |e: usize| w.experts[e].matrices();
        let prefetched = w.tid2eid.is_some();
        let hits = if prefetched {
            None
        } else {
            ex.experts.selected(
                ex,
                ctx.layer,
                routes.iter().flat_map(|r| r.experts.iter().copied()),
                mats,
            )
        };
        let counts: Vec<(usize, usize)> = active.iter().map(|&e| (e, groups[e].len())).collect();
        let streamed = if routes.len() > 1 {
            ex.experts.stream_for_chunk(ex, &counts, mats)
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
        ex.experts.release_streamed(ex, self.streamed);
    }
}

/// MoE output for `t` tokens (§5.10): x [t, D] -> [t, D]. The router in fp32 on the BF16
/// gate (no activation rounding: it is not an FP8 product), the routing, the shared expert
/// on every token, then each routed expert on its tokens, added in expert order.
pub(crate) fn forward<O: Ops>(
    o: &O,
    ctx: &MoeCtx,
    w: &MoeWeights,
    x: &O::T,
    tokens: &[u32],
) -> Result<O::T, O::Err> {
    let logits = o.linear(&w.gate, x, tokens.len())?;
    let (routes, route_w, x_host) = o.route(ctx.cfg, w, &logits, x, tokens)?;
    drop(logits);
    let plan = Dispatch::new(ctx, w, &routes);
    ctx.clock.count_experts(
        plan.active.len(),
        routes.len() * ctx.cfg.num_experts_per_tok,
    );
    // The CPU's experts not in RAM start coming from the drive while the shared expert and
    // the others compute (in the order `experts` takes them).
    if let Some(r) = ctx.ram {
        let cpu_order = if plan.on_dev.is_empty() && !o.on_device() {
            &plan.active
        } else {
            &plan.on_cpu
        };
        r.prefetch(ctx.layer, cpu_order, &w.experts);
    }
    let y = experts(o, ctx, w, (x, &x_host), (&routes, &route_w), &plan);
    plan.finish(ctx.ex);
    if let Some(r) = ctx.ram {
        r.forget(ctx.layer);
    }
    y
}

/// The shared and routed experts of [`forward`] once they are placed: the experts the
/// dispatch put on the device run through `o` while the CPU computes the others from the
/// host copy of x at the same time; every output is then added in expert order, so the sum
/// is the same to the last bit wherever each expert ran.
fn experts<O: Ops>(
    o: &O,
    ctx: &MoeCtx,
    w: &MoeWeights,
    (x, x_host): (&O::T, &[f32]),
    (routes, route_w): (&[Route], &O::T),
    plan: &Dispatch,
) -> Result<O::T, O::Err> {
    let (cfg, num, dv) = (ctx.cfg, ctx.num, ctx.dv);
    let (d, t, limit) = (cfg.hidden_size, routes.len(), cfg.swiglu_limit);
    // The gate is clamped from above only; the shared expert is clamped like the others.
    let lower = match dv.gate_clamp_both_sides {
        true => -limit,
        false => f32::NEG_INFINITY,
    };
    let shared_limit = match dv.shared_no_clamp {
        true => f32::INFINITY,
        false => limit,
    };
    let mut y = expert(
        o,
        &w.shared,
        x,
        t,
        (shared_limit, lower),
        num,
        RowWeights::One,
    )?;
    let groups = &plan.groups;
    let reference = num == Numerics::Reference;
    let tokens_of = |e: usize| groups[e].iter().map(|m| m.0).collect::<Vec<usize>>();
    let weights_of = |e: usize| groups[e].iter().map(|m| m.1).collect::<Vec<f32>>();
    // The routing weights of an expert's tokens: for one token routed to it once, slot i
    // of its route in the routing's weights (where they already are); otherwise sent from
    // the host.
    fn factors<'a, T>(routes: &[Route], at: &'a T, e: usize, wts: &'a [f32]) -> RowWeights<'a, T> {
        match (routes, wts.len()) {
            ([r], 1) => RowWeights::At(at, r.experts.iter().position(|&x| x == e).unwrap_or(0)),
            _ => RowWeights::Host(wts),
        }
    }
    let run_here = |e: usize| -> Result<O::T, O::Err> {
        let (n, wts) = (groups[e].len(), weights_of(e));
        let pre = match reference {
            true => factors(routes, route_w, e, &wts),
            false => RowWeights::One,
        };
        let xe;
        let xe = if t == 1 && n == 1 {
            x
        } else {
            xe = o.gather_rows(x, &tokens_of(e), d)?;
            &xe
        };
        expert(o, &w.experts[e], xe, n, (limit, lower), num, pre)
    };
    // The CPU's experts: the host ops on the CPU-only executor (a miss must not wait for a
    // promotion copy in flight).
    let cpu = Host { ex: ctx.host, dv };
    let run_cpu = |e: usize| -> Vec<f32> {
        let (n, wts) = (groups[e].len(), weights_of(e));
        let xe = tokens_of(e)
            .iter()
            .flat_map(|&ti| x_host[ti * d..(ti + 1) * d].iter().copied())
            .collect();
        let pre = match reference {
            true => RowWeights::Host(&wts),
            false => RowWeights::One,
        };
        let copy = ctx.ram.and_then(|r| r.get(ctx.layer, e, &w.experts[e]));
        let ew = copy.as_deref().unwrap_or(&w.experts[e]);
        let Ok(out) = ctx
            .ex
            .timing
            .cpu(|| expert(&cpu, ew, &xe, n, (limit, lower), num, pre));
        out
    };
    let add = |y: &mut O::T, e: usize, src: &O::T, at: usize| {
        let (ids, wts) = (tokens_of(e), weights_of(e));
        let f = match reference {
            true => RowWeights::One,
            false => factors(routes, route_w, e, &wts),
        };
        let idx = (t > 1 || ids.len() > 1).then_some(ids.as_slice());
        o.add_rows(y, src, at, idx, f, groups[e].len(), d)
    };
    // With a RAM tier the CPU computes the experts it holds first, while the others' reads
    // are still coming (the outputs are added in expert order all the same).
    let cpu_order = |list: &[usize]| match ctx.ram {
        Some(r) => r.held_first(ctx.layer, list),
        None => list.to_vec(),
    };
    if plan.on_dev.is_empty() && !o.on_device() {
        // All on the CPU: each expert's output is added as soon as those before it are.
        let mut outs: Vec<Option<Vec<f32>>> = vec![None; groups.len()];
        let mut next = 0;
        for e in cpu_order(&plan.active) {
            outs[e] = Some(run_cpu(e));
            while let Some(&e) = plan.active.get(next) {
                let Some(out) = outs[e].take() else {
                    break;
                };
                add(&mut y, e, &o.upload(out)?, 0)?;
                next += 1;
            }
        }
        return Ok(y);
    }
    let (dev_out, cpu_out) = rayon::join(
        || {
            let run = |&e: &usize| run_here(e).map(|out| (e, out));
            plan.on_dev.iter().map(run).collect::<Result<Vec<_>, _>>()
        },
        || {
            let outs: Vec<(usize, Vec<f32>)> = cpu_order(&plan.on_cpu)
                .into_iter()
                .map(|e| (e, run_cpu(e)))
                .collect();
            outs
        },
    );
    let dev_out = dev_out?;
    // The CPU's outputs as one activation (one copy to a device); each expert's offset.
    let mut at = std::collections::HashMap::new();
    let mut rows = Vec::new();
    for (e, out) in cpu_out {
        at.insert(e, rows.len());
        rows.extend(out);
    }
    let cpu_rows = o.upload(rows)?;
    for &e in &plan.active {
        match (dev_out.iter().find(|(de, _)| *de == e), at.get(&e)) {
            (Some((_, out)), _) => add(&mut y, e, out, 0)?,
            (None, Some(&off)) => add(&mut y, e, &cpu_rows, off)?,
            (None, None) => {}
        }
    }
    Ok(y)
}
