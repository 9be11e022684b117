//! `ovlctl --format json` output as typed rows (the contract in
//! INTERFACES.md), so a missing or mistyped field is a parse error that
//! names it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde::Deserialize;
use serde_json::Value;

use crate::container::Container;
use crate::{Lab, POLL, wait_until};

/// How long a lab waits for the cluster to converge or a record to spread
/// before giving up (the tests' bounds are checked on the measured time).
pub const PATIENCE: Duration = Duration::from_secs(20);

/// One row of `ovlctl cluster nodes --format json`.
#[derive(Debug, Clone, Deserialize)]
pub struct NodeRow {
    pub id: String,
    pub name: String,
    pub advertise_addr: String,
    pub data_path_addr: String,
    pub gossip_addr: String,
    /// "alive" | "dead" | "left"
    pub status: String,
    pub generation: Value,
    pub is_self: bool,
}

/// `ovlctl cluster status --format json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Status {
    pub node_id: Option<String>,
    pub node_name: Option<String>,
    /// "unclustered" | "joining" | "active"
    pub state: String,
    pub reason: Option<String>,
    pub cluster_id: Option<String>,
    pub advertise_addr: Option<String>,
    pub data_path_addr: Option<String>,
    pub gossip_addr: Option<String>,
    #[serde(default)]
    pub generation: Value,
    pub nodes_alive: Option<u64>,
    pub nodes_total: Option<u64>,
    #[serde(default)]
    pub counters: Value,
    /// "epoch N (fingerprint)": the cluster key in use.
    #[serde(default)]
    pub cluster_key: Option<String>,
}

/// `ovlctl cluster init --format json`.
#[derive(Debug, Clone, Deserialize)]
pub struct InitOutput {
    pub cluster_id: String,
    pub join_token: String,
    pub node_id: String,
}

/// `ovlctl cluster join --format json`.
#[derive(Debug, Clone, Deserialize)]
pub struct JoinOutput {
    pub cluster_id: String,
    pub node_id: String,
    pub via: Value,
}

/// A network object (`network create|ls|inspect --format json`,
/// INTERFACES-3).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct NetworkRow {
    pub name: String,
    pub id: String,
    pub vni: u32,
    pub subnet: String,
    pub gateway: String,
    pub ip_range: Value,
    pub mtu: Value,
    pub encrypted: bool,
    /// "plain" | "encrypted" (fixed at creation).
    pub mode: String,
    pub attachable: bool,
    pub internal: bool,
    pub labels: Value,
    /// "active" | "conflict"
    pub state: String,
    pub reason: Value,
    pub created_by: Value,
    pub created_at_ms: Value,
    /// Endpoints cluster-wide.
    pub endpoints: u64,
}

/// An endpoint object (`endpoint attach|ls --format json`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct EndpointRow {
    pub network: String,
    pub network_id: String,
    pub name: String,
    pub id: String,
    /// Without prefix length.
    pub ip: String,
    pub mac: String,
    /// The owning node's id.
    pub node: String,
    pub node_name: String,
    pub vtep: String,
    pub aliases: Vec<String>,
    /// "alive" | "dead" (the owning node's status)
    pub status: String,
    pub ifname: String,
}

/// One host of a network in `network inspect`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct PeerRow {
    pub node_id: String,
    pub node_name: String,
    pub vtep: String,
    pub status: String,
    pub endpoints: u64,
    pub ranges: Vec<String>,
    /// The host's data-path MTU from its signed record (0: unpublished).
    #[serde(default)]
    pub data_path_mtu: u32,
}

/// `network inspect --format json`: the network object, but with
/// `endpoints` the list of endpoint objects (not the count), plus `peers`.
#[derive(Debug, Clone, Deserialize)]
pub struct NetworkDetail {
    pub name: String,
    pub id: String,
    pub vni: u32,
    pub subnet: String,
    pub gateway: String,
    pub state: String,
    pub mtu: u32,
    /// The largest MTU every member host's data path carries.
    #[serde(default)]
    pub path_mtu: u32,
    /// Set when `--mtu` exceeds `path_mtu`.
    #[serde(default)]
    pub mtu_warning: String,
    pub peers: Vec<PeerRow>,
    pub endpoints: Vec<EndpointRow>,
}

/// `fdb NETWORK --format json`.
#[derive(Debug, Clone, Deserialize)]
pub struct FdbReport {
    /// Whether this host has the network's devices.
    pub local: bool,
    pub entries: Vec<FdbRow>,
}

/// One row of `ovlctl fdb`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct FdbRow {
    /// "fdb" | "neigh" | "flood"
    pub kind: String,
    pub mac: String,
    pub ip: String,
    pub vtep: String,
    /// "ok" | "missing" | "extra"
    pub state: String,
}

/// The IP part of an address that may carry a port (`1.2.3.4:7946` ->
/// `1.2.3.4`).
pub fn ip_part(addr: &str) -> &str {
    match addr.rsplit_once(':') {
        Some((ip, port)) if !ip.contains(':') && port.parse::<u16>().is_ok() => ip,
        _ => addr,
    }
}

fn parse<T: serde::de::DeserializeOwned>(what: &str, v: Value) -> Result<T> {
    let text = v.to_string();
    serde_json::from_value(v).with_context(|| format!("{what} does not match the contract: {text}"))
}

impl Lab {
    /// Host k's `cluster status`.
    pub fn status(&self, k: usize) -> Result<Status> {
        parse("cluster status", self.ctl_json(k, &["cluster", "status"])?)
    }

    /// Host k's `cluster nodes`.
    pub fn nodes(&self, k: usize) -> Result<Vec<NodeRow>> {
        parse("cluster nodes", self.ctl_json(k, &["cluster", "nodes"])?)
    }

    /// `cluster init` on host k.
    pub fn cluster_init(&self, k: usize) -> Result<InitOutput> {
        parse("cluster init", self.ctl_json(k, &["cluster", "init"])?)
    }

    /// `cluster join --token TOKEN SEED...` on host k.
    pub fn cluster_join(&self, k: usize, token: &str, seeds: &[&str]) -> Result<JoinOutput> {
        let mut args = vec!["cluster", "join", "--token", token];
        args.extend_from_slice(seeds);
        parse("cluster join", self.ctl_json(k, &args)?)
    }
}

impl Lab {
    /// Starts the agents of `hosts`, runs `cluster init` on the first and
    /// `cluster join` via it on the others, and waits until every one lists
    /// all of them alive. Returns the init output.
    pub fn start_cluster(&mut self, hosts: &[usize]) -> Result<InitOutput> {
        self.start_cluster_with(hosts, &[])
    }

    /// [`Lab::start_cluster`], every agent started with `extra` flags.
    pub fn start_cluster_with(&mut self, hosts: &[usize], extra: &[&str]) -> Result<InitOutput> {
        for &k in hosts {
            self.start_agent(k, extra)?;
        }
        let init = self.cluster_init(hosts[0])?;
        let seed = self.addr(hosts[0]).to_string();
        for &k in &hosts[1..] {
            self.cluster_join(k, &init.join_token, &[&seed])?;
        }
        self.wait_members(hosts)?;
        Ok(init)
    }

    /// Waits until every host in `hosts` lists exactly those hosts, alive.
    pub fn wait_members(&self, hosts: &[usize]) -> Result<Duration> {
        wait_until(PATIENCE, POLL, || {
            for &v in hosts {
                let rows = self.nodes(v)?;
                let alive: Vec<String> = rows
                    .iter()
                    .filter(|r| r.status == "alive")
                    .map(|r| r.name.clone())
                    .collect();
                ensure!(
                    rows.len() == hosts.len() && alive.len() == hosts.len(),
                    "h{v} lists {} nodes, alive: {alive:?}",
                    rows.len()
                );
            }
            Ok(true)
        })
        .context("waiting for the cluster to converge")
    }

    /// Waits until host `viewer` shows node `name` (`hK`) with `status`.
    pub fn wait_node_status(&self, viewer: usize, name: &str, status: &str) -> Result<Duration> {
        wait_until(PATIENCE, POLL, || {
            let rows = self.nodes(viewer)?;
            let r = rows
                .iter()
                .find(|r| r.name == name)
                .with_context(|| format!("h{viewer} does not list {name}"))?;
            ensure!(
                r.status == status,
                "h{viewer} shows {name} as {:?}, want {status:?}",
                r.status
            );
            Ok(true)
        })
    }

    /// `network create NAME EXTRA...` on host k.
    pub fn network_create(&self, k: usize, name: &str, extra: &[&str]) -> Result<NetworkRow> {
        let mut args = vec!["network", "create", name];
        args.extend_from_slice(extra);
        parse("network create", self.ctl_json(k, &args)?)
    }

    /// Host k's `network ls`.
    pub fn networks(&self, k: usize) -> Result<Vec<NetworkRow>> {
        parse("network ls", self.ctl_json(k, &["network", "ls"])?)
    }

    /// Host k's `network inspect NAME`.
    pub fn network_inspect(&self, k: usize, name: &str) -> Result<NetworkDetail> {
        parse(
            "network inspect",
            self.ctl_json(k, &["network", "inspect", name])?,
        )
    }

    /// Waits until every host in `hosts` lists network `name` as active;
    /// returns how long that took.
    pub fn wait_network(&self, hosts: &[usize], name: &str) -> Result<Duration> {
        wait_until(PATIENCE, POLL, || {
            for &k in hosts {
                let nets = self.networks(k)?;
                let n = nets
                    .iter()
                    .find(|n| n.name == name)
                    .with_context(|| format!("h{k} does not list network {name:?} yet"))?;
                ensure!(n.state == "active", "h{k}: {n:?}");
            }
            Ok(true)
        })
        .with_context(|| format!("waiting for network {name:?} on {hosts:?}"))
    }

    /// Host k's `endpoint ls [--network N]`.
    pub fn endpoints(&self, k: usize, network: Option<&str>) -> Result<Vec<EndpointRow>> {
        let mut args = vec!["endpoint", "ls"];
        if let Some(n) = network {
            args.extend_from_slice(&["--network", n]);
        }
        parse("endpoint ls", self.ctl_json(k, &args)?)
    }

    /// The arguments of `endpoint attach NETWORK --netns <c> [--name
    /// hK-label] EXTRA...` (the name is added unless `extra` has `--name`).
    pub fn attach_args(network: &str, c: &Container, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = ["--format", "json", "endpoint", "attach", network, "--netns"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(c.path_str());
        if !extra.contains(&"--name") {
            args.push("--name".into());
            args.push(c.endpoint_name());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Attaches container `c` to `network` on its host (see
    /// [`Lab::attach_args`]) and returns the endpoint.
    pub fn attach(&self, network: &str, c: &Container, extra: &[&str]) -> Result<EndpointRow> {
        let args = Self::attach_args(network, c, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.ctl_ok(c.host, &args)?;
        let v: Value = serde_json::from_str(&out.stdout)
            .with_context(|| format!("stdout is not JSON: {out}"))?;
        parse("endpoint attach", v)
    }

    /// `endpoint detach NETWORK NAME` on host k.
    pub fn detach(&self, k: usize, network: &str, name: &str) -> Result<()> {
        self.ctl_ok(k, &["endpoint", "detach", network, name])?;
        Ok(())
    }

    /// Host k's `fdb NETWORK`.
    pub fn ovl_fdb(&self, k: usize, network: &str) -> Result<FdbReport> {
        parse("fdb", self.ctl_json(k, &["fdb", network])?)
    }

    /// Waits until every host in `hosts` lists exactly the endpoints with
    /// these names in `network`; returns how long that took.
    pub fn wait_endpoints(
        &self,
        hosts: &[usize],
        network: &str,
        names: &[String],
    ) -> Result<Duration> {
        let mut want: Vec<&str> = names.iter().map(String::as_str).collect();
        want.sort_unstable();
        wait_until(PATIENCE, POLL, || {
            for &k in hosts {
                let rows = self.endpoints(k, Some(network))?;
                let mut got: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
                got.sort_unstable();
                ensure!(got == want, "h{k} lists endpoints {got:?}, want {want:?}");
            }
            Ok(true)
        })
        .with_context(|| format!("waiting for the endpoints of {network:?} on {hosts:?}"))
    }

    /// Waits until the VXLAN device of `vni` on each host in `hosts` holds
    /// exactly the remote entries for `endpoints` (minus that host's own):
    /// an FDB entry MAC -> VTEP, a permanent neighbour entry IP -> MAC, and a
    /// flood entry per remote VTEP. Returns the time per host.
    pub fn wait_dataplane(
        &self,
        hosts: &[usize],
        vni: u32,
        endpoints: &[EndpointRow],
    ) -> Result<BTreeMap<usize, Duration>> {
        let start = Instant::now();
        let mut done = BTreeMap::new();
        wait_until(PATIENCE, POLL, || {
            for &k in hosts {
                if done.contains_key(&k) {
                    continue;
                }
                self.check_dataplane(k, vni, endpoints)?;
                done.insert(k, start.elapsed());
            }
            Ok(true)
        })
        .context("waiting for the data plane to match the endpoints")?;
        Ok(done)
    }

    /// Checks (once) that host k's kernel holds exactly the remote entries
    /// for `endpoints` (see [`Lab::wait_dataplane`]).
    pub fn check_dataplane(&self, k: usize, vni: u32, endpoints: &[EndpointRow]) -> Result<()> {
        let me = self.addr(k).to_string();
        let remote: Vec<&EndpointRow> = endpoints.iter().filter(|e| e.vtep != me).collect();
        let fdb = self.fdb(k, vni)?;
        let neigh = self.neigh(k, vni)?;
        let mut want_fdb: Vec<(String, String)> = remote
            .iter()
            .map(|e| (e.mac.to_lowercase(), e.vtep.clone()))
            .collect();
        let mut vteps: Vec<String> = remote.iter().map(|e| e.vtep.clone()).collect();
        vteps.sort();
        vteps.dedup();
        want_fdb.extend(
            vteps
                .iter()
                .map(|v| (crate::kernel::FLOOD_MAC.to_string(), v.clone())),
        );
        want_fdb.sort();
        let mut got_fdb: Vec<(String, String)> = fdb
            .iter()
            .map(|e| (e.mac.to_lowercase(), e.dst.clone().unwrap_or_default()))
            .collect();
        got_fdb.sort();
        ensure!(
            got_fdb == want_fdb,
            "h{k} ovlvx-{vni} fdb: have {got_fdb:?}, want {want_fdb:?}"
        );
        let mut want_n: Vec<(String, String)> = remote
            .iter()
            .map(|e| (e.ip.clone(), e.mac.to_lowercase()))
            .collect();
        want_n.sort();
        let mut got_n: Vec<(String, String)> = neigh
            .iter()
            .filter(|n| n.is_permanent())
            .map(|n| {
                (
                    n.dst.clone(),
                    n.lladdr.clone().unwrap_or_default().to_lowercase(),
                )
            })
            .collect();
        got_n.sort();
        ensure!(
            got_n == want_n,
            "h{k} ovlvx-{vni} permanent neighbours: have {got_n:?}, want {want_n:?} (all: {neigh:?})"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::ip_part;

    #[test]
    fn ip_part_strips_ports_only() {
        assert_eq!(ip_part("198.18.0.11:7946"), "198.18.0.11");
        assert_eq!(ip_part("198.18.0.11"), "198.18.0.11");
        assert_eq!(ip_part("fd00::1"), "fd00::1");
    }
}
