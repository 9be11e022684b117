//! Issue 9 "Names", against real agents in network namespaces.
//! `endpoint attach` returns the resolver (the network's gateway); each
//! host carrying the network runs its resolver (UDP and TCP sockets on
//! <gateway>:53 inside the network's sandbox, where its bridge holds the
//! gateway address), and stops it when its last local endpoint of the
//! network goes. Containers query it with `dig`: names cluster-wide,
//! aliases round robin, PTR, no names of other networks, names gone after
//! a detach.
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

/// The `<addr>:53` sockets (UDP, TCP) listening in the sandbox of network
/// `vni` on host k (none when the host has no sandbox for it).
fn dns_sockets(lab: &Lab, k: usize, vni: u32, addr: &str) -> (bool, bool) {
    let want = format!("{addr}:53");
    let sb = format!("--net={}", lab.sandbox(k, vni));
    let listed = |proto: &str| {
        std::process::Command::new("nsenter")
            .args([sb.as_str(), "ss", "-Hln", proto])
            .output()
            .map(|o| {
                o.status.success()
                    && String::from_utf8_lossy(&o.stdout)
                        .split_whitespace()
                        .any(|w| w == want)
            })
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
            dns_sockets(&lab, 1, net.vni, &net.gateway),
            dns_sockets(&lab, 2, net.vni, &net.gateway),
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
        h1 = dns_sockets(&lab, 1, net.vni, &net.gateway);
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
    let h2 = dns_sockets(&lab, 2, net.vni, &net.gateway);
    f.check(h2 == (true, true), || format!("h2 stopped serving: {h2:?}"));
    let log = lab.log_tail(1, 400);
    f.check(
        log.contains("dns resolver started") && log.contains("dns resolver stopped"),
        || "h1's log has no 'dns resolver started/stopped' line".to_string(),
    );
    f.finish();
}

/// `dig @server ARGS` from container `c`: the answer section (`+short`)
/// and the status (NOERROR, NXDOMAIN, ...).
fn dig(lab: &Lab, c: &ovl_e2e::Container, server: &str, args: &[&str]) -> (Vec<String>, String) {
    let at = format!("@{server}");
    let mut cmd = vec!["dig", at.as_str(), "+tries=1", "+time=2"];
    cmd.extend_from_slice(args);
    let out = match lab.exec_in(c, &cmd) {
        Ok(o) => o.stdout,
        Err(e) => return (Vec::new(), format!("dig failed: {e:#}")),
    };
    let status = out
        .split("status: ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap_or("none")
        .to_string();
    let answers = out
        .split(";; ANSWER SECTION:")
        .nth(1)
        .map(|sec| {
            sec.lines()
                .skip(1)
                .take_while(|l| !l.trim().is_empty())
                .filter_map(|l| l.split_whitespace().last().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    (answers, status)
}

/// The fake upstream resolver: dnsmasq on an "outside" host.
const UPSTREAM: &str = "198.18.0.250";

/// `dig` again every 50 ms until `done` holds or `within` passed: the last
/// answer, and how long it took.
fn dig_until(
    lab: &Lab,
    c: &ovl_e2e::Container,
    server: &str,
    args: &[&str],
    within: Duration,
    done: impl Fn(&(Vec<String>, String)) -> bool,
) -> ((Vec<String>, String), Duration) {
    let t = Instant::now();
    loop {
        let got = dig(lab, c, server, args);
        if done(&got) || t.elapsed() >= within {
            return (got, t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn containers_resolve_names_and_aliases_cluster_wide_at_their_own_gateway() {
    let _serial = shared();
    let mut lab = Lab::new(3).expect("lab");
    let outside = lab
        .add_outside("dns", UPSTREAM.parse().expect("address"))
        .expect("outside host");
    let dnsmasq = ovl_e2e::Background::spawn(
        &lab,
        std::process::Command::new("ip").args([
            "netns",
            "exec",
            &outside,
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--user=root",
            "--group=root",
            "--pid-file=",
            "--bind-interfaces",
            &format!("--listen-address={UPSTREAM}"),
            "--address=/outside.test/198.18.0.99",
        ]),
    )
    .expect("dnsmasq");
    for k in 1..=3 {
        lab.start_agent(k, &["--dns-upstream", UPSTREAM])
            .expect("agent");
    }
    let init = lab.cluster_init(1).expect("cluster init");
    let seed = lab.addr(1).to_string();
    for k in 2..=3 {
        lab.cluster_join(k, &init.join_token, &[&seed])
            .expect("cluster join");
    }
    lab.wait_members(&[1, 2, 3]).expect("members");
    let net = lab.network_create(1, "names", &[]).expect("network");
    lab.wait_network(&[1, 2, 3], "names")
        .expect("network everywhere");
    lab.network_create(1, "elsewhere", &[])
        .expect("second network");
    lab.wait_network(&[1, 2, 3], "elsewhere")
        .expect("second network everywhere");
    let mut lab = lab;
    let mut f = Findings::new();
    let mut eps = Vec::new();
    let mut cs = Vec::new();
    for k in 1..=3 {
        let c = lab.add_container(k, &format!("w{k}")).expect("container");
        let ep = lab
            .attach("names", &c, &["--alias", "web"])
            .expect("attach");
        eps.push(ep);
        cs.push(c);
    }
    let other = lab.add_container(2, "x").expect("container");
    lab.attach("elsewhere", &other, &["--name", "hidden"])
        .expect("attach to the other network");
    let names: Vec<String> = eps.iter().map(|e| e.name.clone()).collect();
    lab.wait_endpoints(&[1, 2, 3], "names", &names)
        .expect("endpoints everywhere");
    let gw = net.gateway.clone();
    let c1 = &cs[0];
    let ip_of = |i: usize| eps[i].ip.clone();

    // c1 (h1) resolves w2 (h2) at its own gateway.
    let (got, took) = dig_until(
        &lab,
        c1,
        &gw,
        &[&names[1], "A"],
        Duration::from_secs(5),
        |g| g.0 == vec![ip_of(1)],
    );
    println!(
        "c1 resolved {} -> {:?} ({}) after {took:.2?}",
        names[1], got.0, got.1
    );
    f.check(got.0 == vec![ip_of(1)], || {
        format!("{} from c1: {got:?}, want {}", names[1], ip_of(1))
    });

    // The alias held by three endpoints on three hosts: each comes first.
    let mut firsts = std::collections::BTreeSet::new();
    for _ in 0..9 {
        let (a, status) = dig(&lab, c1, &gw, &["web", "A"]);
        f.check(a.len() == 3, || {
            format!("web: {a:?} ({status}), want 3 addresses")
        });
        if let Some(first) = a.first() {
            firsts.insert(first.clone());
        }
    }
    let all: std::collections::BTreeSet<String> = (0..3).map(ip_of).collect();
    println!("first answers for web over 9 queries: {firsts:?}");
    f.check(firsts == all, || {
        format!("first answers {firsts:?}, want each of {all:?}")
    });

    // PTR, and a name of another network is NXDOMAIN.
    let (ptr, status) = dig(&lab, c1, &gw, &["-x", &ip_of(1)]);
    f.check(ptr == vec![format!("{}.", names[1])], || {
        format!("PTR {}: {ptr:?} ({status})", ip_of(1))
    });
    let (a, status) = dig(&lab, c1, &gw, &["hidden", "A"]);
    f.check(a.is_empty() && status == "NXDOMAIN", || {
        format!("hidden (other network): {a:?} {status}")
    });
    // The other host's containers are answered by their own host's resolver.
    let (a, status) = dig(&lab, &cs[2], &gw, &[&names[0], "A"]);
    f.check(a == vec![ip_of(0)], || {
        format!("{} from w3: {a:?} ({status})", names[0])
    });

    // A name ovl does not hold goes to the host's upstream resolver.
    let (a, status) = dig(&lab, c1, &gw, &["outside.test", "A"]);
    f.check(a == vec!["198.18.0.99".to_string()], || {
        format!("outside.test through the upstream: {a:?} ({status})")
    });

    // A detach: the name is gone within 2 s.
    lab.detach(2, "names", &names[1]).expect("detach w2");
    let ((_, status), took) = dig_until(
        &lab,
        c1,
        &gw,
        &[&names[1], "A"],
        Duration::from_secs(2),
        |g| g.1 == "NXDOMAIN",
    );
    println!(
        "{} gone from c1's resolver {took:.2?} after the detach ({status})",
        names[1]
    );
    f.check(status == "NXDOMAIN", || {
        format!("{} after detach: {status}", names[1])
    });

    // A host that fails: its names go while it is hidden, and come back
    // with it. `web` then answers only what is left (w1; w2 detached).
    lab.kill_agent(3).expect("kill -9 h3's agent");
    let (seen, took) = dig_until(
        &lab,
        c1,
        &gw,
        &[&names[2], "A"],
        Duration::from_secs(30),
        |g| g.1 == "NXDOMAIN",
    );
    println!(
        "{} (h3, agent killed) gone from c1's resolver after {took:.2?} ({})",
        names[2], seen.1
    );
    f.check(seen.1 == "NXDOMAIN", || {
        format!("{} while h3 is down: {seen:?}", names[2])
    });
    let (web, status) = dig(&lab, c1, &gw, &["web", "A"]);
    f.check(web == vec![ip_of(0)], || {
        format!(
            "web while h3 is down: {web:?} ({status}), want only {}",
            ip_of(0)
        )
    });
    lab.restart_agent(3).expect("h3's agent again");
    let (seen, took) = dig_until(
        &lab,
        c1,
        &gw,
        &[&names[2], "A"],
        Duration::from_secs(30),
        |g| g.0 == vec![ip_of(2)],
    );
    println!(
        "{} back in c1's resolver {took:.2?} after h3's agent restarted",
        names[2]
    );
    f.check(seen.0 == vec![ip_of(2)], || {
        format!("{} after h3 returned: {seen:?}", names[2])
    });
    let _ = dnsmasq.stop(libc::SIGTERM, Duration::from_secs(2));
    f.finish();
}
