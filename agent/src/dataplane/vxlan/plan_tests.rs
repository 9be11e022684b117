use std::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::dataplane::{NetworkMode, PeerHost, RemoteEndpoint};
use crate::ids::{NodeId, Vni};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn mac_of(s: &str) -> MacAddr {
    let IpAddr::V4(v4) = ip(s) else {
        panic!("v4 only")
    };
    MacAddr::from_ipv4(v4)
}

fn remote(addr: &str, vtep: &str) -> RemoteEndpoint {
    let v = ip(vtep);
    let IpAddr::V4(v4) = v else { panic!("v4 only") };
    RemoteEndpoint {
        mac: mac_of(addr),
        ip: ip(addr),
        node: NodeId::from_bytes([v4.octets()[3]; 16]),
        vtep: v,
    }
}

fn plan(remotes: Vec<RemoteEndpoint>) -> NetworkPlan {
    let mut peers: Vec<PeerHost> = remotes
        .iter()
        .map(|r| PeerHost {
            node: r.node,
            vtep: r.vtep,
        })
        .collect();
    peers.sort();
    peers.dedup();
    NetworkPlan {
        vni: Vni::new(42).unwrap(),
        mode: NetworkMode::Plain,
        mtu: 1450,
        local_vtep: ip("198.18.0.1"),
        remotes,
        peers,
        gateway: None,
        egress: false,
    }
}

const SETTINGS: Settings = Settings {
    port: 4789,
    dev: Some(2),
};

fn fdb(mac: MacAddr, dst: &str) -> FdbSeen {
    FdbSeen {
        mac,
        dst: ip(dst),
        clean: true,
    }
}

fn neigh(addr: &str, mac: MacAddr) -> NeighSeen {
    NeighSeen {
        ip: ip(addr),
        mac: Some(mac),
        clean: true,
    }
}

/// What the kernel holds after applying `plan` perfectly.
fn applied(p: &NetworkPlan) -> Observed {
    let (f, n, fl) = wanted(p);
    let mut o = Observed::default();
    for (mac, dst) in f {
        o.fdb.push(FdbSeen {
            mac,
            dst,
            clean: true,
        });
    }
    for v in fl {
        o.fdb.push(FdbSeen {
            mac: MacAddr([0; 6]),
            dst: v,
            clean: true,
        });
    }
    for (i, m) in n {
        o.neigh.push(NeighSeen {
            ip: i,
            mac: Some(m),
            clean: true,
        });
    }
    o
}

#[test]
fn empty_kernel_gets_every_entry() {
    let p = plan(vec![
        remote("198.19.0.3", "198.18.0.2"),
        remote("198.19.0.4", "198.18.0.3"),
    ]);
    let d = diff(&p, &Observed::default());
    assert_eq!(d.fdb_set.len(), 2);
    assert_eq!(d.neigh_set.len(), 2);
    assert_eq!(d.flood_add, vec![ip("198.18.0.2"), ip("198.18.0.3")]);
    assert_eq!(d.removed(), 0);
    assert_eq!(d.added(), 6);
}

#[test]
fn matching_kernel_needs_nothing() {
    let p = plan(vec![
        remote("198.19.0.3", "198.18.0.2"),
        remote("198.19.0.4", "198.18.0.2"),
    ]);
    let d = diff(&p, &applied(&p));
    assert_eq!(d, EntryDiff::default());
}

#[test]
fn moved_endpoint_is_replaced_in_place() {
    let p = plan(vec![remote("198.19.0.3", "198.18.0.9")]);
    let mut seen = applied(&plan(vec![remote("198.19.0.3", "198.18.0.2")]));
    seen.fdb.retain(|e| !e.mac.is_zero());
    let d = diff(&p, &seen);
    assert_eq!(d.fdb_set, vec![(mac_of("198.19.0.3"), ip("198.18.0.9"))]);
    assert!(d.fdb_remove.is_empty(), "replace, never delete-then-add");
    assert!(d.neigh_set.is_empty() && d.neigh_remove.is_empty());
    assert_eq!(d.flood_add, vec![ip("198.18.0.9")]);
}

#[test]
fn removed_remote_loses_fdb_neigh_and_flood() {
    let old = plan(vec![
        remote("198.19.0.3", "198.18.0.2"),
        remote("198.19.0.4", "198.18.0.3"),
    ]);
    let new = plan(vec![remote("198.19.0.3", "198.18.0.2")]);
    let d = diff(&new, &applied(&old));
    assert_eq!(d.fdb_remove, vec![(mac_of("198.19.0.4"), ip("198.18.0.3"))]);
    assert_eq!(d.neigh_remove, vec![ip("198.19.0.4")]);
    assert_eq!(d.flood_remove, vec![ip("198.18.0.3")]);
    assert_eq!(d.added(), 0);
}

#[test]
fn mac_with_several_remotes_is_cut_to_one_then_replaced() {
    let m = mac_of("198.19.0.3");
    let seen = Observed {
        fdb: vec![fdb(m, "198.18.0.5"), fdb(m, "198.18.0.6")],
        neigh: vec![],
    };
    let d = diff(&plan(vec![remote("198.19.0.3", "198.18.0.7")]), &seen);
    assert_eq!(d.fdb_remove, vec![(m, ip("198.18.0.6"))]);
    assert_eq!(d.fdb_set, vec![(m, ip("198.18.0.7"))]);
    // When the wanted remote is among them, only the others go.
    let d = diff(&plan(vec![remote("198.19.0.3", "198.18.0.6")]), &seen);
    assert_eq!(d.fdb_remove, vec![(m, ip("198.18.0.5"))]);
    assert!(d.fdb_set.is_empty());
}

#[test]
fn unclean_entries_are_rewritten() {
    let p = plan(vec![remote("198.19.0.3", "198.18.0.2")]);
    let mut seen = applied(&p);
    for e in &mut seen.fdb {
        e.clean = false;
    }
    seen.neigh[0].clean = false;
    let d = diff(&p, &seen);
    assert_eq!(d.fdb_set, vec![(mac_of("198.19.0.3"), ip("198.18.0.2"))]);
    assert_eq!(d.flood_remove, vec![ip("198.18.0.2")]);
    assert_eq!(d.flood_add, vec![ip("198.18.0.2")]);
    assert_eq!(d.neigh_set, vec![(ip("198.19.0.3"), mac_of("198.19.0.3"))]);
}

#[test]
fn neighbour_with_wrong_mac_is_replaced_and_extras_removed() {
    let p = plan(vec![remote("198.19.0.3", "198.18.0.2")]);
    let mut seen = applied(&p);
    seen.neigh = vec![
        neigh("198.19.0.3", mac_of("198.19.0.99")),
        neigh("198.19.0.8", mac_of("198.19.0.8")),
    ];
    let d = diff(&p, &seen);
    assert_eq!(d.neigh_set, vec![(ip("198.19.0.3"), mac_of("198.19.0.3"))]);
    assert_eq!(d.neigh_remove, vec![ip("198.19.0.8")]);
}

#[test]
fn flood_never_targets_self_or_nothing() {
    let mut p = plan(vec![]);
    p.peers = [ip("198.18.0.1"), ip("0.0.0.0"), ip("198.18.0.4")]
        .into_iter()
        .enumerate()
        .map(|(i, vtep)| PeerHost {
            node: NodeId::from_bytes([i as u8; 16]),
            vtep,
        })
        .collect();
    let d = diff(&p, &Observed::default());
    assert_eq!(d.flood_add, vec![ip("198.18.0.4")]);
}

#[test]
fn later_duplicate_wins_and_bad_macs_are_skipped() {
    let mut a = remote("198.19.0.3", "198.18.0.2");
    let b = remote("198.19.0.3", "198.18.0.3");
    let mut p = plan(vec![a.clone(), b]);
    let (f, n, _) = wanted(&p);
    assert_eq!(f.get(&mac_of("198.19.0.3")), Some(&ip("198.18.0.3")));
    assert_eq!(n.len(), 1);
    a.mac = MacAddr([0x01, 0, 0x5e, 0, 0, 1]);
    p.remotes = vec![a];
    assert!(wanted(&p).0.is_empty());
}

#[test]
fn vxlan_settings_decide_keep_change_or_recreate() {
    let p = plan(vec![]);
    let good = VxlanParams {
        vni: Some(42),
        local: Some(ip("198.18.0.1")),
        port: Some(4789),
        dev: Some(2),
        learning: Some(false),
        proxy: Some(true),
    };
    assert_eq!(vxlan_action(&p, &SETTINGS, &good), VxlanAction::Keep);
    let v = |f: fn(&mut VxlanParams)| {
        let mut x = good.clone();
        f(&mut x);
        vxlan_action(&p, &SETTINGS, &x)
    };
    assert_eq!(v(|x| x.learning = Some(true)), VxlanAction::Change);
    assert_eq!(v(|x| x.learning = None), VxlanAction::Change);
    assert_eq!(v(|x| x.proxy = Some(false)), VxlanAction::Recreate);
    assert_eq!(v(|x| x.vni = Some(43)), VxlanAction::Recreate);
    assert_eq!(v(|x| x.port = Some(4790)), VxlanAction::Recreate);
    assert_eq!(
        v(|x| x.local = Some(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 9)))),
        VxlanAction::Recreate
    );
    assert_eq!(v(|x| x.dev = Some(3)), VxlanAction::Recreate);
    let unknown_underlay = Settings {
        dev: None,
        ..SETTINGS
    };
    assert_eq!(
        vxlan_action(&p, &unknown_underlay, &good),
        VxlanAction::Keep
    );
}
