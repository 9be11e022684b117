//! Issue #8, local half, against real agents: the local API refuses callers
//! that are not root, however they reached its socket.
//!
//! Needs root, `setpriv` (util-linux) and the binaries
//! (`cargo build --release --workspace --bins`).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ovl_e2e::{Findings, Lab, POLL, shared, wait_until};

/// The nobody user: no access to root's files.
const NOBODY: u32 = 65534;

fn counter(lab: &Lab, k: usize, name: &str) -> u64 {
    lab.status(k)
        .ok()
        .and_then(|s| s.counters.get(name).and_then(|v| v.as_u64()))
        .unwrap_or(0)
}

/// `ovlctl --socket <h1> cluster status` as uid/gid 65534, no groups.
fn ctl_as_nobody(lab: &Lab) -> ovl_e2e::CmdOutput {
    let ctl = lab
        .ctl_command(1, &["cluster", "status"])
        .expect("ovlctl command");
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--reuid={NOBODY}"))
        .arg(format!("--regid={NOBODY}"))
        .arg("--clear-groups")
        .arg(ctl.get_program())
        .args(ctl.get_args());
    ovl_e2e::cmd::run(&mut cmd, Duration::from_secs(10)).expect("run setpriv ovlctl")
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).map_or(0, |m| m.permissions().mode() & 0o7777)
}

#[test]
fn non_root_callers_get_permission_denied_and_are_logged() {
    let _g = shared();
    let mut lab = Lab::new(1).expect("lab");
    lab.start_agent(1, &[]).expect("start agent");
    lab.cluster_init(1).expect("cluster init");
    let mut f = Findings::new();
    let sock = lab.socket(1);
    let m = mode(&sock);
    println!("socket {} mode {m:o}", sock.display());
    f.check(m == 0o600, || format!("socket mode {m:o}, want 600"));

    // 1. The socket's mode keeps nobody out: ovlctl says why in one line.
    let out = ctl_as_nobody(&lab);
    println!("as uid {NOBODY} (socket 0600): {}", out.stderr.trim());
    f.check(!out.status.success(), || {
        format!("nobody's call succeeded: {out:?}")
    });
    f.check(out.stderr.contains("permission denied"), || {
        format!("no 'permission denied' in {:?}", out.stderr)
    });
    f.check(out.stderr.trim().lines().count() == 1, || {
        format!("not one line: {:?}", out.stderr)
    });

    // 2. An operator loosens the socket (and its directories): the agent's
    // own SO_PEERCRED check still refuses, counts and logs the uid.
    let before = counter(&lab, 1, "api_caller_refused");
    let mut p = sock.parent();
    while let Some(d) = p {
        if d == Path::new("/") {
            break;
        }
        let m = mode(d);
        let _ = std::fs::set_permissions(d, std::fs::Permissions::from_mode(m | 0o011));
        p = d.parent();
    }
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).expect("chmod sock");
    let out = ctl_as_nobody(&lab);
    println!("as uid {NOBODY} (socket 0666): {}", out.stderr.trim());
    f.check(!out.status.success(), || {
        format!("nobody's call succeeded: {out:?}")
    });
    f.check(
        out.stderr.contains("permission denied") && out.stderr.contains("uid 65534"),
        || format!("agent's refusal not shown: {:?}", out.stderr),
    );
    let logged = wait_until(Duration::from_secs(5), POLL, || {
        Ok(lab
            .log_tail(1, 200)
            .lines()
            .any(|l| l.contains("API call refused") && l.contains("uid 65534")))
    });
    f.check(logged.is_ok(), || {
        "agent did not log the refused uid 65534".into()
    });
    let after = counter(&lab, 1, "api_caller_refused");
    println!("api_caller_refused {before} -> {after}");
    f.check(after > before, || {
        format!("api_caller_refused {before} -> {after}")
    });

    // Root still works through the same socket.
    f.ok("root status after refusals", lab.status(1));
    f.finish();
}
