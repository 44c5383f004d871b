//! The compiled traffic-control config: [`build`] turns the config keys (`server.throttle`,
//! stage and route `throttle`, API `cors`, `[waf]`, `[[usage_plans]]`, `[[api_keys]]`) into a
//! [`Traffic`] value that lives in the [`crate::config::Config`]; per-route data is indexed by
//! route id. [`Traffic::inherit`] carries bucket state and counters over a reload.

use super::cors::{Cors, CorsSpec};
use super::plans::{self, Period, Plan, Plans, Quota};
use super::raw::{self, RawRule, RawRuleFile, RawThrottle};
use super::throttle::{Bucket, KeyedBuckets, Rate};
use super::waf::{Action, Cidr, RuleSpec, Target, Waf};
use crate::config::{ConfigError, RouteTable, Source};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Why a request was throttled (the `reason` label of `ringgate_throttled_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Reason {
    Server = 0,
    Stage = 1,
    Route = 2,
    Ip = 3,
    Plan = 4,
    Quota = 5,
}

const REASONS: [&str; 6] = ["server", "stage", "route", "ip", "plan", "quota"];

/// The traffic-control state of one route.
#[derive(Debug, Default)]
pub struct RouteTraffic {
    /// Anything to do for this route beyond the gateway-wide stages.
    pub any: bool,
    pub stage: Option<Arc<Bucket>>,
    pub route: Option<Arc<Bucket>>,
    pub cors: Option<Arc<Cors>>,
    /// Usage plans covering this route's API stage.
    pub plans: Vec<u16>,
    throttled: Arc<[AtomicU64; 6]>,
    labels: Option<Arc<str>>,
}

impl RouteTraffic {
    /// Counts one refusal.
    pub fn count(&self, r: Reason) {
        self.throttled[r as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// The compiled traffic-control config.
#[derive(Debug, Default)]
pub struct Traffic {
    /// Gateway-wide stages present (server throttle or an active WAF).
    pub any: bool,
    pub server: Option<Arc<Bucket>>,
    pub waf: Waf,
    pub routes: Vec<RouteTraffic>,
    pub plans: Plans,
    /// Refusals of requests that matched no route (the per-IP rate), with empty labels.
    pub unrouted: RouteTraffic,
}

impl Traffic {
    /// Carries the state of `old` (the config being replaced) over a reload: buckets with the
    /// same rate keep their tokens (a reload must not refill every bucket), counters keep
    /// counting. Routes match by api, stage and route key; rules and plans by name.
    pub fn inherit(&mut self, old: &Traffic) {
        fn keep(new: &mut Option<Arc<Bucket>>, old: &Option<Arc<Bucket>>) {
            if let (Some(n), Some(o)) = (new.as_ref(), old) {
                if n.same_rate(o) {
                    *new = Some(o.clone());
                }
            }
        }
        keep(&mut self.server, &old.server);
        self.unrouted.throttled = old.unrouted.throttled.clone();
        // A stage bucket is shared by the stage's routes: replace it the same way in all.
        let mut stages: Vec<(*const Bucket, Arc<Bucket>)> = Vec::new();
        // The old routes by their labels (the first one, as a search in order would find).
        let mut by_labels: ahash::AHashMap<Option<&str>, &RouteTraffic> =
            ahash::AHashMap::with_capacity(old.routes.len());
        for o in &old.routes {
            by_labels.entry(o.labels.as_deref()).or_insert(o);
        }
        for rt in &mut self.routes {
            let Some(o) = by_labels.get(&rt.labels.as_deref()).copied() else {
                if let Some(s) = rt.stage.clone() {
                    match stages.iter().find(|(p, _)| *p == Arc::as_ptr(&s)) {
                        Some((_, c)) => rt.stage = Some(c.clone()),
                        None => stages.push((Arc::as_ptr(&s), s)),
                    }
                }
                continue;
            };
            keep(&mut rt.route, &o.route);
            rt.throttled = o.throttled.clone();
            if let Some(s) = rt.stage.clone() {
                let ptr = Arc::as_ptr(&s);
                let chosen = match stages.iter().find(|(p, _)| *p == ptr) {
                    Some((_, c)) => c.clone(),
                    None => {
                        let mut c = Some(s);
                        keep(&mut c, &o.stage);
                        let c = c.expect("kept");
                        stages.push((ptr, c.clone()));
                        c
                    }
                };
                rt.stage = Some(chosen);
            }
        }
        let (w, ow) = (&mut self.waf, &old.waf);
        if let (Some(n), Some(o)) = (&w.per_ip, &ow.per_ip) {
            if n.same_shape(o) {
                w.per_ip = Some(o.clone());
            }
        }
        w.ip_refused = ow.ip_refused.clone();
        for r in &mut w.rules {
            if let Some(o) = ow.rules.iter().find(|o| o.name == r.name) {
                r.matches = o.matches.clone();
            }
        }
        for p in &mut self.plans.plans {
            if let Some(o) = old.plans.plans.iter().find(|o| o.name == p.name) {
                p.inherit(o);
            }
        }
    }

    /// Prometheus lines of `ringgate_throttled_total` (without HELP/TYPE).
    pub fn render_throttled(&self, o: &mut String) {
        for rt in self.routes.iter().chain([&self.unrouted]) {
            let Some(l) = &rt.labels else { continue };
            for (i, reason) in REASONS.iter().enumerate() {
                let n = rt.throttled[i].load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(o, "ringgate_throttled_total{{{l},reason=\"{reason}\"}} {n}");
                }
            }
        }
    }
}

fn rate(src: &Source, t: &toml::Spanned<RawThrottle>, key: &str) -> Result<Rate, ConfigError> {
    let r = t.get_ref();
    if !(r.rate.is_finite() && (0.001..=1e9).contains(&r.rate))
        || r.burst == 0
        || r.burst > 1_000_000_000
        || (1e9 / r.rate) * r.burst as f64 > 1e18
    {
        return Err(src.err(
            t.span(),
            key,
            "rate must be between 0.001 and 1e9, burst between 1 and 1e9, and burst / rate at most 1e9 seconds",
        ));
    }
    Ok(Rate {
        rate: r.rate,
        burst: r.burst,
    })
}

/// Compiles the traffic-control keys of `raw` for the compiled `routes`.
pub(crate) fn build(
    src: &Source,
    raw: &crate::config::raw::RawConfig,
    routes: &RouteTable,
) -> Result<Traffic, ConfigError> {
    let mut t = Traffic {
        unrouted: RouteTraffic {
            labels: Some("api=\"\",stage=\"\",route=\"\"".into()),
            ..RouteTraffic::default()
        },
        ..Traffic::default()
    };
    if let Some(th) = &raw.server.throttle {
        t.server = Some(Arc::new(Bucket::new(rate(src, th, "server.throttle")?)));
    }
    if let Some(w) = &raw.waf {
        t.waf = build_waf(src, w)?;
    }
    t.plans = build_plans(src, raw)?;
    t.any = t.server.is_some() || t.waf.active();

    // Per API: CORS; per stage: the shared stage bucket.
    let mut cors_by_api: Vec<(String, Option<Arc<Cors>>)> = Vec::new();
    let mut stage_buckets: Vec<((String, String), Arc<Bucket>)> = Vec::new();
    for (ai, api) in raw.apis.iter().enumerate() {
        let name = api.name.get_ref().clone();
        let cors = match &api.cors {
            None => None,
            Some(c) => {
                let r = c.get_ref();
                Some(Arc::new(
                    Cors::build(&CorsSpec {
                        allow_origins: &r.allow_origins,
                        allow_methods: &r.allow_methods,
                        allow_headers: &r.allow_headers,
                        expose_headers: &r.expose_headers,
                        max_age_s: r.max_age_s,
                        allow_credentials: r.allow_credentials,
                    })
                    .map_err(|e| src.err(c.span(), &format!("apis[{ai}].cors"), e))?,
                ))
            }
        };
        cors_by_api.push((name.clone(), cors));
        for (sname, st) in &api.stages {
            if let Some(th) = &st.throttle {
                let r = rate(
                    src,
                    th,
                    &format!(
                        "apis[{ai}].stages.{}.throttle",
                        crate::config::locate::key_part(sname)
                    ),
                )?;
                stage_buckets.push(((name.clone(), sname.clone()), Arc::new(Bucket::new(r))));
            }
        }
    }
    // Each API by name, and each of its routes by key (the first one written), so that
    // matching the compiled routes back to the raw ones is linear in the number of routes.
    let mut api_index: ahash::AHashMap<&str, usize> = ahash::AHashMap::new();
    let mut route_index: Vec<ahash::AHashMap<&str, usize>> = Vec::with_capacity(raw.apis.len());
    for (ai, api) in raw.apis.iter().enumerate() {
        api_index.entry(api.name.get_ref().as_str()).or_insert(ai);
        let mut by_key = ahash::AHashMap::with_capacity(api.routes.len());
        for (ri, rr) in api.routes.iter().enumerate() {
            by_key.entry(rr.route.get_ref().trim()).or_insert(ri);
        }
        route_index.push(by_key);
    }
    for r in routes.routes() {
        let mut rt = RouteTraffic {
            labels: Some(r.labels.clone()),
            ..RouteTraffic::default()
        };
        let ai = *api_index
            .get(&*r.api)
            .expect("compiled route of a known API");
        let api = &raw.apis[ai];
        rt.cors = cors_by_api[ai].1.clone();
        rt.stage = stage_buckets
            .iter()
            .find(|((a, s), _)| a.as_str() == &*r.api && s.as_str() == &*r.stage)
            .map(|(_, b)| b.clone());
        if let Some((ri, rr)) = route_index[ai]
            .get(&*r.key)
            .map(|&ri| (ri, &api.routes[ri]))
        {
            if let Some(th) = &rr.throttle {
                let key = format!("apis[{ai}].routes[{ri}].throttle");
                rt.route = Some(Arc::new(Bucket::new(rate(src, th, &key)?)));
            }
        }
        rt.plans = t.plans.covering(&r.api, &r.stage);
        rt.any =
            rt.stage.is_some() || rt.route.is_some() || rt.cors.is_some() || !rt.plans.is_empty();
        t.routes.push(rt);
    }
    Ok(t)
}

fn build_waf(src: &Source, w: &toml::Spanned<raw::RawWaf>) -> Result<Waf, ConfigError> {
    let span = w.span();
    let w = w.get_ref();
    let cidrs = |list: &[String], key: &str| -> Result<Vec<Cidr>, ConfigError> {
        list.iter()
            .map(|s| {
                Cidr::parse(s).ok_or_else(|| {
                    src.err(
                        0..0,
                        key,
                        format!("`{s}` is not an IPv4/IPv6 address or CIDR"),
                    )
                })
            })
            .collect()
    };
    let allow = cidrs(&w.ip_allow, "waf.ip_allow")?;
    let deny = cidrs(&w.ip_deny, "waf.ip_deny")?;
    if w.ip_table_size == 0 || w.ip_table_size > 1 << 24 {
        return Err(src.err(span, "waf.ip_table_size", "must be between 1 and 16777216"));
    }
    if w.body_max_bytes > 1 << 20 {
        return Err(src.err(span, "waf.body_max_bytes", "at most 1048576"));
    }
    let per_ip = match &w.rate_per_ip {
        None => None,
        Some(r) => Some(KeyedBuckets::new(
            rate(src, r, "waf.rate_per_ip")?,
            w.ip_table_size,
        )),
    };
    // Each rule is checked where it is written: the main file's `waf.rules[i]`, or a rule
    // file's own `rules[i]` (errors then name that file and its line).
    let mut specs: Vec<RuleSpec> = Vec::new();
    let mut add = |src: &Source, key: String, r: RawRule| -> Result<(), ConfigError> {
        let target = Target::parse(&r.target).ok_or_else(|| {
            src.err(
                0..0,
                &format!("{key}.target"),
                format!(
                    "`{}` is not one of path, query, header.NAME, body",
                    r.target
                ),
            )
        })?;
        let action = match r.action.as_str() {
            "block" => Action::Block,
            "count" => Action::Count,
            a => {
                return Err(src.err(
                    0..0,
                    &format!("{key}.action"),
                    format!("`{a}` is not one of block, count"),
                ))
            }
        };
        if r.name.is_empty() || specs.iter().any(|s: &RuleSpec| s.name == r.name) {
            return Err(src.err(
                0..0,
                &format!("{key}.name"),
                format!("rule name `{}` is empty or used twice", r.name),
            ));
        }
        if let Err(e) = regex::bytes::Regex::new(&r.pattern) {
            return Err(src.err(
                0..0,
                &format!("{key}.pattern"),
                format!("not a valid pattern: {e}"),
            ));
        }
        if target == Target::Body && w.body_max_bytes == 0 {
            return Err(src.err(
                0..0,
                &format!("{key}.target"),
                "a `body` rule needs `waf.body_max_bytes` above 0 (it would read nothing)",
            ));
        }
        specs.push(RuleSpec {
            name: r.name,
            target,
            pattern: r.pattern,
            action,
        });
        Ok(())
    };
    for (i, r) in w.rules.iter().enumerate() {
        add(src, format!("waf.rules[{i}]"), r.clone())?;
    }
    let base = src.path.parent().unwrap_or(std::path::Path::new("."));
    for (fi, f) in w.rule_files.iter().enumerate() {
        let p = base.join(f);
        let text = std::fs::read_to_string(&p).map_err(|e| {
            src.err(
                0..0,
                &format!("waf.rule_files[{fi}]"),
                format!("cannot read `{}`: {e}", p.display()),
            )
        })?;
        let fsrc = Source::new(&p, &text);
        let file: RawRuleFile = fsrc.deserialize()?;
        for (i, r) in file.rules.into_iter().enumerate() {
            add(&fsrc, format!("rules[{i}]"), r)?;
        }
    }
    Waf::build(allow, deny, per_ip, specs, w.body_max_bytes)
        .map_err(|e| src.err(span, "waf.rules", e))
}

fn build_plans(src: &Source, raw: &crate::config::raw::RawConfig) -> Result<Plans, ConfigError> {
    let mut plans = Vec::new();
    for (i, p) in raw.usage_plans.iter().enumerate() {
        let key = |k: &str| format!("usage_plans[{i}].{k}");
        let name = p.name.get_ref().clone();
        if !crate::policy::auth::api_key::valid_name(&name) {
            // Its usage is read at `/usage-plans/{plan}/usage`: the name must be a path segment.
            return Err(src.err(
                p.name.span(),
                &key("name"),
                format!("plan name `{name}`: 1-128 letters, digits, `-`, `_`, `.` or `@`, not dots only"),
            ));
        }
        if plans.iter().any(|o: &Plan| *o.name == *name) {
            return Err(src.err(
                p.name.span(),
                &key("name"),
                format!("plan name `{name}` is used twice"),
            ));
        }
        let mut stages = Vec::new();
        for a in &p.apis {
            let Some((api, stage)) = a.split_once('/') else {
                return Err(src.err(0..0, &key("apis"), format!("`{a}` is not `api/stage`")));
            };
            let Some(rapi) = raw.apis.iter().find(|x| x.name.get_ref() == api) else {
                return Err(src.err(0..0, &key("apis"), format!("API `{api}` is not defined")));
            };
            let has_stage = if rapi.stages.is_empty() {
                stage == "$default"
            } else {
                rapi.stages.contains_key(stage)
            };
            if !has_stage {
                return Err(src.err(
                    0..0,
                    &key("apis"),
                    format!("API `{api}` has no stage `{stage}`"),
                ));
            }
            stages.push((api.to_string(), stage.to_string()));
        }
        let throttle = match &p.throttle {
            None => None,
            Some(t) => Some(rate(src, t, &key("throttle"))?),
        };
        let quota = match &p.quota {
            None => None,
            Some(q) => {
                let r = q.get_ref();
                let period = Period::parse(&r.period).ok_or_else(|| {
                    src.err(
                        q.span(),
                        &key("quota.period"),
                        format!("`{}` is not one of day, week, month", r.period),
                    )
                })?;
                if r.limit == 0 || r.limit >= 1 << 40 {
                    return Err(src.err(
                        q.span(),
                        &key("quota.limit"),
                        "must be between 1 and 2^40",
                    ));
                }
                Some(Quota {
                    limit: r.limit,
                    period,
                })
            }
        };
        plans.push(Plan::new(&name, stages, throttle, quota));
    }
    // `[[api_keys]]` belong to the auth feature; here only their plan names are checked, and
    // that no two of a key's plans cover one API stage (as Amazon API Gateway refuses).
    let plans = Plans::new(plans);
    for (i, k) in raw.api_keys.iter().enumerate() {
        if let Some(e) = plans.new_key_plans_error(&k.plans) {
            return Err(src.err(
                0..0,
                &format!("api_keys[{i}].plans"),
                format!("API key `{}`: {e}", k.name.get_ref()),
            ));
        }
    }
    // Counts go to the persistent store once the config goes live (`Plans::bind`).
    Ok(plans)
}

/// Admin `GET /usage-plans/{plan}/usage?key=NAME`; `None` when the path is not ours.
pub fn admin_usage(
    traffic: &Traffic,
    keys: &crate::policy::auth::KeySet,
    method: &str,
    path: &str,
    query: Option<&[u8]>,
) -> Option<(u16, serde_json::Value)> {
    let plan = path.strip_prefix("/usage-plans/")?.strip_suffix("/usage")?;
    if plan.is_empty() || plan.contains('/') {
        return None;
    }
    if method != "GET" {
        return Some((405, serde_json::json!({"message": "Method Not Allowed"})));
    }
    let bad = |m: &str| {
        Some((
            400,
            serde_json::json!({ "message": format!("Bad Request: {m}") }),
        ))
    };
    // Names decoded as everywhere else (`k%65y` is `key`); a bare `key` counts as given.
    let mut values = crate::http::query_values(query.unwrap_or(b""), b"key");
    let key = match (values.next(), values.next()) {
        (_, Some(_)) => return bad("the query parameter `key` is given more than once"),
        (Some(v), None) if !crate::http::percent_well_formed(v) => {
            return bad("malformed percent-encoding in the query parameter `key`")
        }
        (Some(v), None) if !v.is_empty() => {
            let mut buf = Vec::new();
            crate::http::percent_decode(v, true, &mut buf);
            match String::from_utf8(buf) {
                Ok(k) => Some(k),
                Err(_) => return bad("the query parameter `key` is not UTF-8"),
            }
        }
        _ => None,
    };
    if !crate::http::percent_well_formed(plan.as_bytes()) {
        return bad("malformed percent-encoding in the usage plan name");
    }
    let mut pbuf = Vec::new();
    crate::http::percent_decode(plan.as_bytes(), false, &mut pbuf);
    let Ok(plan) = String::from_utf8(pbuf) else {
        return bad("the usage plan name is not UTF-8");
    };
    let Some(key) = key else {
        return bad("the query parameter `key` is required");
    };
    let found = match keys.by_name(&key) {
        Some(k) if k.plans.iter().any(|p| **p == *plan) => {
            traffic
                .plans
                .usage(&plan, &key, &k.usage_id, plans::unix_now())
        }
        _ => None,
    };
    Some(match found {
        Some(v) => (200, v),
        None => (
            404,
            serde_json::json!({"message": "Not Found: no such plan, key, or the key is not in the plan"}),
        ),
    })
}
