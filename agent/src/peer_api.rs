//! The peer API: what this agent serves other agents on 7946/tcp (behind
//! `peer::listener`'s TLS). The caller's node id comes from its
//! certificate (the connection's [`PeerConn`]), never from what the request
//! says. `Hello` is open to any certificate holder (a joiner is not a
//! member yet; its token proof is the HMAC exchange); every other call
//! needs an admitted member.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ovl_proto::peer::peer_server::{Peer, PeerServer};
use ovl_proto::peer::{
    ClusterKeyMessage, FetchClusterKeyRequest, HelloRequest, HelloResponse,
    InstallClusterKeyResponse, NotifyRequest, NotifyResponse, ProgrammedRequest,
    ProgrammedResponse, PullRequest, PullResponse, SpaceGrant, SpaceRequest,
};
use ring::hmac;
use tonic::{Request, Response, Status};
use tracing::{debug, warn};

use crate::cluster::Cluster;
use crate::core::{Core, CoreError};
use crate::ids::NodeId;
use crate::membership::NodeStatus;
use crate::metrics::{Counter, Counters, RateLimit};
use crate::peer::{CLAIM_HEADER, NONCE_LEN, PeerConn, proof_input};

mod gate;

pub use gate::{Rule, rule_for};

static CALL_REFUSE_LOG: RateLimit = RateLimit::new(Duration::from_secs(10));

/// Largest request the peer API decodes, whatever the method: tonic
/// refuses a larger one from its length prefix. Each method has a smaller
/// cap of its own (`gate::rule_for`), applied to the body as it arrives,
/// and non-members are refused from their headers before that.
pub const MAX_REQUEST_BYTES: usize = 256 * 1024;
/// Request headers one stream may send (a member sends a few small ones).
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// HTTP/2 streams one connection may have open (a member uses a few).
const MAX_STREAMS: u32 = 16;
/// Per-stream and per-connection receive windows: what a caller can make
/// us buffer before we read it (RFC 9113 §6.9).
const STREAM_WINDOW: u32 = 64 * 1024;
const CONNECTION_WINDOW: u32 = 256 * 1024;
/// A call not answered by then is cancelled.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings on idle connections; a peer that stops answering them is
/// dropped (its connection slot with it).
const KEEPALIVE: Duration = Duration::from_secs(15);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The tonic server with the peer API's limits (issue 8).
pub fn server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_STREAMS)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .timeout(CALL_TIMEOUT)
        .http2_keepalive_interval(Some(KEEPALIVE))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .http2_max_header_list_size(MAX_HEADER_LIST)
}

/// The peer API service behind its gate (membership from the TLS
/// identity and per-method size caps, before any body is decoded).
pub fn service(
    core: Arc<Core>,
    cluster: Arc<Cluster>,
    counters: Arc<Counters>,
) -> gate::Gate<PeerServer<PeerService>> {
    let server = PeerServer::new(PeerService::new(core.clone(), cluster, counters.clone()))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    gate::Gate::new(server, core, counters)
}

/// Whether `node` is an admitted member (not this agent, not gone).
async fn is_member(core: &Core, node: NodeId) -> bool {
    core.cluster.in_cluster()
        && core
            .cluster
            .members()
            .await
            .iter()
            .any(|n| n.id == node && !n.is_self && n.status != NodeStatus::Left)
}

pub struct PeerService {
    core: Arc<Core>,
    /// For admission and the cluster key (Hello, key install and fetch).
    cluster: Arc<Cluster>,
    counters: Arc<Counters>,
}

impl PeerService {
    pub fn new(core: Arc<Core>, cluster: Arc<Cluster>, counters: Arc<Counters>) -> Self {
        Self {
            core,
            cluster,
            counters,
        }
    }

    fn refuse<T>(&self, conn: Option<&PeerConn>, s: Status) -> Result<T, Status> {
        self.counters.inc(Counter::PeerRefused);
        if let Some(n) = CALL_REFUSE_LOG.check(Instant::now()) {
            warn!(peer = ?conn.map(|c| c.remote), node = ?conn.map(|c| c.node.to_string()),
                  reason = s.message(), suppressed = n, "peer call refused");
        }
        Err(s)
    }

    /// The caller's node id, from its certificate; it must be an admitted
    /// member, and any id the request claims must be that same one.
    async fn authenticate<T>(&self, req: &Request<T>) -> Result<NodeId, Status> {
        let Some(conn) = req.extensions().get::<PeerConn>().cloned() else {
            return self.refuse(None, Status::unauthenticated("no TLS peer identity"));
        };
        if !self.core.cluster.in_cluster() {
            return self.refuse(
                Some(&conn),
                Status::failed_precondition("this agent is not in a cluster"),
            );
        }
        if let Some(claim) = req.metadata().get(CLAIM_HEADER) {
            let claimed = claim.to_str().ok().and_then(|c| c.parse::<NodeId>().ok());
            if claimed != Some(conn.node) {
                let claimed = claim.to_str().unwrap_or("(not text)").to_string();
                return self.refuse(
                    Some(&conn),
                    Status::permission_denied(format!(
                        "caller claims node {claimed} but its certificate is node {}",
                        conn.node
                    )),
                );
            }
        }
        if !is_member(&self.core, conn.node).await {
            return self.refuse(
                Some(&conn),
                Status::permission_denied(format!(
                    "node {} is not a member of this cluster",
                    conn.node
                )),
            );
        }
        Ok(conn.node)
    }
}

impl PeerService {
    /// An authenticated member's id and the cluster key keeper.
    async fn member_and_keeper<T>(
        &self,
        req: &Request<T>,
    ) -> Result<(NodeId, Arc<crate::cluster::KeyKeeper>), Status> {
        let caller = self.authenticate(req).await?;
        match self.cluster.keeper() {
            Some(k) => Ok((caller, k)),
            None => self.refuse(
                req.extensions().get::<PeerConn>(),
                Status::failed_precondition("this agent is not in a cluster"),
            ),
        }
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn hello(&self, req: Request<HelloRequest>) -> Result<Response<HelloResponse>, Status> {
        let conn = req.extensions().get::<PeerConn>().cloned();
        let req = req.into_inner();
        let Some(current) = self.cluster.admission() else {
            return self.refuse(
                conn.as_ref(),
                Status::failed_precondition("this agent is not in a cluster"),
            );
        };
        if self.cluster.keeper().is_some_and(|k| k.hello_on_hold()) {
            return self.refuse(
                conn.as_ref(),
                Status::unavailable(
                    "a cluster key rotation is in progress here; retry in a few seconds",
                ),
            );
        }
        let keys = current.token.admission();
        if req.cluster_id.as_slice() != keys.cluster_id.as_bytes() {
            return self.refuse(
                conn.as_ref(),
                Status::permission_denied("this agent is in a different cluster"),
            );
        }
        if req.client_nonce.len() != NONCE_LEN {
            return self.refuse(
                conn.as_ref(),
                Status::invalid_argument("client nonce must be 32 bytes"),
            );
        }
        let me = self.core.cluster.node_id();
        let tag = hmac::sign(
            &keys.proof,
            &proof_input(keys.cluster_id, &req.client_nonce, me),
        );
        self.counters.inc(Counter::HelloServed);
        debug!(peer = ?conn.as_ref().map(|c| c.remote), node = ?conn.as_ref().map(|c| c.node.to_string()), "hello answered");
        Ok(Response::new(HelloResponse {
            server_node_id: me.as_bytes().to_vec(),
            proof: tag.as_ref().to_vec(),
            // Useless without the token: sealed under it and the nonce.
            sealed_cluster_secret: keys
                .seal_secret(&req.client_nonce, &current.cluster_key.secret()),
            cluster_key_epoch: current.cluster_key.id().epoch,
            cluster_key_members: self
                .cluster
                .keeper()
                .map(|k| k.members_for_joiner())
                .unwrap_or_default(),
        }))
    }

    async fn programmed(
        &self,
        req: Request<ProgrammedRequest>,
    ) -> Result<Response<ProgrammedResponse>, Status> {
        let caller = self.authenticate(&req).await?;
        self.core.programmed(caller, req.into_inner().version);
        Ok(Response::new(ProgrammedResponse {}))
    }

    async fn pull(&self, req: Request<PullRequest>) -> Result<Response<PullResponse>, Status> {
        let caller = self.authenticate(&req).await?;
        let since = req.into_inner().since;
        let (version, full, entries) = self.core.store().delta_since(since);
        // Serve only what is on disk: a peer must never hold a version this
        // node could lose in a crash (it would then look regressed).
        if let Err(e) = self.core.persisted().await {
            return Err(Status::unavailable(format!("table not yet durable: {e}")));
        }
        self.core.served(caller, version);
        self.counters.inc(Counter::PullServed);
        Ok(Response::new(PullResponse {
            owner: self.core.cluster.node_id().as_bytes().to_vec(),
            version,
            full,
            entries,
        }))
    }

    async fn notify(
        &self,
        req: Request<NotifyRequest>,
    ) -> Result<Response<NotifyResponse>, Status> {
        let caller = self.authenticate(&req).await?;
        self.core.hint(caller, req.into_inner().version);
        Ok(Response::new(NotifyResponse {}))
    }

    async fn request_space(
        &self,
        req: Request<SpaceRequest>,
    ) -> Result<Response<SpaceGrant>, Status> {
        let caller = self.authenticate(&req).await?;
        let req = req.into_inner();
        let grant = self
            .core
            .donate_space(caller, &req.network_id, &req.exact_ip)
            .await
            .map_err(|e| match e {
                CoreError::NoNetwork(_) => Status::not_found(e.to_string()),
                CoreError::IpamExhausted(_) => Status::resource_exhausted(e.to_string()),
                CoreError::BadIp(..) | CoreError::IpInUse(..) => {
                    Status::invalid_argument(e.to_string())
                }
                _ => Status::internal(e.to_string()),
            })?;
        Ok(Response::new(SpaceGrant { grant_json: grant }))
    }

    async fn install_cluster_key(
        &self,
        req: Request<ClusterKeyMessage>,
    ) -> Result<Response<InstallClusterKeyResponse>, Status> {
        let (caller, keeper) = self.member_and_keeper(&req).await?;
        if !keeper.serves(caller) {
            return self.refuse(
                req.extensions().get::<PeerConn>(),
                Status::permission_denied(format!(
                    "node {caller} is not in this cluster key's member set"
                )),
            );
        }
        match keeper.install(caller, req.get_ref()).await {
            Ok(_) => Ok(Response::new(InstallClusterKeyResponse {})),
            Err(e) => self.refuse(
                req.extensions().get::<PeerConn>(),
                Status::invalid_argument(e.to_string()),
            ),
        }
    }

    async fn fetch_cluster_key(
        &self,
        req: Request<FetchClusterKeyRequest>,
    ) -> Result<Response<ClusterKeyMessage>, Status> {
        let (caller, keeper) = self.member_and_keeper(&req).await?;
        if !keeper.serves(caller) {
            return self.refuse(
                req.extensions().get::<PeerConn>(),
                Status::permission_denied(format!(
                    "node {caller} is not in this cluster key's member set"
                )),
            );
        }
        self.counters.inc(Counter::ClusterKeyServed);
        debug!(node = %caller, "cluster key handed to a member that missed a rotation");
        Ok(Response::new(keeper.current()))
    }
}
