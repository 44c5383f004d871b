//! Lifecycle: reloads (SIGHUP and admin POST /reload) under load without a failed request or a
//! dropped connection, bad configs refused on reload, graceful drain on SIGTERM/SIGINT.

mod common;

use common::*;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Version `n` of the config: `GET /v` answers `v{n}`, `GET /new{n}` exists only in this
/// version, and `/p/...` proxies to `origin`.
fn versioned(n: usize, origin: SocketAddr) -> String {
    format!(
        r#"
[[upstreams]]
name = "o"
targets = ["{origin}"]

[[apis]]
name = "life"

[[apis.routes]]
route = "GET /v"
integration = {{ type = "mock", status = 200, body = "v{n}" }}

[[apis.routes]]
route = "GET /new{n}"
integration = {{ type = "mock", status = 200, body = "new in v{n}" }}

[[apis.routes]]
route = "GET /p/{{x+}}"
integration = {{ type = "http", upstream = "o" }}
"#
    )
}

struct Hammer {
    stop: Arc<AtomicBool>,
    failures: Arc<Mutex<Vec<String>>>,
    requests: Arc<AtomicUsize>,
    threads: Vec<thread::JoinHandle<Vec<String>>>,
}

/// `n` client threads, each on one keep-alive connection, alternating a mock and a proxied
/// request as fast as they can. Any error, non-200 or reconnect is a failure.
fn hammer(addr: SocketAddr, n: usize) -> Hammer {
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let requests = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::new();
    for t in 0..n {
        let (stop, failures, requests) = (stop.clone(), failures.clone(), requests.clone());
        threads.push(thread::spawn(move || {
            let mut bodies = Vec::new();
            let mut c = Client::connect(addr);
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let path = if i.is_multiple_of(2) {
                    "/v".to_string()
                } else {
                    format!("/p/{t}/{i}")
                };
                i += 1;
                let res = c
                    .try_send(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
                    .and_then(|_| c.read_response());
                match res {
                    Ok(r) if r.status == 200 && !r.closes() => {
                        if path == "/v" && bodies.last() != Some(&r.text()) {
                            bodies.push(r.text());
                        }
                    }
                    Ok(r) => {
                        failures.lock().unwrap().push(format!(
                            "{path}: {} {} (connection: {:?})",
                            r.status,
                            r.text(),
                            r.header("connection")
                        ));
                        c = Client::connect(addr);
                    }
                    Err(e) => {
                        failures.lock().unwrap().push(format!("{path}: {e}"));
                        c = Client::connect(addr);
                    }
                }
                requests.fetch_add(1, Ordering::Relaxed);
            }
            bodies
        }));
    }
    Hammer {
        stop,
        failures,
        requests,
        threads,
    }
}

impl Hammer {
    fn finish(self) -> (Vec<String>, usize, Vec<Vec<String>>) {
        self.stop.store(true, Ordering::Relaxed);
        let seen: Vec<Vec<String>> = self
            .threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        let f = self.failures.lock().unwrap().clone();
        (f, self.requests.load(Ordering::Relaxed), seen)
    }
}

#[test]
fn sighup_reload_under_load_fails_nothing() {
    let origin = Origin::fixed("proxied");
    let gw = Gateway::start(&versioned(1, origin.addr));
    let h = hammer(gw.addr, 3);
    thread::sleep(Duration::from_millis(200));
    for n in 2..=5 {
        gw.write_config(&versioned(n, origin.addr));
        gw.reload_signal();
        assert!(
            wait_until(Duration::from_secs(3), || gw.get("/v").text()
                == format!("v{n}")),
            "reload {n} not applied; stderr:\n{}",
            gw.stderr()
        );
        assert_eq!(gw.get(&format!("/new{n}")).text(), format!("new in v{n}"));
        assert_eq!(
            gw.get(&format!("/new{}", n - 1)).status,
            404,
            "old route gone"
        );
        thread::sleep(Duration::from_millis(150));
    }
    let (failures, count, seen) = h.finish();
    eprintln!("{count} requests during 4 reloads");
    assert!(
        failures.is_empty(),
        "{} failures: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(count > 100, "only {count} requests");
    for s in seen {
        assert_eq!(
            s.last().map(String::as_str),
            Some("v5"),
            "a keep-alive connection kept the old config: {s:?}"
        );
    }
    assert_eq!(
        gw.stderr().matches("config reloaded").count(),
        4,
        "{}",
        gw.stderr()
    );
}

#[test]
fn bad_config_on_sighup_keeps_the_old_one() {
    let origin = Origin::fixed("proxied");
    let gw = Gateway::start(&versioned(1, origin.addr));
    let h = hammer(gw.addr, 2);
    // A conflicting route: refused.
    let bad = format!(
        "{}\n[[apis.routes]]\nroute = \"GET /v\"\nintegration = {{ type = \"mock\", body = \"dup\" }}\n",
        versioned(2, origin.addr)
    );
    gw.write_config(&bad);
    gw.reload_signal();
    assert!(
        wait_until(Duration::from_secs(3), || gw.stderr().contains("refused")),
        "no refusal logged:\n{}",
        gw.stderr()
    );
    let err = gw.stderr();
    let line = err.lines().find(|l| l.contains("refused")).unwrap();
    assert!(
        line.contains("ringgate.toml") && line.contains("route"),
        "{line}"
    );
    // Broken TOML: refused too.
    gw.write_config("[[apis]\nname = ");
    gw.reload_signal();
    assert!(wait_until(Duration::from_secs(3), || gw
        .stderr()
        .matches("refused")
        .count()
        >= 2));
    assert_eq!(gw.get("/v").text(), "v1");
    assert_eq!(gw.get("/new1").status, 200);
    assert_eq!(gw.get("/new2").status, 404);
    thread::sleep(Duration::from_millis(100));
    let (failures, _, _) = h.finish();
    assert!(failures.is_empty(), "{failures:?}");
    // A good config after the bad ones still applies.
    gw.write_config(&versioned(3, origin.addr));
    gw.reload_signal();
    assert!(wait_until(Duration::from_secs(3), || gw.get("/v").text() == "v3"));
}

#[test]
fn admin_reload_answers_200_or_400_with_the_error() {
    let origin = Origin::fixed("proxied");
    let gw = Gateway::start(&versioned(1, origin.addr));
    gw.write_config(&versioned(2, origin.addr));
    let r = admin_request(gw.admin_addr, "POST", "/reload", None).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    // The swap is done when the answer comes.
    assert_eq!(gw.get("/v").text(), "v2");

    let bad =
        versioned(3, origin.addr).replace("name = \"life\"", "name = \"life\"\nbogus_key = 1");
    gw.write_config(&bad);
    let r = admin_request(gw.admin_addr, "POST", "/reload", None).unwrap();
    assert_eq!(r.status, 400);
    let msg = r.message();
    assert!(
        msg.contains("bogus_key") && msg.contains("ringgate.toml"),
        "{msg}"
    );
    assert_eq!(gw.get("/v").text(), "v2");
    // An empty file (as one caught while a tool rewrites it in place) would drop every route.
    std::fs::write(&gw.config_path, " \n").unwrap();
    let r = admin_request(gw.admin_addr, "POST", "/reload", None).unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.message().contains("the file is empty"), "{}", r.text());
    assert_eq!(gw.get("/v").text(), "v2");
    // GET is not a reload.
    let r = admin_get(gw.admin_addr, "/reload", None).unwrap();
    assert_ne!(r.status, 200);
}

#[test]
fn admin_reload_under_load_fails_nothing() {
    let origin = Origin::fixed("proxied");
    let gw = Gateway::start(&versioned(1, origin.addr));
    let h = hammer(gw.addr, 2);
    for n in 2..=6 {
        gw.write_config(&versioned(n, origin.addr));
        let r = admin_request(gw.admin_addr, "POST", "/reload", None).unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        thread::sleep(Duration::from_millis(100));
    }
    let (failures, count, seen) = h.finish();
    assert!(failures.is_empty(), "{failures:?}");
    assert!(count > 50);
    for s in seen {
        assert_eq!(s.last().map(String::as_str), Some("v6"), "{s:?}");
    }
}

fn drain_config(origin: SocketAddr, shutdown_ms: u64) -> String {
    format!(
        "{}\n{}",
        HEADER.replace(
            "shutdown_timeout_ms = 3000",
            &format!("shutdown_timeout_ms = {shutdown_ms}")
        ),
        versioned(1, origin)
    )
}

/// A gateway (drain of 3 s) with `GET /p/slow` under way: its origin answers after `delay`.
fn slow_request_under_way(
    delay: Duration,
) -> (
    Origin,
    Gateway,
    thread::JoinHandle<std::io::Result<RawResponse>>,
) {
    let origin = Origin::start(move |r| {
        if r.path.starts_with("/p/slow") {
            Response::ok("slow done").delay(delay)
        } else {
            Response::ok("fast")
        }
    });
    let gw = Gateway::start(&drain_config(origin.addr, 3000));
    let addr = gw.addr;
    let slow = thread::spawn(move || roundtrip(addr, b"GET /p/slow HTTP/1.1\r\nHost: t\r\n\r\n"));
    assert!(wait_until(Duration::from_secs(2), || origin
        .request_count()
        == 1));
    (origin, gw, slow)
}

#[test]
fn sigterm_drains_in_flight_requests_and_exits_0() {
    let (_origin, mut gw, slow) = slow_request_under_way(Duration::from_secs(1));
    let addr = gw.addr;
    let t0 = Instant::now();
    gw.terminate();
    // New connections are refused while the slow request drains (the listeners are closed,
    // as nginx does; before, the kernel still accepted them and they hung until the exit).
    thread::sleep(Duration::from_millis(300));
    let fresh = std::net::TcpStream::connect(addr);
    assert!(
        fresh
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
        "a new connection was accepted during the drain: {fresh:?}"
    );
    // ... and readiness says so, so that a load balancer stops sending traffic here.
    let h = admin_get(gw.admin_addr, "/healthz", None).unwrap();
    assert_eq!(h.status, 503, "{}", h.text());
    assert!(h.text().contains("draining"), "{}", h.text());
    let r = slow.join().unwrap().expect("the in-flight request failed");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "slow done");
    // It tells the client the connection ends (a kept-alive client would otherwise send its
    // next request into a closing socket).
    assert_eq!(r.header("connection"), Some("close"));
    let st = gw
        .wait_exit(Duration::from_secs(4))
        .expect("did not exit within shutdown_timeout");
    assert_eq!(st.code(), Some(0), "{}", gw.stderr());
    assert!(t0.elapsed() < Duration::from_millis(3500));
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "still accepting after exit"
    );
    // A supervisor may start the next instance at once: the address is free as soon as the
    // process is gone (the listeners stopped listening at the start of the drain).
    std::net::TcpListener::bind(addr).expect("the address is still taken after the exit");
}

#[test]
fn sigterm_with_idle_keep_alive_connections_exits_promptly() {
    let origin = Origin::fixed("ok");
    let mut gw = Gateway::start(&drain_config(origin.addr, 5000));
    let mut idle = Vec::new();
    for _ in 0..4 {
        let mut c = Client::connect(gw.addr);
        c.send(b"GET /v HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!(c.read_response().unwrap().status, 200);
        idle.push(c);
    }
    let t0 = Instant::now();
    gw.terminate();
    let st = gw.wait_exit(Duration::from_secs(6)).expect("did not exit");
    assert_eq!(st.code(), Some(0));
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "idle keep-alive connections held the exit for {:?}",
        t0.elapsed()
    );
    for mut c in idle {
        assert!(c.is_closed_within(Duration::from_secs(1)));
    }
}

#[test]
fn drain_is_bounded_by_shutdown_timeout() {
    let origin = Origin::start(|_| Response::ok("very slow").delay(Duration::from_secs(6)));
    let mut gw = Gateway::start(&drain_config(origin.addr, 500));
    let addr = gw.addr;
    let slow = thread::spawn(move || roundtrip(addr, b"GET /p/x HTTP/1.1\r\nHost: t\r\n\r\n"));
    assert!(wait_until(Duration::from_secs(2), || origin
        .request_count()
        == 1));
    let t0 = Instant::now();
    gw.terminate();
    let st = gw
        .wait_exit(Duration::from_secs(3))
        .expect("drain not bounded by shutdown_timeout_ms");
    assert_eq!(st.code(), Some(0));
    assert!(
        t0.elapsed() < Duration::from_millis(2000),
        "{:?}",
        t0.elapsed()
    );
    let _ = slow.join();
}

#[test]
fn sigint_also_drains_and_exits_0() {
    let origin = Origin::start(|_| Response::ok("slow done").delay(Duration::from_millis(700)));
    let mut gw = Gateway::start(&drain_config(origin.addr, 3000));
    let addr = gw.addr;
    let slow = thread::spawn(move || roundtrip(addr, b"GET /p/x HTTP/1.1\r\nHost: t\r\n\r\n"));
    assert!(wait_until(Duration::from_secs(2), || origin
        .request_count()
        == 1));
    let st = std::process::Command::new("kill")
        .arg("-INT")
        .arg(gw.pid.to_string())
        .status()
        .unwrap();
    assert!(st.success());
    let r = slow
        .join()
        .unwrap()
        .expect("in-flight request failed on SIGINT");
    assert_eq!(r.text(), "slow done");
    let st = gw
        .wait_exit(Duration::from_secs(4))
        .expect("no exit on SIGINT");
    assert_eq!(st.code(), Some(0));
}

#[test]
fn reload_moves_traffic_to_new_upstream_targets() {
    let a = Origin::fixed("a");
    let b = Origin::fixed("b");
    let gw = Gateway::start(&versioned(1, a.addr));
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /p/1 HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(c.read_response().unwrap().text(), "a");
    gw.write_config(&versioned(2, b.addr));
    let r = admin_request(gw.admin_addr, "POST", "/reload", None).unwrap();
    assert_eq!(r.status, 200);
    // Same client connection: every request after the reload goes to the new target.
    let mut got = Vec::new();
    for i in 0..4 {
        c.send(format!("GET /p/{i} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
        got.push(c.read_response().unwrap().text());
    }
    assert_eq!(got, ["b", "b", "b", "b"], "answers after the reload");
    assert_eq!(a.request_count(), 1);
}

#[test]
fn reload_applies_to_the_next_request_on_an_idle_connection() {
    let origin = Origin::fixed("proxied");
    let gw = Gateway::start(&versioned(1, origin.addr));
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /v HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(c.read_response().unwrap().text(), "v1");
    gw.write_config(&versioned(2, origin.addr));
    gw.reload_signal();
    assert!(wait_until(Duration::from_secs(3), || gw
        .stderr()
        .contains("config reloaded")));
    c.send(b"GET /v HTTP/1.1\r\nHost: t\r\n\r\nGET /new1 HTTP/1.1\r\nHost: t\r\n\r\n");
    let first = c.read_response().unwrap();
    let second = c.read_response().unwrap();
    assert_eq!(
        (first.text().as_str(), second.status),
        ("v2", 404),
        "the keep-alive connection answered from the old config after the reload"
    );
}

#[test]
fn refuses_to_start_when_the_port_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = temp_dir("taken");
    let cfg = dir.join("c.toml");
    std::fs::write(
        &cfg,
        format!("[server]\nlisten = [\"{addr}\"]\nworkers = 2\n[[apis]]\nname = \"x\"\n"),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ringgate"))
        .arg("--config")
        .arg(&cfg)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if t0.elapsed() > Duration::from_secs(5) {
            let _ = child.kill();
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let st = st.expect("ringgate kept running on a port it could not bind");
    assert!(!st.success());
    let _ = std::fs::remove_dir_all(&dir);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&addr.to_string()),
        "the error names the address: {err}"
    );
    drop(taken);
}

#[test]
fn missing_config_file_is_one_clear_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringgate"))
        .args(["--config", "/nonexistent/ringgate.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("/nonexistent/ringgate.toml"), "{err}");
}

#[test]
fn a_taken_listen_address_stops_the_start_with_one_line() {
    // Workers bind with SO_REUSEPORT; a second gateway on the same port must not start and
    // silently take half of the first one's connections.
    let mock = r#"
[[apis]]
name = "a"
[[apis.routes]]
route = "GET /x"
integration = { type = "mock", status = 200, body = "first" }
"#;
    let first = Gateway::start(mock);
    let dir = temp_dir("taken");
    let path = dir.join("second.toml");
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = [\"{}\"]\nworkers = 1\n[admin]\nlisten = \"{admin}\"\n{}",
            first.addr,
            mock.replace("first", "second")
        ),
    )
    .unwrap();
    let err_path = dir.join("stderr");
    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_ringgate"))
        .arg("--config")
        .arg(&path)
        .stdin(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("run ringgate");
    let mut status = None;
    wait_until(Duration::from_secs(10), || {
        status = second.try_wait().unwrap();
        status.is_some()
    });
    if status.is_none() {
        let _ = second.kill();
        let _ = second.wait();
    }
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "the second gateway must not start; stderr: {err}"
    );
    assert!(
        err.contains(&format!("cannot bind listener {}", first.addr)) && err.contains("in use"),
        "stderr: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "stderr: {err}");
    // The first gateway still answers every request itself.
    for _ in 0..20 {
        let mut c = Client::connect(first.addr);
        c.send(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!(c.read_response().unwrap().body, b"first");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigusr2_is_ignored_and_sigquit_drains_as_nginx_users_expect() {
    // nginx: USR2 upgrades the binary (not done here: it must not kill the gateway, as the
    // default action would), QUIT stops gracefully (a drain, as SIGTERM).
    let origin = Origin::start(|r| {
        if r.path.starts_with("/p/slow") {
            Response::ok("slow done").delay(Duration::from_millis(600))
        } else {
            Response::ok("fast")
        }
    });
    let mut gw = Gateway::start(&drain_config(origin.addr, 3000));
    gw.kill_sig("USR2");
    thread::sleep(Duration::from_millis(200));
    assert_eq!(gw.get("/p/fast").status, 200, "{}", gw.stderr());
    assert!(gw.stderr().contains("SIGUSR2 ignored"), "{}", gw.stderr());
    let addr = gw.addr;
    let slow = thread::spawn(move || roundtrip(addr, b"GET /p/slow HTTP/1.1\r\nHost: t\r\n\r\n"));
    assert!(wait_until(Duration::from_secs(2), || origin
        .request_count()
        == 2));
    gw.kill_sig("QUIT");
    let r = slow.join().unwrap().expect("the in-flight request failed");
    assert_eq!(r.text(), "slow done");
    let st = gw
        .wait_exit(Duration::from_secs(4))
        .expect("did not exit within shutdown_timeout");
    assert_eq!(st.code(), Some(0), "{}", gw.stderr());
}

/// A TCP listener that accepts and never answers (a JWKS endpoint that hangs), kept open
/// while the value lives.
fn silent_listener() -> (std::net::TcpListener, SocketAddr) {
    let l = local_listener();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

#[test]
fn sigterm_during_a_long_sighup_reload_drains_at_once_and_the_reload_is_dropped() {
    let origin = Origin::fixed("proxied");
    let mut gw = Gateway::start(&versioned(1, origin.addr));
    let addr = gw.addr;
    // Each of these authorizers' first JWKS fetch waits for its timeout (2 s) during the
    // reload: about 6 s in all.
    let (_idp, idp) = silent_listener();
    let mut next = versioned(2, origin.addr);
    for i in 0..3 {
        next.push_str(&format!(
            "\n[[authorizers]]\nname = \"hang{i}\"\ntype = \"jwt\"\njwks_uri = \"http://{idp}/jwks{i}\"\n"
        ));
    }
    gw.write_config(&next);
    gw.reload_signal();
    thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    gw.terminate();
    // The drain starts at once, not after the reload: new connections are refused...
    assert!(
        wait_until(Duration::from_secs(1), || std::net::TcpStream::connect(
            addr
        )
        .is_err()),
        "still accepting 1 s after SIGTERM:\n{}",
        gw.stderr()
    );
    // ... and the process exits long before the reload could have finished.
    let st = gw
        .wait_exit(Duration::from_secs(3))
        .unwrap_or_else(|| panic!("no exit 3 s after SIGTERM:\n{}", gw.stderr()));
    assert_eq!(st.code(), Some(0), "{}", gw.stderr());
    assert!(t0.elapsed() < Duration::from_secs(3));
    // The reload never applied.
    assert!(!gw.stderr().contains("config reloaded"), "{}", gw.stderr());
}

#[test]
fn admin_reload_during_the_drain_is_refused_with_503() {
    // Slow enough for the reload below to come well within it.
    let (origin, mut gw, slow) = slow_request_under_way(Duration::from_millis(2500));
    gw.write_config(&drain_config(origin.addr, 3000).replace("body = \"v1\"", "body = \"v2\""));
    gw.terminate();
    assert!(wait_until(Duration::from_secs(1), || admin_get(
        gw.admin_addr,
        "/healthz",
        None
    )
    .is_ok_and(|h| h.status == 503)));
    let r = admin_request(gw.admin_addr, "POST", "/reload", None).unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.message().contains("draining"), "{}", r.text());
    // The in-flight request still finishes, and the process exits as usual.
    let r = slow.join().unwrap().expect("the in-flight request failed");
    assert_eq!(r.text(), "slow done");
    let st = gw.wait_exit(Duration::from_secs(4)).expect("no exit");
    assert_eq!(st.code(), Some(0), "{}", gw.stderr());
    assert!(!gw.stderr().contains("config reloaded"), "{}", gw.stderr());
}

#[test]
fn a_request_whose_head_is_arriving_at_sigterm_is_answered() {
    // nginx's graceful stop answers a request whose head was partly in; so does the drain.
    let origin = Origin::fixed("proxied");
    let mut gw = Gateway::start(&drain_config(origin.addr, 3000));
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /v HTTP/1.1\r\nHo");
    // Time for the gateway to read it (it counts as in flight from then).
    thread::sleep(Duration::from_millis(500));
    gw.terminate();
    thread::sleep(Duration::from_millis(300));
    c.send(b"st: t\r\n\r\n");
    let r = c
        .read_response()
        .expect("no answer to the request under way");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "v1");
    assert_eq!(r.header("connection"), Some("close"));
    let st = gw.wait_exit(Duration::from_secs(4)).expect("no exit");
    assert_eq!(st.code(), Some(0), "{}", gw.stderr());
}

#[test]
fn sigterm_exits_even_when_the_access_log_pipe_is_not_read() {
    // Access log on stdout, into a pipe nobody reads: once the pipe is full the writer blocks.
    // The drain still ends and the process exits (the writer is waited for 2 s at most).
    let dir = temp_dir("log-pipe");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let cfg = format!(
        "[server]\nlisten = [\"{addr}\"]\nworkers = 1\nshutdown_timeout_ms = 1000\n\
         state_dir = \"{}\"\n\n[admin]\nlisten = \"{admin}\"\n\n[access_log]\npath = \"-\"\n\n\
         [[apis]]\nname = \"a\"\n\n[[apis.routes]]\nroute = \"GET /hello\"\n\
         integration = {{ type = \"mock\", body = \"hi\" }}\n",
        dir.join("state").display()
    );
    let path = dir.join("ringgate.toml");
    std::fs::write(&path, cfg).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ringgate"))
        .arg("--config")
        .arg(&path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _unread = child.stdout.take();
    assert!(wait_until(Duration::from_secs(10), || admin_get(
        admin, "/healthz", None
    )
    .is_ok_and(|r| r.status == 200)));
    // Far more log lines than a pipe holds (64 KiB).
    let mut c = Client::connect(addr);
    for _ in 0..3000 {
        c.send(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!(c.read_response().unwrap().status, 200);
    }
    thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    let _ = std::process::Command::new("kill")
        .arg(child.id().to_string())
        .status();
    let exited = wait_until(Duration::from_secs(8), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !exited {
        let _ = child.kill();
    }
    assert!(
        exited,
        "no exit 8 s after SIGTERM with a blocked access log"
    );
    assert!(t0.elapsed() < Duration::from_secs(8));
    let _ = std::fs::remove_dir_all(&dir);
}
