//! Pure naming rules of the shared part: bridge MAC, device names and
//! aliases, and the kernel's interface-name rules. No sockets here.

use crate::dataplane::{ALIAS_PREFIX, HOST_IF_PREFIX};
use crate::ids::{EndpointId, MacAddr, Vni};

/// Linux `IFNAMSIZ` minus the terminating NUL.
const IFNAME_MAX: usize = 15;

/// The bridge's fixed MAC: locally administered `02:6f:76` ("ov") + the
/// 24-bit VNI. Fixed, so enslaving a port never changes it (a change would
/// flush the bridge's neighbour entries). Disjoint from endpoint MACs
/// (`02:42:` + IPv4, see `MacAddr::from_ipv4`).
pub(crate) fn bridge_mac(vni: Vni) -> MacAddr {
    let v = vni.get().to_be_bytes();
    MacAddr([0x02, 0x6f, 0x76, v[1], v[2], v[3]])
}

/// The VNI in a device name `<prefix><decimal vni>`, if it is one of ours.
pub(crate) fn vni_of_device(name: &str, prefix: &str) -> Option<Vni> {
    let digits = name.strip_prefix(prefix)?;
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Vni::new(digits.parse().ok()?).ok()
}

/// Whether `name` looks like the host end of an endpoint (`ovl` + 8 hex).
/// Bridges and VTEP devices (`ovlbr-`, `ovlvx-`, ...) never do: `-` is not
/// a hex digit.
pub(crate) fn is_host_ifname(name: &str) -> bool {
    name.strip_prefix(HOST_IF_PREFIX).is_some_and(|h| {
        h.len() == 8
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The kernel's `dev_valid_name`: 1..=15 bytes, not `.`/`..`, no `/`, `:`
/// or whitespace.
pub(crate) fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= IFNAME_MAX
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
}

/// Alias of a host veth end, naming its network so a recreated bridge gets
/// its ports back.
pub(crate) fn host_alias(vni: Vni, id: EndpointId) -> String {
    format!("{ALIAS_PREFIX}{vni} ep={id}")
}

pub(crate) fn vni_of_alias(alias: &str) -> Option<Vni> {
    let rest = alias.strip_prefix(ALIAS_PREFIX)?;
    let digits = rest.split(' ').next()?;
    Vni::new(digits.parse().ok()?).ok()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::dataplane::{BRIDGE_PREFIX, Dataplane};

    #[test]
    fn names_parse_back() {
        let vni = Vni::new(16_777_215).unwrap();
        let br = Dataplane::bridge_name(vni);
        assert!(br.len() <= 15, "{br}");
        assert_eq!(vni_of_device(&br, BRIDGE_PREFIX), Some(vni));
        assert_eq!(
            vni_of_device(
                &crate::dataplane::VxlanVtep::device_name(vni),
                crate::dataplane::vxlan::DEVICE_PREFIX
            ),
            Some(vni)
        );
        for bad in [
            "ovlbr-",
            "ovlbr-0",
            "ovlbr-012",
            "ovlbr-16777216",
            "ovlbr-1x",
            "ovlvx-5",
        ] {
            assert_eq!(vni_of_device(bad, BRIDGE_PREFIX), None, "{bad}");
        }
        let id: EndpointId = "0123456789abcdef0123456789abcdef".parse().unwrap();
        let host = Dataplane::host_ifname(id);
        assert_eq!(host, "ovl01234567");
        assert!(is_host_ifname(&host));
        for bad in [
            "ovlbr-1234",
            "ovl0123456",
            "ovl0123456G",
            "eth0",
            "ovl012345678",
        ] {
            assert!(!is_host_ifname(bad), "{bad}");
        }
        assert_eq!(vni_of_alias(&host_alias(vni, id)), Some(vni));
        assert_eq!(vni_of_alias("ovl vni=x"), None);
        assert_eq!(vni_of_alias("something else"), None);
    }

    #[test]
    fn interface_names_follow_the_kernel_rules() {
        for good in ["eth0", "a", "net-1_x.y", "fifteen-chars-x"] {
            assert!(valid_ifname(good), "{good}");
        }
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "sixteen-chars-xx"] {
            assert!(!valid_ifname(bad), "{bad}");
        }
    }

    #[test]
    fn bridge_mac_is_fixed_unicast_local_and_per_vni() {
        let a = bridge_mac(Vni::new(1).unwrap());
        let b = bridge_mac(Vni::new(0x0a0b0c).unwrap());
        assert_eq!(a.to_string(), "02:6f:76:00:00:01");
        assert_eq!(b.to_string(), "02:6f:76:0a:0b:0c");
        assert_eq!(a.0[0] & 0b11, 0b10, "unicast, locally administered");
        assert_ne!(
            a.0[..2],
            MacAddr::from_ipv4(Ipv4Addr::new(198, 19, 0, 1)).0[..2]
        );
    }
}
