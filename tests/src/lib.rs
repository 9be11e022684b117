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
//! Overlay networks (issue #3): containers are bare namespaces of a host,
//! attached with `ovlctl endpoint attach --netns`:
//!
//! ```no_run
//! # use std::time::Duration;
//! # use ovl_e2e::Lab;
//! # let mut lab = Lab::new(2)?;
//! lab.start_cluster(&[1, 2])?;                     // agents, init, join, converge
//! let net = lab.network_create(1, "a", &[])?;      // a /24 of 198.19.0.0/16
//! lab.wait_network(&[1, 2], "a")?;
//! let c1 = lab.add_container(1, "c1")?;            // ovlt-<pid>-<n>-h1-c1
//! let c2 = lab.add_container(2, "c1")?;
//! let e1 = lab.attach("a", &c1, &[])?;             // endpoint "h1-c1"
//! let e2 = lab.attach("a", &c2, &[])?;
//! lab.wait_dataplane(&[1, 2], net.vni, &[e1.clone(), e2.clone()])?; // bridge fdb / ip neigh
//! let mut ping = lab.start_ping(&c1, &e2.ip)?;     // every 50 ms, in the background
//! ping.wait_replies(20, Duration::from_secs(5))?;
//! let report = ping.stop()?;                       // lost seqs, windows, ping's summary
//! println!("{report}");
//! # Ok::<(), anyhow::Error>(())
//! ```
//!
//! Agents always get [`default_agent_args`] (`--default-address-pool
//! 198.19.0.0/16`; `OVL_E2E_NO_DEFAULT_POOL=1` leaves it out). Background
//! processes (pings, iperf3 servers) die with their handle, with the lab,
//! and with the test thread; a lab also kills whatever else still runs in
//! its namespaces before deleting them. Tests that measure timing take
//! [`exclusive`], light ones [`shared`].
//!
//! Needs root. Binaries come from `$OVL_BIN_DIR` or `target/<profile>/`
//! (build them first: `cargo build --release --workspace --bins`). Every
//! lab removes its namespaces, agents and temp dir on drop, also when the
//! test panicked (and then prints the agents' logs first).

pub mod agent;
pub mod background;
pub mod cmd;
pub mod container;
pub mod kernel;
pub mod lab;
pub mod netns;
pub mod ovl;

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

pub use agent::{bin_dir, binary};
pub use background::{
    Background, DnsQueries, DnsReport, IperfResult, LostWindow, Ping, PingReport,
};
pub use cmd::{CmdOutput, CtlOutput};
pub use container::Container;
pub use kernel::{FdbEntry, LinkRow, NeighEntry, bridge_dev, host_veth, mac_for_ip, vxlan_dev};
pub use lab::{Lab, default_agent_args, host_addr};
pub use ovl::{
    EndpointRow, FdbReport, FdbRow, InitOutput, JoinOutput, NetworkDetail, NetworkRow, NodeRow,
    PATIENCE, PeerRow, Status, ip_part,
};

/// The poll interval the tests use.
pub const POLL: Duration = Duration::from_millis(100);

static HEAVY: RwLock<()> = RwLock::new(());

/// Held by a test that needs the machine to itself (CPU-heavy, or checking
/// timing bounds such as "zero lost pings"): waits until no other test of
/// this process holds [`exclusive`] or [`shared`]. Tests in one binary run
/// in parallel threads; this keeps them from disturbing each other's
/// measurements. A panicking holder does not block the others.
pub fn exclusive() -> RwLockWriteGuard<'static, ()> {
    HEAVY.write().unwrap_or_else(|p| p.into_inner())
}

/// Held by a light test: runs alongside other light tests, never alongside
/// an [`exclusive`] one.
pub fn shared() -> RwLockReadGuard<'static, ()> {
    HEAVY.read().unwrap_or_else(|p| p.into_inner())
}

/// Failed checks collected over a test, so that one broken property does
/// not hide the measurements of the others: record with [`Findings::check`]
/// (or [`Findings::ok`]), then [`Findings::finish`] panics listing every
/// failure.
#[derive(Debug, Default)]
pub struct Findings {
    failures: Vec<String>,
}

impl Findings {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a failure unless `cond` holds; returns `cond`.
    pub fn check(&mut self, cond: bool, msg: impl FnOnce() -> String) -> bool {
        if !cond {
            let m = msg();
            eprintln!("FAILED CHECK: {m}");
            self.failures.push(m);
        }
        cond
    }

    /// The value, or `None` with the error recorded under `what`.
    pub fn ok<T>(&mut self, what: &str, r: Result<T>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                let m = format!("{what}: {e:#}");
                eprintln!("FAILED CHECK: {m}");
                self.failures.push(m);
                None
            }
        }
    }

    pub fn failures(&self) -> &[String] {
        &self.failures
    }

    /// Panics if anything failed, listing every failure.
    pub fn finish(self) {
        if !self.failures.is_empty() {
            panic!(
                "{} check(s) failed:\n- {}",
                self.failures.len(),
                self.failures.join("\n- ")
            );
        }
    }
}

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
