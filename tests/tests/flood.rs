//! Issue #8 flood test, against real agents: a stranger on the underlay
//! (lab host h4, no agent) floods the 3 agents for `OVL_FLOOD_SECS`
//! (default 30) seconds with everything `ovl-flood` (tests/src/bin) sends:
//! random and truncated UDP at 7946 and 4500, garbage and half-open TCP
//! and 200 concurrent maximum-size HTTP/2 streams without credentials at
//! 7946/tcp, and 5000 idle connections. Throughout, the agents stay up and
//! every host stays alive in every view; container pings across hosts on
//! an encrypted and a plain network lose nothing; each agent's RSS after
//! the flood is within 20 MB of before; the counters show the refusals.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{attached, counter, rss_kib};
use ovl_e2e::{Background, Findings, Lab, exclusive};

const AGENTS: [usize; 3] = [1, 2, 3];
const ATTACKER: usize = 4;
/// Extra source addresses of the attacker, so the per-source cap is not
/// the only one the idle connections meet.
const SOURCES: usize = 16;

/// What the counters should show refused, summed over the agents.
const REFUSALS: &[&str] = &[
    "gossip_drop_short",
    "gossip_drop_bad_magic",
    "gossip_drop_bad_tag",
    "gossip_drop_unknown_key",
    "peer_conn_limited",
    "peer_tls_refused",
    "peer_gate_not_member",
    "peer_call_refused",
    "peer_idle_closed",
];

fn sum(lab: &Lab, name: &str) -> u64 {
    AGENTS.iter().map(|&k| counter(lab, k, name)).sum()
}

fn views_alive(lab: &Lab) -> Result<(), String> {
    for k in AGENTS {
        let nodes = lab.nodes(k).map_err(|e| format!("h{k}: {e:#}"))?;
        let alive = nodes.iter().filter(|n| n.status == "alive").count();
        if nodes.len() != 3 || alive != 3 {
            let v: Vec<_> = nodes
                .iter()
                .map(|n| (n.name.clone(), n.status.clone()))
                .collect();
            return Err(format!("h{k} sees {v:?}"));
        }
    }
    Ok(())
}

#[test]
fn agents_survive_a_flood_with_every_host_alive_no_ping_lost_and_flat_memory() {
    let _g = exclusive();
    let secs: u64 = std::env::var("OVL_FLOOD_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let mut lab = Lab::new(4).expect("lab");
    lab.start_cluster(&AGENTS).expect("cluster");
    let mut f = Findings::new();
    lab.network_create(1, "fenc", &["--subnet", "198.19.30.0/24", "--encrypted"])
        .expect("encrypted network");
    lab.network_create(1, "fplain", &["--subnet", "198.19.31.0/24"])
        .expect("plain network");
    lab.wait_network(&AGENTS, "fenc").expect("fenc everywhere");
    lab.wait_network(&AGENTS, "fplain")
        .expect("fplain everywhere");
    let (c1, _) = attached(&mut lab, 1, "c1", "fenc", &[]);
    let (_c2, e2) = attached(&mut lab, 2, "c2", "fenc", &[]);
    let (c3, _) = attached(&mut lab, 1, "c3", "fplain", &[]);
    let (_c4, e4) = attached(&mut lab, 3, "c4", "fplain", &[]);
    for (c, to) in [(&c1, &e2.ip), (&c3, &e4.ip)] {
        let ok = (0..50).any(|_| lab.ping_once(c, to).unwrap_or(false));
        f.check(ok, || format!("{c} cannot reach {to} before the flood"));
    }
    let ids: Vec<String> = AGENTS
        .iter()
        .map(|&k| {
            lab.nodes(k)
                .expect("nodes")
                .into_iter()
                .find(|n| n.is_self)
                .expect("self row")
                .id
        })
        .collect();
    let sources: Vec<String> = (0..SOURCES)
        .map(|i| format!("198.18.0.{}", 200 + i))
        .collect();
    for s in &sources {
        lab.exec_ok(
            ATTACKER,
            &["ip", "addr", "add", &format!("{s}/24"), "dev", "eth0"],
        )
        .expect("attacker source address");
    }
    // Memory settles after the cluster forms and the pings start.
    let mut pings = vec![
        lab.start_ping(&c1, &e2.ip).expect("ping encrypted"),
        lab.start_ping(&c3, &e4.ip).expect("ping plain"),
    ];
    std::thread::sleep(Duration::from_secs(3));
    let rss0: Vec<u64> = AGENTS.iter().map(|&k| rss_kib(&lab, k)).collect();
    let before: Vec<u64> = REFUSALS.iter().map(|c| sum(&lab, c)).collect();

    let targets: Vec<String> = AGENTS.iter().map(|&k| lab.addr(k).to_string()).collect();
    let tool = ovl_e2e::binary("ovl-flood").expect("ovl-flood binary");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &lab.ns(ATTACKER)])
        .arg(&tool)
        .args(["--targets", &targets.join(",")])
        .args(["--ids", &ids.join(",")])
        .args(["--sources", &sources.join(",")])
        .args(["--secs", &secs.to_string()]);
    let started = Instant::now();
    let flood = Background::spawn(&lab, &mut cmd).expect("start ovl-flood");
    let mut checks = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(2));
        checks += 1;
        for k in AGENTS {
            f.check(lab.agent_running(k), || {
                format!("h{k}'s agent died during the flood")
            });
        }
        if let Err(e) = views_alive(&lab) {
            f.check(false, || {
                format!("during the flood at {:.1?}: {e}", started.elapsed())
            });
        }
    }
    let out = flood.stop(0, Duration::from_secs(60));
    let report = out
        .as_ref()
        .map(|o| o.stdout.lines().last().unwrap_or("").to_string())
        .unwrap_or_default();
    println!("ovl-flood: {report}");
    f.check(out.as_ref().is_ok_and(|o| o.success()), || {
        format!("ovl-flood: {out:?}")
    });
    println!("{checks} liveness checks during {secs} s of flood");
    // Let the connections the flood left be dropped (handshake timeout,
    // idle timeout) before memory is read.
    std::thread::sleep(Duration::from_secs(12));
    for p in pings.drain(..) {
        match p.stop() {
            Ok(r) => {
                println!(
                    "{}: {} sent, {} received, lost {:?}",
                    r.what,
                    r.transmitted,
                    r.received(),
                    r.lost
                );
                f.check(r.lost.is_empty() && r.received() > 0, || {
                    format!("{}: lost {:?} of {}", r.what, r.lost, r.transmitted)
                });
            }
            Err(e) => {
                f.check(false, || format!("ping: {e:#}"));
            }
        }
    }
    let rss1: Vec<u64> = AGENTS.iter().map(|&k| rss_kib(&lab, k)).collect();
    for (i, k) in AGENTS.iter().enumerate() {
        let grew = rss1[i].saturating_sub(rss0[i]);
        println!(
            "h{k} RSS: {} KiB before, {} KiB after (+{grew} KiB)",
            rss0[i], rss1[i]
        );
        f.check(grew <= 20 * 1024, || {
            format!(
                "h{k} RSS grew by {grew} KiB (from {} to {})",
                rss0[i], rss1[i]
            )
        });
    }
    let mut refused = 0;
    for (i, c) in REFUSALS.iter().enumerate() {
        let d = sum(&lab, c) - before[i];
        refused += d;
        println!("{c}: +{d}");
    }
    for c in [
        "gossip_drop_short",
        "peer_conn_limited",
        "peer_gate_not_member",
    ] {
        let i = REFUSALS.iter().position(|x| x == &c).unwrap_or(0);
        let d = sum(&lab, c) - before[i];
        f.check(d > 0, || format!("{c} did not move during the flood"));
    }
    f.check(refused > 0, || "no refusal counted".into());
    if let Err(e) = views_alive(&lab) {
        f.check(false, || format!("after the flood: {e}"));
    }
    if !f.failures().is_empty() {
        for k in AGENTS {
            println!("--- h{k} log ---\n{}", lab.log_tail(k, 40));
        }
    }
    f.finish();
}
