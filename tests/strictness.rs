//! The strictness corpus (RFC 9112 framing and request-smuggling vectors): each request gets a
//! gateway error (400, or 431 for oversize heads), the connection is closed, and the origin
//! receives nothing at all: not a byte, not a connection.
//!
//! Chunked-body errors are the one place where forwarding may already have begun: when the head
//! and the broken chunk arrive together the gateway can refuse before contacting the origin
//! (asserted strictly below); when the broken chunk comes later the head (and any earlier good
//! chunks) may already be upstream, so there we assert that the client still gets 400 and a
//! closed connection and that the origin never sees a complete request.

mod common;

use common::*;
use std::time::Duration;

fn config(origin: std::net::SocketAddr) -> String {
    format!(
        r#"
[server.limits]
max_header_bytes = 4096
max_headers = 20

[[upstreams]]
name = "o"
targets = ["{origin}"]
timeout_ms = 2000

[[apis]]
name = "p"

[[apis.routes]]
route = "ANY /{{p+}}"
integration = {{ type = "http", upstream = "o" }}

[[apis.routes]]
route = "ANY /"
integration = {{ type = "http", upstream = "o" }}
"#
    )
}

fn start() -> (Origin, Gateway) {
    let origin = Origin::fixed("origin answered");
    let gw = Gateway::start(&format!("{HEADER}\n{}", config(origin.addr)));
    (origin, gw)
}

/// Sends `raw` in one write and asserts: `status` with a JSON message, the connection closed,
/// and the origin untouched.
fn assert_rejected(raw: &[u8], status: u16) {
    let (origin, gw) = start();
    let mut c = Client::connect(gw.addr);
    c.send(raw);
    let r = c.read_response().unwrap_or_else(|e| {
        panic!(
            "no response to {:?}: {e}\nstderr:\n{}",
            String::from_utf8_lossy(raw),
            gw.stderr()
        )
    });
    assert_eq!(
        r.status,
        status,
        "request {:?} answered {} {}",
        String::from_utf8_lossy(raw),
        r.status,
        r.text()
    );
    assert!(!r.message().is_empty());
    assert!(
        r.header("x-request-id").is_some(),
        "gateway errors carry x-request-id"
    );
    assert!(
        c.is_closed_within(Duration::from_secs(2)),
        "connection left open after {status} to {:?}",
        String::from_utf8_lossy(raw)
    );
    // Give a (wrong) forward time to show up.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        origin.conns(),
        0,
        "the origin was contacted; it got {:?}",
        String::from_utf8_lossy(&origin.raw())
    );
    assert_eq!(origin.raw_len(), 0);
    // The gateway itself is fine afterwards.
    let ok = gw.get("/after");
    assert_eq!(ok.status, 200);
}

#[test]
fn sanity_a_valid_request_is_forwarded() {
    let (origin, gw) = start();
    let r = gw.request("POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc");
    assert_eq!(r.status, 200);
    assert_eq!(origin.last_request().body, b"abc");
}

#[test]
fn content_length_with_transfer_encoding() {
    assert_rejected(
        b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    );
}

#[test]
fn transfer_encoding_with_content_length() {
    assert_rejected(
        b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        400,
    );
}

#[test]
fn two_differing_content_lengths() {
    assert_rejected(
        b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        400,
    );
}

#[test]
fn differing_content_length_list() {
    assert_rejected(
        b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 3, 4\r\n\r\nabcd",
        400,
    );
}

#[test]
fn signed_content_length() {
    assert_rejected(
        b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: +3\r\n\r\nabc",
        400,
    );
}

#[test]
fn bad_chunk_size() {
    assert_rejected(
        b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        400,
    );
}

#[test]
fn chunk_size_with_leading_space() {
    assert_rejected(
        b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n 5\r\nhello\r\n0\r\n\r\n",
        400,
    );
}

#[test]
fn chunk_size_overflowing_u64() {
    assert_rejected(
        b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\n",
        400,
    );
}

/// Chunk extensions outside RFC 9112 7.1.1's grammar: relayed as they came, another parser
/// could end the size line elsewhere (an unclosed quote, a bare `=`).
#[test]
fn chunk_extensions_outside_the_grammar() {
    for ext in [
        "3;",
        "3;a=\"x",
        "3;a=\"x\\",
        "3;a=b c",
        "3;;;",
        "3;=",
        "3;\"",
        "3;a=",
    ] {
        let raw = format!(
            "POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n{ext}\r\nabc\r\n0\r\n\r\n"
        );
        assert_rejected(raw.as_bytes(), 400);
    }
}

/// A request's trailer section is held to the head's limits (`max_headers = 20`,
/// `max_header_bytes = 4096` here): 431, as for a head.
#[test]
fn trailer_sections_past_the_head_limits() {
    let many: String = (0..21).map(|i| format!("x-t{i}: v\r\n")).collect();
    let raw =
        format!("POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n{many}\r\n");
    assert_rejected(raw.as_bytes(), 431);
    // Past max_header_bytes the head may already be upstream (the section arrives in more
    // than one read), but never the last chunk or a trailer field: the origin holds no
    // complete request.
    let (origin, gw) = start();
    let mut c = Client::connect(gw.addr);
    c.send(
        format!(
            "POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-t: {}\r\n\r\n",
            "v".repeat(5000)
        )
        .as_bytes(),
    );
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 431, "{}", r.text());
    assert!(c.is_closed_within(Duration::from_secs(2)));
    std::thread::sleep(Duration::from_millis(100));
    let seen = String::from_utf8_lossy(&origin.raw()).into_owned();
    assert!(
        !seen.contains("\r\n0\r\n") && !seen.contains("x-t"),
        "{seen:?}"
    );
}

#[test]
fn chunk_data_not_followed_by_crlf() {
    assert_rejected(
        b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXX\r\n0\r\n\r\n",
        400,
    );
}

#[test]
fn obs_fold_header() {
    assert_rejected(
        b"GET /x HTTP/1.1\r\nHost: t\r\nX-Folded: one\r\n two\r\n\r\n",
        400,
    );
}

#[test]
fn whitespace_before_colon() {
    assert_rejected(b"GET /x HTTP/1.1\r\nHost: t\r\nX-Space : v\r\n\r\n", 400);
}

#[test]
fn whitespace_before_colon_in_transfer_encoding() {
    assert_rejected(
        b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding : chunked\r\nContent-Length: 3\r\n\r\nabc",
        400,
    );
}

#[test]
fn bare_lf_line_endings() {
    assert_rejected(b"GET /x HTTP/1.1\nHost: t\n\n", 400);
}

#[test]
fn bare_lf_in_one_header_line() {
    assert_rejected(b"GET /x HTTP/1.1\r\nHost: t\nX-A: b\r\n\r\n", 400);
}

#[test]
fn bare_cr_in_header_line() {
    assert_rejected(b"GET /x HTTP/1.1\r\nHost: t\rX-A: b\r\n\r\n", 400);
}

#[test]
fn nul_in_header_value() {
    assert_rejected(b"GET /x HTTP/1.1\r\nHost: t\r\nX-Nul: a\0b\r\n\r\n", 400);
}

#[test]
fn invalid_character_in_header_name() {
    assert_rejected(b"GET /x HTTP/1.1\r\nHost: t\r\nX(A): b\r\n\r\n", 400);
}

#[test]
fn transfer_encoding_gzip() {
    assert_rejected(
        b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\nabc",
        400,
    );
}

#[test]
fn transfer_encoding_chunked_twice() {
    assert_rejected(
        b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        400,
    );
}

#[test]
fn transfer_encoding_gzip_then_chunked() {
    assert_rejected(
        b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        400,
    );
}

#[test]
fn two_transfer_encoding_headers() {
    assert_rejected(
        b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    );
}

#[test]
fn transfer_encoding_in_http10() {
    assert_rejected(
        b"POST /x HTTP/1.0\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    );
}

#[test]
fn http11_without_host() {
    assert_rejected(b"GET /x HTTP/1.1\r\nX-A: b\r\n\r\n", 400);
}

#[test]
fn two_host_headers() {
    assert_rejected(b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400);
}

#[test]
fn invalid_host_value() {
    assert_rejected(b"GET /x HTTP/1.1\r\nHost: a/b@c\r\n\r\n", 400);
}

#[test]
fn dot_dot_segment_in_path() {
    assert_rejected(b"GET /a/../admin HTTP/1.1\r\nHost: t\r\n\r\n", 400);
}

#[test]
fn encoded_dot_dot_segment_in_path() {
    assert_rejected(b"GET /a/%2e%2E/admin HTTP/1.1\r\nHost: t\r\n\r\n", 400);
}

/// A refused head still answers with the client's request id when its header fields could be
/// read, and is counted in `ringgate_requests_total` (no route, method as parsed).
#[test]
fn refused_heads_keep_the_request_id_and_are_counted() {
    let (_origin, gw) = start();
    for (raw, status, method) in [
        (&b"GET /a/../b HTTP/1.1\r\nHost: t\r\nx-request-id: rid-dots\r\n\r\n"[..], 400, "GET"),
        (b"POST /x HTTP/1.1\r\nHost: t\r\nx-request-id: rid-te\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "POST"),
    ] {
        let mut c = Client::connect(gw.addr);
        c.send(raw);
        let r = c.read_response().unwrap();
        assert_eq!(r.status, status);
        let want = if method == "GET" { "rid-dots" } else { "rid-te" };
        assert_eq!(r.header("x-request-id"), Some(want));
    }
    // Heads that never parsed whole count under the request line's method too: obs-fold (400)
    // and too many header fields (431) after `DELETE ...`, garbage (400) as OTHER.
    let many: String = (0..120).map(|i| format!("x-h{i}: v\r\n")).collect();
    for raw in [
        "DELETE /x HTTP/1.1\r\nHost: t\r\nx-a: 1\r\n folded\r\n\r\n".to_string(),
        format!("DELETE /x HTTP/1.1\r\nHost: t\r\n{many}\r\n"),
        "\x01\x02garbage\r\n\r\n".to_string(),
    ] {
        let mut c = Client::connect(gw.addr);
        c.send(raw.as_bytes());
        let r = c.read_response().unwrap();
        assert!(matches!(r.status, 400 | 431), "{}", r.status);
    }
    // Counted once the answer is written: the worker may get there just after the client.
    let mut lines: Vec<String> = ["GET", "POST", "DELETE", "OTHER"].iter().map(|method| format!(
            "ringgate_requests_total{{api=\"\",stage=\"\",route=\"\",method=\"{method}\",status=\"400\"}} 1"
        )).collect();
    lines.push("ringgate_requests_total{api=\"\",stage=\"\",route=\"\",method=\"DELETE\",status=\"431\"} 1".into());
    let mut metrics = String::new();
    let all = wait_until(Duration::from_secs(3), || {
        metrics = gw.admin_get("/metrics").text();
        lines.iter().all(|l| metrics.contains(l))
    });
    assert!(all, "no `{lines:?}` in:\n{metrics}");
}

#[test]
fn absolute_form_with_another_authority() {
    // The gateway routes on Host; a target naming another authority is ambiguous.
    assert_rejected(
        b"GET http://other.example/x HTTP/1.1\r\nHost: t\r\n\r\n",
        400,
    );
}

#[test]
fn absolute_form_with_userinfo() {
    assert_rejected(b"GET http://user@t/x HTTP/1.1\r\nHost: t\r\n\r\n", 400);
}

#[test]
fn asterisk_form_on_get() {
    assert_rejected(b"GET * HTTP/1.1\r\nHost: t\r\n\r\n", 400);
}

#[test]
fn fragment_in_target() {
    assert_rejected(b"GET /x#frag HTTP/1.1\r\nHost: t\r\n\r\n", 400);
}

#[test]
fn space_in_target() {
    assert_rejected(b"GET /a b HTTP/1.1\r\nHost: t\r\n\r\n", 400);
}

#[test]
fn unknown_http_version() {
    assert_rejected(b"GET /x HTTP/1.2\r\nHost: t\r\n\r\n", 400);
}

#[test]
fn connect_method() {
    assert_rejected(b"CONNECT t:443 HTTP/1.1\r\nHost: t:443\r\n\r\n", 400);
}

#[test]
fn head_over_max_header_bytes() {
    let raw = format!(
        "GET /x HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(5000)
    );
    assert_rejected(raw.as_bytes(), 431);
}

#[test]
fn more_headers_than_max_headers() {
    let mut raw = String::from("GET /x HTTP/1.1\r\nHost: t\r\n");
    for i in 0..25 {
        raw.push_str(&format!("X-H{i}: v\r\n"));
    }
    raw.push_str("\r\n");
    assert_rejected(raw.as_bytes(), 431);
}

#[test]
fn smuggled_request_after_a_good_one() {
    // A valid request followed, in the same write, by an ambiguous one: the first is
    // answered, the second refused, and the origin sees exactly the first.
    let (origin, gw) = start();
    let mut c = Client::connect(gw.addr);
    c.send(
        b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n\
          POST /second HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n",
    );
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 200);
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 400);
    assert!(c.is_closed_within(Duration::from_secs(2)));
    std::thread::sleep(Duration::from_millis(100));
    let paths: Vec<String> = origin.requests().iter().map(|r| r.path.clone()).collect();
    assert_eq!(paths, vec!["/first"]);
    let raw = String::from_utf8_lossy(&origin.raw()).into_owned();
    assert!(
        !raw.contains("second") && !raw.contains("smuggled"),
        "{raw}"
    );
}

/// A broken chunk that arrives after the head was forwarded: the client still gets 400 and a
/// closed connection; the origin may have the head but never a complete request.
#[test]
fn bad_chunk_after_head_was_forwarded() {
    let (origin, gw) = start();
    let mut c = Client::connect(gw.addr);
    c.send(b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n");
    // Let the gateway forward the head and the first chunk.
    assert!(
        wait_until(Duration::from_secs(2), || origin.raw_len() > 0),
        "the head was not forwarded while the body streams"
    );
    c.send(b"zz\r\nworld\r\n0\r\n\r\n");
    let r = c.read_response();
    let closed = c.is_closed_within(Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        origin.request_count(),
        0,
        "the origin got a complete request"
    );
    let raw = origin.raw();
    assert!(
        find(&raw, b"zz").is_none(),
        "the broken chunk was forwarded"
    );
    match r {
        Ok(r) => assert_eq!(r.status, 400, "{}", r.text()),
        Err(e) => {
            panic!("no 400 for a bad chunk after the head was forwarded (closed: {closed}): {e}")
        }
    }
    assert!(closed);
}

/// Same, with a chunk whose data is longer than its size line says.
#[test]
fn overlong_chunk_after_head_was_forwarded() {
    let (origin, gw) = start();
    let mut c = Client::connect(gw.addr);
    c.send(b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n");
    assert!(wait_until(Duration::from_secs(2), || origin.raw_len() > 0));
    c.send(b"3\r\nabcdef\r\n0\r\n\r\n");
    let r = c.read_response();
    let closed = c.is_closed_within(Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        origin.request_count(),
        0,
        "the origin got a complete request"
    );
    match r {
        Ok(r) => assert_eq!(r.status, 400, "{}", r.text()),
        Err(e) => {
            panic!("no 400 for a bad chunk after the head was forwarded (closed: {closed}): {e}")
        }
    }
    assert!(closed);
}

#[test]
fn another_major_version_gets_505() {
    let (origin, gw) = start();
    let mut c = Client::connect(gw.addr);
    c.send(b"GET /x HTTP/2.0\r\nHost: t\r\n\r\n");
    let r = c.read_response().unwrap();
    assert_eq!(r.status, 505);
    assert_eq!(r.message(), "HTTP Version Not Supported");
    assert_eq!(origin.request_count(), 0);
}
