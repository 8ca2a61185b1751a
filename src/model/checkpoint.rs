//! Opening a checkpoint directory: `config.json`, `model.safetensors.index.json` and every
//! shard, each mmapped once. Headers are parsed by the `safetensors` crate from the mapped
//! bytes; the tensors are then checked against the inventory the config implies (presence,
//! dtype, shape, byte length) and every problem is reported at once.

use super::config::{ConfigError, ModelConfig};
use super::layout::{TensorSpec, inventory};
use super::mapped::Mapped;
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const INDEX_FILE: &str = "model.safetensors.index.json";
pub const SINGLE_FILE: &str = "model.safetensors";

/// Why a checkpoint could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{dir}: {msg}")]
    Dir { dir: String, msg: String },
    #[error("{file}: {msg}")]
    File { file: String, msg: String },
    /// Problems found while validating; each string names a file and/or tensor.
    #[error("{}", format_problems(.dir, .problems))]
    Invalid { dir: String, problems: Vec<String> },
}

/// One line: the problem, or the count and the first one (`problems()` lists them all, as
/// `inspect --verbose` does).
fn format_problems(dir: &str, problems: &[String]) -> String {
    match problems {
        [one] => one.clone(),
        many => format!(
            "{dir}: {} problems in the checkpoint, the first: {} (dsflash inspect --verbose lists them all)",
            many.len(),
            many.first().map(String::as_str).unwrap_or("")
        ),
    }
}

impl CheckpointError {
    /// Every problem found (one for the error kinds that stop at the first).
    pub fn problems(&self) -> Vec<String> {
        match self {
            CheckpointError::Invalid { problems, .. } => problems.clone(),
            other => vec![other.to_string()],
        }
    }
}

/// A byte range of a mapped shard. Cheap to clone; keeps the mapping alive.
#[derive(Clone)]
pub struct Bytes {
    map: Arc<dyn AsRef<[u8]> + Send + Sync>,
    start: usize,
    len: usize,
    /// The shard file the map is of (from offset 0): lets `read_copy` read instead of map.
    file: Option<Arc<ShardFile>>,
}

/// A shard file opened for the map and, where the file system takes it, a second time with
/// O_DIRECT: reads that neither go through nor fill the page cache.
pub(crate) struct ShardFile {
    file: File,
    path: PathBuf,
    /// Opened at the first read that wants it (a run without a RAM tier never does).
    direct: std::sync::OnceLock<Option<File>>,
}

impl ShardFile {
    fn new(file: File, path: &Path) -> ShardFile {
        ShardFile {
            file,
            path: path.to_path_buf(),
            direct: std::sync::OnceLock::new(),
        }
    }

    fn direct(&self) -> Option<&File> {
        use std::os::unix::fs::OpenOptionsExt;
        self.direct
            .get_or_init(|| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT | libc::O_NOFOLLOW)
                    .open(&self.path)
                    .ok()
                    // The same file as the one mapped (not one put in its place since).
                    .filter(|d| same_file(d, &self.file))
            })
            .as_ref()
    }
}

fn same_file(a: &File, b: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (a.metadata(), b.metadata()) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Buffers for [`Bytes::read_copy`] that come back when their bytes are dropped, so that a
/// run reading experts over and over reuses memory already faulted in instead of asking the
/// kernel for fresh zeroed pages each time (thousands of page faults per expert).
#[derive(Clone, Default)]
pub struct ReadBuffers {
    free: Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

/// Buffers kept for reuse at most.
const SPARE_BUFFERS: usize = 64;

impl ReadBuffers {
    /// A buffer of at least `len` bytes (contents unspecified): a spare one of that size
    /// class (64 KiB steps, so reads of one matrix shape share a class wherever they start),
    /// or a new one.
    fn take(&self, len: usize) -> Vec<u8> {
        const STEP: usize = 64 << 10;
        let len = len.div_ceil(STEP) * STEP;
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        match free.iter().position(|b| b.len() == len) {
            Some(i) => free.swap_remove(i),
            None => vec![0u8; len],
        }
    }
}

/// A buffer that goes back to its [`ReadBuffers`] when dropped.
struct Pooled {
    buf: Vec<u8>,
    home: ReadBuffers,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let mut free = self.home.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < SPARE_BUFFERS {
            free.push(std::mem::take(&mut self.buf));
        }
    }
}

/// `len` bytes at `off` of `f` (opened with O_DIRECT): the aligned blocks around them read
/// into an aligned buffer from `bufs`, which the returned bytes are a range of.
fn read_direct(f: &File, off: u64, len: usize, bufs: &ReadBuffers) -> std::io::Result<Bytes> {
    use std::os::unix::fs::FileExt;
    const ALIGN: u64 = 4096;
    let first = off / ALIGN * ALIGN;
    let end = (off + len as u64).div_ceil(ALIGN) * ALIGN;
    let span = (end - first) as usize;
    let mut raw = bufs.take(span + ALIGN as usize);
    let at = raw.as_ptr().align_offset(ALIGN as usize);
    let need = (off + len as u64 - first) as usize;
    let mut got = 0;
    // Short reads only at the end of the file, within the last block.
    while got < need {
        let n = f.read_at(&mut raw[at + got..at + span], first + got as u64)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got += n;
    }
    let start = at + (off - first) as usize;
    Ok(Bytes {
        map: Arc::new(Pooled {
            buf: raw,
            home: bufs.clone(),
        }),
        start,
        len,
        file: None,
    })
}

impl Bytes {
    /// Owned bytes (synthetic or transformed weights; the checkpoint itself is never copied).
    pub fn from_vec(v: Vec<u8>) -> Bytes {
        let len = v.len();
        Bytes {
            map: Arc::new(v),
            start: 0,
            len,
            file: None,
        }
    }

    /// A sub-range (relative to this range).
    pub fn slice(&self, start: usize, len: usize) -> Bytes {
        assert!(start + len <= self.len, "slice out of range");
        Bytes {
            map: self.map.clone(),
            start: self.start + start,
            len,
            file: self.file.clone(),
        }
    }

    /// The same bytes as an owned copy read from the shard file (not through the map)
    /// without leaving them in the page cache (O_DIRECT, else dropped after the read): the
    /// caller keeps what it wants to keep. Owned bytes are shared as they are. The buffer
    /// comes from `bufs` and goes back there when the last copy of the bytes is dropped.
    pub fn read_copy(&self, bufs: &ReadBuffers) -> std::io::Result<Bytes> {
        use std::os::unix::fs::FileExt;
        let Some(f) = &self.file else {
            return Ok(self.clone());
        };
        if let Some(d) = f.direct()
            && let Ok(b) = read_direct(d, self.start as u64, self.len, bufs)
        {
            return Ok(b);
        }
        let mut v = vec![0u8; self.len];
        f.file.read_exact_at(&mut v, self.start as u64)?;
        crate::fsutil::drop_cached(&f.file, self.start as u64, self.len);
        Ok(Bytes::from_vec(v))
    }
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &(*self.map).as_ref()[self.start..self.start + self.len]
    }
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes({}..+{})", self.start, self.len)
    }
}

/// One mapped shard file.
pub struct Shard {
    pub path: PathBuf,
    pub file_name: String,
    map: Arc<dyn AsRef<[u8]> + Send + Sync>,
    /// None for a checkpoint in memory.
    file: Option<Arc<ShardFile>>,
    /// 8 + JSON header length: where the data section starts.
    pub data_start: usize,
    pub file_len: u64,
}

/// Where one tensor lives.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    pub shard: usize,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte offsets inside the shard file.
    pub start: usize,
    pub end: usize,
}

/// An opened, validated checkpoint.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub shards: Vec<Shard>,
    pub tensors: HashMap<String, TensorEntry>,
    /// Tensors present in the files that the model does not use (e.g. later releases'
    /// speculative modules), sorted.
    pub extra: Vec<String>,
    /// The inventory the config implies (same order as `layout::inventory`).
    pub expected: Vec<TensorSpec>,
}

#[derive(serde::Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

fn dtype_name(d: Dtype) -> String {
    format!("{d:?}")
}

impl Checkpoint {
    /// The model's identity without reading its weights: SHA-256 (hex) over the config and,
    /// per shard, its name, length and safetensors header (every tensor's name, dtype, shape
    /// and byte range; pages already read to open it). Two checkpoints that differ in any of
    /// these differ here; what it cannot see is a weight byte changed in place.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(serde_json::to_vec(&self.config).unwrap_or_default());
        for s in &self.shards {
            h.update(format!("\nshard {} {}\n", s.file_name, s.file_len));
            let bytes = (*s.map).as_ref();
            h.update(&bytes[..s.data_start.min(bytes.len())]);
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Open and validate `dir`. Nothing is read beyond the headers.
    pub fn open(dir: &Path) -> Result<Checkpoint, CheckpointError> {
        let dir_s = dir.display().to_string();
        let derr = |msg: String| CheckpointError::Dir {
            dir: dir_s.clone(),
            msg,
        };
        let meta = std::fs::metadata(dir)
            .map_err(|e| derr(format!("cannot open model directory: {e}")))?;
        if !meta.is_dir() {
            return Err(derr(
                "is not a directory (expected a checkpoint folder)".into(),
            ));
        }
        let config_path = dir.join("config.json");
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        if !config_path.exists() && !index_path.exists() && !single_path.exists() {
            return Err(derr(format!(
                "not a checkpoint: no config.json and no {INDEX_FILE} (is the download complete?)"
            )));
        }
        let config = ModelConfig::from_file(&config_path)?;

        // Which tensors live in which file.
        let index = if index_path.exists() {
            Some(
                crate::fsutil::read_regular(&index_path).map_err(|e| CheckpointError::File {
                    file: index_path.display().to_string(),
                    msg: format!("cannot read: {e}"),
                })?,
            )
        } else if single_path.exists() {
            None
        } else {
            return Err(derr(format!("no {INDEX_FILE} and no {SINGLE_FILE}")));
        };
        Self::assemble(dir, config, index.as_deref(), |name, listed| {
            map_shard(&dir.join(name), name, listed)
        })
    }

    /// A checkpoint from bytes in memory, validated as `open` validates files (tests and
    /// fuzzing: `dir` only labels the messages). `index_json` None means one shard named
    /// `model.safetensors`.
    pub fn from_memory(
        dir: &Path,
        config_json: &[u8],
        index_json: Option<&[u8]>,
        files: &HashMap<String, Arc<Vec<u8>>>,
    ) -> Result<Checkpoint, CheckpointError> {
        let config = ModelConfig::from_json_bytes(config_json, "config.json")?;
        Self::assemble(dir, config, index_json, |name, listed| {
            let Some(bytes) = files.get(name) else {
                return Err(format!(
                    "{name}: shard is missing ({listed} tensors are listed in it by {INDEX_FILE})"
                ));
            };
            let (data_start, entries) = parse_shard_header(name, bytes)?;
            Ok((
                Shard {
                    path: dir.join(name),
                    file_name: name.to_string(),
                    map: bytes.clone(),
                    file: None,
                    data_start,
                    file_len: bytes.len() as u64,
                },
                entries,
            ))
        })
    }

    /// Validate the index against the shards (each from `load(name, tensors listed)`) and
    /// the tensors against the inventory the config implies.
    fn assemble(
        dir: &Path,
        config: ModelConfig,
        index_json: Option<&[u8]>,
        mut load: impl FnMut(&str, usize) -> ShardResult,
    ) -> Result<Checkpoint, CheckpointError> {
        let dir_s = dir.display().to_string();
        let weight_map: BTreeMap<String, String> = match index_json {
            Some(text) => {
                let idx: IndexFile =
                    serde_json::from_slice(text).map_err(|e| CheckpointError::File {
                        file: dir.join(INDEX_FILE).display().to_string(),
                        msg: format!("not a valid safetensors index: {e}"),
                    })?;
                idx.weight_map
            }
            None => BTreeMap::new(),
        };
        // Shards are files of this directory, never a path that leaves it.
        if let Some(bad) = weight_map.values().find(|f| {
            f.is_empty()
                || f.contains('/')
                || f.contains('\\')
                || f.starts_with('.')
                || f.contains('\0')
        }) {
            return Err(CheckpointError::File {
                file: dir.join(INDEX_FILE).display().to_string(),
                msg: format!(
                    "names the shard {:?}, which is not a file of the checkpoint directory",
                    bad.chars().take(80).collect::<String>()
                ),
            });
        }
        let mut shard_names: Vec<String> = weight_map.values().cloned().collect();
        shard_names.sort();
        shard_names.dedup();
        if weight_map.is_empty() {
            shard_names.push(SINGLE_FILE.to_string());
        }

        let mut problems = Vec::new();
        let mut shards = Vec::new();
        let mut tensors: HashMap<String, TensorEntry> = HashMap::new();
        for name in &shard_names {
            let listed = weight_map.values().filter(|v| *v == name).count();
            match load(name, listed) {
                Err(p) => problems.push(p),
                Ok((shard, entries)) => {
                    let idx = shards.len();
                    for (tname, mut e) in entries {
                        e.shard = idx;
                        if let Some(prev) = tensors.insert(tname.clone(), e) {
                            problems.push(format!(
                                "{name}: tensor {tname} also appears in {}",
                                shard_names_of(&shards, prev.shard)
                            ));
                        }
                    }
                    shards.push(shard);
                }
            }
        }
        // The index must agree with the shard headers.
        let open_shards: Vec<&str> = shards.iter().map(|s| s.file_name.as_str()).collect();
        for (tname, file) in &weight_map {
            if !open_shards.contains(&file.as_str()) {
                continue; // the shard itself is already reported
            }
            match tensors.get(tname) {
                Some(e) if shards[e.shard].file_name == *file => {}
                Some(e) => problems.push(format!(
                    "{INDEX_FILE} puts tensor {tname} in {file}, but it is in {}",
                    shards[e.shard].file_name
                )),
                None => problems.push(format!(
                    "{file}: tensor {tname} is listed in {INDEX_FILE} but missing from the shard's header"
                )),
            }
        }

        let expected = inventory(&config);
        let mut known = std::collections::HashSet::with_capacity(expected.len());
        let failed_shards = !problems.is_empty() && shards.len() < shard_names.len();
        for spec in &expected {
            known.insert(spec.name.as_str());
            match tensors.get(&spec.name) {
                None => {
                    // A tensor that the index places in a shard we could not open is covered
                    // by that shard's error already.
                    let in_failed_shard = weight_map
                        .get(&spec.name)
                        .is_some_and(|f| !open_shards.contains(&f.as_str()));
                    let covered = in_failed_shard || (failed_shards && weight_map.is_empty());
                    if !covered {
                        problems.push(format!(
                            "tensor {} is missing (expected {} {:?})",
                            spec.name,
                            dtype_name(spec.dtype),
                            spec.shape
                        ));
                    }
                }
                Some(e) => {
                    let file = &shards[e.shard].file_name;
                    if e.dtype != spec.dtype {
                        problems.push(format!(
                            "{file}: tensor {} has dtype {}, expected {}",
                            spec.name,
                            dtype_name(e.dtype),
                            dtype_name(spec.dtype)
                        ));
                    } else if e.shape != spec.shape {
                        problems.push(format!(
                            "{file}: tensor {} has shape {:?}, expected {:?}",
                            spec.name, e.shape, spec.shape
                        ));
                    } else if e.end - e.start != spec.nbytes() {
                        problems.push(format!(
                            "{file}: tensor {} holds {} bytes, expected {}",
                            spec.name,
                            e.end - e.start,
                            spec.nbytes()
                        ));
                    }
                }
            }
        }
        if !problems.is_empty() {
            return Err(CheckpointError::Invalid {
                dir: dir_s,
                problems,
            });
        }
        let mut extra: Vec<String> = tensors
            .keys()
            .filter(|k| !known.contains(k.as_str()))
            .cloned()
            .collect();
        extra.sort();
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            shards,
            tensors,
            extra,
            expected,
        })
    }

    /// The bytes of a tensor (zero-copy). Names come from the inventory, which `open`
    /// validated, so a missing name is a programming error reported as such.
    pub fn bytes(&self, name: &str) -> Result<Bytes, CheckpointError> {
        let e = self.tensors.get(name).ok_or_else(|| CheckpointError::Dir {
            dir: self.dir.display().to_string(),
            msg: format!("tensor {name} is not in the checkpoint"),
        })?;
        let s = &self.shards[e.shard];
        Ok(Bytes {
            map: s.map.clone(),
            start: e.start,
            len: e.end - e.start,
            file: s.file.clone(),
        })
    }

    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }

    /// Sum of the payloads of every tensor in the files (extras included).
    pub fn payload_bytes(&self) -> u64 {
        self.tensors
            .values()
            .map(|e| (e.end - e.start) as u64)
            .sum()
    }
}

fn shard_names_of(shards: &[Shard], i: usize) -> String {
    shards
        .get(i)
        .map(|s| s.file_name.clone())
        .unwrap_or_else(|| "another shard".into())
}

/// A shard and its tensors, or one line naming the file.
type ShardResult = Result<(Shard, Vec<(String, TensorEntry)>), String>;

/// Map one shard and parse its header. Errors are one line naming the file.
fn map_shard(path: &Path, name: &str, listed: usize) -> ShardResult {
    let file: File = match crate::fsutil::open_regular(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "{name}: shard is missing ({listed} tensors are listed in it by {INDEX_FILE})"
            ));
        }
        Err(e) => return Err(format!("{name}: cannot open: {e}")),
    };
    let meta = file
        .metadata()
        .map_err(|e| format!("{name}: cannot stat: {e}"))?;
    let file_len = meta.len();
    if file_len < 8 {
        return Err(format!(
            "{name}: truncated: {file_len} bytes, smaller than a safetensors header"
        ));
    }
    let map = Mapped::map(&file, path).map_err(|e| format!("{name}: cannot mmap: {e}"))?;
    let (data_start, entries) = parse_shard_header(name, map.as_ref())?;
    Ok((
        Shard {
            path: path.to_path_buf(),
            file_name: name.to_string(),
            map: Arc::new(map),
            file: Some(Arc::new(ShardFile::new(file, path))),
            data_start,
            file_len,
        },
        entries,
    ))
}

/// Parse a whole shard's bytes (header + data) with the `safetensors` crate. Returns where
/// the data section starts and every tensor's absolute byte range; errors are one line
/// naming `name` and, where possible, the tensor.
pub fn parse_shard_header(
    name: &str,
    buf: &[u8],
) -> Result<(usize, Vec<(String, TensorEntry)>), String> {
    let (n, metadata) =
        SafeTensors::read_metadata(buf).map_err(|e| describe_header_error(name, buf, e))?;
    let data_start = 8 + n;
    let entries = metadata
        .tensors()
        .into_iter()
        .map(|(tname, info)| {
            (
                tname,
                TensorEntry {
                    shard: 0,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + info.data_offsets.0,
                    end: data_start + info.data_offsets.1,
                },
            )
        })
        .collect();
    Ok((data_start, entries))
}

/// Turn a `safetensors` header error into one line naming the file and, where the crate
/// does not, the tensor at fault.
fn describe_header_error(name: &str, buf: &[u8], e: SafeTensorError) -> String {
    let header_len = buf
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0);
    match e {
        SafeTensorError::HeaderTooSmall => format!(
            "{name}: truncated: {} bytes, smaller than a safetensors header",
            buf.len()
        ),
        SafeTensorError::InvalidHeaderLength | SafeTensorError::HeaderTooLarge => format!(
            "{name}: truncated or corrupt: header claims {header_len} bytes but the file has {}",
            buf.len()
        ),
        SafeTensorError::MetadataIncompleteBuffer => {
            let want = declared_end(buf).map(|end| end.saturating_add(8 + header_len as usize));
            match want {
                Some(w) if w > buf.len() => format!(
                    "{name}: truncated: header describes {w} bytes, the file has {} ({} missing)",
                    buf.len(),
                    w - buf.len()
                ),
                Some(w) => format!(
                    "{name}: header describes {w} bytes but the file has {} (trailing data or a header that lies)",
                    buf.len()
                ),
                None => format!("{name}: header does not cover the file's data section"),
            }
        }
        SafeTensorError::InvalidOffset(t) => format!(
            "{name}: tensor {t}: data_offsets overlap, leave a gap, or point past the data section"
        ),
        SafeTensorError::TensorInvalidInfo => {
            let who = mismatched_tensor(buf).unwrap_or_else(|| "a tensor".into());
            format!("{name}: {who}: byte range does not match its dtype and shape")
        }
        SafeTensorError::InvalidHeader(_) => format!("{name}: header is not valid UTF-8"),
        SafeTensorError::InvalidHeaderDeserialization(err) => {
            format!("{name}: header is not valid safetensors JSON: {err}")
        }
        other => format!("{name}: invalid safetensors header: {other}"),
    }
}

/// Parse the raw header JSON (only to diagnose an error the crate reported).
fn raw_header(buf: &[u8]) -> Option<serde_json::Map<String, serde_json::Value>> {
    let n = u64::from_le_bytes(buf.get(..8)?.try_into().ok()?) as usize;
    let text = std::str::from_utf8(buf.get(8..8usize.checked_add(n)?)?).ok()?;
    match serde_json::from_str(text).ok()? {
        serde_json::Value::Object(m) => Some(m),
        _ => None,
    }
}

fn declared_end(buf: &[u8]) -> Option<usize> {
    raw_header(buf)?
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .filter_map(|(_, v)| v.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .map(|v| v as usize)
}

fn mismatched_tensor(buf: &[u8]) -> Option<String> {
    let h = raw_header(buf)?;
    for (k, v) in &h {
        if k == "__metadata__" {
            continue;
        }
        let dtype: Dtype = serde_json::from_value(v.get("dtype")?.clone()).ok()?;
        let shape: Vec<usize> = serde_json::from_value(v.get("shape")?.clone()).ok()?;
        let off: (usize, usize) = serde_json::from_value(v.get("data_offsets")?.clone()).ok()?;
        let n = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .and_then(|e| e.checked_mul(dtype.bitsize()))
            .map(|b| b / 8);
        let Some(n) = n else {
            return Some(format!("tensor {k} (shape {shape:?} overflows)"));
        };
        if off.1.checked_sub(off.0) != Some(n) {
            return Some(format!(
                "tensor {k} ({dtype:?} {shape:?} needs {n} bytes, offsets give {})",
                off.1 as i128 - off.0 as i128
            ));
        }
    }
    None
}
