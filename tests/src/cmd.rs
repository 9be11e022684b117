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

/// Runs `cmd` with stdin closed, collecting stdout and stderr. A command that
/// has not ended after `timeout` is killed and reported as an error; a
/// non-zero exit is *not* an error here (see [`run_ok`]).
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<CmdOutput> {
    let command = command_line(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start `{command}`"))?;
    let stdout = reader(&mut child, true);
    let stderr = reader(&mut child, false);
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                let (out, err) = (join(stdout), join(stderr));
                bail!(
                    "`{command}` did not finish within {timeout:?} and was killed\n\
                     --- stdout ---\n{out}\n--- stderr ---\n{err}"
                );
            }
            Ok(None) => thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e).with_context(|| format!("waiting for `{command}`"));
            }
        }
    };
    Ok(CmdOutput {
        command,
        status,
        stdout: join(stdout),
        stderr: join(stderr),
    })
}

/// Starts every command at once (stdin closed, output collected), then
/// waits for all of them; one that has not ended after `timeout` (counted
/// from the start of the first) is killed and reported as an error. The
/// results are in the order of `cmds`; a non-zero exit is not an error.
pub fn run_all(cmds: Vec<Command>, timeout: Duration) -> Vec<Result<CmdOutput>> {
    struct Running {
        command: String,
        child: Child,
        out: Reader,
        err: Reader,
    }
    let deadline = Instant::now() + timeout;
    let mut running: Vec<Result<Running>> = cmds
        .into_iter()
        .map(|mut cmd| {
            let command = command_line(&cmd);
            let mut child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .with_context(|| format!("cannot start `{command}`"))?;
            let out = reader(&mut child, true);
            let err = reader(&mut child, false);
            Ok(Running {
                command,
                child,
                out,
                err,
            })
        })
        .collect();
    let mut results: Vec<Option<Result<CmdOutput>>> = running.iter().map(|_| None).collect();
    loop {
        let mut pending = 0;
        for (i, r) in running.iter_mut().enumerate() {
            if results[i].is_some() {
                continue;
            }
            let r = match r {
                Ok(r) => r,
                Err(e) => {
                    results[i] = Some(Err(anyhow::anyhow!("{e:#}")));
                    continue;
                }
            };
            match r.child.try_wait() {
                Ok(Some(status)) => {
                    results[i] = Some(Ok(CmdOutput {
                        command: r.command.clone(),
                        status,
                        stdout: join(r.out.take()),
                        stderr: join(r.err.take()),
                    }));
                }
                Ok(None) if Instant::now() >= deadline => {
                    let _ = r.child.kill();
                    let _ = r.child.wait();
                    let (out, err) = (join(r.out.take()), join(r.err.take()));
                    results[i] = Some(Err(anyhow::anyhow!(
                        "`{}` did not finish within {timeout:?} and was killed\n\
                         --- stdout ---\n{out}\n--- stderr ---\n{err}",
                        r.command
                    )));
                }
                Ok(None) => pending += 1,
                Err(e) => {
                    let _ = r.child.kill();
                    let _ = r.child.wait();
                    results[i] = Some(Err(anyhow::anyhow!("waiting for `{}`: {e}", r.command)));
                }
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
