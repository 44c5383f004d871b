//! Request authorizers (`type = "request"`), like API Gateway's Lambda REQUEST authorizers
//! but over HTTP: the gateway POSTs the identity sources to `upstream` + `path` and a 2xx JSON
//! answer `{"allow": bool, "principal": "...", "context": {...}}` decides.
//!
//! - A missing (absent or empty) identity source is 401 without calling the authorizer.
//! - Decisions (allow and deny) are cached per authorizer per identity-source values for
//!   `ttl_s` (0 = every request calls), shared by the workers (a mutex held for one lookup or
//!   insert; calls are made without it); the cache is bounded and dropped when the config
//!   changes.
//! - An authorizer that cannot be reached, answers non-2xx or something that is not the
//!   expected JSON is 500 `{"message":"Authorizer error"}`; one slower than the upstream's
//!   `timeout_ms` is 504 `{"message":"Authorizer timed out"}`. Never an allow.
//!
//! Each call uses a fresh connection (`Connection: close`): with the decision cache, calls are
//! rare, and this keeps the authorizer independent of the proxy's pools.

use super::{header_safe, Deny, RawAuthorizer, Request, WorkerAuth, UNAUTHORIZED};
use crate::config::{ConfigError, Source, UpstreamConfig};
use crate::http::client::{self, ClientError, ResponseReader};
use crate::http::Method;
use ahash::AHashMap;
use monoio::net::TcpStream;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Decisions cached per authorizer.
pub const CACHE_ENTRIES: usize = 10_000;
/// Largest authorizer answer.
const MAX_ANSWER: usize = 64 * 1024;

/// 500: unreachable, non-2xx or malformed answer.
pub const AUTHORIZER_ERROR: Deny = Deny {
    status: 500,
    message: "Authorizer error",
};
/// 504: slower than the upstream's timeout.
pub const AUTHORIZER_TIMEOUT: Deny = Deny {
    status: 504,
    message: "Authorizer timed out",
};

/// Where an identity value comes from.
#[derive(Debug, Clone)]
pub enum IdentitySource {
    /// `header.NAME` (lowercase).
    Header(String),
    /// `query.NAME`.
    Query(String),
}

impl IdentitySource {
    fn label(&self) -> String {
        match self {
            IdentitySource::Header(h) => format!("header.{h}"),
            IdentitySource::Query(q) => format!("query.{q}"),
        }
    }
}

/// A validated `type = "request"` authorizer.
#[derive(Debug)]
pub struct RequestAuthorizer {
    pub name: String,
    pub targets: Vec<SocketAddr>,
    pub host: String,
    pub path: String,
    pub sources: Vec<IdentitySource>,
    pub ttl: Duration,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    /// Cached decisions (for this config's lifetime).
    decisions: Mutex<Decisions>,
}

pub(super) fn validate(
    src: &Source,
    i: usize,
    a: &RawAuthorizer,
    upstreams: &[UpstreamConfig],
) -> Result<RequestAuthorizer, ConfigError> {
    let key = |k: &str| format!("authorizers[{i}].{k}");
    // Located by the key path: the line of the offending key (the table's when it is absent).
    let span = 0..0;
    if a.jwks_uri.is_some()
        || a.jwks_file.is_some()
        || a.jwks_ca_file.is_some()
        || a.secret.is_some()
        || a.issuer.is_some()
    {
        return Err(src.err(
            span,
            &key("type"),
            "issuer, jwks_uri, jwks_ca_file, jwks_file and secret belong to `type = \"jwt\"`",
        ));
    }
    let up_name = a.upstream.as_deref().ok_or_else(|| {
        src.err(
            span.clone(),
            &key("upstream"),
            "a request authorizer needs an upstream",
        )
    })?;
    let up = upstreams
        .iter()
        .find(|u| u.name == up_name)
        .ok_or_else(|| {
            src.err(
                span.clone(),
                &key("upstream"),
                format!("upstream `{up_name}` is not defined in [[upstreams]]"),
            )
        })?;
    let path = a.path.clone().unwrap_or_else(|| "/".into());
    if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(src.err(span, &key("path"), "must start with `/` and hold no spaces"));
    }
    if a.identity_sources.is_empty() || a.identity_sources.len() > 8 {
        return Err(src.err(
            span,
            &key("identity_sources"),
            "between 1 and 8 sources (`header.NAME` or `query.NAME`)",
        ));
    }
    let mut sources = Vec::new();
    for s in &a.identity_sources {
        let src_ = if let Some(h) = s.strip_prefix("header.").filter(|h| !h.is_empty()) {
            IdentitySource::Header(h.to_ascii_lowercase())
        } else if let Some(q) = s.strip_prefix("query.").filter(|q| !q.is_empty()) {
            IdentitySource::Query(q.to_string())
        } else {
            return Err(src.err(
                span,
                &key("identity_sources"),
                format!("`{s}` is not `header.NAME` or `query.NAME`"),
            ));
        };
        sources.push(src_);
    }
    let ttl = a.ttl_s.unwrap_or(300);
    if ttl > 3600 {
        return Err(src.err(span, &key("ttl_s"), "at most 3600"));
    }
    Ok(RequestAuthorizer {
        name: a.name.get_ref().clone(),
        targets: up.targets.clone(),
        host: up.targets[0].to_string(),
        path,
        sources,
        ttl: Duration::from_secs(ttl),
        connect_timeout: up.connect_timeout,
        timeout: up.timeout,
        decisions: Mutex::new(AHashMap::new()),
    })
}

/// An authorizer's answer.
#[derive(Debug, Clone)]
pub struct Decision {
    pub allow: bool,
    pub principal: Option<Arc<str>>,
    pub context: Option<Arc<serde_json::Value>>,
}

/// Decisions of one authorizer by identity-source values, with their expiry.
type Decisions = AHashMap<Box<[u8]>, (Instant, Decision)>;

/// Per-worker authorizer state: where the next call starts among the targets.
#[derive(Default)]
pub struct DecisionCache {
    rr: usize,
}

/// 400: an identity source given twice.
const REPEATED_SOURCE: Deny = Deny {
    status: 400,
    message: "Bad Request: an identity source of the authorizer is given more than once",
};

/// What an allow hands on: the principal and, when asked for, the authorizer's `context`.
type Passed = (Option<Arc<str>>, Option<Arc<serde_json::Value>>);

/// Runs the authorizer for `req` (cached); returns the principal when allowed, and the
/// answer's `context` when `keep_context` (a mapping reads it).
pub(super) async fn check(
    w: &WorkerAuth,
    a: &RequestAuthorizer,
    req: &Request<'_>,
    reqid: &[u8],
    keep_context: bool,
) -> Result<Passed, Deny> {
    // Identity values; a missing one is 401 without a call.
    let query = req
        .head
        .query
        .map(|q| req.head.slice(req.buf, q))
        .unwrap_or(b"");
    let mut key: Vec<u8> = Vec::with_capacity(128);
    let mut values: Vec<(String, String)> = Vec::with_capacity(a.sources.len());
    let mut decoded = Vec::new();
    for s in &a.sources {
        // One value per source: with two, the one checked and the one the upstream reads
        // could differ (as with two Authorization fields). Query values are percent-decoded
        // (`+` as space), as a mapping's `$request.querystring` reads them.
        let v = match s {
            IdentitySource::Header(h) => {
                if req.head.header_count(req.buf, h) > 1 {
                    return Err(REPEATED_SOURCE);
                }
                req.header(h)
            }
            IdentitySource::Query(q) => {
                let mut it = crate::http::query_values(query, q.as_bytes());
                let first = it.next();
                if it.next().is_some() {
                    return Err(REPEATED_SOURCE);
                }
                first.map(|v| {
                    crate::http::percent_decode(v, true, &mut decoded);
                    &decoded[..]
                })
            }
        };
        let v = v.filter(|v| !v.is_empty()).ok_or(UNAUTHORIZED)?;
        // Length-prefixed: a value may hold any byte (a query's `%00` too), so no separator
        // could keep `a=X\0x, b=y` and `a=X, b=x\0y` apart.
        key.extend_from_slice(&(v.len() as u32).to_le_bytes());
        key.extend_from_slice(v);
        values.push((s.label(), String::from_utf8_lossy(v).into_owned()));
    }
    let now = Instant::now();
    if !a.ttl.is_zero() {
        let m = a.decisions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((until, d)) = m.get(&key[..]) {
            if now < *until {
                return decide(d, keep_context);
            }
        }
    }
    let start = {
        let mut c = w.authorizer.borrow_mut();
        c.rr = c.rr.wrapping_add(1);
        c.rr
    };
    let d = call(a, req, &values, reqid, start).await?;
    if !a.ttl.is_zero() {
        let mut m = a.decisions.lock().unwrap_or_else(|e| e.into_inner());
        if m.len() >= CACHE_ENTRIES {
            m.retain(|_, (until, _)| *until > now);
            if m.len() >= CACHE_ENTRIES {
                m.clear();
            }
        }
        m.insert(key.into(), (now + a.ttl, d.clone()));
    }
    decide(&d, keep_context)
}

fn decide(d: &Decision, keep_context: bool) -> Result<Passed, Deny> {
    if d.allow {
        Ok((
            d.principal.clone(),
            keep_context.then(|| d.context.clone()).flatten(),
        ))
    } else {
        Err(super::FORBIDDEN)
    }
}

/// One call to the authorizer.
async fn call(
    a: &RequestAuthorizer,
    req: &Request<'_>,
    values: &[(String, String)],
    reqid: &[u8],
    start: usize,
) -> Result<Decision, Deny> {
    let head = req.head;
    let body = serde_json::json!({
        "type": "REQUEST",
        "method": String::from_utf8_lossy(head.method_bytes(req.buf)),
        "path": String::from_utf8_lossy(head.slice(req.buf, head.path)),
        "query": head.query.map(|q| String::from_utf8_lossy(head.slice(req.buf, q)).into_owned()),
        "identity": values.iter().map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str()))).collect::<serde_json::Map<String, serde_json::Value>>(),
    })
    .to_string();
    let msg = client::build_request(
        b"POST",
        a.path.as_bytes(),
        &[
            (b"host", a.host.as_bytes()),
            (b"content-type", b"application/json"),
            (b"connection", b"close"),
            (b"x-request-id", reqid),
        ],
        b"",
        Some(body.as_bytes()),
    );

    let deadline = Instant::now() + a.timeout;
    // Connect: the targets in turn, starting at a rotating one.
    let mut stream = None;
    for k in 0..a.targets.len() {
        let addr = a.targets[(start + k) % a.targets.len()];
        let left = deadline.saturating_duration_since(Instant::now());
        match monoio::time::timeout(a.connect_timeout.min(left), TcpStream::connect_addr(addr))
            .await
        {
            Ok(Ok(s)) => {
                stream = Some(s);
                break;
            }
            _ => continue,
        }
    }
    let Some(mut s) = stream else {
        crate::elog!("ringgate: authorizer `{}`: no target reachable", a.name);
        return Err(AUTHORIZER_ERROR);
    };
    let mut rd = answer_reader();
    let r = match client::exchange(&mut s, msg, &mut rd, deadline).await {
        Err(ClientError::Timeout) => return Err(AUTHORIZER_TIMEOUT),
        Err(_) => Err(AUTHORIZER_ERROR),
        Ok(()) => decision(rd.body()),
    };
    if r.is_err() {
        crate::elog!("ringgate: authorizer `{}`: bad or failed answer", a.name);
    }
    r
}

/// Reader of an authorizer's answer: 2xx only, body at most [`MAX_ANSWER`].
fn answer_reader() -> ResponseReader {
    ResponseReader::new(Method::Post, MAX_ANSWER).accept(|s| (200..300).contains(&s))
}

fn decision(body: &[u8]) -> Result<Decision, Deny> {
    // `{"allow":false,"allow":true}` is an authorizer error, not a decision either way.
    if !crate::policy::validate::json_without_duplicate_keys(body) {
        return Err(AUTHORIZER_ERROR);
    }
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|_| AUTHORIZER_ERROR)?;
    let allow = v
        .get("allow")
        .and_then(|a| a.as_bool())
        .ok_or(AUTHORIZER_ERROR)?;
    let principal = match v.get("principal") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) if header_safe(s) => Some(Arc::from(s.as_str())),
        Some(_) => return Err(AUTHORIZER_ERROR),
    };
    Ok(Decision {
        allow,
        principal,
        context: v.get("context").cloned().map(Arc::new),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The decision from a whole answer, as `call` gets it.
    fn answer(bytes: &[u8], eof: bool) -> Result<Option<Decision>, Deny> {
        let mut rd = answer_reader();
        let done = rd.push(bytes).map_err(|_| AUTHORIZER_ERROR)? == client::Progress::Done;
        if !done && !eof {
            return Ok(None);
        }
        rd.eof().map_err(|_| AUTHORIZER_ERROR)?;
        decision(rd.body()).map(Some)
    }

    #[test]
    fn answers() {
        let body = r#"{"allow":true,"principal":"user-7"}"#;
        let ok = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let ok = ok.as_bytes();
        let d = answer(ok, false).unwrap().unwrap();
        assert!(d.allow);
        assert_eq!(d.principal.as_deref(), Some("user-7"));
        assert!(answer(&ok[..ok.len() - 3], false).unwrap().is_none());
        assert!(answer(&ok[..ok.len() - 3], true).is_err(), "truncated");
        let deny = b"HTTP/1.1 200 OK\r\ncontent-length: 15\r\n\r\n{\"allow\":false}";
        assert!(!answer(deny, false).unwrap().unwrap().allow);
        // A member named twice is no decision either way: an authorizer error.
        for body in [
            r#"{"allow":false,"allow":true}"#,
            r#"{"allow":true,"principal":"a","principal":"admin"}"#,
            r#"{"allow":true,"context":{"role":"u","r\u006fle":"admin"}}"#,
        ] {
            assert_eq!(
                decision(body.as_bytes()).err(),
                Some(AUTHORIZER_ERROR),
                "{body}"
            );
        }
        assert!(decision(br#"{"allow":true,"context":{"a":[{"x":1},{"x":2}]}}"#).is_ok());
        assert_eq!(
            answer(b"HTTP/1.1 500 X\r\ncontent-length: 0\r\n\r\n", false).unwrap_err(),
            AUTHORIZER_ERROR
        );
        // Non-2xx fails on the head, without waiting for a body.
        assert_eq!(
            answer(b"HTTP/1.1 500 X\r\n\r\n", false).unwrap_err(),
            AUTHORIZER_ERROR
        );
        let bad = b"HTTP/1.1 200 OK\r\ncontent-length: 13\r\n\r\n{\"allow\":\"y\"}";
        assert!(answer(bad, false).is_err());
        let close = b"HTTP/1.0 200 OK\r\n\r\n{\"allow\":true}";
        assert!(answer(close, true).unwrap().unwrap().allow);
        let chunked =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\ne\r\n{\"allow\":true}\r\n0\r\n\r\n";
        assert!(answer(chunked, false).unwrap().unwrap().allow);
    }
}
