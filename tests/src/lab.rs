//! A lab: "hosts" made of network namespaces on one underlay switch, each
//! able to run an `ovl-agent`, all torn down on drop.
//!
//! ```text
//!   ovlt-<pid>-<n>-sw:  br0 ── p1 ── p2 ── ... pN        (switch namespace)
//!                              │     │         │ veth
//!   ovlt-<pid>-<n>-hK:       eth0  eth0      eth0  198.18.0.(10+K)/24, lo up
//! ```
//!
//! The switch lives in a namespace of its own, so the root namespace's
//! firewall (bridge netfilter, Docker's FORWARD DROP) never sees lab traffic.
//! Setting switch port `pK` down cuts host k off ([`Lab::partition`],
//! [`Lab::heal`]).

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::agent::{self, AgentProcess};
use crate::cmd::{self, CmdOutput, CtlOutput, ip};
use crate::netns;

/// How long one `ovlctl` call may take before it counts as hung.
pub const CTL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one [`Lab::exec`] command may take.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// Lines of each agent's log printed when a lab is dropped during a panic.
pub const PANIC_LOG_LINES: usize = 200;

static LABS: AtomicU64 = AtomicU64::new(0);

/// The overlay address pool every lab agent gets (INTERFACES-3: test labs
/// must not use the agent's 10.0.0.0/8 default).
pub const DEFAULT_ADDRESS_POOL: &str = "198.19.0.0/16";

/// Set this environment variable to `1` to start agents *without*
/// `--default-address-pool` (for agent builds that do not know the flag yet).
pub const NO_POOL_ENV: &str = "OVL_E2E_NO_DEFAULT_POOL";

/// The flags every lab agent gets after the per-host ones (address, state
/// dir, socket, node name) and before the test's own: the one place to
/// change what all agents run with.
pub fn default_agent_args() -> Vec<String> {
    let mut args = Vec::new();
    if std::env::var(NO_POOL_ENV).map_or(true, |v| v != "1") {
        args.push("--default-address-pool".to_string());
        args.push(DEFAULT_ADDRESS_POOL.to_string());
    }
    args
}

/// Pids of background processes ([`crate::Background`]) a lab started and
/// has not reaped yet; the lab SIGKILLs what is left on drop.
pub(crate) type Registry = Arc<Mutex<std::collections::BTreeSet<i32>>>;

/// The underlay address of host `k` (1-based): 198.18.0.(10+k).
pub fn host_addr(k: usize) -> Ipv4Addr {
    let last = u8::try_from(10 + k).expect("host index out of range (at most 245)");
    Ipv4Addr::new(198, 18, 0, last)
}

/// One lab. Hosts are numbered from 1.
#[derive(Debug)]
pub struct Lab {
    prefix: String,
    hosts: usize,
    dir: PathBuf,
    /// Namespaces this lab created, in creation order.
    namespaces: Vec<String>,
    /// Index k-1: the running agent of host k.
    agents: Vec<Option<AgentProcess>>,
    /// Index k-1: the extra arguments host k's agent was last started with.
    agent_args: Vec<Vec<String>>,
    /// Background processes (pings, iperf3 servers) not yet reaped.
    pub(crate) background: Registry,
}

impl Lab {
    /// Builds a lab of `hosts` hosts (1..=200): switch namespace with a
    /// bridge, host namespaces with `lo` up and `eth0` = 198.18.0.(10+k)/24,
    /// and a temp dir with one directory per host. Sweeps leftovers of dead
    /// harness processes first.
    pub fn new(hosts: usize) -> Result<Self> {
        if !(1..=200).contains(&hosts) {
            bail!("a lab has 1 to 200 hosts, not {hosts}");
        }
        // SAFETY: geteuid(2) takes no arguments and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            bail!("the end-to-end harness needs root (network namespaces)");
        }
        netns::sweep_stale();
        let n = LABS.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{}-{}-{n}", netns::PREFIX, std::process::id());
        let dir = std::env::temp_dir().join(&prefix);
        if dir.exists() {
            // A leftover of a dead process that had our pid.
            fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        let mut lab = Lab {
            prefix,
            hosts,
            dir,
            namespaces: Vec::new(),
            agents: (0..hosts).map(|_| None).collect(),
            agent_args: vec![Vec::new(); hosts],
            background: Registry::default(),
        };
        // sun_path holds 108 bytes; a long TMPDIR would break every socket.
        let sock = lab.socket(hosts);
        if sock.as_os_str().len() > 100 {
            bail!(
                "agent socket path {} is too long for a Unix socket; set TMPDIR to a short directory",
                sock.display()
            );
        }
        // From here on, Drop cleans up whatever was built if a step fails.
        lab.build()
            .with_context(|| format!("building lab {}", lab.prefix))?;
        Ok(lab)
    }

    fn build(&mut self) -> Result<()> {
        for k in 1..=self.hosts {
            let d = self.host_dir(k);
            fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        let sw = self.switch_ns();
        self.add_ns(&sw)?;
        ip(&["-n", &sw, "link", "set", "lo", "up"])?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for k in 1..=self.hosts {
            let h = self.ns(k);
            let port = format!("p{k}");
            let cidr = format!("{}/24", host_addr(k));
            self.add_ns(&h)?;
            ip(&["-n", &h, "link", "set", "lo", "up"])?;
            ip(&[
                "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &h,
            ])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &sw, "link", "set", &port, "up"])?;
            ip(&["-n", &h, "addr", "add", &cidr, "dev", "eth0"])?;
            ip(&["-n", &h, "link", "set", "eth0", "up"])?;
        }
        Ok(())
    }

    /// An "outside" host on the underlay switch, not running ovl:
    /// namespace `<prefix>-<label>` with `eth0` = `addr`/24. Returns the
    /// namespace's name.
    pub fn add_outside(&mut self, label: &str, addr: Ipv4Addr) -> Result<String> {
        let sw = self.switch_ns();
        let ns = format!("{}-{label}", self.prefix);
        let port = format!("o-{label}");
        self.add_ns(&ns)?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip(&["-n", &sw, "link", "set", &port, "master", "br0"])?;
        ip(&["-n", &sw, "link", "set", &port, "up"])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        Ok(ns)
    }

    pub(crate) fn add_ns(&mut self, name: &str) -> Result<()> {
        netns::add(name)?;
        self.namespaces.push(name.to_string());
        Ok(())
    }

    /// Drops `name` from the namespaces torn down with the lab (it was
    /// deleted already).
    pub(crate) fn forget_ns(&mut self, name: &str) {
        self.namespaces.retain(|n| n != name);
    }

    // ---- names and places -------------------------------------------------

    /// `ovlt-<pid>-<n>`: the first part of every namespace of this lab.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn hosts(&self) -> usize {
        self.hosts
    }

    /// The lab's temp dir (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Namespaces created by this lab.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    pub fn switch_ns(&self) -> String {
        format!("{}-sw", self.prefix)
    }

    /// Host k's namespace.
    pub fn ns(&self, k: usize) -> String {
        self.check(k);
        format!("{}-h{k}", self.prefix)
    }

    /// Host k's underlay address.
    pub fn addr(&self, k: usize) -> Ipv4Addr {
        self.check(k);
        host_addr(k)
    }

    /// Host k's node name (`hK`).
    pub fn node_name(&self, k: usize) -> String {
        self.check(k);
        format!("h{k}")
    }

    /// `<tmp>/hK`.
    pub fn host_dir(&self, k: usize) -> PathBuf {
        self.check(k);
        self.dir.join(format!("h{k}"))
    }

    pub fn state_dir(&self, k: usize) -> PathBuf {
        self.host_dir(k).join("state")
    }

    /// Where host k's agent mounts its networks' sandboxes.
    pub fn sandbox_dir(&self, k: usize) -> PathBuf {
        self.host_dir(k).join("netns")
    }

    pub fn socket(&self, k: usize) -> PathBuf {
        self.host_dir(k).join("agent.sock")
    }

    pub fn log_path(&self, k: usize) -> PathBuf {
        self.host_dir(k).join("agent.log")
    }

    /// The last `lines` lines of host k's agent log.
    pub fn log_tail(&self, k: usize, lines: usize) -> String {
        agent::tail(&self.log_path(k), lines)
    }

    fn check(&self, k: usize) {
        assert!(
            (1..=self.hosts).contains(&k),
            "host {k} does not exist in a lab of {} hosts",
            self.hosts
        );
    }

    // ---- agents -------------------------------------------------------------

    /// Starts host k's agent with the lab's standard flags plus `extra`, and
    /// waits (at most [`agent::READY_TIMEOUT`]) until its socket answers
    /// `cluster status`.
    pub fn start_agent(&mut self, k: usize, extra: &[&str]) -> Result<()> {
        self.start_agent_env(k, extra, &[])
    }

    /// [`Lab::start_agent`] with extra environment variables (test-only
    /// fault injection).
    pub fn start_agent_env(
        &mut self,
        k: usize,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<()> {
        self.spawn_agent(k, extra, env)?;
        self.wait_ready(k)
    }

    /// Starts host k's agent without waiting for it to answer (for agents
    /// expected to die).
    pub fn spawn_agent(&mut self, k: usize, extra: &[&str], env: &[(&str, &str)]) -> Result<()> {
        self.check(k);
        if self.agents[k - 1].is_some() {
            bail!("h{k}'s agent is already running");
        }
        let bin = agent::binary("ovl-agent")?;
        agent::binary("ovlctl")?;
        let mut args: Vec<String> = vec![
            "--advertise-addr".into(),
            self.addr(k).to_string(),
            "--state-dir".into(),
            self.state_dir(k).display().to_string(),
            "--socket".into(),
            self.socket(k).display().to_string(),
            "--sandbox-dir".into(),
            self.sandbox_dir(k).display().to_string(),
            "--node-name".into(),
            self.node_name(k),
        ];
        args.extend(default_agent_args());
        args.extend(extra.iter().map(|s| s.to_string()));
        let process = AgentProcess::spawn(&self.ns(k), &bin, &args, env, &self.log_path(k))?;
        self.agents[k - 1] = Some(process);
        self.agent_args[k - 1] = extra.iter().map(|s| s.to_string()).collect();
        Ok(())
    }

    fn wait_ready(&mut self, k: usize) -> Result<()> {
        let start = Instant::now();
        loop {
            let exited = self.agents[k - 1].as_mut().and_then(AgentProcess::exited);
            if let Some(status) = exited {
                self.agents[k - 1] = None;
                bail!(
                    "h{k}'s agent exited ({status}) before its socket answered; log tail:\n{}",
                    self.log_tail(k, 50)
                );
            }
            let last = match self.ctl_timeout(k, &["cluster", "status"], Duration::from_secs(2)) {
                Ok(out) if out.success() => return Ok(()),
                Ok(out) => out.to_string(),
                Err(e) => format!("{e:#}"),
            };
            if start.elapsed() >= agent::READY_TIMEOUT {
                bail!(
                    "h{k}'s agent did not answer `cluster status` within {:?}; last try: {last}\nlog tail:\n{}",
                    agent::READY_TIMEOUT,
                    self.log_tail(k, 50)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether host k has an agent process that has not been stopped.
    pub fn agent_running(&mut self, k: usize) -> bool {
        self.check(k);
        match self.agents[k - 1].as_mut() {
            Some(a) => a.exited().is_none(),
            None => false,
        }
    }

    /// How host k's agent exited, once it has (the process stays recorded).
    pub fn agent_exit_status(&mut self, k: usize) -> Option<ExitStatus> {
        self.check(k);
        self.agents[k - 1].as_mut().and_then(AgentProcess::exited)
    }

    /// The pid of host k's agent, if one runs.
    pub fn agent_pid(&self, k: usize) -> Option<i32> {
        self.check(k);
        self.agents[k - 1].as_ref().map(AgentProcess::pid)
    }

    /// SIGTERM host k's agent and wait for it (at most
    /// [`agent::STOP_TIMEOUT`], then SIGKILL and error). Returns its exit status.
    pub fn stop_agent(&mut self, k: usize) -> Result<ExitStatus> {
        self.check(k);
        let Some(process) = self.agents[k - 1].take() else {
            bail!("h{k} has no running agent to stop");
        };
        process
            .terminate(agent::STOP_TIMEOUT)
            .with_context(|| format!("stopping h{k}'s agent; log tail:\n{}", self.log_tail(k, 30)))
    }

    /// SIGKILL host k's agent and reap it.
    pub fn kill_agent(&mut self, k: usize) -> Result<()> {
        self.check(k);
        let Some(mut process) = self.agents[k - 1].take() else {
            bail!("h{k} has no running agent to kill");
        };
        process.kill();
        Ok(())
    }

    /// Stops host k's agent if it runs (SIGTERM), then starts it again with
    /// the same state dir and the extra arguments it was last started with.
    pub fn restart_agent(&mut self, k: usize) -> Result<()> {
        self.check(k);
        if self.agents[k - 1].is_some() {
            self.stop_agent(k)?;
        }
        let args = self.agent_args[k - 1].clone();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.start_agent(k, &args)
    }

    // ---- ovlctl and commands -------------------------------------------------

    /// Runs `ovlctl ARGS...` exactly as given (no `--socket`; `OVL_SOCKET`
    /// and `OVL_JOIN_TOKEN` removed from its environment).
    pub fn ovlctl(&self, args: &[&str]) -> Result<CtlOutput> {
        let bin = agent::binary("ovlctl")?;
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .env_remove("OVL_SOCKET")
            .env_remove("OVL_JOIN_TOKEN");
        cmd::run(&mut cmd, CTL_TIMEOUT)
    }

    /// The `ovlctl --socket <host k's socket> ARGS...` command, not started
    /// (for running many at once, see [`cmd::run_all`]).
    pub fn ctl_command(&self, k: usize, args: &[&str]) -> Result<Command> {
        let bin = agent::binary("ovlctl")?;
        let mut cmd = Command::new(bin);
        cmd.arg("--socket")
            .arg(self.socket(k))
            .args(args)
            .env_remove("OVL_SOCKET")
            .env_remove("OVL_JOIN_TOKEN");
        Ok(cmd)
    }

    /// Runs `ovlctl --socket <host k's socket> ARGS...`. A non-zero exit is
    /// not an error here; look at the returned status.
    pub fn ctl(&self, k: usize, args: &[&str]) -> Result<CtlOutput> {
        self.ctl_timeout(k, args, CTL_TIMEOUT)
    }

    fn ctl_timeout(&self, k: usize, args: &[&str], timeout: Duration) -> Result<CtlOutput> {
        cmd::run(&mut self.ctl_command(k, args)?, timeout)
    }

    /// Like [`Lab::ctl`], but a non-zero exit is an error with the full output.
    pub fn ctl_ok(&self, k: usize, args: &[&str]) -> Result<CtlOutput> {
        self.ctl(k, args)?.ok()
    }

    /// Runs `ovlctl --socket S --format json ARGS...` and parses stdout; a
    /// non-zero exit or invalid JSON is an error with the full output.
    pub fn ctl_json(&self, k: usize, args: &[&str]) -> Result<Value> {
        let mut all = vec!["--format", "json"];
        all.extend_from_slice(args);
        let out = self.ctl_ok(k, &all)?;
        serde_json::from_str(&out.stdout).with_context(|| format!("stdout is not JSON: {out}"))
    }

    /// Runs `CMD...` in host k's namespace (`ip netns exec`). A non-zero exit
    /// is not an error here.
    pub fn exec(&self, k: usize, cmd: &[&str]) -> Result<CmdOutput> {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(k)]).args(cmd);
        cmd::run(&mut c, EXEC_TIMEOUT)
    }

    /// Like [`Lab::exec`], but a non-zero exit is an error with the output.
    pub fn exec_ok(&self, k: usize, cmd: &[&str]) -> Result<CmdOutput> {
        self.exec(k, cmd)?.ok()
    }

    /// Runs `CMD...` inside the sandbox of network `vni` on host k, where
    /// its bridge, VTEP device and veth host ends live (`nsenter`). A
    /// non-zero exit is an error with the output.
    pub fn exec_sandbox_ok(&self, k: usize, vni: u32, cmd: &[&str]) -> Result<CmdOutput> {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.sandbox(k, vni))).args(cmd);
        cmd::run(&mut c, EXEC_TIMEOUT)?.ok()
    }

    // ---- underlay faults --------------------------------------------------------

    /// `pK`: the switch-side end of host k's underlay veth (in
    /// [`Lab::switch_ns`]).
    pub fn switch_port(&self, k: usize) -> String {
        self.check(k);
        format!("p{k}")
    }

    /// Cuts host k off the underlay: its switch port goes down, so no frame
    /// reaches or leaves it (its `eth0` loses carrier; its address and
    /// routes stay, as on a pulled cable). The other hosts still reach each
    /// other. Undo with [`Lab::heal`]; teardown works either way.
    pub fn partition(&self, k: usize) -> Result<()> {
        ip(&[
            "-n",
            &self.switch_ns(),
            "link",
            "set",
            &self.switch_port(k),
            "down",
        ])?;
        Ok(())
    }

    /// Reconnects host k to the underlay (its switch port up again).
    pub fn heal(&self, k: usize) -> Result<()> {
        ip(&[
            "-n",
            &self.switch_ns(),
            "link",
            "set",
            &self.switch_port(k),
            "up",
        ])?;
        Ok(())
    }

    /// Whether host k is cut off by [`Lab::partition`] (its switch port is
    /// administratively down).
    pub fn is_partitioned(&self, k: usize) -> Result<bool> {
        let link = self
            .link_in(&self.switch_ns(), &self.switch_port(k))?
            .with_context(|| format!("no {} in {}", self.switch_port(k), self.switch_ns()))?;
        Ok(!link.is_up())
    }

    // ---- teardown -------------------------------------------------------------

    fn print_logs(&self) {
        for k in 1..=self.hosts {
            let path = self.log_path(k);
            if path.exists() {
                eprintln!(
                    "===== {} h{k} agent log ({}), last {PANIC_LOG_LINES} lines =====\n{}\n===== end of h{k} log =====",
                    self.prefix,
                    path.display(),
                    agent::tail(&path, PANIC_LOG_LINES)
                );
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if thread::panicking() {
            self.print_logs();
        }
        // Background processes whose handles are still alive elsewhere.
        let pids: Vec<i32> = match self.background.lock() {
            Ok(set) => set.iter().copied().collect(),
            Err(p) => p.into_inner().iter().copied().collect(),
        };
        for pid in pids {
            agent::signal(pid, libc::SIGKILL);
        }
        for process in self.agents.iter_mut().filter_map(Option::take) {
            let mut process = process;
            process.kill();
        }
        // Whatever else runs inside the lab's namespaces (daemonised iperf3,
        // a command that outlived its handle): a deleted namespace with a
        // process inside would live on.
        for name in self.namespaces.iter().rev() {
            netns::kill_members(name);
            if let Err(e) = netns::del(name) {
                eprintln!("ovl-e2e: teardown of {}: {e:#}", self.prefix);
            }
        }
        // The agents' network sandboxes (bind mounts under the lab's dir).
        netns::unmount_under(&self.dir);
        match fs::remove_dir_all(&self.dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                eprintln!("ovl-e2e: teardown: removing {}: {e}", self.dir.display());
            }
            _ => {}
        }
    }
}
