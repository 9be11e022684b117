//! Counters, timings and a [`Snapshot`] to OpenMetrics text. Pure: a fresh
//! registry per scrape holds constant values read just before, plus the
//! live histograms (shared handles, not copies).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::{ConstCounter, Counter as PromCounter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::{Registry, Unit};

use super::{Snapshot, Timings};
use crate::dataplane::encrypted::{Dropped, Traffic};
use crate::metrics::{Counter, Counters};

type Labels = Vec<(&'static str, String)>;

fn label(k: &'static str, v: impl Into<String>) -> Labels {
    vec![(k, v.into())]
}

/// The OpenMetrics text of everything, ending in `# EOF`.
pub fn render(counters: &Counters, timings: &Timings, snap: &Snapshot) -> String {
    let mut r = Registry::with_prefix("ovl");
    // Every counter of the registry, one family each: a counter added to
    // `counters!` shows up here with no change.
    for c in Counter::ALL {
        r.register(
            c.name(),
            format!("Count of {} events (see agent/src/metrics.rs)", c.name()),
            ConstCounter::new(counters.get(*c)),
        );
    }

    let nodes = Family::<Labels, Gauge>::default();
    for (status, n) in &snap.nodes {
        nodes
            .get_or_create(&label("status", status.as_str()))
            .set(gauge(*n));
    }
    r.register(
        "nodes",
        "Nodes this agent's membership lists, by status",
        nodes,
    );
    r.register(
        "networks",
        "Networks in the replicated store",
        ConstGauge::new(gauge(snap.networks)),
    );
    let endpoints = Family::<Labels, Gauge>::default();
    for (place, n) in [
        ("local", snap.local_endpoints),
        ("remote", snap.remote_endpoints),
    ] {
        endpoints
            .get_or_create(&label("location", place))
            .set(gauge(n));
    }
    r.register(
        "endpoints",
        "Endpoints in the store: attached on this host (local) or on others (remote)",
        endpoints,
    );

    table(&mut r, &snap.table);

    r.register_with_unit(
        "reconcile_pass_duration",
        "Reconcile passes that read and programmed the kernel",
        Unit::Seconds,
        timings.reconcile_pass.clone(),
    );
    r.register_with_unit(
        "attach_programmed_latency",
        "From an attach's store write to every live host of the network confirming it programmed the endpoint (bounded by --attach-wait)",
        Unit::Seconds,
        timings.attach_programmed.clone(),
    );

    if let Some(engine) = &snap.engine {
        encrypted(&mut r, engine);
    }

    let mut out = String::new();
    // Writing into a String cannot fail; a metric that could not encode
    // would be a bug in the registry, not something to serve half of.
    if encode(&mut out, &r).is_err() {
        out.clear();
        out.push_str("# EOF\n");
    }
    out
}

fn table(r: &mut Registry, t: &crate::store::TableStats) {
    let rows = Family::<Labels, Gauge>::default();
    let tombstones = Family::<Labels, Gauge>::default();
    for (which, n, d) in [
        ("own", t.own_rows, t.own_tombstones),
        ("replicas", t.replica_rows, t.replica_tombstones),
    ] {
        rows.get_or_create(&label("table", which)).set(gauge(n));
        tombstones
            .get_or_create(&label("table", which))
            .set(gauge(d));
    }
    r.register(
        "table_rows",
        "Rows held in the tables, tombstones included",
        rows,
    );
    r.register(
        "table_tombstones",
        "Deleted rows kept until every live peer pulled past them",
        tombstones,
    );
    for (name, help, v) in [
        ("table_version", "The own table's version", t.own_version),
        (
            "table_durable_version",
            "The own table's version on disk",
            t.durable_version,
        ),
        (
            "table_compacted_version",
            "Own tombstones at or below this version were collected",
            t.compacted,
        ),
    ] {
        r.register(name, help, ConstGauge::new(gauge(v)));
    }
    r.register(
        "store_fsyncs",
        "fsync calls of the store writer (group commit: fewer than writes)",
        ConstCounter::new(t.fsyncs),
    );
    r.register(
        "store_snapshots",
        "Snapshots the store writer folded its log into",
        ConstCounter::new(t.snapshots),
    );
}

fn encrypted(r: &mut Registry, engine: &crate::dataplane::encrypted::EngineCounters) {
    let packets = Family::<Labels, PromCounter>::default();
    let bytes = Family::<Labels, PromCounter>::default();
    traffic(&packets, &bytes, Vec::new(), &engine.total);
    let drops = Family::<Labels, PromCounter>::default();
    // Every reason, zeros included, so rate() works from the first drop.
    for d in Dropped::ALL {
        drops
            .get_or_create(&label("reason", d.name()))
            .inc_by(engine.total.dropped(d));
    }
    r.register(
        "encrypted_packets",
        "Frames through the encrypted data plane (in: opened and delivered, out: sealed and sent)",
        packets,
    );
    r.register_with_unit(
        "encrypted_traffic",
        "Frame bytes through the encrypted data plane",
        Unit::Bytes,
        bytes,
    );
    r.register(
        "encrypted_drops",
        "Packets the encrypted data plane dropped, by reason",
        drops,
    );

    // `peer` is an admitted member's node id: the engine holds state only
    // for hosts membership lists, so this is bounded by the cluster size.
    let packets = Family::<Labels, PromCounter>::default();
    let bytes = Family::<Labels, PromCounter>::default();
    let drops = Family::<Labels, PromCounter>::default();
    for (node, p) in &engine.peers {
        let peer = label("peer", node.to_string());
        traffic(&packets, &bytes, peer.clone(), &p.traffic);
        for (d, n) in &p.traffic.drops {
            let mut l = peer.clone();
            l.push(("reason", d.name().to_string()));
            drops.get_or_create(&l).inc_by(*n);
        }
    }
    r.register(
        "encrypted_peer_packets",
        "Frames exchanged with each peer host over encrypted networks",
        packets,
    );
    r.register_with_unit(
        "encrypted_peer_traffic",
        "Frame bytes exchanged with each peer host over encrypted networks",
        Unit::Bytes,
        bytes,
    );
    r.register(
        "encrypted_peer_drops",
        "Packets to or from each peer host dropped, by reason (non-zero only)",
        drops,
    );
}

fn traffic(
    packets: &Family<Labels, PromCounter>,
    bytes: &Family<Labels, PromCounter>,
    base: Labels,
    t: &Traffic,
) {
    for (dir, p, b) in [
        ("in", t.packets_in, t.bytes_in),
        ("out", t.packets_out, t.bytes_out),
    ] {
        let mut l = base.clone();
        l.push(("direction", dir.to_string()));
        packets.get_or_create(&l).inc_by(p);
        bytes.get_or_create(&l).inc_by(b);
    }
}

/// Gauges are signed; a count past i64::MAX cannot happen, but saturate.
fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::dataplane::encrypted::{EngineCounters, PeerCounters};
    use crate::ids::NodeId;
    use crate::membership::NodeStatus;

    fn snapshot() -> Snapshot {
        Snapshot {
            nodes: vec![
                (NodeStatus::Alive, 3),
                (NodeStatus::Dead, 1),
                (NodeStatus::Left, 0),
            ],
            networks: 2,
            local_endpoints: 1,
            remote_endpoints: 4,
            engine: None,
            table: crate::store::TableStats {
                own_rows: 12,
                own_tombstones: 3,
                ..Default::default()
            },
        }
    }

    /// The value of the one sample line `series` (exact name and labels).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
    }

    #[test]
    fn every_counter_is_a_total_family_with_its_value() {
        let c = Counters::default();
        c.inc(Counter::GossipDropBadTag);
        c.inc(Counter::GossipDropBadTag);
        c.inc(Counter::PeerRefused);
        let text = render(&c, &Timings::default(), &snapshot());
        for k in Counter::ALL {
            let want = c.get(*k) as f64;
            let name = format!("ovl_{}_total", k.name());
            assert_eq!(sample(&text, &name), Some(want), "{name} in:\n{text}");
            assert!(
                text.contains(&format!("# TYPE ovl_{} counter", k.name())),
                "{name} typed as a counter"
            );
        }
        assert_eq!(sample(&text, "ovl_gossip_drop_bad_tag_total"), Some(2.0));
        assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    }

    #[test]
    fn table_gauges_show_rows_and_tombstones() {
        let text = render(&Counters::default(), &Timings::default(), &snapshot());
        assert_eq!(sample(&text, "ovl_table_rows{table=\"own\"}"), Some(12.0));
        assert_eq!(
            sample(&text, "ovl_table_tombstones{table=\"own\"}"),
            Some(3.0)
        );
        assert_eq!(
            sample(&text, "ovl_table_tombstones{table=\"replicas\"}"),
            Some(0.0)
        );
    }

    #[test]
    fn gauges_show_nodes_by_status_networks_and_endpoints() {
        let text = render(&Counters::default(), &Timings::default(), &snapshot());
        assert_eq!(sample(&text, r#"ovl_nodes{status="alive"}"#), Some(3.0));
        assert_eq!(sample(&text, r#"ovl_nodes{status="dead"}"#), Some(1.0));
        assert_eq!(sample(&text, r#"ovl_nodes{status="left"}"#), Some(0.0));
        assert_eq!(sample(&text, "ovl_networks"), Some(2.0));
        assert_eq!(
            sample(&text, r#"ovl_endpoints{location="local"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, r#"ovl_endpoints{location="remote"}"#),
            Some(4.0)
        );
        // No engine: no encrypted families at all (not zeros that look
        // like an idle engine).
        assert!(!text.contains("ovl_encrypted"), "{text}");
    }

    #[test]
    fn histograms_are_in_seconds_and_count_observations() {
        let t = Timings::default();
        t.reconcile_pass(std::time::Duration::from_millis(3));
        t.reconcile_pass(std::time::Duration::from_millis(40));
        t.attach_programmed(std::time::Duration::from_millis(250));
        let text = render(&Counters::default(), &t, &snapshot());
        assert!(text.contains("# TYPE ovl_reconcile_pass_duration_seconds histogram"));
        assert!(text.contains("# UNIT ovl_reconcile_pass_duration_seconds seconds"));
        assert_eq!(
            sample(&text, "ovl_reconcile_pass_duration_seconds_count"),
            Some(2.0)
        );
        let sum = sample(&text, "ovl_reconcile_pass_duration_seconds_sum").unwrap_or(0.0);
        assert!((sum - 0.043).abs() < 1e-9, "sum {sum}");
        // 3 ms is in the 4.096 ms bucket, 40 ms is not.
        assert_eq!(
            sample(
                &text,
                r#"ovl_reconcile_pass_duration_seconds_bucket{le="0.004"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "ovl_attach_programmed_latency_seconds_count"),
            Some(1.0)
        );
    }

    #[test]
    fn encrypted_traffic_is_per_direction_and_per_admitted_peer() {
        let peer = NodeId::from_bytes([7; 16]);
        let t = Traffic {
            packets_in: 5,
            bytes_in: 500,
            packets_out: 6,
            bytes_out: 600,
            drops: vec![(Dropped::Replay, 2)],
        };
        let engine = EngineCounters {
            total: t.clone(),
            networks: BTreeMap::new(),
            peers: BTreeMap::from([(
                peer,
                PeerCounters {
                    addr: None,
                    traffic: t,
                    epoch_in_use: None,
                    epochs: Vec::new(),
                },
            )]),
        };
        let snap = Snapshot {
            engine: Some(engine),
            ..snapshot()
        };
        let text = render(&Counters::default(), &Timings::default(), &snap);
        assert_eq!(
            sample(&text, r#"ovl_encrypted_packets_total{direction="in"}"#),
            Some(5.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"ovl_encrypted_traffic_bytes_total{direction="out"}"#
            ),
            Some(600.0)
        );
        assert_eq!(
            sample(&text, r#"ovl_encrypted_drops_total{reason="replay"}"#),
            Some(2.0)
        );
        assert_eq!(
            sample(&text, r#"ovl_encrypted_drops_total{reason="bad_tag"}"#),
            Some(0.0),
            "every reason is listed"
        );
        let p = format!("peer=\"{peer}\"");
        assert_eq!(
            sample(
                &text,
                &format!("ovl_encrypted_peer_traffic_bytes_total{{{p},direction=\"in\"}}")
            ),
            Some(500.0)
        );
        assert_eq!(
            sample(
                &text,
                &format!("ovl_encrypted_peer_drops_total{{{p},reason=\"replay\"}}")
            ),
            Some(2.0)
        );
    }
}
