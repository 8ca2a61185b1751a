//! The interactive chat driven in a pseudo-terminal: type a message, get the oracle's answer,
//! a second turn that reuses the KV state, Ctrl+C mid-answer back to the prompt with the
//! conversation intact, history saved, /save and /load resuming without a prefill, /quit.

mod common;
use common::*;
use rexpect::session::{PtySession, spawn_command};
use std::process::Command;

fn chat(max_tokens: usize, home: &std::path::Path) -> PtySession {
    let mut c = Command::new(bin());
    c.args(["--model", fixture("tiny-vocab").to_str().unwrap()])
        .args(["--tokenizer", tokenizer_path().to_str().unwrap()])
        .args(["--temperature", "0", "--numerics", "ideal", "--no-think"])
        .args(["--max-tokens", &max_tokens.to_string()])
        .env("HOME", home)
        .env_remove("XDG_DATA_HOME")
        .env_remove("XDG_CACHE_HOME")
        .env("NO_COLOR", "1")
        .env("TERM", "xterm");
    let mut p = spawn_command(c, Some(60_000)).expect("spawn in a pty");
    p.exp_string("/help for commands").expect("banner");
    p
}

/// rexpect hands back each byte as one char: compare non-ASCII text the same way.
fn as_pty(s: &str) -> String {
    s.bytes().map(|b| b as char).collect()
}

fn greedy_text(name: &str) -> String {
    let g: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("tiny-vocab/chat-goldens.json")).unwrap())
            .unwrap();
    g[name]["greedy_text"].as_str().unwrap().to_string()
}

/// Wait for the stats line; returns (prompt tokens, newly prefilled tokens, rest of line).
fn stats(p: &mut PtySession) -> (usize, usize, String) {
    let (_, m) = p
        .exp_regex(r"\[\d+ prompt tokens \(\d+ new[^)]*\)[^\]]*\]")
        .expect("stats line");
    let nums: Vec<usize> = m
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .take(2)
        .map(|s| s.parse().unwrap())
        .collect();
    (nums[0], nums[1], m)
}

#[test]
fn two_turns_reuse_kv_and_quit() {
    let home = tempfile::tempdir().unwrap();
    let mut p = chat(12, home.path());
    p.send_line("Hello there").unwrap();
    // The oracle's greedy answer (first line, as the terminal shows it).
    let want = greedy_text("hello");
    p.exp_string(&as_pty(want.lines().next().unwrap()))
        .expect("the oracle's answer");
    let (prompt, new, _) = stats(&mut p);
    assert_eq!((prompt, new), (6, 6));
    p.send_line("second turn").unwrap();
    let (prompt, new, _) = stats(&mut p);
    assert!(
        new < prompt && new > 0,
        "second turn prefilled {new} of {prompt} tokens"
    );
    p.send_line("/quit").unwrap();
    p.exp_eof().unwrap();
    let hist = std::fs::read_to_string(home.path().join(".local/share/dsflash/history"))
        .expect("history saved");
    assert!(
        hist.contains("Hello there") && hist.contains("second turn"),
        "{hist}"
    );
}

#[test]
fn ctrl_c_stops_the_answer_and_keeps_the_conversation() {
    let home = tempfile::tempdir().unwrap();
    let mut p = chat(1_000_000, home.path());
    p.send_line("Hello there").unwrap();
    let want = greedy_text("hello");
    p.exp_string(&as_pty(&want.chars().take(6).collect::<String>()))
        .expect("answer streaming");
    p.send_control('c').unwrap();
    let (_, _, line) = stats(&mut p);
    assert!(line.contains("interrupted"), "{line}");
    p.exp_string("> ").unwrap();
    p.send_line("/stats").unwrap();
    p.exp_string("2 messages")
        .expect("the question and the partial answer are kept");
    stats(&mut p); // /stats repeats the last answer's line
    p.exp_string("> ").unwrap();
    // The next turn builds on the kept conversation, reusing its KV state.
    p.send_line("go on").unwrap();
    p.exp_string("\n").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    p.send_control('c').unwrap();
    let (prompt, new, line) = stats(&mut p);
    assert!(line.contains("interrupted"));
    assert!(new < prompt, "second turn prefilled {new} of {prompt}");
    p.send_control('d').unwrap();
    p.exp_eof().unwrap();
}

/// /save keeps the conversation's state in the prompt cache (under HOME/.cache/dsflash):
/// a new chat that /loads the file continues with only the new turn to prefill, and
/// answers as the first chat would have.
#[test]
fn save_and_load_resume_without_prefill() {
    let home = tempfile::tempdir().unwrap();
    let saved = home.path().join("conv.json");
    let saved = saved.to_str().unwrap();
    // The answer to "second turn" (what the terminal shows after the progress bar is
    // cleared) and the stats line's prompt and new token counts.
    let second_turn = |p: &mut PtySession| {
        p.send_line("second turn").unwrap();
        p.exp_string("second turn").unwrap();
        let (before, line) = p.exp_regex(r"\[\d+ prompt tokens[^\]]*\]").unwrap();
        let answer = before.rsplit("\x1b[2K").next().unwrap().trim().to_string();
        (answer, line.split(" at ").next().unwrap().to_string())
    };
    let mut p = chat(12, home.path());
    p.send_line("Hello there").unwrap();
    stats(&mut p);
    p.send_line(&format!("/save {saved}")).unwrap();
    p.exp_string("in the prompt cache)").expect("state kept");
    let first = second_turn(&mut p);
    p.send_line("/quit").unwrap();
    p.exp_eof().unwrap();

    let mut q = chat(12, home.path());
    q.send_line(&format!("/load {saved}")).unwrap();
    q.exp_regex(r"loaded 2 messages from \S+ \(their state, \d+ tokens, from the prompt cache\)")
        .expect("state restored");
    let second = second_turn(&mut q);
    q.send_line("/quit").unwrap();
    q.exp_eof().unwrap();
    assert!(first.0.trim().len() > 2, "{first:?}");
    assert_eq!(
        second, first,
        "the resumed chat answers and prefills as the live one"
    );
}
