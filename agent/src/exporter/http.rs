//! Serves `GET /metrics` over HTTP/1.1 with hyper. Anything else is 404
//! (wrong path) or 405 (wrong method). Connections are bounded in number
//! and in lifetime: the endpoint has no authentication (it shows counts,
//! never keys or addresses of endpoints), so keep it on loopback or a
//! management network.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::core::Core;
use crate::metrics::RateLimit;

/// Scrapers at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 8;
/// A connection (keep-alive included) lives at most this long, so a
/// client that sends nothing cannot hold a slot.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

static ACCEPT_LOG: RateLimit = RateLimit::new(Duration::from_secs(30));

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("bind metrics endpoint {0}/tcp: {1}")]
    Bind(SocketAddr, std::io::Error),
}

/// Binds before the agent joins, like every other socket: a taken port
/// fails the start.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| MetricsError::Bind(addr, e))
}

/// Serves until the task is dropped. Accept errors (out of fds) are
/// logged and retried after a pause, never fatal.
pub async fn serve(listener: TcpListener, core: Arc<Core>) {
    if let Ok(addr) = listener.local_addr() {
        info!(addr = %addr, "serving Prometheus metrics at /metrics");
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
                    warn!(error = %e, suppressed = n, "metrics endpoint: accept failed");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let core = core.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| respond(core.clone(), req));
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            // Errors here are the client's (reset, garbage): nothing to do.
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
            drop(permit);
        });
    }
}

async fn respond(
    core: Arc<Core>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET | &Method::HEAD, "/metrics") => (StatusCode::OK, super::scrape(&core).await),
        (_, "/metrics") => (StatusCode::METHOD_NOT_ALLOWED, "GET /metrics\n".into()),
        _ => (StatusCode::NOT_FOUND, "metrics are at /metrics\n".into()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let ctype = if status == StatusCode::OK {
        CONTENT_TYPE
    } else {
        "text/plain; charset=utf-8"
    };
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    Ok(resp)
}
