//! The prompt cache from the command line: a second one-shot run over the same stdin with
//! another question restores the input's state and prefills only the rest, and answers what
//! a run without the cache answers. Whatever happens to the cache (damaged files, another
//! model's files, a full disk, a read-only directory, two processes writing at once) the
//! answer is the fresh one and the exit code 0.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// About 330 tokens of input: 10 chunks of 32 and some.
fn doc() -> String {
    (0..24)
        .map(|i| format!("Line {i}: the quick brown fox jumps over the lazy dog number {i}.\n"))
        .collect()
}

fn cmd(cache: &Path, q: &str, extra: &[&str]) -> Command {
    cmd_on(&fixture("tiny-vocab"), cache, q, extra)
}

fn cmd_on(model: &Path, cache: &Path, q: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.args(["--model", model.to_str().unwrap()])
        .args(["--tokenizer", tokenizer_path().to_str().unwrap()])
        .args(["--temperature", "0", "--no-think", "--max-tokens", "6"])
        .args(["--prefill-chunk", "32", "--json", "--verbose"])
        .args(["--cache-dir", cache.to_str().unwrap(), "-p", q])
        .args(extra);
    c
}

struct Answer {
    text: String,
    prompt: u64,
    prefilled: u64,
    cached: u64,
    stderr: String,
}

fn parse(o: std::process::Output) -> Answer {
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_str(stdout(&o).trim()).expect("one JSON line");
    let n = |k: &str| j[k].as_u64().unwrap_or_else(|| panic!("{k} in {j}"));
    Answer {
        text: j["answer"].as_str().unwrap().to_string(),
        prompt: n("prompt_tokens"),
        prefilled: n("prefilled_tokens"),
        cached: n("cached_tokens"),
        stderr: stderr(&o),
    }
}

fn ask(cache: &Path, q: &str, extra: &[&str]) -> Answer {
    parse(run_with_stdin(cmd(cache, q, extra), doc().as_bytes()))
}

fn ask_on(model: &Path, cache: &Path, q: &str) -> Answer {
    parse(run_with_stdin(
        cmd_on(model, cache, q, &[]),
        doc().as_bytes(),
    ))
}

/// The answer without the cache.
fn fresh(q: &str) -> String {
    let none = tempfile::tempdir().unwrap();
    let a = ask(none.path(), q, &["--no-cache"]);
    assert_eq!(a.cached, 0);
    assert!(
        std::fs::read_dir(none.path()).unwrap().next().is_none(),
        "--no-cache wrote"
    );
    a.text
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(files(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

fn states(dir: &Path) -> Vec<PathBuf> {
    files(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "dss"))
        .collect()
}

fn temps(dir: &Path) -> Vec<PathBuf> {
    files(dir)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect()
}

const Q1: &str = "Which line mentions number 7?";
const Q2: &str = "Summarise the text in one word.";

#[test]
fn a_second_question_over_the_same_input_starts_from_the_cache() {
    let d = tempfile::tempdir().unwrap();
    let first = ask(d.path(), Q1, &[]);
    assert_eq!((first.cached, first.prefilled), (0, first.prompt));
    assert_eq!(first.text, fresh(Q1));
    // Kept: the input's last chunk boundary and the prompt's.
    assert_eq!(states(d.path()).len(), 2, "{:?}", files(d.path()));

    // Everything up to the end of the input from the cache: only the question is new.
    let second = ask(d.path(), Q2, &[]);
    assert!(second.cached >= 300, "{} from the cache", second.cached);
    assert!(second.prefilled <= 20, "{} prefilled", second.prefilled);
    assert_eq!(second.prefilled, second.prompt - second.cached);
    assert_eq!(second.text, fresh(Q2));

    // The same question again: all but the last token from the cache.
    let again = ask(d.path(), Q1, &[]);
    assert_eq!(again.cached, first.prompt - 1);
    assert_eq!(again.text, first.text);

    let list = run(&["cache", "list", "--cache-dir", d.path().to_str().unwrap()]);
    let text = stdout(&list);
    assert!(list.status.success(), "{}", stderr(&list));
    assert!(
        text.contains(" steps ") && text.contains("states,"),
        "{text}"
    );
    assert_eq!(text.matches(" steps ").count(), states(d.path()).len());
    let clear = run(&["cache", "clear", "--cache-dir", d.path().to_str().unwrap()]);
    assert!(clear.status.success(), "{}", stderr(&clear));
    assert!(states(d.path()).is_empty());
}

#[test]
fn damaged_files_are_skipped_and_removed() {
    let f1 = fresh(Q1);
    type Damage = fn(&mut Vec<u8>);
    let damages: [(&str, Damage); 2] = [
        ("truncated", |b| b.truncate(b.len() / 2)),
        ("a flipped byte", |b| {
            let i = b.len() / 2;
            b[i] ^= 1;
        }),
    ];
    for (what, damage) in damages {
        let d = tempfile::tempdir().unwrap();
        ask(d.path(), Q2, &[]);
        for f in states(d.path()) {
            let mut b = std::fs::read(&f).unwrap();
            damage(&mut b);
            std::fs::write(&f, b).unwrap();
        }
        let a = ask(d.path(), Q1, &[]);
        assert_eq!(a.cached, 0, "{what}: used");
        assert_eq!(a.text, f1, "{what}");
        assert!(a.stderr.contains("removed"), "{what}: {}", a.stderr);
    }
}

/// Plant the states one engine wrote under the names another engine looks for; returns how
/// many were planted.
fn plant(d: &Path, from: &[PathBuf], into: &[PathBuf]) -> usize {
    let mut n = 0;
    for f in into {
        if let Some(twin) = from.iter().find(|i| i.file_name() == f.file_name()) {
            std::fs::copy(twin, f).unwrap();
            n += 1;
        }
    }
    assert!(states(d).len() >= n);
    n
}

#[test]
fn another_models_or_numerics_files_are_skipped() {
    // Another model: the same files with another rope_theta in config.json (the same
    // tokenizer, so the same prompt and the same file names).
    let other = copy_dir(&fixture("tiny-vocab"));
    let cfg = other.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("\"rope_theta\": 10000", "\"rope_theta\": 20000"),
    )
    .unwrap();
    for what in ["another model", "another numerics"] {
        let d = tempfile::tempdir().unwrap();
        match what {
            "another model" => ask_on(other.path(), d.path(), Q1),
            _ => ask(d.path(), Q1, &["--numerics", "ideal"]),
        };
        let foreign = states(d.path());
        ask(d.path(), Q1, &[]);
        let ours: Vec<PathBuf> = states(d.path())
            .into_iter()
            .filter(|p| !foreign.contains(p))
            .collect();
        assert_eq!(
            plant(d.path(), &foreign, &ours),
            ours.len(),
            "{what}: same names"
        );
        let a = ask(d.path(), Q1, &[]);
        assert_eq!(a.cached, 0, "{what}: used");
        assert_eq!(a.text, fresh(Q1), "{what}");
        assert!(
            a.stderr.contains("another model or setting"),
            "{what}: {}",
            a.stderr
        );
    }
}

#[test]
fn a_full_disk_is_a_note_not_an_error() {
    let d = tempfile::tempdir().unwrap();
    // A file size limit of 4 KiB: every state is larger.
    let c = cmd(d.path(), Q1, &[]);
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg("ulimit -f 8 && exec \"$@\"")
        .arg("sh")
        .arg(c.get_program())
        .args(c.get_args());
    let a = parse(run_with_stdin(sh, doc().as_bytes()));
    assert_eq!(a.text, fresh(Q1));
    assert!(a.stderr.contains("not saved"), "{}", a.stderr);
    assert!(states(d.path()).is_empty() && temps(d.path()).is_empty());
}

/// Make `dir` unwritable: chmod, and where that does not stop us (root), the immutable
/// attribute. Returns false when neither works here.
fn read_only(dir: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    let probe = dir.join("probe");
    if std::fs::write(&probe, b"x").is_err() {
        return true;
    }
    let _ = std::fs::remove_file(&probe);
    let ok = Command::new("chattr")
        .arg("+i")
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success());
    ok && std::fs::write(&probe, b"x").is_err()
}

fn writable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = Command::new("chattr").arg("-i").arg(dir).status();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn a_read_only_cache_is_read_and_never_written() {
    let d = tempfile::tempdir().unwrap();
    ask(d.path(), Q1, &[]);
    let engine_dir = states(d.path())[0].parent().unwrap().to_path_buf();
    if !read_only(&engine_dir) {
        writable(&engine_dir);
        eprintln!("skipped: cannot make a directory read-only here");
        return;
    }
    let before = states(d.path());
    let a = ask(d.path(), Q2, &[]);
    let b = ask(d.path(), Q2, &["--cache-max", "1"]);
    writable(&engine_dir);
    assert!(a.cached >= 300, "read from the read-only cache");
    assert_eq!(a.text, fresh(Q2));
    assert_eq!(b.text, a.text);
    assert_eq!(states(d.path()), before, "nothing written or removed");

    // A cache directory that cannot even be created.
    let e = tempfile::tempdir().unwrap();
    if read_only(e.path()) {
        let c = ask(&e.path().join("cache"), Q1, &[]);
        writable(e.path());
        assert_eq!(c.text, fresh(Q1));
        assert!(c.stderr.contains("not saved"), "{}", c.stderr);
    } else {
        writable(e.path());
    }
}

#[test]
fn two_processes_writing_the_same_prefix_at_once() {
    let d = tempfile::tempdir().unwrap();
    let spawn = || {
        let d = d.path().to_path_buf();
        std::thread::spawn(move || parse(run_with_stdin(cmd(&d, Q1, &[]), doc().as_bytes())))
    };
    let (x, y) = (spawn(), spawn());
    let (x, y) = (x.join().unwrap(), y.join().unwrap());
    let f1 = fresh(Q1);
    assert_eq!(
        (x.text.as_str(), y.text.as_str()),
        (f1.as_str(), f1.as_str())
    );
    assert!(temps(d.path()).is_empty(), "{:?}", files(d.path()));
    assert_eq!(states(d.path()).len(), 2);
    let a = ask(d.path(), Q1, &[]);
    assert!(a.cached > 0);
    assert_eq!(a.text, f1);
}
