//! Fuzz target: arbitrary bytes from one side of a WebSocket pass-through tunnel (the first
//! byte picks the side and the piece size) through the relay's frame scanner. Relayed in
//! pieces they must give exactly what relaying them whole gives, and on a fault only whole
//! frames go on (see `ringgate::ws::relay::fuzz_check`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ringgate::ws::relay::fuzz_check(data);
});
