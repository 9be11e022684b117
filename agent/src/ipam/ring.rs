//! The ring: one network's address space partitioned into aligned CIDR
//! blocks, each with exactly one owner and a version (DESIGN.md "Address
//! ownership").
//!
//! Semantics are pointwise: every address has the `(owner, version)` of the
//! entry covering it, and a merge takes, per address, the higher version.
//! Writes (`assign`) give the written block one more than the highest
//! version it covers, so each address's history is a chain of strictly
//! increasing versions, each written by the previous owner. Two different
//! owners at the same version of one address therefore means corruption
//! (or the operator reclaiming on two hosts): the merge is refused whole.
//!
//! **Attribution** (DESIGN.md "Trust and keys"). Every entry carries the
//! signed write behind it (`proof::Proof`: writer, its key, signature over
//! network, block, owner, version). A receiver takes a newer state for an
//! address it holds as `(O, v)` only if the proof verifies and one of:
//! - the writer is `O` (the owner's own rewrite, or its grant);
//! - the view comes first-hand from `O` (the publisher of the view, over
//!   its authenticated channel, is `O`): `O` either checked the newer
//!   state itself or, if `O` lies, the addresses were `O`'s to give. This
//!   is what lets a replica that missed steps catch up (`v` → `v+2`
//!   written by someone it never knew owned them);
//! - `O` has departed (left, removed, forgotten by the cluster): its space
//!   is whoever's the newest signed write says (hand-offs and reclaims).
//!
//! Anything else is refused for that address (`Refused`), the rest of the
//! view still merges. So a member can only ever move addresses a receiver
//! attributes to that member or to a departed node. For honest writers the
//! merge stays order-independent: every refused newer state is eventually
//! offered again first-hand by the owner the receiver knows.
//!
//! The representation is canonical (maximal aligned blocks of equal owner,
//! version and proof, sorted), so equal meanings are equal values and `==`
//! on rings is the convergence check.
//!
//! Wire format (JSON, `RingRepr`): `{"pool":…, "entries":[{"block":
//! "a.b.c.d/n", "owner":hex, "version":n, "proof":{"block":"a.b.c.d/m",
//! "writer":hex, "pk":hex32, "sig":hex64}}], "reports":[…]}`. Rings from
//! before signed writes (no `proof`) do not parse: there is no
//! compatibility with them.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

use super::pool::Pool;
use super::proof::{Proof, Signer};
use super::wire::text;
use crate::ids::{NetworkId, NodeId};

/// One block of the ring. Fields are public for reading; a `Ring` only ever
/// holds validated entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RangeEntry {
    #[serde(with = "text")]
    pub block: Ipv4Network,
    #[serde(with = "text")]
    pub owner: NodeId,
    pub version: u64,
    /// The signed write behind `(block, owner, version)`.
    pub proof: Proof,
}

impl fmt::Display for RangeEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} v{} owner {}", self.block, self.version, self.owner)
    }
}

/// An owner's own count of its free addresses, single-writer like a range:
/// only `node` writes it, bumping `seq`. Merges keep the larger `(seq, free)`.
/// A ring keeps reports of current owners only, so departed hosts leave no
/// trace once their blocks are reclaimed (the owner re-asserts its report
/// whenever a replica shows it a different one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct FreeReport {
    pub seq: u64,
    pub free: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("ring has entries but no pool")]
    EntriesWithoutPool,
    #[error("block {0} has host bits set")]
    Misaligned(Ipv4Network),
    #[error("block {block} lies outside the pool's space {space}")]
    OutsidePool {
        block: Ipv4Network,
        space: Ipv4Network,
    },
    #[error("blocks {0} and {1} overlap")]
    Overlap(Ipv4Network, Ipv4Network),
    #[error("addresses {from} to {to} have no owner")]
    Gap { from: Ipv4Addr, to: Ipv4Addr },
    #[error("ring is not in canonical form")]
    NotCanonical,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MergeError {
    #[error("rings are for different pools ({ours} here, {theirs} remote)")]
    PoolMismatch { ours: Box<Pool>, theirs: Box<Pool> },
    #[error(
        "replicas disagree ({ours} here, {theirs} remote): same version, different owner; ring corrupt or reclaimed twice, merge refused"
    )]
    Conflict {
        ours: Box<RangeEntry>,
        theirs: Box<RangeEntry>,
    },
}

/// What the receiver knows about a view or grant it merges.
#[derive(Clone, Copy)]
pub struct Authority<'a> {
    pub network: NetworkId,
    /// Who stands behind the remote entries first-hand: the publisher of
    /// the view (its own table) or the donor of a grant.
    pub publisher: NodeId,
    /// Nodes that left, were removed or are forgotten by the cluster.
    pub departed: &'a dyn Fn(NodeId) -> bool,
}

/// A newer remote state the receiver did not take for some addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub ours: RangeEntry,
    pub theirs: RangeEntry,
    /// The signature does not verify (or its key is not the writer's).
    pub bad_proof: bool,
}

/// One network's ring. `Ring::default()` is the empty ring of a node that
/// has not heard of the network's pool yet.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "RingRepr", into = "RingRepr")]
pub struct Ring {
    pool: Option<Pool>,
    /// Sorted, disjoint, covering exactly `pool.space()`, canonical.
    entries: Vec<RangeEntry>,
    reports: BTreeMap<NodeId, FreeReport>,
}

/// Addresses in a block.
fn size(block: Ipv4Network) -> u64 {
    1u64 << (32 - u32::from(block.prefix().min(32)))
}

/// First address of a block, as an integer.
pub(crate) fn first(block: Ipv4Network) -> u64 {
    u64::from(u32::from(block.ip())) & !(size(block) - 1)
}

/// One past the last address of a block (2^32 for the top block).
pub(crate) fn end(block: Ipv4Network) -> u64 {
    first(block) + size(block)
}

fn addr(n: u64) -> Ipv4Addr {
    Ipv4Addr::from(n.min(u64::from(u32::MAX)) as u32)
}

fn block_at(start: u64, prefix: u8) -> Ipv4Network {
    Ipv4Network::new(addr(start), prefix).unwrap_or_else(|_| Ipv4Network::from(addr(start)))
}

/// Calls `out` with the maximal aligned blocks that exactly cover
/// `[start, end)`.
pub(crate) fn decompose(mut start: u64, end: u64, mut out: impl FnMut(Ipv4Network)) {
    while start < end {
        let mut size: u64 = 1 << start.trailing_zeros().min(32);
        while start + size > end {
            size >>= 1;
        }
        out(block_at(start, 32 - size.trailing_zeros() as u8));
        start += size;
    }
}

/// The two halves of a block (callers ensure its prefix is below 32).
pub(crate) fn halves(block: Ipv4Network) -> (Ipv4Network, Ipv4Network) {
    let p = block.prefix().saturating_add(1).min(32);
    let half = (end(block) - first(block)) / 2;
    (block_at(first(block), p), block_at(first(block) + half, p))
}

/// Whether two aligned blocks share an address.
pub(crate) fn overlaps(a: Ipv4Network, b: Ipv4Network) -> bool {
    first(a) < end(b) && first(b) < end(a)
}

/// Sorts untrusted partial entries and checks they are aligned, inside the
/// pool's space and disjoint (a grant's entries).
pub(crate) fn validate_partial(pool: &Pool, entries: &mut [RangeEntry]) -> Result<(), RingError> {
    let space = pool.space();
    entries.sort_by_key(|e| first(e.block));
    let mut prev: Option<Ipv4Network> = None;
    for e in entries.iter() {
        if e.block.ip() != e.block.network() {
            return Err(RingError::Misaligned(e.block));
        }
        if !e.block.is_subnet_of(space) {
            return Err(RingError::OutsidePool {
                block: e.block,
                space,
            });
        }
        if let Some(p) = prev.filter(|p| end(*p) > first(e.block)) {
            return Err(RingError::Overlap(p, e.block));
        }
        prev = Some(e.block);
    }
    Ok(())
}

/// A half-open run of addresses with one owner and version.
#[derive(Debug, Clone, Copy)]
struct Seg {
    start: u64,
    end: u64,
    owner: NodeId,
    version: u64,
    proof: Proof,
}

impl Seg {
    fn of(e: &RangeEntry) -> Self {
        Self {
            start: first(e.block),
            end: end(e.block),
            owner: e.owner,
            version: e.version,
            proof: e.proof,
        }
    }

    fn same_state(&self, o: &Seg) -> bool {
        self.owner == o.owner && self.version == o.version && self.proof == o.proof
    }
}

/// Canonical entries from sorted, disjoint segments: adjacent runs with the
/// same owner, version and proof are joined, then cut into maximal aligned
/// blocks (all inside the proof's signed block, which covered each run).
fn canonical(segs: impl IntoIterator<Item = Seg>) -> Vec<RangeEntry> {
    let mut out = Vec::new();
    let mut emit = |r: Seg| {
        decompose(r.start, r.end, |block| {
            out.push(RangeEntry {
                block,
                owner: r.owner,
                version: r.version,
                proof: r.proof,
            })
        })
    };
    let mut run: Option<Seg> = None;
    for s in segs {
        match &mut run {
            Some(r) if r.end == s.start && r.same_state(&s) => r.end = s.end,
            _ => {
                if let Some(r) = run.replace(s) {
                    emit(r);
                }
            }
        }
    }
    if let Some(r) = run {
        emit(r);
    }
    out
}

/// Pointwise merge of a complete `local` partition with sorted, disjoint
/// (possibly partial) `remote` entries, under the attribution rule of the
/// module comment. Returns the merged entries and what was refused.
fn merge_entries(
    local: &[RangeEntry],
    remote: &[RangeEntry],
    auth: &Authority<'_>,
) -> Result<(Vec<RangeEntry>, Vec<Refused>), MergeError> {
    let mut segs = Vec::with_capacity(local.len() + remote.len());
    let mut refused: Vec<Refused> = Vec::new();
    // Each remote proof is checked at most once, and only when it would win.
    let mut verified: Vec<Option<bool>> = vec![None; remote.len()];
    let mut j = 0;
    for l in local {
        let (mut p, lend) = (first(l.block), end(l.block));
        while p < lend {
            while j < remote.len() && end(remote[j].block) <= p {
                j += 1;
            }
            let (stop, winner) = match remote.get(j) {
                Some(r) if first(r.block) <= p => {
                    let stop = lend.min(end(r.block));
                    (stop, pick(l, r, auth, &mut verified[j], &mut refused)?)
                }
                Some(r) => (lend.min(first(r.block)), l),
                None => (lend, l),
            };
            segs.push(Seg {
                start: p,
                end: stop,
                ..Seg::of(winner)
            });
            p = stop;
        }
    }
    refused.dedup();
    Ok((canonical(segs), refused))
}

fn pick<'a>(
    l: &'a RangeEntry,
    r: &'a RangeEntry,
    auth: &Authority<'_>,
    verified: &mut Option<bool>,
    refused: &mut Vec<Refused>,
) -> Result<&'a RangeEntry, MergeError> {
    if r.version < l.version || (r.version == l.version && r.owner == l.owner) {
        return Ok(l);
    }
    let proof_ok = *verified
        .get_or_insert_with(|| r.proof.verifies(auth.network, r.block, r.owner, r.version));
    // Same version, another owner, properly signed: two writes of one
    // address at one version, corruption or a reclaim run twice. Refusing
    // the whole view is safe: honest views never carry a state they could
    // not attribute, so only the equivocator's own views are lost.
    if r.version == l.version && proof_ok {
        return Err(MergeError::Conflict {
            ours: Box::new(*l),
            theirs: Box::new(*r),
        });
    }
    let authorized = proof_ok
        && (r.proof.writer == l.owner || auth.publisher == l.owner || (auth.departed)(l.owner));
    if !authorized {
        refused.push(Refused {
            ours: *l,
            theirs: *r,
            bad_proof: !proof_ok,
        });
        return Ok(l);
    }
    Ok(r)
}

impl Ring {
    /// The creator's ring: it owns the whole space at version 1, signed
    /// by itself (the genesis write every later one descends from).
    pub fn new(pool: Pool, creator: &Signer) -> Self {
        let space = pool.space();
        let proof = creator.sign(space, creator.id(), 1);
        let entries = canonical([Seg {
            start: first(space),
            end: end(space),
            owner: creator.id(),
            version: 1,
            proof,
        }]);
        Self {
            pool: Some(pool),
            entries,
            reports: BTreeMap::new(),
        }
    }

    /// The first ring of a node that knew none: there is no earlier state
    /// to check writers against, so each address takes the state most
    /// views hold (each publisher counted once), among entries whose
    /// proofs verify. Ties go to the state whose owner publishes it
    /// first-hand, then to the lower owner id, then to the higher version.
    /// One liar among three or more views cannot move an address; with
    /// two views a tie is possible (see docs/threat-model.md). The caller
    /// then merges every view normally on top, so a stale majority only
    /// delays.
    pub fn bootstrap(views: &[(NodeId, &Ring)], network: NetworkId) -> Option<Ring> {
        // The pool most views agree on (a view of another pool is refused
        // by the normal merge afterwards).
        let mut pools: Vec<(&Pool, usize)> = Vec::new();
        for (_, r) in views {
            if let Some(p) = &r.pool {
                match pools.iter_mut().find(|(q, _)| *q == p) {
                    Some(c) => c.1 += 1,
                    None => pools.push((p, 1)),
                }
            }
        }
        let pool = pools
            .iter()
            .max_by_key(|(_, c)| *c)
            .map(|(p, _)| (*p).clone())?;
        let views: Vec<(NodeId, &Ring)> = views
            .iter()
            .filter(|(_, r)| r.pool.as_ref() == Some(&pool))
            .copied()
            .collect();
        let mut cuts: Vec<u64> = views
            .iter()
            .flat_map(|(_, r)| {
                r.entries
                    .iter()
                    .flat_map(|e| [first(e.block), end(e.block)])
            })
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut ok: std::collections::HashMap<RangeEntry, bool> = std::collections::HashMap::new();
        let mut segs = Vec::new();
        for w in cuts.windows(2) {
            let (start, stop) = (w[0], w[1]);
            // (state, votes, claimed first-hand by its owner)
            let mut tally: Vec<(Seg, usize, bool)> = Vec::new();
            for (publisher, r) in &views {
                let i = r.entries.partition_point(|e| end(e.block) <= start);
                let Some(e) = r.entries.get(i).filter(|e| first(e.block) <= start) else {
                    continue;
                };
                let valid = *ok
                    .entry(*e)
                    .or_insert_with(|| e.proof.verifies(network, e.block, e.owner, e.version));
                if !valid {
                    continue;
                }
                let seg = Seg {
                    start,
                    end: stop,
                    ..Seg::of(e)
                };
                match tally.iter_mut().find(|t| t.0.same_state(&seg)) {
                    Some(t) => {
                        t.1 += 1;
                        t.2 |= e.owner == *publisher;
                    }
                    None => tally.push((seg, 1, e.owner == *publisher)),
                }
            }
            let best = tally.into_iter().max_by(|a, b| {
                (a.1, a.2, std::cmp::Reverse(a.0.owner), a.0.version).cmp(&(
                    b.1,
                    b.2,
                    std::cmp::Reverse(b.0.owner),
                    b.0.version,
                ))
            })?;
            segs.push(best.0);
        }
        let mut ring = Self {
            pool: Some(pool),
            entries: canonical(segs),
            reports: BTreeMap::new(),
        };
        for (_, r) in &views {
            for (node, rep) in &r.reports {
                let mine = ring.reports.entry(*node).or_insert(*rep);
                *mine = (*mine).max(*rep);
            }
        }
        ring.check().ok()?;
        ring.prune_reports();
        Some(ring)
    }

    /// Builds a ring from untrusted parts: entries must be aligned, inside
    /// the space, disjoint and cover it exactly; they are canonicalised.
    pub fn from_parts(
        pool: Option<Pool>,
        mut entries: Vec<RangeEntry>,
        reports: BTreeMap<NodeId, FreeReport>,
    ) -> Result<Self, RingError> {
        let Some(pool) = pool else {
            if entries.is_empty() && reports.is_empty() {
                return Ok(Self::default());
            }
            return Err(RingError::EntriesWithoutPool);
        };
        let space = pool.space();
        entries.sort_by_key(|e| first(e.block));
        let mut expect = first(space);
        let mut prev: Option<Ipv4Network> = None;
        for e in &entries {
            if e.block.ip() != e.block.network() {
                return Err(RingError::Misaligned(e.block));
            }
            if !e.block.is_subnet_of(space) {
                return Err(RingError::OutsidePool {
                    block: e.block,
                    space,
                });
            }
            match first(e.block).cmp(&expect) {
                Ordering::Less => {
                    return Err(RingError::Overlap(prev.unwrap_or(e.block), e.block));
                }
                Ordering::Greater => {
                    return Err(RingError::Gap {
                        from: addr(expect),
                        to: addr(first(e.block) - 1),
                    });
                }
                Ordering::Equal => {}
            }
            expect = end(e.block);
            prev = Some(e.block);
        }
        if expect != end(space) {
            return Err(RingError::Gap {
                from: addr(expect),
                to: addr(end(space) - 1),
            });
        }
        let mut ring = Self {
            pool: Some(pool),
            entries: canonical(entries.iter().map(Seg::of)),
            reports,
        };
        ring.prune_reports();
        Ok(ring)
    }

    /// Drops reports of nodes that own no block.
    fn prune_reports(&mut self) {
        let owners = self.owners();
        self.reports.retain(|n, _| owners.binary_search(n).is_ok());
    }

    /// Re-checks every representation invariant (for tests and debugging).
    pub fn check(&self) -> Result<(), RingError> {
        let rebuilt = Self::from_parts(
            self.pool.clone(),
            self.entries.clone(),
            self.reports.clone(),
        )?;
        if rebuilt.entries != self.entries || rebuilt.reports != self.reports {
            return Err(RingError::NotCanonical);
        }
        Ok(())
    }

    /// True until the pool is known.
    pub fn is_empty(&self) -> bool {
        self.pool.is_none()
    }

    pub fn pool(&self) -> Option<&Pool> {
        self.pool.as_ref()
    }

    pub fn entries(&self) -> &[RangeEntry] {
        &self.entries
    }

    pub fn reports(&self) -> &BTreeMap<NodeId, FreeReport> {
        &self.reports
    }

    /// The entry covering `ip`, if `ip` is in the space.
    pub fn entry_for(&self, ip: Ipv4Addr) -> Option<&RangeEntry> {
        let n = u64::from(u32::from(ip));
        let i = self.entries.partition_point(|e| end(e.block) <= n);
        self.entries.get(i).filter(|e| e.block.contains(ip))
    }

    pub fn owner_of(&self, ip: Ipv4Addr) -> Option<NodeId> {
        self.entry_for(ip).map(|e| e.owner)
    }

    /// Blocks owned by `node`, in address order.
    pub fn ranges_of(&self, node: NodeId) -> Vec<Ipv4Network> {
        self.entries
            .iter()
            .filter(|e| e.owner == node)
            .map(|e| e.block)
            .collect()
    }

    /// Every node owning at least one block, sorted.
    pub fn owners(&self) -> Vec<NodeId> {
        // Few distinct owners, many entries: a linear scan beats sorting.
        let mut v: Vec<NodeId> = Vec::new();
        for e in &self.entries {
            if v.last() != Some(&e.owner) && !v.contains(&e.owner) {
                v.push(e.owner);
            }
        }
        v.sort();
        v
    }

    /// Usable addresses in the blocks of `node`.
    pub fn capacity_of(&self, node: NodeId) -> u32 {
        let Some(pool) = &self.pool else { return 0 };
        self.entries
            .iter()
            .filter(|e| e.owner == node)
            .map(|e| pool.usable_in(e.block))
            .sum()
    }

    /// Free addresses of `node` as this replica knows it: its last report,
    /// bounded by what it owns here; its capacity when it never reported.
    pub fn free_estimate(&self, node: NodeId) -> u32 {
        let cap = self.capacity_of(node);
        self.reports.get(&node).map_or(cap, |r| r.free.min(cap))
    }

    /// A number that grows with every change a merge or a write makes and
    /// never shrinks: per-address versions only grow, reports only grow.
    /// Cheap to gossip as the ring's digest ("has it moved?").
    pub fn progress(&self) -> u128 {
        let ranges: u128 = self
            .entries
            .iter()
            .map(|e| u128::from(e.version) * u128::from(size(e.block)))
            .sum();
        let reports: u128 = self
            .reports
            .values()
            .map(|r| (u128::from(r.seq) << 32) | u128::from(r.free))
            .sum();
        ranges.saturating_add(reports)
    }

    /// Merges a view `auth.publisher` published. Refused whole (ring
    /// unchanged) on a pool mismatch or a same-version conflict between
    /// authorised writes; otherwise unauthorised newer states are left out
    /// address by address and returned. An empty ring bootstraps from the
    /// view alone (`Ring::bootstrap`). Returns whether anything changed.
    pub fn merge(
        &mut self,
        remote: &Ring,
        auth: &Authority<'_>,
    ) -> Result<(bool, Vec<Refused>), MergeError> {
        let Some(theirs) = &remote.pool else {
            return Ok((false, Vec::new()));
        };
        let Some(ours) = &self.pool else {
            return Ok(
                match Ring::bootstrap(&[(auth.publisher, remote)], auth.network) {
                    Some(r) => {
                        *self = r;
                        (true, Vec::new())
                    }
                    None => (false, Vec::new()),
                },
            );
        };
        if ours != theirs {
            return Err(MergeError::PoolMismatch {
                ours: Box::new(ours.clone()),
                theirs: Box::new(theirs.clone()),
            });
        }
        let (entries, refused) = merge_entries(&self.entries, &remote.entries, auth)?;
        let mut reports = self.reports.clone();
        for (node, r) in &remote.reports {
            let mine = reports.entry(*node).or_insert(*r);
            *mine = (*mine).max(*r);
        }
        let before = (
            std::mem::take(&mut self.entries),
            std::mem::take(&mut self.reports),
        );
        self.entries = entries;
        self.reports = reports;
        self.prune_reports();
        Ok((
            before.0 != self.entries || before.1 != self.reports,
            refused,
        ))
    }

    /// Merges granted entries (validated by the caller: aligned, inside the
    /// space, sorted, disjoint) under the same rule, the donor standing
    /// behind them.
    pub(crate) fn merge_granted(
        &mut self,
        granted: &[RangeEntry],
        auth: &Authority<'_>,
    ) -> Result<(bool, Vec<Refused>), MergeError> {
        let (entries, refused) = merge_entries(&self.entries, granted, auth)?;
        let changed = entries != self.entries;
        self.entries = entries;
        self.prune_reports();
        Ok((changed, refused))
    }

    /// The one write: `block` (aligned, inside the space) now belongs to
    /// `owner` at one more than the highest version it covers, signed by
    /// `writer`; entries it splits keep owner, version and proof for the
    /// rest (their signed block still covers it). Only the owner of every
    /// covered entry may call this (or the operator acting for a departed
    /// owner): receivers refuse anyone else's write.
    pub(crate) fn assign(&mut self, block: Ipv4Network, owner: NodeId, writer: &Signer) {
        let (bs, be) = (first(block), end(block));
        let mut segs = Vec::with_capacity(self.entries.len() + 2);
        let mut top = 0u64;
        for e in &self.entries {
            let (es, ee) = (first(e.block), end(e.block));
            if ee <= bs || es >= be {
                segs.push(Seg::of(e));
                continue;
            }
            top = top.max(e.version);
            if es < bs {
                segs.push(Seg {
                    start: es,
                    end: bs,
                    ..Seg::of(e)
                });
            }
            if ee > be {
                segs.push(Seg {
                    start: be,
                    end: ee,
                    ..Seg::of(e)
                });
            }
        }
        let version = top.saturating_add(1);
        segs.push(Seg {
            start: bs,
            end: be,
            owner,
            version,
            proof: writer.sign(block, owner, version),
        });
        segs.sort_by_key(|s| s.start);
        self.entries = canonical(segs);
        self.prune_reports();
    }

    /// Records `node`'s own free count (only `node` calls this for itself;
    /// nothing for a node that owns no block). Returns whether it changed.
    pub(crate) fn report(&mut self, node: NodeId, free: u32) -> bool {
        if !self.entries.iter().any(|e| e.owner == node) {
            return false;
        }
        match self.reports.get_mut(&node) {
            Some(r) if r.free == free => false,
            Some(r) => {
                *r = FreeReport {
                    seq: r.seq.saturating_add(1),
                    free,
                };
                true
            }
            None => {
                self.reports.insert(node, FreeReport { seq: 1, free });
                true
            }
        }
    }
}

#[derive(Serialize, Deserialize)]
struct ReportRepr {
    #[serde(with = "text")]
    node: NodeId,
    seq: u64,
    free: u32,
}

#[derive(Serialize, Deserialize)]
struct RingRepr {
    pool: Option<Pool>,
    #[serde(default)]
    entries: Vec<RangeEntry>,
    #[serde(default)]
    reports: Vec<ReportRepr>,
}

impl TryFrom<RingRepr> for Ring {
    type Error = RingError;
    fn try_from(r: RingRepr) -> Result<Self, RingError> {
        // A node listed twice keeps its larger report, as a merge would.
        let mut reports: BTreeMap<NodeId, FreeReport> = BTreeMap::new();
        for r in r.reports {
            let report = FreeReport {
                seq: r.seq,
                free: r.free,
            };
            let kept = reports.entry(r.node).or_insert(report);
            *kept = (*kept).max(report);
        }
        Ring::from_parts(r.pool, r.entries, reports)
    }
}

impl From<Ring> for RingRepr {
    fn from(r: Ring) -> Self {
        Self {
            pool: r.pool,
            entries: r.entries,
            reports: r
                .reports
                .into_iter()
                .map(|(node, r)| ReportRepr {
                    node,
                    seq: r.seq,
                    free: r.free,
                })
                .collect(),
        }
    }
}
