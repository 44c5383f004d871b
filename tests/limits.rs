//! `[server.limits]`: 431 for oversize heads, 413 for oversize bodies, 408 for slow heads,
//! idle keep-alive close, max_connections.

mod common;

use common::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn config(origin: SocketAddr, limits: &str) -> String {
    format!(
        r#"{HEADER}
[server.limits]
{limits}

[[upstreams]]
name = "o"
targets = ["{origin}"]
timeout_ms = 2000

[[apis]]
name = "p"

[[apis.routes]]
route = "ANY /{{p+}}"
integration = {{ type = "http", upstream = "o" }}
"#
    )
}

#[test]
fn head_over_max_header_bytes_gets_431() {
    let origin = Origin::fixed("ok");
    let gw = Gateway::start(&config(origin.addr, "max_header_bytes = 1024"));
    // Just under the limit: served.
    let small = format!(
        "GET /x HTTP/1.1\r\nHost: t\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(900)
    );
    assert_eq!(gw.request(&small).status, 200);
    let mut c = Client::connect(gw.addr);
    c.send(
        format!(
            "GET /x HTTP/1.1\r\nHost: t\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(2000)
        )
        .as_bytes(),
    );
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 431);
    assert!(!r.message().is_empty());
    assert!(c.is_closed_within(Duration::from_secs(2)));
    assert_eq!(origin.request_count(), 1);
}

#[test]
fn head_growing_past_max_header_bytes_without_end_gets_431() {
    // The head never completes: the gateway must not buffer without bound.
    let origin = Origin::fixed("ok");
    let gw = Gateway::start(&config(origin.addr, "max_header_bytes = 1024"));
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /x HTTP/1.1\r\nHost: t\r\n");
    for i in 0..40 {
        if c.try_send(format!("X-H{i}: {}\r\n", "b".repeat(60)).as_bytes())
            .is_err()
        {
            break;
        }
    }
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 431);
    assert!(c.is_closed_within(Duration::from_secs(2)));
    assert_eq!(origin.conns(), 0);
}

#[test]
fn more_than_max_headers_gets_431() {
    let origin = Origin::fixed("ok");
    let gw = Gateway::start(&config(origin.addr, "max_headers = 10"));
    let mut ok = String::from("GET /x HTTP/1.1\r\nHost: t\r\n");
    for i in 0..9 {
        ok.push_str(&format!("X-H{i}: v\r\n"));
    }
    ok.push_str("\r\n");
    assert_eq!(gw.request(&ok).status, 200);
    let mut bad = String::from("GET /x HTTP/1.1\r\nHost: t\r\n");
    for i in 0..11 {
        bad.push_str(&format!("X-H{i}: v\r\n"));
    }
    bad.push_str("\r\n");
    let mut c = Client::connect(gw.addr);
    c.send(bad.as_bytes());
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 431);
    assert!(c.is_closed_within(Duration::from_secs(2)));
    assert_eq!(origin.request_count(), 1);
}

#[test]
fn content_length_over_max_body_bytes_gets_413() {
    let origin = Origin::fixed("ok");
    let gw = Gateway::start(&config(origin.addr, "max_body_bytes = 1000"));
    let r = gw.request(&format!(
        "POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n{}",
        "a".repeat(1000)
    ));
    assert_eq!(r.status, 200);
    let mut c = Client::connect(gw.addr);
    // Only the head: the gateway must answer without waiting for the body.
    c.send(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 1001\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 413);
    assert!(!r.message().is_empty());
    assert!(c.is_closed_within(Duration::from_secs(2)));
    assert_eq!(origin.request_count(), 1);
}

#[test]
fn chunked_body_over_max_body_bytes_gets_413() {
    let origin = Origin::fixed("ok");
    let gw = Gateway::start(&config(origin.addr, "max_body_bytes = 1000"));
    let mut c = Client::connect(gw.addr);
    let mut raw = b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    raw.extend_from_slice(format!("7d0\r\n{}\r\n0\r\n\r\n", "a".repeat(2000)).as_bytes());
    c.send(&raw);
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 413);
    assert!(c.is_closed_within(Duration::from_secs(2)));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(origin.request_count(), 0);
}

#[test]
fn slow_head_gets_408_and_close() {
    let origin = Origin::fixed("ok");
    let gw = Gateway::start(&config(origin.addr, "header_timeout_ms = 300"));
    let mut c = Client::connect(gw.addr);
    let t0 = Instant::now();
    c.send(b"GET /x HTTP/1.1\r\nHost: t\r\n");
    let r = c.read_response().unwrap();
    let waited = t0.elapsed();
    assert_eq!(r.status, 408);
    assert!(waited >= Duration::from_millis(250), "408 after {waited:?}");
    assert!(waited < Duration::from_secs(3), "408 after {waited:?}");
    assert!(c.is_closed_within(Duration::from_secs(2)));
    assert_eq!(origin.conns(), 0);
    // Counted with the method of the request line that came (the part of the head read
    // before the deadline is kept for that).
    let m = gw.metrics();
    assert_eq!(
        metric_value(
            &m,
            "ringgate_requests_total",
            &["method=\"GET\"", "status=\"408\""]
        ),
        Some(1.0),
        "{m}"
    );
}

#[test]
fn dribbled_head_gets_408_at_the_deadline() {
    // Slowloris: a byte every 50 ms must not extend the deadline.
    let origin = Origin::fixed("ok");
    let gw = Gateway::start(&config(origin.addr, "header_timeout_ms = 400"));
    let mut c = Client::connect(gw.addr);
    let t0 = Instant::now();
    c.send(b"GET /x HTTP/1.1\r\nHost: t\r\n");
    let mut i = 0;
    while t0.elapsed() < Duration::from_millis(1500) {
        if c.try_send(format!("X{i}").as_bytes()).is_err() {
            break;
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 408);
    assert!(c.is_closed_within(Duration::from_secs(2)));
}

#[test]
fn idle_keep_alive_connection_is_closed() {
    let origin = Origin::fixed("ok");
    let gw = Gateway::start(&config(
        origin.addr,
        "idle_timeout_ms = 300\nheader_timeout_ms = 5000",
    ));
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(c.read_response().unwrap().status, 200);
    // Still open shortly after.
    std::thread::sleep(Duration::from_millis(100));
    c.send(b"GET /y HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(c.read_response().unwrap().status, 200);
    let t0 = Instant::now();
    assert!(
        c.is_closed_within(Duration::from_secs(3)),
        "idle connection not closed"
    );
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "closed after {waited:?}"
    );
}

#[test]
fn connections_over_max_connections_are_refused() {
    let origin = Origin::fixed("ok");
    let gw = Gateway::start(&config(origin.addr, "max_connections = 2"));
    let mut a = Client::connect(gw.addr);
    let mut b = Client::connect(gw.addr);
    a.send(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n");
    b.send(b"GET /b HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(a.read_response().unwrap().status, 200);
    assert_eq!(b.read_response().unwrap().status, 200);
    let mut c = Client::connect(gw.addr);
    let _ = c.try_send(b"GET /c HTTP/1.1\r\nHost: t\r\n\r\n");
    assert!(
        c.read_response().is_err(),
        "a third connection was served with max_connections = 2"
    );
    drop(a);
    // A slot frees up once a connection closes.
    assert!(wait_until(Duration::from_secs(3), || {
        roundtrip(gw.addr, b"GET /d HTTP/1.1\r\nHost: t\r\n\r\n")
            .map(|r| r.status == 200)
            .unwrap_or(false)
    }));
}

#[test]
fn streamed_chunked_body_over_max_body_bytes_gets_413() {
    let origin = Origin::fixed("ok");
    let gw = Gateway::start(&config(origin.addr, "max_body_bytes = 1000"));
    let mut c = Client::connect(gw.addr);
    c.send(b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n");
    assert!(wait_until(Duration::from_secs(2), || origin.raw_len() > 0));
    for _ in 0..4 {
        let _ = c.try_send(format!("190\r\n{}\r\n", "a".repeat(400)).as_bytes());
        std::thread::sleep(Duration::from_millis(30));
    }
    let _ = c.try_send(b"0\r\n\r\n");
    let r = c.read_response();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        origin.request_count(),
        0,
        "the origin got the whole oversize body"
    );
    let r = r.expect("no 413 for an oversize streamed chunked body");
    assert_eq!(r.status, 413);
    assert!(c.is_closed_within(Duration::from_secs(2)));
}

/// A client that asks for a big response and stops reading is dropped once the gateway's sent
/// data stays unacknowledged (zero window) for idle_timeout_ms: it cannot hold a connection and
/// its buffers forever.
#[test]
fn client_that_stops_reading_is_dropped() {
    let body = vec![b'x'; 64 << 20];
    let origin = Origin::start(move |_| Response::ok(body.clone()));
    let gw = Gateway::start(&config(
        origin.addr,
        "idle_timeout_ms = 1000\nheader_timeout_ms = 5000",
    ));
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n");
    // Never read: the windows fill up and the gateway's writes stall.
    let active = || metric_value(&gw.metrics(), "ringgate_connections_active", &[]);
    assert!(wait_until(Duration::from_secs(3), || active() == Some(1.0)));
    assert!(
        wait_until(Duration::from_secs(8), || active() == Some(0.0)),
        "a client that stopped reading still holds its connection: {:?}",
        active()
    );
    drop(c);
}

/// Reads once more after a response: `Ok(0)` when the gateway ended the connection with FIN,
/// an error (ECONNRESET) when it reset it.
fn read_after_response(c: &mut Client) -> std::io::Result<usize> {
    use std::io::Read as _;
    assert!(c.pending().is_empty(), "bytes after the response");
    c.set_timeout(Duration::from_secs(5));
    let mut b = [0u8; 64];
    let mut s = c.stream();
    s.read(&mut b)
}

/// A head far over max_header_bytes sent in one large write: the gateway answers 431 and then
/// closes with FIN after reading (and discarding) what the client still sends — a lingering
/// close. Closing at once with the rest unread makes the kernel send an RST, which can destroy
/// the 431 before the client reads it.
#[test]
fn oversize_head_in_one_big_write_gets_431_and_a_clean_close() {
    let origin = Origin::fixed("ok");
    let gw = Gateway::start(&config(origin.addr, "max_header_bytes = 1024"));
    for _ in 0..3 {
        let mut c = Client::connect(gw.addr);
        let head = format!(
            "GET /x HTTP/1.1\r\nHost: t\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(1 << 20)
        );
        c.try_send(head.as_bytes())
            .expect("the gateway reset the connection while the client was sending");
        let r = c.read_response().expect("no 431");
        assert_eq!(r.status, 431);
        match read_after_response(&mut c) {
            Ok(0) => {}
            other => panic!("expected FIN after the 431, got {other:?}"),
        }
    }
    assert_eq!(origin.conns(), 0);
}

/// The same for a body over max_body_bytes sent with its head in one large write (413); the
/// lingering connection is closed once the client goes quiet, even if it never closes.
#[test]
fn oversize_body_in_one_big_write_gets_413_and_a_clean_close() {
    let origin = Origin::fixed("ok");
    let gw = Gateway::start(&config(origin.addr, "max_body_bytes = 1000"));
    let mut c = Client::connect(gw.addr);
    let mut raw = b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 1048576\r\n\r\n".to_vec();
    raw.resize(raw.len() + (1 << 20), b'b');
    c.try_send(&raw)
        .expect("the gateway reset the connection while the client was sending");
    let r = c.read_response().expect("no 413");
    assert_eq!(r.status, 413);
    match read_after_response(&mut c) {
        Ok(0) => {}
        other => panic!("expected FIN after the 413, got {other:?}"),
    }
    // The client keeps its socket open and silent: the gateway closes within its bounds.
    let active = || metric_value(&gw.metrics(), "ringgate_connections_active", &[]);
    assert!(
        wait_until(Duration::from_secs(4), || active() == Some(0.0)),
        "a silent client held a lingering connection: {:?}",
        active()
    );
    drop(c);
    assert_eq!(origin.request_count(), 0);
}

/// A lingering close does not hold the process past the drain: a client that keeps sending
/// after its 413 is cut off when `shutdown_timeout_ms` is up, and the gateway exits cleanly.
#[test]
fn lingering_close_ends_with_the_drain() {
    let origin = Origin::fixed("ok");
    let toml = config(origin.addr, "max_body_bytes = 1000")
        .replace("shutdown_timeout_ms = 3000", "shutdown_timeout_ms = 1000");
    assert!(toml.contains("shutdown_timeout_ms = 1000"));
    let mut gw = Gateway::start(&toml);
    let mut c = Client::connect(gw.addr);
    let mut raw = b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 4194304\r\n\r\n".to_vec();
    raw.resize(raw.len() + (1 << 20), b'b');
    c.try_send(&raw)
        .expect("the gateway reset the connection while the client was sending");
    let r = c.read_response().expect("no 413");
    assert_eq!(r.status, 413);
    match read_after_response(&mut c) {
        Ok(0) => {}
        other => panic!("expected FIN after the 413, got {other:?}"),
    }
    // Keep sending: the linger alone would last seconds more.
    let stream = c.stream().try_clone().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let trickle = std::thread::spawn(move || {
        use std::io::Write as _;
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            if (&stream).write_all(b"bbbb").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    gw.terminate();
    let st = gw.wait_exit(Duration::from_secs(4));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = trickle.join();
    let st = st.expect("the gateway did not exit");
    assert!(st.success(), "{st}");
    assert!(
        t0.elapsed() < Duration::from_millis(2500),
        "exit took {:?} with shutdown_timeout_ms = 1000",
        t0.elapsed()
    );
}

/// Connections closed at once over max_connections are counted by reason, and logged (at most
/// one line a second per worker).
#[test]
fn refused_connections_are_counted() {
    let origin = Origin::fixed("ok");
    let gw = Gateway::start(&config(origin.addr, "max_connections = 2"));
    let mut a = Client::connect(gw.addr);
    let mut b = Client::connect(gw.addr);
    a.send(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n");
    b.send(b"GET /b HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(a.read_response().unwrap().status, 200);
    assert_eq!(b.read_response().unwrap().status, 200);
    for _ in 0..5 {
        let mut c = Client::connect(gw.addr);
        assert!(c.is_closed_within(Duration::from_secs(2)));
    }
    let refused = |reason: &str| {
        metric_value(
            &gw.metrics(),
            "ringgate_connections_refused_total",
            &[&format!("reason=\"{reason}\"")],
        )
    };
    assert!(
        wait_until(Duration::from_secs(2), || refused("max_connections")
            == Some(5.0)),
        "{:?}",
        refused("max_connections")
    );
    assert_eq!(refused("accept_error"), Some(0.0));
    let err = gw.stderr();
    let lines = err
        .lines()
        .filter(|l| l.contains("connection refused: max_connections (2)"))
        .count();
    // Two workers: at most one line each within the second.
    assert!((1..=2).contains(&lines), "{err}");
    drop((a, b));
}

/// Idle connections park (their buffers go back, the socket waits in the worker's epoll set)
/// without needing a descriptor more: near the open-files limit, a burst of connections going
/// idle at once must all stay open, silent new ones and served keep-alive ones alike. (They
/// used to be parked as duplicates, and on io_uring each original closed asynchronously, so
/// about a third of them were closed without a word.) Runs on the suite's driver.
#[test]
fn idle_connections_park_at_the_open_files_limit() {
    let gw = Gateway::start(
        r#"
[[apis]]
name = "m"
[[apis.routes]]
route = "GET /mock"
integration = { type = "mock", body = "ok" }
"#,
    );
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", gw.pid))
            .unwrap()
            .count()
    };
    let base = fds();
    const N: usize = 40;
    let limit = format!("--nofile={}:{}", base + N + 4, base + N + 4);
    let st = std::process::Command::new("prlimit")
        .args(["--pid", &gw.pid.to_string(), &limit])
        .status()
        .expect("prlimit (util-linux)");
    assert!(st.success());
    let get = b"GET /mock HTTP/1.1\r\nHost: t\r\n\r\n";
    let mut conns: Vec<Client> = (0..N).map(|_| Client::connect(gw.addr)).collect();
    for c in conns.iter_mut().step_by(2) {
        c.send(get);
        assert_eq!(c.read_response().unwrap().status, 200);
    }
    // Past the grace period every one of them is parked.
    std::thread::sleep(Duration::from_millis(1000));
    assert!(fds() <= base + N + 4);
    for (i, c) in conns.iter_mut().enumerate() {
        c.send(get);
        let r = c.read_response();
        assert!(
            matches!(&r, Ok(r) if r.status == 200),
            "connection {i} of {N}: {:?}\n{}",
            r.map(|r| r.status),
            gw.stderr()
        );
    }
}

#[test]
fn bodies_held_whole_are_bounded_all_together() {
    // A WAF body rule makes the gateway hold bodies (up to its `body_max_bytes`) before they
    // go on. Each is under `max_body_bytes`, but together they are bounded too: past
    // `max_held_body_bytes` a request is refused with 503 (its body not read), and served
    // again once the held ones are done.
    let origin = Origin::fixed("ok");
    let cfg = config(origin.addr, "max_held_body_bytes = 1000")
        .replace("workers = 2", "workers = 1")
        .replace(
            "[[upstreams]]",
            "[waf]\nrules = [{ name = \"x\", target = \"body\", pattern = \"<script\", action = \"block\" }]\n[[upstreams]]",
        );
    let gw = Gateway::start(&cfg);
    let post = |body: &str| {
        format!(
            "POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let body = "b".repeat(800);
    let mut slow = Client::connect(gw.addr);
    slow.send(&post(&body).as_bytes()[..200]);
    std::thread::sleep(Duration::from_millis(200));
    let r = gw.request(&post(&body));
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(
        r.text().contains("too many request bodies held"),
        "{}",
        r.text()
    );
    // A body that is not held (no body rule reads it: a GET) is not affected.
    assert_eq!(gw.get("/y").status, 200);
    slow.send(&post(&body).as_bytes()[200..]);
    assert_eq!(slow.read_response().unwrap().status, 200);
    // The hold is given back with the request: served again, more than once.
    for _ in 0..3 {
        assert_eq!(gw.request(&post(&body)).status, 200);
    }
}
