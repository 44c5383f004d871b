//! JWT authorizers (`type = "jwt"`): `Authorization: Bearer <token>` verified with
//! `jsonwebtoken` against the authorizer's keys; `iss`, `aud`, `exp` and `nbf` checked with
//! `leeway_s`; route scopes checked against `scope` (space-separated) or `scp` (array).
//!
//! A verified token is cached per worker, keyed by the whole token, until its `exp` (plus
//! leeway): a repeated token costs one hash lookup and a time comparison. The cache is bounded
//! (entries and bytes) and dropped when the config changes; an entry verified with an older
//! key set (the JWKS changed since) is verified again.

use super::jwks::{self, JwtKeys, VerKey};
use super::UNAUTHORIZED;
use super::{header_safe, now_unix, Deny, RawAuthorizer, Request, WorkerAuth, FORBIDDEN};
use crate::config::{ConfigError, Source};
use ahash::AHashMap;
use jsonwebtoken::{Algorithm, Validation};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Longest token accepted.
pub const MAX_TOKEN_BYTES: usize = 8192;
/// Entries per authorizer per worker in the verified-token cache.
pub const CACHE_ENTRIES: usize = 10_000;
/// Bytes per worker in the cache, each entry counted with its token, its parsed claims and its
/// bookkeeping ([`entry_cost`]).
pub const CACHE_BYTES: usize = 16 << 20;

/// The heap an entry holds, estimated: the token (the key), the claims as parsed (every string
/// and node, with allocator and map overhead), the scopes and principal, and the map's slot.
fn entry_cost(token: &[u8], v: &Verified) -> usize {
    fn value(v: &serde_json::Value) -> usize {
        use serde_json::Value as V;
        match v {
            V::Null | V::Bool(_) | V::Number(_) => 32,
            V::String(s) => 48 + s.len(),
            V::Array(a) => 48 + a.iter().map(value).sum::<usize>(),
            V::Object(o) => {
                64 + o
                    .iter()
                    .map(|(k, v)| 64 + k.len() + value(v))
                    .sum::<usize>()
            }
        }
    }
    let scopes: usize = v.scopes.iter().map(|s| 32 + s.len()).sum();
    let principal = v.principal.as_ref().map_or(0, |p| 48 + p.len());
    192 + token.len() + value(&v.claims) + scopes + principal
}
/// The shortest HMAC secret taken (`secret`, or an `oct` key of a `jwks_file`), in bytes.
pub const MIN_SECRET: usize = 32;
/// How long a request with an unknown `kid` waits for an early JWKS refresh.
const KICK_WAIT: Duration = Duration::from_millis(2500);

/// A validated `type = "jwt"` authorizer.
#[derive(Debug)]
pub struct JwtAuthorizer {
    pub name: String,
    pub issuer: Option<String>,
    pub audience: Vec<String>,
    pub leeway: u64,
    pub keys: Arc<JwtKeys>,
}

pub(super) fn validate(
    src: &Source,
    i: usize,
    a: &RawAuthorizer,
    base: &Path,
) -> Result<JwtAuthorizer, ConfigError> {
    let key = |k: &str| format!("authorizers[{i}].{k}");
    // Located by the key path: the line of the offending key (the table's when it is absent).
    let span = 0..0;
    if a.upstream.is_some()
        || a.path.is_some()
        || !a.identity_sources.is_empty()
        || a.ttl_s.is_some()
    {
        return Err(src.err(
            span,
            &key("type"),
            "upstream, path, identity_sources and ttl_s belong to `type = \"request\"`",
        ));
    }
    let sources = [
        a.jwks_uri.is_some(),
        a.jwks_file.is_some(),
        a.secret.is_some(),
    ];
    if sources.iter().filter(|s| **s).count() != 1 {
        return Err(src.err(
            span,
            &key("jwks_uri"),
            "a jwt authorizer needs exactly one of jwks_uri, jwks_file, secret",
        ));
    }
    if a.leeway_s > 3600 {
        return Err(src.err(span, &key("leeway_s"), "at most 3600"));
    }
    let keys = if let Some(u) = &a.jwks_uri {
        let parsed = jwks::parse_jwks_uri(u.get_ref())
            .map_err(|e| src.err(u.span(), &key("jwks_uri"), e))?;
        let tls = match (&a.jwks_ca_file, parsed.tls) {
            (Some(f), false) => {
                return Err(src.err(
                    f.span(),
                    &key("jwks_ca_file"),
                    "only for an https:// jwks_uri",
                ))
            }
            (Some(f), true) => Some(
                jwks::tls_client_config(Some(&base.join(f.get_ref()).to_string_lossy()))
                    .map_err(|e| src.err(f.span(), &key("jwks_ca_file"), e))?,
            ),
            (None, true) => Some(
                jwks::tls_client_config(None)
                    .map_err(|e| src.err(u.span(), &key("jwks_uri"), e))?,
            ),
            (None, false) => None,
        };
        JwtKeys::remote(u.get_ref().clone(), tls)
    } else if let Some(f) = &a.jwks_file {
        let text = std::fs::read(base.join(f.get_ref()))
            .map_err(|e| src.err(f.span(), &key("jwks_file"), format!("cannot read: {e}")))?;
        let keys = jwks::parse_jwks(&text, jwks::JwksSource::File)
            .map_err(|e| src.err(f.span(), &key("jwks_file"), e))?;
        if keys.is_empty() {
            return Err(src.err(f.span(), &key("jwks_file"), "no usable signing key"));
        }
        JwtKeys::fixed(keys)
    } else {
        let s = a.secret.as_ref().expect("one source");
        if s.get_ref().len() < MIN_SECRET {
            return Err(src.err(
                s.span(),
                &key("secret"),
                "an HMAC secret needs at least 32 bytes",
            ));
        }
        JwtKeys::fixed(vec![jwks::secret_key(s.get_ref().as_bytes())])
    };
    // An empty list would check no audience at all, as no `audience` does: likely a template
    // variable left unset, so refused rather than letting every audience in.
    let audience = match &a.audience {
        None => Vec::new(),
        Some(l) if l.get_ref().is_empty() || l.get_ref().iter().any(|x| x.is_empty()) => {
            return Err(src.err(
                l.span(),
                &key("audience"),
                "lists no audience (or an empty one): list the accepted `aud` values, or leave `audience` out to accept any",
            ))
        }
        Some(l) => l.get_ref().clone(),
    };
    Ok(JwtAuthorizer {
        name: a.name.get_ref().clone(),
        issuer: a.issuer.clone(),
        audience,
        leeway: a.leeway_s,
        keys,
    })
}

/// A verified token.
#[derive(Debug, Clone)]
pub struct Verified {
    pub exp: u64,
    pub nbf: u64,
    pub principal: Option<Arc<str>>,
    pub scopes: Box<[Box<str>]>,
    /// Every claim (for mappings).
    pub claims: Arc<serde_json::Value>,
    /// [`jwks::JwtKeys::version`] of the key set it was verified with.
    pub keys_version: u64,
}

impl Verified {
    fn valid_at(&self, now: u64, leeway: u64) -> bool {
        now <= self.exp.saturating_add(leeway) && self.nbf <= now.saturating_add(leeway)
    }

    fn has_scopes(&self, want: &[Box<str>]) -> bool {
        want.iter().all(|w| self.scopes.iter().any(|s| s == w))
    }
}

/// One authorizer's cached tokens: token -> (verified token, its [`entry_cost`]).
type TokenMap = AHashMap<Box<[u8]>, (Verified, usize)>;

/// Per-worker verified tokens, one map per authorizer.
#[derive(Default)]
pub struct TokenCache {
    gen: u64,
    /// Per authorizer: token -> (verified token, its [`entry_cost`]).
    maps: Vec<TokenMap>,
    bytes: usize,
}

impl TokenCache {
    fn sync(&mut self, gen: u64) {
        if self.gen != gen {
            self.maps.clear();
            self.bytes = 0;
            self.gen = gen;
        }
    }

    fn map(&mut self, idx: usize) -> &mut TokenMap {
        if self.maps.len() <= idx {
            self.maps.resize_with(idx + 1, AHashMap::new);
        }
        &mut self.maps[idx]
    }

    fn insert(&mut self, idx: usize, token: &[u8], v: Verified, now: u64, leeway: u64) {
        let cost = entry_cost(token, &v);
        if cost > CACHE_BYTES / 64 {
            // One entry never takes a large share of the cache (a token with huge claims).
            return;
        }
        if self.map(idx).len() >= CACHE_ENTRIES || self.bytes + cost > CACHE_BYTES {
            // Drop what expired; if that is not enough, start over (bounded work, rare).
            let mut bytes = 0;
            for m in &mut self.maps {
                m.retain(|_, (e, c)| {
                    e.valid_at(now, leeway) && {
                        bytes += *c;
                        true
                    }
                });
            }
            self.bytes = bytes;
            if self.map(idx).len() >= CACHE_ENTRIES * 3 / 4 || self.bytes > CACHE_BYTES * 3 / 4 {
                self.map(idx).clear();
                self.bytes = self
                    .maps
                    .iter()
                    .flat_map(|m| m.values())
                    .map(|(_, c)| c)
                    .sum();
            }
        }
        match self.map(idx).insert(token.into(), (v, cost)) {
            None => self.bytes += cost,
            Some((_, old)) => self.bytes = self.bytes + cost - old,
        }
    }

    fn remove(&mut self, idx: usize, token: &[u8]) {
        if let Some((_, cost)) = self.map(idx).remove(token) {
            self.bytes -= cost;
        }
    }

    /// Cached tokens across authorizers.
    pub fn len(&self) -> usize {
        self.maps.iter().map(|m| m.len()).sum()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The token of `Authorization: Bearer <token>`.
fn bearer(v: &[u8]) -> Option<&[u8]> {
    let t = if v.len() >= 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
        v[7..].trim_ascii()
    } else {
        // A bare token, as Amazon API Gateway's JWT authorizers also take; anything with
        // another scheme (`Basic ...`) has a space and is not one.
        let t = v.trim_ascii();
        if t.contains(&b' ') {
            return None;
        }
        t
    };
    (!t.is_empty() && t.len() <= MAX_TOKEN_BYTES).then_some(t)
}

/// What a passed JWT check hands on: the principal (`sub`) and, when asked for, the claims.
type Passed = (Option<Arc<str>>, Option<Arc<serde_json::Value>>);

/// Checks the bearer token of `req` against authorizer `idx`; returns the principal (`sub`),
/// and the claims when `keep_claims` (a mapping reads them).
pub(super) async fn check(
    w: &WorkerAuth,
    gen: u64,
    idx: usize,
    a: &JwtAuthorizer,
    scopes: &[Box<str>],
    req: &Request<'_>,
    keep_claims: bool,
) -> Result<Passed, Deny> {
    let token = req
        .header("authorization")
        .and_then(bearer)
        .ok_or(UNAUTHORIZED)?;
    let now = now_unix();
    let passed = |v: &Verified| (v.principal.clone(), keep_claims.then(|| v.claims.clone()));
    {
        let mut c = w.jwt.borrow_mut();
        c.sync(gen);
        let stale = c
            .map(idx)
            .get(token)
            .is_some_and(|(v, _)| v.keys_version != a.keys.version());
        if stale {
            // The key set changed since: verify again (the key may be gone).
            c.remove(idx, token);
        } else if let Some((v, _)) = c.map(idx).get(token) {
            if v.valid_at(now, a.leeway) {
                return if v.has_scopes(scopes) {
                    Ok(passed(v))
                } else {
                    Err(FORBIDDEN)
                };
            }
            c.remove(idx, token);
            return Err(UNAUTHORIZED);
        }
    }
    let version = a.keys.version();
    let mut v = a.verify(token).await.map_err(|_| UNAUTHORIZED)?;
    v.keys_version = version;
    let ok = v.has_scopes(scopes);
    let out = passed(&v);
    {
        let mut c = w.jwt.borrow_mut();
        c.sync(gen);
        c.insert(idx, token, v, now, a.leeway);
    }
    if ok {
        Ok(out)
    } else {
        Err(FORBIDDEN)
    }
}

/// Why a token failed (for tests and logs; clients only see 401).
#[derive(Debug, PartialEq, Eq)]
pub enum Reject {
    Malformed,
    NoKey,
    BadSignature,
    Claims(String),
}

impl JwtAuthorizer {
    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.leeway = self.leeway;
        v.validate_nbf = true;
        v.validate_exp = true;
        let mut req = vec!["exp"];
        if let Some(i) = &self.issuer {
            v.set_issuer(&[i]);
            req.push("iss");
        }
        // The audience is checked in `claims_ok` (`aud`, or `client_id` without `aud`).
        v.validate_aud = false;
        v.set_required_spec_claims(&req);
        v
    }

    /// The checks `jsonwebtoken` does not make, as API Gateway makes them: `iss` a string; with `audience`
    /// set, `aud` must hold one of its values, or, only when the token has no `aud` (Cognito
    /// access tokens), `client_id` must be one; `iat`, when present, must not be in the
    /// future (beyond the leeway).
    fn claims_ok(&self, c: &serde_json::Value, now: u64) -> Result<(), Reject> {
        // RFC 7519 4.1.1: `iss` is one string (`jsonwebtoken` also takes an array holding it).
        if self.issuer.is_some() && !c.get("iss").is_some_and(|v| v.is_string()) {
            return Err(Reject::Claims("iss".into()));
        }
        if !self.audience.is_empty() {
            let ok = |v: &serde_json::Value| {
                v.as_str()
                    .is_some_and(|s| self.audience.iter().any(|a| a == s))
            };
            let fits = match (c.get("aud"), c.get("client_id")) {
                (Some(serde_json::Value::Array(a)), _) => a.iter().any(ok),
                (Some(aud), _) => ok(aud),
                (None, Some(id)) => ok(id),
                (None, None) => false,
            };
            if !fits {
                return Err(Reject::Claims("aud".into()));
            }
        }
        if let Some(iat) = c.get("iat") {
            match num(Some(iat)) {
                Some(t) if t <= now.saturating_add(self.leeway) => {}
                _ => return Err(Reject::Claims("iat".into())),
            }
        }
        Ok(())
    }

    /// The keys a token may be verified with: those fitting its algorithm and, when it names
    /// one, its `kid`; at most 4, in the set's order, so one token costs at most 4 signature
    /// checks (a token without a `kid` is tried against the first 4 only; the README says so).
    fn candidates<'k>(keys: &'k [VerKey], kid: Option<&str>, alg: Algorithm) -> Vec<&'k VerKey> {
        keys.iter()
            .filter(|k| k.fits(alg))
            .filter(|k| match kid {
                // A token naming a key uses that key only (keys without a kid match any).
                Some(kid) => k.kid.as_deref().is_none_or(|x| x == kid),
                None => true,
            })
            .take(4)
            .collect()
    }

    /// Verifies a token (signature and claims); when its `kid` is unknown, first waits (at most
    /// [`KICK_WAIT`]) for the early JWKS refresh it asks for or that is already under way.
    pub async fn verify(&self, token: &[u8]) -> Result<Verified, Reject> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| Reject::Malformed)?;
        if header.crit.is_some() {
            // RFC 7515 4.1.11: a token naming critical extensions must be refused by a
            // verifier that does not understand them, and this one understands none.
            return Err(Reject::Malformed);
        }
        let alg = header.alg;
        let kid = header.kid.as_deref();
        let keys = self.keys.current();
        let mut found = !Self::candidates(&keys, kid, alg).is_empty();
        let known_kid = kid.is_none_or(|k| keys.iter().any(|x| x.kid.as_deref() == Some(k)));
        drop(keys);
        if !found || !known_kid {
            // Wait for the early refresh this token asked for, or for the one under way.
            if let Some(done) = self.keys.kick() {
                let end = std::time::Instant::now() + KICK_WAIT;
                while self.keys.generation() < done && std::time::Instant::now() < end {
                    monoio::time::sleep(Duration::from_millis(10)).await;
                }
                found = true;
            }
        }
        if !found {
            return Err(Reject::NoKey);
        }
        self.verify_now(token, alg, kid)
    }

    /// The synchronous part of [`JwtAuthorizer::verify`] (no refresh).
    pub fn verify_now(
        &self,
        token: &[u8],
        alg: Algorithm,
        kid: Option<&str>,
    ) -> Result<Verified, Reject> {
        let keys = self.keys.current();
        let cands = Self::candidates(&keys, kid, alg);
        if cands.is_empty() {
            return Err(Reject::NoKey);
        }
        let validation = self.validation(alg);
        let mut last = Reject::BadSignature;
        for k in cands {
            match jsonwebtoken::decode::<serde_json::Value>(token, &k.key, &validation) {
                Ok(d) => {
                    if !claims_unique(token) {
                        return Err(Reject::Claims("a claim named twice".into()));
                    }
                    self.claims_ok(&d.claims, super::now_unix())?;
                    return claims(d.claims);
                }
                Err(e) => {
                    use jsonwebtoken::errors::ErrorKind as K;
                    match e.kind() {
                        K::InvalidSignature | K::InvalidKeyFormat | K::InvalidAlgorithm => {
                            last = Reject::BadSignature
                        }
                        other => return Err(Reject::Claims(format!("{other:?}"))),
                    }
                }
            }
        }
        Err(last)
    }
}

/// Whether the token's payload names no claim twice (`scope` twice would be read "last
/// wins" by the JSON parser, and another reader could take the first).
fn claims_unique(token: &[u8]) -> bool {
    use base64::Engine as _;
    let Some(payload) = token.split(|&b| b == b'.').nth(1) else {
        return false;
    };
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .is_ok_and(|json| crate::policy::validate::json_without_duplicate_keys(&json))
}

fn num(v: Option<&serde_json::Value>) -> Option<u64> {
    let v = v?;
    v.as_u64().or_else(|| v.as_f64().map(|f| f.max(0.0) as u64))
}

fn claims(c: serde_json::Value) -> Result<Verified, Reject> {
    let exp = num(c.get("exp")).ok_or(Reject::Claims("exp".into()))?;
    let nbf = num(c.get("nbf")).unwrap_or(0);
    let principal = match c.get("sub") {
        None => None,
        Some(serde_json::Value::String(s)) if header_safe(s) => Some(Arc::from(s.as_str())),
        Some(_) => return Err(Reject::Claims("sub".into())),
    };
    let mut scopes: Vec<Box<str>> = Vec::new();
    if let Some(s) = c.get("scope").and_then(|s| s.as_str()) {
        scopes.extend(s.split_ascii_whitespace().map(Box::from));
    }
    match c.get("scp") {
        Some(serde_json::Value::Array(a)) => {
            scopes.extend(a.iter().filter_map(|s| s.as_str()).map(Box::from))
        }
        Some(serde_json::Value::String(s)) => {
            scopes.extend(s.split_ascii_whitespace().map(Box::from))
        }
        _ => {}
    }
    Ok(Verified {
        exp,
        nbf,
        principal,
        scopes: scopes.into(),
        claims: Arc::new(c),
        keys_version: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn authz() -> JwtAuthorizer {
        JwtAuthorizer {
            name: "t".into(),
            issuer: Some("iss".into()),
            audience: vec!["shop".into()],
            leeway: 5,
            keys: JwtKeys::fixed(vec![jwks::secret_key(SECRET)]),
        }
    }

    fn tok(claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    fn verify(a: &JwtAuthorizer, t: &str) -> Result<Verified, Reject> {
        let h = jsonwebtoken::decode_header(t).map_err(|_| Reject::Malformed)?;
        a.verify_now(t.as_bytes(), h.alg, h.kid.as_deref())
    }

    #[test]
    fn accepts_valid_and_reads_scopes() {
        let now = now_unix();
        let t = tok(json!({"iss":"iss","aud":"shop","exp":now+60,"sub":"u1","scope":"a b"}));
        let v = verify(&authz(), &t).unwrap();
        assert_eq!(v.principal.as_deref(), Some("u1"));
        assert!(v.has_scopes(&["a".into(), "b".into()]));
        assert!(!v.has_scopes(&["c".into()]));
        let t = tok(json!({"iss":"iss","aud":["x","shop"],"exp":now+60,"scp":["c"]}));
        assert!(verify(&authz(), &t).unwrap().has_scopes(&["c".into()]));
    }

    #[test]
    fn rejects_bad_claims() {
        let now = now_unix();
        let a = authz();
        for c in [
            json!({"iss":"other","aud":"shop","exp":now+60}),
            json!({"iss":"iss","aud":"nope","exp":now+60}),
            json!({"aud":"shop","exp":now+60}),
            json!({"iss":"iss","aud":"shop","exp":now-60}),
            json!({"iss":"iss","aud":"shop","exp":now+60,"nbf":now+60}),
            json!({"iss":"iss","aud":"shop"}),
            json!({"iss":"iss","aud":"shop","exp":now+60,"sub":"a\r\nx: y"}),
            // No audience at all; a client_id does not count beside an `aud` that misses.
            json!({"iss":"iss","exp":now+60}),
            json!({"iss":"iss","aud":"nope","client_id":"shop","exp":now+60}),
            json!({"iss":"iss","client_id":"nope","exp":now+60}),
            json!({"iss":"iss","aud":[],"exp":now+60}),
            // `iss` as an array holding the right one.
            json!({"iss":["evil","iss"],"aud":"shop","exp":now+60}),
            // Issued in the future (past the leeway), or an `iat` that is not a time.
            json!({"iss":"iss","aud":"shop","exp":now+600,"iat":now+60}),
            json!({"iss":"iss","aud":"shop","exp":now+600,"iat":"soon"}),
        ] {
            assert!(verify(&a, &tok(c.clone())).is_err(), "{c}");
        }
        // Inside the leeway.
        assert!(verify(&a, &tok(json!({"iss":"iss","aud":"shop","exp":now-2}))).is_ok());
        assert!(verify(
            &a,
            &tok(json!({"iss":"iss","aud":"shop","exp":now+60,"iat":now+3}))
        )
        .is_ok());
        assert!(verify(
            &a,
            &tok(json!({"iss":"iss","aud":"shop","exp":now+60,"iat":now-60}))
        )
        .is_ok());
        // A claim named twice is refused (`scope` read "last wins" would pass the check).
        let dup = |payload: &str| {
            use base64::Engine as _;
            let good = tok(json!({"iss":"iss","aud":"shop","exp":now+60}));
            let parts: Vec<&str> = good.split('.').collect();
            let p = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(payload);
            let signing = format!("{}.{p}", parts[0]);
            let sig = jsonwebtoken::crypto::sign(
                signing.as_bytes(),
                &EncodingKey::from_secret(SECRET),
                Algorithm::HS256,
            )
            .unwrap();
            format!("{signing}.{sig}")
        };
        let once = format!(
            r#"{{"iss":"iss","aud":"shop","exp":{},"scope":"admin"}}"#,
            now + 60
        );
        assert!(verify(&a, &dup(&once)).is_ok());
        let twice = format!(
            r#"{{"iss":"iss","aud":"shop","exp":{},"scope":"read","scope":"admin"}}"#,
            now + 60
        );
        assert!(verify(&a, &dup(&twice)).is_err());
        // Cognito access tokens carry `client_id` and no `aud`: checked as API Gateway does.
        assert!(verify(
            &a,
            &tok(json!({"iss":"iss","client_id":"shop","exp":now+60}))
        )
        .is_ok());
    }

    #[test]
    fn rejects_alg_none_and_confusion() {
        let now = now_unix();
        let a = authz();
        // alg none: header {"alg":"none"}.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJleHAiOjQxMDI0NDQ4MDB9.";
        assert!(verify(&a, none).is_err());
        // RS256 header on an HMAC key: refused before any signature check.
        let good = tok(json!({"iss":"iss","aud":"shop","exp":now+60}));
        let parts: Vec<&str> = good.split('.').collect();
        let rs_header = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9";
        let forged = format!("{rs_header}.{}.{}", parts[1], parts[2]);
        assert_eq!(verify(&a, &forged).unwrap_err(), Reject::NoKey);
        // Tampered payload.
        let forged = format!("{}.{}x.{}", parts[0], parts[1], parts[2]);
        assert!(verify(&a, &forged).is_err());
    }

    #[test]
    fn token_cache_counts_claims_too() {
        // Tokens of 4 KB whose claims hold 3 KB: the bound holds for what the entries hold,
        // not only for the token bytes.
        let mut c = TokenCache::default();
        c.sync(1);
        let v = Verified {
            exp: u64::MAX / 2,
            nbf: 0,
            principal: Some("alice".into()),
            scopes: Box::new([]),
            claims: Arc::new(serde_json::json!({"sub": "alice", "pad": "p".repeat(3000)})),
            keys_version: 0,
        };
        let token = vec![b't'; 4000];
        let cost = entry_cost(&token, &v);
        assert!(cost > 7000, "{cost}");
        for i in 0..6000u32 {
            let mut t = token.clone();
            t[..4].copy_from_slice(&i.to_be_bytes());
            c.insert(0, &t, v.clone(), 1000, 0);
            assert!(c.bytes <= CACHE_BYTES);
        }
        assert!(c.len() <= CACHE_BYTES / cost, "{}", c.len());
        assert_eq!(c.bytes, c.len() * cost);
    }

    #[test]
    fn token_cache_is_bounded() {
        let mut c = TokenCache::default();
        c.sync(1);
        let v = Verified {
            exp: u64::MAX / 2,
            nbf: 0,
            principal: None,
            scopes: Box::new([]),
            claims: Arc::new(serde_json::Value::Null),
            keys_version: 0,
        };
        for i in 0..CACHE_ENTRIES + 100 {
            c.insert(0, format!("token-{i}").as_bytes(), v.clone(), 1000, 0);
            assert!(c.len() <= CACHE_ENTRIES);
        }
        assert!(c.len() >= 100);
        // Expired entries go first when the map is full.
        let mut c = TokenCache::default();
        let mut old = v.clone();
        old.exp = 10;
        for i in 0..CACHE_ENTRIES {
            c.insert(0, format!("old-{i}").as_bytes(), old.clone(), 5, 0);
        }
        c.insert(0, b"new", v.clone(), 1000, 0);
        assert_eq!(c.len(), 1);
        // A new config generation empties the cache.
        c.sync(2);
        assert!(c.is_empty());
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bearer "), None);
        assert_eq!(bearer(b"eyJ.a.b"), Some(&b"eyJ.a.b"[..]), "a bare token");
        assert_eq!(bearer(b"  "), None);
    }
}
