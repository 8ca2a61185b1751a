//! The checkpoint's `tokenizer.json` (byte-level BPE, spec §7) through the `tokenizers`
//! crate, plus incremental detokenization that never splits a UTF-8 character.

use anyhow::Context;
use std::path::Path;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    pub fn from_file(path: &Path) -> anyhow::Result<Tokenizer> {
        let bytes = crate::fsutil::read_regular(path)
            .with_context(|| format!("tokenizer {}: cannot read", path.display()))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| {
            anyhow::anyhow!(
                "tokenizer {}: not a valid tokenizer.json: {e}",
                path.display()
            )
        })?;
        Ok(Tokenizer { inner })
    }

    /// Encode raw text. Nothing is added (no BOS: the chat format writes it as text); added
    /// tokens such as `<｜User｜>` are matched inside the text.
    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizer: cannot encode: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decode ids to text, keeping special tokens (the chat markers are part of the text).
    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, false).unwrap_or_default()
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Ids 0..vocab_size (added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Turns a stream of ids into text pieces, holding back bytes until they form complete
/// characters (byte-level BPE splits multi-byte characters across tokens).
#[derive(Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl StreamDecoder {
    pub fn new() -> StreamDecoder {
        StreamDecoder::default()
    }

    /// Add a token; returns the text that became complete, if any.
    pub fn push(&mut self, tk: &Tokenizer, id: u32) -> Option<String> {
        self.ids.push(id);
        let before = tk.decode(&self.ids[self.prefix..self.read]);
        let now = tk.decode(&self.ids[self.prefix..]);
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            let piece = now.get(before.len()..).map(str::to_string);
            if piece.is_some() {
                self.prefix = self.read;
                self.read = self.ids.len();
            }
            return piece;
        }
        None
    }

    /// Whatever is still held back (e.g. a truncated character at the end of generation),
    /// decoded lossily.
    pub fn flush(&mut self, tk: &Tokenizer) -> Option<String> {
        let before = tk.decode(&self.ids[self.prefix..self.read]);
        let now = tk.decode(&self.ids[self.prefix..]);
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        now.get(before.len()..)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    }
}
