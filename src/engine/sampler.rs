//! Choosing the next token from logits: greedy at temperature 0, otherwise softmax(logits/T)
//! restricted by top-k, top-p and min-p, drawn with a seeded generator (reproducible).

use crate::model::synth::SplitMix64 as Rng;

/// Sampling settings. Defaults follow the model card (spec §8.3): temperature 1.0, top-p 1.0.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerConfig {
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1.0 = off).
    pub top_p: f32,
    /// Drop tokens below min_p times the top probability (0 = off).
    pub min_p: f32,
    /// Repetition penalty on tokens already seen (1 = off, the default): a seen token's
    /// positive logit is divided by it, a negative one multiplied.
    pub repeat_penalty: f32,
    /// How many of the latest tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
    /// Added to the logits of these ids before anything else (OpenAI's `logit_bias`; -100
    /// bans a token, +100 all but forces it).
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 256,
            seed: 0,
            logit_bias: Vec::new(),
        }
    }
}

pub struct Sampler {
    cfg: SamplerConfig,
    rng: Rng,
}

pub use crate::backend::cpu::argmax;

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Sampler {
        let rng = Rng::new(cfg.seed);
        Sampler { cfg, rng }
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// Pick the next token id, given the tokens so far (for the repetition penalty).
    pub fn sample_after(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let c = &self.cfg;
        if (c.repeat_penalty == 1.0 || history.is_empty()) && c.logit_bias.is_empty() {
            return self.sample(logits);
        }
        let mut l = logits.to_vec();
        for &(t, b) in &c.logit_bias {
            if let Some(v) = l.get_mut(t as usize) {
                *v += b;
            }
        }
        let history = if c.repeat_penalty == 1.0 {
            &[][..]
        } else {
            history
        };
        let mut seen = std::collections::HashSet::new();
        for &t in history.iter().rev().take(c.repeat_last_n) {
            if seen.insert(t)
                && let Some(v) = l.get_mut(t as usize)
            {
                *v = if *v > 0.0 {
                    *v / c.repeat_penalty
                } else {
                    *v * c.repeat_penalty
                };
            }
        }
        self.sample(&l)
    }

    /// Pick the next token id. The filters keep a set of candidates (top-k: the k highest
    /// logits, ties by id; min-p; top-p: the smallest set of the highest reaching p) and the
    /// draw walks that set in id order. Only top-k and top-p need the candidates ranked, and
    /// only as far as they reach: no sort of the whole vocabulary per token.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let c = &self.cfg;
        if c.temperature <= 0.0 {
            return argmax(logits) as u32;
        }
        // Ascending ids throughout.
        let mut kept: Vec<usize> = (0..logits.len())
            .filter(|&i| logits[i].is_finite())
            .collect();
        if kept.is_empty() {
            return argmax(logits) as u32;
        }
        if c.top_k > 0 && c.top_k < kept.len() {
            let mut r = Ranked::new(logits, kept);
            r.truncate(c.top_k);
            kept = r.into_ids();
        }
        let m = kept
            .iter()
            .map(|&i| logits[i])
            .fold(f32::NEG_INFINITY, f32::max) as f64;
        let t = c.temperature as f64;
        // Unnormalised probability: 1 for the most likely candidate.
        let w = |i: usize| ((logits[i] as f64 - m) / t).exp();
        if c.min_p > 0.0 {
            // Relative to the most likely token (w = 1), which always stays.
            let cut = (c.min_p as f64).min(1.0);
            kept.retain(|&i| w(i) >= cut);
        }
        if c.top_p < 1.0 {
            let total: f64 = kept.iter().map(|&i| w(i)).sum();
            let mut r = Ranked::new(logits, kept);
            let (mut acc, mut keep) = (0.0, r.len());
            for j in 0..r.len() {
                acc += w(r.at(j)) / total;
                if acc >= c.top_p as f64 {
                    keep = j + 1;
                    break;
                }
            }
            r.truncate(keep);
            kept = r.into_ids();
        }
        let ws: Vec<f64> = kept.iter().map(|&i| w(i)).collect();
        let mut r = self.rng.next_f64() * ws.iter().sum::<f64>();
        for (&i, &wi) in kept.iter().zip(&ws) {
            r -= wi;
            if r < 0.0 {
                return i as u32;
            }
        }
        kept[kept.len() - 1] as u32
    }
}

/// Candidate ids in descending logit order (ties by id: a total order, so each prefix is the
/// one a full sort gives), sorted only as far as asked: the first `sorted` ids are in order
/// and every later one ranks below them.
struct Ranked<'a> {
    logits: &'a [f32],
    idx: Vec<usize>,
    sorted: usize,
}

impl<'a> Ranked<'a> {
    fn new(logits: &'a [f32], idx: Vec<usize>) -> Self {
        Ranked {
            logits,
            idx,
            sorted: 0,
        }
    }

    fn len(&self) -> usize {
        self.idx.len()
    }

    /// Orders the first `k` (capped at the length).
    fn sort_to(&mut self, k: usize) {
        let k = k.min(self.idx.len());
        if k <= self.sorted {
            return;
        }
        let (logits, s) = (self.logits, self.sorted);
        let cmp = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
        let rest = &mut self.idx[s..];
        if k - s < rest.len() {
            rest.select_nth_unstable_by(k - s - 1, cmp);
        }
        rest[..k - s].sort_unstable_by(cmp);
        self.sorted = k;
    }

    /// Keeps the `k` highest.
    fn truncate(&mut self, k: usize) {
        if k < self.idx.len() {
            self.sort_to(k);
            self.idx.truncate(k);
        }
    }

    /// The candidate at rank `j`, extending the sorted prefix by doubling when needed.
    fn at(&mut self, j: usize) -> usize {
        if j >= self.sorted {
            self.sort_to((2 * self.sorted).max(j + 1).max(64));
        }
        self.idx[j]
    }

    /// The ids, ascending.
    fn into_ids(mut self) -> Vec<usize> {
        self.idx.sort_unstable();
        self.idx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logit_bias_moves_greedy_and_sampled_picks() {
        let logits = [1.0, 2.0, 3.0];
        let pick = |bias: Vec<(u32, f32)>, t: f32| {
            let mut s = Sampler::new(SamplerConfig {
                temperature: t,
                logit_bias: bias,
                seed: 7,
                ..Default::default()
            });
            s.sample_after(&logits, &[])
        };
        assert_eq!(pick(vec![], 0.0), 2);
        assert_eq!(pick(vec![(0, 100.0)], 0.0), 0);
        assert_eq!(pick(vec![(2, -100.0)], 0.0), 1);
        // Out-of-vocabulary ids are ignored; +100 on a token makes the others' weight
        // e^-98 or less: sampling picks it.
        assert_eq!(pick(vec![(9, 100.0), (1, 100.0)], 1.0), 1);
    }

    #[test]
    fn greedy_and_filters() {
        let logits = [1.0, 3.0, 2.0, f32::NEG_INFINITY];
        let mut s = Sampler::new(SamplerConfig {
            temperature: 0.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&logits), 1);
        // top-k 1 is greedy whatever the temperature.
        let mut s = Sampler::new(SamplerConfig {
            top_k: 1,
            ..Default::default()
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&logits), 1);
        }
        // min-p 0.5: p = softmax(1,3,2) = (0.090, 0.665, 0.245); 0.245 < 0.33 -> only id 1.
        let mut s = Sampler::new(SamplerConfig {
            min_p: 0.5,
            ..Default::default()
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&logits), 1);
        }
        // top-p 0.8: 0.665 < 0.8 so ids 1 and 2 stay, id 0 never appears.
        let mut s = Sampler::new(SamplerConfig {
            top_p: 0.8,
            seed: 3,
            ..Default::default()
        });
        let draws: Vec<u32> = (0..200).map(|_| s.sample(&logits)).collect();
        assert!(draws.contains(&1) && draws.contains(&2) && !draws.contains(&0));
    }

    #[test]
    fn repeat_penalty_is_off_by_default_and_penalises_seen_tokens() {
        let logits = [2.0f32, 1.9, -1.0];
        let mut s = Sampler::new(SamplerConfig {
            temperature: 0.0,
            ..Default::default()
        });
        assert_eq!(
            s.sample_after(&logits, &[0, 0, 0]),
            0,
            "default 1.0: no penalty"
        );
        let mut s = Sampler::new(SamplerConfig {
            temperature: 0.0,
            repeat_penalty: 1.1,
            ..Default::default()
        });
        // 2.0 / 1.1 = 1.818 < 1.9: token 1 wins once token 0 was seen.
        assert_eq!(s.sample_after(&logits, &[0]), 1);
        assert_eq!(s.sample_after(&logits, &[2]), 0);
    }

    #[test]
    fn frequencies_follow_softmax_and_seed_reproduces() {
        let logits = [0.0f32, 1.0f32.ln() + 0.0, 2f32.ln()]; // probabilities 1:1:2
        let mut s = Sampler::new(SamplerConfig {
            seed: 42,
            ..Default::default()
        });
        let n = 20_000;
        let mut counts = [0usize; 3];
        for _ in 0..n {
            counts[s.sample(&logits) as usize] += 1;
        }
        let f2 = counts[2] as f64 / n as f64;
        assert!((f2 - 0.5).abs() < 0.02, "{counts:?}");
        let a: Vec<u32> = {
            let mut s = Sampler::new(SamplerConfig {
                seed: 7,
                ..Default::default()
            });
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(SamplerConfig {
                seed: 7,
                ..Default::default()
            });
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
    }

    /// What `sample` must pick for the uniform number `u`, from a full sort of the
    /// vocabulary: candidates by descending logit (ties by id), top-k, min-p, top-p, then the
    /// draw over the kept ids in id order.
    fn full_sort_pick(logits: &[f32], c: &SamplerConfig, u: f64) -> u32 {
        let mut idx: Vec<usize> = (0..logits.len())
            .filter(|&i| logits[i].is_finite())
            .collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if c.top_k > 0 {
            idx.truncate(c.top_k);
        }
        let m = logits[idx[0]] as f64;
        let w = |i: usize| ((logits[i] as f64 - m) / c.temperature as f64).exp();
        let mut keep = idx
            .iter()
            .take_while(|&&i| w(i) >= c.min_p as f64)
            .count()
            .max(1);
        if c.top_p < 1.0 {
            let total: f64 = idx[..keep].iter().map(|&i| w(i)).sum();
            let mut acc = 0.0;
            for (j, &i) in idx.iter().enumerate().take(keep) {
                acc += w(i) / total;
                if acc >= c.top_p as f64 {
                    keep = j + 1;
                    break;
                }
            }
        }
        let mut kept = idx[..keep].to_vec();
        kept.sort();
        let mut r = u * kept.iter().map(|&i| w(i)).sum::<f64>();
        for &i in &kept {
            r -= w(i);
            if r < 0.0 {
                return i as u32;
            }
        }
        kept[kept.len() - 1] as u32
    }

    #[test]
    fn partial_ranking_picks_what_a_full_sort_picks() {
        let mut g = Rng::new(11);
        for (n, levels) in [(5, 3), (200, 7), (5000, 40), (5000, 5000)] {
            // Few distinct values (many ties), some -inf, a peak or a flat spread.
            let logits: Vec<f32> = (0..n)
                .map(|_| match g.next_u64() % 50 {
                    0 => f32::NEG_INFINITY,
                    _ => (g.next_u64() % levels) as f32 * 0.05,
                })
                .collect();
            for (temperature, top_k, top_p, min_p) in [
                (1.0, 0, 1.0, 0.0),
                (0.7, 0, 0.9, 0.0),
                (1.3, 40, 1.0, 0.0),
                (1.0, 0, 1.0, 0.3),
                (0.5, 100, 0.8, 0.05),
                (2.0, 3000, 0.999, 0.0),
            ] {
                let c = SamplerConfig {
                    temperature,
                    top_k,
                    top_p,
                    min_p,
                    seed: 5,
                    ..Default::default()
                };
                let mut s = Sampler::new(c.clone());
                let mut u = Rng::new(5);
                for _ in 0..30 {
                    let want = full_sort_pick(&logits, &c, u.next_f64());
                    assert_eq!(s.sample(&logits), want, "n {n}, {c:?}");
                }
            }
        }
    }
}
