//! The embedded DNS resolver: any datagram from a container gets an answer,
//! a refusal, a forward or a drop, never a panic; the answer parses.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ovl_agent::dns::resolve::{Outcome, Rotor, resolve};
use ovl_agent::dns::table::{NameTable, NamedEndpoint};

fuzz_target!(|data: &[u8]| {
    let subnet = "198.19.10.0/24".parse().ok();
    let eps = [
        NamedEndpoint {
            name: "c1".into(),
            aliases: vec!["web".into()],
            ip: [198, 19, 10, 2].into(),
        },
        NamedEndpoint {
            name: "c2".into(),
            aliases: vec!["web".into(), "Db.".into()],
            ip: [198, 19, 10, 3].into(),
        },
    ];
    let table = NameTable::new(subnet, &eps);
    let mut rotor = Rotor::default();
    for _ in 0..2 {
        if let Outcome::Reply { bytes, .. } = resolve(&table, &mut rotor, data) {
            assert!(bytes.len() >= 12, "a reply has at least a header");
        }
    }
    assert!(rotor.len() <= 4, "rotation state is bounded by the table");
});
