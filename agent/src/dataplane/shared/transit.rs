//! Pure addressing of a network's egress transit: the veth pair joining
//! its sandbox to the host namespace. Each pair is a /31 (RFC 3021) out of
//! one host-local pool; the host end's address must be unique among this
//! host's networks (the host routes replies back by it), the sandbox end's
//! is its /31 partner. Two networks with the same subnet therefore leave
//! through different transit addresses, and the host's NAT keeps them
//! apart. Nothing here is replicated: each host picks its own.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

/// The default pool: link-local (RFC 3927) and never routed, 8192 pairs,
/// clear of 169.254.169.0/24 and 169.254.170.0/24 where clouds put their
/// metadata services.
pub const DEFAULT_POOL: Ipv4Network =
    match Ipv4Network::new_checked(Ipv4Addr::new(169, 254, 64, 0), 18) {
        Some(n) => n,
        None => panic!("valid literal"),
    };

/// Prefix of the host end, in the host namespace: `ovltr-<vni>`.
pub const HOST_PREFIX: &str = "ovltr-";
/// Name of the sandbox end, inside the sandbox.
pub const SANDBOX_END: &str = "ovltr0";

/// One network's transit /31: the host end and the sandbox end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pair {
    pub index: u32,
    pub host: Ipv4Addr,
    pub sandbox: Ipv4Addr,
}

/// How many pairs `pool` holds.
pub fn capacity(pool: Ipv4Network) -> u32 {
    let host_bits = 32 - u32::from(pool.prefix());
    if host_bits == 0 {
        0
    } else {
        1u32.checked_shl(host_bits - 1).unwrap_or(u32::MAX)
    }
}

/// Pair number `index` of `pool`.
pub fn pair(pool: Ipv4Network, index: u32) -> Option<Pair> {
    if index >= capacity(pool) {
        return None;
    }
    let base = u32::from(pool.network()).checked_add(index.checked_mul(2)?)?;
    Some(Pair {
        index,
        host: Ipv4Addr::from(base),
        sandbox: Ipv4Addr::from(base.checked_add(1)?),
    })
}

/// The pair whose host end is `host`, if it is one of `pool`'s.
pub fn pair_of_host(pool: Ipv4Network, host: Ipv4Addr) -> Option<Pair> {
    let offset = u32::from(host).checked_sub(u32::from(pool.network()))?;
    if offset % 2 != 0 {
        return None;
    }
    pair(pool, offset / 2)
}

/// The lowest pair not in `used`; `None` when the pool is full.
pub fn pick(pool: Ipv4Network, used: &BTreeSet<u32>) -> Option<Pair> {
    (0..capacity(pool))
        .find(|i| !used.contains(i))
        .and_then(|i| pair(pool, i))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_are_slash_31s_of_the_pool_and_picked_lowest_free() {
        let pool = DEFAULT_POOL;
        assert_eq!(capacity(pool), 8192);
        let p0 = pair(pool, 0).unwrap();
        assert_eq!(p0.host, Ipv4Addr::new(169, 254, 64, 0));
        assert_eq!(p0.sandbox, Ipv4Addr::new(169, 254, 64, 1));
        let last = pair(pool, 8191).unwrap();
        assert_eq!(last.sandbox, Ipv4Addr::new(169, 254, 127, 255));
        assert_eq!(pair(pool, 8192), None);
        assert_eq!(
            pair_of_host(pool, Ipv4Addr::new(169, 254, 64, 6))
                .unwrap()
                .index,
            3
        );
        assert_eq!(pair_of_host(pool, Ipv4Addr::new(169, 254, 64, 7)), None);
        assert_eq!(pair_of_host(pool, Ipv4Addr::new(169, 254, 1, 0)), None);
        assert_eq!(pair_of_host(pool, Ipv4Addr::new(169, 254, 128, 0)), None);
        let used: BTreeSet<u32> = [0, 1, 3].into();
        assert_eq!(pick(pool, &used).unwrap().index, 2);
        let tiny: Ipv4Network = "10.0.0.0/31".parse().unwrap();
        assert_eq!(capacity(tiny), 1);
        assert_eq!(pick(tiny, &[0].into()), None);
        assert_eq!(capacity("10.0.0.1/32".parse().unwrap()), 0);
    }
}
