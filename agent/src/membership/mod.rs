//! Cluster membership: who is in the cluster and how to reach them.
//!
//! Built on chitchat (scuttlebutt gossip + phi-accrual failure detection) over
//! a transport sealed with the cluster key and signed by each sender. Nodes
//! publish one small signed record about themselves (addresses, name, table
//! version, left flag); bulk tables travel over peer gRPC. The [`guard`]
//! keeps chitchat from accepting a fact about a node that the node did not
//! sign.

pub mod current;
pub mod guard;
pub mod record;
pub mod seal;
pub mod sim;
pub mod transport;
pub mod view;
pub mod wire;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chitchat::{ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, spawn_chitchat};
use ring::signature::Ed25519KeyPair;
use tokio::sync::watch;
use tracing::info;

use crate::ids::{ClusterId, NodeId};
use crate::metrics::Counters;
pub use record::NodeFacts;
use record::{RECORD_KEY, Slot};
use seal::Sealer;
use transport::{SealedUdpTransport, Signing};
pub use view::{Incarnation, NodeStatus, NodeView};

/// Node ids removed from the cluster, shared by the transport (refuses
/// their datagrams), the view (hides them) and the cluster (adopts and
/// persists removals).
pub type Removed = Arc<std::sync::RwLock<std::collections::BTreeSet<NodeId>>>;

/// Gossip accepted up to this far from our clock; further is a replay or a
/// broken clock.
pub(crate) const MAX_CLOCK_SKEW_MS: u64 = 60_000;

/// How membership is tuned.
#[derive(Debug, Clone)]
pub struct Tuning {
    pub gossip_interval: Duration,
    pub phi_threshold: f64,
    /// A dead node's state is kept this long (so a returning node and its
    /// records are recognised) before chitchat forgets it.
    pub dead_node_grace: Duration,
    /// How long a leaving node keeps gossiping so peers learn it left.
    pub leave_linger: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            gossip_interval: Duration::from_millis(200),
            // phi = silence / mean heartbeat interval. Heartbeats arrive every
            // 100-200 ms, so 14 reports death after ~1.5-3 s: well inside the
            // 5 s goal, yet tolerant of a loaded host pausing for a second.
            phi_threshold: 14.0,
            dead_node_grace: Duration::from_secs(3600),
            leave_linger: Duration::from_millis(1500),
        }
    }
}

pub struct MembershipConfig {
    pub node_id: NodeId,
    pub generation: u64,
    pub cluster_id: ClusterId,
    pub gossip_addr: SocketAddr,
    pub seeds: Vec<SocketAddr>,
    /// What the node states about itself, signed with `identity`.
    pub facts: NodeFacts,
    pub identity: Arc<Ed25519KeyPair>,
    pub sealer: Arc<Sealer>,
    pub counters: Arc<Counters>,
    pub tuning: Tuning,
    pub removed: Removed,
    pub key_events: tokio::sync::mpsc::Sender<KeyEvent>,
}

/// What gossip learns about the cluster key, for the cluster module.
#[derive(Debug)]
pub enum KeyEvent {
    /// We now seal with `key`: a member (`by`) was seen using it.
    Switched {
        key: Box<crate::keys::ClusterKey>,
        by: Option<NodeId>,
    },
    /// `from` sealed a datagram under a key newer than ours that we do
    /// not hold: we missed a rotation and must fetch the key.
    MissedRotation {
        from: SocketAddr,
        id: crate::keys::KeyId,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("start gossip on {addr}: {source:#}")]
    Start {
        addr: SocketAddr,
        source: anyhow::Error,
    },
}

pub struct Membership {
    handle: ChitchatHandle,
    self_id: NodeId,
    cluster_id: ClusterId,
    generation: u64,
    gossip_addr: SocketAddr,
    identity: Arc<Ed25519KeyPair>,
    /// What we last published; changed only under the chitchat lock, so the
    /// signed version always matches the one chitchat stores it at.
    facts: std::sync::Mutex<NodeFacts>,
    linger: Duration,
    /// Set before we stop gossip on purpose, so the end is not a failure.
    stopping: std::sync::atomic::AtomicBool,
    removed: Removed,
    /// The keyring: the key in use's member set bounds who exists here.
    sealer: Arc<Sealer>,
}

/// Builds the gossip sealer for a cluster key.
pub fn sealer(key: crate::keys::ClusterKey) -> Arc<Sealer> {
    Arc::new(Sealer::new(key, MAX_CLOCK_SKEW_MS))
}

impl Membership {
    pub async fn start(cfg: MembershipConfig) -> Result<Self, MembershipError> {
        let chitchat_id = ChitchatId::new(cfg.node_id.to_string(), cfg.generation, cfg.gossip_addr);
        let t = &cfg.tuning;
        let fd = FailureDetectorConfig {
            phi_threshold: t.phi_threshold,
            sampling_window_size: 100,
            // Intervals above this are outliers (a pause, a restart) and would
            // inflate the mean, slowing detection; leave them out.
            max_interval: t.gossip_interval * 10,
            initial_interval: t.gossip_interval,
            dead_node_grace_period: t.dead_node_grace,
        };
        let config = ChitchatConfig {
            chitchat_id,
            cluster_id: cfg.cluster_id.to_string(),
            gossip_interval: t.gossip_interval,
            listen_addr: cfg.gossip_addr,
            seed_nodes: cfg.seeds.iter().map(|s| s.to_string()).collect(),
            failure_detector_config: fd,
            marked_for_deletion_grace_period: t.dead_node_grace,
            catchup_callback: None,
            extra_liveness_predicate: None,
        };
        let me = wire::WireId {
            node_id: cfg.node_id.to_string(),
            generation: cfg.generation,
            gossip_addr: cfg.gossip_addr,
        };
        let signing = Arc::new(Signing {
            me: cfg.node_id.to_string(),
            cluster_id: cfg.cluster_id,
            key: cfg.identity.clone(),
            guard: Arc::new(std::sync::Mutex::new(guard::Guard::new(cfg.cluster_id, me))),
            removed: cfg.removed.clone(),
            key_events: cfg.key_events.clone(),
        });
        let transport = SealedUdpTransport::new(cfg.sealer.clone(), cfg.counters, signing);
        // No initial key-values: the record is signed for the version
        // chitchat stores it at, which `publish` reads under the lock.
        let handle = spawn_chitchat(config, Vec::new(), &transport)
            .await
            .map_err(|source| MembershipError::Start {
                addr: cfg.gossip_addr,
                source,
            })?;
        let this = Self {
            handle,
            self_id: cfg.node_id,
            cluster_id: cfg.cluster_id,
            generation: cfg.generation,
            gossip_addr: cfg.gossip_addr,
            identity: cfg.identity,
            facts: std::sync::Mutex::new(cfg.facts.clone()),
            linger: t.leave_linger,
            stopping: std::sync::atomic::AtomicBool::new(false),
            removed: cfg.removed.clone(),
            sealer: cfg.sealer,
        };
        this.sign_and_set(cfg.facts).await;
        info!(node = %cfg.node_id, generation = cfg.generation, gossip = %cfg.gossip_addr,
              seeds = ?cfg.seeds, "membership started");
        Ok(this)
    }

    pub fn cluster_id(&self) -> ClusterId {
        self.cluster_id
    }

    /// Changes what we publish about ourselves; unchanged facts cost nothing.
    pub async fn publish(&self, change: impl FnOnce(&mut NodeFacts)) {
        let mut next = self.facts.lock().unwrap_or_else(|e| e.into_inner()).clone();
        change(&mut next);
        self.sign_and_set(next).await;
    }

    async fn sign_and_set(&self, facts: NodeFacts) {
        let chitchat = self.handle.chitchat();
        let mut guard = chitchat.lock().await;
        let state = guard.self_node_state();
        {
            let mut current = self.facts.lock().unwrap_or_else(|e| e.into_inner());
            if *current == facts && state.get(RECORD_KEY).is_some() {
                return;
            }
            *current = facts.clone();
        }
        // chitchat's `set` stores a changed value at max_version + 1.
        let version = state.max_version() + 1;
        let value = record::sign(
            &self.identity,
            self.cluster_id,
            self.generation,
            version,
            self.gossip_addr,
            &facts,
        );
        state.set(RECORD_KEY, value);
    }

    /// Every incarnation chitchat knows, as plain data; once the key in
    /// use has a member set, only those of its members (and ourselves). A
    /// node learned before the set came (under an older key, from a member
    /// that had not heard of a removal yet) is no member.
    pub async fn incarnations(&self) -> Vec<Incarnation> {
        let members = self.sealer.with_ring(|r| r.primary_members().cloned());
        let me = self.self_id.to_string();
        let chitchat = self.handle.chitchat();
        let guard = chitchat.lock().await;
        let live: HashSet<&ChitchatId> = guard.live_nodes().collect();
        guard
            .node_states()
            .iter()
            .filter(|(cid, _)| {
                members.as_ref().is_none_or(|m| {
                    *cid.node_id == *me
                        || cid
                            .node_id
                            .parse::<NodeId>()
                            .is_ok_and(|id| m.contains(&id))
                })
            })
            .map(|(cid, state)| Incarnation {
                node_id: cid.node_id.to_string(),
                generation: cid.generation_id,
                gossip_addr: cid.gossip_advertise_addr,
                live: live.contains(cid),
                // Remote values got here only through the guard, which
                // verified them; decoding still checks they belong here.
                record: state.get_versioned(RECORD_KEY).and_then(|v| {
                    record::decode(
                        &v.value,
                        Slot {
                            node_id: &cid.node_id,
                            generation: cid.generation_id,
                            gossip_addr: cid.gossip_advertise_addr,
                            version: v.version,
                        },
                    )
                    .ok()
                }),
            })
            .collect()
    }

    /// The join token each node publishes (rotation): (node, issued at,
    /// secret). Never logged.
    pub async fn published_tokens(&self) -> Vec<(NodeId, u64, [u8; 32])> {
        let removed = self
            .removed
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.incarnations()
            .await
            .into_iter()
            .filter_map(|i| {
                let r = i.record?;
                // A removed node's token must not outbid the rotation that
                // removed it.
                if removed.contains(&r.node_id) {
                    return None;
                }
                let (issued, secret) = r.facts.token?;
                Some((r.node_id, issued, secret))
            })
            .collect()
    }

    /// Every node, removed ones left out.
    pub async fn nodes(&self) -> Vec<NodeView> {
        let mut nodes = view::node_views(&self.incarnations().await, self.self_id);
        let removed = self.removed.read().unwrap_or_else(|e| e.into_inner());
        nodes.retain(|n| !removed.contains(&n.id));
        nodes
    }

    /// Removals every node publishes: (publisher, removed ids).
    pub async fn published_removals(&self) -> Vec<(NodeId, std::collections::BTreeSet<NodeId>)> {
        self.incarnations()
            .await
            .into_iter()
            .filter_map(|i| i.record.map(|r| (r.node_id, r.facts.removed)))
            .filter(|(_, r)| !r.is_empty())
            .collect()
    }

    /// Fires whenever the set of live incarnations or their state changes.
    pub async fn watch(&self) -> watch::Receiver<()> {
        let chitchat = self.handle.chitchat();
        let mut live = chitchat.lock().await.live_nodes_watcher();
        let (tx, rx) = watch::channel(());
        tokio::spawn(async move {
            while live.changed().await.is_ok() {
                if tx.send(()).is_err() {
                    break;
                }
            }
        });
        rx
    }

    /// Resolves, with the reason, only if gossip stops without being asked
    /// to (its task died): the agent must not run on with a frozen view.
    pub async fn failed(&self) -> String {
        let result = self.handle.termination_watcher().await;
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return std::future::pending().await;
        }
        match result {
            Ok(()) => "gossip stopped by itself".to_string(),
            Err(e) => format!("gossip stopped: {e:#}"),
        }
    }

    /// Announces a clean leave, lingers so peers hear it, then stops.
    pub async fn leave(&self) {
        self.publish(|f| f.left = true).await;
        info!(node = %self.self_id, linger = ?self.linger, "leaving the cluster");
        tokio::time::sleep(self.linger).await;
        self.shutdown().await;
    }

    /// Stops gossiping without announcing anything (restart, crash-like):
    /// peers detect the silence and report the node dead.
    pub async fn shutdown(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // Already stopped is fine: shutdown is idempotent.
        let _ = self.handle.initiate_shutdown();
        if let Err(e) = self.handle.termination_watcher().await {
            tracing::warn!(error = %e, "gossip stopped with an error");
        }
    }
}
