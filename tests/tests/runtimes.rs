//! Issue 10, the CNI plugin under the real runtimes on this machine:
//! podman 4.3 with its CNI backend on h1, containerd 1.6 (`ctr run --cni`)
//! on h2, both on the same ovl network. The runtimes run in the machine's
//! own namespace (each makes its containers' namespaces itself); which
//! host a container joins is the agent its conflist's `socket` names.
//!
//! - podman reads its conflist from a directory of this test
//!   (`network_config_dir`) and the plugin from another
//!   (`cni_plugin_dirs`), so nothing global changes for it.
//! - `ctr` reads the first conflist in `/etc/cni/net.d` and the plugin from
//!   `/opt/cni/bin`: the test installs `00-ovl-e2e-<pid>.conflist` and
//!   `/opt/cni/bin/ovl` for the run and removes both, also on failure.
//!
//! Checked: each gets an address from ovl's IPAM, the two ping each other
//! across hosts, `podman rm -f` and the end of the `ctr run --rm` task
//! (ctr's DEL carries `CNI_NETNS=""`) leave no endpoint record and no
//! sandbox on either host.
//!
//! Needs root, the binaries (`cargo build --release --workspace --bins`)
//! and podman, containerd and busybox-static (`deploy/setup`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ovl_e2e::agent::binary;
use ovl_e2e::cmd::{self, CmdOutput};
use ovl_e2e::{Background, Findings, Lab, PATIENCE, exclusive};
use serde_json::json;

const NET: &str = "web";

/// Removes what the test put in global places, even on a panic.
struct Installed(Vec<PathBuf>);

impl Drop for Installed {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn run_ok(cmd: &mut Command, what: &str) -> CmdOutput {
    let out = cmd::run(cmd, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{what}: {e:#}"));
    assert!(out.success(), "{what} failed: {out}");
    out
}

fn conflist(lab: &Lab, k: usize) -> String {
    json!({
        "cniVersion": "1.0.0",
        "name": NET,
        "plugins": [{"type": "ovl", "network": NET, "socket": lab.socket(k)}],
    })
    .to_string()
}

/// A busybox root file system with relative links (RUNTIMES.md).
fn rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "etc", "proc", "sys", "dev", "tmp"] {
        std::fs::create_dir_all(root.join(d)).expect("rootfs dirs");
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("/bin/busybox (busybox-static, deploy/setup)");
    for app in ["sh", "ping", "ip", "sleep", "cat"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(app)).expect("applet link");
    }
    root
}

/// podman with this test's own storage, configuration and CNI dirs.
struct Podman {
    conf: PathBuf,
    root: PathBuf,
    runroot: PathBuf,
}

impl Podman {
    fn new(dir: &Path, lab: &Lab, k: usize) -> Self {
        let net_d = dir.join("podman-net.d");
        let bin = dir.join("podman-cni-bin");
        std::fs::create_dir_all(&net_d).expect("net.d");
        std::fs::create_dir_all(&bin).expect("cni bin");
        std::fs::write(net_d.join("web.conflist"), conflist(lab, k)).expect("conflist");
        std::os::unix::fs::symlink(binary("ovl-cni").expect("ovl-cni"), bin.join("ovl"))
            .expect("plugin link");
        let conf = dir.join("containers.conf");
        std::fs::write(
            &conf,
            format!(
                "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n\
                 [network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\"]\nnetwork_config_dir = \"{}\"\n\
                 [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nruntime = \"runc\"\n",
                bin.display(),
                net_d.display()
            ),
        )
        .expect("containers.conf");
        Podman {
            conf,
            root: dir.join("podman-root"),
            runroot: dir.join("podman-run"),
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", &self.conf)
            .arg("--root")
            .arg(&self.root)
            .arg("--runroot")
            .arg(&self.runroot)
            .args(args);
        c
    }

    fn ok(&self, args: &[&str]) -> CmdOutput {
        run_ok(&mut self.cmd(args), &format!("podman {}", args.join(" ")))
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = cmd::run(
            &mut self.cmd(&["rm", "-a", "-f", "-t", "0"]),
            Duration::from_secs(30),
        );
    }
}

/// containerd with its own socket, root and state.
struct Containerd {
    _daemon: Background,
    address: PathBuf,
}

impl Containerd {
    fn start(lab: &Lab, dir: &Path) -> Self {
        let address = dir.join("containerd.sock");
        let config = dir.join("containerd.toml");
        std::fs::write(
            &config,
            "version = 2\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n",
        )
        .expect("containerd config");
        let mut c = Command::new("containerd");
        c.arg("--config")
            .arg(&config)
            .arg("--address")
            .arg(&address)
            .arg("--root")
            .arg(dir.join("containerd-root"))
            .arg("--state")
            .arg(dir.join("containerd-state"));
        let daemon = Background::spawn(lab, &mut c).expect("containerd");
        let me = Containerd {
            _daemon: daemon,
            address,
        };
        let t = Instant::now();
        while !me.ctr(&["version"]).status.success() {
            assert!(t.elapsed() < PATIENCE, "containerd not answering");
            std::thread::sleep(Duration::from_millis(100));
        }
        me
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(&self.address).args(args);
        c
    }

    fn ctr(&self, args: &[&str]) -> CmdOutput {
        cmd::run(&mut self.cmd(args), Duration::from_secs(60)).expect("ctr")
    }
}

fn ipv4_of(ip_addr_output: &str) -> Option<String> {
    ip_addr_output
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .map(str::to_string)
}

fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let t = Instant::now();
    loop {
        if done() {
            return Some(t.elapsed());
        }
        if t.elapsed() >= within {
            println!("{what}: not within {within:?}");
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn podman_and_containerd_containers_share_an_ovl_network_and_leave_nothing() {
    let _serial = exclusive();
    let started = Instant::now();
    let (lab, net) = common::cluster_with_network(2, NET, &[]);
    let dir = lab.dir().join("runtimes");
    std::fs::create_dir_all(&dir).expect("runtime dir");
    let root = rootfs(&dir);
    let mut f = Findings::new();

    // ctr's global CNI places, for this run only.
    let pid = std::process::id();
    let conf_d = PathBuf::from(format!("/etc/cni/net.d/00-ovl-e2e-{pid}.conflist"));
    std::fs::create_dir_all("/etc/cni/net.d").expect("/etc/cni/net.d");
    std::fs::create_dir_all("/opt/cni/bin").expect("/opt/cni/bin");
    let plugin = PathBuf::from("/opt/cni/bin/ovl");
    let _installed = Installed(vec![conf_d.clone(), plugin.clone()]);
    std::fs::write(&conf_d, conflist(&lab, 2)).expect("ctr conflist");
    let _ = std::fs::remove_file(&plugin);
    std::fs::copy(binary("ovl-cni").expect("ovl-cni"), &plugin).expect("ovl-cni to /opt/cni/bin");

    // podman on h1.
    let podman = Podman::new(&dir, &lab, 1);
    let mut import = podman.cmd(&["import", "-c", "CMD [\"/bin/sh\"]", "-", "ovl/busybox"]);
    let tar = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .args(["-c", "."])
        .output()
        .expect("tar of the rootfs");
    {
        use std::io::Write;
        let mut child = import
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("podman import");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&tar.stdout)
            .expect("image to podman");
        assert!(
            child.wait().expect("podman import").success(),
            "podman import failed"
        );
    }
    let t = Instant::now();
    podman.ok(&[
        "run",
        "-d",
        "--name",
        "pa",
        "--network",
        NET,
        "ovl/busybox",
        "sleep",
        "1000",
    ]);
    println!("podman run took {:.2?}", t.elapsed());
    let pa_ip = ipv4_of(
        &podman
            .ok(&["exec", "pa", "ip", "-4", "addr", "show", "eth0"])
            .stdout,
    )
    .expect("pa has an IPv4 address");

    // containerd on h2: `ctr run --rm --cni`, in the foreground of a
    // background process, so its DEL (with CNI_NETNS="") runs when the
    // task ends.
    let containerd = Containerd::start(&lab, &dir);
    let rootfs_arg = root.display().to_string();
    let t = Instant::now();
    let mut ctr_run = containerd.cmd(&[
        "run",
        "--rm",
        "--cni",
        "--rootfs",
        &rootfs_arg,
        "cb",
        "/bin/sleep",
        "1000",
    ]);
    let ctr_task = Background::spawn(&lab, &mut ctr_run).expect("ctr run");
    let mut cb_ip = None;
    wait_until("cb's address", PATIENCE, || {
        let out = containerd.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "addr",
            "cb",
            "/bin/ip",
            "-4",
            "addr",
            "show",
            "eth0",
        ]);
        cb_ip = ipv4_of(&out.stdout);
        cb_ip.is_some()
    });
    println!("ctr run --cni: address after {:.2?}", t.elapsed());
    let Some(cb_ip) = cb_ip else {
        let out = ctr_task.stop(libc::SIGTERM, Duration::from_secs(5));
        panic!("cb has no IPv4 address; ctr run: {out:?}");
    };
    println!(
        "podman pa {pa_ip} on h1, ctr cb {cb_ip} on h2, network {} ({})",
        NET, net.subnet
    );
    f.check(pa_ip != cb_ip, || format!("same address twice: {pa_ip}"));
    for (who, ip) in [("pa", &pa_ip), ("cb", &cb_ip)] {
        f.check(common::in_subnet(ip, &net.subnet), || {
            format!("{who}'s {ip} is outside {}", net.subnet)
        });
    }
    let rows = lab.endpoints(1, Some(NET)).unwrap_or_default();
    f.check(
        rows.iter().any(|r| r.ip == pa_ip) && rows.iter().any(|r| r.ip == cb_ip),
        || format!("h1's endpoint table lacks pa or cb: {rows:?}"),
    );

    // Across hosts, both ways.
    let out = podman
        .cmd(&["exec", "pa", "ping", "-c", "3", "-W", "2", &cb_ip])
        .output();
    let ok = out.as_ref().is_ok_and(|o| o.status.success());
    f.check(ok, || format!("podman pa -> ctr cb: {out:?}"));
    let back = containerd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "ping",
        "cb",
        "/bin/ping",
        "-c",
        "3",
        "-W",
        "2",
        &pa_ip,
    ]);
    f.check(back.success(), || format!("ctr cb -> podman pa: {back}"));

    // Removal: podman rm -f (DEL with prevResult), the ctr task's end
    // (DEL with an empty netns).
    podman.ok(&["rm", "-f", "-t", "0", "pa"]);
    let kill = containerd.ctr(&["task", "kill", "-s", "SIGKILL", "cb"]);
    f.check(kill.success(), || format!("ctr task kill: {kill}"));
    let ended = ctr_task.stop(libc::SIGTERM, Duration::from_secs(20));
    println!("ctr run ended: {:?}", ended.as_ref().map(|o| o.status));
    for k in [1, 2] {
        let gone = wait_until(&format!("h{k}: endpoints gone"), PATIENCE, || {
            lab.endpoints(k, Some(NET)).is_ok_and(|r| r.is_empty())
        });
        f.check(gone.is_some(), || {
            format!(
                "h{k} still lists endpoints: {:?}",
                lab.endpoints(k, Some(NET))
            )
        });
        let sandbox_gone = wait_until(&format!("h{k}: sandbox gone"), PATIENCE, || {
            !lab.sandbox_dir(k).join(format!("ovl-{}", net.vni)).exists()
        });
        f.check(sandbox_gone.is_some(), || {
            format!("h{k} still has network {NET}'s sandbox")
        });
    }
    let listed = containerd.ctr(&["containers", "ls", "-q"]);
    f.check(listed.stdout.trim().is_empty(), || {
        format!("ctr still lists containers: {listed}")
    });
    println!("runtimes test took {:.2?}", started.elapsed());
    f.finish();
}
