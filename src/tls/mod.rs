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
            let why = match e {
                // rustls reads no encrypted keys (nor does nginx without a passphrase file).
                rustls::pki_types::pem::Error::NoItemsFound if pem_has(&key_path, "ENCRYPTED") => {
                    "the private key is encrypted: give it unencrypted (`openssl pkey -in KEY \
                     -out PLAIN`), readable by the gateway only"
                        .to_string()
                }
                e => pem_error(&e, "private key"),
            };
            src.err(
                c.key.span(),
                &kkey,
                format!("{}: {why}", key_path.display()),
            )
        })?;
        // Which certificate of the file the key is for, when it is not the first.
        let leaf_at = |chain: &[CertificateDer<'static>], key: &PrivateKeyDer<'static>| {
            (1..chain.len()).find(|&k| {
                CertifiedKey::from_der(vec![chain[k].clone()], key.clone_key(), &provider).is_ok()
            })
        };
        let misplaced = leaf_at(&chain, &key);
        let ck = CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
            let why = match (e, misplaced) {
                (rustls::Error::InconsistentKeys(_), Some(k)) => format!(
                    "{} is for certificate {} of {}, not the first: the file must list the \
                     server's own certificate (the leaf) first, then its intermediates",
                    key_path.display(),
                    k + 1,
                    cert_path.display()
                ),
                (rustls::Error::InconsistentKeys(_), None) => format!(
                    "{} does not match the certificate in {}",
                    key_path.display(),
                    cert_path.display()
                ),
                (e, _) => format!(
                    "{}: unusable private key ({e}): an unsupported type or size; supported: \
                     RSA of 2048 bits or more, ECDSA on P-256 or P-384, Ed25519",
                    key_path.display()
                ),
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
    // HTTP/1.0 is served on the same port, so a client that offers only `http/1.0` gets it
    // (as from nginx) rather than a failed handshake.
    server.alpn_protocols = vec![b"http/1.1".to_vec(), b"http/1.0".to_vec()];
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

/// Whether the PEM file at `path` has a `-----BEGIN ...` line containing `word`.
fn pem_has(path: &Path, word: &str) -> bool {
    std::fs::read(path).is_ok_and(|b| {
        b.split(|&c| c == b'\n')
            .filter(|l| l.starts_with(b"-----BEGIN "))
            .any(|l| l.windows(word.len()).any(|w| w == word.as_bytes()))
    })
}

fn pem_error(e: &rustls::pki_types::pem::Error, what: &str) -> String {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::Io(e) => format!("cannot read: {e}"),
        E::NoItemsFound => format!("no PEM {what} in the file"),
        E::MissingSectionEnd { end_marker } => format!(
            "bad PEM: a `{}` section has no END line (is the file cut short?)",
            String::from_utf8_lossy(end_marker)
        ),
        // The line itself is not shown: in a key file it may be key material.
        E::IllegalSectionStart { .. } => "bad PEM: a malformed `-----BEGIN` line".to_string(),
        E::Base64Decode(_) => "bad PEM: a section's base64 does not decode".to_string(),
        E::SectionTooLarge => "bad PEM: a section is over 256 MB".to_string(),
        _ => "bad PEM".to_string(),
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

/// Most subjectAltName entries (URI and DNS together) put in `x-forwarded-client-cert`.
const XFCC_MAX_SANS: usize = 16;
/// Longest `Subject`, `URI` or `DNS` value put in `x-forwarded-client-cert` (longer ones are
/// left out rather than cut).
const XFCC_MAX_VALUE: usize = 1024;

/// The `x-forwarded-client-cert` value for a verified client certificate, in Envoy's form:
/// `Hash=<SHA-256 of the DER, hex>`, then `Subject="<RFC 4514 name>"` ([`rfc4514`]) and one `URI=` or `DNS=`
/// for each of those subjectAltName entries (at most [`XFCC_MAX_SANS`]). Values holding `,`,
/// `;`, `=` or `"` are quoted, `"` and `\` escaped with `\`; bytes outside printable ASCII are
/// written as `\xHH`, so nothing but visible ASCII and spaces reaches the header. A certificate
/// the parser cannot read still gets its `Hash`.
pub fn xfcc(der: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    let mut out = b"Hash=".to_vec();
    out.extend_from_slice(crate::policy::auth::api_key::hex(&sha2::Sha256::digest(der)).as_bytes());
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return out;
    };
    xfcc_pair(&mut out, "Subject", &rfc4514(cert.subject()), true);
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        use x509_parser::extensions::GeneralName;
        let mut n = 0;
        for name in &san.value.general_names {
            let (key, v) = match name {
                GeneralName::URI(u) => ("URI", *u),
                GeneralName::DNSName(d) => ("DNS", *d),
                _ => continue,
            };
            if n == XFCC_MAX_SANS {
                break;
            }
            n += 1;
            xfcc_pair(&mut out, key, v, false);
        }
    }
    out
}

/// A distinguished name as RFC 4514 writes it: the last RDN first, RDNs joined by `,`, the
/// attributes of one RDN by `+`, short names (`CN`, `O`, ...) where known, else the dotted
/// OID, and `,`, `+`, `"`, `\`, `<`, `>`, `;`, a leading `#` or space and a trailing space
/// escaped with `\`. A value that is not a string is written `#` and its DER content in hex.
fn rfc4514(name: &x509_parser::x509::X509Name<'_>) -> String {
    let reg = x509_parser::objects::oid_registry();
    let mut out = String::new();
    let rdns: Vec<_> = name.iter_rdn().collect();
    for (i, rdn) in rdns.iter().rev().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, atv) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            match x509_parser::objects::oid2abbrev(atv.attr_type(), reg) {
                Ok(abbrev) => out.push_str(abbrev),
                Err(_) => out.push_str(&atv.attr_type().to_id_string()),
            }
            out.push('=');
            let Ok(v) = atv.as_str() else {
                out.push('#');
                out.push_str(&crate::policy::auth::api_key::hex(atv.attr_value().data));
                continue;
            };
            let last = v.chars().count().saturating_sub(1);
            for (k, c) in v.chars().enumerate() {
                let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
                    || (k == 0 && matches!(c, '#' | ' '))
                    || (k == last && c == ' ');
                if special {
                    out.push('\\');
                }
                out.push(c);
            }
        }
    }
    out
}

fn xfcc_pair(out: &mut Vec<u8>, key: &str, value: &str, always_quote: bool) {
    if value.len() > XFCC_MAX_VALUE {
        return;
    }
    let quote = always_quote
        || value
            .bytes()
            .any(|b| matches!(b, b',' | b';' | b'=' | b'"'));
    out.push(b';');
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    if quote {
        out.push(b'"');
    }
    for b in value.bytes() {
        match b {
            b'"' | b'\\' => out.extend_from_slice(&[b'\\', b]),
            0x20..=0x7e => out.push(b),
            _ => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
        }
    }
    if quote {
        out.push(b'"');
    }
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

    #[test]
    fn xfcc_names_subject_and_sans_safely() {
        use rcgen::{CertificateParams, DnType, KeyPair, SanType};
        let mut p = CertificateParams::new(vec!["svc.test".to_string()]).unwrap();
        p.distinguished_name
            .push(DnType::CommonName, "Doe, \"J\" \u{e9}");
        p.distinguished_name.push(DnType::OrganizationName, "Acme");
        p.subject_alt_names
            .push(SanType::URI("spiffe://acme/ns/a;b".try_into().unwrap()));
        let cert = p.self_signed(&KeyPair::generate().unwrap()).unwrap();
        let v = String::from_utf8(xfcc(cert.der())).unwrap();
        let (hash, rest) = v.split_once(';').unwrap();
        assert_eq!(hash.len(), "Hash=".len() + 64, "{v}");
        // RFC 4514 inside (last RDN first, `,` and `"` escaped), then quoted for the header
        // (`\` and `"` escaped again); the non-ASCII letter written as its UTF-8 bytes.
        assert_eq!(
            rest,
            r#"Subject="O=Acme,CN=Doe\\, \\\"J\\\" \xc3\xa9";DNS=svc.test;URI="spiffe://acme/ns/a;b""#
        );
        assert!(v.bytes().all(|b| (0x20..0x7f).contains(&b)), "{v}");
        // Not a certificate: the hash only.
        let v = xfcc(b"not a certificate");
        assert!(v.starts_with(b"Hash=") && !v.contains(&b';'));
    }
}
