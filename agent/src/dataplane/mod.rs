//! The plain (kernel) data plane: per network a bridge and a VXLAN device,
//! per remote endpoint a permanent FDB + neighbour entry, per remote host an
//! all-zero flood entry, per local endpoint a veth pair (DESIGN.md, "Plain
//! data plane (kernel)").
//!
//! File roles: this file holds the types, names, constants and the error;
//! `plan.rs` is the pure diff (desired vs kernel, unit-tested without root);
//! `netlink.rs` (links, addresses) and `fdb.rs` (FDB and neighbour
//! tables) are the OS edge: message packing, dumps, requests;
//! `miss.rs` reads the VXLAN devices' l2miss/l3miss notifications;
//! `netns.rs` opens netlink sockets inside other namespaces; `network.rs`
//! and `endpoint.rs` wire them into the public operations.
//!
//! Devices live in the namespace of the `Dataplane`'s netlink socket (the
//! agent's own, or the one given to [`Dataplane::new_in`]). The bridges
//! carry no IP address and no IPv6 link-local (address generation off), so
//! the host has no L3 presence on an overlay, networks with overlapping
//! subnets coexist, and two networks only meet if something routes between
//! bridges, which nothing here does.

use std::collections::{BTreeSet, HashSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rtnetlink::Handle;

use crate::ids::{EndpointId, MacAddr, Vni};
pub use miss::{Miss, Misses};

pub mod encrypted;
mod endpoint;
mod fdb;
mod miss;
mod netlink;
mod netns;
mod network;
mod plan;

/// Prefix of a network's bridge: `ovlbr-<vni>` (at most 14 bytes).
pub const BRIDGE_PREFIX: &str = "ovlbr-";
/// Prefix of a network's VXLAN device: `ovlvx-<vni>`.
pub const VXLAN_PREFIX: &str = "ovlvx-";
/// Prefix of the host end of an endpoint's veth pair: `ovl` + 8 hex digits.
pub const HOST_IF_PREFIX: &str = "ovl";
/// IANA VXLAN port (RFC 7348 §5).
pub const VXLAN_PORT: u16 = 4789;
/// Written to the host veth end's alias, so a bridge that was deleted and
/// recreated gets its ports back (`ovl vni=<vni> ep=<id>`).
const ALIAS_PREFIX: &str = "ovl vni=";

/// An endpoint on another host, as the kernel must know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteEndpoint {
    pub mac: MacAddr,
    pub ip: IpAddr,
    pub vtep: IpAddr,
}

/// Everything the kernel of this host should hold for one network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkPlan {
    pub vni: Vni,
    /// MTU of the bridge, the VXLAN device and the endpoints' veths.
    pub mtu: u32,
    /// Data-path address (VXLAN `local`).
    pub local_vtep: IpAddr,
    /// VXLAN `dstport` (and the port the device listens on).
    pub vxlan_port: u16,
    /// VXLAN `dev`: the interface holding the data-path address.
    pub underlay_ifindex: Option<u32>,
    /// Every remote endpoint of the network.
    pub remotes: Vec<RemoteEndpoint>,
    /// Remote hosts having endpoints in the network (flood list).
    pub flood_vteps: BTreeSet<IpAddr>,
}

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

/// What the kernel holds for a network (for `ovlctl fdb` and tests).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelView {
    /// Unicast FDB entries on the VXLAN device: MAC → remote VTEP.
    pub fdb: Vec<(MacAddr, IpAddr)>,
    /// Neighbour entries on the VXLAN device: IP → MAC.
    pub neigh: Vec<(IpAddr, MacAddr)>,
    /// All-zero-MAC (flood) destinations.
    pub flood: Vec<IpAddr>,
    pub bridge: bool,
    pub vxlan: bool,
}

/// What the kernel holds, from one link dump: for a reconcile pass.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    /// Names of the links named like endpoints' host ends (`ovl` + 8 hex).
    pub host_ends: HashSet<String>,
    /// VNIs that have a bridge or VXLAN device.
    pub networks: Vec<Vni>,
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
    /// Devices created or recreated (bridge, VXLAN).
    pub created_devices: usize,
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
    /// The kernel's answer lacked something it must contain.
    #[error("unexpected kernel reply: {0}")]
    KernelReply(String),
    #[error("namespace worker thread ended without an answer")]
    Worker,
}

/// The kernel data plane, speaking netlink in one network namespace.
pub struct Dataplane {
    handle: Handle,
    _conn: netns::ConnTask,
    /// Serialises mutations: an attach and a reconcile pass must not both
    /// create the same device.
    lock: tokio::sync::Mutex<()>,
    /// Counts changes of networks' devices and entries (see
    /// [`Dataplane::generation`]).
    generation: AtomicU64,
}

impl Dataplane {
    /// Netlink in the namespace of the calling thread (the agent's own).
    pub async fn new() -> Result<Self, DataplaneError> {
        let (handle, conn) = netns::connect_here()?;
        Ok(Self::with(handle, conn))
    }

    /// Netlink in the namespace at `netns` (e.g. `/run/netns/h1`): the
    /// socket is opened on a short-lived thread that entered it; the caller's
    /// threads never change namespace. Used by tests that play several
    /// hosts in one process, and usable for a per-network namespace.
    pub async fn new_in(netns: &Path) -> Result<Self, DataplaneError> {
        let (handle, conn) = netns::connect_in(netns).await?;
        Ok(Self::with(handle, conn))
    }

    fn with(handle: Handle, conn: netns::ConnTask) -> Self {
        Self {
            handle,
            _conn: conn,
            lock: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
        }
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

    pub fn vxlan_name(vni: Vni) -> String {
        format!("{VXLAN_PREFIX}{vni}")
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
    send(Dataplane::new());
    send(Dataplane::new_in(Path::new("/")));
    send(dp.ensure_network(plan));
    send(dp.remove_network(plan.vni));
    send(dp.networks_present());
    send(dp.inventory());
    send(dp.attach(plan.vni, ep));
    send(dp.detach(id));
    send(dp.endpoint_present(id));
    send(dp.local_endpoints());
    send(dp.kernel_view(plan.vni));
    send(dp.underlay_mtu(plan.local_vtep));
}
