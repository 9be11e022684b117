//! Issue #6 acceptance, gossip side, against real agents in namespaces: a
//! member (h3, with its real identity key and the join token) sends
//! correctly sealed gossip datagrams that speak for h1, and nobody's view
//! of h1 changes; the datagram that tripped chitchat's assertion is refused
//! and gossip carries on; a gossip task that dies takes the agent down with
//! a non-zero status instead of leaving a zombie.
//!
//! The attacker is `ovl-gossip-forge` (tests/src/bin), run inside h3's host
//! namespace. Needs root and the binaries (`cargo build --release
//! --workspace --bins`).

mod common;

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use common::cluster_with_network;
use ovl_e2e::{Findings, Lab, NodeRow, POLL, always_for, wait_until};

/// How long views are watched after an attack for any change.
const WATCH: Duration = Duration::from_secs(4);

fn counter(lab: &Lab, k: usize, name: &str) -> Result<u64> {
    let status = lab.status(k)?;
    Ok(status
        .counters
        .get(name)
        .and_then(|v| v.as_u64())
        .unwrap_or(0))
}

/// What host `viewer` says about the node named `name`.
fn row(lab: &Lab, viewer: usize, name: &str) -> Result<NodeRow> {
    lab.nodes(viewer)?
        .into_iter()
        .find(|r| r.name == name)
        .ok_or_else(|| anyhow::anyhow!("h{viewer} does not list {name}"))
}

/// The facts about a node that a forgery would change.
fn facts(r: &NodeRow) -> (String, String, String, String, String) {
    (
        r.status.clone(),
        r.advertise_addr.clone(),
        r.data_path_addr.clone(),
        r.gossip_addr.clone(),
        r.generation.to_string(),
    )
}

/// Runs the forging tool in h3's namespace, as h3 (its identity key).
fn forge(
    lab: &Lab,
    token: &str,
    to: usize,
    victim: &NodeRow,
    mode: &str,
    count: u32,
) -> Result<()> {
    let bin = ovl_e2e::binary("ovl-gossip-forge")?;
    let key = lab.state_dir(3).join("identity.pk8");
    let victim_arg = format!(
        "{}:{}:{}",
        victim.id,
        victim.generation.as_u64().unwrap_or(0),
        victim.gossip_addr
    );
    let to_arg = format!("{}:7946", lab.addr(to));
    let out = lab.exec_ok(
        3,
        &[
            &bin.display().to_string(),
            "--token",
            token,
            "--key",
            &key.display().to_string(),
            "--to",
            &to_arg,
            "--victim",
            &victim_arg,
            "--mode",
            mode,
            "--count",
            &count.to_string(),
            "--interval-ms",
            "50",
        ],
    )?;
    ensure!(
        out.stdout
            .lines()
            .filter(|l| l.starts_with("sent "))
            .count()
            == count as usize,
        "forge did not send {count} datagrams: {out}"
    );
    Ok(())
}

#[test]
fn a_member_cannot_speak_for_another_node_in_gossip() {
    let (mut lab, net) = cluster_with_network(3, "trust", &[]);
    let token = lab
        .ctl_ok(1, &["cluster", "join-token"])
        .expect("token")
        .stdout;
    let token = token.trim().to_string();
    let (c1, e1) = common::attached(&mut lab, 1, "c1", "trust", &[]);
    let (c2, e2) = common::attached(&mut lab, 2, "c2", "trust", &[]);
    lab.wait_dataplane(&[1, 2], net.vni, &[e1.clone(), e2.clone()])
        .expect("data plane programmed");
    let h1 = lab.node_name(1);
    let victim = row(&lab, 1, &h1).expect("h1 about itself");
    let before2 = facts(&row(&lab, 2, &h1).expect("h2 about h1"));
    let before3 = facts(&row(&lab, 3, &h1).expect("h3 about h1"));
    let mut f = Findings::new();
    let mut ping = lab.start_ping(&c2, &e1.ip).expect("ping c2 -> c1");
    f.ok(
        "ping c2 -> c1 before the attack",
        ping.wait_replies(5, Duration::from_secs(10)).map(|_| ()),
    );

    let forged_before = counter(&lab, 2, "gossip_forged").unwrap_or(0);
    let sent = 5;
    for mode in [
        "newer-left-unsigned",
        "newer-left-signed",
        "newer-addrs-signed",
    ] {
        f.ok(mode, forge(&lab, &token, 2, &victim, mode, sent));
    }
    let forged_after = counter(&lab, 2, "gossip_forged").unwrap_or(0);
    println!(
        "h2 gossip_forged: {forged_before} -> {forged_after} after {} forged datagrams",
        3 * sent
    );
    f.check(forged_after >= forged_before + 3 * u64::from(sent), || {
        format!(
            "h2 counted {forged_before} -> {forged_after} forgeries, sent {}",
            3 * sent
        )
    });

    // Nobody's view of h1 moves, for a while after.
    let unchanged = always_for(WATCH, POLL, || {
        let now2 = facts(&row(&lab, 2, &h1)?);
        let now3 = facts(&row(&lab, 3, &h1)?);
        ensure!(
            now2 == before2,
            "h2 now sees h1 as {now2:?}, before {before2:?}"
        );
        ensure!(
            now3 == before3,
            "h3 now sees h1 as {now3:?}, before {before3:?}"
        );
        Ok(())
    });
    f.ok(
        "views of h1 unchanged after the forgeries",
        unchanged.map(|_| ()),
    );

    // A huge heartbeat for h1: real heartbeats keep counting.
    f.ok(
        "huge-heartbeat",
        forge(&lab, &token, 2, &victim, "huge-heartbeat", 20),
    );
    let alive = always_for(WATCH + Duration::from_secs(2), POLL, || {
        let s = row(&lab, 2, &h1)?.status;
        ensure!(s == "alive", "h2 sees h1 {s} after a forged huge heartbeat");
        Ok(())
    });
    f.ok(
        "h1 stays alive at h2 after a forged heartbeat",
        alive.map(|_| ()),
    );

    // The crafted delta that tripped chitchat's assertion.
    let unsafe_before = counter(&lab, 2, "gossip_drop_unsafe").unwrap_or(0);
    f.ok(
        "trip-assert",
        forge(&lab, &token, 2, &victim, "trip-assert", 3),
    );
    let unsafe_after = counter(&lab, 2, "gossip_drop_unsafe").unwrap_or(0);
    println!("h2 gossip_drop_unsafe: {unsafe_before} -> {unsafe_after} after 3 crafted deltas");
    f.check(unsafe_after >= unsafe_before + 3, || {
        format!("h2 counted {unsafe_before} -> {unsafe_after} unsafe deltas, sent 3")
    });
    f.check(lab.agent_running(2), || "h2's agent died".into());
    let gossip_on = always_for(WATCH, POLL, || {
        for viewer in [1, 3] {
            let s = row(&lab, viewer, &lab.node_name(2))?.status;
            ensure!(s == "alive", "h{viewer} sees h2 {s}: its gossip stopped");
        }
        let rx = counter(&lab, 2, "gossip_rx")?;
        ensure!(rx > 0, "h2 received no gossip");
        Ok(())
    });
    f.ok(
        "h2 keeps gossiping after the crafted delta",
        gossip_on.map(|_| ()),
    );

    // A captured datagram sent again is dropped as a replay (issue 8):
    // the first copy opens, the 4 others are counted.
    let replays_before = counter(&lab, 2, "gossip_drop_replay").unwrap_or(0);
    f.ok("replay", forge(&lab, &token, 2, &victim, "replay", 5));
    let replayed = wait_until(Duration::from_secs(3), POLL, || {
        Ok(counter(&lab, 2, "gossip_drop_replay")? >= replays_before + 4)
    });
    println!(
        "h2 gossip_drop_replay: {replays_before} -> {} after 5 copies of one datagram",
        counter(&lab, 2, "gossip_drop_replay").unwrap_or(0)
    );
    f.ok("h2 drops 4 replayed copies", replayed.map(|_| ()));

    let report = ping.stop().expect("stopping the ping");
    let lost = report.lost.len();
    println!(
        "ping c2 -> c1 during the attacks: {} sent, {lost} lost",
        report.transmitted
    );
    f.check(lost == 0, || {
        format!(
            "ping c2 -> c1 lost {lost} of {}: {report}",
            report.transmitted
        )
    });
    f.ok(
        "h1 data plane intact at h2",
        lab.check_dataplane(2, net.vni, std::slice::from_ref(&e1)),
    );
    drop(c1);
    f.finish();
}

#[test]
fn an_agent_whose_gossip_dies_exits_non_zero_within_5s() {
    let mut lab = Lab::new(2).expect("lab");
    lab.start_cluster(&[1, 2]).expect("cluster");
    lab.stop_agent(2).expect("stop h2");
    lab.spawn_agent(2, &[], &[("OVL_TEST_FAULT", "gossip-recv")])
        .expect("start h2 with the gossip fault");
    let t = Instant::now();
    let exited = wait_until(Duration::from_secs(20), POLL, || {
        Ok(lab.agent_exit_status(2).is_some())
    });
    let took = t.elapsed();
    let status = lab.agent_exit_status(2);
    println!("h2 with a dead gossip task exited after {took:.2?} with {status:?}");
    assert!(exited.is_ok(), "h2 kept running with a dead gossip task");
    assert!(took <= Duration::from_secs(5), "h2 took {took:.2?} to exit");
    let status = status.expect("exit status");
    assert!(!status.success(), "h2 exited with {status}, want non-zero");
    let log = lab.log_tail(2, 40);
    assert!(
        log.contains("gossip task died"),
        "the log does not say why:\n{log}"
    );
}
