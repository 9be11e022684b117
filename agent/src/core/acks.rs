//! Programmed acknowledgements: each peer tells us, after a reconcile pass,
//! up to which version of our table its kernel holds our entries. Attach
//! and detach wait on them, so a container is reachable (or its address is
//! gone everywhere) when the command returns, instead of a neighbour entry
//! arriving tens of milliseconds later and the kernel's ARP retry costing
//! the first contact a second (issue 12).
//!
//! Who is waited for: live peers having endpoints in the network (a host
//! without any holds no entry of it). A peer whose agent refused the
//! notify of the change at the transport level (connection refused or
//! reset: the agent is down, its host still up) is reported lagging at
//! once instead of costing the whole bound; a partitioned peer, whose calls
//! just go unanswered, costs at most the bound until membership marks it
//! dead.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use super::Core;
use crate::ids::{NetworkId, NodeId};
use crate::membership::NodeStatus;

/// How often the wait re-reads membership: a peer marked dead during the
/// wait stops being waited for.
const MEMBERSHIP_RECHECK: Duration = Duration::from_millis(50);

/// What peers confirmed about our own table.
#[derive(Debug, Default)]
pub(super) struct AckState {
    /// Own-table versions each peer's kernel holds, as it acknowledged.
    programmed: HashMap<NodeId, u64>,
    /// Per peer, the highest own-table version whose notify its agent
    /// refused at the transport level, until it acknowledges again.
    unreachable: HashMap<NodeId, u64>,
}

pub(super) type Acks = tokio::sync::watch::Sender<AckState>;

impl Core {
    /// `peer`'s kernel now holds our table up to `version`.
    pub fn programmed(&self, peer: NodeId, version: u64) {
        self.acks.send_if_modified(|s| {
            let back = s.unreachable.remove(&peer).is_some();
            let v = s.programmed.entry(peer).or_default();
            let moved = version > *v;
            *v = (*v).max(version);
            moved || back
        });
    }

    /// `peer`'s agent refused the notify of our table's `version` at the
    /// transport level (down, or restarting): waits for that version stop
    /// waiting for it.
    pub fn unreachable(&self, peer: NodeId, version: u64) {
        self.acks.send_modify(|s| {
            let v = s.unreachable.entry(peer).or_default();
            *v = (*v).max(version);
        });
    }

    /// Waits until every live peer with endpoints in `network` acknowledged
    /// `version` of our table, at most `--attach-wait`. Returns the names of
    /// the peers still behind (empty: all programmed). A peer whose agent
    /// refused the change's notify is not waited for (it is named); one
    /// partitioned away that is not marked dead yet costs at most the bound.
    pub(super) async fn wait_programmed(&self, network: NetworkId, version: u64) -> Vec<String> {
        let bound = self.cluster.config().attach_wait;
        let deadline = Instant::now() + bound;
        let mut rx = self.acks.subscribe();
        // Read once: a host whose first endpoint in the network arrives
        // during the wait programs ours with its own network's devices, or
        // on its next pass, as after any wait.
        let members = self.network_hosts(network);
        let mut peers = self.live_peers(&members).await;
        let mut recheck = Instant::now() + MEMBERSHIP_RECHECK;
        loop {
            let (waiting, unreachable) = {
                let s = rx.borrow_and_update();
                let behind = |id: &NodeId| s.programmed.get(id).copied().unwrap_or(0) < version;
                let down = |id: &NodeId| s.unreachable.get(id).is_some_and(|v| *v >= version);
                let waiting: Vec<String> = peers
                    .iter()
                    .filter(|(id, _)| behind(id) && !down(id))
                    .map(|(_, n)| n.clone())
                    .collect();
                let unreachable: Vec<String> = peers
                    .iter()
                    .filter(|(id, _)| behind(id) && down(id))
                    .map(|(_, n)| n.clone())
                    .collect();
                (waiting, unreachable)
            };
            if waiting.is_empty() {
                if !unreachable.is_empty() {
                    info!(network = %network, version, lagging = ?unreachable,
                          "not waiting for hosts whose agent refused the change's notify; they catch up when back");
                }
                return unreachable;
            }
            if Instant::now() >= deadline {
                self.counters
                    .inc(crate::metrics::Counter::AttachWaitTimeouts);
                let names: Vec<String> = waiting.into_iter().chain(unreachable).collect();
                warn!(network = %network, version, lagging = ?names, wait = ?bound,
                      "hosts did not confirm programming the change in time; they catch up on their own");
                return names;
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return Vec::new() },
                _ = tokio::time::sleep_until(recheck) => {
                    peers = self.live_peers(&members).await;
                    recheck = Instant::now() + MEMBERSHIP_RECHECK;
                }
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// Hosts having endpoints in `network`.
    fn network_hosts(&self, network: NetworkId) -> HashSet<NodeId> {
        self.store()
            .endpoints()
            .into_iter()
            .filter(|e| e.network == network)
            .map(|e| e.owner)
            .collect()
    }

    /// Live peers among `members`, with their names.
    async fn live_peers(&self, members: &HashSet<NodeId>) -> Vec<(NodeId, String)> {
        let Some(m) = self.cluster.membership().await else {
            return Vec::new();
        };
        m.nodes()
            .await
            .into_iter()
            .filter(|n| !n.is_self && n.status == NodeStatus::Alive && members.contains(&n.id))
            .map(|n| (n.id, n.name))
            .collect()
    }
}
