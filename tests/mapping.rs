//! Parameter mapping (`request_mapping`, `response_mapping`): headers and query parameters
//! set from literals, the authorizer's principal and claims, the request, stage variables and
//! the gateway's context, or removed; applied on real sockets to what a recording origin
//! receives and to what the client gets (proxied responses, cache hits, mock answers). Values
//! cannot inject CR/LF into either head. Tokens are minted by PyJWT (tests/peers/auth_peer.py).

mod common;

use common::*;
use serde_json::{json, Value};
use std::net::SocketAddr;

const SECRET: &str = "an-hmac-secret-of-at-least-32-bytes!";
const KEY: &str = "mapping-key-value-000001";

/// Answers with a few headers the response mappings remove, keep or replace.
fn origin() -> Origin {
    Origin::start(|_| {
        Response::ok("ok")
            .header("Server", "origin-1")
            .header("X-Keep", "upstream")
            .header("X-Served-By", "origin")
    })
}

/// Allows `allow-me` with a principal and a context, anything else is denied.
fn authorizer() -> Origin {
    Origin::start(|r| {
        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        match v["identity"]["header.authorization"].as_str() {
            Some("allow-me") => Response::ok(
                json!({"allow": true, "principal": "p-1", "context": {"tenant": "acme", "tier": 3}})
                    .to_string(),
            ),
            _ => Response::ok(r#"{"allow":false}"#),
        }
    })
}

fn config(origin: SocketAddr, authz: SocketAddr) -> String {
    format!(
        r#"
[[authorizers]]
name = "users"
type = "jwt"
secret = "{SECRET}"
[[authorizers]]
name = "custom"
type = "request"
upstream = "authz"
path = "/authorize"
identity_sources = ["header.authorization"]
ttl_s = 0
[[usage_plans]]
name = "basic"
apis = ["shop/prod"]
[[api_keys]]
name = "alice-key"
value = "{KEY}"
plans = ["basic"]
[[upstreams]]
name = "o"
targets = ["{origin}"]
[[upstreams]]
name = "authz"
targets = ["{authz}"]

[[apis]]
name = "shop"
[apis.stages.prod]
variables = {{ version = "v7" }}

[[apis.routes]]
route = "POST /jwt/{{id}}"
integration = {{ type = "http", upstream = "o", path = "/orders/{{id}}" }}
auth = "jwt:users"
request_mapping = {{ "header.x-user" = "$context.principal", "header.x-email" = "$context.authorizer.claims.email", "header.X-Tenant" = "tenant-${{request.header.x-tenant-in}}", "header.cookie" = "remove", "header.x-item" = "$request.path.id", "header.x-static" = "a literal value", "header.x-rid" = "$context.requestId", "header.x-ip" = "$context.identity.sourceIp", "header.x-where" = "$context.stage $context.routeKey", "header.x-q" = "$request.querystring.q", "query.debug" = "remove", "query.user" = "$context.principal", "query.v" = "${{stageVariables.version}}", "query.mail" = "$context.authorizer.claims.email" }}
response_mapping = {{ "header.x-served-by" = "ringgate", "header.server" = "remove", "header.x-keep" = "$request.header.x-echo", "header.x-principal" = "$context.principal" }}

[[apis.routes]]
route = "GET /keyed"
integration = {{ type = "http", upstream = "o" }}
api_key_required = true
request_mapping = {{ "header.x-key" = "$context.apiKeyName", "header.x-api-key" = "remove" }}

[[apis.routes]]
route = "GET /custom"
integration = {{ type = "http", upstream = "o" }}
auth = "authorizer:custom"
request_mapping = {{ "header.x-tenant" = "$context.authorizer.tenant", "header.x-tier" = "$context.authorizer.tier", "header.x-user" = "$context.principal", "header.authorization" = "remove" }}

[[apis.routes]]
route = "GET /mock"
integration = {{ type = "mock", status = 200, headers = {{ "x-mock" = "1", "X-Drop" = "d", "x-served-by" = "mock" }}, body = "hi" }}
response_mapping = {{ "header.x-drop" = "remove", "header.x-served-by" = "ringgate at $context.stage", "header.x-rid" = "$context.requestId" }}

[[apis.routes]]
route = "GET /plain"
integration = {{ type = "http", upstream = "o" }}

[[apis.routes]]
route = "ANY /u/{{id}}"
integration = {{ type = "http", upstream = "o" }}
request_mapping = {{ "header.x-id" = "$request.path.id", "header.x-other" = "static" }}

[[apis]]
name = "cached"
[apis.stages."$default"]
cache = {{ ttl_s = 60 }}
[[apis.routes]]
route = "GET /items/{{id}}"
integration = {{ type = "http", upstream = "o" }}
response_mapping = {{ "header.server" = "remove", "header.x-rid" = "$context.requestId", "header.x-served-by" = "ringgate" }}
"#
    )
}

struct Setup {
    origin: Origin,
    _authz: Origin,
    gw: Gateway,
    dir: std::path::PathBuf,
}

fn setup() -> Setup {
    let origin = origin();
    let authz = authorizer();
    let gw = Gateway::start(&config(origin.addr, authz.addr));
    Setup {
        origin,
        _authz: authz,
        dir: temp_dir("mapping-peer"),
        gw,
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// HS256 tokens for these claims (each with a near `exp`), minted by PyJWT.
fn tokens(s: &Setup, claims: &[Value]) -> Vec<String> {
    let jobs: Vec<Value> = claims
        .iter()
        .map(|c| {
            let mut c = c.clone();
            c["exp"] = json!(now() + 300);
            json!({"op": "jwt", "alg": "HS256", "kid": null, "claims": c, "secret": SECRET})
        })
        .collect();
    peer(&s.dir, Value::Array(jobs))
        .into_iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

fn jwt_post(s: &Setup, path: &str, token: &str, extra: &str) -> RawResponse {
    s.gw.request(&format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n{extra}Content-Length: 2\r\n\r\n{{}}"
    ))
}

#[test]
fn request_headers_and_query_from_principal_claims_request_and_stage() {
    let s = setup();
    let tok = &tokens(&s, &[json!({"sub": "alice", "email": "alice@example.com"})])[0];
    let r = jwt_post(
        &s,
        "/prod/jwt/42?a=1&debug=true&q=hello%20there&b=x%2By&user=mallory",
        tok,
        "X-User: spoofed\r\nCookie: session=1\r\nX-Tenant-In: blue\r\nx-tenant: spoofed\r\nX-Echo: echoed\r\nAccept: */*\r\n",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let got = s.origin.last_request();
    // Query: `debug` and the client's `user` gone, the others kept in order, mapped ones added.
    assert_eq!(
        got.path,
        "/orders/42?a=1&q=hello%20there&b=x%2By&mail=alice%40example.com&user=alice&v=v7"
    );
    assert_eq!(got.headers_named("x-user"), ["alice"]);
    assert_eq!(got.header("x-principal-id"), Some("alice"));
    assert_eq!(got.header("x-email"), Some("alice@example.com"));
    assert_eq!(got.headers_named("x-tenant"), ["tenant-blue"]);
    assert_eq!(got.header("cookie"), None);
    assert_eq!(got.header("x-item"), Some("42"));
    assert_eq!(got.header("x-static"), Some("a literal value"));
    assert_eq!(got.header("x-rid"), r.header("x-request-id"));
    assert_eq!(got.header("x-ip"), Some("127.0.0.1"));
    assert_eq!(got.header("x-where"), Some("prod POST /jwt/{id}"));
    assert_eq!(got.header("x-q"), Some("hello there"));
    // Headers without a rule pass as before.
    assert_eq!(got.header("accept"), Some("*/*"));
    assert_eq!(got.header("x-echo"), Some("echoed"));
    // Response: set, removed, replaced from the request, from the principal.
    assert_eq!(r.headers_named("x-served-by"), ["ringgate"]);
    assert_eq!(r.header("server"), None);
    assert_eq!(r.headers_named("x-keep"), ["echoed"]);
    assert_eq!(r.header("x-principal"), Some("alice"));
    assert_eq!(r.text(), "ok");
}

#[test]
fn variables_without_a_value_leave_the_name_unset() {
    let s = setup();
    // No `sub`, no `email`: the rules that read them send nothing, and the client's values
    // of those names are dropped all the same (the mapping owns them).
    let tok = &tokens(&s, &[json!({"name": "anonymous"})])[0];
    let r = jwt_post(
        &s,
        "/prod/jwt/7?user=mallory&z=1",
        tok,
        "X-User: spoofed\r\nX-Email: spoofed\r\n",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let got = s.origin.last_request();
    assert_eq!(got.path, "/orders/7?z=1&v=v7");
    assert_eq!(got.header("x-user"), None);
    assert_eq!(got.header("x-email"), None);
    assert_eq!(got.header("x-principal-id"), None);
    // `tenant-${request.header.x-tenant-in}` without the header: not sent at all.
    assert_eq!(got.header("x-tenant"), None);
    assert_eq!(got.header("x-q"), None);
    // `$request.header.x-echo` absent: the upstream's x-keep is still replaced (by nothing).
    assert_eq!(r.header("x-keep"), None);
    assert_eq!(r.header("x-principal"), None);
    assert_eq!(r.header("x-served-by"), Some("ringgate"));
}

#[test]
fn no_crlf_injection_through_any_value() {
    let s = setup();
    let tok = &tokens(
        &s,
        &[json!({"sub": "bob", "email": "bob@example.com\r\nX-Evil: 1&admin=true"})],
    )[0];
    let r = jwt_post(
        &s,
        "/prod/jwt/7?q=a%0D%0AX-Evil:%203%0D%0A%0D%0AGET%20/x",
        tok,
        "",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let got = s.origin.last_request();
    // Header values holding CR/LF are not sent; in the query they are percent-encoded. (A
    // path parameter holding one is refused with 400: see the next test.)
    assert_eq!(got.header("x-email"), None);
    assert_eq!(got.header("x-q"), None);
    assert_eq!(got.header("x-item"), Some("7"));
    assert!(
        got.headers
            .iter()
            .all(|(n, _)| !n.eq_ignore_ascii_case("x-evil")),
        "{:?}",
        got.headers
    );
    assert!(
        got.path
            .contains("mail=bob%40example.com%0D%0AX-Evil%3A%201%26admin%3Dtrue"),
        "{}",
        got.path
    );
    assert!(!got.path.contains("&admin="), "{}", got.path);
    // One request reached the origin, with one head.
    let raw = String::from_utf8_lossy(&s.origin.raw()).into_owned();
    assert_eq!(raw.matches("HTTP/1.1\r\n").count(), 1, "{raw}");
    assert!(!raw.to_ascii_lowercase().contains("\r\nx-evil"), "{raw}");
    // The response head is as safe: the request header it copies cannot hold CR/LF (the
    // parser refuses it), and a bare LF in a header is refused before routing.
    let r = s.gw.request(&format!(
        "POST /prod/jwt/1 HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {tok}\r\nX-Echo: a\nX-Evil: 1\r\nContent-Length: 2\r\n\r\n{{}}"
    ));
    assert_eq!(r.status, 400);
}

/// A path parameter decoding to a control character cannot be put in a header: the request
/// is refused with 400 and a JSON message, never forwarded with the header silently left out.
#[test]
fn path_parameter_decoding_to_a_control_character_is_refused() {
    let s = setup();
    let mut c = Client::connect(s.gw.addr);
    for id in ["a%0Ab", "%0D%0AX-Evil:%201", "x%01", "del%7F", "%1B%5B31m"] {
        c.send(format!("GET /prod/u/{id} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 400, "{id}: {}", r.text());
        assert_eq!(
            r.message(),
            "Path parameter `id` cannot be put in header `x-id`: it decodes to a control character",
            "{id}"
        );
        assert_eq!(r.header("content-type"), Some("application/json"), "{id}");
    }
    // A body read whole keeps the connection, and nothing reached the origin.
    c.send(b"POST /prod/u/a%0Ab HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc");
    assert_eq!(c.read_response().unwrap().status, 400);
    assert_eq!(s.origin.request_count(), 0);
    // On the same connection: printable values (and HTAB, which a header value may hold)
    // are sent as before.
    for (id, want) in [("a%20b", "a b"), ("caf%C3%A9", "café"), ("a%09b", "a\tb")] {
        c.send(format!("GET /prod/u/{id} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 200, "{id}: {}", r.text());
        let got = s.origin.last_request();
        assert_eq!(got.header("x-id"), Some(want), "{id}");
        assert_eq!(got.header("x-other"), Some("static"), "{id}");
    }
    // Counted as the route's 400s.
    let m = s.gw.metrics();
    assert!(
        m.contains("route=\"ANY /u/{id}\",method=\"GET\",status=\"400\"} 5"),
        "{m}"
    );
}

#[test]
fn api_key_name_and_request_authorizer_context() {
    let s = setup();
    let r = s.gw.request(&format!(
        "GET /prod/keyed HTTP/1.1\r\nHost: t\r\nx-api-key: {KEY}\r\n\r\n"
    ));
    assert_eq!(r.status, 200, "{}", r.text());
    let got = s.origin.last_request();
    assert_eq!(got.header("x-key"), Some("alice-key"));
    assert_eq!(got.header("x-api-key"), None);

    let r =
        s.gw.request("GET /prod/custom HTTP/1.1\r\nHost: t\r\nAuthorization: allow-me\r\n\r\n");
    assert_eq!(r.status, 200, "{}", r.text());
    let got = s.origin.last_request();
    assert_eq!(got.header("x-tenant"), Some("acme"));
    assert_eq!(got.header("x-tier"), Some("3"));
    assert_eq!(got.header("x-user"), Some("p-1"));
    assert_eq!(got.header("authorization"), None);
    let r =
        s.gw.request("GET /prod/custom HTTP/1.1\r\nHost: t\r\nAuthorization: nope\r\n\r\n");
    assert_eq!(r.status, 403);
}

#[test]
fn mock_answers_are_mapped() {
    let s = setup();
    let r = s.gw.get("/prod/mock");
    assert_eq!((r.status, r.text().as_str()), (200, "hi"));
    assert_eq!(r.header("x-mock"), Some("1"));
    assert_eq!(r.header("x-drop"), None);
    assert_eq!(r.headers_named("x-served-by"), ["ringgate at prod"]);
    assert_eq!(r.header("x-rid"), r.header("x-request-id"));
    // A route without mappings is untouched.
    let r = s.gw.get("/prod/plain");
    assert_eq!(r.header("server"), Some("origin-1"));
    assert_eq!(r.header("x-served-by"), Some("origin"));
}

#[test]
fn cache_hits_are_mapped_per_request() {
    let s = setup();
    let mut c = Client::connect(s.gw.addr);
    let mut seen = Vec::new();
    for _ in 0..2 {
        c.send(b"GET /items/1 HTTP/1.1\r\nHost: t\r\n\r\n");
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("server"), None);
        assert_eq!(r.headers_named("x-served-by"), ["ringgate"]);
        assert_eq!(r.header("x-keep"), Some("upstream"));
        assert_eq!(r.header("x-rid"), r.header("x-request-id"));
        seen.push((
            r.header("x-cache").unwrap().to_string(),
            r.header("x-rid").unwrap().to_string(),
        ));
    }
    assert_eq!(seen[0].0, "miss");
    assert_eq!(seen[1].0, "hit");
    assert_ne!(seen[0].1, seen[1].1, "a hit carries its own request id");
    assert_eq!(s.origin.request_count(), 1);
}

#[test]
fn bad_mappings_are_config_errors_naming_file_line_and_key() {
    let dead = dead_addr();
    let base = config(dead, dead);
    let cases: &[(&str, &str, &str, &str)] = &[
        // (text in the config, its replacement, key named, message part)
        (
            "\"header.x-served-by\" = \"ringgate\", \"header.server\"",
            "\"header.content-length\" = \"1\", \"header.server\"",
            "response_mapping.\"header.content-length\"",
            "cannot be mapped",
        ),
        (
            "\"header.x-key\" = ",
            "\"header.transfer-encoding\" = ",
            "request_mapping.\"header.transfer-encoding\"",
            "cannot be mapped",
        ),
        (
            "\"header.x-key\" = ",
            "\"header.Host\" = ",
            "request_mapping.\"header.Host\"",
            "cannot be mapped",
        ),
        (
            "\"header.x-key\" = ",
            "\"header.connection\" = ",
            "request_mapping.\"header.connection\"",
            "cannot be mapped",
        ),
        (
            "\"header.x-key\" = ",
            "\"body.key\" = ",
            "request_mapping.\"body.key\"",
            "is not `header.NAME` or `query.NAME`",
        ),
        (
            "\"header.x-key\" = \"$context.apiKeyName\"",
            "\"header.x-key\" = \"$context.nope\"",
            "request_mapping.\"header.x-key\"",
            "unknown variable `$context.nope`",
        ),
        (
            "\"header.x-key\" = \"$context.apiKeyName\"",
            "\"header.x-key\" = \"${stageVariables.nope}\"",
            "request_mapping.\"header.x-key\"",
            "stage variable `nope` is not defined",
        ),
        (
            "\"header.x-key\" = \"$context.apiKeyName\"",
            "\"header.x-key\" = \"$request.path.nope\"",
            "request_mapping.\"header.x-key\"",
            "not a parameter of the route",
        ),
        (
            "\"header.x-key\" = \"$context.apiKeyName\"",
            "\"header.x-key\" = \"$context.authorizer.claims.email\"",
            "request_mapping",
            "needs `auth = \"jwt:NAME\"`",
        ),
    ];
    for (from, to, key, want) in cases {
        assert!(base.contains(from), "{from}");
        let toml = base.replacen(from, to, 1);
        let (out, path) = check(&toml);
        assert!(!out.status.success(), "{to}");
        let err = String::from_utf8_lossy(&out.stderr);
        // `check` puts the [server] header in front of a config without one.
        let offset = format!("{HEADER}\n").matches('\n').count();
        let line = offset + toml.lines().position(|l| l.contains(to)).unwrap() + 1;
        assert!(
            err.contains(&format!("{}:{line}: key `apis[0].routes[", path.display())),
            "{to}: {err}"
        );
        assert!(err.contains(key) && err.contains(want), "{to}: {err}");
    }
    // A request mapping on a mock integration, and mappings on WebSocket API routes.
    let mock = base.replacen(
        "response_mapping = { \"header.x-drop\"",
        "request_mapping = { \"header.a\" = \"b\" }\nresponse_mapping = { \"header.x-drop\"",
        1,
    );
    let (out, _) = check(&mock);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("needs an `http` integration"),
        "{err}"
    );
    let ws = r#"
[[apis]]
name = "chat"
protocol = "websocket"
[[apis.routes]]
route = "$connect"
integration = { type = "mock", status = 200 }
response_mapping = { "header.x-a" = "b" }
"#;
    let (out, _) = check(ws);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("response_mapping"),
        "{err}"
    );
}
