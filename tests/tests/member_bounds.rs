//! Issue #8, bounded records, against real agents: a member (h3) that
//! publishes more endpoint records than any member may, or a 1 MB name,
//! is capped where its records are accepted, with a clear log line and
//! counters on the other hosts, whose memory stays bounded; a table too
//! large to pull at all (100 000 records) is refused once per version,
//! not pulled again every round.
//!
//! The records are written into h3's own table while its agent is stopped
//! (`ovl-table-forge --flood`), so the agent serves them through the real
//! peer API when it comes back.

mod common;

use std::time::{Duration, Instant};

use common::{cluster_with_network, counter, rss_kib};
use ovl_e2e::{Findings, Lab, POLL, shared, wait_until};

/// The per-member endpoint cap (agent store::bounds::MAX_ENDPOINTS).
const MAX_ENDPOINTS: u64 = 4096;

fn forge(
    lab: &mut Lab,
    f: &mut Findings,
    network: &str,
    n: usize,
    name_bytes: usize,
    first: usize,
) {
    let tool = ovl_e2e::binary("ovl-table-forge").expect("forge tool");
    let table = lab.state_dir(3).join("table.pb");
    let out = std::process::Command::new(&tool)
        .args([
            "--table",
            &table.display().to_string(),
            "--network",
            network,
        ])
        .args([
            "--flood",
            &n.to_string(),
            "--name-bytes",
            &name_bytes.to_string(),
        ])
        .args(["--first", &first.to_string()])
        .output()
        .expect("run forge");
    println!("forge: {}", String::from_utf8_lossy(&out.stdout).trim());
    f.check(out.status.success(), || format!("forging: {out:?}"));
}

fn all_alive(lab: &Lab, k: usize) -> bool {
    lab.nodes(k)
        .is_ok_and(|v| v.len() == 3 && v.iter().all(|n| n.status == "alive"))
}

#[test]
fn a_member_publishing_too_much_is_capped_and_not_pulled_every_round() {
    let _g = shared();
    let (mut lab, net) = cluster_with_network(3, "mb", &[]);
    let mut f = Findings::new();
    let rss0 = [rss_kib(&lab, 1), rss_kib(&lab, 2)];

    // 1. 5000 records past the cap, and one with a 1 MB name.
    lab.stop_agent(3).expect("stop h3");
    forge(&mut lab, &mut f, &net.id, 5000, 16, 0);
    forge(&mut lab, &mut f, &net.id, 1, 1 << 20, 9000);
    lab.start_agent(3, &[]).expect("restart h3");
    let want = 5000 - MAX_ENDPOINTS + 1;
    for k in [1, 2] {
        let r = wait_until(Duration::from_secs(30), POLL, || {
            Ok(counter(&lab, k, "records_over_bounds") >= want)
        });
        f.check(r.is_ok(), || {
            format!(
                "h{k}: records_over_bounds {} after 30 s, want {want}",
                counter(&lab, k, "records_over_bounds")
            )
        });
        let log = std::fs::read_to_string(lab.log_path(k)).unwrap_or_default();
        let line = log
            .lines()
            .find(|l| l.contains("past the per-member bounds"))
            .unwrap_or("");
        println!(
            "h{k}: records_over_bounds {}; log: {}",
            counter(&lab, k, "records_over_bounds"),
            line.chars().take(400).collect::<String>()
        );
        f.check(
            line.contains("already holds 4096 endpoint records") || line.contains("at most 262144"),
            || format!("h{k}: no clear log line of the refusal: {line:?}"),
        );
    }
    let rss1 = [rss_kib(&lab, 1), rss_kib(&lab, 2)];
    println!("RSS KiB before {rss0:?}, after 5001 hostile records {rss1:?}");

    // 2. 100 000 more: the delta is past what a Pull reply may be.
    lab.stop_agent(3).expect("stop h3");
    forge(&mut lab, &mut f, &net.id, 100_000, 16, 10_000);
    let t = Instant::now();
    lab.start_agent(3, &[]).expect("restart h3");
    let r = wait_until(Duration::from_secs(60), POLL, || {
        Ok(counter(&lab, 1, "pull_reply_too_large") >= 1)
    });
    f.check(r.is_ok(), || "h1 never refused h3's oversized table".into());
    println!(
        "h1 refused h3's 100 000-record delta after {:.2?}",
        t.elapsed()
    );
    let before = [1, 2].map(|k| counter(&lab, k, "pull_reply_too_large"));
    std::thread::sleep(Duration::from_secs(10));
    let after = [1, 2].map(|k| counter(&lab, k, "pull_reply_too_large"));
    println!("pull_reply_too_large over 10 s (10 sync rounds): {before:?} -> {after:?}");
    for i in 0..2 {
        f.check(after[i] <= before[i] + 1, || {
            format!(
                "h{} pulled the oversized table again and again: {} -> {}",
                i + 1,
                before[i],
                after[i]
            )
        });
    }
    let rss2 = [rss_kib(&lab, 1), rss_kib(&lab, 2)];
    println!("RSS KiB after the 100 000-record table: {rss2:?}");
    for i in 0..2 {
        f.check(rss2[i] < rss0[i] + 50 * 1024, || {
            format!("h{} RSS grew from {} to {} KiB", i + 1, rss0[i], rss2[i])
        });
    }
    for k in 1..=3 {
        f.check(all_alive(&lab, k), || {
            format!("h{k} does not see all 3 hosts alive: {:?}", lab.nodes(k))
        });
    }
    if !f.failures().is_empty() {
        for k in 1..=3 {
            println!("--- h{k} log ---\n{}", lab.log_tail(k, 40));
        }
    }
    f.finish();
}
