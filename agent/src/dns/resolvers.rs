//! The resolvers a host runs: one per network it carries, started and
//! stopped with the network by the reconciler, names swapped live.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::server::{self, Server, Shared};
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
}

impl Resolvers {
    pub fn new(shared: Arc<Shared>) -> Self {
        Resolvers {
            shared,
            running: HashMap::new(),
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
            let started = match server::bind_in(w.netns.clone(), addr).await {
                Ok(sockets) => Server::spawn(sockets, w.names, self.shared.clone()),
                Err(e) => Err(e),
            };
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
    }

    pub fn addr(&self, network: NetworkId) -> Option<SocketAddr> {
        self.running.get(&network).map(|s| s.addr)
    }
}
