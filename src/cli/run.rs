//! `dsflash logits` and `dsflash generate`: the fidelity interfaces (token ids in, logits or
//! ids out; no tokenizer needed).

use crate::backend::select::DeviceChoice;
use crate::engine::sampler::{Sampler, SamplerConfig};
use crate::engine::{Engine, Numerics, Session, Want};
use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use std::io::Write;
use std::path::PathBuf;

/// Options shared by everything that runs the model.
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// Checkpoint directory or Hugging Face repo id (resolved in the local hub cache).
    #[arg(short = 'm', long, default_value = crate::hub::DEFAULT_MODEL)]
    pub model: String,
    /// Context cap in tokens (default: the model's maximum). The KV cache grows in blocks
    /// as needed up to this; a longer prompt is refused before any compute.
    #[arg(short = 'c', long)]
    pub ctx: Option<usize>,
    /// Prefill chunk size in tokens: activation memory is bounded by the chunk.
    #[arg(long, default_value_t = crate::engine::plan::PREFILL_CHUNK as u64, value_parser = parse_chunk)]
    pub prefill_chunk: u64,
    /// `reference`: the official code's QAT roundings (FP8 activations and KV, FP4 indexer);
    /// `ideal`: plain fp32 on the dequantized weights (transformers' semantics); `fast`:
    /// ideal with int8 inputs to the FP8/FP4 products (int8 dot products on the CPU).
    #[arg(long, value_enum, default_value_t = Numerics::Reference)]
    pub numerics: Numerics,
    /// Where the model's matrices run: `auto` (a CUDA GPU when one is usable, else the CPU),
    /// `cpu`, `cuda`, or `sim:<capacity>` (a simulated device, e.g. sim:24G). Whatever does
    /// not fit on the device runs on the CPU; a GPU that cannot be used gives a notice.
    #[arg(long, default_value = "auto", value_parser = clap::value_parser!(DeviceChoice))]
    pub device: DeviceChoice,
    /// Device memory to use at most (e.g. 20G; default: what the device has free, less a
    /// reserve).
    #[arg(long, value_parser = parse_size_arg)]
    pub gpu_mem: Option<u64>,
    /// Expert usage profile: read at start (the expert cache starts with its hot set) and
    /// written back at exit with this session's selections added.
    #[arg(long)]
    pub expert_profile: Option<PathBuf>,
    /// RAM the weights may take (e.g. 48G): the routed experts that do not fit are read from
    /// the files when selected instead of left to the page cache. `auto`: all mapped when
    /// the weights fit in the available RAM, else that RAM less 1 GiB; `off`: all mapped.
    #[arg(long, default_value = "auto", value_parser = parse_ram)]
    pub ram: RamChoice,
}

/// `--ram`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RamChoice {
    Auto,
    Off,
    Size(u64),
}

fn parse_ram(s: &str) -> Result<RamChoice, String> {
    match s.trim() {
        "auto" => Ok(RamChoice::Auto),
        "off" => Ok(RamChoice::Off),
        s => parse_size_arg(s)
            .map(RamChoice::Size)
            .map_err(|e| format!("{e} (or auto, off)")),
    }
}

/// What `--ram auto` leaves for the process besides the weights: activations, KV rows,
/// reads in flight.
const RAM_AUTO_RESERVE: u64 = 1 << 30;

/// `--ram auto`: the budget for weights of `weights` bytes when `available` bytes of RAM are
/// available; None (all mapped) when they fit.
fn auto_ram_budget(weights: u64, available: u64) -> Option<u64> {
    let room = available.saturating_sub(RAM_AUTO_RESERVE);
    (weights > room).then_some(room)
}

fn parse_chunk(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(_) => Err("must be at least 1 token".into()),
        Err(_) => Err(format!("{s:?} is not a number of tokens")),
    }
}

pub(crate) fn parse_size_arg(s: &str) -> Result<u64, String> {
    crate::backend::sim::parse_size(s)
}

/// Selections per [layer][expert] from an `--expert-profile` file made for `layers` x
/// `experts` (None if the file does not exist yet).
pub(crate) fn read_profile(
    path: &std::path::Path,
    layers: usize,
    experts: usize,
) -> anyhow::Result<Option<Vec<Vec<u64>>>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => bail!("--expert-profile {}: {err}", path.display()),
    };
    let p: ExpertProfile = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "--expert-profile {}: not a profile written by dsflash",
            path.display()
        )
    })?;
    let (l, x) = (layers, experts);
    if p.layers != l
        || p.experts != x
        || p.counts.len() != l
        || p.counts.iter().any(|r| r.len() != x)
    {
        bail!(
            "--expert-profile {}: made for {} layers x {} experts, this model has {l} x {x}",
            path.display(),
            p.layers,
            p.experts
        );
    }
    Ok(Some(p.counts))
}

/// `--expert-profile` file contents.
#[derive(serde::Serialize, serde::Deserialize)]
struct ExpertProfile {
    layers: usize,
    experts: usize,
    /// Selections per [layer][expert].
    counts: Vec<Vec<u64>>,
}

impl EngineArgs {
    pub fn open(&self) -> anyhow::Result<Engine> {
        let dir = crate::hub::resolve_model(&self.model)?;
        self.open_dir(&dir)
    }

    /// Open the checkpoint at `dir` and place it on the chosen device.
    pub fn open_dir(&self, dir: &std::path::Path) -> anyhow::Result<Engine> {
        let mut e = Engine::open(dir, self.numerics)?;
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let budget = match self.ram {
            RamChoice::Off => None,
            RamChoice::Size(b) => Some((b, format!("--ram {:.2} GiB", gib(b)))),
            RamChoice::Auto => crate::download::available_ram().and_then(|avail| {
                let weights = e.weight_bytes();
                auto_ram_budget(weights, avail).map(|b| {
                    let why = format!(
                        "the weights ({:.1} GiB) exceed the available RAM ({:.1} GiB; --ram SIZE or off to choose)",
                        gib(weights),
                        gib(avail)
                    );
                    (b, why)
                })
            }),
        };
        if let Some((b, why)) = budget {
            let n = e.use_ram(b);
            eprintln!(
                "dsflash: {why}: {n} of {} routed experts per layer held in RAM, the others read from the files when selected",
                e.cfg.n_routed_experts
            );
            if let Some(counts) = self.read_profile(&e)?
                && let Some(r) = &e.ram_tier()
            {
                r.seed(&counts);
            }
        }
        let opened = crate::backend::select::open(&self.device);
        if let Some(n) = opened.notice {
            eprintln!("{n}");
        }
        if let Some(dev) = opened.device {
            let name = dev.name();
            // Dense weights and head resident; the routed experts through the adaptive cache
            // in whatever device memory is left.
            let warm = self.read_profile(&e)?;
            let (p, slots) = e.use_device_hybrid(
                dev,
                crate::engine::HybridOptions {
                    policy: crate::engine::ExpertPolicy::Adaptive(warm),
                    slots: None,
                    budget: self.gpu_mem,
                    ctx: self.ctx,
                    chunk: self.prefill_chunk as usize,
                },
            )?;
            // Streamed prefill: the link as measured, the CPU at half its FMA peak (what its
            // quantized GEMMs reach on a chunk), both measured at the first prefill chunk.
            if let Some(dev) = e.exec.device().cloned() {
                e.exec.experts.set_stream_costs_with(move || {
                    Some(crate::backend::exec::StreamCosts {
                        link_gbs: dev.link_gbs()?,
                        cpu_gflops: 0.5 * crate::backend::cpu::probe::fma_peak(0.05),
                    })
                });
            }
            eprintln!(
                "dsflash: {name}: {} of {} dense matrices ({:.2} of {:.2} GiB) resident, expert cache of {slots} of {} per layer, the rest on the CPU",
                p.resident,
                p.total,
                gib(p.resident_bytes),
                gib(p.total_bytes),
                e.cfg.n_routed_experts
            );
        }
        Ok(e)
    }

    /// The `--expert-profile` counts when the file exists (a missing file is a first run).
    fn read_profile(&self, e: &Engine) -> anyhow::Result<Option<Vec<Vec<u64>>>> {
        match &self.expert_profile {
            Some(path) => read_profile(path, e.cfg.num_hidden_layers, e.cfg.n_routed_experts),
            None => Ok(None),
        }
    }

    /// At exit: write the expert usage profile back (atomically), if one was asked for.
    pub fn finish(&self, e: &Engine) -> anyhow::Result<()> {
        let (l, x) = (e.cfg.num_hidden_layers, e.cfg.n_routed_experts);
        // The device's expert cache sees every selection; without one, the RAM tier does.
        let counts = (e.exec.experts.counts()).or_else(|| e.ram_tier().map(|r| r.counts(l, x)));
        let (Some(path), Some(mut counts)) = (&self.expert_profile, counts) else {
            return Ok(());
        };
        counts.resize(l, Vec::new());
        counts.iter_mut().for_each(|r| r.resize(x, 0));
        let p = ExpertProfile {
            layers: l,
            experts: x,
            counts,
        };
        crate::fsutil::write_atomic(path, &serde_json::to_vec(&p)?)
            .with_context(|| format!("--expert-profile {}", path.display()))
    }

    pub fn session<'e>(&self, e: &'e Engine) -> anyhow::Result<Session<'e>> {
        let max = e.cfg.max_position_embeddings;
        let ctx = self.ctx.unwrap_or(max);
        if ctx == 0 || ctx > max {
            return Err(usage(format!(
                "--ctx {ctx}: must be between 1 and the model's maximum context {max}"
            )));
        }
        Ok(Session::new(e, ctx, self.prefill_chunk as usize))
    }
}

fn usage(msg: String) -> anyhow::Error {
    super::Usage(msg).into()
}

/// Parse `--tokens 1,2,3`.
pub fn parse_tokens(s: &str) -> anyhow::Result<Vec<u32>> {
    let ids: Result<Vec<u32>, _> = s
        .split(',')
        .map(|t| t.trim())
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>()
                .map_err(|_| usage(format!("--tokens: {t:?} is not a token id")))
        })
        .collect();
    let ids = ids?;
    if ids.is_empty() {
        return Err(usage(
            "--tokens: no token ids given (expected e.g. --tokens 0,123,456)".into(),
        ));
    }
    Ok(ids)
}

/// Sampling options (defaults from the model card: temperature 1.0, top-p 1.0).
#[derive(Args, Debug, Clone)]
pub struct SamplerArgs {
    /// Sampling temperature; 0 = greedy.
    #[arg(
        long,
        visible_alias = "temp",
        default_value_t = 1.0,
        allow_negative_numbers = true
    )]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this total probability (1 = off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Drop tokens less likely than min-p times the most likely one (0 = off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub min_p: f32,
    /// Seed of the sampler: the same seed gives the same output (default: a random one,
    /// shown by --verbose and in --json).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Repetition penalty on recently seen tokens (1 = off, the default).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repeat_penalty: f32,
    /// How many recent tokens the repetition penalty considers.
    #[arg(long, default_value_t = 256)]
    pub repeat_last_n: usize,
}

impl SamplerArgs {
    pub fn config(&self) -> anyhow::Result<SamplerConfig> {
        // NaN fails every comparison, so it is refused too.
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(usage(format!(
                "--temperature {}: must be >= 0",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(usage(format!("--top-p {}: must be in (0, 1]", self.top_p)));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(usage(format!("--min-p {}: must be in [0, 1]", self.min_p)));
        }
        if !(self.repeat_penalty > 0.0 && self.repeat_penalty.is_finite()) {
            return Err(usage(format!(
                "--repeat-penalty {}: must be > 0 (1 = off)",
                self.repeat_penalty
            )));
        }
        Ok(SamplerConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed: self.seed.unwrap_or_else(random_seed),
            logit_bias: Vec::new(),
        })
    }
}

/// A seed nobody chose: the standard library's per-process random keys, hashed with the time.
pub(crate) fn random_seed() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now())
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq)]
pub enum Positions {
    All,
    Last,
}

#[derive(Args, Debug)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Prompt token ids, comma-separated.
    #[arg(long)]
    pub tokens: String,
    /// Output file: float32 NumPy array [T, vocab] (T = 1 with --positions last).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value_t = Positions::All)]
    pub positions: Positions,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq)]
pub enum Format {
    /// Comma-separated token ids on one line.
    Ids,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Prompt token ids, comma-separated.
    #[arg(long)]
    pub tokens: String,
    /// Tokens to generate (generation also stops at the end-of-sequence id).
    #[arg(short = 'n', long, default_value_t = 256)]
    pub max_tokens: usize,
    #[command(flatten)]
    pub sampling: SamplerArgs,
    /// Keep generating past the end-of-sequence id.
    #[arg(long)]
    pub ignore_eos: bool,
    #[arg(long, value_enum, default_value_t = Format::Ids)]
    pub format: Format,
}

/// The prefill's progress bar on stderr (hidden when stderr is not a terminal): tokens,
/// rate, time left.
pub fn prefill_bar(tokens: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(tokens as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "prefill {bar:30} {pos}/{len} tokens {per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// Prefill with a progress bar on stderr (hidden when stderr is not a terminal).
pub fn prefill(s: &mut Session, tokens: &[u32], want: Want) -> anyhow::Result<Vec<f32>> {
    let bar = prefill_bar(tokens.len());
    // Nothing is written before the prefill ends: a signal exits at once (no flag to poll).
    let _at_once = super::signals::AtOnce::new();
    let out = s.prefill_with_progress(tokens, want, |done| {
        bar.set_position(done as u64);
        true
    });
    bar.finish_and_clear();
    Ok(out?)
}

/// Write a float32 [rows, cols] array as a NumPy .npy file (v1.0), atomically.
pub fn write_npy(
    path: &std::path::Path,
    data: &[f32],
    rows: usize,
    cols: usize,
) -> anyhow::Result<()> {
    let mut header =
        format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {cols}), }}");
    // magic (6) + version (2) + length (2) + header + '\n' must be a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut buf = Vec::with_capacity(10 + header.len() + data.len() * 4);
    buf.extend_from_slice(b"\x93NUMPY\x01\x00");
    buf.extend_from_slice(&(header.len() as u16).to_le_bytes());
    buf.extend_from_slice(header.as_bytes());
    for v in data {
        buf.extend_from_slice(&v.to_le_bytes());
    }
    crate::fsutil::write_atomic(path, &buf).with_context(|| format!("--out {}", path.display()))
}

pub fn logits(a: &LogitsArgs) -> anyhow::Result<()> {
    let tokens = parse_tokens(&a.tokens)?;
    let e = a.engine.open()?;
    let mut s = a.engine.session(&e)?;
    let want = if a.positions == Positions::All {
        Want::All
    } else {
        Want::Last
    };
    let l = prefill(&mut s, &tokens, want)?;
    let v = e.cfg.vocab_size;
    // A signal during the prefill's last chunk: nothing half-done is written.
    super::signals::check()?;
    write_npy(&a.out, &l, l.len() / v, v)?;
    a.engine.finish(&e)
}

pub fn generate(a: &GenerateArgs) -> anyhow::Result<()> {
    let tokens = parse_tokens(&a.tokens)?;
    let mut sampler = Sampler::new(a.sampling.config()?);
    let e = a.engine.open()?;
    let mut s = a.engine.session(&e)?;
    let eos = e.cfg.eos_token_id;
    let mut logits = prefill(&mut s, &tokens, Want::Last)?;
    let mut out = std::io::stdout().lock();
    // Ends the line on every way out (a signal, an error), then passes the result on.
    let end = |out: &mut std::io::StdoutLock, r: anyhow::Result<()>| -> anyhow::Result<()> {
        let nl = writeln!(out).and_then(|_| out.flush());
        super::signals::line_open(false);
        r.and(nl.map_err(Into::into))
    };
    for i in 0..a.max_tokens {
        if let Err(sig) = super::signals::check() {
            return end(&mut out, Err(sig.into()));
        }
        let tok = sampler.sample_after(&logits, s.tokens());
        if i > 0 {
            write!(out, ",")?;
        }
        write!(out, "{tok}")?;
        out.flush()?;
        super::signals::line_open(true);
        if (tok == eos && !a.ignore_eos) || i + 1 == a.max_tokens {
            break;
        }
        match s.decode_step(tok) {
            Ok(l) => logits = l,
            Err(err) => return end(&mut out, Err(err.into())),
        }
    }
    end(&mut out, Ok(()))?;
    a.engine.finish(&e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_auto_maps_what_fits_and_budgets_what_does_not() {
        const G: u64 = 1 << 30;
        // 149 GiB of weights (the release) on a 64 GB box with 60 GiB available: 59 GiB.
        assert_eq!(auto_ram_budget(149 * G, 60 * G), Some(59 * G));
        // The same weights with 160 GiB available: mapped.
        assert_eq!(auto_ram_budget(149 * G, 160 * G), None);
        // Fits only with the reserve ignored: budgeted.
        assert_eq!(
            auto_ram_budget(149 * G, 149 * G + G / 2),
            Some(148 * G + G / 2)
        );
        // Less than the reserve available: a budget of nothing (every expert read).
        assert_eq!(auto_ram_budget(10 * G, G / 2), Some(0));
        assert_eq!(parse_ram("auto"), Ok(RamChoice::Auto));
        assert_eq!(parse_ram("off"), Ok(RamChoice::Off));
        assert_eq!(parse_ram("48G"), Ok(RamChoice::Size(48 * G)));
        assert!(parse_ram("lots").is_err());
    }
}
