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

/// Starts tcpdump on every port of the lab's underlay switch, writing to
/// `file` in the lab directory, with an optional capture `filter`; returns
/// once the file exists.
pub fn underlay_capture(lab: &Lab, file: &str, filter: &[&str]) -> ovl_e2e::Background {
    let path = lab.dir().join(file);
    let path_s = path.to_string_lossy().into_owned();
    let mut tcpdump = Command::new("ip");
    tcpdump.args([
        "netns",
        "exec",
        &lab.switch_ns(),
        "tcpdump",
        "-i",
        "any",
        "-s",
        "0",
        "-U",
        // Hand each packet over at once, not when a ring block fills.
        "--immediate-mode",
        // A large buffer, so that the kernel drops nothing (it says so).
        "-B",
        "32768",
        "-n",
        // Keep root: the lab directory is root's alone.
        "-Z",
        "root",
        "-w",
        &path_s,
    ]);
    tcpdump.args(filter);
    let cap = ovl_e2e::Background::spawn(lab, &mut tcpdump).expect("tcpdump");
    ovl_e2e::wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        Ok(std::fs::metadata(&path)
            .map(|m| m.len() > 0)
            .unwrap_or(false))
    })
    .expect("tcpdump writes its capture file");
    cap
}

/// Stops a capture and checks the kernel dropped none of its packets.
pub fn stop_capture(f: &mut ovl_e2e::Findings, cap: ovl_e2e::Background) {
    if let Some(out) = f.ok(
        "tcpdump stops",
        cap.stop(libc::SIGINT, Duration::from_secs(5)),
    ) {
        println!("tcpdump: {}", out.stderr.trim().replace('\n', "; "));
        f.check(
            out.stderr
                .lines()
                .any(|l| l.trim() == "0 packets dropped by kernel"),
            || format!("the capture is incomplete: {}", out.stderr.trim()),
        );
    }
}

/// Packets in `pcap` matching `filter` (`tcpdump -r`).
pub fn pcap_count(pcap: &std::path::Path, filter: &str) -> usize {
    let out = Command::new("tcpdump")
        .arg("-r")
        .arg(pcap)
        .args(["-n", filter])
        .output()
        .expect("tcpdump -r");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// Whether `needle` (non-empty) occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Host k's counter `name` (`ovlctl cluster status`); 0 when absent.
pub fn counter(lab: &Lab, k: usize, name: &str) -> u64 {
    lab.status(k)
        .ok()
        .and_then(|s| s.counters.get(name).and_then(|v| v.as_u64()))
        .unwrap_or(0)
}

/// Host k's agent resident memory (VmRSS), KiB; 0 when not running.
pub fn rss_kib(lab: &Lab, k: usize) -> u64 {
    lab.agent_pid(k)
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
