//! The programs the data plane runs, inside a namespace: `nft` (rulesets
//! built by `shared/firewall.rs`) and `iptables`. A child inherits the
//! namespace of the thread that forks it, and no agent thread changes
//! namespace for long, so they go through `nsenter --net=`.

use std::io;
use std::path::Path;
use std::process::{Command, Output};

use super::DataplaneError;

fn failed(what: String, source: io::Error) -> DataplaneError {
    DataplaneError::Firewall { what, source }
}

/// `prog`, inside the namespace at `ns` when given (`None`: the agent's).
pub(crate) fn command_in(ns: Option<&Path>, prog: &str) -> Command {
    match ns {
        Some(p) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", p.display())).arg(prog);
            c
        }
        None => Command::new(prog),
    }
}

/// Runs `cmd` to its end. Blocking.
pub(crate) fn output(mut cmd: Command, what: &str) -> Result<Output, DataplaneError> {
    cmd.output().map_err(|e| failed(what.to_owned(), e))
}

/// Like [`output`], and a non-zero exit is an error carrying its stderr.
pub(crate) fn succeed(cmd: Command, what: &str) -> Result<(), DataplaneError> {
    let out = output(cmd, what)?;
    if out.status.success() {
        return Ok(());
    }
    Err(failed(
        what.to_owned(),
        io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
    ))
}

/// Applies an nftables ruleset (one transaction) in `ns`. Blocking.
pub(crate) fn apply_nft(
    ns: Option<&Path>,
    rules: &nftables::schema::Nftables,
    what: &str,
) -> Result<(), DataplaneError> {
    let r = match ns {
        Some(p) => {
            let net = format!("--net={}", p.display());
            nftables::helper::apply_ruleset_with_args(rules, Some("nsenter"), [&net, "nft"])
        }
        None => nftables::helper::apply_ruleset(rules),
    };
    r.map_err(|e| failed(format!("nft: {what}"), io::Error::other(e.to_string())))
}
