//! Interactive chat (`dsflash` on a terminal). The conversation's KV state is reused across
//! turns; Ctrl+C stops an answer and returns to the prompt, Ctrl+D or /quit exits.
//! Alt+Enter inserts a newline; pasted text keeps its newlines.

use super::TalkArgs;
use super::talk::{Conversation, Sink, Talk, TurnStats, use_color};
use crate::model::chat_format::{Message, Mode, Role};
use rustyline::error::ReadlineError;
use rustyline::{Cmd, DefaultEditor, KeyCode, KeyEvent, Modifiers};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;

const HELP: &str = "\
commands:
  /help            this help
  /think           thinking mode (reason, then answer)
  /nothink         answer directly (also /no-think)
  /system [TEXT]   show the system prompt, or set it (clears the conversation)
  /clear           forget the conversation (keeps the system prompt)
  /read FILE       send FILE's contents as your message
  /stats           tokens used and the last answer's speed
  /save FILE       save the conversation as JSON messages (its state goes to the prompt cache)
  /load FILE       load a conversation saved with /save (or any OpenAI-style messages array);
                   with its state still in the prompt cache, it continues without a prefill
  /quit            exit (also Ctrl+D)
keys: Enter sends; Alt+Enter inserts a newline (pasted text keeps its newlines);
      Ctrl+C stops an answer; Ctrl+D exits.";

/// `$XDG_DATA_HOME/dsflash/history`, else `~/.local/share/dsflash/history`.
pub fn history_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))?;
    Some(base.join("dsflash").join("history"))
}

/// A chat command's file argument: `~` and `~/...` are the home directory, as in a shell.
fn user_path(arg: &str) -> PathBuf {
    let home = || {
        std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from)
    };
    if arg == "~" {
        return home().unwrap_or_else(|| PathBuf::from(arg));
    }
    match (arg.strip_prefix("~/"), home()) {
        (Some(rest), Some(h)) => h.join(rest),
        _ => PathBuf::from(arg),
    }
}

struct ChatSink {
    color: bool,
    in_reasoning: bool,
}

impl Sink for ChatSink {
    fn reasoning(&mut self, text: &str) -> std::io::Result<()> {
        let mut o = std::io::stdout().lock();
        if !self.in_reasoning {
            self.in_reasoning = true;
            if self.color {
                write!(o, "\x1b[2m")?;
            } else {
                write!(o, "[thinking] ")?;
            }
        }
        write!(o, "{text}")?;
        o.flush()
    }
    fn answer(&mut self, text: &str) -> std::io::Result<()> {
        let mut o = std::io::stdout().lock();
        if self.in_reasoning {
            self.in_reasoning = false;
            if self.color {
                write!(o, "\x1b[0m")?;
            }
            writeln!(o)?;
        }
        write!(o, "{text}")?;
        o.flush()
    }
}

/// Device, expert-cache hit rate and bytes moved, when a device is in use.
fn device_line(ex: &crate::backend::exec::Exec) -> Option<String> {
    let dev = ex.device()?;
    let st = dev.stats();
    let e = ex.experts.stats();
    let time = ex.timing.split();
    let sel = (e.hits + e.misses).max(1);
    Some(format!(
        "{}: expert cache {:.1} % hits ({} of {} selections, {} promotions), {:.2} GB to the device, {:.2} GB back, {} launches, {} steps on the device ({} given up and done on the host); time in device ops {:.2} s (device: {:.2} s copying, {:.2} s in kernels), on the CPU {:.2} s (products, overlapping the device's)",
        dev.name(),
        100.0 * e.hits as f64 / sel as f64,
        e.hits,
        e.hits + e.misses,
        e.promotions,
        st.bytes_to_device as f64 / 1e9,
        st.bytes_to_host as f64 / 1e9,
        st.launches,
        ex.timing.device_steps(),
        ex.timing.redone_steps(),
        time.device_s,
        st.copy_s,
        st.kernel_s,
        time.cpu_s
    ))
}

fn stats_line(s: &TurnStats, context: usize) -> String {
    let cached = match s.cached_tokens {
        0 => String::new(),
        n => format!(", {n} from the prompt cache"),
    };
    format!(
        "[{} prompt tokens ({} new{cached}) at {:.1} tok/s | {} tokens at {:.1} tok/s | context {}{}]",
        s.prompt_tokens,
        s.prefilled_tokens,
        s.prefill_tps(),
        s.generated_tokens,
        s.decode_tps(),
        context,
        match s.stop {
            "interrupted" => " | interrupted",
            "length" => " | stopped at --max-tokens",
            "context" => " | context full",
            _ => "",
        }
    )
}

pub fn run(a: &TalkArgs, verbose: bool) -> anyhow::Result<i32> {
    if let Some(url) = &a.endpoint {
        let mut remote = super::endpoint::Remote::new(a, url)?;
        return chat_loop(a, &mut remote, url, None);
    }
    let (dir, engine, tok) = super::talk::load(&a.engine, a.tokenizer.as_deref())?;
    let mut talk = Talk::new(&engine, &tok, a)?;
    talk.cache = a.cache.open(verbose);
    let code = chat_loop(a, &mut talk, &dir.display().to_string(), Some(&engine))?;
    a.engine.finish(&engine)?;
    Ok(code)
}

/// Read lines and commands until /quit, Ctrl+D or a signal; returns the exit code.
fn chat_loop(
    a: &TalkArgs,
    talk: &mut dyn Conversation,
    what: &str,
    engine: Option<&crate::engine::Engine>,
) -> anyhow::Result<i32> {
    let stop = super::signals::stop_flag();
    let color = use_color(std::io::stdout().is_terminal());
    let mut ed = DefaultEditor::new()?;
    ed.bind_sequence(KeyEvent(KeyCode::Enter, Modifiers::ALT), Cmd::Newline);
    let hist = history_path();
    if let Some(h) = &hist {
        let _ = ed.load_history(h);
    }
    eprintln!(
        "dsflash: {what} ({} mode). /help for commands, Ctrl+D to exit.",
        if talk.mode().thinking() {
            "thinking"
        } else {
            "chat"
        }
    );
    let mut last: Option<TurnStats> = None;
    let mut exit_code = 0;
    loop {
        let line = match ed.readline("> ") {
            Ok(l) => l,
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        };
        let input = line.trim();
        if input.is_empty() {
            continue;
        }
        let _ = ed.add_history_entry(line.as_str());
        let user = if let Some(cmd) = input.strip_prefix('/') {
            let (name, arg) = cmd.split_once(char::is_whitespace).unwrap_or((cmd, ""));
            let arg = arg.trim();
            match name {
                "help" => {
                    println!("{HELP}");
                    continue;
                }
                "quit" | "exit" => break,
                "think" => {
                    talk.set_mode(Mode::Think);
                    println!("thinking mode");
                    continue;
                }
                "nothink" | "no-think" => {
                    talk.set_mode(Mode::Chat);
                    println!("chat mode (no thinking)");
                    continue;
                }
                "system" if arg.is_empty() => {
                    match talk.messages().iter().find(|m| m.role == Role::System) {
                        Some(m) => println!("system prompt: {}", m.content),
                        None => println!("no system prompt (set one with /system TEXT)"),
                    }
                    continue;
                }
                "system" => {
                    talk.set_system(arg);
                    talk.clear(true);
                    println!(
                        "system prompt {}; conversation cleared",
                        if arg.is_empty() { "removed" } else { "set" }
                    );
                    continue;
                }
                "clear" => {
                    talk.clear(true);
                    println!("conversation cleared");
                    continue;
                }
                "stats" => {
                    match engine {
                        Some(e) => println!(
                            "{} messages; {} tokens in the KV state (what the next turn shares with them is reused; cap {})",
                            talk.messages().len(),
                            talk.context_tokens(),
                            a.engine.ctx.unwrap_or(e.cfg.max_position_embeddings)
                        ),
                        None => println!(
                            "{} messages; {} tokens in the last turn (the server reuses what it still holds)",
                            talk.messages().len(),
                            talk.context_tokens()
                        ),
                    }
                    if let Some(s) = &last {
                        println!("last answer: {}", stats_line(s, talk.context_tokens()));
                    }
                    if let Some(line) = engine.and_then(|e| device_line(&e.exec)) {
                        println!("{line}");
                    }
                    if let Some(r) = engine.and_then(|e| e.ram_tier()).map(|r| r.stats()) {
                        println!(
                            "--ram: {} expert selections served from RAM, {} read from the files ({:.2} GB, {:.1} s waited for)",
                            r.hits,
                            r.reads,
                            r.bytes_read as f64 / 1e9,
                            r.wait_s
                        );
                    }
                    continue;
                }
                "save" => {
                    if arg.is_empty() {
                        println!("usage: /save FILE");
                        continue;
                    }
                    // The OpenAI-style array that /load and `dsflash prompt --messages` read.
                    let json = serde_json::to_string_pretty(talk.messages())?;
                    match crate::fsutil::write_atomic(&user_path(arg), json.as_bytes()) {
                        Ok(()) if talk.keep(json.as_bytes()) => println!(
                            "saved {} messages to {arg} (and their state, {} tokens, in the prompt cache)",
                            talk.messages().len(),
                            talk.context_tokens()
                        ),
                        Ok(()) => println!("saved {} messages to {arg}", talk.messages().len()),
                        Err(e) => println!("error: {e}"),
                    }
                    continue;
                }
                "load" => {
                    let bytes = crate::fsutil::read_regular(&user_path(arg));
                    match bytes
                        .as_ref()
                        .map_err(|e| anyhow::anyhow!("{e}"))
                        .and_then(|b| {
                            serde_json::from_slice::<Vec<Message>>(b).map_err(anyhow::Error::from)
                        })
                        // Only what the chat format can render: a later turn must not fail.
                        .and_then(|m| {
                            crate::model::chat_format::render(
                                &crate::model::chat_format::DSV4,
                                &m,
                                talk.mode(),
                            )?;
                            Ok(m)
                        }) {
                        Ok(m) => {
                            let n = m.len();
                            *talk.messages_mut() = m;
                            match bytes.ok().and_then(|b| talk.resume(&b)) {
                                Some(t) => println!(
                                    "loaded {n} messages from {arg} (their state, {t} tokens, from the prompt cache)"
                                ),
                                None => println!("loaded {n} messages from {arg}"),
                            }
                        }
                        Err(e) => println!("error: /load {arg}: {e}"),
                    }
                    continue;
                }
                "read" if arg.is_empty() => {
                    println!("usage: /read FILE (sends the file's text as your message)");
                    continue;
                }
                "read" => match crate::fsutil::read_regular(&user_path(arg)) {
                    Ok(b) => match String::from_utf8(b) {
                        Ok(s) => {
                            println!("[read {arg}: {} bytes]", s.len());
                            s
                        }
                        Err(_) => {
                            println!("error: /read {arg}: not UTF-8 text");
                            continue;
                        }
                    },
                    Err(e) => {
                        println!("error: /read {arg}: {e}");
                        continue;
                    }
                },
                other => {
                    println!("unknown command /{other} (try /help)");
                    continue;
                }
            }
        } else {
            line.clone()
        };
        super::signals::clear();
        let mut sink = ChatSink {
            color,
            in_reasoning: false,
        };
        let r = talk.turn(&user, &mut sink, stop);
        if sink.in_reasoning && color {
            print!("\x1b[0m");
        }
        println!();
        match r {
            Ok((_, s)) => {
                eprintln!("{}", stats_line(&s, talk.context_tokens()));
                last = Some(s);
            }
            Err(e) if e.is::<super::signals::Interrupted>() => eprintln!("[interrupted]"),
            Err(e) => eprintln!("error: {e}"),
        }
        // Ctrl+C stops an answer; SIGTERM and SIGHUP end the chat.
        match super::signals::received() {
            Some(sig) if sig != libc::SIGINT => {
                exit_code = super::signals::exit_code(sig);
                break;
            }
            _ => super::signals::clear(),
        }
    }
    if let Some(h) = &hist {
        if let Some(parent) = h.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        let _ = ed.save_history(h);
    }
    Ok(exit_code)
}
