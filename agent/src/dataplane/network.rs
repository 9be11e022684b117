//! Per-network devices and entries: bridge + VXLAN device, FDB, neighbour
//! and flood entries, reconciled against a dump of the kernel.

use std::net::IpAddr;

use rtnetlink::LinkBridge;
use rtnetlink::LinkVxlan;
use rtnetlink::packet_route::link::InfoKind;
use tracing::{info, warn};

use super::fdb;
use super::netlink::{self as nl, Ctx, Link};
use super::plan::{self, VxlanAction};
use super::{
    BRIDGE_PREFIX, Dataplane, DataplaneError, Inventory, KernelView, NetworkPlan, ReconcileReport,
    VXLAN_PREFIX,
};
use crate::ids::{MacAddr, Vni};

fn network_vnis(links: &[Link]) -> Vec<Vni> {
    let mut vnis: Vec<Vni> = links
        .iter()
        .filter_map(|l| {
            plan::vni_of_device(&l.name, BRIDGE_PREFIX)
                .or_else(|| plan::vni_of_device(&l.name, VXLAN_PREFIX))
        })
        .collect();
    vnis.sort();
    vnis.dedup();
    vnis
}

impl Dataplane {
    /// Makes the kernel match `plan`: the bridge (fixed MAC, MTU, up), the
    /// VXLAN device (VNI, local, dstport, dev, learning off, ARP proxy on,
    /// l2miss and l3miss on when created, on the bridge, MTU, up), and exactly the planned FDB, neighbour and
    /// flood entries. Reads the kernel back to decide: a device whose
    /// immutable settings match is never recreated, so an agent restart
    /// does not interrupt traffic. Idempotent.
    pub async fn ensure_network(
        &self,
        plan: &NetworkPlan,
    ) -> Result<ReconcileReport, DataplaneError> {
        let _g = self.lock.lock().await;
        let r = self.ensure_locked(plan).await;
        if !matches!(r, Ok(report) if report == ReconcileReport::default()) {
            self.changed();
        }
        r
    }

    async fn ensure_locked(&self, plan: &NetworkPlan) -> Result<ReconcileReport, DataplaneError> {
        let mut report = ReconcileReport::default();
        let links = nl::links(&self.handle).await?;
        let bridge = self.ensure_bridge(plan, &links, &mut report).await?;
        let vxlan = self.ensure_vxlan(plan, &links, bridge, &mut report).await?;
        report.added += self.reattach_ports(plan.vni, &links, bridge).await?;
        let seen = fdb::observe(&self.handle, vxlan).await?;
        let d = plan::diff(plan, &seen);
        self.apply(plan.vni, vxlan, &d).await?;
        report.added += d.added();
        report.removed += d.removed();
        Ok(report)
    }

    async fn ensure_bridge(
        &self,
        plan: &NetworkPlan,
        links: &[Link],
        report: &mut ReconcileReport,
    ) -> Result<u32, DataplaneError> {
        let name = Self::bridge_name(plan.vni);
        let mac = plan::bridge_mac(plan.vni);
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
        let l = self.must_find(&name).await?;
        nl::quiet_up(&self.handle, l.index, &name).await?;
        info!(vni = %plan.vni, device = %name, ifindex = l.index, mtu = plan.mtu, mac = %mac, "bridge created");
        Ok(l.index)
    }

    async fn ensure_vxlan(
        &self,
        plan: &NetworkPlan,
        links: &[Link],
        bridge: u32,
        report: &mut ReconcileReport,
    ) -> Result<u32, DataplaneError> {
        let name = Self::vxlan_name(plan.vni);
        if let Some(l) = links.iter().find(|l| l.name == name) {
            let action = match (&l.kind, &l.vxlan) {
                (Some(InfoKind::Vxlan), Some(params)) => plan::vxlan_action(plan, params),
                _ => VxlanAction::Recreate,
            };
            match action {
                VxlanAction::Recreate => {
                    warn!(vni = %plan.vni, device = %name, have = ?l.vxlan, local = %plan.local_vtep,
                          port = plan.vxlan_port, dev = ?plan.underlay_ifindex, "VXLAN device settings differ: recreating");
                    nl::delete_link(&self.handle, l.index, &name).await?;
                }
                VxlanAction::Change => {
                    let msg = rtnetlink::LinkMessageBuilder::<LinkVxlan>::new(&name)
                        .index(l.index)
                        .learning(false)
                        .build();
                    nl::change_link(&self.handle, msg, &name).await?;
                    info!(vni = %plan.vni, device = %name, "VXLAN learning turned off");
                    self.fix_port(plan, l, bridge, &name).await?;
                    return Ok(l.index);
                }
                VxlanAction::Keep => {
                    self.fix_port(plan, l, bridge, &name).await?;
                    return Ok(l.index);
                }
            }
        }
        // l2miss/l3miss report what the proxy could not answer, so the
        // agent repairs a missing entry at once (see `miss.rs`). Like
        // `proxy` they cannot be changed in place, so a device from an
        // older agent keeps working without them rather than being
        // recreated under traffic (`plan::vxlan_action` ignores them).
        let mut b = LinkVxlan::new(&name, plan.vni.get())
            .port(plan.vxlan_port)
            .learning(false)
            .proxy(true)
            .l2miss(true)
            .l3miss(true);
        b = match plan.local_vtep {
            IpAddr::V4(a) => b.local(a),
            IpAddr::V6(a) => b.local6(a),
        };
        if let Some(dev) = plan.underlay_ifindex {
            b = b.dev(dev);
        }
        let msg = b.mtu(plan.mtu).controller(bridge).build();
        nl::add_link(&self.handle, msg, &format!("VXLAN device {name}")).await?;
        report.created_devices += 1;
        let l = self.must_find(&name).await?;
        nl::quiet_up(&self.handle, l.index, &name).await?;
        info!(vni = %plan.vni, device = %name, ifindex = l.index, local = %plan.local_vtep, port = plan.vxlan_port,
              dev = ?plan.underlay_ifindex, mtu = plan.mtu, "VXLAN device created");
        Ok(l.index)
    }

    /// Master, MTU and up state of an existing VXLAN device.
    async fn fix_port(
        &self,
        plan: &NetworkPlan,
        l: &Link,
        bridge: u32,
        name: &str,
    ) -> Result<(), DataplaneError> {
        let mut fix = nl::set_msg(l.index);
        let mut changed = Vec::new();
        if l.master != Some(bridge) {
            fix = fix.controller(bridge);
            changed.push("master");
        }
        if l.mtu != Some(plan.mtu) {
            fix = fix.mtu(plan.mtu);
            changed.push("mtu");
        }
        if !changed.is_empty() {
            nl::set_link(&self.handle, fix.build(), name).await?;
        }
        if !l.up {
            nl::quiet_up(&self.handle, l.index, name).await?;
            changed.push("up");
        }
        if !changed.is_empty() {
            info!(vni = %plan.vni, device = %name, ?changed, mtu = plan.mtu, "VXLAN device settings corrected");
        }
        Ok(())
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
            let ours = plan::is_host_ifname(&l.name)
                && l.alias.as_deref().and_then(plan::vni_of_alias) == Some(vni);
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

    async fn apply(&self, vni: Vni, vx: u32, d: &plan::EntryDiff) -> Result<(), DataplaneError> {
        let h = &self.handle;
        let dev = Self::vxlan_name(vni);
        let zero = MacAddr([0; 6]);
        for (mac, dst) in &d.fdb_remove {
            fdb::neigh_delete(h, fdb::fdb_message(vx, *mac, *dst))
                .await
                .ctx(|| format!("delete fdb {mac} dst {dst} on {dev}"))?;
            info!(vni = %vni, device = %dev, mac = %mac, vtep = %dst, "fdb entry removed");
        }
        for dst in &d.flood_remove {
            fdb::neigh_delete(h, fdb::fdb_message(vx, zero, *dst))
                .await
                .ctx(|| format!("delete flood entry {dst} on {dev}"))?;
            info!(vni = %vni, device = %dev, vtep = %dst, "flood entry removed");
        }
        for ip in &d.neigh_remove {
            fdb::neigh_delete(h, fdb::neigh_message(vx, *ip, None))
                .await
                .ctx(|| format!("delete neighbour {ip} on {dev}"))?;
            info!(vni = %vni, device = %dev, ip = %ip, "neighbour entry removed");
        }
        for (mac, dst) in &d.fdb_set {
            fdb::neigh_write(h, fdb::fdb_message(vx, *mac, *dst), fdb::write_flags(false))
                .await
                .ctx(|| format!("set fdb {mac} dst {dst} on {dev}"))?;
            info!(vni = %vni, device = %dev, mac = %mac, vtep = %dst, "fdb entry set");
        }
        for dst in &d.flood_add {
            fdb::neigh_write(h, fdb::fdb_message(vx, zero, *dst), fdb::write_flags(true))
                .await
                .ctx(|| format!("append flood entry {dst} on {dev}"))?;
            info!(vni = %vni, device = %dev, vtep = %dst, "flood entry added");
        }
        for (ip, mac) in &d.neigh_set {
            fdb::neigh_write(
                h,
                fdb::neigh_message(vx, *ip, Some(*mac)),
                fdb::write_flags(false),
            )
            .await
            .ctx(|| format!("set neighbour {ip} lladdr {mac} on {dev}"))?;
            info!(vni = %vni, device = %dev, ip = %ip, mac = %mac, "neighbour entry set");
        }
        Ok(())
    }

    pub(super) async fn must_find(&self, name: &str) -> Result<Link, DataplaneError> {
        nl::link_by_name(&self.handle, name).await?.ok_or_else(|| {
            DataplaneError::KernelReply(format!("{name} missing right after its creation"))
        })
    }

    /// Deletes the network's VXLAN device and bridge (entries go with
    /// them). Idempotent.
    pub async fn remove_network(&self, vni: Vni) -> Result<(), DataplaneError> {
        let _g = self.lock.lock().await;
        // Counted before: a failure midway may have removed one device.
        self.changed();
        for name in [Self::vxlan_name(vni), Self::bridge_name(vni)] {
            if let Some(l) = nl::link_by_name(&self.handle, &name).await?
                && nl::delete_link(&self.handle, l.index, &name).await?
            {
                info!(vni = %vni, device = %name, "device removed");
            }
        }
        Ok(())
    }

    /// VNIs that have a bridge or VXLAN device on this host.
    pub async fn networks_present(&self) -> Result<Vec<Vni>, DataplaneError> {
        Ok(network_vnis(&nl::links(&self.handle).await?))
    }

    /// Networks' devices and endpoints' host ends, from one link dump.
    pub async fn inventory(&self) -> Result<Inventory, DataplaneError> {
        let links = nl::links(&self.handle).await?;
        Ok(Inventory {
            host_ends: links
                .iter()
                .filter(|l| plan::is_host_ifname(&l.name))
                .map(|l| l.name.clone())
                .collect(),
            networks: network_vnis(&links),
        })
    }

    /// What the kernel holds for the network.
    pub async fn kernel_view(&self, vni: Vni) -> Result<KernelView, DataplaneError> {
        let bridge = nl::link_by_name(&self.handle, &Self::bridge_name(vni)).await?;
        let vxlan = nl::link_by_name(&self.handle, &Self::vxlan_name(vni)).await?;
        let mut view = KernelView {
            bridge: bridge.is_some_and(|l| l.kind == Some(InfoKind::Bridge)),
            vxlan: vxlan
                .as_ref()
                .is_some_and(|l| l.kind == Some(InfoKind::Vxlan)),
            ..KernelView::default()
        };
        if let Some(vx) = vxlan.filter(|_| view.vxlan) {
            let seen = fdb::observe(&self.handle, vx.index).await?;
            for e in seen.fdb {
                if e.mac.is_zero() {
                    view.flood.push(e.dst);
                } else {
                    view.fdb.push((e.mac, e.dst));
                }
            }
            view.neigh = seen
                .neigh
                .into_iter()
                .filter_map(|n| Some((n.ip, n.mac?)))
                .collect();
        }
        view.fdb.sort();
        view.neigh.sort();
        view.flood.sort();
        Ok(view)
    }

    /// MTU and index of the interface holding `addr` (the data path).
    pub async fn underlay_mtu(&self, addr: IpAddr) -> Result<(u32, u32), DataplaneError> {
        let index = nl::link_holding(&self.handle, addr)
            .await?
            .ok_or(DataplaneError::UnderlayNotFound(addr))?;
        let link = nl::link_by_index(&self.handle, index)
            .await?
            .ok_or(DataplaneError::UnderlayNotFound(addr))?;
        let mtu = link.mtu.ok_or_else(|| {
            DataplaneError::KernelReply(format!("link {} reported no MTU", link.name))
        })?;
        Ok((mtu, index))
    }
}
