//! The OS edge for links and addresses: dumps parsed into plain data, and
//! requests with errors that name what failed (FDB and neighbour tables are
//! in `fdb.rs`). Replies are outside data: nothing here unwraps them.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{
    AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InfoData, InfoKind, InfoVxlan, LinkAttribute,
    LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// `RT_TABLE_MAIN` (linux/rtnetlink.h).
const RT_TABLE_MAIN: u8 = 254;

use super::DataplaneError;
use super::vxlan::plan::VxlanParams;
use crate::ids::MacAddr;

/// A link as dumped, reduced to what the data plane looks at.
#[derive(Debug, Clone, Default)]
pub(crate) struct Link {
    pub index: u32,
    pub name: String,
    pub kind: Option<InfoKind>,
    pub master: Option<u32>,
    pub mtu: Option<u32>,
    pub up: bool,
    pub mac: Option<MacAddr>,
    /// IFLA_LINK: for a veth, the peer's index (in the peer's namespace).
    pub peer: Option<u32>,
    pub alias: Option<String>,
    pub vxlan: Option<VxlanParams>,
}

pub(crate) trait Ctx<T> {
    /// Names the failed operation in the error.
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, DataplaneError>;
}

impl<T> Ctx<T> for Result<T, rtnetlink::Error> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, DataplaneError> {
        self.map_err(|source| DataplaneError::Netlink {
            what: what(),
            source,
        })
    }
}

/// The errno of a netlink error reply, positive.
pub(crate) fn errno(e: &DataplaneError) -> Option<i32> {
    match e {
        DataplaneError::Netlink {
            source: rtnetlink::Error::NetlinkError(m),
            ..
        } => Some(m.raw_code().abs()),
        _ => None,
    }
}

pub(crate) fn mac_of(bytes: &[u8]) -> Option<MacAddr> {
    Some(MacAddr(bytes.try_into().ok()?))
}

pub(crate) fn parse_link(msg: LinkMessage) -> Option<Link> {
    let mut link = Link {
        index: msg.header.index,
        up: msg.header.flags.contains(LinkFlags::Up),
        ..Link::default()
    };
    for attr in msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::Controller(m) if m != 0 => link.master = Some(m),
            LinkAttribute::Mtu(m) => link.mtu = Some(m),
            LinkAttribute::Address(a) => link.mac = mac_of(&a),
            LinkAttribute::Link(p) => link.peer = Some(p),
            LinkAttribute::IfAlias(a) => link.alias = Some(a),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(k) => link.kind = Some(k),
                        LinkInfo::Data(InfoData::Vxlan(v)) => link.vxlan = Some(vxlan_params(v)),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    (!link.name.is_empty()).then_some(link)
}

fn vxlan_params(infos: Vec<InfoVxlan>) -> VxlanParams {
    let mut p = VxlanParams::default();
    for i in infos {
        match i {
            InfoVxlan::Id(v) => p.vni = Some(v),
            InfoVxlan::Local(a) => p.local = Some(a.into()),
            InfoVxlan::Local6(a) => p.local = Some(a.into()),
            InfoVxlan::Port(v) => p.port = Some(v),
            InfoVxlan::Link(v) if v != 0 => p.dev = Some(v),
            InfoVxlan::Learning(v) => p.learning = Some(v),
            InfoVxlan::Proxy(v) => p.proxy = Some(v),
            _ => {}
        }
    }
    p
}

/// The kernel runs one dump per netlink socket at a time and answers a
/// second concurrent one with EBUSY; attach and the reconciler dump
/// concurrently, so every dump takes this lock (dumps are short).
static DUMP: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub(crate) async fn dump_guard() -> tokio::sync::MutexGuard<'static, ()> {
    DUMP.lock().await
}

pub(crate) async fn links(h: &Handle) -> Result<Vec<Link>, DataplaneError> {
    let _dump = dump_guard().await;
    let msgs: Vec<LinkMessage> = h
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .ctx(|| "dump links".into())?;
    Ok(msgs.into_iter().filter_map(parse_link).collect())
}

pub(crate) async fn link_by_name(h: &Handle, name: &str) -> Result<Option<Link>, DataplaneError> {
    one_link(h.link().get().match_name(name), || {
        format!("get link {name}")
    })
    .await
}

pub(crate) async fn link_by_index(h: &Handle, index: u32) -> Result<Option<Link>, DataplaneError> {
    one_link(h.link().get().match_index(index), || {
        format!("get link {index}")
    })
    .await
}

async fn one_link(
    req: rtnetlink::LinkGetRequest,
    what: impl FnOnce() -> String,
) -> Result<Option<Link>, DataplaneError> {
    let mut s = std::pin::pin!(req.execute());
    match s.try_next().await.ctx(what) {
        Ok(Some(msg)) => Ok(parse_link(msg)),
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A link that must exist: it was created a moment ago.
pub(crate) async fn must_find(h: &Handle, name: &str) -> Result<Link, DataplaneError> {
    link_by_name(h, name).await?.ok_or_else(|| {
        DataplaneError::KernelReply(format!("{name} missing right after its creation"))
    })
}

/// Deletes a link; `false` if it was already gone.
pub(crate) async fn delete_link(
    h: &Handle,
    index: u32,
    name: &str,
) -> Result<bool, DataplaneError> {
    match h
        .link()
        .del(index)
        .execute()
        .await
        .ctx(|| format!("delete link {name}"))
    {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Adds a link (NLM_F_CREATE | NLM_F_EXCL).
pub(crate) async fn add_link(
    h: &Handle,
    msg: LinkMessage,
    what: &str,
) -> Result<(), DataplaneError> {
    h.link()
        .add(msg)
        .execute()
        .await
        .ctx(|| format!("create {what}"))
}

/// RTM_SETLINK (mtu, master, flags, address, alias).
pub(crate) async fn set_link(
    h: &Handle,
    msg: LinkMessage,
    what: &str,
) -> Result<(), DataplaneError> {
    h.link()
        .set(msg)
        .execute()
        .await
        .ctx(|| format!("configure {what}"))
}

/// RTM_NEWLINK without NLM_F_CREATE: changes kind-specific settings.
pub(crate) async fn change_link(
    h: &Handle,
    msg: LinkMessage,
    what: &str,
) -> Result<(), DataplaneError> {
    h.link()
        .change(msg)
        .execute()
        .await
        .ctx(|| format!("change {what}"))
}

/// Brings a link up without an IPv6 link-local address, so the host never
/// speaks on the overlay itself. Two requests: the kernel refuses IFLA_AF_SPEC
/// at creation, and RTM_SETLINK applies flags before IFLA_AF_SPEC.
pub(crate) async fn quiet_up(h: &Handle, index: u32, what: &str) -> Result<(), DataplaneError> {
    let no_addrgen =
        LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(vec![AfSpecInet6::AddrGenMode(
            In6AddrGenMode::None,
        )])]);
    set_link(
        h,
        set_msg(index).append_extra_attribute(no_addrgen).build(),
        what,
    )
    .await?;
    set_link(h, set_msg(index).up().build(), what).await
}

/// A RTM_SETLINK message for the link at `index`.
pub(crate) fn set_msg(index: u32) -> rtnetlink::LinkMessageBuilder<LinkUnspec> {
    LinkUnspec::new_with_index(index)
}

/// Addresses (IP, prefix length) on the link at `index`.
pub(crate) async fn addresses(h: &Handle, index: u32) -> Result<Vec<(IpAddr, u8)>, DataplaneError> {
    let _dump = dump_guard().await;
    let msgs: Vec<_> = h
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .ctx(|| format!("dump addresses of link {index}"))?;
    let mut out = Vec::new();
    for m in msgs {
        if m.header.index != index {
            continue;
        }
        for a in &m.attributes {
            if let AddressAttribute::Address(ip) = a {
                out.push((*ip, m.header.prefix_len));
            }
        }
    }
    Ok(out)
}

/// Adds `ip/prefix` to link `index` unless it holds it already; `what`
/// names the link in errors. Returns whether it was added.
pub(crate) async fn ensure_address(
    h: &Handle,
    index: u32,
    ip: IpAddr,
    prefix: u8,
    what: &str,
) -> Result<bool, DataplaneError> {
    if addresses(h, index).await?.contains(&(ip, prefix)) {
        return Ok(false);
    }
    h.address()
        .add(index, ip, prefix)
        .execute()
        .await
        .ctx(|| format!("add {ip}/{prefix} to {what}"))?;
    Ok(true)
}

/// The index of the link holding `addr` (as address or local address).
pub(crate) async fn link_holding(h: &Handle, addr: IpAddr) -> Result<Option<u32>, DataplaneError> {
    let _dump = dump_guard().await;
    let msgs: Vec<_> = h
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .ctx(|| "dump addresses".into())?;
    Ok(msgs
        .iter()
        .find(|m| {
            m.attributes.iter().any(|a| match a {
                AddressAttribute::Address(ip) | AddressAttribute::Local(ip) => *ip == addr,
                _ => false,
            })
        })
        .map(|m| m.header.index))
}

/// The IPv4 default route of the main table: its next hop and output
/// interface, if there is one.
pub(crate) async fn default_route_v4(
    h: &Handle,
) -> Result<Option<(Option<Ipv4Addr>, Option<u32>)>, DataplaneError> {
    let _dump = dump_guard().await;
    let msgs: Vec<RouteMessage> = h
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .ctx(|| "dump IPv4 routes".into())?;
    Ok(msgs
        .iter()
        .filter(|m| m.header.destination_prefix_length == 0 && m.header.table == RT_TABLE_MAIN)
        .map(|m| {
            let (mut gw, mut oif) = (None, None);
            for a in &m.attributes {
                match a {
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(*g),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            (gw, oif)
        })
        .next())
}

/// Sets (replaces) the IPv4 default route: via `gw` on the link `oif`.
pub(crate) async fn set_default_route_v4(
    h: &Handle,
    gw: Ipv4Addr,
    oif: u32,
    what: &str,
) -> Result<(), DataplaneError> {
    h.route()
        .add(
            RouteMessageBuilder::<Ipv4Addr>::new()
                .gateway(gw)
                .output_interface(oif)
                .build(),
        )
        .replace()
        .execute()
        .await
        .ctx(|| format!("set default route via {gw} on {what}"))
}
