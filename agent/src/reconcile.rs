//! The reconciler: makes the kernel match the store. Idempotent passes,
//! each reading the kernel back, run on every store or membership change
//! and on a repair tick, so anything lost or changed underneath (a crash
//! mid-way, an operator's `ip link del`) is put back.
//!
//! Warm-up: right after a start, replicas are still empty, and programming
//! from them would delete every remote entry the previous run left in the
//! kernel, cutting traffic. Until every live peer's table has been pulled
//! (or a deadline passes), the reconciler leaves the kernel alone.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::core::{Core, CoreError};
use crate::ids::NodeId;
use crate::membership::{NodeStatus, NodeView};
use crate::metrics::Counter;

const REPAIR_TICK: Duration = Duration::from_secs(2);
/// Membership needs this long to list live peers after a start.
const WARMUP_MIN: Duration = Duration::from_secs(2);
const WARMUP_MAX: Duration = Duration::from_secs(15);

pub async fn run(core: Arc<Core>) {
    let mut changes = core.subscribe();
    let mut tick = tokio::time::interval(REPAIR_TICK);
    let mut warm = false;
    let mut reported: HashSet<crate::ids::NetworkId> = HashSet::new();
    // Liveness moves (a peer dying, returning) change what the kernel must
    // hold without touching the store: follow membership too.
    let mut members: Option<tokio::sync::watch::Receiver<()>> = None;
    // Per owner, the replica version it confirmed we programmed.
    let acked: Arc<Mutex<HashMap<NodeId, u64>>> = Arc::default();
    loop {
        if members.is_none()
            && let Some(m) = core.cluster.membership().await
        {
            members = Some(m.watch().await);
        }
        let member_change = async {
            match members.as_mut() {
                Some(rx) => rx.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick() => {}
            _ = changes.changed() => {}
            alive = member_change => if !alive { members = None },
        }
        let nodes = core.cluster.members().await;
        if !warm {
            warm = warmed_up(&core, &nodes);
            if !warm {
                continue;
            }
            info!(after = ?core.started.elapsed(), "replicas caught up: reconciling the kernel");
        }
        report_conflicts(&core, &mut reported);
        match pass(&core, &nodes).await {
            Ok(programmed) => ack(&core, &nodes, &programmed, &acked),
            Err(e) => {
                core.counters.inc(Counter::ReconcileErrors);
                warn!(error = %e, "reconcile pass failed; retrying");
            }
        }
        // After the kernel and the ack, not before: a merged ring view is
        // persisted and republished (a disk write under the store lock),
        // and no kernel entry depends on it.
        core.merge_rings().await;
        core.publish_own_reports().await;
    }
}

/// Tells each live owner whose replica moved past what it confirmed that
/// our kernel now holds its table at the version the pass programmed.
fn ack(
    core: &Core,
    nodes: &[NodeView],
    programmed: &[(NodeId, u64)],
    acked: &Arc<Mutex<HashMap<NodeId, u64>>>,
) {
    let Some(channels) = core.channels() else {
        return;
    };
    let confirmed = acked.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for (owner, version) in programmed {
        if confirmed.get(owner).is_some_and(|v| v >= version) {
            continue;
        }
        if let Some(n) = nodes
            .iter()
            .find(|n| n.id == *owner && !n.is_self && n.status == NodeStatus::Alive)
        {
            crate::sync::ack_programmed(channels, n, *version, acked.clone());
        }
    }
}

/// Logs each network that lost a name or VNI clash, once: operators must
/// hear about it, and the loser is never programmed.
fn report_conflicts(core: &Core, reported: &mut HashSet<crate::ids::NetworkId>) {
    for n in core.store().networks() {
        if let Some(reason) = &n.conflict
            && reported.insert(n.id)
        {
            warn!(network = %n.id, name = %n.name(), vni = %n.vni, %reason,
                  "network lost a name/VNI clash: not usable, never programmed, its endpoints are withdrawn; remove it with `ovlctl network rm {}`", n.id);
        }
    }
}

fn warmed_up(core: &Core, nodes: &[NodeView]) -> bool {
    let age = core.started.elapsed();
    if age >= WARMUP_MAX {
        return true;
    }
    if age < WARMUP_MIN {
        return false;
    }
    let store = core.store();
    nodes
        .iter()
        .filter(|n| !n.is_self && n.status == NodeStatus::Alive)
        .all(|n| store.replica_version(n.id) >= n.table_version)
}

/// One pass; returns, per replica owner, the table version now in the
/// kernel (read in the same snapshot the pass programmed from).
async fn pass(core: &Arc<Core>, nodes: &[NodeView]) -> Result<Vec<(NodeId, u64)>, CoreError> {
    core.refresh_underlay().await?;
    // Attach creates devices before it stores the endpoint: without the
    // lock this pass could remove a network's devices mid-attach.
    let held = core.lock_endpoints().await;
    let withdrawn = core.withdraw_orphans(&held).await?;
    if withdrawn > 0 {
        debug!(withdrawn, "orphaned endpoints withdrawn");
    }
    let me = core.cluster.node_id();
    let (networks, endpoints, programmed) = {
        let s = core.store();
        let versions: Vec<(NodeId, u64)> = s
            .replica_owners()
            .into_iter()
            .map(|o| (o, s.replica_version(o)))
            .collect();
        (s.networks(), s.endpoints(), versions)
    };
    let wanted: Vec<_> = networks
        .iter()
        .filter(|n| n.is_active() && endpoints.iter().any(|e| e.network == n.id && e.owner == me))
        .collect();
    let ids: Vec<_> = wanted.iter().map(|n| n.id).collect();
    let owners = core.owners_merged(nodes, &ids).await;
    for net in &wanted {
        let plan = core.plan(net, nodes, &owners);
        let report = core.dataplane.ensure_network(&plan).await?;
        if report.added + report.removed + report.created_devices > 0 {
            info!(network = %net.id, vni = %net.vni, added = report.added, removed = report.removed,
                  devices = report.created_devices, "kernel reconciled");
        }
    }
    let keep: HashSet<_> = wanted.iter().map(|n| n.vni).collect();
    for vni in core.dataplane.networks_present().await? {
        if !keep.contains(&vni) {
            core.dataplane.remove_network(vni).await?;
            info!(vni = %vni, "network devices removed (no local endpoint left)");
        }
    }
    Ok(programmed)
}
