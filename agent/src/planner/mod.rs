//! The planner: store + membership view + owners → one neutral
//! [`NetworkPlan`] per network (DESIGN.md, "Agent internals"). Pure: no
//! kernel, no clock, no locks; the same inputs give the same plan. The plan
//! says *what* a host must carry for a network (mode, MTU, who is where);
//! how frames get there is the business of the network's `Vtep` in
//! `dataplane/` (kernel VXLAN for plain networks, the userspace engine for
//! encrypted ones), whose own settings (UDP port, underlay device) are not
//! part of the plan.

use std::collections::HashSet;
use std::net::IpAddr;

use crate::ids::{MacAddr, NodeId, Vni};
use crate::membership::{NodeStatus, NodeView};
use crate::store::EndpointView;
use crate::store::networks::{self, NetworkView};
use crate::store::ownership::{self, Owners, Refusal};

/// VXLAN overhead: 20 IP + 8 UDP + 8 VXLAN + 14 inner Ethernet (RFC 7348
/// §5). Applied on any underlay, as before the split (issue 9 revisits the
/// MTU derivation).
pub const PLAIN_OVERHEAD: u32 = 50;
/// Encrypted overhead on an IPv4 underlay: 20 IP + 8 UDP + 4 SPI + 8
/// sequence + 8 VXLAN + 14 inner Ethernet + 16 tag (DESIGN.md, "Encrypted
/// data plane"). Equals `dataplane::encrypted::codec::MTU_OVERHEAD_IPV4`
/// (checked by a test there: the planner cannot import the data plane).
pub const ENCRYPTED_OVERHEAD_IPV4: u32 = 78;
/// The same on an IPv6 underlay: its header is 20 bytes longer.
pub const ENCRYPTED_OVERHEAD_IPV6: u32 = ENCRYPTED_OVERHEAD_IPV4 + 20;

/// How a network's traffic crosses between hosts; fixed when the network
/// is created (`ovlctl network create --encrypted`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NetworkMode {
    /// Kernel VXLAN, cleartext on the underlay (UDP 4789).
    Plain,
    /// The userspace encrypted VTEP (AES-256-GCM in UDP, port 4500).
    Encrypted,
}

impl NetworkMode {
    pub const ALL: [NetworkMode; 2] = [NetworkMode::Plain, NetworkMode::Encrypted];

    /// The mode a network definition fixes. Definitions stored before the
    /// field existed decode as `encrypted = false`: plain.
    pub fn of(view: &NetworkView) -> Self {
        if view.record.encrypted {
            NetworkMode::Encrypted
        } else {
            NetworkMode::Plain
        }
    }

    /// Bytes the data path adds around a container's packet on an
    /// underlay whose local address is `underlay`.
    pub fn overhead(self, underlay: IpAddr) -> u32 {
        match (self, underlay) {
            (NetworkMode::Plain, _) => PLAIN_OVERHEAD,
            (NetworkMode::Encrypted, IpAddr::V4(_)) => ENCRYPTED_OVERHEAD_IPV4,
            (NetworkMode::Encrypted, IpAddr::V6(_)) => ENCRYPTED_OVERHEAD_IPV6,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::Plain => "plain",
            NetworkMode::Encrypted => "encrypted",
        }
    }
}

impl std::fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An endpoint on another host: where its frames go.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RemoteEndpoint {
    pub mac: MacAddr,
    pub ip: IpAddr,
    /// The host that owns the endpoint.
    pub node: NodeId,
    /// That host's data-path address.
    pub vtep: IpAddr,
}

/// A remote host having endpoints in the network (broadcast goes to each;
/// an encrypted network accepts frames only from these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerHost {
    pub node: NodeId,
    pub vtep: IpAddr,
}

/// Everything this host should carry for one network, whatever the mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkPlan {
    pub vni: Vni,
    pub mode: NetworkMode,
    /// MTU of the bridge, the VTEP device and the endpoints' veths.
    pub mtu: u32,
    /// This host's data-path address.
    pub local_vtep: IpAddr,
    /// Every remote endpoint of the network, sorted, no duplicates.
    pub remotes: Vec<RemoteEndpoint>,
    /// Remote hosts having endpoints in the network, sorted, no duplicates.
    pub peers: Vec<PeerHost>,
    /// The network's gateway address with the subnet's prefix, held by
    /// every host inside the network's sandbox.
    pub gateway: Option<ipnetwork::Ipv4Network>,
    /// Traffic may leave the network through this host's uplink (not
    /// `--internal`).
    pub egress: bool,
}

/// What the planner needs to know about this host.
#[derive(Debug, Clone, Copy)]
pub struct Host {
    pub me: NodeId,
    /// Data-path address (`--data-path-addr`).
    pub local_vtep: IpAddr,
    /// MTU of the interface holding the data-path address.
    pub underlay_mtu: u32,
}

/// A plan and the endpoint rows the owner checks refused on the way (never
/// programmed; the caller counts and reports them).
#[derive(Debug, Clone)]
pub struct Planned {
    pub plan: NetworkPlan,
    pub refused: Vec<(EndpointView, Refusal)>,
}

/// What bounds a network's MTU: the largest MTU whose full-size packets
/// cross every member host's data path, and the host that sets it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathLimit {
    pub mtu: u32,
    pub host: NodeId,
}

/// A network's MTU and its bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MtuChoice {
    /// The MTU of every endpoint of the network, on every host.
    pub mtu: u32,
    pub limit: PathLimit,
    /// `--mtu` was given and is larger than `limit` allows: full-size
    /// packets to `limit.host` are lost (shown by `network inspect`).
    pub exceeds_path: bool,
}

/// The largest MTU one host's data path carries for `mode`.
fn host_limit(mode: NetworkMode, data_path_mtu: u32, vtep: IpAddr) -> u32 {
    data_path_mtu
        .saturating_sub(mode.overhead(vtep))
        .max(networks::MIN_MTU)
}

/// Which hosts bound the MTU besides those with endpoint rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Including {
    /// This host carries the network or is about to (a plan, an attach).
    ThisHost,
    /// Only the hosts with endpoints (`network inspect` on a host outside
    /// the network names the MTU the members use). With none, this host's
    /// own path is shown.
    MembersOnly,
}

/// A network has one MTU on every host (DESIGN.md, "MTU"): `--mtu`, or the
/// smallest data-path MTU among its member hosts (every owner of an
/// endpoint row of the network, live or not, so a host that restarts does
/// not move it, and this host when it carries the network) minus the
/// mode's overhead. A per-host MTU would black-hole full-size packets
/// towards a smaller host. Members that have not published their MTU
/// (older agents) are left out.
pub fn mtu_choice(
    view: &NetworkView,
    endpoints: &[EndpointView],
    nodes: &[NodeView],
    host: &Host,
    including: Including,
) -> MtuChoice {
    let mode = NetworkMode::of(view);
    let mut members: HashSet<NodeId> = endpoints
        .iter()
        .filter(|e| e.network == view.id)
        .map(|e| e.owner)
        .collect();
    let own = PathLimit {
        mtu: host_limit(mode, host.underlay_mtu, host.local_vtep),
        host: host.me,
    };
    let with_self = including == Including::ThisHost || members.remove(&host.me);
    let mut limit: Option<PathLimit> = with_self.then_some(own);
    for n in nodes.iter().filter(|n| members.contains(&n.id)) {
        let Ok(vtep) = n.data_path_addr.parse::<IpAddr>() else {
            continue;
        };
        if n.data_path_mtu == 0 {
            continue;
        }
        let here = PathLimit {
            mtu: host_limit(mode, n.data_path_mtu, vtep),
            host: n.id,
        };
        // Ties go to the smaller id, so every host names the same one.
        limit = Some(match limit {
            Some(l) if (l.mtu, l.host) <= (here.mtu, here.host) => l,
            _ => here,
        });
    }
    let limit = limit.unwrap_or(own);
    match view.record.mtu {
        0 => MtuChoice {
            mtu: limit.mtu,
            limit,
            exceeds_path: false,
        },
        set => MtuChoice {
            mtu: set,
            limit,
            exceeds_path: set > limit.mtu,
        },
    }
}

/// The plan of `view` on `host`: every endpoint of the network (from
/// `endpoints`, any network) owned by a live peer that passes the owner
/// checks, and each such peer once.
pub fn plan(
    view: &NetworkView,
    endpoints: &[EndpointView],
    nodes: &[NodeView],
    owners: &Owners,
    host: &Host,
) -> Planned {
    let live: HashSet<NodeId> = nodes
        .iter()
        .filter(|n| n.status == NodeStatus::Alive)
        .map(|n| n.id)
        .collect();
    let rows: Vec<EndpointView> = endpoints
        .iter()
        .filter(|e| e.network == view.id)
        .cloned()
        .collect();
    let (ok, refused) = ownership::vet(rows, owners);
    let mut remotes: Vec<RemoteEndpoint> = ok
        .into_iter()
        .filter(|e| e.owner != host.me && live.contains(&e.owner))
        .map(|e| RemoteEndpoint {
            mac: e.mac,
            ip: IpAddr::V4(e.ip),
            node: e.owner,
            vtep: e.vtep,
        })
        .collect();
    remotes.sort();
    remotes.dedup();
    let mut peers: Vec<PeerHost> = remotes
        .iter()
        .map(|r| PeerHost {
            node: r.node,
            vtep: r.vtep,
        })
        .collect();
    peers.sort();
    peers.dedup();
    Planned {
        plan: NetworkPlan {
            vni: view.vni,
            mode: NetworkMode::of(view),
            mtu: mtu_choice(view, endpoints, nodes, host, Including::ThisHost).mtu,
            local_vtep: host.local_vtep,
            remotes,
            peers,
            gateway: ipnetwork::Ipv4Network::new(view.pool.gateway, view.pool.subnet.prefix()).ok(),
            egress: !view.record.internal,
        },
        refused,
    }
}

#[cfg(test)]
mod tests;
