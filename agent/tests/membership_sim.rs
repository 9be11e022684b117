//! 50 agents' membership in one process over loopback: everyone must see
//! everyone alive, then see a silent member dead. The limits only bound a
//! hung run; speed is reported here and tracked by `benches/membership.rs`.

use std::time::Duration;

use ovl_agent::membership::{Tuning, sim};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_members_converge_and_detect_a_dead_one() {
    let report = sim::run(50, Tuning::default(), Duration::from_secs(60))
        .await
        .expect("membership simulation");
    println!(
        "membership sim: {} members converged in {:?} ({:.1} rounds), silent member reported dead by all in {:?} ({:.1} rounds)",
        report.nodes,
        report.converge,
        report.converge_rounds(),
        report.detect,
        report.detect_rounds()
    );
}
