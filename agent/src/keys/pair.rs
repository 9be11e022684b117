//! Per-epoch, per-host-pair data keys for encrypted networks (sans-IO).
//!
//! DESIGN.md "Trust and keys": each node publishes an X25519 public key per
//! epoch in its signed node record, a period ahead; both ends of a pair
//! derive the same two directional keys from the X25519 shared secret with
//! HKDF-SHA256 over (cluster id, sender id, receiver id, epoch). Data keys
//! never travel, and a compromised node exposes only its own pairs.
//!
//! A direction's *traffic secret* yields, for every 2^32 packets, a fresh
//! AES-256-GCM key (its *generation*, the sequence number's high 32 bits),
//! so no key ever seals more than 2^32 packets, without any coordination:
//! the receiver reads the generation from the sequence number it already
//! gets. The nonce is `salt (4) ‖ sequence (8)`, unique per key as long as
//! the sequence never repeats; it never does within a process, and across
//! restarts the X25519 secrets are new (they are never persisted), so every
//! key is new too.

use std::fmt;

use ring::{aead, hkdf};
use x25519_dalek::{PublicKey, StaticSecret};

use crate::ids::{ClusterId, NodeId};

/// HKDF salt, fixed per protocol version (RFC 5869 §3.1 allows a constant).
const HKDF_SALT: &[u8] = b"ovl data plane v1";
/// Packets per key generation: the sequence number's low 32 bits.
pub const PACKETS_PER_KEY: u64 = 1 << 32;

/// An epoch: `floor(unix time / rotation period)`.
pub fn epoch_at(now_ms: u64, period_ms: u64) -> u64 {
    now_ms / period_ms.max(1)
}

/// When `epoch` starts, in unix ms.
pub fn epoch_start_ms(epoch: u64, period_ms: u64) -> u64 {
    epoch.saturating_mul(period_ms.max(1))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PairError {
    /// The peer's key is a low-order point: the shared secret would be
    /// all zeroes, known to anyone (RFC 7748 §6.1).
    #[error("the peer's key-exchange key is not contributory (low-order point)")]
    NotContributory,
}

/// This node's X25519 secret for one epoch. Created from fresh random
/// bytes, held in memory only.
pub struct EpochSecret {
    pub epoch: u64,
    secret: StaticSecret,
}

impl fmt::Debug for EpochSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EpochSecret(epoch {}, secret hidden)", self.epoch)
    }
}

impl EpochSecret {
    pub fn from_random(epoch: u64, random: [u8; 32]) -> Self {
        Self {
            epoch,
            secret: StaticSecret::from(random),
        }
    }

    /// What goes in the signed node record.
    pub fn public(&self) -> [u8; 32] {
        PublicKey::from(&self.secret).to_bytes()
    }

    /// The pair's keys between us (`me`) and `peer`, whose published key
    /// for this epoch is `peer_public`.
    pub fn pair(
        &self,
        cluster: ClusterId,
        me: NodeId,
        peer: NodeId,
        peer_public: [u8; 32],
    ) -> Result<PairKeys, PairError> {
        let shared = self.secret.diffie_hellman(&PublicKey::from(peer_public));
        if !shared.was_contributory() {
            return Err(PairError::NotContributory);
        }
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(shared.as_bytes());
        Ok(PairKeys {
            send: DirectionKey::derive(&prk, cluster, me, peer, self.epoch),
            recv: DirectionKey::derive(&prk, cluster, peer, me, self.epoch),
        })
    }
}

/// Both directions of one pair in one epoch. Not `Clone`: a direction key
/// moves into the one `Sender` (or `Receiver`) that uses it, because two
/// senders on one key would both start at sequence 0 and reuse nonces.
#[derive(Debug)]
pub struct PairKeys {
    pub send: DirectionKey,
    pub recv: DirectionKey,
}

/// Output length carrier for `Prk::expand` into raw bytes.
struct Len(usize);
impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn expand(prk: &hkdf::Prk, info: &[&[u8]], out: &mut [u8]) {
    // At most 40 bytes: far below HKDF-SHA256's 255 * 32 (RFC 5869 §2.3).
    prk.expand(info, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .expect("HKDF-SHA256 expands 40 bytes");
}

/// One direction (sender → receiver) of a pair in one epoch: the SPI the
/// receiver finds it by, the nonce salt, and the traffic secret each key
/// generation comes from. Never printed, never cloned (see [`PairKeys`]).
pub struct DirectionKey {
    pub spi: u32,
    pub salt: [u8; 4],
    pub epoch: u64,
    secret: [u8; 32],
}

impl fmt::Debug for DirectionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "DirectionKey(spi {:08x}, epoch {}, fingerprint {:08x})",
            self.spi,
            self.epoch,
            self.fingerprint()
        )
    }
}

impl DirectionKey {
    fn derive(prk: &hkdf::Prk, cluster: ClusterId, from: NodeId, to: NodeId, epoch: u64) -> Self {
        let mut okm = [0u8; 40];
        let epoch_be = epoch.to_be_bytes();
        expand(
            prk,
            &[
                b"ovl dp direction",
                cluster.as_bytes(),
                from.as_bytes(),
                to.as_bytes(),
                &epoch_be,
            ],
            &mut okm,
        );
        let mut secret = [0u8; 32];
        secret.copy_from_slice(&okm[..32]);
        let mut salt = [0u8; 4];
        salt.copy_from_slice(&okm[32..36]);
        let spi = u32::from_be_bytes([okm[36], okm[37], okm[38], okm[39]]);
        Self {
            spi,
            salt,
            epoch,
            secret,
        }
    }

    /// The AES-256-GCM key of generation `g` (sequence numbers
    /// `g·2^32 .. (g+1)·2^32`).
    pub fn generation(&self, g: u32) -> aead::LessSafeKey {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(&self.secret);
        let mut key = [0u8; 32];
        expand(&prk, &[b"ovl dp generation", &g.to_be_bytes()], &mut key);
        aead::LessSafeKey::new(
            aead::UnboundKey::new(&aead::AES_256_GCM, &key).expect("AES-256-GCM takes 32 bytes"),
        )
    }

    /// A public name for the key (`network inspect`), never the key.
    pub fn fingerprint(&self) -> u32 {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(&self.secret);
        let mut fp = [0u8; 4];
        expand(&prk, &[b"ovl dp fingerprint"], &mut fp);
        u32::from_be_bytes(fp)
    }

    /// The nonce of sequence number `seq`.
    pub fn nonce(&self, seq: u64) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[..4].copy_from_slice(&self.salt);
        n[4..].copy_from_slice(&seq.to_be_bytes());
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(b: u8) -> NodeId {
        NodeId::from_bytes([b; 16])
    }

    const CLUSTER: ClusterId = ClusterId::from_bytes([7; 16]);

    #[test]
    fn both_ends_derive_each_others_directions() {
        let a = EpochSecret::from_random(5, [1; 32]);
        let b = EpochSecret::from_random(5, [2; 32]);
        let ab = a.pair(CLUSTER, node(1), node(2), b.public()).unwrap();
        let ba = b.pair(CLUSTER, node(2), node(1), a.public()).unwrap();
        for (x, y) in [(&ab.send, &ba.recv), (&ab.recv, &ba.send)] {
            assert_eq!(x.spi, y.spi);
            assert_eq!(x.salt, y.salt);
            assert_eq!(x.fingerprint(), y.fingerprint());
        }
        assert_ne!(ab.send.spi, ab.recv.spi);
        assert_ne!(ab.send.fingerprint(), ab.recv.fingerprint());
    }

    #[test]
    fn keys_differ_by_epoch_cluster_pair_and_generation() {
        let a = EpochSecret::from_random(5, [1; 32]);
        let b = EpochSecret::from_random(5, [2; 32]);
        let base = a.pair(CLUSTER, node(1), node(2), b.public()).unwrap().send;
        let other_cluster = a
            .pair(ClusterId::from_bytes([8; 16]), node(1), node(2), b.public())
            .unwrap()
            .send;
        let other_peer = a.pair(CLUSTER, node(1), node(3), b.public()).unwrap().send;
        let later = EpochSecret::from_random(6, [1; 32])
            .pair(CLUSTER, node(1), node(2), b.public())
            .unwrap()
            .send;
        for k in [&other_cluster, &other_peer, &later] {
            assert_ne!(k.fingerprint(), base.fingerprint(), "{k:?}");
        }
        // Generations seal differently.
        let seal = |key: &aead::LessSafeKey| {
            let mut buf = b"frame".to_vec();
            key.seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(base.nonce(1)),
                aead::Aad::empty(),
                &mut buf,
            )
            .unwrap();
            buf
        };
        assert_ne!(seal(&base.generation(0)), seal(&base.generation(1)));
        assert_eq!(seal(&base.generation(0)), seal(&base.generation(0)));
    }

    #[test]
    fn a_low_order_peer_key_is_refused() {
        let a = EpochSecret::from_random(1, [1; 32]);
        assert_eq!(
            a.pair(CLUSTER, node(1), node(2), [0; 32]).err(),
            Some(PairError::NotContributory)
        );
    }

    #[test]
    fn epochs_and_nonces() {
        assert_eq!(epoch_at(12_345, 5_000), 2);
        assert_eq!(epoch_start_ms(2, 5_000), 10_000);
        assert_eq!(epoch_at(1, 0), 1, "a zero period is treated as 1 ms");
        let k = EpochSecret::from_random(0, [1; 32])
            .pair(
                CLUSTER,
                node(1),
                node(2),
                EpochSecret::from_random(0, [2; 32]).public(),
            )
            .unwrap()
            .send;
        assert_eq!(&k.nonce(0x0102)[..4], &k.salt);
        assert_eq!(&k.nonce(0x0102)[4..], &0x0102u64.to_be_bytes());
        assert!(!format!("{k:?}").contains(&format!("{:?}", k.secret)));
    }
}
