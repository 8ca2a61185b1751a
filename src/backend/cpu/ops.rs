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
    lane_sum(&acc, a, b)
}

/// [`dot`]'s last step, shared with [`dots_by`] so both give the same bits: the eight lane
/// sums `acc` paired as a tree, then the columns past the last full 8 (`a` and `b` the same
/// length).
#[inline(always)]
fn lane_sum(acc: &[f32; 8], a: &[f32], b: &[f32]) -> f32 {
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for i in a.len() / 8 * 8..a.len() {
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

/// One query head against its keys (which are also the values) with a sink logit that only
/// enlarges the softmax denominator (spec §5.8): out = Σ_i softmax_i(q·K_i·scale; sink) K_i.
/// `logits` is scratch.
pub fn attend_sink(
    q: &[f32],
    keys: &[&[f32]],
    sink: f32,
    scale: f32,
    logits: &mut Vec<f32>,
    out: &mut [f32],
) {
    logits.clear();
    let mut m = sink.max(f32::MIN);
    for key in keys {
        let lg = dot(q, key) * scale;
        m = m.max(lg);
        logits.push(lg);
    }
    let mut den = (sink - m).exp();
    for lg in logits.iter_mut() {
        *lg = (*lg - m).exp();
        den += *lg;
    }
    out.fill(0.0);
    for (a, key) in logits.iter().zip(keys) {
        let a = a / den;
        for (o, v) in out.iter_mut().zip(key.iter()) {
            *o += a * v;
        }
    }
}

/// Heads per pass of [`attend_sink_heads`] and [`indexer_scores`]: each key (row) is read once
/// per this many dot products, and their independent sums overlap in the pipeline.
const HEADS: usize = 8;

/// [`dot`] of several vectors with one `k`, each summed exactly as [`dot`] sums it (the same
/// eight lanes in the same order, products then sums): the same bits as `N` calls.
#[inline(always)]
fn dots_by<const N: usize>(qs: &[&[f32]; N], k: &[f32]) -> [f32; N] {
    assert!(qs.iter().all(|q| q.len() == k.len()), "dot lengths");
    #[cfg(target_arch = "x86_64")]
    let acc = if super::has_x86!("avx") {
        // SAFETY: the CPU has AVX; every q is as long as k (asserted).
        unsafe { lanes_avx(qs, k) }
    } else {
        lanes(qs, k)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let acc = lanes(qs, k);
    std::array::from_fn(|i| lane_sum(&acc[i], qs[i], k))
}

/// The eight lane sums of [`dot`] for each q: lane l = Σ_c q[8c + l]·k[8c + l], products
/// then sums, in c order.
#[inline(always)]
fn lanes<const N: usize>(qs: &[&[f32]; N], k: &[f32]) -> [[f32; 8]; N] {
    let mut acc = [[0f32; 8]; N];
    for (c, kk) in k.chunks_exact(8).enumerate() {
        for (a, q) in acc.iter_mut().zip(qs) {
            for l in 0..8 {
                a[l] += q[8 * c + l] * kk[l];
            }
        }
    }
    acc
}

/// [`lanes`] in 256-bit registers (the same multiplies and adds, lane for lane).
///
/// # Safety
/// Needs AVX; every q at least as long as k.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx")]
unsafe fn lanes_avx<const N: usize>(qs: &[&[f32]; N], k: &[f32]) -> [[f32; 8]; N] {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); N];
    for c in 0..k.len() / 8 {
        // SAFETY: 8c + 8 <= k.len() <= every q's length.
        unsafe {
            let kv = _mm256_loadu_ps(k.as_ptr().add(8 * c));
            for (a, q) in acc.iter_mut().zip(qs) {
                let p = _mm256_mul_ps(_mm256_loadu_ps(q.as_ptr().add(8 * c)), kv);
                *a = _mm256_add_ps(*a, p);
            }
        }
    }
    acc.map(|a| {
        let mut o = [0f32; 8];
        // SAFETY: o holds 8 floats.
        unsafe { _mm256_storeu_ps(o.as_mut_ptr(), a) };
        o
    })
}

/// out[i] = [`dot`](row i of `m`, v) for `m` [out.len(), v.len()], each with the bits [`dot`]
/// gives it: eight rows per pass over `v`, blocks of rows in parallel (a decode step's
/// matvecs on fp32 weights, e.g. the hyper-connection projections: 24 rows of 16384).
pub fn dot_rows(m: &[f32], v: &[f32], out: &mut [f32]) {
    use rayon::prelude::*;
    let n = v.len();
    assert_eq!(m.len(), out.len() * n, "dot_rows shapes");
    out.par_chunks_mut(HEADS)
        .zip(m.par_chunks(HEADS * n))
        .for_each(|(o, mb)| {
            if o.len() == HEADS {
                let rows: [&[f32]; HEADS] = std::array::from_fn(|i| &mb[i * n..(i + 1) * n]);
                o.copy_from_slice(&dots_by(&rows, v));
            } else {
                for (oi, row) in o.iter_mut().zip(mb.chunks_exact(n)) {
                    *oi = dot(row, v);
                }
            }
        });
}

/// [`attend_sink`] for every head of `q` [heads, hd] over the same keys (`sinks` [heads], out
/// [heads, hd]). Each head's output has the same bits as [`attend_sink`] gives it alone; the
/// keys are read once per [`HEADS`] heads instead of once per head (decode attention reads
/// hundreds of keys for each of 64 heads).
pub fn attend_sink_heads(
    q: &[f32],
    keys: &[&[f32]],
    sinks: &[f32],
    scale: f32,
    logits: &mut Vec<f32>,
    out: &mut [f32],
) {
    let hd = q.len() / sinks.len().max(1);
    let blocks = q.chunks(HEADS * hd).zip(out.chunks_mut(HEADS * hd));
    for ((qb, ob), sb) in blocks.zip(sinks.chunks(HEADS)) {
        if sb.len() == HEADS {
            #[cfg(target_arch = "x86_64")]
            if super::has_x86!("avx2") {
                // SAFETY: the CPU has AVX2.
                unsafe { attend_block_avx2(qb, keys, sb, scale, logits, ob) };
                continue;
            }
            attend_block::<HEADS>(qb, keys, sb, scale, logits, ob);
        } else {
            for ((qh, oh), &sink) in qb.chunks(hd).zip(ob.chunks_mut(hd)).zip(sb) {
                attend_sink(qh, keys, sink, scale, logits, oh);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_block_avx2(
    q: &[f32],
    keys: &[&[f32]],
    sinks: &[f32],
    scale: f32,
    logits: &mut Vec<f32>,
    out: &mut [f32],
) {
    attend_block::<HEADS>(q, keys, sinks, scale, logits, out)
}

/// `N` heads of [`attend_sink_heads`]: each step as [`attend_sink`] does it per head, key by
/// key (logits [keys, N]).
#[inline(always)]
fn attend_block<const N: usize>(
    q: &[f32],
    keys: &[&[f32]],
    sinks: &[f32],
    scale: f32,
    logits: &mut Vec<f32>,
    out: &mut [f32],
) {
    let hd = q.len() / N;
    let qs: [&[f32]; N] = std::array::from_fn(|h| &q[h * hd..(h + 1) * hd]);
    logits.clear();
    logits.resize(keys.len() * N, 0.0);
    for (lg, key) in logits.chunks_exact_mut(N).zip(keys) {
        for (l, d) in lg.iter_mut().zip(dots_by(&qs, key)) {
            *l = d * scale;
        }
    }
    let mut den = [0f32; N];
    for (h, dn) in den.iter_mut().enumerate() {
        let mut m = sinks[h].max(f32::MIN);
        for lg in logits.chunks_exact(N) {
            m = m.max(lg[h]);
        }
        *dn = (sinks[h] - m).exp();
        for lg in logits.chunks_exact_mut(N) {
            lg[h] = (lg[h] - m).exp();
            *dn += lg[h];
        }
    }
    out.fill(0.0);
    for (lg, key) in logits.chunks_exact(N).zip(keys) {
        for ((oh, &e), &dn) in out.chunks_exact_mut(hd).zip(lg).zip(&den) {
            let a = e / dn;
            for (o, v) in oh.iter_mut().zip(key.iter()) {
                *o += a * v;
            }
        }
    }
}

/// [`indexer_score`] of rows `first..first + out.len()` (`row(i)` gives row i) into `out`:
/// each the same bits as [`indexer_score`] gives it, the head dot products [`HEADS`] at a
/// time over each row.
pub fn indexer_scores<'a>(
    q: &[f32],
    w: &[f32],
    row: impl Fn(usize) -> &'a [f32],
    first: usize,
    ihd: usize,
    relu_after: bool,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if super::has_x86!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { indexer_scores_avx2(q, w, &row, first, ihd, relu_after, out) };
    }
    indexer_scores_by(q, w, &row, first, ihd, relu_after, out)
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)] // indexer_scores' arguments
#[target_feature(enable = "avx2")]
unsafe fn indexer_scores_avx2<'a>(
    q: &[f32],
    w: &[f32],
    row: &dyn Fn(usize) -> &'a [f32],
    first: usize,
    ihd: usize,
    relu_after: bool,
    out: &mut [f32],
) {
    indexer_scores_by(q, w, row, first, ihd, relu_after, out)
}

#[inline(always)]
fn indexer_scores_by<'a>(
    q: &[f32],
    w: &[f32],
    row: &dyn Fn(usize) -> &'a [f32],
    first: usize,
    ihd: usize,
    relu_after: bool,
    out: &mut [f32],
) {
    if !w.len().is_multiple_of(HEADS) {
        for (i, o) in out.iter_mut().enumerate() {
            *o = indexer_score(q, w, row(first + i), ihd, relu_after);
        }
        return;
    }
    let qs: Vec<[&[f32]; HEADS]> = q
        .chunks(HEADS * ihd)
        .map(|b| std::array::from_fn(|h| &b[h * ihd..(h + 1) * ihd]))
        .collect();
    let mut terms = vec![0f32; w.len()];
    for (i, o) in out.iter_mut().enumerate() {
        let k = row(first + i);
        for (tb, qb) in terms.chunks_exact_mut(HEADS).zip(&qs) {
            tb.copy_from_slice(&dots_by(qb, k));
        }
        // The sum exactly as indexer_score forms it: in head order, from an f32 `sum`.
        let s: f32 = terms
            .iter()
            .zip(w)
            .map(|(&d, wh)| if relu_after { wh * d } else { wh * d.max(0.0) })
            .sum();
        *o = if relu_after { s.max(0.0) } else { s };
    }
}

/// Lightning-indexer score of one compressed row `k` for a query's heads `q` [IH, ihd] with
/// head weights `w` [IH]: Σ_h w_h · ReLU(q_h · k) (`relu_after`: ReLU of the sum instead).
pub fn indexer_score(q: &[f32], w: &[f32], k: &[f32], ihd: usize, relu_after: bool) -> f32 {
    let s: f32 = q
        .chunks_exact(ihd)
        .zip(w)
        .map(|(qh, wh)| {
            if relu_after {
                wh * dot(qh, k)
            } else {
                wh * dot(qh, k).max(0.0)
            }
        })
        .sum();
    if relu_after { s.max(0.0) } else { s }
}

/// One compressor window pooled (spec §5.6): per channel e < d, a softmax over the slots'
/// gates weights their values. The slots are the previous window's kept halves (`prev`:
/// values and gates [r, d]) when given, else `zero_slots` slots of gate and value 0 (fault
/// injection), then the current window's rows (`cur`: values and gates [r, cd], the half
/// starting at column `off`).
#[allow(clippy::too_many_arguments)] // two slot sources, their shapes and the half offset
pub fn gated_pool(
    prev: Option<(&[f32], &[f32])>,
    zero_slots: usize,
    cur: (&[f32], &[f32]),
    r: usize,
    d: usize,
    cd: usize,
    off: usize,
    out: &mut [f32],
) {
    let (cur_kv, cur_gate) = cur;
    for (e, o) in out.iter_mut().enumerate().take(d) {
        let gate = |t: usize| cur_gate[t * cd + off + e];
        let mut m = (0..r).map(gate).fold(f32::NEG_INFINITY, f32::max);
        if let Some((_, pg)) = prev {
            m = (0..r).map(|t| pg[t * d + e]).fold(m, f32::max);
        } else if zero_slots > 0 {
            m = m.max(0.0);
        }
        let (mut den, mut num) = (0f32, 0f32);
        if let Some((pv, pg)) = prev {
            for t in 0..r {
                let ex = (pg[t * d + e] - m).exp();
                den += ex;
                num += ex * pv[t * d + e];
            }
        } else {
            den += zero_slots as f32 * (0.0 - m).exp();
        }
        for t in 0..r {
            let ex = (gate(t) - m).exp();
            den += ex;
            num += ex * cur_kv[t * cd + off + e];
        }
        *o = num / den;
    }
}

/// Orthonormal Sylvester-order Walsh–Hadamard transform (length a power of two).
pub fn hadamard(v: &mut [f32]) {
    let n = v.len();
    debug_assert!(n.is_power_of_two());
    let mut h = 1;
    while h < n {
        for i in (0..n).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (v[j], v[j + h]);
                v[j] = a + b;
                v[j + h] = a - b;
            }
        }
        h *= 2;
    }
    let s = 1.0 / (n as f32).sqrt();
    for x in v.iter_mut() {
        *x *= s;
    }
}

/// The clamped SwiGLU activation: SiLU(min(g, L)) · clamp(u, -L, L). The gate is clamped
/// from above only (spec §5.10 step 5, trap 13); `gate_lower` exists for fault injection.
#[inline]
pub fn swiglu(g: f32, u: f32, limit: f32, gate_lower: f32) -> f32 {
    silu(g.clamp(gate_lower, limit)) * u.clamp(-limit, limit)
}

/// Index of the largest value (the first one on ties); NaN is never chosen over a number.
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] || v[best].is_nan() {
            best = i;
        }
    }
    best
}

/// In place: softmax(v / temperature).
pub fn softmax_temp(v: &mut [f32], temperature: f32) {
    let inv = 1.0 / temperature;
    let m = v.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x * inv));
    let mut s = 0f32;
    for x in v.iter_mut() {
        *x = (*x * inv - m).exp();
        s += *x;
    }
    for x in v.iter_mut() {
        *x /= s;
    }
}

/// Rotate pairs of `z` by pos · inv_freq[j] (negated when `inverse`), times `mscale`: pairs
/// (2j, 2j+1) (interleaved), or (j, j + len/2) with `half_split`. The angle is formed in fp32
/// like the reference's complex64 table, its sine and cosine in f64.
pub fn rotate_pairs(
    z: &mut [f32],
    inv_freq: &[f32],
    pos: usize,
    inverse: bool,
    mscale: f32,
    half_split: bool,
) {
    let rd = z.len();
    let p = pos as f32;
    for (j, &w) in inv_freq.iter().enumerate() {
        let ang = p * w;
        let (s, c) = (ang as f64).sin_cos();
        let (s, c) = (if inverse { -s as f32 } else { s as f32 }, c as f32);
        let (s, c) = (s * mscale, c * mscale);
        let (i0, i1) = if half_split {
            (j, j + rd / 2)
        } else {
            (2 * j, 2 * j + 1)
        };
        let (a, b) = (z[i0], z[i1]);
        z[i0] = a * c - b * s;
        z[i1] = a * s + b * c;
    }
}

/// How one token's routing weights are formed (the switches exist for fault injection).
#[derive(Debug, Clone, Copy)]
pub struct RouteRule {
    pub k: usize,
    pub scale: f32,
    /// Weights from score + bias instead of the unbiased score.
    pub bias_in_weights: bool,
    /// Divide by the chosen scores' sum.
    pub normalize: bool,
}

/// One token's MoE routing (spec §5.10): scores = sqrt(softplus(logits)); experts = `hashed`
/// if given, else the top k of score + bias; weights = their scores / sum · scale.
pub fn route_token(
    logits: &[f32],
    bias: Option<&[f32]>,
    hashed: Option<Vec<usize>>,
    rule: RouteRule,
) -> (Vec<usize>, Vec<f32>) {
    let scores: Vec<f32> = logits.iter().map(|&v| softplus(v).sqrt()).collect();
    let experts = match (bias, hashed) {
        (_, Some(h)) => h,
        (Some(b), None) => {
            let biased: Vec<f32> = scores.iter().zip(b).map(|(s, b)| s + b).collect();
            top_k(&biased, rule.k)
        }
        (None, None) => top_k(&scores, rule.k),
    };
    let score = |i: usize| match bias {
        Some(b) if rule.bias_in_weights => scores[i] + b[i],
        _ => scores[i],
    };
    let sum: f32 = if rule.normalize {
        experts.iter().map(|&i| score(i)).sum::<f32>() + 1e-20
    } else {
        1.0
    };
    let weights = experts
        .iter()
        .map(|&i| score(i) / sum * rule.scale)
        .collect();
    (experts, weights)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::synth::SplitMix64;

    fn randoms(r: &mut SplitMix64, n: usize) -> Vec<f32> {
        (0..n).map(|_| 2.0 * r.uniform() - 1.0).collect()
    }

    /// The multi-head forms compute each head as the one-head forms do: same bits (so the
    /// oracle checks of the one-head arithmetic carry over), whatever the head count, width
    /// or number of keys.
    #[test]
    fn many_heads_at_once_equal_one_at_a_time_bit_for_bit() {
        let mut r = SplitMix64::new(3);
        for (heads, hd, nkeys) in [(64, 512, 300), (12, 512, 7), (8, 13, 1), (3, 64, 40)] {
            let q = randoms(&mut r, heads * hd);
            let kv: Vec<Vec<f32>> = (0..nkeys).map(|_| randoms(&mut r, hd)).collect();
            let keys: Vec<&[f32]> = kv.iter().map(|k| k.as_slice()).collect();
            let mut sinks = randoms(&mut r, heads);
            sinks[0] = f32::NEG_INFINITY;
            let mut out = vec![0f32; heads * hd];
            let mut lg = Vec::new();
            attend_sink_heads(&q, &keys, &sinks, 0.07, &mut lg, &mut out);
            for h in 0..heads {
                let mut one = vec![0f32; hd];
                attend_sink(
                    &q[h * hd..(h + 1) * hd],
                    &keys,
                    sinks[h],
                    0.07,
                    &mut lg,
                    &mut one,
                );
                let same = one
                    .iter()
                    .zip(&out[h * hd..(h + 1) * hd])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "heads {heads} hd {hd} keys {nkeys}: head {h} differs");
            }
        }
        for (rows, n) in [(24, 16384), (13, 37), (3, 8)] {
            let m = randoms(&mut r, rows * n);
            let v = randoms(&mut r, n);
            let mut out = vec![0f32; rows];
            dot_rows(&m, &v, &mut out);
            for (i, o) in out.iter().enumerate() {
                let one = dot(&m[i * n..(i + 1) * n], &v);
                assert_eq!(one.to_bits(), o.to_bits(), "rows {rows} n {n}: row {i}");
            }
        }
        for (ih, ihd) in [(64, 128), (6, 16), (16, 20)] {
            let q = randoms(&mut r, ih * ihd);
            let w = randoms(&mut r, ih);
            let rows: Vec<Vec<f32>> = (0..50).map(|_| randoms(&mut r, ihd)).collect();
            for relu_after in [false, true] {
                let mut out = vec![0f32; 45];
                indexer_scores(&q, &w, |i| rows[i].as_slice(), 5, ihd, relu_after, &mut out);
                for (i, o) in out.iter().enumerate() {
                    let one = indexer_score(&q, &w, &rows[5 + i], ihd, relu_after);
                    assert_eq!(one.to_bits(), o.to_bits(), "ih {ih} ihd {ihd} row {i}");
                }
            }
        }
    }

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

    #[test]
    fn swiglu_clamps_gate_above_only_and_up_both_sides() {
        // Hand-computed: silu(10) = 10·σ(10) = 9.999546; silu(-30) = -30·σ(-30) = -2.8072e-12.
        let lo = f32::NEG_INFINITY;
        assert!((swiglu(50.0, 1.0, 10.0, lo) - 9.999_546).abs() < 1e-5);
        assert!((swiglu(-30.0, 1.0, 10.0, lo) - (-2.807_2e-12)).abs() < 1e-15);
        // A gate clamped below at -10 would give silu(-10) = -4.54e-4 instead.
        assert!((swiglu(-30.0, 1.0, 10.0, -10.0) - (-4.539_8e-4)).abs() < 1e-7);
        assert_eq!(swiglu(1.0, 25.0, 10.0, lo), silu(1.0) * 10.0);
        assert_eq!(swiglu(1.0, -25.0, 10.0, lo), silu(1.0) * -10.0);
    }
}
