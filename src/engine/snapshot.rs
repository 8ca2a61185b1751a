//! A session's decode state as bytes (spec §6.1): everything a continuation needs (the
//! tokens, each block's window ring, the compressors' carry-over and their rows), so a later
//! process can go on from it instead of prefilling again (the prefix cache on disk).
//!
//! File: the magic, a JSON header (format version, the engine's identity, the steps that
//! computed the state, the token count), the body, and a SHA-256 over header and body. Every count in
//! the body is checked against the shapes the engine expects before anything is allocated;
//! rows are stored as bf16 where every value of a store is exactly a bf16 (the reference
//! numerics' KV), else as f32, so a restore gives back the very bits that were saved.

use super::attention::AttnState;
use super::model::Engine;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};

const MAGIC: &[u8; 8] = b"DSFSTATE";
/// Bumped whenever the body's layout changes: older files are then foreign.
pub const FORMAT: u32 = 1;
/// A header is a few hundred bytes; more is not ours.
const MAX_HEADER: u32 = 64 << 10;

/// What a snapshot file says about itself (readable without the body).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Header {
    pub format: u32,
    /// `Engine::identity` of the engine that computed the state.
    pub identity: String,
    /// `Steps::hex` of the steps that computed it.
    pub steps: String,
    /// How many steps that was (for `cache list`).
    pub n_steps: usize,
    pub tokens: usize,
}

/// Where the forward steps that computed a state started (a hash chain over the positions).
/// Another split of the same tokens into steps may flip a rounding (a product over n tokens
/// and over one may sum in another order); the same tokens in the same steps on the same
/// engine give the same bits. So a state stands in for a prefill exactly when that prefill
/// would take the same steps up to it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Steps {
    chain: [u8; 32],
    n: usize,
}

impl Steps {
    /// One more step, starting at `pos`.
    pub fn push(&mut self, pos: usize) {
        let mut h = Sha256::new();
        h.update(self.chain);
        h.update((pos as u64).to_le_bytes());
        self.chain = h.finalize().into();
        self.n += 1;
    }

    /// The steps starting at each of `starts`, in order.
    pub fn of(starts: &[usize]) -> Steps {
        let mut s = Steps::default();
        starts.iter().for_each(|&p| s.push(p));
        s
    }

    pub fn hex(&self) -> String {
        self.chain.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
}

/// Why a snapshot was not used. Never fatal: the caller prefills instead.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot read: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a dsflash state file")]
    NotOurs,
    #[error("format {0}, this dsflash reads format {FORMAT}")]
    Format(u32),
    #[error("made by another model or setting ({0})")]
    Foreign(String),
    #[error("damaged: {0}")]
    Damaged(String),
    #[error("checksum mismatch")]
    Checksum,
}

pub(super) fn damaged(msg: impl Into<String>) -> SnapshotError {
    SnapshotError::Damaged(msg.into())
}

/// Writes little-endian values and hashes everything written.
pub(super) struct Enc<'w> {
    w: &'w mut dyn Write,
    hash: Sha256,
}

impl Enc<'_> {
    fn bytes(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.hash.update(b);
        self.w.write_all(b)
    }

    pub fn u8(&mut self, v: u8) -> std::io::Result<()> {
        self.bytes(&[v])
    }

    pub fn u64(&mut self, v: usize) -> std::io::Result<()> {
        self.bytes(&(v as u64).to_le_bytes())
    }

    /// Rows of `width` values, each group of columns (see `groups`) as bf16 where that
    /// loses nothing in every row, else as f32: the reference numerics' KV rows hold
    /// FP8-representable values in their first 448 dims and fp32 in the 64 RoPE dims.
    pub fn rows(&mut self, v: &[f32], width: usize) -> std::io::Result<()> {
        debug_assert!(width > 0 && v.len().is_multiple_of(width));
        let groups = groups(width);
        let exact = |x: f32| half::bf16::from_f32(x).to_f32().to_bits() == x.to_bits();
        let flags: Vec<u8> = groups
            .iter()
            .map(|g| {
                v.chunks(width)
                    .all(|r| r[g.clone()].iter().all(|&x| exact(x))) as u8
            })
            .collect();
        self.bytes(&flags)?;
        self.u64(v.len())?;
        let mut b = Vec::with_capacity(4 * width);
        for r in v.chunks(width) {
            b.clear();
            for (g, &bf16) in groups.iter().zip(&flags) {
                for &x in &r[g.clone()] {
                    match bf16 {
                        1 => b.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes()),
                        _ => b.extend_from_slice(&x.to_le_bytes()),
                    }
                }
            }
            self.bytes(&b)?;
        }
        Ok(())
    }
}

/// Column groups of a row for the bf16-or-f32 choice: 64 wide (the KV's FP8 blocks), or the
/// whole row where 64 does not divide it.
fn groups(width: usize) -> Vec<std::ops::Range<usize>> {
    let g = if width.is_multiple_of(64) { 64 } else { width };
    (0..width / g).map(|i| i * g..(i + 1) * g).collect()
}

/// Reads what `Enc` wrote, hashing it; counts are checked against what the caller expects.
pub(super) struct Dec<'r> {
    r: &'r mut dyn Read,
    hash: Sha256,
}

impl Dec<'_> {
    fn bytes(&mut self, b: &mut [u8]) -> Result<(), SnapshotError> {
        self.r.read_exact(b).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => damaged("truncated"),
            _ => SnapshotError::Io(e),
        })?;
        self.hash.update(&*b);
        Ok(())
    }

    pub fn u8(&mut self) -> Result<u8, SnapshotError> {
        let mut b = [0u8; 1];
        self.bytes(&mut b)?;
        Ok(b[0])
    }

    pub fn u64(&mut self) -> Result<usize, SnapshotError> {
        let mut b = [0u8; 8];
        self.bytes(&mut b)?;
        usize::try_from(u64::from_le_bytes(b)).map_err(|_| damaged("a count out of range"))
    }

    /// A count that must equal `want` (`what` names it in the error).
    pub fn count(&mut self, want: usize, what: &str) -> Result<(), SnapshotError> {
        let n = self.u64()?;
        if n != want {
            return Err(damaged(format!("{what}: {n} where {want} belong")));
        }
        Ok(())
    }

    /// Exactly `n` values in rows of `width` (as `Enc::rows` wrote them), all finite.
    pub fn rows(&mut self, n: usize, width: usize, what: &str) -> Result<Vec<f32>, SnapshotError> {
        let groups = groups(width);
        let mut flags = vec![0u8; groups.len()];
        self.bytes(&mut flags)?;
        if flags.iter().any(|&f| f > 1) {
            return Err(damaged(format!("{what}: unknown encoding")));
        }
        self.count(n, what)?;
        let row_bytes: usize = groups
            .iter()
            .zip(&flags)
            .map(|(g, &f)| g.len() * if f == 1 { 2 } else { 4 })
            .sum();
        let mut out = Vec::with_capacity(n);
        let mut b = vec![0u8; row_bytes];
        for _ in 0..n / width {
            self.bytes(&mut b)?;
            let mut at = 0;
            for (g, &f) in groups.iter().zip(&flags) {
                for _ in 0..g.len() {
                    out.push(if f == 1 {
                        half::bf16::from_le_bytes([b[at], b[at + 1]]).to_f32()
                    } else {
                        f32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
                    });
                    at += if f == 1 { 2 } else { 4 };
                }
            }
        }
        if out.iter().any(|v| !v.is_finite()) {
            return Err(damaged(format!("{what}: a value that is not finite")));
        }
        Ok(out)
    }
}

/// Write the state of `tokens.len()` tokens.
pub(super) fn write(
    w: &mut dyn Write,
    header: &Header,
    tokens: &[u32],
    state: &[AttnState],
) -> std::io::Result<()> {
    let json = serde_json::to_vec(header)?;
    let mut e = Enc {
        w,
        hash: Sha256::new(),
    };
    e.bytes(MAGIC)?;
    e.bytes(&(json.len() as u32).to_le_bytes())?;
    e.bytes(&json)?;
    e.u64(tokens.len())?;
    for c in tokens.chunks(4096) {
        let b: Vec<u8> = c.iter().flat_map(|t| t.to_le_bytes()).collect();
        e.bytes(&b)?;
    }
    e.u64(state.len())?;
    for s in state {
        s.save(&mut e, tokens.len())?;
    }
    let digest = e.hash.finalize();
    e.w.write_all(&digest)
}

/// Read just the header (e.g. to list files).
pub fn read_header(r: &mut dyn Read) -> Result<Header, SnapshotError> {
    let mut d = Dec {
        r,
        hash: Sha256::new(),
    };
    header(&mut d)
}

fn header(d: &mut Dec) -> Result<Header, SnapshotError> {
    let mut magic = [0u8; 8];
    d.bytes(&mut magic).map_err(|_| SnapshotError::NotOurs)?;
    if &magic != MAGIC {
        return Err(SnapshotError::NotOurs);
    }
    let mut n = [0u8; 4];
    d.bytes(&mut n)?;
    let n = u32::from_le_bytes(n);
    if n > MAX_HEADER {
        return Err(damaged("header too long"));
    }
    let mut json = vec![0u8; n as usize];
    d.bytes(&mut json)?;
    let h: Header = serde_json::from_slice(&json).map_err(|e| damaged(format!("header: {e}")))?;
    if h.format != FORMAT {
        return Err(SnapshotError::Format(h.format));
    }
    Ok(h)
}

/// A state read back, not yet in a session.
pub struct Loaded {
    pub header: Header,
    pub(super) tokens: Vec<u32>,
    pub(super) state: Vec<AttnState>,
    pub(super) steps: Steps,
}

impl Loaded {
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }
}

/// Read a state for `engine` with room for `max_ctx` tokens. Refused (nothing allocated
/// beyond what a valid file of that length needs): another format, another engine identity,
/// other steps than `steps` (when given), more tokens than `max_ctx`, any count that does
/// not match the model, a non-finite value, a wrong checksum.
pub(super) fn read(
    r: &mut dyn Read,
    engine: &Engine,
    max_ctx: usize,
    steps: Option<&Steps>,
) -> Result<Loaded, SnapshotError> {
    let mut d = Dec {
        r,
        hash: Sha256::new(),
    };
    let h = header(&mut d)?;
    let identity = engine.identity();
    if h.identity != identity {
        return Err(SnapshotError::Foreign(h.identity));
    }
    if let Some(want) = steps
        && (h.steps != want.hex() || h.n_steps != want.len())
    {
        return Err(SnapshotError::Foreign(format!(
            "computed in other steps ({} of them)",
            h.n_steps
        )));
    }
    let chain: Vec<u8> = (0..h.steps.len() / 2)
        .filter_map(|i| u8::from_str_radix(h.steps.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    let Ok(chain) = <[u8; 32]>::try_from(chain) else {
        return Err(damaged("header: steps"));
    };
    if h.tokens == 0 || h.tokens > max_ctx {
        return Err(damaged(format!(
            "{} tokens, the session holds 1..={max_ctx}",
            h.tokens
        )));
    }
    let n = h.tokens;
    d.count(n, "tokens")?;
    let mut tokens = Vec::with_capacity(n);
    let mut buf = vec![0u8; 4 * 4096];
    while tokens.len() < n {
        let k = (n - tokens.len()).min(4096);
        d.bytes(&mut buf[..4 * k])?;
        tokens.extend(
            buf[..4 * k]
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
    }
    let vocab = engine.cfg.vocab_size;
    if tokens.iter().any(|&t| t as usize >= vocab) {
        return Err(damaged("a token id out of the vocabulary"));
    }
    let mut state = engine.new_state(max_ctx);
    d.count(state.len(), "blocks")?;
    for s in &mut state {
        s.load(&mut d, n, engine.cfg.sliding_window)?;
    }
    let digest = d.hash.finalize();
    let mut stored = [0u8; 32];
    d.r.read_exact(&mut stored)
        .map_err(|_| damaged("truncated"))?;
    if stored[..] != digest[..] {
        return Err(SnapshotError::Checksum);
    }
    // Nothing may follow.
    if d.r.read(&mut [0u8; 1])? != 0 {
        return Err(damaged("bytes after the checksum"));
    }
    let steps = Steps {
        chain,
        n: h.n_steps,
    };
    Ok(Loaded {
        header: h,
        tokens,
        state,
        steps,
    })
}
