//! Streaming, strict validator/decoder for `Transfer-Encoding: chunked`
//! bodies (RFC 9112 §7.1). Used to relay chunked bodies verbatim in both
//! directions while checking their framing and size, and to find exactly
//! where the body ends.

use std::fmt;

/// Longest accepted chunk-size line extension part (after the digits).
const MAX_EXT_LEN: u32 = 4096;
/// Longest accepted trailer section (all trailer lines together).
const MAX_TRAILER_LEN: u32 = 16 * 1024;

/// Why a chunked body was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkError {
    /// Framing violation; the reason is short and safe to log.
    Invalid(&'static str),
    /// Payload exceeds the configured maximum.
    TooLarge,
}

impl fmt::Display for ChunkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChunkError::Invalid(r) => write!(f, "invalid chunked body: {r}"),
            ChunkError::TooLarge => f.write_str("chunked body too large"),
        }
    }
}

impl std::error::Error for ChunkError {}

/// The end of a trailer section (an empty line).
const EMPTY_TRAILERS: &[u8] = b"\r\n";

/// Fields never passed on in a trailer section (RFC 9110 6.5.1: framing, routing, request
/// modifiers, authentication, response controls, cookies), beside every name the gateway
/// writes or frames with ([`crate::http::HeaderKind`]) and names with `_`: a recipient that
/// merges trailers into the header section would otherwise take them for headers the gateway
/// checked or owns.
const TRAILER_DENIED: &[&str] = &[
    "authorization",
    "x-api-key",
    "cookie",
    "set-cookie",
    "proxy-authorization",
    "www-authenticate",
    "content-type",
    "content-encoding",
    "content-range",
    "content-location",
    "cache-control",
    "expires",
    "age",
    "date",
    "location",
    "retry-after",
    "vary",
    "max-forwards",
    "pragma",
    "range",
    "if-match",
    "if-none-match",
    "if-modified-since",
    "if-unmodified-since",
    "if-range",
    "forwarded",
];

/// Appends the fields of a raw trailer section (`name: value` CRLF lines, then CRLF, as the
/// decoder checked it) that may be passed on, then the final CRLF. Besides the names every
/// trailer section loses (the gateway's own, credentials, representation metadata, `x-amz-*`
/// that SigV4 signs), `also_denied` names those this request's route checked or set (its
/// request mapping's headers, its authorizer's identity headers, WAF header targets).
pub fn push_allowed_trailers(
    section: &[u8],
    out: &mut Vec<u8>,
    also_denied: &dyn Fn(&[u8]) -> bool,
) {
    for line in section.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = &line[..colon];
        let denied = crate::http::HeaderKind::of(name) != crate::http::HeaderKind::Other
            || name.contains(&b'_')
            || name
                .get(..6)
                .is_some_and(|p| p.eq_ignore_ascii_case(b"x-amz-"))
            || TRAILER_DENIED
                .iter()
                .any(|d| name.eq_ignore_ascii_case(d.as_bytes()))
            || also_denied(name);
        if !denied {
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(EMPTY_TRAILERS);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Reading chunk-size hex digits.
    Size,
    /// BWS between the size and `;`.
    SizeWs,
    /// Inside chunk extensions, up to CR.
    Ext,
    /// Expecting LF after the size line's CR.
    SizeLf,
    /// Inside chunk data (`remaining` bytes left).
    Data,
    /// Expecting CR after chunk data.
    DataCr,
    /// Expecting LF after chunk data.
    DataLf,
    /// Start of a trailer line (or of the final CRLF).
    TrailerStart,
    /// Inside a trailer field name.
    TrailerName,
    /// Inside a trailer field value.
    TrailerValue,
    /// Expecting LF ending a trailer line.
    TrailerLf,
    /// Expecting the final LF.
    FinalLf,
    /// Body complete.
    Done,
    /// A previous call failed.
    Failed,
}

/// Incremental chunked-body decoder. Reuse it with [`ChunkedDecoder::reset`].
#[derive(Clone, Debug)]
pub struct ChunkedDecoder {
    state: State,
    max_body: u64,
    total: u64,
    /// Chunk size being parsed, then bytes left in the current chunk.
    remaining: u64,
    /// Digits in the size / bytes in the extension or trailer section.
    count: u32,
    error: ChunkError,
    /// Where, in the input of the last [`ChunkedDecoder::feed`], the trailer section began.
    trailer_from: Option<usize>,
    /// The raw trailer section seen by [`ChunkedDecoder::feed_without_trailers`].
    trailers: Vec<u8>,
    /// Lowercase trailer names left out besides the fixed ones ([`ChunkedDecoder::deny`]).
    denied: Vec<Box<[u8]>>,
}

/// An RFC 9110 token character (header and trailer field names).
pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
}

impl ChunkedDecoder {
    /// New decoder accepting at most `max_body` payload bytes.
    pub fn new(max_body: u64) -> Self {
        ChunkedDecoder {
            state: State::Size,
            max_body,
            total: 0,
            remaining: 0,
            count: 0,
            error: ChunkError::Invalid("unused"),
            trailer_from: None,
            trailers: Vec::new(),
            denied: Vec::new(),
        }
    }

    /// Trailer names to leave out besides the fixed ones: those the request's route checked
    /// or set (its mapping's headers, its authorizer's identity headers, WAF header targets).
    pub fn deny(&mut self, names: impl IntoIterator<Item = Box<[u8]>>) {
        self.denied.extend(names);
    }

    /// Prepares for a new body (same `max_body`).
    pub fn reset(&mut self) {
        *self = ChunkedDecoder::new(self.max_body);
    }

    /// Payload bytes seen so far (framing excluded).
    pub fn total(&self) -> u64 {
        self.total
    }

    /// True once the whole body, trailers included, has been consumed.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// [`ChunkedDecoder::feed`] for a body passed on as it came up to its trailer section,
    /// which the caller collects and filters ([`push_allowed_trailers`]): fields there could
    /// stand in for headers the gateway checked or owns. Returns `(consumed, done, keep)`:
    /// `input[..keep]` goes on unchanged, `input[keep..consumed]` is trailer section.
    pub fn feed_without_trailers(
        &mut self,
        input: &[u8],
        on_data: impl FnMut(&[u8]),
    ) -> Result<(usize, bool, usize), ChunkError> {
        let in_trailers = matches!(
            self.state,
            State::TrailerStart
                | State::TrailerName
                | State::TrailerValue
                | State::TrailerLf
                | State::FinalLf
                | State::Done
        );
        let (used, done) = self.feed(input, on_data)?;
        let keep = if in_trailers {
            0
        } else {
            self.trailer_from.unwrap_or(used)
        };
        // Bounded: the decoder refuses a trailer section past MAX_TRAILER_LEN.
        self.trailers.extend_from_slice(&input[keep..used]);
        Ok((used, done, keep))
    }

    /// Once done: appends the trailer section's fields that may be passed on, then the final
    /// CRLF ([`push_allowed_trailers`]).
    pub fn push_trailers(&mut self, out: &mut Vec<u8>) {
        let denied = &self.denied;
        push_allowed_trailers(&self.trailers, out, &|n| {
            denied.iter().any(|d| n.eq_ignore_ascii_case(d))
        });
        self.trailers = Vec::new();
    }

    fn fail(&mut self, e: ChunkError) -> ChunkError {
        self.state = State::Failed;
        self.error = e;
        e
    }

    /// Consumes from `input` the bytes that belong to this chunked body
    /// (framing included) and returns `(consumed, done)`. Payload bytes are
    /// passed to `on_data`, one call per contiguous span. Unless `done`,
    /// all of `input` is consumed; when done, consumption stops right after
    /// the final CRLF of the trailer section. After `done`, further calls
    /// return `(0, true)`; after an error, they return the same error.
    pub fn feed(
        &mut self,
        input: &[u8],
        mut on_data: impl FnMut(&[u8]),
    ) -> Result<(usize, bool), ChunkError> {
        use State::*;
        let inv = |r| Err(ChunkError::Invalid(r));
        let mut i = 0;
        self.trailer_from = None;
        while i < input.len() {
            if self.state == Data {
                let avail = input.len() - i;
                let n = self.remaining.min(avail as u64) as usize;
                on_data(&input[i..i + n]);
                i += n;
                self.total += n as u64;
                self.remaining -= n as u64;
                if self.remaining == 0 {
                    self.state = DataCr;
                }
                continue;
            }
            let b = input[i];
            i += 1;
            let step: Result<State, ChunkError> = match self.state {
                Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if self.count == 16 {
                            inv("chunk size too long")
                        } else {
                            let d = (b as char).to_digit(16).unwrap_or(0);
                            self.remaining = (self.remaining << 4) | u64::from(d);
                            self.count += 1;
                            Ok(Size)
                        }
                    }
                    _ if self.count == 0 => inv("missing chunk size"),
                    b'\r' => Ok(SizeLf),
                    b';' => {
                        self.count = 0;
                        Ok(Ext)
                    }
                    b' ' | b'\t' => Ok(SizeWs),
                    _ => inv("invalid chunk size"),
                },
                SizeWs => match b {
                    b' ' | b'\t' => Ok(SizeWs),
                    b';' => {
                        self.count = 0;
                        Ok(Ext)
                    }
                    _ => inv("invalid chunk size line"),
                },
                Ext => match b {
                    b'\r' => Ok(SizeLf),
                    b'\t' | b' '..=b'~' => {
                        self.count += 1;
                        if self.count > MAX_EXT_LEN {
                            inv("chunk extension too long")
                        } else {
                            Ok(Ext)
                        }
                    }
                    _ => inv("invalid byte in chunk extension"),
                },
                SizeLf => match b {
                    b'\n' => {
                        self.count = 0;
                        let size = self.remaining;
                        if size == 0 {
                            self.trailer_from = Some(i);
                            Ok(TrailerStart)
                        } else if size > self.max_body - self.total {
                            Err(ChunkError::TooLarge)
                        } else {
                            Ok(Data)
                        }
                    }
                    _ => inv("expected LF after chunk size"),
                },
                Data => unreachable!("handled above"),
                DataCr => match b {
                    b'\r' => Ok(DataLf),
                    _ => inv("expected CRLF after chunk data"),
                },
                DataLf => match b {
                    b'\n' => {
                        self.remaining = 0;
                        self.count = 0;
                        Ok(Size)
                    }
                    _ => inv("expected CRLF after chunk data"),
                },
                TrailerStart => match b {
                    b'\r' => Ok(FinalLf),
                    _ if is_tchar(b) => Ok(TrailerName),
                    b' ' | b'\t' => inv("obs-fold in trailer"),
                    _ => inv("invalid trailer field name"),
                },
                TrailerName => match b {
                    b':' => Ok(TrailerValue),
                    _ if is_tchar(b) => Ok(TrailerName),
                    _ => inv("invalid trailer field name"),
                },
                TrailerValue => match b {
                    b'\r' => Ok(TrailerLf),
                    b'\t' | b' '..=b'~' | 0x80..=0xff => Ok(TrailerValue),
                    _ => inv("invalid trailer field value"),
                },
                TrailerLf => match b {
                    b'\n' => Ok(TrailerStart),
                    _ => inv("expected LF in trailer"),
                },
                FinalLf => match b {
                    b'\n' => {
                        self.state = Done;
                        return Ok((i, true));
                    }
                    _ => inv("expected final LF"),
                },
                Done => return Ok((i - 1, true)),
                Failed => Err(self.error),
            };
            match step {
                Ok(s) => {
                    if matches!(s, TrailerName | TrailerValue | TrailerLf | FinalLf) {
                        self.count += 1;
                        if self.count > MAX_TRAILER_LEN {
                            return Err(self.fail(ChunkError::Invalid("trailer section too large")));
                        }
                    }
                    self.state = s;
                }
                Err(e) => return Err(self.fail(e)),
            }
        }
        match self.state {
            Failed => Err(self.error),
            s => Ok((i, s == Done)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_harmless_trailer_fields_pass() {
        let mut out = Vec::new();
        push_allowed_trailers(
            b"x-checksum: abc\r\nx-principal-id: admin\r\nX_User: a\r\nHost: evil\r\nContent-Length: 9\r\nAuthorization: x\r\nServer-Timing: db;dur=3\r\nX-Amz-Date: 1\r\nx-tenant: b\r\n\r\n",
            &mut out,
            &|n: &[u8]| n.eq_ignore_ascii_case(b"x-tenant"),
        );
        assert_eq!(out, b"x-checksum: abc\r\nServer-Timing: db;dur=3\r\n\r\n");
        let mut out = Vec::new();
        push_allowed_trailers(b"\r\n", &mut out, &|_| false);
        assert_eq!(out, b"\r\n");
    }

    #[test]
    fn trailers_are_left_out_whatever_the_splits() {
        let body =
            b"5;ext=1\r\nhello\r\n0\r\nx-principal-id: admin\r\nx-sum: 1\r\nHost: evil\r\n\r\nNEXT";
        for split in 0..body.len() {
            let mut d = ChunkedDecoder::new(1 << 20);
            let mut out = Vec::new();
            let mut after = Vec::new();
            let mut done = false;
            for p in [&body[..split], &body[split..]] {
                if done {
                    after.extend_from_slice(p);
                    continue;
                }
                let (used, fin, keep) = d.feed_without_trailers(p, |_| {}).unwrap();
                out.extend_from_slice(&p[..keep]);
                if fin {
                    d.push_trailers(&mut out);
                    after.extend_from_slice(&p[used..]);
                    done = true;
                }
            }
            assert!(done, "split {split}");
            assert_eq!(
                out, b"5;ext=1\r\nhello\r\n0\r\nx-sum: 1\r\n\r\n",
                "split {split}"
            );
            assert_eq!(after, b"NEXT", "split {split}");
        }
    }

    /// Feeds `input` in pieces at the given split points; returns payload,
    /// consumed, done.
    fn run(
        d: &mut ChunkedDecoder,
        input: &[u8],
        splits: &[usize],
    ) -> Result<(Vec<u8>, usize, bool), ChunkError> {
        let mut out = Vec::new();
        let mut consumed = 0;
        let mut start = 0;
        for &end in splits.iter().chain(std::iter::once(&input.len())) {
            let piece = &input[start..end];
            let (n, done) = d.feed(piece, |s| {
                assert!(!s.is_empty());
                out.extend_from_slice(s)
            })?;
            consumed += n;
            if done {
                return Ok((out, consumed, true));
            }
            assert_eq!(n, piece.len());
            start = end;
        }
        Ok((out, consumed, false))
    }

    const SAMPLE: &[u8] = b"5;name=val;q=\"a b\"\r\nhello\r\n\
        1A\r\nabcdefghijklmnopqrstuvwxyz\r\n\
        0000000000000003 ; x\r\n123\r\n\
        0;last\r\nX-Trailer: t1\r\nX-Empty:\r\n\r\n";
    const PAYLOAD: &[u8] = b"helloabcdefghijklmnopqrstuvwxyz123";

    #[test]
    fn whole_and_every_split() {
        let mut d = ChunkedDecoder::new(1 << 20);
        let mut input = SAMPLE.to_vec();
        input.extend_from_slice(b"GET /next HTTP/1.1\r\n");
        let (out, consumed, done) = run(&mut d, &input, &[]).unwrap();
        assert_eq!((&out[..], consumed, done), (PAYLOAD, SAMPLE.len(), true));
        assert_eq!(d.total(), PAYLOAD.len() as u64);
        assert!(d.is_done());
        assert_eq!(d.feed(b"more", |_| panic!()), Ok((0, true)));
        for a in 0..=input.len() {
            for b in a..=input.len() {
                d.reset();
                let r = run(&mut d, &input, &[a, b]).unwrap();
                assert_eq!(
                    (&r.0[..], r.1, r.2),
                    (PAYLOAD, SAMPLE.len(), true),
                    "{a} {b}"
                );
            }
        }
        // Byte at a time: never consumes beyond the end.
        d.reset();
        let splits: Vec<usize> = (1..input.len()).collect();
        let r = run(&mut d, &input, &splits).unwrap();
        assert_eq!((&r.0[..], r.1, r.2), (PAYLOAD, SAMPLE.len(), true));
    }

    #[test]
    fn bulk_data_spans() {
        let mut d = ChunkedDecoder::new(1 << 20);
        let mut calls = 0;
        let body = b"a\r\n0123456789\r\n0\r\n\r\n";
        let r = d.feed(body, |s| {
            calls += 1;
            assert_eq!(s, b"0123456789");
        });
        assert_eq!(r, Ok((body.len(), true)));
        assert_eq!(calls, 1);
    }

    #[test]
    fn partial_is_not_done() {
        for i in 0..SAMPLE.len() {
            let mut d = ChunkedDecoder::new(1 << 20);
            assert_eq!(d.feed(&SAMPLE[..i], |_| {}), Ok((i, false)), "{i}");
        }
    }

    fn err(input: &[u8], max: u64) -> ChunkError {
        let mut d = ChunkedDecoder::new(max);
        let e = run(&mut d, input, &[]).expect_err(&String::from_utf8_lossy(input));
        // Sticky.
        assert_eq!(d.feed(b"0\r\n\r\n", |_| {}), Err(e));
        e
    }

    #[test]
    fn rejects() {
        for bad in [
            &b"\r\n"[..],
            b"g\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b" 5\r\nhello\r\n0\r\n\r\n",
            b"+5\r\nhello\r\n0\r\n\r\n",
            b"-5\r\n",
            b"5 \r\nhello\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\rhello\r\n0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"5\r\nhello\r0\r\n\r\n",
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"5\r\nhello0\r\n\r\n",
            b"5;a\nb\r\nhello\r\n",
            b"5;a\0\r\nhello\r\n",
            b"5;a\x7f\r\nhello\r\n",
            b"5;\xff\r\nhello\r\n",
            b"10000000000000000\r\n",
            b"00000000000000005\r\n",
            b"0\r\n\n",
            b"0\r\n\r\r",
            b"0\r\nX: a\n\r\n",
            b"0\r\nX: a\r\n b\r\n\r\n",
            b"0\r\nX : a\r\n\r\n",
            b"0\r\nX\r\n\r\n",
            b"0\r\n:a\r\n\r\n",
            b"0\r\nX: a\0\r\n\r\n",
            b"0\r\nX: a\rb\r\n\r\n",
        ] {
            assert!(matches!(err(bad, 1 << 20), ChunkError::Invalid(_)));
        }
        let long_ext = [&b"1;"[..], &[b'a'; 5000], b"\r\nx\r\n0\r\n\r\n"].concat();
        assert!(matches!(err(&long_ext, 100), ChunkError::Invalid(_)));
        let long_trailer = [&b"0\r\nX: "[..], &[b'a'; 20000], b"\r\n\r\n"].concat();
        assert!(matches!(err(&long_trailer, 100), ChunkError::Invalid(_)));
    }

    #[test]
    fn max_sizes() {
        // 16 digits are fine as a format, but too large for max_body.
        assert_eq!(
            err(b"ffffffffffffffff\r\n", u64::MAX - 1),
            ChunkError::TooLarge
        );
        let mut d = ChunkedDecoder::new(u64::MAX);
        assert_eq!(d.feed(b"ffffffffffffffff\r\nab", |_| {}), Ok((20, false)));
        assert_eq!(d.total(), 2);
        // Limit across chunks: exactly max is fine, one more is not.
        let mut d = ChunkedDecoder::new(10);
        let r = run(&mut d, b"5\r\n12345\r\n5\r\n12345\r\n0\r\n\r\n", &[]);
        assert!(r.unwrap().2);
        assert_eq!(err(b"5\r\n12345\r\n6\r\n", 10), ChunkError::TooLarge);
    }

    #[test]
    fn empty_body_and_ws_before_ext() {
        let mut d = ChunkedDecoder::new(0);
        assert_eq!(d.feed(b"0\r\n\r\nrest", |_| panic!()), Ok((5, true)));
        let mut d = ChunkedDecoder::new(10);
        let r = run(&mut d, b"3\t ;e\r\nabc\r\n0 ;z=1\r\n\r\n", &[]).unwrap();
        assert_eq!(r, (b"abc".to_vec(), 22, true));
        assert_eq!(d.feed(b"", |_| {}), Ok((0, true)));
        let mut d = ChunkedDecoder::new(10);
        assert_eq!(d.feed(b"", |_| {}), Ok((0, false)));
    }
}
