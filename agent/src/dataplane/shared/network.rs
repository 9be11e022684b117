//! Per-network operations: the network's sandbox namespace, in it the
//! bridge (shared by both modes) holding the network's gateway address and,
//! on the bridge, the network's VTEP, chosen by the plan's mode. Reconciled
//! against a dump of the sandbox.

use std::net::IpAddr;

use rtnetlink::packet_route::link::InfoKind;
use rtnetlink::{Handle, LinkBridge};
use tracing::{info, warn};

use super::names;
use crate::dataplane::netlink::{self as nl, Link};
use crate::dataplane::netns;
use crate::dataplane::sandbox::{self, Sandbox};
use crate::dataplane::{
    Dataplane, DataplaneError, Inventory, KernelView, NetworkMode, NetworkPlan, ReconcileReport,
    Vtep,
};
use crate::ids::Vni;
use crate::metrics::RateLimit;

static EGRESS_LOG: RateLimit = RateLimit::new(std::time::Duration::from_secs(30));

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
        let r = async {
            let sb = self.sandbox_or_make(plan.vni).await?;
            self.ensure_locked(plan, &sb, vtep.as_ref()).await
        }
        .await;
        if !matches!(r, Ok(report) if report.is_empty()) {
            self.changed();
        }
        r
    }

    async fn ensure_locked(
        &self,
        plan: &NetworkPlan,
        sb: &Sandbox,
        vtep: &dyn Vtep,
    ) -> Result<ReconcileReport, DataplaneError> {
        let mut report = ReconcileReport::default();
        let h = &sb.handle;
        let links = nl::links(h).await?;
        let bridge = ensure_bridge(h, plan, &links, &mut report).await?;
        report.added += ensure_gateway(h, plan, bridge).await?;
        // A failing way out (no nft binary, a full transit pool) must not
        // take the overlay down with it: logged, retried next pass.
        match self.ensure_egress(sb, plan).await {
            Ok(n) => report.added += n,
            Err(e) => {
                if let Some(suppressed) = EGRESS_LOG.check(std::time::Instant::now()) {
                    warn!(vni = %plan.vni, error = %e, suppressed, "egress not set up; retrying next pass");
                }
            }
        }
        for (mode, other) in self.vteps() {
            if mode != plan.mode {
                other.remove(plan.vni, Some(sb)).await?;
            }
        }
        let r = vtep.ensure(plan, sb, bridge).await?;
        report.added += r.added;
        report.removed += r.removed;
        report.created_devices += r.created_devices;
        report.added += reattach_ports(h, plan.vni, &links, bridge).await?;
        Ok(report)
    }

    /// Deletes the network's VTEP devices (of every mode), its bridge and
    /// its sandbox (with whatever is still in it). Idempotent.
    pub async fn remove_network(&self, vni: Vni) -> Result<(), DataplaneError> {
        let _g = self.lock.lock().await;
        // Counted before: a failure midway may have removed one device.
        self.changed();
        let sb = self.sandbox(vni).await?;
        for (_, vtep) in self.vteps() {
            vtep.remove(vni, sb.as_deref()).await?;
        }
        // Logged inside; the sandbox still goes (a leftover NAT table of a
        // removed network matches nothing).
        let _ = self.remove_egress(vni).await;
        let Some(sb) = sb else {
            return Ok(());
        };
        // Endpoints' veths first and explicitly: the namespace itself goes
        // only once the last socket in it closed, and a container must not
        // keep its interface until then.
        let bridge = Self::bridge_name(vni);
        for l in nl::links(&sb.handle).await? {
            if (names::is_host_ifname(&l.name) || l.name == bridge)
                && nl::delete_link(&sb.handle, l.index, &l.name).await?
            {
                info!(vni = %vni, device = %l.name, "removed with the network");
            }
        }
        self.forget_sandbox(vni);
        let path = sb.path.clone();
        drop(sb);
        let p = path.clone();
        netns::blocking(move || sandbox::destroy(&p)).await?;
        info!(vni = %vni, netns = %path.display(), "network sandbox removed");
        Ok(())
    }

    /// VNIs that have a sandbox on this host.
    pub async fn networks_present(&self) -> Result<Vec<Vni>, DataplaneError> {
        Ok(self.inventory().await?.networks)
    }

    /// Per sandbox, the IPv4 addresses its bridge holds (the gateway),
    /// read from the kernel: a restarted agent binds its resolvers there
    /// before its store has caught up.
    pub async fn served_gateways(
        &self,
    ) -> Result<Vec<(std::path::PathBuf, IpAddr)>, DataplaneError> {
        let mut out = Vec::new();
        for sb in self.sandboxes().await? {
            let Some(br) = nl::link_by_name(&sb.handle, &Dataplane::bridge_name(sb.vni)).await?
            else {
                continue;
            };
            for (ip, _) in nl::addresses(&sb.handle, br.index).await? {
                if ip.is_ipv4() {
                    out.push((sb.path.clone(), ip));
                }
            }
        }
        Ok(out)
    }

    /// Per sandbox, from one link dump each: the endpoints' host ends and
    /// which VTEPs hold a device.
    pub async fn inventory(&self) -> Result<Inventory, DataplaneError> {
        let mut inv = Inventory::default();
        let mut by_mode: Vec<(NetworkMode, Vec<Vni>)> =
            self.vteps().map(|(m, _)| (m, Vec::new())).collect();
        for sb in self.sandboxes().await? {
            let links = nl::links(&sb.handle).await?;
            inv.host_ends.extend(
                links
                    .iter()
                    .filter(|l| names::is_host_ifname(&l.name))
                    .map(|l| l.name.clone()),
            );
            inv.networks.push(sb.vni);
            for ((_, vtep), (_, vnis)) in self.vteps().zip(by_mode.iter_mut()) {
                if vtep.present(&sb).await? {
                    vnis.push(sb.vni);
                }
            }
        }
        inv.networks.sort();
        inv.networks.dedup();
        inv.vteps = by_mode;
        Ok(inv)
    }

    /// What the data plane holds for the network of `mode` at `vni`.
    pub async fn kernel_view(
        &self,
        mode: NetworkMode,
        vni: Vni,
    ) -> Result<KernelView, DataplaneError> {
        let sb = self.sandbox(vni).await?;
        let mut view = match self.vtep(mode) {
            Some(v) => v.view(vni, sb.as_deref()).await?,
            None => KernelView::default(),
        };
        if let Some(sb) = sb {
            let bridge = nl::link_by_name(&sb.handle, &Self::bridge_name(vni)).await?;
            view.bridge = bridge.is_some_and(|l| l.kind == Some(InfoKind::Bridge));
        }
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

/// The network's bridge in its sandbox: fixed MAC, MTU, up.
async fn ensure_bridge(
    h: &Handle,
    plan: &NetworkPlan,
    links: &[Link],
    report: &mut ReconcileReport,
) -> Result<u32, DataplaneError> {
    let name = Dataplane::bridge_name(plan.vni);
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
                nl::set_link(h, fix.build(), &name).await?;
            }
            if !l.up {
                nl::quiet_up(h, l.index, &name).await?;
                changed.push("up");
            }
            if !changed.is_empty() {
                info!(vni = %plan.vni, device = %name, ?changed, mtu = plan.mtu, "bridge settings corrected");
            }
            return Ok(l.index);
        }
        warn!(vni = %plan.vni, device = %name, kind = ?l.kind, "device with a bridge's name is not a bridge: replacing");
        nl::delete_link(h, l.index, &name).await?;
    }
    let msg = LinkBridge::new(&name)
        .mtu(plan.mtu)
        .address(mac.0.to_vec())
        .down()
        .build();
    nl::add_link(h, msg, &format!("bridge {name}")).await?;
    report.created_devices += 1;
    let l = nl::must_find(h, &name).await?;
    nl::quiet_up(h, l.index, &name).await?;
    info!(vni = %plan.vni, device = %name, ifindex = l.index, mtu = plan.mtu, mac = %mac, mode = %plan.mode, "bridge created");
    Ok(l.index)
}

/// The network's gateway address on its bridge: every host answers for
/// it inside its own sandbox (a distributed gateway, DESIGN.md "Gateway
/// and egress"); the VTEPs' ARP proxies never carry a request for it to
/// another host, as it is in no table. Returns 1 when it was added.
async fn ensure_gateway(
    h: &Handle,
    plan: &NetworkPlan,
    bridge: u32,
) -> Result<usize, DataplaneError> {
    let Some(gw) = plan.gateway else {
        return Ok(0);
    };
    let what = format!("bridge {}", Dataplane::bridge_name(plan.vni));
    if !nl::ensure_address(h, bridge, IpAddr::V4(gw.ip()), gw.prefix(), &what).await? {
        return Ok(0);
    }
    info!(vni = %plan.vni, gateway = %gw, "gateway address set on the network's bridge");
    Ok(1)
}

/// Puts host veth ends labelled with this VNI back on the bridge (after
/// a bridge was deleted underneath us and recreated).
async fn reattach_ports(
    h: &Handle,
    vni: Vni,
    links: &[Link],
    bridge: u32,
) -> Result<usize, DataplaneError> {
    let mut n = 0;
    for l in links {
        let ours = names::is_host_ifname(&l.name)
            && l.alias.as_deref().and_then(names::vni_of_alias) == Some(vni);
        if ours && l.master != Some(bridge) {
            nl::set_link(h, nl::set_msg(l.index).controller(bridge).build(), &l.name).await?;
            if !l.up {
                nl::quiet_up(h, l.index, &l.name).await?;
            }
            info!(vni = %vni, device = %l.name, "endpoint port put back on its bridge");
            n += 1;
        }
    }
    Ok(n)
}
