//! The reconciler: makes the kernel match the store. Idempotent passes,
//! each reading the kernel back, run on every store or membership change
//! and on a repair tick, so anything lost or changed underneath (a crash
//! mid-way, an operator's `ip link del`) is put back.
//!
//! Most wake-ups change nothing the kernel holds (a peer's IPAM ring or
//! free-space report moved, gossip carried a version): when the plans
//! computed from the store equal the ones the last full pass applied, and
//! nothing else programmed the kernel since, the pass acks without dumping
//! the kernel. The repair tick always runs a full pass, so what changed
//! underneath is still put back within `REPAIR_TICK`, and at once when a
//! VXLAN miss shows the kernel lacks an entry the table has (`repair`).
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
use crate::dataplane::{Dataplane, DataplaneError};
use crate::dns;
use crate::ids::{NetworkId, NodeId};
use crate::membership::{NodeStatus, NodeView};
use crate::metrics::{Counter, RateLimit};
use crate::planner::NetworkPlan;

const REPAIR_TICK: Duration = Duration::from_secs(2);
static NO_VTEP_LOG: RateLimit = RateLimit::new(Duration::from_secs(30));
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
    let mut applied: Option<Applied> = None;
    let mut resolvers = dns::resolvers::Resolvers::new(dns::server::Shared::new(
        dns::server::Config {
            upstreams: core.cluster.config().dns_upstreams.clone(),
            ..Default::default()
        },
        core.counters.clone(),
    ));
    // Before the warm-up: queries sent while this agent restarted wait in
    // the sockets, answered once the names are complete.
    match core.dataplane.served_gateways().await {
        Ok(at) => resolvers.hold(at).await,
        Err(e) => {
            warn!(error = %e, "cannot read the sandboxes' gateways; dns starts after the warm-up")
        }
    }
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
        let full = tokio::select! {
            _ = tick.tick() => true,
            _ = changes.changed() => false,
            alive = member_change => { if !alive { members = None }; false }
        };
        let nodes = core.cluster.members().await;
        if !warm {
            warm = warmed_up(&core, &nodes);
            if !warm {
                continue;
            }
            info!(after = ?core.started.elapsed(), "replicas caught up: reconciling the kernel");
        }
        report_conflicts(&core, &mut reported);
        let full = core.take_repair_request() || full;
        let unchanged = match (&applied, full) {
            (Some(last), false) => unchanged(&core, &nodes, last).await,
            _ => None,
        };
        match unchanged {
            Some(programmed) => ack(&core, &nodes, &programmed, &acked),
            None => match timed_pass(&core, &nodes).await {
                Ok((programmed, now)) => {
                    ack(&core, &nodes, &programmed, &acked);
                    applied = Some(now);
                }
                Err(e) => {
                    applied = None;
                    core.counters.inc(Counter::ReconcileErrors);
                    warn!(error = %e, "reconcile pass failed; retrying");
                }
            },
        }
        // A resolver per network the last good pass programmed, its names
        // from the same rows (live owners, past the owner checks).
        if let Some(a) = &applied {
            sync_dns(&core, a, &mut resolvers).await;
        }
        // After the kernel and the ack, not before: a merged ring view is
        // persisted and republished (a disk write under the store lock),
        // and no kernel entry depends on it.
        core.merge_rings().await;
        core.publish_own_reports().await;
    }
}

/// One network failed: counted, logged at most once per network per
/// `NETWORK_LOG_PERIOD`, and the pass goes on with the others.
fn network_failed(core: &Core, network: NetworkId, what: &str, e: &DataplaneError) {
    core.counters.inc(Counter::ReconcileNetworkFailed);
    let key = u64::from_le_bytes(network.as_bytes()[..8].try_into().unwrap_or_default());
    if may_log(key, std::time::Instant::now()) {
        warn!(network = %network, error = %e, "{what} this network failed; the others go on, it is retried next pass");
    }
}

const NETWORK_LOG_PERIOD: Duration = Duration::from_secs(30);
/// When each failing network (or VNI) last logged.
static NETWORK_LOG: Mutex<std::collections::BTreeMap<u64, std::time::Instant>> =
    Mutex::new(std::collections::BTreeMap::new());

fn may_log(key: u64, now: std::time::Instant) -> bool {
    let mut m = NETWORK_LOG.lock().unwrap_or_else(|e| e.into_inner());
    if m.len() > 4096 {
        m.retain(|_, t| now.duration_since(*t) < NETWORK_LOG_PERIOD);
    }
    match m.get(&key) {
        Some(t) if now.duration_since(*t) < NETWORK_LOG_PERIOD => false,
        _ => {
            m.insert(key, now);
            true
        }
    }
}

/// A pass, timed for `ovl_reconcile_pass_duration_seconds` (failed passes
/// too: a pass that times out on netlink is exactly what the histogram
/// must show).
async fn timed_pass(
    core: &Arc<Core>,
    nodes: &[NodeView],
) -> Result<(Vec<(NodeId, u64)>, Applied), CoreError> {
    let started = std::time::Instant::now();
    let r = pass(core, nodes).await;
    core.timings.reconcile_pass(started.elapsed());
    r
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

/// Moves local endpoints whose MTU is not their network's (a smaller host
/// joined, or left) to it, live. One link dump; a namespace is entered only
/// for an endpoint that needs the change.
async fn follow_network_mtu(
    core: &Core,
    plans: &[(NetworkId, NetworkPlan)],
    failed: &HashSet<NetworkId>,
) {
    let mtus = match core.dataplane.host_end_mtus().await {
        Ok(m) => m,
        Err(e) => {
            core.counters.inc(Counter::ReconcileNetworkFailed);
            if may_log(u64::MAX, std::time::Instant::now()) {
                warn!(error = %e, "reading endpoint MTUs failed; retrying next pass");
            }
            return;
        }
    };
    let me = core.cluster.node_id();
    let endpoints = core.store().endpoints();
    for (network, plan) in plans.iter().filter(|(id, _)| !failed.contains(id)) {
        for ep in endpoints
            .iter()
            .filter(|e| e.network == *network && e.owner == me)
        {
            let host = Dataplane::host_ifname(ep.id);
            let Some((_, current)) = mtus.iter().find(|(name, _)| *name == host) else {
                continue;
            };
            if *current == Some(plan.mtu) {
                continue;
            }
            let netns = std::path::Path::new(&ep.record.netns);
            if let Err(e) = core
                .dataplane
                .set_endpoint_mtu(plan.vni, ep.id, netns, &ep.record.ifname, plan.mtu)
                .await
            {
                network_failed(core, *network, "changing endpoint MTUs of", &e);
            }
        }
    }
}

/// Starts, updates and stops the networks' resolvers to match `applied`.
/// A network's resolver binds inside its sandbox, at the gateway address
/// its bridge holds there.
async fn sync_dns(core: &Core, applied: &Applied, resolvers: &mut dns::resolvers::Resolvers) {
    let me = core.cluster.node_id();
    let (networks, endpoints) = {
        let s = core.store();
        (s.networks(), s.endpoints())
    };
    let wanted = applied
        .plans
        .iter()
        .filter_map(|(id, plan)| {
            let net = networks.iter().find(|n| n.id == *id)?;
            Some(dns::resolvers::Wanted {
                network: *id,
                netns: Some(core.dataplane.sandbox_path(plan.vni)),
                gateway: std::net::IpAddr::V4(net.pool.gateway),
                names: dns::table::for_network(*id, net.pool.subnet, &endpoints, me, plan),
            })
        })
        .collect();
    resolvers.sync(wanted).await;
}

/// What the last full pass left in the kernel: the plan of every network
/// with a local endpoint, and the data plane's change count right after.
struct Applied {
    plans: Vec<(NetworkId, NetworkPlan)>,
    generation: u64,
}

/// The desired state read from one store snapshot: per replica owner the
/// table version it reflects, and the plans of the networks having a local
/// endpoint (sorted by VNI). No kernel access.
async fn desired(
    core: &Core,
    nodes: &[NodeView],
) -> (Vec<(NodeId, u64)>, Vec<(NetworkId, NetworkPlan)>) {
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
    let mut plans: Vec<_> = wanted
        .iter()
        .map(|net| (net.id, core.plan(net, nodes, &owners)))
        .collect();
    plans.sort_by_key(|(_, p)| p.vni);
    (programmed, plans)
}

/// The versions to ack when the kernel already holds what the store asks
/// for: the plans equal the last full pass's and nothing programmed the
/// data plane since. `None`: run a full pass.
async fn unchanged(core: &Core, nodes: &[NodeView], last: &Applied) -> Option<Vec<(NodeId, u64)>> {
    // As in a full pass: an attach programs the kernel under this lock.
    let _held = core.lock_endpoints().await;
    if core.dataplane.generation() != last.generation {
        return None;
    }
    let (programmed, plans) = desired(core, nodes).await;
    (plans == last.plans).then_some(programmed)
}

/// One full pass; returns, per replica owner, the table version now in the
/// kernel (read in the same snapshot the pass programmed from), and what
/// the pass left in the kernel.
async fn pass(
    core: &Arc<Core>,
    nodes: &[NodeView],
) -> Result<(Vec<(NodeId, u64)>, Applied), CoreError> {
    core.refresh_underlay().await?;
    // Attach creates devices before it stores the endpoint: without the
    // lock this pass could remove a network's devices mid-attach.
    let held = core.lock_endpoints().await;
    let present = core.dataplane.inventory().await?;
    let withdrawn = core.withdraw_orphans(&held, &present.host_ends).await?;
    if withdrawn > 0 {
        debug!(withdrawn, "orphaned endpoints withdrawn");
    }
    let (programmed, mut plans) = desired(core, nodes).await;
    let mut failed = HashSet::new();
    for (network, plan) in &plans {
        let report = match core.dataplane.ensure_network(plan).await {
            Ok(r) => r,
            // One network this host cannot carry must not stop the others.
            Err(e @ DataplaneError::NoVtep { .. }) => {
                core.counters.inc(Counter::DataplaneNoVtep);
                if let Some(suppressed) = NO_VTEP_LOG.check(std::time::Instant::now()) {
                    warn!(network = %network, vni = %plan.vni, mode = %plan.mode, error = %e, suppressed,
                          "network not programmed");
                }
                continue;
            }
            Err(e) => {
                network_failed(core, *network, "programming", &e);
                failed.insert(*network);
                continue;
            }
        };
        if !report.is_empty() {
            info!(network = %network, vni = %plan.vni, added = report.added, removed = report.removed,
                  devices = report.created_devices, "kernel reconciled");
        }
    }
    follow_network_mtu(core, &plans, &failed).await;
    // Devices this pass created belong to wanted networks: the inventory
    // taken before it (bridges, and each VTEP's `present`) is enough to
    // find the unwanted ones.
    let keep: HashSet<_> = plans.iter().map(|(_, p)| p.vni).collect();
    for vni in present.networks {
        if !keep.contains(&vni) {
            match core.dataplane.remove_network(vni).await {
                Ok(()) => info!(vni = %vni, "network devices removed (no local endpoint left)"),
                Err(e) => {
                    core.counters.inc(Counter::ReconcileNetworkFailed);
                    if may_log(u64::from(vni.get()) | 1 << 63, std::time::Instant::now()) {
                        warn!(vni = %vni, error = %e, "removing a network's devices failed; retrying next pass");
                    }
                }
            }
        }
    }
    // A failed network is left out of what the pass applied, so the next
    // wake-up runs a full pass again instead of taking it as programmed.
    plans.retain(|(id, _)| !failed.contains(id));
    // Read under the endpoint lock: only an attach (which takes it) or
    // this pass program networks.
    let generation = core.dataplane.generation();
    drop(held);
    Ok((programmed, Applied { plans, generation }))
}
