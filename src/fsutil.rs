//! File helpers shared by every layer, so nothing is ever left half-written under its name,
//! nothing is written through a link planted where we write, and nothing that is not a
//! regular file is opened as a model file.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

/// What a path is, in words, when it is not a regular file.
fn kind_of(ft: std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_fifo() {
        "a named pipe (FIFO)"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_block_device() || ft.is_char_device() {
        "a device"
    } else {
        "not a regular file"
    }
}

/// Open `path` for reading only if it is a regular file (after following links). A FIFO or
/// a device is refused without blocking: the open does not wait for a writer.
pub fn open_regular(path: &Path) -> std::io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let ft = f.metadata()?.file_type();
    if !ft.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} (expected a regular file)", kind_of(ft)),
        ));
    }
    // Back to blocking reads (O_NONBLOCK has no effect on regular files, but say what we mean).
    // SAFETY: fcntl on a descriptor we own, with flags read from it.
    unsafe {
        use std::os::fd::AsRawFd;
        let fd = f.as_raw_fd();
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK);
        }
    }
    Ok(f)
}

/// Read a whole regular file (see `open_regular`).
pub fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut f = open_regular(path)?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok(buf)
}

/// Temp files being written right now, so that a forced exit on a second signal can remove
/// them (`remove_pending_temps`, async-signal-safe). Fixed slots: a process writes at most a
/// few files at once; a write finding no free slot simply is not tracked.
const SLOTS: usize = 8;
static PENDING: [AtomicPtr<libc::c_char>; SLOTS] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; SLOTS];

/// Remove every temp file still being written (for a signal handler: only `unlink`).
pub fn remove_pending_temps() {
    for slot in &PENDING {
        let p = slot.load(Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: the pointer is a NUL-terminated path owned by a live `TempGuard`
            // (cleared before the guard frees it); unlink is async-signal-safe.
            unsafe {
                libc::unlink(p);
            }
        }
    }
}

/// A temp file that is removed unless it was renamed into place.
struct TempGuard {
    path: PathBuf,
    c_path: Option<CString>,
    slot: Option<usize>,
    keep: bool,
}

impl TempGuard {
    fn new(path: PathBuf) -> TempGuard {
        let c_path = CString::new(path.as_os_str().as_bytes()).ok();
        let slot = c_path.as_ref().and_then(|c| {
            let ptr = c.as_ptr() as *mut libc::c_char;
            PENDING.iter().position(|s| {
                s.compare_exchange(
                    std::ptr::null_mut(),
                    ptr,
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                )
                .is_ok()
            })
        });
        TempGuard {
            path,
            c_path,
            slot,
            keep: false,
        }
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            PENDING[i].store(std::ptr::null_mut(), Ordering::SeqCst);
        }
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
        // The path string is freed only now, after its slot was cleared.
        self.c_path.take();
    }
}

/// A file written under a temp name and renamed into place by `commit`: a unique name in
/// the same directory, created exclusively and without following links. Dropped without
/// `commit` (an error, a panic), the temp file is removed. Refuses a destination that exists
/// and is not a regular file (a device, a FIFO, a directory, a symbolic link): those are
/// never replaced.
pub struct AtomicFile {
    file: File,
    dest: PathBuf,
    guard: TempGuard,
}

impl AtomicFile {
    pub fn create(path: &Path) -> anyhow::Result<AtomicFile> {
        let shown = path.display();
        let name = path
            .file_name()
            .ok_or_else(|| anyhow::anyhow!("{shown}: not a file name"))?
            .to_string_lossy()
            .into_owned();
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if !m.file_type().is_file() => anyhow::bail!(
                "{shown}: is {}; refusing to replace it (give the path of a regular file)",
                kind_of(m.file_type())
            ),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => anyhow::bail!("{shown}: {e}"),
        }
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut attempt = 0;
        loop {
            let unique = format!(
                ".{name}.{}.{}.{}.tmp",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos())
                    .unwrap_or(0)
            );
            let tmp = dir.join(unique);
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .custom_flags(libc::O_NOFOLLOW)
                .mode(0o644)
                .open(&tmp)
            {
                Ok(file) => {
                    return Ok(AtomicFile {
                        file,
                        dest: path.to_path_buf(),
                        guard: TempGuard::new(tmp),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 16 => {
                    attempt += 1;
                }
                Err(e) => anyhow::bail!("{}: cannot create a temp file: {e}", dir.display()),
            }
        }
    }

    /// The temp file (e.g. to set its length).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Sync and rename into place.
    pub fn commit(mut self) -> anyhow::Result<()> {
        let tmp_shown = self.guard.path.display().to_string();
        self.file
            .flush()
            .and_then(|_| self.file.sync_all())
            .map_err(|e| anyhow::anyhow!("{tmp_shown}: {e}"))?;
        std::fs::rename(&self.guard.path, &self.dest)
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.dest.display()))?;
        self.guard.keep = true;
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Write `bytes` to `path` atomically (see `AtomicFile`).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.write_all(bytes)
        .map_err(|e| anyhow::anyhow!("{}: {e}", f.guard.path.display()))?;
    f.commit()
}

/// Free bytes on the filesystem holding `p` (its nearest existing ancestor).
pub fn free_bytes(p: &Path) -> Option<u64> {
    let mut q = p.to_path_buf();
    while !q.exists() {
        q = q.parent()?.to_path_buf();
    }
    let c = CString::new(q.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we own; the path is a valid C string.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    (rc == 0).then(|| s.f_bavail as u64 * s.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_speed_reads_written_files_and_skips_sparse_ones() {
        let d = tempfile::tempdir().unwrap();
        let full = d.path().join("full.bin");
        std::fs::write(&full, vec![7u8; 24 << 20]).unwrap();
        let sparse = d.path().join("sparse.bin");
        File::create(&sparse).unwrap().set_len(1 << 30).unwrap();
        let budget = std::time::Duration::from_millis(20);
        let s = disk_speed(&[full.clone(), sparse.clone()], 5_000_000, budget).expect("measured");
        // Whole 4 KiB blocks per read, at least four of them.
        assert_eq!(s.chunk_bytes, 1220 * 4096);
        assert!(
            s.reads >= 4 && s.read_gbs > 0.0 && s.latency_ms > 0.0,
            "{s:?}"
        );
        assert!(disk_speed(&[sparse], 5_000_000, budget).is_none());
        // A file shorter than one read is not used.
        assert!(disk_speed(&[full], 32 << 20, budget).is_none());
    }

    fn temps(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn writes_and_replaces_a_regular_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert!(temps(d.path()).is_empty());
    }

    #[test]
    fn a_planted_link_at_the_old_temp_name_is_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, d.path().join(".x.npy.tmp")).unwrap();
        write_atomic(&d.path().join("x.npy"), b"data").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(d.path().join("x.npy")).unwrap(), b"data");
    }

    #[test]
    fn refuses_to_replace_what_is_not_a_regular_file() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        let e = write_atomic(&link, b"x").unwrap_err().to_string();
        assert!(e.contains("symbolic link") && e.contains("link"), "{e}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let e = write_atomic(Path::new("/dev/null"), b"x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/dev/null") && e.contains("device"), "{e}");
        let sub = d.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let e = write_atomic(&sub, b"x").unwrap_err().to_string();
        assert!(e.contains("directory"), "{e}");
        assert!(temps(d.path()).is_empty());
    }

    #[test]
    fn open_regular_refuses_a_fifo_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("config.json");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo with a valid path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let e = read_regular(&fifo).unwrap_err().to_string();
        assert!(e.contains("FIFO"), "{e}");
        let e = read_regular(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("device"), "{e}");
    }
}

/// What reading uncached ranges of a drive's files costs (`dsflash bench`, for the plan's
/// disk tier).
#[derive(Debug, Clone, serde::Serialize)]
pub struct DiskSpeed {
    /// GB/s for reads of `chunk_bytes` at random places, one at a time (an expert's size).
    pub read_gbs: f64,
    pub chunk_bytes: usize,
    /// Median time of a 4 KiB read at a random place.
    pub latency_ms: f64,
    /// Read with O_DIRECT (else the pages were dropped from the page cache first).
    pub direct: bool,
    pub reads: usize,
}

/// Measure [`DiskSpeed`] on `files` (those of at least `chunk` bytes): 32 small reads, then
/// `chunk`-sized ones until `budget` is spent (at least 4); with O_DIRECT where the file
/// system takes it. None if no file is large enough or a read fails; sparse files (holes
/// read as zeros without the drive) are skipped.
pub fn disk_speed(
    files: &[PathBuf],
    chunk: usize,
    budget: std::time::Duration,
) -> Option<DiskSpeed> {
    measure_disk(files, chunk, budget, true).or_else(|| measure_disk(files, chunk, budget, false))
}

fn measure_disk(
    files: &[PathBuf],
    chunk: usize,
    budget: std::time::Duration,
    mut direct: bool,
) -> Option<DiskSpeed> {
    use std::os::unix::fs::{FileExt, MetadataExt};
    const ALIGN: usize = 4096;
    let chunk = (chunk / ALIGN).max(1) * ALIGN;
    let mut open = Vec::new();
    for p in files {
        let Ok(m) = std::fs::metadata(p) else {
            continue;
        };
        // Holes: fewer blocks on the drive than the length says.
        if m.len() < chunk as u64 || (m.blocks() * 512) < m.len() / 2 {
            continue;
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(if direct { libc::O_DIRECT } else { 0 })
            .open(p)
            .or_else(|_| {
                direct = false;
                File::open(p)
            });
        if let Ok(f) = f {
            open.push((f, m.len()));
        }
    }
    if open.is_empty() {
        return None;
    }
    // A buffer aligned for O_DIRECT: the aligned part of a larger vector.
    let mut raw = vec![0u8; chunk + ALIGN];
    let at = raw.as_ptr().align_offset(ALIGN);
    let buf = &mut raw[at..at + chunk];
    let mut rng = crate::model::synth::SplitMix64::new(0x5eed);
    let mut pick = |len: usize| {
        let (f, size) = &open[(rng.next_u64() % open.len() as u64) as usize];
        let slots = (size - len as u64) / ALIGN as u64;
        let off = (rng.next_u64() % slots.max(1)) * ALIGN as u64;
        (f, off)
    };
    let read = |f: &File, off: u64, b: &mut [u8]| -> bool {
        if !direct {
            drop_cached(f, off, b.len());
        }
        f.read_exact_at(b, off).is_ok()
    };
    let mut small = Vec::new();
    for _ in 0..32 {
        let (f, off) = pick(ALIGN);
        let t = std::time::Instant::now();
        if !read(f, off, &mut buf[..ALIGN]) {
            return None;
        }
        small.push(t.elapsed().as_secs_f64());
    }
    small.sort_by(f64::total_cmp);
    let (mut reads, t) = (0usize, std::time::Instant::now());
    while reads < 4 || t.elapsed() < budget {
        let (f, off) = pick(chunk);
        if !read(f, off, buf) {
            return None;
        }
        reads += 1;
    }
    Some(DiskSpeed {
        read_gbs: (reads * chunk) as f64 / t.elapsed().as_secs_f64() / 1e9,
        chunk_bytes: chunk,
        latency_ms: 1e3 * small[small.len() / 2],
        direct,
        reads,
    })
}

/// Ask the kernel to drop `len` bytes at `off` of `f` from the page cache (advice only).
pub fn drop_cached(f: &File, off: u64, len: usize) {
    use std::os::unix::io::AsRawFd;
    // SAFETY: posix_fadvise on an open descriptor we own; it only gives advice.
    unsafe {
        libc::posix_fadvise(
            f.as_raw_fd(),
            off as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        );
    }
}
