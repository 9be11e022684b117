//! Issue 7 acceptance, against real agents in network namespaces: encrypted
//! networks carried by the agents' userspace VTEP (AES-256-GCM over UDP
//! 4500, per-host-pair keys from the X25519 keys in signed node records).
//!
//! Needs root, tcpdump, iperf3 and the binaries (`cargo build --release
//! --workspace --bins`). Each test builds its own lab.

mod common;

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use common::*;
use ovl_e2e::{Background, Container, EndpointRow, Findings, Lab, exclusive, shared, wait_until};

const ENCRYPTED_PORT: &str = "4500";
const VXLAN_PORT: &str = "4789";
const LISTEN_PORT: &str = "9999";

fn wire() -> String {
    ovl_e2e::binary("ovl-wire")
        .expect("ovl-wire binary")
        .display()
        .to_string()
}

/// A capture of every port of the underlay switch, written to `file`.
fn capture(lab: &Lab, file: &str) -> Background {
    let path = lab.dir().join(file);
    let path_s = path.to_string_lossy().into_owned();
    let mut tcpdump = Command::new("ip");
    tcpdump.args([
        "netns",
        "exec",
        &lab.switch_ns(),
        "tcpdump",
        "-i",
        "any",
        "-s",
        "0",
        "-U",
        "--immediate-mode",
        "-B",
        "32768",
        "-n",
        "-Z",
        "root",
        "-w",
        &path_s,
        "udp",
    ]);
    let cap = Background::spawn(lab, &mut tcpdump).expect("tcpdump");
    wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        Ok(std::fs::metadata(&path)
            .map(|m| m.len() > 0)
            .unwrap_or(false))
    })
    .expect("tcpdump writes its capture file");
    cap
}

fn stop_capture(f: &mut Findings, cap: Background) {
    if let Some(out) = f.ok(
        "tcpdump stops",
        cap.stop(libc::SIGINT, Duration::from_secs(5)),
    ) {
        f.check(
            out.stderr
                .lines()
                .any(|l| l.trim() == "0 packets dropped by kernel"),
            || format!("the capture is incomplete: {}", out.stderr.trim()),
        );
    }
}

/// Packets in `pcap` matching `filter` (`tcpdump -r`).
fn count_in(pcap: &std::path::Path, filter: &str) -> usize {
    let out = Command::new("tcpdump")
        .arg("-r")
        .arg(pcap)
        .args(["-n", filter])
        .output()
        .expect("tcpdump -r");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Hex of `s` for `ping -p` (at most 16 bytes of pattern).
fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// A UDP listener in container `c` for `secs` seconds; `wait` for its end.
fn listener(lab: &Lab, c: &Container, secs: u32) -> Background {
    let w = wire();
    let secs = secs.to_string();
    let mut cmd = lab.exec_in_command(c, &[&w, "listen", "--port", LISTEN_PORT, "--secs", &secs]);
    let mut bg = Background::spawn(lab, &mut cmd).expect("listener");
    bg.wait_for_line("listening on", Duration::from_secs(5))
        .expect("listener ready");
    bg
}

/// What a listener received, after it ended.
fn received(bg: Background) -> Result<(u64, Vec<String>)> {
    let out = bg.stop(0, Duration::from_secs(30))?;
    let n = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("received "))
        .context("listener printed no count")?
        .trim()
        .parse()?;
    let payloads = out
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("payload "))
        .map(str::to_string)
        .collect();
    Ok((n, payloads))
}

fn send_from(lab: &Lab, c: &Container, ip: &str, payload: &str, count: u32) -> Result<()> {
    let to = format!("{ip}:{LISTEN_PORT}");
    lab.exec_in_ok(
        c,
        &[
            &wire(),
            "send",
            "--to",
            &to,
            "--payload",
            payload,
            "--count",
            &count.to_string(),
        ],
    )?;
    Ok(())
}

/// `ovl-wire vxlan` from host `from`'s namespace: a cleartext VXLAN datagram
/// to host `to`'s 4789 carrying UDP to `ep`'s listener.
fn inject_vxlan(
    lab: &Lab,
    from: usize,
    to: usize,
    vni: u32,
    ep: &EndpointRow,
    payload: &str,
) -> Result<()> {
    let dst = format!("{}:{VXLAN_PORT}", lab.addr(to));
    lab.exec_ok(
        from,
        &[
            &wire(),
            "vxlan",
            "--to",
            &dst,
            "--vni",
            &vni.to_string(),
            "--dst-mac",
            &ep.mac,
            "--src-ip",
            "198.19.250.250",
            "--dst-ip",
            &ep.ip,
            "--port",
            LISTEN_PORT,
            "--payload",
            payload,
            "--count",
            "3",
        ],
    )?;
    Ok(())
}

/// Reachability, confidentiality and plain beside encrypted, in one lab.
#[test]
fn encrypted_network_all_pairs_ping_tcp_and_the_underlay_shows_no_cleartext() {
    let _serial = exclusive();
    let (mut lab, sec) =
        cluster_with_network(3, "sec", &["--subnet", "198.19.20.0/24", "--encrypted"]);
    let mut f = Findings::new();
    let plain = lab
        .network_create(1, "pl", &["--subnet", "198.19.21.0/24"])
        .expect("plain network");
    lab.wait_network(&[1, 2, 3], "pl").expect("pl everywhere");
    f.check(sec.mode == "encrypted", || format!("sec: {sec:?}"));

    let mut eps: Vec<(Container, EndpointRow)> = Vec::new();
    for k in 1..=3 {
        for label in ["c1", "c2"] {
            eps.push(attached(&mut lab, k, label, "sec", &[]));
        }
    }
    let (p1, _) = attached(&mut lab, 1, "p1", "pl", &[]);
    let (_p3, pe3) = attached(&mut lab, 3, "p3", "pl", &[]);
    for (c, ep) in &eps {
        let link = lab.link_in(&c.name, "eth0").ok().flatten();
        f.check(link.as_ref().map(|l| l.mtu) == Some(1500 - 78), || {
            format!("{c}: eth0 {link:?}, want MTU 1422 (underlay 1500 - 78)")
        });
        let _ = ep;
    }
    // No kernel VXLAN device for the encrypted network, a TAP on its bridge.
    for k in 1..=3 {
        let links = lab.links_in(&lab.ns(k)).unwrap_or_default();
        let vx = ovl_e2e::vxlan_dev(sec.vni);
        f.check(!links.iter().any(|l| l.ifname == vx), || {
            format!("h{k} has a kernel VXLAN device {vx} for an encrypted network")
        });
        let tap = format!("ovlen-{}", sec.vni);
        let row = links.iter().find(|l| l.ifname == tap);
        f.check(row.is_some_and(|l| l.master.is_some() && l.is_up()), || {
            format!("h{k}: TAP {tap}: {row:?}")
        });
    }

    let mut pairs: Vec<(&Container, &str)> = Vec::new();
    for i in 0..eps.len() {
        for j in i + 1..eps.len() {
            pairs.push((&eps[i].0, eps[j].1.ip.as_str()));
        }
    }
    // The first packets of a pair may meet keys still being derived.
    f.ok(
        "every pair reachable",
        wait_reachable(&lab, &pairs, Duration::from_secs(20)).map(|_| ()),
    );
    let results = ping_all(&lab, &pairs, 3);
    let mut replies = 0;
    for ((c, ip), r) in pairs.iter().zip(&results) {
        match r {
            Ok((tx, rx)) => {
                replies += rx;
                f.check(*tx == 3 && *rx == 3, || {
                    format!("{c} -> {ip}: {rx}/{tx} replies")
                });
            }
            Err(e) => {
                f.check(false, || format!("{c} -> {ip}: {e:#}"));
            }
        }
    }
    println!(
        "encrypted all pairs: {} pairs, {replies} replies",
        pairs.len()
    );
    // Full-size packets with DF set cross (MTU 1422 fits the underlay).
    let (h1c1, h3c1) = (&eps[0], &eps[4]);
    let size = (1500 - 78 - 28).to_string();
    let out = lab
        .exec_in(
            &h1c1.0,
            &[
                "ping", "-n", "-c", "2", "-M", "do", "-s", &size, "-W", "2", &h3c1.1.ip,
            ],
        )
        .expect("ping");
    f.check(out.success(), || {
        format!("DF ping {size} bytes h1 -> h3: {out}")
    });

    match lab.iperf3(&h1c1.0, &h3c1.0, &h3c1.1.ip, 2) {
        Ok(r) => {
            println!("iperf3 over the encrypted network (TCP, 2 s): {r}");
            f.check(r.bytes_received > 1_000_000, || {
                format!("iperf3 moved too little: {r}")
            });
        }
        Err(e) => {
            f.check(false, || format!("iperf3 over sec: {e:#}"));
        }
    }
    // Confidentiality: a marker crosses both networks while the switch
    // records everything; only the plain one may show it.
    let marker = "ovl-secret-mark!";
    let plain_marker = "ovl-plain-mark!!";
    let cap = capture(&lab, "underlay.pcap");
    let out = lab
        .exec_in(
            &h1c1.0,
            &[
                "ping",
                "-n",
                "-c",
                "5",
                "-i",
                "0.2",
                "-p",
                &hex(marker),
                &h3c1.1.ip,
            ],
        )
        .expect("marker ping");
    f.check(out.success(), || format!("marker ping over sec: {out}"));
    let out = lab
        .exec_in(
            &p1,
            &[
                "ping",
                "-n",
                "-c",
                "3",
                "-i",
                "0.2",
                "-p",
                &hex(plain_marker),
                &pe3.ip,
            ],
        )
        .expect("plain marker ping");
    f.check(out.success(), || format!("marker ping over pl: {out}"));
    std::thread::sleep(Duration::from_millis(300));
    stop_capture(&mut f, cap);
    let pcap = lab.dir().join("underlay.pcap");
    let bytes = std::fs::read(&pcap).expect("read the capture");
    let on_4500 = count_in(&pcap, &format!("udp port {ENCRYPTED_PORT}"));
    let vni_filter = format!("udp port {VXLAN_PORT} and udp[12:4] = {}", sec.vni << 8);
    let sec_on_4789 = count_in(&pcap, &vni_filter);
    println!(
        "capture: {} bytes, {on_4500} datagrams on {ENCRYPTED_PORT}/udp, {sec_on_4789} on {VXLAN_PORT} with sec's VNI",
        bytes.len()
    );
    f.check(on_4500 >= 10, || {
        format!("only {on_4500} datagrams on {ENCRYPTED_PORT}/udp")
    });
    f.check(sec_on_4789 == 0, || {
        format!("{sec_on_4789} VXLAN datagrams carry sec's VNI")
    });
    f.check(contains(&bytes, plain_marker.as_bytes()), || {
        "positive control: the plain network's marker is not in the capture (did it see the traffic?)".into()
    });
    f.check(!contains(&bytes, marker.as_bytes()), || {
        "the encrypted network's marker is in the underlay capture".into()
    });
    let _ = plain;
    f.finish();
}

/// Fail-closed, replay and tamper: nothing but sealed, fresh datagrams from
/// a member of the network reaches a container.
#[test]
fn cleartext_injection_replays_and_tampering_never_reach_a_container() {
    let _serial = shared();
    let (mut lab, sec) =
        cluster_with_network(2, "sec", &["--subnet", "198.19.22.0/24", "--encrypted"]);
    let mut f = Findings::new();
    let plain = lab
        .network_create(1, "pl", &["--subnet", "198.19.23.0/24"])
        .expect("plain network");
    lab.wait_network(&[1, 2], "pl").expect("pl everywhere");
    let (s1, _) = attached(&mut lab, 1, "s1", "sec", &[]);
    let (s2, se2) = attached(&mut lab, 2, "s2", "sec", &[]);
    let (p1, _) = attached(&mut lab, 1, "p1", "pl", &[]);
    let (p2, pe2) = attached(&mut lab, 2, "p2", "pl", &[]);
    f.ok(
        "both networks reachable",
        wait_reachable(
            &lab,
            &[(&s1, se2.ip.as_str()), (&p1, pe2.ip.as_str())],
            Duration::from_secs(20),
        )
        .map(|_| ()),
    );

    // Cleartext VXLAN to h2:4789: delivered on the plain network (positive
    // control), never on the encrypted one.
    let l = listener(&lab, &p2, 3);
    f.ok(
        "inject into pl",
        inject_vxlan(&lab, 1, 2, plain.vni, &pe2, "clear-plain"),
    );
    let _ = match received(l) {
        Ok((n, _)) => f.check(n >= 1, || {
            format!(
                "positive control: a cleartext VXLAN injection into the plain network delivered {n}"
            )
        }),
        Err(e) => f.check(false, || format!("listener in p2: {e:#}")),
    };
    let l = listener(&lab, &s2, 3);
    f.ok(
        "inject into sec",
        inject_vxlan(&lab, 1, 2, sec.vni, &se2, "clear-secret"),
    );
    let _ = match received(l) {
        Ok((n, p)) => f.check(n == 0, || {
            format!("cleartext injection into sec delivered {n}: {p:?}")
        }),
        Err(e) => f.check(false, || format!("listener in s2: {e:#}")),
    };

    // Ten real datagrams, captured on the way; then replayed, and tampered.
    let l = listener(&lab, &s2, 4);
    let cap = capture(&lab, "sec.pcap");
    f.ok(
        "send 10 over sec",
        send_from(&lab, &s1, &se2.ip, "real-datagram", 10),
    );
    std::thread::sleep(Duration::from_millis(300));
    stop_capture(&mut f, cap);
    let _ = match received(l) {
        Ok((n, _)) => f.check(n == 10, || format!("s2 received {n} of 10 real datagrams")),
        Err(e) => f.check(false, || format!("listener in s2: {e:#}")),
    };
    let pcap = lab.dir().join("sec.pcap").display().to_string();
    for (what, extra) in [("replayed", vec![]), ("tampered", vec!["--flip", "30"])] {
        let l = listener(&lab, &s2, 3);
        let mut args = vec![
            wire(),
            "replay".into(),
            "--pcap".into(),
            pcap.clone(),
            "--port".into(),
            ENCRYPTED_PORT.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        // From the switch: an attacker on the underlay.
        let out = lab.exec_ok(1, &refs);
        f.ok(
            &format!("{what} datagrams sent"),
            out.map(|o| println!("{what}: {}", o.stdout.trim())),
        );
        let _ = match received(l) {
            Ok((n, p)) => f.check(n == 0, || format!("{what} datagrams delivered {n}: {p:?}")),
            Err(e) => f.check(false, || format!("listener in s2: {e:#}")),
        };
    }
    // The traffic still flows after all that.
    f.ok(
        "sec reachable after the attacks",
        wait_reachable(&lab, &[(&s1, se2.ip.as_str())], Duration::from_secs(5)).map(|_| ()),
    );
    f.finish();
}
