//! Issue #3 acceptance, against real agents in network namespaces: overlay
//! networks and endpoints (containers = network namespaces) across hosts.
//! The fault tests (attach storm, kill -9, restart under traffic) are in
//! `network_faults.rs`.
//!
//! Needs root and the binaries (`cargo build --release --workspace --bins`).
//! Each test builds its own lab. Tests that measure timing bounds or load
//! the CPU hold `ovl_e2e::exclusive()`, the others `shared()`.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use ovl_e2e::{
    Container, EndpointRow, Findings, Lab, bridge_dev, exclusive, host_addr, host_veth, mac_for_ip,
    shared, vxlan_dev,
};

/// Detach: entries gone on the other hosts within this.
const DETACH_BOUND: Duration = Duration::from_secs(2);
/// Underlay MTU of the lab (veth default) and the VXLAN overhead.
const UNDERLAY_MTU: u32 = 1500;
const VXLAN_OVERHEAD: u32 = 50;

/// Checks an attach result against the contract and the kernel.
fn check_endpoint(lab: &Lab, f: &mut Findings, c: &Container, ep: &EndpointRow, subnet: &str) {
    f.check(in_subnet(&ep.ip, subnet), || {
        format!("{c}: ip {} is not in {subnet}", ep.ip)
    });
    f.check(Some(ep.mac.to_lowercase()) == mac_for_ip(&ep.ip), || {
        format!("{c}: mac {} is not 02:42:<ip octets> of {}", ep.mac, ep.ip)
    });
    f.check(ep.node_name == format!("h{}", c.host), || {
        format!("{c}: node_name {:?}", ep.node_name)
    });
    f.check(ep.vtep == host_addr(c.host).to_string(), || {
        format!("{c}: vtep {:?}, want {}", ep.vtep, host_addr(c.host))
    });
    f.check(ep.ifname == "eth0", || {
        format!("{c}: ifname {:?}", ep.ifname)
    });
    f.check(ep.status == "alive", || {
        format!("{c}: status {:?}", ep.status)
    });
    f.check(ep.name == c.endpoint_name(), || {
        format!("{c}: name {:?}, want {:?}", ep.name, c.endpoint_name())
    });
    // The kernel agrees: eth0 in the container, address/prefix, MAC, MTU, up.
    match lab.link_in(&c.name, "eth0") {
        Ok(Some(link)) => {
            f.check(link.is_up(), || format!("{c}: eth0 is not up: {link:?}"));
            f.check(
                link.address.as_deref().map(str::to_lowercase) == Some(ep.mac.to_lowercase()),
                || format!("{c}: eth0 MAC {:?}, endpoint says {}", link.address, ep.mac),
            );
            f.check(link.mtu == UNDERLAY_MTU - VXLAN_OVERHEAD, || {
                format!(
                    "{c}: eth0 MTU {}, want underlay {UNDERLAY_MTU} - {VXLAN_OVERHEAD}",
                    link.mtu
                )
            });
        }
        Ok(None) => {
            f.check(false, || format!("{c}: no eth0 in the container"));
        }
        Err(e) => {
            f.check(false, || format!("{c}: {e:#}"));
        }
    }
    let want = format!("{}/{}", ep.ip, prefix_len(subnet));
    let addrs = lab.addrs_in(&c.name, "eth0").unwrap_or_default();
    f.check(addrs == vec![want.clone()], || {
        format!("{c}: eth0 addresses {addrs:?}, want [{want}]")
    });
    // The host end of the veth, enslaved to the network's bridge.
    let veth = host_veth(&ep.id);
    match lab.ovl_link(c.host, &veth) {
        Ok(Some(link)) => {
            f.check(link.master.is_some(), || {
                format!("{c}: host veth {veth} has no master")
            });
        }
        other => {
            f.check(false, || {
                format!("{c}: host veth {veth} in h{}: {other:?}", c.host)
            });
        }
    }
}

// ---- 3 hosts x 2 containers: all pairs, TCP, inspect, fdb ---------------------

#[test]
fn three_hosts_six_containers_all_pairs_ping_and_tcp_works() {
    let _serial = exclusive();
    let (mut lab, net) = cluster_with_network(3, "a", &[]);
    let mut f = Findings::new();
    let net_addr = net.subnet.split('/').next().unwrap_or_default();
    f.check(in_subnet(net_addr, "198.19.0.0/16"), || {
        format!(
            "network without --subnet got {} (want a /24 of the lab's pool 198.19.0.0/16)",
            net.subnet
        )
    });
    f.check(prefix_len(&net.subnet) == 24, || {
        format!("default subnet {} is not a /24", net.subnet)
    });
    f.check((1..=16_777_215).contains(&net.vni), || {
        format!("vni {}", net.vni)
    });
    f.check(net.state == "active", || format!("state {:?}", net.state));

    let t = Instant::now();
    let mut eps: Vec<(Container, EndpointRow)> = Vec::new();
    for k in 1..=3 {
        for label in ["c1", "c2"] {
            eps.push(attached(&mut lab, k, label, "a", &[]));
        }
    }
    println!("6 attaches (one at a time) took {:.2?}", t.elapsed());
    for (c, ep) in &eps {
        check_endpoint(&lab, &mut f, c, ep, &net.subnet);
    }
    let ips: BTreeSet<&str> = eps.iter().map(|(_, e)| e.ip.as_str()).collect();
    f.check(ips.len() == 6, || {
        format!("6 endpoints, {} distinct IPs: {ips:?}", ips.len())
    });
    f.check(!ips.contains(net.gateway.as_str()), || {
        format!("an endpoint got the gateway {}", net.gateway)
    });

    let names: Vec<String> = eps.iter().map(|(_, e)| e.name.clone()).collect();
    let took = lab
        .wait_endpoints(&[1, 2, 3], "a", &names)
        .expect("every host lists the 6 endpoints");
    println!("endpoint ls lists all 6 on every host after {took:.2?}");
    let rows: Vec<EndpointRow> = eps.iter().map(|(_, e)| e.clone()).collect();
    let per = lab
        .wait_dataplane(&[1, 2, 3], net.vni, &rows)
        .expect("every host's VXLAN device holds the others' entries");
    println!(
        "data plane (bridge fdb / ip neigh) complete: {}",
        per_host(&per)
    );

    // Every container pings every other: 15 pairs, 3 packets each, at once.
    let mut pairs: Vec<(&Container, &str)> = Vec::new();
    for i in 0..eps.len() {
        for j in i + 1..eps.len() {
            pairs.push((&eps[i].0, eps[j].1.ip.as_str()));
        }
    }
    let t = Instant::now();
    let results = ping_all(&lab, &pairs, 3);
    let mut replies = 0;
    for ((c, ip), r) in pairs.iter().zip(&results) {
        match r {
            Ok((tx, rx)) => {
                replies += rx;
                f.check(*tx == 3 && *rx == 3, || {
                    format!("{c} -> {ip}: {rx}/{tx} replies")
                });
            }
            Err(e) => {
                f.check(false, || format!("{c} -> {ip}: {e:#}"));
            }
        }
    }
    println!(
        "all pairs: {} pairs, {replies}/{} replies in {:.2?}",
        pairs.len(),
        pairs.len() * 3,
        t.elapsed()
    );
    f.check(pairs.len() == 15, || format!("{} pairs", pairs.len()));

    // Full-size packets with DF set cross hosts (no MTU black hole).
    let (h1c1, h3c1) = (&eps[0], &eps[4]);
    let payload = (UNDERLAY_MTU - VXLAN_OVERHEAD - 28).to_string();
    let out = lab
        .exec_in(
            &h1c1.0,
            &[
                "ping", "-n", "-c", "2", "-M", "do", "-s", &payload, "-W", "2", &h3c1.1.ip,
            ],
        )
        .expect("ping");
    f.check(out.success(), || {
        format!("DF ping with {payload} bytes payload h1 -> h3: {out}")
    });

    // TCP between hosts.
    match lab.iperf3(&h1c1.0, &h3c1.0, &h3c1.1.ip, 2) {
        Ok(r) => {
            println!("iperf3 {} -> {} (TCP, 2 s): {r}", h1c1.0, h3c1.0);
            f.check(r.bytes_received > 1_000_000, || {
                format!("iperf3 moved too little: {r}")
            });
        }
        Err(e) => {
            f.check(false, || format!("iperf3 h1 -> h3: {e:#}"));
        }
    }

    // network inspect: per-host peers with their endpoint counts.
    if let Some(d) = f.ok("network inspect a on h2", lab.network_inspect(2, "a")) {
        let mut peers: Vec<(String, String, String, u64)> = d
            .peers
            .iter()
            .map(|p| {
                (
                    p.node_name.clone(),
                    p.vtep.clone(),
                    p.status.clone(),
                    p.endpoints,
                )
            })
            .collect();
        peers.sort();
        let want: Vec<(String, String, String, u64)> = (1..=3)
            .map(|k| {
                (
                    format!("h{k}"),
                    host_addr(k).to_string(),
                    "alive".to_string(),
                    2,
                )
            })
            .collect();
        f.check(peers == want, || {
            format!("inspect peers {peers:?}, want {want:?}")
        });
        f.check(d.endpoints.len() == 6, || {
            format!("inspect lists {} endpoints", d.endpoints.len())
        });
        f.check(d.name == "a" && d.vni == net.vni, || {
            format!("inspect: {d:?}")
        });
        for p in &d.peers {
            println!(
                "inspect a: peer {} vtep {} {} endpoints {} ranges {:?}",
                p.node_name, p.vtep, p.status, p.endpoints, p.ranges
            );
        }
    }

    // ovlctl fdb: local, everything "ok", 4 remote endpoints, 2 remote hosts.
    for k in 1..=3 {
        if let Some(r) = f.ok(&format!("ovlctl fdb a on h{k}"), lab.ovl_fdb(k, "a")) {
            f.check(r.local, || format!("h{k}: fdb says local=false"));
            let bad: Vec<_> = r.entries.iter().filter(|e| e.state != "ok").collect();
            f.check(bad.is_empty(), || {
                format!("h{k}: fdb entries not ok: {bad:?}")
            });
            let count = |kind: &str| r.entries.iter().filter(|e| e.kind == kind).count();
            let got = (count("fdb"), count("neigh"), count("flood"));
            f.check(got == (4, 4, 2), || {
                format!(
                    "h{k}: fdb kinds (fdb, neigh, flood) = {got:?}, want (4, 4, 2): {:?}",
                    r.entries
                )
            });
        }
    }
    f.finish();
}

// ---- two networks, same subnet ------------------------------------------------

#[test]
fn networks_with_the_same_subnet_are_isolated() {
    let _serial = shared();
    let subnet = "198.19.50.0/24";
    let (mut lab, a) = cluster_with_network(2, "a", &["--subnet", subnet]);
    let b = lab
        .network_create(2, "b", &["--subnet", subnet])
        .expect("a second network with the same subnet");
    lab.wait_network(&[1, 2], "b").expect("b everywhere");
    assert_eq!((a.subnet.as_str(), b.subnet.as_str()), (subnet, subnet));
    assert_ne!(a.vni, b.vni, "two networks share a VNI");
    println!("a: vni {}, b: vni {}, both {subnet}", a.vni, b.vni);

    // a1 and b1 on h1 even share address and MAC (in different networks).
    let (a1, ea1) = attached(&mut lab, 1, "a1", "a", &["--ip", "198.19.50.10"]);
    let (b1, eb1) = attached(&mut lab, 1, "b1", "b", &["--ip", "198.19.50.10"]);
    let (a2, ea2) = attached(&mut lab, 2, "a2", "a", &["--ip", "198.19.50.11"]);
    let (b2, eb2) = attached(&mut lab, 2, "b2", "b", &["--ip", "198.19.50.21"]);
    assert_eq!(
        (
            ea1.ip.as_str(),
            eb1.ip.as_str(),
            ea2.ip.as_str(),
            eb2.ip.as_str()
        ),
        (
            "198.19.50.10",
            "198.19.50.10",
            "198.19.50.11",
            "198.19.50.21"
        ),
        "--ip was not honoured"
    );
    let per = lab
        .wait_dataplane(&[1, 2], a.vni, &[ea1.clone(), ea2.clone()])
        .expect("a's data plane");
    println!("a's data plane complete: {}", per_host(&per));
    let per = lab
        .wait_dataplane(&[1, 2], b.vni, &[eb1.clone(), eb2.clone()])
        .expect("b's data plane");
    println!("b's data plane complete: {}", per_host(&per));

    let all = [&a1, &b1, &a2, &b2];
    let echos = |lab: &Lab| -> Vec<u64> {
        all.iter()
            .map(|c| lab.icmp_in_echos(c).expect("InEchos"))
            .collect()
    };
    let mut f = Findings::new();
    // (from, to ip, should answer, index in `all` that must see the echos)
    let cases: [(&Container, &str, bool, Option<usize>); 6] = [
        (&a1, "198.19.50.11", true, Some(2)),
        (&b1, "198.19.50.21", true, Some(3)),
        (&a2, "198.19.50.10", true, Some(0)),
        (&b2, "198.19.50.10", true, Some(1)),
        (&a1, "198.19.50.21", false, None),
        (&b1, "198.19.50.11", false, None),
    ];
    for (from, ip, answers, reached) in cases {
        let before = echos(&lab);
        let out = lab
            .exec_in(
                from,
                &["ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "1", ip],
            )
            .expect("ping");
        let (tx, rx) = ping_counts(&out.stdout).unwrap_or((0, 0));
        let after = echos(&lab);
        let delta: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        println!(
            "{from} -> {ip}: {rx}/{tx} replies; echo requests received by a1 b1 a2 b2: {delta:?}"
        );
        if answers {
            f.check(rx == 3, || {
                format!("{from} -> {ip}: {rx}/{tx} replies, want 3: {out}")
            });
        } else {
            f.check(rx == 0, || {
                format!("{from} -> {ip} crossed networks: {rx} replies")
            });
        }
        for (i, d) in delta.iter().enumerate() {
            let want_some = reached == Some(i);
            f.check(if want_some { *d >= 3 } else { *d == 0 }, || {
                format!(
                    "{from} -> {ip}: {} received {d} echo requests (want {})",
                    all[i],
                    if want_some { ">= 3" } else { "0" }
                )
            });
        }
    }
    f.finish();
}

// ---- detach -----------------------------------------------------------------------

#[test]
fn detach_removes_fdb_and_neighbour_entries_everywhere_within_2s() {
    let _serial = exclusive();
    let (mut lab, net) = cluster_with_network(3, "a", &[]);
    let (h1c1, e11) = attached(&mut lab, 1, "c1", "a", &[]);
    let (_h1c2, e12) = attached(&mut lab, 1, "c2", "a", &[]);
    let (h2c1, e21) = attached(&mut lab, 2, "c1", "a", &[]);
    let (_h3c1, e31) = attached(&mut lab, 3, "c1", "a", &[]);
    let all = vec![e11.clone(), e12.clone(), e21.clone(), e31.clone()];
    let per = lab
        .wait_dataplane(&[1, 2, 3], net.vni, &all)
        .expect("data plane complete");
    println!("data plane complete: {}", per_host(&per));
    assert!(
        lab.ping_once(&h2c1, &e11.ip).expect("ping"),
        "h2/c1 cannot reach h1/c1"
    );

    let mut f = Findings::new();
    let entries_gone = |lab: &Lab, k: usize, ep: &EndpointRow| -> anyhow::Result<bool> {
        let fdb = lab.fdb(k, net.vni)?;
        let neigh = lab.neigh(k, net.vni)?;
        Ok(!fdb.iter().any(|e| e.mac.eq_ignore_ascii_case(&ep.mac))
            && !neigh.iter().any(|n| n.dst == ep.ip))
    };

    // Detach h1/c1: its MAC and IP leave h2's and h3's VXLAN device.
    let start = Instant::now();
    lab.detach(1, "a", &e11.name).expect("endpoint detach");
    let returned = start.elapsed();
    match wait_each(&[2, 3], start, LONG, |k| entries_gone(&lab, k, &e11)) {
        Ok(times) => {
            println!(
                "detach: `endpoint detach` returned after {:.2} s; FDB and neighbour entries gone on {}",
                returned.as_secs_f64(),
                per_host(&times)
            );
            for (k, t) in &times {
                f.check(*t <= DETACH_BOUND, || {
                    format!("h{k}: entries of the detached endpoint gone only after {t:.2?} (> {DETACH_BOUND:?})")
                });
            }
        }
        Err(e) => {
            f.check(false, || format!("entries of the detached endpoint: {e:#}"));
        }
    }
    // The other endpoints are untouched and still reachable.
    let rest = vec![e12.clone(), e21.clone(), e31.clone()];
    f.ok(
        "remaining entries",
        lab.wait_dataplane(&[1, 2, 3], net.vni, &rest).map(|_| ()),
    );
    f.check(lab.ping_once(&h2c1, &e12.ip).unwrap_or(false), || {
        "h2/c1 cannot reach h1/c2 after h1/c1 was detached".into()
    });
    f.check(
        lab.link_in(&h1c1.name, "eth0").ok().flatten().is_none(),
        || "h1/c1 still has eth0 after detach".into(),
    );
    let veth = host_veth(&e11.id);
    f.check(lab.ovl_link(1, &veth).ok().flatten().is_none(), || {
        format!("h1 still has {veth} after detach")
    });
    let names: Vec<String> = rest.iter().map(|e| e.name.clone()).collect();
    match lab.wait_endpoints(&[1, 2, 3], "a", &names) {
        Ok(t) => println!("detach: endpoint ls updated everywhere after {t:.2?}"),
        Err(e) => {
            f.check(false, || format!("{e:#}"));
        }
    }

    // Detach the last endpoint of h1: its flood entries go, and h1's devices.
    let start = Instant::now();
    lab.detach(1, "a", &e12.name).expect("endpoint detach");
    let h1 = host_addr(1).to_string();
    let flood_gone = |lab: &Lab, k: usize| -> anyhow::Result<bool> {
        Ok(entries_gone(lab, k, &e12)?
            && !lab
                .fdb(k, net.vni)?
                .iter()
                .any(|e| e.dst.as_deref() == Some(h1.as_str())))
    };
    match wait_each(&[2, 3], start, LONG, |k| flood_gone(&lab, k)) {
        Ok(times) => {
            println!(
                "detach of h1's last endpoint: all entries pointing at h1 gone on {}",
                per_host(&times)
            );
            for (k, t) in &times {
                f.check(*t <= DETACH_BOUND, || {
                    format!(
                        "h{k}: entries pointing at h1 gone only after {t:.2?} (> {DETACH_BOUND:?})"
                    )
                });
            }
        }
        Err(e) => {
            f.check(false, || {
                format!("entries pointing at h1 after its last detach: {e:#}")
            });
        }
    }
    match wait_each(&[1], start, LONG, |_| {
        Ok(lab.ovl_link(1, &vxlan_dev(net.vni))?.is_none()
            && lab.ovl_link(1, &bridge_dev(net.vni))?.is_none())
    }) {
        Ok(t) => println!(
            "h1's {} and {} removed {}",
            bridge_dev(net.vni),
            vxlan_dev(net.vni),
            per_host(&t)
        ),
        Err(e) => {
            f.check(false, || {
                format!("h1 keeps the network's devices after its last endpoint left: {e:#}")
            });
        }
    }
    f.finish();
}

// ---- bad input ------------------------------------------------------------------

#[test]
fn bad_input_is_refused_with_one_line_errors_and_changes_nothing() {
    let _serial = shared();
    let (mut lab, _net) = cluster_with_network(2, "a", &["--subnet", "198.19.10.0/24"]);
    let (_c1, e1) = attached(&mut lab, 1, "c1", "a", &["--ip", "198.19.10.50"]);
    let h1c2 = lab.add_container(1, "c2").expect("container");
    let h2c1 = lab.add_container(2, "c1").expect("container");
    lab.wait_endpoints(&[1, 2], "a", std::slice::from_ref(&e1.name))
        .expect("h2 sees the endpoint");
    let before = snapshot(&lab, &[1, 2]);
    let missing_ns = format!("/run/netns/{}-no-such-ns", lab.prefix());
    let (p12, p21) = (h1c2.path_str(), h2c1.path_str());

    // (host, args, words of which the error must contain one)
    let cases: Vec<(usize, Vec<&str>, Vec<&str>)> = vec![
        (
            1,
            vec!["network", "create", "bad", "--subnet", "198.19.300.0/24"],
            vec!["subnet", "cidr", "198.19.300.0/24"],
        ),
        (
            1,
            vec!["network", "create", "bad", "--subnet", "198.19.20.0/33"],
            vec!["subnet", "cidr", "prefix", "/33"],
        ),
        (
            1,
            vec!["network", "create", "bad", "--subnet", "not-a-cidr"],
            vec!["subnet", "cidr", "not-a-cidr"],
        ),
        (
            1,
            vec![
                "network",
                "create",
                "bad",
                "--subnet",
                "198.19.20.0/24",
                "--gateway",
                "198.19.21.1",
            ],
            vec!["gateway"],
        ),
        (
            2,
            vec!["network", "create", "bad", "--vni", "0"],
            vec!["vni"],
        ),
        (
            2,
            vec!["network", "create", "bad", "--vni", "16777216"],
            vec!["vni"],
        ),
        (
            2,
            vec!["network", "create", "a"],
            vec!["exists", "already", "\"a\"", "'a'", " a "],
        ),
        (
            2,
            vec!["endpoint", "attach", "nosuch", "--netns", &p21],
            vec!["nosuch"],
        ),
        (
            2,
            vec!["endpoint", "attach", "a", "--netns", &missing_ns],
            vec!["netns", "namespace", "no-such-ns"],
        ),
        (
            2,
            vec![
                "endpoint",
                "attach",
                "a",
                "--netns",
                &p21,
                "--ip",
                "198.19.10.50",
            ],
            vec!["198.19.10.50"],
        ),
        (
            1,
            vec![
                "endpoint",
                "attach",
                "a",
                "--netns",
                &p12,
                "--ip",
                "198.19.10.50",
            ],
            vec!["198.19.10.50"],
        ),
        (
            2,
            vec![
                "endpoint",
                "attach",
                "a",
                "--netns",
                &p21,
                "--ip",
                "198.19.99.5",
            ],
            vec!["198.19.99.5", "subnet"],
        ),
    ];
    let mut f = Findings::new();
    for (k, args, words) in &cases {
        let out = lab.ctl(*k, args).expect("ovlctl");
        let what = format!("h{k}: ovlctl {}", args.join(" "));
        match out.one_line_error() {
            Ok(line) => {
                println!("{what}\n    -> {line}");
                let lower = line.to_lowercase();
                f.check(words.iter().any(|w| lower.contains(&w.to_lowercase())), || {
                    format!("{what}: error does not say what is wrong (want one of {words:?}): {line}")
                });
            }
            Err(e) => {
                f.check(false, || format!("{what}: {e:#}"));
            }
        }
        // JSON format: refused the same way.
        let mut json = vec!["--format", "json"];
        json.extend(args.iter().copied());
        let out = lab.ctl(*k, &json).expect("ovlctl");
        f.ok(
            &format!("{what} (--format json)"),
            out.one_line_error().map(|_| ()),
        );
    }
    let after = snapshot(&lab, &[1, 2]);
    f.check(before == after, || {
        format!("a refused command changed state:\nbefore: {before:#?}\nafter: {after:#?}")
    });
    for c in [&h1c2, &h2c1] {
        let links = lab.links_in(&c.name).unwrap_or_default();
        let names: Vec<&str> = links.iter().map(|l| l.ifname.as_str()).collect();
        f.check(names == vec!["lo"], || {
            format!("{c} got links from a refused attach: {names:?}")
        });
    }
    let h2_devs: Vec<String> = lab.ovl_traces(2).unwrap_or_default();
    f.check(h2_devs.is_empty(), || {
        format!("h2 has ovl devices after refused attaches: {h2_devs:?}")
    });
    // And the agents still work: a correct attach on h2 succeeds.
    if let Some(ep) = f.ok("attach after the refusals", lab.attach("a", &h2c1, &[])) {
        f.check(ep.ip != "198.19.10.50", || "duplicate IP handed out".into());
    }
    f.finish();
}

// ---- encrypted networks (the definition; the data plane is in encrypted.rs) ---------

#[test]
fn an_encrypted_network_replicates_its_mode_beside_a_plain_one() {
    let _serial = shared();
    let (mut lab, plain) = cluster_with_network(2, "p", &["--subnet", "198.19.12.0/24"]);
    let mut f = Findings::new();
    let sec = lab
        .network_create(1, "s", &["--subnet", "198.19.13.0/24", "--encrypted"])
        .expect("network create --encrypted");
    lab.wait_network(&[1, 2], "s").expect("s reaches h2");
    let mtu = |v: &serde_json::Value| v.as_u64().unwrap_or_default();
    f.check(sec.encrypted && sec.mode == "encrypted", || {
        format!("created: {sec:?}")
    });
    f.check(plain.mode == "plain" && !plain.encrypted, || {
        format!("plain: {plain:?}")
    });
    f.check(mtu(&plain.mtu) == mtu(&sec.mtu) + 28, || {
        format!(
            "MTU plain {} vs encrypted {}: want 50 vs 78 bytes of overhead",
            plain.mtu, sec.mtu
        )
    });
    // The mode travels with the definition: h2 lists it too, table and JSON.
    let on_h2 = lab.networks(2).expect("network ls on h2");
    let row = on_h2.iter().find(|n| n.name == "s");
    f.check(
        row.is_some_and(|r| r.encrypted && r.mode == "encrypted" && r.mtu == sec.mtu),
        || format!("h2 lists {row:?}"),
    );
    let table = lab
        .ctl_ok(2, &["network", "ls"])
        .expect("network ls")
        .stdout;
    let line = table
        .lines()
        .find(|l| l.starts_with("s "))
        .unwrap_or_default();
    f.check(line.contains("encrypted"), || {
        format!("h2 network ls:\n{table}")
    });
    let inspect = lab
        .ctl_ok(2, &["network", "inspect", "s"])
        .expect("inspect")
        .stdout;
    f.check(inspect.contains("encrypted"), || {
        format!("h2 inspect:\n{inspect}")
    });

    // Plain works beside it, on the same hosts.
    let (c1, _) = attached(&mut lab, 1, "c1", "p", &[]);
    let (_c2, e2) = attached(&mut lab, 2, "c2", "p", &[]);
    f.ok(
        "plain network beside the encrypted one",
        wait_reachable(&lab, &[(&c1, e2.ip.as_str())], Duration::from_secs(20)).map(|_| ()),
    );
    f.finish();
}

// ---- network rm --------------------------------------------------------------------

#[test]
fn network_rm_is_refused_while_endpoints_exist_unless_forced() {
    let _serial = shared();
    let (mut lab, net) = cluster_with_network(3, "a", &[]);
    let (c, ep) = attached(&mut lab, 2, "c1", "a", &[]);
    lab.wait_endpoints(&[1, 2, 3], "a", std::slice::from_ref(&ep.name))
        .expect("endpoint listed everywhere");
    let mut f = Findings::new();
    for k in [1, 3, 2] {
        let out = lab.ctl(k, &["network", "rm", "a"]).expect("ovlctl");
        match out.one_line_error() {
            Ok(line) => {
                println!("h{k}: network rm a (endpoint on h2) -> {line}");
                f.check(line.to_lowercase().contains("endpoint"), || {
                    format!("h{k}: refusal does not mention the endpoints: {line}")
                });
            }
            Err(e) => {
                f.check(false, || {
                    format!("h{k}: network rm a with an endpoint on h2: {e:#}")
                });
            }
        }
    }
    for k in 1..=3 {
        let listed = lab.networks(k).map(|n| n.iter().any(|n| n.name == "a"));
        f.check(matches!(listed, Ok(true)), || {
            format!("h{k} lost network a after a refused rm: {listed:?}")
        });
    }

    // A network whose endpoint left can be removed without --force.
    let (c3, e3) = attached(&mut lab, 3, "c1", "a", &[]);
    let b = lab.network_create(3, "b", &[]).expect("network b");
    lab.wait_network(&[1, 2, 3], "b").expect("b everywhere");
    let (_cb, eb) = attached(&mut lab, 3, "cb", "b", &[]);
    lab.detach(3, "b", &eb.name).expect("detach from b");
    let t = Instant::now();
    let rm = wait_each(&[1], t, LONG, |_| {
        let out = lab.ctl(1, &["network", "rm", "b"])?;
        Ok(out.success())
    });
    f.ok(
        "network rm b (no endpoints left) on h1",
        rm.map(|t| println!("network rm b accepted {}", per_host(&t))),
    );
    f.ok(
        "b gone everywhere",
        wait_each(&[1, 2, 3], t, LONG, |k| {
            Ok(!lab.networks(k)?.iter().any(|n| n.name == "b"))
        })
        .map(|t| println!("b gone from network ls: {}", per_host(&t))),
    );
    f.check(b.vni != net.vni, || "a and b share a VNI".into());

    // --force removes it everywhere, with its endpoints and devices.
    let start = Instant::now();
    let out = lab
        .ctl(1, &["network", "rm", "--force", "a"])
        .expect("ovlctl");
    f.check(out.success(), || format!("network rm --force a: {out}"));
    match wait_each(&[1, 2, 3], start, LONG, |k| {
        Ok(!lab.networks(k)?.iter().any(|n| n.name == "a") && lab.endpoints(k, None)?.is_empty())
    }) {
        Ok(t) => println!(
            "rm --force: network and endpoints gone from ls on {}",
            per_host(&t)
        ),
        Err(e) => {
            f.check(false, || format!("after rm --force: {e:#}"));
        }
    }
    for k in [2, 3] {
        match wait_each(&[k], start, LONG, |_| {
            Ok(lab.ovl_link(k, &vxlan_dev(net.vni))?.is_none()
                && lab.ovl_link(k, &bridge_dev(net.vni))?.is_none())
        }) {
            Ok(t) => println!("rm --force: devices removed on {}", per_host(&t)),
            Err(e) => {
                f.check(false, || {
                    format!("h{k} keeps the devices of a force-removed network: {e:#}")
                });
            }
        }
    }
    for c in [&c, &c3] {
        f.check(
            lab.link_in(&c.name, "eth0").ok().flatten().is_none(),
            || format!("{c} keeps eth0 of a force-removed network"),
        );
    }
    let _ = e3;
    f.finish();
}

// ---- a namespace that disappears ---------------------------------------------------

#[test]
fn a_deleted_namespace_is_detected_and_its_endpoint_withdrawn() {
    let _serial = shared();
    let (mut lab, net) = cluster_with_network(3, "a", &[]);
    let (h1c1, e11) = attached(&mut lab, 1, "c1", "a", &[]);
    let (h2c1, e21) = attached(&mut lab, 2, "c1", "a", &[]);
    let (_h2c2, e22) = attached(&mut lab, 2, "c2", "a", &[]);
    let (_h3c1, e31) = attached(&mut lab, 3, "c1", "a", &[]);
    let all = vec![e11.clone(), e21.clone(), e22.clone(), e31.clone()];
    lab.wait_dataplane(&[1, 2, 3], net.vni, &all)
        .expect("data plane complete");

    let mut f = Findings::new();
    let start = Instant::now();
    lab.remove_container(&h2c1).expect("ip netns del");
    let veth = host_veth(&e21.id);
    f.ok(
        "the kernel removes the veth",
        wait_each(&[2], start, LONG, |_| Ok(lab.ovl_link(2, &veth)?.is_none()))
            .map(|t| println!("namespace deleted: kernel removed {veth} {}", per_host(&t))),
    );
    let rest = vec![e11.clone(), e22.clone(), e31.clone()];
    let names: Vec<String> = rest.iter().map(|e| e.name.clone()).collect();
    match lab.wait_endpoints(&[1, 2, 3], "a", &names) {
        Ok(_) => println!(
            "namespace deleted: endpoint withdrawn from endpoint ls everywhere after {:.2?}",
            start.elapsed()
        ),
        Err(e) => {
            f.check(false, || {
                format!("endpoint of the deleted namespace not withdrawn: {e:#}")
            });
        }
    }
    match lab.wait_dataplane(&[1, 3], net.vni, &rest) {
        Ok(t) => println!(
            "namespace deleted: h1/h3 data plane updated: {} (total {:.2?})",
            per_host(&t),
            start.elapsed()
        ),
        Err(e) => {
            f.check(false, || {
                format!("entries of the deleted namespace's endpoint: {e:#}")
            });
        }
    }
    f.check(lab.ping_once(&h1c1, &e22.ip).unwrap_or(false), || {
        "h1/c1 cannot reach h2/c2 after h2/c1's namespace was deleted".into()
    });
    f.finish();
}

// ---- ovlctl fdb marks differences ----------------------------------------------------

#[test]
fn ovlctl_fdb_marks_differences_with_the_kernel() {
    let _serial = shared();
    let (mut lab, net) = cluster_with_network(3, "a", &[]);
    let (_c1, e1) = attached(&mut lab, 1, "c1", "a", &[]);
    let (_c2, e2) = attached(&mut lab, 2, "c1", "a", &[]);
    lab.wait_dataplane(&[1, 2], net.vni, &[e1.clone(), e2.clone()])
        .expect("data plane complete");
    let mut f = Findings::new();

    let r = lab.ovl_fdb(1, "a").expect("ovlctl fdb");
    println!("h1 fdb a: local={} {:?}", r.local, r.entries);
    f.check(r.local && r.entries.iter().all(|e| e.state == "ok"), || {
        format!("h1: {r:?}")
    });
    f.check(r.entries.len() == 3, || {
        format!("h1: want fdb + neigh for h2/c1 and a flood entry for h2: {r:?}")
    });
    let r3 = lab.ovl_fdb(3, "a").expect("ovlctl fdb on h3");
    f.check(!r3.local, || {
        format!("h3 has no endpoint of a, yet fdb says local: {r3:?}")
    });

    // Tamper with h1's kernel: remove h2/c1's FDB entry, add a stranger.
    let dev = vxlan_dev(net.vni);
    let vtep2 = host_addr(2).to_string();
    let stranger = "02:42:c6:13:ff:fe";
    let sb = format!("--net={}", lab.sandbox(1, net.vni));
    let b = |args: &[&str]| {
        let mut all = vec!["nsenter", sb.as_str(), "bridge", "fdb"];
        all.extend_from_slice(args);
        let out = std::process::Command::new(all[0])
            .args(&all[1..])
            .output()
            .expect("bridge");
        assert!(out.status.success(), "{all:?}: {out:?}");
    };
    let repaired = |lab: &Lab| -> anyhow::Result<bool> {
        let k = lab.fdb(1, net.vni)?;
        Ok(k.iter().any(|e| e.mac.eq_ignore_ascii_case(&e2.mac))
            && !k.iter().any(|e| e.mac.eq_ignore_ascii_case(stranger)))
    };
    // The agent repairs the kernel within moments, so ovlctl sees the
    // difference only if asked at once: try a few times. Table first, then
    // JSON, then the kernel: a repair is never undone, so whatever the later
    // JSON still marks, the earlier table must mark too.
    let mut observed = false;
    for attempt in 1..=10 {
        b(&["del", &e2.mac, "dev", &dev, "dst", &vtep2, "self"]);
        b(&[
            "add",
            stranger,
            "dev",
            &dev,
            "dst",
            "198.18.0.99",
            "self",
            "permanent",
        ]);
        let tampered = Instant::now();
        let table = lab.ctl_ok(1, &["fdb", "a"]).expect("ovlctl fdb (table)");
        let r = lab.ovl_fdb(1, "a").expect("ovlctl fdb");
        let kernel = lab.fdb(1, net.vni).expect("bridge fdb");
        let row = |mac: &str| {
            r.entries
                .iter()
                .find(|e| e.kind == "fdb" && e.mac.eq_ignore_ascii_case(mac))
                .map(|e| e.state.clone())
        };
        let in_kernel = |mac: &str| kernel.iter().any(|e| e.mac.eq_ignore_ascii_case(mac));
        let table_marks = |mac: &str, state: &str| {
            table
                .stdout
                .lines()
                .any(|l| l.to_lowercase().contains(mac) && l.contains(state))
        };
        let (deleted, extra) = (row(&e2.mac), row(stranger));
        // Each row: marked, or already repaired in the kernel.
        let deleted_ok = match deleted.as_deref() {
            Some("missing") => true,
            Some("ok") => in_kernel(&e2.mac),
            _ => false,
        };
        let extra_ok = match extra.as_deref() {
            Some("extra") => true,
            None => !in_kernel(stranger),
            _ => false,
        };
        f.check(deleted_ok && extra_ok, || {
            format!(
                "attempt {attempt}: ovlctl fdb shows deleted {} as {deleted:?}, stranger as {extra:?}; \
                 kernel: {kernel:?}",
                e2.mac
            )
        });
        if deleted.as_deref() == Some("missing") {
            f.check(table_marks(&e2.mac.to_lowercase(), "missing"), || {
                format!("table does not mark the missing entry:\n{}", table.stdout)
            });
        }
        if extra.as_deref() == Some("extra") {
            f.check(table_marks(stranger, "extra"), || {
                format!("table does not mark the extra entry:\n{}", table.stdout)
            });
        }
        // Not required by the issue; measured for the record.
        let repair = wait_each(&[1], tampered, Duration::from_secs(10), |_| repaired(&lab));
        let repair = match &repair {
            Ok(t) => format!("repaired by the agent {}", per_host(t)),
            Err(e) => format!("not repaired by the agent: {e:#}"),
        };
        if deleted.as_deref() == Some("missing") && extra.as_deref() == Some("extra") {
            println!(
                "attempt {attempt}: fdb marked the deleted entry missing and the stranger extra; {repair}"
            );
            println!("{}", table.stdout.trim_end());
            observed = true;
            break;
        }
        println!("attempt {attempt}: deleted entry {deleted:?}, stranger {extra:?}; {repair}");
        if repair.starts_with("not") {
            break;
        }
    }
    if !observed {
        println!("ovlctl fdb never caught the difference before the agent repaired it");
    }
    f.finish();
}
