//! Verification keys of a JWT authorizer: a static set (`secret`, `jwks_file`) or a JWKS
//! fetched from `jwks_uri` at start and refreshed in the background.
//!
//! The refresher honours `Cache-Control: max-age` (clamped to 1 s .. 1 day; 300 s when absent;
//! 5 s after a failed fetch). A token whose `kid` is unknown may ask for one early refresh, at
//! most one every [`KICK_INTERVAL_MS`]. Keys are only ever fetched from the configured URI:
//! `jku`, `x5u` and `kid` never make ringgate fetch anything. Only `http://` URIs are
//! supported by this build.

use crate::http::client::{self, ResponseReader};
use crate::http::Method;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

/// Least time between two refreshes asked for by unknown `kid`s.
pub const KICK_INTERVAL_MS: u64 = 5_000;
/// Timeout of one JWKS fetch (connect, send, read).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest JWKS document.
const MAX_JWKS_BYTES: usize = 1 << 20;
/// Most keys kept from one JWKS.
const MAX_KEYS: usize = 64;

/// One verification key.
pub struct VerKey {
    pub kid: Option<String>,
    pub family: AlgorithmFamily,
    /// The JWK's `alg`, when it names one: only that algorithm may use the key.
    pub alg: Option<Algorithm>,
    /// For EC keys: the curve (ES256 needs P-256, ES384 P-384).
    pub curve: Option<EllipticCurve>,
    pub key: DecodingKey,
}

impl std::fmt::Debug for VerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerKey")
            .field("kid", &self.kid)
            .field("family", &self.family)
            .field("alg", &self.alg)
            .finish()
    }
}

impl VerKey {
    /// Whether this key may verify a token signed with `alg` (no key-type confusion).
    pub fn fits(&self, alg: Algorithm) -> bool {
        if alg.family() != self.family || self.key.family() != self.family {
            return false;
        }
        if let Some(a) = self.alg {
            if a != alg {
                return false;
            }
        }
        match alg {
            Algorithm::ES256 => self.curve == Some(EllipticCurve::P256),
            Algorithm::ES384 => self.curve == Some(EllipticCurve::P384),
            _ => true,
        }
    }
}

/// A symmetric key from `secret`.
pub fn secret_key(secret: &[u8]) -> VerKey {
    VerKey {
        kid: None,
        family: AlgorithmFamily::Hmac,
        alg: None,
        curve: None,
        key: DecodingKey::from_secret(secret),
    }
}

/// Parses a JWKS document; keys that cannot be used for signatures are skipped.
pub fn parse_jwks(text: &[u8]) -> Result<Vec<VerKey>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(text).map_err(|e| format!("not JSON: {e}"))?;
    let arr = v
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or("no `keys` array")?;
    let mut out = Vec::new();
    for k in arr.iter().take(MAX_KEYS) {
        let Ok(jwk) = serde_json::from_value::<Jwk>(k.clone()) else {
            continue;
        };
        if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
            continue;
        }
        let (family, curve) = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => (AlgorithmFamily::Rsa, None),
            AlgorithmParameters::EllipticCurve(p) => (AlgorithmFamily::Ec, Some(p.curve.clone())),
            AlgorithmParameters::OctetKeyPair(p) => {
                if p.curve != EllipticCurve::Ed25519 {
                    continue;
                }
                (AlgorithmFamily::Ed, None)
            }
            AlgorithmParameters::OctetKey(_) => (AlgorithmFamily::Hmac, None),
            _ => continue,
        };
        let alg = match jwk.common.key_algorithm {
            None => None,
            Some(ka) => match ka.to_string().parse::<Algorithm>() {
                Ok(a) => Some(a),
                Err(_) => continue, // an encryption or unknown algorithm
            },
        };
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        out.push(VerKey {
            kid: jwk.common.key_id.clone(),
            family,
            alg,
            curve,
            key,
        });
    }
    Ok(out)
}

/// The keys of one authorizer.
pub struct JwtKeys {
    uri: Option<String>,
    current: arc_swap::ArcSwap<Vec<VerKey>>,
    /// Bumped after every fetch attempt (workers waiting on a refresh watch it).
    gen: AtomicU64,
    last_kick_ms: AtomicU64,
    started: AtomicBool,
    wake: (Mutex<bool>, Condvar),
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKeys").field("uri", &self.uri).finish()
    }
}

impl JwtKeys {
    /// A fixed set of keys.
    pub fn fixed(keys: Vec<VerKey>) -> Arc<JwtKeys> {
        Arc::new(JwtKeys::new(None, keys))
    }

    /// Keys fetched from `uri` once [`JwtKeys::start`] runs.
    pub fn remote(uri: String) -> Arc<JwtKeys> {
        Arc::new(JwtKeys::new(Some(uri), Vec::new()))
    }

    fn new(uri: Option<String>, keys: Vec<VerKey>) -> JwtKeys {
        JwtKeys {
            uri,
            current: arc_swap::ArcSwap::from_pointee(keys),
            gen: AtomicU64::new(0),
            last_kick_ms: AtomicU64::new(0),
            started: AtomicBool::new(false),
            wake: (Mutex::new(false), Condvar::new()),
        }
    }

    /// The current keys.
    pub fn current(&self) -> arc_swap::Guard<Arc<Vec<VerKey>>> {
        self.current.load()
    }

    /// Whether keys come from a URI (and can be refreshed).
    pub fn is_remote(&self) -> bool {
        self.uri.is_some()
    }

    /// Fetch attempts so far.
    pub fn generation(&self) -> u64 {
        self.gen.load(Ordering::Acquire)
    }

    /// Fetches the JWKS now (blocking, bounded by [`FETCH_TIMEOUT`]) and starts the background
    /// refresher. Does nothing for fixed keys or when already started.
    pub fn start(self: &Arc<Self>) {
        let Some(uri) = self.uri.clone() else { return };
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut next = self.refresh(&uri);
        let weak: Weak<JwtKeys> = Arc::downgrade(self);
        let _ = std::thread::Builder::new()
            .name("ringgate-jwks".into())
            .spawn(move || loop {
                let due = Instant::now() + next;
                // Wait until due or kicked, checking now and then whether the config is gone.
                loop {
                    let Some(me) = weak.upgrade() else { return };
                    let g = me.wake.0.lock().unwrap_or_else(|e| e.into_inner());
                    let left = due.saturating_duration_since(Instant::now());
                    if *g || left.is_zero() {
                        drop(g);
                        break;
                    }
                    let (mut g, _) = me
                        .wake
                        .1
                        .wait_timeout(g, left.min(Duration::from_secs(1)))
                        .unwrap_or_else(|e| e.into_inner());
                    if *g {
                        *g = false;
                        break;
                    }
                }
                let Some(me) = weak.upgrade() else { return };
                *me.wake.0.lock().unwrap_or_else(|e| e.into_inner()) = false;
                next = me.refresh(&uri);
            });
    }

    /// One fetch; returns when to fetch next.
    fn refresh(&self, uri: &str) -> Duration {
        let next = match fetch(uri) {
            Ok((body, max_age)) => match parse_jwks(&body) {
                Ok(keys) => {
                    self.current.store(Arc::new(keys));
                    max_age
                        .map(|s| Duration::from_secs(s.clamp(1, 86_400)))
                        .unwrap_or(Duration::from_secs(300))
                }
                Err(e) => {
                    eprintln!("ringgate: jwks {uri}: {e}");
                    Duration::from_secs(5)
                }
            },
            Err(e) => {
                eprintln!("ringgate: jwks {uri}: {e}");
                Duration::from_secs(5)
            }
        };
        self.gen.fetch_add(1, Ordering::AcqRel);
        next
    }

    /// Asks the refresher for an early fetch; false when one was asked for too recently.
    pub fn kick(&self) -> bool {
        if !self.started.load(Ordering::Acquire) {
            return false;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let last = self.last_kick_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < KICK_INTERVAL_MS
            || self
                .last_kick_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            return false;
        }
        *self.wake.0.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.wake.1.notify_one();
        true
    }
}

/// Splits `http://host[:port]/path` into (host:port, host, path).
pub fn parse_http_uri(uri: &str) -> Result<(String, String, String), String> {
    let rest = uri
        .strip_prefix("http://")
        .ok_or("only http:// JWKS URIs are supported by this build")?;
    let (auth, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if auth.is_empty() || auth.contains('@') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err("not a valid http://host[:port]/path URI".into());
    }
    let hostport = if auth
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !auth.ends_with(']')
    {
        auth.to_string()
    } else {
        format!("{auth}:80")
    };
    Ok((hostport, auth.to_string(), path.to_string()))
}

/// GETs `uri`; returns the body and `Cache-Control: max-age`.
fn fetch(uri: &str) -> Result<(Vec<u8>, Option<u64>), String> {
    let (hostport, host, path) = parse_http_uri(uri)?;
    let addr = hostport
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve: {e}"))?
        .next()
        .ok_or("resolves to no address")?;
    let deadline = Instant::now() + FETCH_TIMEOUT;
    let mut s = TcpStream::connect_timeout(&addr, FETCH_TIMEOUT).map_err(|e| e.to_string())?;
    let req = client::build_request(
        b"GET",
        path.as_bytes(),
        &[
            (b"Host", host.as_bytes()),
            (b"Accept", b"application/json"),
            (b"User-Agent", b"ringgate"),
            (b"Connection", b"close"),
        ],
        b"",
        None,
    );
    let mut rd = ResponseReader::new(Method::Get, MAX_JWKS_BYTES).accept(|s| s == 200);
    client::exchange_blocking(&mut s, &req, &mut rd, deadline).map_err(|e| e.to_string())?;
    let mut max_age = None;
    for (name, value) in rd.headers() {
        if name.eq_ignore_ascii_case(b"cache-control") {
            let v = String::from_utf8_lossy(value).to_ascii_lowercase();
            for d in v.split(',') {
                if let Some(a) = d.trim().strip_prefix("max-age=") {
                    max_age = a.trim().parse::<u64>().ok();
                }
            }
        }
    }
    Ok((rd.take_body(), max_age))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_parsing() {
        assert_eq!(
            parse_http_uri("http://127.0.0.1:9100/jwks.json").unwrap(),
            (
                "127.0.0.1:9100".into(),
                "127.0.0.1:9100".into(),
                "/jwks.json".into()
            )
        );
        assert_eq!(
            parse_http_uri("http://idp.example").unwrap().0,
            "idp.example:80"
        );
        assert!(parse_http_uri("https://idp.example/x").is_err());
        assert!(parse_http_uri("http://u@h/x").is_err());
    }

    #[test]
    fn jwks_skips_unusable_keys() {
        let text = br#"{"keys":[
            {"kty":"oct","k":"c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA","kid":"h","alg":"HS256"},
            {"kty":"oct","k":"AAAA","kid":"enc","use":"enc"},
            {"kty":"weird","kid":"w"}
        ]}"#;
        let keys = parse_jwks(text).unwrap();
        assert_eq!(keys.len(), 1);
        assert!(keys[0].fits(Algorithm::HS256));
        assert!(!keys[0].fits(Algorithm::HS384), "alg pinned by the JWK");
        assert!(!keys[0].fits(Algorithm::RS256));
        assert!(parse_jwks(b"[]").is_err());
    }
}
