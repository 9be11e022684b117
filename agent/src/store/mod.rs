//! The store: the single source of truth of desired state. It holds this
//! node's own table (persisted, the only one it writes) and a replica of
//! every peer's table (in memory, rebuilt by pulling after a restart).
//! Everything above (api) writes here; everything below (sync, reconciler)
//! reads from here.

pub mod bounds;
pub mod log;
pub mod networks;
pub mod ownership;
pub mod removals;
pub mod table;
pub mod writer;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ovl_proto::records::{EndpointRecord, TableEntry, table_entry::Value};
use tracing::warn;

use crate::ids::{EndpointId, MacAddr, NetworkId, NodeId};
use crate::metrics::{Counter, Counters};
use crate::persist::{self, PersistError};
use log::LogRecord;
pub use networks::NetworkView;
pub use table::{ApplyError, Table};
pub use writer::{Ticket, WriteError, Writer};

/// The snapshot (the first format's only file, same encoding).
const TABLE_FILE: &str = "table.pb";
/// Changes since the snapshot (`store::log`).
const LOG_FILE: &str = "table.log";
/// Tombstones kept at most, whatever peers pulled (`Table::gc_floor`).
pub const MAX_TOMBSTONES: usize = 4096;

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
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// Sizes for diagnostics and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TableStats {
    pub own_version: u64,
    pub own_rows: u64,
    pub own_tombstones: u64,
    pub compacted: u64,
    pub replica_rows: u64,
    pub replica_tombstones: u64,
    pub durable_version: u64,
    pub fsyncs: u64,
    pub snapshots: u64,
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

fn truncate(path: &Path, len: u64) -> Result<(), PersistError> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| {
            f.set_len(len)?;
            f.sync_all()
        })
        .map_err(|e| PersistError::new("truncate", path, e))
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
    own: Table,
    /// Bumped by `clear`, so tickets from before it resolve.
    epoch: u64,
    replicas: BTreeMap<NodeId, Table>,
    writer: Writer,
    counters: Arc<Counters>,
}

impl Store {
    /// Loads the snapshot and replays the log after it (a torn tail is cut
    /// off, counted and logged), then starts the writer thread. Blocking:
    /// call it before serving, or off the runtime.
    pub fn load(state_dir: &Path, me: NodeId, counters: Arc<Counters>) -> Result<Self, StoreError> {
        let snap = state_dir.join(TABLE_FILE);
        let log_path = state_dir.join(LOG_FILE);
        let mut own = match persist::read_optional(&snap)? {
            Some(raw) => {
                log::decode_snapshot(&raw).map_err(|e| StoreError::Corrupt(snap.clone(), e))?
            }
            None => Table::default(),
        };
        let raw = persist::read_optional(&log_path)?.unwrap_or_default();
        let decoded = log::decode_log(&raw);
        if let Some(torn) = &decoded.torn {
            counters.inc(Counter::StoreLogTorn);
            warn!(path = %log_path.display(), kept = decoded.valid_len, dropped = raw.len() - decoded.valid_len,
                  reason = %torn, "state log has a torn or corrupt tail (crash mid-write?); the rest is ignored");
            truncate(&log_path, decoded.valid_len as u64)?;
        }
        log::replay(&mut own, decoded.records);
        let writer = Writer::spawn(
            writer::Paths {
                snapshot: snap,
                log: log_path,
            },
            me.as_bytes().to_vec(),
            own.clone(),
            decoded.valid_len as u64,
            counters.clone(),
        )?;
        Ok(Self {
            me,
            own,
            epoch: 0,
            replicas: BTreeMap::new(),
            writer,
            counters,
        })
    }

    pub fn me(&self) -> NodeId {
        self.me
    }

    pub fn own(&self) -> &Table {
        &self.own
    }

    /// Sets an own entry in memory and queues it for the writer.
    /// `Ok(false)`: unchanged. Persist before effect: a caller whose
    /// change must survive a crash before it acts waits for
    /// [`Store::durable`] of [`Store::ticket`] after dropping the lock.
    pub fn put(&mut self, key: &str, value: Value) -> Result<bool, StoreError> {
        match self.own.put(key, value) {
            Some(e) => self.log(LogRecord::entry(e)),
            None => Ok(false),
        }
    }

    pub fn delete(&mut self, key: &str) -> Result<bool, StoreError> {
        match self.own.delete(key) {
            Some(e) => self.log(LogRecord::entry(e)),
            None => Ok(false),
        }
    }

    fn log(&mut self, r: LogRecord) -> Result<bool, StoreError> {
        self.writer.send(writer::Op::Record(Box::new(r)))?;
        Ok(true)
    }

    /// The point a caller waits for to see its changes so far on disk.
    pub fn ticket(&self) -> Ticket {
        Ticket {
            epoch: self.epoch,
            version: self.own.version(),
        }
    }

    /// Resolves once `t` is on disk; borrows nothing of the store.
    pub fn durable(
        &self,
        t: Ticket,
    ) -> impl Future<Output = Result<(), WriteError>> + Send + 'static {
        self.writer.waiter().wait(t)
    }

    pub fn writer(&self) -> &Writer {
        &self.writer
    }

    /// Forgets everything (after leaving the cluster); the files go on the
    /// writer thread (wait for the ticket to know they are gone).
    pub fn clear(&mut self) -> Result<(), StoreError> {
        self.replicas.clear();
        self.own = Table::default();
        self.epoch += 1;
        self.writer.send(writer::Op::Clear)?;
        Ok(())
    }

    /// Collects own tombstones every live peer pulled past (`pulled`),
    /// keeping at most `max` whatever. The number collected.
    pub fn collect_tombstones(&mut self, pulled: u64, max: usize) -> Result<usize, StoreError> {
        let floor = self.own.gc_floor(pulled, max);
        if floor <= self.own.compacted() {
            return Ok(0);
        }
        if floor > pulled.min(self.own.version()) {
            // The bound, not the peers, set the floor: a peer behind it
            // pulls the whole table next time.
            self.counters.inc(Counter::StoreTombstonesForced);
        }
        let n = self.own.collect(floor);
        self.log(LogRecord::collect(floor))?;
        Ok(n)
    }

    pub fn stats(&self) -> TableStats {
        let s = self.writer.stats();
        let ld = std::sync::atomic::Ordering::Relaxed;
        TableStats {
            own_version: self.own.version(),
            own_rows: self.own.len() as u64,
            own_tombstones: self.own.tombstones() as u64,
            compacted: self.own.compacted(),
            replica_rows: self.replicas.values().map(|t| t.len() as u64).sum(),
            replica_tombstones: self.replicas.values().map(|t| t.tombstones() as u64).sum(),
            durable_version: self.writer.durable().version,
            fsyncs: s.fsyncs.load(ld),
            snapshots: s.snapshots.load(ld),
        }
    }

    /// What a peer at `since` lacks: the whole table when it is behind
    /// collected tombstones (the deletions are no longer listed).
    pub fn delta_since(&self, since: u64) -> (u64, bool, Vec<TableEntry>) {
        self.own.serve(since)
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
    ) -> Result<(bool, Vec<bounds::BoundError>), ApplyError> {
        if owner == self.me {
            return Ok((false, Vec::new()));
        }
        let replica = self.replicas.entry(owner).or_default();
        // What a member may make us hold is bounded where it is accepted.
        let (entries, refused) = bounds::screen(replica, full, entries);
        let changed = replica.apply(since, version, full, entries)?;
        // A replica never serves deltas: its tombstones have done their
        // work once applied.
        replica.collect(version);
        Ok((changed, refused))
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
                    let id = NetworkId::from_bytes(id);
                    src.removed.insert(id);
                    let at = src.removed_at.entry(id).or_insert(r.removed_at_ms);
                    *at = (*at).min(r.removed_at_ms);
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

#[cfg(test)]
mod tests {
    use super::*;
    use ovl_proto::records::{NetworkRemoval, TableSnapshot};
    use prost::Message;
    use std::sync::Mutex;
    use std::sync::atomic::Ordering;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ovl-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        persist::ensure_private_dir(&d).unwrap();
        d
    }

    fn val(n: u64) -> Value {
        Value::Removal(NetworkRemoval {
            network_id: vec![1],
            removed_at_ms: n,
        })
    }

    fn me() -> NodeId {
        NodeId::from_bytes([7; 16])
    }

    fn load(d: &Path) -> (Store, Arc<Counters>) {
        let c = Arc::new(Counters::default());
        (Store::load(d, me(), c.clone()).unwrap(), c)
    }

    #[test]
    fn concurrent_puts_share_fsyncs_and_all_survive_a_reload() {
        let d = dir("group");
        let (store, _) = load(&d);
        let store = Arc::new(Mutex::new(store));
        const N: usize = 64;
        let threads: Vec<_> = (0..N)
            .map(|i| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let (t, waiter) = {
                        let mut s = store.lock().unwrap();
                        s.put(&format!("k{i}"), val(i as u64)).unwrap();
                        (s.ticket(), s.writer().waiter())
                    };
                    // Waiting holds no lock: others queue behind the fsync.
                    waiter.wait_blocking(t).unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let store = Arc::into_inner(store).unwrap().into_inner().unwrap();
        let fsyncs = store.stats().fsyncs;
        let batches = store.writer().stats().batches.load(Ordering::Relaxed);
        println!("{N} concurrent puts: {fsyncs} fsyncs in {batches} batches");
        assert!(
            fsyncs < N as u64,
            "{fsyncs} fsyncs for {N} puts: no group commit"
        );
        let want = store.own().clone();
        drop(store);
        let (back, c) = load(&d);
        assert_eq!(back.own(), &want);
        assert_eq!(back.own().live("k").count(), N);
        assert_eq!(c.get(Counter::StoreLogTorn), 0);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_torn_log_tail_is_cut_counted_and_the_rest_kept() {
        let d = dir("torn");
        let (mut s, _) = load(&d);
        for i in 0..5 {
            s.put(&format!("k{i}"), val(i)).unwrap();
        }
        s.writer().wait_blocking(s.ticket()).unwrap();
        let want = s.own().clone();
        drop(s);
        let log = d.join(LOG_FILE);
        let good = std::fs::metadata(&log).unwrap().len();
        // A crash mid-append: half a frame.
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        std::io::Write::write_all(&mut f, &[40, 0, 0, 0, 1, 2, 3]).unwrap();
        drop(f);
        let (mut s, c) = load(&d);
        assert_eq!(s.own(), &want);
        assert_eq!(c.get(Counter::StoreLogTorn), 1);
        assert_eq!(std::fs::metadata(&log).unwrap().len(), good, "tail cut off");
        // Writes after the cut replay cleanly.
        s.put("after", val(9)).unwrap();
        s.writer().wait_blocking(s.ticket()).unwrap();
        let want = s.own().clone();
        drop(s);
        let (s, c) = load(&d);
        assert_eq!(s.own(), &want);
        assert_eq!(c.get(Counter::StoreLogTorn), 0);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_state_dir_of_the_first_format_loads_and_moves_on() {
        let d = dir("legacy");
        let mut t = Table::default();
        t.put("net/a", val(1));
        t.put("ep/b", val(2));
        t.delete("ep/b");
        let legacy = TableSnapshot {
            owner: me().as_bytes().to_vec(),
            version: t.version(),
            entries: t.rows().cloned().collect(),
        };
        persist::write_atomic(&d.join(TABLE_FILE), &legacy.encode_to_vec()).unwrap();
        let (mut s, _) = load(&d);
        assert_eq!(s.own(), &t);
        s.put("net/c", val(3)).unwrap();
        s.writer().wait_blocking(s.ticket()).unwrap();
        let want = s.own().clone();
        drop(s);
        assert_eq!(load(&d).0.own(), &want);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn snapshots_fold_the_log_and_collection_survives_reload() {
        let d = dir("snap");
        let (mut s, _) = load(&d);
        let big = Value::Removal(NetworkRemoval {
            network_id: vec![0; 4096],
            removed_at_ms: 0,
        });
        for i in 0..600 {
            s.put(&format!("k{}", i % 50), big.clone()).unwrap();
            s.delete(&format!("k{}", i % 50)).unwrap();
        }
        assert_eq!(s.collect_tombstones(u64::MAX, MAX_TOMBSTONES).unwrap(), 50);
        s.writer().wait_blocking(s.ticket()).unwrap();
        let st = s.stats();
        assert!(st.snapshots >= 1, "{st:?}");
        assert_eq!(st.own_tombstones, 0);
        let want = s.own().clone();
        drop(s);
        let log_len = std::fs::metadata(d.join(LOG_FILE)).unwrap().len();
        assert!(log_len <= 2 * writer::SNAPSHOT_MIN, "log folded: {log_len}");
        let (back, _) = load(&d);
        assert_eq!(back.own(), &want);
        assert_eq!(back.own().compacted(), want.version());
        assert!(back.own().needs_full(want.version() - 1));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn clear_removes_the_files() {
        let d = dir("clear");
        let (mut s, _) = load(&d);
        s.put("a", val(1)).unwrap();
        s.clear().unwrap();
        s.writer().wait_blocking(s.ticket()).unwrap();
        drop(s);
        assert!(!d.join(TABLE_FILE).exists());
        assert!(load(&d).0.own().is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
