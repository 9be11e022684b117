//! All key material: the node's identity key (`identity`), the join token
//! and what it derives (`token`), the cluster key with its rotating
//! keyring (`cluster_key`), and the per-epoch, per-pair data keys of
//! encrypted networks (`pair`) and when each exists (`schedule`). Derivations and the keyring are sans-IO (time
//! comes in as an argument); only `identity` touches a file, the key's own.

pub mod cluster_key;
pub mod identity;
pub mod pair;
pub mod schedule;
pub mod token;

pub use cluster_key::{ClusterKey, KeyId, KeyScope, Keyring, Lookup};
