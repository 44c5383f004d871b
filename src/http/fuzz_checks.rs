//! Invariant checks shared by the cargo-fuzz targets (`fuzz/`) and by the
//! randomized unit tests below. Each function panics if an invariant of the
//! parsers is violated for the given input. Not part of the stable API.

use super::{
    list_items, ChunkError, ChunkedDecoder, HeaderKind, HttpError, Limits, Method, RequestHead,
    RespBody, ResponseHead, Status,
};

/// Small xorshift64 generator (deterministic, no dependencies).
#[derive(Clone, Debug)]
pub struct XorShift(pub u64);

impl XorShift {
    /// Next pseudo-random value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0.max(1);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform-ish value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

fn in_head(r: (u32, u32), head_len: usize) {
    assert!(
        r.0 <= r.1 && r.1 as usize <= head_len,
        "{r:?} vs {head_len}"
    );
}

/// Feeds `data` to the request (and response) head parsers; checks that
/// they never panic, that results are consistent with the limits, that all
/// offsets lie inside the head, and that every truncation of a complete head
/// is `Partial`.
pub fn request_parser(data: &[u8]) {
    let limits = Limits {
        max_header_bytes: 4096,
        max_headers: 32,
    };
    let mut head = RequestHead::new(limits.max_headers);
    match head.parse(data, &limits) {
        Ok(Status::Complete(n)) => {
            assert!(n <= data.len() && n <= limits.max_header_bytes);
            assert_eq!(n, head.head_len);
            assert!(super::crlf_only(&data[..n]), "bare CR/LF accepted");
            assert!(head.headers.len() <= limits.max_headers);
            for r in [head.method_range, head.target, head.path] {
                in_head(r, n);
            }
            // Origin-form: the path starts the target. Absolute-form: it lies within it (an
            // empty path is the `/` of `://`).
            assert!(head.target.0 <= head.path.0 && head.path.1 <= head.target.1);
            for r in head.query.iter().chain(head.host.iter()) {
                in_head(*r, n);
            }
            for h in &head.headers {
                in_head(h.name, n);
                in_head(h.value, n);
                assert!(h.name.0 < h.name.1);
            }
            assert!(!head.slice(data, head.path).is_empty());
            let _ = head.header(data, "host");
            let fwd = head.forwardable(data).count();
            assert!(fwd <= head.headers.len());
            if head.minor_version == 1 {
                assert!(head.host.is_some());
            }
            // Same answer from exactly the head, Partial from any prefix.
            let mut again = RequestHead::new(4);
            assert_eq!(again.parse(&data[..n], &limits), Ok(Status::Complete(n)));
            assert_eq!(again.headers, head.headers);
            let step = (n / 64).max(1);
            for i in (0..n).step_by(step) {
                assert_eq!(
                    again.parse(&data[..i], &limits),
                    Ok(Status::Partial),
                    "prefix {i}"
                );
            }
            normalized_path(data, &head);
        }
        Ok(Status::Partial) => assert!(data.len() < limits.max_header_bytes),
        Err(HttpError::HeadTooLarge) => assert!(data.len() >= limits.max_header_bytes),
        Err(e) => assert!(matches!(e.status(), 400 | 431 | 505)),
    }
    let mut resp = ResponseHead::new(limits.max_headers);
    if let Ok(Status::Complete(n)) = resp.parse(data, Method::Get, &limits) {
        assert!(n <= data.len());
        for h in &resp.headers {
            in_head(h.name, n);
            in_head(h.value, n);
        }
        let _ = resp.forwardable(data).count();
    }
}

/// Feeds `data[1..]` to the response head parser as an answer to a request whose method (and
/// limits) `data[0]` picks. Checks, beyond not panicking: a complete head is what
/// `head_len` says, ends with an empty line, holds only CRLF line ends, and parses alike
/// alone and in a longer buffer; every shorter prefix is `Partial`; the body framing is the
/// one RFC 9112 6.3 gives (none for HEAD, 1xx, 204 and 304; chunked only when the last
/// coding is; a length only without Transfer-Encoding and equal to every Content-Length; a
/// connection that cannot be reused when the framing is by close or ambiguous); and
/// nothing forwardable is hop-by-hop, a length, or named in `Connection`.
pub fn response_parser(data: &[u8]) {
    let Some((&sel, data)) = data.split_first() else {
        return;
    };
    let method = [Method::Get, Method::Head, Method::Post, Method::Other][(sel & 3) as usize];
    let limits = Limits {
        max_header_bytes: 256 + ((sel >> 2) as usize) * 64,
        max_headers: 1 + (sel >> 4) as usize * 4,
    };
    let mut resp = ResponseHead::new(limits.max_headers);
    let n = match resp.parse(data, method, &limits) {
        Ok(Status::Complete(n)) => n,
        Ok(Status::Partial) => {
            assert!(data.len() < limits.max_header_bytes);
            return;
        }
        Err(HttpError::HeadTooLarge) => {
            assert!(data.len() >= limits.max_header_bytes);
            return;
        }
        Err(_) => return,
    };
    assert_eq!(n, resp.head_len);
    assert!(n <= data.len() && n <= limits.max_header_bytes);
    assert!(data[..n].ends_with(b"\r\n\r\n"), "{:?}", &data[..n]);
    assert!(super::crlf_only(&data[..n]));
    assert!((100..=999).contains(&resp.status), "{}", resp.status);
    assert!(resp.headers.len() <= limits.max_headers);
    for h in &resp.headers {
        in_head(h.name, n);
        in_head(h.value, n);
    }
    // The head alone parses alike, and no prefix of it is complete (or an error).
    let mut alone = ResponseHead::new(limits.max_headers);
    assert_eq!(
        alone.parse(&data[..n], method, &limits),
        Ok(Status::Complete(n))
    );
    assert_eq!(
        (
            alone.status,
            alone.body,
            alone.keep_alive,
            alone.headers.len()
        ),
        (resp.status, resp.body, resp.keep_alive, resp.headers.len())
    );
    for k in [n - 1, n / 2, n.saturating_sub(3)] {
        assert_eq!(
            alone.parse(&data[..k], method, &limits),
            Ok(Status::Partial),
            "prefix {k} of {n}"
        );
    }
    // Framing.
    let values = |kind: HeaderKind| {
        resp.headers
            .iter()
            .filter(move |h| h.kind == kind)
            .map(|h| resp.slice(data, h.value))
    };
    let te: Vec<&[u8]> = values(HeaderKind::TransferEncoding)
        .flat_map(list_items)
        .collect();
    let has_cl = values(HeaderKind::ContentLength).next().is_some();
    let bodyless = method == Method::Head
        || (100..200).contains(&resp.status)
        || resp.status == 204
        || resp.status == 304;
    match resp.body {
        RespBody::None => assert!(bodyless),
        RespBody::Chunked => {
            assert!(!bodyless);
            assert!(te
                .last()
                .is_some_and(|c| c.eq_ignore_ascii_case(b"chunked")));
            assert_eq!(
                te.iter()
                    .filter(|c| c.eq_ignore_ascii_case(b"chunked"))
                    .count(),
                1
            );
            if has_cl {
                assert!(!resp.keep_alive, "Content-Length with chunked kept alive");
            }
        }
        RespBody::Length(len) => {
            assert!(!bodyless && te.is_empty() && has_cl);
            for v in values(HeaderKind::ContentLength) {
                for item in v.split(|&b| b == b',') {
                    assert_eq!(
                        std::str::from_utf8(item.trim_ascii())
                            .ok()
                            .and_then(|t| t.parse().ok()),
                        Some(len)
                    );
                }
            }
        }
        RespBody::UntilClose => {
            assert!(!bodyless);
            assert!(
                !resp.keep_alive,
                "a body delimited by close on a reused connection"
            );
        }
    }
    if resp.minor_version == 0 && resp.keep_alive {
        assert!(values(HeaderKind::Connection)
            .flat_map(list_items)
            .any(|t| t.eq_ignore_ascii_case(b"keep-alive")));
    }
    let named: Vec<Vec<u8>> = values(HeaderKind::Connection)
        .flat_map(list_items)
        .map(|t| t.to_ascii_lowercase())
        .collect();
    for (kind, name, _) in resp.forwardable_kinds(data) {
        assert!(!kind.is_hop_by_hop() && kind != HeaderKind::ContentLength);
        assert!(!named.contains(&name.to_ascii_lowercase()), "{name:?}");
    }
}

/// [`RequestHead::normalize_path`] on a parsed head: the path only shrinks, keeps its first
/// byte, has no `//`, no encoding of a character the normal form holds raw and no lower-case
/// hex left, holds no byte that must be encoded, normalizing again changes nothing, and no
/// byte outside the path moves.
fn normalized_path(data: &[u8], head: &RequestHead) {
    let mut buf = data.to_vec();
    let mut h = head.clone();
    let before = h.path;
    h.normalize_path(&mut buf);
    assert_eq!(h.path.0, before.0);
    assert!(h.path.1 <= before.1);
    let p = h.slice(&buf, h.path).to_vec();
    assert_eq!(p.first(), data.get(before.0 as usize));
    if p.first() == Some(&b'/') {
        assert!(!p.windows(2).any(|w| w == b"//"), "{p:?}");
        for w in p.windows(3) {
            if w[0] == b'%' {
                let v = |b: u8| (b as char).to_digit(16);
                if let (Some(a), Some(b)) = (v(w[1]), v(w[2])) {
                    let c = (a * 16 + b) as u8;
                    // No encoding of a character the normal form holds raw, and upper-case
                    // hex digits in the others.
                    assert!(!super::request::decoded_in_normal_form(c), "{p:?}");
                    assert!(
                        !w[1].is_ascii_lowercase() && !w[2].is_ascii_lowercase(),
                        "{p:?}"
                    );
                }
            }
        }
        // An accepted path holds no byte that must be percent-encoded.
        assert!(
            !p.iter().any(|&b| b >= 0x80 || b"\"<>`{}".contains(&b)),
            "{p:?}"
        );
    }
    assert_eq!(&buf[..before.0 as usize], &data[..before.0 as usize]);
    assert_eq!(&buf[before.1 as usize..], &data[before.1 as usize..]);
    let mut again = h.clone();
    again.path_dirty = true;
    again.normalize_path(&mut buf);
    assert_eq!(again.slice(&buf, again.path), &p[..]);
}

#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    data: Vec<u8>,
    consumed: usize,
    done: bool,
    err: Option<ChunkError>,
    total: u64,
}

fn decode(input: &[u8], max_body: u64, pieces: &mut dyn Iterator<Item = usize>) -> Outcome {
    let mut d = ChunkedDecoder::new(max_body);
    let mut out = Outcome {
        data: Vec::new(),
        consumed: 0,
        done: false,
        err: None,
        total: 0,
    };
    let mut pos = 0;
    loop {
        let len = pieces.next().unwrap_or(usize::MAX).min(input.len() - pos);
        let piece = &input[pos..pos + len];
        match d.feed(piece, |s| {
            assert!(!s.is_empty(), "empty on_data span");
            out.data.extend_from_slice(s);
        }) {
            Ok((n, done)) => {
                assert!(n <= piece.len());
                out.consumed += n;
                if done {
                    out.done = true;
                    // Finished decoders consume nothing more.
                    assert_eq!(
                        d.feed(b"0\r\n\r\n", |_| panic!("data after done")),
                        Ok((0, true))
                    );
                    break;
                }
                assert_eq!(n, piece.len(), "unfinished decoder left input unconsumed");
            }
            Err(e) => {
                // Errors are sticky.
                assert_eq!(d.feed(b"0\r\n\r\n", |_| panic!("data after error")), Err(e));
                out.err = Some(e);
                // How much was consumed is unspecified on error.
                out.consumed = 0;
                break;
            }
        }
        pos += len;
        if pos == input.len() {
            break;
        }
    }
    out.total = d.total();
    out
}

/// Relays `input` as the proxy does ([`ChunkedDecoder::feed_without_trailers`], pieces from
/// `pieces`): the bytes passed on, and whether the body ended (or how it failed).
fn relay(
    input: &[u8],
    max_body: u64,
    trailer_limits: Option<(usize, usize)>,
    pieces: &mut dyn Iterator<Item = usize>,
) -> (Vec<u8>, Result<bool, ChunkError>) {
    let mut d = ChunkedDecoder::new(max_body);
    if let Some((bytes, fields)) = trailer_limits {
        d.limit_trailers(bytes, fields);
    }
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let len = pieces.next().unwrap_or(usize::MAX).min(input.len() - pos);
        let piece = &input[pos..pos + len];
        match d.feed_without_trailers(piece, |_| {}) {
            Ok((_, done, keep)) => {
                out.extend_from_slice(&piece[..keep]);
                if done {
                    d.push_trailers(&mut out);
                    return (out, Ok(true));
                }
            }
            Err(e) => return (out, Err(e)),
        }
        pos += len;
        if pos == input.len() {
            return (out, Ok(false));
        }
    }
}

/// Decodes `data[2..]` in one piece and in pieces whose sizes come from a
/// generator seeded by `data[..2]`; both must give the same payload,
/// consumed count, completion and error. Also checks `total()` and the
/// `max_body` limit.
pub fn chunked_decoder(data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let seed = u64::from(data[0]) | u64::from(data[1]) << 8;
    let input = &data[2..];
    let max_body = if seed & 1 == 1 { 64 } else { 1 << 20 };
    let whole = decode(input, max_body, &mut std::iter::empty());
    let mut rng = XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let small = seed & 2 == 2;
    let mut sizes = std::iter::from_fn(|| {
        Some(if small {
            rng.below(4) as usize
        } else {
            rng.below(40) as usize
        })
    });
    let pieces = decode(input, max_body, &mut sizes);
    assert_eq!(whole, pieces);
    assert!(whole.total <= max_body);
    if whole.err.is_none() {
        assert_eq!(whole.total, whole.data.len() as u64);
    }
    if whole.done {
        // The consumed prefix alone is a complete body.
        let again = decode(&input[..whole.consumed], max_body, &mut std::iter::empty());
        assert_eq!(again, whole);
    }
    // Relayed as the proxy does, in pieces: a body that ended goes on as a complete body
    // with the same payload; one that failed never goes on looking complete.
    let limits = (seed & 4 == 4).then_some((64, 2));
    let mut rng = XorShift(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
    let mut sizes = std::iter::from_fn(|| Some(rng.below(if small { 4 } else { 40 }) as usize));
    let (relayed, end) = relay(input, max_body, limits, &mut sizes);
    let again = decode(&relayed, u64::MAX, &mut std::iter::empty());
    match end {
        Ok(true) => {
            assert!(again.done && again.err.is_none(), "{again:?}");
            assert_eq!(again.consumed, relayed.len());
            if limits.is_none() {
                assert!(whole.done);
                assert_eq!(again.data, whole.data);
            }
        }
        Ok(false) | Err(_) => assert!(!again.done, "an unfinished body relayed as complete"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQ_SEEDS: &[&[u8]] = &[
        b"GET /a/b?c=d HTTP/1.1\r\nHost: example.com\r\nConnection: x, close\r\nX: 1\r\n\r\n",
        b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello",
        b"PUT /p HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"OPTIONS * HTTP/1.0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nok",
    ];

    const RESP_SEEDS: &[&[u8]] = &[
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: x-hop\r\nX-Hop: 1\r\nDate: d\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1, 1\r\n\r\nx",
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\nKeep-Alive: timeout=5\r\n\r\n",
        b"HTTP/1.1 599 Odd\r\nUpgrade: h2c\r\nConnection: close, upgrade\r\n\r\n",
    ];

    const CHUNK_SEEDS: &[&[u8]] = &[
        b"5;a=b\r\nhello\r\n1a\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-T: v\r\n\r\nNEXT",
        b"3 ;x\r\nabc\r\n0\r\n\r\n",
        b"40\r\n0123456789012345678901234567890123456789012345678901234567890123\r\n0\r\n\r\n",
        b"41\r\n01234567890123456789012345678901234567890123456789012345678901234\r\n0\r\n\r\n",
    ];

    /// Random edits of a seed: byte flips, special-byte insertions,
    /// deletions, duplications, truncation.
    fn mutate(rng: &mut XorShift, seed: &[u8]) -> Vec<u8> {
        const SPECIAL: &[u8] = b"\r\n\0 \t:;,0fF/.%?#=\x7f\xff";
        let mut v = seed.to_vec();
        for _ in 0..=rng.below(4) {
            let at = if v.is_empty() {
                0
            } else {
                rng.below(v.len() as u64) as usize
            };
            match rng.below(6) {
                0 if !v.is_empty() => v[at] = rng.next_u64() as u8,
                1 => v.insert(at, SPECIAL[rng.below(SPECIAL.len() as u64) as usize]),
                2 if !v.is_empty() => {
                    v.remove(at);
                }
                3 if !v.is_empty() => {
                    let end = (at + 1 + rng.below(8) as usize).min(v.len());
                    let dup = v[at..end].to_vec();
                    v.splice(at..at, dup);
                }
                4 => v.truncate(at),
                _ => {}
            }
        }
        v
    }

    #[test]
    fn randomized_request_parser() {
        let mut rng = XorShift(0x1234_5678);
        for s in REQ_SEEDS {
            request_parser(s);
        }
        for _ in 0..20_000 {
            let seed = REQ_SEEDS[rng.below(REQ_SEEDS.len() as u64) as usize];
            request_parser(&mutate(&mut rng, seed));
        }
        // Pure noise, including long inputs hitting the size limit.
        for _ in 0..200 {
            let len = rng.below(6000) as usize;
            let v: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            request_parser(&v);
        }
    }

    #[test]
    fn randomized_response_parser() {
        let mut rng = XorShift(0x5eed_0f4e);
        let mut complete = 0;
        for _ in 0..40_000 {
            let seed = RESP_SEEDS[rng.below(RESP_SEEDS.len() as u64) as usize];
            let sel = rng.next_u64() as u8;
            let v = [&[sel][..], &mutate(&mut rng, seed)].concat();
            response_parser(&v);
            let lim = Limits {
                max_header_bytes: 256 + ((sel >> 2) as usize) * 64,
                max_headers: 1 + (sel >> 4) as usize * 4,
            };
            if let Ok(Status::Complete(_)) = ResponseHead::new(64).parse(&v[1..], Method::Get, &lim)
            {
                complete += 1;
            }
        }
        // The mutations keep a fair share of heads valid, so the checks on them run.
        assert!(complete > 5000, "{complete}");
    }

    #[test]
    fn randomized_chunked_decoder() {
        let mut rng = XorShift(0x9876_5432);
        for s in CHUNK_SEEDS {
            for prefix in [[0u8, 0], [1, 0], [2, 7], [3, 9]] {
                chunked_decoder(&[&prefix[..], s].concat());
            }
        }
        let mut done = 0;
        for _ in 0..20_000 {
            let seed = CHUNK_SEEDS[rng.below(CHUNK_SEEDS.len() as u64) as usize];
            let mut v = vec![rng.next_u64() as u8, rng.next_u64() as u8];
            v.extend_from_slice(&mutate(&mut rng, seed));
            chunked_decoder(&v);
            let mut d = ChunkedDecoder::new(1 << 20);
            if let Ok((_, true)) = d.feed(&v[2..], |_| {}) {
                done += 1;
            }
        }
        // The mutations keep a fair share of inputs valid.
        assert!(done > 1000, "{done}");
    }
}
