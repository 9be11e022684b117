//! Per-network operations: the bridge (shared by both modes) and, on it,
//! the network's VTEP, chosen by the plan's mode. Reconciled against a
//! dump of the kernel.

use std::net::IpAddr;

use rtnetlink::LinkBridge;
use rtnetlink::packet_route::link::InfoKind;
use tracing::{info, warn};

use super::names;
use crate::dataplane::netlink::{self as nl, Link};
use crate::dataplane::{
    BRIDGE_PREFIX, Dataplane, DataplaneError, Inventory, KernelView, NetworkMode, NetworkPlan,
    ReconcileReport, Vtep,
};
use crate::ids::Vni;

impl Dataplane {
    /// Makes the kernel match `plan`: the bridge (fixed MAC, MTU, up), the
    /// endpoints' ports back on it, and the rest through the VTEP of the
    /// plan's mode (for plain networks the VXLAN device and its entries).
    /// A device of another mode's VTEP with this VNI is removed (a VNI
    /// reused by a network of the other mode must not keep the old
    /// carriage on its bridge). Reads the kernel back to decide, so an
    /// agent restart does not interrupt traffic. Idempotent.
    ///
    /// A mode this host runs no VTEP for is refused before anything is
    /// created ([`DataplaneError::NoVtep`]).
    pub async fn ensure_network(
        &self,
        plan: &NetworkPlan,
    ) -> Result<ReconcileReport, DataplaneError> {
        let vtep = self.vtep(plan.mode).ok_or(DataplaneError::NoVtep {
            vni: plan.vni,
            mode: plan.mode,
        })?;
        let _g = self.lock.lock().await;
        let r = self.ensure_locked(plan, vtep.as_ref()).await;
        if !matches!(r, Ok(report) if report.is_empty()) {
            self.changed();
        }
        r
    }

    async fn ensure_locked(
        &self,
        plan: &NetworkPlan,
        vtep: &dyn Vtep,
    ) -> Result<ReconcileReport, DataplaneError> {
        let mut report = ReconcileReport::default();
        let links = nl::links(&self.handle).await?;
        let bridge = self.ensure_bridge(plan, &links, &mut report).await?;
        for (mode, other) in self.vteps() {
            if mode != plan.mode {
                other.remove(plan.vni).await?;
            }
        }
        let r = vtep.ensure(plan, bridge).await?;
        report.added += r.added;
        report.removed += r.removed;
        report.created_devices += r.created_devices;
        report.added += self.reattach_ports(plan.vni, &links, bridge).await?;
        Ok(report)
    }

    async fn ensure_bridge(
        &self,
        plan: &NetworkPlan,
        links: &[Link],
        report: &mut ReconcileReport,
    ) -> Result<u32, DataplaneError> {
        let name = Self::bridge_name(plan.vni);
        let mac = names::bridge_mac(plan.vni);
        let existing = links.iter().find(|l| l.name == name);
        if let Some(l) = existing {
            if l.kind == Some(InfoKind::Bridge) {
                let mut fix = nl::set_msg(l.index);
                let mut changed = Vec::new();
                if l.mtu != Some(plan.mtu) {
                    fix = fix.mtu(plan.mtu);
                    changed.push("mtu");
                }
                if l.mac != Some(mac) {
                    fix = fix.address(mac.0.to_vec());
                    changed.push("mac");
                }
                if !changed.is_empty() {
                    nl::set_link(&self.handle, fix.build(), &name).await?;
                }
                if !l.up {
                    nl::quiet_up(&self.handle, l.index, &name).await?;
                    changed.push("up");
                }
                if !changed.is_empty() {
                    info!(vni = %plan.vni, device = %name, ?changed, mtu = plan.mtu, "bridge settings corrected");
                }
                return Ok(l.index);
            }
            warn!(vni = %plan.vni, device = %name, kind = ?l.kind, "device with a bridge's name is not a bridge: replacing");
            nl::delete_link(&self.handle, l.index, &name).await?;
        }
        let msg = LinkBridge::new(&name)
            .mtu(plan.mtu)
            .address(mac.0.to_vec())
            .down()
            .build();
        nl::add_link(&self.handle, msg, &format!("bridge {name}")).await?;
        report.created_devices += 1;
        let l = nl::must_find(&self.handle, &name).await?;
        nl::quiet_up(&self.handle, l.index, &name).await?;
        info!(vni = %plan.vni, device = %name, ifindex = l.index, mtu = plan.mtu, mac = %mac, mode = %plan.mode, "bridge created");
        Ok(l.index)
    }

    /// Puts host veth ends labelled with this VNI back on the bridge (after
    /// a bridge was deleted underneath us and recreated).
    async fn reattach_ports(
        &self,
        vni: Vni,
        links: &[Link],
        bridge: u32,
    ) -> Result<usize, DataplaneError> {
        let mut n = 0;
        for l in links {
            let ours = names::is_host_ifname(&l.name)
                && l.alias.as_deref().and_then(names::vni_of_alias) == Some(vni);
            if ours && l.master != Some(bridge) {
                nl::set_link(
                    &self.handle,
                    nl::set_msg(l.index).controller(bridge).build(),
                    &l.name,
                )
                .await?;
                if !l.up {
                    nl::quiet_up(&self.handle, l.index, &l.name).await?;
                }
                info!(vni = %vni, device = %l.name, "endpoint port put back on its bridge");
                n += 1;
            }
        }
        Ok(n)
    }

    /// Deletes the network's VTEP devices (of every mode) and its bridge
    /// (entries go with them). Idempotent.
    pub async fn remove_network(&self, vni: Vni) -> Result<(), DataplaneError> {
        let _g = self.lock.lock().await;
        // Counted before: a failure midway may have removed one device.
        self.changed();
        for (_, vtep) in self.vteps() {
            vtep.remove(vni).await?;
        }
        let name = Self::bridge_name(vni);
        if let Some(l) = nl::link_by_name(&self.handle, &name).await?
            && nl::delete_link(&self.handle, l.index, &name).await?
        {
            info!(vni = %vni, device = %name, "bridge removed");
        }
        Ok(())
    }

    /// VNIs that have a bridge or a VTEP device on this host.
    pub async fn networks_present(&self) -> Result<Vec<Vni>, DataplaneError> {
        Ok(self.inventory().await?.networks)
    }

    /// Endpoints' host ends and networks' bridges from one link dump, and
    /// each VTEP's devices from the VTEP itself.
    pub async fn inventory(&self) -> Result<Inventory, DataplaneError> {
        let links = nl::links(&self.handle).await?;
        let mut networks: Vec<Vni> = links
            .iter()
            .filter_map(|l| names::vni_of_device(&l.name, BRIDGE_PREFIX))
            .collect();
        let mut vteps = Vec::new();
        for (mode, vtep) in self.vteps() {
            let present = vtep.present().await?;
            networks.extend(present.iter().copied());
            vteps.push((mode, present));
        }
        networks.sort();
        networks.dedup();
        Ok(Inventory {
            host_ends: links
                .iter()
                .filter(|l| names::is_host_ifname(&l.name))
                .map(|l| l.name.clone())
                .collect(),
            networks,
            vteps,
        })
    }

    /// What the data plane holds for the network of `mode` at `vni`.
    pub async fn kernel_view(
        &self,
        mode: NetworkMode,
        vni: Vni,
    ) -> Result<KernelView, DataplaneError> {
        let bridge = nl::link_by_name(&self.handle, &Self::bridge_name(vni)).await?;
        let mut view = match self.vtep(mode) {
            Some(v) => v.view(vni).await?,
            None => KernelView::default(),
        };
        view.bridge = bridge.is_some_and(|l| l.kind == Some(InfoKind::Bridge));
        Ok(view)
    }

    /// Re-reads the interface holding the data-path address `addr`: hands
    /// its index to the VXLAN VTEP (its devices' lower device) and returns
    /// its MTU.
    pub async fn refresh_underlay(&self, addr: IpAddr) -> Result<u32, DataplaneError> {
        let index = nl::link_holding(&self.handle, addr)
            .await?
            .ok_or(DataplaneError::UnderlayNotFound(addr))?;
        let link = nl::link_by_index(&self.handle, index)
            .await?
            .ok_or(DataplaneError::UnderlayNotFound(addr))?;
        let mtu = link.mtu.ok_or_else(|| {
            DataplaneError::KernelReply(format!("link {} reported no MTU", link.name))
        })?;
        self.vxlan.set_underlay(index, mtu);
        Ok(mtu)
    }
}
