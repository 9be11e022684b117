//! What plain and encrypted networks share: the sandbox, bridge and
//! gateway per network (`network.rs`, which also hands the rest of a
//! network to its VTEP), the veth pair per local endpoint (`endpoint.rs`),
//! the way out (`egress.rs`, with the pure `transit.rs` addressing and
//! `firewall.rs` rules), and the naming rules (`names.rs`, pure).

mod egress;
mod endpoint;
pub(crate) mod firewall;
pub(crate) mod names;
mod network;
pub(crate) mod transit;
