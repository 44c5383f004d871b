//! Proxying through the gateway: forwarded headers, request ids, hop-by-hop headers, upstream
//! keep-alive, pipelining, chunked bodies both ways, streamed uploads, 100-continue and
//! bodiless responses.

mod common;

use common::*;
use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// One API proxying everything to `origin`, plus a mock route at `GET /mock`.
fn config(origin: SocketAddr) -> String {
    format!(
        r#"
[[upstreams]]
name = "o"
targets = ["{origin}"]
timeout_ms = 3000

[[apis]]
name = "p"

[[apis.routes]]
route = "ANY /{{p+}}"
integration = {{ type = "http", upstream = "o" }}

[[apis.routes]]
route = "GET /mock"
integration = {{ type = "mock", status = 200, headers = {{ "content-type" = "text/plain" }}, body = "mocked" }}
"#
    )
}

#[test]
fn forwarded_headers_are_added() {
    let origin = Origin::fixed("ok");
    let gw = Gateway::start(&config(origin.addr));
    let r = gw.request(
        "GET /a/b?x=1 HTTP/1.1\r\nHost: shop.test:8080\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "ok");
    let req = origin.last_request();
    assert_eq!(req.path, "/a/b?x=1");
    assert_eq!(
        req.headers_named("x-forwarded-for"),
        vec!["203.0.113.9, 127.0.0.1"]
    );
    assert_eq!(req.headers_named("x-forwarded-proto"), vec!["http"]);
    assert_eq!(
        req.headers_named("x-forwarded-host"),
        vec!["shop.test:8080"]
    );
    assert_eq!(req.header("host"), Some("shop.test:8080"));

    // Without a client X-Forwarded-For, the gateway starts the list.
    let r = gw.get("/c");
    assert_eq!(r.status, 200);
    let req = origin.last_request();
    assert_eq!(req.headers_named("x-forwarded-for"), vec!["127.0.0.1"]);

    // After an idle wait long enough to park the connection (its buffers and record let go),
    // the next request still carries the client's address.
    let mut c = Client::connect(gw.addr);
    for wait in [0, 600] {
        std::thread::sleep(std::time::Duration::from_millis(wait));
        c.send(b"GET /d HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!(c.read_response().unwrap().status, 200);
        let req = origin.last_request();
        assert_eq!(req.path, "/d");
        assert_eq!(req.headers_named("x-forwarded-for"), vec!["127.0.0.1"]);
    }
}

#[test]
fn client_forwarded_proto_and_host_are_replaced() {
    let origin = Origin::fixed("ok");
    let gw = Gateway::start(&config(origin.addr));
    let r = gw.request(
        "GET /a HTTP/1.1\r\nHost: real.test\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.test\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    let req = origin.last_request();
    assert_eq!(req.headers_named("x-forwarded-proto"), vec!["http"]);
    assert_eq!(req.headers_named("x-forwarded-host"), vec!["real.test"]);
    // What else a proxy would say about the client is not taken from the client either.
    let r = gw.request(
        "GET /a HTTP/1.1\r\nHost: real.test\r\nForwarded: for=1.2.3.4;proto=https\r\nX-Forwarded-Port: 443\r\nX-Forwarded-Prefix: /admin\r\nX-Real-IP: 1.2.3.4\r\nX-Forwarded-Server: evil\r\nX-Forwardedish: kept\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    let req = origin.last_request();
    for name in [
        "forwarded",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-real-ip",
        "x-forwarded-server",
    ] {
        assert!(req.headers_named(name).is_empty(), "{name} went upstream");
    }
    assert_eq!(req.headers_named("x-forwardedish"), vec!["kept"]);
}

#[test]
fn client_request_id_is_kept() {
    let origin = Origin::fixed("ok");
    let gw = Gateway::start(&config(origin.addr));
    let r = gw.request("GET /a HTTP/1.1\r\nHost: t\r\nX-Request-Id: my-id-123\r\n\r\n");
    assert_eq!(r.status, 200);
    assert_eq!(r.headers_named("x-request-id"), vec!["my-id-123"]);
    assert_eq!(
        origin.last_request().headers_named("x-request-id"),
        vec!["my-id-123"]
    );
}

#[test]
fn request_id_is_generated_and_shared() {
    let origin = Origin::start(|_| Response::ok("ok").header("X-Request-Id", "origin-made"));
    let gw = Gateway::start(&config(origin.addr));
    let mut ids = std::collections::HashSet::new();
    for _ in 0..5 {
        let r = gw.get("/a");
        assert_eq!(r.status, 200);
        let ids_resp = r.headers_named("x-request-id");
        assert_eq!(
            ids_resp.len(),
            1,
            "one x-request-id on the response: {:?}",
            r.headers
        );
        let id = ids_resp[0].to_string();
        assert!(
            !id.is_empty() && id != "origin-made",
            "generated id: {id:?}"
        );
        let up = origin.last_request();
        assert_eq!(up.headers_named("x-request-id"), vec![id.as_str()]);
        ids.insert(id);
    }
    assert_eq!(ids.len(), 5, "request ids are unique");
    // Mock answers and gateway errors carry one too.
    let r = gw.get("/mock");
    assert!(r
        .header("x-request-id")
        .map(|v| !v.is_empty())
        .unwrap_or(false));
    let r = gw.get("/");
    assert_eq!(r.status, 404);
    assert!(r.header("x-request-id").is_some());
}

#[test]
fn hop_by_hop_request_headers_are_removed() {
    let origin = Origin::fixed("ok");
    let gw = Gateway::start(&config(origin.addr));
    let r = gw.request(
        "GET /a HTTP/1.1\r\nHost: t\r\n\
         Connection: keep-alive, X-Hop-One, x-hop-two\r\n\
         X-Hop-One: 1\r\nX-Hop-Two: 2\r\n\
         Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n\
         Trailer: X-T\r\nUpgrade: h2c\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\n\
         X-End-To-End: kept\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    let req = origin.last_request();
    for h in [
        "connection",
        "x-hop-one",
        "x-hop-two",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
    ] {
        assert!(
            req.header(h).is_none(),
            "hop-by-hop header {h} was forwarded: {:?}",
            req.headers
        );
    }
    assert_eq!(req.header("x-end-to-end"), Some("kept"));
}

#[test]
fn hop_by_hop_response_headers_are_removed() {
    let origin = Origin::start(|_| {
        Response::ok("ok")
            .header("Connection", "X-Resp-Hop")
            .header("X-Resp-Hop", "1")
            .header("Keep-Alive", "timeout=5")
            .header("Proxy-Authenticate", "Basic")
            .header("Upgrade", "h2c")
            .header("X-Resp-Kept", "yes")
    });
    let gw = Gateway::start(&config(origin.addr));
    let r = gw.get("/a");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "ok");
    for h in ["x-resp-hop", "keep-alive", "proxy-authenticate", "upgrade"] {
        assert!(
            r.header(h).is_none(),
            "{h} reached the client: {:?}",
            r.headers
        );
    }
    if let Some(c) = r.header("connection") {
        assert!(
            !c.to_ascii_lowercase().contains("x-resp-hop"),
            "connection: {c}"
        );
    }
    assert_eq!(r.header("x-resp-kept"), Some("yes"));
}

#[test]
fn client_principal_id_is_not_forwarded() {
    let origin = Origin::fixed("ok");
    let gw = Gateway::start(&config(origin.addr));
    let r = gw.request("GET /a HTTP/1.1\r\nHost: t\r\nX-Principal-Id: admin\r\n\r\n");
    assert_eq!(r.status, 200);
    assert!(origin.last_request().header("x-principal-id").is_none());
}

#[test]
fn upstream_connections_are_reused() {
    let origin = Origin::echo_path();
    let gw = Gateway::start(&config(origin.addr));
    // 50 sequential requests on one client connection.
    let mut c = Client::connect(gw.addr);
    for i in 0..50 {
        c.send(format!("GET /k/{i} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), format!("/k/{i}"));
    }
    assert_eq!(origin.request_count(), 50);
    assert!(
        origin.conns() <= 2,
        "50 requests used {} upstream connections",
        origin.conns()
    );
    // 50 more, each on a new client connection (either worker may take them).
    for i in 0..50 {
        let r = gw.get(&format!("/n/{i}"));
        assert_eq!(r.status, 200);
    }
    assert!(
        origin.conns() <= 4,
        "100 sequential requests used {} upstream connections",
        origin.conns()
    );
}

/// A reused upstream connection reads its answer first into the 4 KiB buffer it idled with:
/// answers whose head alone is larger, and bodies of every size around it, arrive whole.
#[test]
fn answers_larger_than_a_pooled_connections_read_buffer_arrive_whole() {
    let origin = Origin::start(|req| {
        let n: usize = req.path_only().trim_start_matches("/big/").parse().unwrap();
        let mut r = Response::ok(vec![b'a' + (n % 26) as u8; n * 997]);
        // About 10 KiB of head: 20 fields of 500 bytes.
        for i in 0..20 {
            r = r.header(
                &format!("x-f{i}"),
                &format!("{i}").repeat(500 / (1 + i / 10)),
            );
        }
        r
    });
    let gw = Gateway::start(&config(origin.addr));
    let mut c = Client::connect(gw.addr);
    for n in 0..12 {
        c.send(format!("GET /big/{n} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 200, "answer {n}");
        assert_eq!(
            r.body,
            vec![b'a' + (n % 26) as u8; n * 997],
            "body of answer {n}"
        );
        for i in 0..20 {
            let want = format!("{i}").repeat(500 / (1 + i / 10));
            assert_eq!(
                r.header(&format!("x-f{i}")),
                Some(want.as_str()),
                "answer {n}"
            );
        }
    }
    assert_eq!(origin.request_count(), 12);
    assert!(
        origin.conns() <= 2,
        "12 answers used {} upstream connections",
        origin.conns()
    );
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let origin = Origin::start(|r| {
        Response::ok(format!(
            "{} {} {}",
            r.method,
            r.path,
            String::from_utf8_lossy(&r.body)
        ))
    });
    let gw = Gateway::start(&config(origin.addr));
    let mut c = Client::connect(gw.addr);
    c.send(
        b"GET /one HTTP/1.1\r\nHost: t\r\n\r\n\
          GET /mock HTTP/1.1\r\nHost: t\r\n\r\n\
          POST /two HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello\
          GET /nope-405 HTTP/1.1\r\nHost: t\r\n\r\n\
          PUT /three HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
          GET /mock HTTP/1.1\r\nHost: t\r\n\r\n\
          GET /four?q=1 HTTP/1.1\r\nHost: t\r\n\r\n",
    );
    let want = [
        "GET /one ",
        "mocked",
        "POST /two hello",
        "GET /nope-405 ",
        "PUT /three abc",
        "mocked",
        "GET /four?q=1 ",
    ];
    for (i, w) in want.iter().enumerate() {
        let r = c
            .read_response()
            .unwrap_or_else(|e| panic!("response {i}: {e}\n{}", gw.stderr()));
        assert_eq!(r.status, 200, "response {i}");
        assert_eq!(r.text(), *w, "response {i} out of order or wrong");
    }
    // The connection is still usable.
    c.send(b"GET /mock HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(c.read_response().unwrap().text(), "mocked");
}

#[test]
fn pipelined_requests_in_many_small_writes() {
    let origin = Origin::echo_path();
    let gw = Gateway::start(&config(origin.addr));
    let mut c = Client::connect(gw.addr);
    let mut all = Vec::new();
    for i in 0..20 {
        all.extend_from_slice(format!("GET /p/{i} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
    }
    // Dribble the bytes in 7-byte pieces, so heads straddle reads.
    for piece in all.chunks(7) {
        c.send(piece);
    }
    for i in 0..20 {
        let r = c.read_response().unwrap();
        assert_eq!(r.text(), format!("/p/{i}"));
    }
}

#[test]
fn chunked_request_body_reaches_origin() {
    let origin = Origin::start(|r| Response::ok(format!("{}", r.body_len)));
    let gw = Gateway::start(&config(origin.addr));
    let mut c = Client::connect(gw.addr);
    c.send(b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n");
    c.send(b"4\r\nWiki\r\n");
    std::thread::sleep(Duration::from_millis(50));
    c.send(b"6;ext=1\r\npedia \r\nD\r\nin\r\n\r\nchunks.\r\n");
    std::thread::sleep(Duration::from_millis(50));
    c.send(b"0\r\nX-Trailer: t\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let req = origin.last_request();
    assert_eq!(req.body, b"Wikipedia in\r\n\r\nchunks.");
    assert!(req.chunked, "forwarded chunked: {:?}", req.headers);
    assert!(req.header("content-length").is_none());
    // The connection goes on after a chunked body.
    c.send(b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(c.read_response().unwrap().status, 200);
    assert_eq!(origin.last_request().path, "/after");
}

#[test]
fn large_chunked_request_body_reaches_origin_intact() {
    let origin = Origin::start(|r| Response::ok(format!("{}", r.body_len)));
    let gw = Gateway::start(&config(origin.addr));
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut c = Client::connect(gw.addr);
    c.send(b"POST /big HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n");
    for piece in data.chunks(100_003) {
        c.send(format!("{:x}\r\n", piece.len()).as_bytes());
        c.send(piece);
        c.send(b"\r\n");
    }
    c.send(b"0\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "3000000");
    assert!(origin.last_request().body == data, "body bytes differ");
}

#[test]
fn chunked_response_reaches_client() {
    let body: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let b2 = body.clone();
    let origin = Origin::start(move |_| Response::ok(b2.clone()).chunked(1000));
    let gw = Gateway::start(&config(origin.addr));
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200);
    assert!(r.chunked, "chunked to the client: {:?}", r.headers);
    assert!(r.header("content-length").is_none());
    assert!(r.body == body, "body differs ({} bytes)", r.body.len());
    // And the connection is reusable afterwards.
    c.send(b"GET /mock HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(c.read_response().unwrap().text(), "mocked");
}

#[test]
fn chunked_response_to_http10_client_is_dechunked() {
    let origin = Origin::start(|_| Response::ok("hello, old client").chunked(5));
    let gw = Gateway::start(&config(origin.addr));
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /old HTTP/1.0\r\nHost: t\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200);
    assert!(!r.chunked, "HTTP/1.0 cannot take chunked: {:?}", r.headers);
    assert_eq!(r.text(), "hello, old client");
    assert!(c.is_closed_within(Duration::from_secs(2)));
}

#[test]
fn response_delimited_by_close_is_passed_through() {
    let origin = Origin::start(|_| Response::ok("until the end").until_close());
    let gw = Gateway::start(&config(origin.addr));
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "until the end");
}

#[test]
fn streamed_100mb_upload_in_bounded_memory() {
    const SIZE: u64 = 100 * 1024 * 1024;
    let origin = Origin::body_counter();
    let cfg = format!(
        "{HEADER}\n[server.limits]\nmax_body_bytes = 209715200\n{}",
        config(origin.addr)
    );
    let gw = Gateway::start(&cfg);
    // Warm up both workers' buffers and pools.
    for _ in 0..4 {
        assert_eq!(gw.get("/warm").status, 200);
    }
    let start_rss = rss_kib(gw.pid);
    assert!(start_rss > 0);

    let pid = gw.pid;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d2 = done.clone();
    let sampler = std::thread::spawn(move || {
        let mut max = 0;
        while !d2.load(std::sync::atomic::Ordering::Relaxed) {
            max = max.max(rss_kib(pid));
            std::thread::sleep(Duration::from_millis(10));
        }
        max
    });

    let t0 = Instant::now();
    let mut c = Client::connect(gw.addr);
    c.set_timeout(Duration::from_secs(30));
    c.send(format!("PUT /upload HTTP/1.1\r\nHost: t\r\nContent-Length: {SIZE}\r\n\r\n").as_bytes());
    let mut piece = vec![0u8; 256 * 1024];
    let mut sent = 0u64;
    while sent < SIZE {
        for (i, b) in piece.iter_mut().enumerate() {
            *b = ((sent as usize + i) % 253) as u8;
        }
        let n = (SIZE - sent).min(piece.len() as u64) as usize;
        c.stream().write_all(&piece[..n]).expect("upload write");
        sent += n as u64;
    }
    let r = c.read_response().expect("upload response");
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let max_rss = sampler.join().unwrap();
    eprintln!(
        "100 MB upload took {:?}; gateway RSS {} KiB -> max {} KiB",
        t0.elapsed(),
        start_rss,
        max_rss
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), SIZE.to_string(), "origin byte count");
    assert_eq!(origin.last_request().body_len, SIZE);
    assert!(
        max_rss.saturating_sub(start_rss) < 64 * 1024,
        "gateway RSS grew by {} KiB during a 100 MB upload",
        max_rss - start_rss
    );
}

#[test]
fn expect_100_continue_gets_interim_then_final_response() {
    let origin = Origin::start(|r| Response::ok(r.body.clone()));
    let gw = Gateway::start(&config(origin.addr));
    let mut c = Client::connect(gw.addr);
    c.send(b"POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n");
    let interim = c
        .read_response()
        .expect("an interim response before the body is sent");
    assert_eq!(interim.status, 100);
    c.send(b"hello world");
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello world");
    let req = origin.last_request();
    assert_eq!(req.body, b"hello world");
}

#[test]
fn a_refused_request_gets_no_100_continue() {
    // 100 Continue invites the upload; a request refused before its body is needed (here by
    // an API key check) gets its answer at once instead.
    let origin = Origin::fixed("ok");
    let gw = Gateway::start(&format!(
        "[[api_keys]]\nname = \"k\"\nvalue = \"0123456789abcdef0123\"\n{}",
        config(origin.addr).replace(
            "integration = { type = \"http\", upstream = \"o\" }",
            "integration = { type = \"http\", upstream = \"o\" }\napi_key_required = true",
        )
    ));
    let mut c = Client::connect(gw.addr);
    c.send(
        b"POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\nExpect: 100-continue\r\n\r\n",
    );
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(origin.request_count(), 0);
}

#[test]
fn head_responses_have_no_body() {
    let origin = Origin::start(|_| Response::ok("twelve bytes"));
    let gw = Gateway::start(&config(origin.addr));
    let mut c = Client::connect(gw.addr);
    c.send(b"HEAD /h HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = c.read_response_to("HEAD").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("12"));
    // A mock answer to HEAD: no body either (GET routes answer HEAD? use the proxy route).
    c.send(b"GET /mock HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = c.read_response().unwrap();
    // If the HEAD response had carried a body, this read would see it instead.
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "mocked");
    assert!(c.pending().is_empty());
    assert_eq!(origin.last_request().method, "HEAD");
}

#[test]
fn no_content_and_not_modified_have_no_body() {
    let origin = Origin::start(|r| match r.path.as_str() {
        "/204" => Response::new(204).no_length(),
        "/204cl" => Response::new(204).header("Content-Length", "0").no_length(),
        "/304" => Response::new(304)
            .header("ETag", "\"v1\"")
            .header("Content-Length", "42")
            .no_length(),
        _ => Response::ok("after"),
    });
    let gw = Gateway::start(&config(origin.addr));
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /204 HTTP/1.1\r\nHost: t\r\n\r\nGET /304 HTTP/1.1\r\nHost: t\r\n\r\nGET /x HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 204);
    assert!(r.header("transfer-encoding").is_none());
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 304);
    assert_eq!(r.header("etag"), Some("\"v1\""));
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "after");
    assert!(
        c.pending().is_empty(),
        "stray bytes: {:?}",
        String::from_utf8_lossy(c.pending())
    );
    // RFC 9110 8.6: never a Content-Length on a 204, for GET or HEAD.
    for m in ["GET", "HEAD"] {
        c.send(format!("{m} /204cl HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
        let r = c.read_response_to(m).unwrap();
        assert_eq!(r.status, 204);
        assert_eq!(r.header("content-length"), None, "{m}");
    }
}

#[test]
fn http10_client_gets_close_by_default_and_keep_alive_on_request() {
    let origin = Origin::fixed("ok");
    let gw = Gateway::start(&config(origin.addr));
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200);
    c.send(b"GET /b HTTP/1.0\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200);
    assert!(c.is_closed_within(Duration::from_secs(2)));
    // Without a Host of its own (HTTP/1.0 allows that), the upstream request still has one
    // (HTTP/1.1 requires it): the target's address, as nginx's `$proxy_host`.
    let req = origin.last_request();
    assert_eq!(req.headers_named("host"), vec![origin.addr.to_string()]);
    assert!(req.headers_named("x-forwarded-host").is_empty());
}

#[test]
fn absolute_form_targets_are_served_as_their_path() {
    // RFC 9112 3.2.2: a server must accept absolute-form; its authority must be the Host (a
    // different one is refused, see tests/strictness.rs).
    let origin = Origin::fixed("ok");
    let gw = Gateway::start(&config(origin.addr));
    let r = gw.request("GET HTTP://T/a/b?q=1 HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.text());
    let req = origin.last_request();
    assert_eq!(req.path, "/a/b?q=1");
    assert_eq!(req.headers_named("host"), vec!["t"]);
    // HTTP/1.0 without Host: the authority stands in for it, upstream too.
    let r = gw.request("GET http://shop.test:8080/c HTTP/1.0\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.text());
    let req = origin.last_request();
    assert_eq!(req.path, "/c");
    assert_eq!(req.headers_named("host"), vec!["shop.test:8080"]);
    assert_eq!(
        req.headers_named("x-forwarded-host"),
        vec!["shop.test:8080"]
    );
}

/// RFC 9112 3.2.2 and RFC 3986 6.2.3: an empty path in absolute-form is `/` (nginx reads it
/// so too): `http://t` is routed and forwarded as `/`, `http://t?q=1` as `/?q=1`. The
/// authority must still be the Host.
#[test]
fn absolute_form_with_an_empty_path_is_the_root() {
    let origin = Origin::fixed("root");
    let gw = Gateway::start(&format!(
        r#"
[[upstreams]]
name = "o"
targets = ["{}"]
timeout_ms = 3000

[[apis]]
name = "p"

[[apis.routes]]
route = "GET /"
integration = {{ type = "http", upstream = "o" }}

[[apis.routes]]
route = "ANY /{{p+}}"
integration = {{ type = "mock", status = 200, body = "not the root" }}
"#,
        origin.addr
    ));
    for (target, want) in [
        ("http://t", "/"),
        ("HTTP://T?q=1", "/?q=1"),
        ("http://t:80?", "/?"),
    ] {
        let r = gw.request(&format!("GET {target} HTTP/1.1\r\nHost: t\r\n\r\n"));
        assert_eq!(r.status, 200, "{target}: {}", r.text());
        assert_eq!(r.text(), "root", "{target}");
        let req = origin.last_request();
        assert_eq!(req.path, want, "{target}");
        assert_eq!(req.headers_named("host"), vec!["t"], "{target}");
    }
    // HTTP/1.0 without Host: the authority stands in for it.
    let r = gw.request("GET http://shop.test:8080?a=b HTTP/1.0\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.text());
    let req = origin.last_request();
    assert_eq!(req.path, "/?a=b");
    assert_eq!(req.headers_named("host"), vec!["shop.test:8080"]);
    // Every other rule holds: another authority, userinfo, a fragment.
    let before = origin.request_count();
    for target in ["http://other", "http://u@t", "http://t#f", "http://t?q#f"] {
        let r = gw.request(&format!("GET {target} HTTP/1.1\r\nHost: t\r\n\r\n"));
        assert_eq!(r.status, 400, "{target}: {}", r.text());
        assert!(r.text().contains("\"message\""), "{target}: {}", r.text());
    }
    assert_eq!(origin.request_count(), before);
}

#[test]
fn several_client_forwarded_for_headers_are_all_kept() {
    // Repeated fields are one comma-separated list (RFC 9110 5.3): none may be dropped.
    let origin = Origin::fixed("ok");
    let gw = Gateway::start(&config(origin.addr));
    let r = gw.request(
        "GET /a HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 198.51.100.1\r\nX-Forwarded-For: 198.51.100.2\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    let req = origin.last_request();
    let joined = req.headers_named("x-forwarded-for").join(", ");
    assert_eq!(
        joined, "198.51.100.1, 198.51.100.2, 127.0.0.1",
        "{:?}",
        req.headers
    );
}

#[test]
fn unusable_client_request_id_is_replaced() {
    let origin = Origin::fixed("ok");
    let gw = Gateway::start(&config(origin.addr));
    let long = "x".repeat(300);
    for bad in ["has spaces in it", long.as_str()] {
        let r = gw.request(&format!(
            "GET /a HTTP/1.1\r\nHost: t\r\nX-Request-Id: {bad}\r\n\r\n"
        ));
        assert_eq!(r.status, 200);
        let id = r.header("x-request-id").unwrap().to_string();
        assert_ne!(id, bad);
        assert_eq!(
            origin.last_request().headers_named("x-request-id"),
            vec![id.as_str()]
        );
    }
}

#[test]
fn client_connection_close_is_honoured() {
    let origin = Origin::fixed("ok");
    let gw = Gateway::start(&config(origin.addr));
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /a HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200);
    assert!(r.closes(), "{:?}", r.headers);
    assert!(c.is_closed_within(Duration::from_secs(2)));
}

#[test]
fn pipelined_request_after_a_streamed_body() {
    // The body is larger than one read, so it streams; the request after it arrives in the
    // same bytes and must still be answered, in order.
    let origin = Origin::start(|r| Response::ok(format!("{} {}", r.path, r.body_len)));
    let gw = Gateway::start(&config(origin.addr));
    let mut c = Client::connect(gw.addr);
    let mut raw = b"POST /big HTTP/1.1\r\nHost: t\r\nContent-Length: 300000\r\n\r\n".to_vec();
    raw.extend(std::iter::repeat_n(b'z', 300_000));
    raw.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n");
    raw.extend_from_slice(
        b"POST /chunky HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    raw.extend_from_slice(format!("{:x}\r\n", 200_000).as_bytes());
    raw.extend(std::iter::repeat_n(b'y', 200_000));
    raw.extend_from_slice(b"\r\n0\r\n\r\nGET /last HTTP/1.1\r\nHost: t\r\n\r\n");
    c.send(&raw);
    for want in ["/big 300000", "/next 0", "/chunky 200000", "/last 0"] {
        let r = c.read_response().unwrap_or_else(|e| panic!("{want}: {e}"));
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), want);
    }
}

#[test]
fn stale_pooled_upstream_connection_is_replaced_transparently() {
    // The origin closes each connection right after answering, without saying so: the
    // gateway pools it, finds it dead on the next request, and must send again on a fresh one.
    let origin = Origin::start(|r| Response::ok(r.path.clone()).then_close());
    let gw = Gateway::start(&config(origin.addr));
    let mut c = Client::connect(gw.addr);
    for i in 0..10 {
        std::thread::sleep(Duration::from_millis(20));
        c.send(format!("GET /s/{i} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 200, "GET {i}: {}", r.text());
        assert_eq!(r.text(), format!("/s/{i}"));
    }
    for i in 0..5 {
        std::thread::sleep(Duration::from_millis(20));
        c.send(
            format!("POST /p/{i} HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi").as_bytes(),
        );
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 200, "POST {i}: {}", r.text());
    }
}

/// A raw origin for the pool tests: answers `GET /slow*` after 100 ms, any other GET with its
/// path, `GET /nobody204` with a 204 that announces a body and sends it 30 ms later, and HEAD
/// with a 200 whose body follows 30 ms later (both non-compliant). `cut()` closes every
/// connection it holds, as a restart of the origin would.
struct SloppyOrigin {
    addr: SocketAddr,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl SloppyOrigin {
    fn start() -> SloppyOrigin {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let all = conns.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                all.lock().unwrap().push(s.try_clone().unwrap());
                std::thread::spawn(move || {
                    while let Some((line, _, _)) = read_raw_request(&mut s) {
                        let path = line.split(' ').nth(1).unwrap_or("").to_string();
                        let (head, late): (String, &[u8]) = if line.starts_with("HEAD") {
                            (
                                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n".into(),
                                b"stray",
                            )
                        } else if path == "/nobody204" {
                            (
                                "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n".into(),
                                b"stray",
                            )
                        } else {
                            if path.starts_with("/slow") {
                                std::thread::sleep(Duration::from_millis(100));
                            }
                            let h = format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{path}",
                                path.len()
                            );
                            (h, b"")
                        };
                        if s.write_all(head.as_bytes()).is_err() {
                            return;
                        }
                        if !late.is_empty() {
                            std::thread::sleep(Duration::from_millis(30));
                            let _ = s.write_all(late);
                        }
                    }
                });
            }
        });
        SloppyOrigin { addr, conns }
    }

    fn cut(&self) {
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[test]
fn every_pooled_connection_dead_after_an_upstream_restart_costs_no_request() {
    // Several pooled connections per worker, all closed at once (an origin restart): the first
    // request after finds one dead and must not then take another dead one.
    let origin = SloppyOrigin::start();
    let gw = Gateway::start(&config(origin.addr));
    let warm: Vec<_> = (0..8)
        .map(|i| {
            let a = gw.addr;
            std::thread::spawn(move || {
                let mut c = Client::connect(a);
                for j in 0..2 {
                    c.send(format!("GET /slow{i}-{j} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
                    assert_eq!(c.read_response().unwrap().status, 200);
                }
            })
        })
        .collect();
    for t in warm {
        t.join().unwrap();
    }
    origin.cut();
    std::thread::sleep(Duration::from_millis(100));
    for i in 0..12 {
        let r = gw.get(&format!("/after{i}"));
        assert_eq!(r.status, 200, "request {i} after the restart: {}", r.text());
        assert_eq!(r.text(), format!("/after{i}"));
    }
}

#[test]
fn bytes_left_by_a_bodiless_answer_do_not_fail_the_next_request() {
    // A 204 that announces a body, and a HEAD answered with one, both sent late: the bytes
    // must not be read as the next request's response.
    let origin = SloppyOrigin::start();
    let gw = Gateway::start(&config(origin.addr));
    let mut c = Client::connect(gw.addr);
    for (i, first) in ["GET /nobody204", "HEAD /h", "GET /nobody204", "HEAD /h"]
        .iter()
        .enumerate()
    {
        c.send(format!("{first} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
        let r = if first.starts_with("HEAD") {
            c.read_response_to("HEAD").unwrap()
        } else {
            c.read_response().unwrap()
        };
        assert_eq!(r.status, if i % 2 == 0 { 204 } else { 200 }, "{first}");
        std::thread::sleep(Duration::from_millis(80));
        c.send(format!("GET /next{i} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 200, "GET after {first}: {}", r.text());
        assert_eq!(r.text(), format!("/next{i}"));
    }
}

#[test]
fn interim_upstream_response_is_skipped() {
    let origin = Origin::start(|_| {
        Response::raw(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal",
        )
    });
    let gw = Gateway::start(&config(origin.addr));
    let r = gw.get("/x");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "final");
}

#[test]
fn truncated_upstream_body_is_not_passed_off_as_complete() {
    let origin = Origin::start(|_| {
        Response::raw("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly fifty bytes.................................!")
            .then_close()
    });
    let gw = Gateway::start(&config(origin.addr));
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = c.read_response();
    assert!(
        r.is_err(),
        "a truncated body was delivered as complete: {r:?}"
    );
}

#[test]
fn large_download_in_bounded_memory() {
    const SIZE: usize = 64 * 1024 * 1024;
    let body = std::sync::Arc::new(vec![b'd'; SIZE]);
    let b2 = body.clone();
    let origin = Origin::start(move |_| Response::ok((*b2).clone()));
    let gw = Gateway::start(&config(origin.addr));
    assert_eq!(gw.get("/mock").status, 200);
    let start = rss_kib(gw.pid);
    let mut c = Client::connect(gw.addr);
    c.set_timeout(Duration::from_secs(20));
    c.send(b"GET /dl HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = c.read_response().unwrap();
    let after = rss_kib(gw.pid);
    assert_eq!(r.body.len(), SIZE);
    assert!(
        after.saturating_sub(start) < 32 * 1024,
        "gateway RSS grew {} KiB for a 64 MB download",
        after - start
    );
}

#[test]
fn a_slow_upload_does_not_eat_the_upstreams_timeout() {
    // timeout_ms = 1000; the client takes ~1.5 s to send its body, the origin answers at once
    // once it has it: the answer goes through (was a 504 after the origin had answered).
    let origin = Origin::start(|r| Response::ok(format!("got {}", r.body_len)));
    let cfg = config(origin.addr).replace("timeout_ms = 3000", "timeout_ms = 1000");
    let gw = Gateway::start(&cfg);
    let mut c = Client::connect(gw.addr);
    c.send(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n");
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(300));
        c.send(b"ab");
    }
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "got 10");
}

#[test]
fn broken_upstream_framing_before_any_byte_out_is_a_502() {
    // Bad chunked framing in the first bytes, or a transfer coding other than chunked: the
    // client gets a 502 (not an empty reply), counted as such.
    for raw in [
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nxyz\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhello",
    ] {
        let origin = Origin::start(move |_| Response::raw(raw).then_close());
        let gw = Gateway::start(&config(origin.addr));
        let r = gw.get("/x");
        assert_eq!(r.status, 502, "{raw:?}: {}", r.text());
        assert_eq!(r.message(), "Bad Gateway");
        let mut m = String::new();
        let counted = wait_until(Duration::from_secs(3), || {
            m = gw.metrics();
            metric_value(&m, "ringgate_requests_total", &["status=\"502\""]) == Some(1.0)
        });
        assert!(counted, "{raw:?}: {m}");
        assert!(
            gw.stderr().contains("upstream"),
            "{raw:?}: logged: {}",
            gw.stderr()
        );
    }
}

#[test]
fn a_timed_out_request_keeps_the_connection_for_the_ones_behind_it() {
    let origin = Origin::start(|r| {
        if r.path == "/slow" {
            std::thread::sleep(Duration::from_millis(1500));
        }
        Response::ok(r.path.clone())
    });
    let cfg = config(origin.addr).replace("timeout_ms = 3000", "timeout_ms = 500");
    let gw = Gateway::start(&cfg);
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\nGET /next HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 504);
    assert!(!r.closes(), "{:?}", r.headers);
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "/next");
}

#[test]
fn an_early_answer_reaches_the_client_while_it_still_uploads() {
    // The origin refuses after the head (403) and closes without reading the body, as many
    // do; the gateway, still uploading, must pass that answer on rather than a 502.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let _ = read_head(&mut s, &mut Vec::new());
            let _ = s.write_all(
                b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\nConnection: close\r\n\r\nnope",
            );
            // Dropped with the body unread: the kernel resets the connection.
        }
    });
    let gw = Gateway::start(&config(addr));
    let mut c = Client::connect(gw.addr);
    c.send(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 4000000\r\n\r\n");
    let piece = vec![b'u'; 64 * 1024];
    let writer = {
        let mut s = c.stream().try_clone().unwrap();
        std::thread::spawn(move || {
            for _ in 0..61 {
                if s.write_all(&piece).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.text(), "nope");
    assert!(
        r.closes(),
        "the rest of the body was not read: {:?}",
        r.headers
    );
    let _ = writer.join();
}

#[test]
fn a_body_that_ends_with_the_upstream_connection_goes_out_chunked() {
    // No length and not chunked: the body ends when the origin closes. Toward an HTTP/1.1
    // client it goes out chunked (as nginx), so the end is marked and the connection stays
    // open; a reset instead of a close is a cut, and the client sees no last chunk.
    let origin = Origin::start(|r| match r.path.as_str() {
        "/cut" => Response::raw(&b"HTTP/1.1 200 OK\r\n\r\npartial-body"[..]).then_reset(),
        _ => Response::raw(&b"HTTP/1.1 200 OK\r\n\r\nwhole body"[..]).then_close(),
    });
    let gw = Gateway::start(&config(origin.addr));
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /whole HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.header("connection"), None);
    assert_eq!(r.text(), "whole body");
    // Still open.
    c.send(b"GET /whole HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(c.read_response().unwrap().text(), "whole body");

    // Cut: the bytes that came, then the connection closes without the last chunk.
    let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /cut HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut got);
    let got = String::from_utf8_lossy(&got);
    assert!(got.contains("transfer-encoding: chunked"), "{got}");
    assert!(got.contains("partial-body"), "{got}");
    assert!(
        !got.ends_with("0\r\n\r\n"),
        "a cut body looks complete: {got:?}"
    );

    // An HTTP/1.0 client cannot take chunks: the body ends with the connection.
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /whole HTTP/1.0\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!(r.header("transfer-encoding"), None);
    assert_eq!(r.text(), "whole body");
    assert!(c.is_closed_within(Duration::from_secs(2)));
}

#[test]
fn request_headers_with_underscores_are_not_forwarded() {
    // As nginx's default: CGI-style backends read `x_principal_id` as `x-principal-id`, so an
    // underscore name could stand in for a header the gateway owns.
    let origin = Origin::fixed("ok");
    let gw = Gateway::start(&config(origin.addr));
    let r = gw.request(
        "GET /u HTTP/1.1\r\nHost: t\r\nx_principal_id: admin\r\nX_Forwarded_For: 6.6.6.6\r\nx_custom: 1\r\nX-Normal: 2\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    let req = origin.last_request();
    for n in ["x_principal_id", "x_forwarded_for", "x_custom"] {
        assert!(req.headers_named(n).is_empty(), "{n} went upstream");
    }
    assert_eq!(req.headers_named("x-normal"), vec!["2"]);
    assert_eq!(req.headers_named("x-forwarded-for"), vec!["127.0.0.1"]);
}

#[test]
fn connection_cannot_take_the_host_away() {
    // `Connection: Host` would have the upstream get an HTTP/1.1 request without Host (a
    // default virtual host behind a gateway that routed by Host). Host is for every hop.
    let origin = Origin::fixed("ok");
    let gw = Gateway::start(&config(origin.addr));
    let r = gw.request(
        "GET /h HTTP/1.1\r\nHost: x.test\r\nConnection: Host, x-drop\r\nx-drop: 1\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    let req = origin.last_request();
    assert_eq!(req.headers_named("host"), vec!["x.test"]);
    assert!(req.headers_named("x-drop").is_empty());
}

#[test]
fn trailers_cannot_stand_in_for_what_the_route_checked_or_set() {
    // The route maps `x-tenant` and the WAF checks `x-test`; SigV4 signs `x-amz-*`: a trailer
    // of one of those names would hand a backend that merges trailers a second, unchecked value.
    let origin = Origin::start(|_| Response::ok("up"));
    let cfg = format!(
        "[waf]\nrules = [{{ name = \"t\", target = \"header.X-Test\", pattern = \"evil\", action = \"block\" }}]\n{}",
        config(origin.addr).replace(
            "integration = { type = \"http\", upstream = \"o\" }",
            "integration = { type = \"http\", upstream = \"o\" }\nrequest_mapping = { \"header.x-tenant\" = \"tenant-a\" }",
        )
    );
    let gw = Gateway::start(&cfg);
    let mut c = Client::connect(gw.addr);
    c.send(b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-tenant: tenant-b\r\nx-test: evil\r\nX-Amz-Date: 1\r\nx-sum: 1\r\n\r\n");
    assert_eq!(c.read_response().unwrap().status, 200);
    let raw = String::from_utf8_lossy(&origin.raw()).to_string();
    assert!(raw.contains("x-tenant: tenant-a\r\n"), "{raw}");
    assert!(raw.contains("0\r\nx-sum: 1\r\n\r\n"), "{raw}");
    for bad in ["tenant-b", "evil", "X-Amz-Date"] {
        assert!(!raw.contains(bad), "{bad} went upstream:\n{raw}");
    }
}

#[test]
fn trailer_fields_that_could_stand_in_for_headers_are_not_passed_on() {
    // A backend that merges trailers into the headers (Apache's MergeTrailers, CVE-2013-5704)
    // would otherwise take `x-principal-id` or `Host` from the trailer as the gateway's.
    let origin = Origin::start(|r| {
        match r.path.as_str() {
        "/resp" => Response::raw(
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-sum: 7\r\nSet-Cookie: s=1\r\nContent-Length: 5\r\n\r\n"[..],
        ),
        _ => Response::ok("up"),
    }
    });
    let gw = Gateway::start(&config(origin.addr));
    let trailers = "x-sum: 42\r\nx-principal-id: admin\r\nX_User: a\r\nHost: evil\r\nContent-Length: 99\r\nAuthorization: Bearer x\r\n\r\n";
    // With the head (one read), and streamed after it.
    for streamed in [false, true] {
        let mut c = Client::connect(gw.addr);
        let head = "POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n";
        let body = format!("5\r\nhello\r\n0\r\n{trailers}");
        if streamed {
            c.send(head.as_bytes());
            std::thread::sleep(Duration::from_millis(50));
            c.send(body.as_bytes());
        } else {
            c.send(format!("{head}{body}").as_bytes());
        }
        assert_eq!(c.read_response().unwrap().status, 200);
    }
    let raw = String::from_utf8_lossy(&origin.raw()).to_string();
    assert_eq!(
        raw.matches("5\r\nhello\r\n0\r\nx-sum: 42\r\n\r\n").count(),
        2,
        "{raw}"
    );
    // Whole fields: a request id is hex and may hold "99".
    for bad in [
        "x-principal-id: admin",
        "X_User",
        "Host: evil",
        "Content-Length: 99",
        "Bearer x",
    ] {
        assert!(!raw.contains(bad), "{bad} went upstream:\n{raw}");
    }
    // Response trailers alike.
    let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /resp HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut got);
    let got = String::from_utf8_lossy(&got);
    assert!(got.ends_with("2\r\nok\r\n0\r\nx-sum: 7\r\n\r\n"), "{got:?}");
}

#[test]
fn a_response_trailer_section_past_the_limits_leaves_the_body_visibly_cut() {
    // The body is on its way when the trailer section turns out too large (16 KiB, or
    // more fields than max_headers): the client must not get the last chunk, which would
    // make the answer look complete to a lenient client.
    let big = format!("x-t: {}\r\n", "v".repeat(20_000));
    let many: String = (0..200).map(|i| format!("x-t{i}: v\r\n")).collect();
    let origin = Origin::start(move |r| {
        let trailers = if r.path == "/big" { &big } else { &many };
        Response::raw(
            format!(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n{trailers}\r\n"
            )
            .as_bytes(),
        )
    });
    let gw = Gateway::start(&config(origin.addr));
    for path in ["/big", "/many"] {
        let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .unwrap();
        let mut got = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut got);
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with("HTTP/1.1 "), "{path}: {got:?}");
        if got.starts_with("HTTP/1.1 200") {
            assert!(got.ends_with("5\r\nhello\r\n"), "{path}: {got:?}");
        } else {
            // Refused before the first byte went out.
            assert!(got.starts_with("HTTP/1.1 502"), "{path}: {got:?}");
        }
        assert!(!got.contains("x-t"), "{path}: {got:?}");
    }
}

#[test]
fn options_asterisk_is_forwarded_as_asterisk() {
    // RFC 9112 3.2.4: the asterisk form asks about the server; `/*` would name a resource.
    // It has no path: only a `$default` route takes it.
    let origin = Origin::fixed("ok");
    let gw = Gateway::start(&format!(
        "[[upstreams]]\nname = \"o\"\ntargets = [\"{}\"]\n[[apis]]\nname = \"d\"\n[[apis.routes]]\nroute = \"$default\"\nintegration = {{ type = \"http\", upstream = \"o\" }}\n",
        origin.addr
    ));
    let r = gw.request("OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.text());
    let req = origin.last_request();
    assert_eq!((req.method.as_str(), req.path.as_str()), ("OPTIONS", "*"));
}

/// Keep-alive connections idle past the grace period are parked as bare descriptors and woken
/// by their next request, with either io driver: each is served again (its client address
/// intact), pipelined requests included; one closed by its client while parked is counted
/// out; and no descriptor is left behind once every client is gone.
#[test]
fn parked_connections_wake_serve_and_close_with_either_driver() {
    let fds = |pid: u32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    for io in ["io_uring", "epoll"] {
        let origin = Origin::echo_path();
        let cfg = format!(
            "{}\n{}",
            HEADER.replace("io = \"auto\"", &format!("io = \"{io}\"")),
            config(origin.addr)
        );
        let gw = Gateway::start(&cfg);
        let active =
            |gw: &Gateway| metric_value(&gw.metrics(), "ringgate_connections_active", &[]).unwrap();
        // Warm up the upstream pool so its sockets are not counted as leaks.
        assert_eq!(gw.get("/warm").status, 200);
        std::thread::sleep(Duration::from_millis(100));
        let base = fds(gw.pid);
        let mut clients: Vec<Client> = (0..40).map(|_| Client::connect(gw.addr)).collect();
        for (i, c) in clients.iter_mut().enumerate() {
            c.send(format!("GET /first/{i} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
            assert_eq!(c.read_response().unwrap().text(), format!("/first/{i}"));
        }
        for round in 0..2 {
            // Past the 250 ms grace: every connection is parked.
            std::thread::sleep(Duration::from_millis(600));
            for (i, c) in clients.iter_mut().enumerate() {
                c.send(
                    format!(
                        "GET /r{round}/{i} HTTP/1.1\r\nHost: t\r\n\r\nGET /r{round}/{i}/b HTTP/1.1\r\nHost: t\r\n\r\n"
                    )
                    .as_bytes(),
                );
                let a = c.read_response().unwrap();
                assert_eq!(a.status, 200, "{io}");
                assert_eq!(a.text(), format!("/r{round}/{i}"), "{io}");
                let b = c.read_response().unwrap();
                assert_eq!(b.text(), format!("/r{round}/{i}/b"), "{io}");
            }
        }
        // A woken connection reads its client's address back from the socket.
        for r in origin.requests() {
            assert_eq!(r.headers_named("x-forwarded-for"), ["127.0.0.1"], "{io}");
        }
        assert_eq!(active(&gw), 40.0, "{io}");
        // Half close while parked: they are counted out.
        std::thread::sleep(Duration::from_millis(600));
        let rest = clients.split_off(20);
        drop(clients);
        assert!(
            wait_until(Duration::from_secs(3), || active(&gw) == 20.0),
            "{io}: {}",
            active(&gw)
        );
        drop(rest);
        assert!(
            wait_until(Duration::from_secs(3), || active(&gw) == 0.0),
            "{io}"
        );
        // The other worker's upstream pool may have opened a connection or two; a leak would
        // be one per parked connection (80 here).
        assert!(
            wait_until(Duration::from_secs(3), || fds(gw.pid) < base + 8),
            "{io}: {} descriptors, {base} before",
            fds(gw.pid)
        );
    }
}

/// Reads from `s` until `end` has arrived (or 5 s pass); returns everything read.
fn read_until_text(s: &mut std::net::TcpStream, end: &str) -> String {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = Vec::new();
    let mut tmp = [0u8; 4096];
    while !String::from_utf8_lossy(&out).ends_with(end) {
        match s.read(&mut tmp) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&tmp[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn interim_answers_are_passed_on_to_http11_clients() {
    // RFC 9110 15.2: a proxy forwards 1xx answers (103 Early Hints here) to an HTTP/1.1
    // client, its hop-by-hop headers removed; never to an HTTP/1.0 client; and not 100
    // Continue, which the gateway answers itself.
    let origin = Origin::start(|_| {
        Response::raw(
            &b"HTTP/1.1 103 Early Hints\r\nLink: </app.css>; rel=preload\r\nConnection: x-hop\r\nX-Hop: 1\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal"[..],
        )
    });
    let gw = Gateway::start(&config(origin.addr));
    let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
    s.write_all(b"GET /page HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let text = read_until_text(&mut s, "final");
    let (interim, rest) = text.split_once("\r\n\r\n").unwrap();
    assert!(
        interim.starts_with("HTTP/1.1 103 Early Hints\r\n"),
        "{text}"
    );
    assert!(
        interim.contains("\r\nlink: </app.css>; rel=preload")
            || interim.contains("\r\nLink: </app.css>; rel=preload"),
        "{text}"
    );
    assert!(!interim.to_ascii_lowercase().contains("x-hop"), "{text}");
    assert!(rest.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(!text.contains(" 100 "), "{text}");
    // The connection goes on.
    s.write_all(b"GET /again HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let text = read_until_text(&mut s, "final");
    assert!(text.starts_with("HTTP/1.1 103 "), "{text}");
    // HTTP/1.0: the final answer only.
    let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
    s.write_all(b"GET /old HTTP/1.0\r\nHost: t\r\n\r\n")
        .unwrap();
    let text = read_until_text(&mut s, "final");
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
}

#[test]
fn a_request_whose_interim_answer_went_out_is_not_sent_again() {
    // On a reused connection, a 103 that wrongly carries a body: what follows it is no
    // answer, but the upstream has the request, and the client has the 103. 502, once.
    let origin = Origin::start(|r| {
        if r.path == "/two" {
            Response::raw(
                &b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\nContent-Length: 3\r\n\r\nabcHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"[..],
            )
        } else {
            Response::ok("one")
        }
    });
    let gw = Gateway::start(&config(origin.addr));
    let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
    s.write_all(b"GET /one HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    read_until_text(&mut s, "one");
    s.write_all(b"GET /two HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let text = read_until_text(&mut s, "Bad Gateway\"}");
    assert!(text.starts_with("HTTP/1.1 103 "), "{text}");
    assert_eq!(text.matches(" 103 ").count(), 1, "{text}");
    assert!(text.contains("HTTP/1.1 502 "), "{text}");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        origin
            .requests()
            .iter()
            .filter(|r| r.path == "/two")
            .count(),
        1,
        "the request was sent again after its interim answer went out"
    );
}

#[test]
fn a_request_whose_interim_answer_went_out_is_not_sent_again_after_an_early_reset() {
    // Two targets, `retries = 1`: each reads the head of a PUT (not its body, which comes
    // later), sends a 103, and resets. The client has the 103, so the request must not go to
    // the other target.
    use std::io::Read;
    let heads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut targets = Vec::new();
    for _ in 0..2 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        targets.push(l.local_addr().unwrap());
        let heads = heads.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let mut buf = Vec::new();
                let mut tmp = [0u8; 1024];
                while find(&buf, b"\r\n\r\n").is_none() {
                    match s.read(&mut tmp) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                    }
                }
                heads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = s.write_all(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n");
                std::thread::sleep(Duration::from_millis(50));
                // A reset: linger 0, then close.
                reset_close(s);
            }
        });
    }
    // The file's usual config, with both targets and a retry.
    let gw = Gateway::start(&config(targets[0]).replace(
        &format!("targets = [\"{}\"]", targets[0]),
        &format!(
            "targets = [\"{}\", \"{}\"]\nretries = 1",
            targets[0], targets[1]
        ),
    ));
    let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
    s.write_all(b"PUT /x HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n01234")
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let _ = s.write_all(b"56789");
    let text = read_until_text(&mut s, "\"}");
    assert!(text.starts_with("HTTP/1.1 103 "), "{text}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        heads.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the request went to another target after its 103 went out: {text}"
    );
}

#[test]
fn a_101_to_a_request_without_upgrade_is_a_502_that_keeps_the_connection() {
    let origin = Origin::start(|_| {
        Response::raw(
            &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"[..],
        )
    });
    let gw = Gateway::start(&config(origin.addr));
    let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
    // Pipelined: the request behind is still answered.
    s.write_all(b"GET /up HTTP/1.1\r\nHost: t\r\n\r\nGET /mock HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let text = read_until_text(&mut s, "mocked");
    assert!(text.starts_with("HTTP/1.1 502 "), "{text}");
    assert!(
        !text[..text.find("\r\n\r\n").unwrap()].contains("connection: close"),
        "{text}"
    );
    assert!(text.contains("HTTP/1.1 200 "), "{text}");
}

#[test]
fn a_date_is_added_when_the_origin_sends_none() {
    // RFC 9110 6.6.1, as nginx: the origin's own Date is kept, a missing one is added.
    let origin = Origin::start(|r| {
        if r.path == "/dated" {
            Response::raw(&b"HTTP/1.1 200 OK\r\nDate: Tue, 01 Jan 2030 00:00:00 GMT\r\nContent-Length: 2\r\n\r\nok"[..])
        } else {
            Response::raw(&b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"[..])
        }
    });
    let gw = Gateway::start(&config(origin.addr));
    let r = gw.get("/undated");
    assert_eq!(r.status, 200);
    let dates = r.headers_named("date");
    assert_eq!(dates.len(), 1, "{dates:?}");
    assert!(
        dates[0].ends_with(" GMT") && dates[0].len() == 29,
        "{dates:?}"
    );
    let r = gw.get("/dated");
    assert_eq!(
        r.headers_named("date"),
        vec!["Tue, 01 Jan 2030 00:00:00 GMT"]
    );
}

/// Sends one byte as TCP urgent data (`MSG_OOB`): it leaves the normal byte stream, and a
/// reader's `recv` stops short at its mark although the bytes behind it are there.
fn send_urgent(s: &std::net::TcpStream, byte: u8) {
    use std::os::fd::AsRawFd;
    // SAFETY: sends one byte from a live stack variable on an open socket.
    let n = unsafe { libc::send(s.as_raw_fd(), (&byte as *const u8).cast(), 1, libc::MSG_OOB) };
    assert_eq!(n, 1, "send(MSG_OOB)");
}

#[test]
fn urgent_data_stalls_neither_a_request_nor_a_response_with_either_driver() {
    // An origin that puts an urgent byte in the middle of its 100-byte body.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let origin = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                if read_head(&mut s, &mut Vec::new()).is_none() {
                    return;
                }
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n");
                let _ = s.write_all(&[b'a'; 50]);
                send_urgent(&s, b'!');
                let _ = s.write_all(&[b'b'; 50]);
                std::thread::sleep(Duration::from_secs(3));
            });
        }
    });
    for io in ["io_uring", "epoll"] {
        let cfg = format!(
            "{}\n{}",
            HEADER.replace("io = \"auto\"", &format!("io = \"{io}\"")),
            config(origin)
        );
        let gw = Gateway::start(&cfg);
        // A request head with an urgent byte inside, all of it sent before the gateway reads.
        let mut c = Client::connect(gw.addr);
        c.stream()
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        c.send(b"GET /mock HTTP/1.1\r\nHost: t\r\nX-A: a");
        send_urgent(c.stream(), b'!');
        c.send(b"\r\n\r\n");
        let r = c.read_response().expect(io);
        assert_eq!((r.status, r.text().as_str()), (200, "mocked"), "{io}");
        // A response body with an urgent byte inside: all 100 bytes, at once.
        c.send(b"GET /body HTTP/1.1\r\nHost: t\r\n\r\n");
        let r = c.read_response().expect(io);
        assert_eq!(r.status, 200, "{io}");
        assert_eq!(r.body, [[b'a'; 50], [b'b'; 50]].concat(), "{io}");
    }
}

/// A checksum in which the position of each byte counts (so reordered bytes show).
fn weighted_sum(b: &[u8]) -> u64 {
    b.iter().enumerate().fold(0u64, |a, (i, &b)| {
        a.wrapping_add((i as u64 % 1009 + 1) * b as u64)
    })
}

/// A client whose upload the upstream does not read yet keeps sending; with io_uring the
/// gateway's multishot receive takes those bytes into the worker's shared receive buffers until
/// they run out. Other connections on that worker must still be served (their reads go on
/// without those buffers), and the held upload must arrive whole and in order once the
/// upstream reads it.
#[test]
fn a_held_upload_that_fills_the_receive_buffers_stops_no_one_and_arrives_whole() {
    use std::io::Read;
    const SIZE: usize = 24 << 20;
    let release = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rel = release.clone();
    let addr = raw_origin(move |mut s| {
        let mut buf = Vec::new();
        loop {
            let Some(head) = read_head(&mut s, &mut buf) else {
                return;
            };
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if head.starts_with("PUT /hold") {
                // Read nothing more until released: the gateway's writes stall.
                while !rel.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            // The body: its length and checksum.
            let mut body = std::mem::take(&mut buf);
            let mut chunk = vec![0u8; 64 * 1024];
            while body.len() < len {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => body.extend_from_slice(&chunk[..n]),
                }
            }
            buf = body.split_off(len);
            let text = format!("{} {}", body.len(), weighted_sum(&body));
            let out = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}",
                text.len()
            );
            if s.write_all(out.as_bytes()).is_err() {
                return;
            }
        }
    });
    let cfg = format!(
        "{}\n[server.limits]\nmax_body_bytes = 67108864\n{}",
        HEADER.replace("workers = 2", "workers = 1"),
        config(addr)
    );
    let gw = Gateway::start(&cfg);
    let body: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    let want = weighted_sum(&body);
    let gaddr = gw.addr;
    let uploader = std::thread::spawn(move || {
        let mut c = Client::connect(gaddr);
        c.set_timeout(Duration::from_secs(30));
        c.send(
            format!("PUT /hold HTTP/1.1\r\nHost: t\r\nContent-Length: {SIZE}\r\n\r\n").as_bytes(),
        );
        c.stream().write_all(&body).expect("upload write");
        c.read_response().expect("upload response")
    });
    // Let the upload fill every buffer on its way (socket buffers, the gateway's).
    std::thread::sleep(Duration::from_millis(800));
    for i in 0..40 {
        let mut c = Client::connect(gw.addr);
        c.set_timeout(Duration::from_secs(5));
        let body = format!("small {i}");
        c.send(
            format!(
                "POST /small HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
        let r = c
            .read_response()
            .expect("a small request during the held upload");
        assert_eq!(r.status, 200);
        assert!(
            r.text().starts_with(&format!("{} ", body.len())),
            "{}",
            r.text()
        );
        // And a second one on the same connection (its next read).
        c.send(b"GET /again HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!(c.read_response().unwrap().status, 200);
    }
    release.store(true, std::sync::atomic::Ordering::Relaxed);
    let r = uploader.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), format!("{SIZE} {want}"));
}

/// While the gateway waits for a slow answer it watches the client for a close. A pipelined
/// request that comes meanwhile, followed by the client's half-close, is a client still there
/// (with a multishot receive those bytes are held by the gateway, not the socket): both
/// requests are answered, none is logged as 499.
#[test]
fn a_pipelined_request_and_a_half_close_during_a_slow_answer_get_both_answers() {
    let got = slow_answer_then_half_close(&[
        (0, b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n"),
        (
            300,
            b"GET /next HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        ),
    ]);
    assert!(got.contains("ok /slow"), "{got}");
    assert!(got.contains("ok /next"), "{got}");
}

/// Sends `pieces` (each after its delay in ms) to a gateway whose origin answers `/slow`
/// after a second and anything else at once, half-closes 50 ms later, and returns all that
/// came back.
fn slow_answer_then_half_close(pieces: &[(u64, &[u8])]) -> String {
    use std::io::Read;
    let origin = Origin::start(|r| {
        if r.path == "/slow" {
            std::thread::sleep(Duration::from_millis(1000));
        }
        Response::ok(format!("ok {}", r.path))
    });
    let gw = Gateway::start(&format!("{HEADER}\n{}", config(origin.addr)));
    let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for (delay, bytes) in pieces {
        std::thread::sleep(Duration::from_millis(*delay));
        s.write_all(bytes).unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    String::from_utf8_lossy(&got).into_owned()
}

/// One client that asks for a large answer, reads none of it and keeps sending must not take
/// the receive buffers the worker's other connections use: another client's requests are
/// served, and on the pooled upstream connection they had before.
#[test]
fn a_client_that_does_not_read_leaves_pooling_to_the_others() {
    use std::io::ErrorKind;
    let origin = Origin::start(|r| {
        if r.path == "/big" {
            Response::ok(vec![b'x'; 8 << 20])
        } else {
            Response::ok(format!("ok {}", r.path))
        }
    });
    let cfg = format!(
        "{}\n{}",
        HEADER.replace("workers = 2", "workers = 1"),
        config(origin.addr)
    );
    let gw = Gateway::start(&cfg);
    let hog = std::net::TcpStream::connect(gw.addr).unwrap();
    let mut h = &hog;
    h.write_all(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    hog.set_nonblocking(true).unwrap();
    let chunk = vec![b'a'; 64 * 1024];
    let mut sent = 0;
    let end = Instant::now() + Duration::from_millis(1500);
    while sent < 2 << 20 && Instant::now() < end {
        match h.write(&chunk) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("{e}"),
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut c = Client::connect(gw.addr);
    c.set_timeout(Duration::from_secs(5));
    c.send(b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(c.read_response().unwrap().text(), "ok /first");
    let before = origin.conns();
    for i in 0..20 {
        c.send(format!("GET /a{i} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
        assert_eq!(c.read_response().unwrap().text(), format!("ok /a{i}"));
        std::thread::sleep(Duration::from_millis(20));
    }
    let opened = origin.conns() - before;
    assert!(
        opened <= 1,
        "{opened} new upstream connections for 20 requests on one keep-alive connection"
    );
    drop(hog);
}

/// The same with the pipelined request in the first request's own segment, so the gateway
/// has read it already when the half-close comes (README: "one that sent a pipelined request
/// behind is still there").
#[test]
fn a_pipelined_request_read_with_the_first_keeps_a_half_closed_client_served() {
    let got = slow_answer_then_half_close(&[(
        0,
        b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\nGET /second HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )]);
    assert!(got.contains("ok /slow"), "{got}");
    assert!(got.contains("ok /second"), "{got}");
}
