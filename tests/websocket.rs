//! WebSocket through the real binary: conformance cases in the style of the Autobahn suite
//! (fragmentation, interleaved control frames, invalid UTF-8, oversize, unmasked frames, close
//! codes) against a WebSocket API, the `$connect`/`$disconnect`/`@connections` lifecycle,
//! pass-through to an echo backend, and runs with Python's `websockets` package as an
//! independent client and backend.

mod common;

use common::ws::*;
use common::*;
use ringgate::ws::frame::{self, op};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, Once};
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// WebSocket API set-up
// ---------------------------------------------------------------------------------------------

/// The integration backend: `$connect` refuses `?deny=1` and answers 200 after N ms with
/// `?sleep=N`, `echo` echoes (`slow` after 30 ms, `nap` after 1 s), `$default` prefixes,
/// `silent` answers nothing, `big` answers 2000 bytes.
fn api_backend() -> Origin {
    Origin::start(|r| match r.header("x-route-key") {
        Some("$connect") if r.path.contains("deny=1") => Response::new(403).body("denied by test"),
        Some("$connect") if r.path.contains("sleep=") => {
            let ms: u64 = r.path.rsplit("sleep=").next().unwrap().parse().unwrap();
            Response::ok("").delay(Duration::from_millis(ms))
        }
        Some("$connect") if r.path.contains("status=") => {
            let st: u16 = r.path.rsplit("status=").next().unwrap().parse().unwrap();
            Response::new(st).header("Location", "https://elsewhere.example/")
        }
        Some("$connect") => match r.header("sec-websocket-protocol") {
            Some(p) if p.contains("chat.v2") => {
                Response::ok("").header("Sec-WebSocket-Protocol", "chat.v2")
            }
            Some(_) => Response::ok("").header("Sec-WebSocket-Protocol", "not-offered"),
            None => Response::ok(""),
        },
        Some("echo") => Response::ok(r.body.clone()),
        Some("$default") => Response::ok(format!("default:{}", String::from_utf8_lossy(&r.body))),
        Some("slow") => Response::ok(r.body.clone()).delay(Duration::from_millis(30)),
        Some("slower") => Response::ok(r.body.clone()).delay(Duration::from_millis(800)),
        Some("nap") => Response::ok(r.body.clone()).delay(Duration::from_millis(1000)),
        Some("big") => Response::ok("b".repeat(2000)),
        _ => Response::ok(""),
    })
}

fn api_config(backend: SocketAddr, websocket: &str) -> String {
    format!(
        r#"
[[upstreams]]
name = "be"
targets = ["{backend}"]
timeout_ms = 3000

[[apis]]
name = "chat"
protocol = "websocket"
route_selection = "$request.body.action"
{websocket}

[[apis.routes]]
route = "$connect"
integration = {{ type = "http", upstream = "be", path = "/connect" }}
[[apis.routes]]
route = "$disconnect"
integration = {{ type = "http", upstream = "be", path = "/disconnect" }}
[[apis.routes]]
route = "$default"
integration = {{ type = "http", upstream = "be", path = "/default" }}
[[apis.routes]]
route = "echo"
integration = {{ type = "http", upstream = "be", path = "/echo" }}
[[apis.routes]]
route = "slow"
integration = {{ type = "http", upstream = "be", path = "/slow" }}
[[apis.routes]]
route = "nap"
integration = {{ type = "http", upstream = "be", path = "/nap" }}
[[apis.routes]]
route = "silent"
integration = {{ type = "http", upstream = "be", path = "/silent" }}
[[apis.routes]]
route = "big"
integration = {{ type = "http", upstream = "be", path = "/big" }}
"#
    )
}

fn route_keys(o: &Origin, key: &str) -> Vec<Request> {
    o.requests()
        .into_iter()
        .filter(|r| r.header("x-route-key") == Some(key))
        .collect()
}

fn admin(gw: &Gateway, method: &str, path: &str, body: &str) -> RawResponse {
    let mut c = TcpStream::connect(gw.admin_addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        c,
        "{method} {path} HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let status: u16 = text[9..12].parse().unwrap();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .map(|(h, b)| (h.to_string(), b.to_string()))
        .unwrap_or_default();
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    RawResponse {
        version: "HTTP/1.1".into(),
        status,
        headers,
        body: body.into_bytes(),
        chunked: false,
        head: Vec::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// Conformance (Autobahn-style) through a WebSocket API
// ---------------------------------------------------------------------------------------------

#[test]
fn messages_are_routed_and_answered() {
    let be = api_backend();
    let gw = Gateway::start(&api_config(be.addr, ""));
    let mut ws = open(gw.addr, "/?room=7");
    ws.text(r#"{"action":"echo","v":1}"#);
    assert_eq!(ws.recv_text(), r#"{"action":"echo","v":1}"#);
    ws.text("not json");
    assert_eq!(ws.recv_text(), "default:not json");
    ws.text(r#"{"action":"silent"}"#);
    ws.text(r#"{"action":"echo","v":2}"#);
    // The silent route answered nothing: the next message is the echo.
    assert_eq!(ws.recv_text(), r#"{"action":"echo","v":2}"#);
    let connect = route_keys(&be, "$connect");
    assert_eq!(connect.len(), 1);
    assert_eq!(connect[0].method, "POST");
    assert_eq!(connect[0].path, "/connect?room=7");
    // Host: the integration target's address (not the client's, nor the upstream's name).
    let host = be.addr.to_string();
    assert_eq!(connect[0].headers_named("host"), [host.as_str()]);
    assert_eq!(connect[0].header("sec-websocket-key"), Some(KEY));
    let id = connect[0].header("x-connection-id").unwrap().to_string();
    let echo = route_keys(&be, "echo");
    assert_eq!(echo[0].header("x-connection-id"), Some(id.as_str()));
    assert_eq!(echo[0].path, "/echo");
    assert_eq!(echo[0].headers_named("host"), [host.as_str()]);
}

#[test]
fn messages_never_select_reserved_routes_or_exhaust_the_stack() {
    let be = api_backend();
    let gw = Gateway::start(&api_config(be.addr, ""));
    let mut ws = open(gw.addr, "/");
    // `$connect` and `$disconnect` run on the handshake and the close only.
    for k in ["$connect", "$disconnect"] {
        let m = format!(r#"{{"action":"{k}"}}"#);
        ws.text(&m);
        assert_eq!(ws.recv_text(), format!("default:{m}"));
    }
    assert_eq!(route_keys(&be, "$connect").len(), 1);
    assert!(route_keys(&be, "$disconnect").is_empty());
    // Deep nesting (30 KB, within the 32 KB frame limit) goes to `$default`; it used to
    // overflow the worker's stack and abort the whole gateway.
    let deep = format!(
        r#"{{"action":"echo","x":{}1{}}}"#,
        "[".repeat(15_000),
        "]".repeat(15_000)
    );
    ws.text(&deep);
    assert_eq!(ws.recv_text(), format!("default:{deep}"));
    ws.text(r#"{"action":"echo","v":3}"#);
    assert_eq!(ws.recv_text(), r#"{"action":"echo","v":3}"#);
    assert_eq!(
        gw.get("/healthz-is-not-a-route").status,
        404,
        "the gateway still answers"
    );
    drop(ws);
    assert!(wait_until(Duration::from_secs(3), || route_keys(
        &be,
        "$disconnect"
    )
    .len()
        == 1));
}

#[test]
fn route_selection_expressions_in_api_gateway_syntax() {
    // `${...}` marks where a field ends, several fields and text make one key, as in API
    // Gateway's selection expressions; the backend sees the key it was selected by.
    let be = api_backend();
    let cfg = api_config(be.addr, "").replace(
        r#"route_selection = "$request.body.action""#,
        r#"route_selection = "${request.body.service}/${request.body.action}-v$request.body.v""#,
    );
    let cfg = cfg.replace(r#"route = "echo""#, r#"route = "chat/echo-v2""#);
    let gw = Gateway::start(&cfg);
    let mut ws = open(gw.addr, "/");
    // The route's backend path answers nothing to this key: the call itself is the proof.
    let m = r#"{"service":"chat","action":"echo","v":2}"#;
    ws.text(m);
    assert!(wait_until(Duration::from_secs(3), || {
        route_keys(&be, "chat/echo-v2").len() == 1
    }));
    assert_eq!(route_keys(&be, "chat/echo-v2")[0].body, m.as_bytes());
    // A field missing, or a key no route has: `$default`.
    for m in [
        r#"{"service":"chat","action":"echo"}"#,
        r#"{"service":"chat","action":"echo","v":3}"#,
        r#"{"action":"echo","v":2}"#,
    ] {
        ws.text(m);
        assert_eq!(ws.recv_text(), format!("default:{m}"));
    }
    // A bare field name running into text is refused at load, with the way to write it.
    let (out, _) = check(&api_config(be.addr, "").replace(
        r#"route_selection = "$request.body.action""#,
        r#"route_selection = "$request.body.action-beta""#,
    ));
    let e = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success());
    assert!(
        e.contains("route_selection") && e.contains("${request.body.action}-"),
        "{e}"
    );
}

#[test]
fn an_answer_larger_than_the_message_limit_is_not_sent() {
    // The limit holds both ways (as for `@connections` posts): the client hears why, the
    // connection stays open, and the event counts as a 502.
    let be = api_backend();
    let gw = Gateway::start(&api_config(
        be.addr,
        "websocket = { max_message_bytes = 1000 }",
    ));
    let mut ws = open(gw.addr, "/");
    ws.text(r#"{"action":"big"}"#);
    let m: serde_json::Value = serde_json::from_str(&ws.recv_text()).unwrap();
    assert_eq!(
        m["message"],
        "Integration response larger than the message limit"
    );
    ws.text(r#"{"action":"echo"}"#);
    assert_eq!(ws.recv_text(), r#"{"action":"echo"}"#);
    let labels = ["route=\"big\"", "method=\"MESSAGE\"", "status=\"502\""];
    assert_eq!(
        metric_value(&gw.metrics(), "ringgate_requests_total", &labels),
        Some(1.0)
    );
}

#[test]
fn a_message_call_slower_than_its_timeout_says_so() {
    let be = api_backend();
    let cfg = api_config(be.addr, "").replace("timeout_ms = 3000", "timeout_ms = 300")
        + "[[apis.routes]]\nroute = \"slower\"\nintegration = { type = \"http\", upstream = \"be\", path = \"/slower\" }\n";
    let gw = Gateway::start(&cfg);
    let mut ws = open(gw.addr, "/");
    ws.text(r#"{"action":"slower"}"#);
    let m = ws.recv_text();
    assert!(
        m.starts_with(r#"{"message":"Endpoint request timed out","connectionId":""#),
        "{m}"
    );
    // The connection goes on.
    ws.text(r#"{"action":"echo","v":1}"#);
    assert_eq!(ws.recv_text(), r#"{"action":"echo","v":1}"#);
}

/// Every integration call says which event it is and the stage, as API Gateway's
/// `requestContext.eventType` and `stage`; a client cannot set either.
#[test]
fn integration_calls_carry_event_type_and_stage() {
    let be = api_backend();
    let gw = Gateway::start(&api_config(be.addr, ""));
    let (head, mut ws) = ws_connect(
        gw.addr,
        "/",
        "X-Event-Type: MESSAGE\r\nX-Stage: prod\r\nx-route-key: echo\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    ws.text(r#"{"action":"echo"}"#);
    assert_eq!(ws.recv_text(), r#"{"action":"echo"}"#);
    drop(ws);
    assert!(wait_until(Duration::from_secs(3), || route_keys(
        &be,
        "$disconnect"
    )
    .len()
        == 1));
    for (key, event) in [
        ("$connect", "CONNECT"),
        ("echo", "MESSAGE"),
        ("$disconnect", "DISCONNECT"),
    ] {
        let r = &route_keys(&be, key)[0];
        assert_eq!(r.headers_named("x-event-type"), [event], "{key}");
        assert_eq!(r.headers_named("x-stage"), ["$default"], "{key}");
        assert_eq!(r.headers_named("x-route-key"), [key], "{key}");
    }
}

#[test]
fn fragmented_message_with_interleaved_control_frames() {
    let be = api_backend();
    let gw = Gateway::start(&api_config(be.addr, ""));
    let mut ws = open(gw.addr, "/");
    ws.send(false, op::TEXT, br#"{"action":"#);
    ws.send(true, op::PING, b"ping-1");
    ws.send(false, op::CONT, br#""echo","s":"#);
    ws.send(true, op::PONG, b"unsolicited");
    ws.send(true, op::CONT, "\"κόσμε\"}".as_bytes());
    let (_, opc, p) = ws.read_frame().unwrap();
    assert_eq!((opc, p.as_slice()), (op::PONG, &b"ping-1"[..]));
    assert_eq!(ws.recv_text(), r#"{"action":"echo","s":"κόσμε"}"#);
}

#[test]
fn invalid_utf8_closes_with_1007() {
    let be = api_backend();
    let gw = Gateway::start(&api_config(be.addr, ""));
    let mut ws = open(gw.addr, "/");
    ws.send(false, op::TEXT, b"\xce");
    ws.send(true, op::CONT, b"\x41");
    assert_eq!(ws.expect_close(), 1007);
    assert!(ws.eof());
    assert!(wait_until(Duration::from_secs(3), || route_keys(
        &be,
        "$disconnect"
    )
    .len()
        == 1));
}

#[test]
fn oversize_closes_with_1009() {
    let be = api_backend();
    let cfg = api_config(
        be.addr,
        "websocket = { max_frame_bytes = 100, max_message_bytes = 150 }",
    );
    let gw = Gateway::start(&cfg);
    // One frame over the frame limit: refused from its header alone.
    let mut ws = open(gw.addr, "/");
    let f = Ws::frame(true, op::TEXT, &[b'a'; 101], true);
    ws.send_raw(&f[..8]);
    assert_eq!(ws.expect_close(), 1009);
    // Frames within the limit, message over it.
    let mut ws = open(gw.addr, "/");
    ws.send(false, op::TEXT, &[b'a'; 100]);
    ws.send(true, op::CONT, &[b'a'; 51]);
    assert_eq!(ws.expect_close(), 1009);
    // At the limits: fine. The answer (`default:` and the 150 bytes) is over the limit,
    // which holds both ways: it is not sent, and the client hears why.
    let mut ws = open(gw.addr, "/");
    ws.send(false, op::TEXT, &[b'a'; 100]);
    ws.send(true, op::CONT, &[b'a'; 50]);
    assert!(ws
        .recv_text()
        .contains("Integration response larger than the message limit"));
    let d = route_keys(&be, "$default");
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].body, vec![b'a'; 150]);
}

#[test]
fn default_limits_are_32k_frames_128k_messages() {
    let be = api_backend();
    let gw = Gateway::start(&api_config(be.addr, ""));
    let mut ws = open(gw.addr, "/");
    let f = Ws::frame(true, op::BINARY, &vec![0u8; 32 * 1024 + 1], true);
    ws.send_raw(&f[..14]);
    assert_eq!(ws.expect_close(), 1009);
    let mut ws = open(gw.addr, "/");
    ws.send(false, op::CONT, &[]);
    assert_eq!(ws.expect_close(), 1002, "continuation without a message");
    let mut ws = open(gw.addr, "/");
    ws.send(false, op::BINARY, &vec![1u8; 32 * 1024]);
    for _ in 0..3 {
        ws.send(false, op::CONT, &vec![1u8; 32 * 1024]);
    }
    ws.send(true, op::CONT, &[1u8]);
    assert_eq!(ws.expect_close(), 1009);
}

#[test]
fn unmasked_client_frame_closes_with_1002() {
    let be = api_backend();
    let gw = Gateway::start(&api_config(be.addr, ""));
    let mut ws = open(gw.addr, "/");
    ws.send_raw(&Ws::frame(true, op::TEXT, b"hello", false));
    assert_eq!(ws.expect_close(), 1002);
    assert!(ws.eof());
    // Reserved bits and opcodes.
    let mut ws = open(gw.addr, "/");
    let mut f = Ws::frame(true, op::TEXT, b"x", true);
    f[0] |= 0x40;
    ws.send_raw(&f);
    assert_eq!(ws.expect_close(), 1002);
    let mut ws = open(gw.addr, "/");
    ws.send(true, 0x3, b"x");
    assert_eq!(ws.expect_close(), 1002);
}

#[test]
fn close_handshake_echoes_codes() {
    let be = api_backend();
    let gw = Gateway::start(&api_config(be.addr, ""));
    for code in [1000u16, 1001, 3000, 4999] {
        let mut ws = open(gw.addr, "/");
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(b"bye");
        ws.send(true, op::CLOSE, &p);
        assert_eq!(ws.expect_close(), code);
        assert!(ws.eof());
    }
    // An empty close is answered with 1000; an invalid code with 1002.
    let mut ws = open(gw.addr, "/");
    ws.send(true, op::CLOSE, b"");
    assert_eq!(ws.expect_close(), 1000);
    for bad in [1005u16, 1006, 999, 2000] {
        let mut ws = open(gw.addr, "/");
        ws.send(true, op::CLOSE, &bad.to_be_bytes());
        assert_eq!(ws.expect_close(), 1002, "{bad}");
    }
    // Ping answered with the same payload.
    let mut ws = open(gw.addr, "/");
    ws.send(true, op::PING, b"abc");
    let (_, opc, p) = ws.read_frame().unwrap();
    assert_eq!((opc, p), (op::PONG, b"abc".to_vec()));
}

// ---------------------------------------------------------------------------------------------
// Handshake, $connect, $disconnect, @connections, timeouts, metrics
// ---------------------------------------------------------------------------------------------

#[test]
fn handshake_refusals() {
    let be = api_backend();
    let gw = Gateway::start(&api_config(
        be.addr,
        r#"websocket = { allowed_origins = ["https://app.example.com"] }"#,
    ));
    // Not an upgrade.
    let r = gw.get("/");
    assert_eq!(r.status, 426, "{}", r.text());
    // Wrong version, bad key.
    let raw = |extra: &str| {
        gw.request(&format!(
            "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{extra}\r\n"
        ))
    };
    let r = raw(&format!(
        "Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 8\r\n"
    ));
    assert_eq!(r.status, 426);
    assert_eq!(r.header("sec-websocket-version"), Some("13"));
    assert!(r.message().contains("13"), "{}", r.message());
    let r = raw("Sec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n");
    assert_eq!(r.status, 400);
    assert!(r.message().contains("Sec-WebSocket-Key"), "{}", r.message());
    // Origins.
    let (head, _) = ws_connect(gw.addr, "/", "Origin: https://evil.example.com\r\n");
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    let (head, _) = ws_connect(gw.addr, "/", "Origin: https://app.example.com\r\n");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // $connect refusing: its status and body.
    let (head, _) = ws_connect(gw.addr, "/?deny=1", "");
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    // Only the accepted one (dropped above) gets a $disconnect, none of the refused ones.
    assert!(wait_until(Duration::from_secs(3), || route_keys(
        &be,
        "$disconnect"
    )
    .len()
        == 1));
    thread::sleep(Duration::from_millis(200));
    assert_eq!(route_keys(&be, "$disconnect").len(), 1);
    assert_eq!(route_keys(&be, "$connect").len(), 2);
}

/// Sends the 1 s `nap` message and waits until the backend has its call.
fn start_nap(be: &Origin, ws: &mut Ws) {
    ws.text(r#"{"action":"nap","n":1}"#);
    assert!(wait_until(Duration::from_secs(3), || route_keys(be, "nap")
        .len()
        == 1));
}

/// Opens a WebSocket API connection; returns its `x-connection-id` with the client.
fn open_with_id(addr: SocketAddr) -> (String, Ws) {
    let (head, ws) = ws_connect(addr, "/", "");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let id = head
        .lines()
        .find_map(|l| l.strip_prefix("x-connection-id: "))
        .unwrap_or_else(|| panic!("no connection id: {head}"))
        .trim()
        .to_string();
    (id, ws)
}

/// The `$disconnect` call of connection `id`, once it came.
fn disconnect_of(be: &Origin, id: &str) -> Request {
    let mut found = None;
    assert!(
        wait_until(Duration::from_secs(5), || {
            found = route_keys(be, "$disconnect")
                .into_iter()
                .find(|r| r.header("x-connection-id") == Some(id));
            found.is_some()
        }),
        "no $disconnect for {id}"
    );
    found.unwrap()
}

#[test]
fn disconnect_called_once_on_every_kind_of_close() {
    let be = api_backend();
    let gw = Gateway::start(&api_config(
        be.addr,
        "websocket = { idle_timeout_ms = 700 }",
    ));
    // 1: client close handshake.
    let (id1, mut ws) = open_with_id(gw.addr);
    ws.send(true, op::CLOSE, &1000u16.to_be_bytes());
    assert_eq!(ws.expect_close(), 1000);
    // 2: dropped TCP connection.
    let (id2, ws2) = open_with_id(gw.addr);
    drop(ws2);
    // 3: protocol error.
    let (id3, mut ws3) = open_with_id(gw.addr);
    ws3.send_raw(&Ws::frame(true, op::TEXT, b"x", false));
    assert_eq!(ws3.expect_close(), 1002);
    // 4: idle timeout, with a 1001 close.
    let (id4, mut ws4) = open_with_id(gw.addr);
    let t = Instant::now();
    assert_eq!(ws4.expect_close(), 1001);
    assert!(
        t.elapsed() >= Duration::from_millis(600),
        "{:?}",
        t.elapsed()
    );
    // 5: a client close with no code, and one with an application code and a UTF-8 reason.
    let (id5, mut ws5) = open_with_id(gw.addr);
    ws5.send(true, op::CLOSE, b"");
    assert_eq!(ws5.expect_close(), 1000);
    let (id6, mut ws6) = open_with_id(gw.addr);
    let mut close = 4001u16.to_be_bytes().to_vec();
    close.extend_from_slice("bye 100% \u{e9}".as_bytes());
    ws6.send(true, op::CLOSE, &close);
    assert_eq!(ws6.expect_close(), 4001);
    // Each `$disconnect` says how its connection ended, as API Gateway's
    // `disconnectStatusCode` and `disconnectReason`.
    for (id, code, reason) in [
        (&id1, "1000", ""),
        (&id2, "1006", "connection lost"),
        (&id3, "1002", "protocol error"),
        (&id4, "1001", "idle timeout"),
        (&id5, "1005", ""),
        (&id6, "4001", "bye 100%25 %C3%A9"),
    ] {
        let d = disconnect_of(&be, id);
        assert_eq!(d.headers_named("x-disconnect-status-code"), [code], "{id}");
        assert_eq!(d.headers_named("x-disconnect-reason"), [reason], "{id}");
    }
    thread::sleep(Duration::from_millis(300));
    let d = route_keys(&be, "$disconnect");
    assert_eq!(d.len(), 6);
    let mut ids: Vec<_> = d
        .iter()
        .map(|r| r.header("x-connection-id").unwrap().to_string())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 6, "each connection once");
}

#[test]
fn messages_and_disconnects_are_counted_and_logged() {
    let be = api_backend();
    let cfg = format!(
        "[access_log]\npath = \"@DIR@/access.log\"\n{}",
        api_config(be.addr, "")
    );
    let gw = Gateway::start(&cfg);
    let (id, mut ws) = open_with_id(gw.addr);
    ws.text(r#"{"action":"echo","n":1}"#);
    assert_eq!(ws.recv_text(), r#"{"action":"echo","n":1}"#);
    ws.text("plain words");
    assert_eq!(ws.recv_text(), "default:plain words");
    let mut close = 4000u16.to_be_bytes().to_vec();
    close.extend_from_slice(b"done");
    ws.send(true, op::CLOSE, &close);
    assert_eq!(ws.expect_close(), 4000);
    let disc = disconnect_of(&be, &id);
    // A text message that is JSON goes as JSON, any other text as text.
    let echo = &route_keys(&be, "echo")[0];
    assert_eq!(echo.headers_named("content-type"), ["application/json"]);
    let dflt = &route_keys(&be, "$default")[0];
    assert_eq!(
        dflt.headers_named("content-type"),
        ["text/plain; charset=utf-8"]
    );

    // Metrics: each event under its route key, with the event as the method.
    let m = gw.metrics();
    for (route, method) in [
        ("echo", "MESSAGE"),
        ("$default", "MESSAGE"),
        ("$disconnect", "DISCONNECT"),
    ] {
        let route = format!("route=\"{route}\"");
        let method = format!("method=\"{method}\"");
        let labels = [route.as_str(), method.as_str(), "api=\"chat\""];
        let mut with_status = labels.to_vec();
        with_status.push("status=\"200\"");
        assert_eq!(
            metric_value(&m, "ringgate_requests_total", &with_status),
            Some(1.0),
            "{route} {method}\n{m}"
        );
        assert_eq!(
            metric_value(&m, "ringgate_request_duration_seconds_count", &labels),
            Some(1.0),
            "{route} {method}\n{m}"
        );
    }

    // The access log: the handshake's line, then one per message and the disconnect.
    let path = gw.dir.join("access.log");
    let lines = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    };
    assert!(wait_until(Duration::from_secs(3), || lines().len() >= 4));
    let l = lines();
    assert_eq!(l.len(), 4, "{l:?}");
    assert_eq!(l[0]["method"], "GET");
    assert_eq!(l[0]["status"], 101);
    assert_eq!(l[0]["route"], "$connect");
    // The handshake's line names the connection, as the later lines do.
    assert_eq!(l[0]["event"], "CONNECT", "{}", l[0]);
    assert_eq!(l[0]["connection_id"], id.as_str(), "{}", l[0]);
    let rid = |r: &Request| r.header("x-request-id").unwrap().to_string();
    for (line, route, method, request_id) in [
        (&l[1], "echo", "MESSAGE", rid(echo)),
        (&l[2], "$default", "MESSAGE", rid(dflt)),
        (&l[3], "$disconnect", "DISCONNECT", rid(&disc)),
    ] {
        assert_eq!(line["route"], route, "{line}");
        assert_eq!(line["method"], method, "{line}");
        assert_eq!(line["event"], method, "{line}");
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["api"], "chat", "{line}");
        assert_eq!(line["stage"], "$default", "{line}");
        assert_eq!(line["path"], "/", "{line}");
        assert_eq!(line["remote"], "127.0.0.1", "{line}");
        assert_eq!(line["connection_id"], id.as_str(), "{line}");
        assert_eq!(line["request_id"], request_id.as_str(), "{line}");
        assert!(line["duration_ms"].is_number(), "{line}");
    }
    assert_eq!(l[3]["close_code"], 4000);
    assert_eq!(l[3]["close_reason"], "done");
    assert!(l[1].get("close_code").is_none());
}

#[test]
fn connections_posts_keep_the_message_limit() {
    let be = api_backend();
    let gw = Gateway::start(&api_config(
        be.addr,
        "websocket = { max_message_bytes = 1000, max_frame_bytes = 1000 }",
    ));
    let mut ws = open(gw.addr, "/");
    let id = route_keys(&be, "$connect")[0]
        .header("x-connection-id")
        .unwrap()
        .to_string();
    let path = format!("/@connections/{id}");
    let r = admin(&gw, "POST", &path, &"a".repeat(1001));
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(r.text().contains("at most 1000 bytes"), "{}", r.text());
    let r = admin(&gw, "POST", &path, &"b".repeat(1000));
    assert_eq!(r.status, 200, "{}", r.text());
    // Only the message within the limit reached the client.
    assert_eq!(ws.recv_text(), "b".repeat(1000));
}

/// A client that stops reading with megabytes queued toward it still meets its idle timeout:
/// the frames stuck behind a full socket get a short grace, not 30 s per write, and
/// `$disconnect` follows on time.
#[test]
fn idle_timeout_holds_for_a_client_that_stopped_reading() {
    let be = api_backend();
    let gw = Gateway::start(&api_config(
        be.addr,
        "websocket = { idle_timeout_ms = 1000 }",
    ));
    let ws = open(gw.addr, "/");
    let id = route_keys(&be, "$connect")[0]
        .header("x-connection-id")
        .unwrap()
        .to_string();
    let pad = "p".repeat(64 * 1024);
    let mut full = false;
    for _ in 0..200 {
        let r = admin(&gw, "POST", &format!("/@connections/{id}"), &pad);
        if r.status == 429 {
            full = true;
            break;
        }
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert!(full, "the queue never filled");
    let t = Instant::now();
    assert!(
        wait_until(Duration::from_secs(15), || route_keys(&be, "$disconnect")
            .len()
            == 1),
        "no $disconnect"
    );
    // Idle 1 s after the last frame went out, then at most the 2 s grace (30 s before).
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    drop(ws);
}

#[test]
fn max_duration_closes() {
    let be = api_backend();
    let gw = Gateway::start(&api_config(
        be.addr,
        "websocket = { max_duration_ms = 1500 }",
    ));
    let mut ws = open(gw.addr, "/");
    let t = Instant::now();
    // Activity does not extend the maximum duration.
    for _ in 0..2 {
        ws.text(r#"{"action":"echo"}"#);
        assert_eq!(ws.recv_text(), r#"{"action":"echo"}"#);
        thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(ws.expect_close(), 1001);
    let el = t.elapsed();
    assert!(
        el >= Duration::from_millis(1200) && el < Duration::from_secs(4),
        "{el:?}"
    );
}

#[test]
fn connections_management_api() {
    let be = api_backend();
    let gw = Gateway::start(&api_config(be.addr, ""));
    // Several connections, so they land on both workers.
    let mut conns: Vec<Ws> = (0..4).map(|_| open(gw.addr, "/")).collect();
    assert!(wait_until(Duration::from_secs(3), || route_keys(
        &be, "$connect"
    )
    .len()
        == 4));
    let ids: Vec<String> = route_keys(&be, "$connect")
        .iter()
        .map(|r| r.header("x-connection-id").unwrap().to_string())
        .collect();
    // Which client is which: ask each to echo and compare the id the backend saw.
    let mut by_id = Vec::new();
    for (i, ws) in conns.iter_mut().enumerate() {
        ws.text(&format!(r#"{{"action":"echo","i":{i}}}"#));
        assert_eq!(ws.recv_text(), format!(r#"{{"action":"echo","i":{i}}}"#));
    }
    for r in route_keys(&be, "echo") {
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        let i = v["i"].as_u64().unwrap() as usize;
        by_id.push((i, r.header("x-connection-id").unwrap().to_string()));
    }
    by_id.sort();
    assert_eq!(by_id.len(), 4);
    for (i, id) in &by_id {
        assert!(ids.contains(id));
        // POST: in order.
        for k in 0..20 {
            let r = admin(
                &gw,
                "POST",
                &format!("/@connections/{id}"),
                &format!("m{k}"),
            );
            assert_eq!(r.status, 200);
        }
        for k in 0..20 {
            assert_eq!(conns[*i].recv_text(), format!("m{k}"));
        }
        // GET.
        let r = admin(&gw, "GET", &format!("/@connections/{id}"), "");
        assert_eq!(r.status, 200);
        let v = r.json();
        assert_eq!(v["sourceIp"], "127.0.0.1");
        assert!(v["connectedAt"].as_str().unwrap().ends_with('Z'), "{v}");
        assert!(v["lastActiveAt"].as_str().is_some(), "{v}");
    }
    // DELETE closes; afterwards the id is gone.
    let (i, id) = &by_id[0];
    let r = admin(&gw, "DELETE", &format!("/@connections/{id}"), "");
    assert_eq!(r.status, 204);
    assert_eq!(conns[*i].expect_close(), 1000);
    assert!(wait_until(Duration::from_secs(3), || {
        admin(&gw, "GET", &format!("/@connections/{id}"), "").status == 410
    }));
    assert_eq!(
        admin(&gw, "POST", &format!("/@connections/{id}"), "x").status,
        410
    );
    assert_eq!(
        admin(&gw, "DELETE", "/@connections/0123456789abcdef", "").status,
        410
    );
    assert_eq!(admin(&gw, "GET", "/@connections/nope", "").status, 410);
    // A method the path never takes is 405 with `Allow`, for a known id or not.
    for id in [id.as_str(), "0123456789abcdef", "nope"] {
        let r = admin(&gw, "PUT", &format!("/@connections/{id}"), "x");
        assert_eq!(r.status, 405, "{id}: {}", r.text());
        assert_eq!(r.header("allow"), Some("DELETE, GET, HEAD, POST"));
    }
    assert!(wait_until(Duration::from_secs(3), || route_keys(
        &be,
        "$disconnect"
    )
    .len()
        == 1));
}

#[test]
fn posts_to_a_client_that_does_not_read_are_refused_never_dropped() {
    // The client reads nothing while far more than its queue (8 MiB) is posted: every POST is
    // either refused (429) or delivered, in order, once the client reads; none is answered
    // 200 and then lost, and the connection stays open.
    let be = api_backend();
    let gw = Gateway::start(&api_config(be.addr, ""));
    let (id, mut ws) = open_with_id(gw.addr);
    let pad = "p".repeat(64 * 1024);
    let mut accepted = Vec::new();
    let mut refused = 0;
    for k in 0..400 {
        let r = admin(
            &gw,
            "POST",
            &format!("/@connections/{id}"),
            &format!("{k:06}{pad}"),
        );
        match r.status {
            200 => accepted.push(k),
            429 => {
                refused += 1;
                assert!(r.text().contains("not reading"), "{}", r.text());
                assert_eq!(r.header("retry-after"), Some("1"));
            }
            s => panic!("POST {k}: {s} {}", r.text()),
        }
    }
    assert!(
        refused > 0,
        "26 MB were all accepted for a client that reads nothing"
    );
    assert!(accepted.len() >= 100, "{} accepted", accepted.len());
    for k in &accepted {
        let m = ws.recv_text();
        assert_eq!(&m[..6], format!("{k:06}"), "message lost or out of order");
    }
    // Still open, and taking posts again now that it reads.
    let r = admin(&gw, "POST", &format!("/@connections/{id}"), "again");
    assert_eq!(r.status, 200);
    assert_eq!(ws.recv_text(), "again");
}

#[test]
fn a_post_right_after_the_101_reaches_the_client() {
    // The connection is known to `@connections` before its 101 goes out: a post sent as soon
    // as the client sees the 101 is delivered, never answered 410.
    let be = api_backend();
    let gw = Gateway::start(&api_config(be.addr, ""));
    for n in 0..200 {
        let (head, mut ws) = ws_connect(gw.addr, "/", "");
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let id = head
            .lines()
            .find_map(|l| l.strip_prefix("x-connection-id: "))
            .expect("x-connection-id")
            .trim()
            .to_string();
        let r = admin(
            &gw,
            "POST",
            &format!("/@connections/{id}"),
            &format!("hi {n}"),
        );
        assert_eq!(r.status, 200, "connection {n}: {}", r.text());
        assert_eq!(ws.recv_text(), format!("hi {n}"));
    }
}

#[test]
fn messages_reach_the_integration_in_order() {
    let be = api_backend();
    let gw = Gateway::start(&api_config(be.addr, ""));
    let mut ws = open(gw.addr, "/");
    // A slow route first: later messages must not overtake it.
    ws.text(r#"{"action":"slow","n":0}"#);
    for n in 1..50 {
        ws.text(&format!(r#"{{"action":"echo","n":{n}}}"#));
    }
    assert_eq!(ws.recv_text(), r#"{"action":"slow","n":0}"#);
    for n in 1..50 {
        assert_eq!(ws.recv_text(), format!(r#"{{"action":"echo","n":{n}}}"#));
    }
    let seen: Vec<String> = be
        .requests()
        .iter()
        .filter(|r| matches!(r.header("x-route-key"), Some("echo") | Some("slow")))
        .map(|r| String::from_utf8_lossy(&r.body).to_string())
        .collect();
    assert_eq!(seen.len(), 50);
    assert!(seen[0].contains("slow"));
}

#[test]
fn websocket_gauge_counts_open_connections() {
    let be = api_backend();
    let gw = Gateway::start(&api_config(be.addr, ""));
    let gauge = |gw: &Gateway| -> i64 {
        let m = gw.metrics();
        m.lines()
            .find(|l| l.starts_with("ringgate_websocket_connections_active "))
            .and_then(|l| l.split(' ').nth(1))
            .map(|v| v.parse().unwrap())
            .unwrap()
    };
    assert_eq!(gauge(&gw), 0);
    let a = open(gw.addr, "/");
    let b = open(gw.addr, "/");
    assert!(wait_until(Duration::from_secs(3), || gauge(&gw) == 2));
    drop(a);
    drop(b);
    assert!(wait_until(Duration::from_secs(3), || gauge(&gw) == 0));
}

#[test]
fn a_message_no_route_takes_is_counted_and_logged_without_a_route() {
    let gw = Gateway::start(
        r#"
[access_log]
path = "@DIR@/access.log"
[[apis]]
name = "chat"
protocol = "websocket"
[[apis.routes]]
route = "echo"
integration = { type = "mock", body = "hi" }
"#,
    );
    let (id, mut ws) = open_with_id(gw.addr);
    ws.text(r#"{"action":"nothing"}"#);
    // API Gateway's shape: the message, the connection, and the request id of the event
    // (the one its access-log line carries).
    let m: serde_json::Value = serde_json::from_str(&ws.recv_text()).unwrap();
    assert_eq!(m["message"], "Forbidden");
    assert_eq!(m["connectionId"], id.as_str());
    assert!(
        m["requestId"]
            .as_str()
            .is_some_and(|r| r.starts_with(&format!("{id}-"))),
        "{m}"
    );
    ws.text(r#"{"action":"echo"}"#);
    assert_eq!(ws.recv_text(), "hi");
    let m = gw.metrics();
    let unrouted = [
        "api=\"chat\"",
        "route=\"\"",
        "method=\"MESSAGE\"",
        "status=\"403\"",
    ];
    assert_eq!(
        metric_value(&m, "ringgate_requests_total", &unrouted),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            "ringgate_request_duration_seconds_count",
            &unrouted[..3]
        ),
        Some(1.0),
        "{m}"
    );
    // Logged without a route: there is no `$default` for it to be logged under.
    let path = gw.dir.join("access.log");
    let lines = || std::fs::read_to_string(&path).unwrap_or_default();
    assert!(wait_until(Duration::from_secs(3), || lines()
        .lines()
        .count()
        >= 3));
    let l: Vec<serde_json::Value> = lines()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(l[1]["status"], 403, "{l:?}");
    assert_eq!(l[1]["route"], "", "{l:?}");
    assert_eq!(l[1]["event"], "MESSAGE", "{l:?}");
    assert_eq!(l[2]["route"], "echo", "{l:?}");
}

#[test]
fn websocket_config_errors_name_the_key() {
    // Keys that mean nothing on a WebSocket API are refused, never accepted and ignored:
    // `cors` (the handshake's Origin is checked by `allowed_origins`) and a stage cache.
    for (extra, key) in [
        (
            r#"cors = { allow_origins = ["https://app.example.com"] }"#,
            "apis[0].cors",
        ),
        (
            "[apis.stages.prod]\ncache = { ttl_s = 60 }",
            "apis[0].stages.prod.cache",
        ),
        // A limit out of range names its own key.
        (
            "websocket = { max_message_bytes = 0 }",
            "apis[0].websocket.max_message_bytes",
        ),
        (
            "websocket = { max_frame_bytes = 2147483648 }",
            "apis[0].websocket.max_frame_bytes",
        ),
        (
            "websocket = { idle_timeout_ms = 0 }",
            "apis[0].websocket.idle_timeout_ms",
        ),
    ] {
        let (out, _) = check(&format!(
            r#"
[[apis]]
name = "chat"
protocol = "websocket"
{extra}
[[apis.routes]]
route = "$default"
integration = {{ type = "mock" }}
"#
        ));
        let e = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "{extra}");
        assert!(e.contains(key) && e.contains("check.toml:"), "{e}");
    }
    let (out, _) = check(
        r#"
[[apis]]
name = "chat"
protocol = "websocket"
route_selection = "$request.header.x"
[[apis.routes]]
route = "$default"
integration = { type = "mock" }
"#,
    );
    let e =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        e.contains("route_selection") && e.contains("check.toml:"),
        "{e}"
    );
    let (out, _) = check(
        r#"
[[apis]]
name = "chat"
protocol = "websocket"
[[apis.routes]]
route = "$bogus"
integration = { type = "mock" }
"#,
    );
    let e = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success() && e.contains("routes[0].route"),
        "{e}"
    );
    let (out, _) = check(
        r#"
[[apis]]
name = "h"
websocket = { max_frame_bytes = 0 }
[[apis.routes]]
route = "GET /x"
integration = { type = "mock" }
"#,
    );
    let e = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success() && e.contains("websocket"), "{e}");
}

/// A frame is part of one message: a frame limit above the message limit is refused at load,
/// naming the file, the line and the key. A message limit alone lowers the default frame limit.
#[test]
fn frame_limit_above_message_limit_is_refused() {
    // The harness puts HEADER and an empty line before the config; the config starts with
    // an empty line too, then `[[apis]]`, `name`, `protocol` and the websocket keys.
    let head = HEADER.lines().count();
    for (table, line) in [
        (
            "[apis.websocket]\nmax_message_bytes = 1000\nmax_frame_bytes = 2000\n",
            head + 8,
        ),
        (
            "websocket = { max_frame_bytes = 4096, max_message_bytes = 4095 }\n",
            head + 6,
        ),
    ] {
        for protocol in ["http", "websocket"] {
            let (out, path) = check(&format!(
                "\n[[apis]]\nname = \"h\"\nprotocol = \"{protocol}\"\n{table}\
                 [[apis.routes]]\nroute = \"$default\"\nintegration = {{ type = \"mock\" }}\n"
            ));
            let e = String::from_utf8_lossy(&out.stderr).to_string();
            let want = format!(
                "{}:{line}: key `apis[0].websocket.max_frame_bytes`: ",
                path.display()
            );
            assert!(!out.status.success(), "{protocol} {table}: {e}");
            assert!(
                e.contains(&want) && e.contains("larger than max_message_bytes"),
                "{protocol} {table}: want {want}, got {e}"
            );
        }
    }
    // A frame limit alone above the default message limit of a WebSocket API (128 KiB).
    let (out, _) = check(
        "\n[[apis]]\nname = \"h\"\nprotocol = \"websocket\"\nwebsocket = { max_frame_bytes = 200000 }\n\
         [[apis.routes]]\nroute = \"$default\"\nintegration = { type = \"mock\" }\n",
    );
    let e = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success()
            && e.contains(&format!(
                ":{}: key `apis[0].websocket.max_frame_bytes`: 200000 is larger than max_message_bytes (131072, the default)",
                head + 6
            )),
        "{e}"
    );
    // Equal limits, and a message limit below the default frame limit: both accepted.
    for table in [
        "websocket = { max_frame_bytes = 4096, max_message_bytes = 4096 }\n",
        "websocket = { max_message_bytes = 100 }\n",
    ] {
        for protocol in ["http", "websocket"] {
            let (out, _) = check(&format!(
                "\n[[apis]]\nname = \"h\"\nprotocol = \"{protocol}\"\n{table}\
                 [[apis.routes]]\nroute = \"$default\"\nintegration = {{ type = \"mock\" }}\n"
            ));
            assert!(
                out.status.success(),
                "{protocol} {table}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pass-through on an http API
// ---------------------------------------------------------------------------------------------

/// A WebSocket echo backend built from the codec under test's encoder only (frames are
/// unmasked by hand); records each upgrade request head.
struct EchoBackend {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    closes: Arc<Mutex<Vec<u16>>>,
}

fn echo_backend(drop_after: Option<usize>) -> EchoBackend {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let closes = Arc::new(Mutex::new(Vec::new()));
    let (h2, c2) = (heads.clone(), closes.clone());
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let (heads, closes) = (h2.clone(), c2.clone());
            thread::spawn(move || {
                let mut buf = Vec::new();
                let Some(head) = read_upgrade(&mut s, &mut buf) else {
                    return;
                };
                // Recorded before the answer: the client checks it once it has its 101.
                heads.lock().unwrap().push(head.clone());
                answer_upgrade(&mut s, &head, "X-Backend: echo\r\n");
                let mut tmp = [0u8; 65536];
                let mut echoed = 0;
                loop {
                    while let Ok(Some(h)) = frame::parse_header(&buf) {
                        let total = h.header_len + h.len as usize;
                        if buf.len() < total {
                            break;
                        }
                        let mut p = buf[h.header_len..total].to_vec();
                        if let Some(k) = h.mask {
                            frame::unmask_bytewise(&mut p, k);
                        }
                        buf.drain(..total);
                        let mut out = Vec::new();
                        if h.opcode == op::CLOSE {
                            let code = if p.len() >= 2 {
                                u16::from_be_bytes([p[0], p[1]])
                            } else {
                                1005
                            };
                            closes.lock().unwrap().push(code);
                            frame::encode(&mut out, op::CLOSE, true, &p);
                            let _ = s.write_all(&out);
                            return;
                        }
                        let opc = if h.opcode == op::PING {
                            op::PONG
                        } else {
                            h.opcode
                        };
                        frame::encode(&mut out, opc, h.fin, &p);
                        let _ = s.write_all(&out);
                        echoed += 1;
                        if Some(echoed) == drop_after {
                            return;
                        }
                    }
                    let n = s.read(&mut tmp).unwrap_or(0);
                    if n == 0 {
                        closes.lock().unwrap().push(0);
                        return;
                    }
                    buf.extend_from_slice(&tmp[..n]);
                }
            });
        }
    });
    EchoBackend {
        addr,
        heads,
        closes,
    }
}

/// A pass-through backend that answers the upgrade with its 101 and `after` in one write, then
/// holds the connection open for 3 s without reading.
fn push_backend(after: Vec<u8>) -> SocketAddr {
    push_backend_with("", after)
}

/// [`push_backend`] with `extra` header lines in its 101.
fn push_backend_with(extra: &'static str, after: Vec<u8>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let after = after.clone();
            thread::spawn(move || {
                let mut buf = Vec::new();
                let Some(head) = read_upgrade(&mut s, &mut buf) else {
                    return;
                };
                let mut out = Vec::new();
                answer_upgrade(&mut out, &head, extra);
                out.extend_from_slice(&after);
                let _ = s.write_all(&out);
                thread::sleep(Duration::from_secs(3));
            });
        }
    });
    addr
}

#[test]
fn passthrough_relays_frames_that_came_with_the_101() {
    // A first message larger than the gateway's first upstream read, in the 101's write.
    let big = vec![b'w'; 10_000];
    let mut after = Vec::new();
    frame::encode(&mut after, op::TEXT, true, &big);
    frame::encode(&mut after, op::TEXT, true, b"second");
    let gw = Gateway::start(&passthrough_config(push_backend(after), ""));
    let (head, mut ws) = ws_connect(gw.addr, "/live/r", "");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // The backend's 101 has no Date: the gateway adds one (RFC 9110 6.6.1).
    assert_eq!(
        head.to_ascii_lowercase().matches("\r\ndate: ").count(),
        1,
        "{head}"
    );
    assert_eq!(ws.read_frame(), Some((true, op::TEXT, big)));
    assert_eq!(ws.recv_text(), "second");
}

/// The upstream's frames meet the same rules as the client's, but the mask: the size limits
/// (1009) and RFC 6455 5.1's "a server MUST NOT mask" (1002); the upstream is told too.
#[test]
fn passthrough_checks_the_upstreams_frames() {
    let mut big = Vec::new();
    frame::encode(&mut big, op::BINARY, true, &[b'u'; 5000]);
    let mut masked = Ws::frame(true, op::TEXT, b"masked", true);
    let mut small = Vec::new();
    frame::encode(&mut small, op::TEXT, true, b"fine");
    for (after, code) in [(big, 1009), (std::mem::take(&mut masked), 1002)] {
        let mut all = small.clone();
        all.extend_from_slice(&after);
        let gw = Gateway::start(&passthrough_config(
            push_backend(all),
            "websocket = { max_frame_bytes = 1024 }",
        ));
        let (head, mut ws) = ws_connect(gw.addr, "/live/r", "");
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert_eq!(ws.recv_text(), "fine");
        assert_eq!(ws.expect_close(), code);
    }
}

/// A frame header that arrives in pieces is relayed whole, and when the frame it starts breaks
/// a rule, none of it goes on: the gateway's close lands at a frame boundary, both ways.
#[test]
fn passthrough_holds_back_a_split_header_so_its_close_lands_between_frames() {
    let got_up = Arc::new(Mutex::new(None::<Vec<u8>>));
    let rec = got_up.clone();
    let nap = || thread::sleep(Duration::from_millis(150));
    let be = raw_origin(move |mut s| {
        s.set_nodelay(true).unwrap();
        let mut buf = Vec::new();
        let Some(head) = read_upgrade(&mut s, &mut buf) else {
            return;
        };
        answer_upgrade(&mut s, &head, "");
        if head.contains("/live/down") {
            // A valid frame, then one over the frame limit, each header in two writes.
            for part in [&b"\x81"[..], b"\x04fine", b"\x82", b"\x7e\x07\xd0"] {
                nap();
                let _ = s.write_all(part);
            }
            let _ = s.write_all(&[b'x'; 2000]);
            nap();
        } else {
            // Everything the gateway relays, up to its FIN.
            let _ = s.read_to_end(&mut buf);
            *rec.lock().unwrap() = Some(buf);
        }
    });
    let gw = Gateway::start(&passthrough_config(
        be,
        "websocket = { max_frame_bytes = 1024 }",
    ));
    // Upstream to client: "fine", then the 1009 close and nothing else.
    let (head, mut ws) = ws_connect(gw.addr, "/live/down", "");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(ws.recv_text(), "fine");
    let mut rest = std::mem::take(&mut ws.buf);
    let _ = ws.s.read_to_end(&mut rest);
    let h = frame::parse_header(&rest)
        .unwrap_or_else(|c| panic!("{c}: {rest:?}"))
        .unwrap_or_else(|| panic!("{rest:?}"));
    assert_eq!((h.opcode, h.mask), (op::CLOSE, None), "{rest:?}");
    assert_eq!(h.header_len + h.len as usize, rest.len(), "{rest:?}");
    assert_eq!(rest[h.header_len..h.header_len + 2], 1009u16.to_be_bytes());
    // Client to upstream: "hi", then an unmasked frame; the upstream gets "hi" and the
    // gateway's masked 1001 close, nothing of the bad frame.
    let (head, mut ws) = ws_connect(gw.addr, "/live/up", "");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let hi = Ws::frame(true, op::TEXT, b"hi", true);
    for part in [&hi[..1], &hi[1..], b"\x81", b"\x05hello"] {
        nap();
        ws.send_raw(part);
    }
    assert_eq!(ws.expect_close(), 1002);
    assert!(wait_until(Duration::from_secs(5), || got_up
        .lock()
        .unwrap()
        .is_some()));
    let up = got_up.lock().unwrap().take().unwrap();
    assert!(up.starts_with(&hi), "{up:?}");
    let rest = &up[hi.len()..];
    let h = frame::parse_header(rest)
        .unwrap_or_else(|c| panic!("{c}: {up:?}"))
        .unwrap_or_else(|| panic!("{up:?}"));
    assert_eq!(h.opcode, op::CLOSE, "{up:?}");
    assert_eq!(h.header_len + h.len as usize, rest.len(), "{up:?}");
    let mut p = rest[h.header_len..].to_vec();
    frame::unmask_bytewise(&mut p, h.mask.expect("masked toward the upstream"));
    assert_eq!(p[..2], 1001u16.to_be_bytes());
}

/// An upstream whose 101 names an extension that was not offered (the client's offer is
/// removed) fails the handshake with 502: the client would otherwise turn compression on.
#[test]
fn passthrough_refuses_an_extension_the_upstream_was_not_offered() {
    let be = push_backend_with(
        "Sec-WebSocket-Extensions: permessage-deflate\r\n",
        Vec::new(),
    );
    let gw = Gateway::start(&passthrough_config(be, ""));
    let (head, _ws) = ws_connect(
        gw.addr,
        "/live/r",
        "Sec-WebSocket-Extensions: permessage-deflate\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
}

/// An upstream that switches to another protocol, or whose accept key is not the client's,
/// fails the handshake with 502 (RFC 6455 4.1: the client would fail it); nothing is relayed.
#[test]
fn passthrough_refuses_a_101_that_is_no_websocket_handshake() {
    for answer in [
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: bm90IHRoZSBrZXk=\r\n\r\n",
    ] {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let be = l.local_addr().unwrap();
        thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let mut buf = Vec::new();
                if read_upgrade(&mut s, &mut buf).is_some() {
                    let _ = s.write_all(answer.as_bytes());
                    thread::sleep(Duration::from_secs(2));
                }
            }
        });
        let gw = Gateway::start(&passthrough_config(be, ""));
        let (head, _ws) = ws_connect(gw.addr, "/live/r", "");
        assert!(head.starts_with("HTTP/1.1 502"), "{answer}: {head}");
        assert!(gw.stderr().contains("Sec-WebSocket-Accept"), "{}", gw.stderr());
    }
}

#[test]
fn passthrough_sends_no_second_close_frame() {
    // The upstream closed (1000) and then went quiet: the idle timeout ends the connection
    // without another close frame to a client that already has one.
    let mut after = Vec::new();
    frame::encode(&mut after, op::CLOSE, true, &1000u16.to_be_bytes());
    let gw = Gateway::start(&passthrough_config(
        push_backend(after),
        "websocket = { idle_timeout_ms = 300 }",
    ));
    let (head, mut ws) = ws_connect(gw.addr, "/live/r", "");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(ws.expect_close(), 1000);
    assert_eq!(ws.read_frame(), None, "a second frame after the close");
}

fn passthrough_config(backend: SocketAddr, websocket: &str) -> String {
    format!(
        r#"
[[upstreams]]
name = "ws"
targets = ["{backend}"]
timeout_ms = 3000

[[apis]]
name = "live"
{websocket}

[[apis.routes]]
route = "GET /live/{{room}}"
integration = {{ type = "http", upstream = "ws" }}
"#
    )
}

#[test]
fn passthrough_relays_both_ways() {
    let be = echo_backend(None);
    let gw = Gateway::start(&passthrough_config(be.addr, ""));
    let (head, mut ws) = ws_connect(
        gw.addr,
        "/live/r1?x=1",
        "Sec-WebSocket-Extensions: permessage-deflate\r\nX-Custom: yes\r\n",
    );
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(
        lower.contains("upgrade: websocket") && lower.contains("connection: upgrade"),
        "{head}"
    );
    assert!(
        lower.contains("x-backend: echo") && lower.contains("x-request-id"),
        "{head}"
    );
    // Fragmented, interleaved, large: relayed unchanged and in order.
    ws.send(false, op::TEXT, b"frag-");
    ws.send(true, op::PING, b"p");
    ws.send(true, op::CONT, b"ment");
    let big = vec![7u8; 300_000];
    ws.send(true, op::BINARY, &big);
    for i in 0..100 {
        ws.text(&format!("n{i}"));
    }
    assert_eq!(
        ws.read_frame().unwrap(),
        (false, op::TEXT, b"frag-".to_vec())
    );
    assert_eq!(ws.read_frame().unwrap(), (true, op::PONG, b"p".to_vec()));
    assert_eq!(ws.read_frame().unwrap(), (true, op::CONT, b"ment".to_vec()));
    assert_eq!(ws.read_frame().unwrap(), (true, op::BINARY, big));
    for i in 0..100 {
        assert_eq!(ws.recv_text(), format!("n{i}"));
    }
    ws.send(true, op::CLOSE, &4001u16.to_be_bytes());
    assert_eq!(ws.expect_close(), 4001);
    assert!(ws.eof());
    let h = be.heads.lock().unwrap()[0].to_ascii_lowercase();
    assert!(h.starts_with("get /live/r1?x=1 http/1.1"), "{h}");
    assert!(
        h.contains("upgrade: websocket") && h.contains("connection: upgrade"),
        "{h}"
    );
    assert!(
        h.contains("sec-websocket-key: ") && h.contains("x-custom: yes"),
        "{h}"
    );
    assert!(
        !h.contains("permessage-deflate"),
        "extensions are not negotiated: {h}"
    );
    assert!(h.contains("x-forwarded-for: 127.0.0.1"), "{h}");
}

#[test]
fn passthrough_either_side_closing_closes_the_other() {
    // The upstream drops its TCP connection after one echo: the client gets a 1001 close.
    let be = echo_backend(Some(1));
    let gw = Gateway::start(&passthrough_config(be.addr, ""));
    let mut ws = open_pt(gw.addr);
    ws.text("one");
    assert_eq!(ws.recv_text(), "one");
    assert_eq!(ws.expect_close(), 1001);
    assert!(ws.eof());
    // The client drops its TCP connection: the upstream gets a 1001 close frame.
    let be = echo_backend(None);
    let gw = Gateway::start(&passthrough_config(be.addr, ""));
    let mut ws = open_pt(gw.addr);
    ws.text("x");
    assert_eq!(ws.recv_text(), "x");
    drop(ws);
    assert!(wait_until(Duration::from_secs(3), || be
        .closes
        .lock()
        .unwrap()
        .as_slice()
        == [1001]));
}

fn open_pt(addr: SocketAddr) -> Ws {
    let (head, ws) = ws_connect(addr, "/live/r", "");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    ws
}

#[test]
fn passthrough_limits_timeouts_and_rules() {
    let be = echo_backend(None);
    let gw = Gateway::start(&passthrough_config(
        be.addr,
        "websocket = { max_frame_bytes = 1000, idle_timeout_ms = 700 }",
    ));
    let mut ws = open_pt(gw.addr);
    ws.send(true, op::BINARY, &[0u8; 1001]);
    assert_eq!(ws.expect_close(), 1009);
    let mut ws = open_pt(gw.addr);
    ws.send_raw(&Ws::frame(true, op::TEXT, b"unmasked", false));
    assert_eq!(ws.expect_close(), 1002);
    let mut ws = open_pt(gw.addr);
    let t = Instant::now();
    assert_eq!(ws.expect_close(), 1001);
    assert!(t.elapsed() >= Duration::from_millis(600));
    // The handshake is checked before anything goes upstream.
    let before = be.heads.lock().unwrap().len();
    let (head, _) = {
        let mut s = TcpStream::connect(gw.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET /live/r HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
        let mut b = vec![0u8; 1024];
        let n = s.read(&mut b).unwrap();
        (String::from_utf8_lossy(&b[..n]).to_string(), ())
    };
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert_eq!(be.heads.lock().unwrap().len(), before);
}

#[test]
fn passthrough_refuses_wrong_version_with_426() {
    let be = echo_backend(None);
    let gw = Gateway::start(&passthrough_config(be.addr, ""));
    let r = gw.request(&format!(
        "GET /live/r HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 7\r\n\r\n"
    ));
    assert_eq!(r.status, 426);
    assert_eq!(r.header("sec-websocket-version"), Some("13"));
    assert!(be.heads.lock().unwrap().is_empty());
}

#[test]
fn passthrough_checks_allowed_origins() {
    let be = echo_backend(None);
    let gw = Gateway::start(&passthrough_config(
        be.addr,
        r#"websocket = { allowed_origins = ["https://app.example.com"] }"#,
    ));
    let (head, _) = ws_connect(gw.addr, "/live/r", "Origin: https://evil.example.com\r\n");
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(be.heads.lock().unwrap().is_empty());
    let (head, mut ws) = ws_connect(gw.addr, "/live/r", "Origin: https://app.example.com\r\n");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    ws.text("ok");
    assert_eq!(ws.recv_text(), "ok");
}

#[test]
fn passthrough_upstream_refusing_upgrade_is_relayed() {
    let origin = Origin::start(|_| Response::new(404).body("no socket here"));
    let gw = Gateway::start(&passthrough_config(origin.addr, ""));
    let (head, _) = ws_connect(gw.addr, "/live/r", "");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}

// ---------------------------------------------------------------------------------------------
// Python's `websockets` as the independent peer
// ---------------------------------------------------------------------------------------------

/// Makes sure Python's `websockets` package is importable (installs it with pip once).
fn python_websockets() -> bool {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let ok = Command::new("python3")
            .args(["-c", "import websockets"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            let _ = Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "websockets"])
                .status();
        }
    });
    Command::new("python3")
        .args(["-c", "import websockets"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn peer(args: &[&str]) -> serde_json::Value {
    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ws/peer.py"))
        .args(args)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "peer {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(out.stdout.trim_ascii()).unwrap()
}

struct PyServer(std::process::Child, u16);

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn py_echo_server() -> PyServer {
    let mut child = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/ws/peer.py"))
        .arg("echo-server")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let port = line.trim().parse().expect("port");
    PyServer(child, port)
}

#[test]
fn python_client_through_passthrough_to_python_echo() {
    assert!(
        python_websockets(),
        "python3 with the websockets package is required"
    );
    let server = py_echo_server();
    let backend = SocketAddr::from(([127, 0, 0, 1], server.1));
    let gw = Gateway::start(&passthrough_config(backend, ""));
    let url = format!("ws://{}/live/py", gw.addr);
    let v = peer(&["echo-client", &url, "300"]);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["messages"], 301);
    assert_eq!(v["close_code"], 1000);
}

#[test]
fn python_client_against_websocket_api() {
    assert!(
        python_websockets(),
        "python3 with the websockets package is required"
    );
    let be = api_backend();
    let gw = Gateway::start(&api_config(be.addr, ""));
    let url = format!("ws://{}/?user=py", gw.addr);
    let v = peer(&["api-client", &url, "100"]);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["replies"], 100);
    assert_eq!(v["default"], r#"default:{"action": "nothing-routes-here"}"#);
    let v = peer(&["expect-refused", &format!("ws://{}/?deny=1", gw.addr)]);
    assert_eq!(v["status"], 403);
    assert!(wait_until(Duration::from_secs(3), || route_keys(
        &be,
        "$disconnect"
    )
    .len()
        == 1));
    let c = route_keys(&be, "$connect");
    assert!(c.iter().any(|r| r.path == "/connect?user=py"));
}

#[test]
fn shutdown_closes_with_1001_and_calls_disconnect() {
    let be = api_backend();
    let mut gw = Gateway::start(&api_config(be.addr, ""));
    let mut ws = open(gw.addr, "/");
    ws.text(r#"{"action":"echo"}"#);
    assert_eq!(ws.recv_text(), r#"{"action":"echo"}"#);
    gw.terminate();
    assert_eq!(ws.expect_close(), 1001);
    assert!(gw.wait_exit(Duration::from_secs(5)).is_some());
    assert_eq!(route_keys(&be, "$disconnect").len(), 1);
}

#[test]
fn passthrough_relays_after_idle_buffer_release() {
    // Past the grace period both directions give their buffers back and wait for readiness:
    // traffic afterwards must flow as before.
    let be = echo_backend(None);
    let gw = Gateway::start(&passthrough_config(be.addr, ""));
    let mut ws = open_pt(gw.addr);
    for round in 0..3 {
        thread::sleep(Duration::from_millis(1300));
        let big = vec![round as u8; 70_000];
        ws.send(true, op::BINARY, &big);
        ws.text(&format!("after idle {round}"));
        assert_eq!(ws.read_frame().unwrap(), (true, op::BINARY, big));
        assert_eq!(ws.recv_text(), format!("after idle {round}"));
    }
}

#[test]
fn api_connection_works_after_idle_buffer_release() {
    let be = api_backend();
    let gw = Gateway::start(&api_config(be.addr, ""));
    let mut ws = open(gw.addr, "/");
    // Half a frame, then idle past the grace period, then the rest.
    let f = Ws::frame(true, op::TEXT, br#"{"action":"echo","p":1}"#, true);
    ws.send_raw(&f[..9]);
    thread::sleep(Duration::from_millis(1200));
    ws.send_raw(&f[9..]);
    assert_eq!(ws.recv_text(), r#"{"action":"echo","p":1}"#);
    thread::sleep(Duration::from_millis(1200));
    ws.text(r#"{"action":"echo","p":2}"#);
    assert_eq!(ws.recv_text(), r#"{"action":"echo","p":2}"#);
    // @connections messages reach an idle connection too.
    let id = route_keys(&be, "$connect")[0]
        .header("x-connection-id")
        .unwrap()
        .to_string();
    thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        admin(&gw, "POST", &format!("/@connections/{id}"), "pushed").status,
        200
    );
    assert_eq!(ws.recv_text(), "pushed");
}

#[test]
fn passthrough_shutdown_closes_both_sides_with_1001() {
    let be = echo_backend(None);
    let mut gw = Gateway::start(&passthrough_config(be.addr, ""));
    let mut ws = open_pt(gw.addr);
    ws.text("hi");
    assert_eq!(ws.recv_text(), "hi");
    gw.terminate();
    assert_eq!(ws.expect_close(), 1001);
    assert!(gw.wait_exit(Duration::from_secs(5)).is_some());
    assert!(wait_until(Duration::from_secs(3), || be
        .closes
        .lock()
        .unwrap()
        .as_slice()
        == [1001]));
}

#[test]
fn reload_keeps_open_websockets_and_applies_to_new_ones() {
    let be = api_backend();
    let gw = Gateway::start(&api_config(be.addr, ""));
    let mut ws = open(gw.addr, "/");
    // The new config drops the `echo` route.
    gw.write_config(&api_config(be.addr, "").replace("route = \"echo\"", "route = \"echo2\""));
    gw.reload_signal();
    assert!(wait_until(Duration::from_secs(5), || gw
        .stderr()
        .contains("config reloaded")));
    // The open connection keeps the config it connected with.
    ws.text(r#"{"action":"echo"}"#);
    assert_eq!(ws.recv_text(), r#"{"action":"echo"}"#);
    // A new one gets the new routes: `echo` falls to $default.
    let mut ws2 = open(gw.addr, "/");
    ws2.text(r#"{"action":"echo"}"#);
    assert_eq!(ws2.recv_text(), r#"default:{"action":"echo"}"#);
}

#[test]
fn connect_integration_picks_the_subprotocol() {
    let be = api_backend();
    let gw = Gateway::start(&api_config(be.addr, ""));
    let (head, _) = ws_connect(gw.addr, "/", "Sec-WebSocket-Protocol: chat.v1, chat.v2\r\n");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-protocol: chat.v2\r\n"),
        "{head}"
    );
    // A protocol the client did not offer is not passed on.
    let (head, _) = ws_connect(gw.addr, "/", "Sec-WebSocket-Protocol: other\r\n");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("sec-websocket-protocol"),
        "{head}"
    );
}

/// The client's offer is every token of all its `Sec-WebSocket-Protocol` lines; the
/// integration's pick must be one of them exactly (tokens are case-sensitive), and the `101`
/// carries it as the client spelt it, or names none.
#[test]
fn connect_subprotocol_is_matched_exactly_over_every_offer_line() {
    let be = Origin::start(
        |r| match (r.header("x-route-key"), r.path.split_once("pick=")) {
            (Some("$connect"), Some((_, pick))) => {
                Response::ok("").header("Sec-WebSocket-Protocol", pick)
            }
            _ => Response::ok(""),
        },
    );
    let gw = Gateway::start(&api_config(be.addr, ""));
    let chosen = |pick: &str, offer: &str| {
        let (head, _ws) = ws_connect(gw.addr, &format!("/?pick={pick}"), offer);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let lines: Vec<String> = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| n.eq_ignore_ascii_case("sec-websocket-protocol"))
            .map(|(_, v)| v.trim().to_string())
            .collect();
        assert!(lines.len() <= 1, "{head}");
        lines.into_iter().next()
    };
    let two_lines = "Sec-WebSocket-Protocol: a\r\nSec-WebSocket-Protocol: b, chat\r\n";
    assert_eq!(chosen("chat", two_lines).as_deref(), Some("chat"));
    assert_eq!(chosen("a", two_lines).as_deref(), Some("a"));
    // `$connect` saw both lines.
    let c = route_keys(&be, "$connect");
    assert_eq!(
        c.last().unwrap().headers_named("sec-websocket-protocol"),
        ["a", "b, chat"]
    );
    assert_eq!(
        chosen("Chat.V1", "Sec-WebSocket-Protocol: x, Chat.V1\r\n").as_deref(),
        Some("Chat.V1")
    );
    // Another case is another token: not offered, so not passed on.
    assert_eq!(chosen("CHAT", "Sec-WebSocket-Protocol: chat\r\n"), None);
    assert_eq!(chosen("chat", "Sec-WebSocket-Protocol: CHAT\r\n"), None);
    assert_eq!(chosen("c", two_lines), None);
}

/// Auth on a WebSocket API guards the handshake: it is set on the `$connect` route and checked
/// before the `$connect` integration is called; on a per-message route it is refused.
#[test]
fn connect_route_auth_guards_the_handshake() {
    let be = api_backend();
    let cfg = api_config(be.addr, "").replace(
        "route = \"$connect\"\n",
        "route = \"$connect\"\nauth = \"api_key\"\n",
    ) + "\n[[usage_plans]]\nname = \"ws\"\napis = [\"chat/$default\"]\n[[api_keys]]\nname = \"dev\"\nvalue = \"websocket-test-key-000000001\"\nplans = [\"ws\"]\n";
    let gw = Gateway::start(&cfg);
    let (head, _) = ws_connect(gw.addr, "/", "");
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    let (head, _) = ws_connect(gw.addr, "/", "x-api-key: wrong-key-value-00000000000\r\n");
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    // Refused handshakes never reach the $connect integration.
    assert!(route_keys(&be, "$connect").is_empty());
    let (head, _) = ws_connect(gw.addr, "/", "x-api-key: websocket-test-key-000000001\r\n");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(route_keys(&be, "$connect").len(), 1);

    let bad = api_config(be.addr, "").replace(
        "route = \"echo\"\n",
        "route = \"echo\"\nauth = \"api_key\"\n",
    );
    let (out, _) = check(&bad);
    let e =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(e.contains("$connect") && e.contains(".auth"), "{e}");
}

/// [`api_config`] with `api_key_required` on `$connect` and key `dev`
/// (`websocket-test-key-000000001`) in plan `ws` of the API, `quota` handshakes a day.
fn keyed_api_config(backend: SocketAddr, websocket: &str, quota: u32) -> String {
    api_config(backend, websocket).replace(
        "route = \"$connect\"\n",
        "route = \"$connect\"\napi_key_required = true\n",
    ) + &format!(
        r#"
[[usage_plans]]
name = "ws"
apis = ["chat/$default"]
quota = {{ limit = {quota}, period = "day" }}
[[api_keys]]
name = "dev"
value = "websocket-test-key-000000001"
plans = ["ws"]
"#
    )
}

/// A handshake that would be refused anyway (an Origin not allowed, a bad key) is refused
/// before auth, throttles and quotas: it spends nothing, and says why.
#[test]
fn refused_handshakes_spend_no_quota_and_name_their_reason() {
    let be = api_backend();
    let cfg = keyed_api_config(
        be.addr,
        r#"websocket = { allowed_origins = ["https://app.example.com"] }"#,
        1,
    );
    let gw = Gateway::start(&cfg);
    let key = "x-api-key: websocket-test-key-000000001\r\n";
    // With a valid key, or none (the Origin is checked first), the reason is the Origin.
    for extra in [key, "", key] {
        let origin = format!("{extra}Origin: https://evil.example.com\r\n");
        let r = gw.request(&upgrade_request("", &origin));
        assert_eq!(r.status, 403);
        assert_eq!(r.message(), "Forbidden: origin not allowed");
    }
    let (head, _ws) = ws_connect(
        gw.addr,
        "/",
        &format!("{key}Origin: https://app.example.com\r\n"),
    );
    assert!(
        head.starts_with("HTTP/1.1 101"),
        "the quota of 1 is unspent: {head}"
    );
    assert_eq!(route_keys(&be, "$connect").len(), 1);
}

/// Usage plans meet WebSocket APIs at the handshake: a key's quota counts `$connect`s (a
/// connection, not its messages), a spent quota refuses the handshake with 429 before the
/// `$connect` integration is called, and messages on an open connection are not counted.
#[test]
fn usage_plan_quota_counts_websocket_handshakes() {
    let be = api_backend();
    let cfg = keyed_api_config(be.addr, "", 2);
    let gw = Gateway::start(&cfg);
    let key = "x-api-key: websocket-test-key-000000001\r\n";
    let (head, mut ws) = ws_connect(gw.addr, "/", key);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    for i in 0..5 {
        ws.text(&format!(r#"{{"action":"echo","n":{i}}}"#));
        assert!(ws.recv_text().contains(&format!("\"n\":{i}")));
    }
    let (head, _ws2) = ws_connect(gw.addr, "/", key);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (head, _) = ws_connect(gw.addr, "/", key);
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
    assert_eq!(route_keys(&be, "$connect").len(), 2);
    let u = gw.admin_get("/usage-plans/ws/usage?key=dev").json();
    assert_eq!(u["used"], 2, "{u}");
    assert_eq!(u["remaining"], 0, "{u}");
}

/// `api_key_required` on `$connect` takes only a key of a usage plan of the API's stage (as
/// Amazon API Gateway): a key of no plan is refused with 403 before `$connect` is called.
#[test]
fn websocket_connect_key_must_be_in_a_plan_of_the_stage() {
    let be = api_backend();
    let cfg = api_config(be.addr, "").replace(
        "route = \"$connect\"\n",
        "route = \"$connect\"\napi_key_required = true\n",
    ) + r#"
[[usage_plans]]
name = "ws"
apis = ["chat/$default"]
[[api_keys]]
name = "dev"
value = "websocket-test-key-000000001"
plans = ["ws"]
[[api_keys]]
name = "loner"
value = "websocket-test-key-000000002"
"#;
    let gw = Gateway::start(&cfg);
    let (head, _) = ws_connect(gw.addr, "/", "x-api-key: websocket-test-key-000000002\r\n");
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(route_keys(&be, "$connect").is_empty());
    let (head, _ws) = ws_connect(gw.addr, "/", "x-api-key: websocket-test-key-000000001\r\n");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(route_keys(&be, "$connect").len(), 1);
}

// ---------------------------------------------------------------------------------------------
// What integration calls receive: the gateway's forwarding and identity headers, never the
// client's
// ---------------------------------------------------------------------------------------------

/// Identity and forwarding headers a client might forge in its handshake.
const FORGED: &str = "X-Principal-Id: admin\r\nX-Forwarded-Client-Cert: Hash=deadbeef\r\nX-Forwarded-Proto: https\r\nX-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Host: evil.example\r\nX-Connection-Id: 0000000000000001\r\nX-Route-Key: echo\r\nKeep-Alive: timeout=5\r\n";

/// Opens a connection, sends one `echo` message, closes it, and returns the `$connect`, `echo`
/// and `$disconnect` calls the integration received.
fn connect_echo_close(gw: &Gateway, be: &Origin, extra: &str) -> [Request; 3] {
    let (head, mut ws) = ws_connect(gw.addr, "/", extra);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    ws.text(r#"{"action":"echo","v":1}"#);
    assert_eq!(ws.recv_text(), r#"{"action":"echo","v":1}"#);
    ws.send(true, op::CLOSE, &1000u16.to_be_bytes());
    assert_eq!(ws.expect_close(), 1000);
    assert!(wait_until(Duration::from_secs(3), || !route_keys(
        be,
        "$disconnect"
    )
    .is_empty()));
    let one = |key: &str| {
        let mut v = route_keys(be, key);
        assert_eq!(v.len(), 1, "{key}");
        v.remove(0)
    };
    [one("$connect"), one("echo"), one("$disconnect")]
}

#[test]
fn integration_calls_get_the_gateways_forwarding_headers_never_forged_ones() {
    let be = api_backend();
    let gw = Gateway::start(&api_config(be.addr, ""));
    let calls = connect_echo_close(&gw, &be, FORGED);
    let id = calls[0].header("x-connection-id").unwrap().to_string();
    for (r, key) in calls.iter().zip(["$connect", "echo", "$disconnect"]) {
        // No authorizer named a principal, so there is none; a client-sent one never passes.
        assert!(r.headers_named("x-principal-id").is_empty(), "{key}");
        // No client certificate (plain listener): a client-sent value never passes.
        assert!(
            r.headers_named("x-forwarded-client-cert").is_empty(),
            "{key}"
        );
        assert_eq!(r.headers_named("x-forwarded-proto"), ["http"], "{key}");
        assert_eq!(
            r.headers_named("x-forwarded-for"),
            ["1.2.3.4, 127.0.0.1"],
            "{key}"
        );
        assert_eq!(r.headers_named("x-forwarded-host"), ["chat.test"], "{key}");
        assert_eq!(r.headers_named("x-connection-id"), [id.as_str()], "{key}");
        assert_eq!(r.headers_named("x-route-key"), [key], "{key}");
        assert!(r.headers_named("keep-alive").is_empty(), "{key}");
    }
    // `$connect` also gets the handshake's request id and the client's other headers.
    let rid = calls[0].headers_named("x-request-id");
    assert_eq!(rid.len(), 1);
    assert!(!rid[0].is_empty());
    assert_eq!(calls[0].header("sec-websocket-key"), Some(KEY));
    // Every later call is a request of its own, with an id of its own.
    let later: Vec<_> = calls[1..]
        .iter()
        .map(|r| r.headers_named("x-request-id"))
        .collect();
    for ids in &later {
        assert_eq!(ids.len(), 1, "{later:?}");
        assert!(ids[0].starts_with(&id) && ids[0] != rid[0], "{later:?}");
    }
    assert_ne!(later[0], later[1]);
    // Without a client X-Forwarded-For, the chain is the peer alone.
    let be = api_backend();
    let gw = Gateway::start(&api_config(be.addr, ""));
    let calls = connect_echo_close(&gw, &be, "X-Request-Id: client-rid-1\r\n");
    for r in &calls {
        assert_eq!(r.headers_named("x-forwarded-for"), ["127.0.0.1"]);
    }
    assert_eq!(calls[0].headers_named("x-request-id"), ["client-rid-1"]);
}

/// An HS256 token for `sub`, valid for five minutes.
fn hs256(secret: &str, sub: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 300;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({ "sub": sub, "exp": exp }),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// The principal `$connect`'s authorizer named goes with every integration call of that
/// connection (as `$context.authorizer.principalId` does in Amazon API Gateway), replacing a
/// client-sent one.
#[test]
fn connect_principal_goes_with_every_integration_call_of_the_connection() {
    const SECRET: &str = "websocket-test-secret-0123456789abcdef";
    let be = api_backend();
    let cfg = api_config(be.addr, "").replace(
        "route = \"$connect\"\n",
        "route = \"$connect\"\nauth = \"jwt:users\"\n",
    ) + &format!(
        "\n[[authorizers]]\nname = \"users\"\ntype = \"jwt\"\nsecret = \"{SECRET}\"\n"
    );
    let gw = Gateway::start(&cfg);
    let auth = format!(
        "Authorization: Bearer {}\r\n{FORGED}",
        hs256(SECRET, "user-9")
    );
    let calls = connect_echo_close(&gw, &be, &auth);
    for (r, key) in calls.iter().zip(["$connect", "echo", "$disconnect"]) {
        assert_eq!(r.headers_named("x-principal-id"), ["user-9"], "{key}");
        assert!(
            r.headers_named("x-forwarded-client-cert").is_empty(),
            "{key}"
        );
        assert_eq!(r.headers_named("x-forwarded-proto"), ["http"], "{key}");
        assert_eq!(
            r.headers_named("x-forwarded-for"),
            ["1.2.3.4, 127.0.0.1"],
            "{key}"
        );
    }
    // A token for someone else: each connection keeps its own principal.
    let (head, mut other) = ws_connect(
        gw.addr,
        "/",
        &format!("Authorization: Bearer {}\r\n", hs256(SECRET, "user-10")),
    );
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    other.text(r#"{"action":"echo","v":2}"#);
    assert_eq!(other.recv_text(), r#"{"action":"echo","v":2}"#);
    let echoes = route_keys(&be, "echo");
    assert_eq!(echoes.len(), 2);
    assert_eq!(echoes[1].headers_named("x-principal-id"), ["user-10"]);
    // No token: refused before the $connect integration.
    let (head, _) = ws_connect(gw.addr, "/", "X-Principal-Id: admin\r\n");
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert_eq!(route_keys(&be, "$connect").len(), 2);
}

#[test]
fn connect_refusals_keep_their_status_redirects_included() {
    // CONTRACT: a non-2xx `$connect` refuses the handshake "with that status".
    let be = api_backend();
    let gw = Gateway::start(&api_config(be.addr, ""));
    for st in [301u16, 302, 307, 304, 404, 503] {
        let (head, _) = ws_connect(gw.addr, &format!("/?status={st}"), "");
        assert!(
            head.starts_with(&format!("HTTP/1.1 {st} ")),
            "$connect {st}: {head}"
        );
    }
    // An empty refusal is explained in the status's own words.
    for (st, words) in [
        (401u16, "Unauthorized"),
        (429, "Too Many Requests"),
        (500, "Internal Server Error"),
    ] {
        let r = gw.request(&upgrade_request(&format!("?status={st}"), ""));
        assert_eq!(r.status, st);
        assert_eq!(r.message(), format!("{words}: refused by $connect"));
    }
}

/// The raw upgrade request of a WebSocket API client, with `query` after `/` and `extra`
/// header lines.
fn upgrade_request(query: &str, extra: &str) -> String {
    format!(
        "GET /{query} HTTP/1.1\r\nHost: chat.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

#[test]
fn connect_slower_than_its_timeout_is_504() {
    // CONTRACT: an upstream slower than its timeout is a 504 `Endpoint Request Timed Out`, on
    // `$connect` as on HTTP routes; an unreachable one stays a 502.
    let be = api_backend();
    let gw =
        Gateway::start(&api_config(be.addr, "").replace("timeout_ms = 3000", "timeout_ms = 300"));
    let t = Instant::now();
    let r = gw.request(&upgrade_request("?sleep=1500", ""));
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.message(), "Endpoint Request Timed Out");
    assert!(
        t.elapsed() < Duration::from_millis(1200),
        "{:?}",
        t.elapsed()
    );
    // A fast one still connects.
    let (head, _) = ws_connect(gw.addr, "/?sleep=10", "");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let dead = Gateway::start(&api_config(dead_addr(), ""));
    let r = dead.request(&upgrade_request("", ""));
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.message(), "Bad Gateway");
}

#[test]
fn integration_calls_keep_out_a_target_that_failed() {
    // Passive checks on the integration's upstream: after one refused connect, `$connect`
    // calls go to the live target only (without them, about every other one would fail).
    let be = api_backend();
    let dead = dead_addr();
    let cfg = api_config(be.addr, "").replace(
        &format!("targets = [\"{}\"]", be.addr),
        &format!(
            "targets = [\"{dead}\", \"{}\"]\nretries = 0\npassive = {{ max_fails = 1, fail_timeout_ms = 60000 }}",
            be.addr
        ),
    );
    let gw = Gateway::start(&cfg);
    let mut failed = 0;
    for _ in 0..12 {
        let (head, _ws) = ws_connect(gw.addr, "/", "");
        if head.starts_with("HTTP/1.1 502") {
            failed += 1;
        } else {
            assert!(head.starts_with("HTTP/1.1 101"), "{head}");
            assert_eq!(head.matches("\r\ndate: ").count(), 1, "{head}");
        }
    }
    assert!(failed <= 1, "{failed} of 12 handshakes failed");
    assert!(gw.stderr().contains("(passive)"), "{}", gw.stderr());
}

#[test]
fn a_message_call_dropped_on_a_reused_connection_is_not_sent_again() {
    // A backend that answers the first request on each connection and closes the connection
    // on a later message call without answering: the upstream may have acted on the POST, so
    // the gateway must not send it again on a fresh connection (as the proxy's POSTs).
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let be = l.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let seen = seen2.clone();
            thread::spawn(move || {
                let mut first = true;
                while let Some((line, _, _)) = read_raw_request(&mut s) {
                    let path = line.split(' ').nth(1).unwrap_or("").to_string();
                    seen.lock().unwrap().push(path.clone());
                    if path == "/default" && !first {
                        return; // dropped, unanswered
                    }
                    first = false;
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                }
            });
        }
    });
    // One worker: the message call reuses the connection `$connect` went on.
    let gw = Gateway::start(&format!(
        "{}\n{}",
        HEADER.replace("workers = 2", "workers = 1"),
        api_config(be, "").replace("timeout_ms = 3000", "timeout_ms = 3000\nretries = 0")
    ));
    let (head, mut ws) = ws_connect(gw.addr, "/", "");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    ws.text(r#"{"action":"nope","n":1}"#);
    // Whatever the client is told, the backend sees the message once.
    let _ = ws.read_frame();
    thread::sleep(Duration::from_millis(300));
    let defaults = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|p| p.as_str() == "/default")
        .count();
    assert_eq!(defaults, 1, "{:?}", seen.lock().unwrap());
}

/// `$disconnect` calls the backend got for connection `id`.
fn disconnects_of(be: &Origin, id: &str) -> usize {
    route_keys(be, "$disconnect")
        .iter()
        .filter(|r| r.header("x-connection-id") == Some(id))
        .count()
}

#[test]
fn disconnect_follows_a_connect_whose_client_went_away_even_by_reset() {
    // Once `$connect` succeeded the integration holds the connection: `$disconnect` is called
    // exactly once, whether the client left with a FIN or a reset while `$connect` ran.
    let be = api_backend();
    let gw = Gateway::start(&api_config(be.addr, ""));
    for (n, reset) in [(1, false), (2, true)] {
        let mut s = TcpStream::connect(gw.addr).unwrap();
        s.write_all(upgrade_request("?sleep=700", "").as_bytes())
            .unwrap();
        assert!(wait_until(Duration::from_secs(5), || route_keys(
            &be, "$connect"
        )
        .len()
            == n));
        let id = route_keys(&be, "$connect")[n - 1]
            .header("x-connection-id")
            .unwrap()
            .to_string();
        if reset {
            use std::os::fd::AsRawFd;
            let linger = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: setsockopt on the stream's own open descriptor with a `linger` of the
            // size passed; closing it then sends an RST instead of a FIN.
            let rc = unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    &linger as *const libc::linger as *const libc::c_void,
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0);
        }
        drop(s);
        assert!(
            wait_until(Duration::from_secs(5), || disconnects_of(&be, &id) == 1),
            "reset={reset}: no $disconnect for {id}"
        );
        thread::sleep(Duration::from_millis(300));
        assert_eq!(disconnects_of(&be, &id), 1, "reset={reset}");
        let r = admin(&gw, "GET", &format!("/@connections/{id}"), "");
        assert_eq!(r.status, 410, "reset={reset}: {}", r.text());
    }
}

#[test]
fn shutdown_calls_disconnect_for_a_client_that_does_not_read() {
    // README: on SIGTERM `$disconnect` is called for every connection, within the drain
    // (`shutdown_timeout_ms` = 3000), even for a client that cannot be written to.
    let be = api_backend();
    let mut gw = Gateway::start(&api_config(be.addr, ""));
    let (id, _ws) = open_with_id(gw.addr);
    // Posts until its queue is full: the gateway's writes to it block.
    let pad = "p".repeat(64 * 1024);
    let full =
        (0..400).any(|_| admin(&gw, "POST", &format!("/@connections/{id}"), &pad).status == 429);
    assert!(full, "the queue never filled");
    let t = Instant::now();
    gw.terminate();
    let st = gw
        .wait_exit(Duration::from_secs(8))
        .expect("still running 8 s after SIGTERM");
    assert!(st.success(), "{st:?}");
    assert!(
        t.elapsed() < Duration::from_millis(3500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(disconnects_of(&be, &id), 1, "{}", gw.stderr());
}

#[test]
fn shutdown_lets_the_message_call_in_flight_answer_before_the_1001() {
    // CONTRACT: SIGTERM finishes in-flight work within `shutdown_timeout_ms` (3000): the
    // message call answers (1 s), then the message read meanwhile is called, their replies
    // reach the client, then the 1001 close, then `$disconnect`.
    let be = api_backend();
    let mut gw = Gateway::start(&api_config(be.addr, ""));
    let mut ws = open(gw.addr, "/");
    start_nap(&be, &mut ws);
    // Read by the gateway, waiting its turn behind the call in flight: it is called too.
    ws.text(r#"{"action":"echo","n":2}"#);
    thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    gw.terminate();
    thread::sleep(Duration::from_millis(400));
    assert_eq!(
        route_keys(&be, "$disconnect").len(),
        0,
        "$disconnect before the message call answered"
    );
    assert_eq!(ws.recv_text(), r#"{"action":"nap","n":1}"#);
    assert_eq!(ws.recv_text(), r#"{"action":"echo","n":2}"#);
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(ws.expect_close(), 1001);
    let st = gw
        .wait_exit(Duration::from_secs(5))
        .expect("still running 5 s after SIGTERM");
    assert!(st.success(), "{st:?}");
    assert!(
        t.elapsed() < Duration::from_millis(3000),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(route_keys(&be, "$disconnect").len(), 1);
}

#[test]
fn a_message_call_cut_by_the_drain_still_gets_the_1001_close() {
    // With `shutdown_timeout_ms` = 800, the drain stops what still runs at 600 ms (the last
    // quarter is kept for `$disconnect`): the 1 s `nap` call is cut, and the client, which
    // reads, still gets a close frame (1001) before the connection ends, then `$disconnect`.
    let be = api_backend();
    let cfg = format!(
        "{}{}",
        HEADER.replace("shutdown_timeout_ms = 3000", "shutdown_timeout_ms = 800"),
        api_config(be.addr, "")
    );
    let mut gw = Gateway::start(&cfg);
    let mut ws = open(gw.addr, "/");
    start_nap(&be, &mut ws);
    gw.terminate();
    assert_eq!(ws.expect_close(), 1001);
    let st = gw
        .wait_exit(Duration::from_secs(5))
        .expect("still running 5 s after SIGTERM");
    assert!(st.success(), "{st:?}");
    assert_eq!(route_keys(&be, "$disconnect").len(), 1);
}

#[test]
fn connections_api_says_a_draining_connection_is_closing() {
    // During a drain a connection finishing its call takes no more messages: a POST is 410
    // saying so (not "no such connection"), while GET still describes it until it is gone.
    let be = api_backend();
    let mut gw = Gateway::start(&api_config(be.addr, ""));
    let (id, mut ws) = open_with_id(gw.addr);
    start_nap(&be, &mut ws);
    gw.terminate();
    thread::sleep(Duration::from_millis(200));
    let r = admin(&gw, "POST", &format!("/@connections/{id}"), "late");
    assert_eq!(r.status, 410, "{}", r.text());
    assert!(r.text().contains("draining"), "{}", r.text());
    let r = admin(&gw, "GET", &format!("/@connections/{id}"), "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(ws.recv_text(), r#"{"action":"nap","n":1}"#);
    assert_eq!(ws.expect_close(), 1001);
    assert!(gw.wait_exit(Duration::from_secs(5)).is_some());
}

/// "Nothing is dropped after a 200": once a connection is closing (its client's close frame or
/// FIN seen, or a DELETE), `@connections` answers GET, POST and DELETE with the 410 of an
/// unknown id, while a message call still runs or queued frames wait out the close grace.
#[test]
fn connections_api_answers_410_once_a_connection_is_closing() {
    let be = api_backend();
    let gw = Gateway::start(&api_config(be.addr, ""));
    let status = |m: &str, id: &str| admin(&gw, m, &format!("/@connections/{id}"), "late");
    let gone = |id: &str| {
        for m in ["GET", "POST", "DELETE"] {
            let r = status(m, id);
            assert_eq!(r.status, 410, "{m}: {}", r.text());
            assert_eq!(r.json()["message"], "Gone: no such connection", "{m}");
        }
    };
    // The client's close frame, while a 1 s message call runs.
    let (id, mut ws) = open_with_id(gw.addr);
    start_nap(&be, &mut ws);
    ws.send(true, op::CLOSE, &1000u16.to_be_bytes());
    assert_eq!(ws.expect_close(), 1000);
    gone(&id);
    assert!(
        route_keys(&be, "$disconnect").is_empty(),
        "checked only after the call ended"
    );
    // The client's FIN, while a 1 s message call runs.
    let (id, mut ws) = open_with_id(gw.addr);
    let naps = route_keys(&be, "nap").len();
    ws.text(r#"{"action":"nap","n":2}"#);
    assert!(wait_until(Duration::from_secs(3), || route_keys(
        &be, "nap"
    )
    .len()
        > naps));
    ws.s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(
        wait_until(Duration::from_millis(700), || status("GET", &id).status
            == 410),
        "still described while its last call runs"
    );
    gone(&id);
    // A DELETE while frames queued toward a client that does not read wait out the close
    // grace: no later POST is taken, and every one that got a 200 still arrives.
    let (id, mut ws) = open_with_id(gw.addr);
    let pad = "p".repeat(64 * 1024);
    let mut accepted = 0;
    while accepted < 120 {
        let r = admin(
            &gw,
            "POST",
            &format!("/@connections/{id}"),
            &format!("{accepted:06}{pad}"),
        );
        if r.status != 200 {
            assert_eq!(r.status, 429, "{}", r.text());
            break;
        }
        accepted += 1;
    }
    assert!(accepted >= 32, "{accepted} accepted");
    assert_eq!(status("DELETE", &id).status, 204);
    gone(&id);
    for k in 0..accepted {
        assert_eq!(&ws.recv_text()[..6], format!("{k:06}"), "message lost");
    }
    assert_eq!(ws.expect_close(), 1000);
}

/// A client that floods pings and reads nothing costs one owed pong, not one queued pong per
/// ping: the gateway's memory stays flat (RFC 6455 5.5.3 lets it answer only the latest ping),
/// and the pong it finally sends carries the latest ping's payload.
#[test]
fn a_ping_flood_from_a_client_that_does_not_read_is_bounded() {
    let be = api_backend();
    let gw = Gateway::start(&api_config(be.addr, ""));
    let mut ws = open(gw.addr, "/");
    // Warm up, then measure.
    ws.send(true, op::PING, b"warm");
    let (_, opc, _) = ws.read_frame().expect("a pong");
    assert_eq!(opc, op::PONG);
    let rss0 = rss_kib(gw.pid);
    // 64 MiB of pings in 1 MiB writes, none of their pongs read meanwhile.
    let payload = [b'p'; 125];
    let one = Ws::frame(true, op::PING, &payload, true);
    let batch: Vec<u8> = one.iter().copied().cycle().take(one.len() * 8000).collect();
    let mut sent = 0usize;
    while sent < 64 << 20 {
        ws.send_raw(&batch);
        sent += batch.len();
    }
    ws.send(true, op::PING, b"last");
    // The gateway has read them all once it answers a message sent after them.
    ws.text(r#"{"action":"echo","n":1}"#);
    let mut pongs = 0usize;
    let mut last_pong = Vec::new();
    loop {
        let (_, opc, p) = ws.read_frame().expect("a frame");
        match opc {
            op::PONG => {
                pongs += 1;
                last_pong = p;
            }
            op::TEXT => break,
            o => panic!("unexpected opcode {o}"),
        }
    }
    let rss1 = rss_kib(gw.pid);
    assert_eq!(last_pong, b"last", "the latest ping's pong is sent");
    let pings = sent / one.len();
    assert!(pongs < pings, "{pongs} pongs for {pings} pings");
    assert!(
        rss1 < rss0 + 24 * 1024,
        "RSS grew from {rss0} KiB to {rss1} KiB"
    );
}

#[test]
fn pings_and_close_are_answered_while_a_message_call_runs() {
    // RFC 6455 5.5.2: a ping is answered as soon as practical, not after the message call in
    // flight (1 s); messages still go one at a time, in order.
    let be = api_backend();
    let gw = Gateway::start(&api_config(be.addr, ""));
    let mut ws = open(gw.addr, "/");
    start_nap(&be, &mut ws);
    let t = Instant::now();
    ws.send(true, op::PING, b"are-you-there");
    let (_, opc, p) = ws.read_frame().expect("a pong");
    assert_eq!((opc, &p[..]), (op::PONG, &b"are-you-there"[..]));
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    // The next message waits for the answer to the first.
    ws.text(r#"{"action":"echo","n":2}"#);
    thread::sleep(Duration::from_millis(200));
    assert!(route_keys(&be, "echo").is_empty(), "two calls at once");
    assert_eq!(ws.recv_text(), r#"{"action":"nap","n":1}"#);
    assert_eq!(ws.recv_text(), r#"{"action":"echo","n":2}"#);
    // A close during a call is answered at once.
    ws.text(r#"{"action":"nap","n":3}"#);
    assert!(wait_until(Duration::from_secs(3), || route_keys(
        &be, "nap"
    )
    .len()
        == 2));
    // A message sent before the close is still called, after the one in flight, then
    // `$disconnect`.
    ws.text(r#"{"action":"echo","n":4}"#);
    let t = Instant::now();
    ws.send(true, op::CLOSE, &1000u16.to_be_bytes());
    assert_eq!(ws.expect_close(), 1000);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    assert!(wait_until(Duration::from_secs(3), || route_keys(
        &be,
        "$disconnect"
    )
    .len()
        == 1));
    let echoes: Vec<_> = route_keys(&be, "echo")
        .into_iter()
        .map(|r| r.body)
        .collect();
    assert_eq!(
        echoes,
        [
            &br#"{"action":"echo","n":2}"#[..],
            br#"{"action":"echo","n":4}"#
        ]
    );
}

#[test]
fn messages_read_during_a_call_past_the_waiting_limit_all_arrive_in_order() {
    // 40 messages behind a 1 s call: 16 wait their turn, reading pauses for the rest, and every
    // one is called and answered, in order, once the call is done.
    let be = api_backend();
    let gw = Gateway::start(&api_config(be.addr, ""));
    let mut ws = open(gw.addr, "/");
    ws.text(r#"{"action":"nap","n":0}"#);
    for n in 1..=40 {
        ws.text(&format!(r#"{{"action":"echo","n":{n}}}"#));
    }
    assert_eq!(ws.recv_text(), r#"{"action":"nap","n":0}"#);
    for n in 1..=40 {
        assert_eq!(ws.recv_text(), format!(r#"{{"action":"echo","n":{n}}}"#));
    }
    let bodies: Vec<String> = route_keys(&be, "echo")
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).to_string())
        .collect();
    let expected: Vec<String> = (1..=40)
        .map(|n| format!(r#"{{"action":"echo","n":{n}}}"#))
        .collect();
    assert_eq!(bodies, expected);
}

/// A tunnel holds one of its upstream target's `max_connections` while it lasts: a second
/// upgrade past the cap gets 503, and the slot is back once the first tunnel ends.
#[test]
fn a_passthrough_tunnel_holds_a_max_connections_slot() {
    let be = push_backend(Vec::new());
    let cfg = passthrough_config(be, "").replace(
        "timeout_ms = 3000",
        "timeout_ms = 3000\nmax_connections = 1",
    );
    let gw = Gateway::start(&cfg);
    let (head, ws) = ws_connect(gw.addr, "/live/a", "");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let (head, _) = ws_connect(gw.addr, "/live/b", "");
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    drop(ws);
    assert!(wait_until(Duration::from_secs(5), || {
        ws_connect(gw.addr, "/live/c", "")
            .0
            .starts_with("HTTP/1.1 101")
    }));
}

/// A `$connect` that finds every integration target at `max_connections` gets 503 with
/// `retry-after: 1`, as an HTTP route would, not a 502 that looks like a broken backend.
#[test]
fn connect_with_every_target_full_is_a_503_to_retry() {
    let be = api_backend();
    let cfg = api_config(be.addr, "").replace(
        "timeout_ms = 3000",
        "timeout_ms = 3000\nmax_connections = 1",
    );
    let gw = Gateway::start(&cfg);
    let addr = gw.addr;
    // The first `$connect` holds the only slot for 1.5 s.
    let first = std::thread::spawn(move || ws_connect(addr, "/?sleep=1500", ""));
    assert!(wait_until(Duration::from_secs(3), || be.request_count() == 1));
    let (head, _) = ws_connect(gw.addr, "/", "");
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    // (Kept open: its `$disconnect` call would take the slot again.)
    let (first_head, _first_ws) = first.join().unwrap();
    assert!(first_head.starts_with("HTTP/1.1 101"), "{first_head}");
    // The slot is back.
    let (head, _ws) = ws_connect(gw.addr, "/", "");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
}
