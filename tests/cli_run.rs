//! `dsflash logits` / `dsflash generate` end to end on the oracle's tiny checkpoint.

mod common;
use common::*;
use std::process::Command;

fn short_golden() -> Golden {
    goldens(&fixture("tiny/goldens.safetensors"))
        .into_iter()
        .find(|g| g.name == "short")
        .unwrap()
}

fn ids(v: &[u32]) -> String {
    v.iter()
        .map(|x| x.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Minimal .npy reader (v1.0, little-endian f32, C order).
fn read_npy(path: &std::path::Path) -> (Vec<usize>, Vec<f32>) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
    let hl = u16::from_le_bytes([b[8], b[9]]) as usize;
    let h = std::str::from_utf8(&b[10..10 + hl]).unwrap();
    assert!(
        h.contains("'descr': '<f4'") && h.contains("'fortran_order': False"),
        "{h}"
    );
    assert_eq!((10 + hl) % 64, 0, "header aligned to 64");
    let shape: Vec<usize> = h
        .split("'shape': (")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap()
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    (shape, as_f32(&b[10 + hl..]))
}

#[test]
fn generate_greedy_ids_match_oracle() {
    let g = short_golden();
    let o = run(&[
        "generate",
        "--model",
        fixture("tiny").to_str().unwrap(),
        "--tokens",
        &ids(&g.input_ids),
        "--max-tokens",
        "16",
        "--temperature",
        "0",
        "--format",
        "ids",
        "--numerics",
        "ideal",
        "--ignore-eos",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), ids(&g.greedy_tokens));
}

#[test]
fn generate_in_chunks_matches_too() {
    let g = goldens(&fixture("tiny/goldens.safetensors"))
        .into_iter()
        .find(|g| g.name == "window")
        .unwrap();
    let o = run(&[
        "generate",
        "--model",
        fixture("tiny").to_str().unwrap(),
        "--tokens",
        &ids(&g.input_ids),
        "--max-tokens",
        "16",
        "--temperature",
        "0",
        "--numerics",
        "ideal",
        "--ignore-eos",
        "--prefill-chunk",
        "7",
        "--threads",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), ids(&g.greedy_tokens));
}

#[test]
fn logits_npy_match_oracle_all_and_last() {
    let g = short_golden();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("l.npy");
    let o = run(&[
        "logits",
        "--model",
        fixture("tiny").to_str().unwrap(),
        "--tokens",
        &ids(&g.input_ids),
        "--out",
        out.to_str().unwrap(),
        "--numerics",
        "ideal",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (shape, data) = read_npy(&out);
    assert_eq!(shape, vec![6, 1024]);
    let (err, _) = max_rel_err(&data, &g.prefill_logits, 1024);
    assert!(err <= 1e-4, "{err:.2e}");
    let o = run(&[
        "logits",
        "--model",
        fixture("tiny").to_str().unwrap(),
        "--tokens",
        &ids(&g.input_ids),
        "--out",
        out.to_str().unwrap(),
        "--numerics",
        "ideal",
        "--positions",
        "last",
    ]);
    assert!(o.status.success());
    let (shape, data) = read_npy(&out);
    assert_eq!(shape, vec![1, 1024]);
    assert!(max_rel_err(&data, &g.prefill_logits[5 * 1024..], 1024).0 <= 1e-4);
}

#[test]
fn prompt_over_ctx_is_refused_before_compute() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("l.npy");
    let o = run(&[
        "logits",
        "--model",
        fixture("tiny").to_str().unwrap(),
        "--tokens",
        "0,1,2,3,4,5",
        "--ctx",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("--ctx is 4") && e.contains("6 tokens"), "{e}");
    assert_eq!(e.trim_end().lines().count(), 1);
    assert!(!out.exists(), "no output written");
}

#[test]
fn bad_inputs_name_the_flag() {
    let m = fixture("tiny");
    let m = m.to_str().unwrap();
    for (args, want, code) in [
        (
            vec!["generate", "--model", m, "--tokens", "0,x"],
            "--tokens",
            2,
        ),
        (
            vec!["generate", "--model", m, "--tokens", ""],
            "--tokens",
            2,
        ),
        (
            vec!["generate", "--model", m, "--tokens", "0,99999"],
            "99999",
            1,
        ),
        (
            vec!["generate", "--model", m, "--tokens", "0", "--top-p", "0"],
            "--top-p",
            2,
        ),
        (
            vec![
                "generate",
                "--model",
                m,
                "--tokens",
                "0",
                "--prefill-chunk",
                "0",
            ],
            "--prefill-chunk",
            2,
        ),
        (
            vec![
                "generate",
                "--model",
                m,
                "--tokens",
                "0",
                "--numerics",
                "turbo",
            ],
            "--numerics",
            2,
        ),
        (
            vec!["generate", "--model", m, "--tokens", "0", "--ctx", "0"],
            "--ctx",
            2,
        ),
    ] {
        let o = run(&args);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(code), "{args:?}: {e}");
        assert!(e.contains(want), "{args:?}: {e}");
        assert!(!e.contains("panicked"), "{e}");
    }
}

#[test]
fn closed_stdout_is_a_clean_exit() {
    // `dsflash generate ... | head -c 3`: the reader goes away mid-output.
    let mut c = Command::new(bin());
    c.args([
        "generate",
        "--model",
        fixture("tiny").to_str().unwrap(),
        "--tokens",
        "0,5,9",
    ])
    .args(["--max-tokens", "200", "--temperature", "0", "--ignore-eos"]);
    let o = close_stdout_early(c);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"));
}

#[test]
fn sampling_is_reproducible_per_seed() {
    let m = fixture("tiny");
    let a = [
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--tokens",
        "0,5,9",
        "--max-tokens",
        "12",
        "--temperature",
        "1.0",
        "--ignore-eos",
        "--seed",
    ];
    let r = |seed: &str| stdout(&run(&[&a[..], &[seed]].concat()));
    assert_eq!(r("1"), r("1"));
    assert_ne!(r("1"), r("2"));
}
