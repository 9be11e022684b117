//! Local API (Unix socket, root only): translates ovlctl's gRPC requests into
//! calls on the cluster core and maps its errors to gRPC status in one place.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ovl_proto::api::cluster_server::{Cluster as ClusterApi, ClusterServer};
use ovl_proto::api::*;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use crate::cluster::{Cluster, ClusterError};
use crate::membership::NodeView;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("another agent is already serving on {0}")]
    InUse(PathBuf),
    #[error("prepare API socket {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("API server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Binds the API socket (mode 0600), replacing a stale one left by a crash
/// but never the socket of a running agent.
pub fn bind_socket(path: &Path) -> Result<UnixListener, ApiError> {
    let err = |source| ApiError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(err)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ApiError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

pub async fn serve(
    listener: UnixListener,
    cluster: Arc<Cluster>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ApiError> {
    tonic::transport::Server::builder()
        .add_service(ClusterServer::new(Api { cluster }))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

struct Api {
    cluster: Arc<Cluster>,
}

fn status(e: ClusterError) -> Status {
    use ClusterError::*;
    let msg = e.to_string();
    match e {
        AlreadyClustered(_) | NotClustered => Status::failed_precondition(msg),
        Token(_) | NoSeeds | BadSeed(_) => Status::invalid_argument(msg),
        Refused(_) => Status::permission_denied(msg),
        Unreachable(_) => Status::unavailable(msg),
        Persist(_) | Membership(_) | Random => Status::internal(msg),
    }
}

fn node(n: NodeView) -> Node {
    Node {
        id: n.id.to_string(),
        name: n.name,
        advertise_addr: n.advertise_addr,
        data_path_addr: n.data_path_addr,
        gossip_addr: n.gossip_addr.to_string(),
        status: n.status.as_str().to_string(),
        generation: n.generation,
        is_self: n.is_self,
    }
}

#[tonic::async_trait]
impl ClusterApi for Api {
    async fn init(&self, _: Request<InitRequest>) -> Result<Response<InitResponse>, Status> {
        let (id, token) = self.cluster.init().await.map_err(status)?;
        Ok(Response::new(InitResponse {
            cluster_id: id.to_string(),
            join_token: token,
            node_id: self.cluster.node_id().to_string(),
        }))
    }

    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        let req = req.into_inner();
        let (id, via) = self
            .cluster
            .join(&req.join_token, &req.seeds)
            .await
            .map_err(status)?;
        Ok(Response::new(JoinResponse {
            cluster_id: id.to_string(),
            node_id: self.cluster.node_id().to_string(),
            via: via.to_string(),
        }))
    }

    async fn join_token(
        &self,
        _: Request<JoinTokenRequest>,
    ) -> Result<Response<JoinTokenResponse>, Status> {
        let join_token = self.cluster.join_token().await.map_err(status)?;
        Ok(Response::new(JoinTokenResponse { join_token }))
    }

    async fn leave(&self, _: Request<LeaveRequest>) -> Result<Response<LeaveResponse>, Status> {
        self.cluster.leave().await.map_err(status)?;
        Ok(Response::new(LeaveResponse {}))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let s = self.cluster.status().await;
        let cfg = self.cluster.config();
        let alive = s
            .nodes
            .iter()
            .filter(|n| n.status == crate::membership::NodeStatus::Alive)
            .count();
        Ok(Response::new(StatusResponse {
            node_id: s.node_id.to_string(),
            node_name: s.node_name,
            state: s.state.to_string(),
            reason: s.reason,
            cluster_id: s.cluster_id.map(|c| c.to_string()).unwrap_or_default(),
            advertise_addr: cfg.advertise_addr.to_string(),
            data_path_addr: cfg.data_path_addr.to_string(),
            gossip_addr: cfg.gossip_addr().to_string(),
            generation: s.generation,
            nodes_alive: alive as u32,
            nodes_total: s.nodes.len() as u32,
            counters: self
                .cluster
                .counters()
                .snapshot()
                .into_iter()
                .map(|(name, value)| Counter {
                    name: name.to_string(),
                    value,
                })
                .collect(),
        }))
    }

    async fn nodes(&self, _: Request<NodesRequest>) -> Result<Response<NodesResponse>, Status> {
        let nodes = self.cluster.nodes().await.map_err(status)?;
        Ok(Response::new(NodesResponse {
            nodes: nodes.into_iter().map(node).collect(),
        }))
    }
}
