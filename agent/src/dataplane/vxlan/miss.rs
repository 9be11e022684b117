//! The OS edge for the VXLAN devices' miss notifications. With `l3miss`
//! the kernel reports an ARP request the device's proxy could not answer
//! (no neighbour entry for the target), and with `l2miss` a unicast frame
//! with no FDB entry (nor a flood entry), as `RTM_GETNEIGH` on the
//! `RTNLGRP_NEIGH` group, `AF_BRIDGE`, with `NDA_DST` (L3) or `NDA_LLADDR`
//! (L2). The agent answers them from its table at once (Docker's overlay
//! driver does the same), instead of leaving the entry to the next pass.

use std::net::IpAddr;
use std::path::Path;

use futures::StreamExt;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::neighbour::{NeighbourAttribute, NeighbourMessage};

use super::fdb::dst_of;
use crate::dataplane::DataplaneError;
use crate::dataplane::netlink::mac_of;
use crate::dataplane::netns::{self, ConnTask};
use crate::ids::MacAddr;

/// `RTNLGRP_NEIGH` (linux/rtnetlink.h).
const RTNLGRP_NEIGH: u32 = 3;

/// One miss the kernel reported on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// An ARP request for `ip` found no neighbour entry (l3miss).
    Ip { ifindex: u32, ip: IpAddr },
    /// A unicast frame to `mac` found no FDB entry (l2miss).
    Mac { ifindex: u32, mac: MacAddr },
}

/// Miss notifications of this namespace's devices, until the returned task
/// is dropped.
pub struct Misses {
    rx: futures::channel::mpsc::UnboundedReceiver<(
        NetlinkMessage<RouteNetlinkMessage>,
        rtnetlink::sys::SocketAddr,
    )>,
    _conn: ConnTask,
}

impl Misses {
    /// The next miss; `None` when the socket closed. Other neighbour
    /// notifications on the group are skipped.
    pub async fn next(&mut self) -> Option<Miss> {
        loop {
            let (msg, _) = self.rx.next().await?;
            if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetNeighbour(n)) = msg.payload
                && let Some(m) = parse(&n)
            {
                return Some(m);
            }
        }
    }
}

/// A kernel miss report, or `None` for anything else.
pub(crate) fn parse(n: &NeighbourMessage) -> Option<Miss> {
    let ifindex = n.header.ifindex;
    let mut ip = None;
    let mut mac = None;
    for a in &n.attributes {
        match a {
            NeighbourAttribute::Destination(d) => ip = dst_of(d),
            NeighbourAttribute::LinkLayerAddress(b) => mac = mac_of(b),
            _ => {}
        }
    }
    match (ip, mac) {
        (Some(ip), None) => Some(Miss::Ip { ifindex, ip }),
        (None, Some(mac)) if !mac.is_zero() => Some(Miss::Mac { ifindex, mac }),
        _ => None,
    }
}

/// Subscribes to miss notifications in the calling thread's namespace.
/// Needs a tokio runtime.
fn subscribe_here() -> Result<Misses, DataplaneError> {
    let (mut conn, _handle, rx) = rtnetlink::new_connection().map_err(DataplaneError::Socket)?;
    use rtnetlink::sys::AsyncSocket;
    let socket = conn.socket_mut().socket_mut();
    // Bound first: an unbound socket has port id 0, the kernel's own,
    // and the kernel skips the sender when it delivers a multicast.
    socket.bind_auto().map_err(DataplaneError::Socket)?;
    socket
        .add_membership(RTNLGRP_NEIGH)
        .map_err(DataplaneError::Socket)?;
    Ok(Misses {
        rx,
        _conn: netns::spawn_conn(conn),
    })
}

/// Miss notifications of the devices in the namespace at `path` (a
/// network's sandbox, where its VXLAN device lives).
pub(crate) async fn subscribe_in(path: &Path) -> Result<Misses, DataplaneError> {
    netns::run_in(path, subscribe_here).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::AddressFamily;
    use rtnetlink::packet_route::neighbour::NeighbourAddress;

    fn msg(attrs: Vec<NeighbourAttribute>) -> NeighbourMessage {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Bridge;
        m.header.ifindex = 7;
        m.attributes = attrs;
        m
    }

    #[test]
    fn l3_and_l2_misses_parse_and_others_do_not() {
        let ip = std::net::Ipv4Addr::new(198, 19, 0, 9);
        assert_eq!(
            parse(&msg(vec![NeighbourAttribute::Destination(
                NeighbourAddress::Other(ip.octets().to_vec())
            )])),
            Some(Miss::Ip {
                ifindex: 7,
                ip: ip.into()
            })
        );
        let mac = [2, 0x42, 198, 19, 0, 9];
        assert_eq!(
            parse(&msg(vec![NeighbourAttribute::LinkLayerAddress(
                mac.to_vec()
            )])),
            Some(Miss::Mac {
                ifindex: 7,
                mac: MacAddr(mac)
            })
        );
        // An ordinary FDB entry notification carries both: not a miss.
        assert_eq!(
            parse(&msg(vec![
                NeighbourAttribute::LinkLayerAddress(mac.to_vec()),
                NeighbourAttribute::Destination(NeighbourAddress::Other(ip.octets().to_vec())),
            ])),
            None
        );
        assert_eq!(parse(&msg(vec![])), None);
    }
}
