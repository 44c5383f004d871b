//! Pass-through: after the upstream answered 101, bytes are copied both ways as they come.
//! Frames are not reassembled or unmasked; a small scanner walks the frame headers of each
//! direction (no copy) to enforce the frame and message limits and the client mask rule, and to
//! know where frames end, so a close frame can be put on the wire when the other side drops
//! its TCP connection, the connection idles out or outlives its maximum lifetime.

use super::frame::{self, code, SizeLimits};
use super::WsSettings;
use crate::gateway::Shared;
use crate::server::ClientIo;
use monoio::buf::{IoBuf, IoBufMut};
use monoio::io::{
    AsyncWriteRent, AsyncWriteRentExt, CancelableAsyncReadRent, Canceller, OwnedReadHalf,
    OwnedWriteHalf, Splitable,
};
use monoio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Initial size of each direction's buffer; grows to [`BIG_BUF`] under load.
const SMALL_BUF: usize = 4096;
const BIG_BUF: usize = 64 * 1024;

/// Walks frame headers in a byte stream without copying payloads. It reads a header only
/// once it is whole: the caller holds back the bytes of an incomplete one and feeds them again
/// with the bytes that follow, so only whole headers are relayed and a close frame of the
/// gateway's can always be put at a frame boundary.
#[derive(Debug)]
pub struct Scanner {
    /// Payload bytes left in the current frame.
    remaining: u64,
    /// Bytes of data frames in the current message.
    msg_len: u64,
    /// Client frames must be masked (`true`); an upstream's must not be (`false`).
    from_client: bool,
    limits: Option<SizeLimits>,
    /// A close frame went by.
    pub saw_close: bool,
}

impl Scanner {
    /// A scanner of the client's frames (`from_client`: they must be masked) or of the
    /// upstream's (they must not be); `limits` None = no size checks.
    pub fn new(from_client: bool, limits: Option<SizeLimits>) -> Scanner {
        Scanner {
            remaining: 0,
            msg_len: 0,
            from_client,
            limits,
            saw_close: false,
        }
    }

    /// Whether what was scanned (up to the bytes reported relayable) ends between frames.
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0
    }

    /// Scans `data`. `Ok(n)`: its first `n` bytes may be relayed; the rest, if any, is the
    /// start of a header, to be fed again in front of the bytes that follow. `Err((n, close
    /// code))`: a frame breaks a rule; the `n` bytes before it are whole frames, which may
    /// still go on, and the scanner is at that boundary.
    pub fn feed_upto(&mut self, data: &[u8]) -> Result<usize, (usize, u16)> {
        let mut at = 0;
        while at < data.len() {
            if self.remaining > 0 {
                let n = self.remaining.min((data.len() - at) as u64);
                self.remaining -= n;
                at += n as usize;
                continue;
            }
            let rest = &data[at..];
            let h = match frame::parse_header(&rest[..rest.len().min(14)]) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(c) => return Err((at, c)),
            };
            // RFC 6455 5.1: clients mask every frame, servers none.
            if self.from_client != h.mask.is_some() {
                return Err((at, code::PROTOCOL));
            }
            if h.opcode & 0x08 == 0 {
                if let Some(l) = self.limits {
                    if h.len > l.max_frame as u64 {
                        return Err((at, code::TOO_BIG));
                    }
                    let msg = if h.opcode == frame::op::CONT {
                        self.msg_len + h.len
                    } else {
                        h.len
                    };
                    if msg > l.max_message as u64 {
                        return Err((at, code::TOO_BIG));
                    }
                    self.msg_len = msg;
                }
            } else if h.opcode == frame::op::CLOSE {
                self.saw_close = true;
            }
            at += h.header_len;
            self.remaining = h.len;
        }
        Ok(at)
    }
}

/// Why one direction stopped.
enum End {
    /// The reading side closed its connection (or it failed).
    Closed,
    /// The writing side failed.
    WriteFailed,
    /// The reading side broke a rule: close with this code.
    Violation(u16),
}

struct Side {
    scan: RefCell<Scanner>,
    writing: Cell<bool>,
    /// A read holding a buffer is in flight since this instant.
    reading_since: Cell<Option<Instant>>,
    /// Cancels that read (the watchdog does, once it has waited [`GRACE`]).
    canceller: RefCell<Canceller>,
}

impl Side {
    fn new(scan: Scanner) -> Side {
        Side {
            scan: RefCell::new(scan),
            writing: Cell::new(false),
            reading_since: Cell::new(None),
            canceller: RefCell::new(Canceller::new()),
        }
    }

    /// Called by the watchdog: a read that has waited past the grace period gives up its
    /// buffer.
    fn release_if_idle(&self, now: Instant) {
        if let Some(t) = self.reading_since.get() {
            if now.duration_since(t) >= GRACE {
                self.reading_since.set(None);
                let c = std::mem::take(&mut *self.canceller.borrow_mut()).cancel();
                *self.canceller.borrow_mut() = c;
            }
        }
    }
}

impl Side {
    fn clean(&self) -> bool {
        !self.writing.get() && self.scan.borrow().at_boundary()
    }
}

/// How long a direction waits for data holding its buffer; after that (checked by the
/// connection's watchdog, so the hot path arms no timer) the buffer goes back to the worker's
/// pool and the direction waits for readiness without one: an idle WebSocket holds no buffer.
pub(super) const GRACE: Duration = Duration::from_millis(500);
/// Buffers kept per worker for relays that wake up.
const POOL_MAX: usize = 64;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// A read buffer from the worker's pool.
pub(super) fn take_buf() -> Vec<u8> {
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| Vec::with_capacity(SMALL_BUF))
}

/// Gives a read buffer back to the worker's pool (only the pool's size is kept).
pub(super) fn give_buf(mut b: Vec<u8>) {
    if b.capacity() != SMALL_BUF {
        return;
    }
    b.clear();
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_MAX {
            p.push(b);
        }
    });
}

async fn pump<R: ClientIo, W: ClientIo>(
    r: &mut OwnedReadHalf<R>,
    w: &mut OwnedWriteHalf<W>,
    first: Vec<u8>,
    side: &Side,
    last: &Cell<Instant>,
) -> End {
    let mut buf = first;
    loop {
        if !buf.is_empty() {
            let fed = side.scan.borrow_mut().feed_upto(&buf);
            let whole = match fed {
                Ok(n) => n,
                Err((good, c)) => {
                    // The whole frames before the one at fault still go on.
                    if good > 0 {
                        buf.truncate(good);
                        side.writing.set(true);
                        let (res, _) = w.write_all(buf).await;
                        side.writing.set(false);
                        if res.is_err() {
                            return End::WriteFailed;
                        }
                    }
                    return End::Violation(c);
                }
            };
            if whole > 0 {
                side.writing.set(true);
                let (res, b) = w.write_all(buf.slice(..whole)).await;
                side.writing.set(false);
                buf = b.into_inner();
                if res.is_err() {
                    return End::WriteFailed;
                }
                last.set(Instant::now());
            }
            let full = buf.len() == buf.capacity();
            // An incomplete header (at most 13 bytes) is held back, to be read on.
            buf.copy_within(whole.., 0);
            buf.truncate(buf.len() - whole);
            if full && buf.capacity() < BIG_BUF {
                let mut big = Vec::with_capacity(BIG_BUF);
                big.extend_from_slice(&buf);
                give_buf(std::mem::replace(&mut buf, big));
            }
        }
        if buf.capacity() == 0 {
            buf = take_buf();
        } else if buf.capacity() - buf.len() < 14 {
            // Only a first chunk (from the handshake) that is all a held-back header.
            buf.reserve(SMALL_BUF);
        }
        let len = buf.len();
        let cap = buf.capacity();
        let handle = side.canceller.borrow().handle();
        side.reading_since.set(Some(Instant::now()));
        let (res, b) = r.cancelable_read(buf.slice_mut(len..cap), handle).await;
        side.reading_since.set(None);
        buf = b.into_inner();
        match res {
            Ok(0) => return End::Closed,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => {
                // Idle: give the buffer back (unless it holds the start of a header) and
                // wait for bytes without one.
                if buf.is_empty() {
                    give_buf(std::mem::take(&mut buf));
                }
                // SAFETY: the halves share the stream through an `Rc<UnsafeCell>` exactly as
                // monoio's own split does; `readable` takes `&self` and only clones the fd
                // into a poll op, so it does not conflict with the write half's operations.
                // (Over TLS the cancelled read was the socket read: nothing waits above it.)
                let stream: &R = unsafe { &*r.0.get() };
                if stream.tcp().readable(false).await.is_err() {
                    return End::Closed;
                }
            }
            Err(_) => return End::Closed,
        }
    }
}

/// A close frame from the gateway toward the upstream: clients mask their frames, with a key
/// from a strong source of randomness (RFC 6455 5.3).
fn masked_close(code: u16) -> Vec<u8> {
    let mut key = [0u8; 4];
    if getrandom::getrandom(&mut key).is_err() {
        // No randomness (never on Linux): a fixed key still makes a valid frame.
        key = [0x5a, 0xc3, 0x96, 0x3c];
    }
    let mut f = Vec::new();
    frame::encode_close(&mut f, code, "");
    f[1] |= 0x80;
    let mut payload = f.split_off(2);
    frame::unmask_bytewise(&mut payload, key);
    f.extend_from_slice(&key);
    f.extend_from_slice(&payload);
    f
}

fn server_close(code: u16, reason: &str) -> Vec<u8> {
    let mut f = Vec::new();
    frame::encode_close(&mut f, code, reason);
    f
}

/// Bytes read past the handshake on either side, to be relayed first.
pub struct First {
    /// Sent by the client after its upgrade request.
    pub from_client: Vec<u8>,
    /// Sent by the upstream after its 101 head.
    pub from_upstream: Vec<u8>,
}

/// Relays between `client` and `upstream` until either closes, a rule is broken, or a timeout.
pub async fn run<S: ClientIo>(
    client: S,
    upstream: TcpStream,
    first: First,
    settings: &WsSettings,
    shared: &Shared,
) {
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    // The limits hold both ways: a client is not sent what it could not send itself.
    let up_side = Side::new(Scanner::new(true, Some(settings.limits)));
    let down_side = Side::new(Scanner::new(false, Some(settings.limits)));
    let last = Cell::new(Instant::now());
    let started = Instant::now();
    // What to do once the select below is done: (close to client, close to upstream).
    let (to_client, to_upstream): (Option<(u16, &str)>, Option<u16>) = {
        let c2u = pump(&mut cr, &mut uw, first.from_client, &up_side, &last);
        let u2c = pump(&mut ur, &mut cw, first.from_upstream, &down_side, &last);
        let watch = async {
            loop {
                let holding = match (up_side.reading_since.get(), down_side.reading_since.get()) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                let nap =
                    super::watch_interval(Instant::now(), holding, last.get(), started, settings);
                monoio::time::sleep(nap).await;
                let now = Instant::now();
                up_side.release_if_idle(now);
                down_side.release_if_idle(now);
                if shared.shutdown.load(Ordering::Relaxed) {
                    return "server shutting down";
                }
                if last.get().elapsed() >= settings.idle_timeout {
                    return "idle timeout";
                }
                if started.elapsed() >= settings.max_lifetime {
                    return "maximum connection duration reached";
                }
            }
        };
        monoio::select! {
            e = c2u => match e {
                End::Closed => (None, Some(code::GOING_AWAY)),
                End::WriteFailed => (Some((code::GOING_AWAY, "upstream went away")), None),
                End::Violation(c) => (Some((c, "frame refused")), Some(code::GOING_AWAY)),
            },
            e = u2c => match e {
                End::Closed => (Some((code::GOING_AWAY, "upstream went away")), None),
                End::WriteFailed => (None, Some(code::GOING_AWAY)),
                End::Violation(c) => (Some((c, "frame refused")), Some(c)),
            },
            why = watch => (Some((code::GOING_AWAY, why)), Some(code::GOING_AWAY)),
        }
    };
    // A side that already got a close frame gets no second one (RFC 6455 5.5.1): the close
    // handshake is under way, whichever side then dropped its connection first.
    let to_client = to_client.filter(|_| !down_side.scan.borrow().saw_close);
    let to_upstream = to_upstream.filter(|_| !up_side.scan.borrow().saw_close);
    let t = Duration::from_secs(1);
    if let Some((c, why)) = to_client {
        if down_side.clean() {
            let _ = monoio::time::timeout(t, cw.write_all(server_close(c, why))).await;
        }
    }
    if let Some(c) = to_upstream {
        if up_side.clean() {
            let _ = monoio::time::timeout(t, uw.write_all(masked_close(c))).await;
        }
    }
    let _ = monoio::time::timeout(t, cw.shutdown()).await;
    let _ = monoio::time::timeout(t, uw.shutdown()).await;
}

/// Feeds `data` to `sc` in pieces of `step` bytes as the relay's pump does, holding back
/// what the scanner does not take yet (an incomplete header, never 14 bytes or more); returns
/// the bytes the relay would have sent, and the close code when a frame broke a rule.
#[doc(hidden)]
pub fn relay_in_pieces(sc: &mut Scanner, data: &[u8], step: usize) -> (Vec<u8>, Option<u16>) {
    let (mut out, mut held) = (Vec::new(), Vec::new());
    for p in data.chunks(step.max(1)) {
        held.extend_from_slice(p);
        match sc.feed_upto(&held) {
            Ok(n) => {
                out.extend(held.drain(..n));
                assert!(held.len() < 14, "{} bytes held back", held.len());
            }
            Err((n, c)) => {
                out.extend_from_slice(&held[..n]);
                return (out, Some(c));
            }
        }
    }
    (out, None)
}

/// The check the `ws_relay` fuzz target runs (and a unit test, over generated frames): bytes
/// from one side of a pass-through tunnel (the first byte picks the piece size and which side)
/// relayed in pieces must never panic, must relay exactly what relaying them in one piece
/// does (the same bytes, the same fault), and, on a fault, must have relayed whole frames only,
/// so that the gateway's close frame lands between frames. Returns the bytes relayed.
#[doc(hidden)]
pub fn fuzz_check(data: &[u8]) -> usize {
    let Some((&first, rest)) = data.split_first() else {
        return 0;
    };
    let from_client = first & 0x80 != 0;
    let step = 1 + (first & 0x3f) as usize;
    let limits = Some(SizeLimits {
        max_frame: 256,
        max_message: 1024,
    });
    let pieces = relay_in_pieces(&mut Scanner::new(from_client, limits), rest, step);
    let whole = relay_in_pieces(&mut Scanner::new(from_client, limits), rest, rest.len());
    assert_eq!(pieces, whole, "step {step}");
    if pieces.1.is_some() {
        // What went on before the fault is whole frames: a fresh scanner takes all of it and
        // ends between frames.
        let mut again = Scanner::new(from_client, limits);
        assert_eq!(again.feed_upto(&pieces.0), Ok(pieces.0.len()));
        assert!(again.at_boundary());
    }
    pieces.0.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        frame::encode(&mut f, opcode, fin, payload);
        let hl = f.len() - payload.len();
        f[1] |= 0x80;
        f.splice(hl..hl, [0u8; 4]);
        f
    }

    #[test]
    fn the_gateways_close_toward_the_upstream_is_masked_with_a_random_key() {
        let (a, b) = (masked_close(1001), masked_close(1001));
        assert_eq!(a.len(), 2 + 4 + 2);
        assert_eq!((a[0], a[1]), (0x88, 0x82));
        assert_ne!(a[2..6], b[2..6], "the same key twice");
        let mut p = a[6..].to_vec();
        frame::unmask_bytewise(&mut p, [a[2], a[3], a[4], a[5]]);
        assert_eq!(p, 1001u16.to_be_bytes());
    }

    /// [`relay_in_pieces`] as a `Result`: the bytes relayed, or those and the close code.
    fn relay(sc: &mut Scanner, data: &[u8], step: usize) -> Result<Vec<u8>, (Vec<u8>, u16)> {
        match relay_in_pieces(sc, data, step) {
            (out, None) => Ok(out),
            (out, Some(c)) => Err((out, c)),
        }
    }

    fn feed(sc: &mut Scanner, data: &[u8]) -> Result<(), u16> {
        relay(sc, data, data.len().max(1))
            .map(|_| ())
            .map_err(|(_, c)| c)
    }

    #[test]
    fn fuzz_check_over_generated_frames() {
        // xorshift: frames of both sides (now and then of the wrong one, or over the limits),
        // then mutated bytes, through the fuzz target's check.
        let mut rng = crate::http::fuzz_checks::XorShift(0x2545_F491_4F6C_DD1D);
        let mut next = move || rng.next_u64();
        let (mut relayed, mut cut) = (0, 0);
        for _ in 0..3000 {
            let first = next() as u8;
            let mut input = vec![first];
            for _ in 0..(next() % 6) {
                let op = [0x1u8, 0x2, 0x0, 0x9, 0xA, 0x8][(next() % 6) as usize];
                let len = (next() % 300) as usize;
                let payload: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                let client = (first & 0x80 != 0) != (next() % 10 == 0);
                if client {
                    input.extend(masked(op, next() % 3 != 0, &payload));
                } else {
                    frame::encode(&mut input, op, next() % 3 != 0, &payload);
                }
            }
            for _ in 0..(next() % 3) {
                if input.len() > 1 {
                    let i = 1 + (next() as usize) % (input.len() - 1);
                    input[i] = next() as u8;
                }
            }
            let n = fuzz_check(&input);
            relayed += n;
            cut += (n + 1 < input.len()) as usize;
        }
        // Many inputs go through whole and many stop at a fault (or a frame left unfinished):
        // both paths must really be taken.
        assert!(
            relayed > 100_000 && cut > 500,
            "{relayed} bytes, {cut} inputs cut"
        );
    }

    #[test]
    fn scanner_tracks_boundaries_in_any_split() {
        let mut s = masked(frame::op::TEXT, true, &[b'x'; 300]);
        s.extend(masked(frame::op::PING, true, b""));
        s.extend(masked(frame::op::CLOSE, true, &1000u16.to_be_bytes()));
        for step in [1, 2, 5, 14, 100, 1000] {
            let mut sc = Scanner::new(
                true,
                Some(SizeLimits {
                    max_frame: 1000,
                    max_message: 1000,
                }),
            );
            assert_eq!(relay(&mut sc, &s, step), Ok(s.clone()), "step {step}");
            assert!(sc.at_boundary() && sc.saw_close, "step {step}");
        }
        let mut sc = Scanner::new(true, None);
        assert_eq!(
            sc.feed_upto(&s[..5]),
            Ok(0),
            "an incomplete header is held back"
        );
        assert_eq!(sc.feed_upto(&s[..10]), Ok(10));
        assert!(!sc.at_boundary());
    }

    /// A frame at fault whose header came in pieces: nothing of it is relayed, so the close
    /// follows the frames before it.
    #[test]
    fn a_split_header_at_fault_relays_nothing_of_its_frame() {
        let lim = Some(SizeLimits {
            max_frame: 1024,
            max_message: 1024,
        });
        let mut ok = Vec::new();
        frame::encode(&mut ok, frame::op::TEXT, true, b"fine");
        let mut big = Vec::new();
        frame::encode(&mut big, frame::op::BINARY, true, &[0; 2000]);
        let unmasked = {
            let mut f = Vec::new();
            frame::encode(&mut f, frame::op::TEXT, true, b"hello");
            f
        };
        for (from_client, first, bad, c) in [
            (false, ok.clone(), big, 1009),
            (true, masked(frame::op::TEXT, true, b"fine"), unmasked, 1002),
        ] {
            for step in 1..=4 {
                let mut all = first.clone();
                all.extend_from_slice(&bad);
                let mut sc = Scanner::new(from_client, lim);
                assert_eq!(relay(&mut sc, &all, step), Err((first.clone(), c)));
                assert!(sc.at_boundary());
            }
        }
    }

    #[test]
    fn scanner_enforces_rules() {
        let lim = Some(SizeLimits {
            max_frame: 100,
            max_message: 150,
        });
        let mut f = Vec::new();
        frame::encode(&mut f, frame::op::TEXT, true, b"hi");
        assert_eq!(feed(&mut Scanner::new(true, lim), &f), Err(1002));
        assert_eq!(feed(&mut Scanner::new(false, lim), &f), Ok(()));
        // An upstream (a server) never masks; and the size limits hold its way too.
        let m = masked(frame::op::TEXT, true, b"hi");
        assert_eq!(feed(&mut Scanner::new(false, lim), &m), Err(1002));
        let mut big = Vec::new();
        frame::encode(&mut big, frame::op::BINARY, true, &[0; 101]);
        assert_eq!(feed(&mut Scanner::new(false, lim), &big[..4]), Err(1009));
        let big = masked(frame::op::BINARY, true, &[0; 101]);
        assert_eq!(feed(&mut Scanner::new(true, lim), &big[..8]), Err(1009));
        let mut m = masked(frame::op::BINARY, false, &[0; 100]);
        m.extend(masked(frame::op::CONT, true, &[0; 60]));
        assert_eq!(feed(&mut Scanner::new(true, lim), &m), Err(1009));
    }
}
