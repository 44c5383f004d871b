//! The per-worker HTTP/1.1 connection loop: read a head, route, answer (mock) or proxy, write,
//! record metrics and the access log, keep the connection alive.
//!
//! Every buffer a connection uses lives in its [`Conn`] and is reused across keep-alive
//! requests; the request head is parsed into header offsets, so a steady-state request
//! allocates nothing. One write carries a response head and as much body as is at hand.

mod proxy;

use crate::accesslog::{push_json_str, LocalLog};
use crate::config::{Integration, Limits, Route, RouteMatch};
use crate::gateway::{Gateway, Shared};
use crate::http::encode::{self, DateCache};
use crate::http::{BodyKind, HttpError, Method, RequestHead, ResponseHead, Status};
use crate::metrics::{Labels, WorkerMetrics};
use crate::router::Params;
use crate::upstream::WorkerPools;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Initial capacity of a connection's read buffer.
const READ_BUF: usize = 4096;
/// Chunk size for streamed bodies.
const STREAM_BUF: usize = 64 * 1024;

/// One worker thread's state, shared by its connection tasks.
pub struct Worker {
    pub id: usize,
    pub shared: Arc<Shared>,
    gw: RefCell<Rc<Arc<Gateway>>>,
    gen: Cell<u64>,
    pools: RefCell<WorkerPools>,
    metrics: Arc<Mutex<WorkerMetrics>>,
    log: Option<RefCell<LocalLog>>,
    date: RefCell<DateCache>,
    req_seed: u64,
    req_seq: Cell<u64>,
    /// Requests being processed (drain waits for 0).
    pub inflight: Cell<usize>,
    unmatched: Labels,
}

impl Worker {
    /// A worker bound to the shared state.
    pub fn new(id: usize, shared: Arc<Shared>) -> Worker {
        let seed = {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            t.rotate_left(17) ^ ((id as u64) << 48) ^ (std::process::id() as u64)
        };
        Worker {
            id,
            gw: RefCell::new(Rc::new(shared.current())),
            gen: Cell::new(shared.generation()),
            pools: RefCell::new(WorkerPools::new(seed)),
            metrics: shared.metrics.worker(),
            log: shared
                .access_log
                .clone()
                .map(|l| RefCell::new(LocalLog::new(l))),
            date: RefCell::new(DateCache::new()),
            req_seed: seed,
            req_seq: Cell::new(0),
            inflight: Cell::new(0),
            unmatched: Labels(Arc::from("api=\"\",stage=\"\",route=\"\"")),
            shared,
        }
    }

    /// The live config, refreshed when a reload happened (one atomic load otherwise).
    fn gateway(&self) -> Rc<Arc<Gateway>> {
        let g = self.shared.generation();
        if g != self.gen.get() {
            *self.gw.borrow_mut() = Rc::new(self.shared.current());
            self.gen.set(g);
        }
        self.gw.borrow().clone()
    }

    /// Hands buffered access-log lines to the writer.
    pub fn flush_log(&self) {
        if let Some(l) = &self.log {
            l.borrow_mut().flush();
        }
    }

    fn new_request_id(&self, out: &mut [u8; 128]) -> usize {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let seq = self.req_seq.get().wrapping_add(1);
        self.req_seq.set(seq);
        for (i, v) in [self.req_seed, seq].into_iter().enumerate() {
            for k in 0..16 {
                out[i * 16 + k] = HEX[((v >> (60 - 4 * k)) & 15) as usize];
            }
        }
        32
    }
}

/// Per-connection buffers and parse state, reused across keep-alive requests.
struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    /// Bytes from the client; the current request head starts at 0.
    rbuf: Vec<u8>,
    /// Bytes of `rbuf` that belong to the current request (head and buffered body).
    consumed: usize,
    /// Outgoing bytes (to the upstream, then to the client).
    out: Vec<u8>,
    /// Bytes from the upstream.
    ubuf: Vec<u8>,
    head: RequestHead,
    resp: ResponseHead,
    reqid: [u8; 128],
    reqid_len: usize,
    params: Params,
    /// Pipelined bytes that arrived after a streamed request body.
    leftover: Vec<u8>,
    /// This connection has served a request (so the wait for the next head is an idle wait).
    served: bool,
}

/// How a request ended, for metrics, the access log and keep-alive.
pub(crate) struct Outcome {
    status: u16,
    keep_alive: bool,
    upstream: Option<SocketAddr>,
}

enum HeadRead {
    Ready,
    Closed,
    Fail(u16, &'static str),
}

/// Serves one client connection until it closes.
pub async fn serve(w: Rc<Worker>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let max_headers = w.gateway().config.server.limits.max_headers;
    let mut c = Conn {
        stream,
        peer,
        rbuf: Vec::with_capacity(READ_BUF),
        consumed: 0,
        out: Vec::with_capacity(1024),
        ubuf: Vec::new(),
        head: RequestHead::new(max_headers),
        resp: ResponseHead::new(max_headers),
        reqid: [0; 128],
        reqid_len: 0,
        params: Params::new(),
        leftover: Vec::new(),
        served: false,
    };
    loop {
        let gw = w.gateway();
        let limits = &gw.config.server.limits;
        match read_head(&mut c, limits).await {
            HeadRead::Ready => {}
            HeadRead::Closed => return,
            HeadRead::Fail(status, msg) => {
                let mut id = [0u8; 128];
                let n = w.new_request_id(&mut id);
                c.reqid[..n].copy_from_slice(&id[..n]);
                c.reqid_len = n;
                write_error(&w, &mut c, status, msg, false).await;
                return;
            }
        }
        w.inflight.set(w.inflight.get() + 1);
        let keep = handle(&w, &gw, &mut c).await;
        w.inflight.set(w.inflight.get() - 1);
        c.served = true;
        if !keep || w.shared.shutdown.load(Ordering::Relaxed) {
            return;
        }
        // Drop this request's bytes, keep any pipelined ones.
        if !c.leftover.is_empty() {
            c.rbuf.clear();
            std::mem::swap(&mut c.rbuf, &mut c.leftover);
        } else if c.consumed >= c.rbuf.len() {
            c.rbuf.clear();
        } else {
            c.rbuf.drain(..c.consumed);
        }
        c.consumed = 0;
        if c.rbuf.capacity() > 4 * READ_BUF && c.rbuf.len() < READ_BUF {
            c.rbuf.shrink_to(READ_BUF);
        }
    }
}

/// Reads until `c.rbuf` holds a complete request head, enforcing the size and time limits.
async fn read_head(c: &mut Conn, limits: &Limits) -> HeadRead {
    let mut deadline: Option<Instant> = None;
    let hl = crate::http::Limits {
        max_header_bytes: limits.max_header_bytes,
        max_headers: limits.max_headers,
    };
    loop {
        if !c.rbuf.is_empty() {
            match c.head.parse(&c.rbuf, &hl) {
                Ok(Status::Complete(_)) => return HeadRead::Ready,
                Ok(Status::Partial) => {}
                Err(e) => return HeadRead::Fail(e.status(), error_text(&e)),
            }
        }
        let wait = if c.rbuf.is_empty() && c.served {
            limits.idle_timeout
        } else {
            let d = *deadline.get_or_insert_with(|| Instant::now() + limits.header_timeout);
            d.saturating_duration_since(Instant::now())
        };
        if c.rbuf.len() == c.rbuf.capacity() {
            c.rbuf.reserve(c.rbuf.capacity().max(READ_BUF));
        }
        let len = c.rbuf.len();
        let cap = c.rbuf.capacity();
        let buf = std::mem::take(&mut c.rbuf).slice_mut(len..cap);
        match monoio::time::timeout(wait, c.stream.read(buf)).await {
            Err(_) => {
                return if len == 0 && c.served {
                    HeadRead::Closed
                } else if len == 0 {
                    HeadRead::Closed
                } else {
                    HeadRead::Fail(408, "Request Timeout")
                };
            }
            Ok((res, buf)) => {
                c.rbuf = buf.into_inner();
                match res {
                    Ok(0) | Err(_) => return HeadRead::Closed,
                    Ok(_) => {}
                }
            }
        }
    }
}

fn error_text(e: &HttpError) -> &'static str {
    match e {
        HttpError::BadRequest(m) => m,
        HttpError::HeadTooLarge => "Request Header Fields Too Large",
        HttpError::TooManyHeaders => "Request Header Fields Too Large: too many headers",
    }
}

/// Handles one parsed request; returns whether the connection stays open.
async fn handle(w: &Rc<Worker>, gw: &Arc<Gateway>, c: &mut Conn) -> bool {
    let t0 = Instant::now();
    let head_len = c.head.head_len;
    c.consumed = head_len;
    // Request id: the client's when it is sane, else a new one.
    c.reqid_len = match c.head.header(&c.rbuf, "x-request-id") {
        Some(v) if !v.is_empty() && v.len() <= 128 && v.iter().all(|b| b.is_ascii_graphic()) => {
            c.reqid[..v.len()].copy_from_slice(v);
            v.len()
        }
        _ => {
            let mut id = [0u8; 128];
            let n = w.new_request_id(&mut id);
            c.reqid[..n].copy_from_slice(&id[..n]);
            n
        }
    };
    let limits = &gw.config.server.limits;
    let method = c.head.method;
    let method_str = method_label(method);
    let out = route_and_run(w, gw, c, limits).await;
    let route_id = out.1;
    let out = out.0;
    let dur = t0.elapsed();
    let labels = match route_id {
        Some(id) => Labels(gw.config.routes.route(id).labels.clone()),
        None => w.unmatched.clone(),
    };
    if let Ok(mut m) = w.metrics.lock() {
        m.request(&labels, method_str, out.status, dur);
    }
    if let Some(log) = &w.log {
        let route = route_id.map(|id| gw.config.routes.route(id));
        if route.map(|r| r.access_log).unwrap_or(true) {
            write_log_line(w, &mut log.borrow_mut(), c, route, &out, dur);
        }
    }
    out.keep_alive
}

fn method_label(m: Method) -> &'static str {
    match m {
        Method::Other => "OTHER",
        m => m.as_str(),
    }
}

async fn route_and_run(
    w: &Rc<Worker>,
    gw: &Arc<Gateway>,
    c: &mut Conn,
    limits: &Limits,
) -> (Outcome, Option<u32>) {
    // Body size limit before anything else reads the body.
    if let BodyKind::Length(n) = c.head.body {
        if n > limits.max_body_bytes {
            return (
                reject(w, c, 413, "Request Entity Too Large", false).await,
                None,
            );
        }
    }
    let path_b = c.head.slice(&c.rbuf, c.head.path);
    let (Ok(path), Ok(method_str)) = (
        std::str::from_utf8(path_b),
        std::str::from_utf8(c.head.slice(&c.rbuf, c.head.method_range)),
    ) else {
        return (
            reject(w, c, 400, "Bad Request: path is not UTF-8", false).await,
            None,
        );
    };
    let host = c.head.host.map(|r| c.head.slice(&c.rbuf, r));
    let m = gw.config.routes.find(host, method_str, path, &mut c.params);
    let id = match m {
        RouteMatch::Found(id) => id,
        RouteMatch::NotFound => {
            let keep = body_skippable(c);
            return (reject(w, c, 404, "Not Found", keep).await, None);
        }
        RouteMatch::MethodNotAllowed => {
            let keep = body_skippable(c);
            return (reject(w, c, 405, "Method Not Allowed", keep).await, None);
        }
    };
    let route: &Route = gw.config.routes.route(id);
    let out = match &route.integration {
        Integration::Mock(mock) => {
            let keep = body_skippable(c);
            respond_mock(w, c, mock, keep).await
        }
        Integration::Http { upstream, path } => {
            proxy::proxy(w, gw, c, route, *upstream, path.as_ref()).await
        }
    };
    (out, Some(id))
}

/// Whether the request's body is already fully buffered (so it can be skipped and the
/// connection kept); marks it consumed when so.
fn body_skippable(c: &mut Conn) -> bool {
    let avail = (c.rbuf.len() - c.head.head_len) as u64;
    match c.head.body {
        BodyKind::None => true,
        BodyKind::Length(n) if n <= avail => {
            c.consumed = c.head.head_len + n as usize;
            true
        }
        _ => false,
    }
}

/// Writes `x-request-id`, `date` and the connection header, then the blank line.
fn push_common(w: &Worker, c: &mut Conn, keep: bool) {
    encode::push_header(&mut c.out, b"x-request-id", &c.reqid[..c.reqid_len]);
    encode::push_header(&mut c.out, b"date", w.date.borrow_mut().get());
    if !keep {
        c.out.extend_from_slice(b"connection: close\r\n");
    } else if c.head.minor_version == 0 {
        c.out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    c.out.extend_from_slice(b"\r\n");
}

async fn respond_mock(
    w: &Rc<Worker>,
    c: &mut Conn,
    mock: &crate::config::MockResponse,
    keep: bool,
) -> Outcome {
    let keep = keep && c.head.keep_alive;
    c.out.clear();
    c.out.extend_from_slice(&mock.head);
    push_common(w, c, keep);
    if c.head.method != Method::Head {
        c.out.extend_from_slice(&mock.body);
    }
    let ok = write_out(c).await;
    Outcome {
        status: mock.status,
        keep_alive: keep && ok,
        upstream: None,
    }
}

/// Answers with a gateway error `{"message": msg}`.
async fn reject(w: &Rc<Worker>, c: &mut Conn, status: u16, msg: &str, keep: bool) -> Outcome {
    let keep = keep && c.head.keep_alive;
    let ok = write_error(w, c, status, msg, keep).await;
    Outcome {
        status,
        keep_alive: keep && ok,
        upstream: None,
    }
}

/// Encodes and writes a JSON error; returns whether the write succeeded.
async fn write_error(w: &Rc<Worker>, c: &mut Conn, status: u16, msg: &str, keep: bool) -> bool {
    c.out.clear();
    encode::push_status_line(&mut c.out, status);
    c.out
        .extend_from_slice(b"content-type: application/json\r\ncontent-length: ");
    let mut body = Vec::with_capacity(msg.len() + 16);
    body.extend_from_slice(b"{\"message\":\"");
    push_json_str(&mut body, msg.as_bytes());
    body.extend_from_slice(b"\"}");
    encode::push_u64(&mut c.out, body.len() as u64);
    c.out.extend_from_slice(b"\r\n");
    push_common(w, c, keep);
    if c.head.method != Method::Head || c.head.head_len == 0 {
        c.out.extend_from_slice(&body);
    }
    write_out(c).await
}

/// Writes `c.out` to the client.
async fn write_out(c: &mut Conn) -> bool {
    let buf = std::mem::take(&mut c.out);
    let (res, buf) = c.stream.write_all(buf).await;
    c.out = buf;
    res.is_ok()
}

fn write_log_line(
    w: &Worker,
    log: &mut LocalLog,
    c: &Conn,
    route: Option<&Route>,
    out: &Outcome,
    dur: Duration,
) {
    let b = log.buf();
    b.extend_from_slice(b"{\"time\":\"");
    b.extend_from_slice(w.date.borrow_mut().get());
    b.extend_from_slice(b"\",\"request_id\":\"");
    push_json_str(b, &c.reqid[..c.reqid_len]);
    b.extend_from_slice(b"\",\"remote\":\"");
    let ip = c.peer.ip().to_string();
    b.extend_from_slice(ip.as_bytes());
    b.extend_from_slice(b"\",\"method\":\"");
    push_json_str(b, c.head.slice(&c.rbuf, c.head.method_range));
    b.extend_from_slice(b"\",\"path\":\"");
    push_json_str(b, c.head.slice(&c.rbuf, c.head.path));
    b.extend_from_slice(b"\",\"status\":");
    encode::push_u64(b, out.status as u64);
    b.extend_from_slice(b",\"duration_ms\":");
    let us = dur.as_micros() as u64;
    encode::push_u64(b, us / 1000);
    b.push(b'.');
    let frac = us % 1000;
    b.push(b'0' + (frac / 100) as u8);
    b.push(b'0' + (frac / 10 % 10) as u8);
    b.push(b'0' + (frac % 10) as u8);
    if let Some(r) = route {
        b.extend_from_slice(b",\"api\":\"");
        push_json_str(b, r.api.as_bytes());
        b.extend_from_slice(b"\",\"stage\":\"");
        push_json_str(b, r.stage.as_bytes());
        b.extend_from_slice(b"\",\"route\":\"");
        push_json_str(b, r.key.as_bytes());
        b.push(b'"');
    }
    if let Some(u) = out.upstream {
        b.extend_from_slice(b",\"upstream\":\"");
        b.extend_from_slice(u.to_string().as_bytes());
        b.push(b'"');
    }
    b.extend_from_slice(b"}\n");
    log.line_done();
}
