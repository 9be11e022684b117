//! What ovl's clients share: the connection to the local agent, and the
//! CNI plugin (`ovl-cni`), which speaks the CNI protocol to a container
//! runtime and ovl's API to the agent.

pub mod client;
pub mod cni;
