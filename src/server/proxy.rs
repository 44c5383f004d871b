//! The `http` integration: forward a request to an upstream over a pooled keep-alive
//! connection, stream both bodies through without holding them whole, retry when it is safe,
//! and map failures to 502/503/504.
//!
//! The request head and whatever body the client already sent go upstream in one write; the
//! response head and the body bytes that came with it go to the client in one write.

use super::{map_ctx, reject, ClientIo, Conn, Outcome, Worker, STREAM_BUF};
use crate::config::{PathTemplate, Route};
use crate::gateway::Gateway;
use crate::http::encode;
use crate::http::{BodyKind, ChunkedDecoder, HeaderKind, HttpError, Method, RespBody, Status};
use crate::upstream::{peek, reset_by_peer, NextRead, Peek};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::{RecvHeld, TcpStream};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

/// Interim (1xx) answers passed on per request; later ones are dropped.
const MAX_INTERIM: usize = 8;

/// Why one attempt at an upstream failed.
enum Fail {
    /// Could not connect: always safe to try another target.
    Connect,
    /// The connection broke before any response byte.
    BeforeResponse,
    /// No response head before the deadline.
    Timeout,
    /// The upstream sent something that is not HTTP/1.1.
    BadResponse,
    /// The upstream's response head is past the gateway's limits (502, as a bad one).
    OverLimits,
    /// Bytes that are no response at all (not even `HTTP/`) where a response head should be,
    /// on a reused connection: left behind by an earlier answer (a late body after a HEAD or
    /// 204), so the request was not answered.
    Leftover,
    /// The client went away or sent a bad body while we streamed it; already answered or
    /// not answerable.
    Client(u16),
}

/// The most of a request (head and body) kept to be sent again after a failure before any
/// answer byte: a larger body is streamed through and not kept, so such a request is not
/// retried (as Envoy stops retrying a request whose body outgrew its buffer limit).
const REPLAY_MAX: usize = 64 << 10;

/// Proxies the request in `c` to `upstreams[up_idx]`.
pub(super) async fn proxy<S: ClientIo>(
    w: &Rc<Worker>,
    gw: &Arc<Gateway>,
    c: &mut Conn<S>,
    route: &Route,
    up_idx: usize,
    tpl: Option<&PathTemplate>,
    cap: Option<&mut crate::cache::Capture>,
) -> Outcome {
    let up = &gw.upstreams[up_idx];
    let limits = &gw.config.server.limits;
    if c.b.head.upgrade_websocket {
        // Pass-through: refuse a broken handshake here rather than upstream.
        if let Err(r) =
            crate::ws::handshake::validate(&c.b.head, &c.b.rbuf, &route.ws.allowed_origins)
        {
            return super::reject_ws(w, c, r.status, r.message).await;
        }
    }
    build_request_head(c, route, tpl, up.cfg.targets.first());

    // Whatever body the client already sent goes with the head.
    let body_start = c.b.head.head_len;
    let avail = &c.b.rbuf[body_start..];
    let mut decoder = None;
    let (buffered, mut remaining, mut body_done) = match c.b.head.body {
        BodyKind::None => (0, 0u64, true),
        BodyKind::Length(n) => {
            let take = (n.min(avail.len() as u64)) as usize;
            (take, n - take as u64, take as u64 == n)
        }
        BodyKind::Chunked => {
            // Passed on as it came, but for its trailer fields (filtered: see
            // `push_allowed_trailers`).
            let mut d = ChunkedDecoder::new(limits.max_body_bytes);
            d.limit_trailers(limits.max_header_bytes, limits.max_headers);
            d.deny(route_checked_headers(gw, route));
            match d.feed_without_trailers(avail, |_| {}) {
                Ok((used, done, keep)) => {
                    c.b.out.extend_from_slice(&avail[..keep]);
                    if done {
                        d.push_trailers(&mut c.b.out);
                    }
                    decoder = Some(d);
                    (used, 0, done)
                }
                Err(e) => {
                    let (st, msg) = chunk_error(&e);
                    return reject(w, c, st, msg, false).await;
                }
            }
        }
    };
    if decoder.is_none() {
        c.b.out
            .extend_from_slice(&c.b.rbuf[body_start..body_start + buffered]);
    }
    c.consumed = body_start + buffered;

    // `Expect: 100-continue` is answered once a target and its slot are had: a request refused
    // for want of one (503) is not first invited to send its body.
    let mut to_continue = c.b.head.expect_continue && !body_done;
    let hash = match &up.cfg.balance {
        crate::config::Balance::HashHeader(h) => {
            c.b.head.header(&c.b.rbuf, h).map(crate::upstream::hash_key)
        }
        _ => None,
    };
    let idempotent = c.b.head.method.is_idempotent();
    // The request can be sent again (to a fresh connection or another target) only while all
    // of it that was taken from the client is still in `c.b.out`: the body bytes streamed
    // upstream are copied there too, up to `REPLAY_MAX` in all; past that, `lost` is set and
    // a failure after the upload began is final (502), since the body is gone. A request that
    // is never sent again once sent (not idempotent) keeps no copy.
    let mut lost = !idempotent;
    let mut tried: u64 = 0;
    let mut retries_left = up.cfg.retries;
    let mut any_target = false;
    let started = Instant::now();
    // A request that waited for another request's cache fetch has less than `timeout_ms`
    // left: running out of it is then no fault of the target, for passive checks.
    let shortened = c
        .upstream_by
        .is_some_and(|by| by < started + up.cfg.timeout);
    let deadline = match c.upstream_by.take() {
        Some(by) => by.min(started + up.cfg.timeout),
        None => started + up.cfg.timeout,
    };
    if started >= deadline {
        // Its whole `timeout_ms` went on waiting for another request's fetch.
        return reject(w, c, 504, "Endpoint Request Timed Out", false).await;
    }

    // Targets that reached their `max_connections` between the pick and taking a slot.
    let mut full: u64 = 0;
    loop {
        let pick = w.pools.borrow_mut().pick(up, hash, tried | full);
        let Some(ti) = pick else {
            let (st, msg) = if any_target {
                (502, "Bad Gateway")
            } else {
                (503, "Service Unavailable")
            };
            // Every target the checks pass is at its `max_connections`: the client may try
            // again soon (as a throttled request), when requests in flight have ended.
            // (Before any target was tried, a target the checks pass was passed over only
            // for being full.)
            let overflow = !any_target
                && up.cfg.max_connections.is_some()
                && up.health.iter().any(|h| h.is_healthy());
            if overflow {
                up.overflowed();
                c.b.extra.extend_from_slice(b"retry-after: 1\r\n");
            }
            let keep = body_done;
            return reject(w, c, st, msg, keep).await;
        };
        // One of the target's `max_connections`, held until its connection is pooled or
        // closed (dropped with this loop's iteration, or after the answer; a WebSocket tunnel
        // takes it along).
        let Some(slot) = up.occupy(ti) else {
            full |= 1 << ti.min(63);
            continue;
        };
        any_target = true;
        let addr = up.cfg.targets[ti];
        tried |= 1 << ti.min(63);
        if to_continue {
            to_continue = false;
            let (res, _) = c
                .stream
                .write_all(&b"HTTP/1.1 100 Continue\r\n\r\n"[..])
                .await;
            if res.is_err() {
                return Outcome {
                    status: 499,
                    keep_alive: false,
                    upstream: None,
                };
            }
        }

        // A pooled connection first (one with nothing waiting on it: see `take`); a stale
        // one is replaced by a fresh one, once.
        let mut pooled = w.pools.borrow_mut().take(addr);
        let mut fresh_tries = 0;
        let res = loop {
            let (mut us, next, reused) = match pooled.take() {
                Some(p) => (p.stream, p.next, true),
                None => {
                    // Bounded by the request's own deadline too: `timeout_ms` runs from the
                    // start of the request, connects and retries included.
                    let left = deadline.saturating_duration_since(Instant::now());
                    let limit = up.cfg.connect_timeout.min(left);
                    match monoio::time::timeout(limit, TcpStream::connect_addr(addr)).await {
                        Ok(Ok(mut s)) => {
                            let _ = s.set_nodelay(true);
                            if super::multishot_enabled() {
                                let _ = s.enable_multishot_recv();
                            }
                            (s, None, false)
                        }
                        Ok(Err(_)) => {
                            up.failed(ti);
                            break Err(Fail::Connect);
                        }
                        // A connect cut short by the request's own deadline is not counted.
                        Err(_) => {
                            if limit == up.cfg.connect_timeout {
                                up.failed(ti);
                            }
                            break Err(Fail::Connect);
                        }
                    }
                }
            };
            let r = exchange(
                c,
                &mut us,
                next,
                &mut remaining,
                &mut body_done,
                &mut lost,
                &mut decoder,
                deadline,
                up.cfg.timeout,
                limits,
            )
            .await;
            match r {
                Ok(()) => {
                    up.succeeded(ti);
                    break Ok(us);
                }
                // A reused connection that broke before any byte of an answer (most often
                // closed by the upstream while it idled in the pool, before the request
                // arrived). Whether the upstream's application saw the request cannot be told,
                // so only a request that does no harm when repeated is sent again (as nginx
                // without `non_idempotent`). An invalid answer is not retried: the upstream
                // did answer (nginx's default `proxy_next_upstream` leaves out
                // `invalid_header` too). Bytes an earlier bodiless answer left behind are no
                // answer: mostly caught before the connection is pooled (see `respond`), else
                // told apart by not starting like a status line.
                Err(Fail::BeforeResponse | Fail::Leftover)
                    if reused && fresh_tries == 0 && !lost && idempotent =>
                {
                    // On a fresh connection. The other idle ones are as old (an upstream
                    // restart or idle timeout closes them all), so they go too.
                    fresh_tries += 1;
                    w.pools.borrow_mut().clear(addr);
                    continue;
                }
                Err(e) => {
                    // The target's fault, for passive checks: not a pooled connection that
                    // went stale while it idled, nor bytes an earlier answer left behind on
                    // it (on a fresh connection, bytes that are no answer are the target's).
                    if (matches!(e, Fail::Timeout) && !shortened)
                        || matches!(e, Fail::BadResponse)
                        || (matches!(e, Fail::BeforeResponse | Fail::Leftover) && !reused)
                    {
                        up.failed(ti);
                    }
                    break Err(e);
                }
            }
        };
        let res = match res {
            Ok(us) => Ok(us),
            Err(Fail::Client(status)) => {
                // The client's body was bad, too big or too slow: tell it (nothing has been
                // sent to it yet). A client that went away gets nothing.
                let msg = match status {
                    400 => Some("Bad Request: invalid chunked body"),
                    408 => Some("Request Timeout"),
                    413 => Some("Request Entity Too Large"),
                    431 => Some("Request Header Fields Too Large"),
                    _ => None,
                };
                if let Some(msg) = msg {
                    let mut o = reject(w, c, status, msg, false).await;
                    o.upstream = Some(addr);
                    return o;
                }
                return Outcome {
                    status,
                    keep_alive: false,
                    upstream: Some(addr),
                };
            }
            // The request was sent whole before the wait for the answer began, so the client
            // connection is in step: it stays open for the requests behind (as nginx).
            Err(Fail::Timeout) => {
                Err(reject(w, c, 504, "Endpoint Request Timed Out", body_done).await)
            }
            Err(Fail::BadResponse | Fail::Leftover | Fail::OverLimits) => {
                w.log_upstream_error(
                    addr,
                    "invalid response head, or one past server.limits (max_headers, or max(max_header_bytes, 16 KiB))",
                );
                Err(reject(w, c, 502, "Bad Gateway", body_done).await)
            }
            Err(f) => {
                let retryable = matches!(f, Fail::Connect)
                    || (matches!(f, Fail::BeforeResponse) && idempotent && !lost);
                if retryable && retries_left > 0 && Instant::now() < deadline {
                    retries_left -= 1;
                    continue;
                }
                Err(if Instant::now() >= deadline {
                    reject(w, c, 504, "Endpoint Request Timed Out", false).await
                } else {
                    reject(w, c, 502, "Bad Gateway", body_done).await
                })
            }
        };
        // A failure's answer names the target that failed (the access log's `upstream`).
        let us = match res {
            Ok(us) => us,
            Err(mut o) => {
                o.upstream = Some(addr);
                return o;
            }
        };
        if let Ok(mut m) = w.metrics.lock() {
            m.upstream(&up.labels, started.elapsed());
        }
        if c.b.resp.status == 101 {
            if !c.b.head.upgrade_websocket {
                // Switching protocols unasked: the upstream connection is dropped, the
                // client's stays in step (the request was sent whole), as for a bad head.
                w.log_upstream_error(addr, "101 Switching Protocols to a request without Upgrade");
                let mut o = reject(w, c, 502, "Bad Gateway", body_done).await;
                o.upstream = Some(addr);
                return o;
            }
            return upgrade(w, c, us, addr, route, slot).await;
        }
        let rmap = route.response_mapping.as_deref();
        return respond(
            w,
            c,
            us,
            addr,
            up.cfg.keepalive,
            up.cfg.timeout,
            limits.max_headers,
            cap,
            rmap,
        )
        .await;
    }
}

/// The header names this request's route checked or set: a trailer field of one of these
/// names is left out, so a backend that merges trailers into headers cannot be handed a
/// second value for it (its request mapping's headers, its authorizer's identity headers,
/// the WAF's header targets). Made only for chunked requests.
fn route_checked_headers(gw: &Gateway, route: &Route) -> Vec<Box<[u8]>> {
    use crate::policy::auth::authorizer::IdentitySource;
    let sources = route.auth.credential_fields(&gw.config.auth);
    let identity = sources.iter().filter_map(|s| match s {
        IdentitySource::Header(h) => Some(h.as_str()),
        IdentitySource::Query(_) => None,
    });
    let mapped = route.request_mapping.iter().flat_map(|m| m.headers.names());
    let waf = gw.config.traffic.waf.header_targets();
    mapped
        .chain(waf)
        .chain(identity)
        .map(|n| n.as_bytes().to_ascii_lowercase().into_boxed_slice())
        .collect()
}

fn chunk_error(e: &crate::http::ChunkError) -> (u16, &'static str) {
    match e {
        crate::http::ChunkError::TooLarge => (413, "Request Entity Too Large"),
        crate::http::ChunkError::Invalid(m) => (400, m),
        // The head's limits hold for the trailer section too (where nginx has no trailers).
        crate::http::ChunkError::TrailersTooLarge => (431, "Request Header Fields Too Large"),
    }
}

/// Writes the upstream request head into `c.b.out`. `target`: the `Host` for a request that
/// came without one (HTTP/1.0), as nginx's `$proxy_host`: HTTP/1.1 requires it upstream.
fn build_request_head<S: ClientIo>(
    c: &mut Conn<S>,
    route: &Route,
    tpl: Option<&PathTemplate>,
    target: Option<&std::net::SocketAddr>,
) {
    let buf = &c.b.rbuf;
    let head = &c.b.head;
    let out = &mut c.b.out;
    out.clear();
    out.extend_from_slice(head.slice(buf, head.method_range));
    out.push(b' ');
    let path = head.slice(buf, head.path);
    let query = head.query.map(|q| head.slice(buf, q));
    let sep = match tpl {
        Some(t) => {
            t.render(path, &c.params, out);
            if t.has_query() {
                b'&'
            } else {
                b'?'
            }
        }
        // `OPTIONS *` asks about the server, not a resource: forwarded as `*` (RFC 9112
        // 3.2.4), never as the resource `/*`.
        None if path == b"*" => {
            out.push(b'*');
            b'?'
        }
        None => {
            let rest = &path[route.prefix_len.min(path.len())..];
            if !rest.starts_with(b"/") {
                out.push(b'/');
            }
            out.extend_from_slice(rest);
            b'?'
        }
    };
    let rmap = route.request_mapping.as_deref();
    match rmap {
        Some(m) if m.maps_query() => m.push_query(query, sep, &map_ctx!(c), out),
        _ => {
            if let Some(q) = query {
                out.push(sep);
                out.extend_from_slice(q);
            }
        }
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if head.upgrade_websocket {
        // Hop-by-hop, so `forwardable` drops them; a pass-through upgrade puts them back.
        out.extend_from_slice(b"upgrade: websocket\r\nconnection: Upgrade\r\n");
    }
    // A route without a request mapping gets the loop without the per-header name check.
    let client_xff = match rmap {
        None => push_client_headers(out, head, buf, |_| false),
        Some(m) => {
            let xff = push_client_headers(out, head, buf, |name| m.headers.covers(name));
            m.headers.push(&map_ctx!(c), out);
            xff
        }
    };
    // X-Forwarded-For: every client-sent value in order, then the peer.
    out.extend_from_slice(b"x-forwarded-for: ");
    if client_xff {
        for (kind, _, value) in head.forwardable_kinds(buf) {
            if kind == HeaderKind::XForwardedFor {
                out.extend_from_slice(value);
                out.extend_from_slice(b", ");
            }
        }
    }
    encode::push_ip(out, c.peer.ip());
    out.extend_from_slice(if S::TLS {
        b"\r\nx-forwarded-proto: https\r\n"
    } else {
        b"\r\nx-forwarded-proto: http\r\n"
    });
    if let Some(v) = c.stream.xfcc() {
        // Envoy's form: the verified client certificate's hash; a client-sent value never passes.
        encode::push_header(out, b"x-forwarded-client-cert", v);
    }
    match (head.host, target) {
        (Some(h), _) => {
            if head.host_from_target {
                // No Host header came (HTTP/1.0 with an absolute-form target): its authority.
                encode::push_header(out, b"host", head.slice(buf, h));
            }
            encode::push_header(out, b"x-forwarded-host", head.slice(buf, h))
        }
        (None, Some(t)) => {
            out.extend_from_slice(if t.is_ipv6() { b"host: [" } else { b"host: " });
            encode::push_ip(out, t.ip());
            out.extend_from_slice(if t.is_ipv6() { b"]:" } else { b":" });
            encode::push_u64(out, u64::from(t.port()));
            out.extend_from_slice(b"\r\n");
        }
        (None, None) => {}
    }
    encode::push_header(out, b"x-request-id", &c.reqid[..c.reqid_len]);
    if let Some(p) = &c.principal {
        encode::push_header(out, b"x-principal-id", p.as_bytes());
    }
    match head.body {
        BodyKind::None => {}
        BodyKind::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            encode::push_u64(out, n);
            out.extend_from_slice(b"\r\n");
        }
        BodyKind::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes the client's forwardable headers but the gateway's own and those `mapped` owns;
/// returns whether the client sent `X-Forwarded-For` (its values are written later).
#[inline(always)]
fn push_client_headers(
    out: &mut Vec<u8>,
    head: &crate::http::RequestHead,
    buf: &[u8],
    mapped: impl Fn(&[u8]) -> bool,
) -> bool {
    let mut client_xff = false;
    for (kind, name, value) in head.forwardable_kinds(buf) {
        match kind {
            // Written later, from the client's values and the peer.
            HeaderKind::XForwardedFor => client_xff = true,
            // The gateway's own, replacing any the client sent.
            HeaderKind::XForwardedProto
            | HeaderKind::XForwardedHost
            | HeaderKind::XRequestId
            | HeaderKind::XPrincipalId
            | HeaderKind::XForwardedClientCert
            | HeaderKind::ClientForwarding => {}
            // The relay checks frames; no extension (compression sets RSV1) is negotiated.
            HeaderKind::SecWebSocketExtensions if head.upgrade_websocket => {}
            // Owned by the route's request mapping.
            HeaderKind::Other if mapped(name) => {}
            _ => encode::push_header(out, name, value),
        }
    }
    client_xff
}

/// How long to look for an early answer once the upstream stopped taking the request body.
const EARLY_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// How long an answer may take before the client's socket is watched as well: a client that
/// goes away while the upstream works ends the exchange (logged as 499, as nginx does). Fast
/// answers never arm the watch, so the keep-alive path pays nothing for it.
const CLIENT_WATCH_AFTER: std::time::Duration = std::time::Duration::from_millis(200);

pin_project_lite::pin_project! {
    /// A read of the upstream's answer: a detached read (a pooled connection's, or one with
    /// `IORING_RECVSEND_POLL_FIRST`), or a read through the connection's multishot receive.
    #[project = NextOrMultiProj]
    enum NextOrMulti<M> {
        Next { #[pin] read: NextRead },
        Multi { #[pin] read: M },
    }
}

/// What a read of the upstream's answer gives.
type ReadOut = <NextRead as std::future::Future>::Output;

impl<M> std::future::Future for NextOrMulti<M>
where
    M: std::future::Future<Output = <NextRead as std::future::Future>::Output>,
{
    type Output = M::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<M::Output> {
        match self.project() {
            NextOrMultiProj::Next { read } => read.poll(cx),
            NextOrMultiProj::Multi { read } => read.poll(cx),
        }
    }
}

/// Whether the upstream's answer has begun (bytes or its end came) before the last byte of
/// the request body goes out to it. Such an upstream did not wait for the body, so it may not
/// read it as a body at all: its connection is not pooled, else bytes it left unread (a
/// request's start smuggled in the body) would be glued to the next client's request, as
/// Envoy closes a connection whose answer comes before the request is complete. Looks where
/// the bytes can be: a detached read of a pooled connection (polled once, without waiting:
/// what it read is kept in `came`), the multishot receive, else the socket.
fn answer_started(us: &TcpStream, next: &mut Option<NextRead>, came: &mut Option<ReadOut>) -> bool {
    if let Some(read) = next.as_mut() {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        // Pending: the read stays in flight (a later poll registers the real waker).
        if let std::task::Poll::Ready(out) =
            std::future::Future::poll(std::pin::Pin::new(read), &mut cx)
        {
            *next = None;
            *came = Some(out);
            return true;
        }
        return false;
    }
    us.recv_held() != RecvHeld::Nothing || !matches!(peek(us), Peek::Nothing)
}

/// How a wait for the upstream's next bytes ended.
pub(super) enum Wait<T> {
    Read(T),
    Deadline,
    /// The client closed or reset its connection.
    ClientGone,
}

/// The rest of a slow wait for the upstream (past the `watch_at` of [`exchange`]): `read` until
/// `deadline`, watching the client's socket too. `watching` is cleared when the client turns
/// out to have sent more (a pipelined request: it is still there, and its bytes stay unread).
/// `pipelined`: bytes of a request behind were read already; the client is then gone only
/// when it resets the connection, not when it half-closes.
pub(super) async fn wait_watching_client<F: std::future::Future>(
    mut read: std::pin::Pin<&mut F>,
    client: &TcpStream,
    watching: &mut bool,
    pipelined: bool,
    deadline: Instant,
) -> Wait<F::Output> {
    let mut end = std::pin::pin!(monoio::time::sleep_until(deadline.into()));
    while *watching {
        monoio::select! {
            r = &mut read => return Wait::Read(r),
            _ = &mut end => return Wait::Deadline,
            ready = client.readable(false) => {
                // With a multishot receive, what came may already be held there rather than
                // in the socket (a pipelined request, then the client's FIN).
                let held = match client.recv_held() {
                    _ if pipelined || client.recv_pending() => {
                        // A request is waiting behind: a FIN leaves the client waiting for
                        // the answers; a reset ends it.
                        Ok(if reset_by_peer(client) { Peek::Gone } else { Peek::Data })
                    }
                    RecvHeld::End => Ok(Peek::Gone),
                    _ => ready.map(|()| peek(client)),
                };
                match held {
                    Err(_) | Ok(Peek::Gone) => return Wait::ClientGone,
                    Ok(Peek::Data) => *watching = false,
                    Ok(Peek::Nothing) => {}
                }
            }
        }
    }
    monoio::select! {
        r = &mut read => Wait::Read(r),
        _ = &mut end => Wait::Deadline,
    }
}

/// Sends the request (head, buffered body, streamed rest: see `stream_request_body` for
/// `lost`) and reads the response head into `c.b.ubuf`/`c.b.resp`, by `deadline`; when the body had to be streamed from the client
/// first, the upstream gets its whole `timeout` from the end of the upload (a slow client is
/// bounded by the idle timeout, not charged to the upstream), as Envoy's route timeout.
#[allow(
    clippy::too_many_arguments,
    reason = "one exchange's whole state, kept by the caller across a retry"
)]
async fn exchange<S: ClientIo>(
    c: &mut Conn<S>,
    us: &mut TcpStream,
    mut next: Option<NextRead>,
    remaining: &mut u64,
    body_done: &mut bool,
    lost: &mut bool,
    decoder: &mut Option<ChunkedDecoder>,
    mut deadline: Instant,
    timeout: std::time::Duration,
    limits: &crate::config::Limits,
) -> Result<(), Fail> {
    let out = std::mem::take(&mut c.b.out);
    let (res, out) = us.write_all(out).await;
    c.b.out = out;
    if res.is_err() {
        return Err(Fail::BeforeResponse);
    }
    // Set when the upstream stopped taking the body: it may have answered early (a 403 or 413
    // before the upload ended), and that answer is what the client should get.
    let mut early = false;
    // The upstream answered before the whole body went out (see `answer_started`).
    let mut answered_first = false;
    let mut came = None;
    if !*body_done {
        let before_last = |us: &TcpStream| {
            answered_first = answer_started(us, &mut next, &mut came);
        };
        let streamed = stream_request_body(
            c,
            us,
            remaining,
            body_done,
            lost,
            decoder,
            limits,
            before_last,
        );
        match streamed.await {
            Ok(()) => {
                deadline = deadline.max(Instant::now() + timeout);
            }
            Err(Fail::BeforeResponse) => {
                early = true;
                deadline = deadline.min(Instant::now() + EARLY_ANSWER_WAIT);
            }
            Err(e) => return Err(e),
        }
    }
    // Response head: into the buffer of the read a pooled connection has in flight, else
    // into `ubuf`.
    c.b.ubuf.clear();
    if next.is_none() && c.b.ubuf.capacity() < 4096 {
        c.b.ubuf.reserve(4096);
    }
    let hl = crate::http::Limits {
        max_header_bytes: limits.max_header_bytes.max(16384),
        max_headers: limits.max_headers,
    };
    // When the client is watched as well (a slow answer; not a client still uploading, which
    // is about to be answered early).
    let watch_at = deadline
        .checked_sub(timeout)
        .map(|t| t + CLIENT_WATCH_AFTER)
        .filter(|&t| !early && t < deadline);
    let mut watching = watch_at.is_some();
    // Interim answers passed on to the client: once one is, the request cannot go to another
    // target.
    let mut interim = 0usize;
    // Any interim answer came (passed on or not): the upstream has the request, so what
    // follows is its answer, never an earlier answer's leftover, and never sent again.
    let mut answered = false;
    loop {
        if !c.b.ubuf.is_empty() {
            match c.b.resp.parse(&c.b.ubuf, c.b.head.method, &hl) {
                Ok(Status::Complete(n)) => {
                    let status = c.b.resp.status;
                    if (100..200).contains(&status) && status != 101 {
                        answered = true;
                        // RFC 9110 15.2: a proxy passes interim answers on (103 Early Hints,
                        // 102 Processing), to HTTP/1.1 clients only; not 100 Continue (the
                        // gateway answers `Expect` itself), and not past a bound.
                        if status != 100 && c.b.head.minor_version == 1 && interim < MAX_INTERIM {
                            interim += 1;
                            let mut out = Vec::with_capacity(n + 32);
                            encode::push_status_line(&mut out, status);
                            for (name, value) in c.b.resp.forwardable(&c.b.ubuf) {
                                encode::push_header(&mut out, name, value);
                            }
                            out.extend_from_slice(b"\r\n");
                            let (res, _) = c.stream.write_all(out).await;
                            if res.is_err() {
                                return Err(Fail::Client(499));
                            }
                        }
                        c.b.ubuf.drain(..n);
                        continue;
                    }
                    if early {
                        // The rest of the client's body was never read: neither connection
                        // can carry another request.
                        c.b.resp.keep_alive = false;
                        c.b.head.keep_alive = false;
                    }
                    if answered_first {
                        c.b.resp.keep_alive = false;
                    }
                    return Ok(());
                }
                Ok(Status::Partial) => {}
                Err(_) if !c.b.ubuf.starts_with(b"HTTP/") && !early && !answered => {
                    return Err(Fail::Leftover)
                }
                // Over the gateway's own limits: the answer may be fine for another client,
                // so it is no failure of the target for passive checks (nor for nginx).
                Err(HttpError::HeadTooLarge | HttpError::TooManyHeaders) => {
                    return Err(Fail::OverLimits)
                }
                Err(_) => return Err(Fail::BadResponse),
            }
        }
        // A detached read that completed while the body was still being sent is the answer's
        // first bytes already: no read to wait on.
        let waited = match came.take() {
            Some(out) => Wait::Read(out),
            None => {
                let read = match next.take() {
                    Some(r) => NextOrMulti::Next { read: r },
                    None => {
                        if c.b.ubuf.len() == c.b.ubuf.capacity() {
                            c.b.ubuf.reserve(4096);
                        }
                        let len = c.b.ubuf.len();
                        let cap = c.b.ubuf.capacity();
                        let buf = std::mem::take(&mut c.b.ubuf).slice_mut(len..cap);
                        if us.multishot_enabled() {
                            NextOrMulti::Multi { read: us.read(buf) }
                        } else {
                            // Nothing read yet: the answer to a request just sent is not
                            // there yet.
                            NextOrMulti::Next {
                                read: us.recv_detached(buf, len == 0),
                            }
                        }
                    }
                };
                let mut read = std::pin::pin!(read);
                // An absolute deadline: no clock read to arm the timer. The timer drops only
                // the reference: past `watch_at` the read goes on, the client watched beside
                // it.
                let first = match watch_at {
                    Some(t) if watching => t,
                    _ => deadline,
                };
                match monoio::time::timeout_at(first.into(), &mut read).await {
                    Ok(r) => Wait::Read(r),
                    Err(_) if first == deadline => Wait::Deadline,
                    Err(_) => {
                        // A pipelined request already read: a half-close does not end the
                        // client.
                        let pipelined = c.b.rbuf.len() > c.consumed || !c.b.leftover.is_empty();
                        let client = c.stream.tcp();
                        Box::pin(wait_watching_client(
                            read,
                            client,
                            &mut watching,
                            pipelined,
                            deadline,
                        ))
                        .await
                    }
                }
            }
        };
        match waited {
            Wait::Deadline => {
                c.b.ubuf = Vec::with_capacity(4096);
                return Err(if early && !answered {
                    Fail::BeforeResponse
                } else {
                    Fail::Timeout
                });
            }
            Wait::ClientGone => {
                // Nobody waits for the answer: the upstream connection is closed (not pooled)
                // and the request logged as 499.
                c.b.ubuf = Vec::with_capacity(4096);
                return Err(Fail::Client(499));
            }
            Wait::Read((res, buf)) => {
                c.b.ubuf = buf.into_inner();
                match res {
                    Ok(0) | Err(_) => {
                        return Err(if (c.b.ubuf.is_empty() || early) && !answered {
                            Fail::BeforeResponse
                        } else {
                            Fail::BadResponse
                        })
                    }
                    Ok(_) => {}
                }
            }
        }
    }
}

/// Streams the rest of the request body from the client to the upstream. While `lost` is unset
/// each piece is also appended to `c.b.out` (after the head and the body that came with it), so
/// the request can be sent again whole; a piece that would take it past `REPLAY_MAX` sets `lost`.
#[allow(clippy::too_many_arguments)]
async fn stream_request_body<S: ClientIo>(
    c: &mut Conn<S>,
    us: &mut TcpStream,
    remaining: &mut u64,
    body_done: &mut bool,
    lost: &mut bool,
    decoder: &mut Option<ChunkedDecoder>,
    limits: &crate::config::Limits,
    mut before_last: impl FnMut(&TcpStream),
) -> Result<(), Fail> {
    // Everything in rbuf past `consumed` is part of the body: it was all forwarded already,
    // so reads go into a separate streaming buffer.
    let mut bbuf: Vec<u8> = Vec::with_capacity(STREAM_BUF);
    loop {
        let (res, b) = match monoio::time::timeout(limits.idle_timeout, c.stream.read(bbuf)).await {
            Ok(r) => r,
            Err(_) => return Err(Fail::Client(408)),
        };
        bbuf = b;
        match res {
            Ok(0) | Err(_) => return Err(Fail::Client(499)),
            Ok(_) => {}
        }
        let (used, done, keep) = match decoder {
            None => {
                let n = (*remaining).min(bbuf.len() as u64) as usize;
                *remaining -= n as u64;
                (n, *remaining == 0, n)
            }
            Some(d) => match d.feed_without_trailers(&bbuf, |_| {}) {
                Ok(r) => r,
                Err(e) => return Err(Fail::Client(chunk_error(&e).0)),
            },
        };
        if done {
            // Bytes after the body are the next pipelined request; the head stays in rbuf
            // until this request is logged. The body is all taken from the client now, even
            // if the write below fails: a request sent again must not wait for more of it.
            c.b.leftover.extend_from_slice(&bbuf[used..]);
            c.consumed = c.b.rbuf.len();
            *body_done = true;
        }
        // What goes on: the bytes as they came, up to a chunked body's trailer section, which
        // ends the body filtered.
        bbuf.truncate(keep);
        if done {
            if let Some(d) = decoder {
                d.push_trailers(&mut bbuf);
            }
        }
        // Kept after what was sent before, so the request can be sent again whole.
        if !*lost {
            if c.b.out.len() + bbuf.len() <= REPLAY_MAX {
                c.b.out.extend_from_slice(&bbuf);
            } else {
                *lost = true;
            }
        }
        if done {
            before_last(us);
        }
        let (res, b) = us.write_all(bbuf).await;
        bbuf = b;
        if res.is_err() {
            // The upstream stopped reading (it may have answered early); sent again only if
            // all of it is still in `c.b.out` (`lost` unset), else the caller answers 502.
            return Err(Fail::BeforeResponse);
        }
        if done {
            return Ok(());
        }
        bbuf.clear();
    }
}

/// The upstream accepted a WebSocket upgrade: relays its 101 and hands both connections (and
/// any frame bytes that came with the 101) to the WebSocket relay.
async fn upgrade<S: ClientIo>(
    w: &Rc<Worker>,
    c: &mut Conn<S>,
    us: TcpStream,
    addr: SocketAddr,
    route: &Route,
    slot: crate::upstream::Slot,
) -> Outcome {
    let head_len = c.b.resp.head_len;
    // No extension was offered to the upstream (the client's offer is removed), so one in its
    // answer breaks RFC 6455 4.1: the client would turn compression on, and the relay cannot
    // carry it. The handshake fails, as a client fails it.
    let ext =
        c.b.resp
            .forwardable_kinds(&c.b.ubuf)
            .any(|(_, name, _)| name.eq_ignore_ascii_case(b"sec-websocket-extensions"));
    if ext {
        w.log_upstream_error(
            addr,
            "WebSocket 101 names an extension that was not offered",
        );
        return super::reject(w, c, 502, "Bad Gateway", false).await;
    }
    // A 101 to another protocol, or one whose accept key is not the client's (RFC 6455 4.1:
    // the client fails such a handshake), is not relayed as a WebSocket.
    let upgrade_ok =
        c.b.resp
            .header_kind(&c.b.ubuf, HeaderKind::Upgrade)
            .is_some_and(|v| v.trim_ascii().eq_ignore_ascii_case(b"websocket"));
    let accept_ok = match (
        c.b.head.header(&c.b.rbuf, "sec-websocket-key"),
        c.b.resp
            .forwardable(&c.b.ubuf)
            .find(|(n, _)| n.eq_ignore_ascii_case(b"sec-websocket-accept")),
    ) {
        (Some(key), Some((_, v))) => {
            v.trim_ascii() == crate::ws::handshake::accept_key(key.trim_ascii()).as_bytes()
        }
        _ => false,
    };
    if !upgrade_ok || !accept_ok {
        w.log_upstream_error(
            addr,
            "101 without `Upgrade: websocket` and the client's Sec-WebSocket-Accept",
        );
        let mut o = super::reject(w, c, 502, "Bad Gateway", false).await;
        o.upstream = Some(addr);
        return o;
    }
    c.b.out.clear();
    encode::push_status_line(&mut c.b.out, 101);
    c.b.out
        .extend_from_slice(b"upgrade: websocket\r\nconnection: Upgrade\r\n");
    let mut date = false;
    for (kind, name, value) in c.b.resp.forwardable_kinds(&c.b.ubuf) {
        if kind != HeaderKind::XRequestId {
            date |= name.eq_ignore_ascii_case(b"date");
            encode::push_header(&mut c.b.out, name, value);
        }
    }
    if !date {
        encode::push_header(&mut c.b.out, b"date", w.date.borrow_mut().get());
    }
    encode::push_header(&mut c.b.out, b"x-request-id", &c.reqid[..c.reqid_len]);
    c.b.out.extend_from_slice(b"\r\n");
    // Frame bytes that came with the 101 go through the relay, whose frame scanner must see
    // the stream from its first byte.
    let from_upstream = c.b.ubuf[head_len..].to_vec();
    c.b.ubuf.clear();
    if c.b.ubuf.capacity() > 4 * 4096 {
        c.b.ubuf = Vec::new();
    }
    let ok = super::write_out(c).await;
    if ok {
        c.takeover = Some(crate::ws::Takeover::Relay {
            upstream: us,
            from_upstream,
            settings: route.ws.clone(),
            slot,
        });
    }
    Outcome {
        status: 101,
        keep_alive: false,
        upstream: Some(addr),
    }
}

/// Writes the upstream's forwardable response headers but `x-request-id` (the gateway's),
/// `x-cache` on a cached route, `access-control-*` when the gateway answers CORS, and those
/// `mapped` owns. Returns whether the upstream sent a `Date` (or `mapped` owns it).
#[inline(always)]
fn push_upstream_headers(
    out: &mut Vec<u8>,
    resp: &crate::http::ResponseHead,
    buf: &[u8],
    cached: bool,
    gateway_cors: bool,
    mapped: impl Fn(&[u8]) -> bool,
) -> bool {
    let mut date = false;
    for (kind, name, value) in resp.forwardable_kinds(buf) {
        if kind == HeaderKind::Other && name.len() == 4 && name.eq_ignore_ascii_case(b"date") {
            date = true;
        }
        match kind {
            HeaderKind::XRequestId => {}
            HeaderKind::XCache if cached => {}
            // The gateway's CORS headers replace the upstream's.
            HeaderKind::AccessControl if gateway_cors => {}
            // Owned by the route's response mapping.
            HeaderKind::Other if mapped(name) => {}
            _ => encode::push_header(out, name, value),
        }
    }
    date || mapped(b"date")
}

/// Sends the upstream's response to the client (through the route's response mapping) and
/// returns the upstream connection to the pool when it can be reused.
#[allow(clippy::too_many_arguments, reason = "the response's whole context")]
async fn respond<S: ClientIo>(
    w: &Rc<Worker>,
    c: &mut Conn<S>,
    mut us: TcpStream,
    addr: SocketAddr,
    keepalive: usize,
    read_timeout: std::time::Duration,
    max_headers: usize,
    mut cap: Option<&mut crate::cache::Capture>,
    rmap: Option<&crate::policy::mapping::HeaderMapping>,
) -> Outcome {
    let status = c.b.resp.status;
    let head_len = c.b.resp.head_len;
    let is_head = c.b.head.method == Method::Head;
    let client_10 = c.b.head.minor_version == 0;
    let mut keep = w.keep_alive(&c.b.head);
    // How the body is framed toward the client: a chunked body is decoded for an HTTP/1.0
    // client; a body that ends when the upstream closes goes out chunked to an HTTP/1.1 one
    // (as nginx does), so the client tells the end from a cut and the connection stays open.
    let mut dechunk = false;
    let mut chunk_out = false;
    c.b.out.clear();
    encode::push_status_line(&mut c.b.out, status);
    // A route without a response mapping gets the loop without the per-header name check.
    let (cached, cors) = (cap.is_some(), c.gateway_cors);
    let date = match rmap {
        None => push_upstream_headers(&mut c.b.out, &c.b.resp, &c.b.ubuf, cached, cors, |_| false),
        Some(m) => {
            let covers = |n: &[u8]| m.covers(n);
            let date =
                push_upstream_headers(&mut c.b.out, &c.b.resp, &c.b.ubuf, cached, cors, covers);
            m.push(&map_ctx!(c), &mut c.b.out);
            date
        }
    };
    if !date {
        // RFC 9110 6.6.1: a recipient with a clock adds the `Date` an origin left out (as
        // nginx does), and keeps it with the response when it is stored.
        encode::push_header(&mut c.b.out, b"date", w.date.borrow_mut().get());
    }
    if let Some(cap) = cap.as_deref_mut() {
        // A cached route: say it was a miss, and keep the response when it may be stored
        // (without the mapped headers: a hit writes them for its own request).
        c.b.out.extend_from_slice(b"x-cache: miss\r\n");
        let mut dc = w.date.borrow_mut();
        cap.begin(&c.b.resp, &c.b.ubuf, rmap, (!date).then(|| dc.get()));
    }
    if cors {
        // One `Vary: Origin` in the answer, the upstream's or the gateway's.
        let dup = c.b.resp.forwardable(&c.b.ubuf).any(|(n, v)| {
            n.eq_ignore_ascii_case(b"vary") && crate::policy::cors::vary_lists_origin(v)
        });
        crate::policy::cors::push_extra(&mut c.b.out, &c.b.extra, dup);
    } else {
        c.b.out.extend_from_slice(&c.b.extra);
    }
    match c.b.resp.body {
        RespBody::None => {
            // The length of what a GET would get (RFC 9110 8.6); never on a 204.
            if (is_head && status != 204) || status == 304 {
                if let Some(v) = c.b.resp.header_kind(&c.b.ubuf, HeaderKind::ContentLength) {
                    encode::push_header(&mut c.b.out, b"content-length", v);
                }
            }
        }
        RespBody::Length(n) => {
            c.b.out.extend_from_slice(b"content-length: ");
            encode::push_u64(&mut c.b.out, n);
            c.b.out.extend_from_slice(b"\r\n");
        }
        RespBody::Chunked => {
            if client_10 {
                dechunk = true;
                keep = false;
            } else {
                c.b.out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            }
        }
        RespBody::UntilClose => {
            if client_10 {
                keep = false;
            } else {
                chunk_out = true;
                c.b.out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            }
        }
    }
    encode::push_header(&mut c.b.out, b"x-request-id", &c.reqid[..c.reqid_len]);
    if !keep {
        c.b.out.extend_from_slice(b"connection: close\r\n");
    } else if client_10 {
        c.b.out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    c.b.out.extend_from_slice(b"\r\n");

    // Body bytes that arrived with the head.
    let mut up_reusable = c.b.resp.keep_alive;
    let avail_start = head_len;
    let mut decoder = None;
    let (mut left, mut done) = match c.b.resp.body {
        RespBody::None => (0u64, true),
        RespBody::Length(n) => (n, n == 0),
        RespBody::Chunked => {
            // Trailers within the limits of a response head (16 KiB, max_headers fields).
            let mut d = ChunkedDecoder::new(u64::MAX);
            d.limit_trailers(16384, max_headers);
            decoder = Some(d);
            (0, false)
        }
        RespBody::UntilClose => (0, false),
    };
    let mut ok = true;
    // Whether anything reached the client yet, and whether the upstream broke the framing:
    // bad framing before the first byte out is still answered with a 502.
    let mut sent = false;
    let mut bad_framing = false;
    let mut pos = avail_start;
    // Process the bytes already in ubuf, then keep reading.
    loop {
        let data = &c.b.ubuf[pos..];
        if !data.is_empty() && !done {
            let used = match (&mut decoder, c.b.resp.body) {
                (_, RespBody::Length(_)) => {
                    let n = left.min(data.len() as u64) as usize;
                    left -= n as u64;
                    done = left == 0;
                    c.b.out.extend_from_slice(&data[..n]);
                    if let Some(cap) = cap.as_deref_mut() {
                        cap.body(&data[..n]);
                    }
                    n
                }
                (Some(d), _) => {
                    let out = &mut c.b.out;
                    let mut cap = cap.as_deref_mut();
                    match d.feed_without_trailers(data, |chunk| {
                        if dechunk {
                            out.extend_from_slice(chunk)
                        }
                        if let Some(cap) = cap.as_deref_mut() {
                            cap.body(chunk);
                        }
                    }) {
                        Ok((used, fin, keep)) => {
                            if fin && d.has_trailer_fields() {
                                // A stored entry is framed by length: its trailer fields
                                // could not be replayed on hits.
                                if let Some(cap) = cap.as_mut() {
                                    cap.abandon();
                                }
                            }
                            if !dechunk {
                                // As it came, but for the trailer fields (filtered).
                                out.extend_from_slice(&data[..keep]);
                                if fin {
                                    d.push_trailers(out);
                                }
                            }
                            done = fin;
                            used
                        }
                        Err(_) => {
                            ok = false;
                            up_reusable = false;
                            bad_framing = true;
                            break;
                        }
                    }
                }
                _ => {
                    if chunk_out {
                        encode::push_chunk(&mut c.b.out, data);
                    } else {
                        c.b.out.extend_from_slice(data);
                    }
                    if let Some(cap) = cap.as_deref_mut() {
                        cap.body(data);
                    }
                    data.len()
                }
            };
            pos += used;
        }
        if pos < c.b.ubuf.len() && done {
            // The upstream sent more than the response: do not trust the connection.
            up_reusable = false;
        }
        // Flush what we have.
        if !c.b.out.is_empty() {
            let out = std::mem::take(&mut c.b.out);
            let (res, out) = c.stream.write_all(out).await;
            c.b.out = out;
            c.b.out.clear();
            if res.is_err() {
                ok = false;
                up_reusable = false;
                break;
            }
            sent = true;
        }
        if done {
            break;
        }
        // Read more from the upstream.
        c.b.ubuf.clear();
        pos = 0;
        if c.b.ubuf.capacity() < STREAM_BUF {
            c.b.ubuf.reserve(STREAM_BUF);
        }
        // Each read of the body may take up to the integration timeout.
        let wait = read_timeout;
        let len = c.b.ubuf.len();
        let cap = c.b.ubuf.capacity();
        let buf = std::mem::take(&mut c.b.ubuf).slice_mut(len..cap);
        match monoio::time::timeout(wait, us.read(buf)).await {
            Err(_) => {
                c.b.ubuf = Vec::new();
                ok = false;
                up_reusable = false;
                break;
            }
            Ok((res, buf)) => {
                c.b.ubuf = buf.into_inner();
                match res {
                    Ok(0) if matches!(c.b.resp.body, RespBody::UntilClose) => {
                        // The end of the body: the last chunk goes out with the loop's flush.
                        up_reusable = false;
                        done = true;
                        if chunk_out {
                            encode::push_chunk(&mut c.b.out, b"");
                            continue;
                        }
                        break;
                    }
                    // A reset is a cut, never an end.
                    Ok(0) | Err(_) => {
                        up_reusable = false;
                        ok = false;
                        break;
                    }
                    Ok(_) => {}
                }
            }
        }
    }
    if c.b.ubuf.capacity() > 4 * 4096 {
        c.b.ubuf = Vec::new();
    }
    // After an answer without a body (HEAD, 204, 304) an upstream may wrongly have sent one:
    // bytes already waiting would be read as the next answer's head. One non-blocking look,
    // for these answers only (later arrivals end the pooled connection's read: see `take`).
    if ok
        && done
        && up_reusable
        && (!matches!(c.b.resp.body, RespBody::None)
            || (us.recv_held() == RecvHeld::Nothing && matches!(peek(&us), Peek::Nothing)))
    {
        // Without a multishot receive the buffer goes with the connection, for its next
        // answer; a client connection gets one back with the next pooled connection it takes.
        w.pools.borrow_mut().put(addr, us, &mut c.b.ubuf, keepalive);
    }
    if bad_framing {
        w.log_upstream_error(addr, "invalid chunked body");
        if !sent {
            if let Some(cap) = cap {
                cap.active = false;
            }
            let mut o = reject(w, c, 502, "Bad Gateway", false).await;
            o.upstream = Some(addr);
            return o;
        }
    }
    if let Some(cap) = cap {
        if !(ok && done) {
            cap.active = false;
        }
    }
    Outcome {
        status,
        keep_alive: keep && ok && done,
        upstream: Some(addr),
    }
}
