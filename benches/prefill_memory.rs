//! Peak memory of a long prefill on the tiny model: prompts of 1,024, 2,048 and 4,096 tokens
//! prefilled in chunks of 256, each in a fresh process. Reported: peak RSS above the loaded
//! engine, the KV state the session holds, and their difference (activations and scratch),
//! which must stay flat as the prompt grows: memory beyond the KV cache is bounded by the
//! chunk, not by the prompt.
//!
//!     cargo bench --bench prefill_memory

use dsflash::engine::{Engine, Numerics, Session, Want};
use std::process::Command;

fn kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn child(n: usize, chunk: usize) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny");
    let e = Engine::open(&dir, Numerics::Reference).expect("open");
    let mut rng = dsflash::model::synth::SplitMix64::new(1);
    let toks: Vec<u32> = (0..n)
        .map(|_| (rng.next_u64() % e.cfg.vocab_size as u64) as u32)
        .collect();
    // Touch the weights once so their pages count in the baseline, not in the prefill.
    let mut warm = Session::new(&e, 16, 16);
    warm.prefill(&toks[..4], Want::Last).expect("warm-up");
    drop(warm);
    let base = kib("VmRSS:");
    let mut s = Session::new(&e, n, chunk);
    let t = std::time::Instant::now();
    s.prefill(&toks, Want::Last).expect("prefill");
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{n} {} {} {}",
        kib("VmHWM:").saturating_sub(base) * 1024,
        s.state_bytes(),
        secs
    );
}

fn main() {
    // `cargo test --all-targets` runs bench binaries without `--bench`: nothing to do then.
    if !std::env::args().any(|a| a == "--bench" || a == "--child") {
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    if let (Some("--child"), Some(n), Some(c)) =
        (args.get(1).map(String::as_str), args.get(2), args.get(3))
    {
        child(n.parse().unwrap(), c.parse().unwrap());
        return;
    }
    let chunk = 256;
    println!("prefill_memory/tiny (chunk {chunk}):");
    println!(
        "{:>7} {:>14} {:>14} {:>16} {:>9}",
        "tokens", "peak-base MiB", "kv state MiB", "peak-kv MiB", "tok/s"
    );
    for n in [1024usize, 2048, 4096] {
        let o = Command::new(&args[0])
            .args(["--child", &n.to_string(), &chunk.to_string()])
            .output()
            .expect("child");
        let line = String::from_utf8_lossy(&o.stdout);
        let f: Vec<f64> = line
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0.0))
            .collect();
        if f.len() < 4 {
            eprintln!("child failed: {}", String::from_utf8_lossy(&o.stderr));
            continue;
        }
        let mib = |b: f64| b / (1 << 20) as f64;
        println!(
            "{:>7} {:>14.1} {:>14.1} {:>16.1} {:>9.0}",
            n,
            mib(f[1]),
            mib(f[2]),
            mib(f[1] - f[2]),
            n as f64 / f[3]
        );
    }
}
