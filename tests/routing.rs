//! Routing through the gateway: priority, 404/405, stages, base paths, hosts, `$default`,
//! path templates with parameters and stage variables, mock integrations, and the config
//! checks of `ringgate --check`.

mod common;

use common::*;

fn mock(route: &str, body: &str) -> String {
    format!(
        "[[apis.routes]]\nroute = \"{route}\"\nintegration = {{ type = \"mock\", status = 200, body = \"{body}\" }}\n"
    )
}

#[test]
fn static_beats_param_beats_greedy() {
    let cfg = format!(
        "[[apis]]\nname = \"r\"\n{}{}{}{}",
        mock("GET /items/special", "static"),
        mock("GET /items/{id}", "param"),
        mock("GET /items/{rest+}", "greedy"),
        mock("GET /items/{id}/detail", "param-detail"),
    );
    let gw = Gateway::start(&cfg);
    for (path, want) in [
        ("/items/special", "static"),
        ("/items/42", "param"),
        ("/items/42/x", "greedy"),
        ("/items/42/detail", "param-detail"),
        ("/items/special/detail", "param-detail"),
        ("/items/special/other", "greedy"),
        ("/items/a/b/c/d", "greedy"),
    ] {
        let r = gw.get(path);
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.text(), want, "{path}");
    }
}

#[test]
fn mock_204_has_neither_body_nor_content_length() {
    let cfg = format!(
        "[[apis]]\nname = \"r\"\n[[apis.routes]]\nroute = \"DELETE /x\"\nintegration = {{ type = \"mock\", status = 204 }}\n{}",
        mock("GET /y", "after")
    );
    let gw = Gateway::start(&cfg);
    let mut c = Client::connect(gw.addr);
    // Pipelined: the second answer must start right after the first's head.
    c.send(b"DELETE /x HTTP/1.1\r\nHost: t\r\n\r\nGET /y HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 204);
    assert_eq!(r.header("content-length"), None, "{:?}", r.headers);
    let r = c.read_response().unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "after"));
    // A body on a 204 mock is a config error.
    let bad = cfg.replace("status = 204 }", "status = 204, body = \"x\" }");
    let (out, _) = check(&bad);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot have a body"), "{err}");
    // So is one on a 205 (Reset Content has no content either).
    let bad = cfg.replace("status = 204 }", "status = 205, body = \"x\" }");
    let (out, _) = check(&bad);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("status 205 cannot have a body"), "{err}");
}

#[test]
fn not_found_and_method_not_allowed_are_json() {
    let cfg = format!(
        "[[apis]]\nname = \"r\"\n{}{}",
        mock("GET /a", "a"),
        mock("POST /b/{id}", "b")
    );
    let gw = Gateway::start(&cfg);
    let r = gw.get("/nothing");
    assert_eq!(r.status, 404);
    assert!(r
        .header("content-type")
        .unwrap_or("")
        .contains("application/json"));
    assert_eq!(r.message(), "Not Found");
    let r = gw.request("DELETE /a HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 405);
    assert!(r
        .header("content-type")
        .unwrap_or("")
        .contains("application/json"));
    assert_eq!(r.message(), "Method Not Allowed");
    // RFC 9110: a 405 lists what the path accepts.
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    let r = gw.get("/b/7");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
    let r = gw.request("POST /b/7 HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "b");
    // Routing is on the path: the query string does not matter; case does.
    assert_eq!(gw.get("/a?x=1").text(), "a");
    assert_eq!(gw.get("/A").status, 404);
    // A 405 is counted under the path's API, stage and route; a 404 has none.
    let want = [
        "ringgate_requests_total{api=\"r\",stage=\"$default\",route=\"GET /a\",method=\"DELETE\",status=\"405\"} 1",
        "ringgate_requests_total{api=\"r\",stage=\"$default\",route=\"POST /b/{id}\",method=\"GET\",status=\"405\"} 1",
        "ringgate_requests_total{api=\"\",stage=\"\",route=\"\",method=\"GET\",status=\"404\"} 2",
    ];
    let mut m = String::new();
    let seen = wait_until(std::time::Duration::from_secs(3), || {
        m = gw.metrics();
        want.iter().all(|l| m.contains(l))
    });
    assert!(seen, "{want:?} in:\n{m}");
}

#[test]
fn head_is_answered_by_get_routes_without_a_body() {
    let origin = Origin::echo_path();
    let cfg = format!(
        "[[upstreams]]\nname = \"o\"\ntargets = [\"{}\"]\n[[apis]]\nname = \"r\"\n{}{}[[apis.routes]]\nroute = \"GET /p/{{rest+}}\"\nintegration = {{ type = \"http\", upstream = \"o\" }}\n",
        origin.addr,
        mock("GET /a", "hello"),
        mock("POST /b", "b"),
    );
    let gw = Gateway::start(&cfg);
    let mut c = Client::connect(gw.addr);
    for _ in 0..2 {
        c.send(b"HEAD /a HTTP/1.1\r\nHost: t\r\n\r\n");
        let r = c.read_response_to("HEAD").unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-length"), Some("5"));
        assert!(r.body.is_empty());
    }
    // Proxied: the upstream gets a HEAD (and answers without a body).
    c.send(b"HEAD /p/x HTTP/1.1\r\nHost: t\r\n\r\n");
    let r = c.read_response_to("HEAD").unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty());
    let seen = origin.requests();
    assert_eq!(seen.last().map(|q| q.method.as_str()), Some("HEAD"));
    // The connection is still in step after HEAD answers.
    c.send(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(c.read_response().unwrap().body, b"hello");
    // Only GET routes answer HEAD.
    c.send(b"HEAD /b HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(c.read_response_to("HEAD").unwrap().status, 405);
}

#[test]
fn method_not_allowed_lists_allow_with_the_waf_on() {
    // With a WAF, unrouted requests take another branch (the IP rules are checked first).
    let cfg = format!(
        "[waf]\nip_deny = [\"10.66.0.0/16\"]\n[[apis]]\nname = \"r\"\n{}{}",
        mock("GET /a", "a"),
        mock("PUT /a", "put")
    );
    let gw = Gateway::start(&cfg);
    let r = gw.request("DELETE /a HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD, PUT"));
    assert_eq!(gw.get("/zzz").header("allow"), None);
}

#[test]
fn errors_keep_the_connection_when_no_body_is_pending() {
    let cfg = format!("[[apis]]\nname = \"r\"\n{}", mock("GET /a", "a"));
    let gw = Gateway::start(&cfg);
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /missing HTTP/1.1\r\nHost: t\r\n\r\nPUT /a HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabcGET /a HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(c.read_response().unwrap().status, 404);
    assert_eq!(c.read_response().unwrap().status, 405);
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "a");
}

#[test]
fn any_method_route() {
    let cfg = format!(
        "[[apis]]\nname = \"r\"\n{}{}",
        mock("ANY /any", "any"),
        mock("POST /any", "post")
    );
    let gw = Gateway::start(&cfg);
    assert_eq!(gw.get("/any").text(), "any");
    let r = gw.request("PATCH /any HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.text(), "any");
    let r = gw.request("POST /any HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(r.text(), "post", "an exact method beats ANY");
}

#[test]
fn trace_reaches_only_a_trace_route() {
    // TRACE echoes the request, credentials included: ANY and `$default` do not take it
    // (nginx refuses it too); a route that names TRACE does.
    let cfg = format!(
        "[[apis]]\nname = \"r\"\n{}{}{}",
        mock("ANY /any", "any"),
        mock("TRACE /t", "traced"),
        mock("$default", "default")
    );
    let gw = Gateway::start(&cfg);
    let all = "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT";
    for path in ["/any", "/elsewhere"] {
        let r = gw.request(&format!("TRACE {path} HTTP/1.1\r\nHost: t\r\n\r\n"));
        assert_eq!(r.status, 405, "{path}");
        assert_eq!(r.message(), "Method Not Allowed");
        assert_eq!(r.header("allow"), Some(all), "{path}");
        // Every other method still reaches them.
        let r = gw.request(&format!("DELETE {path} HTTP/1.1\r\nHost: t\r\n\r\n"));
        assert_eq!(r.status, 200, "{path}");
    }
    let r = gw.request("TRACE /t HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.text(), "traced");
    // The 405 is counted under the ANY route it would have reached.
    let want = "route=\"ANY /any\",method=\"TRACE\",status=\"405\"} 1";
    let mut m = String::new();
    let seen = wait_until(std::time::Duration::from_secs(3), || {
        m = gw.metrics();
        m.contains(want)
    });
    assert!(seen, "{want} in:\n{m}");
}

#[test]
fn stages_base_path_variables_and_templates() {
    let origin = Origin::echo_path();
    let cfg = format!(
        r#"
[[upstreams]]
name = "o"
targets = ["{}"]

[[apis]]
name = "shop"
base_path = "/shop"

[apis.stages."$default"]
variables = {{ version = "v1" }}

[apis.stages.prod]
variables = {{ version = "v2{{id}}" }}

[[apis.routes]]
route = "GET /items/{{id}}"
integration = {{ type = "http", upstream = "o", path = "/${{stageVariables.version}}/things/{{id}}" }}

[[apis.routes]]
route = "GET /files/{{dir}}/{{name+}}"
integration = {{ type = "http", upstream = "o", path = "/store/{{name}}/in/{{dir}}" }}

[[apis.routes]]
route = "GET /q/{{id}}"
integration = {{ type = "http", upstream = "o", path = "/query/{{id}}?fixed=1" }}

[[apis.routes]]
route = "ANY /raw/{{rest+}}"
integration = {{ type = "http", upstream = "o" }}
"#,
        origin.addr
    );
    let gw = Gateway::start(&cfg);
    for (path, want) in [
        ("/shop/items/7", "/v1/things/7"),
        ("/shop/items/7?x=1&y=2", "/v1/things/7?x=1&y=2"),
        // A stage variable's value is literal text: its `{id}` is no parameter.
        ("/shop/prod/items/8", "/v2{id}/things/8"),
        ("/shop/prod/items/8?x=1", "/v2{id}/things/8?x=1"),
        ("/shop/files/d1/a/b/c.txt", "/store/a/b/c.txt/in/d1"),
        ("/shop/prod/q/5?lang=en", "/query/5?fixed=1&lang=en"),
        ("/shop/q/5", "/query/5?fixed=1"),
        // Without an integration path: the request path minus base path and stage.
        ("/shop/raw/a/b?z=9", "/raw/a/b?z=9"),
        ("/shop/prod/raw/a/b", "/raw/a/b"),
    ] {
        let r = gw.get(path);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.text(), want, "{path}");
    }
    // Outside the base path or an unknown stage: nothing.
    assert_eq!(gw.get("/items/7").status, 404);
    assert_eq!(gw.get("/shop/beta/items/7").status, 404);
}

#[test]
fn stage_variables_choose_the_upstream() {
    let a = Origin::fixed("from-a");
    let b = Origin::fixed("from-b");
    let cfg = format!(
        r#"
[[upstreams]]
name = "a"
targets = ["{}"]

[[upstreams]]
name = "b"
targets = ["{}"]

[[apis]]
name = "s"

[apis.stages."$default"]
variables = {{ backend = "a" }}

[apis.stages.prod]
variables = {{ backend = "b" }}

[[apis.routes]]
route = "GET /x"
integration = {{ type = "http", upstream = "${{stageVariables.backend}}" }}
"#,
        a.addr, b.addr
    );
    let gw = Gateway::start(&cfg);
    assert_eq!(gw.get("/x").text(), "from-a");
    assert_eq!(gw.get("/prod/x").text(), "from-b");
    assert_eq!(a.last_request().path, "/x");
    assert_eq!(b.last_request().path, "/x");
}

#[test]
fn stage_variables_fill_mock_answers() {
    let cfg = r#"
[[apis]]
name = "s"

[apis.stages."$default"]
variables = { version = "v1" }

[apis.stages.beta]
variables = { version = "v2-beta" }

[[apis.routes]]
route = "GET /ver"
integration = { type = "mock", status = 200, headers = { "x-stage-ver" = "${stageVariables.version}" }, body = '{"version":"${stageVariables.version}","other":"${literal}"}' }
"#;
    let gw = Gateway::start(cfg);
    for (path, want) in [("/ver", "v1"), ("/beta/ver", "v2-beta")] {
        let r = gw.get(path);
        assert_eq!(r.header("x-stage-ver"), Some(want), "{path}");
        assert_eq!(
            r.text(),
            format!(r#"{{"version":"{want}","other":"${{literal}}"}}"#),
            "{path}"
        );
    }
    // An undefined variable in a mock is refused when the config loads.
    let bad = cfg.replace("${stageVariables.version}\",", "${stageVariables.nope}\",");
    assert!(bad != cfg);
    let (out, _) = check(&bad);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("`nope` is not defined"));
}

#[test]
fn stage_variables_cannot_put_spaces_or_line_breaks_on_the_request_line() {
    for (value, what) in [
        (r#""v1\r\nX-Injected: 1\r\nX-A: ""#, "`\\r`"),
        (r#""a b""#, "a space"),
        (r#""a\tb""#, "`\\t`"),
    ] {
        let cfg = format!(
            "[[upstreams]]\nname = \"o\"\ntargets = [\"127.0.0.1:1\"]\n[[apis]]\nname = \"s\"\n\
             [apis.stages.\"$default\"]\nvariables = {{ ver = {value} }}\n[[apis.routes]]\nroute = \"GET /x\"\n\
             integration = {{ type = \"http\", upstream = \"o\", path = \"/${{stageVariables.ver}}/x\" }}\n"
        );
        let (out, _) = check(&cfg);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{value}: accepted");
        assert!(
            err.contains("apis[0].routes[0].integration") && err.contains(what),
            "{value}: {err}"
        );
    }
}

#[test]
fn default_route_catches_the_rest() {
    let cfg = format!(
        "[[apis]]\nname = \"r\"\n{}{}",
        mock("GET /known", "known"),
        mock("$default", "fallback")
    );
    let gw = Gateway::start(&cfg);
    assert_eq!(gw.get("/known").text(), "known");
    assert_eq!(gw.get("/anything/else?q=1").text(), "fallback");
    assert_eq!(gw.get("/").text(), "fallback");
    let r = gw.request("POST /known HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "fallback");
}

#[test]
fn default_route_proxies_the_whole_path() {
    let origin = Origin::echo_path();
    let cfg = format!(
        "[[upstreams]]\nname = \"o\"\ntargets = [\"{}\"]\n[[apis]]\nname = \"r\"\nbase_path = \"/api\"\n\
         [[apis.routes]]\nroute = \"$default\"\nintegration = {{ type = \"http\", upstream = \"o\" }}\n",
        origin.addr
    );
    let gw = Gateway::start(&cfg);
    assert_eq!(gw.get("/api/a/b?c=d").text(), "/a/b?c=d");
    assert_eq!(gw.get("/api").text(), "/");
    assert_eq!(gw.get("/apix").status, 404);
    assert_eq!(gw.get("/other").status, 404);
}

#[test]
fn hosts_select_the_api() {
    let cfg = format!(
        "[[apis]]\nname = \"a\"\nhosts = [\"a.example.com\"]\n{}\
         [[apis]]\nname = \"b\"\nhosts = [\"b.example.com\"]\n{}\
         [[apis]]\nname = \"any\"\n{}",
        mock("GET /x", "A"),
        mock("GET /x", "B"),
        mock("GET /x", "ANY"),
    );
    let gw = Gateway::start(&cfg);
    let get = |host: &str| {
        gw.request(&format!("GET /x HTTP/1.1\r\nHost: {host}\r\n\r\n"))
            .text()
    };
    assert_eq!(get("a.example.com"), "A");
    assert_eq!(get("A.Example.COM:8080"), "A");
    assert_eq!(get("b.example.com"), "B");
    assert_eq!(get("c.example.com"), "ANY");
    assert_eq!(get("127.0.0.1"), "ANY");
}

/// A host's API that has a path only under other methods does not hide another tier's route
/// for the method asked: the request goes on to the wildcard and host-less APIs, as one for a
/// path the host's API lacks does; 405 only when no tier serves it, with every tier's methods.
#[test]
fn a_method_a_hosts_api_lacks_goes_on_to_the_next_tier() {
    let cfg = format!(
        "[[apis]]\nname = \"exact\"\nhosts = [\"e.w.com\"]\n{}{}\
         [[apis]]\nname = \"wild\"\nhosts = [\"*.w.com\"]\n{}\
         [[apis]]\nname = \"any\"\n{}{}",
        mock("POST /z", "EXACT"),
        mock("PUT /w", "EXACT"),
        mock("POST /w", "WILD"),
        mock("GET /z", "ANY"),
        mock("GET /x", "ANY"),
    );
    let gw = Gateway::start(&cfg);
    let send =
        |m: &str, path: &str| gw.request(&format!("{m} {path} HTTP/1.1\r\nHost: e.w.com\r\n\r\n"));
    assert_eq!(send("GET", "/x").text(), "ANY");
    assert_eq!(send("GET", "/z").text(), "ANY");
    assert_eq!(send("POST", "/z").text(), "EXACT");
    assert_eq!(send("POST", "/w").text(), "WILD");
    assert_eq!(send("PUT", "/w").text(), "EXACT");
    let r = send("DELETE", "/z");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD, POST"));
    let r = send("DELETE", "/w");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST, PUT"));
}

#[test]
fn host_only_api_does_not_answer_other_hosts() {
    let cfg = format!(
        "[[apis]]\nname = \"a\"\nhosts = [\"a.example.com\"]\n{}",
        mock("GET /x", "A")
    );
    let gw = Gateway::start(&cfg);
    let r = gw.request("GET /x HTTP/1.1\r\nHost: a.example.com\r\n\r\n");
    assert_eq!(r.text(), "A");
    let r = gw.request("GET /x HTTP/1.1\r\nHost: other.example.com\r\n\r\n");
    assert_eq!(r.status, 404);
    assert_eq!(r.message(), "Not Found");
}

#[test]
fn mock_integration_status_headers_body() {
    let cfg = r#"
[[apis]]
name = "m"

[[apis.routes]]
route = "POST /created"
integration = { type = "mock", status = 201, headers = { "content-type" = "application/json", "x-mock" = "yes" }, body = '{"ok":true}' }

[[apis.routes]]
route = "GET /teapot"
integration = { type = "mock", status = 418 }
"#;
    let gw = Gateway::start(cfg);
    let r = gw.request("POST /created HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}");
    assert_eq!(r.status, 201);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("x-mock"), Some("yes"));
    assert_eq!(r.header("content-length"), Some("11"));
    assert_eq!(r.json(), serde_json::json!({"ok": true}));
    let r = gw.get("/teapot");
    assert_eq!(r.status, 418);
    assert!(r.body.is_empty());
    assert!(r.header("x-request-id").is_some());
}

#[test]
fn check_prints_the_route_table() {
    let cfg = r#"
[[upstreams]]
name = "orders"
targets = ["127.0.0.1:9"]

[[apis]]
name = "shop"
hosts = ["shop.example.com"]
base_path = "/v1"

[apis.stages.prod]
variables = { backend = "orders" }

[[apis.routes]]
route = "GET /products/{id}"
integration = { type = "http", upstream = "${stageVariables.backend}", path = "/items/{id}" }

[[apis.routes]]
route = " GET  /hello "
integration = { type = "mock", body = "hi" }

[[apis.routes]]
route = "ANY   /any"
integration = { type = "mock", body = "hi" }
"#;
    let (out, _) = check(cfg);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.contains("GET /products/{id}"))
        .unwrap_or_else(|| panic!("route missing from the table:\n{stdout}"));
    assert!(
        line.contains("shop") && line.contains("prod") && line.contains("orders"),
        "{line}"
    );
    // Where requests reach it (hosts, base path and stage), and the integration path.
    assert!(
        line.contains("shop.example.com/v1/prod/products/{id}")
            && line.contains("-> http orders /items/{id}"),
        "{line}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("GET /hello") && l.contains("mock")),
        "{stdout}"
    );
    // Keys are named with one space, whatever spacing the file has.
    assert!(stdout.lines().any(|l| l.contains("ANY /any")), "{stdout}");
    assert!(!stdout.contains("GET  /hello"), "{stdout}");
}

/// `line` counts within `cfg`; the standard header is prepended when `cfg` has no `[server]`.
fn assert_check_fails(cfg: &str, line: usize, key: &str) {
    let (text, line) = if cfg.contains("[server]") {
        (cfg.to_string(), line)
    } else {
        (
            format!("{HEADER}\n{cfg}"),
            line + HEADER.matches('\n').count() + 1,
        )
    };
    let (out, path) = check(&text);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    let first = stderr.lines().next().unwrap_or("");
    let want = format!("{}:{line}:", path.display());
    assert!(
        first.contains(&want),
        "error line should name {want}: {stderr}"
    );
    assert!(
        first.contains(key),
        "error line should name `{key}`: {stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one clear line: {stderr}");
}

#[test]
fn command_line_errors_exit_1_with_one_line() {
    for args in [
        &["--check", "--config"][..],
        &["--check", "--bogus"],
        &["--nope"],
        // Which file would count is a guess.
        &[
            "--check",
            "-c",
            "config/ringgate.toml",
            "--config",
            "config/ringgate.toml",
        ],
        &[
            "--check",
            "--config=config/ringgate.toml",
            "-c",
            "config/ringgate.toml",
        ],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringgate"))
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains("usage: ringgate"), "{args:?}: {err}");
        assert!(
            args.len() < 4 || err.contains("--config is given twice"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn check_refuses_conflicting_routes_with_file_line_and_key() {
    let cfg = "[[apis]]\nname = \"c\"\n\n[[apis.routes]]\nroute = \"GET /x/{a}\"\nintegration = { type = \"mock\" }\n\n[[apis.routes]]\nroute = \"GET /x/{b}\"\nintegration = { type = \"mock\" }\n";
    assert_check_fails(cfg, 9, "apis[0].routes[1].route");
}

#[test]
fn check_refuses_duplicate_routes() {
    let cfg = "[[apis]]\nname = \"c\"\n[[apis.routes]]\nroute = \"GET /x\"\nintegration = { type = \"mock\" }\n[[apis.routes]]\nroute = \"GET /x\"\nintegration = { type = \"mock\" }\n";
    assert_check_fails(cfg, 7, "apis[0].routes[1].route");
    // Across APIs (here through a base path) the error names the route already there.
    let cfg = "[[apis]]\nname = \"a\"\nbase_path = \"/x\"\n[[apis.routes]]\nroute = \"GET /y\"\nintegration = { type = \"mock\" }\n[[apis]]\nname = \"b\"\n[[apis.routes]]\nroute = \"GET /x/y\"\nintegration = { type = \"mock\" }\n";
    assert_check_fails(cfg, 10, "apis[1].routes[0].route");
    let (out, _) = check(cfg);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already defined by API `a`, stage `$default`, route `GET /y`"),
        "{err}"
    );
}

#[test]
fn check_refuses_unknown_keys_naming_the_line() {
    let cfg = "[server]\nworkers = 2\nlisten = [\"@LISTEN@\"]\nwokers = 3\n";
    assert_check_fails(cfg, 4, "wokers");
}

#[test]
fn check_refuses_unknown_upstream() {
    let cfg = "[[apis]]\nname = \"c\"\n[[apis.routes]]\nroute = \"GET /x\"\nintegration = { type = \"http\", upstream = \"nope\" }\n";
    assert_check_fails(cfg, 5, "apis[0].routes[0].integration");
}

#[test]
fn check_points_at_the_key_at_fault_not_its_tables_name() {
    let up = "[[upstreams]]\nname = \"o\"\ntargets = [\"127.0.0.1:1\"]\n";
    let api = "[[apis]]\nname = \"c\"\n[[apis.routes]]\nroute = \"GET /x\"\nintegration = { type = \"http\", upstream = \"o\" }\n";
    for (body, line, key) in [
        ("timeout_ms = 0\n", 4, "upstreams[0].timeout_ms"),
        // A header name with a space never arrives: balancing would never hash.
        ("balance = \"hash:header.a b\"\n", 4, "upstreams[0].balance"),
        (
            "connect_timeout_ms = 0\n",
            4,
            "upstreams[0].connect_timeout_ms",
        ),
        (
            "\n[upstreams.health]\npath = \"x\"\n",
            6,
            "upstreams[0].health.path",
        ),
    ] {
        assert_check_fails(&format!("{up}{body}{api}"), line, key);
    }
}

#[test]
fn check_refuses_route_and_base_paths_no_request_could_match() {
    // Requests are matched in normal form: no `//`, space, encoding of a character a path holds
    // raw, or lower-case hex; and requests whose path holds a dot segment, an encoded `/`, `\`
    // or NUL, a raw `\` or `;`, or `?`/`#` (which end it) never reach routing.
    for p in [
        "/a//b",
        "/%61dmin",
        "/a b",
        "/x%2",
        "/v1/jobs%3Arun",
        "/caf%c3%a9",
        "/a/../b",
        "/a/%2e/b",
        "/c%2Fd",
        "/n%00m",
        "/e;f",
        "/g?h",
        "/f#x",
        "/a\\\\b",
        "/a<b>",
    ] {
        let cfg = format!(
            "[[apis]]\nname = \"c\"\n[[apis.routes]]\nroute = \"GET {p}\"\nintegration = {{ type = \"mock\" }}\n"
        );
        assert_check_fails(&cfg, 4, "apis[0].routes[0].route");
    }
    let cfg = "[[apis]]\nname = \"c\"\nbase_path = \"/sh op\"\n[[apis.routes]]\nroute = \"GET /x\"\nintegration = { type = \"mock\" }\n";
    assert_check_fails(cfg, 3, "apis[0].base_path");
}

#[test]
fn gateway_refuses_to_start_on_a_bad_config() {
    let cfg = "[[apis]]\nname = \"c\"\n[[apis.routes]]\nroute = \"GET /x/{a}\"\nintegration = { type = \"mock\" }\n[[apis.routes]]\nroute = \"GET /x/{b}\"\nintegration = { type = \"mock\" }\n";
    let err = match Gateway::try_start(cfg) {
        Ok(_) => panic!("the gateway started on a conflicting config"),
        Err(e) => e,
    };
    assert!(err.contains("routes[1].route"), "{err}");
}

#[test]
fn doubled_slashes_and_encoded_letters_cannot_route_around_a_protected_route() {
    // A public greedy route beside a key-protected one and a WAF path rule: `//admin` or
    // `/%61dmin` (which backends read as `/admin`) must meet the same checks as `/admin`.
    let origin = Origin::echo_path();
    let cfg = format!(
        r#"
[[upstreams]]
name = "o"
targets = ["{}"]
[[apis]]
name = "a"
[[apis.routes]]
route = "ANY /{{p+}}"
integration = {{ type = "http", upstream = "o" }}
[[apis.routes]]
route = "GET /admin/{{x+}}"
integration = {{ type = "http", upstream = "o" }}
api_key_required = true
[[apis.routes]]
route = "GET /caf%C3%A9/{{x+}}"
integration = {{ type = "http", upstream = "o" }}
api_key_required = true
[[apis.routes]]
route = "GET /v1/jobs:run"
integration = {{ type = "http", upstream = "o" }}
api_key_required = true
[waf]
rules = [{{ name = "internal", target = "path", pattern = "^/internal", action = "block" }}]
"#,
        origin.addr
    );
    let gw = Gateway::start(&cfg);
    for p in [
        "/admin/users",
        "//admin/users",
        "/%61dmin/users",
        "/%61%64%6D%69%6E//users",
        "/internal/x",
        "//internal/x",
        "/%69nternal/x",
        // Percent-encodings compare with upper-case hex; characters allowed raw in a
        // segment (`:`) match decoded, as a backend reads them.
        "/caf%C3%A9/x",
        "/caf%c3%a9/x",
        "/caf%C3%a9/x",
        "/v1/jobs:run",
        "/v1/jobs%3Arun",
        "/v1/jobs%3arun",
    ] {
        let r = gw.get(p);
        assert_eq!(r.status, 403, "{p}: {}", r.text());
    }
    // A separator written encoded could split differently in the backend: refused.
    // So could a malformed escape that decoding would complete (`%6%31` -> `%61` -> `a`).
    for p in [
        "/admin%2Fusers",
        "/x/..%2Fadmin",
        "/x%5Cadmin",
        "/%6%31dmin/users",
        // Raw non-ASCII (browsers send it encoded): a second spelling of `/caf%C3%A9`.
        "/caf\u{e9}/x",
    ] {
        let r = gw.get(p);
        assert_eq!(r.status, 400, "{p}: {}", r.text());
    }
    assert_eq!(
        origin.request_count(),
        0,
        "nothing refused reached the origin"
    );
    // Others are served, and the upstream gets the normal form the checks saw.
    let r = gw.get("//public//x%2Dy?q=//%61");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "/public/x-y?q=//%61");
    let r = gw.get("/public/%c3%a9%3b%3a");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "/public/%C3%A9%3B:");
}
