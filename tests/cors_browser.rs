//! CORS in a real browser: headless Chromium loads a page from one port and makes real
//! cross-origin fetches through ringgate on another: one simple GET, one preflighted PUT (custom
//! header, JSON body), a GET the gateway answers 404 and a POST it answers 405 (both readable),
//! and one to an API that does not allow the page's origin. The page posts
//! what it saw back to its own server and writes it into the DOM; the test asserts both, and
//! that the upstream never saw a preflight.
//!
//! Needs the Debian package `chromium` (installed by .ci/run).

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Stdio;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

type Slot = Arc<(Mutex<Option<String>>, Condvar)>;

fn page(gw: &str) -> String {
    format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>cors</title></head><body>
<pre id="out">pending</pre>
<script>
(async () => {{
  const out = {{}};
  try {{
    const r = await fetch("{gw}/shop/items/1");
    out.simple = {{ status: r.status, body: await r.text(), total: r.headers.get("x-total"),
                    secret: r.headers.get("x-secret") }};
  }} catch (e) {{ out.simple = {{ error: String(e) }}; }}
  try {{
    const r = await fetch("{gw}/shop/items/2", {{ method: "PUT",
      headers: {{ "content-type": "application/json", "x-custom": "yes" }},
      body: JSON.stringify({{ n: 2 }}) }});
    out.preflighted = {{ status: r.status, body: await r.text() }};
  }} catch (e) {{ out.preflighted = {{ error: String(e) }}; }}
  try {{
    const r = await fetch("{gw}/shop/nonexist");
    out.notfound = {{ status: r.status, body: await r.text() }};
  }} catch (e) {{ out.notfound = {{ error: String(e) }}; }}
  try {{
    const r = await fetch("{gw}/shop/items/4", {{ method: "POST", body: "x" }});
    out.notallowed = {{ status: r.status, body: await r.text() }};
  }} catch (e) {{ out.notallowed = {{ error: String(e) }}; }}
  try {{
    const r = await fetch("{gw}/other/items/3");
    out.denied = {{ status: r.status }};
  }} catch (e) {{ out.denied = {{ error: String(e) }}; }}
  const text = JSON.stringify(out);
  document.getElementById("out").textContent = text;
  await fetch("/result", {{ method: "POST", body: text }});
}})();
</script>
<img src="/hold" alt="">
</body></html>"#
    )
}

/// Serves the page, collects the posted result, and holds `/hold` (so the page's load event,
/// and with it `--dump-dom`, waits for the result).
fn page_server(gw_url: String) -> (u16, Slot) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let slot: Slot = Arc::new((Mutex::new(None), Condvar::new()));
    let s2 = slot.clone();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let (slot, gw_url) = (s2.clone(), gw_url.clone());
            thread::spawn(move || {
                let Some((line, _, body)) = read_raw_request(&mut s) else {
                    return;
                };
                let (ctype, resp) = if line.starts_with("GET / ") {
                    ("text/html", page(&gw_url))
                } else if line.starts_with("POST /result") {
                    let (m, cv) = &*slot;
                    *m.lock().unwrap() = Some(String::from_utf8_lossy(&body).into_owned());
                    cv.notify_all();
                    ("text/plain", "ok".to_string())
                } else if line.starts_with("GET /hold") {
                    let (m, cv) = &*slot;
                    let g = m.lock().unwrap();
                    let _ = cv.wait_timeout_while(g, Duration::from_secs(15), |v| v.is_none());
                    ("text/plain", String::new())
                } else {
                    ("text/plain", String::new())
                };
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{resp}",
                    resp.len()
                );
            });
        }
    });
    (port, slot)
}

#[test]
fn browser_sees_cors_through_gateway() {
    let origin = Origin::start(|r| {
        Response::ok(format!("{} {}", r.method, r.path))
            .header("x-total", "7")
            .header("x-secret", "not exposed")
    });
    // The page's origin is only known once its server is bound: bind first, then configure.
    let gw_port = free_port();
    let gw_url = format!("http://127.0.0.1:{gw_port}");
    let (page_port, slot) = page_server(gw_url.clone());
    let page_origin = format!("http://127.0.0.1:{page_port}");
    let gw = Gateway::start(&format!(
        r#"
[server]
listen = ["127.0.0.1:{gw_port}"]
workers = 2
state_dir = "@DIR@/state"
[admin]
listen = "@ADMIN@"
[[upstreams]]
name = "o"
targets = ["{}"]
[[apis]]
name = "shop"
base_path = "/shop"
cors = {{ allow_origins = ["{page_origin}"], allow_methods = ["GET", "PUT"], allow_headers = ["content-type", "x-custom"], expose_headers = ["x-total"], max_age_s = 5 }}
[[apis.routes]]
route = "GET /items/{{id}}"
integration = {{ type = "http", upstream = "o" }}
[[apis.routes]]
route = "PUT /items/{{id}}"
integration = {{ type = "http", upstream = "o" }}
[[apis]]
name = "other"
base_path = "/other"
cors = {{ allow_origins = ["https://somewhere.else.example"] }}
[[apis.routes]]
route = "GET /items/{{id}}"
integration = {{ type = "http", upstream = "o" }}
"#,
        origin.addr
    ));

    let profile = temp_dir("chromium-profile");
    let mut child = headless_chromium(&profile)
        .arg("--dump-dom")
        .arg(format!("http://127.0.0.1:{page_port}/"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let t0 = Instant::now();
    let result = {
        let (m, cv) = &*slot;
        let g = m.lock().unwrap();
        let (g, _) = cv
            .wait_timeout_while(g, Duration::from_secs(25), |v| v.is_none())
            .unwrap();
        g.clone()
    };
    // --dump-dom prints once the page has loaded (after the result, thanks to /hold).
    let mut dom = String::new();
    while t0.elapsed() < Duration::from_secs(30) {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut dom);
    }
    let _ = std::fs::remove_dir_all(&profile);

    let result = result.expect("the page never reported (did chromium start?)");
    let v: serde_json::Value = serde_json::from_str(&result).unwrap();
    // Simple request: readable, with the exposed header only.
    assert_eq!(v["simple"]["status"], 200, "{v}");
    assert_eq!(v["simple"]["body"], "GET /items/1", "{v}");
    assert_eq!(v["simple"]["total"], "7", "{v}");
    assert_eq!(v["simple"]["secret"], serde_json::Value::Null, "{v}");
    // Preflighted request: the preflight passed and the PUT went through.
    assert_eq!(v["preflighted"]["status"], 200, "{v}");
    assert_eq!(v["preflighted"]["body"], "PUT /items/2", "{v}");
    // The gateway's own 404 and 405 (a simple POST, no preflight) are readable too.
    assert_eq!(v["notfound"]["status"], 404, "{v}");
    assert_eq!(v["notfound"]["body"], r#"{"message":"Not Found"}"#, "{v}");
    assert_eq!(v["notallowed"]["status"], 405, "{v}");
    assert_eq!(
        v["notallowed"]["body"], r#"{"message":"Method Not Allowed"}"#,
        "{v}"
    );
    // Disallowed origin: the browser refused to hand over the response.
    assert!(v["denied"]["error"].is_string(), "{v}");
    // What the page wrote into its DOM is what it reported.
    assert!(dom.contains("\"preflighted\""), "DOM: {dom}");
    // The upstream saw the actual requests, never a preflight.
    let methods: Vec<String> = origin.requests().iter().map(|r| r.method.clone()).collect();
    assert!(methods.contains(&"PUT".to_string()), "{methods:?}");
    assert!(!methods.contains(&"OPTIONS".to_string()), "{methods:?}");
    drop(gw);
}
