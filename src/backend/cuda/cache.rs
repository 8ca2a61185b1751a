//! CUBINs compiled by NVRTC, cached on disk so the compile happens once per machine:
//! `$XDG_CACHE_HOME/dsflash/kernels` (or `~/.cache/dsflash/kernels`), one file per unit,
//! named by the hash of the unit's source with every header, the GPU architecture and the
//! driver version. Written atomically; a corrupt or stale file only costs a recompile.

use super::nvrtc::{self, NvrtcError};
use super::sources::{HEADERS, Source};
use sha2::{Digest, Sha256};
use std::path::PathBuf;

pub fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("dsflash").join("kernels"))
}

/// The cache file name of `unit` for `sm_<arch>` under driver version `driver`.
pub fn cache_name(unit: &Source, arch: u32, driver: i32) -> String {
    let mut h = Sha256::new();
    h.update(unit.text.as_bytes());
    for hd in HEADERS {
        h.update(hd.name.as_bytes());
        h.update(hd.text.as_bytes());
    }
    let hex: String = h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let stem = unit.name.trim_end_matches(".cu");
    format!("{stem}-{hex}-sm{arch}-drv{driver}.cubin")
}

/// The CUBIN of `unit` for `sm_<arch>`: from the cache, or compiled now (and cached).
/// Returns whether it was compiled.
pub fn load_or_compile(
    unit: &Source,
    arch: u32,
    driver: i32,
) -> Result<(Vec<u8>, bool), NvrtcError> {
    load_or_compile_in(cache_dir(), unit, arch, driver)
}

/// [`load_or_compile`] with the cache in `dir` (None: no cache).
pub fn load_or_compile_in(
    dir: Option<PathBuf>,
    unit: &Source,
    arch: u32,
    driver: i32,
) -> Result<(Vec<u8>, bool), NvrtcError> {
    let path = dir.map(|d| d.join(cache_name(unit, arch, driver)));
    if let Some(p) = &path
        && let Ok(b) = std::fs::read(p)
        && b.starts_with(b"\x7fELF")
    {
        return Ok((b, false));
    }
    let c = nvrtc::compile(unit, arch)?;
    if let Some(p) = &path {
        // A read-only home only costs the cache.
        let _ = p
            .parent()
            .map(std::fs::create_dir_all)
            .map(|_| crate::fsutil::write_atomic(p, &c.cubin));
    }
    Ok((c.cubin, true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::sources::KERNELS;

    #[test]
    fn names_change_with_source_arch_and_driver() {
        let u = &KERNELS[0];
        let a = cache_name(u, 89, 12080);
        assert!(
            a.starts_with("gemv-") && a.ends_with("-sm89-drv12080.cubin"),
            "{a}"
        );
        assert_ne!(a, cache_name(u, 90, 12080));
        assert_ne!(a, cache_name(u, 89, 12090));
        let edited = Source {
            name: u.name,
            text: "// edited\n",
        };
        assert_ne!(a, cache_name(&edited, 89, 12080));
    }
}
