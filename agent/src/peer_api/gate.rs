//! The peer API's gate: runs on each call's headers, before tonic decodes
//! a byte of its body (issue 8). It refuses a non-member's call to any
//! method but `Hello` from the TLS identity alone, and caps each method's
//! request body at what that method can need, so a stranger cannot make
//! the agent buffer and decode megabytes it is about to refuse.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use http_body::{Frame, SizeHint};
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::Bytes;
use tonic::server::NamedService;
use tower::Service;
use tracing::warn;

use crate::core::Core;
use crate::metrics::{Counter, Counters, RateLimit};
use crate::peer::PeerConn;

static GATE_LOG: RateLimit = RateLimit::new(Duration::from_secs(10));

/// The gRPC length-prefixed message header (5 bytes: flag and length).
const GRPC_FRAME_HEADER: usize = 5;

/// What a method accepts before its body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// The method name, for logs.
    pub method: &'static str,
    /// Only admitted members may call it (all but `Hello`, which a joiner
    /// calls before it is one).
    pub members_only: bool,
    /// Largest request message, in bytes of protobuf.
    pub max_request: usize,
}

/// The rule for a request path (`/ovl.peer.v1.Peer/Method`). An unknown
/// method is members-only with the smallest cap; tonic answers it
/// `Unimplemented`.
pub fn rule_for(path: &str) -> Rule {
    let method = path.rsplit('/').next().unwrap_or("");
    let (method, members_only, max_request) = match method {
        // A cluster id and a 32-byte nonce.
        "Hello" => ("Hello", false, 1024),
        // One u64 each (or nothing).
        "Pull" => ("Pull", true, 64),
        "Notify" => ("Notify", true, 64),
        "Programmed" => ("Programmed", true, 64),
        "FetchClusterKey" => ("FetchClusterKey", true, 64),
        // A network id and an address text.
        "RequestSpace" => ("RequestSpace", true, 1024),
        // A key plus the removed and member id lists: 32 bytes and a few
        // of framing per node, room for a few thousand nodes.
        "InstallClusterKey" => ("InstallClusterKey", true, 256 * 1024),
        _ => ("(unknown)", true, 64),
    };
    Rule {
        method,
        members_only,
        max_request,
    }
}

/// Wraps the peer service; see the module comment.
#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    core: Arc<Core>,
    counters: Arc<Counters>,
}

impl<S> Gate<S> {
    pub fn new(inner: S, core: Arc<Core>, counters: Arc<Counters>) -> Self {
        Self {
            inner,
            core,
            counters,
        }
    }
}

impl<S: NamedService> NamedService for Gate<S> {
    const NAME: &'static str = S::NAME;
}

fn log_refusal(conn: Option<&PeerConn>, method: &str, reason: &str) {
    if let Some(suppressed) = GATE_LOG.check(Instant::now()) {
        warn!(peer = ?conn.map(|c| c.remote), node = ?conn.map(|c| c.node.to_string()),
              method, reason, suppressed, "peer call refused before its body was read");
    }
}

impl<S> Service<http::Request<Body>> for Gate<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // The clone is not ready; keep the one poll_ready readied (tower's
        // usual swap).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (core, counters) = (self.core.clone(), self.counters.clone());
        Box::pin(async move {
            let rule = rule_for(req.uri().path());
            let conn = req.extensions().get::<PeerConn>().cloned();
            // The call counts against the idle timeout until it is answered.
            let _call = conn.as_ref().map(|c| c.calls.begin());
            if rule.members_only {
                let member = match &conn {
                    Some(c) => super::is_member(&core, c.node).await,
                    None => false,
                };
                if !member {
                    // peer_call_refused stays the total of refused calls.
                    counters.inc(Counter::PeerRefused);
                    counters.inc(Counter::PeerGateNotMember);
                    log_refusal(conn.as_ref(), rule.method, "caller is not a member");
                    let who = conn.map_or("unknown".into(), |c| c.node.to_string());
                    return Ok(Status::permission_denied(format!(
                        "node {who} is not a member of this cluster"
                    ))
                    .into_http());
                }
            }
            let (parts, body) = req.into_parts();
            let body = Body::new(Capped {
                inner: body,
                left: rule.max_request + GRPC_FRAME_HEADER,
                rule,
                conn,
                counters,
            });
            inner.call(http::Request::from_parts(parts, body)).await
        })
    }
}

/// A request body that fails once more than `left` bytes arrive; the
/// first frame over the cap is refused, not buffered.
struct Capped {
    inner: Body,
    left: usize,
    rule: Rule,
    conn: Option<PeerConn>,
    counters: Arc<Counters>,
}

impl http_body::Body for Capped {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(f)) = &frame
            && let Some(data) = f.data_ref()
        {
            if data.len() > self.left {
                self.counters.inc(Counter::PeerRefused);
                self.counters.inc(Counter::PeerRequestTooLarge);
                log_refusal(self.conn.as_ref(), self.rule.method, "request too large");
                return Poll::Ready(Some(Err(Status::resource_exhausted(format!(
                    "request too large: {} requests are at most {} bytes",
                    self.rule.method, self.rule.max_request
                )))));
            }
            self.left -= data.len();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hello_is_open_and_every_method_has_a_small_cap() {
        let open: Vec<_> = [
            "Hello",
            "Pull",
            "Notify",
            "Programmed",
            "FetchClusterKey",
            "RequestSpace",
            "InstallClusterKey",
            "Nope",
        ]
        .iter()
        .map(|m| rule_for(&format!("/ovl.peer.v1.Peer/{m}")))
        .filter(|r| !r.members_only)
        .map(|r| r.method)
        .collect();
        assert_eq!(open, vec!["Hello"]);
        assert_eq!(rule_for("/ovl.peer.v1.Peer/Pull").max_request, 64);
        assert_eq!(rule_for("").method, "(unknown)");
        assert!(rule_for("/x/Hello").max_request <= 1024);
    }
}
