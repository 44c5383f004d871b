//! The admin listener: `/healthz`, `/metrics` (Prometheus text), `/dashboard`, `POST /reload`,
//! behind a bearer token when `admin.token` is set.
//!
//! Admin traffic is rare and never on the proxy's hot path, so this listener runs on plain
//! blocking threads (one per connection, with a small stack), parsing with the same strict
//! codec. Idle and slow clients cannot lock it out: a head must arrive within
//! [`HEAD_TIMEOUT`] (idle keep-alive time included), a body within [`BODY_TIMEOUT`], and at
//! [`MAX_ADMIN_CONNS`] the connection that has waited longest on its client is closed to make
//! room for the new one.

mod dashboard;

use crate::config::AdminConfig;
use crate::gateway::Shared;
use crate::http::{encode, BodyKind, ChunkError, ChunkedDecoder, Limits, RequestHead, Status};
use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Admin connections served at once (one thread each). At the cap, the connection that has
/// waited longest on its client (idle, or sending or reading slowly) is closed for the new one.
const MAX_ADMIN_CONNS: usize = 512;
/// Stack of a connection thread (the default is 2 MiB; only touched pages use memory).
const CONN_STACK: usize = 512 * 1024;
/// Time allowed for a complete request head, from the connection's start or the previous
/// answer: an idle keep-alive connection is closed after it, a partial head gets 408.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed for a request body once its head is in (408 past it).
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for writing an answer to a client that does not read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`AdminHandle::stop`] waits for the connection threads it closed to end.
const STOP_WAIT: Duration = Duration::from_secs(1);
/// Largest admin request body (Content-Length, or the payload of a chunked body).
const MAX_ADMIN_BODY: usize = 1 << 20;
/// Most bytes (framing included) a chunked admin body may take on the wire.
const MAX_ADMIN_CHUNKED_WIRE: usize = 4 * MAX_ADMIN_BODY + (64 << 10);

/// The open admin connections.
#[derive(Default)]
struct Conns {
    next_id: u64,
    list: Vec<Conn>,
}

struct Conn {
    id: u64,
    /// A handle on the socket, to close it when it is evicted.
    stream: TcpStream,
    /// Since when the connection has been waiting on its client (for a head or a body, or
    /// for it to read an answer); `None` while its answer is computed.
    waiting: Option<Instant>,
}

type Registry = Arc<Mutex<Conns>>;

fn lock(r: &Registry) -> MutexGuard<'_, Conns> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

/// A connection's entry in the registry; dropping it removes the entry.
struct Slot {
    reg: Registry,
    id: u64,
}

impl Slot {
    fn set(&self, waiting: Option<Instant>) {
        if let Some(c) = lock(&self.reg).list.iter_mut().find(|c| c.id == self.id) {
            c.waiting = waiting;
        }
    }
    /// The connection now waits on its client.
    fn waiting(&self) {
        self.set(Some(Instant::now()));
    }
    /// The connection now computes an answer (it is not evicted meanwhile).
    fn busy(&self) {
        self.set(None);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.reg).list.retain(|c| c.id != self.id);
    }
}

/// Binds the admin listener and serves it on a background thread.
pub fn start(cfg: &AdminConfig, shared: Arc<Shared>) -> std::io::Result<AdminHandle> {
    let l = TcpListener::bind(cfg.listen)?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&l);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reg = Registry::default();
    let conns = reg.clone();
    let stopping = stop.clone();
    let thread = std::thread::Builder::new()
        .name("ringgate-admin".into())
        .spawn(move || {
            for s in l.incoming() {
                if stopping.load(std::sync::atomic::Ordering::Acquire) {
                    break;
                }
                match s {
                    Ok(s) => admit(&reg, s, &shared),
                    // Out of file descriptors, say: do not spin.
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        })?;
    Ok(AdminHandle {
        fd,
        stop,
        thread,
        conns,
    })
}

/// The running admin listener, for [`AdminHandle::stop`].
pub struct AdminHandle {
    /// The listening socket's descriptor (owned by the accept thread, open until it exits).
    fd: std::os::fd::RawFd,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<()>,
    /// The open connections, closed by `stop`.
    conns: Registry,
}

impl AdminHandle {
    /// Stops accepting and closes the listener (its port is free when this returns), then
    /// closes the open connections (a keep-alive client sees the end of the stream) and waits,
    /// up to [`STOP_WAIT`], for their threads to end.
    pub fn stop(self) {
        // SAFETY: the descriptor is the listener's, which the accept thread holds open until
        // it sees `stop`, set only below: it cannot have been closed (or reused) yet. On
        // Linux, `shutdown` on a listening socket makes the blocked `accept` fail at once.
        unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let _ = self.thread.join();
        // No connection is added any more. Each thread sees the end of its stream (or a
        // failed write) and removes its entry as it exits.
        for c in &lock(&self.conns).list {
            let _ = c.stream.shutdown(Shutdown::Both);
        }
        let until = Instant::now() + STOP_WAIT;
        while !lock(&self.conns).list.is_empty() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Serves `s` on a thread of its own, making room at the cap.
fn admit(reg: &Registry, s: TcpStream, shared: &Arc<Shared>) {
    let Ok(handle) = s.try_clone() else {
        return;
    };
    let id = {
        let mut conns = lock(reg);
        if conns.list.len() >= MAX_ADMIN_CONNS {
            let oldest = conns
                .list
                .iter()
                .enumerate()
                .filter_map(|(i, c)| c.waiting.map(|t| (t, i)))
                .min();
            match oldest {
                Some((_, i)) => {
                    // Its thread sees the end of the stream (or a failed write) and exits.
                    let victim = conns.list.swap_remove(i);
                    let _ = victim.stream.shutdown(Shutdown::Both);
                }
                None => {
                    drop(conns);
                    refuse(s);
                    return;
                }
            }
        }
        conns.next_id += 1;
        let id = conns.next_id;
        conns.list.push(Conn {
            id,
            stream: handle,
            waiting: Some(Instant::now()),
        });
        id
    };
    let slot = Slot {
        reg: reg.clone(),
        id,
    };
    let shared = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("ringgate-admin-conn".into())
        .stack_size(CONN_STACK)
        .spawn(move || {
            let _ = serve_conn(s, &shared, &slot);
        });
    if spawned.is_err() {
        // The closure (socket and slot) is gone; answer through the registry's handle.
        let mut conns = lock(reg);
        if let Some(i) = conns.list.iter().position(|c| c.id == id) {
            let c = conns.list.swap_remove(i);
            drop(conns);
            refuse(c.stream);
        }
    }
}

/// Answers 503 and closes, without a thread (at the cap, nothing to evict).
fn refuse(mut s: TcpStream) {
    let _ = s.set_nonblocking(true);
    // Read what already came, so that closing does not reset the connection.
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        match s.read(&mut sink) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    let r = json(503, "Service Unavailable: too many admin connections");
    let _ = s.write_all(&reply_bytes(&r, Keep::Close, None));
    let _ = s.shutdown(Shutdown::Write);
}

/// True when `body` holds a JSON object (or starts like one: serde reports what follows).
/// The admin endpoints taking a JSON body check this first, because serde's derived
/// `Deserialize` also accepts an array for a struct (`["k",[]]` for `{"name","plans"}`).
pub(crate) fn is_json_object(body: &[u8]) -> bool {
    body.iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        .is_some_and(|b| *b == b'{')
}

/// Compares two byte strings in time independent of where they differ.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    // Every bit of the lengths' difference counts.
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0xff);
        diff |= usize::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

struct Reply {
    status: u16,
    ctype: &'static str,
    body: Vec<u8>,
}

fn json(status: u16, msg: &str) -> Reply {
    Reply {
        status,
        ctype: "application/json",
        body: serde_json::json!({ "message": msg })
            .to_string()
            .into_bytes(),
    }
}

/// Reads what comes before `deadline` into `buf`: `Ok(0)` at the end of the stream,
/// `TimedOut` past the deadline.
fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>, deadline: Instant) -> io::Result<usize> {
    let mut tmp = [0u8; 8192];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut tmp) {
            Ok(n) => {
                buf.extend_from_slice(&tmp[..n]);
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::ErrorKind::TimedOut.into())
            }
            Err(e) => return Err(e),
        }
    }
}

/// Writes an error answer and closes; the client's unread bytes are read (for a moment)
/// so that the close does not reset the connection before the client reads the answer.
fn fail(s: &mut TcpStream, r: &Reply) -> io::Result<()> {
    write_reply(s, r, Keep::Close, None, false)?;
    let _ = s.shutdown(Shutdown::Write);
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut sink = Vec::with_capacity(8192);
    let mut total = 0;
    while total < 2 * MAX_ADMIN_BODY {
        sink.clear();
        match read_more(s, &mut sink, deadline) {
            Ok(n) if n > 0 => total += n,
            _ => break,
        }
    }
    Ok(())
}

/// What a read of the request gave when it gave no bytes.
enum Stop {
    Closed,
    TimedOut,
}

fn stop(r: io::Result<usize>) -> io::Result<Option<Stop>> {
    match r {
        Ok(0) => Ok(Some(Stop::Closed)),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::TimedOut => Ok(Some(Stop::TimedOut)),
        Err(e) => Err(e),
    }
}

fn serve_conn(mut s: TcpStream, shared: &Shared, slot: &Slot) -> io::Result<()> {
    s.set_nodelay(true)?;
    s.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let limits = Limits {
        max_header_bytes: 16384,
        max_headers: 100,
    };
    let mut head = RequestHead::new(100);
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut decoded: Vec<u8> = Vec::new();
    loop {
        // Head: within HEAD_TIMEOUT of the connection's start or of the previous answer.
        slot.waiting();
        let deadline = Instant::now() + HEAD_TIMEOUT;
        let head_len = loop {
            if !buf.is_empty() {
                match head.parse(&buf, &limits) {
                    Ok(Status::Complete(n)) => break n,
                    Ok(Status::Partial) => {}
                    Err(e) => return fail(&mut s, &json(e.status(), &e.to_string())),
                }
            }
            match stop(read_more(&mut s, &mut buf, deadline))? {
                None => {}
                Some(Stop::Closed) => return Ok(()),
                // Idle (nothing sent, or nothing since the last answer): close quietly.
                Some(Stop::TimedOut) if buf.is_empty() => return Ok(()),
                Some(Stop::TimedOut) => return fail(&mut s, &json(408, "Request Timeout")),
            }
        };
        let method = String::from_utf8_lossy(head.slice(&buf, head.method_range)).into_owned();
        // HEAD is served as GET, and answered without the body (RFC 9110 9.3.2).
        let head_only = method == "HEAD";
        let method = if head_only { "GET".to_string() } else { method };
        let path = String::from_utf8_lossy(head.slice(&buf, head.path)).into_owned();
        let authorized = match shared
            .current()
            .config
            .admin
            .as_ref()
            .and_then(|a| a.token.clone())
        {
            None => true,
            Some(t) => head
                .header(&buf, "authorization")
                // The scheme name is case-insensitive (RFC 9110 11.1).
                .and_then(|v| {
                    (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer "))
                        .then(|| v[7..].trim_ascii())
                })
                .map(|v| ct_eq(v, t.as_bytes()))
                .unwrap_or(false),
        };
        // Two `Authorization` fields: which one counts is ambiguous (proxy routes refuse it too).
        if head.header_count(&buf, "authorization") > 1 {
            return fail(
                &mut s,
                &json(400, "Bad Request: more than one Authorization field"),
            );
        }
        // The dashboard page may carry the token as `?token=` (a browser cannot set a header).
        let authorized = authorized
            || dashboard::page_authorized(shared, &path, head.query.map(|q| head.slice(&buf, q)));
        // Without the token, the answer is 401 whatever the body: it is not read (nor held).
        if !authorized
            && path != "/healthz"
            && !matches!(head.body, BodyKind::None | BodyKind::Length(0))
        {
            return fail(&mut s, &json(401, "Unauthorized"));
        }
        // Body: within BODY_TIMEOUT of the head.
        slot.waiting();
        let deadline = Instant::now() + BODY_TIMEOUT;
        // `Expect: 100-continue` (HTTP/1.1 only): answered before the first read of the body.
        let mut expect = head.expect_continue && head.minor_version == 1;
        let mut more = |s: &mut TcpStream, buf: &mut Vec<u8>| -> io::Result<Option<Stop>> {
            if std::mem::take(&mut expect) {
                s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            }
            stop(read_more(s, buf, deadline))
        };
        let chunked = head.body == BodyKind::Chunked;
        decoded.clear();
        let end = match head.body {
            BodyKind::None => head_len,
            BodyKind::Length(n) if n <= MAX_ADMIN_BODY as u64 => {
                let end = head_len + n as usize;
                while buf.len() < end {
                    match more(&mut s, &mut buf)? {
                        None => {}
                        Some(Stop::Closed) => return Ok(()),
                        Some(Stop::TimedOut) => return fail(&mut s, &json(408, "Request Timeout")),
                    }
                }
                end
            }
            BodyKind::Length(_) => return fail(&mut s, &json(413, "Request Entity Too Large")),
            BodyKind::Chunked => {
                let mut dec = ChunkedDecoder::new(MAX_ADMIN_BODY as u64);
                let mut wire = 0;
                loop {
                    match dec.feed(&buf[head_len..], |d| decoded.extend_from_slice(d)) {
                        Ok((n, true)) => break head_len + n,
                        Ok((n, false)) => wire += n,
                        Err(ChunkError::TooLarge) => {
                            return fail(&mut s, &json(413, "Request Entity Too Large"))
                        }
                        Err(e) => return fail(&mut s, &json(400, &e.to_string())),
                    }
                    if wire > MAX_ADMIN_CHUNKED_WIRE {
                        let m = "invalid chunked body: too much framing for its payload";
                        return fail(&mut s, &json(400, m));
                    }
                    // All fed (the payload is in `decoded`): keep the head only.
                    buf.truncate(head_len);
                    match more(&mut s, &mut buf)? {
                        None => {}
                        Some(Stop::Closed) => return Ok(()),
                        Some(Stop::TimedOut) => return fail(&mut s, &json(408, "Request Timeout")),
                    }
                }
            }
        };
        slot.busy();
        let body = if chunked {
            &decoded[..]
        } else {
            &buf[head_len..end]
        };
        // Usage plans (traffic control): GET /usage-plans/{plan}/usage?key=NAME.
        let usage = if authorized {
            let q = head.query.map(|q| head.slice(&buf, q));
            let ask = || {
                crate::policy::admin_usage(
                    &shared.current().config.traffic,
                    &shared.auth.keys(),
                    &method,
                    &path,
                    q,
                )
            };
            match (ask(), shared.cluster.get()) {
                // With [cluster]: the counter may be new here; sync it first.
                (Some((200, _)), Some(c)) => {
                    c.sync_now();
                    ask()
                }
                (r, _) => r,
            }
        } else {
            None
        };
        let reply = match usage {
            Some((status, v)) => Reply {
                status,
                ctype: "application/json",
                body: v.to_string().into_bytes(),
            },
            None => route(shared, &method, &path, authorized, body),
        };
        let keep = match (head.keep_alive, head.minor_version) {
            (false, _) => Keep::Close,
            (true, 0) => Keep::Open10,
            (true, _) => Keep::Open,
        };
        slot.waiting();
        let allow = if reply.status == 405 {
            allowed_methods(&path)
        } else {
            None
        };
        write_reply(&mut s, &reply, keep, allow, head_only)?;
        if keep == Keep::Close {
            return Ok(());
        }
        buf.drain(..end);
        // A large body's memory is not kept by an idle connection.
        buf.shrink_to(64 << 10);
        if decoded.capacity() > 64 << 10 {
            decoded = Vec::new();
        }
    }
}

fn route(shared: &Shared, method: &str, path: &str, authorized: bool, body: &[u8]) -> Reply {
    if path == "/healthz" {
        // Not ready before every listener is bound, nor once a drain closed them.
        if shared.shutdown.load(Ordering::Acquire) {
            return json(503, "Service Unavailable: draining");
        }
        return if shared.ready.load(Ordering::Acquire) {
            Reply {
                status: 200,
                ctype: "text/plain",
                body: b"ok".to_vec(),
            }
        } else {
            json(503, "Service Unavailable")
        };
    }
    if !authorized {
        return json(401, "Unauthorized");
    }
    match (method, path) {
        ("GET", "/metrics") => Reply {
            status: 200,
            ctype: "text/plain; version=0.0.4",
            body: {
                let gw = shared.current();
                let (mut th, mut tail) = (String::new(), String::new());
                gw.config.traffic.render_throttled(&mut th);
                gw.config.traffic.waf.render_metrics(&mut tail);
                crate::upstream::render_metrics(&gw.upstreams, &mut tail);
                let dropped = shared
                    .access_log
                    .as_ref()
                    .map_or(0, |l| l.dropped.load(Ordering::Relaxed));
                tail.push_str("# HELP ringgate_access_log_dropped_total Access log lines lost: the writer could not keep up or could not write them.\n# TYPE ringgate_access_log_dropped_total counter\n");
                let _ = writeln!(tail, "ringgate_access_log_dropped_total {dropped}");
                shared.metrics.render_with(&th, &tail).into_bytes()
            },
        },
        ("POST", "/reload") => match crate::runtime::reload_and_log(shared, " (admin)") {
            Ok(notes) => Reply {
                status: 200,
                ctype: "application/json",
                body: serde_json::json!({ "message": "reloaded", "notes": notes })
                    .to_string()
                    .into_bytes(),
            },
            // Draining: not the config's fault (a 503, as `/healthz` then).
            Err(e) if e.0 == crate::gateway::DRAINING => json(503, &e.0),
            Err(e) => json(400, &e.to_string()),
        },
        ("POST", "/cache/invalidate") => {
            let (status, reply) = crate::cache::admin_invalidate(shared, body);
            if let (200, Some(c)) = (status, shared.cluster.get()) {
                c.invalidate(body);
            }
            let body = reply;
            Reply {
                status,
                ctype: "application/json",
                body: body.into_bytes(),
            }
        }
        (_, p) if p.starts_with("/@connections/") => {
            let (status, body) = crate::ws::api::admin(shared, method, &p[14..], body);
            Reply {
                status,
                ctype: "application/json",
                body: body.into_bytes(),
            }
        }
        ("GET", "/dashboard") => Reply {
            status: 200,
            ctype: "text/html; charset=utf-8",
            body: dashboard::PAGE.as_bytes().to_vec(),
        },
        ("GET", "/dashboard/data") => Reply {
            status: 200,
            ctype: "application/json",
            body: dashboard::data(shared),
        },
        (_, "/metrics") | (_, "/reload") | (_, "/cache/invalidate") => {
            json(405, "Method Not Allowed")
        }
        (_, "/dashboard") | (_, "/dashboard/data") => json(405, "Method Not Allowed"),
        _ => match crate::policy::auth::admin::handle(
            &shared.auth,
            |names| match shared
                .current()
                .config
                .traffic
                .plans
                .new_key_plans_error(names)
            {
                Some(e) => Err(e),
                None => Ok(()),
            },
            method,
            path,
            body,
        ) {
            Some((status, body)) => Reply {
                status,
                ctype: "application/json",
                body: body.into_bytes(),
            },
            None => json(404, "Not Found"),
        },
    }
}

/// Whether the connection stays open after an answer, and how the answer says so.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Keep {
    Close,
    Open,
    /// HTTP/1.0 keep-alive: said in the answer (RFC 9112 9.3), else the client cannot rely on it.
    Open10,
}

fn write_reply(
    s: &mut TcpStream,
    r: &Reply,
    keep: Keep,
    allow: Option<&'static str>,
    head_only: bool,
) -> io::Result<()> {
    let mut out = reply_bytes(r, keep, allow);
    if head_only {
        out.truncate(out.len() - r.body.len());
    }
    s.write_all(&out)
}

/// The methods an admin path takes, for the `Allow` field of a 405 (RFC 9110 15.5.6).
fn allowed_methods(path: &str) -> Option<&'static str> {
    Some(match path {
        "/metrics" | "/dashboard" | "/dashboard/data" => "GET, HEAD",
        "/reload" | "/cache/invalidate" => "POST",
        "/api-keys" => "GET, HEAD, POST",
        p if p.starts_with("/api-keys/") => "DELETE, GET, HEAD",
        p if p.starts_with("/@connections/") => "DELETE, GET, HEAD, POST",
        p if p.starts_with("/usage-plans/") => "GET, HEAD",
        _ => return None,
    })
}

fn reply_bytes(r: &Reply, keep: Keep, allow: Option<&'static str>) -> Vec<u8> {
    let mut out = Vec::with_capacity(r.body.len() + 256);
    encode::push_status_line(&mut out, r.status);
    encode::push_header(&mut out, b"content-type", r.ctype.as_bytes());
    out.extend_from_slice(b"content-length: ");
    encode::push_u64(&mut out, r.body.len() as u64);
    out.extend_from_slice(b"\r\n");
    match keep {
        Keep::Close => out.extend_from_slice(b"connection: close\r\n"),
        Keep::Open10 => out.extend_from_slice(b"connection: keep-alive\r\n"),
        Keep::Open => {}
    }
    if r.status == 401 {
        out.extend_from_slice(b"www-authenticate: Bearer\r\n");
    }
    if let Some(a) = allow {
        encode::push_header(&mut out, b"allow", a.as_bytes());
    }
    if r.status == 429 {
        // `@connections`: the client's queue is full; it drains as the client reads.
        out.extend_from_slice(b"retry-after: 1\r\n");
    }
    // Admin answers (the dashboard included) are never cached, nor framed by other pages.
    out.extend_from_slice(b"cache-control: no-store\r\nx-frame-options: DENY\r\nx-content-type-options: nosniff\r\n\r\n");
    out.extend_from_slice(&r.body);
    out
}

#[cfg(test)]
mod tests {
    use super::ct_eq;

    #[test]
    fn constant_time_eq() {
        assert!(ct_eq(b"secret", b"secret"));
        assert!(!ct_eq(b"secret", b"secreT"));
        assert!(!ct_eq(b"secret", b"secret2"));
        assert!(!ct_eq(b"", b"x"));
        assert!(ct_eq(b"", b""));
        // Lengths differing by a multiple of 65,536, padded with what the other side pads with.
        let mut long = b"secret".to_vec();
        long.resize(6 + 65_536, 0xff);
        assert!(!ct_eq(&long, b"secret"));
        assert!(!ct_eq(b"secret", &long));
    }

    #[test]
    fn json_object_bodies() {
        use super::is_json_object;
        assert!(is_json_object(b"{}"));
        assert!(is_json_object(b" \r\n\t{\"name\":\"k\"}"));
        assert!(is_json_object(b"{not json"));
        assert!(!is_json_object(b""));
        assert!(!is_json_object(b"  "));
        assert!(!is_json_object(b"[\"k\",[],null,true]"));
        assert!(!is_json_object(b"null"));
        assert!(!is_json_object(b"\"k\""));
    }
}
