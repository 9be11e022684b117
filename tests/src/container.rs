//! "Containers": bare network namespaces that belong to a lab host and get
//! attached to overlay networks with `ovlctl endpoint attach --netns PATH`.
//!
//! A container of host k is named `<lab prefix>-hK-<label>`, so it is
//! removed with the lab (also after a panic) and swept with the lab's other
//! namespaces when the test process died without cleaning up.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Result, bail};

use crate::Lab;
use crate::cmd::{self, CmdOutput, ip};
use crate::lab::EXEC_TIMEOUT;
use crate::netns;

/// A container namespace made by [`Lab::add_container`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Container {
    /// The lab host it belongs to (its endpoints are attached there).
    pub host: usize,
    /// The test's short name for it (`c1`).
    pub label: String,
    /// The namespace name (`ovlt-<pid>-<n>-h1-c1`).
    pub name: String,
    /// `/run/netns/<name>`, what `--netns` takes.
    pub path: PathBuf,
}

impl Container {
    /// `path` as a string, for command lines.
    pub fn path_str(&self) -> String {
        self.path.display().to_string()
    }

    /// The endpoint name [`Lab::attach`] gives it unless told otherwise:
    /// `hK-<label>`, unique in a lab.
    pub fn endpoint_name(&self) -> String {
        format!("h{}-{}", self.host, self.label)
    }
}

impl std::fmt::Display for Container {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "h{}/{}", self.host, self.label)
    }
}

impl Lab {
    /// Creates container namespace `label` on host k, with `lo` up. Labels
    /// are letters, digits and `-`, unique per host.
    pub fn add_container(&mut self, k: usize, label: &str) -> Result<Container> {
        let ok = !label.is_empty()
            && label.len() <= 32
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !ok {
            bail!("container label {label:?}: use 1 to 32 letters, digits or '-'");
        }
        let name = format!("{}-{label}", self.ns(k));
        if self.namespaces().contains(&name) {
            bail!("h{k} already has a container {label:?}");
        }
        self.add_ns(&name)?;
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        Ok(Container {
            host: k,
            label: label.to_string(),
            path: PathBuf::from("/run/netns").join(&name),
            name,
        })
    }

    /// Deletes container `c`'s namespace now (`ip netns del`; processes
    /// still inside are killed first, as on teardown). The kernel frees the
    /// namespace, and with it the container end of its veths, once nothing
    /// refers to it any more.
    pub fn remove_container(&mut self, c: &Container) -> Result<()> {
        netns::kill_members(&c.name);
        netns::del(&c.name)?;
        self.forget_ns(&c.name);
        Ok(())
    }

    /// Runs `CMD...` inside container `c` (`ip netns exec`). A non-zero exit
    /// is not an error here.
    pub fn exec_in(&self, c: &Container, cmd: &[&str]) -> Result<CmdOutput> {
        cmd::run(&mut self.exec_in_command(c, cmd), EXEC_TIMEOUT)
    }

    /// Like [`Lab::exec_in`], but a non-zero exit is an error with the output.
    pub fn exec_in_ok(&self, c: &Container, cmd: &[&str]) -> Result<CmdOutput> {
        self.exec_in(c, cmd)?.ok()
    }

    /// The `ip netns exec <c> CMD...` command, not started.
    pub fn exec_in_command(&self, c: &Container, cmd: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &c.name]).args(cmd);
        command
    }

    /// One `ping -c 1 -W 1 TARGET` from container `c`: whether the reply
    /// came back.
    pub fn ping_once(&self, c: &Container, target: &str) -> Result<bool> {
        Ok(self
            .exec_in(c, &["ping", "-n", "-c", "1", "-W", "1", target])?
            .success())
    }
}
