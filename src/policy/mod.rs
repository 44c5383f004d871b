//! Policy stages of the request pipeline. Traffic control (issue 4): the WAF ([`waf`]), CORS
//! ([`cors`]), token-bucket throttles ([`throttle`]) and usage plans with quotas ([`plans`]),
//! compiled from the config by [`traffic`]. The connection loop calls into them from
//! `server/traffic.rs`.

pub mod cors;
pub mod plans;
pub mod raw;
pub mod throttle;
pub mod traffic;
pub mod waf;

pub(crate) use traffic::build;
pub use traffic::{admin_usage, Reason, RouteTraffic, Traffic};
