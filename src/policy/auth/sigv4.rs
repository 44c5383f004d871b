//! AWS Signature Version 4 verification (`auth = "sigv4"`), in both forms: the
//! `Authorization: AWS4-HMAC-SHA256 Credential=..., SignedHeaders=..., Signature=...` header and
//! the presigned query (`X-Amz-Algorithm`, `X-Amz-Credential`, `X-Amz-Date`, `X-Amz-Expires`,
//! `X-Amz-SignedHeaders`, `X-Amz-Signature`).
//!
//! The canonical request is rebuilt from what arrived (method, path, query, the signed headers,
//! the payload hash) and signed with the credential's derived key (HMAC-SHA256 chain, cached
//! per worker per day); signatures are compared in constant time. `x-amz-date` must be within
//! 15 minutes of now; `host` must be signed. The payload hash is the SHA-256 of the body, or
//! `x-amz-content-sha256` when sent (`UNSIGNED-PAYLOAD` allowed; any other value must match the
//! body). No signature at all is 401; a wrong or stale one is 403.

use super::api_key::hex;
use super::{header_safe, now_unix, Deny, RawSigV4Credential, Request, WorkerAuth};
use super::{FORBIDDEN, UNAUTHORIZED};
use crate::config::{ConfigError, Source};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::sync::Arc;

type HmacSha256 = Hmac<Sha256>;

/// Largest clock difference accepted for `x-amz-date`.
pub const MAX_SKEW_S: u64 = 15 * 60;
/// Longest `X-Amz-Expires` of a presigned request (7 days, as AWS).
pub const MAX_EXPIRES_S: u64 = 7 * 24 * 3600;
const ALGO: &str = "AWS4-HMAC-SHA256";

/// One `[[sigv4_credentials]]` entry.
pub struct SigV4Credential {
    pub access_key: String,
    /// `"AWS4" + secret_key`, the first HMAC key of the derivation.
    k_secret: Box<[u8]>,
    pub region: String,
    pub service: String,
    pub principal: Arc<str>,
}

impl std::fmt::Debug for SigV4Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigV4Credential")
            .field("access_key", &self.access_key)
            .field("region", &self.region)
            .field("service", &self.service)
            .field("principal", &self.principal)
            .finish_non_exhaustive()
    }
}

impl SigV4Credential {
    /// A credential (for tests and benches; the config goes through `validate`).
    pub fn new(
        access_key: &str,
        secret: &str,
        region: &str,
        service: &str,
        principal: &str,
    ) -> Self {
        SigV4Credential {
            access_key: access_key.into(),
            k_secret: format!("AWS4{secret}").into_bytes().into(),
            region: region.into(),
            service: service.into(),
            principal: principal.into(),
        }
    }

    fn signing_key(&self, date: &[u8]) -> [u8; 32] {
        let k = hmac(&self.k_secret, date);
        let k = hmac(&k, self.region.as_bytes());
        let k = hmac(&k, self.service.as_bytes());
        hmac(&k, b"aws4_request")
    }
}

pub(super) fn validate(
    src: &Source,
    i: usize,
    c: &RawSigV4Credential,
) -> Result<SigV4Credential, ConfigError> {
    let key = |k: &str| format!("sigv4_credentials[{i}].{k}");
    // Located by the key path: the line of the offending key (the table's when it is absent).
    let span = 0..0;
    let ak = c.access_key.get_ref();
    if ak.is_empty() || !ak.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(src.err(span, &key("access_key"), "letters and digits only"));
    }
    if c.secret_key.len() < 16 {
        return Err(src.err(span, &key("secret_key"), "at least 16 characters"));
    }
    for (k, v) in [("region", &c.region), ("service", &c.service)] {
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(src.err(span, &key(k), "letters, digits and `-` only"));
        }
    }
    if !header_safe(&c.principal) {
        return Err(src.err(
            span,
            &key("principal"),
            "must be a non-empty header-safe value",
        ));
    }
    Ok(SigV4Credential::new(
        ak,
        &c.secret_key,
        &c.region,
        &c.service,
        &c.principal,
    ))
}

fn hmac(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    m.update(msg);
    m.finalize().into_bytes().into()
}

/// Per-worker derived signing keys: (config generation, per credential: date and key).
#[derive(Default)]
pub struct KeyCache {
    gen: u64,
    keys: Vec<Option<([u8; 8], [u8; 32])>>,
}

impl KeyCache {
    fn get(&mut self, gen: u64, idx: usize, cred: &SigV4Credential, date: &[u8]) -> [u8; 32] {
        if self.gen != gen {
            self.keys.clear();
            self.gen = gen;
        }
        if self.keys.len() <= idx {
            self.keys.resize(idx + 1, None);
        }
        match &self.keys[idx] {
            Some((d, k)) if d[..] == *date => *k,
            _ => {
                let k = cred.signing_key(date);
                let mut d = [0u8; 8];
                d.copy_from_slice(date);
                self.keys[idx] = Some((d, k));
                k
            }
        }
    }
}

/// The signature parameters, from either form.
struct Params<'a> {
    access_key: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    signed_headers: &'a str,
    signature: &'a str,
    amz_date: &'a str,
    presigned_expires: Option<u64>,
}

/// Verifies `req`; returns the matching credential's principal.
pub(super) fn check(
    w: &WorkerAuth,
    gen: u64,
    creds: &[SigV4Credential],
    req: &Request<'_>,
) -> Result<Arc<str>, Deny> {
    verify(&mut w.sigv4.borrow_mut(), gen, creds, req, now_unix())
}

/// [`check`] at a given time, with an explicit key cache (benches, tests).
pub fn verify(
    cache: &mut KeyCache,
    gen: u64,
    creds: &[SigV4Credential],
    req: &Request<'_>,
    now: u64,
) -> Result<Arc<str>, Deny> {
    let head = req.head;
    let query = parse_query_of(req)?;
    let (p, ci, cred) = head_checks(creds, req, &query, now)?;

    // Canonical request.
    let mut cr: Vec<u8> = Vec::with_capacity(512);
    cr.extend_from_slice(head.method_bytes(req.buf));
    cr.push(b'\n');
    // The path as signed: as sent (percent-encoding kept), not as routed.
    let path = match &head.signed_path {
        Some(p) => &p[..],
        None => head.slice(req.buf, head.path),
    };
    if path.is_empty() {
        cr.push(b'/');
    }
    uri_encode(&mut cr, path, false);
    cr.push(b'\n');
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = query
        .iter()
        .filter(|(k, _)| !(p.presigned_expires.is_some() && k == b"X-Amz-Signature"))
        .map(|(k, v)| {
            let (mut ek, mut ev) = (Vec::new(), Vec::new());
            uri_encode(&mut ek, k, true);
            uri_encode(&mut ev, v, true);
            (ek, ev)
        })
        .collect();
    pairs.sort();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            cr.push(b'&');
        }
        cr.extend_from_slice(k);
        cr.push(b'=');
        cr.extend_from_slice(v);
    }
    cr.push(b'\n');
    let mut has_host = false;
    for name in p.signed_headers.split(';') {
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(FORBIDDEN);
        }
        has_host |= name == "host";
        cr.extend_from_slice(name.as_bytes());
        cr.push(b':');
        let mut any = false;
        for h in &head.headers {
            if head
                .slice(req.buf, h.name)
                .eq_ignore_ascii_case(name.as_bytes())
            {
                if any {
                    cr.push(b',');
                }
                any = true;
                push_trimmed(&mut cr, head.slice(req.buf, h.value));
            }
        }
        if !any {
            return Err(FORBIDDEN);
        }
        cr.push(b'\n');
    }
    if !has_host {
        return Err(FORBIDDEN);
    }
    cr.push(b'\n');
    cr.extend_from_slice(p.signed_headers.as_bytes());
    cr.push(b'\n');
    // Payload hash: the header's (checked against the body unless UNSIGNED-PAYLOAD), else
    // the body's. A presigned URL without the header is signed over the (empty) body's hash by
    // most signers and over UNSIGNED-PAYLOAD by S3-style ones: both are tried.
    let body_hash = || hex(&Sha256::digest(req.body));
    let (first, second): (String, Option<&str>) = match req.header("x-amz-content-sha256") {
        Some(b"UNSIGNED-PAYLOAD") => ("UNSIGNED-PAYLOAD".into(), None),
        Some(v) => {
            let h = body_hash();
            if !crate::admin::ct_eq(v, h.as_bytes()) {
                return Err(FORBIDDEN);
            }
            (h, None)
        }
        None if p.presigned_expires.is_some() => (body_hash(), Some("UNSIGNED-PAYLOAD")),
        None => (body_hash(), None),
    };
    let key = cache.get(gen, ci, cred, p.date.as_bytes());
    let base = cr.len();
    for payload in std::iter::once(first.as_str()).chain(second) {
        cr.truncate(base);
        cr.extend_from_slice(payload.as_bytes());
        if signature_matches(&key, &p, &cr) {
            return Ok(cred.principal.clone());
        }
    }
    Err(FORBIDDEN)
}

/// The checks that need only the head: the credentials are there and parse, the access key
/// is known, region, service and date fit. The gateway runs them ([`precheck`]) before it
/// reads a signed body, so a request that cannot pass is refused without its upload.
pub fn precheck(creds: &[SigV4Credential], req: &Request<'_>, now: u64) -> Result<(), Deny> {
    let query = parse_query_of(req)?;
    head_checks(creds, req, &query, now).map(|_| ())
}

/// A query parameter, percent-decoded: (name, value).
type QueryPair = (Vec<u8>, Vec<u8>);

/// The request's query as (name, value) pairs, percent-decoded.
fn parse_query_of(req: &Request<'_>) -> Result<Vec<QueryPair>, Deny> {
    let raw_query = req
        .head
        .query
        .map(|q| req.head.slice(req.buf, q))
        .unwrap_or(b"");
    if raw_query.is_empty() {
        Ok(Vec::new())
    } else {
        parse_query(raw_query).ok_or(FORBIDDEN)
    }
}

/// [`precheck`]'s checks; returns the signature's parameters and the credential they name.
fn head_checks<'a>(
    creds: &'a [SigV4Credential],
    req: &'a Request<'_>,
    query: &'a [QueryPair],
    now: u64,
) -> Result<(Params<'a>, usize, &'a SigV4Credential), Deny> {
    let auth_hdr = req.header("authorization");
    let p = if let Some(h) = auth_hdr.filter(|h| h.starts_with(ALGO.as_bytes())) {
        let h = std::str::from_utf8(h).map_err(|_| FORBIDDEN)?;
        let amz_date = req
            .header("x-amz-date")
            .and_then(|d| std::str::from_utf8(d).ok())
            .ok_or(FORBIDDEN)?;
        parse_header(&h[ALGO.len()..], amz_date).ok_or(FORBIDDEN)?
    } else if query.iter().any(|(k, _)| k == b"X-Amz-Algorithm") {
        // Each parameter once: a second value is not "the last one wins" but a refusal.
        let get = |name: &str| {
            let mut it = query.iter().filter(|(k, _)| k == name.as_bytes());
            match (it.next(), it.next()) {
                (Some((_, v)), None) => std::str::from_utf8(v).map_err(|_| FORBIDDEN),
                _ => Err(FORBIDDEN),
            }
        };
        if get("X-Amz-Algorithm")? != ALGO {
            return Err(FORBIDDEN);
        }
        let expires: u64 = get("X-Amz-Expires")?.parse().map_err(|_| FORBIDDEN)?;
        // 1 s to 7 days, as AWS: an URL valid for no time at all is no presigned URL.
        if expires == 0 || expires > MAX_EXPIRES_S {
            return Err(FORBIDDEN);
        }
        let (access_key, date, region, service) =
            parse_scope(get("X-Amz-Credential")?).ok_or(FORBIDDEN)?;
        Params {
            access_key,
            date,
            region,
            service,
            signed_headers: get("X-Amz-SignedHeaders")?,
            signature: get("X-Amz-Signature")?,
            amz_date: get("X-Amz-Date")?,
            presigned_expires: Some(expires),
        }
    } else {
        return Err(UNAUTHORIZED);
    };

    let (ci, cred) = creds
        .iter()
        .enumerate()
        .find(|(_, c)| c.access_key == p.access_key)
        .ok_or(FORBIDDEN)?;
    if p.region != cred.region || p.service != cred.service {
        return Err(FORBIDDEN);
    }
    // Configured credentials are long-term ones: a session token belongs to temporary
    // credentials these are not (AWS refuses it too).
    if req.header("x-amz-security-token").is_some()
        || query.iter().any(|(k, _)| k == b"X-Amz-Security-Token")
    {
        return Err(FORBIDDEN);
    }
    let t = parse_amz_date(p.amz_date).ok_or(FORBIDDEN)?;
    if p.date.len() != 8 || !p.amz_date.starts_with(p.date) {
        return Err(FORBIDDEN);
    }
    match p.presigned_expires {
        None => {
            if now.abs_diff(t) > MAX_SKEW_S {
                return Err(FORBIDDEN);
            }
        }
        Some(exp) => {
            if t > now + MAX_SKEW_S || now > t + exp {
                return Err(FORBIDDEN);
            }
        }
    }

    Ok((p, ci, cred))
}

fn signature_matches(key: &[u8; 32], p: &Params<'_>, cr: &[u8]) -> bool {
    let mut sts = String::with_capacity(160);
    sts.push_str(ALGO);
    sts.push('\n');
    sts.push_str(p.amz_date);
    sts.push('\n');
    sts.push_str(p.date);
    sts.push('/');
    sts.push_str(p.region);
    sts.push('/');
    sts.push_str(p.service);
    sts.push_str("/aws4_request\n");
    sts.push_str(&hex(&Sha256::digest(cr)));
    let sig = hex(&hmac(key, sts.as_bytes()));
    crate::admin::ct_eq(sig.as_bytes(), p.signature.as_bytes())
}

/// `Credential=AK/date/region/service/aws4_request, SignedHeaders=..., Signature=...`.
fn parse_header<'a>(rest: &'a str, amz_date: &'a str) -> Option<Params<'a>> {
    let (mut cred, mut sh, mut sig) = (None, None, None);
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=')?;
        // Each component once (a second `Credential=` is refused, not read either way).
        let slot = match k {
            "Credential" => &mut cred,
            "SignedHeaders" => &mut sh,
            "Signature" => &mut sig,
            _ => return None,
        };
        if slot.replace(v).is_some() {
            return None;
        }
    }
    let (access_key, date, region, service) = parse_scope(cred?)?;
    Some(Params {
        access_key,
        date,
        region,
        service,
        signed_headers: sh?,
        signature: sig?,
        amz_date,
        presigned_expires: None,
    })
}

fn parse_scope(s: &str) -> Option<(&str, &str, &str, &str)> {
    let mut it = s.split('/');
    let r = (it.next()?, it.next()?, it.next()?, it.next()?);
    (it.next()? == "aws4_request" && it.next().is_none()).then_some(r)
}

/// `YYYYMMDDTHHMMSSZ` to Unix seconds.
fn parse_amz_date(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = std::str::from_utf8(&b[r]).ok()?;
        s.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| s.parse().ok())?
    };
    let (y, m, d) = (n(0..4)?, n(4..6)?, n(6..8)?);
    let (hh, mm, ss) = (n(9..11)?, n(11..13)?, n(13..15)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(days * 86_400 + hh * 3600 + mm * 60 + ss).ok()
}

/// Percent-decodes the raw query into pairs of bytes (`None` on bad escapes; SigV4 signs bytes,
/// so a value need not be UTF-8, as the `X-Amz-*` parameters must). A raw `+` is
/// a space, as in every form-encoded query and as AWS reads it: botocore signs a space as
/// `%20` and sends it as `+` (a literal plus comes as `%2B`).
fn parse_query(q: &[u8]) -> Option<Vec<QueryPair>> {
    let mut out = Vec::new();
    for part in q.split(|&b| b == b'&') {
        if part.is_empty() {
            continue;
        }
        let (k, v) = match part.iter().position(|&b| b == b'=') {
            Some(i) => (&part[..i], &part[i + 1..]),
            None => (part, &b""[..]),
        };
        out.push((pct_decode(k, true)?, pct_decode(v, true)?));
        if out.len() > 256 {
            return None;
        }
    }
    Some(out)
}

/// Percent-decodes `s` (`plus_space`: a raw `+` is a space).
fn pct_decode(s: &[u8], plus_space: bool) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'+' && plus_space {
            out.push(b' ');
            i += 1;
        } else if s[i] == b'%' {
            let h = s.get(i + 1..i + 3)?;
            let v = u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()?;
            out.push(v);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    Some(out)
}

/// RFC 3986 encoding as SigV4 wants it: unreserved characters as is (and `/` in paths),
/// everything else `%XX` uppercase.
fn uri_encode(out: &mut Vec<u8>, s: &[u8], encode_slash: bool) {
    const H: &[u8; 16] = b"0123456789ABCDEF";
    for &b in s {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (b == b'/' && !encode_slash) {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', H[(b >> 4) as usize], H[(b & 15) as usize]]);
        }
    }
}

/// A header value trimmed, with runs of spaces collapsed to one.
fn push_trimmed(out: &mut Vec<u8>, v: &[u8]) {
    let v = v.trim_ascii();
    let mut prev_space = false;
    for &b in v {
        if b == b' ' || b == b'\t' {
            if !prev_space {
                out.push(b' ');
            }
            prev_space = true;
        } else {
            out.push(b);
            prev_space = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amz_dates() {
        assert_eq!(parse_amz_date("19700101T000000Z"), Some(0));
        assert_eq!(parse_amz_date("20150830T123600Z"), Some(1_440_938_160));
        assert_eq!(parse_amz_date("20150830T123600"), None);
        assert_eq!(parse_amz_date("2015083xT123600Z"), None);
    }

    #[test]
    fn derived_key_matches_aws_example() {
        // From the AWS SigV4 documentation's key derivation example.
        let c = SigV4Credential::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            "us-east-1",
            "iam",
            "x",
        );
        assert_eq!(
            hex(&c.signing_key(b"20150830")),
            "c4afb1cc5771d871763a393e44b703571b55cc28424d1a5e86da6ed3c154a4b9"
        );
    }

    #[test]
    fn aws_test_suite_get_vanilla() {
        // "get-vanilla" from the AWS SigV4 test suite.
        let raw = b"GET / HTTP/1.1\r\nHost:example.amazonaws.com\r\nX-Amz-Date:20150830T123600Z\r\nAuthorization: AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31\r\n\r\n";
        let mut head = crate::http::RequestHead::new(16);
        let limits = crate::http::Limits {
            max_header_bytes: 4096,
            max_headers: 16,
        };
        assert!(matches!(
            head.parse(raw, &limits),
            Ok(crate::http::Status::Complete(_))
        ));
        let creds = [SigV4Credential::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            "us-east-1",
            "service",
            "p",
        )];
        let req = Request {
            head: &head,
            buf: raw,
            body: b"",
            request_id: b"bench",
        };
        let t = parse_amz_date("20150830T123600Z").unwrap();
        let mut cache = KeyCache::default();
        assert_eq!(&*verify(&mut cache, 1, &creds, &req, t + 60).unwrap(), "p");
        // Outside the window.
        assert_eq!(
            verify(&mut cache, 1, &creds, &req, t + 16 * 60),
            Err(FORBIDDEN)
        );
        // Another service.
        let other = [SigV4Credential::new(
            "AKIDEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            "us-east-1",
            "iam",
            "p",
        )];
        assert_eq!(verify(&mut cache, 2, &other, &req, t), Err(FORBIDDEN));
        // A component given twice is refused, whichever copy a reader would take.
        let amz = "20150830T123600Z";
        for (rest, ok) in [
            (" Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host, Signature=ab", true),
            (" Credential=EVIL/20150830/us-east-1/service/aws4_request, Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host, Signature=ab", false),
            (" Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host, Signature=ab, Signature=cd", false),
        ] {
            assert_eq!(parse_header(rest, amz).is_some(), ok, "{rest}");
        }
    }

    #[test]
    fn encoding() {
        let mut o = Vec::new();
        uri_encode(&mut o, b"/a b/%2F~", false);
        assert_eq!(o, b"/a%20b/%252F~");
        let mut o = Vec::new();
        push_trimmed(&mut o, b"  a   b  ");
        assert_eq!(o, b"a b");
        assert_eq!(pct_decode(b"a%20b", false).unwrap(), b"a b");
        assert_eq!(pct_decode(b"a+b%2B", true).unwrap(), b"a b+");
        assert_eq!(pct_decode(b"a+b", false).unwrap(), b"a+b");
        assert!(pct_decode(b"a%2", true).is_none());
        // Bytes, not text: SigV4 signs whatever the query holds.
        assert_eq!(pct_decode(b"%FF%00", false).unwrap(), [0xFF, 0]);
    }
}
