//! Verification keys of a JWT authorizer: a static set (`secret`, `jwks_file`) or a JWKS
//! fetched from `jwks_uri` at start and refreshed in the background.
//!
//! The refresher honours `Cache-Control: max-age` (clamped to 1 s .. 1 day; 300 s when absent;
//! 5 s after a failed fetch). A token whose `kid` is unknown may ask for one early refresh, at
//! most one every [`KICK_INTERVAL_MS`]; tokens arriving while it is under way wait for it
//! too ([`JwtKeys::kick`]). Keys are only ever fetched from the configured URI:
//! `jku`, `x5u` and `kid` never make ringgate fetch anything. `https://` URIs are fetched over
//! rustls and verified against the Mozilla roots (webpki-roots), or against `jwks_ca_file`
//! alone when it is set.

use crate::http::client::{self, ResponseReader};
use crate::http::Method;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};
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

/// Which keys a JWKS may hold, by where it comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwksSource {
    /// `jwks_uri`: a published document, readable by anyone, so a symmetric (`oct`) key in it
    /// would let anyone sign tokens: such keys are never used.
    Published,
    /// `jwks_file`: a private file; `oct` keys of at least [`super::jwt::MIN_SECRET`] bytes.
    File,
}

/// Parses a JWKS document; keys that cannot be used to verify signatures are skipped: keys
/// for another use (`use`, `key_ops` without `verify`), RSA keys under 2048 bits, symmetric
/// keys from a published document or shorter than `secret` allows.
pub fn parse_jwks(text: &[u8], from: JwksSource) -> Result<Vec<VerKey>, String> {
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
        if let Some(ops) = &jwk.common.key_operations {
            if !ops.contains(&KeyOperations::Verify) {
                continue;
            }
        }
        let b64len = |s: &str| s.trim_end_matches('=').len() * 3 / 4;
        let (family, curve) = match &jwk.algorithm {
            AlgorithmParameters::RSA(p) if b64len(&p.n) < 2048 / 8 => continue,
            AlgorithmParameters::RSA(_) => (AlgorithmFamily::Rsa, None),
            AlgorithmParameters::EllipticCurve(p) => (AlgorithmFamily::Ec, Some(p.curve.clone())),
            AlgorithmParameters::OctetKeyPair(p) => {
                if p.curve != EllipticCurve::Ed25519 {
                    continue;
                }
                (AlgorithmFamily::Ed, None)
            }
            AlgorithmParameters::OctetKey(k)
                if from == JwksSource::File && b64len(&k.value) >= super::jwt::MIN_SECRET =>
            {
                (AlgorithmFamily::Hmac, None)
            }
            AlgorithmParameters::OctetKey(_) => continue,
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
    /// TLS settings for an `https://` URI.
    tls: Option<Arc<rustls::ClientConfig>>,
    current: arc_swap::ArcSwap<Vec<VerKey>>,
    /// Bumped after every fetch attempt (workers waiting on a refresh watch it).
    gen: AtomicU64,
    /// Bumped when a fetch brings a JWKS different from the last one (tokens verified before
    /// are verified again: a key taken out of the set stops its tokens on every worker).
    version: AtomicU64,
    /// Hash of the last JWKS document fetched.
    last_body: AtomicU64,
    /// When the last early refresh was asked for (ms since the epoch); stored, under the
    /// `wake` lock, after `kick_done`.
    last_kick_ms: AtomicU64,
    /// The [`JwtKeys::generation`] at which the last early refresh has ended.
    kick_done: AtomicU64,
    started: AtomicBool,
    /// The refresher waits on this, without holding the keys: a kick wakes it to fetch,
    /// and a stop (or the keys' drop, when a reload replaced them) to exit.
    wake: Arc<(Mutex<Wake>, Condvar)>,
    /// The refresher thread, joined by [`JwtKeys::stop`].
    refresher: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// What the refresher thread is woken for.
#[derive(Default)]
struct Wake {
    /// Fetch now (a token named an unknown `kid`).
    kicked: bool,
    /// Exit.
    stopped: bool,
    /// Fetches begun (the one in `start` included): fetch `n` ends at generation `n`.
    begun: u64,
}

impl Drop for JwtKeys {
    /// A reload replaced these keys: their refresher exits now, not at its next fetch.
    fn drop(&mut self) {
        self.tell_stop();
    }
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKeys").field("uri", &self.uri).finish()
    }
}

impl JwtKeys {
    /// A fixed set of keys.
    pub fn fixed(keys: Vec<VerKey>) -> Arc<JwtKeys> {
        Arc::new(JwtKeys::new(None, None, keys))
    }

    /// Keys fetched from `uri` once [`JwtKeys::start`] runs; `tls` is required for `https://`.
    pub fn remote(uri: String, tls: Option<Arc<rustls::ClientConfig>>) -> Arc<JwtKeys> {
        Arc::new(JwtKeys::new(Some(uri), tls, Vec::new()))
    }

    fn new(
        uri: Option<String>,
        tls: Option<Arc<rustls::ClientConfig>>,
        keys: Vec<VerKey>,
    ) -> JwtKeys {
        JwtKeys {
            uri,
            tls,
            current: arc_swap::ArcSwap::from_pointee(keys),
            gen: AtomicU64::new(0),
            version: AtomicU64::new(0),
            last_body: AtomicU64::new(0),
            last_kick_ms: AtomicU64::new(0),
            kick_done: AtomicU64::new(0),
            started: AtomicBool::new(false),
            wake: Arc::default(),
            refresher: Mutex::new(None),
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

    /// Changes whenever the key set does.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Fetches the JWKS now (blocking, bounded by [`FETCH_TIMEOUT`]) and starts the background
    /// refresher. Does nothing for fixed keys or when already started.
    pub fn start(self: &Arc<Self>) {
        let Some(uri) = self.uri.clone() else { return };
        {
            let mut g = self.wake.0.lock().unwrap_or_else(|e| e.into_inner());
            if self.started.swap(true, Ordering::AcqRel) {
                return;
            }
            g.begun = 1;
        }
        let mut next = self.refresh(&uri);
        let weak: Weak<JwtKeys> = Arc::downgrade(self);
        let wake = self.wake.clone();
        let thread = std::thread::Builder::new()
            .name("ringgate-jwks".into())
            .spawn(move || loop {
                let due = Instant::now() + next;
                {
                    let (state, cv) = &*wake;
                    let mut g = state.lock().unwrap_or_else(|e| e.into_inner());
                    loop {
                        if g.stopped {
                            return;
                        }
                        let left = due.saturating_duration_since(Instant::now());
                        if g.kicked || left.is_zero() {
                            g.kicked = false;
                            g.begun += 1;
                            break;
                        }
                        g = cv
                            .wait_timeout(g, left)
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                }
                let Some(me) = weak.upgrade() else { return };
                next = me.refresh(&uri);
            });
        *self.refresher.lock().unwrap_or_else(|e| e.into_inner()) = thread.ok();
    }

    /// Stops the background refresher and waits for it (the gateway stops); a fetch under
    /// way ends first (at most [`FETCH_TIMEOUT`]).
    pub fn stop(&self) {
        self.tell_stop();
        let thread = self
            .refresher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }

    fn tell_stop(&self) {
        let (state, cv) = &*self.wake;
        state.lock().unwrap_or_else(|e| e.into_inner()).stopped = true;
        cv.notify_all();
    }

    /// One fetch; returns when to fetch next.
    fn refresh(&self, uri: &str) -> Duration {
        let next = match fetch(uri, self.tls.as_ref()) {
            Ok((body, max_age)) => match parse_jwks(&body, JwksSource::Published) {
                Ok(keys) => {
                    let h = ahash::RandomState::with_seeds(7, 8, 9, 10).hash_one(&body[..]);
                    if self.last_body.swap(h, Ordering::AcqRel) != h {
                        self.current.store(Arc::new(keys));
                        self.version.fetch_add(1, Ordering::AcqRel);
                    }
                    max_age
                        .map(|s| Duration::from_secs(s.clamp(1, 86_400)))
                        .unwrap_or(Duration::from_secs(300))
                }
                Err(e) => {
                    crate::elog!("ringgate: jwks {uri}: {e}");
                    Duration::from_secs(5)
                }
            },
            Err(e) => {
                crate::elog!("ringgate: jwks {uri}: {e}");
                Duration::from_secs(5)
            }
        };
        self.gen.fetch_add(1, Ordering::AcqRel);
        next
    }

    /// Asks the refresher for an early fetch, unless one was asked for less than
    /// [`KICK_INTERVAL_MS`] ago. Returns the [`JwtKeys::generation`] to wait for while an early
    /// fetch (this one, or one asked for before) has not ended; `None` when the last one has
    /// ended (a `kid` still unknown is unknown) or the refresher is not running.
    pub fn kick(&self) -> Option<u64> {
        if !self.started.load(Ordering::Acquire) {
            return None;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let recent = || {
            // Acquire: a `last_kick_ms` seen comes with its `kick_done` (stored before).
            now.saturating_sub(self.last_kick_ms.load(Ordering::Acquire)) < KICK_INTERVAL_MS
        };
        if recent() {
            return self.kick_pending();
        }
        let mut g = self.wake.0.lock().unwrap_or_else(|e| e.into_inner());
        if recent() {
            // Another worker asked in the meantime.
            drop(g);
            return self.kick_pending();
        }
        // The next fetch to begin: one under way may have started before the key was out.
        let done = g.begun + 1;
        self.kick_done.store(done, Ordering::Release);
        self.last_kick_ms.store(now, Ordering::Release);
        g.kicked = true;
        drop(g);
        self.wake.1.notify_one();
        Some(done)
    }

    /// The generation ending the last early fetch, while it has not been reached.
    fn kick_pending(&self) -> Option<u64> {
        let done = self.kick_done.load(Ordering::Acquire);
        (self.generation() < done).then_some(done)
    }
}

/// A parsed `http://` or `https://` JWKS URI.
#[derive(Debug, PartialEq, Eq)]
pub struct JwksUri {
    /// Fetched over TLS.
    pub tls: bool,
    /// `host:port` to connect to (the scheme's port when none is given).
    pub hostport: String,
    /// The authority as written, for the `Host` header.
    pub authority: String,
    /// The host alone (no port, no brackets): the TLS server name.
    pub host: String,
    /// Path and query.
    pub path: String,
}

/// Parses `http[s]://host[:port]/path`.
pub fn parse_jwks_uri(uri: &str) -> Result<JwksUri, String> {
    let (tls, rest) = if let Some(r) = uri.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = uri.strip_prefix("http://") {
        (false, r)
    } else {
        return Err("must start with http:// or https://".into());
    };
    let (auth, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if auth.is_empty() || auth.contains('@') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err("not a valid http[s]://host[:port]/path URI".into());
    }
    let (host, port) = match auth.rsplit_once(':') {
        Some((h, p)) if !auth.ends_with(']') => match p.parse::<u16>() {
            Ok(p) => (h, p),
            Err(_) => return Err(format!("bad port in {auth}")),
        },
        _ => (auth, if tls { 443 } else { 80 }),
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.is_empty() {
        return Err("not a valid http[s]://host[:port]/path URI".into());
    }
    Ok(JwksUri {
        tls,
        hostport: format!("{host}:{port}"),
        authority: auth.to_string(),
        host: bare.to_string(),
        path: path.to_string(),
    })
}

/// TLS client settings for `https://` JWKS URIs: the PEM certificates of `ca_file` as the only
/// roots when given, else the Mozilla roots (webpki-roots).
pub fn tls_client_config(ca_file: Option<&str>) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(f) => {
            for cert in CertificateDer::pem_file_iter(f).map_err(|e| format!("cannot read: {e}"))? {
                let cert = cert.map_err(|e| format!("bad PEM: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("unusable certificate: {e}"))?;
            }
            if roots.is_empty() {
                return Err("no certificate in the file".into());
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// GETs `uri`; returns the body and `Cache-Control: max-age`.
fn fetch(
    uri: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<(Vec<u8>, Option<u64>), String> {
    let u = parse_jwks_uri(uri)?;
    let addr = u
        .hostport
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve: {e}"))?
        .next()
        .ok_or("resolves to no address")?;
    let deadline = Instant::now() + FETCH_TIMEOUT;
    let tcp = TcpStream::connect_timeout(&addr, FETCH_TIMEOUT).map_err(|e| e.to_string())?;
    let req = client::build_request(
        b"GET",
        u.path.as_bytes(),
        &[
            (b"Host", u.authority.as_bytes()),
            (b"Accept", b"application/json"),
            (b"User-Agent", b"ringgate"),
            (b"Connection", b"close"),
        ],
        b"",
        None,
    );
    let mut rd = ResponseReader::new(Method::Get, MAX_JWKS_BYTES).accept(|s| s == 200);
    if u.tls {
        let cfg = tls.ok_or("https:// without TLS settings")?;
        let name = rustls::pki_types::ServerName::try_from(u.host.clone())
            .map_err(|e| format!("bad TLS server name: {e}"))?;
        let conn = rustls::ClientConnection::new(cfg.clone(), name).map_err(|e| e.to_string())?;
        let mut s = rustls::StreamOwned::new(conn, tcp);
        client::exchange_blocking(&mut s, &req, &mut rd, deadline).map_err(|e| e.to_string())?;
    } else {
        let mut s = tcp;
        client::exchange_blocking(&mut s, &req, &mut rd, deadline).map_err(|e| e.to_string())?;
    }
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
        let u = parse_jwks_uri("http://127.0.0.1:9100/jwks.json").unwrap();
        assert_eq!(
            (u.tls, &*u.hostport, &*u.authority, &*u.host, &*u.path),
            (
                false,
                "127.0.0.1:9100",
                "127.0.0.1:9100",
                "127.0.0.1",
                "/jwks.json"
            )
        );
        assert_eq!(
            parse_jwks_uri("http://idp.example").unwrap().hostport,
            "idp.example:80"
        );
        let u = parse_jwks_uri("https://idp.example/.well-known/jwks.json?v=1").unwrap();
        assert_eq!(
            (u.tls, &*u.hostport, &*u.host, &*u.path),
            (
                true,
                "idp.example:443",
                "idp.example",
                "/.well-known/jwks.json?v=1"
            )
        );
        let u = parse_jwks_uri("https://[::1]:8443/k").unwrap();
        assert_eq!((&*u.hostport, &*u.host), ("[::1]:8443", "::1"));
        assert_eq!(
            parse_jwks_uri("https://[::1]/k").unwrap().hostport,
            "[::1]:443"
        );
        for bad in [
            "ftp://h/x",
            "http://u@h/x",
            "https:///x",
            "http://h:99999/x",
            "http://h/a b",
        ] {
            assert!(parse_jwks_uri(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn jwks_skips_unusable_keys() {
        let text = br#"{"keys":[
            {"kty":"oct","k":"c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA","kid":"h","alg":"HS256"},
            {"kty":"oct","k":"AAAA","kid":"enc","use":"enc"},
            {"kty":"weird","kid":"w"}
        ]}"#;
        let keys = parse_jwks(text, JwksSource::File).unwrap();
        assert_eq!(keys.len(), 1);
        assert!(keys[0].fits(Algorithm::HS256));
        assert!(!keys[0].fits(Algorithm::HS384), "alg pinned by the JWK");
        assert!(!keys[0].fits(Algorithm::RS256));
        assert!(parse_jwks(b"[]", JwksSource::File).is_err());
        // A published JWKS is public: a symmetric key in it would let anyone sign tokens.
        assert!(parse_jwks(text, JwksSource::Published).unwrap().is_empty());
        // Too short for an HMAC secret, or not for verifying.
        let weak = br#"{"keys":[
            {"kty":"oct","k":"","kid":"empty"},
            {"kty":"oct","k":"c2VjcmV0","kid":"short"},
            {"kty":"oct","k":"c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA","kid":"ops","key_ops":["encrypt"]}
        ]}"#;
        assert!(parse_jwks(weak, JwksSource::File).unwrap().is_empty());
    }
}
