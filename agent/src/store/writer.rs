//! The one writer of the own table's files, on a thread of its own so no
//! disk I/O runs on the async runtime or under the store's lock. The store
//! changes its table in memory and hands the writer the change; the writer
//! takes every change queued while it was busy, appends them with one
//! fsync (group commit), and then publishes the version now durable.
//! Callers that must persist before effect wait for that version.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use super::log::{self, LogRecord};
use super::table::Table;
use crate::metrics::{Counter, Counters};
use crate::persist::{self, PersistError};

/// The log is folded into a snapshot once it is larger than this and than
/// the last snapshot (so snapshots cost O(change) amortised).
pub(crate) const SNAPSHOT_MIN: u64 = 1 << 20;
/// After a failed write, how soon the writer tries again unasked.
const RETRY: Duration = Duration::from_secs(1);

pub enum Op {
    /// Boxed: records hold whole table entries, `Clear` nothing.
    Record(Box<LogRecord>),
    /// Forget everything (leave): both files go.
    Clear,
}

/// What is on disk: the own table up to `version` in `epoch` (a clear
/// starts a new epoch). `error` is set while writes fail.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Durable {
    pub epoch: u64,
    pub version: u64,
    pub error: Option<Arc<str>>,
}

/// What a caller waits for: its change, by epoch and version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    pub epoch: u64,
    pub version: u64,
}

impl Durable {
    fn covers(&self, t: Ticket) -> bool {
        self.epoch > t.epoch || (self.epoch == t.epoch && self.version >= t.version)
    }
}

/// Work done, for tests, the bench and diagnostics.
#[derive(Debug, Default)]
pub struct Stats {
    pub fsyncs: AtomicU64,
    pub batches: AtomicU64,
    pub records: AtomicU64,
    pub snapshots: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("state write failed: {0}")]
    Failed(Arc<str>),
    #[error("the store writer has stopped")]
    Stopped,
}

pub struct Writer {
    tx: Option<mpsc::Sender<Op>>,
    durable: watch::Receiver<Durable>,
    stats: Arc<Stats>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub struct Paths {
    pub snapshot: PathBuf,
    pub log: PathBuf,
}

impl Writer {
    /// Starts the writer over the files of `mirror` (the table as loaded;
    /// the log already truncated to its valid part).
    pub fn spawn(
        paths: Paths,
        owner: Vec<u8>,
        mirror: Table,
        log_bytes: u64,
        counters: Arc<Counters>,
    ) -> Result<Self, PersistError> {
        let log = open_log(&paths.log)?;
        let (dtx, durable) = watch::channel(Durable {
            epoch: 0,
            version: mirror.version(),
            error: None,
        });
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Stats::default());
        let mut w = Thread {
            paths,
            owner,
            mirror,
            log,
            log_bytes,
            snap_bytes: 0,
            epoch: 0,
            broken: None,
            durable: dtx,
            stats: stats.clone(),
            counters,
        };
        let thread = std::thread::Builder::new()
            .name("ovl-store".into())
            .spawn(move || w.run(rx))
            .map_err(|e| PersistError::new("start writer thread", Path::new("."), e))?;
        Ok(Self {
            tx: Some(tx),
            durable,
            stats,
            thread: Some(thread),
        })
    }

    pub fn send(&self, op: Op) -> Result<(), WriteError> {
        self.tx
            .as_ref()
            .ok_or(WriteError::Stopped)?
            .send(op)
            .map_err(|_| WriteError::Stopped)
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn durable(&self) -> Durable {
        self.durable.borrow().clone()
    }

    /// A handle to wait for durability with, apart from the store.
    pub fn waiter(&self) -> Waiter {
        Waiter(self.durable.clone())
    }

    /// Blocking wait, for threads off the runtime (tests, bench).
    pub fn wait_blocking(&self, t: Ticket) -> Result<(), WriteError> {
        self.waiter().wait_blocking(t)
    }
}

/// Waits for the writer to report a ticket durable.
#[derive(Clone)]
pub struct Waiter(watch::Receiver<Durable>);

impl Waiter {
    /// Resolves once `t` is on disk (or the writer failed or stopped).
    /// Holds nothing of the store: await it after dropping the lock.
    pub fn wait(self, t: Ticket) -> impl Future<Output = Result<(), WriteError>> + Send + 'static {
        let mut rx = self.0;
        async move {
            let d = rx
                .wait_for(|d| d.covers(t) || d.error.is_some())
                .await
                .map_err(|_| WriteError::Stopped)?
                .clone();
            match d.error {
                Some(e) if !d.covers(t) => Err(WriteError::Failed(e)),
                _ => Ok(()),
            }
        }
    }

    /// Blocking wait, for threads off the runtime (tests, bench).
    pub fn wait_blocking(mut self, t: Ticket) -> Result<(), WriteError> {
        let rx = &mut self.0;
        loop {
            {
                let d = rx.borrow_and_update();
                if d.covers(t) {
                    return Ok(());
                }
                if let Some(e) = &d.error {
                    return Err(WriteError::Failed(e.clone()));
                }
            }
            // No runtime here: poll the watch at a short interval.
            if !rx.has_changed().map_err(|_| WriteError::Stopped)? {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
}

impl Drop for Writer {
    /// Flushes what is queued, then stops the thread.
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn open_log(path: &Path) -> Result<File, PersistError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| PersistError::new("open", path, e))
}

struct Thread {
    paths: Paths,
    owner: Vec<u8>,
    /// The own table as the files hold it (plus the batch being written).
    mirror: Table,
    log: File,
    log_bytes: u64,
    snap_bytes: u64,
    epoch: u64,
    /// Set after a failed write: the log may hold a torn frame, so the
    /// next write is a whole snapshot (which also empties the log).
    broken: Option<Arc<str>>,
    durable: watch::Sender<Durable>,
    stats: Arc<Stats>,
    counters: Arc<Counters>,
}

impl Thread {
    fn run(&mut self, rx: mpsc::Receiver<Op>) {
        loop {
            let first = if self.broken.is_some() {
                match rx.recv_timeout(RETRY) {
                    Ok(op) => Some(op),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match rx.recv() {
                    Ok(op) => Some(op),
                    Err(_) => return,
                }
            };
            // Group commit: everything queued meanwhile goes in this batch.
            let batch: Vec<Op> = first.into_iter().chain(rx.try_iter()).collect();
            self.commit(batch);
        }
    }

    fn commit(&mut self, batch: Vec<Op>) {
        let mut frames = Vec::new();
        let mut clear = false;
        for op in batch {
            match op {
                Op::Record(r) => {
                    log::encode_frame(&r, &mut frames);
                    log::apply(&mut self.mirror, *r);
                    self.stats.records.fetch_add(1, Ordering::Relaxed);
                }
                Op::Clear => {
                    frames.clear();
                    self.mirror = Table::default();
                    self.epoch += 1;
                    clear = true;
                }
            }
        }
        let result = if clear {
            self.clear_files()
                .and_then(|()| self.append(&frames).map(|()| self.maybe_snapshot()))
        } else if self.broken.is_some() {
            self.snapshot()
        } else {
            self.append(&frames).map(|()| self.maybe_snapshot())
        };
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(()) => {
                if self.broken.take().is_some() {
                    info!("state writes work again");
                }
            }
            Err(e) => {
                self.counters.inc(Counter::StoreWriteFailed);
                if self.broken.is_none() {
                    warn!(error = %e, "state write failed; retrying with a whole snapshot");
                }
                self.broken = Some(e.to_string().into());
            }
        }
        let version = if self.broken.is_some() {
            self.durable.borrow().version
        } else {
            self.mirror.version()
        };
        self.durable.send_replace(Durable {
            epoch: self.epoch,
            version,
            error: self.broken.clone(),
        });
    }

    fn append(&mut self, frames: &[u8]) -> Result<(), PersistError> {
        if frames.is_empty() {
            return Ok(());
        }
        let p = &self.paths.log;
        self.log
            .write_all(frames)
            .map_err(|e| PersistError::new("append", p, e))?;
        self.log
            .sync_data()
            .map_err(|e| PersistError::new("fsync", p, e))?;
        self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.log_bytes += frames.len() as u64;
        Ok(())
    }

    /// A failed snapshot leaves the log as it was: still valid.
    fn maybe_snapshot(&mut self) {
        if self.log_bytes <= SNAPSHOT_MIN.max(self.snap_bytes) {
            return;
        }
        if let Err(e) = self.snapshot() {
            self.counters.inc(Counter::StoreWriteFailed);
            warn!(error = %e, "state snapshot failed; the log keeps growing until one works");
        }
    }

    /// Writes the whole table atomically, then empties the log.
    fn snapshot(&mut self) -> Result<(), PersistError> {
        let bytes = log::encode_snapshot(&self.owner, &self.mirror);
        persist::write_atomic(&self.paths.snapshot, &bytes)?;
        let p = &self.paths.log;
        self.log
            .set_len(0)
            .and_then(|()| self.log.sync_all())
            .map_err(|e| PersistError::new("empty", p, e))?;
        // write_atomic: file and directory; then the emptied log.
        self.stats.fsyncs.fetch_add(3, Ordering::Relaxed);
        self.stats.snapshots.fetch_add(1, Ordering::Relaxed);
        self.snap_bytes = bytes.len() as u64;
        self.log_bytes = 0;
        Ok(())
    }

    fn clear_files(&mut self) -> Result<(), PersistError> {
        persist::remove_durable(&self.paths.snapshot)?;
        let p = &self.paths.log;
        self.log
            .set_len(0)
            .and_then(|()| self.log.sync_all())
            .map_err(|e| PersistError::new("empty", p, e))?;
        self.log_bytes = 0;
        self.snap_bytes = 0;
        Ok(())
    }
}
