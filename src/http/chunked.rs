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
    /// The trailer section has more fields or bytes than [`ChunkedDecoder::limit_trailers`]
    /// allows (the head limits: a request gets 431, as for its head).
    TrailersTooLarge,
}

impl fmt::Display for ChunkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChunkError::Invalid(r) => write!(f, "invalid chunked body: {r}"),
            ChunkError::TooLarge => f.write_str("chunked body too large"),
            ChunkError::TrailersTooLarge => f.write_str("trailer section too large"),
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
    /// After a `;` of the chunk extensions: BWS, then a name's first character.
    Ext,
    /// Inside an extension's name.
    ExtName,
    /// BWS after an extension's name: `=`, `;` or the end of the line next.
    ExtAfterName,
    /// After `=`: BWS, then a token or a quoted string.
    ExtValueStart,
    /// Inside an extension's token value.
    ExtToken,
    /// Inside an extension's quoted-string value.
    ExtQuoted,
    /// After `\` in a quoted-string value.
    ExtQuotedPair,
    /// After an extension's value: BWS, then `;` or the end of the line.
    ExtAfterValue,
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
    /// Bytes of chunk extensions so far: they are relayed too, so they count toward
    /// `max_body` with the payload (else tiny chunks with long extensions would carry far
    /// more than the limit to the upstream).
    ext_bytes: u64,
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
    /// Where, in the input of the last [`ChunkedDecoder::feed`], the current chunk-size line
    /// began (`None`: in an earlier input).
    line_from: Option<usize>,
    /// Where, in that input, the last-chunk line (`0...CRLF`) began, when it began there.
    last_chunk_from: Option<usize>,
    /// Whether [`ChunkedDecoder::feed_without_trailers`] held the last-chunk line back: it
    /// goes out with the trailer section, so a section refused later does not follow a
    /// last chunk the recipient already has (a cut body must not look complete).
    last_chunk_held: bool,
    /// Most bytes and fields in the trailer section.
    max_trailer_bytes: u32,
    max_trailer_fields: u32,
    /// Fields seen in the trailer section.
    trailer_fields: u32,
}

/// The next state inside a chunk-size line's extensions after byte `b`.
fn ext_step(state: State, b: u8) -> Result<State, ChunkError> {
    use State::*;
    let ws = b == b' ' || b == b'\t';
    let next = match (state, b) {
        (Ext, _) if ws => Ext,
        (Ext, _) if is_tchar(b) => ExtName,
        (ExtName, _) if is_tchar(b) => ExtName,
        (ExtName | ExtAfterName, _) if ws => ExtAfterName,
        (ExtName | ExtAfterName, b'=') => ExtValueStart,
        (ExtName | ExtAfterName | ExtToken | ExtAfterValue, b';') => Ext,
        (ExtName | ExtAfterName | ExtToken | ExtAfterValue, b'\r') => SizeLf,
        (ExtValueStart, _) if ws => ExtValueStart,
        (ExtValueStart, b'"') => ExtQuoted,
        (ExtValueStart | ExtToken, _) if is_tchar(b) => ExtToken,
        (ExtToken | ExtAfterValue, _) if ws => ExtAfterValue,
        (ExtQuoted, b'"') => ExtAfterValue,
        (ExtQuoted, b'\\') => ExtQuotedPair,
        (ExtQuoted | ExtQuotedPair, b'\t' | b' '..=b'~') => ExtQuoted,
        _ => return Err(ChunkError::Invalid("invalid chunk extension")),
    };
    Ok(next)
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
            ext_bytes: 0,
            remaining: 0,
            count: 0,
            error: ChunkError::Invalid("unused"),
            trailer_from: None,
            trailers: Vec::new(),
            denied: Vec::new(),
            line_from: None,
            last_chunk_from: None,
            last_chunk_held: false,
            max_trailer_bytes: MAX_TRAILER_LEN,
            max_trailer_fields: u32::MAX,
            trailer_fields: 0,
        }
    }

    /// Limits the trailer section to `max_bytes` (at most the built-in 16 KiB) and
    /// `max_fields` fields: past either, [`ChunkError::TrailersTooLarge`]. Kept by `reset`.
    pub fn limit_trailers(&mut self, max_bytes: usize, max_fields: usize) {
        self.max_trailer_bytes = max_bytes.min(MAX_TRAILER_LEN as usize) as u32;
        self.max_trailer_fields = u32::try_from(max_fields).unwrap_or(u32::MAX);
    }

    /// Trailer names to leave out besides the fixed ones: those the request's route checked
    /// or set (its mapping's headers, its authorizer's identity headers, WAF header targets).
    pub fn deny(&mut self, names: impl IntoIterator<Item = Box<[u8]>>) {
        self.denied.extend(names);
    }

    /// Prepares for a new body (same `max_body`).
    pub fn reset(&mut self) {
        let (bytes, fields) = (self.max_trailer_bytes, self.max_trailer_fields);
        *self = ChunkedDecoder::new(self.max_body);
        self.max_trailer_bytes = bytes;
        self.max_trailer_fields = fields;
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
    /// `input[..keep]` goes on unchanged, `input[keep..consumed]` is the last-chunk line and
    /// trailer section, which [`ChunkedDecoder::push_trailers`] writes once done.
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
        let (keep, section_from) = match (in_trailers, self.trailer_from) {
            (true, _) => (0, 0),
            (false, None) => (used, used),
            (false, Some(t)) => {
                // The last-chunk line goes out with the section (when it began in this input;
                // split across two reads, its first bytes are already gone).
                self.last_chunk_held = self.last_chunk_from.is_some();
                (self.last_chunk_from.unwrap_or(t), t)
            }
        };
        // Bounded: the decoder refuses a trailer section past its limit.
        self.trailers.extend_from_slice(&input[section_from..used]);
        Ok((used, done, keep))
    }

    /// Whether the trailer section collected by [`ChunkedDecoder::feed_without_trailers`] holds
    /// a field (before [`ChunkedDecoder::push_trailers`] takes it).
    pub fn has_trailer_fields(&self) -> bool {
        self.trailers.contains(&b':')
    }

    /// Once done: appends the last-chunk line when it was held back (as `0` CRLF: its
    /// extensions are dropped), the trailer section's fields that may be passed on, then the
    /// final CRLF ([`push_allowed_trailers`]).
    pub fn push_trailers(&mut self, out: &mut Vec<u8>) {
        if std::mem::take(&mut self.last_chunk_held) {
            out.extend_from_slice(b"0\r\n");
        }
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
        self.last_chunk_from = None;
        // A size line begins here when the last input ended right after the previous one.
        self.line_from = (self.state == State::Size && self.count == 0).then_some(0);
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
                // RFC 9112 7.1.1: chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS value ] ),
                // value = token / quoted-string. Extensions are relayed as they came, so one
                // that another parser could end elsewhere (an unclosed quote, a bare `=`) is
                // refused rather than passed on. No obs-text, not even quoted.
                Ext | ExtName | ExtAfterName | ExtValueStart | ExtToken | ExtQuoted
                | ExtQuotedPair | ExtAfterValue => {
                    self.count += 1;
                    self.ext_bytes += 1;
                    if self.count > MAX_EXT_LEN {
                        inv("chunk extension too long")
                    } else if self.total + self.ext_bytes > self.max_body {
                        Err(ChunkError::TooLarge)
                    } else {
                        ext_step(self.state, b)
                    }
                }
                SizeLf => match b {
                    b'\n' => {
                        self.count = 0;
                        let size = self.remaining;
                        if size == 0 {
                            self.trailer_from = Some(i);
                            self.last_chunk_from = self.line_from;
                            Ok(TrailerStart)
                        } else if size > self.max_body - self.total - self.ext_bytes {
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
                        self.line_from = Some(i);
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
                    b'\n' => {
                        self.trailer_fields += 1;
                        if self.trailer_fields > self.max_trailer_fields {
                            Err(ChunkError::TrailersTooLarge)
                        } else {
                            Ok(TrailerStart)
                        }
                    }
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
                        if self.count > self.max_trailer_bytes {
                            return Err(self.fail(ChunkError::TrailersTooLarge));
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
            // Extensions outside the grammar (RFC 9112 7.1.1).
            b"3;\r\nabc\r\n0\r\n\r\n",
            b"3;a=\"x\r\nabc\r\n0\r\n\r\n",
            b"3;a=\"x\\\"\r\nabc\r\n0\r\n\r\n",
            b"3;a=b c\r\nabc\r\n0\r\n\r\n",
            b"3;;;\r\nabc\r\n0\r\n\r\n",
            b"3;=\r\nabc\r\n0\r\n\r\n",
            b"3;\"\r\nabc\r\n0\r\n\r\n",
            b"3;a=\r\nabc\r\n0\r\n\r\n",
            b"3;a=\"\xff\"\r\nabc\r\n0\r\n\r\n",
            b"3;a=b\"c\r\nabc\r\n0\r\n\r\n",
            b"3;a b\r\nabc\r\n0\r\n\r\n",
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
        assert!(matches!(err(&long_ext, 1 << 20), ChunkError::Invalid(_)));
        let long_trailer = [&b"0\r\nX: "[..], &[b'a'; 20000], b"\r\n\r\n"].concat();
        assert_eq!(err(&long_trailer, 100), ChunkError::TrailersTooLarge);
    }

    #[test]
    fn trailer_limits_count_fields_and_bytes_and_survive_reset() {
        let mut d = ChunkedDecoder::new(100);
        d.limit_trailers(64, 2);
        let two = b"0\r\na: 1\r\nb: 2\r\n\r\n";
        assert_eq!(d.feed(two, |_| {}), Ok((two.len(), true)));
        d.reset();
        let three = b"0\r\na: 1\r\nb: 2\r\nc: 3\r\n\r\n";
        assert_eq!(d.feed(three, |_| {}), Err(ChunkError::TrailersTooLarge));
        d.reset();
        let long = [&b"0\r\na: "[..], &[b'v'; 70], b"\r\n\r\n"].concat();
        assert_eq!(d.feed(&long, |_| {}), Err(ChunkError::TrailersTooLarge));
        // The built-in 16 KiB stays the most.
        d.limit_trailers(1 << 20, 1000);
        d.reset();
        let long = [&b"0\r\na: "[..], &[b'v'; 17000], b"\r\n\r\n"].concat();
        assert_eq!(d.feed(&long, |_| {}), Err(ChunkError::TrailersTooLarge));
    }

    #[test]
    fn the_last_chunk_line_goes_out_only_with_a_whole_trailer_section() {
        let body = b"5\r\nhello\r\n0;e=1\r\nx-sum: 1\r\n\r\n";
        for split in 0..=body.len() {
            let mut d = ChunkedDecoder::new(100);
            let mut out = Vec::new();
            for p in [&body[..split], &body[split..]] {
                let (_, fin, keep) = d.feed_without_trailers(p, |_| {}).unwrap();
                out.extend_from_slice(&p[..keep]);
                if fin {
                    d.push_trailers(&mut out);
                    break;
                }
            }
            // Held back and written as `0` CRLF, unless a read ended inside that line.
            let want: &[u8] = if (11..17).contains(&split) {
                b"5\r\nhello\r\n0;e=1\r\nx-sum: 1\r\n\r\n"
            } else {
                b"5\r\nhello\r\n0\r\nx-sum: 1\r\n\r\n"
            };
            assert_eq!(
                out,
                want,
                "split {split}: {}",
                String::from_utf8_lossy(&out)
            );
        }
        // A trailer section refused: what went on has no last chunk, so it reads as cut.
        let mut d = ChunkedDecoder::new(100);
        d.limit_trailers(16, 10);
        let cut = b"5\r\nhello\r\n0\r\nx-long: 0123456789abcdef\r\n\r\n";
        let mut d2 = d.clone();
        assert_eq!(
            d.feed_without_trailers(&cut[..14], |_| {}),
            Ok((14, false, 10))
        );
        assert_eq!(
            d2.feed_without_trailers(cut, |_| {}),
            Err(ChunkError::TrailersTooLarge)
        );
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
        // Extensions are relayed too: they count with the payload, so one-byte chunks with
        // long extensions cannot carry far more than the limit.
        let ext = b"1;name=vvvvvvvvvvvvvvvvvvvv\r\nA\r\n".repeat(10);
        assert_eq!(err(&ext, 100), ChunkError::TooLarge);
        let mut d = ChunkedDecoder::new(300);
        assert!(
            run(&mut d, &[&ext[..], b"0\r\n\r\n"].concat(), &[])
                .unwrap()
                .2
        );
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

    #[test]
    fn extensions_within_the_grammar_pass_whatever_the_splits() {
        for ext in [
            &b";a"[..],
            b"; a ; b",
            b";a=1;b=tok-en",
            b";a = 1 ",
            b";name=\"quoted ; \\\" = value\"",
            b";q=\"\";r",
            b" ;a=\"x\" ;b",
        ] {
            let input = [&b"3"[..], ext, b"\r\nabc\r\n0\r\n\r\n"].concat();
            let mut d = ChunkedDecoder::new(64);
            let r = run(&mut d, &input, &[]);
            assert_eq!(
                r,
                Ok((b"abc".to_vec(), input.len(), true)),
                "{}",
                String::from_utf8_lossy(ext)
            );
            for at in 1..input.len() {
                let mut d = ChunkedDecoder::new(64);
                let r = run(&mut d, &input, &[at]);
                assert_eq!(r, Ok((b"abc".to_vec(), input.len(), true)), "split at {at}");
            }
        }
    }
}
