//! Issue 9 "One MTU per network", against real agents in network
//! namespaces. h3's underlay is 1400 bytes, the others' 1500: a network
//! spanning h3 has one MTU (1400 - 50) on every host, so a full-size
//! don't-fragment packet crosses between every pair; h3 joining a network
//! lowers the endpoints already on it, live; an explicit `--mtu` above
//! what h3 carries is flagged by `network inspect`.
//!
//! Needs root and the binaries (`cargo build --release --workspace --bins`).

mod common;

use std::time::{Duration, Instant};

use common::*;
use ovl_e2e::kernel::host_veth;
use ovl_e2e::{Container, EndpointRow, Findings, Lab, shared};

const BIG: u32 = 1500;
const SMALL: u32 = 1400;
const VXLAN_OVERHEAD: u32 = 50;
/// The acceptance bound for existing endpoints to follow a smaller host.
const LOWER_BOUND: Duration = Duration::from_secs(5);

/// eth0's MTU in the container and its host end's on its host.
fn pair_mtu(lab: &Lab, c: &Container, ep: &EndpointRow) -> (u32, u32) {
    let inside = lab
        .link_in(&c.name, "eth0")
        .ok()
        .flatten()
        .map_or(0, |l| l.mtu);
    let host = lab
        .ovl_link(c.host, &host_veth(&ep.id))
        .ok()
        .flatten()
        .map_or(0, |l| l.mtu);
    (inside, host)
}

/// Polls until every pair is at `want` or `bound` passes; returns the time
/// it took and the last reading.
fn wait_mtu(
    lab: &Lab,
    eps: &[&(Container, EndpointRow)],
    want: u32,
    bound: Duration,
) -> (Duration, Vec<(u32, u32)>) {
    let t = Instant::now();
    loop {
        let now: Vec<_> = eps.iter().map(|(c, e)| pair_mtu(lab, c, e)).collect();
        if now.iter().all(|&p| p == (want, want)) || t.elapsed() > bound {
            return (t.elapsed(), now);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A don't-fragment ping whose packets are exactly `mtu` bytes.
fn df_ping(lab: &Lab, from: &Container, to: &EndpointRow, mtu: u32) -> bool {
    let payload = (mtu - 28).to_string();
    lab.exec_in(
        from,
        &[
            "ping", "-n", "-c", "2", "-i", "0.2", "-M", "do", "-s", &payload, "-W", "2", &to.ip,
        ],
    )
    .is_ok_and(|o| o.success())
}

#[test]
fn a_network_has_one_mtu_set_by_its_smallest_host_and_follows_it_live() {
    let _serial = shared();
    let mut lab = Lab::new(3).expect("lab");
    lab.exec_ok(3, &["ip", "link", "set", "eth0", "mtu", &SMALL.to_string()])
        .expect("h3 underlay MTU");
    lab.start_cluster(&[1, 2, 3]).expect("cluster");
    lab.network_create(1, "mtu", &[]).expect("create mtu");
    lab.network_create(1, "fixed", &["--mtu", "1450"])
        .expect("create fixed");
    lab.wait_network(&[1, 2, 3], "mtu").expect("mtu listed");
    lab.wait_network(&[1, 2, 3], "fixed").expect("fixed listed");
    let mut f = Findings::new();
    let (big, small) = (BIG - VXLAN_OVERHEAD, SMALL - VXLAN_OVERHEAD);

    // Only the 1500-byte hosts: their MTU.
    let a1 = attached(&mut lab, 1, "a1", "mtu", &[]);
    let a2 = attached(&mut lab, 2, "a2", "mtu", &[]);
    let (_, now) = wait_mtu(&lab, &[&a1, &a2], big, Duration::ZERO);
    f.check(now.iter().all(|&p| p == (big, big)), || {
        format!("before h3 joins, (container, host end) MTUs {now:?}, want {big}")
    });

    // h3 joins: its endpoint starts at the network's MTU, the others
    // follow it live.
    let a3 = attached(&mut lab, 3, "a3", "mtu", &[]);
    let three = [&a1, &a2, &a3];
    let (took, now) = wait_mtu(&lab, &three, small, LOWER_BOUND);
    println!("after h3 (underlay {SMALL}) joined: MTUs {now:?} after {took:.2?}");
    f.check(now.iter().all(|&p| p == (small, small)), || {
        format!("{LOWER_BOUND:?} after h3 joined, (container, host end) MTUs {now:?}, want {small}")
    });
    for (c, _) in &three {
        for (d, ep) in &three {
            if c.host != d.host {
                f.check(df_ping(&lab, c, ep, small), || {
                    format!("DF ping of {small} bytes {c} -> {d} failed")
                });
            }
        }
    }
    // Control: h3's underlay really is smaller (what a per-host MTU of
    // 1450 on h1 would have sent is lost), and the probe itself works.
    f.check(!underlay_ping(&lab, 1, 3, BIG), || {
        format!("a {BIG}-byte DF packet crossed h1 -> h3's {SMALL}-byte underlay: the lab proves nothing")
    });
    f.check(underlay_ping(&lab, 1, 3, SMALL), || {
        format!("a {SMALL}-byte DF packet h1 -> h3 underlay failed")
    });
    for k in 1..=3 {
        match lab.network_inspect(k, "mtu") {
            Ok(d) => {
                f.check(d.mtu == small && d.path_mtu == small, || {
                    format!(
                        "h{k} inspect: mtu {} path_mtu {}, want {small}",
                        d.mtu, d.path_mtu
                    )
                });
                let h3 = d.peers.iter().find(|p| p.node_name == lab.node_name(3));
                f.check(h3.is_some_and(|p| p.data_path_mtu == SMALL), || {
                    format!(
                        "h{k} inspect: h3's data-path MTU {:?}",
                        h3.map(|p| p.data_path_mtu)
                    )
                });
            }
            Err(e) => {
                f.check(false, || format!("h{k} inspect: {e:#}"));
            }
        }
    }

    // h3 leaves: back to the larger MTU.
    lab.detach(3, "mtu", &a3.0.endpoint_name())
        .expect("detach a3");
    let (took, now) = wait_mtu(&lab, &[&a1, &a2], big, LOWER_BOUND);
    println!("after h3 left: MTUs {now:?} after {took:.2?}");
    f.check(now.iter().all(|&p| p == (big, big)), || {
        format!("after h3 left, MTUs {now:?}, want {big}")
    });

    // --mtu above what h3 carries: kept, and flagged.
    let _b1 = attached(&mut lab, 1, "b1", "fixed", &[]);
    let _b3 = attached(&mut lab, 3, "b3", "fixed", &[]);
    let t = Instant::now();
    let mut warning = String::new();
    while t.elapsed() < LOWER_BOUND && warning.is_empty() {
        warning = lab
            .network_inspect(1, "fixed")
            .map(|d| d.mtu_warning)
            .unwrap_or_default();
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("fixed --mtu 1450 with h3: {warning:?}");
    f.check(
        warning.contains(&lab.node_name(3)) && warning.contains(&small.to_string()),
        || format!("inspect warning {warning:?}, want one naming h3 and {small}"),
    );
    let table = lab
        .ctl_ok(1, &["network", "inspect", "fixed"])
        .map(|o| o.stdout)
        .unwrap_or_default();
    f.check(table.contains("warning: --mtu 1450 exceeds"), || {
        format!("inspect table shows no warning:\n{table}")
    });
    f.finish();
}

/// A don't-fragment ping of `size` bytes from host `k` to host `to`'s
/// underlay address.
fn underlay_ping(lab: &Lab, k: usize, to: usize, size: u32) -> bool {
    let payload = (size - 28).to_string();
    let dst = lab.addr(to).to_string();
    lab.exec(
        k,
        &[
            "ping", "-n", "-c", "1", "-M", "do", "-s", &payload, "-W", "1", &dst,
        ],
    )
    .is_ok_and(|o| o.success())
}
