//! The memory plan and its roofline prediction (`dsflash inspect --plan`): where each part of
//! the model goes on a machine with a given GPU memory, RAM and bandwidths, and the decode and
//! prefill speed that placement allows.
//!
//! Placement fills the GPU budget in priority order ([`fill`], which the engine's hybrid
//! placement uses too): the KV state for the requested context, the dense weights layer by
//! layer (attention, compressors, indexers, router, shared expert, norms, mHC), the head,
//! then routed-expert slots spread evenly over the layers. Layers whose dense weights do not
//! fit stay on the CPU whole. The embedding (read by rows), the hash
//! tables and everything else stay in RAM, where the whole checkpoint is mmapped.
//!
//! The prediction is a roofline: each step's bytes over the bandwidth of the memory that
//! serves them. Decode, per layer: the GPU part (dense weights, KV reads, cached experts) and
//! the CPU part (missed experts from RAM) run side by side, plus a fixed sync cost per layer;
//! experts read from the drive overlap their layer's experts (a hash layer's, read from the
//! token's start, the whole step), and the drive's total time bounds the step.
//! Expert hits follow the measured skew of V4-Flash routing (the top 12.5 % of a layer's
//! experts take ~58 % of its selections), modelled as a Zipf law fitted to that figure; the
//! cache is credited with the static most-frequent set (adaptive caches do better, see
//! `expert_cache`). Prefill of a chunk: the GPU's arithmetic, and per layer the non-resident
//! experts either streamed over PCIe or computed on the CPU, whichever is cheaper.

use crate::backend::expert_cache::expert_popularity;
use crate::model::config::ModelConfig;
use crate::model::layout::{Component, inventory};
use serde::Serialize;

/// A machine to plan for (bandwidths in GB/s, arithmetic in TFLOP/s).
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub name: String,
    /// GPU memory the plan may use (0: no GPU).
    pub gpu_mem: u64,
    pub gpu_gbs: f64,
    /// Dense FP8/bf16 tensor throughput the prefill GEMMs reach.
    pub gpu_tflops: f64,
    pub pcie_gbs: f64,
    pub ram: u64,
    pub cpu_gbs: f64,
    /// What the CPU's quantized GEMMs reach on a batch of tokens.
    pub cpu_tflops: f64,
    /// Read bandwidth of the drive holding the checkpoint, for expert-sized reads (0: no
    /// disk tier, every expert is assumed in RAM).
    pub disk_gbs: f64,
}

const GIB: u64 = 1 << 30;

/// The reference boxes. Bandwidths are typical measured figures: RTX 4090 ~1,000 GB/s,
/// RTX 5090 ~1,790 GB/s, PCIe 4.0 / 5.0 x16 ~25 / ~50 GB/s in practice, dual-channel DDR5
/// ~80-90 GB/s, a 4-channel DDR5 workstation ~150 GB/s; NVMe reads of a few MB, PCIe 4.0
/// drive ~6 GB/s, PCIe 5.0 ~11 GB/s. The first two have less RAM than the model: part of the
/// routed experts come from the drive.
pub fn reference_machines() -> Vec<Machine> {
    vec![
        Machine {
            name: "RTX 4090 24 GB + 64 GB DDR5 (2 channels) + PCIe 4.0 NVMe".into(),
            gpu_mem: 24 * GIB,
            gpu_gbs: 1000.0,
            gpu_tflops: 330.0,
            pcie_gbs: 25.0,
            ram: 64 * GIB,
            cpu_gbs: 80.0,
            cpu_tflops: 2.0,
            disk_gbs: 6.0,
        },
        Machine {
            name: "RTX 5090 32 GB + 96 GB DDR5 (2 channels) + PCIe 5.0 NVMe".into(),
            gpu_mem: 32 * GIB,
            gpu_gbs: 1790.0,
            gpu_tflops: 420.0,
            pcie_gbs: 50.0,
            ram: 96 * GIB,
            cpu_gbs: 90.0,
            cpu_tflops: 2.5,
            disk_gbs: 11.0,
        },
        Machine {
            name: "RTX 4090 24 GB + 128 GB DDR5 (2 channels)".into(),
            gpu_mem: 24 * GIB,
            gpu_gbs: 1000.0,
            gpu_tflops: 330.0,
            pcie_gbs: 25.0,
            ram: 128 * GIB,
            cpu_gbs: 80.0,
            cpu_tflops: 2.0,
            disk_gbs: 6.0,
        },
        Machine {
            name: "RTX 5090 32 GB + 192 GB DDR5 (2 channels)".into(),
            gpu_mem: 32 * GIB,
            gpu_gbs: 1790.0,
            gpu_tflops: 420.0,
            pcie_gbs: 50.0,
            ram: 192 * GIB,
            cpu_gbs: 90.0,
            cpu_tflops: 2.5,
            disk_gbs: 11.0,
        },
        Machine {
            name: "no GPU + 256 GB DDR5 (4 channels)".into(),
            gpu_mem: 0,
            gpu_gbs: 0.0,
            gpu_tflops: 0.0,
            pcie_gbs: 0.0,
            ram: 256 * GIB,
            cpu_gbs: 150.0,
            cpu_tflops: 4.0,
            disk_gbs: 6.0,
        },
    ]
}

/// Left to the driver, the display and the activations.
pub const GPU_RESERVE: u64 = GIB;
/// RAM left to the system, the activations and the tokenizer.
pub const RAM_RESERVE: u64 = 4 * GIB;
/// Per read from the drive (queueing and completion; an expert is three reads).
pub const DISK_READ_S: f64 = 100e-6;
/// Per layer and decoded token: the routing copy back and the combine (two small transfers).
pub const LAYER_SYNC_S: f64 = 20e-6;
/// Context given device room for its KV rows when no `--ctx` is asked for (the rows grow as
/// used; this is what the placement keeps free for them), and what the plan assumes then.
pub const DEFAULT_KV_ROOM: usize = 1 << 16;

/// Prefill chunk the prediction assumes: the CLI's default `--prefill-chunk`.
pub const PREFILL_CHUNK: usize = 2048;

#[derive(Debug, Clone, Serialize)]
pub struct Part {
    pub what: String,
    pub bytes: u64,
    /// "gpu", "cpu", or "gpu+cpu" (experts).
    pub place: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub machine: Machine,
    pub ctx: usize,
    pub parts: Vec<Part>,
    pub gpu_bytes: u64,
    pub ram_bytes: u64,
    /// Layers whose dense weights are on the GPU.
    pub gpu_layers: usize,
    pub expert_slots_per_layer: usize,
    /// Expected fraction of expert selections served by GPU slots.
    pub hit_rate: f64,
    /// Routed experts per layer kept in RAM (besides the GPU's), and the fraction of
    /// selections they serve; the rest are read from the drive.
    pub ram_experts_per_layer: usize,
    pub ram_hit_rate: f64,
    pub disk_rate: f64,
    /// Expert bytes read from the drive per decoded token.
    pub disk_bytes_per_token: f64,
    /// What bounds decode: "GPU memory", "RAM" or "disk".
    pub bound: &'static str,
    pub decode_tok_s: f64,
    pub prefill_tok_s: f64,
    /// Per decoded token: seconds on the GPU, on the CPU, in syncs, reading the drive (each
    /// summed over the layers; the CPU's reads overlap its compute).
    pub decode_split_s: [f64; 4],
    pub fits_in_ram: bool,
}

/// Bytes of the KV state at `ctx` tokens (f32 rows, as the engine stores them): per layer the
/// window ring, the compressed rows (ctx / ratio) and, on ratio-4 layers, the indexer rows.
pub fn kv_bytes(cfg: &ModelConfig, ctx: usize) -> u64 {
    let mut b = 0u64;
    for l in 0..cfg.num_hidden_layers {
        let mut rows = cfg.sliding_window.min(ctx) * cfg.head_dim;
        let r = cfg.compress_ratio(l);
        if let Some(n) = ctx.checked_div(r) {
            rows += n * cfg.head_dim;
            if r == 4 {
                rows += n * cfg.index_head_dim;
            }
        }
        b += 4 * rows as u64;
    }
    b
}

/// What a device holds, in the placement's priority order (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fill {
    /// The reserve (KV rows, activations) fits; nothing else goes to the device otherwise.
    pub reserved: bool,
    /// Layers, from the first, whose dense weights are on the device.
    pub layers: usize,
    pub head: bool,
    /// Expert slots per layer in what is left.
    pub slots: usize,
}

/// Fill `budget` bytes in priority order: the `reserve` first, then the `dense` weights of
/// whole layers in order (the first layer that does not fit ends them), the `head` once
/// every layer is in, then as many expert slots per layer (`expert` bytes each, at most
/// `n_exp`) as the rest holds. `inspect --plan` predicts with it and
/// `Engine::use_device_hybrid` places with it.
pub fn fill(
    budget: u64,
    reserve: u64,
    dense: &[u64],
    head: u64,
    expert: u64,
    n_exp: usize,
) -> Fill {
    let mut f = Fill {
        reserved: budget > 0 && reserve <= budget,
        layers: 0,
        head: false,
        slots: 0,
    };
    if !f.reserved {
        return f;
    }
    let mut used = reserve;
    for &b in dense {
        if used + b > budget {
            break;
        }
        used += b;
        f.layers += 1;
    }
    f.head = f.layers == dense.len() && used + head <= budget;
    if f.head {
        used += head;
        let per_layer = dense.len().max(1) as u64 * expert.max(1);
        f.slots = (((budget - used) / per_layer) as usize).min(n_exp);
    }
    f
}

pub fn plan(cfg: &ModelConfig, m: &Machine, ctx: usize) -> Plan {
    plan_with(cfg, m, ctx, Overrides::default())
}

/// What a measurement knows better than the model: the slots actually given to the cache,
/// the hit rate actually seen, the experts' popularity as a usage profile counted it (each
/// layer's shares sorted, most used first, averaged over the layers).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub slots: Option<usize>,
    pub hit_rate: Option<f64>,
    pub popularity: Option<Vec<f64>>,
}

/// The popularity [`Overrides`] takes from selection counts per [layer][expert].
pub fn popularity_of(counts: &[Vec<u64>]) -> Vec<f64> {
    let n = counts.iter().map(Vec::len).max().unwrap_or(0);
    let mut pop = vec![0.0; n];
    let mut layers = 0;
    for row in counts {
        let total: u64 = row.iter().sum();
        if total == 0 {
            continue;
        }
        let mut r = row.clone();
        r.sort_unstable_by(|a, b| b.cmp(a));
        for (p, c) in pop.iter_mut().zip(r) {
            *p += c as f64 / total as f64;
        }
        layers += 1;
    }
    pop.iter_mut().for_each(|p| *p /= layers.max(1) as f64);
    pop
}

pub fn plan_with(cfg: &ModelConfig, m: &Machine, ctx: usize, o: Overrides) -> Plan {
    let inv = inventory(cfg);
    let layers = cfg.num_hidden_layers;
    let n_exp = cfg.n_routed_experts;
    let k = cfg.num_experts_per_tok;
    let mut dense = vec![0u64; layers];
    let (mut head, mut embed, mut other, mut experts_total) = (0u64, 0u64, 0u64, 0u64);
    for t in &inv {
        let b = t.nbytes() as u64;
        match (t.component, t.layer) {
            (Component::RoutedExperts, _) => experts_total += b,
            (Component::Embed, _) => embed += b,
            (Component::Head | Component::FinalNorm, _) => head += b,
            (Component::HashTable | Component::Mtp, _) => other += b,
            (_, Some(l)) if l < layers => dense[l] += b,
            _ => other += b,
        }
    }
    let expert_bytes = experts_total / (layers * n_exp).max(1) as u64;
    let kv = kv_bytes(cfg, ctx);
    let total_dense: u64 = dense.iter().sum();
    // Fill the GPU: KV, dense layer by layer, head, expert slots.
    let budget = m.gpu_mem.saturating_sub(GPU_RESERVE);
    let f = fill(budget, kv, &dense, head, expert_bytes, n_exp);
    let (kv_on_gpu, gpu_layers, head_on_gpu) = (f.reserved, f.layers, f.head);
    let slots = o.slots.map_or(f.slots, |s| s.min(n_exp));
    let pop = match o.popularity {
        Some(p) if p.len() == n_exp => p,
        _ => expert_popularity(n_exp),
    };
    // + 0.0: an empty sum is -0.0.
    let hit: f64 = o.hit_rate.unwrap_or(pop[..slots].iter().sum::<f64>() + 0.0);
    let dense_gpu: u64 = dense[..gpu_layers].iter().sum();
    // RAM: what the CPU reads besides the routed experts, then as many experts per layer as
    // fit (the most popular after the GPU's); with a drive modelled, the rest come from it.
    let non_expert_ram = (total_dense - dense_gpu)
        + if head_on_gpu { 0 } else { head }
        + embed
        + other
        + if kv_on_gpu { 0 } else { kv };
    let ram_for_experts = m.ram.saturating_sub(RAM_RESERVE + non_expert_ram);
    let ram_experts = if m.disk_gbs > 0.0 {
        ((ram_for_experts / (layers as u64 * expert_bytes).max(1)) as usize).min(n_exp - slots)
    } else {
        n_exp - slots
    };
    let (ram_hit, disk) = if slots + ram_experts >= n_exp {
        (1.0 - hit, 0.0)
    } else {
        let r: f64 = pop[slots..slots + ram_experts].iter().sum::<f64>() + 0.0;
        let r = r.min(1.0 - hit);
        (r, (1.0 - hit - r).max(0.0))
    };
    let place = |on: bool| if on { "gpu" } else { "cpu" }.to_string();
    let parts = vec![
        Part {
            what: format!("KV state for {ctx} tokens"),
            bytes: kv,
            place: place(kv_on_gpu),
        },
        Part {
            what: format!("dense weights of {gpu_layers} of {layers} layers"),
            bytes: dense_gpu,
            place: place(gpu_layers > 0),
        },
        Part {
            what: if gpu_layers == 0 {
                format!("dense weights of all {layers} layers")
            } else {
                format!("dense weights of the other {} layers", layers - gpu_layers)
            },
            bytes: total_dense - dense_gpu,
            place: "cpu".into(),
        },
        Part {
            what: "head + final norm".into(),
            bytes: head,
            place: place(head_on_gpu),
        },
        Part {
            what: match (m.gpu_mem, disk > 0.0) {
                (0, false) => "routed experts, from RAM".to_string(),
                (0, true) => format!(
                    "routed experts: {ram_experts} per layer in RAM ({:.0} % of selections), the rest from disk",
                    100.0 * ram_hit
                ),
                (_, false) => format!(
                    "routed experts: {slots} slots per layer on the GPU ({:.0} % of selections), the rest from RAM",
                    100.0 * hit
                ),
                (_, true) => format!(
                    "routed experts: {slots} slots per layer on the GPU ({:.0} % of selections), {ram_experts} in RAM ({:.0} %), the rest from disk",
                    100.0 * hit,
                    100.0 * ram_hit
                ),
            },
            bytes: experts_total,
            place: match (slots > 0, disk > 0.0) {
                (true, false) => "gpu+cpu",
                (true, true) => "gpu+cpu+disk",
                (false, false) => "cpu",
                (false, true) => "cpu+disk",
            }
            .into(),
        },
        Part {
            what: "embedding, hash tables, MTP".into(),
            bytes: embed + other,
            place: "cpu".into(),
        },
    ];
    // Decode roofline, layer by layer: the GPU's part (attention, cached experts) beside the
    // CPU's (experts from RAM), whose reads from the drive overlap its compute; a fixed sync
    // per layer with a GPU.
    let gbs = |bw: f64| bw * 1e9;
    let kv_layer_read = kv as f64 / layers as f64; // every row read once per token (upper bound)
    let exp_bytes = (k as u64 * expert_bytes) as f64;
    let disk_layer = if disk > 0.0 {
        disk * exp_bytes / gbs(m.disk_gbs) + disk * k as f64 * 3.0 * DISK_READ_S
    } else {
        0.0
    };
    let (mut t_gpu, mut t_cpu, mut t_sync, mut t_disk, mut per_layer) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for (l, &d) in dense.iter().enumerate() {
        t_disk += disk_layer;
        // A hash layer's experts come from the token ids, so their reads start with the step
        // and overlap all of it (the drive's total bounds the step below); a scored layer's
        // start after its router and overlap only that layer's experts.
        let disk_here = if l < cfg.num_hash_layers {
            0.0
        } else {
            disk_layer
        };
        if l < gpu_layers {
            let attn = (d as f64 + kv_layer_read) / gbs(m.gpu_gbs);
            let hits = hit * exp_bytes / gbs(m.gpu_gbs);
            let miss = (1.0 - hit) * exp_bytes / gbs(m.cpu_gbs);
            t_gpu += attn + hits;
            t_cpu += miss;
            per_layer += attn + hits.max(miss.max(disk_here));
        } else {
            let dense_t = (d as f64 + kv_layer_read) / gbs(m.cpu_gbs);
            let exp_t = exp_bytes / gbs(m.cpu_gbs);
            t_cpu += dense_t + exp_t;
            per_layer += dense_t + exp_t.max(disk_here);
        }
        if m.gpu_mem > 0 {
            t_sync += LAYER_SYNC_S;
        }
    }
    let head_t = if head_on_gpu {
        head as f64 / gbs(m.gpu_gbs)
    } else {
        head as f64 / gbs(m.cpu_gbs)
    };
    let decode_s = (per_layer + t_sync + head_t).max(t_disk);
    let bound = if t_disk >= t_cpu && t_disk >= t_gpu {
        "disk"
    } else if t_gpu >= t_cpu {
        "GPU memory"
    } else {
        "RAM"
    };
    // Prefill roofline for one chunk of PREFILL_CHUNK tokens.
    let c = PREFILL_CHUNK as f64;
    let flops_per_token = 2.0 * cfg_active_params(cfg);
    // A chunk selects nearly every expert: those on the drive are each read once per chunk,
    // overlapping the compute.
    let disk_chunk = if disk > 0.0 {
        let n = (layers * (n_exp - slots - ram_experts)) as f64;
        n * (expert_bytes as f64 / gbs(m.disk_gbs) + 3.0 * DISK_READ_S)
    } else {
        0.0
    };
    let prefill_s = if m.gpu_mem == 0 {
        (c * flops_per_token / (m.cpu_tflops * 1e12)).max(disk_chunk)
    } else {
        let gpu_compute = c * flops_per_token / (m.gpu_tflops * 1e12);
        // Non-resident experts of every layer: stream each over PCIe, or compute its tokens
        // on the CPU, whichever is cheaper (tokens per expert = C·k / E).
        let per_expert_tokens = c * k as f64 / n_exp as f64;
        let stream = expert_bytes as f64 / gbs(m.pcie_gbs);
        let expert_flops = 2.0 * per_expert_tokens * expert_params(cfg);
        let cpu = expert_flops / (m.cpu_tflops * 1e12);
        let misses = (n_exp - slots) as f64 * layers as f64;
        let dense_cpu = (total_dense - dense_gpu) as f64 / gbs(m.pcie_gbs);
        gpu_compute
            .max(misses * stream.min(cpu) + dense_cpu)
            .max(disk_chunk)
    };
    let on_gpu_weights =
        dense_gpu + if head_on_gpu { head } else { 0 } + (slots * layers) as u64 * expert_bytes;
    let ram_needed = total_dense + head + embed + other + experts_total - on_gpu_weights
        + if kv_on_gpu { 0 } else { kv };
    Plan {
        machine: m.clone(),
        ctx,
        parts,
        gpu_bytes: on_gpu_weights + if kv_on_gpu { kv } else { 0 },
        // What must stay in RAM: the page cache may drop what was uploaded to the GPU.
        ram_bytes: ram_needed,
        gpu_layers,
        expert_slots_per_layer: slots,
        hit_rate: hit,
        ram_experts_per_layer: ram_experts,
        ram_hit_rate: ram_hit,
        disk_rate: disk,
        disk_bytes_per_token: disk * exp_bytes * layers as f64,
        bound,
        decode_tok_s: 1.0 / decode_s,
        prefill_tok_s: c / prefill_s,
        decode_split_s: [
            t_gpu + if head_on_gpu { head_t } else { 0.0 },
            t_cpu + if head_on_gpu { 0.0 } else { head_t },
            t_sync,
            t_disk,
        ],
        fits_in_ram: ram_needed <= m.ram,
    }
}

/// Parameters one token multiplies at batch 1 (dense matrices, k experts, the head).
fn cfg_active_params(cfg: &ModelConfig) -> f64 {
    let inv = inventory(cfg);
    let mut p = 0f64;
    for t in &inv {
        let n: usize = t.shape.iter().product();
        let weights = match t.dtype {
            safetensors::Dtype::I8 => 2 * n, // packed FP4: two weights per byte
            safetensors::Dtype::F8_E8M0 => 0,
            _ => n,
        } as f64;
        match t.component {
            Component::RoutedExperts => {
                if t.expert == Some(0) {
                    p += weights * cfg.num_experts_per_tok as f64;
                }
            }
            Component::Embed | Component::HashTable | Component::Mtp => {}
            _ => p += weights,
        }
    }
    p
}

/// Weights of one routed expert (w1, w2, w3).
fn expert_params(cfg: &ModelConfig) -> f64 {
    3.0 * (cfg.hidden_size * cfg.moe_intermediate_size) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_takes_the_reserve_whole_layers_the_head_then_slots() {
        // Reserve 10, three layers of 30, head 5, experts of 1 byte, 8 per layer at most.
        let f = |budget| fill(budget, 10, &[30, 30, 30], 5, 1, 8);
        let none = Fill {
            reserved: false,
            layers: 0,
            head: false,
            slots: 0,
        };
        assert_eq!(f(9), none);
        assert_eq!(
            f(69),
            Fill {
                reserved: true,
                layers: 1,
                ..none
            }
        );
        // All layers (100) but no room for the head: no slots either.
        assert_eq!(
            f(104),
            Fill {
                reserved: true,
                layers: 3,
                ..none
            }
        );
        // 105 used; (120 - 105) / 3 layers = 5 slots each; at most 8.
        assert_eq!(
            f(120),
            Fill {
                reserved: true,
                layers: 3,
                head: true,
                slots: 5
            }
        );
        assert_eq!(f(1 << 20).slots, 8);
    }

    fn real() -> ModelConfig {
        let s = include_str!("../../tests/fixtures/deepseek-v4-flash-config.json");
        ModelConfig::from_json_bytes(s.as_bytes(), "config.json").expect("config")
    }

    #[test]
    fn zipf_fit_reproduces_the_measured_skew() {
        let p = expert_popularity(256);
        let top: f64 = p[..32].iter().sum();
        assert!((top - 0.58).abs() < 1e-6, "{top}");
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert!(p.windows(2).all(|w| w[0] >= w[1]));
    }

    #[test]
    fn kv_bytes_by_hand_for_the_real_config_at_4k() {
        let cfg = real();
        // Per layer: window 128 x 512 floats; ratio-4 layers 1024 x (512 + 128) more; ratio
        // 128 layers 32 x 512 more.
        let mut want = 0u64;
        for l in 0..cfg.num_hidden_layers {
            let mut rows = 128 * 512;
            match cfg.compress_ratio(l) {
                4 => rows += 1024 * (512 + 128),
                128 => rows += 32 * 512,
                _ => {}
            }
            want += 4 * rows as u64;
        }
        assert_eq!(kv_bytes(&cfg, 4096), want);
    }

    #[test]
    fn no_gpu_decode_is_bytes_per_token_over_ram_bandwidth() {
        let cfg = real();
        let ms = reference_machines();
        let m = ms.iter().find(|m| m.gpu_mem == 0).unwrap();
        let p = plan(&cfg, m, 4096);
        assert_eq!(
            (p.gpu_layers, p.expert_slots_per_layer, p.gpu_bytes),
            (0, 0, 0)
        );
        // Everything read per token comes from RAM: dense + k experts per layer + head + KV.
        let inv = inventory(&cfg);
        let bpt = crate::model::layout::bytes_per_token(&cfg, &inv) as f64;
        let want = m.cpu_gbs * 1e9 / (bpt + kv_bytes(&cfg, 4096) as f64);
        assert!(
            (p.decode_tok_s / want - 1.0).abs() < 0.01,
            "{} vs {want}",
            p.decode_tok_s
        );
    }

    #[test]
    fn placement_follows_the_priority_order_and_the_budget() {
        let cfg = real();
        for m in reference_machines().iter().filter(|m| m.gpu_mem > 0) {
            let p = plan(&cfg, m, 4096);
            assert!(
                p.gpu_bytes <= m.gpu_mem - GPU_RESERVE,
                "{}: over budget",
                m.name
            );
            assert_eq!(
                p.gpu_layers, cfg.num_hidden_layers,
                "{}: dense fits",
                m.name
            );
            assert!(p.expert_slots_per_layer > 0);
            assert_eq!(p.fits_in_ram, m.ram >= 128 * GIB, "{}", m.name);
        }
        // More GPU memory never means fewer slots or a slower prediction.
        let mut m = reference_machines()[2].clone();
        assert_eq!(m.ram, 128 * GIB);
        let mut last = (0usize, 0f64);
        for gb in [4u64, 8, 16, 24, 48, 96, 200] {
            m.gpu_mem = gb * GIB;
            let p = plan(&cfg, &m, 4096);
            assert!(
                p.expert_slots_per_layer >= last.0 && p.decode_tok_s >= last.1,
                "{gb} GB"
            );
            last = (p.expert_slots_per_layer, p.decode_tok_s);
        }
        // A card too small for the dense part keeps whole layers on the CPU.
        m.gpu_mem = 4 * GIB;
        let p = plan(&cfg, &m, 4096);
        assert!(p.gpu_layers < cfg.num_hidden_layers && p.expert_slots_per_layer == 0);
        // A card with room for every expert serves every selection.
        m.gpu_mem = 400 * GIB;
        let p = plan(&cfg, &m, 4096);
        assert_eq!(p.expert_slots_per_layer, cfg.n_routed_experts);
        assert!((p.hit_rate - 1.0).abs() < 1e-9);
    }

    #[test]
    fn experts_beyond_ram_come_from_disk_and_the_plan_says_so() {
        let cfg = real();
        let (layers, k, n) = (
            cfg.num_hidden_layers as f64,
            cfg.num_experts_per_tok as f64,
            cfg.n_routed_experts,
        );
        let inv = inventory(&cfg);
        let expert: f64 = inv
            .iter()
            .filter(|t| t.component == Component::RoutedExperts)
            .map(|t| t.nbytes() as f64)
            .sum::<f64>()
            / (layers * n as f64);
        let pop = expert_popularity(n);
        let ms = reference_machines();
        for m in ms.iter().filter(|m| m.ram < 128 * GIB) {
            let p = plan(&cfg, m, 4096);
            let (s, r) = (p.expert_slots_per_layer, p.ram_experts_per_layer);
            assert!(s > 0 && r > 0 && s + r < n, "{}: {s} + {r}", m.name);
            // The GPU keeps the most popular experts, RAM the next: the drive serves the rest.
            let on_disk: f64 = pop[s + r..].iter().sum();
            assert!((p.disk_rate - on_disk).abs() < 1e-9, "{}", m.name);
            assert!((p.hit_rate + p.ram_hit_rate + p.disk_rate - 1.0).abs() < 1e-9);
            assert!((p.disk_bytes_per_token - on_disk * k * expert * layers).abs() < 1.0);
            assert_eq!(p.bound, "disk", "{}", m.name);
            // Reads overlap the CPU's compute: no slower than the reads alone, nor faster
            // than the plan with every expert in RAM.
            let reads = p.disk_bytes_per_token / (m.disk_gbs * 1e9);
            assert!(1.0 / p.decode_tok_s >= reads, "{}", m.name);
            let mut roomy = m.clone();
            roomy.ram = 1024 * GIB;
            let all_in_ram = plan(&cfg, &roomy, 4096);
            assert_eq!((all_in_ram.disk_rate, all_in_ram.bound), (0.0, "RAM"));
            assert!(p.decode_tok_s < all_in_ram.decode_tok_s);
            // With every expert in RAM the drive does not count.
            roomy.disk_gbs = 0.0;
            assert_eq!(
                plan(&cfg, &roomy, 4096).decode_tok_s,
                all_in_ram.decode_tok_s
            );
        }
        // More RAM or a faster drive is never slower; RAM lowers the share read.
        let mut m = ms[0].clone();
        let mut last = (1.0f64, 0.0f64);
        for gb in [32u64, 48, 64, 96, 128, 160, 256] {
            m.ram = gb * GIB;
            let p = plan(&cfg, &m, 4096);
            assert!(p.disk_rate <= last.0 && p.decode_tok_s >= last.1, "{gb} GB");
            last = (p.disk_rate, p.decode_tok_s);
        }
        assert_eq!(last.0, 0.0);
        let (mut m, mut prev) = (ms[0].clone(), 0.0);
        for bw in [1.0, 3.0, 6.0, 12.0, 50.0] {
            m.disk_gbs = bw;
            let p = plan(&cfg, &m, 4096);
            assert!(p.decode_tok_s >= prev && p.prefill_tok_s > 0.0, "{bw} GB/s");
            prev = p.decode_tok_s;
        }
    }

    #[test]
    fn hash_layers_reads_overlap_the_whole_step() {
        // No GPU, a drive that is the bound: with every layer hash-routed the step is the
        // drive's time alone; with none, each layer's reads add to its dense part.
        let mut cfg = real();
        let m = Machine {
            name: "slow drive".into(),
            gpu_mem: 0,
            gpu_gbs: 0.0,
            gpu_tflops: 0.0,
            pcie_gbs: 0.0,
            ram: 64 * GIB,
            cpu_gbs: 80.0,
            cpu_tflops: 1.0,
            disk_gbs: 1.0,
        };
        cfg.num_hash_layers = cfg.num_hidden_layers;
        let all = plan(&cfg, &m, 4096);
        let t_disk = all.decode_split_s[3];
        assert!(
            t_disk > all.decode_split_s[1],
            "the drive bounds this machine"
        );
        assert!((1.0 / all.decode_tok_s - t_disk).abs() < 1e-12);
        // (Without hash tables a few more experts fit in RAM: the reads differ a little.)
        cfg.num_hash_layers = 0;
        let none = plan(&cfg, &m, 4096);
        let t_disk = none.decode_split_s[3];
        assert!(
            1.0 / none.decode_tok_s > t_disk,
            "dense parts add to the reads"
        );
        // ... but each layer's reads still overlap its experts.
        assert!(1.0 / none.decode_tok_s < t_disk + none.decode_split_s[1]);
    }
}
