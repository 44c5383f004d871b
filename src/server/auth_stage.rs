//! The auth stage of the connection loop: runs [`crate::policy::auth::check`] for a route that
//! asks for it, buffering the request body first when the check hashes it (SigV4), and answers
//! 401/403 itself when the check fails.

use super::validate_stage::{answer_failure, Failure};
use super::{body_skippable, fill_rbuf, reject, ClientIo, Conn, Outcome, Worker};
use crate::config::Route;
use crate::gateway::Gateway;
use crate::http::{encode, BodyKind};
use crate::policy::auth::{self, AuthKind, Request};
use std::rc::Rc;
use std::sync::Arc;

/// Largest body a signed (SigV4) request may carry: it is held whole to be hashed.
const MAX_SIGNED_BODY: u64 = 10 << 20;

/// Checks the request; on failure the client has been answered and the outcome is returned.
pub(super) async fn run<S: ClientIo>(
    w: &Rc<Worker>,
    gw: &Arc<Gateway>,
    c: &mut Conn<S>,
    route: &Route,
    id: u32,
) -> Result<(), Outcome> {
    // Credentials are single fields (RFC 9110 11.6.2): with two, the one checked and the one
    // the upstream reads could differ. Refused, as ambiguous framing is.
    for name in ["authorization", "x-api-key"] {
        if c.b.head.header_count(&c.b.rbuf, name) > 1 {
            let msg = if name == "x-api-key" {
                "Bad Request: more than one x-api-key header"
            } else {
                "Bad Request: more than one Authorization header"
            };
            let keep = body_skippable(c);
            return Err(reject(w, c, 400, msg, keep).await);
        }
    }
    let head_len = c.b.head.head_len;
    let body_len = if route.auth.needs_body() {
        // What the head alone can refuse is refused before the body is read (nor invited
        // with `100 Continue`): an upload without valid-looking credentials is not held.
        // (Without a body the whole check runs at once below.)
        if c.b.head.body != BodyKind::None {
            let head_only = Request {
                head: &c.b.head,
                buf: &c.b.rbuf,
                body: &[],
                request_id: &c.reqid[..c.reqid_len],
            };
            if let Err(d) = auth::precheck(&gw.config.auth, &route.auth, &head_only) {
                return Err(refuse(w, c, route, d).await);
            }
        }
        match buffer_body(w, c, gw).await {
            Ok(n) => n,
            Err(Refused::Here(status, msg)) => return Err(reject(w, c, status, msg, false).await),
            // Read as the WAF and validate stages read bodies: their answers.
            Err(Refused::Body(f)) => return Err(answer_failure(w, c, f).await),
        }
    } else {
        0
    };
    let req = Request {
        head: &c.b.head,
        buf: &c.b.rbuf,
        body: &c.b.rbuf[head_len..head_len + body_len],
        request_id: &c.reqid[..c.reqid_len],
    };
    let mut ident = auth::Identity::default();
    let res = auth::check(
        &w.auth,
        &w.shared.auth,
        &gw.config.auth,
        w.gen.get(),
        &route.auth,
        auth::RoutePlans {
            plans: &gw.config.traffic.plans,
            covering: &gw.config.traffic.routes[id as usize].plans,
        },
        &req,
        &mut ident,
    )
    .await;
    c.principal = ident.principal;
    c.api_key = ident.api_key;
    c.auth_ctx = ident.context;
    match res {
        Ok(()) => Ok(()),
        Err(d) => Err(refuse(w, c, route, d).await),
    }
}

/// Answers a failed check: its status and message, and on a 401 the scheme that would be
/// accepted.
async fn refuse<S: ClientIo>(
    w: &Rc<Worker>,
    c: &mut Conn<S>,
    route: &Route,
    d: auth::Deny,
) -> Outcome {
    if d.status == 401 {
        // RFC 9110 15.5.2: a 401 names the scheme that would be accepted.
        let challenge: &[u8] = match route.auth.kind {
            AuthKind::Jwt(_) if c.b.head.header(&c.b.rbuf, "authorization").is_some() => {
                b"Bearer error=\"invalid_token\""
            }
            AuthKind::Jwt(_) => b"Bearer",
            AuthKind::SigV4 => b"AWS4-HMAC-SHA256",
            _ => b"",
        };
        if !challenge.is_empty() {
            encode::push_header(&mut c.b.extra, b"www-authenticate", challenge);
        }
    }
    let keep = body_skippable(c);
    reject(w, c, d.status, d.message, keep).await
}

/// Why a signed body was not read.
enum Refused {
    /// A status and message of this stage (411, 413).
    Here(u16, &'static str),
    /// What reading a held body can fail with (408, 400, 503).
    Body(Failure),
}

/// Reads the whole request body into `rbuf` (after the head); returns its length.
async fn buffer_body<S: ClientIo>(
    w: &Worker,
    c: &mut Conn<S>,
    gw: &Gateway,
) -> Result<usize, Refused> {
    let n = match c.b.head.body {
        BodyKind::None => return Ok(0),
        BodyKind::Length(n) => n,
        BodyKind::Chunked => {
            // Only an unsigned payload can come chunked: nothing to hash.
            let unsigned = c.b.head.header(&c.b.rbuf, "x-amz-content-sha256")
                == Some(&b"UNSIGNED-PAYLOAD"[..]);
            return if unsigned {
                Ok(0)
            } else {
                Err(Refused::Here(
                    411,
                    "Length Required: a signed body needs Content-Length",
                ))
            };
        }
    };
    if n > MAX_SIGNED_BODY.min(gw.config.server.limits.max_body_bytes) {
        return Err(Refused::Here(413, "Request Entity Too Large"));
    }
    if !w.hold_body(&mut c.held, n) {
        return Err(Refused::Body(Failure::Busy));
    }
    let want = c.b.head.head_len + n as usize;
    fill_rbuf(c, want, gw.config.server.limits.header_timeout)
        .await
        .map_err(|e| Refused::Body(Failure::Read(e)))?;
    Ok(n as usize)
}
