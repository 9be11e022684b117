//! Kernel data plane in real network namespaces (needs root; skipped
//! otherwise). Each test builds its own "hosts": namespaces
//! `ovldp-<pid>-<n>-h1/h2` joined by a veth underlay (198.18.0.0/24), each
//! with a `Dataplane::new_in(/run/netns/...)`, plus one namespace per
//! container. A `Lab` guard deletes every namespace it made, also when a
//! test fails. Traffic stays inside these namespaces.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use ipnetwork::IpNetwork;
use ovl_agent::dataplane::{
    Dataplane, DataplaneConfig, DataplaneError, FarEnd, KernelView, LocalEndpoint, NetworkMode,
    NetworkPlan, PeerHost, ReconcileReport, RemoteEndpoint, VxlanConfig, VxlanVtep,
};
use ovl_agent::ids::{EndpointId, MacAddr, NodeId, Vni};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Namespaces made by one test; deleted on drop.
struct Lab {
    prefix: String,
    made: Vec<String>,
}

impl Lab {
    fn new() -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Self {
            prefix: format!("ovldp-{}-{n}", std::process::id()),
            made: Vec::new(),
        }
    }

    fn netns(&mut self, tag: &str) -> String {
        let name = format!("{}-{tag}", self.prefix);
        run(&["ip", "netns", "add", &name]);
        self.made.push(name.clone());
        run(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        name
    }

    /// Two hosts joined by a veth underlay: 198.18.0.1 and 198.18.0.2.
    async fn hosts(&mut self) -> (Host, Host) {
        let (a, b) = (self.netns("h1"), self.netns("h2"));
        run(&[
            "ip", "link", "add", "ul0", "netns", &a, "type", "veth", "peer", "name", "ul0",
            "netns", &b,
        ]);
        for (ns, addr) in [(&a, "198.18.0.1/24"), (&b, "198.18.0.2/24")] {
            run(&["ip", "-n", ns, "addr", "add", addr, "dev", "ul0"]);
            run(&["ip", "-n", ns, "link", "set", "ul0", "up"]);
        }
        (
            Host::new(a, "198.18.0.1").await,
            Host::new(b, "198.18.0.2").await,
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Sandboxes first: their bind mounts would keep them alive.
        for ns in &self.made {
            let dir = sandbox_dir(ns);
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.flatten() {
                    let _ = Command::new("umount").arg("-l").arg(e.path()).output();
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
        for ns in self.made.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

struct Host {
    ns: String,
    vtep: IpAddr,
    dp: Dataplane,
}

/// Where the "host" `ns` keeps its networks' sandboxes (one directory
/// per host: two hosts of one test carry the same VNI).
fn sandbox_dir(ns: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{ns}-sandboxes"))
}

fn config(ns: &str, port: u16) -> DataplaneConfig {
    DataplaneConfig {
        vxlan: VxlanConfig { port },
        ..DataplaneConfig::new(sandbox_dir(ns))
    }
}

impl Host {
    async fn new(ns: String, vtep: &str) -> Self {
        let dp = Dataplane::new_in(&netns_path(&ns), config(&ns, 4789))
            .await
            .expect("netlink in host namespace");
        Self {
            ns,
            vtep: vtep.parse().unwrap(),
            dp,
        }
    }

    /// Runs `args` inside the sandbox of `vni` on this host.
    fn in_sb(&self, vni: Vni, args: &[&str]) -> String {
        let path = self.dp.sandbox_path(vni);
        let net = format!("--net={}", path.display());
        let mut all = vec!["nsenter", net.as_str()];
        all.extend_from_slice(args);
        run(&all)
    }

    async fn plan(&self, vni: Vni, remotes: Vec<RemoteEndpoint>) -> NetworkPlan {
        let mtu = self.dp.refresh_underlay(self.vtep).await.expect("underlay");
        NetworkPlan {
            vni,
            mode: NetworkMode::Plain,
            mtu: mtu - 50,
            local_vtep: self.vtep,
            peers: peers_of(&remotes),
            remotes,
            gateway: None,
            egress: false,
        }
    }

    /// A device's ifindex in the sandbox of `vni`.
    fn ifindex(&self, vni: Vni, dev: &str) -> u32 {
        let out = self.in_sb(vni, &["ip", "-o", "link", "show", "dev", dev]);
        out.split(':')
            .next()
            .and_then(|i| i.trim().parse().ok())
            .expect("ifindex")
    }
}

fn netns_path(name: &str) -> PathBuf {
    PathBuf::from(format!("/run/netns/{name}"))
}

fn output(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn")
}

fn run(args: &[&str]) -> String {
    let out = output(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn pings(container: &str, ip: &str) -> bool {
    output(&[
        "ip", "netns", "exec", container, "ping", "-c", "3", "-W", "1", "-i", "0.2", ip,
    ])
    .status
    .success()
}

fn is_root() -> bool {
    // Logs show up for failing tests only.
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipped: needs root (network namespaces)");
    }
    root
}

fn vni(v: u64) -> Vni {
    Vni::new(v).unwrap()
}

fn ep_id(b: u8) -> EndpointId {
    EndpointId::from_bytes([b; 16])
}

fn mac(ip: &str) -> MacAddr {
    MacAddr::from_ipv4(ip.parse().unwrap())
}

fn local(id: u8, netns: &str, cidr: &str) -> LocalEndpoint {
    let addr: IpNetwork = cidr.parse().unwrap();
    let IpAddr::V4(v4) = addr.ip() else {
        panic!("v4")
    };
    LocalEndpoint {
        id: ep_id(id),
        netns: netns_path(netns),
        ifname: "eth0".into(),
        mac: MacAddr::from_ipv4(v4),
        addr,
        mtu: 1450,
        gateway: None,
        far_end: FarEnd::Configured,
    }
}

/// The node id of the host at `vtep` (its last octet, repeated).
fn node_at(vtep: IpAddr) -> NodeId {
    let IpAddr::V4(v4) = vtep else {
        panic!("v4 only")
    };
    NodeId::from_bytes([v4.octets()[3]; 16])
}

fn remote(ip: &str, vtep: IpAddr) -> RemoteEndpoint {
    RemoteEndpoint {
        mac: mac(ip),
        ip: ip.parse().unwrap(),
        node: node_at(vtep),
        vtep,
    }
}

fn peers_of(remotes: &[RemoteEndpoint]) -> Vec<PeerHost> {
    let mut p: Vec<PeerHost> = remotes
        .iter()
        .map(|r| PeerHost {
            node: r.node,
            vtep: r.vtep,
        })
        .collect();
    p.sort();
    p.dedup();
    p
}

#[tokio::test]
async fn overlay_carries_traffic_and_reconciles_exactly() {
    if !is_root() {
        return;
    }
    let mut lab = Lab::new();
    let (h1, h2) = lab.hosts().await;
    let (c1, c2) = (lab.netns("c1"), lab.netns("c2"));
    let net = vni(4242);
    let p1 = h1.plan(net, vec![remote("198.19.1.3", h2.vtep)]).await;
    let p2 = h2.plan(net, vec![remote("198.19.1.2", h1.vtep)]).await;
    assert_eq!(p1.mtu, 1450);

    let r = h1.dp.ensure_network(&p1).await.unwrap();
    assert_eq!(
        r,
        ReconcileReport {
            added: 3,
            removed: 0,
            created_devices: 2
        }
    );
    h2.dp.ensure_network(&p2).await.unwrap();
    h1.dp
        .attach(net, &local(1, &c1, "198.19.1.2/24"))
        .await
        .unwrap();
    h2.dp
        .attach(net, &local(2, &c2, "198.19.1.3/24"))
        .await
        .unwrap();
    assert!(pings(&c1, "198.19.1.3"), "c1 -> c2 over the overlay");
    assert!(pings(&c2, "198.19.1.2"), "c2 -> c1 over the overlay");

    // Idempotent: nothing changes, no device is recreated.
    let host_end = Dataplane::host_ifname(ep_id(1));
    let devs = [
        Dataplane::bridge_name(net),
        VxlanVtep::device_name(net),
        host_end.clone(),
    ];
    let before: Vec<u32> = devs.iter().map(|d| h1.ifindex(net, d)).collect();
    assert_eq!(
        h1.dp.ensure_network(&p1).await.unwrap(),
        ReconcileReport::default()
    );
    h1.dp
        .attach(net, &local(1, &c1, "198.19.1.2/24"))
        .await
        .unwrap();
    // A restarted agent (new connection, no memory) adopts everything.
    let restarted = Dataplane::new_in(&netns_path(&h1.ns), config(&h1.ns, 4789))
        .await
        .unwrap();
    // Before it read the underlay (no lower device known yet).
    assert_eq!(
        restarted.ensure_network(&p1).await.unwrap(),
        ReconcileReport::default()
    );
    restarted.refresh_underlay(h1.vtep).await.unwrap();
    assert_eq!(
        restarted.ensure_network(&p1).await.unwrap(),
        ReconcileReport::default()
    );
    restarted
        .attach(net, &local(1, &c1, "198.19.1.2/24"))
        .await
        .unwrap();
    drop(restarted);
    let after: Vec<u32> = devs.iter().map(|d| h1.ifindex(net, d)).collect();
    assert_eq!(before, after, "devices kept their ifindex");
    assert_eq!(
        h1.dp.kernel_view(NetworkMode::Plain, net).await.unwrap(),
        KernelView {
            fdb: vec![(mac("198.19.1.3"), h2.vtep)],
            neigh: vec![("198.19.1.3".parse().unwrap(), mac("198.19.1.3"))],
            flood: vec![h2.vtep],
            bridge: true,
            vtep: true,
        }
    );
    assert_eq!(h1.dp.networks_present().await.unwrap(), vec![net]);
    // Fixed bridge MAC (02:6f:76 + VNI 4242); the host has no IPv6 address on
    // the overlay (bridge, VXLAN device, host veth end).
    let br = h1.in_sb(net, &["ip", "link", "show", "dev", &devs[0]]);
    assert!(br.contains("02:6f:76:00:10:92"), "{br}");
    for dev in &devs {
        let v6 = h1.in_sb(net, &["ip", "-6", "addr", "show", "dev", dev]);
        assert!(v6.trim().is_empty(), "{dev}: {v6}");
    }
    assert_eq!(
        h1.dp.local_endpoints().await.unwrap(),
        vec![(host_end.clone(), Some(net))]
    );

    // A second remote host: its flood entry is appended next to the first.
    let third: IpAddr = "198.18.0.3".parse().unwrap();
    let mut wide = p1.clone();
    wide.remotes.push(remote("198.19.1.9", third));
    wide.peers = peers_of(&wide.remotes);
    assert_eq!(
        h1.dp.ensure_network(&wide).await.unwrap(),
        ReconcileReport {
            added: 3,
            removed: 0,
            created_devices: 0
        }
    );
    let vx = VxlanVtep::device_name(net);
    let fdb = h1.in_sb(net, &["bridge", "fdb", "show", "dev", &vx]);
    assert_eq!(fdb.matches("00:00:00:00:00:00").count(), 2, "{fdb}");
    assert!(fdb.contains(&mac("198.19.1.9").to_string()), "{fdb}");

    // Removing it from the plan deletes its FDB, neighbour and flood entries.
    assert_eq!(
        h1.dp.ensure_network(&p1).await.unwrap(),
        ReconcileReport {
            added: 0,
            removed: 3,
            created_devices: 0
        }
    );
    let fdb = h1.in_sb(net, &["bridge", "fdb", "show", "dev", &vx]);
    assert!(!fdb.contains(&mac("198.19.1.9").to_string()), "{fdb}");
    assert!(!fdb.contains("198.18.0.3"), "{fdb}");
    assert!(fdb.contains(&mac("198.19.1.3").to_string()), "{fdb}");
    let neigh = h1.in_sb(net, &["ip", "neigh", "show", "dev", &vx]);
    assert!(
        !neigh.contains("198.19.1.9") && neigh.contains("198.19.1.3"),
        "{neigh}"
    );
    assert!(pings(&c1, "198.19.1.3"));

    // An operator deletes the bridge: the next pass puts it and its ports back.
    h1.in_sb(net, &["ip", "link", "del", &Dataplane::bridge_name(net)]);
    let r = h1.dp.ensure_network(&p1).await.unwrap();
    assert_eq!((r.created_devices, r.added, r.removed), (1, 1, 0), "{r:?}");
    assert_eq!(h1.ifindex(net, &vx), before[1], "VXLAN device kept");
    assert!(pings(&c1, "198.19.1.3"), "traffic back after the repair");

    // Detach and remove leave nothing behind, and are idempotent.
    for _ in 0..2 {
        h1.dp.detach(ep_id(1)).await.unwrap();
        h1.dp.remove_network(net).await.unwrap();
    }
    assert!(!h1.dp.endpoint_present(ep_id(1)).await.unwrap());
    assert!(h1.dp.networks_present().await.unwrap().is_empty());
    assert!(h1.dp.local_endpoints().await.unwrap().is_empty());
    assert_eq!(
        h1.dp.kernel_view(NetworkMode::Plain, net).await.unwrap(),
        KernelView::default()
    );
    let links = run(&["ip", "-n", &h1.ns, "-o", "link"]);
    for dev in [&devs[0], &devs[1], &host_end] {
        assert!(!links.contains(dev.as_str()), "{dev} left behind: {links}");
    }
    let sandbox = h1.dp.sandbox_path(net);
    assert!(!sandbox.exists(), "{} left behind", sandbox.display());
    let inside = run(&["ip", "-n", &c1, "-o", "link"]);
    assert!(!inside.contains("eth0"), "{inside}");
}

#[tokio::test]
async fn networks_with_the_same_subnet_stay_isolated() {
    if !is_root() {
        return;
    }
    let mut lab = Lab::new();
    let (h1, h2) = lab.hosts().await;
    let (a1, b1, a2, b2) = (
        lab.netns("a1"),
        lab.netns("b1"),
        lab.netns("a2"),
        lab.netns("b2"),
    );
    let (na, nb) = (vni(10), vni(11));
    // Same subnet, and a1 and b1 even hold the same address.
    let a_on_h2 = remote("198.19.5.3", h2.vtep);
    let b_on_h2 = remote("198.19.5.4", h2.vtep);
    h1.dp
        .ensure_network(&h1.plan(na, vec![a_on_h2]).await)
        .await
        .unwrap();
    h1.dp
        .ensure_network(&h1.plan(nb, vec![b_on_h2]).await)
        .await
        .unwrap();
    h2.dp
        .ensure_network(&h2.plan(na, vec![remote("198.19.5.2", h1.vtep)]).await)
        .await
        .unwrap();
    h2.dp
        .ensure_network(&h2.plan(nb, vec![remote("198.19.5.2", h1.vtep)]).await)
        .await
        .unwrap();
    h1.dp
        .attach(na, &local(1, &a1, "198.19.5.2/24"))
        .await
        .unwrap();
    h1.dp
        .attach(nb, &local(2, &b1, "198.19.5.2/24"))
        .await
        .unwrap();
    h2.dp
        .attach(na, &local(3, &a2, "198.19.5.3/24"))
        .await
        .unwrap();
    h2.dp
        .attach(nb, &local(4, &b2, "198.19.5.4/24"))
        .await
        .unwrap();

    assert!(pings(&a1, "198.19.5.3"), "within A");
    assert!(pings(&b1, "198.19.5.4"), "within B");
    assert!(pings(&a2, "198.19.5.2"), "within A, back");
    assert!(!pings(&a1, "198.19.5.4"), "A must not reach B");
    assert!(!pings(&b1, "198.19.5.3"), "B must not reach A");
    // Even with B's MAC forced into A's neighbour table, frames stay in A.
    let b2_mac = mac("198.19.5.4").to_string();
    run(&[
        "ip",
        "-n",
        &a1,
        "neigh",
        "replace",
        "198.19.5.4",
        "lladdr",
        &b2_mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
    assert!(!pings(&a1, "198.19.5.4"), "A must not reach B by MAC");

    let mut eps = h1.dp.local_endpoints().await.unwrap();
    eps.sort();
    let mut want = vec![
        (Dataplane::host_ifname(ep_id(1)), Some(na)),
        (Dataplane::host_ifname(ep_id(2)), Some(nb)),
    ];
    want.sort();
    assert_eq!(eps, want);
    assert_eq!(h1.dp.networks_present().await.unwrap(), vec![na, nb]);
}

#[tokio::test]
async fn attach_failures_are_clear_and_leave_nothing() {
    if !is_root() {
        return;
    }
    let mut lab = Lab::new();
    let (h1, _h2) = lab.hosts().await;
    let c = lab.netns("c");
    let net = vni(77);
    let ep = local(5, &c, "198.19.7.2/24");

    let e = h1.dp.attach(net, &ep).await.unwrap_err();
    assert!(
        matches!(e, DataplaneError::NetworkMissing(v) if v == net),
        "{e}"
    );
    let plan = h1.plan(net, vec![]).await;
    assert_eq!(
        h1.dp.ensure_network(&plan).await.unwrap().created_devices,
        2
    );

    let gone = LocalEndpoint {
        netns: netns_path(&format!("{}-nope", lab.prefix)),
        ..ep.clone()
    };
    let e = h1.dp.attach(net, &gone).await.unwrap_err();
    assert!(matches!(e, DataplaneError::NamespaceMissing { .. }), "{e}");

    let bad = LocalEndpoint {
        ifname: "eth/0".into(),
        ..ep.clone()
    };
    assert!(matches!(
        h1.dp.attach(net, &bad).await,
        Err(DataplaneError::BadIfname(_))
    ));

    run(&["ip", "-n", &c, "link", "add", "eth0", "type", "bridge"]);
    let e = h1.dp.attach(net, &ep).await.unwrap_err();
    assert!(matches!(e, DataplaneError::IfnameTaken { .. }), "{e}");
    assert!(e.to_string().contains("eth0"), "{e}");
    assert!(!h1.dp.endpoint_present(ep.id).await.unwrap());
    run(&["ip", "-n", &c, "link", "del", "eth0"]);

    // Failure after the pair exists (IPv6 disabled in the container): the
    // pair is removed again.
    run(&[
        "ip",
        "netns",
        "exec",
        &c,
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.disable_ipv6=1",
    ]);
    run(&[
        "ip",
        "netns",
        "exec",
        &c,
        "sysctl",
        "-qw",
        "net.ipv6.conf.default.disable_ipv6=1",
    ]);
    let v6 = LocalEndpoint {
        addr: "2001:db8::2/64".parse().unwrap(),
        ..ep.clone()
    };
    let e = h1.dp.attach(net, &v6).await.unwrap_err();
    assert!(matches!(e, DataplaneError::Netlink { .. }), "{e}");
    assert!(!h1.dp.endpoint_present(ep.id).await.unwrap());
    assert!(!run(&["ip", "-n", &c, "-o", "link"]).contains("eth0"));

    // Attach works afterwards; an agent restarted with another VXLAN port
    // (the VTEP's own setting, not the plan's) recreates only the VXLAN
    // device, and the endpoint stays on its bridge.
    h1.dp.attach(net, &ep).await.unwrap();
    let (br, vx) = (Dataplane::bridge_name(net), VxlanVtep::device_name(net));
    let (br_before, vx_before) = (h1.ifindex(net, &br), h1.ifindex(net, &vx));
    let moved_dp = Dataplane::new_in(&netns_path(&h1.ns), config(&h1.ns, 4790))
        .await
        .unwrap();
    moved_dp.refresh_underlay(h1.vtep).await.unwrap();
    let h1 = Host {
        ns: h1.ns.clone(),
        vtep: h1.vtep,
        dp: moved_dp,
    };
    let moved = plan;
    assert_eq!(
        h1.dp.ensure_network(&moved).await.unwrap().created_devices,
        1
    );
    assert_eq!(h1.ifindex(net, &br), br_before);
    assert_ne!(h1.ifindex(net, &vx), vx_before);
    let details = h1.in_sb(net, &["ip", "-d", "link", "show", "dev", &vx]);
    assert!(
        details.contains("dstport 4790")
            && details.contains("nolearning")
            && details.contains("proxy"),
        "{details}"
    );
    assert!(details.contains(&format!("master {br}")), "{details}");
    assert_eq!(
        h1.dp.local_endpoints().await.unwrap(),
        vec![(Dataplane::host_ifname(ep.id), Some(net))]
    );
    assert_eq!(
        h1.dp.ensure_network(&moved).await.unwrap(),
        ReconcileReport::default()
    );

    // Learning drift is fixed in place, without a new device.
    let vx_now = h1.ifindex(net, &vx);
    h1.in_sb(
        net,
        &["ip", "link", "set", "dev", &vx, "type", "vxlan", "learning"],
    );
    let drifted = h1.in_sb(net, &["ip", "-d", "link", "show", "dev", &vx]);
    assert!(!drifted.contains("nolearning"), "{drifted}");
    assert_eq!(
        h1.dp.ensure_network(&moved).await.unwrap(),
        ReconcileReport::default()
    );
    assert_eq!(h1.ifindex(net, &vx), vx_now);
    let details = h1.in_sb(net, &["ip", "-d", "link", "show", "dev", &vx]);
    assert!(
        details.contains("nolearning") && details.contains(" proxy"),
        "{details}"
    );
}

#[tokio::test]
async fn an_encrypted_network_without_its_vtep_is_refused_and_creates_nothing() {
    if !is_root() {
        return;
    }
    let mut lab = Lab::new();
    let (h1, h2) = lab.hosts().await;
    let net = vni(4244);
    let plain = h1.plan(net, vec![remote("198.19.8.3", h2.vtep)]).await;
    let encrypted = NetworkPlan {
        mode: NetworkMode::Encrypted,
        mtu: plain.mtu - 28,
        ..plain.clone()
    };
    assert!(h1.dp.vtep(NetworkMode::Encrypted).is_none());
    let e = h1.dp.ensure_network(&encrypted).await.unwrap_err();
    assert!(
        matches!(e, DataplaneError::NoVtep { vni, mode: NetworkMode::Encrypted } if vni == net),
        "{e}"
    );
    assert!(e.to_string().contains("encrypted"), "{e}");
    assert!(h1.dp.networks_present().await.unwrap().is_empty());
    let links = run(&["ip", "-n", &h1.ns, "-o", "link"]);
    assert!(!links.contains(&Dataplane::bridge_name(net)), "{links}");
    assert!(!links.contains(&VxlanVtep::device_name(net)), "{links}");
    // The plain VTEP carries the same VNI as a plain network, and the
    // inventory names which VTEP holds it.
    h1.dp.ensure_network(&plain).await.unwrap();
    let inv = h1.dp.inventory().await.unwrap();
    assert_eq!(inv.networks, vec![net]);
    assert_eq!(inv.vteps, vec![(NetworkMode::Plain, vec![net])]);
    assert_eq!(
        h1.dp
            .kernel_view(NetworkMode::Encrypted, net)
            .await
            .unwrap(),
        KernelView {
            bridge: true,
            ..KernelView::default()
        },
        "no encrypted VTEP: nothing of it, only the shared bridge"
    );
    h1.dp.remove_network(net).await.unwrap();
    assert!(h1.dp.networks_present().await.unwrap().is_empty());
}

/// `Icmp: InEchos` of the namespace `nsenter` enters with `args`.
fn in_echos(prefix: &[&str]) -> u64 {
    let mut all = prefix.to_vec();
    all.extend_from_slice(&["cat", "/proc/net/snmp"]);
    let snmp = run(&all);
    let rows: Vec<Vec<&str>> = snmp
        .lines()
        .filter(|l| l.starts_with("Icmp:"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    let i = rows[0].iter().position(|c| *c == "InEchos").unwrap();
    rows[1][i].parse().unwrap()
}

#[tokio::test]
async fn each_host_serves_the_gateway_in_its_sandbox_and_containers_route_through_it() {
    if !is_root() {
        return;
    }
    let mut lab = Lab::new();
    let (h1, h2) = lab.hosts().await;
    let (c1, c2) = (lab.netns("c1"), lab.netns("c2"));
    let net = vni(4250);
    let gw: ipnetwork::Ipv4Network = "198.19.9.1/24".parse().unwrap();
    let mut p1 = h1.plan(net, vec![remote("198.19.9.3", h2.vtep)]).await;
    let mut p2 = h2.plan(net, vec![remote("198.19.9.2", h1.vtep)]).await;
    p1.gateway = Some(gw);
    p2.gateway = Some(gw);
    h1.dp.ensure_network(&p1).await.unwrap();
    h2.dp.ensure_network(&p2).await.unwrap();
    let routed = |id, ns: &str, cidr| LocalEndpoint {
        gateway: Some(gw.ip().into()),
        ..local(id, ns, cidr)
    };
    let (e1, e2) = (
        routed(1, &c1, "198.19.9.2/24"),
        routed(2, &c2, "198.19.9.3/24"),
    );
    h1.dp.attach(net, &e1).await.unwrap();
    h2.dp.attach(net, &e2).await.unwrap();

    // Nothing of the network is in the host namespace: the bridge and the
    // VXLAN device live in the sandbox, and the gateway with them.
    let host_links = run(&["ip", "-n", &h1.ns, "-o", "link"]);
    for dev in [
        Dataplane::bridge_name(net),
        VxlanVtep::device_name(net),
        Dataplane::host_ifname(e1.id),
    ] {
        assert!(
            !host_links.contains(&format!(": {dev}")),
            "{dev}: {host_links}"
        );
    }
    let addrs = h1.in_sb(
        net,
        &[
            "ip",
            "-4",
            "-o",
            "addr",
            "show",
            "dev",
            &Dataplane::bridge_name(net),
        ],
    );
    assert!(addrs.contains("198.19.9.1/24"), "{addrs}");
    // Bridged frames skip the sandbox's netfilter (its egress NAT would
    // otherwise put every overlay frame through conntrack).
    let nf = h1.in_sb(
        net,
        &["cat", "/proc/sys/net/bridge/bridge-nf-call-iptables"],
    );
    assert_eq!(nf.trim(), "0");
    for c in [&c1, &c2] {
        let route = run(&["ip", "-n", c, "route", "show", "default"]);
        assert!(route.contains("via 198.19.9.1 dev eth0"), "{c}: {route}");
    }
    assert!(h1.dp.endpoint_problems(net, &e1).await.unwrap().is_empty());

    // Each container's gateway is its own host's sandbox: h1's answers
    // c1, h2's answers c2, and no echo crosses the overlay.
    let sb = |h: &Host| format!("--net={}", h.dp.sandbox_path(net).display());
    let (s1, s2) = (sb(&h1), sb(&h2));
    let (b1, b2) = (in_echos(&["nsenter", &s1]), in_echos(&["nsenter", &s2]));
    assert!(pings(&c1, "198.19.9.1"), "c1 -> gateway");
    let (m1, m2) = (in_echos(&["nsenter", &s1]), in_echos(&["nsenter", &s2]));
    assert_eq!((m1 - b1, m2 - b2), (3, 0), "c1's gateway is h1");
    assert!(pings(&c2, "198.19.9.1"), "c2 -> gateway");
    let (a1, a2) = (in_echos(&["nsenter", &s1]), in_echos(&["nsenter", &s2]));
    assert_eq!((a1 - m1, a2 - m2), (0, 3), "c2's gateway is h2");
    assert!(
        pings(&c1, "198.19.9.3"),
        "and the overlay still carries c1 -> c2"
    );

    // A container whose default route was removed is put right again.
    run(&["ip", "-n", &c1, "route", "del", "default"]);
    let problems = h1.dp.endpoint_problems(net, &e1).await.unwrap();
    assert!(
        problems.iter().any(|p| p.contains("default route")),
        "{problems:?}"
    );
    h1.dp.attach(net, &e1).await.unwrap();
    assert!(h1.dp.endpoint_problems(net, &e1).await.unwrap().is_empty());

    // Removing the network removes its sandbox, and with it the veths.
    h1.dp.remove_network(net).await.unwrap();
    assert!(!h1.dp.sandbox_path(net).exists());
    let inside = run(&["ip", "-n", &c1, "-o", "link"]);
    assert!(!inside.contains("eth0"), "{inside}");
}
