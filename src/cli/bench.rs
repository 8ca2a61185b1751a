//! `dsflash bench [--json]`: this machine's read bandwidth and FMA peak, each kernel at the
//! real V4-Flash shapes with working sets far larger than the caches, and end-to-end decode
//! and prefill on a synthetic checkpoint with the real dimensions; every figure also as a
//! ratio to the bound measured in the same run.

use crate::backend::cpu::{Prepared, linear, probe};
use crate::engine::{Engine, Numerics, Session, Want};
use crate::model::synth::{SplitMix64, random_weight};
use crate::model::weights::Weight;
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// One JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Smaller buffers and fewer repetitions (a smoke run, not for reporting).
    #[arg(long)]
    pub quick: bool,
    /// Skip the end-to-end runs (they write a ~9 GB synthetic checkpoint once).
    #[arg(long)]
    pub kernels_only: bool,
    /// Only the peaks and the prefill-sized products (the `gemm` list).
    #[arg(long, conflicts_with = "kernels_only")]
    pub gemm_only: bool,
    /// Benchmark the CUDA GPU instead: matvec GB/s per format against the card's
    /// device-to-device copy bandwidth, and FP8 GEMM TFLOP/s at prefill batch sizes.
    #[arg(long)]
    pub gpu: bool,
    /// Benchmark hybrid decode instead: the real-dimension synthetic checkpoint placed on
    /// `--device` (dense weights resident, an adaptive expert cache in the rest), reporting
    /// tok/s, the cache's hit rate and the bytes moved per token.
    #[arg(long)]
    pub hybrid: bool,
    /// Device for --hybrid (auto, cuda or sim:<capacity>).
    #[arg(long, default_value = "auto", value_parser = clap::value_parser!(crate::backend::select::DeviceChoice))]
    pub device: crate::backend::select::DeviceChoice,
    /// Device memory cap for --hybrid (e.g. 24G).
    #[arg(long, value_parser = |s: &str| crate::backend::sim::parse_size(s))]
    pub gpu_mem: Option<u64>,
    /// Expert slots per layer for --hybrid (default: what the memory left holds; 0 = all
    /// experts on the CPU, 256 = all on the device).
    #[arg(long)]
    pub expert_slots: Option<usize>,
    /// Where the synthetic real-dimension checkpoint lives (created on first use).
    #[arg(long, default_value = ".cache/bench/flash-2layers")]
    pub synth_dir: PathBuf,
    /// Tokens prefilled before decode is timed: decode's attention reads more keys (and the
    /// indexer scores more rows) as the context grows, so this shows decode at a long
    /// prompt's length (e.g. 4096; prefilling it takes about a minute on two cores).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub context: u32,
    /// Decode with the routed experts capped to this much RAM (`--ram` of the other
    /// commands; the rest read from the files): the report adds the tier's hits, reads,
    /// bytes read and waits per token.
    #[arg(long, value_parser = |s: &str| crate::backend::sim::parse_size(s))]
    pub ram: Option<u64>,
}

#[derive(Serialize, Debug)]
pub struct KernelResult {
    pub name: String,
    pub gbs: f64,
    pub gflops: f64,
    /// Of `bound_gbs`.
    pub ratio: f64,
    /// The read bandwidth measured in passes alternating with this kernel's (best of them):
    /// the bound under the same neighbours.
    pub bound_gbs: f64,
    /// One thread on a matrix that stays in cache: the kernel's arithmetic ceiling per core.
    pub core_gbs: f64,
    /// Cores this kernel needs to reach the measured bandwidth (bandwidth / `core_gbs`).
    pub cores_to_saturate: f64,
    /// Every thread at once, each on rows that stay in its core's cache, in passes alternating
    /// with the kernel's (best of them): the arithmetic ceiling of all cores under the same
    /// neighbours. Where it is below `bound_gbs`, the kernel cannot reach the bound there.
    pub all_cores_in_cache_gbs: f64,
}

/// One prefill-sized product (`linear` with `tokens` inputs) at a real shape, the weight in
/// its stored format and the input as the default numerics give it.
#[derive(Serialize, Debug)]
pub struct GemmResult {
    pub name: String,
    pub format: String,
    pub rows: usize,
    pub cols: usize,
    pub tokens: usize,
    pub gflops: f64,
    /// The FMA peak measured right before and right after this product (the better): the
    /// ratios below are of the peaks measured there.
    pub fma_peak_gflops: f64,
    /// Of the fp32 FMA peak, the bf16 dot-product peak and the int8 dot-product peak (the
    /// last two where the CPU has the instructions).
    pub of_fma_peak: f64,
    pub of_bf16_peak: Option<f64>,
    pub of_int8_peak: Option<f64>,
}

#[derive(Serialize, Debug)]
pub struct Decode {
    /// Tokens in the context before the timed steps (`--context`).
    pub context: usize,
    pub tokens_per_s: f64,
    pub bytes_per_token: u64,
    /// Of `bound_gbs`.
    pub ratio: f64,
    /// The read bandwidth measured right before and right after the timed steps (the best of
    /// three passes each side).
    pub bound_gbs: f64,
    /// With `--ram`: what each tier served over the timed steps.
    pub tiers: Option<TierDecode>,
}

/// Per decoded token, over the timed steps of `bench --ram`.
#[derive(Serialize, Debug)]
pub struct TierDecode {
    pub ram_experts_per_layer: usize,
    /// Expert selections served from RAM and read from the files.
    pub ram_hits: f64,
    pub disk_reads: f64,
    pub disk_bytes: f64,
    /// Seconds the experts waited for reads.
    pub wait_s: f64,
}

/// One prefill chunk of `tokens` after `context - tokens` tokens of context.
#[derive(Serialize, Debug)]
pub struct Prefill {
    pub tokens: usize,
    /// Tokens in the context at the chunk's end. The ones before the chunk are stood for by
    /// state rows of random values (`Session::fill_context_for_bench`), not computed.
    pub context: usize,
    pub tokens_per_s: f64,
    /// Of the weight products (every matrix once per token, the routed ones k times; the head
    /// once per chunk, as prefill computes it): the attention's and the indexer's scores over
    /// the context are not counted.
    pub gflops: f64,
    /// Of the peak of the instructions the prefill products use (`bound`).
    pub ratio: f64,
    /// "bf16 dot peak" (AVX-512 BF16, inputs exactly bf16) or "FMA peak", measured right
    /// before and right after the chunk (the better).
    pub bound: String,
    pub bound_gflops: f64,
    /// Seconds per section of the forward pass over the chunk.
    pub sections: Vec<SectionTime>,
    /// Tokens per routed expert with tokens, over the chunk's MoE layers: each expert's
    /// weights are read once per chunk for that many tokens.
    pub tokens_per_expert: f64,
}

#[derive(Serialize, Debug)]
pub struct SectionTime {
    pub name: String,
    pub seconds: f64,
}

#[derive(Serialize, Debug)]
pub struct BenchReport {
    pub threads: usize,
    /// Measured first (best of several passes); each kernel and decode also carries the bound
    /// measured next to it (`bound_gbs`), which its ratio is of.
    pub read_bandwidth_gbs: f64,
    pub fma_peak_gflops: f64,
    /// AVX-512 BF16 dot-product peak, where the CPU has it.
    pub bf16_dot_peak_gflops: Option<f64>,
    /// AVX-512 VNNI int8 dot-product peak (2 ops per multiply-add), where the CPU has it.
    pub int8_dot_peak_gops: Option<f64>,
    pub kernels: Vec<KernelResult>,
    /// Prefill-sized products (batches of 64, 256 and 512 tokens).
    pub gemm: Vec<GemmResult>,
    pub decode: Option<Decode>,
    /// The same decode under `--numerics fast` (int8 inputs to the FP8/FP4 products).
    pub decode_fast: Option<Decode>,
    /// A chunk at each of the contexts 256, 8192 and 65536 (`--quick`: 64 tokens at 64).
    pub prefill: Option<Vec<Prefill>>,
    /// Reads from the bench model's drive: what `inspect --plan --disk-gbs` takes.
    pub disk: Option<crate::fsutil::DiskSpeed>,
}

/// Time matvecs over `copies` distinct matrices (so the working set exceeds the caches),
/// each pass after a pass of the read-bandwidth `probe`: the bound is the best probe pass of
/// those, measured under the same neighbours as the kernel. `shape` = (name, format, rows, cols).
fn bench_kernel(
    shape: (&str, &str, usize, usize),
    num: Numerics,
    min_bytes: usize,
    reps: usize,
    probe: &probe::ReadProbe,
    rng: &mut SplitMix64,
) -> KernelResult {
    let (name, kind, rows, cols) = shape;
    let one = random_weight(kind, rows, cols, rng).stored_bytes();
    let copies = min_bytes.div_ceil(one).max(1);
    let ws: Vec<Weight> = (0..copies)
        .map(|_| random_weight(kind, rows, cols, rng))
        .collect();
    // The input as the numerics hand it to an FP8/FP4 product (random values, so a block of
    // E4M3 inputs is not by chance on the int8 grid too).
    let x: Vec<f32> = (0..cols).map(|_| rng.uniform() - 0.5).collect();
    let x = num.gemm_input(&x, cols).into_owned();
    // Warm-up pass (page faults of the fresh buffers), then the best of `reps`.
    for w in &ws {
        std::hint::black_box(linear(w, &x, 1));
    }
    // The in-cache passes take the input prepared once (every matrix has the same columns).
    let prepared = Prepared::new(crate::backend::cpu::Kernels::Any, &ws[0], &x, 1);
    // NaN until a pass measures it (f64::max keeps the number), and where there is no
    // prepared input.
    let (mut best, mut bw, mut arith) = (f64::INFINITY, 0f64, f64::NAN);
    for _ in 0..reps {
        bw = bw.max(probe.pass());
        let t = Instant::now();
        for w in &ws {
            std::hint::black_box(linear(w, &x, 1));
        }
        best = best.min(t.elapsed().as_secs_f64());
        if let Some(p) = &prepared {
            arith = arith.max(all_cores_in_cache_gbs(&ws, p, rows));
        }
    }
    let bytes = (one * copies) as f64;
    let gbs = bytes / best / 1e9;
    let core_gbs = prepared
        .as_ref()
        .map_or(f64::NAN, |p| in_cache_gbs(&ws[0], p, rows, reps));
    KernelResult {
        name: match num {
            Numerics::Fast => format!("{name} {kind} {rows}x{cols} int8 in"),
            _ => format!("{name} {kind} {rows}x{cols}"),
        },
        gbs,
        gflops: 2.0 * (rows * cols * copies) as f64 / best / 1e9,
        ratio: gbs / bw,
        bound_gbs: bw,
        core_gbs,
        cores_to_saturate: bw / core_gbs,
        all_cores_in_cache_gbs: arith,
    }
}

/// The peaks of the arithmetic instructions (GFLOP/s; int8 in GOP/s).
#[derive(Clone, Copy)]
struct Peaks {
    fma: f64,
    bf16: Option<f64>,
    int8: Option<f64>,
}

impl Peaks {
    /// Each peak as the best of two short probes: on a shared host the neighbours take
    /// arithmetic too, and one probe can land in their burst.
    fn measure(seconds: f64) -> Peaks {
        let best = |f: &dyn Fn() -> Option<f64>| {
            let (a, b) = (f(), f());
            a.zip(b).map(|(a, b)| a.max(b))
        };
        Peaks {
            fma: best(&|| Some(probe::fma_peak(seconds))).unwrap_or(f64::NAN),
            bf16: best(&|| probe::bf16_dot_peak(seconds)),
            int8: best(&|| probe::int8_dot_peak(seconds)),
        }
    }

    /// `f` between two measurements of the peaks: its result, and the better of each peak
    /// (the ratios of what `f` timed are to the peaks measured right there).
    fn around<R>(seconds: f64, f: impl FnOnce() -> R) -> (R, Peaks) {
        let before = Peaks::measure(seconds);
        let r = f();
        (r, before.max(Peaks::measure(seconds)))
    }

    /// The better of two measurements of each peak.
    fn max(self, o: Peaks) -> Peaks {
        let m = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a.max(b));
        Peaks {
            fma: self.fma.max(o.fma),
            bf16: m(self.bf16, o.bf16),
            int8: m(self.int8, o.int8),
        }
    }
}

/// `linear` with `tokens` inputs on one weight of the shape (the product reads its weight
/// once per tile and reuses it across the tokens, so one matrix is the working set a prefill
/// chunk has): best of `reps` after a warm-up.
fn bench_gemm(
    shape: (&str, &str, usize, usize),
    tokens: usize,
    reps: usize,
    rng: &mut SplitMix64,
) -> GemmResult {
    let (name, kind, rows, cols) = shape;
    let w = random_weight(kind, rows, cols, rng);
    let x: Vec<f32> = (0..tokens * cols).map(|_| rng.uniform() - 0.5).collect();
    let x = Numerics::Reference.gemm_input(&x, cols).into_owned();
    std::hint::black_box(linear(&w, &x, tokens));
    let (best, peaks) = Peaks::around(0.1, || {
        let mut best = f64::INFINITY;
        for _ in 0..reps {
            let t = Instant::now();
            std::hint::black_box(linear(&w, &x, tokens));
            best = best.min(t.elapsed().as_secs_f64());
        }
        best
    });
    let gflops = 2.0 * (rows * cols * tokens) as f64 / best / 1e9;
    GemmResult {
        name: name.to_string(),
        format: kind.to_string(),
        rows,
        cols,
        tokens,
        gflops,
        fma_peak_gflops: peaks.fma,
        of_fma_peak: gflops / peaks.fma,
        of_bf16_peak: peaks.bf16.map(|p| gflops / p),
        of_int8_peak: peaks.int8.map(|p| gflops / p),
    }
}

/// The prefill products at the routed experts' and the attention's shapes, batches of 64, 256
/// and 512 tokens (`--quick`: 64 only).
fn gemm_list(a: &BenchArgs, rng: &mut SplitMix64) -> anyhow::Result<Vec<GemmResult>> {
    let tokens: &[usize] = if a.quick { &[64] } else { &[64, 256, 512] };
    let mut out = Vec::new();
    for shape in [
        ("expert w1/w3", "fp4", 2048, 4096),
        ("expert w2", "fp4", 4096, 2048),
        ("wq_a", "fp8", 1024, 4096),
        ("wq_b", "fp8", 32768, 1024),
        ("wo_b", "fp8", 4096, 8192),
    ] {
        for &n in tokens {
            super::signals::check()?;
            let r = bench_gemm(shape, n, if a.quick { 1 } else { 3 }, rng);
            let of = |name: &str, v: Option<f64>| {
                v.map_or(String::new(), |v| {
                    format!(", {:.0}% of the {name} peak", 100.0 * v)
                })
            };
            eprintln!(
                "  gemm {:<14} {} {:>5}x{:<5} n={:<4} {:>7.1} GFLOP/s: {:.0}% of the FMA peak ({:.0}){}{}",
                r.name,
                r.format,
                r.rows,
                r.cols,
                r.tokens,
                r.gflops,
                100.0 * r.of_fma_peak,
                r.fma_peak_gflops,
                of("bf16 dot", r.of_bf16_peak),
                of("int8 dot", r.of_int8_peak)
            );
            out.push(r);
        }
    }
    Ok(out)
}

/// The first rows of a matrix that fit in 256 KiB (so they stay in L2), and the bytes of one
/// row: the in-cache passes' working set.
fn cached_rows(w: &Weight, rows: usize) -> (usize, usize) {
    let row_bytes = w.stored_bytes() / rows;
    (((256usize << 10) / row_bytes).clamp(1, rows), row_bytes)
}

/// GB/s of one thread over the [`cached_rows`] of `w`: what the kernel's instructions allow
/// per core, with memory out of the way. The input `p` is prepared once, as a pass over whole
/// matrices amortizes it. Best of several passes.
fn in_cache_gbs(w: &Weight, p: &Prepared, rows: usize, reps: usize) -> f64 {
    let (n, row_bytes) = cached_rows(w, rows);
    let mut y = vec![0f32; n];
    let mut best = f64::INFINITY;
    for _ in 0..(4 * reps).max(4) {
        let t = Instant::now();
        for _ in 0..16 {
            p.rows_serial(w, 0..n, &mut y);
        }
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(&y);
    }
    (16 * n * row_bytes) as f64 / best / 1e9
}

/// GB/s of every thread of the pool at once, each on [`cached_rows`] of its own (a distinct
/// matrix, or distinct rows where there are fewer matrices than threads), the input `p`
/// prepared once: what the kernel's instructions allow on all cores together right now. On
/// a shared host the neighbours take arithmetic as well as bandwidth, so this ceiling moves
/// too and is measured next to each kernel pass.
fn all_cores_in_cache_gbs(ws: &[Weight], p: &Prepared, rows: usize) -> f64 {
    let (n, row_bytes) = cached_rows(&ws[0], rows);
    let slices = rows / n;
    const PASSES: usize = 32;
    let run = |passes: usize| {
        rayon::broadcast(|ctx| {
            let i = ctx.index();
            let r0 = (i / ws.len() % slices) * n;
            let mut y = vec![0f32; n];
            for _ in 0..passes {
                p.rows_serial(&ws[i % ws.len()], r0..r0 + n, &mut y);
            }
            std::hint::black_box(&y);
        })
    };
    run(1); // the rows into the caches
    let t = Instant::now();
    run(PASSES);
    (rayon::current_num_threads() * PASSES * n * row_bytes) as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// The real config cut to two layers (one CSA with hash routing, one HCA), no MTP.
fn two_layer_config() -> anyhow::Result<Vec<u8>> {
    let mut v: serde_json::Value = serde_json::from_str(include_str!(
        "../../tests/fixtures/deepseek-v4-flash-config.json"
    ))?;
    v["num_hidden_layers"] = 2.into();
    v["num_hash_layers"] = 1.into();
    v["num_nextn_predict_layers"] = 0.into();
    v["compress_ratios"] = serde_json::json!([4, 128]);
    Ok(serde_json::to_vec_pretty(&v)?)
}

/// Multiply-adds of the weight products per token: every dense matrix of the layers once, k
/// routed experts per layer; and those of the head, which prefill computes once per chunk.
fn macs_per_token(e: &Engine) -> (f64, f64) {
    let w = &e.weights;
    let k = e.cfg.num_experts_per_tok as f64;
    let head = (w.head.rows() * w.head.cols()) as f64;
    let mut macs = 0.0;
    let m = |x: &Weight| (x.rows() * x.cols()) as f64;
    for b in &w.layers {
        let a = &b.attn;
        macs +=
            m(&a.wq_a) + m(&a.wq_b) + m(&a.wkv) + m(&a.wo_a) / e.cfg.o_groups as f64 + m(&a.wo_b);
        if let Some(c) = &a.compressor {
            macs += m(&c.wkv) + m(&c.wgate);
        }
        if let Some(ix) = &a.indexer {
            macs +=
                m(&ix.wq_b) + m(&ix.weights_proj) + m(&ix.compressor.wkv) + m(&ix.compressor.wgate);
        }
        let f = &b.ffn;
        macs += m(&f.gate) + m(&f.shared.w1) + m(&f.shared.w2) + m(&f.shared.w3);
        macs += k * (m(&f.experts[0].w1) + m(&f.experts[0].w2) + m(&f.experts[0].w3));
    }
    (macs, head)
}

/// The 2-layer real-dimension checkpoint, written on first use.
fn ensure_synth(a: &BenchArgs) -> anyhow::Result<()> {
    let cfg = two_layer_config()?;
    let marker = a.synth_dir.join("model.safetensors.index.json");
    let same = std::fs::read(a.synth_dir.join("config.json")).is_ok_and(|c| c == cfg);
    if !(marker.exists() && same) {
        eprintln!(
            "bench: writing the 2-layer real-dimension checkpoint to {} (once, ~9 GB)",
            a.synth_dir.display()
        );
        let stop = super::signals::stop_flag();
        let r = crate::model::synth::synth(&cfg, &a.synth_dir, 1, false, &|| {
            stop.load(std::sync::atomic::Ordering::Relaxed)
        });
        super::signals::check()?;
        r?;
    }
    Ok(())
}

#[derive(Serialize, Debug)]
pub struct HybridReport {
    pub device: String,
    pub expert_slots_per_layer: usize,
    pub dense_resident: String,
    pub decode_tokens_per_s: f64,
    pub expert_hit_rate: f64,
    pub bytes_to_device_per_token: f64,
    pub bytes_to_host_per_token: f64,
    /// Device seconds per token copying and in kernels (modelled on the simulated device,
    /// measured with events on a GPU).
    pub copy_s_per_token: f64,
    pub kernel_s_per_token: f64,
    /// Measured wall-clock per token: device ops (copies and kernels) and products on the
    /// CPU (the two overlap: hits and misses run at the same time).
    pub device_s_per_token: f64,
    pub cpu_s_per_token: f64,
    /// Decode steps the device gave up (computed on the host instead; 0 when all is well).
    pub steps_redone_on_host: u64,
    /// The roofline prediction for this placement and the measured hit rate
    /// (`engine::plan`), with the device's and this machine's measured bandwidths.
    pub predicted_tokens_per_s: f64,
    /// decode_tokens_per_s / predicted_tokens_per_s.
    pub fraction_of_prediction: f64,
}

/// `dsflash bench --hybrid`: decode on the real-dimension checkpoint placed on a device.
fn hybrid(a: &BenchArgs) -> anyhow::Result<()> {
    ensure_synth(a)?;
    let mut e = Engine::open(&a.synth_dir, Numerics::Reference)?;
    let opened = crate::backend::select::open(&a.device);
    if let Some(n) = &opened.notice {
        eprintln!("{n}");
    }
    let dev = opened.device.ok_or_else(|| {
        anyhow::anyhow!("bench --hybrid: no device (use --device cuda or sim:24G)")
    })?;
    let (p, slots) = e.use_device_hybrid(
        dev.clone(),
        crate::engine::HybridOptions {
            policy: crate::engine::ExpertPolicy::Adaptive(None),
            slots: a.expert_slots,
            budget: a.gpu_mem,
            ctx: Some((a.context as usize + 64).max(4096)),
            chunk: 256,
        },
    )?;
    let steps = if a.quick { 4 } else { 32 };
    let mut before = None;
    let dt = timed_decode(&e, a.context as usize, steps, || {
        before = Some((dev.stats(), e.exec.experts.stats(), e.exec.timing.split()));
    })?;
    let (st0, ex0, tm0) = before.expect("timed_decode marks the start");
    let (st, ex, tm) = (dev.stats(), e.exec.experts.stats(), e.exec.timing.split());
    let sel = (ex.hits + ex.misses - ex0.hits - ex0.misses).max(1);
    let per = |v: f64| v / steps as f64;
    let hit_rate = (ex.hits - ex0.hits) as f64 / sel as f64;
    // The roofline for exactly this placement: measured RAM and device bandwidths, the
    // slots given and the hit rate seen.
    let machine = crate::engine::plan::Machine {
        name: dev.name(),
        gpu_mem: dev.capacity().min(a.gpu_mem.unwrap_or(u64::MAX)),
        gpu_gbs: dev.memory_gbs().unwrap_or(1000.0),
        gpu_tflops: 100.0,
        pcie_gbs: dev.link_gbs().unwrap_or(25.0),
        ram: crate::download::total_ram().unwrap_or(u64::MAX),
        cpu_gbs: probe::read_bandwidth(1 << 30, 2),
        cpu_tflops: 1.0,
        // The bench model is in RAM.
        disk_gbs: 0.0,
    };
    let predicted = crate::engine::plan::plan_with(
        &e.cfg,
        &machine,
        64,
        crate::engine::plan::Overrides {
            slots: Some(slots),
            hit_rate: Some(hit_rate),
            ..Default::default()
        },
    )
    .decode_tok_s;
    let r = HybridReport {
        device: dev.name(),
        expert_slots_per_layer: slots,
        dense_resident: format!("{} of {}", p.resident, p.total),
        decode_tokens_per_s: steps as f64 / dt,
        expert_hit_rate: hit_rate,
        bytes_to_device_per_token: per((st.bytes_to_device - st0.bytes_to_device) as f64),
        bytes_to_host_per_token: per((st.bytes_to_host - st0.bytes_to_host) as f64),
        copy_s_per_token: per(st.copy_s - st0.copy_s),
        kernel_s_per_token: per(st.kernel_s - st0.kernel_s),
        device_s_per_token: per(tm.device_s - tm0.device_s),
        cpu_s_per_token: per(tm.cpu_s - tm0.cpu_s),
        steps_redone_on_host: e.exec.timing.redone_steps(),
        predicted_tokens_per_s: predicted,
        fraction_of_prediction: (steps as f64 / dt) / predicted,
    };
    eprintln!(
        "bench --hybrid: {}: dense {} resident, {} expert slots/layer: {:.2} tok/s ({:.0} % of the {:.1} tok/s roofline), hit rate {:.1} %, {:.1} MB to the device and {:.2} MB back per token; per token {:.1} ms in device ops ({:.1} ms copying, {:.1} ms in kernels on the device), {:.1} ms of CPU products (overlapping); {} steps given up by the device",
        r.device,
        r.dense_resident,
        r.expert_slots_per_layer,
        r.decode_tokens_per_s,
        100.0 * r.fraction_of_prediction,
        r.predicted_tokens_per_s,
        100.0 * r.expert_hit_rate,
        r.bytes_to_device_per_token / 1e6,
        r.bytes_to_host_per_token / 1e6,
        1e3 * r.device_s_per_token,
        1e3 * r.copy_s_per_token,
        1e3 * r.kernel_s_per_token,
        1e3 * r.cpu_s_per_token,
        r.steps_redone_on_host
    );
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

/// `n` random token ids of `e`'s vocabulary (fixed seed).
fn random_tokens(e: &Engine, n: usize, seed: u64) -> Vec<u32> {
    let mut rng = SplitMix64::new(seed);
    let vocab = e.cfg.vocab_size as u64;
    (0..n).map(|_| (rng.next_u64() % vocab) as u32).collect()
}

/// Decode on `e`: a `context`-token prompt, 3 warm-up steps (first touches of the mmapped pages),
/// then `steps` timed ones; `start` runs just before the timed steps. Returns their seconds.
fn timed_decode(
    e: &Engine,
    context: usize,
    steps: usize,
    start: impl FnOnce(),
) -> anyhow::Result<f64> {
    let toks = random_tokens(e, context + 3 + steps, 5);
    let mut s = Session::new(e, (context + 3 + steps).max(1 << 16), 2048);
    s.prefill(&toks[..context], Want::Last)?;
    for &tk in &toks[context..context + 3] {
        s.decode_step(tk)?;
    }
    start();
    let t = Instant::now();
    for &tk in &toks[context + 3..] {
        s.decode_step(tk)?;
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Reads a byte of every 4 KB page of every tensor, through the mapping the engines share:
/// decode is timed at its steady state, with the weights in RAM and mapped (the kernel
/// benchmarks before it may have pushed the checkpoint out of the page cache, and a first
/// touch of each page costs a fault).
fn touch_every_page(ck: &crate::model::Checkpoint) -> anyhow::Result<()> {
    let mut sum = 0u8;
    for name in ck.tensors.keys() {
        let b = ck.bytes(name)?;
        sum = b.iter().step_by(4096).fold(sum, |s, &v| s.wrapping_add(v));
    }
    std::hint::black_box(sum);
    Ok(())
}

fn end_to_end(
    a: &BenchArgs,
    probe: &probe::ReadProbe,
) -> anyhow::Result<(Decode, Decode, Vec<Prefill>)> {
    ensure_synth(a)?;
    let ck = crate::model::Checkpoint::open(&a.synth_dir)?;
    // (With --ram the experts are read from the files: only the warm-up steps touch pages.)
    if a.ram.is_none() {
        touch_every_page(&ck)?;
    }
    let mut e = Engine::from_checkpoint(&ck, Numerics::Reference)?;
    let held = a.ram.map(|b| e.use_ram(b));
    let bytes_per_token =
        crate::model::layout::bytes_per_token(&e.cfg, &crate::model::layout::inventory(&e.cfg));
    let steps = if a.quick { 3 } else { 32 };
    let decode_with = |e: &Engine| -> anyhow::Result<Decode> {
        // Three probe passes right before the timed steps and three right after: one pass
        // alone can land in a neighbour's burst and read low.
        let mut before = 0f64;
        let ram = || e.ram_tier().map(|r| r.stats());
        let mut ram0 = None;
        let context = a.context as usize;
        let tps = steps as f64
            / timed_decode(e, context, steps, || {
                before = probe.best_of(3);
                ram0 = ram();
            })?;
        let bw = before.max(probe.best_of(3));
        let per = |v: f64| v / steps as f64;
        let tiers = match (held, ram0, ram()) {
            (Some(n), Some(r0), Some(r)) => Some(TierDecode {
                ram_experts_per_layer: n,
                ram_hits: per((r.hits - r0.hits) as f64),
                disk_reads: per((r.reads - r0.reads) as f64),
                disk_bytes: per((r.bytes_read - r0.bytes_read) as f64),
                wait_s: per(r.wait_s - r0.wait_s),
            }),
            _ => None,
        };
        Ok(Decode {
            context,
            tokens_per_s: tps,
            bytes_per_token,
            ratio: bytes_per_token as f64 * tps / (bw * 1e9),
            bound_gbs: bw,
            tiers,
        })
    };
    let decode = decode_with(&e)?;
    super::signals::check()?;
    let mut fast = Engine::from_checkpoint(&ck, Numerics::Fast)?;
    if let Some(b) = a.ram {
        fast.use_ram(b);
    }
    let decode_fast = decode_with(&fast)?;
    // Prefill: one chunk of n tokens in a fresh session, after contexts of 0, 8192 - n and
    // 65536 - n tokens (stood for by random state rows, which take the same work).
    let n = if a.quick { 64 } else { 256 };
    let contexts: &[usize] = if a.quick {
        &[0]
    } else {
        &[0, 8192 - n, 65536 - n]
    };
    let (body, head) = macs_per_token(&e);
    e.time_sections(true);
    let mut prefill = Vec::new();
    for (i, &before) in contexts.iter().enumerate() {
        super::signals::check()?;
        let mut s = Session::new(&e, before + n, n);
        s.fill_context_for_bench(before, 7 + i as u64);
        let p = random_tokens(&e, n, 6);
        let (timed, near) = Peaks::around(0.2, || {
            e.section_times(); // from zero
            let t = Instant::now();
            let r = s.prefill(&p, Want::Last);
            (r, t.elapsed().as_secs_f64(), e.section_times())
        });
        let (r, dt, split) = timed;
        r?;
        // Prefill runs on bf16 dot products where the CPU has them (the default numerics'
        // inputs are exactly bf16), so that is its bound there.
        let peak = match near.bf16 {
            Some(p) => (p, "bf16 dot peak"),
            None => (near.fma, "FMA peak"),
        };
        let gflops = 2.0 * (body * n as f64 + head) / dt / 1e9;
        prefill.push(Prefill {
            tokens: n,
            context: before + n,
            tokens_per_s: n as f64 / dt,
            gflops,
            ratio: gflops / peak.0,
            bound: peak.1.to_string(),
            bound_gflops: peak.0,
            sections: split
                .secs
                .into_iter()
                .map(|(name, seconds)| SectionTime {
                    name: name.to_string(),
                    seconds,
                })
                .collect(),
            tokens_per_expert: split.tokens_per_expert,
        });
    }
    e.time_sections(false);
    Ok((decode, decode_fast, prefill))
}

pub fn run(a: &BenchArgs) -> anyhow::Result<()> {
    if a.gpu {
        return gpu(a);
    }
    if a.hybrid {
        return hybrid(a);
    }
    // The probe reads as many bytes per pass as a kernel pass does (far more than the caches
    // hold), so neither is favoured by a shorter window on a noisy host.
    let (min, reps) = if a.quick {
        (64usize << 20, 2)
    } else {
        (512usize << 20, 6)
    };
    let read_probe = probe::ReadProbe::new(min);
    let bw = read_probe.best_of(reps);
    let peak = probe::fma_peak(if a.quick { 0.3 } else { 1.0 });
    let bf16_peak = probe::bf16_dot_peak(if a.quick { 0.3 } else { 1.0 });
    let int8_peak = probe::int8_dot_peak(if a.quick { 0.3 } else { 1.0 });
    eprintln!(
        "bench: read bandwidth {bw:.1} GB/s, FMA peak {peak:.1} GFLOP/s{}{} ({} threads)",
        bf16_peak.map_or(String::new(), |p| format!(", bf16 dot peak {p:.1} GFLOP/s")),
        int8_peak.map_or(String::new(), |p| format!(", int8 dot peak {p:.1} GOP/s")),
        rayon::current_num_threads()
    );
    let mut rng = SplitMix64::new(42);
    let kreps = if a.quick { 1 } else { 15 };
    let mut kernels = Vec::new();
    // The default numerics (reference: E4M3 inputs, bf16 dot products), and the FP4 experts
    // again under `--numerics fast` (int8 inputs, int8 dot products).
    let (rf, fast) = (Numerics::Reference, Numerics::Fast);
    let shapes = [
        (("expert w1/w3", "fp4", 2048, 4096), rf),
        (("expert w2", "fp4", 4096, 2048), rf),
        (("expert w1/w3", "fp4", 2048, 4096), fast),
        (("expert w2", "fp4", 4096, 2048), fast),
        (("wq_b", "fp8", 32768, 1024), rf),
        (("wo_b", "fp8", 4096, 8192), rf),
        (("shared w1/w3", "fp8", 2048, 4096), rf),
        (("head", "bf16", 129280, 4096), rf),
    ];
    for (shape, num) in shapes.into_iter().filter(|_| !a.gemm_only) {
        super::signals::check()?;
        let r = bench_kernel(shape, num, min, kreps, &read_probe, &mut rng);
        eprintln!(
            "  {:<32} {:>7.1} GB/s {:>7.1} GFLOP/s  {:>5.1}% of {:.1} GB/s   \
             (in cache: 1 core {:.1} GB/s, {:.1} cores saturate; all cores {:.1} GB/s)",
            r.name,
            r.gbs,
            r.gflops,
            r.ratio * 100.0,
            r.bound_gbs,
            r.core_gbs,
            r.cores_to_saturate,
            r.all_cores_in_cache_gbs
        );
        kernels.push(r);
    }
    let gemm = gemm_list(a, &mut rng)?;
    let (decode, decode_fast, prefill, disk) = if a.kernels_only || a.gemm_only {
        (None, None, None, None)
    } else {
        super::signals::check()?;
        let (d, df, p) = end_to_end(a, &read_probe)?;
        super::signals::check()?;
        for (what, d) in [("decode ", &d), ("  fast ", &df)] {
            eprintln!(
                "  {what} {:>7.2} tok/s x {:.2} GB/token = {:.1} GB/s, {:.1}% of {:.1} GB/s (context {})",
                d.tokens_per_s,
                d.bytes_per_token as f64 / 1e9,
                d.tokens_per_s * d.bytes_per_token as f64 / 1e9,
                d.ratio * 100.0,
                d.bound_gbs,
                d.context
            );
            if let Some(t) = &d.tiers {
                eprintln!(
                    "           per token: {:.1} experts from RAM ({} held per layer), {:.1} read from the files ({:.0} MB), {:.1} ms waited for reads",
                    t.ram_hits,
                    t.ram_experts_per_layer,
                    t.disk_reads,
                    t.disk_bytes / 1e6,
                    1e3 * t.wait_s
                );
            }
        }
        for p in &p {
            let total: f64 = p.sections.iter().map(|s| s.seconds).sum();
            let split: Vec<String> = p
                .sections
                .iter()
                .filter(|s| s.seconds > 0.0)
                .map(|s| format!("{} {:.0}%", s.name, 100.0 * s.seconds / total))
                .collect();
            eprintln!(
                "  prefill {:>7.1} tok/s, chunk {} at context {}: {:.1} GFLOP/s, {:.1}% of the {} \
                 ({:.0}); {:.1} tokens per expert; {}",
                p.tokens_per_s,
                p.tokens,
                p.context,
                p.gflops,
                p.ratio * 100.0,
                p.bound,
                p.bound_gflops,
                p.tokens_per_expert,
                split.join(", ")
            );
        }
        // Expert-sized reads (three matrices and scales: ~13.4 MB on the real model).
        let shards: Vec<std::path::PathBuf> = std::fs::read_dir(&a.synth_dir)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        let budget = std::time::Duration::from_secs_f64(if a.quick { 0.5 } else { 2.0 });
        let disk = crate::fsutil::disk_speed(&shards, 13_400_000, budget);
        match &disk {
            Some(s) => eprintln!(
                "  disk    {:>7.2} GB/s in reads of {:.1} MB, {:.2} ms per 4 KiB read{} (inspect --plan --disk-gbs)",
                s.read_gbs,
                s.chunk_bytes as f64 / 1e6,
                s.latency_ms,
                if s.direct {
                    ", O_DIRECT"
                } else {
                    ", page cache dropped"
                }
            ),
            None => eprintln!(
                "  disk    not measured (the bench model's files are sparse or too small)"
            ),
        }
        (Some(d), Some(df), Some(p), disk)
    };
    let report = BenchReport {
        threads: rayon::current_num_threads(),
        read_bandwidth_gbs: bw,
        fma_peak_gflops: peak,
        bf16_dot_peak_gflops: bf16_peak,
        int8_dot_peak_gops: int8_peak,
        kernels,
        gemm,
        decode,
        decode_fast,
        prefill,
        disk,
    };
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

#[derive(Serialize, Debug)]
pub struct GpuKernel {
    pub name: String,
    pub gbs: f64,
    /// Of the device-to-device copy bandwidth.
    pub ratio: f64,
}

#[derive(Serialize, Debug)]
pub struct GpuGemm {
    pub name: String,
    pub tokens: usize,
    pub tflops: f64,
}

#[derive(Serialize, Debug)]
pub struct GpuReport {
    pub device: String,
    pub copy_gbs: f64,
    pub kernels: Vec<GpuKernel>,
    pub gemm: Vec<GpuGemm>,
}

/// Seconds per launch of `op` (best of a few timed batches after a warm-up).
fn time_op(
    dev: &dyn crate::backend::device::Device,
    op: &crate::backend::device::Op,
    reps: usize,
) -> anyhow::Result<f64> {
    use crate::backend::device::Stream;
    dev.launch(op, Stream::COMPUTE)?;
    dev.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..reps {
            dev.launch(op, Stream::COMPUTE)?;
        }
        dev.synchronize()?;
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    Ok(best)
}

/// `dsflash bench --gpu`: the CUDA kernels at real V4-Flash shapes, stacked so each launch
/// streams far more than the L2 (e.g. the w1 of all 256 experts of a layer).
fn gpu(a: &BenchArgs) -> anyhow::Result<()> {
    use crate::backend::cuda::CudaDevice;
    use crate::backend::device::{Device, Op, Stream};
    let dev = CudaDevice::open(0).map_err(|e| anyhow::anyhow!("bench --gpu: {e}"))?;
    let reps = if a.quick { 3 } else { 10 };
    let copy = dev.copy_gbs(2 << 30, reps)?;
    eprintln!(
        "bench: {}: device-to-device copy {copy:.0} GB/s (read + write)",
        dev.name()
    );
    let mut rng = SplitMix64::new(9);
    let mut kernels = Vec::new();
    for (name, kind, rows, cols) in [
        ("256 experts' w1", "fp4", 256 * 2048, 4096),
        ("256 experts' w2", "fp4", 256 * 4096, 2048),
        ("8 layers' wq_b", "fp8", 8 * 32768, 1024),
        ("8 layers' wo_b", "fp8", 8 * 4096, 8192),
        ("head", "bf16", 129280, 4096),
    ] {
        super::signals::check()?;
        let w = random_weight(kind, rows, cols, &mut rng);
        let dw = dev.upload_weight(&w, Stream::COMPUTE)?;
        let x = dev.alloc(4 * cols)?;
        let y = dev.alloc(4 * rows)?;
        let op = Op::Linear {
            w: dw,
            rows: 0..rows,
            x,
            y,
            t: 1,
        };
        let dt = time_op(&dev, &op, reps)?;
        let gbs = w.stored_bytes() as f64 / dt / 1e9;
        let k = GpuKernel {
            name: format!("{kind} matvec {rows}x{cols} ({name})"),
            gbs,
            ratio: gbs / copy,
        };
        eprintln!(
            "  {:<44} {:>8.0} GB/s  {:>5.1}% of copy bandwidth",
            k.name,
            k.gbs,
            100.0 * k.ratio
        );
        kernels.push(k);
        dev.free(x);
        dev.free(y);
        dev.free_weight(dw);
    }
    let mut gemm = Vec::new();
    let (rows, cols) = (4096usize, 4096usize);
    let w = random_weight("fp8", rows, cols, &mut rng);
    let dw = dev.upload_weight(&w, Stream::COMPUTE)?;
    for t in [256usize, 1024, 4096] {
        let x = dev.alloc(4 * t * cols)?;
        let y = dev.alloc(4 * t * rows)?;
        let op = Op::Linear {
            w: dw,
            rows: 0..rows,
            x,
            y,
            t,
        };
        let dt = time_op(&dev, &op, reps)?;
        let g = GpuGemm {
            name: format!("fp8 gemm {rows}x{cols}"),
            tokens: t,
            tflops: 2.0 * (rows * cols * t) as f64 / dt / 1e12,
        };
        eprintln!("  {} at {t} tokens: {:.1} TFLOP/s", g.name, g.tflops);
        gemm.push(g);
        dev.free(x);
        dev.free(y);
    }
    dev.free_weight(dw);
    if a.json {
        let r = GpuReport {
            device: dev.name(),
            copy_gbs: copy,
            kernels,
            gemm,
        };
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}
