//! Fuzz target: arbitrary bytes (the first two seed the split points) into
//! the chunked decoder, whole and in pieces. It must never panic and both
//! ways must give the same payload, consumed count, completion and error
//! (see `ringgate::http::fuzz_checks::chunked_decoder`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    ringgate::http::fuzz_checks::chunked_decoder(data);
});
