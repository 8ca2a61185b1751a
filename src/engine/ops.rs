//! The operations the forward pass is written against. Each spec section (`hyper`,
//! `attention`, `moe`, the head in `model`) is one generic function over [`Ops`]; where it
//! runs is the choice of implementation: [`super::host::Host`] computes on the CPU with the
//! activations in host memory, [`super::offload::Dev`] launches device ops (CUDA or the
//! simulated device) with the activations kept on the device. The engine picks one per
//! layer (placement, `Engine::forward`); a section never knows which.
//!
//! The ops are V4's: besides products and norms they include the mHC mixing (§5.3), the
//! attention core over a block's keys (§5.8), the indexer's top-k (§5.7) and the routing
//! (§5.10). A device op that cannot run (no room, an error) returns `Err`, and the engine
//! computes the step again on the host; the host's `Err` is [`std::convert::Infallible`].

use super::attention::AttnState;
use super::moe::Route;
use super::numerics::Numerics;
use super::rope::Rope;
use crate::model::config::ModelConfig;
use crate::model::weights::{HcParams, MoeWeights, Weight};
use std::borrow::Cow;
use std::ops::{Deref, Range};

/// An activation or a rounded copy of it (see [`Ops::gemm_input`]).
pub(crate) enum Maybe<'a, T> {
    Same(&'a T),
    Own(T),
}

impl<T> Deref for Maybe<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        match self {
            Maybe::Same(x) => x,
            Maybe::Own(x) => x,
        }
    }
}

/// Per-row factors of [`Ops::swiglu`] and [`Ops::add_rows`].
pub(crate) enum RowWeights<'a, T> {
    One,
    /// Host values, one per row.
    Host(&'a [f32]),
    /// Values in an activation from this offset on (e.g. the routing's weights).
    At(&'a T, usize),
}

/// The keys one query attends to: the positions `window` (rows of earlier steps from the
/// block's window ring, this step's from its new KV rows), then the compressed rows `comp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QueryKeys {
    pub window: Range<usize>,
    pub comp: Vec<usize>,
}

/// The mHC constants of a model (spec §5.3).
#[derive(Clone, Copy)]
pub(crate) struct HcDims {
    pub hc: usize,
    pub d: usize,
    pub iters: usize,
    pub norm_eps: f32,
    pub hc_eps: f32,
}

impl HcDims {
    pub fn of(cfg: &ModelConfig) -> HcDims {
        HcDims {
            hc: cfg.hc_mult,
            d: cfg.hidden_size,
            iters: cfg.hc_sinkhorn_iters,
            norm_eps: cfg.rms_norm_eps,
            hc_eps: cfg.hc_eps,
        }
    }

    /// Coefficients per token of a site: [pre hc | post hc | comb hc·hc].
    pub fn mix_len(&self) -> usize {
        2 * self.hc + self.hc * self.hc
    }
}

/// The HC head's parameters (spec §5.11): fn [hc, hc·D], base [hc], scale.
pub(crate) type HcHeadParams<'a> = (&'a [f32], &'a [f32], f32);

/// Routing of a chunk: each token's experts and weights (on the host), the weights
/// [t, k] as an activation too, and the MoE input's values on the host (for experts the
/// CPU computes; the host lends its own).
pub(crate) type Routing<'a, T> = (Vec<Route>, T, Cow<'a, [f32]>);

/// One implementation of the forward pass's operations. Activations are `T`: f32 values,
/// row-major. Shapes are in elements; `t` is the number of token rows.
pub(crate) trait Ops: Sync {
    type T: Send + Sync;
    type Err: Send;

    /// Whether the activations live on a device (the host's values then need copies).
    fn on_device(&self) -> bool;
    /// Host values as an activation.
    fn upload(&self, v: Vec<f32>) -> Result<Self::T, Self::Err>;
    /// Activations' values on the host, in one synchronisation: those of `keep` (which the
    /// caller still uses; the host copies them), then those of `take` (handed over; the host
    /// moves them).
    fn read(&self, keep: &[&Self::T], take: Vec<Self::T>) -> Result<Vec<Vec<f32>>, Self::Err>;
    /// Rows `rows` of x (rows of `width`).
    fn rows(&self, x: &Self::T, rows: Range<usize>, width: usize) -> Result<Self::T, Self::Err>;
    /// out[j] = x[idx[j]] for rows of `width`.
    fn gather_rows(&self, x: &Self::T, idx: &[usize], width: usize) -> Result<Self::T, Self::Err>;

    /// y = x · Wᵀ: x [t, cols] -> [t, rows].
    fn linear(&self, w: &Weight, x: &Self::T, t: usize) -> Result<Self::T, Self::Err>;
    /// The grouped output projection (§5.9): group g's `cols` columns of x [t, groups·cols]
    /// times W's rows g·r.. (r = rows / groups); [t, rows]. `interleaved` (a trap) takes
    /// group g's heads of `hd` from heads g, g + groups, ...
    fn linear_grouped(
        &self,
        w: &Weight,
        x: &Self::T,
        t: usize,
        groups: usize,
        hd: usize,
        interleaved: bool,
    ) -> Result<Self::T, Self::Err>;
    /// The input of an FP8/FP4 product, rounded as the numerics say (x itself in ideal).
    fn gemm_input<'a>(
        &self,
        num: Numerics,
        x: &'a Self::T,
        cols: usize,
    ) -> Result<Maybe<'a, Self::T>, Self::Err>;

    /// In place per row of `n`: RMSNorm with weight `w` (None: unweighted).
    fn rms_norm(
        &self,
        x: &mut Self::T,
        w: Option<&[f32]>,
        n: usize,
        eps: f32,
    ) -> Result<(), Self::Err>;
    /// In place: RoPE on each row of `width`, row r at position pos0 + r / rows_per_pos.
    #[allow(clippy::too_many_arguments)] // the table, rows, positions and direction
    fn rope(
        &self,
        rope: &Rope,
        x: &mut Self::T,
        width: usize,
        pos0: usize,
        rows_per_pos: usize,
        inverse: bool,
    ) -> Result<(), Self::Err>;
    /// In place: stored KV rows of `width` ([`Numerics::kv_row`]).
    fn kv_rows(
        &self,
        num: Numerics,
        x: &mut Self::T,
        width: usize,
        nope: usize,
    ) -> Result<(), Self::Err>;
    /// In place: indexer vectors of `n` ([`Numerics::indexer_vec`]).
    fn indexer_vecs(&self, num: Numerics, x: &mut Self::T, n: usize) -> Result<(), Self::Err>;

    /// mHC site coefficients of the states x [t, hc·D]: [t, mix_len].
    fn hc_mix(&self, p: &HcParams, x: &Self::T, k: HcDims) -> Result<Self::T, Self::Err>;
    /// The collapse u[t] = Σ_i pre_i · x[t, i] with pre the first hc of each row of coef.
    fn hc_collapse(&self, x: &Self::T, coef: &Self::T, k: HcDims) -> Result<Self::T, Self::Err>;
    /// In place: x[t, k] = post_k · f[t] + Σ_i comb[i][k] · x[t, i].
    fn hc_expand(
        &self,
        x: &mut Self::T,
        f: &Self::T,
        coef: &Self::T,
        k: HcDims,
    ) -> Result<(), Self::Err>;
    /// The HC head (§5.11) of rows `rows` of x [t, hc·D]: [rows, D].
    fn hc_head(
        &self,
        p: HcHeadParams,
        x: &Self::T,
        rows: Range<usize>,
        k: HcDims,
    ) -> Result<Self::T, Self::Err>;

    /// The indexer (§5.7): for each (query j, n) of `queries`, the `topk` best of the first
    /// n rows of the block's indexer store for query j (heads iq [t, ih, ihd], weights
    /// iw [t, ih] on the host), ascending.
    #[allow(clippy::too_many_arguments)] // the block, the queries and their shapes
    fn indexer_topk(
        &self,
        st: &AttnState,
        iq: &Self::T,
        iw: &[f32],
        queries: &[(usize, usize)],
        heads: (usize, usize),
        topk: usize,
    ) -> Result<Vec<Vec<usize>>, Self::Err>;
    /// Core attention with sinks (§5.8) of the queries q [t, heads, hd] at positions t0..:
    /// query j over the keys `keys[j]`, this step's window rows from kv [t, hd]; `heads`
    /// is (heads, hd).
    #[allow(clippy::too_many_arguments)] // the block, queries, keys, sinks and shapes
    fn attend(
        &self,
        st: &mut AttnState,
        q: &Self::T,
        kv: &Self::T,
        keys: &[QueryKeys],
        sink: &[f32],
        t0: usize,
        heads: (usize, usize),
    ) -> Result<Self::T, Self::Err>;

    /// Routing (§5.10) of the tokens from router logits [t, E]; see [`Routing`]. `x` is the
    /// MoE input.
    fn route<'a>(
        &self,
        cfg: &ModelConfig,
        w: &MoeWeights,
        logits: &Self::T,
        x: &'a Self::T,
        tokens: &[u32],
    ) -> Result<Routing<'a, Self::T>, Self::Err>;
    /// Clamped SwiGLU (§5.10) of g and u, times a factor per row of `width`:
    /// SiLU(clamp(g, lower, limit)) · clamp(u, ±limit) · f.
    #[allow(clippy::too_many_arguments)] // both inputs, the factors and the clamps
    fn swiglu(
        &self,
        g: &Self::T,
        u: &Self::T,
        f: RowWeights<Self::T>,
        width: usize,
        limit: f32,
        lower: f32,
    ) -> Result<Self::T, Self::Err>;
    /// y[idx[j]] += f_j · x[x_off + j·width ..][..width] for j < n in order (idx None: j).
    #[allow(clippy::too_many_arguments)] // the sum, the rows added, where and by how much
    fn add_rows(
        &self,
        y: &mut Self::T,
        x: &Self::T,
        x_off: usize,
        idx: Option<&[usize]>,
        f: RowWeights<Self::T>,
        n: usize,
        width: usize,
    ) -> Result<(), Self::Err>;
}
