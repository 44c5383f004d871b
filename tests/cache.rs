//! The response cache: hits and misses, keys, expiry, Vary, Cache-Control, credentials,
//! eviction under a scan, stampede protection, invalidation (admin and client), the memory
//! bound and the metrics.

mod common;

use common::*;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// API `shop`, stage `prod` with the cache on, stage `dev` without.
fn config(origin: SocketAddr, workers: usize, max_bytes: u64, extra_route: &str) -> String {
    format!(
        r#"
[server]
listen = ["@LISTEN@"]
workers = {workers}
shutdown_timeout_ms = 2000
state_dir = "@DIR@/state"

[admin]
listen = "@ADMIN@"

[[upstreams]]
name = "o"
targets = ["{origin}"]
timeout_ms = 5000

[[apis]]
name = "shop"

[apis.stages.prod]
cache = {{ ttl_s = 60, max_bytes = {max_bytes} }}

[apis.stages.dev]

[[apis.routes]]
route = "GET /items/{{id}}"
integration = {{ type = "http", upstream = "o" }}
cache = {{ key = ["path.id", "query.lang", "header.x-tenant"] }}

[[apis.routes]]
route = "GET /short/{{id}}"
integration = {{ type = "http", upstream = "o" }}
cache = {{ ttl_s = 1 }}

[[apis.routes]]
route = "GET /fresh/{{id}}"
integration = {{ type = "http", upstream = "o" }}
cache = {{ allow_client_invalidate = true }}

[[apis.routes]]
route = "GET /me"
integration = {{ type = "http", upstream = "o" }}
cache = {{ key = ["header.authorization"] }}

{extra_route}

[[apis.routes]]
route = "ANY /{{p+}}"
integration = {{ type = "http", upstream = "o" }}
"#
    )
}

/// An origin answering with a counter in the body: each upstream request gets a new body.
fn counting_origin() -> (Origin, Arc<AtomicUsize>) {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let o = Origin::start(move |r| {
        let i = n2.fetch_add(1, Ordering::SeqCst);
        Response::ok(format!("{} #{i}", r.path)).header("content-type", "text/plain")
    });
    (o, n)
}

fn get(c: &mut Client, path: &str, extra: &str) -> RawResponse {
    c.send(format!("GET {path} HTTP/1.1\r\nHost: shop.test\r\n{extra}\r\n").as_bytes());
    c.read_response().expect("response")
}

fn admin_post(gw: &Gateway, path: &str, body: &str) -> RawResponse {
    let mut c = Client::connect(gw.admin_addr);
    c.send(
        format!(
            "POST {path} HTTP/1.1\r\nHost: admin\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    c.read_response().expect("admin response")
}

#[test]
fn miss_then_hit_with_age_and_own_request_id() {
    let (origin, n) = counting_origin();
    let gw = Gateway::start(&config(origin.addr, 1, 1 << 20, ""));
    let mut c = Client::connect(gw.addr);
    let a = get(&mut c, "/prod/items/1", "x-request-id: first\r\n");
    assert_eq!(a.status, 200);
    assert_eq!(a.header("x-cache"), Some("miss"));
    assert_eq!(a.header("age"), None);
    let b = get(&mut c, "/prod/items/1", "x-request-id: second\r\n");
    assert_eq!(b.status, 200);
    assert_eq!(b.header("x-cache"), Some("hit"));
    assert_eq!(b.header("age"), Some("0"));
    assert_eq!(b.header("x-request-id"), Some("second"));
    assert_eq!(b.headers_named("x-request-id").len(), 1);
    assert_eq!(b.header("content-type"), Some("text/plain"));
    assert_eq!(b.body, a.body);
    assert_eq!(n.load(Ordering::SeqCst), 1);
    // The origin sends no Date: the miss gets one, and the hit the same (kept with the entry:
    // the time the response was made, with Age beside it).
    assert_eq!(a.headers_named("date").len(), 1, "{:?}", a.headers);
    assert_eq!(b.headers_named("date"), a.headers_named("date"));
    // A new connection is served from the cache too (one worker).
    let r = get(&mut Client::connect(gw.addr), "/prod/items/1", "");
    assert_eq!(r.header("x-cache"), Some("hit"));
    assert_eq!(r.body, a.body);
    // Age grows.
    std::thread::sleep(Duration::from_millis(1100));
    let r = get(&mut c, "/prod/items/1", "");
    let age: u64 = r.header("age").unwrap().parse().unwrap();
    assert!((1..=3).contains(&age), "age {age}");
    // A HEAD is served from its route's stored GET: the head (Content-Length of the GET body),
    // no body.
    let d = get(&mut c, "/prod/docs/1", "");
    assert_eq!(d.header("x-cache"), Some("miss"));
    assert_eq!(n.load(Ordering::SeqCst), 2);
    for _ in 0..2 {
        c.send(b"HEAD /prod/docs/1 HTTP/1.1\r\nHost: shop.test\r\n\r\n");
        let h = c.read_response_to("HEAD").unwrap();
        assert_eq!(h.header("x-cache"), Some("hit"));
        assert_eq!(h.header("content-length"), Some(&*d.body.len().to_string()));
        assert!(h.body.is_empty());
        assert_eq!(h.headers_named("date").len(), 1);
    }
    assert_eq!(n.load(Ordering::SeqCst), 2);
    // The connection still works after HEAD hits (no stray body bytes).
    let r = get(&mut c, "/prod/docs/1", "");
    assert_eq!(r.header("x-cache"), Some("hit"));
    assert_eq!(r.body, d.body);
    // The same on a `GET` route with key parameters (HEAD is routed to GET routes).
    c.send(b"HEAD /prod/items/1 HTTP/1.1\r\nHost: shop.test\r\n\r\n");
    let h = c.read_response_to("HEAD").unwrap();
    assert_eq!(h.header("x-cache"), Some("hit"));
    assert_eq!(h.header("content-length"), Some(&*a.body.len().to_string()));
    assert_eq!(n.load(Ordering::SeqCst), 2);
    // Without a stored GET, a HEAD goes upstream and is its own entry; it never answers a GET.
    c.send(b"HEAD /prod/docs/2 HTTP/1.1\r\nHost: shop.test\r\n\r\n");
    let h = c.read_response_to("HEAD").unwrap();
    assert_eq!(h.header("x-cache"), Some("miss"));
    c.send(b"HEAD /prod/docs/2 HTTP/1.1\r\nHost: shop.test\r\n\r\n");
    let h = c.read_response_to("HEAD").unwrap();
    assert_eq!(h.header("x-cache"), Some("hit"));
    assert!(h.body.is_empty());
    assert_eq!(n.load(Ordering::SeqCst), 3);
    let r = get(&mut c, "/prod/docs/2", "");
    assert_eq!(r.header("x-cache"), Some("miss"));
    assert!(!r.body.is_empty());
    assert_eq!(n.load(Ordering::SeqCst), 4);
    // Counters (recorded right after each response is written).
    let ok = wait_until(Duration::from_secs(2), || {
        let m = gw.metrics();
        metric_value(&m, "ringgate_cache_hits_total", &[]) == Some(8.0)
            && metric_value(&m, "ringgate_cache_misses_total", &[]) == Some(4.0)
    });
    assert!(ok, "{}", gw.metrics());
}

#[test]
fn stage_without_cache_and_non_get_are_not_cached() {
    let (origin, n) = counting_origin();
    let gw = Gateway::start(&config(origin.addr, 1, 1 << 20, ""));
    let mut c = Client::connect(gw.addr);
    for _ in 0..2 {
        let r = get(&mut c, "/dev/items/1", "");
        assert_eq!(r.header("x-cache"), None);
    }
    for _ in 0..2 {
        c.send(b"POST /prod/x HTTP/1.1\r\nHost: shop.test\r\nContent-Length: 2\r\n\r\nab");
        let r = c.read_response().unwrap();
        assert_eq!(r.header("x-cache"), Some("miss"));
    }
    assert_eq!(n.load(Ordering::SeqCst), 4);
}

#[test]
fn key_parameters() {
    let (origin, n) = counting_origin();
    let gw = Gateway::start(&config(origin.addr, 1, 1 << 20, ""));
    let mut c = Client::connect(gw.addr);
    let en = get(&mut c, "/prod/items/1?lang=en&utm=1", "");
    // Only query.lang is in this route's key: other parameters do not matter.
    let en2 = get(&mut c, "/prod/items/1?utm=2&lang=en", "");
    assert_eq!(en2.header("x-cache"), Some("hit"));
    assert_eq!(en2.body, en.body);
    let fr = get(&mut c, "/prod/items/1?lang=fr", "");
    assert_eq!(fr.header("x-cache"), Some("miss"));
    let other = get(&mut c, "/prod/items/2?lang=en", "");
    assert_eq!(other.header("x-cache"), Some("miss"));
    let t = get(&mut c, "/prod/items/1?lang=en", "X-Tenant: a\r\n");
    assert_eq!(t.header("x-cache"), Some("miss"));
    let t2 = get(&mut c, "/prod/items/1?lang=en", "x-tenant: a\r\n");
    assert_eq!(t2.header("x-cache"), Some("hit"));
    assert_eq!(n.load(Ordering::SeqCst), 4);
    // Without query keys the whole query string is part of the key.
    let a = get(&mut c, "/prod/any?x=1", "");
    let b = get(&mut c, "/prod/any?x=2", "");
    let a2 = get(&mut c, "/prod/any?x=1", "");
    assert_eq!(a.header("x-cache"), Some("miss"));
    assert_eq!(b.header("x-cache"), Some("miss"));
    assert_eq!(a2.header("x-cache"), Some("hit"));
    // The host is part of the key.
    c.send(b"GET /prod/any?x=1 HTTP/1.1\r\nHost: other.test\r\n\r\n");
    let h = c.read_response().unwrap();
    assert_eq!(h.header("x-cache"), Some("miss"));
    assert_eq!(n.load(Ordering::SeqCst), 7);
}

#[test]
fn expiry_by_ttl_and_upstream_max_age() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let origin = Origin::start(move |r| {
        let i = n2.fetch_add(1, Ordering::SeqCst);
        let resp = Response::ok(format!("#{i}"));
        if r.path.starts_with("/ma/") {
            resp.header("Cache-Control", "public, max-age=1")
        } else {
            resp
        }
    });
    let gw = Gateway::start(&config(origin.addr, 1, 1 << 20, ""));
    let mut c = Client::connect(gw.addr);
    let a = get(&mut c, "/prod/short/1", "");
    assert_eq!(
        get(&mut c, "/prod/short/1", "").header("x-cache"),
        Some("hit")
    );
    let b = get(&mut c, "/prod/ma/1", "");
    assert_eq!(get(&mut c, "/prod/ma/1", "").header("x-cache"), Some("hit"));
    std::thread::sleep(Duration::from_millis(1300));
    let a2 = get(&mut c, "/prod/short/1", "");
    assert_eq!(a2.header("x-cache"), Some("miss"));
    assert_ne!(a2.body, a.body);
    let b2 = get(&mut c, "/prod/ma/1", "");
    assert_eq!(b2.header("x-cache"), Some("miss"));
    assert_ne!(b2.body, b.body);
}

#[test]
fn vary_selects_variants() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let origin = Origin::start(move |r| {
        n2.fetch_add(1, Ordering::SeqCst);
        let accept = r.header("accept").unwrap_or("none").to_string();
        Response::ok(format!("as {accept}")).header("Vary", "Accept")
    });
    let gw = Gateway::start(&config(origin.addr, 1, 1 << 20, ""));
    let mut c = Client::connect(gw.addr);
    let j = get(&mut c, "/prod/v", "Accept: application/json\r\n");
    assert_eq!(j.text(), "as application/json");
    let x = get(&mut c, "/prod/v", "Accept: text/xml\r\n");
    assert_eq!(x.header("x-cache"), Some("miss"));
    assert_eq!(x.text(), "as text/xml");
    let j2 = get(&mut c, "/prod/v", "Accept: application/json\r\n");
    assert_eq!(j2.header("x-cache"), Some("hit"));
    assert_eq!(j2.text(), "as application/json");
    let x2 = get(&mut c, "/prod/v", "Accept: text/xml\r\n");
    assert_eq!(x2.header("x-cache"), Some("hit"));
    assert_eq!(x2.text(), "as text/xml");
    let none = get(&mut c, "/prod/v", "");
    assert_eq!(none.text(), "as none");
    assert_eq!(n.load(Ordering::SeqCst), 3);
}

#[test]
fn cache_control_and_cookies_prevent_storing() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let origin = Origin::start(move |r| {
        let i = n2.fetch_add(1, Ordering::SeqCst);
        let resp = Response::ok(format!("#{i}"));
        match r.path_only() {
            "/no-store" => resp.header("Cache-Control", "no-store"),
            "/private" => resp.header("Cache-Control", "private, max-age=60"),
            "/no-cache" => resp.header("Cache-Control", "no-cache"),
            "/cookie" => resp.header("Set-Cookie", "s=1"),
            "/vary-star" => resp.header("Vary", "*"),
            "/error" => Response::new(500).body(format!("oops #{i}")),
            "/chunked" => Response::ok("a chunked body that is cached").chunked(5),
            _ => resp,
        }
    });
    let gw = Gateway::start(&config(origin.addr, 1, 1 << 20, ""));
    let mut c = Client::connect(gw.addr);
    for p in [
        "/no-store",
        "/private",
        "/no-cache",
        "/cookie",
        "/vary-star",
        "/error",
    ] {
        let before = n.load(Ordering::SeqCst);
        let a = get(&mut c, &format!("/prod{p}"), "");
        let b = get(&mut c, &format!("/prod{p}"), "");
        assert_eq!(b.header("x-cache"), Some("miss"), "{p}");
        assert_ne!(a.body, b.body, "{p}");
        assert_eq!(n.load(Ordering::SeqCst), before + 2, "{p}");
    }
    // A chunked answer is stored (de-chunked, with a Content-Length).
    let a = get(&mut c, "/prod/chunked", "");
    assert!(a.chunked);
    let b = get(&mut c, "/prod/chunked", "");
    assert_eq!(b.header("x-cache"), Some("hit"));
    assert!(!b.chunked);
    assert_eq!(b.text(), "a chunked body that is cached");
}

#[test]
fn credentials_bypass_unless_in_key() {
    let (origin, n) = counting_origin();
    let gw = Gateway::start(&config(origin.addr, 1, 1 << 20, ""));
    let mut c = Client::connect(gw.addr);
    for h in [
        "Authorization: Bearer a\r\n",
        "x-api-key: k\r\n",
        "Cookie: s=1\r\n",
    ] {
        let a = get(&mut c, "/prod/items/9", h);
        let b = get(&mut c, "/prod/items/9", h);
        assert_eq!(b.header("x-cache"), Some("miss"), "{h}");
        assert_ne!(a.body, b.body);
    }
    assert_eq!(n.load(Ordering::SeqCst), 6);
    // An anonymous request never sees what a credentialed one got, and the other way round.
    let anon = get(&mut c, "/prod/items/9", "");
    assert_eq!(anon.header("x-cache"), Some("miss"));
    let auth = get(&mut c, "/prod/items/9", "Authorization: Bearer a\r\n");
    assert_eq!(auth.header("x-cache"), Some("miss"));
    // /me has the principal (Authorization) in its key: cached per caller.
    let a = get(&mut c, "/prod/me", "Authorization: Bearer alice\r\n");
    let b = get(&mut c, "/prod/me", "Authorization: Bearer bob\r\n");
    let a2 = get(&mut c, "/prod/me", "Authorization: Bearer alice\r\n");
    assert_eq!(b.header("x-cache"), Some("miss"));
    assert_eq!(a2.header("x-cache"), Some("hit"));
    assert_eq!(a2.body, a.body);
    assert_ne!(a.body, b.body);
    // Still no sharing with another credential header that is not in the key.
    let k = get(
        &mut c,
        "/prod/me",
        "Authorization: Bearer alice\r\nCookie: s=1\r\n",
    );
    assert_eq!(k.header("x-cache"), Some("miss"));
}

/// A request mapping that copies a client header or query parameter upstream makes the answer
/// depend on it: requests carrying one bypass the cache unless it is in the key, so one
/// client's value is never served to others from the cache.
#[test]
fn fields_a_request_mapping_copies_bypass_the_cache_unless_in_key() {
    let origin = Origin::start(|r| {
        let h = r.header("x-h").unwrap_or("-").to_string();
        let q = r.path.split_once('?').map_or("", |x| x.1).to_string();
        Response::ok(format!("x-h={h} q={q}"))
    });
    let routes = r#"
[[apis.routes]]
route = "GET /mapped/{id}"
integration = { type = "http", upstream = "o" }
request_mapping = { "header.x-h" = "$request.header.x-in", "query.up" = "$request.querystring.sel" }

[[apis.routes]]
route = "GET /keyed/{id}"
integration = { type = "http", upstream = "o" }
cache = { key = ["header.x-in"] }
request_mapping = { "header.x-h" = "$request.header.x-in" }

[[apis.routes]]
route = "GET /cred/{id}"
integration = { type = "http", upstream = "o" }
cache = { key = ["path.id", "query.lang"] }
request_mapping = { "header.x-h" = "Bearer $request.querystring.tok" }

[[apis.routes]]
route = "GET /ip/{id}"
integration = { type = "http", upstream = "o" }
request_mapping = { "header.x-h" = "$context.identity.sourceIp" }
"#;
    let gw = Gateway::start(&config(origin.addr, 1, 1 << 20, routes));
    let mut c = Client::connect(gw.addr);
    let poisoned = get(&mut c, "/prod/mapped/1", "x-in: ATTACKER\r\n");
    assert_eq!(poisoned.text(), "x-h=ATTACKER q=");
    let clean = get(&mut c, "/prod/mapped/1", "");
    assert_eq!(clean.text(), "x-h=- q=", "{:?}", clean.header("x-cache"));
    let again = get(&mut c, "/prod/mapped/1", "");
    assert_eq!(
        (again.header("x-cache"), again.text().as_str()),
        (Some("hit"), "x-h=- q=")
    );
    let other = get(&mut c, "/prod/mapped/1", "x-in: OTHER\r\n");
    assert_eq!(
        (other.header("x-cache"), other.text().as_str()),
        (Some("miss"), "x-h=OTHER q=")
    );
    // The whole query string is in the key here: a mapped query parameter is keyed already.
    let q = get(&mut c, "/prod/mapped/2?sel=a", "");
    assert_eq!(q.text(), "x-h=- q=sel=a&up=a");
    let q2 = get(&mut c, "/prod/mapped/2?sel=a", "");
    assert_eq!(q2.header("x-cache"), Some("hit"));
    // In the key: one entry per value.
    let a = get(&mut c, "/prod/keyed/1", "x-in: a\r\n");
    let b = get(&mut c, "/prod/keyed/1", "x-in: b\r\n");
    let a2 = get(&mut c, "/prod/keyed/1", "x-in: a\r\n");
    assert_eq!((a.text(), b.text()), ("x-h=a q=".into(), "x-h=b q=".into()));
    assert_eq!(
        (a2.header("x-cache"), a2.text().as_str()),
        (Some("hit"), "x-h=a q=")
    );
    // A credential built from a query parameter the key leaves out: each caller goes upstream.
    let alice = get(&mut c, "/prod/cred/1?tok=alice", "");
    let bob = get(&mut c, "/prod/cred/1?tok=bob", "");
    assert_eq!(alice.text(), "x-h=Bearer alice q=tok=alice");
    assert_eq!(
        (bob.header("x-cache"), bob.text().as_str()),
        (Some("miss"), "x-h=Bearer bob q=tok=bob")
    );
    // The caller's address: no key holds it, so the route is not cached.
    get(&mut c, "/prod/ip/1", "");
    let ip = get(&mut c, "/prod/ip/1", "");
    assert_eq!(
        (ip.header("x-cache"), ip.text().as_str()),
        (None, "x-h=127.0.0.1 q=")
    );
}

/// A chunked answer with trailer fields is not stored: an entry is framed by its length and
/// could not give hits the trailers. Without trailer fields it is stored as before.
#[test]
fn answers_with_trailer_fields_are_not_stored() {
    let origin = Origin::start(|r| {
        let trailer = if r.path.contains("trailed") {
            "x-sum: 7\r\n"
        } else {
            ""
        };
        Response::raw(format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n{trailer}\r\n"
        ))
    });
    let gw = Gateway::start(&config(origin.addr, 1, 1 << 20, ""));
    let raw_get = |path: &str| {
        let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        std::io::Write::write_all(
            &mut s,
            format!("GET {path} HTTP/1.1\r\nHost: shop.test\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
        let mut got = Vec::new();
        let _ = std::io::Read::read_to_end(&mut s, &mut got);
        String::from_utf8_lossy(&got).into_owned()
    };
    for _ in 0..2 {
        let got = raw_get("/prod/trailed");
        assert!(got.contains("x-cache: miss"), "{got}");
        assert!(got.ends_with("0\r\nx-sum: 7\r\n\r\n"), "{got:?}");
    }
    raw_get("/prod/plain");
    let got = raw_get("/prod/plain");
    assert!(got.contains("x-cache: hit"), "{got}");
}

/// An upstream slower than `timeout_ms`: the waiters of a stampede get the fetch's 504 when
/// it times out, within their own `timeout_ms`, and do not each ask the upstream again.
#[test]
fn a_stampede_on_a_timed_out_fetch_shares_its_504() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let origin = Origin::start(move |_| {
        n2.fetch_add(1, Ordering::SeqCst);
        Response::ok("too late").delay(Duration::from_millis(1500))
    });
    let extra = format!(
        "[[upstreams]]\nname = \"slow\"\ntargets = [\"{}\"]\ntimeout_ms = 600\n\n[[apis.routes]]\nroute = \"GET /slow/{{id}}\"\nintegration = {{ type = \"http\", upstream = \"slow\" }}\n",
        origin.addr
    );
    let gw = Gateway::start(&config(origin.addr, 1, 1 << 20, &extra));
    let addr = gw.addr;
    let t0 = std::time::Instant::now();
    let threads: Vec<_> = (0..6)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                let r = get(&mut c, "/prod/slow/1", "");
                (r.status, std::time::Instant::now())
            })
        })
        .collect();
    for t in threads {
        let (status, at) = t.join().unwrap();
        assert_eq!(status, 504);
        // Not a second timeout_ms after the first.
        assert!(at - t0 < Duration::from_millis(1100), "{:?}", at - t0);
    }
    assert_eq!(n.load(Ordering::SeqCst), 1, "asked at the origin");
}

#[test]
fn stampede_sends_one_upstream_request() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let origin = Origin::start(move |_| {
        n2.fetch_add(1, Ordering::SeqCst);
        Response::ok("slow answer").delay(Duration::from_millis(600))
    });
    let gw = Gateway::start(&config(origin.addr, 1, 1 << 20, ""));
    let addr = gw.addr;
    let threads: Vec<_> = (0..20)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                get(&mut c, "/prod/items/stampede", "")
            })
        })
        .collect();
    let rs: Vec<RawResponse> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(rs
        .iter()
        .all(|r| r.status == 200 && r.text() == "slow answer"));
    assert_eq!(n.load(Ordering::SeqCst), 1, "counted at the origin");
    let hits = rs
        .iter()
        .filter(|r| r.header("x-cache") == Some("hit"))
        .count();
    assert_eq!(hits, 19);
}

/// A request waiting for another's fetch of the same entry watches its client as one waiting
/// for its own upstream does: a client that closes is counted 499 at once, and the fetch
/// goes on for the others.
#[test]
fn a_stampede_waiter_that_closes_is_a_499() {
    let origin = Origin::start(|_| Response::ok("slow answer").delay(Duration::from_millis(1500)));
    let gw = Gateway::start(&config(origin.addr, 1, 1 << 20, ""));
    let addr = gw.addr;
    let leader = std::thread::spawn(move || {
        let mut c = Client::connect(addr);
        c.set_timeout(Duration::from_secs(5));
        get(&mut c, "/prod/items/w", "")
    });
    std::thread::sleep(Duration::from_millis(200));
    let mut waiter = Client::connect(gw.addr);
    waiter.send(b"GET /prod/items/w HTTP/1.1\r\nHost: shop.test\r\n\r\n");
    std::thread::sleep(Duration::from_millis(300));
    drop(waiter);
    let gone = std::time::Instant::now();
    let count_499 = || {
        metric_value(
            &gw.metrics(),
            "ringgate_requests_total",
            &["status=\"499\""],
        )
    };
    assert!(
        wait_until(Duration::from_secs(3), || count_499() == Some(1.0)),
        "{:?}",
        count_499()
    );
    assert!(
        gone.elapsed() < Duration::from_millis(800),
        "seen only when the fetch ended"
    );
    let r = leader.join().unwrap();
    assert_eq!((r.status, r.text()), (200, "slow answer".to_string()));
}

#[test]
fn scan_does_not_evict_hot_entries() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let origin = Origin::start(move |r| {
        n2.fetch_add(1, Ordering::SeqCst);
        Response::ok(vec![b'x'; 1000]).header("x-path", &r.path)
    });
    // 64 KiB: about 45 entries of 1 KB.
    let gw = Gateway::start(&config(origin.addr, 1, 64 * 1024, ""));
    let mut c = Client::connect(gw.addr);
    let hot: Vec<String> = (0..5).map(|i| format!("/prod/hot/{i}")).collect();
    for _ in 0..3 {
        for p in &hot {
            get(&mut c, p, "");
        }
    }
    let before = n.load(Ordering::SeqCst);
    assert_eq!(before, 5);
    // A scan of 400 one-shot keys (far more than fits), the hot keys used every 100.
    for i in 0..400 {
        get(&mut c, &format!("/prod/scan/{i}"), "");
        if i % 100 == 99 {
            for p in &hot {
                assert_eq!(get(&mut c, p, "").header("x-cache"), Some("hit"), "{p}");
            }
        }
    }
    assert_eq!(n.load(Ordering::SeqCst), before + 400);
    // The early scan keys are gone: the bound holds.
    assert_eq!(
        get(&mut c, "/prod/scan/0", "").header("x-cache"),
        Some("miss")
    );
}

#[test]
fn admin_invalidation_holds_for_every_worker() {
    let (origin, n) = counting_origin();
    let gw = Gateway::start(&config(origin.addr, 2, 1 << 20, ""));
    // Many connections, so both workers get some and cache both paths.
    let mut conns: Vec<Client> = (0..8).map(|_| Client::connect(gw.addr)).collect();
    for c in conns.iter_mut() {
        get(c, "/prod/items/1", "");
        get(c, "/prod/other", "");
    }
    for c in conns.iter_mut() {
        assert_eq!(get(c, "/prod/items/1", "").header("x-cache"), Some("hit"));
    }
    let r = admin_post(
        &gw,
        "/cache/invalidate",
        r#"{"api":"shop","stage":"prod","path_prefix":"/items/"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let before = n.load(Ordering::SeqCst);
    let mut misses = 0;
    for c in conns.iter_mut() {
        if get(c, "/prod/items/1", "").header("x-cache") == Some("miss") {
            misses += 1;
        }
        assert_eq!(get(c, "/prod/other", "").header("x-cache"), Some("hit"));
    }
    // One store for the stage: fetched once again, whichever worker asked first; every later
    // request is a hit.
    assert_eq!(misses, 1);
    assert_eq!(n.load(Ordering::SeqCst), before + misses);
    // Whole stage.
    let r = admin_post(&gw, "/cache/invalidate", r#"{"api":"shop","stage":"prod"}"#);
    assert_eq!(r.status, 200);
    for c in conns.iter_mut().take(1) {
        assert_eq!(get(c, "/prod/other", "").header("x-cache"), Some("miss"));
    }
    // A prefix in another spelling of the stored path purges it (entries are keyed by the
    // normal form); one no request could have is refused.
    let c = &mut conns[0];
    get(c, "/prod/items/a:b", "");
    assert_eq!(get(c, "/prod/items/a:b", "").header("x-cache"), Some("hit"));
    let r = admin_post(
        &gw,
        "/cache/invalidate",
        r#"{"api":"shop","stage":"prod","path_prefix":"//items/a%3a"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        get(c, "/prod/items/a:b", "").header("x-cache"),
        Some("miss")
    );
    let r = admin_post(
        &gw,
        "/cache/invalidate",
        r#"{"api":"shop","stage":"prod","path_prefix":"/items/a%2Fb"}"#,
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.message().contains("encoded slash"), "{}", r.text());
    // Bad requests.
    let r = admin_post(&gw, "/cache/invalidate", r#"{"api":"shop"}"#);
    assert_eq!(r.status, 400);
    assert!(r.message().contains("stage"), "{}", r.text());
    let r = admin_post(&gw, "/cache/invalidate", r#"{"api":"shop","stage":"nope"}"#);
    assert_eq!(r.status, 404);
    assert_eq!(r.message(), "no stage `nope` in API `shop`");
    let r = admin_post(&gw, "/cache/invalidate", r#"{"api":"nope","stage":"prod"}"#);
    assert_eq!((r.status, r.message()), (404, "no API `nope`".to_string()));
    let r = admin_post(
        &gw,
        "/cache/invalidate",
        r#"{"api":"shop","stage":"prod","path_prefix":"items"}"#,
    );
    assert_eq!(r.status, 400);
    let r = gw.admin_get("/cache/invalidate");
    assert_eq!(r.status, 405);
}

/// The stage's store is the gateway's, not a worker's: what one connection stored is a hit on
/// every other, whichever worker the kernel hands it to (with four workers, twenty fresh
/// connections all landing on the first one's worker is a chance of 1 in 4^19).
#[test]
fn a_stored_answer_is_a_hit_on_every_worker() {
    let (origin, n) = counting_origin();
    let gw = Gateway::start(&config(origin.addr, 4, 1 << 20, ""));
    let first = get(&mut Client::connect(gw.addr), "/prod/items/7", "");
    assert_eq!(first.header("x-cache"), Some("miss"));
    // The entry is stored once the whole answer was written: on a loaded machine the client
    // can have it before the worker has run on. Give that a moment.
    std::thread::sleep(std::time::Duration::from_millis(200));
    for i in 0..20 {
        let r = get(&mut Client::connect(gw.addr), "/prod/items/7", "");
        assert_eq!(r.header("x-cache"), Some("hit"), "connection {i}");
        assert_eq!(r.text(), first.text());
    }
    assert_eq!(n.load(Ordering::SeqCst), 1, "fetched once for the gateway");
}

#[test]
fn admin_invalidation_needs_the_token() {
    let (origin, _n) = counting_origin();
    let toml = config(origin.addr, 1, 1 << 20, "").replace(
        "listen = \"@ADMIN@\"",
        "listen = \"@ADMIN@\"\ntoken = \"s3cret\"",
    );
    let gw = Gateway::start(&toml);
    let r = admin_post(&gw, "/cache/invalidate", r#"{"api":"shop","stage":"prod"}"#);
    assert_eq!(r.status, 401);
}

#[test]
fn head_refresh_drops_the_get_answer_too() {
    let (origin, n) = counting_origin();
    let extra = r#"
[[apis.routes]]
route = "ANY /any-fresh/{id}"
integration = { type = "http", upstream = "o" }
cache = { allow_client_invalidate = true }
"#;
    let gw = Gateway::start(&config(origin.addr, 1, 1 << 20, extra));
    let mut c = Client::connect(gw.addr);
    let a = get(&mut c, "/prod/any-fresh/1", "");
    assert_eq!(a.header("x-cache"), Some("miss"));
    // A HEAD asking for a fresh answer goes upstream and drops the stored GET as well.
    c.send(
        b"HEAD /prod/any-fresh/1 HTTP/1.1\r\nHost: shop.test\r\nCache-Control: max-age=0\r\n\r\n",
    );
    let h = c.read_response_to("HEAD").unwrap();
    assert_eq!(h.header("x-cache"), Some("miss"));
    assert_eq!(n.load(Ordering::SeqCst), 2);
    let b = get(&mut c, "/prod/any-fresh/1", "");
    assert_eq!(b.header("x-cache"), Some("miss"));
    assert_ne!(a.body, b.body);
    assert_eq!(n.load(Ordering::SeqCst), 3);
}

#[test]
fn client_max_age_zero_only_where_allowed() {
    let (origin, n) = counting_origin();
    let gw = Gateway::start(&config(origin.addr, 2, 1 << 20, ""));
    let mut c = Client::connect(gw.addr);
    // Route without allow_client_invalidate: the header is ignored.
    let a = get(&mut c, "/prod/items/5", "");
    let b = get(&mut c, "/prod/items/5", "Cache-Control: max-age=0\r\n");
    assert_eq!(b.header("x-cache"), Some("hit"));
    assert_eq!(a.body, b.body);
    // Route that allows it: refetched and stored again.
    let a = get(&mut c, "/prod/fresh/1", "");
    let b = get(&mut c, "/prod/fresh/1", "Cache-Control: max-age=0\r\n");
    assert_eq!(b.header("x-cache"), Some("miss"));
    assert_ne!(a.body, b.body);
    let c2 = get(&mut c, "/prod/fresh/1", "");
    assert_eq!(c2.header("x-cache"), Some("hit"));
    assert_eq!(c2.body, b.body);
    // Other workers dropped their copy too: no connection sees the old body.
    for _ in 0..6 {
        let mut k = Client::connect(gw.addr);
        let r = get(&mut k, "/prod/fresh/1", "");
        assert_ne!(r.body, a.body);
    }
    assert!(n.load(Ordering::SeqCst) >= 3);
}

#[test]
fn memory_stays_bounded() {
    let origin = Origin::start(|r| Response::ok(vec![b'm'; 32 * 1024]).header("x-p", &r.path));
    // 1 MiB of cache; 20 MB of distinct responses go through it.
    let gw = Gateway::start(&config(origin.addr, 1, 1 << 20, ""));
    let mut c = Client::connect(gw.addr);
    for i in 0..50 {
        get(&mut c, &format!("/prod/warm/{i}"), "");
    }
    let rss0 = rss_kib(gw.pid);
    for i in 0..600 {
        let r = get(&mut c, &format!("/prod/big/{i}"), "");
        assert_eq!(r.body.len(), 32 * 1024);
    }
    // The last ones are cached (the store works), the first ones were evicted.
    assert_eq!(
        get(&mut c, "/prod/big/599", "").header("x-cache"),
        Some("hit")
    );
    assert_eq!(
        get(&mut c, "/prod/big/0", "").header("x-cache"),
        Some("miss")
    );
    let rss1 = rss_kib(gw.pid);
    assert!(
        rss1 < rss0 + 6 * 1024,
        "RSS grew from {rss0} KiB to {rss1} KiB for a 1 MiB cache"
    );
}

#[test]
fn memory_bound_holds_for_small_entries() {
    // Responses of ~1.3 KB each hold a whole page of memory (allocations that size are their own
    // mapping): max_bytes must bound that, not the byte count. 8 MiB of cache, 8,000 distinct
    // responses (about 32 MiB of pages if each were kept).
    let origin = Origin::start(|r| Response::ok(vec![b's'; 1200]).header("x-p", &r.path));
    let gw = Gateway::start(&config(origin.addr, 1, 8 << 20, ""));
    let mut c = Client::connect(gw.addr);
    for i in 0..50 {
        get(&mut c, &format!("/prod/warm/{i}"), "");
    }
    let rss0 = rss_kib(gw.pid);
    for i in 0..8000 {
        let r = get(&mut c, &format!("/prod/small/{i}"), "");
        assert_eq!(r.body.len(), 1200);
    }
    assert_eq!(
        get(&mut c, "/prod/small/7999", "").header("x-cache"),
        Some("hit")
    );
    let rss1 = rss_kib(gw.pid);
    assert!(
        rss1 < rss0 + 8 * 1024 + 3 * 1024,
        "RSS grew from {rss0} KiB to {rss1} KiB for an 8 MiB cache"
    );
}

#[test]
fn large_hits_are_written_whole() {
    // Entries above the copy threshold go out with writev: check bytes and keep-alive.
    let origin = Origin::start(|_| {
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        Response::ok(body)
    });
    let gw = Gateway::start(&config(origin.addr, 1, 4 << 20, ""));
    let mut c = Client::connect(gw.addr);
    let a = get(&mut c, "/prod/large", "");
    for _ in 0..3 {
        let b = get(&mut c, "/prod/large", "");
        assert_eq!(b.header("x-cache"), Some("hit"));
        assert_eq!(b.body, a.body);
    }
    // HEAD of a large entry: the stored GET's head, written without its body.
    c.send(b"HEAD /prod/large HTTP/1.1\r\nHost: shop.test\r\n\r\n");
    let h = c.read_response_to("HEAD").unwrap();
    assert_eq!(h.status, 200);
    assert_eq!(h.header("x-cache"), Some("hit"));
    assert_eq!(h.header("content-length"), Some("200000"));
    let r = get(&mut c, "/prod/large", "");
    assert_eq!(r.body.len(), 200_000);
}

#[test]
fn config_errors_name_the_key() {
    let origin = dead_addr();
    let bad = config(origin, 1, 1 << 20, "").replace("\"path.id\"", "\"path.nope\"");
    let (out, _) = check(&bad);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cache.key") && err.contains("nope"), "{err}");
    let bad = config(origin, 1, 1 << 20, "").replace("ttl_s = 60,", "ttl_s = 60, size = 1,");
    let (out, _) = check(&bad);
    assert!(!out.status.success());
}

#[test]
fn reload_turns_caching_off_and_on() {
    let (origin, _n) = counting_origin();
    let on = config(origin.addr, 1, 1 << 20, "");
    let gw = Gateway::start(&on);
    let mut c = Client::connect(gw.addr);
    get(&mut c, "/prod/items/1", "");
    assert_eq!(
        get(&mut c, "/prod/items/1", "").header("x-cache"),
        Some("hit")
    );
    let off = on.replace("cache = { ttl_s = 60, max_bytes = 1048576 }", "");
    assert_ne!(off, on);
    gw.write_config(&off);
    gw.reload_signal();
    assert!(wait_until(Duration::from_secs(5), || {
        get(&mut Client::connect(gw.addr), "/prod/other", "")
            .header("x-cache")
            .is_none()
    }));
    // Back on: the old entries are gone with the stage's store, so this is a miss.
    gw.write_config(&on);
    gw.reload_signal();
    assert!(wait_until(Duration::from_secs(5), || {
        get(&mut Client::connect(gw.addr), "/prod/other2", "")
            .header("x-cache")
            .is_some()
    }));
    assert_eq!(
        get(&mut c, "/prod/items/1", "").header("x-cache"),
        Some("miss")
    );
}

#[test]
fn hits_on_the_epoll_driver() {
    let origin = Origin::start(|r| {
        let n: usize = if r.path.contains("large") {
            100_000
        } else {
            10
        };
        Response::ok(vec![b'e'; n])
    });
    let toml = config(origin.addr, 1, 4 << 20, "")
        .replace("workers = 1\n", "workers = 1\nio = \"epoll\"\n");
    let gw = Gateway::start(&toml);
    assert!(gw.stderr().contains("io driver: epoll"), "{}", gw.stderr());
    let mut c = Client::connect(gw.addr);
    for p in ["/prod/small", "/prod/large"] {
        let a = get(&mut c, p, "");
        let b = get(&mut c, p, "");
        assert_eq!(b.header("x-cache"), Some("hit"));
        assert_eq!(a.body, b.body);
    }
}

#[test]
fn uncacheable_answer_releases_waiters_at_once() {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let origin = Origin::start(move |_| {
        n2.fetch_add(1, Ordering::SeqCst);
        Response::ok("private")
            .header("Cache-Control", "no-store")
            .delay(Duration::from_millis(400))
    });
    let gw = Gateway::start(&config(origin.addr, 1, 1 << 20, ""));
    let addr = gw.addr;
    let t0 = std::time::Instant::now();
    let threads: Vec<_> = (0..6)
        .map(|_| std::thread::spawn(move || get(&mut Client::connect(addr), "/prod/items/x", "")))
        .collect();
    for t in threads {
        let r = t.join().unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-cache"), Some("miss"));
    }
    // The waiters went upstream together after the first answer: about two delays, not six.
    assert!(
        t0.elapsed() < Duration::from_millis(1800),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(n.load(Ordering::SeqCst), 6);
}

/// Client invalidation on a route with auth: only a caller that passed the route's auth can
/// force a fetch (the cache stage runs after auth); each key has its own entries.
#[test]
fn client_invalidation_needs_the_routes_auth() {
    let (origin, n) = counting_origin();
    let gw = Gateway::start(&format!(
        r#"
[[upstreams]]
name = "o"
targets = ["{}"]
[[usage_plans]]
name = "basic"
apis = ["shop/prod"]
[[api_keys]]
name = "k"
value = "cache-test-key-value-000000001"
plans = ["basic"]
[[apis]]
name = "shop"
[apis.stages.prod]
cache = {{ enabled = true, ttl_s = 60 }}
[[apis.routes]]
route = "GET /items/{{id}}"
integration = {{ type = "http", upstream = "o" }}
auth = "api_key"
cache = {{ key = ["path.id", "header.x-api-key"], allow_client_invalidate = true }}
"#,
        origin.addr
    ));
    let mut c = Client::connect(gw.addr);
    let key = "x-api-key: cache-test-key-value-000000001\r\n";
    let a = get(&mut c, "/prod/items/1", key);
    assert_eq!(a.header("x-cache"), Some("miss"));
    assert_eq!(
        get(&mut c, "/prod/items/1", key).header("x-cache"),
        Some("hit")
    );
    let before = n.load(Ordering::SeqCst);
    // No key: refused before the cache, nothing fetched.
    let r = get(&mut c, "/prod/items/1", "Cache-Control: max-age=0\r\n");
    assert_eq!(r.status, 403);
    assert_eq!(n.load(Ordering::SeqCst), before);
    // With the key: refreshed.
    let r = get(
        &mut c,
        "/prod/items/1",
        &format!("{key}Cache-Control: max-age=0\r\n"),
    );
    assert_eq!(r.header("x-cache"), Some("miss"));
    assert_eq!(n.load(Ordering::SeqCst), before + 1);
    assert_ne!(r.body, a.body);
}

#[test]
fn a_body_that_ends_with_the_upstream_connection_is_cached_whole() {
    // No length, not chunked: the body ends when the origin closes. A hit must give the same
    // bytes as the miss did.
    let calls = Arc::new(AtomicUsize::new(0));
    let n = calls.clone();
    let origin = Origin::start(move |_| {
        n.fetch_add(1, Ordering::SeqCst);
        Response::raw(&b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\n\r\nuntil close"[..])
            .then_close()
    });
    let gw = Gateway::start(&config(origin.addr, 1, 1 << 20, ""));
    let miss = gw.get("/prod/items/7");
    assert_eq!(miss.header("x-cache"), Some("miss"));
    assert_eq!(miss.text(), "until close");
    let hit = gw.get("/prod/items/7");
    assert_eq!(hit.header("x-cache"), Some("hit"));
    assert_eq!(hit.text(), "until close");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn the_upstreams_age_shortens_freshness_and_counts_in_hits() {
    // `max-age=3` from a response already 2 s old (`Age: 2`, say from a cache upstream): one
    // second of freshness is left, and hits say how old the answer really is.
    let calls = Arc::new(AtomicUsize::new(0));
    let n = calls.clone();
    let origin = Origin::start(move |_| {
        n.fetch_add(1, Ordering::SeqCst);
        Response::ok("aged")
            .header("cache-control", "max-age=3")
            .header("age", "2")
    });
    let gw = Gateway::start(&config(origin.addr, 1, 1 << 20, ""));
    assert_eq!(gw.get("/prod/items/1").header("x-cache"), Some("miss"));
    let hit = gw.get("/prod/items/1");
    assert_eq!(hit.header("x-cache"), Some("hit"));
    let age: u64 = hit.header("age").unwrap().parse().unwrap();
    assert!((2..=3).contains(&age), "age {age}");
    std::thread::sleep(Duration::from_millis(1300));
    assert_eq!(gw.get("/prod/items/1").header("x-cache"), Some("miss"));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// The hit and miss counters match the `x-cache` answers when many connections share a
/// worker: each request's hit or miss is kept with its connection, not in a per-worker slot
/// that other requests overwrite while one is being answered.
#[test]
fn hit_and_miss_counters_are_exact_under_concurrency() {
    let (origin, _) = counting_origin();
    let gw = Gateway::start(&config(origin.addr, 1, 64 << 20, ""));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let addr = gw.addr;
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                let (mut hits, mut misses) = (0u64, 0u64);
                for i in 0..300 {
                    let r = get(&mut c, &format!("/prod/fresh/{}", (i * 7 + t) % 20), "");
                    match r.header("x-cache") {
                        Some("hit") => hits += 1,
                        Some("miss") => misses += 1,
                        other => panic!("x-cache {other:?}"),
                    }
                }
                (hits, misses)
            })
        })
        .collect();
    let (mut hits, mut misses) = (0u64, 0u64);
    for t in threads {
        let (h, m) = t.join().unwrap();
        hits += h;
        misses += m;
    }
    assert!(hits > 0 && misses > 0);
    let ok = wait_until(Duration::from_secs(3), || {
        let m = gw.metrics();
        metric_value(&m, "ringgate_cache_hits_total", &[]) == Some(hits as f64)
            && metric_value(&m, "ringgate_cache_misses_total", &[]) == Some(misses as f64)
    });
    let m = gw.metrics();
    assert!(
        ok,
        "x-cache: {hits} hits, {misses} misses; counters: {:?} hits, {:?} misses",
        metric_value(&m, "ringgate_cache_hits_total", &[]),
        metric_value(&m, "ringgate_cache_misses_total", &[])
    );
}

#[test]
fn captures_under_way_are_bounded_by_the_stage_cache() {
    // A capture holds the answer until its client has been sent all of it, so slow answers
    // (or slow clients) would hold memory `max_bytes` does not count: 30 answers of 850 KB
    // under way at once, for a stage of 2 MiB. Their captures share the stage's budget, so
    // the gateway grows by about that much, not by 30 x 850 KB (25 MB).
    use std::io::Write;
    const LEN: usize = 900_000;
    let origin = raw_origin(|mut s| {
        if read_head(&mut s, &mut Vec::new()).is_none() {
            return;
        }
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {LEN}\r\nConnection: close\r\n\r\n");
        let body = vec![b'x'; LEN];
        let _ = s.write_all(head.as_bytes());
        let _ = s.write_all(&body[..850_000]);
        std::thread::sleep(Duration::from_secs(3));
        let _ = s.write_all(&body[850_000..]);
    });
    let gw = Gateway::start(&config(origin, 1, 4 << 20, ""));
    let rss0 = rss_kib(gw.pid);
    let clients: Vec<std::net::TcpStream> = (0..30)
        .map(|i| {
            let mut c = std::net::TcpStream::connect(gw.addr).unwrap();
            write!(c, "GET /prod/items/{i} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let grew = rss_kib(gw.pid).saturating_sub(rss0);
    assert!(grew < 12 * 1024, "the gateway grew by {grew} KiB");
    drop(clients);
}
