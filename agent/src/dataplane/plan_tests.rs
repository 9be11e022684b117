use std::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::dataplane::{Dataplane, RemoteEndpoint};

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
    RemoteEndpoint {
        mac: mac_of(addr),
        ip: ip(addr),
        vtep: ip(vtep),
    }
}

fn plan(remotes: Vec<RemoteEndpoint>) -> NetworkPlan {
    let flood_vteps = remotes.iter().map(|r| r.vtep).collect();
    NetworkPlan {
        vni: Vni::new(42).unwrap(),
        mtu: 1450,
        local_vtep: ip("198.18.0.1"),
        vxlan_port: 4789,
        underlay_ifindex: Some(2),
        remotes,
        flood_vteps,
    }
}

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
    p.flood_vteps = [ip("198.18.0.1"), ip("0.0.0.0"), ip("198.18.0.4")]
        .into_iter()
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
    assert_eq!(vxlan_action(&p, &good), VxlanAction::Keep);
    let v = |f: fn(&mut VxlanParams)| {
        let mut x = good.clone();
        f(&mut x);
        vxlan_action(&p, &x)
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
    let mut unknown_underlay = p.clone();
    unknown_underlay.underlay_ifindex = None;
    assert_eq!(vxlan_action(&unknown_underlay, &good), VxlanAction::Keep);
}

#[test]
fn names_parse_back() {
    let vni = Vni::new(16_777_215).unwrap();
    let br = Dataplane::bridge_name(vni);
    assert!(br.len() <= 15, "{br}");
    assert_eq!(vni_of_device(&br, BRIDGE_PREFIX), Some(vni));
    assert_eq!(
        vni_of_device(&Dataplane::vxlan_name(vni), VXLAN_PREFIX),
        Some(vni)
    );
    for bad in [
        "ovlbr-",
        "ovlbr-0",
        "ovlbr-012",
        "ovlbr-16777216",
        "ovlbr-1x",
        "ovlvx-5",
    ] {
        assert_eq!(vni_of_device(bad, BRIDGE_PREFIX), None, "{bad}");
    }
    let id: EndpointId = "0123456789abcdef0123456789abcdef".parse().unwrap();
    let host = Dataplane::host_ifname(id);
    assert_eq!(host, "ovl01234567");
    assert!(is_host_ifname(&host));
    for bad in [
        "ovlbr-1234",
        "ovl0123456",
        "ovl0123456G",
        "eth0",
        "ovl012345678",
    ] {
        assert!(!is_host_ifname(bad), "{bad}");
    }
    assert_eq!(vni_of_alias(&host_alias(vni, id)), Some(vni));
    assert_eq!(vni_of_alias("ovl vni=x"), None);
    assert_eq!(vni_of_alias("something else"), None);
}

#[test]
fn interface_names_follow_the_kernel_rules() {
    for good in ["eth0", "a", "net-1_x.y", "fifteen-chars-x"] {
        assert!(valid_ifname(good), "{good}");
    }
    for bad in ["", ".", "..", "a/b", "a:b", "a b", "sixteen-chars-xx"] {
        assert!(!valid_ifname(bad), "{bad}");
    }
}

#[test]
fn bridge_mac_is_fixed_unicast_local_and_per_vni() {
    let a = bridge_mac(Vni::new(1).unwrap());
    let b = bridge_mac(Vni::new(0x0a0b0c).unwrap());
    assert_eq!(a.to_string(), "02:6f:76:00:00:01");
    assert_eq!(b.to_string(), "02:6f:76:0a:0b:0c");
    assert_eq!(a.0[0] & 0b11, 0b10, "unicast, locally administered");
    assert_ne!(
        a.0[..2],
        MacAddr::from_ipv4(Ipv4Addr::new(198, 19, 0, 1)).0[..2]
    );
}
