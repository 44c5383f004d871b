//! Raw configuration: serde structs mirroring the TOML file one to one.
//!
//! Every table refuses unknown keys, and every default is written next to its field, so what
//! the file says and what the gateway runs are never far apart. [`super::validate`] turns these
//! into the runtime types.

use serde::Deserialize;
use std::collections::BTreeMap;
use toml::Spanned;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    pub admin: Option<RawAdmin>,
    pub access_log: Option<RawAccessLog>,
    /// `[cluster]`: share state with other nodes through Redis.
    pub cluster: Option<crate::cluster::RawCluster>,
    #[serde(default)]
    pub upstreams: Vec<RawUpstream>,
    #[serde(default)]
    pub apis: Vec<RawApi>,
    /// Traffic control (issue 4): `[waf]`, `[[usage_plans]]`, `[[api_keys]]` (minimal).
    pub waf: Option<Spanned<crate::policy::raw::RawWaf>>,
    #[serde(default)]
    pub usage_plans: Vec<crate::policy::raw::RawUsagePlan>,
    #[serde(default)]
    pub authorizers: Vec<crate::policy::auth::RawAuthorizer>,
    #[serde(default)]
    pub sigv4_credentials: Vec<crate::policy::auth::RawSigV4Credential>,
    #[serde(default)]
    pub api_keys: Vec<crate::policy::auth::RawApiKey>,
}

/// `[server]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    #[serde(default = "default_listen")]
    pub listen: Vec<Spanned<String>>,
    /// 0 = one worker per CPU core.
    #[serde(default)]
    pub workers: usize,
    #[serde(default = "default_io")]
    pub io: Spanned<String>,
    /// Pin each worker thread to one core.
    #[serde(default = "default_true")]
    pub pin_workers: bool,
    #[serde(default = "default_shutdown_timeout_ms")]
    pub shutdown_timeout_ms: u64,
    #[serde(default = "default_state_dir")]
    pub state_dir: String,
    #[serde(default)]
    pub limits: RawLimits,
    /// Gateway-wide token bucket.
    pub throttle: Option<Spanned<crate::policy::raw::RawThrottle>>,
    /// `[server.tls]`: HTTPS listeners.
    pub tls: Option<Spanned<crate::tls::RawTls>>,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: default_listen(),
            workers: 0,
            io: default_io(),
            pin_workers: true,
            shutdown_timeout_ms: default_shutdown_timeout_ms(),
            state_dir: default_state_dir(),
            limits: RawLimits::default(),
            throttle: None,
            tls: None,
        }
    }
}

fn default_listen() -> Vec<Spanned<String>> {
    vec![Spanned::new(0..0, "127.0.0.1:8080".to_string())]
}
fn default_io() -> Spanned<String> {
    Spanned::new(0..0, "auto".to_string())
}
fn default_shutdown_timeout_ms() -> u64 {
    10_000
}
fn default_state_dir() -> String {
    "state".to_string()
}

/// `[server.limits]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_body_bytes: u64,
    pub header_timeout_ms: u64,
    pub idle_timeout_ms: u64,
    pub max_connections: usize,
    pub max_held_body_bytes: u64,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_header_bytes: 16_384,
            max_headers: 100,
            max_body_bytes: 10_485_760,
            header_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            max_connections: 100_000,
            max_held_body_bytes: 268_435_456,
        }
    }
}

/// `[admin]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Spanned<String>,
    pub token: Option<Spanned<String>>,
}

/// `[access_log]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccessLog {
    /// "-" = stdout, otherwise a file path.
    pub path: String,
}

/// `[[upstreams]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub name: Spanned<String>,
    pub targets: Vec<Spanned<String>>,
    #[serde(default = "default_balance")]
    pub balance: Spanned<String>,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_retries")]
    pub retries: u32,
    #[serde(default = "default_keepalive")]
    pub keepalive: usize,
    pub max_connections: Option<u32>,
    pub health: Option<RawHealth>,
    pub passive: Option<RawPassive>,
}

fn default_balance() -> Spanned<String> {
    Spanned::new(0..0, "round_robin".to_string())
}
fn default_connect_timeout_ms() -> u64 {
    1_000
}
fn default_timeout_ms() -> u64 {
    29_000
}
fn default_retries() -> u32 {
    1
}
fn default_keepalive() -> usize {
    256
}

/// `health = { ... }` on an upstream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub path: String,
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "default_unhealthy_after")]
    pub unhealthy_after: u32,
    #[serde(default = "default_healthy_after")]
    pub healthy_after: u32,
    /// Per-probe timeout; defaults to the smaller of interval_ms and 1000.
    pub timeout_ms: Option<u64>,
}

/// `passive = { ... }` on an upstream (nginx's `max_fails` and `fail_timeout`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPassive {
    #[serde(default = "default_max_fails")]
    pub max_fails: u32,
    #[serde(default = "default_fail_timeout_ms")]
    pub fail_timeout_ms: u64,
}

fn default_max_fails() -> u32 {
    1
}
fn default_fail_timeout_ms() -> u64 {
    10_000
}

fn default_interval_ms() -> u64 {
    2_000
}
fn default_unhealthy_after() -> u32 {
    3
}
fn default_healthy_after() -> u32 {
    2
}

/// `[[apis]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApi {
    pub name: Spanned<String>,
    #[serde(default = "default_protocol")]
    pub protocol: Spanned<String>,
    #[serde(default)]
    pub hosts: Option<Spanned<Vec<String>>>,
    #[serde(default = "default_empty")]
    pub base_path: Spanned<String>,
    #[serde(default)]
    pub stages: BTreeMap<String, RawStage>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    /// CORS answered by the gateway.
    pub cors: Option<Spanned<crate::policy::raw::RawCors>>,
    /// WebSocket APIs: where the route key of each message comes from.
    pub route_selection: Option<Spanned<String>>,
    /// WebSocket settings (limits, timeouts, origins) for a WebSocket API or for pass-through.
    pub websocket: Option<Spanned<RawWebSocket>>,
}

/// `websocket = { ... }` on an API. Absent keys take the defaults of the API's protocol.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebSocket {
    /// Browser origins allowed to connect; empty = any.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    pub max_message_bytes: Option<usize>,
    pub max_frame_bytes: Option<usize>,
    pub idle_timeout_ms: Option<u64>,
    pub max_duration_ms: Option<u64>,
}

fn default_empty() -> Spanned<String> {
    Spanned::new(0..0, String::new())
}

fn default_protocol() -> Spanned<String> {
    Spanned::new(0..0, "http".to_string())
}

/// `[apis.stages.NAME]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStage {
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
    /// Whether requests of this stage go to the access log (when one is configured).
    #[serde(default = "default_true")]
    pub access_log: bool,
    /// `cache = { enabled, ttl_s, max_bytes }`.
    pub cache: Option<Spanned<RawStageCache>>,
    /// Token bucket shared by every route of the stage.
    pub throttle: Option<Spanned<crate::policy::raw::RawThrottle>>,
}

/// `cache = { ... }` on a stage.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStageCache {
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default = "default_cache_ttl_s")]
    pub ttl_s: u64,
    #[serde(default = "default_cache_max_bytes")]
    pub max_bytes: u64,
}

fn default_cache_ttl_s() -> u64 {
    300
}
fn default_cache_max_bytes() -> u64 {
    64 << 20
}

/// `cache = { ... }` on a route.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouteCache {
    /// Overrides the stage's `ttl_s`; 0 turns caching off for the route.
    pub ttl_s: Option<u64>,
    /// `path.NAME`, `query.NAME`, `header.NAME`.
    #[serde(default)]
    pub key: Vec<String>,
    /// A client's `Cache-Control: max-age=0` refreshes the entry.
    #[serde(default)]
    pub allow_client_invalidate: bool,
}

fn default_true() -> bool {
    true
}

/// `[[apis.routes]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub route: Spanned<String>,
    pub integration: Spanned<RawIntegration>,
    pub cache: Option<Spanned<RawRouteCache>>,
    /// Token bucket of this route (per stage).
    pub throttle: Option<Spanned<crate::policy::raw::RawThrottle>>,
    /// none | api_key | jwt:NAME | authorizer:NAME | sigv4
    pub auth: Option<Spanned<String>>,
    /// With `jwt`: scopes that must all be granted.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Also require a valid `x-api-key`.
    #[serde(default)]
    pub api_key_required: bool,
    /// `{ schema = "FILE" }`: the request body must be JSON valid against this JSON Schema.
    pub validate: Option<Spanned<crate::policy::validate::RawValidate>>,
    /// `header.NAME` / `query.NAME` of the upstream request = `remove`, a literal or variables.
    pub request_mapping: Option<Spanned<BTreeMap<String, Spanned<String>>>>,
    /// `header.NAME` of the response = `remove`, a literal or variables.
    pub response_mapping: Option<Spanned<BTreeMap<String, Spanned<String>>>>,
}

/// `integration = { type = ..., ... }`.
#[derive(Debug, Deserialize)]
#[serde(try_from = "FlatIntegration")]
pub enum RawIntegration {
    /// Proxy to an upstream.
    Http {
        upstream: String,
        /// Path sent upstream; `{param}` and `${stageVariables.NAME}` are substituted. Absent:
        /// the request path without base path and stage prefix.
        path: Option<String>,
    },
    /// Answer from the config.
    Mock {
        /// 200 when absent.
        status: u16,
        headers: BTreeMap<String, String>,
        body: String,
    },
}

/// The keys of every integration type side by side. Deserializing through this plain struct
/// (rather than serde's internally tagged enum, which buffers the table) keeps the key path of an
/// error: a bad `status` is reported at `...integration.status`. [`RawIntegration::try_from`]
/// then refuses the keys that do not apply to the `type`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlatIntegration {
    #[serde(rename = "type")]
    kind: IntegrationType,
    upstream: Option<String>,
    path: Option<String>,
    status: Option<u16>,
    headers: Option<BTreeMap<String, String>>,
    body: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum IntegrationType {
    Http,
    Mock,
}

impl TryFrom<FlatIntegration> for RawIntegration {
    /// Worded like serde's own errors (`missing field`, `unknown field`), which
    /// the config loader turns into the full key path.
    type Error = String;

    fn try_from(f: FlatIntegration) -> Result<Self, String> {
        let refuse = |kind: &str, present: &[(&str, bool)], expected: &str| match present
            .iter()
            .find(|(_, set)| *set)
        {
            Some((key, _)) => Err(format!(
                "unknown field `{key}` for type `{kind}`, expected {expected}"
            )),
            None => Ok(()),
        };
        match f.kind {
            IntegrationType::Http => {
                refuse(
                    "http",
                    &[
                        ("status", f.status.is_some()),
                        ("headers", f.headers.is_some()),
                        ("body", f.body.is_some()),
                    ],
                    "`upstream` or `path`",
                )?;
                let upstream = f.upstream.ok_or("missing field `upstream`")?;
                Ok(RawIntegration::Http {
                    upstream,
                    path: f.path,
                })
            }
            IntegrationType::Mock => {
                refuse(
                    "mock",
                    &[
                        ("upstream", f.upstream.is_some()),
                        ("path", f.path.is_some()),
                    ],
                    "one of `status`, `headers`, `body`",
                )?;
                Ok(RawIntegration::Mock {
                    status: f.status.unwrap_or(200),
                    headers: f.headers.unwrap_or_default(),
                    body: f.body.unwrap_or_default(),
                })
            }
        }
    }
}
