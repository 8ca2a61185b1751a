//! `--endpoint URL`: the same one-shot interface against an OpenAI-compatible server (another
//! `dsflash serve`, or vLLM / SGLang serving V4-Flash): the conversation goes out as
//! `/v1/chat/completions` with `stream: true`, and the answer and `reasoning_content` come
//! back as server-sent events into the same sink as a local answer.
//!
//! Everything from the server is hostile: statuses, headers and bodies are bounded and
//! checked; a bad one is a one-line error naming the endpoint.

use super::talk::{Sink, TurnStats};
use crate::model::chat_format::{Message, Mode};
use anyhow::{Context, bail};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// One event line is at most this long (a token's delta is a few bytes).
const MAX_LINE: u64 = 1 << 20;
/// The longest wait for the server's next bytes.
const WAIT: Duration = Duration::from_secs(600);

pub struct Endpoint {
    /// The server's base URL, without a trailing `/` (`http://host:port` or `.../v1`).
    base: String,
    api_key: Option<String>,
    /// The served model's name.
    model: String,
}

/// What the request asks beyond the messages.
pub struct Request<'a> {
    pub messages: &'a [Message],
    pub mode: Mode,
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub stop: &'a [String],
}

impl Endpoint {
    /// `url` as given to `--endpoint`: `http(s)://host[:port][/v1]`.
    pub fn new(url: &str, api_key: Option<String>, model: &str) -> anyhow::Result<Endpoint> {
        let u = url.trim().trim_end_matches('/');
        if !(u.starts_with("http://") || u.starts_with("https://")) || u.len() <= "https://".len() {
            return Err(super::Usage(format!(
                "--endpoint {url:?}: expected http://HOST:PORT (an OpenAI-compatible server)"
            ))
            .into());
        }
        let base = u.strip_suffix("/v1").unwrap_or(u).to_string();
        Ok(Endpoint {
            base,
            api_key: api_key.filter(|k| !k.is_empty()),
            model: model.to_string(),
        })
    }

    fn body(&self, r: &Request) -> Value {
        let mut kwargs = json!({ "thinking": r.mode.thinking() });
        if r.mode == Mode::ThinkMax {
            kwargs["reasoning_effort"] = json!("max");
        }
        let mut b = json!({
            "model": self.model,
            "messages": r.messages,
            "stream": true,
            "stream_options": { "include_usage": true },
            "max_tokens": r.max_tokens,
            "temperature": r.temperature,
            "top_p": r.top_p,
            "seed": r.seed,
            "chat_template_kwargs": kwargs,
        });
        if !r.stop.is_empty() {
            b["stop"] = json!(r.stop);
        }
        b
    }

    /// Ask, streaming the answer into `sink`; `stop` ends the stream early (the answer so far
    /// is kept). Returns the answer's message and its stats.
    pub fn chat(
        &self,
        r: &Request,
        sink: &mut dyn Sink,
        stop: &AtomicBool,
    ) -> anyhow::Result<(Message, TurnStats)> {
        let url = format!("{}/v1/chat/completions", self.base);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(20)))
            .timeout_recv_response(Some(WAIT))
            .timeout_per_read(Some(WAIT))
            .user_agent(concat!("dsflash/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        let mut req = agent
            .post(&url)
            .header("Accept", "text/event-stream")
            .header("Content-Type", "application/json");
        if let Some(k) = &self.api_key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        let t0 = Instant::now();
        let resp = req
            .send(serde_json::to_vec(&self.body(r))?)
            .with_context(|| format!("--endpoint {}: cannot reach the server", self.base))?;
        let code = resp.status().as_u16();
        let mut body = resp.into_body().into_reader();
        if !(200..300).contains(&code) {
            let mut text = String::new();
            let _ = (&mut body).take(64 << 10).read_to_string(&mut text);
            bail!(
                "--endpoint {}: HTTP {code}{}",
                self.base,
                error_message(&text).map_or(String::new(), |m| format!(": {m}"))
            );
        }
        let mut stats = TurnStats {
            stop: "length",
            ..Default::default()
        };
        let (mut answer, mut reasoning) = (String::new(), String::new());
        let mut first = None;
        let mut lines = BufReader::new(body);
        let mut line = Vec::new();
        loop {
            if stop.load(Ordering::Relaxed) {
                stats.stop = "interrupted";
                break;
            }
            line.clear();
            let n = (&mut lines)
                .take(MAX_LINE)
                .read_until(b'\n', &mut line)
                .with_context(|| format!("--endpoint {}: the stream broke", self.base))?;
            if n == 0 {
                break;
            }
            if !line.ends_with(b"\n") && n as u64 == MAX_LINE {
                bail!(
                    "--endpoint {}: an event longer than {MAX_LINE} bytes",
                    self.base
                );
            }
            let text = String::from_utf8_lossy(&line);
            let Some(data) = text.trim_end().strip_prefix("data:") else {
                continue; // comments, `event:` lines, blank separators
            };
            let data = data.trim();
            if data == "[DONE]" {
                break;
            }
            let ev: Value = serde_json::from_str(data)
                .with_context(|| format!("--endpoint {}: an event that is not JSON", self.base))?;
            if let Some(m) = ev.get("error") {
                bail!(
                    "--endpoint {}: {}",
                    self.base,
                    error_message(&m.to_string()).unwrap_or_else(|| m.to_string())
                );
            }
            if let Some(u) = ev.get("usage").filter(|u| u.is_object()) {
                let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0) as usize;
                stats.prompt_tokens = n("prompt_tokens");
                stats.generated_tokens = n("completion_tokens");
                stats.cached_tokens = u
                    .pointer("/prompt_tokens_details/cached_tokens")
                    .and_then(Value::as_u64)
                    .unwrap_or(0) as usize;
                stats.prefilled_tokens =
                    stats.prompt_tokens - stats.cached_tokens.min(stats.prompt_tokens);
            }
            let Some(choice) = ev.pointer("/choices/0") else {
                continue;
            };
            let delta = choice.get("delta").unwrap_or(&Value::Null);
            let piece = |k: &str| {
                delta
                    .get(k)
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
            };
            if let Some(p) = piece("reasoning_content").or_else(|| piece("reasoning")) {
                first.get_or_insert_with(|| t0.elapsed());
                sink.reasoning(p)?;
                reasoning.push_str(p);
            }
            if let Some(p) = piece("content") {
                first.get_or_insert_with(|| t0.elapsed());
                sink.answer(p)?;
                answer.push_str(p);
            }
            match choice.get("finish_reason").and_then(Value::as_str) {
                Some("stop") => stats.stop = "eos",
                Some("length") => stats.stop = "length",
                Some("tool_calls") => stats.stop = "tool_calls",
                _ => {}
            }
        }
        let total = t0.elapsed();
        let first = first.unwrap_or(total);
        stats.prefill_seconds = first.as_secs_f64();
        stats.decode_seconds = (total - first).as_secs_f64();
        let mut msg = Message::new(crate::model::chat_format::Role::Assistant, answer);
        if r.mode.thinking() {
            msg.reasoning_content = Some(reasoning);
        }
        Ok((msg, stats))
    }
}

/// The `message` of an OpenAI-style error body (`{"error": {"message": ...}}`), one line,
/// at most 300 characters.
fn error_message(body: &str) -> Option<String> {
    let v: Value = serde_json::from_str(body).ok()?;
    let m = v
        .pointer("/error/message")
        .or_else(|| v.get("message"))
        .and_then(Value::as_str)?;
    let one: String = m.split_whitespace().collect::<Vec<_>>().join(" ");
    Some(one.chars().take(300).collect())
}

/// The chat's conversation against a server: the messages are kept here and sent whole each
/// turn (the server reuses what it already holds).
pub struct Remote {
    ep: Endpoint,
    messages: Vec<Message>,
    mode: Mode,
    max_tokens: usize,
    sampling: crate::engine::sampler::SamplerConfig,
    stop: Vec<String>,
    /// Tokens of the last turn (prompt and answer), as the server counted them.
    context: usize,
}

impl Remote {
    /// From the talk flags: `--endpoint`, `--api-key` (else $OPENAI_API_KEY), `--model` (the
    /// served name), the mode, sampling, `--max-tokens`, `--stop` and `--system`.
    pub fn new(a: &super::TalkArgs, url: &str) -> anyhow::Result<Remote> {
        let key = a
            .api_key
            .clone()
            .or_else(|| std::env::var("OPENAI_API_KEY").ok());
        let mut r = Remote {
            ep: Endpoint::new(url, key, &a.engine.model)?,
            messages: Vec::new(),
            mode: a.mode(),
            max_tokens: a.max_tokens,
            sampling: a.sampling.config()?,
            stop: a.stop.iter().filter(|s| !s.is_empty()).cloned().collect(),
            context: 0,
        };
        if let Some(s) = &a.system {
            super::talk::Conversation::set_system(&mut r, s);
        }
        Ok(r)
    }

    fn ask(&self, sink: &mut dyn Sink, stop: &AtomicBool) -> anyhow::Result<(Message, TurnStats)> {
        let req = Request {
            messages: &self.messages,
            mode: self.mode,
            max_tokens: self.max_tokens,
            temperature: self.sampling.temperature,
            top_p: self.sampling.top_p,
            seed: self.sampling.seed,
            stop: &self.stop,
        };
        self.ep.chat(&req, sink, stop)
    }

    pub fn seed(&self) -> u64 {
        self.sampling.seed
    }
}

impl super::talk::Conversation for Remote {
    fn messages(&self) -> &[Message] {
        &self.messages
    }
    fn messages_mut(&mut self) -> &mut Vec<Message> {
        &mut self.messages
    }
    fn mode(&self) -> Mode {
        self.mode
    }
    fn set_mode(&mut self, mode: Mode) {
        self.mode = mode;
    }
    fn respond(
        &mut self,
        sink: &mut dyn Sink,
        stop: &AtomicBool,
    ) -> anyhow::Result<(Message, TurnStats)> {
        let (m, s) = self.ask(sink, stop)?;
        self.context = s.prompt_tokens + s.generated_tokens;
        Ok((m, s))
    }
    fn clear(&mut self, keep_system: bool) {
        self.messages
            .retain(|m| keep_system && m.role == crate::model::chat_format::Role::System);
        self.context = 0;
    }
    fn context_tokens(&self) -> usize {
        self.context
    }
}
