//! The tensor inventory a config implies (spec §3): every name, dtype and shape the official
//! release stores, grouped by component. Checkpoint validation, `inspect` and `synth` all
//! derive from this one list.

use super::config::{AttnKind, ModelConfig, Routing};
use safetensors::Dtype;

/// Component a tensor belongs to (for byte accounting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    Embed,
    Head,
    /// Final norm + HC head.
    FinalNorm,
    /// wq_a, wq_b, wkv, wo_a, wo_b (+ scales), q_norm, kv_norm, sinks.
    Attention,
    /// hc_attn_* and hc_ffn_*.
    HyperConnections,
    /// attn_norm, ffn_norm.
    Norms,
    /// gate.weight and gate.bias.
    Router,
    /// gate.tid2eid.
    HashTable,
    RoutedExperts,
    SharedExpert,
    Compressor,
    Indexer,
    /// Everything under `mtp.`.
    Mtp,
}

impl Component {
    pub const ALL: [Component; 13] = [
        Component::Embed,
        Component::Head,
        Component::FinalNorm,
        Component::Attention,
        Component::HyperConnections,
        Component::Norms,
        Component::Router,
        Component::HashTable,
        Component::RoutedExperts,
        Component::SharedExpert,
        Component::Compressor,
        Component::Indexer,
        Component::Mtp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Component::Embed => "embed",
            Component::Head => "head",
            Component::FinalNorm => "final_norm_hc_head",
            Component::Attention => "attention",
            Component::HyperConnections => "hyper_connections",
            Component::Norms => "norms",
            Component::Router => "router",
            Component::HashTable => "hash_tid2eid",
            Component::RoutedExperts => "routed_experts",
            Component::SharedExpert => "shared_expert",
            Component::Compressor => "compressors",
            Component::Indexer => "indexers",
            Component::Mtp => "mtp",
        }
    }
}

/// One tensor the model needs.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub component: Component,
    /// Block index (main layers, then MTP blocks) or None for global tensors.
    pub layer: Option<usize>,
    /// Routed expert index, for expert tensors.
    pub expert: Option<usize>,
}

impl TensorSpec {
    pub fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// Builder that appends specs with a shared prefix/component.
struct Inv<'a> {
    out: &'a mut Vec<TensorSpec>,
    layer: Option<usize>,
    expert: Option<usize>,
}

impl Inv<'_> {
    fn push(&mut self, name: String, dtype: Dtype, shape: &[usize], component: Component) {
        self.out.push(TensorSpec {
            name,
            dtype,
            shape: shape.to_vec(),
            component,
            layer: self.layer,
            expert: self.expert,
        });
    }

    /// FP8 weight [o, i] + E8M0 scale [ceil(o/128), ceil(i/128)].
    fn fp8(&mut self, base: &str, o: usize, i: usize, c: Component) {
        self.push(format!("{base}.weight"), Dtype::F8_E4M3, &[o, i], c);
        self.push(
            format!("{base}.scale"),
            Dtype::F8_E8M0,
            &[o.div_ceil(128), i.div_ceil(128)],
            c,
        );
    }

    /// FP4 weight: I8 [o, i/2] + E8M0 scale [o, i/32].
    fn fp4(&mut self, base: &str, o: usize, i: usize, c: Component) {
        self.push(format!("{base}.weight"), Dtype::I8, &[o, i / 2], c);
        self.push(format!("{base}.scale"), Dtype::F8_E8M0, &[o, i / 32], c);
    }
}

/// Every tensor of the checkpoint, in a stable order: globals, layers 0.., MTP blocks.
pub fn inventory(cfg: &ModelConfig) -> Vec<TensorSpec> {
    let mut out = Vec::new();
    let d = cfg.hidden_size;
    let v = cfg.vocab_size;
    let hc = cfg.hc_mult;
    {
        let mut g = Inv {
            out: &mut out,
            layer: None,
            expert: None,
        };
        g.push(
            "embed.weight".into(),
            Dtype::BF16,
            &[v, d],
            Component::Embed,
        );
        g.push("head.weight".into(), Dtype::BF16, &[v, d], Component::Head);
        g.push(
            "norm.weight".into(),
            Dtype::BF16,
            &[d],
            Component::FinalNorm,
        );
        g.push(
            "hc_head_fn".into(),
            Dtype::F32,
            &[hc, hc * d],
            Component::FinalNorm,
        );
        g.push(
            "hc_head_base".into(),
            Dtype::F32,
            &[hc],
            Component::FinalNorm,
        );
        g.push(
            "hc_head_scale".into(),
            Dtype::F32,
            &[1],
            Component::FinalNorm,
        );
    }
    for layer in 0..cfg.total_blocks() {
        let is_mtp = layer >= cfg.num_hidden_layers;
        let prefix = if is_mtp {
            format!("mtp.{}.", layer - cfg.num_hidden_layers)
        } else {
            format!("layers.{layer}.")
        };
        block(cfg, layer, &prefix, is_mtp, &mut out);
    }
    out
}

fn block(cfg: &ModelConfig, layer: usize, p: &str, is_mtp: bool, out: &mut Vec<TensorSpec>) {
    let d = cfg.hidden_size;
    let hc = cfg.hc_mult;
    let mix = cfg.hc_mix();
    let h = cfg.num_attention_heads;
    let hd = cfg.head_dim;
    let ql = cfg.q_lora_rank;
    let g = cfg.o_groups;
    let ol = cfg.o_lora_rank;
    let e = cfg.n_routed_experts;
    let inter = cfg.moe_intermediate_size;
    // MTP tensors are all accounted as MTP; main-layer tensors by their role.
    let c = |comp: Component| if is_mtp { Component::Mtp } else { comp };
    let mut b = Inv {
        out,
        layer: Some(layer),
        expert: None,
    };
    for part in ["attn", "ffn"] {
        let hcc = c(Component::HyperConnections);
        b.push(format!("{p}hc_{part}_fn"), Dtype::F32, &[mix, hc * d], hcc);
        b.push(format!("{p}hc_{part}_base"), Dtype::F32, &[mix], hcc);
        b.push(format!("{p}hc_{part}_scale"), Dtype::F32, &[3], hcc);
    }
    b.push(
        format!("{p}attn_norm.weight"),
        Dtype::BF16,
        &[d],
        c(Component::Norms),
    );
    b.push(
        format!("{p}ffn_norm.weight"),
        Dtype::BF16,
        &[d],
        c(Component::Norms),
    );
    let at = c(Component::Attention);
    b.push(format!("{p}attn.attn_sink"), Dtype::F32, &[h], at);
    b.fp8(&format!("{p}attn.wq_a"), ql, d, at);
    b.push(format!("{p}attn.q_norm.weight"), Dtype::BF16, &[ql], at);
    b.fp8(&format!("{p}attn.wq_b"), h * hd, ql, at);
    b.fp8(&format!("{p}attn.wkv"), hd, d, at);
    b.push(format!("{p}attn.kv_norm.weight"), Dtype::BF16, &[hd], at);
    b.fp8(&format!("{p}attn.wo_a"), g * ol, h * hd / g, at);
    b.fp8(&format!("{p}attn.wo_b"), d, g * ol, at);
    let ratio = cfg.compress_ratio(layer);
    if ratio != 0 {
        let coff = if ratio == 4 { 2 } else { 1 };
        let cc = c(Component::Compressor);
        let cp = format!("{p}attn.compressor.");
        b.push(format!("{cp}ape"), Dtype::F32, &[ratio, coff * hd], cc);
        b.push(format!("{cp}wkv.weight"), Dtype::BF16, &[coff * hd, d], cc);
        b.push(
            format!("{cp}wgate.weight"),
            Dtype::BF16,
            &[coff * hd, d],
            cc,
        );
        b.push(format!("{cp}norm.weight"), Dtype::BF16, &[hd], cc);
        if cfg.attn_kind(layer) == AttnKind::Csa {
            let ic = c(Component::Indexer);
            let ih = cfg.index_n_heads;
            let ihd = cfg.index_head_dim;
            let ip = format!("{p}attn.indexer.");
            b.fp8(&format!("{ip}wq_b"), ih * ihd, ql, ic);
            b.push(
                format!("{ip}weights_proj.weight"),
                Dtype::BF16,
                &[ih, d],
                ic,
            );
            b.push(format!("{ip}compressor.ape"), Dtype::F32, &[4, 2 * ihd], ic);
            b.push(
                format!("{ip}compressor.wkv.weight"),
                Dtype::BF16,
                &[2 * ihd, d],
                ic,
            );
            b.push(
                format!("{ip}compressor.wgate.weight"),
                Dtype::BF16,
                &[2 * ihd, d],
                ic,
            );
            b.push(
                format!("{ip}compressor.norm.weight"),
                Dtype::BF16,
                &[ihd],
                ic,
            );
        }
    }
    let rc = c(Component::Router);
    b.push(format!("{p}ffn.gate.weight"), Dtype::BF16, &[e, d], rc);
    if !is_mtp && cfg.routing(layer) == Routing::Hash {
        b.push(
            format!("{p}ffn.gate.tid2eid"),
            Dtype::I64,
            &[cfg.vocab_size, cfg.num_experts_per_tok],
            c(Component::HashTable),
        );
    } else {
        b.push(format!("{p}ffn.gate.bias"), Dtype::F32, &[e], rc);
    }
    let ec = c(Component::RoutedExperts);
    for j in 0..e {
        b.expert = Some(j);
        b.fp4(&format!("{p}ffn.experts.{j}.w1"), inter, d, ec);
        b.fp4(&format!("{p}ffn.experts.{j}.w3"), inter, d, ec);
        b.fp4(&format!("{p}ffn.experts.{j}.w2"), d, inter, ec);
    }
    b.expert = None;
    let sc = c(Component::SharedExpert);
    b.fp8(&format!("{p}ffn.shared_experts.w1"), inter, d, sc);
    b.fp8(&format!("{p}ffn.shared_experts.w3"), inter, d, sc);
    b.fp8(&format!("{p}ffn.shared_experts.w2"), d, inter, sc);
    if is_mtp {
        let m = Component::Mtp;
        b.fp8(&format!("{p}e_proj"), d, d, m);
        b.fp8(&format!("{p}h_proj"), d, d, m);
        b.push(format!("{p}enorm.weight"), Dtype::BF16, &[d], m);
        b.push(format!("{p}hnorm.weight"), Dtype::BF16, &[d], m);
        b.push(format!("{p}norm.weight"), Dtype::BF16, &[d], m);
        b.push(format!("{p}hc_head_fn"), Dtype::F32, &[hc, hc * d], m);
        b.push(format!("{p}hc_head_base"), Dtype::F32, &[hc], m);
        b.push(format!("{p}hc_head_scale"), Dtype::F32, &[1], m);
    }
}

/// Which shard a tensor goes to in the release's scheme (spec §2): embed in shard 1, main
/// layer i in shard i+2, head/norm/hc_head in the next, each MTP block in its own last shard.
/// Returns (0-based shard index, number of shards). Used by `synth` only; loading reads the
/// index and never assumes this.
pub fn release_shard(cfg: &ModelConfig, spec: &TensorSpec) -> (usize, usize) {
    let n_layers = cfg.num_hidden_layers;
    let n_shards = n_layers + 2 + cfg.num_nextn_predict_layers;
    let idx = match (spec.layer, spec.component) {
        (None, Component::Embed) => 0,
        (None, _) => n_layers + 1,
        (Some(l), _) if l < n_layers => l + 1,
        (Some(l), _) => n_layers + 2 + (l - n_layers),
    };
    (idx, n_shards)
}

/// Bytes one decoded token must read at batch 1 (spec §3.6): per main layer everything but
/// the routed experts and the hash table, plus `num_experts_per_tok` experts and one
/// tid2eid row; compressors and indexers; the whole head; one embedding row. MTP not run.
pub fn bytes_per_token(cfg: &ModelConfig, inv: &[TensorSpec]) -> u64 {
    let mut total: u64 = 0;
    let mut expert_bytes_l0: u64 = 0;
    for t in inv {
        let b = t.nbytes() as u64;
        match t.component {
            Component::Embed => total += (cfg.hidden_size * 2) as u64,
            Component::HashTable => total += (cfg.num_experts_per_tok * 8) as u64,
            Component::RoutedExperts => {
                if t.expert == Some(0) {
                    expert_bytes_l0 += b;
                }
            }
            Component::Mtp => {}
            _ => total += b,
        }
    }
    // expert_bytes_l0 sums expert 0 of every main layer; each layer reads k experts.
    total + expert_bytes_l0 * cfg.num_experts_per_tok as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn real() -> ModelConfig {
        let s = include_str!("../../tests/fixtures/deepseek-v4-flash-config.json");
        ModelConfig::from_json_bytes(s.as_bytes(), "config.json").unwrap()
    }

    #[test]
    fn real_inventory_matches_published_counts() {
        // Spec §2/§3: 69,187 tensors, 159,609,485,896 bytes; dtype counts BF16 433, F32 417,
        // F8_E4M3 375, F8_E8M0 34,167, I8 33,792, I64 3; MTP 1,575 tensors, 3,593,787,756 B.
        let cfg = real();
        let inv = inventory(&cfg);
        assert_eq!(inv.len(), 69_187);
        let total: u64 = inv.iter().map(|t| t.nbytes() as u64).sum();
        assert_eq!(total, 159_609_485_896);
        let mut by: BTreeMap<String, usize> = BTreeMap::new();
        for t in &inv {
            *by.entry(format!("{:?}", t.dtype)).or_default() += 1;
        }
        let want: BTreeMap<String, usize> = [
            ("BF16", 433),
            ("F32", 417),
            ("F8_E4M3", 375),
            ("F8_E8M0", 34_167),
            ("I8", 33_792),
            ("I64", 3),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(by, want);
        let mtp: Vec<_> = inv
            .iter()
            .filter(|t| t.component == Component::Mtp)
            .collect();
        assert_eq!(mtp.len(), 1_575);
        assert_eq!(
            mtp.iter().map(|t| t.nbytes() as u64).sum::<u64>(),
            3_593_787_756
        );
        // Per-component figures of spec §3.6.
        let comp = |c: Component| -> u64 {
            inv.iter()
                .filter(|t| t.component == c)
                .map(|t| t.nbytes() as u64)
                .sum()
        };
        assert_eq!(comp(Component::RoutedExperts), 147_169_738_752);
        assert_eq!(comp(Component::SharedExpert), 1_082_196_480);
        assert_eq!(comp(Component::Attention), 4_599_478_144);
        assert_eq!(comp(Component::HyperConnections), 135_275_592);
        assert_eq!(comp(Component::Compressor), 525_722_624);
        assert_eq!(comp(Component::Indexer), 275_353_344);
        assert_eq!(comp(Component::HashTable), 18_616_320);
    }

    #[test]
    fn real_bytes_per_token() {
        // Spec §3.6: 9,357,164,120 (43 blocks incl. 40 biases and 3x6 tid2eid entries)
        // + 801,075,968 compressors/indexers + 1,059,061,760 head + 8,192 embed row
        // + 262,164 hc_head + 8,192 final norm = 11,217,580,396.
        let cfg = real();
        assert_eq!(bytes_per_token(&cfg, &inventory(&cfg)), 11_217_580_396);
    }

    #[test]
    fn release_shards() {
        let cfg = real();
        let inv = inventory(&cfg);
        let find = |n: &str| inv.iter().find(|t| t.name == n).unwrap();
        assert_eq!(release_shard(&cfg, find("embed.weight")), (0, 46));
        assert_eq!(
            release_shard(&cfg, find("layers.0.attn.wq_a.weight")),
            (1, 46)
        );
        assert_eq!(release_shard(&cfg, find("head.weight")), (44, 46));
        assert_eq!(release_shard(&cfg, find("mtp.0.e_proj.weight")), (45, 46));
    }
}
