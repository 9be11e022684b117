//! A network's way out (DESIGN.md, "Gateway and egress"): a transit veth
//! pair from its sandbox to the host namespace (addresses from
//! `transit.rs`), the sandbox's default route through it, IPv4 forwarding
//! in both namespaces, the NAT and filter tables of `firewall.rs` applied
//! with `nft -j` (the `nftables` crate), and, where an iptables FORWARD
//! chain exists (Docker sets its policy to DROP), accept rules for the
//! transit. `--internal` networks get none of it: their sandbox has no
//! route out at all.
//!
//! The transit and routes are read back every pass; the firewall and the
//! sysctls, which need a process or a file write, are applied when a
//! sandbox is first opened by this agent (adoption after a restart
//! included) and whenever the transit had to be made, and checked every
//! `--firewall-recheck` (a firewall reload or flush removes them).

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::Path;

use rtnetlink::packet_route::link::{InfoData, InfoVeth};
use rtnetlink::{Handle, LinkUnspec, LinkVeth};
use tracing::{info, warn};

use super::firewall;
use super::transit::{self, HOST_PREFIX, Pair, SANDBOX_END};
use crate::dataplane::commands::{apply_nft, command_in, output, succeed};
use crate::dataplane::netlink as nl;
use crate::dataplane::netns::{self, blocking};
use crate::dataplane::{Dataplane, DataplaneError, NetworkPlan, Sandbox};
use crate::ids::Vni;

fn egress_err(what: String, source: io::Error) -> DataplaneError {
    DataplaneError::Egress { what, source }
}

/// `net.ipv4.ip_forward` = 1 in the namespace at `ns` (`None`: the
/// agent's), written from a thread inside it: /proc/sys/net is the
/// namespace of whoever opens it. Returns whether it was off. Blocking.
fn enable_forwarding(ns: Option<&Path>) -> Result<bool, DataplaneError> {
    const KEY: &str = "/proc/sys/net/ipv4/ip_forward";
    netns::blocking_in(ns, || match netns::set_sysctl(KEY, "1")? {
        Some(changed) => Ok(changed),
        None => Err(DataplaneError::Sysctl {
            key: KEY.into(),
            what: "read".into(),
            source: io::ErrorKind::NotFound.into(),
        }),
    })
}

/// Whether an `iptables` binary is here and its filter table has a
/// FORWARD chain it can read. Blocking.
fn iptables_forward(ns: Option<&Path>) -> bool {
    let mut cmd = command_in(ns, "iptables");
    cmd.args(["-w", "-S", "FORWARD"]);
    cmd.output().is_ok_and(|o| o.status.success())
}

/// Inserts network `vni`'s FORWARD accepts that are missing. Blocking.
fn open_forward(ns: Option<&Path>, vni: Vni) -> Result<usize, DataplaneError> {
    if !iptables_forward(ns) {
        return Ok(0);
    }
    let mut added = 0;
    for rule in firewall::forward_accepts(vni) {
        let mut check = command_in(ns, "iptables");
        check.args(["-w", "-C", "FORWARD"]).args(&rule);
        if output(check, "iptables -C FORWARD")?.status.success() {
            continue;
        }
        let mut insert = command_in(ns, "iptables");
        insert.args(["-w", "-I", "FORWARD", "1"]).args(&rule);
        succeed(insert, &format!("iptables -I FORWARD {}", rule.join(" ")))?;
        added += 1;
    }
    Ok(added)
}

/// What of network `vni`'s egress firewall is gone (removed from outside:
/// a firewall reload, `iptables -F`, `nft flush ruleset`), if anything: the
/// first missing piece found. Blocking.
fn firewall_missing(
    sandbox: &Path,
    host_ns: Option<&Path>,
    vni: Vni,
) -> Result<Option<String>, DataplaneError> {
    let forwarding = |ns: Option<&Path>| {
        netns::blocking_in(ns, || {
            Ok(std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
                .is_ok_and(|v| v.trim() == "1"))
        })
    };
    let has_table = |ns: Option<&Path>, table: &str| -> Result<bool, DataplaneError> {
        let mut list = command_in(ns, "nft");
        list.args(["list", "table", "ip", table]);
        Ok(output(list, "nft list table")?.status.success())
    };
    if !forwarding(Some(sandbox))? {
        return Ok(Some("ip_forward in the sandbox".into()));
    }
    if !forwarding(host_ns)? {
        return Ok(Some("ip_forward in the host namespace".into()));
    }
    if !has_table(Some(sandbox), firewall::SANDBOX_TABLE)? {
        return Ok(Some(format!(
            "nft table ip {} in the sandbox",
            firewall::SANDBOX_TABLE
        )));
    }
    let host_table = firewall::host_table(vni);
    if !has_table(host_ns, &host_table)? {
        return Ok(Some(format!("nft table ip {host_table}")));
    }
    if iptables_forward(host_ns) {
        for rule in firewall::forward_accepts(vni) {
            let mut check = command_in(host_ns, "iptables");
            check.args(["-w", "-C", "FORWARD"]).args(&rule);
            if !output(check, "iptables -C FORWARD")?.status.success() {
                return Ok(Some(format!("iptables FORWARD {}", rule.join(" "))));
            }
        }
    }
    Ok(None)
}

/// Deletes network `vni`'s FORWARD accepts (every copy). Blocking.
fn close_forward(ns: Option<&Path>, vni: Vni) -> Result<(), DataplaneError> {
    if !iptables_forward(ns) {
        return Ok(());
    }
    for rule in firewall::forward_accepts(vni) {
        // Bounded: a rule inserted twice by hand goes too, a chain that
        // keeps refusing the delete does not loop forever.
        for _ in 0..8 {
            let mut del = command_in(ns, "iptables");
            del.args(["-w", "-D", "FORWARD"]).args(&rule);
            if !output(del, "iptables -D FORWARD")?.status.success() {
                break;
            }
        }
    }
    Ok(())
}

async fn ensure_addr(
    h: &Handle,
    index: u32,
    addr: Ipv4Addr,
    what: &str,
) -> Result<bool, DataplaneError> {
    nl::ensure_address(h, index, IpAddr::V4(addr), 31, what).await
}

impl Dataplane {
    /// The transit pair host end `index` holds (its pool address).
    async fn pair_held(&self, index: u32) -> Result<Option<Pair>, DataplaneError> {
        Ok(nl::addresses(&self.handle, index)
            .await?
            .into_iter()
            .find_map(|(ip, _)| match ip {
                IpAddr::V4(a) => transit::pair_of_host(self.transit_pool, a),
                IpAddr::V6(_) => None,
            }))
    }

    /// The pool indexes the host's `ovltr-*` links hold now.
    async fn transit_pairs(&self) -> Result<BTreeSet<u32>, DataplaneError> {
        let mut used = BTreeSet::new();
        for l in nl::links(&self.handle).await? {
            if l.name.starts_with(HOST_PREFIX)
                && let Some(p) = self.pair_held(l.index).await?
            {
                used.insert(p.index);
            }
        }
        Ok(used)
    }

    /// Network `vni`'s transit host end `name` and its pair, if it exists
    /// with an address of the pool. One that lost its address (by hand) is
    /// deleted, to be made again.
    async fn transit_of(&self, name: &str) -> Result<Option<(u32, Pair)>, DataplaneError> {
        let Some(l) = nl::link_by_name(&self.handle, name).await? else {
            return Ok(None);
        };
        if let Some(p) = self.pair_held(l.index).await? {
            return Ok(Some((l.index, p)));
        }
        warn!(device = %name, pool = %self.transit_pool, "egress transit holds no address of the pool; making it again");
        nl::delete_link(&self.handle, l.index, name).await?;
        Ok(None)
    }

    /// Makes network `plan.vni`'s egress match the plan: present unless the
    /// network is `--internal`. Returns how many things it changed.
    pub(crate) async fn ensure_egress(
        &self,
        sb: &Sandbox,
        plan: &NetworkPlan,
    ) -> Result<usize, DataplaneError> {
        if !plan.egress {
            return Ok(0);
        }
        let name = firewall::host_end(plan.vni);
        let mut changed = 0;
        // The full scan of every transit only when one must be made.
        let (host_index, pair) = match self.transit_of(&name).await? {
            Some(held) => held,
            None => {
                let used = self.transit_pairs().await?;
                let pair = transit::pick(self.transit_pool, &used).ok_or_else(|| {
                    egress_err(
                        format!("transit pool {} is full", self.transit_pool),
                        io::Error::other("no free /31"),
                    )
                })?;
                let index = self.make_transit(sb, &name, pair).await?;
                changed += 1;
                sb.set_firewall_applied(false);
                (index, pair)
            }
        };
        if ensure_addr(&self.handle, host_index, pair.host, &name).await? {
            changed += 1;
        }
        let sbh = &sb.handle;
        let inner = nl::link_by_name(sbh, SANDBOX_END).await?.ok_or_else(|| {
            DataplaneError::KernelReply(format!("{SANDBOX_END} missing in {}", sb.path.display()))
        })?;
        if ensure_addr(sbh, inner.index, pair.sandbox, SANDBOX_END).await? {
            changed += 1;
        }
        if !inner.up {
            nl::quiet_up(sbh, inner.index, SANDBOX_END).await?;
            changed += 1;
        }
        if nl::default_route_v4(sbh).await? != Some((Some(pair.host), Some(inner.index))) {
            nl::set_default_route_v4(sbh, pair.host, inner.index, SANDBOX_END).await?;
            changed += 1;
        }
        if sb.firewall_check_due(self.firewall_recheck) {
            let (sb_path, host_ns, vni) = (sb.path.clone(), self.host_ns.clone(), plan.vni);
            let missing =
                blocking(move || firewall_missing(&sb_path, host_ns.as_deref(), vni)).await?;
            match missing {
                Some(what) => {
                    warn!(vni = %plan.vni, missing = %what, "egress firewall changed from outside (a firewall reload or flush?): applying it again");
                    sb.set_firewall_applied(false);
                }
                None => sb.set_firewall_applied(true),
            }
        }
        if !sb.firewall_applied() {
            let (sb_path, host_ns, vni) = (sb.path.clone(), self.host_ns.clone(), plan.vni);
            let (host_forwarding, opened) = blocking(move || {
                enable_forwarding(Some(&sb_path))?;
                let host = enable_forwarding(host_ns.as_deref())?;
                apply_nft(
                    Some(&sb_path),
                    &firewall::sandbox_ruleset(),
                    "sandbox egress table",
                )?;
                apply_nft(
                    host_ns.as_deref(),
                    &firewall::host_ruleset(vni),
                    "host egress table",
                )?;
                Ok((host, open_forward(host_ns.as_deref(), vni)?))
            })
            .await?;
            sb.set_firewall_applied(true);
            if host_forwarding {
                info!(vni = %plan.vni, "IPv4 forwarding turned on in the host namespace (net.ipv4.ip_forward=1), for egress");
            }
            info!(vni = %plan.vni, transit = %name, host = %pair.host, sandbox = %pair.sandbox,
                  forward_accepts_added = opened, "egress set up: NAT and filter tables applied");
            changed += 1;
        }
        Ok(changed)
    }

    /// Creates the transit pair: `name` in the host namespace, its peer
    /// `ovltr0` straight inside the sandbox.
    async fn make_transit(
        &self,
        sb: &Sandbox,
        name: &str,
        pair: Pair,
    ) -> Result<u32, DataplaneError> {
        let peer = LinkUnspec::new_with_name(SANDBOX_END)
            .setns_by_fd(sb.ns.as_raw_fd())
            .build();
        let msg = LinkVeth::new(name, SANDBOX_END)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        nl::add_link(&self.handle, msg, &format!("transit veth {name}")).await?;
        let l = nl::must_find(&self.handle, name).await?;
        nl::quiet_up(&self.handle, l.index, name).await?;
        info!(vni = %sb.vni, device = %name, host = %pair.host, sandbox = %pair.sandbox, "egress transit created");
        Ok(l.index)
    }

    /// Removes network `vni`'s egress from the host namespace: its transit
    /// (the sandbox end goes with it), its NAT table and its FORWARD
    /// accepts. Idempotent.
    pub(crate) async fn remove_egress(&self, vni: Vni) -> Result<(), DataplaneError> {
        let name = firewall::host_end(vni);
        if let Some(l) = nl::link_by_name(&self.handle, &name).await?
            && nl::delete_link(&self.handle, l.index, &name).await?
        {
            info!(vni = %vni, device = %name, "egress transit removed");
        }
        let host_ns = self.host_ns.clone();
        let r = blocking(move || {
            apply_nft(
                host_ns.as_deref(),
                &firewall::host_removal(vni),
                "remove host egress table",
            )?;
            close_forward(host_ns.as_deref(), vni)
        })
        .await;
        if let Err(e) = &r {
            warn!(vni = %vni, error = %e, "egress firewall removal failed");
        }
        r
    }
}
