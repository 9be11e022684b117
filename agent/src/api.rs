//! Local API (Unix socket, root only): translates ovlctl's gRPC requests into
//! calls on the cluster core and maps its errors to gRPC status in one place.

use std::io;
#[cfg(test)]
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ovl_proto::api::cluster_server::{Cluster as ClusterApi, ClusterServer};
use ovl_proto::api::endpoints_server::{Endpoints as EndpointsApi, EndpointsServer};
use ovl_proto::api::networks_server::{Networks as NetworksApi, NetworksServer};
use ovl_proto::api::*;
use std::time::{Duration, Instant};

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::service::InterceptorLayer;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};
use tracing::warn;

use crate::cluster::{Cluster, ClusterError};
use crate::core::{
    AttachSpec, Core, CoreError, CreateSpec, EncryptionView, EndpointInfo, NetnsRef, NetworkInfo,
};
use crate::dataplane::encrypted::{EpochInfo, Traffic};
use crate::membership::NodeView;
use crate::metrics::{Counter as Metric, Counters, RateLimit};

// A local user can trigger this as fast as it can connect.
static CALLER_REFUSE_LOG: RateLimit = RateLimit::new(Duration::from_secs(10));

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
///
/// The socket is bound inside a fresh 0700 directory next to its final
/// path, chmod-ed there, then renamed into place: it is never reachable by
/// other users even for an instant, and no process-wide umask is changed
/// (other runtime threads may be creating files at the same time).
pub fn bind_socket(path: &Path) -> Result<UnixListener, ApiError> {
    let err = |source| ApiError::Socket {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&dir)
        .map_err(err)?;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ApiError::InUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    let private = dir.join(format!(".ovl-api-bind.{}", std::process::id()));
    // A leftover from a crash between bind and rename of this same pid.
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(err)?;
    let staged = private.join("sock");
    let bound = (|| {
        let listener = std::os::unix::net::UnixListener::bind(&staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staged, path)?;
        listener.set_nonblocking(true)?;
        UnixListener::from_std(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    bound.map_err(err)
}

/// Who may call the local API: root only. The socket mode already keeps
/// others out; this is the check that still holds when the mode or the
/// directory was loosened, or the socket was passed to another process.
fn caller_allowed(uid: Option<u32>) -> Result<(), Option<u32>> {
    match uid {
        Some(0) => Ok(()),
        Some(u) => Err(Some(u)),
        // No credentials: nothing says who this is, so refuse.
        None => Err(None),
    }
}

fn check_caller(req: Request<()>, counters: &Counters) -> Result<Request<()>, Status> {
    let cred = req
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .map(|c| c.uid());
    match caller_allowed(cred) {
        Ok(()) => Ok(req),
        Err(uid) => {
            counters.inc(Metric::ApiCallerRefused);
            let who = uid.map_or_else(|| "unknown uid".to_owned(), |u| format!("uid {u}"));
            if let Some(suppressed) = CALLER_REFUSE_LOG.check(Instant::now()) {
                warn!(caller = %who, suppressed, "API call refused: caller is not root");
            }
            Err(Status::permission_denied(format!(
                "permission denied: {who} may not use the ovl API (root only)"
            )))
        }
    }
}

pub async fn serve(
    listener: UnixListener,
    core: Arc<Core>,
    cluster: Arc<Cluster>,
    counters: Arc<Counters>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ApiError> {
    tonic::transport::Server::builder()
        .layer(InterceptorLayer::new(move |req| {
            check_caller(req, &counters)
        }))
        .add_service(ClusterServer::new(Api {
            cluster: cluster.clone(),
            core: core.clone(),
        }))
        .add_service(NetworksServer::new(Api {
            cluster: cluster.clone(),
            core: core.clone(),
        }))
        .add_service(EndpointsServer::new(Api { cluster, core }))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}

struct Api {
    cluster: Arc<Cluster>,
    core: Arc<Core>,
}

fn status(e: ClusterError) -> Status {
    use ClusterError::*;
    let msg = e.to_string();
    match e {
        AlreadyClustered(_) | NotClustered => Status::failed_precondition(msg),
        Token(_) | NoSeeds | BadSeed(_) | AmbiguousNode(..) | RemoveSelf => {
            Status::invalid_argument(msg)
        }
        NoSuchNode(_) => Status::not_found(msg),
        Refused(_) => Status::permission_denied(msg),
        Unreachable(_) => Status::unavailable(msg),
        Persist(_) | Membership(_) | Random => Status::internal(msg),
    }
}

fn core_status(e: CoreError) -> Status {
    use CoreError::*;
    let msg = e.to_string();
    match e {
        NotClustered | Conflict(..) | InUse { .. } | NotLocal(..) => {
            Status::failed_precondition(msg)
        }
        // A mode this host cannot carry: the operator's setup, not a fault.
        Dataplane(crate::dataplane::DataplaneError::NoVtep { .. }) => {
            Status::failed_precondition(msg)
        }
        Invalid(_) | NetnsArgs | BadIp(..) | BadMac(_) | BadIfname(_) | BadEndpointName(_)
        | TooManyAliases(_) => Status::invalid_argument(msg),
        NameTaken(_) | VniTaken(..) | EndpointExists(..) | IpInUse(..) | MacInUse(..) => {
            Status::already_exists(msg)
        }
        NoNetwork(_) | NoEndpoint(..) | NoPid(_) => Status::not_found(msg),
        NetnsRefused(_, crate::dataplane::NsRefusal::Missing) => Status::not_found(msg),
        NetnsRefused(_, crate::dataplane::NsRefusal::PermissionDenied) => {
            Status::permission_denied(msg)
        }
        NetnsRefused(..) => Status::invalid_argument(msg),
        NoVni | PoolExhausted(_) | IpamExhausted(_) => Status::resource_exhausted(msg),
        IpamUnreachable(..) => Status::unavailable(msg),
        Ipam(..) | Dataplane(_) | Store(_) | Random => Status::internal(msg),
    }
}

fn network(n: &NetworkInfo) -> Network {
    let r = &n.view.record;
    Network {
        id: n.view.id.to_string(),
        name: r.name.clone(),
        vni: n.view.vni.get(),
        subnet: r.subnet.clone(),
        gateway: r.gateway.clone(),
        ip_range: r.ip_range.clone(),
        mtu: n.mtu.mtu,
        path_mtu: n.mtu.limit.mtu,
        mtu_warning: if n.mtu.exceeds_path {
            format!(
                "--mtu {} exceeds what {}'s data path carries ({}): full-size packets to it are lost",
                n.mtu.mtu, n.limit_host, n.mtu.limit.mtu
            )
        } else {
            String::new()
        },
        encrypted: r.encrypted,
        attachable: r.attachable,
        internal: r.internal,
        labels: r.labels.clone(),
        created_by: n.view.creator.map(|c| c.to_string()).unwrap_or_default(),
        created_at_ms: r.created_at_ms,
        state: if n.view.is_active() {
            "active"
        } else {
            "conflict"
        }
        .into(),
        reason: n.view.conflict.clone().unwrap_or_default(),
        endpoints: n.endpoints as u32,
    }
}

fn endpoint(e: &EndpointInfo) -> Endpoint {
    let v = &e.view;
    Endpoint {
        network: e.network_name.clone(),
        network_id: v.network.to_string(),
        name: v.name.clone(),
        id: v.id.to_string(),
        ip: v.ip.to_string(),
        mac: v.mac.to_string(),
        node: v.owner.to_string(),
        node_name: e.node_name.clone(),
        vtep: v.vtep.to_string(),
        aliases: v.record.aliases.clone(),
        status: e.status.to_string(),
        ifname: v.record.ifname.clone(),
        lagging: e.lagging.clone(),
        resolver: e.resolver.map(|r| r.to_string()).unwrap_or_default(),
    }
}

fn traffic(t: &Traffic) -> TrafficCounters {
    TrafficCounters {
        packets_in: t.packets_in,
        bytes_in: t.bytes_in,
        packets_out: t.packets_out,
        bytes_out: t.bytes_out,
        drops: t
            .drops
            .iter()
            .map(|(why, value)| Counter {
                name: why.name().to_string(),
                value: *value,
            })
            .collect(),
    }
}

fn key_epoch(e: &EpochInfo) -> KeyEpoch {
    KeyEpoch {
        epoch: e.epoch,
        send_fingerprint: format!("{:08x}", e.send_fingerprint),
        recv_fingerprint: format!("{:08x}", e.recv_fingerprint),
        sent: e.sent,
    }
}

fn encryption_state(v: &EncryptionView) -> EncryptionState {
    EncryptionState {
        engine: v.engine,
        now_ms: v.now_ms,
        rotation_ms: v.rotation_ms,
        current_epoch: v.current_epoch,
        next_rotation_ms: v.next_rotation_ms,
        traffic: v.traffic.as_ref().map(traffic),
        peers: v
            .peers
            .iter()
            .map(|p| {
                let s = p.engine.as_ref();
                EncryptedPeer {
                    node_id: p.node.to_string(),
                    node_name: p.name.clone(),
                    known: s.is_some(),
                    addr: s
                        .and_then(|s| s.addr)
                        .map(|a| a.to_string())
                        .unwrap_or_default(),
                    epoch_in_use: s.and_then(|s| s.epoch_in_use),
                    in_use: s.and_then(|s| s.in_use.as_ref()).map(key_epoch),
                    epochs: s
                        .map(|s| s.epochs.iter().map(key_epoch).collect())
                        .unwrap_or_default(),
                    traffic: s.map(|s| traffic(&s.traffic)),
                }
            })
            .collect(),
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

    async fn remove_node(
        &self,
        req: Request<RemoveNodeRequest>,
    ) -> Result<Response<RemoveNodeResponse>, Status> {
        let (node, join_token) = self
            .cluster
            .remove_node(&req.into_inner().node)
            .await
            .map_err(status)?;
        Ok(Response::new(RemoveNodeResponse {
            node_id: node.id.to_string(),
            name: node.name,
            join_token,
        }))
    }

    async fn rotate_token(
        &self,
        _: Request<RotateTokenRequest>,
    ) -> Result<Response<JoinTokenResponse>, Status> {
        let join_token = self.cluster.rotate_token().await.map_err(status)?;
        Ok(Response::new(JoinTokenResponse { join_token }))
    }

    async fn leave(&self, _: Request<LeaveRequest>) -> Result<Response<LeaveResponse>, Status> {
        self.core.leave().await.map_err(core_status)?;
        self.cluster.leave().await.map_err(status)?;
        Ok(Response::new(LeaveResponse {}))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let s = self.cluster.status().await;
        let cfg = self.cluster.config();
        let alive = crate::cluster::alive_count(&s.nodes);
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
            cluster_key: s.cluster_key.map(|k| k.to_string()).unwrap_or_default(),
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

#[tonic::async_trait]
impl NetworksApi for Api {
    async fn create(
        &self,
        req: Request<CreateNetworkRequest>,
    ) -> Result<Response<Network>, Status> {
        let r = req.into_inner();
        let info = self
            .core
            .network_create(CreateSpec {
                name: r.name,
                subnet: r.subnet,
                gateway: r.gateway,
                ip_range: r.ip_range,
                vni: r.vni,
                mtu: r.mtu,
                encrypted: r.encrypted,
                attachable: r.attachable,
                internal: r.internal,
                labels: r.labels,
            })
            .await
            .map_err(core_status)?;
        Ok(Response::new(network(&info)))
    }

    async fn list(
        &self,
        _: Request<ListNetworksRequest>,
    ) -> Result<Response<ListNetworksResponse>, Status> {
        let networks = self.core.network_list().await.iter().map(network).collect();
        Ok(Response::new(ListNetworksResponse { networks }))
    }

    async fn inspect(
        &self,
        req: Request<InspectNetworkRequest>,
    ) -> Result<Response<NetworkDetail>, Status> {
        let name = req.into_inner().name;
        let info = self.core.network_info(&name).await.map_err(core_status)?;
        let hosts = self.core.network_peers(&info.view).await;
        let encryption = self
            .core
            .network_encryption(&info.view, &hosts)
            .as_ref()
            .map(encryption_state);
        let peers = hosts
            .into_iter()
            .map(|p| NetworkPeer {
                node_id: p.node.to_string(),
                node_name: p.name,
                vtep: p.vtep,
                status: p.status.to_string(),
                endpoints: p.endpoints as u32,
                ranges: p.ranges,
                data_path_mtu: p.data_path_mtu,
            })
            .collect();
        let endpoints = self
            .core
            .endpoints(&info.view.id.to_string())
            .await
            .map_err(core_status)?
            .iter()
            .map(endpoint)
            .collect();
        Ok(Response::new(NetworkDetail {
            network: Some(network(&info)),
            peers,
            endpoints,
            encryption,
        }))
    }

    async fn remove(
        &self,
        req: Request<RemoveNetworkRequest>,
    ) -> Result<Response<RemoveNetworkResponse>, Status> {
        let r = req.into_inner();
        let id = self
            .core
            .network_remove(&r.name, r.force)
            .await
            .map_err(core_status)?;
        Ok(Response::new(RemoveNetworkResponse { id: id.to_string() }))
    }

    async fn fdb(&self, req: Request<FdbRequest>) -> Result<Response<FdbResponse>, Status> {
        let (local, rows) = self
            .core
            .fdb(&req.into_inner().name)
            .await
            .map_err(core_status)?;
        Ok(Response::new(FdbResponse {
            local,
            entries: rows
                .into_iter()
                .map(|r| FdbEntry {
                    kind: r.kind.into(),
                    mac: r.mac,
                    ip: r.ip,
                    vtep: r.vtep,
                    state: r.state.into(),
                })
                .collect(),
        }))
    }

    async fn peers(&self, _: Request<PeersRequest>) -> Result<Response<EncryptionState>, Status> {
        let v = self.core.encrypted_peers().await.map_err(core_status)?;
        Ok(Response::new(encryption_state(&v)))
    }
}

#[tonic::async_trait]
impl EndpointsApi for Api {
    async fn attach(&self, req: Request<AttachRequest>) -> Result<Response<Endpoint>, Status> {
        let r = req.into_inner();
        let netns = match (r.netns.is_empty(), r.pid) {
            (false, 0) => NetnsRef::Path(r.netns),
            (true, pid) if pid != 0 => NetnsRef::Pid(pid),
            _ => return Err(core_status(CoreError::NetnsArgs)),
        };
        let info = self
            .core
            .attach(AttachSpec {
                network: r.network,
                netns,
                name: r.name,
                ip: r.ip,
                mac: r.mac,
                aliases: r.aliases,
                ifname: r.ifname,
                reserved: None,
            })
            .await
            .map_err(core_status)?;
        Ok(Response::new(endpoint(&info)))
    }

    async fn detach(
        &self,
        req: Request<DetachRequest>,
    ) -> Result<Response<DetachResponse>, Status> {
        let r = req.into_inner();
        let (id, lagging) = self
            .core
            .detach(&r.network, &r.name)
            .await
            .map_err(core_status)?;
        Ok(Response::new(DetachResponse {
            id: id.to_string(),
            lagging,
        }))
    }

    async fn check(
        &self,
        req: Request<CheckEndpointRequest>,
    ) -> Result<Response<CheckEndpointResponse>, Status> {
        let r = req.into_inner();
        let problems = self
            .core
            .check_endpoint(&r.network, &r.name)
            .await
            .map_err(core_status)?;
        Ok(Response::new(CheckEndpointResponse { problems }))
    }

    async fn list(
        &self,
        req: Request<ListEndpointsRequest>,
    ) -> Result<Response<ListEndpointsResponse>, Status> {
        let eps = self
            .core
            .endpoints(&req.into_inner().network)
            .await
            .map_err(core_status)?;
        Ok(Response::new(ListEndpointsResponse {
            endpoints: eps.iter().map(endpoint).collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_root_callers_pass() {
        assert_eq!(caller_allowed(Some(0)), Ok(()));
        assert_eq!(caller_allowed(Some(65534)), Err(Some(65534)));
        assert_eq!(caller_allowed(Some(1000)), Err(Some(1000)));
        assert_eq!(caller_allowed(None), Err(None));
    }

    #[tokio::test]
    async fn socket_is_owner_only_and_not_replaced_while_served() {
        let dir = std::env::temp_dir().join(format!("ovl-api-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub/ovl.sock");
        let listener = bind_socket(&path).expect("bind");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
        // The staging directory is gone: only the socket is left.
        let names: Vec<_> = std::fs::read_dir(path.parent().expect("parent"))
            .expect("readdir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("ovl.sock")]);
        // Reachable at its final path after the rename.
        let client = tokio::net::UnixStream::connect(&path)
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        assert_eq!(server.peer_cred().expect("cred").uid(), own_uid());
        drop(client);
        assert!(matches!(bind_socket(&path), Err(ApiError::InUse(_))));
        drop(listener);
        drop(server);
        // A stale socket (no one serving) is replaced.
        let again = bind_socket(&path).expect("rebind over a stale socket");
        drop(again);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn own_uid() -> u32 {
        std::fs::metadata("/proc/self")
            .expect("stat /proc/self")
            .uid()
    }
}
