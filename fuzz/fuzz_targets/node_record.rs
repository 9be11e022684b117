//! Signed node records, as they arrive in chitchat values: any string gives
//! a verified record or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ovl_agent::ids::{ClusterId, NodeId};
use ovl_agent::membership::record::{Slot, decode, verify};

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else {
        return;
    };
    let node_id = NodeId::from_bytes([2; 16]).to_string();
    let slot = Slot {
        node_id: &node_id,
        generation: 1,
        gossip_addr: "198.18.0.12:7946".parse().expect("literal"),
        version: 3,
    };
    let verified = verify(ClusterId::from_bytes([7; 16]), value, slot).is_ok();
    let decoded = decode(value, slot).is_ok();
    // Whatever verifies also decodes (decode checks less).
    assert!(!verified || decoded);
});
