//! The opening handshake (RFC 6455 section 4.2): checks a client's upgrade request and computes
//! `Sec-WebSocket-Accept`.

use crate::http::{Method, RequestHead};
use base64::Engine as _;
use sha1::{Digest, Sha1};

const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Why a handshake is refused: the HTTP status and the message for the JSON error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// 400, 403 or 426.
    pub status: u16,
    /// The `{"message": ...}` text.
    pub message: &'static str,
}

/// `Sec-WebSocket-Accept` for a client key.
pub fn accept_key(key: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(key);
    h.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// Validates a WebSocket upgrade request; returns the `Sec-WebSocket-Accept` value.
/// `allowed_origins` empty = any origin (and requests without `Origin`, from non-browser
/// clients, are always allowed).
pub fn validate(
    head: &RequestHead,
    buf: &[u8],
    allowed_origins: &[String],
) -> Result<String, Refusal> {
    if head.method != Method::Get || head.minor_version != 1 {
        return Err(Refusal {
            status: 400,
            message: "Bad Request: a WebSocket handshake is a GET over HTTP/1.1",
        });
    }
    if !head.upgrade_websocket {
        return Err(Refusal {
            status: 426,
            message: "Upgrade Required: this is a WebSocket endpoint",
        });
    }
    if !matches!(head.body, crate::http::BodyKind::None) {
        return Err(Refusal {
            status: 400,
            message: "Bad Request: a WebSocket handshake has no body",
        });
    }
    // RFC 6455 11.3.1 and 11.3.5: each appears once in a request; two could disagree.
    for name in ["sec-websocket-key", "sec-websocket-version"] {
        if head.header_count(buf, name) > 1 {
            return Err(Refusal {
                status: 400,
                message: "Bad Request: Sec-WebSocket-Key and Sec-WebSocket-Version appear once",
            });
        }
    }
    match head.header(buf, "sec-websocket-version") {
        Some(v) if v.trim_ascii() == b"13" => {}
        _ => {
            return Err(Refusal {
                status: 426,
                message: "Upgrade Required: Sec-WebSocket-Version must be 13",
            })
        }
    }
    let key = head
        .header(buf, "sec-websocket-key")
        .map(|k| k.trim_ascii())
        .filter(|k| {
            k.len() == 24
                && base64::engine::general_purpose::STANDARD
                    .decode(k)
                    .map(|d| d.len() == 16)
                    .unwrap_or(false)
        })
        .ok_or(Refusal {
            status: 400,
            message: "Bad Request: Sec-WebSocket-Key must be 16 bytes in base64",
        })?;
    if !allowed_origins.is_empty() {
        if let Some(o) = head.header(buf, "origin") {
            if !allowed_origins
                .iter()
                .any(|a| a == "*" || a.as_bytes().eq_ignore_ascii_case(o))
            {
                return Err(Refusal {
                    status: 403,
                    message: "Forbidden: origin not allowed",
                });
            }
        }
    }
    Ok(accept_key(key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::{Limits, Status};

    fn parse(extra: &str) -> (RequestHead, Vec<u8>) {
        let raw = format!("GET /chat HTTP/1.1\r\nHost: x\r\n{extra}\r\n").into_bytes();
        let mut h = RequestHead::new(100);
        let lim = Limits {
            max_header_bytes: 16384,
            max_headers: 100,
        };
        assert!(matches!(h.parse(&raw, &lim), Ok(Status::Complete(_))));
        (h, raw)
    }

    const UP: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\n";

    #[test]
    fn rfc_example_accept() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        let (h, b) = parse(&format!(
            "{UP}Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        ));
        assert_eq!(
            validate(&h, &b, &[]).unwrap(),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn refusals() {
        let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
        let ver = "Sec-WebSocket-Version: 13\r\n";
        let st = |extra: String, origins: &[String]| {
            let (h, b) = parse(&extra);
            validate(&h, &b, origins).map_err(|r| r.status)
        };
        assert_eq!(st(format!("{key}{ver}"), &[]), Err(426));
        assert_eq!(st(format!("{UP}{key}"), &[]), Err(426));
        assert_eq!(
            st(format!("{UP}{key}Sec-WebSocket-Version: 8\r\n"), &[]),
            Err(426)
        );
        assert_eq!(st(format!("{UP}{ver}"), &[]), Err(400));
        assert_eq!(
            st(format!("{UP}{ver}Sec-WebSocket-Key: c2hvcnQ=\r\n"), &[]),
            Err(400)
        );
        // Each once (RFC 6455 11.3.1, 11.3.5), even when the copies agree.
        assert_eq!(st(format!("{UP}{key}{key}{ver}"), &[]), Err(400));
        assert_eq!(st(format!("{UP}{key}{ver}{ver}"), &[]), Err(400));
        let allowed = vec!["https://app.example.com".to_string()];
        assert_eq!(
            st(
                format!("{UP}{key}{ver}Origin: https://evil.example.com\r\n"),
                &allowed
            ),
            Err(403)
        );
        assert!(st(
            format!("{UP}{key}{ver}Origin: https://app.example.com\r\n"),
            &allowed
        )
        .is_ok());
        assert!(st(format!("{UP}{key}{ver}"), &allowed).is_ok());
    }
}
