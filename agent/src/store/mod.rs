//! The store: the single source of truth of desired state. It holds this
//! node's own table (persisted, the only one it writes) and a replica of
//! every peer's table (in memory, rebuilt by pulling after a restart).
//! Everything above (api) writes here; everything below (sync, reconciler)
//! reads from here.

pub mod networks;
pub mod ownership;
pub mod table;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use ovl_proto::records::{EndpointRecord, TableEntry, TableSnapshot, table_entry::Value};
use prost::Message;

use crate::ids::{EndpointId, MacAddr, NetworkId, NodeId};
use crate::persist::{self, PersistError};
pub use networks::NetworkView;
pub use table::{ApplyError, Table};

const TABLE_FILE: &str = "table.pb";

/// Keys of the entries a table may hold.
pub mod key {
    use crate::ids::{EndpointId, NetworkId};
    pub const NETWORK: &str = "net/";
    pub const REMOVAL: &str = "netrm/";
    pub const ENDPOINT: &str = "ep/";
    pub const IPAM: &str = "ipam/";
    /// When this table's owner first saw a network (`NetworkWitness`).
    pub const WITNESS: &str = "seen/";

    pub fn network(id: NetworkId) -> String {
        format!("{NETWORK}{id}")
    }
    pub fn removal(id: NetworkId) -> String {
        format!("{REMOVAL}{id}")
    }
    pub fn endpoint(id: EndpointId) -> String {
        format!("{ENDPOINT}{id}")
    }
    pub fn ipam(id: NetworkId) -> String {
        format!("{IPAM}{id}")
    }
    pub fn witness(id: NetworkId) -> String {
        format!("{WITNESS}{id}")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Persist(#[from] PersistError),
    #[error("{0}: corrupt table ({1}); move it aside to start with an empty table")]
    Corrupt(PathBuf, prost::DecodeError),
}

/// An endpoint row as the data plane and the API use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointView {
    pub id: EndpointId,
    pub network: NetworkId,
    pub owner: NodeId,
    pub name: String,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub mac: MacAddr,
    pub vtep: IpAddr,
    pub record: EndpointRecord,
}

impl EndpointView {
    /// `None` for a record that does not parse (skipped, never fatal).
    pub fn parse(owner: NodeId, r: &EndpointRecord) -> Option<Self> {
        Some(Self {
            id: EndpointId::from_bytes(r.id.as_slice().try_into().ok()?),
            network: NetworkId::from_bytes(r.network_id.as_slice().try_into().ok()?),
            owner,
            name: r.name.clone(),
            ip: r.ip.parse().ok()?,
            prefix_len: u8::try_from(r.prefix_len).ok().filter(|p| *p <= 32)?,
            mac: r.mac.parse().ok()?,
            vtep: r.vtep.parse().ok()?,
            record: r.clone(),
        })
    }
}

pub struct Store {
    me: NodeId,
    path: PathBuf,
    own: Table,
    replicas: BTreeMap<NodeId, Table>,
}

impl Store {
    pub fn load(state_dir: &Path, me: NodeId) -> Result<Self, StoreError> {
        let path = state_dir.join(TABLE_FILE);
        let own = match persist::read_optional(&path)? {
            Some(raw) => Table::from_snapshot(
                TableSnapshot::decode(raw.as_slice())
                    .map_err(|e| StoreError::Corrupt(path.clone(), e))?,
            ),
            None => Table::default(),
        };
        Ok(Self {
            me,
            path,
            own,
            replicas: BTreeMap::new(),
        })
    }

    pub fn me(&self) -> NodeId {
        self.me
    }

    pub fn own(&self) -> &Table {
        &self.own
    }

    /// Sets an own entry, persisted before returning. `Ok(false)`: unchanged.
    pub fn put(&mut self, key: &str, value: Value) -> Result<bool, StoreError> {
        let before = self.own.clone();
        if !self.own.put(key, value) {
            return Ok(false);
        }
        self.persist_or_revert(before)
    }

    pub fn delete(&mut self, key: &str) -> Result<bool, StoreError> {
        let before = self.own.clone();
        if !self.own.delete(key) {
            return Ok(false);
        }
        self.persist_or_revert(before)
    }

    /// Forgets everything (after leaving the cluster).
    pub fn clear(&mut self) -> Result<(), StoreError> {
        self.replicas.clear();
        self.own = Table::default();
        persist::remove_durable(&self.path)?;
        Ok(())
    }

    fn persist_or_revert(&mut self, before: Table) -> Result<bool, StoreError> {
        let bytes = self.own.snapshot(self.me.as_bytes()).encode_to_vec();
        if let Err(e) = persist::write_atomic(&self.path, &bytes) {
            // Persist before effect: what is not on disk did not happen.
            self.own = before;
            return Err(e.into());
        }
        Ok(true)
    }

    pub fn delta_since(&self, since: u64) -> (u64, bool, Vec<TableEntry>) {
        let full = since == 0 || since > self.own.version();
        let from = if full { 0 } else { since };
        (self.own.version(), full, self.own.delta_since(from))
    }

    pub fn replica_version(&self, owner: NodeId) -> u64 {
        self.replicas.get(&owner).map_or(0, Table::version)
    }

    pub fn apply_replica(
        &mut self,
        owner: NodeId,
        since: u64,
        version: u64,
        full: bool,
        entries: Vec<TableEntry>,
    ) -> Result<bool, ApplyError> {
        if owner == self.me {
            return Ok(false);
        }
        self.replicas
            .entry(owner)
            .or_default()
            .apply(since, version, full, entries)
    }

    pub fn drop_replica(&mut self, owner: NodeId) -> bool {
        self.replicas.remove(&owner).is_some()
    }

    pub fn replica_owners(&self) -> Vec<NodeId> {
        self.replicas.keys().copied().collect()
    }

    /// Own table first, then replicas.
    pub fn tables(&self) -> impl Iterator<Item = (NodeId, &Table)> {
        std::iter::once((self.me, &self.own)).chain(self.replicas.iter().map(|(k, v)| (*k, v)))
    }

    /// Every copy of every network record, the removals and the witnesses
    /// known anywhere, by the table that holds them. A witness counts only
    /// under its own key (one per network per table).
    pub fn network_sources(&self) -> networks::Sources {
        let mut src = networks::Sources::default();
        for (owner, t) in self.tables() {
            for (_, v) in t.live(key::NETWORK) {
                if let Value::Network(n) = v {
                    src.records.push((owner, n.clone()));
                }
            }
            for (_, v) in t.live(key::REMOVAL) {
                if let Value::Removal(r) = v
                    && let Ok(id) = <[u8; 16]>::try_from(r.network_id.as_slice())
                {
                    src.removed.insert(NetworkId::from_bytes(id));
                }
            }
            for (k, v) in t.live(key::WITNESS) {
                if let Value::Witness(w) = v
                    && let Ok(id) = <[u8; 16]>::try_from(w.network_id.as_slice())
                    && k == key::witness(NetworkId::from_bytes(id))
                {
                    src.witnesses
                        .entry(NetworkId::from_bytes(id))
                        .or_default()
                        .insert(owner, w.first_seen_ms);
                }
            }
        }
        // A network we hold but have not witnessed yet (pulled, not yet
        // republished) counts as seen by us after everything we did witness:
        // the vote we cast once `republish_networks` stamps it.
        let me = self.me;
        for (_, r) in &src.records {
            if let Ok(id) = <[u8; 16]>::try_from(r.id.as_slice()).map(NetworkId::from_bytes) {
                src.witnesses
                    .entry(id)
                    .or_default()
                    .entry(me)
                    .or_insert(u64::MAX);
            }
        }
        src
    }

    pub fn networks(&self) -> Vec<NetworkView> {
        networks::resolve(&self.network_sources()).0
    }

    /// Every endpoint row of every table, parsed; malformed rows skipped.
    pub fn endpoints(&self) -> Vec<EndpointView> {
        let mut out = Vec::new();
        for (owner, t) in self.tables() {
            for (_, v) in t.live(key::ENDPOINT) {
                if let Value::Endpoint(e) = v
                    && let Some(ev) = EndpointView::parse(owner, e)
                {
                    out.push(ev);
                }
            }
        }
        out
    }

    /// IPAM ring views published for one network, by publisher.
    pub fn ipam_rings(&self, network: NetworkId) -> Vec<(NodeId, Vec<u8>)> {
        let k = key::ipam(network);
        self.tables()
            .filter_map(|(owner, t)| match t.get(&k) {
                Some(Value::Ipam(r)) => Some((owner, r.ring_json.clone())),
                _ => None,
            })
            .collect()
    }
}
