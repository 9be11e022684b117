//! Join tokens, the cluster secret, and the keys derived from them.
//!
//! A token is `OVLTKN-1-<cluster id, 32 hex>-<secret, 64 hex>`, like Swarm's
//! `SWMTKN-1-…`. Whoever holds it may join. The token only *admits*: what
//! members share (gossip sealing) comes from the **cluster key**
//! (`keys::ClusterKey`), which a seed hands a joiner sealed under the token
//! (see [`Admission`]). A cluster's first token secret doubles as its first
//! cluster secret; `cluster rotate-token` replaces the token and keeps the
//! cluster key, so members stay; `node rm` replaces both. Every key is
//! HKDF-SHA256 with a distinct label per use, so no key serves two purposes.

use std::fmt;
use std::str::FromStr;

use ring::rand::{SecureRandom, SystemRandom};
use ring::{aead, hkdf, hmac};

use crate::ids::{ClusterId, decode_hex, encode_hex};
use crate::keys::ClusterKey;

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

    /// The first cluster key of a cluster whose first token this is (its
    /// secret doubles as the cluster secret at epoch 0).
    pub fn first_cluster_key(&self) -> ClusterKey {
        ClusterKey::derive(self.cluster_id, 0, self.secret)
    }

    /// The secret, for a new cluster's cluster secret and the state file.
    pub fn secret(&self) -> [u8; 32] {
        self.secret
    }

    /// A new token for the same cluster (rotation).
    pub fn rotated(&self, rng: &SystemRandom) -> Result<Self, ring::error::Unspecified> {
        let mut secret = [0u8; 32];
        rng.fill(&mut secret)?;
        Ok(Self {
            cluster_id: self.cluster_id,
            secret,
        })
    }

    pub fn from_parts(cluster_id: ClusterId, secret: [u8; 32]) -> Self {
        Self { cluster_id, secret }
    }

    /// The keys a seed and a joiner share through this token.
    pub fn admission(&self) -> Admission {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(&self.secret);
        let proof = expand(&prk, b"ovl hello proof", self.cluster_id);
        Admission {
            cluster_id: self.cluster_id,
            proof: hmac::Key::new(hmac::HMAC_SHA256, &proof),
            seal: expand(&prk, b"ovl admit seal", self.cluster_id),
        }
    }
}

fn expand(prk: &hkdf::Prk, label: &[u8], cluster_id: ClusterId) -> [u8; 32] {
    let info = [label, cluster_id.as_bytes().as_slice()];
    let mut out = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's limit of 255 * 32 (RFC 5869 §2.3).
    prk.expand(&info, Len(32))
        .and_then(|okm| okm.fill(&mut out))
        .expect("HKDF-SHA256 can expand 32 bytes");
    out
}

/// What a token gives: the seed's proof key (it holds the token) and the
/// key the seed seals the cluster secret with for the joiner.
pub struct Admission {
    pub cluster_id: ClusterId,
    /// HMAC-SHA256 key of the seed's proof (peer `Hello`).
    pub proof: hmac::Key,
    seal: [u8; 32],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the sealed cluster secret does not open under this token")]
pub struct UnsealError;

impl Admission {
    /// AES-256-GCM key for one hello: bound to the joiner's fresh nonce, so
    /// each key seals exactly one message and a fixed nonce is safe.
    fn hello_key(&self, client_nonce: &[u8]) -> aead::LessSafeKey {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(&self.seal);
        let key = expand(
            &prk,
            &[b"ovl admit hello ".as_slice(), client_nonce].concat(),
            self.cluster_id,
        );
        aead::LessSafeKey::new(
            aead::UnboundKey::new(&aead::AES_256_GCM, &key)
                .expect("AES-256-GCM takes a 32-byte key"),
        )
    }

    /// The cluster secret sealed for the joiner that sent `client_nonce`.
    pub fn seal_secret(&self, client_nonce: &[u8], secret: &[u8; 32]) -> Vec<u8> {
        let mut buf = secret.to_vec();
        let aad = aead::Aad::from(self.cluster_id.as_bytes().to_vec());
        self.hello_key(client_nonce)
            .seal_in_place_append_tag(aead::Nonce::assume_unique_for_key([0; 12]), aad, &mut buf)
            .expect("AES-GCM seals 32 bytes");
        buf
    }

    pub fn open_secret(&self, client_nonce: &[u8], sealed: &[u8]) -> Result<[u8; 32], UnsealError> {
        let mut buf = sealed.to_vec();
        let aad = aead::Aad::from(self.cluster_id.as_bytes().to_vec());
        let plain = self
            .hello_key(client_nonce)
            .open_in_place(aead::Nonce::assume_unique_for_key([0; 12]), aad, &mut buf)
            .map_err(|_| UnsealError)?;
        plain.try_into().map_err(|_| UnsealError)
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

/// Output length carrier for `Prk::expand` into raw bytes.
struct Len(usize);
impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
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
    fn the_cluster_secret_opens_only_for_the_same_token_and_nonce() {
        let rng = SystemRandom::new();
        let t = JoinToken::generate(&rng).unwrap();
        let secret = [9u8; 32];
        let sealed = t.admission().seal_secret(&[1; 32], &secret);
        assert_eq!(t.admission().open_secret(&[1; 32], &sealed), Ok(secret));
        assert_eq!(
            t.admission().open_secret(&[2; 32], &sealed),
            Err(UnsealError)
        );
        let other = t.rotated(&rng).unwrap();
        assert_eq!(other.cluster_id(), t.cluster_id());
        assert_ne!(other, t);
        assert_eq!(
            other.admission().open_secret(&[1; 32], &sealed),
            Err(UnsealError)
        );
    }

    #[test]
    fn different_secrets_give_different_keys() {
        let rng = SystemRandom::new();
        let a = JoinToken::generate(&rng).unwrap();
        let mut b = a.clone();
        b.secret[0] ^= 1;
        let tag = |t: &JoinToken| hmac::sign(&t.admission().proof, b"x").as_ref().to_vec();
        assert_ne!(tag(&a), tag(&b));
        assert_eq!(tag(&a), tag(&a.clone()));
    }
}
