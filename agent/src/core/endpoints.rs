//! Endpoint commands: attach a namespace to a network, detach it, list the
//! cluster-wide MAC/IP/VTEP table, and withdraw endpoints whose namespace
//! vanished.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnetwork::{IpNetwork, Ipv4Network};
use ovl_proto::records::{EndpointRecord, table_entry::Value};
use tracing::{info, warn};

use super::{Core, CoreError, now_ms};
use crate::dataplane::{Dataplane, FarEnd, LocalEndpoint};
use crate::ids::{EndpointId, MacAddr, NetworkId};
use crate::membership::NodeStatus;
use crate::store::{EndpointView, key};

pub enum NetnsRef {
    Path(String),
    Pid(u32),
    /// The far end is left in the agent's own namespace for a runtime to
    /// move into `sandbox` (the container's namespace file, which does not
    /// exist yet when Docker asks: recorded, never opened here).
    HandOff {
        sandbox: String,
    },
}

pub struct AttachSpec {
    pub network: String,
    pub netns: NetnsRef,
    pub name: String,
    pub ip: String,
    pub mac: String,
    pub aliases: Vec<String>,
    pub ifname: String,
    /// An address reserved earlier by [`Core::reserve_address`] for this
    /// endpoint id (Docker's IPAM asks before the endpoint exists): used
    /// as is, and still reserved if the attach fails.
    pub reserved: Option<(EndpointId, Ipv4Addr)>,
}

/// Proof that the endpoint lock is held.
pub type EndpointGuard<'a> = tokio::sync::MutexGuard<'a, ()>;

pub struct EndpointInfo {
    pub view: EndpointView,
    pub network_name: String,
    pub node_name: String,
    /// alive | dead | left (the owner's status), or `refused: <reason>`
    /// for a row that fails the owner checks (never programmed).
    pub status: String,
    /// Attach only: live hosts of the network that had not confirmed
    /// programming the endpoint when the wait ran out.
    pub lagging: Vec<String>,
    /// Attach only: the network's embedded DNS resolver (its gateway
    /// address, served on every host), for the container's resolv.conf.
    pub resolver: Option<Ipv4Addr>,
}

fn valid_ifname(s: &str) -> bool {
    !s.is_empty() && s.len() <= 15 && !s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}

fn valid_name(s: &str) -> bool {
    crate::store::networks::validate_name(s).is_ok()
}

fn netns_path(r: &NetnsRef) -> Result<PathBuf, CoreError> {
    match r {
        NetnsRef::Path(p) if p.is_empty() => Err(CoreError::NetnsArgs),
        NetnsRef::Path(p) => Ok(PathBuf::from(p)),
        NetnsRef::Pid(0) => Err(CoreError::NetnsArgs),
        NetnsRef::Pid(pid) => Ok(PathBuf::from(format!("/proc/{pid}/ns/net"))),
        NetnsRef::HandOff { .. } => Ok(PathBuf::from(OWN_NETNS)),
    }
}

/// The agent's own network namespace, where a handed-off far end is made.
const OWN_NETNS: &str = "/proc/self/ns/net";

/// Resolves and checks the namespace an attach names, off the runtime
/// and before any lock is taken: a path that would block (a FIFO) or is
/// not a container's network namespace is refused with one clear line
/// and never delays other attaches and detaches (issue 8).
async fn checked_netns(r: &NetnsRef) -> Result<PathBuf, CoreError> {
    let path = netns_path(r)?;
    if let NetnsRef::HandOff { sandbox } = r {
        if sandbox.is_empty() {
            return Err(CoreError::NetnsArgs);
        }
        return Ok(path);
    }
    let pid = match r {
        NetnsRef::Pid(pid) => Some(*pid),
        NetnsRef::Path(_) | NetnsRef::HandOff { .. } => None,
    };
    let p = path.clone();
    let checked = tokio::task::spawn_blocking(move || {
        if let Some(pid) = pid
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            return Err(CoreError::NoPid(pid));
        }
        crate::dataplane::open_container(&p)
            .map(drop)
            .map_err(|why| CoreError::NetnsRefused(p.display().to_string(), why))
    })
    .await
    .map_err(|_| CoreError::Dataplane(crate::dataplane::DataplaneError::Worker))?;
    checked.map(|()| path)
}

impl Core {
    /// What an attach checks against the endpoints known: the name, the
    /// exact address and the MAC are free. With `ip` (the address it got)
    /// it returns the MAC to use.
    async fn attach_checks(
        &self,
        net: &crate::store::NetworkView,
        name: &str,
        exact: Option<Ipv4Addr>,
        mac_given: Option<MacAddr>,
        ip: Option<Ipv4Addr>,
    ) -> Result<Option<MacAddr>, CoreError> {
        let peers: Vec<EndpointView> = self
            .store()
            .endpoints()
            .into_iter()
            .filter(|e| e.network == net.id)
            .collect();
        if peers.iter().any(|e| e.name == name) {
            return Err(CoreError::EndpointExists(
                name.to_string(),
                net.name().to_string(),
            ));
        }
        if let Some(ip) = exact
            && let Some(e) = peers.iter().find(|e| e.ip == ip)
        {
            return Err(CoreError::IpInUse(
                ip.to_string(),
                e.name.clone(),
                net.name().to_string(),
            ));
        }
        // A MAC held by another endpoint would make every host send one of
        // the two endpoints' traffic to the other (DESIGN.md "Trust").
        let nodes = self.cluster.members().await;
        let mac_in_use = |mac: MacAddr| {
            peers.iter().find(|e| e.mac == mac).map(|e| {
                let node = nodes
                    .iter()
                    .find(|n| n.id == e.owner)
                    .map_or_else(|| e.owner.short(), |n| n.name.clone());
                CoreError::MacInUse(
                    mac.to_string(),
                    e.name.clone(),
                    node,
                    net.name().to_string(),
                )
            })
        };
        if let Some(err) = mac_given.and_then(mac_in_use) {
            return Err(err);
        }
        let Some(ip) = ip else {
            return Ok(None);
        };
        let mac = mac_given.unwrap_or_else(|| MacAddr::from_ipv4(ip));
        match mac_in_use(mac) {
            Some(err) => Err(err),
            None => Ok(Some(mac)),
        }
    }

    pub async fn attach(&self, spec: AttachSpec) -> Result<EndpointInfo, CoreError> {
        self.require_cluster().await?;
        let net = self.find_network_synced(&spec.network).await?;
        if let Some(reason) = &net.conflict {
            return Err(CoreError::Conflict(spec.network, reason.clone()));
        }
        let netns = match checked_netns(&spec.netns).await {
            Ok(p) => p,
            Err(e) => {
                if matches!(e, CoreError::NetnsRefused(..)) {
                    self.counters.inc(crate::metrics::Counter::NetnsRefused);
                    warn!(error = %e, "attach refused");
                }
                return Err(e);
            }
        };
        let ifname = if spec.ifname.is_empty() {
            "eth0".to_string()
        } else {
            spec.ifname.clone()
        };
        if !valid_ifname(&ifname) {
            return Err(CoreError::BadIfname(ifname));
        }
        if spec.aliases.len() > crate::store::bounds::MAX_ALIASES {
            return Err(CoreError::TooManyAliases(spec.aliases.len()));
        }
        for a in spec
            .aliases
            .iter()
            .chain((!spec.name.is_empty()).then_some(&spec.name))
        {
            if !valid_name(a) {
                return Err(CoreError::BadEndpointName(a.clone()));
            }
        }
        let mac_given: Option<MacAddr> = match spec.mac.as_str() {
            "" => None,
            m => Some(m.parse()?),
        };
        let exact: Option<Ipv4Addr> = match (spec.reserved, spec.ip.as_str()) {
            (Some((_, ip)), _) => Some(ip),
            (None, "") => None,
            (None, ip) => Some(self.check_exact_ip(&net, ip)?),
        };

        let id = match spec.reserved {
            Some((id, _)) => id,
            None => EndpointId::random(&self.rng).map_err(|_| CoreError::Random)?,
        };
        // A reserved address stays with its reservation when the attach
        // fails: its holder releases it.
        let own_address = spec.reserved.is_none();
        let name = if spec.name.is_empty() {
            id.short()
        } else {
            spec.name.clone()
        };
        // A name already taken fails before any address is taken.
        self.attach_checks(&net, &name, exact, mac_given, None)
            .await?;
        // Persist before effect: the address is ours on disk before anything
        // in the kernel or the cluster refers to it. Taken before the
        // endpoint lock: finding space may ask a peer for a donation
        // (RequestSpace), and no lock is held across a peer call (issue 8);
        // the IPAM's own lock keeps concurrent allocations apart.
        let ip = match spec.reserved {
            Some((_, ip)) => ip,
            None => self.allocate(&net, id, exact).await?,
        };
        let guard = self.endpoint_lock.lock().await;
        let mac = match self
            .attach_checks(&net, &name, exact, mac_given, Some(ip))
            .await
        {
            Ok(mac) => mac.unwrap_or_else(|| MacAddr::from_ipv4(ip)),
            Err(e) => {
                drop(guard);
                if own_address {
                    self.ipam.release(net.id, ip, 0).await;
                }
                return Err(e);
            }
        };
        let prefix = net.pool.subnet.prefix();
        // The underlay as it is now: this host's own path bounds the MTU.
        if let Err(e) = self.refresh_underlay().await {
            drop(guard);
            if own_address {
                self.ipam.release(net.id, ip, 0).await;
            }
            return Err(e);
        }
        let mtu = self.network_mtu(&net).await;
        let local = LocalEndpoint {
            id,
            netns: netns.clone(),
            ifname: ifname.clone(),
            mac,
            addr: IpNetwork::V4(
                Ipv4Network::new(ip, prefix)
                    .map_err(|e| CoreError::BadIp(ip.to_string(), e.to_string()))?,
            ),
            mtu,
            gateway: default_route(&net),
            far_end: match spec.netns {
                NetnsRef::HandOff { .. } => FarEnd::HandedOff,
                _ => FarEnd::Configured,
            },
        };
        if let Err(e) = self.program_attach(&net, &local).await {
            if own_address {
                self.ipam.release(net.id, ip, 0).await;
            }
            return Err(e);
        }
        let record = EndpointRecord {
            id: id.as_bytes().to_vec(),
            network_id: net.id.as_bytes().to_vec(),
            name: name.clone(),
            aliases: spec.aliases.clone(),
            ip: ip.to_string(),
            prefix_len: u32::from(prefix),
            mac: mac.to_string(),
            vtep: self.cluster.config().data_path_addr.to_string(),
            ifname,
            netns: match &spec.netns {
                NetnsRef::HandOff { sandbox } => sandbox.clone(),
                _ => netns.display().to_string(),
            },
            created_at_ms: now_ms(),
        };
        let written = std::time::Instant::now();
        let stored = {
            let mut s = self.store();
            s.put(&key::endpoint(id), Value::Endpoint(record.clone()))
                .map(|_| s.own().version())
        };
        // Persist before effect: the record is on disk before attach returns.
        let stored = match stored {
            Ok(v) => self.persisted().await.map(|()| v).inspect_err(|_| {
                let _ = self.store().delete(&key::endpoint(id));
            }),
            Err(e) => Err(e.into()),
        };
        let version = match stored {
            Ok(v) => v,
            Err(e) => {
                let _ = self.dataplane.detach(id).await;
                if own_address {
                    self.ipam.release(net.id, ip, 0).await;
                }
                return Err(e);
            }
        };
        self.notify();
        info!(network = %net.id, endpoint = %id, name = %name, ip = %ip, mac = %mac, netns = %netns.display(), "endpoint attached");
        let view = EndpointView::parse(self.cluster.node_id(), &record)
            .ok_or_else(|| CoreError::BadIp(ip.to_string(), "record did not round-trip".into()))?;
        // Released before waiting: the peers' passes do not need it, but
        // our own reconciler (and a concurrent attach here, which a peer's
        // attach may be waiting on) does.
        drop(guard);
        let lagging = self.wait_programmed(net.id, version).await;
        self.timings.attach_programmed(written.elapsed());
        Ok(EndpointInfo {
            view,
            network_name: net.name().to_string(),
            node_name: self.cluster.config().node_name.clone(),
            status: "alive".to_string(),
            lagging,
            resolver: Some(net.pool.gateway),
        })
    }

    /// Takes an address of `network` for an endpoint that does not exist
    /// yet (Docker's IPAM `RequestAddress` comes before `CreateEndpoint`
    /// and `Join`). Persisted like any allocation, under a fresh endpoint
    /// id that the later attach uses ([`AttachSpec::reserved`]). Returns
    /// the id, the address and the subnet's prefix length.
    pub async fn reserve_address(
        &self,
        network: &str,
        exact: Option<Ipv4Addr>,
    ) -> Result<(EndpointId, Ipv4Addr, u8), CoreError> {
        self.require_cluster().await?;
        let net = self.find_network_synced(network).await?;
        if let Some(reason) = &net.conflict {
            return Err(CoreError::Conflict(network.to_string(), reason.clone()));
        }
        let exact = match exact {
            Some(ip) => Some(self.check_exact_ip(&net, &ip.to_string())?),
            None => None,
        };
        if let Some(ip) = exact {
            self.attach_checks(&net, "", Some(ip), None, None).await?;
        }
        let id = EndpointId::random(&self.rng).map_err(|_| CoreError::Random)?;
        let ip = self.allocate(&net, id, exact).await?;
        info!(network = %net.id, endpoint = %id, ip = %ip, "address reserved");
        Ok((id, ip, net.pool.subnet.prefix()))
    }

    /// Gives back an address taken by [`Core::reserve_address`] that no
    /// endpoint used (an attached endpoint's address is freed by detach).
    pub async fn release_reserved(&self, network: &str, ip: Ipv4Addr) -> Result<(), CoreError> {
        let net = self.find_network(network)?;
        self.ipam.release(net.id, ip, 0).await;
        info!(network = %net.id, ip = %ip, "reserved address released");
        Ok(())
    }

    async fn program_attach(
        &self,
        net: &crate::store::NetworkView,
        ep: &LocalEndpoint,
    ) -> Result<(), CoreError> {
        let nodes = self.cluster.members().await;
        // The VXLAN device binds to the data-path interface: know it before
        // creating the device, or the next pass would see a mismatch.
        self.refresh_underlay().await?;
        let owners = self.owners_merged(&nodes, &[net.id]).await;
        let plan = self.plan(net, &nodes, &owners);
        self.dataplane.ensure_network(&plan).await?;
        self.dataplane.attach(net.vni, ep).await?;
        Ok(())
    }

    fn check_exact_ip(
        &self,
        net: &crate::store::NetworkView,
        ip: &str,
    ) -> Result<Ipv4Addr, CoreError> {
        let addr: Ipv4Addr = ip
            .parse()
            .map_err(|_| CoreError::BadIp(ip.to_string(), "not an IPv4 address".into()))?;
        let pool = &net.pool;
        if !pool.subnet.contains(addr) {
            return Err(CoreError::BadIp(
                ip.to_string(),
                format!("outside the subnet {}", pool.subnet),
            ));
        }
        if addr == pool.gateway || addr == pool.subnet.network() || addr == pool.subnet.broadcast()
        {
            return Err(CoreError::BadIp(
                ip.to_string(),
                "reserved (gateway, network or broadcast address)".into(),
            ));
        }
        Ok(addr)
    }

    /// Detaches a local endpoint; returns once the network's live hosts
    /// confirmed removing its entries (or the wait ran out: the names of
    /// those still behind come back).
    pub async fn detach(
        &self,
        network: &str,
        name: &str,
    ) -> Result<(EndpointId, Vec<String>), CoreError> {
        let net = self.find_network_synced(network).await?;
        let guard = self.endpoint_lock.lock().await;
        let ep = self.local_endpoint(&net, network, name).await?;
        let version = self.withdraw(&ep, "detached").await?;
        drop(guard);
        let lagging = self.wait_programmed(net.id, version).await;
        Ok((ep.id, lagging))
    }

    /// The endpoint `name` (or id) of `net`, which must live on this host.
    async fn local_endpoint(
        &self,
        net: &crate::store::NetworkView,
        network: &str,
        name: &str,
    ) -> Result<EndpointView, CoreError> {
        let found = self
            .store()
            .endpoints()
            .into_iter()
            .find(|e| e.network == net.id && (e.name == name || e.id.to_string() == name));
        let Some(ep) = found else {
            return Err(CoreError::NoEndpoint(name.to_string(), network.to_string()));
        };
        if ep.owner != self.cluster.node_id() {
            let owner = self
                .cluster
                .members()
                .await
                .into_iter()
                .find(|n| n.id == ep.owner)
                .map(|n| n.name);
            return Err(CoreError::NotLocal(
                name.to_string(),
                owner.unwrap_or_else(|| ep.owner.short()),
            ));
        }
        Ok(ep)
    }

    /// What of a local endpoint differs in the kernel from its attachment
    /// (empty: nothing). The kernel is only read.
    pub async fn check_endpoint(
        &self,
        network: &str,
        name: &str,
    ) -> Result<Vec<String>, CoreError> {
        let net = self.find_network_synced(network).await?;
        let ep = self.local_endpoint(&net, network, name).await?;
        let local = LocalEndpoint {
            id: ep.id,
            netns: PathBuf::from(&ep.record.netns),
            ifname: ep.record.ifname.clone(),
            mac: ep.mac,
            addr: IpNetwork::V4(
                Ipv4Network::new(ep.ip, ep.prefix_len)
                    .map_err(|e| CoreError::BadIp(ep.ip.to_string(), e.to_string()))?,
            ),
            mtu: self.network_mtu(&net).await,
            gateway: default_route(&net),
            far_end: FarEnd::Configured,
        };
        Ok(self.dataplane.endpoint_problems(net.vni, &local).await?)
    }

    /// Removes a local endpoint everywhere: record first (peers drop their
    /// entries), then the veth, then the address goes to quarantine.
    /// Returns the own-table version that deleted the record.
    async fn withdraw(&self, ep: &EndpointView, why: &str) -> Result<u64, CoreError> {
        let withdrawn_at = {
            let mut s = self.store();
            s.delete(&key::endpoint(ep.id))?;
            s.own().version()
        };
        self.persisted().await?;
        self.notify();
        if let Err(e) = self.dataplane.detach(ep.id).await {
            warn!(endpoint = %ep.id, error = %e, "removing the veth failed; the reconciler retries");
        }
        self.ipam.release(ep.network, ep.ip, withdrawn_at).await;
        info!(network = %ep.network, endpoint = %ep.id, name = %ep.name, ip = %ep.ip, reason = why, "endpoint withdrawn");
        Ok(withdrawn_at)
    }

    /// Withdraws local endpoints whose namespace is gone (the kernel deleted
    /// the veth pair with it: its host end is not in `host_ends`, the names
    /// of [`crate::dataplane::Inventory`]) or whose network was removed.
    /// The caller holds the endpoint lock (see `lock_endpoints`) and took
    /// `host_ends` under it.
    pub async fn withdraw_orphans(
        &self,
        _held: &EndpointGuard<'_>,
        host_ends: &std::collections::HashSet<String>,
    ) -> Result<usize, CoreError> {
        let me = self.cluster.node_id();
        let (mine, networks) = {
            let s = self.store();
            let mine: Vec<EndpointView> = s
                .endpoints()
                .into_iter()
                .filter(|e| e.owner == me)
                .collect();
            (mine, s.networks())
        };
        let mut n = 0;
        for ep in mine {
            let reason = match networks.iter().find(|v| v.id == ep.network) {
                None => "network removed".to_string(),
                // A network that lost a name/VNI clash is never programmed
                // (with a VNI clash it cannot be): its endpoints go, loudly.
                Some(v) if !v.is_active() => format!(
                    "network lost a clash to an older one: {}",
                    v.conflict.as_deref().unwrap_or_default()
                ),
                Some(_) if !host_ends.contains(&Dataplane::host_ifname(ep.id)) => {
                    "namespace or interface disappeared".to_string()
                }
                Some(_) => continue,
            };
            self.withdraw(&ep, &reason).await?;
            n += 1;
        }
        Ok(n)
    }

    /// Withdraws every local endpoint (clean leave).
    pub async fn withdraw_all(&self) -> Result<(), CoreError> {
        let me = self.cluster.node_id();
        let _guard = self.endpoint_lock.lock().await;
        let mine: Vec<EndpointView> = self
            .store()
            .endpoints()
            .into_iter()
            .filter(|e| e.owner == me)
            .collect();
        for ep in mine {
            self.withdraw(&ep, "node leaving").await?;
        }
        Ok(())
    }

    /// Holds off attach/detach while the reconciler changes devices.
    pub async fn lock_endpoints(&self) -> EndpointGuard<'_> {
        self.endpoint_lock.lock().await
    }

    pub async fn endpoints(&self, network: &str) -> Result<Vec<EndpointInfo>, CoreError> {
        let filter = match network {
            "" => None,
            n => Some(self.find_network_synced(n).await?.id),
        };
        let nodes = self.cluster.members().await;
        let (eps, nets) = {
            let s = self.store();
            (s.endpoints(), s.networks())
        };
        let ids: Vec<NetworkId> = nets
            .iter()
            .map(|n| n.id)
            .filter(|id| filter.is_none_or(|f| *id == f))
            .collect();
        let owners = self.owners(&nodes, &ids).await;
        let (_, refused) = crate::store::ownership::vet(
            eps.iter()
                .filter(|e| ids.contains(&e.network))
                .cloned()
                .collect(),
            &owners,
        );
        let mut out: Vec<EndpointInfo> = eps
            .into_iter()
            .filter(|e| filter.is_none_or(|f| e.network == f))
            .map(|view| {
                let node = nodes.iter().find(|n| n.id == view.owner);
                let refusal = refused
                    .iter()
                    .find(|(e, _)| e.id == view.id && e.owner == view.owner)
                    .map(|(_, r)| format!("refused: {r}"));
                EndpointInfo {
                    network_name: nets
                        .iter()
                        .find(|n| n.id == view.network)
                        .map(|n| n.name().to_string())
                        .unwrap_or_default(),
                    node_name: node.map(|n| n.name.clone()).unwrap_or_default(),
                    status: refusal.unwrap_or_else(|| {
                        match node.map(|n| n.status) {
                            Some(NodeStatus::Alive) => "alive",
                            Some(NodeStatus::Left) => "left",
                            _ => "dead",
                        }
                        .to_string()
                    }),
                    view,
                    lagging: Vec::new(),
                    resolver: None,
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.network_name, &a.view.name).cmp(&(&b.network_name, &b.view.name)));
        Ok(out)
    }
}

/// The next hop of an endpoint's default route: the network's gateway,
/// none on an `--internal` network (DESIGN.md, "Gateway and egress").
fn default_route(net: &crate::store::NetworkView) -> Option<std::net::IpAddr> {
    (!net.record.internal).then_some(std::net::IpAddr::V4(net.pool.gateway))
}
