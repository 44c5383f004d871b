//! HTTP caching rules: which upstream responses a shared cache may store, for how long, and
//! which request headers select among variants (`Vary`).
//!
//! A response is stored when its status is one RFC 9110 calls heuristically cacheable (200,
//! 203, 300, 301, 308, 404, 410), it is framed by Content-Length or chunked, it sets no
//! cookie, and its `Cache-Control` has none of `no-store`, `private`, `no-cache`. Freshness is
//! the configured TTL, shortened by `s-maxage` (or else `max-age`) when the upstream asks for
//! less; 0 means not stored. `Vary: *` is never stored; other `Vary` names become part of the
//! key.

use crate::http::{RespBody, ResponseHead};
use std::time::Duration;

/// At most this many `Vary` header names (more: not stored).
pub const MAX_VARY: usize = 8;

/// Why a response is not stored, or for how long it is.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Not stored.
    Pass,
    /// Stored this long, keyed also by these (lowercase) request headers; `age` is how old
    /// the upstream said it already was (its `Age`), counted in the `Age` of hits.
    Store {
        ttl: Duration,
        vary: Vec<Box<str>>,
        age: Duration,
    },
}

/// Whether `status` may be stored without explicit freshness (RFC 9110 §15.1), minus 204 and
/// the 4xx/5xx answers that depend on the request (405, 414, 501).
pub fn cacheable_status(status: u16) -> bool {
    matches!(status, 200 | 203 | 300 | 301 | 308 | 404 | 410)
}

/// Decides whether the response in `buf` (parsed into `resp`) is stored, given the route's
/// TTL `ttl`.
pub fn decide(resp: &ResponseHead, buf: &[u8], ttl: Duration, head_request: bool) -> Decision {
    if !cacheable_status(resp.status) {
        return Decision::Pass;
    }
    match resp.body {
        // A body that ends with the connection is stored only once that end came as a close,
        // not a reset (the capture is dropped for a cut body).
        RespBody::Length(_) | RespBody::Chunked | RespBody::UntilClose => {}
        RespBody::None if head_request => {}
        _ => return Decision::Pass,
    }
    let mut smax: Option<u64> = None;
    let mut age: Option<u64> = None;
    let mut max: Option<u64> = None;
    let mut vary: Vec<Box<str>> = Vec::new();
    for h in &resp.headers {
        let name = resp.slice(buf, h.name);
        let value = resp.slice(buf, h.value);
        if name.eq_ignore_ascii_case(b"set-cookie") {
            return Decision::Pass;
        }
        if name.eq_ignore_ascii_case(b"cache-control") {
            for d in directives(value) {
                let (k, v) = match d.iter().position(|&b| b == b'=') {
                    Some(i) => (trim(&d[..i]), Some(unquote(trim(&d[i + 1..])))),
                    None => (d, None),
                };
                if k.eq_ignore_ascii_case(b"no-store")
                    || k.eq_ignore_ascii_case(b"private")
                    || k.eq_ignore_ascii_case(b"no-cache")
                {
                    return Decision::Pass;
                }
                if k.eq_ignore_ascii_case(b"s-maxage") {
                    match v.and_then(parse_secs) {
                        Some(n) => smax = Some(smax.map_or(n, |o: u64| o.min(n))),
                        None => return Decision::Pass,
                    }
                } else if k.eq_ignore_ascii_case(b"max-age") {
                    match v.and_then(parse_secs) {
                        Some(n) => max = Some(max.map_or(n, |o: u64| o.min(n))),
                        None => return Decision::Pass,
                    }
                }
            }
        }
        if name.eq_ignore_ascii_case(b"age") {
            // RFC 9111 5.1: delta-seconds; an invalid one is ignored.
            if let Some(n) = parse_secs(trim(value)) {
                age = Some(age.map_or(n, |o: u64| o.max(n)));
            }
        }
        if name.eq_ignore_ascii_case(b"vary") {
            for d in directives(value) {
                if d == b"*" {
                    return Decision::Pass;
                }
                let Ok(s) = std::str::from_utf8(d) else {
                    return Decision::Pass;
                };
                let s = s.to_ascii_lowercase();
                if !vary.iter().any(|v| **v == *s) {
                    vary.push(s.into());
                }
                if vary.len() > MAX_VARY {
                    return Decision::Pass;
                }
            }
        }
    }
    // What is left of the upstream's freshness once its `Age` is taken off (RFC 9111 4.2).
    let age = age.unwrap_or(0);
    let upstream = smax
        .or(max)
        .map(|f| Duration::from_secs(f.saturating_sub(age)));
    let ttl = match upstream {
        Some(u) => u.min(ttl),
        None => ttl,
    };
    if ttl.is_zero() {
        return Decision::Pass;
    }
    vary.sort();
    Decision::Store {
        ttl,
        vary,
        age: Duration::from_secs(age),
    }
}

/// Whether a request's `Cache-Control` asks for a fresh answer (`max-age=0`).
pub fn request_wants_refresh(value: &[u8]) -> bool {
    directives(value).any(|d| {
        let d = d.to_ascii_lowercase();
        match d.strip_prefix(b"max-age=") {
            Some(v) => parse_secs(unquote(trim(v))) == Some(0),
            None => false,
        }
    })
}

/// The comma-separated, trimmed, non-empty items of a header value.
fn directives(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',').map(trim).filter(|d| !d.is_empty())
}

fn trim(v: &[u8]) -> &[u8] {
    let s = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let e = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(s, |i| i + 1);
    &v[s..e.max(s)]
}

fn unquote(v: &[u8]) -> &[u8] {
    if v.len() >= 2 && v[0] == b'"' && v[v.len() - 1] == b'"' {
        &v[1..v.len() - 1]
    } else {
        v
    }
}

/// Delta-seconds; values past u32 saturate (RFC 9111 §1.2.2).
fn parse_secs(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut n: u64 = 0;
    for &d in v {
        n = (n * 10 + u64::from(d - b'0')).min(1 << 31);
    }
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{Limits, Method, Status};

    fn d(resp: &str, head: bool) -> Decision {
        let mut h = ResponseHead::new(32);
        let lim = Limits {
            max_header_bytes: 8192,
            max_headers: 32,
        };
        let m = if head { Method::Head } else { Method::Get };
        assert!(matches!(
            h.parse(resp.as_bytes(), m, &lim),
            Ok(Status::Complete(_))
        ));
        decide(&h, resp.as_bytes(), Duration::from_secs(300), head)
    }

    fn ttl(s: u64) -> Decision {
        Decision::Store {
            ttl: Duration::from_secs(s),
            vary: vec![],
            age: Duration::ZERO,
        }
    }

    #[test]
    fn plain_200_uses_config_ttl() {
        assert_eq!(
            d("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n", false),
            ttl(300)
        );
        assert_eq!(
            d(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                false
            ),
            ttl(300)
        );
    }

    #[test]
    fn refusals() {
        for r in [
            "HTTP/1.1 200 OK\r\ncache-control: no-store\r\ncontent-length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncache-control: public, Private\r\ncontent-length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncache-control: private=\"x\"\r\ncontent-length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncache-control: no-cache\r\ncontent-length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncache-control: max-age=0\r\ncontent-length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncache-control: max-age=abc\r\ncontent-length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nset-cookie: a=b\r\ncontent-length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\nvary: *\r\ncontent-length: 2\r\n\r\n",
            "HTTP/1.1 500 Oops\r\ncontent-length: 2\r\n\r\n",
            "HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n",
        ] {
            assert_eq!(d(r, false), Decision::Pass, "{r}");
        }
        // A body that ends with the connection may be stored (once it ended with a close).
        assert_eq!(d("HTTP/1.1 200 OK\r\n\r\n", false), ttl(300));
    }

    #[test]
    fn upstream_age_is_taken_off_its_freshness() {
        assert_eq!(
            d(
                "HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\nage: 50\r\ncontent-length: 2\r\n\r\n",
                false
            ),
            Decision::Store {
                ttl: Duration::from_secs(10),
                vary: vec![],
                age: Duration::from_secs(50),
            }
        );
        // Already stale: not stored.
        assert_eq!(
            d(
                "HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\nage: 60\r\ncontent-length: 2\r\n\r\n",
                false
            ),
            Decision::Pass
        );
        // Without the upstream's freshness, the route's TTL; the age still counts in hits.
        assert_eq!(
            d(
                "HTTP/1.1 200 OK\r\nage: 7\r\ncontent-length: 2\r\n\r\n",
                false
            ),
            Decision::Store {
                ttl: Duration::from_secs(300),
                vary: vec![],
                age: Duration::from_secs(7),
            }
        );
    }

    #[test]
    fn max_age_and_s_maxage() {
        assert_eq!(
            d(
                "HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ncontent-length: 2\r\n\r\n",
                false
            ),
            ttl(60)
        );
        // s-maxage wins over max-age for a shared cache.
        assert_eq!(
            d("HTTP/1.1 200 OK\r\ncache-control: max-age=0, s-maxage=\"30\"\r\ncontent-length: 2\r\n\r\n", false),
            ttl(30)
        );
        // Never longer than the configured TTL.
        assert_eq!(
            d(
                "HTTP/1.1 200 OK\r\ncache-control: max-age=99999\r\ncontent-length: 2\r\n\r\n",
                false
            ),
            ttl(300)
        );
    }

    #[test]
    fn vary_names_lowercased_sorted() {
        assert_eq!(
            d(
                "HTTP/1.1 200 OK\r\nvary: Accept-Language, accept\r\nVary: ACCEPT\r\ncontent-length: 2\r\n\r\n",
                false
            ),
            Decision::Store {
                ttl: Duration::from_secs(300),
                vary: vec!["accept".into(), "accept-language".into()],
                age: Duration::ZERO,
            }
        );
    }

    #[test]
    fn refresh_request() {
        assert!(request_wants_refresh(b"max-age=0"));
        assert!(request_wants_refresh(b"no-transform, MAX-AGE=\"0\""));
        assert!(!request_wants_refresh(b"max-age=10"));
        assert!(!request_wants_refresh(b"no-cache"));
    }
}
