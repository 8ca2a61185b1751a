//! A conversation with the model: messages rendered with the chat format, the KV state kept
//! across turns (only what changed is prefilled), generation streamed as reasoning and answer
//! pieces. Shared by the one-shot mode and the interactive chat.

use super::TalkArgs;
use crate::engine::sampler::Sampler;
use crate::engine::session::plan_steps;
use crate::engine::snapshot::Steps;
use crate::engine::{Engine, Mark, Session, SessionError, Want};
use crate::model::chat_format::{ChatFormat, DSV4, Message, Mode, Role, render};
use crate::model::tokenizer::{StreamDecoder, Tokenizer};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// The context the model card advises for "Think Max" (384K tokens).
const THINK_MAX_CTX: usize = 384 * 1024;

/// Rewind points kept (each costs the window rings, ~11 MB on the real model).
const MAX_MARKS: usize = 4;

/// What one assistant turn produced.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TurnStats {
    /// Tokens of the whole rendered prompt for this turn.
    pub prompt_tokens: usize,
    /// Of those, tokens actually prefilled (the rest was reused from the KV state).
    pub prefilled_tokens: usize,
    /// Of the reused ones, tokens restored from the prompt cache on disk.
    pub cached_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// "eos", "length", "interrupted".
    pub stop: &'static str,
}

impl TurnStats {
    pub fn prefill_tps(&self) -> f64 {
        self.prefilled_tokens as f64 / self.prefill_seconds.max(1e-9)
    }
    pub fn decode_tps(&self) -> f64 {
        self.generated_tokens as f64 / self.decode_seconds.max(1e-9)
    }
}

/// What `Talk::complete` generated.
pub struct Completion {
    pub reasoning: String,
    pub answer: String,
    pub stats: TurnStats,
}

/// Where generated text goes as it arrives.
pub trait Sink {
    fn reasoning(&mut self, text: &str) -> std::io::Result<()>;
    fn answer(&mut self, text: &str) -> std::io::Result<()>;
}

/// A conversation as the chat drives it: the local model (`Talk`) or a server
/// (`endpoint::Remote`).
pub trait Conversation {
    fn messages(&self) -> &[Message];
    fn messages_mut(&mut self) -> &mut Vec<Message>;
    fn mode(&self) -> Mode;
    fn set_mode(&mut self, mode: Mode);
    /// One assistant turn after the messages so far, streamed into `sink`; `stop` ends it
    /// early (the partial answer is returned).
    fn respond(
        &mut self,
        sink: &mut dyn Sink,
        stop: &AtomicBool,
    ) -> anyhow::Result<(Message, TurnStats)>;
    /// Forget the conversation (keeps the system prompt if `keep_system`).
    fn clear(&mut self, keep_system: bool);
    /// Tokens the model holds for the conversation.
    fn context_tokens(&self) -> usize;
    /// Keep the conversation's state under `key` (see `Talk::keep`); false if not kept.
    fn keep(&self, _key: &[u8]) -> bool {
        false
    }
    /// Restore the state kept under `key`; its token count.
    fn resume(&mut self, _key: &[u8]) -> Option<usize> {
        None
    }

    /// Add a user message, respond, and keep both in the conversation. On error the user
    /// message is taken back, so the conversation is as before.
    fn turn(
        &mut self,
        user: &str,
        sink: &mut dyn Sink,
        stop: &AtomicBool,
    ) -> anyhow::Result<(Message, TurnStats)> {
        self.messages_mut().push(Message::new(Role::User, user));
        match self.respond(sink, stop) {
            Ok((m, s)) => {
                self.messages_mut().push(m.clone());
                Ok((m, s))
            }
            Err(e) => {
                self.messages_mut().pop();
                Err(e)
            }
        }
    }

    /// Set or replace the system prompt.
    fn set_system(&mut self, text: &str) {
        let m = self.messages_mut();
        m.retain(|m| m.role != Role::System);
        if !text.is_empty() {
            m.insert(0, Message::new(Role::System, text));
        }
    }
}

impl Conversation for Talk<'_> {
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
        Talk::respond(self, sink, stop)
    }
    fn clear(&mut self, keep_system: bool) {
        Talk::clear(self, keep_system)
    }
    fn context_tokens(&self) -> usize {
        self.session.len()
    }
    fn keep(&self, key: &[u8]) -> bool {
        Talk::keep(self, key)
    }
    fn resume(&mut self, key: &[u8]) -> Option<usize> {
        Talk::resume(self, key)
    }
}

/// Resolve `--model`, then open the tokenizer (`--tokenizer`, else the model directory's
/// `tokenizer.json`) and the engine.
pub fn load(
    a: &super::run::EngineArgs,
    tokenizer: Option<&std::path::Path>,
) -> anyhow::Result<(PathBuf, Engine, Tokenizer)> {
    let dir = crate::hub::resolve_model(&a.model)?;
    let tok_path = tokenizer
        .map(|p| p.to_path_buf())
        .unwrap_or_else(|| dir.join("tokenizer.json"));
    if tokenizer.is_none() && !tok_path.exists() {
        anyhow::bail!(
            "{}: missing (this checkpoint has no tokenizer.json); give one with --tokenizer FILE (the release's: dsflash download, or scripts/fetch_tokenizer.sh prints its path)",
            tok_path.display()
        );
    }
    let tok = Tokenizer::from_file(&tok_path)?;
    let engine = a.open_dir(&dir)?;
    Ok((dir, engine, tok))
}

pub struct Talk<'e> {
    pub engine: &'e Engine,
    pub tok: &'e Tokenizer,
    pub fmt: &'static ChatFormat,
    pub session: Session<'e>,
    pub messages: Vec<Message>,
    pub mode: Mode,
    pub sampler: Sampler,
    pub max_tokens: usize,
    /// `--stop` strings: the answer ends where one appears.
    pub stop: Vec<String>,
    /// A signal during a prefill exits at once (one-shot: nothing to keep).
    pub exit_in_prefill: bool,
    /// The prompt cache on disk (None: `--no-cache`).
    pub cache: Option<crate::prefix_cache::PrefixCache>,
    /// The start of the last user message that later prompts are likely to share (one-shot:
    /// the stdin text before the question): the state is also kept where it ends.
    pub shared_prefix: Option<String>,
    marks: Vec<Mark>,
}

impl<'e> Talk<'e> {
    /// A conversation per the talk flags (mode, sampling, context, system prompt).
    pub fn new(engine: &'e Engine, tok: &'e Tokenizer, a: &TalkArgs) -> anyhow::Result<Talk<'e>> {
        let ctx = a.engine.ctx.unwrap_or(engine.cfg.max_position_embeddings);
        if a.mode() == Mode::ThinkMax && ctx < THINK_MAX_CTX {
            eprintln!(
                "dsflash: warning: --think-max with a {ctx}-token context; the model card advises at least {THINK_MAX_CTX} (--ctx)"
            );
        }
        let mut talk = Talk::open(engine, tok, a.engine.session(engine)?)?;
        talk.mode = a.mode();
        talk.sampler = Sampler::new(a.sampling.config()?);
        talk.max_tokens = a.max_tokens;
        talk.stop = a.stop.iter().filter(|s| !s.is_empty()).cloned().collect();
        if let Some(s) = &a.system {
            Conversation::set_system(&mut talk, s);
        }
        Ok(talk)
    }

    /// An empty conversation on `session` (thinking mode, the model card's sampling, 8192
    /// tokens per answer); the tokenizer must fit the model.
    pub fn open(
        engine: &'e Engine,
        tok: &'e Tokenizer,
        session: Session<'e>,
    ) -> anyhow::Result<Talk<'e>> {
        if tok.vocab_size() > engine.cfg.vocab_size {
            anyhow::bail!(
                "tokenizer has {} ids but the model's vocab_size is {}: they do not belong together",
                tok.vocab_size(),
                engine.cfg.vocab_size
            );
        }
        Ok(Talk {
            engine,
            tok,
            fmt: &DSV4,
            session,
            messages: Vec::new(),
            mode: Mode::Think,
            sampler: Sampler::new(Default::default()),
            max_tokens: 8192,
            stop: Vec::new(),
            exit_in_prefill: false,
            cache: None,
            shared_prefix: None,
            marks: Vec::new(),
        })
    }

    /// Forget the conversation (keeps the system prompt if `keep_system`).
    pub fn clear(&mut self, keep_system: bool) {
        self.messages
            .retain(|m| keep_system && m.role == Role::System);
        self.session.reset();
        self.marks.clear();
    }

    /// Bring the session to `ids`: keep the longest reusable prefix (the KV state, the
    /// latest mark inside the common prefix, or a longer state from the prompt cache),
    /// prefill the rest except the last token, mark, then prefill the last token and return
    /// its logits.
    ///
    /// The prefill's steps are a function of the prompt alone (`plan_steps`: every chunk,
    /// and a cut at `shared`, the end of the part later prompts are likely to repeat), with
    /// the cache or without: a state restored from the cache is then what this prefill would
    /// have computed, bit for bit. The state is kept at `shared` and before the last token.
    fn sync(
        &mut self,
        ids: &[u32],
        shared: Option<usize>,
        stop: &AtomicBool,
        stats: &mut TurnStats,
    ) -> Result<Vec<f32>, SessionError> {
        let common = self
            .session
            .tokens()
            .iter()
            .zip(ids)
            .take_while(|(a, b)| a == b)
            .count();
        // Reusable: the common prefix, but always leave the last token to prefill (it
        // yields the next logits).
        let end = ids.len() - 1;
        let keep = common.min(end);
        if keep < self.session.len() {
            // Drop marks past that point; rewind to the latest one left.
            self.marks.retain(|m| m.len() <= keep);
            match self.marks.last().cloned() {
                Some(m) => {
                    self.session.rewind(&m);
                }
                None => self.session.reset(),
            }
        }
        let cuts: Vec<usize> = shared.into_iter().collect();
        let mut plan = plan_steps(end, self.session.chunk(), &cuts);
        plan.push(end);
        if let Some(c) = &self.cache
            && self.session.len() < end
            && let Some(n) = c.restore_longest(&mut self.session, ids, &plan)
        {
            self.marks.clear();
            stats.cached_tokens = n;
        }
        let _at_once = self.exit_in_prefill.then(super::signals::AtOnce::new);
        let t = Instant::now();
        let start = self.session.len();
        stats.prefilled_tokens = ids.len() - start;
        // On the plan (from position 0, or restored at a point of it): its states are worth
        // keeping. A conversation's live state took other steps: nothing to keep.
        let on_plan = plan
            .iter()
            .position(|&p| p == start)
            .is_some_and(|i| self.session.steps() == &Steps::of(&plan[..i]));
        let keep_at = |p: usize| on_plan && (p == end || Some(p) == shared);
        if start < end {
            let bar = super::run::prefill_bar(end - start);
            let mut r = Ok(());
            for &p in plan.iter().filter(|&&p| p > start) {
                let at = self.session.len();
                r = self
                    .session
                    .prefill_with_progress(&ids[at..p], Want::None, |done| {
                        bar.set_position((at - start + done) as u64);
                        !stop.load(Ordering::Relaxed)
                    })
                    .map(|_| ());
                if r.is_ok() && stop.load(Ordering::Relaxed) {
                    r = Err(SessionError::Interrupted);
                }
                if r.is_err() {
                    break;
                }
                if let Some(c) = &self.cache
                    && keep_at(p)
                {
                    c.store(&self.session);
                }
            }
            bar.finish_and_clear();
            r?;
        }
        self.marks.push(self.session.mark());
        if self.marks.len() > MAX_MARKS {
            self.marks.remove(0);
        }
        let logits = self.session.prefill(&ids[end..], Want::Last)?;
        stats.prefill_seconds = t.elapsed().as_secs_f64();
        Ok(logits)
    }

    /// Tokens of `ids` that a prompt with only `shared_prefix` as its last user message
    /// shares with it: where the part later prompts are likely to repeat ends.
    fn shared_len(&self, ids: &[u32]) -> anyhow::Result<Option<usize>> {
        let Some(prefix) = &self.shared_prefix else {
            return Ok(None);
        };
        let mut m = self.messages.clone();
        match m.last_mut() {
            Some(last) if last.role == Role::User => last.content = prefix.clone(),
            _ => return Ok(None),
        }
        let other = self.tok.encode(&render(self.fmt, &m, self.mode)?)?;
        Ok(Some(
            other.iter().zip(ids).take_while(|(a, b)| a == b).count(),
        ))
    }

    /// Keep the conversation's exact state in the prompt cache under `key` (the saved
    /// messages' bytes), so `resume` with the same bytes needs no prefill.
    pub fn keep(&self, key: &[u8]) -> bool {
        self.cache
            .as_ref()
            .is_some_and(|c| c.store_as_run(&self.session, key))
    }

    /// Restore the state `keep` kept under `key`; returns its token count.
    pub fn resume(&mut self, key: &[u8]) -> Option<usize> {
        let n = self
            .cache
            .as_ref()?
            .restore_as_run(&mut self.session, key)?;
        self.marks.clear();
        Some(n)
    }

    /// One assistant turn after the messages so far (the last one normally a user message,
    /// or the start of the answer as a `prefix` assistant message). Streams into `sink`;
    /// `stop` interrupts generation (the partial answer is kept).
    pub fn respond(
        &mut self,
        sink: &mut dyn Sink,
        stop: &AtomicBool,
    ) -> anyhow::Result<(Message, TurnStats)> {
        let text = render(self.fmt, &self.messages, self.mode)?;
        let ids = self.tok.encode(&text)?;
        // After a prefix the reasoning is closed: the model continues the answer.
        let continues = self.messages.last().is_some_and(|m| m.prefix);
        let reasoning_first = self.mode.thinking() && !continues;
        let c = self.complete(&ids, reasoning_first, sink, stop)?;
        let mut msg = Message::new(Role::Assistant, c.answer);
        if self.mode.thinking() {
            msg.reasoning_content = Some(c.reasoning);
        }
        Ok((msg, c.stats))
    }

    /// Generate after the prompt `ids`: reasoning first (up to the end-of-thinking token) if
    /// `reasoning_first`, then the answer, until the end-of-sentence token, a stop string,
    /// `max_tokens` or `stop`. Streams into `sink`; an error from the sink ends it.
    pub fn complete(
        &mut self,
        ids: &[u32],
        reasoning_first: bool,
        sink: &mut dyn Sink,
        stop: &AtomicBool,
    ) -> anyhow::Result<Completion> {
        let mut stats = TurnStats {
            prompt_tokens: ids.len(),
            ..Default::default()
        };
        let shared = self.shared_len(ids)?;
        let mut logits = self.sync(ids, shared, stop, &mut stats).map_err(|e| match e {
            SessionError::ContextFull { needed, ctx, .. } => anyhow::anyhow!(
                "the conversation needs {needed} tokens but --ctx is {ctx} (use a larger --ctx or /clear)"
            ),
            SessionError::Interrupted => super::signals::Interrupted(
                super::signals::received().unwrap_or(libc::SIGINT),
            )
            .into(),
            e => e.into(),
        })?;
        let mut reasoning = String::new();
        let mut answer = String::new();
        let mut stops = StopStrings::new(&self.stop);
        // Route a decoded piece to the reasoning or the answer (and the sink); true when the
        // answer reached a stop string.
        let mut emit = |in_reasoning: bool, p: String| -> std::io::Result<bool> {
            if in_reasoning {
                sink.reasoning(&p)?;
                reasoning.push_str(&p);
                return Ok(false);
            }
            let (out, hit) = stops.push(&p);
            if !out.is_empty() {
                sink.answer(&out)?;
                answer.push_str(&out);
            }
            Ok(hit)
        };
        let mut in_reasoning = reasoning_first;
        let mut dec = StreamDecoder::new();
        let t = Instant::now();
        stats.stop = "length";
        for i in 0..self.max_tokens {
            if stop.load(Ordering::Relaxed) {
                stats.stop = "interrupted";
                break;
            }
            let id = self.sampler.sample_after(&logits, self.session.tokens());
            stats.generated_tokens += 1;
            if id == self.fmt.eos_id {
                stats.stop = "eos";
                break;
            }
            if in_reasoning && id == self.fmt.think_close_id {
                if let Some(p) = dec.flush(self.tok) {
                    emit(true, p)?;
                }
                in_reasoning = false;
            } else if let Some(p) = dec.push(self.tok, id)
                && emit(in_reasoning, p)?
            {
                stats.stop = "stop";
                break;
            }
            if i + 1 == self.max_tokens {
                break;
            }
            match self.session.decode_step(id) {
                Ok(l) => logits = l,
                Err(SessionError::ContextFull { .. }) => {
                    stats.stop = "context";
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if stats.stop != "stop" {
            if let Some(p) = dec.flush(self.tok)
                && emit(in_reasoning, p)?
            {
                stats.stop = "stop";
            }
            // What was held back as a possible start of a stop string, and was not.
            if stats.stop != "stop" {
                let rest = stops.finish();
                if !rest.is_empty() {
                    sink.answer(&rest)?;
                    answer.push_str(&rest);
                }
            }
        }
        stats.decode_seconds = t.elapsed().as_secs_f64();
        Ok(Completion {
            reasoning,
            answer,
            stats,
        })
    }
}

/// Stop strings over a stream of text: what may be output now, holding back a tail that
/// could still become a stop string.
struct StopStrings<'a> {
    stops: &'a [String],
    held: String,
}

impl<'a> StopStrings<'a> {
    fn new(stops: &'a [String]) -> StopStrings<'a> {
        StopStrings {
            stops,
            held: String::new(),
        }
    }

    /// Add `piece`; returns the text that is safe to output and whether a stop string was
    /// reached (then the text before it is the last output).
    fn push(&mut self, piece: &str) -> (String, bool) {
        self.held.push_str(piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // Keep the longest tail that is a proper prefix of some stop string.
        let keep = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let out = self.held[..keep].to_string();
        self.held.drain(..keep);
        (out, false)
    }

    /// The held-back tail at the end of the answer.
    fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// ANSI dim for reasoning text, only on a terminal and without NO_COLOR.
pub fn use_color(is_tty: bool) -> bool {
    is_tty && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::StopStrings;

    /// Feed `pieces`; returns everything output and whether a stop string was hit.
    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut s = StopStrings::new(&stops);
        let mut out = String::new();
        for p in pieces {
            let (o, hit) = s.push(p);
            out.push_str(&o);
            if hit {
                return (out, true);
            }
        }
        out.push_str(&s.finish());
        (out, false)
    }

    #[test]
    fn stop_strings_across_pieces() {
        assert_eq!(
            run(&["END"], &["abc E", "N", "D more"]),
            ("abc ".into(), true)
        );
        assert_eq!(run(&["END"], &["abc E", "NX"]), ("abc ENX".into(), false));
        assert_eq!(
            run(&["\n\n", "##"], &["a\n", "b#", "#c"]),
            ("a\nb".into(), true)
        );
        assert_eq!(run(&[], &["x", "y"]), ("xy".into(), false));
        // Non-ASCII text is cut on character boundaries.
        assert_eq!(run(&["é!"], &["caf", "é", "!"]), ("caf".into(), true));
        assert_eq!(run(&["éa"], &["café", "b"]), ("caféb".into(), false));
    }
}
