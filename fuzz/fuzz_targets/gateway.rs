//! Fuzz target: arbitrary bytes from a client into a whole, running gateway.
//!
//! On the first input one in-process ringgate (`ringgate::runtime::start`, one worker) is started, on 127.0.0.1 with a port from `RINGGATE_FUZZ_PORTS` (default
//! 28100-28199), next to a tiny in-process HTTP/1.1 origin. Its config has most features on:
//! mock and http integrations, WebSocket pass-through and a WebSocket API, CORS, WAF rules (body
//! target included), a cached stage, an api-key route with a usage plan, an HS256 JWT route, a
//! SigV4 route, a validated route with request/response mappings, and throttles. Limits are
//! short so that nothing a client sends can hold a connection for long.
//!
//! Each input is written to a fresh connection (in one, two or three writes, at points derived
//! from the input), the write side is shut, and the answer is read until the gateway closes.
//! Checked: the gateway closes within `CLOSE_WITHIN` (else it is stuck on a client that has
//! nothing more to say), every complete response it sent starts with `HTTP/1.1 ddd `, and
//! every `CHECK_EVERY` inputs a known-good request on a new connection still gets its 200. A
//! panic in the gateway aborts the whole process, which libFuzzer reports as a crash.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long the gateway may take to finish with a client that has shut its write side.
/// header_timeout_ms (200) and idle_timeout_ms (300) bound every state; the rest is slack for a
/// busy two-core machine.
const CLOSE_WITHIN: Duration = Duration::from_millis(2500);
/// A known-good request is checked every this many inputs.
const CHECK_EVERY: u64 = 100;

/// HS256 secret of the `users` authorizer (the seeds carry a token signed with it).
const JWT_SECRET: &str = "fuzz-secret-0123456789abcdef0123456789";

/// LeakSanitizer off for this target: the gateway and origin threads still hold their
/// buffers when libFuzzer exits, which LSan's check at exit would report as a crash.
#[no_mangle]
pub extern "C" fn __lsan_default_options() -> *const std::os::raw::c_char {
    c"detect_leaks=0".as_ptr()
}

static GATEWAY: OnceLock<SocketAddr> = OnceLock::new();
static INPUTS: AtomicU64 = AtomicU64::new(0);

fuzz_target!(|data: &[u8]| {
    let addr = *GATEWAY.get_or_init(start);
    one_input(addr, data);
    if INPUTS.fetch_add(1, Ordering::Relaxed) % CHECK_EVERY == CHECK_EVERY - 1 {
        still_serving(addr);
    }
});

fn one_input(addr: SocketAddr, data: &[u8]) {
    let mut s = match TcpStream::connect(addr) {
        Ok(s) => s,
        Err(e) => panic!("the gateway refused a connection: {e}"),
    };
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_millis(1000)));
    let _ = s.set_write_timeout(Some(Duration::from_millis(1000)));
    // Split points from a hash of the input, so the corpus stays plain requests.
    let h = fnv(data);
    let mut cuts = Vec::new();
    if data.len() > 1 {
        match h % 3 {
            0 => {}
            1 => cuts.push((h >> 8) as usize % data.len()),
            _ => {
                cuts.push((h >> 8) as usize % data.len());
                cuts.push((h >> 24) as usize % data.len());
            }
        }
    }
    cuts.sort_unstable();
    let mut at = 0;
    for c in cuts.into_iter().chain([data.len()]) {
        if c > at {
            // A write that fails means the gateway already closed: fine, read what it said.
            if s.write_all(&data[at..c]).is_err() {
                break;
            }
            at = c;
            if at < data.len() {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    let _ = s.shutdown(Shutdown::Write);
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                // Keep the first 64 KiB for the checks; read the rest away.
                if got.len() < 65536 {
                    got.extend_from_slice(&buf[..n]);
                }
            }
            // libFuzzer's timer signal.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A reset after the gateway refused something with data still unread is a close.
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionReset
                    || e.kind() == std::io::ErrorKind::BrokenPipe =>
            {
                break
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                if start.elapsed() > CLOSE_WITHIN {
                    panic!(
                        "the gateway kept a half-closed connection open for {:?} ({} bytes answered: {:?})",
                        start.elapsed(),
                        got.len(),
                        String::from_utf8_lossy(&got[..got.len().min(300)])
                    );
                }
            }
            Err(e) => panic!("read from the gateway: {e}"),
        }
        if start.elapsed() > CLOSE_WITHIN {
            panic!(
                "the gateway kept a half-closed connection open for {:?} ({} bytes answered)",
                start.elapsed(),
                got.len()
            );
        }
    }
    if std::env::var_os("RINGGATE_FUZZ_SHOW").is_some() {
        eprintln!(
            "--- {} bytes in, {} bytes out in {:?}:\n{}",
            data.len(),
            got.len(),
            start.elapsed(),
            lossy(&got)
        );
    }
    check_responses(data, &got);
}

/// Every complete response must start with `HTTP/1.1 ddd `. Responses are followed while their
/// framing is known from the response alone (HEAD answers and 101s end the walk).
fn check_responses(req: &[u8], mut got: &[u8]) {
    let heads_unknown = contains(req, b"HEAD");
    let mut n = 0;
    while !got.is_empty() {
        let prefix = b"HTTP/1.1 ";
        let want = prefix.len() + 4;
        if got.len() < want {
            // Cut short (the gateway may drop a connection mid-answer on an upstream
            // failure); what there is must still agree with the prefix.
            let m = got.len().min(prefix.len());
            assert_eq!(
                &got[..m],
                &prefix[..m],
                "response {n} starts badly: {:?}",
                lossy(got)
            );
            return;
        }
        assert!(
            got.starts_with(prefix) && got[9..12].iter().all(u8::is_ascii_digit) && got[12] == b' ',
            "response {n} does not start with a status line: {:?}",
            lossy(got)
        );
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut resp = httparse::Response::new(&mut headers);
        let head_len = match resp.parse(got) {
            Ok(httparse::Status::Complete(l)) => l,
            Ok(httparse::Status::Partial) => return,
            Err(e) => panic!("response {n} has a bad head ({e}): {:?}", lossy(got)),
        };
        let status = resp.code.unwrap_or(0);
        if status == 101 || (heads_unknown && status >= 200) {
            return;
        }
        let mut cl = None;
        let mut chunked = false;
        for h in resp.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let v = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.parse::<usize>().ok());
                assert!(
                    v.is_some(),
                    "response {n}: bad content-length {:?}",
                    lossy(h.value)
                );
                assert!(
                    cl.is_none() || cl == v,
                    "response {n}: two content-lengths: {:?}",
                    lossy(got)
                );
                cl = v;
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = true;
            }
        }
        assert!(
            !(chunked && cl.is_some()),
            "response {n} has both content-length and transfer-encoding: {:?}",
            lossy(got)
        );
        got = &got[head_len..];
        if (100..200).contains(&status) || status == 204 || status == 304 {
            // No body.
        } else if let Some(l) = cl {
            if got.len() < l {
                return;
            }
            got = &got[l..];
        } else if chunked {
            match skip_chunked(got) {
                Some(rest) => got = rest,
                None => return,
            }
        } else {
            // Close-delimited: the rest is this body.
            return;
        }
        n += 1;
    }
}

/// The bytes after a complete chunked body, or None when it is cut short.
fn skip_chunked(mut b: &[u8]) -> Option<&[u8]> {
    loop {
        let eol = find(b, b"\r\n")?;
        let line = std::str::from_utf8(&b[..eol]).ok()?;
        let size = line.split(';').next()?.trim();
        let size = usize::from_str_radix(size, 16)
            .unwrap_or_else(|_| panic!("bad chunk size line in a response: {line:?}"));
        b = &b[eol + 2..];
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let eol = find(b, b"\r\n")?;
                b = &b[eol + 2..];
                if eol == 0 {
                    return Some(b);
                }
            }
        }
        if b.len() < size + 2 {
            return None;
        }
        assert_eq!(&b[size..size + 2], b"\r\n", "chunk not followed by CRLF");
        b = &b[size + 2..];
    }
}

/// A plain GET to a mock route and one through the origin, each on a new connection.
fn still_serving(addr: SocketAddr) {
    for path in ["/mock", "/open/still-serving"] {
        let deadline = Instant::now() + Duration::from_secs(3);
        let status = loop {
            match get(addr, path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    panic!("the gateway no longer answers GET {path}: {e}")
                }
                // Throttled (429) or a transient failure: try again shortly.
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        if status == 429 {
            continue;
        }
        assert_eq!(status, 200, "GET {path} after fuzz inputs");
    }
}

fn get(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let line = out.split(|&b| b == b'\n').next().unwrap_or(&[]);
    std::str::from_utf8(line)
        .ok()
        .and_then(|l| l.strip_prefix("HTTP/1.1 "))
        .and_then(|l| l.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad answer: {:?}", lossy(&out))))
}

// ---------------------------------------------------------------------------------------------
// Start-up
// ---------------------------------------------------------------------------------------------

/// The first free port of the range (bound and released at once).
fn free_port(from: u16, to: u16, skip: u16) -> u16 {
    (from..=to)
        .filter(|&p| p != skip)
        .find(|&p| TcpListener::bind(("127.0.0.1", p)).is_ok())
        .unwrap_or_else(|| panic!("no free port in {from}-{to}"))
}

fn start() -> SocketAddr {
    let (from, to) = std::env::var("RINGGATE_FUZZ_PORTS")
        .ok()
        .and_then(|r| {
            let (a, b) = r.split_once('-')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .unwrap_or((28100u16, 28199u16));
    let origin = origin::start(free_port(from, to, 0));
    let port = free_port(from, to, origin.port());
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let dir: PathBuf =
        std::env::temp_dir().join(format!("ringgate-fuzz-gw-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(
        dir.join("body.json"),
        r#"{"type":"object","required":["n"],"properties":{"n":{"type":"integer","minimum":1},"s":{"type":"string","maxLength":16},"tags":{"type":"array","items":{"type":"string"}}}}"#,
    )
    .expect("schema file");
    let text = config(addr, origin, &dir);
    let path = dir.join("ringgate.toml");
    std::fs::write(&path, &text).expect("config file");
    let cfg = match ringgate::config::parse(&path, &text) {
        Ok(c) => c,
        Err(e) => panic!("fuzz config refused: {e}"),
    };
    // Serves until the process exits (the handle is leaked on purpose).
    match ringgate::runtime::start(cfg) {
        Ok(g) => std::mem::forget(g),
        Err(e) => panic!("gateway refused to start: {e}"),
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(200) = get(addr, "/mock") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the gateway did not start on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "fuzz gateway on {addr}, origin on {origin}, files in {}",
        dir.display()
    );
    addr
}

fn config(addr: SocketAddr, origin: SocketAddr, dir: &std::path::Path) -> String {
    let dir = dir.display();
    format!(
        r#"
[server]
listen = ["{addr}"]
workers = 1
pin_workers = false
shutdown_timeout_ms = 500
state_dir = "{dir}/state"
throttle = {{ rate = 1000000, burst = 1000000 }}
[server.limits]
max_header_bytes = 4096
max_headers = 32
max_body_bytes = 2048
header_timeout_ms = 200
idle_timeout_ms = 300
max_connections = 1000

[waf]
body_max_bytes = 256
rules = [
  {{ name = "xss", target = "body", pattern = "(?i)<script", action = "block" }},
  {{ name = "sqli", target = "query", pattern = "(?i)union\\s+select", action = "block" }},
  {{ name = "bad-path", target = "path", pattern = "/etc/passwd", action = "block" }},
  {{ name = "scanner", target = "header.user-agent", pattern = "(?i)sqlmap", action = "count" }},
]

[[authorizers]]
name = "users"
type = "jwt"
secret = "{JWT_SECRET}"

[[sigv4_credentials]]
access_key = "AKIDEXAMPLE"
secret_key = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
region = "us-east-1"
service = "execute-api"
principal = "ci"

[[usage_plans]]
name = "basic"
apis = ["a/$default"]
throttle = {{ rate = 100000, burst = 100000 }}
quota = {{ limit = 100000000, period = "day" }}

[[api_keys]]
name = "k"
value = "fuzz-key-value-0000000001"
plans = ["basic"]

[[upstreams]]
name = "o"
targets = ["{origin}"]
connect_timeout_ms = 200
timeout_ms = 500
retries = 1
keepalive = 8

[[apis]]
name = "a"
cors = {{ allow_origins = ["https://app.example"], allow_methods = ["GET", "PUT", "POST"], allow_headers = ["content-type", "x-api-key", "authorization"], expose_headers = ["x-total"], max_age_s = 60 }}
websocket = {{ max_message_bytes = 4096, max_frame_bytes = 1024, idle_timeout_ms = 300, max_duration_ms = 1000 }}
[apis.stages."$default"]
cache = {{ enabled = true, ttl_s = 60, max_bytes = 1048576 }}
variables = {{ version = "v1" }}
throttle = {{ rate = 1000000, burst = 1000000 }}
[[apis.routes]]
route = "ANY /open/{{p+}}"
integration = {{ type = "http", upstream = "o" }}
[[apis.routes]]
route = "GET /items/{{id}}"
integration = {{ type = "http", upstream = "o", path = "/${{stageVariables.version}}/items/{{id}}" }}
cache = {{ ttl_s = 30, key = ["path.id", "query.lang", "header.accept"], allow_client_invalidate = true }}
throttle = {{ rate = 100000, burst = 100000 }}
[[apis.routes]]
route = "ANY /keyed/{{p+}}"
integration = {{ type = "http", upstream = "o" }}
api_key_required = true
request_mapping = {{ "header.x-key" = "$context.apiKeyName" }}
[[apis.routes]]
route = "ANY /jwt/{{p+}}"
integration = {{ type = "http", upstream = "o" }}
auth = "jwt:users"
request_mapping = {{ "header.x-user" = "$context.principal", "header.x-tenant" = "$context.authorizer.claims.tenant" }}
[[apis.routes]]
route = "ANY /signed/{{p+}}"
integration = {{ type = "http", upstream = "o" }}
auth = "sigv4"
[[apis.routes]]
route = "POST /valid/{{id}}"
integration = {{ type = "http", upstream = "o", path = "/v/{{id}}" }}
validate = {{ schema = "body.json" }}
request_mapping = {{ "header.x-m" = "$request.header.x-in", "query.debug" = "remove", "query.id" = "$request.path.id", "header.x-q" = "${{request.querystring.q}}-x" }}
response_mapping = {{ "header.x-served-by" = "ringgate", "header.server" = "remove", "header.x-req" = "$context.requestId" }}
[[apis.routes]]
route = "GET /ws"
integration = {{ type = "http", upstream = "o" }}
[[apis.routes]]
route = "GET /mock"
integration = {{ type = "mock", status = 200, headers = {{ "content-type" = "text/plain" }}, body = "ok" }}
response_mapping = {{ "header.x-served-by" = "ringgate" }}
[[apis.routes]]
route = "$default"
integration = {{ type = "mock", status = 404, headers = {{ "content-type" = "application/json" }}, body = '{{"message":"no such thing"}}' }}

[[apis]]
name = "chat"
protocol = "websocket"
base_path = "/chat"
route_selection = "$request.body.action"
websocket = {{ allowed_origins = ["https://app.example"], max_message_bytes = 4096, max_frame_bytes = 1024, idle_timeout_ms = 300, max_duration_ms = 1000 }}
[[apis.routes]]
route = "$connect"
integration = {{ type = "http", upstream = "o", path = "/connect" }}
[[apis.routes]]
route = "$disconnect"
integration = {{ type = "mock", status = 200, body = "" }}
[[apis.routes]]
route = "echo"
integration = {{ type = "http", upstream = "o", path = "/send" }}
[[apis.routes]]
route = "$default"
integration = {{ type = "mock", status = 200, body = "default" }}
"#
    )
}

// ---------------------------------------------------------------------------------------------
// The origin
// ---------------------------------------------------------------------------------------------

mod origin {
    //! A small HTTP/1.1 keep-alive origin, one thread per connection: reads a head and its
    //! body (Content-Length or chunked), answers 200 with a short body; answers a WebSocket
    //! upgrade with 101, one text frame, and then reads until the gateway closes. Anything it
    //! does not understand closes the connection.
    use super::*;

    pub fn start(port: u16) -> SocketAddr {
        let l = TcpListener::bind(("127.0.0.1", port)).expect("origin bind");
        let addr = l.local_addr().expect("origin addr");
        std::thread::Builder::new()
            .name("fuzz-origin".into())
            .spawn(move || {
                for s in l.incoming().flatten() {
                    let _ = std::thread::Builder::new()
                        .name("fuzz-origin-conn".into())
                        .spawn(move || {
                            let _ = serve(s);
                        });
                }
            })
            .expect("origin thread");
        addr
    }

    fn serve(s: TcpStream) -> std::io::Result<()> {
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.set_write_timeout(Some(Duration::from_secs(2)))?;
        let _ = s.set_nodelay(true);
        let mut w = s.try_clone()?;
        let mut r = BufReader::new(s);
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let mut parts = line.split_whitespace();
            let method = parts.next().unwrap_or("").to_string();
            let target = parts.next().unwrap_or("").to_string();
            let mut len = 0usize;
            let mut chunked = false;
            let mut upgrade = false;
            let mut heads = 0;
            // `x-resp-NAME: V` headers become `NAME: V` in the answer, `x-status: N` its
            // status and `x-chunked: 1` a chunked body with a trailer, so inputs reach the
            // response side too (cache-control, vary, set-cookie, odd statuses ...).
            let mut extra = String::new();
            let mut status = 200u16;
            let mut chunked_reply = false;
            loop {
                let mut h = String::new();
                if r.read_line(&mut h)? == 0 {
                    return Ok(());
                }
                heads += 1;
                if heads > 200 {
                    return Ok(());
                }
                let h = h.trim_end();
                if h.is_empty() {
                    break;
                }
                let (name, value) = h.split_once(':').unwrap_or((h, ""));
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    len = match value.parse() {
                        Ok(l) => l,
                        Err(_) => return Ok(()),
                    };
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = value.eq_ignore_ascii_case("chunked");
                } else if name.eq_ignore_ascii_case("upgrade") {
                    upgrade = value.eq_ignore_ascii_case("websocket");
                } else if name.eq_ignore_ascii_case("x-status") {
                    status = value
                        .parse()
                        .ok()
                        .filter(|s| (200..600).contains(s))
                        .unwrap_or(200);
                } else if name.eq_ignore_ascii_case("x-chunked") {
                    chunked_reply = true;
                } else if name.len() > 7
                    && name.is_char_boundary(7)
                    && name[..7].eq_ignore_ascii_case("x-resp-")
                    && extra.len() < 2048
                {
                    let n = &name[7..];
                    let framing = ["content-length", "transfer-encoding", "connection"];
                    if !framing.iter().any(|f| n.eq_ignore_ascii_case(f)) {
                        extra.push_str(&format!("{n}: {value}\r\n"));
                    }
                }
            }
            if upgrade {
                w.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x05hello",
                )?;
                let mut sink = [0u8; 4096];
                while r.read(&mut sink)? > 0 {}
                return Ok(());
            }
            let mut body = Vec::new();
            if chunked {
                loop {
                    let mut size = String::new();
                    if r.read_line(&mut size)? == 0 {
                        return Ok(());
                    }
                    let size = size.trim_end().split(';').next().unwrap_or("").trim();
                    let Ok(n) = usize::from_str_radix(size, 16) else {
                        return Ok(());
                    };
                    if n == 0 {
                        // Trailers up to the empty line.
                        loop {
                            let mut t = String::new();
                            if r.read_line(&mut t)? == 0 || t.trim_end().is_empty() {
                                break;
                            }
                        }
                        break;
                    }
                    if n > 1 << 20 {
                        return Ok(());
                    }
                    let mut c = vec![0u8; n + 2];
                    r.read_exact(&mut c)?;
                    body.extend_from_slice(&c[..n]);
                }
            } else if len > 0 {
                if len > 1 << 20 {
                    return Ok(());
                }
                body.resize(len, 0);
                r.read_exact(&mut body)?;
            }
            let reply = format!("{method} {target} {}", body.len());
            let bodiless = method == "HEAD" || status == 204 || status == 304;
            let mut out = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: text/plain\r\nserver: fuzz-origin\r\nx-total: 1\r\n{}{extra}",
                if extra.contains("ache-control") { "" } else { "cache-control: max-age=30\r\n" }
            );
            if target.starts_with("/connect") {
                out =
                    "HTTP/1.1 200 OK\r\nsec-websocket-protocol: chat\r\ncontent-length: 0\r\n\r\n"
                        .to_string();
            } else if bodiless {
                out.push_str("\r\n");
            } else if chunked_reply {
                out.push_str("transfer-encoding: chunked\r\n\r\n");
                for part in [&reply[..reply.len() / 2], &reply[reply.len() / 2..]] {
                    if !part.is_empty() {
                        out.push_str(&format!("{:x}\r\n{part}\r\n", part.len()));
                    }
                }
                out.push_str("0\r\nx-trailer: t\r\n\r\n");
            } else {
                out.push_str(&format!("content-length: {}\r\n\r\n{reply}", reply.len()));
            }
            w.write_all(out.as_bytes())?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

fn fnv(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    find(hay, needle).is_some()
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(1500)]).into_owned()
}
