//! The resolvers a host runs: one per network it carries, started and
//! stopped with the network by the reconciler, names swapped live.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::server::{self, Server, Shared, Sockets};
use super::table::NameTable;
use crate::ids::NetworkId;
use crate::metrics::RateLimit;
use crate::resolv_conf::PORT;

static BIND_LOG: RateLimit = RateLimit::new(Duration::from_secs(30));

/// One network's resolver as the reconciler wants it.
pub struct Wanted {
    pub network: NetworkId,
    /// The namespace the network's bridge lives in (`None`: the agent's).
    pub netns: Option<PathBuf>,
    /// The network's gateway address.
    pub gateway: IpAddr,
    pub names: NameTable,
}

pub struct Resolvers {
    shared: Arc<Shared>,
    running: HashMap<NetworkId, Server>,
    /// Bound at start, not yet served, by namespace and address: the
    /// kernel queues queries in them until the first `sync` serves them.
    held: HashMap<(Option<PathBuf>, SocketAddr), Sockets>,
}

impl Resolvers {
    pub fn new(shared: Arc<Shared>) -> Self {
        Resolvers {
            shared,
            running: HashMap::new(),
            held: HashMap::new(),
        }
    }

    /// Binds the resolvers' addresses a restarted agent finds in its
    /// sandboxes, and serves nothing yet: until the replicas caught up the
    /// names are incomplete, and an answer from them could be a wrong
    /// NXDOMAIN. A query sent meanwhile waits in the socket (and the
    /// client's retry with it) instead of being refused, and is answered
    /// by the first `sync`.
    pub async fn hold(&mut self, at: Vec<(PathBuf, IpAddr)>) {
        for (netns, ip) in at {
            let addr = SocketAddr::new(ip, PORT);
            match server::bind_in(Some(netns.clone()), addr).await {
                Ok(sockets) => {
                    info!(netns = %netns.display(), %addr, "dns queries held until the replicas catch up");
                    self.held.insert((Some(netns), addr), sockets);
                }
                Err(e) => {
                    warn!(netns = %netns.display(), %addr, error = %e, "cannot hold dns queries during the warm-up")
                }
            }
        }
    }

    /// Makes the running set match `wanted`: starts missing servers,
    /// updates names, stops servers of networks no longer carried. A bind
    /// failure is logged and retried on the next pass.
    pub async fn sync(&mut self, wanted: Vec<Wanted>) {
        let keep: std::collections::HashSet<_> = wanted.iter().map(|w| w.network).collect();
        self.running.retain(|id, s| {
            let k = keep.contains(id);
            if !k {
                info!(network = %id, addr = %s.addr, "dns resolver stopped");
            }
            k
        });
        for w in wanted {
            let addr = SocketAddr::new(w.gateway, PORT);
            if let Some(s) = self.running.get(&w.network) {
                if s.addr == addr {
                    if s.update(w.names) {
                        tracing::debug!(network = %w.network, "dns names updated");
                    }
                    continue;
                }
                self.running.remove(&w.network);
            }
            let bound = match self.held.remove(&(w.netns.clone(), addr)) {
                Some(sockets) => Ok(sockets),
                None => server::bind_in(w.netns.clone(), addr).await,
            };
            let started = bound.and_then(|s| Server::spawn(s, w.names, self.shared.clone()));
            match started {
                Ok(s) => {
                    info!(network = %w.network, %addr, "dns resolver started");
                    self.running.insert(w.network, s);
                }
                Err(e) => {
                    if let Some(suppressed) = BIND_LOG.check(Instant::now()) {
                        warn!(network = %w.network, %addr, error = %e, suppressed, "dns resolver not started; retrying");
                    }
                }
            }
        }
        // Held for a network no longer carried (removed while the agent
        // was down): closed.
        for ((netns, addr), _) in self.held.drain() {
            info!(netns = ?netns, %addr, "held dns address released: no network wants it");
        }
    }

    pub fn addr(&self, network: NetworkId) -> Option<SocketAddr> {
        self.running.get(&network).map(|s| s.addr)
    }
}
