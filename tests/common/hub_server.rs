//! A small HTTP/1.1 server on loopback that serves the Hugging Face hub's URL layout
//! (`/{org}/{name}/resolve/{revision}/{file}`, HEAD and ranged GET), counts what it sends, and
//! can misbehave on purpose: drop a connection mid-file, serve corrupt bytes, answer with an
//! error status, or advertise a size it does not have.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

#[derive(Clone, Default)]
pub struct ServedFile {
    pub data: Vec<u8>,
    /// LFS files carry their sha256 as ETag (and X-Linked-* headers).
    pub lfs: bool,
    /// Answer every request for this file with this status.
    pub status: Option<u16>,
    /// Close the connection after this many body bytes, for the next `drop_times` GETs.
    pub drop_after: Option<u64>,
    pub drop_times: usize,
    /// Serve bytes that do not match the advertised sha256.
    pub corrupt: bool,
    /// Advertise this size instead of the real one.
    pub fake_size: Option<u64>,
    /// Send these header values instead of the real ones (a hostile mirror).
    pub etag_header: Option<String>,
    pub commit_header: Option<String>,
    /// Accept the connection, read the request, and never answer.
    pub stall: bool,
    /// Answer a GET's headers, then send no body and keep the connection open.
    pub stall_body: bool,
    /// Send the body in pieces of this many bytes with this many milliseconds between them.
    pub trickle: Option<(usize, u64)>,
}

#[derive(Default)]
pub struct State {
    pub repo: String,
    pub files: HashMap<String, ServedFile>,
    pub bytes_sent: HashMap<String, u64>,
    pub gets: HashMap<String, usize>,
    pub requests: usize,
}

pub struct HubServer {
    pub url: String,
    pub state: Arc<Mutex<State>>,
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

impl HubServer {
    pub fn start(repo: &str, files: HashMap<String, ServedFile>) -> HubServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State {
            repo: repo.to_string(),
            files,
            ..Default::default()
        }));
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = handle(conn, &st);
                });
            }
        });
        HubServer { url, state }
    }

    pub fn bytes_sent(&self, f: &str) -> u64 {
        *self.state.lock().unwrap().bytes_sent.get(f).unwrap_or(&0)
    }
    pub fn gets(&self, f: &str) -> usize {
        *self.state.lock().unwrap().gets.get(f).unwrap_or(&0)
    }
    pub fn requests(&self) -> usize {
        self.state.lock().unwrap().requests
    }
    pub fn with_file(&self, f: &str, edit: impl FnOnce(&mut ServedFile)) {
        edit(self.state.lock().unwrap().files.get_mut(f).unwrap());
    }
}

fn handle(mut s: TcpStream, st: &Arc<Mutex<State>>) -> std::io::Result<()> {
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut range_start = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("range: bytes=") {
            range_start = v.trim().trim_end_matches('-').parse::<u64>().ok();
        }
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut g = st.lock().unwrap();
    g.requests += 1;
    let prefix = format!("/{}/resolve/", g.repo);
    let Some(rest) = path.strip_prefix(&prefix) else {
        return write!(
            s,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
    };
    let (rev, file) = rest.split_once('/').unwrap_or((rest, ""));
    let Some(f) = g
        .files
        .get(file)
        .cloned()
        .filter(|_| rev == "main" || rev == COMMIT)
    else {
        return write!(
            s,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
    };
    if let Some(code) = f.status {
        return write!(
            s,
            "HTTP/1.1 {code} Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
    }
    if f.stall {
        drop(g);
        std::thread::sleep(std::time::Duration::from_secs(120));
        return Ok(());
    }
    let etag = if f.lfs {
        sha256_hex(&f.data)
    } else {
        sha256_hex(&f.data)[..40].to_string()
    };
    let etag = f.etag_header.clone().unwrap_or(etag);
    let commit = f.commit_header.clone().unwrap_or(COMMIT.to_string());
    let size = f.fake_size.unwrap_or(f.data.len() as u64);
    let mut head = format!(
        "X-Repo-Commit: {commit}\r\nETag: \"{etag}\"\r\nAccept-Ranges: bytes\r\nConnection: close\r\n"
    );
    if f.lfs {
        head.push_str(&format!(
            "X-Linked-Etag: \"{etag}\"\r\nX-Linked-Size: {size}\r\n"
        ));
    }
    if method == "HEAD" {
        return write!(s, "HTTP/1.1 200 OK\r\n{head}Content-Length: {size}\r\n\r\n");
    }
    *g.gets.entry(file.to_string()).or_default() += 1;
    let mut data = f.data.clone();
    if f.corrupt && !data.is_empty() {
        let mid = data.len() / 2;
        data[mid] ^= 0xFF;
    }
    let start = range_start.unwrap_or(0).min(data.len() as u64) as usize;
    let body = &data[start..];
    let status = if start > 0 {
        "206 Partial Content"
    } else {
        "200 OK"
    };
    let mut resp = format!(
        "HTTP/1.1 {status}\r\n{head}Content-Length: {}\r\n",
        body.len()
    );
    if start > 0 {
        resp.push_str(&format!(
            "Content-Range: bytes {start}-{}/{}\r\n",
            data.len() - 1,
            data.len()
        ));
    }
    resp.push_str("\r\n");
    let mut send = body.len();
    if let (Some(n), true) = (f.drop_after, f.drop_times > 0) {
        send = send.min(n as usize);
        g.files.get_mut(file).unwrap().drop_times -= 1;
    }
    *g.bytes_sent.entry(file.to_string()).or_default() += send as u64;
    drop(g);
    s.write_all(resp.as_bytes())?;
    if f.stall_body {
        s.flush()?;
        std::thread::sleep(std::time::Duration::from_secs(120));
        return Ok(());
    }
    match f.trickle {
        Some((piece, ms)) => {
            for part in body[..send].chunks(piece.max(1)) {
                s.write_all(part)?;
                s.flush()?;
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
        }
        None => s.write_all(&body[..send])?,
    }
    s.flush()?;
    let _ = s.shutdown(std::net::Shutdown::Both);
    Ok(())
}
