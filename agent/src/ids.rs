//! Identifiers that must not be confused with each other or with bare bytes.

use std::fmt;
use std::str::FromStr;

use ring::rand::{SecureRandom, SystemRandom};

/// Parse failure for a hex identifier.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("expected {expected} hex digits, got {got:?}")]
pub struct IdParseError {
    expected: usize,
    got: String,
}

macro_rules! hex_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name([u8; 16]);

        impl $name {
            /// A fresh random identifier.
            pub fn random(rng: &SystemRandom) -> Result<Self, ring::error::Unspecified> {
                let mut b = [0u8; 16];
                rng.fill(&mut b)?;
                Ok(Self(b))
            }

            pub const fn from_bytes(b: [u8; 16]) -> Self {
                Self(b)
            }

            pub fn as_bytes(&self) -> &[u8; 16] {
                &self.0
            }

            /// The first 12 hex digits, for tables and logs.
            pub fn short(&self) -> String {
                let mut s = self.to_string();
                s.truncate(12);
                s
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                for b in self.0 {
                    write!(f, "{b:02x}")?;
                }
                Ok(())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self)
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                decode_hex::<16>(s).map(Self)
            }
        }
    };
}

hex_id!(
    /// A node's identity, stable across restarts (persisted in the state dir).
    NodeId
);
hex_id!(
    /// A cluster's identity, chosen by `cluster init`.
    ClusterId
);

/// Decodes exactly `N` bytes of lowercase or uppercase hex.
pub fn decode_hex<const N: usize>(s: &str) -> Result<[u8; N], IdParseError> {
    let err = || IdParseError {
        expected: N * 2,
        got: s.chars().take(80).collect(),
    };
    if s.len() != N * 2 || !s.is_ascii() {
        return Err(err());
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| err())?;
    }
    Ok(out)
}

pub fn encode_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_round_trips_through_hex() {
        let rng = SystemRandom::new();
        let id = NodeId::random(&rng).unwrap();
        let parsed: NodeId = id.to_string().parse().unwrap();
        assert_eq!(id, parsed);
        assert_eq!(id.short().len(), 12);
    }

    #[test]
    fn bad_hex_is_refused() {
        assert!("zz".repeat(16).parse::<NodeId>().is_err());
        assert!("ab".repeat(15).parse::<NodeId>().is_err());
        assert!("é".repeat(32).parse::<NodeId>().is_err());
    }
}

hex_id!(
    /// A network's identity, chosen by the node that creates it.
    NetworkId
);
hex_id!(
    /// An endpoint's identity, chosen by the node it lives on.
    EndpointId
);

/// A VXLAN network identifier: 24 bits, 0 reserved (RFC 7348 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Vni(u32);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("VNI must be between 1 and 16777215, got {0}")]
pub struct VniError(pub u64);

impl Vni {
    pub const MAX: u32 = (1 << 24) - 1;

    pub fn new(v: u64) -> Result<Self, VniError> {
        if v == 0 || v > u64::from(Self::MAX) {
            return Err(VniError(v));
        }
        Ok(Self(v as u32))
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for Vni {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An Ethernet address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid MAC address {0:?}: expected six hex pairs like 02:42:c6:12:00:05, unicast")]
pub struct MacError(pub String);

impl MacAddr {
    /// Docker's scheme: 02:42 then the IPv4 address, so the MAC of an
    /// address is the same on every host and after every restart.
    pub fn from_ipv4(ip: std::net::Ipv4Addr) -> Self {
        let o = ip.octets();
        Self([0x02, 0x42, o[0], o[1], o[2], o[3]])
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

impl FromStr for MacAddr {
    type Err = MacError;
    /// Unicast only: a multicast or all-zero MAC on an endpoint breaks L2.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacError(s.chars().take(40).collect());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for o in out.iter_mut() {
            let p = parts.next().ok_or_else(err)?;
            if p.len() != 2 {
                return Err(err());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() || out[0] & 1 == 1 || out == [0; 6] {
            return Err(err());
        }
        Ok(Self(out))
    }
}

#[cfg(test)]
mod more_tests {
    use super::*;

    #[test]
    fn vni_bounds() {
        assert!(Vni::new(0).is_err());
        assert!(Vni::new(16_777_216).is_err());
        assert_eq!(Vni::new(16_777_215).unwrap().get(), Vni::MAX);
    }

    #[test]
    fn mac_parse_and_derive() {
        let m = MacAddr::from_ipv4("198.18.1.5".parse().unwrap());
        assert_eq!(m.to_string(), "02:42:c6:12:01:05");
        assert_eq!(m.to_string().parse::<MacAddr>().unwrap(), m);
        for bad in [
            "",
            "02:42:c6:12:01",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "02:42:c6:12:01:05:07",
            "2:42:c6:12:01:05",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }
}
