//! WebSocket APIs: the `$connect` handshake, the per-connection loop (messages routed by
//! `route_selection` to their integration, one at a time so they arrive in order; the answer
//! goes back to that client), `$disconnect` once on every kind of close, and the
//! `@connections` management API.
//!
//! Each connection reads frames while a message call runs: pings are answered and a close is
//! seen at once, and the messages read meanwhile wait their turn ([`MAX_WAITING`]).
//!
//! A drain (SIGTERM) reaches each connection from its worker's mailbox task: the connection
//! stops reading, lets a message call in flight finish and its reply go out, closes with 1001
//! and calls `$disconnect`. Whatever is still running at [`drain_stop`] (a call, a write to a
//! client that does not read) is dropped then, so `$disconnect` is always called before the
//! drain ends; a client cut between frames still gets the 1001 close.
//!
//! Connections live on worker threads. The admin thread finds a connection's worker in the
//! [`Registry`] and posts to that worker's mailbox (a crossbeam channel), then rings the
//! mailbox's bell (an eventfd the worker's io driver waits on); the worker's mailbox task wakes,
//! and hands each command to the connection's writer queue, in the order they were posted.
//!
//! With `[cluster]`, each connection is also registered in Redis under its id, and a
//! `@connections` call for an id this node does not hold goes to the node that does
//! ([`crate::cluster`]). Ids start from a random base per process, so nodes do not collide.

use super::client;
use super::frame::{self, code, Decoder, Event};
use super::{WsApi, WsRoute, WsSettings, WsTarget};
use crate::config::raw::{RawApi, RawIntegration, RawStage};
use crate::config::{ConfigError, Source, UpstreamConfig};
use crate::gateway::{Gateway, Shared};
use crate::http::{HeaderKind, RequestHead};
use ahash::AHashMap;
use bytes::Bytes;
use futures_channel::{mpsc, oneshot};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncWriteRent, AsyncWriteRentExt, CancelableAsyncReadRent, Splitable};
use std::cell::RefCell;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Largest `$connect` or `$disconnect` answer accepted. A message route's answer goes to the
/// client as one message: it may be at most the API's `max_message_bytes` (and [`MAX_QUEUED`]).
const MAX_ANSWER: usize = 10 << 20;
/// Bytes queued toward one client before it counts as not reading (the connection closes).
const MAX_QUEUED: usize = 8 << 20;
/// A write to the client that takes longer than this closes the connection.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long frames still queued toward a client are written after its connection ended.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How long a connection cut by the drain's stop time may take to write its close frame.
const CUT_CLOSE_WRITE: Duration = Duration::from_millis(100);
/// Messages read while a call runs, waiting their turn: past this many (or [`MAX_WAITING_BYTES`])
/// the connection stops reading until the calls catch up (the client's sends then block).
const MAX_WAITING: usize = 16;
/// Bytes of the messages waiting their turn past which reading stops (one message always fits).
const MAX_WAITING_BYTES: usize = 1 << 20;

/// A wake-up between two futures of one connection's task: [`Signal::notify`] sets it,
/// [`Signal::wait`] returns once it is set and clears it. One waiter.
#[derive(Default)]
struct Signal {
    set: std::cell::Cell<bool>,
    waker: std::cell::Cell<Option<std::task::Waker>>,
}

impl Signal {
    fn notify(&self) {
        self.set.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    fn wait(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.set.replace(false) {
                std::task::Poll::Ready(())
            } else {
                self.waker.set(Some(cx.waker().clone()));
                std::task::Poll::Pending
            }
        })
    }
}

/// Compiles one stage of a WebSocket API.
#[allow(clippy::too_many_arguments)]
pub(crate) fn compile(
    src: &Source,
    ai: usize,
    api: &RawApi,
    api_name: &Arc<str>,
    stage_name: &Arc<str>,
    stage: &RawStage,
    upstreams: &[UpstreamConfig],
    settings: Arc<WsSettings>,
) -> Result<Arc<WsApi>, ConfigError> {
    let selection = match &api.route_selection {
        None => super::parse_selection("$request.body.action").expect("valid"),
        Some(s) => super::parse_selection(s.get_ref())
            .map_err(|m| src.err(s.span(), &format!("apis[{ai}].route_selection"), m))?,
    };
    let mut routes = AHashMap::new();
    for (ri, r) in api.routes.iter().enumerate() {
        let rkey = format!("apis[{ai}].routes[{ri}].route");
        let ikey = format!("apis[{ai}].routes[{ri}].integration");
        let key = r.route.get_ref().trim();
        if key.is_empty() || key.len() > 128 || key.contains(char::is_whitespace) {
            return Err(src.err(
                r.route.span(),
                &rkey,
                format!("`{key}` is not a WebSocket route key (`$connect`, `$disconnect`, `$default` or a value of the selection field)"),
            ));
        }
        if key.starts_with('$') && !matches!(key, "$connect" | "$disconnect" | "$default") {
            return Err(src.err(
                r.route.span(),
                &rkey,
                format!("`{key}`: the reserved route keys are $connect, $disconnect and $default"),
            ));
        }
        let ierr = |m: String| src.err(r.integration.span(), &ikey, m);
        let target = match r.integration.get_ref() {
            RawIntegration::Http { upstream, path } => {
                let up =
                    crate::config::subst_stage_vars(upstream, &stage.variables).map_err(ierr)?;
                let idx = upstreams.iter().position(|u| u.name == up).ok_or_else(|| {
                    ierr(format!("upstream `{up}` is not defined in [[upstreams]]"))
                })?;
                let p = match path {
                    None => "/".to_string(),
                    Some(p) => {
                        crate::config::subst_stage_vars(p, &stage.variables).map_err(ierr)?
                    }
                };
                if !p.starts_with('/') || p.contains(['{', '}']) {
                    return Err(ierr(format!(
                        "integration path `{p}` must start with `/` and have no `{{param}}` (WebSocket routes have no path parameters)"
                    )));
                }
                if p.chars().any(|c| !c.is_ascii_graphic() || c == '#') {
                    return Err(ierr(format!(
                        "integration path `{}` holds a space or control character: percent-encode it (in the stage variable too)",
                        p.escape_debug()
                    )));
                }
                WsTarget::Http {
                    upstream: idx,
                    path: p,
                }
            }
            RawIntegration::Mock { status, body, .. } => {
                if !(100..=599).contains(status) {
                    return Err(ierr(format!("mock status {status} is not an HTTP status")));
                }
                WsTarget::Mock {
                    status: *status,
                    body: Bytes::from(body.clone()),
                }
            }
        };
        let labels = crate::config::route_labels(api_name, stage_name, key);
        let route = WsRoute {
            target,
            labels: labels.into(),
        };
        if routes.insert(key.to_string(), route).is_some() {
            return Err(src.err(
                r.route.span(),
                &rkey,
                format!("route `{key}` appears twice"),
            ));
        }
    }
    Ok(Arc::new(WsApi {
        api: api_name.clone(),
        stage: stage_name.clone(),
        routes,
        unrouted: crate::config::route_labels(api_name, stage_name, "").into(),
        access_log: stage.access_log,
        selection,
        settings: (*settings).clone(),
    }))
}

/// A management command for one connection.
enum Cmd {
    /// An encoded frame, already counted in the connection's queue.
    Send(u64, Vec<u8>),
    Close(u64),
}

struct Entry {
    worker: usize,
    connected_at_ms: u64,
    last_active_ms: Arc<AtomicU64>,
    source_ip: String,
    /// Bytes queued toward the client and not yet written.
    queued: Arc<AtomicUsize>,
    /// The API's `max_message_bytes`: the largest message `@connections` sends.
    max_message: usize,
    /// The connection takes no more messages: its client closed or left, or the gateway
    /// decided to close it (a drain aside, see [`admin_local`]). `@connections` then answers
    /// 410, as for an unknown id. (A POST taken just before can still lose the race with a
    /// close seen on the worker before the mailbox hands its frame over.)
    closing: Arc<AtomicBool>,
}

/// Counts `n` more bytes in a client's queue unless that takes it past [`MAX_QUEUED`].
fn reserve(queued: &AtomicUsize, n: usize) -> bool {
    queued
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
            (q + n <= MAX_QUEUED).then_some(q + n)
        })
        .is_ok()
}

/// Where every open WebSocket API connection lives, for the management API.
#[derive(Default)]
pub struct Registry {
    conns: Mutex<AHashMap<u64, Entry>>,
    mailboxes: Mutex<Vec<Option<Mailbox>>>,
}

/// A worker's mailbox: commands, and the bell that wakes the worker's mailbox task.
struct Mailbox {
    tx: crossbeam_channel::Sender<Cmd>,
    bell: OwnedFd,
}

/// Adds one to an eventfd's counter, which makes it readable. A full counter (never reached in
/// practice) is already readable, so a failed write loses nothing.
fn ring(bell: &OwnedFd) {
    let one = 1u64;
    // SAFETY: writes 8 bytes from a live u64 to a descriptor this mailbox owns.
    unsafe { libc::write(bell.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// Resets an eventfd's counter (non-blocking; nothing to read is fine).
fn silence(bell: RawFd) {
    let mut n = 0u64;
    // SAFETY: reads at most 8 bytes into a live u64; the descriptor is non-blocking.
    unsafe { libc::read(bell, (&mut n as *mut u64).cast(), 8) };
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// splitmix64: a bijection, so distinct counters give distinct, unpredictable-looking ids.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e3779b97f4a7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

/// The text form of a connection id (16 hex digits).
pub fn id_string(id: u64) -> String {
    format!("{id:016x}")
}

impl Registry {
    /// Opens worker `worker`'s mailbox: its commands, and a descriptor of its bell for the
    /// worker's io driver to wait on.
    fn mailbox(
        &self,
        worker: usize,
    ) -> std::io::Result<(crossbeam_channel::Receiver<Cmd>, OwnedFd)> {
        // SAFETY: plain system call; the result is checked and then owned.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let bell = unsafe { OwnedFd::from_raw_fd(fd) };
        let waiter = bell.try_clone()?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut m = self.mailboxes.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() <= worker {
            m.resize_with(worker + 1, || None);
        }
        m[worker] = Some(Mailbox { tx, bell });
        Ok((rx, waiter))
    }

    /// Wakes every worker's mailbox task (a drain has begun).
    pub fn ring_all(&self) {
        let m = self.mailboxes.lock().unwrap_or_else(|e| e.into_inner());
        for mb in m.iter().flatten() {
            ring(&mb.bell);
        }
    }

    /// Posts `cmd` to connection `id`'s worker; false when it is unknown or closing. `close`
    /// marks it closing in the same step (a DELETE).
    fn post(&self, id: u64, cmd: Cmd, close: bool) -> bool {
        let worker = {
            let c = self.conns.lock().unwrap_or_else(|e| e.into_inner());
            let Some(e) = c.get(&id) else {
                return false;
            };
            let was = if close {
                e.closing.swap(true, Ordering::AcqRel)
            } else {
                e.closing.load(Ordering::Acquire)
            };
            if was {
                return false;
            }
            e.worker
        };
        let m = self.mailboxes.lock().unwrap_or_else(|e| e.into_inner());
        match m.get(worker).and_then(|t| t.as_ref()) {
            Some(mb) if mb.tx.send(cmd).is_ok() => {
                ring(&mb.bell);
                true
            }
            _ => false,
        }
    }

    /// Ids of the open WebSocket API connections.
    pub fn ids(&self) -> Vec<u64> {
        let c = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        c.keys().copied().collect()
    }

    /// Number of open WebSocket API connections.
    pub fn len(&self) -> usize {
        self.conns.lock().map(|c| c.len()).unwrap_or(0)
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for a Unix time in milliseconds.
fn iso8601(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86400) as i64;
    let sod = secs % 86400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60,
        ms % 1000
    )
}

/// `POST/GET/DELETE /@connections/{id}` on the admin listener: (status, JSON body). With
/// `[cluster]`, an id this node does not hold is looked up in the cluster.
pub fn admin(shared: &Shared, method: &str, id: &str, body: &[u8]) -> (u16, String) {
    let r = admin_local(shared, method, id, body);
    match shared.cluster.get() {
        Some(c) if r.0 == 410 && id.len() == 16 && !holds(shared, id) => {
            c.forward(method, id, body)
        }
        _ => r,
    }
}

/// Whether connection `id` (16 hex digits) is one of this node's (closing ones included).
fn holds(shared: &Shared, id: &str) -> bool {
    u64::from_str_radix(id, 16).is_ok_and(|id| {
        let c = shared.ws.conns.lock().unwrap_or_else(|e| e.into_inner());
        c.contains_key(&id)
    })
}

/// `@connections` on this node's connections only.
pub fn admin_local(shared: &Shared, method: &str, id: &str, body: &[u8]) -> (u16, String) {
    let msg = |m: &str| serde_json::json!({ "message": m }).to_string();
    // A method the path never takes is 405 whatever the id (the listener adds `Allow`).
    if !matches!(method, "POST" | "DELETE" | "GET" | "HEAD") {
        return (405, msg("Method Not Allowed"));
    }
    let gone = (410, msg("Gone: no such connection"));
    // During a drain, connections stop taking messages (they are closing with 1001).
    let not_taking = || {
        if shared.shutdown.load(Ordering::Acquire) && holds(shared, id) {
            (
                410,
                msg("Gone: the connection is closing (the gateway is draining)"),
            )
        } else {
            (410, msg("Gone: no such connection"))
        }
    };
    let Some(id) = (id.len() == 16)
        .then(|| u64::from_str_radix(id, 16).ok())
        .flatten()
    else {
        return gone;
    };
    let reg = &shared.ws;
    match method {
        "POST" => {
            let (queued, max) = {
                let c = reg.conns.lock().unwrap_or_else(|e| e.into_inner());
                match c.get(&id) {
                    Some(e) if !e.closing.load(Ordering::Acquire) => {
                        (e.queued.clone(), e.max_message)
                    }
                    Some(_) => return not_taking(),
                    None => return gone,
                }
            };
            // The API's message limit holds both ways (API Gateway: 413 past 128 KB).
            if body.len() > max {
                return (
                    413,
                    msg(&format!(
                        "Payload Too Large: a message of this API is at most {max} bytes (max_message_bytes)"
                    )),
                );
            }
            // Counted here, before the answer: a message is either refused now or queued,
            // never answered 200 and then dropped because the client does not read.
            let f = message_frame(body);
            let n = f.len();
            if !reserve(&queued, n) {
                return (
                    429,
                    msg("Too Many Requests: the client is not reading; its queue is full"),
                );
            }
            if reg.post(id, Cmd::Send(id, f), false) {
                (200, String::new())
            } else {
                queued.fetch_sub(n, Ordering::AcqRel);
                not_taking()
            }
        }
        "DELETE" => {
            if reg.post(id, Cmd::Close(id), true) {
                (204, String::new())
            } else {
                not_taking()
            }
        }
        "GET" => {
            let c = reg.conns.lock().unwrap_or_else(|e| e.into_inner());
            match c.get(&id) {
                Some(e) if !e.closing.load(Ordering::Acquire) => (
                    200,
                    serde_json::json!({
                        "connectedAt": iso8601(e.connected_at_ms),
                        "lastActiveAt": iso8601(e.last_active_ms.load(Ordering::Relaxed)),
                        "sourceIp": e.source_ip,
                    })
                    .to_string(),
                ),
                _ => gone,
            }
        }
        _ => (405, msg("Method Not Allowed")),
    }
}

/// What goes to a connection's writer.
enum Out {
    /// An encoded data frame, counted in the connection's queue.
    Frame(Vec<u8>),
    /// Send the pong waiting in the connection's one pong slot, if it is still there.
    Pong,
    /// A close frame; the writer stops after it.
    Close(u16, &'static str),
}

struct LocalConn {
    tx: mpsc::UnboundedSender<Out>,
    kill: Option<oneshot::Sender<(u16, &'static str)>>,
    queued: Arc<AtomicUsize>,
}

thread_local! {
    static LOCAL: RefCell<AHashMap<u64, LocalConn>> = RefCell::new(AHashMap::new());
    /// This worker's connections waiting to hear of a drain, by id: each gets its
    /// [`drain_stop`] time.
    static DRAIN: RefCell<AHashMap<u64, oneshot::Sender<Instant>>> =
        RefCell::new(AHashMap::new());
}

/// When a connection must have stopped everything but its `$disconnect` call during a drain:
/// the last quarter of `shutdown_timeout_ms` (at most 1 s) is left for that call, which must
/// be made before the worker stops waiting.
fn drain_stop(shared: &Shared) -> Instant {
    let t = shared.current().config.server.shutdown_timeout;
    let end = shared
        .drain_deadline()
        .unwrap_or_else(|| Instant::now() + t);
    let reserve = (t / 4).min(Duration::from_secs(1));
    end.checked_sub(reserve).unwrap_or(end)
}

/// Tells connection `id` of a drain (at once when one has begun), through `tx`.
fn watch_drain(shared: &Shared, id: u64, tx: oneshot::Sender<Instant>) {
    // The flag is checked on this worker's thread, where the mailbox task hands the drain out
    // once it saw the flag: a connection either finds the flag or is in the map by then.
    if shared.shutdown.load(Ordering::Acquire) {
        let _ = tx.send(drain_stop(shared));
    } else {
        DRAIN.with(|d| d.borrow_mut().insert(id, tx));
    }
}

/// Drains this worker's mailbox until shutdown (one task per worker), waking when its bell
/// rings.
pub async fn run_mailbox(worker: usize, shared: Arc<Shared>) {
    let (rx, waiter) = match open_mailbox(&shared, worker) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("ringgate: worker {worker}: cannot open the WebSocket mailbox: {e}");
            return;
        }
    };
    loop {
        // Silenced before the commands are taken: a post after this rings again.
        silence(waiter.as_raw_fd());
        while let Ok(cmd) = rx.try_recv() {
            LOCAL.with(|l| {
                let mut l = l.borrow_mut();
                match cmd {
                    Cmd::Send(id, f) => {
                        // Counted by the poster ([`admin_local`]); uncounted if not queued.
                        let n = f.len();
                        if let Some(c) = l.get_mut(&id) {
                            if c.tx.unbounded_send(Out::Frame(f)).is_err() {
                                c.queued.fetch_sub(n, Ordering::AcqRel);
                            }
                        }
                    }
                    Cmd::Close(id) => {
                        if let Some(k) = l.get_mut(&id).and_then(|c| c.kill.take()) {
                            let _ = k.send((code::NORMAL, "closed by the management API"));
                        }
                    }
                }
            });
        }
        if shared.shutdown.load(Ordering::Acquire) || waiter.readable(false).await.is_err() {
            break;
        }
    }
    // A drain: every connection of this worker hears of it now, not at its next timer.
    let stop = drain_stop(&shared);
    for (_, tx) in DRAIN.with(|d| std::mem::take(&mut *d.borrow_mut())) {
        let _ = tx.send(stop);
    }
}

/// This worker's mailbox, and its bell in a form the io driver can wait on.
fn open_mailbox(
    shared: &Shared,
    worker: usize,
) -> std::io::Result<(
    crossbeam_channel::Receiver<Cmd>,
    monoio::net::udp::UdpSocket,
)> {
    let (rx, bell) = shared.ws.mailbox(worker)?;
    Ok((rx, crate::server::readiness_carrier(bell)?))
}

/// A text frame when `body` is UTF-8, else a binary one.
fn message_frame(body: &[u8]) -> Vec<u8> {
    let op = if std::str::from_utf8(body).is_ok() {
        frame::op::TEXT
    } else {
        frame::op::BINARY
    };
    let mut f = Vec::with_capacity(body.len() + 10);
    frame::encode(&mut f, op, true, body);
    f
}

/// Who a connection's client is, for the access log lines of its events (as its handshake's).
pub struct Who {
    /// The client's address.
    pub peer: SocketAddr,
    /// Came in over TLS.
    pub tls: bool,
    /// The handshake's path.
    pub path: Box<str>,
    /// The `$connect` authorizer's principal.
    pub principal: Option<Box<str>>,
    /// The name of the API key the handshake presented.
    pub api_key: Option<Box<str>>,
}

/// One event of a connection after its handshake (`$connect` is the handshake's own request
/// in the metrics and the access log): a message, or the disconnect.
pub struct ConnEvent<'a> {
    /// `MESSAGE` or `DISCONNECT` (the `method` label and field).
    pub kind: &'static str,
    /// The route key (`$default` for a message no route takes, when there is none either).
    pub route: &'a str,
    /// The route's Prometheus labels (`None`: the API has no such route).
    pub labels: Option<&'a Arc<str>>,
    /// The integration's status; 502 or 504 when the call failed or timed out; 403 for a
    /// message no route takes; 200 for a disconnect with no `$disconnect` route.
    pub status: u16,
    /// How long the route's integration took.
    pub duration: Duration,
    /// The id the integration call carried as `x-request-id`.
    pub request_id: &'a str,
    /// The connection's id.
    pub connection_id: u64,
    /// For a disconnect: the close code and reason.
    pub close: Option<(u16, &'a str)>,
}

/// Where a worker counts and logs its connections' events.
pub trait Events {
    /// Counts `ev` in the metrics and, when the stage logs, writes its access log line.
    fn ws_event(&self, api: &WsApi, who: &Who, ev: &ConnEvent<'_>);
}

/// A connection that passed its handshake and `$connect`.
pub struct Accepted {
    api: Arc<WsApi>,
    gw: Arc<Gateway>,
    id: u64,
    who: Who,
    /// The gateway's own headers for every integration call of this connection (see
    /// [`conn_headers`]).
    conn_headers: Box<[u8]>,
    /// Set by [`Accepted::register`].
    reg: Option<Registered>,
}

/// A registered connection's channels and counters.
struct Registered {
    tx: mpsc::UnboundedSender<Out>,
    rx: mpsc::UnboundedReceiver<Out>,
    kill_rx: oneshot::Receiver<(u16, &'static str)>,
    last_active: Arc<AtomicU64>,
    queued: Arc<AtomicUsize>,
    closing: Arc<AtomicBool>,
}

impl Accepted {
    /// The connection id (`x-connection-id`, `@connections/{id}` in hex).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Makes the connection known to `@connections`, this worker's mailbox and the cluster.
    /// Called before the 101 is written: a client (or its `$connect` integration) may post to
    /// the connection as soon as it sees the 101, and that post must find it.
    pub fn register(&mut self, shared: &Shared) {
        if self.reg.is_some() {
            return;
        }
        let id = self.id;
        let last_active = Arc::new(AtomicU64::new(now_ms()));
        let queued = Arc::new(AtomicUsize::new(0));
        let closing = Arc::new(AtomicBool::new(false));
        shared
            .ws
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                id,
                Entry {
                    worker: worker_index(shared),
                    connected_at_ms: now_ms(),
                    last_active_ms: last_active.clone(),
                    source_ip: self.who.peer.ip().to_string(),
                    queued: queued.clone(),
                    max_message: self.api.settings.limits.max_message,
                    closing: closing.clone(),
                },
            );
        if let Some(c) = shared.cluster.get() {
            c.conn_opened(id);
        }
        let (tx, rx) = mpsc::unbounded::<Out>();
        let (kill_tx, kill_rx) = oneshot::channel::<(u16, &'static str)>();
        LOCAL.with(|l| {
            l.borrow_mut().insert(
                id,
                LocalConn {
                    tx: tx.clone(),
                    kill: Some(kill_tx),
                    queued: queued.clone(),
                },
            )
        });
        self.reg = Some(Registered {
            tx,
            rx,
            kill_rx,
            last_active,
            queued,
            closing,
        });
    }

    /// Undoes [`Accepted::register`] for a connection whose 101 could not be written (the
    /// client went away, a reset included, while `$connect` ran), then calls `$disconnect`:
    /// `$connect` succeeded, so the integration has its connection and must hear of its end.
    pub async fn abandon(self, shared: &Shared, events: &impl Events) {
        if self.reg.is_some() {
            LOCAL.with(|l| l.borrow_mut().remove(&self.id));
            unregister(shared, self.id);
        }
        let c = ConnCtx {
            gw: &self.gw,
            api: &self.api,
            id: self.id,
            conn_headers: &self.conn_headers,
            who: &self.who,
        };
        disconnect(&c, events, (code::ABNORMAL, "connection lost")).await;
    }
}

/// Removes a connection from `@connections` and the cluster.
fn unregister(shared: &Shared, id: u64) {
    shared
        .ws
        .conns
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&id);
    if let Some(c) = shared.cluster.get() {
        c.conn_closed(id);
    }
}

/// The handshake outcome: the 101 head to write, or the refusal.
pub enum Handshake {
    /// Write `head` and hand the connection over.
    Accept(Vec<u8>, Accepted),
    /// Answer with this status and a JSON error message.
    Refuse(u16, &'static str),
    /// Answer with the `$connect` integration's status and body.
    RefuseWith(u16, Vec<u8>),
}

/// What the gateway knows of the client beyond its handshake head.
pub struct ClientInfo<'a> {
    /// The client's address (`X-Forwarded-For`, `sourceIp`).
    pub peer: SocketAddr,
    /// Came in over TLS (`X-Forwarded-Proto: https`).
    pub tls: bool,
    /// The `x-forwarded-client-cert` value of a client certificate verified in the TLS
    /// handshake (mTLS).
    pub xfcc: Option<&'a [u8]>,
    /// The principal the `$connect` route's authorizer named.
    pub principal: Option<&'a str>,
    /// The name of the API key the handshake presented (for the access log).
    pub api_key: Option<&'a str>,
    /// The request id of the handshake request.
    pub request_id: &'a [u8],
}

/// The headers the gateway sets itself on every integration call of a connection, by the
/// same rules as the HTTP proxy path: `X-Forwarded-For` (the client's values, then the peer),
/// `X-Forwarded-Proto` (by listener), `X-Forwarded-Host` (the client's `Host`),
/// `x-forwarded-client-cert` (mTLS) and `x-principal-id` (the `$connect` authorizer's), and
/// `x-stage` (the API's stage, as `requestContext.stage`). Any client-sent header of these
/// names is never passed on.
fn conn_headers(head: &RequestHead, buf: &[u8], client: &ClientInfo<'_>, stage: &str) -> Vec<u8> {
    use crate::http::encode::push_header;
    let mut out = Vec::with_capacity(192);
    push_header(&mut out, b"x-stage", stage.as_bytes());
    out.extend_from_slice(b"x-forwarded-for: ");
    for (kind, _, value) in head.forwardable_kinds(buf) {
        if kind == HeaderKind::XForwardedFor {
            out.extend_from_slice(value);
            out.extend_from_slice(b", ");
        }
    }
    crate::http::encode::push_ip(&mut out, client.peer.ip());
    out.extend_from_slice(if client.tls {
        b"\r\nx-forwarded-proto: https\r\n"
    } else {
        b"\r\nx-forwarded-proto: http\r\n"
    });
    if let Some(h) = head.host {
        push_header(&mut out, b"x-forwarded-host", head.slice(buf, h));
    }
    if let Some(v) = client.xfcc {
        push_header(&mut out, b"x-forwarded-client-cert", v);
    }
    if let Some(p) = client.principal {
        push_header(&mut out, b"x-principal-id", p.as_bytes());
    }
    out
}

/// Runs the opening handshake of a WebSocket API: validation, then `$connect`.
pub async fn handshake(
    gw: &Arc<Gateway>,
    api: &Arc<WsApi>,
    head: &RequestHead,
    buf: &[u8],
    client: &ClientInfo<'_>,
) -> Handshake {
    let accept = match super::handshake::validate(head, buf, &api.settings.allowed_origins) {
        Ok(a) => a,
        Err(r) => return Handshake::Refuse(r.status, r.message),
    };
    // The id is allocated here so `$connect` already sees it.
    let id = next_id();
    let conn_headers = conn_headers(head, buf, client, &api.stage);
    let request_id = client.request_id;
    let mut subprotocol: Option<Vec<u8>> = None;
    if let Some(t) = api.routes.get("$connect") {
        let mut hdrs = Vec::with_capacity(512);
        for (kind, name, value) in head.forwardable_kinds(buf) {
            match kind {
                // The gateway's own (in `conn_headers` or below), replacing any the client
                // sent; the call has its own `host` and `content-length`.
                HeaderKind::Host
                | HeaderKind::ContentLength
                | HeaderKind::XForwardedFor
                | HeaderKind::XForwardedProto
                | HeaderKind::XForwardedHost
                | HeaderKind::XForwardedClientCert
                | HeaderKind::XPrincipalId
                | HeaderKind::XRequestId
                | HeaderKind::ClientForwarding => continue,
                HeaderKind::Other
                    if [
                        &b"x-connection-id"[..],
                        b"x-route-key",
                        b"x-event-type",
                        b"x-stage",
                    ]
                    .iter()
                    .any(|n| name.eq_ignore_ascii_case(n)) =>
                {
                    continue
                }
                _ => crate::http::encode::push_header(&mut hdrs, name, value),
            }
        }
        hdrs.extend_from_slice(&conn_headers);
        if !request_id.is_empty() {
            crate::http::encode::push_header(&mut hdrs, b"x-request-id", request_id);
        }
        let query = head.query.map(|q| head.slice(buf, q)).unwrap_or(b"");
        let call = call(
            gw, &t.target, "$connect", id, "", &hdrs, b"", b"", query, MAX_ANSWER,
        );
        match call.await {
            Ok(a) if (200..300).contains(&a.status) => {
                // The integration may pick one of the subprotocols the client offered; one
                // it did not offer is not passed on.
                subprotocol = a
                    .subprotocol
                    .filter(|p| offered_subprotocols(head, buf).any(|o| o == &p[..]));
            }
            // Any other final status refuses the handshake with that status (the contract),
            // a redirect included.
            Ok(a) if (300..=599).contains(&a.status) => {
                return Handshake::RefuseWith(a.status, a.body);
            }
            Ok(_) | Err(client::CallError::Failed | client::CallError::TooLarge) => {
                return Handshake::Refuse(502, "Bad Gateway")
            }
            // Slower than the upstream's `timeout_ms`: as on HTTP routes.
            Err(client::CallError::Timeout) => {
                return Handshake::Refuse(504, "Endpoint Request Timed Out")
            }
            Err(client::CallError::Busy) => return Handshake::Refuse(503, "Service Unavailable"),
        }
    }
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: ",
    );
    out.extend_from_slice(accept.as_bytes());
    if let Some(p) = &subprotocol {
        out.extend_from_slice(b"\r\nsec-websocket-protocol: ");
        out.extend_from_slice(p);
    }
    out.extend_from_slice(b"\r\nx-connection-id: ");
    out.extend_from_slice(id_string(id).as_bytes());
    out.extend_from_slice(b"\r\nx-request-id: ");
    out.extend_from_slice(request_id);
    out.extend_from_slice(b"\r\ndate: ");
    out.extend_from_slice(crate::http::encode::DateCache::new().get());
    out.extend_from_slice(b"\r\n\r\n");
    Handshake::Accept(
        out,
        Accepted {
            api: api.clone(),
            gw: gw.clone(),
            id,
            who: Who {
                peer: client.peer,
                tls: client.tls,
                path: String::from_utf8_lossy(head.slice(buf, head.path)).into(),
                principal: client.principal.map(Into::into),
                api_key: client.api_key.map(Into::into),
            },
            conn_headers: conn_headers.into_boxed_slice(),
            reg: None,
        },
    )
}

/// The subprotocol tokens the client offered, from every `Sec-WebSocket-Protocol` line (RFC
/// 6455 11.3.4: comma-separated, over any number of lines). Tokens are case-sensitive.
fn offered_subprotocols<'b>(
    head: &'b RequestHead,
    buf: &'b [u8],
) -> impl Iterator<Item = &'b [u8]> {
    head.headers
        .iter()
        .filter(|h| {
            head.slice(buf, h.name)
                .eq_ignore_ascii_case(b"sec-websocket-protocol")
        })
        .flat_map(|h| head.slice(buf, h.value).split(|&c| c == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

fn next_id() -> u64 {
    thread_local! {
        static SEQ: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }
    static BASE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static THREADS: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static T: u64 = THREADS.fetch_add(1, Ordering::Relaxed);
    }
    // A random base: ids of different processes (cluster nodes) do not collide.
    let base = *BASE.get_or_init(|| {
        let mut b = [0u8; 8];
        match getrandom::getrandom(&mut b) {
            Ok(()) => u64::from_le_bytes(b),
            Err(_) => now_ms() ^ ((std::process::id() as u64) << 40),
        }
    });
    let seq = SEQ.with(|s| {
        let v = s.get() + 1;
        s.set(v);
        v
    });
    // Thread index in the top 12 bits of the counter keeps ids unique across workers.
    let t = T.with(|t| *t);
    mix(base.wrapping_add((t << 52) | (seq & ((1 << 52) - 1))))
}

/// Calls a route's integration: `extra_headers` (the call's own) and `conn_headers` (the
/// connection's, from [`conn_headers`]) are complete `name: value\r\n` lines.
#[allow(
    clippy::too_many_arguments,
    reason = "one integration call's whole context"
)]
async fn call(
    gw: &Gateway,
    t: &WsTarget,
    route_key: &str,
    id: u64,
    request_id: &str,
    extra_headers: &[u8],
    conn_headers: &[u8],
    body: &[u8],
    query: &[u8],
    max_answer: usize,
) -> Result<client::Answer, client::CallError> {
    match t {
        WsTarget::Mock { status, body } => Ok(client::Answer {
            status: *status,
            body: body.to_vec(),
            subprotocol: None,
        }),
        WsTarget::Http { upstream, path } => {
            let mut hdrs = Vec::with_capacity(extra_headers.len() + conn_headers.len() + 96);
            hdrs.extend_from_slice(extra_headers);
            hdrs.extend_from_slice(conn_headers);
            crate::http::encode::push_header(
                &mut hdrs,
                b"x-connection-id",
                id_string(id).as_bytes(),
            );
            crate::http::encode::push_header(&mut hdrs, b"x-route-key", route_key.as_bytes());
            // As API Gateway's `requestContext.eventType`.
            let event: &[u8] = match route_key {
                "$connect" => b"CONNECT",
                "$disconnect" => b"DISCONNECT",
                _ => b"MESSAGE",
            };
            crate::http::encode::push_header(&mut hdrs, b"x-event-type", event);
            if !request_id.is_empty() {
                crate::http::encode::push_header(&mut hdrs, b"x-request-id", request_id.as_bytes());
            }
            let full;
            let p = if query.is_empty() {
                path.as_str()
            } else {
                full = format!(
                    "{path}{}{}",
                    if path.contains('?') { '&' } else { '?' },
                    String::from_utf8_lossy(query)
                );
                full.as_str()
            };
            client::post(&gw.upstreams[*upstream], p, &hdrs, body, max_answer).await
        }
    }
}

/// Serves an accepted connection until it closes, then calls `$disconnect` (during a drain:
/// by [`drain_stop`] at the latest).
pub async fn run<S: crate::server::ClientIo>(
    mut a: Accepted,
    stream: S,
    pending: Vec<u8>,
    shared: &Arc<Shared>,
    events: &impl Events,
) {
    a.register(shared);
    let Accepted {
        api,
        gw,
        id,
        who,
        conn_headers,
        reg,
    } = a;
    let ctx = ConnCtx {
        gw: &gw,
        api: &api,
        id,
        conn_headers: &conn_headers,
        who: &who,
    };
    // How the connection ended, for `$disconnect`: the first cause seen.
    let end = RefCell::new(None::<(u16, String)>);
    let ended_by = |c: u16, why: &str| {
        let mut e = end.borrow_mut();
        if e.is_none() {
            *e = Some((c, why.to_string()));
        }
    };
    let Some(Registered {
        tx,
        rx,
        kill_rx,
        last_active,
        queued,
        closing,
    }) = reg
    else {
        unreachable!("registered above")
    };
    let settings = &api.settings;
    let started = Instant::now();
    let (mut rd, mut wr) = stream.into_split();
    let last_in = std::cell::Cell::new(Instant::now());
    let reading_since = std::cell::Cell::new(None::<Instant>);
    let canceller = RefCell::new(monoio::io::Canceller::new());
    // A message call in flight.
    let busy = std::cell::Cell::new(false);
    // Messages read and not yet called, in order, with their bytes; `arrived` wakes the
    // caller, `room` the reader when it waits for the queue to shrink.
    let waiting = RefCell::new(std::collections::VecDeque::<(bool, Vec<u8>)>::new());
    let waiting_bytes = std::cell::Cell::new(0usize);
    let reading_done = std::cell::Cell::new(false);
    let arrived = Signal::default();
    let room = Signal::default();
    let (drain_tx, drain_rx) = oneshot::channel::<Instant>();
    watch_drain(shared, id, drain_tx);
    let (soft_tx, soft_rx) = oneshot::channel::<()>();
    let ended = Signal::default();
    // The payload of the pong owed to the latest ping not yet answered: one slot, so a client
    // that floods pings and reads nothing costs one pong (RFC 6455 5.5.3 lets an endpoint
    // answer only the most recent ping).
    let pong = RefCell::new(None::<Vec<u8>>);
    // A drain: first the connection closes by itself (`soft_rx`), then whatever still runs at
    // the stop time is dropped.
    let guard = async {
        let Ok(stop) = drain_rx.await else {
            return std::future::pending().await;
        };
        let _ = soft_tx.send(());
        monoio::time::sleep_until(stop.into()).await;
    };

    // A frame is being written (a cut then leaves it partial), and the close frame went out.
    let writing = std::cell::Cell::new(false);
    let close_sent = std::cell::Cell::new(false);
    let writer = async {
        use futures_util_lite::next;
        let mut rx = rx;
        while let Some(o) = next(&mut rx).await {
            let (buf, counted, close) = match o {
                Out::Frame(f) => (f, true, false),
                Out::Pong => {
                    let Some(p) = pong.borrow_mut().take() else {
                        continue;
                    };
                    let mut f = Vec::with_capacity(p.len() + 2);
                    frame::encode(&mut f, frame::op::PONG, true, &p);
                    (f, false, false)
                }
                Out::Close(c, why) => {
                    let mut f = Vec::new();
                    frame::encode_close(&mut f, c, why);
                    (f, false, true)
                }
            };
            let n = if counted { buf.len() } else { 0 };
            writing.set(true);
            match monoio::time::timeout(WRITE_TIMEOUT, wr.write_all(buf)).await {
                Ok((Ok(_), _)) => {}
                _ => break,
            }
            writing.set(false);
            close_sent.set(close);
            queued.fetch_sub(n, Ordering::AcqRel);
            last_active.store(now_ms(), Ordering::Relaxed);
            last_in.set(Instant::now());
            if close {
                break;
            }
        }
        let _ = monoio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
    };

    let main = async {
        // From now on `@connections` answers 410: a 200 would promise a delivery that cannot
        // come once the client closed or a close frame is on its way.
        let stop_taking = || closing.store(true, Ordering::Release);
        // Ends the connection with a close frame, and keeps why for `$disconnect`.
        let close_with = |c: u16, why: &'static str| {
            stop_taking();
            ended_by(c, why);
            let _ = tx.unbounded_send(Out::Close(c, why));
        };
        // Calls the integration for each message, one at a time, in order.
        let caller = async {
            let mut scratch = Vec::new();
            loop {
                let next = waiting.borrow_mut().pop_front();
                let Some((text, data)) = next else {
                    if reading_done.get() {
                        return;
                    }
                    arrived.wait().await;
                    continue;
                };
                waiting_bytes.set(waiting_bytes.get() - data.len());
                room.notify();
                busy.set(true);
                let reply = Box::pin(on_message(&ctx, events, text, &data, &mut scratch)).await;
                busy.set(false);
                if let Some(f) = reply {
                    if !reserve(&queued, f.len()) {
                        // A reply cannot be refused: the client that does not read is
                        // closed instead.
                        close_with(code::POLICY, "client not reading");
                        return;
                    }
                    let _ = tx.unbounded_send(Out::Frame(f));
                }
            }
        };
        let reader = async {
            let mut dec = Decoder::new(settings.limits);
            let mut buf: Vec<u8> = pending;
            loop {
                // Decode what is buffered.
                loop {
                    match dec.decode(&mut buf) {
                        Err(c) => {
                            close_with(c, close_reason(c));
                            return;
                        }
                        Ok((ev, used)) => {
                            if used > 0 {
                                buf.drain(..used);
                            }
                            let Some(ev) = ev else { break };
                            last_in.set(Instant::now());
                            last_active.store(now_ms(), Ordering::Relaxed);
                            match ev {
                                Event::Ping(p) => {
                                    // A pong already owed is not sent twice: it carries this
                                    // (latest) ping's payload instead.
                                    if pong.borrow_mut().replace(p).is_none() {
                                        let _ = tx.unbounded_send(Out::Pong);
                                    }
                                }
                                Event::Pong => {}
                                Event::Close(c, why) => {
                                    ended_by(
                                        c.unwrap_or(code::NO_STATUS),
                                        &String::from_utf8_lossy(&why),
                                    );
                                    let c = c.unwrap_or(code::NORMAL);
                                    let _ = tx.unbounded_send(Out::Close(c, ""));
                                    return;
                                }
                                Event::Message { text, data } => {
                                    // Full: wait for the caller to take one (frames behind
                                    // stay unread until then).
                                    while !waiting.borrow().is_empty()
                                        && (waiting.borrow().len() >= MAX_WAITING
                                            || waiting_bytes.get() + data.len() > MAX_WAITING_BYTES)
                                    {
                                        room.wait().await;
                                    }
                                    waiting_bytes.set(waiting_bytes.get() + data.len());
                                    waiting.borrow_mut().push_back((text, data));
                                    arrived.notify();
                                }
                            }
                        }
                    }
                }
                if queued.load(Ordering::Acquire) > MAX_QUEUED {
                    close_with(code::POLICY, "client not reading");
                    return;
                }
                if buf.is_empty() && buf.capacity() > 64 * 1024 {
                    buf = Vec::new();
                }
                // Read more: at least room for the largest frame header.
                if buf.capacity() == 0 {
                    buf = super::relay::take_buf();
                } else if buf.capacity() - buf.len() < 1024 {
                    buf.reserve(buf.capacity().max(4096));
                }
                let len = buf.len();
                let cap = buf.capacity();
                let handle = canceller.borrow().handle();
                reading_since.set(Some(Instant::now()));
                let (r, b) = rd.cancelable_read(buf.slice_mut(len..cap), handle).await;
                reading_since.set(None);
                buf = b.into_inner();
                match r {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => {
                        // Idle: wait for bytes without holding a buffer (unless a partial
                        // frame is buffered, bounded by the frame limit).
                        if buf.is_empty() {
                            super::relay::give_buf(std::mem::take(&mut buf));
                        }
                        // SAFETY: as in monoio's own split, the halves share the stream
                        // through an `Rc<UnsafeCell>`; `readable` takes `&self` and only
                        // clones the fd into a poll op. (Over TLS the cancelled read was the
                        // socket read, so nothing waits above the socket.)
                        let stream: &S = unsafe { &*rd.0.get() };
                        if stream.tcp().readable(false).await.is_err() {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        };
        let kill = async {
            match kill_rx.await {
                Ok(why) => why,
                Err(_) => std::future::pending().await,
            }
        };
        let timers = async {
            loop {
                let nap = super::watch_interval(
                    Instant::now(),
                    reading_since.get(),
                    last_in.get(),
                    started,
                    settings,
                );
                monoio::time::sleep(nap).await;
                // A read waiting past the grace period gives its buffer back.
                if let Some(t) = reading_since.get() {
                    if t.elapsed() >= super::relay::GRACE {
                        reading_since.set(None);
                        let c = std::mem::take(&mut *canceller.borrow_mut()).cancel();
                        *canceller.borrow_mut() = c;
                    }
                }
                if shared.shutdown.load(Ordering::Relaxed) {
                    return (code::GOING_AWAY, "server shutting down");
                }
                if last_in.get().elapsed() >= settings.idle_timeout {
                    return (code::GOING_AWAY, "idle timeout");
                }
                if started.elapsed() >= settings.max_lifetime {
                    return (code::GOING_AWAY, "maximum connection duration reached");
                }
            }
        };
        let drain = async {
            match soft_rx.await {
                Ok(()) => (code::GOING_AWAY, "server shutting down"),
                Err(_) => std::future::pending().await,
            }
        };
        let watch = async {
            monoio::select! {
                why = kill => why,
                why = timers => why,
                why = drain => why,
            }
        };
        {
            let mut caller = std::pin::pin!(caller);
            let mut watch = std::pin::pin!(watch);
            let end = monoio::select! {
                _ = reader => None,
                _ = &mut caller => Some(None),
                why = &mut watch => Some(Some(why)),
            };
            let end = match end {
                Some(end) => end,
                None => {
                    // The reader ended: a close frame or a bad one (the cause is set), else
                    // the connection ended without a close frame.
                    ended_by(code::ABNORMAL, "connection lost");
                    stop_taking();
                    // The client closed or left: the messages it sent before are still called,
                    // in order (after a close frame their replies go nowhere), unless the watch
                    // ends the connection first.
                    reading_done.set(true);
                    arrived.notify();
                    monoio::select! {
                        _ = &mut caller => None,
                        why = &mut watch => Some(why),
                    }
                }
            };
            if let Some((c, why)) = end {
                // A drain says so itself (see `admin_local`): a GET still describes the
                // connection until it is gone.
                if !shared.shutdown.load(Ordering::Acquire) {
                    stop_taking();
                }
                ended_by(c, why);
                if shared.shutdown.load(Ordering::Relaxed)
                    && (busy.get() || !waiting.borrow().is_empty())
                {
                    // A drain stops reading but finishes the messages already read, the one in
                    // flight and those waiting their turn: their replies go out before the
                    // close (the guard bounds the wait by `shutdown_timeout_ms`).
                    reading_done.set(true);
                    arrived.notify();
                    (&mut caller).await;
                }
                let _ = tx.unbounded_send(Out::Close(c, why));
            }
        }
        // No more commands for this connection: the writer ends once its queue is written.
        LOCAL.with(|l| l.borrow_mut().remove(&id));
        drop(tx);
        ended.notify();
    };
    // Once the connection is over, what is still queued toward a client that does not read
    // gets [`CLOSE_GRACE`], not a [`WRITE_TIMEOUT`] per frame: the idle timeout, the maximum
    // duration and a kill end the connection (and call `$disconnect`) on time.
    let grace = async {
        ended.wait().await;
        monoio::time::sleep(CLOSE_GRACE).await;
    };
    let cut = monoio::select! {
        _ = async { monoio::join!(main, writer) } => false,
        _ = guard => true,
        _ = grace => false,
    };
    LOCAL.with(|l| l.borrow_mut().remove(&id));
    DRAIN.with(|d| d.borrow_mut().remove(&id));
    unregister(shared, id);
    // Ended by the drain's stop time or the close grace before a cause was set: a drain's.
    let (c, why) = end
        .take()
        .unwrap_or((code::GOING_AWAY, "server shutting down".to_string()));
    if cut && !close_sent.get() && !writing.get() {
        // The drain's stop time cut a message call (or its reply's turn): the client, between
        // frames, still hears the close, briefly (the `$disconnect` call's time is kept).
        // At most a quarter of what is left of the drain each: `$disconnect` keeps the rest.
        let left = shared.drain_deadline().map_or(CUT_CLOSE_WRITE, |d| {
            d.saturating_duration_since(Instant::now())
        });
        let t = CUT_CLOSE_WRITE.min(left / 4);
        let mut f = Vec::new();
        frame::encode_close(&mut f, c, &why);
        let _ = monoio::time::timeout(t, wr.write_all(f)).await;
        let _ = monoio::time::timeout(t, wr.shutdown()).await;
    }
    disconnect(&ctx, events, (c, &why)).await;
}

/// What an event's integration call needs of its connection.
struct ConnCtx<'a> {
    gw: &'a Gateway,
    api: &'a WsApi,
    id: u64,
    conn_headers: &'a [u8],
    who: &'a Who,
}

/// A request id for a call after `$connect` (which carries the handshake's): API Gateway gives
/// each message a requestId of its own. The connection id and a sequence number, unique for
/// the process.
fn event_request_id(id: u64) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("{}-{n:x}", id_string(id))
}

/// The status an event is counted and logged with when its call failed.
fn failed_status(e: &client::CallError) -> u16 {
    match e {
        client::CallError::Timeout => 504,
        client::CallError::Failed | client::CallError::TooLarge => 502,
        client::CallError::Busy => 503,
    }
}

/// Calls `$disconnect`, when the API has one, for a connection whose `$connect` succeeded,
/// telling it how the connection ended (`x-disconnect-status-code`, `x-disconnect-reason`, as
/// API Gateway's `disconnectStatusCode` and `disconnectReason`), then counts and logs it.
async fn disconnect(c: &ConnCtx<'_>, events: &impl Events, (code, reason): (u16, &str)) {
    let rid = event_request_id(c.id);
    let route = c.api.routes.get("$disconnect");
    let t0 = Instant::now();
    let status = match route {
        None => 200,
        Some(r) => {
            let mut hdrs = Vec::with_capacity(96);
            crate::http::encode::push_header(
                &mut hdrs,
                b"x-disconnect-status-code",
                code.to_string().as_bytes(),
            );
            crate::http::encode::push_header(
                &mut hdrs,
                b"x-disconnect-reason",
                &header_safe(reason.as_bytes()),
            );
            let call = call(
                c.gw,
                &r.target,
                "$disconnect",
                c.id,
                &rid,
                &hdrs,
                c.conn_headers,
                b"",
                b"",
                MAX_ANSWER,
            );
            match Box::pin(call).await {
                Ok(a) => a.status,
                Err(e) => failed_status(&e),
            }
        }
    };
    events.ws_event(
        c.api,
        c.who,
        &ConnEvent {
            kind: "DISCONNECT",
            route: "$disconnect",
            labels: route.map(|r| &r.labels),
            status,
            duration: t0.elapsed(),
            request_id: &rid,
            connection_id: c.id,
            close: Some((code, reason)),
        },
    );
}

/// A close reason as a header value: visible ASCII and spaces as they are, every other byte
/// (control characters, UTF-8) percent-encoded, and `%` itself.
fn header_safe(reason: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(reason.len());
    for &b in reason {
        if (b == b' ' || b.is_ascii_graphic()) && b != b'%' {
            out.push(b);
        } else {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        }
    }
    out
}

fn close_reason(c: u16) -> &'static str {
    match c {
        code::PROTOCOL => "protocol error",
        code::INVALID_DATA => "invalid UTF-8 in a text message",
        code::TOO_BIG => "message too big",
        _ => "",
    }
}

/// Routes one message and calls its integration, then counts and logs it; returns the frame
/// to send back, if any.
async fn on_message(
    c: &ConnCtx<'_>,
    events: &impl Events,
    text: bool,
    data: &[u8],
    scratch: &mut Vec<u8>,
) -> Option<Vec<u8>> {
    let t0 = Instant::now();
    let rid = event_request_id(c.id);
    let sel = c.api.select(text, data, scratch);
    let route = sel.key.and_then(|k| c.api.routes.get(k).map(|r| (k, r)));
    let (status, reply) = match route {
        None => {
            let m = format!(
                "{{\"message\":\"Forbidden\",\"connectionId\":\"{}\",\"requestId\":\"{rid}\"}}",
                id_string(c.id)
            );
            (403, Some(message_frame(m.as_bytes())))
        }
        Some((key, r)) => {
            let hdrs: &[u8] = match (text, sel.json) {
                (true, true) => b"content-type: application/json\r\n",
                (true, false) => b"content-type: text/plain; charset=utf-8\r\n",
                (false, _) => b"content-type: application/octet-stream\r\n",
            };
            let call = call(
                c.gw,
                &r.target,
                key,
                c.id,
                &rid,
                hdrs,
                c.conn_headers,
                data,
                b"",
                c.api.settings.limits.max_message.min(MAX_QUEUED),
            );
            match call.await {
                Ok(a) if a.body.is_empty() => (a.status, None),
                Ok(a) => (a.status, Some(message_frame(&a.body))),
                Err(e) => {
                    // API Gateway's words for the two failures.
                    let what = match e {
                        client::CallError::Timeout => "Endpoint request timed out",
                        client::CallError::Failed => "Internal server error",
                        client::CallError::Busy => "Service Unavailable",
                        // The limit holds both ways, as for `@connections` posts.
                        client::CallError::TooLarge => {
                            "Integration response larger than the message limit"
                        }
                    };
                    let m = format!(
                        "{{\"message\":\"{what}\",\"connectionId\":\"{}\",\"requestId\":\"{rid}\"}}",
                        id_string(c.id)
                    );
                    (failed_status(&e), Some(message_frame(m.as_bytes())))
                }
            }
        }
    };
    events.ws_event(
        c.api,
        c.who,
        &ConnEvent {
            kind: "MESSAGE",
            route: route.map(|(k, _)| k).unwrap_or(""),
            labels: Some(route.map(|(_, r)| &r.labels).unwrap_or(&c.api.unrouted)),
            status,
            duration: t0.elapsed(),
            request_id: &rid,
            connection_id: c.id,
            close: None,
        },
    );
    reply
}

fn worker_index(_shared: &Shared) -> usize {
    WORKER.with(|w| w.get())
}

thread_local! {
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Records which worker this thread is (called once per worker thread, before serving).
pub fn set_worker(id: usize) {
    WORKER.with(|w| w.set(id));
}

mod futures_util_lite {
    //! `StreamExt::next` without the futures-util crate.
    use futures_channel::mpsc::UnboundedReceiver;
    use std::future::Future;
    use std::pin::Pin;
    use std::task::Context;

    /// Waits for the next item of an unbounded receiver.
    pub fn next<T>(rx: &mut UnboundedReceiver<T>) -> impl Future<Output = Option<T>> + '_ {
        std::future::poll_fn(move |cx: &mut Context<'_>| {
            use futures_core::Stream;
            Pin::new(&mut *rx).poll_next(cx)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_dates() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(1_709_210_096_789), "2024-02-29T12:34:56.789Z");
        assert_eq!(iso8601(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn ids_are_distinct_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let id = next_id();
            assert!(seen.insert(id));
            assert_eq!(u64::from_str_radix(&id_string(id), 16).unwrap(), id);
        }
    }
}

#[cfg(test)]
mod config_tests {
    use crate::config::{parse, Integration, RouteMatch};
    use crate::router::Params;
    use std::path::Path;

    #[test]
    fn stages_serve_the_handshake_at_their_prefix() {
        let text = r#"
[[upstreams]]
name = "be"
targets = ["127.0.0.1:9"]
[[apis]]
name = "chat"
protocol = "websocket"
base_path = "/ws"
[apis.stages.prod]
variables = { p = "/prod-hook" }
[apis.stages.dev]
variables = { p = "/dev-hook" }
[[apis.routes]]
route = "$default"
integration = { type = "http", upstream = "be", path = "${stageVariables.p}" }
"#;
        let c = parse(Path::new("t.toml"), text).unwrap();
        let mut params = Params::new();
        for (path, stage, hook) in [
            ("/ws/prod", "prod", "/prod-hook"),
            ("/ws/dev", "dev", "/dev-hook"),
        ] {
            let RouteMatch::Found(id) = c.routes.find(None, "GET", path, &mut params) else {
                panic!("{path} not found")
            };
            let r = c.routes.route(id);
            let Integration::WebSocket(api) = &r.integration else {
                panic!("not a websocket route")
            };
            assert_eq!(&*api.stage, stage);
            assert!(matches!(
                api.routes.get("$default").map(|r| &r.target),
                Some(crate::ws::WsTarget::Http { path, .. }) if path == hook
            ));
            assert_eq!(api.settings.limits.max_message, 128 * 1024);
        }
        assert_eq!(
            c.routes.find(None, "POST", "/ws/prod", &mut params),
            RouteMatch::MethodNotAllowed
        );
        assert_eq!(
            c.routes.find(None, "GET", "/ws", &mut params),
            RouteMatch::NotFound
        );
    }

    #[test]
    fn route_selection_only_on_websocket_apis() {
        let text = r#"
[[apis]]
name = "h"
route_selection = "$request.body.action"
[[apis.routes]]
route = "GET /x"
integration = { type = "mock" }
"#;
        let e = parse(Path::new("t.toml"), text).unwrap_err().0;
        assert!(
            e.contains("t.toml:4:") && e.contains("route_selection"),
            "{e}"
        );
        let text = r#"
[[apis]]
name = "c"
protocol = "websocket"
[[apis.routes]]
route = "$default"
integration = { type = "mock" }
[[apis.routes]]
route = "$default"
integration = { type = "mock" }
"#;
        let e = parse(Path::new("t.toml"), text).unwrap_err().0;
        assert!(e.contains("routes[1].route") && e.contains("twice"), "{e}");
    }

    #[test]
    fn handshake_only_settings_on_message_routes_name_their_key_and_line() {
        for (key, value, line) in [
            ("throttle", "{ rate = 1, burst = 1 }", 11),
            ("auth", "\"api_key\"", 11),
            ("cache", "{ ttl = 5 }", 11),
            ("request_mapping", "{ \"header.x\" = \"y\" }", 11),
        ] {
            let text = format!(
                r#"
[[apis]]
name = "c"
protocol = "websocket"
[[apis.routes]]
route = "$connect"
integration = {{ type = "mock" }}
[[apis.routes]]
route = "join"
integration = {{ type = "mock" }}
{key} = {value}
"#
            );
            let e = parse(Path::new("t.toml"), &text).unwrap_err().0;
            assert!(
                e.contains(&format!("t.toml:{line}:"))
                    && e.contains(&format!("apis[0].routes[1].{key}")),
                "{key}: {e}"
            );
        }
    }
}
