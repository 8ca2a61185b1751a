//! `config.json` of a DeepSeek-V4 checkpoint (spec §1), parsed with serde and validated.
//! Every error names the field at fault.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// The longest context a config may declare (the release's is 2^20): every size derived
/// from a position stays far from overflow.
pub const MAX_CONTEXT: usize = 1 << 26;

/// What went wrong with a config file. Callers only report it; the variants keep messages
/// uniform ("config.json: field `x`: ...").
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Io {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: not valid JSON: {msg}")]
    Json { file: String, msg: String },
    #[error("{file}: field `{field}`: {msg}")]
    Field {
        file: String,
        field: String,
        msg: String,
    },
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct RopeScaling {
    #[serde(alias = "rope_type")]
    pub r#type: String,
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct QuantizationConfig {
    pub quant_method: String,
    pub fmt: String,
    pub scale_fmt: String,
    pub weight_block_size: Vec<usize>,
    #[serde(default)]
    pub activation_scheme: Option<String>,
}

/// The model's hyper-parameters, with the Hugging Face `config.json` names.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct ModelConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub q_lora_rank: usize,
    pub o_lora_rank: usize,
    pub o_groups: usize,
    pub moe_intermediate_size: usize,
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub num_hash_layers: usize,
    pub num_nextn_predict_layers: usize,
    pub routed_scaling_factor: f32,
    pub scoring_func: String,
    pub norm_topk_prob: bool,
    pub topk_method: String,
    pub swiglu_limit: f32,
    pub hidden_act: String,
    pub rms_norm_eps: f32,
    pub hc_mult: usize,
    pub hc_sinkhorn_iters: usize,
    pub hc_eps: f32,
    pub index_n_heads: usize,
    pub index_head_dim: usize,
    pub index_topk: usize,
    pub sliding_window: usize,
    pub rope_theta: f64,
    pub compress_rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub compress_ratios: Vec<usize>,
    pub max_position_embeddings: usize,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    pub quantization_config: QuantizationConfig,
    /// Absent in the initial release revision (whose experts are FP4 all the same).
    #[serde(default)]
    pub expert_dtype: Option<String>,
    /// The transformers class names; when given, one must be V4's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
}

/// The transformers class of DeepSeek-V4 checkpoints.
pub const ARCHITECTURE: &str = "DeepseekV4ForCausalLM";

/// Attention kind of one layer, from its compress ratio (spec §1.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnKind {
    /// ratio 0: sliding window only.
    Window,
    /// ratio 4: window + overlapped compression + lightning indexer top-k ("CSA").
    Csa,
    /// ratio 128: window + all compressed rows ("HCA").
    Hca,
}

impl AttnKind {
    pub fn name(self) -> &'static str {
        match self {
            AttnKind::Window => "sliding",
            AttnKind::Csa => "CSA",
            AttnKind::Hca => "HCA",
        }
    }
}

/// MoE routing of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// Experts fixed by the token id (`tid2eid`).
    Hash,
    /// sqrt(softplus) scores + selection bias.
    Score,
}

impl Routing {
    pub fn name(self) -> &'static str {
        match self {
            Routing::Hash => "hash",
            Routing::Score => "score",
        }
    }
}

impl ModelConfig {
    /// Read and validate `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = crate::fsutil::read_regular(path).map_err(|source| ConfigError::Io {
            file: file.clone(),
            source,
        })?;
        Self::from_json_bytes(&text, &file)
    }

    /// Parse and validate; `file` is used in error messages.
    pub fn from_json_bytes(bytes: &[u8], file: &str) -> Result<Self, ConfigError> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| ConfigError::Json {
                file: file.to_string(),
                msg: e.to_string(),
            })?;
        let field = |field: &str, msg: String| ConfigError::Field {
            file: file.to_string(),
            field: field.to_string(),
            msg,
        };
        // Check the model type first: a llama config should say "unsupported model", not
        // "missing field q_lora_rank".
        match value.get("model_type") {
            None => {
                return Err(field(
                    "model_type",
                    "missing (expected \"deepseek_v4\")".into(),
                ));
            }
            Some(serde_json::Value::String(s)) if s == "deepseek_v4" => {}
            Some(other) => {
                return Err(field(
                    "model_type",
                    format!("{other} is not supported (dsflash runs \"deepseek_v4\")"),
                ));
            }
        }
        let cfg: ModelConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            // serde reports a missing field at the parent path with the name in the message.
            let name = if let Some(rest) = inner.strip_prefix("missing field `") {
                rest.split('`').next().unwrap_or("?").to_string()
            } else {
                path
            };
            let msg = inner
                .split(" at line ")
                .next()
                .unwrap_or(&inner)
                .to_string();
            field(&name, msg)
        })?;
        cfg.validate(file)?;
        Ok(cfg)
    }

    fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let err = |f: &str, msg: String| {
            Err(ConfigError::Field {
                file: file.to_string(),
                field: f.to_string(),
                msg,
            })
        };
        let expect_str = |f: &str, got: &str, want: &[&str]| {
            if want.contains(&got) {
                Ok(())
            } else {
                err(f, format!("{got:?} is not supported (expected {want:?})"))
            }
        };
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("head_dim", self.head_dim),
            ("q_lora_rank", self.q_lora_rank),
            ("o_lora_rank", self.o_lora_rank),
            ("o_groups", self.o_groups),
            ("moe_intermediate_size", self.moe_intermediate_size),
            ("n_routed_experts", self.n_routed_experts),
            ("num_experts_per_tok", self.num_experts_per_tok),
            ("hc_mult", self.hc_mult),
            ("hc_sinkhorn_iters", self.hc_sinkhorn_iters),
            ("sliding_window", self.sliding_window),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (f, v) in positive {
            if v == 0 {
                return err(f, "must be > 0".into());
            }
        }
        // Plausibility caps: a corrupt config must not make us plan terabytes of tensors.
        let caps = [
            ("vocab_size", self.vocab_size, 1 << 22),
            ("hidden_size", self.hidden_size, 1 << 16),
            ("num_hidden_layers", self.num_hidden_layers, 1 << 10),
            (
                "num_nextn_predict_layers",
                self.num_nextn_predict_layers,
                16,
            ),
            ("num_attention_heads", self.num_attention_heads, 1 << 10),
            ("head_dim", self.head_dim, 1 << 12),
            ("q_lora_rank", self.q_lora_rank, 1 << 16),
            ("o_lora_rank", self.o_lora_rank, 1 << 16),
            ("moe_intermediate_size", self.moe_intermediate_size, 1 << 16),
            ("n_routed_experts", self.n_routed_experts, 1 << 12),
            ("index_n_heads", self.index_n_heads, 1 << 10),
            ("index_head_dim", self.index_head_dim, 1 << 12),
            ("hc_mult", self.hc_mult, 64),
            ("hc_sinkhorn_iters", self.hc_sinkhorn_iters, 1 << 10),
        ];
        for (f, v, cap) in caps {
            if v > cap {
                return err(
                    f,
                    format!("{v} is implausibly large (at most {cap} supported)"),
                );
            }
        }
        let want_ratios = self.num_hidden_layers + self.num_nextn_predict_layers;
        if self.compress_ratios.len() != want_ratios {
            return err(
                "compress_ratios",
                format!(
                    "has {} entries, expected num_hidden_layers + num_nextn_predict_layers = {}",
                    self.compress_ratios.len(),
                    want_ratios
                ),
            );
        }
        if let Some((i, r)) = self
            .compress_ratios
            .iter()
            .enumerate()
            .find(|(_, r)| ![0, 4, 128].contains(*r))
        {
            return err(
                "compress_ratios",
                format!("entry {i} is {r}; supported ratios are 0, 4 and 128"),
            );
        }
        if self.num_key_value_heads != 1 {
            return err(
                "num_key_value_heads",
                format!(
                    "is {}, V4 has one shared K=V head",
                    self.num_key_value_heads
                ),
            );
        }
        if self.n_shared_experts != 1 {
            return err(
                "n_shared_experts",
                format!("is {}, expected 1", self.n_shared_experts),
            );
        }
        if self.num_experts_per_tok > self.n_routed_experts {
            return err(
                "num_experts_per_tok",
                format!(
                    "{} exceeds n_routed_experts {}",
                    self.num_experts_per_tok, self.n_routed_experts
                ),
            );
        }
        if self.num_hash_layers > self.num_hidden_layers {
            return err(
                "num_hash_layers",
                format!(
                    "{} exceeds num_hidden_layers {}",
                    self.num_hash_layers, self.num_hidden_layers
                ),
            );
        }
        if self.qk_rope_head_dim == 0
            || !self.qk_rope_head_dim.is_multiple_of(2)
            || self.qk_rope_head_dim > self.head_dim
        {
            return err(
                "qk_rope_head_dim",
                format!(
                    "{} must be even, > 0 and <= head_dim {}",
                    self.qk_rope_head_dim, self.head_dim
                ),
            );
        }
        if !self.num_attention_heads.is_multiple_of(self.o_groups) {
            return err(
                "o_groups",
                format!(
                    "{} does not divide num_attention_heads {}",
                    self.o_groups, self.num_attention_heads
                ),
            );
        }
        for (f, v) in [
            ("hidden_size", self.hidden_size),
            ("moe_intermediate_size", self.moe_intermediate_size),
        ] {
            if v % 32 != 0 {
                return err(f, format!("{v} is not a multiple of 32 (FP4 scale groups)"));
            }
        }
        if self.compress_ratios.contains(&4) {
            if self.index_topk == 0 || self.index_n_heads == 0 {
                return err(
                    "index_topk",
                    "ratio-4 layers need index_topk > 0 and index_n_heads > 0".into(),
                );
            }
            if self.index_head_dim < self.qk_rope_head_dim {
                return err(
                    "index_head_dim",
                    format!(
                        "{} is smaller than qk_rope_head_dim {}",
                        self.index_head_dim, self.qk_rope_head_dim
                    ),
                );
            }
        }
        if self.compress_ratios.iter().any(|&r| r != 0) && self.head_dim < self.qk_rope_head_dim {
            return err("head_dim", "smaller than qk_rope_head_dim".into());
        }
        expect_str("scoring_func", &self.scoring_func, &["sqrtsoftplus"])?;
        expect_str("hidden_act", &self.hidden_act, &["silu"])?;
        expect_str("topk_method", &self.topk_method, &["noaux_tc"])?;
        expect_str("rope_scaling.type", &self.rope_scaling.r#type, &["yarn"])?;
        let q = &self.quantization_config;
        expect_str(
            "quantization_config.quant_method",
            &q.quant_method,
            &["fp8"],
        )?;
        expect_str("quantization_config.fmt", &q.fmt, &["e4m3"])?;
        expect_str("quantization_config.scale_fmt", &q.scale_fmt, &["ue8m0"])?;
        if q.weight_block_size != [128, 128] {
            return err(
                "quantization_config.weight_block_size",
                format!(
                    "{:?} is not supported (expected [128, 128])",
                    q.weight_block_size
                ),
            );
        }
        if let Some(a) = &self.architectures
            && !a.iter().any(|x| x == ARCHITECTURE)
        {
            return err(
                "architectures",
                format!("{a:?} is not supported (expected [\"{ARCHITECTURE}\"])"),
            );
        }
        if let Some(d) = &self.expert_dtype {
            expect_str("expert_dtype", d, &["fp4"])?;
        }
        if self.tie_word_embeddings {
            return err(
                "tie_word_embeddings",
                "is true; V4 has a separate head.weight".into(),
            );
        }
        if !self.norm_topk_prob {
            return err("norm_topk_prob", "false is not supported".into());
        }
        if self.attention_bias {
            return err("attention_bias", "true is not supported".into());
        }
        if self.bos_token_id as usize >= self.vocab_size
            || self.eos_token_id as usize >= self.vocab_size
        {
            return err(
                "eos_token_id",
                format!("bos/eos ids must be < vocab_size {}", self.vocab_size),
            );
        }
        // Written so that NaN fails too.
        let positive = |v: f64| v.is_finite() && v > 0.0;
        let eps_ok =
            positive(self.rms_norm_eps as f64) && self.hc_eps.is_finite() && self.hc_eps >= 0.0;
        if !eps_ok {
            return err("rms_norm_eps", "eps values must be positive".into());
        }
        let rope_ok = self.rope_scaling.factor.is_finite() && self.rope_scaling.factor >= 1.0;
        if !rope_ok {
            return err("rope_scaling.factor", "must be >= 1".into());
        }
        // A theta of 1 or less makes every frequency 1 and YaRN's ramp divide by ln(1) = 0.
        for (f, v) in [
            ("rope_theta", self.rope_theta),
            ("compress_rope_theta", self.compress_rope_theta),
        ] {
            if !(v.is_finite() && v > 1.0) {
                return err(f, format!("{v} must be > 1"));
            }
        }
        for (f, v) in [
            ("rope_scaling.beta_fast", self.rope_scaling.beta_fast),
            ("rope_scaling.beta_slow", self.rope_scaling.beta_slow),
            (
                "rope_scaling.original_max_position_embeddings",
                self.rope_scaling.original_max_position_embeddings as f64,
            ),
        ] {
            if !positive(v) {
                return err(f, format!("{v} must be > 0"));
            }
        }
        for (f, v) in [
            ("swiglu_limit", self.swiglu_limit),
            ("routed_scaling_factor", self.routed_scaling_factor),
        ] {
            if !positive(v as f64) || v > 1e6 {
                return err(f, format!("{v} must be a number > 0 (at most 1e6)"));
            }
        }
        if self.hc_eps > 1.0 || self.rms_norm_eps > 1.0 {
            return err("rms_norm_eps", "eps values must be at most 1".into());
        }
        // Sizes the engine derives from these are bounded by them (and by --ctx).
        if self.max_position_embeddings > MAX_CONTEXT {
            return err(
                "max_position_embeddings",
                format!(
                    "{} is implausibly large (at most {MAX_CONTEXT} supported)",
                    self.max_position_embeddings
                ),
            );
        }
        if self.sliding_window > self.max_position_embeddings {
            return err(
                "sliding_window",
                format!(
                    "{} exceeds max_position_embeddings {}",
                    self.sliding_window, self.max_position_embeddings
                ),
            );
        }
        if self.index_topk > self.max_position_embeddings {
            return err(
                "index_topk",
                format!(
                    "{} exceeds max_position_embeddings {}",
                    self.index_topk, self.max_position_embeddings
                ),
            );
        }
        Ok(())
    }

    /// Number of layers including the MTP block(s).
    pub fn total_blocks(&self) -> usize {
        self.num_hidden_layers + self.num_nextn_predict_layers
    }

    /// Compress ratio of block `layer` (MTP blocks follow the main layers).
    pub fn compress_ratio(&self, layer: usize) -> usize {
        self.compress_ratios[layer]
    }

    pub fn attn_kind(&self, layer: usize) -> AttnKind {
        match self.compress_ratios[layer] {
            0 => AttnKind::Window,
            4 => AttnKind::Csa,
            _ => AttnKind::Hca,
        }
    }

    /// Hash routing for the first `num_hash_layers` main layers; never for MTP blocks.
    pub fn routing(&self, layer: usize) -> Routing {
        if layer < self.num_hash_layers {
            Routing::Hash
        } else {
            Routing::Score
        }
    }

    /// Width of the mHC mixing vector: (2 + hc) · hc.
    pub fn hc_mix(&self) -> usize {
        (2 + self.hc_mult) * self.hc_mult
    }

    /// Non-rope dims of a head.
    pub fn nope_dim(&self) -> usize {
        self.head_dim - self.qk_rope_head_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REAL: &str = include_str!("../../tests/fixtures/deepseek-v4-flash-config.json");

    #[test]
    fn real_config_parses_with_spec_values() {
        let c = ModelConfig::from_json_bytes(REAL.as_bytes(), "config.json").unwrap();
        assert_eq!(c.hidden_size, 4096);
        assert_eq!(c.num_hidden_layers, 43);
        assert_eq!(c.compress_ratios.len(), 44);
        assert_eq!(c.attn_kind(0), AttnKind::Window);
        assert_eq!(c.attn_kind(2), AttnKind::Csa);
        assert_eq!(c.attn_kind(3), AttnKind::Hca);
        assert_eq!(c.attn_kind(43), AttnKind::Window);
        assert_eq!(c.routing(2), Routing::Hash);
        assert_eq!(c.routing(3), Routing::Score);
        assert_eq!(c.hc_mix(), 24);
    }

    fn with(edit: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut v: serde_json::Value = serde_json::from_str(REAL).unwrap();
        edit(&mut v);
        match ModelConfig::from_json_bytes(v.to_string().as_bytes(), "config.json") {
            Ok(_) => "ok".into(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn errors_name_the_field() {
        let e = with(|v| v["compress_ratios"].as_array_mut().unwrap().push(4.into()));
        assert!(
            e.contains("`compress_ratios`") && e.contains("45 entries"),
            "{e}"
        );
        let e = with(|v| {
            v.as_object_mut().unwrap().remove("hidden_size");
        });
        assert!(e.contains("`hidden_size`") && e.contains("missing"), "{e}");
        let e = with(|v| v["model_type"] = "llama".into());
        assert!(e.contains("`model_type`") && e.contains("llama"), "{e}");
        let e = with(|v| v["rope_scaling"]["factor"] = "big".into());
        assert!(e.contains("`rope_scaling.factor`"), "{e}");
        let e = with(|v| v["expert_dtype"] = "fp8".into());
        assert!(e.contains("`expert_dtype`"), "{e}");
        let e = with(|v| v["num_key_value_heads"] = 8.into());
        assert!(e.contains("`num_key_value_heads`"), "{e}");
        let e = with(|v| v["compress_ratios"][5] = 16.into());
        assert!(e.contains("entry 5 is 16"), "{e}");
        let e = with(|v| v["architectures"] = serde_json::json!(["LlamaForCausalLM"]));
        assert!(e.contains("`architectures`") && e.contains("Llama"), "{e}");
        let e = with(|v| v["swiglu_limit"] = (-1.0).into());
        assert!(e.contains("`swiglu_limit`"), "{e}");
        let e = with(|v| v["routed_scaling_factor"] = 0.0.into());
        assert!(e.contains("`routed_scaling_factor`"), "{e}");
        let e = with(|v| v["sliding_window"] = (1u64 << 31).into());
        assert!(
            e.contains("`sliding_window`") && e.contains("exceeds"),
            "{e}"
        );
        let e = with(|v| v["max_position_embeddings"] = (1u64 << 53).into());
        assert!(e.contains("`max_position_embeddings`"), "{e}");
        let e = with(|v| v["rope_theta"] = 1.0.into());
        assert!(e.contains("`rope_theta`"), "{e}");
        let e = with(|v| v["rope_scaling"]["original_max_position_embeddings"] = 0.into());
        assert!(e.contains("original_max_position_embeddings"), "{e}");
        // The initial revision has no expert_dtype: still FP4, still accepted.
        assert_eq!(
            with(|v| {
                v.as_object_mut().unwrap().remove("expert_dtype");
            }),
            "ok"
        );
        assert!(!e.contains('\n'));
    }
}
