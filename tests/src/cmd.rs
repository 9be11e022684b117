//! Running external commands (`ip`, `ovlctl`, `ping`, ...) with a time bound
//! and errors that say exactly what ran and what it printed.

use std::fmt;
use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long a plain `ip` command may take before it counts as hung.
pub const IP_TIMEOUT: Duration = Duration::from_secs(20);

/// What a finished command returned.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    /// The command line, for messages.
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// `ovlctl`'s output has the same shape as any other command's.
pub type CtlOutput = CmdOutput;

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// The exit code, `None` when a signal ended the process.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The non-empty lines of stderr.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }

    /// Checks the contract for a refused `ovlctl` command: exit code 1 and
    /// exactly one stderr line, starting with `ovlctl: error: `. Returns
    /// that line.
    pub fn one_line_error(&self) -> Result<String> {
        let lines = self.stderr_lines();
        if self.code() != Some(1) || lines.len() != 1 || !lines[0].starts_with("ovlctl: error: ") {
            bail!(
                "want exit 1 and exactly one stderr line starting with \"ovlctl: error: \"; got {self}"
            );
        }
        Ok(lines[0].to_string())
    }

    /// `Ok(self)` when the command exited 0, otherwise an error carrying
    /// the command line and everything it printed.
    pub fn ok(self) -> Result<Self> {
        if self.success() {
            Ok(self)
        } else {
            bail!("command failed: {self}")
        }
    }
}

impl fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` ended with {}", self.command, self.status)?;
        if !self.stdout.trim().is_empty() {
            write!(f, "\n--- stdout ---\n{}", self.stdout.trim_end())?;
        }
        if !self.stderr.trim().is_empty() {
            write!(f, "\n--- stderr ---\n{}", self.stderr.trim_end())?;
        }
        Ok(())
    }
}

/// The command line of `cmd`, quoted where a shell would need it.
pub fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| quote(&a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@+%".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A started command whose output is being collected.
struct Running {
    command: String,
    child: Child,
    out: Reader,
    err: Reader,
}

impl Running {
    /// Starts `cmd` with stdin closed and stdout/stderr collected.
    fn start(cmd: &mut Command) -> Result<Self> {
        let command = command_line(cmd);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start `{command}`"))?;
        let out = reader(&mut child, true);
        let err = reader(&mut child, false);
        Ok(Self {
            command,
            child,
            out,
            err,
        })
    }

    /// `None` while the command runs and `deadline` has not passed; past it
    /// the command is killed and reported as an error. A non-zero exit is
    /// not an error here.
    fn poll(&mut self, deadline: Instant, timeout: Duration) -> Option<Result<CmdOutput>> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(Ok(CmdOutput {
                command: self.command.clone(),
                status,
                stdout: join(self.out.take()),
                stderr: join(self.err.take()),
            })),
            Ok(None) if Instant::now() >= deadline => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let (out, err) = (join(self.out.take()), join(self.err.take()));
                Some(Err(anyhow::anyhow!(
                    "`{}` did not finish within {timeout:?} and was killed\n\
                     --- stdout ---\n{out}\n--- stderr ---\n{err}",
                    self.command
                )))
            }
            Ok(None) => None,
            Err(e) => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                Some(Err(anyhow::anyhow!("waiting for `{}`: {e}", self.command)))
            }
        }
    }
}

/// Runs `cmd` with stdin closed, collecting stdout and stderr. A command that
/// has not ended after `timeout` is killed and reported as an error; a
/// non-zero exit is *not* an error here (see [`run_ok`]).
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<CmdOutput> {
    let deadline = Instant::now() + timeout;
    let mut running = Running::start(cmd)?;
    loop {
        if let Some(result) = running.poll(deadline, timeout) {
            return result;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Starts every command at once (stdin closed, output collected), then
/// waits for all of them; one that has not ended after `timeout` (counted
/// from the start of the first) is killed and reported as an error. The
/// results are in the order of `cmds`; a non-zero exit is not an error.
pub fn run_all(cmds: Vec<Command>, timeout: Duration) -> Vec<Result<CmdOutput>> {
    let deadline = Instant::now() + timeout;
    let mut running: Vec<Result<Running>> = cmds
        .into_iter()
        .map(|mut cmd| Running::start(&mut cmd))
        .collect();
    let mut results: Vec<Option<Result<CmdOutput>>> = running.iter().map(|_| None).collect();
    loop {
        let mut pending = 0;
        for (i, r) in running.iter_mut().enumerate() {
            if results[i].is_some() {
                continue;
            }
            results[i] = match r {
                Ok(r) => r.poll(deadline, timeout),
                Err(e) => Some(Err(anyhow::anyhow!("{e:#}"))),
            };
            if results[i].is_none() {
                pending += 1;
            }
        }
        if pending == 0 {
            break;
        }
        thread::sleep(Duration::from_millis(5));
    }
    results
        .into_iter()
        .map(|r| r.expect("every command has a result"))
        .collect()
}

/// Like [`run`], but a non-zero exit is an error carrying the command line
/// and its output.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Result<CmdOutput> {
    run(cmd, timeout)?.ok()
}

/// Runs `ip ARGS...` and fails unless it exits 0.
pub fn ip(args: &[&str]) -> Result<CmdOutput> {
    run_ok(Command::new("ip").args(args), IP_TIMEOUT)
}

type Reader = Option<thread::JoinHandle<String>>;

fn reader(child: &mut Child, stdout: bool) -> Reader {
    let mut pipe: Box<dyn Read + Send> = if stdout {
        Box::new(child.stdout.take()?)
    } else {
        Box::new(child.stderr.take()?)
    };
    Some(thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }))
}

fn join(r: Reader) -> String {
    r.and_then(|h| h.join().ok()).unwrap_or_default()
}
