//! Identity and access: API keys (config and admin, persistence across restart and kill -9),
//! JWT authorizers (every algorithm, claims, scopes, key confusion, JWKS rotation), SigV4
//! (header and presigned forms, tampering, clock window).
//!
//! Tokens and signatures come from an independent peer: `tests/peers/auth_peer.py` (PyJWT with
//! cryptography, botocore's SigV4 signer), installed with pip once per test run when missing.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const KEY: &str = "a-long-random-key-value-0001";
const SECRET: &str = "an-hmac-secret-of-at-least-32-bytes!";
const AK: &str = "AKIDEXAMPLE";
const SK: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

// ---------------------------------------------------------------------------------------------
// The independent peer
// ---------------------------------------------------------------------------------------------

/// Unix time `t` as `YYYYMMDDTHHMMSSZ`.
fn amz_time(t: u64) -> String {
    let o = Command::new("date")
        .args(["-u", "-d", &format!("@{t}"), "+%Y%m%dT%H%M%SZ"])
        .output()
        .unwrap();
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// An origin that answers with the `x-principal-id` it received ("-" when none).
fn principal_origin() -> Origin {
    Origin::start(|r| {
        Response::ok(
            r.header("x-principal-id")
                .map(|v| v.to_string())
                .unwrap_or_else(|| "-".into()),
        )
    })
}

fn get_with(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> RawResponse {
    let mut raw = format!("GET {path} HTTP/1.1\r\nHost: test\r\n");
    for (k, v) in headers {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    raw.push_str("\r\n");
    gw.request(&raw)
}

fn bearer(gw: &Gateway, path: &str, token: &str) -> RawResponse {
    get_with(gw, path, &[("Authorization", &format!("Bearer {token}"))])
}

/// One admin request with a JSON body.
fn admin_json(addr: SocketAddr, method: &str, path: &str, body: &str) -> RawResponse {
    let mut c = Client::connect(addr);
    c.send(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    c.read_response().expect("admin response")
}

fn assert_denied(r: &RawResponse, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.text());
    let msg = if status == 401 {
        "Unauthorized"
    } else {
        "Forbidden"
    };
    assert_eq!(r.json(), json!({ "message": msg }), "{what}");
}

// ---------------------------------------------------------------------------------------------
// API keys
// ---------------------------------------------------------------------------------------------

fn key_config(origin: SocketAddr) -> String {
    format!(
        r#"
[[upstreams]]
name = "app"
targets = ["{origin}"]

[[usage_plans]]
name = "basic"
apis = ["shop/$default"]
quota = {{ limit = 1000000, period = "day" }}

[[api_keys]]
name = "alice"
value = "{KEY}"
plans = ["basic"]

[[api_keys]]
name = "off"
value = "a-disabled-key-value-000002"
enabled = false

[[apis]]
name = "shop"

[[apis.routes]]
route = "GET /key"
integration = {{ type = "http", upstream = "app" }}
auth = "api_key"

[[apis.routes]]
route = "GET /required"
integration = {{ type = "mock", body = "ok" }}
api_key_required = true

[[apis.routes]]
route = "GET /open"
integration = {{ type = "mock", body = "open" }}
"#
    )
}

#[test]
fn api_key_missing_unknown_disabled_are_403() {
    let origin = principal_origin();
    let gw = Gateway::start(&key_config(origin.addr));
    for path in ["/key", "/required"] {
        assert_denied(&gw.get(path), 403, "missing key");
        assert_denied(
            &get_with(&gw, path, &[("x-api-key", "a-long-random-key-value-0002")]),
            403,
            "unknown key",
        );
        assert_denied(
            &get_with(&gw, path, &[("x-api-key", "a-disabled-key-value-000002")]),
            403,
            "disabled key",
        );
        assert_denied(
            &get_with(&gw, path, &[("x-api-key", &KEY[..KEY.len() - 1])]),
            403,
            "prefix of a key",
        );
        let r = get_with(&gw, path, &[("x-api-key", KEY)]);
        assert_eq!(r.status, 200, "{}", r.text());
        let two = [
            ("x-api-key", KEY),
            ("X-Api-Key", "a-long-random-key-value-0002"),
        ];
        let r = get_with(&gw, path, &two);
        assert_eq!(r.status, 400, "{}", r.text());
        assert_eq!(r.message(), "Bad Request: more than one x-api-key header");
    }
    assert_eq!(gw.get("/open").status, 200);
    // Refused requests never reach the upstream.
    assert_eq!(origin.request_count(), 1);
}

#[test]
fn api_key_denial_keeps_connection_alive() {
    let gw = Gateway::start(&key_config(dead_addr()));
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /required HTTP/1.1\r\nHost: t\r\n\r\nGET /required HTTP/1.1\r\nHost: t\r\nx-api-key: a-long-random-key-value-0001\r\n\r\n");
    let r1 = c.read_response().unwrap();
    assert_eq!(r1.status, 403);
    assert!(!r1.closes());
    assert!(r1.header("x-request-id").is_some());
    let r2 = c.read_response().unwrap();
    assert_eq!(r2.status, 200);
    assert_eq!(r2.text(), "ok");
}

/// As Amazon API Gateway: a route that requires a key takes only a key of a usage plan attached
/// to the route's stage. A key of no plan, or of plans of other stages only, is 403, with
/// `auth = "api_key"` as with `api_key_required`, for config and run-time keys alike, and the
/// upstream never sees the request.
#[test]
fn a_required_key_must_be_in_a_plan_of_the_stage() {
    let origin = principal_origin();
    let cfg = format!(
        r#"
[[upstreams]]
name = "app"
targets = ["{}"]

[[usage_plans]]
name = "shop-plan"
apis = ["shop/prod"]

[[usage_plans]]
name = "test-plan"
apis = ["shop/test", "other/$default"]

[[api_keys]]
name = "member"
value = "{KEY}"
plans = ["shop-plan"]

[[api_keys]]
name = "planless"
value = "a-key-of-no-plan-at-all-0001"
plans = []

[[api_keys]]
name = "elsewhere"
value = "a-key-of-another-stage-0001"
plans = ["test-plan"]

[[apis]]
name = "shop"
[apis.stages.prod]
[apis.stages.test]

[[apis.routes]]
route = "GET /key"
integration = {{ type = "http", upstream = "app" }}
auth = "api_key"

[[apis.routes]]
route = "GET /required"
integration = {{ type = "http", upstream = "app" }}
api_key_required = true

[[apis]]
name = "other"
[[apis.routes]]
route = "GET /o"
integration = {{ type = "http", upstream = "app" }}
api_key_required = true
"#,
        origin.addr
    );
    let gw = Gateway::start(&cfg);
    for path in ["/prod/key", "/prod/required"] {
        let r = get_with(&gw, path, &[("x-api-key", KEY)]);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        for k in [
            "a-key-of-no-plan-at-all-0001",
            "a-key-of-another-stage-0001",
        ] {
            assert_denied(&get_with(&gw, path, &[("x-api-key", k)]), 403, path);
        }
    }
    // The stage the other plan covers takes that key, and not the first one.
    let r = get_with(
        &gw,
        "/test/required",
        &[("x-api-key", "a-key-of-another-stage-0001")],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_denied(
        &get_with(&gw, "/test/required", &[("x-api-key", KEY)]),
        403,
        "test",
    );
    let r = get_with(&gw, "/o", &[("x-api-key", "a-key-of-another-stage-0001")]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_denied(&get_with(&gw, "/o", &[("x-api-key", KEY)]), 403, "other");
    assert_eq!(origin.request_count(), 4);
    // Run-time keys: the same rule.
    for (name, plans) in [
        ("rt-none", "[]"),
        ("rt-test", r#"["test-plan"]"#),
        ("rt-shop", r#"["shop-plan"]"#),
    ] {
        let body =
            format!(r#"{{"name":"{name}","plans":{plans},"value":"{name}-value-0123456789abc"}}"#);
        assert_eq!(
            admin_json(gw.admin_addr, "POST", "/api-keys", &body).status,
            201
        );
    }
    for name in ["rt-none", "rt-test"] {
        let v = format!("{name}-value-0123456789abc");
        assert_denied(
            &get_with(&gw, "/prod/required", &[("x-api-key", &v)]),
            403,
            name,
        );
    }
    let r = get_with(
        &gw,
        "/prod/required",
        &[("x-api-key", "rt-shop-value-0123456789abc")],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(origin.request_count(), 5);
}

#[test]
fn admin_keys_are_live_on_every_worker_and_never_listed_with_values() {
    let gw = Gateway::start(&key_config(dead_addr()));
    let r = admin_json(
        gw.admin_addr,
        "POST",
        "/api-keys",
        r#"{"name":"bob","plans":["basic"]}"#,
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    let value = v["value"].as_str().unwrap().to_string();
    assert!(value.len() >= 20);
    assert_eq!(v["name"], "bob");
    // Live within a second on every worker: many fresh connections spread over both workers.
    assert!(wait_until(Duration::from_secs(1), || {
        (0..8).all(|_| get_with(&gw, "/required", &[("x-api-key", &value)]).status == 200)
    }));
    for _ in 0..20 {
        assert_eq!(
            get_with(&gw, "/required", &[("x-api-key", &value)]).status,
            200
        );
    }
    // Listing: names, no values, no digests.
    let list = admin_json(gw.admin_addr, "GET", "/api-keys", "");
    assert_eq!(list.status, 200);
    let text = list.text();
    assert!(
        text.contains("\"bob\"") && text.contains("\"alice\""),
        "{text}"
    );
    assert!(!text.contains(&value) && !text.contains(KEY), "{text}");
    // Errors.
    let dup = admin_json(gw.admin_addr, "POST", "/api-keys", r#"{"name":"bob"}"#);
    assert_eq!(dup.status, 409);
    let short = admin_json(
        gw.admin_addr,
        "POST",
        "/api-keys",
        r#"{"name":"c","value":"short"}"#,
    );
    assert_eq!(short.status, 400);
    let bad = admin_json(gw.admin_addr, "POST", "/api-keys", "{not json");
    assert_eq!(bad.status, 400);
    // A plan the config does not define is refused, as in the config file (a typo would
    // leave the key unmetered).
    let typo = admin_json(
        gw.admin_addr,
        "POST",
        "/api-keys",
        r#"{"name":"dan","plans":["basci"]}"#,
    );
    assert_eq!(typo.status, 400, "{}", typo.text());
    assert!(typo.message().contains("`basci`"), "{}", typo.text());
    assert!(!admin_json(gw.admin_addr, "GET", "/api-keys", "")
        .text()
        .contains("\"dan\""));
    assert_eq!(
        admin_json(gw.admin_addr, "DELETE", "/api-keys/alice", "").status,
        409,
        "config keys are deleted in the config"
    );
    assert_eq!(
        admin_json(gw.admin_addr, "DELETE", "/api-keys/nobody", "").status,
        404
    );
    // Delete: gone on every worker within a second.
    let r = admin_json(gw.admin_addr, "DELETE", "/api-keys/bob", "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(wait_until(Duration::from_secs(1), || {
        (0..8).all(|_| get_with(&gw, "/required", &[("x-api-key", &value)]).status == 403)
    }));
}

/// `GET`/`DELETE /api-keys/{name}` percent-decode the name, as the usage endpoint's `?key=`.
#[test]
fn admin_key_names_in_paths_are_percent_decoded() {
    let gw = Gateway::start(&key_config(dead_addr()));
    let body = r#"{"name":"u@x.com","plans":["basic"],"value":"an-email-named-key-value-01"}"#;
    assert_eq!(
        admin_json(gw.admin_addr, "POST", "/api-keys", body).status,
        201
    );
    let r = admin_json(gw.admin_addr, "GET", "/api-keys/u%40x.com", "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["name"], "u@x.com");
    let r = admin_json(gw.admin_addr, "DELETE", "/api-keys/u%40x.com", "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        admin_json(gw.admin_addr, "GET", "/api-keys/u@x.com", "").status,
        404
    );
    let r = admin_json(gw.admin_addr, "GET", "/api-keys/%ff", "");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.message().contains("UTF-8"), "{}", r.text());
}

#[test]
fn admin_keys_need_the_admin_token() {
    let cfg = format!(
        "[server]\nlisten = [\"@LISTEN@\"]\nworkers = 1\nstate_dir = \"@DIR@/state\"\n[admin]\nlisten = \"@ADMIN@\"\ntoken = \"admintoken\"\n{}",
        key_config(dead_addr())
    );
    let gw = Gateway::start(&cfg);
    let r = admin_json(gw.admin_addr, "POST", "/api-keys", r#"{"name":"x"}"#);
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(
        admin_json(gw.admin_addr, "GET", "/api-keys", "").status,
        401
    );
}

#[test]
fn admin_keys_survive_kill_9_and_reload() {
    let state = temp_dir("keys-state");
    let cfg = format!(
        "[server]\nlisten = [\"@LISTEN@\"]\nworkers = 2\nstate_dir = \"{}\"\n[admin]\nlisten = \"@ADMIN@\"\n{}",
        state.display(),
        key_config(dead_addr())
    );
    let gw = Gateway::start(&cfg);
    let mine = "my-own-chosen-key-value-0123";
    let r = admin_json(
        gw.admin_addr,
        "POST",
        "/api-keys",
        &format!(r#"{{"name":"carol","plans":["basic"],"value":"{mine}"}}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["value"], mine);
    let stored = std::fs::read_to_string(state.join("api_keys.json")).unwrap();
    assert!(
        stored.contains("carol") && !stored.contains(mine),
        "{stored}"
    );
    // A reload keeps run-time keys.
    gw.reload_signal();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        get_with(&gw, "/required", &[("x-api-key", mine)]).status,
        200
    );
    // kill -9, then a new process on the same state dir.
    let st = Command::new("kill")
        .args(["-KILL", &gw.pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    drop(gw);
    let gw2 = Gateway::start(&cfg);
    assert_eq!(
        get_with(&gw2, "/required", &[("x-api-key", mine)]).status,
        200
    );
    assert_eq!(
        get_with(&gw2, "/required", &[("x-api-key", KEY)]).status,
        200
    );
    let _ = std::fs::remove_dir_all(&state);
}

// ---------------------------------------------------------------------------------------------
// JWT
// ---------------------------------------------------------------------------------------------

struct Jwt {
    dir: std::path::PathBuf,
}

impl Jwt {
    fn new() -> Jwt {
        let dir = temp_dir("jwt-keys");
        assert_eq!(peer(&dir, json!([{ "op": "keys" }]))[0], "ok");
        Jwt { dir }
    }

    /// Mints one token per job (fields of the peer's `jwt` op).
    fn mint(&self, jobs: Vec<Value>) -> Vec<String> {
        let jobs: Vec<Value> = jobs
            .into_iter()
            .map(|mut j| {
                j["op"] = json!("jwt");
                j
            })
            .collect();
        peer(&self.dir, Value::Array(jobs))
            .into_iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    }
}

fn claims(extra: Value) -> Value {
    let mut c = json!({
        "iss": "https://issuer.example.com",
        "aud": "shop",
        "sub": "user-1",
        "exp": now() + 300,
        "iat": now(),
        "scope": "orders:read profile",
    });
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

fn jwt_config(origin: SocketAddr, jwks_file: &Path) -> String {
    format!(
        r#"
[[upstreams]]
name = "app"
targets = ["{origin}"]

[[authorizers]]
name = "users"
type = "jwt"
issuer = "https://issuer.example.com"
audience = ["shop"]
jwks_file = "{}"
leeway_s = 30

[[authorizers]]
name = "hs"
type = "jwt"
issuer = "https://issuer.example.com"
audience = ["shop"]
secret = "{SECRET}"

[[usage_plans]]
name = "basic"
apis = ["shop/$default"]

[[api_keys]]
name = "alice"
value = "{KEY}"
plans = ["basic"]

[[apis]]
name = "shop"

[[apis.routes]]
route = "GET /jwt"
integration = {{ type = "http", upstream = "app" }}
auth = "jwt:users"

[[apis.routes]]
route = "GET /hs"
integration = {{ type = "http", upstream = "app" }}
auth = "jwt:hs"

[[apis.routes]]
route = "GET /scoped"
integration = {{ type = "http", upstream = "app" }}
auth = "jwt:users"
scopes = ["orders:read", "profile"]

[[apis.routes]]
route = "GET /admin"
integration = {{ type = "http", upstream = "app" }}
auth = "jwt:users"
scopes = ["orders:write"]

[[apis.routes]]
route = "GET /both"
integration = {{ type = "http", upstream = "app" }}
auth = "jwt:users"
api_key_required = true
"#,
        jwks_file.display()
    )
}

#[test]
fn jwt_every_algorithm_is_accepted_and_sub_goes_upstream() {
    let j = Jwt::new();
    let origin = principal_origin();
    let gw = Gateway::start(&jwt_config(origin.addr, &j.dir.join("jwks.json")));
    let algs = [
        ("RS256", "rsa"),
        ("RS384", "rsa"),
        ("RS512", "rsa"),
        ("PS256", "rsa"),
        ("PS384", "rsa"),
        ("PS512", "rsa"),
        ("ES256", "ec256"),
        ("ES384", "ec384"),
        ("EdDSA", "ed"),
    ];
    let mut jobs: Vec<Value> = algs
        .iter()
        .map(|(alg, kid)| json!({"alg": alg, "kid": kid, "claims": claims(json!({"sub": format!("sub-{alg}")}))}))
        .collect();
    for alg in ["HS256", "HS384", "HS512"] {
        jobs.push(json!({"alg": alg, "secret": SECRET, "claims": claims(json!({"sub": format!("sub-{alg}")}))}));
    }
    let tokens = j.mint(jobs);
    for (i, (alg, _)) in algs.iter().enumerate() {
        let r = bearer(&gw, "/jwt", &tokens[i]);
        assert_eq!(r.status, 200, "{alg}: {}", r.text());
        assert_eq!(r.text(), format!("sub-{alg}"));
        // Cached: the same answer again.
        let r = bearer(&gw, "/jwt", &tokens[i]);
        assert_eq!(r.text(), format!("sub-{alg}"));
    }
    for (k, alg) in ["HS256", "HS384", "HS512"].iter().enumerate() {
        let r = bearer(&gw, "/hs", &tokens[algs.len() + k]);
        assert_eq!(r.status, 200, "{alg}: {}", r.text());
        assert_eq!(r.text(), format!("sub-{alg}"));
        // An HMAC token is not accepted by the asymmetric authorizer.
        assert_denied(&bearer(&gw, "/jwt", &tokens[algs.len() + k]), 401, alg);
    }
    // A client-sent x-principal-id never reaches the upstream as is.
    let r = get_with(
        &gw,
        "/jwt",
        &[
            ("Authorization", &format!("Bearer {}", tokens[0])),
            ("x-principal-id", "admin"),
        ],
    );
    assert_eq!(r.text(), "sub-RS256");
}

#[test]
fn jwt_rejections() {
    let j = Jwt::new();
    let origin = principal_origin();
    let gw = Gateway::start(&jwt_config(origin.addr, &j.dir.join("jwks.json")));
    let t = now();
    let cases: Vec<(&str, Value)> = vec![
        (
            "expired",
            json!({"alg":"RS256","kid":"rsa","claims":claims(json!({"exp": t - 120}))}),
        ),
        (
            "not yet valid",
            json!({"alg":"RS256","kid":"rsa","claims":claims(json!({"nbf": t + 120}))}),
        ),
        (
            "wrong issuer",
            json!({"alg":"RS256","kid":"rsa","claims":claims(json!({"iss":"https://evil.example.com"}))}),
        ),
        (
            "wrong audience",
            json!({"alg":"RS256","kid":"rsa","claims":claims(json!({"aud":"other"}))}),
        ),
        (
            "no exp",
            json!({"alg":"RS256","kid":"rsa","claims":claims(json!({"exp": null}))}),
        ),
        (
            "no aud",
            json!({"alg":"RS256","kid":"rsa","claims":claims(json!({"aud": null}))}),
        ),
        (
            "signed by another key with a known kid",
            json!({"alg":"RS256","kid":"rsa","sign_kid":"rsa2","claims":claims(json!({}))}),
        ),
        (
            "unknown kid",
            json!({"alg":"RS256","kid":"rsa2","claims":claims(json!({}))}),
        ),
        (
            "ES384 with the P-256 key's kid",
            json!({"alg":"ES384","kid":"ec256","sign_kid":"ec384","claims":claims(json!({}))}),
        ),
        // Key confusion: HS256 signed with the RSA public key's PEM as the HMAC secret.
        (
            "HS256 keyed with the RSA public key",
            json!({"alg":"HS256","kid":"rsa","raw_hs_key_file": j.dir.join("rsa.pub.pem"),"claims":claims(json!({}))}),
        ),
        // jku/x5u never make the gateway fetch anything.
        (
            "jku elsewhere",
            json!({"alg":"RS256","kid":"rsa2","sign_kid":"rsa2","headers":{"jku":"http://127.0.0.1:1/jwks.json"},"claims":claims(json!({}))}),
        ),
        // A critical extension the gateway does not understand (RFC 7515 4.1.11).
        (
            "crit",
            json!({"alg":"RS256","kid":"rsa","headers":{"crit":["exp-policy-v9"],"exp-policy-v9":{"deny":true}},"claims":claims(json!({}))}),
        ),
    ];
    let tokens = j.mint(cases.iter().map(|(_, v)| v.clone()).collect());
    for ((what, _), tok) in cases.iter().zip(&tokens) {
        assert_denied(&bearer(&gw, "/jwt", tok), 401, what);
    }
    // Within the 30 s leeway is fine.
    let ok = j.mint(vec![
        json!({"alg":"RS256","kid":"rsa","claims":claims(json!({"exp": t - 10, "nbf": t + 10}))}),
    ]);
    assert_eq!(bearer(&gw, "/jwt", &ok[0]).status, 200);
    // alg none, garbage, missing or other schemes.
    let none = format!(
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
        tokens[0].split('.').nth(1).unwrap()
    );
    assert_denied(&bearer(&gw, "/jwt", &none), 401, "alg none");
    assert_denied(&bearer(&gw, "/jwt", "not.a.jwt"), 401, "garbage");
    assert_denied(&gw.get("/jwt"), 401, "no Authorization");
    // Each 401 names the scheme (RFC 9110 15.5.2), as Envoy's and API Gateway's JWT checks do.
    assert_eq!(gw.get("/jwt").header("www-authenticate"), Some("Bearer"));
    assert_eq!(
        bearer(&gw, "/jwt", "not.a.jwt").header("www-authenticate"),
        Some("Bearer error=\"invalid_token\"")
    );
    assert_denied(
        &get_with(
            &gw,
            "/jwt",
            &[("Authorization", &format!("Basic {}", ok[0]))],
        ),
        401,
        "Basic scheme",
    );
    // A bare token (no scheme) is taken, as Amazon API Gateway's JWT authorizers do.
    let r = get_with(&gw, "/jwt", &[("Authorization", ok[0].as_str())]);
    assert_eq!(r.status, 200, "{}", r.text());
    // A tampered payload of a good (and cached) token.
    let parts: Vec<&str> = ok[0].split('.').collect();
    let mut payload = parts[1].to_string();
    let last = payload.pop().unwrap();
    payload.push(if last == 'A' { 'B' } else { 'A' });
    let tampered = format!("{}.{}.{}", parts[0], payload, parts[2]);
    assert_denied(&bearer(&gw, "/jwt", &tampered), 401, "tampered payload");
    // Two Authorization fields: the checked one and the one an upstream reads could differ.
    let r = get_with(
        &gw,
        "/jwt",
        &[
            ("Authorization", &format!("Bearer {}", ok[0])),
            ("Authorization", &format!("Bearer {tampered}")),
        ],
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(
        r.message(),
        "Bad Request: more than one Authorization header"
    );
    assert_eq!(
        origin.request_count(),
        2,
        "refused requests never go upstream (two accepted ones did)"
    );
}

#[test]
fn jwt_scopes_and_api_key_on_top() {
    let j = Jwt::new();
    let origin = principal_origin();
    let gw = Gateway::start(&jwt_config(origin.addr, &j.dir.join("jwks.json")));
    let toks = j.mint(vec![
        json!({"alg":"ES256","kid":"ec256","claims":claims(json!({}))}),
        json!({"alg":"ES256","kid":"ec256","claims":claims(json!({"scope": null, "scp": ["profile", "orders:read"]}))}),
        json!({"alg":"ES256","kid":"ec256","claims":claims(json!({"scope": "profile"}))}),
    ]);
    assert_eq!(bearer(&gw, "/scoped", &toks[0]).status, 200, "scope string");
    assert_eq!(bearer(&gw, "/scoped", &toks[1]).status, 200, "scp array");
    assert_denied(&bearer(&gw, "/scoped", &toks[2]), 403, "one scope missing");
    // Twice: the cached token is checked against the route's scopes too.
    assert_denied(
        &bearer(&gw, "/admin", &toks[0]),
        403,
        "orders:write missing",
    );
    assert_denied(
        &bearer(&gw, "/admin", &toks[0]),
        403,
        "orders:write missing, cached",
    );
    // jwt + api_key_required.
    assert_denied(&bearer(&gw, "/both", &toks[0]), 403, "no api key");
    let auth = format!("Bearer {}", toks[0]);
    let r = get_with(
        &gw,
        "/both",
        &[("Authorization", &auth), ("x-api-key", KEY)],
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "user-1");
    assert_denied(
        &get_with(&gw, "/both", &[("x-api-key", KEY)]),
        401,
        "api key but no token",
    );
}

#[test]
fn jwks_uri_rotation_and_refresh() {
    let j = Jwt::new();
    peer(
        &j.dir,
        json!([{"op":"jwks","kids":["rsa"],"out":"jwks-a.json"},{"op":"jwks","kids":["rsa2"],"out":"jwks-b.json"}]),
    );
    let a = std::fs::read_to_string(j.dir.join("jwks-a.json")).unwrap();
    let b = std::fs::read_to_string(j.dir.join("jwks-b.json")).unwrap();
    let current = Arc::new(Mutex::new(a));
    let cur = current.clone();
    let idp = Origin::start(move |_| {
        Response::ok(cur.lock().unwrap().clone())
            .header("content-type", "application/json")
            .header("cache-control", "public, max-age=1")
    });
    let origin = principal_origin();
    let cfg = format!(
        r#"
[[upstreams]]
name = "app"
targets = ["{}"]

[[authorizers]]
name = "users"
type = "jwt"
audience = ["shop"]
jwks_uri = "http://{}/.well-known/jwks.json"

[[apis]]
name = "shop"

[[apis.routes]]
route = "GET /jwt"
integration = {{ type = "http", upstream = "app" }}
auth = "jwt:users"
"#,
        origin.addr, idp.addr
    );
    let gw = Gateway::start(&cfg);
    assert!(idp.request_count() >= 1, "fetched at start");
    let toks = j.mint(vec![
        json!({"alg":"RS256","kid":"rsa","claims":claims(json!({"sub":"old"}))}),
        json!({"alg":"RS256","kid":"rsa2","claims":claims(json!({"sub":"new"}))}),
        json!({"alg":"RS256","kid":"nope","sign_kid":"rsa2","claims":claims(json!({"sub":"x"}))}),
    ]);
    // Verified (and cached) by both workers: new connections land on either.
    for _ in 0..6 {
        assert_eq!(bearer(&gw, "/jwt", &toks[0]).text(), "old");
    }
    // max-age=1: the refresher fetches again about every second.
    let n0 = idp.request_count();
    std::thread::sleep(Duration::from_millis(2600));
    let n1 = idp.request_count();
    assert!(
        n1 >= n0 + 2,
        "background refresh honours max-age ({n0} -> {n1})"
    );
    // Rotation: the IdP now publishes only the new key.
    *current.lock().unwrap() = b;
    let r = bearer(&gw, "/jwt", &toks[1]);
    assert_eq!(
        r.status,
        200,
        "new kid accepted after a refresh: {}",
        r.text()
    );
    assert_eq!(r.text(), "new");
    // The old key left the set: its token is refused by every worker, cached or not.
    for i in 0..8 {
        assert_denied(
            &bearer(&gw, "/jwt", &toks[0]),
            401,
            &format!("removed key, try {i}"),
        );
    }
    // Unknown kids: at most one early refresh per interval, never a fetch storm.
    let n2 = idp.request_count();
    for _ in 0..20 {
        assert_denied(&bearer(&gw, "/jwt", &toks[2]), 401, "unknown kid");
    }
    let n3 = idp.request_count();
    assert!(
        n3 <= n2 + 3,
        "unknown kids do not hammer the IdP ({n2} -> {n3})"
    );
}

#[test]
fn jwks_new_kid_requests_wait_for_the_refresh_under_way() {
    let j = Jwt::new();
    peer(
        &j.dir,
        json!([{"op":"jwks","kids":["rsa"],"out":"jwks-a.json"},{"op":"jwks","kids":["rsa","rsa2"],"out":"jwks-ab.json"}]),
    );
    let a = std::fs::read_to_string(j.dir.join("jwks-a.json")).unwrap();
    let ab = std::fs::read_to_string(j.dir.join("jwks-ab.json")).unwrap();
    let current = Arc::new(Mutex::new((a, Duration::ZERO)));
    let cur = current.clone();
    let idp = Origin::start(move |_| {
        let (body, delay) = cur.lock().unwrap().clone();
        Response::ok(body)
            .header("content-type", "application/json")
            .header("cache-control", "max-age=300")
            .delay(delay)
    });
    let gw = Gateway::start(&jwks_uri_config(idp.addr));
    let toks = j.mint(vec![
        json!({"alg":"RS256","kid":"rsa2","claims":{"exp": now() + 300}}),
        json!({"alg":"RS256","kid":"nope","sign_kid":"rsa2","claims":{"exp": now() + 300}}),
    ]);
    // The IdP publishes a new key and answers slowly; requests carrying it arrive, on both
    // workers, while the early refresh the first one asked for is under way.
    *current.lock().unwrap() = (ab, Duration::from_millis(800));
    let n0 = idp.request_count();
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let mut threads = Vec::new();
        for _ in 0..6 {
            threads.push(s.spawn(|| bearer(&gw, "/jwt", &toks[0])));
            std::thread::sleep(Duration::from_millis(50));
        }
        threads
            .into_iter()
            .map(|t| t.join().unwrap().status)
            .collect()
    });
    assert_eq!(statuses, [200; 6], "every request waited for the refresh");
    assert_eq!(
        idp.request_count(),
        n0 + 1,
        "one early fetch, not one per request"
    );
    // A kid still unknown after that refresh is refused at once: no wait, no fetch.
    let t = std::time::Instant::now();
    assert_denied(
        &bearer(&gw, "/jwt", &toks[1]),
        401,
        "kid unknown after the refresh",
    );
    // (A wait for a refresh would take 2.5 s; the bound leaves room for a loaded machine.)
    assert!(
        t.elapsed() < Duration::from_millis(2000),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(idp.request_count(), n0 + 1);
}

/// A JWT authorizer whose keys come from `idp`'s `/jwks`, guarding `GET /jwt` (a mock).
fn jwks_uri_config(idp: SocketAddr) -> String {
    format!(
        r#"
[[authorizers]]
name = "users"
type = "jwt"
jwks_uri = "http://{idp}/jwks"

[[apis]]
name = "shop"

[[apis.routes]]
route = "GET /jwt"
integration = {{ type = "mock", body = "in" }}
auth = "jwt:users"
"#
    )
}

#[test]
fn jwks_uri_down_at_start_denies_then_recovers() {
    let j = Jwt::new();
    peer(
        &j.dir,
        json!([{"op":"jwks","kids":["ed"],"out":"jwks-ed.json"}]),
    );
    let body = std::fs::read_to_string(j.dir.join("jwks-ed.json")).unwrap();
    let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let up2 = up.clone();
    let idp = Origin::start(move |_| {
        if up2.load(std::sync::atomic::Ordering::SeqCst) {
            Response::ok(body.clone()).header("cache-control", "max-age=60")
        } else {
            Response::new(503)
        }
    });
    let gw = Gateway::start(&jwks_uri_config(idp.addr));
    let tok = j.mint(vec![
        json!({"alg":"EdDSA","kid":"ed","claims":{"exp": now() + 300}}),
    ]);
    assert_denied(&bearer(&gw, "/jwt", &tok[0]), 401, "no keys yet");
    up.store(true, std::sync::atomic::Ordering::SeqCst);
    // Retried in the background (5 s after a failure).
    assert!(wait_until(Duration::from_secs(8), || bearer(
        &gw, "/jwt", &tok[0]
    )
    .status
        == 200));
}

/// A one-document HTTPS server (rustls, a self-signed certificate for `localhost` and
/// 127.0.0.1): serves `body` to every request; returns its address, the certificate's PEM and
/// the number of requests it answered (a refused handshake answers none).
fn https_idp(body: String) -> (SocketAddr, String, Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::Read;
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("certificate");
    let pem = ck.cert.pem();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![ck.cert.der().clone()], key)
    .expect("server config");
    let cfg = Arc::new(cfg);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let served2 = served.clone();
    std::thread::spawn(move || {
        for tcp in l.incoming().flatten() {
            let _ = tcp.set_read_timeout(Some(Duration::from_secs(3)));
            let conn = rustls::ServerConnection::new(cfg.clone()).unwrap();
            let mut s = rustls::StreamOwned::new(conn, tcp);
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while find(&req, b"\r\n\r\n").is_none() {
                match s.read(&mut buf) {
                    Ok(n) if n > 0 => req.extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
            if find(&req, b"\r\n\r\n").is_none() {
                continue;
            }
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncache-control: max-age=60\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            if s.write_all(resp.as_bytes()).is_ok() {
                served2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            s.conn.send_close_notify();
            let _ = s.flush();
        }
    });
    (addr, pem, served)
}

#[test]
fn jwks_uri_over_https() {
    let j = Jwt::new();
    peer(
        &j.dir,
        json!([{"op":"jwks","kids":["rsa"],"out":"jwks.json"}]),
    );
    let body = std::fs::read_to_string(j.dir.join("jwks.json")).unwrap();
    let (idp, pem, served) = https_idp(body);
    let ca = j.dir.join("idp-ca.pem");
    std::fs::write(&ca, &pem).unwrap();
    let cfg = |extra: &str| {
        format!(
            r#"
[[authorizers]]
name = "users"
type = "jwt"
jwks_uri = "https://localhost:{}/.well-known/jwks.json"
{extra}

[[apis]]
name = "shop"

[[apis.routes]]
route = "GET /jwt"
integration = {{ type = "mock", body = "in" }}
auth = "jwt:users"
"#,
            idp.port()
        )
    };
    let tok = j.mint(vec![
        json!({"alg":"RS256","kid":"rsa","claims":claims(json!({"sub":"u"}))}),
    ]);
    // Trusting the IdP's certificate: keys fetched over TLS, tokens accepted.
    let gw = Gateway::start(&cfg(&format!("jwks_ca_file = \"{}\"", ca.display())));
    let r = bearer(&gw, "/jwt", &tok[0]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 1);
    drop(gw);
    // The default roots (Mozilla's) do not include a self-signed certificate: no keys, 401,
    // and the reason in the log.
    let gw = Gateway::start(&cfg(""));
    assert_denied(&bearer(&gw, "/jwt", &tok[0]), 401, "untrusted JWKS server");
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(
        wait_until(Duration::from_secs(3), || gw.stderr().contains("jwks")
            && gw.stderr().to_lowercase().contains("certificate")),
        "{}",
        gw.stderr()
    );
    // A CA file only goes with https://, and must hold a certificate.
    let (out, _) =
        check(&cfg(&format!("jwks_ca_file = \"{}\"", ca.display())).replace("https://", "http://"));
    let e = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success() && e.contains("authorizers[0].jwks_ca_file"),
        "{e}"
    );
    let empty = j.dir.join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let (out, _) = check(&cfg(&format!("jwks_ca_file = \"{}\"", empty.display())));
    let e = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success() && e.contains("no certificate"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// SigV4
// ---------------------------------------------------------------------------------------------

fn sigv4_config(origin: SocketAddr) -> String {
    format!(
        r#"
[[upstreams]]
name = "app"
targets = ["{origin}"]

[[sigv4_credentials]]
access_key = "{AK}"
secret_key = "{SK}"
region = "us-east-1"
service = "execute-api"
principal = "ci-bot"

[[apis]]
name = "shop"

[[apis.routes]]
route = "ANY /signed/{{p+}}"
integration = {{ type = "http", upstream = "app" }}
auth = "sigv4"
"#
    )
}

fn sign_job(method: &str, url: &str, headers: Value, body: &str) -> Value {
    json!({"op":"sign","method":method,"url":url,"headers":headers,"body":body,
           "access_key":AK,"secret_key":SK,"region":"us-east-1","service":"execute-api"})
}

/// Sends `method target` with the signed headers (plus `extra`) and `body`.
fn send_signed(
    gw: &Gateway,
    method: &str,
    target: &str,
    signed: &Value,
    extra: &[(&str, &str)],
    body: &str,
) -> RawResponse {
    let mut raw = format!("{method} {target} HTTP/1.1\r\nHost: {}\r\n", gw.addr);
    for (k, v) in signed["headers"].as_object().unwrap() {
        raw.push_str(&format!("{k}: {}\r\n", v.as_str().unwrap()));
    }
    for (k, v) in extra {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        raw.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    raw.push_str("\r\n");
    raw.push_str(body);
    gw.request(&raw)
}

#[test]
fn sigv4_header_form_accepts_and_detects_tampering() {
    let origin = principal_origin();
    let gw = Gateway::start(&sigv4_config(origin.addr));
    let base = format!("http://{}", gw.addr);
    let dir = temp_dir("sigv4");
    let old = amz_time(now() - 20 * 60);
    let mut stale = sign_job("GET", &format!("{base}/signed/a"), json!({}), "");
    stale["time"] = json!(old);
    let body = r#"{"order":42}"#;
    let res = peer(
        &dir,
        json!([
            sign_job(
                "GET",
                &format!("{base}/signed/items/7?b=2&a=x%20y"),
                json!({"x-custom": "one"}),
                ""
            ),
            sign_job(
                "POST",
                &format!("{base}/signed/orders"),
                json!({"content-type": "application/json"}),
                body
            ),
            sign_job(
                "POST",
                &format!("{base}/signed/orders"),
                json!({"x-amz-content-sha256": "UNSIGNED-PAYLOAD"}),
                body
            ),
            stale, // last: it sets the peer's clock
        ]),
    );
    // Accepted.
    let r = send_signed(&gw, "GET", "/signed/items/7?b=2&a=x%20y", &res[0], &[], "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "ci-bot");
    let r = send_signed(&gw, "POST", "/signed/orders", &res[1], &[], body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "ci-bot");
    assert_eq!(origin.last_request().body, body.as_bytes());
    // Tampered path, query, signed header, body.
    assert_denied(
        &send_signed(&gw, "GET", "/signed/items/8?b=2&a=x%20y", &res[0], &[], ""),
        403,
        "path",
    );
    assert_denied(
        &send_signed(&gw, "GET", "/signed/items/7?b=3&a=x%20y", &res[0], &[], ""),
        403,
        "query",
    );
    let mut h = res[0].clone();
    h["headers"]["x-custom"] = json!("two");
    assert_denied(
        &send_signed(&gw, "GET", "/signed/items/7?b=2&a=x%20y", &h, &[], ""),
        403,
        "header",
    );
    assert_denied(
        &send_signed(
            &gw,
            "POST",
            "/signed/orders",
            &res[1],
            &[],
            r#"{"order":43}"#,
        ),
        403,
        "body",
    );
    assert_denied(
        &send_signed(&gw, "PUT", "/signed/orders", &res[1], &[], body),
        403,
        "method",
    );
    // Outside the 15-minute window.
    assert_denied(
        &send_signed(&gw, "GET", "/signed/a", &res[3], &[], ""),
        403,
        "stale date",
    );
    // UNSIGNED-PAYLOAD: the body is not covered.
    let r = send_signed(&gw, "POST", "/signed/orders", &res[2], &[], "anything");
    assert_eq!(r.status, 200, "{}", r.text());
    // Wrong secret / unknown key id / nothing at all.
    let other = peer(
        &dir,
        json!([{"op":"sign","method":"GET","url":format!("{base}/signed/a"),"access_key":AK,
                "secret_key":"not-the-secret-key-at-all","region":"us-east-1","service":"execute-api"},
               {"op":"sign","method":"GET","url":format!("{base}/signed/a"),"access_key":"AKIDOTHER",
                "secret_key":SK,"region":"us-east-1","service":"execute-api"},
               {"op":"sign","method":"GET","url":format!("{base}/signed/a"),"access_key":AK,
                "secret_key":SK,"region":"eu-west-1","service":"execute-api"}]),
    );
    assert_denied(
        &send_signed(&gw, "GET", "/signed/a", &other[0], &[], ""),
        403,
        "wrong secret",
    );
    assert_denied(
        &send_signed(&gw, "GET", "/signed/a", &other[1], &[], ""),
        403,
        "unknown key",
    );
    assert_denied(
        &send_signed(&gw, "GET", "/signed/a", &other[2], &[], ""),
        403,
        "other region",
    );
    assert_denied(&gw.get("/signed/a"), 401, "unsigned");
    assert_eq!(
        gw.get("/signed/a").header("www-authenticate"),
        Some("AWS4-HMAC-SHA256")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigv4_presigned_urls() {
    let origin = principal_origin();
    let gw = Gateway::start(&sigv4_config(origin.addr));
    let base = format!("http://{}", gw.addr);
    let dir = temp_dir("sigv4p");
    let mut p1 = sign_job("GET", &format!("{base}/signed/file?v=1"), json!({}), "");
    p1["presign"] = json!(300);
    let mut p2 = sign_job("GET", &format!("{base}/signed/file"), json!({}), "");
    p2["presign"] = json!(60);
    p2["time"] = json!(amz_time(now() - 120));
    let mut p3 = sign_job("GET", &format!("{base}/signed/file"), json!({}), "");
    p3["presign"] = json!(0);
    let res = peer(&dir, json!([p1, p2, p3]));
    let target = |v: &Value| {
        let url = v["url"].as_str().unwrap();
        url[url.find("/signed").unwrap()..].to_string()
    };
    let t1 = target(&res[0]);
    let r = send_signed(&gw, "GET", &t1, &json!({"headers":{}}), &[], "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "ci-bot");
    assert_denied(
        &send_signed(
            &gw,
            "GET",
            &t1.replace("v=1", "v=2"),
            &json!({"headers":{}}),
            &[],
            "",
        ),
        403,
        "tampered query",
    );
    assert_denied(
        &send_signed(
            &gw,
            "GET",
            &t1.replace("/file", "/other"),
            &json!({"headers":{}}),
            &[],
            "",
        ),
        403,
        "tampered path",
    );
    // Expired (signed 120 s ago for 60 s).
    assert_denied(
        &send_signed(
            &gw,
            "GET",
            &target(&res[1]),
            &json!({"headers":{}}),
            &[],
            "",
        ),
        403,
        "expired presigned URL",
    );
    // Valid for 0 s (AWS takes 1 s to 7 days), even used in the second it was signed.
    assert!(res[2]["url"].as_str().unwrap().contains("X-Amz-Expires=0"));
    assert_denied(
        &send_signed(
            &gw,
            "GET",
            &target(&res[2]),
            &json!({"headers":{}}),
            &[],
            "",
        ),
        403,
        "presigned URL valid for 0 s",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

#[test]
fn auth_config_errors_name_the_key() {
    let route = |extra: &str| {
        format!(
            "[[apis]]\nname = \"a\"\n[[apis.routes]]\nroute = \"GET /x\"\nintegration = {{ type = \"mock\" }}\n{extra}\n"
        )
    };
    let cases = [
        (route("auth = \"jwt:nope\""), "apis[0].routes[0].auth"),
        (route("auth = \"magic\""), "apis[0].routes[0].auth"),
        (route("auth = \"authorizer:nope\""), "apis[0].routes[0].auth"),
        (
            "[[authorizers]]\nname = \"r\"\ntype = \"request\"\nupstream = \"none\"\nidentity_sources = [\"header.a\"]\n"
                .to_string(),
            "authorizers[0].upstream",
        ),
        (route("scopes = [\"a\"]"), "apis[0].routes[0].scopes"),
        (route("auth = \"sigv4\""), "apis[0].routes[0].auth"),
        (
            "[[authorizers]]\nname = \"x\"\ntype = \"jwt\"\n".to_string(),
            "authorizers[0].jwks_uri",
        ),
        (
            "[[authorizers]]\nname = \"x\"\ntype = \"jwt\"\nsecret = \"short\"\n".to_string(),
            "authorizers[0].secret",
        ),
        (
            "[[authorizers]]\nname = \"x\"\ntype = \"jwt\"\njwks_uri = \"ftp://idp/jwks\"\n"
                .to_string(),
            "authorizers[0].jwks_uri",
        ),
        (
            "[[api_keys]]\nname = \"k\"\nvalue = \"short\"\n".to_string(),
            "api_keys[0].value",
        ),
        // An empty audience list would check no audience (every token's `aud` passes).
        (
            "[[authorizers]]\nname = \"x\"\ntype = \"jwt\"\nsecret = \"0123456789abcdef0123456789abcdef\"\naudience = []\n"
                .to_string(),
            "authorizers[0].audience",
        ),
    ];
    for (toml, key) in cases {
        let (out, _) = check(&toml);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted: {toml}");
        assert!(err.contains(&format!("key `{key}`")), "{key}: {err}");
    }
}

/// A key in two usage plans that cover one API stage (as Amazon API Gateway refuses): a config
/// error naming the file, the line of the key's `plans` and the key; admin `POST /api-keys`
/// answers 400 and adds nothing. Plans of different stages are fine.
#[test]
fn a_key_in_two_plans_of_one_stage_is_refused() {
    let plans = r#"
[[apis]]
name = "shop"
[apis.stages.prod]
[apis.stages.test]
[[apis.routes]]
route = "GET /x"
integration = { type = "mock" }
api_key_required = true
[[usage_plans]]
name = "gold"
apis = ["shop/prod"]
[[usage_plans]]
name = "silver"
apis = ["shop/test", "shop/prod"]
[[usage_plans]]
name = "bronze"
apis = ["shop/test"]
[[api_keys]]
name = "fine"
value = "a-key-in-two-stages-000001"
plans = ["gold", "bronze"]
"#;
    let bad = format!(
        "{plans}[[api_keys]]\nname = \"twice\"\nvalue = \"a-key-in-two-plans-0000001\"\nplans = [\"gold\", \"silver\"]\n"
    );
    let (out, path) = check(&bad);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let line = bad
        .lines()
        .position(|l| l.starts_with("plans = [\"gold\", \"silver\"]"))
        .unwrap()
        + 1
        // `check` puts the common [server] and [admin] header first.
        + HEADER.matches('\n').count()
        + 1;
    assert!(
        err.contains(&format!(
            "{}:{line}: key `api_keys[1].plans`",
            path.display()
        )),
        "{err}"
    );
    assert!(
        err.contains("`twice`")
            && err.contains("`gold`")
            && err.contains("`silver`")
            && err.contains("`shop/prod`"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let (out, _) = check(plans);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let gw = Gateway::start(plans);
    let post_key = |body: &str| admin_json(gw.admin_addr, "POST", "/api-keys", body);
    let r = post_key(r#"{"name":"twice","plans":["bronze","silver"]}"#);
    assert_eq!(r.status, 400, "{}", r.text());
    let m = r.message();
    assert!(
        m.contains("`bronze`") && m.contains("`silver`") && m.contains("`shop/test`"),
        "{m}"
    );
    assert!(!admin_json(gw.admin_addr, "GET", "/api-keys", "")
        .text()
        .contains("twice"));
    // One plan listed twice: a typo to name, in the config and in the admin API alike.
    let r = post_key(r#"{"name":"dup","plans":["gold","gold"]}"#);
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.message().contains("`gold` is listed twice"),
        "{}",
        r.text()
    );
    let (out, _) = check(&format!(
        "{plans}[[api_keys]]\nname = \"dup\"\nvalue = \"a-key-in-one-plan-twice-01\"\nplans = [\"gold\", \"gold\"]\n"
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("key `api_keys[1].plans`: API key `dup`: usage plan `gold` is listed twice"),
        "{err}"
    );
    let r = post_key(r#"{"name":"ok","plans":["gold","bronze"]}"#);
    assert_eq!(r.status, 201, "{}", r.text());
    // The message of a reload of `cfg` (with the config key `fine` in gold only), refused.
    let refused_reload = |cfg: &str| {
        gw.write_config(&cfg.replace("plans = [\"gold\", \"bronze\"]", "plans = [\"gold\"]"));
        let r = admin_json(gw.admin_addr, "POST", "/reload", "");
        assert_eq!(r.status, 400, "{}", r.text());
        r.message()
    };
    // A reload that would put that run-time key in two plans of one stage is refused too.
    let m = refused_reload(&plans.replace(
        "name = \"bronze\"\napis = [\"shop/test\"]",
        "name = \"bronze\"\napis = [\"shop/test\", \"shop/prod\"]",
    ));
    assert!(
        m.contains("`ok`")
            && m.contains("`gold`")
            && m.contains("`bronze`")
            && m.contains("`shop/prod`"),
        "{m}"
    );
    // So is one that drops a plan the run-time key holds (it would be refused everywhere,
    // still listing the plan), and so would a start be.
    let m = refused_reload(&plans.replace(
        "[[usage_plans]]\nname = \"bronze\"\napis = [\"shop/test\"]\n",
        "",
    ));
    assert!(
        m.contains("`ok`")
            && m.contains("`bronze` is not defined")
            && m.contains("DELETE /api-keys/ok"),
        "{m}"
    );
    gw.write_config(plans);
    let r = admin_json(gw.admin_addr, "POST", "/reload", "");
    assert_eq!(r.status, 200, "{}", r.text());
}

// ---------------------------------------------------------------------------------------------
// Request authorizers
// ---------------------------------------------------------------------------------------------

/// An authorizer deciding on `identity["header.authorization"]`; records each call's body.
fn authorizer_origin() -> Origin {
    Origin::start(|r| {
        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        let who = v["identity"]["header.authorization"].as_str().unwrap_or("");
        match who {
            "allow-me" => Response::ok(
                json!({"allow": true, "principal": "p-1", "context": {"tier": "gold"}}).to_string(),
            )
            .header("content-type", "application/json"),
            "deny-me" => Response::ok(r#"{"allow":false}"#),
            "slow" => Response::ok(r#"{"allow":true}"#).delay(Duration::from_millis(2500)),
            "broken" => Response::new(500).body("oops"),
            "garbage" => Response::ok("not json"),
            _ => Response::ok(r#"{"allow":false}"#),
        }
    })
}

fn authorizer_config(origin: SocketAddr, authz: SocketAddr, ttl: u64) -> String {
    format!(
        r#"
[[upstreams]]
name = "app"
targets = ["{origin}"]

[[upstreams]]
name = "authz"
targets = ["{authz}"]
timeout_ms = 1000
connect_timeout_ms = 300

[[authorizers]]
name = "custom"
type = "request"
upstream = "authz"
path = "/authorize"
identity_sources = ["header.authorization"]
ttl_s = {ttl}

[[apis]]
name = "shop"

[[apis.routes]]
route = "GET /custom"
integration = {{ type = "http", upstream = "app" }}
auth = "authorizer:custom"
"#
    )
}

#[test]
fn request_authorizer_allows_denies_and_caches() {
    let origin = principal_origin();
    let authz = authorizer_origin();
    let gw = Gateway::start(&authorizer_config(origin.addr, authz.addr, 300));
    // Missing identity source: 401 without a call.
    assert_denied(&gw.get("/custom"), 401, "no identity source");
    assert_denied(
        &get_with(&gw, "/custom", &[("Authorization", "")]),
        401,
        "empty identity source",
    );
    assert_eq!(authz.request_count(), 0);
    // Allow: one call, then the cache, whichever of the two workers serves the connection
    // (a fresh connection each time: all ten on one worker is a chance of 1 in 2^9).
    for _ in 0..10 {
        let mut c = Client::connect(gw.addr);
        c.send(b"GET /custom HTTP/1.1\r\nHost: t\r\nAuthorization: allow-me\r\nx-principal-id: forged\r\n\r\n");
        let r = c.read_response().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), "p-1");
    }
    assert_eq!(authz.request_count(), 1, "decision cached for the gateway");
    let mut c = Client::connect(gw.addr);
    let call = authz.last_request();
    assert_eq!(call.method, "POST");
    assert_eq!(call.path, "/authorize");
    let body: Value = serde_json::from_slice(&call.body).unwrap();
    assert_eq!(body["identity"]["header.authorization"], "allow-me");
    assert_eq!(body["path"], "/custom");
    // Deny: 403, cached too.
    for _ in 0..3 {
        c.send(b"GET /custom HTTP/1.1\r\nHost: t\r\nAuthorization: deny-me\r\n\r\n");
        assert_denied(&c.read_response().unwrap(), 403, "denied");
    }
    assert_eq!(authz.request_count(), 2);
    assert_eq!(origin.request_count(), 10);
}

#[test]
fn request_authorizer_down_slow_or_broken_is_5xx_never_allow() {
    let origin = principal_origin();
    let authz = authorizer_origin();
    let gw = Gateway::start(&authorizer_config(origin.addr, authz.addr, 300));
    let r = get_with(&gw, "/custom", &[("Authorization", "slow")]);
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.message(), "Authorizer timed out");
    for who in ["broken", "garbage"] {
        let r = get_with(&gw, "/custom", &[("Authorization", who)]);
        assert_eq!(r.status, 500, "{who}: {}", r.text());
        assert_eq!(r.message(), "Authorizer error");
    }
    assert_eq!(origin.request_count(), 0);
    // An authorizer nobody listens on.
    let gw2 = Gateway::start(&authorizer_config(origin.addr, dead_addr(), 300));
    let r = get_with(&gw2, "/custom", &[("Authorization", "allow-me")]);
    assert_eq!(r.status, 500, "{}", r.text());
    assert_eq!(origin.request_count(), 0);
}

#[test]
fn request_authorizer_cache_expires_after_ttl() {
    let origin = principal_origin();
    let authz = authorizer_origin();
    let gw = Gateway::start(&authorizer_config(origin.addr, authz.addr, 1));
    let mut c = Client::connect(gw.addr);
    let mut ask = || {
        c.send(b"GET /custom HTTP/1.1\r\nHost: t\r\nAuthorization: allow-me\r\n\r\n");
        c.read_response().unwrap().status
    };
    assert_eq!(ask(), 200);
    assert_eq!(ask(), 200);
    assert_eq!(authz.request_count(), 1);
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(ask(), 200);
    assert_eq!(authz.request_count(), 2, "called again after ttl_s");
}

#[test]
fn sigv4_body_arriving_late_and_pipelined_requests() {
    let origin = principal_origin();
    let gw = Gateway::start(&sigv4_config(origin.addr));
    let base = format!("http://{}", gw.addr);
    let dir = temp_dir("sigv4late");
    let body = "x".repeat(100_000);
    let res = peer(
        &dir,
        json!([sign_job(
            "POST",
            &format!("{base}/signed/upload"),
            json!({}),
            &body
        )]),
    );
    let mut head = format!("POST /signed/upload HTTP/1.1\r\nHost: {}\r\n", gw.addr);
    for (k, v) in res[0]["headers"].as_object().unwrap() {
        head.push_str(&format!("{k}: {}\r\n", v.as_str().unwrap()));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    ));
    let mut c = Client::connect(gw.addr);
    c.send(head.as_bytes());
    // The gateway asks for the body itself (it must hash it before deciding).
    let interim = c.read_response().unwrap();
    assert_eq!(interim.status, 100);
    c.send(&body.as_bytes()[..50_000]);
    std::thread::sleep(Duration::from_millis(100));
    // The rest of the body, then a pipelined unsigned request on the same connection.
    let mut rest = body.as_bytes()[50_000..].to_vec();
    rest.extend_from_slice(b"GET /signed/a HTTP/1.1\r\nHost: t\r\n\r\n");
    c.send(&rest);
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "ci-bot");
    assert_eq!(origin.last_request().body.len(), body.len());
    let r = c.read_response().unwrap();
    assert_denied(&r, 401, "pipelined unsigned request");
    // A request the head alone refuses (no credentials; an unknown access key; a date out of
    // the window) is answered at once: no `100 Continue`, and no wait for the 8 MiB body it
    // announces and never sends.
    let signed = |change: &dyn Fn(&str, &str) -> String| {
        let mut h = String::new();
        for (k, v) in res[0]["headers"].as_object().unwrap() {
            h.push_str(&format!("{k}: {}\r\n", change(k, v.as_str().unwrap())));
        }
        h
    };
    let unknown_key = signed(&|k, v| {
        if k.eq_ignore_ascii_case("authorization") {
            v.replace(AK, "AKIDUNKNOWNUNKNOWN00")
        } else {
            v.to_string()
        }
    });
    let stale = signed(&|k, v| {
        if k.eq_ignore_ascii_case("x-amz-date") {
            "20200101T000000Z".to_string()
        } else {
            v.to_string()
        }
    });
    assert!(unknown_key.contains("AKIDUNKNOWN") && stale.contains("20200101T"));
    for (what, auth, status) in [
        ("no credentials", String::new(), 401),
        ("unknown access key", unknown_key, 403),
        ("stale date", stale, 403),
    ] {
        let mut c = Client::connect(gw.addr);
        c.send(
            format!(
                "POST /signed/upload HTTP/1.1\r\nHost: {}\r\n{auth}Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
                gw.addr,
                8 << 20
            )
            .as_bytes(),
        );
        let r = c.read_response().unwrap();
        assert_denied(&r, status, what);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn access_log_names_the_principal_and_the_key() {
    let j = Jwt::new();
    let origin = principal_origin();
    let cfg = format!(
        "{HEADER}\n[access_log]\npath = \"@DIR@/access.log\"\n{}",
        jwt_config(origin.addr, &j.dir.join("jwks.json"))
    );
    let gw = Gateway::start(&cfg);
    let tok = j.mint(vec![
        json!({"alg":"HS256","secret":SECRET,"claims":claims(json!({"sub":"logged-user"}))}),
    ]);
    let r = get_with(
        &gw,
        "/both",
        &[
            ("Authorization", &format!("Bearer {}", tok[0])),
            ("x-api-key", KEY),
            ("x-request-id", "with-auth"),
        ],
    );
    assert_eq!(r.status, 401, "HS token on the RSA authorizer");
    let tok = j.mint(vec![
        json!({"alg":"EdDSA","kid":"ed","claims":claims(json!({"sub":"logged-user"}))}),
    ]);
    let r = get_with(
        &gw,
        "/both",
        &[
            ("Authorization", &format!("Bearer {}", tok[0])),
            ("x-api-key", KEY),
            ("x-request-id", "ok-auth"),
        ],
    );
    assert_eq!(r.status, 200);
    let path = gw.dir.join("access.log");
    let mut line = Value::Null;
    assert!(wait_until(Duration::from_secs(3), || {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        match text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|e| e["request_id"] == "ok-auth")
        {
            Some(e) => {
                line = e;
                true
            }
            None => false,
        }
    }));
    assert_eq!(line["principal"], "logged-user", "{line}");
    assert_eq!(line["api_key"], "alice", "{line}");
    // A valid token without the key the route requires: refused, and logged with the
    // principal the token named.
    let r = get_with(
        &gw,
        "/both",
        &[
            ("Authorization", &format!("Bearer {}", tok[0])),
            ("x-request-id", "no-key"),
        ],
    );
    assert_eq!(r.status, 403);
    assert!(wait_until(Duration::from_secs(3), || {
        std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|e| e["request_id"] == "no-key" && e["principal"] == "logged-user")
    }));
    assert!(
        !std::fs::read_to_string(&path).unwrap().contains(KEY),
        "key values never reach the log"
    );
}

/// A reload whose config adds a key with the name or the value of a run-time (admin) key is
/// refused, as `POST /api-keys` refuses a duplicate: the old config stays, the answer says why,
/// and the run-time key keeps working.
#[test]
fn a_reload_cannot_shadow_a_run_time_key() {
    let gw = Gateway::start(&key_config(dead_addr()));
    let mine = "carol-run-time-key-value-0001";
    let body = format!(r#"{{"name":"carol","plans":["basic"],"value":"{mine}"}}"#);
    assert_eq!(
        admin_json(gw.admin_addr, "POST", "/api-keys", &body).status,
        201
    );
    let with_key = |name: &str, value: &str| {
        key_config(dead_addr()).replace(
            "[[apis]]",
            &format!("[[api_keys]]\nname = \"{name}\"\nvalue = \"{value}\"\nplans = [\"basic\"]\n\n[[apis]]"),
        ) + "\n[[apis.routes]]\nroute = \"GET /new\"\nintegration = { type = \"mock\", body = \"new\" }\n"
    };
    for (cfg, want) in [
        (
            with_key("carol", "another-value-entirely-00001"),
            "`api_keys[2].name`",
        ),
        (with_key("dora", mine), "`api_keys[2].value`"),
    ] {
        gw.write_config(&cfg);
        let r = admin_json(gw.admin_addr, "POST", "/reload", "");
        assert_eq!(r.status, 400, "{}", r.text());
        let m = r.message();
        assert!(
            m.contains(want) && m.contains("carol") && m.contains("run time"),
            "{m}"
        );
        // Named as every config error: file, line, key (the line of that key's table).
        let line = m
            .split_once(".toml:")
            .and_then(|(_, r)| r.split_once(": key `"))
            .map(|(n, _)| n.to_string())
            .unwrap_or_default();
        let cfg_line = cfg.lines().position(|l| l == "[[api_keys]]").unwrap();
        assert!(line.parse::<usize>().is_ok_and(|n| n > cfg_line), "{m}");
        // The old config stays: no new route, the run-time key unchanged.
        assert_eq!(gw.get("/new").status, 404);
        let r = get_with(&gw, "/required", &[("x-api-key", mine)]);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_denied(
            &get_with(
                &gw,
                "/required",
                &[("x-api-key", "another-value-entirely-00001")],
            ),
            403,
            "the refused config's key",
        );
    }
    // Once the run-time key is gone, the same config loads.
    assert_eq!(
        admin_json(gw.admin_addr, "DELETE", "/api-keys/carol", "").status,
        200
    );
    let r = admin_json(gw.admin_addr, "POST", "/reload", "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(gw.get("/new").status, 200);
    let r = get_with(&gw, "/required", &[("x-api-key", mine)]);
    assert_eq!(r.status, 200, "now the config's dora: {}", r.text());
}

#[test]
fn config_keys_follow_reloads_and_a_corrupt_key_file_stops_the_start() {
    let gw = Gateway::start(&key_config(dead_addr()));
    let new_key = "a-key-that-came-with-reload-01";
    gw.write_config(&key_config(dead_addr()).replace(KEY, new_key));
    gw.reload_signal();
    assert!(wait_until(Duration::from_secs(3), || {
        get_with(&gw, "/required", &[("x-api-key", new_key)]).status == 200
    }));
    assert_denied(
        &get_with(&gw, "/required", &[("x-api-key", KEY)]),
        403,
        "the old config key is gone",
    );

    let state = temp_dir("bad-state");
    std::fs::write(state.join("api_keys.json"), "{ not json").unwrap();
    let cfg = format!(
        "[server]\nlisten = [\"@LISTEN@\"]\nworkers = 1\nstate_dir = \"{}\"\n[admin]\nlisten = \"@ADMIN@\"\n{}",
        state.display(),
        key_config(dead_addr())
    );
    let err = Gateway::try_start(&cfg).err().expect("must not start");
    assert!(err.contains("api_keys.json"), "{err}");
    let _ = std::fs::remove_dir_all(&state);
}

/// An authorizer that allows anyone whose identity value is not "deny", as principal
/// `p-VALUE` (the first identity value it was sent).
fn echo_authorizer() -> Origin {
    Origin::start(|r| {
        let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        let who = v["identity"]
            .as_object()
            .and_then(|m| m.values().next())
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string();
        if who == "deny" {
            return Response::ok(r#"{"allow":false}"#);
        }
        Response::ok(json!({"allow": true, "principal": format!("p-{who}")}).to_string())
    })
}

fn cached_authorizer_config(origin: SocketAddr, authz: SocketAddr) -> String {
    format!(
        r#"
[[upstreams]]
name = "app"
targets = ["{origin}"]

[[upstreams]]
name = "authz"
targets = ["{authz}"]

[[authorizers]]
name = "session"
type = "request"
upstream = "authz"
path = "/authorize"
identity_sources = ["header.x-session"]
ttl_s = 300

[[authorizers]]
name = "token"
type = "request"
upstream = "authz"
path = "/authorize"
identity_sources = ["query.t"]
ttl_s = 300

[[sigv4_credentials]]
access_key = "AKIDEXAMPLE"
secret_key = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
region = "us-east-1"
service = "execute-api"
principal = "alice"

[[sigv4_credentials]]
access_key = "AKIDBOB"
secret_key = "bobsecretbobsecretbobsecretbobsecret0000"
region = "us-east-1"
service = "execute-api"
principal = "bob"

[[apis]]
name = "shop"

[apis.stages.prod]
cache = {{ ttl_s = 60, max_bytes = 1048576 }}

[[apis.routes]]
route = "GET /me"
integration = {{ type = "http", upstream = "app" }}
auth = "authorizer:session"

[[apis.routes]]
route = "GET /q"
integration = {{ type = "http", upstream = "app" }}
auth = "authorizer:token"
cache = {{ key = ["query.lang"] }}

[[apis.routes]]
route = "GET /sig"
integration = {{ type = "http", upstream = "app" }}
auth = "sigv4"
cache = {{ key = ["query.lang"] }}
"#
    )
}

#[test]
fn the_cache_never_gives_one_principal_another_ones_answer() {
    // The README: requests with credentials skip the cache unless the credential is in the
    // key. An authorizer's own identity sources (a header, a query parameter) and a presigned
    // SigV4 URL are credentials too.
    let origin = principal_origin();
    let authz = echo_authorizer();
    let gw = Gateway::start(&cached_authorizer_config(origin.addr, authz.addr));
    for who in ["alice", "bob", "alice"] {
        let r = get_with(&gw, "/prod/me", &[("x-session", who)]);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), format!("p-{who}"));
    }
    for who in ["alice", "bob"] {
        let r = gw.get(&format!("/prod/q?lang=en&t={who}"));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), format!("p-{who}"));
    }
    // The name spelled encoded is the same parameter, to the authorizer and to the cache.
    let r = gw.get("/prod/q?lang=en&%74=carol");
    assert_eq!(r.text(), "p-carol");

    // Presigned SigV4 URLs of two principals, same path and `lang`.
    let job = |ak: &str, sk: &str| {
        json!({"op": "sign", "method": "GET", "url": format!("http://{}/prod/sig?lang=en", gw.addr),
               "headers": {}, "body": "", "access_key": ak, "secret_key": sk,
               "region": "us-east-1", "service": "execute-api", "presign": 300})
    };
    let out = peer(
        &temp_dir("presign-cache"),
        json!([
            job("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
            job("AKIDBOB", "bobsecretbobsecretbobsecretbobsecret0000")
        ]),
    );
    for (v, who) in out.iter().zip(["alice", "bob"]) {
        let u = v["url"].as_str().unwrap();
        let r = send_signed(
            &gw,
            "GET",
            &u[u.find("/prod").unwrap()..],
            &json!({"headers": {}}),
            &[],
            "",
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.text(), who);
    }
}

#[test]
fn authorizer_identity_sources_are_single_and_decoded() {
    let origin = principal_origin();
    let authz = echo_authorizer();
    let gw = Gateway::start(&cached_authorizer_config(origin.addr, authz.addr));
    // Twice: the value checked and the one the upstream reads could differ.
    let r = get_with(
        &gw,
        "/prod/me",
        &[("x-session", "alice"), ("x-session", "deny")],
    );
    let q = gw.get("/prod/q?t=alice&t=deny");
    for r in [r, q] {
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(r.message().contains("more than once"), "{}", r.text());
    }
    assert_eq!(authz.request_count(), 0);
    assert_eq!(origin.request_count(), 0);
    // Query values reach the authorizer decoded.
    let r = gw.get("/prod/q?t=abc%2B%2F%3D+x");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "p-abc+/= x");
}

#[test]
fn authorizer_cache_keeps_identities_apart_whatever_bytes_they_hold() {
    // Two sources whose values may hold any byte once decoded (`%00` too): the cached
    // decision of one pair of values is never another pair's.
    let origin = principal_origin();
    let authz = Origin::start(|_| Response::ok(r#"{"allow":true,"principal":"ok"}"#));
    let cfg = cached_authorizer_config(origin.addr, authz.addr).replace(
        "identity_sources = [\"query.t\"]",
        "identity_sources = [\"query.t\", \"query.u\"]",
    );
    assert!(cfg.contains("\"query.u\""));
    let gw = Gateway::start(&cfg);
    for q in ["t=X%00x&u=y", "t=X&u=x%00y", "t=X%00x&u=y"] {
        let r = gw.get(&format!("/prod/q?{q}"));
        assert_eq!(r.status, 200, "{q}: {}", r.text());
    }
    // The third is the first again: a cache hit. The second is not the first.
    assert_eq!(authz.request_count(), 2);
}

#[test]
fn sigv4_checks_the_path_as_sent_not_as_routed() {
    // The gateway routes `/signed/a%7Eb` as `/signed/a~b`, but the client (botocore here)
    // signed the path it sent, percent-encoding and all.
    let origin = principal_origin();
    let gw = Gateway::start(&sigv4_config(origin.addr));
    let base = format!("http://{}", gw.addr);
    let paths = [
        "/signed/a%7Eb",
        "/signed/%61bc",
        "/signed/x//y%2Dz",
        "/signed/plain",
    ];
    let jobs: Vec<Value> = paths
        .iter()
        .map(|p| sign_job("GET", &format!("{base}{p}"), json!({}), ""))
        .collect();
    let res = peer(&temp_dir("sigv4-path"), Value::Array(jobs));
    for (p, signed) in paths.iter().zip(&res) {
        let r = send_signed(&gw, "GET", p, signed, &[], "");
        assert_eq!(r.status, 200, "{p}: {}", r.text());
        assert_eq!(r.text(), "ci-bot");
    }
    // Signed for one spelling, sent with another: refused.
    let r = send_signed(&gw, "GET", "/signed/a~b", &res[0], &[], "");
    assert_denied(&r, 403, "another spelling of the signed path");

    // Query parameters as botocore sends them: it signs a space as `%20` and sends `+` (a
    // literal plus as `%2B`), as AWS reads them.
    let mut job = sign_job("GET", &format!("{base}/signed/q"), json!({}), "");
    job["params"] = json!({"q": "a b", "p": "x+y", "e": ""});
    let res = peer(&temp_dir("sigv4-query"), json!([job]));
    let u = res[0]["url"].as_str().unwrap();
    assert!(u.contains("q=a+b") && u.contains("p=x%2By"), "{u}");
    let r = send_signed(
        &gw,
        "GET",
        &u[u.find("/signed").unwrap()..],
        &res[0],
        &[],
        "",
    );
    assert_eq!(r.status, 200, "{u}: {}", r.text());
    // SigV4 signs bytes: a percent-encoded byte that is not UTF-8 is signed and checked too.
    let res = peer(
        &temp_dir("sigv4-bytes"),
        json!([sign_job(
            "GET",
            &format!("{base}/signed/q?a=%FF&b=%00"),
            json!({}),
            ""
        )]),
    );
    let r = send_signed(&gw, "GET", "/signed/q?a=%FF&b=%00", &res[0], &[], "");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = send_signed(&gw, "GET", "/signed/q?a=%FE&b=%00", &res[0], &[], "");
    assert_denied(&r, 403, "another byte than the one signed");

    // A session token (temporary credentials) with the configured long-term key: refused, in
    // the header form and presigned.
    let mut h = sign_job("GET", &format!("{base}/signed/t"), json!({}), "");
    h["token"] = json!("FQoGZXIvYXdzEXAMPLE");
    let mut q = h.clone();
    q["presign"] = json!(300);
    let res = peer(&temp_dir("sigv4-token"), json!([h, q]));
    assert!(
        res[0]["headers"]["X-Amz-Security-Token"].is_string(),
        "{res:?}"
    );
    assert_denied(
        &send_signed(&gw, "GET", "/signed/t", &res[0], &[], ""),
        403,
        "token",
    );
    let u = res[1]["url"].as_str().unwrap();
    assert!(u.contains("X-Amz-Security-Token"), "{u}");
    let r = send_signed(
        &gw,
        "GET",
        &u[u.find("/signed").unwrap()..],
        &json!({"headers": {}}),
        &[],
        "",
    );
    assert_denied(&r, 403, "presigned with a token");
}
