//! The miss repair path: when a VXLAN device reports that its ARP proxy had
//! no neighbour entry for an address (l3miss) or a frame had no FDB entry
//! (l2miss), resolve it from the table now instead of at the next repair
//! tick: an address the table knows wakes the reconciler; one it does not
//! know yet is pulled from every live peer first (the owner's push may
//! still be on its way), then programmed by the pass that pull triggers.
//!
//! Misses are triggered by containers (an ARP for any address), so the
//! pulls they cause are rate-limited and nothing here logs per miss above
//! debug.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;

use tracing::{debug, info, warn};

use crate::core::Core;
use crate::dataplane::Miss;
#[cfg(test)]
use crate::ids::MacAddr;
use crate::ids::{NodeId, Vni};
use crate::metrics::{Counter, RateLimit};
use crate::store::{EndpointView, NetworkView};

/// At most one read-repair pull per this, however many misses arrive.
const PULL_EVERY: Duration = Duration::from_millis(100);

/// What the table says about a missed address on one network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// A remote endpoint holds it: the kernel should have it; program now.
    Remote,
    /// Not the overlay's to answer: a local endpoint, the gateway, an
    /// address outside the subnet.
    NotOurs,
    /// The table does not know it (yet).
    Unknown,
}

/// Classifies a miss on network `net` against the table.
pub fn lookup(miss: &Miss, net: &NetworkView, endpoints: &[EndpointView], me: NodeId) -> Lookup {
    let in_net = || endpoints.iter().filter(|e| e.network == net.id);
    let found = match *miss {
        Miss::Ip { ip, .. } => {
            let IpAddr::V4(v4) = ip else {
                return Lookup::NotOurs;
            };
            if v4 == net.pool.gateway || !net.pool.subnet.contains(v4) {
                return Lookup::NotOurs;
            }
            in_net().find(|e| e.ip == v4)
        }
        Miss::Mac { mac, .. } => in_net().find(|e| e.mac == mac),
    };
    match found {
        Some(e) if e.owner == me => Lookup::NotOurs,
        Some(_) => Lookup::Remote,
        None => Lookup::Unknown,
    }
}

/// Runs until the process ends; returns early (logged) when the kernel
/// refuses the subscription: missing entries then wait for the next pass.
pub async fn run(core: Arc<Core>) {
    let Some(mut misses) = core.dataplane.take_misses() else {
        warn!(
            "VXLAN miss notifications are already taken; missing entries are repaired by the periodic pass only"
        );
        return;
    };
    info!("listening for VXLAN miss notifications of every network sandbox");
    let mut last_pull: Option<Instant> = None;
    while let Some((vni, miss)) = misses.next().await {
        core.counters.inc(Counter::DataplaneMiss);
        match classify(&core, vni, &miss) {
            Lookup::NotOurs => {}
            Lookup::Remote => {
                debug!(vni = %vni, ?miss, "miss for an address the table knows: reconciling now");
                core.repair_kernel();
            }
            Lookup::Unknown => {
                if last_pull.is_some_and(|t| t.elapsed() < PULL_EVERY) {
                    continue;
                }
                last_pull = Some(Instant::now());
                let changed = match core.channels() {
                    Some(ch) => core.pull_all(ch).await,
                    None => false,
                };
                let now = classify(&core, vni, &miss);
                if now == Lookup::Unknown {
                    core.counters.inc(Counter::DataplaneMissUnknown);
                }
                if let Some(suppressed) = MISS_LOG.check(Instant::now()) {
                    info!(vni = %vni, ?miss, pulled_news = changed, known_now = now == Lookup::Remote, suppressed,
                          "miss for an address the table did not know: pulled from every live peer");
                }
            }
        }
    }
    warn!(
        "the VXLAN miss notification socket closed; missing entries are repaired by the periodic pass only"
    );
}

static MISS_LOG: RateLimit = RateLimit::new(Duration::from_secs(10));

fn classify(core: &Core, vni: Vni, miss: &Miss) -> Lookup {
    let me = core.cluster.node_id();
    let s = core.store();
    let Some(net) = s
        .networks()
        .into_iter()
        .find(|n| n.vni == vni && n.is_active())
    else {
        return Lookup::NotOurs;
    };
    lookup(miss, &net, &s.endpoints(), me)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ovl_proto::records::{EndpointRecord, NetworkRecord};

    fn net() -> NetworkView {
        let rec = NetworkRecord {
            id: vec![1; 16],
            name: "a".into(),
            vni: 42,
            subnet: "198.19.0.0/24".into(),
            created_at_ms: 1,
            ..Default::default()
        };
        let (mut views, invalid) = crate::store::networks::effective(&[rec], &Default::default());
        assert_eq!(invalid, 0);
        views.remove(0)
    }

    fn ep(owner: u8, last: u8) -> EndpointView {
        let rec = EndpointRecord {
            id: vec![last; 16],
            network_id: vec![1; 16],
            name: format!("e{last}"),
            ip: format!("198.19.0.{last}"),
            prefix_len: 24,
            mac: format!("02:42:c6:13:00:{last:02x}"),
            vtep: format!("198.18.0.{owner}"),
            ..Default::default()
        };
        EndpointView::parse(NodeId::from_bytes([owner; 16]), &rec).expect("valid record")
    }

    #[test]
    fn misses_are_classified_from_the_table() {
        let (n, me) = (net(), NodeId::from_bytes([1; 16]));
        let eps = [ep(1, 5), ep(2, 6)];
        let ip = |s: &str| Miss::Ip {
            ifindex: 3,
            ip: s.parse().unwrap(),
        };
        assert_eq!(lookup(&ip("198.19.0.6"), &n, &eps, me), Lookup::Remote);
        assert_eq!(lookup(&ip("198.19.0.5"), &n, &eps, me), Lookup::NotOurs);
        assert_eq!(
            lookup(&ip("198.19.0.1"), &n, &eps, me),
            Lookup::NotOurs,
            "gateway"
        );
        assert_eq!(
            lookup(&ip("198.18.0.9"), &n, &eps, me),
            Lookup::NotOurs,
            "outside"
        );
        assert_eq!(lookup(&ip("198.19.0.7"), &n, &eps, me), Lookup::Unknown);
        let mac = |last: u8| Miss::Mac {
            ifindex: 3,
            mac: MacAddr([2, 0x42, 198, 19, 0, last]),
        };
        assert_eq!(lookup(&mac(6), &n, &eps, me), Lookup::Remote);
        assert_eq!(lookup(&mac(7), &n, &eps, me), Lookup::Unknown);
    }
}
