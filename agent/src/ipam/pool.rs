//! A network's address pool: subnet, optional ip-range, optional gateway.
//! Validated on construction and on deserialization ("parse, don't
//! validate"), so every `Pool` in the program is usable.

use std::fmt;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

/// Largest pool: a /8 (16M addresses keeps every count in a `u32`).
pub const MIN_PREFIX: u8 = 8;
/// Smallest pool: a /30 (network, two hosts, broadcast).
pub const MAX_PREFIX: u8 = 30;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("subnet {0} is too large: the largest pool is a /{MIN_PREFIX}")]
    TooLarge(Ipv4Network),
    #[error("subnet {0} is too small: the smallest pool is a /{MAX_PREFIX} (two usable addresses)")]
    TooSmall(Ipv4Network),
    #[error("{given} has host bits set; did you mean {expected}?")]
    NotCanonical {
        given: Ipv4Network,
        expected: Ipv4Network,
    },
    #[error("ip-range {range} is not inside subnet {subnet}")]
    RangeOutsideSubnet {
        range: Ipv4Network,
        subnet: Ipv4Network,
    },
    #[error("gateway {gateway} is not inside subnet {subnet}")]
    GatewayOutsideSubnet {
        gateway: Ipv4Addr,
        subnet: Ipv4Network,
    },
    #[error("gateway {0} is the network address of the subnet")]
    GatewayIsNetworkAddress(Ipv4Addr),
    #[error("gateway {0} is the broadcast address of the subnet")]
    GatewayIsBroadcastAddress(Ipv4Addr),
    #[error("{0} leaves no allocatable address (only network, broadcast and gateway)")]
    NoUsableAddress(Ipv4Network),
    #[error("invalid CIDR {0:?}")]
    BadCidr(String),
}

/// Where a network's addresses come from. Reserved (never allocatable): the
/// subnet's network and broadcast addresses and the gateway; when an
/// ip-range is set, everything outside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PoolRepr", into = "PoolRepr")]
pub struct Pool {
    subnet: Ipv4Network,
    ip_range: Option<Ipv4Network>,
    gateway: Option<Ipv4Addr>,
}

impl Pool {
    pub fn new(
        subnet: Ipv4Network,
        ip_range: Option<Ipv4Network>,
        gateway: Option<Ipv4Addr>,
    ) -> Result<Self, PoolError> {
        canonical(subnet)?;
        if subnet.prefix() < MIN_PREFIX {
            return Err(PoolError::TooLarge(subnet));
        }
        if subnet.prefix() > MAX_PREFIX {
            return Err(PoolError::TooSmall(subnet));
        }
        if let Some(range) = ip_range {
            canonical(range)?;
            if !range.is_subnet_of(subnet) {
                return Err(PoolError::RangeOutsideSubnet { range, subnet });
            }
        }
        if let Some(gateway) = gateway {
            if !subnet.contains(gateway) {
                return Err(PoolError::GatewayOutsideSubnet { gateway, subnet });
            }
            if gateway == subnet.network() {
                return Err(PoolError::GatewayIsNetworkAddress(gateway));
            }
            if gateway == subnet.broadcast() {
                return Err(PoolError::GatewayIsBroadcastAddress(gateway));
            }
        }
        let pool = Self {
            subnet,
            ip_range,
            gateway,
        };
        if pool.usable_in(pool.space()) == 0 {
            return Err(PoolError::NoUsableAddress(pool.space()));
        }
        Ok(pool)
    }

    pub fn subnet(&self) -> Ipv4Network {
        self.subnet
    }

    pub fn ip_range(&self) -> Option<Ipv4Network> {
        self.ip_range
    }

    pub fn gateway(&self) -> Option<Ipv4Addr> {
        self.gateway
    }

    /// The space the ring partitions: the ip-range when set, else the subnet.
    pub fn space(&self) -> Ipv4Network {
        self.ip_range.unwrap_or(self.subnet)
    }

    /// Network, broadcast or gateway address.
    pub fn is_reserved(&self, ip: Ipv4Addr) -> bool {
        ip == self.subnet.network() || ip == self.subnet.broadcast() || Some(ip) == self.gateway
    }

    /// Inside the space and not reserved.
    pub fn is_usable(&self, ip: Ipv4Addr) -> bool {
        self.space().contains(ip) && !self.is_reserved(ip)
    }

    /// Number of usable addresses in `block` (any block; the part outside
    /// the space counts nothing).
    pub fn usable_in(&self, block: Ipv4Network) -> u32 {
        let space = self.space();
        let inner = if block.is_subnet_of(space) {
            block
        } else if space.is_subnet_of(block) {
            space
        } else {
            return 0;
        };
        // Distinct by construction: a pool is at least a /30 and its
        // gateway is neither the network nor the broadcast address.
        let reserved = [
            Some(self.subnet.network()),
            Some(self.subnet.broadcast()),
            self.gateway,
        ];
        let hit = reserved.iter().flatten().filter(|ip| inner.contains(**ip));
        inner.size().saturating_sub(hit.count() as u32)
    }

    pub fn usable_count(&self) -> u32 {
        self.usable_in(self.space())
    }
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "subnet {}", self.subnet)?;
        if let Some(r) = self.ip_range {
            write!(f, " ip-range {r}")?;
        }
        if let Some(g) = self.gateway {
            write!(f, " gateway {g}")?;
        }
        Ok(())
    }
}

fn canonical(net: Ipv4Network) -> Result<(), PoolError> {
    if net.ip() == net.network() {
        return Ok(());
    }
    let expected = Ipv4Network::new(net.network(), net.prefix()).unwrap_or(net);
    Err(PoolError::NotCanonical {
        given: net,
        expected,
    })
}

/// On-disk and wire form: CIDRs as text.
#[derive(Serialize, Deserialize)]
struct PoolRepr {
    subnet: String,
    #[serde(default)]
    ip_range: Option<String>,
    #[serde(default)]
    gateway: Option<Ipv4Addr>,
}

fn parse_cidr(s: &str) -> Result<Ipv4Network, PoolError> {
    s.parse()
        .map_err(|_| PoolError::BadCidr(s.chars().take(40).collect()))
}

impl TryFrom<PoolRepr> for Pool {
    type Error = PoolError;
    fn try_from(r: PoolRepr) -> Result<Self, PoolError> {
        let ip_range = r.ip_range.as_deref().map(parse_cidr).transpose()?;
        Pool::new(parse_cidr(&r.subnet)?, ip_range, r.gateway)
    }
}

impl From<Pool> for PoolRepr {
    fn from(p: Pool) -> Self {
        Self {
            subnet: p.subnet.to_string(),
            ip_range: p.ip_range.map(|r| r.to_string()),
            gateway: p.gateway,
        }
    }
}
