//! Cluster lifecycle: unclustered → (joining) → active → (left) unclustered.
//!
//! Like Swarm: an agent starts unclustered; `init` makes a one-node cluster,
//! `join` enters an existing one after a seed proved it holds the token's
//! key. Membership (token + known peers) persists in the state dir, so a
//! restarted agent rejoins by itself.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::SystemRandom;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::config::Config;
use crate::identity::Identity;
use crate::ids::{ClusterId, NodeId};
use crate::membership::{
    self, Membership, MembershipConfig, NodeStatus, NodeView, Tuning, keys, view,
};
use crate::metrics::Counters;
use crate::peer::{self, HelloError};
use crate::persist::{self, PersistError};
use crate::token::{ClusterKeys, JoinToken, TokenError};

const CLUSTER_FILE: &str = "cluster.json";
/// Known peers remembered for rejoining after a restart.
const MAX_REMEMBERED_PEERS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("already in cluster {0}; run `ovlctl cluster leave` first")]
    AlreadyClustered(ClusterId),
    #[error("not in a cluster: run `ovlctl cluster init` or `ovlctl cluster join`")]
    NotClustered,
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("join needs at least one seed (IP or IP:PORT of an agent in the cluster)")]
    NoSeeds,
    #[error("invalid seed {0:?}: expected IP or IP:PORT")]
    BadSeed(String),
    #[error("join refused: {0}")]
    Refused(String),
    #[error("no seed reachable: {0}")]
    Unreachable(String),
    #[error("persist cluster state: {0}")]
    Persist(#[from] PersistError),
    #[error("start membership: {0}")]
    Membership(#[from] membership::MembershipError),
    #[error("system random source failed")]
    Random,
}

/// The persisted part of an active membership.
#[derive(Serialize, Deserialize)]
struct ClusterFile {
    token: String,
    #[serde(default)]
    peers: Vec<SocketAddr>,
}

enum Phase {
    Unclustered {
        reason: String,
    },
    Joining {
        reason: String,
        task: JoinHandle<()>,
    },
    Active {
        token: JoinToken,
        membership: Arc<Membership>,
        remember: JoinHandle<()>,
    },
}

pub struct Status {
    pub node_id: NodeId,
    pub node_name: String,
    pub state: &'static str,
    pub reason: String,
    pub cluster_id: Option<ClusterId>,
    pub generation: u64,
    pub nodes: Vec<NodeView>,
}

/// How many of `nodes` are alive.
pub fn alive_count(nodes: &[NodeView]) -> usize {
    nodes
        .iter()
        .filter(|n| n.status == NodeStatus::Alive)
        .count()
}

pub struct Cluster {
    config: Config,
    identity: Identity,
    /// Chitchat incarnation: fresh for every activation, so a node that
    /// left and joins again in the same process is not taken for the old
    /// incarnation (which peers remember as left, with higher versions).
    generation: AtomicU64,
    counters: Arc<Counters>,
    rng: SystemRandom,
    phase: Mutex<Phase>,
    /// Snapshot for the peer server, which must not wait on `phase`.
    keys: RwLock<Option<Arc<ClusterKeys>>>,
}

impl Cluster {
    /// Restores the persisted membership or starts the unattended join.
    pub async fn start(
        config: Config,
        identity: Identity,
        counters: Arc<Counters>,
    ) -> Result<Arc<Self>, ClusterError> {
        let this = Arc::new(Self {
            config,
            identity,
            generation: AtomicU64::new(0),
            counters,
            rng: SystemRandom::new(),
            phase: Mutex::new(Phase::Unclustered {
                reason: "not in a cluster: run `ovlctl cluster init` or `ovlctl cluster join`"
                    .into(),
            }),
            keys: RwLock::new(None),
        });
        let mut phase = this.phase.lock().await;
        if let Some(file) = this.read_cluster_file()? {
            let token: JoinToken = file.token.parse()?;
            if let Some(t) = &this.config.join_token
                && t.cluster_id() != token.cluster_id()
            {
                warn!(persisted = %token.cluster_id(), configured = %t.cluster_id(),
                      "--join-token names another cluster than the persisted membership; keeping the persisted one (leave first to switch)");
            }
            let mut seeds: BTreeSet<SocketAddr> = file.peers.into_iter().collect();
            seeds.extend(this.config.seeds.iter().copied());
            info!(cluster = %token.cluster_id(), peers = seeds.len(), "rejoining persisted cluster");
            *phase = this
                .activate(token, seeds.into_iter().collect(), false)
                .await?;
        } else if this.config.join_token.is_none() && !this.config.seeds.is_empty() {
            warn!(
                "--seed given without --join-token: not joining; give the token or run `ovlctl cluster join`"
            );
            *phase = Phase::Unclustered {
                reason: "not in a cluster: --seed was given without --join-token; run `ovlctl cluster join --token T SEED` or restart with --join-token".into(),
            };
        } else if let Some(token) = this.config.join_token.clone() {
            if this.config.seeds.is_empty() {
                *phase = Phase::Unclustered {
                    reason: "not joined: --join-token was given without any --seed".into(),
                };
            } else {
                let task = tokio::spawn(this.clone().unattended_join(token));
                *phase = Phase::Joining {
                    reason: "joining: contacting seeds".into(),
                    task,
                };
            }
        }
        drop(phase);
        Ok(this)
    }

    pub fn node_id(&self) -> NodeId {
        self.identity.node_id
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub async fn init(&self) -> Result<(ClusterId, String), ClusterError> {
        let mut phase = self.phase.lock().await;
        self.refuse_if_active(&phase)?;
        let token = JoinToken::generate(&self.rng).map_err(|_| ClusterError::Random)?;
        let revealed = token.reveal();
        let id = token.cluster_id();
        cancel_join(&phase);
        *phase = self.activate(token, Vec::new(), true).await?;
        info!(cluster = %id, node = %self.identity.node_id, "initialised a new cluster");
        Ok((id, revealed))
    }

    /// Joins after the first seed that proves it holds the token's key.
    pub async fn join(
        &self,
        token: &str,
        seeds: &[String],
    ) -> Result<(ClusterId, SocketAddr), ClusterError> {
        let token: JoinToken = token.parse()?;
        let seeds = self.parse_seeds(seeds)?;
        self.refuse_if_active(&*self.phase.lock().await)?;
        // Probe without holding the lock: status stays answerable meanwhile.
        let via = self.probe(&token, &seeds).await?;
        let mut phase = self.phase.lock().await;
        self.refuse_if_active(&phase)?;
        cancel_join(&phase);
        let id = token.cluster_id();
        *phase = self.activate(token, seeds, true).await?;
        info!(cluster = %id, via = %via, "joined the cluster");
        Ok((id, via))
    }

    pub async fn leave(&self) -> Result<(), ClusterError> {
        let mut phase = self.phase.lock().await;
        let old = std::mem::replace(
            &mut *phase,
            Phase::Unclustered {
                reason: "left the cluster; run `ovlctl cluster init` or `ovlctl cluster join`"
                    .into(),
            },
        );
        match old {
            Phase::Unclustered { reason } => {
                *phase = Phase::Unclustered { reason };
                return Err(ClusterError::NotClustered);
            }
            Phase::Joining { task, .. } => task.abort(),
            Phase::Active {
                membership,
                remember,
                ..
            } => {
                remember.abort();
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = None;
                let removed = persist::remove_durable(&self.cluster_file());
                // Announce the leave even if the file could not go: the
                // phase is already unclustered and gossip must not linger.
                membership.leave().await;
                removed?;
            }
        }
        info!(node = %self.identity.node_id, "left the cluster");
        Ok(())
    }

    /// The cluster keys, while the node is in a cluster.
    pub fn keys(&self) -> Option<Arc<ClusterKeys>> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Every node as membership sees it; empty when not in a cluster.
    pub async fn members(&self) -> Vec<NodeView> {
        match self.membership().await {
            Some(m) => m.nodes().await,
            None => Vec::new(),
        }
    }

    /// The running membership, while the node is in a cluster.
    pub async fn membership(&self) -> Option<Arc<Membership>> {
        match &*self.phase.lock().await {
            Phase::Active { membership, .. } => Some(membership.clone()),
            _ => None,
        }
    }

    pub async fn join_token(&self) -> Result<String, ClusterError> {
        match &*self.phase.lock().await {
            Phase::Active { token, .. } => Ok(token.reveal()),
            _ => Err(ClusterError::NotClustered),
        }
    }

    pub async fn status(&self) -> Status {
        let (state, reason, cluster_id, membership) = match &*self.phase.lock().await {
            Phase::Unclustered { reason } => ("unclustered", reason.clone(), None, None),
            Phase::Joining { reason, .. } => ("joining", reason.clone(), None, None),
            Phase::Active {
                token, membership, ..
            } => (
                "active",
                String::new(),
                Some(token.cluster_id()),
                Some(membership.clone()),
            ),
        };
        let nodes = match &membership {
            Some(m) => m.nodes().await,
            None => Vec::new(),
        };
        let reason = if membership.is_some() {
            let alive = alive_count(&nodes);
            format!("in cluster, {alive} of {} nodes alive", nodes.len())
        } else {
            reason
        };
        Status {
            node_id: self.identity.node_id,
            node_name: self.config.node_name.clone(),
            state,
            reason,
            cluster_id,
            generation: self.generation.load(Ordering::Relaxed),
            nodes,
        }
    }

    pub async fn nodes(&self) -> Result<Vec<NodeView>, ClusterError> {
        let membership = match &*self.phase.lock().await {
            Phase::Active { membership, .. } => membership.clone(),
            _ => return Err(ClusterError::NotClustered),
        };
        Ok(membership.nodes().await)
    }

    /// Stops gossip without announcing a leave (agent restart or shutdown).
    pub async fn shutdown(&self) {
        let mut phase = self.phase.lock().await;
        let old = std::mem::replace(
            &mut *phase,
            Phase::Unclustered {
                reason: "agent shutting down".into(),
            },
        );
        match old {
            Phase::Joining { task, .. } => task.abort(),
            Phase::Active {
                membership,
                remember,
                ..
            } => {
                remember.abort();
                membership.shutdown().await;
            }
            Phase::Unclustered { .. } => {}
        }
    }

    /// Unix milliseconds, strictly above the previous generation.
    fn next_generation(&self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(1);
        let prev = self.generation.load(Ordering::Relaxed);
        let next = now.max(prev + 1);
        self.generation.store(next, Ordering::Relaxed);
        next
    }

    fn refuse_if_active(&self, phase: &Phase) -> Result<(), ClusterError> {
        match phase {
            Phase::Active { token, .. } => Err(ClusterError::AlreadyClustered(token.cluster_id())),
            _ => Ok(()),
        }
    }

    fn parse_seeds(&self, seeds: &[String]) -> Result<Vec<SocketAddr>, ClusterError> {
        if seeds.is_empty() {
            return Err(ClusterError::NoSeeds);
        }
        seeds
            .iter()
            .map(|s| {
                crate::config::parse_seed(s, self.config.gossip_port)
                    .ok_or_else(|| ClusterError::BadSeed(s.clone()))
            })
            .collect()
    }

    async fn probe(
        &self,
        token: &JoinToken,
        seeds: &[SocketAddr],
    ) -> Result<SocketAddr, ClusterError> {
        let keys = token.keys();
        let tls = peer::TlsIdentity::from_pkcs8(self.identity.pkcs8())
            .map_err(|e| ClusterError::Refused(e.to_string()))?;
        let mut failures: Vec<HelloError> = Vec::new();
        for &seed in seeds {
            match peer::hello(seed, &keys, &tls, &self.rng).await {
                Ok(node) => {
                    info!(seed = %seed, seed_node = %node, "seed proved the cluster key");
                    return Ok(seed);
                }
                Err(e) => {
                    warn!(seed = %seed, error = %e, "seed did not accept the join");
                    failures.push(e);
                }
            }
        }
        let text = failures
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        if failures.iter().any(HelloError::is_token_mismatch) {
            Err(ClusterError::Refused(text))
        } else {
            Err(ClusterError::Unreachable(text))
        }
    }

    /// Retries the configured seeds until one accepts; the reason of the last
    /// failure stays visible in `cluster status`.
    async fn unattended_join(self: Arc<Self>, token: JoinToken) {
        let mut backoff = Duration::from_secs(1);
        loop {
            let result = self.probe(&token, &self.config.seeds).await;
            let mut phase = self.phase.lock().await;
            if !matches!(*phase, Phase::Joining { .. }) {
                return;
            }
            match result {
                Ok(via) => match self
                    .activate(token.clone(), self.config.seeds.clone(), true)
                    .await
                {
                    Ok(active) => {
                        // Replacing the phase drops our own JoinHandle, which
                        // detaches (does not abort) this task.
                        *phase = active;
                        info!(cluster = %token.cluster_id(), via = %via, "joined the cluster");
                        return;
                    }
                    Err(e) => set_join_reason(&mut phase, format!("not joined: {e}")),
                },
                Err(e) => set_join_reason(&mut phase, format!("not joined: {e}")),
            }
            drop(phase);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    /// Starts membership for `token` and returns the active phase.
    async fn activate(
        &self,
        token: JoinToken,
        seeds: Vec<SocketAddr>,
        persist_now: bool,
    ) -> Result<Phase, ClusterError> {
        let file = self.cluster_file();
        if persist_now {
            write_cluster_file(&file, &token, &seeds)?;
        }
        let keys = Arc::new(token.keys());
        let facts = vec![
            (keys::NAME.to_string(), self.config.node_name.clone()),
            (
                keys::ADVERTISE_ADDR.to_string(),
                self.config.advertise_addr.to_string(),
            ),
            (
                keys::DATA_PATH_ADDR.to_string(),
                self.config.data_path_addr.to_string(),
            ),
            (
                keys::IDENTITY_PK.to_string(),
                self.identity.public_key_hex(),
            ),
        ];
        let started = Membership::start(MembershipConfig {
            node_id: self.identity.node_id,
            generation: self.next_generation(),
            cluster_id: token.cluster_id(),
            gossip_addr: self.config.gossip_addr(),
            seeds,
            facts,
            sealer: membership::sealer(keys.gossip.clone()),
            counters: self.counters.clone(),
            tuning: Tuning {
                gossip_interval: self.config.gossip_interval,
                ..Tuning::default()
            },
        })
        .await;
        let membership = match started {
            Ok(m) => Arc::new(m),
            Err(e) => {
                if persist_now {
                    // Nothing changed: the join did not happen.
                    let _ = persist::remove_durable(&file);
                }
                return Err(e.into());
            }
        };
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Some(keys);
        let remember = tokio::spawn(watch_members(membership.clone(), file, token.clone()));
        Ok(Phase::Active {
            token,
            membership,
            remember,
        })
    }

    fn cluster_file(&self) -> PathBuf {
        self.config.state_dir.join(CLUSTER_FILE)
    }

    fn read_cluster_file(&self) -> Result<Option<ClusterFile>, ClusterError> {
        let path = self.cluster_file();
        let Some(raw) = persist::read_optional(&path)? else {
            return Ok(None);
        };
        serde_json::from_slice(&raw).map(Some).map_err(|e| {
            ClusterError::Refused(format!(
                "{}: corrupt ({e}); remove it to start unclustered",
                path.display()
            ))
        })
    }
}

fn cancel_join(phase: &Phase) {
    if let Phase::Joining { task, .. } = phase {
        task.abort();
    }
}

fn set_join_reason(phase: &mut Phase, text: String) {
    if let Phase::Joining { reason, .. } = phase
        && *reason != text
    {
        warn!(reason = %text, "unattended join still pending");
        *reason = text;
    }
}

fn write_cluster_file(
    path: &std::path::Path,
    token: &JoinToken,
    peers: &[SocketAddr],
) -> Result<(), PersistError> {
    let file = ClusterFile {
        token: token.reveal(),
        peers: peers.to_vec(),
    };
    // Serialising plain strings and addresses cannot fail.
    let json = serde_json::to_vec_pretty(&file).unwrap_or_default();
    persist::write_atomic(path, &json)
}

/// Follows membership: logs every node state change, and keeps the
/// persisted peer list current so a restart finds the cluster even when the
/// original seeds are gone.
async fn watch_members(membership: Arc<Membership>, path: PathBuf, token: JoinToken) {
    let mut changes = membership.watch().await;
    let mut persisted: BTreeSet<SocketAddr> = BTreeSet::new();
    let mut seen = view::Seen::new();
    loop {
        let nodes = membership.nodes().await;
        for change in view::changes(&mut seen, &nodes) {
            log_change(&nodes, change);
        }
        let peers: BTreeSet<SocketAddr> = nodes
            .iter()
            .filter(|n| !n.is_self && n.status != NodeStatus::Left)
            .map(|n| n.gossip_addr)
            .take(MAX_REMEMBERED_PEERS)
            .collect();
        if !peers.is_empty() && peers != persisted {
            let list: Vec<SocketAddr> = peers.iter().copied().collect();
            match write_cluster_file(&path, &token, &list) {
                Ok(()) => persisted = peers,
                Err(e) => warn!(error = %e, "could not persist known peers"),
            }
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

fn log_change(nodes: &[NodeView], change: view::Change) {
    let name = |id: &NodeId| {
        nodes
            .iter()
            .find(|n| n.id == *id)
            .map(|n| n.name.clone())
            .unwrap_or_default()
    };
    match change {
        view::Change::Appeared(id, status) => {
            info!(peer = %id, name = %name(&id), status = status.as_str(), "node discovered")
        }
        view::Change::Status(id, from, to) => info!(peer = %id, name = %name(&id),
            from = from.as_str(), to = to.as_str(), "node status changed"),
        view::Change::Restarted(id, generation) => {
            info!(peer = %id, name = %name(&id), generation, "node restarted")
        }
        view::Change::Forgotten(id) => info!(peer = %id, "node forgotten after grace period"),
    }
}
