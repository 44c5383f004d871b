//! Raw (serde) structs of the traffic-control config keys; referenced from
//! [`crate::config::raw`]. Unknown keys are refused; defaults sit next to their fields.

use serde::Deserialize;
use toml::Spanned;

/// `throttle = { rate, burst }` (server, stage, route, usage plan, `waf.rate_per_ip`).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawThrottle {
    /// Tokens per second.
    pub rate: f64,
    /// Bucket capacity.
    pub burst: u64,
}

/// `cors = { ... }` of an API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCors {
    #[serde(default)]
    pub allow_origins: Vec<String>,
    /// Default when empty: GET, HEAD, POST.
    #[serde(default)]
    pub allow_methods: Vec<String>,
    #[serde(default)]
    pub allow_headers: Vec<String>,
    #[serde(default)]
    pub expose_headers: Vec<String>,
    pub max_age_s: Option<u64>,
    #[serde(default)]
    pub allow_credentials: bool,
}

/// `[[usage_plans]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUsagePlan {
    pub name: Spanned<String>,
    /// `"api/stage"` entries.
    #[serde(default)]
    pub apis: Vec<String>,
    pub throttle: Option<Spanned<RawThrottle>>,
    pub quota: Option<Spanned<RawQuota>>,
}

/// `quota = { limit, period }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuota {
    pub limit: u64,
    /// day | week | month (UTC).
    pub period: String,
}

/// `[[api_keys]]` — MINIMAL version for usage plans (traffic branch). The auth branch owns API
/// keys; at merge keep its struct (it must provide name, value, plans, enabled).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApiKey {
    pub name: Spanned<String>,
    pub value: String,
    #[serde(default)]
    pub plans: Vec<String>,
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn yes() -> bool {
    true
}

/// `[waf]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWaf {
    #[serde(default)]
    pub ip_allow: Vec<String>,
    #[serde(default)]
    pub ip_deny: Vec<String>,
    pub rate_per_ip: Option<Spanned<RawThrottle>>,
    #[serde(default)]
    pub rules: Vec<RawRule>,
    /// More rules from TOML files with `[[rules]]` entries (relative to the config file).
    #[serde(default)]
    pub rule_files: Vec<String>,
    /// Most body bytes `body` rules look at.
    #[serde(default = "default_body_max")]
    pub body_max_bytes: usize,
    /// Client IPs tracked at once by `rate_per_ip` (a fixed table; the bound on its memory).
    #[serde(default = "default_ip_table")]
    pub ip_table_size: usize,
}

fn default_body_max() -> usize {
    8192
}
fn default_ip_table() -> usize {
    65_536
}

/// One WAF rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    pub name: String,
    /// path | query | header.NAME | body
    pub target: String,
    /// A regular expression (Rust `regex` syntax).
    pub pattern: String,
    /// block | count
    #[serde(default = "default_action")]
    pub action: String,
}

fn default_action() -> String {
    "block".to_string()
}

/// A file named in `waf.rule_files`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRuleFile {
    #[serde(default)]
    pub rules: Vec<RawRule>,
}
