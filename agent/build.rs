// Puts the git revision into `OVL_GIT_REVISION` for `--version`.
//
// Order: git (when the crate sits in a git work tree of its own workspace),
// then the `OVL_GIT_REVISION` environment variable (set by packaging from a
// tarball without .git), then "unknown". Cargo re-runs this only when HEAD
// or the ref it points at moves, or the variable changes, not on every
// source edit. ovlctl's build.rs includes this file.

use std::path::{Path, PathBuf};
use std::process::Command;

const VAR: &str = "OVL_GIT_REVISION";

fn main() {
    println!("cargo:rerun-if-env-changed={VAR}");
    println!("cargo:rerun-if-changed=build.rs");
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let revision = git_revision(&manifest)
        .or_else(|| std::env::var(VAR).ok().filter(|v| !v.trim().is_empty()))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env={VAR}={}", revision.trim());
}

/// The short commit id, if `dir`'s workspace is the top of a git work tree
/// (not a tarball unpacked inside some other repository).
fn git_revision(dir: &Path) -> Option<String> {
    let top = git(dir, &["rev-parse", "--show-toplevel"])?;
    let workspace = dir.parent()?.canonicalize().ok()?;
    if Path::new(&top).canonicalize().ok()? != workspace {
        return None;
    }
    // Watch HEAD, the branch it names, and packed-refs (where the branch
    // lives after `git gc`); absolute paths also work in worktrees.
    let mut watched = vec![git(
        dir,
        &["rev-parse", "--path-format=absolute", "--git-path", "HEAD"],
    )?];
    if let Some(branch) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
        watched.extend(git(
            dir,
            &["rev-parse", "--path-format=absolute", "--git-path", &branch],
        ));
    }
    watched.extend(git(
        dir,
        &[
            "rev-parse",
            "--path-format=absolute",
            "--git-path",
            "packed-refs",
        ],
    ));
    // A missing watched file would make cargo re-run this on every build.
    for path in watched.iter().filter(|p| Path::new(p).exists()) {
        println!("cargo:rerun-if-changed={path}");
    }
    git(dir, &["rev-parse", "--short=12", "HEAD"])
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?;
    Some(s.trim().to_owned()).filter(|s| !s.is_empty())
}
