//! `[server.tls]`: HTTPS listeners. rustls (ring provider) does the protocol; [`stream`] moves
//! its records over monoio sockets.
//!
//! The certificates are loaded and checked when the config is (a bad file is a config error
//! naming the file, the line and the key), and the result is one `rustls::ServerConfig` per
//! config generation: a reload with new certificates serves them to new connections, while
//! connections already open keep the session they negotiated.
//!
//! SNI: each certificate serves the DNS names of its subjectAltName (exact names first, then
//! `*.` wildcards, one label deep); a client that sends no name, or a name no certificate has,
//! gets the first certificate.

pub mod stream;

pub use stream::{accept, TlsStream};

use crate::config::{ConfigError, Source};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use toml::Spanned;

/// `[server.tls]` as written in the file.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub listen: Option<Spanned<Vec<Spanned<String>>>>,
    pub certs: Option<Spanned<Vec<Spanned<RawCert>>>>,
    pub client_ca: Option<Spanned<String>>,
}

/// One `{ cert, key }` of `server.tls.certs`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCert {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
}

/// A loaded certificate, for `--check` and the logs.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// The certificate file (resolved against the config file's directory).
    pub cert: PathBuf,
    /// The DNS names it serves (subjectAltName).
    pub names: Vec<String>,
}

/// `[server.tls]`, validated and loaded.
#[derive(Clone)]
pub struct TlsSettings {
    pub listen: Vec<SocketAddr>,
    pub certs: Vec<CertInfo>,
    /// Client certificates are required and verified against this CA file.
    pub client_ca: Option<PathBuf>,
    /// What the handshakes of this config generation use.
    pub server: Arc<rustls::ServerConfig>,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("listen", &self.listen)
            .field("certs", &self.certs)
            .field("client_ca", &self.client_ca)
            .finish_non_exhaustive()
    }
}

impl TlsSettings {
    /// One line per listener and certificate, for `--check` and the start-up log.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        for a in &self.listen {
            s.push_str(&format!("tls listener https://{a}"));
            if self.client_ca.is_some() {
                s.push_str(" (client certificates required)");
            }
            s.push('\n');
        }
        for (i, c) in self.certs.iter().enumerate() {
            let names = if c.names.is_empty() {
                "no DNS names".to_string()
            } else {
                c.names.join(", ")
            };
            let default = if i == 0 { " (default)" } else { "" };
            s.push_str(&format!(
                "tls certificate {}{default}: {names}\n",
                c.cert.display()
            ));
        }
        if let Some(ca) = &self.client_ca {
            s.push_str(&format!("tls client_ca {}\n", ca.display()));
        }
        s
    }
}

/// Loads `[server.tls]` (`listen` already parsed by the caller).
pub(crate) fn build(
    src: &Source,
    raw: &Spanned<RawTls>,
    listen: Vec<SocketAddr>,
) -> Result<TlsSettings, ConfigError> {
    let base = src.path.parent().unwrap_or(Path::new("."));
    let t = raw.get_ref();
    let certs = match &t.certs {
        Some(c) if !c.get_ref().is_empty() => c.get_ref(),
        other => {
            let span = other.as_ref().map(|c| c.span()).unwrap_or(raw.span());
            return Err(src.err(
                span,
                "server.tls.certs",
                "at least one { cert, key } is needed",
            ));
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut keys = Vec::new();
    let mut infos = Vec::new();
    for (i, c) in certs.iter().enumerate() {
        let c = c.get_ref();
        let ckey = format!("server.tls.certs[{i}].cert");
        let kkey = format!("server.tls.certs[{i}].key");
        let cert_path = base.join(c.cert.get_ref());
        let key_path = base.join(c.key.get_ref());
        let chain = read_certs(&cert_path).map_err(|e| src.err(c.cert.span(), &ckey, e))?;
        let names = dns_names(&chain[0]).map_err(|e| {
            src.err(
                c.cert.span(),
                &ckey,
                format!("{}: {e}", cert_path.display()),
            )
        })?;
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| {
            src.err(
                c.key.span(),
                &kkey,
                format!("{}: {}", key_path.display(), pem_error(&e, "private key")),
            )
        })?;
        let ck = CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
            let why = match e {
                rustls::Error::InconsistentKeys(_) => format!(
                    "{} does not match the certificate in {}",
                    key_path.display(),
                    cert_path.display()
                ),
                e => format!("{}: unusable private key: {e}", key_path.display()),
            };
            src.err(c.key.span(), &kkey, why)
        })?;
        keys.push((names.clone(), Arc::new(ck)));
        infos.push(CertInfo {
            cert: cert_path,
            names,
        });
    }
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| src.err(raw.span(), "server.tls", e))?;
    let mut client_ca = None;
    let builder = match &t.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let path = base.join(ca.get_ref());
            let certs =
                read_certs(&path).map_err(|e| src.err(ca.span(), "server.tls.client_ca", e))?;
            let mut roots = rustls::RootCertStore::empty();
            for c in certs {
                roots.add(c).map_err(|e| {
                    src.err(
                        ca.span(),
                        "server.tls.client_ca",
                        format!("{}: not a usable CA certificate: {e}", path.display()),
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| {
                    src.err(
                        ca.span(),
                        "server.tls.client_ca",
                        format!("{}: {e}", path.display()),
                    )
                })?;
            client_ca = Some(path);
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder.with_cert_resolver(Arc::new(SniResolver { certs: keys }));
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsSettings {
        listen,
        certs: infos,
        client_ca,
        server: Arc::new(server),
    })
}

/// The certificates of a PEM file (at least one, each a parseable X.509 certificate).
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let iter = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {}", path.display(), pem_error(&e, "certificate")))?;
    let mut out = Vec::new();
    for c in iter {
        out.push(c.map_err(|e| format!("{}: {}", path.display(), pem_error(&e, "certificate")))?);
    }
    if out.is_empty() {
        return Err(format!(
            "{}: no PEM certificate (\"-----BEGIN CERTIFICATE-----\") in the file",
            path.display()
        ));
    }
    for c in &out {
        webpki::EndEntityCert::try_from(c)
            .map_err(|e| format!("{}: not a valid X.509 certificate: {e:?}", path.display()))?;
    }
    Ok(out)
}

fn pem_error(e: &rustls::pki_types::pem::Error, what: &str) -> String {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::Io(e) => format!("cannot read: {e}"),
        E::NoItemsFound => format!("no PEM {what} in the file"),
        e => format!("bad PEM: {e:?}"),
    }
}

/// The DNS names of a certificate's subjectAltName, lowercase.
fn dns_names(der: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    let ee = webpki::EndEntityCert::try_from(der)
        .map_err(|e| format!("not a valid X.509 certificate: {e:?}"))?;
    Ok(ee
        .valid_dns_names()
        .map(|n| n.to_ascii_lowercase())
        .collect())
}

/// Picks the certificate for the client's SNI name.
#[derive(Debug)]
struct SniResolver {
    certs: Vec<(Vec<String>, Arc<CertifiedKey>)>,
}

impl SniResolver {
    fn pick(&self, name: Option<&str>) -> Option<&Arc<CertifiedKey>> {
        if let Some(name) = name {
            let name = name.trim_end_matches('.');
            if let Some((_, k)) = self
                .certs
                .iter()
                .find(|(names, _)| names.iter().any(|n| n.eq_ignore_ascii_case(name)))
            {
                return Some(k);
            }
            if let Some((_, k)) = self
                .certs
                .iter()
                .find(|(names, _)| names.iter().any(|n| wildcard_match(n, name)))
            {
                return Some(k);
            }
        }
        self.certs.first().map(|(_, k)| k)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name()).cloned()
    }
}

/// `*.example.com` matches `a.example.com`, not `example.com` nor `a.b.example.com`.
fn wildcard_match(pattern: &str, name: &str) -> bool {
    let Some(suffix) = pattern.strip_prefix("*.") else {
        return false;
    };
    match name.split_once('.') {
        Some((label, rest)) => !label.is_empty() && rest.eq_ignore_ascii_case(suffix),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_cover_one_label() {
        assert!(wildcard_match("*.example.com", "a.example.com"));
        assert!(wildcard_match("*.example.com", "A.EXAMPLE.com"));
        assert!(!wildcard_match("*.example.com", "example.com"));
        assert!(!wildcard_match("*.example.com", "a.b.example.com"));
        assert!(!wildcard_match("*.example.com", ".example.com"));
        assert!(!wildcard_match("www.example.com", "www.example.com"));
    }

    fn key(name: &str) -> (Vec<String>, Arc<CertifiedKey>) {
        let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        let provider = rustls::crypto::ring::default_provider();
        let k = CertifiedKey::from_der(
            vec![c.cert.der().clone()],
            PrivateKeyDer::try_from(c.key_pair.serialize_der()).unwrap(),
            &provider,
        )
        .unwrap();
        (dns_names(c.cert.der()).unwrap(), Arc::new(k))
    }

    #[test]
    fn sni_prefers_exact_then_wildcard_then_first() {
        let r = SniResolver {
            certs: vec![key("a.test"), key("*.b.test"), key("x.b.test")],
        };
        let which = |n: Option<&str>| {
            let k = r.pick(n).unwrap();
            r.certs.iter().position(|(_, c)| Arc::ptr_eq(c, k)).unwrap()
        };
        assert_eq!(which(Some("a.test")), 0);
        assert_eq!(which(Some("x.b.test")), 2);
        assert_eq!(which(Some("y.b.test")), 1);
        assert_eq!(which(Some("Y.B.TEST.")), 1);
        assert_eq!(which(Some("nope.test")), 0);
        assert_eq!(which(None), 0);
    }
}
