//! Counters of the encrypted VTEP: packets and bytes in and out, drops by
//! reason, for the engine as a whole, per network and per peer host.
//! Relaxed atomics (a snapshot is a sum, not a transaction), shared by the
//! workers; [`crate::dataplane::encrypted::engine::Engine::counters`] reads
//! them into plain data.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Why a packet was dropped. Each reason has a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dropped {
    /// Received: the tag did not verify (tampered, or not this key).
    BadTag,
    /// Received: sequence number already seen or behind the window.
    Replay,
    /// Received: sequence number names a key generation not in use.
    Generation,
    /// Received: no receive key has this SPI.
    UnknownSpi,
    /// Received: the VNI is not a local encrypted network.
    UnknownVni,
    /// Received: the sending host is not a peer of that network.
    NotMember,
    /// Received: the inner frame's source MAC is not an endpoint of the
    /// sending host (a member speaking for another host's container).
    SpoofedSource,
    /// Sent: no send key for the peer (no `install_keys`/`use_epoch`).
    NoKey,
    /// Sent: the peer's data-path address is unknown (`set_peer`).
    NoPeerAddr,
    /// Sent: unknown unicast destination MAC.
    NoRoute,
    /// Sent: ARP request for an address not in the table.
    ArpUnknown,
    /// Sent: gratuitous ARP or a broadcast ARP reply.
    Gratuitous,
    /// Too short, bad headers (either direction).
    Malformed,
    /// Sent: frame larger than the engine's buffers.
    TooBig,
    /// The socket or TAP refused the packet (buffers full, device gone).
    Io,
}

impl Dropped {
    pub const ALL: [Dropped; 15] = [
        Dropped::BadTag,
        Dropped::Replay,
        Dropped::Generation,
        Dropped::UnknownSpi,
        Dropped::UnknownVni,
        Dropped::NotMember,
        Dropped::SpoofedSource,
        Dropped::NoKey,
        Dropped::NoPeerAddr,
        Dropped::NoRoute,
        Dropped::ArpUnknown,
        Dropped::Gratuitous,
        Dropped::Malformed,
        Dropped::TooBig,
        Dropped::Io,
    ];

    /// Stable name for metrics and `ovlctl`.
    pub fn name(self) -> &'static str {
        match self {
            Dropped::BadTag => "bad_tag",
            Dropped::Replay => "replay",
            Dropped::Generation => "generation",
            Dropped::UnknownSpi => "unknown_spi",
            Dropped::UnknownVni => "unknown_vni",
            Dropped::NotMember => "not_member",
            Dropped::SpoofedSource => "spoofed_source",
            Dropped::NoKey => "no_key",
            Dropped::NoPeerAddr => "no_peer_addr",
            Dropped::NoRoute => "no_route",
            Dropped::ArpUnknown => "arp_unknown",
            Dropped::Gratuitous => "gratuitous_arp",
            Dropped::Malformed => "malformed",
            Dropped::TooBig => "too_big",
            Dropped::Io => "io",
        }
    }

    /// Whether a remote party causes it (a received datagram).
    pub fn is_remote(self) -> bool {
        matches!(
            self,
            Dropped::BadTag
                | Dropped::Replay
                | Dropped::Generation
                | Dropped::UnknownSpi
                | Dropped::UnknownVni
                | Dropped::NotMember
                | Dropped::SpoofedSource
        )
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Live counters of one scope (engine, network or peer).
#[derive(Debug, Default)]
pub struct Counters {
    packets_in: AtomicU64,
    bytes_in: AtomicU64,
    packets_out: AtomicU64,
    bytes_out: AtomicU64,
    drops: [AtomicU64; Dropped::ALL.len()],
}

impl Counters {
    pub fn add_in(&self, bytes: usize) {
        self.packets_in.fetch_add(1, Ordering::Relaxed);
        self.bytes_in.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn add_out(&self, bytes: usize) {
        self.packets_out.fetch_add(1, Ordering::Relaxed);
        self.bytes_out.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub fn add_drop(&self, why: Dropped) {
        self.drops[why.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Traffic {
        Traffic {
            packets_in: self.packets_in.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            packets_out: self.packets_out.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            drops: Dropped::ALL
                .iter()
                .map(|d| (*d, self.drops[d.index()].load(Ordering::Relaxed)))
                .filter(|(_, n)| *n > 0)
                .collect(),
        }
    }
}

/// A snapshot of one scope's counters. "In" is what arrived from the
/// underlay and was delivered to the TAP; "out" what was sealed and sent.
/// Bytes are frame bytes (inner Ethernet), not datagram bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Traffic {
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    /// Non-zero drop counters only.
    pub drops: Vec<(Dropped, u64)>,
}

impl Traffic {
    pub fn dropped(&self, why: Dropped) -> u64 {
        self.drops
            .iter()
            .find(|(d, _)| *d == why)
            .map_or(0, |(_, n)| *n)
    }
}

/// At most one log line per reason per second (remote parties can trigger
/// drops at line rate).
#[derive(Debug)]
pub struct LogLimit {
    start: Instant,
    last_ms: [AtomicU64; Dropped::ALL.len()],
}

impl Default for LogLimit {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            last_ms: Default::default(),
        }
    }
}

impl LogLimit {
    /// Whether a line about `why` may be logged now.
    pub fn allow(&self, why: Dropped) -> bool {
        let now = self.start.elapsed().as_millis() as u64 + 1000;
        let last = &self.last_ms[why.index()];
        let prev = last.load(Ordering::Relaxed);
        now.saturating_sub(prev) >= 1000
            && last
                .compare_exchange(prev, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_snapshots() {
        let c = Counters::default();
        c.add_in(100);
        c.add_out(60);
        c.add_out(40);
        c.add_drop(Dropped::Replay);
        c.add_drop(Dropped::Replay);
        let s = c.snapshot();
        assert_eq!((s.packets_in, s.bytes_in), (1, 100));
        assert_eq!((s.packets_out, s.bytes_out), (2, 100));
        assert_eq!(s.dropped(Dropped::Replay), 2);
        assert_eq!(s.dropped(Dropped::BadTag), 0);
        assert_eq!(s.drops.len(), 1);
        for (i, d) in Dropped::ALL.iter().enumerate() {
            assert_eq!(d.index(), i, "ALL is in declaration order");
        }
    }

    #[test]
    fn log_limit_allows_one_per_second() {
        let l = LogLimit::default();
        assert!(l.allow(Dropped::BadTag));
        assert!(!l.allow(Dropped::BadTag));
        assert!(l.allow(Dropped::Replay));
    }
}
