//! The peer listener: TLS 1.3 on 7946/tcp in front of the gRPC service
//! (served by `peer_api`).
//!
//! Accepted TCP connections are handshaken off the accept loop (bounded in
//! number and time); each finished handshake reaches tonic as a [`TlsConn`]
//! whose connect info ([`PeerConn`]) carries the caller's address and the
//! node id derived from its certificate key. Handlers read it from the
//! request extensions: the caller's identity comes from TLS, never from
//! what the request says. `Hello` is open to any certificate holder (a
//! joiner is not a member yet; its token proof is the HMAC exchange);
//! every other call needs an admitted member.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tracing::{debug, warn};

use super::tls::node_id_of_cert;
use crate::ids::NodeId;
use crate::metrics::{Counter, Counters, RateLimit};

/// A handshake not finished by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes in flight at once; more connections are closed at once.
const MAX_HANDSHAKES: usize = 128;
/// Open peer connections at once, handshaking or established. A member
/// keeps one channel per peer, so this leaves room for a 1000-node cluster
/// while bounding what strangers can hold open.
pub const MAX_CONNECTIONS: usize = 1024;
/// Open peer connections from one source address (a member needs one; a
/// restart briefly two).
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 8;

/// A connection that carried no call at all for this long is closed: a
/// member's channel is opened for a call and carries it at once, so only
/// a holder of some certificate that sits idle gets here (issue 8).
pub const IDLE_NEVER_CALLED: Duration = Duration::from_secs(10);
/// A connection with no call in flight for this long is closed (a
/// member's channel reconnects on its next call).
pub const IDLE_AFTER_CALLS: Duration = Duration::from_secs(600);

/// The start of a plaintext HTTP/2 connection (RFC 9113 §3.4).
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

static TLS_REFUSE_LOG: RateLimit = RateLimit::new(Duration::from_secs(10));

/// Who is on the other end of a peer connection.
#[derive(Debug, Clone)]
pub struct PeerConn {
    pub remote: SocketAddr,
    /// Derived from the certificate's Ed25519 key, which the handshake
    /// proved the caller holds.
    pub node: NodeId,
    /// Calls on this connection, for the idle timeout (the gate marks them).
    pub calls: Arc<CallActivity>,
}

/// Calls in flight on one connection and when the last one ended.
/// Sans-IO: the caller passes the time.
#[derive(Debug)]
pub struct CallActivity {
    state: Mutex<Activity>,
}

#[derive(Debug, Clone, Copy)]
struct Activity {
    in_flight: usize,
    /// Connection start, then the end of the last call.
    since: Instant,
    called: bool,
}

/// Marks one call in flight until dropped.
pub struct CallMark(Arc<CallActivity>);

impl Drop for CallMark {
    fn drop(&mut self) {
        let mut a = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        a.in_flight = a.in_flight.saturating_sub(1);
        a.since = Instant::now();
    }
}

impl CallActivity {
    pub fn new(now: Instant) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(Activity {
                in_flight: 0,
                since: now,
                called: false,
            }),
        })
    }

    /// A call starts; it ends when the mark is dropped.
    pub fn begin(self: &Arc<Self>) -> CallMark {
        let mut a = self.state.lock().unwrap_or_else(|e| e.into_inner());
        a.in_flight += 1;
        a.called = true;
        CallMark(self.clone())
    }

    /// `None` when the connection is idle past its timeout at `now`,
    /// otherwise the next time to look again.
    pub fn alive_until(&self, now: Instant) -> Option<Instant> {
        let a = *self.state.lock().unwrap_or_else(|e| e.into_inner());
        if a.in_flight > 0 {
            return Some(now + IDLE_NEVER_CALLED);
        }
        let idle = if a.called {
            IDLE_AFTER_CALLS
        } else {
            IDLE_NEVER_CALLED
        };
        let deadline = a.since + idle;
        (deadline > now).then_some(deadline)
    }
}

/// Why a connection was refused before its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnRefusal {
    Total,
    PerSource,
}

/// Counts open connections, in total and per source address; a slot is
/// held from accept until the connection is dropped.
#[derive(Debug)]
pub struct ConnLimits {
    total: usize,
    per_source: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl ConnLimits {
    pub fn new(total: usize, per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            total,
            per_source,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for a connection from `ip`, or why there is none.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnSlot, ConnRefusal> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = open.values().sum();
        if total >= self.total {
            return Err(ConnRefusal::Total);
        }
        let n = open.entry(ip).or_default();
        if *n >= self.per_source {
            return Err(ConnRefusal::PerSource);
        }
        *n += 1;
        Ok(ConnSlot {
            limits: self.clone(),
            ip,
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .sum()
    }
}

/// One admitted connection; dropping it frees the slot.
#[derive(Debug)]
pub struct ConnSlot {
    limits: Arc<ConnLimits>,
    ip: IpAddr,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// A TLS connection as tonic serves it.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerConn,
    _slot: ConnSlot,
    idle: Pin<Box<tokio::time::Sleep>>,
    counters: Arc<Counters>,
}

static IDLE_LOG: RateLimit = RateLimit::new(Duration::from_secs(10));

impl TlsConn {
    /// Fails the connection once it has been idle past its timeout; hyper
    /// then closes it, and its connection slot is freed.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        while self.idle.as_mut().poll(cx).is_ready() {
            match self.info.calls.alive_until(Instant::now()) {
                Some(next) => self.idle.as_mut().reset(next.into()),
                None => {
                    self.counters.inc(Counter::PeerIdleClosed);
                    if let Some(suppressed) = IDLE_LOG.check(Instant::now()) {
                        debug!(peer = %self.info.remote, node = %self.info.node, suppressed,
                               "idle peer connection closed");
                    }
                    return Poll::Ready(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "peer connection idle",
                    ));
                }
            }
        }
        Poll::Pending
    }
}

impl Connected for TlsConn {
    type ConnectInfo = PeerConn;

    fn connect_info(&self) -> PeerConn {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Poll::Ready(e) = self.poll_idle(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

fn tls_refused(counters: &Counters, remote: SocketAddr, node: Option<NodeId>, reason: &str) {
    counters.inc(Counter::PeerTlsRefused);
    if let Some(suppressed) = TLS_REFUSE_LOG.check(Instant::now()) {
        match node {
            Some(node) => {
                warn!(peer = %remote, node = %node, reason, suppressed, "peer TLS connection refused")
            }
            None => warn!(peer = %remote, reason, suppressed, "peer TLS connection refused"),
        }
    }
}

async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    remote: SocketAddr,
    counters: &Arc<Counters>,
    slot: ConnSlot,
) -> Option<TlsConn> {
    let _ = tcp.set_nodelay(true);
    // An agent from before TLS opens with the plaintext HTTP/2 preface;
    // say so instead of rustls's "corrupt message".
    let mut first = [0u8; HTTP2_PREFACE.len()];
    if let Ok(Ok(n)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await
        && n > 0
        && HTTP2_PREFACE.starts_with(&first[..n])
    {
        tls_refused(
            counters,
            remote,
            None,
            "plaintext HTTP/2, not TLS: an ovl agent from before the TLS peer channel?",
        );
        return None;
    }
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tls_refused(counters, remote, None, &e.to_string());
            return None;
        }
        Err(_) => {
            tls_refused(counters, remote, None, "handshake timed out");
            return None;
        }
    };
    let (_, conn) = tls.get_ref();
    // The verifier required an Ed25519 certificate; derive its node id.
    let node = match conn.peer_certificates().and_then(|c| c.first()) {
        Some(cert) => match node_id_of_cert(cert) {
            Ok(n) => n,
            Err(e) => {
                tls_refused(counters, remote, None, &e.to_string());
                return None;
            }
        },
        None => {
            tls_refused(counters, remote, None, "no client certificate");
            return None;
        }
    };
    debug!(peer = %remote, node = %node, "peer TLS connection");
    let now = Instant::now();
    Some(TlsConn {
        inner: tls,
        info: PeerConn {
            remote,
            node,
            calls: CallActivity::new(now),
        },
        _slot: slot,
        idle: Box::pin(tokio::time::sleep_until((now + IDLE_NEVER_CALLED).into())),
        counters: counters.clone(),
    })
}

/// The stream of authenticated TLS connections for
/// `serve_with_incoming_shutdown`. It ends when tonic drops it.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    counters: Arc<Counters>,
) -> ReceiverStream<io::Result<TlsConn>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    let limits = ConnLimits::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_SOURCE);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: back off.
                        warn!(error = %e, "peer accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let conn_slot = match limits.admit(remote.ip()) {
                Ok(s) => s,
                Err(why) => {
                    counters.inc(Counter::PeerConnLimited);
                    let reason = match why {
                        ConnRefusal::Total => "too many peer connections open",
                        ConnRefusal::PerSource => "too many peer connections from this address",
                    };
                    if let Some(suppressed) = TLS_REFUSE_LOG.check(Instant::now()) {
                        warn!(peer = %remote, reason, open = limits.open(), suppressed, "peer connection refused");
                    }
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tls_refused(&counters, remote, None, "too many handshakes in flight");
                continue;
            };
            let (acceptor, counters, tx) = (acceptor.clone(), counters.clone(), tx.clone());
            tokio::spawn(async move {
                let conn = handshake(acceptor, tcp, remote, &counters, conn_slot).await;
                drop(slot);
                if let Some(conn) = conn {
                    let _ = tx.send(Ok(conn)).await;
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_count_per_source_and_in_total_and_free_on_drop() {
        let l = ConnLimits::new(3, 2);
        let (a, b): (IpAddr, IpAddr) =
            ("198.18.0.1".parse().unwrap(), "198.18.0.2".parse().unwrap());
        let a1 = l.admit(a).unwrap();
        let _a2 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).err(), Some(ConnRefusal::PerSource));
        let _b1 = l.admit(b).unwrap();
        assert_eq!(l.admit(b).err(), Some(ConnRefusal::Total));
        drop(a1);
        assert_eq!(l.open(), 2);
        assert!(l.admit(b).is_ok(), "a freed slot is reusable");
    }

    #[test]
    fn a_connection_without_calls_times_out_and_one_with_a_call_in_flight_never() {
        let t0 = Instant::now();
        let a = CallActivity::new(t0);
        assert_eq!(a.alive_until(t0), Some(t0 + IDLE_NEVER_CALLED));
        assert_eq!(a.alive_until(t0 + IDLE_NEVER_CALLED), None, "never called");
        let mark = a.begin();
        assert!(
            a.alive_until(t0 + IDLE_AFTER_CALLS * 2).is_some(),
            "in flight"
        );
        drop(mark);
        let ended = a.state.lock().unwrap().since;
        assert_eq!(a.alive_until(ended), Some(ended + IDLE_AFTER_CALLS));
        assert_eq!(a.alive_until(ended + IDLE_AFTER_CALLS), None);
    }
}
