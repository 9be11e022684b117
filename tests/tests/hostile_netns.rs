//! Issue #8, `--netns` input, against a real agent: a FIFO, a regular
//! file, a directory, the agent's own network namespace and a missing path
//! are each refused with one clear error line and counted, and attaches and
//! detaches running at the same time are not held up by them (before the
//! fix, a FIFO hung the attach with the endpoint and data-plane locks held,
//! so every later attach timed out).
//!
//! Needs root and the binaries (`cargo build --release -p ovl-agent -p ovlctl`).

mod common;

use std::ffi::CString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{cluster_with_network, counter};
use ovl_e2e::{Findings, shared};

fn mkfifo(path: &std::path::Path) {
    let c = CString::new(path.to_str().expect("utf-8 path")).expect("no NUL");
    // SAFETY: a valid NUL-terminated path; mkfifo only creates the node.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Attach/detach cycles of one container while the bad attaches run.
const CYCLES: usize = 8;
/// Rounds of the five bad paths.
const BAD_ROUNDS: usize = 4;

#[test]
fn bad_netns_paths_get_one_clear_line_and_never_delay_other_attaches() {
    let _g = shared();
    let (mut lab, _net) = cluster_with_network(1, "hn", &[]);
    let good = lab.add_container(1, "ok").expect("container");
    let dir = lab.dir().join("netns-bad");
    std::fs::create_dir_all(&dir).expect("dir");
    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    let file = dir.join("file");
    std::fs::write(&file, b"not a namespace").expect("file");
    let own = format!("/run/netns/{}", lab.ns(1));
    let own_pid = format!("/proc/{}/ns/net", lab.agent_pid(1).expect("agent running"));
    let missing = dir.join("missing");
    let p = |x: &std::path::Path| x.display().to_string();
    let cases: Vec<(String, String)> = vec![
        (
            p(&fifo),
            format!("not a network namespace: {} is a FIFO", p(&fifo)),
        ),
        (
            p(&file),
            format!("not a network namespace: {} is a regular file", p(&file)),
        ),
        (
            p(&dir),
            format!("not a network namespace: {} is a directory", p(&dir)),
        ),
        (own.clone(), "is the agent's own network namespace".into()),
        (
            own_pid.clone(),
            "is the agent's own network namespace".into(),
        ),
        (p(&missing), "no such namespace file".into()),
    ];
    let before = counter(&lab, 1, "netns_refused");
    let mut f = Findings::new();
    let stop = AtomicBool::new(false);
    let (good_times, bad) = std::thread::scope(|s| {
        let lab = &lab;
        let good = &good;
        let stop = &stop;
        let cycles = s.spawn(move || {
            let mut times = Vec::new();
            for i in 0..CYCLES {
                let t = Instant::now();
                let r = lab.attach("hn", good, &[]);
                let attach = t.elapsed();
                let Ok(ep) = r else {
                    return Err(format!(
                        "attach {i}: {:#}",
                        r.err().map(|e| e.to_string()).unwrap_or_default()
                    ));
                };
                let t = Instant::now();
                if let Err(e) = lab.detach(1, "hn", &ep.name) {
                    return Err(format!("detach {i}: {e:#}"));
                }
                times.push((attach, t.elapsed()));
            }
            stop.store(true, Ordering::Relaxed);
            Ok(times)
        });
        let mut bad = Vec::new();
        for round in 0..BAD_ROUNDS {
            for (path, want) in &cases {
                let t = Instant::now();
                let out = lab.ctl(1, &["endpoint", "attach", "hn", "--netns", path]);
                bad.push((round, path.clone(), want.clone(), out, t.elapsed()));
            }
        }
        (cycles.join().expect("cycle thread"), bad)
    });
    for (round, path, want, out, took) in &bad {
        match out {
            Ok(out) => {
                let line = out.one_line_error();
                if *round == 0 {
                    println!("--netns {path}: {took:.2?}: {line:?}");
                }
                f.check(
                    line.as_ref().is_ok_and(|l| l.contains(want.as_str())),
                    || format!("--netns {path}: want one line containing {want:?}: {out}"),
                );
            }
            Err(e) => {
                f.check(false, || {
                    format!("--netns {path}: ovlctl did not return: {e:#}")
                });
            }
        }
    }
    match good_times {
        Ok(times) => {
            let mut a: Vec<Duration> = times.iter().map(|t| t.0).collect();
            let mut d: Vec<Duration> = times.iter().map(|t| t.1).collect();
            a.sort();
            d.sort();
            println!(
                "{CYCLES} attach/detach cycles beside {} refused attaches: attach median {:.2?} max {:.2?}; detach median {:.2?} max {:.2?}",
                bad.len(),
                a[a.len() / 2],
                a[a.len() - 1],
                d[d.len() / 2],
                d[d.len() - 1]
            );
        }
        Err(e) => {
            f.check(false, || format!("concurrent attach/detach: {e}"));
        }
    }
    let refused = counter(&lab, 1, "netns_refused") - before;
    println!("netns_refused: {refused}");
    f.check(refused == bad.len() as u64, || {
        format!("netns_refused counted {refused}, want {}", bad.len())
    });
    // Nothing changed: no endpoint left behind by the refusals.
    let left = lab
        .endpoints(1, Some("hn"))
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    f.check(left == 0, || {
        format!("{left} endpoints listed after the test, want 0")
    });
    if !f.failures().is_empty() {
        println!("--- agent log ---\n{}", lab.log_tail(1, 60));
    }
    f.finish();
}
