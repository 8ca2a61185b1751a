//! The OpenAI-compatible API's bodies: a request checked and turned into what the engine
//! runs (`Prepared`), and the JSON objects sent back. Everything a client sends is checked
//! here; what fails is an `ApiError`, answered as OpenAI's error object.

use crate::engine::sampler::SamplerConfig;
use crate::model::chat_format::{DSV4, Message, Mode, Role, render};
use crate::model::tokenizer::Tokenizer;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;

/// An error answered with `status` and `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub message: String,
}

impl ApiError {
    /// 400: the request itself is wrong.
    pub fn bad(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            kind: "invalid_request_error",
            code: None,
            message: message.into(),
        }
    }

    pub fn new(status: u16, kind: &'static str, code: &'static str, msg: &str) -> ApiError {
        ApiError {
            status,
            kind,
            code: Some(code),
            message: msg.to_string(),
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": null,
            "code": self.code,
        }})
    }
}

/// The server's defaults for what a request leaves out.
#[derive(Debug, Clone)]
pub struct Defaults {
    pub mode: Mode,
    pub max_tokens: usize,
    /// The context (tokens) of the server's session.
    pub ctx: usize,
    pub vocab_size: usize,
}

/// What the engine runs for one request, and how to answer it.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub ids: Vec<u32>,
    /// Generation starts inside the reasoning (thinking mode, no answer prefix).
    pub reasoning_first: bool,
    pub sampler: SamplerConfig,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// Tools were offered: the answer is split into content and DSML tool calls.
    pub tools: bool,
    /// The start of the answer the client wrote (an assistant message with `prefix`).
    pub prefix: String,
    pub stream: bool,
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Sampling fields shared by both endpoints (OpenAI's, plus vLLM's `top_k`, `min_p` and
/// `repetition_penalty`).
#[derive(Debug, Default, Deserialize)]
struct Sampling {
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    /// Any integer (clients send unsigned 64-bit seeds as well as negative ones).
    seed: Option<serde_json::Number>,
    stop: Option<Stop>,
    logit_bias: Option<HashMap<String, f32>>,
    n: Option<u64>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
}

#[derive(Debug, Default, Deserialize)]
struct TemplateKwargs {
    thinking: Option<bool>,
    reasoning_effort: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    chat_template_kwargs: Option<TemplateKwargs>,
    reasoning_effort: Option<String>,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: Value,
    echo: Option<bool>,
    suffix: Option<String>,
    #[serde(flatten)]
    sampling: Sampling,
}

/// Parse a JSON body; the error names the field.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::bad(format!("invalid JSON body: {inner}"))
        } else if path == "." || path == "?" {
            ApiError::bad(format!("invalid request: {inner}"))
        } else {
            ApiError::bad(format!("{path}: {inner}"))
        }
    })
}

impl Sampling {
    /// The sampler, the most tokens to generate (`default_max` if not given) and the stop
    /// strings.
    fn check(
        &self,
        d: &Defaults,
        default_max: usize,
    ) -> Result<(SamplerConfig, usize, Vec<String>), ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad("n: only 1 choice per request is supported"));
        }
        for (name, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if v.is_some_and(|v| v != 0.0) {
                return Err(ApiError::bad(format!(
                    "{name}: not supported (use repetition_penalty)"
                )));
            }
        }
        let mut c = SamplerConfig {
            temperature: 1.0,
            seed: super::super::run::random_seed(),
            ..Default::default()
        };
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(ApiError::bad(format!("temperature {t}: must be in [0, 2]")));
            }
            c.temperature = t;
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(ApiError::bad(format!("top_p {p}: must be in (0, 1]")));
            }
            c.top_p = p;
        }
        if let Some(k) = self.top_k {
            // vLLM: -1 (or 0) is off.
            if k < -1 {
                return Err(ApiError::bad(format!("top_k {k}: must be >= -1")));
            }
            c.top_k = k.max(0) as usize;
        }
        if let Some(m) = self.min_p {
            if !(0.0..=1.0).contains(&m) {
                return Err(ApiError::bad(format!("min_p {m}: must be in [0, 1]")));
            }
            c.min_p = m;
        }
        if let Some(r) = self.repetition_penalty {
            if !(r > 0.0 && r.is_finite()) {
                return Err(ApiError::bad(format!(
                    "repetition_penalty {r}: must be > 0"
                )));
            }
            c.repeat_penalty = r;
        }
        if let Some(n) = &self.seed {
            c.seed = n
                .as_u64()
                .or_else(|| n.as_i64().map(|i| i as u64))
                .ok_or_else(|| ApiError::bad(format!("seed {n}: must be an integer")))?;
        }
        for (k, &b) in self.logit_bias.iter().flatten() {
            let id = k
                .parse::<u32>()
                .ok()
                .filter(|&i| (i as usize) < d.vocab_size)
                .ok_or_else(|| {
                    ApiError::bad(format!(
                        "logit_bias: {k:?} is not a token id below {}",
                        d.vocab_size
                    ))
                })?;
            if !(-100.0..=100.0).contains(&b) {
                return Err(ApiError::bad(format!(
                    "logit_bias[{k}] = {b}: must be in [-100, 100]"
                )));
            }
            c.logit_bias.push((id, b));
        }
        c.logit_bias.sort_by_key(|&(id, _)| id);
        let max = match self.max_completion_tokens.or(self.max_tokens) {
            Some(0) => return Err(ApiError::bad("max_tokens: must be at least 1")),
            Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
            None => default_max,
        };
        let stop: Vec<String> = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > 16 {
            return Err(ApiError::bad("stop: at most 16 strings"));
        }
        let stop = stop.into_iter().filter(|s| !s.is_empty()).collect();
        Ok((c, max, stop))
    }
}

/// The prompt must leave room for at least one generated token; the answer is capped to the
/// room left.
fn fit(ids: &[u32], max: usize, d: &Defaults) -> Result<usize, ApiError> {
    if ids.len() >= d.ctx {
        return Err(ApiError::new(
            400,
            "invalid_request_error",
            "context_length_exceeded",
            &format!(
                "This model's maximum context length is {} tokens. However, your messages resulted in {} tokens.",
                d.ctx,
                ids.len()
            ),
        ));
    }
    Ok(max.min(d.ctx - ids.len()))
}

/// The thinking mode asked for: `chat_template_kwargs.thinking` (false: no reasoning), then
/// the reasoning effort (`chat_template_kwargs.reasoning_effort`, else `reasoning_effort`:
/// "max" is Think Max, "none" no reasoning, the others Think High, V4's other level), else
/// the server's default.
fn mode_of(r: &ChatRequest, d: &Defaults) -> Result<Mode, ApiError> {
    let kw = r.chat_template_kwargs.as_ref();
    let effort = kw
        .and_then(|k| k.reasoning_effort.as_deref())
        .or(r.reasoning_effort.as_deref());
    let by_effort = match effort {
        None => None,
        Some("max") => Some(Mode::ThinkMax),
        Some("high" | "medium" | "low" | "minimal") => Some(Mode::Think),
        Some("none") => Some(Mode::Chat),
        Some(e) => {
            return Err(ApiError::bad(format!(
                "reasoning_effort {e:?}: expected \"max\", \"high\" or \"none\""
            )));
        }
    };
    Ok(match (kw.and_then(|k| k.thinking), by_effort) {
        (Some(false), _) => Mode::Chat,
        (Some(true), Some(Mode::ThinkMax)) => Mode::ThinkMax,
        (Some(true), _) => Mode::Think,
        (None, Some(m)) => m,
        (None, None) => d.mode,
    })
}

/// `tools` as the chat format takes them: a list of `{"type": "function", "function":
/// {"name": ...}}`.
fn check_tools(tools: &Value) -> Result<(), ApiError> {
    let list = tools
        .as_array()
        .ok_or_else(|| ApiError::bad("tools: expected an array"))?;
    for (i, t) in list.iter().enumerate() {
        let f = t
            .get("function")
            .filter(|_| t.get("type").and_then(Value::as_str) == Some("function"))
            .ok_or_else(|| {
                ApiError::bad(format!(
                    "tools[{i}]: expected {{\"type\": \"function\", \"function\": {{...}}}}"
                ))
            })?;
        if f.get("name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err(ApiError::bad(format!(
                "tools[{i}].function.name: a non-empty string is required"
            )));
        }
        if let Some(p) = f.get("parameters")
            && !p.is_object()
        {
            return Err(ApiError::bad(format!(
                "tools[{i}].function.parameters: expected a JSON Schema object"
            )));
        }
    }
    Ok(())
}

/// A `/v1/chat/completions` body.
pub fn prepare_chat(body: &[u8], tok: &Tokenizer, d: &Defaults) -> Result<Prepared, ApiError> {
    let r: ChatRequest = parse(body)?;
    if r.messages.is_empty() {
        return Err(ApiError::bad("messages: at least one message is required"));
    }
    let mode = mode_of(&r, d)?;
    let (sampler, max, stop) = r.sampling.check(d, d.max_tokens)?;
    let tools_on = match r.tool_choice.as_ref() {
        None => true,
        Some(Value::String(s)) if s == "auto" => true,
        Some(Value::String(s)) if s == "none" => false,
        Some(other) => {
            return Err(ApiError::bad(format!(
                "tool_choice {other}: only \"auto\" and \"none\" are supported"
            )));
        }
    };
    let mut messages = r.messages;
    // A system message put in front for the tools: client indexes are one less.
    let mut inserted = 0;
    let offered = r
        .tools
        .as_ref()
        .filter(|t| !t.is_null() && t.as_array().is_none_or(|a| !a.is_empty()));
    let tools = match offered {
        Some(t) if tools_on => {
            check_tools(t)?;
            // The chat format keeps tools in the system message (a new, empty one if there
            // is none).
            match messages.first_mut() {
                Some(m) if m.role == Role::System => m.tools = Some(t.clone()),
                _ => {
                    let mut m = Message::new(Role::System, "");
                    m.tools = Some(t.clone());
                    messages.insert(0, m);
                    inserted = 1;
                }
            }
            true
        }
        Some(t) => {
            check_tools(t)?;
            false
        }
        None => messages.iter().any(|m| m.tools.is_some()),
    };
    let prefix = match messages.last() {
        Some(m) if m.prefix => {
            if m.tool_calls.is_some() {
                return Err(ApiError::bad(format!(
                    "messages[{}]: a prefix message takes content only",
                    messages.len() - 1 - inserted
                )));
            }
            m.content.clone()
        }
        _ => String::new(),
    };
    let text = render(&DSV4, &messages, mode).map_err(|e| {
        let crate::model::chat_format::ChatError::Message(i, msg) = e;
        if i < inserted {
            ApiError::bad(format!("tools: {msg}"))
        } else {
            ApiError::bad(format!("messages[{}]: {msg}", i - inserted))
        }
    })?;
    let ids = tok
        .encode(&text)
        .map_err(|e| ApiError::bad(format!("messages: {e}")))?;
    let max_tokens = fit(&ids, max, d)?;
    let continues = messages.last().is_some_and(|m| m.prefix);
    Ok(Prepared {
        ids,
        reasoning_first: mode.thinking() && !continues,
        sampler,
        max_tokens,
        stop,
        tools,
        prefix,
        stream: r.sampling.stream,
        include_usage: r
            .sampling
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage),
    })
}

/// A `/v1/completions` body: the prompt is raw text (BOS put in front unless it starts with
/// it, as the checkpoint's tokenizer config asks) or token ids.
pub fn prepare_completion(
    body: &[u8],
    tok: &Tokenizer,
    d: &Defaults,
) -> Result<Prepared, ApiError> {
    let r: CompletionRequest = parse(body)?;
    if r.echo == Some(true) {
        return Err(ApiError::bad("echo: not supported"));
    }
    if r.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad("suffix: not supported"));
    }
    // OpenAI's default.
    let (sampler, max, stop) = r.sampling.check(d, 16)?;
    let bos = tok.token_to_id(DSV4.bos);
    let ids = match &r.prompt {
        Value::String(t) => text_ids(t, tok, bos)?,
        Value::Array(a) if a.len() == 1 && a[0].is_string() => {
            text_ids(a[0].as_str().unwrap_or_default(), tok, bos)?
        }
        Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_u64) => {
            let mut ids = Vec::with_capacity(a.len());
            for (i, v) in a.iter().enumerate() {
                match v.as_u64() {
                    Some(id) if (id as usize) < d.vocab_size => ids.push(id as u32),
                    _ => {
                        return Err(ApiError::bad(format!(
                            "prompt[{i}]: {v} is not a token id below {}",
                            d.vocab_size
                        )));
                    }
                }
            }
            ids
        }
        _ => {
            return Err(ApiError::bad(
                "prompt: expected a non-empty string, one string in an array, or token ids",
            ));
        }
    };
    let max_tokens = fit(&ids, max, d)?;
    Ok(Prepared {
        ids,
        reasoning_first: false,
        sampler,
        max_tokens,
        stop,
        tools: false,
        prefix: String::new(),
        stream: r.sampling.stream,
        include_usage: r
            .sampling
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage),
    })
}

fn text_ids(text: &str, tok: &Tokenizer, bos: Option<u32>) -> Result<Vec<u32>, ApiError> {
    if text.is_empty() {
        return Err(ApiError::bad("prompt: empty"));
    }
    let mut ids = tok
        .encode(text)
        .map_err(|e| ApiError::bad(format!("prompt: {e}")))?;
    if let Some(b) = bos
        && ids.first() != Some(&b)
    {
        ids.insert(0, b);
    }
    Ok(ids)
}

/// `usage`, with the tokens reused from an earlier request's state.
pub fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// OpenAI's `finish_reason` for how generation ended (`TurnStats::stop`).
pub fn finish_reason(stop: &str, calls: bool) -> &'static str {
    match stop {
        "eos" if calls => "tool_calls",
        "length" | "context" => "length",
        _ => "stop",
    }
}

/// A parsed call as OpenAI's `tool_calls` entry (`index` for stream deltas).
pub fn tool_call(id: &str, c: &crate::model::dsml::ToolCall, index: Option<usize>) -> Value {
    let mut v = json!({
        "id": id,
        "type": "function",
        "function": {"name": c.name, "arguments": c.arguments},
    });
    if let Some(i) = index {
        v["index"] = json!(i);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thinking_mode_from_the_request() {
        let d = |mode| Defaults {
            mode,
            max_tokens: 1,
            ctx: 8,
            vocab_size: 8,
        };
        let mode = |body: &str, default| {
            let r: ChatRequest = parse(body.as_bytes()).unwrap();
            mode_of(&r, &d(default))
        };
        let m = r#"{"messages": []"#;
        let cases = [
            ("}", Mode::Think, Mode::Think),
            ("}", Mode::Chat, Mode::Chat),
            (
                r#", "chat_template_kwargs": {"thinking": false}}"#,
                Mode::ThinkMax,
                Mode::Chat,
            ),
            (
                r#", "chat_template_kwargs": {"thinking": true}}"#,
                Mode::Chat,
                Mode::Think,
            ),
            (
                r#", "chat_template_kwargs": {"thinking": true, "reasoning_effort": "max"}}"#,
                Mode::Chat,
                Mode::ThinkMax,
            ),
            (
                r#", "reasoning_effort": "max"}"#,
                Mode::Chat,
                Mode::ThinkMax,
            ),
            (
                r#", "reasoning_effort": "high"}"#,
                Mode::ThinkMax,
                Mode::Think,
            ),
            (r#", "reasoning_effort": "none"}"#, Mode::Think, Mode::Chat),
            (
                r#", "chat_template_kwargs": {"thinking": false}, "reasoning_effort": "max"}"#,
                Mode::Think,
                Mode::Chat,
            ),
        ];
        for (tail, default, want) in cases {
            assert_eq!(mode(&format!("{m}{tail}"), default), Ok(want), "{tail}");
        }
        assert!(
            mode(
                &format!(r#"{m}, "reasoning_effort": "extreme"}}"#),
                Mode::Think
            )
            .is_err()
        );
    }
}
