//! The front ends end to end: one-shot (`-p`, stdin pipe, `--json`), `prompt`, errors and
//! signals, on the full-vocabulary tiny oracle checkpoint with the real tokenizer. Answers are
//! compared with transformers' greedy continuation of the same conversation
//! (tests/fixtures/tiny-vocab/chat-goldens.json, by scripts/make_chat_goldens.py).

mod common;
use common::*;
use std::io::Read;
use std::process::{Command, Stdio};

fn golden(name: &str) -> serde_json::Value {
    let g: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("tiny-vocab/chat-goldens.json")).unwrap())
            .unwrap();
    g[name].clone()
}

/// dsflash on tiny-vocab with the real tokenizer, greedy, ideal numerics, 12 tokens.
fn talk_cmd(extra: &[&str]) -> Command {
    talk_cmd_n(12, extra)
}

fn talk_cmd_n(max_tokens: usize, extra: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.args(["--model", fixture("tiny-vocab").to_str().unwrap()])
        .args(["--tokenizer", tokenizer_path().to_str().unwrap()])
        .args(["--temperature", "0", "--numerics", "ideal", "--no-think"])
        .args(["--max-tokens", &max_tokens.to_string()])
        .args(extra);
    c
}

#[test]
fn one_shot_answer_matches_oracle() {
    let g = golden("hello");
    let o = run_with_stdin(talk_cmd(&["-p", "Hello there"]), b"");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        format!("{}\n", g["greedy_text"].as_str().unwrap())
    );
    // stderr not a terminal: no stats, no reasoning; only why the answer stopped (12 tokens).
    assert_eq!(
        stderr(&o),
        "dsflash: stopped at --max-tokens 12 (raise it for a complete answer)\n"
    );
}

#[test]
fn one_shot_with_system_prompt() {
    let g = golden("system");
    let o = run_with_stdin(
        talk_cmd(&["-p", "What is 2+2?", "--system", "You are terse."]),
        b"",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o).trim_end_matches('\n'),
        g["greedy_text"].as_str().unwrap()
    );
}

#[test]
fn stdin_pipe_then_prompt() {
    // `printf 'line one\nline two\n' | dsflash -p Summarise`: stdin, a blank line, then -p.
    let g = golden("piped");
    let o = run_with_stdin(talk_cmd(&["-p", "Summarise"]), b"line one\nline two\n");
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        stdout(&o).trim_end_matches('\n'),
        g["greedy_text"].as_str().unwrap()
    );
}

#[test]
fn json_output() {
    let g = golden("hello");
    let o = run_with_stdin(talk_cmd(&["-p", "Hello there", "--json"]), b"");
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_str(stdout(&o).trim()).expect("one JSON object");
    assert_eq!(j["answer"], g["greedy_text"]);
    assert_eq!(
        j["prompt_tokens"],
        g["prompt_ids"].as_array().unwrap().len()
    );
    assert_eq!(j["generated_tokens"], 12);
    assert_eq!(j["stop"], "length");
    assert_eq!(j["mode"], "no-think");
    assert!(j["seed"].is_u64(), "the seed that reproduces it");
    assert!(j["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn prompt_command_text_and_ids() {
    let d = tempfile::tempdir().unwrap();
    let m = d.path().join("m.json");
    std::fs::write(
        &m,
        r#"[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"What is 2+2?"}]"#,
    )
    .unwrap();
    let m = m.to_str().unwrap();
    let o = run(&["prompt", "--messages", m, "--no-think"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Spec §8.2 (a), byte for byte, and its ids.
    assert_eq!(
        stdout(&o),
        "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>What is 2+2?<｜Assistant｜></think>"
    );
    let o = run(&[
        "prompt",
        "--messages",
        m,
        "--no-think",
        "--format",
        "ids",
        "--tokenizer",
        tokenizer_path().to_str().unwrap(),
    ]);
    assert_eq!(
        stdout(&o).trim(),
        "0,3476,477,260,11502,22896,16,128803,3085,344,223,20,13,20,33,128804,128822"
    );
    // (b) thinking mode is the default.
    let o = run(&["prompt", "--messages", m]);
    assert!(stdout(&o).ends_with("<｜Assistant｜><think>"));
    // Mode flags are exclusive; a bad file is a one-line error naming the flag.
    assert_eq!(
        run(&["prompt", "--messages", m, "--think", "--no-think"])
            .status
            .code(),
        Some(2)
    );
    let o = run(&["prompt", "--messages", "/nonexistent.json"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--messages /nonexistent.json"));
}

#[test]
fn closed_stdout_is_a_clean_exit() {
    let o = close_stdout_early(talk_cmd_n(5000, &["-p", "Hello there"]));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"));
}

#[test]
fn sigterm_mid_answer_is_a_clean_exit() {
    let mut c = talk_cmd_n(100_000, &["-p", "Hello there"]);
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut buf = [0u8; 8];
    out.read_exact(&mut buf).unwrap(); // generating now
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let mut rest = Vec::new();
    out.read_to_end(&mut rest).unwrap();
    let o = child.wait_with_output().unwrap();
    // 128 + SIGTERM, as shells report it.
    assert_eq!(o.status.code(), Some(143), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"));
    assert!(rest.ends_with(b"\n"), "output ends cleanly");
}

#[test]
fn errors_exit_codes_and_messages() {
    // Empty input: usage error.
    let o = run_with_stdin(talk_cmd(&[]), b"  \n");
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("empty input"));
    // Prompt over --ctx: refused before any compute.
    let o = run_with_stdin(talk_cmd(&["-p", "Hello there", "--ctx", "4"]), b"");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--ctx is 4"), "{}", stderr(&o));
    assert!(stdout(&o).is_empty());
    // Invalid UTF-8 on stdin.
    let o = run_with_stdin(talk_cmd(&["-p", "x"]), b"ok \xff\xfe bad");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("stdin is not valid UTF-8") && stderr(&o).contains("offset 3"),
        "{}",
        stderr(&o)
    );
    // Bad flags: usage errors.
    let o = run_with_stdin(talk_cmd(&["-p", "x", "--top-p", "5"]), b"");
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--top-p 5"), "{}", stderr(&o));
    let o = run_with_stdin(talk_cmd(&["-p", "x", "--min-p=-0.5"]), b"");
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--min-p"), "{}", stderr(&o));
    let o = run_with_stdin(talk_cmd(&["-p", "x", "--think"]), b"");
    assert_eq!(
        o.status.code(),
        Some(2),
        "--think conflicts with --no-think"
    );
    let o = run_with_stdin(talk_cmd(&["-p", "x", "--frobnicate"]), b"");
    assert_eq!(o.status.code(), Some(2));
    // A tokenizer that does not exist.
    let mut c = Command::new(bin());
    c.args([
        "--model",
        fixture("tiny-vocab").to_str().unwrap(),
        "-p",
        "x",
        "--tokenizer",
        "/nonexistent/tokenizer.json",
    ]);
    let o = run_with_stdin(c, b"");
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("/nonexistent/tokenizer.json"));
    assert!(!stderr(&o).contains("panicked"));
}
