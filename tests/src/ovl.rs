//! `ovlctl --format json` output as typed rows (the contract in
//! INTERFACES.md), so a missing or mistyped field is a parse error that
//! names it.

use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::Value;

use crate::Lab;

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
