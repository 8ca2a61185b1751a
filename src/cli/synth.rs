//! `dsflash synth --config FILE --out DIR [--seed N] [--sparse]`

use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// A config.json (any DeepSeek-V4 config; e.g. the real Flash config).
    #[arg(long)]
    pub config: PathBuf,
    /// Output directory (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed: the same seed writes the same bytes.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Leave payloads as holes (sparse files): the layout without the disk cost.
    #[arg(long)]
    pub sparse: bool,
}

pub fn run(a: &SynthArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(&a.config)
        .map_err(|e| anyhow::anyhow!("--config {}: cannot read: {e}", a.config.display()))?;
    let stop = super::signals::stop_flag();
    let r = crate::model::synth::synth(&bytes, &a.out, a.seed, a.sparse, &|| {
        stop.load(std::sync::atomic::Ordering::Relaxed)
    });
    super::signals::check()?;
    let r = r?;
    eprintln!(
        "wrote {}: {} tensors, {} payload bytes in {} shards{}",
        a.out.display(),
        r.tensors,
        r.payload_bytes,
        r.shards,
        if a.sparse { " (sparse)" } else { "" }
    );
    Ok(())
}
