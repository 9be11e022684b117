//! Sealing of gossip datagrams with the cluster key (sans-IO).
//!
//! Wire format, one UDP datagram:
//! `magic "OVG1" (4) | sent-at unix ms (8, BE) | nonce (12) | ciphertext | tag (16)`
//! AES-256-GCM with AAD = magic ‖ sent-at. Nonces are random: memberlist does
//! the same, and at gossip rates the 2^32-message birthday bound per key is
//! decades away. The timestamp bounds replay of captured datagrams to the
//! skew window; within it, chitchat's versioned state makes a replay harmless.

use ring::aead::{Aad, LessSafeKey, Nonce};

use crate::metrics::Counter;

const MAGIC: &[u8; 4] = b"OVG1";
const HEADER_LEN: usize = 4 + 8;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
pub const OVERHEAD: usize = HEADER_LEN + NONCE_LEN + TAG_LEN;
/// Largest datagram we send or accept (IPv4 UDP payload limit).
pub const MAX_DATAGRAM: usize = 65_507;

/// Why a received gossip datagram was dropped. Each has a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GossipDrop {
    #[error("too short to be sealed gossip")]
    Short,
    #[error("not ovl gossip (bad magic)")]
    BadMagic,
    #[error("sent-at outside the allowed clock skew (replay or bad clock)")]
    Stale,
    #[error("authentication failed (wrong cluster key or tampered)")]
    BadTag,
}

impl GossipDrop {
    pub fn counter(self) -> Counter {
        match self {
            Self::Short => Counter::GossipDropShort,
            Self::BadMagic => Counter::GossipDropBadMagic,
            Self::Stale => Counter::GossipDropStale,
            Self::BadTag => Counter::GossipDropBadTag,
        }
    }
}

/// The sent-at stamp of a datagram, before opening it (it is checked by
/// [`Sealer::open`], which binds it to the ciphertext as AAD).
pub fn sent_at(datagram: &[u8]) -> Option<u64> {
    let ts: [u8; 8] = datagram.get(4..HEADER_LEN)?.try_into().ok()?;
    Some(u64::from_be_bytes(ts))
}

pub struct Sealer {
    key: LessSafeKey,
    max_skew_ms: u64,
}

impl Sealer {
    pub fn new(key: LessSafeKey, max_skew_ms: u64) -> Self {
        Self { key, max_skew_ms }
    }

    /// Seals `plaintext` into `out` (cleared first).
    pub fn seal(&self, now_ms: u64, nonce: [u8; NONCE_LEN], plaintext: &[u8], out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&now_ms.to_be_bytes());
        out.extend_from_slice(&nonce);
        let body_at = out.len();
        out.extend_from_slice(plaintext);
        let (head, body) = out.split_at_mut(body_at);
        let aad = Aad::from(&head[..HEADER_LEN]);
        let tag = self
            .key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), aad, body)
            // ring fails only past 2^36 bytes of plaintext; datagrams are < 64 KiB.
            .expect("AES-GCM seals a datagram-sized buffer");
        out.extend_from_slice(tag.as_ref());
    }

    /// Opens a datagram in place and returns the plaintext slice.
    pub fn open<'a>(&self, now_ms: u64, datagram: &'a mut [u8]) -> Result<&'a [u8], GossipDrop> {
        if datagram.len() < OVERHEAD {
            return Err(GossipDrop::Short);
        }
        if &datagram[..4] != MAGIC {
            return Err(GossipDrop::BadMagic);
        }
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&datagram[4..HEADER_LEN]);
        if now_ms.abs_diff(u64::from_be_bytes(ts)) > self.max_skew_ms {
            return Err(GossipDrop::Stale);
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&datagram[HEADER_LEN..HEADER_LEN + NONCE_LEN]);
        let (head, body) = datagram.split_at_mut(HEADER_LEN + NONCE_LEN);
        let aad = Aad::from(&head[..HEADER_LEN]);
        self.key
            .open_in_place(Nonce::assume_unique_for_key(nonce), aad, body)
            .map(|p| &*p)
            .map_err(|_| GossipDrop::BadTag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::aead::{AES_256_GCM, UnboundKey};

    fn sealer(k: u8) -> Sealer {
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[k; 32]).unwrap());
        Sealer::new(key, 60_000)
    }

    #[test]
    fn round_trip() {
        let s = sealer(1);
        let mut out = Vec::new();
        s.seal(1_000_000, [7; 12], b"hello gossip", &mut out);
        assert_eq!(out.len(), b"hello gossip".len() + OVERHEAD);
        assert_eq!(
            s.open(1_000_500, &mut out.clone()).unwrap(),
            b"hello gossip"
        );
    }

    #[test]
    fn every_kind_of_bad_datagram_is_dropped_with_its_reason() {
        let s = sealer(1);
        let mut out = Vec::new();
        s.seal(1_000_000, [7; 12], b"payload", &mut out);

        assert_eq!(
            s.open(1_000_000, &mut out[..10].to_vec()),
            Err(GossipDrop::Short)
        );
        let mut m = out.clone();
        m[0] = b'X';
        assert_eq!(s.open(1_000_000, &mut m), Err(GossipDrop::BadMagic));
        assert_eq!(
            s.open(1_000_000 + 60_001, &mut out.clone()),
            Err(GossipDrop::Stale)
        );
        assert_eq!(
            s.open(1_000_000 - 60_001, &mut out.clone()),
            Err(GossipDrop::Stale)
        );
        assert_eq!(
            sealer(2).open(1_000_000, &mut out.clone()),
            Err(GossipDrop::BadTag)
        );
        for i in [5, HEADER_LEN + 1, out.len() - 20, out.len() - 1] {
            let mut t = out.clone();
            t[i] ^= 0x40;
            let r = s.open(1_000_000, &mut t);
            assert!(
                r == Err(GossipDrop::BadTag) || r == Err(GossipDrop::Stale),
                "byte {i}: {r:?}"
            );
        }
    }
}
