//! Peer gRPC (7946/tcp): what agents ask each other directly.
//!
//! `Hello`: before joining, the joiner asks a seed to prove it holds the same
//! cluster key (HMAC over the joiner's fresh nonce), so a wrong token fails at
//! once with a reason, and nothing changes locally. `Pull` serves deltas of
//! our own table; `RequestSpace` donates address space. Both need the
//! caller's credentials (see `sync::auth`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ovl_proto::peer::peer_client::PeerClient;
use ovl_proto::peer::peer_server::Peer;
use ovl_proto::peer::{
    HelloRequest, HelloResponse, NotifyRequest, NotifyResponse, ProgrammedRequest,
    ProgrammedResponse, PullRequest, PullResponse, SpaceGrant, SpaceRequest,
};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use tonic::{Code, Request, Response, Status};
use tracing::{debug, warn};

use crate::core::{Core, CoreError};
use crate::ids::{ClusterId, NodeId};
use crate::metrics::{Counter, Counters, RateLimit};
use crate::sync::{self, auth};
use crate::token::{Admission, ClusterKeys};

const HELLO_LABEL: &[u8] = b"ovl hello v1";
const NONCE_LEN: usize = 32;
const HELLO_TIMEOUT: Duration = Duration::from_secs(3);

fn proof_input(cluster: ClusterId, nonce: &[u8], server: NodeId) -> Vec<u8> {
    [HELLO_LABEL, cluster.as_bytes(), nonce, server.as_bytes()].concat()
}

pub struct PeerService {
    core: Arc<Core>,
    counters: Arc<Counters>,
}

impl PeerService {
    pub fn new(core: Arc<Core>, counters: Arc<Counters>) -> Self {
        Self { core, counters }
    }

    fn refuse<T>(&self, remote: Option<std::net::SocketAddr>, s: Status) -> Result<T, Status> {
        self.counters.inc(Counter::PeerRefused);
        if let Some(n) = REFUSE_LOG.check(std::time::Instant::now()) {
            warn!(peer = ?remote, reason = s.message(), suppressed = n, "peer call refused");
        }
        Err(s)
    }

    /// Checks the caller's credentials; returns what the reply needs.
    fn authenticate<T: prost::Message>(
        &self,
        req: &Request<T>,
        method: &'static str,
    ) -> Result<Caller, Status> {
        let Some(keys) = self.core.cluster.keys() else {
            return self.refuse(
                req.remote_addr(),
                Status::failed_precondition("this agent is not in a cluster"),
            );
        };
        match auth::verify_request(req, &keys, method) {
            Ok((node, _)) if self.core.cluster.is_removed(node) => self.refuse(
                req.remote_addr(),
                Status::permission_denied(format!("node {node} was removed from the cluster")),
            ),
            Ok((node, mac)) => Ok(Caller {
                keys,
                node,
                mac,
                method,
            }),
            Err(e) => self.refuse(req.remote_addr(), Status::unauthenticated(e.to_string())),
        }
    }

    /// A reply bound to the caller's request.
    fn reply<T: prost::Message>(&self, caller: &Caller, body: T) -> Response<T> {
        let mut resp = Response::new(body);
        auth::stamp_response(
            &mut resp,
            &caller.keys,
            self.core.cluster.node_id(),
            caller.method,
            &caller.mac,
        );
        resp
    }
}

/// An authenticated caller.
struct Caller {
    keys: Arc<ClusterKeys>,
    node: NodeId,
    mac: auth::Mac,
    method: &'static str,
}

static REFUSE_LOG: RateLimit = RateLimit::new(std::time::Duration::from_secs(10));

#[tonic::async_trait]
impl Peer for PeerService {
    async fn hello(&self, req: Request<HelloRequest>) -> Result<Response<HelloResponse>, Status> {
        let remote = req.remote_addr();
        let req = req.into_inner();
        let Some(current) = self.core.cluster.admission() else {
            return self.refuse(
                remote,
                Status::failed_precondition("this agent is not in a cluster"),
            );
        };
        let admission = current.token.admission();
        if req.cluster_id.as_slice() != admission.cluster_id.as_bytes() {
            return self.refuse(
                remote,
                Status::permission_denied("this agent is in a different cluster"),
            );
        }
        if req.client_nonce.len() != NONCE_LEN {
            return self.refuse(
                remote,
                Status::invalid_argument("client nonce must be 32 bytes"),
            );
        }
        let me = self.core.cluster.node_id();
        let tag = hmac::sign(
            &admission.proof,
            &proof_input(admission.cluster_id, &req.client_nonce, me),
        );
        self.counters.inc(Counter::HelloServed);
        debug!(peer = ?remote, "hello answered");
        Ok(Response::new(HelloResponse {
            server_node_id: me.as_bytes().to_vec(),
            proof: tag.as_ref().to_vec(),
            // Useless without the token: sealed under it and our nonce.
            sealed_cluster_secret: admission
                .seal_secret(&req.client_nonce, &current.cluster_secret),
        }))
    }

    async fn pull(&self, req: Request<PullRequest>) -> Result<Response<PullResponse>, Status> {
        let caller = self.authenticate(&req, sync::PULL)?;
        let since = req.into_inner().since;
        let (version, full, entries) = self.core.store().delta_since(since);
        self.core.served(caller.node, version);
        self.counters.inc(Counter::PullServed);
        Ok(self.reply(
            &caller,
            PullResponse {
                owner: self.core.cluster.node_id().as_bytes().to_vec(),
                version,
                full,
                entries,
            },
        ))
    }

    async fn notify(
        &self,
        req: Request<NotifyRequest>,
    ) -> Result<Response<NotifyResponse>, Status> {
        let caller = self.authenticate(&req, sync::NOTIFY)?;
        self.core.hint(caller.node, req.into_inner().version);
        Ok(self.reply(&caller, NotifyResponse {}))
    }

    async fn programmed(
        &self,
        req: Request<ProgrammedRequest>,
    ) -> Result<Response<ProgrammedResponse>, Status> {
        let caller = self.authenticate(&req, sync::PROGRAMMED)?;
        self.core.programmed(caller.node, req.into_inner().version);
        Ok(self.reply(&caller, ProgrammedResponse {}))
    }

    async fn request_space(
        &self,
        req: Request<SpaceRequest>,
    ) -> Result<Response<SpaceGrant>, Status> {
        let caller = self.authenticate(&req, sync::REQUEST_SPACE)?;
        let req = req.into_inner();
        let grant = self
            .core
            .donate_space(caller.node, &req.network_id, &req.exact_ip)
            .await
            .map_err(|e| match e {
                CoreError::NoNetwork(_) => Status::not_found(e.to_string()),
                CoreError::IpamExhausted(_) => Status::resource_exhausted(e.to_string()),
                CoreError::BadIp(..) | CoreError::IpInUse(..) => {
                    Status::invalid_argument(e.to_string())
                }
                _ => Status::internal(e.to_string()),
            })?;
        Ok(self.reply(&caller, SpaceGrant { grant_json: grant }))
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
/// seed's node id and the cluster secret it handed over.
pub async fn hello(
    seed: SocketAddr,
    keys: &Admission,
    rng: &SystemRandom,
) -> Result<(NodeId, [u8; 32]), HelloError> {
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill(&mut nonce)
        .map_err(|_| HelloError::Protocol(seed, "local random source failed".into()))?;
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{seed}"))
        .map_err(|e| HelloError::Protocol(seed, e.to_string()))?
        .connect_timeout(HELLO_TIMEOUT)
        .timeout(HELLO_TIMEOUT);
    let channel = endpoint
        .connect()
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
    hmac::verify(
        &keys.proof,
        &proof_input(keys.cluster_id, &nonce, server),
        &resp.proof,
    )
    .map_err(|_| HelloError::BadProof(seed))?;
    let secret = keys
        .open_secret(&nonce, &resp.sealed_cluster_secret)
        .map_err(|_| HelloError::BadProof(seed))?;
    Ok((server, secret))
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
