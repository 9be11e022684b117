//! Programmed acknowledgements: each peer tells us, after a reconcile pass,
//! up to which version of our table its kernel holds our entries. Attach
//! and detach wait on them, so a container is reachable (or its address is
//! gone everywhere) when the command returns, instead of a neighbour entry
//! arriving tens of milliseconds later and the kernel's ARP retry costing
//! the first contact a second (issue 12).

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;
use tracing::warn;

use super::Core;
use crate::ids::{NetworkId, NodeId};
use crate::membership::NodeStatus;

/// How often the wait re-reads membership: a peer marked dead during the
/// wait stops being waited for.
const MEMBERSHIP_RECHECK: Duration = Duration::from_millis(50);

/// Own-table versions each peer's kernel holds, as the peers acknowledged.
pub(super) type Acks = tokio::sync::watch::Sender<HashMap<NodeId, u64>>;

impl Core {
    /// `peer`'s kernel now holds our table up to `version`.
    pub fn programmed(&self, peer: NodeId, version: u64) {
        self.acks.send_if_modified(|m| {
            let v = m.entry(peer).or_default();
            let moved = version > *v;
            *v = (*v).max(version);
            moved
        });
    }

    /// Waits until every live peer with endpoints in `network` acknowledged
    /// `version` of our table, at most `--attach-wait`. Returns the names of
    /// the peers still behind (empty: all programmed). A dead peer, or one
    /// partitioned away that is not marked dead yet, costs at most the bound.
    pub(super) async fn wait_programmed(&self, network: NetworkId, version: u64) -> Vec<String> {
        let bound = self.cluster.config().attach_wait;
        let deadline = Instant::now() + bound;
        let mut rx = self.acks.subscribe();
        loop {
            let lagging = self.lagging(network, version).await;
            if lagging.is_empty() {
                return Vec::new();
            }
            if Instant::now() >= deadline {
                self.counters
                    .inc(crate::metrics::Counter::AttachWaitTimeouts);
                let names: Vec<String> = lagging.into_iter().map(|(_, n)| n).collect();
                warn!(network = %network, version, lagging = ?names, wait = ?bound,
                      "hosts did not confirm programming the change in time; they catch up on their own");
                return names;
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return Vec::new() },
                _ = tokio::time::sleep(MEMBERSHIP_RECHECK) => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// Live peers having endpoints in `network` whose ack is below `version`.
    async fn lagging(&self, network: NetworkId, version: u64) -> Vec<(NodeId, String)> {
        let Some(m) = self.cluster.membership().await else {
            return Vec::new();
        };
        let nodes = m.nodes().await;
        let members: Vec<NodeId> = {
            let s = self.store();
            s.endpoints()
                .into_iter()
                .filter(|e| e.network == network)
                .map(|e| e.owner)
                .collect()
        };
        let acks = self.acks.borrow();
        nodes
            .into_iter()
            .filter(|n| !n.is_self && n.status == NodeStatus::Alive && members.contains(&n.id))
            .filter(|n| acks.get(&n.id).copied().unwrap_or(0) < version)
            .map(|n| (n.id, n.name))
            .collect()
    }
}
