//! A conversation's decode state and the API the front ends use: prefill in chunks, decode
//! one token, reset, truncate.

use super::attention::{AttnMark, AttnState};
use super::model::{Engine, Want};
use super::snapshot::{self, Header, Loaded, SnapshotError, Steps};

/// Why a session refused work.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SessionError {
    #[error("the prompt needs {needed} tokens of context but --ctx is {ctx} ({used} already used)")]
    ContextFull {
        needed: usize,
        used: usize,
        ctx: usize,
    },
    #[error("token id {id} is out of range (vocab size {vocab})")]
    BadToken { id: u32, vocab: usize },
    #[error("nothing to prefill: empty token list")]
    Empty,
    #[error("interrupted")]
    Interrupted,
    /// A logit that is NaN or infinite: the weights (or their scales) hold non-finite values.
    #[error(
        "the model produced non-finite logits at position {position}: the checkpoint holds NaN or infinite values where the load does not look (the head, the embedding, the routed experts, FP8 codes)"
    )]
    NonFinite { position: usize },
}

/// A point a session can be rewound to (see `Session::mark`).
#[derive(Debug, Clone)]
pub struct Mark {
    tokens: usize,
    layers: Vec<AttnMark>,
    steps: Steps,
}

impl Mark {
    /// Tokens the session held at the mark.
    pub fn len(&self) -> usize {
        self.tokens
    }

    pub fn is_empty(&self) -> bool {
        self.tokens == 0
    }
}

pub struct Session<'e> {
    engine: &'e Engine,
    state: Vec<AttnState>,
    tokens: Vec<u32>,
    max_ctx: usize,
    chunk: usize,
    /// Where the steps that computed the state started (see `Steps`).
    steps: Steps,
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        self.forget_device_copies();
    }
}

impl<'e> Session<'e> {
    /// `max_ctx`: the most tokens this session may hold; `chunk`: prefill chunk size.
    pub fn new(engine: &'e Engine, max_ctx: usize, chunk: usize) -> Session<'e> {
        Session {
            engine,
            state: engine.new_state(max_ctx),
            tokens: Vec::new(),
            max_ctx,
            chunk: chunk.max(1),
            steps: Steps::default(),
        }
    }

    /// `Engine::identity` of the engine this session runs on.
    pub fn engine_identity(&self) -> String {
        self.engine.identity()
    }

    /// Benchmarks only (`dsflash bench`'s prefill at long contexts): an empty session stands
    /// for `n` tokens of context (a multiple of every compression ratio) without computing
    /// them: the window ring and the compressors hold rows of random values, as many as those
    /// tokens would have left, so a following step does the work it would do there.
    pub fn fill_context_for_bench(&mut self, n: usize, seed: u64) {
        assert!(
            self.tokens.is_empty() && n <= self.max_ctx,
            "an empty session with room"
        );
        let mut rng = crate::model::synth::SplitMix64::new(seed);
        let mut next = || rng.uniform() - 0.5;
        for st in &mut self.state {
            let win = st.window.size();
            let row: Vec<f32> = (0..self.engine.cfg.head_dim).map(|_| next()).collect();
            for p in n.saturating_sub(win)..n {
                st.window.put(p, &row);
            }
            st.ring_synced = None;
            for c in [st.comp.as_mut(), st.index.as_mut()].into_iter().flatten() {
                assert!(n.is_multiple_of(c.ratio()), "n a multiple of the ratios");
                c.fill_for_bench(n, &mut next);
            }
        }
        self.tokens.resize(n, 0);
        if n > 0 {
            self.steps.push(0);
        }
    }

    /// Prefill chunk size.
    pub fn chunk(&self) -> usize {
        self.chunk
    }

    /// The steps that computed the state.
    pub fn steps(&self) -> &Steps {
        &self.steps
    }

    /// Write the state (see `snapshot`).
    pub fn save(&self, w: &mut dyn std::io::Write) -> std::io::Result<()> {
        let h = Header {
            format: snapshot::FORMAT,
            identity: self.engine.identity(),
            steps: self.steps.hex(),
            n_steps: self.steps.len(),
            tokens: self.tokens.len(),
        };
        snapshot::write(w, &h, &self.tokens, &self.state)
    }

    /// Read a state `save` wrote, computed in `steps` (None: whatever steps), checked against
    /// this session's engine and context (see `snapshot::read`); `install` puts it in.
    pub fn read_state(
        &self,
        r: &mut dyn std::io::Read,
        steps: Option<&Steps>,
    ) -> Result<Loaded, SnapshotError> {
        snapshot::read(r, self.engine, self.max_ctx, steps)
    }

    /// Replace the state with one read by `read_state`.
    pub fn install(&mut self, l: Loaded) {
        self.forget_device_copies();
        self.steps = l.steps;
        self.state = l.state;
        self.tokens = l.tokens;
    }

    /// Tokens processed so far (the next position).
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    fn check(&self, tokens: &[u32]) -> Result<(), SessionError> {
        if tokens.is_empty() {
            return Err(SessionError::Empty);
        }
        let vocab = self.engine.cfg.vocab_size;
        if let Some(&id) = tokens.iter().find(|&&id| id as usize >= vocab) {
            return Err(SessionError::BadToken { id, vocab });
        }
        if self.tokens.len() + tokens.len() > self.max_ctx {
            return Err(SessionError::ContextFull {
                needed: self.tokens.len() + tokens.len(),
                used: self.tokens.len(),
                ctx: self.max_ctx,
            });
        }
        Ok(())
    }

    /// Feed `tokens` in chunks. Returns logits for the wanted positions ([n, vocab]).
    /// Checks the context cap and token ids before any compute.
    pub fn prefill(&mut self, tokens: &[u32], want: Want) -> Result<Vec<f32>, SessionError> {
        self.prefill_with_progress(tokens, want, |_| true)
    }

    /// `prefill`, calling `progress(done)` after each chunk; `progress` returning false stops
    /// at that chunk boundary with `Interrupted` (the tokens fed so far stay in the session).
    pub fn prefill_with_progress(
        &mut self,
        tokens: &[u32],
        want: Want,
        mut progress: impl FnMut(usize) -> bool,
    ) -> Result<Vec<f32>, SessionError> {
        self.check(tokens)?;
        let mut out = Vec::new();
        let n_chunks = tokens.len().div_ceil(self.chunk);
        for (ci, c) in tokens.chunks(self.chunk).enumerate() {
            let last = ci + 1 == n_chunks;
            let w = match want {
                Want::All => Want::All,
                Want::Last if last => Want::Last,
                _ => Want::None,
            };
            let t0 = self.tokens.len();
            self.steps.push(t0);
            let logits = self.engine.forward(&mut self.state, c, t0, w);
            let vocab = self.engine.cfg.vocab_size;
            if let Some(i) = logits.iter().position(|v| !v.is_finite()) {
                // Row i / vocab of the returned rows: all of the chunk's, or its last.
                let row = i / vocab.max(1);
                let position = match w {
                    Want::All => t0 + row,
                    _ => t0 + c.len() - 1,
                };
                // The state now holds the same values: start over rather than go on from it.
                self.reset();
                return Err(SessionError::NonFinite { position });
            }
            out.extend_from_slice(&logits);
            self.tokens.extend_from_slice(c);
            let done = ((ci + 1) * self.chunk).min(tokens.len());
            if !progress(done) && !last {
                return Err(SessionError::Interrupted);
            }
        }
        Ok(out)
    }

    /// Feed one token; returns the logits for the next one.
    pub fn decode_step(&mut self, token: u32) -> Result<Vec<f32>, SessionError> {
        self.prefill(&[token], Want::Last)
    }

    /// Forget everything.
    pub fn reset(&mut self) {
        self.forget_device_copies();
        self.state = self.engine.new_state(self.max_ctx);
        self.tokens.clear();
        self.steps = Steps::default();
    }

    /// A rewind point at the current position. Cheap: copies the window rings and the
    /// compressors' carry-over, not the context.
    pub fn mark(&self) -> Mark {
        Mark {
            tokens: self.tokens.len(),
            layers: self.state.iter().map(|s| s.mark()).collect(),
            steps: self.steps.clone(),
        }
    }

    /// Go back to `m`, which must have been taken on this session at or before its current
    /// position (a mark from a rewound-past position is refused and nothing changes).
    pub fn rewind(&mut self, m: &Mark) -> bool {
        if m.tokens > self.tokens.len() || m.layers.len() != self.state.len() {
            return false;
        }
        for (s, lm) in self.state.iter_mut().zip(&m.layers) {
            s.restore(lm);
        }
        self.tokens.truncate(m.tokens);
        self.steps = m.steps.clone();
        true
    }

    /// Keep only the first `n` tokens (e.g. to edit a conversation) without a mark: the
    /// compressed state is rebuilt by prefilling the kept prefix again.
    pub fn truncate(&mut self, n: usize) {
        if n >= self.tokens.len() {
            return;
        }
        let keep: Vec<u32> = self.tokens[..n].to_vec();
        self.reset();
        if !keep.is_empty() {
            // Same ids and length as before: cannot fail the checks.
            let _ = self.prefill(&keep, Want::None);
        }
    }

    /// The device's copies of this session's compressed rows are no longer needed.
    fn forget_device_copies(&self) {
        let ids = self.state.iter().flat_map(|s| s.store_ids());
        self.engine.exec.tables.forget(&self.engine.exec, ids);
    }

    /// Bytes held by the decode state (window rings, compressor carry-over, compressed rows).
    pub fn state_bytes(&self) -> usize {
        self.state.iter().map(|s| s.allocated_bytes()).sum()
    }
}

/// Where the steps of a prefill of `len` tokens from position 0 start: every `chunk` tokens,
/// and also at each of `cuts` (then every `chunk` tokens from there).
pub fn plan_steps(len: usize, chunk: usize, cuts: &[usize]) -> Vec<usize> {
    let chunk = chunk.max(1);
    let mut cuts: Vec<usize> = cuts.iter().copied().filter(|&c| c > 0 && c < len).collect();
    cuts.sort_unstable();
    let mut out = Vec::new();
    let mut at = 0;
    for end in cuts.into_iter().chain([len]) {
        while at < end {
            out.push(at);
            at = (at + chunk).min(end);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Numerics;

    /// A session that stands for n tokens holds, layer by layer, as many compressed rows as a
    /// session that computed n tokens, and the same window positions.
    #[test]
    fn a_filled_context_has_the_rows_of_a_computed_one() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny");
        let e = Engine::open(&dir, Numerics::Reference).unwrap();
        let vocab = e.cfg.vocab_size as u32;
        for n in [128, 512] {
            let ids: Vec<u32> = (0..n as u32).map(|i| (i * 7919 + 13) % vocab).collect();
            let mut computed = Session::new(&e, 1024, 128);
            computed.prefill(&ids, Want::None).unwrap();
            let mut filled = Session::new(&e, 1024, 128);
            filled.fill_context_for_bench(n, 5);
            assert_eq!(filled.len(), computed.len());
            for (a, b) in filled.state.iter().zip(&computed.state) {
                let rows = |c: &Option<super::super::compressor::CompressorState>| {
                    c.as_ref().map(|c| c.rows.len())
                };
                assert_eq!(rows(&a.comp), rows(&b.comp), "n = {n}");
                assert_eq!(rows(&a.index), rows(&b.index), "n = {n}");
                let win = a.window.size();
                for p in n.saturating_sub(win)..n {
                    assert!(a.window.get(p).iter().any(|v| *v != 0.0), "window row {p}");
                }
            }
        }
    }
}
