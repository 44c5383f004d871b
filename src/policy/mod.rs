//! Policy stages of the request pipeline (see the architecture notes: WAF -> CORS -> auth ->
//! throttle/quota -> validate -> cache -> integration). Each stage is a plain function over the
//! parsed request that answers "continue" or "respond now with this status".
//!
//! Traffic control: the WAF ([`waf`]), CORS ([`cors`]), token-bucket throttles ([`throttle`])
//! and usage plans with quotas ([`plans`]), compiled from the config by [`traffic`] and called
//! from `server/traffic.rs`. Identity and access ([`auth`]): API keys, JWT, request
//! authorizers, SigV4, called from `server/auth_stage.rs`. Request validation against a JSON
//! Schema ([`validate`], called from `server/validate_stage.rs`) and parameter mapping of
//! requests and responses ([`mapping`], applied where heads are written).

pub mod auth;
pub mod cors;
pub mod mapping;
pub mod plans;
pub mod raw;
pub mod throttle;
pub mod traffic;
pub mod validate;
pub mod waf;

pub(crate) use traffic::build;
pub use traffic::{admin_usage, Reason, RouteTraffic, Traffic};
