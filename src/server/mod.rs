//! The per-worker HTTP/1.1 connection loop: read a head, route, answer (mock) or proxy, write,
//! record metrics and the access log, keep the connection alive.
//!
//! Every buffer a connection uses lives in its [`Conn`] and is reused across keep-alive
//! requests; the request head is parsed into header offsets, so a steady-state request
//! allocates nothing. One write carries a response head and as much body as is at hand.

mod auth_stage;
mod cached;
mod park;
mod proxy;
pub mod tasks;
mod traffic;
mod validate_stage;

pub(crate) use park::readiness_carrier;
pub use park::run_parker;
pub use park::Idle;

use crate::accesslog::{push_json_str, LocalLog};
use crate::config::{Integration, Limits, Route, RouteMatch};
use crate::gateway::{Gateway, Shared};
use crate::http::encode::{self, DateCache};
use crate::http::{BodyKind, HeaderKind, HttpError, Method, RequestHead, ResponseHead, Status};
use crate::metrics::{Labels, WorkerMetrics};
use crate::router::Params;
use crate::upstream::WorkerPools;
use monoio::buf::IoBufMut;
use monoio::io::{
    AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, CancelableAsyncReadRent, Canceller, Split,
};
use monoio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The parameter-mapping context of the request in `c` (a macro, so that it borrows `c`'s
/// fields one by one and `c.b.out` stays writable beside it).
macro_rules! map_ctx {
    ($c:expr) => {
        crate::policy::mapping::Ctx {
            head: &$c.b.head,
            buf: &$c.b.rbuf,
            params: &$c.params,
            request_id: &$c.reqid[..$c.reqid_len],
            peer: $c.peer.ip(),
            principal: $c.principal.as_deref(),
            api_key: $c.api_key.as_deref(),
            auth_context: $c.auth_ctx.as_deref(),
        }
    };
}
pub(crate) use map_ctx;

/// Initial capacity of a connection's read buffer.
const READ_BUF: usize = 4096;
/// Connection buffers a worker keeps for reuse.
const FREE_BUFS: usize = 32;
/// Chunk size for streamed bodies.
const STREAM_BUF: usize = 64 * 1024;

/// One worker thread's state, shared by its connection tasks.
pub struct Worker {
    pub id: usize,
    pub shared: Arc<Shared>,
    /// The live config. Cloning the outer `Rc` per request is a plain increment; cloning the
    /// `Arc` would bounce its counter's cache line between workers.
    #[allow(
        clippy::redundant_allocation,
        reason = "Rc avoids a shared atomic per request"
    )]
    gw: RefCell<Rc<Arc<Gateway>>>,
    gen: Cell<u64>,
    pools: RefCell<WorkerPools>,
    metrics: Arc<Mutex<WorkerMetrics>>,
    log: Option<RefCell<LocalLog>>,
    date: RefCell<DateCache>,
    req_seed: u64,
    req_seq: Cell<u64>,
    /// Requests being processed, and lingering closes (drain waits for 0).
    pub inflight: Cell<usize>,
    /// When the drain gives up (set when it starts): lingering closes end before it.
    pub drain_until: Cell<Option<Instant>>,
    unmatched: Labels,
    /// Buffers of idle or closed connections, for reuse.
    #[allow(
        clippy::vec_box,
        reason = "connections hold the boxed buffers; moved by pointer"
    )]
    free: RefCell<Vec<Box<Bufs>>>,
    trim_wanted: Cell<bool>,
    /// Idle connections waiting without buffers.
    pub parker: park::Parker,
    /// Every task this worker spawned, ended when it stops.
    pub tasks: Rc<tasks::TaskSet>,
    /// This worker's response cache.
    cache: Rc<RefCell<crate::cache::WorkerCache>>,
    /// A reused iovec array for writing large cache hits.
    cache_iov: Cell<Option<Box<[libc::iovec; 3]>>>,
    /// Per-worker auth caches (verified JWTs, SigV4 keys).
    auth: crate::policy::auth::WorkerAuth,
    /// Upstream protocol errors: one log line a second at most.
    upstream_log: RefCell<LogLimit>,
    /// Request body bytes this worker's connections hold whole (see [`Worker::hold_body`]).
    held_bodies: Cell<u64>,
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
            drain_until: Cell::new(None),
            unmatched: Labels(Arc::from("api=\"\",stage=\"\",route=\"\"")),
            free: RefCell::new(Vec::new()),
            trim_wanted: Cell::new(false),
            parker: park::Parker::new().expect("epoll_create1"),
            tasks: Rc::default(),
            cache: Rc::default(),
            cache_iov: Cell::new(None),
            auth: crate::policy::auth::WorkerAuth::new(),
            upstream_log: RefCell::default(),
            held_bodies: Cell::new(0),
            shared,
        }
    }

    /// Raises a connection's hold of request body bytes read whole (for WAF body rules, SigV4
    /// or `validate`: `held`, its current hold) to `want`, within this worker's share of
    /// `server.limits.max_held_body_bytes`. False (nothing changes) past that share, unless
    /// nothing else is held: one body at a time always goes. Given back by
    /// [`Worker::release_body`] when the request ends.
    pub(super) fn hold_body(&self, held: &mut u64, want: u64) -> bool {
        if want <= *held {
            return true;
        }
        let gw = self.gateway();
        let server = &gw.config.server;
        let share = server.limits.max_held_body_bytes / server.workers.max(1) as u64;
        let others = self.held_bodies.get() - *held;
        if others > 0 && others + want > share {
            return false;
        }
        self.held_bodies.set(others + want);
        *held = want;
        true
    }

    /// Gives a connection's hold back (see [`Worker::hold_body`]).
    pub(super) fn release_body(&self, held: &mut u64) {
        self.held_bodies.set(self.held_bodies.get() - *held);
        *held = 0;
    }

    /// The live config, refreshed when a reload happened (one atomic load otherwise).
    #[allow(clippy::redundant_allocation, reason = "see the `gw` field")]
    pub(crate) fn gateway(&self) -> Rc<Arc<Gateway>> {
        let g = self.shared.generation();
        if g != self.gen.get() {
            *self.gw.borrow_mut() = Rc::new(self.shared.current());
            self.gen.set(g);
        }
        self.gw.borrow().clone()
    }

    /// Whether the connection may stay open after this response: the client's wish, unless
    /// the gateway is draining (then the response says `connection: close`, as nginx's and
    /// Envoy's do, so the client does not send another request on a closing connection).
    #[inline]
    pub(crate) fn keep_alive(&self, head: &crate::http::RequestHead) -> bool {
        head.keep_alive && !self.shared.shutdown.load(Ordering::Relaxed)
    }

    /// Hands buffered access-log lines to the writer.
    pub fn flush_log(&self) {
        if let Some(l) = &self.log {
            l.borrow_mut().flush();
        }
    }

    /// Buffers for a connection that becomes active.
    fn take_bufs(&self) -> Box<Bufs> {
        match self.free.borrow_mut().pop() {
            Some(b) => b,
            None => Bufs::new(self.gateway().config.server.limits.max_headers),
        }
    }

    /// Buffers of a connection that idles or closes: kept for reuse up to a bound; oversized
    /// ones are dropped.
    fn give_bufs(&self, mut b: Box<Bufs>) {
        let mut free = self.free.borrow_mut();
        let big = b.rbuf.capacity() > 4 * READ_BUF
            || b.ubuf.capacity() > 4 * READ_BUF
            || b.out.capacity() > 4 * READ_BUF
            || b.leftover.capacity() > 0;
        if free.len() >= FREE_BUFS || big {
            drop(b);
            self.trim_wanted.set(true);
            return;
        }
        b.rbuf.clear();
        b.out.clear();
        b.ubuf.clear();
        b.extra.clear();
        free.push(b);
    }

    /// Closes pooled upstream connections that their upstream closed or that idled too long
    /// (see [`crate::upstream::WorkerPools::sweep`]); called once a second.
    pub fn sweep_pools(&self) {
        self.pools.borrow_mut().sweep();
    }

    /// Ends every task of this worker that is still running (a request cut by the drain
    /// deadline, an idle keep-alive connection, the worker's own loops) and closes the pooled
    /// upstream connections, so nothing is left behind when its runtime is dropped: every
    /// socket is closed and the driver freed. Returns when they are gone.
    pub async fn stop_tasks(&self) {
        self.tasks.stop();
        while self.tasks.live() > 0 {
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
        self.parker.close_all();
        self.pools.borrow_mut().close_all();
        crate::ws::client::close_idle();
        // The cancellations and closes of the dropped operations complete at the next turns
        // of the driver; wait for them here, while it still runs.
        for _ in 0..3 {
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Returns freed heap pages to the kernel after many buffers were dropped, so idle
    /// connections cost little RSS (called from a periodic task, never per request).
    pub fn trim_heap(&self) {
        if self.trim_wanted.replace(false) {
            // SAFETY: malloc_trim only walks the allocator's own free lists; it has no
            // preconditions and is safe to call from any thread at any time.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }

    /// Logs an upstream that broke the protocol (answered with 502): at most one line a second
    /// per worker, saying how many were left out since.
    fn log_upstream_error(&self, addr: std::net::SocketAddr, what: &str) {
        match self.upstream_log.borrow_mut().allow(Instant::now()) {
            None => {}
            Some(0) => crate::elog!("ringgate: upstream {addr}: {what} (502)"),
            Some(held) => crate::elog!(
                "ringgate: upstream {addr}: {what} (502; and {held} more upstream errors since the last report)"
            ),
        }
    }

    /// Counts a connection refused at accept (`ringgate_connections_refused_total`):
    /// `accept_error` for a failed accept, else one closed at once over `max_connections`.
    pub fn count_refused(&self, accept_error: bool) {
        if let Ok(mut m) = self.metrics.lock() {
            if accept_error {
                m.refused_accept_error += 1;
            } else {
                m.refused_max_connections += 1;
            }
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

/// At most one line per this long from each [`LogLimit`].
const LOG_EVERY: Duration = Duration::from_secs(1);

/// A log line written at most once per [`LOG_EVERY`]; the ones held back in between
/// are counted, and the count is reported with the next line or on its own.
#[derive(Default)]
pub(crate) struct LogLimit {
    last: Option<Instant>,
    held: u64,
}

impl LogLimit {
    /// A line wants out at `now`: `Some(lines held back before it)` when it may be written,
    /// `None` when it is held back (and counted).
    pub(crate) fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < LOG_EVERY => {
                self.held += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held))
            }
        }
    }

    /// Lines held back whose count is due for a report at `now` (a period after the last line
    /// written); the count is reset.
    pub(crate) fn due(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if self.held > 0 && now.saturating_duration_since(t) >= LOG_EVERY => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held))
            }
            _ => None,
        }
    }
}

/// A connection's buffers and parse state. Taken from the worker's pool while the connection
/// is active and given back while it idles, so an idle connection holds no buffer.
struct Bufs {
    /// Bytes from the client; the current request head starts at 0.
    rbuf: Vec<u8>,
    /// Outgoing bytes (to the upstream, then to the client).
    out: Vec<u8>,
    /// Bytes from the upstream.
    ubuf: Vec<u8>,
    head: RequestHead,
    resp: ResponseHead,
    /// Pipelined bytes that arrived after a streamed request body.
    leftover: Vec<u8>,
    /// Extra response header lines for the current request (CORS, `retry-after`).
    extra: Vec<u8>,
}

impl Bufs {
    fn new(max_headers: usize) -> Box<Bufs> {
        Box::new(Bufs {
            rbuf: Vec::with_capacity(READ_BUF),
            out: Vec::with_capacity(1024),
            ubuf: Vec::new(),
            head: RequestHead::new(max_headers),
            resp: ResponseHead::new(max_headers),
            leftover: Vec::new(),
            extra: Vec::new(),
        })
    }
}

/// Counts an open client connection for `ringgate_connections_active` and `max_connections`;
/// travels with the socket when an idle connection is parked.
pub struct ConnGuard(pub Arc<Shared>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0
            .metrics
            .connections_active
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client connection's byte stream: plain TCP, or TLS over it. The connection loop is
/// generic over it, so the plain path compiles to exactly what it would be without TLS.
pub trait ClientIo:
    AsyncReadRent + AsyncWriteRent + CancelableAsyncReadRent + Split + Sized + 'static
{
    /// Came in over TLS (`X-Forwarded-Proto: https`, `"scheme":"https"` in the access log).
    const TLS: bool;
    /// The TCP socket underneath (readiness waits, socket options).
    fn tcp(&self) -> &TcpStream;
    /// The stream as an idle connection for the park table, or `None` when it cannot wait on
    /// socket readiness alone (bytes buffered above the socket): it is closed instead.
    fn into_idle(self) -> Option<Idle>;
    /// Ends a connection the gateway closes (TLS: close_notify; plain: nothing, the socket is
    /// closed when dropped).
    fn close(self) -> impl std::future::Future<Output = ()>;
    /// The `x-forwarded-client-cert` value for a client certificate verified in the handshake
    /// (mTLS).
    #[inline]
    fn xfcc(&self) -> Option<&[u8]> {
        None
    }
    /// Sets the stream up for the connection loop's reads (plain TCP on io_uring: one
    /// multishot receive kept armed from read to read).
    #[inline]
    fn start_reads(&mut self) {}
}

impl ClientIo for TcpStream {
    const TLS: bool = false;
    #[inline]
    fn start_reads(&mut self) {
        if multishot_enabled() {
            let _ = self.enable_multishot_recv();
        }
    }
    #[inline]
    fn tcp(&self) -> &TcpStream {
        self
    }
    #[inline]
    fn into_idle(self) -> Option<Idle> {
        Idle::plain(self)
    }
    #[inline]
    fn close(self) -> impl std::future::Future<Output = ()> {
        drop(self);
        std::future::ready(())
    }
}

impl ClientIo for crate::tls::TlsStream {
    const TLS: bool = true;
    #[inline]
    fn tcp(&self) -> &TcpStream {
        crate::tls::TlsStream::tcp(self)
    }
    fn into_idle(mut self) -> Option<Idle> {
        // A parked socket is woken by bytes on the wire only, so nothing may wait above it.
        // The idle read was cancelled in the socket read, which only starts once rustls has
        // no plaintext and every received byte was handed to it; this is a safety net.
        if !self.drained() {
            return None;
        }
        self.release_buffers();
        Some(Idle::Tls(Box::new(self)))
    }
    fn xfcc(&self) -> Option<&[u8]> {
        crate::tls::TlsStream::xfcc(self)
    }
    async fn close(mut self) {
        // Bounded: a client that stopped reading must not hold the task.
        let _ = monoio::time::timeout(Duration::from_secs(1), self.shutdown()).await;
    }
}

/// One client connection while it is active.
struct Conn<S> {
    stream: S,
    peer: SocketAddr,
    b: Box<Bufs>,
    /// Bytes of `rbuf` that belong to the current request (head and buffered body).
    consumed: usize,
    reqid: [u8; 128],
    reqid_len: usize,
    params: Params,
    /// This connection has served a request (so the wait for the next head is an idle wait).
    served: bool,
    /// Cancels the idle read when the grace period ends (kept to avoid allocating per wait).
    canceller: Canceller,
    guard: ConnGuard,
    /// Set by the auth stage; sent upstream as `x-principal-id`.
    principal: Option<Arc<str>>,
    /// Name of the API key that passed the auth stage (usage plans, access log).
    api_key: Option<Arc<str>>,
    /// JWT claims or the request authorizer's context, kept for the route's mappings.
    auth_ctx: Option<Arc<serde_json::Value>>,
    /// Set when the request became a WebSocket connection: the loop hands the socket over.
    takeover: Option<crate::ws::Takeover>,
    /// Where a chunked body that a stage read whole ends in `rbuf` (so a refusal can skip it
    /// and keep the connection).
    chunked_end: Option<usize>,
    /// Request body bytes this connection holds whole ([`Worker::hold_body`]).
    held: u64,
    /// An earlier end for the upstream exchange than `timeout_ms` from its start: a request
    /// that waited for another's fetch of the same cache key has only what is left of its
    /// own `timeout_ms`.
    upstream_by: Option<Instant>,
    /// Whether this request was a cache hit or miss (for the counters): kept with the
    /// connection, since other requests of the worker run while it is answered.
    cache_event: u8,
    /// The matched route's API answers CORS itself: the upstream's `access-control-*`
    /// response headers never reach the client (whatever the request's `Origin`).
    gateway_cors: bool,
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
    /// Nothing arrived within the grace period: park the socket without buffers.
    Park,
    Fail(u16, &'static str),
}

/// How long a kept-alive connection waits for its next request while holding its buffers.
/// Past it the buffers go back to the worker's pool and the socket is parked on a readiness
/// wait that holds nothing (as nginx frees its buffers while a connection waits).
const IDLE_GRACE: Duration = Duration::from_millis(250);

/// Serves one client connection from the moment it is accepted.
pub async fn serve(w: Rc<Worker>, stream: TcpStream, peer: SocketAddr, guard: ConnGuard) {
    let _ = stream.set_nodelay(true);
    let limits = &w.gateway().config.server.limits;
    set_user_timeout(&stream, limits.idle_timeout);
    let now = Instant::now();
    run(
        w,
        stream,
        peer,
        guard,
        false,
        false,
        now,
        now + limits.header_timeout,
    )
    .await
}

/// Serves one connection accepted on a TLS listener: the handshake, bounded by
/// `header_timeout` (past it, or when it fails, the socket is closed), then the same loop as
/// plain HTTP. A new config's certificates apply to the handshakes after the reload.
pub async fn serve_tls(w: Rc<Worker>, stream: TcpStream, peer: SocketAddr, guard: ConnGuard) {
    let _ = stream.set_nodelay(true);
    let (server, header_timeout) = {
        let gw = w.gateway();
        let limits = &gw.config.server.limits;
        set_user_timeout(&stream, limits.idle_timeout);
        // Always set while TLS listeners are bound (a reload that drops [server.tls] keeps it).
        let Some(tls) = &gw.config.server.tls else {
            return;
        };
        (tls.server.clone(), limits.header_timeout)
    };
    let hs = monoio::time::timeout(header_timeout, async {
        // Waiting for the ClientHello is idle (a drain closes the connection); from its
        // first byte the handshake counts as in flight, as a partly read head does, so a
        // drain lets it finish (its request, sent with the client's last flight, then counts).
        let _ = stream.readable(false).await;
        // A connection closed before its first byte (a load balancer's TCP check) is no
        // failed handshake: none began.
        if let crate::upstream::Peek::Gone = crate::upstream::peek(&stream) {
            return None;
        }
        let _handshaking = InFlight::new(&w.inflight);
        Some(crate::tls::accept(stream, server).await)
    })
    .await;
    let m = &w.shared.metrics;
    let stream = match hs {
        Ok(None) => return,
        Ok(Some(Ok(s))) => s,
        Ok(Some(Err(_))) => {
            m.tls_handshake_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        Err(_) => {
            m.tls_handshake_timeouts.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let now = Instant::now();
    run(
        w,
        stream,
        peer,
        guard,
        false,
        true,
        now,
        now + header_timeout,
    )
    .await
}

/// A client that stops reading (a full send buffer, zero window) or vanishes is dropped by the
/// kernel once sent data stays unacknowledged for `idle_timeout` (TCP_USER_TIMEOUT, zero-window
/// probes included): no timer per write on the hot path, one system call per connection.
fn set_user_timeout(stream: &TcpStream, t: Duration) {
    let ms = t.as_millis().min(u32::MAX as u128) as libc::c_uint;
    // SAFETY: the fd is the stream's open socket; the option value is a c_uint that outlives
    // the call, and its size is passed.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&ms as *const libc::c_uint).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        );
    }
}

/// The connection loop: one request after another until close or park.
///
/// `handshaken`: the connection just finished its TLS handshake, and counts as in flight
/// until its first read of a head ends (the request follows the client's last handshake
/// flight; a drain must not close the connection in between).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run<S: ClientIo>(
    w: Rc<Worker>,
    mut stream: S,
    peer: SocketAddr,
    guard: ConnGuard,
    served: bool,
    handshaken: bool,
    mut now: Instant,
    mut deadline: Instant,
) {
    let mut first_head = handshaken.then(|| OwnedInFlight::new(w.clone()));
    stream.start_reads();
    let b = w.take_bufs();
    let mut c = Conn {
        stream,
        peer,
        b,
        consumed: 0,
        reqid: [0; 128],
        reqid_len: 0,
        params: Params::new(),
        served,
        canceller: Canceller::new(),
        guard,
        principal: None,
        api_key: None,
        auth_ctx: None,
        takeover: None,
        gateway_cors: false,
        chunked_end: None,
        upstream_by: None,
        cache_event: 0,
        held: 0,
    };
    // Set when the gateway closes while the client may still be sending: see
    // [`lingering_close`].
    let mut linger = false;
    loop {
        let gw = w.gateway();
        let limits = &gw.config.server.limits;
        let read = read_head(&mut c, limits, now, deadline, &w.inflight).await;
        drop(first_head.take());
        match read {
            HeadRead::Ready => {}
            HeadRead::Closed => break,
            HeadRead::Park => {
                let Conn {
                    stream, b, guard, ..
                } = c;
                w.give_bufs(b);
                if let Some(idle) = stream.into_idle() {
                    w.parker.park(idle, guard, deadline);
                }
                return;
            }
            HeadRead::Fail(status, msg) => {
                // An answer under way: a drain lets it go out.
                let _answering = InFlight::new(&w.inflight);
                // The header fields read before the fault, if any, give the client's id.
                set_request_id(&w, &mut c);
                c.b.extra.clear();
                if status == 400 && c.b.head.head_len > 0 && c.b.head.path.1 > c.b.head.path.0 {
                    // A path refused by its checks (`%2F`, `;`, ...): a browser app reads the
                    // 400 through the CORS headers of the API it addressed.
                    traffic::push_addressed_cors(&gw, &mut c, None);
                }
                let ok = write_error(&w, &mut c, status, msg, false).await;
                // The rest of a head that was refused may still be coming.
                linger = ok;
                // Counted like any answered request (no route; no duration: it was not
                // served), so 400/408/431 show in the metrics and the dashboard.
                let method = if c.b.head.head_len > 0 {
                    method_label(c.b.head.method)
                } else {
                    // The head did not parse whole: the request line's method, when at least
                    // that much arrived.
                    c.b.rbuf
                        .iter()
                        .take(16)
                        .position(|&b| b == b' ')
                        .map_or("OTHER", |i| {
                            method_label(crate::http::Method::from_bytes(&c.b.rbuf[..i]))
                        })
                };
                if let Ok(mut m) = w.metrics.lock() {
                    m.count_request(&w.unmatched.0, method, status);
                }
                // And logged, as nginx logs its 400s: what was sent matters to whoever
                // watches for attacks.
                if let Some(log) = &w.log {
                    write_refused_log_line(&w, &mut log.borrow_mut(), &c, status);
                }
                break;
            }
        }
        // A reload may have happened while this connection waited: serve with the newest.
        let gw = w.gateway();
        w.inflight.set(w.inflight.get() + 1);
        let keep;
        (keep, now) = handle(&w, &gw, &mut c).await;
        w.inflight.set(w.inflight.get() - 1);
        if let Some(t) = c.takeover.take() {
            // A WebSocket now: bytes after the upgrade request are the first frames.
            let pending = c.b.rbuf[c.consumed.min(c.b.rbuf.len())..].to_vec();
            w.release_body(&mut c.held);
            let Conn {
                stream, b, guard, ..
            } = c;
            w.give_bufs(b);
            // Counted as in flight so a drain lets it send its close frame (it watches the
            // shutdown flag) and call `$disconnect`.
            // Its own task: this loop's (large) state is freed for the connection's lifetime.
            w.inflight.set(w.inflight.get() + 1);
            let w2 = w.clone();
            w.tasks.spawn(async move {
                crate::ws::run_takeover(t, stream, pending, &w2).await;
                w2.inflight.set(w2.inflight.get() - 1);
                drop(guard);
            });
            return;
        }
        c.served = true;
        if !keep || w.shared.shutdown.load(Ordering::Relaxed) {
            linger = may_still_send(&c);
            break;
        }
        w.release_body(&mut c.held);
        // Drop this request's bytes, keep any pipelined ones.
        if !c.b.leftover.is_empty() {
            c.b.rbuf.clear();
            std::mem::swap(&mut c.b.rbuf, &mut c.b.leftover);
        } else if c.consumed >= c.b.rbuf.len() {
            c.b.rbuf.clear();
        } else {
            c.b.rbuf.drain(..c.consumed);
        }
        // A body read whole is not kept in memory by a connection that waits for its next
        // request.
        if c.b.rbuf.capacity() > 4 * READ_BUF && c.b.rbuf.len() <= READ_BUF {
            c.b.rbuf.shrink_to(READ_BUF);
        }
        c.consumed = 0;
        deadline = now + limits.idle_timeout;
    }
    w.release_body(&mut c.held);
    let Conn {
        b, stream, guard, ..
    } = c;
    w.give_bufs(b);
    if linger {
        // Its own (small) task: this loop's state is freed while it lingers. Counted as in
        // flight, so a drain waits for it (it ends before the drain gives up).
        w.inflight.set(w.inflight.get() + 1);
        w.tasks.clone().spawn(async move {
            lingering_close(&w, stream).await;
            w.inflight.set(w.inflight.get() - 1);
            drop(guard);
        });
        return;
    }
    stream.close().await;
    drop(guard);
}

/// Whether the client may still be sending when the gateway closes the connection after a
/// response: a request body not read to its end, bytes read but not used (pipelined), or
/// bytes waiting in the socket. Evaluated only when closing, never on a kept-alive request.
fn may_still_send<S: ClientIo>(c: &Conn<S>) -> bool {
    let h = &c.b.head;
    let body_unread = match h.body {
        BodyKind::None => false,
        BodyKind::Length(n) => (c.consumed as u64) < (h.head_len as u64).saturating_add(n),
        BodyKind::Chunked => c.chunked_end.is_none(),
    };
    body_unread
        || c.b.rbuf.len() > c.consumed
        || !c.b.leftover.is_empty()
        || c.stream.tcp().recv_pending()
        || unread_in_socket(c.stream.tcp())
}

/// Whether plain client connections and upstream connections read through a multishot
/// receive (io_uring only; set `RINGGATE_MULTISHOT=0` to read with one receive per read
/// instead, for comparison).
pub(crate) fn multishot_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("RINGGATE_MULTISHOT").is_none_or(|v| v != "0"))
}

/// Whether bytes wait unread in the socket's receive queue (closing it then sends an RST).
fn unread_in_socket(s: &TcpStream) -> bool {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD on the stream's open socket writes one c_int into `n`, which outlives
    // the call.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n as *mut libc::c_int) };
    r == 0 && n > 0
}

/// A lingering close ends after this long in all (nginx: `lingering_time`, 30 s).
const LINGER_TIME: Duration = Duration::from_secs(5);
/// ... or after this long without a byte from the client (nginx: `lingering_timeout`, 5 s).
const LINGER_TIMEOUT: Duration = Duration::from_secs(2);
/// ... or once this many bytes were discarded.
const LINGER_MAX_BYTES: usize = 4 << 20;
/// How often a lingering close looks whether a drain has started.
const LINGER_TICK: Duration = Duration::from_millis(200);

/// Closes a connection the client may still be sending on, as nginx's `lingering_close on`
/// does. Closing a socket with unread bytes in its receive queue makes the kernel send an RST,
/// and an RST can destroy the response still on its way to (or unread by) the client: the 431
/// or 413 would be lost. So: send FIN after the response (TLS: close_notify first), then read
/// and discard what the client sends until it closes, goes quiet for [`LINGER_TIMEOUT`],
/// [`LINGER_TIME`] passes or [`LINGER_MAX_BYTES`] were read, then close. During a drain it
/// ends before the drain gives up (`shutdown_timeout_ms`).
async fn lingering_close<S: ClientIo>(w: &Worker, mut stream: S) {
    let start = Instant::now();
    // Bounded like `close`: a client that stopped reading must not hold the task.
    match monoio::time::timeout(Duration::from_secs(1), stream.shutdown()).await {
        Ok(Ok(())) => {}
        _ => return,
    }
    let end = start + LINGER_TIME;
    let mut quiet_end = start + LINGER_TIMEOUT;
    let mut discarded = 0usize;
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut canceller = Canceller::new();
    loop {
        let now = Instant::now();
        let mut stop = end.min(quiet_end);
        if let Some(d) = w.drain_until.get() {
            // A margin so the connection is closed before the drain's last look.
            stop = stop.min(d.checked_sub(Duration::from_millis(50)).unwrap_or(d));
        }
        if now >= stop || discarded >= LINGER_MAX_BYTES {
            return;
        }
        let wake = stop.min(now + LINGER_TICK);
        buf.clear();
        let (res, b) = {
            let mut read = std::pin::pin!(stream.cancelable_read(buf, canceller.handle()));
            let timer = monoio::time::sleep_until(wake.into());
            monoio::select! {
                r = &mut read => r,
                _ = timer => {
                    canceller = std::mem::take(&mut canceller).cancel();
                    read.await
                }
            }
        };
        buf = b;
        match res {
            Ok(0) => return,
            Ok(n) => {
                discarded += n;
                quiet_end = Instant::now() + LINGER_TIMEOUT;
            }
            Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => {}
            Err(_) => return,
        }
    }
}

/// Reads until `c.rbuf` holds a complete request head, enforcing the size and time limits.
/// `deadline` bounds the wait for the first byte (idle or header timeout); `now` is a recent
/// reading of the clock (the end of the previous request), saving a read per request.
async fn read_head<S: ClientIo>(
    c: &mut Conn<S>,
    limits: &Limits,
    mut now: Instant,
    deadline: Instant,
    inflight: &Cell<usize>,
) -> HeadRead {
    let mut head_deadline: Option<Instant> = None;
    let hl = crate::http::Limits {
        max_header_bytes: limits.max_header_bytes,
        max_headers: limits.max_headers,
    };
    loop {
        if !c.b.rbuf.is_empty() {
            match c.b.head.parse(&c.b.rbuf, &hl) {
                Ok(Status::Complete(_)) => {
                    // `//` or percent-encoding: one normal path for every later stage.
                    c.b.head.normalize_path(&mut c.b.rbuf);
                    return HeadRead::Ready;
                }
                Ok(Status::Partial) => {}
                Err(e) => return HeadRead::Fail(e.status(), error_text(&e)),
            }
        }
        if c.b.rbuf.len() == c.b.rbuf.capacity() {
            c.b.rbuf.reserve(c.b.rbuf.capacity().max(READ_BUF));
        }
        let len = c.b.rbuf.len();
        let cap = c.b.rbuf.capacity();
        let buf = std::mem::take(&mut c.b.rbuf).slice_mut(len..cap);
        let (res, buf) = if len == 0 {
            // Waiting for a request: hold the buffers for the grace period only.
            let left = deadline.saturating_duration_since(now);
            if left.is_zero() {
                return HeadRead::Closed;
            }
            let grace = IDLE_GRACE.min(left);
            let mut read = std::pin::pin!(c.stream.cancelable_read(buf, c.canceller.handle()));
            let timer = monoio::time::sleep_until((now + grace).into());
            monoio::select! {
                r = &mut read => r,
                _ = timer => {
                    c.canceller = std::mem::take(&mut c.canceller).cancel();
                    read.await
                }
            }
        } else {
            // Part of a head is in: a request in flight, which a drain waits for (as nginx
            // does), up to the header timeout.
            let _counted = InFlight::new(inflight);
            now = Instant::now();
            let d = *head_deadline.get_or_insert_with(|| now + limits.header_timeout);
            let mut read = std::pin::pin!(c.stream.cancelable_read(buf, c.canceller.handle()));
            let timer = monoio::time::sleep_until(d.into());
            monoio::select! {
                r = &mut read => r,
                _ = timer => {
                    // The read is cancelled and awaited, so the part of the head that came
                    // stays in `rbuf`: the 408 is counted and logged with its method, path
                    // and request id, as the other refusals are.
                    c.canceller = std::mem::take(&mut c.canceller).cancel();
                    let (_, buf) = read.await;
                    c.b.rbuf = buf.into_inner();
                    return HeadRead::Fail(408, "Request Timeout");
                }
            }
        };
        c.b.rbuf = buf.into_inner();
        match res {
            Ok(0) => return HeadRead::Closed,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => {
                return if Instant::now() >= deadline {
                    HeadRead::Closed
                } else {
                    HeadRead::Park
                };
            }
            Err(_) => return HeadRead::Closed,
        }
    }
}

/// [`InFlight`] holding its worker (it lives beside uses that move the worker's `Rc`).
struct OwnedInFlight(Rc<Worker>);

impl OwnedInFlight {
    fn new(w: Rc<Worker>) -> Self {
        w.inflight.set(w.inflight.get() + 1);
        OwnedInFlight(w)
    }
}

impl Drop for OwnedInFlight {
    fn drop(&mut self) {
        self.0.inflight.set(self.0.inflight.get() - 1);
    }
}

/// Counts as in flight (for the drain) while it lives.
struct InFlight<'a>(&'a Cell<usize>);

impl<'a> InFlight<'a> {
    fn new(n: &'a Cell<usize>) -> Self {
        n.set(n.get() + 1);
        InFlight(n)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

fn error_text(e: &HttpError) -> &'static str {
    match e {
        HttpError::BadRequest(m) => m,
        HttpError::HeadTooLarge => "Request Header Fields Too Large",
        HttpError::TooManyHeaders => "Request Header Fields Too Large: too many headers",
        HttpError::VersionNotSupported => "HTTP Version Not Supported",
    }
}

/// Handles one parsed request; returns whether the connection stays open, and when the
/// request ended.
async fn handle<S: ClientIo>(
    w: &Rc<Worker>,
    gw: &Arc<Gateway>,
    c: &mut Conn<S>,
) -> (bool, Instant) {
    let t0 = Instant::now();
    let head_len = c.b.head.head_len;
    c.consumed = head_len;
    c.chunked_end = None;
    c.upstream_by = None;
    set_request_id(w, c);
    let limits = &gw.config.server.limits;
    let method = c.b.head.method;
    let method_str = method_label(method);
    c.b.extra.clear();
    let out = route_and_run(w, gw, c, limits).await;
    let route_id = out.1;
    let out = out.0;
    // Extra headers belong to this request's response only (not to a later error answer).
    c.b.extra.clear();
    let end = Instant::now();
    let dur = end.saturating_duration_since(t0);
    let labels = match route_id {
        Some(id) => &gw.config.routes.route(id).labels,
        None => &w.unmatched.0,
    };
    if let Ok(mut m) = w.metrics.lock() {
        m.request_for(labels, method_str, out.status, dur);
        match std::mem::take(&mut c.cache_event) {
            cached::EVENT_HIT => m.cache_hits += 1,
            cached::EVENT_MISS => m.cache_misses += 1,
            _ => {}
        }
    }
    if let Some(log) = &w.log {
        let route = route_id.map(|id| gw.config.routes.route(id));
        if route.map(|r| r.access_log).unwrap_or(true) {
            write_log_line(w, &mut log.borrow_mut(), c, route, &out, dur);
        }
    }
    (out.keep_alive, end)
}

/// The request id: the client's when it is sane (1–128 visible characters), else a new one.
fn set_request_id<S: ClientIo>(w: &Worker, c: &mut Conn<S>) {
    c.reqid_len = match c.b.head.header_kind(&c.b.rbuf, HeaderKind::XRequestId) {
        Some(v) if !v.is_empty() && v.len() <= 128 && v.iter().all(|b| b.is_ascii_graphic()) => {
            c.reqid[..v.len()].copy_from_slice(v);
            v.len()
        }
        _ => w.new_request_id(&mut c.reqid),
    };
}

fn method_label(m: Method) -> &'static str {
    match m {
        Method::Other => "OTHER",
        m => m.as_str(),
    }
}

async fn route_and_run<S: ClientIo>(
    w: &Rc<Worker>,
    gw: &Arc<Gateway>,
    c: &mut Conn<S>,
    limits: &Limits,
) -> (Outcome, Option<u32>) {
    let path_b = c.b.head.slice(&c.b.rbuf, c.b.head.path);
    let (Ok(path), Ok(method_str)) = (
        std::str::from_utf8(path_b),
        std::str::from_utf8(c.b.head.slice(&c.b.rbuf, c.b.head.method_range)),
    ) else {
        return (
            reject(w, c, 400, "Bad Request: path is not UTF-8", false).await,
            None,
        );
    };
    let host = c.b.head.host.map(|r| c.b.head.slice(&c.b.rbuf, r));
    let m = gw.config.routes.find(host, method_str, path, &mut c.params);
    // A preflight matched by a route without `cors` (another API's catch-all, say) while the
    // method it asks about has a route with `cors`: that API answers it.
    let cors_preflight_elsewhere = |gw: &Gateway, c: &mut Conn<S>, id: u32| {
        gw.config.traffic.routes[id as usize].cors.is_none()
            && traffic::is_preflight(c)
            && traffic::preflight_route(gw, c).is_some_and(|(p, _)| p != id)
    };
    let id = match m {
        RouteMatch::Found(id) if !cors_preflight_elsewhere(gw, c, id) => id,
        RouteMatch::Found(_) | RouteMatch::NotFound | RouteMatch::MethodNotAllowed
            if traffic::is_preflight(c) && traffic::preflight_route(gw, c).is_some() =>
        {
            // A CORS preflight for a path of an API with `cors`: answered by the gateway
            // (counted under the route when the path has one).
            let (id, routed) = traffic::preflight_route(gw, c).unwrap_or_default();
            let out = match traffic::before(w, gw, c, id, limits).await {
                Some(out) => out,
                None => traffic::answer_preflight_denied(w, c).await,
            };
            return (out, routed.then_some(id));
        }
        RouteMatch::Found(id) => id,
        // No route: 404, or 405 when the path has routes under other methods. Both carry the
        // CORS headers of the API the request addressed, as the gateway's other refusals do.
        RouteMatch::NotFound | RouteMatch::MethodNotAllowed => {
            let id = if m == RouteMatch::NotFound {
                None
            } else {
                path_route(gw, c)
            };
            traffic::push_refusal_cors(gw, c, id);
            if gw.config.traffic.any {
                if let Some(out) = traffic::unrouted_refused(w, gw, c).await {
                    return (out, None);
                }
            }
            let (st, msg) = if m == RouteMatch::NotFound {
                (404, "Not Found")
            } else {
                let allow = allow_header(gw, c);
                c.b.extra.extend_from_slice(&allow);
                (405, "Method Not Allowed")
            };
            let keep = body_skippable(c);
            return (reject(w, c, st, msg, keep).await, id);
        }
    };
    // Body size limit once the route is known (its CORS headers and labels go on the 413),
    // before anything reads the body.
    if let BodyKind::Length(n) = c.b.head.body {
        if n > limits.max_body_bytes {
            traffic::push_refusal_cors(gw, c, Some(id));
            return (
                reject(w, c, 413, "Request Entity Too Large", false).await,
                Some(id),
            );
        }
    }
    let route: &Route = gw.config.routes.route(id);
    c.gateway_cors = gw.config.traffic.routes[id as usize].cors.is_some();
    // Traffic control, in pipeline order: WAF and CORS preflight, (auth,) throttles and quotas.
    if let Some(out) = traffic::before(w, gw, c, id, limits).await {
        return (out, Some(id));
    }
    if let Integration::WebSocket(api) = &route.integration {
        // A handshake refused anyway (not an upgrade, a bad key, an Origin not allowed) is
        // refused before it can call an authorizer or spend a throttle token or quota.
        let allowed = &api.settings.allowed_origins;
        if let Err(r) = crate::ws::handshake::validate(&c.b.head, &c.b.rbuf, allowed) {
            return (reject_ws(w, c, r.status, r.message).await, Some(id));
        }
    }
    c.principal = None;
    c.api_key = None;
    c.auth_ctx = None;
    if route.auth.active() {
        if let Err(out) = auth_stage::run(w, gw, c, route, id).await {
            return (out, Some(id));
        }
    }
    if let Some(out) = traffic::throttle(w, gw, c, id).await {
        return (out, Some(id));
    }
    if let Some(schema) = &route.validate {
        if let Err(out) = validate_stage::run(w, c, schema, limits).await {
            return (out, Some(id));
        }
    }
    if let Some(m) = &route.request_mapping {
        // A value the mapping cannot send (a path parameter decoding to a control character
        // for a header) is refused here, before the cache and the integration.
        if let Some(msg) = m.refusal(&map_ctx!(c)) {
            let keep = body_skippable(c);
            return (reject(w, c, 400, &msg, keep).await, Some(id));
        }
    }
    let out = match &route.integration {
        Integration::Mock(mock) => {
            let keep = body_skippable(c);
            respond_mock(w, c, mock, route.response_mapping.as_deref(), keep).await
        }
        Integration::Http { upstream, path } => match &route.cache {
            // A WebSocket upgrade is never a cache lookup.
            Some(pol) if !c.b.head.upgrade_websocket => {
                cached::serve(w, gw, c, route, pol, *upstream, path.as_ref()).await
            }
            _ => proxy::proxy(w, gw, c, route, *upstream, path.as_ref(), None).await,
        },
        Integration::WebSocket(api) => ws_handshake(w, gw, c, api).await,
    };
    (out, Some(id))
}

/// The `Allow` header of a 405 (RFC 9110 15.5.6): the methods the path's routes accept.
/// For a 405: a route of the request's path (under another method), so the answer is counted
/// and logged under the path's API, stage and route rather than as unrouted.
fn path_route<S: ClientIo>(gw: &Gateway, c: &mut Conn<S>) -> Option<u32> {
    let head = &c.b.head;
    let path = std::str::from_utf8(head.slice(&c.b.rbuf, head.path)).ok()?;
    let host = head.host.map(|r| head.slice(&c.b.rbuf, r));
    gw.config.routes.path_route(host, path, &mut c.params)
}

fn allow_header<S: ClientIo>(gw: &Gateway, c: &Conn<S>) -> Vec<u8> {
    let head = &c.b.head;
    let path = std::str::from_utf8(head.slice(&c.b.rbuf, head.path)).unwrap_or("");
    let host = head.host.map(|r| head.slice(&c.b.rbuf, r));
    let mut h = b"allow: ".to_vec();
    for (i, m) in gw
        .config
        .routes
        .allowed_methods(host, path)
        .iter()
        .enumerate()
    {
        if i > 0 {
            h.extend_from_slice(b", ");
        }
        h.extend_from_slice(m);
    }
    h.extend_from_slice(b"\r\n");
    h
}

/// The opening handshake of a WebSocket API route (validation and `$connect`).
async fn ws_handshake<S: ClientIo>(
    w: &Rc<Worker>,
    gw: &Arc<Gateway>,
    c: &mut Conn<S>,
    api: &Arc<crate::ws::WsApi>,
) -> Outcome {
    use crate::ws::api::Handshake;
    let client = crate::ws::api::ClientInfo {
        peer: c.peer,
        tls: S::TLS,
        xfcc: c.stream.xfcc(),
        principal: c.principal.as_deref(),
        api_key: c.api_key.as_deref(),
        request_id: &c.reqid[..c.reqid_len],
    };
    let hs = crate::ws::api::handshake(gw, api, &c.b.head, &c.b.rbuf, &client).await;
    match hs {
        Handshake::Accept(head, mut accepted) => {
            accepted.register(&w.shared);
            c.b.out.clear();
            c.b.out.extend_from_slice(&head);
            if !write_out(c).await {
                accepted.abandon(&w.shared, &**w).await;
                return Outcome {
                    status: 499,
                    keep_alive: false,
                    upstream: None,
                };
            }
            c.takeover = Some(crate::ws::Takeover::Api(accepted));
            Outcome {
                status: 101,
                keep_alive: false,
                upstream: None,
            }
        }
        Handshake::Refuse(status, msg) => {
            // Every integration target at `max_connections`: the client may try again soon,
            // as on HTTP routes.
            if status == 503 {
                c.b.extra.extend_from_slice(b"retry-after: 1\r\n");
            }
            reject_ws(w, c, status, msg).await
        }
        Handshake::RefuseWith(status, body) => {
            if body.is_empty() && status != 304 {
                // The status's own words: a 401 or 429 from `$connect` is no "Forbidden".
                let msg = format!("{}: refused by $connect", encode::reason(status));
                return reject(w, c, status, &msg, false).await;
            }
            c.b.out.clear();
            encode::push_status_line(&mut c.b.out, status);
            // A 304 has no body (RFC 9110 15.4.5).
            let body = if status == 304 { &[][..] } else { &body[..] };
            if status != 304 {
                c.b.out.extend_from_slice(b"content-length: ");
                encode::push_u64(&mut c.b.out, body.len() as u64);
                c.b.out.extend_from_slice(b"\r\n");
            }
            push_common(w, c, false);
            c.b.out.extend_from_slice(body);
            write_out(c).await;
            Outcome {
                status,
                keep_alive: false,
                upstream: None,
            }
        }
    }
}

/// Refuses a WebSocket handshake; a 426 names the version and protocol to use (RFC 6455 4.4).
async fn reject_ws<S: ClientIo>(
    w: &Rc<Worker>,
    c: &mut Conn<S>,
    status: u16,
    msg: &str,
) -> Outcome {
    if status != 426 {
        return reject(w, c, status, msg, false).await;
    }
    let mut body = Vec::with_capacity(msg.len() + 16);
    body.extend_from_slice(b"{\"message\":\"");
    push_json_str(&mut body, msg.as_bytes());
    body.extend_from_slice(b"\"}");
    c.b.out.clear();
    encode::push_status_line(&mut c.b.out, status);
    c.b.out.extend_from_slice(
        b"upgrade: websocket\r\nsec-websocket-version: 13\r\ncontent-type: application/json\r\ncontent-length: ",
    );
    encode::push_u64(&mut c.b.out, body.len() as u64);
    c.b.out.extend_from_slice(b"\r\n");
    push_common(w, c, false);
    c.b.out.extend_from_slice(&body);
    write_out(c).await;
    Outcome {
        status,
        keep_alive: false,
        upstream: None,
    }
}

/// Whether the request's body is already fully buffered (so it can be skipped and the
/// connection kept); marks it consumed when so.
fn body_skippable<S: ClientIo>(c: &mut Conn<S>) -> bool {
    let avail = (c.b.rbuf.len() - c.b.head.head_len) as u64;
    match c.b.head.body {
        BodyKind::None => true,
        BodyKind::Length(n) if n <= avail => {
            c.consumed = c.b.head.head_len + n as usize;
            true
        }
        BodyKind::Chunked => match c.chunked_end {
            Some(end) => {
                c.consumed = end;
                true
            }
            None => false,
        },
        _ => false,
    }
}

/// Writes `x-request-id`, `date` and the connection header, then the blank line.
fn push_common<S: ClientIo>(w: &Worker, c: &mut Conn<S>, keep: bool) {
    c.b.out.extend_from_slice(&c.b.extra);
    encode::push_header(&mut c.b.out, b"x-request-id", &c.reqid[..c.reqid_len]);
    encode::push_header(&mut c.b.out, b"date", w.date.borrow_mut().get());
    if !keep {
        c.b.out.extend_from_slice(b"connection: close\r\n");
    } else if c.b.head.minor_version == 0 {
        c.b.out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    c.b.out.extend_from_slice(b"\r\n");
}

async fn respond_mock<S: ClientIo>(
    w: &Rc<Worker>,
    c: &mut Conn<S>,
    mock: &crate::config::MockResponse,
    rmap: Option<&crate::policy::mapping::HeaderMapping>,
    keep: bool,
) -> Outcome {
    let keep = keep && w.keep_alive(&c.b.head);
    c.b.out.clear();
    c.b.out.extend_from_slice(&mock.head);
    if let Some(m) = rmap {
        // The mapped names were left out of the pre-encoded head when the config loaded.
        m.push(&map_ctx!(c), &mut c.b.out);
    }
    push_common(w, c, keep);
    if c.b.head.method != Method::Head {
        c.b.out.extend_from_slice(&mock.body);
    }
    let ok = write_out(c).await;
    Outcome {
        status: mock.status,
        keep_alive: keep && ok,
        upstream: None,
    }
}

/// Answers with a gateway error `{"message": msg}`.
async fn reject<S: ClientIo>(
    w: &Rc<Worker>,
    c: &mut Conn<S>,
    status: u16,
    msg: &str,
    keep: bool,
) -> Outcome {
    let keep = keep && w.keep_alive(&c.b.head);
    let ok = write_error(w, c, status, msg, keep).await;
    Outcome {
        status,
        keep_alive: keep && ok,
        upstream: None,
    }
}

/// Encodes and writes a JSON error; returns whether the write succeeded.
async fn write_error<S: ClientIo>(
    w: &Rc<Worker>,
    c: &mut Conn<S>,
    status: u16,
    msg: &str,
    keep: bool,
) -> bool {
    c.b.out.clear();
    encode::push_status_line(&mut c.b.out, status);
    c.b.out
        .extend_from_slice(b"content-type: application/json\r\ncontent-length: ");
    let mut body = Vec::with_capacity(msg.len() + 16);
    body.extend_from_slice(b"{\"message\":\"");
    push_json_str(&mut body, msg.as_bytes());
    body.extend_from_slice(b"\"}");
    encode::push_u64(&mut c.b.out, body.len() as u64);
    c.b.out.extend_from_slice(b"\r\n");
    push_common(w, c, keep);
    if c.b.head.method != Method::Head || c.b.head.head_len == 0 {
        c.b.out.extend_from_slice(&body);
    }
    write_out(c).await
}

/// Why [`fill_rbuf`] stopped short.
enum FillError {
    /// The deadline passed first.
    TimedOut,
    /// The client closed or the read failed.
    Closed,
}

/// Reads from the client until `rbuf` holds `want` bytes (or more), within `timeout`, first
/// answering `Expect: 100-continue` (once) when the body is still to come. Reads go into a
/// separate buffer and are appended: a read abandoned at the deadline takes its buffer with it,
/// and the head in `rbuf` must stay for the answer and the access log.
async fn fill_rbuf<S: ClientIo>(
    c: &mut Conn<S>,
    want: usize,
    timeout: Duration,
) -> Result<(), FillError> {
    if c.b.rbuf.len() >= want {
        return Ok(());
    }
    let deadline = Instant::now() + timeout;
    let mut tmp = Vec::with_capacity(READ_BUF.max((want - c.b.rbuf.len()).min(1 << 16)));
    c.b.rbuf.reserve(want - c.b.rbuf.len());
    while c.b.rbuf.len() < want {
        read_body(c, deadline, &mut tmp).await?;
        c.b.rbuf.extend_from_slice(&tmp);
    }
    Ok(())
}

/// One read of request body bytes into `tmp` (replacing its contents; at most its capacity),
/// by `deadline`, first answering `Expect: 100-continue` when it was not yet. On a timeout
/// `tmp` is left empty without capacity (the abandoned read took it).
async fn read_body<S: ClientIo>(
    c: &mut Conn<S>,
    deadline: Instant,
    tmp: &mut Vec<u8>,
) -> Result<(), FillError> {
    if c.b.head.expect_continue {
        let (res, _) = c
            .stream
            .write_all(&b"HTTP/1.1 100 Continue\r\n\r\n"[..])
            .await;
        if res.is_err() {
            return Err(FillError::Closed);
        }
        c.b.head.expect_continue = false;
    }
    let mut buf = std::mem::take(tmp);
    buf.clear();
    match monoio::time::timeout_at(deadline.into(), c.stream.read(buf)).await {
        Err(_) => Err(FillError::TimedOut),
        Ok((res, buf)) => {
            *tmp = buf;
            match res {
                Ok(0) | Err(_) => Err(FillError::Closed),
                Ok(_) => Ok(()),
            }
        }
    }
}

/// Writes `c.b.out` to the client.
async fn write_out<S: ClientIo>(c: &mut Conn<S>) -> bool {
    let buf = std::mem::take(&mut c.b.out);
    let (res, buf) = c.stream.write_all(buf).await;
    c.b.out = buf;
    res.is_ok()
}

fn write_log_line<S: ClientIo>(
    w: &Worker,
    log: &mut LocalLog,
    c: &Conn<S>,
    route: Option<&Route>,
    out: &Outcome,
    dur: Duration,
) {
    use std::io::Write as _;
    let b = log.buf();
    log_line_start(w, b, &c.reqid[..c.reqid_len], c.peer.ip(), S::TLS);
    push_json_str(b, c.b.head.slice(&c.b.rbuf, c.b.head.method_range));
    b.extend_from_slice(b"\",\"path\":\"");
    push_json_str(b, c.b.head.slice(&c.b.rbuf, c.b.head.path));
    log_status_and_duration(b, out.status, dur);
    if let Some(r) = route {
        log_route(b, &r.api, &r.stage, &r.key);
    }
    log_identity(b, c.principal.as_deref(), c.api_key.as_deref());
    if let Some(u) = out.upstream {
        b.extend_from_slice(b",\"upstream\":\"");
        let _ = write!(b, "{u}");
        b.push(b'"');
    }
    if let Some(crate::ws::Takeover::Api(a)) = &c.takeover {
        // An accepted WebSocket API handshake: the connection's first event, tied to its
        // later MESSAGE and DISCONNECT lines by the id.
        b.extend_from_slice(b",\"event\":\"CONNECT\",\"connection_id\":\"");
        b.extend_from_slice(crate::ws::api::id_string(a.id()).as_bytes());
        b.push(b'"');
    }
    b.extend_from_slice(b"}\n");
    log.line_done();
}

/// The access log line of a request refused before its head could be served (400, 408, 431):
/// the method label and the request-target as sent on the request line without its query
/// and userinfo (cut at 2 KiB), no route and no duration.
fn write_refused_log_line<S: ClientIo>(w: &Worker, log: &mut LocalLog, c: &Conn<S>, status: u16) {
    let line_end =
        c.b.rbuf
            .iter()
            .position(|&b| b == b'\n')
            .unwrap_or(c.b.rbuf.len());
    let (method, target) = refused_line_parts(&c.b.rbuf[..line_end]);
    let b = log.buf();
    log_line_start(w, b, &c.reqid[..c.reqid_len], c.peer.ip(), S::TLS);
    push_json_str(b, method);
    b.extend_from_slice(b"\",\"path\":\"");
    let (before, after) = loggable_target(target);
    push_json_str(b, &before[..before.len().min(2048)]);
    push_json_str(b, &after[..after.len().min(2048 - before.len().min(2048))]);
    log_status_and_duration(b, status, Duration::ZERO);
    b.extend_from_slice(b"}\n");
    log.line_done();
}

/// The method label and the request-target of a refused request line. The fields are split
/// at any whitespace, as RFC 9112 section 3 lets a lenient reader do, so a query sent after a
/// TAB does not end up in the method. The method is the first field when it is a token of at
/// most 32 bytes (`get`, `PROPFIND`), else `OTHER` (the metrics keep their bounded label).
fn refused_line_parts(line: &[u8]) -> (&[u8], &[u8]) {
    let mut fields = line
        .split(|b| matches!(b, b' ' | b'\t' | b'\x0b' | b'\x0c' | b'\r'))
        .filter(|f| !f.is_empty());
    let method = match fields.next() {
        Some(m) if m.len() <= 32 && m.iter().all(|&b| crate::http::chunked::is_tchar(b)) => m,
        _ => b"OTHER",
    };
    (method, fields.next().unwrap_or(b""))
}

/// A refused request-target as it may be logged, in two parts to write one after the other:
/// without its query and fragment (where `access_token=`, SigV4's `X-Amz-Signature=` or a
/// request authorizer's `query.NAME` source travel; a served request's `path` has no query
/// either) and, in an absolute-form target, without the userinfo before `@`.
fn loggable_target(target: &[u8]) -> (&[u8], &[u8]) {
    let end = target
        .iter()
        .position(|&b| b == b'?' || b == b'#')
        .unwrap_or(target.len());
    let t = &target[..end];
    if t.first() == Some(&b'/') {
        // Origin form: no userinfo.
        return (t, b"");
    }
    // Absolute form (`scheme:` then any `/` or `\\`, as URL parsers read them) or authority
    // form: the userinfo ends at the last `@` before the path.
    let scheme_end = t
        .iter()
        .position(|&b| b == b':')
        .filter(|&c| {
            c > 0
                && t[..c]
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
        })
        .filter(|&c| matches!(t.get(c + 1), Some(b'/' | b'\\')));
    let auth_start = scheme_end.map_or(0, |c| {
        c + 1
            + t[c + 1..]
                .iter()
                .take_while(|&&b| b == b'/' || b == b'\\')
                .count()
    });
    let auth_end = t[auth_start..]
        .iter()
        .position(|&b| b == b'/' || b == b'\\')
        .map_or(t.len(), |j| auth_start + j);
    match t[auth_start..auth_end].iter().rposition(|&b| b == b'@') {
        Some(at) => (&t[..auth_start], &t[auth_start + at + 1..]),
        None => (t, b""),
    }
}

/// An access log line up to the method's value: `time`, `request_id`, `remote`, `scheme`.
fn log_line_start(w: &Worker, b: &mut Vec<u8>, request_id: &[u8], ip: std::net::IpAddr, tls: bool) {
    b.extend_from_slice(b"{\"time\":\"");
    b.extend_from_slice(w.date.borrow_mut().get_rfc3339());
    b.extend_from_slice(b"\",\"request_id\":\"");
    push_json_str(b, request_id);
    b.extend_from_slice(b"\",\"remote\":\"");
    encode::push_ip(b, ip);
    b.extend_from_slice(if tls {
        b"\",\"scheme\":\"https\",\"method\":\""
    } else {
        b"\",\"scheme\":\"http\",\"method\":\""
    });
}

/// `status` and `duration_ms` (three decimals), after the path's value.
fn log_status_and_duration(b: &mut Vec<u8>, status: u16, dur: Duration) {
    b.extend_from_slice(b"\",\"status\":");
    encode::push_u64(b, status as u64);
    b.extend_from_slice(b",\"duration_ms\":");
    let us = dur.as_micros() as u64;
    encode::push_u64(b, us / 1000);
    b.push(b'.');
    let frac = us % 1000;
    b.push(b'0' + (frac / 100) as u8);
    b.push(b'0' + (frac / 10 % 10) as u8);
    b.push(b'0' + (frac % 10) as u8);
}

/// `api`, `stage` and `route`.
fn log_route(b: &mut Vec<u8>, api: &str, stage: &str, key: &str) {
    b.extend_from_slice(b",\"api\":\"");
    push_json_str(b, api.as_bytes());
    b.extend_from_slice(b"\",\"stage\":\"");
    push_json_str(b, stage.as_bytes());
    b.extend_from_slice(b"\",\"route\":\"");
    push_json_str(b, key.as_bytes());
    b.push(b'"');
}

/// `principal` and `api_key` (the key's name), when known.
fn log_identity(b: &mut Vec<u8>, principal: Option<&str>, api_key: Option<&str>) {
    for (k, v) in [
        (&b",\"principal\":\""[..], principal),
        (b",\"api_key\":\"", api_key),
    ] {
        if let Some(v) = v {
            b.extend_from_slice(k);
            push_json_str(b, v.as_bytes());
            b.push(b'"');
        }
    }
}

/// A WebSocket API connection's messages and disconnect: counted under their route key with
/// the event as the method (`MESSAGE`, `DISCONNECT`), and logged like requests, with the
/// handshake's path, client and identity, plus `event`, `connection_id` and, for a disconnect,
/// `close_code` and `close_reason`.
impl crate::ws::api::Events for Worker {
    fn ws_event(
        &self,
        api: &crate::ws::WsApi,
        who: &crate::ws::api::Who,
        ev: &crate::ws::api::ConnEvent<'_>,
    ) {
        if let (Some(labels), Ok(mut m)) = (ev.labels, self.metrics.lock()) {
            m.request_for(labels, ev.kind, ev.status, ev.duration);
        }
        let Some(log) = self.log.as_ref().filter(|_| api.access_log) else {
            return;
        };
        let mut log = log.borrow_mut();
        let b = log.buf();
        log_line_start(self, b, ev.request_id.as_bytes(), who.peer.ip(), who.tls);
        b.extend_from_slice(ev.kind.as_bytes());
        b.extend_from_slice(b"\",\"path\":\"");
        push_json_str(b, who.path.as_bytes());
        log_status_and_duration(b, ev.status, ev.duration);
        log_route(b, &api.api, &api.stage, ev.route);
        log_identity(b, who.principal.as_deref(), who.api_key.as_deref());
        b.extend_from_slice(b",\"event\":\"");
        b.extend_from_slice(ev.kind.as_bytes());
        b.extend_from_slice(b"\",\"connection_id\":\"");
        b.extend_from_slice(crate::ws::api::id_string(ev.connection_id).as_bytes());
        b.push(b'"');
        if let Some((code, reason)) = ev.close {
            b.extend_from_slice(b",\"close_code\":");
            encode::push_u64(b, code as u64);
            b.extend_from_slice(b",\"close_reason\":\"");
            push_json_str(b, reason.as_bytes());
            b.push(b'"');
        }
        b.extend_from_slice(b"}\n");
        log.line_done();
    }
}

#[cfg(test)]
mod tests {
    use super::{loggable_target, refused_line_parts};

    fn joined(t: &[u8]) -> String {
        let (a, b) = loggable_target(t);
        String::from_utf8([a, b].concat()).unwrap()
    }

    #[test]
    fn refused_targets_are_logged_without_query_fragment_or_userinfo() {
        assert_eq!(joined(b"/a/../b"), "/a/../b");
        assert_eq!(joined(b"/a?access_token=s"), "/a");
        assert_eq!(joined(b"/a#f?x"), "/a");
        assert_eq!(joined(b"?x"), "");
        assert_eq!(joined(b"http://u:p@h:8/x?y"), "http://h:8/x");
        assert_eq!(joined(b"http://u@h"), "http://h");
        assert_eq!(joined(b"http://h/a@b"), "http://h/a@b");
        assert_eq!(joined(b""), "");
        // Backslashes read as slashes, the authority form, no `//`.
        assert_eq!(joined(b"http:/\\user:PW@x/hello"), "http:/\\x/hello");
        assert_eq!(joined(b"http:\\\\u:p@h\\a"), "http:\\\\h\\a");
        assert_eq!(joined(b"u:p@h:443"), "h:443");
        assert_eq!(joined(b"mailto:u@h"), "h");
    }

    #[test]
    fn refused_lines_split_at_any_whitespace() {
        let parts = |l: &[u8]| {
            let (m, t) = refused_line_parts(l);
            (
                String::from_utf8(m.to_vec()).unwrap(),
                String::from_utf8(t.to_vec()).unwrap(),
            )
        };
        let p = |m: &str, t: &str| (m.to_string(), t.to_string());
        assert_eq!(
            parts(b"GET\t/a?api_key=S HTTP/1.1\r"),
            p("GET", "/a?api_key=S")
        );
        assert_eq!(parts(b"GET\x0b/a?k=S\x0bHTTP/1.1"), p("GET", "/a?k=S"));
        assert_eq!(parts(b"get  /a HTTP/1.1"), p("get", "/a"));
        assert_eq!(parts(b"G(T /a HTTP/1.1"), p("OTHER", "/a"));
        assert_eq!(parts(&[b'A'; 33]), p("OTHER", ""));
        assert_eq!(parts(b""), p("OTHER", ""));
    }
}
