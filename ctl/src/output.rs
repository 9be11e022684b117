//! Human tables by default, JSON (stable field names) for scripts.

use ovl_proto::api::*;
use serde_json::{Value, json};

#[derive(Clone, Copy)]
pub enum Format {
    Table,
    Json,
}

fn print_json(v: Value) {
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
}

pub fn message(f: Format, text: &str) {
    match f {
        Format::Table => println!("{}", escape(text)),
        Format::Json => print_json(json!({ "message": text })),
    }
}

pub fn init(f: Format, r: &InitResponse) {
    match f {
        Format::Table => {
            println!(
                "Cluster {} initialised; this node is {}.",
                r.cluster_id, r.node_id
            );
            println!("To add an agent, run on its host:");
            println!(
                "  ovlctl cluster join --token {} <THIS-AGENT'S-ADVERTISE-ADDR>",
                r.join_token
            );
        }
        Format::Json => print_json(json!({
            "cluster_id": r.cluster_id, "join_token": r.join_token, "node_id": r.node_id,
        })),
    }
}

pub fn join(f: Format, r: &JoinResponse) {
    match f {
        Format::Table => println!(
            "Joined cluster {} via {}; this node is {}.",
            r.cluster_id, r.via, r.node_id
        ),
        Format::Json => print_json(json!({
            "cluster_id": r.cluster_id, "node_id": r.node_id, "via": r.via,
        })),
    }
}

pub fn node_removed(f: Format, r: &RemoveNodeResponse) {
    match f {
        Format::Table => println!(
            "node {} ({}) removed; the join token was rotated (ovlctl cluster join-token prints it)",
            escape(&r.name),
            r.node_id
        ),
        Format::Json => {
            print_json(json!({ "node_id": r.node_id, "name": r.name, "join_token": r.join_token }))
        }
    }
}

pub fn join_token(f: Format, r: &JoinTokenResponse) {
    match f {
        Format::Table => println!("{}", r.join_token),
        Format::Json => print_json(json!({ "join_token": r.join_token })),
    }
}

pub fn status(f: Format, r: &StatusResponse) {
    match f {
        Format::Table => {
            let rows = [
                ("Node", format!("{} ({})", r.node_name, r.node_id)),
                ("State", r.state.clone()),
                ("Reason", r.reason.clone()),
                ("Cluster", dash(&r.cluster_id)),
                ("Key", dash(&r.cluster_key)),
                ("Advertise", r.advertise_addr.clone()),
                ("Data path", r.data_path_addr.clone()),
                ("Gossip", r.gossip_addr.clone()),
                (
                    "Nodes",
                    format!("{} alive of {}", r.nodes_alive, r.nodes_total),
                ),
            ];
            // The reason and names can carry peers' words.
            for (k, v) in rows {
                println!("{:<10} {}", format!("{k}:"), escape(&v));
            }
            let nonzero: Vec<String> = r
                .counters
                .iter()
                .filter(|c| c.value > 0)
                .map(|c| format!("{}={}", c.name, c.value))
                .collect();
            if !nonzero.is_empty() {
                println!("{:<10} {}", "Counters:", nonzero.join(" "));
            }
        }
        Format::Json => {
            let counters: serde_json::Map<String, Value> = r
                .counters
                .iter()
                .map(|c| (c.name.clone(), json!(c.value)))
                .collect();
            print_json(json!({
                "node_id": r.node_id, "node_name": r.node_name, "state": r.state,
                "reason": r.reason, "cluster_id": r.cluster_id,
                "advertise_addr": r.advertise_addr, "data_path_addr": r.data_path_addr,
                "gossip_addr": r.gossip_addr, "generation": r.generation,
                "nodes_alive": r.nodes_alive, "nodes_total": r.nodes_total,
                "cluster_key": r.cluster_key, "counters": counters,
            }))
        }
    }
}

pub fn nodes(f: Format, nodes: &[Node]) {
    match f {
        Format::Table => {
            let rows: Vec<[String; 6]> = nodes
                .iter()
                .map(|n| {
                    let me = if n.is_self { " *" } else { "" };
                    [
                        format!("{}{me}", short(&n.id)),
                        n.name.clone(),
                        n.status.clone(),
                        n.advertise_addr.clone(),
                        n.data_path_addr.clone(),
                        n.generation.to_string(),
                    ]
                })
                .collect();
            table(
                &[
                    "ID",
                    "NAME",
                    "STATUS",
                    "ADVERTISE",
                    "DATA PATH",
                    "GENERATION",
                ],
                &rows,
            );
        }
        Format::Json => print_json(Value::Array(
            nodes
                .iter()
                .map(|n| {
                    json!({
                        "id": n.id, "name": n.name, "advertise_addr": n.advertise_addr,
                        "data_path_addr": n.data_path_addr, "gossip_addr": n.gossip_addr,
                        "status": n.status, "generation": n.generation, "is_self": n.is_self,
                    })
                })
                .collect(),
        )),
    }
}

pub(crate) fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

pub(crate) fn dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.into() }
}

fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    print!("{}", render_table(header, rows));
}

/// Control characters and text-direction overrides shown as escapes: names,
/// labels and messages come from peers (or a member posing as one), and a
/// raw ESC or newline would let them rewrite the operator's terminal or
/// forge table rows.
pub(crate) fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !s.chars().any(unsafe_char) {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out.into()
}

/// Columns padded to their widest cell, one line per row.
pub(crate) fn render_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let rows: Vec<[String; N]> = rows
        .iter()
        .map(|r| std::array::from_fn(|i| escape(&r[i]).into_owned()))
        .collect();
    let rows = rows.as_slice();
    let mut width = header.map(str::len);
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .zip(width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("{}\n", s.join("  ").trim_end())
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// A network's mode, fixed at creation: `plain` or `encrypted`.
fn mode(n: &Network) -> &'static str {
    if n.encrypted { "encrypted" } else { "plain" }
}

fn network_json(n: &Network) -> Value {
    json!({
        "name": n.name, "id": n.id, "vni": n.vni, "subnet": n.subnet, "gateway": n.gateway,
        "ip_range": n.ip_range, "mtu": n.mtu, "encrypted": n.encrypted, "mode": mode(n), "attachable": n.attachable,
        "internal": n.internal, "labels": n.labels, "state": n.state, "reason": n.reason,
        "created_by": n.created_by, "created_at_ms": n.created_at_ms, "endpoints": n.endpoints,
        "path_mtu": n.path_mtu, "mtu_warning": n.mtu_warning,
    })
}

fn endpoint_json(e: &Endpoint) -> Value {
    json!({
        "network": e.network, "network_id": e.network_id, "name": e.name, "id": e.id, "ip": e.ip,
        "mac": e.mac, "node": e.node, "node_name": e.node_name, "vtep": e.vtep,
        "aliases": e.aliases, "status": e.status, "ifname": e.ifname,
    })
}

pub fn network(f: Format, n: &Network) {
    match f {
        Format::Table => networks(f, std::slice::from_ref(n)),
        Format::Json => print_json(network_json(n)),
    }
}

pub fn networks(f: Format, nets: &[Network]) {
    match f {
        Format::Table => {
            let rows: Vec<[String; 8]> = nets
                .iter()
                .map(|n| {
                    [
                        n.name.clone(),
                        short(&n.id).to_string(),
                        n.vni.to_string(),
                        mode(n).to_string(),
                        n.subnet.clone(),
                        n.mtu.to_string(),
                        n.endpoints.to_string(),
                        if n.state == "active" {
                            n.state.clone()
                        } else {
                            format!("{}: {}", n.state, n.reason)
                        },
                    ]
                })
                .collect();
            table(
                &[
                    "NAME",
                    "ID",
                    "VNI",
                    "MODE",
                    "SUBNET",
                    "MTU",
                    "ENDPOINTS",
                    "STATE",
                ],
                &rows,
            );
        }
        Format::Json => print_json(Value::Array(nets.iter().map(network_json).collect())),
    }
}

pub fn network_detail(f: Format, d: &NetworkDetail) {
    let Some(n) = &d.network else { return };
    match f {
        Format::Table => {
            networks(f, std::slice::from_ref(n));
            if !n.mtu_warning.is_empty() {
                println!("warning: {}", escape(&n.mtu_warning));
            }
            println!();
            let rows: Vec<[String; 6]> = d
                .peers
                .iter()
                .map(|p| {
                    [
                        format!("{} ({})", p.node_name, short(&p.node_id)),
                        p.vtep.clone(),
                        p.status.clone(),
                        p.endpoints.to_string(),
                        match p.data_path_mtu {
                            0 => "-".to_string(),
                            m => m.to_string(),
                        },
                        p.ranges.join(" "),
                    ]
                })
                .collect();
            table(
                &[
                    "HOST",
                    "VTEP",
                    "STATUS",
                    "ENDPOINTS",
                    "PATH MTU",
                    "ADDRESS RANGES",
                ],
                &rows,
            );
            println!();
            endpoints(f, &d.endpoints);
            if let Some(e) = &d.encryption {
                println!();
                print!("{}", crate::encryption::inspect_text(e));
            }
        }
        Format::Json => {
            let mut v = network_json(n);
            let peers: Vec<Value> = d
                .peers
                .iter()
                .map(|p| {
                    json!({
                        "node_id": p.node_id, "node_name": p.node_name, "vtep": p.vtep,
                        "status": p.status, "endpoints": p.endpoints, "ranges": p.ranges,
                        "data_path_mtu": p.data_path_mtu,
                    })
                })
                .collect();
            if let Value::Object(m) = &mut v {
                m.insert("peers".into(), Value::Array(peers));
                m.insert(
                    "endpoints".into(),
                    Value::Array(d.endpoints.iter().map(endpoint_json).collect()),
                );
                if let Some(e) = &d.encryption {
                    m.insert("encryption".into(), crate::encryption::inspect_json(e));
                }
            }
            print_json(v)
        }
    }
}

/// The reply of `endpoint attach`: the endpoint, plus (JSON) the hosts that
/// had not programmed it in time, which [`lagging`] also reports on stderr.
pub fn endpoint(f: Format, e: &Endpoint) {
    match f {
        Format::Table => {
            endpoints(f, std::slice::from_ref(e));
            if !e.resolver.is_empty() {
                println!(
                    "resolver {} (nameserver for the container's resolv.conf)",
                    e.resolver
                );
            }
        }
        Format::Json => {
            let mut v = endpoint_json(e);
            v["lagging"] = json!(e.lagging);
            v["resolver"] = json!(e.resolver);
            print_json(v)
        }
    }
}

/// One warning line on stderr when some live hosts of the network had not
/// confirmed the change when the agent stopped waiting (its --attach-wait).
pub fn lagging(what: &str, hosts: &[String]) {
    if !hosts.is_empty() {
        eprintln!(
            "ovlctl: warning: {}, but not yet confirmed by {}: they catch up on their own",
            escape(what),
            escape(&hosts.join(", "))
        );
    }
}

pub fn endpoints(f: Format, eps: &[Endpoint]) {
    match f {
        Format::Table => {
            let rows: Vec<[String; 7]> = eps
                .iter()
                .map(|e| {
                    [
                        e.network.clone(),
                        e.name.clone(),
                        e.ip.clone(),
                        e.mac.clone(),
                        e.node_name.clone(),
                        e.vtep.clone(),
                        e.status.clone(),
                    ]
                })
                .collect();
            table(
                &["NETWORK", "NAME", "IP", "MAC", "NODE", "VTEP", "STATUS"],
                &rows,
            );
        }
        Format::Json => print_json(Value::Array(eps.iter().map(endpoint_json).collect())),
    }
}

/// `ovlctl peers`.
pub fn peers(f: Format, e: &EncryptionState) {
    match f {
        Format::Table => print!("{}", crate::encryption::peers_text(e)),
        Format::Json => print_json(crate::encryption::peers_json(e)),
    }
}

pub fn fdb(f: Format, r: &FdbResponse) {
    match f {
        Format::Table => {
            if !r.local {
                println!("(no local endpoint: this host keeps no devices for the network)");
            }
            let rows: Vec<[String; 5]> = r
                .entries
                .iter()
                .map(|e| {
                    [
                        e.kind.clone(),
                        e.mac.clone(),
                        e.ip.clone(),
                        e.vtep.clone(),
                        e.state.clone(),
                    ]
                })
                .collect();
            table(&["KIND", "MAC", "IP", "VTEP", "STATE"], &rows);
        }
        Format::Json => print_json(json!({
            "local": r.local,
            "entries": r.entries.iter().map(|e| json!({
                "kind": e.kind, "mac": e.mac, "ip": e.ip, "vtep": e.vtep, "state": e.state,
            })).collect::<Vec<_>>(),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_strings_cannot_drive_the_terminal_or_forge_rows() {
        assert_eq!(escape("web-1"), "web-1");
        assert_eq!(escape("über"), "über");
        assert_eq!(escape("a\x1b[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(escape("x\nfake row"), "x\\nfake row");
        assert_eq!(escape("\u{202e}gpj"), "\\u{202e}gpj");
        assert_eq!(escape("\u{9b}31m"), "\\u{9b}31m");
        let t = render_table(&["NAME"], &[["evil\n\x1b[31mroot".to_string()]]);
        assert_eq!(t.lines().count(), 2, "{t:?}");
        assert!(!t.contains('\x1b'), "{t:?}");
    }
}
