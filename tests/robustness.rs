//! Abusive clients against one gateway with most features on (WAF body rules, CORS, cache,
//! api keys with a usage plan, a JWT authorizer, SigV4, request validation and mappings,
//! chunked bodies, pipelining): every
//! client that stalls, stops or lies at any point gets a clear answer or a closed connection,
//! and the gateway keeps serving without a panic. (The release build aborts on panic, so any
//! panic here would be a remote way to stop the gateway.)

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

fn config(origin: std::net::SocketAddr, schema: &std::path::Path) -> String {
    let schema = schema.display();
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
route = "ANY /valid/{{p+}}"
integration = {{ type = "http", upstream = "o" }}
validate = {{ schema = "{schema}" }}
request_mapping = {{ "header.x-m" = "$request.header.x-in", "query.debug" = "remove" }}
response_mapping = {{ "header.x-served-by" = "ringgate" }}
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
        "POST /valid/k?debug=1&a=2 HTTP/1.1\r\nHost: t\r\nx-in: v\r\nContent-Length: 15\r\n\r\n{\"n\":1,\"s\":\"x\"}"
            .to_string(),
        "POST /valid/l HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n6\r\n{\"n\":1\r\n3;e=1\r\n,\"s\r\n5\r\n\":\"x\"\r\n1\r\n}\r\n0\r\nT: 1\r\n\r\n"
            .to_string(),
        "POST /valid/m HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 7\r\n\r\n{\"n\":2}"
            .to_string(),
        "POST /valid/n HTTP/1.1\r\nHost: t\r\nContent-Length: 7\r\n\r\n{\"n\":0}POST /valid/o HTTP/1.1\r\nHost: t\r\nContent-Length: 7\r\n\r\n{\"n\":3}"
            .to_string(),
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
    let dir = temp_dir("robust-schema");
    let schema = dir.join("body.json");
    std::fs::write(
        &schema,
        r#"{"type":"object","required":["n"],"properties":{"n":{"type":"integer","minimum":1}}}"#,
    )
    .unwrap();
    let gw = Gateway::start(&config(origin.addr, &schema));
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
        let r =
            gw.request("POST /valid/z HTTP/1.1\r\nHost: t\r\nContent-Length: 7\r\n\r\n{\"n\":1}");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-served-by"), Some("ringgate"));
    }
    // Whole, the validated requests are answered as they should be (the pipelined pair: the
    // first fails its schema, the second passes).
    for (r, want) in reqs.iter().filter(|r| r.starts_with(b"POST /valid/")).zip([
        &[200][..],
        &[200],
        &[200], // the body came with the head: no 100 needed
        &[400, 200],
    ]) {
        let mut c = Client::connect(gw.addr);
        c.send(r);
        let got: Vec<u16> = want
            .iter()
            .map(|_| c.read_response().unwrap().status)
            .collect();
        assert_eq!(&got[..], want, "{}", String::from_utf8_lossy(r));
    }
    assert!(!gw.stderr().contains("panicked"), "{}", gw.stderr());
    let m = gw.metrics();
    assert!(m.contains("ringgate_requests_total"), "{m}");
    let _ = std::fs::remove_dir_all(&dir);
}
