//! Signed node records (sans-IO): everything a node publishes about itself
//! in gossip, signed with its identity key (DESIGN.md "Trust and keys").
//!
//! The record travels as chitchat's only key-value of the node, the value
//! being base64 of a `SignedNodeRecord`. Verification checks, in order:
//! the signature over the raw record bytes (under the key the record
//! names), that the key hashes to the node id, and that the record is for
//! the incarnation and chitchat version it is stored at. A record that
//! fails any of these is a forgery (or a bug) and changes nothing.

use std::net::SocketAddr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use ovl_proto::records::{ExchangeKey, NodeRecord, SignedNodeRecord};
use prost::Message;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use crate::ids::{ClusterId, NodeId};
use crate::keys::identity::node_id_of;
use crate::keys::schedule::{MAX_PUBLISHED, Published};

/// The chitchat key the record lives under; no other key is accepted.
pub const RECORD_KEY: &str = "rec";
/// Signature domain, so a record signature can serve no other purpose.
const DOMAIN: &[u8] = b"ovl node record v1";
/// Far above a real record (~250 bytes) and far below chitchat's ~64 KB
/// value limit, past which a node's updates freeze.
pub const MAX_RECORD_VALUE: usize = 32 * 1024;
/// Removed node ids a record carries at most (16 bytes each).
pub const MAX_REMOVED: usize = 1024;
const MAX_FIELD: usize = 255;

/// The facts a node states about itself; the incarnation, version and
/// key are added when it is signed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct NodeFacts {
    pub name: String,
    pub advertise_addr: String,
    pub data_path_addr: String,
    pub table_version: u64,
    pub left: bool,
    /// The join token this node admits with: (issued at, secret).
    pub token: Option<(u64, [u8; 32])>,
    /// Nodes removed from the cluster, as this node knows them.
    pub removed: std::collections::BTreeSet<NodeId>,
    /// X25519 public keys per epoch, oldest first (`keys::schedule`).
    pub exchange_keys: Vec<Published>,
    /// UDP port of the encrypted data plane (0: none published).
    pub encrypted_port: u16,
    /// MTU of the data-path interface (0: not yet known).
    pub data_path_mtu: u32,
}

impl std::fmt::Debug for NodeFacts {
    // By hand: the token secret must never reach a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeFacts")
            .field("name", &self.name)
            .field("advertise_addr", &self.advertise_addr)
            .field("data_path_addr", &self.data_path_addr)
            .field("table_version", &self.table_version)
            .field("left", &self.left)
            .field("token_issued_at", &self.token.map(|t| t.0))
            .field("removed", &self.removed.len())
            .field(
                "exchange_epochs",
                &self.exchange_keys.iter().map(|k| k.0).collect::<Vec<_>>(),
            )
            .field("encrypted_port", &self.encrypted_port)
            .field("data_path_mtu", &self.data_path_mtu)
            .finish()
    }
}

/// A record that verified: the facts and where they belong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedRecord {
    pub node_id: NodeId,
    pub generation: u64,
    pub version: u64,
    pub gossip_addr: SocketAddr,
    pub facts: NodeFacts,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record value too large ({0} bytes)")]
    TooLarge(usize),
    #[error("record value is not base64 of a signed record")]
    Encoding,
    #[error("signature does not verify under the record's key")]
    BadSignature,
    #[error("record key does not hash to node id {claimed}")]
    WrongKey { claimed: String },
    #[error("record is for incarnation {record}, stored under {stored}")]
    WrongIncarnation { record: String, stored: String },
    #[error("record field {0} is malformed")]
    Field(&'static str),
}

/// Where a record value is stored in chitchat: what it must be signed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot<'a> {
    pub node_id: &'a str,
    pub generation: u64,
    pub gossip_addr: SocketAddr,
    pub version: u64,
}

fn signed_message(cluster: ClusterId, record: &[u8]) -> Vec<u8> {
    [DOMAIN, cluster.as_bytes().as_slice(), record].concat()
}

/// Signs `facts` for `slot`; returns the chitchat value.
pub fn sign(
    key: &Ed25519KeyPair,
    cluster: ClusterId,
    generation: u64,
    version: u64,
    gossip_addr: SocketAddr,
    facts: &NodeFacts,
) -> String {
    let pk = key.public_key().as_ref();
    let record = NodeRecord {
        node_id: node_id_of(pk).as_bytes().to_vec(),
        identity_pk: pk.to_vec(),
        generation,
        version,
        gossip_addr: gossip_addr.to_string(),
        name: facts.name.clone(),
        advertise_addr: facts.advertise_addr.clone(),
        data_path_addr: facts.data_path_addr.clone(),
        table_version: facts.table_version,
        left: facts.left,
        token_issued_at_ms: facts.token.map_or(0, |t| t.0),
        token_secret: facts.token.map(|t| t.1.to_vec()).unwrap_or_default(),
        removed: facts
            .removed
            .iter()
            .take(MAX_REMOVED)
            .map(|id| id.as_bytes().to_vec())
            .collect(),
        exchange_keys: facts
            .exchange_keys
            .iter()
            .take(MAX_PUBLISHED)
            .map(|&(epoch, public)| ExchangeKey {
                epoch,
                public_key: public.to_vec(),
            })
            .collect(),
        encrypted_port: u32::from(facts.encrypted_port),
        data_path_mtu: facts.data_path_mtu,
    }
    .encode_to_vec();
    let signature = key.sign(&signed_message(cluster, &record));
    let signed = SignedNodeRecord {
        record,
        signature: signature.as_ref().to_vec(),
    };
    STANDARD_NO_PAD.encode(signed.encode_to_vec())
}

/// At most [`MAX_PUBLISHED`] keys of 32 bytes, epochs strictly ascending.
fn exchange_keys(keys: &[ExchangeKey]) -> Result<Vec<Published>, RecordError> {
    if keys.len() > MAX_PUBLISHED {
        return Err(RecordError::Field("exchange_keys"));
    }
    let out: Vec<Published> = keys
        .iter()
        .map(|k| {
            <[u8; 32]>::try_from(k.public_key.as_slice())
                .map(|pk| (k.epoch, pk))
                .map_err(|_| RecordError::Field("exchange_keys"))
        })
        .collect::<Result<_, _>>()?;
    if out.windows(2).any(|w| w[0].0 >= w[1].0) {
        return Err(RecordError::Field("exchange_keys"));
    }
    Ok(out)
}

fn field(s: &str, name: &'static str) -> Result<String, RecordError> {
    if s.len() > MAX_FIELD || s.chars().any(char::is_control) {
        return Err(RecordError::Field(name));
    }
    Ok(s.to_string())
}

/// Decodes a value without checking the signature: for values chitchat
/// already holds, which only ever got there through [`verify`] (remote) or
/// [`sign`] (our own). Still checks it belongs to `slot`.
pub fn decode(value: &str, slot: Slot<'_>) -> Result<VerifiedRecord, RecordError> {
    let (record, _, _) = open(value)?;
    check_slot(&record, slot)
}

/// Verifies a value received for `slot` (see the module comment).
pub fn verify(
    cluster: ClusterId,
    value: &str,
    slot: Slot<'_>,
) -> Result<VerifiedRecord, RecordError> {
    let (record, raw, signature) = open(value)?;
    UnparsedPublicKey::new(&ED25519, &record.identity_pk)
        .verify(&signed_message(cluster, &raw), &signature)
        .map_err(|_| RecordError::BadSignature)?;
    check_slot(&record, slot)
}

fn open(value: &str) -> Result<(NodeRecord, Vec<u8>, Vec<u8>), RecordError> {
    if value.len() > MAX_RECORD_VALUE {
        return Err(RecordError::TooLarge(value.len()));
    }
    let bytes = STANDARD_NO_PAD
        .decode(value)
        .map_err(|_| RecordError::Encoding)?;
    let signed = SignedNodeRecord::decode(bytes.as_slice()).map_err(|_| RecordError::Encoding)?;
    let record = NodeRecord::decode(signed.record.as_slice()).map_err(|_| RecordError::Encoding)?;
    Ok((record, signed.record, signed.signature))
}

fn check_slot(record: &NodeRecord, slot: Slot<'_>) -> Result<VerifiedRecord, RecordError> {
    let derived = node_id_of(&record.identity_pk);
    let claimed = slot.node_id.parse::<NodeId>().ok();
    if claimed != Some(derived) || record.node_id.as_slice() != derived.as_bytes() {
        return Err(RecordError::WrongKey {
            claimed: slot.node_id.chars().take(40).collect(),
        });
    }
    let gossip_addr: SocketAddr = record
        .gossip_addr
        .parse()
        .map_err(|_| RecordError::Field("gossip_addr"))?;
    if record.generation != slot.generation
        || record.version != slot.version
        || gossip_addr != slot.gossip_addr
    {
        return Err(RecordError::WrongIncarnation {
            record: format!(
                "generation {} version {} at {}",
                record.generation, record.version, record.gossip_addr
            ),
            stored: format!(
                "generation {} version {} at {}",
                slot.generation, slot.version, slot.gossip_addr
            ),
        });
    }
    if record.removed.len() > MAX_REMOVED {
        return Err(RecordError::Field("removed"));
    }
    let removed = record
        .removed
        .iter()
        .map(|b| {
            <[u8; 16]>::try_from(b.as_slice())
                .map(NodeId::from_bytes)
                .map_err(|_| RecordError::Field("removed"))
        })
        .collect::<Result<_, _>>()?;
    Ok(VerifiedRecord {
        node_id: derived,
        generation: record.generation,
        version: record.version,
        gossip_addr,
        facts: NodeFacts {
            name: field(&record.name, "name")?,
            advertise_addr: field(&record.advertise_addr, "advertise_addr")?,
            data_path_addr: field(&record.data_path_addr, "data_path_addr")?,
            table_version: record.table_version,
            left: record.left,
            token: match record.token_secret.len() {
                0 => None,
                _ => Some((
                    record.token_issued_at_ms,
                    record
                        .token_secret
                        .as_slice()
                        .try_into()
                        .map_err(|_| RecordError::Field("token_secret"))?,
                )),
            },
            removed,
            exchange_keys: exchange_keys(&record.exchange_keys)?,
            encrypted_port: u16::try_from(record.encrypted_port)
                .map_err(|_| RecordError::Field("encrypted_port"))?,
            data_path_mtu: data_path_mtu(record.data_path_mtu)?,
        },
    })
}

/// Smallest data-path MTU a record may state: IPv4's minimum datagram a
/// link must carry (RFC 791: 576 is what every host accepts; 68 is the
/// minimum MTU, far too small for any overlay). A record stating less, or
/// more than any link (65 535), is malformed rather than trusted to shrink
/// every network it joins.
pub const MIN_DATA_PATH_MTU: u32 = 576;
pub const MAX_DATA_PATH_MTU: u32 = 65_535;

fn data_path_mtu(v: u32) -> Result<u32, RecordError> {
    match v {
        0 | MIN_DATA_PATH_MTU..=MAX_DATA_PATH_MTU => Ok(v),
        _ => Err(RecordError::Field("data_path_mtu")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;

    fn key() -> Ed25519KeyPair {
        let rng = SystemRandom::new();
        Ed25519KeyPair::from_pkcs8(Ed25519KeyPair::generate_pkcs8(&rng).unwrap().as_ref()).unwrap()
    }

    fn facts() -> NodeFacts {
        NodeFacts {
            name: "h1".into(),
            advertise_addr: "198.18.0.11".into(),
            data_path_addr: "198.18.0.11".into(),
            table_version: 7,
            left: false,
            token: Some((5, [3; 32])),
            removed: [NodeId::from_bytes([1; 16])].into_iter().collect(),
            exchange_keys: vec![(4, [9; 32]), (5, [8; 32])],
            encrypted_port: 4500,
            data_path_mtu: 1500,
        }
    }

    #[test]
    fn a_signed_record_verifies_only_in_its_own_slot_and_cluster() {
        let k = key();
        let id = node_id_of(k.public_key().as_ref()).to_string();
        let cluster = ClusterId::from_bytes([3; 16]);
        let addr: SocketAddr = "198.18.0.11:7946".parse().unwrap();
        let v = sign(&k, cluster, 5, 2, addr, &facts());
        let slot = Slot {
            node_id: &id,
            generation: 5,
            gossip_addr: addr,
            version: 2,
        };
        let r = verify(cluster, &v, slot).unwrap();
        assert_eq!(r.facts, facts());
        assert_eq!(decode(&v, slot).unwrap(), r);

        let other = ClusterId::from_bytes([4; 16]);
        assert_eq!(verify(other, &v, slot), Err(RecordError::BadSignature));
        for bad in [
            Slot {
                generation: 6,
                ..slot
            },
            Slot { version: 3, ..slot },
            Slot {
                gossip_addr: "198.18.0.12:7946".parse().unwrap(),
                ..slot
            },
        ] {
            assert!(
                matches!(
                    verify(cluster, &v, bad),
                    Err(RecordError::WrongIncarnation { .. })
                ),
                "{bad:?}"
            );
        }
        // Someone else's key, claiming our id.
        let forged = sign(&key(), cluster, 5, 2, addr, &facts());
        assert!(matches!(
            verify(cluster, &forged, slot),
            Err(RecordError::WrongKey { .. })
        ));
    }

    #[test]
    fn tampered_or_garbage_values_are_refused() {
        let k = key();
        let id = node_id_of(k.public_key().as_ref()).to_string();
        let cluster = ClusterId::from_bytes([3; 16]);
        let addr: SocketAddr = "198.18.0.11:7946".parse().unwrap();
        let slot = Slot {
            node_id: &id,
            generation: 1,
            gossip_addr: addr,
            version: 1,
        };
        let v = sign(&k, cluster, 1, 1, addr, &facts());
        let mut bytes = STANDARD_NO_PAD.decode(&v).unwrap();
        // Flip a byte inside the record (after the outer tag and length).
        bytes[5] ^= 1;
        let tampered = STANDARD_NO_PAD.encode(&bytes);
        assert!(verify(cluster, &tampered, slot).is_err());
        assert_eq!(verify(cluster, "!!", slot), Err(RecordError::Encoding));
        assert!(matches!(
            verify(cluster, &"A".repeat(MAX_RECORD_VALUE + 1), slot),
            Err(RecordError::TooLarge(_))
        ));
        let mut bad = facts();
        bad.name = "evil\u{1b}[2J".into();
        let v = sign(&k, cluster, 1, 1, addr, &bad);
        assert_eq!(verify(cluster, &v, slot), Err(RecordError::Field("name")));
        for keys in [
            vec![(5, [1; 32]), (4, [2; 32])],
            vec![(4, [1; 32]), (4, [2; 32])],
        ] {
            let bad = NodeFacts {
                exchange_keys: keys,
                ..facts()
            };
            let v = sign(&k, cluster, 1, 1, addr, &bad);
            assert_eq!(
                verify(cluster, &v, slot),
                Err(RecordError::Field("exchange_keys"))
            );
        }
        // A member cannot shrink every network it joins to nothing.
        for mtu in [1, MIN_DATA_PATH_MTU - 1, MAX_DATA_PATH_MTU + 1] {
            let bad = NodeFacts {
                data_path_mtu: mtu,
                ..facts()
            };
            let v = sign(&k, cluster, 1, 1, addr, &bad);
            assert_eq!(
                verify(cluster, &v, slot),
                Err(RecordError::Field("data_path_mtu"))
            );
        }
        for mtu in [0, MIN_DATA_PATH_MTU, 9000] {
            let ok = NodeFacts {
                data_path_mtu: mtu,
                ..facts()
            };
            let v = sign(&k, cluster, 1, 1, addr, &ok);
            assert_eq!(
                verify(cluster, &v, slot).map(|r| r.facts.data_path_mtu),
                Ok(mtu)
            );
        }
    }
}
