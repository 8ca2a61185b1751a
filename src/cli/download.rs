//! `dsflash download [--model REPO_ID] [--revision REV] [--dir PATH] [--force] [--extras]`

use crate::download::{Hub, Options, download};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct DownloadArgs {
    /// Repository id on the hub.
    #[arg(long, default_value = crate::hub::DEFAULT_MODEL)]
    pub model: String,
    /// Branch, tag or commit.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Put the files in this directory instead of the Hugging Face cache.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Download even if the pre-flight check says the disk or the memory is too small.
    #[arg(long)]
    pub force: bool,
    /// Also fetch the release's reference code and encoder (inference/, encoding/).
    #[arg(long)]
    pub extras: bool,
}

pub fn run(a: &DownloadArgs) -> anyhow::Result<i32> {
    let hub = Hub::from_env();
    let stop = super::signals::stop_flag();
    let o = Options {
        repo: a.model.clone(),
        revision: a.revision.clone(),
        dir: a.dir.clone(),
        force: a.force,
        extras: a.extras,
    };
    let r = download(&hub, &o, stop);
    // Interrupted: the partial files are kept for the next run, which resumes.
    if let Some(sig) = super::signals::received() {
        eprintln!("interrupted: run the same command again to resume");
        return Err(super::signals::Interrupted(sig).into());
    }
    let r = r?;
    eprintln!(
        "{}: {} files at {} ({} bytes fetched, {} already present) in {}",
        a.model,
        r.files,
        &r.commit[..r.commit.len().min(12)],
        r.bytes_fetched,
        r.already_present,
        r.location.display()
    );
    Ok(0)
}
