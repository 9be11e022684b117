//! When each data key exists (sans-IO): this node's key-exchange secrets
//! per epoch, and the pair keys it derives with each peer.
//!
//! DESIGN.md "Trust and keys": a node publishes the X25519 public key of
//! the current and the next epoch (and of the previous one while it still
//! holds it) in its signed record, so every receiver has derived a pair's
//! keys for an epoch a full period before any sender uses them (Swarm's
//! receive-before-send invariant). Senders switch at the boundary;
//! receivers keep the previous, current and next epoch.
//!
//! Nonces never repeat, across restarts too: the secrets live in memory only,
//! so a restarted node publishes new public keys, and every pair key
//! derived from them (salt and AES key) is new; a peer that sees a new public
//! key for an epoch replaces that epoch's keys. A key seals at most 2^32
//! packets: the codec moves to the next generation key (`pair.rs`).

use std::collections::{BTreeMap, BTreeSet};

use crate::ids::{ClusterId, NodeId};
use crate::keys::pair::{EpochSecret, PairError, PairKeys, epoch_at, epoch_start_ms};

/// An X25519 public key as published for one epoch.
pub type Published = (u64, [u8; 32]);

/// Epochs a record carries at most: previous, current, next.
pub const MAX_PUBLISHED: usize = 3;

/// This node's key-exchange secrets.
#[derive(Debug)]
pub struct Schedule {
    period_ms: u64,
    secrets: BTreeMap<u64, EpochSecret>,
}

impl Schedule {
    pub fn new(period_ms: u64) -> Self {
        Self {
            period_ms: period_ms.max(1),
            secrets: BTreeMap::new(),
        }
    }

    pub fn period_ms(&self) -> u64 {
        self.period_ms
    }

    pub fn epoch_at(&self, now_ms: u64) -> u64 {
        epoch_at(now_ms, self.period_ms)
    }

    /// When the epoch after the one at `now_ms` begins.
    pub fn next_boundary_ms(&self, now_ms: u64) -> u64 {
        epoch_start_ms(self.epoch_at(now_ms).saturating_add(1), self.period_ms)
    }

    /// Holds secrets for the current and next epoch at `now_ms` (new ones
    /// from `random`), keeps the previous one if held, forgets older ones.
    /// Returns whether what we publish changed.
    pub fn advance(&mut self, now_ms: u64, mut random: impl FnMut() -> [u8; 32]) -> bool {
        let cur = self.epoch_at(now_ms);
        let before: Vec<u64> = self.secrets.keys().copied().collect();
        self.secrets
            .retain(|&e, _| e.saturating_add(1) >= cur && e <= cur.saturating_add(1));
        for e in [cur, cur.saturating_add(1)] {
            self.secrets
                .entry(e)
                .or_insert_with(|| EpochSecret::from_random(e, random()));
        }
        !self.secrets.keys().copied().eq(before)
    }

    /// What goes in the signed node record, oldest first.
    pub fn published(&self) -> Vec<Published> {
        self.secrets
            .values()
            .map(|s| (s.epoch, s.public()))
            .collect()
    }

    pub fn secret(&self, epoch: u64) -> Option<&EpochSecret> {
        self.secrets.get(&epoch)
    }
}

/// What the data plane must do with one peer's keys.
#[derive(Debug)]
pub enum KeyAction {
    /// Derive-once keys for (peer, epoch): install both directions,
    /// replacing any earlier ones of that epoch.
    Install { peer: NodeId, keys: PairKeys },
    /// Seal towards `peer` with the keys of `epoch` from now on.
    Use { peer: NodeId, epoch: u64 },
    /// Forget `peer`'s keys of epochs below `below`.
    Retire { peer: NodeId, below: u64 },
    /// `peer` published a key no pair can be derived from (a low-order
    /// point); nothing was installed. Counted and logged by the caller.
    Refused {
        peer: NodeId,
        epoch: u64,
        error: PairError,
    },
}

/// Which publics a pair's installed keys came from: ours and theirs.
type Basis = ([u8; 32], [u8; 32]);

/// The pair keys this node holds with its peers, and which epoch each
/// sends with.
///
/// Keys are installed at most once per basis (our public, theirs) and
/// epoch, for the life of the process: installing them again would start a
/// second sender at sequence 0 under the same key, reusing nonces. So a
/// peer that drops out of the input (left a network, looks dead) keeps its
/// keys until their epochs pass, and a basis seen before is never
/// installed again.
#[derive(Debug)]
pub struct Pairs {
    cluster: ClusterId,
    me: NodeId,
    installed: BTreeMap<(NodeId, u64), Basis>,
    spent: BTreeSet<(NodeId, u64, Basis)>,
    refused: BTreeSet<(NodeId, u64, [u8; 32])>,
    in_use: BTreeMap<NodeId, u64>,
}

impl Pairs {
    pub fn new(cluster: ClusterId, me: NodeId) -> Self {
        Self {
            cluster,
            me,
            installed: BTreeMap::new(),
            spent: BTreeSet::new(),
            refused: BTreeSet::new(),
            in_use: BTreeMap::new(),
        }
    }

    /// The epoch we seal towards `peer` with, if any.
    pub fn in_use(&self, peer: NodeId) -> Option<u64> {
        self.in_use.get(&peer).copied()
    }

    /// Brings the pair keys to what `schedule` and the peers' published
    /// keys (from their own signed records only) call for at `now_ms`.
    /// Idempotent: a second call with the same inputs returns nothing.
    pub fn plan(
        &mut self,
        schedule: &Schedule,
        peers: &BTreeMap<NodeId, Vec<Published>>,
        now_ms: u64,
    ) -> Vec<KeyAction> {
        let cur = schedule.epoch_at(now_ms);
        let oldest = cur.saturating_sub(1);
        let mut out = Vec::new();
        for (&peer, published) in peers {
            if peer != self.me {
                self.install(
                    schedule,
                    peer,
                    published,
                    oldest..=cur.saturating_add(1),
                    &mut out,
                );
            }
        }
        let held: BTreeSet<NodeId> = self.installed.keys().map(|&(p, _)| p).collect();
        for peer in held {
            self.retire(peer, oldest, &mut out);
            self.choose(peer, cur, &mut out);
        }
        out
    }

    fn install(
        &mut self,
        schedule: &Schedule,
        peer: NodeId,
        published: &[Published],
        window: std::ops::RangeInclusive<u64>,
        out: &mut Vec<KeyAction>,
    ) {
        for &(epoch, theirs) in published.iter().filter(|(e, _)| window.contains(e)) {
            let Some(secret) = schedule.secret(epoch) else {
                continue;
            };
            let basis = (secret.public(), theirs);
            if self.spent.contains(&(peer, epoch, basis))
                || self.refused.contains(&(peer, epoch, theirs))
            {
                continue;
            }
            match secret.pair(self.cluster, self.me, peer, theirs) {
                Ok(keys) => {
                    self.installed.insert((peer, epoch), basis);
                    self.spent.insert((peer, epoch, basis));
                    out.push(KeyAction::Install { peer, keys });
                }
                Err(error) => {
                    self.refused.insert((peer, epoch, theirs));
                    out.push(KeyAction::Refused { peer, epoch, error });
                }
            }
        }
    }

    fn retire(&mut self, peer: NodeId, oldest: u64, out: &mut Vec<KeyAction>) {
        let before = self.installed.len();
        self.installed.retain(|&(p, e), _| p != peer || e >= oldest);
        self.refused.retain(|&(p, e, _)| p != peer || e >= oldest);
        self.spent.retain(|&(p, e, _)| p != peer || e >= oldest);
        if self.installed.len() != before {
            out.push(KeyAction::Retire {
                peer,
                below: oldest,
            });
        }
    }

    /// The current epoch when its keys are here; otherwise the installed
    /// epoch nearest to it (a peer whose clock or record lags), which its
    /// receiver accepts (previous, current and next).
    fn choose(&mut self, peer: NodeId, cur: u64, out: &mut Vec<KeyAction>) {
        let best = self
            .installed
            .keys()
            .filter(|(p, _)| *p == peer)
            .map(|&(_, e)| e)
            .min_by_key(|&e| (e.abs_diff(cur), std::cmp::Reverse(e)));
        match best {
            Some(epoch) if self.in_use.get(&peer) != Some(&epoch) => {
                self.in_use.insert(peer, epoch);
                out.push(KeyAction::Use { peer, epoch });
            }
            Some(_) => {}
            None => {
                self.in_use.remove(&peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: ClusterId = ClusterId::from_bytes([7; 16]);
    const P: u64 = 5_000;

    fn node(b: u8) -> NodeId {
        NodeId::from_bytes([b; 16])
    }

    fn counter() -> impl FnMut() -> [u8; 32] {
        let mut n = 0u8;
        move || {
            n = n.wrapping_add(1);
            [n; 32]
        }
    }

    fn fresh(seed: u8) -> impl FnMut() -> [u8; 32] {
        let mut n = 0u8;
        move || {
            n = n.wrapping_add(1);
            let mut r = [seed; 32];
            r[0] = n;
            r
        }
    }

    /// Two nodes' schedules and pair tables, advanced to `now`.
    struct Two {
        a: (Schedule, Pairs),
        b: (Schedule, Pairs),
    }

    impl Two {
        fn new() -> Self {
            Self {
                a: (Schedule::new(P), Pairs::new(CLUSTER, node(1))),
                b: (Schedule::new(P), Pairs::new(CLUSTER, node(2))),
            }
        }

        fn step(&mut self, now: u64) -> (Vec<KeyAction>, Vec<KeyAction>) {
            self.a.0.advance(now, fresh(1));
            self.b.0.advance(now, fresh(2));
            let pa = BTreeMap::from([(node(2), self.b.0.published())]);
            let pb = BTreeMap::from([(node(1), self.a.0.published())]);
            (
                self.a.1.plan(&self.a.0, &pa, now),
                self.b.1.plan(&self.b.0, &pb, now),
            )
        }
    }

    fn installs(actions: &[KeyAction]) -> Vec<(u64, u32, u32)> {
        actions
            .iter()
            .filter_map(|a| match a {
                KeyAction::Install { keys, .. } => {
                    Some((keys.send.epoch, keys.send.spi, keys.recv.spi))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_schedule_holds_current_and_next_and_keeps_the_previous() {
        let mut s = Schedule::new(P);
        assert!(s.advance(12_000, counter()));
        assert_eq!(
            s.published().iter().map(|p| p.0).collect::<Vec<_>>(),
            [2, 3]
        );
        assert!(!s.advance(14_999, counter()), "same epoch: nothing changes");
        assert!(s.advance(15_000, counter()));
        assert_eq!(
            s.published().iter().map(|p| p.0).collect::<Vec<_>>(),
            [2, 3, 4]
        );
        assert!(s.advance(20_000, counter()));
        assert_eq!(
            s.published().iter().map(|p| p.0).collect::<Vec<_>>(),
            [3, 4, 5]
        );
        assert_eq!(s.next_boundary_ms(20_000), 25_000);
        // A long sleep: nothing older than the previous epoch survives.
        s.advance(100_000, counter());
        assert_eq!(
            s.published().iter().map(|p| p.0).collect::<Vec<_>>(),
            [20, 21]
        );
    }

    #[test]
    fn both_ends_install_matching_keys_and_send_with_the_current_epoch() {
        let mut two = Two::new();
        let (a, b) = two.step(12_000);
        let (ia, ib) = (installs(&a), installs(&b));
        assert_eq!(ia.iter().map(|i| i.0).collect::<Vec<_>>(), [2, 3]);
        // a's send SPI is b's receive SPI, per epoch.
        for (x, y) in ia.iter().zip(&ib) {
            assert_eq!((x.0, x.1, x.2), (y.0, y.2, y.1));
        }
        assert_eq!(two.a.1.in_use(node(2)), Some(2));
        assert_eq!(two.b.1.in_use(node(1)), Some(2));
        let (a, b) = two.step(13_000);
        assert!(a.is_empty() && b.is_empty(), "idempotent: {a:?} {b:?}");
    }

    #[test]
    fn the_next_epochs_keys_are_installed_a_period_before_use() {
        let mut two = Two::new();
        two.step(10_000);
        // Epoch 3 starts at 15 000: both already hold its keys since 10 000.
        let (a, _) = two.step(15_000);
        let used: Vec<u64> = a
            .iter()
            .filter_map(|x| match x {
                KeyAction::Use { epoch, .. } => Some(*epoch),
                _ => None,
            })
            .collect();
        assert_eq!(used, [3]);
        // Epoch 4's keys arrive now, epoch 2 stays for late packets.
        assert_eq!(installs(&a).iter().map(|i| i.0).collect::<Vec<_>>(), [4]);
        assert!(!a.iter().any(|x| matches!(x, KeyAction::Retire { .. })));
        let (a, _) = two.step(20_000);
        assert!(
            a.iter()
                .any(|x| matches!(x, KeyAction::Retire { below: 3, .. }))
        );
    }

    #[test]
    fn a_restarted_peer_gets_new_keys_for_the_same_epoch() {
        let mut two = Two::new();
        let (a0, _) = two.step(12_000);
        // b restarts: its secrets are gone, new ones come from new randomness.
        two.b = (Schedule::new(P), Pairs::new(CLUSTER, node(2)));
        two.b.0.advance(12_500, fresh(9));
        let pa = BTreeMap::from([(node(2), two.b.0.published())]);
        let a1 = two.a.1.plan(&two.a.0, &pa, 12_500);
        let (old, new) = (installs(&a0), installs(&a1));
        assert_eq!(new.len(), 2, "both epochs re-derived: {a1:?}");
        for (o, n) in old.iter().zip(&new) {
            assert_eq!(o.0, n.0);
            assert_ne!((o.1, o.2), (n.1, n.2), "new keys, new SPIs");
        }
    }

    #[test]
    fn keys_are_never_installed_twice_and_a_bad_key_is_refused_once() {
        let mut two = Two::new();
        let (first, _) = two.step(12_000);
        let b_old = two.b.0.published();
        // b drops out (left the network, looks dead): its keys stay until
        // their epochs pass, so coming back installs nothing.
        let none = BTreeMap::new();
        assert!(two.a.1.plan(&two.a.0, &none, 12_000).is_empty());
        assert_eq!(two.a.1.in_use(node(2)), Some(2));
        let back = BTreeMap::from([(node(2), b_old.clone())]);
        assert!(two.a.1.plan(&two.a.0, &back, 12_000).is_empty());
        // b flips to new keys and back to the old ones (an old record seen
        // late): the old basis is spent, never installed again.
        let newer: Vec<Published> = b_old.iter().map(|&(e, _)| (e, [0x42; 32])).collect();
        let out = two
            .a
            .1
            .plan(&two.a.0, &BTreeMap::from([(node(2), newer)]), 12_000);
        assert_eq!(installs(&out).len(), 2);
        assert!(two.a.1.plan(&two.a.0, &back, 12_000).is_empty());
        assert_eq!(installs(&first).len(), 2);
        // After the epochs pass, the old peer's keys are retired.
        let out = two.a.1.plan(&two.a.0, &none, 25_000);
        assert!(
            out.iter()
                .any(|x| matches!(x, KeyAction::Retire { below: 4, .. }))
        );
        assert_eq!(two.a.1.in_use(node(2)), None);

        let bad = BTreeMap::from([(node(3), vec![(2, [0u8; 32])])]);
        let out = two.a.1.plan(&two.a.0, &bad, 12_000);
        assert!(matches!(
            out.as_slice(),
            [KeyAction::Refused { epoch: 2, .. }]
        ));
        assert!(two.a.1.plan(&two.a.0, &bad, 12_000).is_empty());
    }

    #[test]
    fn a_lagging_peer_is_sent_the_nearest_epoch_it_published() {
        let mut two = Two::new();
        two.step(12_000);
        // a's clock is past the boundary of 4 while b still publishes 2, 3.
        two.a.0.advance(20_001, fresh(1));
        let pa = BTreeMap::from([(node(2), two.b.0.published())]);
        two.a.1.plan(&two.a.0, &pa, 20_001);
        assert_eq!(two.a.1.in_use(node(2)), Some(3));
    }
}
