//! Issue 8, churn at scale: 3 hosts, 200 networks, and for
//! `OVL_CHURN_SECS` (default 60) seconds every host in a loop creates a
//! network, attaches a container to it and to one of the 200, detaches
//! both and removes the network. Throughout, no host is ever listed as
//! anything but alive in any host's `cluster nodes`, and the tables'
//! tombstones stay bounded (read from each agent's metrics endpoint; the
//! before/after numbers are printed).
//!
//! Needs root and the binaries (`cargo build --release -p ovl-agent -p
//! ovlctl`). Holds `ovl_e2e::exclusive()`: it loads the machine.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use ovl_e2e::{Container, Lab, PATIENCE, exclusive, host_addr};

const HOSTS: usize = 3;
const NETWORKS: usize = 200;
const METRICS_PORT: u16 = 9464;
/// `store::MAX_TOMBSTONES`: the bound whatever peers do.
const MAX_TOMBSTONES: u64 = 4096;
/// Once the churn stops and every peer pulled, at most this many own
/// tombstones may remain (the last changes, until the next pull).
const SETTLED_TOMBSTONES: u64 = 16;

fn churn_time() -> Duration {
    let secs = std::env::var("OVL_CHURN_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

/// The table gauges of host k's metrics endpoint, by series.
fn table_gauges(lab: &Lab, k: usize) -> Result<BTreeMap<String, u64>> {
    let url = format!("http://{}:{METRICS_PORT}/metrics", host_addr(k));
    let out = lab.exec_ok(k, &["curl", "-sS", "--fail", "--max-time", "5", &url])?;
    let mut m = BTreeMap::new();
    for line in out.stdout.lines() {
        if !(line.starts_with("ovl_table_") || line.starts_with("ovl_store_")) {
            continue;
        }
        let (name, value) = line
            .rsplit_once(' ')
            .with_context(|| format!("metrics line {line:?}"))?;
        let v: f64 = value
            .parse()
            .with_context(|| format!("metrics line {line:?}"))?;
        m.insert(name.to_string(), v as u64);
    }
    ensure!(
        m.contains_key("ovl_table_tombstones{table=\"own\"}"),
        "h{k} exports no table gauges: {m:?}"
    );
    Ok(m)
}

fn own_tombstones(g: &BTreeMap<String, u64>) -> u64 {
    g.get("ovl_table_tombstones{table=\"own\"}")
        .copied()
        .unwrap_or(0)
}

fn own_rows(g: &BTreeMap<String, u64>) -> u64 {
    g.get("ovl_table_rows{table=\"own\"}").copied().unwrap_or(0)
}

/// Any host shown as not alive, by any viewer: "hV sees hK dead".
fn not_alive(lab: &Lab) -> Vec<String> {
    let mut out = Vec::new();
    for v in 1..=HOSTS {
        match lab.nodes(v) {
            Ok(rows) => {
                for r in rows.iter().filter(|r| r.status != "alive") {
                    out.push(format!("h{v} sees {} {}", r.name, r.status));
                }
                if rows.len() != HOSTS {
                    out.push(format!("h{v} lists {} nodes", rows.len()));
                }
            }
            Err(e) => out.push(format!("h{v}: cluster nodes failed: {e:#}")),
        }
    }
    out
}

/// One host's loop: create, attach, detach, remove; and an attach/detach
/// on one of the long-lived networks. Returns the rounds done and the
/// long-lived networks attached to.
fn churn(lab: &Lab, k: usize, c: &Container, until: Instant) -> Result<(usize, BTreeSet<String>)> {
    let mut rounds = 0;
    let mut long_used = BTreeSet::new();
    while Instant::now() < until {
        let name = format!("churn-h{k}-{rounds}");
        lab.network_create(k, &name, &[])
            .with_context(|| format!("h{k}: create {name}"))?;
        lab.attach(&name, c, &[])
            .with_context(|| format!("h{k}: attach to {name}"))?;
        lab.detach(k, &name, &c.endpoint_name())
            .with_context(|| format!("h{k}: detach from {name}"))?;
        lab.ctl_ok(k, &["network", "rm", &name])
            .with_context(|| format!("h{k}: rm {name}"))?;
        let long = format!("n{}", (rounds * 7 + k * 13) % NETWORKS);
        lab.attach(&long, c, &[])
            .with_context(|| format!("h{k}: attach to {long}"))?;
        lab.detach(k, &long, &c.endpoint_name())
            .with_context(|| format!("h{k}: detach from {long}"))?;
        long_used.insert(long);
        rounds += 1;
    }
    Ok((rounds, long_used))
}

#[test]
fn churn_across_three_hosts_keeps_everyone_alive_and_tombstones_bounded() {
    let _serial = exclusive();
    let mut lab = Lab::new(HOSTS).expect("lab");
    for k in 1..=HOSTS {
        let addr = format!("{}:{METRICS_PORT}", host_addr(k));
        lab.start_agent(k, &["--metrics-addr", &addr])
            .expect("agent");
    }
    let init = lab.cluster_init(1).expect("init");
    let seed = host_addr(1).to_string();
    for k in 2..=HOSTS {
        lab.cluster_join(k, &init.join_token, &[&seed])
            .expect("join");
    }
    let all: Vec<usize> = (1..=HOSTS).collect();
    lab.wait_members(&all).expect("cluster");

    let t = Instant::now();
    for i in 0..NETWORKS {
        let k = i % HOSTS + 1;
        lab.network_create(k, &format!("n{i}"), &[])
            .unwrap_or_else(|e| panic!("creating n{i} on h{k}: {e:#}"));
    }
    let created = t.elapsed();
    ovl_e2e::wait_until(PATIENCE, ovl_e2e::POLL, || {
        for k in &all {
            let n = lab.networks(*k)?.len();
            ensure!(n == NETWORKS, "h{k} lists {n} networks");
        }
        Ok(true)
    })
    .expect("every host lists the 200 networks");
    println!(
        "{NETWORKS} networks created in {created:.2?}, on every host after {:.2?}",
        t.elapsed()
    );
    let containers: Vec<Container> = all
        .iter()
        .map(|&k| lab.add_container(k, "churn").expect("container"))
        .collect();
    let before: Vec<_> = all
        .iter()
        .map(|&k| table_gauges(&lab, k).expect("metrics"))
        .collect();

    let dead: Mutex<Vec<(Duration, String)>> = Mutex::default();
    let peak = Mutex::new(vec![0u64; HOSTS]);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let until = started + churn_time();
    let rounds: Vec<Result<(usize, BTreeSet<String>)>> = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let mut polls = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for line in not_alive(&lab) {
                    dead.lock().unwrap().push((started.elapsed(), line));
                }
                for k in 1..=HOSTS {
                    if let Ok(g) = table_gauges(&lab, k) {
                        let mut p = peak.lock().unwrap();
                        p[k - 1] = p[k - 1].max(own_tombstones(&g));
                    }
                }
                polls += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            polls
        });
        let workers: Vec<_> = containers
            .iter()
            .map(|c| {
                let lab = &lab;
                s.spawn(move || churn(lab, c.host, c, until))
            })
            .collect();
        let r = workers
            .into_iter()
            .map(|w| w.join().expect("worker panicked"))
            .collect();
        stop.store(true, Ordering::Relaxed);
        let polls = watcher.join().expect("watcher panicked");
        println!("membership polled {polls} times on each host during the churn");
        r
    });
    let churned = started.elapsed();
    let mut total = 0;
    let mut long_used = Vec::new();
    for (k, r) in rounds.into_iter().enumerate() {
        match r {
            Ok((n, long)) => {
                println!(
                    "h{}: {n} rounds (create, 2 attach, 2 detach, rm), {} long-lived networks used",
                    k + 1,
                    long.len()
                );
                total += n;
                long_used.push(long.len() as u64);
            }
            Err(e) => panic!("h{} churn failed: {e:#}", k + 1),
        }
    }
    println!("{total} rounds in {churned:.2?}");
    let dead = dead.into_inner().unwrap();
    assert!(
        dead.is_empty(),
        "a host was not alive in some view during the churn: {:?}",
        &dead[..dead.len().min(20)]
    );
    assert!(total >= HOSTS, "the churn did not run");

    // Settled: every peer pulled past the churn, so the tombstones go.
    let mut after = Vec::new();
    let settle = ovl_e2e::wait_until(PATIENCE, ovl_e2e::POLL, || {
        after.clear();
        for k in &all {
            let g = table_gauges(&lab, *k)?;
            ensure!(
                own_tombstones(&g) <= SETTLED_TOMBSTONES,
                "h{k} still holds {} own tombstones",
                own_tombstones(&g)
            );
            after.push(g);
        }
        Ok(true)
    });
    let peak = peak.into_inner().unwrap();
    for k in 1..=HOSTS {
        let (b, a) = (&before[k - 1], after.get(k - 1));
        println!(
            "h{k}: own rows {} -> {}, own tombstones {} -> {} (peak {}), replica tombstones {} -> {}, fsyncs {} -> {}, snapshots {}",
            own_rows(b),
            a.map_or(0, own_rows),
            own_tombstones(b),
            a.map_or(0, own_tombstones),
            peak[k - 1],
            b.get("ovl_table_tombstones{table=\"replicas\"}")
                .unwrap_or(&0),
            a.and_then(|a| a.get("ovl_table_tombstones{table=\"replicas\"}"))
                .unwrap_or(&0),
            b.get("ovl_store_fsyncs_total").unwrap_or(&0),
            a.and_then(|a| a.get("ovl_store_fsyncs_total"))
                .unwrap_or(&0),
            a.and_then(|a| a.get("ovl_store_snapshots_total"))
                .unwrap_or(&0),
        );
    }
    let settle = settle.expect("tombstones collected once the churn stops");
    println!("tombstones settled {settle:.2?} after the churn");
    for (k, p) in peak.iter().enumerate() {
        assert!(*p <= MAX_TOMBSTONES, "h{}: {p} tombstones at peak", k + 1);
    }
    // Growth is the removal records (one per removed network, kept so a
    // stale copy cannot bring a network back, for `store::removals`'
    // retention) and this host's view of the IPAM ring of each long-lived
    // network it attached to (one per live network): nothing of a removed
    // network but its removal stays.
    for k in 1..=HOSTS {
        let (b, a) = (own_rows(&before[k - 1]), own_rows(&after[k - 1]));
        let rings = long_used[k - 1];
        assert!(
            a <= b + total as u64 + rings + SETTLED_TOMBSTONES,
            "h{k}: own rows {b} -> {a} after {total} removed networks and {rings} long-lived networks used"
        );
    }
    assert!(not_alive(&lab).is_empty(), "{:?}", not_alive(&lab));
}
