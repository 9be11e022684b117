//! Issue 11 acceptance, Prometheus metrics: a real Prometheus server
//! (Debian's `prometheus`, from deploy/setup) in a namespace of its own
//! scrapes three real agents over the lab's underlay every second. Through
//! Prometheus's HTTP API the test checks that every target is `up` and
//! that one attach moves the endpoint gauge on every host (local on the
//! attaching host, remote on the others).
//!
//! Each agent's exposition is also fed to `promtool check metrics`: a
//! parse error fails the test; lint findings (OpenMetrics counters read as
//! "no help text" by promtool 2.42) are printed, not fatal.
//!
//! Needs root and the binaries (`cargo build --release --workspace --bins`).

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::*;
use ovl_e2e::{Background, Findings, Lab, POLL, host_addr, shared, wait_until};
use serde_json::Value;

/// Agents on hosts 1-3; Prometheus on host 4 (a plain namespace on the
/// same underlay switch, running no agent).
const AGENTS: [usize; 3] = [1, 2, 3];
const PROM_HOST: usize = 4;
const METRICS_PORT: u16 = 9946;
const PROM_ADDR: &str = "127.0.0.1:9090";
/// Scrapes are 1 s apart: a change shows in Prometheus within ~2 s.
const SEEN_WITHIN: Duration = Duration::from_secs(20);

fn metrics_addr(k: usize) -> String {
    format!("{}:{METRICS_PORT}", host_addr(k))
}

/// `GET http://ADDR/PATH` with curl from host k's namespace.
fn http_get(lab: &Lab, k: usize, url: &str) -> Result<String> {
    let out = lab.exec_ok(k, &["curl", "-sS", "--fail", "--max-time", "5", url])?;
    Ok(out.stdout)
}

/// An instant query through Prometheus's HTTP API: (labels, value) per
/// series.
fn query(lab: &Lab, q: &str) -> Result<Vec<(BTreeMap<String, String>, f64)>> {
    let out = lab.exec_ok(
        PROM_HOST,
        &[
            "curl",
            "-sS",
            "--fail",
            "--max-time",
            "5",
            "-G",
            &format!("http://{PROM_ADDR}/api/v1/query"),
            "--data-urlencode",
            &format!("query={q}"),
        ],
    )?;
    let v: Value = serde_json::from_str(&out.stdout)
        .with_context(|| format!("Prometheus answer is not JSON: {}", out.stdout))?;
    ensure!(v["status"] == "success", "query {q:?}: {v}");
    let rows = v["data"]["result"]
        .as_array()
        .with_context(|| format!("query {q:?}: no result vector: {v}"))?;
    rows.iter()
        .map(|r| {
            let labels = r["metric"]
                .as_object()
                .with_context(|| format!("no labels in {r}"))?
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect();
            let value = r["value"][1]
                .as_str()
                .and_then(|s| s.parse().ok())
                .with_context(|| format!("no value in {r}"))?;
            Ok((labels, value))
        })
        .collect()
}

/// `metric{location}` per agent, keyed by host number, from one query.
fn per_host(lab: &Lab, q: &str) -> Result<BTreeMap<usize, f64>> {
    let mut out = BTreeMap::new();
    for (labels, v) in query(lab, q)? {
        let inst = labels.get("instance").cloned().unwrap_or_default();
        let k = AGENTS
            .iter()
            .copied()
            .find(|k| metrics_addr(*k) == inst)
            .with_context(|| format!("{q}: unknown instance {inst:?}"))?;
        out.insert(k, v);
    }
    Ok(out)
}

/// Checks through Prometheus that `q` has a series for every agent and
/// each value satisfies `want`.
fn every_agent(lab: &Lab, f: &mut Findings, what: &str, q: &str, want: impl Fn(f64) -> bool) {
    if let Some(v) = f.ok(q, per_host(lab, q)) {
        f.check(
            v.len() == AGENTS.len() && v.values().all(|x| want(*x)),
            || format!("every agent {what} ({q}): {v:?}"),
        );
    }
}

fn start_prometheus(lab: &Lab) -> Result<Background> {
    let dir = lab.dir().join("prometheus");
    std::fs::create_dir_all(&dir)?;
    let targets: Vec<String> = AGENTS
        .iter()
        .map(|k| format!("'{}'", metrics_addr(*k)))
        .collect();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
         scrape_configs:\n  - job_name: ovl\n    static_configs:\n      - targets: [{}]\n",
        targets.join(", ")
    );
    let config_path = dir.join("prometheus.yml");
    std::fs::write(&config_path, config)?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &lab.ns(PROM_HOST), "prometheus"])
        .arg(format!("--config.file={}", config_path.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={PROM_ADDR}"));
    Background::spawn(lab, &mut cmd)
}

/// Every agent's /metrics parses (promtool) and lists its counters.
fn check_exposition(lab: &Lab, f: &mut Findings) {
    for k in AGENTS {
        let Some(text) = f.ok(
            &format!("h{k} /metrics"),
            http_get(
                lab,
                PROM_HOST,
                &format!("http://{}/metrics", metrics_addr(k)),
            ),
        ) else {
            continue;
        };
        f.check(text.ends_with("# EOF\n"), || {
            format!("h{k}: exposition does not end with # EOF")
        });
        f.check(text.contains("ovl_gossip_rx_total "), || {
            format!("h{k}: no ovl_gossip_rx_total in:\n{text}")
        });
        let file = lab.dir().join(format!("h{k}.metrics"));
        if f.ok(
            "write exposition",
            std::fs::write(&file, &text).map_err(Into::into),
        )
        .is_none()
        {
            continue;
        }
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("promtool check metrics < {}", file.display()))
            .output();
        if let Some(out) = f.ok("promtool", out.map_err(Into::into)) {
            let code = out.status.code();
            let lint = String::from_utf8_lossy(&out.stderr).lines().count();
            println!("h{k}: promtool check metrics exit {code:?} ({lint} lint lines)");
            // 0 clean, 3 lint findings only; 1 is a parse error.
            f.check(matches!(code, Some(0) | Some(3)), || {
                format!(
                    "h{k}: promtool check metrics exit {code:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        }
    }
}

#[test]
fn prometheus_scrapes_every_agent_and_sees_an_attach_everywhere() {
    let _g = shared();
    let mut f = Findings::new();
    let mut lab = Lab::new(4).expect("lab");
    let t0 = Instant::now();
    for k in AGENTS {
        lab.start_agent(k, &["--metrics-addr", &metrics_addr(k)])
            .expect("agent");
    }
    let init = lab.cluster_init(1).expect("cluster init");
    let seed = host_addr(1).to_string();
    for k in &AGENTS[1..] {
        lab.cluster_join(*k, &init.join_token, &[&seed])
            .expect("cluster join");
    }
    lab.wait_members(&AGENTS).expect("cluster of 3");
    println!("cluster of 3 with metrics formed in {:.2?}", t0.elapsed());

    check_exposition(&lab, &mut f);

    let started = Instant::now();
    let _prom = start_prometheus(&lab).expect("prometheus starts");
    // Every target up: three series of `up`, each 1.
    let took = wait_until(SEEN_WITHIN, POLL, || {
        let up = per_host(&lab, "up")?;
        ensure!(
            up.len() == AGENTS.len() && up.values().all(|v| *v == 1.0),
            "up = {up:?}"
        );
        Ok(true)
    });
    if let Some(t) = f.ok("every target up", took) {
        println!("all 3 targets up in Prometheus {t:.2?} after it started");
    }
    every_agent(
        &lab,
        &mut f,
        "lists 3 alive nodes",
        r#"ovl_nodes{status="alive"}"#,
        |v| v == 3.0,
    );
    every_agent(
        &lab,
        &mut f,
        "has no endpoint before the attach",
        "sum by (instance) (ovl_endpoints)",
        |v| v == 0.0,
    );

    // One attach on h2.
    lab.network_create(1, "prom", &[]).expect("network create");
    lab.wait_network(&AGENTS, "prom")
        .expect("network everywhere");
    let (_c, ep) = attached(&mut lab, 2, "c1", "prom", &[]);
    let attached_at = Instant::now();
    println!(
        "attached {} ({}) on h2 ({:.2?} since Prometheus started)",
        ep.name,
        ep.ip,
        started.elapsed()
    );
    let seen = wait_until(SEEN_WITHIN, POLL, || {
        let local = per_host(&lab, r#"ovl_endpoints{location="local"}"#)?;
        let remote = per_host(&lab, r#"ovl_endpoints{location="remote"}"#)?;
        let want_local = BTreeMap::from([(1, 0.0), (2, 1.0), (3, 0.0)]);
        let want_remote = BTreeMap::from([(1, 1.0), (2, 0.0), (3, 1.0)]);
        ensure!(
            local == want_local && remote == want_remote,
            "local {local:?} remote {remote:?}"
        );
        Ok(true)
    });
    if let Some(t) = f.ok("the attach shows on every host", seen) {
        println!("endpoint gauges moved on all 3 hosts in Prometheus {t:.2?} after the attach");
    }
    every_agent(&lab, &mut f, "counts 1 network", "ovl_networks", |v| {
        v == 1.0
    });
    // The attach waited for h1 and h3 to program it: h2 timed it.
    let latency = wait_until(SEEN_WITHIN, POLL, || {
        let c = per_host(&lab, "ovl_attach_programmed_latency_seconds_count")?;
        ensure!(c.get(&2) == Some(&1.0), "counts {c:?}");
        Ok(true)
    });
    f.ok("h2's attach latency histogram has the attach", latency);
    every_agent(
        &lab,
        &mut f,
        "timed reconcile passes",
        "ovl_reconcile_pass_duration_seconds_count",
        |v| v >= 1.0,
    );
    every_agent(
        &lab,
        &mut f,
        "received gossip bytes",
        "ovl_gossip_rx_bytes_total",
        |v| v > 0.0,
    );
    println!(
        "checks done {:.2?} after the attach, {:.2?} in all",
        attached_at.elapsed(),
        t0.elapsed()
    );
    // Panics with the lab alive: its drop prints every agent's log.
    f.finish();
}
