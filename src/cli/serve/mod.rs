//! `dsflash serve`: the local model behind an OpenAI-compatible HTTP API (axum on tokio).
//!
//! One engine, one request at a time: the HTTP side checks a request, renders and tokenizes
//! it (`api`), and queues it (FIFO, bounded: a full queue is HTTP 429). The engine runs on
//! this thread and keeps its KV state between requests, so a request that extends an earlier
//! prompt (the next turn of a conversation) prefills only what is new. A client that goes
//! away cancels its request; SIGTERM cancels the running one, answers the queued ones 503 and
//! exits 0.

mod api;
mod http;

use super::ModeArgs;
use super::talk::{Sink, Talk, TurnStats};
use crate::engine::sampler::Sampler;
use api::{ApiError, Prepared};
use clap::Args;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on (a non-loopback one without --api-key gets a warning).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free one; the address is printed on stderr).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1 requests (default: $DSFLASH_API_KEY).
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Requests that may wait while one runs; more are answered 429 with Retry-After.
    #[arg(long, default_value_t = 16)]
    pub queue: usize,
    /// Largest request body accepted (413 above it).
    #[arg(long, default_value = "64M", value_parser = super::run::parse_size_arg)]
    pub max_body: u64,
    /// Most tokens to generate when a chat request gives no max_tokens.
    #[arg(short = 'n', long, default_value_t = 8192)]
    pub max_tokens: usize,
    /// The thinking mode of requests that do not set chat_template_kwargs.thinking.
    #[command(flatten)]
    pub mode_args: ModeArgs,
    /// tokenizer.json (default: the one in the model directory).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[command(flatten)]
    pub engine: super::run::EngineArgs,
    #[command(flatten)]
    pub cache: super::cache::CacheArgs,
}

/// What the engine sends back while it runs a job.
enum Event {
    Reasoning(String),
    Answer(String),
    Done(Result<TurnStats, ApiError>),
}

/// One request for the engine.
struct Job {
    prep: Prepared,
    /// Set when the client is gone or the server stops.
    cancel: Arc<AtomicBool>,
    events: UnboundedSender<Event>,
}

/// The FIFO of jobs for the engine: at most `places` waiting besides the one running. A job
/// holds its place until just before its end is sent, so a client that has seen the end of
/// its answer finds its place free.
struct Queue {
    tx: std::sync::mpsc::Sender<Job>,
    held: Arc<AtomicUsize>,
    places: usize,
}

impl Queue {
    fn push(&self, job: Job) -> Result<(), ApiError> {
        if self.held.fetch_add(1, Ordering::SeqCst) > self.places {
            self.held.fetch_sub(1, Ordering::SeqCst);
            return Err(ApiError::new(
                429,
                "rate_limit_error",
                "queue_full",
                "the server is busy (its queue is full); retry later",
            ));
        }
        self.tx.send(job).map_err(|_| {
            self.held.fetch_sub(1, Ordering::SeqCst);
            shutting_down()
        })
    }
}

/// Generated text into the request's channel; a closed channel (the client went away) ends
/// the generation.
struct ChannelSink<'a>(&'a UnboundedSender<Event>);

impl ChannelSink<'_> {
    fn send(&self, e: Event) -> std::io::Result<()> {
        self.0.send(e).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away")
        })
    }
}

impl Sink for ChannelSink<'_> {
    fn reasoning(&mut self, text: &str) -> std::io::Result<()> {
        self.send(Event::Reasoning(text.to_string()))
    }
    fn answer(&mut self, text: &str) -> std::io::Result<()> {
        self.send(Event::Answer(text.to_string()))
    }
}

fn shutting_down() -> ApiError {
    ApiError::new(
        503,
        "server_error",
        "shutting_down",
        "the server is shutting down",
    )
}

/// Run one job on the engine; its end.
fn run_job(talk: &mut Talk, job: &Job, stopping: &AtomicBool) -> Result<TurnStats, ApiError> {
    let p = &job.prep;
    talk.sampler = Sampler::new(p.sampler.clone());
    talk.max_tokens = p.max_tokens;
    talk.stop = p.stop.clone();
    let mut sink = ChannelSink(&job.events);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        talk.complete(&p.ids, p.reasoning_first, &mut sink, &job.cancel)
    }));
    match r {
        Ok(Ok(c)) if c.stats.stop == "interrupted" && stopping.load(Ordering::SeqCst) => {
            Err(shutting_down())
        }
        Ok(Ok(c)) => Ok(c.stats),
        Ok(Err(_)) if stopping.load(Ordering::SeqCst) => Err(shutting_down()),
        Ok(Err(e)) => Err(ApiError::new(
            500,
            "server_error",
            "engine_error",
            &format!("{e:#}"),
        )),
        Err(_) => {
            // The state may be half-updated: start the next request from scratch.
            talk.clear(false);
            Err(ApiError::new(
                500,
                "server_error",
                "engine_error",
                "internal error in the engine (the request was dropped; the server goes on)",
            ))
        }
    }
}

/// Returns the process exit code: 0 after SIGTERM (a service manager's stop), 128 + the
/// signal after SIGINT or SIGHUP.
pub fn run(a: &ServeArgs, verbose: bool) -> anyhow::Result<i32> {
    let key = a
        .api_key
        .clone()
        .or_else(|| std::env::var("DSFLASH_API_KEY").ok())
        .filter(|k| !k.is_empty());
    let max_body = usize::try_from(a.max_body).unwrap_or(usize::MAX);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(2)
        .thread_name("dsflash-http")
        .enable_io()
        .enable_time()
        .build()?;
    // Listen first: a busy port is reported before minutes of loading.
    let listener = rt
        .block_on(tokio::net::TcpListener::bind((a.host.as_str(), a.port)))
        .map_err(|e| anyhow::anyhow!("--host {} --port {}: cannot listen: {e}", a.host, a.port))?;
    let addr = listener.local_addr()?;
    if key.is_none() && !addr.ip().is_loopback() {
        eprintln!(
            "dsflash: warning: serving on {addr} without --api-key: anyone who can reach it can use the model"
        );
    }
    let (_, engine, tok) = super::talk::load(&a.engine, a.tokenizer.as_deref())?;
    let tok = Arc::new(tok);
    let mut talk = Talk::open(&engine, &tok, a.engine.session(&engine)?)?;
    talk.cache = a.cache.open(verbose);
    let defaults = api::Defaults {
        mode: a.mode_args.mode(),
        max_tokens: a.max_tokens,
        ctx: a.engine.ctx.unwrap_or(engine.cfg.max_position_embeddings),
        vocab_size: engine.cfg.vocab_size,
    };
    let (tx, jobs) = std::sync::mpsc::channel::<Job>();
    let held = Arc::new(AtomicUsize::new(0));
    let queue = Queue {
        tx,
        held: held.clone(),
        places: a.queue,
    };
    let running: Arc<Mutex<Option<Arc<AtomicBool>>>> = Arc::default();
    let stopping = super::signals::stop_flag();
    let state = http::State::new(queue, tok.clone(), defaults, a.engine.model.clone(), key);
    let app = http::router(Arc::new(state), max_body);
    let cancel_running = running.clone();
    let server = rt.spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                while !stopping.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                if let Some(c) = cancel_running
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                {
                    c.store(true, Ordering::SeqCst);
                }
            })
            .await
    });
    eprintln!(
        "dsflash: serving {} on http://{addr}/v1 (OpenAI API; Ctrl+C or SIGTERM stops)",
        a.engine.model
    );
    // The engine, one job at a time, until the server has stopped.
    loop {
        match jobs.recv_timeout(Duration::from_millis(100)) {
            Ok(job) => {
                *running.lock().unwrap_or_else(|e| e.into_inner()) = Some(job.cancel.clone());
                let done = if stopping.load(Ordering::SeqCst) {
                    Some(Err(shutting_down()))
                } else if !job.cancel.load(Ordering::SeqCst) && !job.events.is_closed() {
                    Some(run_job(&mut talk, &job, stopping))
                } else {
                    None
                };
                *running.lock().unwrap_or_else(|e| e.into_inner()) = None;
                held.fetch_sub(1, Ordering::SeqCst);
                if let Some(d) = done {
                    let _ = job.events.send(Event::Done(d));
                }
            }
            Err(RecvTimeoutError::Timeout) if server.is_finished() => break,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    let served = rt.block_on(server);
    rt.shutdown_timeout(Duration::from_secs(1));
    a.engine.finish(&engine)?;
    served??;
    Ok(match super::signals::received() {
        None | Some(libc::SIGTERM) => 0,
        Some(s) => super::signals::exit_code(s),
    })
}
