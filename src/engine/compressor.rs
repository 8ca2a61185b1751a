//! The KV compressor (spec §5.6): every `ratio` tokens become one row, a per-channel softmax
//! over the tokens' gates (ape added) weighting their projections. Ratio 4 overlaps: a row
//! pools the previous window's first halves and the current window's second halves.
//! The state carries the incomplete window across chunk boundaries (spec §6.3).

use super::kv_cache::RowStore;
use super::rope::Rope;
use super::snapshot::{Dec, Enc, SnapshotError, damaged};
use super::traps::Deviations;
use crate::backend::cpu::{gated_pool, rms_norm};
use crate::model::weights::CompressorWeights;

/// Row-store block size (rows per allocation).
const BLOCK_ROWS: usize = 256;

/// The carry-over of an incomplete window (spec §6.1): what a chunk boundary must keep.
#[derive(Debug, Clone)]
struct Carry {
    /// Projections and gates (+ape) of the current window's tokens: [ratio, coff·dim] each.
    pending_kv: Vec<f32>,
    pending_gate: Vec<f32>,
    n_pending: usize,
    /// First halves of the last complete window (ratio 4 only): [ratio, dim] each.
    prev_kv: Vec<f32>,
    prev_gate: Vec<f32>,
    has_prev: bool,
}

/// A compressor's state at some position (see `CompressorState::mark`): the carry-over and
/// the row count (rows are append-only, so they are not copied).
#[derive(Debug, Clone)]
pub struct CompressorMark {
    carry: Carry,
    rows: usize,
}

#[derive(Debug, Clone)]
pub struct CompressorState {
    ratio: usize,
    dim: usize,
    coff: usize,
    carry: Carry,
    /// Emitted rows (after norm, RoPE and the numerics' rounding).
    pub rows: RowStore,
}

impl CompressorState {
    pub fn new(w: &CompressorWeights) -> CompressorState {
        let (r, d, c) = (w.ratio, w.dim, w.coff());
        CompressorState {
            ratio: r,
            dim: d,
            coff: c,
            carry: Carry {
                pending_kv: vec![0.0; r * c * d],
                pending_gate: vec![0.0; r * c * d],
                n_pending: 0,
                prev_kv: vec![0.0; r * d],
                prev_gate: vec![0.0; r * d],
                has_prev: false,
            },
            rows: RowStore::new(d, BLOCK_ROWS),
        }
    }

    pub fn ratio(&self) -> usize {
        self.ratio
    }

    /// Benchmarks only: the rows `n` tokens (a multiple of the ratio) would have left, with
    /// values from `next` in place of computed ones (the work a later step does depends on
    /// how many rows there are, not on their values).
    pub(crate) fn fill_for_bench(&mut self, n: usize, next: &mut impl FnMut() -> f32) {
        let row: Vec<f32> = (0..self.dim).map(|_| next()).collect();
        for _ in self.rows.len()..n / self.ratio {
            self.rows.push(&row);
        }
        self.carry.has_prev = n >= self.ratio;
        self.carry.n_pending = 0;
    }

    /// Rows visible to a query at position `p`: i < ⌊(p+1)/ratio⌋ (spec §5.6 step 6).
    pub fn visible(&self, p: usize) -> usize {
        ((p + 1) / self.ratio).min(self.rows.len())
    }

    /// Feed one token's projection `a` and gate `z` (both coff·dim, ape not yet added) at
    /// absolute position `pos`. Returns the pooled, un-normalised row when the token
    /// completes a window.
    fn feed(
        &mut self,
        ape: &[f32],
        a: &[f32],
        z: &[f32],
        pos: usize,
        dv: Deviations,
    ) -> Option<Vec<f32>> {
        let (r, d, cd) = (self.ratio, self.dim, self.coff * self.dim);
        let s = pos % r;
        debug_assert_eq!(s, self.carry.n_pending, "compressor fed out of order");
        self.carry.pending_kv[s * cd..(s + 1) * cd].copy_from_slice(a);
        for (j, g) in self.carry.pending_gate[s * cd..(s + 1) * cd]
            .iter_mut()
            .enumerate()
        {
            *g = z[j] + ape[s * cd + j];
        }
        if dv.compressor_scalar_gate {
            let g = &mut self.carry.pending_gate[s * cd..(s + 1) * cd];
            for half in g.chunks_mut(self.dim) {
                let mean = half.iter().sum::<f32>() / half.len() as f32;
                half.fill(mean);
            }
        }
        self.carry.n_pending += 1;
        if self.carry.n_pending < r {
            return None;
        }
        // Trap: the overlap takes the wrong halves.
        let (first, second) = if dv.overlap_halves_swapped {
            (d, 0)
        } else {
            (0, d)
        };
        let mut out = vec![0f32; d];
        let c = &self.carry;
        let (prev, zero_slots, off) = if self.coff == 2 {
            let prev = c.has_prev.then_some((&c.prev_kv[..], &c.prev_gate[..]));
            let zeros = if !c.has_prev && dv.first_row_zero_slots {
                r
            } else {
                0
            };
            (prev, zeros, second)
        } else {
            (None, 0, 0)
        };
        gated_pool(
            prev,
            zero_slots,
            (&c.pending_kv, &c.pending_gate),
            r,
            d,
            cd,
            off,
            &mut out,
        );
        if self.coff == 2 {
            for t in 0..r {
                self.carry.prev_kv[t * d..(t + 1) * d]
                    .copy_from_slice(&self.carry.pending_kv[t * cd + first..t * cd + first + d]);
                self.carry.prev_gate[t * d..(t + 1) * d]
                    .copy_from_slice(&self.carry.pending_gate[t * cd + first..t * cd + first + d]);
            }
            self.carry.has_prev = true;
        }
        self.carry.n_pending = 0;
        Some(out)
    }

    /// Feed a chunk: `a`, `z` are [t, coff·dim] for positions t0.. . Completed rows are
    /// normalised, rotated at their window's first position (i·ratio) and passed through
    /// `finish` (the numerics' rounding), then stored.
    #[allow(clippy::too_many_arguments)] // the chunk, its position, and the layer's rope/eps/deviations
    pub fn feed_chunk(
        &mut self,
        w: &CompressorWeights,
        rope: &Rope,
        eps: f32,
        a: &[f32],
        z: &[f32],
        t0: usize,
        dv: Deviations,
        finish: impl Fn(&mut [f32]),
    ) {
        let cd = self.coff * self.dim;
        for (k, (ak, zk)) in a.chunks_exact(cd).zip(z.chunks_exact(cd)).enumerate() {
            if let Some(mut row) = self.feed(&w.ape, ak, zk, t0 + k, dv) {
                let i = self.rows.len();
                rms_norm(&mut row, &w.norm, eps);
                // RoPE at the window's first position (the trap: its last).
                let end = if dv.compressed_rope_at_window_end {
                    self.ratio - 1
                } else {
                    0
                };
                rope.apply(&mut row, i * self.ratio + end, false);
                finish(&mut row);
                self.rows.push(&row);
            }
        }
    }

    /// A point to come back to (cheap: the carry-over and a row count).
    pub fn mark(&self) -> CompressorMark {
        CompressorMark {
            carry: self.carry.clone(),
            rows: self.rows.len(),
        }
    }

    pub fn restore(&mut self, m: &CompressorMark) {
        self.carry.clone_from(&m.carry);
        self.rows.truncate(m.rows);
    }

    /// Write the carry-over (the slots of the tokens pending; the others are rewritten
    /// before they are read) and the rows.
    pub(super) fn save(&self, e: &mut Enc) -> std::io::Result<()> {
        let c = &self.carry;
        let live = c.n_pending * self.coff * self.dim;
        e.u64(c.n_pending)?;
        e.u8(c.has_prev as u8)?;
        let cd = self.coff * self.dim;
        e.rows(&c.pending_kv[..live], cd)?;
        e.rows(&c.pending_gate[..live], cd)?;
        // The previous window's halves: read by ratio 4's overlap only.
        if self.coff == 2 {
            e.rows(&c.prev_kv, self.dim)?;
            e.rows(&c.prev_gate, self.dim)?;
        }
        self.rows.save(e)
    }

    /// Read back the state after `len` tokens into this fresh compressor: every count must be
    /// what `len` tokens leave (the carry holds len mod ratio tokens, one row per window).
    pub(super) fn load(&mut self, d: &mut Dec, len: usize) -> Result<(), SnapshotError> {
        let r = self.ratio;
        d.count(len % r, "compressor: pending tokens")?;
        let has_prev = d.u8()?;
        if has_prev != (self.coff == 2 && len >= r) as u8 {
            return Err(damaged("compressor: overlap flag"));
        }
        let c = &mut self.carry;
        c.n_pending = len % r;
        c.has_prev = has_prev == 1;
        let cd = self.coff * self.dim;
        let live = c.n_pending * cd;
        let kv = d.rows(live, cd, "compressor carry")?;
        c.pending_kv[..live].copy_from_slice(&kv);
        let gate = d.rows(live, cd, "compressor carry")?;
        c.pending_gate[..live].copy_from_slice(&gate);
        if self.coff == 2 {
            c.prev_kv = d.rows(c.prev_kv.len(), self.dim, "compressor carry")?;
            c.prev_gate = d.rows(c.prev_gate.len(), self.dim, "compressor carry")?;
        }
        self.rows.load(d, len / r, "compressed rows")
    }

    pub fn allocated_bytes(&self) -> usize {
        self.rows.allocated_bytes()
            + 4 * (self.carry.pending_kv.len() * 2 + self.carry.prev_kv.len() * 2)
    }
}
