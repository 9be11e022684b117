//! Unit tests: every operation and every error. The multi-host properties
//! are in `agent/tests/ipam_sim.rs`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use ::ring::signature::Ed25519KeyPair;
use ipnetwork::Ipv4Network;

use super::*;
use crate::ids::{EndpointId, NetworkId, NodeId};

fn netid() -> NetworkId {
    NetworkId::from_bytes([7; 16])
}

/// Node `i`'s key (deterministic), bound to the test network.
fn s(i: u8) -> Signer {
    let key = Ed25519KeyPair::from_seed_unchecked(&[i; 32]).unwrap();
    Signer::new(Arc::new(key), netid())
}

/// Node `i`'s id: derived from its key, as in the agent.
fn n(i: u8) -> NodeId {
    s(i).id()
}

fn none(_: NodeId) -> bool {
    false
}

fn auth(publisher: NodeId) -> Authority<'static> {
    Authority {
        network: netid(),
        publisher,
        departed: &none,
    }
}

/// `a` merges the view `from` publishes.
fn m(a: &mut Allocator, from: &Allocator) -> Result<bool, MergeError> {
    mr(a, from.me(), from.ring())
}

/// `a` merges `r`, published by `publisher`.
fn mr(a: &mut Allocator, publisher: NodeId, r: &Ring) -> Result<bool, MergeError> {
    let rep = a.merge_views(&[(publisher, r)], &none);
    match rep.errors.into_iter().next() {
        Some((_, e)) => Err(e),
        None => Ok(rep.changed),
    }
}

/// Ring-level merge of `other`, published by `publisher`.
fn rm(r: &mut Ring, publisher: NodeId, other: &Ring) -> Result<bool, MergeError> {
    r.merge(other, &auth(publisher)).map(|x| x.0)
}

/// Entries without their proofs, for comparisons.
fn st(entries: &[RangeEntry]) -> Vec<(Ipv4Network, NodeId, u64)> {
    entries
        .iter()
        .map(|e| (e.block, e.owner, e.version))
        .collect()
}

fn sv(block: &str, owner: u8, version: u64) -> (Ipv4Network, NodeId, u64) {
    (net(block), n(owner), version)
}

fn ep(i: u32) -> EndpointId {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&i.to_be_bytes());
    EndpointId::from_bytes(b)
}

fn net(s: &str) -> Ipv4Network {
    s.parse().unwrap()
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// 10.0.0.0/24, gateway .1: usable .2 to .254.
fn pool24() -> Pool {
    Pool::new(net("10.0.0.0/24"), None, Some(ip("10.0.0.1"))).unwrap()
}

/// An entry its owner wrote itself.
fn entry(block: &str, owner: u8, version: u64) -> RangeEntry {
    RangeEntry {
        block: net(block),
        owner: n(owner),
        version,
        proof: s(owner).sign(net(block), n(owner), version),
    }
}

fn half(to: NodeId) -> DonationRequest {
    DonationRequest {
        to,
        want: Want::Half,
    }
}

fn exact(to: NodeId, a: &str) -> DonationRequest {
    DonationRequest {
        to,
        want: Want::Exact(ip(a)),
    }
}

/// A owns .0/25, B owns .128/25 (both replicas know it).
fn two_hosts() -> (Allocator, Allocator) {
    let mut a = Allocator::create(s(1), pool24());
    let mut b = Allocator::join(s(2), a.ring().clone());
    let g = a.donate(half(n(2))).unwrap();
    b.accept(&g, g.from, &none).unwrap();
    (a, b)
}

fn all_checks(hosts: &[&Allocator]) {
    for h in hosts {
        h.check().unwrap();
    }
    check_disjoint(hosts.iter().map(|h| (h.me(), h.ring()))).unwrap();
    check_unique_addresses(hosts.iter().copied()).unwrap();
}

// ---- pool

#[test]
fn pool_reserves_network_broadcast_gateway() {
    let p = pool24();
    assert_eq!(p.usable_count(), 253);
    for r in ["10.0.0.0", "10.0.0.1", "10.0.0.255"] {
        assert!(p.is_reserved(ip(r)) && !p.is_usable(ip(r)), "{r}");
    }
    assert!(p.is_usable(ip("10.0.0.2")));
    assert!(!p.is_usable(ip("10.0.1.2")));
    assert_eq!(p.usable_in(net("10.0.0.0/30")), 2);
    assert_eq!(p.usable_in(net("10.0.1.0/30")), 0);
    assert_eq!(p.to_string(), "subnet 10.0.0.0/24 gateway 10.0.0.1");
}

#[test]
fn pool_errors() {
    let sub = net("10.0.0.0/24");
    let cases: Vec<(Result<Pool, PoolError>, PoolError)> = vec![
        (
            Pool::new(net("10.0.0.0/7"), None, None),
            PoolError::TooLarge(net("10.0.0.0/7")),
        ),
        (
            Pool::new(net("10.0.0.0/31"), None, None),
            PoolError::TooSmall(net("10.0.0.0/31")),
        ),
        (
            Pool::new(net("10.0.0.7/32"), None, None),
            PoolError::TooSmall(net("10.0.0.7/32")),
        ),
        (
            Pool::new(net("10.0.0.1/24"), None, None),
            PoolError::NotCanonical {
                given: net("10.0.0.1/24"),
                expected: sub,
            },
        ),
        (
            Pool::new(sub, Some(net("10.0.0.129/25")), None),
            PoolError::NotCanonical {
                given: net("10.0.0.129/25"),
                expected: net("10.0.0.128/25"),
            },
        ),
        (
            Pool::new(sub, Some(net("10.0.1.0/25")), None),
            PoolError::RangeOutsideSubnet {
                range: net("10.0.1.0/25"),
                subnet: sub,
            },
        ),
        (
            Pool::new(sub, Some(net("10.0.0.0/23")), None),
            PoolError::RangeOutsideSubnet {
                range: net("10.0.0.0/23"),
                subnet: sub,
            },
        ),
        (
            Pool::new(sub, None, Some(ip("10.0.1.1"))),
            PoolError::GatewayOutsideSubnet {
                gateway: ip("10.0.1.1"),
                subnet: sub,
            },
        ),
        (
            Pool::new(sub, None, Some(ip("10.0.0.0"))),
            PoolError::GatewayIsNetworkAddress(ip("10.0.0.0")),
        ),
        (
            Pool::new(sub, None, Some(ip("10.0.0.255"))),
            PoolError::GatewayIsBroadcastAddress(ip("10.0.0.255")),
        ),
        (
            Pool::new(
                net("10.0.0.0/30"),
                Some(net("10.0.0.0/31")),
                Some(ip("10.0.0.1")),
            ),
            PoolError::NoUsableAddress(net("10.0.0.0/31")),
        ),
    ];
    for (got, want) in cases {
        assert_eq!(got.unwrap_err(), want);
    }
    // The extremes are fine.
    Pool::new(net("10.0.0.0/8"), None, None).unwrap();
    Pool::new(net("10.0.0.0/30"), None, Some(ip("10.0.0.1"))).unwrap();
    Pool::new(sub, Some(net("10.0.0.77/32")), None).unwrap();
}

#[test]
fn pool_serde_validates() {
    let p = Pool::new(
        net("10.0.0.0/24"),
        Some(net("10.0.0.128/25")),
        Some(ip("10.0.0.1")),
    )
    .unwrap();
    let json = serde_json::to_string(&p).unwrap();
    assert_eq!(
        json,
        r#"{"subnet":"10.0.0.0/24","ip_range":"10.0.0.128/25","gateway":"10.0.0.1"}"#
    );
    assert_eq!(serde_json::from_str::<Pool>(&json).unwrap(), p);
    for bad in [
        r#"{"subnet":"10.0.0.0/31"}"#,
        r#"{"subnet":"banana"}"#,
        r#"{"subnet":"10.0.0.0/24","gateway":"10.0.0.0"}"#,
    ] {
        assert!(serde_json::from_str::<Pool>(bad).is_err(), "{bad}");
    }
}

// ---- ring

#[test]
fn ring_from_parts_validates_and_canonicalises() {
    let p = Some(pool24());
    let no = BTreeMap::new();
    // Two pieces of one signed write join back into it.
    let whole = s(1).sign(net("10.0.0.0/24"), n(1), 3);
    let r = Ring::from_parts(
        p.clone(),
        vec![
            RangeEntry {
                proof: whole,
                ..entry("10.0.0.128/25", 1, 3)
            },
            RangeEntry {
                proof: whole,
                ..entry("10.0.0.0/25", 1, 3)
            },
        ],
        no.clone(),
    )
    .unwrap();
    assert_eq!(st(r.entries()), [sv("10.0.0.0/24", 1, 3)]);
    r.check().unwrap();

    let err = |entries: Vec<RangeEntry>| Ring::from_parts(p.clone(), entries, no.clone());
    assert_eq!(
        err(vec![entry("10.0.0.0/25", 1, 1)]).unwrap_err(),
        RingError::Gap {
            from: ip("10.0.0.128"),
            to: ip("10.0.0.255")
        }
    );
    assert_eq!(
        err(vec![entry("10.0.0.128/25", 1, 1)]).unwrap_err(),
        RingError::Gap {
            from: ip("10.0.0.0"),
            to: ip("10.0.0.127")
        }
    );
    assert_eq!(
        err(vec![entry("10.0.0.1/24", 1, 1)]).unwrap_err(),
        RingError::Misaligned(net("10.0.0.1/24"))
    );
    assert!(matches!(
        err(vec![entry("10.0.0.0/24", 1, 1), entry("10.0.0.0/25", 2, 2)]).unwrap_err(),
        RingError::Overlap(..)
    ));
    assert!(matches!(
        err(vec![entry("10.0.0.0/23", 1, 1)]).unwrap_err(),
        RingError::OutsidePool { .. }
    ));
    assert_eq!(
        Ring::from_parts(None, vec![entry("10.0.0.0/24", 1, 1)], no).unwrap_err(),
        RingError::EntriesWithoutPool
    );
}

#[test]
fn ring_serde_round_trip_and_rejects_holes() {
    let (a, _) = two_hosts();
    let json = serde_json::to_string(a.ring()).unwrap();
    let back: Ring = serde_json::from_str(&json).unwrap();
    assert_eq!(&back, a.ring());
    let holed = json.replace(r#"{"block":"10.0.0.0/25","#, r#"{"block":"10.0.0.0/26","#);
    assert!(serde_json::from_str::<Ring>(&holed).is_err());
    let empty: Ring =
        serde_json::from_str(&serde_json::to_string(&Ring::default()).unwrap()).unwrap();
    assert!(empty.is_empty());
}

#[test]
fn merge_takes_higher_version_per_address() {
    let mut r = Ring::new(pool24(), &s(1));
    // Node 1 wrote the upper half to node 2 at version 2.
    let newer = Ring::from_parts(
        Some(pool24()),
        vec![
            entry("10.0.0.0/25", 1, 1),
            RangeEntry {
                proof: s(1).sign(net("10.0.0.128/25"), n(2), 2),
                ..entry("10.0.0.128/25", 2, 2)
            },
        ],
        BTreeMap::new(),
    )
    .unwrap();
    let before = r.progress();
    assert!(rm(&mut r, n(3), &newer).unwrap());
    // The lower half keeps the genesis signature (same owner and version).
    assert_eq!(st(r.entries()), st(newer.entries()));
    assert!(r.progress() > before);
    // Older information changes nothing; merging twice changes nothing.
    assert!(!rm(&mut r, n(1), &Ring::new(pool24(), &s(1))).unwrap());
    assert!(!rm(&mut r, n(3), &newer).unwrap());
    // An empty ring adopts; merging an empty ring is a no-op.
    let mut e = Ring::default();
    assert!(rm(&mut e, n(3), &newer).unwrap());
    assert_eq!(e, newer);
    assert!(!rm(&mut e, n(3), &Ring::default()).unwrap());
}

#[test]
fn merge_is_commutative_with_partial_overlaps() {
    // A splits; B later splits its half further; a third replica only
    // knows the oldest state. Any merge order gives the same ring, each
    // view merged as its own host publishes it.
    let (mut a, mut b) = two_hosts();
    let mut c = Allocator::join(s(3), a.ring().clone());
    let g = b.donate(half(n(3))).unwrap();
    c.accept(&g, g.from, &none).unwrap();
    let old = Allocator::join(s(4), Ring::new(pool24(), &s(1)));
    let views = [&a, &b, &c, &old];
    let mut results = Vec::new();
    for order in [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2]] {
        let mut r = Allocator::join(s(5), Ring::new(pool24(), &s(1)));
        for i in order {
            m(&mut r, views[i]).unwrap();
        }
        // One round may leave states for a later view to vouch for.
        for i in order {
            m(&mut r, views[i]).unwrap();
        }
        r.ring().check().unwrap();
        results.push(r.ring().entries().to_vec());
    }
    assert!(results.windows(2).all(|w| w[0] == w[1]));
    let bb = b.clone();
    m(&mut a, &bb).unwrap();
    m(&mut b, &c).unwrap();
    assert_eq!(a.ring().entries(), &results[0][..]);
    assert_eq!(b.ring().entries(), &results[0][..]);
}

#[test]
fn merge_conflict_is_refused_whole() {
    let mut a = Allocator::create(s(1), pool24());
    // Node 1 itself signing a second genesis for node 2: an equivocation.
    let forged = Ring::from_parts(
        Some(pool24()),
        vec![RangeEntry {
            proof: s(1).sign(net("10.0.0.0/24"), n(2), 1),
            ..entry("10.0.0.0/24", 2, 1)
        }],
        BTreeMap::new(),
    )
    .unwrap();
    let before = a.clone();
    let err = mr(&mut a, n(2), &forged).unwrap_err();
    assert!(matches!(err, MergeError::Conflict { .. }), "{err}");
    assert_eq!(a, before);
    // The same state written by someone else is refused whole too (only
    // the equivocator's views are lost: honest views never carry it).
    let by_2 = Ring::from_parts(
        Some(pool24()),
        vec![entry("10.0.0.0/24", 2, 1)],
        BTreeMap::new(),
    )
    .unwrap();
    let rep = a.merge_views(&[(n(2), &by_2)], &none);
    assert!(rep.errors.len() == 1 && !rep.changed);
    assert_eq!(a, before);
}

#[test]
fn merge_pool_mismatch() {
    let mut a = Allocator::create(s(1), pool24());
    let other = Ring::new(Pool::new(net("10.0.1.0/24"), None, None).unwrap(), &s(2));
    assert!(matches!(
        mr(&mut a, n(2), &other).unwrap_err(),
        MergeError::PoolMismatch { .. }
    ));
}

// ---- attribution: who may change which entry

/// Three hosts: 1 owns .0/25, 2 owns .128/26, 3 owns .192/26; every
/// replica knows it.
fn three_hosts() -> (Allocator, Allocator, Allocator) {
    let (mut a, mut b) = two_hosts();
    let mut c = Allocator::join(s(3), a.ring().clone());
    let g = b.donate(half(n(3))).unwrap();
    c.accept(&g, g.from, &none).unwrap();
    let (bb, cc) = (b.clone(), c.clone());
    m(&mut a, &bb).unwrap();
    m(&mut a, &cc).unwrap();
    m(&mut b, &cc).unwrap();
    (a, b, c)
}

/// Host `thief` rewrites `block` to `to` in its view, signed by itself,
/// `bump` versions above what it covers.
fn steal(from: &Allocator, thief: u8, block: &str, to: u8, bump: u64) -> Ring {
    let mut r = from.ring().clone();
    for _ in 0..bump {
        r.assign(net(block), n(to), &s(thief));
    }
    r
}

#[test]
fn a_member_cannot_take_a_third_hosts_block() {
    let (mut a, mut b, c) = three_hosts();
    let before = a.ring().clone();
    // Host 3 publishes a view in which it owns host 1's block, and one in
    // which it hands host 1's block to host 2, at a far higher version.
    for forged in [
        steal(&c, 3, "10.0.0.0/25", 3, 50),
        steal(&c, 3, "10.0.0.0/26", 2, 50),
    ] {
        let rep = b.merge_views(&[(n(3), &forged), (n(1), a.ring())], &none);
        assert!(!rep.changed, "{:?}", rep);
        assert_eq!(rep.forged.len(), 1, "{rep:?}");
        assert_eq!(rep.forged[0].0, n(3));
        assert_eq!(b.ring().owner_of(ip("10.0.0.5")), Some(n(1)));
        // The victim itself refuses it too.
        let rep = a.merge_views(&[(n(3), &forged)], &none);
        assert_eq!(rep.forged.len(), 1);
        assert_eq!(a.ring(), &before);
    }
    // A relayed copy (host 2 republishing it) is no better.
    let forged = steal(&c, 3, "10.0.0.0/25", 3, 50);
    let before_b = b.ring().entries().to_vec();
    let rep = b.merge_views(&[(n(5), &forged), (n(1), a.ring())], &none);
    assert!(rep.forged.len() == 1, "{rep:?}");
    assert_eq!(b.ring().entries(), &before_b[..]);
    // A signature over something else, or a key that is not the writer's.
    let mut e = steal(&c, 1, "10.0.0.0/25", 3, 50).entries().to_vec();
    for x in e.iter_mut().filter(|x| x.owner == n(3) && x.version > 40) {
        x.version += 1;
    }
    let tampered = Ring::from_parts(c.pool().cloned(), e, BTreeMap::new()).unwrap();
    let rep = b.merge_views(&[(n(3), &tampered)], &none);
    assert!(!rep.forged.is_empty() && rep.forged.iter().all(|f| f.1.bad_proof));
    assert_eq!(b.ring().entries(), &before_b[..]);
    assert_eq!(b.ring().owner_of(ip("10.0.0.5")), Some(n(1)));
}

#[test]
fn a_lagging_replica_catches_up_through_the_owner_it_knows() {
    // d knows only the genesis (host 1 owns everything). Host 2 gave part
    // of what host 1 granted it to host 3: d cannot check host 2's
    // authority from host 3's view, so it waits; host 1's own view vouches.
    let (a, b, c) = three_hosts();
    let mut d = Allocator::join(s(4), Ring::new(pool24(), &s(1)));
    let rep = d.merge_views(&[(n(3), c.ring())], &none);
    assert_eq!(d.ring().owner_of(ip("10.0.0.200")), Some(n(1)));
    assert!(rep.deferred > 0 && rep.forged.is_empty(), "{rep:?}");
    let rep = d.merge_views(&[(n(3), c.ring()), (n(1), a.ring())], &none);
    assert!(
        rep.changed && rep.forged.is_empty() && rep.deferred == 0,
        "{rep:?}"
    );
    assert_eq!(d.ring().entries(), a.ring().entries());
    // With host 1 departed (its view gone), a departed owner's space
    // follows the newest signed write.
    let mut e = Allocator::join(s(5), Ring::new(pool24(), &s(1)));
    let gone = |x: NodeId| x == n(1);
    e.merge_views(&[(n(2), b.ring()), (n(3), c.ring())], &gone);
    assert_eq!(e.ring().entries(), a.ring().entries());
}

#[test]
fn bootstrap_takes_the_majority_so_one_liar_cannot_move_an_address() {
    let (a, b, c) = three_hosts();
    let forged = steal(&c, 3, "10.0.0.0/25", 3, 50);
    let mut d = Allocator::join(s(4), Ring::default());
    let rep = d.merge_views(
        &[(n(3), &forged), (n(1), a.ring()), (n(2), b.ring())],
        &none,
    );
    assert!(rep.changed);
    assert_eq!(d.ring().entries(), a.ring().entries());
    assert_eq!(rep.forged.len(), 1);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    /// Property: for honest writers any merge order converges, and a forged
    /// entry (a member writing addresses it does not own) never takes
    /// effect on an honest host. Random donations among 4 hosts, random
    /// partial gossip, one liar forging at random: every choice is drawn
    /// from `choices` (proptest generates and shrinks them).
    #[test]
    fn property_honest_writers_converge_and_forgeries_never_take_effect(
        choices in proptest::collection::vec(proptest::prelude::any::<u64>(), 64..512)
    ) {
        let mut it = choices.iter().copied().cycle();
        let mut next = move || it.next().unwrap_or(0);
        let mut hosts = vec![Allocator::create(s(1), pool24())];
        for i in 2..=4u8 {
            hosts.push(Allocator::join(s(i), hosts[0].ring().clone()));
        }
        const LIAR: usize = 3;
        let mut forged: std::collections::HashSet<Proof> = Default::default();
        for _step in 0..40 {
            let (i, j) = ((next() % 4) as usize, (next() % 4) as usize);
            match next() % 4 {
                0 if i != j && i != LIAR && j != LIAR => {
                    // j asks i for space; the grant arrives directly. The
                    // liar never owns anything: every forgery of its is a
                    // third host's block (an owner lying about blocks it
                    // gave away is the equivocation of docs/threat-model.md).
                    let to = hosts[j].me();
                    if let Ok(g) = hosts[i].donate(half(to)) {
                        let _ = hosts[j].accept(&g, g.from, &none);
                    }
                }
                1 if i != LIAR => {
                    // The liar forges one of i's blocks for itself (or for
                    // a third host).
                    let blocks = hosts[i].ranges_of(hosts[i].me());
                    if let Some(b) = blocks.first() {
                        let to = if next() % 2 == 0 {
                            4
                        } else {
                            ((i + 1) % 3) as u8 + 1
                        };
                        let r = steal(&hosts[LIAR], 4, &b.to_string(), to, 1 + next() % 3);
                        forged.extend(
                            r.entries()
                                .iter()
                                .filter(|e| e.proof.writer == n(4) && e.block.is_subnet_of(*b))
                                .map(|e| e.proof),
                        );
                        for (k, h) in hosts.iter_mut().enumerate() {
                            if k != LIAR {
                                h.merge_views(&[(n(4), &r)], &none);
                            }
                        }
                    }
                }
                _ if i != j => {
                    let from = hosts[i].clone();
                    m(&mut hosts[j], &from).unwrap();
                }
                _ => {}
            }
            // Never: an honest host holding a forged (owner, version).
            for (k, h) in hosts.iter().enumerate().filter(|(k, _)| *k != LIAR) {
                for e in h.ring().entries() {
                    assert!(!forged.contains(&e.proof), "host {k} took a forgery: {e}");
                }
            }
            check_disjoint(hosts.iter().map(|h| (h.me(), h.ring()))).unwrap();
        }
        // Quiescent gossip, in random orders: every replica ends equal.
        for _ in 0..8 {
            for _ in 0..16 {
                let (i, j) = ((next() % 4) as usize, (next() % 4) as usize);
                if i != j {
                    let from = hosts[i].clone();
                    m(&mut hosts[j], &from).unwrap();
                }
            }
        }
        for i in 0..4 {
            for j in 0..4 {
                if i != j {
                    let from = hosts[i].clone();
                    m(&mut hosts[j], &from).unwrap();
                }
            }
        }
        check_converged(hosts.iter().map(|h| (h.me(), h.ring()))).unwrap();
    }
}

#[test]
fn free_reports_merge_and_reassert() {
    let (mut a, mut b) = two_hosts();
    b.allocate(ep(1)).unwrap();
    m(&mut a, &b).unwrap();
    let rb = a.ring().reports()[&n(2)];
    assert_eq!(rb.free, 126);
    // A stale, larger-seq report about B (e.g. B restored an old snapshot)
    // is overridden by B with its true count at a higher seq.
    let mut forged = a.ring().clone();
    let mut reports = forged.reports().clone();
    reports.insert(
        n(2),
        FreeReport {
            seq: rb.seq + 10,
            free: 7,
        },
    );
    forged = Ring::from_parts(forged.pool().cloned(), forged.entries().to_vec(), reports).unwrap();
    assert!(mr(&mut b, n(1), &forged).unwrap());
    let now = b.ring().reports()[&n(2)];
    assert_eq!(now.free, 126);
    assert!(now.seq > rb.seq + 10);
    b.check().unwrap();
}

// ---- allocator: create, allocate, exact, free

#[test]
fn create_allocates_lowest_skipping_reserved() {
    let mut a = Allocator::create(s(1), pool24());
    assert_eq!(a.owned_free_count(), 253);
    assert_eq!(a.allocate(ep(1)).unwrap(), ip("10.0.0.2"));
    assert_eq!(a.allocate(ep(2)).unwrap(), ip("10.0.0.3"));
    // Idempotent per endpoint (retry after a crash).
    assert_eq!(a.allocate(ep(1)).unwrap(), ip("10.0.0.2"));
    assert_eq!(a.owned_free_count(), 251);
    a.check().unwrap();
}

#[test]
fn ip_range_limits_allocation() {
    let p = Pool::new(
        net("10.0.0.0/24"),
        Some(net("10.0.0.128/25")),
        Some(ip("10.0.0.1")),
    )
    .unwrap();
    let mut a = Allocator::create(s(1), p);
    assert_eq!(st(a.ring().entries()), [sv("10.0.0.128/25", 1, 1)]);
    assert_eq!(a.owned_free_count(), 127);
    assert_eq!(a.allocate(ep(1)).unwrap(), ip("10.0.0.128"));
    assert_eq!(
        a.allocate_exact(ip("10.0.0.5"), ep(2)),
        Err(AllocError::NotInPool)
    );
    assert_eq!(
        a.allocate_exact(ip("10.0.0.255"), ep(2)),
        Err(AllocError::Reserved)
    );
}

#[test]
fn exhausted_and_top_of_address_space() {
    // The last /24 of IPv4: block ends at 2^32.
    let p = Pool::new(net("255.255.255.0/30"), None, Some(ip("255.255.255.1"))).unwrap();
    let mut a = Allocator::create(s(1), p);
    assert_eq!(a.allocate(ep(1)).unwrap(), ip("255.255.255.2"));
    assert_eq!(a.allocate(ep(2)), Err(AllocError::Exhausted));
    let p = Pool::new(net("255.255.255.0/24"), None, None).unwrap();
    let mut a = Allocator::create(s(1), p);
    for i in 0..254 {
        a.allocate(ep(i)).unwrap();
    }
    assert_eq!(a.allocate(ep(999)), Err(AllocError::Exhausted));
    assert_eq!(
        a.allocate_exact(ip("255.255.255.255"), ep(999)),
        Err(AllocError::Reserved)
    );
    let mut b = Allocator::join(s(2), a.ring().clone());
    assert_eq!(b.allocate(ep(999)), Err(AllocError::Exhausted));
    a.check().unwrap();
}

#[test]
fn no_ring_yet() {
    let mut a = Allocator::join(s(1), Ring::default());
    assert_eq!(a.allocate(ep(1)), Err(AllocError::NoRangeOwned));
    assert_eq!(
        a.allocate_exact(ip("10.0.0.2"), ep(1)),
        Err(AllocError::NoRangeOwned)
    );
    assert_eq!(a.donate(half(n(2))), Err(DonateError::NoSpace));
    assert_eq!(
        a.donate(exact(n(2), "10.0.0.2")),
        Err(DonateError::NotOwner {
            ip: ip("10.0.0.2"),
            owner: None
        })
    );
    assert_eq!(a.hand_off_all(n(2)), Err(HandOffError::NoRing));
    assert_eq!(a.reclaim(n(2), n(1)), Err(ReclaimError::NoRing));
    a.check().unwrap();
}

#[test]
fn need_donation_names_candidates() {
    let (mut a, mut b) = two_hosts();
    let mut c = Allocator::join(s(3), a.ring().clone());
    // C owns nothing; B has never reported to C: its capacity counts.
    assert_eq!(
        c.allocate(ep(1)),
        Err(AllocError::NeedDonation {
            candidates: vec![(n(2), 127), (n(1), 126)]
        })
    );
    for i in 0..126 {
        a.allocate(ep(i)).unwrap();
    }
    b.allocate(ep(500)).unwrap();
    m(&mut c, &a).unwrap();
    m(&mut c, &b).unwrap();
    assert_eq!(
        c.allocate(ep(1000)),
        Err(AllocError::NeedDonation {
            candidates: vec![(n(2), 126)]
        })
    );
    assert_eq!(
        a.allocate(ep(1000)),
        Err(AllocError::NeedDonation {
            candidates: vec![(n(2), 127)]
        })
    );
}

#[test]
fn allocate_exact_cases() {
    let (mut a, _) = two_hosts();
    a.allocate_exact(ip("10.0.0.50"), ep(1)).unwrap();
    a.allocate_exact(ip("10.0.0.50"), ep(1)).unwrap();
    assert_eq!(
        a.allocate_exact(ip("10.0.0.50"), ep(2)),
        Err(AllocError::InUse(ep(1)))
    );
    assert_eq!(
        a.allocate_exact(ip("10.0.0.51"), ep(1)),
        Err(AllocError::EndpointHasAddress(ip("10.0.0.50")))
    );
    assert_eq!(
        a.allocate_exact(ip("10.0.0.200"), ep(2)),
        Err(AllocError::OwnedBy(n(2)))
    );
    assert_eq!(
        a.allocate_exact(ip("192.168.0.1"), ep(2)),
        Err(AllocError::NotInPool)
    );
    for r in ["10.0.0.0", "10.0.0.1", "10.0.0.255"] {
        assert_eq!(a.allocate_exact(ip(r), ep(2)), Err(AllocError::Reserved));
    }
    a.free(ip("10.0.0.50"), 7).unwrap();
    assert_eq!(
        a.allocate_exact(ip("10.0.0.50"), ep(2)),
        Err(AllocError::Quarantined)
    );
    // The dynamic allocator steps around an exact allocation.
    a.allocate_exact(ip("10.0.0.2"), ep(3)).unwrap();
    assert_eq!(a.allocate(ep(4)).unwrap(), ip("10.0.0.3"));
    a.check().unwrap();
}

#[test]
fn free_quarantines_until_released() {
    let mut a = Allocator::create(s(1), pool24());
    let x = a.allocate(ep(1)).unwrap();
    a.allocate(ep(2)).unwrap();
    assert_eq!(a.free(x, 10), Ok(ep(1)));
    assert_eq!(a.free(x, 11), Err(FreeError::NotAllocated(x)));
    assert_eq!(
        a.free(ip("10.0.0.99"), 11),
        Err(FreeError::NotAllocated(ip("10.0.0.99")))
    );
    assert_eq!(a.owned_free_count(), 251);
    assert_eq!(a.allocate(ep(3)).unwrap(), ip("10.0.0.4"));
    assert!(a.release_quarantine(9).is_empty());
    assert_eq!(a.release_quarantine(10), vec![x]);
    assert_eq!(a.allocate(ep(4)).unwrap(), x);
    a.check().unwrap();
}

// ---- donation

#[test]
fn donate_half_splits_largest_free_block() {
    let mut a = Allocator::create(s(1), pool24());
    let g = a.donate(half(n(2))).unwrap();
    assert_eq!(g.from, n(1));
    assert_eq!(g.to, n(2));
    assert_eq!(st(&g.entries), vec![sv("10.0.0.128/25", 2, 2)]);
    // The given block is one version above the parent; the rest keeps
    // the parent's version and signature.
    assert_eq!(
        st(a.ring().entries()),
        [sv("10.0.0.0/25", 1, 1), sv("10.0.0.128/25", 2, 2)]
    );
    a.allocate(ep(1)).unwrap(); // .2
    let g = a.donate(half(n(3))).unwrap();
    // Largest free block of .0/25 with .2 held is .64/26; half is .96/27.
    assert_eq!(st(&g.entries), vec![sv("10.0.0.96/27", 3, 2)]);
    assert_eq!(
        a.ranges_of(n(1)),
        vec![net("10.0.0.0/26"), net("10.0.0.64/27")]
    );
    a.check().unwrap();
}

#[test]
fn donation_never_includes_held_addresses() {
    let mut a = Allocator::create(s(1), pool24());
    for i in 0..8 {
        a.allocate(ep(i)).unwrap();
    }
    a.allocate_exact(ip("10.0.0.77"), ep(100)).unwrap();
    a.allocate_exact(ip("10.0.0.200"), ep(101)).unwrap();
    a.free(ip("10.0.0.200"), 1).unwrap();
    let held: Vec<Ipv4Addr> = a
        .allocations()
        .keys()
        .chain(a.quarantined().keys())
        .copied()
        .collect();
    let mut given = 0u32;
    loop {
        match a.donate(half(n(2))) {
            Ok(g) => {
                for e in &g.entries {
                    assert!(held.iter().all(|h| !e.block.contains(*h)), "{e}");
                    given += a.pool().unwrap().usable_in(e.block);
                }
            }
            Err(DonateError::NoSpace) => break,
            Err(e) => panic!("{e}"),
        }
        a.check().unwrap();
    }
    assert_eq!(a.owned_free_count(), 0);
    assert_eq!(given, 253 - held.len() as u32);
    assert!(a.ranges_of(n(1)).len() as u32 >= 1);
}

#[test]
fn donate_exact_gives_a_slash_32() {
    let (mut a, mut b) = two_hosts();
    assert_eq!(
        a.allocate_exact(ip("10.0.0.130"), ep(1)),
        Err(AllocError::OwnedBy(n(2)))
    );
    let g = b.donate(exact(n(1), "10.0.0.130")).unwrap();
    assert_eq!(st(&g.entries), vec![sv("10.0.0.130/32", 1, 3)]);
    a.accept(&g, g.from, &none).unwrap();
    a.allocate_exact(ip("10.0.0.130"), ep(1)).unwrap();
    assert_eq!(b.allocate(ep(2)).unwrap(), ip("10.0.0.128"));
    all_checks(&[&a, &b]);
}

#[test]
fn donate_errors() {
    let (mut a, mut b) = two_hosts();
    assert_eq!(a.donate(half(n(1))), Err(DonateError::ToSelf));
    assert_eq!(
        a.donate(exact(n(3), "10.0.1.1")),
        Err(DonateError::NotInPool(ip("10.0.1.1")))
    );
    assert_eq!(
        a.donate(exact(n(3), "10.0.0.1")),
        Err(DonateError::Reserved(ip("10.0.0.1")))
    );
    assert_eq!(
        a.donate(exact(n(3), "10.0.0.129")),
        Err(DonateError::NotOwner {
            ip: ip("10.0.0.129"),
            owner: Some(n(2))
        })
    );
    let x = a.allocate(ep(1)).unwrap();
    assert_eq!(
        a.donate(exact(n(3), &x.to_string())),
        Err(DonateError::InUse(x))
    );
    a.free(x, 1).unwrap();
    assert_eq!(
        a.donate(exact(n(3), &x.to_string())),
        Err(DonateError::Quarantined(x))
    );
    let mut i = 10;
    while b.allocate(ep(i)).is_ok() {
        i += 1;
    }
    assert_eq!(b.donate(half(n(3))), Err(DonateError::NoSpace));
}

// ---- accept

#[test]
fn accept_is_idempotent_and_ignores_stale_grants() {
    let mut a = Allocator::create(s(1), pool24());
    let mut b = Allocator::join(s(2), a.ring().clone());
    let mut c = Allocator::join(s(3), a.ring().clone());
    let g1 = a.donate(half(n(2))).unwrap();
    b.accept(&g1, g1.from, &none).unwrap();
    let after = b.clone();
    b.accept(&g1, g1.from, &none).unwrap();
    assert_eq!(b, after);
    let g2 = b.donate(half(n(3))).unwrap();
    // C must know B's ownership to check B's grant: A learns it from B's
    // own view, C from A's.
    let bb = b.clone();
    m(&mut a, &bb).unwrap();
    m(&mut c, &a).unwrap();
    c.accept(&g2, g2.from, &none).unwrap();
    // The old grant arrives again (duplicated, reordered): C keeps its part.
    b.accept(&g1, g1.from, &none).unwrap();
    assert_eq!(b.ranges_of(n(3)), vec![net("10.0.0.192/26")]);
    assert_eq!(b.ranges_of(n(2)), vec![net("10.0.0.128/26")]);
    all_checks(&[&a, &b, &c]);
}

#[test]
fn lost_grant_arrives_by_gossip() {
    let mut a = Allocator::create(s(1), pool24());
    let mut b = Allocator::join(s(2), a.ring().clone());
    let _lost = a.donate(half(n(2))).unwrap();
    assert!(m(&mut b, &a).unwrap());
    assert_eq!(b.ranges_of(n(2)), vec![net("10.0.0.128/25")]);
    assert_eq!(b.allocate(ep(1)).unwrap(), ip("10.0.0.128"));
    all_checks(&[&a, &b]);
}

#[test]
fn accept_errors() {
    let (mut a, mut b) = two_hosts();
    let g = a.donate(half(n(3))).unwrap();
    assert_eq!(
        b.accept(&g, g.from, &none),
        Err(AcceptError::NotForMe(n(3)))
    );
    let mut empty = Allocator::join(s(3), Ring::default());
    assert_eq!(empty.accept(&g, g.from, &none), Err(AcceptError::NoRing));
    let mut c = Allocator::join(s(3), a.ring().clone());
    let mut other_pool = g.clone();
    other_pool.pool = Pool::new(net("10.0.1.0/24"), None, None).unwrap();
    assert!(matches!(
        c.accept(&other_pool, other_pool.from, &none),
        Err(AcceptError::PoolMismatch(_))
    ));
    let mut foreign = g.clone();
    foreign.entries.push(entry("10.0.0.0/30", 1, 9));
    assert!(matches!(
        c.accept(&foreign, foreign.from, &none),
        Err(AcceptError::ForeignEntry(_))
    ));
    let mut bad = g.clone();
    bad.entries = vec![entry("10.0.0.1/30", 3, 9)];
    assert!(matches!(
        c.accept(&bad, bad.from, &none),
        Err(AcceptError::Invalid(_))
    ));
    bad.entries = vec![entry("10.0.0.0/30", 3, 9), entry("10.0.0.0/31", 3, 9)];
    assert!(matches!(
        c.accept(&bad, bad.from, &none),
        Err(AcceptError::Invalid(_))
    ));
    bad.entries = vec![entry("10.0.1.0/30", 3, 9)];
    assert!(matches!(
        c.accept(&bad, bad.from, &none),
        Err(AcceptError::Invalid(_))
    ));
    // Same version as B's own block, different owner: corruption.
    let before = c.clone();
    bad.entries = vec![RangeEntry {
        proof: s(1).sign(net("10.0.0.128/25"), n(3), 2),
        ..entry("10.0.0.128/25", 3, 2)
    }];
    assert!(matches!(
        c.accept(&bad, bad.from, &none),
        Err(AcceptError::Merge(MergeError::Conflict { .. }))
    ));
    assert_eq!(c, before);
    // Written by the recipient itself, not the owner: unauthorised.
    bad.entries = vec![entry("10.0.0.128/26", 3, 7)];
    assert!(matches!(
        c.accept(&bad, bad.from, &none),
        Err(AcceptError::Unauthorized(_))
    ));
    assert_eq!(c, before);
    c.accept(&g, g.from, &none).unwrap();
    all_checks(&[&a, &b, &c]);
}

// ---- leave and reclaim

#[test]
fn hand_off_all_after_detaching_everything() {
    let (mut a, mut b) = two_hosts();
    let x = a.allocate(ep(1)).unwrap();
    assert_eq!(a.hand_off_all(n(1)), Err(HandOffError::ToSelf));
    assert_eq!(
        a.hand_off_all(n(2)),
        Err(HandOffError::Busy {
            allocated: 1,
            quarantined: 0
        })
    );
    a.free(x, 5).unwrap();
    assert_eq!(
        a.hand_off_all(n(2)),
        Err(HandOffError::Busy {
            allocated: 0,
            quarantined: 1
        })
    );
    a.release_quarantine(5);
    let g = a.hand_off_all(n(2)).unwrap();
    assert_eq!(st(&g.entries), vec![sv("10.0.0.0/25", 2, 2)]);
    assert!(a.ranges_of(n(1)).is_empty());
    assert_eq!(a.owned_free_count(), 0);
    b.accept(&g, g.from, &none).unwrap();
    // B joined its two halves into one block, one version up.
    assert_eq!(st(b.ring().entries()), [sv("10.0.0.0/24", 2, 3)]);
    m(&mut a, &b).unwrap();
    m(&mut b, &a).unwrap();
    assert_eq!(a.ring(), b.ring());
    // Leaving twice is harmless.
    assert!(a.hand_off_all(n(2)).unwrap().entries.is_empty());
    all_checks(&[&a, &b]);
}

#[test]
fn reclaim_takes_dead_ranges_once() {
    let (a, _dead_b) = two_hosts();
    let mut c = Allocator::join(s(3), a.ring().clone());
    assert_eq!(c.reclaim(n(3), n(3)), Err(ReclaimError::DeadIsMe));
    assert_eq!(c.reclaim(n(2), n(2)), Err(ReclaimError::DeadIsBy));
    let g = c.reclaim(n(2), n(3)).unwrap();
    assert_eq!(g.from, n(2));
    assert_eq!(st(&g.entries), vec![sv("10.0.0.128/25", 3, 3)]);
    let after = c.clone();
    assert!(c.reclaim(n(2), n(3)).unwrap().entries.is_empty());
    assert_eq!(c, after);
    assert_eq!(c.allocate(ep(1)).unwrap(), ip("10.0.0.128"));
    // Reclaim on behalf of another host: it adopts the grant.
    let mut a2 = a.clone();
    let mut d = Allocator::join(s(4), a.ring().clone());
    let g = a2.reclaim(n(2), n(4)).unwrap();
    // Only once host 2 is gone from the cluster may another node move its
    // space.
    assert!(matches!(
        d.accept(&g, n(1), &none),
        Err(AcceptError::Unauthorized(_))
    ));
    let gone = |x: NodeId| x == n(2);
    d.accept(&g, n(1), &gone).unwrap();
    assert_eq!(d.ranges_of(n(4)), vec![net("10.0.0.128/25")]);
}

fn first_error(rep: MergeReport) -> Result<bool, MergeError> {
    match rep.errors.into_iter().next() {
        Some((_, e)) => Err(e),
        None => Ok(rep.changed),
    }
}

#[test]
fn reclaim_on_two_hosts_is_a_conflict() {
    let (a, _dead_b) = two_hosts();
    let mut c = Allocator::join(s(3), a.ring().clone());
    let mut d = Allocator::join(s(4), a.ring().clone());
    c.reclaim(n(2), n(3)).unwrap();
    d.reclaim(n(2), n(4)).unwrap();
    let before = c.clone();
    let gone = |x: NodeId| x == n(2);
    let dd = d.clone();
    assert!(matches!(
        first_error(c.merge_views(&[(n(4), dd.ring())], &gone)),
        Err(MergeError::Conflict { .. })
    ));
    assert_eq!(c, before);
    assert!(matches!(
        first_error(d.merge_views(&[(n(3), before.ring())], &gone)),
        Err(MergeError::Conflict { .. })
    ));
}

#[test]
fn reclaiming_a_live_host_is_refused_by_it() {
    let (a, mut b) = two_hosts();
    b.allocate(ep(1)).unwrap();
    let mut c = Allocator::join(s(3), a.ring().clone());
    c.reclaim(n(2), n(3)).unwrap();
    let before = b.clone();
    // Host 2 is alive: host 3's reclaim is a forgery, to host 2 and to
    // everyone else who knows host 2 is present.
    let rep = b.merge_views(&[(n(3), c.ring())], &none);
    assert!(rep.forged.len() == 1, "{rep:?}");
    assert_eq!(b.ring().entries(), before.ring().entries());
    let mut a = a;
    let rep = a.merge_views(&[(n(3), c.ring()), (n(2), before.ring())], &none);
    assert!(rep.forged.len() == 1, "{rep:?}");
    assert_eq!(a.ring().owner_of(ip("10.0.0.200")), Some(n(2)));
}

// ---- persistence and checks

#[test]
fn snapshot_round_trip_and_validation() {
    let (mut a, mut b) = two_hosts();
    a.allocate(ep(1)).unwrap();
    let q = a.allocate(ep(2)).unwrap();
    a.free(q, 3).unwrap();
    b.allocate(ep(3)).unwrap();
    let json = serde_json::to_string(&a).unwrap();
    let back: Allocator = serde_json::from_str(&json).unwrap();
    assert_eq!(back, a);
    // Snapshots that break an invariant are refused, with the reason.
    let refused = |a: &Allocator, edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v = serde_json::to_value(a).unwrap();
        edit(&mut v);
        serde_json::from_value::<Allocator>(v)
            .unwrap_err()
            .to_string()
    };
    let why = refused(&b, &|v| v["allocations"][0]["ip"] = "10.0.0.5".into());
    assert!(why.contains("held here but owned by"), "{why}");
    let why = refused(&a, &|v| v["quarantine"][0]["ip"] = "10.0.0.2".into());
    assert!(why.contains("listed twice"), "{why}");
    let why = refused(&a, &|v| v["allocations"][0]["ip"] = "10.0.0.1".into());
    assert!(why.contains("not usable"), "{why}");
    let why = refused(&a, &|v| {
        v["allocations"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"ip": "10.0.0.9", "endpoint": ep(1).to_string()}))
    });
    assert!(why.contains("holds two addresses"), "{why}");
    let why = refused(&a, &|v| v["ring"]["entries"][0]["owner"] = "zz".into());
    assert!(why.contains("hex digits"), "{why}");
}

#[test]
fn cross_host_checks_detect_violations() {
    let mut a = Allocator::create(s(1), pool24());
    let mut twin = Allocator::create(s(2), pool24());
    assert!(matches!(
        check_disjoint([(a.me(), a.ring()), (twin.me(), twin.ring())]),
        Err(InvariantError::DoubleOwner { .. })
    ));
    a.allocate(ep(1)).unwrap();
    twin.allocate(ep(2)).unwrap();
    assert!(matches!(
        check_unique_addresses([&a, &twin]),
        Err(InvariantError::DoubleHeld { .. })
    ));
    assert!(matches!(
        check_converged([(a.me(), a.ring()), (twin.me(), twin.ring())]),
        Err(InvariantError::Diverged { .. })
    ));
    let (a, b) = two_hosts();
    all_checks(&[&a, &b]);
    check_converged([(a.me(), a.ring()), (b.me(), a.ring())]).unwrap();
}

#[test]
fn progress_grows_with_every_change() {
    let (mut a, mut b) = two_hosts();
    let mut last = a.ring().progress();
    let mut step = |a: &Allocator| {
        let p = a.ring().progress();
        assert!(p > last);
        last = p;
    };
    a.allocate(ep(1)).unwrap();
    step(&a);
    a.donate(half(n(3))).unwrap();
    step(&a);
    b.allocate(ep(2)).unwrap();
    m(&mut a, &b).unwrap();
    step(&a);
}
