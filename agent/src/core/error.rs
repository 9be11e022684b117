use crate::dataplane::DataplaneError;
use crate::ids::{MacError, Vni};
use crate::store::StoreError;
use crate::store::networks::NetworkError;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("not in a cluster: run `ovlctl cluster init` or `ovlctl cluster join` first")]
    NotClustered,
    #[error(transparent)]
    Invalid(#[from] NetworkError),
    #[error("a network named {0:?} already exists")]
    NameTaken(String),
    #[error("VNI {0} is already used by network {1:?}")]
    VniTaken(Vni, String),
    #[error("no free VNI left")]
    NoVni,
    #[error("no free /24 left in the default address pool {0}; give --subnet")]
    PoolExhausted(String),
    #[error("no such network {0:?}")]
    NoNetwork(String),
    #[error("network {0:?} is not usable: {1}")]
    Conflict(String, String),
    #[error(
        "network {name:?} still has {count} endpoint(s) (on {nodes}); detach them first or use --force"
    )]
    InUse {
        name: String,
        count: usize,
        nodes: String,
    },
    #[error("an endpoint named {0:?} already exists in network {1:?}")]
    EndpointExists(String, String),
    #[error("no endpoint {0:?} in network {1:?}")]
    NoEndpoint(String, String),
    #[error("endpoint {0:?} lives on node {1}; detach it there")]
    NotLocal(String, String),
    #[error("give exactly one of --netns PATH and --pid PID")]
    NetnsArgs,
    #[error("--netns {0}: {1}")]
    NetnsRefused(String, crate::dataplane::NsRefusal),
    #[error("--pid {0}: no such process")]
    NoPid(u32),
    #[error("--ip {0}: {1}")]
    BadIp(String, String),
    #[error("--ip {0} is already used by endpoint {1:?} in network {2:?}")]
    IpInUse(String, String, String),
    #[error("--mac: {0}")]
    BadMac(#[from] MacError),
    #[error("MAC {0} is already used by endpoint {1:?} on node {2} in network {3:?}")]
    MacInUse(String, String, String, String),
    #[error("--ifname {0:?}: use 1-15 characters, no '/', ':' or white space")]
    BadIfname(String),
    #[error("--name/--alias {0:?}: use 1-63 letters, digits, '_', '.', '-'")]
    BadEndpointName(String),
    #[error("{0} aliases: at most 32")]
    TooManyAliases(usize),
    #[error("address allocation in network {0:?}: {1}")]
    Ipam(String, String),
    #[error("address allocation in network {0:?}: no space reachable: {1}")]
    IpamUnreachable(String, String),
    #[error("address pool of network {0:?} is exhausted")]
    IpamExhausted(String),
    #[error("kernel: {0}")]
    Dataplane(#[from] DataplaneError),
    #[error("state: {0}")]
    Store(#[from] StoreError),
    #[error("system random source failed")]
    Random,
}
