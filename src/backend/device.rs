//! The device interface the engine's executor calls: memory with a capacity, uploads of
//! tensor views, kernel launches, copies back, and streams ordered by events. Implemented by
//! the CPU ([`super::cpu::CpuDevice`]: host memory, CPU kernels), the simulated device
//! ([`super::sim::SimDevice`]: the CPU's results with a capacity and a transfer-cost clock)
//! and CUDA ([`super::cuda::CudaDevice`]). Ops name buffers, never the model.

use crate::model::weights::Weight;
use std::ops::Range;

/// A device buffer (bytes; the op says how they are read: f32 or i32, little-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Buf(pub u64);

/// A queue of work. Work on one stream runs in order; streams order each other by events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stream(pub u32);

impl Stream {
    /// Kernels.
    pub const COMPUTE: Stream = Stream(0);
    /// Background copies (weight promotion), overlapped with compute.
    pub const COPY: Stream = Stream(1);
}

/// A point in a stream's work, for another stream to wait on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Event(pub u64);

/// Stored format of a weight on a device (the same bytes as in the checkpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Fp8,
    Fp4,
    Bf16,
}

/// A weight resident on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DevWeight {
    pub id: u64,
    pub format: Format,
    pub rows: usize,
    pub cols: usize,
    /// Device bytes it occupies (codes + scales).
    pub bytes: u64,
}

impl Format {
    pub fn of(w: &Weight) -> Format {
        match w {
            Weight::Fp8 { .. } => Format::Fp8,
            Weight::Fp4 { .. } => Format::Fp4,
            Weight::Bf16 { .. } => Format::Bf16,
        }
    }
}

/// The ops a device runs. f32 buffers unless noted; shapes in elements.
#[derive(Debug, Clone)]
pub enum Op {
    /// y[t, j] = W[rows.start + j, :] · x[t, :]: x [t, cols], y [t, rows.len()].
    Linear {
        w: DevWeight,
        rows: Range<usize>,
        x: Buf,
        y: Buf,
        t: usize,
    },
    /// Per row of `n`: y = w ⊙ x / sqrt(mean(x²) + eps) (`w` None: unweighted). y may be x.
    RmsNorm {
        x: Buf,
        w: Option<Buf>,
        y: Buf,
        rows: usize,
        n: usize,
        eps: f32,
    },
    /// out[i] = SiLU(min(g[i], limit)) · clamp(u[i], ±limit) (· row_w[row_w_off + i / width]
    /// if given).
    Swiglu {
        g: Buf,
        u: Buf,
        row_w: Option<Buf>,
        row_w_off: usize,
        out: Buf,
        n: usize,
        width: usize,
        limit: f32,
    },
    /// y[i] += a · x[i]
    Axpy { y: Buf, x: Buf, a: f32, n: usize },
    /// Strided row copy: dst[dst_off + r·dst_stride + c] = src[src_off + r·src_stride + c]
    /// for r < rows, c < width (e.g. one group's columns of a [t, groups·w] activation, or
    /// rows into a key table). src and dst are different buffers.
    CopyRows {
        src: Buf,
        src_off: usize,
        src_stride: usize,
        dst: Buf,
        dst_off: usize,
        dst_stride: usize,
        rows: usize,
        width: usize,
    },
    /// out[j, :] = x[idx[j], :] for j < n (idx i32): the rows of the tokens routed to one
    /// expert.
    GatherRows {
        x: Buf,
        idx: Buf,
        out: Buf,
        n: usize,
        width: usize,
    },
    /// For j = 0, 1, .. n-1 in that order: y[r_j, :] += f_j · x[x_off + j·width ..][..width]
    /// with r_j = idx[j] (i32; absent: j) and f_j = weights[w_off + j] (absent: 1). Adds one
    /// expert's outputs into the tokens' sums, in the same order as the CPU does.
    AddRows {
        y: Buf,
        x: Buf,
        x_off: usize,
        idx: Option<Buf>,
        weights: Option<Buf>,
        w_off: usize,
        n: usize,
        width: usize,
    },
    /// Interleaved RoPE on the trailing `rope_dim` values of each of `rows` rows of `width`;
    /// row r is at position pos + r / rows_per_pos (e.g. all heads of a token share one).
    Rope {
        x: Buf,
        inv_freq: Buf,
        rows: usize,
        width: usize,
        rope_dim: usize,
        pos: usize,
        rows_per_pos: usize,
        inverse: bool,
    },
    /// Attention with a per-head sink: query j of `t`, head h, over the n_keys[j] (i32) rows
    /// idx[j, ..] (i32, [t, max_keys]) of `keys` [_, hd]; out [t, heads, hd].
    AttendSink {
        q: Buf,
        keys: Buf,
        idx: Buf,
        n_keys: Buf,
        max_keys: usize,
        sink: Buf,
        scale: f32,
        out: Buf,
        t: usize,
        heads: usize,
        hd: usize,
    },
    /// mHC site coefficients per token: x [t, hc, d], fn [2hc + hc², hc·d], base [2hc + hc²]
    /// -> out [t, 2hc + hc²] = [pre | post | comb].
    HcMix {
        x: Buf,
        fn_: Buf,
        base: Buf,
        scale: [f32; 3],
        out: Buf,
        t: usize,
        hc: usize,
        d: usize,
        iters: usize,
        norm_eps: f32,
        hc_eps: f32,
    },
    /// HC head collapse weights per token: fn [hc, hc·d], base [hc] -> out [t, hc].
    HcHead {
        x: Buf,
        fn_: Buf,
        base: Buf,
        scale: f32,
        out: Buf,
        t: usize,
        hc: usize,
        d: usize,
        norm_eps: f32,
        hc_eps: f32,
    },
    /// u[t, :] = Σ_i coef[t·stride + i] · x[t, i, :].
    HcCollapse {
        x: Buf,
        coef: Buf,
        stride: usize,
        u: Buf,
        t: usize,
        hc: usize,
        d: usize,
    },
    /// In place: x[t, k, :] = post_k · f[t, :] + Σ_i comb[i][k] · x[t, i, :] with coef
    /// [t, 2hc + hc²] as `HcMix` writes it.
    HcExpand {
        x: Buf,
        f: Buf,
        coef: Buf,
        t: usize,
        hc: usize,
        d: usize,
    },
    /// out[i] = Σ_h w[h] · ReLU(q[h, :] · keys[i, :]) for i < n: q [ih, ihd], w [ih].
    IndexerScores {
        q: Buf,
        w: Buf,
        keys: Buf,
        out: Buf,
        n: usize,
        ih: usize,
        ihd: usize,
    },
    /// Compressor pooling of `windows` complete windows: per channel, a softmax over the
    /// gates of the previous window's kept halves (prev_*: [windows, r, d], if given) and the
    /// current rows (kv / gate [windows, r, cd], the half at column `off`) weights the values.
    /// out [windows, d].
    CompressPool {
        kv: Buf,
        gate: Buf,
        prev_kv: Option<Buf>,
        prev_gate: Option<Buf>,
        out: Buf,
        windows: usize,
        r: usize,
        d: usize,
        cd: usize,
        off: usize,
    },
    /// In place, the reference numerics' FP8 rounding: the first `len` values of each of
    /// `rows` rows of `width`, per block of `block`, to E4M3 with a power-of-two scale.
    QuantE4m3 {
        x: Buf,
        rows: usize,
        width: usize,
        len: usize,
        block: usize,
    },
    /// In place, the fast numerics' int8 grid: the first `len` values of each of `rows` rows
    /// of `width`, per block of `block`, to q·2^k with integer |q| <= 127
    /// (`formats::fake_quant_i8_blocks`).
    QuantI8 {
        x: Buf,
        rows: usize,
        width: usize,
        len: usize,
        block: usize,
    },
    /// In place, per row of `n` (a power of two): orthonormal Hadamard rotation, then the
    /// E2M1 rounding in blocks of 32 (the indexer's queries and keys).
    HadamardE2m1 { x: Buf, rows: usize, n: usize },
    /// out (i32) [k] = the indices of the k largest of scores[..n] (ties to the lower index),
    /// ascending.
    TopkSelect {
        scores: Buf,
        n: usize,
        k: usize,
        out: Buf,
    },
    /// Per token: sqrt-softplus scores, top-k of score + bias (or the i32 `hashed` experts
    /// [tokens, k]), weights = chosen scores / their sum · scale. Outputs: `experts` i32
    /// [tokens, k], `weights` f32 [tokens, k].
    RouteTopk {
        logits: Buf,
        bias: Option<Buf>,
        hashed: Option<Buf>,
        tokens: usize,
        n_experts: usize,
        k: usize,
        scale: f32,
        experts: Buf,
        weights: Buf,
    },
    /// out (i32) [rows] = index of each row's largest value (lowest index on ties).
    Argmax {
        x: Buf,
        rows: usize,
        n: usize,
        out: Buf,
    },
    /// In place per row: softmax(x / temperature).
    SoftmaxTemp {
        x: Buf,
        rows: usize,
        n: usize,
        temperature: f32,
    },
}

impl Op {
    /// The op's name in errors (the CUDA kernel's, where it has one).
    pub fn name(&self) -> &'static str {
        match self {
            Op::Linear { .. } => "linear",
            Op::RmsNorm { .. } => "rms_norm",
            Op::Swiglu { .. } => "swiglu",
            Op::Axpy { .. } => "axpy",
            Op::CopyRows { .. } => "copy_rows",
            Op::GatherRows { .. } => "gather_rows",
            Op::AddRows { .. } => "add_rows",
            Op::Rope { .. } => "rope",
            Op::AttendSink { .. } => "attend_sink",
            Op::HcMix { .. } => "hc_mix",
            Op::HcHead { .. } => "hc_head",
            Op::HcCollapse { .. } => "hc_collapse",
            Op::HcExpand { .. } => "hc_expand",
            Op::IndexerScores { .. } => "indexer_scores",
            Op::CompressPool { .. } => "compress_pool",
            Op::QuantE4m3 { .. } => "quant_e4m3",
            Op::QuantI8 { .. } => "quant_i8",
            Op::HadamardE2m1 { .. } => "hadamard_e2m1",
            Op::TopkSelect { .. } => "topk_select",
            Op::RouteTopk { .. } => "route_topk",
            Op::Argmax { .. } => "argmax",
            Op::SoftmaxTemp { .. } => "softmax_temp",
        }
    }

    /// The op's contract on its own arguments, the same on every device (the limits are
    /// those of the CUDA kernels: threads per block, registers per thread). Checked once by
    /// [`Device::launch`] before a device runs the op; a device then checks only what it
    /// alone knows (that the buffers exist and are large enough).
    pub fn check(&self) -> Result<()> {
        let bad = |msg: String| {
            Err(DeviceError::Shape {
                op: self.name(),
                msg,
            })
        };
        match self {
            Op::Linear { w, rows, .. } if rows.start > rows.end || rows.end > w.rows => {
                bad(format!("rows {rows:?} of a weight of {}", w.rows))
            }
            Op::Linear { w, .. } if !w.cols.is_multiple_of(32) => bad(format!(
                "{:?} weight of {} columns: need a multiple of 32",
                w.format, w.cols
            )),
            Op::Linear { w, rows, .. }
                if w.format == Format::Fp8 && !rows.start.is_multiple_of(128) =>
            {
                bad(format!(
                    "FP8 rows from {}: need whole 128-row scale blocks",
                    rows.start
                ))
            }
            Op::Rope {
                width, rope_dim, ..
            } if *rope_dim > *width || rope_dim % 2 != 0 || *rope_dim > 2048 => bad(format!(
                "rope_dim {rope_dim} in width {width}: need even, up to 2048"
            )),
            Op::AttendSink { hd, .. } if *hd > 512 || !hd.is_multiple_of(32) => {
                bad(format!("head dim {hd}: need a multiple of 32 up to 512"))
            }
            Op::HcMix { hc, .. }
            | Op::HcHead { hc, .. }
            | Op::HcCollapse { hc, .. }
            | Op::HcExpand { hc, .. }
                if *hc == 0 || *hc > 8 =>
            {
                bad(format!("hc {hc}: need 1..=8"))
            }
            Op::CompressPool { d, cd, off, .. } if off + d > *cd => {
                bad(format!("half at {off} + {d} past {cd}"))
            }
            Op::QuantE4m3 {
                width, len, block, ..
            }
            | Op::QuantI8 {
                width, len, block, ..
            } if *block == 0 || *block > 1024 || len > width => bad(format!(
                "{len} of {width} in blocks of {block}: need blocks of 1..=1024"
            )),
            Op::HadamardE2m1 { n, .. } if !n.is_power_of_two() || *n < 32 || *n > 1024 => {
                bad(format!("length {n}: need a power of two in 32..=1024"))
            }
            Op::TopkSelect { n, k, .. } if k > n => bad(format!("k {k} > n {n}")),
            Op::RouteTopk { n_experts, k, .. } if *n_experts > 1024 || *k > 16 || k > n_experts => {
                bad(format!(
                    "{n_experts} experts, top {k}: need up to 1024, top up to 16"
                ))
            }
            _ => Ok(()),
        }
    }

    /// What the op costs: (bytes it moves through device memory, flops). The simulated
    /// device's clock runs on it.
    pub fn cost(&self) -> (f64, f64) {
        let f = |v: usize| v as f64;
        match self {
            Op::Linear { w, rows, t, .. } => {
                let frac = f(rows.len()) / f(w.rows.max(1));
                let io = 4.0 * f(t * (w.cols + rows.len()));
                (w.bytes as f64 * frac + io, 2.0 * f(rows.len() * w.cols * t))
            }
            Op::RmsNorm { rows, n, .. } => (8.0 * f(rows * n), 3.0 * f(rows * n)),
            Op::Swiglu { n, .. } => (12.0 * f(*n), 10.0 * f(*n)),
            Op::Axpy { n, .. } => (12.0 * f(*n), 2.0 * f(*n)),
            Op::CopyRows { rows, width, .. } | Op::GatherRows { n: rows, width, .. } => {
                (8.0 * f(rows * width), 0.0)
            }
            Op::AddRows { n, width, .. } => (12.0 * f(n * width), 2.0 * f(n * width)),
            Op::Rope { rows, width, .. } => (8.0 * f(rows * width), 0.0),
            Op::RouteTopk {
                tokens, n_experts, ..
            } => (4.0 * f(tokens * n_experts), 0.0),
            Op::Argmax { rows, n, .. } | Op::SoftmaxTemp { rows, n, .. } => {
                (8.0 * f(rows * n), 0.0)
            }
            Op::AttendSink {
                max_keys,
                t,
                heads,
                hd,
                ..
            } => {
                let keys = f(t * max_keys * hd) * f(*heads);
                (4.0 * keys, 4.0 * keys)
            }
            Op::HcMix { t, hc, d, .. } => {
                let mix = 2 * hc + hc * hc;
                (4.0 * f(t * hc * d * (1 + mix)), 2.0 * f(t * mix * hc * d))
            }
            Op::HcHead { t, hc, d, .. } => {
                (4.0 * f(t * hc * d * (1 + hc)), 2.0 * f(t * hc * hc * d))
            }
            Op::HcCollapse { t, hc, d, .. } | Op::HcExpand { t, hc, d, .. } => {
                (8.0 * f(t * hc * d), 2.0 * f(t * hc * hc * d))
            }
            Op::IndexerScores { n, ih, ihd, .. } => (4.0 * f(n * ihd), 2.0 * f(n * ih * ihd)),
            Op::TopkSelect { n, .. } => (20.0 * f(*n), 0.0),
            Op::QuantE4m3 { rows, width, .. } | Op::QuantI8 { rows, width, .. } => {
                (8.0 * f(rows * width), 0.0)
            }
            Op::HadamardE2m1 { rows, n, .. } => (8.0 * f(rows * n), f(rows * n) * f(*n).log2()),
            Op::CompressPool { windows, r, cd, .. } => (8.0 * f(windows * r * cd), 0.0),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device out of memory: {requested} bytes requested, {free} of {capacity} bytes free")]
    OutOfMemory {
        requested: u64,
        free: u64,
        capacity: u64,
    },
    #[error("unknown device buffer or weight {0}")]
    Unknown(u64),
    #[error("{op}: {msg}")]
    Shape { op: &'static str, msg: String },
    #[error("{0}")]
    Backend(String),
}

pub type Result<T> = std::result::Result<T, DeviceError>;

/// Lock `m`, taking the data back from a thread that panicked while holding it (the devices'
/// bookkeeping stays usable; a wrong number there cannot corrupt memory).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Take `bytes` out of a device's `capacity` (`in_use` so far), or say it does not fit.
pub(crate) fn charge(in_use: &mut u64, capacity: u64, bytes: u64) -> Result<()> {
    let free = capacity.saturating_sub(*in_use);
    if bytes > free {
        return Err(DeviceError::OutOfMemory {
            requested: bytes,
            free,
            capacity,
        });
    }
    *in_use += bytes;
    Ok(())
}

/// Counters every device keeps.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    pub bytes_to_device: u64,
    pub bytes_to_host: u64,
    pub transfers: u64,
    pub launches: u64,
    /// Device seconds spent copying (both ways, weights included) and running kernels:
    /// modelled on the simulated device, measured with events on a GPU, 0 on the CPU device.
    pub copy_s: f64,
    pub kernel_s: f64,
}

pub trait Device: Send + Sync {
    /// One line for notices and `/stats`, e.g. "NVIDIA H200 (sm_90, 139.8 GiB)".
    fn name(&self) -> String;
    /// Bytes of device memory this process may use.
    fn capacity(&self) -> u64;
    /// Bytes allocated now.
    fn in_use(&self) -> u64;
    /// A buffer of `bytes` whose contents are unset (the CPU device fills it with NaNs).
    fn alloc(&self, bytes: usize) -> Result<Buf>;
    fn free(&self, b: Buf);
    /// Copy host bytes into a buffer from byte `offset` on, ordered on `s`.
    fn write_at(&self, dst: Buf, offset: usize, src: &[u8], s: Stream) -> Result<()>;
    /// Copy host bytes into a buffer (from offset 0), ordered on `s`.
    fn write(&self, dst: Buf, src: &[u8], s: Stream) -> Result<()> {
        self.write_at(dst, 0, src, s)
    }
    /// Copy a buffer's first `dst.len()` bytes back; returns when they are on the host.
    fn read(&self, src: Buf, dst: &mut [u8], s: Stream) -> Result<()>;
    /// Make a weight resident (the stored bytes as they are: codes and scales).
    fn upload_weight(&self, w: &Weight, s: Stream) -> Result<DevWeight>;
    fn free_weight(&self, w: DevWeight);
    /// Run an op on stream `s`; callers use [`Device::launch`], which checks the op's
    /// contract first.
    fn run(&self, op: &Op, s: Stream) -> Result<()>;
    /// Check `op` against its contract ([`Op::check`]), then run it.
    fn launch(&self, op: &Op, s: Stream) -> Result<()> {
        op.check()?;
        self.run(op, s)
    }
    /// An event after all work queued on `s` so far.
    fn record(&self, s: Stream) -> Result<Event>;
    /// Work queued on `s` from now on starts after `e`. Each event is waited for at most once
    /// (a device may forget it then).
    fn wait(&self, s: Stream, e: Event) -> Result<()>;
    /// An event nobody will wait for (its weight was evicted before its first use).
    fn forget(&self, _e: Event) {}
    /// Block until every stream is idle.
    fn synchronize(&self) -> Result<()>;
    fn stats(&self) -> Stats;
    /// The device memory's bandwidth in GB/s (measured on a GPU, the model's on the
    /// simulated device), for roofline comparisons; None where it means nothing (the CPU).
    fn memory_gbs(&self) -> Option<f64> {
        None
    }
    /// Host-to-device bandwidth in GB/s, likewise.
    fn link_gbs(&self) -> Option<f64> {
        None
    }
}

/// f32 slice as bytes (little-endian hosts only: x86_64 and aarch64).
pub fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern is a valid u8; the length is scaled.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// Mutable f32 slice as bytes.
pub fn f32_bytes_mut(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: every byte pattern is a valid f32, so writes through the byte view are sound.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v)) }
}

/// Read f32/i32 values out of little-endian bytes.
pub fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub fn bytes_i32(b: &[u8]) -> Vec<i32> {
    b.chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
