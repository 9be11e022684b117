//! Text that reaches the agent from users and files: join tokens, MAC
//! addresses, seed addresses, upstream resolvers and resolv.conf.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ovl_agent::config::parse_seed;
use ovl_agent::ids::MacAddr;
use ovl_agent::keys::token::JoinToken;
use ovl_agent::resolv_conf::{parse_resolv_conf, parse_upstream};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = s.parse::<JoinToken>() {
        // A parsed token prints back to something that parses to itself.
        let again: JoinToken = t.reveal().parse().expect("revealed token parses");
        assert_eq!(again.cluster_id(), t.cluster_id());
    }
    if let Ok(m) = s.parse::<MacAddr>() {
        assert_eq!(m.to_string().parse::<MacAddr>().ok(), Some(m));
    }
    let _ = parse_seed(s, 7946);
    let _ = parse_upstream(s);
    assert!(parse_resolv_conf(s).len() <= s.len());
});
