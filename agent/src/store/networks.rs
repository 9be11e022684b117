//! Network definitions: validation of what an operator asks for, and the
//! cluster-wide view (pure). Networks are a two-phase set replicated in every
//! table: a network exists while some table holds its record and none holds
//! its removal. Name and VNI clashes (two sides of a partition creating
//! concurrently, or a member back-dating a record) resolve the same way on
//! every node: the network most hosts saw first wins (each host publishes
//! when it first saw each network, a `NetworkWitness` in its own table),
//! the older `(created_at, id)` when the witnesses do not decide, and the
//! loser is reported, never merged.

use std::cmp::{Ordering, Reverse};
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
    #[error(
        "--label {0:?}: expected KEY=VALUE with a non-empty key of at most 128 bytes and a value of at most 1024"
    )]
    BadLabel(String),
    #[error("{0} labels: at most 64")]
    TooManyLabels(usize),
    #[error("--vni: {0}")]
    BadVni(String),
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
    use super::bounds::{MAX_LABEL_KEY, MAX_LABEL_VALUE, MAX_LABELS};
    if labels.len() > MAX_LABELS {
        return Err(NetworkError::TooManyLabels(labels.len()));
    }
    for (k, v) in labels {
        if k.is_empty() || k.contains('=') || k.len() > MAX_LABEL_KEY || v.len() > MAX_LABEL_VALUE {
            return Err(NetworkError::BadLabel(k.chars().take(80).collect()));
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
    /// It lost a clash it would have won by its `created_at`: most
    /// witnesses saw it after its rival (a back-dated record, or one
    /// created on the minority side of a partition).
    pub backdated: bool,
}

impl NetworkView {
    pub fn name(&self) -> &str {
        &self.record.name
    }
    pub fn is_active(&self) -> bool {
        self.conflict.is_none()
    }
}

/// First-seen times: network -> witness (the table's owner) -> ms on that
/// witness's own clock.
pub type Witnesses = HashMap<NetworkId, BTreeMap<NodeId, u64>>;

/// What the network view is computed from, gathered from the tables this
/// host holds (its own and its replicas, i.e. the admitted members').
#[derive(Debug, Default, Clone)]
pub struct Sources {
    /// Every copy of every network record, with the table holding it.
    pub records: Vec<(NodeId, NetworkRecord)>,
    pub removed: HashSet<NetworkId>,
    /// The earliest removal time (ms, the remover's clock) of each removed
    /// network, over every table.
    pub removed_at: HashMap<NetworkId, u64>,
    pub witnesses: Witnesses,
}

/// The effective set of networks from records and removals alone (no
/// witnesses, each copy as if held by no one): for checking records.
pub fn effective(
    records: &[NetworkRecord],
    removed: &HashSet<NetworkId>,
) -> (Vec<NetworkView>, usize) {
    let nobody = NodeId::from_bytes([0; 16]);
    resolve(&Sources {
        records: records.iter().map(|r| (nobody, r.clone())).collect(),
        removed: removed.clone(),
        removed_at: HashMap::new(),
        witnesses: Witnesses::new(),
    })
}

/// The effective set of networks (pure: the same sources give the same
/// views on every host). Records that do not validate are skipped and
/// counted: a bad record from one member must not hide everyone else's.
///
/// - **Which copy.** Every host republishes the records it learns, so a
///   member could republish an altered copy of someone's network. The
///   creator is the one most copies name; the copy that creator holds
///   counts; failing that (its table is not held here: it departed), the
///   copy most tables hold, then the one of the lowest holder.
/// - **Clashes** (same name or VNI) go to the network most witnesses saw
///   first: each host that witnessed both votes for the one it saw first,
///   comparing two times of its own clock (so clocks need not agree, and a
///   member's lie is one vote). Equal votes (no witnesses, two hosts, equal
///   times) fall back to the older `(created_at, id)`.
pub fn resolve(src: &Sources) -> (Vec<NetworkView>, usize) {
    let mut copies: BTreeMap<NetworkId, Vec<(NodeId, &NetworkRecord)>> = BTreeMap::new();
    let mut invalid = 0;
    for (holder, r) in &src.records {
        let Ok(id) = <[u8; 16]>::try_from(r.id.as_slice()).map(NetworkId::from_bytes) else {
            invalid += 1;
            continue;
        };
        if !src.removed.contains(&id) {
            copies.entry(id).or_default().push((*holder, r));
        }
    }
    let mut views = Vec::new();
    for (id, cs) in copies {
        match canonical(id, &cs) {
            Some(v) => views.push(v),
            None => invalid += 1,
        }
    }
    settle_clashes(&mut views, &src.witnesses);
    views.sort_by(|a, b| a.record.name.cmp(&b.record.name).then(a.id.cmp(&b.id)));
    (views, invalid)
}

/// The copy of network `id` that counts, among those that validate.
fn canonical(id: NetworkId, copies: &[(NodeId, &NetworkRecord)]) -> Option<NetworkView> {
    // (copies naming its creator, held by that creator, identical copies,
    // lowest holder): higher wins.
    type Rank = (usize, bool, usize, Reverse<NodeId>);
    let mut best: Option<(Rank, NetworkView)> = None;
    for (holder, r) in copies {
        let Some(v) = view_of(id, r) else {
            continue;
        };
        let same = || copies.iter().filter(|(_, c)| *c == *r);
        let naming = copies
            .iter()
            .filter(|(_, c)| c.creator == r.creator)
            .count();
        let by_creator = same().any(|(h, _)| Some(*h) == v.creator);
        let rank = (naming, by_creator, same().count(), Reverse(*holder));
        if best.as_ref().is_none_or(|(b, _)| rank > *b) {
            best = Some((rank, v));
        }
    }
    best.map(|(_, v)| v)
}

fn view_of(id: NetworkId, r: &NetworkRecord) -> Option<NetworkView> {
    let (Ok(vni), Ok(pool), Ok(())) = (
        Vni::new(u64::from(r.vni)),
        validate_pool(&r.subnet, &r.gateway, &r.ip_range),
        validate_name(&r.name),
    ) else {
        return None;
    };
    let creator = <[u8; 16]>::try_from(r.creator.as_slice())
        .ok()
        .map(NodeId::from_bytes);
    Some(NetworkView {
        id,
        vni,
        pool,
        creator,
        record: r.clone(),
        conflict: None,
        backdated: false,
    })
}

/// Votes of the witnesses of both `a` and `b`: (saw `a` first, saw `b` first).
fn votes(a: NetworkId, b: NetworkId, witnesses: &Witnesses) -> (usize, usize) {
    let (Some(wa), Some(wb)) = (witnesses.get(&a), witnesses.get(&b)) else {
        return (0, 0);
    };
    let mut out = (0, 0);
    for (host, ta) in wa {
        match wb.get(host).map(|tb| ta.cmp(tb)) {
            Some(Ordering::Less) => out.0 += 1,
            Some(Ordering::Greater) => out.1 += 1,
            _ => {}
        }
    }
    out
}

fn older(a: &NetworkView, b: &NetworkView) -> bool {
    (a.record.created_at_ms, a.id) < (b.record.created_at_ms, b.id)
}

fn clash(a: &NetworkView, b: &NetworkView) -> bool {
    a.record.name == b.record.name || a.vni == b.vni
}

/// Marks the losers of name and VNI clashes. Each network scores the
/// direct rivals it beats (votes, then `(created_at, id)`); networks take
/// their name and VNI in order of score, then `(created_at, id)`, and a
/// network whose name or VNI is taken by then loses.
fn settle_clashes(views: &mut [NetworkView], witnesses: &Witnesses) {
    let n = views.len();
    let mut wins = vec![0usize; n];
    for i in 0..n {
        for j in i + 1..n {
            if !clash(&views[i], &views[j]) {
                continue;
            }
            let (vi, vj) = votes(views[i].id, views[j].id, witnesses);
            let i_wins = match vi.cmp(&vj) {
                Ordering::Equal => older(&views[i], &views[j]),
                o => o == Ordering::Greater,
            };
            wins[if i_wins { i } else { j }] += 1;
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| (Reverse(wins[i]), views[i].record.created_at_ms, views[i].id));
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut vnis: HashMap<Vni, usize> = HashMap::new();
    for i in order {
        let taken = match (names.get(&views[i].record.name), vnis.get(&views[i].vni)) {
            (Some(&w), _) => Some((w, format!("name {:?}", views[i].record.name))),
            (None, Some(&w)) => Some((w, format!("VNI {}", views[i].vni))),
            (None, None) => None,
        };
        let Some((w, what)) = taken else {
            names.insert(views[i].record.name.clone(), i);
            vnis.insert(views[i].vni, i);
            continue;
        };
        let (vw, vl) = votes(views[w].id, views[i].id, witnesses);
        let why = match vw.cmp(&vl) {
            Ordering::Greater => format!("seen first by {vw} of {} hosts", vw + vl),
            Ordering::Equal => "created earlier".to_string(),
            Ordering::Less => "ranked first among the clashing networks".to_string(),
        };
        views[i].backdated = vw > vl && older(&views[i], &views[w]);
        views[i].conflict = Some(format!(
            "{what} is taken by network {} ({why})",
            views[w].id.short()
        ));
    }
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

    fn node(n: u8) -> NodeId {
        NodeId::from_bytes([n; 16])
    }

    fn net(id: u8) -> NetworkId {
        NetworkId::from_bytes([id; 16])
    }

    /// Sources where every host in `hosts` holds every record, and
    /// `seen[(host, network)]` is that host's witness.
    fn sources(records: &[NetworkRecord], hosts: &[u8], seen: &[(u8, u8, u64)]) -> Sources {
        let mut src = Sources::default();
        for &h in hosts {
            for r in records {
                src.records.push((node(h), r.clone()));
            }
        }
        for &(h, n, t) in seen {
            src.witnesses.entry(net(n)).or_default().insert(node(h), t);
        }
        src
    }

    fn active(src: &Sources) -> Vec<u8> {
        resolve(src)
            .0
            .iter()
            .filter(|v| v.is_active())
            .map(|v| v.record.id[0])
            .collect()
    }

    #[test]
    fn a_forged_created_at_of_zero_does_not_win_against_honest_witnesses() {
        // Host 1 created "prod" (network 1) at t=1000; hosts 2-4 saw it
        // within ms. Later, liar 5 publishes network 2 "prod" with
        // created_at 0, claims it saw it at 0 and network 1 never.
        let victim = rec(1, "prod", 100, 1000);
        let forged = rec(2, "prod", 200, 0);
        let mut seen = vec![(1, 1, 1000), (2, 1, 1003), (3, 1, 1002), (4, 1, 1001)];
        seen.extend([(1, 2, 9000), (2, 2, 9001), (3, 2, 9002), (4, 2, 9003)]);
        seen.push((5, 2, 0));
        let src = sources(&[victim.clone(), forged.clone()], &[1, 2, 3, 4, 5], &seen);
        let (v, _) = resolve(&src);
        assert_eq!(active(&src), vec![1]);
        let lost = v.iter().find(|n| n.record.id[0] == 2).expect("listed");
        assert!(lost.backdated, "{lost:?}");
        let why = lost.conflict.as_deref().unwrap_or_default();
        assert!(
            why.contains("\"prod\"") && why.contains("seen first by 4 of 4"),
            "{why}"
        );
        // Also with 3 hosts: two honest witnesses outvote the liar, even if
        // it witnesses the victim's network late instead of never.
        let seen = [(1, 1, 1000), (2, 1, 1001), (3, 1, u64::MAX)];
        let mut seen = seen.to_vec();
        seen.extend([(1, 2, 9000), (2, 2, 9001), (3, 2, 0)]);
        let src = sources(&[victim.clone(), forged.clone()], &[1, 2, 3], &seen);
        assert_eq!(active(&src), vec![1]);
        // With two hosts no rule tells the victim from the liar: one vote
        // each, and created_at decides (the liar wins). See the threat model.
        let seen = [(1, 1, 1000), (1, 2, 9000), (2, 2, 0), (2, 1, u64::MAX)];
        let src = sources(&[victim, forged], &[1, 2], &seen);
        assert_eq!(active(&src), vec![2]);
    }

    #[test]
    fn witnesses_compare_their_own_clocks_only() {
        // Host 3's clock is an hour behind: its times are all smaller, but
        // it still saw network 1 first, so it votes for network 1.
        let h = 3_600_000;
        let a = rec(1, "a", 100, h + 1000);
        let b = rec(2, "a", 200, h + 900);
        let seen = [
            (1, 1, h + 1000),
            (1, 2, h + 1100),
            (2, 2, h + 1100),
            (2, 1, h + 1200),
            (3, 1, 1000),
            (3, 2, 1100),
        ];
        let src = sources(&[a, b], &[1, 2, 3], &seen);
        assert_eq!(active(&src), vec![1]);
    }

    #[test]
    fn honest_clashes_resolve_the_same_on_every_host() {
        // A partition: hosts 1-3 created network 1 "dup" and VNI 5000 net
        // 3; host 4 alone created network 2 "dup" and network 4 on VNI
        // 5000. After healing each side saw the other's at ~5000.
        let recs = [
            rec(1, "dup", 10, 100),
            rec(2, "dup", 20, 50),
            rec(3, "x", 5000, 120),
            rec(4, "y", 5000, 60),
        ];
        let mut seen = Vec::new();
        for h in 1..=3 {
            seen.extend([
                (h, 1, 100 + u64::from(h)),
                (h, 3, 120),
                (h, 2, 5000),
                (h, 4, 5000),
            ]);
        }
        seen.extend([(4, 2, 50), (4, 4, 60), (4, 1, 5001), (4, 3, 5001)]);
        let want = vec![1, 3];
        // Every host holds the same tables, whatever order it reads them in.
        let mut src = sources(&recs, &[1, 2, 3, 4], &seen);
        assert_eq!(active(&src), want);
        src.records.reverse();
        assert_eq!(active(&src), want);
        src.records.rotate_left(5);
        assert_eq!(active(&src), want);
        let (v, _) = resolve(&src);
        let backdated: Vec<u8> = v
            .iter()
            .filter(|n| n.backdated)
            .map(|n| n.record.id[0])
            .collect();
        assert_eq!(backdated, vec![2, 4]);
        let why: Vec<&str> = v.iter().filter_map(|n| n.conflict.as_deref()).collect();
        assert!(
            why[0].contains("name \"dup\"") && why[1].contains("VNI 5000"),
            "{why:?}"
        );
    }

    #[test]
    fn without_witnesses_or_with_tied_ones_created_at_decides() {
        let a = rec(1, "a", 100, 5);
        let b = rec(2, "a", 200, 3);
        // No witnesses at all (records from before witnesses existed).
        let src = sources(&[a.clone(), b.clone()], &[1, 2, 3], &[]);
        assert_eq!(active(&src), vec![2]);
        // Witnesses that saw both at once (a join, a restart) do not vote;
        // one witness of only one of them does not either.
        let seen = [(1, 1, 7), (1, 2, 7), (2, 1, 7), (2, 2, 7), (3, 1, 1)];
        let src = sources(&[a, b], &[1, 2, 3], &seen);
        assert_eq!(active(&src), vec![2]);
        let (v, _) = resolve(&src);
        let why = v[0].conflict.as_deref().unwrap_or_default();
        assert!(why.contains("created earlier") && !v[0].backdated, "{why}");
    }

    #[test]
    fn an_altered_copy_of_someone_elses_record_does_not_count() {
        let mut honest = rec(1, "prod", 100, 1000);
        honest.creator = node(1).as_bytes().to_vec();
        let mut altered = honest.clone();
        altered.subnet = "198.18.99.0/24".into();
        altered.name = "other".into();
        let with = |holders: &[(u8, &NetworkRecord)]| Sources {
            records: holders
                .iter()
                .map(|(h, r)| (node(*h), (*r).clone()))
                .collect(),
            ..Default::default()
        };
        // While the creator's table is held: its copy, even one against many.
        let src = with(&[(1, &honest), (5, &altered), (6, &altered)]);
        assert_eq!(resolve(&src).0[0].record, honest);
        // Once the creator departed: the copy most tables hold.
        let src = with(&[(2, &honest), (3, &honest), (5, &altered)]);
        assert_eq!(resolve(&src).0[0].record, honest);
        // A copy naming its publisher as creator is outnumbered by the
        // copies naming the real one, creator present or not.
        let mut mine = altered.clone();
        mine.creator = node(5).as_bytes().to_vec();
        let src = with(&[(1, &honest), (2, &honest), (5, &mine)]);
        assert_eq!(resolve(&src).0[0].record, honest);
        let src = with(&[(2, &honest), (3, &honest), (5, &mine)]);
        assert_eq!(resolve(&src).0[0].record, honest);
        // A tie goes to the lowest holder, on every host alike.
        let src = with(&[(5, &altered), (2, &honest)]);
        assert_eq!(resolve(&src).0[0].record, honest);
        // An invalid copy never counts; a network with none valid is skipped.
        let mut bad = honest.clone();
        bad.vni = 0;
        let src = with(&[(1, &bad), (2, &honest)]);
        assert_eq!(resolve(&src).0[0].record, honest);
        let (v, invalid) = resolve(&with(&[(1, &bad)]));
        assert!(v.is_empty());
        assert_eq!(invalid, 1);
    }

    #[test]
    fn the_mode_is_part_of_the_definition() {
        // Two creations of one name in different modes (two sides of a
        // partition) are two networks: a name clash like any other, the
        // older wins on every host and the loser is reported.
        let mut enc = rec(1, "db", 100, 5);
        enc.encrypted = true;
        let plain = rec(2, "db", 200, 3);
        for order in [
            vec![enc.clone(), plain.clone()],
            vec![plain.clone(), enc.clone()],
        ] {
            let (v, _) = effective(&order, &HashSet::new());
            let state: Vec<(u8, bool, bool)> = v
                .iter()
                .map(|n| (n.record.id[0], n.record.encrypted, n.is_active()))
                .collect();
            assert_eq!(state, vec![(1, true, false), (2, false, true)]);
            assert!(
                v[0].conflict
                    .as_deref()
                    .unwrap_or_default()
                    .contains("name \"db\"")
            );
        }
        // A member republishing someone's encrypted network as plain is an
        // altered copy: the creator's copy counts, the mode stays.
        enc.creator = node(1).as_bytes().to_vec();
        let mut downgraded = enc.clone();
        downgraded.encrypted = false;
        let src = Sources {
            records: vec![
                (node(1), enc.clone()),
                (node(5), downgraded.clone()),
                (node(6), downgraded),
            ],
            ..Default::default()
        };
        let (v, _) = resolve(&src);
        assert!(v[0].record.encrypted, "{:?}", v[0].record);
        // A definition stored before the field existed decodes as plain
        // (proto3 leaves a false bool out: these are an old record's bytes).
        use prost::Message;
        let mut old = rec(3, "old", 300, 1);
        old.encrypted = false;
        let bytes = old.encode_to_vec();
        let back = NetworkRecord::decode(bytes.as_slice()).expect("decodes");
        assert!(!back.encrypted);
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
