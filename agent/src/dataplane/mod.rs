//! The data plane: what plain and encrypted networks share (the `shared`
//! part: per network a bridge, per local endpoint a veth pair) and, behind
//! the [`Vtep`] trait, what carries a network's frames between hosts: the
//! kernel VXLAN device for plain networks (`vxlan/`), the userspace
//! encrypted VTEP for encrypted ones (`encrypted/`; written elsewhere and
//! handed in with [`Dataplane::set_vtep`]). DESIGN.md, "Plain data plane
//! (kernel)" and "Encrypted data plane".
//!
//! File roles: this file holds the types, names, constants and the error;
//! `vtep.rs` the VTEP interface; `shared/network.rs` the bridge and the
//! per-network operations, dispatching to the network's VTEP by the plan's
//! mode; `shared/endpoint.rs` the veth pairs; `shared/names.rs` the pure
//! naming rules; `netlink.rs` (links, addresses) and `netns.rs` (sockets in
//! other namespaces) the OS edge both parts use. `vxlan/` holds the kernel
//! VTEP: `plan.rs` is its pure diff (desired vs kernel, unit-tested without
//! root), `fdb.rs` its FDB and neighbour tables, `miss.rs` its
//! l2miss/l3miss notifications, `mod.rs` the device and the wiring.
//!
//! Devices live in the namespace of the `Dataplane`'s netlink socket (the
//! agent's own, or the one given to [`Dataplane::new_in`]). The bridges
//! carry no IP address and no IPv6 link-local (address generation off), so
//! the host has no L3 presence on an overlay, networks with overlapping
//! subnets coexist, and two networks only meet if something routes between
//! bridges, which nothing here does.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rtnetlink::Handle;

use crate::ids::{EndpointId, MacAddr, Vni};
pub use crate::planner::{NetworkMode, NetworkPlan, PeerHost, RemoteEndpoint};
pub use netns::{NsRefusal, open_container};
pub use vtep::Vtep;
pub use vxlan::miss::{Miss, Misses};
pub use vxlan::{VxlanConfig, VxlanVtep};

pub mod encrypted;
mod netlink;
mod netns;
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
}

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
}

impl Dataplane {
    /// Netlink in the namespace of the calling thread (the agent's own).
    pub async fn new(vxlan: VxlanConfig) -> Result<Self, DataplaneError> {
        let (handle, conn) = netns::connect_here()?;
        Ok(Self::with(handle, conn, vxlan))
    }

    /// Netlink in the namespace at `netns` (e.g. `/run/netns/h1`): the
    /// socket is opened on a short-lived thread that entered it; the caller's
    /// threads never change namespace. Used by tests that play several
    /// hosts in one process, and usable for a per-network namespace.
    pub async fn new_in(netns: &Path, vxlan: VxlanConfig) -> Result<Self, DataplaneError> {
        let (handle, conn) = netns::connect_in(netns).await?;
        Ok(Self::with(handle, conn, vxlan))
    }

    fn with(handle: Handle, conn: netns::ConnTask, cfg: VxlanConfig) -> Self {
        let vxlan = Arc::new(VxlanVtep::new(handle.clone(), cfg));
        Self {
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

    /// The netlink handle of this data plane's namespace (for a VTEP that
    /// enslaves its own devices to the bridge).
    pub fn netlink(&self) -> Handle {
        self.handle.clone()
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
    send(Dataplane::new(VxlanConfig::default()));
    send(Dataplane::new_in(Path::new("/"), VxlanConfig::default()));
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
