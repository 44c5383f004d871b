//! Fuzz target: arbitrary message bytes (the first byte picks text or binary) through a
//! WebSocket API's route selection. It must never panic or exhaust the stack, and never select
//! `$connect` or `$disconnect` (see `ringgate::ws::fuzz_select`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ringgate::ws::fuzz_select(data);
});
