//! Owner-bound endpoint records (sans-IO): a row of the MAC/IP/VTEP table
//! is used only if its owner could have written it honestly (DESIGN.md
//! "Trust and keys"). Records arrive over the owner's authenticated channel,
//! but an authenticated member can still lie about what it owns; this
//! checks each row against what the receiver knows:
//! - its VTEP is its owner's published (signed) data-path address;
//! - its IP lies in ranges its owner holds in the network's IPAM ring (when
//!   this host knows the ring);
//! - no other endpoint of the network holds its IP or MAC. A MAC clash is
//!   won by the endpoint whose MAC is the one derived from its own IP (only
//!   the IP's holder can have it); otherwise every claimant is refused.
//!   So a clash is resolved the same way on every host, and never
//!   redirects traffic.
//!
//! Refused rows stay in the replica (a later ring or record can make them
//! valid) and are shown with their reason; they are never programmed.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;

use ipnetwork::Ipv4Network;

use super::EndpointView;
use crate::ids::{EndpointId, MacAddr, NetworkId, NodeId};

/// What the receiver knows about owners.
#[derive(Debug, Default, Clone)]
pub struct Owners {
    /// Each node's published data-path address.
    pub vteps: HashMap<NodeId, IpAddr>,
    /// Per network, the ranges each node holds in the ring as merged here.
    pub ranges: HashMap<NetworkId, BTreeMap<NodeId, Vec<Ipv4Network>>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    UnknownOwner,
    ForeignVtep { published: IpAddr },
    OutsideRanges,
    IpClash(EndpointId),
    MacClash(EndpointId),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownOwner => write!(f, "owner is not a known member"),
            Self::ForeignVtep { published } => {
                write!(f, "VTEP is not its owner's data-path address {published}")
            }
            Self::OutsideRanges => write!(f, "IP is outside the address ranges its owner holds"),
            Self::IpClash(other) => write!(f, "IP also claimed by endpoint {}", other.short()),
            Self::MacClash(other) => write!(f, "MAC also claimed by endpoint {}", other.short()),
        }
    }
}

/// Splits `endpoints` into the rows that may be used and the refused ones.
pub fn vet(
    endpoints: Vec<EndpointView>,
    owners: &Owners,
) -> (Vec<EndpointView>, Vec<(EndpointView, Refusal)>) {
    let mut ok = Vec::new();
    let mut refused = Vec::new();
    for e in endpoints {
        match check_owner(&e, owners) {
            Ok(()) => ok.push(e),
            Err(r) => refused.push((e, r)),
        }
    }
    // Clashes, deterministic on every host: sort so the same row wins.
    ok.sort_by_key(|e| (e.record.created_at_ms, e.id));
    let mut by_ip: HashMap<(NetworkId, std::net::Ipv4Addr), EndpointId> = HashMap::new();
    let mut kept = Vec::new();
    for e in ok {
        match by_ip.get(&(e.network, e.ip)) {
            // Both passed their owners' range check, so the same owner holds
            // the IP twice: keep the older row.
            Some(first) => refused.push((e.clone(), Refusal::IpClash(*first))),
            None => {
                by_ip.insert((e.network, e.ip), e.id);
                kept.push(e);
            }
        }
    }
    let mut by_mac: HashMap<(NetworkId, MacAddr), Vec<usize>> = HashMap::new();
    for (i, e) in kept.iter().enumerate() {
        by_mac.entry((e.network, e.mac)).or_default().push(i);
    }
    let mut drop = vec![None; kept.len()];
    for idxs in by_mac.values().filter(|v| v.len() > 1) {
        let derived: Vec<usize> = idxs
            .iter()
            .copied()
            .filter(|&i| kept[i].mac == MacAddr::from_ipv4(kept[i].ip))
            .collect();
        let winner = match derived.as_slice() {
            [one] => Some(*one),
            _ => None,
        };
        for &i in idxs {
            if Some(i) != winner {
                let other = idxs.iter().find(|&&j| j != i).map(|&j| kept[j].id);
                drop[i] = other.map(Refusal::MacClash);
            }
        }
    }
    let mut accepted = Vec::new();
    for (e, d) in kept.into_iter().zip(drop) {
        match d {
            Some(r) => refused.push((e, r)),
            None => accepted.push(e),
        }
    }
    (accepted, refused)
}

fn check_owner(e: &EndpointView, owners: &Owners) -> Result<(), Refusal> {
    let Some(vtep) = owners.vteps.get(&e.owner) else {
        return Err(Refusal::UnknownOwner);
    };
    if *vtep != e.vtep {
        return Err(Refusal::ForeignVtep { published: *vtep });
    }
    if let Some(ring) = owners.ranges.get(&e.network).filter(|r| !r.is_empty()) {
        let held = ring
            .get(&e.owner)
            .is_some_and(|blocks| blocks.iter().any(|b| b.contains(e.ip)));
        if !held {
            return Err(Refusal::OutsideRanges);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ovl_proto::records::EndpointRecord;
    use std::net::Ipv4Addr;

    fn ep(owner: u8, id: u8, ip: [u8; 4], mac: Option<MacAddr>, vtep: [u8; 4]) -> EndpointView {
        let ip = Ipv4Addr::from(ip);
        let mac = mac.unwrap_or_else(|| MacAddr::from_ipv4(ip));
        let vtep = IpAddr::V4(Ipv4Addr::from(vtep));
        EndpointView {
            id: EndpointId::from_bytes([id; 16]),
            network: NetworkId::from_bytes([9; 16]),
            owner: NodeId::from_bytes([owner; 16]),
            name: format!("e{id}"),
            ip,
            prefix_len: 24,
            mac,
            vtep,
            record: EndpointRecord {
                created_at_ms: u64::from(id),
                ..Default::default()
            },
        }
    }

    fn owners() -> Owners {
        let mut o = Owners::default();
        for n in 1..=3u8 {
            o.vteps.insert(
                NodeId::from_bytes([n; 16]),
                IpAddr::V4(Ipv4Addr::new(198, 18, 0, 10 + n)),
            );
        }
        let mut ring = BTreeMap::new();
        for n in 1..=3u8 {
            ring.insert(
                NodeId::from_bytes([n; 16]),
                vec![format!("198.19.0.{}/26", (n - 1) * 64).parse().unwrap()],
            );
        }
        o.ranges.insert(NetworkId::from_bytes([9; 16]), ring);
        o
    }

    #[test]
    fn foreign_vteps_ips_outside_ranges_and_unknown_owners_are_refused() {
        let eps = vec![
            ep(1, 1, [198, 19, 0, 5], None, [198, 18, 0, 11]),
            // Node 2 claims node 1's VTEP.
            ep(2, 2, [198, 19, 0, 70], None, [198, 18, 0, 11]),
            // Node 3 claims an IP in node 1's range.
            ep(3, 3, [198, 19, 0, 6], None, [198, 18, 0, 13]),
            ep(4, 4, [198, 19, 0, 200], None, [198, 18, 0, 14]),
        ];
        let (ok, refused) = vet(eps, &owners());
        assert_eq!(
            ok.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            ["e1"]
        );
        let reasons: Vec<(String, Refusal)> =
            refused.into_iter().map(|(e, r)| (e.name, r)).collect();
        assert!(reasons.contains(&(
            "e2".into(),
            Refusal::ForeignVtep {
                published: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 12))
            }
        )));
        assert!(reasons.contains(&("e3".into(), Refusal::OutsideRanges)));
        assert!(reasons.contains(&("e4".into(), Refusal::UnknownOwner)));
    }

    #[test]
    fn a_stolen_mac_never_wins_over_the_ip_derived_one() {
        let victim = ep(1, 1, [198, 19, 0, 5], None, [198, 18, 0, 11]);
        // Older, but with the victim's MAC on its own IP.
        let mut thief = ep(2, 0, [198, 19, 0, 70], Some(victim.mac), [198, 18, 0, 12]);
        thief.record.created_at_ms = 0;
        let (ok, refused) = vet(vec![thief.clone(), victim.clone()], &owners());
        assert_eq!(ok, vec![victim.clone()]);
        assert_eq!(refused, vec![(thief, Refusal::MacClash(victim.id))]);
        // Two custom MACs that clash: neither is used, on every host alike.
        let m = MacAddr([2, 0, 0, 0, 0, 1]);
        let a = ep(1, 1, [198, 19, 0, 5], Some(m), [198, 18, 0, 11]);
        let b = ep(2, 2, [198, 19, 0, 70], Some(m), [198, 18, 0, 12]);
        let (ok, refused) = vet(vec![b, a], &owners());
        assert!(ok.is_empty());
        assert_eq!(refused.len(), 2);
    }

    #[test]
    fn without_a_known_ring_only_the_range_check_is_skipped() {
        let mut o = owners();
        o.ranges.clear();
        let eps = vec![
            ep(1, 1, [198, 19, 0, 5], None, [198, 18, 0, 11]),
            ep(3, 3, [198, 19, 0, 6], None, [198, 18, 0, 13]),
            ep(2, 2, [198, 19, 0, 5], None, [198, 18, 0, 12]),
        ];
        let (ok, refused) = vet(eps, &o);
        assert_eq!(ok.len(), 2);
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].0.name, "e2");
        assert!(matches!(refused[0].1, Refusal::IpClash(_)));
    }
}
