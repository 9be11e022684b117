//! A network's sandbox: a network namespace of its own on each host, where
//! the network's bridge, its VTEP device and the host ends of its veths
//! live (DESIGN.md, "Plain data plane (kernel)"). The host's firewall then
//! never sees bridged overlay frames, and two networks with the same
//! subnet never meet.
//!
//! A sandbox is held by a bind mount of its nsfs file at
//! `<dir>/ovl-<vni>`, so it outlives the agent: a restarted agent adopts it
//! (and the devices in it) without touching traffic. With the default
//! directory, `/run/netns`, `ip netns exec ovl-<vni> ...` reaches it. The
//! agent must run in the host's mount namespace for that (the systemd unit
//! says why it has no mount-namespace options).

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use rtnetlink::Handle;
use tracing::{info, warn};

use super::DataplaneError;
use super::commands::apply_nft;
use super::netns::{self, ConnTask};
use super::shared::firewall;
use crate::ids::Vni;

/// Prefix of a sandbox's file in the sandbox directory: `ovl-<vni>`.
pub const FILE_PREFIX: &str = "ovl-";

/// An open sandbox: its namespace file, a netlink connection inside it and
/// a descriptor for moving devices in (`IFLA_NET_NS_FD`).
pub struct Sandbox {
    pub vni: Vni,
    pub path: PathBuf,
    pub(crate) handle: Handle,
    pub(crate) ns: File,
    _conn: ConnTask,
    /// Forwards the VXLAN device's miss notifications to the data plane.
    _misses: Option<ConnTask>,
    /// When this agent last applied or found complete the network's egress
    /// firewall and sysctls (`None`: not since the sandbox was opened).
    firewall: std::sync::Mutex<Option<std::time::Instant>>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("vni", &self.vni)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// `<dir>/ovl-<vni>`.
pub fn path_of(dir: &Path, vni: Vni) -> PathBuf {
    dir.join(format!("{FILE_PREFIX}{vni}"))
}

/// The VNI of a sandbox file name, if it is one of ours (the same
/// decimal rule as device names).
pub(crate) fn vni_of_file(name: &str) -> Option<Vni> {
    super::shared::names::vni_of_device(name, FILE_PREFIX)
}

/// VNIs with a live sandbox in `dir` (files that are network namespaces;
/// a leftover plain file after a reboot is not one). Blocking.
pub(crate) fn list(dir: &Path) -> Vec<Vni> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut vnis: Vec<Vni> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let vni = vni_of_file(e.file_name().to_str()?)?;
            netns::open_checked(&e.path()).ok().map(|_| vni)
        })
        .collect();
    vnis.sort();
    vnis
}

fn sandbox_err(path: &Path, what: &str, source: io::Error) -> DataplaneError {
    DataplaneError::Sandbox {
        path: path.to_owned(),
        what: what.to_owned(),
        source,
    }
}

/// Makes a new network namespace and bind-mounts it at `path` (replacing a
/// leftover file that is not a namespace). Blocking: runs on a thread of
/// its own, which `unshare`s and exits, so no other thread changes
/// namespace.
fn make(path: &Path) -> Result<(), DataplaneError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| sandbox_err(path, "create directory", e))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(sandbox_err(path, "remove leftover file", e)),
    }
    std::fs::File::create(path).map_err(|e| sandbox_err(path, "create mount point", e))?;
    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| sandbox_err(path, "path", io::Error::other("NUL in path")))?;
    let made = std::thread::Builder::new()
        .name("ovl-sandbox".into())
        .spawn(move || -> io::Result<()> {
            // SAFETY: unshare only changes this thread's network namespace;
            // the thread exits right after, so no code of the agent ever
            // runs in the new namespace by accident.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let src = c"/proc/thread-self/ns/net";
            // SAFETY: both paths are valid NUL-terminated strings that
            // outlive the call; a bind mount takes no filesystem type or
            // data.
            let rc = unsafe {
                libc::mount(
                    src.as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
        .map_err(|e| sandbox_err(path, "spawn thread", e))?
        .join()
        .map_err(|_| DataplaneError::Worker)?;
    if let Err(e) = made {
        let _ = std::fs::remove_file(path);
        return Err(sandbox_err(path, "unshare and bind-mount", e));
    }
    Ok(())
}

/// Unmounts and removes the sandbox file: the namespace, and every device
/// still in it, goes once nothing holds it any more. Idempotent. Blocking.
pub(crate) fn destroy(path: &Path) -> Result<(), DataplaneError> {
    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| sandbox_err(path, "path", io::Error::other("NUL in path")))?;
    // SAFETY: a valid NUL-terminated path; MNT_DETACH only detaches the
    // mount, it touches no memory of ours.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = io::Error::last_os_error();
        // EINVAL: not a mount point (a leftover file); ENOENT: gone.
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) {
            return Err(sandbox_err(path, "unmount", e));
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(sandbox_err(path, "remove", e)),
    }
}

/// Bridge netfilter is on by default in a new namespace
/// (`bridge-nf-call-*` = 1): every bridged overlay frame would then cross
/// the sandbox's netfilter hooks and conntrack, which the egress NAT
/// registers. Only routed traffic (to and from the transit) needs them.
/// Run inside the sandbox; a kernel without bridge netfilter has no such
/// files, which is fine.
fn bridged_frames_bypass_netfilter() -> Result<(), DataplaneError> {
    for key in ["iptables", "ip6tables", "arptables"] {
        netns::set_sysctl(&format!("/proc/sys/net/bridge/bridge-nf-call-{key}"), "0")?;
    }
    Ok(())
}

/// No IPv6 of the sandbox's own: the gateway is IPv4, and with IPv6 on,
/// the bridge sends router solicitations, MLD reports and DAD probes from
/// the gateway MAC, which every host shares. Flooded to the peers, those
/// arrive from a MAC the sending host does not hold (the encrypted VTEP
/// counts them as `spoofed_source`; a kernel bridge sees its own address
/// come back). Containers' IPv6 frames are bridged as before. Run inside
/// the sandbox, before its devices exist (`default`), and for devices an
/// older agent made (`all`).
fn no_ipv6_of_its_own() -> Result<(), DataplaneError> {
    for scope in ["default", "all"] {
        netns::set_sysctl(
            &format!("/proc/sys/net/ipv6/conf/{scope}/disable_ipv6"),
            "1",
        )?;
    }
    Ok(())
}

impl Sandbox {
    /// Opens the sandbox of `vni` in `dir`, if there is one.
    pub(crate) async fn open(dir: &Path, vni: Vni) -> Result<Option<Self>, DataplaneError> {
        let path = path_of(dir, vni);
        let p = path.clone();
        if !netns::blocking(move || Ok(netns::open_checked(&p).is_ok())).await? {
            return Ok(None);
        }
        Self::attach(vni, path, false).await.map(Some)
    }

    /// Opens the sandbox of `vni` in `dir`, making it first if there is none.
    pub(crate) async fn open_or_make(dir: &Path, vni: Vni) -> Result<Self, DataplaneError> {
        let path = path_of(dir, vni);
        let p = path.clone();
        let created = netns::blocking(move || {
            if netns::open_checked(&p).is_ok() {
                return Ok(false);
            }
            make(&p).map(|()| true)
        })
        .await?;
        Self::attach(vni, path, created).await
    }

    /// Connects to the namespace at `path` and makes it ready: `lo` up,
    /// bridge netfilter and the sandbox's own IPv6 off, the DNS restart
    /// hold in place.
    async fn attach(vni: Vni, path: PathBuf, created: bool) -> Result<Self, DataplaneError> {
        let ns = netns::open(&path)?;
        let (handle, conn) = netns::connect_in(&path).await?;
        if created {
            info!(vni = %vni, netns = %path.display(), "network sandbox created");
        }
        let sb = Self {
            vni,
            path,
            handle,
            ns,
            _conn: conn,
            _misses: None,
            firewall: std::sync::Mutex::new(None),
        };
        sb.loopback_up().await?;
        netns::run_in(&sb.path, || {
            bridged_frames_bypass_netfilter()?;
            no_ipv6_of_its_own()
        })
        .await?;
        let p = sb.path.clone();
        let held = netns::blocking(move || {
            apply_nft(
                Some(&p),
                &firewall::restart_hold_ruleset(),
                "sandbox DNS restart hold",
            )
        })
        .await;
        if let Err(e) = held {
            // Names still resolve; only queries sent while the agent
            // restarts fail at once instead of being retried.
            warn!(vni = %vni, error = %e, "cannot hold DNS queries across agent restarts in the sandbox");
        }
        Ok(sb)
    }

    fn firewall_at(&self) -> std::sync::MutexGuard<'_, Option<std::time::Instant>> {
        self.firewall.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn firewall_applied(&self) -> bool {
        self.firewall_at().is_some()
    }

    /// Applied or verified now (`true`), or to be applied again (`false`).
    pub(crate) fn set_firewall_applied(&self, done: bool) {
        *self.firewall_at() = done.then(std::time::Instant::now);
    }

    /// Applied, and last applied or verified at least `every` ago.
    pub(crate) fn firewall_check_due(&self, every: std::time::Duration) -> bool {
        self.firewall_at().is_some_and(|t| t.elapsed() >= every)
    }

    /// Whether the file still names this namespace (`ip netns del` by hand
    /// unmounts it while we hold it open).
    pub(crate) fn still_mounted(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(&self.path), self.ns.metadata()) {
            (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
            _ => false,
        }
    }

    /// Keeps `task` (the forwarder of this namespace's miss
    /// notifications) for as long as the sandbox is open.
    pub(crate) fn hold(&mut self, task: ConnTask) {
        self._misses = Some(task);
    }

    /// `lo` up: the namespace's own services (the network's DNS server)
    /// answer on it too.
    async fn loopback_up(&self) -> Result<(), DataplaneError> {
        use super::netlink as nl;
        if let Some(lo) = nl::link_by_name(&self.handle, "lo").await?
            && !lo.up
        {
            nl::quiet_up(&self.handle, lo.index, "lo").await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_files_are_named_by_vni() {
        let vni = Vni::new(4097).unwrap();
        assert_eq!(
            path_of(Path::new("/run/netns"), vni),
            PathBuf::from("/run/netns/ovl-4097")
        );
        assert_eq!(vni_of_file("ovl-4097"), Some(vni));
        assert_eq!(vni_of_file("ovl-04097"), None);
        assert_eq!(vni_of_file("ovl-"), None);
        assert_eq!(vni_of_file("h1"), None);
    }
}
