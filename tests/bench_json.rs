//! `dsflash bench --json`: the object the issue asks for (bounds, each kernel at the real
//! V4-Flash shapes with GB/s, GFLOP/s and its ratio), each ratio of the bound measured next to
//! that kernel. Speeds are not asserted (benchmarks, not timed tests): shapes and arithmetic.

mod common;
use common::*;
use std::process::Command;

#[test]
fn bench_json_reports_every_kernel_against_its_own_bound() {
    let o = Command::new(bin())
        .args(["bench", "--quick", "--kernels-only", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for k in ["read_bandwidth_gbs", "fma_peak_gflops"] {
        assert!(v[k].as_f64().unwrap() > 0.0, "{k}: {}", v[k]);
    }
    assert!(
        v["decode"].is_null() && v["prefill"].is_null(),
        "--kernels-only"
    );
    // (name, multiply-adds, stored bytes) by hand from the formats: FP4 = half a byte per
    // weight + one E8M0 byte per 32; FP8 = a byte per weight + one per 128x128 block;
    // BF16 = two bytes.
    let fp4 = |r: u64, c: u64| (r * c, r * c / 2 + r * c / 32);
    let fp8 = |r: u64, c: u64| (r * c, r * c + r.div_ceil(128) * c.div_ceil(128));
    let want = [
        ("expert w1/w3 fp4 2048x4096", fp4(2048, 4096)),
        ("expert w2 fp4 4096x2048", fp4(4096, 2048)),
        ("expert w1/w3 fp4 2048x4096 int8 in", fp4(2048, 4096)),
        ("expert w2 fp4 4096x2048 int8 in", fp4(4096, 2048)),
        ("wq_b fp8 32768x1024", fp8(32768, 1024)),
        ("wo_b fp8 4096x8192", fp8(4096, 8192)),
        ("shared w1/w3 fp8 2048x4096", fp8(2048, 4096)),
        ("head bf16 129280x4096", (129280 * 4096, 129280 * 4096 * 2)),
    ];
    let ks = v["kernels"].as_array().unwrap();
    assert_eq!(ks.len(), want.len(), "{ks:?}");
    for (k, (name, (macs, bytes))) in ks.iter().zip(want) {
        assert_eq!(k["name"], name);
        let f = |key: &str| k[key].as_f64().unwrap();
        assert!(f("gbs") > 0.0 && f("bound_gbs") > 0.0, "{k}");
        let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
        // GFLOP/s and GB/s come from the same timing: 2 flops per multiply-add per byte.
        let flops_per_byte = 2.0 * macs as f64 / bytes as f64;
        assert!(rel(f("gflops") / f("gbs"), flops_per_byte) < 1e-9, "{k}");
        assert!(rel(f("ratio"), f("gbs") / f("bound_gbs")) < 1e-9, "{k}");
    }
    // The prefill products (--quick: 64 tokens each) at the experts' and the attention's
    // shapes, each against the peaks measured in the same run.
    let shapes = [
        ("expert w1/w3", "fp4", 2048, 4096),
        ("expert w2", "fp4", 4096, 2048),
        ("wq_a", "fp8", 1024, 4096),
        ("wq_b", "fp8", 32768, 1024),
        ("wo_b", "fp8", 4096, 8192),
    ];
    let gs = v["gemm"].as_array().unwrap();
    assert_eq!(gs.len(), shapes.len(), "{gs:?}");
    for (g, (name, format, rows, cols)) in gs.iter().zip(shapes) {
        assert_eq!(
            (
                &g["name"],
                &g["format"],
                &g["rows"],
                &g["cols"],
                &g["tokens"]
            ),
            (
                &name.into(),
                &format.into(),
                &rows.into(),
                &cols.into(),
                &64.into()
            ),
            "{g}"
        );
        let gf = g["gflops"].as_f64().unwrap();
        let fma = g["fma_peak_gflops"].as_f64().unwrap();
        assert!(gf > 0.0 && fma > 0.0, "{g}");
        assert!((g["of_fma_peak"].as_f64().unwrap() - gf / fma).abs() <= 1e-9 * gf / fma);
        // The bf16 and int8 ratios exactly where the run measured those peaks.
        for (key, peak) in [
            ("of_bf16_peak", "bf16_dot_peak_gflops"),
            ("of_int8_peak", "int8_dot_peak_gops"),
        ] {
            assert_eq!(g[key].is_null(), v[peak].is_null(), "{key}: {g}");
        }
    }
}

#[test]
fn bench_context_must_be_a_positive_token_count() {
    for bad in ["0", "many", "1000001"] {
        let o = Command::new(bin())
            .args(["bench", "--kernels-only", "--context", bad])
            .output()
            .unwrap();
        assert!(!o.status.success(), "--context {bad} was accepted");
        let err = stderr(&o);
        assert!(
            err.contains("--context") && err.lines().count() <= 4,
            "--context {bad}: {err}"
        );
    }
}
