//! Named network namespaces (`ip netns`) owned by labs, and the sweep that
//! removes what a crashed test process left behind.
//!
//! Every name the harness creates is `ovlt-<pid>-<counter>-<role>`, so labs
//! in parallel threads and processes never clash, and leftovers of a process
//! that no longer runs are recognisable.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};

use crate::cmd::ip;

/// First part of every namespace and temp dir name the harness creates.
pub const PREFIX: &str = "ovlt";

const NETNS_DIR: &str = "/run/netns";

/// `ip netns add` makes /run/netns a shared mount the first time it runs;
/// two first runs at once can stack mounts and hide namespaces. Serialise
/// creation within the process.
static CREATE: Mutex<()> = Mutex::new(());

/// Whether a namespace called `name` exists.
pub fn exists(name: &str) -> bool {
    Path::new(NETNS_DIR).join(name).exists()
}

/// Creates namespace `name`; a leftover of the same name (from a dead
/// process that had our pid) is deleted first.
pub fn add(name: &str) -> Result<()> {
    let _guard = CREATE.lock().unwrap_or_else(|p| p.into_inner());
    if exists(name) {
        del(name)?;
    }
    ip(&["netns", "add", name])?;
    Ok(())
}

/// Deletes namespace `name` (its mount; the kernel frees the namespace when
/// no process is left in it).
pub fn del(name: &str) -> Result<()> {
    ip(&["netns", "del", name])?;
    Ok(())
}

/// Names of all namespaces starting with `prefix`.
pub fn list(prefix: &str) -> Result<Vec<String>> {
    let dir = match fs::read_dir(NETNS_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {NETNS_DIR}")),
    };
    let mut names = Vec::new();
    for entry in dir {
        let entry = entry.with_context(|| format!("reading {NETNS_DIR}"))?;
        match entry.file_name().to_str() {
            Some(name) if name.starts_with(prefix) => names.push(name.to_string()),
            _ => {}
        }
    }
    names.sort();
    Ok(names)
}

/// The pid in a harness name `ovlt-<pid>-...`, if it is one.
pub fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?.strip_prefix('-')?;
    rest.split('-').next()?.parse().ok()
}

fn pid_running(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// Removes namespaces and temp dirs left by harness processes that no longer
/// run: SIGKILLs the processes still inside such a namespace (agents a
/// crashed test started), deletes the namespace, removes the temp dir.
/// Returns what it removed. Best effort: failures are printed, not returned.
pub fn sweep_stale() -> Vec<String> {
    let mut removed = Vec::new();
    let stale = |name: &str| owner_pid(name).is_some_and(|pid| !pid_running(pid));
    match list(&format!("{PREFIX}-")) {
        Ok(names) => {
            for name in names.iter().filter(|n| stale(n)) {
                kill_members(name);
                match del(name) {
                    Ok(()) => removed.push(name.clone()),
                    Err(e) => eprintln!("ovl-e2e: stale sweep: {e:#}"),
                }
            }
        }
        Err(e) => eprintln!("ovl-e2e: stale sweep: {e:#}"),
    }
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let path: PathBuf = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if stale(&name) && path.is_dir() {
                unmount_under(&path);
                match fs::remove_dir_all(&path) {
                    Ok(()) => removed.push(path.display().to_string()),
                    Err(e) => eprintln!("ovl-e2e: stale sweep: removing {}: {e}", path.display()),
                }
            }
        }
    }
    removed
}

/// SIGKILLs every process inside namespace `name` (by pid, as listed by
/// `ip netns pids`).
pub(crate) fn kill_members(name: &str) {
    let out = match ip(&["netns", "pids", name]) {
        Ok(out) => out,
        Err(e) => {
            eprintln!("ovl-e2e: killing processes in {name}: {e:#}");
            return;
        }
    };
    for pid in out
        .stdout
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        if pid > 1 {
            crate::agent::signal(pid, libc::SIGKILL);
        }
    }
}

/// Lazily unmounts every mount point under `dir` (agents' network
/// sandboxes are nsfs bind mounts there; a mounted file cannot be removed).
pub fn unmount_under(dir: &Path) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    for line in info.lines() {
        // Field 5 is the mount point (octal escapes for spaces; lab paths
        // have none).
        let Some(point) = line.split(' ').nth(4) else {
            continue;
        };
        let point = Path::new(point);
        if point.starts_with(dir) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(point)
                .output();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_harness_names_only() {
        assert_eq!(owner_pid("ovlt-1234-0-sw"), Some(1234));
        assert_eq!(owner_pid("ovlt-77-12-h3"), Some(77));
        assert_eq!(owner_pid("ovlt-x-1-h1"), None);
        assert_eq!(owner_pid("ovl-1234-0-sw"), None);
        assert_eq!(owner_pid("ovltx-1234"), None);
    }
}
