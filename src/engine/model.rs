//! The whole model: embedding into hc copies, the blocks (mHC around attention and MoE),
//! the HC head, the final norm and the LM head (spec §5.1–5.11).

use super::attention::{self, AttnCtx, AttnState, StepMark};
use super::host::Host;
use super::hyper;
use super::moe;
use super::numerics::Numerics;
use super::offload::{Act, Dev, GaveUp};
use super::ops::{HcDims, Ops};
use super::rope::Rope;
use super::sections::Section::{Attention, Head, Mhc, Moe};
use super::traps::Deviations;
#[cfg(feature = "traps")]
use super::traps::Trap;
use crate::backend::cpu::{Kernels, dequant_row};
use crate::backend::exec::Exec;
use crate::model::Checkpoint;
use crate::model::config::ModelConfig;
use crate::model::weights::{BlockWeights, ModelWeights};
use std::ops::Range;
use std::path::Path;

/// Which positions of a chunk need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    None,
    Last,
    All,
}

/// A loaded model, ready to run sessions.
pub struct Engine {
    pub cfg: ModelConfig,
    pub weights: ModelWeights,
    /// RoPE table per main layer.
    ropes: Vec<Rope>,
    pub numerics: Numerics,
    /// Faults were injected (tests only, the `traps` feature): the device path stays off.
    faults: bool,
    /// What those of them that change the math change (all false: the spec).
    deviations: Deviations,
    /// Where the matrix products run (the CPU unless weights are placed on a device).
    pub exec: Exec,
    /// All products on the CPU: for routed experts that miss the device's cache (they must
    /// not wait for a promotion copy in flight).
    pub(super) host: Exec,
    /// Steps of at least this many tokens skip the device path (one of them failed there).
    pub(super) device_gave_up_at: std::sync::atomic::AtomicUsize,
    /// Routed experts held in RAM under `--ram` (None: read through the map).
    pub(super) ram: Option<crate::backend::ram_tier::RamTier>,
    /// `Checkpoint::fingerprint` of the weights.
    fingerprint: String,
    /// The traps injected (tests only), as part of the identity.
    traps: String,
    /// Wall time per section, when switched on ([`Engine::time_sections`]).
    pub(crate) clock: super::sections::SectionClock,
}

impl Engine {
    /// Open and validate a checkpoint directory and build the weight views (no weight bytes
    /// are copied; the few small vectors are decoded).
    pub fn open(dir: &Path, numerics: Numerics) -> anyhow::Result<Engine> {
        let ck = Checkpoint::open(dir)?;
        Self::from_checkpoint(&ck, numerics)
    }

    pub fn from_checkpoint(ck: &Checkpoint, numerics: Numerics) -> anyhow::Result<Engine> {
        let cfg = ck.config.clone();
        if numerics == Numerics::Reference && !cfg.index_head_dim.is_power_of_two() {
            anyhow::bail!(
                "--numerics reference needs index_head_dim to be a power of two for the Hadamard rotation (config has {})",
                cfg.index_head_dim
            );
        }
        let weights = ModelWeights::from_checkpoint(ck)?;
        let fingerprint = ck.fingerprint();
        let ropes = (0..cfg.num_hidden_layers)
            .map(|l| Rope::for_ratio(&cfg, cfg.compress_ratio(l)))
            .collect();
        Ok(Engine {
            cfg,
            weights,
            ropes,
            numerics,
            faults: false,
            deviations: Deviations::default(),
            exec: Exec::cpu(),
            host: Exec::cpu(),
            device_gave_up_at: std::sync::atomic::AtomicUsize::new(usize::MAX),
            ram: None,
            fingerprint,
            traps: String::new(),
            clock: Default::default(),
        })
    }

    /// Everything besides the tokens and the chunking that decides the bits of the decode
    /// state: the model, the numerics, the CPU kernels and the device placement. A state
    /// saved by an engine is restored only into an engine of the same identity.
    pub fn identity(&self) -> String {
        let device = match self.exec.device() {
            Some(d) => d.name(),
            None => "cpu".into(),
        };
        format!(
            "model {} | numerics {:?} | kernels {} | {device}{}",
            self.fingerprint,
            self.numerics,
            self.exec.kernels().identity(),
            self.traps
        )
    }

    /// Bytes of the routed experts and of everything else the model reads.
    fn weight_split(&self) -> (u64, u64) {
        let (mut experts, mut other) = (0u64, 0u64);
        for t in crate::model::layout::inventory(&self.cfg) {
            match t.component {
                crate::model::layout::Component::RoutedExperts => experts += t.nbytes() as u64,
                _ => other += t.nbytes() as u64,
            }
        }
        (experts, other)
    }

    /// Bytes of all the weights the model reads.
    pub fn weight_bytes(&self) -> u64 {
        let (experts, other) = self.weight_split();
        experts + other
    }

    /// Let the weights take at most `bytes` of RAM (`--ram`): everything but the routed
    /// experts is read through the map and counted first; the experts get the rest, the same
    /// number in every layer, held as copies (`backend::ram_tier`), and the CPU reads any
    /// other expert from the files when it is selected. Returns the experts held per layer.
    pub fn use_ram(&mut self, bytes: u64) -> usize {
        let (layers, n) = (self.cfg.num_hidden_layers, self.cfg.n_routed_experts);
        let (experts, other) = self.weight_split();
        let per_expert = (experts / (layers * n).max(1) as u64).max(1);
        let per_layer =
            ((bytes.saturating_sub(other) / per_expert / layers.max(1) as u64) as usize).min(n);
        self.ram = Some(crate::backend::ram_tier::RamTier::new(per_layer));
        per_layer
    }

    /// The RAM tier, if `use_ram` set one up.
    pub fn ram_tier(&self) -> Option<&crate::backend::ram_tier::RamTier> {
        self.ram.as_ref()
    }

    /// The CPU kernels products may use (default: the fastest this CPU has; `Fp32` pins one
    /// summation order on every CPU).
    pub fn set_kernels(&mut self, k: Kernels) {
        self.exec.set_kernels(k);
        self.host.set_kernels(k);
    }

    /// Re-introduce some of the spec's traps (tests of the oracle comparison). Those that
    /// are a different config value or different weights are made so here, at load; the
    /// others become `Deviations` flags, which their sections read.
    #[cfg(feature = "traps")]
    pub fn with_traps(mut self, traps: &[Trap]) -> Engine {
        use crate::model::checkpoint::Bytes;
        use crate::model::weights::Weight;
        let t = super::traps::Traps::with(traps);
        let cfg = &mut self.cfg;
        if t.has(Trap::RouterNoScale) {
            cfg.routed_scaling_factor = 1.0;
        }
        if t.has(Trap::Window127) {
            cfg.sliding_window -= 1;
        }
        if t.has(Trap::IndexerSelectAll) {
            cfg.index_topk = usize::MAX;
        }
        let variant = super::rope::Variant {
            leading_dims: t.has(Trap::RopeLeadingDims),
            half_split: t.has(Trap::RopeHalfSplit),
            yarn_mscale: t.has(Trap::RopeYarnMscale),
        };
        self.ropes = (0..cfg.num_hidden_layers)
            .map(|l| {
                let ratio = match t.has(Trap::RopeYarnOnAllLayers) {
                    true => 4,
                    false => cfg.compress_ratio(l),
                };
                Rope::for_ratio(cfg, ratio).with_variant(variant)
            })
            .collect();
        for b in &mut self.weights.layers {
            if t.has(Trap::NoSink) {
                b.attn.sink.fill(f32::NEG_INFINITY);
            }
            if t.has(Trap::HashAsScore) {
                b.ffn.tid2eid = None;
            }
            if t.has(Trap::ApeIgnored) {
                let main = b.attn.compressor.iter_mut();
                let index = b.attn.indexer.iter_mut().map(|ix| &mut ix.compressor);
                main.chain(index).for_each(|c| c.ape.fill(0.0));
            }
            for e in b
                .ffn
                .experts
                .iter_mut()
                .chain(std::iter::once(&mut b.ffn.shared))
            {
                if t.has(Trap::W1W3Swapped) {
                    std::mem::swap(&mut e.w1, &mut e.w3);
                }
                if t.has(Trap::Fp4NibbleSwap) {
                    for w in [&mut e.w1, &mut e.w2, &mut e.w3] {
                        if let Weight::Fp4 { packed, .. } = w {
                            *packed =
                                Bytes::from_vec(packed.iter().map(|b| b.rotate_left(4)).collect());
                        }
                    }
                }
            }
        }
        self.deviations = Deviations::of(&t);
        self.faults = !t.none();
        self.traps = format!(" | traps {traps:?}");
        self
    }

    /// Fresh per-layer decode state for at most `max_ctx` tokens (the window rings hold
    /// min(sliding_window, max_ctx) rows: no query reaches further back than that).
    pub fn new_state(&self, max_ctx: usize) -> Vec<AttnState> {
        self.weights
            .layers
            .iter()
            .map(|b| AttnState::new(&self.cfg, &b.attn, max_ctx))
            .collect()
    }

    /// One block (§5.2) on `t` tokens: x is the residual state [t, hc·D], updated in place.
    fn block<O: Ops>(
        &self,
        o: &O,
        b: &BlockWeights,
        st: &mut AttnState,
        x: &mut O::T,
        tokens: &[u32],
        t0: usize,
    ) -> Result<(), O::Err> {
        let (k, c) = (HcDims::of(&self.cfg), &self.clock);
        let (coef, u) = c.time(Mhc, || hyper::site_input(o, &b.hc_attn, &b.attn_norm, x, k))?;
        let a = c.time(Attention, || {
            attention::forward(o, &self.attn_ctx(b), &b.attn, st, &u, t0, tokens.len())
        })?;
        c.time(Mhc, || hyper::write_back(o, x, &a, &coef, k))?;
        let (coef, u) = c.time(Mhc, || hyper::site_input(o, &b.hc_ffn, &b.ffn_norm, x, k))?;
        let f = c.time(Moe, || {
            moe::forward(o, &self.moe_ctx(b), &b.ffn, &u, tokens)
        })?;
        c.time(Mhc, || hyper::write_back(o, x, &f, &coef, k))
    }

    /// Time each section of the forward pass from now on (`on`) or not; [`Engine::section_times`]
    /// reads and resets the sums.
    pub fn time_sections(&mut self, on: bool) {
        self.clock.set(on);
    }

    /// Seconds per section since the last call (host wall time; with device placement, the
    /// time the host waited), and tokens per routed expert.
    pub fn section_times(&self) -> super::sections::SectionTimes {
        self.clock.take()
    }

    /// The head (§5.11) on rows `rows` of the residual states x [t, hc·D]: the HC head's
    /// collapse, the final norm and the LM head; the logits come back to the host.
    fn head<O: Ops>(&self, o: &O, x: &O::T, rows: Range<usize>) -> Result<Vec<f32>, O::Err> {
        let (w, k) = (&self.weights, HcDims::of(&self.cfg));
        let n = rows.len();
        let head = (&w.hc_head_fn[..], &w.hc_head_base[..], w.hc_head_scale[0]);
        self.clock.time(Head, || {
            let mut hidden = o.hc_head(head, x, rows, k)?;
            o.rms_norm(&mut hidden, Some(&w.norm), k.d, k.norm_eps)?;
            let logits = o.linear(&w.head, &hidden, n)?;
            Ok(o.read(&[], vec![logits])?.pop().unwrap_or_default())
        })
    }

    fn attn_ctx(&self, b: &BlockWeights) -> AttnCtx<'_> {
        AttnCtx {
            cfg: &self.cfg,
            kind: b.kind,
            rope: &self.ropes[b.layer],
            numerics: self.numerics,
            dv: self.deviations,
            clock: &self.clock,
        }
    }

    fn moe_ctx(&self, b: &BlockWeights) -> moe::MoeCtx<'_> {
        moe::MoeCtx {
            cfg: &self.cfg,
            ex: &self.exec,
            host: &self.host,
            ram: self.ram.as_ref(),
            num: self.numerics,
            dv: self.deviations,
            layer: b.layer,
            clock: &self.clock,
        }
    }

    /// Run `tokens` (positions t0..) through the model, updating `state`. Returns logits for
    /// the wanted positions: [n, vocab] with n = 0, 1 or tokens.len().
    pub fn forward(
        &self,
        state: &mut [AttnState],
        tokens: &[u32],
        t0: usize,
        want: Want,
    ) -> Vec<f32> {
        let cfg = &self.cfg;
        let (d, hc) = (cfg.hidden_size, cfg.hc_mult);
        let t = tokens.len();
        // Embedding (§5.1), copied into the hc residual streams.
        let mut x = vec![0f32; t * hc * d];
        let mut e = vec![0f32; d];
        for (k, &tok) in tokens.iter().enumerate() {
            dequant_row(&self.weights.embed, tok as usize, &mut e);
            for c in 0..hc {
                x[(k * hc + c) * d..(k * hc + c + 1) * d].copy_from_slice(&e);
            }
        }
        let rows = match want {
            Want::None => 0..0,
            Want::Last => t - 1..t,
            Want::All => 0..t,
        };
        // Hash-routed layers' experts are known from the token ids alone: the expert cache
        // sees them now, so their promotion copies overlap the layers before them, and the
        // RAM tier starts reading those the device does not hold (in the order the layers
        // will compute them).
        let k = cfg.num_experts_per_tok;
        let hash_layers = self
            .weights
            .layers
            .iter()
            .filter(|b| b.ffn.tid2eid.is_some());
        let wanted = self.exec.experts.tracked() || self.ram.is_some();
        for b in hash_layers.filter(|_| wanted) {
            let sel: Vec<usize> = tokens
                .iter()
                .flat_map(|&tok| b.ffn.hashed_experts(tok, k).unwrap_or_default())
                .collect();
            if self.exec.experts.tracked() {
                let all = sel.iter().copied();
                self.exec
                    .experts
                    .selected(&self.exec, b.layer, all, |e| b.ffn.experts[e].matrices());
            }
            if let Some(r) = &self.ram {
                let mut cpu: Vec<usize> = sel
                    .into_iter()
                    .filter(|&e| {
                        let on_device = |x: &crate::model::weights::ExpertWeights| {
                            x.matrices().iter().all(|m| self.exec.is_resident(m))
                        };
                        b.ffn.experts.get(e).is_some_and(|x| !on_device(x))
                    })
                    .collect();
                cpu.sort_unstable();
                cpu.dedup();
                r.prefetch(b.layer, &cpu, &b.ffn.experts);
            }
        }
        // Blocks placed on the device run there with the activations kept there; if the
        // device gives up anywhere, their state is put back and the step computed on the host.
        let tried = t < self
            .device_gave_up_at
            .load(std::sync::atomic::Ordering::Relaxed);
        let n_dev = if !self.faults && tried {
            self.exec.device_blocks(state.len())
        } else {
            0
        };
        let host = Host {
            ex: &self.exec,
            dv: self.deviations,
        };
        if n_dev > 0 {
            let marks: Vec<StepMark> = state[..n_dev].iter().map(|s| s.step_mark(t0, t)).collect();
            if let Ok(out) = self.on_device(state, &x, tokens, t0, rows.clone(), n_dev) {
                self.exec.timing.note_device_step();
                return out;
            }
            self.exec.timing.note_redone_step();
            // Steps this long (or longer) go straight to the host from now on: chunks that
            // do not fit would otherwise be computed twice every time.
            if t > 1 {
                self.device_gave_up_at
                    .fetch_min(t, std::sync::atomic::Ordering::Relaxed);
            }
            for (s, m) in state.iter_mut().zip(marks) {
                s.step_restore(m);
            }
        }
        for (b, st) in self.weights.layers.iter().zip(state.iter_mut()) {
            let Ok(()) = self.block(&host, b, st, &mut x, tokens, t0);
        }
        if rows.is_empty() {
            return Vec::new();
        }
        let Ok(logits) = self.head(&host, &x, rows);
        logits
    }

    /// [`Engine::forward`] from the embedded states `x` with blocks 0..n_dev on the device
    /// (the residual streams go up once and stay there) and the rest on the host, the head
    /// on the device too when every block ran there and the whole model is placed there.
    /// Only the logits come back (or the states where the host takes over).
    fn on_device(
        &self,
        state: &mut [AttnState],
        x: &[f32],
        tokens: &[u32],
        t0: usize,
        rows: Range<usize>,
        n_dev: usize,
    ) -> Result<Vec<f32>, GaveUp> {
        let dev = Dev { ex: &self.exec };
        let host = Host {
            ex: &self.exec,
            dv: self.deviations,
        };
        let mut xd = Act::upload(&self.exec, x).ok_or(GaveUp)?;
        let layers = self.weights.layers.iter().zip(state.iter_mut());
        let (on_dev, on_host): (Vec<_>, Vec<_>) = layers.enumerate().partition(|(i, _)| *i < n_dev);
        for (_, (b, st)) in on_dev {
            self.block(&dev, b, st, &mut xd, tokens, t0)?;
        }
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        if on_host.is_empty() && self.exec.whole_model() {
            return self.head(&dev, &xd, rows);
        }
        let mut xh = dev.read(&[], vec![xd])?.pop().unwrap_or_default();
        for (_, (b, st)) in on_host {
            let Ok(()) = self.block(&host, b, st, &mut xh, tokens, t0);
        }
        let Ok(logits) = self.head(&host, &xh, rows);
        Ok(logits)
    }
}
