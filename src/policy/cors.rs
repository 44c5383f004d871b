//! CORS per API: the gateway answers preflight requests itself (they never reach the
//! upstream) and adds the CORS headers to actual responses. An allowed origin is echoed with
//! `Vary: Origin`; a disallowed origin gets no CORS header at all, so the browser refuses. Every
//! response of a CORS API carries `Vary: Origin` (whether the CORS headers are there depends on
//! the request's `Origin`), so a shared cache never serves one origin's variant to another.
//!
//! Everything but the echoed origin is encoded once when the config is compiled.

use crate::http::encode;

/// The `Vary` line every response of a CORS API carries (written once per response).
pub const VARY_ORIGIN: &[u8] = b"vary: Origin\r\n";

/// Whether a `Vary` field value already lists `Origin` (or is `*`, which covers it).
pub fn vary_lists_origin(value: &[u8]) -> bool {
    value.split(|&b| b == b',').any(|t| {
        let t = t.trim_ascii();
        t == b"*" || t.eq_ignore_ascii_case(b"origin")
    })
}

/// Whether an encoded response head (`name: value\r\n` lines) has a `Vary` listing `Origin`.
pub fn head_varies_on_origin(head: &[u8]) -> bool {
    head.split(|&b| b == b'\n').any(|line| {
        line.len() > 5 && line[..5].eq_ignore_ascii_case(b"vary:") && vary_lists_origin(&line[5..])
    })
}

/// Appends the gateway's per-request headers `extra` to `out`, leaving out its `Vary: Origin`
/// when the upstream's headers already in the answer list `Origin` (`upstream_has`).
pub fn push_extra(out: &mut Vec<u8>, extra: &[u8], upstream_has: bool) {
    if upstream_has {
        if let Some(i) = extra
            .windows(VARY_ORIGIN.len())
            .position(|w| w == VARY_ORIGIN)
        {
            out.extend_from_slice(&extra[..i]);
            out.extend_from_slice(&extra[i + VARY_ORIGIN.len()..]);
            return;
        }
    }
    out.extend_from_slice(extra);
}

/// The compiled `cors = { ... }` of an API.
#[derive(Debug, Clone)]
pub struct Cors {
    origins: Vec<String>,
    any_origin: bool,
    /// Headers after `access-control-allow-origin` on a preflight answer.
    preflight: Vec<u8>,
    /// Headers after `access-control-allow-origin` on an actual response.
    actual: Vec<u8>,
}

/// `cors = { ... }` as written.
pub struct CorsSpec<'a> {
    pub allow_origins: &'a [String],
    pub allow_methods: &'a [String],
    pub allow_headers: &'a [String],
    pub expose_headers: &'a [String],
    pub max_age_s: Option<u64>,
    pub allow_credentials: bool,
}

fn token_ok(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c))
}

/// Checks one `allow_origins` entry: `*`, `http://*` or `https://*` (any origin of that
/// scheme, as Amazon API Gateway's HTTP APIs allow), or an origin as a browser sends it in
/// `Origin` (RFC 6454 serialization): `scheme://host[:port]`, with no path, query, userinfo or
/// wildcard, and no port when it is the scheme's default (browsers leave that out). An entry
/// no browser could ever send would silently never match, so it is refused.
fn check_origin(o: &str) -> Result<(), String> {
    if o == "*" {
        return Ok(());
    }
    let lower = o.to_ascii_lowercase();
    let (rest, default_port) = if let Some(r) = lower.strip_prefix("http://") {
        (r, "80")
    } else if let Some(r) = lower.strip_prefix("https://") {
        (r, "443")
    } else {
        return Err(format!(
            "origin `{o}` must be `http://host[:port]` or `https://host[:port]`, or `*`"
        ));
    };
    if rest == "*" {
        return Ok(());
    }
    if rest.contains('*') {
        return Err(format!(
            "origin `{o}`: a wildcard stands only for a whole origin (`*`) or for every origin of a scheme (`https://*`); list the origins"
        ));
    }
    if let Some(c) = rest.chars().find(|c| matches!(c, '/' | '?' | '#' | '@')) {
        return Err(format!(
            "origin `{o}` must be `scheme://host[:port]` without a path, query or user (`{c}`): browsers send only that"
        ));
    }
    let (host, port) = if let Some(r) = rest.strip_prefix('[') {
        // An IPv6 literal: `[...]` then an optional port.
        let Some((ip, after)) = r.split_once(']') else {
            return Err(format!("origin `{o}`: `[` without `]`"));
        };
        if ip.is_empty()
            || !ip
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return Err(format!("origin `{o}`: `[{ip}]` is not an IPv6 address"));
        }
        match after.strip_prefix(':') {
            Some(p) => (ip, Some(p)),
            None if after.is_empty() => (ip, None),
            None => return Err(format!("origin `{o}`: `{after}` after the IPv6 address")),
        }
    } else {
        match rest.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'))
    {
        return Err(format!(
            "origin `{o}`: host `{host}` is not a DNS name or IP address (write international names in punycode, `xn--...`)"
        ));
    }
    if let Some(p) = port {
        let valid = !p.is_empty()
            && !p.starts_with('0')
            && p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u16>().is_ok();
        if !valid {
            return Err(format!(
                "origin `{o}`: port `{p}` is not a number from 1 to 65535"
            ));
        }
        if p == default_port {
            // The port ends the entry (nothing may follow it).
            let short = &o[..o.len() - p.len() - 1];
            return Err(format!(
                "origin `{o}`: browsers leave the default port out of `Origin`; write `{short}`"
            ));
        }
    }
    Ok(())
}

/// Checks the method and header lists: tokens; methods in upper case (they are
/// case-sensitive, and browsers compare them so); `*` only without credentials (with
/// credentials, browsers read `*` as a literal name).
fn check_lists(s: &CorsSpec<'_>) -> Result<(), String> {
    for (key, list) in [
        ("allow_methods", s.allow_methods),
        ("allow_headers", s.allow_headers),
        ("expose_headers", s.expose_headers),
    ] {
        for t in list {
            if !token_ok(t) {
                return Err(format!("{key}: `{t}` is not a valid method or header name"));
            }
            if t == "*" && s.allow_credentials {
                return Err(format!(
                    "{key} = [\"*\"] cannot be combined with allow_credentials = true (browsers then read `*` as a name); list them"
                ));
            }
            if key == "allow_methods" && t.bytes().any(|b| b.is_ascii_lowercase()) {
                return Err(format!(
                    "allow_methods: `{t}` must be written in upper case (`{}`): methods are case-sensitive",
                    t.to_ascii_uppercase()
                ));
            }
        }
    }
    Ok(())
}

impl Cors {
    /// Validates and pre-encodes; the error says what is wrong.
    pub fn build(s: &CorsSpec<'_>) -> Result<Cors, String> {
        let any_origin = s.allow_origins.iter().any(|o| o == "*");
        if s.allow_credentials {
            if let Some(o) = s
                .allow_origins
                .iter()
                .find(|o| *o == "*" || o.ends_with("://*"))
            {
                return Err(format!(
                    "allow_origins = [\"{o}\"] cannot be combined with allow_credentials = true; list the origins"
                ));
            }
        }
        for o in s.allow_origins {
            check_origin(o)?;
        }
        check_lists(s)?;
        let mut common = VARY_ORIGIN.to_vec();
        if s.allow_credentials {
            encode::push_header(&mut common, b"access-control-allow-credentials", b"true");
        }
        let mut preflight = common.clone();
        let methods = if s.allow_methods.is_empty() {
            "GET, HEAD, POST".to_string()
        } else {
            s.allow_methods.join(", ")
        };
        encode::push_header(
            &mut preflight,
            b"access-control-allow-methods",
            methods.as_bytes(),
        );
        if !s.allow_headers.is_empty() {
            encode::push_header(
                &mut preflight,
                b"access-control-allow-headers",
                s.allow_headers.join(", ").as_bytes(),
            );
        }
        if let Some(m) = s.max_age_s {
            preflight.extend_from_slice(b"access-control-max-age: ");
            encode::push_u64(&mut preflight, m);
            preflight.extend_from_slice(b"\r\n");
        }
        let mut actual = common;
        if !s.expose_headers.is_empty() {
            encode::push_header(
                &mut actual,
                b"access-control-expose-headers",
                s.expose_headers.join(", ").as_bytes(),
            );
        }
        Ok(Cors {
            origins: s
                .allow_origins
                .iter()
                .filter(|o| *o != "*")
                .cloned()
                .collect(),
            any_origin,
            preflight,
            actual,
        })
    }

    /// Whether `origin` may call this API.
    pub fn allowed(&self, origin: &[u8]) -> bool {
        self.any_origin
            || self.origins.iter().any(|o| {
                let o = o.as_bytes();
                match o.strip_suffix(b"*") {
                    // `https://*`: any origin of that scheme with a host.
                    Some(scheme) => {
                        origin.len() > scheme.len()
                            && origin[..scheme.len()].eq_ignore_ascii_case(scheme)
                    }
                    None => o.eq_ignore_ascii_case(origin),
                }
            })
    }

    fn push_origin(&self, origin: &[u8], out: &mut Vec<u8>) {
        if self.any_origin {
            encode::push_header(out, b"access-control-allow-origin", b"*");
        } else {
            encode::push_header(out, b"access-control-allow-origin", origin);
        }
    }

    /// Headers for an actual response to an allowed `origin`.
    pub fn push_actual(&self, origin: &[u8], out: &mut Vec<u8>) {
        self.push_origin(origin, out);
        out.extend_from_slice(&self.actual);
    }

    /// The CORS headers of an actual (non-preflight) response: the allowed `origin`'s, or
    /// `Vary: Origin` alone when the request has no `Origin` or one not allowed.
    pub fn push_for(&self, origin: Option<&[u8]>, out: &mut Vec<u8>) {
        match origin {
            Some(o) if self.allowed(o) => self.push_actual(o, out),
            _ => out.extend_from_slice(VARY_ORIGIN),
        }
    }

    /// Headers of a preflight answer to an allowed `origin`.
    pub fn push_preflight(&self, origin: &[u8], out: &mut Vec<u8>) {
        self.push_origin(origin, out);
        out.extend_from_slice(&self.preflight);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn echo_allowed_origin_only() {
        let o = v(&["https://app.example.com"]);
        let m = v(&["GET", "PUT"]);
        let h = v(&["content-type", "x-api-key"]);
        let e = v(&["x-total"]);
        let c = Cors::build(&CorsSpec {
            allow_origins: &o,
            allow_methods: &m,
            allow_headers: &h,
            expose_headers: &e,
            max_age_s: Some(600),
            allow_credentials: true,
        })
        .unwrap();
        assert!(c.allowed(b"https://app.example.com"));
        assert!(!c.allowed(b"https://evil.example.com"));
        let mut out = Vec::new();
        c.push_preflight(b"https://app.example.com", &mut out);
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.contains("access-control-allow-origin: https://app.example.com\r\n"),
            "{s}"
        );
        assert!(s.contains("vary: Origin\r\n"));
        assert!(s.contains("access-control-allow-methods: GET, PUT\r\n"));
        assert!(s.contains("access-control-allow-headers: content-type, x-api-key\r\n"));
        assert!(s.contains("access-control-max-age: 600\r\n"));
        assert!(s.contains("access-control-allow-credentials: true\r\n"));
        let mut out = Vec::new();
        c.push_actual(b"https://app.example.com", &mut out);
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.contains("access-control-expose-headers: x-total\r\n"),
            "{s}"
        );
        assert!(!s.contains("max-age"));
        assert_eq!(s.matches("vary: Origin\r\n").count(), 1, "{s}");
    }

    #[test]
    fn vary_tokens() {
        assert!(vary_lists_origin(b"Origin"));
        assert!(vary_lists_origin(b"accept-encoding, ORIGIN"));
        assert!(vary_lists_origin(b" * "));
        assert!(!vary_lists_origin(b"accept-encoding"));
        assert!(!vary_lists_origin(b"x-origin"));
        assert!(head_varies_on_origin(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nVary: Accept-Encoding, Origin\r\n"
        ));
        assert!(!head_varies_on_origin(
            b"HTTP/1.1 200 OK\r\nx-vary: Origin\r\n"
        ));
        let mut out = Vec::new();
        push_extra(&mut out, b"a: 1\r\nvary: Origin\r\nb: 2\r\n", true);
        assert_eq!(out, b"a: 1\r\nb: 2\r\n");
        out.clear();
        push_extra(&mut out, b"vary: Origin\r\n", false);
        assert_eq!(out, b"vary: Origin\r\n");
    }

    #[test]
    fn star_with_credentials_refused() {
        let o = v(&["*"]);
        let e = Cors::build(&CorsSpec {
            allow_origins: &o,
            allow_methods: &[],
            allow_headers: &[],
            expose_headers: &[],
            max_age_s: None,
            allow_credentials: true,
        })
        .unwrap_err();
        assert!(e.contains("allow_credentials"));
        let bad = v(&["https://a.example.com/"]);
        assert!(Cors::build(&CorsSpec {
            allow_origins: &bad,
            allow_methods: &[],
            allow_headers: &[],
            expose_headers: &[],
            max_age_s: None,
            allow_credentials: false,
        })
        .is_err());
    }

    fn build_err(origins: &[&str], methods: &[&str], headers: &[&str], creds: bool) -> String {
        let (o, m, h) = (v(origins), v(methods), v(headers));
        Cors::build(&CorsSpec {
            allow_origins: &o,
            allow_methods: &m,
            allow_headers: &h,
            expose_headers: &[],
            max_age_s: None,
            allow_credentials: creds,
        })
        .err()
        .unwrap_or_default()
    }

    #[test]
    fn origins_no_browser_sends_are_refused() {
        for (o, want) in [
            ("https://*.example.com", "wildcard"),
            ("https://a.example.com/path", "without a path"),
            ("http://h?x", "without a path"),
            ("http://user@h", "without a path"),
            ("http://h:*", "wildcard"),
            ("http://h:80", "write `http://h`"),
            ("https://h:443", "write `https://h`"),
            ("http://h:080", "port `080`"),
            ("http://h:70000", "port `70000`"),
            ("http://h:", "port ``"),
            ("http://", "host ``"),
            ("http://[::1", "without `]`"),
            ("http://[zz]", "not an IPv6 address"),
            ("http://exämple.com", "punycode"),
            ("ftp://h", "must be `http://host[:port]`"),
        ] {
            let e = build_err(&[o], &[], &[], false);
            assert!(e.contains(want), "{o}: {e}");
        }
        for o in [
            "*",
            "http://*",
            "https://*",
            "http://h:8080",
            "https://App.Example.com",
            "http://[::1]:3000",
            "http://127.0.0.1",
            "https://xn--exmple-cua.com",
        ] {
            assert_eq!(build_err(&[o], &[], &[], false), "", "{o}");
        }
    }

    #[test]
    fn scheme_wildcard_matches_that_scheme_only() {
        let o = v(&["https://*", "http://localhost:3000"]);
        let c = Cors::build(&CorsSpec {
            allow_origins: &o,
            allow_methods: &[],
            allow_headers: &[],
            expose_headers: &[],
            max_age_s: None,
            allow_credentials: false,
        })
        .unwrap();
        assert!(c.allowed(b"https://anything.example"));
        assert!(c.allowed(b"HTTPS://x"));
        assert!(!c.allowed(b"https://"));
        assert!(!c.allowed(b"http://anything.example"));
        assert!(c.allowed(b"http://localhost:3000"));
        assert!(!c.allowed(b"null"));
        let e = build_err(&["https://*"], &[], &[], true);
        assert!(e.contains("allow_credentials"), "{e}");
    }

    #[test]
    fn method_case_and_star_with_credentials() {
        let e = build_err(&["https://a.example"], &["get", "PUT"], &[], false);
        assert!(
            e.contains("`get` must be written in upper case (`GET`)"),
            "{e}"
        );
        let e = build_err(&["https://a.example"], &["*"], &[], true);
        assert!(
            e.contains("allow_methods") && e.contains("allow_credentials"),
            "{e}"
        );
        let e = build_err(&["https://a.example"], &["GET"], &["*"], true);
        assert!(
            e.contains("allow_headers") && e.contains("allow_credentials"),
            "{e}"
        );
        assert_eq!(build_err(&["https://a.example"], &["*"], &["*"], false), "");
    }
}
