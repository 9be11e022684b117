//! A node's table: its single-writer log of keyed entries, each stamped with
//! the table version at its last change. Deletions stay as tombstones, so a
//! delta since any version is exact: entries with a higher version.
//! Replicas apply deltas from the owner and never write on their own.

use std::collections::BTreeMap;

use ovl_proto::records::{TableEntry, TableSnapshot, table_entry::Value};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    version: u64,
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

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entries
            .get(key)
            .filter(|e| !e.deleted)
            .and_then(|e| e.value.as_ref())
    }

    /// Live (not deleted) values whose key starts with `prefix`.
    pub fn live<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a str, &'a Value)> + 'a {
        self.entries
            .range(prefix.to_string()..)
            .take_while(move |(k, _)| k.starts_with(prefix))
            .filter(|(_, e)| !e.deleted)
            .filter_map(|(k, e)| e.value.as_ref().map(|v| (k.as_str(), v)))
    }

    /// Owner: sets `key`; a no-op (no version bump) when the value is equal.
    pub fn put(&mut self, key: &str, value: Value) -> bool {
        if let Some(e) = self.entries.get(key)
            && !e.deleted
            && e.value.as_ref() == Some(&value)
        {
            return false;
        }
        self.version += 1;
        self.entries.insert(
            key.to_string(),
            TableEntry {
                key: key.to_string(),
                version: self.version,
                deleted: false,
                value: Some(value),
            },
        );
        true
    }

    /// Owner: deletes `key`, leaving a tombstone.
    pub fn delete(&mut self, key: &str) -> bool {
        match self.entries.get(key) {
            Some(e) if !e.deleted => {}
            _ => return false,
        }
        self.version += 1;
        self.entries.insert(
            key.to_string(),
            TableEntry {
                key: key.to_string(),
                version: self.version,
                deleted: true,
                value: None,
            },
        );
        true
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
        let mut t = Table {
            version: s.version,
            entries: BTreeMap::new(),
        };
        for e in s.entries {
            t.version = t.version.max(e.version);
            t.entries.insert(e.key.clone(), e);
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ovl_proto::records::NetworkRemoval;

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
        assert!(!owner.put("c", val(4)), "equal value must not bump");
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
    fn snapshot_round_trip() {
        let mut t = Table::default();
        t.put("x", val(1));
        t.delete("x");
        let back = Table::from_snapshot(t.snapshot(&[7]));
        assert_eq!(back, t);
    }
}
