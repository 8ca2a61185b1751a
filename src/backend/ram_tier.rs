//! Routed experts in RAM under a budget (`--ram`): the CPU computes an expert from an owned
//! copy when the tier holds it, otherwise from a copy read now from the checkpoint's files
//! (large reads, dropped from the page cache after), so the mapped expert pages are never
//! touched and the kernel's page cache does not decide what stays. Each layer holds at most
//! `per_layer` experts: the most selected so far (a read expert replaces the layer's least
//! selected one only when it has been selected more often).

use crate::model::weights::ExpertWeights;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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
    stats: RamStats,
}

pub struct RamTier {
    per_layer: usize,
    state: Mutex<State>,
}

impl RamTier {
    pub fn new(per_layer: usize) -> RamTier {
        RamTier {
            per_layer,
            state: Mutex::default(),
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
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Expert `e` of `layer` (whose mapped views are `w`) for the CPU: the copy held, or one
    /// read now (kept if it earns a place). A read that fails (the file changed under us)
    /// gives None: the caller computes from the mapped views.
    pub fn get(&self, layer: usize, e: usize, w: &ExpertWeights) -> Option<Arc<ExpertWeights>> {
        let count = {
            let mut s = self.lock();
            let c = s.counts.entry((layer, e)).or_insert(0);
            *c += 1;
            let c = *c;
            if let Some(h) = s.held.get(&(layer, e)).cloned() {
                s.stats.hits += 1;
                return Some(h);
            }
            c
        };
        // Outside the lock: other experts' reads and hits go on meanwhile.
        let copy = Arc::new(ExpertWeights {
            w1: w.w1.read_copy().ok()?,
            w3: w.w3.read_copy().ok()?,
            w2: w.w2.read_copy().ok()?,
        });
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
