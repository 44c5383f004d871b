//! The admin dashboard: `GET /dashboard/data` counts exactly the requests made and needs the
//! token; `GET /dashboard` takes the token as a header or `?token=`; and in headless Chromium
//! the page polls by itself and its DOM shows the request count and routes as they change.
//!
//! The browser test needs the Debian package `chromium` (installed by .ci/run).

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const TOKEN: &str = "dash+secret/1";
const BEARER: &str = "Bearer dash+secret/1";

fn config() -> String {
    r#"
[server]
listen = ["@LISTEN@"]
workers = 2
state_dir = "@DIR@/state"

[admin]
listen = "@ADMIN@"
token = "dash+secret/1"

[[apis]]
name = "shop"

[[apis.routes]]
route = "GET /hello"
integration = { type = "mock", status = 200, body = "hi" }

[[apis.routes]]
route = "GET /boom"
integration = { type = "mock", status = 503, body = "down" }
"#
    .to_string()
}

fn data(gw: &Gateway) -> serde_json::Value {
    let r = admin_get(gw.admin_addr, "/dashboard/data", Some(BEARER)).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    r.json()
}

/// Waits until the data shows `total` requests (metrics are recorded just after the response).
fn data_with_total(gw: &Gateway, total: u64) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    wait_until(Duration::from_secs(5), || {
        last = data(gw);
        last["total"] == total
    });
    last
}

/// Sum of `ringgate_requests_total` from `/metrics` (which, unlike the data, keeps no ring).
fn metrics_total(gw: &Gateway) -> u64 {
    let r = admin_get(gw.admin_addr, "/metrics", Some(BEARER)).unwrap();
    r.text()
        .lines()
        .filter(|l| l.starts_with("ringgate_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn route<'a>(d: &'a serde_json::Value, key: &str) -> &'a serde_json::Value {
    d["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == key)
        .unwrap_or_else(|| panic!("no route {key} in {d}"))
}

#[test]
fn data_counts_the_requests_made() {
    let gw = Gateway::start(&config());
    for _ in 0..5 {
        assert_eq!(gw.get("/hello").status, 200);
    }
    for _ in 0..2 {
        assert_eq!(gw.get("/boom").status, 503);
    }
    assert_eq!(gw.get("/nowhere").status, 404);
    // The first data call is the baseline of the recent window: make it see all 8.
    assert!(wait_until(Duration::from_secs(5), || metrics_total(&gw) == 8));
    let d = data(&gw);
    assert_eq!(d["total"], 8, "{d}");
    assert_eq!(d["status"]["2xx"], 5, "{d}");
    assert_eq!(d["status"]["4xx"], 1, "{d}");
    assert_eq!(d["status"]["5xx"], 2, "{d}");
    assert_eq!(d["error_rate"]["5xx"], 0.25, "{d}");
    assert_eq!(d["error_rate"]["4xx"], 0.125, "{d}");
    for q in ["p50", "p95", "p99"] {
        assert!(d["latency_ms"][q].as_f64().unwrap() > 0.0, "{d}");
    }
    let hello = route(&d, "GET /hello");
    assert_eq!(hello["api"], "shop");
    assert_eq!(hello["stage"], "$default");
    assert_eq!(hello["requests"], 5);
    assert_eq!(hello["5xx"], 0);
    let boom = route(&d, "GET /boom");
    assert_eq!(boom["requests"], 2);
    assert_eq!(boom["5xx"], 2);
    // Busiest first.
    assert_eq!(d["routes"][0]["route"], "GET /hello", "{d}");

    // A second poll has a baseline: the recent window sees only what came after.
    thread::sleep(Duration::from_millis(600));
    for _ in 0..3 {
        assert_eq!(gw.get("/boom").status, 503);
    }
    assert!(wait_until(Duration::from_secs(5), || metrics_total(&gw) == 11));
    let d = data(&gw);
    assert_eq!(d["total"], 11, "{d}");
    let recent = &d["recent"];
    assert!(recent.is_object(), "{d}");
    assert_eq!(recent["requests"], 3, "{d}");
    assert_eq!(recent["error_rate"]["5xx"], 1.0, "{d}");
    assert!(recent["rate_per_s"].as_f64().unwrap() > 0.0, "{d}");
    assert_eq!(route(&d, "GET /boom")["requests"], 5);
}

#[test]
fn dashboard_needs_the_token() {
    let gw = Gateway::start(&config());
    let get = |path: &str, auth: Option<&str>| admin_get(gw.admin_addr, path, auth).unwrap();
    // Data: header only.
    assert_eq!(get("/dashboard/data", None).status, 401);
    assert_eq!(get("/dashboard/data", Some("Bearer nope")).status, 401);
    assert_eq!(
        get("/dashboard/data?token=dash%2Bsecret%2F1", None).status,
        401
    );
    assert_eq!(get("/dashboard/data", Some(BEARER)).status, 200);
    // Page: header or ?token= (percent-decoded; `+` literal).
    assert_eq!(get("/dashboard", None).status, 401);
    assert_eq!(get("/dashboard?token=wrong", None).status, 401);
    assert_eq!(get("/dashboard?token=dash+secret", None).status, 401);
    for ok in [
        get("/dashboard", Some(BEARER)),
        get("/dashboard?token=dash%2Bsecret%2F1", None),
        get(&format!("/dashboard?x=1&token={TOKEN}"), None),
    ] {
        assert_eq!(ok.status, 200, "{}", ok.text());
        assert_eq!(ok.header("content-type"), Some("text/html; charset=utf-8"));
        assert!(ok.text().contains("/dashboard/data"));
    }
    // The query token opens nothing else.
    assert_eq!(get(&format!("/metrics?token={TOKEN}"), None).status, 401);
    let r = admin_request(gw.admin_addr, "POST", "/dashboard", Some(BEARER)).unwrap();
    assert_eq!(r.status, 405);
}

/// A pass-through proxy to the admin listener that, before forwarding each data poll, sends one
/// `GET /hello` through the gateway and waits until the metrics count it: so poll N sees
/// exactly `before + N` requests. Returns its port and the number of polls forwarded.
fn poll_driving_proxy(
    gw_addr: SocketAddr,
    admin: SocketAddr,
    before: u64,
) -> (u16, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let polls = Arc::new(AtomicUsize::new(0));
    let p2 = polls.clone();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let polls = p2.clone();
            thread::spawn(move || {
                let Some((line, headers, body)) = read_raw_request(&mut s) else {
                    return;
                };
                if line.starts_with("GET /dashboard/data") {
                    // One at a time: the page never overlaps its polls, but be safe.
                    let n = polls.fetch_add(1, Ordering::SeqCst) as u64 + 1;
                    let mut c = Client::connect(gw_addr);
                    c.send(b"GET /hello HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
                    let _ = c.read_response();
                    wait_until(Duration::from_secs(3), || {
                        admin_get(admin, "/dashboard/data", Some(BEARER))
                            .map(|r| r.json()["total"].as_u64().unwrap_or(0) >= before + n)
                            .unwrap_or(false)
                    });
                }
                let mut out = format!("{line}\r\n");
                for h in headers
                    .iter()
                    .filter(|h| !h.to_ascii_lowercase().starts_with("connection:"))
                {
                    out.push_str(h);
                    out.push_str("\r\n");
                }
                out.push_str("Connection: close\r\n\r\n");
                let Ok(mut up) = TcpStream::connect(admin) else {
                    return;
                };
                let _ = up.write_all(out.as_bytes());
                let _ = up.write_all(&body);
                let mut resp = Vec::new();
                let _ = up.read_to_end(&mut resp);
                let _ = s.write_all(&resp);
            });
        }
    });
    (port, polls)
}

/// The text content of the element with `id` in a dumped DOM (first text run after its tag).
fn text_of(dom: &str, id: &str) -> String {
    let tag = format!("id=\"{id}\"");
    let Some(i) = dom.find(&tag) else {
        return String::new();
    };
    let rest = &dom[i..];
    let start = rest.find('>').map(|j| j + 1).unwrap_or(0);
    let end = rest[start..].find('<').unwrap_or(0);
    rest[start..start + end].to_string()
}

#[test]
fn browser_page_updates_by_itself() {
    let gw = Gateway::start(&config());
    for _ in 0..3 {
        assert_eq!(gw.get("/hello").status, 200);
    }
    assert_eq!(gw.get("/boom").status, 503);
    data_with_total(&gw, 4);
    let (port, polls) = poll_driving_proxy(gw.addr, gw.admin_addr, 4);

    let profile = temp_dir("chromium-dashboard");
    let mut child = headless_chromium(&profile)
        // Virtual time: the page's 1 s timer fires without waiting; fetches still run for real.
        .arg("--virtual-time-budget=5500")
        .arg("--dump-dom")
        .arg(format!(
            "http://127.0.0.1:{port}/dashboard?token=dash%2Bsecret%2F1"
        ))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let mut out = child.stdout.take().unwrap();
    let reader = thread::spawn(move || {
        let mut dom = String::new();
        let _ = out.read_to_string(&mut dom);
        dom
    });
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let dom = reader.join().unwrap();
    let _ = std::fs::remove_dir_all(&profile);

    // The page polled several times by itself, each poll showing one more request.
    let updates: u64 = dom
        .split("data-updates=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no update counter in DOM: {dom}"));
    assert!(updates >= 3, "only {updates} updates; DOM: {dom}");
    assert!(polls.load(Ordering::SeqCst) as u64 >= updates);
    let total: u64 = text_of(&dom, "total")
        .replace(',', "")
        .parse()
        .unwrap_or_else(|_| panic!("no total in DOM: {dom}"));
    assert_eq!(total, 4 + updates, "DOM: {dom}");
    // Top routes, with the route names and their counts; rates after the second poll.
    assert!(dom.contains("GET /hello"), "DOM: {dom}");
    assert!(dom.contains("GET /boom"), "DOM: {dom}");
    assert!(
        dom.contains(&format!("<td>{}</td>", 3 + updates)),
        "DOM: {dom}"
    );
    assert_ne!(text_of(&dom, "rate"), "–", "DOM: {dom}");
    assert!(
        !text_of(&dom, "lat").is_empty() && text_of(&dom, "lat") != "–",
        "DOM: {dom}"
    );
    assert!(!text_of(&dom, "status").contains("error"), "DOM: {dom}");
}

#[test]
fn without_a_token_the_dashboard_is_open() {
    let gw = Gateway::start(&config().replace("token = \"dash+secret/1\"\n", ""));
    assert_eq!(gw.get("/hello").status, 200);
    let page = gw.admin_get("/dashboard");
    assert_eq!(page.status, 200, "{}", page.text());
    let mut d = serde_json::Value::Null;
    wait_until(Duration::from_secs(5), || {
        d = gw.admin_get("/dashboard/data").json();
        d["total"] == 1
    });
    assert_eq!(route(&d, "GET /hello")["requests"], 1, "{d}");
}
