//! Invariants across hosts, for the simulation and for the agent's own
//! diagnostics (e.g. comparing replicas pulled from peers).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use super::allocator::Allocator;
use super::ring::{self, Ring};
use crate::ids::NodeId;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvariantError {
    #[error("{a} owns {block_a} and {b} owns {block_b} by their own rings: they overlap")]
    DoubleOwner {
        a: NodeId,
        block_a: Ipv4Network,
        b: NodeId,
        block_b: Ipv4Network,
    },
    #[error("address {ip} is held (allocated or quarantined) by both {a} and {b}")]
    DoubleHeld { ip: Ipv4Addr, a: NodeId, b: NodeId },
    #[error("replicas of {a} and {b} differ")]
    Diverged { a: NodeId, b: NodeId },
}

/// No address is owned by two hosts according to those hosts' own rings:
/// for each `(node, ring)`, the blocks `ring` gives to `node` (each address
/// at its highest version, as the ring is canonical) must be disjoint from
/// every other listed node's. List each host once.
pub fn check_disjoint<'a>(
    views: impl IntoIterator<Item = (NodeId, &'a Ring)>,
) -> Result<(), InvariantError> {
    let mut claims: Vec<(u64, u64, NodeId, Ipv4Network)> = Vec::new();
    for (node, ring) in views {
        for b in ring.ranges_of(node) {
            claims.push((ring::first(b), ring::end(b), node, b));
        }
    }
    claims.sort();
    // The claim reaching furthest so far: any later-starting claim that
    // begins before its end overlaps it.
    let mut reach: Option<(u64, NodeId, Ipv4Network)> = None;
    for (start, end, node, block) in claims {
        if let Some((r_end, r_node, r_block)) = reach
            && start < r_end
        {
            return Err(InvariantError::DoubleOwner {
                a: r_node,
                block_a: r_block,
                b: node,
                block_b: block,
            });
        }
        if reach.is_none_or(|(r_end, _, _)| end > r_end) {
            reach = Some((end, node, block));
        }
    }
    Ok(())
}

/// No address is allocated or quarantined on two hosts.
pub fn check_unique_addresses<'a>(
    allocators: impl IntoIterator<Item = &'a Allocator>,
) -> Result<(), InvariantError> {
    let mut seen: BTreeMap<Ipv4Addr, NodeId> = BTreeMap::new();
    for a in allocators {
        for ip in a.allocations().keys().chain(a.quarantined().keys()) {
            if let Some(other) = seen.insert(*ip, a.me()) {
                return Err(InvariantError::DoubleHeld {
                    ip: *ip,
                    a: other,
                    b: a.me(),
                });
            }
        }
    }
    Ok(())
}

/// All replicas are equal (after healing and quiescent gossip).
pub fn check_converged<'a>(
    rings: impl IntoIterator<Item = (NodeId, &'a Ring)>,
) -> Result<(), InvariantError> {
    let mut it = rings.into_iter();
    let Some((a, first)) = it.next() else {
        return Ok(());
    };
    for (b, ring) in it {
        if ring != first {
            return Err(InvariantError::Diverged { a, b });
        }
    }
    Ok(())
}
