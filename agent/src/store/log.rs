//! The own table's on-disk format, sans-IO: a snapshot (`table.pb`) plus an
//! append log (`table.log`) of the changes since. A write appends one frame
//! (O(change)); the writer folds the log into a new snapshot once the log
//! outgrows it, so the amortised cost stays O(change) too.
//!
//! Frame: `len: u32 LE | check: 8 bytes | payload: len bytes`, where `check`
//! is the first 8 bytes of SHA-256(payload) and the payload a `LogRecord`.
//! Replay stops at the first frame that is short, too long or does not
//! check: a torn tail (a crash mid-append) or a flipped bit loses only what
//! follows it, and the caller counts and logs it.
//!
//! The snapshot keeps the field numbers of the first format's
//! `TableSnapshot` (1-3) and adds the collection floor (4), so a state dir
//! written by an older agent loads as is (floor 0).

use ovl_proto::records::TableEntry;
use prost::Message;

use super::table::Table;

/// A frame's header: length and check.
pub const HEADER: usize = 4 + CHECK;
const CHECK: usize = 8;
/// Above any record the API accepts; a longer length is corruption.
pub const MAX_RECORD: usize = 16 << 20;

/// One logged change of the own table.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LogRecord {
    /// An entry as the table wrote it (a put or a tombstone).
    #[prost(message, optional, tag = "1")]
    pub entry: Option<TableEntry>,
    /// Tombstones at or below this version were collected.
    #[prost(uint64, tag = "2")]
    pub collect_through: u64,
}

impl LogRecord {
    pub fn entry(e: TableEntry) -> Self {
        Self {
            entry: Some(e),
            collect_through: 0,
        }
    }

    pub fn collect(floor: u64) -> Self {
        Self {
            entry: None,
            collect_through: floor,
        }
    }
}

/// The snapshot file; tags 1-3 are `TableSnapshot`'s.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotFile {
    #[prost(bytes = "vec", tag = "1")]
    pub owner: Vec<u8>,
    #[prost(uint64, tag = "2")]
    pub version: u64,
    #[prost(message, repeated, tag = "3")]
    pub entries: Vec<TableEntry>,
    #[prost(uint64, tag = "4")]
    pub compacted: u64,
}

pub fn encode_snapshot(owner: &[u8], t: &Table) -> Vec<u8> {
    SnapshotFile {
        owner: owner.to_vec(),
        version: t.version(),
        entries: t.rows().cloned().collect(),
        compacted: t.compacted(),
    }
    .encode_to_vec()
}

pub fn decode_snapshot(raw: &[u8]) -> Result<Table, prost::DecodeError> {
    let s = SnapshotFile::decode(raw)?;
    Ok(Table::from_parts(s.version, s.compacted, s.entries))
}

fn check(payload: &[u8]) -> [u8; CHECK] {
    let d = ring::digest::digest(&ring::digest::SHA256, payload);
    let mut out = [0; CHECK];
    out.copy_from_slice(&d.as_ref()[..CHECK]);
    out
}

/// Appends one frame to `out`.
pub fn encode_frame(rec: &LogRecord, out: &mut Vec<u8>) {
    let payload = rec.encode_to_vec();
    // Records are bounded by the API far below 4 GiB.
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&check(&payload));
    out.extend_from_slice(&payload);
}

/// Why replay stopped before the end of the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Torn {
    #[error("{0} bytes left, shorter than a frame header")]
    ShortHeader(usize),
    #[error("frame of {len} bytes, {left} left")]
    ShortPayload { len: usize, left: usize },
    #[error("frame length {0} above the limit")]
    TooLong(usize),
    #[error("frame check mismatch")]
    BadCheck,
    #[error("frame does not decode: {0}")]
    Undecodable(prost::DecodeError),
}

/// What a log holds: the records up to the first bad frame, how many bytes
/// they span (the caller truncates the file there), and why it stopped.
#[derive(Debug, Default)]
pub struct Decoded {
    pub records: Vec<LogRecord>,
    pub valid_len: usize,
    pub torn: Option<Torn>,
}

pub fn decode_log(mut raw: &[u8]) -> Decoded {
    let mut out = Decoded::default();
    while !raw.is_empty() {
        match decode_frame(raw) {
            Ok((rec, used)) => {
                out.records.push(rec);
                out.valid_len += used;
                raw = &raw[used..];
            }
            Err(t) => {
                out.torn = Some(t);
                break;
            }
        }
    }
    out
}

fn decode_frame(raw: &[u8]) -> Result<(LogRecord, usize), Torn> {
    let (Some(len), Some(sum)) = (raw.get(..4), raw.get(4..HEADER)) else {
        return Err(Torn::ShortHeader(raw.len()));
    };
    let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len > MAX_RECORD {
        return Err(Torn::TooLong(len));
    }
    let payload = raw.get(HEADER..HEADER + len).ok_or(Torn::ShortPayload {
        len,
        left: raw.len() - HEADER,
    })?;
    if check(payload) != sum {
        return Err(Torn::BadCheck);
    }
    let rec = LogRecord::decode(payload).map_err(Torn::Undecodable)?;
    Ok((rec, HEADER + len))
}

/// Applies logged records over the snapshot they follow, in log order.
/// Records the snapshot already holds (a crash between writing a snapshot
/// and emptying the log) are skipped, so replay is idempotent.
pub fn replay(table: &mut Table, records: Vec<LogRecord>) {
    for r in records {
        apply(table, r);
    }
}

/// One record; the writer's mirror uses it too.
pub fn apply(table: &mut Table, r: LogRecord) {
    if let Some(e) = r.entry
        && e.version > table.version()
    {
        table.restore(e);
    }
    if r.collect_through > table.compacted() {
        table.collect(r.collect_through);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ovl_proto::records::{NetworkRemoval, TableSnapshot, table_entry::Value};

    fn val(n: u64) -> Value {
        Value::Removal(NetworkRemoval {
            network_id: vec![n as u8],
            removed_at_ms: n,
        })
    }

    /// A table built by `ops` (put i / delete i / collect), and its log.
    fn history(ops: &[(u8, u8)]) -> (Table, Vec<u8>) {
        let mut t = Table::default();
        let mut log = Vec::new();
        for &(op, k) in ops {
            let key = format!("k{}", k % 8);
            let rec = match op % 3 {
                0 => t.put(&key, val(u64::from(k))).map(LogRecord::entry),
                1 => t.delete(&key).map(LogRecord::entry),
                _ => {
                    let floor = t.gc_floor(t.version() / 2, 4);
                    (floor > t.compacted()).then(|| {
                        t.collect(floor);
                        LogRecord::collect(floor)
                    })
                }
            };
            if let Some(r) = rec {
                encode_frame(&r, &mut log);
            }
        }
        (t, log)
    }

    fn ops(seed: u64, n: usize) -> Vec<(u8, u8)> {
        // xorshift: deterministic, no test dependency.
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x & 0xff) as u8, (x >> 8 & 0xff) as u8)
            })
            .collect()
    }

    #[test]
    fn replay_rebuilds_the_table_exactly() {
        for seed in 1..200 {
            let (want, log) = history(&ops(seed, 60));
            let d = decode_log(&log);
            assert_eq!(d.torn, None);
            assert_eq!(d.valid_len, log.len());
            let mut got = Table::default();
            replay(&mut got, d.records);
            assert_eq!(got, want, "seed {seed}");
        }
    }

    #[test]
    fn every_torn_tail_keeps_a_prefix_and_says_so() {
        let (_, log) = history(&ops(7, 40));
        let whole = decode_log(&log).records;
        for cut in 0..log.len() {
            let d = decode_log(&log[..cut]);
            assert!(d.valid_len <= cut);
            assert_eq!(d.records[..], whole[..d.records.len()], "cut {cut}");
            assert_eq!(
                d.torn.is_some(),
                d.valid_len < cut,
                "cut {cut}: torn iff bytes were left over"
            );
        }
    }

    #[test]
    fn a_flipped_bit_is_caught_and_stops_replay_there() {
        let (_, log) = history(&ops(11, 30));
        let whole = decode_log(&log).records;
        for i in 0..log.len() {
            for bit in [0u8, 3, 7] {
                let mut bad = log.clone();
                bad[i] ^= 1 << bit;
                let d = decode_log(&bad);
                assert!(d.torn.is_some(), "flip at {i}.{bit} went unseen");
                assert!(d.valid_len <= i, "a record past byte {i} was kept");
                assert_eq!(d.records[..], whole[..d.records.len()]);
            }
        }
    }

    #[test]
    fn replay_over_a_newer_snapshot_changes_nothing() {
        let (t, log) = history(&ops(3, 80));
        let mut snap = decode_snapshot(&encode_snapshot(&[1], &t)).unwrap();
        assert_eq!(snap, t);
        replay(&mut snap, decode_log(&log).records);
        assert_eq!(snap, t, "a crash before the log was emptied is harmless");
    }

    #[test]
    fn snapshot_then_log_tail_equals_the_whole_history() {
        let all = ops(5, 100);
        let (mid, _) = history(&all[..50]);
        let (want, _) = history(&all);
        // The tail as the writer logs it after snapshotting `mid`.
        let (_, whole) = history(&all);
        let recs = decode_log(&whole).records;
        let mut t = decode_snapshot(&encode_snapshot(&[1], &mid)).unwrap();
        replay(&mut t, recs);
        assert_eq!(t, want);
    }

    #[test]
    fn the_first_format_loads() {
        let mut t = Table::default();
        t.put("a", val(1));
        t.put("b", val(2));
        t.delete("a");
        let legacy = t.snapshot(&[9]).encode_to_vec();
        assert_eq!(decode_snapshot(&legacy).unwrap(), t);
        // And what we write now still reads as the first format.
        let back = TableSnapshot::decode(encode_snapshot(&[9], &t).as_slice()).unwrap();
        assert_eq!(Table::from_snapshot(back), t);
    }

    #[test]
    fn a_huge_length_is_refused_without_allocating() {
        let mut raw = (u32::MAX).to_le_bytes().to_vec();
        raw.extend_from_slice(&[0; 64]);
        assert!(matches!(decode_log(&raw).torn, Some(Torn::TooLong(_))));
    }
}
