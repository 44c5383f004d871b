//! Fuzz target: arbitrary bytes into the request (and response) head
//! parsers. They must never panic, and their results must satisfy the
//! invariants checked by `ringgate::http::fuzz_checks::request_parser`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ringgate::http::fuzz_checks::request_parser(data);
});
