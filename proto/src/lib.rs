//! Generated gRPC code for ovl's protocols.
//!
//! `api` is the local API that `ovlctl` speaks to its agent over a Unix
//! socket; `peer` is what agents speak to each other on the gossip port
//! (TCP); `records` are the replicated table entries.

// Nested like the proto packages, so cross-package references resolve.
#[allow(clippy::all)]
pub mod ovl {
    pub mod api {
        pub mod v1 {
            tonic::include_proto!("ovl.api.v1");
        }
    }
    pub mod peer {
        pub mod v1 {
            tonic::include_proto!("ovl.peer.v1");
        }
    }
    pub mod records {
        pub mod v1 {
            tonic::include_proto!("ovl.records.v1");
        }
    }
}

pub use ovl::api::v1 as api;
pub use ovl::peer::v1 as peer;
pub use ovl::records::v1 as records;
