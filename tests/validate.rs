//! Request validation (`validate = { schema = "FILE" }`): bodies checked against a JSON Schema
//! after auth and throttles, before the integration. Valid bodies reach the origin byte for
//! byte; every kind of invalid body is answered 400 with a message naming what failed, and the
//! origin sees nothing; 413 past `max_body_bytes`; chunked bodies are decoded, checked and sent
//! on with a Content-Length; slow or cut bodies end like the other buffering stages' (408/400).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

const SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "type": "object",
  "required": ["id", "qty"],
  "properties": {
    "id": { "type": "string", "minLength": 1 },
    "qty": { "type": "integer", "minimum": 1 },
    "note": { "type": "string" },
    "tags": { "type": "array", "items": { "type": "string" } }
  },
  "additionalProperties": false
}"#;

/// A directory holding `order.json` (the schema), kept while the test runs.
fn schema_dir() -> PathBuf {
    let d = temp_dir("schema");
    std::fs::write(d.join("order.json"), SCHEMA).unwrap();
    d
}

fn config(origin: std::net::SocketAddr, schemas: &Path) -> String {
    let s = schemas.join("order.json");
    let s = s.display();
    format!(
        r#"
[server]
listen = ["@LISTEN@"]
workers = 2
state_dir = "@DIR@/state"
[server.limits]
max_body_bytes = 2048
header_timeout_ms = 400
[admin]
listen = "@ADMIN@"
[[usage_plans]]
name = "basic"
apis = ["shop/$default"]
[[api_keys]]
name = "k"
value = "validate-key-value-00001"
plans = ["basic"]
[[upstreams]]
name = "o"
targets = ["{origin}"]
[[apis]]
name = "shop"
[[apis.routes]]
route = "POST /orders"
integration = {{ type = "http", upstream = "o", path = "/orders" }}
validate = {{ schema = "{s}" }}
[[apis.routes]]
route = "POST /mock-orders"
integration = {{ type = "mock", status = 201, body = "created" }}
validate = {{ schema = "{s}" }}
[[apis.routes]]
route = "POST /keyed"
integration = {{ type = "http", upstream = "o" }}
api_key_required = true
validate = {{ schema = "{s}" }}
[[apis.routes]]
route = "POST /open"
integration = {{ type = "http", upstream = "o" }}
"#
    )
}

fn post(path: &str, body: &str, extra: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn chunked(path: &str, pieces: &[&str], trailer: &str) -> String {
    let mut s = format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    for p in pieces {
        s.push_str(&format!("{:x}\r\n{p}\r\n", p.len()));
    }
    s.push_str(&format!("0\r\n{trailer}\r\n"));
    s
}

struct Setup {
    origin: Origin,
    gw: Gateway,
    _schemas: PathBuf,
}

fn setup() -> Setup {
    let origin = Origin::start(|r| Response::ok(format!("got {} bytes", r.body.len())));
    let schemas = schema_dir();
    let gw = Gateway::start(&config(origin.addr, &schemas));
    Setup {
        origin,
        gw,
        _schemas: schemas,
    }
}

#[test]
fn valid_body_reaches_the_origin_unchanged() {
    let s = setup();
    // Odd spacing, escapes and non-ASCII: the bytes go up as they came.
    let body = "{ \"id\" : \"caf\u{e9}-\\u00e9\",\n  \"qty\": 3, \"tags\": [\"a\", \"b\"] }";
    let r = s.gw.request(&post("/orders", body, ""));
    assert_eq!(r.status, 200, "{}", r.text());
    let got = s.origin.last_request();
    assert_eq!(got.path, "/orders");
    assert_eq!(got.body, body.as_bytes());
    assert_eq!(got.header("content-length"), Some(&*body.len().to_string()));
    assert_eq!(got.header("content-type"), Some("application/json"));
    // A mock integration is validated too.
    let r =
        s.gw.request(&post("/mock-orders", r#"{"id":"a","qty":1}"#, ""));
    assert_eq!((r.status, r.text().as_str()), (201, "created"));
}

#[test]
fn invalid_bodies_are_400_and_never_reach_the_origin() {
    let s = setup();
    let cases: &[(&str, &[&str])] = &[
        (
            r#"{"id":"a","qty":"3"}"#,
            &["/qty", "\"3\" is not of type \"integer\""],
        ),
        (r#"{"id":"a"}"#, &["/: ", "\"qty\" is a required property"]),
        (r#"{"id":"a","qty":0}"#, &["/qty", "minimum of 1"]),
        (r#"{"id":"a","qty":1,"extra":true}"#, &["/", "extra"]),
        (
            r#"{"id":"a","qty":1,"tags":["x",7]}"#,
            &["/tags/1", "7 is not of type \"string\""],
        ),
        (r#"[1,2]"#, &["/: ", "is not of type \"object\""]),
        (r#"{"id":"a","qty":1"#, &["not valid JSON"]),
        ("id=a&qty=1", &["not valid JSON"]),
        ("", &["empty"]),
        ("   ", &["empty"]),
        // The last `id` is valid; a backend that reads the first gets a number.
        (r#"{"id":5,"id":"a","qty":1}"#, &["names a member twice"]),
    ];
    for (body, want) in cases {
        let r = s.gw.request(&post("/orders", body, ""));
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        let m = r.message();
        assert!(m.starts_with("Invalid request body: "), "{body}: {m}");
        for w in *want {
            assert!(m.contains(w), "{body}: {m:?} should say {w:?}");
        }
        assert!(r.header("x-request-id").is_some());
    }
    // No body at all.
    let r = s.gw.request("POST /orders HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 400);
    assert!(r.message().contains("empty"), "{}", r.message());
    assert_eq!(s.origin.request_count(), 0);
}

#[test]
fn failures_keep_the_connection_and_pipelining_works() {
    let s = setup();
    let mut c = Client::connect(s.gw.addr);
    let bad = post("/orders", r#"{"id":1,"qty":1}"#, "");
    let good = post("/orders", r#"{"id":"b","qty":2}"#, "");
    let bad_chunked = chunked("/orders", &[r#"{"id":"c","#, r#""qty":-1}"#], "");
    let good_chunked = chunked("/orders", &[r#"{"id":"d","#, r#""qty":4}"#], "");
    c.send(format!("{bad}{good}{bad_chunked}{good_chunked}{good}").as_bytes());
    let statuses: Vec<u16> = (0..5).map(|_| c.read_response().unwrap().status).collect();
    assert_eq!(statuses, [400, 200, 400, 200, 200]);
    let bodies: Vec<Vec<u8>> = s.origin.requests().into_iter().map(|r| r.body).collect();
    assert_eq!(
        bodies,
        [
            br#"{"id":"b","qty":2}"#.to_vec(),
            br#"{"id":"d","qty":4}"#.to_vec(),
            br#"{"id":"b","qty":2}"#.to_vec()
        ]
    );
}

#[test]
fn chunked_bodies_are_decoded_checked_and_sent_with_a_length() {
    let s = setup();
    let pieces = [
        r#"{"id":"#,
        r#""x","qty""#,
        r#":5,"note":"#,
        r#""chunked"}"#,
    ];
    let whole: String = pieces.concat();
    let r =
        s.gw.request(&chunked("/orders", &pieces, "X-Trailer: 1\r\n"));
    assert_eq!(r.status, 200, "{}", r.text());
    let got = s.origin.last_request();
    assert_eq!(got.body, whole.as_bytes());
    assert!(!got.chunked);
    assert_eq!(
        got.header("content-length"),
        Some(&*whole.len().to_string())
    );
    assert_eq!(got.header("transfer-encoding"), None);

    // Sent slowly, a few bytes at a time, with chunk extensions.
    let raw = format!(
        "POST /orders HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n{:x};ext=1\r\n{whole}\r\n0\r\n\r\n",
        whole.len()
    );
    let mut c = Client::connect(s.gw.addr);
    for piece in raw.as_bytes().chunks(7) {
        c.send(piece);
        thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(c.read_response().unwrap().status, 200);
    assert_eq!(s.origin.last_request().body, whole.as_bytes());

    // Invalid against the schema, and invalid framing: 400, nothing sent on.
    let n = s.origin.request_count();
    let r = s.gw.request(&chunked("/orders", &[r#"{"id":"x"}"#], ""));
    assert_eq!(r.status, 400);
    assert!(
        r.message().contains("\"qty\" is a required property"),
        "{}",
        r.message()
    );
    let r = s.gw.request(
        "POST /orders HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    );
    assert_eq!(r.status, 400);
    assert!(r.message().contains("chunked"), "{}", r.message());
    assert_eq!(s.origin.request_count(), n);
}

#[test]
fn too_large_is_413_and_never_reaches_the_origin() {
    let s = setup();
    let big = format!(r#"{{"id":"a","qty":1,"note":"{}"}}"#, "x".repeat(3000));
    let r = s.gw.request(&post("/orders", &big, ""));
    assert_eq!(r.status, 413);
    // Chunked: counted as it is decoded, refused once past the limit.
    let pieces: Vec<String> = big
        .as_bytes()
        .chunks(500)
        .map(|c| String::from_utf8(c.to_vec()).unwrap())
        .collect();
    let pieces: Vec<&str> = pieces.iter().map(|s| s.as_str()).collect();
    let r = s.gw.request(&chunked("/orders", &pieces, ""));
    assert_eq!(r.status, 413);
    assert_eq!(s.origin.request_count(), 0);
    // Just under the limit passes.
    let ok = format!(r#"{{"id":"a","qty":1,"note":"{}"}}"#, "x".repeat(2000));
    assert!(ok.len() <= 2048);
    let r = s.gw.request(&post("/orders", &ok, ""));
    assert_eq!(r.status, 200);
    assert_eq!(s.origin.last_request().body.len(), ok.len());
}

#[test]
fn slow_or_cut_bodies_end_with_408_or_400() {
    let s = setup();
    // Half a body, then nothing: 408 after header_timeout_ms, connection closed.
    let mut c = Client::connect(s.gw.addr);
    c.send(b"POST /orders HTTP/1.1\r\nHost: t\r\nContent-Length: 20\r\n\r\n{\"id\":");
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 408);
    assert!(c.is_closed_within(Duration::from_secs(2)));
    // The same with a chunked body.
    let mut c = Client::connect(s.gw.addr);
    c.send(b"POST /orders HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"id\"");
    assert_eq!(c.read_response().unwrap().status, 408);
    // Cut short: the client half-closes; whatever it gets, the gateway goes on serving.
    let mut c = Client::connect(s.gw.addr);
    c.send(b"POST /orders HTTP/1.1\r\nHost: t\r\nContent-Length: 20\r\n\r\n{\"id\":");
    let _ = c.stream().shutdown(std::net::Shutdown::Write);
    if let Ok(r) = c.read_response() {
        assert_eq!(r.status, 400);
    }
    assert_eq!(s.origin.request_count(), 0);
    let r = s.gw.request(&post("/orders", r#"{"id":"a","qty":1}"#, ""));
    assert_eq!(r.status, 200);
}

#[test]
fn expect_100_continue_is_answered_before_the_body_is_read() {
    let s = setup();
    let body = r#"{"id":"e","qty":9}"#;
    let mut c = Client::connect(s.gw.addr);
    c.send(
        format!(
            "POST /orders HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 100);
    c.send(body.as_bytes());
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200);
    let got = s.origin.last_request();
    assert_eq!(got.body, body.as_bytes());
    assert_eq!(got.header("expect"), None);
}

#[test]
fn auth_runs_before_validation() {
    let s = setup();
    // No key: 403 whatever the body (an unauthenticated caller cannot make us parse).
    let r = s.gw.request(&post("/keyed", "not json", ""));
    assert_eq!(r.status, 403);
    let r = s.gw.request(&post(
        "/keyed",
        "not json",
        "x-api-key: validate-key-value-00001\r\n",
    ));
    assert_eq!(r.status, 400);
    let r = s.gw.request(&post(
        "/keyed",
        r#"{"id":"a","qty":1}"#,
        "x-api-key: validate-key-value-00001\r\n",
    ));
    assert_eq!(r.status, 200);
    // Routes without `validate` are not checked.
    let r = s.gw.request(&post("/open", "not json", ""));
    assert_eq!(r.status, 200);
    assert_eq!(s.origin.last_request().body, b"not json");
}

#[test]
fn schema_problems_are_config_errors_naming_file_line_and_key() {
    let dir = temp_dir("badschema");
    std::fs::write(
        dir.join("not-json.json"),
        "{\n  \"type\": \"object\",\n  oops\n}",
    )
    .unwrap();
    std::fs::write(dir.join("invalid.json"), r#"{"type": "nope"}"#).unwrap();
    std::fs::write(
        dir.join("remote.json"),
        r#"{"$ref": "https://example.com/s.json"}"#,
    )
    .unwrap();
    std::fs::write(dir.join("array.json"), "[1]").unwrap();
    let origin = dead_addr();
    let base = config(origin, &dir);
    for (file, want) in [
        ("missing.json", "cannot read schema"),
        ("not-json.json", "is not JSON: line 3"),
        ("invalid.json", "is not a valid JSON Schema"),
        ("remote.json", "is not a valid JSON Schema"),
        ("array.json", "must be a JSON object"),
    ] {
        let toml = base.replacen(
            &dir.join("order.json").display().to_string(),
            &dir.join(file).display().to_string(),
            1,
        );
        let (out, path) = check(&toml);
        assert!(!out.status.success(), "{file}");
        let err = String::from_utf8_lossy(&out.stderr);
        let line = toml.lines().position(|l| l.contains(file)).unwrap() + 1;
        assert!(
            err.contains(&format!(
                "{}:{line}: key `apis[0].routes[0].validate.schema`",
                path.display()
            )),
            "{file}: {err}"
        );
        assert!(err.contains(want) && err.contains(file), "{file}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn relative_schema_paths_resolve_against_the_config_dir_and_reload_checks_them() {
    // Boot on a config without validation, then put a schema beside the config file and
    // reload onto a config that names it relatively.
    let gw = Gateway::start(
        "[[apis]]\nname = \"boot\"\n[[apis.routes]]\nroute = \"GET /boot\"\nintegration = { type = \"mock\" }\n",
    );
    let rel = config(dead_addr(), Path::new("schemas"));
    gw.write_config(&rel);
    let r = admin_request(gw.admin_addr, "POST", "/reload", None).unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("cannot read schema"), "{}", r.text());
    assert_eq!(gw.get("/boot").status, 200);
    std::fs::create_dir_all(gw.dir.join("schemas")).unwrap();
    std::fs::write(gw.dir.join("schemas/order.json"), SCHEMA).unwrap();
    let r = admin_request(gw.admin_addr, "POST", "/reload", None).unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let r = gw.request(&post("/mock-orders", r#"{"id":"a"}"#, ""));
    assert_eq!(r.status, 400);
    assert!(r.message().contains("qty"), "{}", r.message());
    let r = gw.request(&post("/mock-orders", r#"{"id":"a","qty":2}"#, ""));
    assert_eq!(r.status, 201);
}

#[test]
fn check_prints_validated_routes() {
    let schemas = schema_dir();
    let (out, _) = check(&config(dead_addr(), &schemas));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("POST /orders") && table.contains("validate"),
        "{table}"
    );
}

/// A gateway whose one route `POST /v` checks bodies against `schema` (bodies up to 1 MiB).
fn open_schema_gateway(origin: &Origin, schema: &str) -> (Gateway, PathBuf) {
    let d = temp_dir("schema-open");
    std::fs::write(d.join("s.json"), schema).unwrap();
    let gw = Gateway::start(&format!(
        r#"
[server]
listen = ["@LISTEN@"]
workers = 1
state_dir = "@DIR@/state"
[server.limits]
max_body_bytes = 1048576
[admin]
listen = "@ADMIN@"
[[upstreams]]
name = "o"
targets = ["{}"]
[[apis]]
name = "a"
[[apis.routes]]
route = "POST /v"
integration = {{ type = "http", upstream = "o" }}
validate = {{ schema = "{}" }}
"#,
        origin.addr,
        d.join("s.json").display()
    ));
    (gw, d)
}

/// The README's limit: 128 levels of nesting are JSON, 129 are not (arrays and objects).
#[test]
fn nesting_of_128_levels_passes_and_129_is_refused() {
    let origin = Origin::start(|r| Response::ok(format!("got {} bytes", r.body.len())));
    let (gw, _d) = open_schema_gateway(&origin, "{}");
    let arrays = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
    let objects = |n: usize| format!("{}1{}", "{\"a\":".repeat(n), "}".repeat(n));
    for deep in [arrays, objects] {
        let r = gw.request(&post("/v", &deep(128), ""));
        assert_eq!(r.status, 200, "128 levels: {}", r.text());
        let r = gw.request(&post("/v", &deep(129), ""));
        assert_eq!(r.status, 400, "129 levels: {}", r.text());
        assert!(r.message().contains("not valid JSON"), "{}", r.message());
        let r = gw.request(&post("/v", &deep(127), ""));
        assert_eq!(r.status, 200, "127 levels: {}", r.text());
    }
    // Exactly 128 levels followed by garbage is still not JSON.
    let r = gw.request(&post("/v", &format!("{} x", arrays(128)), ""));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(origin.request_count(), 4);
}

/// Property names come from the client: the pointers in the message are cut, and the whole
/// answer stays small however long the names are.
#[test]
fn long_property_names_are_cut_in_the_message() {
    let origin = Origin::start(|_| Response::ok("up"));
    let (gw, _d) = open_schema_gateway(
        &origin,
        r#"{"type":"object","additionalProperties":{"type":"string"}}"#,
    );
    let names: Vec<String> = ["n", "m", "o", "p"]
        .iter()
        .map(|c| c.repeat(100_000))
        .collect();
    let body = format!(
        "{{{}}}",
        names
            .iter()
            .map(|n| format!("\"{n}\":1"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let r = gw.request(&post("/v", &body, ""));
    assert_eq!(r.status, 400, "{}", r.text().len());
    assert!(r.body.len() < 2048, "a {}-byte answer", r.body.len());
    let m = r.message();
    assert!(m.starts_with("Invalid request body: /"), "{m}");
    assert!(m.contains(&format!("/{}...: ", "n".repeat(63))), "{m}");
    assert!(m.contains("(and 1 more)"), "{m}");
    assert_eq!(origin.request_count(), 0);
}
