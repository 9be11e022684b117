//! The data plane: what plain and encrypted networks share (the `shared`
//! part: per network a bridge, per local endpoint a veth pair) and, behind
//! the [`Vtep`] trait, what carries a network's frames between hosts: the
//! kernel VXLAN device for plain networks (`vxlan/`), the userspace
//! encrypted VTEP for encrypted ones (`encrypted/`; written elsewhere and
//! handed in with [`Dataplane::set_vtep`]). DESIGN.md, "Plain data plane
//! (kernel)" and "Encrypted data plane".
//!
//! File roles: this file holds the types, names, constants, the error and
//! the registry of open sandboxes; `sandbox.rs` making, adopting and
//! removing a sandbox; `vtep.rs` the VTEP interface; `shared/network.rs`
//! the bridge, gateway and per-network operations, dispatching to the
//! network's VTEP by the plan's mode; `shared/endpoint.rs` the veth pairs;
//! `shared/egress.rs` the way out (with the pure `transit.rs` and
//! `firewall.rs`); `shared/names.rs` the pure naming rules; `netlink.rs` (links, addresses) and `netns.rs` (sockets in
//! other namespaces) the OS edge both parts use. `vxlan/` holds the kernel
//! VTEP: `plan.rs` is its pure diff (desired vs kernel, unit-tested without
//! root), `fdb.rs` its FDB and neighbour tables, `miss.rs` its
//! l2miss/l3miss notifications, `mod.rs` the device and the wiring.
//!
//! Each network's devices live in its sandbox (`sandbox.rs`): a network
//! namespace of its own, bind-mounted under the sandbox directory, holding
//! the bridge with the gateway address, the VTEP device and the host ends
//! of the veths. The `Dataplane`'s own netlink socket speaks in the host
//! namespace (the agent's, or the one given to [`Dataplane::new_in`]): the
//! underlay, the VXLAN devices' creation (their UDP sockets stay there)
//! and each network's egress transit (`shared/egress.rs`). So the host's
//! firewall never sees bridged overlay frames, networks with overlapping
//! subnets coexist, and two networks only meet if something routes
//! between sandboxes, which the host's filter table forbids.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rtnetlink::Handle;

use crate::ids::{EndpointId, MacAddr, Vni};
pub use crate::planner::{NetworkMode, NetworkPlan, PeerHost, RemoteEndpoint};
pub use netns::{NsRefusal, open_container};
pub use sandbox::Sandbox;
pub use vtep::Vtep;
pub use vxlan::miss::{Miss, Misses};
pub use vxlan::{VxlanConfig, VxlanVtep};

mod commands;
pub mod encrypted;
mod netlink;
mod netns;
pub mod sandbox;
mod shared;
mod vtep;
pub mod vxlan;

/// Prefix of a network's bridge: `ovlbr-<vni>` (at most 14 bytes).
pub const BRIDGE_PREFIX: &str = "ovlbr-";
/// Prefix of the host end of an endpoint's veth pair: `ovl` + 8 hex digits.
pub const HOST_IF_PREFIX: &str = "ovl";
/// Written to the host veth end's alias, so a bridge that was deleted and
/// recreated gets its ports back (`ovl vni=<vni> ep=<id>`).
const ALIAS_PREFIX: &str = "ovl vni=";

/// A local endpoint: the container side of a veth pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEndpoint {
    pub id: EndpointId,
    /// The container's network namespace, e.g. `/proc/PID/ns/net` or
    /// `/run/netns/NAME`.
    pub netns: PathBuf,
    /// Interface name inside the container, e.g. `eth0`.
    pub ifname: String,
    pub mac: MacAddr,
    pub addr: ipnetwork::IpNetwork,
    pub mtu: u32,
    /// The default route's next hop (the network's gateway); `None` for
    /// `--internal` networks, which have no route out.
    pub gateway: Option<IpAddr>,
    pub far_end: FarEnd,
}

/// Who configures the container end of an endpoint's veth pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FarEnd {
    /// ovl: address, MTU, MAC, default route and `lo`, inside `netns`.
    Configured,
    /// The container runtime: the far end is created in `netns` (the
    /// agent's own namespace) with only its MAC and MTU set, and the
    /// runtime moves it into the container and configures it there
    /// (Docker's remote driver `Join`, RUNTIMES.md).
    HandedOff,
}

/// What a network's VTEP holds (for `ovlctl fdb` and tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelView {
    /// Unicast entries: MAC → remote VTEP.
    pub fdb: Vec<(MacAddr, IpAddr)>,
    /// Neighbour (ARP) entries: IP → MAC.
    pub neigh: Vec<(IpAddr, MacAddr)>,
    /// Broadcast destinations (VXLAN: all-zero-MAC flood entries).
    pub flood: Vec<IpAddr>,
    /// The network's bridge exists.
    pub bridge: bool,
    /// The network's VTEP device exists.
    pub vtep: bool,
}

/// What the data plane holds, for a reconcile pass: one link dump and each
/// VTEP's own account.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    /// Names of the links named like endpoints' host ends (`ovl` + 8 hex).
    pub host_ends: HashSet<String>,
    /// VNIs that have a bridge or a device of some VTEP, sorted.
    pub networks: Vec<Vni>,
    /// Per mode, the VNIs its VTEP holds a device for (`Vtep::present`).
    pub vteps: Vec<(NetworkMode, Vec<Vni>)>,
}

/// What one `ensure_network` changed. All zero when the kernel already
/// matched the plan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Entries added or replaced (FDB, flood, neighbour) and bridge ports
    /// put back.
    pub added: usize,
    /// Entries deleted.
    pub removed: usize,
    /// Devices created or recreated (bridge, VTEP device).
    pub created_devices: usize,
}

impl ReconcileReport {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Failure of a data-plane operation.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// A netlink request failed; `what` names the operation and object.
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        source: rtnetlink::Error,
    },
    /// The netlink socket (or its worker thread) could not be created.
    #[error("netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("network namespace {} does not exist", path.display())]
    NamespaceMissing { path: PathBuf },
    #[error("cannot enter network namespace {}: {source}", path.display())]
    NamespaceEnter {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("interface {ifname:?} already exists in namespace {}", netns.display())]
    IfnameTaken { netns: PathBuf, ifname: String },
    #[error("invalid interface name {0:?}: 1 to 15 bytes, no '/', ':' or whitespace")]
    BadIfname(String),
    #[error("network with VNI {0} has no bridge on this host: ensure_network first")]
    NetworkMissing(Vni),
    #[error("no interface holds the data-path address {0}")]
    UnderlayNotFound(IpAddr),
    /// A network of this mode cannot be carried: this agent runs no VTEP
    /// for it.
    #[error(
        "network with VNI {vni} is {mode}, and this host has no {mode} data plane (VTEP) configured"
    )]
    NoVtep { vni: Vni, mode: NetworkMode },
    /// The VTEP (e.g. the userspace engine) failed; `what` names the
    /// operation.
    #[error("{mode} VTEP: {what}")]
    Vtep { mode: NetworkMode, what: String },
    /// The kernel's answer lacked something it must contain.
    #[error("unexpected kernel reply: {0}")]
    KernelReply(String),
    #[error("namespace worker thread ended without an answer")]
    Worker,
    /// A network's sandbox namespace could not be made, opened or removed.
    #[error("network sandbox {}: {what}: {source}", path.display())]
    Sandbox {
        path: PathBuf,
        what: String,
        source: std::io::Error,
    },
    /// Setting up or removing a network's egress (sysctl, nft, iptables).
    #[error("egress: {what}: {source}")]
    Egress {
        what: String,
        source: std::io::Error,
    },
    /// nft or iptables could not run, or refused what it was given.
    #[error("firewall: {what}: {source}")]
    Firewall {
        what: String,
        source: std::io::Error,
    },
    /// A sysctl could not be read or set.
    #[error("sysctl {key}: {what}: {source}")]
    Sysctl {
        key: String,
        what: String,
        source: std::io::Error,
    },
}

/// Where the data plane keeps networks' sandboxes and what it needs to
/// make them.
#[derive(Debug, Clone)]
pub struct DataplaneConfig {
    pub vxlan: VxlanConfig,
    /// Directory of the sandboxes' namespace files (`--sandbox-dir`,
    /// default `/run/netns`).
    pub sandbox_dir: PathBuf,
    /// Host-local pool of the sandboxes' egress transit /31s.
    pub transit_pool: ipnetwork::Ipv4Network,
    /// How often the egress firewall is checked for rules removed from
    /// outside (a firewall reload, `iptables -F`, `nft flush ruleset`).
    pub firewall_recheck: std::time::Duration,
}

/// `--firewall-recheck`'s default.
pub const DEFAULT_FIREWALL_RECHECK: std::time::Duration = std::time::Duration::from_secs(30);

impl DataplaneConfig {
    /// The defaults, with sandboxes in `sandbox_dir`.
    pub fn new(sandbox_dir: PathBuf) -> Self {
        Self {
            vxlan: VxlanConfig::default(),
            sandbox_dir,
            transit_pool: shared::transit::DEFAULT_POOL,
            firewall_recheck: DEFAULT_FIREWALL_RECHECK,
        }
    }
}

/// Misses of every sandbox's VXLAN device, tagged with the network.
pub type MissReceiver = futures::channel::mpsc::UnboundedReceiver<(Vni, Miss)>;
type MissSender = futures::channel::mpsc::UnboundedSender<(Vni, Miss)>;

/// The data plane, speaking netlink in one network namespace: the shared
/// part (bridges, veths) itself, the carriage between hosts through one
/// [`Vtep`] per network mode.
pub struct Dataplane {
    handle: Handle,
    _conn: netns::ConnTask,
    /// Serialises mutations: an attach and a reconcile pass must not both
    /// create the same device. VTEP calls run under it too.
    lock: tokio::sync::Mutex<()>,
    /// Counts changes of networks' devices and entries (see
    /// [`Dataplane::generation`]).
    generation: AtomicU64,
    /// The kernel VXLAN VTEP (plain networks), also for its own settings
    /// (underlay device) and its miss notifications.
    vxlan: Arc<VxlanVtep>,
    /// One VTEP per mode; `None`: networks of that mode are refused
    /// ([`DataplaneError::NoVtep`]).
    plain: Arc<dyn Vtep>,
    encrypted: Option<Arc<dyn Vtep>>,
    sandbox_dir: PathBuf,
    transit_pool: ipnetwork::Ipv4Network,
    firewall_recheck: std::time::Duration,
    /// The namespace of `handle` when it is not the agent's own (tests
    /// playing hosts): child processes (nft, iptables) enter it.
    host_ns: Option<PathBuf>,
    /// Open sandboxes (opened lazily: adopted after a restart).
    sandboxes: std::sync::Mutex<std::collections::BTreeMap<Vni, Arc<Sandbox>>>,
    misses_tx: MissSender,
    misses_rx: std::sync::Mutex<Option<MissReceiver>>,
}

impl Dataplane {
    /// Netlink in the namespace of the calling thread (the agent's own).
    pub async fn new(cfg: DataplaneConfig) -> Result<Self, DataplaneError> {
        let (handle, conn) = netns::connect_here()?;
        Ok(Self::with(handle, conn, cfg, None))
    }

    /// Netlink in the namespace at `netns` (e.g. `/run/netns/h1`): the
    /// socket is opened on a short-lived thread that entered it; the caller's
    /// threads never change namespace. Used by tests that play several
    /// hosts in one process, and usable for a per-network namespace.
    pub async fn new_in(netns: &Path, cfg: DataplaneConfig) -> Result<Self, DataplaneError> {
        let (handle, conn) = netns::connect_in(netns).await?;
        Ok(Self::with(handle, conn, cfg, Some(netns.to_owned())))
    }

    fn with(
        handle: Handle,
        conn: netns::ConnTask,
        cfg: DataplaneConfig,
        host_ns: Option<PathBuf>,
    ) -> Self {
        let vxlan = Arc::new(VxlanVtep::new(handle.clone(), cfg.vxlan));
        let (misses_tx, rx) = futures::channel::mpsc::unbounded();
        Self {
            sandbox_dir: cfg.sandbox_dir,
            transit_pool: cfg.transit_pool,
            firewall_recheck: cfg.firewall_recheck,
            host_ns,
            sandboxes: Default::default(),
            misses_tx,
            misses_rx: std::sync::Mutex::new(Some(rx)),
            handle,
            _conn: conn,
            lock: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
            plain: vxlan.clone(),
            vxlan,
            encrypted: None,
        }
    }

    /// Installs the VTEP that carries networks of `mode` (before the data
    /// plane is shared). The plain one is the kernel VXLAN VTEP by default.
    pub fn set_vtep(&mut self, mode: NetworkMode, vtep: Arc<dyn Vtep>) {
        match mode {
            NetworkMode::Plain => self.plain = vtep,
            NetworkMode::Encrypted => self.encrypted = Some(vtep),
        }
    }

    /// The VTEP of `mode`, if this host runs one.
    pub fn vtep(&self, mode: NetworkMode) -> Option<&Arc<dyn Vtep>> {
        match mode {
            NetworkMode::Plain => Some(&self.plain),
            NetworkMode::Encrypted => self.encrypted.as_ref(),
        }
    }

    /// The configured VTEPs with their modes.
    fn vteps(&self) -> impl Iterator<Item = (NetworkMode, &Arc<dyn Vtep>)> {
        NetworkMode::ALL
            .into_iter()
            .filter_map(|m| self.vtep(m).map(|v| (m, v)))
    }

    /// The netlink handle of this data plane's namespace.
    pub fn netlink(&self) -> Handle {
        self.handle.clone()
    }

    /// The miss notifications of every sandbox's devices, tagged with the
    /// network's VNI. `None` after the first call: one consumer.
    pub fn take_misses(&self) -> Option<MissReceiver> {
        self.misses_rx.lock().ok()?.take()
    }

    /// Where the sandbox of `vni` lives.
    pub fn sandbox_path(&self, vni: Vni) -> PathBuf {
        sandbox::path_of(&self.sandbox_dir, vni)
    }

    /// Network `vni`'s open sandbox, if it has one on this host.
    pub(crate) async fn sandbox(&self, vni: Vni) -> Result<Option<Arc<Sandbox>>, DataplaneError> {
        if let Some(sb) = self.cached_sandbox(vni) {
            return Ok(Some(sb));
        }
        match Sandbox::open(&self.sandbox_dir, vni).await? {
            Some(sb) => Ok(Some(self.register(sb).await)),
            None => Ok(None),
        }
    }

    /// Network `vni`'s open sandbox, made first if it has none.
    pub(crate) async fn sandbox_or_make(&self, vni: Vni) -> Result<Arc<Sandbox>, DataplaneError> {
        if let Some(sb) = self.cached_sandbox(vni) {
            return Ok(sb);
        }
        let sb = Sandbox::open_or_make(&self.sandbox_dir, vni).await?;
        Ok(self.register(sb).await)
    }

    /// The registry's sandbox of `vni`, unless someone unmounted it.
    fn cached_sandbox(&self, vni: Vni) -> Option<Arc<Sandbox>> {
        let sb = self.sandboxes.lock().ok()?.get(&vni).cloned()?;
        if sb.still_mounted() {
            return Some(sb);
        }
        tracing::warn!(vni = %vni, netns = %sb.path.display(), "network sandbox was removed from outside the agent: reopening");
        self.forget_sandbox(vni);
        None
    }

    async fn register(&self, mut sb: Sandbox) -> Arc<Sandbox> {
        self.forward_misses(&mut sb).await;
        let sb = Arc::new(sb);
        if let Ok(mut m) = self.sandboxes.lock() {
            m.insert(sb.vni, sb.clone());
        }
        sb
    }

    /// Subscribes to the sandbox's miss notifications and forwards them,
    /// tagged with its VNI. A refused subscription is logged: missing
    /// entries then wait for the periodic pass.
    async fn forward_misses(&self, sb: &mut Sandbox) {
        let mut misses = match vxlan::miss::subscribe_in(&sb.path).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(vni = %sb.vni, error = %e, "cannot subscribe to the sandbox's miss notifications; missing entries are repaired by the periodic pass only");
                return;
            }
        };
        let (vni, tx) = (sb.vni, self.misses_tx.clone());
        sb.hold(netns::spawn_task(async move {
            while let Some(m) = misses.next().await {
                if tx.unbounded_send((vni, m)).is_err() {
                    break;
                }
            }
        }));
    }

    fn forget_sandbox(&self, vni: Vni) {
        if let Ok(mut m) = self.sandboxes.lock() {
            m.remove(&vni);
        }
    }

    /// Every sandbox on this host, opened (those of earlier agents
    /// adopted).
    pub(crate) async fn sandboxes(&self) -> Result<Vec<Arc<Sandbox>>, DataplaneError> {
        let dir = self.sandbox_dir.clone();
        let vnis = netns::blocking(move || Ok(sandbox::list(&dir))).await?;
        let mut out = Vec::with_capacity(vnis.len());
        for vni in vnis {
            if let Some(sb) = self.sandbox(vni).await? {
                out.push(sb);
            }
        }
        Ok(out)
    }

    /// Moves whenever `ensure_network` or `remove_network` changed (or may
    /// have changed, failing midway) a network's devices or entries: equal
    /// values mean the kernel still holds what was last applied, unless
    /// something outside the agent changed it.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub fn bridge_name(vni: Vni) -> String {
        format!("{BRIDGE_PREFIX}{vni}")
    }

    /// `ovl` + the first 8 hex digits of the endpoint id (11 bytes).
    pub fn host_ifname(id: EndpointId) -> String {
        let mut s = id.to_string();
        s.truncate(8);
        format!("{HOST_IF_PREFIX}{s}")
    }
}

/// Compile-time check: the agent drives these from multi-threaded tasks.
#[cfg(test)]
#[allow(dead_code)]
fn futures_are_send(dp: &Dataplane, plan: &NetworkPlan, ep: &LocalEndpoint, id: EndpointId) {
    fn send<T: Send>(_: T) {}
    fn shared<T: Send + Sync>() {}
    shared::<Dataplane>();
    let cfg = || DataplaneConfig::new(PathBuf::from("/run/netns"));
    send(Dataplane::new(cfg()));
    send(Dataplane::new_in(Path::new("/"), cfg()));
    send(dp.ensure_network(plan));
    send(dp.remove_network(plan.vni));
    send(dp.networks_present());
    send(dp.inventory());
    send(dp.attach(plan.vni, ep));
    send(dp.detach(id));
    send(dp.endpoint_present(id));
    send(dp.local_endpoints());
    send(dp.kernel_view(plan.mode, plan.vni));
    send(dp.refresh_underlay(plan.local_vtep));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_planners_overheads_are_the_wire_formats() {
        assert_eq!(
            crate::planner::ENCRYPTED_OVERHEAD_IPV4,
            encrypted::codec::MTU_OVERHEAD_IPV4
        );
        let v4: IpAddr = "198.18.0.1".parse().unwrap();
        assert_eq!(
            NetworkMode::Encrypted.overhead(v4),
            encrypted::codec::MTU_OVERHEAD_IPV4
        );
        assert_eq!(NetworkMode::Plain.overhead(v4), 50);
    }
}
