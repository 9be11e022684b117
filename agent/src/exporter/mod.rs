//! Prometheus metrics (`--metrics-addr`): the OpenMetrics text exposition
//! of the agent's counters, gauges and timings.
//!
//! File roles: this file holds the live timing histograms ([`Timings`],
//! owned by the core) and the scrape-time snapshot of state gauges
//! ([`Snapshot`], read from the core); `exposition.rs` turns both and the
//! counter registry ([`crate::metrics`]) into text, without I/O; `http.rs`
//! serves it.
//!
//! Counters are exported generically from [`crate::metrics::Counter::ALL`],
//! one family each (`ovl_<name>_total`), so a counter added to the
//! `counters!` macro appears with no change here.
//!
//! Cardinality: no label takes a value from remote input except `peer` on
//! the encrypted traffic families, whose values are node ids of admitted
//! members (the engine holds state only for hosts membership lists), so
//! that label is bounded by the cluster size.

mod exposition;
mod http;

pub use exposition::render;
pub use http::{MetricsError, bind, serve};
// The histograms live beside the counters (`metrics`), which `core` feeds;
// the exporter only reads them (no core <-> exporter import cycle).
pub use crate::metrics::Timings;

use std::sync::Arc;

use crate::core::Core;
use crate::dataplane::encrypted::EngineCounters;
use crate::membership::NodeStatus;

/// What the gauges show, read once per scrape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Nodes membership lists (this one included), by status.
    pub nodes: Vec<(NodeStatus, u64)>,
    /// Networks in the store (conflicting ones included).
    pub networks: u64,
    /// Endpoint rows owned by this node.
    pub local_endpoints: u64,
    /// Endpoint rows of other nodes' tables.
    pub remote_endpoints: u64,
    /// The encrypted engine's counters, when it runs.
    pub engine: Option<EngineCounters>,
    /// Table sizes and tombstones (own and replicas), and the writer's work.
    pub table: crate::store::TableStats,
}

impl Snapshot {
    pub async fn read(core: &Core) -> Snapshot {
        let members = core.cluster.members().await;
        let nodes = [NodeStatus::Alive, NodeStatus::Dead, NodeStatus::Left]
            .into_iter()
            .map(|s| {
                let n = members.iter().filter(|m| m.status == s).count();
                (s, n as u64)
            })
            .collect();
        let me = core.cluster.node_id();
        let (networks, endpoints, table) = {
            let store = core.store();
            (
                store.networks().len() as u64,
                store.endpoints(),
                store.stats(),
            )
        };
        let local = endpoints.iter().filter(|e| e.owner == me).count() as u64;
        Snapshot {
            nodes,
            networks,
            local_endpoints: local,
            remote_endpoints: endpoints.len() as u64 - local,
            engine: core.engine().map(|e| e.counters()),
            table,
        }
    }
}

/// The exposition of `core` now.
pub async fn scrape(core: &Arc<Core>) -> String {
    let snap = Snapshot::read(core).await;
    render(&core.counters, &core.timings, &snap)
}
