//! Parsing of upstream response heads into a reusable [`ResponseHead`],
//! deciding how the response body is delimited and whether the upstream
//! connection can be reused.

use std::mem::MaybeUninit;

use super::{
    crlf_only, find_header, find_kind, forwardable_iter, list_items, map_httparse_err,
    merge_content_length, offsets, range, ConnFlags, HeaderKind, HeaderView, HttpError, Limits,
    Method, Status, MAX_HEADERS_CAP,
};

/// How the response body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RespBody {
    /// No body: response to HEAD, 1xx, 204, 304.
    None,
    /// `Content-Length: n`.
    Length(u64),
    /// Final transfer-coding is `chunked`.
    Chunked,
    /// Delimited by the upstream closing the connection.
    UntilClose,
}

/// A parsed response head. Reuse one per upstream connection.
#[derive(Clone, Debug)]
pub struct ResponseHead {
    /// Status code (100..=999).
    pub status: u16,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Head length including the terminating empty line.
    pub head_len: usize,
    /// All header fields, in order.
    pub headers: Vec<HeaderView>,
    /// Body delimitation.
    pub body: RespBody,
    /// Whether the upstream connection may be reused after this response.
    pub keep_alive: bool,
    /// Connection carried tokens other than close/keep-alive/upgrade.
    conn_other: bool,
}

impl ResponseHead {
    /// Creates an empty head whose header vector can hold `max_headers`
    /// entries (capped at [`MAX_HEADERS_CAP`]) without reallocating.
    pub fn new(max_headers: usize) -> Self {
        ResponseHead {
            status: 0,
            minor_version: 1,
            head_len: 0,
            headers: Vec::with_capacity(max_headers.min(MAX_HEADERS_CAP)),
            body: RespBody::None,
            keep_alive: false,
            conn_other: false,
        }
    }

    /// Parses the response head at the start of `buf`; `request_method` is
    /// the method of the request it answers (HEAD responses have no body).
    ///
    /// Same `Partial` / `HeadTooLarge` rules as [`super::RequestHead::parse`].
    /// Errors here mean a broken upstream (answer 502), although they reuse
    /// [`HttpError`]. Content-Length together with Transfer-Encoding is
    /// accepted as chunked but disables keep-alive.
    pub fn parse(
        &mut self,
        buf: &[u8],
        request_method: Method,
        limits: &Limits,
    ) -> Result<Status, HttpError> {
        self.status = 0;
        self.minor_version = 1;
        self.head_len = 0;
        self.headers.clear();
        self.body = RespBody::None;
        self.keep_alive = false;
        self.conn_other = false;

        let max = limits.max_header_bytes.min(u32::MAX as usize);
        let window = &buf[..buf.len().min(max)];
        let mut raw = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS_CAP];
        let n = limits.max_headers.min(MAX_HEADERS_CAP);
        let mut resp = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut resp,
            window,
            &mut raw[..n],
        );
        let head_len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => {
                return if buf.len() >= max {
                    Err(HttpError::HeadTooLarge)
                } else {
                    Ok(Status::Partial)
                };
            }
            Err(e) => return Err(map_httparse_err(e)),
        };
        if !crlf_only(&window[..head_len]) {
            return Err(HttpError::BadRequest("bare CR or LF in head"));
        }
        let status = resp.code.unwrap_or(0);
        if status < 100 {
            return Err(HttpError::BadRequest("invalid status code"));
        }
        self.status = status;
        self.minor_version = resp.version.unwrap_or(1);
        self.head_len = head_len;

        let mut content_length: Option<u64> = None;
        let mut te_seen = false;
        let mut codings = 0u32;
        let mut chunked_count = 0u32;
        let mut last_chunked = false;
        let mut conn = ConnFlags::default();
        for h in resp.headers.iter() {
            let name = h.name.as_bytes();
            let value = h.value;
            let kind = HeaderKind::of(name);
            self.headers.push(HeaderView {
                name: offsets(buf, name),
                value: offsets(buf, value),
                kind,
            });
            match kind {
                HeaderKind::Connection => conn.add(value),
                HeaderKind::ContentLength => {
                    content_length = Some(merge_content_length(content_length, value)?);
                }
                HeaderKind::TransferEncoding => {
                    for coding in list_items(value) {
                        te_seen = true;
                        codings += 1;
                        last_chunked = coding.eq_ignore_ascii_case(b"chunked");
                        chunked_count += u32::from(last_chunked);
                    }
                }
                _ => {}
            }
        }
        if chunked_count > 1 || (chunked_count == 1 && !last_chunked) {
            return Err(HttpError::BadRequest("invalid Transfer-Encoding"));
        }

        self.keep_alive = if self.minor_version == 1 {
            !conn.close
        } else {
            conn.keep_alive && !conn.close
        };
        self.conn_other = conn.other;
        let bodyless = request_method == Method::Head
            || (100..200).contains(&status)
            || status == 204
            || status == 304;
        self.body = if bodyless {
            if status == 204 && (te_seen || content_length.is_some_and(|n| n > 0)) {
                // RFC 9110 8.6: a 204 announces no body. One that does may send it anyway,
                // and stray bytes must not be left on a pooled connection.
                self.keep_alive = false;
            }
            RespBody::None
        } else if te_seen {
            if codings != chunked_count {
                // A transfer coding the gateway would have to undo (gzip, ...): passing the
                // bytes on without it would mislabel them; nginx refuses these too.
                return Err(HttpError::BadRequest("unsupported transfer coding"));
            }
            if content_length.is_some() {
                // Possible smuggling attempt: honour TE but do not reuse.
                self.keep_alive = false;
            }
            if last_chunked {
                RespBody::Chunked
            } else {
                self.keep_alive = false;
                RespBody::UntilClose
            }
        } else if let Some(n) = content_length {
            RespBody::Length(n)
        } else {
            self.keep_alive = false;
            RespBody::UntilClose
        };
        Ok(Status::Complete(head_len))
    }

    /// First value of header `name` (case-insensitive; pass it lowercase).
    pub fn header<'b>(&self, buf: &'b [u8], name: &str) -> Option<&'b [u8]> {
        find_header(&self.headers, buf, name)
    }

    /// `&buf[r.0..r.1]`; `buf` must be the buffer that was parsed.
    pub fn slice<'b>(&self, buf: &'b [u8], r: (u32, u32)) -> &'b [u8] {
        range(buf, r)
    }

    /// Headers to forward to the client: skips hop-by-hop headers, any
    /// header named by a Connection token, and content-length. The caller
    /// writes its own framing headers.
    pub fn forwardable<'b>(&'b self, buf: &'b [u8]) -> impl Iterator<Item = (&'b [u8], &'b [u8])> {
        self.forwardable_kinds(buf).map(|(_, n, v)| (n, v))
    }

    /// [`forwardable`](Self::forwardable) with each header's [`HeaderKind`].
    pub fn forwardable_kinds<'b>(
        &'b self,
        buf: &'b [u8],
    ) -> impl Iterator<Item = (HeaderKind, &'b [u8], &'b [u8])> {
        forwardable_iter(&self.headers, buf, self.conn_other, false)
    }

    /// First value of the header of `kind` (not `Other`): a byte compare per header.
    pub fn header_kind<'b>(&self, buf: &'b [u8], kind: HeaderKind) -> Option<&'b [u8]> {
        find_kind(&self.headers, buf, kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIM: Limits = Limits {
        max_header_bytes: 8192,
        max_headers: 64,
    };

    fn parse_m(buf: &[u8], m: Method) -> Result<ResponseHead, HttpError> {
        let mut h = ResponseHead::new(64);
        match h.parse(buf, m, &LIM)? {
            Status::Complete(n) => {
                assert_eq!(n, h.head_len);
                Ok(h)
            }
            Status::Partial => panic!("partial"),
        }
    }

    fn parse(buf: &[u8]) -> Result<ResponseHead, HttpError> {
        parse_m(buf, Method::Get)
    }

    fn resp(line: &str, extra: &str) -> Vec<u8> {
        format!("{line}\r\nServer: up\r\n{extra}\r\n").into_bytes()
    }

    const TYPICAL: &[u8] = b"HTTP/1.1 200 OK\r\n\
        Date: Wed, 25 Nov 2026 13:20:03 GMT\r\n\
        Content-Type: application/json\r\n\
        Content-Length: 13\r\n\
        Cache-Control: no-cache\r\n\
        Connection: keep-alive\r\n\r\n{\"ok\":true}\r\n";

    #[test]
    fn typical() {
        let h = parse(TYPICAL).unwrap();
        assert_eq!(h.status, 200);
        assert_eq!(h.minor_version, 1);
        assert_eq!(h.body, RespBody::Length(13));
        assert!(h.keep_alive);
        assert_eq!(h.head_len, TYPICAL.len() - 13);
        assert_eq!(
            h.header(TYPICAL, "content-type"),
            Some(&b"application/json"[..])
        );
        let names: Vec<&[u8]> = h.forwardable(TYPICAL).map(|(n, _)| n).collect();
        assert_eq!(names, vec![&b"Date"[..], b"Content-Type", b"Cache-Control"]);
    }

    #[test]
    fn partial_on_every_truncation() {
        let head = &TYPICAL[..TYPICAL.len() - 13];
        for i in 0..head.len() {
            let mut h = ResponseHead::new(8);
            assert_eq!(
                h.parse(&head[..i], Method::Get, &LIM),
                Ok(Status::Partial),
                "{i}"
            );
        }
    }

    #[test]
    fn head_too_large_and_too_many() {
        let lim = Limits {
            max_header_bytes: 32,
            max_headers: 2,
        };
        let mut h = ResponseHead::new(2);
        assert_eq!(
            h.parse(&TYPICAL[..32], Method::Get, &lim),
            Err(HttpError::HeadTooLarge)
        );
        let lim = Limits {
            max_header_bytes: 8192,
            max_headers: 2,
        };
        assert_eq!(
            h.parse(TYPICAL, Method::Get, &lim),
            Err(HttpError::TooManyHeaders)
        );
    }

    #[test]
    fn bodyless() {
        for (line, m) in [
            ("HTTP/1.1 200 OK", Method::Head),
            ("HTTP/1.1 100 Continue", Method::Get),
            ("HTTP/1.1 101 Switching Protocols", Method::Get),
            ("HTTP/1.1 204 No Content", Method::Get),
            ("HTTP/1.1 304 Not Modified", Method::Get),
        ] {
            let b = resp(line, "Content-Length: 10\r\n");
            let h = parse_m(&b, m).unwrap();
            assert_eq!(h.body, RespBody::None, "{line}");
            // A 204 that announces a body is not trusted to be followed by nothing.
            assert_eq!(h.keep_alive, !line.contains("204"), "{line}");
        }
        for extra in ["Content-Length: 0\r\n", ""] {
            let b = resp("HTTP/1.1 204 No Content", extra);
            assert!(parse_m(&b, Method::Get).unwrap().keep_alive, "{extra}");
        }
        let b = resp("HTTP/1.1 204 No Content", "Transfer-Encoding: chunked\r\n");
        assert!(!parse_m(&b, Method::Get).unwrap().keep_alive);
    }

    #[test]
    fn framing() {
        let h = parse(&resp("HTTP/1.1 200 OK", "Transfer-Encoding: chunked\r\n")).unwrap();
        assert_eq!(h.body, RespBody::Chunked);
        assert!(h.keep_alive);
        // Any other transfer coding would reach the client unlabelled: refused (502).
        for te in [
            "Transfer-Encoding: gzip, chunked\r\n",
            "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: gzip\r\n",
        ] {
            assert!(
                matches!(
                    parse(&resp("HTTP/1.1 200 OK", te)),
                    Err(HttpError::BadRequest("unsupported transfer coding"))
                ),
                "{te}"
            );
        }
        // Bodiless answers carry no body to decode, whatever their TE says.
        let h = parse_m(
            &resp("HTTP/1.1 200 OK", "Transfer-Encoding: gzip, chunked\r\n"),
            Method::Head,
        )
        .unwrap();
        assert_eq!(h.body, RespBody::None);
        // CL + TE: chunked, but no reuse.
        for extra in [
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        ] {
            let h = parse(&resp("HTTP/1.1 200 OK", extra)).unwrap();
            assert_eq!(h.body, RespBody::Chunked);
            assert!(!h.keep_alive);
        }
        // Nothing: until close.
        let h = parse(&resp("HTTP/1.1 200 OK", "")).unwrap();
        assert_eq!(h.body, RespBody::UntilClose);
        assert!(!h.keep_alive);
        let h = parse(&resp("HTTP/1.1 200 OK", "Content-Length: 7, 7\r\n")).unwrap();
        assert_eq!(h.body, RespBody::Length(7));
    }

    #[test]
    fn rejects() {
        for b in [
            resp(
                "HTTP/1.1 200 OK",
                "Content-Length: 5\r\nContent-Length: 6\r\n",
            ),
            resp("HTTP/1.1 200 OK", "Content-Length: 5, 6\r\n"),
            resp("HTTP/1.1 200 OK", "Content-Length: x\r\n"),
            resp(
                "HTTP/1.1 200 OK",
                "Content-Length: 99999999999999999999\r\n",
            ),
            resp("HTTP/1.1 200 OK", "Transfer-Encoding: chunked, chunked\r\n"),
            resp("HTTP/1.1 200 OK", "Transfer-Encoding: chunked, gzip\r\n"),
            resp("HTTP/1.1 200 OK", "X-A: a\r\n b\r\n"),
            resp("HTTP/1.1 200 OK", "X-A : a\r\n"),
            resp("HTTP/1.1 200 OK", "X-A: a\0b\r\n"),
            resp("HTTP/1.1 099 Low", ""),
            resp("HTTP/2.0 200 OK", ""),
            b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n".to_vec(),
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\n\n".to_vec(),
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\n".to_vec(),
        ] {
            assert!(
                matches!(parse(&b), Err(HttpError::BadRequest(_))),
                "{:?}",
                String::from_utf8_lossy(&b)
            );
        }
    }

    #[test]
    fn keep_alive_rules() {
        let ka = |line: &str, extra: &str| {
            parse(&resp(line, &format!("Content-Length: 0\r\n{extra}")))
                .unwrap()
                .keep_alive
        };
        assert!(ka("HTTP/1.1 200 OK", ""));
        assert!(!ka("HTTP/1.1 200 OK", "Connection: close\r\n"));
        assert!(!ka("HTTP/1.0 200 OK", ""));
        assert!(ka("HTTP/1.0 200 OK", "Connection: keep-alive\r\n"));
        // Missing reason phrase is tolerated.
        assert!(ka("HTTP/1.1 200", ""));
    }

    #[test]
    fn forwardable_drops_connection_named() {
        let b = resp(
            "HTTP/1.1 200 OK",
            "Connection: x-hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\
             Transfer-Encoding: chunked\r\nTrailer: X-T\r\nSet-Cookie: a=b\r\n",
        );
        let h = parse(&b).unwrap();
        let fwd: Vec<(&[u8], &[u8])> = h.forwardable(&b).collect();
        assert_eq!(
            fwd,
            vec![(&b"Server"[..], &b"up"[..]), (b"Set-Cookie", b"a=b")]
        );
    }
}
