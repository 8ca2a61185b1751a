//! Small vector operations (fp32).

/// out = w ⊙ x / sqrt(mean(x²) + eps), in place.
pub fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    for (v, g) in x.iter_mut().zip(w) {
        *v = g * (*v * r);
    }
}

/// x / sqrt(mean(x²) + eps), in place (no weight).
pub fn rms_norm_unweighted(x: &mut [f32], eps: f32) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let r = 1.0 / (ms + eps).sqrt();
    for v in x.iter_mut() {
        *v *= r;
    }
}

/// Apply `rms_norm` to each row of a [rows, w.len()] matrix.
pub fn rms_norm_rows(x: &mut [f32], w: &[f32], eps: f32) {
    for row in x.chunks_mut(w.len()) {
        rms_norm(row, w, eps);
    }
}

#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// PyTorch's softplus (beta 1, threshold 20): x above 20 is returned as is.
#[inline]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 { x } else { x.exp().ln_1p() }
}

#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let n = a.len() / 8 * 8;
    for (ca, cb) in a[..n].chunks_exact(8).zip(b[..n].chunks_exact(8)) {
        for k in 0..8 {
            acc[k] += ca[k] * cb[k];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for i in n..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// y += a · x
#[inline]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (v, u) in y.iter_mut().zip(x) {
        *v += a * u;
    }
}

/// Indices of the `k` largest values, largest first; ties go to the lower index.
/// NaN counts as smallest.
pub fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    let key = |i: usize| {
        if values[i].is_nan() {
            f32::NEG_INFINITY
        } else {
            values[i]
        }
    };
    let k = k.min(values.len());
    let cmp = |a: &usize, b: &usize| key(*b).total_cmp(&key(*a)).then(a.cmp(b));
    if k < idx.len() && k > 0 {
        idx.select_nth_unstable_by(k - 1, cmp);
    }
    idx.truncate(k);
    idx.sort_by(cmp);
    idx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_and_breaks_ties_low_index() {
        assert_eq!(top_k(&[1.0, 5.0, 3.0, 5.0, -1.0], 3), vec![1, 3, 2]);
        assert_eq!(top_k(&[0.0, 0.0, 0.0], 2), vec![0, 1]);
        assert_eq!(top_k(&[f32::NAN, 1.0], 1), vec![1]);
        assert_eq!(top_k(&[2.0], 5), vec![0]);
    }

    #[test]
    fn norms_and_activations() {
        let mut x = vec![3.0, 4.0];
        rms_norm(&mut x, &[1.0, 2.0], 0.0);
        // rms = sqrt(12.5)
        let r = 12.5f32.sqrt();
        assert!((x[0] - 3.0 / r).abs() < 1e-6 && (x[1] - 8.0 / r).abs() < 1e-6);
        assert_eq!(softplus(30.0), 30.0);
        assert!((softplus(0.0) - 2f32.ln()).abs() < 1e-7);
        assert!((silu(1.0) - 0.731_058_6).abs() < 1e-6);
    }
}
