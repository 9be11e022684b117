//! Generated gRPC code for ovl's two protocols.
//!
//! `api` is the local API that `ovlctl` speaks to its agent over a Unix
//! socket; `peer` is what agents speak to each other on the gossip port (TCP).

pub mod api {
    tonic::include_proto!("ovl.api.v1");
}

pub mod peer {
    tonic::include_proto!("ovl.peer.v1");
}
