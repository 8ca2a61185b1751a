//! Fault injection for the spec's traps (§11), compiled only with the `traps` feature (the
//! test suite turns it on). Each `Trap` re-introduces one known way to be silently wrong, so
//! the oracle tests can show that they catch it. Without the feature `Traps::has` is a
//! constant `false` and the optimiser removes every check.

/// One way to get the model subtly wrong; the number is the trap's item in spec §11.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trap {
    /// 1: rotate_half layout (pairs (j, j+32)) instead of interleaved pairs.
    RopeHalfSplit,
    /// 1: rotate the leading 64 dims instead of the trailing ones.
    RopeLeadingDims,
    /// 2: the compressed layers' YaRN table on the window-only layers too.
    RopeYarnOnAllLayers,
    /// 2: YaRN's mscale (0.1·ln(factor) + 1) applied to cos/sin.
    RopeYarnMscale,
    /// 3: no inverse rotation of the attention output.
    NoInverseRope,
    /// 4: no per-head RMS normalisation of q.
    NoQHeadNorm,
    /// 5: no attention sink.
    NoSink,
    /// 6: a window of 127 keys (the oldest one dropped).
    Window127,
    /// 6: compressed rows whose tokens are still inside the window are not attended.
    CompressedSkipInsideWindow,
    /// 7: a query sees the row its own window will complete (i <= (p+1)/r).
    CompressedSeesIncomplete,
    /// 7: compressed rows rotated at their window's last position, not its first.
    CompressedRopeAtWindowEnd,
    /// 8: one gate per token (mean over channels) instead of a per-channel softmax.
    CompressorScalarGate,
    /// 8: ape not added to the gates.
    ApeIgnored,
    /// 8: ratio-4 overlap takes the previous window's second half and the current first.
    OverlapHalvesSwapped,
    /// 8: the first ratio-4 row pools zero vectors (gate 0) for the missing window.
    FirstRowZeroSlots,
    /// 9: ReLU applied after the weighted head sum.
    IndexerReluAfterSum,
    /// 9: no top-k selection (every visible row attended).
    IndexerSelectAll,
    /// 10: comb applied untransposed (Σ_i C[k][i] X_i).
    CombUntransposed,
    /// 10: the collapse uses the RMS-normalised copies.
    CollapseNormalised,
    /// 10: pre weights normalised to sum 1.
    PreNormalised,
    /// 10: post = sigmoid (no factor 2).
    PostNoDouble,
    /// 11: HC head weights as 2·sigmoid.
    HcHeadTwoSigmoid,
    /// 12: selection bias added to the routing weights too.
    RouterBiasInWeights,
    /// 12: routing weights not normalised over the chosen experts.
    RouterNoNormalize,
    /// 12: routed_scaling_factor not applied.
    RouterNoScale,
    /// 12: hash layers routed by score instead of tid2eid.
    HashAsScore,
    /// 13: gate clamped on both sides.
    GateClampBothSides,
    /// 13: shared expert without the SwiGLU clamp (the initial release's code).
    SharedNoClamp,
    /// 14: output groups built from interleaved heads (h mod G) instead of consecutive ones.
    GroupsInterleaved,
    /// 15: FP4 high nibble taken as the even column.
    Fp4NibbleSwap,
    /// 15: w1 (gate) and w3 (up) swapped.
    W1W3Swapped,
}

impl Trap {
    pub const ALL: [Trap; 31] = [
        Trap::RopeHalfSplit,
        Trap::RopeLeadingDims,
        Trap::RopeYarnOnAllLayers,
        Trap::RopeYarnMscale,
        Trap::NoInverseRope,
        Trap::NoQHeadNorm,
        Trap::NoSink,
        Trap::Window127,
        Trap::CompressedSkipInsideWindow,
        Trap::CompressedSeesIncomplete,
        Trap::CompressedRopeAtWindowEnd,
        Trap::CompressorScalarGate,
        Trap::ApeIgnored,
        Trap::OverlapHalvesSwapped,
        Trap::FirstRowZeroSlots,
        Trap::IndexerReluAfterSum,
        Trap::IndexerSelectAll,
        Trap::CombUntransposed,
        Trap::CollapseNormalised,
        Trap::PreNormalised,
        Trap::PostNoDouble,
        Trap::HcHeadTwoSigmoid,
        Trap::RouterBiasInWeights,
        Trap::RouterNoNormalize,
        Trap::RouterNoScale,
        Trap::HashAsScore,
        Trap::GateClampBothSides,
        Trap::SharedNoClamp,
        Trap::GroupsInterleaved,
        Trap::Fp4NibbleSwap,
        Trap::W1W3Swapped,
    ];
}

/// The traps switched on (always empty without the `traps` feature).
#[derive(Debug, Clone, Default)]
pub struct Traps {
    #[cfg(feature = "traps")]
    set: Vec<Trap>,
}

impl Traps {
    #[cfg(feature = "traps")]
    pub fn with(traps: &[Trap]) -> Traps {
        Traps {
            set: traps.to_vec(),
        }
    }

    /// No fault is injected.
    pub fn none(&self) -> bool {
        #[cfg(feature = "traps")]
        {
            self.set.is_empty()
        }
        #[cfg(not(feature = "traps"))]
        {
            true
        }
    }

    #[inline(always)]
    pub fn has(&self, t: Trap) -> bool {
        #[cfg(feature = "traps")]
        {
            self.set.contains(&t)
        }
        #[cfg(not(feature = "traps"))]
        {
            let _ = t;
            false
        }
    }
}

/// What the traps that are not a config value or a weight change in the math, fixed when the
/// engine is built (`Engine::with_traps`, which makes the others transforms of the config
/// and the weights). All false, the default, is the spec; each section reads its flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deviations {
    /// 4: no per-head RMS normalisation of q.
    pub no_q_head_norm: bool,
    /// 3: no inverse rotation of the attention output.
    pub no_inverse_rope: bool,
    /// 14: output groups built from interleaved heads.
    pub groups_interleaved: bool,
    /// 7: a query sees the row its own window will complete.
    pub compressed_sees_incomplete: bool,
    /// 6: compressed rows whose tokens are inside the window are not attended.
    pub compressed_skip_inside_window: bool,
    /// 7: compressed rows rotated at their window's last position.
    pub compressed_rope_at_window_end: bool,
    /// 8: one gate per token instead of a per-channel softmax.
    pub compressor_scalar_gate: bool,
    /// 8: the ratio-4 overlap takes the wrong halves.
    pub overlap_halves_swapped: bool,
    /// 8: the first ratio-4 row pools zero slots for the missing window.
    pub first_row_zero_slots: bool,
    /// 9: ReLU after the weighted head sum.
    pub indexer_relu_after_sum: bool,
    /// 10: pre weights normalised to sum 1.
    pub pre_normalised: bool,
    /// 10: post = sigmoid (no factor 2).
    pub post_no_double: bool,
    /// 10: the collapse uses the RMS-normalised copies.
    pub collapse_normalised: bool,
    /// 10: comb applied untransposed.
    pub comb_untransposed: bool,
    /// 11: HC head weights as 2·sigmoid.
    pub hc_head_two_sigmoid: bool,
    /// 12: selection bias added to the routing weights.
    pub router_bias_in_weights: bool,
    /// 12: routing weights not normalised.
    pub router_no_normalize: bool,
    /// 13: gate clamped on both sides.
    pub gate_clamp_both_sides: bool,
    /// 13: shared expert without the SwiGLU clamp.
    pub shared_no_clamp: bool,
}

impl Deviations {
    pub fn of(t: &Traps) -> Deviations {
        Deviations {
            no_q_head_norm: t.has(Trap::NoQHeadNorm),
            no_inverse_rope: t.has(Trap::NoInverseRope),
            groups_interleaved: t.has(Trap::GroupsInterleaved),
            compressed_sees_incomplete: t.has(Trap::CompressedSeesIncomplete),
            compressed_skip_inside_window: t.has(Trap::CompressedSkipInsideWindow),
            compressed_rope_at_window_end: t.has(Trap::CompressedRopeAtWindowEnd),
            compressor_scalar_gate: t.has(Trap::CompressorScalarGate),
            overlap_halves_swapped: t.has(Trap::OverlapHalvesSwapped),
            first_row_zero_slots: t.has(Trap::FirstRowZeroSlots),
            indexer_relu_after_sum: t.has(Trap::IndexerReluAfterSum),
            pre_normalised: t.has(Trap::PreNormalised),
            post_no_double: t.has(Trap::PostNoDouble),
            collapse_normalised: t.has(Trap::CollapseNormalised),
            comb_untransposed: t.has(Trap::CombUntransposed),
            hc_head_two_sigmoid: t.has(Trap::HcHeadTwoSigmoid),
            router_bias_in_weights: t.has(Trap::RouterBiasInWeights),
            router_no_normalize: t.has(Trap::RouterNoNormalize),
            gate_clamp_both_sides: t.has(Trap::GateClampBothSides),
            shared_no_clamp: t.has(Trap::SharedNoClamp),
        }
    }
}
