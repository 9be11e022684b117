//! I/O wiring: one worker thread (a std thread, not a tokio worker) per
//! core. Each polls its eventfd, the shared UDP socket and its own queue of
//! every network's TAP; frames from the TAP are decided by `forward`,
//! sealed into a send batch and sent with one sendmmsg; datagrams come in
//! by recvmmsg, are opened, checked by `forward::ingress` and written to
//! the network's TAP. Buffers are allocated once per worker.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tracing::warn;

use super::codec::{self, DropReason, FRAME_AT, Receiver, TAG_LEN};
use super::counters::Dropped;
use super::engine::{NetState, PeerState, Shared, Snapshot, count_drop};
use super::forward::{self, Egress};
use super::udp::{BATCH, Batch, SLOT};

/// Frames read from one TAP queue before the batch is sent and other fds
/// get their turn.
const TAP_BURST: usize = BATCH;
/// recvmmsg calls per wake-up before polling again.
const RX_ROUNDS: usize = 4;

struct Worker {
    sh: Arc<Shared>,
    index: usize,
    snap: Arc<Snapshot>,
    version: u64,
    /// eventfd, socket, then one TAP queue per network (`vnis` in order).
    fds: Vec<libc::pollfd>,
    vnis: Vec<u32>,
    tx: Batch,
    rx: Batch,
    /// ARP replies, and a copy of a datagram when its SPI names several
    /// receivers (each try opens in place).
    scratch: Vec<u8>,
}

pub(crate) fn run(sh: Arc<Shared>, index: usize) {
    let mut w = Worker {
        snap: sh.current(),
        version: u64::MAX,
        sh,
        index,
        fds: Vec::new(),
        vnis: Vec::new(),
        tx: Batch::new(),
        rx: Batch::new(),
        scratch: vec![0u8; SLOT],
    };
    while !w.sh.stop.load(Ordering::SeqCst) {
        w.reload();
        // SAFETY: `fds` is a live, initialised pollfd array of its length.
        let n = unsafe { libc::poll(w.fds.as_mut_ptr(), w.fds.len() as libc::nfds_t, 1000) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                warn!(worker = index, error = %e, "poll failed");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            continue;
        }
        if n == 0 {
            continue;
        }
        if w.fds[0].revents != 0 {
            drain_eventfd(w.fds[0].fd);
        }
        if w.fds[1].revents != 0 {
            w.receive();
        }
        for i in 2..w.fds.len() {
            if w.fds[i].revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0 {
                let vni = w.vnis[i - 2];
                w.transmit(vni, w.fds[i].fd);
            }
        }
    }
}

fn drain_eventfd(fd: RawFd) {
    let mut b = [0u8; 8];
    // SAFETY: reads at most 8 bytes into a live local array.
    unsafe { libc::read(fd, b.as_mut_ptr().cast(), b.len()) };
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

impl Worker {
    /// Picks up a new snapshot (and rebuilds the poll set) if there is one.
    fn reload(&mut self) {
        let v = self.sh.version.load(Ordering::SeqCst);
        if v == self.version {
            for f in &mut self.fds {
                f.revents = 0;
            }
            return;
        }
        self.version = v;
        self.snap = self.sh.current();
        self.fds.clear();
        self.vnis.clear();
        self.fds.push(pollfd(self.sh.wake[self.index].as_raw_fd()));
        self.fds.push(pollfd(self.socket()));
        for (vni, n) in &self.snap.networks {
            if let Some(q) = queue(n, self.index) {
                self.fds.push(pollfd(q));
                self.vnis.push(*vni);
            }
        }
    }

    /// This worker's socket.
    fn socket(&self) -> RawFd {
        self.sh.sockets[self.index % self.sh.sockets.len()].as_raw_fd()
    }

    /// Frames from one network's TAP queue → sealed datagrams.
    fn transmit(&mut self, vni: u32, fd: RawFd) {
        let snap = self.snap.clone();
        let Some(net) = snap.networks.get(&vni) else {
            return;
        };
        let sock = self.socket();
        for _ in 0..TAP_BURST {
            if self.tx.is_full() {
                self.flush(sock);
            }
            let i = self.tx.len();
            let slot = self.tx.slot_mut(i);
            let room = SLOT - FRAME_AT - TAG_LEN;
            let len = match super::tap::read(fd, &mut slot[FRAME_AT..FRAME_AT + room]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    count_drop(&self.sh, Dropped::Io, Some(net), None);
                    break;
                }
            };
            if len == room {
                // Possibly truncated: larger than the engine's buffers.
                count_drop(&self.sh, Dropped::TooBig, Some(net), None);
                continue;
            }
            let decision = {
                let slot = self.tx.slot_mut(i);
                forward::egress(
                    &net.table,
                    &slot[FRAME_AT..FRAME_AT + len],
                    &mut self.scratch,
                )
            };
            match decision {
                Egress::Unicast(node) => self.seal_to(net, &snap, node, len),
                Egress::Flood => {
                    // Broadcast is rare: keep the frame aside and seal one
                    // copy per peer host.
                    self.scratch[..len]
                        .copy_from_slice(&self.tx.slot_mut(i)[FRAME_AT..FRAME_AT + len]);
                    for node in net.table.peers() {
                        if self.tx.is_full() {
                            self.flush(sock);
                        }
                        let at = self.tx.len();
                        self.tx.slot_mut(at)[FRAME_AT..FRAME_AT + len]
                            .copy_from_slice(&self.scratch[..len]);
                        self.seal_to(net, &snap, *node, len);
                    }
                }
                Egress::ArpReply(n) => {
                    if let Some(q) = queue(net, self.index)
                        && super::tap::write(q, &self.scratch[..n]).is_err()
                    {
                        count_drop(&self.sh, Dropped::Io, Some(net), None);
                    }
                }
                Egress::Dropped(why) => count_drop(&self.sh, why, Some(net), None),
            }
        }
        self.flush(sock);
    }

    /// Seals the frame in the next free slot for `node` and pushes it.
    fn seal_to(&mut self, net: &NetState, snap: &Snapshot, node: crate::ids::NodeId, len: usize) {
        let Some(peer) = snap.peers.get(&node) else {
            count_drop(&self.sh, Dropped::NoKey, Some(net), None);
            return;
        };
        let pc = Some((&peer.node, &*peer.counters));
        let Some(sender) = &peer.sender else {
            count_drop(&self.sh, Dropped::NoKey, Some(net), pc);
            return;
        };
        let Some(addr) = peer.addr else {
            count_drop(&self.sh, Dropped::NoPeerAddr, Some(net), pc);
            return;
        };
        let i = self.tx.len();
        let sealed = {
            let mut s = sender.lock().unwrap_or_else(|p| p.into_inner());
            s.seal(net.vni, self.tx.slot_mut(i), len)
        };
        match sealed {
            Ok(n) => {
                self.tx.push(n, addr);
                self.sh.total.add_out(len);
                net.counters.add_out(len);
                peer.counters.add_out(len);
            }
            // Exhausted (2^64 packets) or a bad VNI: nothing sent.
            Err(_) => count_drop(&self.sh, Dropped::NoKey, Some(net), pc),
        }
    }

    fn flush(&mut self, sock: RawFd) {
        if self.tx.is_empty() {
            return;
        }
        let (failed, err) = self.tx.flush(sock);
        for _ in 0..failed {
            count_drop(&self.sh, Dropped::Io, None, None);
        }
        if let Some(e) = err
            && self.sh.log.allow(Dropped::Io)
        {
            warn!(worker = self.index, error = %e, "sendmmsg refused a datagram");
        }
    }

    /// Datagrams from the socket → opened frames on the TAPs.
    fn receive(&mut self) {
        let snap = self.snap.clone();
        let sock = self.socket();
        for _ in 0..RX_ROUNDS {
            let n = match self.rx.recv(sock) {
                Ok(n) => n,
                Err(e) => {
                    if self.sh.log.allow(Dropped::Io) {
                        warn!(worker = self.index, error = %e, "recvmmsg failed");
                    }
                    return;
                }
            };
            for i in 0..n {
                self.receive_one(&snap, i);
            }
            if n < BATCH {
                return;
            }
        }
    }

    fn receive_one(&mut self, snap: &Snapshot, i: usize) {
        let (d, _from) = self.rx.datagram_mut(i);
        let Some(spi) = codec::spi_of(d) else {
            count_drop(&self.sh, Dropped::Malformed, None, None);
            return;
        };
        let Some(cands) = snap.spis.get(&spi) else {
            count_drop(&self.sh, Dropped::UnknownSpi, None, None);
            return;
        };
        // One candidate: open in place. Several (an SPI collision): try
        // each on a copy; the tag decides.
        let (opened, entry, buf): (_, _, &mut [u8]) = if cands.len() == 1 {
            let e = &cands[0];
            (open(&e.rx, d), e, d)
        } else {
            let mut last = None;
            let len = d.len();
            for e in cands {
                self.scratch[..len].copy_from_slice(d);
                let r = open(&e.rx, &mut self.scratch[..len]);
                let ok = r.is_ok();
                last = Some((r, e));
                if ok {
                    break;
                }
            }
            let Some((r, e)) = last else { return };
            (r, e, &mut self.scratch[..len])
        };
        let peer = snap.peers.get(&entry.node);
        let pc = peer.map(|p: &PeerState| (&p.node, &*p.counters));
        let o = match opened {
            Ok(o) => o,
            Err(why) => {
                let why = match why {
                    DropReason::BadTag => Dropped::BadTag,
                    DropReason::Replay(_) => Dropped::Replay,
                    DropReason::Generation => Dropped::Generation,
                    DropReason::Short | DropReason::BadVxlan => Dropped::Malformed,
                };
                count_drop(&self.sh, why, None, pc);
                return;
            }
        };
        let frame = &buf[o.frame.clone()];
        let net = match forward::ingress(
            &snap.networks,
            |n: &NetState| &n.table,
            o.vni,
            entry.node,
            frame,
        ) {
            Ok(n) => n,
            Err(why) => {
                let net = snap.networks.get(&o.vni);
                count_drop(&self.sh, why, net, pc);
                return;
            }
        };
        let Some(q) = queue(net, self.index) else {
            return;
        };
        match super::tap::write(q, frame) {
            Ok(_) => {
                self.sh.total.add_in(frame.len());
                net.counters.add_in(frame.len());
                if let Some(p) = peer {
                    p.counters.add_in(frame.len());
                }
            }
            Err(_) => count_drop(&self.sh, Dropped::Io, Some(net), pc),
        }
    }
}

fn open(rx: &Mutex<Receiver>, d: &mut [u8]) -> Result<codec::Opened, DropReason> {
    rx.lock().unwrap_or_else(|p| p.into_inner()).open(d)
}

/// This worker's TAP queue of a network.
fn queue(net: &NetState, worker: usize) -> Option<RawFd> {
    let q = &net.queues;
    if q.is_empty() {
        return None;
    }
    Some(q[worker % q.len()].as_raw_fd())
}
