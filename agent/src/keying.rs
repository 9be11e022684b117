//! The key task of encrypted networks: publishes this node's key-exchange
//! keys per epoch in its signed record and turns the peers' published keys
//! into pair keys for the encrypted data plane (membership → keys →
//! dataplane). The decisions are `keys::schedule`'s (sans-IO); this is
//! the loop around them.
//!
//! Peers' keys come only from `NodeView`s, i.e. from each node's own
//! signed record (the guard drops anything else), so no member can make us
//! use a key another node did not publish.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ring::rand::SecureRandom;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::clock::now_ms;
use crate::ids::NodeId;
use crate::keys::schedule::{KeyAction, Pairs, Published, Schedule};
use crate::membership::current::ClusterView;
use crate::membership::{NodeStatus, NodeView};
use crate::metrics::{Counter, Counters};

/// Where key decisions go: the encrypted data plane.
pub trait KeySink: Send + Sync {
    /// A peer's encrypted data-path address, or `None` when it has none
    /// (gone, or not a peer of any encrypted network here).
    fn peer_address(&self, peer: NodeId, addr: Option<SocketAddr>);
    fn key_action(&self, action: KeyAction);
}

/// Longest wait between two passes: new records arrive by gossip at any
/// time, and the membership watch only reports liveness changes.
const POLL: Duration = Duration::from_secs(1);

/// The state a pass needs, kept across passes.
struct Keying {
    me: NodeId,
    schedule: Schedule,
    pairs: Option<Pairs>,
    addresses: BTreeMap<NodeId, SocketAddr>,
    rng: ring::rand::SystemRandom,
    counters: Arc<Counters>,
}

/// Runs until the process ends. `peers` names the nodes this host shares
/// an encrypted network with (the data plane's plans).
pub async fn run(
    view: ClusterView,
    mut peers: watch::Receiver<BTreeSet<NodeId>>,
    sink: Arc<dyn KeySink>,
    period: Duration,
    counters: Arc<Counters>,
) {
    let period_ms = u64::try_from(period.as_millis()).unwrap_or(u64::MAX);
    let mut k = Keying {
        me: view.node_id(),
        schedule: Schedule::new(period_ms),
        pairs: None,
        addresses: BTreeMap::new(),
        rng: ring::rand::SystemRandom::new(),
        counters,
    };
    let mut watching: Option<(Arc<crate::membership::Membership>, watch::Receiver<()>)> = None;
    loop {
        let now = now_ms();
        let wanted = peers.borrow_and_update().clone();
        let current = view.membership().await;
        if let Some(m) = &current {
            k.publish(m, now).await;
            k.pass(&m.nodes().await, &wanted, sink.as_ref(), now, m);
        }
        // One liveness watch per membership (each spawns a forwarder).
        match (&current, &watching) {
            (Some(m), Some((w, _))) if Arc::ptr_eq(m, w) => {}
            (Some(m), _) => watching = Some((m.clone(), m.watch().await)),
            (None, _) => watching = None,
        }
        let wait = Duration::from_millis(k.schedule.next_boundary_ms(now).saturating_sub(now_ms()))
            .min(POLL);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            r = peers.changed() => if r.is_err() {
                // The data plane is gone: the process is ending.
                return;
            },
            _ = async {
                match watching.as_mut() {
                    // A closed watch (gossip stopping) must not spin the loop.
                    Some((_, rx)) => if rx.changed().await.is_err() {
                        std::future::pending::<()>().await
                    },
                    None => std::future::pending().await,
                }
            } => {}
        }
    }
}

impl Keying {
    async fn publish(&mut self, m: &crate::membership::Membership, now: u64) {
        let rng = &self.rng;
        let changed = self.schedule.advance(now, || {
            let mut b = [0u8; 32];
            // The system RNG failing is not recoverable; an all-zero
            // secret would still be refused by peers as non-contributory.
            if rng.fill(&mut b).is_err() {
                warn!("system random number generator failed");
            }
            b
        });
        let published = self.schedule.published();
        if changed {
            info!(epochs = ?published.iter().map(|p| p.0).collect::<Vec<_>>(),
                  "publishing key-exchange keys");
        }
        // Also after a join or restart of membership: its facts start empty.
        m.publish(|f| f.exchange_keys = published).await;
    }

    fn pass(
        &mut self,
        nodes: &[NodeView],
        wanted: &BTreeSet<NodeId>,
        sink: &dyn KeySink,
        now: u64,
        m: &crate::membership::Membership,
    ) {
        let pairs = self
            .pairs
            .get_or_insert_with(|| Pairs::new(m.cluster_id(), self.me));
        let peers: BTreeMap<NodeId, &NodeView> = nodes
            .iter()
            .filter(|n| !n.is_self && n.status == NodeStatus::Alive && wanted.contains(&n.id))
            .map(|n| (n.id, n))
            .collect();
        let mut addresses = BTreeMap::new();
        for (id, n) in &peers {
            match peer_address(n) {
                Some(a) => {
                    addresses.insert(*id, a);
                }
                None => debug!(peer = %id, "peer publishes no encrypted data path yet"),
            }
        }
        for (id, addr) in &addresses {
            if self.addresses.get(id) != Some(addr) {
                info!(peer = %id, %addr, "encrypted peer");
                sink.peer_address(*id, Some(*addr));
            }
        }
        for id in self
            .addresses
            .keys()
            .filter(|id| !addresses.contains_key(id))
        {
            info!(peer = %id, "encrypted peer gone");
            sink.peer_address(*id, None);
        }
        self.addresses = addresses;
        let keys: BTreeMap<NodeId, Vec<Published>> = peers
            .iter()
            .map(|(id, n)| (*id, n.exchange_keys.clone()))
            .collect();
        for action in pairs.plan(&self.schedule, &keys, now) {
            match &action {
                KeyAction::Install { peer, keys } => debug!(%peer, epoch = keys.send.epoch,
                    send_fingerprint = format_args!("{:08x}", keys.send.fingerprint()),
                    "pair keys derived"),
                KeyAction::Use { peer, epoch } => info!(%peer, epoch, "sending with epoch"),
                KeyAction::Retire { peer, below } => debug!(%peer, below, "pair keys retired"),
                KeyAction::Refused { peer, epoch, error } => {
                    self.counters.inc(Counter::ExchangeKeyRefused);
                    warn!(%peer, epoch, "key-exchange key refused: {error}");
                }
            }
            sink.key_action(action);
        }
    }
}

/// `data_path_addr : encrypted_port` from the peer's own record.
fn peer_address(n: &NodeView) -> Option<SocketAddr> {
    let ip: IpAddr = n.data_path_addr.parse().ok()?;
    (n.encrypted_port != 0).then(|| SocketAddr::new(ip, n.encrypted_port))
}
