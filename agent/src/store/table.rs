//! A node's table: its single-writer log of keyed entries, each stamped with
//! the table version at its last change. Deletions stay as tombstones, so a
//! delta since any version is exact: entries with a higher version.
//! Replicas apply deltas from the owner and never write on their own.

use std::collections::BTreeMap;

use ovl_proto::records::{TableEntry, TableSnapshot, table_entry::Value};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    version: u64,
    /// Tombstones at or below this version were collected: a delta from
    /// below it would miss deletions, so such a replica gets the whole
    /// table instead.
    compacted: u64,
    entries: BTreeMap<String, TableEntry>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApplyError {
    #[error("delta from version {since} does not follow local version {local}")]
    Gap { since: u64, local: u64 },
    #[error("entry {key:?} has version {entry} above the table's {table}")]
    EntryAhead { key: String, entry: u64, table: u64 },
    #[error("table version went back from {local} to {remote}")]
    Regressed { local: u64, remote: u64 },
}

impl Table {
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn compacted(&self) -> u64 {
        self.compacted
    }

    /// Rows held, tombstones included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn tombstones(&self) -> usize {
        self.entries.values().filter(|e| e.deleted).count()
    }

    /// Whether a replica at `since` must get the whole table: it has
    /// nothing, claims a future, or is behind collected tombstones.
    pub fn needs_full(&self, since: u64) -> bool {
        since == 0 || since > self.version || since < self.compacted
    }

    /// The collection floor for the tombstones: what every live peer
    /// pulled (`pulled`), raised so that at most `max` tombstones stay
    /// whatever the peers do (a peer behind it then pulls the whole table,
    /// which is exact, only bigger).
    pub fn gc_floor(&self, pulled: u64, max: usize) -> u64 {
        let floor = pulled.min(self.version).max(self.compacted);
        let mut above: Vec<u64> = self
            .entries
            .values()
            .filter(|e| e.deleted && e.version > floor)
            .map(|e| e.version)
            .collect();
        if above.len() <= max {
            return floor;
        }
        above.sort_unstable();
        above[above.len() - max - 1]
    }

    /// Drops the tombstones at or below `floor`; the number dropped.
    pub fn collect(&mut self, floor: u64) -> usize {
        let floor = floor.min(self.version);
        if floor <= self.compacted {
            return 0;
        }
        let before = self.entries.len();
        self.entries
            .retain(|_, e| !(e.deleted && e.version <= floor));
        self.compacted = floor;
        before - self.entries.len()
    }

    /// Replay: puts an entry back as it was logged (no version bump).
    pub fn restore(&mut self, e: TableEntry) {
        self.version = self.version.max(e.version);
        self.entries.insert(e.key.clone(), e);
    }

    /// The rows as stored, for a snapshot.
    pub fn rows(&self) -> impl Iterator<Item = &TableEntry> {
        self.entries.values()
    }

    /// A table from a snapshot's parts (see `store::log`).
    pub fn from_parts(version: u64, compacted: u64, rows: Vec<TableEntry>) -> Self {
        let mut t = Table {
            version,
            compacted,
            entries: BTreeMap::new(),
        };
        for e in rows {
            t.restore(e);
        }
        t
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entries
            .get(key)
            .filter(|e| !e.deleted)
            .and_then(|e| e.value.as_ref())
    }

    /// Every key held, tombstones included, with its deleted flag.
    pub fn keys(&self) -> impl Iterator<Item = (&str, bool)> {
        self.entries.iter().map(|(k, e)| (k.as_str(), e.deleted))
    }

    /// Whether `key` is held, as a value or a tombstone.
    pub fn holds(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// Live (not deleted) values whose key starts with `prefix`.
    pub fn live<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, &'a Value)> + 'a {
        self.entries
            .range(prefix.to_string()..)
            .take_while(move |(k, _)| k.starts_with(prefix))
            .filter(|(_, e)| !e.deleted)
            .filter_map(|(k, e)| e.value.as_ref().map(|v| (k.as_str(), v)))
    }

    /// Owner: sets `key`; `None` (no version bump) when the value is
    /// equal, else the entry as written (what the log appends).
    pub fn put(&mut self, key: &str, value: Value) -> Option<TableEntry> {
        if let Some(e) = self.entries.get(key)
            && !e.deleted
            && e.value.as_ref() == Some(&value)
        {
            return None;
        }
        self.version += 1;
        let e = TableEntry {
            key: key.to_string(),
            version: self.version,
            deleted: false,
            value: Some(value),
        };
        self.entries.insert(key.to_string(), e.clone());
        Some(e)
    }

    /// Owner: deletes `key`, leaving a tombstone (the entry written).
    pub fn delete(&mut self, key: &str) -> Option<TableEntry> {
        match self.entries.get(key) {
            Some(e) if !e.deleted => {}
            _ => return None,
        }
        self.version += 1;
        let e = TableEntry {
            key: key.to_string(),
            version: self.version,
            deleted: true,
            value: None,
        };
        self.entries.insert(key.to_string(), e.clone());
        Some(e)
    }

    /// Owner: the entries a replica at `since` lacks.
    pub fn delta_since(&self, since: u64) -> Vec<TableEntry> {
        let mut out: Vec<TableEntry> = self
            .entries
            .values()
            .filter(|e| e.version > since)
            .cloned()
            .collect();
        out.sort_by_key(|e| e.version);
        out
    }

    /// Owner: what a replica at `since` is sent, as (version, full,
    /// entries): the whole table when it must start over
    /// ([`Table::needs_full`]), else the delta.
    pub fn serve(&self, since: u64) -> (u64, bool, Vec<TableEntry>) {
        let full = self.needs_full(since);
        (
            self.version,
            full,
            self.delta_since(if full { 0 } else { since }),
        )
    }

    /// Replica: applies the owner's delta from `since` up to `version`.
    /// Checked before anything changes, so a bad delta leaves the replica as
    /// it was.
    pub fn apply(
        &mut self,
        since: u64,
        version: u64,
        full: bool,
        entries: Vec<TableEntry>,
    ) -> Result<bool, ApplyError> {
        if !full && since != self.version {
            return Err(ApplyError::Gap {
                since,
                local: self.version,
            });
        }
        if !full && version < self.version {
            return Err(ApplyError::Regressed {
                local: self.version,
                remote: version,
            });
        }
        if let Some(e) = entries.iter().find(|e| e.version > version) {
            return Err(ApplyError::EntryAhead {
                key: e.key.clone(),
                entry: e.version,
                table: version,
            });
        }
        if full {
            let changed =
                self.version != version || !entries.is_empty() || !self.entries.is_empty();
            self.entries.clear();
            self.version = version;
            for e in entries {
                self.entries.insert(e.key.clone(), e);
            }
            return Ok(changed);
        }
        let changed = version != self.version;
        for e in entries {
            self.entries.insert(e.key.clone(), e);
        }
        self.version = version;
        Ok(changed)
    }

    pub fn snapshot(&self, owner: &[u8]) -> TableSnapshot {
        TableSnapshot {
            owner: owner.to_vec(),
            version: self.version,
            entries: self.entries.values().cloned().collect(),
        }
    }

    pub fn from_snapshot(s: TableSnapshot) -> Self {
        Self::from_parts(s.version, 0, s.entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ovl_proto::records::NetworkRemoval;
    use proptest::prelude::*;

    fn val(n: u64) -> Value {
        Value::Removal(NetworkRemoval {
            network_id: vec![1],
            removed_at_ms: n,
        })
    }

    #[test]
    fn replica_converges_through_deltas_including_deletes() {
        let mut owner = Table::default();
        let mut replica = Table::default();
        owner.put("a", val(1));
        owner.put("b", val(2));
        replica
            .apply(0, owner.version(), false, owner.delta_since(0))
            .unwrap();
        assert_eq!(replica, owner);
        let since = replica.version();
        owner.delete("a");
        owner.put("b", val(3));
        owner.put("c", val(4));
        assert!(
            owner.put("c", val(4)).is_none(),
            "equal value must not bump"
        );
        let d = owner.delta_since(since);
        assert_eq!(d.len(), 3);
        replica.apply(since, owner.version(), false, d).unwrap();
        assert_eq!(replica, owner);
        assert!(replica.get("a").is_none());
        assert_eq!(replica.live("").count(), 2);
    }

    #[test]
    fn bad_deltas_change_nothing() {
        let mut owner = Table::default();
        owner.put("a", val(1));
        owner.put("b", val(2));
        let mut replica = Table::default();
        let before = replica.clone();
        assert!(replica.apply(1, 2, false, owner.delta_since(1)).is_err());
        let mut ahead = owner.delta_since(0);
        ahead[0].version = 99;
        assert!(matches!(
            replica.apply(0, 2, false, ahead),
            Err(ApplyError::EntryAhead { .. })
        ));
        assert_eq!(replica, before);
    }

    #[test]
    fn collected_tombstones_force_a_full_pull_that_converges() {
        let mut owner = Table::default();
        let mut replica = Table::default();
        owner.put("a", val(1));
        owner.put("b", val(2));
        replica
            .apply(0, owner.version(), false, owner.delta_since(0))
            .unwrap();
        let since = replica.version();
        owner.delete("a");
        owner.put("c", val(3));
        owner.delete("c");
        assert_eq!(owner.tombstones(), 2);
        // Every peer pulled up to the first delete: only that one goes.
        assert_eq!(owner.collect(owner.gc_floor(3, 100)), 1);
        assert!(!owner.needs_full(3));
        assert!(
            owner.needs_full(since),
            "replica is behind the collected tombstone"
        );
        replica
            .apply(since, owner.version(), true, owner.delta_since(0))
            .unwrap();
        assert_eq!(replica.get("a"), None);
        assert_eq!(replica.live("").count(), 1);
        assert_eq!(owner.collect(2), 0, "the floor never goes back");
    }

    #[test]
    fn gc_floor_bounds_tombstones_whatever_peers_pulled() {
        let mut t = Table::default();
        for i in 0..10 {
            let k = format!("k{i}");
            t.put(&k, val(i));
            t.delete(&k);
        }
        assert_eq!(t.tombstones(), 10);
        // No peer pulled anything, yet at most 3 tombstones stay.
        let floor = t.gc_floor(0, 3);
        t.collect(floor);
        assert_eq!(t.tombstones(), 3);
        assert_eq!(t.gc_floor(0, 3), t.compacted(), "already within the bound");
        assert_eq!(t.gc_floor(u64::MAX, 3), t.version(), "all pulled: all go");
    }

    #[test]
    fn snapshot_round_trip() {
        let mut t = Table::default();
        t.put("x", val(1));
        t.delete("x");
        let back = Table::from_snapshot(t.snapshot(&[7]));
        assert_eq!(back, t);
    }

    /// What the owner's side of replication does between pulls.
    #[derive(Debug, Clone)]
    enum Step {
        Put(u8, u64),
        Delete(u8),
        /// Collect tombstones every replica pulled past, at most `max` left.
        Collect(usize),
        /// Replica `r` pulls as the agent does (`sync` and the peer API).
        Pull(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0u8..12, any::<u64>()).prop_map(|(k, v)| Step::Put(k, v)),
            3 => (0u8..12).prop_map(Step::Delete),
            1 => (0usize..4).prop_map(Step::Collect),
            3 => (0usize..3).prop_map(Step::Pull),
        ]
    }

    /// One pull: the whole table when the owner says so, else the delta;
    /// the replica then collects its own tombstones (it never serves).
    fn pull(owner: &Table, replica: &mut Table) {
        let since = replica.version();
        let (version, full, delta) = owner.serve(since);
        replica
            .apply(since, version, full, delta)
            .expect("an honest delta applies");
        replica.collect(version);
    }

    fn live(t: &Table) -> Vec<(String, Value)> {
        t.live("").map(|(k, v)| (k.to_owned(), v.clone())).collect()
    }

    proptest! {
        /// Whatever the order of changes, collections and pulls, a replica
        /// that pulls holds exactly the owner's live entries, and the owner
        /// never keeps more tombstones than the bound it collects with.
        #[test]
        fn replicas_converge_under_any_changes_collections_and_pulls(
            steps in proptest::collection::vec(step(), 1..200)
        ) {
            let mut owner = Table::default();
            let mut replicas = vec![Table::default(); 3];
            for s in steps {
                match s {
                    Step::Put(k, v) => {
                        owner.put(&format!("k{k}"), val(v));
                    }
                    Step::Delete(k) => {
                        owner.delete(&format!("k{k}"));
                    }
                    Step::Collect(max) => {
                        let pulled = replicas.iter().map(Table::version).min().unwrap_or(0);
                        owner.collect(owner.gc_floor(pulled, max));
                        prop_assert!(owner.tombstones() <= max, "{} tombstones kept, bound {max}", owner.tombstones());
                    }
                    Step::Pull(r) => {
                        pull(&owner, &mut replicas[r]);
                        prop_assert_eq!(live(&replicas[r]), live(&owner));
                        prop_assert_eq!(replicas[r].version(), owner.version());
                    }
                }
            }
            for r in &mut replicas {
                pull(&owner, r);
                prop_assert_eq!(live(r), live(&owner));
            }
        }
    }
}
