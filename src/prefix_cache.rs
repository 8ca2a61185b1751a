//! The prompt cache on disk: decode states saved at step boundaries of a prefill, so a later
//! prompt that starts with the same tokens (the same document, another question) restores
//! the longest stored prefix its own prefill would pass through, and prefills only the rest.
//!
//! Layout: `<dir>/states/<engine>/p<tokens>-<hash>.dss`, where `<engine>` is a hash of
//! `Engine::identity` (model fingerprint, numerics, kernels, device) and `<hash>` one of the
//! token prefix and the steps that computed it (see `Steps`: the same tokens in the same
//! steps are the same bits); `r-<hash>.dss` holds a conversation's exact state under the hash
//! of its saved messages (`/save`, `/load`). Files are written under a temp name and renamed;
//! each carries its own checksum (see `engine::snapshot`). A file that cannot be used
//! (truncated, damaged, foreign, unreadable) is removed and the prompt prefilled: the cache
//! can make an answer faster, never different. The least recently used files go first when
//! the total passes the cap. Several processes may share the directory.

use crate::engine::Session;
use crate::engine::snapshot::{self, Steps};
use sha2::{Digest, Sha256};
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

const SUFFIX: &str = ".dss";
/// A temp file older than this belongs to a process that died while writing.
const STALE_TEMP: Duration = Duration::from_secs(3600);

pub struct PrefixCache {
    root: PathBuf,
    max_bytes: u64,
    verbose: bool,
}

/// One state file, for `dsflash cache list`.
pub struct Entry {
    pub path: PathBuf,
    pub bytes: u64,
    pub modified: SystemTime,
    /// None: not readable as a state file.
    pub header: Option<snapshot::Header>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The name of the state of `tokens` computed in `steps`.
fn prefix_name(tokens: &[u32], steps: &Steps) -> String {
    let mut h = Sha256::new();
    feed(&mut h, tokens);
    named(&h, tokens.len(), steps)
}

fn feed(h: &mut Sha256, tokens: &[u32]) {
    for c in tokens.chunks(4096) {
        let b: Vec<u8> = c.iter().flat_map(|t| t.to_le_bytes()).collect();
        h.update(&b);
    }
}

/// `prefix_name` from a hasher that has been fed the `n` tokens.
fn named(h: &Sha256, n: usize, steps: &Steps) -> String {
    let mut h = h.clone();
    h.update(steps.hex());
    format!("p{n}-{}{SUFFIX}", hex(&h.finalize()[..16]))
}

fn conversation_name(key: &[u8]) -> String {
    format!("r-{}{SUFFIX}", hex(&Sha256::digest(key)[..16]))
}

impl PrefixCache {
    /// The cache under `root` holding at most `max_bytes`; `verbose` notes every file skipped
    /// or not written on stderr.
    pub fn new(root: PathBuf, max_bytes: u64, verbose: bool) -> PrefixCache {
        PrefixCache {
            root,
            max_bytes,
            verbose,
        }
    }

    /// `$XDG_CACHE_HOME/dsflash`, else `~/.cache/dsflash`.
    pub fn default_dir() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|h| !h.is_empty())
                    .map(|h| PathBuf::from(h).join(".cache"))
            })?;
        Some(base.join("dsflash"))
    }

    fn note(&self, msg: impl std::fmt::Display) {
        if self.verbose {
            eprintln!("dsflash: prompt cache: {msg}");
        }
    }

    fn states(root: &Path) -> PathBuf {
        root.join("states")
    }

    /// The directory of the states of `s`'s engine.
    fn engine_dir(&self, s: &Session) -> PathBuf {
        let id = Sha256::digest(s.engine_identity().as_bytes());
        Self::states(&self.root).join(hex(&id[..16]))
    }

    /// Restore into `s` the longest stored state of a prefix of `ids` that `ids`'s prefill
    /// in the steps starting at `plan` (see `session::plan_steps`) passes through, if it is
    /// longer than what `s` holds. Returns its token count.
    pub fn restore_longest(&self, s: &mut Session, ids: &[u32], plan: &[usize]) -> Option<usize> {
        let dir = self.engine_dir(s);
        if !dir.is_dir() {
            return None;
        }
        // The state at plan[i] was computed in the steps plan[..i]: the names of all of
        // them, hashing the tokens once.
        let (mut h, mut steps, mut fed) = (Sha256::new(), Steps::default(), 0);
        let mut names = Vec::new();
        for &n in plan.iter().take_while(|&&n| n <= ids.len()) {
            feed(&mut h, &ids[fed..n]);
            fed = n;
            if n > s.len() {
                names.push((n, named(&h, n, &steps), steps.clone()));
            }
            steps.push(n);
        }
        for (n, name, steps) in names.into_iter().rev() {
            let path = dir.join(name);
            if !path.exists() {
                continue;
            }
            match self.load(s, &path, Some(&steps), Some(&ids[..n])) {
                Ok(()) => return Some(n),
                Err(e) => self.drop_file(&path, &e),
            }
        }
        None
    }

    fn load(
        &self,
        s: &mut Session,
        path: &Path,
        steps: Option<&Steps>,
        want: Option<&[u32]>,
    ) -> anyhow::Result<()> {
        let f = crate::fsutil::open_regular(path)?;
        let mut r = BufReader::with_capacity(1 << 20, &f);
        let l = s.read_state(&mut r, steps)?;
        if want.is_some_and(|w| l.tokens() != w) {
            anyhow::bail!("holds other tokens than its name says");
        }
        s.install(l);
        // Recently used: last to be evicted.
        let _ = f.set_modified(SystemTime::now());
        Ok(())
    }

    fn drop_file(&self, path: &Path, why: &dyn std::fmt::Display) {
        self.note(format_args!("{}: {why}; removed", path.display()));
        let _ = std::fs::remove_file(path);
    }

    /// Keep `s`'s state for prompts that start with its tokens and whose prefill takes the
    /// same steps.
    pub fn store(&self, s: &Session) {
        if !s.is_empty() {
            // The same tokens in the same steps: the same bits, so one already there stays.
            self.write(s, &prefix_name(s.tokens(), s.steps()), false);
        }
    }

    /// Keep `s`'s exact state under `key` (a saved conversation's bytes).
    pub fn store_as_run(&self, s: &Session, key: &[u8]) -> bool {
        !s.is_empty() && self.write(s, &conversation_name(key), true)
    }

    /// Restore the state kept under `key` by `store_as_run`; returns its token count.
    pub fn restore_as_run(&self, s: &mut Session, key: &[u8]) -> Option<usize> {
        let path = self.engine_dir(s).join(conversation_name(key));
        if !path.exists() {
            return None;
        }
        match self.load(s, &path, None, None) {
            Ok(()) => Some(s.len()),
            Err(e) => {
                self.drop_file(&path, &e);
                None
            }
        }
    }

    /// Write `s` as `name` in its engine's directory (unless `replace` is off and it is
    /// already there: then it only counts as used), then keep the total under the cap.
    /// Failures (a full disk, a read-only directory) are notes: the answer does not depend on
    /// them.
    fn write(&self, s: &Session, name: &str, replace: bool) -> bool {
        let dir = self.engine_dir(s);
        let path = dir.join(name);
        if !replace && path.exists() {
            let _ = std::fs::File::open(&path).and_then(|f| f.set_modified(SystemTime::now()));
            return true;
        }
        let r = (|| -> anyhow::Result<()> {
            std::fs::create_dir_all(&dir)?;
            // Ours are plain directories: a link planted in their place is not followed.
            for d in [Self::states(&self.root), dir.clone()] {
                if !std::fs::symlink_metadata(&d)?.is_dir() {
                    anyhow::bail!("{}: not a directory", d.display());
                }
            }
            let mut f = crate::fsutil::AtomicFile::create(&path)?;
            let mut w = BufWriter::with_capacity(1 << 20, &mut f);
            s.save(&mut w)?;
            w.flush()?;
            drop(w);
            f.commit()
        })();
        match r {
            Ok(()) => {
                self.evict();
                true
            }
            Err(e) => {
                self.note(format_args!("not saved in {}: {e:#}", dir.display()));
                false
            }
        }
    }

    /// Remove the least recently used states until the total fits the cap, and temp files
    /// left by processes that died while writing.
    fn evict(&self) {
        let mut files = Vec::new();
        let now = SystemTime::now();
        for e in list_files(&self.root) {
            let name = e.path.file_name().map(|n| n.to_string_lossy().into_owned());
            let name = name.unwrap_or_default();
            if name.starts_with('.') {
                if name.ends_with(".tmp")
                    && now.duration_since(e.modified).unwrap_or_default() > STALE_TEMP
                {
                    let _ = std::fs::remove_file(&e.path);
                }
                continue;
            }
            files.push(e);
        }
        let mut total: u64 = files.iter().map(|e| e.bytes).sum();
        files.sort_by_key(|e| e.modified);
        for e in files {
            if total <= self.max_bytes {
                break;
            }
            if std::fs::remove_file(&e.path).is_ok() {
                self.note(format_args!(
                    "{}: removed (least recently used; the cache is capped at {} bytes)",
                    e.path.display(),
                    self.max_bytes
                ));
            }
            total = total.saturating_sub(e.bytes);
        }
    }
}

/// Every file in the engines' directories under `root` (temp files included).
fn list_files(root: &Path) -> Vec<Entry> {
    let mut out = Vec::new();
    let Ok(engines) = std::fs::read_dir(PrefixCache::states(root)) else {
        return out;
    };
    for d in engines.flatten() {
        if !d.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Ok(files) = std::fs::read_dir(d.path()) else {
            continue;
        };
        for f in files.flatten() {
            let Ok(m) = f.metadata() else { continue };
            if !m.is_file() {
                continue;
            }
            out.push(Entry {
                path: f.path(),
                bytes: m.len(),
                modified: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                header: None,
            });
        }
    }
    out
}

/// The state files under `root`, most recently used first, with their headers.
pub fn list(root: &Path) -> Vec<Entry> {
    let mut v: Vec<Entry> = list_files(root)
        .into_iter()
        .filter(|e| {
            e.path
                .file_name()
                .is_some_and(|n| !n.to_string_lossy().starts_with('.'))
        })
        .map(|mut e| {
            e.header = crate::fsutil::open_regular(&e.path)
                .ok()
                .and_then(|f| snapshot::read_header(&mut BufReader::new(f)).ok());
            e
        })
        .collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.modified));
    v
}

/// Remove every state file under `root`; returns (files, bytes) removed.
pub fn clear(root: &Path) -> std::io::Result<(usize, u64)> {
    let (mut n, mut bytes) = (0, 0);
    for e in list_files(root) {
        match std::fs::remove_file(&e.path) {
            Ok(()) => {
                n += 1;
                bytes += e.bytes;
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(std::io::Error::new(
                    err.kind(),
                    format!("{}: {err}", e.path.display()),
                ));
            }
        }
    }
    if let Ok(engines) = std::fs::read_dir(PrefixCache::states(root)) {
        for d in engines.flatten() {
            let _ = std::fs::remove_dir(d.path());
        }
    }
    Ok((n, bytes))
}
