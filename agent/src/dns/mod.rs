//! Embedded DNS per network (DESIGN.md, "Names"; issue 9).
//!
//! File roles: `table.rs` the pure name table of one network; `resolve.rs`
//! the sans-IO resolver core (query bytes + table → reply, forward or
//! drop); `server.rs` the sockets (UDP and TCP on the gateway address,
//! opened inside the network's namespace) and the upstream forwarding;
//! `upstream.rs` reading the host's resolvers.

pub mod resolve;
pub mod resolvers;
pub mod server;
pub mod table;

pub use resolve::{Outcome, ReplyKind, Rotor, resolve, servfail};
pub use table::{NameTable, NamedEndpoint};
