//! ovl-agent: one per host. Finds its peers by gossip, replicates network
//! state, and programs the kernel (see DESIGN.md for the architecture).

pub mod api;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod core;
pub mod dataplane;
pub mod dns;
pub mod docker;
pub mod exporter;
pub mod ids;
pub mod ipam;
pub mod keying;
pub mod keys;
pub mod membership;
pub mod metrics;
pub mod peer;
pub mod peer_api;
pub mod persist;
pub mod planner;
pub mod reconcile;
pub mod repair;
pub mod resolv_conf;
pub mod store;
pub mod sync;
