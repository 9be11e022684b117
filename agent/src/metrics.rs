//! Counters: one per drop reason and per event an operator may need to see.
//! Exposed through `ovlctl cluster status`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use std::sync::Mutex;

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

macro_rules! counters {
    ($($variant:ident => $name:literal),* $(,)?) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Counter { $($variant),* }

        impl Counter {
            pub const ALL: &'static [Counter] = &[$(Counter::$variant),*];
            pub fn name(self) -> &'static str {
                match self { $(Counter::$variant => $name),* }
            }
        }
    };
}

counters! {
    GossipRx => "gossip_rx",
    StoreLogTorn => "store_log_torn",
    StoreWriteFailed => "store_write_failed",
    StoreTombstonesForced => "store_tombstones_forced",
    ReconcileNetworkFailed => "reconcile_network_failed",
    GossipTx => "gossip_tx",
    GossipDropShort => "gossip_drop_short",
    GossipDropBadMagic => "gossip_drop_bad_magic",
    GossipDropStale => "gossip_drop_stale",
    GossipDropBadTag => "gossip_drop_bad_tag",
    GossipDropNewerKey => "gossip_drop_newer_key",
    GossipDropUnknownKey => "gossip_drop_unknown_key",
    GossipDropReplay => "gossip_drop_replay",
    // A sealed, signed Syn/SynAck arriving from an address that is not its
    // sender's gossip address: replying would reflect at a stranger.
    GossipDropUnboundSource => "gossip_drop_unbound_source",
    ClusterKeyInstalled => "cluster_key_installed",
    ClusterKeyFetched => "cluster_key_fetched",
    ClusterKeyRefused => "cluster_key_refused",
    ClusterKeyServed => "cluster_key_served",
    PeerConnLimited => "peer_conn_limited",
    // A TLS'd peer connection closed for carrying no call (see
    // peer::listener::IDLE_NEVER_CALLED).
    PeerIdleClosed => "peer_idle_closed",
    GossipDropUndecodable => "gossip_drop_undecodable",
    GossipDropOversize => "gossip_drop_oversize",
    GossipDropBadSender => "gossip_drop_bad_sender",
    GossipDropUnsafe => "gossip_drop_unsafe",
    GossipForged => "gossip_forged",
    GossipDropRemoved => "gossip_drop_removed",
    GossipDropStaleKeyStranger => "gossip_drop_stale_key_stranger",
    GossipUnvouchedLeftOut => "gossip_unvouched_record_left_out",
    ClusterKeyMemberAdmitted => "cluster_key_member_admitted",
    ClusterKeyServeRefused => "cluster_key_serve_refused",
    GossipDigestDropped => "gossip_digest_entry_dropped",
    HelloServed => "peer_hello_served",
    // A call refused by this server: caller not an admitted member, or
    // claiming another node id than its certificate's.
    PeerRefused => "peer_call_refused",
    PeerGateNotMember => "peer_gate_not_member",
    PeerRequestTooLarge => "peer_request_too_large",
    NotifyHintAhead => "notify_hint_ahead",
    // A peer gossiped a table version its own Pull reply did not reach.
    GossipVersionAhead => "gossip_version_ahead",
    // A Pull reply past the client's decoding limit (a member publishing
    // more than any may), refused.
    PullTooLarge => "pull_reply_too_large",
    // A callee whose certificate is not the node we called (pin failure).
    PeerReplyRefused => "peer_reply_refused",
    // A peer TLS connection refused at handshake: no or bad certificate,
    // not TLS 1.3 (e.g. the old plaintext gRPC), a replayed byte stream.
    PeerTlsRefused => "peer_tls_refused",
    PullServed => "peer_pull_served",
    RecordsInvalid => "records_invalid",
    RecordsRefused => "records_refused",
    // Pulled records refused by the per-member bounds (store::bounds):
    // too long, too many aliases or labels, or past a member's caps.
    RecordsOverBounds => "records_over_bounds",
    NetworkBackdated => "network_backdated",
    // An IPAM ring entry whose writer had no authority over its addresses
    // (or whose signature is bad), refused by the merge.
    IpamForged => "ipam_forged",
    ReconcileErrors => "reconcile_errors",
    AttachWaitTimeouts => "attach_wait_timeouts",
    DataplaneMiss => "dataplane_miss",
    DataplaneMissUnknown => "dataplane_miss_unknown",
    // A peer's published key-exchange key no pair key can come from.
    ExchangeKeyRefused => "exchange_key_refused",
    // A network with a local endpoint whose mode this host runs no VTEP
    // for (an encrypted network without the userspace data plane): left
    // unprogrammed, once per reconcile pass.
    DataplaneNoVtep => "dataplane_no_vtep",
    // Sealed gossip bytes sent, and received on the gossip socket
    // (dropped datagrams included: that is what arrived).
    GossipTxBytes => "gossip_tx_bytes",
    GossipRxBytes => "gossip_rx_bytes",
    // Peer gRPC calls this agent made, the ones that failed, and the
    // encoded bytes of their requests and of Pull replies (the bulk).
    PeerRpcCalls => "peer_rpc_calls",
    PeerRpcFailed => "peer_rpc_failed",
    PeerRpcRequestBytes => "peer_rpc_request_bytes",
    PeerRpcPullBytes => "peer_rpc_pull_reply_bytes",
    // Embedded DNS (dns/): every query read, and where each one went.
    DnsQueries => "dns_queries",
    DnsAnswers => "dns_answers",
    DnsNxdomain => "dns_nxdomain",
    DnsForwarded => "dns_forwarded",
    // FORMERR/NOTIMP/REFUSED replies, and queries dropped because the
    // in-flight forward or TCP connection cap was reached.
    DnsRefused => "dns_refused",
    DnsOverloaded => "dns_overloaded",
    DnsMalformed => "dns_malformed",
    DnsUpstreamFailures => "dns_upstream_failures",
    // A local API call from a caller that is not root (SO_PEERCRED).
    ApiCallerRefused => "api_caller_refused",
    // An attach whose --netns/--pid is not a container's network
    // namespace (missing, unreadable, a FIFO or file, the agent's own).
    NetnsRefused => "netns_refused",
    // A Docker plugin request refused (bad JSON, unknown network or
    // address, an option ovl does not take); Docker shows the reason.
    DockerRefused => "docker_refused",
}

pub struct Counters {
    values: [AtomicU64; Counter::ALL.len()],
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            values: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Counters {
    pub fn inc(&self, c: Counter) {
        self.values[c as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` (byte counts).
    pub fn add(&self, c: Counter, n: u64) {
        self.values[c as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self, c: Counter) -> u64 {
        self.values[c as usize].load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        Counter::ALL
            .iter()
            .map(|c| (c.name(), self.get(*c)))
            .collect()
    }
}

/// Lets a log line that a remote peer can trigger through at most once per
/// period, reporting how many were suppressed in between.
pub struct RateLimit {
    period: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimit {
    pub const fn new(period: Duration) -> Self {
        Self {
            period,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(suppressed)` when the caller may log now.
    pub fn check(&self, now: Instant) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match st.0 {
            Some(last) if now.duration_since(last) < self.period => {
                st.1 += 1;
                None
            }
            _ => {
                let suppressed = st.1;
                *st = (Some(now), 0);
                Some(suppressed)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_and_counted() {
        let c = Counters::default();
        c.inc(Counter::GossipDropBadTag);
        c.inc(Counter::GossipDropBadTag);
        let snap = c.snapshot();
        assert!(snap.contains(&("gossip_drop_bad_tag", 2)));
        assert!(snap.contains(&("gossip_rx", 0)));
    }

    #[test]
    fn rate_limit_suppresses_within_period() {
        let rl = RateLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(rl.check(t0), Some(0));
        assert_eq!(rl.check(t0 + Duration::from_secs(1)), None);
        assert_eq!(rl.check(t0 + Duration::from_secs(2)), None);
        assert_eq!(rl.check(t0 + Duration::from_secs(11)), Some(2));
    }
}

/// Timing histograms, observed where the timed work happens.
#[derive(Debug, Clone)]
pub struct Timings {
    /// One reconcile pass that programmed the kernel (not the cheap
    /// "nothing changed" acks).
    pub reconcile_pass: Histogram,
    /// From an attach's store write to every live host of the network
    /// confirming it programmed the endpoint (or `--attach-wait` ending).
    pub attach_programmed: Histogram,
}

impl Default for Timings {
    fn default() -> Self {
        // 1 ms .. ~16 s: a pass is milliseconds, a slow netlink dump or an
        // attach waiting out its bound is seconds.
        Self {
            reconcile_pass: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            attach_programmed: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
        }
    }
}

impl Timings {
    pub fn reconcile_pass(&self, d: Duration) {
        self.reconcile_pass.observe(d.as_secs_f64());
    }

    pub fn attach_programmed(&self, d: Duration) {
        self.attach_programmed.observe(d.as_secs_f64());
    }
}
