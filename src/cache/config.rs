//! Compiling the stage `cache = { enabled, ttl_s, max_bytes }` and route
//! `cache = { ttl_s, key, allow_client_invalidate }` tables into a [`CachePolicy`].

use super::{CachePolicy, KeyPart, CREDENTIAL_HEADERS};
use crate::config::raw::{RawRouteCache, RawStageCache};
use crate::config::{ConfigError, Source};
use std::sync::Arc;
use std::time::Duration;
use toml::Spanned;

/// Longest `ttl_s` accepted (one year).
const MAX_TTL_S: u64 = 365 * 24 * 3600;
/// Smallest `max_bytes` accepted.
const MIN_BYTES: u64 = 64 * 1024;

/// Validates a stage's `cache` table (errors name `key`).
pub(crate) fn check_stage(
    src: &Source,
    c: &Spanned<RawStageCache>,
    key: &str,
) -> Result<(), ConfigError> {
    let r = c.get_ref();
    if r.ttl_s > MAX_TTL_S {
        return Err(src.err(
            c.span(),
            &format!("{key}.ttl_s"),
            format!("must be at most {MAX_TTL_S}"),
        ));
    }
    if r.max_bytes < MIN_BYTES || r.max_bytes > (1 << 40) {
        return Err(src.err(
            c.span(),
            &format!("{key}.max_bytes"),
            format!("must be between {MIN_BYTES} and 2^40"),
        ));
    }
    Ok(())
}

/// The cache policy of one route in one stage: `None` when the stage's cache is off, the
/// route's `ttl_s` is 0, or the integration is not `http`.
#[allow(clippy::too_many_arguments, reason = "one call site, plain data")]
pub(crate) fn compile(
    src: &Source,
    stage: Option<&Spanned<RawStageCache>>,
    route: Option<&Spanned<RawRouteCache>>,
    route_key: &str,
    is_http: bool,
    param_names: &[String],
    api: &str,
    stage_name: &str,
    auth_credentials: &[crate::policy::auth::authorizer::IdentitySource],
) -> Result<Option<Arc<CachePolicy>>, ConfigError> {
    if let Some(rc) = route {
        let r = rc.get_ref();
        let err = |k: &str, m: String| src.err(rc.span(), &format!("{route_key}.cache.{k}"), m);
        if !is_http {
            return Err(src.err(
                rc.span(),
                &format!("{route_key}.cache"),
                "caching applies to `http` integrations only (mock answers are already static)",
            ));
        }
        if r.ttl_s.is_some_and(|t| t > MAX_TTL_S) {
            return Err(err("ttl_s", format!("must be at most {MAX_TTL_S}")));
        }
        if r.key.len() > 16 {
            return Err(err("key", "at most 16 parameters".into()));
        }
        for k in &r.key {
            parse_part(k, param_names).map_err(|m| err("key", m))?;
        }
    }
    let Some(sc) = stage.map(|s| s.get_ref()).filter(|s| s.enabled) else {
        return Ok(None);
    };
    if !is_http {
        return Ok(None);
    }
    let rc = route.map(|r| r.get_ref());
    let ttl = rc.and_then(|r| r.ttl_s).unwrap_or(sc.ttl_s);
    if ttl == 0 {
        return Ok(None);
    }
    let mut key = Vec::new();
    for k in rc.map(|r| &r.key[..]).unwrap_or(&[]) {
        let p = parse_part(k, param_names).expect("checked above");
        if !key.contains(&p) {
            key.push(p);
        }
    }
    let query_in_key = key.iter().any(|k| matches!(k, KeyPart::Query(_)));
    // Credential fields outside the key. A query credential is in the key when the whole query
    // string is (no `query.X` in the key).
    let credentials: Box<[KeyPart]> = CREDENTIAL_HEADERS
        .iter()
        .map(|h| KeyPart::Header((*h).into()))
        .chain(auth_credentials.iter().map(|s| {
            use crate::policy::auth::authorizer::IdentitySource;
            match s {
                IdentitySource::Header(h) => KeyPart::Header(h.as_str().into()),
                IdentitySource::Query(q) => KeyPart::Query(q.as_str().into()),
            }
        }))
        .filter(|c| !key.contains(c) && (query_in_key || !matches!(c, KeyPart::Query(_))))
        .collect();
    Ok(Some(Arc::new(CachePolicy {
        store_id: format!("{api}\0{stage_name}").into(),
        max_bytes: sc.max_bytes,
        ttl: Duration::from_secs(ttl),
        key,
        query_in_key,
        credentials,
        allow_client_invalidate: rc.is_some_and(|r| r.allow_client_invalidate),
        stage: Default::default(),
    })))
}

fn parse_part(k: &str, param_names: &[String]) -> Result<KeyPart, String> {
    if let Some(n) = k.strip_prefix("path.") {
        return param_names
            .iter()
            .position(|p| p == n)
            .map(KeyPart::Path)
            .ok_or_else(|| format!("`{k}`: `{n}` is not a parameter of the route"));
    }
    if let Some(n) = k.strip_prefix("query.") {
        if n.is_empty() {
            return Err(format!("`{k}`: empty query parameter name"));
        }
        return Ok(KeyPart::Query(n.into()));
    }
    if let Some(n) = k.strip_prefix("header.") {
        if n.is_empty()
            || !n
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c))
        {
            return Err(format!("`{k}`: not a valid header name"));
        }
        return Ok(KeyPart::Header(n.to_ascii_lowercase().into()));
    }
    Err(format!(
        "`{k}` is not one of path.NAME, query.NAME, header.NAME"
    ))
}

#[cfg(test)]
mod tests {
    use crate::config::parse;
    use std::path::Path;

    const BASE: &str = r#"
[[upstreams]]
name = "o"
targets = ["127.0.0.1:9001"]
[[apis]]
name = "shop"
[apis.stages.prod]
cache = { ttl_s = 60, max_bytes = 1048576 }
[apis.stages.dev]
[[apis.routes]]
route = "GET /p/{id}"
integration = { type = "http", upstream = "o" }
cache = { ttl_s = 30, key = ["path.id", "query.lang", "header.Accept"] }
[[apis.routes]]
route = "GET /q"
integration = { type = "http", upstream = "o" }
"#;

    #[test]
    fn compiles_per_stage() {
        let c = parse(Path::new("t.toml"), BASE).unwrap();
        let rs = c.routes.routes();
        let prod: Vec<_> = rs.iter().filter(|r| &*r.stage == "prod").collect();
        let dev: Vec<_> = rs.iter().filter(|r| &*r.stage == "dev").collect();
        assert!(dev.iter().all(|r| r.cache.is_none()));
        let p = prod[0].cache.as_ref().unwrap();
        assert_eq!(p.ttl.as_secs(), 30);
        assert!(p.query_in_key);
        assert_eq!(p.key.len(), 3);
        let q = prod[1].cache.as_ref().unwrap();
        assert_eq!(q.ttl.as_secs(), 60);
        assert!(!q.query_in_key);
    }

    #[test]
    fn the_route_table_shows_the_cache_on_get_routes_only() {
        let cfg = format!(
            "{BASE}[[apis.routes]]\nroute = \"POST /q\"\nintegration = {{ type = \"http\", upstream = \"o\" }}\n"
        );
        let c = parse(Path::new("t.toml"), &cfg).unwrap();
        let table = c.routes.describe(&c.upstreams);
        let line = |k: &str| {
            table
                .lines()
                .find(|l| l.contains("prod") && l.contains(k))
                .unwrap_or_else(|| panic!("no {k} in {table}"))
                .to_string()
        };
        assert!(line("GET /q").contains("(cache 60s)"), "{table}");
        assert!(!line("POST /q").contains("cache"), "{table}");
    }

    #[test]
    fn errors_name_line_and_key() {
        let bad = BASE.replace("\"path.id\"", "\"path.nope\"");
        let e = parse(Path::new("t.toml"), &bad).unwrap_err().0;
        assert!(e.contains("t.toml:13:") && e.contains("cache.key"), "{e}");
        let bad = BASE.replace("\"query.lang\"", "\"cookie.x\"");
        assert!(parse(Path::new("t.toml"), &bad).is_err());
        let bad = BASE.replace("max_bytes = 1048576", "max_bytes = 10");
        let e = parse(Path::new("t.toml"), &bad).unwrap_err().0;
        assert!(e.contains("t.toml:8:") && e.contains("max_bytes"), "{e}");
        let bad = BASE.replace("ttl_s = 60,", "ttl_s = 60, bogus = 1,");
        assert!(parse(Path::new("t.toml"), &bad).is_err());
        let bad = BASE.replace(
            "route = \"GET /q\"\nintegration = { type = \"http\", upstream = \"o\" }",
            "route = \"GET /q\"\nintegration = { type = \"mock\" }\ncache = { ttl_s = 5 }",
        );
        let e = parse(Path::new("t.toml"), &bad).unwrap_err().0;
        assert!(e.contains("http"), "{e}");
    }
}
