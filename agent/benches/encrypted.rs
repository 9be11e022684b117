//! Criterion microbenchmarks of the encrypted data plane's hot paths:
//! seal and open at 64, 1400 and 9000 bytes, and the replay window. Run
//! with `cargo bench -p ovl-agent --bench encrypted`; results (and the
//! ratios they feed) in BENCHMARKS.md.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ovl_agent::dataplane::encrypted::codec::{FRAME_AT, Receiver, Sender, TAG_LEN};
use ovl_agent::dataplane::encrypted::replay::ReplayWindow;
use ovl_agent::ids::{ClusterId, NodeId};
use ovl_agent::keys::pair::{EpochSecret, PairKeys};

fn pair() -> (PairKeys, PairKeys) {
    let c = ClusterId::from_bytes([1; 16]);
    let (a, b) = (NodeId::from_bytes([1; 16]), NodeId::from_bytes([2; 16]));
    let (sa, sb) = (
        EpochSecret::from_random(1, [3; 32]),
        EpochSecret::from_random(1, [4; 32]),
    );
    let ab = sa.pair(c, a, b, sb.public()).expect("contributory");
    let ba = sb.pair(c, b, a, sa.public()).expect("contributory");
    (ab, ba)
}

fn seal_open(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    for size in [64usize, 1400, 9000] {
        g.throughput(Throughput::Bytes(size as u64));
        let (a, b) = pair();
        let mut tx = Sender::new(pair().0.send);
        let mut buf = vec![0u8; FRAME_AT + size + TAG_LEN];
        g.bench_with_input(BenchmarkId::new("seal", size), &size, |bench, &size| {
            bench.iter(|| tx.seal(42, &mut buf, size).expect("seal"))
        });
        // Open needs a fresh sequence number per packet (the window drops
        // replays), so each iteration opens one of a pre-sealed batch.
        let mut tx = Sender::new(a.send);
        let mut rx = Receiver::new(b.recv);
        let batch: Vec<Vec<u8>> = (0..4096)
            .map(|_| {
                let mut d = vec![0u8; FRAME_AT + size + TAG_LEN];
                let n = tx.seal(42, &mut d, size).expect("seal");
                d.truncate(n);
                d
            })
            .collect();
        let mut scratch = vec![0u8; FRAME_AT + size + TAG_LEN];
        let mut i = 0usize;
        g.bench_with_input(BenchmarkId::new("open", size), &size, |bench, _| {
            bench.iter(|| {
                if i == batch.len() {
                    // A fresh window takes the batch's numbers again (`pair`
                    // is deterministic: the same keys every call).
                    rx = Receiver::new(pair().1.recv);
                    i = 0;
                }
                scratch.copy_from_slice(&batch[i]);
                i += 1;
                rx.open(&mut scratch).expect("open")
            })
        });
    }
    g.finish();
}

fn replay(c: &mut Criterion) {
    let mut g = c.benchmark_group("replay");
    g.bench_function("in order", |bench| {
        let mut w = ReplayWindow::new();
        let mut seq = 0u64;
        bench.iter(|| {
            seq += 1;
            w.record(seq)
        })
    });
    g.bench_function("reordered by 1000", |bench| {
        let mut w = ReplayWindow::new();
        let mut seq = 0u64;
        bench.iter(|| {
            seq += 2;
            let _ = w.record(seq + 1000);
            w.record(seq)
        })
    });
    g.finish();
}

criterion_group!(benches, seal_open, replay);
criterion_main!(benches);
