//! Hyper-connection arithmetic (the kernels behind spec §5.3 and §5.11): the RMS-scaled
//! projection of a token's hc copies, the site coefficients with Sinkhorn, collapse and
//! expansion. The residual of a token is `hc` copies of a D-vector, row-major [hc, D];
//! coefficients are laid out [pre hc | post hc | comb hc·hc] (comb row = source copy).

use super::{dot_rows, sigmoid};

/// m = (fn · v) · ρ with v the flattened state and ρ = 1/sqrt(mean(v²) + eps).
pub fn project(fn_: &[f32], v: &[f32], eps: f32) -> Vec<f32> {
    let mut m = vec![0f32; fn_.len() / v.len().max(1)];
    // The norm's sum (one serial chain) alongside the rows' dot products.
    let (ss, ()) = rayon::join(
        || v.iter().map(|x| x * x).sum::<f32>(),
        || dot_rows(fn_, v, &mut m),
    );
    let rho = 1.0 / (ss / v.len() as f32 + eps).sqrt();
    m.iter_mut().for_each(|x| *x *= rho);
    m
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

/// A site's coefficients for one token's state `x` [hc, D]: pre = σ(m_i·s0 + b_i) + eps,
/// post = 2σ(m_{hc+i}·s1 + b_{hc+i}), comb = Sinkhorn(m_{2hc+j}·s2 + b_{2hc+j}).
#[allow(clippy::too_many_arguments)] // the site's three parameter tensors, shape and eps
pub fn coefficients(
    fn_: &[f32],
    base: &[f32],
    scale: &[f32],
    x: &[f32],
    hc: usize,
    iters: usize,
    norm_eps: f32,
    hc_eps: f32,
) -> Vec<f32> {
    let m = project(fn_, x, norm_eps);
    let mut c = vec![0f32; 2 * hc + hc * hc];
    for i in 0..hc {
        c[i] = sigmoid(m[i] * scale[0] + base[i]) + hc_eps;
        c[hc + i] = 2.0 * sigmoid(m[hc + i] * scale[1] + base[hc + i]);
    }
    for j in 0..hc * hc {
        c[2 * hc + j] = m[2 * hc + j] * scale[2] + base[2 * hc + j];
    }
    sinkhorn(&mut c[2 * hc..], hc, iters, hc_eps);
    c
}

/// The HC head's collapse weights: two·σ(m_i·scale + b_i) + eps (two = 1 in the model).
pub fn head_weights(
    fn_: &[f32],
    base: &[f32],
    scale: f32,
    x: &[f32],
    (norm_eps, hc_eps): (f32, f32),
    two: f32,
) -> Vec<f32> {
    project(fn_, x, norm_eps)
        .iter()
        .zip(base)
        .map(|(mi, b)| two * sigmoid(mi * scale + b) + hc_eps)
        .collect()
}

/// u = Σ_i w_i · ρ · X_i.
pub fn collapse(w: &[f32], x: &[f32], d: usize, rho: f32) -> Vec<f32> {
    let mut u = vec![0f32; d];
    for (i, wi) in w.iter().enumerate() {
        for (o, v) in u.iter_mut().zip(&x[i * d..(i + 1) * d]) {
            *o += wi * rho * v;
        }
    }
    u
}

/// X'_k = post_k · f + Σ_i C[i][k] · X_i (comb applied transposed; `untransposed` reads
/// C[k][i] instead), in place.
pub fn expand(post: &[f32], comb: &[f32], f: &[f32], x: &mut [f32], d: usize, untransposed: bool) {
    let hc = post.len();
    // Channel by channel: the hc old values of channel e are read before any is overwritten.
    let mut old = vec![0f32; hc];
    for e in 0..d {
        for (i, o) in old.iter_mut().enumerate() {
            *o = x[i * d + e];
        }
        for k in 0..hc {
            let mut s = post[k] * f[e];
            for (i, &xi) in old.iter().enumerate() {
                let c = if untransposed {
                    comb[k * hc + i]
                } else {
                    comb[i * hc + k]
                };
                s += c * xi;
            }
            x[k * d + e] = s;
        }
    }
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

    #[test]
    fn expand_and_collapse_by_hand() {
        // hc 2, D 1: x = [1, 2], post = [0.5, 1], comb = [[0, 1], [1, 0]] (swap), f = 10.
        let mut x = vec![1.0, 2.0];
        expand(
            &[0.5, 1.0],
            &[0.0, 1.0, 1.0, 0.0],
            &[10.0],
            &mut x,
            1,
            false,
        );
        assert_eq!(x, vec![5.0 + 2.0, 10.0 + 1.0]);
        assert_eq!(collapse(&[0.25, 0.5], &[4.0, 8.0], 1, 1.0), vec![5.0]);
    }
}
