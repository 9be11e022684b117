//! Local endpoints: a veth pair per endpoint, host end on the network's
//! bridge in the network's sandbox, far end created directly inside the
//! container's namespace, with a default route via the gateway.

use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth};
use rtnetlink::{Handle, LinkUnspec, LinkVeth};
use tracing::{info, warn};

use super::names;
use crate::dataplane::netlink::{self as nl, Link};
use crate::dataplane::{
    BRIDGE_PREFIX, Dataplane, DataplaneError, FarEnd, LocalEndpoint, Sandbox, netns,
};
use crate::ids::{EndpointId, Vni};

impl Dataplane {
    /// Connects `ep` to the network's bridge. Idempotent: an existing,
    /// correct pair is left alone (settings that drifted are corrected); a
    /// failure midway removes the pair it created.
    pub async fn attach(&self, vni: Vni, ep: &LocalEndpoint) -> Result<(), DataplaneError> {
        if !names::valid_ifname(&ep.ifname) {
            return Err(DataplaneError::BadIfname(ep.ifname.clone()));
        }
        let _g = self.lock.lock().await;
        let host = Self::host_ifname(ep.id);
        let sb = self
            .sandbox(vni)
            .await?
            .ok_or(DataplaneError::NetworkMissing(vni))?;
        let sbh = &sb.handle;
        let bridge = nl::link_by_name(sbh, &Self::bridge_name(vni))
            .await?
            .filter(|l| l.kind == Some(InfoKind::Bridge))
            .ok_or(DataplaneError::NetworkMissing(vni))?;
        let ns_file = netns::open(&ep.netns)?;
        let (ns, _conn) = netns::connect_in(&ep.netns).await?;

        if let Some(h) = nl::link_by_name(sbh, &host).await? {
            match nl::link_by_name(&ns, &ep.ifname).await? {
                Some(c) if h.peer == Some(c.index) && c.peer == Some(h.index) => {
                    converge_host(sbh, vni, ep, &h, bridge.index).await?;
                    if ep.far_end == FarEnd::HandedOff {
                        return Ok(());
                    }
                    return converge_inside(&ns, vni, ep, &c).await;
                }
                _ => {
                    // Our name, but its peer is not `ifname` in that
                    // namespace: a leftover of an earlier attach.
                    warn!(vni = %vni, endpoint = %ep.id, device = %host, netns = %ep.netns.display(),
                          "host end exists without the expected peer: recreating the pair");
                    if nl::delete_link(sbh, h.index, &host).await? {
                        info!(vni = %vni, endpoint = %ep.id, device = %host, "stale veth pair removed");
                    }
                }
            }
        }
        if nl::link_by_name(&ns, &ep.ifname).await?.is_some() {
            return Err(DataplaneError::IfnameTaken {
                netns: ep.netns.clone(),
                ifname: ep.ifname.clone(),
            });
        }

        let peer = LinkUnspec::new_with_name(&ep.ifname)
            .address(ep.mac.0.to_vec())
            .mtu(ep.mtu)
            .setns_by_fd(ns_file.as_raw_fd())
            .build();
        let msg = LinkVeth::new(&host, &ep.ifname)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .mtu(ep.mtu)
            .controller(bridge.index)
            .build();
        nl::add_link(
            sbh,
            msg,
            &format!("veth {host} (peer {} in {})", ep.ifname, ep.netns.display()),
        )
        .await?;
        drop(ns_file);
        info!(vni = %vni, endpoint = %ep.id, device = %host, peer = %ep.ifname, netns = %ep.netns.display(), "veth pair created");

        let configured = async {
            let h = nl::must_find(sbh, &host).await?;
            converge_host(sbh, vni, ep, &h, bridge.index).await?;
            if ep.far_end == FarEnd::HandedOff {
                return Ok(());
            }
            let c = nl::link_by_name(&ns, &ep.ifname).await?.ok_or_else(|| {
                DataplaneError::KernelReply(format!(
                    "{} missing in {}",
                    ep.ifname,
                    ep.netns.display()
                ))
            })?;
            converge_inside(&ns, vni, ep, &c).await
        }
        .await;
        if let Err(e) = configured {
            warn!(vni = %vni, endpoint = %ep.id, device = %host, error = %e, "attach failed: removing the veth pair");
            if let Some(h) = nl::link_by_name(sbh, &host).await.ok().flatten()
                && let Err(del) = nl::delete_link(sbh, h.index, &host).await
            {
                warn!(endpoint = %ep.id, device = %host, error = %del, "cleanup failed");
            }
            return Err(e);
        }
        Ok(())
    }

    /// The sandbox holding the endpoint's host end, and that end.
    async fn host_end(
        &self,
        id: EndpointId,
    ) -> Result<Option<(Arc<Sandbox>, Link)>, DataplaneError> {
        let host = Self::host_ifname(id);
        for sb in self.sandboxes().await? {
            if let Some(h) = nl::link_by_name(&sb.handle, &host).await? {
                return Ok(Some((sb, h)));
            }
        }
        Ok(None)
    }

    /// Removes the endpoint's veth pair (deleting the host end removes
    /// both). Idempotent.
    pub async fn detach(&self, id: EndpointId) -> Result<(), DataplaneError> {
        let _g = self.lock.lock().await;
        if let Some((sb, h)) = self.host_end(id).await?
            && nl::delete_link(&sb.handle, h.index, &h.name).await?
        {
            info!(vni = %sb.vni, endpoint = %id, device = %h.name, "veth pair removed");
        }
        Ok(())
    }

    /// Whether the host end exists (a destroyed namespace takes the pair
    /// with it).
    pub async fn endpoint_present(&self, id: EndpointId) -> Result<bool, DataplaneError> {
        Ok(self.host_end(id).await?.is_some())
    }

    /// What differs from `ep` as attached: its host end on the network's
    /// bridge, and inside its namespace its interface (the host end's
    /// peer) with MAC, MTU, address and up. Reads only. A namespace that
    /// is gone is a problem, not an error.
    pub async fn endpoint_problems(
        &self,
        vni: Vni,
        ep: &LocalEndpoint,
    ) -> Result<Vec<String>, DataplaneError> {
        let mut problems = Vec::new();
        let host = Self::host_ifname(ep.id);
        let Some(sb) = self.sandbox(vni).await? else {
            problems.push(format!(
                "the network's sandbox {} is missing",
                self.sandbox_path(vni).display()
            ));
            return Ok(problems);
        };
        let bridge = nl::link_by_name(&sb.handle, &Self::bridge_name(vni)).await?;
        let Some(h) = nl::link_by_name(&sb.handle, &host).await? else {
            problems.push(format!("host end {host} is missing"));
            return Ok(problems);
        };
        if bridge.is_none() || h.master != bridge.as_ref().map(|b| b.index) {
            problems.push(format!("host end {host} is not on the network's bridge"));
        }
        if !h.up {
            problems.push(format!("host end {host} is down"));
        }
        let (ns, _conn) = match netns::connect_in(&ep.netns).await {
            Ok(c) => c,
            Err(e) => {
                problems.push(format!("namespace {}: {e}", ep.netns.display()));
                return Ok(problems);
            }
        };
        let where_ = format!("{} in {}", ep.ifname, ep.netns.display());
        let Some(c) = nl::link_by_name(&ns, &ep.ifname).await? else {
            problems.push(format!("{where_} is missing"));
            return Ok(problems);
        };
        if c.peer != Some(h.index) {
            problems.push(format!("{where_} is not the peer of {host}"));
        }
        if c.mac != Some(ep.mac) {
            let has = c.mac.map_or_else(|| "none".to_string(), |m| m.to_string());
            problems.push(format!("{where_} has MAC {has}, attached with {}", ep.mac));
        }
        if c.mtu != Some(ep.mtu) {
            let has = c.mtu.unwrap_or_default();
            problems.push(format!(
                "{where_} has MTU {has}, the network's is {}",
                ep.mtu
            ));
        }
        if !c.up {
            problems.push(format!("{where_} is down"));
        }
        let want = (ep.addr.ip(), ep.addr.prefix());
        if !nl::addresses(&ns, c.index).await?.contains(&want) {
            problems.push(format!("{where_} lacks its address {}", ep.addr));
        }
        if let Some(IpAddr::V4(gw)) = ep.gateway
            && nl::default_route_v4(&ns).await? != Some((Some(gw), Some(c.index)))
        {
            problems.push(format!(
                "{} lacks its default route via {gw}",
                ep.netns.display()
            ));
        }
        Ok(problems)
    }

    /// The MTU of every endpoint's host end, from one link dump.
    pub async fn host_end_mtus(&self) -> Result<Vec<(String, Option<u32>)>, DataplaneError> {
        let mut out = Vec::new();
        for sb in self.sandboxes().await? {
            out.extend(
                nl::links(&sb.handle)
                    .await?
                    .into_iter()
                    .filter(|l| names::is_host_ifname(&l.name))
                    .map(|l| (l.name, l.mtu)),
            );
        }
        Ok(out)
    }

    /// Moves a live endpoint to `mtu` (a network's MTU follows its member
    /// hosts, DESIGN.md "MTU"). Lowering changes the far end in the
    /// container first and raising the host end first, so the container
    /// never sends what its host end would drop. An endpoint whose
    /// namespace is gone is left to the orphan sweep.
    pub async fn set_endpoint_mtu(
        &self,
        vni: Vni,
        id: EndpointId,
        netns: &std::path::Path,
        ifname: &str,
        mtu: u32,
    ) -> Result<(), DataplaneError> {
        let _g = self.lock.lock().await;
        let host = Self::host_ifname(id);
        let Some(sb) = self.sandbox(vni).await? else {
            return Ok(());
        };
        let Some(h) = nl::link_by_name(&sb.handle, &host).await? else {
            return Ok(());
        };
        if !netns.exists() {
            return Ok(());
        }
        let (ns, _conn) = netns::connect_in(netns).await?;
        let where_ = format!("{ifname} in {}", netns.display());
        let is_peer = |c: &Link| c.peer == Some(h.index) && h.peer == Some(c.index);
        let c = match nl::link_by_name(&ns, ifname).await? {
            Some(c) if is_peer(&c) => c,
            // A runtime that configures the far end itself (Docker) renamed
            // it when it moved it in: find it as the host end's peer.
            _ => match nl::links(&ns).await?.into_iter().find(is_peer) {
                Some(c) => c,
                None => {
                    return Err(DataplaneError::KernelReply(format!(
                        "{where_} is not the peer of {host}"
                    )));
                }
            },
        };
        let set_inside = async {
            if c.mtu != Some(mtu) {
                nl::set_link(&ns, nl::set_msg(c.index).mtu(mtu).build(), &where_).await?;
            }
            Ok::<(), DataplaneError>(())
        };
        let set_host = async {
            if h.mtu != Some(mtu) {
                nl::set_link(&sb.handle, nl::set_msg(h.index).mtu(mtu).build(), &host).await?;
            }
            Ok::<(), DataplaneError>(())
        };
        if h.mtu.is_some_and(|m| m < mtu) {
            set_host.await?;
            set_inside.await?;
        } else {
            set_inside.await?;
            set_host.await?;
        }
        self.changed();
        info!(vni = %vni, endpoint = %id, device = %host, peer = %ifname, netns = %netns.display(),
              from = ?h.mtu, mtu, "endpoint MTU changed to the network's");
        Ok(())
    }

    /// Host ends (`ovl` + 8 hex veths) and the network whose bridge each is
    /// enslaved to.
    pub async fn local_endpoints(&self) -> Result<Vec<(String, Option<Vni>)>, DataplaneError> {
        let mut out = Vec::new();
        for sb in self.sandboxes().await? {
            let links = nl::links(&sb.handle).await?;
            let vni_of_master = |m: u32| {
                let master = links.iter().find(|l| l.index == m)?;
                names::vni_of_device(&master.name, BRIDGE_PREFIX)
            };
            out.extend(
                links
                    .iter()
                    .filter(|l| names::is_host_ifname(&l.name) && l.kind == Some(InfoKind::Veth))
                    .map(|l| (l.name.clone(), l.master.and_then(vni_of_master))),
            );
        }
        Ok(out)
    }
}

/// Container end: MAC, MTU, address, up; `lo` up.
async fn converge_inside(
    ns: &Handle,
    vni: Vni,
    ep: &LocalEndpoint,
    c: &Link,
) -> Result<(), DataplaneError> {
    let where_ = || format!("{} in {}", ep.ifname, ep.netns.display());
    let mut fix = nl::set_msg(c.index);
    let mut changed = Vec::new();
    if c.mac != Some(ep.mac) {
        fix = fix.address(ep.mac.0.to_vec());
        changed.push("mac");
    }
    if c.mtu != Some(ep.mtu) {
        fix = fix.mtu(ep.mtu);
        changed.push("mtu");
    }
    if !changed.is_empty() {
        nl::set_link(ns, fix.build(), &where_()).await?;
    }
    if nl::ensure_address(ns, c.index, ep.addr.ip(), ep.addr.prefix(), &where_()).await? {
        changed.push("address");
    }
    if !c.up {
        nl::set_link(ns, nl::set_msg(c.index).up().build(), &where_()).await?;
        changed.push("up");
    }
    if let Some(IpAddr::V4(gw)) = ep.gateway
        && nl::default_route_v4(ns).await? != Some((Some(gw), Some(c.index)))
    {
        nl::set_default_route_v4(ns, gw, c.index, &where_()).await?;
        changed.push("default route");
    }
    match nl::link_by_name(ns, "lo").await? {
        Some(lo) if !lo.up => {
            nl::set_link(
                ns,
                nl::set_msg(lo.index).up().build(),
                &format!("lo in {}", ep.netns.display()),
            )
            .await?;
            changed.push("lo up");
        }
        _ => {}
    }
    if !changed.is_empty() {
        info!(vni = %vni, endpoint = %ep.id, device = %ep.ifname, netns = %ep.netns.display(), addr = %ep.addr,
              mac = %ep.mac, ?changed, "container end configured");
    }
    Ok(())
}

/// Host end: on the bridge, MTU, up, alias naming the network.
async fn converge_host(
    sbh: &Handle,
    vni: Vni,
    ep: &LocalEndpoint,
    h: &Link,
    bridge: u32,
) -> Result<(), DataplaneError> {
    let alias = names::host_alias(vni, ep.id);
    let mut fix = nl::set_msg(h.index);
    let mut changed = Vec::new();
    if h.master != Some(bridge) {
        fix = fix.controller(bridge);
        changed.push("master");
    }
    if h.mtu != Some(ep.mtu) {
        fix = fix.mtu(ep.mtu);
        changed.push("mtu");
    }
    if h.alias.as_deref() != Some(alias.as_str()) {
        fix = fix.alias(alias);
        changed.push("alias");
    }
    if !changed.is_empty() {
        nl::set_link(sbh, fix.build(), &h.name).await?;
    }
    if !h.up {
        nl::quiet_up(sbh, h.index, &h.name).await?;
        changed.push("up");
    }
    if !changed.is_empty() {
        info!(vni = %vni, endpoint = %ep.id, device = %h.name, ?changed, "host end configured");
    }
    Ok(())
}
