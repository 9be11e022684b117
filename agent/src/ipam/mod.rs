//! Address ownership: which host may allocate which part of a network's
//! pool (DESIGN.md "State model: who owns what" → "Address ownership").
//! Weave Net's IPAM ring, adapted to pools created at runtime:
//!
//! - the creating host owns the whole pool (`Allocator::create`); network,
//!   broadcast and gateway addresses, and everything outside the ip-range,
//!   are never allocatable;
//! - every block of the ring has one owner and a version; only the owner
//!   changes it (`donate`, `hand_off_all`), bumping the version and signing
//!   the write with its identity key (`proof`); replicas merge by union
//!   and, per address, the higher version, taken only from someone with
//!   authority over it (`Allocator::merge_views`, rule in `ring`); same
//!   version with a different owner is corruption: that view's merge is
//!   refused whole (`MergeError::Conflict`);
//! - a host allocates only inside blocks it owns; otherwise `allocate` says
//!   whom to ask (`AllocError::NeedDonation`) and the owner `donate`s;
//! - the operator reclaims a departed host's blocks (`reclaim`), run once.
//!
//! Sans-IO: no sockets, no clock, no files. The caller persists the
//! `Allocator` (serde; ring and allocations in one value, so one atomic
//! write) after every call that changes it and *before* any effect: before
//! attach returns an address, before a grant leaves, before publishing the
//! ring. Merges of peers' rings only add knowledge and may be persisted
//! lazily. Time is the caller's `tick` (quarantine of freed addresses).

mod allocator;
mod check;
mod pool;
mod proof;
mod ring;
mod wire;

#[cfg(test)]
mod tests;

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::ids::{EndpointId, NodeId};
use wire::text;

pub use allocator::{Allocator, MergeReport, StateError};
pub use check::{InvariantError, check_converged, check_disjoint, check_unique_addresses};
pub use pool::{MAX_PREFIX, MIN_PREFIX, Pool, PoolError};
pub use proof::{Proof, Signer};
pub use ring::{Authority, FreeReport, MergeError, RangeEntry, Refused, Ring, RingError};

/// `allocate` and `allocate_exact`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// No ring yet: this host knows no owner of the network's pool.
    #[error("no ring yet: no host is known to own address space of this network")]
    NoRangeOwned,
    /// No owner (this host included) is known to have a free address.
    #[error("address pool exhausted")]
    Exhausted,
    /// This host's blocks are full (or it has none); these owners reported
    /// free addresses (count as last known here), most first.
    #[error("no free address in this host's ranges; {} other hosts have free space", .candidates.len())]
    NeedDonation { candidates: Vec<(NodeId, u32)> },
    #[error("address in use by endpoint {0}")]
    InUse(EndpointId),
    #[error("address is not in the network's pool (subnet, or ip-range when set)")]
    NotInPool,
    #[error("address is reserved (network, broadcast or gateway)")]
    Reserved,
    /// Another host owns the block; ask it to donate exactly this address.
    #[error("address is in a range owned by host {0}")]
    OwnedBy(NodeId),
    #[error(
        "address was freed recently and is quarantined until every host has dropped the old endpoint"
    )]
    Quarantined,
    #[error("endpoint already holds address {0} in this network")]
    EndpointHasAddress(Ipv4Addr),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FreeError {
    #[error("address {0} is not allocated on this host")]
    NotAllocated(Ipv4Addr),
}

/// `donate`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DonateError {
    #[error("a host cannot donate to itself")]
    ToSelf,
    #[error("no free address in ranges this host owns")]
    NoSpace,
    #[error("address {0} is not in the network's pool")]
    NotInPool(Ipv4Addr),
    #[error("address {0} is reserved (network, broadcast or gateway)")]
    Reserved(Ipv4Addr),
    #[error("address {0} is in use on this host")]
    InUse(Ipv4Addr),
    #[error("address {0} was freed recently and is quarantined")]
    Quarantined(Ipv4Addr),
    #[error("address {ip} is not in a range this host owns (owner: {owner:?})")]
    NotOwner { ip: Ipv4Addr, owner: Option<NodeId> },
}

/// `accept`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcceptError {
    #[error("grant is for host {0}, not this one")]
    NotForMe(NodeId),
    #[error("no ring yet: merge a peer's ring before accepting grants")]
    NoRing,
    #[error("grant is for a different pool ({0})")]
    PoolMismatch(Box<Pool>),
    #[error("grant entry {0} does not name this host as owner")]
    ForeignEntry(Box<RangeEntry>),
    #[error("grant entries are malformed: {0}")]
    Invalid(RingError),
    #[error("grant entry {0} is not signed by someone who owned those addresses")]
    Unauthorized(Box<RangeEntry>),
    #[error(transparent)]
    Merge(#[from] MergeError),
}

/// `hand_off_all`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandOffError {
    #[error("a host cannot hand off to itself")]
    ToSelf,
    #[error("no ring yet: nothing to hand off")]
    NoRing,
    #[error(
        "{allocated} addresses still allocated and {quarantined} quarantined: detach every endpoint and release the quarantine first"
    )]
    Busy {
        allocated: usize,
        quarantined: usize,
    },
}

/// `reclaim`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReclaimError {
    #[error("this host cannot reclaim its own ranges")]
    DeadIsMe,
    #[error("the dead host cannot be the new owner")]
    DeadIsBy,
    #[error("no ring yet: nothing to reclaim")]
    NoRing,
}

/// What a host asks an owner for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Want {
    /// Half of the donor's largest free aligned block.
    Half,
    /// Exactly this address (`--ip`).
    Exact(Ipv4Addr),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DonationRequest {
    /// The asking host, which will own the grant.
    #[serde(with = "text")]
    pub to: NodeId,
    pub want: Want,
}

/// Blocks that changed owner, as written in the writer's ring: entries
/// naming `to`. The recipient `accept`s them; had the message been lost,
/// the same entries reach it by ring gossip.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The previous owner (for `reclaim`, the dead host).
    #[serde(with = "text")]
    pub from: NodeId,
    #[serde(with = "text")]
    pub to: NodeId,
    pub pool: Pool,
    pub entries: Vec<RangeEntry>,
}
