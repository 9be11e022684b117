//! Serves Docker's plugin calls (HTTP/1.1 POSTs with JSON bodies) on a
//! unix socket with hyper. Only root can connect (mode 0600, like the
//! agent's API socket): dockerd runs as root. Connections and request
//! bodies are bounded, so a stuck or hostile client holds little.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use super::Plugin;
use super::protocol::CONTENT_TYPE;
use crate::metrics::{Counter, RateLimit};

/// dockerd's calls at once (it starts containers in parallel); more wait
/// in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 64;
/// The largest request body: Docker's are well under a kilobyte.
const MAX_BODY: usize = 64 * 1024;
/// A connection lives at most this long (a Join waits for the peers'
/// programming, about a second).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

static ACCEPT_LOG: RateLimit = RateLimit::new(Duration::from_secs(30));

/// Binds the plugin socket before the agent joins, like its other
/// sockets: a live socket at the path fails the start.
pub fn bind(path: &Path) -> Result<UnixListener, crate::api::ApiError> {
    crate::api::bind_socket(path)
}

/// Serves until the task is dropped; accept errors are retried.
pub async fn serve(listener: UnixListener, plugin: Arc<Plugin>) {
    if let Ok(addr) = listener.local_addr()
        && let Some(p) = addr.as_pathname()
    {
        info!(socket = %p.display(), "serving the Docker network and IPAM plugin \"ovl\"");
    }
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                if let Some(n) = ACCEPT_LOG.check(Instant::now()) {
                    warn!(error = %e, suppressed = n, "Docker plugin socket: accept failed");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let plugin = plugin.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| respond(plugin.clone(), req));
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
            drop(permit);
        });
    }
}

async fn respond(
    plugin: Arc<Plugin>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let call = req.uri().path().to_string();
    let reply = if req.method() != Method::POST {
        plugin.core.counters.inc(Counter::DockerRefused);
        serde_json::json!({"Err": "plugin calls are POST"})
    } else {
        match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(body) => plugin.handle(&call, &body.to_bytes()).await,
            Err(e) => {
                plugin.core.counters.inc(Counter::DockerRefused);
                serde_json::json!({"Err": format!("request body: {e}")})
            }
        }
    };
    let mut resp = Response::new(Full::new(Bytes::from(reply.to_string())));
    // Docker reads `Err` from the body whatever the status; a non-200
    // status makes its client report the failure too.
    if reply.get("Err").is_some() {
        *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    }
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(CONTENT_TYPE),
    );
    Ok(resp)
}
