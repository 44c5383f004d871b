//! `[server.tls]` through the real binary on real sockets: certificates made with rcgen in a
//! temp dir, curl as the independent client (`--cacert`, `--resolve` for SNI, `--cert/--key`
//! for mTLS), and a rustls client where exact control of one connection is needed (keep-alive
//! across the idle park, pipelining, wss).

mod common;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use ringgate::ws::frame::{self, op};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

struct Issuer {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn ca(name: &str) -> Issuer {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    Issuer { cert, key }
}

/// A leaf certificate for `names` signed by `by`, written as `dir/file.pem` and `dir/file.key`.
fn leaf(dir: &Path, file: &str, names: &[&str], by: &Issuer, client: bool) {
    let mut p =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name
        .push(DnType::CommonName, names.first().copied().unwrap_or(file));
    p.extended_key_usages = vec![if client {
        ExtendedKeyUsagePurpose::ClientAuth
    } else {
        ExtendedKeyUsagePurpose::ServerAuth
    }];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &by.cert, &by.key).unwrap();
    std::fs::write(dir.join(format!("{file}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{file}.key")), key.serialize_pem()).unwrap();
}

/// A temp dir with: `ca.pem` (signs `a` for a.test, *.wild.test and IP 127.0.0.1, `b` for
/// b.test),
/// `client-ca.pem` (signs `client` and `client2`), `other-ca.pem` (signs `rogue`, a client certificate
/// client_ca does not vouch for), and `ca2.pem` (signs `a2`, another a.test).
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = temp_dir("tls-pki");
        let server_ca = ca("ringgate test CA");
        std::fs::write(dir.join("ca.pem"), server_ca.cert.pem()).unwrap();
        leaf(
            &dir,
            "a",
            &["a.test", "*.wild.test", "127.0.0.1"],
            &server_ca,
            false,
        );
        leaf(&dir, "b", &["b.test"], &server_ca, false);
        let client_ca = ca("ringgate client CA");
        std::fs::write(dir.join("client-ca.pem"), client_ca.cert.pem()).unwrap();
        leaf(&dir, "client", &["client.test"], &client_ca, true);
        leaf(&dir, "client2", &["client2.test"], &client_ca, true);
        let other = ca("someone else's CA");
        std::fs::write(dir.join("other-ca.pem"), other.cert.pem()).unwrap();
        leaf(&dir, "rogue", &["rogue.test"], &other, true);
        let ca2 = ca("ringgate second CA");
        std::fs::write(dir.join("ca2.pem"), ca2.cert.pem()).unwrap();
        leaf(&dir, "a2", &["a.test"], &ca2, false);
        Pki { dir }
    }

    fn path(&self, f: &str) -> String {
        self.dir.join(f).display().to_string()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        if !thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Gateway with a TLS listener
// ---------------------------------------------------------------------------------------------

struct TlsGateway {
    gw: Gateway,
    tls: SocketAddr,
}

/// `[server]` with a plain and a TLS listener (`@TLS@` in `tls_table` is the TLS address),
/// then `rest`. Retries with new ports when one was taken meanwhile.
fn start(server_extra: &str, tls_table: &str, rest: &str) -> TlsGateway {
    let mut last = String::new();
    for _ in 0..3 {
        let tls = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let toml = format!(
            r#"
[server]
listen = ["@LISTEN@"]
workers = 2
shutdown_timeout_ms = 3000
state_dir = "@DIR@/state"
{server_extra}

[server.tls]
{tls_table}

[admin]
listen = "@ADMIN@"

{rest}
"#
        )
        .replace("@TLS@", &tls.to_string());
        match Gateway::try_start(&toml) {
            Ok(gw) => return TlsGateway { gw, tls },
            Err(e) if e.contains("ddress already in use") => last = e,
            Err(e) => panic!("{e}"),
        }
    }
    panic!("{last}")
}

fn certs_a_b(pki: &Pki) -> String {
    format!(
        r#"listen = ["@TLS@"]
certs = [{{ cert = "{}", key = "{}" }}, {{ cert = "{}", key = "{}" }}]"#,
        pki.path("a.pem"),
        pki.path("a.key"),
        pki.path("b.pem"),
        pki.path("b.key")
    )
}

fn proxy_routes(origin: SocketAddr) -> String {
    format!(
        r#"
[access_log]
path = "@DIR@/access.log"

[[upstreams]]
name = "be"
targets = ["{origin}"]

[[apis]]
name = "shop"

[[apis.routes]]
route = "ANY /api/{{p+}}"
integration = {{ type = "http", upstream = "be", path = "/{{p}}" }}

[[apis.routes]]
route = "GET /hello"
integration = {{ type = "mock", status = 200, body = "hello" }}
"#
    )
}

// ---------------------------------------------------------------------------------------------
// curl
// ---------------------------------------------------------------------------------------------

struct Curl {
    code: i32,
    stdout: String,
    stderr: String,
}

fn curl(args: &[&str]) -> Curl {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("curl is installed");
    Curl {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
    }
}

fn resolve(name: &str, addr: SocketAddr) -> String {
    format!("{name}:{}:127.0.0.1", addr.port())
}

fn url(name: &str, addr: SocketAddr, path: &str) -> String {
    format!("https://{name}:{}{path}", addr.port())
}

/// The subject line curl prints for the served certificate (`-v`).
fn served_subject(c: &Curl) -> String {
    c.stderr
        .lines()
        .find(|l| l.contains("subject:"))
        .unwrap_or("")
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// A rustls client
// ---------------------------------------------------------------------------------------------

type TlsClient = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

fn client_config(ca: &str, client: Option<(&str, &str)>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let cfg = match client {
        None => b.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .unwrap()
                .map(|c| c.unwrap())
                .collect();
            b.with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(key).unwrap())
                .unwrap()
        }
    };
    Arc::new(cfg)
}

fn tls_connect(addr: SocketAddr, name: &str, cfg: Arc<rustls::ClientConfig>) -> TlsClient {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_nodelay(true).unwrap();
    let conn = rustls::ClientConnection::new(cfg, ServerName::try_from(name.to_string()).unwrap())
        .unwrap();
    let mut t = rustls::StreamOwned::new(conn, s);
    while t.conn.is_handshaking() {
        t.conn.complete_io(&mut t.sock).expect("TLS handshake");
    }
    t
}

/// Reads one response with a Content-Length body: (status, head, body).
fn read_response(s: &mut impl Read, buf: &mut Vec<u8>) -> (u16, String, Vec<u8>) {
    let end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        let mut tmp = [0u8; 8192];
        let n = s.read(&mut tmp).expect("read response");
        assert!(n > 0, "closed before a response");
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let status: u16 = head[9..12].parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    while buf.len() < end + len {
        let mut tmp = [0u8; 8192];
        let n = s.read(&mut tmp).expect("read body");
        assert!(n > 0, "closed in a body");
        buf.extend_from_slice(&tmp[..n]);
    }
    let body = buf[end..end + len].to_vec();
    buf.drain(..end + len);
    (status, head, body)
}

/// Whether the peer closes the connection (EOF or reset) within the read timeout.
fn closed_by_peer(s: &mut TcpStream) -> bool {
    let mut tmp = [0u8; 4096];
    loop {
        match s.read(&mut tmp) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Proxying, keep-alive, scheme
// ---------------------------------------------------------------------------------------------

#[test]
fn proxied_request_over_tls_reaches_origin_as_https() {
    let pki = Pki::new();
    let origin = Origin::start(|r| Response::ok(format!("origin saw {}", r.path)));
    let g = start("", &certs_a_b(&pki), &proxy_routes(origin.addr));
    let c = curl(&[
        "--cacert",
        &pki.path("ca.pem"),
        "--resolve",
        &resolve("a.test", g.tls),
        &url("a.test", g.tls, "/api/items/7?x=1"),
        "-H",
        "X-Forwarded-Proto: spoofed",
    ]);
    assert_eq!(c.code, 0, "{}", c.stderr);
    assert_eq!(c.stdout, "origin saw /items/7?x=1");
    let r = origin.last_request();
    assert_eq!(r.header("x-forwarded-proto"), Some("https"));
    assert_eq!(r.headers_named("x-forwarded-proto").len(), 1);
    assert_eq!(r.header("x-forwarded-for"), Some("127.0.0.1"));
    assert!(r.header("x-request-id").is_some());

    // The plain listener still says http.
    let plain = g.gw.get("/api/plain");
    assert_eq!(plain.status, 200);
    assert_eq!(
        origin.last_request().header("x-forwarded-proto"),
        Some("http")
    );

    // A body goes up over TLS too (buffered and streamed parts).
    let big = "z".repeat(300_000);
    let body_file = pki.dir.join("body.txt");
    std::fs::write(&body_file, &big).unwrap();
    let c = curl(&[
        "--cacert",
        &pki.path("ca.pem"),
        "--resolve",
        &resolve("a.test", g.tls),
        "--data-binary",
        &format!("@{}", body_file.display()),
        &url("a.test", g.tls, "/api/upload"),
    ]);
    assert_eq!(c.code, 0, "{}", c.stderr);
    let r = origin.last_request();
    assert_eq!(r.method, "POST");
    assert_eq!(r.body_len, big.len() as u64);

    // The access log says https for TLS requests and http for plain ones.
    let log = g.gw.dir.join("access.log");
    assert!(
        wait_until(Duration::from_secs(3), || {
            std::fs::read_to_string(&log)
                .map(|t| t.lines().count() >= 3)
                .unwrap_or(false)
        }),
        "access log lines missing"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let scheme_of = |path: &str| {
        lines
            .iter()
            .find(|l| l["path"].as_str().unwrap_or("").starts_with(path))
            .map(|l| l["scheme"].as_str().unwrap_or("").to_string())
    };
    assert_eq!(scheme_of("/api/items").as_deref(), Some("https"), "{text}");
    assert_eq!(scheme_of("/api/plain").as_deref(), Some("http"), "{text}");
}

fn keep_alive_case(io: &str) {
    let pki = Pki::new();
    let origin = Origin::start(|r| Response::ok(r.path.clone()));
    let g = start(
        &format!("io = \"{io}\""),
        &certs_a_b(&pki),
        &proxy_routes(origin.addr),
    );
    // curl: three URLs, one connection (num_connects is 1 for the first transfer only).
    let u = url("a.test", g.tls, "/api/k");
    let c = curl(&[
        "--cacert",
        &pki.path("ca.pem"),
        "--resolve",
        &resolve("a.test", g.tls),
        "-w",
        " connects=%{num_connects}\n",
        &u,
        &u,
        &u,
    ]);
    assert_eq!(c.code, 0, "{}", c.stderr);
    assert_eq!(
        c.stdout, "/k connects=1\n/k connects=0\n/k connects=0\n",
        "{}",
        c.stderr
    );

    // rustls client: requests on one connection, pipelined ones, and requests after the
    // connection sat idle past the grace period (parked without buffers, then woken).
    let cfg = client_config(&pki.path("ca.pem"), None);
    let mut t = tls_connect(g.tls, "a.test", cfg);
    let mut buf = Vec::new();
    for i in 0..3 {
        write!(t, "GET /api/seq{i} HTTP/1.1\r\nHost: a.test\r\n\r\n").unwrap();
        let (st, _, body) = read_response(&mut t, &mut buf);
        assert_eq!((st, body), (200, format!("/seq{i}").into_bytes()));
    }
    t.write_all(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\nGET /api/p1 HTTP/1.1\r\nHost: a\r\n\r\nGET /hello HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    for want in ["hello", "/p1", "hello"] {
        let (st, _, body) = read_response(&mut t, &mut buf);
        assert_eq!(
            (st, String::from_utf8(body).unwrap()),
            (200, want.to_string())
        );
    }
    for i in 0..2 {
        thread::sleep(Duration::from_millis(700));
        write!(t, "GET /api/idle{i} HTTP/1.1\r\nHost: a.test\r\n\r\n").unwrap();
        let (st, _, body) = read_response(&mut t, &mut buf);
        assert_eq!((st, body), (200, format!("/idle{i}").into_bytes()));
    }
    // A request split in two TLS records with a pause between them.
    t.write_all(b"GET /api/split HTTP/1.1\r\nHo").unwrap();
    t.flush().unwrap();
    thread::sleep(Duration::from_millis(400));
    t.write_all(b"st: a.test\r\n\r\n").unwrap();
    let (st, _, body) = read_response(&mut t, &mut buf);
    assert_eq!((st, body), (200, b"/split".to_vec()));
    // Connection: close ends it with close_notify.
    t.write_all(b"GET /hello HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (st, head, _) = read_response(&mut t, &mut buf);
    assert_eq!(st, 200);
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    let mut rest = Vec::new();
    assert_eq!(t.read_to_end(&mut rest).unwrap(), 0, "clean close_notify");
}

/// Connections the gateway closes while they idle (parked) end with close_notify too: at the
/// idle timeout, a client that sent nothing after its handshake, and at shutdown.
#[test]
fn idle_tls_connections_are_closed_with_close_notify() {
    for io in ["io_uring", "epoll"] {
        let pki = Pki::new();
        let origin = Origin::start(|r| Response::ok(r.path.clone()));
        let g = start(
            &format!(
                "io = \"{io}\"\n[server.limits]\nidle_timeout_ms = 1200\nheader_timeout_ms = 1200"
            ),
            &certs_a_b(&pki),
            &proxy_routes(origin.addr),
        );
        let cfg = client_config(&pki.path("ca.pem"), None);
        let mut buf = Vec::new();
        // Idle after a request, and silent after the handshake.
        let mut served = tls_connect(g.tls, "a.test", cfg.clone());
        write!(served, "GET /api/x HTTP/1.1\r\nHost: a.test\r\n\r\n").unwrap();
        assert_eq!(read_response(&mut served, &mut buf).0, 200);
        let mut silent = tls_connect(g.tls, "a.test", cfg.clone());
        silent.flush().unwrap();
        for (what, t) in [("idle", &mut served), ("silent", &mut silent)] {
            let mut rest = Vec::new();
            let r = t.read_to_end(&mut rest);
            assert!(
                matches!(r, Ok(0)),
                "{io}, {what}: {r:?} (an error is an end without close_notify)"
            );
        }
        // Shutdown: an idle keep-alive connection is closed cleanly too.
        let mut idle = tls_connect(g.tls, "a.test", cfg);
        write!(idle, "GET /api/y HTTP/1.1\r\nHost: a.test\r\n\r\n").unwrap();
        assert_eq!(read_response(&mut idle, &mut buf).0, 200);
        thread::sleep(Duration::from_millis(700));
        let TlsGateway { mut gw, .. } = g;
        gw.terminate();
        let mut rest = Vec::new();
        let r = idle.read_to_end(&mut rest);
        assert!(matches!(r, Ok(0)), "{io}, shutdown: {r:?}");
        assert!(gw.wait_exit(Duration::from_secs(10)).is_some());
    }
}

#[test]
fn keep_alive_over_tls_io_auto() {
    keep_alive_case("auto");
}

#[test]
fn keep_alive_over_tls_epoll() {
    keep_alive_case("epoll");
}

// ---------------------------------------------------------------------------------------------
// SNI
// ---------------------------------------------------------------------------------------------

#[test]
fn sni_picks_the_certificate_by_name() {
    let pki = Pki::new();
    let g = start("", &certs_a_b(&pki), &proxy_routes(dead_addr()));
    let get = |name: &str, extra: &[&str]| {
        let r = resolve(name, g.tls);
        let u = url(name, g.tls, "/hello");
        let ca = pki.path("ca.pem");
        let mut args = vec!["-v", "--cacert", &ca, "--resolve", &r];
        args.extend_from_slice(extra);
        args.push(&u);
        curl(&args)
    };
    // Each name gets its own certificate: verified against the name, so a wrong pick fails.
    for (name, cn) in [
        ("a.test", "CN=a.test"),
        ("b.test", "CN=b.test"),
        ("x.wild.test", "CN=a.test"),
    ] {
        let c = get(name, &[]);
        assert_eq!(c.code, 0, "{name}: {}", c.stderr);
        assert_eq!(c.stdout, "hello");
        assert!(served_subject(&c).contains(cn), "{name}: {}", c.stderr);
    }
    // An unknown name gets the first certificate (so strict verification fails, exit 60).
    let c = get("c.test", &[]);
    assert_eq!(c.code, 60, "{}", c.stderr);
    let c = get("c.test", &["-k"]);
    assert_eq!(c.code, 0, "{}", c.stderr);
    assert!(served_subject(&c).contains("CN=a.test"), "{}", c.stderr);
    // No SNI at all (an IP address): the first certificate.
    let ip = format!("https://127.0.0.1:{}/hello", g.tls.port());
    let c = curl(&["-v", "-k", &ip]);
    assert_eq!(c.code, 0, "{}", c.stderr);
    assert!(served_subject(&c).contains("CN=a.test"), "{}", c.stderr);
}

/// ALPN: the gateway speaks HTTP/1.1 and HTTP/1.0 on its TLS port, so a client offering
/// either (alone, or after `h2`) gets it; one offering neither fails the handshake.
#[test]
fn alpn_picks_http_1_1_or_http_1_0() {
    let pki = Pki::new();
    let g = start("", &certs_a_b(&pki), &proxy_routes(dead_addr()));
    let ca = pki.path("ca.pem");
    let offer = |protos: &[&[u8]]| {
        let mut cfg = (*client_config(&ca, None)).clone();
        cfg.alpn_protocols = protos.iter().map(|p| p.to_vec()).collect();
        let s = TcpStream::connect(g.tls).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let conn =
            rustls::ClientConnection::new(Arc::new(cfg), ServerName::try_from("a.test").unwrap())
                .unwrap();
        let mut t = rustls::StreamOwned::new(conn, s);
        while t.conn.is_handshaking() {
            if t.conn.complete_io(&mut t.sock).is_err() {
                return None;
            }
        }
        let chosen = t.conn.alpn_protocol().map(|p| p.to_vec());
        t.write_all(b"GET /hello HTTP/1.0\r\nHost: a.test\r\n\r\n")
            .unwrap();
        let (status, _, body) = read_response(&mut t, &mut Vec::new());
        assert_eq!((status, &body[..]), (200, &b"hello"[..]));
        Some(chosen)
    };
    assert_eq!(
        offer(&[b"h2", b"http/1.1"]),
        Some(Some(b"http/1.1".to_vec()))
    );
    assert_eq!(offer(&[b"http/1.0"]), Some(Some(b"http/1.0".to_vec())));
    assert_eq!(
        offer(&[b"h2", b"http/1.0"]),
        Some(Some(b"http/1.0".to_vec()))
    );
    assert_eq!(offer(&[]), Some(None));
    assert_eq!(offer(&[b"h2"]), None, "no protocol in common");
}

// ---------------------------------------------------------------------------------------------
// mTLS
// ---------------------------------------------------------------------------------------------

#[test]
fn verified_client_certificate_goes_upstream_as_xfcc_and_clients_cannot_forge_it() {
    let pki = Pki::new();
    let origin = Origin::fixed("ok");
    let tls = format!(
        "{}\nclient_ca = \"{}\"",
        certs_a_b(&pki),
        pki.path("client-ca.pem")
    );
    let g = start("", &tls, &proxy_routes(origin.addr));
    let r = resolve("a.test", g.tls);
    let u = url("a.test", g.tls, "/api/x");
    let (ca, cert, key) = (
        pki.path("ca.pem"),
        pki.path("client.pem"),
        pki.path("client.key"),
    );
    let c = curl(&[
        "--cacert",
        &ca,
        "--resolve",
        &r,
        "--cert",
        &cert,
        "--key",
        &key,
        "-H",
        "x-forwarded-client-cert: Hash=forged",
        &u,
    ]);
    assert_eq!(c.code, 0, "{}", c.stderr);
    let req = origin.last_request();
    assert_eq!(
        req.headers_named("x-forwarded-client-cert"),
        vec![client_xfcc(&pki)]
    );
    // On the plain listener a client-sent value is dropped, never passed on.
    let resp = g.gw.request(
        "GET /api/y HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-Client-Cert: Hash=forged\r\n\r\n",
    );
    assert_eq!(resp.status, 200);
    let req = origin.last_request();
    assert_eq!(req.path, "/y");
    assert!(req.headers_named("x-forwarded-client-cert").is_empty());
}

/// The cache keeps apart what the upstream may answer differently: plain and https requests
/// (it learns the scheme from `X-Forwarded-Proto`), and each verified client certificate (it
/// learns it from `x-forwarded-client-cert`).
#[test]
fn cached_answers_are_kept_apart_by_scheme_and_client_certificate() {
    let pki = Pki::new();
    let origin = Origin::start(|r| {
        let proto = r.headers_named("x-forwarded-proto").join(",");
        let cert = r.headers_named("x-forwarded-client-cert").join(",");
        let subject = cert.split(';').nth(1).unwrap_or("none").to_string();
        Response::ok(format!("{proto} {subject}"))
    });
    let tls = format!(
        "{}\nclient_ca = \"{}\"",
        certs_a_b(&pki),
        pki.path("client-ca.pem")
    );
    let rest = proxy_routes(origin.addr).replacen(
        "[[apis.routes]]",
        "[apis.stages.\"$default\"]\ncache = { ttl_s = 60 }\n\n[[apis.routes]]",
        1,
    );
    let g = start("", &tls, &rest);
    // Plain first: stored for plain requests only.
    let r = g.gw.request("GET /api/c HTTP/1.1\r\nHost: a.test\r\n\r\n");
    assert_eq!(r.text(), "http none");
    assert_eq!(r.header("x-cache"), Some("miss"));
    let r = g.gw.request("GET /api/c HTTP/1.1\r\nHost: a.test\r\n\r\n");
    assert_eq!(r.header("x-cache"), Some("hit"), "the route is cached");
    let get = |who: &str| {
        let (ca, cert, key) = (
            pki.path("ca.pem"),
            pki.path(&format!("{who}.pem")),
            pki.path(&format!("{who}.key")),
        );
        let c = curl(&[
            "-i",
            "--cacert",
            &ca,
            "--resolve",
            &resolve("a.test", g.tls),
            "--cert",
            &cert,
            "--key",
            &key,
            &url("a.test", g.tls, "/api/c"),
        ]);
        assert_eq!(c.code, 0, "{}", c.stderr);
        let hit = c.stdout.to_ascii_lowercase().contains("x-cache: hit");
        (c.stdout.lines().last().unwrap_or("").to_string(), hit)
    };
    let alice = get("client");
    assert_eq!(
        alice,
        ("https Subject=\"CN=client.test\"".to_string(), false)
    );
    let bob = get("client2");
    assert_eq!(bob.0, "https Subject=\"CN=client2.test\"");
    assert!(
        !bob.1,
        "another certificate's answer was served from the cache"
    );
    // Each certificate is served its own entry.
    assert_eq!(get("client"), (alice.0.clone(), true));
    assert_eq!(get("client2"), (bob.0, true));
}

#[test]
fn client_ca_requires_a_client_certificate() {
    let pki = Pki::new();
    let tls = format!(
        "{}\nclient_ca = \"{}\"",
        certs_a_b(&pki),
        pki.path("client-ca.pem")
    );
    let g = start("", &tls, &proxy_routes(dead_addr()));
    let base = |extra: &[&str]| {
        let r = resolve("a.test", g.tls);
        let u = url("a.test", g.tls, "/hello");
        let ca = pki.path("ca.pem");
        let mut args = vec!["--cacert", &ca, "--resolve", &r];
        args.extend_from_slice(extra);
        args.push(&u);
        curl(&args)
    };
    // No certificate: refused.
    let c = base(&[]);
    assert_ne!(
        c.code, 0,
        "served without a client certificate: {}",
        c.stdout
    );
    assert!(c.stdout.is_empty());
    // A certificate from another CA: refused.
    let (cert, key) = (pki.path("rogue.pem"), pki.path("rogue.key"));
    let c = base(&["--cert", &cert, "--key", &key]);
    assert_ne!(c.code, 0, "served a rogue certificate: {}", c.stdout);
    // Signed by client_ca: served.
    let (cert, key) = (pki.path("client.pem"), pki.path("client.key"));
    let c = base(&["--cert", &cert, "--key", &key]);
    assert_eq!(c.code, 0, "{}", c.stderr);
    assert_eq!(c.stdout, "hello");

    // The same with the rustls client: without a certificate the handshake is refused.
    let cfg = client_config(&pki.path("ca.pem"), None);
    let s = TcpStream::connect(g.tls).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let conn = rustls::ClientConnection::new(cfg, ServerName::try_from("a.test").unwrap()).unwrap();
    let mut t = rustls::StreamOwned::new(conn, s);
    let refused = t
        .write_all(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n")
        .and_then(|_| {
            let mut b = [0u8; 64];
            t.read(&mut b)
        });
    assert!(
        matches!(refused, Err(_) | Ok(0)),
        "answered without a client certificate: {refused:?}"
    );
    let cfg = client_config(
        &pki.path("ca.pem"),
        Some((&pki.path("client.pem"), &pki.path("client.key"))),
    );
    let mut t = tls_connect(g.tls, "a.test", cfg);
    t.write_all(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    assert_eq!(read_response(&mut t, &mut buf).2, b"hello");
}

// ---------------------------------------------------------------------------------------------
// Bad clients and limits
// ---------------------------------------------------------------------------------------------

#[test]
fn plain_http_and_garbage_on_the_tls_port_are_closed() {
    let pki = Pki::new();
    let g = start("", &certs_a_b(&pki), &proxy_routes(dead_addr()));
    for junk in [
        &b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0xff, 0xff, 0, 0, 0][..],
        &[0u8; 3000][..],
    ] {
        let mut s = TcpStream::connect(g.tls).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(junk).unwrap();
        let t0 = Instant::now();
        let mut got = Vec::new();
        let mut tmp = [0u8; 1024];
        loop {
            match s.read(&mut tmp) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("not closed within 5 s: {e}"),
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(3));
        // At most a TLS alert, never an HTTP answer.
        assert!(
            !got.starts_with(b"HTTP/"),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
    }
    // A connection closed before its first byte (a load balancer's TCP check) began no
    // handshake: it is not counted.
    for _ in 0..3 {
        drop(TcpStream::connect(g.tls).unwrap());
    }
    std::thread::sleep(Duration::from_millis(200));
    let m = g.gw.metrics();
    assert!(
        m.contains("ringgate_tls_handshake_failures_total{reason=\"error\"} 3"),
        "{m}"
    );
    // The gateway is fine: TLS and plain requests work.
    let c = curl(&[
        "--cacert",
        &pki.path("ca.pem"),
        "--resolve",
        &resolve("a.test", g.tls),
        &url("a.test", g.tls, "/hello"),
    ]);
    assert_eq!((c.code, c.stdout.as_str()), (0, "hello"), "{}", c.stderr);
    assert_eq!(g.gw.get("/hello").status, 200);
}

#[test]
fn stalled_handshake_is_closed_by_the_header_timeout() {
    let pki = Pki::new();
    let g = start(
        "[server.limits]\nheader_timeout_ms = 600",
        &certs_a_b(&pki),
        &proxy_routes(dead_addr()),
    );
    // Nothing sent, and half a ClientHello.
    for first in [&b""[..], &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01][..]] {
        let mut s = TcpStream::connect(g.tls).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(first).unwrap();
        let t0 = Instant::now();
        assert!(closed_by_peer(&mut s), "stalled handshake not closed");
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(450) && took < Duration::from_millis(3000),
            "closed after {took:?}"
        );
    }
    assert!(g
        .gw
        .metrics()
        .contains("ringgate_tls_handshake_failures_total{reason=\"timeout\"} 2"));
    // After the handshake, the request head has its own header timeout.
    let cfg = client_config(&pki.path("ca.pem"), None);
    let mut t = tls_connect(g.tls, "a.test", cfg);
    t.write_all(b"GET /hello HTTP/1.1\r\n").unwrap();
    let mut buf = Vec::new();
    let (st, _, _) = read_response(&mut t, &mut buf);
    assert_eq!(st, 408);
    // A handshake done in time works.
    let c = curl(&[
        "--cacert",
        &pki.path("ca.pem"),
        "--resolve",
        &resolve("b.test", g.tls),
        &url("b.test", g.tls, "/hello"),
    ]);
    assert_eq!((c.code, c.stdout.as_str()), (0, "hello"), "{}", c.stderr);
}

#[test]
fn max_connections_counts_tls_connections() {
    let pki = Pki::new();
    let g = start(
        "[server.limits]\nmax_connections = 2",
        &certs_a_b(&pki),
        &proxy_routes(dead_addr()),
    );
    let cfg = client_config(&pki.path("ca.pem"), None);
    let mut t1 = tls_connect(g.tls, "a.test", cfg.clone());
    let mut buf = Vec::new();
    t1.write_all(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut t1, &mut buf).0, 200);
    let _raw = TcpStream::connect(g.tls).unwrap();
    assert!(
        wait_until(Duration::from_secs(3), || g
            .gw
            .metrics()
            .contains("ringgate_connections_active 2")),
        "{}",
        g.gw.metrics()
    );
    // A third connection (TLS or plain) is closed at once.
    let mut s = TcpStream::connect(g.tls).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(closed_by_peer(&mut s));
    let mut p = TcpStream::connect(g.gw.addr).unwrap();
    p.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(closed_by_peer(&mut p));
    drop(t1);
    drop(_raw);
    assert!(wait_until(Duration::from_secs(3), || g
        .gw
        .metrics()
        .contains("ringgate_connections_active 0")));
    let c = curl(&[
        "--cacert",
        &pki.path("ca.pem"),
        "--resolve",
        &resolve("a.test", g.tls),
        &url("a.test", g.tls, "/hello"),
    ]);
    assert_eq!((c.code, c.stdout.as_str()), (0, "hello"), "{}", c.stderr);
}

// ---------------------------------------------------------------------------------------------
// Reload
// ---------------------------------------------------------------------------------------------

#[test]
fn reload_serves_new_certificates_to_new_connections() {
    let pki = Pki::new();
    let site = pki.dir.join("site");
    std::fs::create_dir_all(&site).unwrap();
    std::fs::copy(pki.dir.join("a.pem"), site.join("cert.pem")).unwrap();
    std::fs::copy(pki.dir.join("a.key"), site.join("key.pem")).unwrap();
    let tls = format!(
        "listen = [\"@TLS@\"]\ncerts = [{{ cert = \"{}\", key = \"{}\" }}]",
        site.join("cert.pem").display(),
        site.join("key.pem").display()
    );
    let g = start("", &tls, &proxy_routes(dead_addr()));
    let get = |ca: &str| {
        curl(&[
            "--cacert",
            &pki.path(ca),
            "--resolve",
            &resolve("a.test", g.tls),
            &url("a.test", g.tls, "/hello"),
        ])
    };
    assert_eq!(get("ca.pem").code, 0);
    assert_eq!(get("ca2.pem").code, 60);
    // A connection opened before the reload keeps working after it.
    let cfg = client_config(&pki.path("ca.pem"), None);
    let mut old = tls_connect(g.tls, "a.test", cfg);

    // A broken certificate on reload is refused; the old one stays.
    std::fs::write(site.join("cert.pem"), "not a certificate").unwrap();
    let r = admin_request(g.gw.admin_addr, "POST", "/reload", None).unwrap();
    assert_ne!(r.status, 200, "{}", r.text());
    assert!(
        r.text().contains("server.tls.certs[0].cert"),
        "{}",
        r.text()
    );
    assert_eq!(get("ca.pem").code, 0);

    // New certificate and key: new connections get them.
    std::fs::copy(pki.dir.join("a2.pem"), site.join("cert.pem")).unwrap();
    std::fs::copy(pki.dir.join("a2.key"), site.join("key.pem")).unwrap();
    let r = admin_request(g.gw.admin_addr, "POST", "/reload", None).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(get("ca2.pem").code, 0);
    assert_eq!(get("ca.pem").code, 60);
    let mut buf = Vec::new();
    old.write_all(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut old, &mut buf).2, b"hello");

    // Changing tls.listen needs a restart: said in the log, the bound listener keeps serving.
    let other = free_port();
    g.gw.write_config(
        &std::fs::read_to_string(&g.gw.config_path)
            .unwrap()
            .replace(&g.tls.to_string(), &format!("127.0.0.1:{other}")),
    );
    g.gw.reload_signal();
    assert!(wait_until(Duration::from_secs(3), || g
        .gw
        .stderr()
        .contains("server.tls.listen takes effect at the next restart")));
    assert_eq!(get("ca2.pem").code, 0);
}

#[test]
fn reload_notes_for_tls_on_a_gateway_started_without_it() {
    // No TLS listener runs: adding [server.tls] waits for a restart (no certificate "applies
    // now"), and taking it out again is no change at all.
    let pki = Pki::new();
    let plain = format!(
        "[server]\nlisten = [\"@LISTEN@\"]\nworkers = 1\n[admin]\nlisten = \"@ADMIN@\"\n{}",
        proxy_routes(SocketAddr::from(([127, 0, 0, 1], 9)))
    );
    let gw = Gateway::start(&plain);
    let tls_port = free_port();
    let with_tls = plain.replace(
        "[admin]",
        &format!(
            "[server.tls]\n{}\n[admin]",
            certs_a_b(&pki).replace("@TLS@", &format!("127.0.0.1:{tls_port}"))
        ),
    );
    gw.write_config(&with_tls);
    assert_eq!(
        reload_notes(&gw),
        ["[server.tls] takes effect at the next restart (no TLS listener runs)"]
    );
    gw.write_config(&plain);
    assert_eq!(reload_notes(&gw), Vec::<String>::new());
}

// ---------------------------------------------------------------------------------------------
// Config errors and --check
// ---------------------------------------------------------------------------------------------

/// `--check` on `toml` written as `pki.dir/check.toml` (so relative paths resolve there).
fn check_in(pki: &Pki, tls: &str) -> (i32, String, String) {
    let path = pki.dir.join("check.toml");
    let toml = format!(
        "[server]\nlisten = [\"127.0.0.1:{}\"]\n\n[server.tls]\n{tls}\n\n[[apis]]\nname = \"x\"\n[[apis.routes]]\nroute = \"GET /\"\nintegration = {{ type = \"mock\", status = 200 }}\n",
        free_port()
    );
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ringgate"))
        .args(["--check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn check_shows_tls_listeners_with_relative_paths() {
    let pki = Pki::new();
    let (code, out, err) = check_in(
        &pki,
        "listen = [\"127.0.0.1:18443\"]\ncerts = [{ cert = \"a.pem\", key = \"a.key\" }, { cert = \"b.pem\", key = \"b.key\" }]\nclient_ca = \"client-ca.pem\"",
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("tls listener https://127.0.0.1:18443 (client certificates required)"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "tls certificate {} (default): a.test, *.wild.test",
            pki.path("a.pem")
        )),
        "{out}"
    );
    assert!(out.contains(": b.test"), "{out}");
}

#[test]
fn bad_certificates_are_config_errors_naming_file_line_and_key() {
    let pki = Pki::new();
    std::fs::write(pki.dir.join("junk.pem"), "hello\n").unwrap();
    // A certificate file cut short (a copy that did not finish).
    let whole = std::fs::read_to_string(pki.dir.join("a.pem")).unwrap();
    std::fs::write(pki.dir.join("cut.pem"), &whole[..whole.len() / 2]).unwrap();
    // The CA's certificate before the server's own (the key is for the second).
    let ca = std::fs::read_to_string(pki.dir.join("ca.pem")).unwrap();
    std::fs::write(pki.dir.join("reversed.pem"), format!("{ca}{whole}")).unwrap();
    // An encrypted key (rustls takes none), and a key section that is no key ring can use.
    std::fs::write(
        pki.dir.join("enc.key"),
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
    )
    .unwrap();
    std::fs::write(
        pki.dir.join("odd.key"),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let cases: &[(&str, &[&str])] = &[
        (
            "listen = [\"127.0.0.1:18443\"]\ncerts = [{ cert = \"reversed.pem\", key = \"a.key\" }]",
            &["server.tls.certs[0].key", "is for certificate 2 of", "reversed.pem", "first"],
        ),
        (
            "listen = [\"127.0.0.1:18443\"]\ncerts = [{ cert = \"a.pem\", key = \"enc.key\" }]",
            &["server.tls.certs[0].key", "enc.key", "is encrypted"],
        ),
        (
            "listen = [\"127.0.0.1:18443\"]\ncerts = [{ cert = \"a.pem\", key = \"odd.key\" }]",
            &["server.tls.certs[0].key", "odd.key", "unusable private key", "supported: RSA of 2048 bits"],
        ),
        (
            "listen = [\"127.0.0.1:18443\"]\ncerts = [{ cert = \"missing.pem\", key = \"a.key\" }]",
            &["check.toml:6:", "server.tls.certs[0].cert", "missing.pem", "cannot read"],
        ),
        (
            "listen = [\"127.0.0.1:18443\"]\ncerts = [\n  { cert = \"a.pem\", key = \"a.key\" },\n  { cert = \"a.pem\", key = \"b.key\" },\n]",
            &["check.toml:8:", "server.tls.certs[1].key", "b.key", "does not match", "a.pem"],
        ),
        (
            "listen = [\"127.0.0.1:18443\"]\ncerts = [{ cert = \"junk.pem\", key = \"a.key\" }]",
            &["check.toml:6:", "server.tls.certs[0].cert", "junk.pem", "no PEM certificate"],
        ),
        (
            "listen = [\"127.0.0.1:18443\"]\ncerts = [{ cert = \"cut.pem\", key = \"a.key\" }]",
            &["check.toml:6:", "server.tls.certs[0].cert", "cut.pem", "bad PEM: a `CERTIFICATE` section has no END line (is the file cut short?)"],
        ),
        (
            "listen = [\"127.0.0.1:18443\"]\ncerts = [{ cert = \"a.pem\", key = \"junk.pem\" }]",
            &["check.toml:6:", "server.tls.certs[0].key", "junk.pem", "no PEM private key"],
        ),
        (
            "listen = [\"127.0.0.1:18443\"]\ncerts = [{ cert = \"a.pem\", key = \"missing.key\" }]",
            &["server.tls.certs[0].key", "missing.key", "cannot read"],
        ),
        (
            "listen = [\"127.0.0.1:18443\"]\ncerts = []",
            &["check.toml:6:", "server.tls.certs", "at least one"],
        ),
        (
            "certs = [{ cert = \"a.pem\", key = \"a.key\" }]",
            &["check.toml:4:", "server.tls.listen", "at least one address"],
        ),
        (
            "listen = [\"127.0.0.1:18443\"]\ncerts = [{ cert = \"a.pem\", key = \"a.key\" }]\nclient_ca = \"nope.pem\"",
            &["check.toml:7:", "server.tls.client_ca", "nope.pem"],
        ),
        (
            "listen = [\"127.0.0.1:18443\"]\ncerts = [{ cert = \"a.pem\", key = \"a.key\", chain = \"x\" }]",
            &["check.toml:", "chain"],
        ),
    ];
    for (tls, want) in cases {
        let (code, out, err) = check_in(&pki, tls);
        assert_eq!(code, 1, "accepted:\n{tls}\n{out}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        for w in *want {
            assert!(err.contains(w), "{tls}\n-> {err}\n(missing {w:?})");
        }
    }
    // A TLS address that is also the plain listener, or overlaps it through a wildcard.
    for (plain, tls) in [
        ("127.0.0.1:18080", "127.0.0.1:18080"),
        ("127.0.0.1:18080", "0.0.0.0:18080"),
        ("0.0.0.0:18080", "127.0.0.1:18080"),
    ] {
        let path = pki.dir.join("dup.toml");
        std::fs::write(
            &path,
            format!("[server]\nlisten = [\"{plain}\"]\n[server.tls]\nlisten = [\"{tls}\"]\ncerts = [{{ cert = \"a.pem\", key = \"a.key\" }}]\n"),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_ringgate"))
            .args(["--check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{plain} {tls}: {err}");
        assert!(
            err.contains("dup.toml:4: key `server.tls.listen`") && err.contains("already used"),
            "{err}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// wss
// ---------------------------------------------------------------------------------------------

fn ws_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    frame::encode(&mut f, opcode, true, payload);
    let key = [0x11, 0x22, 0x33, 0x44];
    let hl = f.len() - payload.len();
    f[1] |= 0x80;
    let mut p = f.split_off(hl);
    frame::unmask_bytewise(&mut p, key);
    f.extend_from_slice(&key);
    f.extend_from_slice(&p);
    f
}

fn ws_read(t: &mut impl Read, buf: &mut Vec<u8>) -> (u8, Vec<u8>) {
    loop {
        if let Ok(Some(h)) = frame::parse_header(buf) {
            let total = h.header_len + h.len as usize;
            if buf.len() >= total {
                let p = buf[h.header_len..total].to_vec();
                buf.drain(..total);
                return (h.opcode, p);
            }
        }
        let mut tmp = [0u8; 65536];
        let n = t.read(&mut tmp).expect("read frame");
        assert!(n > 0, "closed");
        buf.extend_from_slice(&tmp[..n]);
    }
}

fn wss_open(g: &TlsGateway, pki: &Pki, path: &str) -> (TlsClient, Vec<u8>) {
    wss_upgrade(g, client_config(&pki.path("ca.pem"), None), path, "")
}

/// The `x-forwarded-client-cert` the gateway sends for the `client` certificate.
fn client_xfcc(pki: &Pki) -> String {
    use sha2::Digest;
    let der = CertificateDer::from_pem_file(pki.path("client.pem")).unwrap();
    let hash: String = sha2::Sha256::digest(der.as_ref())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("Hash={hash};Subject=\"CN=client.test\";DNS=client.test")
}

/// Opens a wss connection to `path` with `cfg`, sending `extra` header lines with the
/// upgrade; returns the client and the bytes read past the 101 head.
fn wss_upgrade(
    g: &TlsGateway,
    cfg: Arc<rustls::ClientConfig>,
    path: &str,
    extra: &str,
) -> (TlsClient, Vec<u8>) {
    let mut t = tls_connect(g.tls, "a.test", cfg);
    write!(
        t,
        "GET {path} HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    let end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        let mut tmp = [0u8; 4096];
        let n = t.read(&mut tmp).unwrap();
        assert!(n > 0, "closed during the upgrade");
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    buf.drain(..end);
    (t, buf)
}

/// A WebSocket echo origin (text and binary frames echoed unmasked; close answered).
fn ws_echo_origin() -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let h2 = heads.clone();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let heads = h2.clone();
            thread::spawn(move || {
                let mut buf = Vec::new();
                let Some(head) = ws::read_upgrade(&mut s, &mut buf) else {
                    return;
                };
                // Recorded before the answer: the client checks it once it has its 101.
                heads.lock().unwrap().push(head.clone());
                ws::answer_upgrade(&mut s, &head, "");
                let mut tmp = [0u8; 65536];
                loop {
                    while let Ok(Some(h)) = frame::parse_header(&buf) {
                        let total = h.header_len + h.len as usize;
                        if buf.len() < total {
                            break;
                        }
                        let mut p = buf[h.header_len..total].to_vec();
                        if let Some(k) = h.mask {
                            frame::unmask_bytewise(&mut p, k);
                        }
                        buf.drain(..total);
                        let mut out = Vec::new();
                        frame::encode(&mut out, h.opcode, h.fin, &p);
                        let _ = s.write_all(&out);
                        if h.opcode == op::CLOSE {
                            return;
                        }
                    }
                    match s.read(&mut tmp) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                }
            });
        }
    });
    (addr, heads)
}

#[test]
fn wss_through_an_http_route_and_a_websocket_api() {
    let pki = Pki::new();
    let (echo, heads) = ws_echo_origin();
    let rest = format!(
        r#"
[[upstreams]]
name = "ws"
targets = ["{echo}"]

[[apis]]
name = "live"

[[apis.routes]]
route = "GET /live/{{room}}"
integration = {{ type = "http", upstream = "ws" }}

[[apis]]
name = "chat"
protocol = "websocket"
base_path = "/chat"
route_selection = "$request.body.action"

[[apis.routes]]
route = "$default"
integration = {{ type = "mock", status = 200, body = "pong" }}
"#
    );
    let g = start("", &certs_a_b(&pki), &rest);

    // Pass-through: frames both ways, also after both directions idled past the buffer
    // release (the reads are cancelled and wait on socket readiness under TLS).
    let (mut t, mut buf) = wss_open(&g, &pki, "/live/r1");
    assert!(heads.lock().unwrap()[0]
        .to_ascii_lowercase()
        .contains("x-forwarded-proto: https"));
    t.write_all(&ws_frame(op::TEXT, b"one")).unwrap();
    assert_eq!(ws_read(&mut t, &mut buf), (op::TEXT, b"one".to_vec()));
    let big = vec![b'x'; 200_000];
    t.write_all(&ws_frame(op::BINARY, &big)).unwrap();
    assert_eq!(ws_read(&mut t, &mut buf), (op::BINARY, big));
    thread::sleep(Duration::from_millis(1200));
    t.write_all(&ws_frame(op::TEXT, b"after idle")).unwrap();
    assert_eq!(
        ws_read(&mut t, &mut buf),
        (op::TEXT, b"after idle".to_vec())
    );
    t.write_all(&ws_frame(op::CLOSE, &1000u16.to_be_bytes()))
        .unwrap();
    let (opc, p) = ws_read(&mut t, &mut buf);
    assert_eq!((opc, &p[..2]), (op::CLOSE, &1000u16.to_be_bytes()[..]));

    // WebSocket API: a message answered by the mock, before and after an idle period.
    let (mut t, mut buf) = wss_open(&g, &pki, "/chat");
    t.write_all(&ws_frame(op::TEXT, br#"{"action":"hi"}"#))
        .unwrap();
    assert_eq!(ws_read(&mut t, &mut buf), (op::TEXT, b"pong".to_vec()));
    thread::sleep(Duration::from_millis(1200));
    t.write_all(&ws_frame(op::PING, b"p")).unwrap();
    assert_eq!(ws_read(&mut t, &mut buf), (op::PONG, b"p".to_vec()));
    t.write_all(&ws_frame(op::TEXT, b"again")).unwrap();
    assert_eq!(ws_read(&mut t, &mut buf), (op::TEXT, b"pong".to_vec()));
    assert!(g
        .gw
        .metrics()
        .contains("ringgate_websocket_connections_active 1"));
}

/// Over mTLS, a WebSocket API's integration calls (`$connect` and message routes) get the
/// verified client certificate as `x-forwarded-client-cert` and `X-Forwarded-Proto: https`;
/// the values a client sends in its handshake never pass.
#[test]
fn websocket_api_calls_get_the_client_certificate_and_https() {
    let pki = Pki::new();
    let origin = Origin::start(|r| match r.header("x-route-key") {
        Some("$default") => Response::ok(r.body.clone()),
        _ => Response::ok(""),
    });
    let tls = format!(
        "{}\nclient_ca = \"{}\"",
        certs_a_b(&pki),
        pki.path("client-ca.pem")
    );
    let rest = format!(
        r#"
[[upstreams]]
name = "be"
targets = ["{}"]

[[apis]]
name = "chat"
protocol = "websocket"

[[apis.routes]]
route = "$connect"
integration = {{ type = "http", upstream = "be", path = "/connect" }}
[[apis.routes]]
route = "$default"
integration = {{ type = "http", upstream = "be", path = "/default" }}
"#,
        origin.addr
    );
    let g = start("", &tls, &rest);
    let want = client_xfcc(&pki);
    let (cert, key) = (pki.path("client.pem"), pki.path("client.key"));
    let cfg = client_config(&pki.path("ca.pem"), Some((&cert, &key)));
    let (mut t, mut buf) = wss_upgrade(
        &g,
        cfg,
        "/",
        "X-Forwarded-Client-Cert: Hash=forged\r\nX-Forwarded-Proto: http\r\nX-Principal-Id: admin\r\n",
    );
    t.write_all(&ws_frame(op::TEXT, b"hello")).unwrap();
    assert_eq!(ws_read(&mut t, &mut buf), (op::TEXT, b"hello".to_vec()));
    let calls = origin.requests();
    assert_eq!(calls.len(), 2);
    for (r, key) in calls.iter().zip(["$connect", "$default"]) {
        assert_eq!(r.header("x-route-key"), Some(key));
        assert_eq!(r.headers_named("x-forwarded-client-cert"), [want.as_str()]);
        assert_eq!(r.headers_named("x-forwarded-proto"), ["https"], "{key}");
        assert_eq!(r.headers_named("x-forwarded-host"), ["a.test"], "{key}");
        assert!(r.headers_named("x-principal-id").is_empty(), "{key}");
    }
}

/// Python's `websockets` (over Python's ssl module) as an independent wss client, through a
/// pass-through route to the echo origin.
#[test]
fn python_wss_client_through_passthrough() {
    let ok = Command::new("python3")
        .args(["-c", "import websockets"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "python3 with the websockets package is required (see .ci/run)"
    );
    let pki = Pki::new();
    let (echo, _) = ws_echo_origin();
    let rest = format!(
        r#"
[[upstreams]]
name = "ws"
targets = ["{echo}"]

[[apis]]
name = "live"

[[apis.routes]]
route = "GET /live/{{room}}"
integration = {{ type = "http", upstream = "ws" }}
"#
    );
    let g = start("", &certs_a_b(&pki), &rest);
    let url = format!("wss://127.0.0.1:{}/live/py", g.tls.port());
    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ws/peer.py"))
        .args(["echo-client", &url, "100"])
        .env("SSL_CERT_FILE", pki.path("ca.pem"))
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["messages"], 101);
    assert_eq!(v["close_code"], 1000);
}

/// Cache hits over TLS: small ones are copied into one write, large ones go out with `writev`
/// (three iovecs into the TLS stream).
#[test]
fn cache_hits_over_tls() {
    let pki = Pki::new();
    let origin = Origin::start(|r| {
        let n = if r.path.contains("big") { 300_000 } else { 100 };
        Response::ok(vec![b'a' + (r.path.len() % 20) as u8; n])
    });
    let rest = format!(
        r#"
[[upstreams]]
name = "o"
targets = ["{}"]

[[apis]]
name = "shop"

[apis.stages.prod]
cache = {{ ttl_s = 60 }}

[[apis.routes]]
route = "GET /items/{{id}}"
integration = {{ type = "http", upstream = "o" }}
"#,
        origin.addr
    );
    let g = start("", &certs_a_b(&pki), &rest);
    let cfg = client_config(&pki.path("ca.pem"), None);
    let mut t = tls_connect(g.tls, "a.test", cfg);
    let mut buf = Vec::new();
    for path in ["/prod/items/small", "/prod/items/big"] {
        let mut first = None;
        for round in 0..3 {
            write!(t, "GET {path} HTTP/1.1\r\nHost: a.test\r\n\r\n").unwrap();
            let (st, head, body) = read_response(&mut t, &mut buf);
            assert_eq!(st, 200);
            let want = if round == 0 { "miss" } else { "hit" };
            assert!(
                head.to_ascii_lowercase()
                    .contains(&format!("x-cache: {want}")),
                "{path} round {round}: {head}"
            );
            match &first {
                None => first = Some(body),
                Some(f) => assert!(f == &body, "{path}: cached body differs"),
            }
        }
    }
    assert_eq!(origin.request_count(), 2);
}

/// Clients that give up at every point of a TLS connection: the gateway ends each one itself,
/// keeps serving, and its connection count comes back to zero. Then a drain with TLS
/// connections open (idle and mid-request) exits 0.
#[test]
fn tls_clients_that_give_up_anywhere() {
    let pki = Pki::new();
    let origin = Origin::start(|_| Response::ok(vec![b'r'; 200_000]));
    let mut g = start(
        "[server.limits]\nheader_timeout_ms = 1500\nidle_timeout_ms = 3000",
        &certs_a_b(&pki),
        &proxy_routes(origin.addr),
    );
    let cfg = client_config(&pki.path("ca.pem"), None);
    // A real ClientHello's first bytes, to stop in the middle of one.
    let hello = {
        let mut conn =
            rustls::ClientConnection::new(cfg.clone(), ServerName::try_from("a.test").unwrap())
                .unwrap();
        let mut v = Vec::new();
        conn.write_tls(&mut v).unwrap();
        v
    };
    let mut handles = Vec::new();
    for case in 0..8 {
        let cfg = cfg.clone();
        let hello = hello.clone();
        let addr = g.tls;
        handles.push(thread::spawn(move || {
            for _ in 0..5 {
                match case {
                    // Connect and leave.
                    0 => drop(TcpStream::connect(addr).unwrap()),
                    // Half a ClientHello, then leave.
                    1 => {
                        let mut s = TcpStream::connect(addr).unwrap();
                        let _ = s.write_all(&hello[..hello.len() / 2]);
                    }
                    // A full ClientHello, then leave without reading.
                    2 => {
                        let mut s = TcpStream::connect(addr).unwrap();
                        let _ = s.write_all(&hello);
                    }
                    // Handshake, then leave.
                    3 => drop(tls_connect(addr, "a.test", cfg.clone())),
                    // Half a request head, then leave.
                    4 => {
                        let mut t = tls_connect(addr, "a.test", cfg.clone());
                        let _ = t.write_all(b"GET /api/x HTTP/1.1\r\nHo");
                    }
                    // Half a request body, then leave.
                    5 => {
                        let mut t = tls_connect(addr, "a.test", cfg.clone());
                        let _ = t.write_all(
                            b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\nabc",
                        );
                        let _ = t.flush();
                        thread::sleep(Duration::from_millis(50));
                    }
                    // A big response not read, then leave.
                    6 => {
                        let mut t = tls_connect(addr, "a.test", cfg.clone());
                        let _ = t.write_all(b"GET /api/big HTTP/1.1\r\nHost: a\r\n\r\n");
                        let _ = t.flush();
                        thread::sleep(Duration::from_millis(50));
                    }
                    // Half a TLS record after the handshake, then leave.
                    _ => {
                        let mut t = tls_connect(addr, "a.test", cfg.clone());
                        let mut rec = Vec::new();
                        t.conn
                            .writer()
                            .write_all(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n")
                            .unwrap();
                        t.conn.write_tls(&mut rec).unwrap();
                        let _ = t.sock.write_all(&rec[..rec.len() / 2]);
                    }
                }
            }
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
    // Still serving, and every abandoned connection is gone in time.
    let c = curl(&[
        "--cacert",
        &pki.path("ca.pem"),
        "--resolve",
        &resolve("a.test", g.tls),
        &url("a.test", g.tls, "/hello"),
    ]);
    assert_eq!((c.code, c.stdout.as_str()), (0, "hello"), "{}", c.stderr);
    assert!(
        wait_until(Duration::from_secs(8), || g
            .gw
            .metrics()
            .contains("ringgate_connections_active 0")),
        "{}",
        g.gw.metrics()
    );

    // Drain with one idle TLS connection (parked) and one mid-request.
    let mut idle = tls_connect(g.tls, "a.test", cfg.clone());
    let mut buf = Vec::new();
    idle.write_all(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut idle, &mut buf).0, 200);
    let mut half = tls_connect(g.tls, "a.test", cfg);
    half.write_all(b"GET /hello HTTP/1.1\r\n").unwrap();
    thread::sleep(Duration::from_millis(400));
    g.gw.terminate();
    let st = g.gw.wait_exit(Duration::from_secs(6)).expect("exits");
    assert!(st.success(), "{st:?}\n{}", g.gw.stderr());
    assert!(!g.gw.stderr().contains("panicked"), "{}", g.gw.stderr());
}

#[test]
fn an_oversize_body_over_tls_gets_413_then_a_clean_tls_close() {
    // As over plain TCP (tests/limits.rs): the gateway answers 413 while the client is still
    // sending, then closes with close_notify and FIN after draining, never with a reset.
    let pki = Pki::new();
    let origin = Origin::fixed("ok");
    let g = start(
        "limits = { max_body_bytes = 1000 }",
        &certs_a_b(&pki),
        &proxy_routes(origin.addr),
    );
    let cfg = client_config(&pki.path("ca.pem"), None);
    let mut t = tls_connect(g.tls, "a.test", cfg);
    let mut raw =
        b"POST /api/up HTTP/1.1\r\nHost: a.test\r\nContent-Length: 1048576\r\n\r\n".to_vec();
    raw.resize(raw.len() + (256 << 10), b'b');
    t.write_all(&raw)
        .expect("the gateway reset the connection while the client was sending");
    t.flush().unwrap();
    let mut buf = Vec::new();
    let (status, _, _) = read_response(&mut t, &mut buf);
    assert_eq!(status, 413);
    let mut tmp = [0u8; 1024];
    match t.read(&mut tmp) {
        Ok(0) => {}
        other => panic!("expected close_notify and FIN after the 413, got {other:?}"),
    }
    assert_eq!(origin.request_count(), 0);
}

#[test]
fn a_handshake_under_way_at_sigterm_finishes_and_its_request_is_answered() {
    // As a partly read plain head: the ClientHello is in when the drain begins; the handshake
    // and the request that follows it are served (with `connection: close`).
    let pki = Pki::new();
    let origin = Origin::start(|_| Response::ok("through"));
    let mut g = start("", &certs_a_b(&pki), &proxy_routes(origin.addr));
    let s = TcpStream::connect(g.tls).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut conn = rustls::ClientConnection::new(
        client_config(&pki.path("ca.pem"), None),
        ServerName::try_from("a.test".to_string()).unwrap(),
    )
    .unwrap();
    let mut sock = s;
    // The ClientHello only.
    while conn.wants_write() {
        conn.write_tls(&mut sock).unwrap();
    }
    thread::sleep(Duration::from_millis(500));
    g.gw.terminate();
    thread::sleep(Duration::from_millis(300));
    let mut t = rustls::StreamOwned::new(conn, sock);
    while t.conn.is_handshaking() {
        t.conn
            .complete_io(&mut t.sock)
            .expect("TLS handshake during the drain");
    }
    t.write_all(b"GET /api/x HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    let (status, head, body) = read_response(&mut t, &mut buf);
    assert_eq!(status, 200, "{head}");
    assert_eq!(body, b"through");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    let st = g.gw.wait_exit(Duration::from_secs(5)).expect("no exit");
    assert_eq!(st.code(), Some(0), "{}", g.gw.stderr());
}
