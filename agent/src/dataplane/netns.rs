//! Netlink connections in other network namespaces.
//!
//! A netlink socket acts in the namespace it was created in. To reach a
//! container's (or a test host's) namespace, a dedicated short-lived OS
//! thread enters it with `setns(2)`, creates the socket there (registering
//! it with the caller's tokio runtime), hands it back and exits. No runtime
//! worker thread ever changes namespace.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use rtnetlink::Handle;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::DataplaneError;

/// The task driving a netlink connection; aborted (socket closed) on drop.
pub(crate) struct ConnTask(JoinHandle<()>);

impl Drop for ConnTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type Connection = rtnetlink::proto::Connection<rtnetlink::packet_route::RouteNetlinkMessage>;

pub(crate) fn spawn_conn(conn: Connection) -> ConnTask {
    ConnTask(tokio::spawn(conn))
}

/// A task that is aborted when the returned value is dropped.
pub(crate) fn spawn_task(f: impl std::future::Future<Output = ()> + Send + 'static) -> ConnTask {
    ConnTask(tokio::spawn(f))
}

/// A connection in the calling thread's namespace. Needs a tokio runtime.
pub(crate) fn connect_here() -> Result<(Handle, ConnTask), DataplaneError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(DataplaneError::Socket)?;
    Ok((handle, spawn_conn(conn)))
}

/// Why a path given as a container's network namespace was refused. Each
/// says what the path really is, so the operator sees one clear line.
#[derive(Debug, thiserror::Error)]
pub enum NsRefusal {
    #[error("no such namespace file")]
    Missing,
    #[error("permission denied")]
    PermissionDenied,
    #[error("not a network namespace: {} is {kind}", path.display())]
    NotNamespace { path: PathBuf, kind: &'static str },
    #[error("is the agent's own network namespace")]
    OwnNamespace,
    #[error("cannot open: {0}")]
    Io(#[source] io::Error),
}

impl NsRefusal {
    fn from_open(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::NotFound => Self::Missing,
            io::ErrorKind::PermissionDenied => Self::PermissionDenied,
            _ => Self::Io(e),
        }
    }
}

/// Opens `path` without ever blocking (O_NONBLOCK: a FIFO with no writer
/// would hang a plain open, with whatever locks the caller holds) and
/// checks it is a network namespace: an nsfs file whose `NS_GET_NSTYPE` is
/// `CLONE_NEWNET`. Blocking syscalls: run off the async runtime.
pub fn open_checked(path: &Path) -> Result<File, NsRefusal> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        // std adds O_CLOEXEC itself.
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(NsRefusal::from_open)?;
    let ft = file.metadata().map_err(NsRefusal::Io)?.file_type();
    let not_ns = |kind| NsRefusal::NotNamespace {
        path: path.to_owned(),
        kind,
    };
    let kind = if ft.is_fifo() {
        Some("a FIFO")
    } else if ft.is_dir() {
        Some("a directory")
    } else if ft.is_socket() {
        Some("a socket")
    } else if ft.is_char_device() || ft.is_block_device() {
        Some("a device")
    } else {
        None
    };
    if let Some(kind) = kind {
        return Err(not_ns(kind));
    }
    if !is_nsfs(&file).map_err(NsRefusal::Io)? {
        return Err(not_ns("a regular file"));
    }
    if ns_type(&file).map_err(NsRefusal::Io)? != libc::CLONE_NEWNET {
        return Err(not_ns("a namespace of another type"));
    }
    Ok(file)
}

/// [`open_checked`], and not the namespace the agent itself runs in
/// (`/proc/self/ns/net`, compared by device and inode): attaching the
/// host's namespace as a container would move the host's interfaces.
pub fn open_container(path: &Path) -> Result<File, NsRefusal> {
    use std::os::unix::fs::MetadataExt;
    let file = open_checked(path)?;
    let own = std::fs::metadata("/proc/self/ns/net").map_err(NsRefusal::Io)?;
    let got = file.metadata().map_err(NsRefusal::Io)?;
    if (got.dev(), got.ino()) == (own.dev(), own.ino()) {
        return Err(NsRefusal::OwnNamespace);
    }
    Ok(file)
}

fn is_nsfs(file: &File) -> io::Result<bool> {
    // SAFETY: statfs is plain old data, so all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is open for the duration of the call and `st`
    // is a valid, writable statfs.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // The width of f_type differs between architectures.
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64 == libc::NSFS_MAGIC as i64)
}

fn ns_type(file: &File) -> io::Result<libc::c_int> {
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the
    // descriptor, which is open for the duration of the call.
    let t = unsafe { libc::ioctl(file.as_raw_fd(), libc::NS_GET_NSTYPE) };
    if t < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(t)
}

/// Opens a namespace file (`/proc/PID/ns/net`, `/run/netns/NAME`),
/// checked as [`open_checked`] does, so a path swapped after the API's
/// check cannot hang the data plane either.
pub(crate) fn open(path: &Path) -> Result<File, DataplaneError> {
    open_checked(path).map_err(|e| match e {
        NsRefusal::Missing => DataplaneError::NamespaceMissing {
            path: path.to_owned(),
        },
        NsRefusal::Io(source) => DataplaneError::NamespaceEnter {
            path: path.to_owned(),
            source,
        },
        other => DataplaneError::NamespaceEnter {
            path: path.to_owned(),
            source: io::Error::other(other.to_string()),
        },
    })
}

/// Moves the calling thread into the network namespace `ns`.
fn enter(ns: &File, path: &Path) -> Result<(), DataplaneError> {
    // SAFETY: `ns` is an open file that outlives the call, so the descriptor
    // is valid; setns only changes the calling thread's network namespace,
    // and callers run this on a dedicated thread that exits afterwards.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(DataplaneError::NamespaceEnter {
            path: path.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Runs `f` on a short-lived thread that entered the namespace at `path`,
/// with the caller's tokio runtime entered (sockets `f` makes are created
/// in that namespace and registered with the caller's reactor).
pub(crate) async fn run_in<T, F>(path: &Path, f: F) -> Result<T, DataplaneError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, DataplaneError> + Send + 'static,
{
    let runtime = tokio::runtime::Handle::current();
    let path: PathBuf = path.to_owned();
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("ovl-netns".into())
        .spawn(move || {
            let made = open(&path).and_then(|ns| enter(&ns, &path)).and_then(|()| {
                let _rt = runtime.enter();
                f()
            });
            // The receiver only disappears if the caller was cancelled.
            let _ = tx.send(made);
        })
        .map_err(DataplaneError::Socket)?;
    rx.await.map_err(|_| DataplaneError::Worker)?
}

/// Runs blocking `f` on a short-lived thread inside the namespace at
/// `path` (`None`: the caller's), and waits for it. Files under
/// `/proc/sys/net` opened there are that namespace's. Blocking.
pub(crate) fn blocking_in<T, F>(path: Option<&Path>, f: F) -> Result<T, DataplaneError>
where
    T: Send,
    F: FnOnce() -> Result<T, DataplaneError> + Send,
{
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("ovl-netns".into())
            .spawn_scoped(s, move || {
                if let Some(p) = path {
                    open(p).and_then(|ns| enter(&ns, p))?;
                }
                f()
            })
            .map_err(DataplaneError::Socket)?
            .join()
            .map_err(|_| DataplaneError::Worker)?
    })
}

/// Runs blocking `f` on tokio's blocking pool and waits for it.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, DataplaneError> + Send + 'static,
) -> Result<T, DataplaneError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| DataplaneError::Worker)?
}

/// Writes `value` to the sysctl file `key` (a path under `/proc/sys`) of
/// the namespace the calling thread is in, unless it already holds it.
/// `Ok(None)`: this kernel has no such key. `Ok(Some(changed))` otherwise.
/// Blocking.
pub(crate) fn set_sysctl(key: &str, value: &str) -> Result<Option<bool>, DataplaneError> {
    let failed = |what: &str, e| DataplaneError::Sysctl {
        key: key.to_owned(),
        what: what.to_owned(),
        source: e,
    };
    match std::fs::read_to_string(key) {
        Ok(v) if v.trim() == value => Ok(Some(false)),
        Ok(_) => std::fs::write(key, value)
            .map(|()| Some(true))
            .map_err(|e| failed("write", e)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(failed("read", e)),
    }
}

/// A connection inside the namespace at `path`.
pub(crate) async fn connect_in(path: &Path) -> Result<(Handle, ConnTask), DataplaneError> {
    let (conn, handle, _) = run_in(path, || {
        rtnetlink::new_connection().map_err(DataplaneError::Socket)
    })
    .await?;
    Ok((handle, spawn_conn(conn)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_a_file_a_directory_and_a_missing_path_are_refused_without_blocking() {
        let dir = std::env::temp_dir().join(format!("ovl-netns-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let file = dir.join("file");
        std::fs::write(&file, b"x").unwrap();
        let msg = |p: &Path| open_container(p).unwrap_err().to_string();
        assert_eq!(
            msg(&fifo),
            format!("not a network namespace: {} is a FIFO", fifo.display())
        );
        assert!(msg(&file).ends_with("is a regular file"), "{}", msg(&file));
        assert!(msg(&dir).ends_with("is a directory"), "{}", msg(&dir));
        assert_eq!(msg(&dir.join("missing")), "no such namespace file");
        // Our own namespace is a network namespace, but not a container's.
        assert!(open_checked(Path::new("/proc/self/ns/net")).is_ok());
        assert_eq!(
            msg(Path::new("/proc/self/ns/net")),
            "is the agent's own network namespace"
        );
        assert!(
            msg(Path::new("/proc/self/ns/uts")).ends_with("a namespace of another type"),
            "{}",
            msg(Path::new("/proc/self/ns/uts"))
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
