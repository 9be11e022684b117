//! Issue 9 "Names", against real agents in network namespaces: what of the
//! embedded DNS is observable on this base. `endpoint attach` returns the
//! resolver (the network's gateway); each host carrying the network runs
//! its resolver (UDP and TCP sockets on <gateway>:53 in the namespace the
//! network's bridge lives in), and stops it when its last local endpoint
//! of the network goes. Queries from containers need the gateway address
//! on the bridge, which the sandbox work adds; until then they are not
//! tested here (the resolver itself is tested over real sockets in
//! `agent/src/dns/server/tests.rs`).
//!
//! Needs root and the binaries (`cargo build --release --workspace --bins`).

mod common;

use std::time::{Duration, Instant};

use common::*;
use ovl_e2e::{Findings, Lab, shared};
use serde_json::Value;

/// Resolver sockets gone after the host's last endpoint of the network is
/// detached (generous: a reconcile pass, at most a repair tick).
const STOP_BOUND: Duration = Duration::from_secs(10);

/// The `<addr>:53` sockets (UDP, TCP) listening in host k's namespace.
fn dns_sockets(lab: &Lab, k: usize, addr: &str) -> (bool, bool) {
    let want = format!("{addr}:53");
    let listed = |proto: &str| {
        lab.exec_ok(k, &["ss", "-Hln", proto])
            .map(|o| o.stdout.split_whitespace().any(|w| w == want))
            .unwrap_or(false)
    };
    (listed("-u"), listed("-t"))
}

#[test]
fn attach_returns_the_resolver_and_each_host_serves_it_while_it_carries_the_network() {
    let _serial = shared();
    let (mut lab, net) = cluster_with_network(2, "dnsa", &[]);
    let mut f = Findings::new();

    let c1 = lab.add_container(1, "c1").expect("container");
    let args = Lab::attach_args("dnsa", &c1, &["--alias", "web"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = lab.ctl_ok(1, &args).expect("attach c1");
    let v: Value = serde_json::from_str(&out.stdout).expect("attach prints JSON");
    f.check(v["resolver"] == Value::String(net.gateway.clone()), || {
        format!(
            "attach resolver {:?}, want the gateway {}",
            v["resolver"], net.gateway
        )
    });
    let c2 = lab.add_container(2, "c2").expect("container");
    let table = lab
        .ctl_ok(
            2,
            &[
                "endpoint",
                "attach",
                "dnsa",
                "--netns",
                &c2.path_str(),
                "--name",
                "c2",
            ],
        )
        .expect("attach c2 (table output)");
    f.check(
        table.stdout.contains(&format!("resolver {}", net.gateway)),
        || format!("table output names no resolver:\n{}", table.stdout),
    );

    // Both hosts carry the network: both serve UDP and TCP.
    let t = Instant::now();
    let mut up = [(false, false); 2];
    while t.elapsed() < STOP_BOUND {
        up = [
            dns_sockets(&lab, 1, &net.gateway),
            dns_sockets(&lab, 2, &net.gateway),
        ];
        if up.iter().all(|&(u, t)| u && t) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "resolvers listening on both hosts after {:.2?}: {up:?}",
        t.elapsed()
    );
    f.check(up.iter().all(|&(u, t)| u && t), || {
        format!("resolver sockets (udp, tcp) on h1, h2: {up:?}")
    });

    // h1's last endpoint goes: its resolver stops, h2's stays.
    lab.detach(1, "dnsa", &c1.endpoint_name())
        .expect("detach c1");
    let t = Instant::now();
    let mut h1 = (true, true);
    while t.elapsed() < STOP_BOUND {
        h1 = dns_sockets(&lab, 1, &net.gateway);
        if h1 == (false, false) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "h1 resolver gone {:.2?} after the detach: {h1:?}",
        t.elapsed()
    );
    f.check(h1 == (false, false), || {
        format!("h1 still listens after detach: {h1:?}")
    });
    let h2 = dns_sockets(&lab, 2, &net.gateway);
    f.check(h2 == (true, true), || format!("h2 stopped serving: {h2:?}"));
    let log = lab.log_tail(1, 400);
    f.check(
        log.contains("dns resolver started") && log.contains("dns resolver stopped"),
        || "h1's log has no 'dns resolver started/stopped' line".to_string(),
    );
    f.finish();
}
