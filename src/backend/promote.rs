//! Expert promotions in the background: a worker thread makes weights resident (the host copy
//! into pinned staging and the transfer on the copy stream) while the thread that asked goes
//! on decoding. A weight counts as resident only once its copy is queued on the device (its
//! first kernel then waits for the copy's event on the device, not the host); until then the
//! expert runs on the CPU.

use super::device::{DevWeight, Device, DeviceError, Event, Stream, lock};
use crate::model::weights::Weight;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, mpsc};

/// What the worker shares with the executor: the resident weights (by key), the copy events
/// kernels wait for, and the device-failed flag.
#[derive(Clone)]
pub struct Residency {
    pub resident: Arc<RwLock<HashMap<usize, DevWeight>>>,
    pub pending: Arc<Mutex<HashMap<usize, Event>>>,
    pub failed: Arc<AtomicBool>,
}

impl Residency {
    pub fn new() -> Residency {
        Residency {
            resident: Arc::new(RwLock::new(HashMap::new())),
            pending: Arc::new(Mutex::new(HashMap::new())),
            failed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Upload `w` on the copy stream and publish it as resident under `key`.
    pub fn upload(&self, dev: &dyn Device, key: usize, w: &Weight) -> Result<(), DeviceError> {
        let dw = dev.upload_weight(w, Stream::COPY)?;
        match dev.record(Stream::COPY) {
            Ok(e) => {
                lock(&self.pending).insert(key, e);
                self.resident
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, dw);
                Ok(())
            }
            Err(e) => {
                dev.free_weight(dw);
                Err(e)
            }
        }
    }

    /// A device error that is not about room: say so once and stop using the device.
    pub fn report_failure(&self, dev: &dyn Device, e: &DeviceError) {
        if !self.failed.swap(true, Ordering::Relaxed) {
            eprintln!(
                "dsflash: {} failed ({e}); continuing on the CPU",
                dev.name()
            );
        }
    }
}

impl Default for Residency {
    fn default() -> Self {
        Residency::new()
    }
}

#[derive(Default)]
struct Queue {
    /// Keys queued or being copied.
    inflight: HashSet<usize>,
    /// Keys the device had no room for (the caller gives their slots up).
    refused: Vec<usize>,
}

#[derive(Default)]
struct Shared {
    q: Mutex<Queue>,
    idle: Condvar,
    /// The executor is going away: queued copies are dropped, not made.
    closing: AtomicBool,
}

/// The background promotion worker of one device.
pub struct Promoter {
    tx: Option<mpsc::Sender<(usize, Weight)>>,
    worker: Option<std::thread::JoinHandle<()>>,
    shared: Arc<Shared>,
}

impl Promoter {
    pub fn spawn(dev: Arc<dyn Device>, res: Residency) -> Promoter {
        let (tx, rx) = mpsc::channel::<(usize, Weight)>();
        let shared = Arc::new(Shared::default());
        let sh = shared.clone();
        let worker = std::thread::Builder::new()
            .name("dsflash-promote".into())
            .spawn(move || {
                for (key, w) in rx {
                    let r = if sh.closing.load(Ordering::Relaxed) {
                        Ok(())
                    } else if res.failed.load(Ordering::Relaxed) {
                        Err(DeviceError::Backend("device already failed".into()))
                    } else {
                        res.upload(dev.as_ref(), key, &w)
                    };
                    let mut q = lock(&sh.q);
                    match r {
                        Ok(()) => {}
                        Err(DeviceError::OutOfMemory { .. }) => q.refused.push(key),
                        Err(e) => {
                            res.report_failure(dev.as_ref(), &e);
                            q.refused.push(key);
                        }
                    }
                    q.inflight.remove(&key);
                    sh.idle.notify_all();
                }
            })
            .ok();
        Promoter {
            tx: worker.as_ref().map(|_| tx),
            worker,
            shared,
        }
    }

    /// Queue `w` (under `key`) for upload. False when there is no worker (the caller copies
    /// it itself).
    pub fn queue(&self, key: usize, w: &Weight) -> bool {
        let Some(tx) = &self.tx else {
            return false;
        };
        let mut q = lock(&self.shared.q);
        if !q.inflight.insert(key) {
            return true;
        }
        if tx.send((key, w.clone())).is_err() {
            q.inflight.remove(&key);
            return false;
        }
        true
    }

    /// Block until `key` is no longer queued (before its device copy may be freed).
    pub fn wait_for(&self, key: usize) {
        let mut q = lock(&self.shared.q);
        while q.inflight.contains(&key) {
            q = self.shared.idle.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Block until every queued upload is done.
    pub fn wait_all(&self) {
        let mut q = lock(&self.shared.q);
        while !q.inflight.is_empty() {
            q = self.shared.idle.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Keys refused since the last call.
    pub fn take_refused(&self) -> Vec<usize> {
        std::mem::take(&mut lock(&self.shared.q).refused)
    }
}

impl Drop for Promoter {
    fn drop(&mut self) {
        // Copies still queued are skipped; closing the channel ends the worker.
        self.shared.closing.store(true, Ordering::Relaxed);
        self.tx.take();
        if let Some(h) = self.worker.take() {
            let _ = h.join();
        }
    }
}
