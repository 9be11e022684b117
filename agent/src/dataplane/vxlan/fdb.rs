//! The VXLAN device's tables at the OS edge: FDB (AF_BRIDGE, NTF_SELF) and
//! neighbour entries, packed, written, deleted and dumped into plain data.

use std::net::IpAddr;

use futures::{Stream, StreamExt, TryStreamExt};
use rtnetlink::Handle;
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkMessage,
    NetlinkPayload,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};

use super::plan::{FdbSeen, NeighSeen, Observed};
use crate::dataplane::DataplaneError;
use crate::dataplane::netlink::{self, Ctx, mac_of};
use crate::ids::MacAddr;

/// An FDB entry on a VXLAN device (`bridge fdb ... self permanent dst`).
pub(crate) fn fdb_message(vx_index: u32, mac: MacAddr, dst: IpAddr) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = vx_index;
    m.header.state = NeighbourState::Permanent;
    m.header.flags = NeighbourFlags::Own; // NTF_SELF: the VXLAN device's table
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    m.attributes
        .push(NeighbourAttribute::Destination(dst.into()));
    m
}

/// A permanent neighbour entry IP → MAC on `index`.
pub(crate) fn neigh_message(index: u32, ip: IpAddr, mac: Option<MacAddr>) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    m.header.ifindex = index;
    m.header.state = NeighbourState::Permanent;
    m.attributes
        .push(NeighbourAttribute::Destination(ip.into()));
    if let Some(mac) = mac {
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
    }
    m
}

/// Header flags of an FDB/neighbour write. `append` is for all-zero flood
/// entries: without NLM_F_APPEND a second one would replace the first
/// (rtnetlink's builder has no append, rtnetlink issue #60).
pub(crate) fn write_flags(append: bool) -> u16 {
    NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | if append { NLM_F_APPEND } else { NLM_F_REPLACE }
}

async fn expect_ack(
    mut replies: impl Stream<Item = NetlinkMessage<RouteNetlinkMessage>> + Unpin,
) -> Result<(), rtnetlink::Error> {
    while let Some(msg) = replies.next().await {
        if let NetlinkPayload::Error(e) = msg.payload
            && e.code.is_some()
        {
            return Err(rtnetlink::Error::NetlinkError(e));
        }
    }
    Ok(())
}

/// RTM_NEWNEIGH with explicit header flags.
pub(crate) async fn neigh_write(
    h: &Handle,
    msg: NeighbourMessage,
    flags: u16,
) -> Result<(), rtnetlink::Error> {
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(msg));
    req.header.flags = flags;
    expect_ack(Box::pin(h.clone().request(req)?)).await
}

/// RTM_DELNEIGH; an entry that is already gone is not an error.
pub(crate) async fn neigh_delete(
    h: &Handle,
    msg: NeighbourMessage,
) -> Result<(), rtnetlink::Error> {
    match h.neighbours().del(msg).execute().await {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code().abs() == libc::ENOENT => Ok(()),
        other => other,
    }
}

pub(crate) fn dst_of(attr: &NeighbourAddress) -> Option<IpAddr> {
    match attr {
        NeighbourAddress::Inet(a) => Some((*a).into()),
        NeighbourAddress::Inet6(a) => Some((*a).into()),
        // AF_BRIDGE dumps carry the destination as raw bytes.
        NeighbourAddress::Other(b) => match b.len() {
            4 => <[u8; 4]>::try_from(b.as_slice()).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(b.as_slice()).ok().map(IpAddr::from),
            _ => None,
        },
        _ => None,
    }
}

/// The VXLAN device's own FDB (NTF_SELF) and its neighbour entries.
pub(crate) async fn observe(h: &Handle, vx_index: u32) -> Result<Observed, DataplaneError> {
    let _dump = netlink::dump_guard().await;
    let mut seen = Observed::default();
    let fdb: Vec<NeighbourMessage> = h
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute()
        .try_collect()
        .await
        .ctx(|| "dump bridge fdb".into())?;
    for m in fdb {
        let h = &m.header;
        if h.ifindex != vx_index
            || !h.flags.contains(NeighbourFlags::Own)
            || h.flags.contains(NeighbourFlags::Controller)
        {
            continue;
        }
        let (mut mac, mut dst, mut overridden) = (None, None, false);
        for a in &m.attributes {
            match a {
                NeighbourAttribute::LinkLayerAddress(b) => mac = mac_of(b),
                NeighbourAttribute::Destination(d) => dst = dst_of(d),
                NeighbourAttribute::Port(_)
                | NeighbourAttribute::Vni(_)
                | NeighbourAttribute::IfIndex(_) => overridden = true,
                _ => {}
            }
        }
        if let (Some(mac), Some(dst)) = (mac, dst) {
            let clean = h.state == NeighbourState::Permanent && !overridden;
            seen.fdb.push(FdbSeen { mac, dst, clean });
        }
    }
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let msgs: Vec<NeighbourMessage> = h
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await
            .ctx(|| "dump neighbours".into())?;
        for m in msgs {
            // NOARP entries (multicast, broadcast) belong to the kernel.
            if m.header.ifindex != vx_index || m.header.state == NeighbourState::Noarp {
                continue;
            }
            let clean = m.header.state == NeighbourState::Permanent;
            let (mut ip, mut mac) = (None, None);
            for a in &m.attributes {
                match a {
                    NeighbourAttribute::Destination(d) => ip = dst_of(d),
                    NeighbourAttribute::LinkLayerAddress(b) => mac = mac_of(b),
                    _ => {}
                }
            }
            if let Some(ip) = ip {
                seen.neigh.push(NeighSeen { ip, mac, clean });
            }
        }
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdb_message_targets_the_vxlan_devices_own_table() {
        let mac = MacAddr([2, 0x42, 1, 2, 3, 4]);
        let m = fdb_message(7, mac, "198.18.0.2".parse().unwrap());
        assert_eq!(m.header.family, AddressFamily::Bridge);
        assert_eq!(m.header.ifindex, 7);
        assert_eq!(m.header.flags, NeighbourFlags::Own);
        assert_eq!(m.header.state, NeighbourState::Permanent);
        assert!(
            m.attributes
                .contains(&NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()))
        );
        let dst = m.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(d) => dst_of(d),
            _ => None,
        });
        assert_eq!(dst, Some("198.18.0.2".parse().unwrap()));
    }

    #[test]
    fn flood_entries_append_and_unicast_entries_replace() {
        assert_ne!(write_flags(true) & NLM_F_APPEND, 0);
        assert_eq!(write_flags(true) & NLM_F_REPLACE, 0);
        assert_ne!(write_flags(false) & NLM_F_REPLACE, 0);
        assert_eq!(write_flags(false) & NLM_F_APPEND, 0);
        assert_ne!(write_flags(false) & NLM_F_CREATE, 0);
    }

    #[test]
    fn raw_bridge_destinations_parse() {
        assert_eq!(
            dst_of(&NeighbourAddress::Other(vec![198, 18, 0, 1])),
            Some("198.18.0.1".parse().unwrap())
        );
        assert_eq!(dst_of(&NeighbourAddress::Other(vec![1, 2, 3])), None);
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        let IpAddr::V6(b) = v6 else { unreachable!() };
        assert_eq!(
            dst_of(&NeighbourAddress::Other(b.octets().to_vec())),
            Some(v6)
        );
    }

    #[test]
    fn neighbour_message_is_permanent_on_the_device() {
        let m = neigh_message(
            9,
            "198.19.0.3".parse().unwrap(),
            Some(MacAddr([2, 0x42, 0, 0, 0, 3])),
        );
        assert_eq!(m.header.family, AddressFamily::Inet);
        assert_eq!(m.header.ifindex, 9);
        assert_eq!(m.header.state, NeighbourState::Permanent);
        assert_eq!(m.attributes.len(), 2);
    }
}
