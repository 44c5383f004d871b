//! The admin listener (/healthz, /metrics, bearer token) and the access log.

mod common;

use common::*;
use std::net::SocketAddr;
use std::time::Duration;

fn config(origin: SocketAddr) -> String {
    format!(
        r#"
[[upstreams]]
name = "o"
targets = ["{origin}"]

[[apis]]
name = "m"

[[apis.routes]]
route = "GET /a"
integration = {{ type = "mock", status = 200, body = "a" }}

[[apis.routes]]
route = "GET /p/{{x+}}"
integration = {{ type = "http", upstream = "o" }}
"#
    )
}

#[test]
fn healthz_answers_ok() {
    let gw = Gateway::start(&config(dead_addr()));
    let r = gw.admin_get("/healthz");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "ok");
    let r = gw.admin_get("/no-such-thing");
    assert_eq!(r.status, 404);
    assert_eq!(r.message(), "Not Found");
}

const A_200: &[&str] = &[
    "api=\"m\"",
    "stage=\"$default\"",
    "route=\"GET /a\"",
    "method=\"GET\"",
    "status=\"200\"",
];

#[test]
fn metrics_count_exactly_the_requests_made() {
    let origin = Origin::start(|r| {
        if r.path == "/p/slow" {
            Response::ok("slow").delay(Duration::from_millis(300))
        } else {
            Response::ok("fast")
        }
    });
    let gw = Gateway::start(&config(origin.addr));
    for _ in 0..3 {
        assert_eq!(gw.get("/a").status, 200);
    }
    for _ in 0..2 {
        assert_eq!(gw.get("/missing").status, 404);
    }
    let r = gw.request("DELETE /a HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 405);
    for _ in 0..4 {
        assert_eq!(gw.get("/p/x").status, 200);
    }
    assert_eq!(gw.get("/p/slow").status, 200);

    let proxied_200 = [
        "api=\"m\"",
        "stage=\"$default\"",
        "route=\"GET /p/{x+}\"",
        "method=\"GET\"",
        "status=\"200\"",
    ];
    // Metrics are recorded just after the response is written: allow a moment.
    let mut text = String::new();
    let settled = wait_until(Duration::from_secs(2), || {
        text = gw.metrics();
        metric_value(&text, "ringgate_requests_total", &proxied_200) == Some(5.0)
    });
    assert!(settled, "{text}");
    assert_eq!(
        metric_value(&text, "ringgate_requests_total", A_200),
        Some(3.0),
        "{text}"
    );
    let unmatched_404 = ["api=\"\"", "status=\"404\""];
    assert_eq!(
        metric_value(&text, "ringgate_requests_total", &unmatched_404),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            "ringgate_requests_total",
            &["method=\"DELETE\"", "status=\"405\""]
        ),
        Some(1.0),
        "{text}"
    );
    let total: f64 = metric_value(&text, "ringgate_requests_total", &[]).unwrap();
    assert_eq!(total, 11.0, "{text}");

    // The request-duration histogram: same labels but status.
    let route_a = [
        "api=\"m\"",
        "stage=\"$default\"",
        "route=\"GET /a\"",
        "method=\"GET\"",
    ];
    assert_eq!(
        metric_value(&text, "ringgate_request_duration_seconds_count", &route_a),
        Some(3.0),
        "{text}"
    );
    let mut inf = route_a.to_vec();
    inf.push("le=\"+Inf\"");
    assert_eq!(
        metric_value(&text, "ringgate_request_duration_seconds_bucket", &inf),
        Some(3.0)
    );
    assert!(text
        .lines()
        .filter(|l| l.starts_with("ringgate_request_duration_seconds_bucket{"))
        .all(|l| !l.contains("status=")));
    // The slow request (300 ms) is above the 0.25 s bucket and within the 0.5 s one.
    let p = ["route=\"GET /p/{x+}\""];
    let le = |b: &str| {
        let mut l = p.to_vec();
        let lb = format!("le=\"{b}\"");
        l.push(&lb);
        metric_value(&text, "ringgate_request_duration_seconds_bucket", &l).unwrap()
    };
    assert_eq!(le("0.25"), 4.0, "{text}");
    assert_eq!(le("0.5"), 5.0, "{text}");
    assert!(metric_value(&text, "ringgate_request_duration_seconds_sum", &p).unwrap() >= 0.3);

    // Upstream timing.
    assert_eq!(
        metric_value(
            &text,
            "ringgate_upstream_duration_seconds_count",
            &["upstream=\"o\""]
        ),
        Some(5.0),
        "{text}"
    );
    assert!(text.contains("ringgate_upstream_duration_seconds_bucket{upstream=\"o\",le="));
    // Other series named by the contract exist.
    for name in [
        "ringgate_connections_active",
        "ringgate_cache_hits_total",
        "ringgate_cache_misses_total",
        "ringgate_websocket_connections_active",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} missing:\n{text}"
        );
    }
    assert!(text.contains("# TYPE ringgate_throttled_total counter"));
}

#[test]
fn metrics_survive_a_reload() {
    let gw = Gateway::start(&config(dead_addr()));
    for _ in 0..2 {
        gw.get("/a");
    }
    let r = admin_request(gw.admin_addr, "POST", "/reload", None).unwrap();
    assert_eq!(r.status, 200);
    for _ in 0..3 {
        gw.get("/a");
    }
    let mut text = String::new();
    assert!(
        wait_until(Duration::from_secs(2), || {
            text = gw.metrics();
            metric_value(&text, "ringgate_requests_total", A_200) == Some(5.0)
        }),
        "{text}"
    );
    // One series per label set, not one per config generation.
    let lines = text
        .lines()
        .filter(|l| {
            l.starts_with("ringgate_requests_total{") && A_200.iter().all(|x| l.contains(x))
        })
        .count();
    assert_eq!(lines, 1, "{text}");
}

#[test]
fn connections_active_gauge_follows_open_connections() {
    let gw = Gateway::start(&config(dead_addr()));
    let value =
        |gw: &Gateway| metric_value(&gw.metrics(), "ringgate_connections_active", &[]).unwrap();
    assert_eq!(value(&gw), 0.0);
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut c = Client::connect(gw.addr);
        c.send(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n");
        c.read_response().unwrap();
        open.push(c);
    }
    assert_eq!(value(&gw), 3.0);
    drop(open);
    assert!(wait_until(Duration::from_secs(2), || value(&gw) == 0.0));
}

#[test]
fn admin_token_guards_everything_but_healthz() {
    let cfg = format!(
        "{}\n{}",
        HEADER.replace(
            "listen = \"@ADMIN@\"",
            "listen = \"@ADMIN@\"\ntoken = \"s3cret-token\""
        ),
        config(dead_addr())
    );
    let gw = Gateway::start(&cfg);
    let a = gw.admin_addr;
    let r = admin_get(a, "/metrics", None).unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(r.message(), "Unauthorized");
    assert_eq!(
        admin_get(a, "/metrics", Some("Bearer wrong"))
            .unwrap()
            .status,
        401
    );
    assert_eq!(
        admin_get(a, "/metrics", Some("Bearer s3cret-toke"))
            .unwrap()
            .status,
        401
    );
    assert_eq!(
        admin_get(a, "/metrics", Some("Bearer s3cret-token2"))
            .unwrap()
            .status,
        401
    );
    assert_eq!(
        admin_get(a, "/metrics", Some("s3cret-token"))
            .unwrap()
            .status,
        401
    );
    assert_eq!(
        admin_get(a, "/metrics", Some("Basic s3cret-token"))
            .unwrap()
            .status,
        401
    );
    let r = admin_get(a, "/metrics", Some("Bearer s3cret-token")).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.text().contains("ringgate_connections_active"));
    // The scheme name is case-insensitive (RFC 9110 11.1).
    let r = admin_get(a, "/metrics", Some("bearer s3cret-token")).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(admin_get(a, "/healthz", None).unwrap().status, 200);
    assert_eq!(
        admin_request(a, "POST", "/reload", None).unwrap().status,
        401
    );
    assert_eq!(
        admin_request(a, "POST", "/reload", Some("Bearer s3cret-token"))
            .unwrap()
            .status,
        200
    );
}

#[test]
fn access_log_writes_one_json_object_per_request() {
    let origin = Origin::fixed("ok");
    let cfg = format!(
        "{HEADER}\n[access_log]\npath = \"@DIR@/access.log\"\n{}",
        config(origin.addr)
    );
    let gw = Gateway::start(&cfg);
    let mut expected = Vec::new();
    for i in 0..5 {
        let r = gw.request(&format!(
            "GET /a?i={i} HTTP/1.1\r\nHost: t\r\nX-Request-Id: log-{i}\r\n\r\n"
        ));
        expected.push(("GET", "/a".to_string(), 200u64, format!("log-{i}")));
        assert_eq!(r.status, 200);
    }
    let r = gw.get("/p/up");
    expected.push((
        "GET",
        "/p/up".to_string(),
        200,
        r.header("x-request-id").unwrap().to_string(),
    ));
    let r = gw.get("/missing");
    expected.push((
        "GET",
        "/missing".to_string(),
        404,
        r.header("x-request-id").unwrap().to_string(),
    ));
    let r = gw.request("POST /p/x HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");
    expected.push((
        "POST",
        "/p/x".to_string(),
        405,
        r.header("x-request-id").unwrap().to_string(),
    ));

    let path = gw.dir.join("access.log");
    let mut text = String::new();
    let complete = wait_until(Duration::from_secs(3), || {
        text = std::fs::read_to_string(&path).unwrap_or_default();
        text.lines().count() >= expected.len()
    });
    assert!(
        complete,
        "access log has {} lines:\n{text}",
        text.lines().count()
    );
    std::thread::sleep(Duration::from_millis(300));
    text = std::fs::read_to_string(&path).unwrap();
    let mut entries: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert_eq!(entries.len(), expected.len(), "{text}");
    for (method, path, status, id) in expected {
        let pos = entries
            .iter()
            .position(|e| e["request_id"] == serde_json::json!(id))
            .unwrap_or_else(|| panic!("no line for request {id}:\n{text}"));
        let e = entries.remove(pos);
        assert_eq!(e["method"], serde_json::json!(method), "{e}");
        assert_eq!(e["path"], serde_json::json!(path), "{e}");
        assert_eq!(e["status"], serde_json::json!(status), "{e}");
        // RFC 3339 UTC time, e.g. 2026-11-25T13:20:03Z.
        let t = e["time"].as_str().unwrap();
        let b = t.as_bytes();
        assert!(
            b.len() == 20 && b[4] == b'-' && b[10] == b'T' && b[19] == b'Z',
            "{t}"
        );
    }
}

#[test]
fn access_log_can_be_turned_off_per_stage() {
    let cfg = format!(
        r#"{HEADER}
[access_log]
path = "@DIR@/access.log"

[[apis]]
name = "quiet"

[apis.stages."$default"]
access_log = true

[apis.stages.hush]
access_log = false

[[apis.routes]]
route = "GET /a"
integration = {{ type = "mock", body = "a" }}
"#
    );
    let gw = Gateway::start(&cfg);
    let r1 = gw.get("/a");
    let r2 = gw.get("/hush/a");
    assert_eq!(r1.status, 200);
    assert_eq!(r2.status, 200);
    let path = gw.dir.join("access.log");
    assert!(wait_until(Duration::from_secs(3), || {
        std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .count()
            >= 1
    }));
    std::thread::sleep(Duration::from_millis(400));
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains(r1.header("x-request-id").unwrap()));
    assert!(!text.contains(r2.header("x-request-id").unwrap()));
}
