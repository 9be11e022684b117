//! Issue #6 acceptance, table side, against real agents in namespaces: an
//! endpoint row is used only if its owner could have written it honestly.
//! A member (h3) that attaches with another endpoint's MAC is refused; a
//! member that serves forged rows through the real peer API (a foreign
//! VTEP, an IP outside its ranges, a stolen MAC) changes no other host's
//! FDB, and traffic to the victim still reaches the victim.
//!
//! The forged rows are written into h3's own table while its agent is
//! stopped (`ovl-table-forge`, tests/src/bin), so the agent itself serves
//! them when it comes back, as it serves its honest rows.

mod common;

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use common::{attached, cluster_with_network};
use ovl_e2e::{Findings, Lab, POLL, host_veth, mac_for_ip, wait_until};

fn counter(lab: &Lab, k: usize, name: &str) -> u64 {
    lab.status(k)
        .ok()
        .and_then(|s| s.counters.get(name).and_then(|v| v.as_u64()))
        .unwrap_or(0)
}

/// A free address in one of `ranges` (CIDRs), not in `used`, past the
/// first few (network, gateway).
fn free_in(ranges: &[String], used: &[String]) -> Result<String> {
    for r in ranges {
        let (base, len) = r.split_once('/').context("range without /")?;
        let base: Ipv4Addr = base.parse()?;
        let len: u32 = len.parse()?;
        let size = 1u32 << (32 - len);
        for off in 5..size.saturating_sub(1) {
            let ip = Ipv4Addr::from(u32::from(base) + off).to_string();
            if !used.contains(&ip) {
                return Ok(ip);
            }
        }
    }
    anyhow::bail!("no free address in {ranges:?}")
}

#[test]
fn a_member_cannot_take_over_another_endpoints_mac_ip_or_vtep() {
    let (mut lab, net) = cluster_with_network(3, "own", &[]);
    let (c1, e1) = attached(&mut lab, 1, "c1", "own", &[]);
    let (c2, e2) = attached(&mut lab, 2, "c2", "own", &[]);
    let (_c3, e3) = attached(&mut lab, 3, "c3", "own", &[]);
    lab.wait_dataplane(&[1, 2, 3], net.vni, &[e1.clone(), e2.clone(), e3.clone()])
        .expect("data plane programmed");
    let mut f = Findings::new();

    // 1. attach --mac with a MAC another host's endpoint holds.
    let c4 = lab.add_container(3, "c4").expect("container");
    let path = c4.path_str();
    let out = lab
        .ctl(
            3,
            &[
                "endpoint", "attach", "own", "--netns", &path, "--mac", &e1.mac,
            ],
        )
        .expect("ovlctl runs");
    let err = out.one_line_error();
    println!(
        "attach --mac {} on h3: exit {:?}, {:?}",
        e1.mac,
        out.code(),
        err
    );
    f.check(out.code() == Some(1), || {
        format!("attach --mac stolen: {out}")
    });
    f.check(
        err.as_ref()
            .is_ok_and(|l| l.contains("already used") && l.contains(&e1.name)),
        || {
            format!(
                "attach --mac stolen: want one clear error line naming {}: {out}",
                e1.name
            )
        },
    );
    let count = lab.endpoints(1, Some("own")).map(|v| v.len()).unwrap_or(0);
    f.check(count == 3, || {
        format!("h1 lists {count} endpoints after the refused attach, want 3")
    });

    // 2. Forged rows served by h3 through the peer API.
    let detail = lab.network_inspect(1, "own").expect("inspect");
    let ranges_of = |name: &str| {
        detail
            .peers
            .iter()
            .find(|p| p.node_name == name)
            .map(|p| p.ranges.clone())
            .unwrap_or_default()
    };
    let used: Vec<String> = [&e1, &e2, &e3].iter().map(|e| e.ip.clone()).collect();
    let in_h3 = free_in(&ranges_of(&lab.node_name(3)), &used).expect("an h3 address");
    let mut used2 = used.clone();
    used2.push(in_h3.clone());
    let in_h3_b = free_in(&ranges_of(&lab.node_name(3)), &used2).expect("another h3 address");
    let in_h1 = free_in(&ranges_of(&lab.node_name(1)), &used).expect("an h1 address");
    let h1_vtep = lab.addr(1).to_string();
    let h3_vtep = lab.addr(3).to_string();
    let forged = [
        // (name, id, ip, mac, vtep)
        (
            "fg-vtep",
            "f1000000000000000000000000000001",
            in_h3.clone(),
            "02:aa:00:00:00:01".to_string(),
            h1_vtep.clone(),
        ),
        (
            "fg-range",
            "f2000000000000000000000000000002",
            in_h1.clone(),
            mac_for_ip(&in_h1).expect("mac"),
            h3_vtep.clone(),
        ),
        (
            "fg-mac",
            "f3000000000000000000000000000003",
            in_h3_b.clone(),
            e1.mac.clone(),
            h3_vtep.clone(),
        ),
    ];
    lab.stop_agent(3).expect("stop h3");
    let tool = ovl_e2e::binary("ovl-table-forge").expect("forge tool");
    let table = lab.state_dir(3).join("table.pb");
    for (i, (name, id, ip, mac, vtep)) in forged.iter().enumerate() {
        let out = std::process::Command::new(&tool)
            .args([
                "--table",
                &table.display().to_string(),
                "--network",
                &net.id,
                "--id",
                id,
            ])
            .args(["--name", name, "--ip", ip, "--mac", mac, "--vtep", vtep])
            .output()
            .expect("run forge");
        f.check(out.status.success(), || format!("forging {name}: {out:?}"));
        // A device of the row's name in the network's sandbox keeps h3's
        // own reconciler from withdrawing the rows as orphans.
        let peer = format!("fgpeer{i}");
        f.ok(
            "veth for a forged row",
            lab.exec_sandbox_ok(
                3,
                net.vni,
                &[
                    "ip",
                    "link",
                    "add",
                    &host_veth(id),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &peer,
                ],
            )
            .map(|_| ()),
        );
    }
    let refused_before = counter(&lab, 2, "records_refused");
    lab.start_agent(3, &[]).expect("restart h3");

    let names: Vec<&str> = forged.iter().map(|r| r.0).collect();
    let seen = wait_until(Duration::from_secs(20), POLL, || {
        let rows = lab.endpoints(2, Some("own"))?;
        for n in &names {
            let row = rows.iter().find(|r| r.name == *n);
            ensure!(
                row.is_some_and(|r| r.status.starts_with("refused:")),
                "h2 shows {n} as {:?}",
                row.map(|r| r.status.clone())
            );
        }
        Ok(true)
    });
    f.ok(
        "h2 lists the forged rows as refused",
        seen.map(|t| println!("forged rows shown refused on h2 after {t:.2?}")),
    );
    if let Ok(rows) = lab.endpoints(2, Some("own")) {
        for r in rows.iter().filter(|r| r.name.starts_with("fg-")) {
            println!(
                "h2: {} {} {} vtep {}: {}",
                r.name, r.ip, r.mac, r.vtep, r.status
            );
        }
    }
    let refused_after = counter(&lab, 2, "records_refused");
    println!("h2 records_refused: {refused_before} -> {refused_after}");
    f.check(refused_after >= refused_before + 3, || {
        format!("h2 counted {refused_before} -> {refused_after} refused rows, want +3")
    });

    // Let two reconcile passes run, then look at the kernels.
    std::thread::sleep(Duration::from_secs(5));
    for k in [1, 2] {
        let fdb = lab.fdb(k, net.vni).unwrap_or_default();
        let victim: Vec<String> = fdb
            .iter()
            .filter(|e| e.mac == e1.mac && e.is_remote())
            .map(|e| e.dst.clone().unwrap_or_default())
            .collect();
        if k == 2 {
            f.check(victim == vec![h1_vtep.clone()], || {
                format!(
                    "h2's FDB sends {} to {victim:?}, want only {h1_vtep}",
                    e1.mac
                )
            });
        } else {
            f.check(victim.is_empty(), || {
                format!(
                    "h1's FDB sends its own endpoint's MAC {} to {victim:?}",
                    e1.mac
                )
            });
        }
        for (name, _, _, mac, _) in &forged[..2] {
            f.check(!fdb.iter().any(|e| e.mac == *mac), || {
                format!("h{k}'s FDB holds forged {name}'s MAC {mac}")
            });
        }
        let neigh = lab.neigh(k, net.vni).unwrap_or_default();
        for (name, _, ip, _, _) in &forged {
            f.check(!neigh.iter().any(|n| n.dst == *ip), || {
                format!("h{k}'s neighbour table holds forged {name}'s IP {ip}")
            });
        }
    }
    let echos_before = lab.icmp_in_echos(&c1).unwrap_or(0);
    let reached = lab.ping_once(&c2, &e1.ip).unwrap_or(false);
    let echos_after = lab.icmp_in_echos(&c1).unwrap_or(0);
    println!(
        "c2 -> c1 ({}) after the forgeries: reply {reached}, c1 InEchos {echos_before} -> {echos_after}",
        e1.ip
    );
    f.check(reached && echos_after > echos_before, || {
        format!("traffic to the victim did not reach it: reply {reached}, InEchos {echos_before} -> {echos_after}")
    });
    f.finish();
}

/// Issue #6, "IPAM ring entries change only by their owner or by a grant
/// the donor signed": h3 publishes a ring view in which it owns h1's block
/// one version up, signed with its own key, plus an endpoint row in that
/// block. No other host takes the entry: h1's endpoint stays reachable,
/// h3's row stays refused, and the forgery is counted.
#[test]
fn a_member_cannot_steal_a_third_hosts_address_block() {
    let (mut lab, net) = cluster_with_network(3, "ring", &[]);
    let (c1, e1) = attached(&mut lab, 1, "c1", "ring", &[]);
    let (c2, e2) = attached(&mut lab, 2, "c2", "ring", &[]);
    let (_c3, e3) = attached(&mut lab, 3, "c3", "ring", &[]);
    lab.wait_dataplane(&[1, 2, 3], net.vni, &[e1.clone(), e2.clone(), e3.clone()])
        .expect("data plane programmed");
    let mut f = Findings::new();
    let detail = lab.network_inspect(2, "ring").expect("inspect");
    let names: Vec<String> = (0..=3)
        .map(|k| {
            if k == 0 {
                String::new()
            } else {
                lab.node_name(k)
            }
        })
        .collect();
    let ranges_of = |d: &ovl_e2e::NetworkDetail, k: usize| {
        d.peers
            .iter()
            .find(|p| p.node_name == names[k])
            .map(|p| p.ranges.clone())
            .unwrap_or_default()
    };
    let h1_ranges = ranges_of(&detail, 1);
    // h1's block holding its endpoint.
    let e1_ip: Ipv4Addr = e1.ip.parse().expect("ip");
    let block = h1_ranges
        .iter()
        .find(|r| {
            r.parse::<ipnetwork::Ipv4Network>()
                .is_ok_and(|b| b.contains(e1_ip))
        })
        .cloned()
        .expect("h1 holds the block of its endpoint");
    let used: Vec<String> = [&e1, &e2, &e3].iter().map(|e| e.ip.clone()).collect();
    let stolen_ip = free_in(std::slice::from_ref(&block), &used).expect("a free h1 address");
    println!(
        "h3 forges {block} (h1's, holding {}) and a row at {stolen_ip}",
        e1.ip
    );

    lab.stop_agent(3).expect("stop h3");
    let tool = ovl_e2e::binary("ovl-table-forge").expect("forge tool");
    let table = lab.state_dir(3).join("table.pb");
    let key = lab.state_dir(3).join("identity.pk8");
    let out = std::process::Command::new(&tool)
        .args([
            "--table",
            &table.display().to_string(),
            "--network",
            &net.id,
        ])
        .args(["--steal", &block, "--key", &key.display().to_string()])
        .output()
        .expect("run forge");
    println!("{}", String::from_utf8_lossy(&out.stdout).trim());
    f.check(out.status.success(), || {
        format!("forging the ring: {out:?}")
    });
    let id = "f4000000000000000000000000000004";
    let out = std::process::Command::new(&tool)
        .args([
            "--table",
            &table.display().to_string(),
            "--network",
            &net.id,
        ])
        .args(["--id", id, "--name", "fg-steal", "--ip", &stolen_ip])
        .args(["--mac", &mac_for_ip(&stolen_ip).expect("mac")])
        .args(["--vtep", &lab.addr(3).to_string()])
        .output()
        .expect("run forge");
    f.check(out.status.success(), || format!("forging the row: {out:?}"));
    f.ok(
        "veth for the forged row",
        lab.exec_sandbox_ok(
            3,
            net.vni,
            &[
                "ip",
                "link",
                "add",
                &host_veth(id),
                "type",
                "veth",
                "peer",
                "name",
                "fgpeer9",
            ],
        )
        .map(|_| ()),
    );
    let forged_before = [1, 2].map(|k| counter(&lab, k, "ipam_forged"));
    lab.start_agent(3, &[]).expect("restart h3");

    let counted = wait_until(Duration::from_secs(20), POLL, || {
        for (i, k) in [1, 2].into_iter().enumerate() {
            let c = counter(&lab, k, "ipam_forged");
            ensure!(c > forged_before[i], "h{k} ipam_forged still {c}");
        }
        Ok(true)
    });
    f.ok(
        "h1 and h2 count the forged ring entry",
        counted.map(|t| println!("forgery counted on h1 and h2 after {t:.2?}")),
    );
    std::thread::sleep(Duration::from_secs(3));
    for k in [1, 2] {
        let d = lab.network_inspect(k, "ring").expect("inspect");
        let h1 = ranges_of(&d, 1);
        let h3 = ranges_of(&d, 3);
        println!("h{k}: h1 holds {h1:?}, h3 holds {h3:?}");
        f.check(h1.contains(&block) && !h3.contains(&block), || {
            format!("h{k} moved {block} away from h1: h1 {h1:?}, h3 {h3:?}")
        });
        let rows = lab.endpoints(k, Some("ring")).unwrap_or_default();
        let row = rows.iter().find(|r| r.name == "fg-steal");
        f.check(
            row.is_some_and(|r| r.status.starts_with("refused:")),
            || format!("h{k} shows fg-steal as {:?}", row.map(|r| r.status.clone())),
        );
        let e1_row = rows.iter().find(|r| r.name == e1.name);
        f.check(
            e1_row.is_some_and(|r| !r.status.starts_with("refused:")),
            || {
                format!(
                    "h{k} shows h1's endpoint as {:?}",
                    e1_row.map(|r| r.status.clone())
                )
            },
        );
        let neigh = lab.neigh(k, net.vni).unwrap_or_default();
        f.check(!neigh.iter().any(|n| n.dst == stolen_ip), || {
            format!("h{k}'s neighbour table holds the forged row's IP {stolen_ip}")
        });
    }
    let echos_before = lab.icmp_in_echos(&c1).unwrap_or(0);
    let reached = lab.ping_once(&c2, &e1.ip).unwrap_or(false);
    let echos_after = lab.icmp_in_echos(&c1).unwrap_or(0);
    println!(
        "c2 -> c1 ({}) after the forgery: reply {reached}, c1 InEchos {echos_before} -> {echos_after}",
        e1.ip
    );
    f.check(reached && echos_after > echos_before, || {
        format!("traffic to the victim did not reach it: reply {reached}, InEchos {echos_before} -> {echos_after}")
    });
    f.finish();
}

/// Issue #6, "Network clashes cannot be won by forging an older
/// `created_at`": h3, a member, publishes (as itself, through the real peer
/// API) a network named like h1's, back-dated to `created_at_ms = 0`, and
/// claims it saw its own at 0 and h1's never. h1 and h2 saw h1's first, so
/// two votes to one: every other host keeps h1's network under the name,
/// lists the forged one in conflict, attaches by name into h1's network,
/// and counts the forgery (`network_backdated`).
#[test]
fn a_member_cannot_win_a_network_name_by_back_dating_its_own() {
    let (mut lab, net) = cluster_with_network(3, "prod", &[]);
    let mut f = Findings::new();
    let forged_id = "f5000000000000000000000000000005";
    lab.stop_agent(3).expect("stop h3");
    let tool = ovl_e2e::binary("ovl-table-forge").expect("forge tool");
    let table = lab.state_dir(3).join("table.pb");
    let out = std::process::Command::new(&tool)
        .args(["--table", &table.display().to_string()])
        .args(["--clash", "prod", "--id", forged_id, "--vni", "7777"])
        .args(["--subnet", "198.19.77.0/24"])
        .output()
        .expect("run forge");
    println!("{}", String::from_utf8_lossy(&out.stdout).trim());
    f.check(out.status.success(), || {
        format!("forging the network: {out:?}")
    });
    let before: Vec<u64> = [1, 2]
        .iter()
        .map(|&k| counter(&lab, k, "network_backdated"))
        .collect();
    lab.start_agent(3, &[]).expect("restart h3");
    let t = std::time::Instant::now();

    let listed = common::wait_each(&[1, 2], t, Duration::from_secs(20), |k| {
        let rows = lab.networks(k)?;
        let named: Vec<_> = rows.iter().filter(|r| r.name == "prod").collect();
        let victim = named.iter().find(|r| r.id == net.id);
        let forged = named.iter().find(|r| r.id == forged_id);
        let (Some(v), Some(fg)) = (victim, forged) else {
            return Ok(false);
        };
        let reason = fg.reason.as_str().unwrap_or_default();
        ensure!(
            v.state == "active" && fg.state == "conflict" && reason.contains("\"prod\""),
            "h{k}: h1's prod is {} and the forged one {} ({reason:?})",
            v.state,
            fg.state
        );
        Ok(true)
    });
    if let Some(t) = f.ok("h1 and h2 list the forged prod in conflict", listed) {
        println!("forged prod listed in conflict: {}", common::per_host(&t));
    }
    for k in [1, 2] {
        if let Ok(rows) = lab.networks(k) {
            for r in rows.iter().filter(|r| r.name == "prod") {
                println!(
                    "h{k}: prod {} {} created_at_ms {} {}",
                    r.id, r.state, r.created_at_ms, r.reason
                );
            }
        }
        let d = lab.network_inspect(k, "prod");
        if let Some(d) = f.ok(&format!("h{k} network inspect prod"), d) {
            f.check(d.id == net.id && d.state == "active", || {
                format!(
                    "h{k}: inspect prod resolves to {} ({}), want h1's {}",
                    d.id, d.state, net.id
                )
            });
        }
    }
    // h3's own agent, outvoted once it holds the others' witnesses, agrees.
    let h3 = wait_until(Duration::from_secs(10), POLL, || {
        let d = lab.network_inspect(3, "prod")?;
        ensure!(d.id == net.id, "h3: inspect prod resolves to {}", d.id);
        Ok(true)
    });
    if let Some(t) = f.ok("h3 resolves prod to h1's network too", h3) {
        println!("h3 (the forger's own agent) resolves prod to h1's after {t:.2?}");
    }

    let (_c2, e2) = attached(&mut lab, 2, "c2", "prod", &[]);
    println!(
        "h2 attached to prod: {} in network {}",
        e2.ip, e2.network_id
    );
    f.check(e2.network_id == net.id, || {
        format!(
            "h2's attach to prod joined {}, want h1's {}",
            e2.network_id, net.id
        )
    });
    f.check(common::in_subnet(&e2.ip, &net.subnet), || {
        format!("h2's endpoint {} is not in h1's {}", e2.ip, net.subnet)
    });

    for (i, k) in [1, 2].into_iter().enumerate() {
        let after = counter(&lab, k, "network_backdated");
        println!("h{k} network_backdated: {} -> {after}", before[i]);
        f.check(after == before[i] + 1, || {
            format!(
                "h{k} counted {} -> {after} back-dated networks, want +1",
                before[i]
            )
        });
    }
    f.finish();
}
