//! The membership view an operator sees, computed from chitchat's state
//! (pure: chitchat types are converted to `Incarnation` first).
//!
//! Chitchat tracks incarnations `(node id, generation)`; a restarted node is a
//! new generation while the old one lingers as dead until garbage-collected.
//! Operators think in nodes, so the view keeps one row per node id: the
//! newest generation.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use super::record::VerifiedRecord;
use crate::ids::NodeId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NodeStatus {
    Alive,
    Dead,
    Left,
}

impl NodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Alive => "alive",
            Self::Dead => "dead",
            Self::Left => "left",
        }
    }
}

/// One chitchat incarnation as seen by this node.
#[derive(Debug, Clone)]
pub struct Incarnation {
    /// Chitchat's node id string; not trusted to be a valid `NodeId`.
    pub node_id: String,
    pub generation: u64,
    pub gossip_addr: SocketAddr,
    pub live: bool,
    /// The node's signed record, if one has arrived for this incarnation.
    pub record: Option<VerifiedRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub id: NodeId,
    pub name: String,
    pub generation: u64,
    pub gossip_addr: SocketAddr,
    pub advertise_addr: String,
    pub data_path_addr: String,
    pub status: NodeStatus,
    pub is_self: bool,
    /// The node's own table version as gossiped (0 when not published).
    pub table_version: u64,
    /// Its X25519 public keys per epoch, from its own signed record.
    pub exchange_keys: Vec<crate::keys::schedule::Published>,
    /// Its encrypted data plane's UDP port (0: not published).
    pub encrypted_port: u16,
    /// MTU of its data-path interface, from its own signed record (0: not
    /// published).
    pub data_path_mtu: u32,
}

/// One row per node id, newest generation, sorted by name then id. Only
/// incarnations with the node's own signed record count, for liveness too:
/// an incarnation with no record yet (just discovered, or one a member made
/// up) is no evidence of anything.
pub fn node_views(incarnations: &[Incarnation], self_id: NodeId) -> Vec<NodeView> {
    let mut newest: HashMap<NodeId, (&Incarnation, &VerifiedRecord)> = HashMap::new();
    // A restarted node's new generation needs a few heartbeats before the
    // failure detector calls it live, while the old one is still live for a
    // second or two: the node is alive if any of its generations is, so a
    // restart never flaps it through "dead" (and its data path with it).
    let mut any_live: HashSet<NodeId> = HashSet::new();
    for inc in incarnations {
        let Some(rec) = &inc.record else {
            continue;
        };
        let id = rec.node_id;
        if inc.live {
            any_live.insert(id);
        }
        let slot = newest.entry(id).or_insert((inc, rec));
        if inc.generation > slot.0.generation {
            *slot = (inc, rec);
        }
    }
    let mut views: Vec<NodeView> = newest
        .into_iter()
        .map(|(id, (inc, rec))| {
            let status = if rec.facts.left {
                NodeStatus::Left
            } else if any_live.contains(&id) || id == self_id {
                NodeStatus::Alive
            } else {
                NodeStatus::Dead
            };
            NodeView {
                id,
                name: rec.facts.name.clone(),
                generation: inc.generation,
                gossip_addr: inc.gossip_addr,
                advertise_addr: rec.facts.advertise_addr.clone(),
                data_path_addr: rec.facts.data_path_addr.clone(),
                status,
                is_self: id == self_id,
                table_version: rec.facts.table_version,
                exchange_keys: rec.facts.exchange_keys.clone(),
                encrypted_port: rec.facts.encrypted_port,
                data_path_mtu: rec.facts.data_path_mtu,
            }
        })
        .collect();
    views.sort_by(|a, b| (&a.name, a.id).cmp(&(&b.name, b.id)));
    views
}

/// What an operator wants in the log when the view moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Appeared(NodeId, NodeStatus),
    Status(NodeId, NodeStatus, NodeStatus),
    Restarted(NodeId, u64),
    Forgotten(NodeId),
}

/// Last seen (status, generation) per node.
pub type Seen = HashMap<NodeId, (NodeStatus, u64)>;

/// Diffs `views` against `seen`, updating `seen` to match.
pub fn changes(seen: &mut Seen, views: &[NodeView]) -> Vec<Change> {
    let mut out = Vec::new();
    for v in views {
        match seen.insert(v.id, (v.status, v.generation)) {
            None => out.push(Change::Appeared(v.id, v.status)),
            Some((old, old_gen)) => {
                if v.generation != old_gen {
                    out.push(Change::Restarted(v.id, v.generation));
                }
                if old != v.status {
                    out.push(Change::Status(v.id, old, v.status));
                }
            }
        }
    }
    let gone: Vec<NodeId> = seen
        .keys()
        .filter(|id| !views.iter().any(|v| v.id == **id))
        .copied()
        .collect();
    for id in gone {
        seen.remove(&id);
        out.push(Change::Forgotten(id));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inc(id: NodeId, generation: u64, live: bool, left: bool) -> Incarnation {
        let gossip_addr: SocketAddr = "198.18.0.1:7946".parse().unwrap();
        Incarnation {
            node_id: id.to_string(),
            generation,
            gossip_addr,
            live,
            record: Some(VerifiedRecord {
                node_id: id,
                generation,
                version: 1,
                gossip_addr,
                facts: super::super::record::NodeFacts {
                    name: format!("n{}", id.as_bytes()[0]),
                    left,
                    ..Default::default()
                },
            }),
        }
    }

    fn id(b: u8) -> NodeId {
        NodeId::from_bytes([b; 16])
    }

    #[test]
    fn restarted_node_is_listed_once_with_newest_generation() {
        let v = node_views(
            &[
                inc(id(1), 5, false, false),
                inc(id(1), 9, true, false),
                inc(id(2), 1, true, false),
            ],
            id(2),
        );
        assert_eq!(v.len(), 2);
        assert_eq!(
            (v[0].id, v[0].generation, v[0].status),
            (id(1), 9, NodeStatus::Alive)
        );
        assert!(v[1].is_self);
    }

    #[test]
    fn restart_handover_stays_alive_and_shows_the_new_generation() {
        let v = node_views(
            &[inc(id(1), 9, false, false), inc(id(1), 5, true, false)],
            id(2),
        );
        assert_eq!((v[0].generation, v[0].status), (9, NodeStatus::Alive));
        let v = node_views(
            &[inc(id(1), 9, false, false), inc(id(1), 5, false, false)],
            id(2),
        );
        assert_eq!(v[0].status, NodeStatus::Dead);
    }

    #[test]
    fn changes_report_each_transition_once() {
        let mut seen = Seen::new();
        let a = node_views(&[inc(id(1), 1, true, false)], id(9));
        assert_eq!(
            changes(&mut seen, &a),
            vec![Change::Appeared(id(1), NodeStatus::Alive)]
        );
        assert!(changes(&mut seen, &a).is_empty());
        let b = node_views(&[inc(id(1), 1, false, false)], id(9));
        assert_eq!(
            changes(&mut seen, &b),
            vec![Change::Status(id(1), NodeStatus::Alive, NodeStatus::Dead)]
        );
        let c = node_views(&[inc(id(1), 2, true, false)], id(9));
        assert_eq!(
            changes(&mut seen, &c),
            vec![
                Change::Restarted(id(1), 2),
                Change::Status(id(1), NodeStatus::Dead, NodeStatus::Alive)
            ]
        );
        assert_eq!(changes(&mut seen, &[]), vec![Change::Forgotten(id(1))]);
    }

    #[test]
    fn left_wins_over_liveness_and_unsigned_incarnations_are_skipped() {
        let mut bad = inc(id(3), 1, true, false);
        bad.record = None;
        let v = node_views(
            &[inc(id(1), 1, true, true), inc(id(1), 1, false, false), bad],
            id(9),
        );
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].status, NodeStatus::Left);
    }
}
