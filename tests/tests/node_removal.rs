//! Issue #6 acceptance, removal: `ovlctl node rm` (like `docker node rm`)
//! withdraws a node's records from every other host's FDB within 2 s; its
//! agent, still running, cannot inject gossip or make peer calls, and
//! cannot rejoin with the token it knew.

mod common;

use std::time::{Duration, Instant};

use anyhow::ensure;
use common::{attached, cluster_with_network};
use ovl_e2e::{Findings, Lab, POLL, always_for, host_addr, wait_until};

/// Acceptance bound for the removed node's entries to leave every FDB.
const BOUND: Duration = Duration::from_secs(2);

fn counter(lab: &Lab, k: usize, name: &str) -> u64 {
    lab.status(k)
        .ok()
        .and_then(|s| s.counters.get(name).and_then(|v| v.as_u64()))
        .unwrap_or(0)
}

#[test]
fn a_removed_node_is_withdrawn_everywhere_and_refused_on_every_channel() {
    let (mut lab, net) = cluster_with_network(3, "rm", &[]);
    let (_c1, e1) = attached(&mut lab, 1, "c1", "rm", &[]);
    let (_c2, e2) = attached(&mut lab, 2, "c2", "rm", &[]);
    let (_c3, e3) = attached(&mut lab, 3, "c3", "rm", &[]);
    lab.wait_dataplane(&[1, 2, 3], net.vni, &[e1.clone(), e2.clone(), e3.clone()])
        .expect("data plane programmed");
    let old_token = lab
        .ctl_ok(1, &["cluster", "join-token"])
        .expect("token")
        .stdout
        .trim()
        .to_string();
    let h3 = lab.node_name(3);
    let h3_id = lab
        .nodes(1)
        .expect("nodes")
        .into_iter()
        .find(|r| r.name == h3)
        .expect("h3 listed")
        .id;
    let mut f = Findings::new();

    let t = Instant::now();
    let out = lab
        .ctl(1, &["node", "rm", &h3_id[..12]])
        .expect("ovlctl runs");
    println!("node rm: {}", out.stdout.trim());
    f.check(out.success() && out.stdout.contains("removed"), || {
        format!("node rm: {out}")
    });

    // Its endpoint leaves h1's and h2's FDB and neighbour tables.
    let gone = wait_until(Duration::from_secs(20), POLL, || {
        for k in [1, 2] {
            let fdb = lab.fdb(k, net.vni)?;
            ensure!(
                !fdb.iter().any(|e| e.mac == e3.mac),
                "h{k}'s FDB still holds {}",
                e3.mac
            );
            let neigh = lab.neigh(k, net.vni)?;
            ensure!(
                !neigh.iter().any(|n| n.dst == e3.ip),
                "h{k} still has a neighbour {}",
                e3.ip
            );
        }
        Ok(true)
    });
    match gone {
        Ok(d) => {
            println!(
                "h3's entries gone from h1 and h2 {:.2?} after node rm (returned in {:.2?})",
                d,
                t.elapsed()
            );
            f.check(d <= BOUND, || {
                format!("h3's entries took {d:.2?} to go, bound {BOUND:?}")
            });
        }
        Err(e) => {
            f.check(false, || format!("h3's entries never left: {e:#}"));
        }
    }
    for k in [1, 2] {
        let listed = lab
            .nodes(k)
            .map(|rows| rows.iter().any(|r| r.name == h3))
            .unwrap_or(true);
        f.check(!listed, || format!("h{k} still lists the removed h3"));
    }
    // The others still see each other and their endpoints.
    f.ok(
        "h1 and h2 unaffected",
        lab.wait_dataplane(&[1, 2], net.vni, &[e1.clone(), e2.clone()])
            .map(|_| ()),
    );

    // h3's agent runs on: its gossip is refused (counted), and so are its
    // peer calls (an attach there pushes a Notify and would be pulled).
    f.check(lab.agent_running(3), || "h3's agent stopped".into());
    let dropped_before = counter(&lab, 2, "gossip_drop_removed");
    let refused_before =
        counter(&lab, 1, "peer_call_refused") + counter(&lab, 2, "peer_call_refused");
    let (_c4, e4) = attached(&mut lab, 3, "c4", "rm", &[]);
    std::thread::sleep(Duration::from_secs(3));
    let dropped_after = counter(&lab, 2, "gossip_drop_removed");
    let refused_after =
        counter(&lab, 1, "peer_call_refused") + counter(&lab, 2, "peer_call_refused");
    println!(
        "h2 gossip_drop_removed {dropped_before} -> {dropped_after}; h1+h2 peer_call_refused {refused_before} -> {refused_after}"
    );
    f.check(dropped_after > dropped_before, || {
        "h3's gossip was not refused at h2".into()
    });
    f.check(refused_after > refused_before, || {
        "h3's peer calls were not refused".into()
    });
    let never = always_for(Duration::from_secs(2), POLL, || {
        for k in [1, 2] {
            let rows = lab.endpoints(k, Some("rm"))?;
            ensure!(
                !rows.iter().any(|r| r.ip == e4.ip),
                "h{k} lists h3's new endpoint"
            );
            ensure!(
                !lab.nodes(k)?.iter().any(|r| r.name == h3),
                "h{k} lists h3 again"
            );
        }
        Ok(())
    });
    f.ok("h3 stays out", never.map(|_| ()));

    // It cannot come back with the token it knew.
    let _ = lab.ctl(3, &["cluster", "leave"]);
    let out = lab
        .ctl(
            3,
            &[
                "cluster",
                "join",
                "--token",
                &old_token,
                &host_addr(1).to_string(),
            ],
        )
        .expect("ovlctl runs");
    println!(
        "h3 rejoining with the old token: exit {:?}: {}",
        out.code(),
        out.stderr.trim()
    );
    f.check(out.code() == Some(1), || {
        format!("h3 rejoined with the old token: {out}")
    });
    f.finish();
}

fn cluster_key(lab: &Lab, k: usize) -> String {
    lab.status(k)
        .ok()
        .and_then(|s| s.cluster_key)
        .unwrap_or_default()
}

fn join_token(lab: &Lab, k: usize) -> String {
    lab.ctl_ok(k, &["cluster", "join-token"])
        .map(|o| o.stdout.trim().to_string())
        .unwrap_or_default()
}

/// Whether host k lists every one of `names` as alive.
fn sees_alive(lab: &Lab, k: usize, names: &[String]) -> anyhow::Result<()> {
    let rows = lab.nodes(k)?;
    for name in names {
        ensure!(
            rows.iter().any(|r| &r.name == name && r.status == "alive"),
            "h{k} does not list {name} alive: {:?}",
            rows.iter()
                .map(|r| format!("{} {}", r.name, r.status))
                .collect::<Vec<_>>()
        );
    }
    Ok(())
}

/// `node rm` replaces the cluster key (memberlist-keyring style: install on
/// every live member, then switch): the removed node, still running, never
/// reads gossip again, so it never learns the new join token published
/// there; members keep gossiping through the switch; and a member that was
/// offline during the rotation fetches the new key when it comes back.
#[test]
fn removal_rotates_the_cluster_key_and_an_offline_member_catches_up() {
    let (mut lab, net) = cluster_with_network(4, "rk", &[]);
    let (_c1, e1) = attached(&mut lab, 1, "c1", "rk", &[]);
    let (_c2, e2) = attached(&mut lab, 2, "c2", "rk", &[]);
    let (_c4, e4) = attached(&mut lab, 4, "c4", "rk", &[]);
    lab.wait_dataplane(&[1, 2, 4], net.vni, &[e1.clone(), e2.clone(), e4.clone()])
        .expect("data plane programmed");
    let names: Vec<String> = (1..=4).map(|k| lab.node_name(k)).collect();
    let first_key = cluster_key(&lab, 1);
    let old_token = join_token(&lab, 1);
    println!("cluster key before: {first_key}");
    let mut f = Findings::new();
    f.check(first_key.starts_with("epoch 0"), || {
        format!("a new cluster's key is not epoch 0: {first_key:?}")
    });

    // h4 goes offline for the rotation: it can neither install nor see it.
    lab.stop_agent(4).expect("stop h4");
    let h3_id = lab
        .nodes(1)
        .expect("nodes")
        .into_iter()
        .find(|r| r.name == names[2])
        .expect("h3 listed")
        .id;
    let t = Instant::now();
    let out = lab.ctl(1, &["node", "rm", &h3_id]).expect("ovlctl runs");
    f.check(out.success(), || format!("node rm: {out}"));
    let rotated = wait_until(Duration::from_secs(10), POLL, || {
        let (k1, k2) = (cluster_key(&lab, 1), cluster_key(&lab, 2));
        ensure!(k1 != first_key && k1 == k2, "h1 {k1:?}, h2 {k2:?}");
        Ok(true)
    });
    match &rotated {
        Ok(d) => println!(
            "h1 and h2 on the new key {} {d:.2?} after node rm returned ({:.2?} in all)",
            cluster_key(&lab, 1),
            t.elapsed()
        ),
        Err(e) => {
            f.check(false, || {
                format!("the key did not rotate on h1 and h2: {e:#}")
            });
        }
    }
    let new_key = cluster_key(&lab, 1);
    f.check(new_key.starts_with("epoch 1"), || {
        format!("the rotated key is not epoch 1: {new_key:?}")
    });
    let new_token = join_token(&lab, 1);
    f.check(new_token != old_token, || {
        "node rm did not rotate the token".into()
    });

    // Members gossip on through the switch; the removed node learns
    // nothing of what is gossiped after it (the new token).
    let steady = always_for(Duration::from_secs(5), POLL, || {
        sees_alive(&lab, 1, &names[1..2])?;
        sees_alive(&lab, 2, &names[..1])?;
        ensure!(cluster_key(&lab, 3) == first_key, "h3 holds the new key");
        ensure!(
            join_token(&lab, 3) == old_token,
            "h3 learned the new join token"
        );
        Ok(())
    });
    f.ok(
        "h1 and h2 stay alive to each other; h3 never sees the new key or token",
        steady.map(|_| ()),
    );
    println!(
        "h3: gossip_drop_newer_key {}, cluster_key_fetched {}; h1+h2 peer_call_refused {}",
        counter(&lab, 3, "gossip_drop_newer_key"),
        counter(&lab, 3, "cluster_key_fetched"),
        counter(&lab, 1, "peer_call_refused") + counter(&lab, 2, "peer_call_refused"),
    );
    f.check(counter(&lab, 3, "cluster_key_fetched") == 0, || {
        "the removed h3 fetched a cluster key".into()
    });

    // h4 comes back with the old key only and catches up by fetching.
    let t = Instant::now();
    lab.start_agent(4, &[]).expect("restart h4");
    let caught_up = wait_until(Duration::from_secs(20), POLL, || {
        ensure!(
            cluster_key(&lab, 4) == new_key,
            "h4 on {:?}",
            cluster_key(&lab, 4)
        );
        sees_alive(&lab, 4, &[names[0].clone(), names[1].clone()])?;
        sees_alive(&lab, 1, &names[3..4])?;
        Ok(true)
    });
    match caught_up {
        Ok(d) => println!("h4 back on the new key and alive everywhere {d:.2?} after restart"),
        Err(e) => {
            f.check(false, || format!("h4 did not catch up: {e:#}"));
        }
    }
    f.check(counter(&lab, 4, "cluster_key_fetched") >= 1, || {
        "h4 did not count a fetched key".into()
    });
    f.check(join_token(&lab, 4) == new_token, || {
        "h4 did not learn the new token after catching up".into()
    });
    f.ok(
        "h4's endpoint and the others' programmed after it returned",
        lab.wait_dataplane(&[1, 2, 4], net.vni, &[e1, e2, e4])
            .map(|d| {
                println!(
                    "data plane on h1, h2, h4 converged {d:.2?} after restart ({:.2?})",
                    t.elapsed()
                )
            }),
    );
    f.finish();
}

/// Two `node rm` at once on two hosts: each rotation is installed on the
/// node the other removes. The member handed a key that does not know of
/// its own removal rotates again, so the key and token everyone settles on
/// are held by neither removed node.
#[test]
fn two_removals_at_once_settle_on_a_key_neither_removed_node_holds() {
    let (lab, _net) = cluster_with_network(5, "rm2", &[]);
    let names: Vec<String> = (1..=5).map(|k| lab.node_name(k)).collect();
    let id_of = |k: usize| {
        lab.nodes(1)
            .expect("nodes")
            .into_iter()
            .find(|r| r.name == names[k - 1])
            .expect("listed")
            .id
    };
    let (h4, h5) = (id_of(4), id_of(5));
    let mut f = Findings::new();
    let c1 = lab.ctl_command(1, &["node", "rm", &h4]).expect("ctl");
    let c2 = lab.ctl_command(2, &["node", "rm", &h5]).expect("ctl");
    let outs = ovl_e2e::cmd::run_all(vec![c1, c2], Duration::from_secs(20));
    for o in &outs {
        f.check(o.as_ref().is_ok_and(|o| o.success()), || {
            format!("node rm: {o:?}")
        });
    }
    let settled = wait_until(Duration::from_secs(15), POLL, || {
        let keys: Vec<String> = (1..=3).map(|k| cluster_key(&lab, k)).collect();
        let tokens: Vec<String> = (1..=3).map(|k| join_token(&lab, k)).collect();
        ensure!(
            keys.iter().all(|k| k == &keys[0]) && tokens.iter().all(|t| t == &tokens[0]),
            "h1-h3 keys {keys:?}"
        );
        for k in [4, 5] {
            ensure!(
                cluster_key(&lab, k) != keys[0],
                "h{k} holds the settled key {}",
                keys[0]
            );
            ensure!(
                join_token(&lab, k) != tokens[0],
                "h{k} holds the settled token"
            );
        }
        Ok(true)
    });
    match &settled {
        Ok(d) => println!(
            "h1-h3 settled on {} {d:.2?} after both node rm returned; h4 on {}, h5 on {}",
            cluster_key(&lab, 1),
            cluster_key(&lab, 4),
            cluster_key(&lab, 5)
        ),
        Err(e) => {
            f.check(false, || {
                format!("no settled key that h4 and h5 lack: {e:#}")
            });
        }
    }
    let steady = always_for(Duration::from_secs(4), POLL, || {
        let k1 = cluster_key(&lab, 1);
        for k in [4, 5] {
            ensure!(cluster_key(&lab, k) != k1, "h{k} caught up to {k1}");
        }
        sees_alive(&lab, 1, &names[1..3])?;
        Ok(())
    });
    f.ok(
        "the removed nodes stay behind; h1-h3 stay alive",
        steady.map(|_| ()),
    );
    f.finish();
}

/// Whether any of `hosts` lists node `id`.
fn listed_anywhere(lab: &Lab, hosts: &[usize], id: &str) -> anyhow::Result<()> {
    for &k in hosts {
        let rows = lab.nodes(k)?;
        ensure!(
            !rows
                .iter()
                .any(|r| r.id == id || r.name == "fresh-identity"),
            "h{k} lists the fresh identity {id}"
        );
    }
    Ok(())
}

/// The removed node's way back in: it still holds the old cluster key and
/// the old token, so right after `node rm` (while members still open the
/// old key) it mints a fresh identity, gossips that identity's correctly
/// signed record under the old key, and asks members for the new key over
/// TLS with it. The rotated key's member set keeps it out: no host lists
/// it, `FetchClusterKey` is refused (counted), and a host joining with the
/// new token still gets in.
#[test]
fn a_removed_node_cannot_come_back_as_a_fresh_identity_through_the_old_key() {
    let mut lab = Lab::new(4).expect("lab");
    lab.start_cluster(&[1, 2, 3]).expect("h1-h3 form a cluster");
    lab.start_agent(4, &[]).expect("h4's agent (unclustered)");
    let names: Vec<String> = (1..=4).map(|k| lab.node_name(k)).collect();
    let old_token = join_token(&lab, 1);
    let id_of = |k: usize| {
        lab.nodes(1)
            .expect("nodes")
            .into_iter()
            .find(|r| r.name == names[k - 1])
            .expect("listed")
            .id
    };
    let (h1, h2, h3) = (id_of(1), id_of(2), id_of(3));
    let mut f = Findings::new();

    let t = Instant::now();
    let out = lab.ctl(1, &["node", "rm", &h3]).expect("ovlctl runs");
    f.check(out.success(), || format!("node rm: {out}"));
    let new_token = join_token(&lab, 1);
    println!("node rm returned in {:.2?}", t.elapsed());

    // From h3's namespace, within the old key's retire window: a fresh
    // identity gossips itself to h1 and h2 under the old key for 3 s.
    let key_file = lab.dir().join("fresh-identity.pk8");
    let forge = ovl_e2e::binary("ovl-gossip-forge").expect("forge binary");
    let gossip_addr = format!("{}:7947", lab.addr(3));
    let (to1, to2) = (
        format!("{}:7946", lab.addr(1)),
        format!("{}:7946", lab.addr(2)),
    );
    let stale_before = counter(&lab, 1, "gossip_drop_stale_key_stranger")
        + counter(&lab, 2, "gossip_drop_stale_key_stranger");
    let sent = lab.exec_ok(
        3,
        &[
            &forge.display().to_string(),
            "--token",
            &old_token,
            "--mint",
            &key_file.display().to_string(),
            "--gossip-addr",
            &gossip_addr,
            "--to",
            &to1,
            "--to",
            &to2,
            "--mode",
            "fresh-identity",
            "--count",
            "30",
            "--interval-ms",
            "100",
        ],
    );
    let fresh = match &sent {
        Ok(out) => out
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("minted node "))
            .unwrap_or_default()
            .to_string(),
        Err(e) => {
            f.check(false, || format!("the forge did not run: {e:#}"));
            String::new()
        }
    };
    println!(
        "fresh identity {fresh} gossiped under the old key {:.2?} after node rm",
        t.elapsed()
    );
    f.check(t.elapsed() < Duration::from_secs(25), || {
        "the forgery did not fit in the old key's retire window".into()
    });
    let stale_after = counter(&lab, 1, "gossip_drop_stale_key_stranger")
        + counter(&lab, 2, "gossip_drop_stale_key_stranger");
    println!("h1+h2 gossip_drop_stale_key_stranger {stale_before} -> {stale_after}");
    f.check(stale_after > stale_before, || {
        "the fresh identity's gossip under the old key was not counted".into()
    });

    // It asks h1 and h2 for the new key over TLS, as the fresh identity.
    let probe = ovl_e2e::binary("ovl-peer-probe").expect("probe binary");
    let refused_before =
        counter(&lab, 1, "peer_call_refused") + counter(&lab, 2, "peer_call_refused");
    for (k, id) in [(1, &h1), (2, &h2)] {
        let out = lab
            .exec(
                3,
                &[
                    &probe.display().to_string(),
                    "--key",
                    &key_file.display().to_string(),
                    "--addr",
                    &format!("{}:7946", lab.addr(k)),
                    "--expect",
                    id,
                    "--call",
                    "fetch-key",
                ],
            )
            .expect("probe runs");
        println!(
            "FetchClusterKey from h{k} as the fresh identity: {}",
            out.stdout.trim()
        );
        f.check(!out.success(), || {
            format!("h{k} handed the new cluster key to the fresh identity: {out}")
        });
    }
    let refused_after =
        counter(&lab, 1, "peer_call_refused") + counter(&lab, 2, "peer_call_refused");
    println!("h1+h2 peer_call_refused {refused_before} -> {refused_after}");
    f.check(refused_after >= refused_before + 2, || {
        "the fresh identity's FetchClusterKey was not counted as refused".into()
    });
    f.ok(
        "no host lists the fresh identity",
        always_for(Duration::from_secs(3), POLL, || {
            listed_anywhere(&lab, &[1, 2], &fresh)
        })
        .map(|_| ()),
    );

    // A host joining with the new token still gets in, through h2, and
    // never hears of the fresh identity either.
    let t = Instant::now();
    f.ok(
        "h4 joins with the new token via h2",
        lab.cluster_join(4, &new_token, &[&host_addr(2).to_string()])
            .map(|_| ()),
    );
    f.ok(
        "h1, h2 and h4 alive everywhere",
        lab.wait_members(&[1, 2, 4]).map(|d| {
            println!(
                "h4 alive everywhere {d:.2?} after joining ({:.2?})",
                t.elapsed()
            )
        }),
    );
    f.ok(
        "still no host lists the fresh identity",
        listed_anywhere(&lab, &[1, 2, 4], &fresh),
    );
    f.check(counter(&lab, 3, "cluster_key_fetched") == 0, || {
        "the removed h3 fetched a cluster key".into()
    });
    f.finish();
}
