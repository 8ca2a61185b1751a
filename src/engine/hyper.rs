//! Manifold-constrained hyper-connections (mHC, spec §5.3) and the final HC head (§5.11).
//! The residual state of a token is `hc` copies of a D-vector, stored row-major [hc, D].

use super::traps::{Trap, Traps};
use crate::backend::cpu::{dot, sigmoid};
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

/// m = (fn · v) · ρ with v the flattened state and ρ = 1/sqrt(mean(v²) + eps).
fn project(fn_: &[f32], v: &[f32], eps: f32) -> Vec<f32> {
    let rho = 1.0 / (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32 + eps).sqrt();
    fn_.chunks_exact(v.len())
        .map(|row| dot(row, v) * rho)
        .collect()
}

/// Sinkhorn–Knopp as the reference does it: row softmax + eps, a column normalisation,
/// then (iters - 1) x (row, column) normalisations, eps in every denominator.
pub fn sinkhorn(c: &mut [f32], hc: usize, iters: usize, eps: f32) {
    for i in 0..hc {
        let row = &mut c[i * hc..(i + 1) * hc];
        let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut s = 0.0;
        for v in row.iter_mut() {
            *v = (*v - m).exp();
            s += *v;
        }
        for v in row.iter_mut() {
            *v = *v / s + eps;
        }
    }
    let col_norm = |c: &mut [f32]| {
        for k in 0..hc {
            let s: f32 = (0..hc).map(|i| c[i * hc + k]).sum::<f32>() + eps;
            for i in 0..hc {
                c[i * hc + k] /= s;
            }
        }
    };
    col_norm(c);
    for _ in 1..iters {
        for i in 0..hc {
            let row = &mut c[i * hc..(i + 1) * hc];
            let s: f32 = row.iter().sum::<f32>() + eps;
            for v in row.iter_mut() {
                *v /= s;
            }
        }
        col_norm(c);
    }
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
    let m = project(&p.fn_, x, norm_eps);
    let mut pre: Vec<f32> = (0..hc)
        .map(|i| sigmoid(m[i] * p.scale[0] + p.base[i]) + hc_eps)
        .collect();
    if traps.has(Trap::PreNormalised) {
        let s: f32 = pre.iter().sum();
        pre.iter_mut().for_each(|v| *v /= s);
    }
    let two = if traps.has(Trap::PostNoDouble) {
        1.0
    } else {
        2.0
    };
    let post = (0..hc)
        .map(|i| two * sigmoid(m[hc + i] * p.scale[1] + p.base[hc + i]))
        .collect();
    let mut comb: Vec<f32> = (0..hc * hc)
        .map(|j| m[2 * hc + j] * p.scale[2] + p.base[2 * hc + j])
        .collect();
    sinkhorn(&mut comb, hc, iters, hc_eps);
    HcMix { pre, post, comb }
}

/// u = Σ_i pre_i · X_i (the raw copies, not the RMS-normalised ones used for the mix).
pub fn collapse(pre: &[f32], x: &[f32], d: usize, norm_eps: f32, traps: &Traps) -> Vec<f32> {
    let rho = if traps.has(Trap::CollapseNormalised) {
        1.0 / (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32 + norm_eps).sqrt()
    } else {
        1.0
    };
    let mut u = vec![0f32; d];
    for (i, w) in pre.iter().enumerate() {
        for (o, v) in u.iter_mut().zip(&x[i * d..(i + 1) * d]) {
            *o += w * rho * v;
        }
    }
    u
}

/// X'_k = post_k · f + Σ_i C[i][k] · X_i (comb applied transposed), in place.
pub fn expand(m: &HcMix, f: &[f32], x: &mut [f32], d: usize, traps: &Traps) {
    let hc = m.pre.len();
    let untransposed = traps.has(Trap::CombUntransposed);
    // Channel by channel: the hc old values of channel e are read before any is overwritten.
    let mut old = vec![0f32; hc];
    for e in 0..d {
        for (i, o) in old.iter_mut().enumerate() {
            *o = x[i * d + e];
        }
        for k in 0..hc {
            let mut s = m.post[k] * f[e];
            for (i, &xi) in old.iter().enumerate() {
                let c = if untransposed {
                    m.comb[k * hc + i]
                } else {
                    m.comb[i * hc + k]
                };
                s += c * xi;
            }
            x[k * d + e] = s;
        }
    }
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
    let m = project(fn_, x, eps.0);
    let two = if traps.has(Trap::HcHeadTwoSigmoid) {
        2.0
    } else {
        1.0
    };
    let pre: Vec<f32> = m
        .iter()
        .zip(base)
        .map(|(mi, b)| two * sigmoid(mi * scale + b) + eps.1)
        .collect();
    collapse(&pre, x, d, eps.0, &Traps::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinkhorn_is_doubly_stochastic_and_counts_steps() {
        let mut c: Vec<f32> = (0..16).map(|i| ((i * 7) % 5) as f32 * 0.3 - 0.5).collect();
        sinkhorn(&mut c, 4, 20, 1e-6);
        for k in 0..4 {
            let col: f32 = (0..4).map(|i| c[i * 4 + k]).sum();
            assert!((col - 1.0).abs() < 1e-5, "column {k} sums to {col}");
        }
        for i in 0..4 {
            let row: f32 = c[i * 4..i * 4 + 4].iter().sum();
            assert!((row - 1.0).abs() < 1e-3, "row {i} sums to {row}");
        }
        // One iteration: softmax rows (+eps) then one column normalisation, by hand for a
        // 2x2 of zeros: every entry 0.5 + eps, columns sum to 1 + 2eps, so entries are
        // (0.5 + eps) / (1 + 3eps).
        let mut z = vec![0f32; 4];
        sinkhorn(&mut z, 2, 1, 1e-3);
        assert!((z[0] - 0.501 / 1.003).abs() < 1e-6);
    }
}
