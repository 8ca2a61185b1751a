//! Fetching a checkpoint from the Hugging Face hub into the standard cache layout
//! (`models--org--name/{blobs,snapshots,refs}`), with resume, verification and a pre-flight
//! check of disk and memory.
//!
//! Why not hf-hub's own downloader: hf-hub 0.4's sync API cannot resume (it restarts a file
//! from byte 0, the behaviour users of `hf download` complained about) and gives no hook to
//! verify the LFS sha256 or to count what is left before starting. So the HTTP part is ours
//! (ureq, range requests), and the layout and environment conventions are the ecosystem's:
//! `HF_HOME` / `HF_HUB_CACHE`, `HF_ENDPOINT`, `HF_TOKEN` (or `$HF_HOME/token`),
//! `HF_HUB_OFFLINE=1`; partial files are `blobs/<etag>.incomplete` as huggingface_hub names
//! them, so either tool can finish what the other started.

use crate::fsutil::free_bytes;
use anyhow::{Context, bail};
use sha2::Digest;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Files the runner needs besides the shards (the first three are required).
pub const REQUIRED: [&str; 3] = [
    "config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
];
pub const OPTIONAL: [&str; 2] = ["generation_config.json", "tokenizer_config.json"];
/// Extras (`--extras`): the release's reference code and encoder.
pub const EXTRAS: [&str; 3] = [
    "inference/model.py",
    "inference/kernel.py",
    "encoding/encoding_dsv4.py",
];

/// Attempts per file before giving up (each resumes where the last stopped).
const ATTEMPTS: usize = 4;

/// Hub settings from the environment.
#[derive(Debug, Clone)]
pub struct Hub {
    pub endpoint: String,
    pub cache: PathBuf,
    pub token: Option<String>,
    pub offline: bool,
    /// Longest wait for a metadata answer (`HF_HUB_ETAG_TIMEOUT`, seconds; default 20).
    pub etag_timeout: Duration,
    /// Longest silence while downloading: for the answer to a GET and for each read of its
    /// body (`HF_HUB_DOWNLOAD_TIMEOUT`, seconds; default 30). A slow but steady transfer is
    /// never cut; a stalled one is resumed with a range request.
    pub download_timeout: Duration,
}

impl Hub {
    pub fn from_env() -> Hub {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "https://huggingface.co".into())
            .trim_end_matches('/')
            .to_string();
        let token = std::env::var("HF_TOKEN")
            .ok()
            .filter(|s| !s.is_empty())
            .or_else(|| {
                let home = std::env::var_os("HF_HOME").map(PathBuf::from).or_else(|| {
                    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface"))
                })?;
                std::fs::read_to_string(home.join("token"))
                    .ok()
                    .map(|t| t.trim().to_string())
            });
        let offline = std::env::var("HF_HUB_OFFLINE")
            .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"));
        let secs = |var: &str, default: u64| {
            let v = std::env::var(var)
                .ok()
                .and_then(|s| s.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s > 0.0)
                .unwrap_or(default as f64);
            Duration::from_secs_f64(v.min(86_400.0))
        };
        Hub {
            endpoint,
            cache: crate::hub::hub_cache_dir(),
            token,
            offline,
            etag_timeout: secs("HF_HUB_ETAG_TIMEOUT", 20),
            download_timeout: secs("HF_HUB_DOWNLOAD_TIMEOUT", 30),
        }
    }
}

/// A file on the hub at a revision.
#[derive(Debug, Clone)]
pub struct Remote {
    pub name: String,
    pub size: u64,
    /// Unquoted ETag: the sha256 for LFS files, the git blob sha1 otherwise.
    pub etag: String,
    pub commit: String,
}

impl Remote {
    fn sha256(&self) -> Option<&str> {
        (self.etag.len() == 64 && self.etag.bytes().all(|b| b.is_ascii_hexdigit()))
            .then_some(self.etag.as_str())
    }
}

/// Where files go: the hub cache (default) or a plain directory (`--dir`).
#[derive(Debug, Clone)]
pub enum Target {
    Cache { repo_dir: PathBuf },
    Dir(PathBuf),
}

impl Target {
    fn final_path(&self, r: &Remote) -> PathBuf {
        match self {
            Target::Cache { repo_dir } => repo_dir.join("blobs").join(&r.etag),
            Target::Dir(d) => d.join(&r.name),
        }
    }
    fn partial_path(&self, r: &Remote) -> PathBuf {
        let mut p = self.final_path(r).into_os_string();
        p.push(".incomplete");
        PathBuf::from(p)
    }
    /// The path a reader uses (snapshot link or the plain file).
    pub fn visible_path(&self, commit: &str, name: &str) -> PathBuf {
        match self {
            Target::Cache { repo_dir } => repo_dir.join("snapshots").join(commit).join(name),
            Target::Dir(d) => d.join(name),
        }
    }
    /// Make a completed blob visible under its name (atomically).
    fn publish(&self, r: &Remote) -> anyhow::Result<()> {
        if let Target::Cache { repo_dir } = self {
            let link = self.visible_path(&r.commit, &r.name);
            let parent = link.parent().unwrap_or(repo_dir);
            std::fs::create_dir_all(parent)?;
            // Relative link: ../../blobs/<etag>, with one more ../ per directory in the name.
            let depth = r.name.matches('/').count();
            let mut rel = PathBuf::new();
            for _ in 0..depth + 2 {
                rel.push("..");
            }
            rel.push("blobs");
            rel.push(&r.etag);
            let tmp = parent.join(format!(
                ".{}.link.tmp",
                r.name.rsplit('/').next().unwrap_or("f")
            ));
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink(&rel, &tmp)?;
            std::fs::rename(&tmp, &link)?;
        }
        Ok(())
    }
}

pub fn repo_dir(cache: &Path, repo: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--")))
}

/// Options of one download.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub repo: String,
    pub revision: String,
    pub dir: Option<PathBuf>,
    pub force: bool,
    pub extras: bool,
}

/// What happened.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub files: usize,
    pub bytes_fetched: u64,
    pub already_present: usize,
    pub commit: String,
    pub location: PathBuf,
}

struct Client {
    agent: ureq::Agent,
    head_agent: ureq::Agent,
    hub: Hub,
}

fn header(resp: &ureq::http::Response<ureq::Body>, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim_matches('"').to_string())
}

impl Client {
    fn new(hub: &Hub) -> Client {
        // No budget for a whole body (a 3.5 GB shard may take minutes): a limit on each wait
        // instead, so a stalled server is noticed and a slow one is not cut.
        let mk = |redirects: u32, wait: Duration| -> ureq::Agent {
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .max_redirects(redirects)
                .max_redirects_will_error(false)
                .timeout_connect(Some(wait.min(Duration::from_secs(20))))
                .timeout_send_request(Some(wait))
                .timeout_recv_response(Some(wait))
                .timeout_per_read(Some(wait))
                .user_agent(concat!("dsflash/", env!("CARGO_PKG_VERSION")))
                .build()
                .into()
        };
        Client {
            agent: mk(10, hub.download_timeout),
            head_agent: mk(0, hub.etag_timeout),
            hub: hub.clone(),
        }
    }

    fn url(&self, repo: &str, rev: &str, file: &str) -> String {
        format!("{}/{}/resolve/{}/{}", self.hub.endpoint, repo, rev, file)
    }

    fn status_error(&self, code: u16, repo: &str, rev: &str, file: &str) -> anyhow::Error {
        match code {
            401 | 403 => anyhow::anyhow!(
                "{repo}: {file}: access denied (HTTP {code}); set HF_TOKEN or log in with a token that can read this repo"
            ),
            404 => anyhow::anyhow!(
                "{repo}: {file} not found at revision {rev} (HTTP 404); check --model and --revision"
            ),
            c if c >= 500 => anyhow::anyhow!(
                "{repo}: {file}: the hub answered HTTP {c} (server error); try again later"
            ),
            c => anyhow::anyhow!("{repo}: {file}: unexpected HTTP {c}"),
        }
    }

    /// HEAD without following redirects: size, etag and commit (LFS files report theirs in
    /// X-Linked-* headers on the redirect). Ok(None) on 404 (for optional files).
    fn head(&self, repo: &str, rev: &str, file: &str) -> anyhow::Result<Option<Remote>> {
        let mut req = self
            .head_agent
            .head(self.url(repo, rev, file))
            .header("Accept-Encoding", "identity");
        if let Some(t) = &self.hub.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let resp = req
            .call()
            .with_context(|| format!("{repo}: cannot reach {}", self.hub.endpoint))?;
        let code = resp.status().as_u16();
        if code == 404 {
            return Ok(None);
        }
        if !(200..400).contains(&code) {
            return Err(self.status_error(code, repo, rev, file));
        }
        let etag = header(&resp, "x-linked-etag").or_else(|| header(&resp, "etag"));
        let size = header(&resp, "x-linked-size")
            .or_else(|| header(&resp, "content-length"))
            .and_then(|s| s.parse::<u64>().ok());
        let commit = header(&resp, "x-repo-commit");
        match (etag, size, commit) {
            (Some(etag), Some(size), Some(commit)) => {
                // Both become path components in the cache: only hashes are accepted.
                let etag = etag.trim_start_matches("W/").trim_matches('"').to_string();
                if !is_hex(&etag, &[40, 64]) {
                    bail!(
                        "{repo}: {file}: the hub's ETag {:?} is not a 40- or 64-digit hex hash; refusing to use it as a file name",
                        shorten(&etag)
                    );
                }
                if !is_hex(&commit, &[40]) {
                    bail!(
                        "{repo}: {file}: the hub's X-Repo-Commit {:?} is not a 40-digit hex commit; refusing to use it as a directory name",
                        shorten(&commit)
                    );
                }
                Ok(Some(Remote {
                    name: file.to_string(),
                    size,
                    etag,
                    commit,
                }))
            }
            _ => bail!(
                "{repo}: {file}: the hub's answer lacks ETag, size or X-Repo-Commit (is HF_ENDPOINT a hub?)"
            ),
        }
    }

    /// Fetch `r` into `target` as a complete, verified blob (size and sha256), resuming a
    /// partial file; the caller makes it visible under its name (`Target::publish`).
    /// Returns the bytes transferred.
    fn fetch(
        &self,
        repo: &str,
        r: &Remote,
        target: &Target,
        bars: &Bars,
        stop: &AtomicBool,
    ) -> anyhow::Result<u64> {
        let final_path = target.final_path(r);
        if std::fs::metadata(&final_path).is_ok_and(|m| m.len() == r.size) {
            return Ok(0); // a completed file is never fetched again
        }
        let partial = target.partial_path(r);
        if let Some(p) = partial.parent() {
            std::fs::create_dir_all(p).with_context(|| format!("cannot create {}", p.display()))?;
        }
        let mut fetched = 0u64;
        let mut last_err = None;
        bars.start_file(&r.name, r.size);
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(200 * (1 << attempt)));
            }
            match self.fetch_once(repo, r, &partial, bars, stop) {
                Ok(n) => {
                    fetched += n;
                    last_err = None;
                    break;
                }
                Err(FetchError::Fatal(e)) => return Err(e),
                Err(FetchError::Retry(n, e)) => {
                    fetched += n;
                    last_err = Some(e);
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
            }
        }
        if let Some(e) = last_err {
            bail!(
                "{}: download interrupted after {} of {} bytes ({e}); run the same command again to resume",
                r.name,
                std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0),
                r.size
            );
        }
        // Verify, then make it visible under its final name.
        let len = std::fs::metadata(&partial)?.len();
        if len != r.size {
            let _ = std::fs::remove_file(&partial);
            bail!(
                "{}: got {len} bytes, the hub says {}: deleted the partial file; run again to re-fetch",
                r.name,
                r.size
            );
        }
        if let Some(want) = r.sha256() {
            let got = sha256_file(&partial)?;
            if got != want {
                let _ = std::fs::remove_file(&partial);
                bail!(
                    "{}: sha256 mismatch (expected {want}, got {got}): deleted the partial file; run again to re-fetch",
                    r.name
                );
            }
        }
        std::fs::rename(&partial, &final_path)?;
        Ok(fetched)
    }

    fn fetch_once(
        &self,
        repo: &str,
        r: &Remote,
        partial: &Path,
        bars: &Bars,
        stop: &AtomicBool,
    ) -> Result<u64, FetchError> {
        let fatal = |e: anyhow::Error| FetchError::Fatal(e);
        // Never through a link planted under the partial file's (predictable) name.
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(partial)
            .map_err(|e| fatal(anyhow::anyhow!("{}: cannot write: {e}", partial.display())))?;
        let mut have = match f.metadata() {
            Ok(m) if m.is_file() => m.len(),
            _ => {
                return Err(fatal(anyhow::anyhow!(
                    "{}: is not a regular file; remove it and run again",
                    partial.display()
                )));
            }
        };
        if have > r.size {
            f.set_len(0).map_err(|e| fatal(e.into()))?;
            have = 0;
        }
        bars.set_file_pos(have);
        if have == r.size {
            return Ok(0);
        }
        let mut req = self
            .agent
            .get(self.url(repo, &r.commit, &r.name))
            .header("Accept-Encoding", "identity");
        if have > 0 {
            req = req.header("Range", format!("bytes={have}-"));
        }
        if let Some(t) = &self.hub.token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let resp = req
            .call()
            .map_err(|e| FetchError::Retry(0, anyhow::anyhow!("{e}")))?;
        let code = resp.status().as_u16();
        match code {
            206 => {}
            200 if have > 0 => {
                // The server ignored the range: start this file over.
                f.set_len(0).map_err(|e| fatal(e.into()))?;
                have = 0;
                bars.set_file_pos(0);
            }
            200 => {}
            c if c >= 500 || c == 429 => {
                return Err(FetchError::Retry(
                    0,
                    self.status_error(c, repo, &r.commit, &r.name),
                ));
            }
            c => return Err(fatal(self.status_error(c, repo, &r.commit, &r.name))),
        }
        let mut body = resp.into_body().into_reader();
        let mut buf = vec![0u8; 1 << 20];
        let mut n_total = 0u64;
        loop {
            if stop.load(Ordering::Relaxed) {
                return Err(FetchError::Retry(n_total, anyhow::anyhow!("interrupted")));
            }
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    return Err(FetchError::Retry(
                        n_total,
                        anyhow::anyhow!("connection dropped: {e}"),
                    ));
                }
            };
            let room = r.size.saturating_sub(have + n_total) as usize;
            let n = n.min(room);
            f.write_all(&buf[..n])
                .map_err(|e| fatal(anyhow::anyhow!("{}: write failed: {e}", partial.display())))?;
            n_total += n as u64;
            bars.advance(n as u64);
            if room == n {
                break;
            }
        }
        f.flush().map_err(|e| fatal(e.into()))?;
        if have + n_total < r.size {
            return Err(FetchError::Retry(
                n_total,
                anyhow::anyhow!("connection closed early"),
            ));
        }
        Ok(n_total)
    }
}

/// `s` is all hex digits and one of the lengths in `lens`.
fn is_hex(s: &str, lens: &[usize]) -> bool {
    lens.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A server-provided value cut for an error message.
fn shorten(s: &str) -> String {
    s.chars().take(80).collect()
}

/// A revision (`--revision`, also a file name under `refs/`): a branch, tag or commit as git
/// allows them, never a path that leaves the cache.
fn check_revision(rev: &str) -> anyhow::Result<()> {
    let ok = !rev.is_empty()
        && rev.len() <= 255
        && !rev.starts_with('/')
        && !rev.ends_with('/')
        && rev
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.starts_with('.'))
        && rev
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./+".contains(c));
    if !ok {
        bail!(
            "--revision {:?}: not a branch, tag or commit name (letters, digits, - _ . + and / between parts)",
            shorten(rev)
        );
    }
    Ok(())
}

enum FetchError {
    /// Transient (network, 5xx): retry with a range request. Carries the bytes received.
    Retry(u64, anyhow::Error),
    Fatal(anyhow::Error),
}

fn sha256_file(p: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(p)?;
    f.rewind()?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Progress: one overall bar (bytes, rate, ETA) and the current file. Hidden when stderr is
/// not a terminal.
pub struct Bars {
    _multi: indicatif::MultiProgress,
    total: indicatif::ProgressBar,
    file: indicatif::ProgressBar,
}

impl Bars {
    fn new(total_bytes: u64, already: u64) -> Bars {
        Self::with_target(
            total_bytes,
            already,
            indicatif::ProgressDrawTarget::stderr(),
        )
    }
    /// For the small metadata files fetched before the totals are known.
    fn hidden() -> Bars {
        Self::with_target(0, 0, indicatif::ProgressDrawTarget::hidden())
    }
    fn with_target(total_bytes: u64, already: u64, target: indicatif::ProgressDrawTarget) -> Bars {
        let multi = indicatif::MultiProgress::with_draw_target(target);
        let style = |t: &str| {
            indicatif::ProgressStyle::with_template(t)
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        };
        let total = multi.add(indicatif::ProgressBar::new(total_bytes));
        total.set_style(style(
            "total {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
        ));
        total.set_position(already);
        let file = multi.add(indicatif::ProgressBar::new(0));
        file.set_style(style("  {msg:40} {bar:20} {bytes}/{total_bytes}"));
        Bars {
            _multi: multi,
            total,
            file,
        }
    }
    fn start_file(&self, name: &str, size: u64) {
        self.file.set_message(name.to_string());
        self.file.set_length(size);
        self.file.set_position(0);
    }
    fn set_file_pos(&self, pos: u64) {
        let before = self.file.position();
        self.file.set_position(pos);
        if pos > before {
            self.total.inc(pos - before);
        }
    }
    fn advance(&self, n: u64) {
        self.file.inc(n);
        self.total.inc(n);
    }
    fn finish(&self) {
        self.file.finish_and_clear();
        self.total.finish_and_clear();
    }
}

/// Physical memory (MemTotal), bytes.
pub fn total_ram() -> Option<u64> {
    meminfo("MemTotal:")
}

/// Memory available to a new program without swapping (MemAvailable: free plus
/// reclaimable page cache), bytes.
pub fn available_ram() -> Option<u64> {
    meminfo("MemAvailable:")
}

fn meminfo(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = s
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Memory of the NVIDIA GPUs, bytes (0 without `nvidia-smi`). Asked through the driver's
/// own tool so that no CUDA library is needed at build or run time.
pub fn total_vram() -> u64 {
    std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=memory.total", "--format=csv,noheader,nounits"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| parse_nvidia_smi_mib(&String::from_utf8_lossy(&o.stdout)))
        .unwrap_or(0)
}

/// One MiB figure per GPU, one per line -> total bytes.
pub fn parse_nvidia_smi_mib(s: &str) -> u64 {
    s.lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .sum::<u64>()
        << 20
}

fn gb(b: u64) -> String {
    format!("{:.1} GB", b as f64 / 1e9)
}

/// Offline: succeed only if every needed file is already in the cache (no request is made).
fn offline(hub: &Hub, o: &Options) -> anyhow::Result<Report> {
    let rd = repo_dir(&hub.cache, &o.repo);
    let commit = if is_hex(&o.revision, &[40]) {
        o.revision.clone()
    } else {
        std::fs::read_to_string(rd.join("refs").join(&o.revision))
            .map(|s| s.trim().to_string())
            .map_err(|_| {
                anyhow::anyhow!(
                    "HF_HUB_OFFLINE=1 and {} (revision {}) is not in the cache at {}",
                    o.repo,
                    o.revision,
                    hub.cache.display()
                )
            })?
    };
    if !is_hex(&commit, &[40]) {
        bail!(
            "{}: does not hold a 40-digit hex commit (found {:?})",
            rd.join("refs").join(&o.revision).display(),
            shorten(&commit)
        );
    }
    let snap = rd.join("snapshots").join(&commit);
    let index = snap.join("model.safetensors.index.json");
    let mut need: Vec<String> = REQUIRED.iter().map(|s| s.to_string()).collect();
    if let Ok(b) = std::fs::read(&index) {
        need.extend(shards_of(&b)?);
    }
    for f in &need {
        if !snap.join(f).exists() {
            bail!(
                "HF_HUB_OFFLINE=1 and {f} of {} is not in the cache at {}",
                o.repo,
                snap.display()
            );
        }
    }
    Ok(Report {
        files: need.len(),
        already_present: need.len(),
        commit,
        location: snap,
        ..Default::default()
    })
}

fn shards_of(index_json: &[u8]) -> anyhow::Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Idx {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let idx: Idx = serde_json::from_slice(index_json)
        .context("model.safetensors.index.json is not a valid index")?;
    let mut v: Vec<String> = idx.weight_map.into_values().collect();
    v.sort();
    v.dedup();
    for s in &v {
        if s.contains("..") || s.starts_with('/') {
            bail!("model.safetensors.index.json names a shard outside the repo: {s}");
        }
    }
    Ok(v)
}

/// Download (or complete) a checkpoint. `stop` interrupts cleanly (partials are kept).
pub fn download(hub: &Hub, o: &Options, stop: &AtomicBool) -> anyhow::Result<Report> {
    check_revision(&o.revision)?;
    if hub.offline {
        return offline(hub, o);
    }
    let client = Client::new(hub);
    let target = match &o.dir {
        Some(d) => Target::Dir(d.clone()),
        None => Target::Cache {
            repo_dir: repo_dir(&hub.cache, &o.repo),
        },
    };
    // Metadata first: the small files tell the commit and, through the index, the shards.
    let mut remotes = Vec::new();
    for f in REQUIRED {
        match client.head(&o.repo, &o.revision, f)? {
            Some(r) => remotes.push(r),
            None => return Err(client.status_error(404, &o.repo, &o.revision, f)),
        }
    }
    let commit = remotes[0].commit.clone();
    let optional: Vec<&str> = OPTIONAL
        .iter()
        .chain(if o.extras { EXTRAS.iter() } else { [].iter() })
        .copied()
        .collect();
    for f in optional {
        if let Some(r) = client.head(&o.repo, &commit, f)? {
            remotes.push(r);
        }
    }
    // The index is small: fetch it now to learn the shards.
    let bars0 = Bars::hidden();
    client.fetch(&o.repo, &remotes[1], &target, &bars0, stop)?;
    bars0.finish();
    let index_bytes = std::fs::read(target.final_path(&remotes[1]))?;
    for s in shards_of(&index_bytes)? {
        match client.head(&o.repo, &commit, &s)? {
            Some(r) => remotes.push(r),
            None => return Err(client.status_error(404, &o.repo, &commit, &s)),
        }
    }
    // Pre-flight: what is left to fetch vs free disk; the weights vs RAM.
    let mut left = 0u64;
    let mut have = 0u64;
    for r in &remotes {
        let done = std::fs::metadata(target.final_path(r))
            .map(|m| m.len())
            .unwrap_or(0);
        let part = std::fs::metadata(target.partial_path(r))
            .map(|m| m.len())
            .unwrap_or(0);
        let got = if done == r.size {
            r.size
        } else {
            part.min(r.size)
        };
        have += got;
        left += r.size - got;
    }
    let total: u64 = remotes.iter().map(|r| r.size).sum();
    let dir_for_space = match &target {
        Target::Cache { repo_dir } => repo_dir.clone(),
        Target::Dir(d) => d.clone(),
    };
    if let Some(free) = free_bytes(&dir_for_space)
        && left > free
        && !o.force
    {
        bail!(
            "not enough disk space in {}: {} still to fetch, {} free (free some space or use --force)",
            dir_for_space.display(),
            gb(left),
            gb(free)
        );
    }
    let weights: u64 = remotes
        .iter()
        .filter(|r| r.name.ends_with(".safetensors"))
        .map(|r| r.size)
        .sum();
    if let Some(ram) = total_ram() {
        let vram = total_vram();
        if weights > ram + vram && !o.force {
            bail!(
                "{} of weights exceed this machine's {} of RAM + {} of GPU memory: every token would read experts from disk. Use --force to download anyway",
                gb(weights),
                gb(ram),
                gb(vram)
            );
        }
    }
    let bars = Bars::new(total, have);
    let mut fetched = 0;
    let mut present = 0;
    for r in &remotes {
        if stop.load(Ordering::Relaxed) {
            bars.finish();
            bail!(
                "interrupted: {} of {} bytes on disk; run the same command again to resume",
                have + fetched,
                total
            );
        }
        let n = client.fetch(&o.repo, r, &target, &bars, stop)?;
        if n == 0 {
            present += 1;
        }
        // Visible under its name only now; also links a file completed in an earlier run
        // whose link is missing (e.g. after a crash).
        target.publish(r)?;
        fetched += n;
    }
    bars.finish();
    if let Target::Cache { repo_dir } = &target {
        let refs = repo_dir.join("refs");
        std::fs::create_dir_all(&refs)?;
        if o.revision != commit {
            let r = refs.join(&o.revision);
            if let Some(p) = r.parent() {
                std::fs::create_dir_all(p)?;
            }
            crate::fsutil::write_atomic(&r, commit.as_bytes())?;
        }
    }
    Ok(Report {
        files: remotes.len(),
        bytes_fetched: fetched,
        already_present: present,
        location: target.visible_path(&commit, ""),
        commit,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn nvidia_smi_memory_lines() {
        assert_eq!(
            super::parse_nvidia_smi_mib("24576\n81559\n"),
            (24576 + 81559) << 20
        );
        assert_eq!(super::parse_nvidia_smi_mib("No devices were found\n"), 0);
    }
}
