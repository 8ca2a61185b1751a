//! Manifold-constrained hyper-connections (mHC, spec §5.3) and the final HC head (§5.11).
//! The residual state of a token is `hc` copies of a D-vector, stored row-major [hc, D].
//! A site mixes the copies into one input u for its sublayer (attention or MoE) and writes
//! the sublayer's output back into every copy. The arithmetic (the RMS-scaled projection,
//! Sinkhorn, collapse, expansion) is the `hc_*` ops' (CPU kernels in `backend::cpu::hc`,
//! device kernels in `kernels/hyper.cu`).

use super::ops::{HcDims, Ops};
use crate::model::weights::HcParams;

/// A site's input: the mixing coefficients of every token of x [t, hc·D] ([pre | post |
/// comb], comb made doubly stochastic by Sinkhorn) and u = RMSNorm(Σ_i pre_i · x_i) [t, D].
pub(crate) fn site_input<O: Ops>(
    o: &O,
    p: &HcParams,
    norm: &[f32],
    x: &O::T,
    k: HcDims,
) -> Result<(O::T, O::T), O::Err> {
    let coef = o.hc_mix(p, x, k)?;
    let mut u = o.hc_collapse(x, &coef, k)?;
    o.rms_norm(&mut u, Some(norm), k.d, k.norm_eps)?;
    Ok((coef, u))
}

/// The site's output f [t, D] back into the streams, in place:
/// x_k = post_k · f + Σ_i comb[i][k] · x_i.
pub(crate) fn write_back<O: Ops>(
    o: &O,
    x: &mut O::T,
    f: &O::T,
    coef: &O::T,
    k: HcDims,
) -> Result<(), O::Err> {
    o.hc_expand(x, f, coef, k)
}
