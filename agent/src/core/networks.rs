//! Network commands: create, list, inspect, remove, and the desired kernel
//! plan of a network (shared by the reconciler and `ovlctl fdb`).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;

use ovl_proto::records::{NetworkRecord, NetworkRemoval, NetworkWitness, table_entry::Value};
use ring::rand::SecureRandom;
use tracing::{info, warn};

use super::{Core, CoreError, now_ms};
use crate::ids::{MacAddr, NetworkId, NodeId, Vni};
use crate::membership::NodeView;
use crate::metrics::{Counter, RateLimit};
use crate::planner::{self, NetworkMode, NetworkPlan};
use crate::store::networks::{self, NetworkError, NetworkView, PoolSpec};
use crate::store::ownership::{self, Owners};
use crate::store::{EndpointView, key};

/// Auto-assigned VNIs start above the range operators tend to pick by hand.
const AUTO_VNI_MIN: u32 = 4096;

#[derive(Debug, Default, Clone)]
pub struct CreateSpec {
    pub name: String,
    pub subnet: String,
    pub gateway: String,
    pub ip_range: String,
    pub vni: u64,
    pub mtu: u32,
    pub encrypted: bool,
    pub attachable: bool,
    pub internal: bool,
    pub labels: BTreeMap<String, String>,
}

pub struct NetworkInfo {
    pub view: NetworkView,
    pub mtu: planner::MtuChoice,
    /// The name of the host bounding the MTU (`mtu.limit.host`).
    pub limit_host: String,
    pub endpoints: usize,
}

pub struct PeerInfo {
    pub node: NodeId,
    pub name: String,
    pub vtep: String,
    pub status: &'static str,
    pub endpoints: usize,
    pub ranges: Vec<String>,
    pub data_path_mtu: u32,
}

/// One FDB, neighbour or flood entry as `ovlctl fdb` shows it:
/// (kind, mac, ip, vtep); the whole row identifies the entry.
type FdbEntry = (&'static str, String, String, String);

/// Desired and kernel entries alike, as comparable rows.
fn fdb_entries(
    fdb: &[(MacAddr, IpAddr)],
    neigh: &[(IpAddr, MacAddr)],
    flood: &[IpAddr],
) -> BTreeSet<FdbEntry> {
    let fdb = fdb
        .iter()
        .map(|(mac, vtep)| ("fdb", mac.to_string(), String::new(), vtep.to_string()));
    let neigh = neigh
        .iter()
        .map(|(ip, mac)| ("neigh", mac.to_string(), ip.to_string(), String::new()));
    let flood = flood.iter().map(|v| {
        (
            "flood",
            MacAddr([0; 6]).to_string(),
            String::new(),
            v.to_string(),
        )
    });
    fdb.chain(neigh).chain(flood).collect()
}

pub struct FdbRow {
    pub kind: &'static str,
    pub mac: String,
    pub ip: String,
    pub vtep: String,
    pub state: &'static str,
}

impl Core {
    pub async fn network_create(&self, spec: CreateSpec) -> Result<NetworkInfo, CoreError> {
        self.require_cluster().await?;
        networks::validate_name(&spec.name)?;
        networks::validate_mtu(spec.mtu)?;
        networks::validate_labels(&spec.labels)?;
        let requested_vni = match spec.vni {
            0 => None,
            v => Some(Vni::new(v).map_err(|e| NetworkError::BadVni(e.to_string()))?),
        };
        let existing = self.store().networks();
        let active: Vec<&NetworkView> = existing.iter().filter(|n| n.is_active()).collect();
        if active.iter().any(|n| n.name() == spec.name) {
            return Err(CoreError::NameTaken(spec.name));
        }
        let pool = self.choose_pool(&spec, &active)?;
        let vni = match requested_vni {
            Some(v) => {
                if let Some(n) = active.iter().find(|n| n.vni == v) {
                    return Err(CoreError::VniTaken(v, n.name().to_string()));
                }
                v
            }
            None => self.pick_vni(&active)?,
        };
        let id = NetworkId::random(&self.rng).map_err(|_| CoreError::Random)?;
        let record = NetworkRecord {
            id: id.as_bytes().to_vec(),
            name: spec.name.clone(),
            vni: vni.get(),
            subnet: pool.subnet.to_string(),
            gateway: pool.gateway.to_string(),
            ip_range: pool.ip_range.map(|r| r.to_string()).unwrap_or_default(),
            mtu: spec.mtu,
            // The mode is part of the definition: fixed here, replicated
            // with it, and a second creation of the name in another mode
            // is a clash like any other (`store::networks::resolve`).
            encrypted: spec.encrypted,
            attachable: spec.attachable,
            internal: spec.internal,
            labels: spec.labels,
            created_at_ms: now_ms(),
            creator: self.cluster.node_id().as_bytes().to_vec(),
        };
        // The creating host owns the whole pool: persisted before the
        // network becomes visible, so no one can allocate from it first.
        self.ipam.create(id, &pool).await?;
        self.publish_ring(id).await?;
        {
            // We are its first witness: seen at creation.
            let mut s = self.store();
            s.put(
                &key::witness(id),
                Value::Witness(NetworkWitness {
                    network_id: id.as_bytes().to_vec(),
                    first_seen_ms: record.created_at_ms,
                }),
            )?;
            s.put(&key::network(id), Value::Network(record))?;
        }
        self.persisted().await?;
        self.notify();
        let mode = if spec.encrypted {
            NetworkMode::Encrypted
        } else {
            NetworkMode::Plain
        };
        info!(network = %id, name = %spec.name, vni = %vni, subnet = %pool.subnet, %mode, "network created");
        self.network_info(&id.to_string()).await
    }

    fn choose_pool(
        &self,
        spec: &CreateSpec,
        active: &[&NetworkView],
    ) -> Result<PoolSpec, CoreError> {
        if !spec.subnet.is_empty() {
            return Ok(networks::validate_pool(
                &spec.subnet,
                &spec.gateway,
                &spec.ip_range,
            )?);
        }
        if !spec.gateway.is_empty() || !spec.ip_range.is_empty() {
            return Err(NetworkError::NeedsSubnet.into());
        }
        let used: Vec<_> = active.iter().map(|n| n.pool.subnet).collect();
        let subnet = networks::pick_subnet(self.default_pool, &used, 24)
            .ok_or_else(|| CoreError::PoolExhausted(self.default_pool.to_string()))?;
        Ok(networks::validate_pool(&subnet.to_string(), "", "")?)
    }

    /// A random free VNI: random rather than "next", so two hosts creating
    /// concurrently on both sides of a partition rarely clash.
    fn pick_vni(&self, active: &[&NetworkView]) -> Result<Vni, CoreError> {
        let used: HashSet<u32> = active.iter().map(|n| n.vni.get()).collect();
        for _ in 0..64 {
            let mut b = [0u8; 4];
            self.rng.fill(&mut b).map_err(|_| CoreError::NoVni)?;
            let v = AUTO_VNI_MIN + u32::from_be_bytes(b) % (Vni::MAX - AUTO_VNI_MIN + 1);
            if !used.contains(&v) {
                return Vni::new(u64::from(v)).map_err(|_| CoreError::NoVni);
            }
        }
        Err(CoreError::NoVni)
    }

    /// Like `find_network`, but a miss first pulls from every live peer:
    /// a network created on another host a moment ago may not have reached
    /// us yet.
    pub async fn find_network_synced(&self, name: &str) -> Result<NetworkView, CoreError> {
        match self.find_network(name) {
            Err(CoreError::NoNetwork(_)) => {
                if let Some(ch) = self.channels.get() {
                    self.pull_all(ch).await;
                }
                self.find_network(name)
            }
            other => other,
        }
    }

    /// Looks a network up by name, or by id (full or unambiguous prefix).
    pub fn find_network(&self, name: &str) -> Result<NetworkView, CoreError> {
        let all = self.store().networks();
        if let Some(n) = all.iter().find(|n| n.name() == name && n.is_active()) {
            return Ok(n.clone());
        }
        let by_id: Vec<&NetworkView> = all
            .iter()
            .filter(|n| name.len() >= 6 && n.id.to_string().starts_with(name))
            .collect();
        match by_id.as_slice() {
            [one] => Ok((*one).clone()),
            _ => match all.iter().find(|n| n.name() == name) {
                Some(n) => Ok(n.clone()),
                None => Err(CoreError::NoNetwork(name.to_string())),
            },
        }
    }

    pub async fn network_info(&self, name: &str) -> Result<NetworkInfo, CoreError> {
        let view = self.find_network_synced(name).await?;
        let nodes = self.cluster.members().await;
        let endpoints = self.store().endpoints();
        Ok(self.info_of(view, &endpoints, &nodes))
    }

    fn info_of(
        &self,
        view: NetworkView,
        endpoints: &[EndpointView],
        nodes: &[NodeView],
    ) -> NetworkInfo {
        let mtu = planner::mtu_choice(
            &view,
            endpoints,
            nodes,
            &self.planner_host(),
            planner::Including::MembersOnly,
        );
        let limit_host = nodes
            .iter()
            .find(|n| n.id == mtu.limit.host)
            .map_or_else(|| mtu.limit.host.short(), |n| n.name.clone());
        NetworkInfo {
            endpoints: endpoints.iter().filter(|e| e.network == view.id).count(),
            view,
            mtu,
            limit_host,
        }
    }

    pub async fn network_list(&self) -> Vec<NetworkInfo> {
        let nodes = self.cluster.members().await;
        let (nets, eps) = {
            let s = self.store();
            (s.networks(), s.endpoints())
        };
        nets.into_iter()
            .map(|view| self.info_of(view, &eps, &nodes))
            .collect()
    }

    /// Per-host view of a network: who has endpoints in it and which
    /// address ranges each host owns.
    pub async fn network_peers(&self, view: &NetworkView) -> Vec<PeerInfo> {
        let nodes = self.cluster.members().await;
        let eps = self.store().endpoints();
        let ranges = self.ipam.ranges_by_owner(view.id).await;
        let mut ids: BTreeSet<NodeId> = eps
            .iter()
            .filter(|e| e.network == view.id)
            .map(|e| e.owner)
            .collect();
        ids.extend(ranges.keys().copied());
        ids.into_iter()
            .map(|id| {
                let node = nodes.iter().find(|n| n.id == id);
                PeerInfo {
                    node: id,
                    name: node.map(|n| n.name.clone()).unwrap_or_default(),
                    vtep: node.map(|n| n.data_path_addr.clone()).unwrap_or_default(),
                    status: node.map_or("unknown", |n| n.status.as_str()),
                    endpoints: eps
                        .iter()
                        .filter(|e| e.network == view.id && e.owner == id)
                        .count(),
                    ranges: ranges.get(&id).cloned().unwrap_or_default(),
                    data_path_mtu: node.map_or(0, |n| n.data_path_mtu),
                }
            })
            .collect()
    }

    pub async fn network_remove(&self, name: &str, force: bool) -> Result<NetworkId, CoreError> {
        self.require_cluster().await?;
        let view = self.find_network_synced(name).await?;
        let eps: Vec<EndpointView> = self
            .store()
            .endpoints()
            .into_iter()
            .filter(|e| e.network == view.id)
            .collect();
        if !eps.is_empty() && !force {
            let members = self.cluster.members().await;
            let nodes: BTreeSet<String> = eps
                .iter()
                .map(|e| match members.iter().find(|n| n.id == e.owner) {
                    Some(n) => n.name.clone(),
                    None => e.owner.short(),
                })
                .collect();
            return Err(CoreError::InUse {
                name: name.to_string(),
                count: eps.len(),
                nodes: nodes.into_iter().collect::<Vec<_>>().join(", "),
            });
        }
        {
            let mut s = self.store();
            s.put(
                &key::removal(view.id),
                Value::Removal(NetworkRemoval {
                    network_id: view.id.as_bytes().to_vec(),
                    removed_at_ms: now_ms(),
                }),
            )?;
            s.delete(&key::network(view.id))?;
            s.delete(&key::witness(view.id))?;
            s.delete(&key::ipam(view.id))?;
        }
        self.persisted().await?;
        self.notify();
        info!(network = %view.id, name = %view.name(), force, endpoints = eps.len(), "network removed");
        Ok(view.id)
    }

    /// The network's one MTU with this host in it (see
    /// [`planner::mtu_choice`]).
    pub async fn network_mtu(&self, view: &NetworkView) -> u32 {
        let nodes = self.cluster.members().await;
        let endpoints = self.store().endpoints();
        let host = self.planner_host();
        planner::mtu_choice(
            view,
            &endpoints,
            &nodes,
            &host,
            planner::Including::ThisHost,
        )
        .mtu
    }

    /// This host, as the planner needs it.
    fn planner_host(&self) -> planner::Host {
        planner::Host {
            me: self.cluster.node_id(),
            local_vtep: self.cluster.config().data_path_addr,
            underlay_mtu: self.underlay_mtu(),
        }
    }

    fn underlay_mtu(&self) -> u32 {
        self.underlay.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What this host knows about owners, for vetting endpoint rows of
    /// `networks` (see `store::ownership`).
    pub async fn owners(&self, nodes: &[NodeView], networks: &[NetworkId]) -> Owners {
        let mut owners = Owners::default();
        for n in nodes {
            if let Ok(ip) = n.data_path_addr.parse() {
                owners.vteps.insert(n.id, ip);
            }
        }
        for &id in networks {
            owners
                .ranges
                .insert(id, self.ipam.blocks_by_owner(id).await);
        }
        owners
    }

    /// [`Core::owners`], after merging the peers' IPAM rings first if a row
    /// of `networks` lies outside every range known here: its owner may
    /// just have been granted the space, and refusing the row until the
    /// next merge would leave it unprogrammed when this host acks.
    pub async fn owners_merged(&self, nodes: &[NodeView], networks: &[NetworkId]) -> Owners {
        let owners = self.owners(nodes, networks).await;
        let eps: Vec<EndpointView> = self
            .store()
            .endpoints()
            .into_iter()
            .filter(|e| networks.contains(&e.network))
            .collect();
        let stale = ownership::vet(eps, &owners)
            .1
            .iter()
            .any(|(_, r)| *r == ownership::Refusal::OutsideRanges);
        if !stale {
            return owners;
        }
        self.merge_rings().await;
        self.owners(nodes, networks).await
    }

    /// Counts and reports endpoint rows the owner checks refused, once
    /// per row (not once per reconcile pass).
    fn note_refused(&self, refused: &[(EndpointView, ownership::Refusal)]) {
        if refused.is_empty() {
            return;
        }
        let mut seen = self.refused_seen.lock().unwrap_or_else(|e| e.into_inner());
        for (e, why) in refused {
            if !seen.insert((e.owner, e.id)) {
                continue;
            }
            self.counters.inc(Counter::RecordsRefused);
            if let Some(suppressed) = REFUSED_LOG.check(std::time::Instant::now()) {
                warn!(network = %e.network, endpoint = %e.id, peer = %e.owner, ip = %e.ip, mac = %e.mac,
                      vtep = %e.vtep, reason = %why, suppressed, "endpoint record refused: never programmed");
            }
        }
    }

    /// What this host should carry for `view`: the planner's plan from the
    /// store's endpoint rows (refused rows are counted here).
    pub fn plan(&self, view: &NetworkView, nodes: &[NodeView], owners: &Owners) -> NetworkPlan {
        let endpoints = self.store().endpoints();
        let planned = planner::plan(view, &endpoints, nodes, owners, &self.planner_host());
        self.note_refused(&planned.refused);
        planned.plan
    }

    /// Desired entries next to the kernel's, for `ovlctl fdb`.
    pub async fn fdb(&self, name: &str) -> Result<(bool, Vec<FdbRow>), CoreError> {
        let view = self.find_network_synced(name).await?;
        let nodes = self.cluster.members().await;
        let me = self.cluster.node_id();
        let local = self
            .store()
            .endpoints()
            .iter()
            .any(|e| e.network == view.id && e.owner == me);
        let owners = self.owners_merged(&nodes, &[view.id]).await;
        let plan = self.plan(&view, &nodes, &owners);
        let kernel = self.dataplane.kernel_view(plan.mode, view.vni).await?;
        let fdb: Vec<_> = plan.remotes.iter().map(|r| (r.mac, r.vtep)).collect();
        let neigh: Vec<_> = plan.remotes.iter().map(|r| (r.ip, r.mac)).collect();
        let flood: Vec<_> = plan.peers.iter().map(|p| p.vtep).collect();
        let want = fdb_entries(&fdb, &neigh, &flood);
        let have = fdb_entries(&kernel.fdb, &kernel.neigh, &kernel.flood);
        let row = |(kind, mac, ip, vtep): &FdbEntry, state| FdbRow {
            kind,
            mac: mac.clone(),
            ip: ip.clone(),
            vtep: vtep.clone(),
            state,
        };
        let rows = want
            .iter()
            .map(|e| row(e, if have.contains(e) { "ok" } else { "missing" }))
            .chain(have.difference(&want).map(|e| row(e, "extra")))
            .collect();
        Ok((local, rows))
    }
}

static REFUSED_LOG: RateLimit = RateLimit::new(std::time::Duration::from_secs(10));
