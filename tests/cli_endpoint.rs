//! `--endpoint`: one-shot against an OpenAI-compatible server (a scripted one here, on
//! loopback): the request it sends (model, messages, stream, thinking switch, key), the
//! streamed answer and reasoning, and one-line errors for what a server can do wrong.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::Command;

/// Serve one request with `response` (raw HTTP); returns the port and a handle giving the
/// request's head and body.
fn serve_once(response: String) -> (u16, std::thread::JoinHandle<(String, String)>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut head = String::new();
        let mut len = 0;
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
            head.push_str(&line);
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).unwrap();
        let mut s = s;
        s.write_all(response.as_bytes()).unwrap();
        (head, String::from_utf8(body).unwrap())
    });
    (port, h)
}

fn sse(events: &[&str]) -> String {
    let body: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn ask(port: u16, extra: &[&str], key: Option<&str>) -> std::process::Output {
    let mut c = Command::new(bin());
    c.args(["--endpoint", &format!("http://127.0.0.1:{port}/v1")])
        .args([
            "--model",
            "deepseek-ai/DeepSeek-V4-Flash",
            "--temperature",
            "0",
        ])
        .args(extra)
        .env_remove("OPENAI_API_KEY");
    if let Some(k) = key {
        c.env("OPENAI_API_KEY", k);
    }
    run_with_stdin(c, b"the report\n")
}

#[test]
fn streams_the_answer_and_reasoning_from_the_server() {
    let (port, h) = serve_once(sse(&[
        r#"{"choices":[{"delta":{"role":"assistant"}}]}"#,
        r#"{"choices":[{"delta":{"reasoning_content":"Think "}}]}"#,
        r#"{"choices":[{"delta":{"reasoning_content":"first."}}]}"#,
        r#"{"choices":[{"delta":{"content":"Bonjour, "}}]}"#,
        r#"{"choices":[{"delta":{"content":"東京!"},"finish_reason":"stop"}]}"#,
        r#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":8}}}"#,
        "[DONE]",
    ]));
    let o = ask(
        port,
        &["-p", "Summarise", "--json", "--seed", "7"],
        Some("sk-test"),
    );
    let (head, body) = h.join().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(j["answer"], "Bonjour, 東京!");
    assert_eq!(j["reasoning"], "Think first.");
    assert_eq!(
        (j["prompt_tokens"].as_u64(), j["cached_tokens"].as_u64()),
        (Some(12), Some(8))
    );
    assert_eq!(
        (j["generated_tokens"].as_u64(), j["stop"].as_str()),
        (Some(5), Some("eos"))
    );
    // The request.
    assert!(head.starts_with("POST /v1/chat/completions "), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("authorization: bearer sk-test"),
        "{head}"
    );
    let b: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(b["model"], "deepseek-ai/DeepSeek-V4-Flash");
    assert_eq!(b["stream"], true);
    assert_eq!(b["seed"], 7);
    assert_eq!(b["temperature"], 0.0);
    assert_eq!(b["chat_template_kwargs"]["thinking"], true);
    assert_eq!(b["messages"][0]["role"], "user");
    assert_eq!(b["messages"][0]["content"], "the report\n\nSummarise");
}

#[test]
fn no_think_and_plain_output() {
    let (port, h) = serve_once(sse(&[
        r#"{"choices":[{"delta":{"content":"42"},"finish_reason":"length"}]}"#,
        "[DONE]",
    ]));
    let o = ask(
        port,
        &["-p", "Answer", "--no-think", "--system", "Be brief."],
        None,
    );
    let (head, body) = h.join().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), "42\n");
    assert!(
        !head.to_ascii_lowercase().contains("authorization"),
        "{head}"
    );
    let b: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(b["chat_template_kwargs"]["thinking"], false);
    assert_eq!(b["messages"][0]["content"], "Be brief.");
    assert!(stderr(&o).contains("--max-tokens"), "{}", stderr(&o));
}

#[test]
fn server_errors_are_one_line() {
    let body = r#"{"error":{"message":"Invalid API key.\nPlease check it.","type":"auth"}}"#;
    let (port, h) = serve_once(format!(
        "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    let o = ask(port, &["-p", "x"], Some("wrong"));
    h.join().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.contains("HTTP 401: Invalid API key. Please check it."),
        "{e}"
    );

    let (port, h) = serve_once(sse(&["{not json"]));
    let o = ask(port, &["-p", "x"], None);
    h.join().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not JSON"), "{}", stderr(&o));

    // Nobody listening.
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let o = ask(port, &["-p", "x"], None);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("cannot reach the server") && e.lines().count() == 1,
        "{e}"
    );
}

#[test]
fn a_bad_endpoint_url_is_a_usage_error() {
    let o = run(&["--endpoint", "localhost:8000", "-p", "x"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--endpoint"), "{}", stderr(&o));
}
