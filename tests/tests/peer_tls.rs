//! Issue 6 acceptance for the peer channel (7946/tcp), against real agents in
//! network namespaces: TLS 1.3 mutually authenticated by node identity keys.
//!
//! - an underlay capture taken during attaches shows no endpoint name,
//!   alias, IP or MAC, while the records do reach the other host;
//! - a member calling under another node's id is refused and counted, and a
//!   raw replay of a real call's bytes has no effect;
//! - a process without a member's certificate (the old plaintext gRPC, or
//!   TLS with a key no member has) is refused.
//!
//! The attacker is `ovl-peer-probe` (tests/src/bin), which uses the agent's
//! own peer client with a key and claims of the test's choosing.
//!
//! Needs root, tcpdump and the binaries (`cargo build --release --workspace
//! --bins`). Each test builds its own lab and holds `ovl_e2e::shared()`.

mod common;

use std::path::{Path, PathBuf};

use std::time::Duration;

use anyhow::{Context, Result};
use common::*;
use ovl_e2e::{Findings, Lab, binary, shared, wait_until};
use serde_json::Value;

const PEER_PORT: u16 = 7946;
const MARKER_NAME: &str = "ovlmarker7q";
const MARKER_ALIAS: &str = "ovlaliasz9";

/// Host k's counter `name` (`cluster status --format json`).
fn counter(lab: &Lab, k: usize, name: &str) -> u64 {
    lab.status(k)
        .ok()
        .and_then(|s| s.counters.get(name).and_then(Value::as_u64))
        .unwrap_or(0)
}

fn node_id(lab: &Lab, k: usize) -> String {
    lab.status(k)
        .expect("cluster status")
        .node_id
        .expect("an active node has an id")
}

fn peer_addr(k: usize) -> String {
    format!("{}:{PEER_PORT}", ovl_e2e::host_addr(k))
}

/// What one probe run reported.
#[derive(Debug)]
struct Probe {
    ok: bool,
    detail: String,
    received: Option<u64>,
}

/// Runs `ovl-peer-probe ARGS` in host k's namespace.
fn probe(lab: &Lab, k: usize, args: &[&str]) -> Result<Probe> {
    let bin = binary("ovl-peer-probe")?;
    let bin = bin.to_string_lossy().into_owned();
    let mut cmd = vec![bin.as_str()];
    cmd.extend_from_slice(args);
    let out = lab.exec(k, &cmd)?;
    let line = out
        .stdout
        .lines()
        .last()
        .with_context(|| format!("probe printed nothing: {out}"))?;
    let v: Value =
        serde_json::from_str(line).with_context(|| format!("probe output is not JSON: {out}"))?;
    let ok = v["ok"].as_bool().unwrap_or(false);
    anyhow::ensure!(
        ok == out.success(),
        "probe exit status disagrees with its report: {out}"
    );
    Ok(Probe {
        ok,
        detail: v["detail"].as_str().unwrap_or_default().to_string(),
        received: v["received"].as_u64(),
    })
}

fn key_of(lab: &Lab, k: usize) -> String {
    lab.state_dir(k)
        .join("identity.pk8")
        .to_string_lossy()
        .into_owned()
}

fn ipam_file(lab: &Lab, k: usize, network_id: &str) -> PathBuf {
    lab.state_dir(k)
        .join("ipam")
        .join(format!("{network_id}.json"))
}

fn read_or_empty(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_default()
}

/// Runs a probe from host `from` that h1 must refuse with `why` in the
/// error, and checks that h1's counter `counted` moved.
fn expect_refused(
    lab: &Lab,
    f: &mut Findings,
    from: usize,
    args: &[&str],
    what: &str,
    why: &str,
    counted: &str,
) {
    let before = counter(lab, 1, counted);
    let p = probe(lab, from, args).expect("probe");
    println!("{what}: {p:?}");
    f.check(!p.ok, || format!("{what} was accepted: {p:?}"));
    f.check(p.detail.contains(why), || {
        format!("{what}: the refusal does not say {why:?}: {p:?}")
    });
    if let Some(n) = f.ok(
        &format!("h1 counts {what}"),
        counter_moves(lab, 1, counted, before),
    ) {
        println!("h1 {counted} {before} -> {n}");
    }
}

/// [`expect_refused`] for Pull, Notify and RequestSpace, each counted as a
/// refused call.
fn refused_for_every_call(
    lab: &Lab,
    f: &mut Findings,
    from: usize,
    args: &[&str],
    who: &str,
    why: &str,
) {
    for call in ["pull", "notify", "space"] {
        let args = [args, &["--call", call]].concat();
        let what = format!("a {call} {who}");
        expect_refused(lab, f, from, &args, &what, why, "peer_call_refused");
    }
}

/// How often host k's agent logged a donation of address space.
fn donations(lab: &Lab, k: usize) -> usize {
    std::fs::read_to_string(lab.log_path(k))
        .unwrap_or_default()
        .matches("address space donated")
        .count()
}

/// Waits until `host`'s counter `name` exceeds `before`; returns its value.
fn counter_moves(lab: &Lab, k: usize, name: &str, before: u64) -> Result<u64> {
    wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        Ok(counter(lab, k, name) > before)
    })
    .with_context(|| format!("h{k}'s {name} stayed at {before}"))?;
    Ok(counter(lab, k, name))
}

#[test]
fn underlay_capture_during_attaches_shows_no_marker() {
    let _g = shared();
    let mut f = Findings::new();
    let (mut lab, net) = cluster_with_network(2, "tlsnet", &[]);
    let pcap = lab.dir().join("underlay.pcap");
    // Every port of the underlay switch: all traffic between the hosts.
    let cap = underlay_capture(&lab, "underlay.pcap", &[]);

    // h1 owns the pool; h2's attach asks it for space (RequestSpace), and
    // each host pulls the other's endpoint (Notify, Pull).
    let (_c1, ep1) = attached(
        &mut lab,
        1,
        "m1",
        &net.name,
        &["--name", MARKER_NAME, "--alias", MARKER_ALIAS],
    );
    let name2 = format!("{MARKER_NAME}-b");
    let (_c2, ep2) = attached(
        &mut lab,
        2,
        "m2",
        &net.name,
        &["--name", &name2, "--alias", MARKER_ALIAS],
    );
    let seen = wait_until(LONG, Duration::from_millis(50), || {
        let on2 = lab.endpoints(2, Some(&net.name))?;
        let on1 = lab.endpoints(1, Some(&net.name))?;
        Ok(on2
            .iter()
            .any(|e| e.name == MARKER_NAME && e.aliases.iter().any(|a| a == MARKER_ALIAS))
            && on1.iter().any(|e| e.name == name2))
    });
    f.ok(
        "each host lists the other's marker endpoint (the records crossed the captured underlay)",
        seen,
    );
    std::thread::sleep(Duration::from_millis(500));
    stop_capture(&mut f, cap);

    let bytes = std::fs::read(&pcap).expect("read the capture");
    let tcp_packets = pcap_count(&pcap, &format!("tcp port {PEER_PORT}"));
    let udp_packets = pcap_count(&pcap, &format!("udp port {PEER_PORT}"));
    println!(
        "capture: {} bytes; {tcp_packets} packets on {PEER_PORT}/tcp, {udp_packets} on {PEER_PORT}/udp",
        bytes.len()
    );
    f.check(tcp_packets > 0, || {
        format!("the capture has no {PEER_PORT}/tcp packets: it did not see the peer channel")
    });
    let markers = [
        MARKER_NAME.to_string(),
        MARKER_ALIAS.to_string(),
        name2.clone(),
        ep1.ip.clone(),
        ep2.ip.clone(),
        ep1.mac.to_lowercase(),
        ep1.mac.to_uppercase(),
        net.name.clone(),
    ];
    for m in &markers {
        f.check(!contains(&bytes, m.as_bytes()), || {
            format!("the underlay capture contains {m:?} in clear")
        });
    }
    f.finish();
}

#[test]
fn peer_calls_under_another_nodes_id_are_refused_and_replays_do_nothing() {
    let _g = shared();
    let mut f = Findings::new();
    let (lab, net) = cluster_with_network(3, "tlsreplay", &[]);
    let (id1, id2) = (node_id(&lab, 1), node_id(&lab, 2));
    let h3_key = key_of(&lab, 3);
    let h1 = peer_addr(1);
    let ipam = ipam_file(&lab, 1, &net.id);
    let ring0 = read_or_empty(&ipam);
    f.check(!ring0.is_empty(), || {
        format!(
            "h1 (the network's creator) has no IPAM file {}",
            ipam.display()
        )
    });

    // A member (h3's key) expecting h2's identity at h1's address: the TLS
    // pin refuses h1's certificate, and h1 sees the aborted handshake.
    let pinned_to_h2 = ["--key", &h3_key, "--addr", &h1, "--expect", &id2];
    expect_refused(
        &lab,
        &mut f,
        3,
        &[&pinned_to_h2[..], &["--call", "pull"]].concat(),
        "h3's key expecting h2 at h1's address",
        "not the node called",
        "peer_tls_refused",
    );

    // h3's key claiming to be h2: refused for every call, counted, no effect.
    let claiming_h2 = [
        "--key",
        &h3_key,
        "--addr",
        &h1,
        "--expect",
        &id1,
        "--claim",
        &id2,
        "--network",
        &net.id,
    ];
    refused_for_every_call(
        &lab,
        &mut f,
        3,
        &claiming_h2,
        "with h3's key claiming h2",
        "claims node",
    );
    f.check(read_or_empty(&ipam) == ring0, || {
        "h1's address space changed after refused RequestSpace calls".into()
    });
    let donations0 = donations(&lab, 1);
    f.check(donations0 == 0, || {
        format!("h1 donated address space {donations0} times to refused callers")
    });

    // The same member under its own id is served: the probe and the key
    // are real, so the refusals above are about the claim.
    let p = probe(
        &lab,
        3,
        &[
            "--key", &h3_key, "--addr", &h1, "--expect", &id1, "--call", "pull",
        ],
    )
    .expect("probe");
    println!("h3's key as itself, pull: {p:?}");
    f.check(p.ok, || format!("h3's own pull was refused: {p:?}"));

    // A real RequestSpace, recorded on the wire, then replayed raw: the
    // replay is a new TLS handshake the recorded bytes cannot finish.
    let rec = lab.dir().join("space.bytes");
    let rec_s = rec.to_string_lossy().into_owned();
    let p = probe(
        &lab,
        3,
        &[
            "--key",
            &h3_key,
            "--addr",
            &h1,
            "--expect",
            &id1,
            "--call",
            "space",
            "--network",
            &net.id,
            "--record",
            &rec_s,
        ],
    )
    .expect("probe");
    println!("h3 real RequestSpace (recorded): {p:?}");
    f.check(p.ok, || format!("the recorded RequestSpace failed: {p:?}"));
    let recorded = read_or_empty(&rec);
    println!("recorded {} bytes from the client", recorded.len());
    f.check(!recorded.is_empty(), || "nothing was recorded".into());
    f.check(!contains(&recorded, net.id.as_bytes()), || {
        "the recorded request shows the network id in clear".into()
    });
    // h1 logs every donation: the real call made one, a replay must not.
    let donations1 = donations(&lab, 1);
    f.check(donations1 > donations0, || {
        "the real RequestSpace made no donation on h1 (the replay check would be vacuous)".into()
    });
    let tls1 = counter(&lab, 1, "peer_tls_refused");
    let refused1 = counter(&lab, 1, "peer_call_refused");
    let served1 = counter(&lab, 1, "peer_hello_served");
    const REPLAYS: u64 = 3;
    for i in 0..REPLAYS {
        let p = probe(&lab, 3, &["--addr", &h1, "--replay", &rec_s]).expect("probe");
        println!("replay {i}: {p:?}");
        f.check(!p.ok, || format!("replay {i} reported success: {p:?}"));
        f.check(p.received.is_some(), || {
            format!("replay {i}: no report of the answer: {p:?}")
        });
    }
    if let Ok(n) = counter_moves(&lab, 1, "peer_tls_refused", tls1 + REPLAYS - 1) {
        println!("h1 peer_tls_refused {tls1} -> {n} after {REPLAYS} replays");
    } else {
        f.check(false, || {
            format!(
                "h1's peer_tls_refused went {tls1} -> {} after {REPLAYS} replays",
                counter(&lab, 1, "peer_tls_refused")
            )
        });
    }
    std::thread::sleep(Duration::from_millis(500));
    f.check(donations(&lab, 1) == donations1, || {
        format!(
            "a replayed RequestSpace made h1 donate again ({donations1} -> {} donations)",
            donations(&lab, 1)
        )
    });
    f.check(counter(&lab, 1, "peer_call_refused") == refused1, || {
        "a replay reached the service (peer_call_refused moved)".into()
    });
    f.check(counter(&lab, 1, "peer_hello_served") == served1, || {
        "a replay reached the service (peer_hello_served moved)".into()
    });
    f.finish();
}

#[test]
fn strangers_without_a_member_certificate_are_refused() {
    let _g = shared();
    let mut f = Findings::new();
    let (lab, net) = cluster_with_network(2, "tlsstranger", &[]);
    let id1 = node_id(&lab, 1);
    let h1 = peer_addr(1);
    let ipam = ipam_file(&lab, 1, &net.id);
    let ring0 = read_or_empty(&ipam);

    // The plaintext HTTP/2 gRPC of agents before TLS.
    // What the old client says varies ("transport error", "h2 protocol
    // error"): it only sees the TLS listener's alert. The clear reason is on
    // the server, with the caller's address.
    expect_refused(
        &lab,
        &mut f,
        2,
        &["--addr", &h1, "--plaintext"],
        "a plaintext pull",
        "plaintext pull: ",
        "peer_tls_refused",
    );
    let log = std::fs::read_to_string(lab.log_path(1)).unwrap_or_default();
    let from = format!("peer={}:", ovl_e2e::host_addr(2));
    let line = log
        .lines()
        .find(|l| l.contains("peer TLS connection refused") && l.contains(&from));
    println!("h1 logs: {line:?}");
    f.check(line.is_some_and(|l| l.contains("plaintext HTTP/2")), || {
        format!("h1's log has no TLS refusal naming {from} and saying it was plaintext HTTP/2")
    });

    // TLS with a key no member has: the handshake passes (a joiner must be
    // able to say Hello), the calls are refused as not a member.
    let stranger = [
        "--key",
        "new",
        "--addr",
        &h1,
        "--expect",
        &id1,
        "--network",
        &net.id,
    ];
    refused_for_every_call(
        &lab,
        &mut f,
        2,
        &stranger,
        "with a stranger's key",
        "not a member",
    );
    f.check(read_or_empty(&ipam) == ring0, || {
        "a stranger's RequestSpace changed h1's address space".into()
    });
    f.finish();
}

/// Issue 8, peer server (7946/tcp): a stranger's call is refused from its
/// headers (its body is never read), a member's request over its method's
/// cap is refused as it arrives, both counted, without growing the agent;
/// connections from one address are capped (counted), the slots come back
/// when they close, and members' traffic carries on meanwhile.
#[test]
fn the_peer_server_bounds_what_a_caller_can_make_it_hold() {
    let (mut lab, net) = cluster_with_network(3, "lim", &[]);
    let h1 = peer_addr(1);
    let expect = node_id(&lab, 1);
    let mut f = Findings::new();

    let rss_before = rss_kib(&lab, 1);
    let gate_before = counter(&lab, 1, "peer_gate_not_member");
    let large_before = counter(&lab, 1, "peer_request_too_large");
    // 2 KiB is far below the service-wide decode limit but over
    // RequestSpace's own cap: the cap is per method.
    for (who, key, size, why) in [
        ("a stranger", "new".to_string(), 1 << 20, "not a member"),
        ("a member", key_of(&lab, 2), 1 << 20, "too large"),
        ("a member", key_of(&lab, 2), 2048, "too large"),
    ] {
        let size_arg = size.to_string();
        for _ in 0..20 {
            let p = probe(
                &lab,
                2,
                &[
                    "--key", &key, "--addr", &h1, "--expect", &expect, "--call", "big", "--size",
                    &size_arg,
                ],
            )
            .expect("probe");
            if p.ok || !p.detail.contains(why) {
                f.check(false, || {
                    format!(
                        "a {size}-byte request from {who}: ok={} {} (want {why:?})",
                        p.ok, p.detail
                    )
                });
                break;
            }
        }
    }
    let rss_after = rss_kib(&lab, 1);
    let gated = counter(&lab, 1, "peer_gate_not_member") - gate_before;
    let large = counter(&lab, 1, "peer_request_too_large") - large_before;
    println!(
        "h1 RSS {rss_before} -> {rss_after} KiB after 60 oversized requests; \
         peer_gate_not_member +{gated}, peer_request_too_large +{large}"
    );
    f.check(rss_after < rss_before + 16 * 1024, || {
        format!("h1's RSS grew from {rss_before} to {rss_after} KiB")
    });
    f.check(gated >= 20, || {
        format!("h1 counted {gated} stranger calls at the gate, want >= 20")
    });
    f.check(large >= 40, || {
        format!("h1 counted {large} oversized member requests, want >= 40")
    });

    let limited_before = counter(&lab, 1, "peer_conn_limited");
    let p = probe(&lab, 3, &["--addr", &h1, "--conns", "40"]).expect("probe");
    let held = p.received.unwrap_or(0);
    let limited = counter(&lab, 1, "peer_conn_limited") - limited_before;
    println!("40 connections from h3's address: {held} held, peer_conn_limited +{limited}");
    f.check(p.ok && (1..=8).contains(&held), || {
        format!(
            "h1 held {held} of 40 connections from one address: {}",
            p.detail
        )
    });
    f.check(limited >= 32, || {
        format!("h1 counted {limited} refused connections, want >= 32")
    });
    // The slots came back, and members' calls were served meanwhile.
    let again = probe(&lab, 3, &["--addr", &h1, "--conns", "4"]).expect("probe");
    f.check(again.received.unwrap_or(0) >= 1, || {
        format!("slots not freed: {}", again.detail)
    });
    let (_c1, e1) = attached(&mut lab, 1, "c1", "lim", &[]);
    let (_c2, e2) = attached(&mut lab, 2, "c2", "lim", &[]);
    f.ok(
        "endpoints attached on h1 and h2 reach each other's data plane",
        lab.wait_dataplane(&[1, 2], net.vni, &[e1, e2]).map(|_| ()),
    );
    f.finish();
}
