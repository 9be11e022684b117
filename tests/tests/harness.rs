//! Self-test of the lab harness; needs root but no ovl binaries.

use std::path::PathBuf;
use std::process::Command;
use std::thread;

use ovl_e2e::{Lab, netns};

fn leftovers(prefix: &str) -> Vec<String> {
    // "ovlt-1-2" must not match "ovlt-1-23-sw": match the full prefix plus '-'.
    netns::list(&format!("{prefix}-")).expect("listing namespaces")
}

#[test]
fn two_hosts_ping_over_underlay_and_vanish_on_drop() {
    let lab = Lab::new(2).expect("building a 2-host lab");
    let prefix = lab.prefix().to_string();
    let dir: PathBuf = lab.dir().to_path_buf();
    assert_eq!(
        leftovers(&prefix),
        vec![
            format!("{prefix}-h1"),
            format!("{prefix}-h2"),
            format!("{prefix}-sw")
        ]
    );
    assert!(lab.host_dir(1).is_dir() && lab.host_dir(2).is_dir());

    let ping = lab
        .exec(
            1,
            &["ping", "-c", "2", "-i", "0.2", "-W", "2", "198.18.0.12"],
        )
        .expect("running ping in h1");
    assert!(
        ping.success(),
        "h1 cannot ping h2 over the underlay: {ping}"
    );
    let ping = lab
        .exec(2, &["ping", "-c", "1", "-W", "2", "198.18.0.11"])
        .expect("running ping in h2");
    assert!(
        ping.success(),
        "h2 cannot ping h1 over the underlay: {ping}"
    );

    // eth0 carries the address, lo is up, and nothing leaks to the root
    // namespace's view of the underlay.
    let addrs = lab
        .exec_ok(1, &["ip", "-4", "-o", "addr", "show"])
        .expect("ip addr in h1");
    assert!(
        addrs.stdout.contains("eth0") && addrs.stdout.contains("198.18.0.11/24"),
        "{addrs}"
    );
    assert!(
        addrs.stdout.contains("127.0.0.1/8"),
        "lo is not up in h1: {addrs}"
    );

    drop(lab);
    assert_eq!(
        leftovers(&prefix),
        Vec::<String>::new(),
        "namespaces left after drop"
    );
    assert!(!dir.exists(), "{} left after drop", dir.display());
}

#[test]
fn labs_in_parallel_threads_do_not_clash() {
    let handles: Vec<_> = (0..3)
        .map(|_| {
            thread::spawn(|| {
                let lab = Lab::new(2).expect("building a lab");
                let out = lab
                    .exec(2, &["ping", "-c", "1", "-W", "2", "198.18.0.11"])
                    .expect("running ping");
                assert!(out.success(), "{out}");
                lab.prefix().to_string()
            })
        })
        .collect();
    let prefixes: Vec<String> = handles
        .into_iter()
        .map(|h| h.join().expect("lab thread panicked"))
        .collect();
    for (i, p) in prefixes.iter().enumerate() {
        assert!(!prefixes[i + 1..].contains(p), "two labs shared prefix {p}");
        assert!(leftovers(p).is_empty(), "{p} left namespaces");
    }
}

#[test]
fn teardown_runs_after_a_panic() {
    let result = thread::spawn(|| {
        let lab = Lab::new(1).expect("building a lab");
        let prefix = lab.prefix().to_string();
        std::fs::write(lab.log_path(1), "a line the panic should print\n").expect("writing log");
        // Hand the name out through the panic message.
        panic!("deliberate panic in lab {prefix}");
    })
    .join();
    let payload = result.expect_err("the thread must panic");
    let msg = payload
        .downcast_ref::<String>()
        .cloned()
        .expect("panic message");
    let prefix = msg
        .rsplit(' ')
        .next()
        .expect("prefix in message")
        .to_string();
    assert!(prefix.starts_with("ovlt-"), "{msg}");
    assert!(
        leftovers(&prefix).is_empty(),
        "namespaces of {prefix} left after a panic"
    );
    assert!(!std::env::temp_dir().join(&prefix).exists());
}

#[test]
fn stale_namespaces_of_dead_processes_are_swept() {
    // A pid that certainly ran and has ended.
    let mut child = Command::new("true").spawn().expect("spawning true");
    let dead = child.id();
    child.wait().expect("waiting for true");
    let name = format!("{}-{dead}-0-sw", netns::PREFIX);
    let dir = std::env::temp_dir().join(format!("{}-{dead}-0", netns::PREFIX));
    netns::add(&name).expect("creating a fake stale namespace");
    std::fs::create_dir_all(&dir).expect("creating a fake stale temp dir");

    let removed = netns::sweep_stale();
    let lab_ok = Lab::new(1).map(|_| ());
    assert!(
        !netns::exists(&name),
        "stale {name} survived the sweep ({removed:?})"
    );
    assert!(!dir.exists(), "stale {} survived the sweep", dir.display());
    lab_ok.expect("a lab after the sweep");
}

#[test]
fn containers_pings_and_iperf3_work_and_vanish_with_the_lab() {
    use std::time::Duration;

    let mut lab = Lab::new(1).expect("building a lab");
    let prefix = lab.prefix().to_string();
    let c1 = lab.add_container(1, "c1").expect("container c1");
    let c2 = lab.add_container(1, "c2").expect("container c2");
    assert_eq!(c1.name, format!("{prefix}-h1-c1"));
    assert_eq!(c1.path, PathBuf::from("/run/netns").join(&c1.name));
    assert!(c1.path.exists());
    assert_eq!(c1.endpoint_name(), "h1-c1");
    assert!(
        lab.add_container(1, "c1").is_err(),
        "duplicate label accepted"
    );
    assert!(lab.add_container(1, "bad/label").is_err());
    assert_eq!(netns::owner_pid(&c1.name), Some(std::process::id()));

    // A veth between the two containers, standing in for an overlay link.
    let ip = |args: &[&str]| {
        let out = Command::new("ip").args(args).output().expect("ip");
        assert!(out.status.success(), "ip {args:?}: {out:?}");
    };
    ip(&[
        "-n", &c1.name, "link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns",
        &c2.name,
    ]);
    ip(&[
        "-n",
        &c1.name,
        "addr",
        "add",
        "198.18.200.1/24",
        "dev",
        "v0",
    ]);
    ip(&[
        "-n",
        &c2.name,
        "addr",
        "add",
        "198.18.200.2/24",
        "dev",
        "v1",
    ]);
    ip(&["-n", &c1.name, "link", "set", "v0", "up"]);
    ip(&["-n", &c2.name, "link", "set", "v1", "up"]);
    let out = lab
        .exec_in_ok(&c1, &["ip", "-o", "addr", "show", "dev", "v0"])
        .expect("exec_in");
    assert!(out.stdout.contains("198.18.200.1/24"), "{out}");
    assert!(lab.ping_once(&c1, "198.18.200.2").expect("ping"));

    // A continuous ping that sees a 0.5 s outage reports it as lost.
    let mut ping = lab.start_ping(&c1, "198.18.200.2").expect("ping");
    ping.wait_replies(5, Duration::from_secs(5))
        .expect("replies");
    ip(&[
        "-n",
        &c2.name,
        "addr",
        "del",
        "198.18.200.2/24",
        "dev",
        "v1",
    ]);
    thread::sleep(Duration::from_millis(500));
    ip(&[
        "-n",
        &c2.name,
        "addr",
        "add",
        "198.18.200.2/24",
        "dev",
        "v1",
    ]);
    ping.wait_replies(25, Duration::from_secs(5))
        .expect("replies after the outage");
    let report = ping.stop().expect("stopping ping");
    println!("{report}");
    let windows = report.lost_windows();
    assert_eq!(windows.len(), 1, "one outage, one window: {report}");
    assert!((5..=15).contains(&report.lost.len()), "{report}");
    assert!(report.summary.is_some());

    // iperf3 over the veth.
    let r = lab.iperf3(&c1, &c2, "198.18.200.2", 1).expect("iperf3");
    println!("iperf3 over a veth: {r}");
    assert!(r.bytes_received > 0, "{r}");

    // Left running: a ping whose handle is leaked, and a daemonised iperf3.
    let leaked = lab.start_ping(&c1, "198.18.200.2").expect("ping");
    let leaked_pid = leaked.pid();
    std::mem::forget(leaked);
    let pidfile = lab.dir().join("iperf3.pid");
    let pidfile_s = pidfile.display().to_string();
    lab.exec_in_ok(&c2, &["iperf3", "-s", "-D", "-I", &pidfile_s])
        .expect("iperf3 -D");
    thread::sleep(Duration::from_millis(300));
    let daemon: i32 = std::fs::read_to_string(&pidfile)
        .expect("iperf3 pid file")
        .trim()
        .parse()
        .expect("pid");
    assert!(alive(daemon));

    // remove_container deletes one early; the lab forgets it.
    let c3 = lab.add_container(1, "c3").expect("container c3");
    lab.remove_container(&c3).expect("removing c3");
    assert!(!c3.path.exists());

    drop(lab);
    assert!(!alive(leaked_pid), "leaked ping survived the lab");
    assert!(!alive(daemon), "daemonised iperf3 survived the lab");
    assert_eq!(leftovers(&prefix), Vec::<String>::new());
}

fn alive(pid: i32) -> bool {
    PathBuf::from(format!("/proc/{pid}")).exists() && !zombie(pid)
}

fn zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}
