//! Typed, zero-copy views of every tensor the model uses, by the spec's names (§3).
//! Large matrices stay in their stored format inside the mmap; the few small F32/BF16
//! vectors (norm weights, sinks, biases, mHC parameters, `ape`) are decoded to f32 once.

use super::checkpoint::{Bytes, Checkpoint, CheckpointError};
use super::config::{AttnKind, ModelConfig, Routing};
use super::formats::{bf16_at, f32_at, i64_at};

/// A linear layer's weight [rows = out, cols = in] in one of the stored formats.
#[derive(Clone, Debug)]
pub enum Weight {
    /// E4M3 codes [rows, cols] + E8M0 scales [ceil(rows/128), ceil(cols/128)].
    Fp8 {
        rows: usize,
        cols: usize,
        codes: Bytes,
        scales: Bytes,
    },
    /// Packed E2M1 [rows, cols/2] + E8M0 scales [rows, cols/32].
    Fp4 {
        rows: usize,
        cols: usize,
        packed: Bytes,
        scales: Bytes,
    },
    /// BF16 [rows, cols].
    Bf16 {
        rows: usize,
        cols: usize,
        data: Bytes,
    },
}

impl Weight {
    pub fn rows(&self) -> usize {
        match self {
            Weight::Fp8 { rows, .. } | Weight::Fp4 { rows, .. } | Weight::Bf16 { rows, .. } => {
                *rows
            }
        }
    }
    pub fn cols(&self) -> usize {
        match self {
            Weight::Fp8 { cols, .. } | Weight::Fp4 { cols, .. } | Weight::Bf16 { cols, .. } => {
                *cols
            }
        }
    }
    /// The same weight in owned bytes read from the checkpoint's files (`Bytes::read_copy`).
    pub fn read_copy(&self, bufs: &crate::model::ReadBuffers) -> std::io::Result<Weight> {
        Ok(match self {
            Weight::Fp8 {
                rows,
                cols,
                codes,
                scales,
            } => Weight::Fp8 {
                rows: *rows,
                cols: *cols,
                codes: codes.read_copy(bufs)?,
                scales: scales.read_copy(bufs)?,
            },
            Weight::Fp4 {
                rows,
                cols,
                packed,
                scales,
            } => Weight::Fp4 {
                rows: *rows,
                cols: *cols,
                packed: packed.read_copy(bufs)?,
                scales: scales.read_copy(bufs)?,
            },
            Weight::Bf16 { rows, cols, data } => Weight::Bf16 {
                rows: *rows,
                cols: *cols,
                data: data.read_copy(bufs)?,
            },
        })
    }

    /// Bytes this weight occupies in the checkpoint (codes + scales).
    pub fn stored_bytes(&self) -> usize {
        match self {
            Weight::Fp8 { codes, scales, .. } => codes.len() + scales.len(),
            Weight::Fp4 { packed, scales, .. } => packed.len() + scales.len(),
            Weight::Bf16 { data, .. } => data.len(),
        }
    }
}

/// mHC parameters of one site (spec §5.3): fn [mix, hc·D], base [mix], scale [3].
pub struct HcParams {
    pub fn_: Vec<f32>,
    pub base: Vec<f32>,
    pub scale: Vec<f32>,
}

/// Compressor (spec §5.6): ape [r, c·d], wkv/wgate [c·d, D], norm [d].
pub struct CompressorWeights {
    pub ratio: usize,
    /// Output row width d (head_dim for the main compressor, index_head_dim for the indexer's).
    pub dim: usize,
    pub ape: Vec<f32>,
    pub wkv: Weight,
    pub wgate: Weight,
    pub norm: Vec<f32>,
}

impl CompressorWeights {
    /// 2 for the overlapping ratio-4 compressor, 1 otherwise.
    pub fn coff(&self) -> usize {
        if self.ratio == 4 { 2 } else { 1 }
    }
}

pub struct IndexerWeights {
    pub wq_b: Weight,
    pub weights_proj: Weight,
    pub compressor: CompressorWeights,
}

pub struct AttnWeights {
    pub sink: Vec<f32>,
    pub wq_a: Weight,
    pub q_norm: Vec<f32>,
    pub wq_b: Weight,
    pub wkv: Weight,
    pub kv_norm: Vec<f32>,
    pub wo_a: Weight,
    pub wo_b: Weight,
    pub compressor: Option<CompressorWeights>,
    pub indexer: Option<IndexerWeights>,
}

/// w1 = gate proj, w3 = up proj, w2 = down proj.
#[derive(Clone, Debug)]
pub struct ExpertWeights {
    pub w1: Weight,
    pub w3: Weight,
    pub w2: Weight,
}

impl ExpertWeights {
    /// w1, w3, w2.
    pub fn matrices(&self) -> [&Weight; 3] {
        [&self.w1, &self.w3, &self.w2]
    }
}

pub struct MoeWeights {
    pub gate: Weight,
    pub bias: Option<Vec<f32>>,
    /// tid2eid [vocab, k] int64 (hash layers).
    pub tid2eid: Option<Bytes>,
    pub experts: Vec<ExpertWeights>,
    pub shared: ExpertWeights,
}

impl MoeWeights {
    /// The hash-routed experts of a token (spec §5.10 step 3).
    pub fn hashed_experts(&self, token: u32, k: usize) -> Option<Vec<usize>> {
        let t = self.tid2eid.as_ref()?;
        Some(
            (0..k)
                .map(|j| i64_at(t, token as usize * k + j) as usize)
                .collect(),
        )
    }
}

pub struct BlockWeights {
    pub layer: usize,
    pub ratio: usize,
    pub kind: AttnKind,
    pub routing: Routing,
    pub hc_attn: HcParams,
    pub hc_ffn: HcParams,
    pub attn_norm: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    pub attn: AttnWeights,
    pub ffn: MoeWeights,
}

/// The whole model (main layers; MTP blocks are validated and counted but not run yet).
pub struct ModelWeights {
    pub embed: Weight,
    pub head: Weight,
    pub norm: Vec<f32>,
    pub hc_head_fn: Vec<f32>,
    pub hc_head_base: Vec<f32>,
    pub hc_head_scale: Vec<f32>,
    pub layers: Vec<BlockWeights>,
}

/// What a matrix is for: the order a device is filled in (dense first, then the head, then
/// the routed experts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatrixRole {
    /// Attention, compressor, indexer, router and shared-expert weights of a layer.
    Dense {
        layer: usize,
    },
    Head,
    Expert {
        layer: usize,
        expert: usize,
    },
}

impl BlockWeights {
    /// The layer's dense matrices (everything but the routed experts).
    pub fn dense_matrices(&self) -> Vec<&Weight> {
        let a = &self.attn;
        let mut v = vec![&a.wq_a, &a.wq_b, &a.wkv, &a.wo_a, &a.wo_b];
        if let Some(c) = &a.compressor {
            v.extend([&c.wkv, &c.wgate]);
        }
        if let Some(ix) = &a.indexer {
            v.extend([
                &ix.wq_b,
                &ix.weights_proj,
                &ix.compressor.wkv,
                &ix.compressor.wgate,
            ]);
        }
        let f = &self.ffn;
        v.extend([&f.gate, &f.shared.w1, &f.shared.w3, &f.shared.w2]);
        v
    }
}

impl ModelWeights {
    /// Every matrix the forward pass multiplies by (the embedding is read by rows, not
    /// multiplied), dense ones first, then the head, then the routed experts.
    pub fn matrices(&self) -> Vec<(MatrixRole, &Weight)> {
        let mut v = Vec::new();
        for b in &self.layers {
            for w in b.dense_matrices() {
                v.push((MatrixRole::Dense { layer: b.layer }, w));
            }
        }
        v.push((MatrixRole::Head, &self.head));
        for b in &self.layers {
            for (e, x) in b.ffn.experts.iter().enumerate() {
                for w in x.matrices() {
                    v.push((
                        MatrixRole::Expert {
                            layer: b.layer,
                            expert: e,
                        },
                        w,
                    ));
                }
            }
        }
        v
    }
}

struct Loader<'a> {
    ck: &'a Checkpoint,
}

impl Loader<'_> {
    fn shape(&self, name: &str) -> Result<Vec<usize>, CheckpointError> {
        self.ck
            .entry(name)
            .map(|e| e.shape.clone())
            .ok_or_else(|| CheckpointError::Dir {
                dir: self.ck.dir.display().to_string(),
                msg: format!("tensor {name} is not in the checkpoint"),
            })
    }
    /// The error for a value a model cannot compute with, naming the tensor and its shard.
    fn bad_value(&self, name: &str, what: String) -> CheckpointError {
        let file = self
            .ck
            .entry(name)
            .and_then(|e| self.ck.shards.get(e.shard))
            .map_or_else(
                || self.ck.dir.display().to_string(),
                |s| s.file_name.clone(),
            );
        CheckpointError::File {
            file,
            msg: format!("tensor {name}: {what}"),
        }
    }
    /// Small vectors decoded once: each must be finite.
    fn finite(&self, name: &str, v: Vec<f32>) -> Result<Vec<f32>, CheckpointError> {
        match v.iter().position(|x| !x.is_finite()) {
            Some(i) => {
                Err(self.bad_value(name, format!("element {i} is {} (corrupt weights?)", v[i])))
            }
            None => Ok(v),
        }
    }
    fn f32v(&self, name: &str) -> Result<Vec<f32>, CheckpointError> {
        let b = self.ck.bytes(name)?;
        self.finite(name, (0..b.len() / 4).map(|i| f32_at(&b, i)).collect())
    }
    fn bf16v(&self, name: &str) -> Result<Vec<f32>, CheckpointError> {
        let b = self.ck.bytes(name)?;
        self.finite(name, (0..b.len() / 2).map(|i| bf16_at(&b, i)).collect())
    }
    /// E8M0 scales: the code 0xFF is NaN. Checked for the dense weights at load (their scales
    /// are 1/16384 of the codes); the routed experts' (GBs on the real model) are left to the
    /// run-time check of the logits.
    fn scales(&self, name: &str) -> Result<Bytes, CheckpointError> {
        let b = self.ck.bytes(name)?;
        match b.iter().position(|&c| c == 0xFF) {
            Some(i) => Err(self.bad_value(
                name,
                format!("scale {i} is the E8M0 NaN code 0xFF (corrupt weights?)"),
            )),
            None => Ok(b),
        }
    }
    fn fp8(&self, base: &str) -> Result<Weight, CheckpointError> {
        let w = format!("{base}.weight");
        let s = self.shape(&w)?;
        Ok(Weight::Fp8 {
            rows: s[0],
            cols: s[1],
            codes: self.ck.bytes(&w)?,
            scales: self.scales(&format!("{base}.scale"))?,
        })
    }
    fn fp4(&self, base: &str) -> Result<Weight, CheckpointError> {
        let w = format!("{base}.weight");
        let s = self.shape(&w)?;
        Ok(Weight::Fp4 {
            rows: s[0],
            cols: s[1] * 2,
            packed: self.ck.bytes(&w)?,
            scales: self.ck.bytes(&format!("{base}.scale"))?,
        })
    }
    fn bf16m(&self, name: &str) -> Result<Weight, CheckpointError> {
        let s = self.shape(name)?;
        Ok(Weight::Bf16 {
            rows: s[0],
            cols: s[1],
            data: self.ck.bytes(name)?,
        })
    }
    /// A small BF16 matrix (the compressors'), checked for non-finite values.
    fn bf16m_finite(&self, name: &str) -> Result<Weight, CheckpointError> {
        let w = self.bf16m(name)?;
        if let Weight::Bf16 { data, .. } = &w
            && let Some(i) = (0..data.len() / 2).find(|&i| !bf16_at(data, i).is_finite())
        {
            return Err(self.bad_value(
                name,
                format!("element {i} is {} (corrupt weights?)", bf16_at(data, i)),
            ));
        }
        Ok(w)
    }
    fn hc(&self, p: &str, site: &str) -> Result<HcParams, CheckpointError> {
        Ok(HcParams {
            fn_: self.f32v(&format!("{p}hc_{site}_fn"))?,
            base: self.f32v(&format!("{p}hc_{site}_base"))?,
            scale: self.f32v(&format!("{p}hc_{site}_scale"))?,
        })
    }
    fn compressor(
        &self,
        p: &str,
        ratio: usize,
        dim: usize,
    ) -> Result<CompressorWeights, CheckpointError> {
        Ok(CompressorWeights {
            ratio,
            dim,
            ape: self.f32v(&format!("{p}ape"))?,
            wkv: self.bf16m_finite(&format!("{p}wkv.weight"))?,
            wgate: self.bf16m_finite(&format!("{p}wgate.weight"))?,
            norm: self.bf16v(&format!("{p}norm.weight"))?,
        })
    }
    fn expert_fp8(&self, p: &str) -> Result<ExpertWeights, CheckpointError> {
        Ok(ExpertWeights {
            w1: self.fp8(&format!("{p}w1"))?,
            w3: self.fp8(&format!("{p}w3"))?,
            w2: self.fp8(&format!("{p}w2"))?,
        })
    }
    fn block(&self, cfg: &ModelConfig, layer: usize) -> Result<BlockWeights, CheckpointError> {
        let p = format!("layers.{layer}.");
        let ratio = cfg.compress_ratio(layer);
        let kind = cfg.attn_kind(layer);
        let a = format!("{p}attn.");
        let compressor = if ratio != 0 {
            Some(self.compressor(&format!("{a}compressor."), ratio, cfg.head_dim)?)
        } else {
            None
        };
        let indexer = if kind == AttnKind::Csa {
            Some(IndexerWeights {
                wq_b: self.fp8(&format!("{a}indexer.wq_b"))?,
                weights_proj: self.bf16m(&format!("{a}indexer.weights_proj.weight"))?,
                compressor: self.compressor(
                    &format!("{a}indexer.compressor."),
                    4,
                    cfg.index_head_dim,
                )?,
            })
        } else {
            None
        };
        let attn = AttnWeights {
            sink: self.f32v(&format!("{a}attn_sink"))?,
            wq_a: self.fp8(&format!("{a}wq_a"))?,
            q_norm: self.bf16v(&format!("{a}q_norm.weight"))?,
            wq_b: self.fp8(&format!("{a}wq_b"))?,
            wkv: self.fp8(&format!("{a}wkv"))?,
            kv_norm: self.bf16v(&format!("{a}kv_norm.weight"))?,
            wo_a: self.fp8(&format!("{a}wo_a"))?,
            wo_b: self.fp8(&format!("{a}wo_b"))?,
            compressor,
            indexer,
        };
        let f = format!("{p}ffn.");
        let routing = cfg.routing(layer);
        let experts = (0..cfg.n_routed_experts)
            .map(|j| {
                Ok(ExpertWeights {
                    w1: self.fp4(&format!("{f}experts.{j}.w1"))?,
                    w3: self.fp4(&format!("{f}experts.{j}.w3"))?,
                    w2: self.fp4(&format!("{f}experts.{j}.w2"))?,
                })
            })
            .collect::<Result<Vec<_>, CheckpointError>>()?;
        let ffn = MoeWeights {
            gate: self.bf16m(&format!("{f}gate.weight"))?,
            bias: match routing {
                Routing::Score => Some(self.f32v(&format!("{f}gate.bias"))?),
                Routing::Hash => None,
            },
            tid2eid: match routing {
                Routing::Hash => Some(self.ck.bytes(&format!("{f}gate.tid2eid"))?),
                Routing::Score => None,
            },
            experts,
            shared: self.expert_fp8(&format!("{f}shared_experts."))?,
        };
        Ok(BlockWeights {
            layer,
            ratio,
            kind,
            routing,
            hc_attn: self.hc(&p, "attn")?,
            hc_ffn: self.hc(&p, "ffn")?,
            attn_norm: self.bf16v(&format!("{p}attn_norm.weight"))?,
            ffn_norm: self.bf16v(&format!("{p}ffn_norm.weight"))?,
            attn,
            ffn,
        })
    }
}

impl ModelWeights {
    /// Build the views. `ck` was validated by `Checkpoint::open`, so every name exists with
    /// the right dtype and shape.
    pub fn from_checkpoint(ck: &Checkpoint) -> Result<ModelWeights, CheckpointError> {
        let cfg = &ck.config;
        let l = Loader { ck };
        let tid_check = |bw: &BlockWeights| -> Result<(), CheckpointError> {
            // Hash tables are data a user's file supplies: an expert id out of range would be
            // an out-of-bounds index later, so check it now.
            if let Some(t) = &bw.ffn.tid2eid {
                let n = t.len() / 8;
                if let Some(i) = (0..n).find(|&i| {
                    let v = i64_at(t, i);
                    v < 0 || v as usize >= cfg.n_routed_experts
                }) {
                    return Err(CheckpointError::Dir {
                        dir: ck.dir.display().to_string(),
                        msg: format!(
                            "tensor layers.{}.ffn.gate.tid2eid: entry {} is {}, expected an expert id < {}",
                            bw.layer,
                            i,
                            i64_at(t, i),
                            cfg.n_routed_experts
                        ),
                    });
                }
            }
            Ok(())
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let b = l.block(cfg, i)?;
            tid_check(&b)?;
            layers.push(b);
        }
        Ok(ModelWeights {
            embed: l.bf16m("embed.weight")?,
            head: l.bf16m("head.weight")?,
            norm: l.bf16v("norm.weight")?,
            hc_head_fn: l.f32v("hc_head_fn")?,
            hc_head_base: l.f32v("hc_head_base")?,
            hc_head_scale: l.f32v("hc_head_scale")?,
            layers,
        })
    }
}
