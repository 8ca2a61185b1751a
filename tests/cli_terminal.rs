//! The terminal experience as a new user meets it, on the full-vocabulary tiny model with the
//! real tokenizer: prefill progress on a terminal, why an answer stopped, prompt exits on
//! signals, usage errors, a random default seed, the familiar flags, `~` in chat commands.

mod common;
use common::*;
use rexpect::session::spawn_command;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// dsflash on tiny-vocab with the real tokenizer (ideal numerics), plus `extra`.
fn talk(extra: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.args(["--model", fixture("tiny-vocab").to_str().unwrap()])
        .args(["--tokenizer", tokenizer_path().to_str().unwrap()])
        .args(["--numerics", "ideal"])
        .args(extra);
    c
}

/// The chat in a pseudo-terminal (greedy, no thinking, `n` tokens per answer, `home` as
/// HOME), past its banner.
fn chat(home: &std::path::Path, n: &str) -> rexpect::session::PtySession {
    chat_with(home, n, &[])
}

fn chat_with(home: &std::path::Path, n: &str, extra: &[&str]) -> rexpect::session::PtySession {
    let mut c = talk(&["--no-think", "--temperature", "0", "-n", n]);
    c.args(extra);
    c.env("HOME", home)
        .env_remove("XDG_DATA_HOME")
        .env("NO_COLOR", "1")
        .env("TERM", "xterm");
    let mut p = spawn_command(c, Some(60_000)).expect("spawn in a pty");
    p.exp_string("/help for commands")
        .expect("the chat's banner");
    p
}

/// A text of about `words` words (several thousand tokens for the prefill).
fn long_text(words: usize) -> String {
    (0..words)
        .map(|i| ["alpha", "beta", "gamma", "delta", "omega"][i % 5].to_string() + &i.to_string())
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn a_long_prefill_shows_progress_on_a_terminal() {
    let text = long_text(1500);
    let mut c = talk(&["--no-think", "--temperature", "0", "--max-tokens", "2"]);
    c.args(["--prefill-chunk", "64", "-p", &text])
        .env("TERM", "xterm")
        .env("NO_COLOR", "1");
    let mut p = spawn_command(c, Some(120_000)).expect("spawn in a pty");
    let (_, line) = p
        .exp_regex(r"prefill [^\r\n]*\d+/\d+ tokens")
        .expect("a progress line during the prefill");
    assert!(line.contains("tokens"), "{line}");
    p.exp_eof().unwrap();
}

#[test]
fn why_an_answer_stopped_is_said() {
    // --max-tokens inside the reasoning: an empty answer with a note, `stop` in --json.
    let o = run_with_stdin(
        talk(&[
            "--think",
            "--temperature",
            "0",
            "-n",
            "3",
            "-p",
            "Hello there",
        ]),
        b"",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("stopped at --max-tokens 3 inside the reasoning"),
        "{e}"
    );
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    let o = run_with_stdin(
        talk(&[
            "--no-think",
            "--temperature",
            "0",
            "-n",
            "3",
            "--json",
            "-p",
            "Hello",
        ]),
        b"",
    );
    let j: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(j["stop"], "length");
    // The context filling up.
    let o = run_with_stdin(
        talk(&[
            "--no-think",
            "--temperature",
            "0",
            "-n",
            "50",
            "-c",
            "12",
            "-p",
            "Hello there",
        ]),
        b"",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("context is full"), "{}", stderr(&o));
}

#[test]
fn a_stop_string_ends_the_answer_before_it() {
    // The greedy answer to "Hello there" (tests/fixtures/tiny-vocab/chat-goldens.json).
    let g: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("tiny-vocab/chat-goldens.json")).unwrap())
            .unwrap();
    let full = g["hello"]["greedy_text"].as_str().unwrap().to_string();
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 6, "{full:?}");
    // Stop at the text starting at the 4th character: the answer is the first three.
    let stop: String = chars[3..5].iter().collect();
    let want: String = chars[..full.find(&stop).map_or(3, |i| full[..i].chars().count())]
        .iter()
        .collect();
    let o = run_with_stdin(
        talk(&[
            "--no-think",
            "--temperature",
            "0",
            "-n",
            "12",
            "--json",
            "-p",
            "Hello there",
            "--stop",
            &stop,
        ]),
        b"",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(
        j["answer"].as_str().unwrap(),
        want,
        "full answer {full:?}, stop {stop:?}"
    );
    assert_eq!(j["stop"], "stop");
}

#[test]
fn ctrl_c_during_a_long_prefill_exits_130_at_once() {
    let text = long_text(8000);
    let mut child = talk(&["--no-think", "-p", "Summarise"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut i = child.stdin.take().unwrap();
    i.write_all(text.as_bytes()).unwrap();
    drop(i);
    std::thread::sleep(Duration::from_millis(2500));
    assert!(child.try_wait().unwrap().is_none(), "still prefilling");
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let t = Instant::now();
    let o = child.wait_with_output().unwrap();
    let dt = t.elapsed();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(
        dt < Duration::from_millis(500),
        "exited {dt:?} after the signal"
    );
    assert!(stdout(&o).is_empty());
    assert!(!stderr(&o).contains("error"), "{}", stderr(&o));
}

#[test]
fn bad_flag_values_are_usage_errors() {
    let m = fixture("tiny");
    let m = m.to_str().unwrap();
    for (args, want) in [
        (
            vec!["generate", "-m", m, "--tokens", "0", "--temperature", "-1"],
            "--temperature",
        ),
        (
            vec!["generate", "-m", m, "--tokens", "0", "--top-p", "2"],
            "--top-p",
        ),
        (
            vec!["generate", "-m", m, "--tokens", "0", "--min-p", "1.5"],
            "--min-p",
        ),
        (
            vec!["generate", "-m", m, "--tokens", "0", "--ctx", "0"],
            "--ctx",
        ),
        (vec!["generate", "-m", m, "--tokens", "a,b"], "--tokens"),
        (
            vec!["generate", "-m", m, "--tokens", "0", "--prefill-chunk", "0"],
            "at least 1",
        ),
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
        assert!(
            !stderr(&o).contains("18446744073709551615"),
            "{}",
            stderr(&o)
        );
    }
}

#[test]
fn json_into_a_closed_pipe_is_a_clean_exit() {
    let mut c = talk(&["--no-think", "-n", "4", "--json", "-p", "Hello"]);
    c.stdin(Stdio::null());
    let o = close_stdout_early(c);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!stderr(&o).contains("Broken pipe"), "{}", stderr(&o));
}

#[test]
fn the_default_seed_is_random_and_reported() {
    let m = fixture("tiny");
    let generate = |extra: &[&str]| {
        let mut a = vec![
            "generate",
            "-m",
            m.to_str().unwrap(),
            "--tokens",
            "0,5,9",
            "-n",
            "16",
            "--temp",
            "1.0",
            "--ignore-eos",
        ];
        a.extend_from_slice(extra);
        let o = run(&a);
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    assert_ne!(
        generate(&[]),
        generate(&[]),
        "two runs without --seed differ"
    );
    assert_eq!(generate(&["--seed", "7"]), generate(&["--seed", "7"]));
    // The one-shot reports its seed; giving it back reproduces the answer.
    let one = |extra: &[&str]| {
        let mut a = vec!["--no-think", "-n", "8", "--json", "-p", "Hello"];
        a.extend_from_slice(extra);
        let o = run_with_stdin(talk(&a), b"");
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_str::<serde_json::Value>(stdout(&o).trim()).unwrap()
    };
    let first = one(&[]);
    let seed = first["seed"].as_u64().expect("seed in --json").to_string();
    assert_eq!(one(&["--seed", &seed])["answer"], first["answer"]);
}

#[test]
fn familiar_flags_and_inputs() {
    // -f FILE is the input (as stdin would be), with --temp and -c.
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("q.txt");
    std::fs::write(&f, "Hello there").unwrap();
    let a = run_with_stdin(
        talk(&[
            "--no-think",
            "--temp",
            "0",
            "-n",
            "6",
            "-c",
            "4096",
            "-f",
            f.to_str().unwrap(),
        ]),
        b"",
    );
    let b = run_with_stdin(
        talk(&["--no-think", "--temperature", "0", "-n", "6"]),
        b"Hello there",
    );
    assert!(a.status.success(), "{}", stderr(&a));
    assert_eq!(stdout(&a), stdout(&b));
    // prompt --messages - reads stdin; OpenAI content parts render as the plain string.
    let plain = r#"[{"role":"user","content":"What is 2+2?"}]"#;
    let parts = r#"[{"role":"user","content":[{"type":"text","text":"What is 2+2?"}]}]"#;
    let p = |input: &str| {
        let mut c = Command::new(bin());
        c.args(["prompt", "--messages", "-", "--no-think"]);
        let o = run_with_stdin(c, input.as_bytes());
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    assert_eq!(p(parts), p(plain));
    assert!(p(plain).contains("What is 2+2?"));
}

#[test]
fn chat_commands_expand_the_home_directory() {
    let home = tempfile::tempdir().unwrap();
    std::fs::write(home.path().join("note.txt"), "Hello there").unwrap();
    let mut p = chat(home.path(), "4");
    p.send_line("/read").unwrap();
    p.exp_string("usage: /read FILE").unwrap();
    p.send_line("/read ~/note.txt").unwrap();
    p.exp_string("[read ~/note.txt: 11 bytes]").unwrap();
    p.exp_regex(r"\[\d+ prompt tokens").unwrap();
    p.send_line("/save ~/conv.json").unwrap();
    p.exp_string("saved 2 messages").unwrap();
    p.send_line("/load ~/conv.json").unwrap();
    p.exp_string("loaded 2 messages").unwrap();
    p.send_line("/quit").unwrap();
    p.exp_eof().unwrap();
    let saved = std::fs::read_to_string(home.path().join("conv.json")).unwrap();
    assert!(saved.contains("Hello there"), "{saved}");
}

#[test]
fn first_run_hints_and_warnings() {
    // The committed model has no tokenizer.json: the error names the way out.
    let mut c = Command::new(bin());
    c.args(["-m", fixture("tiny-vocab").to_str().unwrap(), "-p", "Hello"]);
    let o = run_with_stdin(c, b"");
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("--tokenizer") && e.contains("fetch_tokenizer.sh"),
        "{e}"
    );
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    // --think-max under the model card's 384K context.
    let o = run_with_stdin(
        talk(&["--think-max", "-n", "2", "-c", "4096", "-p", "Hi"]),
        b"",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--think-max with a 4096-token context"),
        "{}",
        stderr(&o)
    );
    // --help says what `dsflash` alone and -p do.
    let o = run(&["--help"]);
    let h = stdout(&o);
    assert!(
        h.contains("starts a chat") && h.contains("answers once"),
        "{h}"
    );
    // The plan without a GPU says so plainly.
    let o = run(&[
        "inspect",
        "--plan",
        "--gpu-mem",
        "0",
        "--ram",
        "256G",
        "--cpu-gbs",
        "100",
    ]);
    let p = stdout(&o);
    assert!(
        p.contains("no GPU") && p.contains("dense weights of all"),
        "{p}"
    );
    assert!(
        !p.contains("0 slots per layer") && !p.contains("GPU 0 GiB"),
        "{p}"
    );
    // With less RAM than the experts, the rest come from the drive, which then bounds decode.
    let o = run(&[
        "inspect",
        "--plan",
        "--gpu-mem",
        "0",
        "--ram",
        "64G",
        "--cpu-gbs",
        "100",
        "--disk-bw",
        "3",
    ]);
    let p = stdout(&o);
    assert!(
        p.contains("the rest from disk")
            && p.contains("from disk at 3.0 GB/s")
            && p.contains("bound by disk"),
        "{p}"
    );
}

#[test]
fn chat_load_refuses_what_it_cannot_render() {
    let home = tempfile::tempdir().unwrap();
    let conv = home.path().join("tools.json");
    std::fs::write(
        &conv,
        r#"[{"role":"system","content":"s","tools":{"not":"a list"}},{"role":"user","content":"hi"}]"#,
    )
    .unwrap();
    let mut p = chat(home.path(), "2");
    p.send_line("/load ~/tools.json").unwrap();
    p.exp_string("error: /load").unwrap();
    // The conversation is as before, and the next turn works.
    p.send_line("Hello there").unwrap();
    p.exp_regex(r"\[\d+ prompt tokens").unwrap();
    p.send_line("/system").unwrap();
    p.exp_string("no system prompt").unwrap();
    p.send_line("/quit").unwrap();
    p.exp_eof().unwrap();
}

#[test]
fn ctrl_c_on_the_terminal_during_a_prefill_exits_130_within_half_a_second() {
    use rexpect::process::WaitStatus;
    let text = long_text(8000);
    let mut c = talk(&["--no-think", "--prefill-chunk", "256", "-p", &text]);
    c.env("TERM", "xterm").env("NO_COLOR", "1");
    let mut p = spawn_command(c, Some(120_000)).expect("spawn in a pty");
    p.exp_regex(r"prefill [^\r\n]*\d+/\d+ tokens")
        .expect("prefilling");
    let t = Instant::now();
    p.send_control('c').unwrap();
    let status = p.process().wait().unwrap();
    let dt = t.elapsed();
    assert!(matches!(status, WaitStatus::Exited(_, 130)), "{status:?}");
    assert!(
        dt < Duration::from_millis(500),
        "exited {dt:?} after Ctrl+C"
    );
}

#[test]
fn the_chat_says_why_an_answer_stopped() {
    let home = tempfile::tempdir().unwrap();
    let mut p = chat(home.path(), "3");
    p.send_line("Hello there").unwrap();
    let (_, line) = p.exp_regex(r"\[\d+ prompt tokens[^\]]*\]").unwrap();
    assert!(line.contains("stopped at --max-tokens"), "{line}");
    p.send_line("/quit").unwrap();
    p.exp_eof().unwrap();
}

#[test]
fn chat_stats_count_the_ram_tiers_reads() {
    let home = tempfile::tempdir().unwrap();
    // No expert held: every selection is read from the files.
    let mut p = chat_with(home.path(), "3", &["--ram", "0"]);
    p.send_line("Hello there").unwrap();
    p.exp_regex(r"\[\d+ prompt tokens").unwrap();
    p.send_line("/stats").unwrap();
    p.exp_regex(r"--ram: 0 expert selections served from RAM, [1-9]\d* read from the files")
        .unwrap();
}
