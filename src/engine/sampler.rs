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
        if c.repeat_penalty == 1.0 || history.is_empty() {
            return self.sample(logits);
        }
        let mut l = logits.to_vec();
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

    /// Pick the next token id.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let c = &self.cfg;
        if c.temperature <= 0.0 {
            return argmax(logits) as u32;
        }
        // Candidates sorted by logit, descending.
        let mut idx: Vec<usize> = (0..logits.len())
            .filter(|&i| logits[i].is_finite())
            .collect();
        if idx.is_empty() {
            return argmax(logits) as u32;
        }
        idx.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if c.top_k > 0 {
            idx.truncate(c.top_k);
        }
        let m = logits[idx[0]] as f64;
        let t = c.temperature as f64;
        let mut p: Vec<f64> = idx
            .iter()
            .map(|&i| ((logits[i] as f64 - m) / t).exp())
            .collect();
        let sum: f64 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= sum);
        // min-p relative to the most likely token.
        if c.min_p > 0.0 {
            let cut = p[0] * c.min_p as f64;
            let keep = p.iter().take_while(|&&x| x >= cut).count().max(1);
            p.truncate(keep);
        }
        // top-p: smallest prefix reaching p.
        if c.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = p.len();
            for (j, x) in p.iter().enumerate() {
                acc += x;
                if acc >= c.top_p as f64 {
                    keep = j + 1;
                    break;
                }
            }
            p.truncate(keep.max(1));
        }
        let total: f64 = p.iter().sum();
        let mut r = self.rng.next_f64() * total;
        for (j, x) in p.iter().enumerate() {
            r -= x;
            if r < 0.0 {
                return idx[j] as u32;
            }
        }
        idx[p.len() - 1] as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
