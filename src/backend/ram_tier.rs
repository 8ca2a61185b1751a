//! Routed experts in RAM under a budget (`--ram`): the CPU computes an expert from an owned
//! copy when the tier holds it, otherwise from a copy read now from the checkpoint's files
//! (large reads, dropped from the page cache after), so the mapped expert pages are never
//! touched and the kernel's page cache does not decide what stays. Each layer holds at most
//! `per_layer` experts: the most selected so far (a read expert replaces the layer's least
//! selected one only when it has been selected more often).
//!
//! Reads ahead: as soon as experts are known to be needed (a hash layer's from the token ids
//! before the forward pass, a scored layer's once its router has run), `prefetch` queues the
//! ones not held in the order the CPU will compute them, and background threads keep up to
//! `WINDOW` reads in flight and at most `AHEAD` read copies waiting, so the drive works while
//! the CPU computes the layers before, the shared expert and the experts already here. `get`
//! waits for an expert's read if it is in flight; `forget` drops what a layer did not claim
//! (experts the dispatch put on the device).

use crate::model::ReadBuffers;
use crate::model::weights::ExpertWeights;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};

/// Reads in flight at most (each an expert: ~13.4 MB on the real model).
const WINDOW: usize = 8;
/// Reads started and not yet claimed by `get` at most: what reading ahead adds to the RAM
/// the tier holds (~320 MB on the real model).
const AHEAD: usize = 24;

/// A read in flight: its result once done (None: the read failed).
type Slot = Arc<(Mutex<Option<Option<Arc<ExpertWeights>>>>, Condvar)>;

/// What the tier served.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct RamStats {
    /// Selections served from RAM.
    pub hits: u64,
    /// Selections read from the files.
    pub reads: u64,
    pub bytes_read: u64,
    /// Seconds the CPU's experts waited for reads (those not read ahead in time).
    pub wait_s: f64,
}

#[derive(Default)]
struct State {
    /// Selections per (layer, expert).
    counts: HashMap<(usize, usize), u64>,
    held: HashMap<(usize, usize), Arc<ExpertWeights>>,
    /// Reads started or queued, by expert.
    pending: HashMap<(usize, usize), Slot>,
    /// Queued reads not started yet, in the order they will be needed.
    queue: VecDeque<((usize, usize), ExpertWeights, Slot)>,
    in_flight: usize,
    /// Reads started and not claimed or forgotten yet.
    ahead: usize,
    stats: RamStats,
}

pub struct RamTier {
    per_layer: usize,
    state: Arc<Mutex<State>>,
    /// The copies' buffers, reused once a copy is dropped (not kept, or evicted).
    bufs: ReadBuffers,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The expert's matrices as owned copies read from the files; None if a read fails.
fn read_expert(w: &ExpertWeights, bufs: &ReadBuffers) -> Option<Arc<ExpertWeights>> {
    Some(Arc::new(ExpertWeights {
        w1: w.w1.read_copy(bufs).ok()?,
        w3: w.w3.read_copy(bufs).ok()?,
        w2: w.w2.read_copy(bufs).ok()?,
    }))
}

/// Start queued reads while fewer than `WINDOW` are in flight and `AHEAD` unclaimed; each
/// thread, when done, stores its result and starts the next.
fn pump(state: &Arc<Mutex<State>>, s: &mut State, bufs: &ReadBuffers) {
    while s.in_flight < WINDOW && s.ahead < AHEAD {
        let Some((_, w, slot)) = s.queue.pop_front() else {
            return;
        };
        s.in_flight += 1;
        s.ahead += 1;
        let (st, bufs) = (state.clone(), bufs.clone());
        std::thread::spawn(move || {
            let r = read_expert(&w, &bufs);
            let (m, cv) = &*slot;
            *m.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            cv.notify_all();
            let mut s = lock(&st);
            s.in_flight -= 1;
            pump(&st, &mut s, &bufs);
        });
    }
}

impl RamTier {
    pub fn new(per_layer: usize) -> RamTier {
        RamTier {
            per_layer,
            state: Arc::default(),
            bufs: ReadBuffers::default(),
        }
    }

    /// Experts each layer may hold.
    pub fn per_layer(&self) -> usize {
        self.per_layer
    }

    /// Start from a saved usage profile (selections per [layer][expert]): the experts it
    /// found popular earn their place at their first read.
    pub fn seed(&self, counts: &[Vec<u64>]) {
        let mut s = self.lock();
        for (l, row) in counts.iter().enumerate() {
            for (e, &c) in row.iter().enumerate().filter(|&(_, &c)| c > 0) {
                *s.counts.entry((l, e)).or_insert(0) += c;
            }
        }
    }

    /// Selections per [layer][expert] seen so far (seeded ones included).
    pub fn counts(&self, layers: usize, experts: usize) -> Vec<Vec<u64>> {
        let s = self.lock();
        let mut out = vec![vec![0; experts]; layers];
        for (&(l, e), &c) in &s.counts {
            if let Some(x) = out.get_mut(l).and_then(|r| r.get_mut(e)) {
                *x = c;
            }
        }
        out
    }

    /// `experts` of `layer` reordered: those held first, then the others, each in the
    /// given order.
    pub fn held_first(&self, layer: usize, experts: &[usize]) -> Vec<usize> {
        let s = self.lock();
        let (mut held, rest): (Vec<usize>, Vec<usize>) = experts
            .iter()
            .partition(|&&e| s.held.contains_key(&(layer, e)));
        held.extend(rest);
        held
    }

    /// Drop the reads queued or done for `layer` that its experts did not claim.
    pub fn forget(&self, layer: usize) {
        let mut s = self.lock();
        let keys: Vec<(usize, usize)> =
            s.pending.keys().filter(|k| k.0 == layer).copied().collect();
        for key in keys {
            s.pending.remove(&key);
            match s.queue.iter().position(|(k, _, _)| *k == key) {
                Some(i) => drop(s.queue.remove(i)),
                None => s.ahead -= 1,
            }
        }
        pump(&self.state, &mut s, &self.bufs);
    }

    pub fn stats(&self) -> RamStats {
        self.lock().stats
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The CPU will need `experts` of `layer` (whose mapped views are `w`), in this order:
    /// queue reads of those not held.
    pub fn prefetch(&self, layer: usize, experts: &[usize], w: &[ExpertWeights]) {
        let mut s = self.lock();
        for &e in experts {
            let key = (layer, e);
            if s.held.contains_key(&key) || s.pending.contains_key(&key) {
                continue;
            }
            let Some(ew) = w.get(e) else {
                continue;
            };
            let slot = Slot::default();
            s.pending.insert(key, slot.clone());
            s.queue.push_back((key, ew.clone(), slot));
        }
        pump(&self.state, &mut s, &self.bufs);
    }

    /// Expert `e` of `layer` (whose mapped views are `w`) for the CPU: the copy held, or one
    /// read now (kept if it earns a place). A read that fails (the file changed under us)
    /// gives None: the caller computes from the mapped views.
    pub fn get(&self, layer: usize, e: usize, w: &ExpertWeights) -> Option<Arc<ExpertWeights>> {
        let (count, pending) = {
            let mut s = self.lock();
            let c = s.counts.entry((layer, e)).or_insert(0);
            *c += 1;
            let c = *c;
            if let Some(h) = s.held.get(&(layer, e)).cloned() {
                s.stats.hits += 1;
                return Some(h);
            }
            let p = s.pending.remove(&(layer, e));
            if p.is_none() {
                (c, None)
            } else if let Some(i) = s.queue.iter().position(|(k, _, _)| *k == (layer, e)) {
                // Not started yet: read it here instead.
                s.queue.remove(i);
                (c, None)
            } else {
                // Started: it is claimed now, so another may start.
                s.ahead -= 1;
                pump(&self.state, &mut s, &self.bufs);
                (c, p)
            }
        };
        // Outside the lock: other experts' reads and hits go on meanwhile.
        let waited = std::time::Instant::now();
        let copy = match pending {
            Some(slot) => {
                let (m, cv) = &*slot;
                let mut r = m.lock().unwrap_or_else(|e| e.into_inner());
                while r.is_none() {
                    r = cv.wait(r).unwrap_or_else(|e| e.into_inner());
                }
                r.take().flatten()?
            }
            None => read_expert(w, &self.bufs)?,
        };
        let bytes = [&copy.w1, &copy.w3, &copy.w2]
            .iter()
            .map(|m| m.stored_bytes() as u64)
            .sum::<u64>();
        let mut s = self.lock();
        s.stats.wait_s += waited.elapsed().as_secs_f64();
        s.stats.reads += 1;
        s.stats.bytes_read += bytes;
        if self.per_layer == 0 || s.held.contains_key(&(layer, e)) {
            return Some(copy);
        }
        let in_layer: Vec<(usize, u64)> = s
            .held
            .keys()
            .filter(|(l, _)| *l == layer)
            .map(|&(_, x)| (x, s.counts.get(&(layer, x)).copied().unwrap_or(0)))
            .collect();
        if in_layer.len() >= self.per_layer {
            // The least selected (ties: the highest id) gives way to a more selected one.
            let Some(&(cold, cold_count)) = in_layer
                .iter()
                .min_by_key(|&&(x, c)| (c, std::cmp::Reverse(x)))
            else {
                return Some(copy);
            };
            if cold_count >= count {
                return Some(copy);
            }
            s.held.remove(&(layer, cold));
        }
        s.held.insert((layer, e), copy.clone());
        Some(copy)
    }
}
