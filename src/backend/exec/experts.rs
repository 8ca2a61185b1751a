//! Expert dispatch: the expert cache's policy and the experts it holds on the device, its
//! counters and usage profile, the routing trace, and the prefill cost model that streams
//! non-resident experts to the device for a chunk.

use super::{Exec, weight_key};
use crate::backend::device::lock;
use crate::backend::expert_cache::{Access, Policy, Trace};
use crate::model::weights::Weight;
use std::collections::HashMap;
use std::sync::Mutex;

/// The routed-expert slots: a policy and the weights of the experts it holds.
struct ExpertSlots {
    policy: Box<dyn Policy + Send>,
    held: HashMap<(usize, usize), [Weight; 3]>,
    /// Selections per [layer][expert] (seeded from a loaded profile): the usage profile.
    counts: Vec<Vec<u64>>,
}

/// Counters of the expert cache (selections served from device slots or not).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExpertStats {
    pub hits: u64,
    pub misses: u64,
    /// Experts copied to the device (promotions).
    pub promotions: u64,
    /// Prefill: missed experts streamed to the device for one chunk, and computed on the CPU.
    pub streamed: u64,
    pub on_cpu: u64,
}

/// The stream costs: none, to be measured at first use, or known.
#[derive(Default)]
enum CostState {
    #[default]
    Off,
    Pending(Box<dyn FnOnce() -> Option<StreamCosts> + Send>),
    Ready(StreamCosts),
}

/// The prefill cost model's two rates: streaming an expert over the link vs computing its
/// tokens on the CPU.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreamCosts {
    pub link_gbs: f64,
    pub cpu_gflops: f64,
}

/// The executor's routed-expert state.
#[derive(Default)]
pub struct Experts {
    slots: Mutex<Option<ExpertSlots>>,
    stats: Mutex<ExpertStats>,
    trace: Mutex<Option<Trace>>,
    costs: Mutex<CostState>,
}

impl Experts {
    /// Manage routed experts with `policy`: from now on every selection goes through it, and
    /// the experts it holds are resident on the device (the others run on the CPU).
    /// `counts` seeds the usage profile (from an earlier session; empty for none).
    pub fn set_policy(&self, policy: Box<dyn Policy + Send>, counts: Vec<Vec<u64>>) {
        *lock(&self.slots) = Some(ExpertSlots {
            policy,
            held: HashMap::new(),
            counts,
        });
    }

    /// Selections per [layer][expert] so far, the seed profile included (None without an
    /// expert policy).
    pub fn counts(&self) -> Option<Vec<Vec<u64>>> {
        lock(&self.slots).as_ref().map(|s| s.counts.clone())
    }

    pub fn stats(&self) -> ExpertStats {
        *lock(&self.stats)
    }

    /// Start recording every expert selection (a routing trace); `take_trace` returns it.
    pub fn record_routes(&self, layers: usize, experts: usize) {
        *lock(&self.trace) = Some(Trace {
            layers,
            experts,
            accesses: Vec::new(),
        });
    }

    pub fn take_trace(&self) -> Option<Trace> {
        lock(&self.trace).take()
    }

    /// Whether expert selections matter here (an expert policy or a trace being recorded);
    /// without either, `selected` does nothing and callers need not gather them.
    pub fn tracked(&self) -> bool {
        lock(&self.slots).is_some() || lock(&self.trace).is_some()
    }

    /// The router chose `selected` experts of `layer` (with repeats, token by token): record
    /// them, let the policy count hits and change its slots, and move weights to match.
    /// Returns the experts that were already on the device (the hits, which run there now);
    /// the ones promoted by this call are copied in the background and serve later tokens.
    /// None without an expert policy (residency is then fixed: ask `is_resident`).
    pub fn selected<'w>(
        &self,
        ex: &Exec,
        layer: usize,
        selected: impl Iterator<Item = usize>,
        weights: impl Fn(usize) -> [&'w Weight; 3],
    ) -> Option<std::collections::HashSet<usize>> {
        let selected: Vec<usize> = selected.collect();
        if let Some(t) = lock(&self.trace).as_mut() {
            t.accesses.extend(selected.iter().map(|&e| Access {
                layer: layer as u16,
                expert: e as u16,
            }));
        }
        let mut g = lock(&self.slots);
        let slots = g.as_mut()?;
        // Promotions the device had no room for give their slots up.
        let refused: std::collections::HashSet<usize> = ex.take_refused().into_iter().collect();
        if !refused.is_empty() {
            let gone: Vec<(usize, usize)> = slots
                .held
                .iter()
                .filter(|(_, ws)| ws.iter().any(|w| refused.contains(&weight_key(w))))
                .map(|(k, _)| *k)
                .collect();
            for k in gone {
                if let Some(ws) = slots.held.remove(&k) {
                    ws.iter().for_each(|w| ex.evict(w));
                }
            }
        }
        let before: std::collections::HashSet<usize> = slots
            .held
            .keys()
            .filter(|(l, _)| *l == layer)
            .map(|&(_, e)| e)
            .collect();
        let mut st = lock(&self.stats);
        if slots.counts.len() <= layer {
            slots.counts.resize(layer + 1, Vec::new());
        }
        for &e in &selected {
            let row = &mut slots.counts[layer];
            if row.len() <= e {
                row.resize(e + 1, 0);
            }
            // A profile read from a file may start anywhere: counts stop at the top.
            row[e] = row[e].saturating_add(1);
            let hit = slots.policy.access(Access {
                layer: layer as u16,
                expert: e as u16,
            });
            if hit {
                st.hits += 1;
            } else {
                st.misses += 1;
            }
        }
        // Bring the device in line with the policy's slots: first what it let go of (in
        // this layer, or in any after slots moved between layers), then this layer's new.
        let want = slots.policy.resident(layer);
        let every_layer = slots.policy.take_moved();
        let mut keep: HashMap<usize, Vec<usize>> = HashMap::new();
        let gone: Vec<(usize, usize)> = slots
            .held
            .keys()
            .filter(|(l, e)| {
                (every_layer || *l == layer)
                    && !keep
                        .entry(*l)
                        .or_insert_with(|| slots.policy.resident(*l))
                        .contains(e)
            })
            .copied()
            .collect();
        for k in gone {
            if let Some(ws) = slots.held.remove(&k) {
                ws.iter().for_each(|w| ex.evict(w));
            }
        }
        for e in want {
            if slots.held.contains_key(&(layer, e)) {
                continue;
            }
            let ws = weights(e);
            // The copies run in the background; a device too full for the expert leaves it
            // on the CPU (no error).
            if ws.iter().all(|w| ex.promote(w)) {
                slots.held.insert((layer, e), ws.map(|w| w.clone()));
                st.promotions += 1;
            } else {
                ws.iter().for_each(|w| ex.evict(w));
            }
        }
        Some(
            before
                .into_iter()
                .filter(|e| slots.held.contains_key(&(layer, *e)))
                .collect(),
        )
    }

    /// Enable streamed prefill with these rates (see [`Experts::stream_for_chunk`]).
    pub fn set_stream_costs(&self, c: StreamCosts) {
        *lock(&self.costs) = CostState::Ready(c);
    }

    /// Enable streamed prefill with rates measured by `measure` at the first chunk that needs
    /// them (keeps the measurement off start-up and off decode-only runs).
    pub fn set_stream_costs_with(
        &self,
        measure: impl FnOnce() -> Option<StreamCosts> + Send + 'static,
    ) {
        *lock(&self.costs) = CostState::Pending(Box::new(measure));
    }

    fn stream_costs(&self) -> Option<StreamCosts> {
        let mut g = lock(&self.costs);
        if let CostState::Pending(_) = &*g
            && let CostState::Pending(f) = std::mem::replace(&mut *g, CostState::Off)
        {
            *g = f().map_or(CostState::Off, CostState::Ready);
        }
        match &*g {
            CostState::Ready(c) => Some(*c),
            _ => None,
        }
    }

    /// Prefill of a chunk: for each routed expert not on the device, with `n` tokens routed to
    /// it, stream its weights to the device for this chunk when the copy (bytes / link) costs
    /// less than computing its tokens on the CPU (2·n·weights / CPU rate). Returns the experts
    /// streamed, for [`Experts::release_streamed`] after the chunk. No-op without stream costs
    /// or a device.
    pub fn stream_for_chunk<'w>(
        &self,
        ex: &Exec,
        groups: &[(usize, usize)],
        weights: impl Fn(usize) -> [&'w Weight; 3],
    ) -> Vec<(usize, [Weight; 3])> {
        let Some(c) = self.stream_costs() else {
            return Vec::new();
        };
        if ex.device().is_none() {
            return Vec::new();
        }
        let mut streamed = Vec::new();
        let mut st = lock(&self.stats);
        for &(e, n) in groups {
            let ws = weights(e);
            if ws.iter().all(|w| ex.is_resident(w)) {
                continue;
            }
            let bytes: usize = ws.iter().map(|w| w.stored_bytes()).sum();
            let params: usize = ws.iter().map(|w| w.rows() * w.cols()).sum();
            let stream_s = bytes as f64 / (c.link_gbs * 1e9);
            let cpu_s = 2.0 * (n * params) as f64 / (c.cpu_gflops * 1e9);
            if stream_s < cpu_s && ws.iter().all(|w| matches!(ex.make_resident(w), Ok(true))) {
                st.streamed += 1;
                streamed.push((e, ws.map(|w| w.clone())));
            } else {
                // Not worth it, or no room: release whatever part did get in.
                if stream_s < cpu_s {
                    ws.iter().for_each(|w| ex.evict(w));
                }
                st.on_cpu += 1;
            }
        }
        streamed
    }

    /// Evict the experts `stream_for_chunk` brought in (unless the cache has taken them since).
    pub fn release_streamed(&self, ex: &Exec, streamed: Vec<(usize, [Weight; 3])>) {
        let held: std::collections::HashSet<usize> = lock(&self.slots)
            .as_ref()
            .map(|s| {
                s.held
                    .values()
                    .flat_map(|ws| ws.iter().map(weight_key))
                    .collect()
            })
            .unwrap_or_default();
        for (_, ws) in streamed {
            for w in &ws {
                if !held.contains(&weight_key(w)) {
                    ex.evict(w);
                }
            }
        }
    }
}
