//! Rotary position embedding (spec §5.5): interleaved pairs (2j, 2j+1) on the trailing
//! `rope_dim` values of a vector, θ^(-2j/rope_dim) frequencies, optionally YaRN-scaled
//! (compressed layers) — with no mscale anywhere.

use crate::backend::cpu::rotate_pairs;
use crate::model::config::ModelConfig;

#[derive(Debug, Clone)]
pub struct Rope {
    /// One frequency per pair (rope_dim / 2).
    pub inv_freq: Vec<f32>,
    /// YaRN factor of this table, if scaled.
    pub yarn_factor: Option<f64>,
    variant: Variant,
}

/// Ways to get RoPE wrong (the spec's traps 1 and 2, set by `Engine::with_traps`); all false
/// is the spec's rotation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Variant {
    /// Rotate the leading rope_dim values instead of the trailing ones.
    pub leading_dims: bool,
    /// Pairs (j, j + rope_dim/2) instead of interleaved (2j, 2j+1).
    pub half_split: bool,
    /// YaRN's mscale applied to cos/sin.
    pub yarn_mscale: bool,
}

impl Rope {
    /// Plain RoPE: ω_j = θ^(-2j/d).
    pub fn plain(theta: f64, rope_dim: usize) -> Rope {
        let inv_freq = (0..rope_dim / 2)
            .map(|j| (1.0 / theta.powf((2 * j) as f64 / rope_dim as f64)) as f32)
            .collect();
        Rope {
            inv_freq,
            yarn_factor: None,
            variant: Variant::default(),
        }
    }

    /// YaRN: pairs below `low` keep ω, pairs above `high` use ω/factor, linear ramp between.
    pub fn yarn(
        theta: f64,
        rope_dim: usize,
        factor: f64,
        orig_len: f64,
        beta_fast: f64,
        beta_slow: f64,
    ) -> Rope {
        let d = rope_dim as f64;
        let corr = |n_rot: f64| {
            d * (orig_len / (n_rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
        };
        let low = corr(beta_fast).floor().max(0.0);
        let high = corr(beta_slow).ceil().min(d - 1.0);
        let high = if high == low { high + 0.001 } else { high };
        let inv_freq = (0..rope_dim / 2)
            .map(|j| {
                let w = 1.0 / theta.powf((2 * j) as f64 / d);
                let ramp = ((j as f64 - low) / (high - low)).clamp(0.0, 1.0);
                (w / factor * ramp + w * (1.0 - ramp)) as f32
            })
            .collect();
        Rope {
            inv_freq,
            yarn_factor: Some(factor),
            variant: Variant::default(),
        }
    }

    /// The table a layer uses: θ=rope_theta without YaRN for window-only layers (ratio 0),
    /// θ=compress_rope_theta with YaRN for compressed layers (spec §5.4, trap 2).
    pub fn for_ratio(cfg: &ModelConfig, ratio: usize) -> Rope {
        let rd = cfg.qk_rope_head_dim;
        if ratio == 0 {
            Rope::plain(cfg.rope_theta, rd)
        } else {
            let s = &cfg.rope_scaling;
            Rope::yarn(
                cfg.compress_rope_theta,
                rd,
                s.factor,
                s.original_max_position_embeddings as f64,
                s.beta_fast,
                s.beta_slow,
            )
        }
    }

    pub fn rope_dim(&self) -> usize {
        self.inv_freq.len() * 2
    }

    /// This table with a rotation that is not the spec's (a trap).
    pub fn with_variant(self, variant: Variant) -> Rope {
        Rope { variant, ..self }
    }

    /// Whether `apply` is the spec's rotation: what the device op runs.
    pub fn is_plain_formula(&self) -> bool {
        self.variant == Variant::default()
    }

    /// Rotate the trailing rope_dim values of `x` by +pos (or -pos when `inverse`).
    pub fn apply(&self, x: &mut [f32], pos: usize, inverse: bool) {
        let (rd, n, v) = (self.rope_dim(), x.len(), self.variant);
        let z = if v.leading_dims {
            &mut x[..rd]
        } else {
            &mut x[n - rd..]
        };
        let mscale = match self.yarn_factor {
            Some(f) if v.yarn_mscale => (0.1 * f.ln() + 1.0) as f32,
            _ => 1.0,
        };
        rotate_pairs(z, &self.inv_freq, pos, inverse, mscale, v.half_split);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yarn_band_matches_spec() {
        // Spec §5.5: θ 160000, factor 16, L 65536, β 32/1: low 15, high 25; pairs ≤ 15 keep
        // ω, pairs ≥ 25 divide by 16, j=16 by 1.103, j=20 by 1.882, j=24 by 6.4.
        let plain = Rope::plain(160000.0, 64);
        let y = Rope::yarn(160000.0, 64, 16.0, 65536.0, 32.0, 1.0);
        let ratio = |j: usize| plain.inv_freq[j] / y.inv_freq[j];
        assert!((ratio(15) - 1.0).abs() < 1e-6);
        assert!((ratio(25) - 16.0).abs() < 1e-4);
        assert!((ratio(31) - 16.0).abs() < 1e-4);
        assert!((ratio(16) - 1.103).abs() < 1e-3);
        assert!((ratio(20) - 1.882).abs() < 1e-3);
        assert!((ratio(24) - 6.4).abs() < 1e-3);
    }

    #[test]
    fn interleaved_pairs_on_trailing_dims() {
        // A 6-vector with rope_dim 4: the first two values are untouched; pair (2,3) turns by
        // p·ω_0 = p (ω_0 = 1).
        let r = Rope::plain(10000.0, 4);
        let mut x = vec![7.0, 8.0, 1.0, 0.0, 1.0, 0.0];
        r.apply(&mut x, 1, false);
        assert_eq!(&x[..2], &[7.0, 8.0]);
        assert!((x[2] - 1f32.cos()).abs() < 1e-6 && (x[3] - 1f32.sin()).abs() < 1e-6);
        r.apply(&mut x, 1, true);
        assert!((x[2] - 1.0).abs() < 1e-6 && x[3].abs() < 1e-6);
    }
}
