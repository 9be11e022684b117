//! What the rest of the agent sees of the cluster: this node's id and
//! configuration, and the running membership, a handle the cluster module
//! swaps on join and leave. `Core`, sync and the reconciler work from this
//! view and never hold the cluster object (DESIGN.md "Agent internals").

use std::sync::{Arc, RwLock};

use super::{Membership, NodeView};
use crate::config::Config;
use crate::ids::NodeId;

#[derive(Clone)]
pub struct ClusterView {
    node_id: NodeId,
    config: Arc<Config>,
    current: Arc<RwLock<Option<Arc<Membership>>>>,
}

impl ClusterView {
    pub fn new(node_id: NodeId, config: Arc<Config>) -> Self {
        Self {
            node_id,
            config,
            current: Arc::default(),
        }
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The running membership, while the node is in a cluster.
    pub async fn membership(&self) -> Option<Arc<Membership>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every node as membership sees it; empty when not in a cluster.
    pub async fn members(&self) -> Vec<NodeView> {
        match self.membership().await {
            Some(m) => m.nodes().await,
            None => Vec::new(),
        }
    }

    pub fn in_cluster(&self) -> bool {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Only the cluster module swaps the membership.
    pub(crate) fn set(&self, membership: Option<Arc<Membership>>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = membership;
    }
}
