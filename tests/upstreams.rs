//! Upstreams: connect failures (502), retries on another target, timeouts (504), resets,
//! active health checks (and 503 when none is healthy), passive checks, balancing modes.

mod common;

use common::*;
use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One API proxying everything to upstream "o" with `targets` and extra upstream keys.
fn config(targets: &[std::net::SocketAddr], upstream_extra: &str) -> String {
    let t: Vec<String> = targets.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        r#"
[[upstreams]]
name = "o"
targets = [{}]
connect_timeout_ms = 500
{upstream_extra}

[[apis]]
name = "p"

[[apis.routes]]
route = "ANY /{{p+}}"
integration = {{ type = "http", upstream = "o" }}
"#,
        t.join(", ")
    )
}

/// Which origin answered: each origin here answers with its own name.
fn named(name: &'static str) -> Origin {
    Origin::start(move |_| Response::ok(name))
}

#[test]
fn connect_failure_gives_502_json() {
    let gw = Gateway::start(&config(&[dead_addr()], "retries = 0"));
    let r = gw.get("/x");
    assert_eq!(r.status, 502);
    assert!(r
        .header("content-type")
        .unwrap_or("")
        .contains("application/json"));
    assert_eq!(r.message(), "Bad Gateway");
    assert!(r.header("x-request-id").is_some());
    // With a retry but nowhere else to go: still 502, and soon.
    let gw = Gateway::start(&config(&[dead_addr()], "retries = 1"));
    let t0 = Instant::now();
    let r = gw.get("/x");
    assert_eq!(r.status, 502);
    assert!(t0.elapsed() < Duration::from_secs(2));
}

#[test]
fn dead_target_is_skipped_by_retry() {
    let live = named("live");
    let gw = Gateway::start(&config(&[dead_addr(), live.addr], "retries = 1"));
    for i in 0..20 {
        let r = gw.get(&format!("/r/{i}"));
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.text(), "live");
    }
    // POST may be retried after a connect failure too (nothing was sent).
    for i in 0..6 {
        let r = gw.request(&format!(
            "POST /p/{i} HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi"
        ));
        assert_eq!(r.status, 200, "POST {i}: {}", r.text());
    }
    assert_eq!(live.request_count(), 26);
}

#[test]
fn slow_upstream_gives_504() {
    let origin = Origin::start(|r| {
        if r.path == "/slow" {
            Response::ok("late").delay(Duration::from_millis(1500))
        } else {
            Response::ok("fast")
        }
    });
    let gw = Gateway::start(&config(&[origin.addr], "timeout_ms = 300\nretries = 1"));
    let t0 = Instant::now();
    let r = gw.get("/slow");
    let took = t0.elapsed();
    assert_eq!(r.status, 504);
    assert_eq!(
        r.json(),
        serde_json::json!({"message": "Endpoint Request Timed Out"})
    );
    assert!(took >= Duration::from_millis(250), "504 after {took:?}");
    assert!(took < Duration::from_millis(1200), "504 after {took:?}");
    // A timeout is not retried: the origin saw the request once.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(origin.request_count(), 1);
    // The next request is fine.
    let r = gw.get("/fast");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "fast");
}

fn reset_then_retry(make_failure: fn() -> Response) {
    let bad = Origin::start(move |_| make_failure());
    let good = named("good");
    let gw = Gateway::start(&config(&[bad.addr, good.addr], "retries = 1"));
    for i in 0..10 {
        let r = gw.get(&format!("/g/{i}"));
        assert_eq!(r.status, 200, "GET {i}: {}", r.text());
        assert_eq!(r.text(), "good");
    }
    assert!(
        bad.request_count() > 0,
        "the failing target was never tried"
    );
    assert_eq!(good.request_count(), 10);
}

#[test]
fn idempotent_get_is_retried_after_reset() {
    reset_then_retry(Response::reset);
}

#[test]
fn idempotent_get_is_retried_after_close_without_answer() {
    reset_then_retry(Response::close);
}

/// A PUT whose body did not all come with its head is streamed upstream. After a reset before
/// any answer byte it is sent again whole when it is small enough to be kept (64 KiB in all),
/// and not at all (502) when larger: never with fewer body bytes than its framing declares.
#[test]
fn a_streamed_body_is_retried_whole_or_not_at_all() {
    let bad = Origin::start(|_| Response::reset());
    let good = Origin::start(|r| Response::ok(r.body.len().to_string()));
    let gw = Gateway::start(&config(
        &[bad.addr, good.addr],
        "retries = 1\ntimeout_ms = 5000",
    ));
    let mut refused_large = 0;
    for (len, chunked) in [
        (20_000, false),
        (20_000, true),
        (200_000, false),
        (200_000, true),
    ] {
        for i in 0..4u8 {
            let body = vec![b'a' + i; len];
            let (first, rest) = body.split_at(1000);
            let mut c = Client::connect(gw.addr);
            if chunked {
                c.send(b"PUT /u HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n");
                c.send(first);
            } else {
                c.send(
                    format!("PUT /u HTTP/1.1\r\nHost: t\r\nContent-Length: {len}\r\n\r\n")
                        .as_bytes(),
                );
                c.send(first);
            }
            // The rest comes later: it is streamed, not sent with the head.
            std::thread::sleep(Duration::from_millis(30));
            if chunked {
                c.send(format!("\r\n{:x}\r\n", rest.len()).as_bytes());
                c.send(rest);
                c.send(b"\r\n0\r\n\r\n");
            } else {
                c.send(rest);
            }
            let r = c.read_response().expect("response");
            match r.status {
                200 => assert_eq!(r.text(), len.to_string(), "{len} chunked={chunked}"),
                502 => {
                    assert!(len > 65536, "a {len}-byte PUT was not retried");
                    assert_eq!(r.message(), "Bad Gateway");
                    refused_large += 1;
                }
                s => panic!("PUT {len} chunked={chunked}: {s} {}", r.text()),
            }
        }
    }
    // Round robin sends every other request to the resetting target first.
    assert!(
        refused_large > 0,
        "no large PUT reached the resetting target"
    );
    // The good target got only whole bodies.
    for r in good.requests() {
        assert!(
            r.body.len() == 20_000 || r.body.len() == 200_000,
            "the good target got a {}-byte body",
            r.body.len()
        );
    }
    assert_eq!(
        good.request_count() + refused_large,
        16,
        "each PUT reached the good target once, or was refused"
    );
}

/// `timeout_ms` runs from the start of the request, connects included: a target that never
/// completes the handshake gives a 504 within `timeout_ms`, not after `connect_timeout_ms`.
#[test]
fn timeout_ms_bounds_a_hanging_connect() {
    use std::os::fd::AsRawFd;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // SAFETY: `listen` on a descriptor this test owns; it only shrinks the accept queue.
    let rc = unsafe { libc::listen(l.as_raw_fd(), 0) };
    assert_eq!(rc, 0);
    let addr = l.local_addr().unwrap();
    // Fill the queue nobody accepts from: the next handshakes get no answer.
    let _held: Vec<_> = (0..3)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()
        })
        .collect();
    let gw = Gateway::start(&format!(
        r#"
[[upstreams]]
name = "o"
targets = ["{addr}"]
connect_timeout_ms = 3000
timeout_ms = 400
retries = 1
[[apis]]
name = "p"
[[apis.routes]]
route = "ANY /{{p+}}"
integration = {{ type = "http", upstream = "o" }}
"#
    ));
    let t0 = Instant::now();
    let r = gw.get("/x");
    let took = t0.elapsed();
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.message(), "Endpoint Request Timed Out");
    assert!(took < Duration::from_millis(1500), "504 after {took:?}");
    drop(l);
}

/// Sockets in CLOSE_WAIT (`/proc/net/tcp` state 08) whose peer is `port` on 127.0.0.1: the
/// gateway's ends of connections that upstream closed.
fn close_wait_to(port: u16) -> usize {
    let text = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3
                && f[3] == "08"
                && f[2].rsplit(':').next() == Some(&format!("{port:04X}")[..])
        })
        .count()
}

/// A pooled connection its upstream closed while it idled is closed by the gateway within
/// about a second (the pools are swept), not left in CLOSE_WAIT until a request takes it.
#[test]
fn pooled_connections_the_upstream_closed_are_swept() {
    // An origin that answers with keep-alive and closes each connection 100 ms later, then
    // says so.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (closed_tx, closed) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let closed_tx = closed_tx.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if read_head(&mut s, &mut buf).is_none() {
                    return;
                }
                let _ = std::io::Write::write_all(
                    &mut s,
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                );
                std::thread::sleep(Duration::from_millis(100));
                drop(s);
                let _ = closed_tx.send(());
            });
        }
    });
    let gw = Gateway::start(&config(&[addr], "retries = 0"));
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(c.read_response().unwrap().status, 200);
    closed.recv_timeout(Duration::from_secs(5)).unwrap();
    // The gateway's end is in CLOSE_WAIT until the next sweep (within 1 s) closes it.
    assert!(
        wait_until(Duration::from_secs(3), || close_wait_to(addr.port()) == 0),
        "{} connections to the origin in CLOSE_WAIT",
        close_wait_to(addr.port())
    );
    // The pool still works: the next request opens a fresh connection.
    c.send(b"GET /y HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(c.read_response().unwrap().status, 200);
}

/// A target that resets as soon as it has read a head, before the body the client sends
/// after it: the request goes to the next target with its whole body (kept), and its answer
/// reaches the client, with a pipelined request behind it answered too; the gateway does not
/// wait for more body from a client that has sent it all.
#[test]
fn a_request_sent_again_after_its_body_was_taken_is_answered() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let bad = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut buf = Vec::new();
            if read_head(&mut s, &mut buf).is_some() {
                // Reset before the body comes.
                let fd = std::os::fd::AsRawFd::as_raw_fd(&s);
                let linger = libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                };
                // SAFETY: setsockopt on a socket this thread owns, with a valid `linger`.
                unsafe {
                    libc::setsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        &linger as *const libc::linger as *const libc::c_void,
                        std::mem::size_of::<libc::linger>() as libc::socklen_t,
                    );
                }
            }
        }
    });
    let good = Origin::start(|r| Response::ok(format!("{} {}", r.method, r.body.len())));
    let gw = Gateway::start(&config(&[bad, good.addr], "retries = 1\ntimeout_ms = 5000"));
    for i in 0..4 {
        let mut c = Client::connect(gw.addr);
        c.send(b"PUT /u HTTP/1.1\r\nHost: t\r\nContent-Length: 3000\r\n\r\n");
        std::thread::sleep(Duration::from_millis(100));
        let mut rest = vec![b'b'; 3000];
        rest.extend_from_slice(b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n");
        c.send(&rest);
        let t = Instant::now();
        let r = c.read_response().expect("response");
        assert_eq!((r.status, r.text().as_str()), (200, "PUT 3000"), "PUT {i}");
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "PUT {i} took {:?}",
            t.elapsed()
        );
        let r = c.read_response().expect("the pipelined request's response");
        assert_eq!((r.status, r.text().as_str()), (200, "GET 0"), "GET {i}");
    }
}

#[test]
fn post_is_not_retried_after_reset() {
    let bad = Origin::start(|_| Response::reset());
    let good = Origin::start(|r| Response::ok(r.body.clone()));
    let gw = Gateway::start(&config(&[bad.addr, good.addr], "retries = 1"));
    let mut failed = 0;
    for i in 0..10 {
        let body = format!("post-{i}");
        let r = gw.request(&format!(
            "POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
        match r.status {
            200 => assert_eq!(r.text(), body),
            502 => {
                assert_eq!(r.message(), "Bad Gateway");
                failed += 1;
            }
            s => panic!("POST {i}: unexpected {s} {}", r.text()),
        }
    }
    let bad_bodies: HashSet<Vec<u8>> = bad.requests().into_iter().map(|r| r.body).collect();
    let good_bodies: HashSet<Vec<u8>> = good.requests().into_iter().map(|r| r.body).collect();
    assert!(failed > 0, "no POST reached the resetting target");
    assert_eq!(
        bad_bodies.len(),
        failed,
        "each failed POST reached the bad target once"
    );
    assert!(
        bad_bodies.is_disjoint(&good_bodies),
        "a POST that reached the resetting target was sent again"
    );
}

#[test]
fn malformed_upstream_response_gives_502() {
    let origin = Origin::start(|_| Response::raw("NOT HTTP AT ALL\r\n\r\n"));
    let dead = dead_addr();
    let gw = Gateway::start(&format!(
        "[access_log]\npath = \"@DIR@/access.log\"\n{}",
        config(&[origin.addr], "retries = 0")
    ));
    let r = gw.get("/x");
    assert_eq!(r.status, 502);
    assert_eq!(r.message(), "Bad Gateway");
    // The access log names the upstream that failed, as for an answered request; and the
    // target of a failed connect too.
    let gw2 = Gateway::start(&format!(
        "[access_log]\npath = \"@DIR@/access.log\"\n{}",
        config(&[dead], "retries = 0")
    ));
    assert_eq!(gw2.get("/y").status, 502);
    for (g, target) in [(&gw, origin.addr), (&gw2, dead)] {
        let want = format!("\"upstream\":\"{target}\"");
        assert!(
            wait_until(Duration::from_secs(3), || {
                std::fs::read_to_string(g.dir.join("access.log"))
                    .unwrap_or_default()
                    .contains(&want)
            }),
            "{want} not in {}",
            std::fs::read_to_string(g.dir.join("access.log")).unwrap_or_default()
        );
    }
}

#[test]
fn upstream_with_both_length_and_chunked_is_not_passed_on_ambiguously() {
    // Response smuggling: RFC 9112 6.3 lets an intermediary refuse the response (502) or
    // forward it framed by Transfer-Encoding alone, without the Content-Length, and never
    // reuse that upstream connection.
    let origin = Origin::start(|_| {
        Response::raw(
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        )
    });
    let gw = Gateway::start(&config(&[origin.addr], "retries = 0"));
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = c.read_response().unwrap();
    match r.status {
        502 => assert_eq!(r.message(), "Bad Gateway"),
        200 => {
            assert!(r.header("content-length").is_none(), "{:?}", r.headers);
            assert!(r.chunked && r.body.is_empty(), "{:?}", r.headers);
            c.send(b"GET /y HTTP/1.1\r\nHost: t\r\n\r\n");
            let _ = c.read_response().unwrap();
            assert_eq!(
                origin.conns(),
                2,
                "the ambiguous upstream connection was reused"
            );
        }
        s => panic!("unexpected {s}"),
    }
}

const HEALTH: &str =
    "retries = 0\nhealth = { path = \"/healthz\", interval_ms = 100, unhealthy_after = 2, healthy_after = 2 }";

/// An origin whose /healthz answers 500 while `sick` is set, and `name` to anything else.
fn with_health(name: &'static str, sick: Arc<AtomicBool>) -> Origin {
    Origin::start(move |r| {
        if r.path == "/healthz" {
            if sick.load(Ordering::SeqCst) {
                Response::new(500).body("sick")
            } else {
                Response::ok("ok")
            }
        } else {
            Response::ok(name)
        }
    })
}

fn who_answers(gw: &Gateway, n: usize) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for i in 0..n {
        let r = gw.get(&format!("/w/{i}"));
        assert_eq!(r.status, 200, "{}", r.text());
        *m.entry(r.text()).or_insert(0) += 1;
    }
    m
}

#[test]
fn health_checks_take_targets_out_and_bring_them_back() {
    let sick_a = Arc::new(AtomicBool::new(false));
    let a = with_health("a", sick_a.clone());
    let b = with_health("b", Arc::new(AtomicBool::new(false)));
    let gw = Gateway::start(&config(&[a.addr, b.addr], HEALTH));
    // Probes run.
    assert!(wait_until(Duration::from_secs(2), || {
        a.requests().iter().any(|r| r.path == "/healthz")
    }));
    let m = who_answers(&gw, 20);
    assert!(
        m.get("a").copied().unwrap_or(0) > 0 && m.get("b").copied().unwrap_or(0) > 0,
        "{m:?}"
    );

    sick_a.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    assert!(
        wait_until(Duration::from_secs(3), || {
            !who_answers(&gw, 6).contains_key("a")
        }),
        "a target failing its health check kept receiving traffic"
    );
    eprintln!("taken out after {:?}", t0.elapsed());
    let before = a.traffic().len();
    let m = who_answers(&gw, 20);
    assert_eq!(m.get("b"), Some(&20), "{m:?}");
    assert_eq!(
        a.traffic().len(),
        before,
        "traffic reached the unhealthy target"
    );

    sick_a.store(false, Ordering::SeqCst);
    assert!(
        wait_until(Duration::from_secs(3), || {
            who_answers(&gw, 6).contains_key("a")
        }),
        "a recovered target did not get traffic back"
    );
    assert!(gw.stderr().contains("unhealthy"), "the change is logged");
}

#[test]
fn all_targets_unhealthy_gives_503() {
    let sick = Arc::new(AtomicBool::new(true));
    let a = with_health("a", sick.clone());
    let b = with_health("b", sick.clone());
    let gw = Gateway::start(&config(&[a.addr, b.addr], HEALTH));
    assert!(
        wait_until(Duration::from_secs(3), || gw.get("/x").status == 503),
        "never 503 with every target failing its health check"
    );
    let r = gw.get("/x");
    assert_eq!(r.status, 503);
    assert_eq!(r.message(), "Service Unavailable");
    let before = a.traffic().len() + b.traffic().len();
    for _ in 0..5 {
        assert_eq!(gw.get("/x").status, 503);
    }
    assert_eq!(a.traffic().len() + b.traffic().len(), before);
    // Recovery.
    sick.store(false, Ordering::SeqCst);
    assert!(wait_until(Duration::from_secs(3), || gw.get("/x").status == 200));
}

/// Statuses and bodies of `n` GETs, one after another.
fn answers(gw: &Gateway, n: usize) -> Vec<(u16, String)> {
    (0..n)
        .map(|i| {
            let r = gw.get(&format!("/q/{i}"));
            (r.status, r.text())
        })
        .collect()
}

fn target_up(gw: &Gateway, target: std::net::SocketAddr) -> Option<f64> {
    metric_value(
        &gw.metrics(),
        "ringgate_upstream_target_up",
        &["upstream=\"o\"", &format!("target=\"{target}\"")],
    )
}

#[test]
fn passive_checks_keep_a_target_that_refuses_connections_out() {
    let live = named("live");
    let dead = dead_addr();
    // Without passive checks, every other request goes to the dead target (no retry here).
    let gw = Gateway::start(&config(&[dead, live.addr], "retries = 0"));
    let failed = answers(&gw, 20).iter().filter(|a| a.0 == 502).count();
    assert!(failed >= 5, "{failed} of 20 failed without passive checks");
    drop(gw);

    let gw = Gateway::start(&config(
        &[dead, live.addr],
        "retries = 0\npassive = { max_fails = 1, fail_timeout_ms = 60000 }",
    ));
    assert_eq!(target_up(&gw, dead), Some(1.0));
    let got = answers(&gw, 20);
    let failed = got.iter().filter(|a| a.0 == 502).count();
    assert_eq!(
        failed, 1,
        "one failure takes the target out, for every worker: {got:?}"
    );
    assert!(got.iter().all(|a| a.0 == 502 || a.1 == "live"), "{got:?}");
    assert_eq!(target_up(&gw, dead), Some(0.0));
    assert_eq!(target_up(&gw, live.addr), Some(1.0));
    assert!(
        gw.stderr().contains(&format!(
            "target {dead} is out for 60000 ms after 1 failed request(s) in a row (passive)"
        )),
        "{}",
        gw.stderr()
    );
    drop(gw);

    // The only target: still tried (502, not 503), since refusing everything helps nobody.
    let gw = Gateway::start(&config(
        &[dead],
        "retries = 0\npassive = { max_fails = 1, fail_timeout_ms = 60000 }",
    ));
    for _ in 0..3 {
        assert_eq!(gw.get("/x").status, 502);
    }
}

#[test]
fn passive_checks_bring_a_target_back_after_its_time() {
    // `a` resets every connection while `sick` is set.
    let sick = Arc::new(AtomicBool::new(true));
    let s2 = sick.clone();
    let a = Origin::start(move |_| {
        if s2.load(Ordering::SeqCst) {
            Response::reset()
        } else {
            Response::ok("a")
        }
    });
    let b = named("b");
    let gw = Gateway::start(&config(
        &[a.addr, b.addr],
        "retries = 0\npassive = { max_fails = 2, fail_timeout_ms = 500 }",
    ));
    // Two failures in a row take `a` out; until then, half the requests fail.
    let mut failed = 0;
    for _ in 0..40 {
        if gw.get("/x").status == 502 {
            failed += 1;
        }
        if failed == 2 {
            break;
        }
    }
    assert_eq!(failed, 2);
    let t0 = Instant::now();
    let before = a.conns();
    let got = answers(&gw, 10);
    if t0.elapsed() < Duration::from_millis(450) {
        assert!(got.iter().all(|r| *r == (200, "b".to_string())), "{got:?}");
        assert_eq!(a.conns(), before, "traffic reached a target that is out");
    }
    // Its time over, one request tries it (and fails): the others keep to `b`.
    std::thread::sleep(Duration::from_millis(550));
    let t1 = Instant::now();
    let got = answers(&gw, 6);
    let trials = got.iter().filter(|r| r.0 == 502).count();
    assert!(trials >= 1, "{got:?}");
    if t1.elapsed() < Duration::from_millis(450) {
        assert_eq!(trials, 1, "{got:?}");
    }
    assert!(
        wait_until(Duration::from_secs(2), || gw.stderr().contains(
            "failed the request that tried it again: out for another 500 ms"
        )),
        "{}",
        gw.stderr()
    );
    // Healed, and its time over: it gets traffic again, and stays in.
    sick.store(false, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(600));
    let got = answers(&gw, 10);
    assert!(got.iter().all(|r| r.0 == 200), "{got:?}");
    assert!(got.iter().any(|r| r.1 == "a"), "{got:?}");
    assert_eq!(target_up(&gw, a.addr), Some(1.0));
}

#[test]
fn passive_checks_count_an_answer_that_is_no_http() {
    let live = named("live");
    let junk = Origin::start(|_| Response::raw("XYZZY garbage\r\n\r\n"));
    let gw = Gateway::start(&config(
        &[junk.addr, live.addr],
        "retries = 0\npassive = { max_fails = 1, fail_timeout_ms = 60000 }",
    ));
    let got = answers(&gw, 20);
    assert_eq!(got.iter().filter(|a| a.0 == 502).count(), 1, "{got:?}");
}

#[test]
fn passive_checks_let_back_the_first_target_that_answers_when_all_were_out() {
    // Both targets reset every connection while sick: both go out, and are still tried
    // (502, not 503). The one that heals answers, and is back at once; the other stays out.
    let sick_a = Arc::new(AtomicBool::new(true));
    let sick_b = Arc::new(AtomicBool::new(true));
    let resetting = |name: &'static str, sick: Arc<AtomicBool>| {
        Origin::start(move |_| {
            if sick.load(Ordering::SeqCst) {
                Response::reset()
            } else {
                Response::ok(name)
            }
        })
    };
    let a = resetting("a", sick_a.clone());
    let b = resetting("b", sick_b.clone());
    let gw = Gateway::start(&config(
        &[a.addr, b.addr],
        "retries = 0\npassive = { max_fails = 1, fail_timeout_ms = 60000 }",
    ));
    let got = answers(&gw, 6);
    assert!(got.iter().all(|r| r.0 == 502), "{got:?}");
    assert_eq!(target_up(&gw, a.addr), Some(0.0));
    assert_eq!(target_up(&gw, b.addr), Some(0.0));
    sick_b.store(false, Ordering::SeqCst);
    let got = answers(&gw, 12);
    let first_ok = got
        .iter()
        .position(|r| r.0 == 200)
        .expect("b never answered");
    assert!(
        got[first_ok..].iter().all(|r| *r == (200, "b".to_string())),
        "{got:?}"
    );
    assert_eq!(target_up(&gw, b.addr), Some(1.0));
    assert_eq!(target_up(&gw, a.addr), Some(0.0));
}

#[test]
fn passive_checks_do_not_blame_a_target_for_a_wait_on_another_requests_fetch() {
    // Two requests for one cached key: the second waits for the first's fetch and has only
    // what is left of its `timeout_ms` when it goes upstream itself; running out of that is
    // not the target's fault.
    // Uncacheable answers: the waiter gets nothing stored and goes upstream itself.
    let slow = |name: &'static str| {
        Origin::start(move |_| {
            Response::ok(name)
                .header("cache-control", "no-store")
                .delay(Duration::from_millis(700))
        })
    };
    let (a, b) = (slow("a"), slow("b"));
    // One worker: the fetch to wait for is per worker.
    let gw = Gateway::start(&format!(
        "{}\n{}\n[apis.stages.prod]\ncache = {{ ttl_s = 60 }}\n",
        HEADER.replace("workers = 2", "workers = 1"),
        config(
            &[a.addr, b.addr],
            "timeout_ms = 1000\nretries = 0\npassive = { max_fails = 1, fail_timeout_ms = 60000 }",
        )
    ));
    let addr = gw.addr;
    let get = move || {
        let mut c = Client::connect(addr);
        c.send(b"GET /prod/k HTTP/1.1\r\nHost: t\r\n\r\n");
        c.read_response().map(|r| r.status).unwrap_or(0)
    };
    let t = std::thread::spawn(get);
    std::thread::sleep(Duration::from_millis(100));
    let second = get();
    let first = t.join().unwrap();
    assert_eq!(first, 200);
    // The second waited 600 ms, then went upstream with 400 ms left: a 504.
    assert_eq!(second, 504);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !gw.stderr().contains("(passive)"),
        "{second}: {}",
        gw.stderr()
    );
    assert_eq!(target_up(&gw, a.addr), Some(1.0));
    assert_eq!(target_up(&gw, b.addr), Some(1.0));
}

#[test]
fn passive_and_health_config_errors_name_the_key() {
    for (extra, key, msg) in [
        (
            "passive = { max_fails = 0 }",
            "upstreams[0].passive.max_fails",
            "must be greater than 0",
        ),
        (
            "passive = { fail_timeout_ms = 0 }",
            "upstreams[0].passive.fail_timeout_ms",
            "must be between 1 and 3600000",
        ),
        (
            "health = { path = \"/h\", timeout_ms = 0 }",
            "upstreams[0].health",
            "timeout_ms, unhealthy_after and healthy_after must be greater than 0",
        ),
        (
            "health = { path = \"/h\\r\\nX: y\" }",
            "upstreams[0].health.path",
            "must be visible ASCII without `#`",
        ),
        (
            "health = { path = \"/h x\" }",
            "upstreams[0].health.path",
            "must be visible ASCII",
        ),
        (
            "passive = { max_fail = 2 }",
            "max_fail",
            "unknown key, expected `max_fails` or `fail_timeout_ms`",
        ),
    ] {
        let (out, _dir) = check(&config(&[dead_addr()], extra));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra} was accepted");
        assert!(err.contains(key) && err.contains(msg), "{extra}: {err}");
    }
}

#[test]
fn round_robin_spreads_evenly() {
    let a = named("a");
    let b = named("b");
    let gw = Gateway::start(&config(&[a.addr, b.addr], "balance = \"round_robin\""));
    // One client connection stays on one worker: strict alternation.
    let mut c = Client::connect(gw.addr);
    let mut m: HashMap<String, usize> = HashMap::new();
    for i in 0..40 {
        c.send(format!("GET /rr/{i} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
        *m.entry(c.read_response().unwrap().text()).or_insert(0) += 1;
    }
    assert_eq!(m.get("a"), Some(&20), "{m:?}");
    assert_eq!(m.get("b"), Some(&20), "{m:?}");
    // New connections (either worker): still close to even.
    let m = who_answers(&gw, 40);
    let (x, y) = (
        m.get("a").copied().unwrap_or(0),
        m.get("b").copied().unwrap_or(0),
    );
    assert!(x >= 14 && y >= 14, "{m:?}");
}

#[test]
fn hash_header_is_sticky() {
    let a = named("a");
    let b = named("b");
    let gw = Gateway::start(&config(
        &[a.addr, b.addr],
        "balance = \"hash:header.x-user\"",
    ));
    let mut seen = HashSet::new();
    for u in 0..20 {
        let mut first = None;
        for _ in 0..4 {
            let r = gw.request(&format!(
                "GET /h HTTP/1.1\r\nHost: t\r\nX-User: user-{u}\r\n\r\n"
            ));
            assert_eq!(r.status, 200);
            let t = r.text();
            match &first {
                None => first = Some(t.clone()),
                Some(f) => assert_eq!(f, &t, "user-{u} moved between targets"),
            }
            seen.insert(t);
        }
    }
    assert_eq!(seen.len(), 2, "20 users all hashed to one target");
}

#[test]
fn least_conn_prefers_the_idle_target() {
    let slow = |name: &'static str| {
        Origin::start(move |r| {
            if r.path == "/slow" {
                Response::ok(name).delay(Duration::from_millis(1500))
            } else {
                Response::ok(name)
            }
        })
    };
    let a = slow("a");
    let b = slow("b");
    // One worker, so one view of in-flight requests.
    let cfg = format!(
        "{}\n{}",
        HEADER.replace("workers = 2", "workers = 1"),
        config(&[a.addr, b.addr], "balance = \"least_conn\"")
    );
    let gw = Gateway::start(&cfg);
    let addr = gw.addr;
    let bg = std::thread::spawn(move || roundtrip(addr, b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n"));
    assert!(wait_until(Duration::from_secs(2), || {
        a.request_count() + b.request_count() == 1
    }));
    let busy = if a.request_count() == 1 { "a" } else { "b" };
    for i in 0..6 {
        let r = gw.get(&format!("/fast/{i}"));
        assert_eq!(r.status, 200);
        assert_ne!(r.text(), busy, "request {i} went to the busy target");
    }
    let r = bg.join().unwrap().unwrap();
    assert_eq!(r.text(), busy);
}

#[test]
fn random2_uses_every_target() {
    let a = named("a");
    let b = named("b");
    let c = named("c");
    let gw = Gateway::start(&config(&[a.addr, b.addr, c.addr], "balance = \"random2\""));
    let m = who_answers(&gw, 30);
    assert_eq!(m.len(), 3, "{m:?}");
}

/// The access log's lines with `"status":N`.
fn log_statuses(gw: &Gateway, n: u16) -> usize {
    let log = std::fs::read_to_string(gw.dir.join("access.log")).unwrap_or_default();
    log.lines()
        .filter(|l| l.contains(&format!("\"status\":{n},")))
        .count()
}

#[test]
fn client_gone_during_a_slow_answer_ends_the_exchange_as_499() {
    // As nginx: a client that closes while the upstream works is logged 499, and the gateway
    // stops waiting for (and drops) the upstream's answer instead of holding it to the end.
    let origin = Origin::start(|r| match r.path.as_str() {
        "/slow" => Response::ok("late").delay(Duration::from_secs(5)),
        _ => Response::ok(format!("fast {}", r.path)),
    });
    let gw = Gateway::start(&format!(
        "[access_log]\npath = \"@DIR@/access.log\"\n{}",
        config(&[origin.addr], "timeout_ms = 10000")
    ));
    let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
    std::io::Write::write_all(&mut s, b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    // The `n`th 499 is logged soon after the client went, well before the origin would have
    // answered.
    let gone_logged = |n: usize, how: &str| {
        let gone = Instant::now();
        assert!(
            wait_until(Duration::from_secs(3), || log_statuses(&gw, 499) == n),
            "no 499 logged for {how}: {}",
            std::fs::read_to_string(gw.dir.join("access.log")).unwrap_or_default()
        );
        assert!(gone.elapsed() < Duration::from_millis(3500));
    };
    std::thread::sleep(Duration::from_millis(400));
    drop(s);
    gone_logged(1, "the close");
    assert_eq!(log_statuses(&gw, 200), 0);

    // A client that is still there, with a pipelined request behind the slow one, gets both
    // answers in order: bytes from it do not count as going away.
    let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    std::io::Write::write_all(
        &mut s,
        b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut all = Vec::new();
    std::io::Read::read_to_end(&mut s, &mut all).unwrap();
    let all = String::from_utf8_lossy(&all);
    let late = all.find("late").expect("first answer");
    let next = all.find("fast /next").expect("second answer");
    assert!(late < next, "{all}");
    assert_eq!(log_statuses(&gw, 499), 1);

    // One with a pipelined request behind that then resets the connection is gone all the
    // same (a half-close would not be: see tests/proxy.rs).
    let s = std::net::TcpStream::connect(gw.addr).unwrap();
    std::io::Write::write_all(
        &mut &s,
        b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    reset_close(s);
    gone_logged(2, "the reset");
}

/// Sends `reqs` one after another on one client connection (so one worker, one pool); the
/// status of each answer.
fn statuses_on_one_connection(gw: &Gateway, reqs: &[&str]) -> Vec<u16> {
    let mut c = Client::connect(gw.addr);
    reqs.iter()
        .map(|r| {
            c.send(r.as_bytes());
            c.read_response().unwrap().status
        })
        .collect()
}

#[test]
fn a_post_is_never_sent_twice_even_on_a_reused_connection() {
    // The origin reads the POST and closes without answering, on a connection the pool had
    // kept from a GET: whether the application acted on it cannot be known, so it is not sent
    // again (nginx without `non_idempotent`); the client gets 502.
    let origin = Origin::start(|r| match r.path.as_str() {
        "/drop" => Response::close(),
        _ => Response::ok("ok"),
    });
    let gw = Gateway::start(&config(&[origin.addr], "retries = 1"));
    let got = statuses_on_one_connection(
        &gw,
        &[
            "GET /warm HTTP/1.1\r\nHost: t\r\n\r\n",
            "POST /drop HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nonce",
        ],
    );
    assert_eq!(got, vec![200, 502]);
    std::thread::sleep(Duration::from_millis(200));
    let posts = origin
        .requests()
        .iter()
        .filter(|r| r.path == "/drop")
        .count();
    assert_eq!(posts, 1, "the POST reached the origin {posts} times");
    // A GET in the same spot is sent again, on a fresh connection (the origin drops it each
    // time, so it is seen twice: once per connection).
    let got = statuses_on_one_connection(
        &gw,
        &[
            "GET /warm HTTP/1.1\r\nHost: t\r\n\r\n",
            "GET /drop HTTP/1.1\r\nHost: t\r\n\r\n",
        ],
    );
    assert_eq!(got, vec![200, 502]);
    std::thread::sleep(Duration::from_millis(200));
    let gets = origin
        .requests()
        .iter()
        .filter(|r| r.path == "/drop")
        .count()
        - posts;
    assert_eq!(gets, 2);
}

#[test]
fn a_post_after_the_upstream_closed_an_idle_connection_goes_through() {
    // The origin closes each connection right after answering, without saying so: the pooled
    // connection is dead when the POST comes. It is found dead before the POST is written to
    // it, so the POST goes out once, on a fresh connection, and succeeds.
    let origin = Origin::start(|r| Response::ok(format!("{} {}", r.method, r.path)).then_close());
    let gw = Gateway::start(&config(&[origin.addr], "retries = 0"));
    for _ in 0..3 {
        let mut c = Client::connect(gw.addr);
        c.send(b"GET /warm HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!(c.read_response().unwrap().status, 200);
        // Time for the origin's close to reach the gateway (a close still on its way is the
        // race no proxy can see: nginx answers 502 then too).
        std::thread::sleep(Duration::from_millis(300));
        c.send(b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\nx");
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    std::thread::sleep(Duration::from_millis(200));
    let posts = origin
        .requests()
        .iter()
        .filter(|r| r.method == "POST")
        .count();
    assert_eq!(posts, 3);
}

#[test]
fn an_invalid_answer_is_not_asked_for_again() {
    // The upstream answered (badly): sending the request again would run it twice, even for
    // an idempotent method (nginx's default leaves `invalid_header` out of its retries too).
    let origin = Origin::start(|r| match r.path.as_str() {
        "/bad" => Response::raw(
            &b"HTTP/1.1 200 OK\r\nX-A: a\r\n folded\r\nContent-Length: 2\r\n\r\nok"[..],
        ),
        _ => Response::ok("ok"),
    });
    let gw = Gateway::start(&config(&[origin.addr], "retries = 1"));
    let got = statuses_on_one_connection(
        &gw,
        &[
            "GET /warm HTTP/1.1\r\nHost: t\r\n\r\n",
            "DELETE /bad HTTP/1.1\r\nHost: t\r\n\r\n",
        ],
    );
    assert_eq!(got, vec![200, 502]);
    std::thread::sleep(Duration::from_millis(200));
    let n = origin
        .requests()
        .iter()
        .filter(|r| r.path == "/bad")
        .count();
    assert_eq!(n, 1, "the DELETE reached the origin {n} times");
}

/// An origin that answers each request on a connection with its path, then `delay` later
/// (`None`: in the same write) sends a second, unrequested answer (`POISONED`) on the same
/// connection, and keeps it open; the counter tells how many of those were written (on
/// loopback, then already in the gateway's socket).
fn stray_answer_origin(
    delay: Option<Duration>,
) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::Write;
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = sent.clone();
    let addr = raw_origin(move |mut s| {
        let mut buf = Vec::new();
        loop {
            let Some(head) = read_head(&mut s, &mut buf) else {
                return;
            };
            let path = head.split(' ').nth(1).unwrap_or("").to_string();
            let body = format!("answer-for-{path}");
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let stray = "HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nPOISONED";
            match delay {
                Some(d) => {
                    let _ = s.write_all(answer.as_bytes());
                    std::thread::sleep(d);
                    let _ = s.write_all(stray.as_bytes());
                }
                None => {
                    let _ = s.write_all(format!("{answer}{stray}").as_bytes());
                }
            }
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    (addr, sent)
}

#[test]
fn bytes_right_behind_an_answer_never_reach_the_next_client() {
    // The stray answer comes in the same segment as the real one: already received with it
    // (into the read buffer, or held by the connection's multishot receive), so the
    // connection must not go back to the pool.
    let (addr, _) = stray_answer_origin(None);
    let gw = Gateway::start(&config(&[addr], "").replace("workers = 2", "workers = 1"));
    for i in 0..10 {
        let r = gw.get(&format!("/victim{i}"));
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), format!("answer-for-/victim{i}"), "request {i}");
    }
}

#[test]
fn an_answer_nobody_asked_for_never_reaches_the_next_client() {
    // A stray answer left on a pooled upstream connection (a buggy upstream, or one answering
    // a request smuggled in a body it did not read) must not be read as the next request's
    // answer: nginx closes such idle connections; here they are dropped before reuse.
    let (addr, strays) = stray_answer_origin(Some(Duration::from_millis(30)));
    let gw = Gateway::start(&config(&[addr], "").replace("workers = 2", "workers = 1"));
    for i in 0..10 {
        let r = gw.get(&format!("/victim{i}"));
        assert_eq!(r.status, 200);
        assert_eq!(r.text(), format!("answer-for-/victim{i}"), "request {i}");
        // The stray answer arrives while the connection idles in the pool.
        assert!(wait_until(Duration::from_secs(5), || strays
            .load(Ordering::SeqCst)
            > i));
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// An origin that answers `POST /early` at once, without reading its body (a common upstream
/// bug), and every other request after reading its body, naming the path and the
/// `Authorization` it got.
fn early_answering_origin() -> std::net::SocketAddr {
    use std::io::{Read, Write};
    raw_origin(|mut s| {
        let mut buf = Vec::new();
        let mut b = [0u8; 4096];
        loop {
            let Some(head) = read_head(&mut s, &mut buf) else {
                return;
            };
            let path = head.split(' ').nth(1).unwrap_or("").to_string();
            let field = |name: &str| {
                head.lines()
                    .find_map(|l| {
                        let (n, v) = l.split_once(':')?;
                        n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                    })
                    .unwrap_or_default()
            };
            let body = if path == "/early" {
                "early".to_string()
            } else {
                let len: usize = field("content-length").parse().unwrap_or(0);
                while buf.len() < len {
                    match s.read(&mut b) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&b[..n]),
                    }
                }
                buf.drain(..len);
                format!("{path} for {}", field("authorization"))
            };
            let out = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if s.write_all(out.as_bytes()).is_err() {
                return;
            }
        }
    })
}

#[test]
fn an_upstream_answering_before_the_body_went_out_is_not_reused() {
    // The answer comes back while the gateway still waits for the client's body. The body
    // then goes out, but the upstream never reads it as a body: here it is the start of a
    // request, which the next client's request on that connection would complete, with that
    // client's credentials (CL.0). Such a connection must not be pooled. Both on a fresh
    // connection and on a pooled one (with its read already in flight).
    let gw = Gateway::start(
        &config(&[early_answering_origin()], "").replace("workers = 2", "workers = 1"),
    );
    for warm in [false, true] {
        if warm {
            assert_eq!(gw.get("/warm").text(), "/warm for ");
        }
        let smuggled = "GET /admin HTTP/1.1\r\nX-Ignore: ";
        let mut attacker = Client::connect(gw.addr);
        attacker.send(
            format!(
                "POST /early HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
                smuggled.len()
            )
            .as_bytes(),
        );
        std::thread::sleep(Duration::from_millis(300));
        attacker.send(smuggled.as_bytes());
        let r = attacker.read_response().unwrap();
        assert_eq!((r.status, r.text()), (200, "early".to_string()));
        let r = gw.request(
            "GET /profile HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer VICTIM\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(r.text(), "/profile for Bearer VICTIM", "warm: {warm}");
        // The attacker's own connection goes on as usual.
        attacker.send(b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!(attacker.read_response().unwrap().text(), "/next for ");
    }
}

/// A raw origin that answers every request after `hold`, with its name and `Connection:
/// close` (so nothing is pooled and every connection it holds is one in use). Returns its
/// address and (connections open now, most open at once).
fn holding_origin(
    name: &'static str,
    hold: Duration,
) -> (std::net::SocketAddr, Arc<(AtomicUsize, AtomicUsize)>) {
    let counts = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
    let c = counts.clone();
    let addr = raw_origin(move |mut s| {
        let now = c.0.fetch_add(1, Ordering::SeqCst) + 1;
        c.1.fetch_max(now, Ordering::SeqCst);
        let mut buf = Vec::new();
        if read_head(&mut s, &mut buf).is_some() {
            std::thread::sleep(hold);
            let _ = s.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{name}",
                    name.len()
                )
                .as_bytes(),
            );
        }
        c.0.fetch_sub(1, Ordering::SeqCst);
    });
    (addr, counts)
}

/// `GET path` is refused at once for want of a `max_connections` slot: 503 with a JSON
/// message and `retry-after: 1`, with no wait on any upstream.
fn assert_overflow(gw: &Gateway, path: &str) {
    let t = Instant::now();
    let r = gw.get(path);
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(
        t.elapsed() < Duration::from_millis(800),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(r.text().contains("\"message\""), "{}", r.text());
}

#[test]
fn max_connections_caps_the_connections_in_use_per_target() {
    let (addr, counts) = holding_origin("a", Duration::from_millis(1200));
    let gw = Gateway::start(&config(&[addr], "max_connections = 2"));
    let gaddr = gw.addr;
    // Two requests take both connections (one per worker, or both on one: the cap is the
    // gateway's, not a worker's).
    let held: Vec<_> = (0..2)
        .map(|i| {
            std::thread::spawn(move || {
                roundtrip(
                    gaddr,
                    format!("GET /held/{i} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes(),
                )
            })
        })
        .collect();
    assert!(wait_until(Duration::from_secs(3), || counts
        .0
        .load(Ordering::SeqCst)
        == 2));
    // A third is turned away at once, before any connection is opened.
    assert_overflow(&gw, "/third");
    let m = gw.metrics();
    let labels = ["upstream=\"o\"", &format!("target=\"{addr}\"")[..]];
    assert_eq!(
        metric_value(&m, "ringgate_upstream_target_active_connections", &labels),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "ringgate_upstream_overflow_total", &["upstream=\"o\""]),
        Some(1.0),
        "{m}"
    );
    // `Expect: 100-continue`: refused at once, never first invited to send its body.
    let r = gw.request(
        "POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
    );
    assert_eq!(r.status, 503, "{}", r.text());
    for h in held {
        assert_eq!(h.join().unwrap().unwrap().status, 200);
    }
    // Their slots are back (given back once each answer is relayed and its connection
    // closed): the next request goes through.
    let idle = || {
        metric_value(
            &gw.metrics(),
            "ringgate_upstream_target_active_connections",
            &labels,
        ) == Some(0.0)
    };
    assert!(wait_until(Duration::from_secs(3), idle), "{}", gw.metrics());
    assert_eq!(gw.get("/after").status, 200);
    assert_eq!(
        counts.1.load(Ordering::SeqCst),
        2,
        "the origin saw more than 2 at once"
    );
    let m = gw.metrics();
    assert_eq!(
        metric_value(&m, "ringgate_upstream_target_active_connections", &labels),
        Some(0.0),
        "{m}"
    );

    // Many at once: never more than 2 reach the origin, the rest get 503, none hangs.
    let burst: Vec<_> = (0..12)
        .map(|i| {
            std::thread::spawn(move || {
                roundtrip(
                    gaddr,
                    format!("GET /burst/{i} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes(),
                )
                .map(|r| r.status)
            })
        })
        .collect();
    let statuses: Vec<u16> = burst
        .into_iter()
        .map(|h| h.join().unwrap().unwrap())
        .collect();
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 503),
        "{statuses:?}"
    );
    // (At least one got through and one was turned away; how many of each depends on how
    // the threads were scheduled. The cap itself is the origin's count below.)
    assert!(
        statuses.contains(&200) && statuses.contains(&503),
        "{statuses:?}"
    );
    assert_eq!(
        counts.1.load(Ordering::SeqCst),
        2,
        "the origin saw more than 2 at once"
    );
}

#[test]
fn a_target_at_max_connections_is_passed_over_for_another() {
    let (a, _) = holding_origin("a", Duration::from_millis(1000));
    let (b, _) = holding_origin("b", Duration::from_millis(1000));
    // Every request hashes to the same target while it has room.
    let gw = Gateway::start(&config(
        &[a, b],
        "max_connections = 1\nbalance = \"hash:header.x-user\"",
    ));
    let gaddr = gw.addr;
    let req = "GET /x HTTP/1.1\r\nHost: t\r\nx-user: same\r\n\r\n";
    let first = std::thread::spawn(move || roundtrip(gaddr, req.as_bytes()));
    std::thread::sleep(Duration::from_millis(300));
    let second = gw.request(req);
    let first = first.join().unwrap().unwrap();
    assert_eq!((first.status, second.status), (200, 200));
    assert_ne!(first.text(), second.text(), "both went to one target");
}

#[test]
fn max_connections_zero_is_refused() {
    let (out, path) = check(&config(
        &["127.0.0.1:9".parse().unwrap()],
        "max_connections = 0",
    ));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_connections"), "{err}");
    assert!(err.contains(&path.display().to_string()), "{err}");
}

#[test]
fn a_full_target_is_not_replaced_by_one_that_passive_checks_keep_out() {
    let (a, a_counts) = holding_origin("a", Duration::from_millis(1500));
    // `b` refuses connections: passive checks take it out after one failure.
    let b = dead_addr();
    let gw = Gateway::start(&config(
        &[a, b],
        "max_connections = 1\nretries = 0\npassive = { max_fails = 1, fail_timeout_ms = 60000 }",
    ));
    // Until `b` has failed once, half the requests go there (502).
    assert!(wait_until(Duration::from_secs(5), || gw
        .get("/probe")
        .status
        == 502));
    let gaddr = gw.addr;
    let held =
        std::thread::spawn(move || roundtrip(gaddr, b"GET /held HTTP/1.1\r\nHost: t\r\n\r\n"));
    assert!(wait_until(Duration::from_secs(3), || a_counts
        .0
        .load(Ordering::SeqCst)
        == 1));
    // `a` is full and `b` is out: 503 at once, not a try of `b`.
    assert_overflow(&gw, "/second");
    assert_eq!(held.join().unwrap().unwrap().status, 200);
}

/// `least_conn` counts a request until its answer's last byte: a target busy streaming a
/// long body is not taken for idle once the head is out.
#[test]
fn least_conn_counts_a_request_while_its_body_streams() {
    let streaming = Arc::new(AtomicBool::new(false));
    let origin = |name: &'static str| {
        let streaming = streaming.clone();
        raw_origin(move |mut s| {
            let mut buf = Vec::new();
            while let Some(head) = read_head(&mut s, &mut buf) {
                if head.starts_with("GET /stream") {
                    streaming.store(true, Ordering::SeqCst);
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
                    for _ in 0..15 {
                        std::thread::sleep(Duration::from_millis(100));
                        if s.write_all(b"1\r\nx\r\n").is_err() {
                            return;
                        }
                    }
                    let _ = s.write_all(b"0\r\n\r\n");
                } else {
                    let _ = s.write_all(
                        format!("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n{name}").as_bytes(),
                    );
                }
            }
        })
    };
    let a = origin("a");
    let b = origin("b");
    let cfg = format!(
        "{}\n{}",
        HEADER.replace("workers = 2", "workers = 1"),
        config(&[a, b], "balance = \"least_conn\"")
    );
    let gw = Gateway::start(&cfg);
    let gaddr = gw.addr;
    // The stream's target: the one that answers `/who` differently once it is busy.
    let bg =
        std::thread::spawn(move || roundtrip(gaddr, b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n"));
    assert!(wait_until(Duration::from_secs(3), || streaming.load(Ordering::SeqCst)));
    std::thread::sleep(Duration::from_millis(100));
    let answers: Vec<String> = (0..6)
        .map(|i| gw.get(&format!("/who/{i}")).text())
        .collect();
    let r = bg.join().unwrap().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 15);
    // Every quick request went to one target: the other was streaming.
    assert!(
        answers.iter().all(|x| *x == answers[0]),
        "quick requests went to the streaming target too: {answers:?}"
    );
}
