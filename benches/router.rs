//! Router lookup latency: a static hit, a param hit, a greedy hit and a miss,
//! in a table of 10 routes and one of 10,000 routes.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use ringgate::router::{Match, Params, Router};

/// A small API: the kind of table a single service fronted by the gateway has.
fn small() -> Router<u32> {
    let routes: [(Option<&str>, &str); 10] = [
        (Some("GET"), "/health"),
        (Some("GET"), "/metrics"),
        (None, "/v1/login"),
        (Some("GET"), "/v1/users"),
        (Some("POST"), "/v1/users"),
        (Some("GET"), "/v1/users/{id}"),
        (Some("PUT"), "/v1/users/{id}"),
        (Some("GET"), "/v1/users/{id}/orders/{order}"),
        (Some("GET"), "/v1/orders/recent"),
        (Some("GET"), "/static/{path+}"),
    ];
    let mut r = Router::new();
    for (i, (m, p)) in routes.into_iter().enumerate() {
        r.insert(m, p, i as u32).unwrap();
    }
    r
}

/// 2,000 resources x 5 route shapes = 10,000 routes.
fn large() -> Router<u32> {
    let mut r = Router::new();
    let mut v = 0;
    for i in 0..2000 {
        for (m, p) in [
            (Some("GET"), format!("/v1/res{i}")),
            (Some("GET"), format!("/v1/res{i}/{{id}}")),
            (Some("GET"), format!("/v1/res{i}/{{id}}/orders/{{order}}")),
            (Some("GET"), format!("/v1/res{i}/stats/daily")),
            (Some("GET"), format!("/v1/res{i}/files/{{path+}}")),
        ] {
            r.insert(m, &p, v).unwrap();
            v += 1;
        }
    }
    assert_eq!(r.len(), 10_000);
    r
}

fn bench_table(c: &mut Criterion, name: &str, r: &Router<u32>, cases: [(&str, &str, bool); 4]) {
    let mut group = c.benchmark_group(name);
    for (label, path, found) in cases {
        let mut params = Params::new();
        let m = r.lookup("GET", path, &mut params);
        assert_eq!(matches!(m, Match::Found(_)), found, "{path}");
        group.bench_function(label, |b| {
            b.iter(|| {
                let m = r.lookup(black_box("GET"), black_box(path), &mut params);
                black_box(&m);
            })
        });
    }
    group.finish();
}

fn router(c: &mut Criterion) {
    bench_table(
        c,
        "router_10",
        &small(),
        [
            ("static_hit", "/v1/orders/recent", true),
            ("param_hit", "/v1/users/12345/orders/678", true),
            ("greedy_hit", "/static/css/app/main.css", true),
            ("miss", "/v1/users/12345/invoices", false),
        ],
    );
    bench_table(
        c,
        "router_10000",
        &large(),
        [
            ("static_hit", "/v1/res1234/stats/daily", true),
            ("param_hit", "/v1/res1234/98765/orders/4321", true),
            ("greedy_hit", "/v1/res1234/files/img/2024/a.png", true),
            ("miss", "/v1/res1234/98765/invoices", false),
        ],
    );
}

criterion_group!(benches, router);
criterion_main!(benches);
