//! Agent processes and the binaries under test.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long an agent may take to answer `cluster status` after start.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an agent may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

const BUILD_HINT: &str = "build them first: cargo build --release --workspace --bins \
                          (or point OVL_BIN_DIR at the directory holding ovl-agent and ovlctl)";

/// The directory holding `ovl-agent` and `ovlctl`: `$OVL_BIN_DIR`, else the
/// directory above the test executable's `deps/` (`target/<profile>/`).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("OVL_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("locating the test executable")?;
    let parent = exe
        .parent()
        .with_context(|| format!("{} has no parent directory", exe.display()))?;
    let profile_dir = match parent.parent() {
        Some(up) if parent.file_name().is_some_and(|n| n == "deps") => up,
        _ => parent,
    };
    Ok(profile_dir.to_path_buf())
}

/// Full path of binary `name` (`ovl-agent`, `ovlctl`), or an error saying
/// how to build it.
pub fn binary(name: &str) -> Result<PathBuf> {
    let dir = bin_dir()?;
    let path = dir.join(name);
    if !path.is_file() {
        bail!("{name} not found in {}; {BUILD_HINT}", dir.display());
    }
    Ok(path)
}

/// Sends `sig` to process `pid`; errors (already gone) are ignored.
pub(crate) fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// A running agent, started by [`crate::Lab::start_agent`].
#[derive(Debug)]
pub(crate) struct AgentProcess {
    pub child: Child,
}

impl AgentProcess {
    /// Starts `nsenter --net=/run/netns/NS AGENT ARGS...` with stdout and
    /// stderr appended to `log`. nsenter execs in place, so the child's pid
    /// is the agent's. Not `ip netns exec`: that gives the agent a mount
    /// namespace of its own, and the bind mounts holding its networks'
    /// sandboxes would die with it, so a restart could not adopt them (the
    /// systemd unit runs it in the host's mount namespace too).
    ///
    /// The child gets `PR_SET_PDEATHSIG = SIGKILL`: if the test process dies
    /// without running its destructors, the agent dies with it. The signal
    /// fires when the *thread* that started the agent ends, so start agents
    /// from the thread that owns the lab (as `#[test]` functions do).
    pub fn spawn(
        ns: &str,
        agent_bin: &Path,
        args: &[String],
        env: &[(&str, &str)],
        log: &Path,
    ) -> Result<Self> {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{ns}"))
            .arg(agent_bin)
            .args(args)
            .env_remove("OVL_JOIN_TOKEN")
            .env_remove("OVL_SOCKET")
            .envs(env.iter().copied());
        let line = crate::cmd::command_line(&cmd);
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        writeln!(file, "=== ovl-e2e: starting `{line}`")
            .with_context(|| format!("writing {}", log.display()))?;
        let err_file = file
            .try_clone()
            .with_context(|| format!("duplicating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err_file));
        // SAFETY: the hook runs in the forked child before exec and only calls
        // prctl(2), which is async-signal-safe and uses no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{line}`"))?;
        Ok(Self { child })
    }

    pub fn pid(&self) -> i32 {
        // Pids fit in i32 (pid_max <= 2^22).
        i32::try_from(self.child.id()).unwrap_or(i32::MAX)
    }

    /// The exit status if the agent has already ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then wait up to `timeout`; SIGKILL and error if it is still
    /// running then.
    pub fn terminate(mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.exited() {
            return Ok(status);
        }
        signal(self.pid(), libc::SIGTERM);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().context("waiting for the agent")? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                self.kill();
                bail!(
                    "agent (pid {}) did not exit within {timeout:?} of SIGTERM; killed it",
                    self.pid()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `lines` lines of the file at `path` (a note if it is missing).
pub fn tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let skip = all.len().saturating_sub(lines);
            let mut out = String::new();
            if skip > 0 {
                out.push_str(&format!("[... {skip} earlier lines]\n"));
            }
            out.push_str(&all[skip..].join("\n"));
            out
        }
        Err(e) => format!("[no log at {}: {e}]", path.display()),
    }
}
