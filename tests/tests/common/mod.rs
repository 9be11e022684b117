//! Helpers shared by the network test files (each file is its own test
//! binary and includes this module).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use ovl_e2e::cmd::run_all;
use ovl_e2e::{Container, EndpointRow, Lab, NetworkRow, PATIENCE};

/// A `ping -c N` summary: (transmitted, received).
pub fn ping_counts(stdout: &str) -> Option<(u64, u64)> {
    let line = stdout.lines().find(|l| l.contains("packets transmitted"))?;
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    Some((*nums.first()?, *nums.get(1)?))
}

/// Builds a lab of `hosts` hosts, forms the cluster, creates network `name`
/// on h1 with `extra` flags and waits until every host lists it.
pub fn cluster_with_network(hosts: usize, name: &str, extra: &[&str]) -> (Lab, NetworkRow) {
    let mut lab = Lab::new(hosts).expect("lab");
    let all: Vec<usize> = (1..=hosts).collect();
    let t = Instant::now();
    lab.start_cluster(&all).expect("forming the cluster");
    println!("cluster of {hosts} formed in {:.2?}", t.elapsed());
    let net = lab.network_create(1, name, extra).expect("network create");
    let took = lab
        .wait_network(&all, name)
        .expect("the network reaches every host");
    println!(
        "network {name}: vni {} subnet {} gateway {}; listed on all {hosts} hosts after {took:.2?}",
        net.vni, net.subnet, net.gateway
    );
    (lab, net)
}

/// Creates container `label` on host k and attaches it to `network` with
/// `extra` flags.
pub fn attached(
    lab: &mut Lab,
    k: usize,
    label: &str,
    network: &str,
    extra: &[&str],
) -> (Container, EndpointRow) {
    let c = lab.add_container(k, label).expect("container");
    let ep = lab
        .attach(network, &c, extra)
        .unwrap_or_else(|e| panic!("attaching {c} to {network}: {e:#}"));
    (c, ep)
}

/// Whether `ip` (a.b.c.d) lies in `cidr` (a.b.c.d/len).
pub fn in_subnet(ip: &str, cidr: &str) -> bool {
    let Some((net, len)) = cidr.split_once('/') else {
        return false;
    };
    let (Ok(ip), Ok(net), Ok(len)) = (
        ip.parse::<std::net::Ipv4Addr>(),
        net.parse::<std::net::Ipv4Addr>(),
        len.parse::<u32>(),
    ) else {
        return false;
    };
    if len > 32 {
        return false;
    }
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(ip) & mask == u32::from(net) & mask
}

/// The prefix length of `cidr`.
pub fn prefix_len(cidr: &str) -> u32 {
    cidr.split_once('/')
        .and_then(|(_, l)| l.parse().ok())
        .unwrap_or(0)
}

/// Pings every (from, target ip) pair at once, `count` packets 0.2 s apart;
/// returns (transmitted, received) per pair, in order.
pub fn ping_all(lab: &Lab, pairs: &[(&Container, &str)], count: u32) -> Vec<Result<(u64, u64)>> {
    let count = count.to_string();
    let cmds: Vec<Command> = pairs
        .iter()
        .map(|(c, ip)| {
            lab.exec_in_command(
                c,
                &["ping", "-n", "-q", "-c", &count, "-i", "0.2", "-W", "2", ip],
            )
        })
        .collect();
    run_all(cmds, Duration::from_secs(60))
        .into_iter()
        .map(|r| {
            let out = r?;
            ping_counts(&out.stdout).with_context(|| format!("no ping summary: {out}"))
        })
        .collect()
}

/// Pings each pair until it answers (one packet, 1 s timeout, all pending
/// pairs at once per round); returns when each pair first answered.
pub fn wait_reachable(
    lab: &Lab,
    pairs: &[(&Container, &str)],
    timeout: Duration,
) -> Result<BTreeMap<usize, Duration>> {
    let start = Instant::now();
    let mut first: BTreeMap<usize, Duration> = BTreeMap::new();
    loop {
        let pending: Vec<usize> = (0..pairs.len())
            .filter(|i| !first.contains_key(i))
            .collect();
        if pending.is_empty() {
            return Ok(first);
        }
        let round: Vec<(&Container, &str)> = pending.iter().map(|&i| pairs[i]).collect();
        let cmds: Vec<Command> = round
            .iter()
            .map(|(c, ip)| lab.exec_in_command(c, &["ping", "-n", "-q", "-c", "1", "-W", "1", ip]))
            .collect();
        for (i, r) in pending.iter().zip(run_all(cmds, Duration::from_secs(30))) {
            if r.map(|o| o.success()).unwrap_or(false) {
                first.insert(*i, start.elapsed());
            }
        }
        if first.len() < pairs.len() && start.elapsed() >= timeout {
            let missing: Vec<String> = (0..pairs.len())
                .filter(|i| !first.contains_key(i))
                .map(|i| format!("{} -> {}", pairs[i].0, pairs[i].1))
                .collect();
            ensure!(
                false,
                "{} of {} pairs still unreachable after {timeout:?}: {}",
                missing.len(),
                pairs.len(),
                missing.join(", ")
            );
        }
    }
}

/// `ovlctl network ls` and `endpoint ls` of each host, canonical: what
/// must not change when a command is refused.
pub fn snapshot(lab: &Lab, hosts: &[usize]) -> Vec<String> {
    let mut out = Vec::new();
    for &k in hosts {
        let mut nets: Vec<String> = lab
            .networks(k)
            .expect("network ls")
            .iter()
            .map(|n| format!("{n:?}"))
            .collect();
        nets.sort();
        let mut eps: Vec<String> = lab
            .endpoints(k, None)
            .expect("endpoint ls")
            .iter()
            .map(|e| format!("{e:?}"))
            .collect();
        eps.sort();
        out.push(format!("h{k} networks: {nets:?}"));
        out.push(format!("h{k} endpoints: {eps:?}"));
    }
    out
}

/// Waits until `gone` holds on each of `hosts` (polling every 20 ms);
/// returns when it first held per host, measured from `start`.
pub fn wait_each<F>(
    hosts: &[usize],
    start: Instant,
    timeout: Duration,
    mut gone: F,
) -> Result<BTreeMap<usize, Duration>>
where
    F: FnMut(usize) -> Result<bool>,
{
    let mut done = BTreeMap::new();
    let mut last = String::new();
    loop {
        for &k in hosts {
            if done.contains_key(&k) {
                continue;
            }
            match gone(k) {
                Ok(true) => {
                    done.insert(k, start.elapsed());
                }
                Ok(false) => last = format!("h{k}: not yet"),
                Err(e) => last = format!("h{k}: {e:#}"),
            }
        }
        if done.len() == hosts.len() {
            return Ok(done);
        }
        ensure!(
            start.elapsed() < timeout,
            "not reached on all of {hosts:?} within {timeout:?} (reached: {done:?}); last: {last}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `h2 after 0.41 s, h3 after 0.38 s`
pub fn per_host(times: &BTreeMap<usize, Duration>) -> String {
    times
        .iter()
        .map(|(k, t)| format!("h{k} after {:.2} s", t.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The patience for waits whose bound the test checks separately.
pub const LONG: Duration = PATIENCE;
