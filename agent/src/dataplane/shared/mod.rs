//! What plain and encrypted networks share: the bridge per network
//! (`network.rs`, which also hands the rest of a network to its VTEP), the
//! veth pair per local endpoint (`endpoint.rs`), and the naming rules
//! (`names.rs`, pure).

mod endpoint;
pub(crate) mod names;
mod network;
