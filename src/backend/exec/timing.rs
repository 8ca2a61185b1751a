//! Where an executor's time went, and how many steps the device path ran or gave up on.

use crate::backend::device::lock;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Wall-clock seconds of the work that went through an executor, by where it ran. Device
/// time counts each device op from its first copy in to its result back on the host
/// (copies and kernels; `Stats` has the bytes); CPU time counts the products that ran on
/// the CPU. Hits on the device and misses on the CPU run at the same time, so the two
/// overlap and may add up to more than the elapsed time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TimeSplit {
    pub device_s: f64,
    pub cpu_s: f64,
}

/// The executor's clocks and step counters.
#[derive(Default)]
pub struct Timing {
    time: Mutex<TimeSplit>,
    /// Steps computed on the device path, and those it gave up on (computed again on the
    /// host).
    device_steps: AtomicU64,
    redone: AtomicU64,
}

impl Timing {
    /// Where the time went so far (see [`TimeSplit`]).
    pub fn split(&self) -> TimeSplit {
        *lock(&self.time)
    }

    /// Run `f` (CPU work done on this executor's behalf, e.g. missed experts on a CPU
    /// executor) and count its time as CPU time.
    pub fn cpu<R>(&self, f: impl FnOnce() -> R) -> R {
        let t = std::time::Instant::now();
        let r = f();
        lock(&self.time).cpu_s += t.elapsed().as_secs_f64();
        r
    }

    pub(super) fn add_device(&self, since: std::time::Instant) {
        lock(&self.time).device_s += since.elapsed().as_secs_f64();
    }

    /// A step's device path gave up (no room, an error) and the host computed it instead.
    pub fn note_redone_step(&self) {
        self.redone.fetch_add(1, Ordering::Relaxed);
    }

    /// Steps the device gave up on so far.
    pub fn redone_steps(&self) -> u64 {
        self.redone.load(Ordering::Relaxed)
    }

    /// A step ran on the device path from start to end.
    pub fn note_device_step(&self) {
        self.device_steps.fetch_add(1, Ordering::Relaxed);
    }

    /// Steps the device path completed so far.
    pub fn device_steps(&self) -> u64 {
        self.device_steps.load(Ordering::Relaxed)
    }
}
