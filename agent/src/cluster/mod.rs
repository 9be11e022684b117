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
use tracing::{error, info, warn};

use crate::config::Config;
use crate::ids::decode_hex;
use crate::ids::{ClusterId, NodeId};
use crate::keys::ClusterKey;
use crate::keys::identity::Identity;
use crate::keys::token::{JoinToken, TokenError};
use crate::membership::{
    self, Membership, MembershipConfig, NodeFacts, NodeStatus, NodeView, Tuning, view,
};
use crate::metrics::Counters;
use crate::peer::{self, HelloError};
use crate::persist::{self, PersistError};

mod rekey;
pub use rekey::KeyKeeper;

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
    #[error("no node {0:?} in the cluster (give a node id, an id prefix or a name)")]
    NoSuchNode(String),
    #[error("{0:?} matches {1} nodes: give the full node id")]
    AmbiguousNode(String, usize),
    #[error("a node cannot remove itself: run `ovlctl cluster leave` on it instead")]
    RemoveSelf,
}

/// The persisted part of an active membership.
#[derive(Serialize, Deserialize)]
struct ClusterFile {
    /// The join token this node admits with (the newest it knows).
    token: String,
    #[serde(default)]
    token_issued_at_ms: u64,
    /// Hex; absent in files of earlier versions, whose cluster secret is
    /// the token's.
    #[serde(default)]
    cluster_secret: Option<String>,
    /// The cluster key's epoch (0 until the first `node rm`).
    #[serde(default)]
    cluster_key_epoch: u32,
    #[serde(default)]
    peers: Vec<SocketAddr>,
    /// Node ids of the members last seen (hex): a restarted node that
    /// missed a key rotation fetches the new key only from one of them.
    #[serde(default)]
    members: Vec<String>,
    /// Node ids removed from the cluster (hex).
    #[serde(default)]
    removed: Vec<String>,
    /// The cluster key's member set (hex node ids; empty: no set), see
    /// `keys::cluster_key`.
    #[serde(default)]
    key_members: Vec<String>,
}

/// What a member holds: the token it admits with and the cluster key every
/// member shares (see `token.rs`, `keys::cluster_key`).
#[derive(Clone)]
pub struct Credentials {
    pub token: JoinToken,
    /// When the token was issued (0: the cluster's first); the newest wins.
    pub issued_at: u64,
    /// The key gossip is sealed with now (the keyring's primary).
    pub cluster_key: ClusterKey,
    /// That key's member set as handed over (empty: no set).
    pub key_members: BTreeSet<NodeId>,
}

impl Credentials {
    fn facts_token(&self) -> Option<(u64, [u8; 32])> {
        Some((self.issued_at, self.token.secret()))
    }
}

type SharedCredentials = Arc<RwLock<Option<Credentials>>>;

enum Phase {
    Unclustered {
        reason: String,
    },
    Joining {
        reason: String,
        task: JoinHandle<()>,
    },
    Active {
        cluster_id: ClusterId,
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
    /// The cluster key in use ("epoch N (fingerprint)"), never the key.
    pub cluster_key: Option<crate::keys::KeyId>,
}

/// How many of `nodes` are alive.
pub fn alive_count(nodes: &[NodeView]) -> usize {
    nodes
        .iter()
        .filter(|n| n.status == NodeStatus::Alive)
        .count()
}

pub struct Cluster {
    config: Arc<Config>,
    /// What `Core` and the tasks see: swapped on join and leave.
    view: membership::current::ClusterView,
    identity: Identity,
    /// Chitchat incarnation: fresh for every activation, so a node that
    /// left and joins again in the same process is not taken for the old
    /// incarnation (which peers remember as left, with higher versions).
    generation: AtomicU64,
    counters: Arc<Counters>,
    rng: SystemRandom,
    phase: Mutex<Phase>,
    /// Snapshot for the peer server, which must not wait on `phase`.
    keeper: RwLock<Option<Arc<KeyKeeper>>>,
    channels: Arc<peer::Channels>,
    credentials: SharedCredentials,
    removed: membership::Removed,
    /// Why gossip died, if it did: `main` ends the agent (no zombie).
    fatal: tokio::sync::watch::Sender<Option<String>>,
}

impl Cluster {
    /// Restores the persisted membership or starts the unattended join.
    pub async fn start(
        config: Config,
        identity: Identity,
        counters: Arc<Counters>,
        channels: Arc<peer::Channels>,
    ) -> Result<Arc<Self>, ClusterError> {
        let config = Arc::new(config);
        let this = Arc::new(Self {
            view: membership::current::ClusterView::new(identity.node_id, config.clone()),
            config,
            identity,
            generation: AtomicU64::new(0),
            counters,
            rng: SystemRandom::new(),
            phase: Mutex::new(Phase::Unclustered {
                reason: "not in a cluster: run `ovlctl cluster init` or `ovlctl cluster join`"
                    .into(),
            }),
            keeper: RwLock::new(None),
            channels,
            credentials: Arc::new(RwLock::new(None)),
            removed: Default::default(),
            fatal: tokio::sync::watch::channel(None).0,
        });
        let mut phase = this.phase.lock().await;
        if let Some(file) = this.read_cluster_file()? {
            let token: JoinToken = file.token.parse()?;
            let secret = match &file.cluster_secret {
                Some(hex) => decode_hex::<32>(hex).map_err(|_| {
                    ClusterError::Refused(format!(
                        "{}: corrupt cluster secret; remove it to start unclustered",
                        this.cluster_file().display()
                    ))
                })?,
                None => token.secret(),
            };
            if let Some(t) = &this.config.join_token
                && t.cluster_id() != token.cluster_id()
            {
                warn!(persisted = %token.cluster_id(), configured = %t.cluster_id(),
                      "--join-token names another cluster than the persisted membership; keeping the persisted one (leave first to switch)");
            }
            let mut seeds: BTreeSet<SocketAddr> = file.peers.into_iter().collect();
            seeds.extend(this.config.seeds.iter().copied());
            info!(cluster = %token.cluster_id(), peers = seeds.len(), "rejoining persisted cluster");
            let creds = Credentials {
                cluster_key: ClusterKey::derive(token.cluster_id(), file.cluster_key_epoch, secret),
                token,
                issued_at: file.token_issued_at_ms,
                key_members: file
                    .key_members
                    .iter()
                    .filter_map(|h| h.parse().ok())
                    .collect(),
            };
            *this.removed.write().unwrap_or_else(|e| e.into_inner()) =
                file.removed.iter().filter_map(|h| h.parse().ok()).collect();
            *phase = this
                .activate(creds, seeds.into_iter().collect(), false)
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

    /// Changes to `Some(reason)` when gossip dies under us.
    pub fn fatal(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.fatal.subscribe()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The view of the cluster the rest of the agent works from.
    pub fn view(&self) -> membership::current::ClusterView {
        self.view.clone()
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
        let creds = Credentials {
            cluster_key: token.first_cluster_key(),
            token,
            issued_at: 0,
            key_members: BTreeSet::new(),
        };
        *phase = self.activate(creds, Vec::new(), true).await?;
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
        let (via, creds) = self.probe(&token, &seeds).await?;
        let mut phase = self.phase.lock().await;
        self.refuse_if_active(&phase)?;
        cancel_join(&phase);
        let id = token.cluster_id();
        *phase = self.activate(creds, seeds, true).await?;
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
                self.view.set(None);
                *self.keeper.write().unwrap_or_else(|e| e.into_inner()) = None;
                *self.credentials.write().unwrap_or_else(|e| e.into_inner()) = None;
                self.removed
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .clear();
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

    /// What rotates and hands out the cluster key, while in a cluster.
    pub fn keeper(&self) -> Option<Arc<KeyKeeper>> {
        self.keeper
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The running membership, while the node is in a cluster.
    pub async fn membership(&self) -> Option<Arc<Membership>> {
        match &*self.phase.lock().await {
            Phase::Active { membership, .. } => Some(membership.clone()),
            _ => None,
        }
    }

    /// The token and cluster key, while the node is in a cluster.
    pub fn admission(&self) -> Option<Credentials> {
        self.credentials
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub async fn join_token(&self) -> Result<String, ClusterError> {
        match &*self.phase.lock().await {
            Phase::Active { .. } => self
                .admission()
                .map(|c| c.token.reveal())
                .ok_or(ClusterError::NotClustered),
            _ => Err(ClusterError::NotClustered),
        }
    }

    /// A new join token for the cluster: it admits new nodes, the old one
    /// stops admitting as members learn of it (gossip), and members stay
    /// (the cluster key does not change).
    pub async fn rotate_token(&self) -> Result<String, ClusterError> {
        let phase = self.phase.lock().await;
        if !matches!(&*phase, Phase::Active { .. }) {
            return Err(ClusterError::NotClustered);
        }
        let keeper = self.keeper().ok_or(ClusterError::NotClustered)?;
        let creds = keeper.rotate_token().await?;
        info!(cluster = %creds.token.cluster_id(), issued_at = creds.issued_at, "join token rotated here; the old token stops admitting as members learn of it");
        Ok(creds.token.reveal())
    }

    /// Removes a node (like `docker node rm`): every member stops hearing
    /// its gossip and refuses its peer calls, its records are withdrawn
    /// everywhere, and the join token is rotated so it cannot come back
    /// with the one it knew. `target` is a node id, an id prefix (6+ hex
    /// digits) or a node name. Returns the node and the new token.
    pub async fn remove_node(&self, target: &str) -> Result<(NodeView, String), ClusterError> {
        let membership = self.membership().await.ok_or(ClusterError::NotClustered)?;
        let nodes = membership.nodes().await;
        let matches: Vec<&NodeView> = nodes
            .iter()
            .filter(|n| {
                n.id.to_string() == target
                    || (target.len() >= 6 && n.id.to_string().starts_with(target))
                    || n.name == target
            })
            .collect();
        let node = match matches.as_slice() {
            [one] => (*one).clone(),
            [] => return Err(ClusterError::NoSuchNode(target.to_string())),
            _ => {
                return Err(ClusterError::AmbiguousNode(
                    target.to_string(),
                    matches.len(),
                ));
            }
        };
        if node.is_self {
            return Err(ClusterError::RemoveSelf);
        }
        let keeper = self.keeper().ok_or(ClusterError::NotClustered)?;
        keeper.add_removals(&[node.id], None).await?;
        warn!(peer = %node.id, name = %node.name, "node removed from the cluster here: its gossip and peer calls are refused everywhere, its records withdrawn");
        // The new key first, so the new token only ever travels in gossip
        // the removed node cannot open.
        keeper.rotate(&membership).await?;
        let token = self.rotate_token().await?;
        Ok((node, token))
    }

    pub async fn status(&self) -> Status {
        let (state, reason, cluster_id, membership) = match &*self.phase.lock().await {
            Phase::Unclustered { reason } => ("unclustered", reason.clone(), None, None),
            Phase::Joining { reason, .. } => ("joining", reason.clone(), None, None),
            Phase::Active {
                cluster_id,
                membership,
                ..
            } => (
                "active",
                String::new(),
                Some(*cluster_id),
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
            cluster_key: self.admission().map(|c| c.cluster_key.id()),
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
                self.view.set(None);
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
            Phase::Active { cluster_id, .. } => Err(ClusterError::AlreadyClustered(*cluster_id)),
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

    /// Asks seeds in turn to prove they hold `token`; the first that does
    /// hands over the cluster secret.
    async fn probe(
        &self,
        token: &JoinToken,
        seeds: &[SocketAddr],
    ) -> Result<(SocketAddr, Credentials), ClusterError> {
        let keys = token.admission();
        let tls = peer::TlsIdentity::from_pkcs8(self.identity.pkcs8())
            .map_err(|e| ClusterError::Refused(e.to_string()))?;
        let mut failures: Vec<HelloError> = Vec::new();
        for &seed in seeds {
            match peer::hello(seed, &keys, &tls, &self.rng).await {
                Ok((node, epoch, secret, key_members)) => {
                    let cluster_key = ClusterKey::derive(token.cluster_id(), epoch, secret);
                    info!(seed = %seed, seed_node = %node, key = %cluster_key.id(), key_members = key_members.len(),
                          "seed proved the join token and handed over the cluster key");
                    let creds = Credentials {
                        token: token.clone(),
                        issued_at: 0,
                        cluster_key,
                        key_members,
                    };
                    return Ok((seed, creds));
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
                Ok((via, creds)) => {
                    match self.activate(creds, self.config.seeds.clone(), true).await {
                        Ok(active) => {
                            // Replacing the phase drops our own JoinHandle, which
                            // detaches (does not abort) this task.
                            *phase = active;
                            info!(cluster = %token.cluster_id(), via = %via, "joined the cluster");
                            return;
                        }
                        Err(e) => set_join_reason(&mut phase, format!("not joined: {e}")),
                    }
                }
                Err(e) => set_join_reason(&mut phase, format!("not joined: {e}")),
            }
            drop(phase);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    /// Starts membership with `creds` and returns the active phase.
    async fn activate(
        &self,
        creds: Credentials,
        seeds: Vec<SocketAddr>,
        persist_now: bool,
    ) -> Result<Phase, ClusterError> {
        let file = self.cluster_file();
        if persist_now {
            write_cluster_file(&file, &creds, Some(&seeds), None)?;
        }
        let cluster_id = creds.token.cluster_id();
        let sealer = membership::sealer(creds.cluster_key.clone());
        sealer.with_ring(|r| r.set_members(creds.cluster_key.id(), creds.key_members.clone()));
        let (key_events_tx, key_events) = tokio::sync::mpsc::channel(16);
        let facts = NodeFacts {
            name: self.config.node_name.clone(),
            advertise_addr: self.config.advertise_addr.to_string(),
            data_path_addr: self.config.data_path_addr.to_string(),
            table_version: 0,
            left: false,
            token: creds.facts_token(),
            removed: self
                .removed
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            // Published by the key schedule task once membership runs.
            exchange_keys: Vec::new(),
            encrypted_port: self.config.encrypted_port,
            // Kept current by the reconciler from then on.
            data_path_mtu: match self.config.data_path_mtu_at_start {
                0 => 0,
                m => m.clamp(
                    membership::record::MIN_DATA_PATH_MTU,
                    membership::record::MAX_DATA_PATH_MTU,
                ),
            },
        };
        let started = Membership::start(MembershipConfig {
            node_id: self.identity.node_id,
            generation: self.next_generation(),
            cluster_id,
            gossip_addr: self.config.gossip_addr(),
            seeds,
            facts,
            identity: self.identity.key.clone(),
            sealer: sealer.clone(),
            counters: self.counters.clone(),
            tuning: Tuning {
                gossip_interval: self.config.gossip_interval,
                ..Tuning::default()
            },
            removed: self.removed.clone(),
            key_events: key_events_tx,
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
        *self.credentials.write().unwrap_or_else(|e| e.into_inner()) = Some(creds);
        let keeper = Arc::new(KeyKeeper {
            sealer,
            credentials: self.credentials.clone(),
            path: file.clone(),
            channels: self.channels.clone(),
            membership: membership.clone(),
            removed: self.removed.clone(),
            me: self.identity.node_id,
            rng: SystemRandom::new(),
            counters: self.counters.clone(),
            token_pending: std::sync::Mutex::new(None),
            rerotating: std::sync::atomic::AtomicBool::new(false),
        });
        *self.keeper.write().unwrap_or_else(|e| e.into_inner()) = Some(keeper.clone());
        let fatal = self.fatal.clone();
        let credentials = self.credentials.clone();
        let removed = self.removed.clone();
        let me = self.identity.node_id;
        let watched = membership.clone();
        let remember = tokio::spawn(async move {
            tokio::select! {
                () = watch_members(watched.clone(), file, credentials, removed, me) => {}
                // The key events end with the gossip transport: then only
                // `failed` may end this task, with the reason.
                () = async {
                    keeper.run(key_events).await;
                    std::future::pending::<()>().await
                } => {}
                reason = watched.failed() => {
                    let _ = fatal.send(Some(reason));
                }
            }
        });
        self.view.set(Some(membership.clone()));
        Ok(Phase::Active {
            cluster_id,
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

/// Serialises read-modify-writes of the state file (several tasks update
/// parts of it).
static FILE_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Writes the state file with `creds`, and `peers`/`members` when given;
/// what is not given is kept from the file as it is.
fn write_cluster_file(
    path: &std::path::Path,
    creds: &Credentials,
    peers: Option<&[SocketAddr]>,
    members: Option<&[NodeId]>,
) -> Result<(), PersistError> {
    let _lock = FILE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let current = current_file(path);
    let (old_peers, old_members, removed) = current
        .map(|f| (f.peers, f.members, f.removed))
        .unwrap_or_default();
    let file = ClusterFile {
        token: creds.token.reveal(),
        token_issued_at_ms: creds.issued_at,
        cluster_secret: Some(crate::ids::encode_hex(&creds.cluster_key.secret())),
        cluster_key_epoch: creds.cluster_key.id().epoch,
        peers: peers.map(<[_]>::to_vec).unwrap_or(old_peers),
        members: members
            .map(|m| m.iter().map(ToString::to_string).collect())
            .unwrap_or(old_members),
        removed,
        key_members: creds.key_members.iter().map(ToString::to_string).collect(),
    };
    // Serialising plain strings and addresses cannot fail.
    let json = serde_json::to_vec_pretty(&file).unwrap_or_default();
    persist::write_atomic(path, &json)
}

/// Follows membership: logs every node state change, and keeps the
/// persisted peer list current so a restart finds the cluster even when the
/// original seeds are gone.
async fn watch_members(
    membership: Arc<Membership>,
    path: PathBuf,
    creds: SharedCredentials,
    removed: membership::Removed,
    me: NodeId,
) {
    let mut changes = membership.watch().await;
    let mut persisted: (BTreeSet<SocketAddr>, BTreeSet<NodeId>) = Default::default();
    let mut seen = view::Seen::new();
    loop {
        let nodes = membership.nodes().await;
        for change in view::changes(&mut seen, &nodes) {
            log_change(&nodes, change);
        }
        adopt_newest_token(&membership, &path, &creds, &nodes).await;
        adopt_removals(&membership, &path, &removed, me).await;
        let others = nodes
            .iter()
            .filter(|n| !n.is_self && n.status != NodeStatus::Left)
            .take(MAX_REMEMBERED_PEERS);
        let known: (BTreeSet<SocketAddr>, BTreeSet<NodeId>) = (
            others.clone().map(|n| n.gossip_addr).collect(),
            others.map(|n| n.id).collect(),
        );
        if !known.0.is_empty() && known != persisted {
            let peers: Vec<SocketAddr> = known.0.iter().copied().collect();
            let members: Vec<NodeId> = known.1.iter().copied().collect();
            // Under the credentials' lock, as `adopt` writes: a key or token
            // adopted meanwhile is never written back to its old value.
            let written = match &*creds.read().unwrap_or_else(|e| e.into_inner()) {
                Some(current) => write_cluster_file(&path, current, Some(&peers), Some(&members)),
                None => Ok(()),
            };
            match written {
                Ok(()) => persisted = known,
                Err(e) => warn!(error = %e, "could not persist known peers"),
            }
        }
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// Unions the removals members publish into ours (persisted first, then
/// in force, then republished so they outlive the node that made them).
async fn adopt_removals(
    membership: &Membership,
    path: &std::path::Path,
    removed: &membership::Removed,
    me: NodeId,
) {
    let mut offered = Vec::new();
    for (by, ids) in membership.published_removals().await {
        for id in ids {
            if id == me {
                if let Some(n) = SELF_REMOVED_LOG.check(std::time::Instant::now()) {
                    error!(by = %by, suppressed = n, "this node was removed from the cluster (ovlctl node rm): members refuse it; wipe its state dir and join again as a new node");
                }
                continue;
            }
            offered.push((by, id));
        }
    }
    let ids: Vec<NodeId> = offered.iter().map(|(_, id)| *id).collect();
    let next = match union_removals(removed, path, &ids, me) {
        Ok(Some((next, learned))) => {
            for (by, id) in offered.iter().filter(|(_, id)| learned.contains(id)) {
                warn!(peer = %id, by = %by, "node removed from the cluster by a member: its gossip and peer calls are refused");
            }
            next
        }
        Ok(None) => return,
        Err(e) => {
            warn!(error = %e, "could not persist node removals; not applying them yet");
            return;
        }
    };
    membership.publish(|f| f.removed = next).await;
}

/// A removal union's result: the new set and the ids it added.
pub(super) type Union = (BTreeSet<NodeId>, Vec<NodeId>);

/// Unions `ids` into the removed set in one step under its lock (persisted
/// first, then in force), so concurrent unions never drop each other's ids.
/// Returns the new set and the ids it added, or `None` if nothing was new.
pub(super) fn union_removals(
    removed: &membership::Removed,
    path: &std::path::Path,
    ids: &[NodeId],
    me: NodeId,
) -> Result<Option<Union>, PersistError> {
    let mut set = removed.write().unwrap_or_else(|e| e.into_inner());
    let mut next = set.clone();
    let learned: Vec<NodeId> = ids
        .iter()
        .copied()
        .filter(|id| *id != me && next.len() < membership::record::MAX_REMOVED && next.insert(*id))
        .collect();
    if learned.is_empty() {
        return Ok(None);
    }
    persist_removed(path, &next)?;
    *set = next.clone();
    Ok(Some((next, learned)))
}

static SELF_REMOVED_LOG: crate::metrics::RateLimit =
    crate::metrics::RateLimit::new(Duration::from_secs(30));

/// The state file as it is now, if it exists and parses (start-up refuses
/// a corrupt one, so later writers only keep what they can read).
fn current_file(path: &std::path::Path) -> Option<ClusterFile> {
    let raw = persist::read_optional(path).ok().flatten()?;
    serde_json::from_slice(&raw).ok()
}

/// Rewrites the state file with `removed`, keeping everything else.
fn persist_removed(
    path: &std::path::Path,
    removed: &std::collections::BTreeSet<NodeId>,
) -> Result<(), PersistError> {
    let _lock = FILE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    // No file: the node left meanwhile, and there is nothing to keep.
    let Some(mut file) = current_file(path) else {
        return Ok(());
    };
    file.removed = removed.iter().map(ToString::to_string).collect();
    let json = serde_json::to_vec_pretty(&file).unwrap_or_default();
    persist::write_atomic(path, &json)
}

/// Takes the newest join token any member publishes (a `rotate-token`
/// anywhere): from then on this node admits only with it.
async fn adopt_newest_token(
    membership: &Membership,
    path: &std::path::Path,
    creds: &SharedCredentials,
    nodes: &[NodeView],
) {
    let Some(current) = creds.read().unwrap_or_else(|e| e.into_inner()).clone() else {
        return;
    };
    let newest = membership
        .published_tokens()
        .await
        .into_iter()
        .max_by_key(|(_, issued, secret)| (*issued, *secret));
    let Some((by, issued_at, secret)) = newest else {
        return;
    };
    if (issued_at, secret) <= (current.issued_at, current.token.secret()) {
        return;
    }
    let token = JoinToken::from_parts(current.token.cluster_id(), secret);
    let adopted = adopt(creds, membership, path, |c| {
        // Re-checked under the lock: another task may have moved on.
        if (issued_at, secret) > (c.issued_at, c.token.secret()) {
            c.token = token;
            c.issued_at = issued_at;
        }
    });
    match adopted.await {
        Ok(_) => {
            let name = nodes
                .iter()
                .find(|n| n.id == by)
                .map(|n| n.name.clone())
                .unwrap_or_default();
            info!(peer = %by, name = %name, issued_at, "join token rotated by a member; the old token no longer admits here");
        }
        Err(e) => {
            warn!(error = %e, "could not persist the rotated join token; keeping the old one")
        }
    }
}

/// Changes this node's credentials with `change`: persisted first, then
/// used, then the token published so a rotation survives the node that
/// made it. The change is applied to the credentials as they are under the
/// lock, so concurrent changes (a token here, a key there) never undo each
/// other. Returns the new credentials.
async fn adopt(
    shared: &SharedCredentials,
    membership: &Membership,
    path: &std::path::Path,
    change: impl FnOnce(&mut Credentials),
) -> Result<Credentials, ClusterError> {
    let next = {
        let mut guard = shared.write().unwrap_or_else(|e| e.into_inner());
        let mut next = guard.clone().ok_or(ClusterError::NotClustered)?;
        change(&mut next);
        write_cluster_file(path, &next, None, None)?;
        *guard = Some(next.clone());
        next
    };
    let token = next.facts_token();
    membership.publish(|f| f.token = token).await;
    Ok(next)
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
