//! Issue 9 "Gateway and egress", against real agents in network
//! namespaces: an "outside" host on the underlay runs a TCP server; every
//! host's containers reach it through their own host's uplink (the server
//! sees that host's underlay address), also from two networks with the
//! same subnet and from hosts with Docker's firewall (bridge netfilter on,
//! FORWARD policy DROP, set before and after the network exists); an
//! `--internal` network reaches nothing and nothing of it leaves (capture
//! on the uplink); `network rm` leaves no transit, NAT table, FORWARD rule
//! or sandbox behind.
//!
//! Needs root and the binaries (`cargo build --release --workspace --bins`).

mod common;

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use ovl_e2e::{Background, Container, Findings, Lab, host_addr, shared};

const OUTSIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 250);
const PORT: &str = "8080";

/// Docker's host firewall in host k's namespace.
fn docker_firewall(lab: &Lab, k: usize) {
    lab.exec_ok(
        k,
        &["sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=1"],
    )
    .expect("bridge-nf-call-iptables=1");
    lab.exec_ok(k, &["iptables", "-w", "-P", "FORWARD", "DROP"])
        .expect("iptables -P FORWARD DROP");
}

/// Whether container `c` opens a TCP connection to the outside server
/// (a few tries: the first attach of a host sets its egress up).
fn reaches_outside(lab: &Lab, c: &Container, tries: usize) -> bool {
    let target = OUTSIDE.to_string();
    (0..tries).any(|i| {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(300));
        }
        lab.exec_in(c, &["nc", "-z", "-w", "2", &target, PORT])
            .is_ok_and(|o| o.success())
    })
}

/// The sources the outside server saw (`nc -v`: "Connection received on
/// ADDR PORT").
fn sources(server: &Background) -> Vec<String> {
    server
        .lines()
        .iter()
        .filter_map(|l| {
            let rest = l.split("Connection received on ").nth(1)?;
            rest.split_whitespace().next().map(str::to_string)
        })
        .collect()
}

/// What of network `vni`'s egress is left in host k's namespace.
fn egress_traces(lab: &Lab, k: usize, vni: u32) -> Vec<String> {
    let mut left = Vec::new();
    let transit = format!("ovltr-{vni}");
    if lab.link_in(&lab.ns(k), &transit).ok().flatten().is_some() {
        left.push(transit);
    }
    let tables = lab
        .exec_ok(k, &["nft", "list", "tables"])
        .map(|o| o.stdout)
        .unwrap_or_default();
    if tables.contains(&format!("ovl-{vni}")) {
        left.push(format!("nft table ovl-{vni}"));
    }
    let forward = lab
        .exec_ok(k, &["iptables", "-w", "-S", "FORWARD"])
        .map(|o| o.stdout)
        .unwrap_or_default();
    if forward.contains(&format!("ovl network {vni} egress")) {
        left.push("iptables FORWARD rule".into());
    }
    if std::path::Path::new(&lab.sandbox(k, vni)).exists() {
        left.push("sandbox".into());
    }
    left
}

#[test]
fn containers_leave_through_their_hosts_uplink_and_internal_networks_stay_in() {
    let _serial = shared();
    let mut lab = Lab::new(3).expect("lab");
    // h2 has Docker's firewall before any network exists.
    docker_firewall(&lab, 2);
    lab.start_cluster_with(&[1, 2, 3], &["--firewall-recheck", "2s"])
        .expect("cluster");
    let net = lab.network_create(1, "out", &[]).expect("network out");
    // Same subnet, another network: egress must keep them apart.
    let twin = lab
        .network_create(1, "twin", &["--subnet", &net.subnet])
        .expect("network twin");
    let sealed = lab
        .network_create(1, "sealed", &["--internal"])
        .expect("network sealed");
    for n in ["out", "twin", "sealed"] {
        lab.wait_network(&[1, 2, 3], n)
            .expect("networks everywhere");
    }
    let outside = lab.add_outside("out", OUTSIDE).expect("outside host");
    // exec: the server is nc itself, so stopping it stops nc; -n: no
    // reverse lookups (the lab has no DNS), addresses print as numbers.
    let listen = format!("exec nc -lknv {OUTSIDE} {PORT} 2>&1");
    let server = Background::spawn(
        &lab,
        Command::new("ip").args(["netns", "exec", &outside, "sh", "-c", &listen]),
    )
    .expect("outside server");
    std::thread::sleep(Duration::from_millis(300));
    let mut f = Findings::new();

    let mut cs = Vec::new();
    let mut eps = Vec::new();
    for k in 1..=3 {
        let (c, ep) = attached(&mut lab, k, &format!("c{k}"), "out", &[]);
        cs.push(c);
        eps.push(ep);
    }
    // h3 gets Docker's firewall after the network exists there.
    docker_firewall(&lab, 3);
    lab.wait_dataplane(&[1, 2, 3], net.vni, &eps)
        .expect("data plane complete");

    // Every container reaches the outside host, which sees the container's
    // host's underlay address.
    let t = Instant::now();
    for c in &cs {
        f.check(reaches_outside(&lab, c, 10), || {
            format!("{c} cannot reach {OUTSIDE}:{PORT}")
        });
    }
    println!("egress from 3 hosts' containers: {:.2?}", t.elapsed());
    std::thread::sleep(Duration::from_millis(200));
    let seen = sources(&server);
    println!("outside server saw sources {seen:?}");
    for k in 1..=3 {
        let want = host_addr(k).to_string();
        f.check(seen.contains(&want), || {
            format!("no connection from h{k}'s address {want}: {seen:?}")
        });
    }
    f.check(seen.iter().all(|s| s.starts_with("198.18.0.")), || {
        format!("a source that is not a host's underlay address: {seen:?}")
    });

    // The overlay across the firewalled hosts loses nothing.
    for (from, to) in [(0, 1), (1, 2), (2, 0)] {
        let out = lab
            .exec_in(
                &cs[from],
                &["ping", "-c", "5", "-i", "0.2", "-W", "1", &eps[to].ip],
            )
            .map(|o| o.stdout)
            .unwrap_or_default();
        f.check(ping_counts(&out) == Some((5, 5)), || {
            format!("{} -> {}: {out}", cs[from], eps[to].ip)
        });
    }

    // A firewall reload on h3 (Docker's FORWARD DROP stays, every rule
    // and table goes): the agent finds it and puts its rules back.
    lab.exec_ok(3, &["iptables", "-w", "-F", "FORWARD"])
        .expect("iptables -F FORWARD");
    lab.exec_ok(
        3,
        &["nft", "delete", "table", "ip", &format!("ovl-{}", net.vni)],
    )
    .expect("nft delete table");
    let flushed = lab
        .exec_ok(3, &["iptables", "-w", "-S", "FORWARD"])
        .map(|o| o.stdout)
        .unwrap_or_default();
    f.check(!flushed.contains("ovl network"), || {
        format!("h3's FORWARD rules survived the flush: {flushed}")
    });
    let t = Instant::now();
    let back = reaches_outside(&lab, &cs[2], 30);
    println!(
        "egress from h3 after its firewall was flushed: {back} after {:.2?}",
        t.elapsed()
    );
    f.check(back, || {
        "h3's egress did not come back after a firewall flush".into()
    });
    let logged = lab
        .log_tail(3, 400)
        .contains("egress firewall changed from outside");
    f.check(logged, || {
        "h3's agent did not log the firewall repair".into()
    });

    // The twin network (same subnet, same address as c1 on h1) leaves too,
    // and cannot reach the first network's containers.
    let (d1, _) = attached(&mut lab, 1, "d1", "twin", &["--ip", &eps[0].ip]);
    f.check(reaches_outside(&lab, &d1, 10), || {
        format!("{d1} (twin, same subnet and address as c1) cannot reach outside")
    });
    let cross = lab
        .exec_in(&d1, &["ping", "-c", "2", "-W", "1", &eps[1].ip])
        .is_ok_and(|o| o.success());
    f.check(!cross, || {
        format!("{d1} (twin) reached {} of network out", eps[1].ip)
    });
    f.check(reaches_outside(&lab, &cs[0], 3), || {
        "c1 lost its egress when the twin network came up".to_string()
    });

    // An internal network: no default route, nothing out, even when the
    // container adds a route itself; nothing of it crosses h1's uplink.
    let (i1, ie) = attached(&mut lab, 1, "i1", "sealed", &[]);
    let route = lab
        .exec_in(&i1, &["ip", "route", "show", "default"])
        .map(|o| o.stdout)
        .unwrap_or_default();
    f.check(route.trim().is_empty(), || {
        format!("{i1} on an --internal network has a default route: {route}")
    });
    let capture = Background::spawn(
        &lab,
        Command::new("ip").args([
            "netns",
            "exec",
            &lab.ns(1),
            "tcpdump",
            "-l",
            "-n",
            "-i",
            "eth0",
            &format!("host {OUTSIDE} and not arp"),
        ]),
    )
    .expect("tcpdump on h1's uplink");
    std::thread::sleep(Duration::from_millis(500));
    f.check(!reaches_outside(&lab, &i1, 1), || {
        format!("{i1} on an --internal network reached outside")
    });
    let _ = lab.exec_in(
        &i1,
        &["ip", "route", "add", "default", "via", &sealed.gateway],
    );
    f.check(!reaches_outside(&lab, &i1, 1), || {
        format!("{i1} reached outside through its own default route")
    });
    let _ = lab.exec_in(&i1, &["ping", "-c", "2", "-W", "1", &OUTSIDE.to_string()]);
    std::thread::sleep(Duration::from_millis(300));
    let leaked = capture.lines();
    let _ = capture.stop(libc::SIGTERM, Duration::from_secs(2));
    println!(
        "h1 uplink packets to/from {OUTSIDE} during the internal attempts: {}",
        leaked.len()
    );
    f.check(leaked.is_empty(), || {
        format!("packets of the internal network crossed h1's uplink: {leaked:?}")
    });
    let _ = ie;

    // network rm removes every trace of egress on every host.
    for (k, c) in cs.iter().enumerate() {
        lab.detach(k + 1, "out", &c.endpoint_name())
            .expect("detach");
    }
    lab.ctl_ok(1, &["network", "rm", "out"])
        .expect("network rm out");
    let t = Instant::now();
    let mut left = Vec::new();
    while t.elapsed() < Duration::from_secs(10) {
        left = (1..=3)
            .flat_map(|k| {
                egress_traces(&lab, k, net.vni)
                    .into_iter()
                    .map(move |s| format!("h{k}: {s}"))
            })
            .collect();
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "egress traces of out after network rm ({:.2?}): {left:?}",
        t.elapsed()
    );
    f.check(left.is_empty(), || format!("left behind: {left:?}"));
    let _ = twin;
    let _ = server.stop(libc::SIGTERM, Duration::from_secs(2));
    f.finish();
}
