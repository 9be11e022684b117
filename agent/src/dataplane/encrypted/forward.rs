//! Forwarding decisions of the encrypted VTEP (sans-IO: a frame in, a
//! decision out; the ARP reply is built into a caller buffer).
//!
//! Transmit (a frame read from the network's TAP):
//! - unicast destination MAC in the network's table → [`Egress::Unicast`]
//!   to the host holding it;
//! - ARP request (RFC 826) for an IPv4 address in the table →
//!   [`Egress::ArpReply`], answered locally like the kernel VXLAN's `proxy`
//!   mode. An ARP request for an address not in the table is dropped
//!   ([`Dropped::ArpUnknown`]), as the plain data plane's proxy does: a local
//!   container answers for itself over the bridge, and a remote one is in
//!   the table once its record arrived. Gratuitous ARP (sender IP = target
//!   IP) and ARP replies to broadcast only announce addresses the control
//!   plane already distributes: dropped ([`Dropped::Gratuitous`]).
//! - other broadcast and multicast (IPv6 neighbour discovery, DHCP, mDNS)
//!   → [`Egress::Flood`] to every peer host of the network;
//! - unknown unicast → dropped ([`Dropped::NoRoute`]). The table is complete
//!   by construction (the control plane distributes every endpoint, there
//!   is no learning), so a MAC missing from it is either local (the bridge
//!   had not learned it yet) or gone; flooding it would send a container's
//!   traffic, sealed, to hosts that are not its destination.
//!
//! Receive: an opened frame for VNI `v` from node `N` is delivered only if
//! `v` is a local encrypted network, `N` is one of its peer hosts, and the
//! frame's source MAC is one of `N`'s endpoints in it ([`ingress`]): the
//! pair key proves which host sealed a frame, the table says which
//! containers that host may speak for.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use super::counters::Dropped;
use crate::ids::{MacAddr, NodeId};

/// Ethernet header: destination (6), source (6), EtherType (2).
pub const ETH_LEN: usize = 14;
const ETHERTYPE_ARP: u16 = 0x0806;
/// ARP for IPv4 over Ethernet (RFC 826): 28 bytes after the Ethernet header.
const ARP_LEN: usize = 28;
/// Ethernet + ARP: the reply's length.
pub const ARP_REPLY_LEN: usize = ETH_LEN + ARP_LEN;
const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;

/// Who is where in one network (the contract's `Forwarding`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forwarding {
    /// Remote endpoints: MAC, IPv4 address, host.
    pub remotes: Vec<(MacAddr, Ipv4Addr, NodeId)>,
    /// Remote hosts having endpoints in the network: broadcast goes to
    /// them, and received frames are accepted only from them.
    pub peers: Vec<NodeId>,
}

/// [`Forwarding`] indexed for the hot path.
#[derive(Debug, Clone, Default)]
pub struct Table {
    by_mac: HashMap<MacAddr, NodeId>,
    by_ip: HashMap<Ipv4Addr, MacAddr>,
    /// Sorted, deduplicated.
    peers: Vec<NodeId>,
    members: HashSet<NodeId>,
}

impl Table {
    pub fn new(fwd: &Forwarding) -> Self {
        let mut peers = fwd.peers.clone();
        peers.sort();
        peers.dedup();
        Self {
            by_mac: fwd.remotes.iter().map(|(m, _, n)| (*m, *n)).collect(),
            by_ip: fwd.remotes.iter().map(|(m, ip, _)| (*ip, *m)).collect(),
            members: peers.iter().copied().collect(),
            peers,
        }
    }

    /// Peer hosts, the flood list.
    pub fn peers(&self) -> &[NodeId] {
        &self.peers
    }

    pub fn is_member(&self, node: NodeId) -> bool {
        self.members.contains(&node)
    }
}

/// What to do with a frame read from the TAP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// Seal and send to this host.
    Unicast(NodeId),
    /// Seal once per peer host ([`Table::peers`]) and send to each.
    Flood,
    /// An ARP reply of this many bytes is in the caller's buffer: write it
    /// back to the TAP.
    ArpReply(usize),
    Dropped(Dropped),
}

fn is_group(mac: &[u8]) -> bool {
    mac[0] & 1 == 1
}

/// Decides where `frame` goes; an ARP reply is built into `reply`
/// (at least [`ARP_REPLY_LEN`] bytes, else the request is dropped as
/// malformed, which no caller does).
pub fn egress(table: &Table, frame: &[u8], reply: &mut [u8]) -> Egress {
    if frame.len() < ETH_LEN {
        return Egress::Dropped(Dropped::Malformed);
    }
    let dst = &frame[..6];
    if !is_group(dst) {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(dst);
        return match table.by_mac.get(&MacAddr(mac)) {
            Some(node) => Egress::Unicast(*node),
            None => Egress::Dropped(Dropped::NoRoute),
        };
    }
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    if ethertype != ETHERTYPE_ARP {
        return Egress::Flood;
    }
    arp(table, frame, reply)
}

fn arp(table: &Table, frame: &[u8], reply: &mut [u8]) -> Egress {
    let Some(a) = frame.get(ETH_LEN..ETH_LEN + ARP_LEN) else {
        return Egress::Dropped(Dropped::Malformed);
    };
    // htype 1 (Ethernet), ptype 0x0800 (IPv4), hlen 6, plen 4.
    if a[..6] != [0, 1, 8, 0, 6, 4] {
        return Egress::Dropped(Dropped::Malformed);
    }
    let op = u16::from_be_bytes([a[6], a[7]]);
    let sha = &a[8..14];
    let spa = &a[14..18];
    let tpa = &a[24..28];
    if op == ARP_REPLY || (op == ARP_REQUEST && spa == tpa) {
        return Egress::Dropped(Dropped::Gratuitous);
    }
    if op != ARP_REQUEST {
        return Egress::Dropped(Dropped::Malformed);
    }
    let target = Ipv4Addr::new(tpa[0], tpa[1], tpa[2], tpa[3]);
    let Some(mac) = table.by_ip.get(&target) else {
        return Egress::Dropped(Dropped::ArpUnknown);
    };
    let Some(out) = reply.get_mut(..ARP_REPLY_LEN) else {
        return Egress::Dropped(Dropped::Malformed);
    };
    // Ethernet: to the asker, from the target.
    out[..6].copy_from_slice(sha);
    out[6..12].copy_from_slice(&mac.0);
    out[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    let r = &mut out[ETH_LEN..];
    r[..6].copy_from_slice(&[0, 1, 8, 0, 6, 4]);
    r[6..8].copy_from_slice(&ARP_REPLY.to_be_bytes());
    r[8..14].copy_from_slice(&mac.0);
    r[14..18].copy_from_slice(tpa);
    r[18..24].copy_from_slice(sha);
    r[24..28].copy_from_slice(spa);
    Egress::ArpReply(ARP_REPLY_LEN)
}

/// Whether an opened `frame` for `vni` from `from` may be delivered: the
/// VNI must be a local encrypted network (`networks`), `from` one of its
/// peer hosts, and the frame's source MAC an endpoint `from` holds in it
/// (else a member could inject frames as another host's container, and
/// poison the bridge's learning towards them). Returns the network's
/// entry.
pub fn ingress<'n, N>(
    networks: &'n HashMap<u32, N>,
    table_of: impl Fn(&N) -> &Table,
    vni: u32,
    from: NodeId,
    frame: &[u8],
) -> Result<&'n N, Dropped> {
    let net = networks.get(&vni).ok_or(Dropped::UnknownVni)?;
    let table = table_of(net);
    if !table.is_member(from) {
        return Err(Dropped::NotMember);
    }
    let Some(src) = frame.get(6..ETH_LEN - 2) else {
        return Err(Dropped::Malformed);
    };
    let mut mac = [0u8; 6];
    mac.copy_from_slice(src);
    if table.by_mac.get(&MacAddr(mac)) != Some(&from) {
        return Err(Dropped::SpoofedSource);
    }
    Ok(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(b: u8) -> NodeId {
        NodeId::from_bytes([b; 16])
    }
    fn mac(b: u8) -> MacAddr {
        MacAddr([2, 0x42, 198, 18, 0, b])
    }
    fn ip(b: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, b)
    }

    fn table() -> Table {
        Table::new(&Forwarding {
            remotes: vec![(mac(2), ip(2), node(2)), (mac(3), ip(3), node(3))],
            peers: vec![node(3), node(2), node(3)],
        })
    }

    fn eth(dst: [u8; 6], src: MacAddr, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&src.0);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn arp_frame(op: u16, sha: MacAddr, spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
        let mut a = vec![0, 1, 8, 0, 6, 4];
        a.extend_from_slice(&op.to_be_bytes());
        a.extend_from_slice(&sha.0);
        a.extend_from_slice(&spa.octets());
        a.extend_from_slice(&[0; 6]);
        a.extend_from_slice(&tpa.octets());
        eth([0xff; 6], sha, ETHERTYPE_ARP, &a)
    }

    #[test]
    fn unicast_flood_and_unknown() {
        let t = table();
        assert_eq!(t.peers(), &[node(2), node(3)], "sorted, deduplicated");
        let mut r = [0u8; 64];
        let f = eth(mac(3).0, mac(1), 0x0800, &[0; 20]);
        assert_eq!(egress(&t, &f, &mut r), Egress::Unicast(node(3)));
        let f = eth(mac(9).0, mac(1), 0x0800, &[0; 20]);
        assert_eq!(egress(&t, &f, &mut r), Egress::Dropped(Dropped::NoRoute));
        let f = eth([0x33, 0x33, 0, 0, 0, 1], mac(1), 0x86dd, &[0; 40]);
        assert_eq!(egress(&t, &f, &mut r), Egress::Flood);
        let f = eth([0xff; 6], mac(1), 0x0800, &[0; 20]);
        assert_eq!(egress(&t, &f, &mut r), Egress::Flood);
        assert_eq!(
            egress(&t, &f[..13], &mut r),
            Egress::Dropped(Dropped::Malformed)
        );
    }

    #[test]
    fn arp_is_answered_from_the_table() {
        let t = table();
        let mut r = [0u8; 64];
        let req = arp_frame(ARP_REQUEST, mac(1), ip(1), ip(3));
        assert_eq!(egress(&t, &req, &mut r), Egress::ArpReply(ARP_REPLY_LEN));
        let r = &r[..ARP_REPLY_LEN];
        assert_eq!(&r[..6], &mac(1).0, "to the asker");
        assert_eq!(&r[6..12], &mac(3).0, "from the target");
        assert_eq!(&r[12..14], &[8, 6]);
        assert_eq!(&r[20..22], &ARP_REPLY.to_be_bytes());
        assert_eq!(&r[22..28], &mac(3).0);
        assert_eq!(&r[28..32], &ip(3).octets());
        assert_eq!(&r[32..38], &mac(1).0);
        assert_eq!(&r[38..42], &ip(1).octets());
        let mut r = [0u8; 64];
        let unknown = arp_frame(ARP_REQUEST, mac(1), ip(1), ip(99));
        assert_eq!(
            egress(&t, &unknown, &mut r),
            Egress::Dropped(Dropped::ArpUnknown)
        );
        let garp = arp_frame(ARP_REQUEST, mac(1), ip(1), ip(1));
        assert_eq!(
            egress(&t, &garp, &mut r),
            Egress::Dropped(Dropped::Gratuitous)
        );
        let reply = arp_frame(ARP_REPLY, mac(1), ip(1), ip(3));
        assert_eq!(
            egress(&t, &reply, &mut r),
            Egress::Dropped(Dropped::Gratuitous)
        );
        assert_eq!(
            egress(&t, &req[..30], &mut r),
            Egress::Dropped(Dropped::Malformed)
        );
        assert_eq!(
            egress(&t, &req, &mut [0u8; 20]),
            Egress::Dropped(Dropped::Malformed)
        );
    }

    #[test]
    fn ingress_needs_a_local_network_a_member_and_its_own_source_mac() {
        let mut nets = HashMap::new();
        nets.insert(7u32, table());
        fn t(n: &Table) -> &Table {
            n
        }
        // node(2) holds mac(2), node(3) holds mac(3).
        let from2 = eth(mac(1).0, mac(2), 0x0800, &[0; 46]);
        assert!(ingress(&nets, t, 7, node(2), &from2).is_ok());
        assert_eq!(
            ingress(&nets, t, 8, node(2), &from2).err(),
            Some(Dropped::UnknownVni)
        );
        assert_eq!(
            ingress(&nets, t, 7, node(5), &from2).err(),
            Some(Dropped::NotMember)
        );
        assert_eq!(
            ingress(&nets, t, 7, node(2), &from2[..10]).err(),
            Some(Dropped::Malformed)
        );
        // A member sealing a frame as another host's container, or as a
        // MAC nobody holds (a bridge's own, a made-up one).
        assert_eq!(
            ingress(&nets, t, 7, node(3), &from2).err(),
            Some(Dropped::SpoofedSource)
        );
        let unknown = eth([0xff; 6], mac(9), 0x0800, &[0; 46]);
        assert_eq!(
            ingress(&nets, t, 7, node(2), &unknown).err(),
            Some(Dropped::SpoofedSource)
        );
    }

    /// Property: for random frames and tables, the decision agrees with a
    /// straightforward model, nothing panics, and a reply is always a
    /// well-formed ARP reply for an address in the table.
    #[test]
    fn random_frames_agree_with_the_model() {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for _ in 0..20_000 {
            let n = (rnd() % 6) as u8;
            let remotes: Vec<_> = (0..n)
                .map(|i| (mac(i), ip(i), node((rnd() % 4) as u8)))
                .collect();
            let t = Table::new(&Forwarding {
                peers: remotes.iter().map(|r| r.2).collect(),
                remotes: remotes.clone(),
            });
            let len = (rnd() % 70) as usize;
            let mut f: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
            // Bias towards interesting frames.
            if len >= 14 && rnd() % 2 == 0 {
                f[..6].copy_from_slice(&mac((rnd() % 8) as u8).0);
            }
            if len >= 42 && rnd() % 2 == 0 {
                f[..6].copy_from_slice(&[0xff; 6]);
                f[12..20].copy_from_slice(&[8, 6, 0, 1, 8, 0, 6, 4]);
                f[20..22].copy_from_slice(&[0, (rnd() % 3) as u8]);
                f[38..42].copy_from_slice(&ip((rnd() % 8) as u8).octets());
            }
            let mut r = [0u8; 64];
            let d = egress(&t, &f, &mut r);
            if len < 14 {
                assert_eq!(d, Egress::Dropped(Dropped::Malformed));
                continue;
            }
            let dst = MacAddr(f[..6].try_into().unwrap());
            let group = f[0] & 1 == 1;
            match d {
                Egress::Unicast(node) => {
                    assert!(!group);
                    assert!(remotes.iter().any(|r| r.0 == dst && r.2 == node));
                }
                Egress::Dropped(Dropped::NoRoute) => {
                    assert!(!group && !remotes.iter().any(|r| r.0 == dst))
                }
                Egress::Flood => assert!(group && f[12..14] != [8, 6]),
                Egress::ArpReply(l) => {
                    assert_eq!(l, ARP_REPLY_LEN);
                    let tpa = Ipv4Addr::new(f[38], f[39], f[40], f[41]);
                    let (m, _, _) = remotes.iter().find(|r| r.1 == tpa).unwrap();
                    assert_eq!(&r[6..12], &m.0);
                    assert_eq!(&r[..6], &f[22..28]);
                }
                Egress::Dropped(_) => assert!(group && f[12..14] == [8, 6]),
            }
        }
    }
}
