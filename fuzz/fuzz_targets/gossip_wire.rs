//! The gossip datagram parser (after the seal is opened): any bytes give a
//! message or an error, never a panic, and never more memory than the
//! decompression bound (a zstd bomb must fail, not inflate).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ovl_agent::membership::wire;

fuzz_target!(|data: &[u8]| {
    let head = wire::parse_head(data);
    if let Ok(msg) = wire::parse(data) {
        // A full parse implies the head parses too.
        assert!(head.is_ok());
        let _ = msg.digest.len() + msg.delta.len();
    }
});
