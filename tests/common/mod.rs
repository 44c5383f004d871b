//! Test harness for ringgate's integration tests: a gateway process on real sockets, in-process
//! HTTP/1.1 origins that record what they receive, and a raw client that sends exact bytes.
//!
//! Config placeholders filled by [`Gateway::start`]: `@LISTEN@` (the proxy listener), `@ADMIN@`
//! (the admin listener) and `@DIR@` (the gateway's temp dir). A config without a `[server]`
//! table gets [`HEADER`] prepended (2 workers, io auto, admin listener, short shutdown).

#![allow(dead_code)]

pub mod ws;

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

/// A port that was free a moment ago (bind it, read it, drop the listener), and not handed
/// out before in this process: two calls in a row can get the same port back from the
/// kernel, and a gateway given it for two listeners refuses its config.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..100 {
        let p = local_listener().local_addr().unwrap().port();
        if !given.contains(&p) {
            given.push(p);
            return p;
        }
    }
    panic!("no port that was not handed out already");
}

/// Two different ports that were free a moment ago (see [`free_port`]).
pub fn free_port_pair() -> (u16, u16) {
    (free_port(), free_port())
}

/// A listener on 127.0.0.1: any free port, or with `RINGGATE_TEST_PORTS=LOW-HIGH` set, a free
/// port of that range (for machines where each job gets its own ports), searched from a
/// per-process offset. Ports are not reserved across test processes: with a small range, run
/// one test at a time (`cargo nextest run -j 1`, `cargo test -- --test-threads 1`).
pub fn local_listener() -> TcpListener {
    let Ok(range) = std::env::var("RINGGATE_TEST_PORTS") else {
        return TcpListener::bind("127.0.0.1:0").unwrap();
    };
    let parsed = range.split_once('-').and_then(|(lo, hi)| {
        let (lo, hi) = (
            lo.trim().parse::<u16>().ok()?,
            hi.trim().parse::<u16>().ok()?,
        );
        (lo > 0 && lo <= hi).then_some((lo, hi))
    });
    let Some((lo, hi)) = parsed else {
        panic!("RINGGATE_TEST_PORTS={range:?}: expected LOW-HIGH, e.g. 21100-21199");
    };
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let span = usize::from(hi - lo) + 1;
    let base = std::process::id() as usize * 7;
    for _ in 0..span {
        let i = (base + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        if let Ok(l) = TcpListener::bind(("127.0.0.1", lo + i as u16)) {
            return l;
        }
    }
    panic!("RINGGATE_TEST_PORTS={range}: no free port left in the range");
}

/// An address nothing listens on: a port below the kernel's ephemeral range (1024 up to its
/// start), free when handed out. A port inside the range is not reliably dead: a connect to it
/// can be given that same port as its own source port and connect to itself (TCP simultaneous
/// open), which under load made the gateway read its own request as the answer.
pub fn dead_addr() -> SocketAddr {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let lo = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if std::env::var("RINGGATE_TEST_PORTS").is_err() && lo > 2048 {
        let span = usize::from(lo - 1024);
        let base = std::process::id() as usize * 131;
        for _ in 0..span {
            let p = 1024 + ((base + NEXT.fetch_add(1, Ordering::Relaxed)) % span) as u16;
            if TcpListener::bind(("127.0.0.1", p)).is_ok() {
                return SocketAddr::from(([127, 0, 0, 1], p));
            }
        }
    }
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A fresh, empty temp directory.
pub fn temp_dir(tag: &str) -> PathBuf {
    static SEQ: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let d = std::env::temp_dir().join(format!(
        "ringgate-it-{tag}-{}-{}-{nanos}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// An origin on 127.0.0.1 that hands each accepted connection to `serve` on a thread of its
/// own (for origins that must misbehave at the byte level). Returns its address.
pub fn raw_origin(serve: impl Fn(TcpStream) + Send + Sync + 'static) -> SocketAddr {
    let l = local_listener();
    let addr = l.local_addr().unwrap();
    let serve = Arc::new(serve);
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            let serve = serve.clone();
            std::thread::spawn(move || serve(s));
        }
    });
    addr
}

/// Closes `s` with an RST instead of a FIN (SO_LINGER 0), as a client that resets.
pub fn reset_close(s: TcpStream) {
    let lg = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `lg` is a valid `linger` of the size passed, for the duration of the call, on
    // the open socket `s`.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&lg as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    drop(s);
}

/// Polls `f` every 20 ms until it is true or `timeout` passes; returns the last result.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Resident set size of a process in KiB (VmRSS from /proc/PID/status).
pub fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// The gateway process
// ---------------------------------------------------------------------------------------------

/// Server and admin tables used when a test's config has no `[server]` table.
pub const HEADER: &str = r#"
[server]
listen = ["@LISTEN@"]
workers = 2
io = "auto"
shutdown_timeout_ms = 3000
state_dir = "@DIR@/state"

[admin]
listen = "@ADMIN@"
"#;

/// A running `ringgate` process. Dropping it kills the process.
pub struct Gateway {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub pid: u32,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    stderr_path: PathBuf,
    exit: Option<ExitStatus>,
}

fn fill(toml: &str, addr: SocketAddr, admin: SocketAddr, dir: &Path) -> String {
    let body = if toml.contains("[server]") {
        toml.to_string()
    } else {
        format!("{HEADER}\n{toml}")
    };
    let body = body
        .replace("@LISTEN@", &addr.to_string())
        .replace("@ADMIN@", &admin.to_string())
        .replace("@DIR@", &dir.display().to_string());
    // `RINGGATE_TEST_IO=epoll` runs every test that uses `io = "auto"` on that driver.
    match std::env::var("RINGGATE_TEST_IO") {
        Ok(io) if !io.is_empty() => body.replace("io = \"auto\"", &format!("io = \"{io}\"")),
        _ => body,
    }
}

impl Gateway {
    /// Starts ringgate on `toml` and waits until admin `/healthz` answers 200.
    pub fn start(toml: &str) -> Gateway {
        match Gateway::try_start(toml) {
            Ok(g) => g,
            Err(e) => panic!("{e}"),
        }
    }

    /// Like [`Gateway::start`], but returns the failure (with the captured stderr).
    pub fn try_start(toml: &str) -> Result<Gateway, String> {
        Gateway::try_start_in(toml, None)
    }

    /// Like [`Gateway::try_start`], run from the working directory `cwd` (default: the
    /// gateway's temp dir, which holds the config file).
    pub fn try_start_in(toml: &str, cwd: Option<&Path>) -> Result<Gateway, String> {
        // A just-freed port can be taken by another test between our probe and the bind:
        // try a few times with new ports.
        let mut last = String::new();
        for _ in 0..3 {
            let (p, ap) = free_port_pair();
            let addr = SocketAddr::from(([127, 0, 0, 1], p));
            let admin_addr = SocketAddr::from(([127, 0, 0, 1], ap));
            let dir = temp_dir("gw");
            let config_path = dir.join("ringgate.toml");
            std::fs::write(&config_path, fill(toml, addr, admin_addr, &dir)).unwrap();
            let stderr_path = dir.join("stderr.log");
            let stderr = std::fs::File::create(&stderr_path).unwrap();
            let stdout = std::fs::File::create(dir.join("stdout.log")).unwrap();
            let child = Command::new(env!("CARGO_BIN_EXE_ringgate"))
                .arg("--config")
                .arg(&config_path)
                .current_dir(cwd.unwrap_or(&dir))
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(stderr)
                .spawn()
                .expect("spawn ringgate");
            let pid = child.id();
            let mut g = Gateway {
                child: Some(child),
                addr,
                admin_addr,
                pid,
                dir,
                config_path,
                stderr_path,
                exit: None,
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(st) = g.try_wait() {
                    last = format!(
                        "ringgate exited with {st} before it was ready; stderr:\n{}",
                        g.stderr()
                    );
                    break;
                }
                if let Ok(r) = admin_get(admin_addr, "/healthz", None) {
                    if r.status == 200 {
                        return Ok(g);
                    }
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "ringgate not ready after 10 s; stderr:\n{}",
                        g.stderr()
                    ));
                }
                thread::sleep(Duration::from_millis(25));
            }
            if !last.contains("ddress already in use") {
                return Err(last);
            }
        }
        Err(last)
    }

    /// What the gateway wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Replaces the config file (same placeholders as [`Gateway::start`], same ports), atomically.
    pub fn write_config(&self, toml: &str) {
        let tmp = self.dir.join("ringgate.toml.tmp");
        std::fs::write(&tmp, fill(toml, self.addr, self.admin_addr, &self.dir)).unwrap();
        std::fs::rename(&tmp, &self.config_path).unwrap();
    }

    /// Sends signal `sig` (a name as `kill` takes it: `HUP`, `USR1`, ...).
    pub fn kill_sig(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid.to_string())
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -{sig} {} failed", self.pid);
    }

    /// Sends SIGHUP (reload).
    pub fn reload_signal(&self) {
        self.kill_sig("HUP");
    }

    /// Sends SIGTERM (graceful stop).
    pub fn terminate(&self) {
        self.kill_sig("TERM");
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.exit = Some(st);
                }
            }
        }
        self.exit
    }

    /// Whether the process is still running.
    pub fn is_alive(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if Instant::now() >= end {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Admin GET without a token.
    pub fn admin_get(&self, path: &str) -> RawResponse {
        admin_get(self.admin_addr, path, None).expect("admin request")
    }

    /// The admin `/metrics` text (no token).
    pub fn metrics(&self) -> String {
        let r = self.admin_get("/metrics");
        assert_eq!(r.status, 200, "{}", r.text());
        r.text()
    }

    /// Sends `raw` on a new connection and reads one response.
    pub fn request(&self, raw: &str) -> RawResponse {
        let mut c = Client::connect(self.addr);
        c.send(raw.as_bytes());
        c.read_response()
            .unwrap_or_else(|e| panic!("no response to {raw:?}: {e}\nstderr:\n{}", self.stderr()))
    }

    /// `GET path` with `Host: test` on a new connection.
    pub fn get(&self, path: &str) -> RawResponse {
        self.request(&format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n"))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if self.exit.is_none() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        if !thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!(
                "gateway dir kept: {}\n--- gateway stderr ---\n{}",
                self.dir.display(),
                std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
            );
        }
    }
}

/// Runs `ringgate --check --config FILE` on `toml` (placeholders filled with unused ports).
/// Returns the output and the config path (errors name it; the file is gone by then).
pub fn check(toml: &str) -> (Output, PathBuf) {
    let dir = temp_dir("check");
    let path = dir.join("check.toml");
    let ports = free_port_pair();
    let text = fill(
        toml,
        SocketAddr::from(([127, 0, 0, 1], ports.0)),
        SocketAddr::from(([127, 0, 0, 1], ports.1)),
        &dir,
    );
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ringgate"))
        .arg("--check")
        .arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .expect("run ringgate --check");
    let _ = std::fs::remove_dir_all(&dir);
    (out, path)
}

/// One admin GET on a new connection (with an optional `Authorization` value).
pub fn admin_get(addr: SocketAddr, path: &str, auth: Option<&str>) -> io::Result<RawResponse> {
    admin_request(addr, "GET", path, auth)
}

/// Admin `POST /reload` (must answer 200): the notes on settings that need a restart.
pub fn reload_notes(gw: &Gateway) -> Vec<String> {
    let r = admin_request(gw.admin_addr, "POST", "/reload", None).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["notes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect()
}

/// One admin request on a new connection.
pub fn admin_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    auth: Option<&str>,
) -> io::Result<RawResponse> {
    let mut c = Client::try_connect(addr)?;
    let auth = auth
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    let body_hdr = if method == "POST" {
        "Content-Length: 0\r\n"
    } else {
        ""
    };
    c.send(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: admin\r\n{auth}{body_hdr}Connection: close\r\n\r\n"
        )
        .as_bytes(),
    );
    c.read_response()
}

// ---------------------------------------------------------------------------------------------
// Buffered reading shared by the origin and the client
// ---------------------------------------------------------------------------------------------

/// A socket with a read buffer; optionally copies every byte read into `record`.
pub struct Reader {
    pub stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    record: Option<(Arc<Mutex<Vec<u8>>>, usize)>,
}

impl Reader {
    fn new(stream: TcpStream) -> Reader {
        Reader {
            stream,
            buf: Vec::new(),
            pos: 0,
            record: None,
        }
    }

    /// Reads more bytes into the buffer; Ok(0) at end of stream.
    fn fill(&mut self) -> io::Result<usize> {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        let mut tmp = [0u8; 65536];
        let n = self.stream.read(&mut tmp)?;
        if let Some((rec, limit)) = &self.record {
            let mut r = rec.lock().unwrap();
            let room = limit.saturating_sub(r.len());
            r.extend_from_slice(&tmp[..n.min(room)]);
        }
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    fn available(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Reads until the buffer holds a blank line; returns the head (with the blank line), or
    /// None when the stream ended before any byte of a head.
    fn read_head(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            let avail = self.available();
            if let Some(i) = find(avail, b"\r\n\r\n") {
                let head = avail[..i + 4].to_vec();
                self.pos += i + 4;
                return Ok(Some(head));
            }
            if self.fill()? == 0 {
                return if self.available().is_empty() {
                    Ok(None)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "stream ended inside a head: {:?}",
                            String::from_utf8_lossy(self.available())
                        ),
                    ))
                };
            }
        }
    }

    fn read_line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            let avail = self.available();
            if let Some(i) = find(avail, b"\r\n") {
                let line = avail[..i].to_vec();
                self.pos += i + 2;
                return Ok(line);
            }
            if self.fill()? == 0 {
                return Err(eof("inside a line"));
            }
        }
    }

    /// Reads exactly `n` bytes, handing them to `sink` piece by piece.
    fn read_n(&mut self, mut n: u64, sink: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        while n > 0 {
            if self.available().is_empty() && self.fill()? == 0 {
                return Err(eof("inside a body"));
            }
            let avail = self.available();
            let k = (avail.len() as u64).min(n) as usize;
            sink(&avail[..k]);
            self.pos += k;
            n -= k as u64;
        }
        Ok(())
    }

    /// Decodes a chunked body (trailers skipped) into `sink`.
    fn read_chunked(&mut self, sink: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        loop {
            let line = self.read_line()?;
            let size_txt = String::from_utf8_lossy(&line);
            let size_txt = size_txt.split(';').next().unwrap_or("").trim();
            let size = u64::from_str_radix(size_txt, 16).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad chunk size line {:?}", String::from_utf8_lossy(&line)),
                )
            })?;
            if size == 0 {
                // Trailers up to the blank line.
                loop {
                    if self.read_line()?.is_empty() {
                        return Ok(());
                    }
                }
            }
            self.read_n(size, sink)?;
            if !self.read_line()?.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "chunk not followed by CRLF",
                ));
            }
        }
    }

    /// Reads to the end of the stream into `sink`.
    fn read_to_close(&mut self, sink: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        loop {
            let avail = self.available();
            if !avail.is_empty() {
                sink(avail);
                self.pos = self.buf.len();
            }
            match self.fill() {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

fn eof(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, format!("stream ended {what}"))
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// For raw test origins: reads from `s` until `buf` holds a whole head, and returns it (bytes
/// after it stay in `buf`). `None` when the peer went away first.
pub fn read_head(s: &mut impl Read, buf: &mut Vec<u8>) -> Option<String> {
    let mut tmp = [0u8; 65536];
    let end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut tmp) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    buf.drain(..end);
    Some(head)
}

/// Splits a head into its first line and `(name, value)` pairs (values trimmed).
fn parse_head(head: &[u8]) -> (String, Vec<(String, String)>) {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split("\r\n");
    let first = lines.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    for l in lines {
        if l.is_empty() {
            continue;
        }
        match l.split_once(':') {
            Some((n, v)) => headers.push((n.to_string(), v.trim().to_string())),
            None => headers.push((l.to_string(), String::new())),
        }
    }
    (first, headers)
}

fn header_in<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn headers_named<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

fn is_chunked(headers: &[(String, String)]) -> bool {
    header_in(headers, "transfer-encoding")
        .map(|v| v.to_ascii_lowercase().contains("chunked"))
        .unwrap_or(false)
}

// ---------------------------------------------------------------------------------------------
// Origins
// ---------------------------------------------------------------------------------------------

/// A request as the origin received it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// The request-target as sent (path and query).
    pub path: String,
    pub version: String,
    pub headers: Vec<(String, String)>,
    /// The decoded body (empty when the origin does not keep bodies).
    pub body: Vec<u8>,
    /// Decoded body length (counted even when the body is not kept).
    pub body_len: u64,
    pub chunked: bool,
    /// Which connection of this origin (0, 1, ...) carried it.
    pub conn: usize,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        header_in(&self.headers, name)
    }
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        headers_named(&self.headers, name)
    }
    /// Path without the query string.
    pub fn path_only(&self) -> &str {
        self.path.split('?').next().unwrap_or("")
    }
}

/// What the origin does instead of (or on top of) answering normally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send the response, keep the connection.
    Answer,
    /// Send the response without Content-Length, then close (body delimited by close).
    AnswerUntilClose,
    /// Close the connection without answering.
    Close,
    /// Reset the connection (SO_LINGER 0) without answering.
    Reset,
    /// Write the body bytes as they are (no status line or headers added), keep the connection.
    Raw,
}

/// What the origin answers.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Send the body chunked, in pieces of this many bytes.
    pub chunked: Option<usize>,
    pub delay: Duration,
    pub action: Action,
    /// Do not add a Content-Length (e.g. for 204/304 tests that set their own).
    pub no_length: bool,
    /// Close silently after answering.
    pub close_after: bool,
    /// Reset (not close) after answering raw bytes.
    pub reset_after: bool,
}

impl Response {
    pub fn new(status: u16) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            chunked: None,
            delay: Duration::ZERO,
            action: Action::Answer,
            no_length: false,
            close_after: false,
            reset_after: false,
        }
    }
    pub fn ok(body: impl Into<Vec<u8>>) -> Response {
        Response::new(200).body(body)
    }
    pub fn header(mut self, n: &str, v: &str) -> Response {
        self.headers.push((n.to_string(), v.to_string()));
        self
    }
    pub fn body(mut self, b: impl Into<Vec<u8>>) -> Response {
        self.body = b.into();
        self
    }
    pub fn chunked(mut self, piece: usize) -> Response {
        self.chunked = Some(piece.max(1));
        self
    }
    pub fn delay(mut self, d: Duration) -> Response {
        self.delay = d;
        self
    }
    pub fn until_close(mut self) -> Response {
        self.action = Action::AnswerUntilClose;
        self
    }
    /// After answering (normally or raw), close the connection silently, without a
    /// `Connection: close`, as an origin whose keep-alive timer fires right after answering.
    pub fn then_close(mut self) -> Response {
        self.close_after = true;
        self
    }
    /// After answering raw bytes, reset the connection (SO_LINGER 0) instead of closing it.
    pub fn then_reset(mut self) -> Response {
        self.close_after = true;
        self.reset_after = true;
        self
    }
    pub fn no_length(mut self) -> Response {
        self.no_length = true;
        self
    }
    pub fn close() -> Response {
        let mut r = Response::new(0);
        r.action = Action::Close;
        r
    }
    /// Sends `bytes` verbatim instead of a well-formed response.
    pub fn raw(bytes: impl Into<Vec<u8>>) -> Response {
        let mut r = Response::new(0).body(bytes);
        r.action = Action::Raw;
        r
    }
    pub fn reset() -> Response {
        let mut r = Response::new(0);
        r.action = Action::Reset;
        r
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Whatever",
    }
}

type Handler = dyn Fn(&Request) -> Response + Send + Sync + 'static;

/// Origin options.
#[derive(Clone, Debug)]
pub struct OriginOpts {
    /// Keep request bodies in [`Request::body`] (off for huge uploads).
    pub keep_bodies: bool,
    /// Raw bytes recorded at most (the rest is counted, not kept).
    pub raw_limit: usize,
}

impl Default for OriginOpts {
    fn default() -> Self {
        OriginOpts {
            keep_bodies: true,
            raw_limit: 16 << 20,
        }
    }
}

struct OriginState {
    raw: Arc<Mutex<Vec<u8>>>,
    requests: Mutex<Vec<Request>>,
    conns: AtomicUsize,
    active: AtomicUsize,
    handler: Box<Handler>,
    opts: OriginOpts,
    stop: AtomicBool,
}

/// A threaded HTTP/1.1 origin on 127.0.0.1 (one thread per connection, keep-alive).
pub struct Origin {
    pub addr: SocketAddr,
    state: Arc<OriginState>,
}

impl Origin {
    pub fn start(handler: impl Fn(&Request) -> Response + Send + Sync + 'static) -> Origin {
        Origin::start_with(OriginOpts::default(), handler)
    }

    /// An origin answering 200 with `body` to everything.
    pub fn fixed(body: &'static str) -> Origin {
        Origin::start(move |_| Response::ok(body))
    }

    /// An origin answering 200 with the request-target as body.
    pub fn echo_path() -> Origin {
        Origin::start(|r| Response::ok(r.path.clone()))
    }

    /// An origin for large uploads: keeps no bodies (only their length, which it answers)
    /// and at most 64 KiB of raw bytes.
    pub fn body_counter() -> Origin {
        Origin::start_with(
            OriginOpts {
                keep_bodies: false,
                raw_limit: 64 * 1024,
            },
            |r| Response::ok(format!("{}", r.body_len)),
        )
    }

    pub fn start_with(
        opts: OriginOpts,
        handler: impl Fn(&Request) -> Response + Send + Sync + 'static,
    ) -> Origin {
        let l = local_listener();
        let addr = l.local_addr().unwrap();
        let state = Arc::new(OriginState {
            raw: Arc::new(Mutex::new(Vec::new())),
            requests: Mutex::new(Vec::new()),
            conns: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            handler: Box::new(handler),
            opts,
            stop: AtomicBool::new(false),
        });
        let st = state.clone();
        thread::spawn(move || {
            for s in l.incoming() {
                if st.stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(s) = s else { continue };
                let id = st.conns.fetch_add(1, Ordering::SeqCst);
                let st = st.clone();
                thread::spawn(move || {
                    st.active.fetch_add(1, Ordering::SeqCst);
                    let _ = origin_conn(&st, s, id);
                    st.active.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Origin { addr, state }
    }

    /// Every byte received so far, on all connections, in arrival order per read.
    pub fn raw(&self) -> Vec<u8> {
        self.state.raw.lock().unwrap().clone()
    }
    pub fn raw_len(&self) -> usize {
        self.state.raw.lock().unwrap().len()
    }
    /// Connections accepted so far (health probes included).
    pub fn conns(&self) -> usize {
        self.state.conns.load(Ordering::SeqCst)
    }
    /// Connections open now.
    pub fn active_conns(&self) -> usize {
        self.state.active.load(Ordering::SeqCst)
    }
    /// Complete requests received so far.
    pub fn requests(&self) -> Vec<Request> {
        self.state.requests.lock().unwrap().clone()
    }
    pub fn request_count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }
    /// Requests whose path does not start with `/healthz` (probes left out).
    pub fn traffic(&self) -> Vec<Request> {
        self.requests()
            .into_iter()
            .filter(|r| !r.path.starts_with("/healthz"))
            .collect()
    }
    pub fn last_request(&self) -> Request {
        self.requests()
            .pop()
            .expect("the origin received no request")
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

fn set_linger_zero(s: &TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a valid fd with a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn origin_conn(st: &OriginState, s: TcpStream, conn: usize) -> io::Result<()> {
    let mut r = Reader::new(s);
    r.record = Some((st.raw.clone(), st.opts.raw_limit));
    loop {
        let Some(head) = r.read_head()? else {
            return Ok(());
        };
        let (line, headers) = parse_head(&head);
        let mut parts = line.splitn(3, ' ');
        let method = parts.next().unwrap_or("").to_string();
        let path = parts.next().unwrap_or("").to_string();
        let version = parts.next().unwrap_or("").to_string();
        let chunked = is_chunked(&headers);
        let mut body = Vec::new();
        let mut body_len = 0u64;
        {
            let keep = st.opts.keep_bodies;
            let mut sink = |b: &[u8]| {
                body_len += b.len() as u64;
                if keep {
                    body.extend_from_slice(b);
                }
            };
            if chunked {
                r.read_chunked(&mut sink)?;
            } else if let Some(n) = header_in(&headers, "content-length") {
                let n: u64 = n.parse().map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidData, "bad content-length")
                })?;
                if header_in(&headers, "expect").is_some() {
                    r.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
                }
                r.read_n(n, &mut sink)?;
            }
        }
        let req = Request {
            method,
            path,
            version,
            headers,
            body,
            body_len,
            chunked,
            conn,
        };
        st.requests.lock().unwrap().push(req.clone());
        let resp = (st.handler)(&req);
        if !resp.delay.is_zero() {
            thread::sleep(resp.delay);
        }
        match resp.action {
            Action::Close => {
                let _ = r.stream.shutdown(Shutdown::Both);
                return Ok(());
            }
            Action::Reset => {
                set_linger_zero(&r.stream);
                return Ok(());
            }
            Action::Raw => {
                r.stream.write_all(&resp.body)?;
                if resp.reset_after {
                    std::thread::sleep(Duration::from_millis(50));
                    set_linger_zero(&r.stream);
                    return Ok(());
                }
                if resp.close_after {
                    let _ = r.stream.shutdown(Shutdown::Both);
                    return Ok(());
                }
                continue;
            }
            _ => {}
        }
        let is_head = req.method == "HEAD";
        let mut out = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status)).into_bytes();
        for (n, v) in &resp.headers {
            out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
        }
        let until_close = resp.action == Action::AnswerUntilClose;
        if until_close {
            out.extend_from_slice(b"Connection: close\r\n");
        } else if resp.chunked.is_some() {
            out.extend_from_slice(b"Transfer-Encoding: chunked\r\n");
        } else if !resp.no_length {
            out.extend_from_slice(format!("Content-Length: {}\r\n", resp.body.len()).as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        let no_body = is_head || resp.status == 204 || resp.status == 304;
        if !no_body {
            match resp.chunked {
                Some(piece) if !until_close => {
                    r.stream.write_all(&out)?;
                    out.clear();
                    for c in resp.body.chunks(piece) {
                        r.stream
                            .write_all(format!("{:x}\r\n", c.len()).as_bytes())?;
                        r.stream.write_all(c)?;
                        r.stream.write_all(b"\r\n")?;
                        r.stream.flush()?;
                    }
                    out.extend_from_slice(b"0\r\n\r\n");
                }
                _ => out.extend_from_slice(&resp.body),
            }
        }
        r.stream.write_all(&out)?;
        if until_close || resp.close_after {
            let _ = r.stream.shutdown(Shutdown::Both);
            return Ok(());
        }
        if header_in(&req.headers, "connection")
            .map(|v| v.eq_ignore_ascii_case("close"))
            .unwrap_or(false)
        {
            return Ok(());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The independent auth peer (tests/peers/auth_peer.py: PyJWT, botocore)
// ---------------------------------------------------------------------------------------------

/// Installs PyJWT, cryptography and botocore once when they are missing.
pub fn python_ready() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        let ok = |c: &str| {
            Command::new("python3")
                .args(["-c", c])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        if ok("import jwt, cryptography, botocore") {
            return;
        }
        let pip = |extra: &[&str]| {
            Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "pyjwt", "cryptography", "botocore"])
                .args(extra)
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        if !pip(&[]) {
            pip(&["--break-system-packages"]);
        }
        assert!(
            ok("import jwt, cryptography, botocore"),
            "python3 with pyjwt, cryptography and botocore is needed (pip install pyjwt cryptography botocore)"
        );
    });
}

/// Runs the peer on `jobs` in `dir`; one result per job.
pub fn peer(dir: &Path, jobs: serde_json::Value) -> Vec<serde_json::Value> {
    python_ready();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/auth_peer.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    let input = serde_json::json!({ "dir": dir, "jobs": jobs }).to_string();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "peer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Raw client
// ---------------------------------------------------------------------------------------------

/// A response as the client received it.
#[derive(Clone, Debug)]
pub struct RawResponse {
    pub version: String,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The body came chunked.
    pub chunked: bool,
    /// The raw head bytes.
    pub head: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        header_in(&self.headers, name)
    }
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        headers_named(&self.headers, name)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }
    /// `{"message": ...}` of a gateway error.
    pub fn message(&self) -> String {
        self.json()["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no message in {:?}", self.text()))
            .to_string()
    }
    pub fn closes(&self) -> bool {
        self.header("connection")
            .map(|v| v.eq_ignore_ascii_case("close"))
            .unwrap_or(false)
    }
}

/// A client connection that sends exact bytes and parses responses in order.
pub struct Client {
    r: Reader,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        Client::try_connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"))
    }

    pub fn try_connect(addr: SocketAddr) -> io::Result<Client> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_nodelay(true)?;
        Ok(Client { r: Reader::new(s) })
    }

    pub fn set_timeout(&self, d: Duration) {
        self.r.stream.set_read_timeout(Some(d)).unwrap();
    }

    pub fn stream(&self) -> &TcpStream {
        &self.r.stream
    }

    /// Writes `bytes` in one write.
    pub fn send(&mut self, bytes: &[u8]) {
        self.r.stream.write_all(bytes).expect("client write");
    }

    /// Writes `bytes`, reporting failure instead of panicking.
    pub fn try_send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.r.stream.write_all(bytes)
    }

    /// Reads one response to a non-HEAD request.
    pub fn read_response(&mut self) -> io::Result<RawResponse> {
        self.read_response_to("GET")
    }

    /// Reads one response to a request with `method` (HEAD responses have no body).
    /// Interim 1xx responses are returned like any other.
    pub fn read_response_to(&mut self, method: &str) -> io::Result<RawResponse> {
        let head = self
            .r
            .read_head()?
            .ok_or_else(|| eof("before a response"))?;
        let (line, headers) = parse_head(&head);
        let mut parts = line.splitn(3, ' ');
        let version = parts.next().unwrap_or("").to_string();
        let status: u16 = parts.next().and_then(|s| s.parse().ok()).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad status line {line:?}"),
            )
        })?;
        let chunked = is_chunked(&headers);
        let mut body = Vec::new();
        let no_body =
            method == "HEAD" || (100..200).contains(&status) || status == 204 || status == 304;
        if !no_body {
            let mut sink = |b: &[u8]| body.extend_from_slice(b);
            if chunked {
                self.r.read_chunked(&mut sink)?;
            } else if let Some(n) = header_in(&headers, "content-length") {
                let n: u64 = n.parse().map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidData, "bad content-length")
                })?;
                self.r.read_n(n, &mut sink)?;
            } else {
                self.r.read_to_close(&mut sink)?;
            }
        }
        Ok(RawResponse {
            version,
            status,
            headers,
            body,
            chunked,
            head,
        })
    }

    /// True when the server closes the connection within `timeout` without sending anything
    /// more (EOF or reset). False when bytes arrive or the connection stays open.
    pub fn is_closed_within(&mut self, timeout: Duration) -> bool {
        if !self.r.available().is_empty() {
            return false;
        }
        self.r.stream.set_read_timeout(Some(timeout)).unwrap();
        let mut b = [0u8; 1];
        let closed = match self.r.stream.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
            ),
        };
        let _ = self.r.stream.set_read_timeout(Some(Duration::from_secs(5)));
        closed
    }

    /// Bytes buffered but not yet parsed.
    pub fn pending(&self) -> &[u8] {
        self.r.available()
    }
}

/// Sends `raw` on a new connection to `addr` and reads one response.
pub fn roundtrip(addr: SocketAddr, raw: &[u8]) -> io::Result<RawResponse> {
    let mut c = Client::try_connect(addr)?;
    c.try_send(raw)?;
    c.read_response()
}

/// Parses the Prometheus text: the value of the sample line that starts with `name{` and
/// contains every label in `labels` (`key="value"` strings); sums them if several match.
pub fn metric_value(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (mname, lbl) = match series.split_once('{') {
            Some((n, l)) => (n, l),
            None => (series, ""),
        };
        if mname != name || !labels.iter().all(|l| lbl.contains(l)) {
            continue;
        }
        let v: f64 = value.parse().ok()?;
        found = Some(found.unwrap_or(0.0) + v);
    }
    found
}

/// Reads one request (head and body) from a raw connection (a browser's, in the
/// browser tests): request line, header lines, body (by Content-Length).
pub fn read_raw_request(s: &mut TcpStream) -> Option<(String, Vec<String>, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_string();
            let mut lines = head.split("\r\n").map(str::to_string);
            let line = lines.next()?;
            let headers: Vec<String> = lines.collect();
            let len = headers
                .iter()
                .find_map(|l| {
                    let (n, v) = l.split_once(':')?;
                    n.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            while buf.len() < i + 4 + len {
                let n = s.read(&mut tmp).ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&tmp[..n]);
            }
            return Some((line, headers, buf[i + 4..i + 4 + len].to_vec()));
        }
        let n = s.read(&mut tmp).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// A headless Chromium command with the flags this sandbox needs (no network side traffic, a
/// fresh profile in `profile`), ready for the caller's own arguments (`--dump-dom URL`, ...).
/// Panics when Chromium is not installed (`.ci/run` installs the Debian package).
pub fn headless_chromium(profile: &Path) -> Command {
    let bin = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        })
        .expect("chromium is not installed (apt-get install -y chromium; see .ci/run)");
    let mut cmd = Command::new(bin);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    cmd
}
