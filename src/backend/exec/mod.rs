//! The executor the engine's ops go through. `Exec` itself holds the device, the weights
//! resident on it (with the background promotion worker) and runs products and device ops:
//! [`Exec::linear`] runs on the device when the weight is resident there and on the CPU
//! otherwise. Its parts, one job each: [`KeyTables`] (attention keys kept on the device),
//! [`Experts`] (the expert cache's policy, slots, counters, routing trace and prefill
//! stream costs) and [`Timing`]. A device error is reported once (one line on stderr) and
//! the CPU takes over: a broken driver costs speed, never an answer.

mod experts;
mod tables;
mod timing;

pub use experts::{ExpertStats, Experts, StreamCosts};
pub use tables::KeyTables;
pub use timing::{TimeSplit, Timing};

use super::cpu;
use super::device::{
    Buf, DevWeight, Device, DeviceError, Op, Stats, Stream, f32_bytes, f32_bytes_mut, lock,
};
use super::promote::{Promoter, Residency};
use crate::model::weights::Weight;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Identity of a weight: the address of its stored bytes (stable: mmap or owned buffer).
pub fn weight_key(w: &Weight) -> usize {
    match w {
        Weight::Fp8 { codes, .. } => codes.as_ptr() as usize,
        Weight::Fp4 { packed, .. } => packed.as_ptr() as usize,
        Weight::Bf16 { data, .. } => data.as_ptr() as usize,
    }
}

/// A host buffer handed to [`Exec::offload`]: copied in, copied back, or both.
pub enum Arg<'a> {
    In(&'a [u8]),
    Out(&'a mut [u8]),
    InOut(&'a mut [u8]),
    /// An optional input that is not there (the op gets `None` for it).
    Absent,
    /// A buffer already on the device (a [`KeyTables::get`] table), used as it is.
    Dev(Buf),
    /// Device scratch of this many bytes: written by one op of [`Exec::offload_ops`] and read
    /// by a later one, never copied.
    Temp(usize),
    /// A model parameter (norm weights, mHC matrices, RoPE frequencies, sinks, biases):
    /// host bytes that never change while the engine lives, copied to the device at first
    /// use and kept there (keyed by address and length).
    Param(&'a [u8]),
}

impl<'a> Arg<'a> {
    /// An optional input.
    pub fn maybe(data: Option<&'a [u8]>) -> Arg<'a> {
        data.map_or(Arg::Absent, Arg::In)
    }

    /// An optional model parameter.
    pub fn maybe_param(data: Option<&'a [u8]>) -> Arg<'a> {
        data.map_or(Arg::Absent, Arg::Param)
    }
}

/// The device buffers of [`Exec::offload`]'s arguments, in order: `b[i]` for one that is
/// there, `b.opt(i)` for an optional one.
pub struct Bufs(Vec<Option<Buf>>);

impl Bufs {
    pub fn opt(&self, i: usize) -> Option<Buf> {
        self.0[i]
    }
}

impl std::ops::Index<usize> for Bufs {
    type Output = Buf;
    fn index(&self, i: usize) -> &Buf {
        // The op builders index only the arguments they passed as present.
        self.0[i]
            .as_ref()
            .expect("offload: an absent argument indexed as present")
    }
}

/// Reusable input/output buffers on the device (grown on demand).
#[derive(Default)]
struct Scratch {
    x: Option<(Buf, usize)>,
    y: Option<(Buf, usize)>,
}

pub struct Exec {
    dev: Option<Arc<dyn Device>>,
    /// The CPU kernels products on the CPU may use.
    kernels: cpu::Kernels,
    /// Resident weights, copies still in flight on the copy stream (the compute stream waits
    /// for one only before the first kernel that reads that weight), the failed flag.
    res: Residency,
    /// Expert promotions run on their own thread (None: no device).
    promoter: Option<Promoter>,
    scratch: Mutex<Scratch>,
    whole: AtomicBool,
    /// Layers 0..device_layers run their ops on the device (their dense matrices resident)
    /// even when the whole model does not.
    device_layers: AtomicUsize,
    /// Device copies of model parameters, by (address, length) of the host bytes.
    params: Mutex<HashMap<(usize, usize), Buf>>,
    /// Key tables kept on the device across steps.
    pub tables: KeyTables,
    /// Routed experts: the cache's policy and slots, its counters, the routing trace, the
    /// prefill stream costs.
    pub experts: Experts,
    /// Where the time went, and the steps the device ran or gave up on.
    pub timing: Timing,
}

impl Default for Exec {
    fn default() -> Self {
        Exec::cpu()
    }
}

impl Exec {
    /// Everything on the CPU.
    pub fn cpu() -> Exec {
        Exec::with(None)
    }

    fn with(dev: Option<Arc<dyn Device>>) -> Exec {
        let res = Residency::new();
        let promoter = dev.clone().map(|d| Promoter::spawn(d, res.clone()));
        Exec {
            dev,
            kernels: cpu::Kernels::default(),
            promoter,
            res,
            scratch: Mutex::new(Scratch::default()),
            whole: AtomicBool::new(false),
            device_layers: AtomicUsize::new(0),
            params: Mutex::new(HashMap::new()),
            tables: KeyTables::default(),
            experts: Experts::default(),
            timing: Timing::default(),
        }
    }

    /// Resident weights run on `dev`, the rest on the CPU.
    pub fn on(dev: Arc<dyn Device>) -> Exec {
        Exec::with(Some(dev))
    }

    pub fn device(&self) -> Option<&Arc<dyn Device>> {
        self.dev.as_ref()
    }

    /// The CPU kernels products on the CPU may use (default: the fastest this CPU has).
    pub fn set_kernels(&mut self, k: cpu::Kernels) {
        self.kernels = k;
    }

    pub fn kernels(&self) -> cpu::Kernels {
        self.kernels
    }

    /// Whole-model mode: every op of the forward pass runs on the device (set when all the
    /// model's dense matrices are resident; routed experts go where the expert policy or
    /// their residency says). Without it only matrix products are offloaded, except in the
    /// layers given to [`Exec::set_device_layers`].
    pub fn set_whole_model(&self, on: bool) {
        self.whole.store(on, Ordering::Relaxed);
    }

    /// Layers 0..n run every op on the device (the placement made their dense matrices
    /// resident); the rest, and the head, offload only their resident products.
    pub fn set_device_layers(&self, n: usize) {
        self.device_layers.store(n, Ordering::Relaxed);
    }

    /// Whether every op of the forward pass runs on the device (whole-model mode, and the
    /// device has not failed).
    pub fn whole_model(&self) -> bool {
        self.whole.load(Ordering::Relaxed) && self.usable()
    }

    /// A device that has not failed: device ops may be tried.
    fn usable(&self) -> bool {
        self.dev.is_some() && !self.res.failed.load(Ordering::Relaxed)
    }

    /// The device, while it has not failed.
    fn usable_device(&self) -> Option<&Arc<dyn Device>> {
        self.dev.as_ref().filter(|_| self.usable())
    }

    /// Promotions the device had no room for since the last call (their weights' keys).
    fn take_refused(&self) -> Vec<usize> {
        self.promoter
            .as_ref()
            .map(|p| p.take_refused())
            .unwrap_or_default()
    }

    /// How many of a model's `blocks` (a prefix) run every op on the device: all of them in
    /// whole-model mode, those given to [`Exec::set_device_layers`], none after a failure.
    pub fn device_blocks(&self, blocks: usize) -> usize {
        if self.dev.is_none() || self.res.failed.load(Ordering::Relaxed) {
            0
        } else if self.whole.load(Ordering::Relaxed) {
            blocks
        } else {
            self.device_layers.load(Ordering::Relaxed).min(blocks)
        }
    }

    /// Write rows of `width` floats into a [`KeyTables::get`] table from row `row` on. False on a
    /// device error (reported; the caller uses its host path).
    pub fn write_rows(&self, buf: Buf, row: usize, width: usize, data: &[f32]) -> bool {
        self.dev_io(|dev| dev.write_at(buf, 4 * width * row, f32_bytes(data), Stream::COMPUTE))
    }

    /// A device buffer holding `data` (for activations kept there across ops); None when ops
    /// do not run on the device here or it has no room.
    pub fn upload(&self, data: &[u8]) -> Option<Buf> {
        let b = self.alloc(data.len())?;
        if self.dev_io(|dev| dev.write(b, data, Stream::COMPUTE)) {
            Some(b)
        } else {
            self.release(b);
            None
        }
    }

    /// Read a device buffer into `out`; false on a device error (reported; `out` is then
    /// not to be used).
    pub fn read_back(&self, b: Buf, out: &mut [u8]) -> bool {
        self.dev_io(|dev| dev.read(b, out, Stream::COMPUTE))
    }

    /// A device buffer of `bytes` (contents unset) for activations kept there across ops;
    /// None when ops do not run on the device here, it has no room, or it failed (reported).
    pub fn alloc(&self, bytes: usize) -> Option<Buf> {
        if !self.usable() {
            return None;
        }
        let dev = self.dev.as_ref()?;
        match dev.alloc(bytes.max(4)) {
            Ok(b) => Some(b),
            Err(DeviceError::OutOfMemory { .. }) => None,
            Err(e) => {
                self.report_failure(dev.as_ref(), &e);
                None
            }
        }
    }

    /// Launch ops over device buffers, in order; false on a device error (reported).
    pub fn launch(&self, ops: &[Op]) -> bool {
        self.usable()
            && self.dev_io(|dev| {
                ops.iter()
                    .try_for_each(|op| dev.launch(op, Stream::COMPUTE))
            })
    }

    /// y = x · W[rows]ᵀ with x [t, cols] and y [t, rows.len()] device buffers and `w`
    /// resident. False when it is not, or on a device error (reported).
    pub fn linear_bufs(&self, w: &Weight, rows: Range<usize>, x: Buf, y: Buf, t: usize) -> bool {
        let key = weight_key(w);
        let Some(dw) = self
            .res
            .resident
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .copied()
        else {
            return false;
        };
        if !self.usable() {
            return false;
        }
        self.dev_io(|dev| self.launch_linear(dev, key, dw, rows, x, y, t))
    }

    /// Launch y = x · W[rows]ᵀ, after the weight's upload (if still pending) on the device.
    #[allow(clippy::too_many_arguments)] // the weight (and its key), rows and buffers
    fn launch_linear(
        &self,
        dev: &dyn Device,
        key: usize,
        w: DevWeight,
        rows: Range<usize>,
        x: Buf,
        y: Buf,
        t: usize,
    ) -> Result<(), DeviceError> {
        if let Some(e) = lock(&self.res.pending).remove(&key) {
            dev.wait(Stream::COMPUTE, e)?;
        }
        dev.launch(&Op::Linear { w, rows, x, y, t }, Stream::COMPUTE)
    }

    /// Free a buffer from [`Exec::upload`] or [`Exec::alloc`].
    pub fn release(&self, b: Buf) {
        if let Some(dev) = &self.dev {
            dev.free(b);
        }
    }

    fn dev_io(&self, f: impl FnOnce(&dyn Device) -> Result<(), DeviceError>) -> bool {
        let Some(dev) = self
            .dev
            .as_ref()
            .filter(|_| !self.res.failed.load(Ordering::Relaxed))
        else {
            return false;
        };
        let start = std::time::Instant::now();
        let r = f(dev.as_ref());
        self.timing.add_device(start);
        match r {
            Ok(()) => true,
            Err(e) => {
                self.report_failure(dev.as_ref(), &e);
                false
            }
        }
    }

    /// Run one op on the device (see [`Exec::offload_ops`]).
    pub fn offload(&self, args: &mut [Arg], op: impl FnOnce(&Bufs) -> Op) -> bool {
        self.offload_ops(args, |b| vec![op(b)])
    }

    /// Run ops on the device, in order: the host buffers in `args` are copied to fresh device
    /// buffers (`Temp` ones only allocated, for results one op hands the next), the ops are
    /// built over them (in the same order) and launched, and the `Out` / `InOut` ones are
    /// copied back. False when ops do not run on the device here or on any device error
    /// (reported once; a lack of room is not one): the caller then computes on the CPU.
    pub fn offload_ops(&self, args: &mut [Arg], ops: impl FnOnce(&Bufs) -> Vec<Op>) -> bool {
        let Some(dev) = self.dev.as_ref().filter(|_| self.usable()) else {
            return false;
        };
        let start = std::time::Instant::now();
        let mut bufs = Bufs(Vec::with_capacity(args.len()));
        let mut fresh = Vec::with_capacity(args.len());
        let res = (|| -> Result<(), DeviceError> {
            for a in args.iter() {
                let (len, data): (usize, Option<&[u8]>) = match a {
                    Arg::In(d) => (d.len(), Some(d)),
                    Arg::InOut(d) => (d.len(), Some(&**d)),
                    Arg::Out(d) => (d.len(), None),
                    Arg::Temp(n) => (*n, None),
                    Arg::Absent => {
                        bufs.0.push(None);
                        continue;
                    }
                    Arg::Dev(b) => {
                        bufs.0.push(Some(*b));
                        continue;
                    }
                    Arg::Param(d) => {
                        bufs.0.push(Some(self.param(dev.as_ref(), d)?));
                        continue;
                    }
                };
                let b = dev.alloc(len.max(4))?;
                fresh.push(b);
                bufs.0.push(Some(b));
                if let Some(d) = data {
                    dev.write(b, d, Stream::COMPUTE)?;
                }
            }
            for op in ops(&bufs) {
                dev.launch(&op, Stream::COMPUTE)?;
            }
            // Pure outputs are read in place (a CPU fallback overwrites them whole); in-out
            // buffers land only once every read succeeded, since a failed read must leave the
            // fallback's inputs as they were.
            let mut back = Vec::new();
            for (i, (a, b)) in args.iter_mut().zip(&bufs.0).enumerate() {
                match (a, b) {
                    (Arg::Out(d), Some(b)) => dev.read(*b, d, Stream::COMPUTE)?,
                    (Arg::InOut(d), Some(b)) => {
                        let mut tmp = vec![0u8; d.len()];
                        dev.read(*b, &mut tmp, Stream::COMPUTE)?;
                        back.push((i, tmp));
                    }
                    _ => {}
                }
            }
            for (i, tmp) in back {
                if let Arg::InOut(d) = &mut args[i] {
                    d.copy_from_slice(&tmp);
                }
            }
            Ok(())
        })();
        for b in fresh {
            dev.free(b);
        }
        self.timing.add_device(start);
        match res {
            Ok(()) => true,
            // No room for this op's buffers: this op runs on the CPU, the device stays on.
            Err(DeviceError::OutOfMemory { .. }) => false,
            Err(e) => {
                self.report_failure(dev.as_ref(), &e);
                false
            }
        }
    }

    /// The device copy of a model parameter (made at first use).
    fn param(&self, dev: &dyn Device, d: &[u8]) -> Result<Buf, DeviceError> {
        let key = (d.as_ptr() as usize, d.len());
        let mut g = lock(&self.params);
        if let Some(&b) = g.get(&key) {
            return Ok(b);
        }
        let b = dev.alloc(d.len().max(4))?;
        if let Err(e) = dev.write(b, d, Stream::COMPUTE) {
            dev.free(b);
            return Err(e);
        }
        g.insert(key, b);
        Ok(b)
    }

    /// A device error that is not about room or shape: say so once and stop using the device.
    fn report_failure(&self, dev: &dyn Device, e: &DeviceError) {
        self.res.report_failure(dev, e);
    }

    /// Make `w` resident on the device. Ok(false): no device, or it does not fit.
    pub fn make_resident(&self, w: &Weight) -> Result<bool, DeviceError> {
        let Some(dev) = &self.dev else {
            return Ok(false);
        };
        if self.is_resident(w) {
            return Ok(true);
        }
        // Kernels must not read it before the copy lands: the event is waited for (on the
        // device, not the host) just before the first one that does.
        match self.res.upload(dev.as_ref(), weight_key(w), w) {
            Ok(()) => Ok(true),
            Err(DeviceError::OutOfMemory { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Make `w` resident in the background ([`Promoter`]): it counts as resident once its
    /// copy is queued on the device. Without a worker, or if the copy fails at once, false.
    fn promote(&self, w: &Weight) -> bool {
        if self.is_resident(w) {
            return true;
        }
        match &self.promoter {
            Some(p) => p.queue(weight_key(w), w),
            None => matches!(self.make_resident(w), Ok(true)),
        }
    }

    /// Wait until the background promotions asked for so far are on the device (for tests
    /// that need the placement settled).
    pub fn wait_promotions(&self) {
        if let Some(p) = &self.promoter {
            p.wait_all();
        }
    }

    /// Allocate the activation buffers for products of up to `x_bytes` in and `y_bytes`
    /// out ahead of the weights, so placement leaves them room. False if they do not fit.
    pub fn reserve_scratch(&self, x_bytes: usize, y_bytes: usize) -> bool {
        let Some(dev) = &self.dev else {
            return false;
        };
        let mut sc = lock(&self.scratch);
        grow(dev.as_ref(), &mut sc.x, x_bytes).is_ok()
            && grow(dev.as_ref(), &mut sc.y, y_bytes).is_ok()
    }

    /// Drop `w` from the device (its bytes stay in the checkpoint).
    pub fn evict(&self, w: &Weight) {
        if let Some(p) = &self.promoter {
            // A copy still queued finishes first (rare: a slot given up right after it was
            // filled), so its memory can be freed.
            p.wait_for(weight_key(w));
        }
        if let (Some(e), Some(dev)) = (lock(&self.res.pending).remove(&weight_key(w)), &self.dev) {
            dev.forget(e);
        }
        let dw = self
            .res
            .resident
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&weight_key(w));
        if let (Some(dev), Some(dw)) = (&self.dev, dw) {
            dev.free_weight(dw);
        }
    }

    pub fn is_resident(&self, w: &Weight) -> bool {
        self.res
            .resident
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&weight_key(w))
    }

    /// Bytes of weights resident on the device.
    pub fn resident_bytes(&self) -> u64 {
        self.res
            .resident
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|d| d.bytes)
            .sum()
    }

    pub fn stats(&self) -> Option<Stats> {
        self.dev.as_ref().map(|d| d.stats())
    }

    /// y = x · Wᵀ over all rows: `x` [t, cols] -> [t, rows].
    pub fn linear(&self, w: &Weight, x: &[f32], t: usize) -> Vec<f32> {
        let mut y = vec![0f32; t * w.rows()];
        self.linear_range(w, 0..w.rows(), x, t, &mut y);
        y
    }

    /// Rows `rows` of `w` applied to `t` input rows (see [`cpu::linear_range`]).
    pub fn linear_range(&self, w: &Weight, rows: Range<usize>, x: &[f32], t: usize, y: &mut [f32]) {
        if let Some(dev) = self
            .dev
            .as_ref()
            .filter(|_| !self.res.failed.load(Ordering::Relaxed))
        {
            let dw = self
                .res
                .resident
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&weight_key(w))
                .copied();
            if let Some(dw) = dw {
                let start = std::time::Instant::now();
                let r = self.device_linear(dev.as_ref(), weight_key(w), dw, rows.clone(), x, t, y);
                self.timing.add_device(start);
                match r {
                    Ok(()) => return,
                    // No room for this op's activations, or a shape the kernels do not
                    // take: this product runs on the CPU, the device stays in use.
                    Err(DeviceError::OutOfMemory { .. } | DeviceError::Shape { .. }) => {}
                    Err(e) => self.report_failure(dev.as_ref(), &e),
                }
            }
        }
        self.timing
            .cpu(|| cpu::linear_range(self.kernels, w, rows, x, t, y))
    }

    #[allow(clippy::too_many_arguments)] // the weight (and its key), rows, input and output
    fn device_linear(
        &self,
        dev: &dyn Device,
        key: usize,
        w: DevWeight,
        rows: Range<usize>,
        x: &[f32],
        t: usize,
        y: &mut [f32],
    ) -> Result<(), DeviceError> {
        let mut sc = lock(&self.scratch);
        let xb = grow(dev, &mut sc.x, 4 * x.len())?;
        let yb = grow(dev, &mut sc.y, 4 * y.len())?;
        dev.write(xb, f32_bytes(x), Stream::COMPUTE)?;
        self.launch_linear(dev, key, w, rows, xb, yb, t)?;
        dev.read(yb, f32_bytes_mut(y), Stream::COMPUTE)
    }
}

/// A scratch buffer of at least `bytes`, reallocated when too small.
fn grow(
    dev: &dyn Device,
    slot: &mut Option<(Buf, usize)>,
    bytes: usize,
) -> Result<Buf, DeviceError> {
    match slot {
        Some((b, n)) if *n >= bytes => Ok(*b),
        _ => {
            if let Some((b, _)) = slot.take() {
                dev.free(b);
            }
            let n = bytes.next_power_of_two().max(1 << 16);
            let b = dev.alloc(n)?;
            *slot = Some((b, n));
            Ok(b)
        }
    }
}

impl Drop for Exec {
    fn drop(&mut self) {
        // The promotion worker stops first (copies still queued are skipped).
        self.promoter.take();
        if let Some(dev) = &self.dev {
            let sc = self.scratch.get_mut().unwrap_or_else(|p| p.into_inner());
            for (b, _) in [sc.x.take(), sc.y.take()].into_iter().flatten() {
                dev.free(b);
            }
            self.tables.free_all(dev.as_ref());
            let params = self.params.get_mut().unwrap_or_else(|p| p.into_inner());
            for (_, b) in params.drain() {
                dev.free(b);
            }
            let resident =
                std::mem::take(&mut *self.res.resident.write().unwrap_or_else(|p| p.into_inner()));
            for (_, dw) in resident {
                dev.free_weight(dw);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuDevice;
    use crate::backend::device::{Event, Result};
    use crate::model::checkpoint::Bytes;
    use crate::model::synth::SplitMix64;

    /// A device whose kernels always fail (a driver gone bad mid-run).
    struct Broken(CpuDevice);

    impl Device for Broken {
        fn name(&self) -> String {
            "broken GPU".into()
        }
        fn capacity(&self) -> u64 {
            self.0.capacity()
        }
        fn in_use(&self) -> u64 {
            self.0.in_use()
        }
        fn alloc(&self, bytes: usize) -> Result<Buf> {
            self.0.alloc(bytes)
        }
        fn free(&self, b: Buf) {
            self.0.free(b)
        }
        fn write_at(&self, dst: Buf, offset: usize, src: &[u8], s: Stream) -> Result<()> {
            self.0.write_at(dst, offset, src, s)
        }
        fn read(&self, src: Buf, dst: &mut [u8], s: Stream) -> Result<()> {
            self.0.read(src, dst, s)
        }
        fn upload_weight(&self, w: &Weight, s: Stream) -> Result<DevWeight> {
            self.0.upload_weight(w, s)
        }
        fn free_weight(&self, w: DevWeight) {
            self.0.free_weight(w)
        }
        fn run(&self, _op: &Op, _s: Stream) -> Result<()> {
            Err(DeviceError::Backend("CUDA_ERROR_LAUNCH_FAILED".into()))
        }
        fn record(&self, s: Stream) -> Result<Event> {
            self.0.record(s)
        }
        fn wait(&self, s: Stream, e: Event) -> Result<()> {
            self.0.wait(s, e)
        }
        fn synchronize(&self) -> Result<()> {
            Ok(())
        }
        fn stats(&self) -> Stats {
            self.0.stats()
        }
    }

    fn weight(r: &mut SplitMix64) -> Weight {
        let (rows, cols) = (48, 64);
        Weight::Fp4 {
            rows,
            cols,
            packed: Bytes::from_vec((0..rows * cols / 2).map(|_| r.next_u64() as u8).collect()),
            scales: Bytes::from_vec(
                (0..rows * cols / 32)
                    .map(|_| 120 + (r.next_u64() % 8) as u8)
                    .collect(),
            ),
        }
    }

    #[test]
    fn resident_weights_run_on_the_device_others_on_the_cpu() {
        let mut r = SplitMix64::new(5);
        let (a, b) = (weight(&mut r), weight(&mut r));
        let x: Vec<f32> = (0..3 * 64).map(|_| r.uniform()).collect();
        let dev = Arc::new(CpuDevice::new());
        let ex = Exec::on(dev.clone());
        assert!(ex.make_resident(&a).expect("upload"));
        assert!(ex.is_resident(&a) && !ex.is_resident(&b));
        assert_eq!(ex.linear(&a, &x, 3), cpu::linear(&a, &x, 3));
        assert_eq!(dev.stats().launches, 1);
        assert_eq!(ex.linear(&b, &x, 3), cpu::linear(&b, &x, 3));
        assert_eq!(
            dev.stats().launches,
            1,
            "b is not resident: computed on the CPU"
        );
        ex.evict(&a);
        assert!(!ex.is_resident(&a));
        assert_eq!(ex.resident_bytes(), 0);
    }

    #[test]
    fn a_failing_device_falls_back_to_the_cpu() {
        let mut r = SplitMix64::new(6);
        let a = weight(&mut r);
        let x: Vec<f32> = (0..64).map(|_| r.uniform()).collect();
        let ex = Exec::on(Arc::new(Broken(CpuDevice::new())));
        assert!(ex.make_resident(&a).expect("upload"));
        assert_eq!(ex.linear(&a, &x, 1), cpu::linear(&a, &x, 1));
        assert!(
            ex.res.failed.load(Ordering::Relaxed),
            "the failure is remembered"
        );
        assert_eq!(ex.linear(&a, &x, 1), cpu::linear(&a, &x, 1));
    }

    #[test]
    fn a_full_device_keeps_weights_on_the_cpu() {
        let mut r = SplitMix64::new(7);
        let a = weight(&mut r);
        let ex = Exec::on(Arc::new(CpuDevice::with_capacity(100)));
        assert!(!ex.make_resident(&a).expect("no error, just no room"));
        assert!(Exec::cpu().make_resident(&a).is_ok_and(|placed| !placed));
    }

    #[test]
    fn promotion_copies_do_not_stall_kernels_that_do_not_need_them() {
        use crate::backend::device::Stream;
        use crate::backend::sim::{SimCost, SimDevice};
        let mut r = SplitMix64::new(8);
        let (a, b) = (weight(&mut r), weight(&mut r));
        let x: Vec<f32> = (0..64).map(|_| r.uniform()).collect();
        // A slow link: each upload takes ~1 s of modelled copy time.
        let cost = SimCost {
            host_to_device_gbs: 1e-6,
            ..SimCost::default()
        };
        let sim = Arc::new(SimDevice::new(1 << 30, cost));
        let ex = Exec::on(sim.clone());
        assert!(ex.make_resident(&a).expect("upload"));
        ex.linear(&a, &x, 1); // first use of a: the compute stream waits for its copy
        let after_a = sim.stream_time(Stream::COMPUTE);
        assert!(after_a >= sim.stream_time(Stream::COPY));
        assert!(ex.make_resident(&b).expect("upload")); // b's copy now in flight
        ex.linear(&a, &x, 1); // a does not need b: no wait
        let t = sim.stream_time(Stream::COMPUTE);
        assert!(
            t < sim.stream_time(Stream::COPY),
            "kernel on a waited for b's copy"
        );
        ex.linear(&b, &x, 1); // b's first use waits for its copy
        assert!(sim.stream_time(Stream::COMPUTE) >= sim.stream_time(Stream::COPY));
    }
}
