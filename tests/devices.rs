//! The engine on a device: the simulated device (CPU memory with a capacity and a cost
//! clock) holds none, part or all of the model's matrices, and the logits are the oracle's
//! goldens every time, and bit-identical to the CPU-only engine (the device path must not
//! change a single product). Also `--device` on the command line.

mod common;
use common::*;
use dsflash::backend::device::Device;
use dsflash::backend::sim::{SimCost, SimDevice};
use dsflash::engine::{Engine, ExpertPolicy, HybridOptions, Numerics, Session, Want};
use std::sync::Arc;

const TOL: f32 = 1e-4;

fn prefill_logits(e: &Engine, ids: &[u32], chunk: usize) -> Vec<f32> {
    let mut s = Session::new(e, 1 << 20, chunk);
    s.prefill(ids, Want::All).expect("prefill")
}

/// Hybrid options with room for a 4k context and no memory cap.
fn hybrid(policy: ExpertPolicy, slots: Option<usize>) -> HybridOptions {
    HybridOptions {
        policy,
        slots,
        budget: None,
        ctx: Some(4096),
        chunk: 64,
    }
}

#[test]
fn sim_device_at_every_capacity_matches_goldens_and_cpu_bit_for_bit() {
    let dir = fixture("tiny-b");
    let g = goldens(&fixture("tiny-b/goldens.safetensors"))
        .into_iter()
        .find(|g| g.input_ids.len() > 100)
        .expect("a long golden prompt");
    let v;
    let cpu = {
        let e = Engine::open(&dir, Numerics::Ideal).expect("open");
        v = e.cfg.vocab_size;
        prefill_logits(&e, &g.input_ids, 64)
    };
    let (err, at) = max_rel_err(&cpu, &g.prefill_logits, v);
    assert!(err <= TOL, "cpu engine vs golden: {err:.2e} at {at}");
    let total: u64 = {
        let e = Engine::open(&dir, Numerics::Ideal).expect("open");
        e.weights
            .matrices()
            .iter()
            .map(|(_, w)| w.stored_bytes() as u64)
            .sum()
    };
    for (label, capacity) in [
        ("0 bytes", 0u64),
        ("a third", total / 3),
        ("all but the experts' last bytes", total - 1),
        ("everything", total + (8 << 20)),
    ] {
        let mut e = Engine::open(&dir, Numerics::Ideal).expect("open");
        let sim = Arc::new(SimDevice::new(capacity, SimCost::default()));
        let p = e.use_device(sim.clone()).expect("placement");
        match label {
            "0 bytes" => assert_eq!(p.resident, 0),
            "everything" => assert_eq!((p.resident, p.resident_bytes), (p.total, total)),
            _ => assert!(0 < p.resident && p.resident < p.total, "{label}: {p:?}"),
        }
        assert!(sim.in_use() <= capacity);
        let got = prefill_logits(&e, &g.input_ids, 64);
        assert!(
            same_bits(&got, &cpu),
            "{label}: device path changed the logits"
        );
        let (err, at) = max_rel_err(&got, &g.prefill_logits, v);
        assert!(err <= TOL, "{label}: {err:.2e} at {at}");
        let st = sim.stats();
        assert!(st.bytes_to_device >= p.resident_bytes, "{label}: {st:?}");
        if p.resident > 0 {
            assert!(st.launches > 0 && st.bytes_to_host > 0, "{label}: {st:?}");
            assert!(sim.elapsed() > 0.0);
        } else {
            assert_eq!(
                st.launches, 0,
                "{label}: nothing resident, nothing launched"
            );
        }
    }
}

#[test]
fn device_flag_cpu_sim_and_cuda_without_a_gpu() {
    let dir = fixture("tiny");
    let d = dir.to_str().expect("utf-8 path");
    // The same greedy ids on the CPU and on a simulated 64 MiB device.
    let args = |dev: &str| {
        run(&[
            "generate",
            "--model",
            d,
            "--tokens",
            "1,2,3,4,5",
            "--max-tokens",
            "6",
            "--ignore-eos",
            "--seed",
            "1",
            "--device",
            dev,
            "--numerics",
            "ideal",
        ])
    };
    let cpu = args("cpu");
    assert!(cpu.status.success(), "{}", stderr(&cpu));
    let sim = args("sim:64M");
    assert!(sim.status.success(), "{}", stderr(&sim));
    assert_eq!(stdout(&cpu), stdout(&sim));
    assert!(
        stderr(&sim).contains("simulated device"),
        "{}",
        stderr(&sim)
    );
    // No NVIDIA driver on CI: one notice line, then the CPU answer.
    if !dsflash::backend::cuda::driver_present() {
        let cuda = args("cuda");
        assert!(cuda.status.success(), "{}", stderr(&cuda));
        assert_eq!(stdout(&cuda), stdout(&cpu));
        let err = stderr(&cuda);
        let notice: Vec<&str> = err.lines().filter(|l| l.contains("CUDA")).collect();
        assert_eq!(notice.len(), 1, "{}", stderr(&cuda));
        assert!(notice[0].contains("running on the CPU"), "{}", notice[0]);
    }
    let bad = args("tpu");
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("--device"), "{}", stderr(&bad));
    let bad = args("sim:lots");
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("'lots' is not a size"),
        "{}",
        stderr(&bad)
    );
}

#[test]
fn expert_cache_at_every_size_keeps_logits_bit_identical() {
    let dir = fixture("tiny-b");
    let g = goldens(&fixture("tiny-b/goldens.safetensors"))
        .into_iter()
        .find(|g| g.input_ids.len() > 100)
        .expect("a long golden prompt");
    let e = Engine::open(&dir, Numerics::Ideal).expect("open");
    let v = e.cfg.vocab_size;
    let n_exp = e.cfg.n_routed_experts;
    e.exec.experts.record_routes(e.cfg.num_hidden_layers, n_exp);
    let cpu = prefill_logits(&e, &g.input_ids, 64);
    let trace = e.exec.experts.take_trace().expect("recorded");
    let distinct: std::collections::HashSet<_> = trace.accesses.iter().collect();
    for policy in [
        ExpertPolicy::Adaptive(None),
        ExpertPolicy::Lru,
        ExpertPolicy::Static(trace.counts()),
    ] {
        for slots in [0, 1, 4, n_exp / 2, n_exp] {
            let mut e = Engine::open(&dir, Numerics::Ideal).expect("open");
            let sim = Arc::new(SimDevice::new(1 << 30, SimCost::default()));
            let (p, s) = e
                .use_device_hybrid(sim.clone(), hybrid(policy.clone(), Some(slots)))
                .expect("placement");
            assert_eq!((p.resident, s), (p.total, slots), "dense part and head fit");
            let got = prefill_logits(&e, &g.input_ids, 64);
            let what = format!("{policy:?} with {slots} slots");
            assert!(
                same_bits(&got, &cpu),
                "{what}: the expert cache changed the logits"
            );
            let (err, at) = max_rel_err(&got, &g.prefill_logits, v);
            assert!(err <= TOL, "{what}: {err:.2e} at {at}");
            assert_eq!(
                e.exec.timing.redone_steps(),
                0,
                "{what}: the device ran every step"
            );
            let st = e.exec.experts.stats();
            assert_eq!(st.hits + st.misses, trace.accesses.len() as u64, "{what}");
            if slots == 0 {
                assert_eq!(st.hits, 0, "{what}");
            }
            if slots == n_exp && !matches!(policy, ExpertPolicy::Static(_)) {
                // Room for all: only each expert's first selection misses.
                assert_eq!(st.misses, distinct.len() as u64, "{what}");
            }
        }
    }
}

#[test]
fn cache_policies_against_lru_static_and_the_offline_optimum() {
    use common::traces::{belady, belady_pooled, hit_rate, skewed_trace, skewed_trace_per_layer};
    use dsflash::backend::expert_cache::{
        Adaptive, Lru, StaticFrequency, Trace, expert_popularity,
    };
    // Recorded traces from the tiny checkpoints, and a synthetic one with the real shape
    // (256 experts, top 6) and the measured skew, drifting over 4 topics.
    let mut traces: Vec<(String, Trace)> = Vec::new();
    for dir in ["tiny", "tiny-b", "tiny-c"] {
        let e = Engine::open(&fixture(dir), Numerics::Ideal).expect("open");
        e.exec
            .experts
            .record_routes(e.cfg.num_hidden_layers, e.cfg.n_routed_experts);
        for g in goldens(&fixture(&format!("{dir}/goldens.safetensors"))) {
            prefill_logits(&e, &g.input_ids, 64);
        }
        traces.push((
            dir.to_string(),
            e.exec.experts.take_trace().expect("recorded"),
        ));
    }
    let pop = expert_popularity(256);
    let synth = skewed_trace(&pop, 8, 6, 6000, 4, 11);
    traces.push(("synthetic 256x6, 4 topics".into(), synth));
    // Layers that differ in how many experts they use (8 vs 96, each evenly): equal slots
    // per layer leave the wide layers short and the narrow ones with idle slots.
    let uniform = |n: usize| -> Vec<f64> { (0..256).map(|i| f64::from(u8::from(i < n))).collect() };
    let mixed: Vec<Vec<f64>> = (0..8)
        .map(|l| if l % 2 == 0 { uniform(8) } else { uniform(96) })
        .collect();
    let mixed = skewed_trace_per_layer(&mixed, 6, 6000, 4, 12);
    traces.push(("synthetic, mixed layers".into(), mixed));
    println!(
        "| trace | slots | LRU | static (profile: first half) | adaptive | adaptive, rebalanced | Belady | Belady, pooled |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (name, t) in &traces {
        let half = Trace {
            accesses: t.accesses[..t.accesses.len() / 2].to_vec(),
            ..t.clone()
        };
        for frac in [0.125, 0.25, 0.5] {
            let slots = ((t.experts as f64 * frac) as usize).max(1);
            let n = t.accesses.len() as f64;
            let lru = hit_rate(&mut Lru::new(t.layers, slots), t);
            let stat = hit_rate(&mut StaticFrequency::from_counts(&half.counts(), slots), t);
            let ada = hit_rate(&mut Adaptive::new(t.layers, t.experts, slots, 256.0), t);
            let period = 64 * t.layers * 6;
            let mut rb = Adaptive::new(t.layers, t.experts, slots, 256.0).with_rebalancing(period);
            let reb = hit_rate(&mut rb, t);
            assert_eq!(
                rb.slots().iter().sum::<usize>(),
                t.layers * slots,
                "slots kept"
            );
            let opt = belady(t, slots) as f64 / n;
            let pooled = belady_pooled(t, t.layers * slots) as f64 / n;
            println!(
                "| {name} | {slots} of {} | {:.1} % | {:.1} % | {:.1} % | {:.1} % | {:.1} % | {:.1} % |",
                t.experts,
                100.0 * lru,
                100.0 * stat,
                100.0 * ada,
                100.0 * reb,
                100.0 * opt,
                100.0 * pooled
            );
            for (p, h) in [("LRU", lru), ("static", stat), ("adaptive", ada)] {
                assert!(
                    h <= opt + 1e-12,
                    "{name} {slots}: {p} {h} above the optimum {opt}"
                );
            }
            assert!(
                opt <= pooled + 1e-12 && reb <= pooled + 1e-12,
                "{name} {slots}: pooled bound"
            );
            if name.starts_with("synthetic 256x6") {
                assert!(
                    ada > lru,
                    "{name} {slots}: adaptive {ada} not above LRU {lru}"
                );
                // Moving slots never costs much, and pays where layers differ.
                assert!(
                    reb >= ada - 0.01,
                    "{name} {slots}: rebalanced {reb} vs {ada}"
                );
            }
            if name.contains("mixed") && slots < 96 {
                assert!(
                    reb >= ada + 0.03,
                    "{name} {slots}: rebalanced {reb} not above fixed {ada}"
                );
            }
        }
    }
}

#[test]
fn expert_profile_round_trip_and_gpu_mem_cap() {
    let dir = fixture("tiny");
    let d = dir.to_str().expect("utf-8 path");
    let tmp = tempfile::tempdir().expect("tempdir");
    let prof = tmp.path().join("experts.json");
    let p = prof.to_str().expect("utf-8 path");
    let generate = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            d,
            "--tokens",
            "1,2,3,4,5",
            "--max-tokens",
            "6",
            "--ignore-eos",
            "--seed",
            "1",
            "--numerics",
            "ideal",
            "--device",
            "sim:64M",
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    let total = |path: &std::path::Path| -> u64 {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path).expect("profile written")).expect("json");
        assert_eq!(
            (v["layers"].as_u64(), v["experts"].as_u64()),
            (Some(5), Some(8))
        );
        v["counts"]
            .as_array()
            .expect("counts")
            .iter()
            .flat_map(|r| {
                r.as_array()
                    .expect("row")
                    .iter()
                    .map(|c| c.as_u64().expect("u64"))
            })
            .sum()
    };
    let first = generate(&["--expert-profile", p]);
    assert!(first.status.success(), "{}", stderr(&first));
    // 5 prompt tokens + 5 decode steps (the 6th token is not fed back), 5 layers, top 2.
    assert_eq!(total(&prof), 10 * 5 * 2);
    let second = generate(&["--expert-profile", p]);
    assert!(second.status.success(), "{}", stderr(&second));
    assert_eq!(
        stdout(&second),
        stdout(&first),
        "a warm cache changes no answer"
    );
    assert_eq!(
        total(&prof),
        2 * 10 * 5 * 2,
        "the second session adds its selections"
    );
    // A profile for another model is refused with the file named.
    std::fs::write(
        &prof,
        r#"{"layers": 3, "experts": 8, "counts": [[0],[0],[0]]}"#,
    )
    .expect("write");
    let bad = generate(&["--expert-profile", p]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("experts.json") && stderr(&bad).contains("5 x 8"),
        "{}",
        stderr(&bad)
    );
    // --gpu-mem caps what the device holds: with 0, nothing is resident.
    let capped = generate(&["--gpu-mem", "0"]);
    assert!(capped.status.success(), "{}", stderr(&capped));
    assert!(stderr(&capped).contains(": 0 of "), "{}", stderr(&capped));
    assert_eq!(stdout(&capped), stdout(&first));
}

#[test]
fn whole_model_mode_runs_every_op_on_the_device_bit_identically() {
    // All three tiny checkpoints fully on a simulated device: every op of the forward pass
    // (norms, mHC, RoPE, routing, SwiGLU, indexer, attention) as a device op, with the
    // logits and the greedy continuation identical to the CPU engine's in all three numerics.
    for dir in ["tiny", "tiny-b", "tiny-c"] {
        for num in [Numerics::Ideal, Numerics::Reference, Numerics::Fast] {
            let g = goldens(&fixture(&format!("{dir}/goldens.safetensors")))
                .into_iter()
                .max_by_key(|g| g.input_ids.len())
                .expect("a golden prompt");
            let run_all = |e: &Engine| -> (Vec<f32>, Vec<u32>) {
                let mut s = Session::new(e, 1 << 20, 64);
                let l = s.prefill(&g.input_ids, Want::All).expect("prefill");
                let v = e.cfg.vocab_size;
                let mut last = l[l.len() - v..].to_vec();
                let mut toks = Vec::new();
                for _ in 0..8 {
                    let tok = argmax(&last);
                    toks.push(tok);
                    last = s.decode_step(tok).expect("decode");
                }
                (l, toks)
            };
            let cpu = run_all(&Engine::open(&fixture(dir), num).expect("open"));
            let mut e = Engine::open(&fixture(dir), num).expect("open");
            let sim = Arc::new(SimDevice::new(1 << 30, SimCost::default()));
            let p = e.use_device(sim.clone()).expect("placement");
            assert_eq!(p.resident, p.total);
            assert!(
                e.exec.whole_model(),
                "{dir}: everything fits, so every op is offloaded"
            );
            let dev = run_all(&e);
            assert_eq!(
                e.exec.timing.redone_steps(),
                0,
                "{dir} {num:?}: the device ran every step"
            );
            assert!(
                same_bits(&dev.0, &cpu.0),
                "{dir} {num:?}: whole-model logits differ from the CPU engine's"
            );
            assert_eq!(dev.1, cpu.1, "{dir} {num:?}: greedy continuation");
            // The same run with only the matrix products offloaded launches far fewer ops.
            let whole_launches = sim.stats().launches;
            let mut e2 = Engine::open(&fixture(dir), num).expect("open");
            let sim2 = Arc::new(SimDevice::new(1 << 30, SimCost::default()));
            e2.use_device(sim2.clone()).expect("placement");
            e2.exec.set_whole_model(false);
            let lin = run_all(&e2);
            assert_eq!(lin.1, cpu.1);
            assert!(
                whole_launches > 2 * sim2.stats().launches,
                "{dir}: {whole_launches} launches in whole-model mode vs {} for products only",
                sim2.stats().launches
            );
        }
    }
}

#[test]
fn streamed_prefill_follows_the_cost_model_and_changes_no_logit() {
    use dsflash::backend::exec::StreamCosts;

    let dir = fixture("tiny-b");
    let g = goldens(&fixture("tiny-b/goldens.safetensors"))
        .into_iter()
        .find(|g| g.input_ids.len() > 100)
        .expect("a long golden prompt");
    let one_chunk = g.input_ids.len();
    // The CPU engine's logits and its routing, all in one chunk.
    let e = Engine::open(&dir, Numerics::Ideal).expect("open");
    e.exec
        .experts
        .record_routes(e.cfg.num_hidden_layers, e.cfg.n_routed_experts);
    let cpu = prefill_logits(&e, &g.input_ids, one_chunk);
    let counts = e.exec.experts.take_trace().expect("trace").counts();
    let x = &e.weights.layers[0].ffn.experts[0];
    let bytes = (x.w1.stored_bytes() + x.w2.stored_bytes() + x.w3.stored_bytes()) as f64;
    let params = (x.w1.rows() * x.w1.cols() * 3) as f64;
    // Rates putting the break-even at 2.5 tokens: stream iff bytes / link < 2 n params / cpu.
    let cpu_gflops = 100.0;
    let link_gbs = bytes * cpu_gflops / (2.0 * 2.5 * params);
    let groups: Vec<u64> = counts
        .iter()
        .flatten()
        .copied()
        .filter(|&n| n > 0)
        .collect();
    let want_streamed = groups.iter().filter(|&&n| n >= 3).count() as u64;
    for (link, streamed, on_cpu) in [
        (link_gbs, want_streamed, groups.len() as u64 - want_streamed),
        (1e12, groups.len() as u64, 0),
        (1e-12, 0, groups.len() as u64),
    ] {
        let mut e = Engine::open(&dir, Numerics::Ideal).expect("open");
        let sim = Arc::new(SimDevice::new(1 << 30, SimCost::default()));
        e.use_device_hybrid(sim.clone(), hybrid(ExpertPolicy::Adaptive(None), Some(0)))
            .expect("placement");
        e.exec.experts.set_stream_costs(StreamCosts {
            link_gbs: link,
            cpu_gflops,
        });
        let before = e.exec.resident_bytes();
        let got = prefill_logits(&e, &g.input_ids, one_chunk);
        assert!(
            same_bits(&got, &cpu),
            "link {link}: streaming changed the logits"
        );
        assert_eq!(
            e.exec.timing.redone_steps(),
            0,
            "link {link}: the device ran every step"
        );
        let st = e.exec.experts.stats();
        assert_eq!(
            (st.streamed, st.on_cpu),
            (streamed, on_cpu),
            "link {link} GB/s"
        );
        // (Scratch buffers may have grown for the long chunk; the weights are as before.)
        assert_eq!(
            e.exec.resident_bytes(),
            before,
            "streamed experts are released after the chunk"
        );
    }
}

/// Decode `tokens` on both sessions; the logits must be equal bit for bit.
fn decode_both(a: &mut Session, b: &mut Session, tokens: &[u32], what: &str) {
    for &tok in tokens {
        let (x, y) = (
            a.decode_step(tok).expect("decode"),
            b.decode_step(tok).expect("decode"),
        );
        assert!(same_bits(&x, &y), "{what}: device and CPU logits differ");
    }
}

/// The KV cache on the device: in a hybrid placement (dense part resident, experts on the
/// CPU) the compressed KV rows and indexer keys stay on the device between steps, so what a
/// decode step copies there does not grow with the context; the logits equal the CPU
/// engine's bit for bit, also after a rewind cuts the rows back and new ones replace them.
#[test]
fn kv_rows_stay_on_the_device_and_decode_traffic_does_not_grow_with_context() {
    let dir = fixture("tiny");
    let ids: Vec<u32> = goldens(&fixture("tiny/goldens.safetensors"))
        .into_iter()
        .map(|g| g.input_ids)
        .max_by_key(|v| v.len())
        .expect("a golden prompt");
    assert!(ids.len() >= 500);
    let cpu_engine = Engine::open(&dir, Numerics::Reference).expect("open");
    let mut e = Engine::open(&dir, Numerics::Reference).expect("open");
    // (A simulated card that also counts reads: each one is a synchronisation.)
    let sim = Arc::new(TestCard::new(i64::MAX));
    e.use_device_hybrid(sim.clone(), hybrid(ExpertPolicy::Adaptive(None), Some(0)))
        .expect("placement");
    assert!(e.exec.whole_model(), "the dense part fits: device ops");
    let (mut dev_s, mut cpu_s) = (
        Session::new(&e, 4096, 64),
        Session::new(&cpu_engine, 4096, 64),
    );
    let same = |a: &[f32], b: &[f32], what: &str| {
        assert!(same_bits(a, b), "{what}: device and CPU logits differ");
    };
    // Bytes a decode step sends to the device, averaged over 16 steps (a compressed row is
    // completed every 4 or 128 tokens), after prefilling `n` tokens of the prompt (both past
    // the 128-token window, so the per-step window rows are the same).
    let mut per_step = Vec::new();
    let mut back_per_step = Vec::new();
    let mut reads_per_step = Vec::new();
    let mut fed = 0;
    // Reads a step may make (each one waits for the device): per layer one for the attention
    // site, one for a CSA layer's indexer choices, one for the MoE site's routing and input;
    // one for the logits.
    let csa = (0..e.cfg.num_hidden_layers)
        .filter(|&l| e.cfg.compress_ratio(l) == 4)
        .count();
    let step_reads = 2 * e.cfg.num_hidden_layers + csa + 1;
    for n in [200usize, 480] {
        let reads_before = sim.reads_left();
        let a = dev_s.prefill(&ids[fed..n], Want::Last).expect("prefill");
        same(
            &a,
            &cpu_s.prefill(&ids[fed..n], Want::Last).expect("prefill"),
            "prefill",
        );
        // A prefill chunk of 64 tokens reads no more than a decode step: the indexer's choices
        // for all its queries come back together.
        let chunks = (n - fed).div_ceil(64) as i64;
        let reads = reads_before - sim.reads_left();
        assert!(
            reads <= chunks * step_reads as i64,
            "{reads} reads for {chunks} prefill chunks"
        );
        let (before, before_back) = (sim.stats().bytes_to_device, sim.stats().bytes_to_host);
        let reads_before = sim.reads_left();
        for k in 0..16 {
            let tok = ids[n + k];
            let a = dev_s.decode_step(tok).expect("decode");
            same(&a, &cpu_s.decode_step(tok).expect("decode"), "decode");
        }
        per_step.push((sim.stats().bytes_to_device - before) / 16);
        back_per_step.push((sim.stats().bytes_to_host - before_back) / 16);
        reads_per_step.push((reads_before - sim.reads_left()) as f64 / 16.0);
        fed = n + 16;
    }
    let cfg = &e.cfg;
    // Compressed KV and indexer rows at a position: what a step would copy if they were not
    // kept on the device.
    let rows_bytes = |p: usize| -> u64 {
        (0..cfg.num_hidden_layers)
            .map(|l| {
                let r = cfg.compress_ratio(l);
                let n = p.checked_div(r).unwrap_or(0);
                let width = cfg.head_dim + if r == 4 { cfg.index_head_dim } else { 0 };
                (4 * n * width) as u64
            })
            .sum()
    };
    let regrowth = rows_bytes(496) - rows_bytes(216);
    eprintln!(
        "bytes to the device per decode step: {per_step:?}; compressed rows at 496: {}",
        rows_bytes(496)
    );
    // Each query's key list still grows by one 4-byte index per visible row.
    assert!(
        per_step[1].saturating_sub(per_step[0]) <= regrowth / 16,
        "per-step bytes to the device {per_step:?} grow with the context (re-copying the rows would add {regrowth})"
    );
    // Model parameters (norms, mHC matrices, sinks, RoPE tables) stay on the device too:
    // a step copies less than the compressed rows alone.
    assert!(
        per_step[1] < rows_bytes(496),
        "{per_step:?} vs {} of compressed rows",
        rows_bytes(496)
    );
    // The activations stay on the device: a decode step brings back the logits and, per
    // layer, only what the host needs: the new KV row (its window ring), the compressors'
    // inputs (their pooling state), the indexer's weights and top-k choice, the routing, and
    // (no expert slots here) the MoE input for the CPU's experts. Nothing of q, the
    // attention output, the residual streams or the expert activations.
    let (hd, ihd, k) = (cfg.head_dim, cfg.index_head_dim, cfg.num_experts_per_tok);
    let contract: usize = 4 * cfg.vocab_size
        + (0..cfg.num_hidden_layers)
            .map(|l| {
                let r = cfg.compress_ratio(l);
                let coff = if r == 4 { 2 } else { 1 };
                let comp = if r > 0 { 2 * coff * hd } else { 0 };
                let index = if r == 4 {
                    2 * coff * ihd + cfg.index_n_heads + cfg.index_topk
                } else {
                    0
                };
                4 * (hd + comp + index + 2 * k + cfg.hidden_size)
            })
            .sum::<usize>();
    let residual = 4 * cfg.hc_mult * cfg.hidden_size * cfg.num_hidden_layers;
    eprintln!(
        "bytes back per decode step: {back_per_step:?} (at most {contract}; residual streams of every layer {residual})"
    );
    for b in &back_per_step {
        assert!(
            *b <= contract as u64,
            "{back_per_step:?} bytes back per step, more than {contract}"
        );
    }
    // And it comes in few reads.
    let most = step_reads as f64;
    eprintln!("reads per decode step: {reads_per_step:?} (at most {most})");
    assert!(
        reads_per_step.iter().all(|&r| r <= most),
        "{reads_per_step:?} reads per step"
    );
    assert_eq!(e.exec.timing.redone_steps(), 0, "the device ran every step");
    // Rewind past completed rows, then continue differently: the device copies start over.
    let (md, mc) = (dev_s.mark(), cpu_s.mark());
    decode_both(&mut dev_s, &mut cpu_s, &ids[3..12], "before rewind");
    assert!(dev_s.rewind(&md) && cpu_s.rewind(&mc));
    decode_both(&mut dev_s, &mut cpu_s, &ids[40..49], "after rewind");
    // Where the time went: device ops and, with no expert slots, every routed expert on the
    // CPU; the CPU-only engine has no device time.
    let (ts, cpu_ts) = (e.exec.timing.split(), cpu_engine.exec.timing.split());
    assert!(ts.device_s > 0.0 && ts.cpu_s > 0.0, "{ts:?}");
    assert_eq!(cpu_ts.device_s, 0.0);
    // A finished session leaves no key tables behind.
    assert!(e.exec.tables.bytes() > 0);
    drop(dev_s);
    assert_eq!(e.exec.tables.bytes(), 0);
}

/// A simulated card with two faults a test can set: its driver breaks after `reads_left`
/// more transfers back to the host (every read from then on fails; launches keep "working",
/// so results computed on the device can no longer be fetched), and weight uploads wait
/// while `gate` is closed (a staging copy that takes as long as the test wants).
struct TestCard {
    dev: SimDevice,
    reads_left: std::sync::atomic::AtomicI64,
    /// The next this many allocations report no room.
    refuse_allocs: std::sync::atomic::AtomicI64,
    gate: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
}

impl TestCard {
    fn new(reads_left: i64) -> TestCard {
        TestCard {
            dev: SimDevice::new(1 << 30, SimCost::default()),
            reads_left: std::sync::atomic::AtomicI64::new(reads_left),
            refuse_allocs: std::sync::atomic::AtomicI64::new(0),
            gate: std::sync::Mutex::new(true),
            opened: std::sync::Condvar::new(),
        }
    }

    /// Reads still allowed (counts down by one per read).
    fn reads_left(&self) -> i64 {
        self.reads_left.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn set_gate(&self, open: bool) {
        *self.gate.lock().expect("gate") = open;
        self.opened.notify_all();
    }
}

impl Device for TestCard {
    fn name(&self) -> String {
        "failing card".into()
    }
    fn capacity(&self) -> u64 {
        self.dev.capacity()
    }
    fn in_use(&self) -> u64 {
        self.dev.in_use()
    }
    fn alloc(
        &self,
        bytes: usize,
    ) -> dsflash::backend::device::Result<dsflash::backend::device::Buf> {
        if self
            .refuse_allocs
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed)
            > 0
        {
            return Err(dsflash::backend::device::DeviceError::OutOfMemory {
                requested: bytes as u64,
                free: 0,
                capacity: self.dev.capacity(),
            });
        }
        self.dev.alloc(bytes)
    }
    fn free(&self, b: dsflash::backend::device::Buf) {
        self.dev.free(b)
    }
    fn write_at(
        &self,
        dst: dsflash::backend::device::Buf,
        offset: usize,
        src: &[u8],
        s: dsflash::backend::device::Stream,
    ) -> dsflash::backend::device::Result<()> {
        self.dev.write_at(dst, offset, src, s)
    }
    fn read(
        &self,
        src: dsflash::backend::device::Buf,
        dst: &mut [u8],
        s: dsflash::backend::device::Stream,
    ) -> dsflash::backend::device::Result<()> {
        if self
            .reads_left
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed)
            <= 0
        {
            dst.fill(0xFF); // a failed read may leave anything behind
            return Err(dsflash::backend::device::DeviceError::Backend(
                "CUDA_ERROR_ILLEGAL_ADDRESS".into(),
            ));
        }
        self.dev.read(src, dst, s)
    }
    fn upload_weight(
        &self,
        w: &dsflash::model::weights::Weight,
        s: dsflash::backend::device::Stream,
    ) -> dsflash::backend::device::Result<dsflash::backend::device::DevWeight> {
        let mut open = self.gate.lock().expect("gate");
        while !*open {
            open = self.opened.wait(open).expect("gate");
        }
        drop(open);
        self.dev.upload_weight(w, s)
    }
    fn free_weight(&self, w: dsflash::backend::device::DevWeight) {
        self.dev.free_weight(w)
    }
    fn run(
        &self,
        op: &dsflash::backend::device::Op,
        s: dsflash::backend::device::Stream,
    ) -> dsflash::backend::device::Result<()> {
        self.dev.run(op, s)
    }
    fn record(
        &self,
        s: dsflash::backend::device::Stream,
    ) -> dsflash::backend::device::Result<dsflash::backend::device::Event> {
        self.dev.record(s)
    }
    fn wait(
        &self,
        s: dsflash::backend::device::Stream,
        e: dsflash::backend::device::Event,
    ) -> dsflash::backend::device::Result<()> {
        self.dev.wait(s, e)
    }
    fn synchronize(&self) -> dsflash::backend::device::Result<()> {
        self.dev.synchronize()
    }
    fn stats(&self) -> dsflash::backend::device::Stats {
        self.dev.stats()
    }
}

/// A device that fails in the middle of a forward pass, wherever that falls (after 0 to a few
/// hundred good reads: inside attention, right after an mHC expand updated the residual
/// streams on the device, ...): the CPU takes over and the answer is the CPU engine's, bit
/// for bit.
#[test]
fn a_device_failing_mid_forward_never_changes_the_answer() {
    let dir = fixture("tiny");
    let ids: Vec<u32> = (1..40).collect();
    let cpu = prefill_logits(
        &Engine::open(&dir, Numerics::Reference).expect("open"),
        &ids,
        16,
    );
    for ok in [0i64, 1, 2, 3, 5, 8, 13, 40, 90, 200] {
        let mut e = Engine::open(&dir, Numerics::Reference).expect("open");
        let dev = Arc::new(TestCard::new(ok));
        e.use_device_hybrid(dev, hybrid(ExpertPolicy::Adaptive(None), Some(2)))
            .expect("placement");
        let got = prefill_logits(&e, &ids, 16);
        assert!(
            same_bits(&got, &cpu),
            "failure after {ok} reads changed the logits"
        );
    }
}

/// Expert promotions copy in the background: while the card's uploads are held up, decode
/// steps go on (the promoted experts run on the CPU meanwhile) with the CPU engine's logits;
/// once the copies land, the experts run on the device.
#[test]
fn decode_never_waits_for_a_promotion_copy() {
    let dir = fixture("tiny");
    let cpu_engine = Engine::open(&dir, Numerics::Reference).expect("open");
    let mut e = Engine::open(&dir, Numerics::Reference).expect("open");
    let card = Arc::new(TestCard::new(i64::MAX));
    let n_exp = e.cfg.n_routed_experts;
    e.use_device_hybrid(card.clone(), hybrid(ExpertPolicy::Lru, Some(n_exp)))
        .expect("placement");
    // The dense part is resident; from now on every upload waits for the gate.
    card.set_gate(false);
    let ids: Vec<u32> = (3..12).collect();
    let mut cpu_s = Session::new(&cpu_engine, 4096, 64);
    let want: Vec<Vec<f32>> = ids
        .iter()
        .map(|&t| cpu_s.decode_step(t).expect("decode"))
        .collect();
    let (tx, rx) = std::sync::mpsc::channel();
    let got = std::thread::scope(|sc| {
        let e = &e;
        let ids = &ids;
        let h = sc.spawn(move || {
            let mut s = Session::new(e, 4096, 64);
            let out: Vec<Vec<f32>> = ids
                .iter()
                .map(|&t| s.decode_step(t).expect("decode"))
                .collect();
            let _ = tx.send(());
            out
        });
        // Decoding must finish with the gate still closed (if it waited for a copy it
        // never would: the gate opens only after this wait gives up).
        let finished = rx.recv_timeout(std::time::Duration::from_secs(300)).is_ok();
        if !finished {
            card.set_gate(true);
            let _ = h.join();
            panic!("a decode step waited for a promotion copy");
        }
        let promotions_queued = e.exec.experts.stats().promotions;
        let resident_meanwhile = e.weights.layers[2]
            .ffn
            .experts
            .iter()
            .any(|x| e.exec.is_resident(&x.w1));
        card.set_gate(true);
        let out = h.join().expect("decode thread");
        assert!(promotions_queued > 0, "the cache promoted experts");
        assert!(
            !resident_meanwhile,
            "no expert can be resident before its copy was made"
        );
        out
    });
    for (k, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!(
            same_bits(a, b),
            "step {k}: logits differ from the CPU engine's"
        );
    }
    // The copies land: the experts are resident and run on the device from now on.
    e.exec.wait_promotions();
    assert!(
        e.weights.layers[2]
            .ffn
            .experts
            .iter()
            .any(|x| e.exec.is_resident(&x.w1)),
        "promoted experts are resident once their copies are made"
    );
    assert_eq!(e.exec.timing.redone_steps(), 0);
}

/// A prefill chunk the device finds no room for is computed on the host (same logits), and
/// later chunks that long go straight there instead of failing again; shorter steps (decode)
/// keep using the device.
#[test]
fn a_chunk_without_device_room_goes_to_the_host_once_and_for_all() {
    let dir = fixture("tiny");
    let ids: Vec<u32> = (1..60).collect();
    let cpu_engine = Engine::open(&dir, Numerics::Reference).expect("open");
    let mut e = Engine::open(&dir, Numerics::Reference).expect("open");
    let card = Arc::new(TestCard::new(i64::MAX));
    e.use_device_hybrid(card.clone(), hybrid(ExpertPolicy::Adaptive(None), Some(2)))
        .expect("placement");
    let (mut dev_s, mut cpu_s) = (
        Session::new(&e, 4096, 16),
        Session::new(&cpu_engine, 4096, 16),
    );
    // The first 16-token chunk meets a full card once.
    card.refuse_allocs
        .store(1, std::sync::atomic::Ordering::Relaxed);
    let a = dev_s.prefill(&ids[..16], Want::Last).expect("prefill");
    assert!(same_bits(
        &a,
        &cpu_s.prefill(&ids[..16], Want::Last).expect("prefill")
    ));
    assert_eq!(
        (e.exec.timing.redone_steps(), e.exec.timing.device_steps()),
        (1, 0)
    );
    // The next 16-token chunk is not tried on the device again; the 10-token one after it
    // still is.
    let a = dev_s.prefill(&ids[16..42], Want::Last).expect("prefill");
    assert!(same_bits(
        &a,
        &cpu_s.prefill(&ids[16..42], Want::Last).expect("prefill")
    ));
    assert_eq!(
        (e.exec.timing.redone_steps(), e.exec.timing.device_steps()),
        (1, 1)
    );
    // Decode runs on the device.
    decode_both(&mut dev_s, &mut cpu_s, &ids[42..50], "decode");
    assert_eq!(
        (e.exec.timing.redone_steps(), e.exec.timing.device_steps()),
        (1, 9)
    );
}
