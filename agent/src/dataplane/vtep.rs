//! The interface between the shared part of the data plane (bridge, veths)
//! and what carries a network's frames to other hosts: the kernel VXLAN
//! device (`vxlan/`) or the userspace encrypted VTEP (`encrypted/`).
//!
//! The shared part calls a VTEP under the data plane's mutation lock, with
//! the network's bridge already in place; a VTEP never touches bridges or
//! endpoints, and never sees the store: the plan is all it knows.

use async_trait::async_trait;

use super::{DataplaneError, KernelView, NetworkPlan, ReconcileReport, Sandbox};
use crate::ids::Vni;

#[async_trait]
pub trait Vtep: Send + Sync {
    /// Creates or adopts the network's VTEP device in its sandbox `sb`,
    /// enslaved to the bridge at `bridge_ifindex`, and programs exactly the
    /// plan's remotes and peers. Idempotent; reads the kernel (or the
    /// engine) back, so an agent restart adopts a working device without
    /// interrupting it.
    async fn ensure(
        &self,
        plan: &NetworkPlan,
        sb: &Sandbox,
        bridge_ifindex: u32,
    ) -> Result<ReconcileReport, DataplaneError>;

    /// Removes the network's VTEP device from its sandbox (if it has one)
    /// and what the VTEP holds for it. Idempotent.
    async fn remove(&self, vni: Vni, sb: Option<&Sandbox>) -> Result<(), DataplaneError>;

    /// Whether this VTEP holds a device (or state) for the sandbox's
    /// network.
    async fn present(&self, sb: &Sandbox) -> Result<bool, DataplaneError>;

    /// What the VTEP holds for the network (`bridge` is left false: the
    /// shared part fills it in).
    async fn view(&self, vni: Vni, sb: Option<&Sandbox>) -> Result<KernelView, DataplaneError>;
}
