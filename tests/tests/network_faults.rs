//! Issue #3 acceptance under load and faults: a concurrent attach storm,
//! `kill -9` of an agent while traffic flows, and agent restarts under a
//! continuous ping. Every test here holds `ovl_e2e::exclusive()`: they load
//! the CPU or count single lost pings.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use ovl_e2e::cmd::run_all;
use ovl_e2e::{
    Container, EndpointRow, Findings, Lab, Ping, PingReport, bridge_dev, exclusive, host_veth,
    vxlan_dev,
};

/// A dead host's endpoints leave the other hosts' data plane within this;
/// membership failure detection has the same bound.
const DEAD_BOUND: Duration = Duration::from_secs(5);
/// Pings keep running at least this long after an agent restart: past the
/// reconciler's warm-up (2 s) and its first passes, where a restarted agent
/// that mishandles the kernel state it adopts would cut traffic.
const AFTER_RESTART: Duration = Duration::from_secs(5);

/// Sleeps until `since + d` (at least `min`).
fn sleep_until(since: Instant, d: Duration, min: Duration) {
    thread::sleep(d.saturating_sub(since.elapsed()).max(min));
}

/// Seconds from `since` to `at` (for placing events on a ping's timeline).
fn offset(since: SystemTime, at: SystemTime) -> f64 {
    at.duration_since(since).map_or(0.0, |d| d.as_secs_f64())
}

/// The ifindex of each given device of host k (0 when missing).
fn ifindexes(lab: &Lab, k: usize, devs: &[String]) -> Vec<(String, u32)> {
    devs.iter()
        .map(|d| {
            let idx = lab.ovl_link(k, d).ok().flatten().map_or(0, |l| l.ifindex);
            (d.clone(), idx)
        })
        .collect()
}

/// h{k}'s devices of an endpoint: bridge, VXLAN device, host veth.
fn endpoint_devices(vni: u32, ep: &EndpointRow) -> Vec<String> {
    vec![bridge_dev(vni), vxlan_dev(vni), host_veth(&ep.id)]
}

/// Whether host k's kernel has no trace of endpoint `ep` (nor, if
/// `host_gone`, a flood entry to its VTEP).
fn hidden_on(
    lab: &Lab,
    k: usize,
    vni: u32,
    ep: &EndpointRow,
    host_gone: bool,
) -> anyhow::Result<bool> {
    let fdb = lab.fdb(k, vni)?;
    let neigh = lab.neigh(k, vni)?;
    let mac = fdb.iter().any(|e| e.mac.eq_ignore_ascii_case(&ep.mac));
    let flood = fdb
        .iter()
        .any(|e| e.is_flood() && e.dst.as_deref() == Some(ep.vtep.as_str()));
    let ip = neigh.iter().any(|n| n.dst == ep.ip);
    Ok(!(mac || ip || (host_gone && flood)))
}

// ---- attach storm -------------------------------------------------------------

#[test]
fn attach_storm_60_concurrent_attaches_get_distinct_reachable_ips() {
    let _serial = exclusive();
    let (mut lab, net) = cluster_with_network(3, "a", &[]);
    let (probe, eprobe) = attached(&mut lab, 1, "probe", "a", &[]);
    let mut f = Findings::new();

    let t = Instant::now();
    let mut containers: Vec<Container> = Vec::new();
    for k in 1..=3 {
        for i in 1..=20 {
            containers.push(
                lab.add_container(k, &format!("s{i:02}"))
                    .expect("container"),
            );
        }
    }
    println!(
        "storm: 60 container namespaces created in {:.2?}",
        t.elapsed()
    );

    let cmds: Vec<Command> = containers
        .iter()
        .map(|c| {
            let args = Lab::attach_args("a", c, &[]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            lab.ctl_command(c.host, &args).expect("ovlctl")
        })
        .collect();
    let t = Instant::now();
    let results = run_all(cmds, Duration::from_secs(120));
    let storm = t.elapsed();

    let mut eps: Vec<(Container, EndpointRow)> = Vec::new();
    for (c, r) in containers.iter().zip(results) {
        let parsed = r.and_then(|out| {
            let out = out.ok()?;
            serde_json::from_str::<EndpointRow>(&out.stdout)
                .map_err(|e| anyhow::anyhow!("{e}: {out}"))
        });
        if let Some(ep) = f.ok(&format!("attach {c}"), parsed) {
            eps.push((c.clone(), ep));
        }
    }
    let ips: BTreeSet<&str> = eps.iter().map(|(_, e)| e.ip.as_str()).collect();
    println!(
        "storm: 60 attaches in {:.1} s, {} succeeded, {} distinct IPs",
        storm.as_secs_f64(),
        eps.len(),
        ips.len()
    );
    f.check(eps.len() == 60 && ips.len() == 60, || {
        format!(
            "{} attaches succeeded with {} distinct IPs",
            eps.len(),
            ips.len()
        )
    });
    f.check(!ips.contains(eprobe.ip.as_str()), || {
        format!("a storm endpoint got the probe's IP {}", eprobe.ip)
    });
    f.check(!ips.contains(net.gateway.as_str()), || {
        format!("a storm endpoint got the gateway {}", net.gateway)
    });
    for (c, ep) in &eps {
        f.check(in_subnet(&ep.ip, &net.subnet), || {
            format!("{c}: {} not in {}", ep.ip, net.subnet)
        });
        f.check(ep.node_name == format!("h{}", c.host), || {
            format!("{c} attached on h{} but owned by {}", c.host, ep.node_name)
        });
        let want = format!("{}/{}", ep.ip, prefix_len(&net.subnet));
        let have = lab.addrs_in(&c.name, "eth0").unwrap_or_default();
        f.check(have == vec![want.clone()], || {
            format!("{c}: eth0 has {have:?}, attach said {want}")
        });
    }

    let mut all: Vec<EndpointRow> = eps.iter().map(|(_, e)| e.clone()).collect();
    all.push(eprobe.clone());
    let names: Vec<String> = all.iter().map(|e| e.name.clone()).collect();
    match lab.wait_endpoints(&[1, 2, 3], "a", &names) {
        Ok(t) => println!(
            "storm: endpoint ls lists all {} everywhere {:.2} s after the storm",
            names.len(),
            t.as_secs_f64()
        ),
        Err(e) => {
            f.check(false, || format!("{e:#}"));
        }
    }
    match lab.wait_dataplane(&[1, 2, 3], net.vni, &all) {
        Ok(t) => println!("storm: data plane complete: {}", per_host(&t)),
        Err(e) => {
            f.check(false, || format!("{e:#}"));
        }
    }
    let pairs: Vec<(&Container, &str)> = eps.iter().map(|(_, e)| (&probe, e.ip.as_str())).collect();
    let t = Instant::now();
    match wait_reachable(&lab, &pairs, LONG) {
        Ok(first) => {
            let last = first.values().max().copied().unwrap_or_default();
            println!(
                "storm: {}/{} reachable from h1 (all within {:.2} s of probing)",
                first.len(),
                pairs.len(),
                last.as_secs_f64()
            );
        }
        Err(e) => {
            f.check(false, || {
                format!("reachability from h1 after {:.1?}: {e:#}", t.elapsed())
            });
        }
    }
    f.check(pairs.len() == 60, || {
        format!("only {} endpoints to probe", pairs.len())
    });
    f.finish();
}

// ---- kill -9 -----------------------------------------------------------------------

#[test]
fn kill_9_of_an_agent_leaves_other_traffic_alone_and_recovers() {
    let _serial = exclusive();
    let (mut lab, net) = cluster_with_network(3, "a", &[]);
    let (h1c1, e1) = attached(&mut lab, 1, "c1", "a", &[]);
    let (h2c1, e2) = attached(&mut lab, 2, "c1", "a", &[]);
    let (h3c1, e3) = attached(&mut lab, 3, "c1", "a", &[]);
    let all = vec![e1.clone(), e2.clone(), e3.clone()];
    lab.wait_dataplane(&[1, 2, 3], net.vni, &all)
        .expect("data plane complete");
    let mut f = Findings::new();

    let mut p13 = lab.start_ping(&h1c1, &e3.ip).expect("ping h1 -> h3");
    let mut p31 = lab.start_ping(&h3c1, &e1.ip).expect("ping h3 -> h1");
    let mut p12 = lab.start_ping(&h1c1, &e2.ip).expect("ping h1 -> h2");
    for p in [&mut p13, &mut p31, &mut p12] {
        p.wait_replies(10, Duration::from_secs(10))
            .expect("pings flow");
    }
    let t0 = p12.started();
    let devs = endpoint_devices(net.vni, &e2);
    let before = ifindexes(&lab, 2, &devs);

    let killed_at = SystemTime::now();
    let t_kill = Instant::now();
    lab.kill_agent(2).expect("kill -9 h2's agent");
    let after_kill = ifindexes(&lab, 2, &devs);
    f.check(after_kill == before, || {
        format!("h2's devices changed when its agent died: {before:?} -> {after_kill:?}")
    });

    match wait_each(&[1, 3], t_kill, LONG, |k| {
        Ok(lab
            .nodes(k)?
            .iter()
            .any(|n| n.name == "h2" && n.status == "dead"))
    }) {
        Ok(t) => {
            println!("kill -9 h2: reported dead on {}", per_host(&t));
            for (k, d) in &t {
                f.check(*d <= DEAD_BOUND, || {
                    format!("h{k} took {d:.2?} to report h2 dead")
                });
            }
        }
        Err(e) => {
            f.check(false, || format!("h2 never reported dead: {e:#}"));
        }
    }
    match wait_each(&[1, 3], t_kill, LONG, |k| {
        hidden_on(&lab, k, net.vni, &e2, true)
    }) {
        Ok(t) => {
            println!(
                "kill -9 h2: its endpoint hidden from the data plane on {}",
                per_host(&t)
            );
            for (k, d) in &t {
                f.check(*d <= DEAD_BOUND, || {
                    format!("h{k} took {d:.2?} (> {DEAD_BOUND:?}) to hide the dead host's endpoint")
                });
            }
        }
        Err(e) => {
            f.check(false, || {
                format!("dead host's endpoint never hidden: {e:#}")
            });
        }
    }
    if let Some(rows) = f.ok("endpoint ls on h1", lab.endpoints(1, Some("a"))) {
        let st: Vec<(String, String)> = rows
            .iter()
            .map(|r| (r.name.clone(), r.status.clone()))
            .collect();
        println!("h1 endpoint ls while h2 is dead: {st:?}");
        f.check(
            rows.iter().any(|r| r.name == e2.name && r.status == "dead"),
            || format!("h1 does not show h2's endpoint as dead: {st:?}"),
        );
    }

    let restarted_at = SystemTime::now();
    let t_restart = Instant::now();
    lab.restart_agent(2).expect("restarting h2's agent");
    let ready = t_restart.elapsed();
    match wait_each(&[1, 3], t_restart, LONG, |k| {
        Ok(lab
            .nodes(k)?
            .iter()
            .any(|n| n.name == "h2" && n.status == "alive"))
    }) {
        Ok(t) => println!(
            "restart h2 (socket answered after {:.2} s): alive again on {}",
            ready.as_secs_f64(),
            per_host(&t)
        ),
        Err(e) => {
            f.check(false, || format!("h2 not alive again: {e:#}"));
        }
    }
    match lab.wait_dataplane(&[1, 2, 3], net.vni, &all) {
        Ok(t) => println!(
            "restart h2: endpoints restored in the data plane after {:.2} s ({})",
            t_restart.elapsed().as_secs_f64(),
            per_host(&t)
        ),
        Err(e) => {
            f.check(false, || {
                format!("dead host's endpoint not restored: {e:#}")
            });
        }
    }
    let restart_off = offset(t0, restarted_at);
    let recovered = wait_each(&[1], t_restart, LONG, |_| {
        let p = p12.progress();
        Ok(p.replies.values().filter(|&&t| t > restart_off).count() >= 20)
    });
    f.ok(
        "h1 -> h2 pings recover after h2's agent restarts",
        recovered.map(|_| ()),
    );
    let after_restart = ifindexes(&lab, 2, &devs);
    f.check(after_restart == before, || {
        format!("h2's restarted agent recreated devices (data path flap): {before:?} -> {after_restart:?}")
    });
    sleep_until(t_restart, AFTER_RESTART, Duration::from_secs(1));

    let reports: Vec<PingReport> = [p13, p31, p12]
        .into_iter()
        .map(|p: Ping| p.stop().expect("stopping ping"))
        .collect();
    let kill_off = offset(t0, killed_at);
    println!(
        "timeline (s since the pings started): kill -9 at {kill_off:.2}, restart at {restart_off:.2}"
    );
    for r in &reports {
        println!("{r}");
    }
    let (r13, r31, r12) = (&reports[0], &reports[1], &reports[2]);
    for r in [r13, r31] {
        f.check(r.lost.is_empty(), || {
            format!("h1<->h3 traffic disturbed by h2's agent dying: {r}")
        });
    }
    // h1 -> h2 may stop while h2 is hidden, but not after it is back.
    let back = r12
        .replies
        .iter()
        .find(|&(_, &t)| t > restart_off)
        .map(|(&s, _)| s);
    if let Some(back) = back {
        let late: Vec<u64> = r12.lost.iter().copied().filter(|&s| s > back).collect();
        f.check(late.is_empty(), || {
            format!("h1 -> h2 lost pings after it had recovered (seq {back} at restart): {late:?}")
        });
        if let Some(t) = r12.reply_time(back) {
            println!(
                "h1 -> h2: first reply after the restart {:.2} s after restart began",
                t - restart_off
            );
        }
    } else {
        f.check(false, || {
            format!("h1 -> h2 never answered after the restart: {r12}")
        });
    }
    // h2's container works for its peers.
    for (c, ip) in [(&h2c1, &e1.ip), (&h2c1, &e3.ip)] {
        let ok = ping_all(&lab, &[(c, ip.as_str())], 3);
        f.check(matches!(ok[0], Ok((3, 3))), || {
            format!("{c} -> {ip} after restart: {:?}", ok[0])
        });
    }
    f.finish();
}

// ---- restart under traffic ------------------------------------------------------

#[test]
fn restarting_an_agent_under_continuous_ping_and_dns_queries_loses_nothing() {
    let _serial = exclusive();
    let (mut lab, net) = cluster_with_network(3, "a", &[]);
    let (h1c1, e1) = attached(&mut lab, 1, "c1", "a", &[]);
    let (_h2c1, e2) = attached(&mut lab, 2, "c1", "a", &[]);
    let (_h3c1, e3) = attached(&mut lab, 3, "c1", "a", &["--name", "far"]);
    let all = vec![e1.clone(), e2.clone(), e3.clone()];
    lab.wait_dataplane(&[1, 2, 3], net.vni, &all)
        .expect("data plane complete");
    let devs = endpoint_devices(net.vni, &e1);
    let before = ifindexes(&lab, 1, &devs);
    let mut f = Findings::new();

    for (how, graceful) in [("SIGTERM + start", true), ("kill -9 + start", false)] {
        let mut p = lab.start_ping(&h1c1, &e3.ip).expect("ping h1 -> h3");
        p.wait_replies(20, Duration::from_secs(10))
            .expect("pings flow");
        // h1's own resolver, in h1's sandbox, answers for a name on h3.
        let mut q = lab
            .start_dns_queries(&h1c1, &net.gateway, "far", &e3.ip)
            .expect("dig loop on h1");
        q.wait_answers(5, Duration::from_secs(10))
            .expect("names resolve");
        let t0 = p.started();
        let down_at = SystemTime::now();
        let t = Instant::now();
        if graceful {
            match lab.stop_agent(1) {
                Ok(status) => {
                    f.check(status.success(), || {
                        format!("h1's agent exited with {status} on SIGTERM")
                    });
                }
                Err(e) => {
                    f.check(false, || format!("stopping h1's agent: {e:#}"));
                }
            }
        } else {
            lab.kill_agent(1).expect("kill -9");
        }
        let down = t.elapsed();
        lab.restart_agent(1).expect("starting h1's agent again");
        let ready = t.elapsed();
        let settled = lab
            .wait_members(&[1, 2, 3])
            .and_then(|_| {
                lab.wait_endpoints(
                    &[1, 2, 3],
                    "a",
                    &all.iter().map(|e| e.name.clone()).collect::<Vec<_>>(),
                )
            })
            .and_then(|_| lab.wait_dataplane(&[1, 2, 3], net.vni, &all));
        f.ok(
            &format!("{how}: cluster and data plane settle"),
            settled.map(|_| ()),
        );
        let settled_after = t.elapsed();
        sleep_until(t, AFTER_RESTART, Duration::from_secs(2));
        let r = p.stop().expect("stopping ping");
        let d = q.stop().expect("stopping the dig loop");
        println!("restart ({how}): {d}");
        f.check(d.failed.is_empty() && d.answered > 0, || {
            format!("restart ({how}) failed DNS queries: {d}")
        });
        println!(
            "restart h1 ({how}): stopped in {:.2} s, socket answered after {:.2} s, settled after {:.2} s (at {:.2} s of the ping)",
            down.as_secs_f64(),
            ready.as_secs_f64(),
            settled_after.as_secs_f64(),
            offset(t0, down_at)
        );
        println!(
            "restart ({how}): {} of {} pings lost; {r}",
            r.lost.len(),
            r.transmitted.saturating_sub(1)
        );
        f.check(r.lost.is_empty(), || {
            format!("restart ({how}) lost pings: {r}")
        });
        let now = ifindexes(&lab, 1, &devs);
        f.check(now == before, || {
            format!(
                "restart ({how}) recreated h1's devices (data path flap): {before:?} -> {now:?}"
            )
        });
    }
    f.finish();
}

// ---- no flap while a fresh agent warms up ---------------------------------------

#[test]
fn a_fresh_networks_data_path_does_not_flap_while_agents_warm_up() {
    let _serial = exclusive();
    let mut lab = Lab::new(2).expect("lab");
    let started = Instant::now();
    lab.start_cluster(&[1, 2]).expect("forming the cluster");
    let net = lab.network_create(1, "a", &[]).expect("network create");
    lab.wait_network(&[1, 2], "a").expect("network everywhere");
    let (h1c1, e1) = attached(&mut lab, 1, "c1", "a", &[]);
    let first1 = ifindexes(&lab, 1, &endpoint_devices(net.vni, &e1));
    let (_h2c1, e2) = attached(&mut lab, 2, "c1", "a", &[]);
    let first2 = ifindexes(&lab, 2, &endpoint_devices(net.vni, &e2));
    let attached_after = started.elapsed();
    lab.wait_dataplane(&[1, 2], net.vni, &[e1.clone(), e2.clone()])
        .expect("data plane complete");
    let mut p = lab.start_ping(&h1c1, &e2.ip).expect("ping");
    p.wait_replies(5, Duration::from_secs(10))
        .expect("pings flow");
    // Past the reconciler's warm-up and a repair tick or two.
    let watch_until = Duration::from_secs(7);
    sleep_until(started, watch_until, Duration::from_secs(2));
    let r = p.stop().expect("stopping ping");
    let last1 = ifindexes(&lab, 1, &endpoint_devices(net.vni, &e1));
    let last2 = ifindexes(&lab, 2, &endpoint_devices(net.vni, &e2));
    println!(
        "fresh network: both endpoints attached {:.2} s after the agents started, watched until {:.2} s",
        attached_after.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    println!("ifindexes h1 {first1:?} -> {last1:?}; h2 {first2:?} -> {last2:?}");
    println!("{r}");
    let mut f = Findings::new();
    f.check(first1 == last1, || {
        format!("h1 recreated devices of a working network: {first1:?} -> {last1:?}")
    });
    f.check(first2 == last2, || {
        format!("h2 recreated devices of a working network: {first2:?} -> {last2:?}")
    });
    f.check(r.lost.is_empty(), || {
        format!("pings lost on a fresh network: {r}")
    });
    f.finish();
}
