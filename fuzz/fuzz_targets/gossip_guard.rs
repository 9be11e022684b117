//! The gossip guard: what a member's (authenticated) datagram may make
//! chitchat see. Fed datagrams from several senders in turn, so the guard's
//! memory of incarnations is exercised too.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use ovl_agent::ids::{ClusterId, NodeId};
use ovl_agent::keys::cluster_key::KeyScope;
use ovl_agent::membership::guard::Guard;
use ovl_agent::membership::wire::WireId;

fuzz_target!(|data: &[u8]| {
    let me = WireId {
        node_id: NodeId::from_bytes([1; 16]).to_string(),
        generation: 1,
        gossip_addr: "198.18.0.11:7946".parse().expect("literal"),
    };
    let mut guard = Guard::new(ClusterId::from_bytes([7; 16]), me);
    let members: BTreeSet<NodeId> = (1..4u8).map(|b| NodeId::from_bytes([b; 16])).collect();
    let removed: BTreeSet<NodeId> = [NodeId::from_bytes([9; 16])].into_iter().collect();
    let mut out = Vec::new();
    // Split on a marker byte: each chunk is one datagram from a sender
    // chosen by its first byte.
    for (i, chunk) in data.split(|&b| b == 0xA5).enumerate() {
        let Some((&who, bytes)) = chunk.split_first() else {
            continue;
        };
        let sender = NodeId::from_bytes([1 + who % 10; 16]);
        let scope = KeyScope {
            members: (who & 0x80 == 0).then_some(&members),
            stale: who & 0x40 != 0,
        };
        let _ = guard.admit(sender, bytes, 1_000 * i as u64, &removed, scope, &mut out);
    }
});
