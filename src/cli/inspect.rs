//! `dsflash inspect --model PATH [--json]`

use crate::model::Checkpoint;
use crate::model::config::{AttnKind, ModelConfig};
use crate::model::layout::{Component, bytes_per_token};
use clap::Args;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Checkpoint directory or Hugging Face repo id (resolved in the local hub cache).
    #[arg(long, default_value = crate::hub::DEFAULT_MODEL)]
    pub model: String,
    /// One JSON object on stdout instead of text.
    #[arg(long)]
    pub json: bool,
    /// Print the memory plan and its predicted decode/prefill speed instead (needs only the
    /// config; without a downloaded model, the release's built-in config is used).
    #[arg(long)]
    pub plan: bool,
    /// Plan for the reference machines (RTX 4090 with 64 or 128 GB, RTX 5090 with 96 or 192
    /// GB, no GPU with 256 GB) instead of this one.
    #[arg(long, requires = "plan")]
    pub reference: bool,
    /// GPU memory to plan with (e.g. 24G; default: this machine's, via nvidia-smi; 0 = none).
    #[arg(long, value_parser = parse_size_arg)]
    pub gpu_mem: Option<u64>,
    /// RAM to plan with (default: this machine's).
    #[arg(long, value_parser = parse_size_arg)]
    pub ram: Option<u64>,
    /// Context the KV state is sized for (default: the room the engine keeps for it when
    /// no --ctx is given, 65,536 tokens).
    #[arg(long, default_value_t = crate::engine::plan::DEFAULT_KV_ROOM)]
    pub ctx: usize,
    /// RAM read bandwidth in GB/s (default: measured now, a few seconds).
    #[arg(long)]
    pub cpu_gbs: Option<f64>,
    /// GPU memory bandwidth in GB/s (default 1000, an RTX 4090).
    #[arg(long, default_value_t = 1000.0)]
    pub gpu_gbs: f64,
    /// Host-to-GPU bandwidth in GB/s (default 25, PCIe 4.0 x16).
    #[arg(long, default_value_t = 25.0)]
    pub pcie_gbs: f64,
    /// Read bandwidth in GB/s of the drive holding the checkpoint, for the routed experts
    /// that do not fit in RAM (default 3, a typical NVMe drive; 0: none from disk).
    #[arg(long, visible_alias = "disk-bw", default_value_t = 3.0)]
    pub disk_gbs: f64,
    /// Expert usage profile (as `--expert-profile` of the other commands writes it): expert
    /// hits follow its counts instead of the release model's measured skew.
    #[arg(long, requires = "plan")]
    pub expert_profile: Option<std::path::PathBuf>,
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    crate::backend::sim::parse_size(s)
}

#[derive(Serialize, Debug)]
pub struct LayerInfo {
    pub layer: usize,
    pub name: String,
    pub compress_ratio: usize,
    pub attention: &'static str,
    pub routing: &'static str,
}

/// What `inspect` reports (the `--json` object).
#[derive(Serialize, Debug)]
pub struct InspectReport {
    pub model_dir: String,
    pub tensor_count: usize,
    pub total_bytes: u64,
    pub bytes_per_token: u64,
    pub shards: usize,
    pub dtype_counts: BTreeMap<String, usize>,
    pub components: BTreeMap<String, u64>,
    pub layers: Vec<LayerInfo>,
    pub extra_tensors: Vec<String>,
    /// The checkpoint's config.json as parsed.
    pub config: ModelConfig,
}

impl InspectReport {
    pub fn of(ck: &Checkpoint) -> Self {
        let cfg = &ck.config;
        let mut dtype_counts = BTreeMap::new();
        for e in ck.tensors.values() {
            *dtype_counts.entry(format!("{:?}", e.dtype)).or_insert(0) += 1;
        }
        // Components from the inventory, measured on the files' actual entries.
        let mut components: BTreeMap<String, u64> = Component::ALL
            .iter()
            .map(|c| (c.name().to_string(), 0))
            .collect();
        for spec in &ck.expected {
            if let Some(e) = ck.entry(&spec.name) {
                *components.entry(spec.component.name().into()).or_default() +=
                    (e.end - e.start) as u64;
            }
        }
        let extra_bytes: u64 = ck
            .extra
            .iter()
            .filter_map(|n| ck.entry(n))
            .map(|e| (e.end - e.start) as u64)
            .sum();
        if extra_bytes > 0 {
            components.insert("unused_extra".into(), extra_bytes);
        }
        let layers = (0..cfg.total_blocks())
            .map(|l| LayerInfo {
                layer: l,
                name: if l < cfg.num_hidden_layers {
                    format!("layers.{l}")
                } else {
                    format!("mtp.{}", l - cfg.num_hidden_layers)
                },
                compress_ratio: cfg.compress_ratio(l),
                attention: cfg.attn_kind(l).name(),
                routing: cfg.routing(l).name(),
            })
            .collect();
        InspectReport {
            model_dir: ck.dir.display().to_string(),
            tensor_count: ck.tensors.len(),
            total_bytes: ck.payload_bytes(),
            bytes_per_token: bytes_per_token(cfg, &ck.expected),
            shards: ck.shards.len(),
            dtype_counts,
            components,
            layers,
            extra_tensors: ck.extra.clone(),
            config: cfg.clone(),
        }
    }
}

/// 159609485896 -> "159,609,485,896".
pub fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn gib(n: u64) -> String {
    format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64)
}

pub fn run(a: &InspectArgs, verbose: bool) -> anyhow::Result<()> {
    if a.plan {
        return plan(a);
    }
    let dir = crate::hub::resolve_model(&a.model)?;
    let ck = match Checkpoint::open(&dir) {
        Ok(ck) => ck,
        Err(e) => {
            let all = e.problems();
            if verbose && all.len() > 1 {
                for p in &all {
                    eprintln!("  - {p}");
                }
            }
            return Err(e.into());
        }
    };
    if verbose && !ck.extra.is_empty() {
        eprintln!(
            "note: ignoring {} tensors the model does not use (first: {})",
            ck.extra.len(),
            ck.extra[0]
        );
    }
    let r = InspectReport::of(&ck);
    let mut out = std::io::stdout().lock();
    if a.json {
        serde_json::to_writer(&mut out, &r)?;
        writeln!(out)?;
        return Ok(());
    }
    let c = &ck.config;
    writeln!(out, "model       {}", r.model_dir)?;
    writeln!(
        out,
        "config      hidden {}, {} layers + {} MTP, {} heads x {} (rope {}), q_lora {}, o {} x {}, vocab {}",
        c.hidden_size,
        c.num_hidden_layers,
        c.num_nextn_predict_layers,
        c.num_attention_heads,
        c.head_dim,
        c.qk_rope_head_dim,
        c.q_lora_rank,
        c.o_groups,
        c.o_lora_rank,
        c.vocab_size
    )?;
    writeln!(
        out,
        "moe         {} routed experts (top-{}, x{}, {}) + {} shared, inter {}",
        c.n_routed_experts,
        c.num_experts_per_tok,
        c.routed_scaling_factor,
        c.scoring_func,
        c.n_shared_experts,
        c.moe_intermediate_size
    )?;
    writeln!(
        out,
        "attention   window {}, indexer top-{} ({} heads x {}), mHC x{} ({} Sinkhorn iters), context {}",
        c.sliding_window,
        c.index_topk,
        c.index_n_heads,
        c.index_head_dim,
        c.hc_mult,
        c.hc_sinkhorn_iters,
        c.max_position_embeddings
    )?;
    let count = |k: AttnKind| {
        (0..c.num_hidden_layers)
            .filter(|&l| c.attn_kind(l) == k)
            .count()
    };
    writeln!(
        out,
        "layers      {} sliding, {} CSA (ratio 4 + indexer), {} HCA (ratio 128); {} hash-routed",
        count(AttnKind::Window),
        count(AttnKind::Csa),
        count(AttnKind::Hca),
        c.num_hash_layers
    )?;
    for l in &r.layers {
        writeln!(
            out,
            "  {:<10} ratio {:>3}  {:<7} {} routing",
            l.name, l.compress_ratio, l.attention, l.routing
        )?;
    }
    let dt: Vec<String> = r
        .dtype_counts
        .iter()
        .map(|(k, v)| format!("{k} {}", thousands(*v as u64)))
        .collect();
    writeln!(
        out,
        "tensors     {} in {} shards ({})",
        thousands(r.tensor_count as u64),
        r.shards,
        dt.join(", ")
    )?;
    writeln!(
        out,
        "bytes       {} ({})",
        thousands(r.total_bytes),
        gib(r.total_bytes)
    )?;
    for (k, v) in &r.components {
        writeln!(out, "  {:<20} {:>19} ({})", k, thousands(*v), gib(*v))?;
    }
    writeln!(
        out,
        "per token   {} bytes read per decoded token at batch 1 ({})",
        thousands(r.bytes_per_token),
        gib(r.bytes_per_token)
    )?;
    if !ck.extra.is_empty() {
        writeln!(
            out,
            "unused      {} extra tensors ignored (--verbose lists the first)",
            ck.extra.len()
        )?;
    }
    Ok(())
}

/// `inspect --plan`: the memory plan and roofline prediction for this machine (or the three
/// reference machines with `--reference`).
fn plan(a: &InspectArgs) -> anyhow::Result<()> {
    use crate::engine::plan::{
        Machine, Overrides, Plan, plan_with, popularity_of, reference_machines,
    };
    use anyhow::bail;
    let (cfg, source) = match crate::hub::resolve_model(&a.model) {
        Ok(dir) => (
            ModelConfig::from_file(&dir.join("config.json"))?,
            format!("{}", dir.join("config.json").display()),
        ),
        Err(_) if a.model == crate::hub::DEFAULT_MODEL => (
            ModelConfig::from_json_bytes(
                include_str!("../../tests/fixtures/deepseek-v4-flash-config.json").as_bytes(),
                "built-in config.json",
            )?,
            format!("{} (built-in config; weights not downloaded)", a.model),
        ),
        Err(e) => return Err(e),
    };
    let machines = if a.reference {
        reference_machines()
    } else {
        let cpu_gbs = match a.cpu_gbs {
            Some(v) => v,
            None => crate::backend::cpu::probe::read_bandwidth(1 << 30, 2),
        };
        let gpu_mem = a.gpu_mem.unwrap_or_else(crate::download::total_vram);
        vec![Machine {
            name: "this machine".into(),
            gpu_mem,
            gpu_gbs: if gpu_mem > 0 { a.gpu_gbs } else { 0.0 },
            gpu_tflops: if gpu_mem > 0 { 200.0 } else { 0.0 },
            pcie_gbs: if gpu_mem > 0 { a.pcie_gbs } else { 0.0 },
            ram: a.ram.or_else(crate::download::total_ram).unwrap_or(0),
            cpu_gbs,
            cpu_tflops: 0.1 * rayon::current_num_threads() as f64,
            disk_gbs: a.disk_gbs,
        }]
    };
    let popularity = match &a.expert_profile {
        Some(p) => {
            match super::run::read_profile(p, cfg.num_hidden_layers, cfg.n_routed_experts)? {
                Some(counts) => Some(popularity_of(&counts)),
                None => bail!("--expert-profile {}: no such file", p.display()),
            }
        }
        None => None,
    };
    let plans: Vec<Plan> = machines
        .iter()
        .map(|m| {
            let o = Overrides {
                popularity: popularity.clone(),
                ..Default::default()
            };
            plan_with(&cfg, m, a.ctx, o)
        })
        .collect();
    let mut out = std::io::stdout().lock();
    if a.json {
        serde_json::to_writer(&mut out, &plans)?;
        writeln!(out)?;
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    writeln!(out, "config      {source}")?;
    for p in &plans {
        let m = &p.machine;
        writeln!(out)?;
        let gpu = if m.gpu_mem == 0 {
            "no GPU".to_string()
        } else {
            format!(
                "GPU {:.0} GiB at {:.0} GB/s, PCIe {:.0} GB/s",
                gib(m.gpu_mem),
                m.gpu_gbs,
                m.pcie_gbs
            )
        };
        writeln!(
            out,
            "{}: {gpu}, RAM {:.0} GiB at {:.0} GB/s, context {} tokens (--ctx)",
            m.name,
            gib(m.ram),
            m.cpu_gbs,
            p.ctx
        )?;
        for part in p.parts.iter().filter(|p| p.bytes > 0) {
            writeln!(
                out,
                "  {:<12} {:>8.2} GiB  {}",
                part.place,
                gib(part.bytes),
                part.what
            )?;
        }
        let disk = if p.disk_rate > 0.0 {
            format!(
                "; {:.0} % of expert selections from disk at {:.1} GB/s ({:.0} MB per token)",
                100.0 * p.disk_rate,
                m.disk_gbs,
                p.disk_bytes_per_token / 1e6
            )
        } else {
            String::new()
        };
        writeln!(
            out,
            "  GPU {:.1} GiB used; {:.1} GiB of weights outside the GPU{}{disk}",
            gib(p.gpu_bytes),
            gib(p.ram_bytes),
            if p.fits_in_ram {
                ""
            } else {
                " (more than RAM holds)"
            }
        )?;
        writeln!(
            out,
            "  predicted decode {:.1} tok/s, bound by {} (per token: GPU {:.1} ms, CPU {:.1} ms, syncs {:.1} ms, disk reads {:.1} ms beside the CPU), prefill {:.0} tok/s in chunks of {} (--prefill-chunk)",
            p.decode_tok_s,
            p.bound,
            1e3 * p.decode_split_s[0],
            1e3 * p.decode_split_s[1],
            1e3 * p.decode_split_s[2],
            1e3 * p.decode_split_s[3],
            p.prefill_tok_s,
            crate::engine::plan::PREFILL_CHUNK
        )?;
    }
    Ok(())
}
