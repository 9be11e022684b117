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
        Format::Table => println!("{text}"),
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
                ("Advertise", r.advertise_addr.clone()),
                ("Data path", r.data_path_addr.clone()),
                ("Gossip", r.gossip_addr.clone()),
                (
                    "Nodes",
                    format!("{} alive of {}", r.nodes_alive, r.nodes_total),
                ),
            ];
            for (k, v) in rows {
                println!("{:<10} {v}", format!("{k}:"));
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
                "counters": counters,
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

fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

fn dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { s.into() }
}

fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
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
        println!("{}", s.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}
