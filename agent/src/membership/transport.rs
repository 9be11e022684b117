//! Chitchat transport that seals every gossip datagram with the cluster key.
//! Datagrams that do not open are dropped and counted, never parsed, so a
//! process without the join token can neither read gossip nor inject state.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use async_trait::async_trait;
use chitchat::transport::{Socket, Transport};
use chitchat::{ChitchatMessage, Deserializable, Serializable};
use ring::rand::{SecureRandom, SystemRandom};
use tracing::warn;

use super::seal::{MAX_DATAGRAM, OVERHEAD, Sealer};
use crate::metrics::{Counter, Counters, RateLimit};

pub struct SealedUdpTransport {
    sealer: Arc<Sealer>,
    counters: Arc<Counters>,
}

impl SealedUdpTransport {
    pub fn new(sealer: Arc<Sealer>, counters: Arc<Counters>) -> Self {
        Self { sealer, counters }
    }
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
            rng: SystemRandom::new(),
            plain: Vec::with_capacity(MAX_DATAGRAM),
            sealed: Vec::with_capacity(MAX_DATAGRAM),
            recv_buf: vec![0u8; MAX_DATAGRAM].into_boxed_slice(),
        }))
    }
}

struct SealedSocket {
    socket: tokio::net::UdpSocket,
    sealer: Arc<Sealer>,
    counters: Arc<Counters>,
    rng: SystemRandom,
    plain: Vec<u8>,
    sealed: Vec<u8>,
    recv_buf: Box<[u8]>,
}

static DROP_LOG: RateLimit = RateLimit::new(Duration::from_secs(10));
static SEND_LOG: RateLimit = RateLimit::new(Duration::from_secs(10));

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[async_trait]
impl Socket for SealedSocket {
    async fn send(&mut self, to: SocketAddr, msg: ChitchatMessage) -> anyhow::Result<()> {
        self.plain.clear();
        msg.serialize(&mut self.plain);
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
            .seal(unix_ms(), nonce, &self.plain, &mut self.sealed);
        // Send errors (no route, neighbour unreachable) are per-peer and
        // transient: chitchat retries next round and its failure detector
        // reports the peer, so they must not stop the gossip loop.
        match self.socket.send_to(&self.sealed, to).await {
            Ok(_) => self.counters.inc(Counter::GossipTx),
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
            let plain = match self.sealer.open(unix_ms(), &mut self.recv_buf[..len]) {
                Ok(p) => p,
                Err(reason) => {
                    self.counters.inc(reason.counter());
                    if let Some(n) = DROP_LOG.check(Instant::now()) {
                        warn!(peer = %from, %reason, suppressed = n, "gossip datagram dropped");
                    }
                    continue;
                }
            };
            let mut cursor = plain;
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

fn is_fatal(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    !matches!(
        e.kind(),
        ConnectionRefused | ConnectionReset | Interrupted | WouldBlock | OutOfMemory
    ) && e.raw_os_error() != Some(libc::ENOBUFS)
        && e.raw_os_error() != Some(libc::EHOSTUNREACH)
        && e.raw_os_error() != Some(libc::ENETUNREACH)
}
