//! Table replication. Each node gossips its own table's version (`tv`);
//! when a peer's version moves past our replica, we pull the delta from it
//! over peer gRPC (`core::replicas` does the pull). The pull path converges
//! whatever was lost: it runs on every membership change and on a repair
//! tick. Network records and removals learned from peers are republished in
//! our own table, so a network outlives the node that created it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tracing::{debug, info};

use crate::core::Core;
use crate::membership::{NodeStatus, NodeView};
pub use crate::peer::Channels;

const REPAIR_TICK: Duration = Duration::from_secs(1);

/// Runs until the process ends.
pub async fn run(core: Arc<Core>, channels: Arc<Channels>) {
    // Pushes leave from a task of their own: behind a pull round (which
    // waits for the slowest peer) they would hold every attach up.
    tokio::spawn(pusher(core.clone(), channels.clone()));
    let mut local = core.subscribe();
    let mut tick = tokio::time::interval(REPAIR_TICK);
    loop {
        let Some(membership) = core.cluster.membership().await else {
            tokio::select! {
                _ = tick.tick() => {}
                _ = local.changed() => {}
            }
            continue;
        };
        let mut members = membership.watch().await;
        loop {
            let version = core.store().own().version();
            membership.publish(|f| f.table_version = version).await;
            let nodes = membership.nodes().await;
            round(&core, &channels, &nodes).await;
            tokio::select! {
                _ = tick.tick() => {}
                r = members.changed() => if r.is_err() { break },
                _ = local.changed() => {}
                _ = core.wait_hint() => {}
            }
            if core.cluster.membership().await.is_none() {
                break;
            }
        }
    }
}

/// One pass: drop replicas of nodes that left, pull from peers ahead of us.
async fn round(core: &Core, channels: &Channels, nodes: &[NodeView]) {
    let me = core.cluster.node_id();
    let mut changed = false;
    {
        let mut store = core.store();
        for owner in store.replica_owners() {
            let gone = match nodes.iter().find(|n| n.id == owner) {
                None => true,
                Some(n) => n.status == NodeStatus::Left,
            };
            if gone && store.drop_replica(owner) {
                info!(peer = %owner, "peer left or was forgotten: its records are withdrawn");
                changed = true;
            }
        }
    }
    let behind: Vec<&NodeView> = nodes
        .iter()
        .filter(|n| n.id != me && n.status == NodeStatus::Alive)
        .filter(|n| {
            wants_pull(
                n.table_version,
                core.settled_claim(n.id),
                core.hinted_version(n.id),
                core.store().replica_version(n.id),
            )
        })
        .collect();
    let pulls = behind.iter().map(|n| core.pull_from(channels, n, false));
    for r in futures::future::join_all(pulls).await {
        changed |= r;
    }
    if changed {
        core.republish_networks();
        core.notify();
    }
    core.collect_tombstones().await;
}

/// Whether a peer is ahead of our replica of its table. A gossiped
/// version its owner's own Pull already failed to reach (`settled`) counts
/// for nothing: a member gossiping `u64::MAX` would otherwise be pulled
/// every round (issue 8). It counts again once gossip moves.
fn wants_pull(gossiped: u64, settled: Option<u64>, hinted: u64, replica: u64) -> bool {
    let gossiped = if settled == Some(gossiped) {
        0
    } else {
        gossiped
    };
    gossiped.max(hinted) > replica
}

/// Notifies the live peers each time our own table moves.
async fn pusher(core: Arc<Core>, channels: Arc<Channels>) {
    let mut local = core.subscribe();
    // Before the cluster is formed there is no one to push to: look again
    // on the repair tick.
    let mut tick = tokio::time::interval(REPAIR_TICK);
    let mut pushed = None;
    loop {
        match core.cluster.membership().await {
            Some(m) => {
                let version = core.store().own().version();
                if pushed != Some(version) {
                    push(&core, &channels, &m.nodes().await, version);
                    pushed = Some(version);
                }
            }
            None => pushed = None,
        }
        tokio::select! {
            r = local.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
        }
    }
}

/// Tells every live peer our table moved, so they pull now (fire and
/// forget: a lost notify only costs latency, gossip still carries `tv`).
/// A peer whose agent refuses the call at the transport level (connection
/// refused or reset: not running) is not waited for by attach and detach.
fn push(core: &Arc<Core>, channels: &Arc<Channels>, nodes: &[NodeView], version: u64) {
    for n in nodes
        .iter()
        .filter(|n| !n.is_self && n.status == NodeStatus::Alive)
    {
        let (addr, peer) = (n.gossip_addr, n.id);
        let (core, channels) = (core.clone(), channels.clone());
        tokio::spawn(async move {
            if let Err(e) = channels.notify(addr, peer, version).await {
                debug!(peer = %peer, error = %e, "notify failed; gossip will carry the version");
                if e.code() == tonic::Code::Unavailable {
                    core.unreachable(peer, version);
                }
            }
        });
    }
}

/// Tells `peer` that our kernel holds its table up to `version` (after a
/// reconcile pass). `acked` records what the peer confirmed, so an ack lost
/// to a failed call is sent again after the next pass.
pub fn ack_programmed(
    channels: &Arc<Channels>,
    peer: &NodeView,
    version: u64,
    acked: Arc<std::sync::Mutex<HashMap<crate::ids::NodeId, u64>>>,
) {
    let (addr, id, channels) = (peer.gossip_addr, peer.id, channels.clone());
    tokio::spawn(async move {
        // The channel is pinned to `id`: only that node can take the ack.
        match channels.programmed(addr, id, version).await {
            Ok(()) => {
                let mut a = acked.lock().unwrap_or_else(|e| e.into_inner());
                let v = a.entry(id).or_default();
                *v = (*v).max(version);
            }
            Err(e) => {
                debug!(peer = %id, error = %e, "programmed ack failed; sent again after the next pass")
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::wants_pull;

    #[test]
    fn a_version_the_owner_did_not_serve_is_pulled_once_then_not_until_gossip_moves() {
        assert!(wants_pull(u64::MAX, None, 0, 10), "first time: pull");
        assert!(!wants_pull(u64::MAX, Some(u64::MAX), 0, 10), "settled");
        assert!(wants_pull(11, Some(u64::MAX), 0, 10), "gossip moved");
        assert!(
            wants_pull(u64::MAX, Some(u64::MAX), 12, 10),
            "a hint still counts"
        );
        assert!(!wants_pull(10, None, 0, 10), "up to date");
        assert!(!wants_pull(9, None, 3, 10));
    }
}
