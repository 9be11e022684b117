//! Address allocation wired to persistence, replication and peers.
//!
//! The `ipam` module is pure; here its state meets the disk (one file per
//! network, ring and allocations in one atomic write, before any effect),
//! the store (each node publishes its view of every network's ring; views
//! merge by version, each newer state only from someone with authority over
//! it: `ipam::ring`) and peers (asking an owner with free space to donate).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnetwork::Ipv4Network;
use ovl_proto::peer::SpaceRequest;
use ovl_proto::records::{IpamRing, table_entry::Value};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use super::{Core, CoreError};
use ring::signature::Ed25519KeyPair;

use crate::ids::{EndpointId, NetworkId, NodeId};
use crate::ipam::{
    AllocError, Allocator, DonateError, DonationRequest, Grant, Pool, Ring, Signer, Want,
};
use crate::membership::{NodeStatus, NodeView};
use crate::metrics::{Counter, RateLimit};
use crate::persist::{self, PersistError};
use crate::store::networks::PoolSpec;
use crate::store::{NetworkView, key};

#[derive(Debug, thiserror::Error)]
pub enum IpamLoadError {
    #[error(transparent)]
    Persist(#[from] PersistError),
    #[error(
        "{0}: corrupt IPAM state ({1}); this host cannot know which addresses it gave out: move the whole state dir aside so it rejoins as a new node"
    )]
    Corrupt(PathBuf, String),
}

/// How long a leaving host waits for the recipient of its ranges to
/// acknowledge before leaving anyway.
const HAND_OFF_ACK: Duration = Duration::from_secs(10);

pub struct Ipam {
    dir: PathBuf,
    me: NodeId,
    /// The identity key: every ring write is signed with it.
    key: Arc<Ed25519KeyPair>,
    nets: Mutex<HashMap<NetworkId, Allocator>>,
    /// Forged ring entries already counted: (network, publisher, block,
    /// version), so a forgery is counted once, not once per merge pass.
    forged_seen: std::sync::Mutex<HashSet<(NetworkId, NodeId, Ipv4Network, u64)>>,
}

impl Ipam {
    pub fn load(state_dir: &Path, key: Arc<Ed25519KeyPair>) -> Result<Self, IpamLoadError> {
        let me =
            crate::keys::identity::node_id_of(ring::signature::KeyPair::public_key(&*key).as_ref());
        let dir = state_dir.join("ipam");
        persist::ensure_private_dir(&dir)?;
        let mut nets = HashMap::new();
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for entry in rd.flatten() {
                let path = entry.path();
                let Some(id) = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .and_then(|s| s.parse::<NetworkId>().ok())
                else {
                    continue;
                };
                if path.extension().and_then(|e| e.to_str()) != Some("json") {
                    continue;
                }
                match persist::read_optional(&path)?
                    .map(|b| serde_json::from_slice::<Allocator>(&b))
                {
                    Some(Ok(mut a)) => {
                        a.set_signer(Signer::new(key.clone(), id));
                        nets.insert(id, a);
                    }
                    // Starting without our allocations, under the same
                    // identity, would adopt our ranges with no record of
                    // what is allocated in them: duplicate addresses.
                    Some(Err(e)) => return Err(IpamLoadError::Corrupt(path, e.to_string())),
                    None => {}
                }
            }
        }
        Ok(Self {
            dir,
            me,
            key,
            nets: Mutex::new(nets),
            forged_seen: std::sync::Mutex::new(HashSet::new()),
        })
    }

    fn signer(&self, id: NetworkId) -> Signer {
        Signer::new(self.key.clone(), id)
    }

    /// A host that allocated nothing in network `id` yet.
    fn fresh(&self, id: NetworkId) -> Allocator {
        Allocator::join(self.signer(id), Ring::default())
    }

    fn path(&self, id: NetworkId) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    fn persist(&self, id: NetworkId, a: &Allocator) -> Result<(), CoreError> {
        let json = serde_json::to_vec(a).map_err(|e| CoreError::Ipam(id.short(), e.to_string()))?;
        persist::write_atomic(&self.path(id), &json).map_err(|e| CoreError::Store(e.into()))
    }

    pub async fn create(&self, id: NetworkId, pool: &PoolSpec) -> Result<(), CoreError> {
        let pool = Pool::new(pool.subnet, pool.ip_range, Some(pool.gateway))
            .map_err(|e| CoreError::Ipam(id.short(), e.to_string()))?;
        let a = Allocator::create(self.signer(id), pool);
        self.persist(id, &a)?;
        self.nets.lock().await.insert(id, a);
        Ok(())
    }

    /// Frees an address of a local endpoint. It stays quarantined until
    /// every live peer has pulled our table past `withdrawn_at` (the own
    /// table version that deleted the endpoint; 0 if it was never
    /// published), so no host still holds the old FDB/neighbour entry when
    /// the address is given again.
    pub async fn release(&self, id: NetworkId, ip: Ipv4Addr, withdrawn_at: u64) {
        let mut nets = self.nets.lock().await;
        if let Some(a) = nets.get_mut(&id) {
            if let Err(e) = a.free(ip, withdrawn_at) {
                warn!(network = %id, ip = %ip, error = %e, "free of an unknown address ignored");
                return;
            }
            if let Err(e) = self.persist(id, a) {
                warn!(network = %id, ip = %ip, error = %e, "could not persist a freed address");
            }
        }
    }

    pub async fn ring_json(&self, id: NetworkId) -> Option<Vec<u8>> {
        let nets = self.nets.lock().await;
        nets.get(&id)
            .and_then(|a| serde_json::to_vec(a.ring()).ok())
    }

    pub async fn ranges_by_owner(&self, id: NetworkId) -> BTreeMap<NodeId, Vec<String>> {
        self.blocks_by_owner(id)
            .await
            .into_iter()
            .map(|(n, blocks)| (n, blocks.iter().map(ToString::to_string).collect()))
            .collect()
    }

    /// The ring as merged here: the blocks each node holds.
    pub async fn blocks_by_owner(&self, id: NetworkId) -> BTreeMap<NodeId, Vec<Ipv4Network>> {
        let nets = self.nets.lock().await;
        let mut out: BTreeMap<NodeId, Vec<Ipv4Network>> = BTreeMap::new();
        if let Some(a) = nets.get(&id) {
            for e in a.ring().entries() {
                out.entry(e.owner).or_default().push(e.block);
            }
        }
        out
    }

    pub async fn clear(&self) {
        let mut nets = self.nets.lock().await;
        for id in nets.keys() {
            let _ = persist::remove_durable(&self.path(*id));
        }
        nets.clear();
    }
}

/// Nodes gone from the cluster, as far as ring writes go: neither a member
/// (alive or dead within its grace period) nor a node whose table we still
/// hold. Their space may be moved by anyone's signed write (hand-off
/// recipients, the operator's reclaim).
fn departed_fn(nodes: Vec<NodeView>, replicas: Vec<NodeId>) -> impl Fn(NodeId) -> bool {
    let present: HashSet<NodeId> = nodes
        .iter()
        .filter(|n| n.status != NodeStatus::Left)
        .map(|n| n.id)
        .chain(replicas)
        .collect();
    move |n| !present.contains(&n)
}

static FORGED_LOG: RateLimit = RateLimit::new(Duration::from_secs(10));

/// How often a host's own free-space report alone is republished.
const REPORT_INTERVAL: Duration = Duration::from_secs(1);

impl Core {
    /// Publishes our view of a network's ring in our table.
    pub(super) async fn publish_ring(&self, id: NetworkId) -> Result<(), CoreError> {
        let Some(json) = self.ipam.ring_json(id).await else {
            return Ok(());
        };
        let value = Value::Ipam(IpamRing {
            network_id: id.as_bytes().to_vec(),
            ring_json: json,
        });
        if self.store().put(&key::ipam(id), value)? {
            self.notify();
        }
        Ok(())
    }

    /// Publishes our ring view where our own free-space report in it moved
    /// since we last published, at most once per `REPORT_INTERVAL` per
    /// network (reports are advisory: they pick donors).
    pub async fn publish_own_reports(&self) {
        let me = self.ipam.me;
        let now = std::time::Instant::now();
        let due: Vec<NetworkId> = {
            let nets = self.ipam.nets.lock().await;
            let store = self.store();
            nets.iter()
                .filter(|(id, a)| {
                    let published = match store.own().get(&key::ipam(**id)) {
                        Some(Value::Ipam(r)) => serde_json::from_slice::<Ring>(&r.ring_json).ok(),
                        _ => None,
                    };
                    published.is_some_and(|p| p.reports().get(&me) != a.ring().reports().get(&me))
                })
                .map(|(id, _)| *id)
                .collect()
        };
        for id in due {
            {
                let mut last = self
                    .reports_published
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if last
                    .get(&id)
                    .is_some_and(|t| now.duration_since(*t) < REPORT_INTERVAL)
                {
                    continue;
                }
                last.insert(id, now);
            }
            if let Err(e) = self.publish_ring(id).await {
                warn!(network = %id, error = %e, "could not publish IPAM ring");
            }
        }
    }

    /// Merges every ring view peers published into ours (each from its
    /// publisher's own table); forged entries are refused, counted once and
    /// logged; a view that finds corruption is refused whole and reported.
    ///
    /// Our merged view is persisted and republished only when it knows
    /// ranges that no live host (us included) publishes yet: a relay, e.g.
    /// of a dead owner's blocks to hosts that never pulled its table.
    /// Ranges that live hosts publish themselves (a donor's grant is in the
    /// donor's view and then the recipient's) reach everyone straight from
    /// them; every host republishing them as well made each donation cost
    /// N-1 extra table versions, (N-1)² notifies, pulls and reconcile passes
    /// and 2(N-1) fsyncs, all during the attach that asked for the space.
    /// Merges only add knowledge, so such a merge is persisted lazily, with
    /// this host's next write of the network's state (`ipam` module docs).
    pub async fn merge_rings(&self) {
        self.forget_removed_networks().await;
        let networks = self.store().networks();
        let nodes = self.cluster.members().await;
        let live: HashSet<NodeId> = nodes
            .iter()
            .filter(|n| n.status == NodeStatus::Alive)
            .map(|n| n.id)
            .collect();
        let departed = departed_fn(nodes, self.store().replica_owners());
        let mut touched = Vec::new();
        {
            let mut nets = self.ipam.nets.lock().await;
            for net in &networks {
                let raw = self.store().ipam_rings(net.id);
                let mut views: Vec<(NodeId, Ring)> = Vec::new();
                // Entries live hosts publish themselves, our own view included.
                let mut published = HashSet::new();
                for (publisher, json) in raw {
                    match serde_json::from_slice::<Ring>(&json) {
                        Ok(r) => {
                            if publisher == self.ipam.me || live.contains(&publisher) {
                                published.extend(
                                    r.entries().iter().map(|e| (e.block, e.owner, e.version)),
                                );
                            }
                            if publisher != self.ipam.me {
                                views.push((publisher, r));
                            }
                        }
                        Err(e) => {
                            if let Some(suppressed) = FORGED_LOG.check(std::time::Instant::now()) {
                                warn!(network = %net.id, peer = %publisher, error = %e, suppressed, "undecodable IPAM ring ignored");
                            }
                        }
                    }
                }
                let a = nets
                    .entry(net.id)
                    .or_insert_with(|| self.ipam.fresh(net.id));
                let refs: Vec<(NodeId, &Ring)> = views.iter().map(|(p, r)| (*p, r)).collect();
                let report = a.merge_views(&refs, &departed);
                for (publisher, e) in &report.errors {
                    warn!(network = %net.id, peer = %publisher, error = %e, "IPAM ring merge refused: replicas disagree; investigate before allocating");
                }
                self.count_forged(net.id, &report.forged);
                // Free-space reports are not compared: advisory (they pick
                // donors), and each owner publishes its own.
                let relays = a
                    .ring()
                    .entries()
                    .iter()
                    .any(|e| !published.contains(&(e.block, e.owner, e.version)));
                if relays {
                    if let Err(e) = self.ipam.persist(net.id, a) {
                        warn!(network = %net.id, error = %e, "could not persist merged IPAM ring");
                        continue;
                    }
                    touched.push(net.id);
                }
            }
        }
        for id in touched {
            if let Err(e) = self.publish_ring(id).await {
                warn!(network = %id, error = %e, "could not publish IPAM ring");
            }
        }
    }

    /// Drops the allocators (and their files) of networks our own table
    /// holds a removal of: their space is never allocated again, and our
    /// ring view left the table with the record (`republish_networks`).
    /// Without this each removed network would cost every host that ever
    /// had an endpoint in it memory and a file for good.
    async fn forget_removed_networks(&self) {
        let mut nets = self.ipam.nets.lock().await;
        let gone: Vec<NetworkId> = {
            let store = self.store();
            nets.keys()
                .filter(|id| store.own().get(&key::removal(**id)).is_some())
                .copied()
                .collect()
        };
        for id in gone {
            nets.remove(&id);
            match persist::remove_durable(&self.ipam.path(id)) {
                Ok(()) => debug!(network = %id, "IPAM state of a removed network dropped"),
                Err(e) => {
                    warn!(network = %id, error = %e, "could not remove the IPAM state of a removed network")
                }
            }
        }
    }

    fn count_forged(&self, id: NetworkId, forged: &[(NodeId, crate::ipam::Refused)]) {
        let mut seen = self
            .ipam
            .forged_seen
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (publisher, r) in forged {
            if !seen.insert((id, *publisher, r.theirs.block, r.theirs.version)) {
                continue;
            }
            self.counters.inc(Counter::IpamForged);
            if let Some(suppressed) = FORGED_LOG.check(std::time::Instant::now()) {
                warn!(network = %id, peer = %publisher, writer = %r.theirs.proof.writer,
                      theirs = %r.theirs, ours = %r.ours, bad_signature = r.bad_proof, suppressed,
                      "forged IPAM ring entry refused: its writer had no authority over those addresses");
            }
        }
    }

    /// An address for endpoint `ep`: from our own ranges, else after a
    /// donation from a reachable owner with free space.
    pub(super) async fn allocate(
        &self,
        net: &NetworkView,
        ep: EndpointId,
        exact: Option<Ipv4Addr>,
    ) -> Result<Ipv4Addr, CoreError> {
        let mut granted = false;
        let r = self.allocate_with(net, ep, exact, &mut granted).await;
        // A grant accepted without an allocation to persist it with is
        // persisted and published on its own.
        if granted && r.is_err() {
            let persisted = {
                let nets = self.ipam.nets.lock().await;
                nets.get(&net.id)
                    .map_or(Ok(()), |a| self.ipam.persist(net.id, a))
            };
            match persisted {
                Ok(()) => {
                    if let Err(e) = self.publish_ring(net.id).await {
                        warn!(network = %net.id, error = %e, "could not publish IPAM ring");
                    }
                }
                Err(e) => {
                    warn!(network = %net.id, error = %e, "could not persist granted address space")
                }
            }
        }
        r
    }

    /// [`Core::allocate`]; `granted` is set once a donor's grant has been
    /// accepted (in memory: the allocation from it persists both in one
    /// write, ring and allocations together).
    async fn allocate_with(
        &self,
        net: &NetworkView,
        ep: EndpointId,
        exact: Option<Ipv4Addr>,
        granted: &mut bool,
    ) -> Result<Ipv4Addr, CoreError> {
        let name = net.name().to_string();
        let mut asked: Vec<String> = Vec::new();
        // A host that never held space in this network learns the ring
        // (and so the owners to ask) from the replicas first.
        let known = self
            .ipam
            .nets
            .lock()
            .await
            .get(&net.id)
            .is_some_and(|a| !a.ring().is_empty());
        if !known {
            self.merge_rings().await;
        }
        for round in 0..4u32 {
            let horizon = self.withdrawn_everywhere().await;
            let attempt = {
                let mut nets = self.ipam.nets.lock().await;
                let a = nets
                    .entry(net.id)
                    .or_insert_with(|| self.ipam.fresh(net.id));
                let ranges = serde_json::to_vec(a.ring().entries()).ok();
                a.release_quarantine(horizon);
                let r = match exact {
                    Some(ip) => a.allocate_exact(ip, ep).map(|()| ip),
                    None => a.allocate(ep),
                };
                if r.is_ok() {
                    self.ipam.persist(net.id, a)?;
                }
                let ranges_moved = serde_json::to_vec(a.ring().entries()).ok() != ranges;
                r.map(|ip| (ip, ranges_moved))
            };
            let donors: Vec<NodeId> = match attempt {
                Ok((ip, ranges_moved)) => {
                    // An allocation from ranges we already hold changes only
                    // our free-space report, which the reconciler publishes
                    // at most once a second (`publish_own_reports`): published
                    // here, it would be a second table version every peer
                    // pulls and reconciles before it acks the endpoint. New
                    // ranges are published (persisted with the allocation):
                    // peers check the endpoint's IP against them.
                    if ranges_moved || *granted {
                        self.publish_ring(net.id).await?;
                    }
                    return Ok(ip);
                }
                Err(AllocError::Exhausted) => return Err(CoreError::IpamExhausted(name)),
                Err(AllocError::InUse(other)) => {
                    return Err(CoreError::IpInUse(
                        exact.map(|i| i.to_string()).unwrap_or_default(),
                        other.short(),
                        name,
                    ));
                }
                Err(
                    e @ (AllocError::NotInPool | AllocError::Reserved | AllocError::Quarantined),
                ) => {
                    return Err(CoreError::BadIp(
                        exact.map(|i| i.to_string()).unwrap_or_default(),
                        e.to_string(),
                    ));
                }
                Err(AllocError::EndpointHasAddress(ip)) if exact.is_none_or(|e| e == ip) => {
                    return Ok(ip);
                }
                Err(AllocError::EndpointHasAddress(ip)) => {
                    return Err(CoreError::Ipam(
                        name,
                        format!("endpoint already holds {ip}"),
                    ));
                }
                Err(AllocError::OwnedBy(owner)) => vec![owner],
                Err(AllocError::NeedDonation { candidates }) => {
                    let mut c = candidates;
                    c.sort_by_key(|d| std::cmp::Reverse(d.1));
                    c.into_iter().map(|(n, _)| n).collect()
                }
                Err(AllocError::NoRangeOwned) => {
                    self.merge_rings().await;
                    let nets = self.ipam.nets.lock().await;
                    nets.get(&net.id).map(|a| a.owners()).unwrap_or_default()
                }
            };
            if donors.is_empty() {
                return Err(CoreError::IpamUnreachable(
                    name,
                    "no ring yet: no host owns address space of this network".into(),
                ));
            }
            if !self
                .ask_donors(net.id, &donors, exact, &mut asked, granted)
                .await?
            {
                // Every donor refused, but in an attach storm the space may
                // have come meanwhile: a concurrent attach here was granted
                // some, or another host now reports free space. Look again
                // (found by the 60-attach storm: h3's attaches failed with
                // "h1 is exhausted" while h3 held 12 fresh grants).
                tokio::time::sleep(Duration::from_millis(10 << round)).await;
            }
        }
        // The same refusal from every round is said once.
        let mut said = HashSet::new();
        asked.retain(|a| said.insert(a.clone()));
        Err(CoreError::IpamUnreachable(name, asked.join("; ")))
    }

    /// Asks each donor in turn; true once one granted space, accepted into
    /// our allocator in memory: the caller persists it with the allocation
    /// it makes from it, before the address or the ring goes anywhere.
    async fn ask_donors(
        &self,
        id: NetworkId,
        donors: &[NodeId],
        exact: Option<Ipv4Addr>,
        asked: &mut Vec<String>,
        granted: &mut bool,
    ) -> Result<bool, CoreError> {
        let (Some(membership), Some(channels)) =
            (self.cluster.membership().await, self.channels.get())
        else {
            return Err(CoreError::NotClustered);
        };
        let nodes = membership.nodes().await;
        let departed = departed_fn(nodes.clone(), self.store().replica_owners());
        for donor in donors {
            let Some(node) = nodes.iter().find(|n| n.id == *donor) else {
                asked.push(format!("{}: unknown host", donor.short()));
                continue;
            };
            if node.status != NodeStatus::Alive {
                asked.push(format!(
                    "{} ({}): {}",
                    node.name,
                    donor.short(),
                    node.status.as_str()
                ));
                continue;
            }
            let req = SpaceRequest {
                network_id: id.as_bytes().to_vec(),
                exact_ip: exact.map(|i| i.to_string()).unwrap_or_default(),
            };
            // Pinned to the donor's node id: only the donor can grant.
            let grant = match channels.request_space(node.gossip_addr, *donor, req).await {
                Ok(g) => g.grant_json,
                Err(e) => {
                    asked.push(format!("{} ({}): {e}", node.name, donor.short()));
                    continue;
                }
            };
            let Ok(grant) = serde_json::from_slice::<Grant>(&grant) else {
                asked.push(format!("{}: undecodable grant", node.name));
                continue;
            };
            // A replica that missed steps may not yet know the donor owns
            // what it gave: merge the views (the owners we know vouch for
            // the donor first-hand) and try once more.
            let mut accepted = Err(String::new());
            for attempt in 0..2 {
                if attempt == 1 {
                    self.merge_rings().await;
                }
                let mut nets = self.ipam.nets.lock().await;
                let a = nets.entry(id).or_insert_with(|| self.ipam.fresh(id));
                match a.accept(&grant, *donor, &departed) {
                    // Held in memory: the allocation from it persists both
                    // in one write (see `allocate`).
                    Ok(()) => {
                        accepted = Ok(());
                        break;
                    }
                    Err(e @ crate::ipam::AcceptError::Unauthorized(_)) => {
                        accepted = Err(e.to_string())
                    }
                    Err(e) => {
                        accepted = Err(e.to_string());
                        break;
                    }
                }
            }
            if let Err(e) = accepted {
                asked.push(format!("{}: grant refused: {e}", node.name));
                continue;
            }
            *granted = true;
            info!(network = %id, donor = %donor, "address space received");
            return Ok(true);
        }
        Ok(false)
    }

    /// Peer asked us for space: donate, persist, answer; our ring view is
    /// republished beside the answer, not before it: the recipient
    /// publishes the granted block with its first allocation from it, and
    /// a merge takes the higher version, so nothing waits for our view.
    pub async fn donate_space(
        self: &Arc<Self>,
        to: NodeId,
        network_id: &[u8],
        exact_ip: &str,
    ) -> Result<Vec<u8>, CoreError> {
        let id = <[u8; 16]>::try_from(network_id)
            .map(NetworkId::from_bytes)
            .map_err(|_| CoreError::NoNetwork("(malformed id)".into()))?;
        let want = match exact_ip {
            "" => Want::Half,
            ip => Want::Exact(
                ip.parse()
                    .map_err(|_| CoreError::BadIp(ip.into(), "not an IPv4 address".into()))?,
            ),
        };
        // An address detached here and asked for at once elsewhere (`--ip`
        // reuse) is free as soon as every live peer dropped its entries:
        // the quarantine is released here as on a local allocation.
        let horizon = self.withdrawn_everywhere().await;
        let grant = {
            let mut nets = self.ipam.nets.lock().await;
            let a = nets
                .get_mut(&id)
                .ok_or_else(|| CoreError::NoNetwork(id.short()))?;
            a.release_quarantine(horizon);
            let g = a
                .donate(DonationRequest { to, want })
                .map_err(|e| match e {
                    DonateError::NoSpace => CoreError::IpamExhausted(id.short()),
                    other => CoreError::Ipam(id.short(), other.to_string()),
                })?;
            // Persist before the grant leaves: the space is gone from our
            // free space on disk before anyone can use it.
            self.ipam.persist(id, a)?;
            g
        };
        info!(network = %id, to = %to, "address space donated");
        let core = self.clone();
        tokio::spawn(async move {
            if let Err(e) = core.publish_ring(id).await {
                warn!(network = %id, error = %e, "could not publish IPAM ring");
            }
        });
        serde_json::to_vec(&grant).map_err(|e| CoreError::Ipam(id.short(), e.to_string()))
    }

    /// Clean leave: hand every owned range to a live peer through the ring
    /// (the recipient adopts entries naming it when it merges our view).
    pub(super) async fn hand_off_space(&self) {
        let Some(m) = self.cluster.membership().await else {
            return;
        };
        let nodes = m.nodes().await;
        let Some(to) = nodes
            .iter()
            .find(|n| !n.is_self && n.status == NodeStatus::Alive)
            .map(|n| n.id)
        else {
            return;
        };
        let ids: Vec<NetworkId> = {
            let mut nets = self.ipam.nets.lock().await;
            let mut ids = Vec::new();
            for (id, a) in nets.iter_mut() {
                if a.ranges_of(self.ipam.me).is_empty() {
                    continue;
                }
                // Our endpoints are withdrawn, and peers drop everything of
                // ours when they see us leave: the quarantine has no one
                // left to protect.
                a.release_quarantine(u64::MAX);
                match a.hand_off_all(to) {
                    Ok(_) => match self.ipam.persist(*id, a) {
                        Ok(()) => ids.push(*id),
                        Err(e) => warn!(network = %id, error = %e, "could not persist hand-off"),
                    },
                    Err(e) => warn!(network = %id, error = %e, "address space not handed off"),
                }
            }
            ids
        };
        for id in &ids {
            let _ = self.publish_ring(*id).await;
        }
        if ids.is_empty() {
            return;
        }
        info!(to = %to, networks = ids.len(), "address space handed off; waiting for the recipient's ack");
        if self.await_hand_off_ack(to, &ids).await {
            info!(to = %to, "hand-off acknowledged");
        } else {
            warn!(to = %to, "hand-off not acknowledged in time; the recipient still adopts the ranges from any replica of our ring");
        }
    }

    /// The recipient acknowledges by publishing a ring in which it owns
    /// everything we handed it (it merged our view).
    async fn await_hand_off_ack(&self, to: NodeId, ids: &[NetworkId]) -> bool {
        let deadline = tokio::time::Instant::now() + HAND_OFF_ACK;
        loop {
            let mut acked = true;
            for id in ids {
                let ours = self
                    .ipam
                    .nets
                    .lock()
                    .await
                    .get(id)
                    .map(|a| a.ranges_of(to))
                    .unwrap_or_default();
                let theirs = self
                    .store()
                    .ipam_rings(*id)
                    .into_iter()
                    .find(|(p, _)| *p == to)
                    .and_then(|(_, json)| serde_json::from_slice::<Ring>(&json).ok())
                    .map(|r| r.ranges_of(to))
                    .unwrap_or_default();
                let covered = |b: &ipnetwork::Ipv4Network| {
                    theirs
                        .iter()
                        .any(|t| t.prefix() <= b.prefix() && t.contains(b.network()))
                };
                if !ours.iter().all(covered) {
                    acked = false;
                }
            }
            if acked {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            if let Some(ch) = self.channels.get() {
                self.pull_all(ch).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
