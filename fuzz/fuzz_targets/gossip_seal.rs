//! Opening sealed gossip datagrams: junk from anyone on 7946/udp. Also the
//! replay cache's key and bookkeeping on whatever arrives.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ovl_agent::ids::ClusterId;
use ovl_agent::keys::token::JoinToken;
use ovl_agent::membership::seal::{ReplayCache, Sealer, sent_at};

fuzz_target!(|data: &[u8]| {
    let token = JoinToken::from_parts(ClusterId::from_bytes([7; 16]), [3; 32]);
    let sealer = Sealer::new(token.first_cluster_key(), 30_000);
    let now = sent_at(data).unwrap_or(0);
    let mut d = data.to_vec();
    let _ = sealer.open(now, &mut d);
    let mut cache = ReplayCache::new(30_000, 4);
    if let Some(k) = ReplayCache::key_of(data) {
        assert!(cache.first_time(k, now, now));
        assert!(!cache.first_time(k, now, now), "a replay must be caught");
    }
    // Sealing then opening round-trips whatever plaintext arrived.
    let mut out = Vec::new();
    sealer.seal(now, [5; 12], data, &mut out);
    let (_, plain) = sealer.open(now, &mut out).expect("own seal opens");
    assert_eq!(plain, data);
});
