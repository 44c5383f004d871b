//! The connection loop's side of traffic control ([`crate::policy`]): runs the WAF, answers
//! CORS preflights, adds CORS headers, and applies the throttles and usage-plan quotas of a
//! matched route, in the pipeline's order: [`before`] (WAF, CORS preflight) runs before the
//! auth stage, [`throttle`] (throttles, usage-plan quota) after it.
//!
//! A route with nothing configured costs a branch per stage. Otherwise each stage reads the
//! clock once and every bucket is one atomic; nothing here locks, and nothing allocates but
//! the WAF's `body` rules, which wait for the first `body_max_bytes` of a body (a chunked one
//! decoded into a copy for the scan, its raw bytes left in `rbuf` for the upstream).

use super::validate_stage::{self, Failure, CHUNKED_READ};
use super::{body_skippable, reject, write_out, ClientIo, Conn, Outcome, Worker};
use crate::config::{Limits, RouteMatch};
use crate::gateway::Gateway;
use crate::http::{encode, BodyKind, ChunkedDecoder, Method};
use crate::policy::cors::{Cors, VARY_ORIGIN};
use crate::policy::plans::{unix_at, KeyRef, Refusal};
use crate::policy::throttle::{now_ns, Wait};
use crate::policy::waf::{Input, Verdict};
use crate::policy::Reason;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

/// `OPTIONS` with `Origin` and `Access-Control-Request-Method`.
pub(super) fn is_preflight<S: ClientIo>(c: &Conn<S>) -> bool {
    c.b.head.method == Method::Options
        && c.b.head.header(&c.b.rbuf, "origin").is_some()
        && c.b
            .head
            .header(&c.b.rbuf, "access-control-request-method")
            .is_some()
}

/// The route a preflight asks about (routed with the requested method), when its API has
/// CORS configured: the gateway answers for it. A method no route of the path takes, or a
/// path no route takes, is still answered for the API the request addresses (as API Gateway
/// answers every preflight of a CORS API): the answer lists the allowed methods, and the
/// browser then gets the 404 or 405 with CORS headers. The flag says whether the path has a
/// route (else the id only names the API whose CORS answers).
pub(super) fn preflight_route<S: ClientIo>(gw: &Gateway, c: &mut Conn<S>) -> Option<(u32, bool)> {
    let m =
        c.b.head
            .header(&c.b.rbuf, "access-control-request-method")?;
    let m = std::str::from_utf8(m).ok()?;
    let path = std::str::from_utf8(c.b.head.slice(&c.b.rbuf, c.b.head.path)).ok()?;
    let host = c.b.head.host.map(|r| c.b.head.slice(&c.b.rbuf, r));
    let id = match gw.config.routes.find(host, m, path, &mut c.params) {
        RouteMatch::Found(id) => id,
        RouteMatch::MethodNotAllowed => gw.config.routes.path_route(host, path, &mut c.params)?,
        RouteMatch::NotFound => {
            let id = gw.config.routes.scope(host, path)?;
            return gw.config.traffic.routes[id as usize]
                .cors
                .is_some()
                .then_some((id, false));
        }
    };
    gw.config.traffic.routes[id as usize]
        .cors
        .is_some()
        .then_some((id, true))
}

/// A preflight the gateway does not allow: 204 without CORS headers.
pub(super) async fn answer_preflight_denied<S: ClientIo>(
    w: &Rc<Worker>,
    c: &mut Conn<S>,
) -> Outcome {
    c.b.extra.clear();
    respond_204(w, c).await
}

async fn respond_204<S: ClientIo>(w: &Rc<Worker>, c: &mut Conn<S>) -> Outcome {
    let keep = body_skippable(c) && c.b.head.keep_alive;
    c.b.out.clear();
    encode::push_status_line(&mut c.b.out, 204);
    super::push_common(w, c, keep);
    let ok = write_out(c).await;
    Outcome {
        status: 204,
        keep_alive: keep && ok,
        upstream: None,
    }
}

async fn too_many<S: ClientIo>(
    w: &Rc<Worker>,
    c: &mut Conn<S>,
    rt: &crate::policy::RouteTraffic,
    reason: Reason,
    wait: Wait,
) -> Outcome {
    rt.count(reason);
    c.b.extra.extend_from_slice(b"retry-after: ");
    encode::push_u64(&mut c.b.extra, wait.retry_after_s());
    c.b.extra.extend_from_slice(b"\r\n");
    let keep = body_skippable(c);
    reject(w, c, 429, "Too Many Requests", keep).await
}

/// The gateway-wide stages for a request that matched no route: the WAF's IP lists and
/// per-IP rate, then `server.throttle`. A denied address gets 403 whatever path it asks for
/// (as a WAF in front of the gateway would), not a 404 that maps the API; an address past
/// `rate_per_ip` gets 429 (reason `ip`), and so does any request past the gateway's own
/// throttle (reason `server`), both counted with empty labels: a scanner's 404s are limited
/// like any other request.
pub(super) async fn unrouted_refused<S: ClientIo>(
    w: &Rc<Worker>,
    gw: &Arc<Gateway>,
    c: &mut Conn<S>,
) -> Option<Outcome> {
    let t = &gw.config.traffic;
    let now = now_ns();
    if t.waf.active() {
        if let Some(out) = ip_refused(w, c, t, &t.unrouted, now).await {
            return Some(out);
        }
    }
    if let Some(b) = &t.server {
        if let Err(wait) = b.check(now) {
            return Some(too_many(w, c, &t.unrouted, Reason::Server, wait).await);
        }
    }
    None
}

/// The WAF's IP lists and per-IP rate: 403 for a denied address, 429 (reason `ip`, counted
/// under `rt`) past the rate.
async fn ip_refused<S: ClientIo>(
    w: &Rc<Worker>,
    c: &mut Conn<S>,
    t: &crate::policy::Traffic,
    rt: &crate::policy::RouteTraffic,
    now: u64,
) -> Option<Outcome> {
    match t.waf.check_ip(c.peer.ip(), now) {
        Verdict::Pass => None,
        Verdict::Forbidden => {
            let keep = body_skippable(c);
            Some(reject(w, c, 403, "Forbidden", keep).await)
        }
        Verdict::Throttled(wait) => Some(too_many(w, c, rt, Reason::Ip, wait).await),
    }
}

/// The CORS headers of an actual request's answer (into `extra`): the allowed origin's, or
/// `Vary: Origin` alone.
fn push_cors<S: ClientIo>(c: &mut Conn<S>, cors: &Cors) {
    let origin = c.b.head.header(&c.b.rbuf, "origin");
    cors.push_for(origin, &mut c.b.extra);
}

/// For a request refused before the traffic stages: one that matched no route (404), whose
/// path matched under other methods (405), or whose body is over the limit (413, `id` its
/// route): the CORS headers of the API that `id` (a route of the path, for a 405) or else the host and
/// path prefix select, so a browser app can read the answer as it reads the other refusals.
/// Nothing when no API with `cors` can be told apart, or for a preflight (answered elsewhere).
pub(super) fn push_refusal_cors<S: ClientIo>(gw: &Gateway, c: &mut Conn<S>, id: Option<u32>) {
    if is_preflight(c) {
        return;
    }
    push_addressed_cors(gw, c, id);
}

/// [`push_refusal_cors`] for a preflight too: for a request refused before it could be routed
/// (its path, while the head was read), where no preflight answer is made.
pub(super) fn push_addressed_cors<S: ClientIo>(gw: &Gateway, c: &mut Conn<S>, id: Option<u32>) {
    let id = match id {
        Some(id) => id,
        None => {
            let head = &c.b.head;
            let Ok(path) = std::str::from_utf8(head.slice(&c.b.rbuf, head.path)) else {
                return;
            };
            let host = head.host.map(|r| head.slice(&c.b.rbuf, r));
            match gw.config.routes.scope(host, path) {
                Some(id) => id,
                None => return,
            }
        }
    };
    if let Some(cors) = &gw.config.traffic.routes[id as usize].cors {
        push_cors(c, cors);
    }
}

/// The WAF and CORS stages for route `id` (before auth); `Some` when the request was answered
/// (refused, or a preflight).
pub(super) async fn before<S: ClientIo>(
    w: &Rc<Worker>,
    gw: &Arc<Gateway>,
    c: &mut Conn<S>,
    id: u32,
    limits: &Limits,
) -> Option<Outcome> {
    let t = &gw.config.traffic;
    let rt = &t.routes[id as usize];
    if !t.waf.active() && rt.cors.is_none() {
        return None;
    }
    let now = now_ns();

    // CORS headers go on whatever answers the request, the gateway's own refusals included,
    // so a browser app can read a WAF 403 or a 429; a preflight refused by the WAF gets them
    // too (its `Vary: Origin` above all). An allowed preflight's answer replaces them below.
    if let Some(cors) = &rt.cors {
        push_cors(c, cors);
    }

    // WAF: IP lists, per-IP rate, rules.
    if t.waf.active() {
        if let Some(out) = ip_refused(w, c, t, rt, now).await {
            return Some(out);
        }
        if !t.waf.rules.is_empty() {
            // Path, query and header rules first: a request they refuse is answered without
            // waiting for its body (or inviting it with `100 Continue`).
            let h = &c.b.head;
            let buf = &c.b.rbuf;
            let mut headers = h
                .headers
                .iter()
                .map(|hv| (h.slice(buf, hv.name), h.slice(buf, hv.value)));
            let v = t.waf.check_rules(Input {
                path: h.slice(buf, h.path),
                query: h.query.map(|q| h.slice(buf, q)),
                headers: &mut headers,
            });
            if v != Verdict::Pass {
                let keep = body_skippable(c);
                return Some(reject(w, c, 403, "Forbidden", keep).await);
            }
            if t.waf.wants_body() {
                if c.b.head.header_count(&c.b.rbuf, "content-type") > 1 {
                    // The scan takes the body's charset from its type: with two types, the
                    // one a backend reads could be the one the scan did not go by.
                    let keep = body_skippable(c);
                    return Some(
                        reject(w, c, 400, "Bad Request: Content-Type given twice", keep).await,
                    );
                }
                // The payload the `body` rules see: a chunked body's decoded first
                // `body_max_bytes` (its raw bytes stay in `rbuf` for the upstream).
                let mut decoded = Vec::new();
                if let Err(out) =
                    buffer_body(w, c, t.waf.body_max_bytes, limits, &mut decoded).await
                {
                    return Some(out);
                }
                let h = &c.b.head;
                let buf = &c.b.rbuf;
                let body = &buf[h.head_len.min(buf.len())..];
                let body = match h.body {
                    BodyKind::None => &body[..0],
                    BodyKind::Length(n) => &body[..(n.min(body.len() as u64)) as usize],
                    BodyKind::Chunked => &decoded[..],
                };
                if t.waf.check_body(body, h.header(buf, "content-type")) != Verdict::Pass {
                    let keep = body_skippable(c);
                    return Some(reject(w, c, 403, "Forbidden", keep).await);
                }
            }
        }
    }

    // CORS preflights are answered here (after the WAF: a refused client gets no answer).
    if let Some(cors) = &rt.cors {
        if is_preflight(c) {
            if let Some(origin) = c.b.head.header(&c.b.rbuf, "origin") {
                let allowed = cors.allowed(origin);
                c.b.extra.clear();
                if allowed {
                    let origin = c.b.head.header(&c.b.rbuf, "origin").unwrap_or_default();
                    cors.push_preflight(origin, &mut c.b.extra);
                } else {
                    c.b.extra.extend_from_slice(VARY_ORIGIN);
                }
                return Some(respond_204(w, c).await);
            }
        }
    }

    None
}

/// The throttle-and-quota stage for route `id` (after auth); `Some` when the request was
/// refused.
pub(super) async fn throttle<S: ClientIo>(
    w: &Rc<Worker>,
    gw: &Arc<Gateway>,
    c: &mut Conn<S>,
    id: u32,
) -> Option<Outcome> {
    let t = &gw.config.traffic;
    let rt = &t.routes[id as usize];
    if t.server.is_none() && rt.stage.is_none() && rt.route.is_none() && rt.plans.is_empty() {
        return None;
    }
    let now = now_ns();
    // Throttles: gateway, stage, route, then the key's plan. A request refused by a later
    // bucket gives its token back to the earlier ones, so a flood refused by one route's
    // bucket does not drain its stage's or the gateway's.
    let buckets = [
        (t.server.as_deref(), Reason::Server),
        (rt.stage.as_deref(), Reason::Stage),
        (rt.route.as_deref(), Reason::Route),
    ];
    for (i, (b, reason)) in buckets.iter().enumerate() {
        if let Some(b) = b {
            if let Err(wait) = b.check(now) {
                refund(&buckets[..i]);
                return Some(too_many(w, c, rt, *reason, wait).await);
            }
        }
    }
    if !rt.plans.is_empty() {
        // Two keys: the one metered here and the one the upstream reads (it gets both) could
        // differ. Refused, as on routes with key auth.
        if c.b.head.header_count(&c.b.rbuf, "x-api-key") > 1 {
            refund(&buckets);
            let keep = body_skippable(c);
            return Some(
                reject(
                    w,
                    c,
                    400,
                    "Bad Request: more than one x-api-key header",
                    keep,
                )
                .await,
            );
        }
        let keys = w.shared.auth.keys();
        if let Some(k) =
            c.b.head
                .header(&c.b.rbuf, "x-api-key")
                .and_then(|v| keys.check(v))
        {
            // A key identified here (a route without key auth) goes to the access log too.
            if c.api_key.is_none() {
                c.api_key = Some(k.name.clone());
            }
            let key = KeyRef {
                name: &k.name,
                plans: &k.plans,
                usage_id: &k.usage_id,
            };
            match t.plans.check(key, &rt.plans, now, unix_at(now)) {
                Ok(()) => {}
                Err(Refusal::Throttled(wait)) => {
                    refund(&buckets);
                    return Some(too_many(w, c, rt, Reason::Plan, wait).await);
                }
                Err(Refusal::QuotaExceeded { retry_after_s }) => {
                    // The quota comes back when its UTC period ends.
                    c.b.extra.extend_from_slice(b"retry-after: ");
                    encode::push_u64(&mut c.b.extra, retry_after_s);
                    c.b.extra.extend_from_slice(b"\r\n");
                    refund(&buckets);
                    rt.count(Reason::Quota);
                    let keep = body_skippable(c);
                    return Some(reject(w, c, 429, "Limit Exceeded", keep).await);
                }
            }
        }
    }
    None
}

fn refund(taken: &[(Option<&crate::policy::throttle::Bucket>, Reason)]) {
    for b in taken.iter().filter_map(|(b, _)| *b) {
        b.refund();
    }
}

/// Reads until the first `max` payload bytes of the body (or all of it, when shorter) are
/// buffered after the head, so the `body` rules see them, within `header_timeout` (408).
/// A `Content-Length` body is scanned where it lies in `rbuf`. A chunked body's raw bytes are
/// kept in `rbuf` as they came (the proxy sends them on unchanged) and its payload is decoded
/// into `decoded`, so a match split across chunks is found; bad framing gets 400, a payload
/// past `max_body_bytes` 413.
async fn buffer_body<S: ClientIo>(
    w: &Rc<Worker>,
    c: &mut Conn<S>,
    max: usize,
    limits: &Limits,
    decoded: &mut Vec<u8>,
) -> Result<(), Outcome> {
    let res = match c.b.head.body {
        BodyKind::None => return Ok(()),
        BodyKind::Length(n) => {
            let n = n.min(max as u64);
            if w.hold_body(&mut c.held, n) {
                let want = c.b.head.head_len + n as usize;
                super::fill_rbuf(c, want, limits.header_timeout)
                    .await
                    .map_err(Failure::Read)
            } else {
                Err(Failure::Busy)
            }
        }
        BodyKind::Chunked => buffer_chunked(w, c, max, limits, decoded).await,
    };
    match res {
        Ok(()) => Ok(()),
        // As with a Content-Length body: a client gone mid-body gets no answer.
        Err(Failure::Read(super::FillError::Closed)) => Err(Outcome {
            status: 499,
            keep_alive: false,
            upstream: None,
        }),
        Err(f) => Err(validate_stage::answer_failure(w, c, f).await),
    }
}

/// Raw chunked bytes (framing included) held for the WAF at most, beyond the `max` payload
/// bytes it inspects: `FRAMING_FACTOR × max + FRAMING_SLACK`. Ordinary framing costs a few
/// bytes per chunk; a body needing more (say, one-byte chunks with long extensions) is refused
/// rather than held without bound or let through half inspected.
const FRAMING_FACTOR: usize = 4;
const FRAMING_SLACK: usize = 64 * 1024;

/// The chunked case of [`buffer_body`]: reads into `rbuf` until the decoder has seen `max`
/// payload bytes or the end of the body, appending the first `max` payload bytes to `decoded`.
async fn buffer_chunked<S: ClientIo>(
    w: &Worker,
    c: &mut Conn<S>,
    max: usize,
    limits: &Limits,
    decoded: &mut Vec<u8>,
) -> Result<(), Failure> {
    let head_len = c.b.head.head_len;
    let deadline = Instant::now() + limits.header_timeout;
    let raw_max = max
        .saturating_mul(FRAMING_FACTOR)
        .saturating_add(FRAMING_SLACK);
    let mut dec = ChunkedDecoder::new(limits.max_body_bytes);
    dec.limit_trailers(limits.max_header_bytes, limits.max_headers);
    // `rbuf[..fed]` has been through the decoder.
    let mut fed = head_len.min(c.b.rbuf.len());
    let mut tmp = Vec::new();
    decoded.reserve(max.min(64 * 1024));
    loop {
        let (used, done) = dec
            .feed(&c.b.rbuf[fed..], |d| {
                let room = max.saturating_sub(decoded.len());
                decoded.extend_from_slice(&d[..d.len().min(room)]);
            })
            .map_err(Failure::Chunk)?;
        fed += used;
        if done {
            // Read whole: a refusal can skip it and keep the connection.
            c.chunked_end = Some(fed);
            return Ok(());
        }
        if dec.total() >= max as u64 {
            return Ok(());
        }
        if c.b.rbuf.len() - head_len >= raw_max {
            return Err(Failure::Framing);
        }
        if !w.hold_body(
            &mut c.held,
            (c.b.rbuf.len() - head_len + decoded.len()) as u64,
        ) {
            return Err(Failure::Busy);
        }
        if tmp.capacity() == 0 {
            tmp.reserve(CHUNKED_READ);
        }
        super::read_body(c, deadline, &mut tmp)
            .await
            .map_err(Failure::Read)?;
        c.b.rbuf.extend_from_slice(&tmp);
    }
}
