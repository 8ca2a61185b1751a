//! Command line: `dsflash <subcommand>`. Exit codes: 0 ok, 1 runtime error, 2 usage error,
//! 128 + the signal after SIGINT/SIGTERM/SIGHUP (see `signals`).

mod bench;
mod cache;
mod chat;
mod download;
mod endpoint;
mod inspect;
mod oneshot;
mod prompt;
pub mod run;
mod serve;
pub mod signals;
mod synth;
pub mod talk;

use crate::model::chat_format::Mode;
use clap::{Args, Parser, Subcommand};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;

/// A flag with a bad value, found after parsing: reported like clap's own usage errors
/// (one line, exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

/// `--think` / `--no-think` / `--think-max` (default: thinking).
#[derive(Args, Debug, Clone, Default)]
pub struct ModeArgs {
    /// Reason before answering (the default; the model card's "Think High").
    #[arg(long, group = "mode")]
    pub think: bool,
    /// Answer directly, without reasoning ("Non-think").
    #[arg(long, group = "mode", visible_alias = "nothink")]
    pub no_think: bool,
    /// Maximum reasoning effort ("Think Max"; the model card advises >= 384K context).
    #[arg(long, group = "mode")]
    pub think_max: bool,
}

impl ModeArgs {
    pub fn mode(&self) -> Mode {
        if self.no_think {
            Mode::Chat
        } else if self.think_max {
            Mode::ThinkMax
        } else {
            Mode::Think
        }
    }
}

/// Talking to the model: `dsflash` (interactive on a terminal) or one-shot with `-p`/stdin.
#[derive(Args, Debug, Clone)]
pub struct TalkArgs {
    /// One-shot: ask this and print the answer. With stdin not a terminal, stdin is read
    /// and comes first, then a blank line, then this text.
    #[arg(short = 'p', long = "prompt")]
    pub prompt: Option<String>,
    /// One-shot: read the input from FILE instead of stdin (`-` is stdin); it comes first,
    /// then a blank line, then the -p text.
    #[arg(short = 'f', long = "file")]
    pub file: Option<PathBuf>,
    /// Stop the answer where this text appears (repeatable; the text itself is not output).
    #[arg(long = "stop", value_name = "STRING")]
    pub stop: Vec<String>,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens to generate per answer (reasoning included).
    #[arg(short = 'n', long, default_value_t = 8192)]
    pub max_tokens: usize,
    /// One-shot: print one JSON object (answer, reasoning, token counts, timings).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub mode_args: ModeArgs,
    /// tokenizer.json (default: the one in the model directory).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[command(flatten)]
    pub engine: run::EngineArgs,
    #[command(flatten)]
    pub sampling: run::SamplerArgs,
    #[command(flatten)]
    pub cache: cache::CacheArgs,
    /// Ask an OpenAI-compatible server instead of the local model (chat, one-shot and stdin):
    /// another `dsflash serve`, or vLLM / SGLang serving V4-Flash; `--model` names the served
    /// model.
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
    /// The server's API key for --endpoint (default: $OPENAI_API_KEY).
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
}

impl TalkArgs {
    pub fn mode(&self) -> Mode {
        self.mode_args.mode()
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "dsflash",
    version,
    about = "Run DeepSeek-V4-Flash on one workstation",
    after_help = "Without a command: `dsflash` on a terminal starts a chat (/help inside it); \
`dsflash -p TEXT`, `dsflash -f FILE` or piped stdin answers once on stdout.\n\
Examples:\n  dsflash\n  dsflash -p \"Explain mmap in one paragraph\"\n  \
cat notes.txt | dsflash -p \"Summarise this\" --no-think"
)]
pub struct Cli {
    /// Extra notes on stderr (e.g. tensors in the checkpoint that the model does not use).
    #[arg(long, short, global = true)]
    pub verbose: bool,
    /// Worker threads for the compute (default: one per physical core; hyper-threads share
    /// a core's FMA units and would only contend).
    #[arg(long, global = true, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub threads: Option<u64>,
    #[command(flatten)]
    pub talk: TalkArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Describe a checkpoint: config, layer pattern, tensors, bytes per component and per token.
    Inspect(inspect::InspectArgs),
    /// Write a random checkpoint in the official layout for any config (tests, benchmarks).
    Synth(synth::SynthArgs),
    /// Logits of a prompt given as token ids, written as a float32 .npy [T, vocab].
    Logits(run::LogitsArgs),
    /// Continue a prompt given as token ids; prints the new ids.
    Generate(run::GenerateArgs),
    /// Print a conversation rendered in the chat format (text or token ids).
    Prompt(prompt::PromptArgs),
    /// Fetch a checkpoint into the Hugging Face cache (resumable, verified).
    Download(download::DownloadArgs),
    /// Measure bandwidth, FMA peak, the kernels and end-to-end decode/prefill.
    Bench(bench::BenchArgs),
    /// Show or empty the prompt cache (decode states kept on disk between runs).
    Cache(cache::CacheCmdArgs),
    /// Serve the model over an OpenAI-compatible HTTP API (chat, completions, tool calls).
    Serve(serve::ServeArgs),
}

/// No subcommand: one-shot if there is a prompt or piped stdin, else the interactive chat.
fn talk(cli: &Cli) -> anyhow::Result<i32> {
    let a = &cli.talk;
    let stdin_tty = std::io::stdin().is_terminal();
    if let Some(f) = &a.file {
        let text = if f.as_os_str() == "-" {
            oneshot::read_stdin()?
        } else {
            oneshot::read_file(f)?
        };
        return oneshot::run(a, Some(text), cli.verbose);
    }
    if a.prompt.is_some() || !stdin_tty {
        let stdin = if stdin_tty {
            None
        } else {
            Some(oneshot::read_stdin()?)
        };
        return oneshot::run(a, stdin, cli.verbose);
    }
    if a.json {
        anyhow::bail!("--json is for one-shot use (-p TEXT or piped stdin)");
    }
    // First run on a terminal: offer to fetch a missing hub model (never asked in a pipe:
    // there the error names the command to run).
    if a.endpoint.is_none()
        && crate::hub::missing_repo(&a.engine.model)
        && std::io::stderr().is_terminal()
    {
        eprint!(
            "{} is not downloaded yet (about 160 GB into {}). Download it now? [y/N] ",
            a.engine.model,
            crate::hub::hub_cache_dir().display()
        );
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if matches!(answer.trim(), "y" | "Y" | "yes") {
            let o = crate::download::Options {
                repo: a.engine.model.clone(),
                revision: "main".into(),
                ..Default::default()
            };
            crate::download::download(&crate::download::Hub::from_env(), &o, signals::stop_flag())?;
        } else {
            anyhow::bail!(
                "not downloaded; later: dsflash download --model {}",
                a.engine.model
            );
        }
    }
    chat::run(a, cli.verbose)
}

/// Run the CLI; returns the process exit code.
pub fn main() -> i32 {
    // A file-size limit (ulimit -f) must surface as a write error we report, not kill us.
    // SAFETY: setting a signal disposition to SIG_IGN at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    signals::install();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    let threads = cli
        .threads
        .map(|n| n as usize)
        .unwrap_or_else(crate::backend::cpu::topology::physical_cores);
    // Fails only if a pool already exists (not the case at start-up).
    // The command itself runs on one of these threads (below): the main thread's stack size.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .stack_size(8 << 20)
        .build_global();
    let run_command = || match &cli.command {
        Some(Command::Inspect(a)) => inspect::run(a, cli.verbose).map(|_| 0),
        Some(Command::Synth(a)) => synth::run(a).map(|_| 0),
        Some(Command::Logits(a)) => run::logits(a).map(|_| 0),
        Some(Command::Generate(a)) => run::generate(a).map(|_| 0),
        Some(Command::Prompt(a)) => prompt::run(a).map(|_| 0),
        Some(Command::Download(a)) => download::run(a),
        Some(Command::Bench(a)) => bench::run(a).map(|_| 0),
        Some(Command::Cache(a)) => cache::run(a).map(|_| 0),
        Some(Command::Serve(a)) => serve::run(a, cli.verbose),
        None => talk(&cli),
    };
    // The command runs on a worker of the pool: its parallel loops then start at once on
    // this thread, instead of each one (down to a norm over one token) being handed to a
    // worker that may have to be woken first. Decode of the 2-layer bench model: +5 %, its
    // FP4 products 22-23 -> 26-27 GB/s (paired runs). A panic still reaches this thread.
    let mut result = None;
    rayon::scope(|s| s.spawn(|_| result = Some(run_command())));
    let result =
        result.unwrap_or_else(|| Err(anyhow::anyhow!("internal: the command did not run")));
    match result {
        Ok(code) => code,
        Err(e) => {
            // Stopped by a signal: the output is already flushed and ended.
            if let Some(signals::Interrupted(sig)) = e.downcast_ref::<signals::Interrupted>() {
                return signals::exit_code(*sig);
            }
            // Broken pipe on stdout (`| head`) is not an error worth reporting, whoever
            // wrote (plain writes or serde_json's).
            let broken_pipe = e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
                    || c.downcast_ref::<serde_json::Error>()
                        .is_some_and(|j| j.io_error_kind() == Some(std::io::ErrorKind::BrokenPipe))
            });
            if broken_pipe {
                return 0;
            }
            if e.downcast_ref::<Usage>().is_some() {
                let _ = writeln!(std::io::stderr(), "error: {e}");
                return 2;
            }
            let mut msg = format!("{e}");
            // anyhow contexts: show the chain on one line.
            for cause in e.chain().skip(1) {
                msg.push_str(&format!(": {cause}"));
            }
            let _ = writeln!(std::io::stderr(), "error: {msg}");
            1
        }
    }
}
