//! One network's names: endpoint name and aliases → addresses, and the
//! reverse map for PTR. Built from the endpoint rows the planner would
//! program (live owners, past the owner checks), so a name disappears when
//! its endpoint is detached or its host is hidden. Pure data.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

/// An endpoint as the resolver sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedEndpoint {
    pub name: String,
    pub aliases: Vec<String>,
    pub ip: Ipv4Addr,
}

/// The names of one network. Keys are lower-case, without trailing dot
/// (DNS names compare case-insensitively, RFC 4343).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameTable {
    /// The network's subnet: reverse lookups inside it are ours to answer
    /// (NXDOMAIN for a free address), never forwarded.
    pub subnet: Option<Ipv4Network>,
    by_name: BTreeMap<String, Vec<Ipv4Addr>>,
    by_ip: BTreeMap<Ipv4Addr, String>,
}

/// Lower-case, without the trailing dot: the table's key form.
pub fn normalize(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

impl NameTable {
    pub fn new(subnet: Option<Ipv4Network>, endpoints: &[NamedEndpoint]) -> Self {
        let mut t = NameTable {
            subnet,
            ..Default::default()
        };
        for e in endpoints {
            let name = normalize(&e.name);
            if name.is_empty() {
                continue;
            }
            t.by_ip.entry(e.ip).or_insert_with(|| name.clone());
            for n in std::iter::once(name).chain(e.aliases.iter().map(|a| normalize(a))) {
                if n.is_empty() {
                    continue;
                }
                t.by_name.entry(n).or_default().push(e.ip);
            }
        }
        // A fixed order, so rotation is the only thing choosing who is first.
        for ips in t.by_name.values_mut() {
            ips.sort();
            ips.dedup();
        }
        t
    }

    /// The addresses of `name` (any case, trailing dot or not), in table
    /// order.
    pub fn lookup(&self, name: &str) -> Option<&[Ipv4Addr]> {
        self.by_name.get(&normalize(name)).map(Vec::as_slice)
    }

    /// The endpoint name holding `ip`.
    pub fn reverse(&self, ip: Ipv4Addr) -> Option<&str> {
        self.by_ip.get(&ip).map(String::as_str)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.by_name.contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// The names a host serves for one network: its own endpoints, and the
/// remote ones the planner kept in `plan` (live owners that pass the owner
/// checks), so a detached endpoint, a hidden host's endpoints and a refused
/// row are never answered. `endpoints` may hold any network's rows; only
/// `network`'s are used (no cross-network leak).
pub fn for_network(
    network: crate::ids::NetworkId,
    subnet: Ipv4Network,
    endpoints: &[crate::store::EndpointView],
    me: crate::ids::NodeId,
    plan: &crate::planner::NetworkPlan,
) -> NameTable {
    let kept: std::collections::HashSet<_> =
        plan.remotes.iter().map(|r| (r.node, r.mac, r.ip)).collect();
    let named: Vec<NamedEndpoint> = endpoints
        .iter()
        .filter(|e| e.network == network)
        .filter(|e| e.owner == me || kept.contains(&(e.owner, e.mac, std::net::IpAddr::V4(e.ip))))
        .map(|e| NamedEndpoint {
            name: e.name.clone(),
            aliases: e.record.aliases.clone(),
            ip: e.ip,
        })
        .collect();
    NameTable::new(Some(subnet), &named)
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use ovl_proto::records::EndpointRecord;

    use super::*;
    use crate::ids::{MacAddr, NetworkId, NodeId, Vni};
    use crate::planner::{NetworkMode, NetworkPlan, RemoteEndpoint};
    use crate::store::EndpointView;

    fn row(
        net: NetworkId,
        owner: NodeId,
        id: u8,
        name: &str,
        alias: &str,
        ip: Ipv4Addr,
    ) -> EndpointView {
        let r = EndpointRecord {
            id: vec![id; 16],
            network_id: net.as_bytes().to_vec(),
            name: name.into(),
            aliases: vec![alias.into()],
            ip: ip.to_string(),
            prefix_len: 24,
            mac: MacAddr::from_ipv4(ip).to_string(),
            vtep: "198.18.0.9".into(),
            ..Default::default()
        };
        EndpointView::parse(owner, &r).unwrap()
    }

    /// Only the network's own rows, and of those only local ones and the
    /// remote ones the planner kept (a dead host's rows are not in the plan).
    #[test]
    fn names_come_from_local_rows_and_planned_remotes_of_the_network_only() {
        let (net, other) = (
            NetworkId::from_bytes([1; 16]),
            NetworkId::from_bytes([2; 16]),
        );
        let (me, live, dead) = (
            NodeId::from_bytes([7; 16]),
            NodeId::from_bytes([8; 16]),
            NodeId::from_bytes([9; 16]),
        );
        let ip = |d| Ipv4Addr::new(198, 18, 5, d);
        let rows = vec![
            row(net, me, 1, "c1", "web", ip(2)),
            row(net, live, 2, "c2", "web", ip(3)),
            row(net, dead, 3, "c3", "web", ip(4)),
            row(other, live, 4, "x1", "web", ip(5)),
        ];
        let plan = NetworkPlan {
            vni: Vni::new(5).unwrap(),
            mode: NetworkMode::Plain,
            mtu: 1450,
            local_vtep: "198.18.0.1".parse().unwrap(),
            remotes: vec![RemoteEndpoint {
                mac: rows[1].mac,
                ip: IpAddr::V4(ip(3)),
                node: live,
                vtep: rows[1].vtep,
            }],
            peers: vec![],
            gateway: None,
            egress: false,
        };
        let t = for_network(net, "198.18.5.0/24".parse().unwrap(), &rows, me, &plan);
        assert_eq!(t.lookup("web"), Some(&[ip(2), ip(3)][..]));
        assert!(t.lookup("c3").is_none() && t.lookup("x1").is_none());
        assert_eq!(t.reverse(ip(3)), Some("c2"));
        assert_eq!(t.reverse(ip(4)), None);
    }
}
