//! Cluster key rotation and recovery: the I/O around `keys::Keyring`.
//!
//! `node rm` calls [`KeyKeeper::rotate`]: a fresh key is installed on every
//! live member over the TLS peer channel, then this node switches to it,
//! and members follow as they open its gossip (see `keys::cluster_key`).
//! A member that missed the install sees gossip under a key it lacks and
//! [fetches](KeyKeeper::run) it from a member it knows. Both calls are
//! member-only on the server side, so a removed node gets neither.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ovl_proto::peer::ClusterKeyMessage;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{ClusterError, SharedCredentials, adopt, current_file, union_removals};
use crate::ids::NodeId;
use crate::keys::{ClusterKey, KeyId, cluster_key};
use crate::membership::{self, KeyEvent, Membership, NodeStatus};
use crate::metrics::{Counter, Counters, RateLimit};
use crate::peer::Channels;

/// How long the remover waits for each member to install a new key.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(2);
/// At most one fetch round per this interval: every datagram under the
/// newer key reports the miss, and a stranger can forge such headers.
const FETCH_EVERY: Duration = Duration::from_secs(2);
/// Members asked per fetch round.
const FETCH_CANDIDATES: usize = 4;

static FETCH_LOG: RateLimit = RateLimit::new(Duration::from_secs(10));
static SERVE_LOG: RateLimit = RateLimit::new(Duration::from_secs(10));

/// Holds what rotating, installing and fetching the cluster key touch.
pub struct KeyKeeper {
    pub(super) sealer: Arc<membership::seal::Sealer>,
    pub(super) credentials: SharedCredentials,
    pub(super) path: PathBuf,
    pub(super) channels: Arc<Channels>,
    pub(super) membership: Arc<Membership>,
    pub(super) removed: membership::Removed,
    pub(super) me: NodeId,
    pub(super) rng: SystemRandom,
    pub(super) counters: Arc<Counters>,
    /// Set while a rotation's new key is here but its new token is not
    /// yet: (the token secret held then, until when). `Hello` is refused
    /// meanwhile, so the old token never buys the new key.
    pub(super) token_pending: std::sync::Mutex<Option<([u8; 32], Instant)>>,
    /// Set while a corrective rotation runs (see `install`).
    pub(super) rerotating: std::sync::atomic::AtomicBool,
}

/// How long `Hello` waits for a rotation's token at most.
const TOKEN_PENDING_FOR: Duration = Duration::from_secs(30);
/// How often the keyring's primary is compared with what is persisted (a
/// switch event lost to a full channel is caught up here).
const SYNC_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cluster key secret must be 32 bytes")]
    BadSecret,
    #[error("removed node ids must be 16 bytes each")]
    BadRemoved,
    #[error("key member ids must be 16 bytes each")]
    BadMembers,
    #[error("{0}")]
    Cluster(#[from] ClusterError),
}

impl KeyKeeper {
    /// Refuses `Hello` until the token that comes with a rotation arrives.
    fn hold_hello(&self) {
        let token = self
            .credentials
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|c| c.token.secret());
        if let Some(t) = token {
            *self.token_pending.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((t, Instant::now() + TOKEN_PENDING_FOR));
        }
    }

    /// Whether `Hello` must wait: a new key is here and the token that
    /// admits with it not yet.
    pub fn hello_on_hold(&self) -> bool {
        let mut pending = self.token_pending.lock().unwrap_or_else(|e| e.into_inner());
        let Some((old, until)) = *pending else {
            return false;
        };
        let current = self
            .credentials
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|c| c.token.secret());
        if Instant::now() >= until || current != Some(old) {
            *pending = None;
            return false;
        }
        true
    }

    fn cluster_id(&self) -> Option<crate::ids::ClusterId> {
        self.credentials
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|c| c.token.cluster_id())
    }

    fn primary(&self) -> ClusterKey {
        self.sealer.with_ring(|r| r.primary().clone())
    }

    /// The key this node seals with, its removals and its member set, for
    /// a member.
    pub fn current(&self) -> ClusterKeyMessage {
        let (key, members) = self
            .sealer
            .with_ring(|r| (r.primary().clone(), r.primary_members().cloned()));
        ClusterKeyMessage {
            epoch: key.id().epoch,
            secret: key.secret().to_vec(),
            removed: self.removed_ids(),
            members: cluster_key::members_to_wire(members.as_ref()),
        }
    }

    /// The member set handed to a joiner with the key in use (empty: no
    /// set), this node included.
    pub fn members_for_joiner(&self) -> Vec<Vec<u8>> {
        let members = self.sealer.with_ring(|r| {
            r.primary_members().cloned().map(|mut m| {
                m.insert(self.me);
                m
            })
        });
        cluster_key::members_to_wire(members.as_ref())
    }

    /// Whether this node hands its cluster key to `caller` (fetch) or takes
    /// one from it (install): once the key in use has a member set, only
    /// its members. A fresh identity minted with an old key never is one.
    pub fn serves(&self, caller: NodeId) -> bool {
        let ok = self
            .sealer
            .with_ring(|r| r.primary_members().is_none_or(|m| m.contains(&caller)));
        if !ok {
            self.counters.inc(Counter::ClusterKeyServeRefused);
            if let Some(n) = SERVE_LOG.check(Instant::now()) {
                warn!(node = %caller, suppressed = n,
                      "cluster key call refused: the node is not in the key's member set (a fresh identity through an old key?)");
            }
        }
        ok
    }

    fn removed_ids(&self) -> Vec<Vec<u8>> {
        self.removed
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|id| id.as_bytes().to_vec())
            .collect()
    }

    /// Unions `ids` into the removed set: persisted first, then in force,
    /// then published so removals outlive the node that made them.
    pub async fn add_removals(
        &self,
        ids: &[NodeId],
        by: Option<NodeId>,
    ) -> Result<(), ClusterError> {
        let Some((next, learned)) = union_removals(&self.removed, &self.path, ids, self.me)? else {
            return Ok(());
        };
        if let Some(by) = by {
            for id in &learned {
                warn!(peer = %id, by = %by, "node removed from the cluster by a member: its gossip and peer calls are refused");
            }
        }
        self.membership.publish(|f| f.removed = next).await;
        Ok(())
    }

    /// A fresh cluster key, installed on every live member, then used here.
    /// Members that do not answer in time catch up by fetching it.
    pub async fn rotate(&self, membership: &Membership) -> Result<KeyId, ClusterError> {
        let cluster_id = self.cluster_id().ok_or(ClusterError::NotClustered)?;
        let mut secret = [0u8; 32];
        self.rng
            .fill(&mut secret)
            .map_err(|_| ClusterError::Random)?;
        let newest = self.sealer.with_ring(|r| r.newest_epoch());
        let key = ClusterKey::derive(cluster_id, newest.saturating_add(1), secret);
        if !self.sealer.with_ring(|r| r.install(key.clone())) {
            return Err(ClusterError::Refused(format!(
                "cluster key {} not installed (epochs exhausted?)",
                key.id()
            )));
        }
        self.hold_hello();
        let nodes = membership.nodes().await;
        // The key's member set: every member we know (the removed are out
        // of the view already), ourselves included.
        let members: BTreeSet<NodeId> = nodes
            .iter()
            .filter(|n| n.status != NodeStatus::Left)
            .map(|n| n.id)
            .chain(std::iter::once(self.me))
            .take(cluster_key::MAX_KEY_MEMBERS)
            .collect();
        self.sealer
            .with_ring(|r| r.set_members(key.id(), members.clone()));
        let msg = ClusterKeyMessage {
            epoch: key.id().epoch,
            secret: secret.to_vec(),
            removed: self.removed_ids(),
            members: cluster_key::members_to_wire(Some(&members)),
        };
        let targets: Vec<_> = nodes
            .into_iter()
            .filter(|n| !n.is_self && n.status == NodeStatus::Alive)
            .collect();
        let calls = targets.iter().map(|n| {
            let msg = msg.clone();
            async move {
                let r = tokio::time::timeout(
                    INSTALL_TIMEOUT,
                    self.channels.install_cluster_key(n.gossip_addr, n.id, msg),
                )
                .await;
                match r {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(format!("{} ({}): {e}", n.name, n.id)),
                    Err(_) => Some(format!("{} ({}): timed out", n.name, n.id)),
                }
            }
        });
        let lagging: Vec<String> = futures::future::join_all(calls)
            .await
            .into_iter()
            .flatten()
            .collect();
        let now = crate::clock::now_ms();
        self.sealer
            .with_ring(|r| r.switch_to(key.id(), now).cloned());
        self.switched(key.clone(), None).await;
        if lagging.is_empty() {
            info!(key = %key.id(), members = targets.len(), "cluster key rotated: installed on every live member, now in use");
        } else {
            warn!(key = %key.id(), installed = targets.len() - lagging.len(), lagging = ?lagging,
                  "cluster key rotated; members that did not install it fetch it when they see it in use");
        }
        Ok(key.id())
    }

    /// A member hands us a new key (`by` is authenticated by TLS).
    pub async fn install(
        self: &Arc<Self>,
        by: NodeId,
        msg: &ClusterKeyMessage,
    ) -> Result<bool, InstallError> {
        let key = self.key_of(msg)?;
        let theirs = removed_of(msg)?;
        let members =
            cluster_key::members_from_wire(&msg.members).ok_or(InstallError::BadMembers)?;
        self.add_removals(&theirs, Some(by)).await?;
        let fresh = self.sealer.with_ring(|r| {
            let fresh = r.install(key.clone());
            if fresh {
                r.set_members(key.id(), members);
            }
            fresh
        });
        if fresh {
            self.hold_hello();
            self.counters.inc(Counter::ClusterKeyInstalled);
            info!(by = %by, key = %key.id(), "cluster key installed; switching when members use it");
        }
        // A rotation made without knowing one of our removals (two `node
        // rm` at once on two hosts) was installed on that removed node too:
        // rotate again, with every removal we know, so the key that wins
        // is one no removed node holds.
        let missing: Vec<NodeId> = self
            .removed
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|id| !theirs.contains(id))
            .copied()
            .collect();
        if fresh
            && !missing.is_empty()
            && !self
                .rerotating
                .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            warn!(by = %by, key = %key.id(), missing = ?missing,
                  "a member rotated the cluster key without knowing of some removals: rotating again");
            let this = self.clone();
            tokio::spawn(async move {
                let membership = this.membership.clone();
                // The key, then the token (published under the new key
                // only): the removed node may have read the other
                // rotation's token.
                let r = match this.rotate(&membership).await {
                    Ok(_) => this.rotate_token().await,
                    Err(e) => Err(e),
                };
                match r {
                    Ok(c) => info!(
                        issued_at = c.issued_at,
                        "join token rotated here after the corrective key rotation"
                    ),
                    Err(e) => {
                        warn!(error = %e, "could not rotate the cluster key and token again")
                    }
                }
                this.rerotating
                    .store(false, std::sync::atomic::Ordering::Release);
            });
        }
        Ok(fresh)
    }

    /// A new join token, adopted and published; returns the credentials
    /// with it (`rotate-token`, and after a corrective key rotation).
    pub(super) async fn rotate_token(&self) -> Result<super::Credentials, ClusterError> {
        let current = self
            .credentials
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(ClusterError::NotClustered)?;
        let token = current
            .token
            .rotated(&self.rng)
            .map_err(|_| ClusterError::Random)?;
        let issued_at = crate::clock::now_ms().max(current.issued_at.saturating_add(1));
        adopt(&self.credentials, &self.membership, &self.path, |c| {
            c.token = token;
            c.issued_at = issued_at;
        })
        .await
    }

    fn key_of(&self, msg: &ClusterKeyMessage) -> Result<ClusterKey, InstallError> {
        let secret: [u8; 32] = msg
            .secret
            .as_slice()
            .try_into()
            .map_err(|_| InstallError::BadSecret)?;
        let cluster_id = self.cluster_id().ok_or(ClusterError::NotClustered)?;
        Ok(ClusterKey::derive(cluster_id, msg.epoch, secret))
    }

    /// We seal with `key` now: persist it and hand it to joiners.
    async fn switched(&self, key: ClusterKey, by: Option<NodeId>) {
        let id = key.id();
        let members = self
            .sealer
            .with_ring(|r| r.members(id).cloned())
            .unwrap_or_default();
        let r = adopt(&self.credentials, &self.membership, &self.path, |c| {
            if key.id() > c.cluster_key.id() {
                c.cluster_key = key;
                c.key_members = members;
            }
        })
        .await;
        match (r, by) {
            (Ok(_), Some(by)) => {
                info!(key = %id, seen_from = %by, "switched to the new cluster key a member uses")
            }
            (Ok(_), None) => {}
            (Err(e), _) => {
                warn!(key = %id, error = %e, "switched to a new cluster key but could not persist it; a restart would need to fetch it again")
            }
        }
    }

    /// Follows gossip's key events until the channel closes.
    pub async fn run(self: Arc<Self>, mut events: mpsc::Receiver<KeyEvent>) {
        let mut last_fetch: Option<Instant> = None;
        let mut tick = tokio::time::interval(SYNC_EVERY);
        loop {
            let ev = tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => ev,
                    None => return,
                },
                _ = tick.tick() => {
                    self.catch_up().await;
                    continue;
                }
            };
            match ev {
                KeyEvent::Switched { key, by } => self.switched(*key, by).await,
                KeyEvent::MissedRotation { from, id } => {
                    if last_fetch.is_some_and(|t| t.elapsed() < FETCH_EVERY) {
                        continue;
                    }
                    self.fetch(from, id).await;
                    last_fetch = Some(Instant::now());
                }
            }
            self.sealer.with_ring(|r| r.expire(crate::clock::now_ms()));
        }
    }

    /// Persists the keyring's primary if a switch event was lost.
    async fn catch_up(&self) {
        let now = crate::clock::now_ms();
        self.sealer.with_ring(|r| r.expire(now));
        let primary = self.primary();
        let persisted = self
            .credentials
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|c| c.cluster_key.id());
        if persisted.is_some_and(|p| p < primary.id()) {
            self.switched(primary, None).await;
        }
    }

    /// Asks members for the key we missed: the datagram's sender first,
    /// then members we know. A key is taken only from a node whose
    /// certificate names a member we know and have not removed.
    async fn fetch(&self, from: SocketAddr, id: KeyId) {
        let known = self.known_members().await;
        let mut candidates = vec![from];
        for a in self.known_addrs().await {
            if !candidates.contains(&a) {
                candidates.push(a);
            }
        }
        let mut failures = Vec::new();
        for addr in candidates.into_iter().take(FETCH_CANDIDATES) {
            let (node, msg) = match self.channels.fetch_cluster_key_at(addr).await {
                Ok(r) => r,
                Err(e) => {
                    failures.push(format!("{addr}: {e}"));
                    continue;
                }
            };
            if !known.contains(&node) {
                self.counters.inc(Counter::ClusterKeyRefused);
                failures.push(format!(
                    "{addr}: node {node} is not a member this node knows"
                ));
                continue;
            }
            let key = match self.key_of(&msg) {
                Ok(k) => k,
                Err(e) => {
                    self.counters.inc(Counter::ClusterKeyRefused);
                    failures.push(format!("{addr}: {e}"));
                    continue;
                }
            };
            let Some(members) = cluster_key::members_from_wire(&msg.members) else {
                self.counters.inc(Counter::ClusterKeyRefused);
                failures.push(format!("{addr}: {}", InstallError::BadMembers));
                continue;
            };
            if let Ok(removed) = removed_of(&msg) {
                let _ = self.add_removals(&removed, Some(node)).await;
            }
            let now = crate::clock::now_ms();
            match self.sealer.with_ring(|r| {
                let k = r.adopt(key.clone(), now).cloned();
                if k.is_some() {
                    r.set_members(key.id(), members);
                }
                k
            }) {
                Some(k) => {
                    self.counters.inc(Counter::ClusterKeyFetched);
                    info!(key = %k.id(), from = %node, "missed a cluster key rotation; fetched the key from a member");
                    self.switched(k, None).await;
                    return;
                }
                None if self.primary().id() >= id => return,
                None => failures.push(format!("{addr}: member {node} does not have {id} either")),
            }
        }
        if let Some(n) = FETCH_LOG.check(Instant::now()) {
            warn!(missed = %id, failures = ?failures, suppressed = n,
                  "gossip uses a cluster key this node lacks and no member handed it over (removed from the cluster?)");
        }
    }

    /// Members we may take a key from: the current view and the persisted
    /// list, less the removed.
    async fn known_members(&self) -> BTreeSet<NodeId> {
        let mut known: BTreeSet<NodeId> = self
            .membership
            .nodes()
            .await
            .into_iter()
            .filter(|n| !n.is_self)
            .map(|n| n.id)
            .collect();
        if let Some(f) = current_file(&self.path) {
            known.extend(f.members.iter().filter_map(|h| h.parse::<NodeId>().ok()));
        }
        let removed = self.removed.read().unwrap_or_else(|e| e.into_inner());
        known.retain(|id| !removed.contains(id) && *id != self.me);
        known
    }

    async fn known_addrs(&self) -> Vec<SocketAddr> {
        let mut addrs: Vec<SocketAddr> = self
            .membership
            .nodes()
            .await
            .into_iter()
            .filter(|n| !n.is_self && n.status == NodeStatus::Alive)
            .map(|n| n.gossip_addr)
            .collect();
        if let Some(f) = current_file(&self.path) {
            addrs.extend(f.peers);
        }
        addrs
    }
}

fn removed_of(msg: &ClusterKeyMessage) -> Result<Vec<NodeId>, InstallError> {
    msg.removed
        .iter()
        .take(membership::record::MAX_REMOVED)
        .map(|b| {
            <[u8; 16]>::try_from(b.as_slice())
                .map(NodeId::from_bytes)
                .map_err(|_| InstallError::BadRemoved)
        })
        .collect()
}
