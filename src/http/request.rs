//! Strict (RFC 9112) parsing of client request heads into a reusable
//! [`RequestHead`], rejecting ambiguous framing and other request-smuggling
//! vectors before anything is forwarded.

use std::mem::MaybeUninit;

use super::{
    crlf_only, find_header, find_kind, forwardable_iter, list_items, map_httparse_err,
    merge_content_length, offsets, range, ConnFlags, HeaderKind, HeaderView, HttpError, Limits,
    Method, Status, MAX_HEADERS_CAP,
};

/// How the request body is framed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// No body (no Content-Length nor Transfer-Encoding).
    None,
    /// `Content-Length: n` (kept even when `n == 0`).
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// A parsed request head. Reuse one per connection: [`RequestHead::parse`]
/// overwrites every field and refills `headers` without reallocating.
#[derive(Clone, Debug)]
pub struct RequestHead {
    /// Parsed method.
    pub method: Method,
    /// Method token range (use it for [`Method::Other`]).
    pub method_range: (u32, u32),
    /// Full request-target (path and query) as received; after
    /// [`RequestHead::normalize_path`] use `path` and `query`, which stay exact.
    pub target: (u32, u32),
    /// Path part of the target (without `?query`); `*` for `OPTIONS *`.
    pub path: (u32, u32),
    /// Query without the leading `?` (`Some` and possibly empty if a `?` was
    /// present).
    pub query: Option<(u32, u32)>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Head length including the terminating empty line.
    pub head_len: usize,
    /// All header fields, in order.
    pub headers: Vec<HeaderView>,
    /// Body framing.
    pub body: BodyKind,
    /// Whether the connection may be reused after this request.
    pub keep_alive: bool,
    /// `Expect: 100-continue` was sent.
    pub expect_continue: bool,
    /// `Upgrade: websocket` with `Connection: upgrade`.
    pub upgrade_websocket: bool,
    /// Value range of the (single) Host header.
    pub host: Option<(u32, u32)>,
    /// The authority of an absolute-form target (equal to `host`, or standing in for a
    /// missing one in HTTP/1.0).
    authority: Option<(u32, u32)>,
    /// `host` is the target's authority: the request had no Host header (HTTP/1.0).
    pub host_from_target: bool,
    /// Connection carried tokens other than close/keep-alive/upgrade.
    conn_other: bool,
    /// The path has `//` or percent-encoding: [`RequestHead::normalize_path`] must run before
    /// it is routed.
    pub path_dirty: bool,
    /// When [`RequestHead::normalize_path`] decoded percent-encoding: the path as the client
    /// sent it, empty segments merged and the encoding kept (what a SigV4 signer signs).
    pub signed_path: Option<Box<[u8]>>,
}

impl RequestHead {
    /// Creates an empty head whose header vector can hold `max_headers`
    /// entries (capped at [`MAX_HEADERS_CAP`]) without reallocating.
    pub fn new(max_headers: usize) -> Self {
        RequestHead {
            method: Method::Get,
            method_range: (0, 0),
            target: (0, 0),
            path: (0, 0),
            query: None,
            minor_version: 1,
            head_len: 0,
            headers: Vec::with_capacity(max_headers.min(MAX_HEADERS_CAP)),
            body: BodyKind::None,
            keep_alive: false,
            expect_continue: false,
            upgrade_websocket: false,
            host: None,
            authority: None,
            host_from_target: false,
            conn_other: false,
            path_dirty: false,
            signed_path: None,
        }
    }

    fn reset(&mut self) {
        self.method = Method::Get;
        self.method_range = (0, 0);
        self.target = (0, 0);
        self.path = (0, 0);
        self.query = None;
        self.minor_version = 1;
        self.head_len = 0;
        self.headers.clear();
        self.body = BodyKind::None;
        self.keep_alive = false;
        self.expect_continue = false;
        self.upgrade_websocket = false;
        self.host = None;
        self.authority = None;
        self.host_from_target = false;
        self.conn_other = false;
        // Targets that return early from `parse_target` (`*`, an absolute-form empty path)
        // set neither: the previous request's must not stay.
        self.path_dirty = false;
        self.signed_path = None;
    }

    /// Parses the request head at the start of `buf`.
    ///
    /// Returns `Partial` if more bytes are needed, or `HeadTooLarge` once
    /// `buf.len() >= limits.max_header_bytes` without a complete head (a head
    /// of exactly `max_header_bytes` bytes is accepted). Pipelined requests:
    /// parse the next one from `buf[head_len + body_len..]`. After an error
    /// or `Partial` the fields are unspecified, except after a path refused by
    /// its checks (dot segment, encoded separator, `;`, ...): then the header
    /// fields, `host` and `path` are those of the refused request.
    pub fn parse(&mut self, buf: &[u8], limits: &Limits) -> Result<Status, HttpError> {
        self.reset();
        let max = limits.max_header_bytes.min(u32::MAX as usize);
        let window = &buf[..buf.len().min(max)];
        let mut raw = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS_CAP];
        let n = limits.max_headers.min(MAX_HEADERS_CAP);
        let mut req = httparse::Request::new(&mut []);
        let head_len = match req.parse_with_uninit_headers(window, &mut raw[..n]) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => {
                return if buf.len() >= max {
                    Err(HttpError::HeadTooLarge)
                } else {
                    Ok(Status::Partial)
                };
            }
            // Another major version (`HTTP/2.0` sent as text): 505, as RFC 9110 15.6.6 says.
            Err(httparse::Error::Version) if other_major_version(window) => {
                return Err(HttpError::VersionNotSupported)
            }
            Err(e) => return Err(map_httparse_err(e)),
        };
        if !crlf_only(&window[..head_len]) {
            return Err(HttpError::BadRequest("bare CR or LF in head"));
        }
        self.head_len = head_len;

        // Request line. httparse has validated the method token, the target
        // characters (no CTL, SP or DEL) and the version (1.0 / 1.1).
        let method = req.method.unwrap_or_default().as_bytes();
        let target = req.path.unwrap_or_default().as_bytes();
        self.minor_version = req.version.unwrap_or(1);
        self.method = Method::from_bytes(method);
        // Methods are case-sensitive (RFC 9110 9.1): `get` is not GET, but backends that
        // upper-case it would serve it as GET, past the GET route's auth. Like nginx, only
        // upper-case letters, `_` and `-` are taken (the known methods already are).
        if self.method == Method::Other
            && !method
                .iter()
                .all(|&b| b.is_ascii_uppercase() || b == b'_' || b == b'-')
        {
            return Err(HttpError::BadRequest(
                "the method is not in upper case (methods are case-sensitive)",
            ));
        }
        self.method_range = offsets(buf, method);
        self.target = offsets(buf, target);

        // Header fields.
        let mut content_length: Option<u64> = None;
        let mut te_seen = false;
        let mut te_ok = false;
        let mut conn = ConnFlags::default();
        let mut upgrade_ws = false;
        for h in req.headers.iter() {
            let name = h.name.as_bytes();
            let value = h.value;
            let mut kind = HeaderKind::of(name);
            if kind == HeaderKind::Other && name.contains(&b'_') {
                kind = HeaderKind::Underscore;
            }
            let view = HeaderView {
                name: offsets(buf, name),
                value: offsets(buf, value),
                kind,
            };
            self.headers.push(view);
            match kind {
                HeaderKind::Host => {
                    if self.host.is_some() {
                        return Err(HttpError::BadRequest("multiple Host headers"));
                    }
                    if !valid_host(value) {
                        return Err(HttpError::BadRequest("invalid Host"));
                    }
                    self.host = Some(view.value);
                }
                // An HTTP/1.0 client's expectation is ignored (RFC 9110 10.1.1): it would read
                // a 1xx as the final answer.
                HeaderKind::Expect
                    if value.eq_ignore_ascii_case(b"100-continue") && self.minor_version == 1 =>
                {
                    self.expect_continue = true;
                }
                HeaderKind::Upgrade
                    if list_items(value).any(|p| p.eq_ignore_ascii_case(b"websocket")) =>
                {
                    upgrade_ws = true;
                }
                HeaderKind::Connection => conn.add(value),
                HeaderKind::ContentLength => {
                    content_length = Some(merge_content_length(content_length, value)?);
                }
                HeaderKind::TransferEncoding => {
                    // Only exactly one `chunked` coding, in a single field,
                    // is accepted.
                    if te_seen {
                        return Err(HttpError::BadRequest("multiple Transfer-Encoding"));
                    }
                    te_seen = true;
                    let mut items = list_items(value);
                    te_ok = matches!(items.next(), Some(c) if c.eq_ignore_ascii_case(b"chunked"))
                        && items.next().is_none();
                    if !te_ok {
                        return Err(HttpError::BadRequest("unsupported Transfer-Encoding"));
                    }
                }
                _ => {}
            }
        }

        // After the header fields, so a refused target still leaves them readable (the
        // client's x-request-id goes on the 400).
        self.parse_target(buf, target)?;

        if te_seen {
            if self.minor_version == 0 {
                return Err(HttpError::BadRequest("Transfer-Encoding in HTTP/1.0"));
            }
            if content_length.is_some() {
                return Err(HttpError::BadRequest(
                    "both Content-Length and Transfer-Encoding",
                ));
            }
            debug_assert!(te_ok);
            self.body = BodyKind::Chunked;
        } else if let Some(n) = content_length {
            self.body = BodyKind::Length(n);
        }
        if self.minor_version == 1 && self.host.is_none() {
            return Err(HttpError::BadRequest("missing Host"));
        }
        if let Some(a) = self.authority {
            let https = range(buf, self.target)
                .get(..5)
                .is_some_and(|s| s.eq_ignore_ascii_case(b"https"));
            match self.host {
                Some(h) if same_authority(range(buf, h), range(buf, a), https) => {}
                Some(_) => {
                    return Err(HttpError::BadRequest(
                        "Host does not match the request-target's authority",
                    ))
                }
                // HTTP/1.0 without Host: the authority is the host.
                None => {
                    self.host = Some(a);
                    self.host_from_target = true;
                }
            }
        }
        self.keep_alive = if self.minor_version == 1 {
            !conn.close
        } else {
            conn.keep_alive && !conn.close
        };
        self.upgrade_websocket = upgrade_ws && conn.upgrade;
        self.conn_other = conn.other;
        Ok(Status::Complete(head_len))
    }

    /// Validates the request-target and fills `path` / `query`. Absolute-form
    /// (`http://host/path`, RFC 9112 3.2.2) is taken when its authority is the
    /// request's `Host` (checked with the headers): routing and the upstream then
    /// see one host, never two that disagree.
    fn parse_target(&mut self, buf: &[u8], target: &[u8]) -> Result<(), HttpError> {
        let target = match absolute_form(target)? {
            Some((authority, rest)) if rest.first() == Some(&b'/') => {
                self.authority = Some(offsets(buf, authority));
                rest
            }
            Some((authority, rest)) => {
                // An empty path is `/` (RFC 9112 3.2.2, RFC 3986 6.2.3), as nginx reads it:
                // `http://h` is `/` and `http://h?q` is `/?q`. The path is then the `/` just
                // before the authority (`://h`); what follows the authority is the query.
                let a = offsets(buf, authority);
                self.authority = Some(a);
                if self.method == Method::Connect {
                    return Err(HttpError::BadRequest("CONNECT not supported"));
                }
                if rest.contains(&b'#') {
                    return Err(HttpError::BadRequest("fragment in request-target"));
                }
                self.path = (a.0 - 1, a.0);
                self.query = rest.strip_prefix(b"?").map(|q| offsets(buf, q));
                return Ok(());
            }
            None => target,
        };
        match target.first() {
            Some(b'/') => {}
            Some(b'*') if target.len() == 1 && self.method == Method::Options => {
                self.path = self.target;
                return Ok(());
            }
            _ if self.method == Method::Connect => {
                return Err(HttpError::BadRequest("CONNECT not supported"));
            }
            _ => return Err(HttpError::BadRequest("request-target not in origin-form")),
        }
        if self.method == Method::Connect {
            return Err(HttpError::BadRequest("CONNECT not supported"));
        }
        // httparse already rejects CTLs, SP and DEL in the target.
        if target.contains(&b'#') {
            return Err(HttpError::BadRequest("fragment in request-target"));
        }
        let (path, query) = match target.iter().position(|&b| b == b'?') {
            Some(q) => (&target[..q], Some(&target[q + 1..])),
            None => (target, None),
        };
        // A path refused below stays in `path`, so the refusal can carry the CORS headers of
        // the API it addressed (the header fields are already read).
        self.path = offsets(buf, path);
        if has_dot_segment(path) {
            return Err(HttpError::BadRequest("dot-segment in path"));
        }
        self.path_dirty = needs_normalizing(path);
        self.signed_path = None;
        if self.path_dirty {
            if !percent_encoding_ok(path) {
                // `%4%31` would turn into `%41` once decoded: a second decoding in a backend
                // would then see another path than the router.
                return Err(HttpError::BadRequest("malformed percent-encoding in path"));
            }
            if has_encoded_separator(path) {
                // A backend that decodes `%2F` would see other segments than the router did.
                return Err(HttpError::BadRequest(
                    "encoded slash, backslash or NUL in path",
                ));
            }
            if path.contains(&b'\\') {
                // Not a URI character (RFC 3986 2); WHATWG URL parsers and IIS read it as `/`,
                // so `/x\..\admin` would reach another path than the router saw.
                return Err(HttpError::BadRequest("backslash in path"));
            }
            if path.contains(&b';') {
                // Path parameters: Tomcat, Jetty and Spring drop `;...` from a segment, so
                // `/admin;x/users` would reach their `/admin/users` past the route that
                // guards it.
                return Err(HttpError::BadRequest("`;` in path"));
            }
            if path.iter().any(|&b| refused_raw(b)) {
                return Err(HttpError::BadRequest(
                    "non-ASCII byte or one of `\"<>`{}` in path: percent-encode it",
                ));
            }
        }
        self.query = query.map(|q| offsets(buf, q));
        Ok(())
    }

    /// First value of header `name` (case-insensitive; pass it lowercase).
    pub fn header<'b>(&self, buf: &'b [u8], name: &str) -> Option<&'b [u8]> {
        find_header(&self.headers, buf, name)
    }

    /// How many header fields are named `name` (case-insensitive; pass it lowercase).
    pub fn header_count(&self, buf: &[u8], name: &str) -> usize {
        let name = name.as_bytes();
        self.headers
            .iter()
            .filter(|h| range(buf, h.name).eq_ignore_ascii_case(name))
            .count()
    }

    /// `&buf[r.0..r.1]`; `buf` must be the buffer that was parsed.
    pub fn slice<'b>(&self, buf: &'b [u8], r: (u32, u32)) -> &'b [u8] {
        range(buf, r)
    }

    /// The method token as received.
    pub fn method_bytes<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        range(buf, self.method_range)
    }

    /// Headers to forward to the next hop: skips hop-by-hop headers
    /// (connection, keep-alive, proxy-connection, te, trailer,
    /// transfer-encoding, upgrade, proxy-authenticate, proxy-authorization),
    /// any header named by a Connection token, content-length and expect.
    /// Host is kept. The caller writes its own framing (and, for WebSocket,
    /// Upgrade/Connection) headers.
    pub fn forwardable<'b>(&'b self, buf: &'b [u8]) -> impl Iterator<Item = (&'b [u8], &'b [u8])> {
        self.forwardable_kinds(buf).map(|(_, n, v)| (n, v))
    }

    /// [`forwardable`](Self::forwardable) with each header's [`HeaderKind`].
    pub fn forwardable_kinds<'b>(
        &'b self,
        buf: &'b [u8],
    ) -> impl Iterator<Item = (HeaderKind, &'b [u8], &'b [u8])> {
        forwardable_iter(&self.headers, buf, self.conn_other, true)
    }

    /// First value of the header of `kind` (not `Other`): a byte compare per header.
    pub fn header_kind<'b>(&self, buf: &'b [u8], kind: HeaderKind) -> Option<&'b [u8]> {
        find_kind(&self.headers, buf, kind)
    }
}

/// The authority of an absolute-form target and its origin-form rest.
type AuthorityAndPath<'a> = (&'a [u8], &'a [u8]);

/// Splits an absolute-form target (`http://` or `https://`, any case) into its
/// authority and the rest after it (`/path?query`, or `?query` or nothing when the path is
/// empty); `None` when the target is not absolute. Userinfo or an empty or invalid authority
/// is an error.
fn absolute_form(target: &[u8]) -> Result<Option<AuthorityAndPath<'_>>, HttpError> {
    let Some(rest) = [&b"http://"[..], b"https://"]
        .iter()
        .find(|s| target.len() > s.len() && target[..s.len()].eq_ignore_ascii_case(s))
        .map(|s| &target[s.len()..])
    else {
        return Ok(None);
    };
    let end = rest
        .iter()
        .position(|&b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    if authority.is_empty() || authority.contains(&b'@') || !valid_host(authority) {
        return Err(HttpError::BadRequest("invalid authority in request-target"));
    }
    Ok(Some((authority, path)))
}

/// Whether a Host value and an absolute-form authority name the same authority: equal but for
/// case and the scheme's default port (`x.test` and `x.test:80` for http, RFC 9110 4.2.3).
fn same_authority(host: &[u8], authority: &[u8], https: bool) -> bool {
    let default: &[u8] = if https { b":443" } else { b":80" };
    let strip = |v: &'_ [u8]| -> usize {
        if v.len() > default.len() && v.ends_with(default) {
            v.len() - default.len()
        } else {
            v.len()
        }
    };
    host[..strip(host)].eq_ignore_ascii_case(&authority[..strip(authority)])
}

/// Host value: `uri-host [ ":" port ]` characters only (no SP, `/`, `@`, `?`, `#`, ...), a
/// host that is not empty (an `http` URI has one, RFC 9110 4.2.1) and a port of digits only.
fn valid_host(v: &[u8]) -> bool {
    let port_at = match v.first() {
        None => return false,
        // An IP literal: the port follows its `]`, which must be there.
        Some(b'[') => match v.iter().position(|&b| b == b']') {
            Some(i) => Some(i + 1),
            None => return false,
        },
        // Brackets only around an IP literal.
        Some(_) if v.iter().any(|&b| b == b'[' || b == b']') => return false,
        Some(_) => v.iter().position(|&b| b == b':'),
    };
    if let Some(i) = port_at {
        let (host, port) = v.split_at(i);
        if host.is_empty() || host == b"[]" {
            return false;
        }
        // An IP literal holds an IPv6 address (hex digits, `:`, `.` for an embedded IPv4)
        // or an `IPvFuture` (`v...`, RFC 3986 3.2.2): `[shop.example.com]` is neither.
        if let Some(inner) = host.strip_prefix(b"[").and_then(|h| h.strip_suffix(b"]")) {
            let ipv6 = inner
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
                && inner.contains(&b':');
            if !ipv6 && !matches!(inner.first(), Some(b'v' | b'V')) {
                return false;
            }
        }
        match port.split_first() {
            None => {}
            Some((b':', digits)) if digits.iter().all(u8::is_ascii_digit) => {}
            Some(_) => return false,
        }
    }
    // One pass: `uri-host [ ":" port ]` characters only, and a name (not an IP literal) has
    // no empty label (`.`, `.a`, `a..b`; one trailing dot is the root's) and no `*`, which
    // only a wildcard pattern holds, never a host.
    let name_len = if v[0] == b'[' {
        0
    } else {
        port_at.unwrap_or(v.len())
    };
    let mut prev = b'.';
    for (i, &b) in v.iter().enumerate() {
        if !HOST_CHAR[b as usize] {
            return false;
        }
        if i < name_len && (b == b'*' || (b == b'.' && prev == b'.')) {
            return false;
        }
        prev = b;
    }
    true
}

/// Characters of `uri-host [ ":" port ]` (RFC 3986 3.2.2: unreserved, sub-delims, `%`, and
/// `:` `[` `]` for the port and IP literals).
const HOST_CHAR: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b':'
                    | b'['
                    | b']'
                    | b'%'
            );
        b += 1;
    }
    t
};

/// Whether the request line ends in `HTTP/D` with a major version `D` other than 1.
fn other_major_version(buf: &[u8]) -> bool {
    let line = buf.split(|&b| b == b'\n').next().unwrap_or(buf);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(at) = line.windows(6).rposition(|w| w == b" HTTP/") else {
        return false;
    };
    // `DIGIT "." DIGIT` (RFC 9112 2.3), or a bare major (`HTTP/2`); `HTTP/01.1` and
    // `HTTP/2.00` are syntax errors (400).
    let major = |d: &u8| d.is_ascii_digit() && *d != b'1';
    match &line[at + 6..] {
        [d] => major(d),
        [d, b'.', m] => major(d) && m.is_ascii_digit(),
        _ => false,
    }
}

/// Whether `path` holds an empty segment (`//`), any percent-encoding, or a byte refused raw
/// (`\\`, `;`, and those of [`refused_raw`]): the rare paths that get a closer look.
fn needs_normalizing(path: &[u8]) -> bool {
    // One table load per byte: 1 for `/` (only a second one in a row counts), 2 for the rest.
    const CLASS: [u8; 256] = {
        let mut t = [0u8; 256];
        let mut b = 0;
        while b < 256 {
            let c = b as u8;
            t[b] = if c == b'/' {
                1
            } else if c == b'%' || c == b'\\' || c == b';' || refused_raw(c) {
                2
            } else {
                0
            };
            b += 1;
        }
        t
    };
    let mut prev = 0u8;
    for &b in path {
        match CLASS[b as usize] {
            0 => {}
            1 if prev != b'/' => {}
            _ => return true,
        }
        prev = b;
    }
    false
}

/// Bytes a path may not hold raw: non-ASCII and `"`, `<`, `>`, `` ` ``, `{`, `}` (RFC 3986
/// allows none of them; browsers percent-encode every one). Taken raw, a path would have two
/// spellings (`/café` and `/caf%C3%A9`) that routing tells apart and a backend does not.
#[inline]
const fn refused_raw(b: u8) -> bool {
    b >= 0x80 || matches!(b, b'"' | b'<' | b'>' | b'`' | b'{' | b'}')
}

/// Characters a path holds raw in its normal form, decoded when they come percent-encoded: the
/// unreserved ones (RFC 3986 6.2.2.2) and those allowed raw in a segment that mean nothing to a
/// backend's path parsing (`:` `@` `!` `$` `&` `'` `(` `)` `*` `+` `,` `=`, and `|` `^`, which
/// browsers send raw). A backend decodes `%3A` and `:` alike, so routing must too. `%3B`,
/// `%3F`, `%23`, `%25`, `%20` and the others stay encoded (decoded, they would change the path's
/// structure), with upper-case hex digits (RFC 3986 6.2.2.1).
#[inline]
pub(crate) fn decoded_in_normal_form(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"-._~:@!$&'()*+,=|^".contains(&c)
}

/// Every `%` in `path` is followed by two hex digits (RFC 3986 2.1).
fn percent_encoding_ok(path: &[u8]) -> bool {
    let mut i = 0;
    while i < path.len() {
        if path[i] == b'%' {
            match (path.get(i + 1), path.get(i + 2)) {
                (Some(a), Some(b)) if a.is_ascii_hexdigit() && b.is_ascii_hexdigit() => i += 3,
                _ => return false,
            }
        } else {
            i += 1;
        }
    }
    true
}

/// `%2F`, `%5C` (any case) or `%00` in `path`: a separator a backend would decode, or a NUL
/// that ends a C string early (`/secret%00.png`), as nginx refuses it.
fn has_encoded_separator(path: &[u8]) -> bool {
    path.windows(3).any(|w| {
        w[0] == b'%'
            && ((w[1] == b'2' && w[2] | 0x20 == b'f')
                || (w[1] == b'5' && w[2] | 0x20 == b'c')
                || (w[1] == b'0' && w[2] == b'0'))
    })
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

impl RequestHead {
    /// Rewrites the path in `buf` (the buffer that was parsed) in place to its normal form, as
    /// a backend would read it: empty segments merged (`//a` is `/a`, as nginx's
    /// `merge_slashes`), percent-encoded characters of [`decoded_in_normal_form`] decoded (`%61`
    /// is `a`, `%3A` is `:`) and the other encodings in upper case (`%c3%a9` is `%C3%A9`).
    /// Routing, auth, WAF rules and the upstream then all see one path. Only shortens the path;
    /// every other range stays valid.
    pub fn normalize_path(&mut self, buf: &mut [u8]) {
        if !self.path_dirty {
            return;
        }
        self.path_dirty = false;
        let (start, end) = (self.path.0 as usize, self.path.1 as usize);
        let p = &mut buf[start..end];
        if p.contains(&b'%') {
            let mut sp = Vec::with_capacity(p.len());
            for &b in p.iter() {
                if !(b == b'/' && sp.last() == Some(&b'/')) {
                    sp.push(b);
                }
            }
            self.signed_path = Some(sp.into_boxed_slice());
        }
        let (mut r, mut w) = (0, 0);
        while r < p.len() {
            let b = p[r];
            if b == b'/' && w > 0 && p[w - 1] == b'/' {
                r += 1;
                continue;
            }
            if b == b'%' && r + 2 < p.len() {
                if let (Some(h), Some(l)) = (hex_val(p[r + 1]), hex_val(p[r + 2])) {
                    let c = h << 4 | l;
                    if decoded_in_normal_form(c) {
                        p[w] = c;
                        w += 1;
                        r += 3;
                        continue;
                    }
                    p[w] = b'%';
                    p[w + 1] = p[r + 1].to_ascii_uppercase();
                    p[w + 2] = p[r + 2].to_ascii_uppercase();
                    w += 3;
                    r += 3;
                    continue;
                }
            }
            p[w] = b;
            w += 1;
            r += 1;
        }
        self.path.1 = (start + w) as u32;
    }
}

/// `path` (starting with `/`, no query) in the normal form requests are routed and cached by
/// (see [`RequestHead::normalize_path`]), or why a request with it would be refused: for paths
/// given elsewhere than in a request line (the admin API's cache `path_prefix`).
pub fn normal_form(path: &str) -> Result<String, &'static str> {
    if !path.starts_with('/') || path.contains(['?', '#', ' ']) {
        return Err("not a path (it must start with `/` and hold no `?`, `#` or space)");
    }
    let mut buf = format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").into_bytes();
    let mut h = RequestHead::new(4);
    match h.parse(&buf, &Limits::default()) {
        Ok(Status::Complete(_)) => {}
        Err(HttpError::BadRequest(m)) => return Err(m),
        _ => return Err("not a path"),
    }
    h.normalize_path(&mut buf);
    String::from_utf8(h.slice(&buf, h.path).to_vec()).map_err(|_| "not a path")
}

/// True if any `/`-separated segment of `path` is `.` or `..`, literally or
/// with dots written as `%2e` / `%2E`.
fn has_dot_segment(path: &[u8]) -> bool {
    if !path.iter().any(|&b| b == b'.' || b == b'%') {
        return false;
    }
    path.split(|&b| b == b'/').any(is_dot_segment)
}

fn is_dot_segment(seg: &[u8]) -> bool {
    if seg.is_empty() || seg.len() > 6 {
        return false;
    }
    let mut dots = 0;
    let mut s = seg;
    loop {
        s = match s {
            [] => return dots <= 2,
            [b'.', rest @ ..] => rest,
            [b'%', b'2', e, rest @ ..] if e | 0x20 == b'e' => rest,
            _ => return false,
        };
        dots += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIM: Limits = Limits {
        max_header_bytes: 8192,
        max_headers: 64,
    };

    fn parse(buf: &[u8]) -> Result<(RequestHead, Status), HttpError> {
        let mut h = RequestHead::new(64);
        let s = h.parse(buf, &LIM)?;
        Ok((h, s))
    }

    #[test]
    fn methods_are_upper_case_only() {
        for m in ["get", "Get", "delete", "trace", "PATCh", "GET2"] {
            let req = format!("{m} / HTTP/1.1\r\nHost: a\r\n\r\n");
            assert!(
                matches!(parse(req.as_bytes()), Err(HttpError::BadRequest(_))),
                "{m}"
            );
        }
        for m in ["GET", "PROPFIND", "M-SEARCH", "VERSION_CONTROL"] {
            ok(format!("{m} / HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes());
        }
    }

    fn ok(buf: &[u8]) -> RequestHead {
        match parse(buf) {
            Ok((h, Status::Complete(n))) => {
                assert_eq!(n, buf.len());
                h
            }
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(buf)),
        }
    }

    fn bad(buf: &[u8]) -> &'static str {
        match parse(buf) {
            Err(HttpError::BadRequest(r)) => r,
            other => panic!(
                "expected BadRequest for {:?}, got {other:?}",
                String::from_utf8_lossy(buf)
            ),
        }
    }

    /// Request with `extra` header lines after a Host header.
    fn req(line: &str, extra: &str) -> Vec<u8> {
        format!("{line}\r\nHost: example.com\r\n{extra}\r\n").into_bytes()
    }

    const TYPICAL: &[u8] = b"GET /api/v1/users?id=42&x=y HTTP/1.1\r\n\
        Host: example.com\r\n\
        User-Agent: curl/8.0\r\n\
        Accept: */*\r\n\
        Accept-Encoding: gzip\r\n\
        Connection: keep-alive\r\n\
        Cookie: a=b\r\n\
        X-Request-Id: abc\r\n\
        Authorization: Bearer t\r\n\r\n";

    #[test]
    fn typical_get() {
        let h = ok(TYPICAL);
        let b = TYPICAL;
        assert_eq!(h.method, Method::Get);
        assert_eq!(h.method_bytes(b), b"GET");
        assert_eq!(h.slice(b, h.target), b"/api/v1/users?id=42&x=y");
        assert_eq!(h.slice(b, h.path), b"/api/v1/users");
        assert_eq!(h.slice(b, h.query.unwrap()), b"id=42&x=y");
        assert_eq!(h.minor_version, 1);
        assert_eq!(h.head_len, b.len());
        assert_eq!(h.headers.len(), 8);
        assert_eq!(h.slice(b, h.host.unwrap()), b"example.com");
        assert_eq!(h.header(b, "user-agent"), Some(&b"curl/8.0"[..]));
        assert_eq!(h.header(b, "USER-AGENT"), Some(&b"curl/8.0"[..]));
        assert_eq!(h.header(b, "missing"), None);
        assert_eq!(h.body, BodyKind::None);
        assert!(h.keep_alive);
        assert!(!h.expect_continue);
        assert!(!h.upgrade_websocket);
        let names: Vec<&[u8]> = h.forwardable(b).map(|(n, _)| n).collect();
        assert_eq!(
            names,
            vec![
                &b"Host"[..],
                b"User-Agent",
                b"Accept",
                b"Accept-Encoding",
                b"Cookie",
                b"X-Request-Id",
                b"Authorization"
            ]
        );
    }

    #[test]
    fn header_values_trimmed_and_empty() {
        let b = req("GET / HTTP/1.1", "X-A:   v  \r\nX-B:\r\n");
        let h = ok(&b);
        assert_eq!(h.header(&b, "x-a"), Some(&b"v"[..]));
        assert_eq!(h.header(&b, "x-b"), Some(&b""[..]));
    }

    #[test]
    fn no_realloc_after_warmup() {
        let mut h = RequestHead::new(16);
        let cap = h.headers.capacity();
        let ptr = h.headers.as_ptr();
        for _ in 0..3 {
            assert_eq!(
                h.parse(TYPICAL, &LIM).unwrap(),
                Status::Complete(TYPICAL.len())
            );
        }
        assert_eq!(h.headers.capacity(), cap);
        assert_eq!(h.headers.as_ptr(), ptr);
    }

    #[test]
    fn pipelined() {
        let mut buf = Vec::new();
        buf.extend_from_slice(TYPICAL);
        buf.extend_from_slice(b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello");
        buf.extend_from_slice(b"GET /last HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
        let mut h = RequestHead::new(64);
        let mut pos = 0;
        let mut seen = Vec::new();
        while pos < buf.len() {
            let rest = &buf[pos..];
            let Status::Complete(n) = h.parse(rest, &LIM).unwrap() else {
                panic!("partial")
            };
            assert_eq!(n, h.head_len);
            seen.push((h.slice(rest, h.path).to_vec(), h.keep_alive));
            let body = match h.body {
                BodyKind::Length(l) => l as usize,
                _ => 0,
            };
            pos += n + body;
        }
        assert_eq!(
            seen,
            vec![
                (b"/api/v1/users".to_vec(), true),
                (b"/p".to_vec(), true),
                (b"/last".to_vec(), false)
            ]
        );
    }

    #[test]
    fn partial_on_every_truncation() {
        let mut body = req(
            "POST /x?y HTTP/1.1",
            "Content-Length: 3\r\nConnection: foo\r\nFoo: bar\r\n",
        );
        for src in [TYPICAL, &body[..]] {
            for i in 0..src.len() {
                let mut h = RequestHead::new(64);
                assert_eq!(h.parse(&src[..i], &LIM), Ok(Status::Partial), "prefix {i}");
            }
        }
        body.extend_from_slice(b"abc");
        let (h, s) = parse(&body).unwrap();
        assert_eq!(s, Status::Complete(body.len() - 3));
        assert_eq!(h.body, BodyKind::Length(3));
    }

    #[test]
    fn head_too_large() {
        let lim = Limits {
            max_header_bytes: 64,
            max_headers: 64,
        };
        let mut h = RequestHead::new(8);
        let long = req(
            "GET / HTTP/1.1",
            &format!("X-Long: {}\r\n", "a".repeat(100)),
        );
        assert_eq!(h.parse(&long[..63], &lim), Ok(Status::Partial));
        assert_eq!(h.parse(&long[..64], &lim), Err(HttpError::HeadTooLarge));
        assert_eq!(h.parse(&long, &lim), Err(HttpError::HeadTooLarge));
        // A head of exactly the limit is fine.
        let exact = req("GET / HTTP/1.1", "X-Pad: ");
        let pad = 64 - exact.len();
        let exact = req(
            "GET / HTTP/1.1",
            &format!("X-Pad: {}\r\n", "p".repeat(pad - 2)),
        );
        assert_eq!(exact.len(), 64);
        assert_eq!(h.parse(&exact, &lim), Ok(Status::Complete(64)));
    }

    #[test]
    fn too_many_headers() {
        let lim = Limits {
            max_header_bytes: 8192,
            max_headers: 3,
        };
        let mut h = RequestHead::new(3);
        let three = req("GET / HTTP/1.1", "A: 1\r\nB: 2\r\n");
        assert!(h.parse(&three, &lim).is_ok());
        let four = req("GET / HTTP/1.1", "A: 1\r\nB: 2\r\nC: 3\r\n");
        assert_eq!(h.parse(&four, &lim), Err(HttpError::TooManyHeaders));
        // The hard cap applies even if the limit is larger.
        let lim = Limits {
            max_header_bytes: 1 << 20,
            max_headers: 10_000,
        };
        let many: String = (0..MAX_HEADERS_CAP)
            .map(|i| format!("X{i}: v\r\n"))
            .collect();
        let b = req("GET / HTTP/1.1", &many);
        assert_eq!(h.parse(&b, &lim), Err(HttpError::TooManyHeaders));
    }

    #[test]
    fn framing() {
        let b = req(
            "POST / HTTP/1.1",
            "Content-Length: 5, 5\r\nContent-Length: 5\r\n",
        );
        assert_eq!(ok(&b).body, BodyKind::Length(5));
        let b = req("POST / HTTP/1.1", "Content-Length: 0\r\n");
        assert_eq!(ok(&b).body, BodyKind::Length(0));
        let b = req("POST / HTTP/1.1", "Transfer-Encoding: Chunked\r\n");
        assert_eq!(ok(&b).body, BodyKind::Chunked);
        let b = req("POST / HTTP/1.1", "Transfer-Encoding:  chunked \r\n");
        assert_eq!(ok(&b).body, BodyKind::Chunked);
    }

    #[test]
    fn reject_cl_and_te() {
        for extra in [
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        ] {
            bad(&req("POST / HTTP/1.1", extra));
        }
    }

    #[test]
    fn reject_bad_content_length() {
        for extra in [
            "Content-Length: 5\r\nContent-Length: 6\r\n",
            "Content-Length: 5, 6\r\n",
            "Content-Length: 5,\r\n",
            "Content-Length: -1\r\n",
            "Content-Length: +5\r\n",
            "Content-Length: 5a\r\n",
            "Content-Length: 0x5\r\n",
            "Content-Length: 5 5\r\n",
            "Content-Length:\r\n",
            "Content-Length: 99999999999999999999\r\n",
        ] {
            bad(&req("POST / HTTP/1.1", extra));
        }
    }

    #[test]
    fn reject_bad_transfer_encoding() {
        for extra in [
            "Transfer-Encoding: gzip\r\n",
            "Transfer-Encoding: gzip, chunked\r\n",
            "Transfer-Encoding: chunked, gzip\r\n",
            "Transfer-Encoding: chunked, chunked\r\n",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: identity\r\n",
            "Transfer-Encoding: chunkedx\r\n",
            "Transfer-Encoding: \"chunked\"\r\n",
            "Transfer-Encoding:\r\n",
        ] {
            bad(&req("POST / HTTP/1.1", extra));
        }
        // TE in HTTP/1.0.
        bad(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n");
    }

    #[test]
    fn reject_obs_fold_and_space_before_colon() {
        bad(&req("GET / HTTP/1.1", "X-A: a\r\n b\r\n"));
        bad(&req("GET / HTTP/1.1", "X-A: a\r\n\tb\r\n"));
        bad(b"GET / HTTP/1.1\r\n Host: a\r\n\r\n");
        bad(&req("GET / HTTP/1.1", "X-A : a\r\n"));
        bad(&req("GET / HTTP/1.1", "X-A\t: a\r\n"));
        bad(&req("POST / HTTP/1.1", "Transfer-Encoding : chunked\r\n"));
        bad(&req("GET / HTTP/1.1", "X-A a\r\n"));
        bad(&req("GET / HTTP/1.1", ": a\r\n"));
    }

    #[test]
    fn reject_bare_lf_and_cr() {
        bad(b"GET / HTTP/1.1\nHost: a\r\n\r\n");
        bad(b"GET / HTTP/1.1\r\nHost: a\n\r\n");
        bad(b"GET / HTTP/1.1\r\nHost: a\r\n\n");
        bad(b"GET / HTTP/1.1\nHost: a\n\n");
        bad(b"\nGET / HTTP/1.1\r\nHost: a\r\n\r\n");
        bad(b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n");
        bad(b"GET / HTTP/1.1\rHost: a\r\n\r\n");
        // Leading empty CRLF lines are tolerated (RFC 9112 §2.2).
        let h = ok(b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(h.method, Method::Get);
    }

    #[test]
    fn reject_ctl_in_value_and_target() {
        for ctl in (0u8..0x20).filter(|&c| c != b'\t').chain([0x7f]) {
            let mut b = b"GET / HTTP/1.1\r\nHost: a\r\nX: a".to_vec();
            b.push(ctl);
            b.extend_from_slice(b"b\r\n\r\n");
            assert!(parse(&b).is_err(), "ctl {ctl:#x} in value");
            let mut b = b"GET /a".to_vec();
            b.push(ctl);
            b.extend_from_slice(b"b HTTP/1.1\r\nHost: a\r\n\r\n");
            assert!(parse(&b).is_err(), "ctl {ctl:#x} in target");
        }
        // HTAB inside a value is fine.
        let b = req("GET / HTTP/1.1", "X: a\tb\r\n");
        assert_eq!(ok(&b).header(&b, "x"), Some(&b"a\tb"[..]));
        bad(&req("GET /a#frag HTTP/1.1", ""));
    }

    #[test]
    fn reject_host_problems() {
        bad(b"GET / HTTP/1.1\r\n\r\n");
        bad(b"GET / HTTP/1.1\r\nX: y\r\n\r\n");
        bad(b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n");
        bad(b"GET / HTTP/1.0\r\nHost: a\r\nhost: b\r\n\r\n");
        bad(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n");
        bad(b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n");
        bad(b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n");
        // HTTP/1.0 without Host is fine; IPv6 literal with port is fine.
        let h = ok(b"GET / HTTP/1.0\r\n\r\n");
        assert_eq!(h.host, None);
        assert!(!h.keep_alive);
        let b = b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n";
        assert_eq!(ok(b).slice(b, ok(b).host.unwrap()), b"[::1]:8080");
    }

    #[test]
    fn absolute_form_targets() {
        // Accepted when the authority is the Host (any case): path and query as in origin-form.
        let b = b"GET HTTPS://Example.com:8443/a?b HTTP/1.1\r\nHost: example.com:8443\r\n\r\n";
        let h = ok(b);
        assert_eq!(h.slice(b, h.path), b"/a");
        assert_eq!(h.slice(b, h.query.unwrap()), b"b");
        assert!(!h.host_from_target);
        // The scheme's default port spelled out on one side only: the same authority.
        ok(b"GET http://x.test:80/p HTTP/1.1\r\nHost: x.test\r\n\r\n");
        ok(b"GET https://x.test/p HTTP/1.1\r\nHost: X.test:443\r\n\r\n");
        assert_eq!(
            bad(b"GET http://x.test:443/p HTTP/1.1\r\nHost: x.test\r\n\r\n"),
            "Host does not match the request-target's authority"
        );
        assert_eq!(
            bad(b"GET http://x.test:8080/p HTTP/1.1\r\nHost: x.test:80\r\n\r\n"),
            "Host does not match the request-target's authority"
        );
        // HTTP/1.0 without Host: the authority is the host.
        let b = b"GET http://x.test/ HTTP/1.0\r\n\r\n";
        let h = ok(b);
        assert_eq!(h.slice(b, h.host.unwrap()), b"x.test");
        assert!(h.host_from_target);
        assert_eq!(
            bad(b"GET http://other.test/ HTTP/1.1\r\nHost: x.test\r\n\r\n"),
            "Host does not match the request-target's authority"
        );
        bad(b"GET http://u@x.test/ HTTP/1.1\r\nHost: x.test\r\n\r\n");
        // An empty path is `/` (RFC 9112 3.2.2), with or without a query; the authority is
        // still checked against Host, and a fragment is still refused.
        let b = b"GET http://x.test HTTP/1.1\r\nHost: x.test\r\n\r\n";
        let h = ok(b);
        assert_eq!(h.slice(b, h.path), b"/");
        assert_eq!(h.query, None);
        let b = b"GET HTTPS://x.test:443?q=1&r HTTP/1.1\r\nHost: x.test\r\n\r\n";
        let h = ok(b);
        assert_eq!(h.slice(b, h.path), b"/");
        assert_eq!(h.slice(b, h.query.unwrap()), b"q=1&r");
        let b = b"GET http://x.test? HTTP/1.0\r\n\r\n";
        let h = ok(b);
        assert_eq!(h.slice(b, h.path), b"/");
        assert_eq!(h.slice(b, h.query.unwrap()), b"");
        assert_eq!(h.slice(b, h.host.unwrap()), b"x.test");
        assert_eq!(
            bad(b"GET http://other.test HTTP/1.1\r\nHost: x.test\r\n\r\n"),
            "Host does not match the request-target's authority"
        );
        assert_eq!(
            bad(b"GET http://x.test?a#f HTTP/1.1\r\nHost: x.test\r\n\r\n"),
            "fragment in request-target"
        );
        assert_eq!(
            bad(b"CONNECT http://x.test HTTP/1.1\r\nHost: x.test\r\n\r\n"),
            "CONNECT not supported"
        );
        bad(b"GET http:// HTTP/1.1\r\nHost: x.test\r\n\r\n");
        bad(b"GET http://u@x.test HTTP/1.1\r\nHost: x.test\r\n\r\n");
        bad(b"GET http:///a HTTP/1.1\r\nHost: x.test\r\n\r\n");
        bad(b"GET http://x.test/../a HTTP/1.1\r\nHost: x.test\r\n\r\n");
        bad(b"GET ftp://x.test/ HTTP/1.1\r\nHost: x.test\r\n\r\n");
    }

    /// A request whose target sets no path of its own to normalize (`*`, an absolute-form
    /// empty path) keeps nothing of the previous request's path on the same head.
    #[test]
    fn reused_head_forgets_the_previous_path() {
        let limits = Limits::default();
        for next in [
            &b"OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n"[..],
            b"GET http://t HTTP/1.1\r\nHost: t\r\n\r\n",
        ] {
            let mut h = RequestHead::new(32);
            let mut b = b"GET //a%41 HTTP/1.1\r\nHost: t\r\n\r\n".to_vec();
            assert!(matches!(h.parse(&b, &limits), Ok(Status::Complete(_))));
            h.normalize_path(&mut b);
            assert_eq!(h.signed_path.as_deref(), Some(&b"/a%41"[..]));
            assert!(matches!(h.parse(next, &limits), Ok(Status::Complete(_))));
            assert_eq!(h.signed_path, None);
            assert!(!h.path_dirty);
            // A refused path (bad percent-encoding) is marked dirty; the next one is not.
            assert!(h
                .parse(b"GET //x%2 HTTP/1.1\r\nHost: t\r\n\r\n", &limits)
                .is_err());
            assert!(h.path_dirty);
            assert!(matches!(h.parse(next, &limits), Ok(Status::Complete(_))));
            assert!(!h.path_dirty);
        }
    }

    #[test]
    fn reject_bad_targets() {
        bad(&req("GET example.com:80 HTTP/1.1", ""));
        bad(&req("GET * HTTP/1.1", ""));
        bad(&req("OPTIONS *x HTTP/1.1", ""));
        assert_eq!(
            bad(&req("CONNECT example.com:443 HTTP/1.1", "")),
            "CONNECT not supported"
        );
        assert_eq!(bad(&req("CONNECT / HTTP/1.1", "")), "CONNECT not supported");
        let b = req("OPTIONS * HTTP/1.1", "");
        let h = ok(&b);
        assert_eq!(h.method, Method::Options);
        assert_eq!(h.slice(&b, h.path), b"*");
        assert_eq!(h.query, None);
    }

    #[test]
    fn reject_versions() {
        for v in ["HTTP/2.0", "HTTP/0.9"] {
            let e = RequestHead::new(32)
                .parse(&req(&format!("GET / {v}"), ""), &Limits::default())
                .unwrap_err();
            assert_eq!(e, HttpError::VersionNotSupported, "{v}");
        }
        bad(&req("GET / HTTP/1.2", ""));
        bad(&req("GET / http/1.1", ""));
        bad(b"GET /\r\n\r\n");
        assert_eq!(ok(&req("GET / HTTP/1.0", "")).minor_version, 0);
    }

    #[test]
    fn reject_dot_segments() {
        for t in [
            "/..",
            "/.",
            "/../a",
            "/./a",
            "/a/..",
            "/a/.",
            "/a/../b",
            "/a/./b",
            "/a/..?x=1",
            "/%2e%2e/a",
            "/%2E%2E/a",
            "/%2e./a",
            "/.%2E/a",
            "/a/%2e",
            "/a/%2e/b",
            "/a/%2E%2e",
        ] {
            bad(&req(&format!("GET {t} HTTP/1.1"), ""));
        }
        for t in [
            "/",
            "/a.b",
            "/.well-known/x",
            "/a/...",
            "/a/..b",
            "/a/%2e%2e%2e",
            "/a/%2ex",
            "/a?x=/../y",
            "/a//b",
        ] {
            ok(&req(&format!("GET {t} HTTP/1.1"), ""));
        }
    }

    #[test]
    fn paths_are_normalized_as_a_backend_reads_them() {
        for (t, want) in [
            ("/a/b", "/a/b"),
            ("//admin/users", "/admin/users"),
            ("/a///b//", "/a/b/"),
            ("/%61dmin/%7Eu%2d%2E%5f", "/admin/~u-._"),
            // Characters that would change the path's structure, or may not be raw, stay
            // encoded, with upper-case hex digits.
            ("/a%20b/%3F/%25/%2541", "/a%20b/%3F/%25/%2541"),
            ("/caf%c3%a9/x%3b%23%7b", "/caf%C3%A9/x%3B%23%7B"),
            // Those allowed raw in a segment are decoded, as a backend decodes them.
            (
                "/v1/jobs%3arun/%40me/%2B%26%3D%7C%5E",
                "/v1/jobs:run/@me/+&=|^",
            ),
            ("/v1/jobs:run|x^y", "/v1/jobs:run|x^y"),
        ] {
            let mut buf = req(&format!("GET {t}?q=//%61 HTTP/1.1"), "X-After: 1\r\n");
            let mut h = ok(&buf);
            h.normalize_path(&mut buf);
            assert_eq!(h.slice(&buf, h.path), want.as_bytes(), "{t}");
            // The query and the headers are untouched.
            assert_eq!(h.slice(&buf, h.query.unwrap()), b"q=//%61");
            assert_eq!(h.header(&buf, "x-after"), Some(&b"1"[..]));
        }
        // Malformed: decoding could assemble a new escape (`%4%31` -> `%41`).
        for t in ["/x%4", "/x%zz", "/a/%", "/%4%31dmin", "/%%61"] {
            assert_eq!(
                bad(&req(&format!("GET {t} HTTP/1.1"), "")),
                "malformed percent-encoding in path",
                "{t}"
            );
        }
        // A separator written encoded would split differently in a backend that decodes it.
        // So would a NUL cut it short.
        // Path parameters, which Java servers drop from a segment.
        for t in ["/admin;x/users", "/a/b;jsessionid=1", "/;"] {
            assert_eq!(
                bad(&req(&format!("GET {t} HTTP/1.1"), "")),
                "`;` in path",
                "{t}"
            );
        }
        for t in ["/a/%2f", "/a%2Fb", "/a%5cb", "/a%5C", "/secret%00.png"] {
            assert_eq!(
                bad(&req(&format!("GET {t} HTTP/1.1"), "")),
                "encoded slash, backslash or NUL in path",
                "{t}"
            );
        }
        // A raw backslash is no URI character, and some backends read it as `/`.
        for t in ["/a\\..\\admin", "/x\\y", "/\\"] {
            assert_eq!(
                bad(&req(&format!("GET {t} HTTP/1.1"), "")),
                "backslash in path",
                "{t}"
            );
        }
        // Non-ASCII bytes and the characters browsers always encode are refused raw: with
        // them, one path would have two spellings.
        for t in ["/caf\u{e9}/secret", "/a\"b", "/a<b>", "/a{b}", "/a`b"] {
            assert_eq!(
                bad(&req(&format!("GET {t} HTTP/1.1"), "")),
                "non-ASCII byte or one of `\"<>`{}` in path: percent-encode it",
                "{t}"
            );
        }
        // In the query they pass as they came.
        ok(&req("GET /a?q=caf\u{e9}{x} HTTP/1.1", ""));
        // %01 and the like are not refused (only NUL is, as in nginx).
        ok(&req("GET /a%01b HTTP/1.1", ""));
    }

    #[test]
    fn another_major_version_is_505() {
        let mut h = RequestHead::new(32);
        for v in ["HTTP/2.0", "HTTP/3", "HTTP/2"] {
            let raw = format!("GET / {v}\r\nHost: t\r\n\r\n");
            assert_eq!(
                h.parse(raw.as_bytes(), &Limits::default()),
                Err(HttpError::VersionNotSupported),
                "{v}"
            );
        }
        for v in [
            "HTTP/1.2",
            "HTTX/1.1",
            "HTTP/01.1",
            "HTTP/00.9",
            "HTTP/2.00",
            "HTTP/2.",
        ] {
            let raw = format!("GET / {v}\r\nHost: t\r\n\r\n");
            let e = h.parse(raw.as_bytes(), &Limits::default()).unwrap_err();
            assert_eq!(e.status(), 400, "{v}");
        }
    }

    #[test]
    fn an_http10_expectation_is_ignored() {
        assert!(ok(&req("POST / HTTP/1.1", "Expect: 100-continue\r\n")).expect_continue);
        assert!(!ok(&req("POST / HTTP/1.0", "Expect: 100-continue\r\n")).expect_continue);
    }

    #[test]
    fn host_values_must_name_a_host_and_digits_for_a_port() {
        for h in [
            "",
            ":80",
            "x.test:abc",
            "x.test:8a",
            "[::1]x",
            "[]:80",
            "[shop.example.com]",
            "[shop.example.com]:80",
            "[1.2.3.4]",
            "[::1",
            "a[b]",
            "x.test]",
            "[::1]:80]",
            ".",
            "..",
            ".example.org",
            "a..example.org",
            "*.example.org",
            "a.*.org:80",
        ] {
            let raw = format!("GET / HTTP/1.1\r\nHost: {h}\r\n\r\n");
            assert!(
                RequestHead::new(32)
                    .parse(raw.as_bytes(), &Limits::default())
                    .is_err(),
                "Host {h:?} accepted"
            );
        }
        for h in [
            "x.test",
            "x.test:",
            "x.test:8080",
            "[::1]",
            "[::1]:80",
            "[::ffff:1.2.3.4]",
            "[v1.fe80::a+en1]",
            "127.0.0.1:1",
            "example.org.",
            "example.org.:443",
        ] {
            let raw = format!("GET / HTTP/1.1\r\nHost: {h}\r\n\r\n");
            assert!(
                RequestHead::new(32)
                    .parse(raw.as_bytes(), &Limits::default())
                    .is_ok(),
                "Host {h:?} refused"
            );
        }
    }

    #[test]
    fn keep_alive_rules() {
        assert!(ok(&req("GET / HTTP/1.1", "")).keep_alive);
        assert!(!ok(&req("GET / HTTP/1.1", "Connection: close\r\n")).keep_alive);
        assert!(!ok(&req("GET / HTTP/1.1", "Connection: foo, Close\r\n")).keep_alive);
        assert!(!ok(&req("GET / HTTP/1.0", "")).keep_alive);
        assert!(ok(&req("GET / HTTP/1.0", "Connection: Keep-Alive\r\n")).keep_alive);
        assert!(!ok(&req("GET / HTTP/1.0", "Connection: keep-alive, close\r\n")).keep_alive);
    }

    #[test]
    fn expect_and_upgrade() {
        let h = ok(&req(
            "POST / HTTP/1.1",
            "Expect: 100-Continue\r\nContent-Length: 1\r\n",
        ));
        assert!(h.expect_continue);
        assert!(!ok(&req("POST / HTTP/1.1", "Expect: foo\r\n")).expect_continue);
        let b = req(
            "GET /ws HTTP/1.1",
            "Upgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: k\r\n",
        );
        let h = ok(&b);
        assert!(h.upgrade_websocket);
        let names: Vec<&[u8]> = h.forwardable(&b).map(|(n, _)| n).collect();
        assert_eq!(names, vec![&b"Host"[..], b"Sec-WebSocket-Key"]);
        assert!(!ok(&req("GET / HTTP/1.1", "Upgrade: websocket\r\n")).upgrade_websocket);
        assert!(!ok(&req("GET / HTTP/1.1", "Connection: upgrade\r\n")).upgrade_websocket);
        assert!(
            !ok(&req(
                "GET / HTTP/1.1",
                "Upgrade: h2c\r\nConnection: upgrade\r\n"
            ))
            .upgrade_websocket
        );
    }

    #[test]
    fn forwardable_drops_hop_by_hop_and_connection_named() {
        let b = req(
            "POST / HTTP/1.1",
            "Connection: X-Secret, close\r\n\
             x-secret: 1\r\n\
             Keep-Alive: timeout=5\r\n\
             Proxy-Connection: keep-alive\r\n\
             TE: trailers\r\n\
             Trailer: X-T\r\n\
             Transfer-Encoding: chunked\r\n\
             Upgrade: foo\r\n\
             Proxy-Authorization: basic x\r\n\
             Proxy-Authenticate: basic\r\n\
             Expect: 100-continue\r\n\
             Connection: other\r\n\
             Other: 2\r\n\
             X-Kept: 3\r\n",
        );
        let h = ok(&b);
        let fwd: Vec<(&[u8], &[u8])> = h.forwardable(&b).collect();
        assert_eq!(
            fwd,
            vec![(&b"Host"[..], &b"example.com"[..]), (b"X-Kept", b"3")]
        );
        let b = req("POST / HTTP/1.1", "Content-Length: 1\r\nX-A: 1\r\n");
        let h = ok(&b);
        let fwd: Vec<(&[u8], &[u8])> = h.forwardable(&b).collect();
        assert_eq!(
            fwd,
            vec![(&b"Host"[..], &b"example.com"[..]), (b"X-A", b"1")]
        );
    }

    #[test]
    fn other_methods() {
        let b = req("PURGE /x HTTP/1.1", "");
        let h = ok(&b);
        assert_eq!(h.method, Method::Other);
        assert_eq!(h.method_bytes(&b), b"PURGE");
        bad(&req("G(T / HTTP/1.1", ""));
        bad(&req("GET  / HTTP/1.1", ""));
    }

    #[test]
    fn buffer_larger_than_u32_window_is_fine() {
        // Offsets are computed within the limited window; trailing bytes are
        // ignored.
        let mut b = TYPICAL.to_vec();
        b.extend_from_slice(&[b'x'; 100_000]);
        let (h, s) = parse(&b).unwrap();
        assert_eq!(s, Status::Complete(TYPICAL.len()));
        assert_eq!(h.slice(&b, h.path), b"/api/v1/users");
    }
}
