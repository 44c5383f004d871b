//! Abusive clients against one gateway with most features on (WAF body rules, CORS, cache,
//! api keys with a usage plan, a JWT authorizer, SigV4, chunked bodies, pipelining): every
//! client that stalls, stops or lies at any point gets a clear answer or a closed connection,
//! and the gateway keeps serving without a panic. (The release build aborts on panic, so any
//! panic here would be a remote way to stop the gateway.)

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

fn config(origin: std::net::SocketAddr) -> String {
    format!(
        r#"
[server]
listen = ["@LISTEN@"]
workers = 2
state_dir = "@DIR@/state"
[server.limits]
header_timeout_ms = 250
idle_timeout_ms = 300
max_body_bytes = 4096
[admin]
listen = "@ADMIN@"
[access_log]
path = "@DIR@/access.log"
[waf]
body_max_bytes = 512
rules = [{{ name = "xss", target = "body", pattern = "(?i)<script", action = "block" }}]
[[authorizers]]
name = "users"
type = "jwt"
secret = "0123456789abcdef0123456789abcdef-secret"
[[sigv4_credentials]]
access_key = "AKIDEXAMPLE"
secret_key = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
region = "us-east-1"
service = "execute-api"
principal = "ci"
[[usage_plans]]
name = "basic"
apis = ["a/$default"]
quota = {{ limit = 100000, period = "day" }}
[[api_keys]]
name = "k"
value = "robustness-key-value-0001"
plans = ["basic"]
[[upstreams]]
name = "o"
targets = ["{origin}"]
[[apis]]
name = "a"
cors = {{ allow_origins = ["https://app.example"] }}
[apis.stages."$default"]
cache = {{ enabled = true, ttl_s = 60 }}
[[apis.routes]]
route = "ANY /open/{{p+}}"
integration = {{ type = "http", upstream = "o" }}
[[apis.routes]]
route = "ANY /keyed/{{p+}}"
integration = {{ type = "http", upstream = "o" }}
api_key_required = true
[[apis.routes]]
route = "ANY /jwt/{{p+}}"
integration = {{ type = "http", upstream = "o" }}
auth = "jwt:users"
[[apis.routes]]
route = "ANY /signed/{{p+}}"
integration = {{ type = "http", upstream = "o" }}
auth = "sigv4"
[[apis.routes]]
route = "GET /mock"
integration = {{ type = "mock", status = 200, body = "ok" }}
"#
    )
}

/// Requests that exercise every stage; each is cut at many points below.
fn requests() -> Vec<Vec<u8>> {
    let body = "x=<script>1</script>".repeat(4);
    let mut v: Vec<Vec<u8>> = [
        "GET /open/a?q=1 HTTP/1.1\r\nHost: t\r\nOrigin: https://app.example\r\n\r\n".to_string(),
        format!(
            "POST /open/b HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
        "POST /open/c HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello"
            .to_string(),
        "POST /open/d HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n"
            .to_string(),
        "GET /keyed/e HTTP/1.1\r\nHost: t\r\nx-api-key: robustness-key-value-0001\r\n\r\n"
            .to_string(),
        "GET /jwt/f HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer a.b.c\r\n\r\n".to_string(),
        "PUT /signed/g HTTP/1.1\r\nHost: t\r\nAuthorization: AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260101/us-east-1/execute-api/aws4_request, SignedHeaders=host, Signature=00\r\nx-amz-date: 20260101T000000Z\r\nContent-Length: 10\r\n\r\n0123456789"
            .to_string(),
        "OPTIONS /open/h HTTP/1.1\r\nHost: t\r\nOrigin: https://app.example\r\nAccess-Control-Request-Method: PUT\r\n\r\n"
            .to_string(),
        "GET /mock HTTP/1.1\r\nHost: t\r\n\r\nGET /open/i HTTP/1.1\r\nHost: t\r\n\r\n".to_string(),
    ]
    .into_iter()
    .map(String::into_bytes)
    .collect();
    // The same, pipelined behind a first request.
    v.push(
        [
            &b"GET /open/j HTTP/1.1\r\nHost: t\r\n\r\n"[..],
            &v[1][..],
            &v[3][..],
        ]
        .concat(),
    );
    v
}

/// Sends `req[..cut]` and then either stalls until the gateway acts, or closes.
fn abuse(addr: std::net::SocketAddr, req: &[u8], cut: usize, close: bool) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(&req[..cut]);
    if close {
        return;
    }
    // Whatever comes back (answers, a 408, a close), the gateway must end it by itself.
    let mut sink = [0u8; 4096];
    loop {
        match s.read(&mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => panic!("the gateway neither answered nor closed a stalled client: {e}"),
        }
    }
}

#[test]
fn stalled_cut_and_closed_clients_never_stop_the_gateway() {
    let origin = Origin::echo_path();
    let gw = Gateway::start(&config(origin.addr));
    let reqs = requests();
    let mut cases = Vec::new();
    for r in &reqs {
        // Every cut point of short requests, a spread of them of long ones.
        let step = (r.len() / 40).max(1);
        let mut cut = 1;
        while cut < r.len() {
            cases.push((r.clone(), cut, cut % 2 == 0));
            cut += step;
        }
        cases.push((r.clone(), r.len(), false));
    }
    // Sixteen clients at a time.
    for chunk in cases.chunks(16) {
        let hs: Vec<_> = chunk
            .iter()
            .cloned()
            .map(|(r, cut, close)| {
                let addr = gw.addr;
                thread::spawn(move || abuse(addr, &r, cut, close))
            })
            .collect();
        for h in hs {
            h.join().expect("client thread");
        }
    }
    // Still serving, on both workers (several fresh connections), with nothing panicked.
    for _ in 0..8 {
        assert_eq!(gw.get("/mock").status, 200);
        assert_eq!(gw.get("/open/z").status, 200);
    }
    assert!(!gw.stderr().contains("panicked"), "{}", gw.stderr());
    let m = gw.metrics();
    assert!(m.contains("ringgate_requests_total"), "{m}");
}
