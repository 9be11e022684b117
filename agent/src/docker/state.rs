//! What the Docker plugin remembers across restarts of the agent and of
//! dockerd (Docker replays nothing: RUNTIMES.md): which Docker network is
//! which ovl network, which addresses its IPAM handed out before an
//! endpoint used them, and which Docker endpoint is which ovl endpoint.
//! Sans-IO: the file is read and written by the caller (`persist`).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// The state file, in the agent's state directory.
pub const STATE_FILE: &str = "docker-plugin.json";

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginState {
    /// Docker network id → the ovl network it stands for on this host.
    pub networks: BTreeMap<String, DockerNetwork>,
    /// Addresses `RequestAddress` took that no endpoint holds yet.
    pub reservations: BTreeMap<Ipv4Addr, Reservation>,
    /// Docker endpoint id → its ovl endpoint.
    pub endpoints: BTreeMap<String, DockerEndpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerNetwork {
    /// The ovl network's name.
    pub ovl: String,
    /// Its subnet, which is also the IPAM pool id Docker names.
    pub subnet: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The ovl network's name.
    pub ovl: String,
    /// The ovl endpoint id the address is allocated to.
    pub endpoint: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerEndpoint {
    /// The Docker network id.
    pub network: String,
    pub ovl: String,
    /// The ovl endpoint id.
    pub endpoint: String,
    pub ip: Ipv4Addr,
    pub mac: String,
    /// Joined: the ovl endpoint exists (its address is no longer a
    /// reservation).
    pub joined: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error(
        "Docker network {0} is not an ovl network this host knows (was it created before the plugin state was lost?); recreate it"
    )]
    UnknownNetwork(String),
    #[error(
        "no ovl network stands for IPAM pool {0}: create the Docker network with -d ovl --ipam-driver ovl"
    )]
    UnknownPool(String),
    #[error(
        "address {0} was not handed out by ovl's IPAM: create the Docker network with --ipam-driver ovl"
    )]
    NotReserved(Ipv4Addr),
    #[error(
        "subnet {subnet} is already the Docker network {other} (ovl network {ovl:?}) on this host"
    )]
    SubnetTaken {
        subnet: String,
        other: String,
        ovl: String,
    },
    #[error("endpoint {0} is unknown to ovl")]
    UnknownEndpoint(String),
}

/// The plugin answers Docker with the message alone (`{"Err": "..."}`).
impl From<StateError> for String {
    fn from(e: StateError) -> Self {
        e.to_string()
    }
}

impl PluginState {
    pub fn parse(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // Plain data with string keys: serializing cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// The ovl network a Docker network id stands for.
    pub fn network(&self, id: &str) -> Result<&DockerNetwork, StateError> {
        self.networks
            .get(id)
            .ok_or_else(|| StateError::UnknownNetwork(short(id)))
    }

    /// The ovl network serving IPAM pool `pool` (a subnet).
    pub fn ovl_of_pool(&self, pool: &str) -> Result<&str, StateError> {
        self.networks
            .values()
            .find(|n| n.subnet == pool)
            .map(|n| n.ovl.as_str())
            .ok_or_else(|| StateError::UnknownPool(pool.to_string()))
    }

    /// Binds Docker network `id` to ovl network `ovl` on `subnet`. A
    /// second Docker network on the same subnet would share its pool, so
    /// it is refused; the same binding again (a retry) is fine.
    pub fn bind_network(&mut self, id: &str, ovl: &str, subnet: &str) -> Result<(), StateError> {
        if let Some((other, n)) = self
            .networks
            .iter()
            .find(|(other, n)| n.subnet == subnet && other.as_str() != id)
        {
            return Err(StateError::SubnetTaken {
                subnet: subnet.to_string(),
                other: short(other),
                ovl: n.ovl.clone(),
            });
        }
        self.networks.insert(
            id.to_string(),
            DockerNetwork {
                ovl: ovl.to_string(),
                subnet: subnet.to_string(),
            },
        );
        Ok(())
    }

    /// Whether a Docker network still uses the pool.
    pub fn pool_in_use(&self, pool: &str) -> bool {
        self.networks.values().any(|n| n.subnet == pool)
    }
}

/// Docker's ids are 64 hex characters; logs and errors show 12, as
/// `docker network ls` does.
pub fn short(id: &str) -> String {
    id.chars().take(12).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_through_its_file_format() {
        let mut s = PluginState::default();
        s.bind_network("n1", "web", "198.18.100.0/24").unwrap();
        s.reservations.insert(
            "198.18.100.2".parse().unwrap(),
            Reservation {
                ovl: "web".into(),
                endpoint: "00".repeat(16),
            },
        );
        s.endpoints.insert(
            "e1".into(),
            DockerEndpoint {
                network: "n1".into(),
                ovl: "web".into(),
                endpoint: "11".repeat(16),
                ip: "198.18.100.3".parse().unwrap(),
                mac: "02:42:c6:12:64:03".into(),
                joined: true,
            },
        );
        assert_eq!(PluginState::parse(&s.to_bytes()).unwrap(), s);
    }

    #[test]
    fn one_docker_network_per_subnet_and_pools_map_to_their_network() {
        let mut s = PluginState::default();
        s.bind_network("n1", "web", "198.18.100.0/24").unwrap();
        s.bind_network("n1", "web", "198.18.100.0/24").unwrap();
        let e = s.bind_network("n2", "db", "198.18.100.0/24").unwrap_err();
        assert!(matches!(e, StateError::SubnetTaken { .. }), "{e}");
        assert_eq!(s.ovl_of_pool("198.18.100.0/24"), Ok("web"));
        assert!(s.ovl_of_pool("198.18.101.0/24").is_err());
        assert!(s.pool_in_use("198.18.100.0/24"));
        assert!(s.network("n2").is_err());
    }
}
