//! Studies of the expert cache's policies on routing traces: synthetic traces with
//! V4-Flash's measured skew, a policy's hit rate over a trace, and Belady's offline optimum
//! (the bound the policies are compared with).

use dsflash::backend::expert_cache::{Access, Policy, Trace};
use dsflash::model::synth::SplitMix64;
use std::collections::HashMap;

/// Hits of the offline optimum with `capacity` slots per layer: on a miss with full slots,
/// whichever of the residents and the newcomer is next used farthest in the future is left
/// out (Belady's MIN, with the option not to admit).
pub fn belady(trace: &Trace, capacity: usize) -> u64 {
    if capacity == 0 {
        return 0;
    }
    let n = trace.accesses.len();
    // next[i]: index of the next access to the same (layer, expert), or n.
    let mut next = vec![n; n];
    let mut seen: HashMap<Access, usize> = HashMap::new();
    for i in (0..n).rev() {
        let a = trace.accesses[i];
        if let Some(&j) = seen.get(&a) {
            next[i] = j;
        }
        seen.insert(a, i);
    }
    // Per layer: resident expert -> its next use.
    let mut res: Vec<HashMap<u16, usize>> = vec![HashMap::new(); trace.layers];
    let mut hits = 0;
    for (i, a) in trace.accesses.iter().enumerate() {
        let r = &mut res[a.layer as usize];
        if let Some(t) = r.get_mut(&a.expert) {
            hits += 1;
            *t = next[i];
            continue;
        }
        if r.len() < capacity {
            r.insert(a.expert, next[i]);
            continue;
        }
        if let Some((&far, &far_next)) = r.iter().max_by_key(|(e, t)| (**t, **e))
            && far_next > next[i]
        {
            r.remove(&far);
            r.insert(a.expert, next[i]);
        }
    }
    hits
}

/// Hits of the offline optimum with `total` slots shared by all layers (any split): the
/// bound for policies that move slots between layers.
pub fn belady_pooled(trace: &Trace, total: usize) -> u64 {
    let pooled = Trace {
        layers: 1,
        experts: trace.layers * trace.experts,
        accesses: trace
            .accesses
            .iter()
            .map(|a| Access {
                layer: 0,
                expert: (a.layer as usize * trace.experts + a.expert as usize) as u16,
            })
            .collect(),
    };
    belady(&pooled, total)
}

/// Hit rate of `p` over `trace`.
pub fn hit_rate(p: &mut dyn Policy, trace: &Trace) -> f64 {
    let hits = trace.accesses.iter().filter(|&&a| p.access(a)).count();
    hits as f64 / trace.accesses.len().max(1) as f64
}

/// A synthetic trace with V4-Flash's measured skew: per layer a Zipf popularity whose top
/// 12.5 % take ~58 % of selections (`expert_popularity`), `k` distinct
/// experts per token, and `topics` segments whose hot sets differ (half of each layer's top
/// quarter is re-drawn per topic).
pub fn skewed_trace(
    popularity: &[f64],
    layers: usize,
    k: usize,
    tokens: usize,
    topics: usize,
    seed: u64,
) -> Trace {
    let pops = vec![popularity.to_vec(); layers];
    skewed_trace_per_layer(&pops, k, tokens, topics, seed)
}

/// [`skewed_trace`] with a popularity of its own for each layer (layers that differ in how
/// concentrated their selections are).
pub fn skewed_trace_per_layer(
    popularity: &[Vec<f64>],
    k: usize,
    tokens: usize,
    topics: usize,
    seed: u64,
) -> Trace {
    let layers = popularity.len();
    let experts = popularity.first().map_or(0, |p| p.len());
    let mut rng = SplitMix64::new(seed);
    let cdfs: Vec<Vec<f64>> = popularity
        .iter()
        .map(|p| {
            let mut acc = 0.0;
            p.iter()
                .map(|v| {
                    acc += v;
                    acc
                })
                .collect()
        })
        .collect();
    let shuffle = |rng: &mut SplitMix64, v: &mut Vec<u16>| {
        for i in (1..v.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    };
    // Per layer: a base rank -> expert map; per topic, half of the top quarter re-drawn.
    let base: Vec<Vec<u16>> = (0..layers)
        .map(|_| {
            let mut v: Vec<u16> = (0..experts as u16).collect();
            shuffle(&mut rng, &mut v);
            v
        })
        .collect();
    let per_topic = tokens.div_ceil(topics.max(1));
    let mut accesses = Vec::with_capacity(tokens * layers * k);
    let mut maps = base.clone();
    for t in 0..tokens {
        if t % per_topic == 0 {
            maps = base.clone();
            for m in &mut maps {
                for r in 0..experts / 4 {
                    if rng.next_u64().is_multiple_of(2) {
                        let j = (rng.next_u64() % experts as u64) as usize;
                        m.swap(r, j);
                    }
                }
            }
        }
        for (l, m) in maps.iter().enumerate() {
            let mut chosen: Vec<u16> = Vec::with_capacity(k);
            let cdf = &cdfs[l];
            let total = cdf.last().copied().unwrap_or(0.0);
            while chosen.len() < k.min(experts) {
                let u = rng.next_f64() * total;
                let rank = cdf.partition_point(|&c| c < u).min(experts - 1);
                let e = m[rank];
                if !chosen.contains(&e) {
                    chosen.push(e);
                }
            }
            accesses.extend(chosen.into_iter().map(|e| Access {
                layer: l as u16,
                expert: e,
            }));
        }
    }
    Trace {
        layers,
        experts,
        accesses,
    }
}
