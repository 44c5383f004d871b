//! Benchmarks for the HTTP/1.x head parsers and the proxied-head encoder.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ringgate::http::{
    push_header, push_request_line, push_u64, BodyKind, Limits, Method, RequestHead, ResponseHead,
    Status,
};

const REQUEST: &[u8] = b"GET /api/v1/users/12345/orders?limit=20&offset=40 HTTP/1.1\r\n\
Host: api.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0\r\n\
Accept: application/json, text/plain, */*\r\n\
Accept-Language: en-US,en;q=0.5\r\n\
Accept-Encoding: gzip, deflate, br\r\n\
Authorization: Bearer eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.e30.abc\r\n\
Connection: keep-alive\r\n\
Cookie: session=0123456789abcdef; theme=dark\r\n\r\n";

const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\n\
Date: Wed, 25 Nov 2026 13:20:03 GMT\r\n\
Content-Type: application/json; charset=utf-8\r\n\
Content-Length: 1234\r\n\
Cache-Control: private, max-age=0\r\n\
ETag: \"5f2b-1234\"\r\n\
Vary: Accept-Encoding\r\n\
Connection: keep-alive\r\n\r\n";

fn bench(c: &mut Criterion) {
    let limits = Limits::default();

    let mut g = c.benchmark_group("http");
    g.throughput(Throughput::Elements(1));

    let mut req = RequestHead::new(limits.max_headers);
    g.bench_function("parse_request_head_8_headers", |b| {
        b.iter(|| {
            let st = req.parse(black_box(REQUEST), &limits).unwrap();
            black_box(st);
        })
    });

    let mut resp = ResponseHead::new(limits.max_headers);
    g.bench_function("parse_response_head", |b| {
        b.iter(|| {
            let st = resp
                .parse(black_box(RESPONSE), Method::Get, &limits)
                .unwrap();
            black_box(st);
        })
    });

    assert_eq!(
        req.parse(REQUEST, &limits),
        Ok(Status::Complete(REQUEST.len()))
    );
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    let client_ip = b"203.0.113.7";
    g.bench_function("encode_proxied_request_head", |b| {
        b.iter(|| {
            out.clear();
            let buf = black_box(REQUEST);
            push_request_line(&mut out, req.method_bytes(buf), req.slice(buf, req.target));
            let mut xff: Option<&[u8]> = None;
            for (name, value) in req.forwardable(buf) {
                if name.eq_ignore_ascii_case(b"x-forwarded-for") {
                    xff = Some(value);
                    continue;
                }
                push_header(&mut out, name, value);
            }
            match xff {
                Some(prev) => {
                    out.extend_from_slice(b"X-Forwarded-For: ");
                    out.extend_from_slice(prev);
                    out.extend_from_slice(b", ");
                    out.extend_from_slice(client_ip);
                    out.extend_from_slice(b"\r\n");
                }
                None => push_header(&mut out, b"X-Forwarded-For", client_ip),
            }
            push_header(&mut out, b"X-Forwarded-Proto", b"https");
            if let Some(h) = req.host {
                push_header(&mut out, b"X-Forwarded-Host", req.slice(buf, h));
            }
            if let BodyKind::Length(n) = req.body {
                out.extend_from_slice(b"Content-Length: ");
                push_u64(&mut out, n);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"Connection: keep-alive\r\n\r\n");
            black_box(out.len());
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
