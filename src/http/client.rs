//! The one small HTTP/1.1 client used by the gateway's side calls (request authorizers,
//! the JWKS fetcher, WebSocket API integrations, the upstream health probe): it sends one
//! request and reads one response with the project's own codec ([`ResponseHead`] and
//! [`ChunkedDecoder`]), bounded in size and time.
//!
//! The parsing and accumulation live in [`ResponseReader`], a push parser fed with whatever
//! bytes arrive ([`ResponseReader::push`]) and told when the peer closes
//! ([`ResponseReader::eof`]); it answers "need more" or "done". Two thin drivers move bytes
//! between a socket and the reader: [`exchange`] (async, monoio) and [`exchange_blocking`]
//! (std). Interim `1xx` heads are skipped; bodies may be delimited by Content-Length,
//! chunked transfer-coding or the connection closing.

use super::{ChunkError, ChunkedDecoder, HttpError, Limits, Method, RespBody, ResponseHead};
use std::fmt;
use std::io;
use std::time::Instant;

/// Head limits for answers read by this client.
pub const LIMITS: Limits = Limits {
    max_header_bytes: 16 * 1024,
    max_headers: 100,
};

/// Why a request got no usable answer.
#[derive(Debug)]
pub enum ClientError {
    /// Sending or receiving failed. `answered`: some response bytes had arrived.
    Io {
        /// The socket error.
        error: io::Error,
        /// Whether any byte of the answer had been received.
        answered: bool,
    },
    /// The peer closed before the answer was complete.
    Closed {
        /// Whether any byte of the answer had been received.
        answered: bool,
    },
    /// The deadline passed.
    Timeout,
    /// The answer is not valid HTTP/1.x (the reason is short and safe to log).
    Malformed(&'static str),
    /// The answer's body (or head) is larger than allowed.
    TooLarge,
    /// The status was refused by the reader's filter ([`ResponseReader::accept`]).
    Status(u16),
}

impl ClientError {
    /// True when the connection failed before any byte of the answer: on a reused keep-alive
    /// connection, the request may be sent again on a fresh one.
    pub fn unanswered(&self) -> bool {
        matches!(
            self,
            ClientError::Io {
                answered: false,
                ..
            } | ClientError::Closed { answered: false }
        )
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Io { error, .. } => write!(f, "{error}"),
            ClientError::Closed { .. } => f.write_str("connection closed before the whole answer"),
            ClientError::Timeout => f.write_str("timed out"),
            ClientError::Malformed(r) => write!(f, "bad HTTP response ({r})"),
            ClientError::TooLarge => f.write_str("response too large"),
            ClientError::Status(s) => write!(f, "status {s}"),
        }
    }
}

impl std::error::Error for ClientError {}

/// Builds a request: request line, `headers` as `(name, value)` pairs, `raw_headers`
/// (complete `name: value\r\n` lines, may be empty), `content-length` when `body` is given,
/// the empty line and the body. Names and values must be valid (no CR/LF).
pub fn build_request(
    method: &[u8],
    target: &[u8],
    headers: &[(&[u8], &[u8])],
    raw_headers: &[u8],
    body: Option<&[u8]>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        128 + target.len() + raw_headers.len() + body.map_or(0, |b| b.len()) + headers.len() * 32,
    );
    super::encode::push_request_line(&mut out, method, target);
    for (n, v) in headers {
        super::encode::push_header(&mut out, n, v);
    }
    if let Some(b) = body {
        out.extend_from_slice(b"content-length: ");
        super::encode::push_u64(&mut out, b.len() as u64);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(raw_headers);
    out.extend_from_slice(b"\r\n");
    if let Some(b) = body {
        out.extend_from_slice(b);
    }
    out
}

/// Where the reader is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Accumulating the head.
    Head,
    /// Content-Length body: bytes still expected.
    Length(u64),
    /// Chunked body.
    Chunked,
    /// Body until the peer closes.
    UntilClose,
    /// Answer complete.
    Done,
}

/// What [`ResponseReader::push`] needs next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Feed more bytes (or [`ResponseReader::eof`] when the peer closed).
    NeedMore,
    /// The answer is complete.
    Done,
}

/// Push parser for one HTTP/1.x answer: head, then body by Content-Length, chunked or
/// close. Bounded: the head by [`LIMITS`], the body by `max_body`.
#[derive(Debug)]
pub struct ResponseReader {
    method: Method,
    max_body: usize,
    head_only: bool,
    accept: fn(u16) -> bool,
    head: ResponseHead,
    /// The head bytes (only the final head once it is parsed).
    head_buf: Vec<u8>,
    body: Vec<u8>,
    chunked: ChunkedDecoder,
    phase: Phase,
    received: bool,
    /// Bytes arrived after the end of the answer.
    excess: bool,
    /// The answer ended with the connection.
    closed: bool,
}

impl ResponseReader {
    /// A reader for the answer to a `method` request, with a body of at most `max_body`
    /// bytes.
    pub fn new(method: Method, max_body: usize) -> Self {
        ResponseReader {
            method,
            max_body,
            head_only: false,
            accept: |_| true,
            head: ResponseHead::new(LIMITS.max_headers),
            head_buf: Vec::with_capacity(1024),
            body: Vec::new(),
            chunked: ChunkedDecoder::new(max_body as u64),
            phase: Phase::Head,
            received: false,
            excess: false,
            closed: false,
        }
    }

    /// Stops at the final head ([`Progress::Done`] without reading the body).
    pub fn head_only(mut self) -> Self {
        self.head_only = true;
        self
    }

    /// Fails with [`ClientError::Status`] as soon as a final head whose status `ok` refuses
    /// is parsed (without waiting for its body).
    pub fn accept(mut self, ok: fn(u16) -> bool) -> Self {
        self.accept = ok;
        self
    }

    /// Feeds received bytes.
    pub fn push(&mut self, data: &[u8]) -> Result<Progress, ClientError> {
        if !data.is_empty() {
            self.received = true;
        }
        if self.phase != Phase::Head {
            return self.body_bytes(data);
        }
        self.head_buf.extend_from_slice(data);
        loop {
            let n = match self.head.parse(&self.head_buf, self.method, &LIMITS) {
                Ok(super::Status::Partial) => return Ok(Progress::NeedMore),
                Ok(super::Status::Complete(n)) => n,
                Err(HttpError::HeadTooLarge | HttpError::TooManyHeaders) => {
                    return Err(ClientError::TooLarge)
                }
                Err(_) => return Err(ClientError::Malformed("malformed head")),
            };
            if (100..200).contains(&self.head.status) {
                // Interim answer: skip it and parse the next head.
                self.head_buf.drain(..n);
                continue;
            }
            if !(self.accept)(self.head.status) {
                return Err(ClientError::Status(self.head.status));
            }
            let rest = self.head_buf.split_off(n);
            self.phase = if self.head_only {
                Phase::Done
            } else {
                match self.head.body {
                    RespBody::None | RespBody::Length(0) => Phase::Done,
                    RespBody::Length(l) if l > self.max_body as u64 => {
                        return Err(ClientError::TooLarge)
                    }
                    RespBody::Length(l) => {
                        self.body.reserve(l as usize);
                        Phase::Length(l)
                    }
                    RespBody::Chunked => Phase::Chunked,
                    RespBody::UntilClose => Phase::UntilClose,
                }
            };
            return self.body_bytes(&rest);
        }
    }

    fn body_bytes(&mut self, data: &[u8]) -> Result<Progress, ClientError> {
        match self.phase {
            Phase::Head => unreachable!("body bytes before the head"),
            Phase::Done => {
                self.excess |= !data.is_empty();
                return Ok(Progress::Done);
            }
            Phase::Length(left) => {
                let take = left.min(data.len() as u64) as usize;
                self.body.extend_from_slice(&data[..take]);
                let left = left - take as u64;
                if left == 0 {
                    self.phase = Phase::Done;
                    self.excess |= take < data.len();
                } else {
                    self.phase = Phase::Length(left);
                }
            }
            Phase::Chunked => {
                let body = &mut self.body;
                let (used, done) = self
                    .chunked
                    .feed(data, |c| body.extend_from_slice(c))
                    .map_err(|e| match e {
                        ChunkError::TooLarge => ClientError::TooLarge,
                        ChunkError::Invalid(r) => ClientError::Malformed(r),
                        ChunkError::TrailersTooLarge => {
                            ClientError::Malformed("trailer section too large")
                        }
                    })?;
                if done {
                    self.phase = Phase::Done;
                    self.excess |= used < data.len();
                }
            }
            Phase::UntilClose => {
                if self.body.len() + data.len() > self.max_body {
                    return Err(ClientError::TooLarge);
                }
                self.body.extend_from_slice(data);
            }
        }
        Ok(if self.phase == Phase::Done {
            Progress::Done
        } else {
            Progress::NeedMore
        })
    }

    /// The peer closed the connection: completes a close-delimited body, or fails.
    pub fn eof(&mut self) -> Result<(), ClientError> {
        match self.phase {
            Phase::Done => Ok(()),
            Phase::UntilClose => {
                self.phase = Phase::Done;
                self.closed = true;
                Ok(())
            }
            _ => Err(ClientError::Closed {
                answered: self.received,
            }),
        }
    }

    /// Whether any byte was received.
    pub fn received(&self) -> bool {
        self.received
    }

    /// Whether the whole answer is in.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Status of the final head, once parsed.
    pub fn status(&self) -> Option<u16> {
        (self.phase != Phase::Head).then_some(self.head.status)
    }

    /// First value of header `name` (pass it lowercase), once the head is parsed.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        if self.phase == Phase::Head {
            return None;
        }
        self.head.header(&self.head_buf, name)
    }

    /// All header fields of the final head, in order (empty before it is parsed).
    pub fn headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let parsed = self.phase != Phase::Head;
        self.head.headers.iter().filter(move |_| parsed).map(|h| {
            (
                self.head.slice(&self.head_buf, h.name),
                self.head.slice(&self.head_buf, h.value),
            )
        })
    }

    /// The body received so far (the whole body once done).
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// Takes the body out of the reader.
    pub fn take_body(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.body)
    }

    /// Whether the connection may carry another request: the answer is complete, framed
    /// (not ended by close), nothing followed it, and the peer allows keep-alive.
    pub fn reusable(&self) -> bool {
        self.phase == Phase::Done
            && !self.head_only
            && !self.closed
            && !self.excess
            && self.head.keep_alive
    }
}

/// Sends `req` on `s` and feeds the answer into `rd` until it is complete, within
/// `deadline` (async, monoio).
pub async fn exchange(
    s: &mut monoio::net::TcpStream,
    req: Vec<u8>,
    rd: &mut ResponseReader,
    deadline: Instant,
) -> Result<(), ClientError> {
    let left = deadline.saturating_duration_since(Instant::now());
    match monoio::time::timeout(left, exchange_inner(s, req, rd)).await {
        Ok(r) => r,
        Err(_) => Err(ClientError::Timeout),
    }
}

async fn exchange_inner(
    s: &mut monoio::net::TcpStream,
    req: Vec<u8>,
    rd: &mut ResponseReader,
) -> Result<(), ClientError> {
    use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
    let (r, _) = s.write_all(req).await;
    r.map_err(|error| ClientError::Io {
        error,
        answered: false,
    })?;
    let mut tmp: Vec<u8> = Vec::with_capacity(8192);
    loop {
        tmp.clear();
        let (r, b) = s.read(tmp).await;
        tmp = b;
        match r {
            Ok(0) => return rd.eof(),
            Ok(_) => {
                if rd.push(&tmp)? == Progress::Done {
                    return Ok(());
                }
            }
            Err(error) => {
                return Err(ClientError::Io {
                    error,
                    answered: rd.received(),
                })
            }
        }
    }
}

/// A blocking connection [`exchange_blocking`] can use: plain TCP, or TLS over it.
pub trait BlockingConn: std::io::Read + std::io::Write {
    /// The TCP socket underneath (its timeouts bound every read and write).
    fn tcp(&self) -> &std::net::TcpStream;
}

impl BlockingConn for std::net::TcpStream {
    fn tcp(&self) -> &std::net::TcpStream {
        self
    }
}

impl BlockingConn for rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    fn tcp(&self) -> &std::net::TcpStream {
        &self.sock
    }
}

/// Sends `req` on `s` and feeds the answer into `rd` until it is complete, within
/// `deadline` (blocking, std; sets the socket's read and write timeouts).
pub fn exchange_blocking<S: BlockingConn>(
    s: &mut S,
    req: &[u8],
    rd: &mut ResponseReader,
    deadline: Instant,
) -> Result<(), ClientError> {
    let io_err = |error: io::Error, answered: bool| match error.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout,
        _ => ClientError::Io { error, answered },
    };
    let left = || {
        let l = deadline.saturating_duration_since(Instant::now());
        (!l.is_zero()).then_some(l).ok_or(ClientError::Timeout)
    };
    s.tcp()
        .set_write_timeout(Some(left()?))
        .map_err(|e| io_err(e, false))?;
    s.write_all(req).map_err(|e| io_err(e, false))?;
    s.flush().map_err(|e| io_err(e, false))?;
    let mut tmp = [0u8; 8192];
    loop {
        s.tcp()
            .set_read_timeout(Some(left()?))
            .map_err(|e| io_err(e, rd.received()))?;
        match s.read(&mut tmp) {
            Ok(0) => return rd.eof(),
            Ok(n) => {
                if rd.push(&tmp[..n])? == Progress::Done {
                    return Ok(());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(e, rd.received())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `parts` then (if `eof`) the close; returns the reader.
    fn run(rd: &mut ResponseReader, parts: &[&[u8]], eof: bool) -> Result<Progress, ClientError> {
        let mut p = Progress::NeedMore;
        for part in parts {
            p = rd.push(part)?;
        }
        if eof && p == Progress::NeedMore {
            rd.eof()?;
            p = Progress::Done;
        }
        Ok(p)
    }

    fn reader() -> ResponseReader {
        ResponseReader::new(Method::Post, 1024)
    }

    const CL: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello";
    const CHUNKED: &[u8] =
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2;x=y\r\nlo\r\n0\r\nT: v\r\n\r\n";
    const CLOSE: &[u8] = b"HTTP/1.0 200 OK\r\nX-A: b\r\n\r\nhello";

    #[test]
    fn content_length() {
        let mut rd = reader();
        assert_eq!(rd.push(CL).unwrap(), Progress::Done);
        assert_eq!(rd.status(), Some(200));
        assert_eq!(rd.body(), b"hello");
        assert_eq!(rd.header("x-a"), Some(&b"b"[..]));
        assert_eq!(rd.headers().count(), 2);
        assert!(rd.reusable());
        // Too short at close.
        let mut rd = reader();
        assert_eq!(rd.push(&CL[..CL.len() - 1]).unwrap(), Progress::NeedMore);
        assert!(matches!(
            rd.eof(),
            Err(ClientError::Closed { answered: true })
        ));
        // Bytes after the answer: done, not reusable.
        let mut rd = reader();
        assert_eq!(rd.push(&[CL, b"HTTP"].concat()).unwrap(), Progress::Done);
        assert_eq!(rd.body(), b"hello");
        assert!(!rd.reusable());
    }

    #[test]
    fn chunked() {
        let mut rd = reader();
        assert_eq!(rd.push(CHUNKED).unwrap(), Progress::Done);
        assert_eq!(rd.status(), Some(201));
        assert_eq!(rd.body(), b"hello");
        assert!(rd.reusable());
        let bad = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert!(matches!(reader().push(bad), Err(ClientError::Malformed(_))));
    }

    #[test]
    fn close_delimited() {
        let mut rd = reader();
        assert_eq!(run(&mut rd, &[CLOSE], true).unwrap(), Progress::Done);
        assert_eq!(rd.body(), b"hello");
        assert!(!rd.reusable());
        // Bodyless statuses need no close.
        let mut rd = reader();
        assert_eq!(
            rd.push(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap(),
            Progress::Done
        );
        assert!(rd.reusable());
    }

    #[test]
    fn interim_heads_are_skipped() {
        let mut rd = reader();
        let all = [
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 P\r\n\r\n"[..],
            CL,
        ]
        .concat();
        assert_eq!(rd.push(&all).unwrap(), Progress::Done);
        assert_eq!(rd.status(), Some(200));
        assert_eq!(rd.body(), b"hello");
    }

    #[test]
    fn oversize() {
        let small = || ResponseReader::new(Method::Get, 4);
        assert!(matches!(small().push(CL), Err(ClientError::TooLarge)));
        assert!(matches!(small().push(CHUNKED), Err(ClientError::TooLarge)));
        assert!(matches!(small().push(CLOSE), Err(ClientError::TooLarge)));
        // A head that never ends.
        let mut rd = reader();
        rd.push(b"HTTP/1.1 200 OK\r\n").unwrap();
        let line = b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
        let mut r = Ok(Progress::NeedMore);
        for _ in 0..1000 {
            r = rd.push(line);
            if r.is_err() {
                break;
            }
        }
        assert!(matches!(r, Err(ClientError::TooLarge)), "{r:?}");
    }

    #[test]
    fn garbage() {
        for g in [
            &b"garbage\r\n\r\n"[..],
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n",
            b"\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
        ] {
            let r = reader().push(g);
            assert!(matches!(r, Err(ClientError::Malformed(_))), "{g:?}: {r:?}");
        }
        // Closed before anything: retry-safe.
        let e = reader().eof().unwrap_err();
        assert!(e.unanswered());
        assert!(!ClientError::Timeout.unanswered());
    }

    #[test]
    fn status_filter_and_head_only() {
        let two = |s: u16| (200..300).contains(&s);
        let r = reader()
            .accept(two)
            .push(b"HTTP/1.1 503 Busy\r\nContent-Length: 100\r\n\r\n");
        assert!(matches!(r, Err(ClientError::Status(503))));
        assert_eq!(r.unwrap_err().to_string(), "status 503");
        let mut rd = reader().head_only();
        assert_eq!(
            rd.push(b"HTTP/1.1 302 Found\r\nContent-Length: 100\r\n\r\nab")
                .unwrap(),
            Progress::Done
        );
        assert_eq!(rd.status(), Some(302));
        assert!(rd.body().is_empty());
        assert!(!rd.reusable());
    }

    #[test]
    fn split_at_every_byte() {
        for (msg, eof, status) in [(CL, false, 200), (CHUNKED, false, 201), (CLOSE, true, 200)] {
            for i in 0..=msg.len() {
                for j in i..=msg.len() {
                    let mut rd = reader();
                    let p = run(&mut rd, &[&msg[..i], &msg[i..j], &msg[j..]], eof)
                        .unwrap_or_else(|e| panic!("{i}/{j}: {e}"));
                    assert_eq!(p, Progress::Done, "{i}/{j}");
                    assert_eq!(rd.status(), Some(status));
                    assert_eq!(rd.body(), b"hello", "{i}/{j}");
                }
            }
            // One byte at a time.
            let mut rd = reader();
            let parts: Vec<&[u8]> = msg.chunks(1).collect();
            assert_eq!(run(&mut rd, &parts, eof).unwrap(), Progress::Done);
            assert_eq!(rd.body(), b"hello");
        }
    }

    #[test]
    fn request_building() {
        let r = build_request(
            b"POST",
            b"/a?b",
            &[(b"host", b"h:1")],
            b"x-y: z\r\n",
            Some(b"body"),
        );
        assert_eq!(
            r,
            b"POST /a?b HTTP/1.1\r\nhost: h:1\r\ncontent-length: 4\r\nx-y: z\r\n\r\nbody"
        );
        let r = build_request(b"GET", b"/", &[], b"", None);
        assert_eq!(r, b"GET / HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn blocking_exchange_over_a_socket() {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut b = [0u8; 256];
            let _ = c.read(&mut b).unwrap();
            for part in CHUNKED.chunks(7) {
                c.write_all(part).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            // Second connection: never answers.
            let (_c2, _) = l.accept().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(500));
        });
        let dl = || Instant::now() + std::time::Duration::from_millis(300);
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let mut rd = reader();
        exchange_blocking(&mut s, b"GET / HTTP/1.1\r\n\r\n", &mut rd, dl()).unwrap();
        assert_eq!(rd.body(), b"hello");
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let mut rd = reader();
        let e = exchange_blocking(&mut s, b"GET / HTTP/1.1\r\n\r\n", &mut rd, dl());
        assert!(matches!(e, Err(ClientError::Timeout)), "{e:?}");
        t.join().unwrap();
    }
}
