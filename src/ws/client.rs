//! A small HTTP/1.1 client for WebSocket API integrations: `POST` a message, read the whole
//! answer (bounded), over per-worker keep-alive connections.

use crate::http::{ChunkedDecoder, Limits, Method, RespBody, ResponseHead, Status};
use crate::upstream::Upstream;
use ahash::AHashMap;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::time::Instant;

/// Idle integration connections kept per target on each worker.
const KEEP: usize = 64;

thread_local! {
    static POOL: RefCell<AHashMap<SocketAddr, Vec<TcpStream>>> = RefCell::new(AHashMap::new());
    static NEXT: Cell<usize> = const { Cell::new(0) };
}

/// An integration answer.
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The whole body.
    pub body: Vec<u8>,
    /// The `Sec-WebSocket-Protocol` the integration chose (on `$connect`).
    pub subprotocol: Option<Vec<u8>>,
}

/// Sends `POST path` with `headers` (complete `name: value\r\n` lines) and `body`; the answer's
/// body may be at most `max_body` bytes. `Err` when no target answered in time.
pub async fn post(
    up: &Upstream,
    path: &str,
    headers: &[u8],
    body: &[u8],
    max_body: usize,
) -> Result<Answer, ()> {
    let n = up.cfg.targets.len();
    if n == 0 {
        return Err(());
    }
    let start = NEXT.with(|c| {
        let v = c.get();
        c.set(v.wrapping_add(1));
        v
    });
    let mut req = Vec::with_capacity(256 + headers.len() + body.len());
    req.extend_from_slice(b"POST ");
    req.extend_from_slice(path.as_bytes());
    req.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    req.extend_from_slice(up.cfg.name.as_bytes());
    req.extend_from_slice(b"\r\ncontent-length: ");
    crate::http::encode::push_u64(&mut req, body.len() as u64);
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(headers);
    req.extend_from_slice(b"\r\n");
    req.extend_from_slice(body);
    let deadline = Instant::now() + up.cfg.timeout;
    let attempts = (up.cfg.retries as usize + 1).min(n.max(1));
    for a in 0..attempts {
        let mut ti = (start + a) % n;
        for k in 0..n {
            let i = (start + a + k) % n;
            if up.health[i].is_healthy() {
                ti = i;
                break;
            }
        }
        let addr = up.cfg.targets[ti];
        // A pooled connection may have been closed by the upstream: one fresh retry.
        let pooled = POOL.with(|p| p.borrow_mut().get_mut(&addr).and_then(|v| v.pop()));
        let mut tries: [Option<TcpStream>; 2] = [pooled, None];
        for slot in tries.iter_mut() {
            let reused = slot.is_some();
            if !reused && Instant::now() >= deadline {
                return Err(());
            }
            let s = match slot.take() {
                Some(s) => s,
                None => match monoio::time::timeout(
                    up.cfg.connect_timeout,
                    TcpStream::connect_addr(addr),
                )
                .await
                {
                    Ok(Ok(s)) => {
                        let _ = s.set_nodelay(true);
                        s
                    }
                    _ => break,
                },
            };
            let left = deadline.saturating_duration_since(Instant::now());
            match monoio::time::timeout(left, exchange(s, &req, max_body)).await {
                Ok(Ok((ans, s))) => {
                    if let Some(s) = s {
                        POOL.with(|p| {
                            let mut p = p.borrow_mut();
                            let v = p.entry(addr).or_default();
                            if v.len() < KEEP {
                                v.push(s);
                            }
                        });
                    }
                    return Ok(ans);
                }
                Ok(Err(sent_nothing)) if sent_nothing && reused => continue,
                _ => return Err(()),
            }
        }
    }
    Err(())
}

/// One request/response on `s`. `Err(true)` when the connection failed before any response
/// byte (safe to retry on a fresh one). The stream comes back when it can be reused.
async fn exchange(
    mut s: TcpStream,
    req: &[u8],
    max_body: usize,
) -> Result<(Answer, Option<TcpStream>), bool> {
    let (r, _) = s.write_all(req.to_vec()).await;
    if r.is_err() {
        return Err(true);
    }
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut head = ResponseHead::new(100);
    let lim = Limits {
        max_header_bytes: 16384,
        max_headers: 100,
    };
    let mut eof = false;
    let head_len = loop {
        if !buf.is_empty() {
            match head.parse(&buf, Method::Post, &lim) {
                Ok(Status::Complete(n)) => {
                    if (100..200).contains(&head.status) {
                        buf.drain(..n);
                        continue;
                    }
                    break n;
                }
                Ok(Status::Partial) => {}
                Err(_) => return Err(false),
            }
        }
        let (r, b) = read_more(&mut s, buf).await;
        buf = b;
        match r {
            Ok(0) | Err(_) => return Err(buf.is_empty()),
            Ok(_) => {}
        }
    };
    let mut body = Vec::new();
    let mut pos = head_len;
    match head.body {
        RespBody::None => {}
        RespBody::Length(n) => {
            if n as usize > max_body {
                return Err(false);
            }
            while buf.len() - pos < n as usize {
                let (r, b) = read_more(&mut s, buf).await;
                buf = b;
                if !matches!(r, Ok(k) if k > 0) {
                    return Err(false);
                }
            }
            body.extend_from_slice(&buf[pos..pos + n as usize]);
            pos += n as usize;
        }
        RespBody::Chunked => {
            let mut d = ChunkedDecoder::new(max_body as u64);
            loop {
                let (used, done) = d
                    .feed(&buf[pos..], |c| body.extend_from_slice(c))
                    .map_err(|_| false)?;
                pos += used;
                if done {
                    break;
                }
                buf.drain(..pos);
                pos = 0;
                let (r, b) = read_more(&mut s, buf).await;
                buf = b;
                if !matches!(r, Ok(k) if k > 0) {
                    return Err(false);
                }
            }
        }
        RespBody::UntilClose => loop {
            body.extend_from_slice(&buf[pos..]);
            if body.len() > max_body {
                return Err(false);
            }
            buf.clear();
            pos = 0;
            let (r, b) = read_more(&mut s, buf).await;
            buf = b;
            if !matches!(r, Ok(k) if k > 0) {
                eof = true;
                break;
            }
        },
    }
    let reusable = head.keep_alive && !eof && pos == buf.len();
    Ok((
        Answer {
            status: head.status,
            subprotocol: head
                .header(&buf, "sec-websocket-protocol")
                .map(|v| v.trim_ascii().to_vec()),
            body,
        },
        reusable.then_some(s),
    ))
}

async fn read_more(s: &mut TcpStream, mut buf: Vec<u8>) -> (std::io::Result<usize>, Vec<u8>) {
    use monoio::buf::IoBufMut;
    if buf.capacity() - buf.len() < 4096 {
        buf.reserve(16384);
    }
    let len = buf.len();
    let cap = buf.capacity();
    let (r, b) = s.read(buf.slice_mut(len..cap)).await;
    (r, b.into_inner())
}
