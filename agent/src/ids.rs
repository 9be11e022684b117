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

            pub fn from_bytes(b: [u8; 16]) -> Self {
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
