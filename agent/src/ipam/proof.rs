//! Signed ring writes (sans-IO): every ring entry carries the signature of
//! the node that wrote it (DESIGN.md "Trust and keys": ring ranges change
//! only by their owner or by a grant the donor signed).
//!
//! A write says "addresses `block` of network N belong to `owner` at
//! `version`", signed with the writer's Ed25519 identity key over
//! `DOMAIN ‖ network id ‖ block ‖ owner ‖ version`. The proof names the
//! writer and carries its public key, so it can be checked without asking
//! anyone (the writer may have left long ago): the key must hash to the
//! writer's node id (`identity::node_id_of`). An entry may be a piece of
//! the signed block (the rest moved on since); the signature covers every
//! piece still at that owner and version.
//!
//! Whether the writer had the right to write is not the proof's business:
//! `ring::merge_entries` decides that against what the receiver knows.

use std::fmt;
use std::sync::Arc;

use ipnetwork::Ipv4Network;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de::Error};

use super::wire::text;
use crate::ids::{NetworkId, NodeId, decode_hex, encode_hex};
use crate::keys::identity::node_id_of;

/// Signature domain: a ring signature can serve no other purpose.
const DOMAIN: &[u8] = b"ovl ipam write v1";

/// The signed statement behind an entry.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Proof {
    /// The block as signed (the entry's block lies inside it).
    #[serde(with = "text")]
    pub block: Ipv4Network,
    #[serde(with = "text")]
    pub writer: NodeId,
    #[serde(with = "hex_bytes")]
    pub pk: [u8; 32],
    #[serde(with = "hex_bytes")]
    pub sig: [u8; 64],
}

impl fmt::Debug for Proof {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Proof({} by {})", self.block, self.writer.short())
    }
}

fn message(network: NetworkId, block: Ipv4Network, owner: NodeId, version: u64) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + 16 + 5 + 16 + 8);
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(network.as_bytes());
    m.extend_from_slice(&block.network().octets());
    m.push(block.prefix());
    m.extend_from_slice(owner.as_bytes());
    m.extend_from_slice(&version.to_be_bytes());
    m
}

impl Proof {
    /// Whether this proof backs `owner` at `version` for `block` (inside
    /// the signed block) in `network`: the key is the writer's and the
    /// signature verifies.
    pub fn verifies(
        &self,
        network: NetworkId,
        block: Ipv4Network,
        owner: NodeId,
        version: u64,
    ) -> bool {
        block.is_subnet_of(self.block)
            && node_id_of(&self.pk) == self.writer
            && UnparsedPublicKey::new(&ED25519, &self.pk)
                .verify(&message(network, self.block, owner, version), &self.sig)
                .is_ok()
    }
}

/// A node's identity key, bound to one network: what an `Allocator` signs
/// its writes with. Never serialised.
#[derive(Clone)]
pub struct Signer {
    key: Option<Arc<Ed25519KeyPair>>,
    id: NodeId,
    pk: [u8; 32],
    network: NetworkId,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Signer({} for {})",
            self.id.short(),
            self.network.short()
        )
    }
}

impl Signer {
    pub fn new(key: Arc<Ed25519KeyPair>, network: NetworkId) -> Self {
        let mut pk = [0u8; 32];
        let raw = key.public_key().as_ref();
        // Ed25519 public keys are 32 bytes (RFC 8032 §5.1.5).
        pk.copy_from_slice(&raw[..32.min(raw.len())]);
        Self {
            id: node_id_of(&pk),
            key: Some(key),
            pk,
            network,
        }
    }

    /// A stand-in for a node whose key is not at hand (an allocator used
    /// before `set_signer`): its writes carry no valid signature, so every
    /// receiver refuses them.
    pub(crate) fn unsigned(id: NodeId) -> Self {
        Self {
            key: None,
            id,
            pk: [0; 32],
            network: NetworkId::from_bytes([0; 16]),
        }
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn network(&self) -> NetworkId {
        self.network
    }

    pub fn sign(&self, block: Ipv4Network, owner: NodeId, version: u64) -> Proof {
        let mut s = [0u8; 64];
        if let Some(key) = &self.key {
            let sig = key.sign(&message(self.network, block, owner, version));
            let sig = sig.as_ref();
            s[..64.min(sig.len())].copy_from_slice(&sig[..64.min(sig.len())]);
        }
        Proof {
            block,
            writer: self.id,
            pk: self.pk,
            sig: s,
        }
    }
}

mod hex_bytes {
    use super::*;

    pub fn serialize<const N: usize, S: Serializer>(v: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&encode_hex(v))
    }

    pub fn deserialize<'de, const N: usize, D: Deserializer<'de>>(
        d: D,
    ) -> Result<[u8; N], D::Error> {
        let s = String::deserialize(d)?;
        decode_hex::<N>(&s).map_err(D::Error::custom)
    }
}
