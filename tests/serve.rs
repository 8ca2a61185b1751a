//! `dsflash serve` on the full-vocabulary tiny model: the official `openai` Python client
//! against it (tests/serve_openai.py), OpenAI error objects for bad requests, SIGTERM, a
//! soak of concurrent clients, and `--endpoint` against it equal to the local one-shot.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running `dsflash serve` on a free port; killed when dropped.
struct Server {
    child: Option<Child>,
    url: String,
    stderr: Arc<Mutex<String>>,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let mut child = Command::new(bin())
            .arg("serve")
            .args(["--model", fixture("tiny-vocab").to_str().unwrap()])
            .args(["--tokenizer", tokenizer_path().to_str().unwrap()])
            .args(["--port", "0"])
            .args(extra)
            .env_remove("DSFLASH_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dsflash serve");
        let err = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("on http://").nth(1) {
                    let _ = tx.send(rest.trim_end_matches(|c: char| c != '/').to_string());
                }
                log2.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no address: {}", log.lock().unwrap()));
        let url = format!("http://{}", addr.split('/').next().unwrap());
        Server {
            child: Some(child),
            url,
            stderr: log,
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// VmRSS in KiB.
    fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    }

    /// Send `sig` and wait for the exit (at most `limit`).
    fn stop(mut self, sig: i32, limit: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as i32, sig);
        }
        let t = Instant::now();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            if t.elapsed() > limit {
                let _ = child.kill();
                panic!("still running {limit:?} after the signal: {}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

/// POST a JSON body; returns the status, the Retry-After header and the body.
fn post(url: &str, body: &str) -> (u16, Option<String>, String) {
    let mut r = agent()
        .post(url)
        .header("Content-Type", "application/json")
        .send(body)
        .expect("a response");
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let status = r.status().as_u16();
    (
        status,
        retry,
        r.body_mut().read_to_string().unwrap_or_default(),
    )
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

fn openai_pythonpath() -> String {
    if let Ok(p) = std::env::var("DSFLASH_OPENAI_PYTHONPATH") {
        return p;
    }
    let o = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/fetch_openai.sh"
    ))
    .output()
    .expect("scripts/fetch_openai.sh");
    assert!(o.status.success(), "{}", stderr(&o));
    stdout(&o).trim().to_string()
}

#[test]
fn the_openai_python_client_works_against_it() {
    let open = Server::start(&["--no-cache", "--queue", "0"]);
    let keyed = Server::start(&["--no-cache", "--api-key", "s3cret"]);
    let o = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/serve_openai.py"
        ))
        .args([
            "--open", &open.url, "--keyed", &keyed.url, "--key", "s3cret",
        ])
        .args([
            "--goldens",
            fixture("chat/tool-goldens.json").to_str().unwrap(),
        ])
        .env("PYTHONPATH", openai_pythonpath())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}{}\nserver: {}",
        stdout(&o),
        stderr(&o),
        open.log()
    );
    eprintln!("{}", stdout(&o));
}

#[test]
fn bad_requests_get_openai_error_objects_and_the_server_goes_on() {
    let s = Server::start(&["--no-cache", "--ctx", "64", "--max-body", "4K"]);
    let chat = format!("{}/v1/chat/completions", s.url);
    let long = "word ".repeat(100);
    let cases: Vec<(String, u16, &str)> = vec![
        ("{not json".into(), 400, "invalid JSON body"),
        ("[]".into(), 400, "invalid request"),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "seed": 1.5}"#.into(),
            400,
            "seed 1.5",
        ),
        (r#"{"messages": []}"#.into(), 400, "at least one message"),
        (
            r#"{"messages": [{"role": "robot", "content": "x"}]}"#.into(),
            400,
            "messages[0].role: unknown variant `robot`",
        ),
        (
            r#"{"messages": [{"role": "user", "content": 5}]}"#.into(),
            400,
            "messages[0].content",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "tools": {"a": 1}}"#.into(),
            400,
            "tools: expected an array",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {}}]}"#.into(),
            400,
            "tools[0].function.name",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}"#.into(),
            400,
            "tool_choice",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "n": 2}"#.into(),
            400,
            "n: only 1",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "temperature": -1}"#.into(),
            400,
            "temperature -1",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "x"}], "logit_bias": {"999999999": 5}}"#.into(),
            400,
            "logit_bias",
        ),
        (
            r#"{"messages": [{"role": "assistant", "content": "x", "prefix": true}, {"role": "user", "content": "y"}]}"#.into(),
            400,
            "messages[0]: `prefix` is only for the last message",
        ),
        (
            format!(r#"{{"messages": [{{"role": "user", "content": "{long}"}}]}}"#),
            400,
            "maximum context length is 64 tokens",
        ),
        (
            format!(r#"{{"messages": [{{"role": "user", "content": "{}"}}]}}"#, "x".repeat(5000)),
            413,
            "--max-body",
        ),
    ];
    for (body, status, needle) in &cases {
        let (got, _, text) = post(&chat, body);
        assert_eq!(got, *status, "{body:.80}: {text}");
        let e = &json(&text)["error"];
        let msg = e["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{body:.80}: {msg}");
        assert!(e["type"].is_string(), "{text}");
    }
    let (got, _, text) = post(
        &chat,
        &format!(r#"{{"messages": [{{"role": "user", "content": "{long}"}}]}}"#),
    );
    assert_eq!(
        json(&text)["error"]["code"],
        "context_length_exceeded",
        "{got}"
    );
    // Completions: bad prompts.
    let comp = format!("{}/v1/completions", s.url);
    for (body, needle) in [
        (r#"{"prompt": ""}"#, "prompt: empty"),
        (r#"{"prompt": [1, 999999999]}"#, "prompt[1]"),
        (r#"{"prompt": {"x": 1}}"#, "prompt: expected"),
        (r#"{"prompt": "x", "echo": true}"#, "echo"),
    ] {
        let (got, _, text) = post(&comp, body);
        assert_eq!(got, 400, "{body}: {text}");
        assert!(
            json(&text)["error"]["message"]
                .as_str()
                .unwrap()
                .contains(needle),
            "{text}"
        );
    }
    // Unknown endpoints and methods.
    let (got, _, text) = post(&format!("{}/v1/embeddings", s.url), "{}");
    assert_eq!(
        (got, json(&text)["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    let mut r = agent().get(&chat).call().unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert!(json(&r.body_mut().read_to_string().unwrap())["error"].is_object());
    // Still serving.
    let (got, _, text) = post(
        &chat,
        r#"{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}"#,
    );
    assert_eq!(got, 200, "{text}");
    assert_eq!(json(&text)["usage"]["completion_tokens"], 2);
}

#[test]
fn sigterm_cancels_the_running_request_answers_the_queued_and_exits_0() {
    let s = Server::start(&["--no-cache"]);
    let chat = format!("{}/v1/chat/completions", s.url);
    // A stream that would run for an hour, and a request queued behind it.
    let mut running = agent()
        .post(&chat)
        .send(r#"{"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 1000000, "stream": true}"#)
        .unwrap();
    assert_eq!(running.status().as_u16(), 200);
    let mut events = BufReader::new(running.body_mut().as_reader());
    let mut first = String::new();
    events.read_line(&mut first).unwrap();
    assert!(first.starts_with("data: "), "{first}");
    let chat2 = chat.clone();
    let queued = std::thread::spawn(move || {
        post(
            &chat2,
            r#"{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}"#,
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    let status = s.stop(libc::SIGTERM, Duration::from_secs(60));
    assert_eq!(status.code(), Some(0));
    // The stream ends with an error event; the queued request got a 503.
    let rest: Vec<String> = events.lines().map_while(Result::ok).collect();
    let last = rest.iter().rev().find(|l| l.starts_with("data: ")).unwrap();
    assert!(last.contains("shutting_down"), "{last}");
    let (code, _, text) = queued.join().unwrap();
    assert_eq!(code, 503, "{text}");
    assert_eq!(json(&text)["error"]["code"], "shutting_down");
}

#[test]
fn a_public_address_without_a_key_is_warned_about() {
    let s = Server::start(&["--no-cache", "--host", "0.0.0.0"]);
    assert!(
        s.log().contains("warning: serving on 0.0.0.0:") && s.log().contains("--api-key"),
        "{}",
        s.log()
    );
    let k = Server::start(&["--no-cache", "--api-key", "k"]);
    assert!(!k.log().contains("warning"), "{}", k.log());
}

#[test]
fn soak_of_eight_clients_loses_nothing_and_keeps_rss_flat() {
    let s = Server::start(&["--no-cache", "--queue", "4"]);
    let chat = format!("{}/v1/chat/completions", s.url);
    let ask = |i: usize| {
        post(
            &chat,
            &format!(
                r#"{{"messages": [{{"role": "user", "content": "Request {i}: say something."}}], "max_tokens": 3, "chat_template_kwargs": {{"thinking": false}}}}"#
            ),
        )
    };
    // Warm-up: the same 200 requests one by one (allocator pools and the tokenizer's word
    // cache fill up; after that, RSS stays flat).
    for i in 0..200 {
        assert_eq!(ask(i).0, 200);
    }
    let rss_before = s.rss_kib();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(Vec::new()));
    std::thread::scope(|sc| {
        for _ in 0..8 {
            let (next, results) = (next.clone(), results.clone());
            sc.spawn(move || {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if i >= 200 {
                        break;
                    }
                    // A refused request is sent again (sooner than Retry-After says: the
                    // point is the server's bookkeeping, not politeness).
                    let mut refused = 0;
                    let answer = loop {
                        let (code, retry, body) = ask(i);
                        if code != 429 {
                            break (code, body);
                        }
                        let v = json(&body);
                        assert_eq!(retry.as_deref(), Some("1"));
                        assert_eq!(v["error"]["code"], "queue_full");
                        refused += 1;
                        std::thread::sleep(Duration::from_millis(20));
                    };
                    results
                        .lock()
                        .unwrap()
                        .push((i, answer.0, refused, answer.1));
                }
            });
        }
    });
    let rss_after = s.rss_kib();
    let results = results.lock().unwrap();
    assert_eq!(results.len(), 200);
    let mut numbers: Vec<usize> = results.iter().map(|r| r.0).collect();
    numbers.sort();
    assert_eq!(numbers, (0..200).collect::<Vec<_>>());
    let mut ids = std::collections::HashSet::new();
    let mut refused = 0;
    for (i, code, r, body) in results.iter() {
        assert_eq!(*code, 200, "request {i}: {body}");
        let v = json(body);
        assert!(
            ids.insert(v["id"].as_str().unwrap().to_string()),
            "answered twice: {body}"
        );
        assert_eq!(v["usage"]["completion_tokens"], 3, "{i}: {body}");
        refused += r;
    }
    eprintln!(
        "soak: 200 answered once each, {refused} refusals with 429 on the way; server RSS {rss_before} KiB after warm-up, {rss_after} KiB after the 200"
    );
    assert!(
        rss_after < rss_before + 8 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
}

#[test]
fn endpoint_against_serve_answers_as_the_local_one_shot() {
    // The first request of a fresh server prefills in the one-shot's steps: the same greedy
    // answer, bit for bit (reference numerics), reasoning included.
    for mode in ["--no-think", "--think"] {
        let s = Server::start(&["--no-cache"]);
        let common = [
            "-p",
            "Name three colours.",
            "--temperature",
            "0",
            "-n",
            "12",
            "--json",
            mode,
        ];
        let local = Command::new(bin())
            .args(["--model", fixture("tiny-vocab").to_str().unwrap()])
            .args([
                "--tokenizer",
                tokenizer_path().to_str().unwrap(),
                "--no-cache",
            ])
            .args(common)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(local.status.success(), "{}", stderr(&local));
        let remote = Command::new(bin())
            .args(["--endpoint", &format!("{}/v1", s.url)])
            .args(common)
            .stdin(Stdio::null())
            .env_remove("OPENAI_API_KEY")
            .output()
            .unwrap();
        assert!(remote.status.success(), "{}\n{}", stderr(&remote), s.log());
        let (l, r) = (json(&stdout(&local)), json(&stdout(&remote)));
        assert_eq!(l["answer"], r["answer"], "{mode}");
        assert_eq!(l["reasoning"], r["reasoning"], "{mode}");
        assert_eq!(l["prompt_tokens"], r["prompt_tokens"], "{mode}");
        assert_eq!(l["generated_tokens"], r["generated_tokens"], "{mode}");
        assert!(
            l["answer"].as_str().unwrap().len() + l["reasoning"].as_str().unwrap_or("").len() > 0
        );
    }
}

#[test]
fn a_client_that_leaves_a_whole_answer_request_frees_the_engine() {
    // Non-streamed: the client gives up after a second on an hour-long answer. With --queue 0
    // a request is taken only while the engine is idle, so a 200 soon after says it was
    // cancelled (the streamed case is in serve_openai.py).
    let s = Server::start(&["--no-cache", "--queue", "0"]);
    let chat = format!("{}/v1/chat/completions", s.url);
    let impatient: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(1)))
        .build()
        .into();
    let r = impatient
        .post(&chat)
        .send(r#"{"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 1000000}"#);
    assert!(r.is_err(), "timed out");
    let hi = r#"{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}"#;
    let mut served = false;
    for _ in 0..600 {
        let (code, _, text) = post(&chat, hi);
        if code == 200 {
            served = true;
            break;
        }
        assert_eq!(code, 429, "{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(served, "the engine never came free: {}", s.log());
}

#[test]
fn the_chat_with_endpoint_talks_to_serve() {
    // The interactive chat against a server: the oracle's greedy answer to the first turn
    // (tiny-vocab/chat-goldens.json, ideal numerics, as tests/chat_pty.rs has it locally),
    // and a second turn that the server continues from the first one's state.
    let s = Server::start(&["--no-cache", "--numerics", "ideal"]);
    let home = tempfile::tempdir().unwrap();
    let mut c = Command::new(bin());
    c.args(["--endpoint", &s.url])
        .args(["--temperature", "0", "--no-think", "--max-tokens", "12"])
        .env("HOME", home.path())
        .env_remove("XDG_DATA_HOME")
        .env_remove("OPENAI_API_KEY")
        .env("NO_COLOR", "1")
        .env("TERM", "xterm");
    let mut p = rexpect::session::spawn_command(c, Some(60_000)).expect("spawn in a pty");
    p.exp_string("/help for commands").expect("banner");
    p.send_line("Hello there").unwrap();
    let g: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("tiny-vocab/chat-goldens.json")).unwrap())
            .unwrap();
    let want = g["hello"]["greedy_text"].as_str().unwrap();
    let first_line: String = want
        .lines()
        .next()
        .unwrap()
        .bytes()
        .map(|b| b as char)
        .collect();
    p.exp_string(&first_line).expect("the oracle's answer");
    let stats = |p: &mut rexpect::session::PtySession| {
        let (_, m) = p
            .exp_regex(r"\[\d+ prompt tokens \(\d+ new[^)]*\)[^\]]*\]")
            .expect("stats line");
        let n: Vec<usize> = m
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .take(2)
            .map(|s| s.parse().unwrap())
            .collect();
        (n[0], n[1])
    };
    assert_eq!(stats(&mut p), (6, 6));
    p.send_line("second turn").unwrap();
    let (prompt, new) = stats(&mut p);
    assert!(
        new > 0 && new < prompt,
        "second turn: {new} of {prompt} new"
    );
    p.send_line("/quit").unwrap();
    p.exp_eof().unwrap();
}

#[test]
fn one_client_at_a_time_is_never_refused_even_without_a_queue() {
    // --queue 0: nothing waits. A client that has seen the end of its answer finds the engine
    // free, streamed or not (the place is given back before the end is sent).
    let s = Server::start(&["--no-cache", "--queue", "0"]);
    let chat = format!("{}/v1/chat/completions", s.url);
    for i in 0..60 {
        let stream = if i % 2 == 0 { "true" } else { "false" };
        let (code, _, text) = post(
            &chat,
            &format!(
                r#"{{"messages": [{{"role": "user", "content": "Hi {i}"}}], "max_tokens": 2, "stream": {stream}}}"#
            ),
        );
        assert_eq!(code, 200, "request {i}: {text}");
    }
}
