//! The peer client: a pool of TLS channels, each pinned to the node id it
//! was opened for, and one typed function per call. It knows no agent state
//! (only its own identity, the counters it reports to, and what the caller
//! names), so sync, IPAM and admission all call peers the same way.
//!
//! A channel is keyed by `(address, node id)`: the TLS handshake refuses a
//! callee whose certificate key does not hash to that id (see `tls`), so a
//! reply can only come from the node we meant to call, and an address taken
//! over by another node never answers in the old node's name.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use ovl_proto::peer::peer_client::PeerClient;
use ovl_proto::peer::{
    ClusterKeyMessage, FetchClusterKeyRequest, HelloRequest, NotifyRequest, ProgrammedRequest,
    PullRequest, PullResponse, SpaceGrant, SpaceRequest,
};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Status};
use tracing::warn;

use super::tls::{PinnedServer, TlsError, TlsIdentity, server_name};
use super::{CLAIM_HEADER, NONCE_LEN, proof_input};
use crate::ids::NodeId;
use crate::keys::token::Admission;
use crate::metrics::{Counter, Counters, RateLimit};

const CALL_TIMEOUT: Duration = Duration::from_secs(3);
const HELLO_TIMEOUT: Duration = Duration::from_secs(3);

static PIN_LOG: RateLimit = RateLimit::new(Duration::from_secs(10));

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("TLS setup for {0}: {1}")]
    Tls(SocketAddr, TlsError),
    #[error("bad peer address {0}: {1}")]
    Address(SocketAddr, String),
    #[error("{}", .0.message())]
    Status(Status),
}

impl CallError {
    pub fn code(&self) -> Code {
        match self {
            Self::Status(s) => s.code(),
            _ => Code::Internal,
        }
    }
}

/// Opens TCP, then TLS pinned by `config`'s verifier. Pin failures are
/// counted (`peer_reply_refused`): the callee is not the node we called.
async fn connect_tls(
    config: Arc<ClientConfig>,
    addr: SocketAddr,
    counters: Option<Arc<Counters>>,
) -> io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    match tokio_rustls::TlsConnector::from(config)
        .connect(server_name(addr), tcp)
        .await
    {
        Ok(tls) => Ok(TokioIo::new(tls)),
        Err(e) => {
            let refused = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .is_some_and(|r| matches!(r, rustls::Error::InvalidCertificate(_)));
            if refused {
                if let Some(c) = &counters {
                    c.inc(Counter::PeerReplyRefused);
                }
                if let Some(suppressed) = PIN_LOG.check(Instant::now()) {
                    warn!(peer = %addr, error = %e, suppressed, "peer certificate refused");
                }
            }
            Err(e)
        }
    }
}

fn endpoint(addr: SocketAddr, timeout: Duration) -> Result<Endpoint, CallError> {
    // The stream is already TLS when tonic sees it: tonic speaks plain
    // HTTP/2 on it, hence "http".
    Ok(Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| CallError::Address(addr, e.to_string()))?
        .connect_timeout(timeout)
        .timeout(timeout))
}

fn connector(
    config: Arc<ClientConfig>,
    addr: SocketAddr,
    counters: Option<Arc<Counters>>,
) -> impl tower::Service<
    Uri,
    Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    Error = io::Error,
    Future = impl Future<Output = io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>>
             + Send,
> + Send
+ Clone
+ 'static {
    tower::service_fn(move |_: Uri| connect_tls(config.clone(), addr, counters.clone()))
}

/// Reused, pinned connections to peers' gRPC servers.
pub struct Channels {
    tls: Arc<TlsIdentity>,
    counters: Arc<Counters>,
    /// The node id sent as the caller's claim; the server refuses a claim
    /// that differs from our certificate. Always ours outside tests.
    claim: NodeId,
    map: Mutex<HashMap<(SocketAddr, NodeId), Channel>>,
}

impl Channels {
    pub fn new(tls: Arc<TlsIdentity>, counters: Arc<Counters>) -> Self {
        Self {
            claim: tls.node_id,
            tls,
            counters,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Claims another node id than our certificate's: only for tests of the
    /// server's claimed-caller check.
    pub fn claiming(mut self, claim: NodeId) -> Self {
        self.claim = claim;
        self
    }

    /// This client's node id (its certificate's).
    pub fn node_id(&self) -> NodeId {
        self.tls.node_id
    }

    /// The channel to `node` at `addr`, opened lazily.
    pub fn get(&self, addr: SocketAddr, node: NodeId) -> Result<Channel, CallError> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(&(addr, node)) {
            return Ok(c.clone());
        }
        let config = self
            .tls
            .client_config(PinnedServer::to(node))
            .map_err(|e| CallError::Tls(addr, e))?;
        let ch = endpoint(addr, CALL_TIMEOUT)?.connect_with_connector_lazy(connector(
            config,
            addr,
            Some(self.counters.clone()),
        ));
        map.insert((addr, node), ch.clone());
        Ok(ch)
    }

    pub fn forget(&self, addr: SocketAddr, node: NodeId) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(addr, node));
    }

    /// Every call goes through here: counted, with its encoded size.
    fn request<T: prost::Message>(&self, body: T) -> tonic::Request<T> {
        self.counters.inc(Counter::PeerRpcCalls);
        self.counters
            .add(Counter::PeerRpcRequestBytes, body.encoded_len() as u64);
        let mut req = tonic::Request::new(body);
        // A node id prints as hex: always valid ASCII metadata.
        if let Ok(v) = self.claim.to_string().parse() {
            req.metadata_mut().insert(CLAIM_HEADER, v);
        }
        req
    }

    fn failed(&self, addr: SocketAddr, node: NodeId, s: Status) -> CallError {
        self.counters.inc(Counter::PeerRpcFailed);
        if s.code() == Code::Unavailable {
            self.forget(addr, node);
        }
        CallError::Status(s)
    }

    /// `node`'s table entries changed after `since`.
    pub async fn pull(
        &self,
        addr: SocketAddr,
        node: NodeId,
        since: u64,
    ) -> Result<PullResponse, CallError> {
        let ch = self.get(addr, node)?;
        PeerClient::new(ch)
            .pull(self.request(PullRequest { since }))
            .await
            .map(|r| {
                let r = r.into_inner();
                self.counters.add(
                    Counter::PeerRpcPullBytes,
                    prost::Message::encoded_len(&r) as u64,
                );
                r
            })
            .map_err(|s| self.failed(addr, node, s))
    }

    /// Tells `node` our table reached `version`.
    pub async fn notify(
        &self,
        addr: SocketAddr,
        node: NodeId,
        version: u64,
    ) -> Result<(), CallError> {
        let ch = self.get(addr, node)?;
        PeerClient::new(ch)
            .notify(self.request(NotifyRequest { version }))
            .await
            .map(|_| ())
            .map_err(|s| self.failed(addr, node, s))
    }

    /// Tells `node` our kernel holds its table up to `version`.
    pub async fn programmed(
        &self,
        addr: SocketAddr,
        node: NodeId,
        version: u64,
    ) -> Result<(), CallError> {
        let ch = self.get(addr, node)?;
        PeerClient::new(ch)
            .programmed(self.request(ProgrammedRequest { version }))
            .await
            .map(|_| ())
            .map_err(|s| self.failed(addr, node, s))
    }

    /// Asks `node` to donate address space.
    pub async fn request_space(
        &self,
        addr: SocketAddr,
        node: NodeId,
        req: SpaceRequest,
    ) -> Result<SpaceGrant, CallError> {
        let ch = self.get(addr, node)?;
        PeerClient::new(ch)
            .request_space(self.request(req))
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.failed(addr, node, s))
    }

    /// Hands `node` a new cluster key (and the removals behind it).
    pub async fn install_cluster_key(
        &self,
        addr: SocketAddr,
        node: NodeId,
        key: ClusterKeyMessage,
    ) -> Result<(), CallError> {
        let ch = self.get(addr, node)?;
        PeerClient::new(ch)
            .install_cluster_key(self.request(key))
            .await
            .map(|_| ())
            .map_err(|s| self.failed(addr, node, s))
    }

    /// `node`'s current cluster key.
    pub async fn fetch_cluster_key(
        &self,
        addr: SocketAddr,
        node: NodeId,
    ) -> Result<ClusterKeyMessage, CallError> {
        let ch = self.get(addr, node)?;
        PeerClient::new(ch)
            .fetch_cluster_key(self.request(FetchClusterKeyRequest {}))
            .await
            .map(|r| r.into_inner())
            .map_err(|s| self.failed(addr, node, s))
    }

    /// The current cluster key of whichever node answers at `addr`, and
    /// that node's id (from its certificate). For a member that missed a
    /// rotation and knows only an address: the caller must check the id
    /// is a member it knows before using the key.
    pub async fn fetch_cluster_key_at(
        &self,
        addr: SocketAddr,
    ) -> Result<(NodeId, ClusterKeyMessage), CallError> {
        let pin = PinnedServer::learn();
        let config = self
            .tls
            .client_config(pin.clone())
            .map_err(|e| CallError::Tls(addr, e))?;
        let ch = endpoint(addr, CALL_TIMEOUT)?.connect_with_connector_lazy(connector(
            config,
            addr,
            Some(self.counters.clone()),
        ));
        let key = PeerClient::new(ch)
            .fetch_cluster_key(self.request(FetchClusterKeyRequest {}))
            .await
            .map_err(CallError::Status)?
            .into_inner();
        let node = pin
            .learned()
            .ok_or_else(|| CallError::Status(Status::unauthenticated("no TLS certificate seen")))?;
        Ok((node, key))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("seed {0} unreachable: {1}")]
    Unreachable(SocketAddr, String),
    #[error("seed {0} is not in a cluster")]
    NotClustered(SocketAddr),
    #[error("seed {0} is in a different cluster: the join token does not match")]
    WrongCluster(SocketAddr),
    #[error("seed {0} refused: the join token does not match the cluster's key")]
    BadProof(SocketAddr),
    #[error("seed {0} answered out of protocol: {1}")]
    Protocol(SocketAddr, String),
}

impl HelloError {
    /// True when the token, not the network, is the problem.
    pub fn is_token_mismatch(&self) -> bool {
        matches!(self, Self::WrongCluster(_) | Self::BadProof(_))
    }
}

/// Asks `seed` to prove it holds the token behind `keys`; returns the
/// seed's node id and the cluster key (epoch, secret) it handed over. Before joining we
/// do not know the seed's id: the TLS handshake accepts any Ed25519 key and
/// records its node id, and the seed's answer must name that same id (the
/// proof covers it).
pub async fn hello(
    seed: SocketAddr,
    keys: &Admission,
    tls: &TlsIdentity,
    rng: &SystemRandom,
) -> Result<(NodeId, u32, [u8; 32], BTreeSet<NodeId>), HelloError> {
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill(&mut nonce)
        .map_err(|_| HelloError::Protocol(seed, "local random source failed".into()))?;
    let pin = PinnedServer::learn();
    let config = tls
        .client_config(pin.clone())
        .map_err(|e| HelloError::Protocol(seed, e.to_string()))?;
    let channel = endpoint(seed, HELLO_TIMEOUT)
        .map_err(|e| HelloError::Protocol(seed, e.to_string()))?
        .connect_with_connector(connector(config, seed, None))
        .await
        .map_err(|e| HelloError::Unreachable(seed, source_chain(&e)))?;
    let resp = PeerClient::new(channel)
        .hello(HelloRequest {
            cluster_id: keys.cluster_id.as_bytes().to_vec(),
            client_nonce: nonce.to_vec(),
        })
        .await
        .map_err(|s| match s.code() {
            Code::FailedPrecondition => HelloError::NotClustered(seed),
            Code::PermissionDenied => HelloError::WrongCluster(seed),
            Code::Unavailable | Code::DeadlineExceeded => {
                HelloError::Unreachable(seed, s.message().to_string())
            }
            _ => HelloError::Protocol(seed, s.message().to_string()),
        })?
        .into_inner();
    let server: [u8; 16] = resp
        .server_node_id
        .as_slice()
        .try_into()
        .map_err(|_| HelloError::Protocol(seed, "node id is not 16 bytes".into()))?;
    let server = NodeId::from_bytes(server);
    match pin.learned() {
        Some(id) if id == server => {}
        Some(id) => {
            return Err(HelloError::Protocol(
                seed,
                format!("seed says it is node {server} but its certificate is node {id}"),
            ));
        }
        None => return Err(HelloError::Protocol(seed, "no TLS certificate seen".into())),
    }
    hmac::verify(
        &keys.proof,
        &proof_input(keys.cluster_id, &nonce, server),
        &resp.proof,
    )
    .map_err(|_| HelloError::BadProof(seed))?;
    let secret = keys
        .open_secret(&nonce, &resp.sealed_cluster_secret)
        .map_err(|_| HelloError::BadProof(seed))?;
    let members = crate::keys::cluster_key::members_from_wire(&resp.cluster_key_members)
        .ok_or_else(|| HelloError::Protocol(seed, "a key member id is not 16 bytes".into()))?;
    Ok((server, resp.cluster_key_epoch, secret, members))
}

fn source_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}
