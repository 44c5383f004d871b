//! Token-bucket checks: one GCRA step on a shared `AtomicU64`, uncontended and with a second
//! thread hammering the same bucket; the per-IP table; the clock read a request pays once.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use ringgate::policy::throttle::{now_ns, Bucket, KeyedBuckets, Rate};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// A bucket that always has tokens (so every check does its compare-and-swap).
fn open_bucket() -> Bucket {
    Bucket::new(Rate {
        rate: 1e9,
        burst: 1_000_000_000,
    })
}

fn bench(c: &mut Criterion) {
    let b = open_bucket();
    let mut now = now_ns();
    c.bench_function("bucket_check_uncontended", |bn| {
        bn.iter(|| {
            now += 1;
            black_box(b.check(black_box(now)))
        })
    });

    let refused = Bucket::new(Rate {
        rate: 1.0,
        burst: 1,
    });
    let now = now_ns();
    let _ = refused.check(now);
    c.bench_function("bucket_check_refused", |bn| {
        bn.iter(|| black_box(refused.check(black_box(now))))
    });

    c.bench_function("bucket_check_with_clock", |bn| {
        bn.iter(|| black_box(b.check(now_ns())))
    });

    let shared = Arc::new(open_bucket());
    c.bench_function("bucket_check_two_threads_contending", |bn| {
        bn.iter_custom(|iters| {
            let stop = Arc::new(AtomicBool::new(false));
            let (s2, b2) = (stop.clone(), shared.clone());
            let other = std::thread::spawn(move || {
                let mut t = now_ns();
                while !s2.load(Ordering::Relaxed) {
                    t += 1;
                    let _ = black_box(b2.check(t));
                }
            });
            let mut t = now_ns();
            let start = Instant::now();
            for _ in 0..iters {
                t += 1;
                let _ = black_box(shared.check(t));
            }
            let d = start.elapsed();
            stop.store(true, Ordering::Relaxed);
            other.join().unwrap();
            d
        })
    });

    let keyed = KeyedBuckets::new(
        Rate {
            rate: 1e9,
            burst: 1_000_000_000,
        },
        65_536,
    );
    let mut i = 0u32;
    let now = now_ns();
    c.bench_function("per_ip_check_1000_ips", |bn| {
        bn.iter(|| {
            i = (i + 1) % 1000;
            black_box(keyed.check(black_box(u128::from(i)), now))
        })
    });
}

criterion_group!(benches, bench);

/// The perf `throttle` case's policy work for one request, without I/O: IP lists, per-IP
/// bucket, three regex rules, route bucket, key lookup, plan bucket and quota.
fn pipeline(c: &mut Criterion) {
    let text = r#"
[[apis]]
name = "bench"
[[apis.routes]]
route = "ANY /{proxy+}"
integration = { type = "mock" }
throttle = { rate = 100000000, burst = 100000000 }
[[usage_plans]]
name = "bench"
apis = ["bench/$default"]
throttle = { rate = 100000000, burst = 100000000 }
quota = { limit = 1000000000000, period = "month" }
[[api_keys]]
name = "bench"
value = "perf-bench-key-0123456789abcdef"
plans = ["bench"]
[waf]
ip_allow = ["127.0.0.0/8", "::1"]
ip_deny = ["10.66.0.0/16", "192.0.2.0/24"]
rate_per_ip = { rate = 100000000, burst = 100000000 }
rules = [
  { name = "sqli", target = "query", pattern = "(?i)union\\s+select", action = "block" },
  { name = "xss", target = "path", pattern = "(?i)<\\s*script", action = "block" },
  { name = "scanner", target = "header.user-agent", pattern = "(?i)sqlmap|nikto", action = "block" },
]
"#;
    let cfg = ringgate::config::parse(std::path::Path::new("bench.toml"), text).unwrap();
    let t = &cfg.traffic;
    let rt = &t.routes[0];
    let keys = ringgate::policy::auth::KeySet::new(cfg.auth.api_keys.clone());
    let ip: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let headers: [(&[u8], &[u8]); 4] = [
        (b"host", b"127.0.0.1:18082"),
        (b"user-agent", b"wrk"),
        (b"accept", b"*/*"),
        (b"x-api-key", b"perf-bench-key-0123456789abcdef"),
    ];
    use ringgate::policy::plans::KeyDirectory;
    use ringgate::policy::waf::{Input, Verdict};
    c.bench_function("policy_waf_ip", |bn| {
        bn.iter(|| black_box(t.waf.check_ip(black_box(ip), now_ns())))
    });
    c.bench_function("policy_waf_three_rules", |bn| {
        bn.iter(|| {
            let mut it = headers.iter().copied();
            black_box(t.waf.check_rules(Input {
                path: black_box(b"/hello"),
                query: None,
                headers: &mut it,
            }))
        })
    });
    c.bench_function("policy_plan_key_and_quota", |bn| {
        bn.iter(|| {
            let now = now_ns();
            let k = keys
                .find(black_box(b"perf-bench-key-0123456789abcdef"))
                .unwrap();
            black_box(
                t.plans
                    .check(k, &rt.plans, now, ringgate::policy::plans::unix_at(now)),
            )
        })
    });
    c.bench_function("policy_whole_throttle_case", |bn| {
        bn.iter(|| {
            let now = now_ns();
            assert_eq!(t.waf.check_ip(ip, now), Verdict::Pass);
            let mut it = headers.iter().copied();
            let v = t.waf.check_rules(Input {
                path: b"/hello",
                query: None,
                headers: &mut it,
            });
            let _ = rt.route.as_ref().unwrap().check(now);
            let k = keys.find(b"perf-bench-key-0123456789abcdef").unwrap();
            black_box((
                v,
                t.plans
                    .check(k, &rt.plans, now, ringgate::policy::plans::unix_at(now)),
            ))
        })
    });
}

criterion_group!(pipeline_benches, pipeline);
criterion_main!(benches, pipeline_benches);
