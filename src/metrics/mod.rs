//! Metrics: per-worker counters and request-duration histograms, merged only when scraped.
//!
//! Each worker owns one [`WorkerMetrics`] behind its own mutex. The worker is the only writer,
//! so the lock is uncontended on the hot path (one atomic pair per request); a scrape takes each
//! worker's lock briefly and merges into Prometheus text.

use ahash::AHashMap;
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Histogram bucket bounds, in seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A Prometheus label value: backslash, `"` and line feeds escaped, as the text format asks (a raw
/// line feed would break the whole scrape).
pub fn escape_label(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o
}

/// A label set (`api="..",stage="..",route=".."` or an upstream name), interned once per
/// config: workers find their metric entries by its address.
#[derive(Clone, Debug)]
pub struct Labels(pub Arc<str>);

/// A latency histogram in microseconds with an exact sum.
#[derive(Clone)]
pub struct Hist {
    h: Histogram<u64>,
    sum_us: u64,
}

impl Hist {
    fn new() -> Self {
        Hist {
            // 1 µs .. 1 hour, 2 significant digits: a few KB each.
            h: Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid bounds"),
            sum_us: 0,
        }
    }

    fn record(&mut self, d: Duration) {
        let us = (d.as_micros() as u64).max(1);
        self.h.saturating_record(us);
        self.sum_us += us;
    }

    /// An empty histogram.
    pub fn empty() -> Self {
        Hist::new()
    }

    /// Adds `o`'s samples to this one.
    pub fn merge(&mut self, o: &Hist) {
        let _ = self.h.add(&o.h);
        self.sum_us += o.sum_us;
    }

    /// The samples recorded since `earlier` (an older copy of this same cumulative histogram).
    /// Falls back to everything when `earlier` is not a prefix of this one.
    pub fn since(&self, earlier: &Hist) -> Hist {
        let mut d = self.clone();
        match d.h.subtract(&earlier.h) {
            Ok(()) => {
                d.sum_us = self.sum_us.saturating_sub(earlier.sum_us);
                d
            }
            Err(_) => self.clone(),
        }
    }

    /// Value at quantile `q` (0..1), in seconds.
    pub fn quantile_s(&self, q: f64) -> f64 {
        self.h.value_at_quantile(q) as f64 / 1e6
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.h.len()
    }
}

/// One worker's metrics. Entries are found by the address of their interned label set, so a
/// request that finds its entry clones nothing (no reference-count traffic on the shared
/// labels); the entry keeps its own clone, which also keeps the address from being reused.
#[derive(Default)]
pub struct WorkerMetrics {
    requests: AHashMap<(usize, &'static str, u16), (Labels, u64)>,
    durations: AHashMap<(usize, &'static str), (Labels, Hist)>,
    upstream: AHashMap<usize, (Labels, Hist)>,
    /// Requests answered from the cache.
    pub cache_hits: u64,
    /// Cacheable requests that went upstream.
    pub cache_misses: u64,
    /// Connections accepted and closed at once because `max_connections` were open.
    pub refused_max_connections: u64,
    /// Failed `accept()` calls (at the file-descriptor limit: EMFILE, ENFILE).
    pub refused_accept_error: u64,
}

fn addr(l: &Arc<str>) -> usize {
    Arc::as_ptr(l) as *const u8 as usize
}

impl WorkerMetrics {
    /// Records one finished request.
    pub fn request(&mut self, labels: &Labels, method: &'static str, status: u16, d: Duration) {
        self.request_for(&labels.0, method, status, d)
    }

    /// Records one finished request of the route whose interned labels are `labels`.
    pub fn request_for(
        &mut self,
        labels: &Arc<str>,
        method: &'static str,
        status: u16,
        d: Duration,
    ) {
        self.count_request(labels, method, status);
        let a = addr(labels);
        match self.durations.get_mut(&(a, method)) {
            Some(e) => e.1.record(d),
            None => {
                let mut h = Hist::new();
                h.record(d);
                self.durations
                    .insert((a, method), (Labels(labels.clone()), h));
            }
        }
    }

    /// Counts one request in `ringgate_requests_total` only: one refused before it could be
    /// served (a malformed or late head), whose duration means nothing.
    pub fn count_request(&mut self, labels: &Arc<str>, method: &'static str, status: u16) {
        let a = addr(labels);
        match self.requests.get_mut(&(a, method, status)) {
            Some(e) => e.1 += 1,
            None => {
                self.requests
                    .insert((a, method, status), (Labels(labels.clone()), 1));
            }
        }
    }

    /// Records one upstream exchange (until the response head).
    pub fn upstream(&mut self, upstream: &Labels, d: Duration) {
        let a = addr(&upstream.0);
        match self.upstream.get_mut(&a) {
            Some(e) => e.1.record(d),
            None => {
                let mut h = Hist::new();
                h.record(d);
                self.upstream.insert(a, (upstream.clone(), h));
            }
        }
    }
}

/// All workers' metrics and the gateway-wide gauges.
#[derive(Default)]
pub struct Registry {
    workers: Mutex<Vec<Arc<Mutex<WorkerMetrics>>>>,
    /// Open client connections.
    pub connections_active: AtomicI64,
    /// Open WebSocket connections.
    pub ws_connections_active: AtomicI64,
    /// TLS handshakes not completed within `header_timeout`.
    pub tls_handshake_timeouts: std::sync::atomic::AtomicU64,
    /// TLS handshakes refused (not TLS, no shared protocol, bad or missing client certificate)
    /// or cut short by the client.
    pub tls_handshake_errors: std::sync::atomic::AtomicU64,
}

/// Merged view used by the dashboard and the scrape.
pub struct Snapshot {
    pub requests: BTreeMap<(String, &'static str, u16), u64>,
    pub durations: BTreeMap<(String, &'static str), Hist>,
    pub upstream: BTreeMap<String, Hist>,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub refused_max_connections: u64,
    pub refused_accept_error: u64,
}

impl Registry {
    /// Registers a worker and returns its metrics block.
    pub fn worker(&self) -> Arc<Mutex<WorkerMetrics>> {
        let m = Arc::new(Mutex::new(WorkerMetrics::default()));
        self.workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(m.clone());
        m
    }

    /// Merges every worker's metrics.
    pub fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot {
            requests: BTreeMap::new(),
            durations: BTreeMap::new(),
            upstream: BTreeMap::new(),
            cache_hits: 0,
            cache_misses: 0,
            refused_max_connections: 0,
            refused_accept_error: 0,
        };
        let workers = self
            .workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for w in workers {
            let w = w.lock().unwrap_or_else(|e| e.into_inner());
            s.cache_hits += w.cache_hits;
            s.cache_misses += w.cache_misses;
            s.refused_max_connections += w.refused_max_connections;
            s.refused_accept_error += w.refused_accept_error;
            for ((_, m, st), (l, n)) in &w.requests {
                *s.requests.entry((l.0.to_string(), m, *st)).or_insert(0) += n;
            }
            for ((_, m), (l, h)) in &w.durations {
                s.durations
                    .entry((l.0.to_string(), m))
                    .or_insert_with(Hist::new)
                    .merge(h);
            }
            for (l, h) in w.upstream.values() {
                s.upstream
                    .entry(l.0.to_string())
                    .or_insert_with(Hist::new)
                    .merge(h);
            }
        }
        s
    }

    /// Prometheus text exposition of everything.
    pub fn render(&self) -> String {
        self.render_with("", "")
    }

    /// [`Registry::render`] with the `ringgate_throttled_total` sample lines and more families
    /// at the end (from the traffic-control state of the live config).
    pub fn render_with(&self, throttled: &str, tail: &str) -> String {
        let s = self.snapshot();
        let mut o = String::with_capacity(4096);
        o.push_str("# HELP ringgate_requests_total Requests answered, by route and status.\n# TYPE ringgate_requests_total counter\n");
        for ((l, m, st), n) in &s.requests {
            let _ = writeln!(
                o,
                "ringgate_requests_total{{{l},method=\"{m}\",status=\"{st}\"}} {n}"
            );
        }
        o.push_str("# HELP ringgate_request_duration_seconds Time from request head to response end.\n# TYPE ringgate_request_duration_seconds histogram\n");
        for ((l, m), h) in &s.durations {
            write_hist(
                &mut o,
                "ringgate_request_duration_seconds",
                &format!("{l},method=\"{m}\""),
                h,
            );
        }
        o.push_str("# HELP ringgate_upstream_duration_seconds Time from sending upstream to its response head.\n# TYPE ringgate_upstream_duration_seconds histogram\n");
        for (l, h) in &s.upstream {
            write_hist(
                &mut o,
                "ringgate_upstream_duration_seconds",
                &format!("upstream=\"{}\"", escape_label(l)),
                h,
            );
        }
        let _ = writeln!(
            o,
            "# HELP ringgate_connections_active Open client connections.\n# TYPE ringgate_connections_active gauge\nringgate_connections_active {}",
            self.connections_active.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            o,
            "# HELP ringgate_connections_refused_total Connections accepted and closed at once because max_connections were open, and failed accepts (file-descriptor limit).\n# TYPE ringgate_connections_refused_total counter\nringgate_connections_refused_total{{reason=\"max_connections\"}} {}\nringgate_connections_refused_total{{reason=\"accept_error\"}} {}",
            s.refused_max_connections, s.refused_accept_error
        );
        o.push_str("# HELP ringgate_throttled_total Requests refused by a throttle or quota.\n# TYPE ringgate_throttled_total counter\n");
        o.push_str(throttled);
        let _ = writeln!(
            o,
            "# HELP ringgate_cache_hits_total Responses served from the cache.\n# TYPE ringgate_cache_hits_total counter\nringgate_cache_hits_total {}",
            s.cache_hits
        );
        let _ = writeln!(
            o,
            "# HELP ringgate_cache_misses_total Cacheable requests not found in the cache.\n# TYPE ringgate_cache_misses_total counter\nringgate_cache_misses_total {}",
            s.cache_misses
        );
        let _ = writeln!(
            o,
            "# HELP ringgate_websocket_connections_active Open WebSocket connections (pass-through and WebSocket APIs).\n# TYPE ringgate_websocket_connections_active gauge\nringgate_websocket_connections_active {}",
            self.ws_connections_active.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            o,
            "# HELP ringgate_tls_handshake_failures_total TLS handshakes that did not complete.\n# TYPE ringgate_tls_handshake_failures_total counter\nringgate_tls_handshake_failures_total{{reason=\"timeout\"}} {}\nringgate_tls_handshake_failures_total{{reason=\"error\"}} {}",
            self.tls_handshake_timeouts.load(Ordering::Relaxed),
            self.tls_handshake_errors.load(Ordering::Relaxed)
        );
        o.push_str(tail);
        o
    }
}

fn write_hist(o: &mut String, name: &str, labels: &str, h: &Hist) {
    for b in BUCKETS {
        let n = h.h.count_between(0, (b * 1e6) as u64);
        let _ = writeln!(o, "{name}_bucket{{{labels},le=\"{b}\"}} {n}");
    }
    let _ = writeln!(o, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", h.count());
    let _ = writeln!(o, "{name}_sum{{{labels}}} {}", h.sum_us as f64 / 1e6);
    let _ = writeln!(o, "{name}_count{{{labels}}} {}", h.count());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn merges_workers_and_renders_buckets() {
        let r = Registry::default();
        let l = Labels(Arc::from("api=\"a\",stage=\"s\",route=\"GET /x\""));
        let w1 = r.worker();
        let w2 = r.worker();
        w1.lock()
            .unwrap()
            .request(&l, "GET", 200, Duration::from_micros(300));
        w2.lock()
            .unwrap()
            .request(&l, "GET", 200, Duration::from_millis(20));
        w2.lock()
            .unwrap()
            .request(&l, "GET", 404, Duration::from_millis(2));
        let text = r.render();
        assert!(text.contains(
            "ringgate_requests_total{api=\"a\",stage=\"s\",route=\"GET /x\",method=\"GET\",status=\"200\"} 2"
        ), "{text}");
        assert!(text.contains("le=\"0.0005\"} 1\n"), "{text}");
        assert!(text.contains("le=\"0.025\"} 3\n"), "{text}");
        assert!(text.contains("ringgate_request_duration_seconds_count{api=\"a\",stage=\"s\",route=\"GET /x\",method=\"GET\"} 3"), "{text}");
    }

    #[test]
    fn refused_connections_are_merged_by_reason() {
        let r = Registry::default();
        let w1 = r.worker();
        let w2 = r.worker();
        w1.lock().unwrap().refused_max_connections += 2;
        w2.lock().unwrap().refused_max_connections += 1;
        w2.lock().unwrap().refused_accept_error += 5;
        let text = r.render();
        assert!(
            text.contains("ringgate_connections_refused_total{reason=\"max_connections\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("ringgate_connections_refused_total{reason=\"accept_error\"} 5\n"),
            "{text}"
        );
    }
}
