//! Network definitions: validation of what an operator asks for, and the
//! cluster-wide view (pure). Networks are a two-phase set replicated in every
//! table: a network exists while some table holds its record and none holds
//! its removal. Name and VNI clashes (two sides of a partition creating
//! concurrently) resolve the same way on every node: the older
//! `(created_at, id)` wins and the loser is reported, never merged.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use ovl_proto::records::NetworkRecord;

use crate::ids::{NetworkId, NodeId, Vni};

pub const MIN_MTU: u32 = 576;
pub const MAX_MTU: u32 = 65_535;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetworkError {
    #[error(
        "network name {0:?} is invalid: use 1-63 letters, digits, '_', '.', '-', starting with a letter or digit"
    )]
    BadName(String),
    #[error("--subnet {0:?} is not a valid IPv4 CIDR (e.g. 198.18.10.0/24)")]
    BadSubnet(String),
    #[error("--subnet {0}: prefix must be between /8 and /30")]
    SubnetSize(String),
    #[error("--subnet {given}: host bits are set; did you mean {network}?")]
    NotNetworkAddr { given: String, network: String },
    #[error("--gateway {0:?} is not an IPv4 address")]
    BadGateway(String),
    #[error("--gateway {gateway} is outside --subnet {subnet}")]
    GatewayOutside { gateway: String, subnet: String },
    #[error("--gateway {0} is the subnet's network or broadcast address")]
    GatewayReserved(String),
    #[error("--ip-range {0:?} is not a valid IPv4 CIDR")]
    BadRange(String),
    #[error("--ip-range {range} is outside --subnet {subnet}")]
    RangeOutside { range: String, subnet: String },
    #[error("--gateway and --ip-range need --subnet")]
    NeedsSubnet,
    #[error("--mtu {0} is outside {MIN_MTU}..={MAX_MTU}")]
    BadMtu(u32),
    #[error("--label {0:?}: expected KEY=VALUE with a non-empty key")]
    BadLabel(String),
    #[error("--vni: {0}")]
    BadVni(String),
    #[error(
        "--encrypted networks are not supported yet (the userspace encrypted data plane is not built)"
    )]
    EncryptedUnsupported,
}

pub fn validate_name(name: &str) -> Result<(), NetworkError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(NetworkError::BadName(name.chars().take(80).collect()))
    }
}

/// A validated IPv4 address pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    pub subnet: Ipv4Network,
    pub gateway: Ipv4Addr,
    pub ip_range: Option<Ipv4Network>,
}

/// Parses and checks subnet, gateway and ip-range together. The gateway
/// defaults to the first host address, as Docker does.
pub fn validate_pool(
    subnet: &str,
    gateway: &str,
    ip_range: &str,
) -> Result<PoolSpec, NetworkError> {
    let net: Ipv4Network = subnet
        .parse()
        .map_err(|_| NetworkError::BadSubnet(subnet.into()))?;
    if !(8..=30).contains(&net.prefix()) {
        return Err(NetworkError::SubnetSize(subnet.into()));
    }
    if net.ip() != net.network() {
        return Err(NetworkError::NotNetworkAddr {
            given: subnet.into(),
            network: format!("{}/{}", net.network(), net.prefix()),
        });
    }
    let gateway = if gateway.is_empty() {
        Ipv4Addr::from(u32::from(net.network()) + 1)
    } else {
        let gw: Ipv4Addr = gateway
            .parse()
            .map_err(|_| NetworkError::BadGateway(gateway.into()))?;
        if !net.contains(gw) {
            return Err(NetworkError::GatewayOutside {
                gateway: gateway.into(),
                subnet: subnet.into(),
            });
        }
        if gw == net.network() || gw == net.broadcast() {
            return Err(NetworkError::GatewayReserved(gateway.into()));
        }
        gw
    };
    let ip_range = if ip_range.is_empty() {
        None
    } else {
        let r: Ipv4Network = ip_range
            .parse()
            .map_err(|_| NetworkError::BadRange(ip_range.into()))?;
        let r = Ipv4Network::new(r.network(), r.prefix())
            .map_err(|_| NetworkError::BadRange(ip_range.into()))?;
        if !net.contains(r.network()) || r.prefix() < net.prefix() {
            return Err(NetworkError::RangeOutside {
                range: ip_range.into(),
                subnet: subnet.into(),
            });
        }
        Some(r)
    };
    Ok(PoolSpec {
        subnet: net,
        gateway,
        ip_range,
    })
}

pub fn validate_mtu(mtu: u32) -> Result<(), NetworkError> {
    if mtu != 0 && !(MIN_MTU..=MAX_MTU).contains(&mtu) {
        return Err(NetworkError::BadMtu(mtu));
    }
    Ok(())
}

pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), NetworkError> {
    for k in labels.keys() {
        if k.is_empty() || k.contains('=') || k.len() > 128 {
            return Err(NetworkError::BadLabel(k.clone()));
        }
    }
    Ok(())
}

/// A first free /24 of `pool` not overlapping any of `used`.
pub fn pick_subnet(pool: Ipv4Network, used: &[Ipv4Network], size: u8) -> Option<Ipv4Network> {
    let size = size.max(pool.prefix());
    let count = 1u64 << (size - pool.prefix());
    let step = 1u64 << (32 - size);
    (0..count)
        .map(|i| Ipv4Addr::from((u64::from(u32::from(pool.network())) + i * step) as u32))
        .filter_map(|a| Ipv4Network::new(a, size).ok())
        .find(|c| !used.iter().any(|u| overlaps(*u, *c)))
}

pub fn overlaps(a: Ipv4Network, b: Ipv4Network) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// A network as every node sees it.
#[derive(Debug, Clone)]
pub struct NetworkView {
    pub id: NetworkId,
    pub vni: Vni,
    pub pool: PoolSpec,
    pub creator: Option<NodeId>,
    pub record: NetworkRecord,
    /// `None` when active; the reason when it lost a clash.
    pub conflict: Option<String>,
}

impl NetworkView {
    pub fn name(&self) -> &str {
        &self.record.name
    }
    pub fn is_active(&self) -> bool {
        self.conflict.is_none()
    }
}

/// The effective set of networks from every table's records and removals.
/// Records that do not validate are skipped (counted by the caller): a bad
/// record from one member must not hide everyone else's networks.
pub fn effective(
    records: &[NetworkRecord],
    removed: &HashSet<NetworkId>,
) -> (Vec<NetworkView>, usize) {
    let mut by_id: BTreeMap<NetworkId, NetworkView> = BTreeMap::new();
    let mut invalid = 0;
    for r in records {
        let Ok(id) = <[u8; 16]>::try_from(r.id.as_slice()).map(NetworkId::from_bytes) else {
            invalid += 1;
            continue;
        };
        if removed.contains(&id) || by_id.contains_key(&id) {
            continue;
        }
        let (Ok(vni), Ok(pool), Ok(())) = (
            Vni::new(u64::from(r.vni)),
            validate_pool(&r.subnet, &r.gateway, &r.ip_range),
            validate_name(&r.name),
        ) else {
            invalid += 1;
            continue;
        };
        let creator = <[u8; 16]>::try_from(r.creator.as_slice())
            .ok()
            .map(NodeId::from_bytes);
        by_id.insert(
            id,
            NetworkView {
                id,
                vni,
                pool,
                creator,
                record: r.clone(),
                conflict: None,
            },
        );
    }
    let mut views: Vec<NetworkView> = by_id.into_values().collect();
    views.sort_by_key(|v| (v.record.created_at_ms, v.id));
    let mut names: HashMap<String, NetworkId> = HashMap::new();
    let mut vnis: HashMap<Vni, NetworkId> = HashMap::new();
    for v in &mut views {
        if let Some(winner) = names.get(&v.record.name) {
            v.conflict = Some(format!(
                "name {:?} is taken by network {} (created earlier)",
                v.record.name,
                winner.short()
            ));
        } else if let Some(winner) = vnis.get(&v.vni) {
            v.conflict = Some(format!(
                "VNI {} is taken by network {} (created earlier)",
                v.vni,
                winner.short()
            ));
        } else {
            names.insert(v.record.name.clone(), v.id);
            vnis.insert(v.vni, v.id);
        }
    }
    views.sort_by(|a, b| a.record.name.cmp(&b.record.name).then(a.id.cmp(&b.id)));
    (views, invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u8, name: &str, vni: u32, at: u64) -> NetworkRecord {
        NetworkRecord {
            id: vec![id; 16],
            name: name.into(),
            vni,
            subnet: "198.18.10.0/24".into(),
            created_at_ms: at,
            ..Default::default()
        }
    }

    #[test]
    fn pool_validation_names_the_problem() {
        assert!(validate_pool("198.18.10.0/24", "", "").is_ok());
        let p = validate_pool("198.18.10.0/24", "198.18.10.254", "198.18.10.128/25").unwrap();
        assert_eq!(p.gateway, "198.18.10.254".parse::<Ipv4Addr>().unwrap());
        for (s, g, r, want) in [
            ("nonsense", "", "", "not a valid IPv4 CIDR"),
            ("198.18.10.0/33", "", "", "not a valid"),
            ("198.18.10.0/31", "", "", "prefix must be"),
            ("198.18.10.5/24", "", "", "host bits"),
            ("198.18.10.0/24", "198.18.11.1", "", "outside --subnet"),
            ("198.18.10.0/24", "198.18.10.255", "", "broadcast"),
            ("198.18.10.0/24", "x", "", "not an IPv4"),
            ("198.18.10.0/24", "", "198.18.11.0/25", "outside --subnet"),
            ("198.18.10.0/24", "", "198.18.0.0/16", "outside --subnet"),
        ] {
            let e = validate_pool(s, g, r).unwrap_err().to_string();
            assert!(e.contains(want), "{s} {g} {r}: {e}");
        }
    }

    #[test]
    fn clashes_resolve_to_the_older_network_everywhere() {
        let a = rec(1, "a", 100, 5);
        let b = rec(2, "a", 200, 3); // older: wins the name
        let c = rec(3, "c", 200, 9); // VNI clash with b: loses
        for order in [
            vec![a.clone(), b.clone(), c.clone()],
            vec![c.clone(), a.clone(), b.clone()],
        ] {
            let (v, invalid) = effective(&order, &HashSet::new());
            assert_eq!(invalid, 0);
            let state: Vec<(u8, bool)> =
                v.iter().map(|n| (n.record.id[0], n.is_active())).collect();
            assert_eq!(state, vec![(1, false), (2, true), (3, false)]);
        }
    }

    #[test]
    fn removed_and_invalid_records_are_left_out() {
        let mut bad = rec(4, "bad", 0, 1);
        bad.vni = 0;
        let removed: HashSet<NetworkId> = [NetworkId::from_bytes([1; 16])].into();
        let (v, invalid) = effective(&[rec(1, "a", 1, 1), bad, rec(2, "b", 2, 1)], &removed);
        assert_eq!(invalid, 1);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].name(), "b");
    }

    #[test]
    fn subnet_picking_skips_used_space() {
        let pool: Ipv4Network = "198.19.0.0/16".parse().unwrap();
        let used: Vec<Ipv4Network> = vec![
            "198.19.0.0/24".parse().unwrap(),
            "198.19.1.0/25".parse().unwrap(),
        ];
        assert_eq!(
            pick_subnet(pool, &used, 24),
            Some("198.19.2.0/24".parse().unwrap())
        );
        let full: Vec<Ipv4Network> = vec![pool];
        assert_eq!(pick_subnet(pool, &full, 24), None);
    }

    #[test]
    fn names() {
        assert!(validate_name("net-a_1.b").is_ok());
        for bad in ["", "-a", "a b", "ä", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
