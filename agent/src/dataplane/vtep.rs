//! The interface between the shared part of the data plane (bridge, veths)
//! and what carries a network's frames to other hosts: the kernel VXLAN
//! device (`vxlan/`) or the userspace encrypted VTEP (`encrypted/`).
//!
//! The shared part calls a VTEP under the data plane's mutation lock, with
//! the network's bridge already in place; a VTEP never touches bridges or
//! endpoints, and never sees the store: the plan is all it knows.

use async_trait::async_trait;

use super::{DataplaneError, KernelView, NetworkPlan, ReconcileReport};
use crate::ids::Vni;

#[async_trait]
pub trait Vtep: Send + Sync {
    /// Creates or adopts the network's VTEP device, enslaved to the bridge
    /// at `bridge_ifindex`, and programs exactly the plan's remotes and
    /// peers. Idempotent; reads the kernel (or the engine) back, so an agent
    /// restart adopts a working device without interrupting it.
    async fn ensure(
        &self,
        plan: &NetworkPlan,
        bridge_ifindex: u32,
    ) -> Result<ReconcileReport, DataplaneError>;

    /// Removes the network's VTEP device and what it holds. Idempotent.
    async fn remove(&self, vni: Vni) -> Result<(), DataplaneError>;

    /// VNIs this VTEP holds a device for (adoption after a restart, and
    /// removal of networks with no local endpoint left).
    async fn present(&self) -> Result<Vec<Vni>, DataplaneError>;

    /// What the VTEP holds for the network (`bridge` is left false: the
    /// shared part fills it in).
    async fn view(&self, vni: Vni) -> Result<KernelView, DataplaneError>;
}
