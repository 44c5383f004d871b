//! `GET /dashboard` (a self-contained live page) and `GET /dashboard/data` (the JSON it polls).
//!
//! The page is one HTML file with inline CSS and JS, embedded in the binary; it polls
//! `/dashboard/data` every second and renders request rate, latency percentiles, error rates and
//! the top routes. Both are admin calls: when `admin.token` is set, the page itself may also be
//! loaded as `/dashboard?token=TOKEN` (a browser cannot set a header on navigation); its script
//! then sends the token as `Authorization: Bearer` on its data calls. The data endpoint accepts
//! the header only.
//!
//! The data is computed from the merged per-worker metrics ([`crate::metrics::Registry::snapshot`])
//! when polled, never on the proxy's hot path. Cumulative figures cover the whole process life;
//! "recent" figures (rate, percentiles, error shares) cover the last ~10 s, from a small ring of
//! snapshots taken when polled (at most one every 500 ms, shared by all viewers).

use crate::gateway::Shared;
use crate::metrics::{Hist, Snapshot};
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The page, served as is.
pub const PAGE: &str = include_str!("dashboard.html");

/// Span of the "recent" figures.
const WINDOW: Duration = Duration::from_secs(10);
/// Closest spacing of two ring samples (more viewers do not grow the ring).
const MIN_GAP: Duration = Duration::from_millis(500);
/// Hard bound on the ring's length.
const RING_MAX: usize = 64;
/// Routes listed in the data (busiest first); the rest are counted in `routes_omitted`.
const MAX_ROUTES: usize = 50;

/// True when `path` is the page and its query carries the configured admin token.
pub fn page_authorized(shared: &Shared, path: &str, query: Option<&[u8]>) -> bool {
    if path != "/dashboard" || query.is_none() {
        return false;
    }
    let gw = shared.current();
    match gw.config.admin.as_ref().and_then(|a| a.token.as_deref()) {
        Some(t) => query_token_ok(path, query, t),
        None => false,
    }
}

/// True when this is the page (`/dashboard`) and its query carries `token=` equal to `token`
/// (compared in constant time).
pub fn query_token_ok(path: &str, query: Option<&[u8]>, token: &str) -> bool {
    if path != "/dashboard" {
        return false;
    }
    let Some(q) = query else { return false };
    let mut v = Vec::new();
    for pair in q.split(|&b| b == b'&') {
        if let Some(raw) = pair.strip_prefix(b"token=") {
            // `+` stays literal (as with JS decodeURIComponent), so a pasted token works as is.
            crate::http::percent_decode(raw, false, &mut v);
            return super::ct_eq(&v, token.as_bytes());
        }
    }
    false
}

/// Cumulative totals at one instant, as kept in the ring.
#[derive(Clone)]
struct Sample {
    at: Instant,
    totals: Totals,
    hist: Hist,
    routes: BTreeMap<String, u64>,
}

#[derive(Clone, Copy, Default)]
struct Totals {
    all: u64,
    c4xx: u64,
    c5xx: u64,
}

/// Snapshots taken when the data is polled, spanning about [`WINDOW`].
pub struct Ring {
    samples: Mutex<VecDeque<Sample>>,
}

/// The ring used by the admin listener.
static RING: Ring = Ring::new();

impl Default for Ring {
    fn default() -> Self {
        Ring::new()
    }
}

impl Ring {
    /// An empty ring.
    pub const fn new() -> Self {
        Ring {
            samples: Mutex::new(VecDeque::new()),
        }
    }

    /// Records `snap` taken at `now` and returns the baseline to compare it with: the newest
    /// sample at least [`WINDOW`] old, else the oldest one (None on the first call). A
    /// baseline much older than the window (nobody polled for a while) is not used: the next
    /// sample after it is, else none, so traffic that ended long ago never shows as recent.
    fn push(&self, now: Instant, cur: &Sample) -> Option<Sample> {
        let mut r = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        while r.len() >= 2 && now.saturating_duration_since(r[1].at) >= WINDOW {
            r.pop_front();
        }
        let stale = |s: &Sample| now.saturating_duration_since(s.at) > WINDOW * 3 / 2;
        let base = match r.front() {
            Some(f) if stale(f) => r.get(1),
            f => f,
        }
        .filter(|s| s.at < now)
        .cloned();
        let due = r
            .back()
            .is_none_or(|b| now.saturating_duration_since(b.at) >= MIN_GAP);
        if due {
            if r.len() >= RING_MAX {
                r.pop_front();
            }
            r.push_back(cur.clone());
        }
        base
    }
}

/// Splits `api="..",stage="..",route=".."` into its three values (undoing
/// [`crate::metrics::escape_label`]).
fn parse_labels(s: &str) -> (String, String, String) {
    let mut vals: [String; 3] = Default::default();
    let mut rest = s;
    for (i, key) in ["api=\"", "stage=\"", "route=\""].iter().enumerate() {
        let Some(p) = rest.find(key) else { break };
        rest = &rest[p + key.len()..];
        let mut out = String::new();
        let mut chars = rest.char_indices();
        let mut end = rest.len();
        while let Some((j, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, n)) => out.push(n),
                    None => {}
                },
                '"' => {
                    end = j + 1;
                    break;
                }
                c => out.push(c),
            }
        }
        rest = &rest[end..];
        vals[i] = out;
    }
    let [a, b, c] = vals;
    (a, b, c)
}

fn ms(h: &Hist) -> Value {
    if h.count() == 0 {
        return json!({ "p50": null, "p95": null, "p99": null });
    }
    let q = |x: f64| (h.quantile_s(x) * 1e6).round() / 1e3;
    json!({ "p50": q(0.50), "p95": q(0.95), "p99": q(0.99) })
}

fn share(n: u64, of: u64) -> Value {
    if of == 0 {
        Value::Null
    } else {
        json!(n as f64 / of as f64)
    }
}

struct RouteAgg {
    requests: u64,
    c4xx: u64,
    c5xx: u64,
    hist: Hist,
}

/// Builds the data document from a snapshot taken at `now`, using (and feeding) `ring`.
fn build(snap: &Snapshot, now: Instant, ring: &Ring, conns: i64, ws_conns: i64) -> Value {
    let mut routes: BTreeMap<&str, RouteAgg> = BTreeMap::new();
    let mut t = Totals::default();
    let mut classes = [0u64; 6];
    for ((labels, _method, status), &n) in &snap.requests {
        let r = routes.entry(labels.as_str()).or_insert_with(|| RouteAgg {
            requests: 0,
            c4xx: 0,
            c5xx: 0,
            hist: Hist::empty(),
        });
        r.requests += n;
        t.all += n;
        let class = (*status / 100).min(5) as usize;
        classes[class] += n;
        if class == 4 {
            r.c4xx += n;
            t.c4xx += n;
        } else if class == 5 {
            r.c5xx += n;
            t.c5xx += n;
        }
    }
    let mut all_hist = Hist::empty();
    for ((labels, _method), h) in &snap.durations {
        all_hist.merge(h);
        if let Some(r) = routes.get_mut(labels.as_str()) {
            r.hist.merge(h);
        }
    }
    let cur = Sample {
        at: now,
        totals: t,
        hist: all_hist,
        routes: routes
            .iter()
            .map(|(k, r)| (k.to_string(), r.requests))
            .collect(),
    };
    let base = ring.push(now, &cur);

    let recent = match &base {
        Some(b) => {
            let secs = now.saturating_duration_since(b.at).as_secs_f64();
            let n = t.all.saturating_sub(b.totals.all);
            json!({
                "seconds": (secs * 1000.0).round() / 1000.0,
                "requests": n,
                "rate_per_s": n as f64 / secs,
                "error_rate": {
                    "4xx": share(t.c4xx.saturating_sub(b.totals.c4xx), n),
                    "5xx": share(t.c5xx.saturating_sub(b.totals.c5xx), n),
                },
                "latency_ms": ms(&cur.hist.since(&b.hist)),
            })
        }
        None => Value::Null,
    };

    let mut list: Vec<(&str, &RouteAgg)> = routes.iter().map(|(k, v)| (*k, v)).collect();
    list.sort_by(|a, b| b.1.requests.cmp(&a.1.requests).then(a.0.cmp(b.0)));
    let omitted = list.len().saturating_sub(MAX_ROUTES);
    let route_docs: Vec<Value> = list
        .into_iter()
        .take(MAX_ROUTES)
        .map(|(labels, r)| {
            let (api, stage, route) = parse_labels(labels);
            let rate = base.as_ref().map(|b| {
                let secs = now.saturating_duration_since(b.at).as_secs_f64();
                let before = b.routes.get(labels).copied().unwrap_or(0);
                r.requests.saturating_sub(before) as f64 / secs
            });
            json!({
                "api": api,
                "stage": stage,
                "route": route,
                "requests": r.requests,
                "rate_per_s": rate,
                "4xx": r.c4xx,
                "5xx": r.c5xx,
                "latency_ms": ms(&r.hist),
            })
        })
        .collect();

    json!({
        "total": t.all,
        "status": {
            "1xx": classes[1], "2xx": classes[2], "3xx": classes[3],
            "4xx": classes[4], "5xx": classes[5],
        },
        "error_rate": { "4xx": share(t.c4xx, t.all), "5xx": share(t.c5xx, t.all) },
        "latency_ms": ms(&cur.hist),
        "recent": recent,
        "connections_active": conns,
        "websocket_connections_active": ws_conns,
        "cache": { "hits": snap.cache_hits, "misses": snap.cache_misses },
        "routes": route_docs,
        "routes_omitted": omitted,
    })
}

/// The body of `GET /dashboard/data`.
pub fn data(shared: &Shared) -> Vec<u8> {
    let m = &shared.metrics;
    let snap = m.snapshot();
    build(
        &snap,
        Instant::now(),
        &RING,
        m.connections_active.load(Ordering::Relaxed),
        m.ws_connections_active.load(Ordering::Relaxed),
    )
    .to_string()
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Labels, Registry};
    use std::sync::Arc;

    #[test]
    fn parses_escaped_labels() {
        assert_eq!(
            parse_labels(r#"api="a\"b",stage="$default",route="GET /x\\y""#),
            ("a\"b".into(), "$default".into(), "GET /x\\y".into())
        );
        assert_eq!(
            parse_labels(r#"api="",stage="",route="""#),
            (String::new(), String::new(), String::new())
        );
    }

    #[test]
    fn query_token_only_for_the_page() {
        assert!(query_token_ok("/dashboard", Some(b"token=s%2Bx"), "s+x"));
        assert!(query_token_ok("/dashboard", Some(b"a=1&token=s+x"), "s+x"));
        assert!(!query_token_ok("/dashboard", Some(b"token=s"), "s+x"));
        assert!(!query_token_ok("/dashboard", None, "s"));
        assert!(!query_token_ok("/dashboard/data", Some(b"token=s"), "s"));
        assert!(!query_token_ok("/metrics", Some(b"token=s"), "s"));
    }

    #[test]
    fn totals_routes_errors_and_recent_window() {
        let reg = Registry::default();
        let a = Labels(Arc::from(r#"api="m",stage="$default",route="GET /a""#));
        let b = Labels(Arc::from(r#"api="m",stage="$default",route="GET /b""#));
        let w1 = reg.worker();
        let w2 = reg.worker();
        for _ in 0..6 {
            w1.lock()
                .unwrap()
                .request(&a, "GET", 200, Duration::from_millis(2));
        }
        w2.lock()
            .unwrap()
            .request(&a, "GET", 502, Duration::from_millis(100));
        w2.lock()
            .unwrap()
            .request(&b, "GET", 404, Duration::from_millis(1));
        let ring = Ring::new();
        let t0 = Instant::now();
        let d = build(&reg.snapshot(), t0, &ring, 3, 0);
        assert_eq!(d["total"], 8, "{d}");
        assert_eq!(d["status"]["2xx"], 6);
        assert_eq!(d["status"]["4xx"], 1);
        assert_eq!(d["status"]["5xx"], 1);
        assert_eq!(d["error_rate"]["5xx"], 0.125);
        assert_eq!(d["recent"], Value::Null, "no baseline on the first poll");
        assert_eq!(d["connections_active"], 3);
        let routes = d["routes"].as_array().unwrap();
        assert_eq!(routes[0]["route"], "GET /a");
        assert_eq!(routes[0]["requests"], 7);
        assert_eq!(routes[0]["5xx"], 1);
        assert_eq!(routes[1]["route"], "GET /b");
        assert_eq!(routes[1]["4xx"], 1);
        let p50 = d["latency_ms"]["p50"].as_f64().unwrap();
        assert!((1.9..2.1).contains(&p50), "{d}");
        let p99 = d["latency_ms"]["p99"].as_f64().unwrap();
        assert!((99.0..101.0).contains(&p99), "{d}");

        // Two seconds later, 4 more slow requests on /b: the recent window sees only those.
        for _ in 0..4 {
            w2.lock()
                .unwrap()
                .request(&b, "GET", 200, Duration::from_millis(50));
        }
        let d = build(&reg.snapshot(), t0 + Duration::from_secs(2), &ring, 0, 0);
        assert_eq!(d["total"], 12);
        assert_eq!(d["recent"]["requests"], 4, "{d}");
        assert_eq!(d["recent"]["rate_per_s"], 2.0, "{d}");
        assert_eq!(d["recent"]["error_rate"]["5xx"], 0.0);
        let rp50 = d["recent"]["latency_ms"]["p50"].as_f64().unwrap();
        assert!((49.0..51.0).contains(&rp50), "{d}");
        let b_doc = d["routes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["route"] == "GET /b")
            .unwrap();
        assert_eq!(b_doc["rate_per_s"], 2.0, "{d}");

        // Much later (nobody polled for 28 s): the old baseline is not used, so the 4
        // requests of long ago do not show as recent; the next poll compares with this one.
        let d = build(&reg.snapshot(), t0 + Duration::from_secs(30), &ring, 0, 0);
        assert!(d["recent"].is_null(), "{d}");
        let d = build(&reg.snapshot(), t0 + Duration::from_secs(31), &ring, 0, 0);
        assert_eq!(d["recent"]["requests"], 0, "{d}");
        assert_eq!(d["recent"]["seconds"], 1.0, "{d}");
        // Polled every second from then on: the window grows back to ~10 s.
        for i in 32..=45 {
            let d = build(&reg.snapshot(), t0 + Duration::from_secs(i), &ring, 0, 0);
            let secs = d["recent"]["seconds"].as_f64().unwrap();
            assert!(secs <= 15.0, "{i}: {d}");
            if i == 45 {
                assert!((10.0..=11.0).contains(&secs), "{d}");
            }
        }
    }

    #[test]
    fn page_is_self_contained() {
        assert!(PAGE.starts_with("<!doctype html>"));
        for bad in ["src=\"http", "href=\"http", "//cdn", "@import", "url("] {
            assert!(!PAGE.contains(bad), "external asset reference {bad:?}");
        }
        assert!(PAGE.contains("/dashboard/data"));
    }
}
