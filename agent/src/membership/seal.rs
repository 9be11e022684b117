//! Sealing of gossip datagrams with the cluster key (sans-IO).
//!
//! Wire format, one UDP datagram:
//! `magic "OVG2" (4) | key id (8) | sent-at unix ms (8, BE) | nonce (12) |
//! ciphertext | tag (16)`
//! AES-256-GCM with AAD = magic ‖ key id ‖ sent-at. The key id names which
//! cluster key sealed it (see `keys::cluster_key`), so a rotation never
//! costs trial decryptions and a member that missed one can tell. Nonces
//! are random: memberlist does the same, and at gossip rates the 2^32-
//! message birthday bound per key is decades away. The timestamp bounds
//! replay of captured datagrams to the skew window; within it, chitchat's
//! versioned state makes a replay harmless.

use std::sync::Mutex;

use ring::aead::{Aad, Nonce};

use crate::keys::{ClusterKey, KeyId, Keyring, Lookup};
use crate::metrics::Counter;

const MAGIC: &[u8; 4] = b"OVG2";
const KEY_ID_AT: usize = 4;
const SENT_AT: usize = KEY_ID_AT + KeyId::LEN;
const HEADER_LEN: usize = SENT_AT + 8;
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
    #[error("sealed with a cluster key newer than ours ({0}): this node missed a key rotation")]
    NewerKey(KeyId),
    #[error("sealed with a cluster key this node does not hold (a retired one, or made up)")]
    UnknownKey,
    #[error("authentication failed (wrong cluster key or tampered)")]
    BadTag,
}

impl GossipDrop {
    pub fn counter(self) -> Counter {
        match self {
            Self::Short => Counter::GossipDropShort,
            Self::BadMagic => Counter::GossipDropBadMagic,
            Self::Stale => Counter::GossipDropStale,
            Self::NewerKey(_) => Counter::GossipDropNewerKey,
            Self::UnknownKey => Counter::GossipDropUnknownKey,
            Self::BadTag => Counter::GossipDropBadTag,
        }
    }
}

/// The sent-at stamp of a datagram, before opening it (it is checked by
/// [`Sealer::open`], which binds it to the ciphertext as AAD).
pub fn sent_at(datagram: &[u8]) -> Option<u64> {
    let ts: [u8; 8] = datagram.get(SENT_AT..HEADER_LEN)?.try_into().ok()?;
    Some(u64::from_be_bytes(ts))
}

/// Seals and opens gossip with the node's cluster keyring. The ring is
/// shared with the cluster module, which installs and switches keys.
pub struct Sealer {
    ring: Mutex<Keyring>,
    max_skew_ms: u64,
}

impl Sealer {
    pub fn new(primary: ClusterKey, max_skew_ms: u64) -> Self {
        Self {
            ring: Mutex::new(Keyring::new(primary)),
            max_skew_ms,
        }
    }

    /// Runs `f` on the keyring (install, switch, read the primary).
    pub fn with_ring<T>(&self, f: impl FnOnce(&mut Keyring) -> T) -> T {
        f(&mut self.ring.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Seals `plaintext` into `out` (cleared first) with the primary key.
    pub fn seal(&self, now_ms: u64, nonce: [u8; NONCE_LEN], plaintext: &[u8], out: &mut Vec<u8>) {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let key = ring.primary();
        out.clear();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&key.id().to_bytes());
        out.extend_from_slice(&now_ms.to_be_bytes());
        out.extend_from_slice(&nonce);
        let body_at = out.len();
        out.extend_from_slice(plaintext);
        let (head, body) = out.split_at_mut(body_at);
        let aad = Aad::from(&head[..HEADER_LEN]);
        let tag = key
            .gossip()
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), aad, body)
            // ring fails only past 2^36 bytes of plaintext; datagrams are < 64 KiB.
            .expect("AES-GCM seals a datagram-sized buffer");
        out.extend_from_slice(tag.as_ref());
    }

    /// Opens a datagram in place; returns the key id it was sealed under
    /// and the plaintext slice.
    pub fn open<'a>(
        &self,
        now_ms: u64,
        datagram: &'a mut [u8],
    ) -> Result<(KeyId, &'a [u8]), GossipDrop> {
        if datagram.len() < OVERHEAD {
            return Err(GossipDrop::Short);
        }
        if &datagram[..KEY_ID_AT] != MAGIC {
            return Err(GossipDrop::BadMagic);
        }
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&datagram[SENT_AT..HEADER_LEN]);
        if now_ms.abs_diff(u64::from_be_bytes(ts)) > self.max_skew_ms {
            return Err(GossipDrop::Stale);
        }
        let mut id = [0u8; KeyId::LEN];
        id.copy_from_slice(&datagram[KEY_ID_AT..SENT_AT]);
        let id = KeyId::from_bytes(id);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&datagram[HEADER_LEN..HEADER_LEN + NONCE_LEN]);
        let (head, body) = datagram.split_at_mut(HEADER_LEN + NONCE_LEN);
        let aad = Aad::from(&head[..HEADER_LEN]);
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let key = match ring.lookup(id, now_ms) {
            Lookup::Key(k) => k,
            Lookup::Newer(id) => return Err(GossipDrop::NewerKey(id)),
            Lookup::Unknown => return Err(GossipDrop::UnknownKey),
        };
        key.open_in_place(Nonce::assume_unique_for_key(nonce), aad, body)
            .map(|p| (id, &*p))
            .map_err(|_| GossipDrop::BadTag)
    }

    /// A member's datagram, sealed under `id`, was fully verified: if `id`
    /// is installed and newer than the primary, the member has switched,
    /// so we switch too. Returns the new primary if it changed.
    pub fn verified(&self, id: KeyId, now_ms: u64) -> Option<ClusterKey> {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if id <= ring.primary().id() {
            return None;
        }
        ring.switch_to(id, now_ms).cloned()
    }
}

/// Datagrams already accepted, by tag, so a captured datagram replayed
/// within the skew window (to reflect a reply at a spoofed source, or to
/// repeat stale state) is dropped. Sans-IO: the caller passes the
/// datagram's sent-at and its own clock.
pub struct ReplayCache {
    seen: std::collections::HashSet<u64>,
    order: std::collections::VecDeque<(u64, u64)>,
    horizon_ms: u64,
    cap: usize,
}

impl ReplayCache {
    /// Remembers datagrams for `horizon_ms` (older ones fail the skew
    /// check anyway), at most `cap` of them (the oldest go first).
    pub fn new(horizon_ms: u64, cap: usize) -> Self {
        Self {
            seen: std::collections::HashSet::new(),
            order: std::collections::VecDeque::new(),
            horizon_ms,
            cap: cap.max(1),
        }
    }

    /// The cache key of a sealed datagram: 8 bytes of its tag, unique per
    /// sealing (random nonce) and unforgeable without the key.
    pub fn key_of(datagram: &[u8]) -> Option<u64> {
        let t = datagram.len().checked_sub(TAG_LEN)?;
        let b: [u8; 8] = datagram.get(t..t + 8)?.try_into().ok()?;
        Some(u64::from_le_bytes(b))
    }

    /// Records a datagram that opened; false if it was already seen.
    pub fn first_time(&mut self, key: u64, sent_at: u64, now_ms: u64) -> bool {
        while let Some(&(at, k)) = self.order.front() {
            if at.saturating_add(self.horizon_ms) >= now_ms && self.order.len() < self.cap {
                break;
            }
            self.order.pop_front();
            self.seen.remove(&k);
        }
        if !self.seen.insert(key) {
            return false;
        }
        self.order.push_back((sent_at.max(now_ms), key));
        true
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ClusterId;

    fn key(epoch: u32, k: u8) -> ClusterKey {
        ClusterKey::derive(ClusterId::from_bytes([3; 16]), epoch, [k; 32])
    }

    fn sealer(k: u8) -> Sealer {
        Sealer::new(key(0, k), 60_000)
    }

    #[test]
    fn round_trip() {
        let s = sealer(1);
        let mut out = Vec::new();
        s.seal(1_000_000, [7; 12], b"hello gossip", &mut out);
        assert_eq!(out.len(), b"hello gossip".len() + OVERHEAD);
        let mut d = out.clone();
        let (id, plain) = s.open(1_000_500, &mut d).unwrap();
        assert_eq!(plain, b"hello gossip");
        assert_eq!(id, key(0, 1).id());
    }

    #[test]
    fn every_kind_of_bad_datagram_is_dropped_with_its_reason() {
        let s = sealer(1);
        let mut out = Vec::new();
        s.seal(1_000_000, [7; 12], b"payload", &mut out);
        let open =
            |s: &Sealer, now, d: &[u8]| s.open(now, &mut d.to_vec()).map(|(_, p)| p.to_vec());

        assert_eq!(open(&s, 1_000_000, &out[..10]), Err(GossipDrop::Short));
        let mut m = out.clone();
        m[0] = b'X';
        assert_eq!(open(&s, 1_000_000, &m), Err(GossipDrop::BadMagic));
        assert_eq!(open(&s, 1_000_000 + 60_001, &out), Err(GossipDrop::Stale));
        assert_eq!(open(&s, 1_000_000 - 60_001, &out), Err(GossipDrop::Stale));
        // Same epoch, another secret: a key this node does not hold.
        let other = sealer(2);
        let r = open(&other, 1_000_000, &out);
        assert!(
            matches!(
                r,
                Err(GossipDrop::NewerKey(_)) | Err(GossipDrop::UnknownKey)
            ),
            "{r:?}"
        );
        for i in [SENT_AT + 1, HEADER_LEN + 1, out.len() - 20, out.len() - 1] {
            let r = open(&s, 1_000_000, &{
                let mut t = out.clone();
                t[i] ^= 0x40;
                t
            });
            assert!(
                r == Err(GossipDrop::BadTag) || r == Err(GossipDrop::Stale),
                "byte {i}: {r:?}"
            );
        }
        // A forged key id is refused before any decryption.
        let mut t = out.clone();
        t[KEY_ID_AT] ^= 0x80;
        assert!(matches!(
            open(&s, 1_000_000, &t),
            Err(GossipDrop::NewerKey(_))
        ));
    }

    #[test]
    fn a_rotation_needs_no_lost_datagram() {
        // a installs and switches first; b, installed, still seals with
        // the old key until it opens one of a's.
        let (a, b) = (sealer(1), sealer(1));
        let next = key(1, 9);
        for s in [&a, &b] {
            s.with_ring(|r| r.install(next.clone()));
        }
        a.with_ring(|r| r.switch_to(next.id(), 0).cloned());
        let (mut from_a, mut from_b) = (Vec::new(), Vec::new());
        a.seal(1_000, [1; 12], b"new", &mut from_a);
        b.seal(1_000, [2; 12], b"old", &mut from_b);
        assert_eq!(a.open(1_000, &mut from_b).unwrap().1, b"old");
        let (id, _) = b.open(1_000, &mut from_a).unwrap();
        assert_eq!(b.verified(id, 1_000), Some(next.clone()));
        assert_eq!(b.verified(id, 1_000), None, "already switched");
        b.seal(1_000, [3; 12], b"new too", &mut from_b);
        assert_eq!(a.open(1_000, &mut from_b).unwrap().1, b"new too");
        // A node without the new key learns it missed a rotation.
        let c = sealer(1);
        a.seal(2_000, [4; 12], b"x", &mut from_a);
        assert_eq!(
            c.open(2_000, &mut from_a),
            Err(GossipDrop::NewerKey(next.id()))
        );
    }

    #[test]
    fn a_replayed_datagram_is_refused_and_the_cache_is_bounded() {
        let s = sealer(1);
        let mut out = Vec::new();
        s.seal(1_000, [1; 12], b"syn", &mut out);
        let key = ReplayCache::key_of(&out).unwrap();
        let mut c = ReplayCache::new(120_000, 4);
        assert!(c.first_time(key, 1_000, 1_000));
        assert!(!c.first_time(key, 1_000, 2_000), "replay");
        s.seal(1_000, [2; 12], b"syn", &mut out);
        assert_ne!(ReplayCache::key_of(&out), Some(key), "same text, new tag");
        for k in 0..10u64 {
            c.first_time(k + 100, 1_000, 1_000);
        }
        assert!(c.len() <= 4);
        // Past the horizon everything goes.
        c.first_time(999, 200_000, 200_000);
        assert_eq!(c.len(), 1);
        assert_eq!(ReplayCache::key_of(&[0; 3]), None);
    }

    /// Property (seeded, many cases): the cache never holds more than its
    /// cap; it refuses only datagrams it accepted before; and it always
    /// refuses a replay of one of the last `cap - 1` it accepted that is
    /// still within the horizon.
    #[test]
    fn property_the_replay_cache_is_bounded_exact_and_catches_recent_replays() {
        let mut x = 0x5eed_u64;
        let mut next = move || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        for _case in 0..200 {
            let cap = 1 + (next() % 16) as usize;
            let horizon = 1 + next() % 5_000;
            let mut c = ReplayCache::new(horizon, cap);
            let mut now = 1_000_000u64;
            let mut accepted: Vec<(u64, u64)> = Vec::new();
            for _step in 0..300 {
                now += next() % 400;
                // A replay of a recent datagram, or a fresh one (sent up to
                // a second in the future or the past).
                let replay = next() % 3 == 0 && !accepted.is_empty();
                let key = if replay {
                    let back = (next() as usize % accepted.len().min(cap + 2)) + 1;
                    accepted[accepted.len() - back].0
                } else {
                    next()
                };
                let sent_at = now + next() % 2_000 - 1_000;
                let must_refuse = accepted
                    .iter()
                    .rev()
                    .take(cap - 1)
                    .any(|&(k, at)| k == key && at + horizon >= now);
                let first = c.first_time(key, sent_at, now);
                assert!(c.len() <= cap, "over the cap");
                if !first {
                    assert!(
                        accepted.iter().any(|a| a.0 == key),
                        "refused a new datagram"
                    );
                } else {
                    accepted.push((key, sent_at.max(now)));
                }
                if must_refuse {
                    assert!(!first, "a recent replay passed");
                }
            }
        }
    }
}
