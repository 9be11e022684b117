//! What a member may tell us about the cluster, decided before chitchat
//! sees it (sans-IO: bytes, the authenticated sender and `now` in, the
//! bytes chitchat may see or a refusal out).
//!
//! Chitchat applies whatever a datagram says about any node; on its own it
//! cannot tell who wrote a fact (CRATE-NOTES). The guard makes every fact
//! about node X attributable to X:
//! - **Deltas** carry key-values. The only key is the signed node record
//!   ([`super::record`]), verified for the exact incarnation and chitchat
//!   version it arrives at. Anything else (another key, a deletion, a
//!   `SetMaxVersion`, a GC version: ovl never deletes keys, and those ops
//!   are what trips chitchat's assertions) refuses the whole datagram.
//! - **Digests** carry heartbeats, which nobody signs, and a relayed one
//!   cannot be told from a forged one. Chitchat keeps the highest heartbeat
//!   it hears, so a forged huge value would make every real one look old,
//!   and the node dead. ovl therefore sends its own heartbeat as its clock
//!   (unix ms, see [`own_heartbeat`]) and the guard caps every heartbeat it
//!   passes on at its own clock plus [`HEARTBEAT_TOLERANCE_MS`]. The most a
//!   member can do by inflating another node's heartbeat is silence it for
//!   that tolerance, far below what the failure detector calls dead; it can
//!   also keep relaying a dead node's heartbeat to delay its death (see
//!   docs/threat-model.md).
//! - Digest entries about incarnations with no verified record are dropped,
//!   except a sender's entry about itself: so a forged incarnation (a newer
//!   generation of someone else) never appears in chitchat's state.
//! - **Identities are learned only where the cluster key allows it**
//!   ([`KeyScope`]). After a rotation the key in use has a member set.
//!   An identity outside it is learned only from a datagram it sealed with
//!   that key itself (proof that it holds the key: the install, a fetch
//!   that only members get, or `Hello` with the current token); then it
//!   joins the set. Its record relayed by others is left out until then,
//!   so a member that accepted a stranger under an old key cannot pass it
//!   on. A datagram sealed with a stale key (replaced, or about to be)
//!   teaches no new identity at all: the removed node holds that key.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;

use super::record::{self, RECORD_KEY, RecordError, Slot};
use super::wire::{self, DeltaOp, DigestEntry, WireError, WireId};
use crate::ids::{ClusterId, NodeId};
use crate::keys::KeyScope;

/// Incarnations remembered per node id (a restart makes a new one; the old
/// one lingers in chitchat until garbage-collected).
const GENERATIONS_PER_NODE: usize = 4;
/// Bound on everything remembered, whatever members send.
const MAX_INCARNATIONS: usize = 16_384;
/// How far ahead of our clock a heartbeat may be. Honest heartbeats are
/// their node's clock when it sent them, so they are behind ours unless the
/// clocks differ; a skewed node's heartbeats are capped, and still move.
pub const HEARTBEAT_TOLERANCE_MS: u64 = 500;

/// The heartbeat we send for ourselves: our clock, strictly increasing.
pub fn own_heartbeat(last: u64, now_ms: u64) -> u64 {
    now_ms.max(last + 1)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("malformed: {0}")]
    Malformed(WireError),
    #[error("would trip chitchat: {0}")]
    Unsafe(&'static str),
    #[error("forged: {0}")]
    Forged(String),
    #[error("sender was removed from the cluster")]
    Removed,
    #[error("a new identity speaking under a stale cluster key (a removed node's way back in)")]
    StaleKeyStranger,
}

/// What chitchat may see of a datagram.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Admitted {
    /// Digest entries dropped (unverified incarnations).
    pub dropped_entries: usize,
    /// Records of identities left out because the key does not vouch for
    /// them: (under a stale key, relayed under the current one).
    pub stale_strangers: usize,
    pub unvouched: usize,
    /// The sender proved it holds the key its datagram was sealed with and
    /// is outside that key's member set: the caller adds it.
    pub admit: Option<NodeId>,
}

#[derive(Debug)]
struct Incarnation {
    gossip_addr: SocketAddr,
    /// Newest verified record: (chitchat version, value).
    record: Option<(u64, String)>,
}

pub struct Guard {
    cluster: ClusterId,
    me: WireId,
    incarnations: HashMap<(NodeId, u64), Incarnation>,
    /// Generations per node, oldest first, for the per-node bound.
    generations: HashMap<NodeId, VecDeque<u64>>,
}

impl Guard {
    pub fn new(cluster: ClusterId, me: WireId) -> Self {
        Self {
            cluster,
            me,
            incarnations: HashMap::new(),
            generations: HashMap::new(),
        }
    }

    /// Checks `bytes` from authenticated `sender`; on success `out` holds
    /// what chitchat may parse.
    pub fn admit(
        &mut self,
        sender: NodeId,
        bytes: &[u8],
        now_ms: u64,
        removed: &BTreeSet<NodeId>,
        scope: KeyScope<'_>,
        out: &mut Vec<u8>,
    ) -> Result<Admitted, Refusal> {
        // A removed node is no longer heard at all (`ovlctl node rm`).
        if removed.contains(&sender) {
            return Err(Refusal::Removed);
        }
        let mut admitted = Admitted::default();
        if !self.vouched(sender, scope) {
            if scope.stale {
                return Err(Refusal::StaleKeyStranger);
            }
            // Only set-less keys and key holders get here; a set grows.
            if scope.members.is_some() {
                admitted.admit = Some(sender);
            }
        }
        let msg = wire::parse(bytes).map_err(Refusal::Malformed)?;
        let records = self.check_delta(&msg.delta)?;
        // Records of identities the key does not vouch for stay out.
        let mut left_out: BTreeSet<NodeId> = BTreeSet::new();
        for (id, node, version, value) in records {
            if node != sender && !self.vouched(node, scope) {
                if scope.stale {
                    admitted.stale_strangers += 1;
                } else {
                    admitted.unvouched += 1;
                }
                left_out.insert(node);
                continue;
            }
            self.learn(id, node, version, value);
        }
        let delta = (!left_out.is_empty()).then(|| without_nodes(&msg.delta, &left_out));
        if msg.digest.is_empty() && delta.is_none() {
            out.clear();
            out.extend_from_slice(bytes);
            return Ok(admitted);
        }
        let before = msg.digest.len();
        let digest: Vec<DigestEntry> = msg
            .digest
            .iter()
            .filter_map(|e| self.rewrite(sender, e, now_ms, scope))
            .collect();
        admitted.dropped_entries = before - digest.len();
        match delta {
            None => wire::write_with_digest(&msg, &digest, out),
            Some(ops) => {
                let mut tail = Vec::new();
                wire::encode_delta(&ops, &mut tail);
                let msg = wire::Message {
                    tail: &tail,
                    ..msg.clone()
                };
                wire::write_with_digest(&msg, &digest, out);
            }
        }
        Ok(admitted)
    }

    /// Whether `node` may be learned under `scope` from someone other than
    /// itself: it is in the key's member set, or (a key without one) not
    /// stale or already known.
    fn vouched(&self, node: NodeId, scope: KeyScope<'_>) -> bool {
        match scope.members {
            Some(members) => members.contains(&node),
            None => {
                !scope.stale
                    || self.generations.get(&node).into_iter().flatten().any(|g| {
                        self.incarnations
                            .get(&(node, *g))
                            .is_some_and(|i| i.record.is_some())
                    })
            }
        }
    }

    /// Verifies every op of a delta; returns the records to remember.
    /// Structure first (cheap, and what would break chitchat), signatures
    /// second.
    #[allow(clippy::type_complexity)]
    fn check_delta(&self, ops: &[DeltaOp]) -> Result<Vec<(WireId, NodeId, u64, String)>, Refusal> {
        for op in ops {
            match op {
                DeltaOp::Node {
                    last_gc_version, ..
                } if *last_gc_version != 0 => {
                    return Err(Refusal::Unsafe(
                        "garbage-collection version (ovl never deletes keys)",
                    ));
                }
                DeltaOp::SetMaxVersion(_) => {
                    return Err(Refusal::Unsafe(
                        "SetMaxVersion (ovl never deletes keys; it can trip chitchat's assertion)",
                    ));
                }
                _ => {}
            }
        }
        let mut current: Option<(&WireId, NodeId)> = None;
        let mut out = Vec::new();
        for op in ops {
            match op {
                DeltaOp::Node { id, .. } => {
                    let node: NodeId = id
                        .node_id
                        .parse()
                        .map_err(|_| Refusal::Forged("node id is not an ovl node id".into()))?;
                    if *id == self.me {
                        return Err(Refusal::Forged(
                            "a delta about this very node, from someone else".into(),
                        ));
                    }
                    current = Some((id, node));
                }
                DeltaOp::KeyValue {
                    key,
                    value,
                    version,
                    status,
                } => {
                    let Some((id, node)) = current else {
                        return Err(Refusal::Malformed(WireError::Malformed));
                    };
                    if *status != 0 {
                        return Err(Refusal::Forged(format!("deletion of key {key:?}")));
                    }
                    if key != RECORD_KEY {
                        return Err(Refusal::Forged(format!(
                            "unsigned key {:?}",
                            key.chars().take(32).collect::<String>()
                        )));
                    }
                    if !self.known(node, id, *version, value) {
                        let slot = Slot {
                            node_id: &id.node_id,
                            generation: id.generation,
                            gossip_addr: id.gossip_addr,
                            version: *version,
                        };
                        record::verify(self.cluster, value, slot).map_err(|e: RecordError| {
                            Refusal::Forged(format!("record of node {}: {e}", id.node_id))
                        })?;
                    }
                    out.push((id.clone(), node, *version, value.clone()));
                }
                DeltaOp::SetMaxVersion(_) => {}
            }
        }
        Ok(out)
    }

    /// The same value at the same version was verified before.
    fn known(&self, node: NodeId, id: &WireId, version: u64, value: &str) -> bool {
        self.incarnations
            .get(&(node, id.generation))
            .filter(|i| i.gossip_addr == id.gossip_addr)
            .and_then(|i| i.record.as_ref())
            .is_some_and(|(v, val)| *v == version && val == value)
    }

    fn learn(&mut self, id: WireId, node: NodeId, version: u64, value: String) {
        let Some(inc) = self.slot(node, &id) else {
            return;
        };
        if inc.gossip_addr != id.gossip_addr {
            // A pending entry (the sender's own claim) with another address
            // is replaced by what the owner signed.
            inc.gossip_addr = id.gossip_addr;
        }
        if inc.record.as_ref().is_none_or(|(v, _)| *v < version) {
            inc.record = Some((version, value));
        }
    }

    /// The entry for an incarnation, created within the bounds.
    fn slot(&mut self, node: NodeId, id: &WireId) -> Option<&mut Incarnation> {
        let key = (node, id.generation);
        if !self.incarnations.contains_key(&key) {
            if self.incarnations.len() >= MAX_INCARNATIONS {
                return None;
            }
            let gens = self.generations.entry(node).or_default();
            gens.push_back(id.generation);
            if gens.len() > GENERATIONS_PER_NODE
                && let Some(old) = gens.pop_front()
            {
                self.incarnations.remove(&(node, old));
            }
            self.incarnations.insert(
                key,
                Incarnation {
                    gossip_addr: id.gossip_addr,
                    record: None,
                },
            );
        }
        self.incarnations.get_mut(&key)
    }

    /// The digest entry chitchat sees instead of `e`, if any.
    fn rewrite(
        &mut self,
        sender: NodeId,
        e: &DigestEntry,
        now_ms: u64,
        scope: KeyScope<'_>,
    ) -> Option<DigestEntry> {
        if e.id == self.me {
            // Chitchat ignores heartbeats about itself; the versions tell
            // it what the sender lacks.
            return Some(e.clone());
        }
        let node: NodeId = e.id.node_id.parse().ok()?;
        if node != sender && !self.vouched(node, scope) {
            return None;
        }
        let known = if node == sender {
            // The sender speaks for itself: a pending entry is made so its
            // record, when it comes, has a place.
            let inc = self.slot(node, &e.id)?;
            inc.gossip_addr == e.id.gossip_addr
        } else {
            self.incarnations
                .get(&(node, e.id.generation))
                .is_some_and(|i| i.record.is_some() && i.gossip_addr == e.id.gossip_addr)
        };
        known.then(|| DigestEntry {
            heartbeat: e
                .heartbeat
                .min(now_ms.saturating_add(HEARTBEAT_TOLERANCE_MS)),
            ..e.clone()
        })
    }
}

/// Whether chitchat's reply to a datagram from `from` goes back to its
/// authenticated `sender`. A Syn or SynAck draws a reply to the source
/// address, so it must come from the gossip address the sender's own
/// signed digest entry names; otherwise a captured datagram resent from a
/// spoofed source would reflect a reply (up to 8x larger, growing with the
/// cluster) at a stranger (issue 8). An Ack draws nothing.
pub fn replies_to_sender(bytes: &[u8], sender: NodeId, from: SocketAddr) -> bool {
    let Ok(msg) = wire::parse_head(bytes) else {
        // Refused later as malformed, and counted there.
        return true;
    };
    if !matches!(msg.kind, wire::Kind::Syn | wire::Kind::SynAck) {
        return true;
    }
    let canon = |a: SocketAddr| (a.ip().to_canonical(), a.port());
    msg.digest.iter().any(|e| {
        e.id.node_id.parse::<NodeId>().ok() == Some(sender)
            && canon(e.id.gossip_addr) == canon(from)
    })
}

/// `ops` without the node blocks (a `Node` op and its key-values) of
/// `nodes`.
fn without_nodes(ops: &[DeltaOp], nodes: &BTreeSet<NodeId>) -> Vec<DeltaOp> {
    let mut keep = true;
    ops.iter()
        .filter(|op| {
            if let DeltaOp::Node { id, .. } = op {
                keep = !id
                    .node_id
                    .parse::<NodeId>()
                    .is_ok_and(|n| nodes.contains(&n));
            }
            keep
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::identity::node_id_of;
    use crate::membership::record::NodeFacts;
    use crate::membership::wire::{Kind, encode_message};
    use ring::rand::SystemRandom;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    const CLUSTER_BYTES: [u8; 16] = [7; 16];
    const OPEN: KeyScope<'static> = KeyScope {
        members: None,
        stale: false,
    };
    const NOW: u64 = 1_800_000_000_000;

    struct Node {
        key: Ed25519KeyPair,
        id: NodeId,
        wire: WireId,
    }

    fn node(port: u16, generation: u64) -> Node {
        let rng = SystemRandom::new();
        let key =
            Ed25519KeyPair::from_pkcs8(Ed25519KeyPair::generate_pkcs8(&rng).unwrap().as_ref())
                .unwrap();
        let id = node_id_of(key.public_key().as_ref());
        let wire = WireId {
            node_id: id.to_string(),
            generation,
            gossip_addr: SocketAddr::from(([198, 18, 0, 10], port)),
        };
        Node { key, id, wire }
    }

    fn rec(n: &Node, version: u64, left: bool) -> DeltaOp {
        DeltaOp::KeyValue {
            key: RECORD_KEY.into(),
            value: record::sign(
                &n.key,
                ClusterId::from_bytes(CLUSTER_BYTES),
                n.wire.generation,
                version,
                n.wire.gossip_addr,
                &NodeFacts {
                    name: "n".into(),
                    left,
                    ..NodeFacts::default()
                },
            ),
            version,
            status: 0,
        }
    }

    fn node_op(id: &WireId) -> DeltaOp {
        DeltaOp::Node {
            id: id.clone(),
            last_gc_version: 0,
            from_version: 0,
        }
    }

    fn entry(id: &WireId, heartbeat: u64) -> DigestEntry {
        DigestEntry {
            id: id.clone(),
            heartbeat,
            last_gc_version: 0,
            max_version: 1,
        }
    }

    fn admit(
        g: &mut Guard,
        sender: NodeId,
        bytes: &[u8],
    ) -> Result<wire::Message<'static>, Refusal> {
        let mut out = Vec::new();
        g.admit(sender, bytes, NOW, &Default::default(), OPEN, &mut out)?;
        let leaked: &'static [u8] = Box::leak(out.into_boxed_slice());
        Ok(wire::parse(leaked).unwrap())
    }

    #[test]
    fn records_signed_by_their_owner_pass_and_forgeries_refuse_the_datagram() {
        let me = node(1, 1);
        let h1 = node(2, 10);
        let m = node(3, 5);
        let mut g = Guard::new(ClusterId::from_bytes(CLUSTER_BYTES), me.wire.clone());
        let ok = encode_message(Kind::Ack, &[], &[node_op(&h1.wire), rec(&h1, 1, false)]);
        assert!(admit(&mut g, m.id, &ok).is_ok());

        // m signs a record claiming to be h1 (newer generation, left).
        let mut fake = node(2, 11);
        fake.key = m.key;
        fake.wire.node_id = h1.wire.node_id.clone();
        let forged = encode_message(Kind::Ack, &[], &[node_op(&fake.wire), rec(&fake, 1, true)]);
        assert!(matches!(
            admit(&mut g, m.id, &forged),
            Err(Refusal::Forged(_))
        ));
        // h1's genuine record replayed at a version it was not signed for.
        let mut replay = rec(&h1, 1, false);
        if let DeltaOp::KeyValue { version, .. } = &mut replay {
            *version = 1_000_000;
        }
        let bad = encode_message(Kind::Ack, &[], &[node_op(&h1.wire), replay]);
        assert!(matches!(admit(&mut g, m.id, &bad), Err(Refusal::Forged(_))));
        // Plain unsigned facts, deletions, and the assertion trigger.
        for ops in [
            vec![
                node_op(&h1.wire),
                DeltaOp::KeyValue {
                    key: "left".into(),
                    value: "1".into(),
                    version: 9,
                    status: 0,
                },
            ],
            vec![
                node_op(&h1.wire),
                DeltaOp::KeyValue {
                    key: RECORD_KEY.into(),
                    value: String::new(),
                    version: 9,
                    status: 1,
                },
            ],
        ] {
            let b = encode_message(Kind::Ack, &[], &ops);
            assert!(
                matches!(admit(&mut g, m.id, &b), Err(Refusal::Forged(_))),
                "{ops:?}"
            );
        }
        let trip = encode_message(
            Kind::Ack,
            &[],
            &[
                node_op(&h1.wire),
                rec(&h1, 10, false),
                DeltaOp::SetMaxVersion(5),
            ],
        );
        assert!(matches!(
            admit(&mut g, m.id, &trip),
            Err(Refusal::Unsafe(_))
        ));
        let about_me = encode_message(Kind::Ack, &[], &[node_op(&me.wire), rec(&me, 9, true)]);
        assert!(matches!(
            admit(&mut g, m.id, &about_me),
            Err(Refusal::Forged(_))
        ));
    }

    #[test]
    fn unverified_incarnations_vanish_from_digests_but_a_senders_own_entry_stays() {
        let me = node(1, 1);
        let h1 = node(2, 10);
        let m = node(3, 5);
        let mut g = Guard::new(ClusterId::from_bytes(CLUSTER_BYTES), me.wire.clone());
        let mut newer = h1.wire.clone();
        newer.generation = 11;
        let syn = encode_message(
            Kind::Syn,
            &[entry(&m.wire, 3), entry(&newer, 99), entry(&me.wire, 1)],
            &[],
        );
        let seen = admit(&mut g, m.id, &syn).unwrap();
        let ids: Vec<&WireId> = seen.digest.iter().map(|e| &e.id).collect();
        assert_eq!(ids, vec![&m.wire, &me.wire]);
    }

    #[test]
    fn a_forged_heartbeat_is_capped_at_our_clock() {
        let me = node(1, 1);
        let h1 = node(2, 10);
        let m = node(3, 5);
        let mut g = Guard::new(ClusterId::from_bytes(CLUSTER_BYTES), me.wire.clone());
        let learn = encode_message(Kind::Ack, &[], &[node_op(&h1.wire), rec(&h1, 1, false)]);
        admit(&mut g, h1.id, &learn).unwrap();
        let hb = |g: &mut Guard, sender: NodeId, value: u64| {
            let syn = encode_message(Kind::Syn, &[entry(&h1.wire, value)], &[]);
            admit(g, sender, &syn).unwrap().digest[0].heartbeat
        };
        assert_eq!(hb(&mut g, h1.id, NOW - 5), NOW - 5);
        assert_eq!(hb(&mut g, m.id, NOW - 9), NOW - 9);
        // m relays u64::MAX - 1 for h1: h1's real heartbeats overtake it
        // within the tolerance.
        assert_eq!(hb(&mut g, m.id, u64::MAX - 1), NOW + HEARTBEAT_TOLERANCE_MS);
        assert_eq!(own_heartbeat(5, NOW), NOW);
        assert_eq!(own_heartbeat(NOW + 3, NOW), NOW + 4);
    }

    fn admit_in(
        g: &mut Guard,
        sender: NodeId,
        bytes: &[u8],
        scope: KeyScope<'_>,
    ) -> Result<(Admitted, wire::Message<'static>), Refusal> {
        let mut out = Vec::new();
        let a = g.admit(sender, bytes, NOW, &Default::default(), scope, &mut out)?;
        let leaked: &'static [u8] = Box::leak(out.into_boxed_slice());
        Ok((a, wire::parse(leaked).unwrap()))
    }

    fn nodes_in(m: &wire::Message<'_>) -> Vec<String> {
        m.delta
            .iter()
            .filter_map(|op| match op {
                DeltaOp::Node { id, .. } => Some(id.node_id.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_stale_key_teaches_no_new_identity_and_a_member_set_vouches_for_relays() {
        let me = node(1, 1);
        let h1 = node(2, 10);
        let fresh = node(3, 5);
        let mut g = Guard::new(ClusterId::from_bytes(CLUSTER_BYTES), me.wire.clone());
        let members: BTreeSet<NodeId> = [me.id, h1.id].into();
        let stale = KeyScope {
            members: Some(&members),
            stale: true,
        };
        let current = KeyScope {
            members: Some(&members),
            stale: false,
        };
        let own = |n: &Node| {
            encode_message(
                Kind::SynAck,
                &[entry(&n.wire, NOW)],
                &[node_op(&n.wire), rec(n, 1, false)],
            )
        };
        // The removed node's fresh identity, speaking for itself under the
        // old key: refused whole.
        assert_eq!(
            admit_in(&mut g, fresh.id, &own(&fresh), stale).err(),
            Some(Refusal::StaleKeyStranger)
        );
        // A member relays it (a member that accepted it before hearing of
        // the rotation): its record and digest entry are left out, the
        // member's own kept.
        let relay = encode_message(
            Kind::SynAck,
            &[entry(&h1.wire, NOW), entry(&fresh.wire, NOW)],
            &[
                node_op(&fresh.wire),
                rec(&fresh, 1, false),
                node_op(&h1.wire),
                rec(&h1, 1, false),
            ],
        );
        for (scope, stale_n, unvouched_n) in [(stale, 1, 0), (current, 0, 1)] {
            let (a, seen) = admit_in(&mut g, h1.id, &relay, scope).unwrap();
            assert_eq!((a.stale_strangers, a.unvouched), (stale_n, unvouched_n));
            assert_eq!(a.admit, None);
            assert_eq!(nodes_in(&seen), vec![h1.wire.node_id.clone()]);
            assert_eq!(seen.digest.len(), 1, "{:?}", seen.digest);
        }
        // Sealing with the key in use proves the identity holds it: it is
        // learned and handed back to join the set.
        let (a, seen) = admit_in(&mut g, fresh.id, &own(&fresh), current).unwrap();
        assert_eq!(a.admit, Some(fresh.id));
        assert_eq!(nodes_in(&seen), vec![fresh.wire.node_id.clone()]);
    }

    #[test]
    fn without_a_member_set_a_stale_key_still_teaches_only_known_identities() {
        let me = node(1, 1);
        let h1 = node(2, 10);
        let fresh = node(3, 5);
        let mut g = Guard::new(ClusterId::from_bytes(CLUSTER_BYTES), me.wire.clone());
        let learn = encode_message(Kind::Ack, &[], &[node_op(&h1.wire), rec(&h1, 1, false)]);
        admit(&mut g, h1.id, &learn).unwrap();
        let stale = KeyScope {
            members: None,
            stale: true,
        };
        let (a, _) = admit_in(&mut g, h1.id, &learn, stale).unwrap();
        assert_eq!(a, Admitted::default(), "known before the switch");
        let own = encode_message(
            Kind::Ack,
            &[],
            &[node_op(&fresh.wire), rec(&fresh, 1, false)],
        );
        assert_eq!(
            admit_in(&mut g, fresh.id, &own, stale).err(),
            Some(Refusal::StaleKeyStranger)
        );
        let (a, _) = admit_in(&mut g, fresh.id, &own, OPEN).unwrap();
        assert_eq!(a.admit, None, "no set to join");
    }

    #[test]
    fn a_syn_draws_a_reply_only_towards_its_senders_own_gossip_address() {
        let (a, b) = (node(7946, 1), node(7946, 2));
        let at = a.wire.gossip_addr;
        let elsewhere = SocketAddr::from(([198, 18, 9, 9], 7946));
        let syn = encode_message(Kind::Syn, &[entry(&b.wire, 1), entry(&a.wire, 1)], &[]);
        assert!(replies_to_sender(&syn, a.id, at));
        assert!(!replies_to_sender(&syn, a.id, elsewhere), "spoofed source");
        assert!(
            !replies_to_sender(&syn, a.id, SocketAddr::from(([198, 18, 0, 10], 7947))),
            "same host, other port"
        );
        // A digest naming the sender only at another address, or not at
        // all, binds no reply address.
        let other = encode_message(Kind::Syn, &[entry(&b.wire, 1)], &[]);
        assert!(!replies_to_sender(&other, a.id, at));
        let synack = encode_message(Kind::SynAck, &[entry(&a.wire, 1)], &[]);
        assert!(!replies_to_sender(&synack, a.id, elsewhere));
        assert!(replies_to_sender(&synack, a.id, at));
        // An Ack draws no reply: wherever it comes from, it passes here.
        let ack = encode_message(Kind::Ack, &[], &[rec(&a, 1, false)]);
        assert!(replies_to_sender(&ack, a.id, elsewhere));
    }
}
