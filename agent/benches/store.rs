//! What one durable put of the own table costs with 10 and with 10 000
//! records already in it: through the store (append log, group commit, one
//! fsync per batch) and, side by side, the first format's way (re-encode
//! the whole table, write it to a temp file, fsync, rename, fsync the
//! directory). Run with `cargo bench -p ovl-agent --bench store`; the
//! state dir is under `OVL_BENCH_DIR` (default the system temp dir: give a
//! real disk, fsync on tmpfs costs nothing). Results in BENCHMARKS.md.

use std::path::PathBuf;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use ovl_agent::ids::NodeId;
use ovl_agent::metrics::Counters;
use ovl_agent::persist;
use ovl_agent::store::{Store, Table};
use ovl_proto::records::{EndpointRecord, table_entry::Value};
use prost::Message;

fn record(i: usize) -> Value {
    Value::Endpoint(EndpointRecord {
        id: (i as u128).to_le_bytes().to_vec(),
        network_id: vec![1; 16],
        name: format!("container-{i}"),
        aliases: vec![format!("alias-{i}")],
        ip: format!("198.18.{}.{}", i / 250, i % 250 + 2),
        prefix_len: 16,
        mac: "02:42:c6:12:00:02".into(),
        vtep: "198.19.0.1".into(),
        ifname: format!("ovl{i}"),
        netns: format!("/proc/{i}/ns/net"),
        created_at_ms: 1_700_000_000_000,
    })
}

fn dir(name: &str) -> PathBuf {
    let base = std::env::var_os("OVL_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let d = base.join(format!("ovl-bench-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    persist::ensure_private_dir(&d).expect("bench dir");
    d
}

fn puts(c: &mut Criterion) {
    let mut g = c.benchmark_group("durable_put");
    g.sample_size(30);
    for size in [10usize, 10_000] {
        let d = dir(&format!("log-{size}"));
        let me = NodeId::from_bytes([1; 16]);
        let mut store = Store::load(&d, me, Arc::new(Counters::default())).expect("load");
        for i in 0..size {
            store.put(&format!("ep/{i}"), record(i)).expect("fill");
        }
        store
            .writer()
            .wait_blocking(store.ticket())
            .expect("fill durable");
        let mut n = 0usize;
        g.bench_with_input(BenchmarkId::new("log", size), &size, |b, _| {
            b.iter(|| {
                n += 1;
                // Rewrites one existing record: the table keeps its size.
                store
                    .put(&format!("ep/{}", n % size), record(n))
                    .expect("put");
                store
                    .writer()
                    .wait_blocking(store.ticket())
                    .expect("durable");
            })
        });
        drop(store);
        let _ = std::fs::remove_dir_all(&d);

        let d = dir(&format!("whole-{size}"));
        let path = d.join("table.pb");
        let mut t = Table::default();
        for i in 0..size {
            t.put(&format!("ep/{i}"), record(i));
        }
        g.bench_with_input(BenchmarkId::new("whole_table", size), &size, |b, _| {
            b.iter(|| {
                n += 1;
                // The first format kept a copy to revert to on failure.
                let before = std::hint::black_box(t.clone());
                t.put(&format!("ep/{}", n % size), record(n));
                drop(before);
                let bytes = t.snapshot(me.as_bytes()).encode_to_vec();
                persist::write_atomic(&path, &bytes).expect("write");
            })
        });
        let _ = std::fs::remove_dir_all(&d);
    }
    g.finish();
}

criterion_group!(benches, puts);
criterion_main!(benches);
