//! The validate stage of the connection loop (after auth and throttles, before the cache and
//! the integration): buffers the whole request body and checks it against the route's JSON
//! Schema ([`crate::policy::validate`]), answering 400 itself when it fails.
//!
//! A `Content-Length` body is read into `rbuf` after the head, where the integration finds it
//! and sends it on unchanged. A chunked body is decoded as it arrives (raw framing dropped as
//! soon as it is read, so memory is bounded by `max_body_bytes` plus one read) and put back in
//! `rbuf` decoded, the head's framing turned into `Content-Length`: the upstream gets the same
//! payload re-framed with a length (trailers are dropped). Reading the body shares the auth
//! and WAF stages' rules: all of it within `header_timeout` (408 past it), `max_body_bytes` at
//! most (413).

use super::{
    body_skippable, fill_rbuf, read_body, reject, ClientIo, Conn, FillError, Outcome, Worker,
};
use crate::config::Limits;
use crate::http::{BodyKind, ChunkError, ChunkedDecoder};
use crate::policy::validate::BodySchema;
use std::rc::Rc;
use std::time::Instant;

/// Bytes read at most per read of a chunked body (here and by the WAF stage).
pub(super) const CHUNKED_READ: usize = 64 * 1024;

/// Checks the body; on failure the client has been answered and the outcome is returned.
pub(super) async fn run<S: ClientIo>(
    w: &Rc<Worker>,
    c: &mut Conn<S>,
    schema: &BodySchema,
    limits: &Limits,
) -> Result<(), Outcome> {
    let head_len = c.b.head.head_len;
    let len = match c.b.head.body {
        BodyKind::None => 0,
        BodyKind::Length(n) => {
            // Past `max_body_bytes` was refused (413) before routing.
            if !w.hold_body(&mut c.held, n) {
                return Err(answer_failure(w, c, Failure::Busy).await);
            }
            let want = head_len + n as usize;
            if let Err(e) = fill_rbuf(c, want, limits.header_timeout).await {
                return Err(answer_failure(w, c, Failure::Read(e)).await);
            }
            n as usize
        }
        BodyKind::Chunked => match dechunk(w, c, limits).await {
            Ok(n) => n,
            Err(f) => return Err(answer_failure(w, c, f).await),
        },
    };
    match schema.check(&c.b.rbuf[head_len..head_len + len]) {
        Ok(()) => Ok(()),
        Err(msg) => {
            // The body is all in: the connection can serve the next request.
            let keep = body_skippable(c);
            Err(reject(w, c, 400, &msg, keep).await)
        }
    }
}

/// Why a request body could not be read.
pub(super) enum Failure {
    Read(FillError),
    Chunk(ChunkError),
    /// Chunked framing too large next to its payload to be held for inspection.
    Framing,
    /// The worker holds as many bodies as `max_held_body_bytes` lets it.
    Busy,
}

/// Answers a body that could not be read: 408 when it was too slow, 400 when it was cut short
/// or its chunked framing is invalid (or too heavy for the WAF to hold), 413 when it is past
/// `max_body_bytes`, 431 when its trailer section is past the head's limits, 503 when the
/// worker holds as many bodies as it may.
pub(super) async fn answer_failure<S: ClientIo>(
    w: &Rc<Worker>,
    c: &mut Conn<S>,
    f: Failure,
) -> Outcome {
    match f {
        Failure::Read(FillError::TimedOut) => reject(w, c, 408, "Request Timeout", false).await,
        Failure::Read(FillError::Closed) => {
            reject(w, c, 400, "Bad Request: body ended early", false).await
        }
        Failure::Chunk(ChunkError::TooLarge) => {
            reject(w, c, 413, "Request Entity Too Large", false).await
        }
        Failure::Chunk(ChunkError::TrailersTooLarge) => {
            reject(w, c, 431, "Request Header Fields Too Large", false).await
        }
        Failure::Chunk(ChunkError::Invalid(_)) => {
            reject(w, c, 400, "Bad Request: invalid chunked body", false).await
        }
        Failure::Busy => {
            // Not this request's fault: it may be sent again (its body is not read).
            c.b.extra.extend_from_slice(b"retry-after: 1\r\n");
            reject(
                w,
                c,
                503,
                "Service Unavailable: too many request bodies held at once",
                false,
            )
            .await
        }
        Failure::Framing => {
            reject(
                w,
                c,
                400,
                "Bad Request: chunked framing too large to inspect",
                false,
            )
            .await
        }
    }
}

/// Reads and decodes a chunked body; leaves `rbuf` as head, decoded body, then whatever the
/// client sent after the body (a pipelined request), with the head's framing set to the
/// decoded length. Returns that length. The raw framing is never held whole: reads go to a
/// scratch buffer and only their payload is appended.
async fn dechunk<S: ClientIo>(
    w: &Worker,
    c: &mut Conn<S>,
    limits: &Limits,
) -> Result<usize, Failure> {
    let head_len = c.b.head.head_len;
    let deadline = Instant::now() + limits.header_timeout;
    let mut dec = ChunkedDecoder::new(limits.max_body_bytes);
    dec.limit_trailers(limits.max_header_bytes, limits.max_headers);
    // What arrived with the head (or was read by the WAF) is decoded first.
    let mut raw = c.b.rbuf.split_off(head_len);
    raw.reserve(CHUNKED_READ.saturating_sub(raw.capacity()));
    loop {
        let rbuf = &mut c.b.rbuf;
        let (used, done) = dec
            .feed(&raw, |d| rbuf.extend_from_slice(d))
            .map_err(Failure::Chunk)?;
        if !w.hold_body(&mut c.held, (c.b.rbuf.len() - head_len) as u64) {
            return Err(Failure::Busy);
        }
        if done {
            let len = c.b.rbuf.len() - head_len;
            c.b.rbuf.extend_from_slice(&raw[used..]);
            c.b.head.body = BodyKind::Length(len as u64);
            return Ok(len);
        }
        read_body(c, deadline, &mut raw)
            .await
            .map_err(Failure::Read)?;
    }
}
