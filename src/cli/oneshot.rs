//! `dsflash -p TEXT` and `… | dsflash [-p TEXT]`: one question, one answer on stdout.
//!
//! Input rule: with stdin not a terminal, stdin is read whole (it must be UTF-8) and the user
//! message is the stdin text, a blank line, then the `-p` text (either alone if the other is
//! empty). Reasoning (thinking modes) goes to stderr, dimmed, and only when stderr is a
//! terminal; `--json` prints one object with both instead.

use super::TalkArgs;
use super::talk::{Conversation, Sink, Talk, TurnStats, use_color};
use std::io::{IsTerminal, Read, Write};

/// Read all of stdin as UTF-8; the error names the byte offset of the first invalid byte.
pub fn read_stdin() -> anyhow::Result<String> {
    let mut buf = Vec::new();
    std::io::stdin().read_to_end(&mut buf)?;
    utf8(buf, "stdin")
}

/// Read `-f FILE` as UTF-8; errors name the flag and file.
pub fn read_file(path: &std::path::Path) -> anyhow::Result<String> {
    let what = format!("-f {}", path.display());
    let buf = crate::fsutil::read_regular(path)
        .map_err(|e| anyhow::anyhow!("{what}: cannot read: {e}"))?;
    utf8(buf, &what)
}

/// Input text must be UTF-8: the error names the input and the offset of the first bad byte.
fn utf8(buf: Vec<u8>, what: &str) -> anyhow::Result<String> {
    String::from_utf8(buf).map_err(|e| {
        anyhow::anyhow!(
            "{what} is not valid UTF-8 (first invalid byte at offset {}); convert it first, e.g. with iconv",
            e.utf8_error().valid_up_to()
        )
    })
}

/// The user message from `-p` and stdin, per the rule above. None if both are empty.
pub fn join_input(stdin: Option<&str>, prompt: Option<&str>) -> Option<String> {
    let s = stdin.map(str::trim_end).filter(|s| !s.trim().is_empty());
    let p = prompt.filter(|p| !p.trim().is_empty());
    match (s, p) {
        (Some(s), Some(p)) => Some(format!("{s}\n\n{p}")),
        (Some(s), None) => Some(s.to_string()),
        (None, Some(p)) => Some(p.to_string()),
        (None, None) => None,
    }
}

struct OneShotSink {
    json: bool,
    reasoning_tty: bool,
    color: bool,
    started_reasoning: bool,
}

impl Sink for OneShotSink {
    fn reasoning(&mut self, text: &str) -> std::io::Result<()> {
        if self.json || !self.reasoning_tty {
            return Ok(());
        }
        let mut e = std::io::stderr().lock();
        if self.color && !self.started_reasoning {
            write!(e, "\x1b[2m")?;
        }
        self.started_reasoning = true;
        write!(e, "{text}")?;
        e.flush()
    }
    fn answer(&mut self, text: &str) -> std::io::Result<()> {
        if self.started_reasoning && self.reasoning_tty {
            let mut e = std::io::stderr().lock();
            if self.color {
                write!(e, "\x1b[0m")?;
            }
            writeln!(e)?;
            self.started_reasoning = false;
        }
        if self.json {
            return Ok(());
        }
        let mut o = std::io::stdout().lock();
        write!(o, "{text}")?;
        o.flush()?;
        super::signals::line_open(!text.ends_with('\n'));
        Ok(())
    }
}

#[derive(serde::Serialize)]
struct JsonOut<'a> {
    answer: &'a str,
    reasoning: Option<&'a str>,
    mode: &'a str,
    /// The sampler's seed: `--seed` with it reproduces the answer.
    seed: u64,
    #[serde(flatten)]
    stats: &'a TurnStats,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: f64,
    /// Under `--ram`: selections served from RAM and read from the files.
    #[serde(skip_serializing_if = "Option::is_none")]
    ram_tier: Option<crate::backend::ram_tier::RamStats>,
}

/// Returns the process exit code.
pub fn run(a: &TalkArgs, stdin: Option<String>, verbose: bool) -> anyhow::Result<i32> {
    let Some(user) = join_input(stdin.as_deref(), a.prompt.as_deref()) else {
        eprintln!("error: empty input: give a prompt with -p TEXT or on stdin");
        return Ok(2);
    };
    let stop = super::signals::stop_flag();
    let mode = a.mode();
    let err_tty = std::io::stderr().is_terminal();
    let mut sink = OneShotSink {
        json: a.json,
        reasoning_tty: err_tty,
        color: use_color(err_tty),
        started_reasoning: false,
    };
    let engine;
    let tok;
    let mut ram_tier = None;
    let (msg, stats, seed) = match &a.endpoint {
        // Another server answers: no model, no tokenizer here.
        Some(url) => {
            let mut remote = super::endpoint::Remote::new(a, url)?;
            // Nothing to keep while waiting on the server: a signal exits at once (the line
            // ended).
            let _at_once = super::signals::AtOnce::new();
            let (m, st) = remote.turn(&user, &mut sink, stop)?;
            (m, st, remote.seed())
        }
        None => {
            let loaded = super::talk::load(&a.engine, a.tokenizer.as_deref())?;
            (engine, tok) = (loaded.1, loaded.2);
            let mut talk = Talk::new(&engine, &tok, a)?;
            talk.exit_in_prefill = true;
            talk.cache = a.cache.open(verbose);
            // The input before the question: the next run over the same input asks
            // something else.
            if a.prompt.as_deref().is_some_and(|p| !p.trim().is_empty()) {
                talk.shared_prefix = stdin
                    .as_deref()
                    .map(str::trim_end)
                    .filter(|s| !s.trim().is_empty())
                    .map(str::to_string);
            }
            let (m, st) = talk.turn(&user, &mut sink, stop)?;
            a.engine.finish(&engine)?;
            ram_tier = engine.ram_tier().map(|r| r.stats());
            (m, st, talk.sampler.config().seed)
        }
    };
    if sink.started_reasoning {
        // The reasoning streamed to the terminal: close it so what follows has its own line.
        if sink.color {
            eprint!("\x1b[0m");
        }
        eprintln!();
    }
    let mut out = std::io::stdout().lock();
    if a.json {
        let j = JsonOut {
            answer: &msg.content,
            reasoning: msg.reasoning_content.as_deref(),
            mode: match mode {
                crate::model::chat_format::Mode::Chat => "no-think",
                crate::model::chat_format::Mode::Think => "think",
                crate::model::chat_format::Mode::ThinkMax => "think-max",
            },
            seed,
            stats: &stats,
            prefill_tokens_per_s: stats.prefill_tps(),
            decode_tokens_per_s: stats.decode_tps(),
            ram_tier,
        };
        serde_json::to_writer(&mut out, &j)?;
    }
    writeln!(out)?;
    out.flush()?;
    super::signals::line_open(false);
    // Why the answer stopped, when it was cut short (always: an empty or cut answer must not
    // look like a complete one).
    if let Some(why) = stop_note(&stats, a.max_tokens, msg.content.is_empty()) {
        eprintln!("dsflash: {why}");
    }
    if err_tty || verbose {
        eprintln!(
            "[{} prompt tokens ({} prefilled, {} from the prompt cache) at {:.1} tok/s, {} generated at {:.1} tok/s, stop: {}, seed {}]",
            stats.prompt_tokens,
            stats.prefilled_tokens,
            stats.cached_tokens,
            stats.prefill_tps(),
            stats.generated_tokens,
            stats.decode_tps(),
            stats.stop,
            seed
        );
    }
    Ok(super::signals::received().map_or(0, super::signals::exit_code))
}

/// A one-line note for an answer that did not end by itself.
fn stop_note(stats: &TurnStats, max_tokens: usize, no_answer: bool) -> Option<String> {
    let inside = if no_answer && stats.generated_tokens > 0 {
        " inside the reasoning, before any answer"
    } else {
        ""
    };
    match stats.stop {
        "length" => Some(format!(
            "stopped at --max-tokens {max_tokens}{inside} (raise it for a complete answer)"
        )),
        "context" => Some(format!(
            "stopped: the context is full{inside} (use a larger --ctx)"
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_join_rule() {
        assert_eq!(
            join_input(Some("report\n"), Some("Summarise")).as_deref(),
            Some("report\n\nSummarise")
        );
        assert_eq!(
            join_input(Some("only stdin\n\n"), None).as_deref(),
            Some("only stdin")
        );
        assert_eq!(join_input(Some("  \n"), Some("q")).as_deref(), Some("q"));
        assert_eq!(join_input(None, Some("   ")), None);
        assert_eq!(join_input(None, None), None);
    }
}
