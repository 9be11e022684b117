//! One host's address state for one network: its replica of the ring, the
//! addresses it allocated, and freed addresses in quarantine.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

use super::proof::Signer;
use super::ring::{self, Authority, MergeError, RangeEntry, Refused, Ring, RingError};
use super::wire::text;
use super::{
    AcceptError, AllocError, DonateError, DonationRequest, FreeError, Grant, HandOffError, Pool,
    ReclaimError, Want,
};
use crate::ids::{EndpointId, NetworkId, NodeId};

/// A snapshot or a live state that breaks an invariant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error("address {0} is held but is not usable in the pool")]
    NotUsable(Ipv4Addr),
    #[error("address {ip} is held here but owned by {owner:?}")]
    NotOwned { ip: Ipv4Addr, owner: Option<NodeId> },
    #[error("address {0} is listed twice")]
    Duplicate(Ipv4Addr),
    #[error("endpoint {0} holds two addresses")]
    EndpointTwice(EndpointId),
    #[error("own free report {reported:?} differs from the actual {actual}")]
    StaleReport { reported: Option<u32>, actual: u32 },
}

/// `me`'s state for one network. Serialize it (one atomic write) after
/// every call that changes it, before acting on the result. The signer is
/// not serialised: after loading, `set_signer` before any write (a write
/// without one carries an empty signature that every receiver refuses).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "AllocatorRepr", into = "AllocatorRepr")]
pub struct Allocator {
    me: NodeId,
    signer: Option<Signer>,
    ring: Ring,
    allocations: BTreeMap<Ipv4Addr, EndpointId>,
    /// Freed address → the caller's tick when it was freed.
    quarantine: BTreeMap<Ipv4Addr, u64>,
}

impl PartialEq for Allocator {
    fn eq(&self, o: &Self) -> bool {
        self.me == o.me
            && self.ring == o.ring
            && self.allocations == o.allocations
            && self.quarantine == o.quarantine
    }
}
impl Eq for Allocator {}

/// The outcome of `merge_views`.
#[derive(Debug, Default)]
pub struct MergeReport {
    pub changed: bool,
    /// Newer states refused because the owner this host knows still
    /// claims the addresses first-hand (or this host is the owner), or
    /// because the signature is bad: forgeries. (publisher, refusal)
    pub forged: Vec<(NodeId, Refused)>,
    /// Newer states not (yet) attributable: their writer is not the owner
    /// known here and that owner's own view has not vouched for them yet.
    /// Retried on the next merge; not an attack by itself.
    pub deferred: usize,
    /// Views refused whole (pool mismatch, same-version conflict).
    pub errors: Vec<(NodeId, MergeError)>,
}

impl Allocator {
    /// The creating host: owns the whole pool at version 1.
    pub fn create(signer: Signer, pool: Pool) -> Self {
        let ring = Ring::new(pool, &signer);
        Self::join(signer, ring)
    }

    /// Sets the key writes are signed with (after deserialising).
    pub fn set_signer(&mut self, signer: Signer) {
        self.signer = Some(signer);
    }

    fn network(&self) -> Option<NetworkId> {
        self.signer.as_ref().map(Signer::network)
    }

    /// Writes `block` to `owner` in my ring, signed by me.
    fn assign(&mut self, block: Ipv4Network, owner: NodeId) {
        let signer = match &self.signer {
            Some(s) => s.clone(),
            // No key: an unsigned write nobody will accept (a bug, shown by
            // every receiver's refusal count).
            None => Signer::unsigned(self.me),
        };
        self.ring.assign(block, owner, &signer);
    }

    /// A host that allocated nothing in this network yet, with the ring
    /// peers gave it (or `Ring::default()` before it heard of one).
    ///
    /// Blocks the ring already names `me` as owner of are adopted: they were
    /// handed to us by gossip. A host that lost its IPAM state must
    /// therefore come back under a new identity (DESIGN.md), or it would
    /// re-allocate addresses it handed out before.
    pub fn join(signer: Signer, ring: Ring) -> Self {
        let mut a = Self {
            me: signer.id(),
            signer: Some(signer),
            ring,
            allocations: BTreeMap::new(),
            quarantine: BTreeMap::new(),
        };
        a.refresh_report();
        a
    }

    pub fn me(&self) -> NodeId {
        self.me
    }

    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    pub fn pool(&self) -> Option<&Pool> {
        self.ring.pool()
    }

    pub fn allocations(&self) -> &BTreeMap<Ipv4Addr, EndpointId> {
        &self.allocations
    }

    /// Freed addresses awaiting release, with the tick they were freed at.
    pub fn quarantined(&self) -> &BTreeMap<Ipv4Addr, u64> {
        &self.quarantine
    }

    pub fn address_of(&self, ep: EndpointId) -> Option<Ipv4Addr> {
        self.allocations
            .iter()
            .find(|(_, e)| **e == ep)
            .map(|(ip, _)| *ip)
    }

    pub fn ranges_of(&self, node: NodeId) -> Vec<Ipv4Network> {
        self.ring.ranges_of(node)
    }

    pub fn owners(&self) -> Vec<NodeId> {
        self.ring.owners()
    }

    /// Usable addresses in my blocks that are neither allocated nor
    /// quarantined.
    pub fn owned_free_count(&self) -> u32 {
        let held = (self.allocations.len() + self.quarantine.len()) as u32;
        self.ring.capacity_of(self.me).saturating_sub(held)
    }

    /// The lowest free address of my blocks for `ep` (the address `ep`
    /// already holds, if any: retries after a crash are idempotent).
    pub fn allocate(&mut self, ep: EndpointId) -> Result<Ipv4Addr, AllocError> {
        if let Some(ip) = self.address_of(ep) {
            return Ok(ip);
        }
        if self.ring.is_empty() {
            return Err(AllocError::NoRangeOwned);
        }
        if let Some(ip) = self.lowest_free() {
            self.allocations.insert(ip, ep);
            self.refresh_report();
            return Ok(ip);
        }
        let mut candidates: Vec<(NodeId, u32)> = self
            .ring
            .owners()
            .into_iter()
            .filter(|n| *n != self.me)
            .map(|n| (n, self.ring.free_estimate(n)))
            .filter(|(_, free)| *free > 0)
            .collect();
        candidates.sort_by_key(|(n, free)| (Reverse(*free), *n));
        if candidates.is_empty() {
            return Err(AllocError::Exhausted);
        }
        Err(AllocError::NeedDonation { candidates })
    }

    /// Exactly `ip` for `ep` (`--ip`). Idempotent for the same endpoint.
    pub fn allocate_exact(&mut self, ip: Ipv4Addr, ep: EndpointId) -> Result<(), AllocError> {
        let Some(pool) = self.ring.pool() else {
            return Err(AllocError::NoRangeOwned);
        };
        if !pool.space().contains(ip) {
            return Err(AllocError::NotInPool);
        }
        if pool.is_reserved(ip) {
            return Err(AllocError::Reserved);
        }
        match self.allocations.get(&ip) {
            Some(holder) if *holder == ep => return Ok(()),
            Some(holder) => return Err(AllocError::InUse(*holder)),
            None => {}
        }
        if let Some(held) = self.address_of(ep) {
            return Err(AllocError::EndpointHasAddress(held));
        }
        if self.quarantine.contains_key(&ip) {
            return Err(AllocError::Quarantined);
        }
        match self.ring.owner_of(ip) {
            Some(owner) if owner == self.me => {}
            Some(owner) => return Err(AllocError::OwnedBy(owner)),
            None => return Err(AllocError::NotInPool),
        }
        self.allocations.insert(ip, ep);
        self.refresh_report();
        Ok(())
    }

    /// Frees `ip` into quarantine at the caller's `now_tick`. Returns the
    /// endpoint that held it.
    pub fn free(&mut self, ip: Ipv4Addr, now_tick: u64) -> Result<EndpointId, FreeError> {
        let ep = self
            .allocations
            .remove(&ip)
            .ok_or(FreeError::NotAllocated(ip))?;
        self.quarantine.insert(ip, now_tick);
        Ok(ep)
    }

    /// Makes addresses freed at or before `upto_tick` allocatable again
    /// (the caller knows every host dropped their old endpoints by then).
    pub fn release_quarantine(&mut self, upto_tick: u64) -> Vec<Ipv4Addr> {
        let released: Vec<Ipv4Addr> = self
            .quarantine
            .iter()
            .filter(|(_, t)| **t <= upto_tick)
            .map(|(ip, _)| *ip)
            .collect();
        for ip in &released {
            self.quarantine.remove(ip);
        }
        if !released.is_empty() {
            self.refresh_report();
        }
        released
    }

    /// Gives `req.to` a block of mine: for `Want::Half`, half of my largest
    /// free aligned block; for `Want::Exact(ip)`, the /32 of `ip`. Never an
    /// allocated or quarantined address. The block leaves my free space
    /// here; persist before sending the grant.
    pub fn donate(&mut self, req: DonationRequest) -> Result<Grant, DonateError> {
        if req.to == self.me {
            return Err(DonateError::ToSelf);
        }
        let Some(pool) = self.ring.pool().cloned() else {
            return Err(match req.want {
                Want::Half => DonateError::NoSpace,
                Want::Exact(ip) => DonateError::NotOwner { ip, owner: None },
            });
        };
        let block = match req.want {
            Want::Half => self.half_block(&pool).ok_or(DonateError::NoSpace)?,
            Want::Exact(ip) => {
                if !pool.space().contains(ip) {
                    return Err(DonateError::NotInPool(ip));
                }
                if pool.is_reserved(ip) {
                    return Err(DonateError::Reserved(ip));
                }
                let owner = self.ring.owner_of(ip);
                if owner != Some(self.me) {
                    return Err(DonateError::NotOwner { ip, owner });
                }
                if self.allocations.contains_key(&ip) {
                    return Err(DonateError::InUse(ip));
                }
                if self.quarantine.contains_key(&ip) {
                    return Err(DonateError::Quarantined(ip));
                }
                Ipv4Network::from(ip)
            }
        };
        self.assign(block, req.to);
        self.refresh_report();
        Ok(self.grant(self.me, req.to, &[block], pool))
    }

    /// Adopts a grant naming me, which `sender` stands behind (it came
    /// over the sender's authenticated channel: the donor, or whoever
    /// reclaimed for me). Stale or duplicate grants
    /// change nothing (versions decide); a conflicting one is refused
    /// whole, and so is one with an entry its writer had no right to write
    /// (`departed`: nodes gone from the cluster, whose space anyone's
    /// signed write may move).
    pub fn accept(
        &mut self,
        grant: &Grant,
        sender: NodeId,
        departed: &dyn Fn(NodeId) -> bool,
    ) -> Result<(), AcceptError> {
        if grant.to != self.me {
            return Err(AcceptError::NotForMe(grant.to));
        }
        let Some(pool) = self.ring.pool() else {
            return Err(AcceptError::NoRing);
        };
        if *pool != grant.pool {
            return Err(AcceptError::PoolMismatch(Box::new(grant.pool.clone())));
        }
        if let Some(e) = grant.entries.iter().find(|e| e.owner != self.me) {
            return Err(AcceptError::ForeignEntry(Box::new(*e)));
        }
        let mut entries = grant.entries.clone();
        ring::validate_partial(pool, &mut entries).map_err(AcceptError::Invalid)?;
        let Some(network) = self.network() else {
            return Err(AcceptError::NoRing);
        };
        let auth = Authority {
            network,
            publisher: sender,
            departed,
        };
        let mut trial = self.ring.clone();
        let (_, refused) = trial.merge_granted(&entries, &auth)?;
        if let Some(r) = refused.first() {
            return Err(AcceptError::Unauthorized(Box::new(r.theirs)));
        }
        self.ring = trial;
        self.coalesce();
        self.refresh_report();
        Ok(())
    }

    /// Clean leave: every block of mine to `to`. Refused while anything is
    /// allocated or quarantined (detach all, release the quarantine first).
    pub fn hand_off_all(&mut self, to: NodeId) -> Result<Grant, HandOffError> {
        if to == self.me {
            return Err(HandOffError::ToSelf);
        }
        let Some(pool) = self.ring.pool().cloned() else {
            return Err(HandOffError::NoRing);
        };
        if !self.allocations.is_empty() || !self.quarantine.is_empty() {
            return Err(HandOffError::Busy {
                allocated: self.allocations.len(),
                quarantined: self.quarantine.len(),
            });
        }
        let blocks = self.ring.ranges_of(self.me);
        for b in &blocks {
            self.assign(*b, to);
        }
        self.refresh_report();
        Ok(self.grant(self.me, to, &blocks, pool))
    }

    /// Operator command: every block of `dead` to `by` (usually `me`), one
    /// version up, signed by me. Receivers take it only once they consider
    /// `dead` departed (left, removed or forgotten): any member may reclaim
    /// a departed node's space, no one a present node's. Run it once, on one host, after the dead host's blocks
    /// have stopped changing in this replica: running it on two hosts with
    /// different `by` writes two owners at one version, which every merge
    /// then refuses as `MergeError::Conflict`; a "dead" host that is alive
    /// refuses the result as `MergeError::Revoked`. Running it again is a
    /// no-op (the dead host owns nothing any more).
    pub fn reclaim(&mut self, dead: NodeId, by: NodeId) -> Result<Grant, ReclaimError> {
        if dead == self.me {
            return Err(ReclaimError::DeadIsMe);
        }
        if dead == by {
            return Err(ReclaimError::DeadIsBy);
        }
        let Some(pool) = self.ring.pool().cloned() else {
            return Err(ReclaimError::NoRing);
        };
        let blocks = self.ring.ranges_of(dead);
        for b in &blocks {
            self.assign(*b, by);
        }
        if by == self.me {
            self.coalesce();
        }
        self.refresh_report();
        Ok(self.grant(dead, by, &blocks, pool))
    }

    /// Merges the views peers published (`(publisher, ring)`, each taken
    /// from the publisher's own table), under the attribution rule of
    /// `ring`: a newer state is taken only from its writer's authority.
    /// A host that knows no ring yet bootstraps from all views at once
    /// (`Ring::bootstrap`). Views are merged until nothing changes, so an
    /// owner's first-hand view unlocks the states relayed by others in the
    /// same call. `departed`: nodes gone from the cluster.
    pub fn merge_views(
        &mut self,
        views: &[(NodeId, &Ring)],
        departed: &dyn Fn(NodeId) -> bool,
    ) -> MergeReport {
        let mut report = MergeReport::default();
        let Some(network) = self.network() else {
            return report;
        };
        let views: Vec<(NodeId, &Ring)> = views
            .iter()
            .filter(|(p, r)| *p != self.me && !r.is_empty())
            .copied()
            .collect();
        if self.ring.is_empty()
            && let Some(r) = Ring::bootstrap(&views, network)
        {
            self.ring = r;
            report.changed = true;
        }
        let mut refused: Vec<(NodeId, Refused)> = Vec::new();
        for _round in 0..=views.len() {
            let mut moved = false;
            refused.clear();
            report.errors.clear();
            for (publisher, ring) in &views {
                let auth = Authority {
                    network,
                    publisher: *publisher,
                    departed,
                };
                match self.ring.merge(ring, &auth) {
                    Ok((changed, r)) => {
                        moved |= changed;
                        refused.extend(r.into_iter().map(|r| (*publisher, r)));
                    }
                    Err(e) => report.errors.push((*publisher, e)),
                }
            }
            report.changed |= moved;
            if !moved {
                break;
            }
        }
        for (publisher, r) in refused {
            // Still refused after every view merged: forged if the owner we
            // know stands by the addresses first-hand (or is us).
            let owner = r.ours.owner;
            let claimed = owner == self.me
                || views
                    .iter()
                    .any(|(p, ring)| *p == owner && claims(ring, owner, &r.ours));
            if r.bad_proof || claimed {
                report.forged.push((publisher, r));
            } else {
                report.deferred += 1;
            }
        }
        report.changed |= self.refresh_report();
        report
    }

    /// Every invariant of one host's state (tests; cheap enough to run on
    /// load).
    pub fn check(&self) -> Result<(), StateError> {
        self.ring.check()?;
        self.validate()?;
        let actual = self.owned_free_count();
        let reported = self.ring.reports().get(&self.me).map(|r| r.free);
        let owner = !self.ring.ranges_of(self.me).is_empty();
        if owner && reported != Some(actual) {
            return Err(StateError::StaleReport { reported, actual });
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), StateError> {
        let held = self.allocations.keys().chain(self.quarantine.keys());
        for ip in held {
            let Some(pool) = self.ring.pool() else {
                return Err(StateError::NotOwned {
                    ip: *ip,
                    owner: None,
                });
            };
            if !pool.is_usable(*ip) {
                return Err(StateError::NotUsable(*ip));
            }
            let owner = self.ring.owner_of(*ip);
            if owner != Some(self.me) {
                return Err(StateError::NotOwned { ip: *ip, owner });
            }
            if self.allocations.contains_key(ip) && self.quarantine.contains_key(ip) {
                return Err(StateError::Duplicate(*ip));
            }
        }
        let mut eps: Vec<EndpointId> = self.allocations.values().copied().collect();
        eps.sort();
        if let Some(w) = eps.windows(2).find(|w| w[0] == w[1]) {
            return Err(StateError::EndpointTwice(w[0]));
        }
        Ok(())
    }

    /// Publishes my free count in my replica when it changed.
    fn refresh_report(&mut self) -> bool {
        if self.ring.is_empty() {
            return false;
        }
        let free = self.owned_free_count();
        self.ring.report(self.me, free)
    }

    fn is_held(&self, ip: Ipv4Addr) -> bool {
        self.allocations.contains_key(&ip) || self.quarantine.contains_key(&ip)
    }

    fn holds_any(&self, block: Ipv4Network) -> bool {
        let r = block.network()..=block.broadcast();
        self.allocations.range(r.clone()).next().is_some()
            || self.quarantine.range(r).next().is_some()
    }

    fn lowest_free(&self) -> Option<Ipv4Addr> {
        let pool = self.ring.pool()?;
        for e in self.ring.entries().iter().filter(|e| e.owner == self.me) {
            for n in ring::first(e.block)..ring::end(e.block) {
                let ip = Ipv4Addr::from(n as u32);
                if !pool.is_reserved(ip) && !self.is_held(ip) {
                    return Some(ip);
                }
            }
        }
        None
    }

    /// Half of my largest free aligned block (highest address on ties, so
    /// I keep allocating low), or the block itself when it is one address.
    fn half_block(&self, pool: &Pool) -> Option<Ipv4Network> {
        let mut best = None;
        for e in self.ring.entries().iter().filter(|e| e.owner == self.me) {
            self.largest_free(e.block, pool, &mut best);
        }
        let best = best?;
        if best.prefix() >= 32 {
            return Some(best);
        }
        let (lo, hi) = ring::halves(best);
        Some(if pool.usable_in(hi) > 0 { hi } else { lo })
    }

    fn largest_free(&self, block: Ipv4Network, pool: &Pool, best: &mut Option<Ipv4Network>) {
        // Larger first, then higher: nothing inside `block` can beat a best
        // that is larger, or as large and higher.
        let key = |b: Ipv4Network| (b.prefix(), Reverse(ring::first(b)));
        if best.is_some_and(|b| key(b) <= key(block)) {
            return;
        }
        if !self.holds_any(block) {
            if pool.usable_in(block) > 0 {
                *best = Some(block);
            }
            return;
        }
        if block.prefix() < 32 {
            let (lo, hi) = ring::halves(block);
            self.largest_free(hi, pool, best);
            self.largest_free(lo, pool, best);
        }
    }

    /// Joins adjacent blocks of mine into larger aligned ones (a write:
    /// version above all joined ones), so the ring stays small as space
    /// moves back and forth.
    fn coalesce(&mut self) {
        loop {
            let mut runs: Vec<(u64, u64)> = Vec::new();
            for e in self.ring.entries().iter().filter(|e| e.owner == self.me) {
                let (s, t) = (ring::first(e.block), ring::end(e.block));
                match runs.last_mut() {
                    Some(r) if r.1 == s => r.1 = t,
                    _ => runs.push((s, t)),
                }
            }
            let mut target = None;
            for (s, t) in runs {
                ring::decompose(s, t, |b| {
                    let pieces = self
                        .ring
                        .entries()
                        .iter()
                        .filter(|e| e.block.is_subnet_of(b))
                        .count();
                    if target.is_none() && pieces > 1 {
                        target = Some(b);
                    }
                });
            }
            match target {
                Some(b) => self.assign(b, self.me),
                None => return,
            }
        }
    }

    fn grant(&self, from: NodeId, to: NodeId, blocks: &[Ipv4Network], pool: Pool) -> Grant {
        let entries = self
            .ring
            .entries()
            .iter()
            .filter(|e| e.owner == to && blocks.iter().any(|b| ring::overlaps(*b, e.block)))
            .copied()
            .collect();
        Grant {
            from,
            to,
            pool,
            entries,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct AllocationRepr {
    ip: Ipv4Addr,
    #[serde(with = "text")]
    endpoint: EndpointId,
}

#[derive(Serialize, Deserialize)]
struct QuarantineRepr {
    ip: Ipv4Addr,
    since: u64,
}

#[derive(Serialize, Deserialize)]
struct AllocatorRepr {
    #[serde(with = "text")]
    me: NodeId,
    ring: Ring,
    #[serde(default)]
    allocations: Vec<AllocationRepr>,
    #[serde(default)]
    quarantine: Vec<QuarantineRepr>,
}

impl TryFrom<AllocatorRepr> for Allocator {
    type Error = StateError;
    fn try_from(r: AllocatorRepr) -> Result<Self, StateError> {
        let mut a = Self {
            me: r.me,
            signer: None,
            ring: r.ring,
            allocations: BTreeMap::new(),
            quarantine: BTreeMap::new(),
        };
        for x in r.allocations {
            if a.allocations.insert(x.ip, x.endpoint).is_some() {
                return Err(StateError::Duplicate(x.ip));
            }
        }
        for x in r.quarantine {
            if a.quarantine.insert(x.ip, x.since).is_some() {
                return Err(StateError::Duplicate(x.ip));
            }
        }
        a.validate()?;
        a.refresh_report();
        Ok(a)
    }
}

impl From<Allocator> for AllocatorRepr {
    fn from(a: Allocator) -> Self {
        Self {
            me: a.me,
            ring: a.ring,
            allocations: a
                .allocations
                .into_iter()
                .map(|(ip, endpoint)| AllocationRepr { ip, endpoint })
                .collect(),
            quarantine: a
                .quarantine
                .into_iter()
                .map(|(ip, since)| QuarantineRepr { ip, since })
                .collect(),
        }
    }
}

/// Whether `ring` (published by `owner`) still gives `owner` some address
/// of `ours` at `ours.version` or later.
fn claims(ring: &Ring, owner: NodeId, ours: &RangeEntry) -> bool {
    ring.entries().iter().any(|e| {
        e.owner == owner && e.version >= ours.version && ring::overlaps(e.block, ours.block)
    })
}
