//! The peer server: TLS 1.3 on 7946/tcp in front of the gRPC service.
//!
//! Accepted TCP connections are handshaken off the accept loop (bounded in
//! number and time); each finished handshake reaches tonic as a [`TlsConn`]
//! whose connect info ([`PeerConn`]) carries the caller's address and the
//! node id derived from its certificate key. Handlers read it from the
//! request extensions: the caller's identity comes from TLS, never from
//! what the request says. `Hello` is open to any certificate holder (a
//! joiner is not a member yet; its token proof is the HMAC exchange);
//! every other call needs an admitted member.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ovl_proto::peer::peer_server::Peer;
use ovl_proto::peer::{
    ClusterKeyMessage, FetchClusterKeyRequest, HelloRequest, HelloResponse,
    InstallClusterKeyResponse, NotifyRequest, NotifyResponse, ProgrammedRequest,
    ProgrammedResponse, PullRequest, PullResponse, SpaceGrant, SpaceRequest,
};
use ring::hmac;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};
use tracing::{debug, warn};

use super::tls::node_id_of_cert;
use super::{CLAIM_HEADER, NONCE_LEN, proof_input};
use crate::core::{Core, CoreError};
use crate::ids::NodeId;
use crate::membership::NodeStatus;
use crate::metrics::{Counter, Counters, RateLimit};

/// A handshake not finished by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes in flight at once; more connections are closed at once.
const MAX_HANDSHAKES: usize = 128;

/// The start of a plaintext HTTP/2 connection (RFC 9113 §3.4).
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

static TLS_REFUSE_LOG: RateLimit = RateLimit::new(Duration::from_secs(10));
static CALL_REFUSE_LOG: RateLimit = RateLimit::new(Duration::from_secs(10));

/// Who is on the other end of a peer connection.
#[derive(Debug, Clone, Copy)]
pub struct PeerConn {
    pub remote: SocketAddr,
    /// Derived from the certificate's Ed25519 key, which the handshake
    /// proved the caller holds.
    pub node: NodeId,
}

/// A TLS connection as tonic serves it.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerConn,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerConn;

    fn connect_info(&self) -> PeerConn {
        self.info
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

fn tls_refused(counters: &Counters, remote: SocketAddr, node: Option<NodeId>, reason: &str) {
    counters.inc(Counter::PeerTlsRefused);
    if let Some(suppressed) = TLS_REFUSE_LOG.check(Instant::now()) {
        match node {
            Some(node) => {
                warn!(peer = %remote, node = %node, reason, suppressed, "peer TLS connection refused")
            }
            None => warn!(peer = %remote, reason, suppressed, "peer TLS connection refused"),
        }
    }
}

async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    remote: SocketAddr,
    counters: &Counters,
) -> Option<TlsConn> {
    let _ = tcp.set_nodelay(true);
    // An agent from before TLS opens with the plaintext HTTP/2 preface;
    // say so instead of rustls's "corrupt message".
    let mut first = [0u8; HTTP2_PREFACE.len()];
    if let Ok(Ok(n)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await
        && n > 0
        && HTTP2_PREFACE.starts_with(&first[..n])
    {
        tls_refused(
            counters,
            remote,
            None,
            "plaintext HTTP/2, not TLS: an ovl agent from before the TLS peer channel?",
        );
        return None;
    }
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tls_refused(counters, remote, None, &e.to_string());
            return None;
        }
        Err(_) => {
            tls_refused(counters, remote, None, "handshake timed out");
            return None;
        }
    };
    let (_, conn) = tls.get_ref();
    // The verifier required an Ed25519 certificate; derive its node id.
    let node = match conn.peer_certificates().and_then(|c| c.first()) {
        Some(cert) => match node_id_of_cert(cert) {
            Ok(n) => n,
            Err(e) => {
                tls_refused(counters, remote, None, &e.to_string());
                return None;
            }
        },
        None => {
            tls_refused(counters, remote, None, "no client certificate");
            return None;
        }
    };
    debug!(peer = %remote, node = %node, "peer TLS connection");
    Some(TlsConn {
        inner: tls,
        info: PeerConn { remote, node },
    })
}

/// The stream of authenticated TLS connections for
/// `serve_with_incoming_shutdown`. It ends when tonic drops it.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    counters: Arc<Counters>,
) -> ReceiverStream<io::Result<TlsConn>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: back off.
                        warn!(error = %e, "peer accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tls_refused(&counters, remote, None, "too many handshakes in flight");
                continue;
            };
            let (acceptor, counters, tx) = (acceptor.clone(), counters.clone(), tx.clone());
            tokio::spawn(async move {
                let conn = handshake(acceptor, tcp, remote, &counters).await;
                drop(slot);
                if let Some(conn) = conn {
                    let _ = tx.send(Ok(conn)).await;
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

pub struct PeerService {
    core: Arc<Core>,
    counters: Arc<Counters>,
}

impl PeerService {
    pub fn new(core: Arc<Core>, counters: Arc<Counters>) -> Self {
        Self { core, counters }
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
        let Some(conn) = req.extensions().get::<PeerConn>().copied() else {
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
        let admitted = self
            .core
            .cluster
            .members()
            .await
            .iter()
            .any(|n| n.id == conn.node && !n.is_self && n.status != NodeStatus::Left);
        if !admitted {
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
        match self.core.cluster.keeper() {
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
        let conn = req.extensions().get::<PeerConn>().copied();
        let req = req.into_inner();
        let Some(current) = self.core.cluster.admission() else {
            return self.refuse(
                conn.as_ref(),
                Status::failed_precondition("this agent is not in a cluster"),
            );
        };
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
        debug!(peer = ?conn.map(|c| c.remote), node = ?conn.map(|c| c.node.to_string()), "hello answered");
        Ok(Response::new(HelloResponse {
            server_node_id: me.as_bytes().to_vec(),
            proof: tag.as_ref().to_vec(),
            // Useless without the token: sealed under it and the nonce.
            sealed_cluster_secret: keys
                .seal_secret(&req.client_nonce, &current.cluster_key.secret()),
            cluster_key_epoch: current.cluster_key.id().epoch,
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
        self.counters.inc(Counter::ClusterKeyServed);
        debug!(node = %caller, "cluster key handed to a member that missed a rotation");
        Ok(Response::new(keeper.current()))
    }
}
