//! ringgate embedded in another program: `runtime::start` serves in-process, `reload` swaps the
//! config, `shutdown` drains and frees the port; no signal handler or process setting involved.

mod common;

use common::*;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

fn config(addr: SocketAddr, body: &str) -> String {
    format!(
        r#"
[server]
listen = ["{addr}"]
workers = 1
shutdown_timeout_ms = 2000

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
