//! Where the model goes on a device: the whole of it ([`Engine::use_device`]) or the hybrid
//! placement ([`Engine::use_device_hybrid`]): room for the KV rows and a step's activations,
//! the dense weights of whole layers, the head, then an expert cache in what is left. The
//! priority order is `plan::fill`'s, the same that `inspect --plan` predicts with.

use super::model::Engine;
use super::plan::DEFAULT_KV_ROOM;
use crate::backend::device::{Device, DeviceError};
use crate::backend::exec::Exec;
use crate::backend::expert_cache::{Adaptive, Lru, Policy, StaticFrequency};
use crate::model::weights::{MatrixRole, Weight};
use std::sync::Arc;

/// How the routed-expert slots of a hybrid placement are managed.
#[derive(Debug, Clone)]
pub enum ExpertPolicy {
    Lru,
    /// Decayed per-layer frequencies with admission control (the default), optionally
    /// warm-started from a usage profile [layer][expert] of an earlier session.
    Adaptive(Option<Vec<Vec<u64>>>),
    /// A fixed set: the most selected experts of a usage profile [layer][expert].
    Static(Vec<Vec<u64>>),
}

/// Tokens of activations the device's scratch buffers are sized for up front.
const SCRATCH_TOKENS: usize = 64;

/// How much of the model a device holds (matrices in priority order, a prefix of them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Placement {
    pub resident: usize,
    pub total: usize,
    pub resident_bytes: u64,
    pub total_bytes: u64,
}

/// What [`Engine::use_device_hybrid`] is asked for.
#[derive(Debug, Clone)]
pub struct HybridOptions {
    pub policy: ExpertPolicy,
    /// Expert slots per layer (None: what the memory left holds).
    pub slots: Option<usize>,
    /// Device bytes to use at most (None: what the device offers).
    pub budget: Option<u64>,
    /// Tokens of context whose KV rows get device room first (None: 64k, or what a quarter
    /// of the budget holds if that is less).
    pub ctx: Option<usize>,
    /// Prefill chunk (tokens): each block's key table also holds a chunk's new rows.
    pub chunk: usize,
}

impl Engine {
    /// Run on `dev`: its matrices are made resident in priority order (dense, head, experts)
    /// until the device is full; the rest stay on the CPU. Replaces any earlier placement.
    pub fn use_device(&mut self, dev: Arc<dyn Device>) -> Result<Placement, DeviceError> {
        // (Steps whose activations then find no room run on the host.)
        let p = self.place(dev, u64::MAX, true, |_| true)?;
        // Everything fits: every op of the forward pass runs on the device.
        self.exec
            .set_whole_model(p.total > 0 && p.resident == p.total);
        Ok(p)
    }

    /// Run on `dev` within `budget` bytes: scratch for the activations first, then the
    /// `wanted` matrices in priority order as long as they fit; the first that does not ends
    /// the resident prefix. The placement counts every matrix (`experts`: the routed ones
    /// too).
    fn place(
        &mut self,
        dev: Arc<dyn Device>,
        budget: u64,
        experts: bool,
        wanted: impl Fn(MatrixRole) -> bool,
    ) -> Result<Placement, DeviceError> {
        let budget = budget.min(dev.capacity());
        let kernels = self.exec.kernels();
        self.exec = Exec::on(dev.clone());
        self.exec.set_kernels(kernels);
        self.device_gave_up_at = std::sync::atomic::AtomicUsize::new(usize::MAX);
        let mats: Vec<(MatrixRole, &Weight)> = self
            .weights
            .matrices()
            .into_iter()
            .filter(|(role, _)| experts || !matches!(role, MatrixRole::Expert { .. }))
            .collect();
        // Room for the activations of a 64-token chunk through the widest product first
        // (longer chunks grow it, or run the products that do not fit on the CPU).
        let (rows, cols) = mats
            .iter()
            .fold((0, 0), |(r, c), (_, w)| (r.max(w.rows()), c.max(w.cols())));
        let scratch = self
            .exec
            .reserve_scratch(4 * SCRATCH_TOKENS * cols, 4 * SCRATCH_TOKENS * rows);
        let mut p = Placement::default();
        let mut placing = scratch;
        for (role, w) in mats {
            p.total += 1;
            p.total_bytes += w.stored_bytes() as u64;
            if !(placing && wanted(role)) {
                continue;
            }
            let room = dev.in_use() + w.stored_bytes() as u64 <= budget;
            placing = room && self.exec.make_resident(w)?;
            if placing {
                p.resident += 1;
                p.resident_bytes += w.stored_bytes() as u64;
            }
        }
        Ok(p)
    }

    /// Hybrid placement on `dev`, in the plan's priority order: room for the KV cache of
    /// `o.ctx` tokens, the dense matrices and the head, then the routed experts left to
    /// `o.policy`, an expert cache with `o.slots` experts per layer (None: as many as the
    /// remaining device memory holds). `o.budget` caps the device memory used (None: all the
    /// device offers). Layers whose dense matrices are all resident run every op on the
    /// device (attention over device-resident KV rows, routing, mHC); the others only their
    /// resident products. Returns the placement of the fixed part and the slots given to the
    /// cache.
    pub fn use_device_hybrid(
        &mut self,
        dev: Arc<dyn Device>,
        o: HybridOptions,
    ) -> Result<(Placement, usize), DeviceError> {
        let (policy, slots) = (o.policy, o.slots);
        let budget = o.budget.unwrap_or(u64::MAX).min(dev.capacity());
        let ctx = o.ctx.unwrap_or(DEFAULT_KV_ROOM);
        let kv = match o.ctx {
            Some(ctx) => self.kv_reserve(ctx, o.chunk),
            None => self.kv_reserve(DEFAULT_KV_ROOM, o.chunk).min(budget / 4),
        };
        // Room for a step's activations too, or the device path would find none once the
        // expert cache has filled the rest.
        let reserve = kv.saturating_add(self.activation_bytes(o.chunk.max(1), ctx));
        // Which layers' dense weights and whether the head: the plan's priority order.
        let w = &self.weights;
        let dense: Vec<u64> = w
            .layers
            .iter()
            .map(|b| {
                b.dense_matrices()
                    .iter()
                    .map(|m| m.stored_bytes() as u64)
                    .sum()
            })
            .collect();
        let head = w.head.stored_bytes() as u64;
        let fill = super::plan::fill(budget, reserve, &dense, head, self.expert_bytes(), 0);
        let budget = budget.saturating_sub(reserve);
        let p = self.place(dev.clone(), budget, false, |role| match role {
            MatrixRole::Dense { layer } => layer < fill.layers,
            MatrixRole::Head => fill.head,
            MatrixRole::Expert { .. } => false,
        })?;
        self.exec
            .set_whole_model(p.total > 0 && p.resident == p.total);
        let on_device = self
            .weights
            .layers
            .iter()
            .take_while(|b| b.dense_matrices().iter().all(|w| self.exec.is_resident(w)))
            .count();
        self.exec.set_device_layers(on_device);
        let layers = self.weights.layers.len();
        let n_exp = self.cfg.n_routed_experts;
        // Slots from the memory the placement really left (scratch and parameters included).
        let free = budget.saturating_sub(dev.in_use());
        let fit = (free / self.expert_bytes().max(1)) as usize / layers.max(1);
        let slots = slots.unwrap_or(fit).min(n_exp);
        let (pol, seed): (Box<dyn Policy + Send>, Vec<Vec<u64>>) = match policy {
            ExpertPolicy::Lru => (Box::new(Lru::new(layers, slots)), Vec::new()),
            ExpertPolicy::Adaptive(warm) => {
                // Slots move between layers by demand, reconsidered every 64 tokens' worth
                // of selections.
                let period = 64 * layers * self.cfg.num_experts_per_tok;
                let mut a = Adaptive::new(layers, n_exp, slots, 256.0).with_rebalancing(period);
                if let Some(p) = &warm {
                    a.warm_start(p);
                }
                (Box::new(a), warm.unwrap_or_default())
            }
            ExpertPolicy::Static(profile) => (
                Box::new(StaticFrequency::from_counts(&profile, slots)),
                Vec::new(),
            ),
        };
        self.exec.experts.set_policy(pol, seed);
        Ok((p, slots))
    }

    /// Device bytes a step of `t` tokens at up to `ctx` context may hold in activations on
    /// the device path (an upper bound: the residual streams and the mHC site's, all of one
    /// attention site's intermediates and key lists, one MoE site's with every routed
    /// expert's output kept until they are added).
    fn activation_bytes(&self, t: usize, ctx: usize) -> u64 {
        let c = &self.cfg;
        let (d, hc, hd) = (c.hidden_size, c.hc_mult, c.head_dim);
        let site = hc * d + 2 * hc + hc * hc + d;
        let attn = d
            + 2 * c.q_lora_rank
            + 3 * c.num_attention_heads * hd
            + 5 * hd
            + 2 * c.index_n_heads * c.index_head_dim
            + 4 * c.o_groups * c.o_lora_rank
            + 2 * (c.sliding_window.min(ctx) + ctx / 128 + c.index_topk.min(ctx) + 1);
        let expert = 2 * d + 4 * c.moe_intermediate_size;
        let moe =
            c.n_routed_experts + 2 * c.num_experts_per_tok + (c.num_experts_per_tok + 1) * expert;
        // Per query: the indexer's scores over every compressed row.
        let per_step = ctx / 4 + 2 * d * c.num_experts_per_tok;
        4 * (t * (site + attn + moe) + per_step) as u64
    }

    /// Device bytes kept free for the KV rows of `ctx` tokens (fp32, as the host holds them:
    /// window, compressed and indexer rows) plus each layer's rows of a `chunk`-token prefill
    /// step.
    fn kv_reserve(&self, ctx: usize, chunk: usize) -> u64 {
        let cfg = &self.cfg;
        let per_step = 4 * (cfg.sliding_window.min(ctx) + chunk) * cfg.head_dim;
        super::plan::kv_bytes(cfg, ctx) + (cfg.num_hidden_layers * per_step) as u64
    }

    /// Stored bytes of one routed expert (w1, w2, w3).
    fn expert_bytes(&self) -> u64 {
        let first = self
            .weights
            .layers
            .first()
            .and_then(|b| b.ffn.experts.first());
        first.map_or(1, |x| {
            (x.w1.stored_bytes() + x.w2.stored_bytes() + x.w3.stored_bytes()) as u64
        })
    }
}
