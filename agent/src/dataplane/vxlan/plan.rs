//! Pure logic of the kernel VXLAN VTEP: the device's settings and the diff
//! between what a network's plan wants and what the device's tables hold.
//! No sockets here; the caller dumps the kernel into [`Observed`] and
//! applies the [`EntryDiff`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::dataplane::NetworkPlan;
use crate::ids::MacAddr;

/// The settings of an existing VXLAN device, as dumped (absent = not
/// reported by the kernel).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct VxlanParams {
    pub vni: Option<u32>,
    pub local: Option<IpAddr>,
    pub port: Option<u16>,
    pub dev: Option<u32>,
    pub learning: Option<bool>,
    pub proxy: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum VxlanAction {
    Keep,
    /// Learning differs: changeable in place.
    Change,
    /// VNI, local address, port, lower device or ARP proxy differ: the
    /// kernel cannot change them ("vxlan: cannot change PROXY flag"), the
    /// device must be recreated.
    Recreate,
}

/// The VTEP's own settings of its devices, as of one `ensure`: not part of
/// the plan (a plan is the same for every mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Settings {
    /// VXLAN `dstport` (and the port the device listens on).
    pub port: u16,
    /// VXLAN `dev`: the interface holding the data-path address, once known.
    pub dev: Option<u32>,
}

/// What to do with an existing VXLAN device. Without a known underlay
/// index any lower device is accepted (no flap while it is unknown).
pub(crate) fn vxlan_action(plan: &NetworkPlan, s: &Settings, have: &VxlanParams) -> VxlanAction {
    let dev_ok = s.dev.is_none() || have.dev == s.dev;
    if have.vni != Some(plan.vni.get())
        || have.local != Some(plan.local_vtep)
        || have.port != Some(s.port)
        || have.proxy != Some(true)
        || !dev_ok
    {
        VxlanAction::Recreate
    } else if have.learning != Some(false) {
        VxlanAction::Change
    } else {
        VxlanAction::Keep
    }
}

/// One FDB entry (one remote of a MAC) on the VXLAN device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FdbSeen {
    pub mac: MacAddr,
    pub dst: IpAddr,
    /// Permanent and without per-entry port/VNI overrides.
    pub clean: bool,
}

/// One neighbour entry on the VXLAN device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NeighSeen {
    pub ip: IpAddr,
    pub mac: Option<MacAddr>,
    /// Permanent.
    pub clean: bool,
}

/// The kernel's entries on a network's VXLAN device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Observed {
    /// Includes the all-zero (flood) entries.
    pub fdb: Vec<FdbSeen>,
    pub neigh: Vec<NeighSeen>,
}

/// Changes that make the kernel match a plan. Apply removals first: a MAC
/// holding several remotes is first cut down to one, which the `fdb_set`
/// (NLM_F_REPLACE, replaces the first remote) then rewrites in place.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct EntryDiff {
    pub fdb_remove: Vec<(MacAddr, IpAddr)>,
    pub flood_remove: Vec<IpAddr>,
    pub neigh_remove: Vec<IpAddr>,
    /// Add or replace (NLM_F_CREATE | NLM_F_REPLACE).
    pub fdb_set: Vec<(MacAddr, IpAddr)>,
    /// Append (NLM_F_CREATE | NLM_F_APPEND): one all-zero entry per VTEP.
    pub flood_add: Vec<IpAddr>,
    pub neigh_set: Vec<(IpAddr, MacAddr)>,
}

impl EntryDiff {
    pub fn added(&self) -> usize {
        self.fdb_set.len() + self.flood_add.len() + self.neigh_set.len()
    }

    pub fn removed(&self) -> usize {
        self.fdb_remove.len() + self.flood_remove.len() + self.neigh_remove.len()
    }
}

/// The entries a plan wants. On a duplicate MAC (FDB) or IP (neighbour) the
/// later remote wins, so the caller can order by preference. Flood entries
/// to the local VTEP or an unspecified address are never wanted (they would
/// loop or go nowhere); neither are remotes with a zero or multicast MAC.
pub(crate) fn wanted(
    plan: &NetworkPlan,
) -> (
    BTreeMap<MacAddr, IpAddr>,
    BTreeMap<IpAddr, MacAddr>,
    BTreeSet<IpAddr>,
) {
    let mut fdb = BTreeMap::new();
    let mut neigh = BTreeMap::new();
    for r in &plan.remotes {
        if r.mac.is_zero() || r.mac.0[0] & 1 == 1 {
            continue;
        }
        fdb.insert(r.mac, r.vtep);
        neigh.insert(r.ip, r.mac);
    }
    let flood = plan
        .peers
        .iter()
        .map(|p| p.vtep)
        .filter(|v| *v != plan.local_vtep && !v.is_unspecified())
        .collect();
    (fdb, neigh, flood)
}

/// Desired vs kernel → typed changes. Matching entries produce nothing.
pub(crate) fn diff(plan: &NetworkPlan, seen: &Observed) -> EntryDiff {
    let (want_fdb, want_neigh, want_flood) = wanted(plan);
    let mut d = EntryDiff::default();

    let mut have_fdb: BTreeMap<MacAddr, Vec<(IpAddr, bool)>> = BTreeMap::new();
    let mut have_flood: BTreeMap<IpAddr, bool> = BTreeMap::new();
    for e in &seen.fdb {
        if e.mac.is_zero() {
            let clean = have_flood.entry(e.dst).or_insert(true);
            *clean &= e.clean;
        } else {
            have_fdb.entry(e.mac).or_default().push((e.dst, e.clean));
        }
    }
    for (mac, remotes) in &have_fdb {
        let Some(&want) = want_fdb.get(mac) else {
            d.fdb_remove
                .extend(remotes.iter().map(|(dst, _)| (*mac, *dst)));
            continue;
        };
        match remotes.iter().position(|(dst, _)| *dst == want) {
            Some(i) => {
                let others = remotes.iter().enumerate().filter(|(j, _)| *j != i);
                d.fdb_remove
                    .extend(others.map(|(_, (dst, _))| (*mac, *dst)));
                if !remotes[i].1 {
                    d.fdb_set.push((*mac, want));
                }
            }
            None => {
                // Keep the first remote for the replace to rewrite.
                d.fdb_remove
                    .extend(remotes.iter().skip(1).map(|(dst, _)| (*mac, *dst)));
                d.fdb_set.push((*mac, want));
            }
        }
    }
    for (mac, vtep) in &want_fdb {
        if !have_fdb.contains_key(mac) {
            d.fdb_set.push((*mac, *vtep));
        }
    }

    for (vtep, clean) in &have_flood {
        if !want_flood.contains(vtep) || !clean {
            d.flood_remove.push(*vtep);
        }
    }
    for vtep in &want_flood {
        if have_flood.get(vtep) != Some(&true) {
            d.flood_add.push(*vtep);
        }
    }

    let mut have_neigh: BTreeMap<IpAddr, (Option<MacAddr>, bool)> = BTreeMap::new();
    for n in &seen.neigh {
        have_neigh.insert(n.ip, (n.mac, n.clean));
    }
    for (ip, (mac, clean)) in &have_neigh {
        match want_neigh.get(ip) {
            None => d.neigh_remove.push(*ip),
            Some(want) if *mac != Some(*want) || !clean => d.neigh_set.push((*ip, *want)),
            Some(_) => {}
        }
    }
    for (ip, mac) in &want_neigh {
        if !have_neigh.contains_key(ip) {
            d.neigh_set.push((*ip, *mac));
        }
    }
    d
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
