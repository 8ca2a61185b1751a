//! Engine-level fuzzing: the committed tiny checkpoints with mutated config values, shard
//! headers, payload bytes and index entries, each opened as `inspect` opens it and, when it
//! opens, run for a 2-token generation. Every case must end in Ok or an error: no panic, no
//! abort (it would end this process), no hang (a watchdog aborts a case that takes 60 s).
//!
//! Cases run in memory (`Checkpoint::from_memory`, the same validation as files), and every
//! 64th also through the binary on files (`inspect`, then `generate`), which adds the file
//! handling and the CLI's error path. `DSFLASH_FUZZ_CASES` sets the count (default below,
//! sized for CI's budget); `DSFLASH_FUZZ_FIRST` the first case (a case's index is its seed:
//! a failure prints it for reproduction). docs/RELIABILITY.md has the longer runs.

mod common;
use common::*;
use dsflash::engine::{Engine, Numerics, Session, Want};
use dsflash::model::Checkpoint;
use dsflash::model::synth::SplitMix64;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DEFAULT_CASES: u64 = 10_000;
const FIXTURES: [&str; 4] = ["tiny", "tiny-b", "tiny-c", "tiny-vocab"];

struct Model {
    name: &'static str,
    config: serde_json::Value,
    index: Vec<u8>,
    shards: HashMap<String, Arc<Vec<u8>>>,
}

fn load(name: &'static str) -> Model {
    let dir = fixture(name);
    let mut shards = HashMap::new();
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with("model-") && n.ends_with(".safetensors") {
            shards.insert(n, Arc::new(std::fs::read(e.path()).unwrap()));
        }
    }
    Model {
        name,
        config: serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap(),
        index: std::fs::read(dir.join("model.safetensors.index.json")).unwrap(),
        shards,
    }
}

/// One mutated checkpoint.
struct Case {
    what: String,
    config: Vec<u8>,
    index: Vec<u8>,
    shards: HashMap<String, Arc<Vec<u8>>>,
    numerics: Numerics,
    chunk: usize,
    tokens: Vec<u32>,
}

fn pick<'a, T>(r: &mut SplitMix64, v: &'a [T]) -> &'a T {
    &v[(r.next_u64() % v.len() as u64) as usize]
}

/// Values that break code written for sane ones.
fn interesting(r: &mut SplitMix64, orig: &serde_json::Value) -> serde_json::Value {
    use serde_json::json;
    let n = orig.as_f64().unwrap_or(1.0);
    let fixed = [
        json!(0),
        json!(1),
        json!(-1),
        json!(2),
        json!(3),
        json!(4),
        json!(7),
        json!(127),
        json!(128),
        json!(129),
        json!(255),
        json!(4096),
        json!(65535),
        json!(1u64 << 31),
        json!(1u64 << 32),
        json!(1u64 << 53),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(1e308),
        json!(-1e308),
        json!(0.5),
        json!(1e-30),
        json!(-0.0),
        json!("x"),
        json!(null),
        json!(true),
        json!([]),
        json!({}),
        json!(n * 2.0),
        json!(n / 2.0),
        json!(n + 1.0),
        json!(n - 1.0),
    ];
    pick(r, &fixed).clone()
}

fn shard_parts(b: &[u8]) -> Option<(serde_json::Map<String, serde_json::Value>, Vec<u8>)> {
    let n = u64::from_le_bytes(b.get(..8)?.try_into().ok()?) as usize;
    let h: serde_json::Value = serde_json::from_slice(b.get(8..8 + n)?).ok()?;
    Some((h.as_object()?.clone(), b[8 + n..].to_vec()))
}

/// The tensor names of a header, sorted (None when there is none left to mutate).
fn tensor_names(h: &serde_json::Map<String, serde_json::Value>) -> Option<Vec<String>> {
    let mut names: Vec<String> = h.keys().filter(|k| *k != "__metadata__").cloned().collect();
    names.sort();
    (!names.is_empty()).then_some(names)
}

fn rebuild(h: serde_json::Map<String, serde_json::Value>, data: &[u8]) -> Vec<u8> {
    shard_bytes(&serde_json::Value::Object(h), data)
}

fn mutate_config(r: &mut SplitMix64, cfg: &mut serde_json::Value) -> String {
    let obj = cfg.as_object_mut().unwrap();
    let mut keys: Vec<String> = obj.keys().cloned().collect();
    keys.sort();
    let k = pick(r, &keys).clone();
    let v = obj.get_mut(&k).unwrap();
    match v {
        serde_json::Value::Object(inner) if !inner.is_empty() => {
            let mut ik: Vec<String> = inner.keys().cloned().collect();
            ik.sort();
            let k2 = pick(r, &ik).clone();
            let nv = interesting(r, &inner[&k2]);
            inner.insert(k2.clone(), nv.clone());
            format!("config {k}.{k2} = {nv}")
        }
        serde_json::Value::Array(a) if !a.is_empty() && r.next_u64().is_multiple_of(2) => {
            let i = (r.next_u64() % a.len() as u64) as usize;
            let nv = pick(r, &[0, 4, 128, 3, 1, 256]).to_owned();
            a[i] = nv.into();
            format!("config {k}[{i}] = {nv}")
        }
        _ => {
            let nv = interesting(r, v);
            *v = nv.clone();
            format!("config {k} = {nv}")
        }
    }
}

fn mutate_header(r: &mut SplitMix64, shard: &[u8]) -> (Vec<u8>, String) {
    let Some((mut h, data)) = shard_parts(shard) else {
        return (shard.to_vec(), "header unreadable".into());
    };
    let Some(names) = tensor_names(&h) else {
        return (shard.to_vec(), "no tensors left to mutate".into());
    };
    let t = pick(r, &names).clone();
    let e = h.get_mut(&t).unwrap();
    let what = match r.next_u64() % 4 {
        0 => {
            let d = *pick(
                r,
                &[
                    "F32", "BF16", "F8_E4M3", "F8_E8M0", "I64", "I8", "U8", "F16", "BOOL",
                ],
            );
            e["dtype"] = d.into();
            format!("header {t} dtype {d}")
        }
        1 => {
            let dims = e["shape"].as_array().map_or(0, |a| a.len());
            if dims > 0 {
                let i = (r.next_u64() % dims as u64) as usize;
                let old = e["shape"][i].as_u64().unwrap_or(1);
                let nv = *pick(r, &[0, 1, old + 1, old.saturating_sub(1), old * 2, 1 << 40]);
                e["shape"][i] = nv.into();
                format!("header {t} shape[{i}] {nv}")
            } else {
                e["shape"] = serde_json::json!([3, 5]);
                format!("header {t} shape [3, 5]")
            }
        }
        2 => {
            let i = (r.next_u64() % 2) as usize;
            let old = e["data_offsets"][i].as_u64().unwrap_or(0);
            let nv = *pick(
                r,
                &[0, old + 1, old.saturating_sub(1), old + 8, u64::MAX >> 1],
            );
            e["data_offsets"][i] = nv.into();
            format!("header {t} data_offsets[{i}] {nv}")
        }
        _ => {
            // Raw bytes of the header text.
            let mut b = rebuild(h, &data);
            let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
            for _ in 0..1 + r.next_u64() % 4 {
                let i = (r.next_u64() % (n as u64 + 8)) as usize;
                b[i] = r.next_u64() as u8;
            }
            return (b, "header bytes flipped".into());
        }
    };
    (rebuild(h, &data), what)
}

fn mutate_payload(r: &mut SplitMix64, shard: &[u8]) -> (Vec<u8>, String) {
    let Some((h, mut data)) = shard_parts(shard) else {
        return (shard.to_vec(), "payload: header unreadable".into());
    };
    let Some(names) = tensor_names(&h) else {
        return (shard.to_vec(), "no tensors left to mutate".into());
    };
    let t = pick(r, &names).clone();
    // An earlier mutation of this case may have bent the header: take only sane ranges.
    let off = |i: usize| h[&t]["data_offsets"][i].as_u64().map(|v| v as usize);
    let (a, b) = match (off(0), off(1)) {
        (Some(a), Some(b)) if a < b && b <= data.len() => (a, b),
        _ => return (shard.to_vec(), format!("payload {t}: no usable range")),
    };
    let fill = *pick(r, &[0x00u8, 0xFF, 0x7F, 0x80, 0x7F, 0xFE, 0x01]);
    let what = match r.next_u64() % 3 {
        0 => {
            // Whole tensor one byte value (NaN codes, zeros, extremes).
            data[a..b].iter_mut().for_each(|x| *x = fill);
            format!("payload {t} all {fill:#04x}")
        }
        1 => {
            let n = 1 + (r.next_u64() % 16) as usize;
            for _ in 0..n {
                let i = a + (r.next_u64() % (b - a) as u64) as usize;
                data[i] = fill;
            }
            format!("payload {t} {n} bytes {fill:#04x}")
        }
        _ => {
            let n = 1 + (r.next_u64() % 64) as usize;
            for _ in 0..n {
                let i = a + (r.next_u64() % (b - a) as u64) as usize;
                data[i] = r.next_u64() as u8;
            }
            format!("payload {t} {n} random bytes")
        }
    };
    (rebuild(h, &data), what)
}

fn mutate_index(r: &mut SplitMix64, index: &[u8], shards: &[String]) -> (Vec<u8>, String) {
    // An earlier mutation of this case may have broken the JSON already.
    let parsed: Option<serde_json::Value> = serde_json::from_slice(index).ok();
    let Some(mut v) = parsed.filter(|v| v["weight_map"].is_object()) else {
        let mut b = index.to_vec();
        let i = (r.next_u64() % b.len().max(1) as u64) as usize;
        if let Some(x) = b.get_mut(i) {
            *x = r.next_u64() as u8;
        }
        return (b, "index byte flipped".into());
    };
    let wm = v["weight_map"].as_object_mut().unwrap();
    let mut names: Vec<String> = wm.keys().cloned().collect();
    names.sort();
    let t = pick(r, &names).clone();
    let what = match r.next_u64() % 4 {
        0 => {
            wm.remove(&t);
            format!("index drops {t}")
        }
        1 => {
            let s = pick(r, shards).clone();
            wm.insert(t.clone(), s.clone().into());
            format!("index moves {t} to {s}")
        }
        2 => {
            let s = *pick(
                r,
                &["../x.safetensors", "/etc/passwd", "", "model-9.safetensors"],
            );
            wm.insert(t.clone(), s.into());
            format!("index puts {t} in {s:?}")
        }
        _ => {
            let mut b = serde_json::to_vec(&v).unwrap();
            let i = (r.next_u64() % b.len() as u64) as usize;
            b[i] = r.next_u64() as u8;
            return (b, "index byte flipped".into());
        }
    };
    (serde_json::to_vec(&v).unwrap(), what)
}

fn make_case(models: &[Model], seed: u64) -> Case {
    let mut r = SplitMix64::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD5F1A5);
    let m = &models[(r.next_u64() % models.len() as u64) as usize];
    let mut cfg = m.config.clone();
    let mut index = m.index.clone();
    let mut shards = m.shards.clone();
    let mut shard_names: Vec<String> = shards.keys().cloned().collect();
    shard_names.sort();
    let mut what = vec![m.name.to_string()];
    let n_mut = 1 + r.next_u64().is_multiple_of(3) as u64;
    for _ in 0..n_mut {
        match r.next_u64() % 10 {
            0..=3 => what.push(mutate_config(&mut r, &mut cfg)),
            4..=5 => {
                let s = pick(&mut r, &shard_names).clone();
                let (b, w) = mutate_header(&mut r, &shards[&s]);
                shards.insert(s.clone(), Arc::new(b));
                what.push(format!("{s}: {w}"));
            }
            6..=8 => {
                let s = pick(&mut r, &shard_names).clone();
                let (b, w) = mutate_payload(&mut r, &shards[&s]);
                shards.insert(s.clone(), Arc::new(b));
                what.push(format!("{s}: {w}"));
            }
            _ => {
                let (b, w) = mutate_index(&mut r, &index, &shard_names);
                index = b;
                what.push(w);
            }
        }
    }
    let vocab = m.config["vocab_size"].as_u64().unwrap();
    let tokens = (0..1 + r.next_u64() % 6)
        .map(|_| (r.next_u64() % vocab) as u32)
        .collect();
    Case {
        what: what.join("; "),
        config: serde_json::to_vec(&cfg).unwrap(),
        index,
        shards,
        numerics: *pick(
            &mut r,
            &[Numerics::Reference, Numerics::Ideal, Numerics::Fast],
        ),
        chunk: 1 + (r.next_u64() % 4) as usize,
        tokens,
    }
}

/// In memory: open (inspect's validation), build the engine, prefill, 2 tokens.
fn run_in_memory(c: &Case) -> Result<(), String> {
    let ck = Checkpoint::from_memory(Path::new("fuzz"), &c.config, Some(&c.index), &c.shards)
        .map_err(|e| e.to_string())?;
    let _ = ck.payload_bytes();
    let e = Engine::from_checkpoint(&ck, c.numerics).map_err(|e| e.to_string())?;
    let mut s = Session::new(&e, 64, c.chunk);
    let mut logits = s
        .prefill(&c.tokens, Want::Last)
        .map_err(|e| e.to_string())?;
    for _ in 0..2 {
        let tok = argmax(&logits);
        logits = s.decode_step(tok).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Through the binary on files: `inspect`, then a 2-token `generate`.
fn run_binary(c: &Case, dir: &Path) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), &c.config).unwrap();
    std::fs::write(dir.join("model.safetensors.index.json"), &c.index).unwrap();
    for (n, b) in &c.shards {
        std::fs::write(dir.join(n), b.as_slice()).unwrap();
    }
    let tokens: Vec<String> = c.tokens.iter().map(|t| t.to_string()).collect();
    let numerics = match c.numerics {
        Numerics::Reference => "reference",
        Numerics::Ideal => "ideal",
        Numerics::Fast => "fast",
    };
    for args in [
        vec!["inspect", "--model", dir.to_str().unwrap()],
        vec![
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--tokens",
            &tokens.join(","),
            "--max-tokens",
            "2",
            "--temperature",
            "0",
            "--numerics",
            numerics,
            "--ctx",
            "64",
        ],
    ] {
        let child = std::process::Command::new(bin())
            .args(&args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let o = child.wait_with_output().unwrap();
        let err = stderr(&o);
        match o.status.code() {
            Some(0) => {}
            Some(1) if err.starts_with("error: ") && err.trim_end().lines().count() == 1 => {}
            code => {
                return Err(format!(
                    "{} exited {code:?} with {:?}",
                    args[0],
                    err.chars().take(400).collect::<String>()
                ));
            }
        }
    }
    Ok(())
}

#[test]
fn mutated_checkpoints_never_panic_abort_or_hang() {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let cases = env("DSFLASH_FUZZ_CASES", DEFAULT_CASES);
    let first = env("DSFLASH_FUZZ_FIRST", 0);
    let models: Vec<Model> = FIXTURES.iter().map(|f| load(f)).collect();
    let next = AtomicU64::new(first);
    let failures = Mutex::new(Vec::<String>::new());
    let (opened, ran, errors) = (
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    );
    let workers = 2usize;
    // Watchdog: each worker's case and when it started (0 = idle).
    let started: Vec<AtomicU64> = (0..workers).map(|_| AtomicU64::new(0)).collect();
    let current: Vec<AtomicU64> = (0..workers).map(|_| AtomicU64::new(0)).collect();
    let epoch = Instant::now();
    let done = std::sync::atomic::AtomicBool::new(false);
    let tmp = tempfile::tempdir().unwrap();
    // Panics are the finding: keep their messages short in the log.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("panic: {info}");
    }));
    std::thread::scope(|sc| {
        sc.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(500));
                for w in 0..workers {
                    let s = started[w].load(Ordering::Relaxed);
                    let now = epoch.elapsed().as_millis() as u64;
                    if s != 0 && now.saturating_sub(s) > 60_000 {
                        let case = current[w].load(Ordering::Relaxed);
                        eprintln!(
                            "fuzz case {case} hangs (> 60 s): {}",
                            make_case(&models, case).what
                        );
                        std::process::abort();
                    }
                }
            }
        });
        let run_worker = |w: usize| {
            let dir: PathBuf = tmp.path().join(format!("w{w}"));
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= first + cases {
                    break;
                }
                let c = make_case(&models, i);
                current[w].store(i, Ordering::Relaxed);
                started[w].store(epoch.elapsed().as_millis().max(1) as u64, Ordering::Relaxed);
                let r =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_in_memory(&c)));
                match r {
                    Ok(Ok(())) => {
                        opened.fetch_add(1, Ordering::Relaxed);
                        ran.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        if e.contains('\n') {
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("case {i} ({}): multi-line error {e:?}", c.what));
                        }
                    }
                    Err(_) => failures
                        .lock()
                        .unwrap()
                        .push(format!("case {i} ({}): panicked", c.what)),
                }
                if i.is_multiple_of(64)
                    && let Err(e) = run_binary(&c, &dir)
                {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("case {i} ({}): binary: {e}", c.what));
                }
                started[w].store(0, Ordering::Relaxed);
            }
        };
        // A panic in the harness itself must still stop the watchdog, then fail the test.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            std::thread::scope(|inner| {
                for w in 0..workers {
                    inner.spawn(move || run_worker(w));
                }
            })
        }));
        done.store(true, Ordering::Relaxed);
        if let Err(p) = r {
            std::panic::resume_unwind(p);
        }
    });
    let _ = std::panic::take_hook();
    let f = failures.into_inner().unwrap();
    eprintln!(
        "fuzz: {cases} cases from {first} in {:.0} s: {} ran to 2 tokens, {} refused with an error, {} findings",
        epoch.elapsed().as_secs_f64(),
        ran.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        f.len()
    );
    let _ = opened;
    assert!(f.is_empty(), "{} findings:\n{}", f.len(), f.join("\n"));
}
