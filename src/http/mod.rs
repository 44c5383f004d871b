//! HTTP/1.x wire handling for the proxy: strict request-head parsing
//! ([`RequestHead`]), upstream response-head parsing ([`ResponseHead`]),
//! streaming chunked-body validation ([`ChunkedDecoder`]) and allocation-free
//! head encoding helpers ([`encode`]).
//!
//! Parsed heads never borrow the read buffer: every position is stored as a
//! `(start, end)` byte-offset pair into the buffer that was parsed, so a head
//! can be kept while the buffer is moved (e.g. handed to io_uring). The
//! caller owns and reuses the head objects; in steady state parsing does not
//! allocate.

pub mod chunked;
pub mod client;
pub mod encode;
#[doc(hidden)]
pub mod fuzz_checks;
pub mod request;
pub mod response;

use std::fmt;

pub use chunked::{ChunkError, ChunkedDecoder};
pub use encode::{
    is_hop_by_hop, push_header, push_request_line, push_status_line, push_u64, reason, DateCache,
};
pub use request::{BodyKind, RequestHead};
pub use response::{RespBody, ResponseHead};

/// Hard cap on the number of headers in one head, whatever [`Limits`] says
/// (bounds the stack array handed to httparse).
pub const MAX_HEADERS_CAP: usize = 256;

/// One header as byte offsets into the parsed buffer: `(start, end)` ranges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeaderView {
    /// Range of the header name (as received, original case).
    pub name: (u32, u32),
    /// Range of the header value (leading/trailing whitespace trimmed).
    pub value: (u32, u32),
    /// What the name is, decided once when the head is parsed.
    pub kind: HeaderKind,
}

/// The header names the gateway treats specially, recognised once per header at parse time
/// so that forwarding and lookups compare a byte instead of names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(u8)]
pub enum HeaderKind {
    /// Any other name.
    #[default]
    Other,
    /// `host`
    Host,
    /// `content-length`
    ContentLength,
    /// `transfer-encoding` (hop-by-hop)
    TransferEncoding,
    /// `connection` (hop-by-hop)
    Connection,
    /// `upgrade` (hop-by-hop)
    Upgrade,
    /// keep-alive, proxy-connection, te, trailer, proxy-authenticate, proxy-authorization
    HopByHop,
    /// `expect`
    Expect,
    /// `x-forwarded-for`
    XForwardedFor,
    /// `x-forwarded-proto`
    XForwardedProto,
    /// `x-forwarded-host`
    XForwardedHost,
    /// `x-request-id`
    XRequestId,
    /// `x-principal-id`
    XPrincipalId,
    /// `x-cache`
    XCache,
    /// `sec-websocket-extensions`
    SecWebSocketExtensions,
    /// Any `access-control-*` name.
    AccessControl,
    /// `x-forwarded-client-cert` (the gateway's own: set from a verified client certificate)
    XForwardedClientCert,
    /// `forwarded`, `x-real-ip` and the other `x-forwarded-*` names (`-port`, `-prefix`, ...):
    /// what a proxy says about the client. A client's own are not passed on: they would
    /// stand beside the gateway's `X-Forwarded-*` as if a proxy had written them.
    ClientForwarding,
    /// A request header whose name has an underscore: never forwarded, as nginx's default
    /// (`underscores_in_headers off`). CGI-style backends read `x_principal_id` as
    /// `x-principal-id`, so passing it on would get around the gateway's own headers.
    Underscore,
}

impl HeaderKind {
    /// Classifies a header name (case-insensitive): a dispatch on length and first letter,
    /// then one word-wise compare.
    pub fn of(name: &[u8]) -> HeaderKind {
        use HeaderKind::*;
        let Some(&first) = name.first() else {
            return Other;
        };
        let (lit, kind): (&[u8], HeaderKind) = match (name.len(), first | 0x20) {
            (2, b't') => (b"te", HopByHop),
            (9, b'f') => (b"forwarded", ClientForwarding),
            (9, b'x') => (b"x-real-ip", ClientForwarding),
            (4, b'h') => (b"host", Host),
            (6, b'e') => (b"expect", Expect),
            (7, b'u') => (b"upgrade", Upgrade),
            (7, b't') => (b"trailer", HopByHop),
            (7, b'x') => (b"x-cache", XCache),
            (10, b'c') => (b"connection", Connection),
            (10, b'k') => (b"keep-alive", HopByHop),
            (12, b'x') => (b"x-request-id", XRequestId),
            (14, b'c') => (b"content-length", ContentLength),
            (14, b'x') => (b"x-principal-id", XPrincipalId),
            (15, b'x') => (b"x-forwarded-for", XForwardedFor),
            (16, b'p') => (b"proxy-connection", HopByHop),
            (16, b'x') => (b"x-forwarded-host", XForwardedHost),
            (17, b't') => (b"transfer-encoding", TransferEncoding),
            (17, b'x') => (b"x-forwarded-proto", XForwardedProto),
            (18, b'p') => (b"proxy-authenticate", HopByHop),
            (19, b'p') => (b"proxy-authorization", HopByHop),
            (23, b'x') => (b"x-forwarded-client-cert", XForwardedClientCert),
            (24, b's') => (b"sec-websocket-extensions", SecWebSocketExtensions),
            (16.., b'a') if eq_lower(&name[..15], b"access-control-") => return AccessControl,
            _ => return Self::other(name),
        };
        if eq_lower(name, lit) {
            kind
        } else {
            Self::other(name)
        }
    }

    /// A name that is none of the fixed ones: the other `x-forwarded-*`, or [`HeaderKind::Other`].
    #[inline]
    fn other(name: &[u8]) -> HeaderKind {
        if name.len() > 12 && name[0] | 0x20 == b'x' && eq_lower(&name[..12], b"x-forwarded-") {
            HeaderKind::ClientForwarding
        } else {
            HeaderKind::Other
        }
    }

    /// Hop-by-hop (RFC 9110 §7.6.1): never forwarded.
    pub fn is_hop_by_hop(self) -> bool {
        matches!(
            self,
            HeaderKind::TransferEncoding
                | HeaderKind::Connection
                | HeaderKind::Upgrade
                | HeaderKind::HopByHop
        )
    }
}

/// Request method. Methods other than the standard ones are `Other`; their
/// bytes are at `RequestHead::method_range`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    /// `GET`
    Get,
    /// `HEAD`
    Head,
    /// `POST`
    Post,
    /// `PUT`
    Put,
    /// `DELETE`
    Delete,
    /// `PATCH`
    Patch,
    /// `OPTIONS`
    Options,
    /// `CONNECT`
    Connect,
    /// `TRACE`
    Trace,
    /// Any other (extension) method token.
    Other,
}

impl Method {
    /// Canonical upper-case name; `""` for [`Method::Other`] (use the
    /// request's `method_range` / [`RequestHead::method_bytes`] instead).
    pub fn as_str(&self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Patch => "PATCH",
            Method::Options => "OPTIONS",
            Method::Connect => "CONNECT",
            Method::Trace => "TRACE",
            Method::Other => "",
        }
    }

    /// Idempotent per RFC 9110 §9.2.2: GET, HEAD, PUT, DELETE, OPTIONS, TRACE.
    pub fn is_idempotent(&self) -> bool {
        matches!(
            self,
            Method::Get
                | Method::Head
                | Method::Put
                | Method::Delete
                | Method::Options
                | Method::Trace
        )
    }

    /// Classifies a method token (case-sensitive, as RFC 9110 requires).
    pub fn from_bytes(b: &[u8]) -> Method {
        match b {
            b"GET" => Method::Get,
            b"HEAD" => Method::Head,
            b"POST" => Method::Post,
            b"PUT" => Method::Put,
            b"DELETE" => Method::Delete,
            b"PATCH" => Method::Patch,
            b"OPTIONS" => Method::Options,
            b"CONNECT" => Method::Connect,
            b"TRACE" => Method::Trace,
            _ => Method::Other,
        }
    }
}

/// Size limits applied while parsing a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Maximum size of the whole head (request/status line + headers + the
    /// terminating empty line).
    pub max_header_bytes: usize,
    /// Maximum number of header fields (capped at [`MAX_HEADERS_CAP`]).
    pub max_headers: usize,
}

impl Default for Limits {
    /// 16 KiB head, 100 headers.
    fn default() -> Self {
        Limits {
            max_header_bytes: 16 * 1024,
            max_headers: 100,
        }
    }
}

/// Outcome of a successful parse call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// A whole head was parsed; the value is its length in bytes (the body or
    /// the next pipelined message starts at `buf[head_len..]`).
    Complete(usize),
    /// More bytes are needed.
    Partial,
}

/// Why a head was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpError {
    /// Malformed or ambiguous message; the reason is short and safe to log.
    BadRequest(&'static str),
    /// The head is (or would become) larger than `max_header_bytes`.
    HeadTooLarge,
    /// More than `max_headers` header fields.
    TooManyHeaders,
    /// A request line naming another major version than HTTP/1 (`HTTP/2.0`, `HTTP/3`).
    VersionNotSupported,
}

impl HttpError {
    /// Status code to answer a client with: 400, 431 or 431. (For errors from
    /// [`ResponseHead::parse`] the proxy should answer 502 instead.)
    pub fn status(&self) -> u16 {
        match self {
            HttpError::BadRequest(_) => 400,
            HttpError::HeadTooLarge | HttpError::TooManyHeaders => 431,
            HttpError::VersionNotSupported => 505,
        }
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::BadRequest(r) => write!(f, "Bad Request: {r}"),
            HttpError::HeadTooLarge => f.write_str("header section too large"),
            HttpError::TooManyHeaders => f.write_str("too many header fields"),
            HttpError::VersionNotSupported => f.write_str("HTTP version not supported"),
        }
    }
}

impl std::error::Error for HttpError {}

// ---------------------------------------------------------------------------
// Helpers shared by request.rs and response.rs.

/// Percent-decodes `s` into `out` (invalid escapes are kept as they are; `+` becomes a space
/// when `plus` is set).
pub fn percent_decode(s: &[u8], plus: bool, out: &mut Vec<u8>) {
    out.clear();
    let hex = |c: u8| -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    };
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        if c == b'%' && i + 2 < s.len() {
            if let (Some(a), Some(b)) = (hex(s[i + 1]), hex(s[i + 2])) {
                out.push(a << 4 | b);
                i += 3;
                continue;
            }
        }
        out.push(if plus && c == b'+' { b' ' } else { c });
        i += 1;
    }
}

/// Whether every `%` in `s` starts a `%XX` escape (XX two hex digits).
pub fn percent_well_formed(s: &[u8]) -> bool {
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            if i + 2 >= s.len() || !s[i + 1].is_ascii_hexdigit() || !s[i + 2].is_ascii_hexdigit() {
                return false;
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    true
}

/// The raw (still encoded) values of query parameter `name` in `query`, in order; names are
/// compared percent-decoded, `+` as a space (`%74oken` is `token`).
pub fn query_values<'a>(query: &'a [u8], name: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
    query
        .split(|&c| c == b'&')
        .filter(|p| !p.is_empty())
        .filter_map(move |pair| {
            let (k, v) = match pair.iter().position(|&c| c == b'=') {
                Some(i) => (&pair[..i], &pair[i + 1..]),
                None => (pair, &b""[..]),
            };
            query_name_is(k, name).then_some(v)
        })
}

/// Whether the raw (percent-encoded, `+` for space) query name `raw` decodes to `name`.
pub fn query_name_is(raw: &[u8], name: &[u8]) -> bool {
    if raw == name {
        return true;
    }
    if !raw.iter().any(|&c| c == b'%' || c == b'+') {
        return false;
    }
    let mut d = Vec::with_capacity(raw.len());
    percent_decode(raw, true, &mut d);
    d == name
}

/// Maps an httparse error to ours.
pub(crate) fn map_httparse_err(e: httparse::Error) -> HttpError {
    use httparse::Error as E;
    HttpError::BadRequest(match e {
        E::HeaderName => "invalid header name",
        E::HeaderValue => "invalid header value",
        E::NewLine => "invalid line ending",
        E::Status => "invalid status line",
        E::Token => "invalid request line",
        E::Version => "unsupported HTTP version",
        E::TooManyHeaders => return HttpError::TooManyHeaders,
    })
}

/// `(start, end)` of `s`, which must be a sub-slice of `base`.
#[inline]
pub(crate) fn offsets(base: &[u8], s: &[u8]) -> (u32, u32) {
    let start = (s.as_ptr() as usize).wrapping_sub(base.as_ptr() as usize);
    if start > base.len() || base.len() - start < s.len() {
        // Only reachable for empty slices not derived from `base`.
        debug_assert!(s.is_empty());
        return (0, 0);
    }
    (start as u32, (start + s.len()) as u32)
}

/// `&buf[r.0..r.1]`.
#[inline]
pub(crate) fn range(buf: &[u8], r: (u32, u32)) -> &[u8] {
    &buf[r.0 as usize..r.1 as usize]
}

/// True when every LF in `head` is preceded by CR and every CR is followed by
/// LF. Branch-free SWAR scan, 8 bytes per step: the set of LF positions must
/// equal the set of CR positions shifted by one byte.
pub(crate) fn crlf_only(head: &[u8]) -> bool {
    const LO7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const HI: u64 = 0x8080_8080_8080_8080;
    const LF: u64 = 0x0a0a_0a0a_0a0a_0a0a;
    const CR: u64 = 0x0d0d_0d0d_0d0d_0d0d;
    /// High bit set in each byte of `x` equal to the byte in `pat` (exact).
    #[inline(always)]
    fn eq_mask(x: u64, pat: u64) -> u64 {
        let t = x ^ pat;
        !(((t & LO7).wrapping_add(LO7)) | t) & HI
    }
    let mut carry = 0u64; // CR in the last byte of the previous word
    let mut bad = 0u64;
    let mut step = |w: [u8; 8]| {
        let x = u64::from_le_bytes(w);
        let lf = eq_mask(x, LF);
        let cr = eq_mask(x, CR);
        bad |= lf ^ ((cr << 8) | carry);
        carry = cr >> 56;
    };
    let mut chunks = head.chunks_exact(8);
    for c in chunks.by_ref() {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        step(w);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        step(w);
    }
    bad == 0 && carry == 0
}

/// Strips leading and trailing SP/HTAB.
#[inline]
pub(crate) fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// Non-empty comma-separated list elements with OWS trimmed.
#[inline]
pub(crate) fn list_items(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',')
        .map(trim_ows)
        .filter(|t| !t.is_empty())
}

/// Parses one Content-Length value (which may be a list of identical values,
/// e.g. `5, 5`) and merges it with a previously seen value.
pub(crate) fn merge_content_length(prev: Option<u64>, v: &[u8]) -> Result<u64, HttpError> {
    let mut cur = prev;
    let mut any = false;
    for item in v.split(|&b| b == b',') {
        let item = trim_ows(item);
        if item.is_empty() {
            return Err(HttpError::BadRequest("invalid Content-Length"));
        }
        let mut n: u64 = 0;
        for &d in item {
            if !d.is_ascii_digit() {
                return Err(HttpError::BadRequest("invalid Content-Length"));
            }
            n = n
                .checked_mul(10)
                .and_then(|n| n.checked_add(u64::from(d - b'0')))
                .ok_or(HttpError::BadRequest("Content-Length overflow"))?;
        }
        match cur {
            Some(c) if c != n => return Err(HttpError::BadRequest("conflicting Content-Length")),
            _ => cur = Some(n),
        }
        any = true;
    }
    match (any, cur) {
        (true, Some(n)) => Ok(n),
        _ => Err(HttpError::BadRequest("invalid Content-Length")),
    }
}

/// Flags collected from `Connection` header tokens.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ConnFlags {
    pub close: bool,
    pub keep_alive: bool,
    pub upgrade: bool,
    /// Some token other than close/keep-alive/upgrade: it may name a header
    /// that must not be forwarded.
    pub other: bool,
}

impl ConnFlags {
    pub(crate) fn add(&mut self, v: &[u8]) {
        for t in list_items(v) {
            if t.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if t.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if t.eq_ignore_ascii_case(b"upgrade") {
                self.upgrade = true;
            } else {
                self.other = true;
            }
        }
    }
}

/// Finds the first header named `name` (case-insensitive).
#[inline]
pub(crate) fn find_header<'b>(
    headers: &[HeaderView],
    buf: &'b [u8],
    name: &str,
) -> Option<&'b [u8]> {
    let name = name.as_bytes();
    headers
        .iter()
        .find(|h| range(buf, h.name).eq_ignore_ascii_case(name))
        .map(|h| range(buf, h.value))
}

/// `a == lit` ignoring ASCII case, for a token `a` (a header name) and a `lit` of lowercase
/// letters and `-`, eight bytes at a time. OR-ing 0x20 lowercases letters and leaves `-`; the
/// only other bytes it turns into a letter or `-` are controls (CR becomes `-`), which no
/// token holds. `a` and `lit` have the same length.
fn eq_lower(a: &[u8], lit: &[u8]) -> bool {
    debug_assert_eq!(a.len(), lit.len());
    let mut ac = a.chunks_exact(8);
    let mut lc = lit.chunks_exact(8);
    for (x, y) in (&mut ac).zip(&mut lc) {
        let x = u64::from_ne_bytes(x.try_into().unwrap_or_default());
        let y = u64::from_ne_bytes(y.try_into().unwrap_or_default());
        if x | 0x2020_2020_2020_2020 != y {
            return false;
        }
    }
    ac.remainder()
        .iter()
        .zip(lc.remainder())
        .all(|(x, y)| x | 0x20 == *y)
}

/// Whether header `h` should be forwarded to the next hop.
fn forward_ok(
    headers: &[HeaderView],
    buf: &[u8],
    h: &HeaderView,
    conn_other: bool,
    request: bool,
) -> bool {
    if h.kind.is_hop_by_hop()
        || h.kind == HeaderKind::ContentLength
        || (request && matches!(h.kind, HeaderKind::Expect | HeaderKind::Underscore))
    {
        return false;
    }
    // `Connection: Host` cannot take the Host away: it is for every recipient (RFC 9110
    // 7.6.1), and an HTTP/1.1 request must carry it.
    if conn_other && h.kind != HeaderKind::Host {
        let name = range(buf, h.name);
        let named = headers
            .iter()
            .filter(|c| c.kind == HeaderKind::Connection)
            .any(|c| list_items(range(buf, c.value)).any(|t| t.eq_ignore_ascii_case(name)));
        if named {
            return false;
        }
    }
    true
}

/// Iterator over the forwardable `(kind, name, value)` triples of a header list.
pub(crate) fn forwardable_iter<'b>(
    headers: &'b [HeaderView],
    buf: &'b [u8],
    conn_other: bool,
    request: bool,
) -> impl Iterator<Item = (HeaderKind, &'b [u8], &'b [u8])> {
    headers
        .iter()
        .filter(move |h| forward_ok(headers, buf, h, conn_other, request))
        .map(move |h| (h.kind, range(buf, h.name), range(buf, h.value)))
}

/// First value of the header of `kind` (not `Other`).
pub(crate) fn find_kind<'b>(
    headers: &[HeaderView],
    buf: &'b [u8],
    kind: HeaderKind,
) -> Option<&'b [u8]> {
    debug_assert!(kind != HeaderKind::Other);
    headers
        .iter()
        .find(|h| h.kind == kind)
        .map(|h| range(buf, h.value))
}

#[cfg(test)]
mod tests {

    #[test]
    fn percent_well_formed_wants_two_hex_digits_after_every_percent() {
        for ok in [&b""[..], b"abc", b"%41", b"a%2fb%2F", b"%%"[..0].as_ref()] {
            assert!(percent_well_formed(ok), "{ok:?}");
        }
        for bad in [&b"%"[..], b"%4", b"%zz", b"a%4g", b"%41%"] {
            assert!(!percent_well_formed(bad), "{bad:?}");
        }
    }

    #[test]
    fn query_values_compare_decoded_names() {
        let q = b"a=1&%74oken=x%2By&token=2&b&token";
        let v: Vec<&[u8]> = query_values(q, b"token").collect();
        assert_eq!(v, vec![&b"x%2By"[..], b"2", b""]);
        assert_eq!(query_values(q, b"b").count(), 1);
        assert_eq!(query_values(b"", b"a").count(), 0);
        assert_eq!(query_values(b"a+b=1", b"a b").count(), 1);
    }
    use super::*;

    #[test]
    fn header_kinds() {
        use HeaderKind::*;
        let known: &[(&str, HeaderKind)] = &[
            ("te", HopByHop),
            ("host", Host),
            ("expect", Expect),
            ("upgrade", Upgrade),
            ("trailer", HopByHop),
            ("x-cache", XCache),
            ("connection", Connection),
            ("keep-alive", HopByHop),
            ("x-request-id", XRequestId),
            ("content-length", ContentLength),
            ("x-principal-id", XPrincipalId),
            ("x-forwarded-for", XForwardedFor),
            ("proxy-connection", HopByHop),
            ("x-forwarded-host", XForwardedHost),
            ("transfer-encoding", TransferEncoding),
            ("x-forwarded-proto", XForwardedProto),
            ("proxy-authenticate", HopByHop),
            ("proxy-authorization", HopByHop),
            ("sec-websocket-extensions", SecWebSocketExtensions),
            ("x-forwarded-client-cert", XForwardedClientCert),
            ("access-control-allow-origin", AccessControl),
            ("Access-Control-Max-Age", AccessControl),
            ("forwarded", ClientForwarding),
            ("x-real-ip", ClientForwarding),
            ("x-forwarded-port", ClientForwarding),
            ("X-Forwarded-Prefix", ClientForwarding),
            ("x-forwarded-server", ClientForwarding),
        ];
        for (name, kind) in known {
            assert_eq!(HeaderKind::of(name.as_bytes()), *kind, "{name}");
            assert_eq!(
                HeaderKind::of(name.to_uppercase().as_bytes()),
                *kind,
                "{name}"
            );
            // Any single changed byte makes it another name.
            for i in 0..name.len() {
                for b in [b'_', b'0', b'!', b'~', b'x', b'^', b'`'] {
                    let mut n = name.as_bytes().to_vec();
                    if n[i].eq_ignore_ascii_case(&b) {
                        continue;
                    }
                    n[i] = b;
                    let k = HeaderKind::of(&n);
                    let prefix =
                        (i >= 15 && *kind == AccessControl) || (i >= 12 && k == ClientForwarding);
                    assert!(
                        k == Other || prefix,
                        "{:?} -> {k:?}",
                        String::from_utf8_lossy(&n)
                    );
                }
            }
        }
        for other in [
            "",
            "a",
            "date",
            "server",
            "content-type",
            "access-control-",
            "hosts",
            "x-forwarded",
            "x-forwarded-",
            "forwarded-for",
        ] {
            assert_eq!(HeaderKind::of(other.as_bytes()), Other, "{other}");
        }
    }

    #[test]
    fn crlf_scan() {
        assert!(crlf_only(b""));
        assert!(crlf_only(b"GET / HTTP/1.1\r\nHost: abcdefghijkl\r\n\r\n"));
        assert!(!crlf_only(b"GET / HTTP/1.1\nHost: a\r\n\r\n"));
        assert!(!crlf_only(b"\n"));
        assert!(!crlf_only(b"\r"));
        assert!(!crlf_only(b"abc\rdef"));
        // Bare LF at every position of a long line, both in SWAR words and
        // in the tail.
        for len in 1..40 {
            for pos in 0..len {
                let mut v = vec![b'a'; len];
                v[pos] = b'\n';
                assert!(!crlf_only(&v), "len {len} pos {pos}");
                v[pos] = b'\r';
                assert!(!crlf_only(&v), "len {len} pos {pos}");
                if pos + 1 < len {
                    v[pos + 1] = b'\n';
                    assert!(crlf_only(&v), "len {len} pos {pos}");
                }
            }
        }
    }

    #[test]
    fn crlf_scan_matches_naive() {
        let naive = |h: &[u8]| {
            (0..h.len()).all(|i| match h[i] {
                b'\n' => i > 0 && h[i - 1] == b'\r',
                b'\r' => h.get(i + 1) == Some(&b'\n'),
                _ => true,
            })
        };
        let mut rng = fuzz_checks::XorShift(77);
        for _ in 0..50_000 {
            let len = rng.below(40) as usize;
            let v: Vec<u8> = (0..len)
                .map(|_| match rng.below(4) {
                    0 => b'\r',
                    1 => b'\n',
                    2 => rng.next_u64() as u8,
                    _ => b'a',
                })
                .collect();
            assert_eq!(crlf_only(&v), naive(&v), "{v:?}");
        }
    }

    #[test]
    fn content_length_merge() {
        assert_eq!(merge_content_length(None, b"5"), Ok(5));
        assert_eq!(merge_content_length(None, b"5, 5"), Ok(5));
        assert_eq!(merge_content_length(Some(5), b" 5 "), Ok(5));
        assert!(merge_content_length(Some(5), b"6").is_err());
        assert!(merge_content_length(None, b"5, 6").is_err());
        assert!(merge_content_length(None, b"").is_err());
        assert!(merge_content_length(None, b"5,").is_err());
        assert!(merge_content_length(None, b"+5").is_err());
        assert!(merge_content_length(None, b"0x5").is_err());
        assert_eq!(
            merge_content_length(None, b"18446744073709551615"),
            Ok(u64::MAX)
        );
        assert!(merge_content_length(None, b"18446744073709551616").is_err());
    }

    #[test]
    fn method_props() {
        assert_eq!(Method::from_bytes(b"GET"), Method::Get);
        assert_eq!(Method::from_bytes(b"get"), Method::Other);
        assert_eq!(Method::Patch.as_str(), "PATCH");
        assert!(Method::Put.is_idempotent());
        assert!(!Method::Post.is_idempotent());
        assert!(!Method::Patch.is_idempotent());
        assert_eq!(HttpError::BadRequest("x").status(), 400);
        assert_eq!(HttpError::HeadTooLarge.status(), 431);
        assert_eq!(HttpError::TooManyHeaders.status(), 431);
        assert_eq!(
            HttpError::BadRequest("x").to_string(),
            "Bad Request: x".to_string()
        );
    }
}
