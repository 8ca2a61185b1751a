//! The HTTP side of `dsflash serve`: routes, the API key, the queue, and the answers (JSON,
//! or server-sent events when the request streams).

use super::api::{self, ApiError, Defaults, Prepared};
use super::{Event, Job};
use crate::model::chat_format::DSV4;
use crate::model::dsml::{CallSplitter, ToolCall, parse_completion};
use crate::model::tokenizer::Tokenizer;
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State as Shared};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use sha2::Digest;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

pub(super) struct State {
    queue: super::Queue,
    tok: Arc<Tokenizer>,
    defaults: Defaults,
    model: String,
    key: Option<String>,
    created: u64,
    /// Request ids: this run's tag and a counter.
    tag: u32,
    next: AtomicU64,
}

impl State {
    pub(super) fn new(
        queue: super::Queue,
        tok: Arc<Tokenizer>,
        defaults: Defaults,
        model: String,
        key: Option<String>,
    ) -> State {
        State {
            queue,
            tok,
            defaults,
            model,
            key,
            created: now(),
            tag: super::super::run::random_seed() as u32,
            next: AtomicU64::new(0),
        }
    }

    fn new_id(&self, kind: &str) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{kind}-{:08x}{n:016x}", self.tag)
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(super) fn router(st: Arc<State>, max_body: usize) -> Router {
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .fallback(|| async {
            error(ApiError::new(
                404,
                "invalid_request_error",
                "not_found",
                "no such endpoint (POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health)",
            ))
        })
        .method_not_allowed_fallback(|| async {
            error(ApiError::new(
                405,
                "invalid_request_error",
                "method_not_allowed",
                "method not allowed on this endpoint",
            ))
        })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(st)
}

fn error(e: ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = (status, Json(e.body())).into_response();
    if e.status == 429 {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

/// Equal secrets, compared in time independent of where they differ (and of their lengths:
/// their SHA-256 digests are compared).
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let (x, y) = (sha2::Sha256::digest(a), sha2::Sha256::digest(b));
    x.iter()
        .zip(y.iter())
        .fold(0u8, |acc, (p, q)| acc | (p ^ q))
        == 0
}

fn authorize(st: &State, h: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &st.key else {
        return Ok(());
    };
    let given = h
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if same_secret(given.trim().as_bytes(), key.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::new(
            401,
            "invalid_request_error",
            "invalid_api_key",
            "missing or wrong API key (send Authorization: Bearer KEY)",
        ))
    }
}

async fn models(Shared(st): Shared<Arc<State>>, h: HeaderMap) -> Response {
    if let Err(e) = authorize(&st, &h) {
        return error(e);
    }
    Json(json!({"object": "list", "data": [{
        "id": st.model,
        "object": "model",
        "created": st.created,
        "owned_by": "dsflash",
        "max_model_len": st.defaults.ctx,
    }]}))
    .into_response()
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

async fn chat(
    Shared(st): Shared<Arc<State>>,
    h: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(st, h, body, Kind::Chat).await
}

async fn completions(
    Shared(st): Shared<Arc<State>>,
    h: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(st, h, body, Kind::Completion).await
}

/// Sets the request's cancel flag when dropped: the client went away (its response or
/// stream was dropped) before the end.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// How to answer a request, besides what the engine runs.
struct Answer {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    thinking: bool,
    tools: bool,
    prefix: String,
    include_usage: bool,
}

async fn handle(
    st: Arc<State>,
    h: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    kind: Kind,
) -> Response {
    if let Err(e) = authorize(&st, &h) {
        return error(e);
    }
    let body = match body {
        Ok(b) => b,
        Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(ApiError::new(
                413,
                "invalid_request_error",
                "request_too_large",
                "the request body is over the server's --max-body limit",
            ));
        }
        Err(r) => return error(ApiError::bad(r.body_text())),
    };
    // Rendering and tokenizing a long prompt takes a while: off the async threads.
    let st2 = st.clone();
    let prep = tokio::task::spawn_blocking(move || match kind {
        Kind::Chat => api::prepare_chat(&body, &st2.tok, &st2.defaults),
        Kind::Completion => api::prepare_completion(&body, &st2.tok, &st2.defaults),
    })
    .await;
    let prep: Prepared = match prep {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return error(e),
        Err(_) => {
            return error(ApiError::new(
                500,
                "server_error",
                "internal",
                "internal error",
            ));
        }
    };
    let answer = Answer {
        kind,
        id: st.new_id(if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        created: now(),
        model: st.model.clone(),
        thinking: prep.reasoning_first,
        tools: prep.tools,
        prefix: prep.prefix.clone(),
        include_usage: prep.include_usage,
    };
    let stream = prep.stream;
    let (tx, rx) = unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    let job = Job {
        prep,
        cancel: cancel.clone(),
        events: tx,
    };
    if let Err(e) = st.queue.push(job) {
        return error(e);
    }
    let guard = CancelOnDrop(cancel);
    if stream {
        stream_answer(answer, rx, guard)
    } else {
        let r = whole_answer(&answer, rx).await;
        drop(guard);
        match r {
            Ok(v) => Json(v).into_response(),
            Err(e) => error(e),
        }
    }
}

/// The answer's text split into content and tool calls (when tools were offered).
struct Split {
    content: String,
    calls: Vec<ToolCall>,
}

/// At the end of the answer: the tool calls of a block that ended with the answer. A block
/// cut short (max_tokens) gives no calls; a malformed one is an error, never content.
fn calls_at_end(sp: &CallSplitter, stop: &str) -> Result<Vec<ToolCall>, ApiError> {
    if !sp.in_calls() || stop != "eos" {
        return Ok(Vec::new());
    }
    let text = format!("{}{}", sp.text(), DSV4.eos);
    parse_completion(&DSV4, &text, false)
        .map(|p| p.tool_calls)
        .map_err(|e| {
            ApiError::new(
                500,
                "server_error",
                "malformed_tool_call",
                &format!("the model wrote a malformed tool call: {e}"),
            )
        })
}

fn usage_of(s: &super::TurnStats) -> Value {
    api::usage(
        s.prompt_tokens,
        s.generated_tokens,
        s.prompt_tokens.saturating_sub(s.prefilled_tokens),
    )
}

/// Wait for the whole answer and build the response object.
async fn whole_answer(a: &Answer, mut rx: UnboundedReceiver<Event>) -> Result<Value, ApiError> {
    let mut reasoning = String::new();
    let mut text = String::new();
    let stats = loop {
        match rx.recv().await {
            Some(Event::Reasoning(t)) => reasoning.push_str(&t),
            Some(Event::Answer(t)) => text.push_str(&t),
            Some(Event::Done(Ok(s))) => break s,
            Some(Event::Done(Err(e))) => return Err(e),
            None => return Err(super::shutting_down()),
        }
    };
    let split = if a.tools {
        let mut sp = CallSplitter::with_prefix(&a.prefix);
        let mut content = sp.push(&text).to_string();
        content.push_str(sp.finish());
        Split {
            content,
            calls: calls_at_end(&sp, stats.stop)?,
        }
    } else {
        Split {
            content: text,
            calls: Vec::new(),
        }
    };
    let finish = api::finish_reason(stats.stop, !split.calls.is_empty());
    if a.kind == Kind::Completion {
        return Ok(json!({
            "id": a.id, "object": "text_completion", "created": a.created, "model": a.model,
            "choices": [{"index": 0, "text": split.content, "logprobs": null, "finish_reason": finish}],
            "usage": usage_of(&stats),
        }));
    }
    let mut message = json!({"role": "assistant", "content": split.content});
    if a.thinking {
        message["reasoning_content"] = json!(reasoning);
    }
    if !split.calls.is_empty() {
        let calls: Vec<Value> = split
            .calls
            .iter()
            .enumerate()
            .map(|(i, c)| api::tool_call(&format!("call_{}_{i}", a.id), c, None))
            .collect();
        message["tool_calls"] = json!(calls);
        if split.content.is_empty() {
            message["content"] = Value::Null;
        }
    }
    Ok(json!({
        "id": a.id, "object": "chat.completion", "created": a.created, "model": a.model,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
        "usage": usage_of(&stats),
    }))
}

impl Answer {
    /// One streamed chunk: a chat delta, or a completion's text.
    fn chunk(&self, delta: Value, finish: Option<&str>) -> Sse {
        let v = match self.kind {
            Kind::Chat => json!({
                "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
            }),
            Kind::Completion => json!({
                "id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "text": delta.get("content").cloned().unwrap_or(json!("")),
                             "logprobs": null, "finish_reason": finish}],
            }),
        };
        Sse::default().data(v.to_string())
    }

    fn usage_chunk(&self, s: &super::TurnStats) -> Sse {
        let object = match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        };
        let v = json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": [], "usage": usage_of(s),
        });
        Sse::default().data(v.to_string())
    }
}

/// Turn the engine's events into server-sent events.
async fn pump(a: Answer, mut rx: UnboundedReceiver<Event>, out: tokio::sync::mpsc::Sender<Sse>) {
    let send = |e: Sse| {
        let out = out.clone();
        async move { out.send(e).await.is_ok() }
    };
    if a.kind == Kind::Chat
        && !send(a.chunk(json!({"role": "assistant", "content": ""}), None)).await
    {
        return;
    }
    let mut sp = CallSplitter::with_prefix(&a.prefix);
    loop {
        let ok = match rx.recv().await {
            Some(Event::Reasoning(t)) => send(a.chunk(json!({"reasoning_content": t}), None)).await,
            Some(Event::Answer(t)) => {
                let c = if a.tools { sp.push(&t).to_string() } else { t };
                c.is_empty() || send(a.chunk(json!({"content": c}), None)).await
            }
            Some(Event::Done(Ok(stats))) => {
                if a.tools {
                    let rest = sp.finish().to_string();
                    if !rest.is_empty() && !send(a.chunk(json!({"content": rest}), None)).await {
                        return;
                    }
                }
                let calls = match calls_at_end(&sp, stats.stop) {
                    Ok(c) => c,
                    Err(e) => {
                        send(Sse::default().data(e.body().to_string())).await;
                        return;
                    }
                };
                for (i, c) in calls.iter().enumerate() {
                    let d = json!({"tool_calls": [api::tool_call(&format!("call_{}_{i}", a.id), c, Some(i))]});
                    if !send(a.chunk(d, None)).await {
                        return;
                    }
                }
                let finish = api::finish_reason(stats.stop, !calls.is_empty());
                if !send(a.chunk(json!({}), Some(finish))).await {
                    return;
                }
                if a.include_usage && !send(a.usage_chunk(&stats)).await {
                    return;
                }
                send(Sse::default().data("[DONE]")).await;
                return;
            }
            Some(Event::Done(Err(e))) => {
                send(Sse::default().data(e.body().to_string())).await;
                return;
            }
            None => return,
        };
        if !ok {
            return;
        }
    }
}

/// A streamed answer: the events as they come; keep-alive comments while the prompt is
/// prefilled, so a client that went away is noticed (its stream is dropped, which cancels
/// the request).
fn stream_answer(a: Answer, rx: UnboundedReceiver<Event>, guard: CancelOnDrop) -> Response {
    let (out, sse) = tokio::sync::mpsc::channel::<Sse>(64);
    tokio::spawn(pump(a, rx, out));
    let body = futures_util::stream::unfold((sse, guard), |(mut sse, guard)| async move {
        sse.recv()
            .await
            .map(|e| (Ok::<_, Infallible>(e), (sse, guard)))
    });
    axum::response::sse::Sse::new(body)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(2)))
        .into_response()
}
