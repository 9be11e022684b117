//! Key material the cluster shares. Sans-IO: time comes in as an argument.

pub mod cluster_key;

pub use cluster_key::{ClusterKey, KeyId, Keyring, Lookup};
