//! Every unit of `kernels/` compiles to CUBIN with NVRTC for each target architecture (no GPU
//! needed), with registers and spills printed. scripts/test.sh puts the PyPI wheel's
//! libnvrtc on the library path and sets DSFLASH_REQUIRE_NVRTC=1, so in CI a missing NVRTC
//! fails the test instead of skipping it.

use dsflash::backend::cuda::nvrtc::{self, TARGET_ARCHS};
use dsflash::backend::cuda::sources::KERNELS;

fn nvrtc_or_skip() -> bool {
    if nvrtc::available() {
        return true;
    }
    assert!(
        std::env::var_os("DSFLASH_REQUIRE_NVRTC").is_none(),
        "DSFLASH_REQUIRE_NVRTC is set but libnvrtc.so is not on the library path \
         (scripts/fetch_nvrtc.sh fetches it)"
    );
    eprintln!("NVRTC not found: kernel compilation not exercised");
    false
}

#[test]
fn every_kernel_compiles_for_every_target_arch() {
    if !nvrtc_or_skip() {
        return;
    }
    let (major, minor) = nvrtc::version().expect("nvrtcVersion");
    println!("NVRTC {major}.{minor}");
    let mut failures = Vec::new();
    for unit in KERNELS {
        for &arch in TARGET_ARCHS {
            match nvrtc::compile(unit, arch) {
                Ok(c) => {
                    assert!(
                        c.cubin.len() > 4 && &c.cubin[..4] == b"\x7fELF",
                        "{} sm_{arch}: not an ELF cubin",
                        unit.name
                    );
                    assert!(
                        !c.kernels.is_empty(),
                        "{} sm_{arch}: no ptxas report in the log:\n{}",
                        unit.name,
                        c.log
                    );
                    for k in &c.kernels {
                        println!(
                            "sm_{arch:<3} {:<10} {:<16} {:>3} registers, {} B spill stores, {} B spill loads",
                            unit.name, k.name, k.registers, k.spill_stores, k.spill_loads
                        );
                    }
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_global_kernel_is_reported_by_ptxas() {
    if !nvrtc_or_skip() {
        return;
    }
    // Names of `extern "C" __global__ void name(` in each unit vs the entries ptxas compiled.
    for unit in KERNELS {
        let mut declared: Vec<String> = unit
            .text
            .split("extern \"C\" __global__ void ")
            .skip(1)
            .filter_map(|rest| rest.split('(').next())
            .map(|s| s.trim().to_string())
            .collect();
        declared.sort();
        let mut compiled: Vec<String> = nvrtc::compile(unit, 80)
            .expect("compiles")
            .kernels
            .into_iter()
            .map(|k| k.name)
            .collect();
        compiled.sort();
        assert_eq!(declared, compiled, "{}", unit.name);
    }
}

#[test]
fn a_compile_error_names_the_file_and_arch() {
    if !nvrtc_or_skip() {
        return;
    }
    let bad = dsflash::backend::cuda::sources::Source {
        name: "broken.cu",
        text: "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }",
    };
    let e = nvrtc::compile(&bad, 89)
        .expect_err("must not compile")
        .to_string();
    assert!(
        e.contains("kernels/broken.cu") && e.contains("sm_89") && e.contains("undefined_name"),
        "{e}"
    );
}

#[test]
fn cubins_are_cached_on_disk_and_reused() {
    if !nvrtc_or_skip() {
        return;
    }
    use dsflash::backend::cuda::cache::{cache_name, load_or_compile_in};
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = &KERNELS[0];
    let (a, compiled) =
        load_or_compile_in(Some(dir.path().to_path_buf()), unit, 89, 12080).expect("compile");
    assert!(compiled);
    let file = dir.path().join(cache_name(unit, 89, 12080));
    assert_eq!(std::fs::read(&file).expect("cached"), a);
    let (b, compiled) =
        load_or_compile_in(Some(dir.path().to_path_buf()), unit, 89, 12080).expect("cached");
    assert!(!compiled, "second load comes from the cache");
    assert_eq!(a, b);
    // A damaged file is recompiled, not trusted.
    std::fs::write(&file, b"garbage").expect("write");
    let (_, compiled) =
        load_or_compile_in(Some(dir.path().to_path_buf()), unit, 89, 12080).expect("recompile");
    assert!(compiled);
}
