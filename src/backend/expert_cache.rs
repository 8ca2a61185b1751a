//! Which routed experts hold the GPU's expert slots: online policies, the offline optimum they
//! are measured against, and the routing traces to measure them on.
//!
//! Slots are per layer (`capacity` experts of each layer). An access is one selection of one
//! expert by one token at one layer; a hit means its weights were already on the GPU. The
//! policies:
//! - [`Lru`]: least recently used out.
//! - [`StaticFrequency`]: a fixed set, the most frequent experts of a usage profile (what
//!   KTransformers' `--kt-num-gpu-experts` does), never changed.
//! - [`Adaptive`]: per-layer frequency counts that decay (half-life in tokens), with
//!   admission control: a missed expert replaces the coldest resident one only when its own
//!   decayed count is higher, so one-off selections do not flush the hot set.
//! - [`belady`]: the offline optimum (evict, or do not admit, whichever is used farthest in
//!   the future), the upper bound any policy can reach on a trace.

use std::collections::HashMap;

/// Zipf exponent s such that the top `frac` of `n` experts take `share` of the selections.
pub fn fit_zipf(n: usize, frac: f64, share: f64) -> f64 {
    let top = ((n as f64 * frac).round() as usize).max(1);
    let covered = |s: f64| {
        let w: Vec<f64> = (1..=n).map(|i| (i as f64).powf(-s)).collect();
        w[..top].iter().sum::<f64>() / w.iter().sum::<f64>()
    };
    let (mut lo, mut hi) = (0.0, 4.0);
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if covered(mid) < share {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Selection probabilities of `n` experts under V4-Flash's measured skew (the top 12.5 % of
/// a layer's experts take ~58 % of its selections), most popular first.
pub fn expert_popularity(n: usize) -> Vec<f64> {
    popularity_with_share(n, 0.58)
}

/// A Zipf popularity over `n` experts whose top 12.5 % take `share` of the selections.
pub fn popularity_with_share(n: usize, share: f64) -> Vec<f64> {
    let s = fit_zipf(n, 0.125, share);
    let w: Vec<f64> = (1..=n).map(|i| (i as f64).powf(-s)).collect();
    let sum: f64 = w.iter().sum();
    w.into_iter().map(|v| v / sum).collect()
}

/// One selection: (layer, expert).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Access {
    pub layer: u16,
    pub expert: u16,
}

/// A routing trace: accesses in order (token by token, layer by layer).
#[derive(Debug, Clone, Default)]
pub struct Trace {
    pub layers: usize,
    pub experts: usize,
    pub accesses: Vec<Access>,
}

impl Trace {
    /// Selections per (layer, expert), most used first per layer: the usage profile a static
    /// policy is built from.
    pub fn counts(&self) -> Vec<Vec<u64>> {
        let mut c = vec![vec![0u64; self.experts]; self.layers];
        for a in &self.accesses {
            c[a.layer as usize][a.expert as usize] += 1;
        }
        c
    }

    /// Mean over layers of the share of selections taken by the top `frac` of experts.
    pub fn top_share(&self, frac: f64) -> f64 {
        let top = ((self.experts as f64 * frac).round() as usize).max(1);
        let mut s = 0.0;
        for mut row in self.counts() {
            row.sort_unstable_by(|a, b| b.cmp(a));
            let total: u64 = row.iter().sum();
            s += row[..top].iter().sum::<u64>() as f64 / total.max(1) as f64;
        }
        s / self.layers as f64
    }
}

/// An online slot policy: `access` says whether the expert was resident, then updates the
/// slots (a miss may bring it in, evicting another).
pub trait Policy {
    fn name(&self) -> &'static str;
    fn access(&mut self, a: Access) -> bool;
    /// Experts of `layer` resident now.
    fn resident(&self, layer: usize) -> Vec<usize>;
    /// Whether slots moved between layers since the last call (other layers' residents may
    /// then have changed too).
    fn take_moved(&mut self) -> bool {
        false
    }
}

pub struct Lru {
    capacity: usize,
    /// Per layer: expert -> last use.
    last: Vec<HashMap<u16, u64>>,
    clock: u64,
}

impl Lru {
    pub fn new(layers: usize, capacity: usize) -> Lru {
        Lru {
            capacity,
            last: vec![HashMap::new(); layers],
            clock: 0,
        }
    }
}

impl Policy for Lru {
    fn name(&self) -> &'static str {
        "LRU"
    }

    fn access(&mut self, a: Access) -> bool {
        self.clock += 1;
        let l = &mut self.last[a.layer as usize];
        if let Some(t) = l.get_mut(&a.expert) {
            *t = self.clock;
            return true;
        }
        if self.capacity == 0 {
            return false;
        }
        if l.len() >= self.capacity
            && let Some((&old, _)) = l.iter().min_by_key(|(e, t)| (**t, **e))
        {
            l.remove(&old);
        }
        l.insert(a.expert, self.clock);
        false
    }

    fn resident(&self, layer: usize) -> Vec<usize> {
        let mut v: Vec<usize> = self.last[layer].keys().map(|&e| e as usize).collect();
        v.sort_unstable();
        v
    }
}

pub struct StaticFrequency {
    sets: Vec<Vec<bool>>,
}

impl StaticFrequency {
    /// The `capacity` most selected experts of each layer in `profile` (ties: lower index).
    pub fn from_counts(profile: &[Vec<u64>], capacity: usize) -> StaticFrequency {
        let sets = profile
            .iter()
            .map(|row| {
                let mut idx: Vec<usize> = (0..row.len()).collect();
                idx.sort_by(|&a, &b| row[b].cmp(&row[a]).then(a.cmp(&b)));
                let mut set = vec![false; row.len()];
                for &e in idx.iter().take(capacity) {
                    set[e] = true;
                }
                set
            })
            .collect();
        StaticFrequency { sets }
    }
}

impl Policy for StaticFrequency {
    fn name(&self) -> &'static str {
        "static frequency"
    }

    fn access(&mut self, a: Access) -> bool {
        self.sets[a.layer as usize][a.expert as usize]
    }

    fn resident(&self, layer: usize) -> Vec<usize> {
        (0..self.sets[layer].len())
            .filter(|&e| self.sets[layer][e])
            .collect()
    }
}

pub struct Adaptive {
    /// Slots per layer (all equal unless rebalanced; their sum stays the same).
    cap: Vec<usize>,
    /// Per layer, per expert: decayed count, stored scaled by `scale` (lazy decay).
    score: Vec<Vec<f64>>,
    resident: Vec<Vec<u16>>,
    scale: f64,
    /// Per-access growth of `scale`: 2^(1/half_life) per token of `layers·k` accesses.
    growth: f64,
    /// Rebalancing across layers: every `period` accesses (0: never), at least `floor` slots
    /// per layer.
    period: usize,
    floor: usize,
    since: usize,
    /// A rebalance moved slots since `take_moved` last looked.
    moved: bool,
}

/// An expert with its decayed count.
type Scored = (f64, u16);

impl Adaptive {
    /// `half_life`: selections of a layer after which a count weighs half.
    pub fn new(layers: usize, experts: usize, capacity: usize, half_life: f64) -> Adaptive {
        Adaptive {
            cap: vec![capacity; layers],
            score: vec![vec![0.0; experts]; layers],
            resident: vec![Vec::new(); layers],
            scale: 1.0,
            growth: 2f64.powf(1.0 / (half_life * layers as f64)),
            period: 0,
            floor: 0,
            since: 0,
            moved: false,
        }
    }

    /// Move slots between layers by observed demand: every `period` accesses, while the most
    /// used expert left out of some layer is used clearly more (by a quarter) than the least
    /// used resident of another, a slot moves from that layer to this one (at most 1/8 of a
    /// layer's slots per rebalance; every layer keeps at least half its initial slots).
    pub fn with_rebalancing(mut self, period: usize) -> Adaptive {
        self.period = period;
        self.floor = self.cap.first().map_or(0, |c| c / 2);
        self
    }

    /// Slots per layer now.
    pub fn slots(&self) -> &[usize] {
        &self.cap
    }

    /// (score, expert) of layer `l`'s weakest resident and of its strongest outsider.
    fn extremes(&self, l: usize) -> (Option<Scored>, Option<Scored>) {
        let sc = &self.score[l];
        let res = &self.resident[l];
        let weakest = res
            .iter()
            .map(|&e| (sc[e as usize], e))
            .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let best_out = (0..sc.len() as u16)
            .filter(|e| !res.contains(e) && sc[*e as usize] > 0.0)
            .map(|e| (sc[e as usize], e))
            .max_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)));
        (weakest, best_out)
    }

    fn rebalance(&mut self) {
        let layers = self.cap.len();
        let moves = (self.cap.iter().sum::<usize>() / layers.max(1) / 8).max(1) * layers;
        let mut ext: Vec<_> = (0..layers).map(|l| self.extremes(l)).collect();
        for _ in 0..moves {
            let gain = (0..layers)
                .filter_map(|l| ext[l].1.map(|b| (b.0, l)))
                .max_by(|a, b| a.0.total_cmp(&b.0));
            // A layer's cheapest slot: an idle one costs nothing, else its weakest resident.
            let lose = (0..layers)
                .filter(|&l| self.cap[l] > self.floor)
                .map(|l| {
                    let idle = self.resident[l].len() < self.cap[l];
                    (
                        if idle {
                            0.0
                        } else {
                            ext[l].0.map_or(0.0, |w| w.0)
                        },
                        l,
                    )
                })
                .min_by(|a, b| a.0.total_cmp(&b.0));
            let (Some((g_score, g)), Some((l_score, l))) = (gain, lose) else {
                break;
            };
            if g == l || g_score <= 1.25 * l_score {
                break;
            }
            if self.resident[l].len() == self.cap[l]
                && let Some((_, victim)) = ext[l].0
            {
                self.resident[l].retain(|&e| e != victim);
            }
            self.cap[l] -= 1;
            if let Some((_, e)) = ext[g].1 {
                self.resident[g].push(e);
            }
            self.cap[g] += 1;
            self.moved = true;
            ext[l] = self.extremes(l);
            ext[g] = self.extremes(g);
        }
    }

    /// Seed the counts from a usage profile (`--expert-profile`): the slots start hot.
    pub fn warm_start(&mut self, profile: &[Vec<u64>]) {
        for (l, row) in profile.iter().enumerate().take(self.cap.len()) {
            let total = row.iter().fold(0u64, |a, &c| a.saturating_add(c)).max(1);
            let mut idx: Vec<usize> = (0..row.len()).collect();
            idx.sort_by(|&a, &b| row[b].cmp(&row[a]).then(a.cmp(&b)));
            for (e, &c) in row.iter().enumerate() {
                // Normalised so a profile counts like a few hundred recent selections.
                self.score[l][e] = 256.0 * c as f64 / total as f64 * self.scale;
            }
            self.resident[l] = idx
                .iter()
                .take(self.cap[l])
                .filter(|&&e| row[e] > 0)
                .map(|&e| e as u16)
                .collect();
        }
    }
}

impl Policy for Adaptive {
    fn name(&self) -> &'static str {
        "adaptive (decayed frequency + admission)"
    }

    fn access(&mut self, a: Access) -> bool {
        // Lazy decay: instead of shrinking every count, new increments grow.
        self.scale *= self.growth;
        if self.scale > 1e200 {
            for row in &mut self.score {
                row.iter_mut().for_each(|v| *v /= self.scale);
            }
            self.scale = 1.0;
        }
        let (l, e) = (a.layer as usize, a.expert);
        self.score[l][e as usize] += self.scale;
        if self.period > 0 {
            self.since += 1;
            if self.since >= self.period {
                self.since = 0;
                self.rebalance();
            }
        }
        let cap = self.cap[l];
        let res = &mut self.resident[l];
        if res.contains(&e) {
            return true;
        }
        if cap == 0 {
            return false;
        }
        if res.len() < cap {
            res.push(e);
            return false;
        }
        let sc = &self.score[l];
        if let Some((vi, &victim)) = res
            .iter()
            .enumerate()
            .min_by(|x, y| sc[*x.1 as usize].total_cmp(&sc[*y.1 as usize]))
            && sc[e as usize] > sc[victim as usize]
        {
            res[vi] = e;
        }
        false
    }

    fn resident(&self, layer: usize) -> Vec<usize> {
        let mut v: Vec<usize> = self.resident[layer].iter().map(|&e| e as usize).collect();
        v.sort_unstable();
        v
    }

    fn take_moved(&mut self) -> bool {
        std::mem::take(&mut self.moved)
    }
}
