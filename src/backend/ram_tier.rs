//! Routed experts in RAM under a budget (`--ram`): the CPU computes an expert from an owned
//! copy when the tier holds it, otherwise from a copy read now from the checkpoint's files
//! (large reads, dropped from the page cache after), so the mapped expert pages are never
//! touched and the kernel's page cache does not decide what stays. Each layer holds at most
//! `per_layer` experts: the most selected so far (a read expert replaces the layer's least
//! selected one only when it has been selected more often).
//!
//! Reads ahead: once a layer's experts are chosen, `prefetch` queues the ones not held in
//! the order the CPU will compute them, and background threads keep up to `WINDOW` reads in
//! flight, so the drive works while the CPU computes the shared expert and the experts
//! already here. `get` waits for an expert's read if it is in flight.

use crate::model::weights::ExpertWeights;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};

/// Reads in flight at most (each an expert: ~13.4 MB on the real model).
const WINDOW: usize = 8;

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
    stats: RamStats,
}

pub struct RamTier {
    per_layer: usize,
    state: Arc<Mutex<State>>,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The expert's matrices as owned copies read from the files; None if a read fails.
fn read_expert(w: &ExpertWeights) -> Option<Arc<ExpertWeights>> {
    Some(Arc::new(ExpertWeights {
        w1: w.w1.read_copy().ok()?,
        w3: w.w3.read_copy().ok()?,
        w2: w.w2.read_copy().ok()?,
    }))
}

/// Start queued reads while fewer than `WINDOW` are in flight; each thread, when done,
/// stores its result and starts the next.
fn pump(state: &Arc<Mutex<State>>, s: &mut State) {
    while s.in_flight < WINDOW {
        let Some((_, w, slot)) = s.queue.pop_front() else {
            return;
        };
        s.in_flight += 1;
        let st = state.clone();
        std::thread::spawn(move || {
            let r = read_expert(&w);
            let (m, cv) = &*slot;
            *m.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            cv.notify_all();
            let mut s = lock(&st);
            s.in_flight -= 1;
            pump(&st, &mut s);
        });
    }
}

impl RamTier {
    pub fn new(per_layer: usize) -> RamTier {
        RamTier {
            per_layer,
            state: Arc::default(),
        }
    }

    /// Experts each layer may hold.
    pub fn per_layer(&self) -> usize {
        self.per_layer
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
        pump(&self.state, &mut s);
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
            // Not started yet: read it here instead.
            if p.is_some()
                && let Some(i) = s.queue.iter().position(|(k, _, _)| *k == (layer, e))
            {
                s.queue.remove(i);
                (c, None)
            } else {
                (c, p)
            }
        };
        // Outside the lock: other experts' reads and hits go on meanwhile.
        let copy = match pending {
            Some(slot) => {
                let (m, cv) = &*slot;
                let mut r = m.lock().unwrap_or_else(|e| e.into_inner());
                while r.is_none() {
                    r = cv.wait(r).unwrap_or_else(|e| e.into_inner());
                }
                r.take().flatten()?
            }
            None => read_expert(w)?,
        };
        let bytes = [&copy.w1, &copy.w3, &copy.w2]
            .iter()
            .map(|m| m.stored_bytes() as u64)
            .sum::<u64>();
        let mut s = self.lock();
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
