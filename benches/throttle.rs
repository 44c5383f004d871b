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
criterion_main!(benches);
