//! A small HTTP/1.1 client for WebSocket API integrations: `POST` a message, read the whole
//! answer (bounded), over per-worker keep-alive connections.

use crate::http::client::{self, ResponseReader};
use crate::http::Method;
use crate::upstream::Upstream;
use ahash::AHashMap;
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

/// Closes this worker's idle integration connections (the worker stops: its runtime is
/// about to go, and the sockets close while it still runs).
pub fn close_idle() {
    POOL.with(|p| p.borrow_mut().clear());
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

/// Why an integration call got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallError {
    /// The upstream's `timeout_ms` passed before a whole answer (as the HTTP proxy's 504).
    Timeout,
    /// No target could be reached, or the answer was not valid HTTP (as the proxy's 502).
    Failed,
    /// The answer was larger than the call allows (its head, or a body over `max_body`).
    TooLarge,
    /// Every target the health checks pass was at the upstream's `max_connections` (as the
    /// proxy's 503).
    Busy,
}

/// Sends `POST path` with `headers` (complete `name: value\r\n` lines) and `body`; the answer's
/// body may be at most `max_body` bytes. [`CallError::Timeout`] when the upstream's timeout
/// passed first, [`CallError::TooLarge`] for a larger answer, else [`CallError::Failed`].
pub async fn post(
    up: &Upstream,
    path: &str,
    headers: &[u8],
    body: &[u8],
    max_body: usize,
) -> Result<Answer, CallError> {
    let n = up.cfg.targets.len();
    if n == 0 {
        return Err(CallError::Failed);
    }
    let start = NEXT.with(|c| {
        let v = c.get();
        c.set(v.wrapping_add(1));
        v
    });
    let deadline = Instant::now() + up.cfg.timeout;
    let attempts = (up.cfg.retries as usize + 1).min(n.max(1));
    for a in 0..attempts {
        // The next target below its `max_connections` that takes traffic (passive checks
        // admit it); else, when every target the active checker passes is out, the next of
        // those (they are all tried, as by the proxy); else, when one is in but full, none
        // (503 on `$connect`, as the proxy's); else the next target whatever its health.
        let from = |k: usize| (start + a + k) % n;
        let full_in = || {
            (0..n).any(|i| up.health[i].is_healthy() && !up.has_room(i) && !up.health[i].is_out())
        };
        let pick = (0..n)
            .map(from)
            .find(|&i| up.has_room(i) && up.admits(i))
            .or_else(|| {
                if full_in() {
                    return None;
                }
                (0..n)
                    .map(from)
                    .find(|&i| up.has_room(i) && up.health[i].is_healthy())
            });
        let ti = match pick {
            Some(i) => i,
            None if up.cfg.max_connections.is_some() && full_in() => {
                up.overflowed();
                return Err(CallError::Busy);
            }
            None => from(0),
        };
        // One of the target's `max_connections`, until the call's connection is pooled or
        // closed (another worker may have taken the last one since).
        let Some(_slot) = up.occupy(ti) else {
            up.overflowed();
            return Err(CallError::Busy);
        };
        let addr = up.cfg.targets[ti];
        // Host: the target's address, as for authorizer calls (the config's upstream name
        // means nothing to a virtual-host router).
        let host = addr.to_string();
        let req = client::build_request(
            b"POST",
            path.as_bytes(),
            &[(b"host", host.as_bytes())],
            headers,
            Some(body),
        );
        // A pooled connection with bytes waiting (an answer nobody asked for), or closed by
        // the upstream, is dropped, as the proxy's pool does: the bytes would be read as this
        // call's answer.
        let pooled = POOL.with(|p| {
            let mut p = p.borrow_mut();
            let v = p.get_mut(&addr)?;
            while let Some(s) = v.pop() {
                if let crate::upstream::Peek::Nothing = crate::upstream::peek(&s) {
                    return Some(s);
                }
            }
            None
        });
        let reused = pooled.is_some();
        if !reused && Instant::now() >= deadline {
            return Err(CallError::Timeout);
        }
        let mut s = match pooled {
            Some(s) => s,
            None => {
                // Bounded by what is left of the call's `timeout_ms` too, as the proxy's.
                let left = deadline.saturating_duration_since(Instant::now());
                match monoio::time::timeout(
                    up.cfg.connect_timeout.min(left),
                    TcpStream::connect_addr(addr),
                )
                .await
                {
                    Ok(Ok(s)) => {
                        let _ = s.set_nodelay(true);
                        s
                    }
                    _ => {
                        up.failed(ti);
                        continue;
                    }
                }
            }
        };
        let mut rd = ResponseReader::new(Method::Post, max_body);
        match client::exchange(&mut s, req.clone(), &mut rd, deadline).await {
            Ok(()) => {
                up.succeeded(ti);
                if rd.reusable() {
                    POOL.with(|p| {
                        let mut p = p.borrow_mut();
                        let v = p.entry(addr).or_default();
                        if v.len() < KEEP {
                            v.push(s);
                        }
                    });
                }
                return Ok(Answer {
                    status: rd.status().unwrap_or(0),
                    subprotocol: rd
                        .header("sec-websocket-protocol")
                        .map(|v| v.trim_ascii().to_vec()),
                    body: rd.take_body(),
                });
            }
            // A reused connection that broke before any answer byte: the upstream may
            // have read the message first, so it is not sent again (a POST, as the
            // proxy's; the pooled connection was checked just before, so this is a race
            // with the upstream closing it, or the upstream dropping the call). Not the
            // target's fault for passive checks either.
            Err(e) if e.unanswered() && reused => return Err(failure(deadline)),
            Err(client::ClientError::Timeout) => {
                up.failed(ti);
                return Err(CallError::Timeout);
            }
            Err(client::ClientError::TooLarge) => return Err(CallError::TooLarge),
            Err(_) => {
                up.failed(ti);
                return Err(failure(deadline));
            }
        }
    }
    Err(failure(deadline))
}

/// A failed call past the deadline counts as timed out (as the proxy's retries do).
fn failure(deadline: Instant) -> CallError {
    if Instant::now() >= deadline {
        CallError::Timeout
    } else {
        CallError::Failed
    }
}
