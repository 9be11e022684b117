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
