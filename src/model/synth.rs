//! `dsflash synth`: a random checkpoint in the official layout (names, dtypes, shapes,
//! shards, index, config.json) for any config, deterministic per seed. With `sparse` the
//! payloads are holes, so the real 160 GB layout costs no disk.

use super::checkpoint::Bytes;
use super::config::ModelConfig;
use super::formats::{e8m0_ceil, f32_to_bf16};
use super::layout::{TensorSpec, inventory, release_shard};
use super::weights::Weight;
use crate::fsutil::AtomicFile;
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::Path;

/// Deterministic, fast PRNG (SplitMix64); also the sampler's generator.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1), 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [-1, 1).
    #[inline]
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    /// Roughly standard normal (sum of 4 uniforms, variance-corrected).
    #[inline]
    pub fn normal(&mut self) -> f32 {
        let s = self.uniform() + self.uniform() + self.uniform() + self.uniform();
        s * 0.866_025_4 // sqrt(3/4): each uniform has variance 1/3
    }
}

fn name_seed(seed: u64, name: &str) -> u64 {
    // FNV-1a of the name, mixed with the seed: every tensor's content is independent of the
    // order tensors are written in.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x1000_0000_01b3);
    }
    h ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// What `synth` wrote.
pub struct SynthReport {
    pub shards: usize,
    pub tensors: usize,
    pub payload_bytes: u64,
}

/// Write a checkpoint for `cfg_json` (the config file's bytes, copied verbatim) into `out`.
/// Each file appears under its name only when complete; `stop` returning true ends the
/// work between tensors (what is half-written is removed).
pub fn synth(
    cfg_json: &[u8],
    out: &Path,
    seed: u64,
    sparse: bool,
    stop: &dyn Fn() -> bool,
) -> anyhow::Result<SynthReport> {
    let cfg = ModelConfig::from_json_bytes(cfg_json, "config")?;
    std::fs::create_dir_all(out)
        .map_err(|e| anyhow::anyhow!("{}: cannot create output directory: {e}", out.display()))?;
    let inv = inventory(&cfg);
    if !sparse {
        let need: u64 = inv.iter().map(|t| t.nbytes() as u64).sum();
        if let Some(free) = crate::fsutil::free_bytes(out)
            && need > free
        {
            anyhow::bail!(
                "{}: not enough disk space: the checkpoint needs {:.1} GB, {:.1} GB free (--sparse writes the layout without the payloads)",
                out.display(),
                need as f64 / 1e9,
                free as f64 / 1e9
            );
        }
    }
    let mut by_shard: BTreeMap<usize, Vec<&TensorSpec>> = BTreeMap::new();
    let mut n_shards = 1;
    for t in &inv {
        let (i, n) = release_shard(&cfg, t);
        n_shards = n;
        by_shard.entry(i).or_default().push(t);
    }
    let specs: std::collections::HashMap<&str, &TensorSpec> =
        inv.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut weight_map = BTreeMap::new();
    let mut total: u64 = 0;
    for (i, tensors) in &by_shard {
        let fname = format!("model-{:05}-of-{:05}.safetensors", i + 1, n_shards);
        // Header: tensors in inventory order, contiguous offsets.
        let mut header = serde_json::Map::new();
        let mut meta = serde_json::Map::new();
        meta.insert("format".into(), "pt".into());
        header.insert("__metadata__".into(), serde_json::Value::Object(meta));
        let mut off = 0usize;
        for t in tensors {
            let n = t.nbytes();
            header.insert(
                t.name.clone(),
                serde_json::json!({"dtype": format!("{:?}", t.dtype), "shape": t.shape, "data_offsets": [off, off + n]}),
            );
            off += n;
            weight_map.insert(t.name.clone(), fname.clone());
        }
        total += off as u64;
        let mut hbytes = serde_json::to_vec(&serde_json::Value::Object(header))?;
        while hbytes.len() % 8 != 0 {
            hbytes.push(b' ');
        }
        let path = out.join(&fname);
        let io = |e: std::io::Error| anyhow::anyhow!("{}: {e}", path.display());
        let mut w = BufWriter::with_capacity(1 << 22, AtomicFile::create(&path)?);
        w.write_all(&(hbytes.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(&hbytes).map_err(io)?;
        if sparse {
            let f = w.into_inner().map_err(|e| io(e.into_error()))?;
            f.file()
                .set_len(8 + hbytes.len() as u64 + off as u64)
                .map_err(io)?;
            f.commit()?;
        } else {
            let mut buf = Vec::new();
            for t in tensors {
                if stop() {
                    anyhow::bail!("interrupted");
                }
                fill(&cfg, t, &specs, seed, &mut buf);
                w.write_all(&buf).map_err(io)?;
            }
            w.into_inner().map_err(|e| io(e.into_error()))?.commit()?;
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    crate::fsutil::write_atomic(
        &out.join("model.safetensors.index.json"),
        &serde_json::to_vec_pretty(&index)?,
    )?;
    crate::fsutil::write_atomic(&out.join("config.json"), cfg_json)?;
    Ok(SynthReport {
        shards: by_shard.len(),
        tensors: inv.len(),
        payload_bytes: total,
    })
}

/// Random but valid contents for one tensor: no NaN codes or scales, magnitudes like a
/// trained model's (weights ~ 1/sqrt(fan_in), norms ~ 1).
fn fill(
    cfg: &ModelConfig,
    t: &TensorSpec,
    specs: &std::collections::HashMap<&str, &TensorSpec>,
    seed: u64,
    buf: &mut Vec<u8>,
) {
    let mut rng = SplitMix64::new(name_seed(seed, &t.name));
    let n = t.nbytes();
    buf.clear();
    buf.reserve(n);
    let fan_in = |w: &TensorSpec| -> f32 {
        match w.dtype {
            Dtype::I8 => (w.shape[1] * 2) as f32,
            _ => *w.shape.last().unwrap_or(&1) as f32,
        }
    };
    match t.dtype {
        Dtype::F8_E4M3 => {
            // sign | exponent 5..=9 | mantissa: magnitudes 0.25 .. 3.75 (std ≈ 1.6).
            while buf.len() < n {
                let r = rng.next_u64();
                for k in 0..8 {
                    if buf.len() == n {
                        break;
                    }
                    let b = (r >> (8 * k)) as u8;
                    let e = 5 + (b >> 3) % 5;
                    buf.push((b & 0x80) | (e << 3) | (b & 0x07));
                }
            }
        }
        Dtype::I8 => {
            // Every E2M1 nibble is valid: std of the code values ≈ 3.
            while buf.len() < n {
                let r = rng.next_u64().to_le_bytes();
                let take = (n - buf.len()).min(8);
                buf.extend_from_slice(&r[..take]);
            }
        }
        Dtype::F8_E8M0 => {
            let wname = t.name.trim_end_matches(".scale").to_string() + ".weight";
            let w = specs.get(wname.as_str());
            let (code_std, fi) = match w {
                Some(w) if w.dtype == Dtype::I8 => (3.0, fan_in(w)),
                Some(w) => (1.6, fan_in(w)),
                None => (1.0, 1.0),
            };
            // scale ≈ 1 / (code_std · sqrt(fan_in)), jittered by one binade.
            let base = e8m0_ceil(1.0 / (code_std * fi.sqrt())) as i32;
            for _ in 0..n {
                let j = (rng.next_u64() % 3) as i32 - 1;
                buf.push((base + j).clamp(1, 254) as u8);
            }
        }
        Dtype::BF16 => {
            let elems = n / 2;
            let is_vec = t.shape.len() == 1;
            let std = if is_vec { 0.1 } else { 1.0 / fan_in(t).sqrt() };
            let mean = if is_vec { 1.0 } else { 0.0 };
            for _ in 0..elems {
                let v = mean + rng.normal() * std;
                buf.extend_from_slice(&f32_to_bf16(v).to_le_bytes());
            }
        }
        Dtype::F32 => {
            let elems = n / 4;
            let name = t.name.as_str();
            let (mean, std) = if name.ends_with("_fn") {
                (0.0, 0.5 / fan_in(t).sqrt())
            } else if name.ends_with("_scale") {
                (1.0, 0.2)
            } else if name.ends_with("_base") || name.ends_with("gate.bias") {
                (0.0, 0.5)
            } else {
                (0.0, 1.0) // sinks, ape
            };
            for _ in 0..elems {
                let v = mean + rng.normal() * std;
                buf.extend_from_slice(&v.to_le_bytes());
            }
        }
        Dtype::I64 => {
            // tid2eid: k distinct expert ids per token.
            let k = t.shape[1];
            let e = cfg.n_routed_experts as u64;
            for _ in 0..t.shape[0] {
                let mut row: Vec<u64> = Vec::with_capacity(k);
                while row.len() < k {
                    let x = rng.next_u64() % e;
                    if !row.contains(&x) {
                        row.push(x);
                    }
                }
                for x in row {
                    buf.extend_from_slice(&(x as i64).to_le_bytes());
                }
            }
        }
        _ => buf.resize(n, 0),
    }
    debug_assert_eq!(buf.len(), n);
}

pub fn random_bytes(rng: &mut SplitMix64, n: usize, fix: impl Fn(u8) -> u8) -> Bytes {
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        v.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    v.truncate(n);
    v.iter_mut().for_each(|b| *b = fix(*b));
    Bytes::from_vec(v)
}

/// A random weight of the given format ("fp4", "fp8", else bf16) and shape (valid codes, scales near 1/sqrt(cols)).
pub fn random_weight(kind: &str, rows: usize, cols: usize, rng: &mut SplitMix64) -> Weight {
    random_weight_scaled(kind, rows, cols, rng, |_| 120)
}

/// [`random_weight`] with each E8M0 scale byte made by `scale` from a random byte.
pub fn random_weight_scaled(
    kind: &str,
    rows: usize,
    cols: usize,
    rng: &mut SplitMix64,
    scale: impl Fn(u8) -> u8,
) -> Weight {
    match kind {
        "fp4" => Weight::Fp4 {
            rows,
            cols,
            packed: random_bytes(rng, rows * cols / 2, |b| b),
            scales: random_bytes(rng, rows * cols / 32, &scale),
        },
        "fp8" => Weight::Fp8 {
            rows,
            cols,
            codes: random_bytes(rng, rows * cols, |b| {
                if b & 0x7F == 0x7F { b & 0xFE } else { b }
            }),
            scales: random_bytes(rng, rows.div_ceil(128) * cols.div_ceil(128), &scale),
        },
        _ => Weight::Bf16 {
            rows,
            cols,
            data: random_bytes(rng, rows * cols * 2, |b| b & 0xBF), // exponents kept small
        },
    }
}
