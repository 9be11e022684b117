//! The encrypted VTEP engine: its public API (the contract's `Engine`), the
//! key and table state, and the snapshot the workers read.
//!
//! Control calls (synchronous, cheap) change a master state under a mutex
//! and publish an immutable [`Snapshot`] (`Arc` swapped under a `RwLock`);
//! workers pick up the new snapshot at their next wake-up (each is woken
//! through its eventfd). A snapshot swap is how `use_epoch` switches a
//! peer's sender atomically: a packet is sealed with the old epoch's or the
//! new epoch's sender, never a mix.
//!
//! Keys: a [`Sender`] exists once per (peer, epoch) and is shared by the
//! workers behind a mutex, never duplicated (two senders on one key would
//! reuse nonces). Re-installing the *same* keys (same fingerprints) for a
//! (peer, epoch) keeps the live sender and receiver, so a caller that
//! re-derives keys on every reconcile cannot reset a sequence counter;
//! installing *different* keys for the same (peer, epoch) (a restarted
//! peer's new key) replaces both directions. Receivers are found by SPI;
//! SPIs are 32-bit HKDF outputs and can collide between (peer, epoch)
//! receivers, so an SPI maps to a list and each candidate is tried (the tag
//! decides).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::JoinHandle;

use tracing::{debug, info, warn};

use super::codec::{Receiver, Sender};
use super::counters::{Counters, Dropped, LogLimit, Traffic};
use super::forward::{Forwarding, Table};
use super::{tap, udp, worker};
use crate::ids::{NodeId, Vni};
use crate::keys::pair::PairKeys;

/// Default `--encrypted-port` (DESIGN.md "Components and ports").
pub const ENCRYPTED_PORT: u16 = 4500;
/// Socket buffers: a few batches of full-size datagrams per worker.
const SOCKET_BUFFER: libc::c_int = 4 << 20;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Data-path address : `--encrypted-port`.
    pub bind: SocketAddr,
    /// Worker threads (and TAP queues per network); at least 1.
    pub workers: usize,
    /// Network namespace to bind the socket in (`/run/netns/NAME`,
    /// `/proc/PID/ns/net`); `None`: the caller's.
    pub netns: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("binding the encrypted data-path socket to {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("socket option on the encrypted data-path socket: {0}")]
    SocketOption(io::Error),
    #[error("TAP device {name}: {source}")]
    Tap { name: String, source: io::Error },
    #[error("entering network namespace {path}: {source}")]
    Netns { path: PathBuf, source: io::Error },
    #[error("starting an engine thread: {0}")]
    Thread(io::Error),
}

/// One network as the workers see it.
pub(crate) struct NetState {
    pub vni: u32,
    pub table: Table,
    /// One TAP queue per worker.
    pub queues: Arc<Vec<OwnedFd>>,
    pub counters: Arc<Counters>,
}

/// One peer host as the workers see it.
pub(crate) struct PeerState {
    pub node: NodeId,
    pub addr: Option<SocketAddr>,
    /// The sender of the epoch in use.
    pub sender: Option<Arc<Mutex<Sender>>>,
    pub counters: Arc<Counters>,
}

/// A receive key, found by its SPI.
pub(crate) struct RecvEntry {
    pub node: NodeId,
    pub rx: Arc<Mutex<Receiver>>,
}

/// What the workers read: immutable, replaced as a whole.
#[derive(Default)]
pub(crate) struct Snapshot {
    pub networks: HashMap<u32, NetState>,
    pub peers: HashMap<NodeId, PeerState>,
    pub spis: HashMap<u32, Vec<RecvEntry>>,
}

struct EpochKeys {
    sender: Arc<Mutex<Sender>>,
    receiver: Arc<Mutex<Receiver>>,
    recv_spi: u32,
    send_fingerprint: u32,
    recv_fingerprint: u32,
}

#[derive(Default)]
struct PeerMaster {
    addr: Option<SocketAddr>,
    epochs: BTreeMap<u64, EpochKeys>,
    in_use: Option<u64>,
    counters: Arc<Counters>,
}

struct NetMaster {
    name: String,
    forwarding: Forwarding,
    queues: Arc<Vec<OwnedFd>>,
    counters: Arc<Counters>,
}

#[derive(Default)]
struct Master {
    networks: BTreeMap<u32, NetMaster>,
    peers: BTreeMap<NodeId, PeerMaster>,
}

/// State shared between the engine's handle and its workers.
pub(crate) struct Shared {
    /// One socket per worker, all bound to the same address (SO_REUSEPORT).
    pub sockets: Vec<UdpSocket>,
    pub snapshot: RwLock<Arc<Snapshot>>,
    /// Bumped with every new snapshot.
    pub version: AtomicU64,
    pub stop: AtomicBool,
    pub total: Counters,
    pub log: LogLimit,
    /// One eventfd per worker, written to wake it.
    pub wake: Vec<OwnedFd>,
}

impl Shared {
    pub fn current(&self) -> Arc<Snapshot> {
        match self.snapshot.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn wake_all(&self) {
        for fd in &self.wake {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a live array to an eventfd; a
            // full counter (EAGAIN) means the worker is being woken anyway.
            unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        }
    }
}

/// Counters and key state per peer host (`ovlctl peers`, `network inspect`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerCounters {
    pub addr: Option<SocketAddr>,
    pub traffic: Traffic,
    /// The epoch whose keys send.
    pub epoch_in_use: Option<u64>,
    /// Installed epochs, oldest first.
    pub epochs: Vec<EpochInfo>,
}

/// One installed epoch of a pair: public fingerprints, never keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochInfo {
    pub epoch: u64,
    pub send_fingerprint: u32,
    pub recv_fingerprint: u32,
    /// Packets sealed with this epoch's send key (its next sequence number).
    pub sent: u64,
}

/// A snapshot of every counter of the engine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineCounters {
    /// Everything, including drops no network or peer can be named for
    /// (unknown SPI).
    pub total: Traffic,
    pub networks: BTreeMap<Vni, Traffic>,
    pub peers: BTreeMap<NodeId, PeerCounters>,
}

/// The userspace encrypted VTEP. Dropping the last handle stops the
/// workers; TAP devices stay (persistent) for the next engine to adopt.
pub struct Engine {
    shared: Arc<Shared>,
    master: Mutex<Master>,
    workers: usize,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `f` on a short-lived thread inside the namespace at `path` (or
/// here when `None`): sockets and TAP devices belong to the namespace
/// they were created in, whichever thread uses their fds later.
fn in_netns<T: Send>(
    path: Option<&Path>,
    f: impl FnOnce() -> Result<T, EngineError> + Send,
) -> Result<T, EngineError> {
    let Some(path) = path else { return f() };
    let ns = File::open(path).map_err(|source| EngineError::Netns {
        path: path.to_owned(),
        source,
    })?;
    std::thread::scope(|s| {
        let h = std::thread::Builder::new()
            .name("ovl-enc-netns".into())
            .spawn_scoped(s, || {
                // SAFETY: `ns` is an open namespace file alive for the call;
                // setns changes only this thread's namespace, and the
                // thread ends right after `f`.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(EngineError::Netns {
                        path: path.to_owned(),
                        source: io::Error::last_os_error(),
                    });
                }
                f()
            })
            .map_err(EngineError::Thread)?;
        h.join().unwrap_or_else(|_| {
            Err(EngineError::Thread(io::Error::other(
                "namespace thread panicked",
            )))
        })
    })
}

fn set_buffer(sock: &UdpSocket, opt: libc::c_int) -> Result<(), EngineError> {
    let v = SOCKET_BUFFER;
    // SAFETY: setsockopt reads one c_int from a live local.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(EngineError::SocketOption(io::Error::last_os_error()));
    }
    Ok(())
}

fn eventfd() -> Result<OwnedFd, EngineError> {
    // SAFETY: plain eventfd(2); the fd is owned right below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(EngineError::Thread(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by eventfd and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Engine {
    pub fn start(cfg: EngineConfig) -> Result<Arc<Engine>, EngineError> {
        let bind = cfg.bind;
        let workers = cfg.workers.max(1);
        let sockets = in_netns(cfg.netns.as_deref(), || {
            let err = |source| EngineError::Bind { addr: bind, source };
            let first = udp::bind_reuseport(bind).map_err(err)?;
            // With port 0 asked, the others join the port the first got.
            let at = first.local_addr().map_err(err)?;
            let mut v = vec![first];
            for _ in 1..workers {
                v.push(udp::bind_reuseport(at).map_err(err)?);
            }
            Ok(v)
        })?;
        for socket in &sockets {
            // Force the buffers past rmem_max/wmem_max when allowed (root).
            for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
                if set_buffer(socket, opt).is_err() {
                    let plain = if opt == libc::SO_RCVBUFFORCE {
                        libc::SO_RCVBUF
                    } else {
                        libc::SO_SNDBUF
                    };
                    set_buffer(socket, plain)?;
                }
            }
        }
        let wake = (0..workers).map(|_| eventfd()).collect::<Result<_, _>>()?;
        let shared = Arc::new(Shared {
            sockets,
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            version: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            total: Counters::default(),
            log: LogLimit::default(),
            wake,
        });
        let mut threads = Vec::with_capacity(workers);
        for w in 0..workers {
            let sh = shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("ovl-enc-{w}"))
                .spawn(move || worker::run(sh, w))
                .map_err(EngineError::Thread);
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    shared.stop.store(true, Ordering::SeqCst);
                    shared.wake_all();
                    return Err(e);
                }
            }
        }
        info!(%bind, workers, "encrypted engine started");
        Ok(Arc::new(Engine {
            shared,
            master: Mutex::new(Master::default()),
            workers,
            threads: Mutex::new(threads),
        }))
    }

    /// The socket's bound address (the port when 0 was asked).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self.shared.sockets.first() {
            Some(s) => s.local_addr(),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    /// Create (or adopt) the TAP device `tap_name` for `vni` in the
    /// caller's network namespace, owned by the engine; returns its
    /// ifindex. The caller enslaves it to the bridge. Idempotent.
    pub fn ensure_network(&self, vni: Vni, tap_name: &str, mtu: u32) -> Result<u32, EngineError> {
        self.ensure_network_in(vni, tap_name, mtu, None)
    }

    /// [`Self::ensure_network`] in the namespace at `netns` (the network's
    /// sandbox): the TAP must be opened where it lives to be adopted again.
    pub fn ensure_network_in(
        &self,
        vni: Vni,
        tap_name: &str,
        mtu: u32,
        netns: Option<&Path>,
    ) -> Result<u32, EngineError> {
        let tap_err = |source| EngineError::Tap {
            name: tap_name.to_owned(),
            source,
        };
        let v = vni.get();
        let mut m = lock(&self.master);
        let have = m.networks.get(&v).map(|n| n.name == tap_name);
        let workers = self.workers;
        let (ifindex, queues) = in_netns(netns, || {
            let open = || -> Result<Vec<OwnedFd>, EngineError> {
                let q = (0..workers)
                    .map(|_| tap::open_queue(tap_name))
                    .collect::<io::Result<Vec<_>>>()
                    .map_err(tap_err)?;
                if let Some(first) = q.first() {
                    tap::set_persist(first, true).map_err(tap_err)?;
                }
                Ok(q)
            };
            if have == Some(true) {
                match tap::configure(tap_name, mtu) {
                    Ok(ifindex) => return Ok((ifindex, None)),
                    // Deleted under us (`ip link del`): make it again.
                    Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
                    Err(e) => return Err(tap_err(e)),
                }
            }
            let q = open()?;
            let ifindex = tap::configure(tap_name, mtu).map_err(tap_err)?;
            Ok((ifindex, Some(q)))
        })?;
        if let Some(queues) = queues {
            if let Some(old) = m.networks.remove(&v) {
                unpersist(&old);
            }
            let forwarding = Forwarding::default();
            m.networks.insert(
                v,
                NetMaster {
                    name: tap_name.to_owned(),
                    forwarding,
                    queues: Arc::new(queues),
                    counters: Arc::default(),
                },
            );
            info!(vni = v, tap = tap_name, ifindex, "encrypted network ready");
            self.publish(&m);
        }
        Ok(ifindex)
    }

    /// Forgets the network; its TAP device is deleted once the workers
    /// let go of its queues.
    pub fn remove_network(&self, vni: Vni) {
        let mut m = lock(&self.master);
        if let Some(n) = m.networks.remove(&vni.get()) {
            unpersist(&n);
            info!(vni = vni.get(), tap = n.name, "encrypted network removed");
            self.publish(&m);
        }
    }

    /// Who is where in a network: unicast lookup, ARP answered locally,
    /// broadcast replicated to `peers`; received frames for `vni` are
    /// accepted only from `peers`. Ignored for a network not ensured.
    pub fn set_forwarding(&self, vni: Vni, fwd: Forwarding) {
        let mut m = lock(&self.master);
        let Some(n) = m.networks.get_mut(&vni.get()) else {
            warn!(
                vni = vni.get(),
                "forwarding for an unknown encrypted network ignored"
            );
            return;
        };
        if n.forwarding != fwd {
            n.forwarding = fwd;
            self.publish(&m);
        }
    }

    /// The peer's data-path address : encrypted port.
    pub fn set_peer(&self, node: NodeId, addr: SocketAddr) {
        let mut m = lock(&self.master);
        let p = m.peers.entry(node).or_default();
        if p.addr != Some(addr) {
            p.addr = Some(addr);
            self.publish(&m);
        }
    }

    /// Stops sending to the peer (no address) but keeps its keys, whose
    /// senders' sequence numbers must go on where they are: a peer that
    /// drops out of the networks for a moment and comes back finds them.
    pub fn clear_peer_address(&self, node: NodeId) {
        let mut m = lock(&self.master);
        if m.peers.get_mut(&node).and_then(|p| p.addr.take()).is_some() {
            self.publish(&m);
        }
    }

    /// Forgets the peer: address, keys and counters.
    pub fn remove_peer(&self, node: NodeId) {
        let mut m = lock(&self.master);
        if m.peers.remove(&node).is_some() {
            self.publish(&m);
        }
    }

    /// Installs a pair's keys for their epoch; the receiver is live at
    /// once (by SPI). Same keys again: no change (the live sequence
    /// counter and replay window stay); other keys for an installed epoch
    /// (the peer restarted): both directions replaced.
    pub fn install_keys(&self, node: NodeId, keys: PairKeys) {
        let epoch = keys.send.epoch;
        let send_fingerprint = keys.send.fingerprint();
        let recv_fingerprint = keys.recv.fingerprint();
        let mut m = lock(&self.master);
        let p = m.peers.entry(node).or_default();
        if let Some(k) = p.epochs.get(&epoch)
            && k.send_fingerprint == send_fingerprint
            && k.recv_fingerprint == recv_fingerprint
        {
            return;
        }
        let replaced = p.epochs.contains_key(&epoch);
        let recv_spi = keys.recv.spi;
        p.epochs.insert(
            epoch,
            EpochKeys {
                sender: Arc::new(Mutex::new(Sender::new(keys.send))),
                receiver: Arc::new(Mutex::new(Receiver::new(keys.recv))),
                recv_spi,
                send_fingerprint,
                recv_fingerprint,
            },
        );
        info!(
            peer = %node.short(), epoch, replaced,
            send_fingerprint = format_args!("{send_fingerprint:08x}"),
            recv_fingerprint = format_args!("{recv_fingerprint:08x}"),
            "pair keys installed"
        );
        self.publish(&m);
    }

    /// Sends to `node` with the keys of `epoch` from now on. Without keys
    /// for that epoch, sending to the peer stops (counted as `no_key`)
    /// until they are installed.
    pub fn use_epoch(&self, node: NodeId, epoch: u64) {
        let mut m = lock(&self.master);
        let p = m.peers.entry(node).or_default();
        if p.in_use != Some(epoch) {
            if !p.epochs.contains_key(&epoch) {
                warn!(peer = %node.short(), epoch, "epoch in use has no keys installed");
            }
            p.in_use = Some(epoch);
            self.publish(&m);
        }
    }

    /// Forgets a pair's keys for epochs below `below_epoch`.
    pub fn retire_keys(&self, node: NodeId, below_epoch: u64) {
        let mut m = lock(&self.master);
        let Some(p) = m.peers.get_mut(&node) else {
            return;
        };
        let before = p.epochs.len();
        p.epochs.retain(|e, _| *e >= below_epoch);
        if p.epochs.len() != before {
            self.publish(&m);
        }
    }

    pub fn counters(&self) -> EngineCounters {
        let m = lock(&self.master);
        EngineCounters {
            total: self.shared.total.snapshot(),
            networks: m
                .networks
                .iter()
                .filter_map(|(v, n)| Some((Vni::new(u64::from(*v)).ok()?, n.counters.snapshot())))
                .collect(),
            peers: m
                .peers
                .iter()
                .map(|(node, p)| {
                    let epochs = p
                        .epochs
                        .iter()
                        .map(|(e, k)| EpochInfo {
                            epoch: *e,
                            send_fingerprint: k.send_fingerprint,
                            recv_fingerprint: k.recv_fingerprint,
                            sent: lock(&k.sender).sent(),
                        })
                        .collect();
                    let c = PeerCounters {
                        addr: p.addr,
                        traffic: p.counters.snapshot(),
                        epoch_in_use: p.in_use,
                        epochs,
                    };
                    (*node, c)
                })
                .collect(),
        }
    }

    /// Whether every worker thread still runs (the caller supervises: a
    /// dead worker means a dead data path, so end the process).
    pub fn healthy(&self) -> bool {
        !self.shared.stop.load(Ordering::SeqCst)
            && lock(&self.threads).iter().all(|t| !t.is_finished())
    }

    /// Stops the workers (also done when the last handle drops).
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake_all();
        let threads = std::mem::take(&mut *lock(&self.threads));
        for t in threads {
            let _ = t.join();
        }
    }

    /// Builds and publishes the workers' snapshot from the master state.
    fn publish(&self, m: &Master) {
        let mut snap = Snapshot::default();
        for (v, n) in &m.networks {
            snap.networks.insert(
                *v,
                NetState {
                    vni: *v,
                    table: Table::new(&n.forwarding),
                    queues: n.queues.clone(),
                    counters: n.counters.clone(),
                },
            );
        }
        for (node, p) in &m.peers {
            let sender = p
                .in_use
                .and_then(|e| p.epochs.get(&e))
                .map(|k| k.sender.clone());
            snap.peers.insert(
                *node,
                PeerState {
                    node: *node,
                    addr: p.addr,
                    sender,
                    counters: p.counters.clone(),
                },
            );
            for k in p.epochs.values() {
                snap.spis.entry(k.recv_spi).or_default().push(RecvEntry {
                    node: *node,
                    rx: k.receiver.clone(),
                });
            }
        }
        let snap = Arc::new(snap);
        match self.shared.snapshot.write() {
            Ok(mut s) => *s = snap,
            Err(p) => *p.into_inner() = snap,
        }
        self.shared.version.fetch_add(1, Ordering::SeqCst);
        self.shared.wake_all();
    }
}

/// Lets the device go with its last queue.
fn unpersist(n: &NetMaster) {
    if let Some(q) = n.queues.first()
        && let Err(e) = tap::set_persist(q, false)
    {
        warn!(tap = n.name, error = %e, "TAP device could not be made non-persistent");
    }
}

impl std::ops::Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Counts a drop everywhere it belongs, and logs it at most once a second
/// per reason (peers can trigger drops at line rate).
pub(crate) fn count_drop(
    sh: &Shared,
    why: Dropped,
    net: Option<&NetState>,
    peer: Option<(&NodeId, &Counters)>,
) {
    sh.total.add_drop(why);
    if let Some(n) = net {
        n.counters.add_drop(why);
    }
    if let Some((_, c)) = peer {
        c.add_drop(why);
    }
    if sh.log.allow(why) {
        let vni = net.map(|n| n.vni);
        let peer = peer.map(|(p, _)| p.short());
        if why.is_remote() {
            warn!(
                reason = why.name(),
                ?vni,
                ?peer,
                "encrypted data plane dropped a datagram (logged 1/s per reason)"
            );
        } else {
            debug!(
                reason = why.name(),
                ?vni,
                ?peer,
                "encrypted data plane dropped a frame (logged 1/s per reason)"
            );
        }
    }
}
