//! The userspace encrypted VTEP (issue 7; DESIGN.md "Encrypted data
//! plane"): frames from the network's TAP are sealed per host pair and sent
//! as UDP to the peer's encrypted port.
//!
//! File roles: [`codec`] (wire format), [`replay`] (anti-replay window) and
//! [`forward`] (forwarding decisions, ARP answers) are sans-IO; [`engine`]
//! is the public API and its key/table state; `worker` wires the I/O;
//! `tap` and `udp` are the OS edge (every `unsafe` there); [`counters`]
//! holds the counters. Keys come from `keys::pair`.

pub mod codec;
pub mod counters;
pub mod engine;
pub mod forward;
pub mod replay;
mod tap;
mod udp;
pub mod vtep;
mod worker;

pub use counters::{Dropped, Traffic};
pub use engine::{
    ENCRYPTED_PORT, Engine, EngineConfig, EngineCounters, EngineError, EpochInfo, PeerCounters,
};
pub use forward::Forwarding;
pub use vtep::EncryptedVtep;
