//! The agent's core: the commands the local API and peers may give, carried
//! out against the store (desired state), IPAM and the data plane. The gRPC
//! layers translate requests into calls here and never see the kernel; the
//! reconciler and sync loops run beside it.

mod acks;
mod encryption;
mod endpoints;
mod error;
mod ipam_glue;
mod networks;
mod replicas;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use ipnetwork::Ipv4Network;
use ring::rand::SystemRandom;
use tokio::sync::watch;

use crate::dataplane::Dataplane;
use crate::ids::NodeId;
use crate::membership::current::ClusterView;
use crate::membership::record;
use crate::metrics::Counters;
use crate::peer::Channels;
use crate::store::Store;
pub use encryption::{EncryptionView, PeerState, PeerView};
pub use endpoints::{AttachSpec, EndpointGuard, EndpointInfo, NetnsRef};
pub use error::CoreError;
pub use ipam_glue::{Ipam, IpamLoadError};
pub use networks::{CreateSpec, FdbRow, NetworkInfo, PeerInfo};

pub struct Core {
    /// This node's id, config and the running membership; never the
    /// cluster object itself.
    pub cluster: ClusterView,
    store: Mutex<Store>,
    changes: watch::Sender<u64>,
    pub counters: Arc<Counters>,
    /// Reconcile and attach timings, for the metrics endpoint.
    pub timings: crate::metrics::Timings,
    pub dataplane: Dataplane,
    pub ipam: Ipam,
    /// Serialises endpoint mutations (attach, detach, withdraw) on this node.
    endpoint_lock: tokio::sync::Mutex<()>,
    default_pool: Ipv4Network,
    rng: SystemRandom,
    pub started: Instant,
    /// MTU of the data-path interface, refreshed by the reconciler (it can
    /// change under us).
    underlay: AtomicU32,
    /// Our own table version last served to each peer's Pull: what that
    /// peer has applied (it reconciles its kernel right after).
    served: Mutex<std::collections::HashMap<NodeId, u64>>,
    /// Versions peers told us about (push path), ahead of gossip.
    hints: Mutex<std::collections::HashMap<NodeId, u64>>,
    hinted: tokio::sync::Notify,
    /// Gossiped table versions whose owner's own Pull did not reach them
    /// (or whose reply was refused): not pulled again until gossip moves.
    overclaims: Mutex<std::collections::HashMap<NodeId, u64>>,
    /// Connections to peers, shared with the sync loop.
    channels: std::sync::OnceLock<Arc<Channels>>,
    /// The encrypted data plane's engine, for operator views (counters,
    /// key state); `main` sets it when it runs one.
    engine: std::sync::OnceLock<Arc<crate::dataplane::encrypted::Engine>>,
    /// When each network's ring was last published for our free-space
    /// report alone (rate limit, see `publish_own_reports`).
    reports_published: Mutex<std::collections::HashMap<crate::ids::NetworkId, Instant>>,
    /// Endpoint rows already counted as refused by the owner checks.
    refused_seen: Mutex<std::collections::HashSet<(NodeId, crate::ids::EndpointId)>>,
    /// Networks already counted as back-dated (`network_backdated`).
    backdated_seen: Mutex<std::collections::HashSet<crate::ids::NetworkId>>,
    /// Our own table version each peer's kernel holds (its `Programmed`
    /// ack, sent after its reconcile pass): what attach and detach wait for.
    acks: acks::Acks,
    /// Set when the kernel may have lost what the last pass applied (a
    /// VXLAN miss for an entry the table has): the next pass is a full one.
    kernel_suspect: std::sync::atomic::AtomicBool,
}

pub use crate::clock::now_ms;

impl Core {
    pub fn new(
        cluster: ClusterView,
        store: Store,
        counters: Arc<Counters>,
        dataplane: Dataplane,
        ipam: Ipam,
        default_pool: Ipv4Network,
    ) -> Arc<Self> {
        let (changes, _) = watch::channel(store.own().version());
        Arc::new(Self {
            cluster,
            store: Mutex::new(store),
            changes,
            counters,
            timings: Default::default(),
            dataplane,
            ipam,
            endpoint_lock: tokio::sync::Mutex::new(()),
            default_pool,
            rng: SystemRandom::new(),
            started: Instant::now(),
            underlay: AtomicU32::new(1500),
            channels: std::sync::OnceLock::new(),
            engine: std::sync::OnceLock::new(),
            hints: Mutex::new(std::collections::HashMap::new()),
            served: Mutex::new(std::collections::HashMap::new()),
            hinted: tokio::sync::Notify::new(),
            overclaims: Mutex::new(std::collections::HashMap::new()),
            refused_seen: Mutex::new(std::collections::HashSet::new()),
            backdated_seen: Mutex::new(std::collections::HashSet::new()),
            reports_published: Mutex::new(std::collections::HashMap::new()),
            acks: watch::channel(Default::default()).0,
            kernel_suspect: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Records that `peer` pulled our table up to `version`.
    pub fn served(&self, peer: NodeId, version: u64) {
        let mut s = self.served.lock().unwrap_or_else(|e| e.into_inner());
        let v = s.entry(peer).or_default();
        *v = (*v).max(version);
    }

    /// The own-table version every live peer has pulled: changes at or
    /// below it (an endpoint's withdrawal) are gone from every host.
    pub async fn withdrawn_everywhere(&self) -> u64 {
        let nodes = match self.cluster.membership().await {
            Some(m) => m.nodes().await,
            None => return u64::MAX,
        };
        let served = self.served.lock().unwrap_or_else(|e| e.into_inner());
        nodes
            .iter()
            .filter(|n| !n.is_self && n.status == crate::membership::NodeStatus::Alive)
            .map(|n| served.get(&n.id).copied().unwrap_or(0))
            .min()
            .unwrap_or(u64::MAX)
    }

    /// A peer says its table reached `version`.
    pub fn hint(&self, peer: NodeId, version: u64) {
        let mut h = self.hints.lock().unwrap_or_else(|e| e.into_inner());
        let v = h.entry(peer).or_default();
        *v = (*v).max(version);
        drop(h);
        self.hinted.notify_one();
    }

    /// A pull answered by `peer` itself served `served`: a hint above that
    /// was false (a Notify is only a hint; the owner's own answer is what
    /// its table holds). Dropping it stops a Notify of `u64::MAX` from
    /// making every round pull again (issue 8). True if a hint was dropped.
    pub fn settle_hint(&self, peer: NodeId, served: u64) -> bool {
        let mut h = self.hints.lock().unwrap_or_else(|e| e.into_inner());
        settle(&mut h, peer, served)
    }

    /// The highest version a peer told us about directly.
    pub fn hinted_version(&self, peer: NodeId) -> u64 {
        self.hints
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&peer)
            .copied()
            .unwrap_or(0)
    }

    /// `peer` gossiped `version` but its own Pull reply did not bring us
    /// there: that claim alone triggers no more pulls.
    pub fn settle_claim(&self, peer: NodeId, version: u64) {
        self.overclaims
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(peer, version);
    }

    /// The gossiped version of `peer` last settled by [`Self::settle_claim`].
    pub fn settled_claim(&self, peer: NodeId) -> Option<u64> {
        self.overclaims
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&peer)
            .copied()
    }

    pub async fn wait_hint(&self) {
        self.hinted.notified().await
    }

    pub fn set_channels(&self, channels: Arc<Channels>) {
        let _ = self.channels.set(channels);
    }

    /// Connections to peers, once `main` wired them.
    pub fn channels(&self) -> Option<&Arc<Channels>> {
        self.channels.get()
    }

    /// Clean leave: withdraw local endpoints, hand address space over to a
    /// live peer, forget the cluster's records.
    pub async fn leave(&self) -> Result<(), CoreError> {
        if self.cluster.membership().await.is_none() {
            return Ok(());
        }
        self.withdraw_all().await?;
        self.hand_off_space().await;
        self.ipam.clear().await;
        self.store().clear()?;
        self.notify();
        Ok(())
    }

    /// Re-reads the data-path interface from the kernel (its MTU here, its
    /// index for the VXLAN VTEP).
    pub async fn refresh_underlay(&self) -> Result<(), CoreError> {
        let addr = self.cluster.config().data_path_addr;
        let mtu = self.dataplane.refresh_underlay(addr).await?;
        self.underlay.store(mtu, Ordering::Relaxed);
        // Peers size the networks we share by it (DESIGN.md "MTU");
        // unchanged facts cost nothing. Clamped into what a record may
        // state (loopback's 65 536 is one more than that).
        if let Some(m) = self.cluster.membership().await {
            let published = mtu.clamp(record::MIN_DATA_PATH_MTU, record::MAX_DATA_PATH_MTU);
            m.publish(|f| f.data_path_mtu = published).await;
        }
        Ok(())
    }

    /// Waits until the own table as of now is on disk (persist before
    /// effect), with no lock held while the writer thread works.
    pub async fn persisted(&self) -> Result<(), CoreError> {
        let wait = {
            let s = self.store();
            s.durable(s.ticket())
        };
        wait.await
            .map_err(|e| CoreError::from(crate::store::StoreError::from(e)))
    }

    /// The store, for short, non-async critical sections.
    pub fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the reconciler and the sync publisher.
    pub fn notify(&self) {
        self.changes.send_modify(|v| *v += 1);
    }

    /// The kernel may lack what the last pass applied: wakes the
    /// reconciler for a full pass (one that reads the kernel back).
    pub fn repair_kernel(&self) {
        self.kernel_suspect.store(true, Ordering::Release);
        self.notify();
    }

    /// Whether a full pass was asked for since the last call.
    pub fn take_repair_request(&self) -> bool {
        self.kernel_suspect.swap(false, Ordering::AcqRel)
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    async fn require_cluster(&self) -> Result<Arc<crate::membership::Membership>, CoreError> {
        self.cluster
            .membership()
            .await
            .ok_or(CoreError::NotClustered)
    }
}

/// See [`Core::settle_hint`]: a hint above what the owner served is
/// forgotten.
fn settle(hints: &mut std::collections::HashMap<NodeId, u64>, peer: NodeId, served: u64) -> bool {
    match hints.get(&peer) {
        Some(&h) if h > served => {
            hints.remove(&peer);
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod hint_tests {
    use super::*;

    #[test]
    fn a_hint_above_what_the_owner_served_is_forgotten() {
        let mut h = std::collections::HashMap::new();
        let (a, b) = (NodeId::from_bytes([1; 16]), NodeId::from_bytes([2; 16]));
        h.insert(a, u64::MAX);
        h.insert(b, 7);
        assert!(
            settle(&mut h, a, 10),
            "u64::MAX over a served 10 is dropped"
        );
        assert!(!h.contains_key(&a));
        assert!(!settle(&mut h, b, 7), "a hint the owner met stays");
        assert!(!settle(&mut h, b, 9));
        assert!(!settle(&mut h, a, 10), "nothing left to drop");
    }
}
