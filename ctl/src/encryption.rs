//! The encrypted data plane as operators see it: the section `network
//! inspect` adds for an encrypted network, and `ovlctl peers`. Text and
//! JSON are built as values (tested here) and printed by the callers.

use std::time::{Duration, UNIX_EPOCH};

use ovl_proto::api::{EncryptedPeer, EncryptionState, KeyEpoch, TrafficCounters};
use serde_json::{Value, json};

use crate::output::{dash, escape, render_table, short};

const NO_ENGINE: &str =
    "Encryption: this agent runs no encrypted data plane: no counters or key state to show";

/// `2026-12-02T06:40:05Z (in 3s)`: the next rotation, seen from the
/// agent's clock when it answered.
fn next_rotation(e: &EncryptionState) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(e.next_rotation_ms);
    format!("{} ({})", humantime::format_rfc3339_seconds(at), within(e))
}

/// `in 3s`, rounded up (`now` once the boundary has passed).
fn within(e: &EncryptionState) -> String {
    match e.next_rotation_ms.saturating_sub(e.now_ms) {
        0 => "now".into(),
        ms => format!("in {}s", ms.div_ceil(1000)),
    }
}

fn schedule_line(e: &EncryptionState) -> String {
    let every = humantime::format_duration(Duration::from_millis(e.rotation_ms));
    format!(
        "Encryption: epoch {} (key rotation every {every}); next rotation at {}",
        e.current_epoch,
        next_rotation(e)
    )
}

fn packets(n: u64, bytes: u64) -> String {
    format!("{n} ({bytes} B)")
}

fn drops(t: &TrafficCounters) -> String {
    let d: Vec<String> = t
        .drops
        .iter()
        .map(|c| format!("{}={}", c.name, c.value))
        .collect();
    if d.is_empty() {
        "-".into()
    } else {
        d.join(" ")
    }
}

fn traffic_line(t: &TrafficCounters) -> String {
    format!(
        "in {} packets ({} B), out {} packets ({} B); drops: {}",
        t.packets_in,
        t.bytes_in,
        t.packets_out,
        t.bytes_out,
        drops(t)
    )
}

fn traffic_json(t: Option<&TrafficCounters>) -> Value {
    match t {
        None => Value::Null,
        Some(t) => {
            let drops: serde_json::Map<String, Value> = t
                .drops
                .iter()
                .map(|c| (c.name.clone(), json!(c.value)))
                .collect();
            json!({
                "packets_in": t.packets_in, "bytes_in": t.bytes_in,
                "packets_out": t.packets_out, "bytes_out": t.bytes_out, "drops": drops,
            })
        }
    }
}

fn epoch_json(k: &KeyEpoch) -> Value {
    json!({
        "epoch": k.epoch, "send_fingerprint": k.send_fingerprint,
        "recv_fingerprint": k.recv_fingerprint, "sent": k.sent,
    })
}

fn none_if_empty(s: &str) -> Value {
    if s.is_empty() { Value::Null } else { json!(s) }
}

fn peer_json(e: &EncryptionState, p: &EncryptedPeer) -> Value {
    json!({
        "node_id": p.node_id, "node_name": p.node_name, "known": p.known,
        "addr": none_if_empty(&p.addr), "epoch_in_use": p.epoch_in_use,
        "next_rotation_ms": e.next_rotation_ms,
        "next_rotation_in_ms": e.next_rotation_ms.saturating_sub(e.now_ms),
        "send_fingerprint": p.in_use.as_ref().map(|k| k.send_fingerprint.clone()),
        "recv_fingerprint": p.in_use.as_ref().map(|k| k.recv_fingerprint.clone()),
        "epochs": p.epochs.iter().map(epoch_json).collect::<Vec<_>>(),
        "traffic": traffic_json(p.traffic.as_ref()),
    })
}

/// The JSON of a view; the scope's counters go under `scope` ("traffic"
/// for a network, "total" for the engine).
fn state_json(e: &EncryptionState, scope: &str) -> Value {
    let mut v = json!({
        "engine": e.engine, "now_ms": e.now_ms, "rotation_ms": e.rotation_ms,
        "current_epoch": e.current_epoch, "next_rotation_ms": e.next_rotation_ms,
        "next_rotation_in_ms": e.next_rotation_ms.saturating_sub(e.now_ms),
        "peers": e.peers.iter().map(|p| peer_json(e, p)).collect::<Vec<_>>(),
    });
    v[scope] = traffic_json(e.traffic.as_ref());
    v
}

/// The `encryption` object of `network inspect --format json`.
pub fn inspect_json(e: &EncryptionState) -> Value {
    state_json(e, "traffic")
}

/// `ovlctl peers --format json`.
pub fn peers_json(e: &EncryptionState) -> Value {
    state_json(e, "total")
}

const COLUMNS: [&str; 11] = [
    "PEER",
    "NAME",
    "ADDRESS",
    "EPOCH",
    "NEXT ROTATION",
    "SEND KEY",
    "RECV KEY",
    "EPOCHS",
    "IN",
    "OUT",
    "DROPS",
];

fn peer_row(e: &EncryptionState, p: &EncryptedPeer) -> [String; 11] {
    let fp = |f: fn(&KeyEpoch) -> &String| match (&p.in_use, p.epoch_in_use) {
        (Some(k), _) => f(k).clone(),
        (None, Some(_)) => "no keys".into(),
        (None, None) => "-".into(),
    };
    let t = p.traffic.clone().unwrap_or_default();
    [
        short(&p.node_id).to_string(),
        dash(&p.node_name),
        dash(&p.addr),
        p.epoch_in_use.map_or("-".into(), |n| n.to_string()),
        within(e),
        fp(|k| &k.send_fingerprint),
        fp(|k| &k.recv_fingerprint),
        dash(
            &p.epochs
                .iter()
                .map(|k| k.epoch.to_string())
                .collect::<Vec<_>>()
                .join(","),
        ),
        packets(t.packets_in, t.bytes_in),
        packets(t.packets_out, t.bytes_out),
        drops(&t),
    ]
}

/// The section `network inspect` prints for an encrypted network.
pub fn inspect_text(e: &EncryptionState) -> String {
    if !e.engine {
        return format!("{NO_ENGINE}\n");
    }
    let mut out = format!("{}\n", schedule_line(e));
    match &e.traffic {
        Some(t) => out.push_str(&format!("Traffic:    {}\n", traffic_line(t))),
        None => out.push_str(
            "Traffic:    none to show: the engine holds no device for this network on this \
             host (it has one while an endpoint is attached here)\n",
        ),
    }
    let (known, unknown): (Vec<&EncryptedPeer>, Vec<&EncryptedPeer>) =
        e.peers.iter().partition(|p| p.known);
    if !known.is_empty() {
        out.push('\n');
        let rows: Vec<[String; 11]> = known.iter().map(|p| peer_row(e, p)).collect();
        out.push_str(&render_table(&COLUMNS, &rows));
        out.push_str("(per peer: traffic with that host over all its encrypted networks)\n");
    }
    if !unknown.is_empty() {
        let names: Vec<String> = unknown
            .iter()
            .map(|p| format!("{} ({})", escape(&dash(&p.node_name)), short(&p.node_id)))
            .collect();
        out.push_str(&format!(
            "Not known to the encrypted engine (no address or keys yet): {}\n",
            names.join(", ")
        ));
    }
    out
}

/// `ovlctl peers`: a row per peer host the engine knows, and its total.
pub fn peers_text(e: &EncryptionState) -> String {
    if !e.engine {
        return format!("{NO_ENGINE}\n");
    }
    let mut rows: Vec<[String; 11]> = e.peers.iter().map(|p| peer_row(e, p)).collect();
    let t = e.traffic.clone().unwrap_or_default();
    let mut total: [String; 11] = Default::default();
    total[0] = "(total)".into();
    total[8] = packets(t.packets_in, t.bytes_in);
    total[9] = packets(t.packets_out, t.bytes_out);
    total[10] = drops(&t);
    rows.push(total);
    format!("{}\n{}", schedule_line(e), render_table(&COLUMNS, &rows))
}

#[cfg(test)]
mod tests {
    use ovl_proto::api::Counter;

    use super::*;

    fn traffic(n: u64, drops: &[(&str, u64)]) -> TrafficCounters {
        TrafficCounters {
            packets_in: n,
            bytes_in: n * 100,
            packets_out: n + 1,
            bytes_out: (n + 1) * 100,
            drops: drops
                .iter()
                .map(|(name, value)| Counter {
                    name: (*name).into(),
                    value: *value,
                })
                .collect(),
        }
    }

    fn key(epoch: u64) -> KeyEpoch {
        KeyEpoch {
            epoch,
            send_fingerprint: format!("{:08x}", 0xa0 + epoch),
            recv_fingerprint: format!("{:08x}", 0xb0 + epoch),
            sent: epoch,
        }
    }

    /// Epoch 2 of 5 s periods at 12.3 s; peer b is known, c is not.
    fn state() -> EncryptionState {
        EncryptionState {
            engine: true,
            now_ms: 12_300,
            rotation_ms: 5_000,
            current_epoch: 2,
            next_rotation_ms: 15_000,
            traffic: Some(traffic(7, &[("replay", 2)])),
            peers: vec![
                EncryptedPeer {
                    node_id: "0202020202020202".repeat(2),
                    node_name: "b".into(),
                    known: true,
                    addr: "198.18.0.2:4500".into(),
                    epoch_in_use: Some(2),
                    in_use: Some(key(2)),
                    epochs: vec![key(1), key(2), key(3)],
                    traffic: Some(traffic(7, &[("replay", 2), ("bad_tag", 1)])),
                },
                EncryptedPeer {
                    node_id: "0303030303030303".repeat(2),
                    node_name: "c".into(),
                    ..Default::default()
                },
            ],
        }
    }

    #[test]
    fn inspect_text_shows_schedule_traffic_known_and_unknown_peers() {
        let s = inspect_text(&state());
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(
            lines[0],
            "Encryption: epoch 2 (key rotation every 5s); next rotation at \
             1970-01-01T00:00:15Z (in 3s)"
        );
        assert_eq!(
            lines[1],
            "Traffic:    in 7 packets (700 B), out 8 packets (800 B); drops: replay=2"
        );
        assert!(lines[3].starts_with("PEER "), "{s}");
        let row = lines[4];
        for cell in [
            "020202020202",
            "198.18.0.2:4500",
            "in 3s",
            "000000a2",
            "000000b2",
            "1,2,3",
            "7 (700 B)",
            "8 (800 B)",
            "replay=2 bad_tag=1",
        ] {
            assert!(row.contains(cell), "{cell:?} missing in {row:?}");
        }
        assert!(
            s.contains(
                "Not known to the encrypted engine (no address or keys yet): c (030303030303)"
            ),
            "{s}"
        );
        assert!(
            !s.contains("030303030303  "),
            "an unknown peer has no row of zeros"
        );
    }

    #[test]
    fn without_engine_or_device_or_keys_it_says_so() {
        let mut e = state();
        e.engine = false;
        e.traffic = None;
        assert_eq!(inspect_text(&e), format!("{NO_ENGINE}\n"));
        assert_eq!(peers_text(&e), format!("{NO_ENGINE}\n"));

        let mut e = state();
        e.traffic = None;
        e.peers[0].in_use = None;
        let s = inspect_text(&e);
        assert!(s.contains("Traffic:    none to show"), "{s}");
        assert!(
            s.lines().nth(4).is_some_and(|r| r.contains("no keys")),
            "{s}"
        );
        assert!(!s.contains("0 packets"), "{s}");
    }

    #[test]
    fn the_rotation_countdown_rounds_up_and_ends_at_now() {
        let mut e = state();
        e.now_ms = 14_001;
        assert_eq!(within(&e), "in 1s");
        e.now_ms = 10_000;
        assert_eq!(within(&e), "in 5s");
        e.now_ms = 15_000;
        assert_eq!(within(&e), "now");
    }

    #[test]
    fn peers_text_has_a_row_per_peer_and_the_total() {
        let mut e = state();
        e.peers.truncate(1);
        e.traffic = Some(traffic(9, &[("unknown_spi", 5)]));
        let s = peers_text(&e);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 4, "{s}");
        assert!(lines[2].starts_with("020202020202  b "), "{s}");
        assert!(lines[3].starts_with("(total)"), "{s}");
        assert!(lines[3].contains("9 (900 B)") && lines[3].ends_with("unknown_spi=5"));
    }

    #[test]
    fn json_fields() {
        let e = state();
        let v = inspect_json(&e);
        assert_eq!(v["engine"], true);
        assert_eq!(v["current_epoch"], 2);
        assert_eq!(v["next_rotation_ms"], 15_000);
        assert_eq!(v["next_rotation_in_ms"], 2_700);
        assert_eq!(v["traffic"]["packets_in"], 7);
        assert_eq!(v["traffic"]["drops"]["replay"], 2);
        let b = &v["peers"][0];
        assert_eq!(b["addr"], "198.18.0.2:4500");
        assert_eq!(b["epoch_in_use"], 2);
        assert_eq!(b["send_fingerprint"], "000000a2");
        assert_eq!(b["recv_fingerprint"], "000000b2");
        assert_eq!(b["epochs"][2]["epoch"], 3);
        assert_eq!(b["traffic"]["drops"]["bad_tag"], 1);
        let c = &v["peers"][1];
        assert_eq!(c["known"], false);
        for field in ["addr", "epoch_in_use", "send_fingerprint", "traffic"] {
            assert!(
                c[field].is_null(),
                "{field} of an unknown peer: {}",
                c[field]
            );
        }
        let p = peers_json(&e);
        assert_eq!(p["total"]["packets_in"], 7);
        assert!(p.get("traffic").is_none());
        let mut none = e.clone();
        none.engine = false;
        none.traffic = None;
        assert!(inspect_json(&none)["traffic"].is_null());
    }
}
