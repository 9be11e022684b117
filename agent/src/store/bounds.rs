//! Bounds on what one member can make this agent hold (issue 8): caps on
//! the records a member's table may publish, on their strings, labels and
//! aliases, checked where a pulled delta is accepted. Pure: a delta and the
//! replica it lands on in, accepted entries and refusals out.
//!
//! An entry over a per-record bound is refused; a new key past a member's
//! record caps is refused. Updates of keys already held and deletions of
//! them always pass, so a member at its cap can still change and withdraw
//! what it holds.

use ovl_proto::records::{TableEntry, table_entry::Value};
use prost::Message;

use super::Table;
use super::key;

/// Entries (tombstones included) one member's table may have in our replica.
pub const MAX_ENTRIES: usize = 16_384;
/// Endpoint records one member may publish: its own containers.
pub const MAX_ENDPOINTS: usize = 4096;
/// Network records one member may publish (every host republishes every
/// network, so this is a cluster-wide bound).
pub const MAX_NETWORKS: usize = 4096;
/// Encoded size of one entry; an IPAM ring of a fragmented pool is the
/// largest honest record.
pub const MAX_ENTRY_BYTES: usize = 256 * 1024;
/// Any string field (names are at most 63, keys a few dozen).
pub const MAX_STRING: usize = 255;
/// Aliases one endpoint may have.
pub const MAX_ALIASES: usize = 32;
/// Labels on one network, and the length of a label key and of its value.
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_KEY: usize = 128;
pub const MAX_LABEL_VALUE: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BoundError {
    #[error("entry {key:.80?} is {len} bytes encoded, at most {MAX_ENTRY_BYTES}")]
    EntryTooLarge { key: String, len: usize },
    #[error("entry {key:.80?}: {field} is {len} bytes, at most {max}")]
    TooLong {
        key: String,
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("entry {key:.80?}: {count} {what}, at most {max}")]
    TooMany {
        key: String,
        what: &'static str,
        count: usize,
        max: usize,
    },
    #[error("entry {key:.80?}: the member already holds {max} {what} here")]
    CapReached {
        key: String,
        what: &'static str,
        max: usize,
    },
}

/// Per-record bounds of one entry.
pub fn check_entry(e: &TableEntry) -> Result<(), BoundError> {
    let key = || e.key.chars().take(80).collect::<String>();
    let long = |field, s: &str, max| {
        (s.len() > max).then(|| BoundError::TooLong {
            key: key(),
            field,
            len: s.len(),
            max,
        })
    };
    if let Some(err) = long("key", &e.key, MAX_STRING) {
        return Err(err);
    }
    let len = e.encoded_len();
    if len > MAX_ENTRY_BYTES {
        return Err(BoundError::EntryTooLarge { key: key(), len });
    }
    let many = |what, count, max| {
        (count > max).then(|| BoundError::TooMany {
            key: key(),
            what,
            count,
            max,
        })
    };
    let err = match &e.value {
        Some(Value::Endpoint(r)) => [
            ("name", r.name.as_str()),
            ("ip", &r.ip),
            ("mac", &r.mac),
            ("vtep", &r.vtep),
            ("ifname", &r.ifname),
            ("netns", &r.netns),
        ]
        .into_iter()
        .chain(r.aliases.iter().map(|a| ("alias", a.as_str())))
        .find_map(|(f, s)| long(f, s, MAX_STRING))
        .or_else(|| many("aliases", r.aliases.len(), MAX_ALIASES)),
        Some(Value::Network(r)) => [
            ("name", r.name.as_str()),
            ("subnet", &r.subnet),
            ("gateway", &r.gateway),
            ("ip_range", &r.ip_range),
        ]
        .into_iter()
        .find_map(|(f, s)| long(f, s, MAX_STRING))
        .or_else(|| many("labels", r.labels.len(), MAX_LABELS))
        .or_else(|| {
            r.labels.iter().find_map(|(k, v)| {
                long("label key", k, MAX_LABEL_KEY)
                    .or_else(|| long("label value", v, MAX_LABEL_VALUE))
            })
        }),
        _ => None,
    };
    err.map_or(Ok(()), Err)
}

/// Which cap a key counts against.
fn kind_of(k: &str) -> Option<(&'static str, usize)> {
    if k.starts_with(key::ENDPOINT) {
        Some(("endpoint records", MAX_ENDPOINTS))
    } else if k.starts_with(key::NETWORK) {
        Some(("network records", MAX_NETWORKS))
    } else {
        None
    }
}

#[derive(Default)]
struct Counts {
    entries: usize,
    endpoints: usize,
    networks: usize,
}

impl Counts {
    fn of(t: &Table) -> Self {
        let mut c = Self::default();
        for (k, deleted) in t.keys() {
            c.entries += 1;
            if !deleted {
                c.shift(k, true);
            }
        }
        c
    }

    /// The live count `k` counts against, if any.
    fn live_mut(&mut self, k: &str) -> Option<&mut usize> {
        if k.starts_with(key::ENDPOINT) {
            Some(&mut self.endpoints)
        } else if k.starts_with(key::NETWORK) {
            Some(&mut self.networks)
        } else {
            None
        }
    }

    fn shift(&mut self, k: &str, up: bool) {
        if let Some(n) = self.live_mut(k) {
            *n = if up { *n + 1 } else { n.saturating_sub(1) };
        }
    }
}

/// Splits a pulled delta into what may be applied to `replica` and what
/// is refused. `full`: the delta replaces the replica (counts start at 0).
pub fn screen(
    replica: &Table,
    full: bool,
    entries: Vec<TableEntry>,
) -> (Vec<TableEntry>, Vec<BoundError>) {
    let mut counts = if full {
        Counts::default()
    } else {
        Counts::of(replica)
    };
    // Keys this delta already set: whether each is live now.
    let mut state: std::collections::HashMap<String, bool> = std::collections::HashMap::new();
    let (mut keep, mut refused) = (Vec::with_capacity(entries.len()), Vec::new());
    for e in entries {
        if let Err(err) = check_entry(&e) {
            refused.push(err);
            continue;
        }
        let held = match state.get(&e.key) {
            Some(&live) => Some(live),
            None if full => None,
            None => replica.holds(&e.key).then(|| replica.get(&e.key).is_some()),
        };
        let cap = |what, max| BoundError::CapReached {
            key: e.key.chars().take(80).collect(),
            what,
            max,
        };
        if held.is_none() && counts.entries >= MAX_ENTRIES {
            refused.push(cap("entries", MAX_ENTRIES));
            continue;
        }
        let was_live = held == Some(true);
        // A key turning live (new, or a tombstone brought back) grows
        // the member's live records; an update or a delete does not.
        if !e.deleted
            && !was_live
            && let Some((what, max)) = kind_of(&e.key)
            && counts.live_mut(&e.key).is_some_and(|n| *n >= max)
        {
            refused.push(cap(what, max));
            continue;
        }
        if held.is_none() {
            counts.entries += 1;
        }
        if e.deleted == was_live {
            counts.shift(&e.key, !e.deleted);
        }
        state.insert(e.key.clone(), !e.deleted);
        keep.push(e);
    }
    (keep, refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ovl_proto::records::{EndpointRecord, NetworkRecord};

    fn ep(i: usize, name: &str) -> TableEntry {
        TableEntry {
            key: format!("{}{i:032x}", key::ENDPOINT),
            version: i as u64 + 1,
            deleted: false,
            value: Some(Value::Endpoint(EndpointRecord {
                name: name.into(),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn a_member_past_its_endpoint_cap_is_capped_and_keeps_what_it_holds() {
        let entries: Vec<_> = (0..MAX_ENDPOINTS + 10).map(|i| ep(i, "a")).collect();
        let (keep, refused) = screen(&Table::default(), true, entries);
        assert_eq!(keep.len(), MAX_ENDPOINTS);
        assert_eq!(refused.len(), 10);
        assert!(
            refused[0]
                .to_string()
                .ends_with("the member already holds 4096 endpoint records here"),
            "{}",
            refused[0]
        );
        let mut t = Table::default();
        t.apply(0, keep.len() as u64, true, keep).unwrap();
        // At the cap: a new record is refused, an update and a delete of a
        // held one pass.
        let v = t.version();
        let new = TableEntry {
            version: v + 1,
            ..ep(MAX_ENDPOINTS + 20, "b")
        };
        let update = TableEntry {
            version: v + 1,
            ..ep(3, "renamed")
        };
        let delete = TableEntry {
            version: v + 1,
            deleted: true,
            value: None,
            ..ep(4, "")
        };
        let (keep, refused) = screen(&t, false, vec![new, update, delete]);
        assert_eq!(keep.len(), 2);
        assert_eq!(refused.len(), 1);
    }

    #[test]
    fn a_megabyte_name_too_many_aliases_and_labels_are_refused_with_what_was_wrong() {
        let big = "x".repeat(1 << 20);
        let e = check_entry(&ep(1, &big)).unwrap_err();
        assert_eq!(
            e,
            BoundError::EntryTooLarge {
                key: format!("{}{:032x}", key::ENDPOINT, 1),
                len: ep(1, &big).encoded_len()
            }
        );
        let e = check_entry(&ep(1, &"x".repeat(300))).unwrap_err();
        assert!(
            e.to_string().contains("name is 300 bytes, at most 255"),
            "{e}"
        );
        let mut many = ep(1, "a");
        if let Some(Value::Endpoint(r)) = &mut many.value {
            r.aliases = vec!["a".into(); MAX_ALIASES + 1];
        }
        assert!(
            check_entry(&many)
                .unwrap_err()
                .to_string()
                .contains("33 aliases, at most 32")
        );
        let net = TableEntry {
            key: "net/x".into(),
            version: 1,
            deleted: false,
            value: Some(Value::Network(NetworkRecord {
                labels: (0..=MAX_LABELS)
                    .map(|i| (i.to_string(), String::new()))
                    .collect(),
                ..Default::default()
            })),
        };
        assert!(
            check_entry(&net)
                .unwrap_err()
                .to_string()
                .contains("65 labels, at most 64")
        );
        assert!(check_entry(&ep(1, "ok")).is_ok());
    }

    /// Property (seeded, many cases): whatever a member sends, in however
    /// many deltas, its replica never holds more than the caps, and every
    /// entry is either applied or refused with a reason.
    #[test]
    fn property_no_sequence_of_deltas_grows_a_replica_past_the_caps() {
        let mut next = splitmix(0xb0_u64);
        for _case in 0..12 {
            let mut t = Table::default();
            for _batch in 0..(1 + next() % 4) {
                let v = t.version();
                let n = (next() % 6000) as usize;
                let entries: Vec<_> = (0..n)
                    .map(|j| {
                        let deleted = next().is_multiple_of(3);
                        TableEntry {
                            version: v + 1 + j as u64,
                            deleted,
                            value: (!deleted).then(|| Value::Endpoint(EndpointRecord::default())),
                            ..ep((next() % 9000) as usize, "")
                        }
                    })
                    .collect();
                let (keep, refused) = screen(&t, false, entries);
                assert_eq!(keep.len() + refused.len(), n);
                t.apply(v, v + n as u64, false, keep).unwrap();
                assert!(t.live(key::ENDPOINT).count() <= MAX_ENDPOINTS);
                assert!(t.keys().count() <= MAX_ENTRIES);
            }
        }
    }

    /// A seeded splitmix64 stream (as in `ipam::tests`).
    pub(crate) fn splitmix(seed: u64) -> impl FnMut() -> u64 {
        let mut x = seed;
        move || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
    }
}
