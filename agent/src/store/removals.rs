//! How long a network's removal record is kept. Every host republishes
//! every removal it learns (two-phase set: a removal beats any copy of the
//! record), so without an end each removed network would cost every host
//! a row forever, and sustained churn would push an honest member's table
//! past the per-member entry cap (`bounds::MAX_ENTRIES`). Pure: the
//! removals known, the ids some table still holds a copy of and `now` in,
//! the removals to keep out.
//!
//! A removal is kept while any table held here still has a copy of the
//! record (dropping it then would bring the network back), and otherwise
//! for `RETENTION_MS` after its earliest known time, the newest
//! `MAX_KEPT` at most. Every host keeps the same ones given the same
//! tables, since the time republished is the earliest known, not the
//! republisher's clock; a host away longer than the retention comes back
//! holding copies the others no longer refuse, so such a host is removed
//! (`ovlctl node rm`) and joined again rather than left to resurrect
//! networks.

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};

use crate::ids::NetworkId;

/// A week: far longer than a host is down and comes back by itself.
pub const RETENTION_MS: u64 = 7 * 24 * 3600 * 1000;
/// Removals kept without a copy left anywhere: a quarter of what one
/// member may hold (`bounds::MAX_ENTRIES`).
pub const MAX_KEPT: usize = 4096;

/// The removals to keep out of `removed` (network -> earliest removal
/// time known, ms), given the networks some table still holds a copy of.
pub fn retained(
    removed: &HashMap<NetworkId, u64>,
    with_copies: &HashSet<NetworkId>,
    now_ms: u64,
) -> HashSet<NetworkId> {
    let mut recent: Vec<(Reverse<u64>, NetworkId)> = removed
        .iter()
        .filter(|(id, at)| !with_copies.contains(id) && now_ms.saturating_sub(**at) < RETENTION_MS)
        .map(|(id, at)| (Reverse(*at), *id))
        .collect();
    recent.sort_unstable();
    recent.truncate(MAX_KEPT);
    removed
        .keys()
        .filter(|id| with_copies.contains(id))
        .copied()
        .chain(recent.into_iter().map(|(_, id)| id))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> NetworkId {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&n.to_be_bytes());
        NetworkId::from_bytes(b)
    }

    const NOW: u64 = 100 * RETENTION_MS;

    #[test]
    fn a_removal_goes_after_the_retention_unless_a_copy_is_left() {
        let removed: HashMap<_, _> = [
            (id(1), NOW - RETENTION_MS),
            (id(2), NOW - RETENTION_MS + 1),
            (id(3), NOW - 2 * RETENTION_MS),
        ]
        .into();
        let copies: HashSet<_> = [id(3)].into();
        let kept = retained(&removed, &copies, NOW);
        assert_eq!(kept, [id(2), id(3)].into());
    }

    #[test]
    fn at_most_max_kept_without_copies_the_newest() {
        let n = MAX_KEPT as u32 + 10;
        let removed: HashMap<_, _> = (0..n).map(|i| (id(i), NOW - u64::from(n - i))).collect();
        let kept = retained(&removed, &HashSet::new(), NOW);
        assert_eq!(kept.len(), MAX_KEPT);
        assert!((0..10).all(|i| !kept.contains(&id(i))));
        assert!(kept.contains(&id(n - 1)));
    }

    #[test]
    fn times_ahead_of_now_count_as_recent_and_copies_beat_the_cap() {
        let mut removed: HashMap<_, _> = (0..MAX_KEPT as u32).map(|i| (id(i), u64::MAX)).collect();
        removed.insert(id(u32::MAX), NOW - 1);
        let kept = retained(&removed, &[id(u32::MAX)].into(), NOW);
        assert_eq!(kept.len(), MAX_KEPT + 1);
        assert!(kept.contains(&id(u32::MAX)));
    }

    #[test]
    fn the_same_inputs_keep_the_same_removals_on_every_host() {
        let removed: HashMap<_, _> = (0..MAX_KEPT as u32 * 2).map(|i| (id(i), NOW - 5)).collect();
        let a = retained(&removed, &HashSet::new(), NOW);
        let mut pairs: Vec<_> = removed.iter().map(|(k, v)| (*k, *v)).collect();
        pairs.reverse();
        let b = retained(&pairs.into_iter().collect(), &HashSet::new(), NOW);
        assert_eq!(a, b);
    }
}
