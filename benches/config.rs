//! Loading a config (parse, validate, compile routes and policies) with 1,000 and 10,000
//! routes: the time should grow in proportion (a quadratic step once made 40,000 routes take
//! 8.7 s; the ratio between the two sizes shows such a step again).

use criterion::{criterion_group, criterion_main, Criterion};
use std::path::PathBuf;
use std::time::Duration;

/// A config file with `n` routes in one API, written to a temporary directory.
fn write_config(n: usize) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ringgate-bench-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut s = String::from(
        "[server]\nlisten = [\"127.0.0.1:1\"]\nstate_dir = \"state\"\n\n[[apis]]\nname = \"big\"\n\
         [apis.stages.prod]\nthrottle = { rate = 100, burst = 50 }\n",
    );
    for i in 0..n {
        s.push_str(&format!(
            "\n[[apis.routes]]\nroute = \"GET /r{i}/items/{{id}}\"\n\
             integration = {{ type = \"mock\", body = \"x{i}\" }}\n\
             throttle = {{ rate = 10, burst = 5 }}\n"
        ));
    }
    let path = dir.join(format!("routes-{n}.toml"));
    std::fs::write(&path, s).unwrap();
    path
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("config_load");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(5));
    for n in [1_000, 10_000] {
        let path = write_config(n);
        let cfg = ringgate::config::load(&path).expect("the generated config loads");
        assert_eq!(cfg.routes.routes().len(), n);
        group.bench_function(format!("{n}_routes"), |b| {
            b.iter(|| ringgate::config::load(&path).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
