//! What operators see of the encrypted data plane (`ovlctl network inspect`
//! of an encrypted network, `ovlctl peers`): the engine's counters and key
//! state, per network and per peer host, with the key schedule's next
//! boundary. The assembly is pure (engine snapshot, names and `now` in);
//! the API maps the result to its messages. Fingerprints only, never keys.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use super::{Core, CoreError, PeerInfo, now_ms};
use crate::dataplane::encrypted::{Engine, EngineCounters, EpochInfo, PeerCounters, Traffic};
use crate::ids::{NodeId, Vni};
use crate::keys::pair::{epoch_at, epoch_start_ms};
use crate::store::networks::NetworkView;

/// The encrypted data plane as this host's engine sees it, for one network
/// (inspect) or for every peer host (`ovlctl peers`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptionView {
    /// Whether this agent runs an encrypted engine. Without one, `traffic`
    /// is `None` and no peer has engine state: there is nothing to show,
    /// and the API says so rather than showing zeros.
    pub engine: bool,
    pub now_ms: u64,
    /// `--key-rotation`.
    pub rotation_ms: u64,
    /// The epoch of this host's clock.
    pub current_epoch: u64,
    /// When senders switch to the next epoch: its start, in unix ms.
    pub next_rotation_ms: u64,
    /// The network's counters (inspect) or the engine's total (peers, with
    /// the drops no peer can be named for, e.g. unknown SPI); `None` when
    /// the engine holds no device for the network here.
    pub traffic: Option<Traffic>,
    pub peers: Vec<PeerView>,
}

/// One peer host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerView {
    pub node: NodeId,
    /// Empty when membership does not know the node (any more).
    pub name: String,
    /// `None`: the engine holds nothing for this host (no address, no keys).
    pub engine: Option<PeerState>,
}

/// A peer host's state in the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerState {
    /// Where the engine sends: data-path address : encrypted port.
    pub addr: Option<SocketAddr>,
    pub epoch_in_use: Option<u64>,
    /// The installed keys of the epoch in use; `None` when it has none
    /// (sending is stopped, counted as `no_key`).
    pub in_use: Option<EpochInfo>,
    /// Installed epochs, oldest first.
    pub epochs: Vec<EpochInfo>,
    /// Traffic with this host, over all its encrypted networks.
    pub traffic: Traffic,
}

/// The schedule's part of a view: epoch and next boundary at `now_ms`.
fn schedule(engine: bool, rotation_ms: u64, now_ms: u64) -> EncryptionView {
    EncryptionView {
        engine,
        now_ms,
        rotation_ms,
        current_epoch: epoch_at(now_ms, rotation_ms),
        next_rotation_ms: epoch_start_ms(
            epoch_at(now_ms, rotation_ms).saturating_add(1),
            rotation_ms,
        ),
        traffic: None,
        peers: Vec::new(),
    }
}

fn peer_state(p: &PeerCounters) -> PeerState {
    PeerState {
        addr: p.addr,
        epoch_in_use: p.epoch_in_use,
        in_use: p
            .epoch_in_use
            .and_then(|e| p.epochs.iter().find(|i| i.epoch == e).cloned()),
        epochs: p.epochs.clone(),
        traffic: p.traffic.clone(),
    }
}

/// One encrypted network: its counters, and each remote host of it (`hosts`,
/// in order) with what the engine holds for that host.
pub fn network_view(
    counters: Option<&EngineCounters>,
    vni: Vni,
    hosts: &[(NodeId, String)],
    rotation_ms: u64,
    now_ms: u64,
) -> EncryptionView {
    let mut v = schedule(counters.is_some(), rotation_ms, now_ms);
    v.traffic = counters.and_then(|c| c.networks.get(&vni).cloned());
    v.peers = hosts
        .iter()
        .map(|(node, name)| PeerView {
            node: *node,
            name: name.clone(),
            engine: counters.and_then(|c| c.peers.get(node)).map(peer_state),
        })
        .collect();
    v
}

/// Every peer host the engine knows, named from `names`, and the engine's
/// total counters.
pub fn peers_view(
    counters: Option<&EngineCounters>,
    names: &BTreeMap<NodeId, String>,
    rotation_ms: u64,
    now_ms: u64,
) -> EncryptionView {
    let mut v = schedule(counters.is_some(), rotation_ms, now_ms);
    if let Some(c) = counters {
        v.traffic = Some(c.total.clone());
        v.peers = c
            .peers
            .iter()
            .map(|(node, p)| PeerView {
                node: *node,
                name: names.get(node).cloned().unwrap_or_default(),
                engine: Some(peer_state(p)),
            })
            .collect();
    }
    v
}

impl Core {
    /// Hands the encrypted engine to the core (once, from `main`), for the
    /// operator views below.
    pub fn set_engine(&self, engine: Arc<Engine>) {
        let _ = self.engine.set(engine);
    }

    /// The encrypted engine, once `main` wired it.
    pub fn engine(&self) -> Option<&Arc<Engine>> {
        self.engine.get()
    }

    fn rotation_ms(&self) -> u64 {
        u64::try_from(self.cluster.config().key_rotation.as_millis()).unwrap_or(u64::MAX)
    }

    /// The encrypted data plane of `view` with its remote hosts among
    /// `hosts` (from [`Core::network_peers`]); `None` for a plain network.
    pub fn network_encryption(
        &self,
        view: &NetworkView,
        hosts: &[PeerInfo],
    ) -> Option<EncryptionView> {
        if !view.record.encrypted {
            return None;
        }
        let me = self.cluster.node_id();
        let hosts: Vec<(NodeId, String)> = hosts
            .iter()
            .filter(|h| h.node != me)
            .map(|h| (h.node, h.name.clone()))
            .collect();
        let counters = self.engine().map(|e| e.counters());
        Some(network_view(
            counters.as_ref(),
            view.vni,
            &hosts,
            self.rotation_ms(),
            now_ms(),
        ))
    }

    /// Every peer host of the encrypted engine (`ovlctl peers`).
    pub async fn encrypted_peers(&self) -> Result<EncryptionView, CoreError> {
        let m = self.require_cluster().await?;
        let names = m
            .nodes()
            .await
            .into_iter()
            .map(|n| (n.id, n.name))
            .collect();
        let counters = self.engine().map(|e| e.counters());
        Ok(peers_view(
            counters.as_ref(),
            &names,
            self.rotation_ms(),
            now_ms(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::encrypted::Dropped;

    fn node(b: u8) -> NodeId {
        NodeId::from_bytes([b; 16])
    }

    fn epoch(epoch: u64, fp: u32) -> EpochInfo {
        EpochInfo {
            epoch,
            send_fingerprint: fp,
            recv_fingerprint: fp + 1,
            sent: epoch * 10,
        }
    }

    fn traffic(packets: u64, drops: Vec<(Dropped, u64)>) -> Traffic {
        Traffic {
            packets_in: packets,
            bytes_in: packets * 100,
            packets_out: packets + 1,
            bytes_out: (packets + 1) * 100,
            drops,
        }
    }

    /// An engine that knows node 2 (epochs 3, 4, sending with 4) and a
    /// network with VNI 42; node 3 is unknown to it.
    fn counters() -> EngineCounters {
        let vni = Vni::new(42).unwrap();
        EngineCounters {
            total: traffic(9, vec![(Dropped::UnknownSpi, 5), (Dropped::Replay, 2)]),
            networks: BTreeMap::from([(vni, traffic(7, vec![(Dropped::Replay, 2)]))]),
            peers: BTreeMap::from([(
                node(2),
                PeerCounters {
                    addr: Some("198.18.0.2:4500".parse().unwrap()),
                    traffic: traffic(7, vec![(Dropped::Replay, 2)]),
                    epoch_in_use: Some(4),
                    epochs: vec![epoch(3, 0x30), epoch(4, 0x40)],
                },
            )]),
        }
    }

    #[test]
    fn the_next_rotation_is_the_next_epoch_boundary() {
        let v = peers_view(None, &BTreeMap::new(), 5_000, 12_345);
        assert_eq!((v.current_epoch, v.next_rotation_ms), (2, 15_000));
        // Exactly on a boundary: that epoch has begun, the next one is a
        // full period away.
        let v = peers_view(None, &BTreeMap::new(), 5_000, 15_000);
        assert_eq!((v.current_epoch, v.next_rotation_ms), (3, 20_000));
    }

    #[test]
    fn a_network_shows_its_counters_and_each_host_known_or_not() {
        let c = counters();
        let hosts = [(node(2), "b".to_string()), (node(3), "c".to_string())];
        let v = network_view(Some(&c), Vni::new(42).unwrap(), &hosts, 5_000, 12_000);
        assert!(v.engine);
        assert_eq!(v.traffic, Some(traffic(7, vec![(Dropped::Replay, 2)])));
        assert_eq!(v.peers.len(), 2);
        let b = v.peers[0].engine.as_ref().expect("node 2 is known");
        assert_eq!(v.peers[0].name, "b");
        assert_eq!(b.epoch_in_use, Some(4));
        assert_eq!(b.in_use, Some(epoch(4, 0x40)), "the epoch in use's keys");
        assert_eq!(b.epochs.len(), 2);
        assert_eq!(b.traffic.dropped(Dropped::Replay), 2);
        assert_eq!(v.peers[1].engine, None, "node 3 is unknown to the engine");

        // Another network: the engine has no device for it here.
        let v = network_view(Some(&c), Vni::new(43).unwrap(), &hosts, 5_000, 12_000);
        assert_eq!(v.traffic, None);
    }

    #[test]
    fn no_engine_shows_no_data_and_keys_missing_for_the_epoch_in_use_show_none() {
        let hosts = [(node(2), "b".to_string())];
        let v = network_view(None, Vni::new(42).unwrap(), &hosts, 5_000, 12_000);
        assert!(!v.engine);
        assert_eq!(v.traffic, None);
        assert_eq!(v.peers[0].engine, None);
        let v = peers_view(None, &BTreeMap::new(), 5_000, 12_000);
        assert!(!v.engine && v.traffic.is_none() && v.peers.is_empty());

        let mut c = counters();
        if let Some(p) = c.peers.get_mut(&node(2)) {
            p.epoch_in_use = Some(5);
        }
        let v = peers_view(Some(&c), &BTreeMap::new(), 5_000, 12_000);
        let p = v.peers[0].engine.as_ref().expect("known");
        assert_eq!((p.epoch_in_use, &p.in_use), (Some(5), &None));
    }

    #[test]
    fn peers_lists_every_engine_peer_with_the_engine_total() {
        let c = counters();
        let names = BTreeMap::from([(node(2), "b".to_string())]);
        let v = peers_view(Some(&c), &names, 5_000, 12_000);
        assert_eq!(
            v.traffic.as_ref().map(|t| t.dropped(Dropped::UnknownSpi)),
            Some(5)
        );
        assert_eq!(v.peers.len(), 1);
        assert_eq!((v.peers[0].node, v.peers[0].name.as_str()), (node(2), "b"));
        // A peer membership no longer knows keeps its row, without a name.
        let v = peers_view(Some(&c), &BTreeMap::new(), 5_000, 12_000);
        assert_eq!(v.peers[0].name, "");
    }
}
