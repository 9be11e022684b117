//! End-to-end test harness for ovl: real `ovl-agent` processes in network
//! namespaces joined by a veth/bridge underlay (DESIGN.md, "How ovl is
//! tested").
//!
//! ```no_run
//! use std::time::Duration;
//! use ovl_e2e::{Lab, wait_until};
//!
//! let mut lab = Lab::new(2)?;                  // h1 = 198.18.0.11, h2 = 198.18.0.12
//! lab.start_agent(1, &[])?;                    // waits until `cluster status` answers
//! let init = lab.cluster_init(1)?;
//! lab.start_agent(2, &[])?;
//! lab.cluster_join(2, &init.join_token, &["198.18.0.11"])?;
//! let took = wait_until(Duration::from_secs(10), Duration::from_millis(100), || {
//!     Ok(lab.nodes(1)?.len() == 2)
//! })?;
//! # Ok::<(), anyhow::Error>(())
//! ```
//!
//! Needs root. Binaries come from `$OVL_BIN_DIR` or `target/<profile>/`
//! (build them first: `cargo build --release --workspace --bins`). Every
//! lab removes its namespaces, agents and temp dir on drop, also when the
//! test panicked (and then prints the agents' logs first).

pub mod agent;
pub mod cmd;
pub mod lab;
pub mod netns;
pub mod ovl;

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

pub use agent::{bin_dir, binary};
pub use cmd::{CmdOutput, CtlOutput};
pub use lab::{Lab, host_addr};
pub use ovl::{InitOutput, JoinOutput, NodeRow, Status, ip_part};

/// The poll interval the tests use.
pub const POLL: Duration = Duration::from_millis(100);

/// Calls `check` every `poll` until it returns `Ok(true)`, and returns how
/// long that took. `Ok(false)` and `Err(e)` both mean "not yet"; an `Err`
/// also says what was observed, and the last one is quoted in the timeout
/// error. So a check written with `anyhow::ensure!(cond, "h1 sees {rows:?}")`
/// and a final `Ok(true)` explains itself when it times out.
pub fn wait_until<F>(timeout: Duration, poll: Duration, mut check: F) -> Result<Duration>
where
    F: FnMut() -> Result<bool>,
{
    let start = Instant::now();
    let mut checks = 0u64;
    loop {
        checks += 1;
        let last = match check() {
            Ok(true) => return Ok(start.elapsed()),
            Ok(false) => "the condition was still false".to_string(),
            Err(e) => format!("{e:#}"),
        };
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            bail!(
                "not reached within {timeout:?} ({checks} checks over {elapsed:.1?}); last observation: {last}"
            );
        }
        thread::sleep(poll.min(timeout - elapsed));
    }
}

/// Calls `check` every `poll` for `duration` and fails at the first `Err`,
/// saying when it happened: for properties that must hold all along ("the
/// intruder is never listed"). Returns how many checks passed.
pub fn always_for<F>(duration: Duration, poll: Duration, mut check: F) -> Result<u64>
where
    F: FnMut() -> Result<()>,
{
    let start = Instant::now();
    let mut checks = 0u64;
    loop {
        if let Err(e) = check() {
            bail!(
                "violated after {:.1?} (check {}): {e:#}",
                start.elapsed(),
                checks + 1
            );
        }
        checks += 1;
        let elapsed = start.elapsed();
        if elapsed >= duration {
            return Ok(checks);
        }
        thread::sleep(poll.min(duration - elapsed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_reports_elapsed_and_last_observation() {
        let mut n = 0;
        let took = wait_until(Duration::from_secs(5), Duration::from_millis(1), || {
            n += 1;
            Ok(n >= 3)
        })
        .expect("reached");
        assert!(took < Duration::from_secs(5));
        assert_eq!(n, 3);

        let err = wait_until(Duration::from_millis(50), Duration::from_millis(5), || {
            bail!("h1 sees 2 nodes")
        })
        .expect_err("must time out");
        assert!(format!("{err}").contains("h1 sees 2 nodes"), "{err}");
    }

    #[test]
    fn always_for_fails_at_first_violation() {
        let mut n = 0;
        let err = always_for(Duration::from_secs(5), Duration::from_millis(1), || {
            n += 1;
            anyhow::ensure!(n < 4, "listed the intruder");
            Ok(())
        })
        .expect_err("must fail");
        assert!(format!("{err}").contains("check 4"), "{err}");
        let ok = always_for(Duration::from_millis(30), Duration::from_millis(5), || {
            Ok(())
        })
        .expect("holds");
        assert!(ok >= 2);
    }
}
