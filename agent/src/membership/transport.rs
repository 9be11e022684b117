//! Chitchat transport that seals every gossip datagram with the cluster key
//! and signs it with the sender's identity key.
//!
//! Sealed plaintext: `sender identity pk (32) | Ed25519 signature (64) |
//! chitchat message`, the signature over `"ovl gossip v1" | cluster id |
//! sent-at | chitchat message`. Datagrams that do not open are dropped and
//! counted, never parsed, so a process without the cluster key can neither
//! read gossip nor inject state. Datagrams that open go through the
//! [`Guard`] with the authenticated sender before chitchat parses them, so
//! a member cannot speak for another node either.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use async_trait::async_trait;
use chitchat::transport::{Socket, Transport};
use chitchat::{ChitchatMessage, Deserializable, Serializable};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use tracing::{info, warn};

use super::KeyEvent;
use super::guard::{Guard, Refusal};
use super::seal::{GossipDrop, MAX_DATAGRAM, OVERHEAD, ReplayCache, Sealer};
use crate::ids::ClusterId;
use crate::keys::identity::node_id_of;
use crate::metrics::{Counter, Counters, RateLimit};

const SIGN_DOMAIN: &[u8] = b"ovl gossip v1";
const PK_LEN: usize = 32;
const SIG_LEN: usize = 64;
/// Signature header inside the sealed plaintext.
pub const SIGNED_OVERHEAD: usize = PK_LEN + SIG_LEN;

/// Test-only fault (end-to-end tests of supervision): with
/// `OVL_TEST_FAULT=gossip-recv`, the socket fails after the first datagram,
/// which stops chitchat's gossip loop as a broken socket would.
const FAULT_ENV: &str = "OVL_TEST_FAULT";

/// What the transport needs to sign and check datagrams.
pub struct Signing {
    /// Our chitchat node id (the string form of our node id).
    pub me: String,
    pub cluster_id: ClusterId,
    pub key: Arc<Ed25519KeyPair>,
    pub guard: Arc<std::sync::Mutex<Guard>>,
    /// Nodes removed from the cluster: their datagrams are refused.
    pub removed: super::Removed,
    /// Where key switches and missed rotations are reported (never blocks:
    /// a full channel drops the event; a missed rotation is reported again
    /// by the next datagram, a switch is caught up by the keeper's timer).
    pub key_events: tokio::sync::mpsc::Sender<KeyEvent>,
}

pub struct SealedUdpTransport {
    sealer: Arc<Sealer>,
    counters: Arc<Counters>,
    signing: Arc<Signing>,
}

impl SealedUdpTransport {
    pub fn new(sealer: Arc<Sealer>, counters: Arc<Counters>, signing: Arc<Signing>) -> Self {
        Self {
            sealer,
            counters,
            signing,
        }
    }
}

/// The sealed plaintext of a datagram carrying `msg` from the holder of
/// `key`: `pk | signature | msg` (see the module comment).
pub fn signed_plaintext(
    key: &Ed25519KeyPair,
    cluster: ClusterId,
    sent_at: u64,
    msg: &[u8],
    out: &mut Vec<u8>,
) {
    let signature = key.sign(&signed_message(cluster, sent_at, msg));
    out.clear();
    out.extend_from_slice(key.public_key().as_ref());
    out.extend_from_slice(signature.as_ref());
    out.extend_from_slice(msg);
}

fn signed_message(cluster: ClusterId, sent_at: u64, msg: &[u8]) -> Vec<u8> {
    [
        SIGN_DOMAIN,
        cluster.as_bytes().as_slice(),
        &sent_at.to_be_bytes(),
        msg,
    ]
    .concat()
}

#[async_trait]
impl Transport for SealedUdpTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let socket = tokio::net::UdpSocket::bind(listen_addr)
            .await
            .with_context(|| format!("bind gossip socket {listen_addr}/udp"))?;
        Ok(Box::new(SealedSocket {
            socket,
            sealer: self.sealer.clone(),
            counters: self.counters.clone(),
            signing: self.signing.clone(),
            rng: SystemRandom::new(),
            plain: Vec::with_capacity(MAX_DATAGRAM),
            sealed: Vec::with_capacity(MAX_DATAGRAM),
            admitted: Vec::with_capacity(MAX_DATAGRAM),
            chitchat: Vec::with_capacity(MAX_DATAGRAM),
            rewritten: Vec::with_capacity(MAX_DATAGRAM),
            heartbeat: 0,
            recv_buf: vec![0u8; MAX_DATAGRAM].into_boxed_slice(),
            // Twice the skew: a datagram older than that is stale anyway.
            // 64 Ki tags bound it to ~2 MB at thousands of datagrams a second.
            replays: ReplayCache::new(2 * super::MAX_CLOCK_SKEW_MS, 1 << 16),
            fault: std::env::var(FAULT_ENV).is_ok_and(|v| v == "gossip-recv"),
        }))
    }
}

struct SealedSocket {
    socket: tokio::net::UdpSocket,
    sealer: Arc<Sealer>,
    counters: Arc<Counters>,
    signing: Arc<Signing>,
    rng: SystemRandom,
    plain: Vec<u8>,
    sealed: Vec<u8>,
    admitted: Vec<u8>,
    chitchat: Vec<u8>,
    rewritten: Vec<u8>,
    recv_buf: Box<[u8]>,
    replays: ReplayCache,
    fault: bool,
    /// Last heartbeat we sent for ourselves (see `guard::own_heartbeat`).
    heartbeat: u64,
}

impl SealedSocket {
    /// `self.chitchat` with our own digest entry's heartbeat set to our
    /// clock, which is what receivers cap heartbeats against.
    fn stamp_own_heartbeat(&mut self, now_ms: u64) {
        let me = self.signing.me.as_str();
        let Ok(msg) = super::wire::parse_head(&self.chitchat) else {
            return;
        };
        if msg.digest.is_empty() {
            return;
        }
        let hb = super::guard::own_heartbeat(self.heartbeat, now_ms);
        let digest: Vec<_> = msg
            .digest
            .iter()
            .map(|e| {
                let mut e = e.clone();
                if e.id.node_id == me {
                    e.heartbeat = hb;
                }
                e
            })
            .collect();
        self.heartbeat = hb;
        super::wire::write_with_digest(&msg, &digest, &mut self.rewritten);
        std::mem::swap(&mut self.chitchat, &mut self.rewritten);
    }
}

static DROP_LOG: RateLimit = RateLimit::new(Duration::from_secs(10));
static SEND_LOG: RateLimit = RateLimit::new(Duration::from_secs(10));
static FORGED_LOG: RateLimit = RateLimit::new(Duration::from_secs(10));
static ADMIT_LOG: RateLimit = RateLimit::new(Duration::from_secs(10));

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[async_trait]
impl Socket for SealedSocket {
    async fn send(&mut self, to: SocketAddr, msg: ChitchatMessage) -> anyhow::Result<()> {
        let sent_at = unix_ms();
        self.chitchat.clear();
        msg.serialize(&mut self.chitchat);
        self.stamp_own_heartbeat(sent_at);
        signed_plaintext(
            &self.signing.key,
            self.signing.cluster_id,
            sent_at,
            &self.chitchat,
            &mut self.plain,
        );
        if self.plain.len() + OVERHEAD > MAX_DATAGRAM {
            self.counters.inc(Counter::GossipDropOversize);
            if let Some(n) = SEND_LOG.check(Instant::now()) {
                warn!(peer = %to, bytes = self.plain.len(), suppressed = n, "gossip message too large to seal, not sent");
            }
            return Ok(());
        }
        let mut nonce = [0u8; 12];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| anyhow::anyhow!("system random source failed"))?;
        self.sealer
            .seal(sent_at, nonce, &self.plain, &mut self.sealed);
        // Send errors (no route, neighbour unreachable) are per-peer and
        // transient: chitchat retries next round and its failure detector
        // reports the peer, so they must not stop the gossip loop.
        match self.socket.send_to(&self.sealed, to).await {
            Ok(n) => {
                self.counters.inc(Counter::GossipTx);
                self.counters.add(Counter::GossipTxBytes, n as u64);
            }
            Err(e) => {
                if let Some(n) = SEND_LOG.check(Instant::now()) {
                    warn!(peer = %to, error = %e, suppressed = n, "gossip send failed");
                }
            }
        }
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        loop {
            let (len, from) = match self.socket.recv_from(&mut self.recv_buf).await {
                Ok(r) => r,
                Err(e) if is_fatal(&e) => return Err(e).context("gossip socket receive"),
                Err(e) => {
                    warn!(error = %e, "transient gossip receive error");
                    continue;
                }
            };
            self.counters.add(Counter::GossipRxBytes, len as u64);
            if self.fault {
                anyhow::bail!("{FAULT_ENV}=gossip-recv: injected gossip socket failure");
            }
            let sent_at = super::seal::sent_at(&self.recv_buf[..len]);
            let replay_key = ReplayCache::key_of(&self.recv_buf[..len]);
            let (key_id, plain) = match self.sealer.open(unix_ms(), &mut self.recv_buf[..len]) {
                Ok(p) => p,
                Err(reason) => {
                    self.counters.inc(reason.counter());
                    if let GossipDrop::NewerKey(id) = reason {
                        let _ = self
                            .signing
                            .key_events
                            .try_send(KeyEvent::MissedRotation { from, id });
                    }
                    if let Some(n) = DROP_LOG.check(Instant::now()) {
                        warn!(peer = %from, %reason, suppressed = n, "gossip datagram dropped");
                    }
                    continue;
                }
            };
            if let (Some(k), Some(at)) = (replay_key, sent_at)
                && !self.replays.first_time(k, at, unix_ms())
            {
                self.counters.inc(Counter::GossipDropReplay);
                if let Some(n) = DROP_LOG.check(Instant::now()) {
                    warn!(peer = %from, suppressed = n, "gossip datagram dropped: a replay of one already received");
                }
                continue;
            }
            let Some((sender, body)) = check_sender(&self.signing, sent_at, plain) else {
                self.counters.inc(Counter::GossipDropBadSender);
                if let Some(n) = DROP_LOG.check(Instant::now()) {
                    warn!(peer = %from, suppressed = n, "gossip datagram dropped: sender signature does not verify");
                }
                continue;
            };
            if !super::guard::replies_to_sender(body, sender, from) {
                self.counters.inc(Counter::GossipDropUnboundSource);
                if let Some(n) = DROP_LOG.check(Instant::now()) {
                    warn!(peer = %from, sender = %sender, suppressed = n,
                          "gossip datagram dropped: it would draw a reply to an address that is not its sender's");
                }
                continue;
            }
            let admitted = {
                let mut guard = self.signing.guard.lock().unwrap_or_else(|e| e.into_inner());
                let removed = self
                    .signing
                    .removed
                    .read()
                    .unwrap_or_else(|e| e.into_inner());
                let out = &mut self.admitted;
                self.sealer.with_ring(|ring| {
                    guard.admit(sender, body, unix_ms(), &removed, ring.scope(key_id), out)
                })
            };
            match admitted {
                Ok(a) => {
                    for _ in 0..a.dropped_entries {
                        self.counters.inc(Counter::GossipDigestDropped);
                    }
                    for _ in 0..a.stale_strangers {
                        self.counters.inc(Counter::GossipDropStaleKeyStranger);
                    }
                    for _ in 0..a.unvouched {
                        self.counters.inc(Counter::GossipUnvouchedLeftOut);
                    }
                    if a.stale_strangers > 0
                        && let Some(n) = FORGED_LOG.check(Instant::now())
                    {
                        warn!(peer = %from, sender = %sender, records = a.stale_strangers, suppressed = n,
                              "gossip records of new identities under a stale cluster key left out");
                    }
                    // It sealed with a key it can only hold as a member
                    // (see `guard`): it joins that key's member set.
                    if let Some(node) = a.admit
                        && self.sealer.with_ring(|r| r.admit(key_id, node))
                    {
                        self.counters.inc(Counter::ClusterKeyMemberAdmitted);
                        if let Some(n) = ADMIT_LOG.check(Instant::now()) {
                            info!(peer = %from, node = %node, key = %key_id, suppressed = n,
                                  "a node sealing with the cluster key joined its member set");
                        }
                    }
                    // A member seals with a newer key we hold: it switched,
                    // so do we (see `keys::cluster_key`).
                    if let Some(key) = self.sealer.verified(key_id, unix_ms()) {
                        let _ = self.signing.key_events.try_send(KeyEvent::Switched {
                            key: Box::new(key),
                            by: Some(sender),
                        });
                    }
                }
                Err(refusal) => {
                    self.counters.inc(match refusal {
                        Refusal::Malformed(_) => Counter::GossipDropUndecodable,
                        Refusal::Unsafe(_) => Counter::GossipDropUnsafe,
                        Refusal::Forged(_) => Counter::GossipForged,
                        Refusal::Removed => Counter::GossipDropRemoved,
                        Refusal::StaleKeyStranger => Counter::GossipDropStaleKeyStranger,
                    });
                    if let Some(n) = FORGED_LOG.check(Instant::now()) {
                        warn!(peer = %from, sender = %sender, reason = %refusal, suppressed = n,
                              "gossip datagram refused: it speaks for a node that did not sign it, or would break chitchat");
                    }
                    continue;
                }
            }
            let mut cursor = self.admitted.as_slice();
            match ChitchatMessage::deserialize(&mut cursor) {
                Ok(msg) => {
                    self.counters.inc(Counter::GossipRx);
                    return Ok((from, msg));
                }
                Err(e) => {
                    // Sealed with our key yet undecodable: a member runs an
                    // incompatible version. Worth seeing, still rate-limited.
                    self.counters.inc(Counter::GossipDropUndecodable);
                    if let Some(n) = DROP_LOG.check(Instant::now()) {
                        warn!(peer = %from, error = %e, suppressed = n, "gossip message undecodable");
                    }
                }
            }
        }
    }
}

/// Splits the signature header off `plain` and checks it; returns the
/// sender's node id (derived from its key) and the chitchat message.
fn check_sender<'a>(
    signing: &Signing,
    sent_at: Option<u64>,
    plain: &'a [u8],
) -> Option<(crate::ids::NodeId, &'a [u8])> {
    if plain.len() < SIGNED_OVERHEAD {
        return None;
    }
    let (pk, rest) = plain.split_at(PK_LEN);
    let (sig, body) = rest.split_at(SIG_LEN);
    UnparsedPublicKey::new(&ED25519, pk)
        .verify(&signed_message(signing.cluster_id, sent_at?, body), sig)
        .ok()?;
    Some((node_id_of(pk), body))
}

fn is_fatal(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    !matches!(
        e.kind(),
        ConnectionRefused | ConnectionReset | Interrupted | WouldBlock | OutOfMemory
    ) && e.raw_os_error() != Some(libc::ENOBUFS)
        && e.raw_os_error() != Some(libc::EHOSTUNREACH)
        && e.raw_os_error() != Some(libc::ENETUNREACH)
}
