//! RFC 6455 framing: a decoder for client frames (mask required, fragmentation, control frames
//! between fragments, UTF-8 of text, close codes, size limits checked from the header before
//! any payload is buffered) and an encoder for server frames.

/// Close codes the gateway sends (and two it only reports to `$disconnect`).
pub mod code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The endpoint is going away (shutdown, idle timeout, end of maximum lifetime).
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol error.
    pub const PROTOCOL: u16 = 1002;
    /// Reported only: the client's close frame carried no code (RFC 6455 §7.1.5).
    pub const NO_STATUS: u16 = 1005;
    /// Reported only: the connection ended without a close frame (RFC 6455 §7.1.5).
    pub const ABNORMAL: u16 = 1006;
    /// Text that is not UTF-8.
    pub const INVALID_DATA: u16 = 1007;
    /// Policy violation (e.g. closed by the management API).
    pub const POLICY: u16 = 1008;
    /// Frame or message larger than the limit.
    pub const TOO_BIG: u16 = 1009;
    /// Unexpected condition on the server.
    pub const INTERNAL: u16 = 1011;
}

/// Frame opcodes.
pub mod op {
    /// Continuation of a fragmented message.
    pub const CONT: u8 = 0x0;
    /// Text data frame.
    pub const TEXT: u8 = 0x1;
    /// Binary data frame.
    pub const BINARY: u8 = 0x2;
    /// Close control frame.
    pub const CLOSE: u8 = 0x8;
    /// Ping control frame.
    pub const PING: u8 = 0x9;
    /// Pong control frame.
    pub const PONG: u8 = 0xA;
}

/// Size limits applied to incoming frames and messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeLimits {
    /// Largest payload of one frame.
    pub max_frame: usize,
    /// Largest reassembled message.
    pub max_message: usize,
}

/// One complete thing received from the peer.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A complete message; `text` messages are valid UTF-8.
    Message { text: bool, data: Vec<u8> },
    /// A ping with its payload (answer with a pong carrying it).
    Ping(Vec<u8>),
    /// A pong.
    Pong,
    /// A close frame: the code (absent when the payload was empty) and reason.
    Close(Option<u16>, Vec<u8>),
}

/// XORs `buf` with the 4-byte masking `key`, 8 bytes at a time. `buf` must start at a
/// multiple of 4 bytes into the masked payload (true for a whole payload).
#[inline]
pub fn unmask(buf: &mut [u8], key: [u8; 4]) {
    let k8 = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let v = u64::from_ne_bytes(w) ^ k8;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// The reference byte-at-a-time unmask, used by tests to check [`unmask`].
pub fn unmask_bytewise(buf: &mut [u8], key: [u8; 4]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// Appends a server (unmasked) frame to `out`.
pub fn encode(out: &mut Vec<u8>, opcode: u8, fin: bool, payload: &[u8]) {
    out.push(if fin { 0x80 } else { 0 } | (opcode & 0x0f));
    let n = payload.len();
    if n < 126 {
        out.push(n as u8);
    } else if n <= u16::MAX as usize {
        out.push(126);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(n as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// Appends a close frame with `code` and a short reason.
pub fn encode_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut p = Vec::with_capacity(2 + reason.len().min(123));
    p.extend_from_slice(&code.to_be_bytes());
    let mut r = reason.len().min(123);
    while !reason.is_char_boundary(r) {
        r -= 1;
    }
    p.extend_from_slice(&reason.as_bytes()[..r]);
    encode(out, op::CLOSE, true, &p);
}

/// Whether a close code received from a peer is allowed on the wire (RFC 6455 7.4).
pub fn close_code_valid(c: u16) -> bool {
    matches!(c, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// A frame header as read from the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// FIN bit.
    pub fin: bool,
    /// Opcode.
    pub opcode: u8,
    /// Masking key, when the MASK bit is set.
    pub mask: Option<[u8; 4]>,
    /// Payload length.
    pub len: u64,
    /// Header length in bytes.
    pub header_len: usize,
}

/// Parses a frame header: `Ok(None)` when more bytes are needed, `Err(close code)` when the
/// header is invalid (reserved bits, unknown opcode, bad control frame, 64-bit length with the
/// top bit set).
pub fn parse_header(b: &[u8]) -> Result<Option<Header>, u16> {
    if b.len() < 2 {
        return Ok(None);
    }
    let fin = b[0] & 0x80 != 0;
    if b[0] & 0x70 != 0 {
        return Err(code::PROTOCOL);
    }
    let opcode = b[0] & 0x0f;
    let control = opcode & 0x08 != 0;
    match opcode {
        op::CONT | op::TEXT | op::BINARY | op::CLOSE | op::PING | op::PONG => {}
        _ => return Err(code::PROTOCOL),
    }
    let masked = b[1] & 0x80 != 0;
    let len7 = (b[1] & 0x7f) as u64;
    if control && (!fin || len7 > 125) {
        return Err(code::PROTOCOL);
    }
    let (len, mut at) = match len7 {
        126 => {
            if b.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([b[2], b[3]]) as u64, 4)
        }
        127 => {
            if b.len() < 10 {
                return Ok(None);
            }
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[2..10]);
            let l = u64::from_be_bytes(w);
            if l >> 63 != 0 {
                return Err(code::PROTOCOL);
            }
            (l, 10)
        }
        l => (l, 2),
    };
    let mask = if masked {
        if b.len() < at + 4 {
            return Ok(None);
        }
        let k = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        at += 4;
        Some(k)
    } else {
        None
    };
    Ok(Some(Header {
        fin,
        opcode,
        mask,
        len,
        header_len: at,
    }))
}

/// Decodes the frames a client sends into [`Event`]s.
#[derive(Debug)]
pub struct Decoder {
    limits: SizeLimits,
    /// Opcode of the fragmented message being reassembled (TEXT or BINARY).
    msg_op: Option<u8>,
    msg: Vec<u8>,
}

impl Decoder {
    /// A decoder enforcing `limits`.
    pub fn new(limits: SizeLimits) -> Decoder {
        Decoder {
            limits,
            msg_op: None,
            msg: Vec::new(),
        }
    }

    /// Decodes the next event from the front of `buf`. Returns the event (`None` when `buf`
    /// holds no complete frame that finishes one) and the number of bytes used, which the
    /// caller drops before reading more (fragments are taken in as they come); `Err(code)` is
    /// the close code to fail the connection with. Oversized frames are refused from their header, before
    /// their payload is read or buffered.
    pub fn decode(&mut self, buf: &mut [u8]) -> Result<(Option<Event>, usize), u16> {
        let mut pos = 0;
        loop {
            let Some(h) = parse_header(&buf[pos..])? else {
                return Ok((None, pos));
            };
            let Some(key) = h.mask else {
                return Err(code::PROTOCOL);
            };
            if h.len > self.limits.max_frame as u64 {
                return Err(code::TOO_BIG);
            }
            let len = h.len as usize;
            let control = h.opcode & 0x08 != 0;
            // Sequence checks before waiting for the payload.
            if !control {
                match (h.opcode, self.msg_op) {
                    (op::CONT, None) => return Err(code::PROTOCOL),
                    (op::TEXT | op::BINARY, Some(_)) => return Err(code::PROTOCOL),
                    _ => {}
                }
                let have = if h.opcode == op::CONT {
                    self.msg.len()
                } else {
                    0
                };
                if have + len > self.limits.max_message {
                    return Err(code::TOO_BIG);
                }
            }
            let total = h.header_len + len;
            if buf.len() - pos < total {
                return Ok((None, pos));
            }
            let payload = &mut buf[pos + h.header_len..pos + total];
            unmask(payload, key);
            pos += total;
            if control {
                let ev = match h.opcode {
                    op::PING => Event::Ping(payload.to_vec()),
                    op::PONG => Event::Pong,
                    _ => {
                        if payload.is_empty() {
                            Event::Close(None, Vec::new())
                        } else if payload.len() == 1 {
                            return Err(code::PROTOCOL);
                        } else {
                            let c = u16::from_be_bytes([payload[0], payload[1]]);
                            if !close_code_valid(c) {
                                return Err(code::PROTOCOL);
                            }
                            if std::str::from_utf8(&payload[2..]).is_err() {
                                return Err(code::INVALID_DATA);
                            }
                            Event::Close(Some(c), payload[2..].to_vec())
                        }
                    }
                };
                return Ok((Some(ev), pos));
            }
            if h.opcode != op::CONT {
                if h.fin {
                    // Unfragmented: the common case, one copy out of the read buffer.
                    let text = h.opcode == op::TEXT;
                    if text && std::str::from_utf8(payload).is_err() {
                        return Err(code::INVALID_DATA);
                    }
                    let data = payload.to_vec();
                    return Ok((Some(Event::Message { text, data }), pos));
                }
                self.msg_op = Some(h.opcode);
                self.msg.clear();
            }
            self.msg.extend_from_slice(payload);
            if h.fin {
                let text = self.msg_op.take() == Some(op::TEXT);
                let data = std::mem::take(&mut self.msg);
                if text && std::str::from_utf8(&data).is_err() {
                    return Err(code::INVALID_DATA);
                }
                return Ok((Some(Event::Message { text, data }), pos));
            }
            // A non-final fragment was taken in: report its bytes as used so the caller can
            // drop them, and continue with the next frame.
            if pos == buf.len() {
                return Ok((None, pos));
            }
        }
    }
}

/// The check the `ws_decoder` fuzz target runs (and a unit test, over generated inputs): bytes
/// from a client fed to a [`Decoder`] in pieces (the first byte picks the piece size) must never
/// panic, never report more bytes used than given, and only yield text messages that are valid
/// UTF-8 and messages within the limits. Returns the number of events decoded.
#[doc(hidden)]
pub fn fuzz_check(data: &[u8]) -> usize {
    let mut events = 0;
    let Some((&first, rest)) = data.split_first() else {
        return events;
    };
    let step = 1 + first as usize % 64;
    let limits = SizeLimits {
        max_frame: 256,
        max_message: 1024,
    };
    let mut d = Decoder::new(limits);
    let mut buf: Vec<u8> = Vec::new();
    for piece in rest.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            let len = buf.len();
            match d.decode(&mut buf) {
                Err(_) => return events,
                Ok((ev, used)) => {
                    assert!(used <= len, "used {used} of {len}");
                    buf.drain(..used);
                    events += ev.is_some() as usize;
                    match ev {
                        Some(Event::Message { text, data }) => {
                            assert!(data.len() <= limits.max_message);
                            if text {
                                assert!(std::str::from_utf8(&data).is_ok());
                            }
                        }
                        Some(Event::Ping(p)) => assert!(p.len() <= 125),
                        Some(_) => {}
                        None => break,
                    }
                }
            }
        }
    }
    events
}

#[cfg(test)]
mod tests {
    #[test]
    fn fuzz_check_over_generated_frames() {
        // xorshift: valid masked frames, then mutated bytes, through the fuzz target's check.
        let mut rng = crate::http::fuzz_checks::XorShift(0x9E37_79B9_7F4A_7C15);
        let mut next = move || rng.next_u64();
        let mut events = 0;
        for _ in 0..3000 {
            let mut input = vec![next() as u8];
            for _ in 0..(next() % 6) {
                let op = [0x1u8, 0x2, 0x0, 0x9, 0xA, 0x8][(next() % 6) as usize];
                let len = (next() % 200) as usize;
                let payload: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                let fin = next() % 3 != 0;
                let mut f = Vec::new();
                super::encode(&mut f, op, fin, &payload);
                // Client frames are masked: set the bit and insert a key after the length.
                let hl = match f[1] & 0x7f {
                    126 => 4,
                    127 => 10,
                    _ => 2,
                };
                f[1] |= 0x80;
                let key = (next() as u32).to_be_bytes();
                let mut masked = f[hl..].to_vec();
                super::unmask(&mut masked, key);
                input.extend_from_slice(&f[..hl]);
                input.extend_from_slice(&key);
                input.extend_from_slice(&masked);
            }
            for _ in 0..(next() % 4) {
                if input.len() > 1 {
                    let i = 1 + (next() as usize) % (input.len() - 1);
                    input[i] = next() as u8;
                }
            }
            events += super::fuzz_check(&input);
        }
        // The generated frames are mostly valid: the check must really decode many of them.
        assert!(events > 500, "only {events} events decoded");
    }

    use super::*;

    const LIM: SizeLimits = SizeLimits {
        max_frame: 32 * 1024,
        max_message: 128 * 1024,
    };

    fn frame(fin: bool, opcode: u8, payload: &[u8], key: Option<[u8; 4]>) -> Vec<u8> {
        let mut out = Vec::new();
        encode(&mut out, opcode, fin, payload);
        if let Some(k) = key {
            let hl = out.len() - payload.len();
            out[1] |= 0x80;
            let mut p = out.split_off(hl);
            unmask_bytewise(&mut p, k);
            out.extend_from_slice(&k);
            out.extend_from_slice(&p);
        }
        out
    }

    fn cf(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        frame(fin, opcode, payload, Some([0x37, 0xfa, 0x21, 0x3d]))
    }

    /// Feeds `input` in pieces of `step` bytes; returns the events and the error, if any.
    fn run(input: &[u8], step: usize, lim: SizeLimits) -> (Vec<Event>, Option<u16>) {
        let mut d = Decoder::new(lim);
        let mut buf = Vec::new();
        let mut evs = Vec::new();
        for piece in input.chunks(step.max(1)) {
            buf.extend_from_slice(piece);
            loop {
                match d.decode(&mut buf) {
                    Err(c) => return (evs, Some(c)),
                    Ok((ev, used)) => {
                        buf.drain(..used);
                        match ev {
                            Some(e) => evs.push(e),
                            None => break,
                        }
                    }
                }
            }
        }
        (evs, None)
    }

    fn all_steps(input: &[u8]) -> (Vec<Event>, Option<u16>) {
        let whole = run(input, input.len(), LIM);
        for step in [1, 2, 3, 7, 13] {
            assert_eq!(run(input, step, LIM), whole, "step {step}");
        }
        whole
    }

    fn text(s: &[u8]) -> Event {
        Event::Message {
            text: true,
            data: s.to_vec(),
        }
    }

    #[test]
    fn fast_unmask_matches_byte_loop() {
        let mut seed = 0x9e3779b97f4a7c15u64;
        for len in 0..300 {
            let mut a: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let key = (seed as u32).to_le_bytes();
            let mut b = a.clone();
            unmask(&mut a, key);
            unmask_bytewise(&mut b, key);
            assert_eq!(a, b, "len {len}");
        }
    }

    #[test]
    fn single_frames_of_each_length_encoding() {
        for n in [0usize, 1, 125, 126, 127, 65535, 65536, 100_000] {
            let p: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
            let lim = SizeLimits {
                max_frame: 200_000,
                max_message: 200_000,
            };
            let (evs, err) = run(&cf(true, op::TEXT, &p), 4096, lim);
            assert_eq!((evs, err), (vec![text(&p)], None), "len {n}");
        }
        let (evs, err) = all_steps(&cf(true, op::BINARY, &[0, 1, 2, 255]));
        assert_eq!(err, None);
        assert_eq!(
            evs,
            vec![Event::Message {
                text: false,
                data: vec![0, 1, 2, 255]
            }]
        );
    }

    #[test]
    fn fragmentation_with_interleaved_control_frames() {
        let mut input = cf(false, op::TEXT, b"Hel");
        input.extend(cf(true, op::PING, b"p1"));
        input.extend(cf(false, op::CONT, b"lo, "));
        input.extend(cf(true, op::PONG, b""));
        input.extend(cf(true, op::CONT, b"world"));
        input.extend(cf(true, op::TEXT, b"next"));
        let (evs, err) = all_steps(&input);
        assert_eq!(err, None);
        assert_eq!(
            evs,
            vec![
                Event::Ping(b"p1".to_vec()),
                Event::Pong,
                text(b"Hello, world"),
                text(b"next")
            ]
        );
    }

    #[test]
    fn fragment_sequence_errors() {
        // Continuation with nothing to continue.
        assert_eq!(all_steps(&cf(true, op::CONT, b"x")).1, Some(1002));
        // A new data frame in the middle of a fragmented message.
        let mut i = cf(false, op::TEXT, b"a");
        i.extend(cf(true, op::BINARY, b"b"));
        assert_eq!(all_steps(&i).1, Some(1002));
        // Fragmented control frame; control frame over 125 bytes.
        assert_eq!(all_steps(&cf(false, op::PING, b"x")).1, Some(1002));
        let mut big_ping = vec![0x89u8, 0x80 | 126, 0, 126, 1, 2, 3, 4];
        big_ping.extend(vec![0u8; 126]);
        assert_eq!(all_steps(&big_ping).1, Some(1002));
    }

    #[test]
    fn reserved_bits_and_opcodes_refused() {
        for b0 in [
            0x81 | 0x40,
            0x81 | 0x20,
            0x81 | 0x10,
            0x83,
            0x87,
            0x8b,
            0x8f,
        ] {
            let mut f = cf(true, op::TEXT, b"x");
            f[0] = b0;
            assert_eq!(all_steps(&f).1, Some(1002), "b0 {b0:#x}");
        }
    }

    #[test]
    fn unmasked_client_frames_refused() {
        assert_eq!(all_steps(&frame(true, op::TEXT, b"hi", None)).1, Some(1002));
        assert_eq!(all_steps(&frame(true, op::PING, b"", None)).1, Some(1002));
    }

    #[test]
    fn invalid_utf8_refused_valid_split_accepted() {
        assert_eq!(all_steps(&cf(true, op::TEXT, b"\xff\xfe")).1, Some(1007));
        // Overlong encoding and a surrogate.
        assert_eq!(all_steps(&cf(true, op::TEXT, b"\xc0\xaf")).1, Some(1007));
        assert_eq!(
            all_steps(&cf(true, op::TEXT, b"\xed\xa0\x80")).1,
            Some(1007)
        );
        let mut i = cf(false, op::TEXT, b"ok");
        i.extend(cf(true, op::CONT, b"\xce"));
        assert_eq!(all_steps(&i).1, Some(1007));
        // A code point split across two fragments is fine ("κ" = ce ba).
        let mut i = cf(false, op::TEXT, b"\xce");
        i.extend(cf(true, op::CONT, b"\xba"));
        assert_eq!(all_steps(&i), (vec![text("κ".as_bytes())], None));
        // Binary is not checked.
        assert_eq!(all_steps(&cf(true, op::BINARY, b"\xff")).1, None);
    }

    #[test]
    fn oversize_refused_from_the_header() {
        // Only the header of a 1 MB frame: refused before any payload arrives.
        let f = cf(true, op::BINARY, &vec![0u8; 1 << 20]);
        let (evs, err) = run(&f[..14], 14, LIM);
        assert_eq!((evs.len(), err), (0, Some(1009)));
        // Frames within the limit adding up past the message limit.
        let chunk = vec![b'a'; 30 * 1024];
        let mut i = cf(false, op::TEXT, &chunk);
        for _ in 0..3 {
            i.extend(cf(false, op::CONT, &chunk));
        }
        i.extend(cf(true, op::CONT, &chunk));
        assert_eq!(run(&i, 1500, LIM).1, Some(1009));
        // The 64-bit length with its top bit set.
        let mut f = vec![0x82u8, 0x80 | 127];
        f.extend(u64::MAX.to_be_bytes());
        f.extend([1, 2, 3, 4]);
        assert_eq!(run(&f, 100, LIM).1, Some(1002));
    }

    #[test]
    fn close_codes() {
        let close = |code: u16, reason: &[u8]| {
            let mut p = code.to_be_bytes().to_vec();
            p.extend_from_slice(reason);
            all_steps(&cf(true, op::CLOSE, &p))
        };
        assert_eq!(
            all_steps(&cf(true, op::CLOSE, b"")).0,
            vec![Event::Close(None, vec![])]
        );
        for ok in [
            1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 4999,
        ] {
            assert_eq!(
                close(ok, b"bye"),
                (vec![Event::Close(Some(ok), b"bye".to_vec())], None),
                "{ok}"
            );
        }
        for bad in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            assert_eq!(close(bad, b"").1, Some(1002), "{bad}");
        }
        assert_eq!(all_steps(&cf(true, op::CLOSE, &[3])).1, Some(1002));
        assert_eq!(close(1000, b"\xff").1, Some(1007));
    }

    #[test]
    fn encoder_lengths_and_close() {
        for (n, hl) in [
            (0usize, 2usize),
            (125, 2),
            (126, 4),
            (65535, 4),
            (65536, 10),
        ] {
            let mut out = Vec::new();
            encode(&mut out, op::BINARY, true, &vec![7u8; n]);
            let h = parse_header(&out).unwrap().unwrap();
            assert_eq!((h.len as usize, h.header_len, h.mask), (n, hl, None));
            assert_eq!(out.len(), n + hl);
        }
        let mut out = Vec::new();
        encode_close(&mut out, 1009, &"é".repeat(100));
        let h = parse_header(&out).unwrap().unwrap();
        assert!(h.len <= 125 && h.fin && h.opcode == op::CLOSE);
        assert!(std::str::from_utf8(&out[4..]).is_ok());
    }
}
