//! The prompt cache's options (`--no-cache`, `--cache-dir`, `--cache-max`) and
//! `dsflash cache list|clear`.

use crate::prefix_cache::{self, PrefixCache};
use clap::{Args, Subcommand};
use std::path::PathBuf;

/// Where decode states are kept between runs (see `prefix_cache`).
#[derive(Args, Debug, Clone)]
pub struct CacheArgs {
    /// Do not use the prompt cache on disk (neither read nor write it).
    #[arg(long)]
    pub no_cache: bool,
    /// The prompt cache's directory (default: $XDG_CACHE_HOME/dsflash, else ~/.cache/dsflash).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Most disk the prompt cache may use (e.g. 16G); the least recently used states are
    /// removed first.
    #[arg(long, value_name = "SIZE", default_value = "16G", value_parser = parse_size)]
    pub cache_max: u64,
}

fn parse_size(s: &str) -> Result<u64, String> {
    crate::backend::sim::parse_size(s)
}

/// `--cache-dir`, else the default (None: no home directory to put it in).
fn dir(d: &Option<PathBuf>) -> Option<PathBuf> {
    d.clone().or_else(PrefixCache::default_dir)
}

impl CacheArgs {
    /// The cache, unless turned off or there is nowhere to put it.
    pub fn open(&self, verbose: bool) -> Option<PrefixCache> {
        if self.no_cache {
            return None;
        }
        Some(PrefixCache::new(
            dir(&self.cache_dir)?,
            self.cache_max,
            verbose,
        ))
    }
}

#[derive(Args, Debug)]
pub struct CacheCmdArgs {
    #[command(subcommand)]
    pub action: Action,
    /// The prompt cache's directory (default: $XDG_CACHE_HOME/dsflash, else ~/.cache/dsflash).
    #[arg(long, value_name = "DIR", global = true)]
    pub cache_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Action {
    /// Show the kept states: size, last use, tokens and steps, the engine.
    List,
    /// Remove every kept state.
    Clear,
}

pub fn run(a: &CacheCmdArgs) -> anyhow::Result<()> {
    let Some(root) = dir(&a.cache_dir) else {
        anyhow::bail!("no cache directory: set --cache-dir, XDG_CACHE_HOME or HOME");
    };
    match a.action {
        Action::List => {
            let entries = prefix_cache::list(&root);
            let now = std::time::SystemTime::now();
            let mut total = 0;
            for e in &entries {
                total += e.bytes;
                let age = now.duration_since(e.modified).unwrap_or_default().as_secs();
                let what = match &e.header {
                    Some(h) => format!(
                        "{:>8} tokens in {:>6} steps  {}",
                        h.tokens,
                        h.n_steps,
                        h.identity
                            .split(" | ")
                            .skip(1)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    None => "(not a readable state file)".into(),
                };
                println!(
                    "{:>9.1} MB  {:>6} ago  {what}  {}",
                    e.bytes as f64 / 1e6,
                    ago(age),
                    e.path.display()
                );
            }
            println!(
                "{} states, {:.1} MB in {}",
                entries.len(),
                total as f64 / 1e6,
                root.display()
            );
        }
        Action::Clear => {
            let (n, bytes) = prefix_cache::clear(&root)?;
            println!(
                "removed {n} files ({:.1} MB) from {}",
                bytes as f64 / 1e6,
                root.display()
            );
        }
    }
    Ok(())
}

/// Seconds as a short age ("42s", "5m", "3h", "2d").
fn ago(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}
