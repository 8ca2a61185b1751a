//! The CUDA sources of `kernels/`, embedded in the binary: NVRTC compiles them on the user's
//! machine, so the build needs no CUDA toolkit.

/// One embedded file of `kernels/`.
#[derive(Debug, Clone, Copy)]
pub struct Source {
    /// File name in `kernels/` (what `#include "..."` names for headers).
    pub name: &'static str,
    pub text: &'static str,
}

macro_rules! embed {
    ($($f:literal),* $(,)?) => {
        &[$(Source { name: $f, text: include_str!(concat!("../../../kernels/", $f)) }),*]
    };
}

/// Headers the kernels include (`#include "common.cuh"`), handed to NVRTC by name.
pub const HEADERS: &[Source] = embed!["common.cuh"];

/// Compilation units, one per op family. Each compiles on its own.
pub const KERNELS: &[Source] = embed![
    "gemv.cu",
    "gemm.cu",
    "norm.cu",
    "act.cu",
    "router.cu",
    "sample.cu",
    "attention.cu",
    "hyper.cu",
    "indexer.cu",
    "compressor.cu",
    "quant.cu",
];

/// The unit that defines `kernel` (an `extern "C" __global__` name).
pub fn unit_of(kernel: &str) -> Option<&'static Source> {
    let needle = format!(" {kernel}(");
    KERNELS
        .iter()
        .find(|s| s.text.contains(&needle) && s.text.contains("__global__"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_file_is_embedded_verbatim() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .expect("kernels/ exists")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".cu") || n.ends_with(".cuh"))
            .collect();
        on_disk.sort();
        let mut embedded: Vec<String> = HEADERS
            .iter()
            .chain(KERNELS)
            .map(|s| s.name.to_string())
            .collect();
        embedded.sort();
        assert_eq!(embedded, on_disk, "kernels/ and the embedded list differ");
        for s in HEADERS.iter().chain(KERNELS) {
            let text = std::fs::read_to_string(dir.join(s.name)).expect("readable");
            assert_eq!(s.text, text, "{} embedded text is stale", s.name);
        }
    }

    #[test]
    fn units_of_named_kernels() {
        assert_eq!(unit_of("gemv_fp4").map(|s| s.name), Some("gemv.cu"));
        assert_eq!(unit_of("route_topk").map(|s| s.name), Some("router.cu"));
        assert!(unit_of("no_such_kernel").is_none());
    }
}
