//! `[cluster]` through the real binary: two ringgate nodes share one real `redis-server`
//! (started by each test on a free port, killed at the end). Shared API keys, quotas counted
//! across nodes, `@connections` on any node, cache invalidation broadcast, a Redis outage and
//! restart, and a bad Redis URL.
//!
//! redis-server must be installed (`apt-get install -y redis-server`; `.ci/run` does it): a
//! missing one fails these tests, it never skips them.

mod common;

use common::*;
use ringgate::ws::frame::op;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// A real redis-server
// ---------------------------------------------------------------------------------------------

struct Redis {
    child: Option<Child>,
    port: u16,
    dir: std::path::PathBuf,
    /// More redis-server arguments.
    extra: Vec<String>,
}

impl Redis {
    fn start() -> Redis {
        Redis::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> Redis {
        let mut r = Redis {
            child: None,
            port: free_port(),
            dir: temp_dir("redis"),
            extra: extra.iter().map(|a| a.to_string()).collect(),
        };
        r.restart();
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port, with no persistence: a restart loses every key.
    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run redis-server ({e}): the cluster tests need a real Redis; \
                     install it with `apt-get install -y redis-server` (.ci/run does)"
                )
            });
        self.child = Some(child);
        assert!(
            wait_until(Duration::from_secs(10), || self.ping()),
            "redis-server did not answer on port {}",
            self.port
        );
    }

    /// Up (a Redis that requires a password answers NOAUTH).
    fn ping(&self) -> bool {
        self.command(&["PING"])
            .is_some_and(|r| r.starts_with("+PONG") || r.starts_with("-NOAUTH"))
    }

    /// One command in RESP after `AUTH password` on the same connection; the raw answer.
    fn command_as(&self, password: &str, args: &[&str]) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut answer = String::new();
        for cmd in [&["AUTH", password][..], args] {
            let mut req = format!("*{}\r\n", cmd.len());
            for a in cmd {
                req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
            }
            s.write_all(req.as_bytes()).ok()?;
            let mut b = [0u8; 4096];
            let n = s.read(&mut b).ok()?;
            answer = String::from_utf8_lossy(&b[..n]).to_string();
            if cmd[0] == "AUTH" && !answer.starts_with("+OK") {
                return None;
            }
        }
        Some(answer)
    }

    /// One command in RESP; the raw answer.
    fn command(&self, args: &[&str]) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).ok()?;
        let mut b = [0u8; 4096];
        let n = s.read(&mut b).ok()?;
        Some(String::from_utf8_lossy(&b[..n]).to_string())
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------------------
// Nodes and helpers
// ---------------------------------------------------------------------------------------------

const ALICE: &str = "alice-key-0123456789abcdef";

fn node_config(redis: &str, extra: &str) -> String {
    node_config_with(redis, extra, dead_addr())
}

fn node_config_with(redis: &str, extra: &str, counter: SocketAddr) -> String {
    format!(
        r#"
[server]
listen = ["@LISTEN@"]
workers = 2
state_dir = "@DIR@/state"
[admin]
listen = "@ADMIN@"
[cluster]
redis = "{redis}"
[[upstreams]]
name = "counter"
targets = ["{counter}"]
[[apis]]
name = "shop"
[apis.stages.prod]
cache = {{ enabled = true, ttl_s = 300 }}
[[apis.routes]]
route = "GET /x"
integration = {{ type = "mock", status = 200, body = "ok" }}
api_key_required = true
[[apis.routes]]
route = "GET /counter"
integration = {{ type = "http", upstream = "counter" }}
[[usage_plans]]
name = "basic"
apis = ["shop/prod"]
quota = {{ limit = 6, period = "day" }}
[[usage_plans]]
name = "free"
apis = ["shop/prod"]
[[api_keys]]
name = "alice"
value = "{ALICE}"
plans = ["basic"]
{extra}
"#
    )
}

fn admin_call(addr: SocketAddr, method: &str, path: &str, body: &str) -> RawResponse {
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

fn get_key(gw: &Gateway, path: &str, key: &str) -> RawResponse {
    gw.request(&format!(
        "GET {path} HTTP/1.1\r\nHost: t\r\nx-api-key: {key}\r\nConnection: close\r\n\r\n"
    ))
}

fn used(gw: &Gateway, key: &str) -> serde_json::Value {
    gw.admin_get(&format!("/usage-plans/basic/usage?key={key}"))
        .json()
}

// ---------------------------------------------------------------------------------------------
// API keys
// ---------------------------------------------------------------------------------------------

#[test]
fn keys_added_or_deleted_on_one_node_hold_on_every_node() {
    let redis = Redis::start();
    let a = Gateway::start(&node_config(&redis.url(), ""));
    let b = Gateway::start(&node_config(&redis.url(), ""));
    let r = admin_call(
        a.admin_addr,
        "POST",
        "/api-keys",
        r#"{"name":"carol","plans":["free"],"value":"carol-key-0123456789abcdef"}"#,
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let carol = "carol-key-0123456789abcdef";
    assert_eq!(get_key(&a, "/prod/x", carol).status, 200);
    // On node B within the documented time (pub/sub: milliseconds; 5 s reload at worst).
    assert!(
        wait_until(Duration::from_secs(3), || get_key(&b, "/prod/x", carol)
            .status
            == 200),
        "node B: {}",
        b.stderr()
    );
    let list = admin_call(b.admin_addr, "GET", "/api-keys", "").text();
    assert!(
        list.contains("\"carol\"") && list.contains("\"alice\""),
        "{list}"
    );
    assert!(!list.contains(carol), "values are never listed: {list}");
    // The same name on B: conflict (B knows the key).
    assert_eq!(
        admin_call(b.admin_addr, "POST", "/api-keys", r#"{"name":"carol"}"#).status,
        409
    );
    // A generated key added on B works on A.
    let r = admin_call(
        b.admin_addr,
        "POST",
        "/api-keys",
        r#"{"name":"dave","plans":["free"]}"#,
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let dave = r.json()["value"].as_str().unwrap().to_string();
    assert!(wait_until(Duration::from_secs(3), || get_key(
        &a, "/prod/x", &dave
    )
    .status
        == 200));
    // Delete on B: refused on A too.
    assert_eq!(
        admin_call(b.admin_addr, "DELETE", "/api-keys/carol", "").status,
        200
    );
    assert!(wait_until(Duration::from_secs(3), || get_key(
        &a, "/prod/x", carol
    )
    .status
        == 403));
    assert_eq!(get_key(&b, "/prod/x", carol).status, 403);
    let list = admin_call(a.admin_addr, "GET", "/api-keys", "").text();
    assert!(
        !list.contains("\"carol\"") && list.contains("\"dave\""),
        "{list}"
    );
    // A third node that joins later gets the cluster's keys.
    let c = Gateway::start(&node_config(&redis.url(), ""));
    assert!(wait_until(Duration::from_secs(3), || get_key(
        &c, "/prod/x", &dave
    )
    .status
        == 200));
    assert_eq!(get_key(&c, "/prod/x", carol).status, 403);
    // Config keys stay as they are on every node.
    for n in [&a, &b, &c] {
        assert_eq!(get_key(n, "/prod/x", ALICE).status, 200);
    }
}

/// A key the cluster's set holds but node B has not loaded yet (written behind its back, with
/// no announcement: B would only see it at its 5 s reload), or one added on another node at the
/// same moment: B refuses its name and its value with 409, as one node refuses a duplicate.
#[test]
fn a_key_added_elsewhere_is_refused_even_before_the_node_loaded_it() {
    use sha2::Digest;
    let redis = Redis::start();
    let a = Gateway::start(&node_config(&redis.url(), ""));
    let b = Gateway::start(&node_config(&redis.url(), ""));
    let hidden = "hidden-key-0123456789abcdef";
    let sha: String = sha2::Sha256::digest(hidden.as_bytes())
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect();
    let stored =
        format!(r#"{{"name":"eve","plans":["free"],"enabled":true,"sha256":"{sha}","created":1}}"#);
    let set = redis.command(&["HSET", "ringgate:apikeys", "eve", &stored]);
    assert_eq!(set.as_deref(), Some(":1\r\n"));
    let post = |node: &Gateway, body: &str| admin_call(node.admin_addr, "POST", "/api-keys", body);
    let r = post(&b, r#"{"name":"eve","plans":["free"]}"#);
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(
        r.text().contains("a key named `eve` exists"),
        "{}",
        r.text()
    );
    let r = post(
        &b,
        &format!(r#"{{"name":"frank","plans":["free"],"value":"{hidden}"}}"#),
    );
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("in use"), "{}", r.text());
    // Neither refusal left anything behind.
    assert_eq!(
        redis
            .command(&["HEXISTS", "ringgate:apikeys", "frank"])
            .as_deref(),
        Some(":0\r\n")
    );
    // Two nodes adding at the same moment: one 201, one 409, whether the name or the value
    // is shared.
    for i in 0..4 {
        let bodies = [
            format!(r#"{{"name":"n{i}","value":"race-a-{i}-0123456789abcdef"}}"#),
            format!(r#"{{"name":"n{i}","value":"race-b-{i}-0123456789abcdef"}}"#),
            format!(r#"{{"name":"va{i}","value":"race-v-{i}-0123456789abcdef"}}"#),
            format!(r#"{{"name":"vb{i}","value":"race-v-{i}-0123456789abcdef"}}"#),
        ];
        for pair in bodies.chunks(2) {
            let start = std::sync::Barrier::new(2);
            let statuses: Vec<u16> = thread::scope(|s| {
                let calls: Vec<_> = [(&a, &pair[0]), (&b, &pair[1])]
                    .into_iter()
                    .map(|(node, body)| {
                        let start = &start;
                        s.spawn(move || {
                            start.wait();
                            post(node, body).status
                        })
                    })
                    .collect();
                calls.into_iter().map(|c| c.join().unwrap()).collect()
            });
            let mut sorted = statuses.clone();
            sorted.sort();
            assert_eq!(sorted, [201, 409], "{pair:?}: {statuses:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Quotas
// ---------------------------------------------------------------------------------------------

#[test]
fn quota_is_counted_across_nodes() {
    let redis = Redis::start();
    let a = Gateway::start(&node_config(&redis.url(), ""));
    let b = Gateway::start(&node_config(&redis.url(), ""));
    for _ in 0..3 {
        assert_eq!(get_key(&a, "/prod/x", ALICE).status, 200);
    }
    for _ in 0..3 {
        assert_eq!(get_key(&b, "/prod/x", ALICE).status, 200);
    }
    // Once synced (every 100 ms), both nodes see 6 of 6 used.
    for n in [&a, &b] {
        assert!(
            wait_until(Duration::from_secs(3), || used(n, "alice")["used"] == 6),
            "{}",
            used(n, "alice")
        );
        assert_eq!(used(n, "alice")["remaining"], 0);
    }
    for n in [&a, &b, &a] {
        let r = get_key(n, "/prod/x", ALICE);
        assert_eq!(r.status, 429);
        assert_eq!(r.message(), "Limit Exceeded");
    }
    // Redis holds one share per node, summing to 6.
    let keys = redis.command(&["KEYS", "ringgate:quota:basic:*"]).unwrap();
    assert!(keys.contains(":alice"), "{keys}");
    // A node that never served the key refuses it once it has joined (it loads the period's
    // counters when it connects), and its usage endpoint reports the cluster's count.
    let c = Gateway::start(&node_config(&redis.url(), ""));
    assert!(wait_until(Duration::from_secs(3), || c
        .stderr()
        .contains("joined")));
    thread::sleep(Duration::from_millis(300));
    assert_eq!(get_key(&c, "/prod/x", ALICE).status, 429);
    assert_eq!(used(&c, "alice")["used"], 6);
}

#[test]
fn a_node_learns_a_key_used_up_elsewhere_before_its_first_request_for_it() {
    // Both nodes are up before the key is used: the second one cannot have loaded its counter
    // at connect time. It must still refuse the key's first request it sees (no usage call on
    // it first: that would sync the key).
    let redis = Redis::start();
    let a = Gateway::start(&node_config(&redis.url(), ""));
    let b = Gateway::start(&node_config(&redis.url(), ""));
    for n in [&a, &b] {
        assert!(wait_until(Duration::from_secs(3), || n
            .stderr()
            .contains("joined")));
    }
    for _ in 0..6 {
        assert_eq!(get_key(&a, "/prod/x", ALICE).status, 200);
    }
    assert_eq!(get_key(&a, "/prod/x", ALICE).status, 429);
    // A writes its share (and announces the key) at its next sync; B syncs the key at its
    // next one after the announcement (every 100 ms).
    assert!(wait_until(Duration::from_secs(3), || {
        redis
            .command(&["KEYS", "ringgate:quota:basic:*:alice"])
            .and_then(|k| {
                // RESP: the key is the answer's line that is not a length.
                let k = k.lines().find(|l| l.starts_with("ringgate:"))?.to_string();
                redis.command(&["HVALS", &k])
            })
            .is_some_and(|v| v.lines().any(|l| l.trim() == "6"))
    }));
    thread::sleep(Duration::from_millis(400));
    let r = get_key(&b, "/prod/x", ALICE);
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(used(&b, "alice")["used"], 6);
}

#[test]
fn quota_overshoot_stays_within_one_sync_interval() {
    // Both nodes serve the same key at once (a request every ~20 ms on each): the total
    // admitted may pass the limit only by what the other node admits in one sync interval
    // (100 ms plus a round trip: about 5 here; 20 leaves room for a loaded machine), never by
    // a whole second quota as with per-node counting.
    let redis = Redis::start();
    let extra = r#"
[[usage_plans]]
name = "big"
apis = ["shop/prod"]
quota = { limit = 40, period = "day" }
[[api_keys]]
name = "erin"
value = "erin-key-0123456789abcdefg"
plans = ["big"]
"#;
    let a = Gateway::start(&node_config(&redis.url(), extra));
    let b = Gateway::start(&node_config(&redis.url(), extra));
    let run = |gw: &Gateway| {
        let addr = gw.addr;
        thread::spawn(move || {
            let mut ok = 0;
            for _ in 0..60 {
                let r = roundtrip(
                    addr,
                    b"GET /prod/x HTTP/1.1\r\nHost: t\r\nx-api-key: erin-key-0123456789abcdefg\r\nConnection: close\r\n\r\n",
                )
                .unwrap();
                if r.status == 200 {
                    ok += 1;
                }
                thread::sleep(Duration::from_millis(20));
            }
            ok
        })
    };
    let (ta, tb) = (run(&a), run(&b));
    let total = ta.join().unwrap() + tb.join().unwrap();
    eprintln!("admitted {total} of limit 40");
    assert!((40..=60).contains(&total), "admitted {total} of limit 40");
    assert!(total < 80, "not counted per node: {total}");
}

// ---------------------------------------------------------------------------------------------
// @connections
// ---------------------------------------------------------------------------------------------

fn ws_config(redis: &str, backend: SocketAddr) -> String {
    format!(
        r#"
[cluster]
redis = "{redis}"
[[upstreams]]
name = "be"
targets = ["{backend}"]
[[apis]]
name = "chat"
protocol = "websocket"
route_selection = "$request.body.action"
[[apis.routes]]
route = "$connect"
integration = {{ type = "http", upstream = "be", path = "/connect" }}
[[apis.routes]]
route = "$default"
integration = {{ type = "http", upstream = "be", path = "/default" }}
"#
    )
}

/// Two nodes on one Redis and a WebSocket client connected to node A, once node B can see
/// the connection: `path` is its `/@connections/{id}`.
struct WsPair {
    a: Gateway,
    b: Gateway,
    ws: common::ws::Ws,
    path: String,
    be: Origin,
    _redis: Redis,
}

fn ws_pair() -> WsPair {
    let redis = Redis::start();
    let be = Origin::start(|_| Response::ok(""));
    let a = Gateway::start(&ws_config(&redis.url(), be.addr));
    let b = Gateway::start(&ws_config(&redis.url(), be.addr));
    let ws = common::ws::open(a.addr, "/");
    assert!(wait_until(Duration::from_secs(3), || be.request_count() == 1));
    let id = be.requests()[0]
        .header("x-connection-id")
        .unwrap()
        .to_string();
    let path = format!("/@connections/{id}");
    // Registered in Redis within a sync interval.
    assert!(status_becomes(&b, "GET", &path, 200, 3), "{}", b.stderr());
    WsPair {
        a,
        b,
        ws,
        path,
        be,
        _redis: redis,
    }
}

/// Whether an admin call on `node` answers `status` within `secs` seconds.
fn status_becomes(node: &Gateway, method: &str, path: &str, status: u16, secs: u64) -> bool {
    wait_until(Duration::from_secs(secs), || {
        admin_call(node.admin_addr, method, path, "").status == status
    })
}

#[test]
fn connections_are_managed_from_any_node() {
    // GET on B, for a client connected to A.
    let WsPair {
        a,
        b,
        mut ws,
        path,
        be: _be,
        _redis: _r,
    } = ws_pair();
    let v = admin_call(b.admin_addr, "GET", &path, "").json();
    assert_eq!(v["sourceIp"], "127.0.0.1", "{v}");
    assert!(v["connectedAt"].as_str().unwrap().ends_with('Z'), "{v}");
    assert!(v["lastActiveAt"].as_str().is_some(), "{v}");
    // POST on B reaches the client on A, in order.
    for k in 0..5 {
        let r = admin_call(b.admin_addr, "POST", &path, &format!("hello {k}"));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    for k in 0..5 {
        let (_, opc, p) = ws.read_frame().expect("a message from node B");
        assert_eq!(opc, op::TEXT);
        assert_eq!(String::from_utf8_lossy(&p), format!("hello {k}"));
    }
    // Unknown ids: 410 on either node.
    for n in [&a, &b] {
        for m in ["GET", "POST", "DELETE"] {
            let r = admin_call(n.admin_addr, m, "/@connections/0123456789abcdef", "x");
            assert_eq!(r.status, 410, "{m}: {}", r.text());
        }
    }
    // DELETE on B closes the client on A; then the id is gone everywhere.
    assert_eq!(admin_call(b.admin_addr, "DELETE", &path, "").status, 204);
    let (_, opc, _) = ws.read_frame().expect("a close frame");
    assert_eq!(opc, op::CLOSE);
    for n in [&b, &a] {
        assert!(status_becomes(n, "GET", &path, 410, 3));
    }
    assert_eq!(admin_call(b.admin_addr, "POST", &path, "late").status, 410);
}

#[test]
fn state_is_written_back_when_redis_loses_it_without_a_restart() {
    let p = ws_pair();
    let r = admin_call(
        p.a.admin_addr,
        "POST",
        "/api-keys",
        r#"{"name":"dora","plans":[]}"#,
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let lists_dora = |n: &Gateway| n.admin_get("/api-keys").text().contains("\"dora\"");
    assert!(wait_until(Duration::from_secs(3), || lists_dora(&p.b)));
    // Redis loses everything; the nodes stay connected.
    assert!(p
        ._redis
        .command(&["FLUSHALL"])
        .is_some_and(|r| r.starts_with("+OK")));
    // Within a heartbeat the nodes notice, register their connections again and write their
    // keys back.
    assert!(
        status_becomes(&p.b, "GET", &p.path, 200, 4),
        "A: {}",
        p.a.stderr()
    );
    assert!(wait_until(Duration::from_secs(3), || p
        ._redis
        .command(&["HGETALL", "ringgate:apikeys"])
        .is_some_and(|h| h.contains("dora"))));
    // Both reloaded the hash after writing their keys back: dora is still there.
    thread::sleep(Duration::from_millis(500));
    for n in [&p.a, &p.b] {
        assert!(lists_dora(n), "{}", n.stderr());
        assert!(
            n.stderr().contains("lost the cluster's data"),
            "{}",
            n.stderr()
        );
    }
}

#[test]
fn connections_of_a_stopped_node_are_gone_at_once() {
    let mut p = ws_pair();
    // SIGTERM: A stops; B answers 410 well before A's liveness key would have expired.
    p.a.terminate();
    assert!(p.a.wait_exit(Duration::from_secs(5)).is_some());
    drop(p.ws);
    let t = std::time::Instant::now();
    assert!(status_becomes(&p.b, "GET", &p.path, 410, 3));
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[test]
fn connections_of_a_dead_node_are_gone() {
    let mut p = ws_pair();
    // kill -9 node A: its entries stay in Redis, but B answers 410 once A's liveness key has
    // expired (5 s), and a quick 503 before that; never a hang.
    let _ = Command::new("kill")
        .args(["-9", &p.a.pid.to_string()])
        .status();
    assert!(p.a.wait_exit(Duration::from_secs(5)).is_some());
    let t = std::time::Instant::now();
    let r = admin_call(p.b.admin_addr, "GET", &p.path, "");
    assert!([410, 503].contains(&r.status), "{}", r.text());
    assert!(t.elapsed() < Duration::from_secs(1));
    assert!(
        status_becomes(&p.b, "GET", &p.path, 410, 8),
        "{}",
        p.b.stderr()
    );
}

// ---------------------------------------------------------------------------------------------
// Cache invalidation
// ---------------------------------------------------------------------------------------------

/// Admin `POST /cache/invalidate` of stage `shop/prod` on `node`.
fn invalidate_stage(node: &Gateway) {
    let r = admin_call(
        node.admin_addr,
        "POST",
        "/cache/invalidate",
        r#"{"api":"shop","stage":"prod"}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

/// An origin answering `v0`, `v1`, ...: a new body for each upstream request.
fn counting_origin() -> Origin {
    let hits = std::sync::atomic::AtomicUsize::new(0);
    Origin::start(move |_| {
        let n = hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Response::ok(format!("v{n}"))
    })
}

#[test]
fn cache_invalidation_reaches_every_node() {
    let redis = Redis::start();
    let origin = counting_origin();
    let a = Gateway::start(&node_config_with(&redis.url(), "", origin.addr));
    let b = Gateway::start(&node_config_with(&redis.url(), "", origin.addr));
    // One keep-alive connection: the cache is per worker.
    let mut cb = Client::connect(b.addr);
    let mut get = || {
        cb.send(b"GET /prod/counter HTTP/1.1\r\nHost: t\r\n\r\n");
        let r = cb.read_response().unwrap();
        assert_eq!(r.status, 200);
        r.text()
    };
    let first_b = get();
    assert_eq!(get(), first_b, "cached on B");
    invalidate_stage(&a);
    assert!(
        wait_until(Duration::from_secs(3), || get() != first_b),
        "B still serves its cached entry"
    );
}

/// Two clusters on different databases of one Redis are separate: Redis channels are global
/// to the server, so each database gets its own events channel.
#[test]
fn clusters_on_other_databases_of_one_redis_stay_apart() {
    let redis = Redis::start();
    let origin = counting_origin();
    let a = Gateway::start(&node_config_with(&redis.url(), "", origin.addr));
    let b = Gateway::start(&node_config_with(&redis.url(), "", origin.addr));
    let other = Gateway::start(&node_config_with(
        &format!("{}/1", redis.url()),
        "",
        origin.addr,
    ));
    let get = |c: &mut Client| {
        c.send(b"GET /prod/counter HTTP/1.1\r\nHost: t\r\n\r\n");
        c.read_response().unwrap().text()
    };
    let (mut cb, mut co) = (Client::connect(b.addr), Client::connect(other.addr));
    let (first_b, first_o) = (get(&mut cb), get(&mut co));
    assert_eq!(get(&mut co), first_o, "cached on the other cluster's node");
    invalidate_stage(&a);
    // B (same database) drops its entry; by then the other cluster's node has had the same
    // time to hear of it, and keeps its entry.
    assert!(wait_until(Duration::from_secs(3), || get(&mut cb) != first_b));
    thread::sleep(Duration::from_millis(200));
    assert_eq!(
        get(&mut co),
        first_o,
        "another cluster's invalidation was applied"
    );
}

// ---------------------------------------------------------------------------------------------
// Outages and config
// ---------------------------------------------------------------------------------------------

#[test]
fn nodes_serve_through_a_redis_outage_and_resync() {
    let mut redis = Redis::start();
    let a = Gateway::start(&node_config(&redis.url(), ""));
    let b = Gateway::start(&node_config(&redis.url(), ""));
    let r = admin_call(
        a.admin_addr,
        "POST",
        "/api-keys",
        r#"{"name":"carol","plans":["free"],"value":"carol-key-0123456789abcdef"}"#,
    );
    assert_eq!(r.status, 201);
    let carol = "carol-key-0123456789abcdef";
    assert!(wait_until(Duration::from_secs(3), || get_key(
        &b, "/prod/x", carol
    )
    .status
        == 200));
    assert_eq!(get_key(&a, "/prod/x", ALICE).status, 200);
    assert_eq!(get_key(&b, "/prod/x", ALICE).status, 200);
    assert!(wait_until(Duration::from_secs(3), || used(&a, "alice")
        ["used"]
        == 2));

    redis.stop();
    // Both keep serving with their local state.
    for _ in 0..5 {
        assert_eq!(get_key(&a, "/prod/x", carol).status, 200);
        assert_eq!(get_key(&b, "/prod/x", carol).status, 200);
    }
    assert_eq!(get_key(&a, "/prod/x", ALICE).status, 200);
    // A key added during the outage is live locally at once.
    let r = admin_call(
        b.admin_addr,
        "POST",
        "/api-keys",
        r#"{"name":"frank","plans":["free"],"value":"frank-key-0123456789abcdef"}"#,
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let frank = "frank-key-0123456789abcdef";
    assert_eq!(get_key(&b, "/prod/x", frank).status, 200);
    thread::sleep(Duration::from_millis(500));
    // One line per outage, not per request.
    for n in [&a, &b] {
        let log = n.stderr();
        assert_eq!(
            log.matches("lost redis").count() + log.matches("unreachable").count(),
            1,
            "{log}"
        );
    }

    // Redis comes back empty (no persistence): the nodes write their state back.
    redis.restart();
    assert!(
        wait_until(Duration::from_secs(10), || get_key(&a, "/prod/x", frank)
            .status
            == 200),
        "the key added during the outage reaches A: {}",
        a.stderr()
    );
    assert_eq!(get_key(&a, "/prod/x", carol).status, 200);
    assert_eq!(get_key(&b, "/prod/x", carol).status, 200);
    // Quota shares are written again: 3 used so far (2 before, 1 during the outage on A).
    assert!(
        wait_until(Duration::from_secs(5), || used(&b, "alice")["used"] == 3),
        "{}",
        used(&b, "alice")
    );
    for n in [&a, &b] {
        assert!(n.stderr().contains("is back"), "{}", n.stderr());
    }
    // Announcements flow again (well within the 5 s periodic reload).
    let r = admin_call(
        a.admin_addr,
        "POST",
        "/api-keys",
        r#"{"name":"hank","plans":["free"]}"#,
    );
    assert_eq!(r.status, 201);
    let hank = r.json()["value"].as_str().unwrap().to_string();
    let t = std::time::Instant::now();
    assert!(wait_until(Duration::from_secs(4), || get_key(
        &b, "/prod/x", &hank
    )
    .status
        == 200));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[test]
fn keys_survive_a_redis_restart_that_a_new_node_reaches_first() {
    let mut redis = Redis::start();
    let a = Gateway::start(&node_config(&redis.url(), ""));
    let b = Gateway::start(&node_config(&redis.url(), ""));
    let r = admin_call(
        a.admin_addr,
        "POST",
        "/api-keys",
        r#"{"name":"carol","plans":["free"],"value":"carol-key-0123456789abcdef"}"#,
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let carol = "carol-key-0123456789abcdef";
    assert!(wait_until(Duration::from_secs(3), || get_key(
        &b, "/prod/x", carol
    )
    .status
        == 200));

    redis.stop();
    // A and B notice at once (a call that needs Redis), then retry after 0.1, 0.3, 0.7, 1.5,
    // 3.1 and 6.3 s.
    for n in [&a, &b] {
        let r = admin_call(n.admin_addr, "GET", "/@connections/0123456789abcdef", "");
        assert_eq!(r.status, 503, "{}", r.text());
    }
    thread::sleep(Duration::from_millis(3400));
    // Redis comes back empty, and a new node (no admin-added keys) reaches it first: until C
    // has initialised the hash, Redis takes only C's password (A and B get NOAUTH and retry),
    // so the order does not depend on how fast C starts.
    redis.extra = vec!["--requirepass".into(), "c-only".into()];
    redis.restart();
    let c_url = format!("redis://:c-only@127.0.0.1:{}", redis.port);
    let c = Gateway::start(&node_config(&c_url, ""));
    assert!(
        wait_until(Duration::from_secs(5), || redis
            .command_as("c-only", &["HEXISTS", "ringgate:apikeys", "."])
            .is_some_and(|r| r.starts_with(":1"))),
        "C initialised the hash: {}",
        c.stderr()
    );
    assert!(
        !a.stderr().contains("is back") && !b.stderr().contains("is back"),
        "C was first: {}\n{}",
        a.stderr(),
        b.stderr()
    );
    let r = redis.command_as("c-only", &["CONFIG", "SET", "requirepass", ""]);
    assert!(r.as_deref().is_some_and(|r| r.starts_with("+OK")), "{r:?}");
    // A and B write their keys back when they come back: every node, C too, has carol.
    assert!(
        wait_until(Duration::from_secs(8), || get_key(&c, "/prod/x", carol)
            .status
            == 200),
        "C: {}\nA: {}",
        c.stderr(),
        a.stderr()
    );
    assert!(wait_until(Duration::from_secs(3), || a
        .stderr()
        .contains("is back")
        && b.stderr().contains("is back")));
    // Well past A's and B's reload after the reconnect (pub/sub, and the 5 s reload at worst).
    thread::sleep(Duration::from_millis(500));
    for n in [&a, &b, &c] {
        assert_eq!(get_key(n, "/prod/x", carol).status, 200, "{}", n.stderr());
        let list = n.admin_get("/api-keys").text();
        assert!(list.contains("\"carol\""), "{list}");
    }
    let hash = redis
        .command(&["HGETALL", "ringgate:apikeys"])
        .unwrap_or_default();
    assert!(hash.contains("carol"), "{hash}");
    // A deletion in the new epoch is still a deletion everywhere.
    assert_eq!(
        admin_call(c.admin_addr, "DELETE", "/api-keys/carol", "").status,
        200
    );
    for n in [&a, &b, &c] {
        assert!(
            wait_until(Duration::from_secs(3), || get_key(n, "/prod/x", carol)
                .status
                == 403),
            "{}",
            n.stderr()
        );
    }
}

/// A directory that outlives the nodes started on it (removed at the end of the test).
struct StateDir(std::path::PathBuf);

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// [`node_config`] with `state_dir` at `state` (a node restarted on the same state).
fn node_config_in(redis: &str, state: &StateDir) -> String {
    node_config(redis, "").replace("@DIR@/state", &state.0.display().to_string())
}

/// Stops `node` (SIGTERM) and waits for it to exit.
fn stop_node(mut node: Gateway) {
    node.terminate();
    assert!(
        node.wait_exit(Duration::from_secs(10)).is_some(),
        "the node did not stop: {}",
        node.stderr()
    );
}

fn hexists(redis: &Redis, field: &str) -> bool {
    redis
        .command(&["HEXISTS", "ringgate:apikeys", field])
        .is_some_and(|r| r.starts_with(":1"))
}

/// A restarted node goes on from the cluster-wide counts its `state_dir` holds: with Redis up
/// they are not counted twice (its earlier share stays in Redis under its old id), and with
/// Redis down it still refuses a key whose quota was used up.
#[test]
fn a_restarted_node_goes_on_from_the_counts_it_synced_last() {
    let mut redis = Redis::start();
    let (sa, sb) = (StateDir(temp_dir("state-a")), StateDir(temp_dir("state-b")));
    let a = Gateway::start(&node_config_in(&redis.url(), &sa));
    let b = Gateway::start(&node_config_in(&redis.url(), &sb));
    for _ in 0..3 {
        assert_eq!(get_key(&a, "/prod/x", ALICE).status, 200);
    }
    assert_eq!(get_key(&b, "/prod/x", ALICE).status, 200);
    assert!(
        wait_until(Duration::from_secs(3), || used(&a, "alice")["used"] == 4),
        "{}",
        used(&a, "alice")
    );
    stop_node(a);
    // Redis up: 4 used, not 4 + the 4 in the file.
    let a = Gateway::start(&node_config_in(&redis.url(), &sa));
    assert!(wait_until(Duration::from_secs(3), || a
        .stderr()
        .contains("joined")));
    assert_eq!(used(&a, "alice")["used"], 4, "{}", a.stderr());
    for _ in 0..2 {
        assert_eq!(get_key(&a, "/prod/x", ALICE).status, 200);
    }
    assert_eq!(get_key(&a, "/prod/x", ALICE).status, 429);
    assert!(
        wait_until(Duration::from_secs(3), || used(&b, "alice")["used"] == 6),
        "{}",
        used(&b, "alice")
    );
    stop_node(a);
    // Redis down: the file's 6 of 6 still hold (before, a node kept them in memory only).
    redis.stop();
    let a = Gateway::start(&node_config_in(&redis.url(), &sa));
    assert!(wait_until(Duration::from_secs(3), || a
        .stderr()
        .contains("unreachable")));
    let r = get_key(&a, "/prod/x", ALICE);
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(used(&a, "alice")["used"], 6);
}

/// The sum of the shares Redis holds for `alice`'s count of plan `basic` (0 when none).
fn quota_total(redis: &Redis) -> u64 {
    let resp = |r: Option<String>| -> Vec<String> {
        r.unwrap_or_default()
            .split("\r\n")
            .filter(|l| !l.is_empty() && !l.starts_with(['*', '$']))
            .map(str::to_string)
            .collect()
    };
    let keys = resp(redis.command(&["KEYS", "ringgate:quota:basic:day:*:alice"]));
    keys.iter()
        .map(|k| {
            let fields = resp(redis.command(&["HGETALL", k]));
            fields
                .iter()
                .skip(1)
                .step_by(2)
                .map(|v| v.parse::<u64>().unwrap_or(0))
                .sum::<u64>()
        })
        .sum()
}

/// Both nodes are back from an outage and synced since.
fn both_back(a: &Gateway, b: &Gateway) {
    for n in [a, b] {
        assert!(
            wait_until(Duration::from_secs(10), || n.stderr().contains("is back")),
            "{}",
            n.stderr()
        );
    }
    thread::sleep(Duration::from_millis(300));
}

/// Two nodes count `each` of alice's quota of 6, A restarts (a new node id: its count stays
/// in Redis under its old id only), then Redis restarts empty while both run; returns once
/// both are back. Redis is started with `redis_args`.
fn count_restart_a_then_lose_redis(
    each: usize,
    redis_args: &[&str],
) -> (Redis, StateDir, StateDir, Gateway, Gateway) {
    let mut redis = Redis::start_with(redis_args);
    let (sa, sb) = (StateDir(temp_dir("state-a")), StateDir(temp_dir("state-b")));
    let a = Gateway::start(&node_config_in(&redis.url(), &sa));
    let b = Gateway::start(&node_config_in(&redis.url(), &sb));
    for n in [&a, &b] {
        for _ in 0..each {
            assert_eq!(get_key(n, "/prod/x", ALICE).status, 200);
        }
    }
    let total = 2 * each;
    assert!(wait_until(Duration::from_secs(3), || used(&a, "alice")
        ["used"]
        == total));
    stop_node(a);
    let a = Gateway::start(&node_config_in(&redis.url(), &sa));
    assert!(wait_until(Duration::from_secs(3), || a
        .stderr()
        .contains("joined")));
    for n in [&a, &b] {
        assert_eq!(used(n, "alice")["used"], total, "{}", n.stderr());
    }
    redis.stop();
    redis.restart();
    both_back(&a, &b);
    (redis, sa, sb, a, b)
}

/// Both nodes report `total` used of alice's quota (within 3 s).
fn both_report(a: &Gateway, b: &Gateway, total: u64) {
    for n in [a, b] {
        assert!(
            wait_until(Duration::from_secs(3), || used(n, "alice")["used"] == total),
            "{}\n{}",
            used(n, "alice"),
            n.stderr()
        );
    }
}

/// Audit 48, finding 1: when Redis loses its data, the running nodes write back every share
/// they last read (not only their own), so the used-up quota holds, and is counted once.
#[test]
fn a_used_up_quota_holds_when_redis_loses_its_data_after_a_node_restarted() {
    let (redis, _sa, _sb, a, b) = count_restart_a_then_lose_redis(3, &[]);
    both_report(&a, &b, 6);
    for n in [&a, &b] {
        let r = get_key(n, "/prod/x", ALICE);
        assert_eq!(r.status, 429, "{}", r.text());
    }
    // Each share written back once: 6, not 9 or 12.
    assert!(
        wait_until(Duration::from_secs(3), || quota_total(&redis) == 6),
        "{}",
        quota_total(&redis)
    );
    thread::sleep(Duration::from_millis(300));
    assert_eq!(quota_total(&redis), 6);
    for n in [&a, &b] {
        assert_eq!(used(n, "alice")["used"], 6);
    }
}

/// A Redis user without scripting cannot repair the hash: the nodes still never lower their
/// counts, and keep syncing what the others count.
#[test]
fn without_scripting_a_lost_count_is_still_never_lowered() {
    let acl = "default on nopass ~* &* +@all -@scripting";
    let mut args = vec!["--user"];
    args.extend(acl.split(' '));
    let (_redis, _sa, _sb, a, b) = count_restart_a_then_lose_redis(2, &args);
    both_report(&a, &b, 4);
    assert!(b.stderr().contains("redis error"), "{}", b.stderr());
    assert_eq!(get_key(&b, "/prod/x", ALICE).status, 200);
    both_report(&a, &b, 5);
    thread::sleep(Duration::from_millis(300));
    both_report(&a, &b, 5);
}

/// Every node stopped, Redis restarted empty, the nodes started again: the count each one
/// keeps in its `state_dir` is written back as a floor, once for the cluster (not once per
/// node), so the used-up quota still holds.
#[test]
fn a_used_up_quota_holds_after_every_node_and_redis_restarted() {
    let mut redis = Redis::start();
    let (sa, sb) = (StateDir(temp_dir("state-a")), StateDir(temp_dir("state-b")));
    let a = Gateway::start(&node_config_in(&redis.url(), &sa));
    let b = Gateway::start(&node_config_in(&redis.url(), &sb));
    for n in [&a, &b, &a, &b, &a, &b] {
        assert_eq!(get_key(n, "/prod/x", ALICE).status, 200);
    }
    for n in [&a, &b] {
        assert!(wait_until(Duration::from_secs(3), || used(n, "alice")
            ["used"]
            == 6));
    }
    stop_node(a);
    stop_node(b);
    for s in [&sa, &sb] {
        let file = std::fs::read_to_string(s.0.join("usage-plans.json")).unwrap();
        assert!(file.contains("\"used\":6"), "{file}");
    }
    redis.stop();
    redis.restart();
    let a = Gateway::start(&node_config_in(&redis.url(), &sa));
    let b = Gateway::start(&node_config_in(&redis.url(), &sb));
    for n in [&a, &b] {
        assert!(wait_until(Duration::from_secs(3), || n
            .stderr()
            .contains("joined")));
    }
    thread::sleep(Duration::from_millis(300));
    for n in [&a, &b] {
        assert_eq!(used(n, "alice")["used"], 6, "{}", n.stderr());
        let r = get_key(n, "/prod/x", ALICE);
        assert_eq!(r.status, 429, "{}", r.text());
    }
    assert_eq!(quota_total(&redis), 6);
    // Counting goes on from there on a third node too.
    let c = Gateway::start(&node_config(&redis.url(), ""));
    assert!(wait_until(Duration::from_secs(3), || c
        .stderr()
        .contains("joined")));
    assert_eq!(used(&c, "alice")["used"], 6);
    assert_eq!(get_key(&c, "/prod/x", ALICE).status, 429);
}

#[test]
fn a_restarted_node_merges_its_keys_into_a_hash_another_node_made_meanwhile() {
    let redis = Redis::start();
    let (sa, sb) = (StateDir(temp_dir("state-a")), StateDir(temp_dir("state-b")));
    let a = Gateway::start(&node_config_in(&redis.url(), &sa));
    let b = Gateway::start(&node_config_in(&redis.url(), &sb));
    let bob = "bob-key-0123456789abcdefgh";
    let r = admin_call(
        b.admin_addr,
        "POST",
        "/api-keys",
        &format!(r#"{{"name":"bob","plans":["free"],"value":"{bob}"}}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(
        wait_until(Duration::from_secs(3), || get_key(&a, "/prod/x", bob)
            .status
            == 200),
        "A: {}",
        a.stderr()
    );
    // B stops; carol is added on A: only A (and its state_dir) and Redis know it.
    stop_node(b);
    let carol = "carol-key-0123456789abcdef";
    let r = admin_call(
        a.admin_addr,
        "POST",
        "/api-keys",
        &format!(r#"{{"name":"carol","plans":["free"],"value":"{carol}"}}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(
        wait_until(Duration::from_secs(3), || hexists(&redis, "carol")),
        "{}",
        a.stderr()
    );
    stop_node(a);
    // Redis loses its data while both nodes are down.
    assert!(redis
        .command(&["FLUSHALL"])
        .is_some_and(|r| r.starts_with("+OK")));
    // B comes back first: it finds no marker and initialises the hash with the keys it knows.
    let b = Gateway::start(&node_config_in(&redis.url(), &sb));
    assert!(
        wait_until(Duration::from_secs(3), || hexists(&redis, ".")
            && hexists(&redis, "bob")),
        "B initialised the hash: {}",
        b.stderr()
    );
    assert!(!hexists(&redis, "carol"), "B never knew carol");
    // A comes back on its state_dir: the hash has another epoch than the one A synced with,
    // so A merges its keys back, as a node that stayed up does.
    let a = Gateway::start(&node_config_in(&redis.url(), &sa));
    assert!(
        wait_until(Duration::from_secs(8), || get_key(&b, "/prod/x", carol)
            .status
            == 200),
        "carol is back on B\nA: {}\nB: {}",
        a.stderr(),
        b.stderr()
    );
    assert!(hexists(&redis, "carol") && hexists(&redis, "bob"));
    assert!(
        a.stderr()
            .contains("merged this node's 2 admin-added keys back"),
        "{}",
        a.stderr()
    );
    // Well past A's reload (pub/sub, and the 5 s reload at worst).
    thread::sleep(Duration::from_millis(500));
    for n in [&a, &b] {
        for k in [bob, carol] {
            assert_eq!(get_key(n, "/prod/x", k).status, 200, "{k}: {}", n.stderr());
        }
    }
    let stored = std::fs::read_to_string(sa.0.join("api_keys.json")).unwrap();
    assert!(
        stored.contains("\"carol\"") && stored.contains("\"bob\""),
        "{stored}"
    );
}

#[test]
fn a_node_restarted_on_the_epoch_it_knows_keeps_deletions_made_while_it_was_down() {
    let redis = Redis::start();
    let sa = StateDir(temp_dir("state-a"));
    let a = Gateway::start(&node_config_in(&redis.url(), &sa));
    let b = Gateway::start(&node_config(&redis.url(), ""));
    let carol = "carol-key-0123456789abcdef";
    let r = admin_call(
        a.admin_addr,
        "POST",
        "/api-keys",
        &format!(r#"{{"name":"carol","plans":["free"],"value":"{carol}"}}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(wait_until(Duration::from_secs(3), || get_key(
        &b, "/prod/x", carol
    )
    .status
        == 200));
    // The epoch A synced with is in its state_dir (no secret in it).
    let epoch_file = std::fs::read_to_string(sa.0.join("cluster-epoch.json")).unwrap();
    assert!(!epoch_file.contains(carol), "{epoch_file}");
    stop_node(a);
    assert_eq!(
        admin_call(b.admin_addr, "DELETE", "/api-keys/carol", "").status,
        200
    );
    assert!(
        wait_until(Duration::from_secs(3), || !hexists(&redis, "carol")),
        "{}",
        b.stderr()
    );
    // A comes back: same epoch, so carol's absence is a deletion, not a loss.
    let a = Gateway::start(&node_config_in(&redis.url(), &sa));
    assert!(
        wait_until(Duration::from_secs(3), || get_key(&a, "/prod/x", carol)
            .status
            == 403),
        "{}",
        a.stderr()
    );
    thread::sleep(Duration::from_millis(500));
    assert!(!hexists(&redis, "carol"), "{}", a.stderr());
    assert_eq!(get_key(&b, "/prod/x", carol).status, 403);
    assert!(!a.stderr().contains("merged"), "{}", a.stderr());
    let stored = std::fs::read_to_string(sa.0.join("api_keys.json")).unwrap();
    assert!(!stored.contains("\"carol\""), "{stored}");
}

#[test]
fn a_bad_epoch_file_stops_the_start_with_one_clear_line() {
    let state = StateDir(temp_dir("state"));
    std::fs::write(state.0.join("cluster-epoch.json"), "{ not json").unwrap();
    let url = format!("redis://127.0.0.1:{}", free_port());
    let err = match Gateway::try_start(&node_config_in(&url, &state)) {
        Ok(g) => panic!("started: {}", g.stderr()),
        Err(e) => e,
    };
    assert!(err.contains("cluster-epoch.json"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn redis_refusing_the_node_counts_as_unreachable() {
    let redis = Redis::start_with(&["--requirepass", "s3cret-pw"]);
    let no_pw = redis.url();
    let wrong = format!("redis://:wrong-pw@127.0.0.1:{}", redis.port);
    for url in [&no_pw, &wrong] {
        let n = Gateway::start(&node_config(url, ""));
        assert!(
            wait_until(Duration::from_secs(3), || n
                .stderr()
                .contains("unreachable")),
            "{url}: one clear line: {}",
            n.stderr()
        );
        // A connection id it does not hold: it cannot know the owner, 503 (not 410).
        let r = admin_call(n.admin_addr, "POST", "/@connections/0123456789abcdef", "x");
        assert_eq!(r.status, 503, "{url}: {}", r.text());
        // It serves with its local state.
        assert_eq!(get_key(&n, "/prod/x", ALICE).status, 200);
        thread::sleep(Duration::from_millis(700));
        let log = n.stderr();
        assert_eq!(log.matches("unreachable").count(), 1, "{url}: {log}");
        assert!(!log.contains("joined"), "{url}: {log}");
        assert!(
            !log.contains("wrong-pw") && !log.contains("s3cret"),
            "{log}"
        );
    }
    // With the password: the nodes join and share keys.
    let good = format!("redis://:s3cret-pw@127.0.0.1:{}", redis.port);
    let a = Gateway::start(&node_config(&good, ""));
    let b = Gateway::start(&node_config(&good, ""));
    let r = admin_call(
        a.admin_addr,
        "POST",
        "/api-keys",
        r#"{"name":"ivy","plans":["free"]}"#,
    );
    assert_eq!(r.status, 201);
    let ivy = r.json()["value"].as_str().unwrap().to_string();
    assert!(
        wait_until(Duration::from_secs(3), || get_key(&b, "/prod/x", &ivy)
            .status
            == 200),
        "{}",
        b.stderr()
    );
    assert!(a.stderr().contains("joined"), "{}", a.stderr());
}

/// The outage lines say why: a Redis that stops answering is a timeout, and one restarted with
/// a new password is said to refuse the node (once), not only "lost".
#[test]
fn outage_lines_name_a_timeout_and_a_changed_password() {
    let mut redis = Redis::start_with(&["--requirepass", "first-pw"]);
    let url = format!("redis://:first-pw@127.0.0.1:{}", redis.port);
    let n = Gateway::start(&node_config(&url, ""));
    assert!(wait_until(Duration::from_secs(3), || n
        .stderr()
        .contains("joined")));
    // Frozen: the sync's read times out.
    let pid = redis.child.as_ref().unwrap().id() as i32;
    // SAFETY: signals to the test's own redis-server child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let said = wait_until(Duration::from_secs(8), || {
        n.stderr().contains("lost redis") && n.stderr().contains("no answer within 2 s")
    });
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(said, "{}", n.stderr());
    assert!(
        wait_until(Duration::from_secs(10), || n.stderr().contains("is back")),
        "{}",
        n.stderr()
    );
    // Restarted with another password: lost, then refused, said once.
    redis.stop();
    redis.extra = vec!["--requirepass".into(), "second-pw".into()];
    redis.restart();
    assert!(
        wait_until(Duration::from_secs(15), || n
            .stderr()
            .contains("refuses this node")),
        "{}",
        n.stderr()
    );
    thread::sleep(Duration::from_millis(1500));
    let log = n.stderr();
    assert_eq!(log.matches("refuses this node").count(), 1, "{log}");
    assert!(log.contains("check the user and password"), "{log}");
    assert!(
        !log.contains("first-pw") && !log.contains("second-pw"),
        "{log}"
    );
    assert_eq!(get_key(&n, "/prod/x", ALICE).status, 200);
}

#[test]
fn redis_down_at_start_then_up() {
    let mut redis = Redis::start();
    let url = redis.url();
    redis.stop();
    let a = Gateway::start(&node_config(&url, ""));
    assert_eq!(get_key(&a, "/prod/x", ALICE).status, 200);
    assert!(
        wait_until(Duration::from_secs(3), || a
            .stderr()
            .contains("unreachable")),
        "one clear line: {}",
        a.stderr()
    );
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        a.stderr().matches("unreachable").count(),
        1,
        "{}",
        a.stderr()
    );
    redis.restart();
    let b = Gateway::start(&node_config(&url, ""));
    let r = admin_call(
        b.admin_addr,
        "POST",
        "/api-keys",
        r#"{"name":"gina","plans":["free"]}"#,
    );
    assert_eq!(r.status, 201);
    let gina = r.json()["value"].as_str().unwrap().to_string();
    assert!(
        wait_until(Duration::from_secs(10), || get_key(&a, "/prod/x", &gina)
            .status
            == 200),
        "{}",
        a.stderr()
    );
}

#[test]
fn bad_redis_url_is_a_config_error() {
    for url in [
        "http://127.0.0.1:6379",
        "redis://127.0.0.1:notaport",
        "6379",
    ] {
        let (out, path) = check(&format!("[cluster]\nredis = \"{url}\"\n"));
        assert!(!out.status.success(), "{url}");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        // "FILE:LINE: key `cluster.redis`: ..."
        let rest = err
            .split_once(&format!("{}:", path.display()))
            .map(|x| x.1)
            .unwrap_or_default();
        let (line, tail) = rest.split_once(':').unwrap_or_default();
        assert!(line.parse::<u32>().is_ok(), "{url}: {err}");
        assert!(tail.starts_with(" key `cluster.redis`"), "{url}: {err}");
    }
    let (out, _) = check("[cluster]\nredis = \"redis://127.0.0.1:6379\"\nnodes = 3\n");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nodes"));
}
