//! The admin listener: `/healthz`, `/metrics` (Prometheus text), `/dashboard`, `POST /reload`,
//! behind a bearer token when `admin.token` is set.
//!
//! Admin traffic is rare and never on the proxy's hot path, so this listener runs on plain
//! blocking threads (one per connection, a few at a time), parsing with the same strict codec.

mod dashboard;

use crate::config::AdminConfig;
use crate::gateway::Shared;
use crate::http::{encode, Limits, RequestHead, Status};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Admin connections served at once; more wait in the backlog.
const MAX_ADMIN_CONNS: usize = 64;
/// Largest admin request body.
const MAX_ADMIN_BODY: usize = 1 << 20;

/// Binds the admin listener and serves it on a background thread.
pub fn start(cfg: &AdminConfig, shared: Arc<Shared>) -> std::io::Result<()> {
    let l = TcpListener::bind(cfg.listen)?;
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("ringgate-admin".into())
        .spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                if active.load(Ordering::Relaxed) >= MAX_ADMIN_CONNS {
                    continue;
                }
                active.fetch_add(1, Ordering::Relaxed);
                let shared = shared.clone();
                let active = active.clone();
                let _ = std::thread::Builder::new()
                    .name("ringgate-admin-conn".into())
                    .spawn(move || {
                        let _ = serve_conn(s, &shared);
                        active.fetch_sub(1, Ordering::Relaxed);
                    });
            }
        })?;
    Ok(())
}

/// Compares two byte strings in time independent of where they differ.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | ((a.len() ^ b.len()) >> 8) as u8;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0xff);
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

struct Reply {
    status: u16,
    ctype: &'static str,
    body: Vec<u8>,
}

fn json(status: u16, msg: &str) -> Reply {
    Reply {
        status,
        ctype: "application/json",
        body: serde_json::json!({ "message": msg })
            .to_string()
            .into_bytes(),
    }
}

fn serve_conn(mut s: TcpStream, shared: &Shared) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_nodelay(true)?;
    let limits = Limits {
        max_header_bytes: 16384,
        max_headers: 100,
    };
    let mut head = RequestHead::new(100);
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        // Head.
        let head_len = loop {
            if !buf.is_empty() {
                match head.parse(&buf, &limits) {
                    Ok(Status::Complete(n)) => break n,
                    Ok(Status::Partial) => {}
                    Err(e) => {
                        let r = json(e.status(), &e.to_string());
                        return write_reply(&mut s, &r, false);
                    }
                }
            }
            let mut tmp = [0u8; 4096];
            let n = s.read(&mut tmp)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&tmp[..n]);
        };
        let body_len = match head.body {
            crate::http::BodyKind::None => 0,
            crate::http::BodyKind::Length(n) if n as usize <= MAX_ADMIN_BODY => n as usize,
            _ => {
                let r = json(413, "Request Entity Too Large");
                return write_reply(&mut s, &r, false);
            }
        };
        while buf.len() < head_len + body_len {
            let mut tmp = [0u8; 4096];
            let n = s.read(&mut tmp)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&tmp[..n]);
        }
        let method = String::from_utf8_lossy(head.slice(&buf, head.method_range)).into_owned();
        let path = String::from_utf8_lossy(head.slice(&buf, head.path)).into_owned();
        let authorized = match shared
            .current()
            .config
            .admin
            .as_ref()
            .and_then(|a| a.token.clone())
        {
            None => true,
            Some(t) => head
                .header(&buf, "authorization")
                // The scheme name is case-insensitive (RFC 9110 11.1).
                .and_then(|v| {
                    (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer "))
                        .then(|| v[7..].trim_ascii())
                })
                .map(|v| ct_eq(v, t.as_bytes()))
                .unwrap_or(false),
        };
        // The dashboard page may carry the token as `?token=` (a browser cannot set a header).
        let authorized = authorized
            || dashboard::page_authorized(shared, &path, head.query.map(|q| head.slice(&buf, q)));
        let body = &buf[head_len..head_len + body_len];
        // Usage plans (traffic control): GET /usage-plans/{plan}/usage?key=NAME.
        let usage = if authorized {
            let q = head.query.map(|q| head.slice(&buf, q));
            let ask = || {
                crate::policy::admin_usage(
                    &shared.current().config.traffic,
                    &shared.auth.keys(),
                    &method,
                    &path,
                    q,
                )
            };
            match (ask(), shared.cluster.get()) {
                // With [cluster]: the counter may be new here; sync it first.
                (Some((200, _)), Some(c)) => {
                    c.sync_now();
                    ask()
                }
                (r, _) => r,
            }
        } else {
            None
        };
        let reply = match usage {
            Some((status, v)) => Reply {
                status,
                ctype: "application/json",
                body: v.to_string().into_bytes(),
            },
            None => route(shared, &method, &path, authorized, body),
        };
        let keep = head.keep_alive;
        write_reply(&mut s, &reply, keep)?;
        if !keep {
            return Ok(());
        }
        buf.drain(..head_len + body_len);
    }
}

fn route(shared: &Shared, method: &str, path: &str, authorized: bool, body: &[u8]) -> Reply {
    if path == "/healthz" {
        return if shared.ready.load(Ordering::Acquire) {
            Reply {
                status: 200,
                ctype: "text/plain",
                body: b"ok".to_vec(),
            }
        } else {
            json(503, "Service Unavailable")
        };
    }
    if !authorized {
        return json(401, "Unauthorized");
    }
    match (method, path) {
        ("GET", "/metrics") => Reply {
            status: 200,
            ctype: "text/plain; version=0.0.4",
            body: {
                let gw = shared.current();
                let (mut th, mut tail) = (String::new(), String::new());
                gw.config.traffic.render_throttled(&mut th);
                gw.config.traffic.waf.render_metrics(&mut tail);
                let dropped = shared
                    .access_log
                    .as_ref()
                    .map_or(0, |l| l.dropped.load(Ordering::Relaxed));
                tail.push_str("# HELP ringgate_access_log_dropped_total Access log lines lost: the writer could not keep up or could not write them.\n# TYPE ringgate_access_log_dropped_total counter\n");
                let _ = writeln!(tail, "ringgate_access_log_dropped_total {dropped}");
                shared.metrics.render_with(&th, &tail).into_bytes()
            },
        },
        ("POST", "/reload") => match shared.reload() {
            Ok(notes) => {
                crate::elog!("ringgate: config reloaded (admin)");
                Reply {
                    status: 200,
                    ctype: "application/json",
                    body: serde_json::json!({ "message": "reloaded", "notes": notes })
                        .to_string()
                        .into_bytes(),
                }
            }
            Err(e) => {
                crate::elog!("ringgate: reload refused, keeping the old config: {e}");
                json(400, &e.to_string())
            }
        },
        ("POST", "/cache/invalidate") => {
            let (status, reply) = crate::cache::admin_invalidate(shared, body);
            if let (200, Some(c)) = (status, shared.cluster.get()) {
                c.invalidate(body);
            }
            let body = reply;
            Reply {
                status,
                ctype: "application/json",
                body: body.into_bytes(),
            }
        }
        (_, p) if p.starts_with("/@connections/") => {
            let (status, body) = crate::ws::api::admin(shared, method, &p[14..], body);
            Reply {
                status,
                ctype: "application/json",
                body: body.into_bytes(),
            }
        }
        ("GET", "/dashboard") => Reply {
            status: 200,
            ctype: "text/html; charset=utf-8",
            body: dashboard::PAGE.as_bytes().to_vec(),
        },
        ("GET", "/dashboard/data") => Reply {
            status: 200,
            ctype: "application/json",
            body: dashboard::data(shared),
        },
        (_, "/metrics") | (_, "/reload") | (_, "/cache/invalidate") => {
            json(405, "Method Not Allowed")
        }
        (_, "/dashboard") | (_, "/dashboard/data") => json(405, "Method Not Allowed"),
        _ => match crate::policy::auth::admin::handle(
            &shared.auth,
            |names| {
                let gw = shared.current();
                let plans = &gw.config.traffic.plans;
                if let Some(p) = names
                    .iter()
                    .find(|p| !plans.plans.iter().any(|x| *x.name == ***p))
                {
                    return Err(format!("usage plan `{p}` is not defined"));
                }
                match plans.overlap(names) {
                    Some((a, b, stage)) => Err(format!(
                        "usage plans `{a}` and `{b}` both cover `{stage}`: a key may be in one plan per API stage"
                    )),
                    None => Ok(()),
                }
            },
            method,
            path,
            body,
        ) {
            Some((status, body)) => Reply {
                status,
                ctype: "application/json",
                body: body.into_bytes(),
            },
            None => json(404, "Not Found"),
        },
    }
}

fn write_reply(s: &mut TcpStream, r: &Reply, keep: bool) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(r.body.len() + 256);
    encode::push_status_line(&mut out, r.status);
    encode::push_header(&mut out, b"content-type", r.ctype.as_bytes());
    out.extend_from_slice(b"content-length: ");
    encode::push_u64(&mut out, r.body.len() as u64);
    out.extend_from_slice(b"\r\n");
    if !keep {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if r.status == 401 {
        out.extend_from_slice(b"www-authenticate: Bearer\r\n");
    }
    // Admin answers (the dashboard included) are never cached, nor framed by other pages.
    out.extend_from_slice(b"cache-control: no-store\r\nx-frame-options: DENY\r\nx-content-type-options: nosniff\r\n\r\n");
    out.extend_from_slice(&r.body);
    s.write_all(&out)
}

#[cfg(test)]
mod tests {
    use super::ct_eq;

    #[test]
    fn constant_time_eq() {
        assert!(ct_eq(b"secret", b"secret"));
        assert!(!ct_eq(b"secret", b"secreT"));
        assert!(!ct_eq(b"secret", b"secret2"));
        assert!(!ct_eq(b"", b"x"));
        assert!(ct_eq(b"", b""));
    }
}
