//! Identity and access: API keys (`x-api-key`), JWT and request authorizers, SigV4 signing.
//!
//! - [`RawAuthorizer`], [`RawSigV4Credential`], [`RawApiKey`]: the TOML tables, validated by
//!   [`validate`] into an [`AuthConfig`] that lives in the compiled config;
//! - [`RouteAuth`]: what one route requires, resolved when routes compile;
//! - [`AuthState`]: state shared by every thread and kept across reloads (the live API key set);
//! - [`WorkerAuth`]: per-worker caches (verified JWTs, SigV4 signing keys), never shared;
//! - [`authorizer`]: request authorizers (an HTTP call decides, cached for `ttl_s`);
//! - [`check`]: the stage itself, called once per request of a route that asks for auth.
//!
//! Failures answer 401 `{"message":"Unauthorized"}` (no or unverifiable credentials) or 403
//! `{"message":"Forbidden"}` (API key missing/unknown/disabled or in no usage plan of the route's
//! stage, missing scope, bad signature).

pub mod admin;
pub mod api_key;
pub mod authorizer;
pub mod jwks;
pub mod jwt;
pub mod sigv4;

use crate::config::{ConfigError, Source};
use crate::http::RequestHead;
use serde::Deserialize;
use std::sync::Arc;
use toml::Spanned;

pub use api_key::{clash, ApiKey, AuthState, KeyChange, KeySet, Reservation};
pub use jwt::JwtAuthorizer;
pub use sigv4::SigV4Credential;

/// `[[authorizers]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuthorizer {
    pub name: Spanned<String>,
    #[serde(rename = "type")]
    pub kind: Spanned<String>,
    // jwt
    pub issuer: Option<String>,
    pub audience: Option<Spanned<Vec<String>>>,
    pub jwks_uri: Option<Spanned<String>>,
    pub jwks_file: Option<Spanned<String>>,
    /// PEM certificates trusted (alone) for an `https://` `jwks_uri`.
    pub jwks_ca_file: Option<Spanned<String>>,
    pub secret: Option<Spanned<String>>,
    #[serde(default = "default_leeway")]
    pub leeway_s: u64,
    // request
    pub upstream: Option<String>,
    pub path: Option<String>,
    #[serde(default)]
    pub identity_sources: Vec<String>,
    pub ttl_s: Option<u64>,
}

fn default_leeway() -> u64 {
    30
}

/// `[[sigv4_credentials]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSigV4Credential {
    pub access_key: Spanned<String>,
    pub secret_key: String,
    pub region: String,
    pub service: String,
    pub principal: String,
}

/// `[[api_keys]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApiKey {
    pub name: Spanned<String>,
    pub value: Spanned<String>,
    #[serde(default)]
    pub plans: Vec<String>,
    #[serde(default = "default_true")]
    pub enabled: bool,
}

fn default_true() -> bool {
    true
}

/// One authorizer of `[[authorizers]]`, validated.
#[derive(Debug)]
pub enum Authorizer {
    Jwt(Arc<JwtAuthorizer>),
    Request(Arc<authorizer::RequestAuthorizer>),
}

impl Authorizer {
    /// The authorizer's name.
    pub fn name(&self) -> &str {
        match self {
            Authorizer::Jwt(j) => &j.name,
            Authorizer::Request(r) => &r.name,
        }
    }
}

/// The identity-and-access part of the config, validated.
#[derive(Debug, Default)]
pub struct AuthConfig {
    pub authorizers: Vec<Authorizer>,
    pub sigv4: Vec<SigV4Credential>,
    /// Keys from `[[api_keys]]` (values already hashed).
    pub api_keys: Vec<ApiKey>,
}

impl AuthConfig {
    /// Starts what needs the network (JWKS fetches and their background refresh).
    pub fn start(&self) {
        for a in &self.authorizers {
            if let Authorizer::Jwt(j) = a {
                j.keys.start();
            }
        }
    }

    /// Stops the background JWKS refreshers and waits for them (the gateway stops).
    pub fn stop(&self) {
        for a in &self.authorizers {
            if let Authorizer::Jwt(j) = a {
                j.keys.stop();
            }
        }
    }
}

/// What a route asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthKind {
    None,
    ApiKey,
    /// `jwt:NAME`: index into [`AuthConfig::authorizers`].
    Jwt(u32),
    /// `authorizer:NAME`: index into [`AuthConfig::authorizers`].
    Authorizer(u32),
    SigV4,
}

/// A route's access requirements.
#[derive(Debug, Clone)]
pub struct RouteAuth {
    pub kind: AuthKind,
    /// With `jwt`: every one must be granted.
    pub scopes: Box<[Box<str>]>,
    /// Also require a valid `x-api-key`.
    pub api_key_required: bool,
    /// A mapping of the route reads the JWT's claims or the request authorizer's context:
    /// the check hands them on in [`Identity::context`].
    pub keep_context: bool,
}

impl RouteAuth {
    /// The request fields that carry this route's credentials beyond `Authorization`,
    /// `x-api-key` and `Cookie`: a request authorizer's identity sources, and a presigned
    /// SigV4 URL's signature. (The response cache keeps requests with them apart.)
    pub fn credential_fields(&self, cfg: &AuthConfig) -> Vec<authorizer::IdentitySource> {
        match self.kind {
            AuthKind::Authorizer(i) => match cfg.authorizers.get(i as usize) {
                Some(Authorizer::Request(a)) => a.sources.clone(),
                _ => Vec::new(),
            },
            AuthKind::SigV4 => vec![authorizer::IdentitySource::Query("X-Amz-Signature".into())],
            _ => Vec::new(),
        }
    }
}

impl Default for RouteAuth {
    fn default() -> Self {
        RouteAuth {
            kind: AuthKind::None,
            scopes: Box::new([]),
            api_key_required: false,
            keep_context: false,
        }
    }
}

impl RouteAuth {
    /// Whether the route needs the auth stage at all.
    #[inline]
    pub fn active(&self) -> bool {
        self.kind != AuthKind::None || self.api_key_required
    }

    /// Whether the request body must be buffered before [`check`] (SigV4 hashes it).
    pub fn needs_body(&self) -> bool {
        self.kind == AuthKind::SigV4
    }
}

/// Validates the auth tables of the file.
pub(crate) fn validate(
    src: &Source,
    authorizers: &[RawAuthorizer],
    sigv4: &[RawSigV4Credential],
    keys: &[RawApiKey],
    upstreams: &[crate::config::UpstreamConfig],
) -> Result<AuthConfig, ConfigError> {
    let mut out = AuthConfig::default();
    let base = src.path.parent().unwrap_or(std::path::Path::new("."));
    for (i, a) in authorizers.iter().enumerate() {
        let key = |k: &str| format!("authorizers[{i}].{k}");
        let name = a.name.get_ref();
        if name.is_empty() || out.authorizers.iter().any(|o| o.name() == name) {
            return Err(src.err(
                a.name.span(),
                &key("name"),
                format!("authorizer name `{name}` is empty or used twice"),
            ));
        }
        match a.kind.get_ref().as_str() {
            "jwt" => {
                let j = jwt::validate(src, i, a, base)?;
                out.authorizers.push(Authorizer::Jwt(Arc::new(j)));
            }
            "request" => {
                let r = authorizer::validate(src, i, a, upstreams)?;
                out.authorizers.push(Authorizer::Request(Arc::new(r)));
            }
            other => {
                return Err(src.err(
                    a.kind.span(),
                    &key("type"),
                    format!("`{other}` is not one of jwt, request"),
                ))
            }
        }
    }
    for (i, c) in sigv4.iter().enumerate() {
        let cred = sigv4::validate(src, i, c)?;
        if out.sigv4.iter().any(|o| o.access_key == cred.access_key) {
            return Err(src.err(
                c.access_key.span(),
                &format!("sigv4_credentials[{i}].access_key"),
                "access key used twice",
            ));
        }
        out.sigv4.push(cred);
    }
    for (i, k) in keys.iter().enumerate() {
        let key = api_key::validate_config_key(src, i, k)?;
        if out.api_keys.iter().any(|o| o.name == key.name) {
            return Err(src.err(
                k.name.span(),
                &format!("api_keys[{i}].name"),
                format!("API key name `{}` used twice", key.name),
            ));
        }
        if out.api_keys.iter().any(|o| o.hash == key.hash) {
            return Err(src.err(
                k.value.span(),
                &format!("api_keys[{i}].value"),
                "the same key value is used by two keys",
            ));
        }
        out.api_keys.push(key);
    }
    Ok(out)
}

/// Resolves a route's `auth`, `scopes` and `api_key_required` (`key` names the route).
pub(crate) fn resolve_route(
    src: &Source,
    key: &str,
    auth: Option<&Spanned<String>>,
    scopes: &[String],
    api_key_required: bool,
    cfg: &AuthConfig,
) -> Result<RouteAuth, ConfigError> {
    let span = auth.map(|a| a.span()).unwrap_or(0..0);
    let kind = match auth.map(|a| a.get_ref().as_str()).unwrap_or("none") {
        "none" => AuthKind::None,
        "api_key" => AuthKind::ApiKey,
        "sigv4" => {
            if cfg.sigv4.is_empty() {
                return Err(src.err(
                    span,
                    &format!("{key}.auth"),
                    "`sigv4` needs at least one [[sigv4_credentials]]",
                ));
            }
            AuthKind::SigV4
        }
        s => {
            let found = |name: &str, jwt: bool| {
                cfg.authorizers
                    .iter()
                    .position(|a| a.name() == name && matches!(a, Authorizer::Jwt(_)) == jwt)
            };
            if let Some(name) = s.strip_prefix("jwt:") {
                match found(name, true) {
                    Some(i) => AuthKind::Jwt(i as u32),
                    None => {
                        return Err(src.err(
                            span,
                            &format!("{key}.auth"),
                            format!("no jwt authorizer named `{name}` in [[authorizers]]"),
                        ))
                    }
                }
            } else if let Some(name) = s.strip_prefix("authorizer:") {
                match found(name, false) {
                    Some(i) => AuthKind::Authorizer(i as u32),
                    None => {
                        return Err(src.err(
                            span,
                            &format!("{key}.auth"),
                            format!("no request authorizer named `{name}` in [[authorizers]]"),
                        ))
                    }
                }
            } else {
                return Err(src.err(
                    span,
                    &format!("{key}.auth"),
                    format!("`{s}` is not one of none, api_key, jwt:NAME, authorizer:NAME, sigv4"),
                ));
            }
        }
    };
    if !scopes.is_empty() && !matches!(kind, AuthKind::Jwt(_)) {
        return Err(src.err(
            span,
            &format!("{key}.scopes"),
            "scopes need `auth = \"jwt:NAME\"`",
        ));
    }
    if scopes.iter().any(|s| s.is_empty() || s.contains(' ')) {
        return Err(src.err(
            span,
            &format!("{key}.scopes"),
            "a scope is a non-empty word without spaces",
        ));
    }
    Ok(RouteAuth {
        kind,
        scopes: scopes.iter().map(|s| s.as_str().into()).collect(),
        api_key_required,
        keep_context: false,
    })
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deny {
    pub status: u16,
    pub message: &'static str,
}

/// 401 Unauthorized.
pub const UNAUTHORIZED: Deny = Deny {
    status: 401,
    message: "Unauthorized",
};
/// 403 Forbidden.
pub const FORBIDDEN: Deny = Deny {
    status: 403,
    message: "Forbidden",
};

/// The parts of a request the checks read.
pub struct Request<'a> {
    pub head: &'a RequestHead,
    pub buf: &'a [u8],
    /// The whole body when [`RouteAuth::needs_body`] (else empty).
    pub body: &'a [u8],
    /// The request's `x-request-id` (passed on to request authorizers).
    pub request_id: &'a [u8],
}

impl Request<'_> {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.head.header(self.buf, name)
    }
}

/// What a passed check tells the rest of the pipeline.
#[derive(Debug, Default)]
pub struct Identity {
    /// Goes upstream as `x-principal-id`.
    pub principal: Option<Arc<str>>,
    /// The API key that passed (for usage plans).
    pub api_key: Option<Arc<str>>,
    /// The JWT's claims or the request authorizer's `context`, when the route keeps them.
    pub context: Option<Arc<serde_json::Value>>,
}

/// The usage plans of the live config and those covering the route's API stage: a key must
/// belong to one of them on a route that requires a key.
#[derive(Clone, Copy)]
pub struct RoutePlans<'a> {
    pub plans: &'a crate::policy::plans::Plans,
    /// Indices into `plans` ([`crate::policy::plans::Plans::covering`]).
    pub covering: &'a [u16],
}

/// For a route whose check reads the body ([`RouteAuth::needs_body`], SigV4): the part of
/// the check that needs only the head (`req.body` is not read), run before the body is
/// buffered, so a request that cannot pass is refused without its upload.
pub fn precheck(cfg: &AuthConfig, route: &RouteAuth, req: &Request<'_>) -> Result<(), Deny> {
    match route.kind {
        AuthKind::SigV4 => sigv4::precheck(&cfg.sigv4, req, now_unix()),
        _ => Ok(()),
    }
}

/// Runs the route's checks, filling `id` as they pass: a request refused by a later check (a
/// valid JWT without the required API key) keeps the principal found so far, for the access
/// log. `gen` is the config generation (per-worker caches are dropped when it changes); `cfg`
/// the live config's auth part.
#[allow(
    clippy::too_many_arguments,
    reason = "the request's whole auth context"
)]
pub async fn check(
    w: &WorkerAuth,
    state: &AuthState,
    cfg: &AuthConfig,
    gen: u64,
    route: &RouteAuth,
    plans: RoutePlans<'_>,
    req: &Request<'_>,
    id: &mut Identity,
) -> Result<(), Deny> {
    match route.kind {
        AuthKind::None => {}
        AuthKind::ApiKey => {}
        AuthKind::Jwt(i) => {
            if let Authorizer::Jwt(a) = &cfg.authorizers[i as usize] {
                (id.principal, id.context) = jwt::check(
                    w,
                    gen,
                    i as usize,
                    a,
                    &route.scopes,
                    req,
                    route.keep_context,
                )
                .await?;
            }
        }
        AuthKind::Authorizer(i) => {
            if let Authorizer::Request(a) = &cfg.authorizers[i as usize] {
                (id.principal, id.context) =
                    authorizer::check(w, a, req, req.request_id, route.keep_context).await?;
            }
        }
        AuthKind::SigV4 => {
            id.principal = Some(sigv4::check(w, gen, &cfg.sigv4, req)?);
        }
    }
    if route.kind == AuthKind::ApiKey || route.api_key_required {
        let v = req.header("x-api-key").ok_or(FORBIDDEN)?;
        let keys = state.keys();
        let k = keys.check(v).ok_or(FORBIDDEN)?;
        // As Amazon API Gateway: the key must be in a usage plan attached to the stage.
        if !plans.plans.covers(&k.plans, plans.covering) {
            return Err(FORBIDDEN);
        }
        id.api_key = Some(k.name.clone());
    }
    Ok(())
}

/// Per-worker auth caches. Owned by one worker thread; never locked.
#[derive(Default)]
pub struct WorkerAuth {
    pub(crate) jwt: std::cell::RefCell<jwt::TokenCache>,
    pub(crate) sigv4: std::cell::RefCell<sigv4::KeyCache>,
    pub(crate) authorizer: std::cell::RefCell<authorizer::DecisionCache>,
}

impl WorkerAuth {
    /// Empty caches.
    pub fn new() -> WorkerAuth {
        WorkerAuth::default()
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whether a value can go into an HTTP header as is.
pub(crate) fn header_safe(v: &str) -> bool {
    !v.is_empty() && v.len() <= 1024 && v.bytes().all(|b| (0x20..0x7f).contains(&b) || b >= 0x80)
}
