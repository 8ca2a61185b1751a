//! Hostile input and faults, end to end through the binary: files planted where we write,
//! configs that pass a parser but not the engine, files that change or block under us,
//! non-finite weights, and signals. Each case ends in one line on stderr and the README's
//! exit code, never a panic, a hang, a write outside its place or a silent wrong answer.
//! (The hub's hostile headers and stalls are in tests/download.rs.)

mod common;
use common::*;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const S1: &str = "model-00001-of-00002.safetensors";
const S2: &str = "model-00002-of-00002.safetensors";

fn tiny() -> tempfile::TempDir {
    copy_dir(&fixture("tiny"))
}

fn model(d: &Path) -> &str {
    d.to_str().unwrap()
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
}

/// Overwrite part of a tensor's payload in whichever shard holds it.
fn patch_tensor(dir: &Path, name: &str, f: impl FnOnce(&mut [u8])) {
    for shard in [S1, S2] {
        let p = dir.join(shard);
        let (h, mut data) = read_shard(&p);
        if let Some(e) = h.get(name) {
            let off = &e["data_offsets"];
            let (a, b) = (
                off[0].as_u64().unwrap() as usize,
                off[1].as_u64().unwrap() as usize,
            );
            f(&mut data[a..b]);
            write_shard(&p, &h, &data);
            return;
        }
    }
    panic!("{name} not found");
}

/// `dsflash generate` greedy on `dir` with these prompt ids, `extra` flags after.
fn generate(dir: &Path, tokens: &str, max_tokens: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "generate",
        "--model",
        model(dir),
        "--tokens",
        tokens,
        "--max-tokens",
        max_tokens,
    ];
    args.extend_from_slice(extra);
    run(&args)
}

/// `dsflash logits` on `dir` for `tokens` into `out`.
fn logits(dir: &Path, tokens: &str, out: &Path) -> Output {
    run(&[
        "logits",
        "--model",
        model(dir),
        "--tokens",
        tokens,
        "--out",
        out.to_str().unwrap(),
    ])
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

/// Wait for `child` at most `limit`; kill it and fail if it is still running.
fn wait_within(mut child: Child, limit: Duration, what: &str) -> Output {
    let t = Instant::now();
    while t.elapsed() < limit {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("{what}: still running after {limit:?}");
}

/// A long greedy generation on the tiny model (stdout and stderr piped).
fn long_generate(dir: &Path) -> Child {
    Command::new(bin())
        .args(["generate", "--model", model(dir), "--tokens", "1,2,3"])
        .args([
            "--max-tokens",
            "1000000",
            "--ignore-eos",
            "--temperature",
            "0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Read from the child's stdout until `n` bytes arrived (it is generating).
fn read_some(child: &mut Child, n: usize) -> Vec<u8> {
    let out = child.stdout.as_mut().unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while got.len() < n {
        let k = out.read(&mut buf).unwrap();
        assert!(k > 0, "stdout closed early");
        got.extend_from_slice(&buf[..k]);
    }
    got
}

fn temps_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

// --- 2: writes -------------------------------------------------------------------------

#[test]
fn logits_out_never_writes_through_a_planted_link() {
    let d = tiny();
    let w = tempfile::tempdir().unwrap();
    let victim = w.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    // The temp name the old writer used, planted as a link to the victim.
    std::os::unix::fs::symlink(&victim, w.path().join(".x.npy.tmp")).unwrap();
    let out = w.path().join("x.npy");
    let o = logits(d.path(), "1,2", &out);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(std::fs::read(&out).unwrap().starts_with(b"\x93NUMPY"));
    // --out itself a link, a FIFO, a directory: refused, nothing replaced.
    let link = w.path().join("link.npy");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let fifo = w.path().join("fifo.npy");
    mkfifo(&fifo);
    let sub = w.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    for (p, kind) in [
        (&link, "symbolic link"),
        (&fifo, "FIFO"),
        (&sub, "directory"),
    ] {
        let o = logits(d.path(), "1,2", p);
        assert_eq!(o.status.code(), Some(1), "{kind}");
        let e = stderr(&o);
        assert!(e.contains(kind) && e.contains("refusing"), "{kind}: {e}");
        assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(
        std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo_like()
    );
    assert_eq!(temps_in(w.path()), vec![".x.npy.tmp".to_string()]);
}

trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}
impl FifoLike for std::fs::FileType {
    fn is_fifo_like(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.is_fifo()
    }
}

#[test]
fn a_write_that_fails_leaves_no_temp_file() {
    // A file-size limit makes the .npy write fail half-way.
    let d = tiny();
    let w = tempfile::tempdir().unwrap();
    let out = w.path().join("x.npy");
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -f 4; exec {} logits --model {} --tokens 1,2,3,4 --out {}",
            bin(),
            model(d.path()),
            out.display()
        ))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--out"), "{}", stderr(&o));
    assert!(!out.exists());
    assert!(temps_in(w.path()).is_empty(), "{:?}", temps_in(w.path()));
}

#[test]
fn synth_out_of_space_leaves_no_half_shard() {
    let w = tempfile::tempdir().unwrap();
    let out = w.path().join("m");
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -f 2048; exec {} synth --config {} --out {}",
            bin(),
            fixture("tiny/config.json").display(),
            out.display()
        ))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(stderr(&o).trim_end().lines().count(), 1, "{}", stderr(&o));
    // Whatever is there under a shard's name is complete (its header covers the file); no
    // temp files, no index (the directory is not taken for a checkpoint).
    assert!(temps_in(&out).is_empty(), "{:?}", temps_in(&out));
    assert!(!out.join("model.safetensors.index.json").exists());
    for e in std::fs::read_dir(&out).unwrap().flatten() {
        let b = std::fs::read(e.path()).unwrap();
        let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        let h: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
        let end = h
            .as_object()
            .unwrap()
            .values()
            .filter_map(|v| v.get("data_offsets")?.get(1)?.as_u64())
            .max()
            .unwrap() as usize;
        assert_eq!(b.len(), 8 + n + end, "{}", e.path().display());
    }
}

// --- 3: configs that pass a parser ------------------------------------------------------

#[test]
fn configs_the_engine_cannot_run_are_refused_by_field() {
    for (field, value) in [
        ("sliding_window", serde_json::json!(1u64 << 31)),
        ("sliding_window", serde_json::json!(1u64 << 53)),
        ("swiglu_limit", serde_json::json!(-1.0)),
        ("routed_scaling_factor", serde_json::json!(f64::MAX)),
        ("max_position_embeddings", serde_json::json!(1u64 << 40)),
        ("rope_theta", serde_json::json!(1.0)),
        ("architectures", serde_json::json!(["MistralForCausalLM"])),
    ] {
        let d = tiny();
        edit_config(d.path(), |v| v[field] = value.clone());
        let o = generate(d.path(), "1,2", "2", &[]);
        assert_eq!(o.status.code(), Some(1), "{field}={value}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(e.contains(&format!("`{field}`")), "{field}={value}: {e}");
        assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    }
}

#[test]
fn a_window_as_long_as_the_context_costs_only_what_is_used() {
    // Accepted (window <= context), and run within this machine's memory: the rings grow
    // with the tokens, not with the window (2^26 x 512 floats would be 128 GB per layer).
    let d = tiny();
    edit_config(d.path(), |v| {
        v["max_position_embeddings"] = (1u64 << 26).into();
        v["sliding_window"] = (1u64 << 26).into();
    });
    let o = generate(d.path(), "1,2,3", "2", &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim().split(',').count(), 2);
}

// --- 5, 6: signals and files that change under us ----------------------------------------

#[test]
fn a_shard_truncated_while_generating_is_one_line_naming_it() {
    let d = tiny();
    let mut child = long_generate(d.path());
    read_some(&mut child, 40);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(d.path().join(S2))
        .unwrap();
    f.set_len(4096).unwrap();
    let o = wait_within(child, Duration::from_secs(60), "generate after truncation");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains(S2) && e.contains("while dsflash was using it"),
        "{e}"
    );
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    assert!(o.stdout.ends_with(b"\n"), "output ends its line");
}

#[test]
fn generate_exits_128_plus_the_signal_with_its_line_ended() {
    for (sig, code) in [
        (libc::SIGINT, 130),
        (libc::SIGTERM, 143),
        (libc::SIGHUP, 129),
    ] {
        let d = tiny();
        let mut child = long_generate(d.path());
        let first = read_some(&mut child, 20);
        let t = Instant::now();
        signal(&child, sig);
        let o = wait_within(child, Duration::from_secs(20), "generate after a signal");
        assert_eq!(o.status.code(), Some(code), "signal {sig}: {}", stderr(&o));
        assert!(t.elapsed() < Duration::from_secs(5));
        let mut all = first;
        all.extend_from_slice(&o.stdout);
        assert!(all.ends_with(b"\n"), "signal {sig}: the last line is ended");
        assert!(
            all[..all.len() - 1]
                .iter()
                .all(|b| b.is_ascii_digit() || *b == b',')
        );
        assert!(!stderr(&o).contains("error"), "{}", stderr(&o));
    }
}

#[test]
fn logits_stopped_by_a_signal_writes_nothing() {
    let d = tiny();
    let w = tempfile::tempdir().unwrap();
    let out = w.path().join("x.npy");
    // 1024 tokens in chunks of 1: a prefill long enough to be interrupted.
    let tokens: Vec<String> = (0..1024).map(|i| (i % 1000).to_string()).collect();
    let child = Command::new(bin())
        .args(["logits", "--model", model(d.path()), "--prefill-chunk", "1"])
        .args([
            "--tokens",
            &tokens.join(","),
            "--out",
            out.to_str().unwrap(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    signal(&child, libc::SIGTERM);
    let o = wait_within(child, Duration::from_secs(20), "logits after SIGTERM");
    assert_eq!(o.status.code(), Some(143), "{}", stderr(&o));
    assert!(!out.exists());
    assert!(temps_in(w.path()).is_empty());
}

// --- 7: files that block --------------------------------------------------------------

#[test]
fn a_fifo_as_a_shard_or_config_is_refused_without_hanging() {
    for name in ["config.json", S2, "model.safetensors.index.json"] {
        let d = tiny();
        std::fs::remove_file(d.path().join(name)).unwrap();
        mkfifo(&d.path().join(name));
        let child = Command::new(bin())
            .args(["inspect", "--model", model(d.path())])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let o = wait_within(child, Duration::from_secs(20), name);
        assert_eq!(o.status.code(), Some(1), "{name}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(e.contains(name) && e.contains("FIFO"), "{name}: {e}");
        assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    }
    // An explicit tokenizer that is a FIFO, too.
    let w = tempfile::tempdir().unwrap();
    let fifo = w.path().join("tokenizer.json");
    mkfifo(&fifo);
    let msgs = w.path().join("m.json");
    std::fs::write(&msgs, r#"[{"role":"user","content":"hi"}]"#).unwrap();
    let child = Command::new(bin())
        .args([
            "prompt",
            "--messages",
            msgs.to_str().unwrap(),
            "--format",
            "ids",
        ])
        .args(["--tokenizer", fifo.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let o = wait_within(child, Duration::from_secs(20), "tokenizer FIFO");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("FIFO"), "{}", stderr(&o));
}

// --- 8: non-finite weights ------------------------------------------------------------

#[test]
fn non_finite_weights_are_named_at_load() {
    let nan_f32 = f32::NAN.to_le_bytes();
    for (tensor, patch) in [
        (
            "hc_head_base",
            Box::new(move |b: &mut [u8]| b[4..8].copy_from_slice(&nan_f32))
                as Box<dyn Fn(&mut [u8])>,
        ),
        (
            "layers.1.attn_norm.weight",
            Box::new(|b: &mut [u8]| b[2..4].copy_from_slice(&0x7F80u16.to_le_bytes())),
        ),
        (
            "layers.0.attn.wq_b.scale",
            Box::new(|b: &mut [u8]| b[0] = 0xFF),
        ),
    ] {
        let d = tiny();
        patch_tensor(d.path(), tensor, |b| patch(b));
        let o = generate(d.path(), "1,2", "2", &[]);
        assert_eq!(o.status.code(), Some(1), "{tensor}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(
            e.contains(tensor) && e.contains(".safetensors"),
            "{tensor}: {e}"
        );
        assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    }
}

#[test]
fn non_finite_logits_stop_generation_with_an_error() {
    // The head is too large to scan at load on the real model: a NaN there reaches the
    // logits, and the run stops instead of printing one id forever.
    let d = tiny();
    patch_tensor(d.path(), "head.weight", |b| {
        // Row 5's first element (BF16 NaN).
        let cols = 256;
        b[5 * cols * 2..5 * cols * 2 + 2].copy_from_slice(&0x7FC0u16.to_le_bytes());
    });
    let o = generate(d.path(), "1,2", "4", &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("non-finite logits"), "{e}");
    assert!(stdout(&o).is_empty() || stdout(&o).ends_with('\n'));
}

// --- 9: smaller ------------------------------------------------------------------------

#[test]
fn a_garbage_tokenizer_is_refused_even_for_text() {
    let w = tempfile::tempdir().unwrap();
    let tok = w.path().join("tokenizer.json");
    std::fs::write(&tok, b"{not a tokenizer").unwrap();
    let msgs = w.path().join("m.json");
    std::fs::write(&msgs, r#"[{"role":"user","content":"hi"}]"#).unwrap();
    let o = run(&[
        "prompt",
        "--messages",
        msgs.to_str().unwrap(),
        "--format",
        "text",
        "--tokenizer",
        tok.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("tokenizer.json"), "{}", stderr(&o));
}

#[test]
fn an_expert_profile_at_the_top_of_the_counts_saturates() {
    let d = tiny();
    let w = tempfile::tempdir().unwrap();
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.path().join("config.json")).unwrap()).unwrap();
    let (l, x) = (
        cfg["num_hidden_layers"].as_u64().unwrap() as usize,
        cfg["n_routed_experts"].as_u64().unwrap() as usize,
    );
    let p = w.path().join("profile.json");
    let counts = vec![vec![u64::MAX; x]; l];
    std::fs::write(
        &p,
        serde_json::to_vec(&serde_json::json!({"layers": l, "experts": x, "counts": counts}))
            .unwrap(),
    )
    .unwrap();
    let o = generate(
        d.path(),
        "1,2,3",
        "3",
        &[
            "--device",
            "sim:64M",
            "--expert-profile",
            p.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let back: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    let all_max = back["counts"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap())
        .all(|c| c.as_u64() == Some(u64::MAX));
    assert!(all_max, "counts stay at the top instead of wrapping");
}

#[test]
fn bench_stops_on_a_signal_like_every_command() {
    let child = Command::new(bin())
        .args(["bench", "--quick", "--kernels-only", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    signal(&child, libc::SIGINT);
    let o = wait_within(child, Duration::from_secs(60), "bench after SIGINT");
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(stdout(&o).is_empty(), "no half report");
}

#[test]
fn synth_refuses_a_checkpoint_larger_than_the_free_disk() {
    // The real layout without --sparse needs ~160 GB; the check runs before any shard.
    let w = tempfile::tempdir().unwrap();
    let out = w.path().join("real");
    let df = Command::new("df")
        .args(["-B1", "--output=avail", w.path().to_str().unwrap()])
        .output()
        .unwrap();
    let free: u64 = stdout(&df)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(u64::MAX);
    if free > 170_000_000_000 {
        eprintln!("skipped: {free} bytes free, the real layout would fit");
        return;
    }
    let child = Command::new(bin())
        .args(["synth", "--config"])
        .arg(fixture("deepseek-v4-flash-config.json"))
        .args(["--out", out.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let o = wait_within(child, Duration::from_secs(30), "synth disk check");
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("not enough disk space") && e.contains("--sparse"),
        "{e}"
    );
    let written: Vec<_> = std::fs::read_dir(&out).map_or(Vec::new(), |d| d.flatten().collect());
    assert!(written.is_empty(), "nothing written: {written:?}");
}
