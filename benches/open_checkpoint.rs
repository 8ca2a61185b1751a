//! Opening the full-size V4-Flash layout (synthesised sparse: 46 shards, 69,187 tensors,
//! 159.6 GB apparent): wall time and peak RSS, with the RSS growth reported as a fraction
//! of the weights' size (it must be tiny: headers only, no weight bytes are read or copied).
//!
//!     cargo bench --bench open_checkpoint

use dsflash::model::{Checkpoint, synth};
use std::time::Instant;

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    // `cargo test --all-targets` runs bench binaries without `--bench`: nothing to do then.
    if !std::env::args().any(|a| a == "--bench" || a == "--child") {
        return;
    }
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-data/flash-sparse");
    if !dir.join("model.safetensors.index.json").exists() {
        let cfg = std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/deepseek-v4-flash-config.json"),
        )
        .unwrap();
        synth::synth(&cfg, &dir, 0, true, &|| false).expect("synth");
    }
    let rss0 = status_kib("VmRSS:");
    let mut times = Vec::new();
    let mut payload = 0;
    for _ in 0..5 {
        let t = Instant::now();
        let ck = Checkpoint::open(&dir).expect("open");
        times.push(t.elapsed().as_secs_f64());
        payload = ck.payload_bytes();
    }
    let hwm = status_kib("VmHWM:");
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let growth = hwm.saturating_sub(rss0) * 1024;
    println!(
        "open_checkpoint/flash-sparse: median {:.3} s (min {:.3} s) over 5 opens",
        times[2], times[0]
    );
    println!(
        "  peak RSS {:.1} MiB (+{:.1} MiB over start) for {:.1} GB of weights: growth/weights = {:.2e}",
        hwm as f64 / 1024.0,
        growth as f64 / (1 << 20) as f64,
        payload as f64 / 1e9,
        growth as f64 / payload as f64
    );
}
