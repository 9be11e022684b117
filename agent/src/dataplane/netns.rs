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

/// A connection in the calling thread's namespace. Needs a tokio runtime.
pub(crate) fn connect_here() -> Result<(Handle, ConnTask), DataplaneError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(DataplaneError::Socket)?;
    Ok((handle, spawn_conn(conn)))
}

/// Opens a namespace file (`/proc/PID/ns/net`, `/run/netns/NAME`).
pub(crate) fn open(path: &Path) -> Result<File, DataplaneError> {
    File::open(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => DataplaneError::NamespaceMissing {
            path: path.to_owned(),
        },
        _ => DataplaneError::NamespaceEnter {
            path: path.to_owned(),
            source: e,
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

/// A connection inside the namespace at `path`.
pub(crate) async fn connect_in(path: &Path) -> Result<(Handle, ConnTask), DataplaneError> {
    let runtime = tokio::runtime::Handle::current();
    let path: PathBuf = path.to_owned();
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("ovl-netns".into())
        .spawn(move || {
            let made = open(&path).and_then(|ns| enter(&ns, &path)).and_then(|()| {
                // The socket is created here, in the entered namespace, and
                // registered with the caller's reactor.
                let _rt = runtime.enter();
                rtnetlink::new_connection().map_err(DataplaneError::Socket)
            });
            // The receiver only disappears if the caller was cancelled.
            let _ = tx.send(made);
        })
        .map_err(DataplaneError::Socket)?;
    let (conn, handle, _) = rx.await.map_err(|_| DataplaneError::Worker)??;
    Ok((handle, spawn_conn(conn)))
}
