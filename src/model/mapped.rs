//! A read-only mapping of a model file that knows its path, so that a fault inside it (the
//! file shrank or was replaced while in use: SIGBUS) can be reported naming the file.
//!
//! The registry is a fixed table of atomics because a signal handler reads it
//! (`file_at`); nothing here allocates or locks on that path.

use memmap2::Mmap;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

const SLOTS: usize = 1024;

struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    path: AtomicPtr<libc::c_char>,
}

static TABLE: [Slot; SLOTS] = [const {
    Slot {
        start: AtomicUsize::new(0),
        len: AtomicUsize::new(0),
        path: AtomicPtr::new(std::ptr::null_mut()),
    }
}; SLOTS];

/// A mapped file, registered while it lives.
pub struct Mapped {
    map: Mmap,
    path: Option<CString>,
    slot: Option<usize>,
}

impl Mapped {
    /// Map `file` (opened from `path`) read-only.
    pub fn map(file: &std::fs::File, path: &Path) -> std::io::Result<Mapped> {
        // SAFETY: the file is opened read-only and the mapping is never written through. A
        // file truncated by another process while we run faults on access (SIGBUS); the
        // registry below lets that fault be reported as an error naming the file.
        let map = unsafe { Mmap::map(file) }?;
        let path = CString::new(path.as_os_str().as_bytes()).ok();
        let slot = path.as_ref().and_then(|p| {
            let ptr = p.as_ptr() as *mut libc::c_char;
            let i = TABLE.iter().position(|s| {
                s.path
                    .compare_exchange(
                        std::ptr::null_mut(),
                        ptr,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    )
                    .is_ok()
            })?;
            TABLE[i].len.store(map.len(), Ordering::SeqCst);
            TABLE[i]
                .start
                .store(map.as_ptr() as usize, Ordering::SeqCst);
            Some(i)
        });
        Ok(Mapped { map, path, slot })
    }
}

impl AsRef<[u8]> for Mapped {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            TABLE[i].start.store(0, Ordering::SeqCst);
            TABLE[i].len.store(0, Ordering::SeqCst);
            TABLE[i].path.store(std::ptr::null_mut(), Ordering::SeqCst);
        }
        // The path is freed only after its slot was cleared.
        self.path.take();
    }
}

/// The path (NUL-terminated) of the registered mapping holding `addr`. Async-signal-safe:
/// only atomic loads.
pub fn file_at(addr: usize) -> Option<*const libc::c_char> {
    TABLE.iter().find_map(|s| {
        let p = s.path.load(Ordering::SeqCst);
        let start = s.start.load(Ordering::SeqCst);
        let len = s.len.load(Ordering::SeqCst);
        (!p.is_null() && start != 0 && addr >= start && addr - start < len).then_some(p as *const _)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_inside_a_mapping_names_its_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("model-00001-of-00002.safetensors");
        std::fs::write(&p, vec![7u8; 10_000]).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        let m = Mapped::map(&f, &p).unwrap();
        let base = m.as_ref().as_ptr() as usize;
        let name = |a| {
            file_at(a).map(|c| {
                // SAFETY: a registered, live NUL-terminated path.
                unsafe { std::ffi::CStr::from_ptr(c) }
                    .to_string_lossy()
                    .into_owned()
            })
        };
        assert_eq!(name(base + 9_999).as_deref(), p.to_str());
        assert_eq!(name(base + 10_000 + 4096 * 16), None);
        drop(m);
        assert_eq!(name(base), None, "unregistered when dropped");
    }
}
