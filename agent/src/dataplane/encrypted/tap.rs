//! OS edge: the network's TAP device (`/dev/net/tun`, plain ioctls).
//!
//! Plain `libc` rather than `tun-rs`: we need exactly four ioctls
//! (TUNSETIFF, TUNSETPERSIST, and SIOCSIFMTU/SIOCSIFFLAGS/SIOCGIFINDEX on
//! an inet socket), raw nonblocking fds the workers poll themselves (not an
//! async wrapper), and, for offloads later, the virtio-net header parsed
//! for Ethernet frames, which tun-rs's helpers do not do in TAP mode
//! (CRATE-NOTES "TAP"). No new dependency for that.
//!
//! The device is `IFF_TAP | IFF_NO_PI | IFF_MULTI_QUEUE`: one queue (fd)
//! per worker; the kernel spreads flows over the queues. It is made
//! persistent, so it survives an agent restart (the bridge keeps its port
//! and traffic resumes as soon as the new agent attaches its queues again:
//! adoption is TUNSETIFF on the existing name). A device is created in the
//! network namespace of the thread that opens its first queue.

use std::ffi::c_int;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const IFNAMSIZ: usize = 16;

/// `struct ifreq`: the name, then a 24-byte union of which we use an
/// `int` (MTU, ifindex) or a `short` (flags) at its start.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> io::Result<Self> {
        let b = name.as_bytes();
        if b.is_empty() || b.len() >= IFNAMSIZ || b.contains(&0) || b.contains(&b'/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad interface name {name:?}"),
            ));
        }
        let mut r = IfReq {
            name: [0; IFNAMSIZ],
            data: [0; 24],
        };
        r.name[..b.len()].copy_from_slice(b);
        Ok(r)
    }

    fn set_short(&mut self, v: i16) {
        self.data[..2].copy_from_slice(&v.to_ne_bytes());
    }
    fn short(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }
    fn set_int(&mut self, v: i32) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }
    fn int(&self) -> i32 {
        i32::from_ne_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
    }
}

fn check(rc: c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Opens one queue of the TAP `name`, creating the device if it does not
/// exist. Nonblocking, close-on-exec.
pub fn open_queue(name: &str) -> io::Result<OwnedFd> {
    let mut req = IfReq::new(name)?;
    // SAFETY: the path is a NUL-terminated literal; open has no other
    // memory effects. The returned fd is owned right below.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    check(fd)?;
    // SAFETY: `fd` was just returned by open and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    req.set_short((libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_MULTI_QUEUE) as i16);
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `req` is a
    // properly sized, initialised `#[repr(C)]` ifreq living across the call.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) })?;
    Ok(fd)
}

/// Keeps the device after its last queue closes (or not: then closing the
/// last queue deletes it).
pub fn set_persist(fd: &OwnedFd, persist: bool) -> io::Result<()> {
    // SAFETY: TUNSETPERSIST takes its argument by value; `fd` is an open
    // TAP queue.
    check(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETPERSIST,
            libc::c_ulong::from(persist),
        )
    })
}

/// Sets the MTU, brings the device up and returns its ifindex, in the
/// calling thread's network namespace.
pub fn configure(name: &str, mtu: u32) -> io::Result<u32> {
    // SAFETY: plain socket(2) call; the fd is owned right below.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(s)?;
    // SAFETY: `s` was just returned by socket and is owned by nothing else.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    let s = s.as_raw_fd();
    let mtu = i32::try_from(mtu).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut req = IfReq::new(name)?;
    req.set_int(mtu);
    // SAFETY (this and the next three): each SIOC* ioctl reads/writes one
    // `struct ifreq`; `req` is a properly sized `#[repr(C)]` ifreq.
    check(unsafe { libc::ioctl(s, libc::SIOCSIFMTU, &mut req) })?;
    let mut req = IfReq::new(name)?;
    check(unsafe { libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req) })?;
    let flags = req.short() | libc::IFF_UP as i16;
    req.set_short(flags);
    check(unsafe { libc::ioctl(s, libc::SIOCSIFFLAGS, &mut req) })?;
    let mut req = IfReq::new(name)?;
    check(unsafe { libc::ioctl(s, libc::SIOCGIFINDEX, &mut req) })?;
    u32::try_from(req.int()).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

/// Reads one frame; `WouldBlock` when the queue is empty.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the call.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Writes one frame.
pub fn write(fd: RawFd, frame: &[u8]) -> io::Result<usize> {
    // SAFETY: `frame` is valid for reads of `frame.len()` bytes.
    let n = unsafe { libc::write(fd, frame.as_ptr().cast(), frame.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(IfReq::new("ovltap-42").is_ok());
        assert!(IfReq::new("").is_err());
        assert!(IfReq::new("sixteen-bytes-xx").is_err());
        assert!(IfReq::new("a/b").is_err());
        assert_eq!(std::mem::size_of::<IfReq>(), 40, "struct ifreq on Linux");
    }
}
