//! Fuzz target: arbitrary bytes into the upstream response head parser, as an answer to a
//! request whose method (and limits) the first byte picks. It must never panic, and its
//! results must satisfy the invariants checked by
//! `ringgate::http::fuzz_checks::response_parser` (framing per RFC 9112 6.3, nothing
//! hop-by-hop forwarded, every prefix of a complete head partial).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ringgate::http::fuzz_checks::response_parser(data);
});
