//! Issue 10, the CNI plugin `ovl` (`ovl-cni`), driven by the spec against
//! real agents in network namespaces: the environment and stdin a runtime
//! gives a plugin, the result or error JSON it reads back (cnitool is not
//! packaged, so this file is the driver). ADD with and without a static
//! IP/MAC, the result's interface, address, gateway, route and DNS;
//! traffic between two hosts; CHECK after ADD passes and after the address
//! is flushed fails; DEL without a namespace or prevResult, twice; VERSION;
//! STATUS; GC; a missing network and an unreachable agent give the spec's
//! codes and leave nothing behind.
//!
//! Needs root and the binaries (`cargo build --release --workspace --bins`).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use ovl_e2e::agent::binary;
use ovl_e2e::cmd::{self, CmdOutput};
use ovl_e2e::kernel::host_veth;
use ovl_e2e::{Container, EndpointRow, Findings, Lab, PATIENCE, shared};
use serde_json::{Value, json};

/// One plugin run: `command` with `env` on host k, `conf` on stdin.
struct Call<'a> {
    command: &'a str,
    container_id: &'a str,
    netns: &'a str,
    args: &'a str,
}

fn cni(lab: &Lab, k: usize, call: &Call, conf: &Value) -> (CmdOutput, Value) {
    let dir = lab.host_dir(k);
    let conf_path = dir.join("cni-conf.json");
    std::fs::write(&conf_path, conf.to_string()).expect("writing the config");
    let plugin = binary("ovl-cni").expect("ovl-cni");
    let mut c = Command::new("ip");
    c.args([
        "netns",
        "exec",
        &lab.ns(k),
        "sh",
        "-c",
        r#"exec "$0" < "$1""#,
    ])
    .arg(&plugin)
    .arg(&conf_path)
    .env("CNI_COMMAND", call.command)
    .env("CNI_CONTAINERID", call.container_id)
    .env("CNI_NETNS", call.netns)
    .env("CNI_IFNAME", "eth0")
    .env("CNI_ARGS", call.args)
    .env("CNI_PATH", "/opt/cni/bin")
    .env_remove("OVL_SOCKET");
    let out = cmd::run(&mut c, Duration::from_secs(30)).expect("running ovl-cni");
    let v = serde_json::from_str(out.stdout.trim()).unwrap_or(Value::Null);
    (out, v)
}

fn conf(lab: &Lab, k: usize, network: &str) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": network,
        "type": "ovl",
        "network": network,
        "socket": lab.socket(k),
    })
}

fn cid(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

fn path(c: &Container) -> String {
    c.path_str()
}

/// Whether host k lists an endpoint named `name` in `network`.
fn listed(lab: &Lab, k: usize, network: &str, name: &str) -> bool {
    lab.endpoints(k, Some(network))
        .expect("endpoint ls")
        .iter()
        .any(|e| e.name == name)
}

/// The endpoint holding `ip` in `network`, as host k lists it.
fn endpoint_at(lab: &Lab, k: usize, network: &str, ip: &str) -> Option<EndpointRow> {
    lab.endpoints(k, Some(network))
        .expect("endpoint ls")
        .into_iter()
        .find(|e| e.ip == ip)
}

/// The address of an ADD result.
fn result_ip(r: &Value) -> String {
    r["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .unwrap_or_default()
        .to_string()
}

#[test]
fn the_cni_plugin_attaches_checks_and_deletes_by_the_spec() {
    let _serial = shared();
    let (mut lab, net) = cluster_with_network(2, "web", &[]);
    let mut f = Findings::new();
    let c1 = lab.add_container(1, "c1").expect("container");
    let c2 = lab.add_container(2, "c2").expect("container");
    let (id1, id2) = (cid(1), cid(2));

    // ADD: an address from ovl's IPAM; the result as the spec shapes it.
    let (out, r1) = cni(
        &lab,
        1,
        &Call {
            command: "ADD",
            container_id: &id1,
            netns: &path(&c1),
            args: "IgnoreUnknown=1;K8S_POD_NAME=web1",
        },
        &conf(&lab, 1, "web"),
    );
    f.check(out.success(), || format!("ADD c1: {out}"));
    println!("ADD c1 result: {r1}");
    let addr1 = r1["ips"][0]["address"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let ip1 = addr1.split('/').next().unwrap_or_default().to_string();
    f.check(
        in_subnet(&ip1, &net.subnet) && addr1.ends_with(&format!("/{}", prefix_len(&net.subnet))),
        || format!("ADD c1 address {addr1:?}, want one in {}", net.subnet),
    );
    f.check(r1["cniVersion"] == "1.0.0", || {
        format!("result version {}", r1["cniVersion"])
    });
    f.check(
        r1["interfaces"][0]["name"] == "eth0"
            && r1["interfaces"][0]["sandbox"] == path(&c1).as_str()
            && r1["ips"][0]["interface"] == 0,
        || format!("result interfaces {}", r1["interfaces"]),
    );
    f.check(r1["ips"][0]["gateway"] == net.gateway.as_str(), || {
        format!(
            "result gateway {}, want {}",
            r1["ips"][0]["gateway"], net.gateway
        )
    });
    f.check(r1["dns"]["nameservers"] == json!([net.gateway]), || {
        format!("result dns {}", r1["dns"])
    });
    f.check(
        r1["routes"] == json!([{"dst": net.subnet}, {"dst": "0.0.0.0/0", "gw": net.gateway}]),
        || format!("result routes {}", r1["routes"]),
    );
    let route = lab
        .exec_in(&c1, &["ip", "route", "show", "default"])
        .map(|o| o.stdout)
        .unwrap_or_default();
    f.check(
        route.contains(&format!("via {} dev eth0", net.gateway)),
        || format!("c1 has no default route via the gateway: {route:?}"),
    );
    let addrs = lab.addrs_in(&c1.name, "eth0").unwrap_or_default();
    f.check(addrs.contains(&addr1), || {
        format!("c1 eth0 addresses {addrs:?}, want {addr1}")
    });
    let ep1 = endpoint_at(&lab, 1, "web", &ip1);
    f.check(
        ep1.as_ref()
            .is_some_and(|e| e.name.starts_with("cni-") && e.aliases.iter().any(|a| a == "web1")),
        || format!("endpoint cni-... with alias web1 (K8S_POD_NAME) at {ip1}, got {ep1:?}"),
    );
    let name1 = ep1.as_ref().map(|e| e.name.clone()).unwrap_or_default();

    // ADD with IP and MAC from CNI_ARGS (as podman passes them).
    let want_ip = net
        .subnet
        .rsplit_once('.')
        .map(|(a, _)| format!("{a}.200"))
        .unwrap_or_default();
    let want_mac = "02:42:00:00:00:c8";
    let (out, r2) = cni(
        &lab,
        2,
        &Call {
            command: "ADD",
            container_id: &id2,
            netns: &path(&c2),
            args: &format!("IgnoreUnknown=1;IP={want_ip};MAC={want_mac}"),
        },
        &conf(&lab, 2, "web"),
    );
    f.check(out.success(), || format!("ADD c2: {out}"));
    let ip2 = r2["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .unwrap_or_default()
        .to_string();
    f.check(
        ip2 == want_ip && r2["interfaces"][0]["mac"] == want_mac,
        || format!("ADD c2 with IP {want_ip} MAC {want_mac}: got {r2}"),
    );
    let t = Instant::now();
    let mut reached = false;
    while !reached && t.elapsed() < PATIENCE {
        reached = lab.ping_once(&c1, &ip2).unwrap_or(false);
    }
    f.check(reached, || format!("c1 (h1) cannot ping c2 (h2) at {ip2}"));

    // CHECK passes after ADD, fails once the address is gone.
    let check = |lab: &Lab| {
        cni(
            lab,
            1,
            &Call {
                command: "CHECK",
                container_id: &id1,
                netns: &path(&c1),
                args: "",
            },
            &json!({"cniVersion": "1.0.0", "name": "web", "type": "ovl",
                    "socket": lab.socket(1), "prevResult": r1}),
        )
    };
    let (out, _) = check(&lab);
    f.check(out.success() && out.stdout.trim().is_empty(), || {
        format!("CHECK after ADD: {out}")
    });
    lab.exec_in_ok(&c1, &["ip", "addr", "flush", "dev", "eth0"])
        .expect("flush");
    let (out, e) = check(&lab);
    println!("CHECK after the flush: {e}");
    f.check(
        !out.success()
            && e["code"].as_u64().is_some_and(|c| c >= 100)
            && e["details"].as_str().is_some_and(|d| d.contains(&addr1)),
        || format!("CHECK after the address was flushed: {out}"),
    );

    // DEL with no namespace and no prevResult (containerd), twice.
    let del = |lab: &Lab| {
        cni(
            lab,
            1,
            &Call {
                command: "DEL",
                container_id: &id1,
                netns: "",
                args: "",
            },
            &conf(lab, 1, "web"),
        )
        .0
    };
    let out = del(&lab);
    f.check(out.success() && out.stdout.trim().is_empty(), || {
        format!("DEL c1: {out}")
    });
    let veth = ep1.as_ref().map(|e| host_veth(&e.id)).unwrap_or_default();
    f.check(lab.ovl_link(1, &veth).ok().flatten().is_none(), || {
        format!("{veth} still on h1 after DEL")
    });
    let t = Instant::now();
    while listed(&lab, 2, "web", &name1) && t.elapsed() < PATIENCE {
        std::thread::sleep(Duration::from_millis(100));
    }
    f.check(!listed(&lab, 2, "web", &name1), || {
        format!("h2 still lists {name1} after DEL")
    });
    let out = del(&lab);
    f.check(out.success(), || format!("second DEL: {out}"));

    // VERSION.
    let (out, v) = cni(
        &lab,
        1,
        &Call {
            command: "VERSION",
            container_id: "",
            netns: "",
            args: "",
        },
        &json!({"cniVersion": "1.0.0"}),
    );
    f.check(
        out.success() && v["supportedVersions"] == json!(["1.0.0", "1.1.0"]),
        || format!("VERSION: {out}"),
    );

    // STATUS: ready, and not when the agent cannot be reached.
    let status = |lab: &Lab, socket: &Path| {
        cni(
            lab,
            1,
            &Call {
                command: "STATUS",
                container_id: "",
                netns: "",
                args: "",
            },
            &json!({"cniVersion": "1.1.0", "name": "web", "type": "ovl", "socket": socket}),
        )
    };
    let (out, _) = status(&lab, &lab.socket(1));
    f.check(out.success(), || format!("STATUS: {out}"));
    let nowhere = lab.host_dir(1).join("no-agent.sock");
    let (out, e) = status(&lab, &nowhere);
    f.check(!out.success() && e["code"] == 50, || {
        format!("STATUS with no agent: {out}")
    });

    // Errors with the spec's codes, and nothing left behind.
    let c3 = lab.add_container(1, "c3").expect("container");
    let id3 = cid(3);
    let before = lab.endpoints(1, Some("web")).expect("endpoint ls").len();
    let add3 = |lab: &Lab, conf: &Value| {
        cni(
            lab,
            1,
            &Call {
                command: "ADD",
                container_id: &id3,
                netns: &path(&c3),
                args: "",
            },
            conf,
        )
    };
    let (out, e) = add3(&lab, &conf(&lab, 1, "nope"));
    println!("ADD to a missing network: {e}");
    f.check(
        !out.success() && e["code"] == 7 && e["msg"].as_str().is_some_and(|m| m.contains("nope")),
        || format!("ADD naming a missing network: {out}"),
    );
    let mut bad = conf(&lab, 1, "web");
    bad["socket"] = json!(nowhere);
    let (out, e) = add3(&lab, &bad);
    println!("ADD with no agent: {e}");
    f.check(
        !out.success()
            && e["code"] == 11
            && e["msg"]
                .as_str()
                .is_some_and(|m| m.contains("cannot reach the agent")),
        || format!("ADD with no agent: {out}"),
    );
    let mut old = conf(&lab, 1, "web");
    old["cniVersion"] = json!("0.3.1");
    let (out, e) = add3(&lab, &old);
    f.check(!out.success() && e["code"] == 1, || {
        format!("ADD with cniVersion 0.3.1: {out}")
    });
    let links = lab.links_in(&c3.name).unwrap_or_default();
    f.check(links.iter().all(|l| l.ifname == "lo"), || {
        format!("c3 has interfaces after failed ADDs: {links:?}")
    });
    let after = lab.endpoints(1, Some("web")).expect("endpoint ls").len();
    f.check(after == before, || {
        format!("failed ADDs left endpoints: {before} before, {after} after")
    });

    // GC: c3's attachment, no longer listed, goes; c4's on the same host
    // and c2's on h2, listed, stay.
    let (out, r3) = add3(&lab, &conf(&lab, 1, "web"));
    f.check(out.success(), || format!("ADD c3: {out}"));
    let c4 = lab.add_container(1, "c4").expect("container");
    let id4 = cid(4);
    let (out, r4) = cni(
        &lab,
        1,
        &Call {
            command: "ADD",
            container_id: &id4,
            netns: &path(&c4),
            args: "",
        },
        &conf(&lab, 1, "web"),
    );
    f.check(out.success(), || format!("ADD c4: {out}"));
    let name3 = endpoint_at(&lab, 1, "web", &result_ip(&r3)).map(|e| e.name);
    let name4 = endpoint_at(&lab, 1, "web", &result_ip(&r4)).map(|e| e.name);
    let name2 = endpoint_at(&lab, 1, "web", &ip2).map(|e| e.name);
    f.check(
        name3.is_some() && name4.is_some() && name2.is_some(),
        || format!("before GC: c3 {name3:?} c4 {name4:?} c2 {name2:?}"),
    );
    let mut gc = conf(&lab, 1, "web");
    gc["cniVersion"] = json!("1.1.0");
    let gc_call = Call {
        command: "GC",
        container_id: "",
        netns: "",
        args: "",
    };
    let (out, e) = cni(&lab, 1, &gc_call, &gc);
    f.check(!out.success() && e["code"] == 7, || {
        format!("GC without cni.dev/valid-attachments: {out}")
    });
    gc["cni.dev/valid-attachments"] = json!([
        {"containerID": id2, "ifname": "eth0"},
        {"containerID": id4, "ifname": "eth0"},
    ]);
    let (out, _) = cni(&lab, 1, &gc_call, &gc);
    f.check(out.success(), || format!("GC: {out}"));
    for (what, name, want) in [
        ("c3", &name3, false),
        ("c4", &name4, true),
        ("c2", &name2, true),
    ] {
        let name = name.clone().unwrap_or_default();
        f.check(listed(&lab, 1, "web", &name) == want, || {
            format!("after GC {what} ({name}) listed: want {want}")
        });
    }
    f.finish();
}
