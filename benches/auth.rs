//! Per-request cost of the auth checks: a JWT already verified by this worker (cache hit), an
//! API key lookup (SHA-256 + constant-time compare), a SigV4 verification (the AWS test
//! suite's `get-vanilla` request, derived key cached as in a worker) and, for scale, a JWT
//! verification that misses the cache (HS256 and RS256 signature checks are in the integration
//! tests; here HS256).

use criterion::{criterion_group, criterion_main, Criterion};
use ringgate::http::{Limits, RequestHead, Status};
use ringgate::policy::auth::{self, sigv4, AuthState, Request, WorkerAuth};
use std::future::Future;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

struct Noop;
impl Wake for Noop {
    fn wake(self: Arc<Self>) {}
}

/// Polls a future that completes without waiting (the cached paths never wait).
fn now<F: Future>(f: F) -> F::Output {
    let waker = Waker::from(Arc::new(Noop));
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the check waited"),
    }
}

/// `auth::check` into a fresh identity (what the gateway does per request).
#[allow(clippy::too_many_arguments, reason = "auth::check's arguments")]
async fn check(
    w: &WorkerAuth,
    state: &AuthState,
    cfg: &auth::AuthConfig,
    gen: u64,
    route: &auth::RouteAuth,
    plans: auth::RoutePlans<'_>,
    req: &Request<'_>,
) -> Result<auth::Identity, auth::Deny> {
    let mut id = auth::Identity::default();
    auth::check(w, state, cfg, gen, route, plans, req, &mut id)
        .await
        .map(|()| id)
}

const SECRET: &str = "0123456789abcdef0123456789abcdef";
const KEY: &str = "perf-bench-key-0123456789abcdef";

fn parse(raw: &[u8]) -> RequestHead {
    let mut h = RequestHead::new(32);
    let l = Limits {
        max_header_bytes: 16384,
        max_headers: 32,
    };
    assert!(matches!(h.parse(raw, &l), Ok(Status::Complete(_))));
    h
}

fn bench(c: &mut Criterion) {
    let toml = format!(
        r#"
[[authorizers]]
name = "users"
type = "jwt"
issuer = "https://issuer.example.com"
audience = ["shop"]
secret = "{SECRET}"

[[usage_plans]]
name = "bench"
apis = ["b/$default"]

[[api_keys]]
name = "bench"
value = "{KEY}"
plans = ["bench"]

[[apis]]
name = "b"
[[apis.routes]]
route = "GET /jwt"
integration = {{ type = "mock" }}
auth = "jwt:users"
scopes = ["orders:read"]
[[apis.routes]]
route = "GET /key"
integration = {{ type = "mock" }}
api_key_required = true
"#
    );
    let cfg = ringgate::config::parse(Path::new("bench.toml"), &toml).unwrap();
    let dir = std::env::temp_dir().join(format!("ringgate-bench-auth-{}", std::process::id()));
    let state = AuthState::new(&dir, &cfg.auth.api_keys).unwrap();
    let worker = WorkerAuth::new();
    let route = |i: usize| cfg.routes.routes()[i].auth.clone();
    let (jwt_route, key_route) = (route(0), route(1));
    let plans = |i: usize| auth::RoutePlans {
        plans: &cfg.traffic.plans,
        covering: &cfg.traffic.routes[i].plans,
    };
    let (jwt_plans, key_plans) = (plans(0), plans(1));

    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let claims = serde_json::json!({"iss":"https://issuer.example.com","aud":"shop","sub":"user-1",
        "exp":exp,"scope":"orders:read profile"});
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let raw = format!("GET /jwt HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer {token}\r\n\r\n");
    let head = parse(raw.as_bytes());
    let req = Request {
        head: &head,
        buf: raw.as_bytes(),
        body: b"",
        request_id: b"bench",
    };
    let id = now(check(
        &worker, &state, &cfg.auth, 1, &jwt_route, jwt_plans, &req,
    ))
    .unwrap();
    assert_eq!(id.principal.as_deref(), Some("user-1"));
    c.bench_function("auth/jwt_cached", |b| {
        b.iter(|| {
            now(check(
                &worker,
                &state,
                &cfg.auth,
                1,
                &jwt_route,
                jwt_plans,
                black_box(&req),
            ))
        })
    });
    let mut gen = 10;
    c.bench_function("auth/jwt_uncached_hs256", |b| {
        b.iter(|| {
            gen += 1; // a new generation empties the worker's cache
            now(check(
                &worker,
                &state,
                &cfg.auth,
                gen,
                &jwt_route,
                jwt_plans,
                black_box(&req),
            ))
        })
    });

    let raw = format!("GET /key HTTP/1.1\r\nHost: b\r\nx-api-key: {KEY}\r\n\r\n");
    let head = parse(raw.as_bytes());
    let req = Request {
        head: &head,
        buf: raw.as_bytes(),
        body: b"",
        request_id: b"bench",
    };
    assert!(now(check(
        &worker, &state, &cfg.auth, 1, &key_route, key_plans, &req
    ))
    .is_ok());
    c.bench_function("auth/api_key", |b| {
        b.iter(|| {
            now(check(
                &worker,
                &state,
                &cfg.auth,
                1,
                &key_route,
                key_plans,
                black_box(&req),
            ))
        })
    });

    let raw = b"GET / HTTP/1.1\r\nHost:example.amazonaws.com\r\nX-Amz-Date:20150830T123600Z\r\nAuthorization: AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31\r\n\r\n";
    let head = parse(raw);
    let req = Request {
        head: &head,
        buf: raw,
        body: b"",
        request_id: b"bench",
    };
    let creds = [sigv4::SigV4Credential::new(
        "AKIDEXAMPLE",
        "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        "us-east-1",
        "service",
        "ci-bot",
    )];
    let t = 1_440_938_160 + 30;
    let mut cache = sigv4::KeyCache::default();
    assert!(sigv4::verify(&mut cache, 1, &creds, &req, t).is_ok());
    c.bench_function("auth/sigv4", |b| {
        b.iter(|| sigv4::verify(&mut cache, 1, &creds, black_box(&req), t))
    });
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
