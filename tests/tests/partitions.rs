//! Underlay partitions (DESIGN.md, "State model": network clashes created on
//! both sides of a partition resolve to the older network everywhere;
//! "Address ownership": no address is ever held twice, also across a
//! partition, and attach fails fast when no space is reachable).
//!
//! A partition cuts one host's switch port ([`Lab::partition`]): the host
//! keeps running, its peers only stop hearing it. Each test builds its own
//! 3-host lab and heals before checking convergence.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::*;
use ovl_e2e::cmd::{self, CmdOutput};
use ovl_e2e::{
    Container, EndpointRow, Findings, Lab, NetworkRow, POLL, bridge_dev, shared, vxlan_dev,
    wait_until,
};

/// After healing, every host shows the same resolution within this.
const CONVERGE_BOUND: Duration = Duration::from_secs(15);
/// An attach with no reachable space fails within this.
const FAIL_FAST_BOUND: Duration = Duration::from_secs(10);

/// Rows of `network ls` named `name`, sorted by id.
fn rows_named(rows: &[NetworkRow], name: &str) -> Vec<NetworkRow> {
    let mut v: Vec<NetworkRow> = rows.iter().filter(|r| r.name == name).cloned().collect();
    v.sort_by(|a, b| a.id.cmp(&b.id));
    v
}

/// Checks one host's rows of a clash: exactly `winner` active and `loser`
/// in conflict with a reason containing `mention`.
fn check_clash(
    k: usize,
    rows: &[NetworkRow],
    winner: &NetworkRow,
    loser: &NetworkRow,
    mention: &str,
) -> Result<()> {
    let w = rows.iter().find(|r| r.id == winner.id);
    let l = rows.iter().find(|r| r.id == loser.id);
    let (Some(w), Some(l)) = (w, l) else {
        anyhow::bail!(
            "h{k} lists {} of winner {} / loser {}: {rows:?}",
            rows.len(),
            winner.id,
            loser.id
        );
    };
    ensure!(
        w.state == "active",
        "h{k}: the older network is {:?}: {w:?}",
        w.state
    );
    let reason = l.reason.as_str().unwrap_or_default();
    ensure!(
        l.state == "conflict" && reason.contains(mention),
        "h{k}: the newer network is {:?} with reason {:?} (want \"conflict\", mentioning {mention:?}): {l:?}",
        l.state,
        l.reason
    );
    Ok(())
}

/// The devices of network `vni` that exist on host k (in its sandbox).
fn devices_of(lab: &Lab, k: usize, vni: u32) -> Vec<String> {
    [bridge_dev(vni), vxlan_dev(vni)]
        .into_iter()
        .filter(|d| lab.ovl_link(k, d).ok().flatten().is_some())
        .collect()
}

/// Host k's ovl traces: sandboxes and the bridges, VXLAN devices and
/// endpoint veths in them.
fn ovl_links(lab: &Lab, k: usize) -> Vec<String> {
    lab.ovl_traces(k)
        .unwrap_or_else(|e| vec![format!("<{e:#}>")])
}

/// Links of container `c` other than `lo`.
fn container_links(lab: &Lab, c: &Container) -> Vec<String> {
    lab.links_in(&c.name)
        .map(|ls| {
            ls.into_iter()
                .map(|l| l.ifname)
                .filter(|n| n != "lo")
                .collect()
        })
        .unwrap_or_else(|e| vec![format!("<{e:#}>")])
}

fn as_u64(v: &serde_json::Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// Runs every command at once, each in its own thread, and returns each
/// one's output and how long it took.
fn run_timed(cmds: Vec<Command>) -> Vec<(Result<CmdOutput>, Duration)> {
    thread::scope(|s| {
        let handles: Vec<_> = cmds
            .into_iter()
            .map(|mut c| {
                s.spawn(move || {
                    let t = Instant::now();
                    let r = cmd::run(&mut c, Duration::from_secs(60));
                    (r, t.elapsed())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("attach thread"))
            .collect()
    })
}

/// The endpoint an `endpoint attach --format json` printed.
fn parse_attach(r: Result<CmdOutput>) -> Result<EndpointRow> {
    let out = r?.ok()?;
    serde_json::from_str(&out.stdout).with_context(|| format!("stdout is not an endpoint: {out}"))
}

/// `(name, ip, mac, node_name, vtep)` of each row, sorted: what every host
/// must agree on.
fn endpoint_keys(rows: &[EndpointRow]) -> Vec<(String, String, String, String, String)> {
    let mut v: Vec<_> = rows
        .iter()
        .map(|e| {
            (
                e.name.clone(),
                e.ip.clone(),
                e.mac.to_lowercase(),
                e.node_name.clone(),
                e.vtep.clone(),
            )
        })
        .collect();
    v.sort();
    v
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

// ---- concurrent name / VNI clash -------------------------------------------------

#[test]
fn concurrent_name_clash_resolves_to_the_older_network_everywhere() {
    let _serial = shared();
    let mut lab = Lab::new(3).expect("lab");
    let t = Instant::now();
    lab.start_cluster(&[1, 2, 3]).expect("forming the cluster");
    println!("clash: cluster of 3 formed in {:.2?}", t.elapsed());
    let mut f = Findings::new();

    lab.partition(1).expect("partition h1");
    let cut = Instant::now();
    // h2's side first (older), then h1's, a few ms later.
    let win = lab
        .network_create(2, "dup", &["--subnet", "198.19.30.0/24"])
        .expect("create dup on h2");
    let vwin = lab
        .network_create(2, "vx-a", &["--subnet", "198.19.32.0/24", "--vni", "5000"])
        .expect("create vx-a (vni 5000) on h2");
    thread::sleep(Duration::from_millis(20));
    let lose = lab
        .network_create(1, "dup", &["--subnet", "198.19.31.0/24"])
        .expect("create dup on h1 while partitioned");
    let vlose = lab
        .network_create(1, "vx-b", &["--subnet", "198.19.33.0/24", "--vni", "5000"])
        .expect("create vx-b (vni 5000) on h1 while partitioned");
    println!(
        "clash: created dup {} (vni {}, created_at_ms {}) on h2 and dup {} (vni {}, created_at_ms {}) on h1, {:.2?} after the cut",
        win.id,
        win.vni,
        win.created_at_ms,
        lose.id,
        lose.vni,
        lose.created_at_ms,
        cut.elapsed()
    );
    for (w, l) in [(&win, &lose), (&vwin, &vlose)] {
        let (wa, la) = (as_u64(&w.created_at_ms), as_u64(&l.created_at_ms));
        f.check(matches!((wa, la), (Some(a), Some(b)) if a < b), || {
            format!(
                "{} on h2 should be older: created_at_ms {:?} vs {:?} of {} on h1",
                w.name, w.created_at_ms, l.created_at_ms, l.name
            )
        });
        f.check(w.state == "active" && l.state == "active", || {
            format!("both sides create an active network: {w:?} / {l:?}")
        });
    }
    // Each side sees only its own, active (h3 learns h2's).
    let side = wait_until(CONVERGE_BOUND, POLL, || {
        for (k, want) in [(1, &lose), (2, &win), (3, &win)] {
            let rows = rows_named(&lab.networks(k)?, "dup");
            ensure!(
                rows.len() == 1 && rows[0].id == want.id && rows[0].state == "active",
                "h{k} lists dup as {rows:?} during the partition"
            );
        }
        Ok(true)
    });
    if let Some(t) = f.ok("each side sees its own dup during the partition", side) {
        println!("clash: during the partition h3 lists h2's dup after {t:.2?}");
    }

    lab.heal(1).expect("heal h1");
    let mut last_seen: Vec<Vec<NetworkRow>> = Vec::new();
    let converged = wait_until(CONVERGE_BOUND, POLL, || {
        let mut all = Vec::new();
        for k in 1..=3 {
            let rows = lab.networks(k)?;
            let dup = rows_named(&rows, "dup");
            ensure!(dup.len() == 2, "h{k} lists {} dup rows: {dup:?}", dup.len());
            check_clash(k, &dup, &win, &lose, "dup")?;
            let vx: Vec<NetworkRow> = rows
                .iter()
                .filter(|r| r.name == "vx-a" || r.name == "vx-b")
                .cloned()
                .collect();
            ensure!(
                vx.len() == 2,
                "h{k} lists {} vx-a/vx-b rows: {vx:?}",
                vx.len()
            );
            check_clash(k, &vx, &vwin, &vlose, "5000")?;
            let mut sorted = rows.clone();
            sorted.sort_by(|a, b| a.id.cmp(&b.id));
            all.push(sorted);
        }
        last_seen.clone_from(&all);
        ensure!(
            all[0] == all[1] && all[1] == all[2],
            "hosts disagree: h1 {:?}\nh2 {:?}\nh3 {:?}",
            all[0],
            all[1],
            all[2]
        );
        Ok(true)
    });
    match f.ok("the clash resolves identically on all hosts", converged) {
        Some(t) => {
            println!(
                "clash: all 3 hosts list the older dup active and the newer in conflict, identically, {:.2} s after healing",
                secs(t)
            );
            for r in last_seen[0].iter().filter(|r| r.state == "conflict") {
                println!("clash: {} {} reason: {}", r.name, r.id, r.reason);
            }
        }
        None => println!("clash: last rows seen: {last_seen:?}"),
    }
    let members = lab.wait_members(&[1, 2, 3]);
    if let Some(t) = f.ok("membership heals", members) {
        println!("clash: all 3 list each other alive again {t:.2?} later");
    }

    // The name resolves to the active network on every host.
    for k in 1..=3 {
        let d = lab.network_inspect(k, "dup");
        if let Some(d) = f.ok(&format!("h{k} network inspect dup"), d) {
            f.check(d.id == win.id && d.state == "active", || {
                format!(
                    "h{k}: inspect dup resolves to {} ({}), want {}",
                    d.id, d.state, win.id
                )
            });
        }
    }

    // Attaching by name on the losing side gets the winner.
    let (c1, e1) = attached(&mut lab, 1, "c1", "dup", &[]);
    println!(
        "clash: h1 attached to dup: {} in network {}",
        e1.ip, e1.network_id
    );
    f.check(e1.network_id == win.id, || {
        format!(
            "h1's attach to dup joined {}, want {}",
            e1.network_id, win.id
        )
    });
    f.check(in_subnet(&e1.ip, &win.subnet), || {
        format!(
            "h1's endpoint {} is not in the winner's {}",
            e1.ip, win.subnet
        )
    });
    let (_c2, e2) = attached(&mut lab, 2, "c2", "dup", &[]);
    let eps = [e1.clone(), e2.clone()];
    if let Some(t) = f.ok(
        "data plane of dup",
        lab.wait_dataplane(&[1, 2], win.vni, &eps),
    ) {
        println!("clash: dup data plane complete: {}", per_host(&t));
    }
    let reach = wait_reachable(&lab, &[(&c1, e2.ip.as_str())], LONG);
    if let Some(t) = f.ok("h1 -> h2 over dup", reach) {
        println!("clash: h1/c1 reaches h2/c2 over dup after {:.2?}", t[&0]);
    }

    // The losers are refused, leave nothing behind, and are never programmed.
    let c3 = lab.add_container(1, "c3").expect("container");
    for (net, what) in [
        (lose.id.as_str(), "the losing dup (by id)"),
        ("vx-b", "vx-b"),
    ] {
        let args = Lab::attach_args(net, &c3, &[]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        match lab.ctl(1, &args) {
            Ok(out) => match out.one_line_error() {
                Ok(line) => println!("clash: attach to {what} refused: {line}"),
                Err(e) => {
                    f.check(false, || format!("attach to {what}: {e:#}"));
                }
            },
            Err(e) => {
                f.check(false, || format!("attach to {what}: {e:#}"));
            }
        }
    }
    f.check(container_links(&lab, &c3).is_empty(), || {
        format!(
            "refused attaches left {:?} in h1/c3",
            container_links(&lab, &c3)
        )
    });
    if lose.vni != win.vni && lose.vni != vwin.vni {
        for k in 1..=3 {
            let devs = devices_of(&lab, k, lose.vni);
            f.check(devs.is_empty(), || {
                format!(
                    "h{k} programmed the losing dup (vni {}): {devs:?}",
                    lose.vni
                )
            });
        }
    }
    let eps = lab.endpoints(1, None).unwrap_or_default();
    let names: BTreeSet<&str> = eps.iter().map(|e| e.name.as_str()).collect();
    f.check(
        names == BTreeSet::from(["h1-c1", "h2-c2"]) && eps.iter().all(|e| e.network_id == win.id),
        || format!("endpoints after the refused attaches: {eps:?}"),
    );
    let loser_rows: Vec<NetworkRow> = lab
        .networks(1)
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.id == lose.id || r.id == vlose.id)
        .collect();
    f.check(
        loser_rows.len() == 2 && loser_rows.iter().all(|r| r.endpoints == 0),
        || format!("the losers have endpoints: {loser_rows:?}"),
    );
    f.finish();
}

// ---- attach on both sides of a partition -------------------------------------------

/// The addresses of `ranges` (CIDRs) that an endpoint may get in `net`
/// (not the subnet's network or broadcast address, not the gateway).
fn usable_in(ranges: &[String], net: &NetworkRow) -> BTreeSet<Ipv4Addr> {
    let (Some((base, len)), Ok(gw)) = (net.subnet.split_once('/'), net.gateway.parse::<Ipv4Addr>())
    else {
        return BTreeSet::new();
    };
    let (Ok(base), Ok(len)) = (base.parse::<Ipv4Addr>(), len.parse::<u32>()) else {
        return BTreeSet::new();
    };
    let bcast = Ipv4Addr::from(u32::from(base) | (u32::MAX >> len));
    let mut out = BTreeSet::new();
    for r in ranges {
        let Some((rb, rl)) = r.split_once('/') else {
            continue;
        };
        let (Ok(rb), Ok(rl)) = (rb.parse::<Ipv4Addr>(), rl.parse::<u32>()) else {
            continue;
        };
        let size = 1u64 << (32 - rl.min(32));
        for i in 0..size {
            let a = Ipv4Addr::from((u64::from(u32::from(rb)) + i) as u32);
            if a != base && a != bcast && a != gw {
                out.insert(a);
            }
        }
    }
    out
}

/// Each host's address ranges in `network` as host `viewer` sees them.
fn ranges_seen(lab: &Lab, viewer: usize, network: &str) -> Result<BTreeMap<String, Vec<String>>> {
    let d = lab.network_inspect(viewer, network)?;
    Ok(d.peers
        .into_iter()
        .map(|p| {
            let mut r = p.ranges;
            r.sort();
            (p.node_name, r)
        })
        .filter(|(_, r)| !r.is_empty())
        .collect())
}

/// Attaches every container at once; records failures; returns the
/// endpoints and the slowest attach per host.
fn attach_all(
    lab: &Lab,
    f: &mut Findings,
    containers: &[Container],
    when: &str,
) -> (Vec<EndpointRow>, BTreeMap<usize, Duration>) {
    let cmds: Vec<Command> = containers
        .iter()
        .map(|c| {
            let args = Lab::attach_args("a", c, &[]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            lab.ctl_command(c.host, &args).expect("ovlctl")
        })
        .collect();
    let mut eps = Vec::new();
    let mut slowest: BTreeMap<usize, Duration> = BTreeMap::new();
    for (c, (r, took)) in containers.iter().zip(run_timed(cmds)) {
        let e = slowest.entry(c.host).or_default();
        *e = (*e).max(took);
        if let Some(ep) = f.ok(&format!("attach {c} {when}"), parse_attach(r)) {
            let want = format!("{}/{}", ep.ip, prefix_len(SPLIT_SUBNET));
            let have = lab.addrs_in(&c.name, "eth0").unwrap_or_default();
            f.check(have == vec![want.clone()], || {
                format!("{c}: eth0 has {have:?}, attach said {want}")
            });
            eps.push(ep);
        }
    }
    (eps, slowest)
}

/// The subnet of the split test: small, so a cut-off host's range runs out
/// after a handful of attaches.
const SPLIT_SUBNET: &str = "198.19.40.0/26";

#[test]
fn attach_across_a_partition_never_duplicates_addresses() {
    let _serial = shared();
    let (mut lab, net) = cluster_with_network(3, "a", &["--subnet", SPLIT_SUBNET]);
    let mut f = Findings::new();
    let (probe, eprobe) = attached(&mut lab, 1, "probe", "a", &[]);
    let (_c2, e2) = attached(&mut lab, 2, "first", "a", &[]);
    let (_c3, e3) = attached(&mut lab, 3, "first", "a", &[]);
    let mut all_eps = vec![eprobe.clone(), e2.clone(), e3.clone()];
    let names: Vec<String> = all_eps.iter().map(|e| e.name.clone()).collect();
    lab.wait_endpoints(&[1, 2, 3], "a", &names)
        .expect("the first endpoints reach every host");
    println!(
        "split: before the cut: h1 {} h2 {} h3 {}",
        eprobe.ip, e2.ip, e3.ip
    );

    let mut batch: Vec<Container> = Vec::new();
    for k in 1..=3 {
        for i in 1..=5 {
            batch.push(lab.add_container(k, &format!("p{i}")).expect("container"));
        }
    }

    // 1. Right after the cut, before anyone noticed: 5 attaches per host.
    lab.partition(3).expect("partition h3");
    let cut = Instant::now();
    let (eps, slowest) = attach_all(&lab, &mut f, &batch, "right after the cut");
    println!(
        "split: 15 concurrent attaches (5 per host) right after the cut: {} succeeded; slowest: {}",
        eps.len(),
        per_host(&slowest)
    );
    all_eps.extend(eps);
    let h3_ranges = ranges_seen(&lab, 3, "a")
        .ok()
        .and_then(|r| r.get("h3").cloned())
        .unwrap_or_default();
    println!("split: h3 owns {h3_ranges:?} while cut off");
    f.check(!h3_ranges.is_empty(), || {
        "h3 owns no range after its first attach".into()
    });

    // 2. Both sides noticed: h3 fills what is left of its own ranges while
    // h1 and h2 attach 2 more each; then h3 has no reachable space.
    let detected = wait_until(LONG, POLL, || {
        let h3 = lab.nodes(3)?;
        let h1 = lab.nodes(1)?;
        let dead3 = h3.iter().filter(|n| n.status == "dead").count();
        let dead1 = h1
            .iter()
            .filter(|n| n.name == "h3" && n.status == "dead")
            .count();
        ensure!(
            dead3 == 2 && dead1 == 1,
            "h3 sees {dead3} dead, h1 sees h3 dead: {dead1}"
        );
        Ok(true)
    });
    if f.ok("both sides notice the partition", detected).is_some() {
        println!(
            "split: both sides list the other dead {:.2} s after the cut",
            secs(cut.elapsed())
        );
    }
    let usable = usable_in(&h3_ranges, &net);
    let held: BTreeSet<Ipv4Addr> = all_eps
        .iter()
        .filter(|e| e.node_name == "h3")
        .filter_map(|e| e.ip.parse().ok())
        .collect();
    let left = usable.difference(&held).count();
    println!(
        "split: h3's ranges hold {} usable addresses, {} in use, {left} left",
        usable.len(),
        held.len()
    );
    let mut fill: Vec<Container> = Vec::new();
    if left <= 40 {
        for i in 0..left {
            fill.push(lab.add_container(3, &format!("f{i}")).expect("container"));
        }
    } else {
        println!("split: h3's ranges are too large to exhaust here; skipped");
    }
    for k in 1..=2 {
        for i in 6..=7 {
            fill.push(lab.add_container(k, &format!("p{i}")).expect("container"));
        }
    }
    let (eps, slowest) = attach_all(&lab, &mut f, &fill, "during the partition");
    println!(
        "split: {} more concurrent attaches once detected ({left} on h3): {} succeeded; slowest: {}",
        fill.len(),
        eps.len(),
        per_host(&slowest)
    );
    all_eps.extend(eps);
    if left <= 40 {
        let extra = lab.add_container(3, "over").expect("container");
        attach_refused(
            &lab,
            &mut f,
            &extra,
            &[],
            "split",
            "on h3 with its ranges full",
        );
    }
    // An exact address in h1's range: h3 must not take it while cut off;
    // h1 may.
    let taken: BTreeSet<Ipv4Addr> = all_eps.iter().filter_map(|e| e.ip.parse().ok()).collect();
    let h1_ranges = ranges_seen(&lab, 1, "a")
        .ok()
        .and_then(|r| r.get("h1").cloned())
        .unwrap_or_default();
    let h1_ip = usable_in(&h1_ranges, &net)
        .difference(&taken)
        .last()
        .map(ToString::to_string)
        .unwrap_or_else(|| "198.19.40.20".into());
    println!("split: h1 owns {h1_ranges:?}; h3 and then h1 attach with --ip {h1_ip}");
    let x3 = lab.add_container(3, "x20").expect("container");
    attach_refused(
        &lab,
        &mut f,
        &x3,
        &["--ip", &h1_ip],
        "split",
        &format!("--ip {h1_ip} (h1's) on h3"),
    );
    let x1 = lab.add_container(1, "x20").expect("container");
    match lab.attach("a", &x1, &["--ip", &h1_ip]) {
        Ok(ep) => {
            println!("split: h1 attaches --ip {h1_ip} during the partition: ok");
            f.check(ep.ip == h1_ip, || {
                format!("h1's --ip {h1_ip} attach got {}", ep.ip)
            });
            all_eps.push(ep);
        }
        Err(e) => {
            f.check(false, || {
                format!("h1's --ip {h1_ip} attach during the partition: {e:#}")
            });
        }
    }
    for ep in all_eps.iter().filter(|e| e.node_name == "h3") {
        let ip: Option<Ipv4Addr> = ep.ip.parse().ok();
        f.check(ip.is_some_and(|ip| usable.contains(&ip)), || {
            format!(
                "h3 allocated {} while cut off, outside its ranges {h3_ranges:?}",
                ep.ip
            )
        });
    }
    for k in 1..=3 {
        let ips: Vec<&str> = all_eps
            .iter()
            .filter(|e| e.node_name == format!("h{k}"))
            .map(|e| e.ip.as_str())
            .collect();
        println!("split: h{k} holds {} addresses: {ips:?}", ips.len());
    }
    let mut ips: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for e in &all_eps {
        ips.entry(e.ip.as_str()).or_default().push(e.name.as_str());
    }
    let dups: Vec<_> = ips.iter().filter(|(_, v)| v.len() > 1).collect();
    f.check(dups.is_empty(), || {
        format!("addresses given twice across the partition: {dups:?}")
    });
    let distinct = ips.len();

    // 3. Heal: one table, one ring, everywhere.
    lab.heal(3).expect("heal h3");
    let healed = Instant::now();
    let want = endpoint_keys(&all_eps);
    let mut last = String::new();
    let converged = wait_until(CONVERGE_BOUND, POLL, || {
        for k in 1..=3 {
            let rows = lab.endpoints(k, Some("a"))?;
            let got = endpoint_keys(&rows);
            if got != want {
                last = format!("h{k}: {got:?}");
            }
            ensure!(
                got == want,
                "h{k} lists {} endpoints, want the {} attached",
                rows.len(),
                want.len()
            );
            ensure!(
                rows.iter().all(|r| r.status == "alive"),
                "h{k}: not all alive: {rows:?}"
            );
        }
        Ok(true)
    });
    match f.ok("endpoint ls converges after healing", converged) {
        Some(t) => println!(
            "split: all 3 hosts list the same {} endpoints ({distinct} distinct IPs) {:.2} s after healing",
            want.len(),
            secs(t)
        ),
        None => println!("split: last differing view: {last}"),
    }
    let mut ring = BTreeMap::new();
    let rings = wait_until(CONVERGE_BOUND, POLL, || {
        let views: Vec<_> = (1..=3)
            .map(|k| ranges_seen(&lab, k, "a"))
            .collect::<Result<_>>()?;
        ensure!(
            views[0] == views[1] && views[1] == views[2],
            "hosts disagree on the ranges: {views:?}"
        );
        ring.clone_from(&views[0]);
        Ok(true)
    });
    if f.ok("the ranges converge after healing", rings).is_some() {
        println!(
            "split: all 3 hosts agree on the ranges {:.2} s after healing: {ring:?}",
            secs(healed.elapsed())
        );
        let mut seen: BTreeMap<Ipv4Addr, &str> = BTreeMap::new();
        let mut overlap = Vec::new();
        for (owner, rs) in &ring {
            for a in usable_in(rs, &net) {
                if let Some(o) = seen.insert(a, owner) {
                    overlap.push(format!("{a}: {o} and {owner}"));
                }
            }
        }
        f.check(overlap.is_empty(), || {
            format!("ranges overlap after healing: {overlap:?}")
        });
        let h3_now = usable_in(ring.get("h3").map_or(&[][..], |v| &v[..]), &net);
        f.check(usable.is_subset(&h3_now), || {
            format!("h3's ranges {h3_ranges:?} were taken while it was cut off: now {ring:?}")
        });
    }
    for k in 1..=3 {
        if let Some(rows) = f.ok(&format!("h{k} endpoint ls"), lab.endpoints(k, None)) {
            let set: BTreeSet<&str> = rows.iter().map(|r| r.ip.as_str()).collect();
            f.check(set.len() == rows.len(), || {
                format!("h{k} lists a duplicate IP: {rows:?}")
            });
        }
    }
    // h3 gets space again once it can reach the others.
    let again = lab.add_container(3, "again").expect("container");
    match lab.attach("a", &again, &[]) {
        Ok(ep) => {
            println!("split: after healing h3 attaches again: {}", ep.ip);
            f.check(!ips.contains_key(ep.ip.as_str()), || {
                format!("h3's attach after healing got {} again", ep.ip)
            });
            all_eps.push(ep);
        }
        Err(e) => {
            f.check(false, || format!("h3's attach after healing: {e:#}"));
        }
    }
    let names: Vec<String> = all_eps.iter().map(|e| e.name.clone()).collect();
    f.ok(
        "every host lists h3's new endpoint",
        lab.wait_endpoints(&[1, 2, 3], "a", &names),
    );
    match lab.wait_dataplane(&[1, 2, 3], net.vni, &all_eps) {
        Ok(t) => println!(
            "split: data plane complete ({:.2} s after healing): {}",
            secs(healed.elapsed()),
            per_host(&t)
        ),
        Err(e) => {
            f.check(false, || format!("{e:#}"));
        }
    }
    let targets: Vec<(&Container, &str)> = all_eps
        .iter()
        .filter(|e| e.name != eprobe.name)
        .map(|e| (&probe, e.ip.as_str()))
        .collect();
    match wait_reachable(&lab, &targets, LONG) {
        Ok(first) => println!(
            "split: h1/probe reaches all {} others ({:.2} s after healing)",
            first.len(),
            secs(healed.elapsed())
        ),
        Err(e) => {
            f.check(false, || {
                format!("reachability from h1 after healing: {e:#}")
            });
        }
    }
    f.finish();
}

// ---- attach with no reachable space ---------------------------------------------------

/// Runs the attach of `c` to `a` (with `extra` flags) on its host; checks it fails fast with
/// one line saying no space is reachable and leaves nothing behind (no
/// endpoint, no new `ovl*` device on the host, nothing in the container).
fn attach_refused(
    lab: &Lab,
    f: &mut Findings,
    c: &Container,
    extra: &[&str],
    tag: &str,
    when: &str,
) {
    let k = c.host;
    let links_before = ovl_links(lab, k);
    let args = Lab::attach_args("a", c, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let t = Instant::now();
    let out = lab.ctl(c.host, &args);
    let took = t.elapsed();
    println!("{tag}: attach {when} ended after {:.2} s", secs(took));
    f.check(took <= FAIL_FAST_BOUND, || {
        format!("attach {when} took {took:.2?}, bound {FAIL_FAST_BOUND:?}")
    });
    match out {
        Ok(out) => match out.one_line_error() {
            Ok(line) => {
                println!("{tag}: {line}");
                f.check(line.contains("no space reachable"), || {
                    format!("attach {when}: {line:?} does not say \"no space reachable\"")
                });
            }
            Err(e) => {
                f.check(false, || format!("attach {when}: {e:#}"));
            }
        },
        Err(e) => {
            f.check(false, || format!("attach {when}: {e:#}"));
        }
    }
    match lab.endpoints(k, None) {
        Ok(rows) => {
            f.check(!rows.iter().any(|r| r.name == c.endpoint_name()), || {
                format!("attach {when} left an endpoint on h{k}: {rows:?}")
            });
        }
        Err(e) => {
            f.check(false, || format!("h{k} endpoint ls: {e:#}"));
        }
    }
    let links = ovl_links(lab, k);
    f.check(links == links_before, || {
        format!("attach {when} changed h{k}'s devices from {links_before:?} to {links:?}")
    });
    let inside = container_links(lab, c);
    f.check(inside.is_empty(), || {
        format!("attach {when} left {inside:?} in {c}")
    });
}

#[test]
fn attach_fails_fast_when_no_space_is_reachable() {
    let _serial = shared();
    let (mut lab, net) = cluster_with_network(3, "a", &["--subnet", "198.19.50.0/24"]);
    let mut f = Findings::new();
    // h2 knows the network and its ring (h1 owns all of it) before the cut.
    let synced = wait_until(LONG, POLL, || {
        let d = lab.network_inspect(2, "a")?;
        let h1 = d.peers.iter().find(|p| p.node_name == "h1");
        ensure!(
            h1.is_some_and(|p| !p.ranges.is_empty()),
            "h2 does not know h1's ranges yet: {:?}",
            d.peers
        );
        let others: Vec<_> = d
            .peers
            .iter()
            .filter(|p| p.node_name != "h1" && !p.ranges.is_empty())
            .collect();
        ensure!(others.is_empty(), "others own space: {others:?}");
        Ok(true)
    });
    if f.ok("h2 learns the ring", synced).is_none() {
        println!("nospace: going on without h2 knowing the ring");
    }
    let c = lab.add_container(2, "cut").expect("container");
    let before = ovl_links(&lab, 2);
    f.check(before.is_empty(), || {
        format!("h2 has ovl devices before any attach: {before:?}")
    });

    lab.partition(2).expect("partition h2");
    let cut = Instant::now();
    f.check(lab.is_partitioned(2).unwrap_or(false), || {
        "h2's switch port is still up after partition(2)".into()
    });
    attach_refused(&lab, &mut f, &c, &[], "nospace", "right after the cut");
    let dead = lab.wait_node_status(2, "h1", "dead");
    if f.ok("h2 sees h1 dead", dead).is_some() {
        println!(
            "nospace: h2 lists h1 dead (checked after that attach) {:.2} s after the cut",
            secs(cut.elapsed())
        );
        attach_refused(&lab, &mut f, &c, &[], "nospace", "once h2 sees h1 dead");
        attach_refused(
            &lab,
            &mut f,
            &c,
            &["--ip", "198.19.50.10"],
            "nospace",
            "of --ip 198.19.50.10 (h1's) once h2 sees h1 dead",
        );
    }

    lab.heal(2).expect("heal h2");
    let healed = Instant::now();
    f.check(!lab.is_partitioned(2).unwrap_or(true), || {
        "h2's switch port is still down after heal(2)".into()
    });
    if let Some(t) = f.ok("membership heals", lab.wait_members(&[1, 2, 3])) {
        println!("nospace: all 3 alive again {:.2} s after healing", secs(t));
    }
    let t = Instant::now();
    match lab.attach("a", &c, &[]) {
        Ok(ep) => {
            println!(
                "nospace: the same attach succeeds after healing in {:.2} s: {} ({:.2} s after healing)",
                secs(t.elapsed()),
                ep.ip,
                secs(healed.elapsed())
            );
            f.check(in_subnet(&ep.ip, &net.subnet), || {
                format!("{} not in {}", ep.ip, net.subnet)
            });
            let seen = lab.wait_endpoints(&[1, 2, 3], "a", std::slice::from_ref(&ep.name));
            f.ok("every host lists it", seen);
        }
        Err(e) => {
            f.check(false, || format!("attach after healing: {e:#}"));
        }
    }
    f.finish();
}
