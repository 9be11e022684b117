//! Issue #2 acceptance, against real agents in network namespaces: forming a
//! cluster, failure detection, restart, refusing wrong tokens, ovlctl
//! errors, clean leave.
//!
//! Needs root and the binaries (`cargo build --release --workspace --bins`).
//! Each test builds its own lab. Waits poll every 100 ms for up to
//! `PATIENCE`, so a slow path is measured and reported, and the measured
//! time is then checked against the acceptance bound.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use ovl_e2e::{CtlOutput, Lab, NodeRow, POLL, always_for, host_addr, ip_part, wait_until};
use serde_json::Value;

/// Acceptance bound for membership changes to show everywhere.
const BOUND: Duration = Duration::from_secs(5);
/// How long a wait keeps watching before giving up (longer than BOUND so a
/// miss is measured, not just reported).
const PATIENCE: Duration = Duration::from_secs(20);

// ---- helpers -----------------------------------------------------------------

/// h1 runs `cluster init`, every other host in `hosts` joins via h1.
/// Agents are started here. Returns the init output; does not wait for
/// convergence.
fn form_cluster(lab: &mut Lab, hosts: &[usize]) -> ovl_e2e::InitOutput {
    for &k in hosts {
        lab.start_agent(k, &[]).expect("starting an agent");
    }
    let init = lab.cluster_init(hosts[0]).expect("cluster init");
    let seed = host_addr(hosts[0]).to_string();
    for &k in &hosts[1..] {
        let joined = lab
            .cluster_join(k, &init.join_token, &[&seed])
            .expect("cluster join");
        assert_eq!(
            joined.cluster_id, init.cluster_id,
            "h{k} joined another cluster"
        );
    }
    init
}

fn show(rows: &[NodeRow]) -> String {
    rows.iter()
        .map(|r| {
            format!(
                "{}({}, id {}) {}",
                r.name,
                r.advertise_addr,
                short(&r.id),
                r.status
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// The rows whose advertise address is host k's.
fn rows_of(rows: &[NodeRow], k: usize) -> Vec<&NodeRow> {
    let addr = host_addr(k).to_string();
    rows.iter()
        .filter(|r| ip_part(&r.advertise_addr) == addr)
        .collect()
}

/// Checks that `viewer` lists exactly the hosts in `expect`, once each, with
/// the given statuses. Errors describe what the viewer shows.
fn check_view(lab: &Lab, viewer: usize, expect: &[(usize, &str)]) -> Result<()> {
    let rows = lab.nodes(viewer)?;
    ensure!(
        rows.len() == expect.len(),
        "h{viewer} lists {} nodes, want {}: {}",
        rows.len(),
        expect.len(),
        show(&rows)
    );
    for &(k, status) in expect {
        let mine = rows_of(&rows, k);
        ensure!(
            mine.len() == 1,
            "h{viewer} lists h{k} {} times: {}",
            mine.len(),
            show(&rows)
        );
        ensure!(
            mine[0].status == status,
            "h{viewer} shows h{k} as {:?}, want {status:?}: {}",
            mine[0].status,
            show(&rows)
        );
    }
    Ok(())
}

fn all_alive(hosts: &[usize]) -> Vec<(usize, &'static str)> {
    hosts.iter().map(|&k| (k, "alive")).collect()
}

/// Waits until every host in `hosts` lists all of them alive; returns the
/// total time and the time at which each viewer first did.
fn wait_converged(lab: &Lab, hosts: &[usize]) -> Result<(Duration, BTreeMap<usize, Duration>)> {
    let start = Instant::now();
    let want = all_alive(hosts);
    let mut first: BTreeMap<usize, Duration> = BTreeMap::new();
    let took = wait_until(PATIENCE, POLL, || {
        let mut pending = Vec::new();
        for &v in hosts {
            if first.contains_key(&v) {
                // Still check: a view must not regress once converged.
                check_view(lab, v, &want)?;
                continue;
            }
            match check_view(lab, v, &want) {
                Ok(()) => {
                    first.insert(v, start.elapsed());
                }
                Err(e) => pending.push(format!("{e:#}")),
            }
        }
        if pending.is_empty() {
            Ok(true)
        } else {
            bail!("{}", pending.join("; "))
        }
    })?;
    Ok((took, first))
}

/// `OVLTKN-1-<32 hex>-<64 hex>` split into (cluster part, secret part).
fn token_parts(token: &str) -> (String, String) {
    let parts: Vec<&str> = token.trim().split('-').collect();
    assert_eq!(
        parts.len(),
        4,
        "token {token:?} is not OVLTKN-1-<32 hex>-<64 hex>"
    );
    assert_eq!((parts[0], parts[1]), ("OVLTKN", "1"), "token {token:?}");
    let hex = |s: &str, n: usize| s.len() == n && s.chars().all(|c| c.is_ascii_hexdigit());
    assert!(
        hex(parts[2], 32) && hex(parts[3], 64),
        "token {token:?} has bad hex parts"
    );
    (parts[2].to_string(), parts[3].to_string())
}

fn flip_last_hex(s: &str) -> String {
    let mut out = s.to_string();
    let last = out.pop().expect("non-empty hex");
    out.push(if last == '0' { '1' } else { '0' });
    out
}

/// The real token with one hex digit of its secret changed: same cluster
/// id, wrong secret.
fn wrong_secret(token: &str) -> String {
    let (cluster, secret) = token_parts(token);
    format!("OVLTKN-1-{cluster}-{}", flip_last_hex(&secret))
}

/// The real token with one hex digit of its cluster id changed.
fn wrong_cluster(token: &str) -> String {
    let (cluster, secret) = token_parts(token);
    format!("OVLTKN-1-{}-{secret}", flip_last_hex(&cluster))
}

/// An ovlctl failure per the contract: exit 1, exactly one stderr line
/// starting with "ovlctl: error: ".
fn assert_one_line_error(what: &str, out: &CtlOutput) {
    assert_eq!(out.code(), Some(1), "{what}: want exit 1: {out}");
    let lines = out.stderr_lines();
    assert_eq!(
        lines.len(),
        1,
        "{what}: want exactly one stderr line: {out}"
    );
    assert!(
        lines[0].starts_with("ovlctl: error: "),
        "{what}: stderr must start with \"ovlctl: error: \": {out}"
    );
}

/// A clap usage error: non-zero exit, something on stderr.
fn assert_usage_error(what: &str, out: &CtlOutput) {
    assert!(!out.success(), "{what}: must fail: {out}");
    assert!(
        !out.stderr.trim().is_empty(),
        "{what}: stderr is empty: {out}"
    );
}

/// What must not change when a command fails: per host, the status fields
/// that describe membership and the node list.
fn snapshot(lab: &Lab, hosts: &[usize]) -> Vec<String> {
    hosts
        .iter()
        .map(|&k| {
            let s = lab.status(k).expect("cluster status");
            // An unclustered agent may refuse `cluster nodes`; then its
            // answer is part of what must not change.
            let out = lab
                .ctl(k, &["--format", "json", "cluster", "nodes"])
                .expect("ovlctl cluster nodes");
            let mut rows: Vec<String> = if out.success() {
                let rows: Vec<NodeRow> =
                    serde_json::from_str(&out.stdout).expect("cluster nodes JSON");
                rows.iter().map(row_key).collect()
            } else {
                vec![format!("{:?}: {}", out.code(), out.stderr.trim())]
            };
            rows.sort();
            format!(
                "h{k}: state={} cluster={:?} node={:?} alive={:?} total={:?} generation={} nodes=[{}]",
                s.state,
                s.cluster_id,
                s.node_id,
                s.nodes_alive,
                s.nodes_total,
                s.generation,
                rows.join("; ")
            )
        })
        .collect()
}

fn row_key(r: &NodeRow) -> String {
    let NodeRow {
        id,
        name,
        advertise_addr,
        status,
        generation,
        ..
    } = r;
    format!("{id} {name} {advertise_addr} {status} {generation}")
}

fn as_u64(v: &Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

// ---- tests -------------------------------------------------------------------

#[test]
fn three_hosts_form_a_cluster_within_5s() {
    let mut lab = Lab::new(3).expect("lab");
    for k in 1..=3 {
        lab.start_agent(k, &[]).expect("starting an agent");
        let s = lab.status(k).expect("status");
        assert_eq!(s.state, "unclustered", "h{k} before init/join: {s:?}");
    }

    let init = lab.cluster_init(1).expect("cluster init");
    token_parts(&init.join_token);
    let table = lab
        .ctl_ok(1, &["cluster", "join-token"])
        .expect("join-token");
    assert_eq!(
        table.stdout.trim(),
        init.join_token,
        "table join-token is not the token alone"
    );
    let json = lab
        .ctl_json(1, &["cluster", "join-token"])
        .expect("join-token json");
    assert_eq!(
        json["join_token"].as_str(),
        Some(init.join_token.as_str()),
        "{json}"
    );

    let joins_started = Instant::now();
    let mut node_ids = vec![init.node_id.clone()];
    for k in 2..=3 {
        let t = Instant::now();
        let j = lab
            .cluster_join(k, &init.join_token, &["198.18.0.11"])
            .expect("cluster join");
        println!("h{k}: `cluster join` returned in {:.2?}", t.elapsed());
        assert_eq!(j.cluster_id, init.cluster_id);
        node_ids.push(j.node_id);
    }
    let (took, per_host) =
        wait_converged(&lab, &[1, 2, 3]).expect("all three list all three alive");
    println!(
        "3-node cluster: all alive everywhere {took:.2?} after the last join returned \
         ({:.2?} after the first join started); per viewer: {per_host:?}",
        joins_started.elapsed()
    );
    assert!(
        took <= BOUND,
        "membership took {took:.2?} (> {BOUND:?}) to converge"
    );

    for k in 1..=3 {
        // The contract's fields are present, as JSON, in every row.
        let raw = lab.ctl_json(k, &["cluster", "nodes"]).expect("nodes json");
        let rows = raw.as_array().expect("cluster nodes is a JSON array");
        for row in rows {
            for field in ["id", "advertise_addr", "data_path_addr", "status"] {
                let v = row[field].as_str().unwrap_or_default();
                assert!(!v.is_empty(), "h{k}: row without {field}: {row}");
            }
        }
        let rows = lab.nodes(k).expect("nodes");
        for j in 1..=3 {
            let r = rows_of(&rows, j)[0];
            assert_eq!(r.id, node_ids[j - 1], "h{k}'s view of h{j}'s id");
            assert_eq!(r.name, format!("h{j}"), "h{k}'s view of h{j}'s name");
            assert_eq!(
                ip_part(&r.data_path_addr),
                host_addr(j).to_string(),
                "default data path addr"
            );
            assert_eq!(
                r.is_self,
                j == k,
                "h{k}'s is_self for h{j}: {}",
                show(&rows)
            );
        }
        let s = lab.status(k).expect("status");
        assert_eq!(s.state, "active", "h{k}: {s:?}");
        assert_eq!(
            s.cluster_id.as_deref(),
            Some(init.cluster_id.as_str()),
            "h{k}: {s:?}"
        );
        assert_eq!(
            s.node_id.as_deref(),
            Some(node_ids[k - 1].as_str()),
            "h{k}: {s:?}"
        );
        assert_eq!(
            (s.nodes_alive, s.nodes_total),
            (Some(3), Some(3)),
            "h{k}: {s:?}"
        );
    }
}

#[test]
fn killed_agent_is_dead_within_5s_and_rejoins_on_restart() {
    let mut lab = Lab::new(3).expect("lab");
    let init = form_cluster(&mut lab, &[1, 2, 3]);
    wait_converged(&lab, &[1, 2, 3]).expect("cluster converges");
    let before = lab.nodes(1).expect("nodes");
    let h3 = rows_of(&before, 3)[0].clone();

    lab.kill_agent(3).expect("kill -9 h3");
    let want = [(1, "alive"), (2, "alive"), (3, "dead")];
    let took = wait_until(PATIENCE, POLL, || {
        check_view(&lab, 1, &want)?;
        check_view(&lab, 2, &want)?;
        Ok(true)
    })
    .expect("h1 and h2 report h3 dead");
    println!("kill -9 h3: h1 and h2 report it dead after {took:.2?}");
    assert!(
        took <= BOUND,
        "failure detection took {took:.2?} (> {BOUND:?})"
    );

    // Same state dir, no token, no join: it must rejoin by itself.
    let restarted = Instant::now();
    lab.start_agent(3, &[]).expect("restarting h3");
    let (took, per_host) =
        wait_converged(&lab, &[1, 2, 3]).expect("h3 back alive, listed once everywhere");
    println!(
        "restart h3: alive everywhere {took:.2?} after its socket answered \
         ({:.2?} after start); per viewer: {per_host:?}",
        restarted.elapsed()
    );
    for k in 1..=3 {
        let rows = lab.nodes(k).expect("nodes");
        let again = rows_of(&rows, 3);
        assert_eq!(again.len(), 1, "h{k}: {}", show(&rows));
        assert_eq!(
            again[0].id, h3.id,
            "h3 came back with another node id (state dir lost?)"
        );
        assert_eq!(
            rows.iter().filter(|r| r.id == h3.id).count(),
            1,
            "h{k}: {}",
            show(&rows)
        );
        if let (Some(old), Some(new)) = (as_u64(&h3.generation), as_u64(&again[0].generation)) {
            assert!(
                new > old,
                "h{k} lists h3 with generation {new}, not newer than {old}"
            );
        }
    }
    let s = lab.status(3).expect("status");
    assert_eq!(s.state, "active", "restarted h3: {s:?}");
    assert_eq!(s.cluster_id.as_deref(), Some(init.cluster_id.as_str()));
}

#[test]
fn agents_without_the_right_token_are_never_listed() {
    // A well-formed token of an unrelated cluster.
    let mut other = Lab::new(1).expect("other lab");
    other.start_agent(1, &[]).expect("unrelated agent");
    let foreign = other
        .cluster_init(1)
        .expect("unrelated cluster init")
        .join_token;
    drop(other);

    let mut lab = Lab::new(5).expect("lab");
    let init = form_cluster(&mut lab, &[1, 2]);
    wait_converged(&lab, &[1, 2]).expect("h1+h2 converge");
    assert_ne!(token_parts(&foreign).0, token_parts(&init.join_token).0);
    let altered = wrong_secret(&init.join_token);

    // h3: token of another cluster; h4: right cluster id, wrong secret;
    // h5: no token at all. All point at h1 as seed.
    lab.start_agent(3, &["--join-token", &foreign, "--seed", "198.18.0.11"])
        .expect("starting h3 (foreign token)");
    lab.start_agent(4, &["--join-token", &altered, "--seed", "198.18.0.11"])
        .expect("starting h4 (altered secret)");
    lab.start_agent(5, &["--seed", "198.18.0.11"])
        .expect("starting h5 (no token)");

    let want = all_alive(&[1, 2]);
    let checks = always_for(Duration::from_secs(8), POLL, || {
        check_view(&lab, 1, &want)?;
        check_view(&lab, 2, &want)?;
        let s = lab.status(1)?;
        ensure!(
            s.nodes_total == Some(2),
            "h1 status counts {:?} nodes: {s:?}",
            s.nodes_total
        );
        Ok(())
    })
    .expect("the cluster never lists h3, h4, h5");
    println!("watched h1 and h2 for 8 s ({checks} checks): never listed h3, h4, h5");

    for (k, what) in [(3, "foreign token"), (4, "altered secret"), (5, "no token")] {
        let s = lab.status(k).expect("status");
        println!("h{k} ({what}): state={:?} reason={:?}", s.state, s.reason);
        assert_ne!(
            s.state, "active",
            "h{k} ({what}) claims to be active: {s:?}"
        );
        let reason = s.reason.clone().unwrap_or_default();
        assert!(
            !reason.trim().is_empty(),
            "h{k} ({what}) gives no reason: {s:?}"
        );
        if k != 5 {
            assert!(
                reason.to_lowercase().contains("token"),
                "h{k} ({what}): reason does not mention the token: {reason:?}"
            );
        }
        // It cannot read the cluster's gossip either.
        let out = lab
            .ctl(k, &["--format", "json", "cluster", "nodes"])
            .expect("nodes");
        if out.success() {
            let rows: Vec<NodeRow> = serde_json::from_str(&out.stdout).expect("nodes json");
            for j in [1, 2] {
                assert!(
                    rows_of(&rows, j).is_empty(),
                    "h{k} ({what}) learned of h{j}: {}",
                    show(&rows)
                );
            }
        }
    }
    // And the intruders' attempts did not disturb the members.
    for k in [1, 2] {
        let s = lab.status(k).expect("status");
        assert_eq!(s.state, "active");
        assert_eq!(s.cluster_id.as_deref(), Some(init.cluster_id.as_str()));
    }
}

#[test]
fn ovlctl_errors_are_one_line_and_change_nothing() {
    let mut lab = Lab::new(3).expect("lab");
    let init = form_cluster(&mut lab, &[1, 2]);
    wait_converged(&lab, &[1, 2]).expect("h1+h2 converge");
    lab.start_agent(3, &[]).expect("starting h3 (unclustered)");
    let before = snapshot(&lab, &[1, 2, 3]);

    let missing = lab.dir().join("no-such-agent.sock");
    let missing = missing.display().to_string();
    let out = lab
        .ovlctl(&["--socket", &missing, "cluster", "status"])
        .expect("ovlctl");
    assert_one_line_error("socket path that does not exist", &out);
    let out = lab
        .ovlctl(&["--socket", &missing, "--format", "json", "cluster", "nodes"])
        .expect("ovlctl");
    assert_one_line_error("socket path that does not exist (json)", &out);

    let out = lab.ctl(3, &["cluster", "frobnicate"]).expect("ovlctl");
    assert_usage_error("cluster frobnicate", &out);
    let out = lab
        .ctl(3, &["cluster", "join", "198.18.0.11"])
        .expect("ovlctl");
    assert_usage_error("cluster join without --token", &out);

    let out = lab
        .ctl(
            3,
            &["cluster", "join", "--token", "nonsense", "198.18.0.11"],
        )
        .expect("ovlctl");
    assert_one_line_error("malformed token", &out);
    let truncated = &init.join_token[..init.join_token.len() - 1];
    let out = lab
        .ctl(3, &["cluster", "join", "--token", truncated, "198.18.0.11"])
        .expect("ovlctl");
    assert_one_line_error("token one hex digit short", &out);

    for (what, token) in [
        (
            "well-formed token, wrong secret",
            wrong_secret(&init.join_token),
        ),
        (
            "well-formed token, wrong cluster id",
            wrong_cluster(&init.join_token),
        ),
    ] {
        for format in ["table", "json"] {
            let t = Instant::now();
            let out = lab
                .ctl(
                    3,
                    &[
                        "--format",
                        format,
                        "cluster",
                        "join",
                        "--token",
                        &token,
                        "198.18.0.11",
                    ],
                )
                .expect("ovlctl");
            let what = format!("{what} ({format})");
            println!(
                "{what}: refused in {:.2?}: {}",
                t.elapsed(),
                out.stderr.trim()
            );
            assert_one_line_error(&what, &out);
            assert!(
                out.stderr.to_lowercase().contains("token"),
                "{what}: the error does not say the token is wrong: {out}"
            );
        }
    }

    let after = snapshot(&lab, &[1, 2, 3]);
    assert_eq!(before, after, "a failed command changed cluster state");

    // A stopped agent: SIGTERM is a graceful shutdown with exit 0.
    let status = lab.stop_agent(3).expect("stopping h3");
    assert!(
        status.success(),
        "h3's agent exited with {status} on SIGTERM"
    );
    for args in [
        &["cluster", "status"][..],
        &["cluster", "nodes"],
        &["--format", "json", "cluster", "status"],
    ] {
        let out = lab.ctl(3, args).expect("ovlctl");
        assert_one_line_error(&format!("{args:?} against a stopped agent"), &out);
    }
    assert_eq!(
        snapshot(&lab, &[1, 2]),
        before[..2].to_vec(),
        "h1/h2 changed"
    );
}

#[test]
fn leave_shows_left_within_5s_not_dead() {
    let mut lab = Lab::new(3).expect("lab");
    form_cluster(&mut lab, &[1, 2, 3]);
    wait_converged(&lab, &[1, 2, 3]).expect("cluster converges");

    let t = Instant::now();
    lab.ctl_ok(2, &["cluster", "leave"])
        .expect("cluster leave on h2");
    println!("h2: `cluster leave` returned in {:.2?}", t.elapsed());

    let want = [(1, "alive"), (2, "left"), (3, "alive")];
    let mut seen_dead: Option<String> = None;
    let took = wait_until(PATIENCE, POLL, || {
        for v in [1, 3] {
            let rows = lab.nodes(v)?;
            if rows_of(&rows, 2).iter().any(|r| r.status == "dead") && seen_dead.is_none() {
                seen_dead = Some(format!("h{v}: {}", show(&rows)));
            }
        }
        check_view(&lab, 1, &want)?;
        check_view(&lab, 3, &want)?;
        Ok(true)
    })
    .expect("h1 and h3 show h2 as left");
    println!("leave h2: h1 and h3 show it left after {took:.2?}");
    assert_eq!(seen_dead, None, "a cleanly left node was shown as dead");
    assert!(took <= BOUND, "leave took {took:.2?} (> {BOUND:?}) to show");

    let took = wait_until(BOUND, POLL, || {
        let s = lab.status(2)?;
        ensure!(s.state == "unclustered", "h2 status after leave: {s:?}");
        Ok(true)
    })
    .expect("h2 becomes unclustered");
    println!("h2 unclustered {took:.2?} after its leave was confirmed elsewhere");

    // It stays left (or is dropped), never turns dead, while h1 and h3 stay up.
    always_for(Duration::from_secs(3), POLL, || {
        for v in [1, 3] {
            let rows = lab.nodes(v)?;
            for r in rows_of(&rows, 2) {
                ensure!(
                    r.status == "left",
                    "h{v} now shows h2 as {:?}: {}",
                    r.status,
                    show(&rows)
                );
            }
            for k in [1, 3] {
                let r = rows_of(&rows, k);
                ensure!(
                    r.len() == 1 && r[0].status == "alive",
                    "h{v}: {}",
                    show(&rows)
                );
            }
        }
        Ok(())
    })
    .expect("h2 stays left");

    // Joining again from the same running agent: peers remember the left
    // incarnation, so the node must come back as a new one, alive, once.
    let token = lab
        .ctl_ok(1, &["cluster", "join-token"])
        .expect("join-token on h1")
        .stdout
        .trim()
        .to_string();
    let seed = host_addr(1).to_string();
    lab.cluster_join(2, &token, &[&seed])
        .expect("h2 joins again after leaving");
    let want = [(1, "alive"), (2, "alive"), (3, "alive")];
    let took = wait_until(PATIENCE, POLL, || {
        for v in [1, 2, 3] {
            check_view(&lab, v, &want)?;
        }
        Ok(true)
    })
    .expect("h2 alive again everywhere after rejoining");
    println!("h2 rejoined: alive everywhere after {took:.2?}");
    assert!(
        took <= BOUND,
        "rejoin took {took:.2?} (> {BOUND:?}) to show"
    );
}
