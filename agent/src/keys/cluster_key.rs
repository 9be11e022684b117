//! The cluster key and the keyring that rotates it (sans-IO: time comes in
//! as an argument).
//!
//! Every member holds the cluster key; gossip is sealed with it. `ovlctl
//! node rm` replaces it so the removed node can no longer read gossip,
//! memberlist-keyring style: the remover *installs* the new key on every
//! live member (over the TLS peer channel), then *switches* to it; a member
//! switches as soon as it opens a datagram from a member sealed with an
//! installed newer key, so the switch spreads in one gossip round; the old
//! key keeps opening (never sealing) for [`RETIRE_AFTER_MS`], so datagrams
//! in flight are not lost. A member that missed the install (offline, cut
//! off) sees datagrams under a key it lacks and fetches the key from a
//! member over TLS.
//!
//! Keys are ordered by [`KeyId`] `(epoch, fingerprint)`, so two rotations
//! at once (two `node rm` on two hosts) settle on the same key everywhere.
//!
//! A rotated key carries its **member set**: the nodes it was handed to
//! (the remover's members at rotation time), grown only by nodes that
//! prove they hold the key (a datagram they sealed with it themselves,
//! see `membership::guard`). Gossip learns no identity outside it and the
//! key is served to no one outside it, so a removed node cannot come back
//! as a fresh identity through the old key it still holds. The cluster's
//! first key (and one handed over by an agent of an earlier version) has
//! no set: its holders are whoever the token admitted.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ring::{aead, hkdf};

use crate::ids::{ClusterId, NodeId};

/// How long a replaced key still opens datagrams.
pub const RETIRE_AFTER_MS: u64 = 30_000;

/// HKDF salt: fixed per protocol version (RFC 5869 §3.1 allows a constant).
/// Shared with the token's derivations, whose labels differ.
const HKDF_SALT: &[u8] = b"ovl join token v1";

/// Names a cluster key on the wire without revealing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId {
    pub epoch: u32,
    pub fingerprint: u32,
}

impl KeyId {
    pub const LEN: usize = 8;

    pub fn to_bytes(self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..4].copy_from_slice(&self.epoch.to_be_bytes());
        b[4..].copy_from_slice(&self.fingerprint.to_be_bytes());
        b
    }

    pub fn from_bytes(b: [u8; Self::LEN]) -> Self {
        let [e0, e1, e2, e3, f0, f1, f2, f3] = b;
        Self {
            epoch: u32::from_be_bytes([e0, e1, e2, e3]),
            fingerprint: u32::from_be_bytes([f0, f1, f2, f3]),
        }
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "epoch {} ({:08x})", self.epoch, self.fingerprint)
    }
}

/// Output length carrier for `Prk::expand` into raw bytes.
struct Len(usize);
impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn expand(prk: &hkdf::Prk, label: &[u8], cluster_id: ClusterId, epoch: u32, out: &mut [u8]) {
    let epoch = epoch.to_be_bytes();
    let info = [label, cluster_id.as_bytes().as_slice(), &epoch];
    // At most 32 bytes: far below HKDF-SHA256's limit of 255 * 32
    // (RFC 5869 §2.3).
    prk.expand(&info, Len(out.len()))
        .and_then(|okm| okm.fill(out))
        .expect("HKDF-SHA256 can expand 32 bytes");
}

/// One cluster key: the secret members share and what is derived from it.
/// `Debug` never prints the secret.
#[derive(Clone)]
pub struct ClusterKey {
    id: KeyId,
    secret: [u8; 32],
    gossip: aead::LessSafeKey,
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterKey({}, secret hidden)", self.id)
    }
}

impl PartialEq for ClusterKey {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.secret == other.secret
    }
}

impl ClusterKey {
    /// The key of `cluster_id` at `epoch` whose secret is `secret`.
    pub fn derive(cluster_id: ClusterId, epoch: u32, secret: [u8; 32]) -> Self {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(&secret);
        let mut gossip = [0u8; 32];
        expand(&prk, b"ovl gossip aead", cluster_id, epoch, &mut gossip);
        let mut fp = [0u8; 4];
        expand(&prk, b"ovl gossip key id", cluster_id, epoch, &mut fp);
        let gossip = aead::UnboundKey::new(&aead::AES_256_GCM, &gossip)
            .map(aead::LessSafeKey::new)
            .expect("AES-256-GCM takes a 32-byte key");
        Self {
            id: KeyId {
                epoch,
                fingerprint: u32::from_be_bytes(fp),
            },
            secret,
            gossip,
        }
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The shared secret: for the state file and for handing to members
    /// over the TLS peer channel only.
    pub fn secret(&self) -> [u8; 32] {
        self.secret
    }

    /// AES-256-GCM key sealing gossip datagrams.
    pub fn gossip(&self) -> &aead::LessSafeKey {
        &self.gossip
    }
}

/// What a key id names, for a datagram being opened.
pub enum Lookup<'a> {
    Key(&'a aead::LessSafeKey),
    /// A key we do not hold, newer than ours: we missed a rotation.
    Newer(KeyId),
    /// Older than ours and not kept, or a made-up id.
    Unknown,
}

/// The keys a member holds: the one it seals with, newer ones installed
/// but not yet in use, and replaced ones still opening until they retire.
#[derive(Debug, Clone)]
pub struct Keyring {
    primary: ClusterKey,
    installed: Vec<ClusterKey>,
    retiring: Vec<(ClusterKey, u64)>,
    /// The member set of each held key that has one (see the module doc).
    members: BTreeMap<KeyId, BTreeSet<NodeId>>,
}

/// Installed-but-unused keys kept at most (each `node rm` adds one).
const MAX_INSTALLED: usize = 8;
/// Members one key's set holds at most (16 bytes each on the wire: 32 KiB,
/// half the peer API's request limit).
pub const MAX_KEY_MEMBERS: usize = 2048;

/// A member set as sent on the peer channel: 16-byte node ids.
pub fn members_to_wire(members: Option<&BTreeSet<NodeId>>) -> Vec<Vec<u8>> {
    members
        .into_iter()
        .flatten()
        .map(|id| id.as_bytes().to_vec())
        .collect()
}

/// A member set from the peer channel (empty: no set); `None` if an id is
/// not 16 bytes. At most [`MAX_KEY_MEMBERS`] are read.
pub fn members_from_wire(ids: &[Vec<u8>]) -> Option<BTreeSet<NodeId>> {
    ids.iter()
        .take(MAX_KEY_MEMBERS)
        .map(|b| {
            <[u8; 16]>::try_from(b.as_slice())
                .ok()
                .map(NodeId::from_bytes)
        })
        .collect()
}

/// What a datagram sealed under a key may teach (see `membership::guard`).
#[derive(Debug, Clone, Copy)]
pub struct KeyScope<'a> {
    /// The member set of the key the datagram was sealed with (for a key
    /// older than the primary, the primary's: it is the newer statement).
    /// `None`: no set, anyone the token admitted may hold the key.
    pub members: Option<&'a BTreeSet<NodeId>>,
    /// Sealed with a key older than the newest held: a replaced key, or
    /// one about to be replaced. Its holders include the removed node, so
    /// it may only speak of identities known already.
    pub stale: bool,
}

impl Keyring {
    pub fn new(primary: ClusterKey) -> Self {
        Self {
            primary,
            installed: Vec::new(),
            retiring: Vec::new(),
            members: BTreeMap::new(),
        }
    }

    /// Gives the held key `id` its member set (bounded); empty: no set.
    pub fn set_members(&mut self, id: KeyId, members: BTreeSet<NodeId>) {
        if members.is_empty() || !self.holds(id) {
            return;
        }
        let members = members.into_iter().take(MAX_KEY_MEMBERS).collect();
        self.members.insert(id, members);
    }

    /// The member set of the held key `id`, if it has one.
    pub fn members(&self, id: KeyId) -> Option<&BTreeSet<NodeId>> {
        self.members.get(&id)
    }

    /// The member set of the key in use, if it has one.
    pub fn primary_members(&self) -> Option<&BTreeSet<NodeId>> {
        self.members.get(&self.primary.id)
    }

    /// Adds `node` to the set of key `id` (and of the primary, if `id` is
    /// newer): it proved it holds `id`. False when the set is full or `id`
    /// has no set.
    pub fn admit(&mut self, id: KeyId, node: NodeId) -> bool {
        let mut ids = vec![id];
        if id > self.primary.id {
            ids.push(self.primary.id);
        }
        let mut added = false;
        for id in ids {
            if let Some(set) = self.members.get_mut(&id)
                && set.len() < MAX_KEY_MEMBERS
            {
                added |= set.insert(node);
            }
        }
        added
    }

    /// What a datagram sealed under `id` may teach.
    pub fn scope(&self, id: KeyId) -> KeyScope<'_> {
        let newest = self
            .installed
            .iter()
            .map(|k| k.id)
            .fold(self.primary.id, KeyId::max);
        let members = if id > self.primary.id {
            self.members.get(&id)
        } else {
            self.primary_members()
        };
        KeyScope {
            members,
            stale: id < newest,
        }
    }

    fn holds(&self, id: KeyId) -> bool {
        self.primary.id == id
            || self.installed.iter().any(|k| k.id == id)
            || self.retiring.iter().any(|(k, _)| k.id == id)
    }

    /// The key datagrams are sealed with.
    pub fn primary(&self) -> &ClusterKey {
        &self.primary
    }

    /// The highest epoch held (a new rotation takes the next one).
    pub fn newest_epoch(&self) -> u32 {
        self.installed
            .iter()
            .map(|k| k.id.epoch)
            .fold(self.primary.id.epoch, u32::max)
    }

    /// Adds a newer key for opening; the primary does not change. False
    /// when it is not newer than the primary or already held.
    pub fn install(&mut self, key: ClusterKey) -> bool {
        if key.id <= self.primary.id || self.installed.iter().any(|k| k.id == key.id) {
            return false;
        }
        self.installed.push(key);
        self.installed.sort_by_key(|k| k.id);
        if self.installed.len() > MAX_INSTALLED {
            let gone = self.installed.remove(0);
            self.members.remove(&gone.id);
        }
        true
    }

    /// Makes the installed key `id` the primary if it is newer; the old
    /// primary, and installed keys older than `id`, retire at
    /// `now_ms + RETIRE_AFTER_MS`. Returns the new primary if it changed.
    pub fn switch_to(&mut self, id: KeyId, now_ms: u64) -> Option<&ClusterKey> {
        if id <= self.primary.id {
            return None;
        }
        let at = self.installed.iter().position(|k| k.id == id)?;
        let next = self.installed.remove(at);
        let retire_at = now_ms.saturating_add(RETIRE_AFTER_MS);
        let old = std::mem::replace(&mut self.primary, next);
        self.retiring.push((old, retire_at));
        let (older, newer): (Vec<_>, Vec<_>) = std::mem::take(&mut self.installed)
            .into_iter()
            .partition(|k| k.id < id);
        self.retiring
            .extend(older.into_iter().map(|k| (k, retire_at)));
        self.installed = newer;
        Some(&self.primary)
    }

    /// Installs `key` and switches to it at once (a key fetched from a
    /// member, who already uses it).
    pub fn adopt(&mut self, key: ClusterKey, now_ms: u64) -> Option<&ClusterKey> {
        let id = key.id;
        self.install(key);
        self.switch_to(id, now_ms)
    }

    /// Drops retired keys whose time is up.
    pub fn expire(&mut self, now_ms: u64) {
        self.retiring.retain(|(_, at)| *at > now_ms);
        let held: BTreeSet<KeyId> = std::iter::once(self.primary.id)
            .chain(self.installed.iter().map(|k| k.id))
            .chain(self.retiring.iter().map(|(k, _)| k.id))
            .collect();
        self.members.retain(|id, _| held.contains(id));
    }

    /// The key that opens a datagram sealed under `id`.
    pub fn lookup(&self, id: KeyId, now_ms: u64) -> Lookup<'_> {
        if id == self.primary.id {
            return Lookup::Key(&self.primary.gossip);
        }
        if let Some(k) = self.installed.iter().find(|k| k.id == id) {
            return Lookup::Key(&k.gossip);
        }
        if let Some((k, _)) = self
            .retiring
            .iter()
            .find(|(k, at)| k.id == id && *at > now_ms)
        {
            return Lookup::Key(&k.gossip);
        }
        if id > self.primary.id {
            Lookup::Newer(id)
        } else {
            Lookup::Unknown
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(epoch: u32, s: u8) -> ClusterKey {
        ClusterKey::derive(ClusterId::from_bytes([1; 16]), epoch, [s; 32])
    }

    fn opens(ring: &Keyring, k: &ClusterKey, now: u64) -> bool {
        matches!(ring.lookup(k.id(), now), Lookup::Key(_))
    }

    #[test]
    fn ids_depend_on_secret_cluster_and_epoch_and_hide_the_secret() {
        let a = key(0, 1);
        assert_eq!(a.id(), key(0, 1).id());
        assert_ne!(a.id(), key(0, 2).id());
        assert_ne!(a.id(), key(1, 1).id());
        assert_ne!(
            a.id(),
            ClusterKey::derive(ClusterId::from_bytes([2; 16]), 0, [1; 32]).id()
        );
        assert_eq!(KeyId::from_bytes(a.id().to_bytes()), a.id());
        assert!(!format!("{a:?}").contains("1, 1"));
    }

    #[test]
    fn install_then_switch_then_retire() {
        let (k0, k1) = (key(0, 1), key(1, 2));
        let mut ring = Keyring::new(k0.clone());
        assert!(matches!(ring.lookup(k1.id(), 0), Lookup::Newer(id) if id == k1.id()));
        assert!(ring.install(k1.clone()));
        assert!(!ring.install(k1.clone()), "installed twice");
        assert!(!ring.install(k0.clone()), "older than the primary");
        assert_eq!(ring.primary(), &k0, "install does not switch");
        assert!(opens(&ring, &k1, 0));

        assert_eq!(ring.switch_to(k1.id(), 1_000), Some(&k1));
        assert_eq!(ring.switch_to(k1.id(), 1_000), None, "already primary");
        assert!(opens(&ring, &k0, 1_000 + RETIRE_AFTER_MS - 1));
        assert!(!opens(&ring, &k0, 1_000 + RETIRE_AFTER_MS));
        ring.expire(1_000 + RETIRE_AFTER_MS);
        assert!(matches!(ring.lookup(k0.id(), 0), Lookup::Unknown));
    }

    #[test]
    fn a_key_not_installed_is_never_switched_to() {
        let mut ring = Keyring::new(key(0, 1));
        assert_eq!(ring.switch_to(key(1, 2).id(), 0), None);
        assert_eq!(ring.primary(), &key(0, 1));
    }

    #[test]
    fn concurrent_rotations_settle_on_the_larger_id_in_any_order() {
        let (a, b) = (key(1, 2), key(1, 3));
        let newest = a.id().max(b.id());
        let mut x = Keyring::new(key(0, 1));
        let mut y = Keyring::new(key(0, 1));
        for (ring, first, second) in [(&mut x, &a, &b), (&mut y, &b, &a)] {
            ring.install(first.clone());
            ring.switch_to(first.id(), 0);
            ring.install(second.clone());
            ring.switch_to(second.id(), 0);
            // The winner opens everywhere; a node still on the loser
            // fetches the winner when it sees it (`Lookup::Newer`).
            assert!(matches!(ring.lookup(newest, 1), Lookup::Key(_)));
        }
        assert_eq!(x.primary().id(), newest);
        assert_eq!(y.primary().id(), newest);
    }

    #[test]
    fn switching_past_installed_keys_retires_the_older_ones() {
        let mut ring = Keyring::new(key(0, 1));
        let (k1, k2) = (key(1, 2), key(2, 3));
        ring.install(k1.clone());
        ring.install(k2.clone());
        ring.switch_to(k2.id(), 0);
        assert_eq!(ring.primary(), &k2);
        assert!(opens(&ring, &k1, RETIRE_AFTER_MS - 1));
        assert!(!opens(&ring, &k1, RETIRE_AFTER_MS));
        assert_eq!(
            ring.adopt(key(3, 4), 5).map(ClusterKey::id),
            Some(key(3, 4).id())
        );
    }

    fn ids(n: u8) -> BTreeSet<NodeId> {
        (1..=n).map(|i| NodeId::from_bytes([i; 16])).collect()
    }

    #[test]
    fn member_sets_follow_their_keys_and_only_a_holder_of_the_newest_is_admitted() {
        let (k0, k1) = (key(0, 1), key(1, 2));
        let mut ring = Keyring::new(k0.clone());
        let stranger = NodeId::from_bytes([9; 16]);
        // The first key has no set: nothing is stale, anyone may be learned.
        let s = ring.scope(k0.id());
        assert!(s.members.is_none() && !s.stale);
        assert!(!ring.admit(k0.id(), stranger), "no set to grow");

        ring.install(k1.clone());
        ring.set_members(k1.id(), ids(3));
        // A rotation is under way: the old key is stale already.
        assert!(ring.scope(k0.id()).stale);
        let s = ring.scope(k1.id());
        assert_eq!(s.members, Some(&ids(3)));
        assert!(!s.stale);

        ring.switch_to(k1.id(), 0);
        let s = ring.scope(k0.id());
        assert!(s.stale, "the retiring key");
        assert_eq!(s.members, Some(&ids(3)), "judged by the newer set");
        assert_eq!(ring.primary_members(), Some(&ids(3)));
        assert!(ring.admit(k1.id(), stranger), "proved it holds k1");
        assert!(
            ring.primary_members()
                .is_some_and(|m| m.contains(&stranger))
        );

        // A set never outlives its key.
        ring.adopt(key(2, 3), 1);
        ring.expire(1 + RETIRE_AFTER_MS);
        assert!(ring.members(k1.id()).is_none());
        assert!(ring.primary_members().is_none(), "k2 came without a set");
    }

    #[test]
    fn member_sets_are_bounded() {
        let mut ring = Keyring::new(key(0, 1));
        let many: BTreeSet<NodeId> = (0..MAX_KEY_MEMBERS as u32 + 10)
            .map(|i| {
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&i.to_be_bytes());
                NodeId::from_bytes(b)
            })
            .collect();
        ring.set_members(key(0, 1).id(), many);
        assert_eq!(
            ring.primary_members().map(BTreeSet::len),
            Some(MAX_KEY_MEMBERS)
        );
        assert!(!ring.admit(key(0, 1).id(), NodeId::from_bytes([0xff; 16])));
    }

    #[test]
    fn installed_keys_are_bounded() {
        let mut ring = Keyring::new(key(0, 1));
        for e in 1..=20 {
            ring.install(key(e, e as u8));
        }
        assert!(ring.installed.len() <= MAX_INSTALLED);
        assert!(opens(&ring, &key(20, 20), 0), "the newest is kept");
    }
}
