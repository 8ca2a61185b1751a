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

/// A kernel parameter as a launch passes it: a device pointer (u64), an `int` (i32) or a
/// `float` (f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    Ptr,
    Int,
    Float,
}

/// Every `extern "C" __global__` kernel of the compilation units with its parameters, read
/// from the sources: the one statement of each kernel's arguments, which launches are
/// checked against (`CudaDevice`'s `Launch`). An error names a parameter of another type.
pub fn signatures() -> Result<Vec<(&'static str, Vec<Param>)>, String> {
    let mut out = Vec::new();
    for unit in KERNELS {
        for rest in unit.text.split("extern \"C\" __global__ void ").skip(1) {
            let (name, params) = rest
                .split_once('(')
                .ok_or_else(|| format!("{}: a kernel without parameters", unit.name))?;
            let params = params
                .split_once(')')
                .map(|p| p.0)
                .ok_or_else(|| format!("{}: {name}: unterminated parameters", unit.name))?;
            // Comments inside the list end at the line's end.
            let text: String = params
                .lines()
                .map(|l| l.split("//").next().unwrap_or(""))
                .collect::<Vec<_>>()
                .join(" ");
            let kinds = text
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let words: Vec<&str> = p.split_whitespace().collect();
                    let ty = &words[..words.len().saturating_sub(1)];
                    match () {
                        _ if p.contains('*') => Ok(Param::Ptr),
                        _ if ty.last() == Some(&"int") => Ok(Param::Int),
                        _ if ty.last() == Some(&"float") => Ok(Param::Float),
                        _ => Err(format!("{}: {name}: parameter '{p}'", unit.name)),
                    }
                })
                .collect::<Result<Vec<Param>, String>>()?;
            out.push((name.trim(), kinds));
        }
    }
    Ok(out)
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
    fn every_kernel_signature_parses() {
        use Param::{Float, Int, Ptr};
        let sigs = signatures().expect("every parameter is a pointer, an int or a float");
        let of = |k: &str| sigs.iter().find(|s| s.0 == k).map(|s| s.1.clone());
        // Two read by hand from kernels/norm.cu and kernels/act.cu.
        assert_eq!(of("rms_norm"), Some(vec![Ptr, Ptr, Ptr, Int, Float]));
        assert_eq!(of("axpy"), Some(vec![Ptr, Ptr, Float, Int]));
        // Names are unique across the units (a launch finds its kernel by name).
        let mut names: Vec<&str> = sigs.iter().map(|s| s.0).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), sigs.len());
        assert!(sigs.len() >= 25, "{names:?}");
    }

    #[test]
    fn units_of_named_kernels() {
        assert_eq!(unit_of("gemv_fp4").map(|s| s.name), Some("gemv.cu"));
        assert_eq!(unit_of("route_topk").map(|s| s.name), Some("router.cu"));
        assert!(unit_of("no_such_kernel").is_none());
    }
}
