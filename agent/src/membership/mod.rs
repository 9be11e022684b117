//! Cluster membership: who is in the cluster and how to reach them.
//!
//! Built on chitchat (scuttlebutt gossip + phi-accrual failure detection) over
//! a transport sealed with the cluster key. Nodes publish only small facts
//! about themselves (addresses, names, public keys); bulk tables travel over
//! peer gRPC.

pub mod seal;
pub mod sim;
pub mod transport;
pub mod view;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use chitchat::{ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, spawn_chitchat};
use tokio::sync::watch;
use tracing::info;

use crate::ids::{ClusterId, NodeId};
use crate::metrics::Counters;
use seal::Sealer;
use transport::SealedUdpTransport;
pub use view::{Incarnation, NodeStatus, NodeView, keys};

/// Gossip accepted up to this far from our clock; further is a replay or a
/// broken clock.
const MAX_CLOCK_SKEW_MS: u64 = 60_000;

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
    /// Published key/values (name, addresses, public keys).
    pub facts: Vec<(String, String)>,
    pub sealer: Arc<Sealer>,
    pub counters: Arc<Counters>,
    pub tuning: Tuning,
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
    linger: Duration,
}

/// Builds the gossip sealer for a cluster key.
pub fn sealer(key: ring::aead::LessSafeKey) -> Arc<Sealer> {
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
        let transport = SealedUdpTransport::new(cfg.sealer, cfg.counters);
        let handle = spawn_chitchat(config, cfg.facts, &transport)
            .await
            .map_err(|source| MembershipError::Start {
                addr: cfg.gossip_addr,
                source,
            })?;
        info!(node = %cfg.node_id, generation = cfg.generation, gossip = %cfg.gossip_addr,
              seeds = ?cfg.seeds, "membership started");
        Ok(Self {
            handle,
            self_id: cfg.node_id,
            linger: t.leave_linger,
        })
    }

    /// Every incarnation chitchat knows, as plain data.
    pub async fn incarnations(&self) -> Vec<Incarnation> {
        let chitchat = self.handle.chitchat();
        let guard = chitchat.lock().await;
        let live: HashSet<&ChitchatId> = guard.live_nodes().collect();
        guard
            .node_states()
            .iter()
            .map(|(cid, state)| Incarnation {
                node_id: cid.node_id.to_string(),
                generation: cid.generation_id,
                gossip_addr: cid.gossip_advertise_addr,
                live: live.contains(cid),
                kv: state
                    .key_values()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            })
            .collect()
    }

    pub async fn nodes(&self) -> Vec<NodeView> {
        view::node_views(&self.incarnations().await, self.self_id)
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

    /// Publishes (or updates) one of this node's facts; unchanged values
    /// cost nothing.
    pub async fn set_fact(&self, key: &str, value: &str) {
        let chitchat = self.handle.chitchat();
        let mut guard = chitchat.lock().await;
        let state = guard.self_node_state();
        if state.get(key) != Some(value) {
            state.set(key, value);
        }
    }

    /// Announces a clean leave, lingers so peers hear it, then stops.
    pub async fn leave(&self) {
        {
            let chitchat = self.handle.chitchat();
            let mut guard = chitchat.lock().await;
            guard.self_node_state().set(keys::LEFT, "1");
        }
        info!(node = %self.self_id, linger = ?self.linger, "leaving the cluster");
        tokio::time::sleep(self.linger).await;
        self.shutdown().await;
    }

    /// Stops gossiping without announcing anything (restart, crash-like):
    /// peers detect the silence and report the node dead.
    pub async fn shutdown(&self) {
        // Already stopped is fine: shutdown is idempotent.
        let _ = self.handle.initiate_shutdown();
        if let Err(e) = self.handle.termination_watcher().await {
            tracing::warn!(error = %e, "gossip stopped with an error");
        }
    }
}
