//! The userspace encrypted VTEP behind the data plane's [`Vtep`] interface:
//! per network an engine-owned TAP device (`ovlen-<vni>`) on the network's
//! bridge, and the plan's remotes and peer hosts as the engine's forwarding
//! table. It is also where the key task's decisions land ([`KeySink`]).
//!
//! A cleartext VXLAN packet for an encrypted network's VNI finds no kernel
//! VXLAN device (the shared part removes one a reused VNI may have left), so
//! it is dropped by the kernel: encrypted networks fail closed.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rtnetlink::Handle;
use tokio::sync::watch;
use tracing::info;

use super::{Engine, EngineError, Forwarding};
use crate::dataplane::netlink as nl;
use crate::dataplane::{
    DataplaneError, KernelView, NetworkMode, NetworkPlan, ReconcileReport, Sandbox, Vtep,
};
use crate::ids::{NodeId, Vni};
use crate::keying::KeySink;
use crate::keys::schedule::KeyAction;

/// Prefix of an encrypted network's TAP device: `ovlen-<vni>` (at most 14
/// bytes). Never 8 hex digits after `ovl`, so never taken for a veth.
pub const TAP_PREFIX: &str = "ovlen-";

/// The encrypted VTEP of one data plane (namespace).
pub struct EncryptedVtep {
    engine: Arc<Engine>,
    /// What each network's forwarding was last set to, for views and reports.
    applied: Mutex<BTreeMap<Vni, NetworkPlan>>,
    /// Peer hosts of all encrypted networks here: the key task's input.
    peers: watch::Sender<BTreeSet<NodeId>>,
}

impl EncryptedVtep {
    pub fn new(engine: Arc<Engine>) -> Arc<Self> {
        Arc::new(Self {
            engine,
            applied: Mutex::default(),
            peers: watch::channel(BTreeSet::new()).0,
        })
    }

    pub fn tap_name(vni: Vni) -> String {
        format!("{TAP_PREFIX}{vni}")
    }

    /// The peer hosts the key task must hold pair keys with.
    pub fn peers(&self) -> watch::Receiver<BTreeSet<NodeId>> {
        self.peers.subscribe()
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Vni, NetworkPlan>> {
        self.applied.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish_peers(&self, applied: &BTreeMap<Vni, NetworkPlan>) {
        let all: BTreeSet<NodeId> = applied
            .values()
            .flat_map(|p| p.peers.iter().map(|h| h.node))
            .collect();
        self.peers.send_if_modified(|cur| {
            let changed = *cur != all;
            *cur = all;
            changed
        });
    }

    async fn enslave(
        &self,
        h: &Handle,
        ifindex: u32,
        name: &str,
        bridge: u32,
    ) -> Result<(), DataplaneError> {
        let Some(l) = nl::link_by_index(h, ifindex).await? else {
            return Err(vtep_error(format!("TAP {name} vanished after creation")));
        };
        if l.master != Some(bridge) {
            nl::set_link(h, nl::set_msg(ifindex).controller(bridge).build(), name).await?;
            info!(
                device = name,
                bridge, "TAP enslaved to the network's bridge"
            );
        }
        Ok(())
    }
}

fn vtep_error(what: String) -> DataplaneError {
    DataplaneError::Vtep {
        mode: NetworkMode::Encrypted,
        what,
    }
}

fn engine_error(e: EngineError) -> DataplaneError {
    vtep_error(e.to_string())
}

/// The plan as the engine's table: IPv4 remotes (the encrypted data plane
/// answers ARP; IPv6 overlays are not built) and the peer hosts.
fn forwarding(plan: &NetworkPlan) -> Forwarding {
    Forwarding {
        remotes: plan
            .remotes
            .iter()
            .filter_map(|r| match r.ip {
                IpAddr::V4(ip) => Some((r.mac, ip, r.node)),
                IpAddr::V6(_) => None,
            })
            .collect(),
        peers: plan.peers.iter().map(|p| p.node).collect(),
    }
}

/// Remote entries added and removed between two plans (for the report).
fn diff(old: Option<&NetworkPlan>, new: &NetworkPlan) -> (usize, usize) {
    let before: BTreeSet<_> = old
        .map(|p| p.remotes.iter().map(|r| (r.mac, r.ip, r.node)).collect())
        .unwrap_or_default();
    let after: BTreeSet<_> = new.remotes.iter().map(|r| (r.mac, r.ip, r.node)).collect();
    (
        after.difference(&before).count(),
        before.difference(&after).count(),
    )
}

#[async_trait]
impl Vtep for EncryptedVtep {
    async fn ensure(
        &self,
        plan: &NetworkPlan,
        sb: &Sandbox,
        bridge_ifindex: u32,
    ) -> Result<ReconcileReport, DataplaneError> {
        let name = Self::tap_name(plan.vni);
        let existed = nl::link_by_name(&sb.handle, &name).await?.is_some();
        let (engine, vni, mtu, netns, tap) = (
            self.engine.clone(),
            plan.vni,
            plan.mtu,
            sb.path.clone(),
            name.clone(),
        );
        // TAP ioctls and a switch into the sandbox: off the runtime. The
        // TAP has no socket of its own (the engine's UDP sockets stay on
        // the underlay), so it is simply made where it lives.
        let ifindex = tokio::task::spawn_blocking(move || {
            engine.ensure_network_in(vni, &tap, mtu, Some(&netns))
        })
        .await
        .map_err(|e| vtep_error(format!("TAP {name}: {e}")))?
        .map_err(engine_error)?;
        self.enslave(&sb.handle, ifindex, &name, bridge_ifindex)
            .await?;
        self.engine.set_forwarding(plan.vni, forwarding(plan));
        let mut applied = self.lock();
        let (added, removed) = diff(applied.get(&plan.vni), plan);
        applied.insert(plan.vni, plan.clone());
        self.publish_peers(&applied);
        Ok(ReconcileReport {
            added,
            removed,
            created_devices: usize::from(!existed),
        })
    }

    async fn remove(&self, vni: Vni, sb: Option<&Sandbox>) -> Result<(), DataplaneError> {
        self.engine.remove_network(vni);
        {
            let mut applied = self.lock();
            applied.remove(&vni);
            self.publish_peers(&applied);
        }
        // A TAP from before a restart that no engine holds: delete it here.
        let name = Self::tap_name(vni);
        if let Some(sb) = sb
            && let Some(l) = nl::link_by_name(&sb.handle, &name).await?
        {
            nl::delete_link(&sb.handle, l.index, &name).await?;
        }
        Ok(())
    }

    async fn present(&self, sb: &Sandbox) -> Result<bool, DataplaneError> {
        if self.lock().contains_key(&sb.vni) {
            return Ok(true);
        }
        Ok(nl::link_by_name(&sb.handle, &Self::tap_name(sb.vni))
            .await?
            .is_some())
    }

    async fn view(&self, vni: Vni, sb: Option<&Sandbox>) -> Result<KernelView, DataplaneError> {
        let vtep = match sb {
            Some(sb) => nl::link_by_name(&sb.handle, &Self::tap_name(vni))
                .await?
                .is_some(),
            None => false,
        };
        let applied = self.lock();
        let Some(plan) = applied.get(&vni) else {
            return Ok(KernelView {
                vtep,
                ..KernelView::default()
            });
        };
        Ok(KernelView {
            fdb: plan.remotes.iter().map(|r| (r.mac, r.vtep)).collect(),
            neigh: plan.remotes.iter().map(|r| (r.ip, r.mac)).collect(),
            flood: plan.peers.iter().map(|p| p.vtep).collect(),
            bridge: false,
            vtep,
        })
    }
}

impl KeySink for EncryptedVtep {
    fn peer_address(&self, peer: NodeId, addr: Option<SocketAddr>) {
        match addr {
            Some(a) => self.engine.set_peer(peer, a),
            // Not `remove_peer`: the key task never installs the same keys
            // twice (nonce reuse), so dropping them here would leave the
            // pair keyless when the peer comes back.
            None => self.engine.clear_peer_address(peer),
        }
    }

    fn key_action(&self, action: KeyAction) {
        match action {
            KeyAction::Install { peer, keys } => self.engine.install_keys(peer, keys),
            KeyAction::Use { peer, epoch } => self.engine.use_epoch(peer, epoch),
            KeyAction::Retire { peer, below } => self.engine.retire_keys(peer, below),
            KeyAction::Refused { .. } => {}
        }
    }
}
