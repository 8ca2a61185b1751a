//! Resolving `--model`: a local directory, or a Hugging Face repo id looked up in the
//! standard hub cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`).

use std::path::{Path, PathBuf};

/// The official checkpoint.
pub const DEFAULT_MODEL: &str = "deepseek-ai/DeepSeek-V4-Flash";

/// The hub cache directory, by the ecosystem's environment conventions.
pub fn hub_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache").join("huggingface").join("hub")
}

/// Whether `--model` names a hub repo (not a path) that is missing from the cache.
pub fn missing_repo(arg: &str) -> bool {
    !Path::new(arg).exists() && looks_like_repo_id(arg) && resolve_model(arg).is_err()
}

fn looks_like_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// Turn `--model` into a checkpoint directory.
pub fn resolve_model(arg: &str) -> anyhow::Result<PathBuf> {
    let p = Path::new(arg);
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    if looks_like_repo_id(arg) {
        let cache = hf_hub::Cache::new(hub_cache_dir());
        if let Some(cfg) = cache.model(arg.to_string()).get("config.json")
            && let Some(dir) = cfg.parent()
        {
            return Ok(dir.to_path_buf());
        }
        anyhow::bail!(
            "--model {arg}: not in the Hugging Face cache at {}; download it with: dsflash download --model {arg}",
            hub_cache_dir().display()
        );
    }
    anyhow::bail!(
        "--model {arg}: no such directory (expected a checkpoint folder or a repo id like {DEFAULT_MODEL})"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        assert!(looks_like_repo_id("deepseek-ai/DeepSeek-V4-Flash"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("/abs"));
        assert!(!looks_like_repo_id("plain"));
    }
}
