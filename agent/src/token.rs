//! Join tokens and the cluster keys derived from them.
//!
//! A token is `OVLTKN-1-<cluster id, 32 hex>-<secret, 64 hex>`, like Swarm's
//! `SWMTKN-1-…`. Whoever holds it may join; everything cluster-wide that must
//! stay private (gossip sealing, peer proofs) is derived from the secret with
//! HKDF-SHA256 and a distinct label per use, so no key serves two purposes.

use std::fmt;
use std::str::FromStr;

use ring::rand::{SecureRandom, SystemRandom};
use ring::{aead, hkdf, hmac};

use crate::ids::{ClusterId, decode_hex, encode_hex};

const PREFIX: &str = "OVLTKN";
const VERSION: &str = "1";
/// HKDF salt: fixed per protocol version (RFC 5869 §3.1 allows a constant).
const HKDF_SALT: &[u8] = b"ovl join token v1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("malformed join token: expected OVLTKN-1-<32 hex digits>-<64 hex digits>")]
    Malformed,
    #[error("unsupported join token version {0:?} (this agent understands version 1)")]
    Version(String),
}

/// A parsed join token. `Debug` and `Display` never print the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    cluster_id: ClusterId,
    secret: [u8; 32],
}

impl JoinToken {
    /// A new cluster: random id and secret.
    pub fn generate(rng: &SystemRandom) -> Result<Self, ring::error::Unspecified> {
        let mut secret = [0u8; 32];
        rng.fill(&mut secret)?;
        Ok(Self {
            cluster_id: ClusterId::random(rng)?,
            secret,
        })
    }

    pub fn cluster_id(&self) -> ClusterId {
        self.cluster_id
    }

    /// The full token, secret included: only for the operator and the state file.
    pub fn reveal(&self) -> String {
        format!(
            "{PREFIX}-{VERSION}-{}-{}",
            self.cluster_id,
            encode_hex(&self.secret)
        )
    }

    pub fn keys(&self) -> ClusterKeys {
        ClusterKeys::derive(self.cluster_id, &self.secret)
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinToken(cluster {}, secret hidden)", self.cluster_id)
    }
}

impl FromStr for JoinToken {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.trim().split('-');
        let (Some(PREFIX), Some(version), Some(id), Some(secret), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(TokenError::Malformed);
        };
        if version != VERSION {
            return Err(TokenError::Version(version.chars().take(8).collect()));
        }
        Ok(Self {
            cluster_id: id.parse().map_err(|_| TokenError::Malformed)?,
            secret: decode_hex::<32>(secret).map_err(|_| TokenError::Malformed)?,
        })
    }
}

/// Keys every member derives from the token.
pub struct ClusterKeys {
    pub cluster_id: ClusterId,
    /// AES-256-GCM key sealing gossip datagrams.
    pub gossip: aead::LessSafeKey,
    /// HMAC-SHA256 key for proofs between peers (join hello).
    pub peer_auth: hmac::Key,
}

/// Output length carrier for `Prk::expand` into raw bytes.
struct Len(usize);
impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

impl ClusterKeys {
    fn derive(cluster_id: ClusterId, secret: &[u8; 32]) -> Self {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(secret);
        let expand = |label: &[u8]| -> [u8; 32] {
            let info = [label, cluster_id.as_bytes().as_slice()];
            let mut out = [0u8; 32];
            // 32 bytes is far below HKDF-SHA256's limit of 255 * 32 (RFC 5869 §2.3).
            prk.expand(&info, Len(32))
                .and_then(|okm| okm.fill(&mut out))
                .expect("HKDF-SHA256 can expand 32 bytes");
            out
        };
        let gossip = expand(b"ovl gossip aead");
        let peer = expand(b"ovl peer auth");
        let gossip = aead::UnboundKey::new(&aead::AES_256_GCM, &gossip)
            .map(aead::LessSafeKey::new)
            .expect("AES-256-GCM takes a 32-byte key");
        Self {
            cluster_id,
            gossip,
            peer_auth: hmac::Key::new(hmac::HMAC_SHA256, &peer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trips_and_hides_secret_in_debug() {
        let rng = SystemRandom::new();
        let t = JoinToken::generate(&rng).unwrap();
        let s = t.reveal();
        assert!(s.starts_with("OVLTKN-1-"));
        assert_eq!(s.parse::<JoinToken>().unwrap(), t);
        assert!(!format!("{t:?}").contains(&s[42..]));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for bad in [
            "",
            "nonsense",
            "OVLTKN-1-abc-def",
            "SWMTKN-1-00000000000000000000000000000000-0000000000000000000000000000000000000000000000000000000000000000",
            "OVLTKN-1-00000000000000000000000000000000-00",
            "OVLTKN-1-0000000000000000000000000000000g-0000000000000000000000000000000000000000000000000000000000000000",
            "OVLTKN-1-00000000000000000000000000000000-0000000000000000000000000000000000000000000000000000000000000000-x",
        ] {
            assert_eq!(
                bad.parse::<JoinToken>(),
                Err(TokenError::Malformed),
                "{bad}"
            );
        }
        let v2 = "OVLTKN-2-00000000000000000000000000000000-0000000000000000000000000000000000000000000000000000000000000000";
        assert!(matches!(
            v2.parse::<JoinToken>(),
            Err(TokenError::Version(_))
        ));
    }

    #[test]
    fn different_secrets_give_different_keys() {
        let rng = SystemRandom::new();
        let a = JoinToken::generate(&rng).unwrap();
        let mut b = a.clone();
        b.secret[0] ^= 1;
        let tag = |t: &JoinToken| hmac::sign(&t.keys().peer_auth, b"x").as_ref().to_vec();
        assert_ne!(tag(&a), tag(&b));
        assert_eq!(tag(&a), tag(&a.clone()));
    }
}
