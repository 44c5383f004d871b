//! Fuzz target: arbitrary client bytes (the first picks the piece size) into the WebSocket
//! frame decoder. It must never panic, never claim more bytes than it was given, and only yield
//! valid UTF-8 text and messages within the limits (see `ringgate::ws::frame::fuzz_check`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ringgate::ws::frame::fuzz_check(data);
});
