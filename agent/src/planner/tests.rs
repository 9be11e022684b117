use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};

use ovl_proto::records::{EndpointRecord, NetworkRecord};

use super::*;
use crate::membership::{NodeStatus, NodeView};
use crate::store::networks::effective;

fn node(n: u8) -> NodeId {
    NodeId::from_bytes([n; 16])
}

fn vtep(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, 0, n))
}

fn net(encrypted: bool, mtu: u32) -> NetworkView {
    let rec = NetworkRecord {
        id: vec![1; 16],
        name: "a".into(),
        vni: 42,
        subnet: "198.19.0.0/24".into(),
        created_at_ms: 1,
        encrypted,
        mtu,
        ..Default::default()
    };
    let (mut views, invalid) = effective(&[rec], &HashSet::new());
    assert_eq!(invalid, 0);
    views.remove(0)
}

fn ep(owner: u8, last: u8, network: u8) -> EndpointView {
    let rec = EndpointRecord {
        id: vec![last; 16],
        network_id: vec![network; 16],
        name: format!("e{last}"),
        ip: format!("198.19.0.{last}"),
        prefix_len: 24,
        mac: format!("02:42:c6:13:00:{last:02x}"),
        vtep: vtep(owner).to_string(),
        created_at_ms: u64::from(last),
        ..Default::default()
    };
    EndpointView::parse(node(owner), &rec).expect("valid record")
}

fn member(n: u8, status: NodeStatus) -> NodeView {
    NodeView {
        id: node(n),
        name: format!("h{n}"),
        generation: 1,
        gossip_addr: "198.18.0.1:7946".parse().unwrap(),
        advertise_addr: vtep(n).to_string(),
        data_path_addr: vtep(n).to_string(),
        status,
        is_self: n == 1,
        table_version: 1,
        exchange_keys: Vec::new(),
        encrypted_port: 4500,
        data_path_mtu: 1500,
    }
}

fn owners(nodes: &[u8]) -> Owners {
    let mut o = Owners::default();
    for &n in nodes {
        o.vteps.insert(node(n), vtep(n));
    }
    o
}

fn host() -> Host {
    Host {
        me: node(1),
        local_vtep: vtep(1),
        underlay_mtu: 1500,
    }
}

/// The network's MTU with no other member host.
fn mtu(view: &NetworkView, h: &Host) -> u32 {
    mtu_choice(view, &[], &[], h, Including::ThisHost).mtu
}

fn choice(view: &NetworkView, eps: &[EndpointView], nodes: &[NodeView], h: &Host) -> MtuChoice {
    mtu_choice(view, eps, nodes, h, Including::ThisHost)
}

#[test]
fn mtu_depends_on_the_mode_unless_configured() {
    let h = host();
    assert_eq!(mtu(&net(false, 0), &h), 1450);
    assert_eq!(mtu(&net(true, 0), &h), 1422);
    assert_eq!(mtu(&net(true, 1300), &h), 1300, "--mtu wins");
    assert_eq!(mtu(&net(false, 1300), &h), 1300);
    let v6 = Host {
        local_vtep: "2001:db8::1".parse().unwrap(),
        ..h
    };
    assert_eq!(mtu(&net(true, 0), &v6), 1402);
    assert_eq!(mtu(&net(false, 0), &v6), 1450, "plain as before the split");
    let tiny = Host {
        underlay_mtu: 600,
        ..h
    };
    assert_eq!(mtu(&net(true, 0), &tiny), networks::MIN_MTU);
}

fn member_mtu(n: u8, status: NodeStatus, data_path_mtu: u32) -> NodeView {
    NodeView {
        data_path_mtu,
        ..member(n, status)
    }
}

#[test]
fn the_smallest_member_host_sets_the_mtu_everywhere() {
    use NodeStatus::*;
    let nodes = [
        member_mtu(1, Alive, 1500),
        member_mtu(2, Alive, 1400),
        member_mtu(3, Alive, 9000),
        // Not a member (no endpoint in the network): does not count.
        member_mtu(4, Alive, 1280),
    ];
    let eps = [ep(2, 7, 1), ep(3, 8, 1), ep(4, 9, 2)];
    let c = choice(&net(false, 0), &eps, &nodes, &host());
    assert_eq!(c.mtu, 1350);
    assert_eq!(
        c.limit,
        PathLimit {
            mtu: 1350,
            host: node(2)
        }
    );
    assert!(!c.exceeds_path);
    // The plan carries the same, and so does every other host computing it.
    let p = plan(
        &net(false, 0),
        &eps,
        &nodes,
        &owners(&[1, 2, 3, 4]),
        &host(),
    )
    .plan;
    assert_eq!(p.mtu, 1350);
    let on_h3 = Host {
        me: node(3),
        local_vtep: vtep(3),
        underlay_mtu: 9000,
    };
    let eps_h3 = [ep(1, 6, 1), ep(2, 7, 1), ep(3, 8, 1)];
    assert_eq!(choice(&net(false, 0), &eps_h3, &nodes, &on_h3).mtu, 1350);
    // Encrypted: the mode's overhead off the smallest.
    assert_eq!(choice(&net(true, 0), &eps, &nodes, &host()).mtu, 1322);
}

#[test]
fn a_hidden_member_still_counts_and_an_unpublished_one_does_not() {
    use NodeStatus::*;
    let eps = [ep(2, 7, 1), ep(3, 8, 1)];
    let nodes = [member_mtu(2, Dead, 1400), member_mtu(3, Alive, 0)];
    let c = choice(&net(false, 0), &eps, &nodes, &host());
    assert_eq!(c.mtu, 1350, "a restart of h2 must not move the MTU");
    let nodes = [member_mtu(3, Alive, 0)];
    let c = choice(&net(false, 0), &eps, &nodes, &host());
    assert_eq!(
        c.limit,
        PathLimit {
            mtu: 1450,
            host: node(1)
        }
    );
}

#[test]
fn a_host_outside_the_network_names_the_members_mtu() {
    use NodeStatus::*;
    // This host (h1) has a 1280-byte underlay but no endpoint in the
    // network: inspect shows what h2 and h3 use.
    let small_here = Host {
        underlay_mtu: 1280,
        ..host()
    };
    let nodes = [member_mtu(2, Alive, 1500), member_mtu(3, Alive, 1400)];
    let eps = [ep(2, 7, 1), ep(3, 8, 1)];
    let c = mtu_choice(
        &net(false, 0),
        &eps,
        &nodes,
        &small_here,
        Including::MembersOnly,
    );
    assert_eq!(
        c.limit,
        PathLimit {
            mtu: 1350,
            host: node(3)
        }
    );
    // Attaching here would lower it.
    let c = mtu_choice(
        &net(false, 0),
        &eps,
        &nodes,
        &small_here,
        Including::ThisHost,
    );
    assert_eq!(
        c.limit,
        PathLimit {
            mtu: 1230,
            host: node(1)
        }
    );
    // No members: this host's own path.
    let c = mtu_choice(
        &net(false, 0),
        &[],
        &nodes,
        &small_here,
        Including::MembersOnly,
    );
    assert_eq!(c.mtu, 1230);
}

#[test]
fn a_configured_mtu_above_a_members_path_is_flagged_not_changed() {
    let eps = [ep(2, 7, 1)];
    let nodes = [member_mtu(2, NodeStatus::Alive, 1400)];
    let c = choice(&net(false, 1450), &eps, &nodes, &host());
    assert_eq!((c.mtu, c.limit.mtu, c.exceeds_path), (1450, 1350, true));
    let c = choice(&net(false, 1350), &eps, &nodes, &host());
    assert!(!c.exceeds_path);
}

#[test]
fn mode_comes_from_the_definition_and_old_ones_are_plain() {
    assert_eq!(NetworkMode::of(&net(false, 0)), NetworkMode::Plain);
    assert_eq!(NetworkMode::of(&net(true, 0)), NetworkMode::Encrypted);
    let p = plan(&net(true, 0), &[], &[], &Owners::default(), &host()).plan;
    assert_eq!(p.mode, NetworkMode::Encrypted);
    assert_eq!(p.mtu, 1422);
    assert_eq!(p.vni.get(), 42);
    assert_eq!(p.local_vtep, vtep(1));
    assert!(p.remotes.is_empty() && p.peers.is_empty());
}

#[test]
fn remotes_are_live_vetted_foreign_endpoints_of_this_network_sorted() {
    use NodeStatus::*;
    let nodes = [
        member(1, Alive),
        member(2, Alive),
        member(3, Alive),
        member(4, Dead),
    ];
    let eps = [
        ep(3, 9, 1),
        ep(1, 5, 1), // ours: not a remote
        ep(2, 7, 1),
        ep(2, 6, 1),
        ep(4, 8, 1),  // dead owner
        ep(3, 10, 2), // another network
        ep(5, 11, 1), // unknown owner: refused
    ];
    let o = owners(&[1, 2, 3, 4]);
    let got = plan(&net(false, 0), &eps, &nodes, &o, &host());
    let remotes: Vec<(u8, NodeId, IpAddr)> = got
        .plan
        .remotes
        .iter()
        .map(|r| {
            let IpAddr::V4(v4) = r.ip else { panic!("v4") };
            assert_eq!(r.mac, MacAddr::from_ipv4(v4));
            (v4.octets()[3], r.node, r.vtep)
        })
        .collect();
    assert_eq!(
        remotes,
        vec![
            (6, node(2), vtep(2)),
            (7, node(2), vtep(2)),
            (9, node(3), vtep(3))
        ]
    );
    assert_eq!(
        got.plan.peers,
        vec![
            PeerHost {
                node: node(2),
                vtep: vtep(2)
            },
            PeerHost {
                node: node(3),
                vtep: vtep(3)
            },
        ]
    );
    let refused: Vec<(u8, Refusal)> = got
        .refused
        .iter()
        .map(|(e, r)| (e.ip.octets()[3], r.clone()))
        .collect();
    assert_eq!(refused, vec![(11, Refusal::UnknownOwner)]);
}

#[test]
fn the_plan_does_not_depend_on_input_order() {
    let nodes = [
        member(1, NodeStatus::Alive),
        member(2, NodeStatus::Alive),
        member(3, NodeStatus::Alive),
    ];
    let mut eps = vec![ep(3, 9, 1), ep(2, 7, 1), ep(2, 6, 1), ep(3, 4, 1)];
    let o = owners(&[1, 2, 3]);
    let a = plan(&net(true, 0), &eps, &nodes, &o, &host()).plan;
    eps.reverse();
    let b = plan(&net(true, 0), &eps, &nodes, &o, &host()).plan;
    assert_eq!(a, b);
    assert_eq!(a.peers.len(), 2);
}

#[test]
fn a_clashing_row_is_refused_not_planned() {
    // Host 3 publishes a second endpoint holding host 2's address: the
    // older row wins on every host, the other is reported.
    let nodes = [
        member(1, NodeStatus::Alive),
        member(2, NodeStatus::Alive),
        member(3, NodeStatus::Alive),
    ];
    let mut thief = ep(3, 7, 1);
    thief.id = crate::ids::EndpointId::from_bytes([99; 16]);
    thief.record.created_at_ms = 100;
    let eps = [ep(2, 7, 1), thief];
    let got = plan(&net(false, 0), &eps, &nodes, &owners(&[1, 2, 3]), &host());
    assert_eq!(got.plan.remotes.len(), 1);
    assert_eq!(got.plan.remotes[0].node, node(2));
    assert_eq!(got.refused.len(), 1);
    assert!(matches!(got.refused[0].1, Refusal::IpClash(_)));
}
