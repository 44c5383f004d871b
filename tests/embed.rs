//! ringgate embedded in another program: `runtime::start` serves in-process, `reload` swaps the
//! config, `shutdown` drains and frees the port; no signal handler or process setting involved.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One test of this file at a time (`cargo test` runs them as threads of one process): the
/// teardown test counts the process's descriptors and threads.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn config(addr: SocketAddr, body: &str) -> String {
    // `io = "auto"`, or the driver `RINGGATE_TEST_IO` asks for (as the other tests' configs).
    let io = std::env::var("RINGGATE_TEST_IO")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "auto".into());
    format!(
        r#"
[server]
listen = ["{addr}"]
workers = 1
shutdown_timeout_ms = 2000
io = "{io}"

[[apis]]
name = "e"

[[apis.routes]]
route = "GET /hello"
integration = {{ type = "mock", status = 200, body = "{body}" }}
"#
    )
}

#[test]
fn embedded_gateway_serves_reloads_and_shuts_down() {
    let _one = one_at_a_time();
    let dir = temp_dir("embed");
    let path = dir.join("ringgate.toml");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    std::fs::write(&path, config(addr, "one")).unwrap();
    let cfg = ringgate::config::load(&path).unwrap();
    let gw = ringgate::runtime::start(cfg).unwrap();

    let get = || {
        let mut c = Client::connect(addr);
        c.send(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n");
        c.read_response().unwrap()
    };
    assert_eq!(get().text(), "one");

    // A held keep-alive connection sees the reload on its next request.
    let mut held = Client::connect(addr);
    held.send(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(held.read_response().unwrap().text(), "one");
    std::fs::write(&path, config(addr, "two")).unwrap();
    assert_eq!(gw.reload(), Ok(vec![]));
    assert_eq!(get().text(), "two");
    held.send(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(held.read_response().unwrap().text(), "two");

    // A bad config is refused with the reason; the old one keeps serving.
    std::fs::write(&path, "[server]\nwokers = 1\n").unwrap();
    let err = gw.reload().unwrap_err();
    assert!(err.contains("wokers"), "{err}");
    assert_eq!(get().text(), "two");

    // shutdown() returns once drained, and the port is free again.
    drop(held);
    gw.shutdown();
    assert!(TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err());
    std::net::TcpListener::bind(addr).expect("the port is free after shutdown");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn shutdown_frees_the_admin_port_too_so_a_gateway_can_start_again() {
    let _one = one_at_a_time();
    let dir = temp_dir("embed-admin");
    let path = dir.join("ringgate.toml");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let cfg = config(addr, "one").replacen(
        "[[apis]]",
        &format!("[admin]\nlisten = \"{admin}\"\n\n[[apis]]"),
        1,
    );
    std::fs::write(&path, cfg).unwrap();
    for round in 0..2 {
        let gw = ringgate::runtime::start(ringgate::config::load(&path).unwrap())
            .unwrap_or_else(|e| panic!("start {round}: {e}"));
        let r = admin_get(admin, "/healthz", None).unwrap();
        assert_eq!(r.status, 200, "round {round}");
        gw.shutdown();
        // Every port is free once shutdown returns: nothing is left listening.
        assert!(
            TcpStream::connect_timeout(&admin, Duration::from_millis(500)).is_err(),
            "round {round}: the admin listener still accepts"
        );
        std::net::TcpListener::bind(admin).expect("the admin port is free after shutdown");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A `jwt` authorizer named `idp` whose keys come from `uri` (a background refresher).
fn jwt_authorizer(uri: &str) -> String {
    format!("\n[[authorizers]]\nname = \"idp\"\ntype = \"jwt\"\njwks_uri = \"{uri}\"\n")
}

/// The process's open descriptors and its threads whose names start with `ringgate`.
fn fds_and_threads() -> (usize, usize) {
    let fds = std::fs::read_dir("/proc/self/fd").unwrap().count();
    let threads = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("ringgate"))
        .count();
    (fds, threads)
}

/// Reads until the end of the stream, up to `limit`: what the peer sent before closing, or
/// `None` if it did not close in time.
fn read_to_close(s: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Some(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(got),
            Err(_) => return None,
        }
    }
}

#[test]
fn shutdown_closes_open_connections_and_leaves_nothing_behind() {
    let _one = one_at_a_time();
    let origin = Origin::start(|r| {
        if r.path_only() == "/slow" {
            // Past the drain (300 ms), and short enough for the origin to let go of its
            // sockets within the final wait.
            Response::ok("late").delay(Duration::from_millis(1500))
        } else {
            Response::ok("from origin")
        }
    });
    let dir = temp_dir("embed-teardown");
    let path = dir.join("ringgate.toml");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let cfg = config(addr, "one")
        .replace("shutdown_timeout_ms = 2000", "shutdown_timeout_ms = 300")
        .replacen(
            "[[apis]]",
            &format!(
                "[admin]\nlisten = \"{admin}\"\n\n[access_log]\npath = \"access.log\"\n\n\
                 [[upstreams]]\nname = \"o\"\ntargets = [\"{}\"]\n\n[[apis]]",
                origin.addr
            ),
            1,
        )
        + "\n[[apis.routes]]\nroute = \"GET /{p+}\"\nintegration = { type = \"http\", upstream = \"o\" }\n"
        // A JWKS refresher thread (the origin's answer is no JWKS: it retries in the
        // background).
        + &jwt_authorizer(&format!("http://{}/jwks", origin.addr));
    std::fs::write(&path, cfg).unwrap();
    let base = fds_and_threads();
    for round in 0..3 {
        let gw = ringgate::runtime::start(ringgate::config::load(&path).unwrap())
            .unwrap_or_else(|e| panic!("start {round}: {e}"));
        // A keep-alive client that got its answer, through a pooled upstream connection.
        let mut idle = TcpStream::connect(addr).unwrap();
        idle.write_all(b"GET /p HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let mut buf = Vec::new();
        let head = read_head(&mut idle, &mut buf).expect("an answer");
        assert!(head.starts_with("HTTP/1.1 200"), "round {round}: {head}");
        // A request still running when the drain gives up.
        let mut cut = TcpStream::connect(addr).unwrap();
        cut.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        // A keep-alive admin client.
        let mut adm = TcpStream::connect(admin).unwrap();
        adm.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let mut abuf = Vec::new();
        let ahead = read_head(&mut adm, &mut abuf).expect("an admin answer");
        assert!(ahead.starts_with("HTTP/1.1 200"), "round {round}: {ahead}");
        std::thread::sleep(Duration::from_millis(50));

        let t = Instant::now();
        gw.shutdown();
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "round {round}: {:?}",
            t.elapsed()
        );
        // Every client connection is closed by the time shutdown returns: the idle one and
        // the admin one at once, the cut one without an answer.
        let short = Duration::from_millis(200);
        let rest = read_to_close(&mut idle, short);
        assert!(
            rest.is_some(),
            "round {round}: the keep-alive connection is still open"
        );
        assert_eq!(
            read_to_close(&mut adm, short).map(|b| b.len()),
            Some(0),
            "round {round}: admin"
        );
        assert_eq!(
            read_to_close(&mut cut, short),
            Some(vec![]),
            "round {round}: the cut request"
        );
        // Every thread the gateway started has ended (or is ending) by then.
        assert!(
            wait_until(Duration::from_millis(200), || fds_and_threads().1 == base.1),
            "round {round}: ringgate threads left: {:?}",
            fds_and_threads()
        );
    }
    // Every answered request was logged (the writer ended after writing).
    let log = std::fs::read_to_string(dir.join("access.log")).unwrap();
    assert_eq!(log.matches("\"path\":\"/p\"").count(), 3, "{log}");
    // Nothing stays behind: no descriptor (driver rings, epoll sets, sockets, the access
    // log) and no thread, after three start/shutdown cycles.
    assert!(
        wait_until(Duration::from_secs(3), || fds_and_threads() == base),
        "descriptors and ringgate threads before: {base:?}, after: {:?}",
        fds_and_threads()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_reload_still_fetching_keys_when_the_drain_begins_is_refused() {
    let _one = one_at_a_time();
    let dir = temp_dir("embed-reload-drain");
    let path = dir.join("ringgate.toml");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    std::fs::write(&path, config(addr, "one")).unwrap();
    let gw = ringgate::runtime::start(ringgate::config::load(&path).unwrap()).unwrap();
    // The next config's JWKS URI accepts and never answers: its first fetch waits for its
    // timeout (2 s) inside the reload.
    let idp = local_listener();
    let next = config(addr, "two")
        + &jwt_authorizer(&format!("http://{}/jwks", idp.local_addr().unwrap()));
    std::fs::write(&path, next).unwrap();
    let shared = gw.shared().clone();
    let reload = std::thread::spawn(move || shared.reload());
    std::thread::sleep(Duration::from_millis(300));
    gw.shutdown();
    let r = reload.join().unwrap();
    let err = r.expect_err("a reload finished after the drain began");
    assert!(err.0.contains("draining"), "{}", err.0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_start_refused_for_a_taken_port_leaves_no_thread() {
    let _one = one_at_a_time();
    let dir = temp_dir("embed-taken");
    let path = dir.join("ringgate.toml");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    // With an access log: its writer thread starts before the bind fails.
    let cfg =
        config(addr, "one").replacen("[[apis]]", "[access_log]\npath = \"a.log\"\n\n[[apis]]", 1);
    std::fs::write(&path, cfg).unwrap();
    let base = fds_and_threads().1;
    let err = ringgate::runtime::start(ringgate::config::load(&path).unwrap())
        .err()
        .expect("started on a taken port");
    assert!(err.contains("cannot bind listener"), "{err}");
    assert!(
        // Joined before `start` returns (a thread left to end on its own takes longer).
        wait_until(Duration::from_millis(50), || fds_and_threads().1 == base),
        "ringgate threads left after a failed start: {:?}",
        fds_and_threads()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_reload_replacing_a_jwks_uri_stops_fetching_the_old_one() {
    // Even on a worker that serves nothing (so never looks at the new config for a request),
    // the replaced config is let go and its refresher stops.
    let _one = one_at_a_time();
    let old_fetches = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = old_fetches.clone();
    let idp = Origin::start(move |r| {
        if r.path_only() == "/jwks-a" {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        Response::ok(r#"{"keys":[]}"#).header("cache-control", "max-age=1")
    });
    let dir = temp_dir("embed-jwks-reload");
    let path = dir.join("ringgate.toml");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let with_uri =
        |p: &str| config(addr, "one") + &jwt_authorizer(&format!("http://{}/{p}", idp.addr));
    std::fs::write(&path, with_uri("jwks-a")).unwrap();
    let gw = ringgate::runtime::start(ringgate::config::load(&path).unwrap()).unwrap();
    // Refreshed every second.
    assert!(wait_until(Duration::from_secs(5), || old_fetches
        .load(std::sync::atomic::Ordering::SeqCst)
        >= 2));
    std::fs::write(&path, with_uri("jwks-b")).unwrap();
    gw.reload().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let at_reload = old_fetches.load(std::sync::atomic::Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(2500));
    let after = old_fetches.load(std::sync::atomic::Ordering::SeqCst);
    gw.shutdown();
    assert_eq!(after, at_reload, "the replaced jwks_uri is still fetched");
    let _ = std::fs::remove_dir_all(&dir);
}
