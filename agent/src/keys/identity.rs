//! The node's persistent identity: an Ed25519 identity key, created on first
//! start, and the node id derived from it (DESIGN.md "Trust": the first 16
//! bytes of SHA-256 of the public key), so anyone can check a claimed id
//! against a key without trusting the sender. A host that loses its state
//! dir comes back as a new node.

use std::path::Path;

use ring::digest;
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use tracing::info;

use crate::ids::{IdParseError, NodeId};
use crate::persist::{self, PersistError};

const NODE_ID_FILE: &str = "node-id";
const IDENTITY_KEY_FILE: &str = "identity.pk8";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Persist(#[from] PersistError),
    #[error("{path}: corrupt node id ({source}); move the state dir aside to start as a new node")]
    CorruptId { path: String, source: IdParseError },
    #[error("{path}: corrupt identity key; move the state dir aside to start as a new node")]
    CorruptKey { path: String },
    #[error(
        "{dir}: state dir from an earlier ovl format (node id {stored} is not derived from the identity key); \
         this version cannot adopt it: run `ovlctl cluster leave` with the old version, or move the state dir aside and join again as a new node"
    )]
    EarlierFormat { dir: String, stored: NodeId },
    #[error("system random source failed")]
    Random,
}

pub struct Identity {
    pub node_id: NodeId,
    /// Shared with the gossip transport, which signs every datagram.
    pub key: std::sync::Arc<Ed25519KeyPair>,
    /// The key as stored (PKCS#8), for the TLS certificate.
    pkcs8: Vec<u8>,
}

impl Identity {
    /// Loads the identity from `state_dir`, creating it on first start.
    pub fn load_or_create(state_dir: &Path, rng: &SystemRandom) -> Result<Self, IdentityError> {
        persist::ensure_private_dir(state_dir)?;
        let id_path = state_dir.join(NODE_ID_FILE);
        let key_path = state_dir.join(IDENTITY_KEY_FILE);
        let pkcs8 = match persist::read_optional(&key_path)? {
            Some(pk8) => pk8,
            None => {
                let pk8 = Ed25519KeyPair::generate_pkcs8(rng).map_err(|_| IdentityError::Random)?;
                persist::write_atomic(&key_path, pk8.as_ref())?;
                pk8.as_ref().to_vec()
            }
        };
        let key = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| IdentityError::CorruptKey {
            path: key_path.display().to_string(),
        })?;
        let node_id = node_id_of(key.public_key().as_ref());
        match persist::read_optional(&id_path)? {
            Some(raw) => {
                let stored: NodeId =
                    String::from_utf8_lossy(&raw)
                        .trim()
                        .parse()
                        .map_err(|source| IdentityError::CorruptId {
                            path: id_path.display().to_string(),
                            source,
                        })?;
                // Earlier versions drew the node id at random: peers know
                // this host's records under that id, so silently switching
                // to the derived one would orphan them.
                if stored != node_id {
                    return Err(IdentityError::EarlierFormat {
                        dir: state_dir.display().to_string(),
                        stored,
                    });
                }
            }
            None => {
                // The file is only for operators (`cat node-id`); the id
                // itself always comes from the key.
                persist::write_atomic(&id_path, format!("{node_id}\n").as_bytes())?;
                info!(node = %node_id, "created new node identity");
            }
        }
        Ok(Self {
            node_id,
            key: std::sync::Arc::new(key),
            pkcs8,
        })
    }

    /// The identity key as PKCS#8 (secret: never log it).
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    pub fn public_key(&self) -> &[u8] {
        self.key.public_key().as_ref()
    }
}

/// The node id a public key stands for: SHA-256(pk)[..16].
pub fn node_id_of(public_key: &[u8]) -> NodeId {
    let d = digest::digest(&digest::SHA256, public_key);
    let mut id = [0u8; 16];
    id.copy_from_slice(&d.as_ref()[..16]);
    NodeId::from_bytes(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_stable_across_loads_and_corruption_is_reported() {
        let dir = std::env::temp_dir().join(format!("ovl-identity-{}", std::process::id()));
        let rng = SystemRandom::new();
        let a = Identity::load_or_create(&dir, &rng).unwrap();
        let b = Identity::load_or_create(&dir, &rng).unwrap();
        assert_eq!(a.node_id, b.node_id);
        assert_eq!(a.public_key(), b.public_key());
        assert_eq!(a.node_id, node_id_of(a.public_key()));
        // A random id from the earlier format is refused, not adopted.
        let old = NodeId::random(&rng).unwrap();
        std::fs::write(dir.join(NODE_ID_FILE), format!("{old}\n")).unwrap();
        let err = Identity::load_or_create(&dir, &rng).err().unwrap();
        assert!(matches!(err, IdentityError::EarlierFormat { .. }), "{err}");
        assert!(err.to_string().contains("earlier ovl format"), "{err}");
        std::fs::write(dir.join(NODE_ID_FILE), "garbage").unwrap();
        assert!(matches!(
            Identity::load_or_create(&dir, &rng),
            Err(IdentityError::CorruptId { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
