//! Pulling peers' tables into the store's replicas, and republishing the
//! network records learned from them (the pull half of table
//! replication; `sync` decides when to pull).

use std::time::Duration;

use ovl_proto::records::{NetworkRemoval, NetworkWitness, table_entry::Value};
use tracing::{debug, warn};

use super::Core;
use crate::membership::{NodeStatus, NodeView};
use crate::metrics::Counter;
use crate::peer::Channels;
use crate::store::key;
use crate::store::networks::{self, NetworkView};

static HINT_LOG: crate::metrics::RateLimit =
    crate::metrics::RateLimit::new(Duration::from_secs(10));
static INVALID_LOG: crate::metrics::RateLimit =
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
        let count = resp.entries.len();
        core.count_invalid(peer.id, &resp.entries);
        let mut store = core.store();
        match store.apply_replica(peer.id, since, resp.version, resp.full, resp.entries) {
            Ok(changed) => {
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
        for &id in &src.removed {
            if store.own().get(&key::removal(id)).is_none() {
                writes.push((
                    key::removal(id),
                    Some(Value::Removal(NetworkRemoval {
                        network_id: id.as_bytes().to_vec(),
                        removed_at_ms: now,
                    })),
                ));
            }
            // The witness goes with the record: one per live network.
            for k in [key::network(id), key::witness(id)] {
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
