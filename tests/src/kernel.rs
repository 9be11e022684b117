//! What the kernel holds in a lab namespace: links, VXLAN FDB and neighbour
//! entries (`ip -j`, `bridge -j`), and ICMP counters. This is what the
//! tests check the agents' claims against.

use std::fmt;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::Lab;
use crate::cmd::{self, IP_TIMEOUT};
use crate::container::Container;

/// The all-zero MAC of a VXLAN flood (BUM) entry.
pub const FLOOD_MAC: &str = "00:00:00:00:00:00";

/// `ovlvx-<vni>`: a network's VXLAN device in a host namespace.
pub fn vxlan_dev(vni: u32) -> String {
    format!("ovlvx-{vni}")
}

/// `ovlbr-<vni>`: a network's bridge in a host namespace.
pub fn bridge_dev(vni: u32) -> String {
    format!("ovlbr-{vni}")
}

/// `ovl<first 8 hex of the endpoint id>`: the host end of an endpoint's veth.
pub fn host_veth(endpoint_id: &str) -> String {
    let hex: String = endpoint_id
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(8)
        .collect();
    format!("ovl{}", hex.to_lowercase())
}

/// The MAC the agent derives from an IPv4 address: `02:42:<octets>`.
pub fn mac_for_ip(ip: &str) -> Option<String> {
    let addr: std::net::Ipv4Addr = ip.parse().ok()?;
    let o = addr.octets();
    Some(format!(
        "02:42:{:02x}:{:02x}:{:02x}:{:02x}",
        o[0], o[1], o[2], o[3]
    ))
}

/// One `bridge -j fdb show` row.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct FdbEntry {
    pub mac: String,
    /// The remote VTEP (VXLAN entries only).
    #[serde(default)]
    pub dst: Option<String>,
    #[serde(default)]
    pub flags: Vec<String>,
    /// The bridge, for the bridge's own entries of the port.
    #[serde(default)]
    pub master: Option<String>,
    #[serde(default)]
    pub state: String,
}

impl FdbEntry {
    /// A VXLAN (`self`) entry pointing at a remote VTEP.
    pub fn is_remote(&self) -> bool {
        self.dst.is_some()
    }

    /// The all-zero flood entry.
    pub fn is_flood(&self) -> bool {
        self.mac == FLOOD_MAC
    }

    pub fn is_permanent(&self) -> bool {
        self.state == "permanent"
    }
}

impl fmt::Display for FdbEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.mac)?;
        if let Some(d) = &self.dst {
            write!(f, " dst {d}")?;
        }
        if let Some(m) = &self.master {
            write!(f, " master {m}")?;
        }
        for fl in &self.flags {
            write!(f, " {fl}")?;
        }
        write!(f, " {}", self.state)
    }
}

/// One `ip -j neigh show` row.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct NeighEntry {
    /// The IP address.
    pub dst: String,
    #[serde(default)]
    pub lladdr: Option<String>,
    #[serde(default)]
    pub state: Vec<String>,
}

impl NeighEntry {
    pub fn is_permanent(&self) -> bool {
        self.state.iter().any(|s| s == "PERMANENT")
    }
}

impl fmt::Display for NeighEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} lladdr {} {}",
            self.dst,
            self.lladdr.as_deref().unwrap_or("-"),
            self.state.join(",")
        )
    }
}

/// One `ip -j link show` row (the fields the tests use).
#[derive(Debug, Clone, Deserialize)]
pub struct LinkRow {
    pub ifindex: u32,
    pub ifname: String,
    #[serde(default)]
    pub mtu: u32,
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub master: Option<String>,
    #[serde(default)]
    pub operstate: Option<String>,
    #[serde(default)]
    pub flags: Vec<String>,
}

impl LinkRow {
    pub fn is_up(&self) -> bool {
        self.flags.iter().any(|f| f == "UP")
    }
}

/// Runs a command that prints JSON; a missing device (`Cannot find device`,
/// `does not exist`) is `Ok(None)`.
/// `tool` (ip, bridge) run in namespace `ns`: a name under /run/netns, or
/// a path (an agent's network sandbox), entered with nsenter.
fn in_ns(ns: &str, tool: &str, args: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = if ns.starts_with('/') {
        vec!["nsenter".into(), format!("--net={ns}"), tool.into()]
    } else {
        vec![tool.into(), "-n".into(), ns.into()]
    };
    all.extend(args.iter().map(|a| a.to_string()));
    all
}

fn json_in(ns: &str, tool: &str, args: &[&str]) -> Result<Option<serde_json::Value>> {
    let all = in_ns(ns, tool, args);
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    json_or_missing(&refs)
}

fn json_or_missing(args: &[&str]) -> Result<Option<serde_json::Value>> {
    let (prog, rest) = args.split_first().expect("a command");
    let out = cmd::run(std::process::Command::new(prog).args(rest), IP_TIMEOUT)?;
    if !out.success() {
        let e = out.stderr.to_lowercase();
        if e.contains("cannot find device") || e.contains("does not exist") {
            return Ok(None);
        }
        bail!("command failed: {out}");
    }
    let text = out.stdout.trim();
    if text.is_empty() {
        return Ok(Some(serde_json::Value::Array(Vec::new())));
    }
    let v = serde_json::from_str(text).with_context(|| format!("not JSON: {out}"))?;
    Ok(Some(v))
}

fn rows<T: serde::de::DeserializeOwned>(what: &str, v: serde_json::Value) -> Result<Vec<T>> {
    let text = v.to_string();
    serde_json::from_value(v).with_context(|| format!("unexpected {what} JSON: {text}"))
}

impl Lab {
    /// `bridge fdb show dev DEV` in namespace `ns`; `None` when DEV does not
    /// exist.
    pub fn fdb_in(&self, ns: &str, dev: &str) -> Result<Option<Vec<FdbEntry>>> {
        match json_in(ns, "bridge", &["-j", "fdb", "show", "dev", dev])? {
            Some(v) => Ok(Some(rows("bridge fdb", v)?)),
            None => Ok(None),
        }
    }

    /// `ip neigh show dev DEV` in namespace `ns`; `None` when DEV does not
    /// exist.
    pub fn neigh_in(&self, ns: &str, dev: &str) -> Result<Option<Vec<NeighEntry>>> {
        match json_in(ns, "ip", &["-j", "neigh", "show", "dev", dev])? {
            Some(v) => Ok(Some(rows("ip neigh", v)?)),
            None => Ok(None),
        }
    }

    /// The VXLAN FDB of network `vni` on host k: the remote (`dst`) entries
    /// only. An error when the device does not exist.
    pub fn fdb(&self, k: usize, vni: u32) -> Result<Vec<FdbEntry>> {
        let dev = vxlan_dev(vni);
        let all = self
            .fdb_in(&self.sandbox(k, vni), &dev)?
            .with_context(|| format!("h{k} has no {dev}"))?;
        Ok(all.into_iter().filter(FdbEntry::is_remote).collect())
    }

    /// The neighbour entries of network `vni`'s VXLAN device on host k. An
    /// error when the device does not exist.
    pub fn neigh(&self, k: usize, vni: u32) -> Result<Vec<NeighEntry>> {
        let dev = vxlan_dev(vni);
        self.neigh_in(&self.sandbox(k, vni), &dev)?
            .with_context(|| format!("h{k} has no {dev}"))
    }

    /// The path of network `vni`'s sandbox namespace on host k.
    pub fn sandbox(&self, k: usize, vni: u32) -> String {
        self.sandbox_dir(k)
            .join(format!("ovl-{vni}"))
            .display()
            .to_string()
    }

    /// Every trace of ovl on host k: links named `ovl...` in its namespace
    /// and in each network sandbox, and the sandboxes themselves (as
    /// `netns:ovl-<vni>`). Empty when the host carries nothing.
    pub fn ovl_traces(&self, k: usize) -> Result<Vec<String>> {
        let mut out: Vec<String> = self
            .links_in(&self.ns(k))?
            .into_iter()
            .map(|l| l.ifname)
            .filter(|n| n.starts_with("ovl"))
            .collect();
        let dir = self.sandbox_dir(k);
        let mut entries: Vec<_> = match std::fs::read_dir(&dir) {
            Ok(e) => e.flatten().map(|e| e.path()).collect(),
            Err(_) => Vec::new(),
        };
        entries.sort();
        for path in entries {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("?");
            out.push(format!("netns:{name}"));
            if let Ok(links) = self.links_in(&path.display().to_string()) {
                out.extend(
                    links
                        .into_iter()
                        .map(|l| format!("{name}/{}", l.ifname))
                        .filter(|n| !n.ends_with("/lo")),
                );
            }
        }
        Ok(out)
    }

    /// Link `dev` of host k, in its namespace or in any of its network
    /// sandboxes (where bridges, VTEP devices and veth host ends live);
    /// `None` if none has it.
    pub fn ovl_link(&self, k: usize, dev: &str) -> Result<Option<LinkRow>> {
        if let Some(l) = self.link_in(&self.ns(k), dev)? {
            return Ok(Some(l));
        }
        let Ok(entries) = std::fs::read_dir(self.sandbox_dir(k)) else {
            return Ok(None);
        };
        for e in entries.flatten() {
            if let Some(l) = self.link_in(&e.path().display().to_string(), dev)? {
                return Ok(Some(l));
            }
        }
        Ok(None)
    }

    /// All links of namespace `ns`.
    pub fn links_in(&self, ns: &str) -> Result<Vec<LinkRow>> {
        let v = json_in(ns, "ip", &["-j", "link", "show"])?
            .with_context(|| format!("no links in {ns}?"))?;
        rows("ip link", v)
    }

    /// Link `dev` of namespace `ns`, `None` if it does not exist.
    pub fn link_in(&self, ns: &str, dev: &str) -> Result<Option<LinkRow>> {
        match json_in(ns, "ip", &["-j", "link", "show", "dev", dev])? {
            Some(v) => Ok(rows::<LinkRow>("ip link", v)?.into_iter().next()),
            None => Ok(None),
        }
    }

    /// The IPv4 addresses (`a.b.c.d/len`) of `dev` in namespace `ns`.
    pub fn addrs_in(&self, ns: &str, dev: &str) -> Result<Vec<String>> {
        let Some(v) = json_in(ns, "ip", &["-j", "-4", "addr", "show", "dev", dev])? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for link in v.as_array().into_iter().flatten() {
            for a in link["addr_info"].as_array().into_iter().flatten() {
                if let (Some(ip), Some(len)) = (a["local"].as_str(), a["prefixlen"].as_u64()) {
                    out.push(format!("{ip}/{len}"));
                }
            }
        }
        Ok(out)
    }

    /// The `Icmp: InEchos` counter of container `c` (echo requests its
    /// kernel received): proof of which namespace a ping reached.
    pub fn icmp_in_echos(&self, c: &Container) -> Result<u64> {
        let out = self.exec_in_ok(c, &["cat", "/proc/net/snmp"])?;
        let lines: Vec<&str> = out
            .stdout
            .lines()
            .filter(|l| l.starts_with("Icmp:"))
            .collect();
        if lines.len() < 2 {
            bail!("no Icmp lines in {c}'s /proc/net/snmp: {out}");
        }
        let names: Vec<&str> = lines[0].split_whitespace().collect();
        let values: Vec<&str> = lines[1].split_whitespace().collect();
        let i = names
            .iter()
            .position(|n| *n == "InEchos")
            .context("no InEchos column")?;
        values
            .get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("bad InEchos value in {out}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        assert_eq!(vxlan_dev(4097), "ovlvx-4097");
        assert_eq!(bridge_dev(7), "ovlbr-7");
        assert_eq!(host_veth("3FA2b9c1-0000-4000"), "ovl3fa2b9c1");
        assert_eq!(
            mac_for_ip("198.19.0.10").as_deref(),
            Some("02:42:c6:13:00:0a")
        );
        assert_eq!(mac_for_ip("nonsense"), None);
    }

    #[test]
    fn parses_bridge_and_neigh_json() {
        let fdb = r#"[{"mac":"3a:78:5c:af:d2:69","flags":[],"master":"ovlbr-7","state":"permanent"},
            {"mac":"02:42:c6:13:00:03","dst":"198.18.0.12","flags":["self"],"state":"permanent"},
            {"mac":"00:00:00:00:00:00","dst":"198.18.0.12","flags":["self"],"state":"permanent"}]"#;
        let rows: Vec<FdbEntry> = serde_json::from_str(fdb).unwrap();
        let remote: Vec<&FdbEntry> = rows.iter().filter(|e| e.is_remote()).collect();
        assert_eq!(remote.len(), 2);
        assert!(remote[1].is_flood() && remote[1].is_permanent());
        assert_eq!(
            remote[0].to_string(),
            "02:42:c6:13:00:03 dst 198.18.0.12 self permanent"
        );
        let n: Vec<NeighEntry> = serde_json::from_str(
            r#"[{"dst":"198.19.0.3","lladdr":"02:42:c6:13:00:03","state":["PERMANENT"]}]"#,
        )
        .unwrap();
        assert!(n[0].is_permanent());
    }
}
