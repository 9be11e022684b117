//! The kernel VXLAN VTEP (plain networks): per network a VXLAN device
//! (VNI, local = data-path address, dstport, learning off, ARP proxy on,
//! l2miss/l3miss on) on the network's bridge; per remote endpoint a
//! permanent FDB entry MAC → remote VTEP and a permanent neighbour entry
//! IP → MAC; per peer host an all-zero flood entry (DESIGN.md, "Plain data
//! plane (kernel)"). The UDP port and the underlay device are this VTEP's
//! own settings, not the plan's.

use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};

use async_trait::async_trait;
use rtnetlink::packet_route::link::InfoKind;
use rtnetlink::{Handle, LinkVxlan};
use tracing::{info, warn};

use super::netlink::{self as nl, Ctx, Link};
use super::{DataplaneError, KernelView, NetworkPlan, ReconcileReport, Sandbox, Vtep};
use crate::ids::{MacAddr, Vni};
use plan::{Settings, VxlanAction};

pub(crate) mod fdb;
pub mod miss;
pub(crate) mod plan;

/// Prefix of a network's VXLAN device: `ovlvx-<vni>`.
pub const DEVICE_PREFIX: &str = "ovlvx-";
/// IANA VXLAN port (RFC 7348 §5).
pub const VXLAN_PORT: u16 = 4789;

/// The VXLAN VTEP's own configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanConfig {
    /// VXLAN `dstport` and listening port (`--data-path-port`).
    pub port: u16,
}

impl Default for VxlanConfig {
    fn default() -> Self {
        Self { port: VXLAN_PORT }
    }
}

/// Kernel VXLAN devices in the data plane's namespace.
pub struct VxlanVtep {
    handle: Handle,
    cfg: VxlanConfig,
    /// Index of the interface holding the data-path address (VXLAN `dev`);
    /// 0 until the data plane has read it (see
    /// [`super::Dataplane::refresh_underlay`]).
    underlay: AtomicU32,
    /// That interface's MTU (0 until read).
    underlay_mtu: AtomicU32,
}

impl VxlanVtep {
    pub(crate) fn new(handle: Handle, cfg: VxlanConfig) -> Self {
        Self {
            handle,
            cfg,
            underlay: AtomicU32::new(0),
            underlay_mtu: AtomicU32::new(0),
        }
    }

    pub fn device_name(vni: Vni) -> String {
        format!("{DEVICE_PREFIX}{vni}")
    }

    /// The interface holding the data-path address moved (or was first
    /// read): devices created from now on use it as their lower device,
    /// and one bound elsewhere is recreated at its next `ensure`.
    pub(crate) fn set_underlay(&self, ifindex: u32, mtu: u32) {
        self.underlay.store(ifindex, Ordering::Relaxed);
        self.underlay_mtu.store(mtu, Ordering::Relaxed);
    }

    /// The device's MTU: the network's, but never more than the kernel
    /// lets a VXLAN device have over its lower device (its MTU − 50 on an
    /// IPv4 underlay, − 70 on IPv6: the kernel's VXLAN headroom; creating
    /// above it is silently clamped, changing above it is EINVAL). Only a
    /// `--mtu` larger than this host's path asks for more, and `network
    /// inspect` flags that network.
    fn device_mtu(&self, plan: &NetworkPlan) -> u32 {
        let headroom = match plan.local_vtep {
            IpAddr::V4(_) => crate::planner::PLAIN_OVERHEAD,
            IpAddr::V6(_) => crate::planner::PLAIN_OVERHEAD + 20,
        };
        match self.underlay_mtu.load(Ordering::Relaxed) {
            0 => plan.mtu,
            u => plan.mtu.min(u.saturating_sub(headroom).max(68)),
        }
    }

    fn settings(&self) -> Settings {
        Settings {
            port: self.cfg.port,
            dev: match self.underlay.load(Ordering::Relaxed) {
                0 => None,
                i => Some(i),
            },
        }
    }

    async fn ensure_device(
        &self,
        plan: &NetworkPlan,
        s: &Settings,
        sb: &Sandbox,
        bridge: u32,
        report: &mut ReconcileReport,
    ) -> Result<u32, DataplaneError> {
        let name = Self::device_name(plan.vni);
        let h = &sb.handle;
        if let Some(l) = nl::link_by_name(h, &name).await? {
            let action = match (&l.kind, &l.vxlan) {
                (Some(InfoKind::Vxlan), Some(params)) => plan::vxlan_action(plan, s, params),
                _ => VxlanAction::Recreate,
            };
            match action {
                VxlanAction::Recreate => {
                    warn!(vni = %plan.vni, device = %name, have = ?l.vxlan, local = %plan.local_vtep,
                          port = s.port, dev = ?s.dev, "VXLAN device settings differ: recreating");
                    nl::delete_link(h, l.index, &name).await?;
                }
                VxlanAction::Change => {
                    let msg = rtnetlink::LinkMessageBuilder::<LinkVxlan>::new(&name)
                        .index(l.index)
                        .learning(false)
                        .build();
                    nl::change_link(h, msg, &name).await?;
                    info!(vni = %plan.vni, device = %name, "VXLAN device learning turned off");
                    self.fix_port(plan, h, &l, bridge, &name).await?;
                    return Ok(l.index);
                }
                VxlanAction::Keep => {
                    self.fix_port(plan, h, &l, bridge, &name).await?;
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
            .port(s.port)
            .learning(false)
            .proxy(true)
            .l2miss(true)
            .l3miss(true);
        b = match plan.local_vtep {
            IpAddr::V4(a) => b.local(a),
            IpAddr::V6(a) => b.local6(a),
        };
        if let Some(dev) = s.dev {
            b = b.dev(dev);
        }
        let mtu = self.device_mtu(plan);
        // Created from the host namespace straight into the sandbox: the
        // kernel looks the lower device up, and opens the UDP socket, in
        // the namespace of the request (the underlay), while the device
        // itself lives in the sandbox (IFLA_NET_NS_FD).
        let msg = b.mtu(mtu).setns_by_fd(sb.ns.as_raw_fd()).build();
        nl::add_link(&self.handle, msg, &format!("VXLAN device {name}")).await?;
        report.created_devices += 1;
        let l = nl::must_find(h, &name).await?;
        nl::set_link(h, nl::set_msg(l.index).controller(bridge).build(), &name).await?;
        nl::quiet_up(h, l.index, &name).await?;
        info!(vni = %plan.vni, device = %name, ifindex = l.index, local = %plan.local_vtep, port = s.port,
              dev = ?s.dev, mtu, netns = %sb.path.display(), "VXLAN device created");
        Ok(l.index)
    }

    /// Master, MTU and up state of an existing VXLAN device.
    async fn fix_port(
        &self,
        plan: &NetworkPlan,
        h: &Handle,
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
        let mtu = self.device_mtu(plan);
        if l.mtu != Some(mtu) {
            fix = fix.mtu(mtu);
            changed.push("mtu");
        }
        if !changed.is_empty() {
            nl::set_link(h, fix.build(), name).await?;
        }
        if !l.up {
            nl::quiet_up(h, l.index, name).await?;
            changed.push("up");
        }
        if !changed.is_empty() {
            info!(vni = %plan.vni, device = %name, ?changed, mtu, "VXLAN device settings corrected");
        }
        Ok(())
    }

    async fn apply(
        &self,
        h: &Handle,
        vni: Vni,
        vx: u32,
        d: &plan::EntryDiff,
    ) -> Result<(), DataplaneError> {
        let dev = Self::device_name(vni);
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
}

#[async_trait]
impl Vtep for VxlanVtep {
    /// The VXLAN device (created with the VTEP's port and underlay device,
    /// or adopted when its immutable settings match, so an agent restart
    /// does not interrupt traffic; on the bridge, MTU, up) and exactly the
    /// planned FDB, neighbour and flood entries.
    async fn ensure(
        &self,
        plan: &NetworkPlan,
        sb: &Sandbox,
        bridge_ifindex: u32,
    ) -> Result<ReconcileReport, DataplaneError> {
        let mut report = ReconcileReport::default();
        let s = self.settings();
        let vx = self
            .ensure_device(plan, &s, sb, bridge_ifindex, &mut report)
            .await?;
        let seen = fdb::observe(&sb.handle, vx).await?;
        let d = plan::diff(plan, &seen);
        self.apply(&sb.handle, plan.vni, vx, &d).await?;
        report.added += d.added();
        report.removed += d.removed();
        Ok(report)
    }

    async fn remove(&self, vni: Vni, sb: Option<&Sandbox>) -> Result<(), DataplaneError> {
        let Some(sb) = sb else {
            return Ok(());
        };
        let name = Self::device_name(vni);
        if let Some(l) = nl::link_by_name(&sb.handle, &name).await?
            && nl::delete_link(&sb.handle, l.index, &name).await?
        {
            info!(vni = %vni, device = %name, "VXLAN device removed");
        }
        Ok(())
    }

    async fn present(&self, sb: &Sandbox) -> Result<bool, DataplaneError> {
        Ok(nl::link_by_name(&sb.handle, &Self::device_name(sb.vni))
            .await?
            .is_some())
    }

    async fn view(&self, vni: Vni, sb: Option<&Sandbox>) -> Result<KernelView, DataplaneError> {
        let Some(sb) = sb else {
            return Ok(KernelView::default());
        };
        let dev = nl::link_by_name(&sb.handle, &Self::device_name(vni))
            .await?
            .filter(|l| l.kind == Some(InfoKind::Vxlan));
        let mut view = KernelView {
            vtep: dev.is_some(),
            ..KernelView::default()
        };
        if let Some(vx) = dev {
            let seen = fdb::observe(&sb.handle, vx.index).await?;
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
}
