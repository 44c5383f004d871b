//! Traffic control against the real binary: throttles (exact across two workers), the WAF
//! (IP lists, per-IP rate, regex rules, the shipped SQLi/XSS set), CORS, usage plans with
//! quotas that survive `kill -9`, and the metrics.

mod common;

use common::*;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const MOCK: &str = r#"integration = { type = "mock", status = 200, body = "ok" }"#;

fn get_on(c: &mut Client, path: &str, extra: &str) -> RawResponse {
    c.send(format!("GET {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n").as_bytes());
    c.read_response().expect("response")
}

#[test]
fn route_throttle_is_exact_across_two_workers() {
    // 2 workers (the harness default), rate 100/s, burst 20; a flood of ~3 s from 8 keep-alive
    // connections (spread over both workers by SO_REUSEPORT) gets 100 * t + 20, within 2%.
    let gw = Gateway::start(&format!(
        r#"
[[apis]]
name = "a"
[[apis.routes]]
route = "GET /t"
{MOCK}
throttle = {{ rate = 100, burst = 20 }}
"#
    ));
    let ok = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let first = Instant::now();
    let mut hs = Vec::new();
    for _ in 0..8 {
        let (ok, refused, stop, addr) = (ok.clone(), refused.clone(), stop.clone(), gw.addr);
        hs.push(thread::spawn(move || {
            let mut c = Client::connect(addr);
            let mut last_ok = None;
            while !stop.load(Ordering::Relaxed) {
                let r = get_on(&mut c, "/t", "");
                match r.status {
                    200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        last_ok = Some(Instant::now());
                    }
                    429 => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    s => panic!("unexpected status {s}"),
                }
            }
            last_ok
        }));
    }
    thread::sleep(Duration::from_millis(3000));
    stop.store(true, Ordering::Relaxed);
    let end = Instant::now();
    for h in hs {
        h.join().unwrap();
    }
    let t = (end - first).as_secs_f64();
    let got = ok.load(Ordering::Relaxed) as f64;
    let want = 100.0 * t + 20.0;
    assert!(
        (got - want).abs() <= want * 0.02,
        "got {got} in {t:.3}s, want {want:.1} ± 2%"
    );
    assert!(
        refused.load(Ordering::Relaxed) > 100,
        "the flood was not refused"
    );
    let m = gw.metrics();
    let th = metric_value(
        &m,
        "ringgate_throttled_total",
        &["api=\"a\"", "route=\"GET /t\"", "reason=\"route\""],
    )
    .unwrap_or(0.0);
    assert_eq!(th as u64, refused.load(Ordering::Relaxed), "{m}");
}

#[test]
fn throttled_answer_has_retry_after_and_json() {
    let gw = Gateway::start(&format!(
        r#"
[server]
listen = ["@LISTEN@"]
workers = 2
state_dir = "@DIR@/state"
throttle = {{ rate = 0.5, burst = 2 }}
[admin]
listen = "@ADMIN@"
[[apis]]
name = "a"
[apis.stages.prod]
throttle = {{ rate = 1000, burst = 1000 }}
[[apis.routes]]
route = "GET /t"
{MOCK}
"#
    ));
    let mut c = Client::connect(gw.addr);
    assert_eq!(get_on(&mut c, "/prod/t", "").status, 200);
    assert_eq!(get_on(&mut c, "/prod/t", "").status, 200);
    let r = get_on(&mut c, "/prod/t", "");
    assert_eq!(r.status, 429);
    assert_eq!(r.message(), "Too Many Requests");
    let ra: u64 = r
        .header("retry-after")
        .expect("retry-after")
        .parse()
        .unwrap();
    assert!((1..=2).contains(&ra), "retry-after {ra}");
    // The connection stays usable.
    assert_eq!(get_on(&mut c, "/prod/t", "").status, 429);
    let m = gw.metrics();
    assert_eq!(
        metric_value(
            &m,
            "ringgate_throttled_total",
            &["stage=\"prod\"", "reason=\"server\""]
        ),
        Some(2.0),
        "{m}"
    );
}

#[test]
fn server_throttle_counts_requests_that_match_no_route() {
    // As nginx's limit_req in the server block or an account-level throttle: 404s and 405s
    // spend the gateway's tokens too, so a scan cannot run past it.
    let gw = Gateway::start(&format!(
        r#"
[server]
listen = ["@LISTEN@"]
workers = 1
state_dir = "@DIR@/state"
throttle = {{ rate = 0.5, burst = 3 }}
[admin]
listen = "@ADMIN@"
[[apis]]
name = "a"
[[apis.routes]]
route = "GET /t"
{MOCK}
"#
    ));
    let mut c = Client::connect(gw.addr);
    assert_eq!(get_on(&mut c, "/nowhere", "").status, 404);
    c.send(b"POST /t HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(c.read_response().unwrap().status, 405);
    assert_eq!(get_on(&mut c, "/t", "").status, 200);
    let r = get_on(&mut c, "/nowhere", "");
    assert_eq!(r.status, 429);
    assert!(r.header("retry-after").is_some());
    assert_eq!(get_on(&mut c, "/t", "").status, 429);
    let m = gw.metrics();
    assert_eq!(
        metric_value(
            &m,
            "ringgate_throttled_total",
            &["api=\"\"", "reason=\"server\""]
        ),
        Some(1.0),
        "{m}"
    );
}

#[test]
fn stage_throttle_is_shared_by_its_routes() {
    let gw = Gateway::start(&format!(
        r#"
[[apis]]
name = "a"
[apis.stages.s]
throttle = {{ rate = 1, burst = 3 }}
[[apis.routes]]
route = "GET /x"
{MOCK}
[[apis.routes]]
route = "GET /y"
{MOCK}
"#
    ));
    let mut c = Client::connect(gw.addr);
    let st: Vec<u16> = ["/s/x", "/s/y", "/s/x", "/s/y"]
        .iter()
        .map(|p| get_on(&mut c, p, "").status)
        .collect();
    assert_eq!(st, vec![200, 200, 200, 429]);
}

#[test]
fn waf_ip_lists() {
    let deny = Gateway::start(&format!(
        "[waf]\nip_deny = [\"10.0.0.0/8\", \"127.0.0.0/16\"]\n[[apis]]\nname = \"a\"\n[[apis.routes]]\nroute = \"GET /x\"\n{MOCK}\n"
    ));
    let r = deny.get("/x");
    assert_eq!(r.status, 403);
    assert_eq!(r.message(), "Forbidden");
    // A denied address learns nothing about which paths exist.
    let r = deny.get("/no-such-route");
    assert_eq!(r.status, 403);
    assert_eq!(r.message(), "Forbidden");
    let m = deny.metrics();
    assert_eq!(
        metric_value(&m, "ringgate_waf_ip_refused_total", &[]),
        Some(2.0)
    );

    let allow_other = Gateway::start(&format!(
        "[waf]\nip_allow = [\"192.168.0.0/16\", \"2001:db8::/32\"]\n[[apis]]\nname = \"a\"\n[[apis.routes]]\nroute = \"GET /x\"\n{MOCK}\n"
    ));
    assert_eq!(allow_other.get("/x").status, 403);

    let allow_me = Gateway::start(&format!(
        "[waf]\nip_allow = [\"127.0.0.1/32\", \"::1\"]\nip_deny = [\"127.0.0.2\"]\n[[apis]]\nname = \"a\"\n[[apis.routes]]\nroute = \"GET /x\"\n{MOCK}\n"
    ));
    assert_eq!(allow_me.get("/x").status, 200);
    assert_eq!(allow_me.get("/no-such-route").status, 404);
}

#[test]
fn waf_rate_per_ip() {
    let gw = Gateway::start(&format!(
        "[waf]\nrate_per_ip = {{ rate = 0.2, burst = 3 }}\n[[apis]]\nname = \"a\"\n[[apis.routes]]\nroute = \"GET /x\"\n{MOCK}\n"
    ));
    let mut c = Client::connect(gw.addr);
    let st: Vec<u16> = (0..5).map(|_| get_on(&mut c, "/x", "").status).collect();
    assert_eq!(st, vec![200, 200, 200, 429, 429]);
    let r = get_on(&mut c, "/x", "");
    assert!(r.header("retry-after").is_some());
    let m = gw.metrics();
    assert_eq!(
        metric_value(&m, "ringgate_throttled_total", &["reason=\"ip\""]),
        Some(3.0),
        "{m}"
    );
}

/// Requests that match no route (404, 405) take from the per-IP bucket like routed ones and are
/// refused with 429 once it is empty: a scanner is limited, and counted with empty labels.
#[test]
fn waf_rate_per_ip_limits_unrouted_requests() {
    let gw = Gateway::start(&format!(
        "[waf]\nrate_per_ip = {{ rate = 0.2, burst = 3 }}\n[[apis]]\nname = \"a\"\n[[apis.routes]]\nroute = \"GET /x\"\n{MOCK}\n"
    ));
    let mut c = Client::connect(gw.addr);
    let st: Vec<u16> = (0..3)
        .map(|i| get_on(&mut c, &format!("/scan/{i}"), "").status)
        .collect();
    assert_eq!(st, vec![404, 404, 404]);
    let r = get_on(&mut c, "/scan/again", "");
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.message(), "Too Many Requests");
    assert!(r.header("retry-after").is_some());
    assert!(!r.closes());
    // A wrong method on a known path (405) is refused too, and so is the routed request.
    c.send(b"DELETE /x HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(c.read_response().unwrap().status, 429);
    assert_eq!(get_on(&mut c, "/x", "").status, 429);
    let m = gw.metrics();
    assert_eq!(
        metric_value(
            &m,
            "ringgate_throttled_total",
            &["api=\"\"", "route=\"\"", "reason=\"ip\""]
        ),
        Some(2.0),
        "{m}"
    );
}

#[test]
fn waf_rules_by_target_with_metrics() {
    let origin = Origin::echo_path();
    let gw = Gateway::start(&format!(
        r#"
[waf]
body_max_bytes = 64
rules = [
  {{ name = "sqli", target = "query", pattern = "(?i)union\\s+select", action = "block" }},
  {{ name = "probe", target = "path", pattern = "^/p/admin", action = "count" }},
  {{ name = "bot", target = "header.x-bot", pattern = "evil", action = "block" }},
  {{ name = "xss", target = "body", pattern = "(?i)<script", action = "block" }},
]
[[upstreams]]
name = "o"
targets = ["{}"]
[[apis]]
name = "a"
[[apis.routes]]
route = "ANY /p/{{x+}}"
integration = {{ type = "http", upstream = "o" }}
"#,
        origin.addr
    ));
    let mut c = Client::connect(gw.addr);
    assert_eq!(get_on(&mut c, "/p/x?q=1", "").status, 200);
    let r = get_on(&mut c, "/p/x?q=1%27%20UNION+SELECT+pw", "");
    assert_eq!(r.status, 403);
    assert_eq!(r.message(), "Forbidden");
    assert_eq!(get_on(&mut c, "/p/admin", "").status, 200);
    assert_eq!(get_on(&mut c, "/p/x", "X-Bot: very evil\r\n").status, 403);
    assert_eq!(get_on(&mut c, "/p/x", "X-Other: evil\r\n").status, 200);
    // A body that arrives after the head, in two pieces: buffered, then scanned.
    let body = "{\"c\":\"<SCRIPT>alert(1)</script>\"}";
    c.send(
        format!(
            "POST /p/x HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    thread::sleep(Duration::from_millis(50));
    c.send(&body.as_bytes()[..10]);
    thread::sleep(Duration::from_millis(50));
    c.send(&body.as_bytes()[10..]);
    assert_eq!(c.read_response().unwrap().status, 403);
    // A clean body passes and reaches the upstream whole.
    let clean = "{\"c\":\"hello\"}";
    c.send(
        format!(
            "POST /p/y HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{clean}",
            clean.len()
        )
        .as_bytes(),
    );
    assert_eq!(c.read_response().unwrap().status, 200);
    assert_eq!(origin.last_request().body, clean.as_bytes());
    // Escaped in a JSON body, or percent-encoded in a form body: scanned decoded, whatever
    // type the client claims.
    for (ct, body) in [
        ("application/json", r#"{"c":"\u003cscript>"}"#),
        ("application/x-www-form-urlencoded", "c=%3Cscript%3E"),
        ("text/plain", r#"{"c":"\u003cscript>"}"#),
        ("application/octet-stream", "c=%3Cscript%3E"),
    ] {
        c.send(
            format!(
                "POST /p/x HTTP/1.1\r\nHost: t\r\nContent-Type: {ct}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
        assert_eq!(c.read_response().unwrap().status, 403, "{ct}");
    }
    // Two types: which one a backend reads is anyone's guess, so neither is taken.
    let mut c2 = Client::connect(gw.addr);
    c2.send(b"POST /p/x HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}");
    let r = c2.read_response().unwrap();
    assert_eq!(r.status, 400);
    assert!(
        r.message().contains("Content-Type given twice"),
        "{}",
        r.message()
    );
    // Past body_max_bytes nothing is looked at.
    let long = format!("{}<script>", "a".repeat(100));
    c.send(
        format!(
            "POST /p/z HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{long}",
            long.len()
        )
        .as_bytes(),
    );
    assert_eq!(c.read_response().unwrap().status, 200);
    let m = gw.metrics();
    let v = |rule: &str| {
        metric_value(
            &m,
            "ringgate_waf_rule_matches_total",
            &[&format!("rule=\"{rule}\"")],
        )
    };
    assert_eq!(v("sqli"), Some(1.0), "{m}");
    assert_eq!(v("probe"), Some(1.0), "{m}");
    assert_eq!(v("bot"), Some(1.0), "{m}");
    assert_eq!(v("xss"), Some(5.0), "{m}");
    // Blocked requests never reached the upstream.
    assert!(origin
        .requests()
        .iter()
        .all(|r| !r.path.contains("UNION") && !r.path.contains("%27")));
}

#[test]
fn shipped_waf_rule_set_blocks_sqli_and_xss() {
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/config/waf-common.toml");
    let gw = Gateway::start(&format!(
        "[waf]\nrule_files = [\"{rules}\"]\n[[apis]]\nname = \"a\"\n[[apis.routes]]\nroute = \"ANY /{{p+}}\"\n{MOCK}\n"
    ));
    let mut c = Client::connect(gw.addr);
    for bad in [
        "/items?id=1%27%20OR%20%271%27=%271",
        "/items?id=1+UNION+ALL+SELECT+password+FROM+users",
        "/items?id=1;%20DROP%20TABLE%20users",
        "/items?id=1%27--",
        "/items?id=sleep(5)",
        "/search?q=%3Cscript%3Ealert(1)%3C/script%3E",
        "/search?q=%3Cimg%20src=x%20onerror=alert(1)%3E",
        "/search?u=javascript:alert(1)",
        "/%3Cscript%3E",
    ] {
        assert_eq!(get_on(&mut c, bad, "").status, 403, "{bad} passed");
    }
    for good in [
        "/items?id=42",
        "/search?q=union+station+timetable",
        "/search?q=select+a+seat",
        "/search?q=o%27reilly+books",
        "/items/abc-def",
    ] {
        assert_eq!(get_on(&mut c, good, "").status, 200, "{good} refused");
    }
    let mut post = |body: &str| {
        c.send(
            format!(
                "POST /form HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
        c.read_response().unwrap().status
    };
    for bad in [
        "name=x' or 'a'='a",
        "id=1; DROP TABLE users",
        r#"{"q":"1; delete from orders"}"#,
        "user=admin'--",
        "user=admin' /* x */",
    ] {
        assert_eq!(post(bad), 403, "body {bad} passed");
    }
    for good in [
        r#"{"text":"hello; drop me a line","dash":"--"}"#,
        "note=it's fine -- really",
    ] {
        assert_eq!(post(good), 200, "body {good} refused");
    }
    // Scanners are only counted.
    assert_eq!(
        get_on(&mut c, "/items", "User-Agent: sqlmap/1.7\r\n").status,
        200
    );
    let m = gw.metrics();
    assert_eq!(
        metric_value(
            &m,
            "ringgate_waf_rule_matches_total",
            &["rule=\"scanner-user-agent\"", "action=\"count\""]
        ),
        Some(1.0)
    );
}

#[test]
fn waf_config_errors_name_the_key() {
    let (out, _) = check(&format!(
        "[waf]\nip_deny = [\"10.0.0.0/40\"]\n[[apis]]\nname = \"a\"\n[[apis.routes]]\nroute = \"GET /x\"\n{MOCK}\n"
    ));
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("waf.ip_deny") && e.contains("10.0.0.0/40"),
        "{e}"
    );
    let (out, _) = check(&format!(
        "[waf]\nrules = [{{ name = \"r\", target = \"cookie\", pattern = \"x\" }}]\n[[apis]]\nname = \"a\"\n[[apis.routes]]\nroute = \"GET /x\"\n{MOCK}\n"
    ));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("waf.rules[0].target"), "{e}");
    // A bad pattern names its rule's key; a body rule that could read nothing is refused.
    for (rule, want) in [
        (
            r#"{ name = "r", target = "query", pattern = "(unclosed" }"#,
            "waf.rules[1].pattern",
        ),
        (
            r#"{ name = "r", target = "body", pattern = "x" }"#,
            "waf.rules[1].target",
        ),
    ] {
        let (out, _) = check(&format!(
            "[waf]\nbody_max_bytes = 0\nrules = [{{ name = \"ok\", target = \"path\", pattern = \"x\" }}, {rule}]\n[[apis]]\nname = \"a\"\n[[apis.routes]]\nroute = \"GET /x\"\n{MOCK}\n"
        ));
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && e.contains(want), "{rule}: {e}");
    }
    // An error in a rule file names that file, its line and the rule's key there.
    let dir = temp_dir("waf-rule-file");
    let rf = dir.join("bad-rules.toml");
    std::fs::write(
        &rf,
        "[[rules]]\nname = \"a\"\ntarget = \"query\"\npattern = \"x\"\n\n[[rules]]\nname = \"b\"\ntarget = \"cookie\"\npattern = \"y\"\n",
    )
    .unwrap();
    let (out, _) = check(&format!(
        "[waf]\nrule_files = [\"{}\"]\n[[apis]]\nname = \"a\"\n[[apis.routes]]\nroute = \"GET /x\"\n{MOCK}\n",
        rf.display()
    ));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("bad-rules.toml:8: key `rules[1].target`"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
    let (out, _) = check(&format!(
        "[[apis]]\nname = \"a\"\n[[apis.routes]]\nroute = \"GET /x\"\n{MOCK}\nthrottle = {{ rate = 0, burst = 1 }}\n"
    ));
    let e = String::from_utf8_lossy(&out.stderr);
    // The line of the route table (the harness prepends a [server] header).
    assert!(
        e.contains(".toml:17: key `apis[0].routes[0].throttle`"),
        "{e}"
    );
}

/// A rule file is read like the config: an unknown key, a missing key or a value of the wrong
/// type names the rule file, the line and the key path in it.
#[test]
fn waf_rule_file_errors_name_the_key_path() {
    let dir = temp_dir("waf-rule-file-keys");
    let rf = dir.join("bad-rules.toml");
    let ok = "[[rules]]\nname = \"a\"\ntarget = \"query\"\npattern = \"x\"\n\n";
    for (rules, want) in [
        (
            "[[rules]]\nname = \"b\"\ntarget = \"path\"\npatern = \"y\"\n",
            "bad-rules.toml:9: key `rules[1].patern`: unknown key",
        ),
        (
            "[[rules]]\nname = \"b\"\ntarget = \"path\"\npattern = \"y\"\n\n[extra]\nx = 1\n",
            "bad-rules.toml:11: key `extra`: unknown key",
        ),
        (
            "[[rules]]\nname = \"b\"\ntarget = \"path\"\npattern = \"y\"\naction = 3\n",
            "bad-rules.toml:10: key `rules[1].action`: ",
        ),
        (
            "[[rules]]\nname = \"b\"\ntarget = \"path\"\n",
            "bad-rules.toml:6: key `rules[1].pattern`: required key is missing",
        ),
    ] {
        std::fs::write(&rf, format!("{ok}{rules}")).unwrap();
        let (out, _) = check(&format!(
            "[waf]\nrule_files = [\"{}\"]\n[[apis]]\nname = \"a\"\n[[apis.routes]]\nroute = \"GET /x\"\n{MOCK}\n",
            rf.display()
        ));
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && e.contains(want),
            "want {want}, got {e}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn cors_config(origin: std::net::SocketAddr) -> String {
    format!(
        r#"
[[upstreams]]
name = "o"
targets = ["{origin}"]
[[apis]]
name = "a"
cors = {{ allow_origins = ["https://app.example.com"], allow_methods = ["GET", "PUT"], allow_headers = ["content-type", "x-api-key"], expose_headers = ["x-total"], max_age_s = 600, allow_credentials = true }}
[[apis.routes]]
route = "GET /r/{{id}}"
integration = {{ type = "http", upstream = "o" }}
[[apis.routes]]
route = "PUT /r/{{id}}"
integration = {{ type = "http", upstream = "o" }}
[[apis]]
name = "plain"
base_path = "/plain"
[[apis.routes]]
route = "ANY /{{p+}}"
integration = {{ type = "http", upstream = "o" }}
"#
    )
}

#[test]
fn cors_preflight_answered_by_gateway() {
    let origin = Origin::start(|_| {
        Response::ok("up")
            .header("access-control-allow-origin", "*")
            .header("x-total", "3")
    });
    let gw = Gateway::start(&cors_config(origin.addr));
    let mut c = Client::connect(gw.addr);
    c.send(b"OPTIONS /r/1 HTTP/1.1\r\nHost: t\r\nOrigin: https://app.example.com\r\nAccess-Control-Request-Method: PUT\r\nAccess-Control-Request-Headers: content-type\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(r.header("vary"), Some("Origin"));
    assert_eq!(r.header("access-control-allow-methods"), Some("GET, PUT"));
    assert_eq!(
        r.header("access-control-allow-headers"),
        Some("content-type, x-api-key")
    );
    assert_eq!(r.header("access-control-max-age"), Some("600"));
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    // Disallowed origin: answered, but without any CORS header.
    c.send(b"OPTIONS /r/1 HTTP/1.1\r\nHost: t\r\nOrigin: https://evil.example.com\r\nAccess-Control-Request-Method: PUT\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 204);
    assert!(
        r.headers
            .iter()
            .all(|(n, _)| !n.to_ascii_lowercase().starts_with("access-control-")),
        "{:?}",
        r.headers
    );
    // A method no route of the path takes: still answered for the API (the browser then
    // sees DELETE is not among the allowed methods), never a 405 without CORS headers.
    c.send(b"OPTIONS /r/1 HTTP/1.1\r\nHost: t\r\nOrigin: https://app.example.com\r\nAccess-Control-Request-Method: DELETE\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 204);
    assert_eq!(r.header("access-control-allow-methods"), Some("GET, PUT"));
    assert_eq!(
        origin.request_count(),
        0,
        "a preflight reached the upstream"
    );

    // Actual requests: allowed origin echoed (the upstream's CORS header replaced).
    let r = get_on(&mut c, "/r/1", "Origin: https://app.example.com\r\n");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers_named("access-control-allow-origin"),
        vec!["https://app.example.com"]
    );
    assert_eq!(r.header("access-control-expose-headers"), Some("x-total"));
    assert_eq!(r.header("access-control-allow-credentials"), Some("true"));
    assert!(r.headers_named("vary").contains(&"Origin"));
    // A disallowed origin, or none: no CORS header at all, the upstream's own included (an
    // upstream that allows everything must not undo the gateway's allowlist).
    for origin_hdr in ["Origin: https://evil.example.com\r\n", ""] {
        let r = get_on(&mut c, "/r/1", origin_hdr);
        assert_eq!(r.status, 200);
        assert!(
            r.headers
                .iter()
                .all(|(n, _)| !n.to_ascii_lowercase().starts_with("access-control-")),
            "{origin_hdr:?}: {:?}",
            r.headers
        );
    }
    // An API without cors forwards OPTIONS untouched.
    c.send(b"OPTIONS /plain/x HTTP/1.1\r\nHost: t\r\nOrigin: https://app.example.com\r\nAccess-Control-Request-Method: PUT\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(origin.last_request().method, "OPTIONS");
}

/// A key metered on a route that does not require one is named in the access log, the
/// request refused by its quota included.
#[test]
fn a_metered_key_is_named_in_the_access_log() {
    let state = temp_dir("plan-log");
    let cfg = plan_config(&state, 1).replace(
        "[admin]",
        "[access_log]\npath = \"@DIR@/access.log\"\n[admin]",
    );
    let gw = Gateway::start(&cfg);
    let mut c = Client::connect(gw.addr);
    let key = "x-api-key: alice-key-0123456789abcdef\r\n";
    assert_eq!(
        get_on(&mut c, "/prod/x", &format!("{key}x-request-id: m-1\r\n")).status,
        200
    );
    let r = get_on(&mut c, "/prod/x", &format!("{key}x-request-id: m-2\r\n"));
    assert_eq!(r.status, 429);
    assert_eq!(r.message(), "Limit Exceeded");
    let path = gw.dir.join("access.log");
    let mut lines = Vec::new();
    assert!(wait_until(Duration::from_secs(3), || {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        lines = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["request_id"] == "m-1" || e["request_id"] == "m-2")
            .collect();
        lines.len() == 2
    }));
    for l in &lines {
        assert_eq!(l["api_key"], "alice", "{l}");
    }
    let _ = std::fs::remove_dir_all(&state);
}

fn plan_config(state: &std::path::Path, limit: u64) -> String {
    format!(
        r#"
[server]
listen = ["@LISTEN@"]
workers = 2
state_dir = "{}"
[admin]
listen = "@ADMIN@"
[[apis]]
name = "shop"
[apis.stages.prod]
[[apis.routes]]
route = "GET /x"
{MOCK}
[[usage_plans]]
name = "basic"
apis = ["shop/prod"]
quota = {{ limit = {limit}, period = "day" }}
[[usage_plans]]
name = "fast"
apis = ["shop/prod"]
throttle = {{ rate = 0.5, burst = 2 }}
[[api_keys]]
name = "alice"
value = "alice-key-0123456789abcdef"
plans = ["basic"]
[[api_keys]]
name = "bob"
value = "bob-key-0123456789abcdefgh"
plans = ["fast"]
"#,
        state.display()
    )
}

#[test]
fn quota_limit_and_usage_survive_kill_9() {
    let state = temp_dir("quota");
    let alice = "x-api-key: alice-key-0123456789abcdef\r\n";
    {
        let gw = Gateway::start(&plan_config(&state, 5));
        let mut c = Client::connect(gw.addr);
        for _ in 0..3 {
            assert_eq!(get_on(&mut c, "/prod/x", alice).status, 200);
        }
        let u = gw.admin_get("/usage-plans/basic/usage?key=alice").json();
        assert_eq!(u["used"], 3, "{u}");
        assert_eq!(u["remaining"], 2, "{u}");
        // Counts reach the disk within 200 ms on an idle machine (the writer thread's
        // period); on a loaded one the thread may run late, so wait for the file to show
        // them rather than for a fixed time (a count never written fails below).
        let file = state.join("usage-plans.json");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            let text = std::fs::read_to_string(&file).unwrap_or_default();
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            let written = v["counters"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|e| e["plan"] == "basic" && e["used"] == 3));
            if written {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        // Dropping the harness's Gateway sends SIGKILL.
    }
    let gw = Gateway::start(&plan_config(&state, 5));
    let u = gw.admin_get("/usage-plans/basic/usage?key=alice").json();
    assert_eq!(u["used"], 3, "{u}");
    let mut c = Client::connect(gw.addr);
    assert_eq!(get_on(&mut c, "/prod/x", alice).status, 200);
    assert_eq!(get_on(&mut c, "/prod/x", alice).status, 200);
    let r = get_on(&mut c, "/prod/x", alice);
    assert_eq!(r.status, 429);
    assert_eq!(r.message(), "Limit Exceeded");
    // Retry-After: seconds until the quota's UTC period ends (at most a month).
    let ra: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=31 * 86_400).contains(&ra), "{ra}");
    let u = gw.admin_get("/usage-plans/basic/usage?key=alice").json();
    assert_eq!(
        (u["used"].as_u64(), u["remaining"].as_u64()),
        (Some(5), Some(0)),
        "{u}"
    );
    assert_eq!(u["period"], "day");
    // No key, or a key of no plan: not metered.
    assert_eq!(get_on(&mut c, "/prod/x", "").status, 200);
    assert_eq!(
        get_on(
            &mut c,
            "/prod/x",
            "x-api-key: not-a-key-0123456789abcdef\r\n"
        )
        .status,
        200
    );
    // Two keys on a metered route (no key auth): the one metered and the one the upstream
    // reads could differ, so the request is refused, not served unmetered.
    let r = get_on(
        &mut c,
        "/prod/x",
        &format!("x-api-key: not-a-key-0123456789abcdef\r\n{alice}"),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.message(), "Bad Request: more than one x-api-key header");
    let m = gw.metrics();
    assert_eq!(
        metric_value(&m, "ringgate_throttled_total", &["reason=\"quota\""]),
        Some(1.0)
    );
    // A clean stop writes the final counts too; a reload keeps them.
    gw.write_config(&plan_config(&state, 6));
    gw.reload_signal();
    assert!(wait_until(Duration::from_secs(5), || gw
        .admin_get("/usage-plans/basic/usage?key=alice")
        .json()["remaining"]
        == 1));
    assert_eq!(get_on(&mut c, "/prod/x", alice).status, 200);
    assert_eq!(get_on(&mut c, "/prod/x", alice).status, 429);
    // Unknown plan or key: 404; missing key parameter: 400.
    assert_eq!(
        gw.admin_get("/usage-plans/nope/usage?key=alice").status,
        404
    );
    assert_eq!(gw.admin_get("/usage-plans/basic/usage?key=bob").status, 404);
    assert_eq!(gw.admin_get("/usage-plans/basic/usage").status, 400);
    // A key that is not UTF-8, or given twice, is refused saying so (not "required").
    let r = gw.admin_get("/usage-plans/basic/usage?key=%FF");
    assert_eq!(r.status, 400);
    assert!(r.json()["message"].as_str().unwrap().contains("not UTF-8"));
    // A malformed escape is a bad request (as in a path), not a key that is not there.
    for q in ["key=%zz", "key=ali%2", "key=alice%"] {
        let r = gw.admin_get(&format!("/usage-plans/basic/usage?{q}"));
        assert_eq!(r.status, 400, "{q}");
        let m = r.json()["message"].as_str().unwrap().to_string();
        assert!(m.contains("malformed percent-encoding"), "{q}: {m}");
    }
    for q in [
        "key=alice&key=bob",
        "key=alice&key",
        "key&key=alice",
        "key=alice&k%65y=bob",
    ] {
        let r = gw.admin_get(&format!("/usage-plans/basic/usage?{q}"));
        assert_eq!(r.status, 400, "{q}");
        let m = r.json()["message"].as_str().unwrap().to_string();
        assert!(m.contains("more than once"), "{q}: {m}");
    }
    // An encoded name is the name.
    assert_eq!(
        gw.admin_get("/usage-plans/basic/usage?k%65y=alice").status,
        200
    );
    let _ = std::fs::remove_dir_all(&state);
}

/// One admin request with a JSON body.
fn admin_json(gw: &Gateway, method: &str, path: &str, body: &str) -> RawResponse {
    let mut c = Client::connect(gw.admin_addr);
    c.send(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    c.read_response().expect("admin response")
}

#[test]
fn a_key_deleted_and_created_again_starts_its_quota_afresh() {
    let state = temp_dir("quota-recreate");
    let carol = "x-api-key: carol-key-0123456789abcdef\r\n";
    let new_key = r#"{"name":"carol","plans":["basic"],"value":"carol-key-0123456789abcdef"}"#;
    let used = |gw: &Gateway| {
        gw.admin_get("/usage-plans/basic/usage?key=carol").json()["used"]
            .as_u64()
            .unwrap()
    };
    {
        let gw = Gateway::start(&plan_config(&state, 2));
        assert_eq!(admin_json(&gw, "POST", "/api-keys", new_key).status, 201);
        let mut c = Client::connect(gw.addr);
        let st: Vec<u16> = (0..3)
            .map(|_| get_on(&mut c, "/prod/x", carol).status)
            .collect();
        assert_eq!(st, [200, 200, 429]);
        assert_eq!(used(&gw), 2);
        assert_eq!(admin_json(&gw, "DELETE", "/api-keys/carol", "").status, 200);
        assert_eq!(
            get_on(&mut c, "/prod/x", carol).status,
            200,
            "no key: not metered"
        );
        // A new key of the same name (even the same value) is a new key, as in API Gateway.
        assert_eq!(admin_json(&gw, "POST", "/api-keys", new_key).status, 201);
        assert_eq!(used(&gw), 0);
        assert_eq!(get_on(&mut c, "/prod/x", carol).status, 200);
        assert_eq!(used(&gw), 1);
        thread::sleep(Duration::from_millis(700));
    }
    // The new key's count is the one kept across a restart.
    let gw = Gateway::start(&plan_config(&state, 2));
    assert_eq!(used(&gw), 1);
    let mut c = Client::connect(gw.addr);
    assert_eq!(get_on(&mut c, "/prod/x", carol).status, 200);
    assert_eq!(get_on(&mut c, "/prod/x", carol).status, 429);
    let _ = std::fs::remove_dir_all(&state);
}

#[test]
fn plan_throttle_per_key() {
    let state = temp_dir("plan-th");
    let gw = Gateway::start(&plan_config(&state, 100));
    let bob = "x-api-key: bob-key-0123456789abcdefgh\r\n";
    let mut c = Client::connect(gw.addr);
    let st: Vec<u16> = (0..3)
        .map(|_| get_on(&mut c, "/prod/x", bob).status)
        .collect();
    assert_eq!(st, vec![200, 200, 429]);
    // Another key has its own allowance.
    assert_eq!(
        get_on(
            &mut c,
            "/prod/x",
            "x-api-key: alice-key-0123456789abcdef\r\n"
        )
        .status,
        200
    );
    let m = gw.metrics();
    assert_eq!(
        metric_value(&m, "ringgate_throttled_total", &["reason=\"plan\""]),
        Some(1.0)
    );
    // A plan without a quota counts nothing, and its usage says so instead of a made-up 0.
    let u = gw.admin_get("/usage-plans/fast/usage?key=bob").json();
    assert!(u["used"].is_null() && u["period"].is_null(), "{u}");
    assert!(u["message"].as_str().unwrap().contains("no quota"), "{u}");
    let _ = std::fs::remove_dir_all(&state);
}

#[test]
fn reload_keeps_bucket_state_and_counters() {
    let cfg = |extra: &str| {
        format!(
            r#"
[[apis]]
name = "a"
[apis.stages.s]
throttle = {{ rate = 0.1, burst = 3 }}
[[apis.routes]]
route = "GET /x"
{MOCK}
throttle = {{ rate = 0.1, burst = 2 }}
{extra}
"#
        )
    };
    let gw = Gateway::start(&cfg(""));
    let mut c = Client::connect(gw.addr);
    assert_eq!(get_on(&mut c, "/s/x", "").status, 200);
    assert_eq!(get_on(&mut c, "/s/x", "").status, 200);
    assert_eq!(get_on(&mut c, "/s/x", "").status, 429);
    // A reload that adds a route (same stage) must not refill the buckets.
    gw.write_config(&cfg(&format!(
        "[[apis.routes]]\nroute = \"GET /y\"\n{MOCK}\n"
    )));
    gw.reload_signal();
    assert!(wait_until(Duration::from_secs(5), || gw
        .stderr()
        .contains("config reloaded")));
    // The route's bucket is still empty (refilled, this would be 200).
    assert_eq!(get_on(&mut c, "/s/x", "").status, 429);
    // The stage's bucket kept its state too: 2 of 3 tokens were taken (refused requests gave
    // theirs back), so the new route gets one request, then the stage refuses.
    assert_eq!(get_on(&mut c, "/s/y", "").status, 200);
    let r = get_on(&mut c, "/s/y", "");
    assert_eq!(r.status, 429);
    let m = gw.metrics();
    assert_eq!(
        metric_value(
            &m,
            "ringgate_throttled_total",
            &["route=\"GET /x\"", "reason=\"route\""]
        ),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        metric_value(
            &m,
            "ringgate_throttled_total",
            &["route=\"GET /y\"", "reason=\"stage\""]
        ),
        Some(1.0),
        "{m}"
    );
}

#[test]
fn usage_endpoint_needs_the_admin_token() {
    let state = temp_dir("usage-token");
    let cfg = plan_config(&state, 5).replace(
        "[admin]\nlisten = \"@ADMIN@\"",
        "[admin]\nlisten = \"@ADMIN@\"\ntoken = \"s3cret-admin\"",
    );
    let gw = Gateway::start(&cfg);
    let path = "/usage-plans/basic/usage?key=alice";
    let r = admin_request(gw.admin_addr, "GET", path, None).unwrap();
    assert_eq!(r.status, 401);
    let r = admin_request(gw.admin_addr, "GET", path, Some("Bearer s3cret-admin")).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["remaining"], 5);
    let r = admin_request(gw.admin_addr, "POST", path, Some("Bearer s3cret-admin")).unwrap();
    assert_eq!(r.status, 405);
    let _ = std::fs::remove_dir_all(&state);
}

#[test]
fn body_rules_with_expect_continue() {
    let origin = Origin::echo_path();
    let gw = Gateway::start(&format!(
        r#"
[waf]
rules = [
  {{ name = "xss", target = "body", pattern = "(?i)<script", action = "block" }},
  {{ name = "ua", target = "header.User-Agent", pattern = "sqlmap", action = "block" }},
  {{ name = "q", target = "query", pattern = "evil", action = "block" }},
  {{ name = "admin", target = "path", pattern = "^/p/admin", action = "block" }},
  {{ name = "seen", target = "body", pattern = "^", action = "count" }},
]
[[upstreams]]
name = "o"
targets = ["{}"]
[[apis]]
name = "a"
[[apis.routes]]
route = "POST /p"
integration = {{ type = "http", upstream = "o" }}
[[apis.routes]]
route = "POST /p/{{x+}}"
integration = {{ type = "http", upstream = "o" }}
"#,
        origin.addr
    ));
    // A request the path, query or header rules refuse is answered at once, without a
    // `100 Continue` and without waiting for the body it announced (which never comes).
    for (target, extra) in [
        ("/p", "User-Agent: sqlmap/1.7\r\n"),
        ("/p?a=evil", ""),
        ("/p/admin/x", ""),
    ] {
        let mut c = Client::connect(gw.addr);
        c.send(
            format!(
                "POST {target} HTTP/1.1\r\nHost: t\r\n{extra}Expect: 100-continue\r\nContent-Length: 10\r\n\r\n"
            )
            .as_bytes(),
        );
        let r = c.read_response().expect("final response");
        assert_eq!(r.status, 403, "{target} {extra}");
    }
    let seen = || {
        metric_value(
            &gw.metrics(),
            "ringgate_waf_rule_matches_total",
            &["rule=\"seen\""],
        )
    };
    assert_eq!(seen(), Some(0.0));
    for (body, want) in [("<script>x", 403), ("harmless", 200)] {
        let mut c = Client::connect(gw.addr);
        c.send(
            format!(
                "POST /p HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        // The gateway asks for the body (to scan it) instead of waiting for it forever.
        let r = c.read_response().expect("100 Continue");
        assert_eq!(r.status, 100);
        c.send(body.as_bytes());
        let r = c.read_response().expect("final response");
        assert_eq!(r.status, want, "{body}");
    }
    assert_eq!(origin.request_count(), 1);
    assert_eq!(origin.last_request().body, b"harmless");
    // The body rules ran for the two requests the head's rules let through.
    assert_eq!(seen(), Some(2.0));
}

#[test]
fn extra_headers_do_not_leak_into_the_next_response() {
    let gw = Gateway::start(&format!(
        r#"
[[apis]]
name = "a"
cors = {{ allow_origins = ["https://app.example.com"] }}
[[apis.routes]]
route = "GET /x"
{MOCK}
throttle = {{ rate = 0.1, burst = 1 }}
"#
    ));
    let mut c = Client::connect(gw.addr);
    let o = "Origin: https://app.example.com\r\n";
    assert_eq!(get_on(&mut c, "/x", o).status, 200);
    let r = get_on(&mut c, "/x", o);
    assert_eq!(r.status, 429);
    // The refusal carries CORS (so the page can read it) and Retry-After.
    assert!(r.header("retry-after").is_some());
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    // Next on the same connection: a bad request answered before routing.
    c.send(b"GET /x HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 400);
    assert!(r.header("retry-after").is_none(), "{:?}", r.headers);
    assert!(r.header("access-control-allow-origin").is_none());
}

/// A browser app must be able to read the gateway's own refusals: a WAF 403 to an allowed
/// origin carries the CORS headers (a disallowed origin still gets none).
#[test]
fn waf_refusal_carries_cors_headers() {
    let origin = Origin::start(|_| Response::ok("up"));
    let cfg = format!(
        "[waf]\nrules = [{{ name = \"evil\", target = \"query\", pattern = \"evil\", action = \"block\" }}]\n{}",
        cors_config(origin.addr)
    );
    let gw = Gateway::start(&cfg);
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /r/1?q=evil HTTP/1.1\r\nHost: t\r\nOrigin: https://app.example.com\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    c.send(b"GET /r/1?q=evil HTTP/1.1\r\nHost: t\r\nOrigin: https://evil.example.com\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 403);
    assert!(r.header("access-control-allow-origin").is_none());
    assert_eq!(r.header("vary"), Some("Origin"));
    // A preflight the WAF refuses is a refusal like the others: CORS headers and Vary.
    c.send(b"OPTIONS /r/1?q=evil HTTP/1.1\r\nHost: t\r\nOrigin: https://app.example.com\r\nAccess-Control-Request-Method: PUT\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(r.header("vary"), Some("Origin"));
    assert!(r.header("access-control-allow-methods").is_none());
    // Allowed requests keep their CORS headers, once.
    c.send(b"GET /r/1 HTTP/1.1\r\nHost: t\r\nOrigin: https://app.example.com\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200);
    let n = r
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("access-control-allow-origin"))
        .count();
    assert_eq!(n, 1);
}

#[test]
fn body_over_the_limit_is_refused_as_its_routes_answer() {
    // The 413 for a declared length over `max_body_bytes` comes once the route is known: it
    // carries the API's CORS headers and counts under the route, as the chunked body's does.
    let origin = Origin::start(|_| Response::ok("up"));
    let cfg = format!(
        "{HEADER}\n[server.limits]\nmax_body_bytes = 100\n{}",
        cors_config(origin.addr)
    );
    let gw = Gateway::start(&cfg);
    let mut c = Client::connect(gw.addr);
    c.send(b"PUT /r/1 HTTP/1.1\r\nHost: t\r\nOrigin: https://app.example.com\r\nContent-Length: 101\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 413);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(r.header("vary"), Some("Origin"));
    assert!(c.is_closed_within(Duration::from_secs(2)));
    let m = gw.metrics();
    assert_eq!(
        metric_value(
            &m,
            "ringgate_requests_total",
            &["api=\"a\"", "route=\"PUT /r/{id}\"", "status=\"413\""]
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(origin.request_count(), 0);
}

#[test]
fn mock_headers_cannot_take_the_gateways_own() {
    // On an API with `cors` the gateway's CORS answer is the only one; everywhere, the
    // headers the gateway writes (request id, date, cache status, framing, hop-by-hop) would be
    // sent twice. Both are config errors that name the header.
    let origin = Origin::start(|_| Response::ok("up"));
    let mock = |h: &str| {
        cors_config(origin.addr).replace(
            r#"route = "PUT /r/{id}"
integration = { type = "http", upstream = "o" }"#,
            &format!(
                r#"route = "PUT /r/{{id}}"
integration = {{ type = "mock", headers = {{ "{h}" = "x" }} }}"#
            ),
        )
    };
    for h in [
        "Access-Control-Allow-Origin",
        "access-control-allow-credentials",
        "x-request-id",
        "Date",
        "x-cache",
        "upgrade",
        "keep-alive",
        "trailer",
        "proxy-authenticate",
        "content-length",
        "age",
    ] {
        let (out, _) = check(&mock(h));
        let e = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "{h}");
        assert!(
            e.contains("check.toml:") && e.contains(&format!("mock header `{h}`")),
            "{h}: {e}"
        );
    }
    let (out, _) = check(&mock("x-custom"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Two spellings of one name are one name.
    let (out, _) = check(&mock("x-custom").replace(
        r#"headers = { "x-custom" = "x" }"#,
        r#"headers = { "vary" = "a", "Vary" = "b" }"#,
    ));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("given twice"));
    // On the CORS API the gateway's `Vary: Origin` is the only Origin listed.
    let gw = Gateway::start(&mock("x-custom").replace(
        r#"headers = { "x-custom" = "x" }"#,
        r#"headers = { "vary" = "Origin, Accept" }"#,
    ));
    let r = gw.request(
        "PUT /r/1 HTTP/1.1\r\nHost: t\r\nOrigin: https://app.example.com\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    let vary = r.headers_named("vary").join(", ");
    assert_eq!(
        vary.to_ascii_lowercase().matches("origin").count(),
        1,
        "{vary}"
    );
    assert!(vary.contains("Accept"), "{vary}");
    drop(gw);
    // Without `cors` a mock may answer CORS itself.
    let plain = mock("x-custom").replace(
        r#"cors = { allow_origins = ["https://app.example.com"], allow_methods = ["GET", "PUT"], allow_headers = ["content-type", "x-api-key"], expose_headers = ["x-total"], max_age_s = 600, allow_credentials = true }"#,
        "",
    );
    let plain = plain.replace(
        r#"headers = { "x-custom" = "x" }"#,
        r#"headers = { "access-control-allow-origin" = "*" }"#,
    );
    let gw = Gateway::start(&plain);
    let r = gw.request(
        "PUT /r/1 HTTP/1.1\r\nHost: t\r\nOrigin: https://a.example\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
}

/// Cache hits carry the CORS headers of the request they answer (the stored entry does not).
#[test]
fn cache_hits_carry_cors_headers() {
    let origin = Origin::start(|_| Response::ok("up").header("access-control-allow-origin", "*"));
    let gw = Gateway::start(&format!(
        r#"
[[upstreams]]
name = "o"
targets = ["{}"]
[[apis]]
name = "a"
cors = {{ allow_origins = ["https://app.example.com"] }}
[apis.stages."$default"]
cache = {{ enabled = true, ttl_s = 60 }}
[[apis.routes]]
route = "GET /r/{{id}}"
integration = {{ type = "http", upstream = "o" }}
"#,
        origin.addr
    ));
    let mut c = Client::connect(gw.addr);
    for want in ["miss", "hit"] {
        c.send(b"GET /r/1 HTTP/1.1\r\nHost: t\r\nOrigin: https://app.example.com\r\n\r\n");
        let r = c.read_response().unwrap();
        assert_eq!(r.header("x-cache"), Some(want));
        let acao: Vec<&str> = r
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("access-control-allow-origin"))
            .map(|(_, v)| v.as_str())
            .collect();
        // The gateway's CORS replaces the upstream's, on misses and on hits.
        assert_eq!(acao, vec!["https://app.example.com"], "{want}");
    }
    // A hit for another (disallowed) origin gets none.
    c.send(b"GET /r/1 HTTP/1.1\r\nHost: t\r\nOrigin: https://evil.example.com\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!(r.header("x-cache"), Some("hit"));
    assert!(r.header("access-control-allow-origin").is_none());
}

/// The gateway's own 404 (no route) and 405 (path routed under other methods) carry the CORS
/// headers of the API the request addressed (host, base path and stage), as its other
/// refusals do, so a browser app can read them; nothing when no API with `cors` (or more than
/// one API) claims the path.
#[test]
fn gateway_404_and_405_carry_the_addressed_apis_cors() {
    let origin = Origin::start(|_| Response::ok("up"));
    let gw = Gateway::start(&format!(
        r#"
[waf]
ip_deny = ["192.0.2.0/24"]
[[upstreams]]
name = "o"
targets = ["{}"]
[[apis]]
name = "shop"
base_path = "/shop"
cors = {{ allow_origins = ["https://app.example.com"], expose_headers = ["x-total"] }}
[apis.stages.prod]
[[apis.routes]]
route = "GET /items/{{id}}"
integration = {{ type = "http", upstream = "o" }}
[[apis]]
name = "plain"
base_path = "/plain"
[[apis.routes]]
route = "GET /x"
integration = {{ type = "http", upstream = "o" }}
[[apis]]
name = "hosted"
hosts = ["h.example"]
cors = {{ allow_origins = ["https://h.example.com"] }}
[[apis.routes]]
route = "GET /y"
integration = {{ type = "http", upstream = "o" }}
[[apis]]
name = "twin1"
base_path = "/twin"
[[apis.routes]]
route = "GET /a"
integration = {{ type = "http", upstream = "o" }}
[[apis]]
name = "twin2"
base_path = "/twin"
cors = {{ allow_origins = ["https://app.example.com"] }}
[[apis.routes]]
route = "GET /b"
integration = {{ type = "http", upstream = "o" }}
"#,
        origin.addr
    ));
    let mut c = Client::connect(gw.addr);
    let app = "Origin: https://app.example.com\r\n";
    let send = |c: &mut Client, method: &str, path: &str, host: &str, extra: &str| {
        c.send(format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n").as_bytes());
        c.read_response().expect("response")
    };
    // 404 inside the shop's prod stage: readable by the allowed origin.
    let r = send(&mut c, "GET", "/shop/prod/nonexist", "t", app);
    assert_eq!(r.status, 404);
    assert_eq!(r.text(), r#"{"message":"Not Found"}"#);
    assert_eq!(
        r.headers_named("access-control-allow-origin"),
        vec!["https://app.example.com"]
    );
    assert_eq!(r.header("access-control-expose-headers"), Some("x-total"));
    assert_eq!(r.headers_named("vary"), vec!["Origin"]);
    // 405: the path's API; the Allow header is kept.
    let r = send(&mut c, "POST", "/shop/prod/items/2", "t", app);
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    // A disallowed origin, or none: no CORS header, but Vary (the answer depends on Origin).
    for extra in ["Origin: https://evil.example.com\r\n", ""] {
        let r = send(&mut c, "GET", "/shop/prod/nonexist", "t", extra);
        assert_eq!(r.status, 404);
        assert!(r.header("access-control-allow-origin").is_none());
        assert_eq!(r.headers_named("vary"), vec!["Origin"]);
    }
    // Outside any CORS API's stage: the stage-less shop path, an API without cors, no API at
    // all, and a prefix two APIs share (which one cannot be told).
    for path in [
        "/shop/nonexist",
        "/shop/dev/items/1",
        "/plain/zz",
        "/nowhere",
        "/twin/zz",
    ] {
        let r = send(&mut c, "GET", path, "t", app);
        assert_eq!(r.status, 404, "{path}");
        assert!(r.header("access-control-allow-origin").is_none(), "{path}");
        assert!(r.header("vary").is_none(), "{path}");
    }
    // By host: the host's API (no base path, `$default` stage) claims every path of it.
    let h = "Origin: https://h.example.com\r\n";
    let r = send(&mut c, "GET", "/zz", "h.example:80", h);
    assert_eq!(r.status, 404);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://h.example.com")
    );
    let r = send(&mut c, "DELETE", "/y", "H.Example", h);
    assert_eq!(r.status, 405);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://h.example.com")
    );
    let r = send(&mut c, "GET", "/zz", "other.example", h);
    assert_eq!(r.status, 404);
    assert!(r.header("access-control-allow-origin").is_none());
    // A preflight to a path without routes is answered for the API it addresses (as API
    // Gateway answers every preflight of a CORS API): the browser then reads the 404.
    let r = send(
        &mut c,
        "OPTIONS",
        "/shop/prod/nonexist",
        "t",
        "Origin: https://app.example.com\r\nAccess-Control-Request-Method: GET\r\n",
    );
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert!(r.header("vary").is_some_and(|v| v.contains("Origin")));
    // Outside every CORS API: no preflight answer, a plain 404.
    let r = send(
        &mut c,
        "OPTIONS",
        "/zz",
        "other.example",
        "Origin: https://app.example.com\r\nAccess-Control-Request-Method: GET\r\n",
    );
    assert_eq!(r.status, 404);
    assert!(r.header("access-control-allow-origin").is_none());
    // Routed requests are unchanged, and the connection lived through every refusal.
    let r = send(&mut c, "GET", "/shop/prod/items/1", "t", app);
    assert_eq!((r.status, r.text().as_str()), (200, "up"));
    assert_eq!(
        r.headers_named("access-control-allow-origin"),
        vec!["https://app.example.com"]
    );
    assert_eq!(origin.request_count(), 1);
}

/// A request whose path is refused while its head is read (`%2F`, `;`, a dot segment) gets
/// its 400 with the CORS headers of the API it addressed, so a browser app reads the message
/// instead of a network error; an `https://*` entry allows any https origin.
#[test]
fn path_refusals_carry_the_addressed_apis_cors() {
    let gw = Gateway::start(&format!(
        r#"
[[apis]]
name = "shop"
base_path = "/shop"
cors = {{ allow_origins = ["https://*"] }}
[apis.stages.prod]
[[apis.routes]]
route = "GET /items/{{id}}"
{MOCK}
[[apis]]
name = "plain"
base_path = "/plain"
[[apis.routes]]
route = "GET /x/{{id}}"
{MOCK}
"#
    ));
    for path in [
        "/shop/prod/items/a%2Fb",
        "/shop/prod/items/a;b",
        "/shop/prod/items/../x",
    ] {
        let mut c = Client::connect(gw.addr);
        c.send(
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nOrigin: https://any.example\r\n\r\n")
                .as_bytes(),
        );
        let r = c.read_response().expect("response");
        assert_eq!(r.status, 400, "{path}");
        assert_eq!(
            r.header("access-control-allow-origin"),
            Some("https://any.example"),
            "{path}"
        );
        assert_eq!(r.headers_named("vary"), vec!["Origin"], "{path}");
    }
    // A preflight for such a path gets them too (its 400 is the answer).
    let mut c = Client::connect(gw.addr);
    c.send(b"OPTIONS /shop/prod/items/a%2Fb HTTP/1.1\r\nHost: t\r\nOrigin: https://any.example\r\nAccess-Control-Request-Method: PUT\r\n\r\n");
    let r = c.read_response().expect("response");
    assert_eq!(r.status, 400);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://any.example")
    );
    // An http origin is not covered by `https://*`; an API without cors gets none.
    for (path, origin) in [
        ("/shop/prod/items/a%2Fb", "http://any.example"),
        ("/plain/x/a%2Fb", "https://any.example"),
    ] {
        let mut c = Client::connect(gw.addr);
        c.send(format!("GET {path} HTTP/1.1\r\nHost: t\r\nOrigin: {origin}\r\n\r\n").as_bytes());
        let r = c.read_response().expect("response");
        assert_eq!(r.status, 400, "{path}");
        assert!(
            r.header("access-control-allow-origin").is_none(),
            "{path} {origin}"
        );
    }
    // Routed requests of the shop: any https origin is echoed.
    let mut c = Client::connect(gw.addr);
    let r = get_on(
        &mut c,
        "/shop/prod/items/1",
        "Origin: https://other.example:8443\r\n",
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://other.example:8443")
    );
}

/// CORS entries no browser could ever match are config errors naming the API's `cors` key.
#[test]
fn cors_entries_no_browser_matches_are_refused() {
    for (cors, want) in [
        (r#"allow_origins = ["https://*.example.com"]"#, "wildcard"),
        (r#"allow_origins = ["http://h:80"]"#, "write `http://h`"),
        (
            r#"allow_origins = ["https://a.example.com/app"]"#,
            "without a path",
        ),
        (
            r#"allow_origins = ["https://a.example"], allow_methods = ["get"]"#,
            "`GET`",
        ),
        (
            r#"allow_origins = ["https://a.example"], allow_headers = ["*"], allow_credentials = true"#,
            "allow_headers",
        ),
    ] {
        let (out, _) = check(&format!(
            "[[apis]]\nname = \"a\"\ncors = {{ {cors} }}\n[[apis.routes]]\nroute = \"GET /x\"\n{MOCK}\n"
        ));
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cors}");
        assert!(
            e.contains("key `apis[0].cors`") && e.contains(want),
            "{cors}: {e}"
        );
    }
}

/// The origin-dependent CORS headers make every answer of a CORS API vary on `Origin`: a
/// shared cache must not give an allowed origin the variant stored for another (or for none).
/// Exactly one `Origin` in the answer's `Vary`, also when the upstream lists it itself, on
/// misses and cache hits; nothing added on an API without `cors`.
#[test]
fn every_cors_answer_varies_on_origin_once() {
    let origin = Origin::start(|r| {
        let resp = Response::ok("up");
        if r.path.contains("dup") {
            resp.header("Vary", "origin")
        } else if r.path.contains("enc") {
            resp.header("Vary", "Accept-Encoding")
        } else {
            resp
        }
    });
    let gw = Gateway::start(&format!(
        r#"
[[upstreams]]
name = "o"
targets = ["{}"]
[[apis]]
name = "a"
base_path = "/a"
cors = {{ allow_origins = ["https://app.example.com"] }}
[[apis.routes]]
route = "GET /r/{{id}}"
integration = {{ type = "http", upstream = "o" }}
[[apis.routes]]
route = "GET /m"
integration = {{ type = "mock", status = 200, body = "mocked" }}
[[apis]]
name = "c"
base_path = "/c"
cors = {{ allow_origins = ["https://app.example.com"] }}
[apis.stages."$default"]
cache = {{ enabled = true, ttl_s = 60 }}
[[apis.routes]]
route = "GET /r/{{id}}"
integration = {{ type = "http", upstream = "o" }}
[[apis]]
name = "plain"
base_path = "/plain"
[[apis.routes]]
route = "GET /r/{{id}}"
integration = {{ type = "http", upstream = "o" }}
"#,
        origin.addr
    ));
    let mut c = Client::connect(gw.addr);
    let origins = [
        "",
        "Origin: https://evil.example.com\r\n",
        "Origin: https://app.example.com\r\n",
    ];
    // How many times `Origin` is listed over all the answer's Vary fields.
    let origin_tokens = |r: &RawResponse| {
        r.headers_named("vary")
            .iter()
            .flat_map(|v| v.split(','))
            .filter(|t| t.trim().eq_ignore_ascii_case("origin"))
            .count()
    };
    for o in origins {
        for path in ["/a/r/1", "/a/r/dup", "/a/m"] {
            let r = get_on(&mut c, path, o);
            assert_eq!(r.status, 200, "{path} {o:?}");
            assert_eq!(origin_tokens(&r), 1, "{path} {o:?}: {:?}", r.headers);
        }
        let r = get_on(&mut c, "/a/r/enc", o);
        assert_eq!(origin_tokens(&r), 1, "{o:?}: {:?}", r.headers);
        assert!(r.headers_named("vary").contains(&"Accept-Encoding"));
        let r = get_on(&mut c, "/plain/r/1", o);
        assert!(r.header("vary").is_none(), "{o:?}: {:?}", r.headers);
    }
    // Cached: the stored answer lists Origin (so entries are kept per origin); misses and
    // hits still list it once.
    for o in origins {
        for want in ["miss", "hit"] {
            let r = get_on(&mut c, "/c/r/dup", o);
            assert_eq!(r.header("x-cache"), Some(want), "{o:?}");
            assert_eq!(origin_tokens(&r), 1, "{want} {o:?}: {:?}", r.headers);
        }
        let r = get_on(&mut c, "/c/r/1", o);
        assert_eq!(origin_tokens(&r), 1, "{o:?}: {:?}", r.headers);
    }
}

#[test]
fn slow_body_under_waf_or_sigv4_buffering_gets_408_and_the_worker_lives() {
    // A body that stops arriving while the gateway buffers it (to scan it, or to hash a signed
    // request) is answered 408 after header_timeout_ms, with the access log on: the head must
    // still be there for the answer (CORS headers) and the log line.
    let origin = Origin::echo_path();
    let waf = r#"
[waf]
rules = [{ name = "xss", target = "body", pattern = "(?i)<script", action = "block" }]
"#;
    let sigv4 = r#"
[[sigv4_credentials]]
access_key = "AKIDEXAMPLE"
secret_key = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
region = "us-east-1"
service = "execute-api"
principal = "ci"
"#;
    for (stage, extra, auth) in [("waf", waf, "none"), ("sigv4", sigv4, "sigv4")] {
        let gw = Gateway::start(&format!(
            r#"
[server]
listen = ["@LISTEN@"]
workers = 1
state_dir = "@DIR@/state"
[server.limits]
header_timeout_ms = 300
[admin]
listen = "@ADMIN@"
[access_log]
path = "@DIR@/access.log"
{extra}
[[upstreams]]
name = "o"
targets = ["{}"]
[[apis]]
name = "a"
cors = {{ allow_origins = ["https://app.example"] }}
[[apis.routes]]
route = "POST /p"
integration = {{ type = "http", upstream = "o" }}
auth = "{auth}"
"#,
            origin.addr
        ));
        // On the SigV4 route the head must pass what the head alone can show (a known key,
        // region, service and a current date), or it is refused before the body is read; the
        // signature itself is only checked once the body is there.
        let creds = if auth == "sigv4" {
            let out = std::process::Command::new("date")
                .args(["-u", "+%Y%m%dT%H%M%SZ"])
                .output()
                .unwrap();
            let now = String::from_utf8(out.stdout).unwrap().trim().to_string();
            format!(
                "X-Amz-Date: {now}\r\nAuthorization: AWS4-HMAC-SHA256 \
                 Credential=AKIDEXAMPLE/{}/us-east-1/execute-api/aws4_request, \
                 SignedHeaders=host, Signature={}\r\n",
                &now[..8],
                "0".repeat(64)
            )
        } else {
            String::new()
        };
        for _ in 0..2 {
            let mut c = Client::connect(gw.addr);
            c.send(
                format!(
                    "POST /p HTTP/1.1\r\nHost: t\r\nOrigin: https://app.example\r\n{creds}\
                     Content-Length: 100\r\n\r\nhalf"
                )
                .as_bytes(),
            );
            let r = c
                .read_response()
                .expect("an answer, not a dropped connection");
            assert_eq!(r.status, 408, "{stage}: {}", r.text());
            assert_eq!(
                r.header("access-control-allow-origin"),
                Some("https://app.example"),
                "{stage}"
            );
        }
        // The only worker still serves.
        let mut c = Client::connect(gw.addr);
        c.send(b"GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n");
        assert_eq!(c.read_response().unwrap().status, 404, "{stage}");
        assert!(
            !gw.stderr().contains("panicked"),
            "{stage}: {}",
            gw.stderr()
        );
        let log = std::fs::read_to_string(gw.dir.join("access.log")).unwrap_or_default();
        assert!(log.contains("\"status\":408"), "{stage}: {log}");
    }
    assert_eq!(origin.request_count(), 0);
}

/// A gateway with one `body` rule (`DROP TABLE`, block) on `POST /b` to `origin`, the WAF
/// reading the first 64 body bytes; `limits` goes under `[server.limits]`.
fn waf_body_gateway(origin: &Origin, limits: &str) -> Gateway {
    Gateway::start(&format!(
        r#"{HEADER}
[server.limits]
{limits}
[waf]
body_max_bytes = 64
rules = [{{ name = "drop", target = "body", pattern = "DROP TABLE", action = "block" }}]
[[upstreams]]
name = "o"
targets = ["{}"]
[[apis]]
name = "a"
[[apis.routes]]
route = "POST /b"
integration = {{ type = "http", upstream = "o" }}
"#,
        origin.addr
    ))
}

const CHUNKED_HEAD: &[u8] = b"POST /b HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n";

/// Sends the chunked head, then each piece of the body in its own write `gap` apart; returns
/// the status.
fn send_chunked(gw: &Gateway, pieces: &[&[u8]], gap: Duration) -> u16 {
    let mut c = Client::connect(gw.addr);
    c.stream().set_nodelay(true).unwrap();
    c.send(CHUNKED_HEAD);
    for p in pieces {
        thread::sleep(gap);
        c.send(p);
    }
    c.read_response().expect("response").status
}

/// A chunked body the WAF read whole and refused is skipped: the connection serves the next
/// request (pipelined here), as after a refused Content-Length body.
#[test]
fn waf_refusal_of_a_whole_chunked_body_keeps_the_connection() {
    let origin = Origin::start(|r| Response::ok(r.body.clone()));
    let gw = waf_body_gateway(&origin, "");
    let mut c = Client::connect(gw.addr);
    let mut req = CHUNKED_HEAD.to_vec();
    req.extend_from_slice(b"12\r\nhello DROP TABLE x\r\n0\r\n\r\n");
    req.extend_from_slice(CHUNKED_HEAD);
    req.extend_from_slice(b"5\r\nclean\r\n0\r\n\r\n");
    c.send(&req);
    assert_eq!(c.read_response().unwrap().status, 403);
    let r = c
        .read_response()
        .expect("the connection was closed after the refusal");
    assert_eq!((r.status, r.text().as_str()), (200, "clean"));
    assert_eq!(origin.request_count(), 1);
}

#[test]
fn waf_body_rules_read_chunked_bodies_that_arrive_after_the_head() {
    let origin = Origin::start(|r| Response::ok(r.body.clone()));
    let gw = waf_body_gateway(&origin, "");
    let gap = Duration::from_millis(50);
    // The whole body in a write of its own, right after the head.
    assert_eq!(
        send_chunked(
            &gw,
            &[b"12\r\nhello DROP TABLE x\r\n0\r\n\r\n"],
            Duration::ZERO
        ),
        403
    );
    // The match in a later chunk, after a pause.
    assert_eq!(
        send_chunked(
            &gw,
            &[b"6\r\nhello \r\n", b"c\r\nDROP TABLE x\r\n0\r\n\r\n"],
            gap
        ),
        403
    );
    // The match split across two chunks (in one write, and in two): the decoded payload is
    // scanned, not the framing.
    assert_eq!(
        send_chunked(&gw, &[b"5\r\nDROP \r\n6\r\nTABLE!\r\n0\r\n\r\n"], gap),
        403
    );
    assert_eq!(
        send_chunked(
            &gw,
            &[b"5\r\nDROP \r\n", b"6\r\nTABLE!\r\n", b"0\r\n\r\n"],
            gap
        ),
        403
    );
    // The size line itself split across writes.
    assert_eq!(
        send_chunked(
            &gw,
            &[b"1", b"2\r\nhello DROP TABLE x", b"\r\n0\r\n\r\n"],
            gap
        ),
        403
    );
    assert!(origin.requests().is_empty(), "a blocked body went upstream");

    // Past body_max_bytes (64) nothing is looked at: the documented limit.
    let pad = "a".repeat(70);
    let first = format!("{:x}\r\n{pad}\r\n", pad.len());
    assert_eq!(
        send_chunked(
            &gw,
            &[first.as_bytes(), b"c\r\nDROP TABLE x\r\n0\r\n\r\n"],
            gap
        ),
        200
    );
    assert_eq!(
        origin.last_request().body,
        format!("{pad}DROP TABLE x").as_bytes()
    );
    let m = gw.metrics();
    assert_eq!(
        metric_value(&m, "ringgate_waf_rule_matches_total", &["rule=\"drop\""]),
        Some(5.0),
        "{m}"
    );
}

#[test]
fn waf_clean_chunked_body_reaches_the_origin_byte_exact() {
    let origin = Origin::start(|r| Response::ok(r.body.clone()));
    let gw = waf_body_gateway(&origin, "");
    // Several chunks (one with an extension), a body longer than body_max_bytes, trailers;
    // written in pieces that cut through size lines, data and the trailer section.
    let body: &[u8] =
        b"5;ext=1\r\nhello\r\n1\r\n \r\n26\r\nworld, a body longer than sixty-four b\r\n\
        1e\r\nytes, read in part by the WAF.\r\n0\r\nx-sum: 42\r\n\r\n";
    let cuts = [3, 12, 20, 60, 100, body.len() - 7, body.len()];
    let mut pieces = Vec::new();
    let mut at = 0;
    for &cut in &cuts {
        pieces.push(&body[at..cut]);
        at = cut;
    }
    assert_eq!(send_chunked(&gw, &pieces, Duration::from_millis(30)), 200);
    let r = origin.last_request();
    assert!(r.chunked);
    assert_eq!(
        r.body,
        b"hello world, a body longer than sixty-four bytes, read in part by the WAF."
    );
    // The framing went on as the client wrote it, extension and trailer included.
    let raw = origin.raw();
    assert!(
        raw.windows(body.len()).any(|w| w == body),
        "the origin got:\n{}",
        String::from_utf8_lossy(&raw)
    );
    // A pipelined request behind a chunked body is served on the same connection.
    let mut c = Client::connect(gw.addr);
    let mut two = CHUNKED_HEAD.to_vec();
    two.extend_from_slice(b"3\r\none\r\n0\r\n\r\n");
    two.extend_from_slice(CHUNKED_HEAD);
    two.extend_from_slice(b"3\r\ntwo\r\n0\r\n\r\n");
    c.send(&two);
    assert_eq!(c.read_response().unwrap().text(), "one");
    assert_eq!(c.read_response().unwrap().text(), "two");
}

#[test]
fn waf_chunked_body_too_slow_bad_or_too_big_is_refused_before_the_origin() {
    let origin = Origin::start(|r| Response::ok(r.body.clone()));
    let gw = waf_body_gateway(&origin, "header_timeout_ms = 300\nmax_body_bytes = 32");
    // Too slow: the first 64 bytes (or the end) do not come within header_timeout.
    let mut c = Client::connect(gw.addr);
    c.send(CHUNKED_HEAD);
    c.send(b"3\r\nabc\r\n");
    let t0 = Instant::now();
    let r = c.read_response().expect("response");
    assert_eq!(r.status, 408, "{}", r.text());
    assert_eq!(r.message(), "Request Timeout");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    // Invalid framing, after the head.
    assert_eq!(
        send_chunked(&gw, &[b"zz\r\nabc\r\n0\r\n\r\n"], Duration::from_millis(30)),
        400
    );
    // Past max_body_bytes (32), within the 64 bytes the WAF reads.
    let big = format!("28\r\n{}\r\n0\r\n\r\n", "b".repeat(40));
    assert_eq!(
        send_chunked(&gw, &[big.as_bytes()], Duration::from_millis(30)),
        413
    );
    // Chunk extensions count toward max_body_bytes with the payload (they are relayed too).
    let ext = format!("1;{}\r\nx\r\n0\r\n\r\n", "e".repeat(40));
    assert_eq!(
        send_chunked(&gw, &[ext.as_bytes()], Duration::from_millis(30)),
        413
    );
    // Framing far heavier than its payload (1-byte chunks with 4000-byte extensions) is not
    // held past 4 × body_max_bytes + 64 KiB: exactly that much is sent (all of it read, so
    // the answer is not lost to a reset), the last extension left unfinished.
    let gw = waf_body_gateway(&origin, "header_timeout_ms = 300");
    let mut c = Client::connect(gw.addr);
    c.send(CHUNKED_HEAD);
    let cap = 4 * 64 + 64 * 1024;
    let chunk = format!("1;{}\r\nx\r\n", "e".repeat(4000));
    let mut heavy = String::new();
    while heavy.len() + chunk.len() < cap {
        heavy.push_str(&chunk);
    }
    heavy.push_str("1;");
    heavy.push_str(&"e".repeat(cap - heavy.len()));
    assert_eq!(heavy.len(), cap);
    c.send(heavy.as_bytes());
    let r = c.read_response().expect("response");
    assert_eq!(r.status, 400);
    assert_eq!(
        r.message(),
        "Bad Request: chunked framing too large to inspect"
    );
    assert_eq!(origin.raw_len(), 0, "a refused body reached the origin");
}

#[test]
fn waf_chunked_100mb_upload_streams_in_bounded_memory() {
    const SIZE: u64 = 100 * 1024 * 1024;
    let origin = Origin::body_counter();
    let gw = waf_body_gateway(&origin, "max_body_bytes = 209715200");
    let start_rss = rss_kib(gw.pid);
    let pid = gw.pid;
    let done = Arc::new(AtomicBool::new(false));
    let d2 = done.clone();
    let sampler = thread::spawn(move || {
        let mut max = 0;
        while !d2.load(Ordering::Relaxed) {
            max = max.max(rss_kib(pid));
            thread::sleep(Duration::from_millis(10));
        }
        max
    });
    let t0 = Instant::now();
    let mut c = Client::connect(gw.addr);
    c.set_timeout(Duration::from_secs(60));
    c.send(CHUNKED_HEAD);
    let piece = vec![b'z'; 256 * 1024];
    let mut chunk = format!("{:x}\r\n", piece.len()).into_bytes();
    chunk.extend_from_slice(&piece);
    chunk.extend_from_slice(b"\r\n");
    for _ in 0..SIZE / piece.len() as u64 {
        c.stream().write_all(&chunk).expect("upload write");
    }
    c.send(b"0\r\n\r\n");
    let r = c.read_response().expect("upload response");
    done.store(true, Ordering::Relaxed);
    let max_rss = sampler.join().unwrap();
    eprintln!(
        "100 MB chunked upload took {:?}; gateway RSS {start_rss} KiB -> max {max_rss} KiB",
        t0.elapsed()
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), SIZE.to_string(), "origin byte count");
    assert_eq!(origin.last_request().body_len, SIZE);
    assert!(
        max_rss.saturating_sub(start_rss) < 64 * 1024,
        "gateway RSS grew by {} KiB during a 100 MB chunked upload",
        max_rss - start_rss
    );
}

/// Host tiers and overlapping APIs: the API a request addressed answers its preflight and puts
/// its CORS headers on its 405, whatever a less specific tier serves; a preflight that another
/// API's catch-all matches is answered by the API with `cors` whose route takes the method.
#[test]
fn preflights_and_405s_belong_to_the_addressed_api() {
    let app = "Origin: https://app.example.com\r\n";
    let gw = Gateway::start(&format!(
        r#"
[[apis]]
name = "a"
hosts = ["shop.example.com"]
cors = {{ allow_origins = ["https://app.example.com"] }}
[[apis.routes]]
route = "GET /a"
{MOCK}
[[apis]]
name = "n"
[[apis.routes]]
route = "DELETE /a"
{MOCK}
"#
    ));
    let mut c = Client::connect(gw.addr);
    let send = |c: &mut Client, m: &str, extra: &str| {
        c.send(format!("{m} /a HTTP/1.1\r\nHost: shop.example.com\r\n{app}{extra}\r\n").as_bytes());
        c.read_response().expect("response")
    };
    let r = send(&mut c, "OPTIONS", "Access-Control-Request-Method: PUT\r\n");
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    let r = send(&mut c, "PATCH", "");
    assert_eq!(r.status, 405);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(r.headers_named("vary"), vec!["Origin"]);
    drop(gw);

    let gw = Gateway::start(&format!(
        r#"
[[apis]]
name = "app"
base_path = "/app"
cors = {{ allow_origins = ["https://app.example.com"], allow_methods = ["POST"] }}
[[apis.routes]]
route = "POST /orders"
{MOCK}
[[apis]]
name = "proxy"
[[apis.routes]]
route = "ANY /{{p+}}"
integration = {{ type = "mock", status = 200, body = "catch-all" }}
"#
    ));
    let mut c = Client::connect(gw.addr);
    c.send(format!("OPTIONS /app/orders HTTP/1.1\r\nHost: t\r\n{app}Access-Control-Request-Method: POST\r\n\r\n").as_bytes());
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(r.header("access-control-allow-methods"), Some("POST"));
    // A plain OPTIONS (no preflight) still goes to the catch-all.
    c.send(b"OPTIONS /app/orders HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(c.read_response().unwrap().text(), "catch-all");
}
