//! [`Device`] on an NVIDIA GPU through the CUDA driver API (cudarc, loaded at run time):
//! buffers in device memory, the embedded kernels compiled for the GPU's architecture
//! (cached on disk), a compute stream and a copy stream ordered by events.

use super::cache;
use super::sources::{KERNELS, Param};
use crate::backend::device::{
    Buf, DevWeight, Device, DeviceError, Event, Format, Op, Result, Stats, Stream, charge, lock,
};
use crate::model::weights::Weight;
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig,
    PushKernelArg, sys,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Memory left to the driver, other processes and the display: not handed to placement.
const RESERVE: u64 = 512 << 20;

struct DevWeightMem {
    data: CudaSlice<u8>,
    scales: Option<CudaSlice<u8>>,
    info: DevWeight,
}

struct Mem {
    bufs: HashMap<u64, CudaSlice<u8>>,
    weights: HashMap<u64, DevWeightMem>,
    /// Recorded events not yet waited for, by id.
    events: HashMap<u64, CudaEvent>,
    in_use: u64,
}

pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    streams: [Arc<CudaStream>; 2],
    /// Kernels by name, with their parameters as the source declares them.
    funcs: HashMap<&'static str, (CudaFunction, Vec<Param>)>,
    mem: Mutex<Mem>,
    /// Pinned host buffers weights are staged through on their way up (allocated at the
    /// first upload; None after an allocation failure: pageable copies then).
    staging: Mutex<Option<Staging>>,
    stats: Mutex<Stats>,
    timing: Mutex<Timing>,
    next: AtomicU64,
    capacity: u64,
    name: String,
    /// Compute capability as an sm number (e.g. 89).
    pub arch: u32,
    /// Units compiled now (the rest came from the disk cache).
    pub compiled_units: usize,
}

/// Device time of copies and kernels: an event pair around each, turned into seconds once
/// the end event has passed (the host never waits for that, except when stats are read).
#[derive(Default)]
struct Timing {
    spans: Vec<(CudaEvent, CudaEvent, bool)>,
    copy_s: f64,
    kernel_s: f64,
}

impl Timing {
    /// Spans whose end passed (all of them with `wait`) into the totals.
    fn harvest(&mut self, wait: bool) {
        let spans = std::mem::take(&mut self.spans);
        for (a, b, copy) in spans {
            if !wait && !b.is_complete() {
                self.spans.push((a, b, copy));
                continue;
            }
            // A failed query (a device error, reported elsewhere) drops the span.
            if let Ok(ms) = a.elapsed_ms(&b) {
                let t = if copy {
                    &mut self.copy_s
                } else {
                    &mut self.kernel_s
                };
                *t += f64::from(ms) / 1e3;
            }
        }
    }
}

/// Spans kept before the finished ones are summed.
const TIMING_SPANS: usize = 256;

/// Bytes per pinned staging buffer.
const STAGE_BYTES: usize = 16 << 20;

/// Two pinned host buffers used in turn: while the copy engine moves one to the device, the
/// host fills the other, and a weight upload returns once its last piece is queued.
struct Staging {
    bufs: [cudarc::driver::PinnedHostSlice<u8>; 2],
    /// The copy that last read each buffer (the host waits for it before refilling).
    done: [Option<CudaEvent>; 2],
    next: usize,
}

impl Drop for Staging {
    fn drop(&mut self) {
        // The pinned buffers are freed after this: no copy may still be reading them.
        for e in self.done.iter().flatten() {
            let _ = e.synchronize();
        }
    }
}

/// Why the CUDA device could not be opened (each gives the one-line notice).
#[derive(Debug, thiserror::Error)]
pub enum CudaOpenError {
    #[error("no NVIDIA driver (libcuda.so) found")]
    NoDriver,
    #[error("the NVIDIA driver reports no GPU ({0})")]
    NoGpu(String),
    #[error("kernels could not be compiled: {0}")]
    Compile(String),
    #[error("CUDA error: {0}")]
    Driver(String),
}

fn drv(e: impl std::fmt::Debug) -> DeviceError {
    DeviceError::Backend(format!("CUDA: {e:?}"))
}

/// A kernel argument's type as a parameter kind of the `.cu` signature.
trait KernelArg: cudarc::driver::DeviceRepr {
    const KIND: Param;
}

impl KernelArg for u64 {
    const KIND: Param = Param::Ptr;
}

impl KernelArg for i32 {
    const KIND: Param = Param::Int;
}

impl KernelArg for f32 {
    const KIND: Param = Param::Float;
}

/// The arguments a launch passed against the kernel's parameters: an error naming the
/// kernel unless they agree in number and kind.
fn check_args(name: &'static str, want: &[Param], got: &[Param]) -> Result<()> {
    if want == got {
        return Ok(());
    }
    Err(DeviceError::Shape {
        op: name,
        msg: format!("the launch passes {got:?}, the kernel takes {want:?}"),
    })
}

/// One kernel launch being built: each argument's kind is recorded and checked against the
/// kernel's signature in its `.cu` source before the launch.
struct Launch<'a> {
    args: cudarc::driver::LaunchArgs<'a>,
    name: &'static str,
    want: &'a [Param],
    got: Vec<Param>,
}

impl<'a> Launch<'a> {
    fn arg<T: KernelArg>(&mut self, v: &'a T) -> &mut Self {
        self.got.push(T::KIND);
        self.args.arg(v);
        self
    }

    /// # Safety
    /// Every pointer argument addresses a live device allocation of at least the size the
    /// kernel reads or writes for `cfg`.
    unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<()> {
        check_args(self.name, self.want, &self.got)?;
        // SAFETY: the arguments match the kernel's parameters (checked above); the caller
        // vouches for the allocations.
        unsafe { self.args.launch(cfg) }.map(|_| ()).map_err(drv)
    }
}

impl CudaDevice {
    /// Open GPU `ordinal`: driver, context, streams, kernels (compiled or from the cache).
    pub fn open(ordinal: usize) -> std::result::Result<CudaDevice, CudaOpenError> {
        if !super::driver_present() {
            return Err(CudaOpenError::NoDriver);
        }
        // A driver older than the bindings can lack a symbol, which cudarc reports by
        // panicking: turn that into the notice as well.
        std::panic::catch_unwind(|| Self::open_inner(ordinal)).unwrap_or_else(|p| {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "driver panicked".into());
            Err(CudaOpenError::Driver(msg))
        })
    }

    fn open_inner(ordinal: usize) -> std::result::Result<CudaDevice, CudaOpenError> {
        let n = CudaContext::device_count().map_err(|e| CudaOpenError::NoGpu(format!("{e:?}")))?;
        if n <= ordinal as i32 {
            return Err(CudaOpenError::NoGpu(format!("{n} devices")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| CudaOpenError::Driver(format!("{e:?}")))?;
        // Streams are ordered explicitly by the caller's events.
        // SAFETY: no cudarc slice is shared across streams without an event of ours.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| CudaOpenError::Driver(format!("{e:?}")))?;
        let arch = (major * 10 + minor) as u32;
        let mut driver = 0;
        // SAFETY: one valid out-pointer.
        unsafe { sys::cuDriverGetVersion(&mut driver) };
        let gpu = ctx.name().unwrap_or_else(|_| "NVIDIA GPU".into());
        let (free, total) = ctx
            .mem_get_info()
            .map_err(|e| CudaOpenError::Driver(format!("{e:?}")))?;
        let sigs = super::sources::signatures().map_err(CudaOpenError::Compile)?;
        let mut funcs = HashMap::new();
        let mut compiled_units = 0;
        for unit in KERNELS {
            let (cubin, compiled) = cache::load_or_compile(unit, arch, driver)
                .map_err(|e| CudaOpenError::Compile(e.to_string()))?;
            compiled_units += compiled as usize;
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
                .map_err(|e| CudaOpenError::Driver(format!("loading {}: {e:?}", unit.name)))?;
            for (name, params) in &sigs {
                if let Ok(f) = module.load_function(name) {
                    funcs.insert(*name, (f, params.clone()));
                }
            }
        }
        let s0 = ctx
            .new_stream()
            .map_err(|e| CudaOpenError::Driver(format!("{e:?}")))?;
        let s1 = ctx
            .new_stream()
            .map_err(|e| CudaOpenError::Driver(format!("{e:?}")))?;
        let capacity = (free as u64).saturating_sub(RESERVE);
        Ok(CudaDevice {
            staging: Mutex::new(None),
            name: format!(
                "{gpu} (sm_{arch}, {:.1} GiB, driver {}.{})",
                total as f64 / (1u64 << 30) as f64,
                driver / 1000,
                driver % 1000 / 10
            ),
            ctx,
            streams: [s0, s1],
            funcs,
            mem: Mutex::new(Mem {
                bufs: HashMap::new(),
                weights: HashMap::new(),
                events: HashMap::new(),
                in_use: 0,
            }),
            stats: Mutex::new(Stats::default()),
            timing: Mutex::new(Timing::default()),
            next: AtomicU64::new(1),
            capacity,
            arch,
            compiled_units,
        })
    }

    /// `src` to a new device slice on `st` through the pinned staging buffers (pageable
    /// copies where pinned memory could not be had). Returns once the copies are queued.
    fn upload_staged(&self, st: &Arc<CudaStream>, src: &[u8]) -> Result<CudaSlice<u8>> {
        let mut g = lock(&self.staging);
        if g.is_none() {
            // SAFETY: the buffers are written before any copy reads them (below).
            let alloc = || unsafe { self.ctx.alloc_pinned::<u8>(STAGE_BYTES) };
            if let (Ok(a), Ok(b)) = (alloc(), alloc()) {
                *g = Some(Staging {
                    bufs: [a, b],
                    done: [None, None],
                    next: 0,
                });
            }
        }
        let Some(stg) = g.as_mut() else {
            return st.clone_htod(src).map_err(drv);
        };
        // SAFETY: every byte of the slice is written by the copies queued below before any
        // kernel reads it (the executor orders kernels after this stream's copies).
        let dst = unsafe { st.alloc::<u8>(src.len().max(1)) }.map_err(drv)?;
        let base = dst.device_ptr(st).0;
        for (k, piece) in src.chunks(STAGE_BYTES).enumerate() {
            let i = stg.next;
            stg.next = 1 - i;
            if let Some(e) = stg.done[i].take() {
                e.synchronize().map_err(drv)?;
            }
            let buf = stg.bufs[i].as_mut_slice().map_err(drv)?;
            buf[..piece.len()].copy_from_slice(piece);
            // SAFETY: the destination range lies inside `dst` (allocated for src.len()
            // bytes); the source is pinned and not touched again until `done[i]` passes.
            unsafe {
                cudarc::driver::result::memcpy_htod_async(
                    base + (k * STAGE_BYTES) as u64,
                    &buf[..piece.len()],
                    st.cu_stream(),
                )
            }
            .map_err(drv)?;
            stg.done[i] = Some(st.record_event(None).map_err(drv)?);
        }
        Ok(dst)
    }

    fn stream(&self, s: Stream) -> &Arc<CudaStream> {
        &self.streams[(s.0 as usize).min(1)]
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Mem> {
        lock(&self.mem)
    }

    /// A launch of kernel `name` on `st`, its arguments checked against the kernel's.
    fn kernel<'a>(&'a self, st: &'a Arc<CudaStream>, name: &'static str) -> Result<Launch<'a>> {
        let (f, want) = self
            .funcs
            .get(name)
            .ok_or_else(|| DeviceError::Backend(format!("kernel {name} not loaded")))?;
        Ok(Launch {
            args: st.launch_builder(f),
            name,
            want,
            got: Vec::new(),
        })
    }

    /// Device address of a buffer (+ byte offset).
    fn addr(&self, m: &Mem, b: Buf, s: &Arc<CudaStream>) -> Result<u64> {
        let sl = m.bufs.get(&b.0).ok_or(DeviceError::Unknown(b.0))?;
        Ok(sl.device_ptr(s).0)
    }

    fn count(&self, f: impl FnOnce(&mut Stats)) {
        f(&mut lock(&self.stats));
    }

    /// `Op::Linear`: GEMV kernels up to 4 input rows, the tiled GEMM above.
    fn launch_linear(&self, m: &Mem, op: &Op, st: &Arc<CudaStream>) -> Result<()> {
        let Op::Linear { w, rows, x, y, t } = op else {
            return Err(DeviceError::Backend(
                "launch_linear: not a linear op".into(),
            ));
        };
        let (x, y, t) = (*x, *y, *t);
        let dw = m.weights.get(&w.id).ok_or(DeviceError::Unknown(w.id))?;
        let cols = w.cols;
        let (r0, n) = (rows.start, rows.len());
        let data = dw.data.device_ptr(st).0;
        let scales = dw.scales.as_ref().map(|s| s.device_ptr(st).0).unwrap_or(0);
        // Row range as pointer offsets into the stored layout.
        let (wp, sp) = match w.format {
            Format::Fp4 => (
                data + (r0 * cols / 2) as u64,
                scales + (r0 * cols / 32) as u64,
            ),
            Format::Fp8 => {
                let bc = cols.div_ceil(128);
                (data + (r0 * cols) as u64, scales + (r0 / 128 * bc) as u64)
            }
            Format::Bf16 => (data + (2 * r0 * cols) as u64, 0),
        };
        let xp = self.addr(m, x, st)?;
        let yp = self.addr(m, y, st)?;
        let (rows_i, cols_i, t_i) = (n as i32, cols as i32, t as i32);
        let gemv = t <= 4;
        let (name, cfg) = if gemv {
            let name = match w.format {
                Format::Fp4 => "gemv_fp4",
                Format::Fp8 => "gemv_fp8",
                Format::Bf16 => "gemv_bf16",
            };
            (
                name,
                LaunchConfig {
                    grid_dim: (n.div_ceil(8) as u32, t as u32, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                },
            )
        } else {
            let name = match w.format {
                Format::Fp4 => "gemm_fp4",
                Format::Fp8 => "gemm_fp8",
                Format::Bf16 => "gemm_bf16",
            };
            (
                name,
                LaunchConfig {
                    grid_dim: (n.div_ceil(64) as u32, t.div_ceil(64) as u32, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                },
            )
        };
        let mut b = self.kernel(st, name)?;
        b.arg(&wp);
        if w.format != Format::Bf16 {
            b.arg(&sp);
        }
        b.arg(&xp).arg(&yp).arg(&rows_i).arg(&cols_i);
        if !gemv {
            b.arg(&t_i);
        }
        // SAFETY: the argument list matches the kernel's signature in kernels/gemv.cu or
        // gemm.cu; every pointer addresses a live allocation of the sizes the shapes imply.
        unsafe { b.launch(cfg) }?;
        Ok(())
    }

    /// Run `f` (copies or kernels queued on `st`) between two timing events.
    fn timed<R>(
        &self,
        st: &Arc<CudaStream>,
        copy: bool,
        f: impl FnOnce() -> Result<R>,
    ) -> Result<R> {
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = st.record_event(flags).map_err(drv)?;
        let r = f()?;
        let end = st.record_event(flags).map_err(drv)?;
        let mut t = lock(&self.timing);
        t.spans.push((start, end, copy));
        if t.spans.len() >= TIMING_SPANS {
            t.harvest(false);
        }
        Ok(r)
    }

    /// The kernel launch of one op on stream `st`.
    fn launch_op(&self, op: &Op, st: &Arc<CudaStream>) -> Result<()> {
        let m = self.lock();
        let a = |b: Buf| self.addr(&m, b, st);
        let opt = |b: Option<Buf>| {
            b.map(|b| self.addr(&m, b, st))
                .transpose()
                .map(|p| p.unwrap_or(0))
        };
        match op {
            Op::Linear { .. } => self.launch_linear(&m, op, st)?,
            Op::RmsNorm {
                x,
                w,
                y,
                rows,
                n,
                eps,
            } => {
                let (xp, wp, yp, n_i) = (a(*x)?, opt(*w)?, a(*y)?, *n as i32);
                let mut b = self.kernel(st, "rms_norm")?;
                b.arg(&xp).arg(&wp).arg(&yp).arg(&n_i).arg(eps);
                // SAFETY: matches kernels/norm.cu rms_norm; buffers hold rows x n floats.
                unsafe { b.launch(cfg1(*rows, 256)) }?;
            }
            Op::Swiglu {
                g,
                u,
                row_w,
                row_w_off,
                out,
                n,
                width,
                limit,
            } => {
                let rp = match row_w {
                    Some(b) => a(*b)? + 4 * *row_w_off as u64,
                    None => 0,
                };
                let (gp, up, op_, n_i, w_i) = (a(*g)?, a(*u)?, a(*out)?, *n as i32, *width as i32);
                let mut b = self.kernel(st, "swiglu")?;
                b.arg(&gp)
                    .arg(&up)
                    .arg(&rp)
                    .arg(&op_)
                    .arg(&n_i)
                    .arg(&w_i)
                    .arg(limit);
                // SAFETY: matches kernels/act.cu swiglu; buffers hold n floats.
                unsafe { b.launch(cfg1(n.div_ceil(256), 256)) }?;
            }
            Op::Axpy { y, x, a: alpha, n } => {
                let (yp, xp, n_i) = (a(*y)?, a(*x)?, *n as i32);
                let mut b = self.kernel(st, "axpy")?;
                b.arg(&yp).arg(&xp).arg(alpha).arg(&n_i);
                // SAFETY: matches kernels/act.cu axpy; buffers hold n floats.
                unsafe { b.launch(cfg1(n.div_ceil(256), 256)) }?;
            }
            Op::CopyRows {
                src,
                src_off,
                src_stride,
                dst,
                dst_off,
                dst_stride,
                rows,
                width,
            } => {
                if *rows == 0 || *width == 0 {
                    return Ok(());
                }
                let sp = a(*src)? + 4 * *src_off as u64;
                let dp = a(*dst)? + 4 * *dst_off as u64;
                let (ss, ds, w_i) = (*src_stride as i32, *dst_stride as i32, *width as i32);
                let mut b = self.kernel(st, "copy_rows")?;
                b.arg(&sp).arg(&ss).arg(&dp).arg(&ds).arg(&w_i);
                let cfg = cfg_rows(*width, *rows);
                // SAFETY: matches kernels/act.cu copy_rows; the op's offsets and strides stay
                // inside both buffers (the caller's shapes).
                unsafe { b.launch(cfg) }?;
            }
            Op::GatherRows {
                x,
                idx,
                out,
                n,
                width,
            } => {
                if *n == 0 || *width == 0 {
                    return Ok(());
                }
                let (xp, ip, op_, w_i) = (a(*x)?, a(*idx)?, a(*out)?, *width as i32);
                let mut b = self.kernel(st, "gather_rows")?;
                b.arg(&xp).arg(&ip).arg(&op_).arg(&w_i);
                let cfg = cfg_rows(*width, *n);
                // SAFETY: matches kernels/act.cu gather_rows; idx holds n rows of x.
                unsafe { b.launch(cfg) }?;
            }
            Op::AddRows {
                y,
                x,
                x_off,
                idx,
                weights,
                w_off,
                n,
                width,
            } => {
                let xp = a(*x)? + 4 * *x_off as u64;
                let wp = match weights {
                    Some(b) => a(*b)? + 4 * *w_off as u64,
                    None => 0,
                };
                let (yp, ip, n_i, w_i) = (a(*y)?, opt(*idx)?, *n as i32, *width as i32);
                let mut b = self.kernel(st, "add_rows")?;
                b.arg(&yp).arg(&xp).arg(&ip).arg(&wp).arg(&n_i).arg(&w_i);
                // SAFETY: matches kernels/act.cu add_rows; x holds n rows from x_off, idx
                // (if given) n rows of y.
                unsafe { b.launch(cfg1(width.div_ceil(256), 256)) }?;
            }
            Op::Rope {
                x,
                inv_freq,
                rows,
                width,
                rope_dim,
                pos,
                rows_per_pos,
                inverse,
            } => {
                let (xp, fp) = (a(*x)?, a(*inv_freq)?);
                let (w_i, r_i, p_i, rp_i, inv_i) = (
                    *width as i32,
                    *rope_dim as i32,
                    *pos as i32,
                    *rows_per_pos as i32,
                    *inverse as i32,
                );
                let mut b = self.kernel(st, "rope")?;
                b.arg(&xp)
                    .arg(&fp)
                    .arg(&w_i)
                    .arg(&r_i)
                    .arg(&p_i)
                    .arg(&rp_i)
                    .arg(&inv_i);
                let threads = (rope_dim / 2).div_ceil(32).max(1) as u32 * 32;
                // SAFETY: matches kernels/act.cu rope; x holds rows x width floats.
                unsafe { b.launch(cfg1(*rows, threads)) }?;
            }
            Op::AttendSink {
                q,
                keys,
                idx,
                n_keys,
                max_keys,
                sink,
                scale,
                out,
                t,
                heads,
                hd,
            } => {
                let (qp, kp, ip, np, sp, op_) = (
                    a(*q)?,
                    a(*keys)?,
                    a(*idx)?,
                    a(*n_keys)?,
                    a(*sink)?,
                    a(*out)?,
                );
                let (mk, h_i, hd_i) = (*max_keys as i32, *heads as i32, *hd as i32);
                let mut b = self.kernel(st, "attend_sink")?;
                b.arg(&qp)
                    .arg(&kp)
                    .arg(&ip)
                    .arg(&np)
                    .arg(&mk)
                    .arg(&sp)
                    .arg(scale);
                b.arg(&op_).arg(&h_i).arg(&hd_i);
                let cfg = LaunchConfig {
                    grid_dim: (*t as u32, *heads as u32, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: matches kernels/attention.cu attend_sink; shapes as the op documents.
                unsafe { b.launch(cfg) }?;
            }
            Op::HcMix {
                x,
                fn_,
                base,
                scale,
                out,
                t,
                hc,
                d,
                iters,
                norm_eps,
                hc_eps,
            } => {
                let (xp, fp, bp, op_) = (a(*x)?, a(*fn_)?, a(*base)?, a(*out)?);
                let (hc_i, d_i, it_i) = (*hc as i32, *d as i32, *iters as i32);
                let mut b = self.kernel(st, "hc_mix")?;
                b.arg(&xp)
                    .arg(&fp)
                    .arg(&bp)
                    .arg(&scale[0])
                    .arg(&scale[1])
                    .arg(&scale[2]);
                b.arg(&op_)
                    .arg(&hc_i)
                    .arg(&d_i)
                    .arg(&it_i)
                    .arg(norm_eps)
                    .arg(hc_eps);
                // SAFETY: matches kernels/hyper.cu hc_mix; shapes as the op documents.
                unsafe { b.launch(cfg1(*t, 256)) }?;
            }
            Op::HcHead {
                x,
                fn_,
                base,
                scale,
                out,
                t,
                hc,
                d,
                norm_eps,
                hc_eps,
            } => {
                let (xp, fp, bp, op_) = (a(*x)?, a(*fn_)?, a(*base)?, a(*out)?);
                let (hc_i, d_i) = (*hc as i32, *d as i32);
                let mut b = self.kernel(st, "hc_head")?;
                b.arg(&xp)
                    .arg(&fp)
                    .arg(&bp)
                    .arg(scale)
                    .arg(&op_)
                    .arg(&hc_i)
                    .arg(&d_i);
                b.arg(norm_eps).arg(hc_eps);
                // SAFETY: matches kernels/hyper.cu hc_head.
                unsafe { b.launch(cfg1(*t, 256)) }?;
            }
            Op::HcCollapse {
                x,
                coef,
                stride,
                u,
                t,
                hc,
                d,
            } => {
                let (xp, cp, up) = (a(*x)?, a(*coef)?, a(*u)?);
                let (s_i, hc_i, d_i) = (*stride as i32, *hc as i32, *d as i32);
                let mut b = self.kernel(st, "hc_collapse")?;
                b.arg(&xp).arg(&cp).arg(&s_i).arg(&up).arg(&hc_i).arg(&d_i);
                let cfg = cfg_rows(*d, *t);
                // SAFETY: matches kernels/hyper.cu hc_collapse.
                unsafe { b.launch(cfg) }?;
            }
            Op::HcExpand {
                x,
                f,
                coef,
                t,
                hc,
                d,
            } => {
                let (xp, fp, cp) = (a(*x)?, a(*f)?, a(*coef)?);
                let (hc_i, d_i) = (*hc as i32, *d as i32);
                let mut b = self.kernel(st, "hc_expand")?;
                b.arg(&xp).arg(&fp).arg(&cp).arg(&hc_i).arg(&d_i);
                let cfg = cfg_rows(*d, *t);
                // SAFETY: matches kernels/hyper.cu hc_expand.
                unsafe { b.launch(cfg) }?;
            }
            Op::IndexerScores {
                q,
                w,
                keys,
                out,
                n,
                ih,
                ihd,
            } => {
                let (qp, wp, kp, op_) = (a(*q)?, a(*w)?, a(*keys)?, a(*out)?);
                let (n_i, ih_i, ihd_i) = (*n as i32, *ih as i32, *ihd as i32);
                let mut b = self.kernel(st, "indexer_scores")?;
                b.arg(&qp)
                    .arg(&wp)
                    .arg(&kp)
                    .arg(&op_)
                    .arg(&n_i)
                    .arg(&ih_i)
                    .arg(&ihd_i);
                // SAFETY: matches kernels/indexer.cu indexer_scores.
                unsafe { b.launch(cfg1(n.div_ceil(8), 256)) }?;
            }
            Op::CompressPool {
                kv,
                gate,
                prev_kv,
                prev_gate,
                out,
                windows,
                r,
                d,
                cd,
                off,
            } => {
                let (kp, gp, op_) = (a(*kv)?, a(*gate)?, a(*out)?);
                let (pk, pg) = (opt(*prev_kv)?, opt(*prev_gate)?);
                let (r_i, d_i, cd_i, off_i) = (*r as i32, *d as i32, *cd as i32, *off as i32);
                let mut b = self.kernel(st, "compress_pool")?;
                b.arg(&kp).arg(&gp).arg(&pk).arg(&pg).arg(&op_);
                b.arg(&r_i).arg(&d_i).arg(&cd_i).arg(&off_i);
                let cfg = cfg_rows(*d, *windows);
                // SAFETY: matches kernels/compressor.cu compress_pool.
                unsafe { b.launch(cfg) }?;
            }
            Op::QuantE4m3 {
                x,
                rows,
                width,
                len,
                block,
            }
            | Op::QuantI8 {
                x,
                rows,
                width,
                len,
                block,
            } => {
                let name = match op {
                    Op::QuantI8 { .. } => "quant_i8",
                    _ => "quant_e4m3",
                };
                let xp = a(*x)?;
                let (w_i, l_i, b_i) = (*width as i32, *len as i32, *block as i32);
                let mut b = self.kernel(st, name)?;
                b.arg(&xp).arg(&w_i).arg(&l_i).arg(&b_i);
                let cfg = LaunchConfig {
                    grid_dim: (len.div_ceil(*block) as u32, *rows as u32, 1),
                    block_dim: (32, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: matches kernels/quant.cu quant_e4m3 / quant_i8 (the same arguments);
                // x holds rows x width floats.
                unsafe { b.launch(cfg) }?;
            }
            Op::HadamardE2m1 { x, rows, n } => {
                let (xp, n_i) = (a(*x)?, *n as i32);
                let mut b = self.kernel(st, "hadamard_e2m1")?;
                b.arg(&xp).arg(&n_i);
                // SAFETY: matches kernels/quant.cu hadamard_e2m1 (one row per block of n threads).
                unsafe { b.launch(cfg1(*rows, *n as u32)) }?;
            }
            Op::TopkSelect { scores, n, k, out } => {
                let (sp, op_) = (a(*scores)?, a(*out)?);
                let (n_i, k_i) = (*n as i32, *k as i32);
                let mut b = self.kernel(st, "topk_select")?;
                b.arg(&sp).arg(&n_i).arg(&k_i).arg(&op_);
                // SAFETY: matches kernels/indexer.cu topk_select (one block of 1024 threads).
                unsafe { b.launch(cfg1(1, 1024)) }?;
            }
            Op::RouteTopk {
                logits,
                bias,
                hashed,
                tokens,
                n_experts,
                k,
                scale,
                experts,
                weights,
            } => {
                let (lp, bp, hp, ep, wp) = (
                    a(*logits)?,
                    opt(*bias)?,
                    opt(*hashed)?,
                    a(*experts)?,
                    a(*weights)?,
                );
                let (n_i, k_i) = (*n_experts as i32, *k as i32);
                let mut b = self.kernel(st, "route_topk")?;
                b.arg(&lp)
                    .arg(&bp)
                    .arg(&hp)
                    .arg(&n_i)
                    .arg(&k_i)
                    .arg(scale)
                    .arg(&ep)
                    .arg(&wp);
                // SAFETY: matches kernels/router.cu route_topk; shapes as the op documents.
                unsafe { b.launch(cfg1(*tokens, 256)) }?;
            }
            Op::Argmax { x, rows, n, out } => {
                let (xp, op_, n_i) = (a(*x)?, a(*out)?, *n as i32);
                let mut b = self.kernel(st, "argmax")?;
                b.arg(&xp).arg(&n_i).arg(&op_);
                // SAFETY: matches kernels/sample.cu argmax.
                unsafe { b.launch(cfg1(*rows, 1024)) }?;
            }
            Op::SoftmaxTemp {
                x,
                rows,
                n,
                temperature,
            } => {
                let (xp, n_i) = (a(*x)?, *n as i32);
                let mut b = self.kernel(st, "softmax_temp")?;
                b.arg(&xp).arg(&n_i).arg(temperature);
                // SAFETY: matches kernels/sample.cu softmax_temp.
                unsafe { b.launch(cfg1(*rows, 1024)) }?;
            }
        }
        Ok(())
    }
}

impl CudaDevice {
    /// Device-to-device copy bandwidth in GB/s, counting bytes read and written (the
    /// memory's own throughput: the bound a weight-streaming kernel is measured against).
    pub fn copy_gbs(&self, bytes: usize, reps: usize) -> Result<f64> {
        let st = &self.streams[0];
        let src = st.alloc_zeros::<u8>(bytes).map_err(drv)?;
        let mut dst = st.alloc_zeros::<u8>(bytes).map_err(drv)?;
        st.memcpy_dtod(&src, &mut dst).map_err(drv)?;
        st.synchronize().map_err(drv)?;
        let t = std::time::Instant::now();
        for _ in 0..reps.max(1) {
            st.memcpy_dtod(&src, &mut dst).map_err(drv)?;
        }
        st.synchronize().map_err(drv)?;
        Ok(2.0 * (bytes * reps.max(1)) as f64 / t.elapsed().as_secs_f64() / 1e9)
    }
}

/// 256 threads per block over the `width` columns of each of `rows` rows (blockIdx.y = row).
fn cfg_rows(width: usize, rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (width.div_ceil(256) as u32, rows as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn cfg1(blocks: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl Device for CudaDevice {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn in_use(&self) -> u64 {
        self.lock().in_use
    }

    fn alloc(&self, bytes: usize) -> Result<Buf> {
        let mut m = self.lock();
        charge(&mut m.in_use, self.capacity, bytes as u64)?;
        // SAFETY: device memory the host never reads unwritten: every buffer is written (by a
        // copy or an op) before anything reads it, as the CPU device checks in the tests by
        // handing out NaN-filled buffers. Skipping the zero fill saves a memset launch per
        // activation.
        let sl = match unsafe { self.streams[0].alloc::<u8>(bytes.max(1)) } {
            Ok(s) => s,
            Err(e) => {
                m.in_use -= bytes as u64;
                return Err(drv(e));
            }
        };
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        m.bufs.insert(id, sl);
        Ok(Buf(id))
    }

    fn free(&self, b: Buf) {
        let mut m = self.lock();
        if let Some(sl) = m.bufs.remove(&b.0) {
            m.in_use -= sl.len() as u64;
        }
    }

    fn write_at(&self, dst: Buf, offset: usize, src: &[u8], s: Stream) -> Result<()> {
        let mut m = self.lock();
        let st = self.stream(s).clone();
        let sl = m.bufs.get_mut(&dst.0).ok_or(DeviceError::Unknown(dst.0))?;
        if sl.len() < offset + src.len() {
            return Err(DeviceError::Shape {
                op: "write",
                msg: format!(
                    "{} bytes at {offset} into a buffer of {}",
                    src.len(),
                    sl.len()
                ),
            });
        }
        let mut view = sl.slice_mut(offset..offset + src.len());
        self.timed(&st, true, || st.memcpy_htod(src, &mut view).map_err(drv))?;
        self.count(|c| {
            c.bytes_to_device += src.len() as u64;
            c.transfers += 1;
        });
        Ok(())
    }

    fn read(&self, src: Buf, dst: &mut [u8], s: Stream) -> Result<()> {
        let m = self.lock();
        let st = self.stream(s).clone();
        let sl = m.bufs.get(&src.0).ok_or(DeviceError::Unknown(src.0))?;
        if sl.len() < dst.len() {
            return Err(DeviceError::Shape {
                op: "read",
                msg: format!("{} bytes from a buffer of {}", dst.len(), sl.len()),
            });
        }
        self.timed(&st, true, || {
            st.memcpy_dtoh(&sl.slice(0..dst.len()), dst).map_err(drv)
        })?;
        st.synchronize().map_err(drv)?;
        self.count(|c| {
            c.bytes_to_host += dst.len() as u64;
            c.transfers += 1;
        });
        Ok(())
    }

    fn upload_weight(&self, w: &Weight, s: Stream) -> Result<DevWeight> {
        let (data, scales): (&[u8], Option<&[u8]>) = match w {
            Weight::Fp8 { codes, scales, .. } => (codes, Some(scales)),
            Weight::Fp4 { packed, scales, .. } => (packed, Some(scales)),
            Weight::Bf16 { data, .. } => (data, None),
        };
        let bytes = (data.len() + scales.map_or(0, |s| s.len())) as u64;
        charge(&mut self.lock().in_use, self.capacity, bytes)?;
        // The staging copies run without the memory lock: a promotion made by the background
        // worker must not hold up the decode thread's launches.
        let st = self.stream(s).clone();
        let up = |src: &[u8]| -> Result<CudaSlice<u8>> { self.upload_staged(&st, src) };
        let res = self.timed(&st, true, || {
            up(data).and_then(|d| Ok((d, scales.map(up).transpose()?)))
        });
        let mut m = self.lock();
        let (d, sc) = match res {
            Ok(v) => v,
            Err(e) => {
                m.in_use -= bytes;
                return Err(e);
            }
        };
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let info = DevWeight {
            id,
            format: Format::of(w),
            rows: w.rows(),
            cols: w.cols(),
            bytes,
        };
        m.weights.insert(
            id,
            DevWeightMem {
                data: d,
                scales: sc,
                info,
            },
        );
        self.count(|c| {
            c.bytes_to_device += bytes;
            c.transfers += 1;
        });
        Ok(info)
    }

    fn free_weight(&self, w: DevWeight) {
        let mut m = self.lock();
        if let Some(dw) = m.weights.remove(&w.id) {
            m.in_use -= dw.info.bytes;
        }
    }

    fn run(&self, op: &Op, s: Stream) -> Result<()> {
        let st = self.stream(s).clone();
        self.timed(&st, false, || self.launch_op(op, &st))?;
        self.count(|c| c.launches += 1);
        Ok(())
    }

    fn record(&self, s: Stream) -> Result<Event> {
        let ev = self.stream(s).record_event(None).map_err(drv)?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().events.insert(id, ev);
        Ok(Event(id))
    }

    fn wait(&self, s: Stream, e: Event) -> Result<()> {
        let ev = self
            .lock()
            .events
            .remove(&e.0)
            .ok_or(DeviceError::Unknown(e.0))?;
        self.stream(s).wait(&ev).map_err(drv)
    }

    fn forget(&self, e: Event) {
        self.lock().events.remove(&e.0);
    }

    fn synchronize(&self) -> Result<()> {
        self.ctx.synchronize().map_err(drv)
    }

    fn stats(&self) -> Stats {
        let mut s = lock(&self.stats).clone();
        let mut t = lock(&self.timing);
        t.harvest(true);
        s.copy_s = t.copy_s;
        s.kernel_s = t.kernel_s;
        s
    }

    fn memory_gbs(&self) -> Option<f64> {
        // Read + write of a 1 GiB copy; a weight-streaming kernel's bound.
        self.copy_gbs(1 << 30, 5).ok()
    }

    fn link_gbs(&self) -> Option<f64> {
        // 256 MiB from pageable host memory, as the weights come from the mmap.
        let host = vec![0u8; 256 << 20];
        let st = &self.streams[1];
        let mut dst = st.alloc_zeros::<u8>(host.len()).ok()?;
        st.memcpy_htod(&host[..16 << 20], &mut dst.slice_mut(0..16 << 20))
            .ok()?;
        st.synchronize().ok()?;
        let t = std::time::Instant::now();
        st.memcpy_htod(&host, &mut dst).ok()?;
        st.synchronize().ok()?;
        Some(host.len() as f64 / t.elapsed().as_secs_f64() / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_launch_must_pass_the_kernels_parameters() {
        use Param::{Float, Int, Ptr};
        let rms_norm = [Ptr, Ptr, Ptr, Int, Float];
        assert!(check_args("rms_norm", &rms_norm, &rms_norm).is_ok());
        // One argument short, or an int where the kernel takes a float: refused, named.
        for got in [&rms_norm[..4], &[Ptr, Ptr, Ptr, Int, Int][..]] {
            let e = check_args("rms_norm", &rms_norm, got).expect_err("mismatch");
            assert!(e.to_string().starts_with("rms_norm: "), "{e}");
        }
    }
}
