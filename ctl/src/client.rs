//! Connection to the agent's Unix socket.

use std::path::Path;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

pub async fn connect(socket: &Path) -> Result<Channel, String> {
    let path = socket.to_owned();
    let shown = socket.display().to_string();
    // The URI is required by the API but unused: the connector dials the socket.
    let endpoint = Endpoint::from_static("http://agent.local");
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .map_err(|e| {
            if denied(&e) {
                return format!(
                    "permission denied: cannot open the agent's socket {shown} (root only: run ovlctl as root)"
                );
            }
            let cause = std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_else(|| e.to_string());
            format!(
                "cannot reach the agent at {shown}: {cause} (is ovl-agent running? see --socket)"
            )
        })?;
    Ok(channel)
}

/// Whether the dial failed on the socket's permissions (EACCES/EPERM), as
/// opposed to a missing socket or an agent that is not running.
fn denied(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::PermissionDenied;
        }
        cur = err.source();
    }
    false
}

/// Awaits a call and turns a gRPC status into the agent's own message.
pub async fn call<T>(
    fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    fut.await.map(|r| r.into_inner()).map_err(|s| {
        if s.code() == tonic::Code::PermissionDenied
            && !s.message().starts_with("permission denied")
        {
            format!("permission denied: {}", s.message())
        } else if s.message().is_empty() {
            format!("agent answered {:?}", s.code())
        } else {
            s.message().to_string()
        }
    })
}
