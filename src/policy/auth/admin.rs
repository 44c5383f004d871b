//! Admin endpoints for API keys: `GET /api-keys`, `POST /api-keys`, `DELETE /api-keys/{name}`.
//! Key values are returned once, by the POST that created them; listings never show them.

use super::api_key::{AuthState, KeyError};
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    name: String,
    #[serde(default)]
    plans: Vec<String>,
    value: Option<String>,
    #[serde(default = "yes")]
    enabled: bool,
}

fn yes() -> bool {
    true
}

fn msg(status: u16, m: &str) -> (u16, String) {
    (status, json!({ "message": m }).to_string())
}

/// Handles an admin request under `/api-keys`; `None` when `path` is not one of ours.
/// `check_plans` checks a new key's plans against the usage plans of the live config (each
/// must exist, and no two may cover one API stage); its error is the 400's message.
/// Returns the status and a JSON body.
pub fn handle(
    state: &AuthState,
    check_plans: impl Fn(&[String]) -> Result<(), String>,
    method: &str,
    path: &str,
    body: &[u8],
) -> Option<(u16, String)> {
    let path = path.split('?').next().unwrap_or(path);
    if path == "/api-keys" {
        return Some(match method {
            "GET" => {
                let keys = state.keys();
                let items: Vec<_> = keys
                    .keys()
                    .iter()
                    .map(|k| {
                        json!({
                            "name": &*k.name,
                            "plans": k.plans.iter().map(|p| &**p).collect::<Vec<_>>(),
                            "enabled": k.enabled,
                            "source": k.source,
                        })
                    })
                    .collect();
                (200, json!({ "items": items }).to_string())
            }
            "POST" => {
                if !crate::admin::is_json_object(body) {
                    return Some(msg(400, "Bad Request: the body must be a JSON object"));
                }
                let n: NewKey = match serde_json::from_slice(body) {
                    Ok(n) => n,
                    Err(e) => return Some(msg(400, &format!("Bad Request: {e}"))),
                };
                if let Err(m) = check_plans(&n.plans) {
                    return Some(msg(400, &format!("Bad Request: {m}")));
                }
                match state.add(&n.name, n.plans.clone(), n.value, n.enabled) {
                    Ok(value) => (
                        201,
                        json!({ "name": n.name, "plans": n.plans, "enabled": n.enabled, "value": value })
                            .to_string(),
                    ),
                    Err(e) => error(e),
                }
            }
            _ => msg(405, "Method Not Allowed"),
        });
    }
    let raw = path.strip_prefix("/api-keys/")?;
    // Percent-decoded, as the usage endpoint's `?key=` (`u%40x.com` is `u@x.com`).
    let mut buf = Vec::new();
    crate::http::percent_decode(raw.as_bytes(), false, &mut buf);
    let Ok(name) = std::str::from_utf8(&buf) else {
        return Some(msg(400, "Bad Request: the key name is not UTF-8"));
    };
    Some(match method {
        "DELETE" => match state.delete(name) {
            Ok(()) => msg(200, "deleted"),
            Err(e) => error(e),
        },
        "GET" => match state.keys().by_name(name) {
            Some(k) => (
                200,
                json!({
                    "name": &*k.name,
                    "plans": k.plans.iter().map(|p| &**p).collect::<Vec<_>>(),
                    "enabled": k.enabled,
                    "source": k.source,
                })
                .to_string(),
            ),
            None => msg(404, "Not Found"),
        },
        _ => msg(405, "Method Not Allowed"),
    })
}

fn error(e: KeyError) -> (u16, String) {
    match e {
        KeyError::Invalid(m) => msg(400, &format!("Bad Request: {m}")),
        KeyError::NotFound => msg(404, "Not Found"),
        KeyError::Conflict(m) => msg(409, &m),
        KeyError::Io(m) => {
            crate::elog!("ringgate: api keys: {m}");
            msg(500, "cannot persist the change; nothing was changed")
        }
    }
}
