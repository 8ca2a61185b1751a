//! `dsflash download` against a real HTTP server on loopback that serves the hub's URL layout:
//! full download into the standard cache, resume (within a run and across runs) transferring
//! only the missing bytes, wrong hash, error statuses, offline mode, disk pre-flight and a
//! file-size limit, progress bar only on a terminal.

mod common;
#[path = "common/hub_server.rs"]
mod hub_server;
use common::*;
use hub_server::{COMMIT, HubServer, ServedFile};
use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

const REPO: &str = "test-org/tiny-v4";
const S1: &str = "model-00001-of-00002.safetensors";
const S2: &str = "model-00002-of-00002.safetensors";

/// The tiny oracle checkpoint as a hub repo (+ a small tokenizer.json and generation config).
fn files() -> HashMap<String, ServedFile> {
    files_of("tiny")
}

fn files_of(fixture_dir: &str) -> HashMap<String, ServedFile> {
    let mut m = HashMap::new();
    let dir = fixture(fixture_dir);
    for (name, lfs) in [
        ("config.json", false),
        ("model.safetensors.index.json", false),
        (S1, true),
        (S2, true),
    ] {
        m.insert(
            name.to_string(),
            ServedFile {
                data: std::fs::read(dir.join(name)).unwrap(),
                lfs,
                ..Default::default()
            },
        );
    }
    m.insert(
        "tokenizer.json".into(),
        ServedFile {
            data: b"{\"version\": \"1.0\"}".to_vec(),
            ..Default::default()
        },
    );
    m.insert(
        "generation_config.json".into(),
        ServedFile {
            data: b"{\"temperature\": 1.0}".to_vec(),
            ..Default::default()
        },
    );
    m
}

fn dl(server: &HubServer, cache: &Path, extra: &[&str]) -> Output {
    Command::new(bin())
        .args(["download", "--model", REPO])
        .args(extra)
        .env("HF_ENDPOINT", &server.url)
        .env("HF_HUB_CACHE", cache)
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN")
        .output()
        .unwrap()
}

fn snapshot(cache: &Path) -> std::path::PathBuf {
    cache
        .join("models--test-org--tiny-v4/snapshots")
        .join(COMMIT)
}

fn blob_dir(cache: &Path) -> std::path::PathBuf {
    cache.join("models--test-org--tiny-v4/blobs")
}

fn incompletes(cache: &Path) -> Vec<String> {
    std::fs::read_dir(blob_dir(cache))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".incomplete"))
                .collect()
        })
        .unwrap_or_default()
}

fn size(f: &str) -> u64 {
    std::fs::metadata(fixture("tiny").join(f)).unwrap().len()
}

#[test]
fn full_download_lands_in_the_standard_cache_and_loads() {
    let server = HubServer::start(REPO, files());
    let cache = tempfile::tempdir().unwrap();
    let o = dl(&server, cache.path(), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let snap = snapshot(cache.path());
    for f in [
        "config.json",
        "model.safetensors.index.json",
        S1,
        S2,
        "tokenizer.json",
        "generation_config.json",
    ] {
        let p = snap.join(f);
        assert!(
            std::fs::symlink_metadata(&p)
                .unwrap()
                .file_type()
                .is_symlink(),
            "{f} is a link into blobs/"
        );
        if f != "tokenizer.json" && f != "generation_config.json" {
            assert_eq!(
                std::fs::read(&p).unwrap(),
                std::fs::read(fixture("tiny").join(f)).unwrap(),
                "{f}"
            );
        }
    }
    let refs =
        std::fs::read_to_string(cache.path().join("models--test-org--tiny-v4/refs/main")).unwrap();
    assert_eq!(refs.trim(), COMMIT);
    assert!(incompletes(cache.path()).is_empty());
    // Each shard crossed the wire exactly once.
    assert_eq!(server.bytes_sent(S1), size(S1));
    assert_eq!(server.bytes_sent(S2), size(S2));
    // The cache is usable by repo id.
    let o = Command::new(bin())
        .args(["inspect", "--json", "--model", REPO])
        .env("HF_HUB_CACHE", cache.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["tensor_count"], 508);
    // Running again fetches nothing.
    let before = server.bytes_sent(S1) + server.bytes_sent(S2);
    let o = dl(&server, cache.path(), &[]);
    assert!(o.status.success());
    assert_eq!(
        server.bytes_sent(S1) + server.bytes_sent(S2),
        before,
        "completed files are never fetched again"
    );
    assert!(stderr(&o).contains("0 bytes fetched"), "{}", stderr(&o));
}

#[test]
fn dropped_connection_resumes_within_the_run() {
    let server = HubServer::start(REPO, files());
    server.with_file(S2, |f| {
        f.drop_after = Some(1 << 20);
        f.drop_times = 2;
    });
    let cache = tempfile::tempdir().unwrap();
    let o = dl(&server, cache.path(), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(server.gets(S2), 3, "two dropped attempts, then the rest");
    assert_eq!(
        server.bytes_sent(S2),
        size(S2),
        "only the missing bytes were sent again"
    );
    assert_eq!(
        std::fs::read(snapshot(cache.path()).join(S2)).unwrap(),
        std::fs::read(fixture("tiny").join(S2)).unwrap()
    );
}

#[test]
fn interrupted_run_resumes_in_the_next_one() {
    let server = HubServer::start(REPO, files());
    // Every attempt of the first run (4 of them, each resuming) drops after 1 MiB, like a
    // network that keeps failing: 4 MiB of the 9.3 MB shard arrive.
    server.with_file(S2, |f| {
        f.drop_after = Some(1 << 20);
        f.drop_times = 4;
    });
    let cache = tempfile::tempdir().unwrap();
    let o = dl(&server, cache.path(), &[]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains(S2) && e.contains("run the same command again to resume"),
        "{e}"
    );
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    // Nothing under the final name; the partial data is kept.
    assert!(!snapshot(cache.path()).join(S2).exists());
    assert_eq!(incompletes(cache.path()).len(), 1);
    let sent_first = server.bytes_sent(S2);
    assert!(sent_first < size(S2));
    let o = dl(&server, cache.path(), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        server.bytes_sent(S2),
        size(S2),
        "the second run transferred only the missing bytes"
    );
    assert_eq!(
        std::fs::read(snapshot(cache.path()).join(S2)).unwrap(),
        std::fs::read(fixture("tiny").join(S2)).unwrap()
    );
}

#[test]
fn wrong_hash_is_detected_and_the_partial_deleted() {
    let server = HubServer::start(REPO, files());
    server.with_file(S1, |f| f.corrupt = true);
    let cache = tempfile::tempdir().unwrap();
    let o = dl(&server, cache.path(), &[]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains(S1) && e.contains("sha256 mismatch") && e.contains("deleted"),
        "{e}"
    );
    assert!(!snapshot(cache.path()).join(S1).exists());
    assert!(
        incompletes(cache.path()).is_empty(),
        "partial data of the bad file removed"
    );
}

#[test]
fn error_statuses_are_clear() {
    for (file, code, want) in [
        ("config.json", 404, "not found"),
        ("config.json", 401, "HF_TOKEN"),
        (S1, 500, "HTTP 500"),
    ] {
        let server = HubServer::start(REPO, files());
        server.with_file(file, |f| f.status = Some(code));
        let cache = tempfile::tempdir().unwrap();
        let o = dl(&server, cache.path(), &[]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{code}: {e}");
        assert!(e.contains(want) && e.contains(file), "{code}: {e}");
        assert_eq!(e.trim_end().lines().count(), 1, "{e}");
        assert!(!e.contains("panicked"));
    }
    // A repo that does not exist.
    let server = HubServer::start("someone/else", files());
    let cache = tempfile::tempdir().unwrap();
    let o = dl(&server, cache.path(), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not found"), "{}", stderr(&o));
}

#[test]
fn offline_mode_uses_the_cache_and_makes_no_request() {
    let server = HubServer::start(REPO, files());
    let cache = tempfile::tempdir().unwrap();
    assert!(dl(&server, cache.path(), &[]).status.success());
    let n = server.requests();
    let o = Command::new(bin())
        .args(["download", "--model", REPO])
        .env("HF_ENDPOINT", &server.url)
        .env("HF_HUB_CACHE", cache.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(server.requests(), n, "no request in offline mode");
    // Offline with an empty cache: a clear error, still no request.
    let empty = tempfile::tempdir().unwrap();
    let o = Command::new(bin())
        .args(["download", "--model", REPO])
        .env("HF_ENDPOINT", &server.url)
        .env("HF_HUB_CACHE", empty.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("HF_HUB_OFFLINE=1"), "{}", stderr(&o));
    assert_eq!(server.requests(), n);
}

#[test]
fn not_enough_disk_space_is_refused_before_fetching() {
    let server = HubServer::start(REPO, files());
    // The hub says the second shard is 1 PB.
    server.with_file(S2, |f| f.fake_size = Some(1 << 50));
    let cache = tempfile::tempdir().unwrap();
    let o = dl(&server, cache.path(), &[]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("not enough disk space") && e.contains("--force"),
        "{e}"
    );
    assert_eq!(
        server.gets(S1) + server.gets(S2),
        0,
        "no shard byte fetched"
    );
    assert!(incompletes(cache.path()).is_empty());
}

#[test]
fn a_file_size_limit_fails_cleanly_without_half_named_files() {
    // `ulimit -f` (512-byte blocks): writes past 2 MiB fail with EFBIG.
    let server = HubServer::start(REPO, files());
    let cache = tempfile::tempdir().unwrap();
    let script = format!("ulimit -f 4096; exec {} download --model {REPO}", bin());
    let o = Command::new("sh")
        .args(["-c", &script])
        .env("HF_ENDPOINT", &server.url)
        .env("HF_HUB_CACHE", cache.path())
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("write failed"), "{e}");
    // Neither shard is visible under its name.
    assert!(!snapshot(cache.path()).join(S1).exists() || !snapshot(cache.path()).join(S2).exists());
    for f in [S1, S2] {
        let p = snapshot(cache.path()).join(f);
        if p.exists() {
            assert_eq!(
                std::fs::read(&p).unwrap(),
                std::fs::read(fixture("tiny").join(f)).unwrap(),
                "complete if visible"
            );
        }
    }
}

#[test]
fn into_a_plain_directory() {
    let server = HubServer::start(REPO, files());
    let d = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let o = dl(
        &server,
        cache.path(),
        &["--dir", d.path().to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(d.path().join(S2)).unwrap(),
        std::fs::read(fixture("tiny").join(S2)).unwrap()
    );
    let o = run(&["inspect", "--json", "--model", d.path().to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn progress_only_on_a_terminal() {
    // stderr not a terminal: no bar.
    let server = HubServer::start(REPO, files());
    let cache = tempfile::tempdir().unwrap();
    let o = dl(&server, cache.path(), &[]);
    assert!(o.status.success());
    assert!(!stderr(&o).contains("total "), "{}", stderr(&o));
    // In a pseudo-terminal: the overall bar (bytes, rate, ETA) and the current file. Slow the
    // transfer down (drops with retries) so the bar is drawn.
    let server = HubServer::start(REPO, files());
    server.with_file(S2, |f| {
        f.drop_after = Some(1 << 20);
        f.drop_times = 3;
    });
    let cache = tempfile::tempdir().unwrap();
    let mut c = Command::new(bin());
    c.args(["download", "--model", REPO])
        .env("HF_ENDPOINT", &server.url)
        .env("HF_HUB_CACHE", cache.path())
        .env_remove("HF_HUB_OFFLINE")
        .env("TERM", "xterm");
    let mut p = rexpect::session::spawn_command(c, Some(30_000)).unwrap();
    p.exp_string("total").expect("overall bar");
    p.exp_string("ETA").expect("ETA");
    p.exp_eof().unwrap();
}

#[test]
fn missing_model_in_a_pipe_names_the_command() {
    let cache = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin())
        .args(["--model", REPO, "-p", "hi"])
        .env("HF_HUB_CACHE", cache.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdin.take());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains(&format!("dsflash download --model {REPO}")),
        "{e}"
    );
    assert_eq!(e.trim_end().lines().count(), 1);
}

#[test]
fn first_run_on_a_terminal_offers_the_download() {
    // The full-vocabulary tiny model, so the real tokenizer fits it.
    let server = HubServer::start(REPO, files_of("tiny-vocab"));
    let cache = tempfile::tempdir().unwrap();
    let mut c = Command::new(bin());
    c.args([
        "--model",
        REPO,
        "--tokenizer",
        tokenizer_path().to_str().unwrap(),
    ])
    .env("HF_ENDPOINT", &server.url)
    .env("HF_HUB_CACHE", cache.path())
    .env("HOME", cache.path())
    .env_remove("HF_HUB_OFFLINE")
    .env("TERM", "xterm");
    let mut p = rexpect::session::spawn_command(c, Some(60_000)).unwrap();
    p.exp_string("Download it now? [y/N]")
        .expect("asked on a terminal");
    p.send_line("y").unwrap();
    p.exp_string("/help for commands")
        .expect("the chat starts after the download");
    p.send_control('d').unwrap();
    p.exp_eof().unwrap();
    assert!(snapshot(cache.path()).join(S2).exists());
}

#[test]
fn memory_preflight_counts_ram_and_gpu_memory() {
    // The hub says the second shard is 1 GB more than this machine's RAM.
    let ram: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap()
        * 1024;
    let cache = tempfile::tempdir().unwrap();
    let fake = ram + (1 << 30);
    // All but the last MiB of that shard is already here as a sparse partial file, so the
    // weights exceed RAM while what is left to fetch fits any disk (the disk check comes
    // first and must not be what refuses).
    let etag: String = {
        use sha2::Digest;
        let d = sha2::Sha256::digest(std::fs::read(fixture("tiny").join(S2)).unwrap());
        d.iter().map(|b| format!("{b:02x}")).collect()
    };
    std::fs::create_dir_all(blob_dir(cache.path())).unwrap();
    std::fs::File::create(blob_dir(cache.path()).join(format!("{etag}.incomplete")))
        .unwrap()
        .set_len(fake - (1 << 20))
        .unwrap();
    let server = HubServer::start(REPO, files());
    server.with_file(S2, |f| f.fake_size = Some(fake));
    let bin_dir = tempfile::tempdir().unwrap();
    let run_with_path = |path: &str| {
        Command::new(bin())
            .args(["download", "--model", REPO])
            .env("HF_ENDPOINT", &server.url)
            .env("HF_HUB_CACHE", cache.path())
            .env("PATH", path)
            .env_remove("HF_HUB_OFFLINE")
            .output()
            .unwrap()
    };
    // No GPU: refused, naming RAM and GPU memory, before any shard byte.
    let o = run_with_path(bin_dir.path().to_str().unwrap());
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        e.contains("of RAM + 0.0 GB of GPU memory") && e.contains("--force"),
        "{e}"
    );
    assert_eq!(server.gets(S2), 0);
    // A 4 GB GPU (a stand-in nvidia-smi on PATH) makes RAM + VRAM enough: the check passes
    // and the download proceeds (then fails on the advertised size, which it cannot get).
    let smi = bin_dir.path().join("nvidia-smi");
    std::fs::write(&smi, "#!/bin/sh\necho 4096\n").unwrap();
    let mut p = std::fs::metadata(&smi).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut p, 0o755);
    std::fs::set_permissions(&smi, p).unwrap();
    let o = run_with_path(&format!("{}:/usr/bin:/bin", bin_dir.path().display()));
    let e = stderr(&o);
    assert!(!e.contains("GPU memory"), "{e}");
    assert!(server.gets(S2) > 0, "the shard was requested: {e}");
}

/// Run `download` with extra environment, killed after `limit` (returns None then).
fn dl_within(
    server: &HubServer,
    cache: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
    limit: std::time::Duration,
) -> Option<Output> {
    let mut c = Command::new(bin());
    c.args(["download", "--model", REPO])
        .args(extra)
        .env("HF_ENDPOINT", &server.url)
        .env("HF_HUB_CACHE", cache)
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().unwrap();
    let t = std::time::Instant::now();
    while t.elapsed() < limit {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Every regular file under `root`, recursively (links not followed).
fn files_under(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

#[test]
fn a_hostile_etag_or_commit_never_becomes_a_path() {
    for (what, edit, header) in [
        (
            "etag",
            Box::new(|f: &mut ServedFile| f.etag_header = Some("../../../../escaped".into()))
                as Box<dyn Fn(&mut ServedFile)>,
            "ETag",
        ),
        (
            "commit",
            Box::new(|f: &mut ServedFile| f.commit_header = Some("../../../escaped-dir".into())),
            "X-Repo-Commit",
        ),
    ] {
        for file in ["config.json", S1] {
            let server = HubServer::start(REPO, files());
            server.with_file(file, |f| edit(f));
            let root = tempfile::tempdir().unwrap();
            let cache = root.path().join("a/b/c/cache");
            let o = dl(&server, &cache, &[]);
            assert_eq!(o.status.code(), Some(1), "{what} {file}: {}", stderr(&o));
            let e = stderr(&o);
            assert!(
                e.contains(header) && e.contains(file) && e.trim_end().lines().count() == 1,
                "{what} {file}: {e}"
            );
            // Nothing anywhere outside the cache, and nothing named after the header.
            for p in files_under(root.path()) {
                assert!(
                    p.starts_with(&cache),
                    "{what} {file}: wrote {}",
                    p.display()
                );
                assert!(!p.to_string_lossy().contains("escaped"), "{}", p.display());
            }
        }
    }
    // An absolute commit: the refs file would have pointed at it.
    let server = HubServer::start(REPO, files());
    for f in [
        "config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
    ] {
        server.with_file(f, |f| {
            f.commit_header = Some("/tmp/dsflash-absolute".into())
        });
    }
    let cache = tempfile::tempdir().unwrap();
    let o = dl(&server, cache.path(), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("X-Repo-Commit"), "{}", stderr(&o));
    assert!(!Path::new("/tmp/dsflash-absolute").exists());
}

#[test]
fn a_revision_that_leaves_the_cache_is_refused() {
    let server = HubServer::start(REPO, files());
    let cache = tempfile::tempdir().unwrap();
    for rev in ["../../x", "/abs", "a/../../b", ".hidden", "main/"] {
        let o = dl(&server, cache.path(), &["--revision", rev]);
        assert_eq!(o.status.code(), Some(1), "{rev}");
        assert!(stderr(&o).contains("--revision"), "{rev}: {}", stderr(&o));
    }
    assert_eq!(server.requests(), 0, "refused before any request");
    // A planted refs file pointing outside the cache is refused offline too.
    let refs = cache.path().join("models--test-org--tiny-v4/refs");
    std::fs::create_dir_all(&refs).unwrap();
    std::fs::write(refs.join("main"), "../../../../etc").unwrap();
    let o = Command::new(bin())
        .args(["download", "--model", REPO])
        .env("HF_HUB_CACHE", cache.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("40-digit hex commit"), "{}", stderr(&o));
}

#[test]
fn a_server_that_never_answers_times_out() {
    for (file, body_only) in [("config.json", false), (S2, false), (S2, true)] {
        let server = HubServer::start(REPO, files());
        server.with_file(file, |f| {
            f.stall = !body_only;
            f.stall_body = body_only;
        });
        let cache = tempfile::tempdir().unwrap();
        let t = std::time::Instant::now();
        let o = dl_within(
            &server,
            cache.path(),
            &[],
            &[
                ("HF_HUB_ETAG_TIMEOUT", "1"),
                ("HF_HUB_DOWNLOAD_TIMEOUT", "1"),
            ],
            std::time::Duration::from_secs(60),
        )
        .unwrap_or_else(|| panic!("{file}: download hung for 60 s"));
        assert_eq!(o.status.code(), Some(1), "{file}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(
            e.contains("timed out") || e.contains("imeout"),
            "{file}: {e}"
        );
        assert_eq!(e.trim_end().lines().count(), 1, "{e}");
        eprintln!("{file}: gave up after {:.1} s", t.elapsed().as_secs_f64());
    }
}

#[test]
fn a_slow_steady_transfer_is_not_cut() {
    let server = HubServer::start(REPO, files());
    // The whole shard takes ~3 s, longer than the 1 s limit, but no single wait does.
    let piece = (size(S1) / 8 + 1) as usize;
    server.with_file(S1, |f| f.trickle = Some((piece, 350)));
    let cache = tempfile::tempdir().unwrap();
    let o = dl_within(
        &server,
        cache.path(),
        &[],
        &[("HF_HUB_DOWNLOAD_TIMEOUT", "1")],
        std::time::Duration::from_secs(60),
    )
    .expect("finished");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(server.gets(S1), 1, "one GET: never cut and resumed");
    assert_eq!(server.bytes_sent(S1), size(S1));
}

#[test]
fn ctrl_c_keeps_the_partial_file_and_exits_130() {
    let server = HubServer::start(REPO, files());
    let piece = (size(S2) / 50 + 1) as usize;
    server.with_file(S2, |f| f.trickle = Some((piece, 200)));
    let cache = tempfile::tempdir().unwrap();
    let child = Command::new(bin())
        .args(["download", "--model", REPO])
        .env("HF_ENDPOINT", &server.url)
        .env("HF_HUB_CACHE", cache.path())
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while server.bytes_sent(S2) < 2 * piece as u64 {
        assert!(t.elapsed().as_secs() < 30, "the download did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let t = std::time::Instant::now();
    let o = child.wait_with_output().unwrap();
    assert!(t.elapsed().as_secs() < 5, "stopped promptly");
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(stderr(&o).contains("resume"), "{}", stderr(&o));
    assert_eq!(
        incompletes(cache.path()).len(),
        1,
        "the partial data is kept"
    );
}

#[test]
fn a_link_planted_at_the_partial_name_is_not_followed() {
    let server = HubServer::start(REPO, files());
    let cache = tempfile::tempdir().unwrap();
    let victim = cache.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    // The partial name of the first shard is predictable: blobs/<sha256>.incomplete.
    let etag: String = {
        use sha2::Digest;
        let d = sha2::Sha256::digest(std::fs::read(fixture("tiny").join(S1)).unwrap());
        d.iter().map(|b| format!("{b:02x}")).collect()
    };
    std::fs::create_dir_all(blob_dir(cache.path())).unwrap();
    std::os::unix::fs::symlink(
        &victim,
        blob_dir(cache.path()).join(format!("{etag}.incomplete")),
    )
    .unwrap();
    let o = dl(&server, cache.path(), &[]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains(".incomplete"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
}
