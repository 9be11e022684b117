//! Pulling peers' tables into the store's replicas, and republishing the
//! network records learned from them (the pull half of table
//! replication; `sync` decides when to pull).

use std::collections::HashSet;
use std::time::Duration;

use ovl_proto::records::{NetworkRemoval, NetworkWitness, table_entry::Value};
use tracing::{debug, warn};

use super::Core;
use crate::ids::NetworkId;
use crate::membership::{NodeStatus, NodeView};
use crate::metrics::Counter;
use crate::peer::Channels;
use crate::store::networks::{self, NetworkView};
use crate::store::{key, removals};

static HINT_LOG: crate::metrics::RateLimit =
    crate::metrics::RateLimit::new(Duration::from_secs(10));
static INVALID_LOG: crate::metrics::RateLimit =
    crate::metrics::RateLimit::new(Duration::from_secs(10));
static CLAIM_LOG: crate::metrics::RateLimit =
    crate::metrics::RateLimit::new(Duration::from_secs(10));
static BOUNDS_LOG: crate::metrics::RateLimit =
    crate::metrics::RateLimit::new(Duration::from_secs(10));
static BACKDATED_LOG: crate::metrics::RateLimit =
    crate::metrics::RateLimit::new(Duration::from_secs(10));

impl Core {
    /// Read-repair: pulls from every live peer now, whatever gossip says. For
    /// a lookup that missed (e.g. an attach right after `network create` on
    /// another host, before the push arrived). True when anything changed.
    pub async fn pull_all(&self, channels: &Channels) -> bool {
        let core = self;
        let Some(m) = core.cluster.membership().await else {
            return false;
        };
        let nodes = m.nodes().await;
        let me = core.cluster.node_id();
        let live: Vec<&NodeView> = nodes
            .iter()
            .filter(|n| n.id != me && n.status == NodeStatus::Alive)
            .collect();
        let results =
            futures::future::join_all(live.iter().map(|n| core.pull_from(channels, n, true))).await;
        let changed = results.into_iter().any(|c| c);
        if changed {
            core.republish_networks();
            core.notify();
        }
        changed
    }

    /// Pulls `peer`'s table delta; true when the replica changed.
    pub async fn pull_from(&self, channels: &Channels, peer: &NodeView, force: bool) -> bool {
        let core = self;
        if !core.cluster.in_cluster() {
            return false;
        }
        let since = core.store().replica_version(peer.id);
        if force {
            debug!(peer = %peer.id, since, "read-repair pull");
        }
        // The channel is pinned to `peer.id`: only that node can answer.
        let resp = match channels.pull(peer.gossip_addr, peer.id, since).await {
            Ok(r) => r,
            Err(e) if e.code() == tonic::Code::OutOfRange => {
                // Past the client's decoding limit: the peer publishes more
                // than any member may. Retried once its version moves.
                self.counters.inc(Counter::PullTooLarge);
                self.settle_claim(peer.id, peer.table_version);
                if let Some(suppressed) = CLAIM_LOG.check(std::time::Instant::now()) {
                    warn!(peer = %peer.id, version = peer.table_version, error = %e, suppressed,
                          "peer's table is larger than a member may publish: refused, not pulled again until its version moves");
                }
                return false;
            }
            Err(e) => {
                debug!(peer = %peer.id, code = ?e.code(), error = %e, "pull failed; retrying next round");
                return false;
            }
        };
        if resp.owner.as_slice() != peer.id.as_bytes() {
            warn!(peer = %peer.id, "pull answered by another node (address reused?); ignored");
            return false;
        }
        if core.settle_hint(peer.id, resp.version) {
            core.counters.inc(Counter::NotifyHintAhead);
            if let Some(suppressed) = HINT_LOG.check(std::time::Instant::now()) {
                warn!(peer = %peer.id, version = resp.version, suppressed,
                      "peer notified a version beyond what it serves; hint dropped");
            }
        }
        if peer.table_version > resp.version {
            self.counters.inc(Counter::GossipVersionAhead);
            self.settle_claim(peer.id, peer.table_version);
            if let Some(suppressed) = CLAIM_LOG.check(std::time::Instant::now()) {
                warn!(peer = %peer.id, gossiped = peer.table_version, served = resp.version, suppressed,
                      "peer gossips a table version beyond what it serves; not pulled again until its gossip moves");
            }
        }
        let count = resp.entries.len();
        core.count_invalid(peer.id, &resp.entries);
        let mut store = core.store();
        match store.apply_replica(peer.id, since, resp.version, resp.full, resp.entries) {
            Ok((changed, refused)) => {
                drop(store);
                self.count_bounded(peer.id, &refused);
                debug!(peer = %peer.id, since, version = resp.version, entries = count, full = resp.full, "pulled");
                changed
            }
            Err(e) => {
                warn!(peer = %peer.id, error = %e, "delta refused; pulling the whole table next round");
                store.drop_replica(peer.id);
                false
            }
        }
    }

    /// Counts and logs (rate-limited) the records refused by the
    /// per-member bounds (`store::bounds`).
    fn count_bounded(
        &self,
        owner: crate::ids::NodeId,
        refused: &[crate::store::bounds::BoundError],
    ) {
        let Some(first) = refused.first() else {
            return;
        };
        self.counters
            .add(Counter::RecordsOverBounds, refused.len() as u64);
        if let Some(suppressed) = BOUNDS_LOG.check(std::time::Instant::now()) {
            warn!(peer = %owner, refused = refused.len(), first = %first, suppressed,
                  "peer published records past the per-member bounds; they are refused");
        }
    }

    /// Drops own tombstones every live peer has pulled past (a node that
    /// left or is dead does not hold them back: it pulls the whole table
    /// when it returns), keeping at most `MAX_TOMBSTONES` in any case.
    pub async fn collect_tombstones(&self) {
        let pulled = self.withdrawn_everywhere().await;
        let r = self
            .store()
            .collect_tombstones(pulled, crate::store::MAX_TOMBSTONES);
        match r {
            Ok(0) => {}
            Ok(n) => debug!(collected = n, pulled, "tombstones collected"),
            Err(e) => warn!(error = %e, "could not log the tombstone collection"),
        }
    }

    /// Counts received records the views will skip (a member running a buggy
    /// or incompatible version): they are kept in the replica, never used.
    fn count_invalid(&self, owner: crate::ids::NodeId, entries: &[ovl_proto::records::TableEntry]) {
        let invalid = entries
            .iter()
            .filter(|e| match &e.value {
                Some(Value::Network(r)) => {
                    crate::store::networks::effective(std::slice::from_ref(r), &Default::default())
                        .1
                        > 0
                }
                Some(Value::Endpoint(r)) => crate::store::EndpointView::parse(owner, r).is_none(),
                _ => false,
            })
            .count();
        for _ in 0..invalid {
            self.counters.inc(crate::metrics::Counter::RecordsInvalid);
        }
        if invalid > 0
            && let Some(suppressed) = INVALID_LOG.check(std::time::Instant::now())
        {
            warn!(peer = %owner, invalid, suppressed, "peer published records that do not validate; they are ignored");
        }
    }

    /// Copies network records and removals known from replicas into our own
    /// table (two-phase set: a removal, once seen, is kept and the record
    /// goes), and witnesses each network the first time it reaches us: one
    /// `NetworkWitness` per network, stamped once per pass, so networks
    /// learned together (a join, a restart with lost state) are tied and
    /// this host casts no vote between them. The copy republished is the
    /// one that counts (`networks::resolve`): a copy a member altered is
    /// not spread, and ours is replaced if it differs from its creator's.
    pub fn republish_networks(&self) {
        let now = crate::clock::now_ms();
        let me = self.cluster.node_id();
        let mut store = self.store();
        let src = store.network_sources();
        let (views, _) = networks::resolve(&src);
        let mut writes: Vec<(String, Option<Value>)> = Vec::new();
        for v in &views {
            let ours = match store.own().get(&key::network(v.id)) {
                Some(Value::Network(r)) => Some(r),
                _ => None,
            };
            let by_creator = v
                .creator
                .is_some_and(|c| src.records.iter().any(|(h, r)| *h == c && *r == v.record));
            let replace = ours.is_some_and(|r| {
                *r != v.record && by_creator && r.creator.as_slice() != me.as_bytes()
            });
            if ours.is_none() || replace {
                writes.push((key::network(v.id), Some(Value::Network(v.record.clone()))));
            }
            if store.own().get(&key::witness(v.id)).is_none() {
                writes.push((
                    key::witness(v.id),
                    Some(Value::Witness(NetworkWitness {
                        network_id: v.id.as_bytes().to_vec(),
                        first_seen_ms: now,
                    })),
                ));
            }
        }
        let with_copies: HashSet<NetworkId> = src
            .records
            .iter()
            .filter_map(|(_, r)| <[u8; 16]>::try_from(r.id.as_slice()).ok())
            .map(NetworkId::from_bytes)
            .collect();
        let keep = removals::retained(&src.removed_at, &with_copies, now);
        for &id in &src.removed {
            let held = store.own().get(&key::removal(id)).is_some();
            if !keep.contains(&id) {
                // No copy left anywhere and past the retention: the row goes.
                if held {
                    writes.push((key::removal(id), None));
                }
                continue;
            }
            if !held {
                writes.push((
                    key::removal(id),
                    Some(Value::Removal(NetworkRemoval {
                        network_id: id.as_bytes().to_vec(),
                        // The earliest time known, so that every host lets
                        // it go at the same time (`store::removals`).
                        removed_at_ms: src.removed_at.get(&id).copied().unwrap_or(now),
                    })),
                ));
            }
            // The witness and our IPAM ring view go with the record: one
            // of each per live network.
            for k in [key::network(id), key::witness(id), key::ipam(id)] {
                if store.own().get(&k).is_some() {
                    writes.push((k, None));
                }
            }
        }
        for (k, v) in writes {
            let r = match v {
                Some(v) => store.put(&k, v),
                None => store.delete(&k),
            };
            if let Err(e) = r {
                warn!(key = %k, error = %e, "could not republish network record");
            }
        }
        drop(store);
        self.count_backdated(&views);
    }

    /// Counts, once per network, those that lost a clash they would have
    /// won by their `created_at` (`network_backdated`).
    fn count_backdated(&self, views: &[NetworkView]) {
        let mut seen = self
            .backdated_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for v in views.iter().filter(|v| v.backdated) {
            if !seen.insert(v.id) {
                continue;
            }
            self.counters.inc(Counter::NetworkBackdated);
            if let Some(suppressed) = BACKDATED_LOG.check(std::time::Instant::now()) {
                warn!(network = %v.id, name = %v.name(), created_at_ms = v.record.created_at_ms,
                      creator = ?v.creator, suppressed,
                      "network claims to be older than its rival but most hosts saw it later (back-dated?): it loses the clash");
            }
        }
    }
}
