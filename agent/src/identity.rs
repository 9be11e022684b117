//! The node's persistent identity: node id and Ed25519 identity key, created
//! on first start. A host that loses its state dir comes back as a new node.

use std::path::Path;

use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use tracing::info;

use crate::ids::{IdParseError, NodeId, encode_hex};
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
    #[error("system random source failed")]
    Random,
}

pub struct Identity {
    pub node_id: NodeId,
    pub key: Ed25519KeyPair,
}

impl Identity {
    /// Loads the identity from `state_dir`, creating it on first start.
    pub fn load_or_create(state_dir: &Path, rng: &SystemRandom) -> Result<Self, IdentityError> {
        persist::ensure_private_dir(state_dir)?;
        let id_path = state_dir.join(NODE_ID_FILE);
        let key_path = state_dir.join(IDENTITY_KEY_FILE);
        let key = match persist::read_optional(&key_path)? {
            Some(pk8) => {
                Ed25519KeyPair::from_pkcs8(&pk8).map_err(|_| IdentityError::CorruptKey {
                    path: key_path.display().to_string(),
                })?
            }
            None => {
                let pk8 = Ed25519KeyPair::generate_pkcs8(rng).map_err(|_| IdentityError::Random)?;
                persist::write_atomic(&key_path, pk8.as_ref())?;
                Ed25519KeyPair::from_pkcs8(pk8.as_ref()).map_err(|_| IdentityError::CorruptKey {
                    path: key_path.display().to_string(),
                })?
            }
        };
        let node_id = match persist::read_optional(&id_path)? {
            Some(raw) => String::from_utf8_lossy(&raw)
                .trim()
                .parse()
                .map_err(|source| IdentityError::CorruptId {
                    path: id_path.display().to_string(),
                    source,
                })?,
            None => {
                let id = NodeId::random(rng).map_err(|_| IdentityError::Random)?;
                persist::write_atomic(&id_path, format!("{id}\n").as_bytes())?;
                info!(node = %id, "created new node identity");
                id
            }
        };
        Ok(Self { node_id, key })
    }

    pub fn public_key_hex(&self) -> String {
        encode_hex(self.key.public_key().as_ref())
    }
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
        assert_eq!(a.public_key_hex(), b.public_key_hex());
        std::fs::write(dir.join(NODE_ID_FILE), "garbage").unwrap();
        assert!(matches!(
            Identity::load_or_create(&dir, &rng),
            Err(IdentityError::CorruptId { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
