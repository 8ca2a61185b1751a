//! Manifold-constrained hyper-connections (mHC, spec §5.3) and the final HC head (§5.11).
//! The residual state of a token is `hc` copies of a D-vector, stored row-major [hc, D].

use super::traps::{Trap, Traps};
use crate::backend::cpu::hc;
use crate::model::weights::HcParams;

/// Mixing coefficients of one site for one token.
pub struct HcMix {
    /// Collapse weights (sigmoid + eps, not normalised).
    pub pre: Vec<f32>,
    /// Expansion weights (2 · sigmoid).
    pub post: Vec<f32>,
    /// Doubly-stochastic comb matrix C[i][k] (row-major hc x hc), i = source copy.
    pub comb: Vec<f32>,
}

/// Compute the site's coefficients from the token's state `x` [hc, D].
pub fn mix(
    p: &HcParams,
    x: &[f32],
    hc: usize,
    iters: usize,
    norm_eps: f32,
    hc_eps: f32,
    traps: &Traps,
) -> HcMix {
    let c = hc::coefficients(&p.fn_, &p.base, &p.scale, x, hc, iters, norm_eps, hc_eps);
    let mut pre = c[..hc].to_vec();
    if traps.has(Trap::PreNormalised) {
        let s: f32 = pre.iter().sum();
        pre.iter_mut().for_each(|v| *v /= s);
    }
    let mut post = c[hc..2 * hc].to_vec();
    if traps.has(Trap::PostNoDouble) {
        post.iter_mut().for_each(|v| *v *= 0.5);
    }
    let comb = c[2 * hc..].to_vec();
    HcMix { pre, post, comb }
}

/// u = Σ_i pre_i · X_i (the raw copies, not the RMS-normalised ones used for the mix).
pub fn collapse(pre: &[f32], x: &[f32], d: usize, norm_eps: f32, traps: &Traps) -> Vec<f32> {
    let rho = if traps.has(Trap::CollapseNormalised) {
        1.0 / (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32 + norm_eps).sqrt()
    } else {
        1.0
    };
    hc::collapse(pre, x, d, rho)
}

/// X'_k = post_k · f + Σ_i C[i][k] · X_i (comb applied transposed), in place.
pub fn expand(m: &HcMix, f: &[f32], x: &mut [f32], d: usize, traps: &Traps) {
    hc::expand(&m.post, &m.comb, f, x, d, traps.has(Trap::CombUntransposed))
}

/// Final HC head: h = Σ_i (sigmoid(m_i · scale + base_i) + eps) · X_i.
/// `eps` = (norm eps, hc eps).
pub fn head(
    fn_: &[f32],
    base: &[f32],
    scale: f32,
    x: &[f32],
    d: usize,
    eps: (f32, f32),
    traps: &Traps,
) -> Vec<f32> {
    let two = if traps.has(Trap::HcHeadTwoSigmoid) {
        2.0
    } else {
        1.0
    };
    let pre = hc::head_weights(fn_, base, scale, x, eps, two);
    hc::collapse(&pre, x, d, 1.0)
}
