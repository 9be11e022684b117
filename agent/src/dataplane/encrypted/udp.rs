//! OS edge: batched UDP I/O (recvmmsg/sendmmsg) over caller-kept buffers.
//!
//! A batch owns [`BATCH`] slots of [`SLOT`] bytes, allocated once per
//! worker; the message headers are rebuilt in place before each call, so
//! nothing is allocated per packet and one syscall moves up to [`BATCH`]
//! datagrams.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::UdpSocket;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{FromRawFd, RawFd};

/// Datagrams per syscall.
pub const BATCH: usize = 64;
/// Bytes per slot: a jumbo (9000) frame with the codec's overhead fits.
pub const SLOT: usize = 16 * 1024;

/// A batch of slots with their lengths and addresses.
pub struct Batch {
    buf: Vec<u8>,
    lens: [usize; BATCH],
    addrs: [libc::sockaddr_storage; BATCH],
    addr_lens: [libc::socklen_t; BATCH],
    iovs: [libc::iovec; BATCH],
    hdrs: [libc::mmsghdr; BATCH],
    /// Slots in use.
    count: usize,
}

// SAFETY: the raw pointers in `iovs`/`hdrs` point into the batch's own
// buffers, are rebuilt before every syscall and never dereferenced
// elsewhere; a batch is used by one thread at a time.
unsafe impl Send for Batch {}

impl Default for Batch {
    fn default() -> Self {
        Self::new()
    }
}

impl Batch {
    pub fn new() -> Self {
        Self {
            buf: vec![0u8; BATCH * SLOT],
            lens: [0; BATCH],
            // SAFETY: sockaddr_storage, iovec and mmsghdr are plain C
            // structs for which all-zero bytes are a valid value.
            addrs: unsafe { zeroed() },
            addr_lens: [0; BATCH],
            iovs: unsafe { zeroed() },
            hdrs: unsafe { zeroed() },
            count: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn is_full(&self) -> bool {
        self.count == BATCH
    }

    /// Slot `i`'s whole buffer.
    pub fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.buf[i * SLOT..(i + 1) * SLOT]
    }

    /// Received datagram `i` and its source.
    pub fn datagram_mut(&mut self, i: usize) -> (&mut [u8], Option<SocketAddr>) {
        let from = from_storage(&self.addrs[i], self.addr_lens[i]);
        let len = self.lens[i];
        (&mut self.buf[i * SLOT..i * SLOT + len], from)
    }

    /// Marks the next free slot (the one `slot_mut(self.len())` filled) as
    /// a datagram of `len` bytes to `to`.
    pub fn push(&mut self, len: usize, to: SocketAddr) {
        let i = self.count;
        self.lens[i] = len.min(SLOT);
        self.addr_lens[i] = to_storage(to, &mut self.addrs[i]);
        self.count += 1;
    }

    fn rebuild(&mut self, n: usize, rx: bool) {
        let base = self.buf.as_mut_ptr();
        for i in 0..n {
            self.iovs[i] = libc::iovec {
                // SAFETY: `i * SLOT` is inside `buf` (BATCH * SLOT bytes).
                iov_base: unsafe { base.add(i * SLOT) }.cast(),
                iov_len: if rx { SLOT } else { self.lens[i] },
            };
            let h = &mut self.hdrs[i];
            h.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = if rx {
                size_of::<libc::sockaddr_storage>() as libc::socklen_t
            } else {
                self.addr_lens[i]
            };
            h.msg_hdr.msg_iov = &mut self.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = std::ptr::null_mut();
            h.msg_hdr.msg_controllen = 0;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
    }

    /// Receives up to [`BATCH`] datagrams without blocking; the batch then
    /// holds them (0 when none was waiting).
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.rebuild(BATCH, true);
        // SAFETY: `hdrs[..BATCH]` were just rebuilt to point at this
        // batch's own slots, addresses and iovecs, all alive and not moved
        // during the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            self.count = 0;
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        let n = n as usize;
        for i in 0..n {
            self.lens[i] = self.hdrs[i].msg_len as usize;
            self.addr_lens[i] = self.hdrs[i].msg_hdr.msg_namelen;
            // A truncated datagram is not ours (too big): make it fail
            // as short rather than open a prefix.
            if self.hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                self.lens[i] = 0;
            }
        }
        self.count = n;
        Ok(n)
    }

    /// Sends every pushed datagram (blocking when the socket buffer is
    /// full: backpressure towards the TAP), then empties the batch.
    /// Returns how many the kernel refused.
    pub fn flush(&mut self, fd: RawFd) -> (usize, Option<io::Error>) {
        let n = self.count;
        self.rebuild(n, false);
        let mut done = 0;
        let mut err = None;
        while done < n {
            // SAFETY: `hdrs[done..n]` point at this batch's slots,
            // addresses and iovecs, rebuilt above and alive during the call.
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    self.hdrs.as_mut_ptr().add(done),
                    (n - done) as libc::c_uint,
                    0,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // The first datagram of the rest failed (e.g. no route):
                // skip it and send the others.
                done += 1;
                err = Some(e);
                continue;
            }
            done += r as usize;
        }
        self.count = 0;
        let failed = if err.is_some() { 1 } else { 0 };
        (failed, err)
    }
}

/// A UDP socket bound to `addr` with `SO_REUSEPORT`, so each worker has
/// its own socket on the one port: the kernel steers a peer's datagrams
/// (one 4-tuple) to one socket, hence one worker, and a flow is never
/// reordered between workers (reordering made TCP retransmit).
pub fn bind_reuseport(addr: SocketAddr) -> io::Result<UdpSocket> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2); the fd is owned right below.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket and is owned by nothing else.
    let sock = unsafe { UdpSocket::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads one c_int from a live local.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEPORT,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let len = to_storage(addr, &mut ss);
    // SAFETY: `ss` holds a sockaddr of `len` bytes, alive for the call.
    let rc = unsafe { libc::bind(fd, (&ss as *const libc::sockaddr_storage).cast(), len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}

fn to_storage(a: SocketAddr, s: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match a {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for
            // sockaddr_in (it is defined to hold any sockaddr).
            unsafe { std::ptr::write((s as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((s as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

fn from_storage(s: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let len = len as usize;
    match s.ss_family as libc::c_int {
        libc::AF_INET if len >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin: &libc::sockaddr_in = unsafe { &*(s as *const libc::sockaddr_storage).cast() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                sin.sin_addr.s_addr.to_ne_bytes().into(),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 if len >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6: &libc::sockaddr_in6 =
                unsafe { &*(s as *const libc::sockaddr_storage).cast() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                sin6.sin6_addr.s6_addr.into(),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    #[test]
    fn addresses_round_trip() {
        // SAFETY: all-zero is a valid sockaddr_storage.
        let mut s: libc::sockaddr_storage = unsafe { zeroed() };
        for a in ["198.18.0.1:4500", "[2001:db8::1]:4500"] {
            let a: SocketAddr = a.parse().unwrap();
            let l = to_storage(a, &mut s);
            assert_eq!(from_storage(&s, l), Some(a));
        }
    }

    #[test]
    fn a_batch_crosses_loopback() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let mut b = Batch::new();
        for i in 0..10u8 {
            b.slot_mut(i as usize)[..3].copy_from_slice(&[i, i, i]);
            b.push(3 + i as usize, to);
        }
        assert_eq!(b.flush(tx.as_raw_fd()).0, 0);
        let mut r = Batch::new();
        let mut got = 0;
        for _ in 0..100 {
            got += r.recv(rx.as_raw_fd()).unwrap();
            if got == 10 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(got, 10, "one recvmmsg may return them all or in parts");
        let (d, from) = r.datagram_mut(r.len() - 1);
        assert_eq!(from, Some(tx.local_addr().unwrap()));
        assert!(d.len() >= 3);
    }
}
