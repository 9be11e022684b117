//! Peer gRPC (7946/tcp): what agents ask each other directly, over TLS 1.3
//! mutually authenticated by node identity keys (DESIGN.md "Trust and
//! keys").
//!
//! - `tls`: certificates from identity keys, verifiers pinning by node id.
//! - `client`: the channel pool and typed calls; knows no agent state.
//! - `listener`: the TLS listener; the caller's node id comes from its
//!   certificate. The service behind it is `crate::peer_api`.
//!
//! `Hello`: before joining, the joiner asks a seed to prove it holds the same
//! cluster key (HMAC over the joiner's fresh nonce and the seed's node id,
//! which must be the id of the seed's certificate), so a wrong token fails
//! at once with a reason, and nothing changes locally. `Pull` serves deltas
//! of our own table, `Notify` hints that a peer's table moved,
//! `RequestSpace` donates address space, `Programmed` acknowledges a
//! reconcile pass, `InstallClusterKey`/`FetchClusterKey` rotate the cluster
//! key: all only to admitted members, identified by their certificate.

pub mod client;
pub mod listener;
pub mod tls;

pub use client::{CallError, Channels, HelloError, hello};
pub use listener::{PeerConn, incoming};
pub use tls::TlsIdentity;

use crate::ids::{ClusterId, NodeId};

/// Metadata naming the node the caller says it is. Optional; when present
/// it must be the certificate's node id, or the call is refused and counted.
pub const CLAIM_HEADER: &str = "ovl-node";

const HELLO_LABEL: &[u8] = b"ovl hello v1";
/// Length of the joiner's `Hello` nonce.
pub const NONCE_LEN: usize = 32;

/// What the seed's `Hello` proof (HMAC under the token's proof key) covers.
pub fn proof_input(cluster: ClusterId, nonce: &[u8], server: NodeId) -> Vec<u8> {
    [HELLO_LABEL, cluster.as_bytes(), nonce, server.as_bytes()].concat()
}
