//! The I/O of one network's resolver: UDP and TCP on `<gateway>:53`, the
//! sockets opened on a thread that entered the network's namespace (so
//! they live there) and then served from tokio; forwarding to upstream
//! runs from the agent's own namespace (the host's), where the upstream
//! resolvers are reachable. Memory is bounded: at most `max_inflight`
//! forwards and `max_tcp` TCP connections at once; over the cap a query is
//! answered SERVFAIL (UDP) or the connection closed, and counted.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinHandle;
use tracing::warn;

use super::resolve::{self, Outcome, ReplyKind, Rotor};
use super::table::NameTable;
use crate::metrics::{Counter, Counters, RateLimit};

/// Largest UDP reply without EDNS (RFC 1035 §4.2.1); longer answers are
/// truncated so the client retries over TCP.
const UDP_LIMIT: usize = 512;
/// Largest message read (EDNS clients send at most this in practice).
const MAX_MSG: usize = 4096;
/// A TCP client silent this long is dropped.
const TCP_IDLE: Duration = Duration::from_secs(10);
static UPSTREAM_LOG: RateLimit = RateLimit::new(Duration::from_secs(30));
static OVERLOAD_LOG: RateLimit = RateLimit::new(Duration::from_secs(30));

#[derive(Debug, Clone)]
pub struct Config {
    /// Tried in order, each with `timeout`.
    pub upstreams: Vec<SocketAddr>,
    pub timeout: Duration,
    pub max_inflight: usize,
    pub max_tcp: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            upstreams: Vec::new(),
            timeout: Duration::from_secs(2),
            max_inflight: 256,
            max_tcp: 64,
        }
    }
}

/// What every network's server shares on a host.
pub struct Shared {
    pub config: Config,
    pub counters: Arc<Counters>,
    inflight: Arc<Semaphore>,
    tcp_conns: Arc<Semaphore>,
}

impl Shared {
    pub fn new(config: Config, counters: Arc<Counters>) -> Arc<Self> {
        Arc::new(Shared {
            inflight: Arc::new(Semaphore::new(config.max_inflight)),
            tcp_conns: Arc::new(Semaphore::new(config.max_tcp)),
            config,
            counters,
        })
    }
}

/// Bound sockets, not yet served (std sockets: created in any namespace,
/// registered with tokio later, from the runtime).
pub struct Sockets {
    udp: std::net::UdpSocket,
    tcp: std::net::TcpListener,
}

/// Binds UDP and TCP on `addr` in the calling thread's namespace. With
/// `IP_FREEBIND`: the gateway address may be added to the bridge after the
/// server starts (or re-added by a repair pass) and the sockets then
/// receive without a rebind.
pub fn bind(addr: SocketAddr) -> io::Result<Sockets> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = Domain::for_address(addr);
    let udp = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    let _ = udp.set_freebind_v4(true);
    udp.bind(&addr.into())?;
    udp.set_nonblocking(true)?;
    let udp: std::net::UdpSocket = udp.into();
    let tcp = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    let _ = tcp.set_freebind_v4(true);
    tcp.set_reuse_address(true)?;
    tcp.bind(&udp.local_addr()?.into())?;
    tcp.listen(128)?;
    tcp.set_nonblocking(true)?;
    Ok(Sockets {
        udp,
        tcp: tcp.into(),
    })
}

/// Binds on `addr` inside the namespace at `netns` (`None`: the agent's
/// own), from a short-lived thread that enters it; no runtime thread ever
/// changes namespace.
pub async fn bind_in(netns: Option<PathBuf>, addr: SocketAddr) -> io::Result<Sockets> {
    let Some(path) = netns else {
        return bind(addr);
    };
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("ovl-dns-bind".into())
        .spawn(move || {
            let r = enter(&path).and_then(|()| bind(addr));
            let _ = tx.send(r);
        })?;
    rx.await
        .map_err(|_| io::Error::other("dns bind thread died"))?
}

fn enter(path: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let ns = std::fs::File::open(path)?;
    // SAFETY: `ns` is an open namespace file for the duration of the call;
    // setns only moves the calling thread, a dedicated one that exits
    // right after binding.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The names and rotation state one network's sockets answer from.
struct Names {
    table: Arc<NameTable>,
    rotor: Rotor,
}

/// A running resolver; its tasks stop when it is dropped.
pub struct Server {
    pub addr: SocketAddr,
    names: Arc<Mutex<Names>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Server {
    /// Serves `sockets` from the current runtime.
    pub fn spawn(sockets: Sockets, table: NameTable, shared: Arc<Shared>) -> io::Result<Server> {
        let udp = Arc::new(UdpSocket::from_std(sockets.udp)?);
        let tcp = TcpListener::from_std(sockets.tcp)?;
        let addr = udp.local_addr()?;
        let names = Arc::new(Mutex::new(Names {
            table: Arc::new(table),
            rotor: Rotor::default(),
        }));
        let tasks = vec![
            tokio::spawn(serve_udp(udp, names.clone(), shared.clone())),
            tokio::spawn(serve_tcp(tcp, names.clone(), shared)),
        ];
        Ok(Server { addr, names, tasks })
    }

    /// Swaps the names (live: the next query sees them). Returns whether
    /// they changed.
    pub fn update(&self, table: NameTable) -> bool {
        let mut n = self.names.lock().unwrap_or_else(|e| e.into_inner());
        if *n.table == table {
            return false;
        }
        n.rotor.retain(&table);
        n.table = Arc::new(table);
        true
    }
}

/// What the core said, counted.
fn decide(names: &Mutex<Names>, shared: &Shared, query: &[u8]) -> Outcome {
    shared.counters.inc(Counter::DnsQueries);
    let out = {
        let mut n = names.lock().unwrap_or_else(|e| e.into_inner());
        let table = n.table.clone();
        resolve::resolve(&table, &mut n.rotor, query)
    };
    let c = match &out {
        Outcome::Reply {
            kind: ReplyKind::Answer,
            ..
        } => Counter::DnsAnswers,
        Outcome::Reply {
            kind: ReplyKind::NxDomain,
            ..
        } => Counter::DnsNxdomain,
        Outcome::Reply {
            kind: ReplyKind::Refused,
            ..
        } => Counter::DnsRefused,
        Outcome::Reply {
            kind: ReplyKind::Malformed,
            ..
        }
        | Outcome::Malformed => Counter::DnsMalformed,
        Outcome::Forward => Counter::DnsForwarded,
    };
    shared.counters.inc(c);
    out
}

async fn serve_udp(sock: Arc<UdpSocket>, names: Arc<Mutex<Names>>, shared: Arc<Shared>) {
    let mut buf = vec![0u8; MAX_MSG];
    loop {
        let (len, from) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            // ICMP errors from earlier replies surface here: keep serving.
            Err(_) => continue,
        };
        let query = &buf[..len];
        match decide(&names, &shared, query) {
            Outcome::Reply { bytes, .. } => {
                let _ = sock.send_to(&udp_sized(bytes), from).await;
            }
            Outcome::Malformed => {}
            Outcome::Forward => {
                let Some(permit) = forward_permit(&shared) else {
                    if let Some(b) = resolve::servfail(query) {
                        let _ = sock.send_to(&b, from).await;
                    }
                    continue;
                };
                let (sock, shared, query) = (sock.clone(), shared.clone(), query.to_vec());
                tokio::spawn(async move {
                    let reply = forward(&shared, &query, false).await;
                    drop(permit);
                    if let Some(b) = reply.or_else(|| resolve::servfail(&query)) {
                        let _ = sock.send_to(&udp_sized(b), from).await;
                    }
                });
            }
        }
    }
}

/// A reply that fits a plain UDP datagram: a longer one is cut to its
/// header and question with TC set, so the client retries over TCP.
fn udp_sized(bytes: Vec<u8>) -> Vec<u8> {
    if bytes.len() <= UDP_LIMIT {
        return bytes;
    }
    hickory_proto::op::Message::from_vec(&bytes)
        .ok()
        .and_then(|m| m.truncate().to_vec().ok())
        .unwrap_or_default()
}

fn forward_permit(shared: &Shared) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let p = shared.inflight.clone().try_acquire_owned().ok();
    if p.is_none() {
        shared.counters.inc(Counter::DnsOverloaded);
        if let Some(suppressed) = OVERLOAD_LOG.check(Instant::now()) {
            warn!(
                cap = shared.config.max_inflight,
                suppressed, "dns: too many forwards in flight; answering SERVFAIL"
            );
        }
    }
    p
}

async fn serve_tcp(listener: TcpListener, names: Arc<Mutex<Names>>, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let Ok(permit) = shared.tcp_conns.clone().try_acquire_owned() else {
            shared.counters.inc(Counter::DnsOverloaded);
            if let Some(suppressed) = OVERLOAD_LOG.check(Instant::now()) {
                warn!(
                    cap = shared.config.max_tcp,
                    suppressed, "dns: too many TCP connections; closing"
                );
            }
            continue;
        };
        let (names, shared) = (names.clone(), shared.clone());
        tokio::spawn(async move {
            let _ = tcp_conn(stream, &names, &shared).await;
            drop(permit);
        });
    }
}

/// One TCP client: length-prefixed messages (RFC 1035 §4.2.2) until it
/// closes or idles out.
async fn tcp_conn(mut s: TcpStream, names: &Mutex<Names>, shared: &Shared) -> io::Result<()> {
    loop {
        let Ok(len) = tokio::time::timeout(TCP_IDLE, s.read_u16()).await else {
            return Ok(());
        };
        let len = usize::from(len?);
        if len > MAX_MSG {
            shared.counters.inc(Counter::DnsMalformed);
            return Ok(());
        }
        let mut query = vec![0u8; len];
        tokio::time::timeout(TCP_IDLE, s.read_exact(&mut query))
            .await
            .map_err(|_| io::ErrorKind::TimedOut)??;
        let reply = match decide(names, shared, &query) {
            Outcome::Reply { bytes, .. } => Some(bytes),
            Outcome::Malformed => return Ok(()),
            Outcome::Forward => match forward_permit(shared) {
                Some(_permit) => forward(shared, &query, true).await,
                None => None,
            }
            .or_else(|| resolve::servfail(&query)),
        };
        let Some(reply) = reply else { return Ok(()) };
        let Ok(n) = u16::try_from(reply.len()) else {
            return Ok(());
        };
        s.write_u16(n).await?;
        s.write_all(&reply).await?;
    }
}

/// The first upstream reply to `query` (same ID), trying each upstream in
/// turn within the timeout; `None` (counted, logged) when all fail.
async fn forward(shared: &Shared, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
    let id = query.get(..2)?;
    for up in &shared.config.upstreams {
        let once = async {
            if tcp {
                ask_tcp(*up, query).await
            } else {
                ask_udp(*up, query).await
            }
        };
        match tokio::time::timeout(shared.config.timeout, once).await {
            Ok(Ok(r)) if r.get(..2) == Some(id) => return Some(r),
            _ => continue,
        }
    }
    shared.counters.inc(Counter::DnsUpstreamFailures);
    if let Some(suppressed) = UPSTREAM_LOG.check(Instant::now()) {
        warn!(upstreams = ?shared.config.upstreams, suppressed, "dns: no upstream answered; SERVFAIL");
    }
    None
}

async fn ask_udp(up: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let local: SocketAddr = if up.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .map_err(io::Error::other)?;
    let s = UdpSocket::bind(local).await?;
    // Connected: replies from anyone but the upstream are discarded by the
    // kernel.
    s.connect(up).await?;
    s.send(query).await?;
    let mut buf = vec![0u8; MAX_MSG];
    let n = s.recv(&mut buf).await?;
    buf.truncate(n);
    Ok(buf)
}

async fn ask_tcp(up: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(up).await?;
    let n = u16::try_from(query.len()).map_err(io::Error::other)?;
    s.write_u16(n).await?;
    s.write_all(query).await?;
    let len = usize::from(s.read_u16().await?);
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

#[cfg(test)]
mod tests;
