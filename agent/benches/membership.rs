//! Membership convergence and failure detection at several cluster sizes,
//! in one process over loopback with production tuning. Run with
//! `cargo bench -p ovl-agent --bench membership`; results in rounds are
//! comparable across machines.

use std::time::Duration;

use ovl_agent::membership::{Tuning, sim};

fn main() {
    let sizes: Vec<usize> = std::env::var("OVL_SIM_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![3, 10, 50, 100]);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            std::process::exit(1);
        }
    };
    println!("| members | converge | rounds | detect dead | rounds |");
    println!("|---:|---:|---:|---:|---:|");
    for n in sizes {
        match rt.block_on(sim::run(n, Tuning::default(), Duration::from_secs(120))) {
            Ok(r) => println!(
                "| {} | {:.2} s | {:.1} | {:.2} s | {:.1} |",
                r.nodes,
                r.converge.as_secs_f64(),
                r.converge_rounds(),
                r.detect.as_secs_f64(),
                r.detect_rounds()
            ),
            Err(e) => println!("| {n} | failed: {e} | | | |"),
        }
    }
}
