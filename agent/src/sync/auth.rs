//! Authentication of peer calls, both ways, bound to the bodies.
//!
//! Request: the caller sends its node id, the time, and
//! `HMAC(peer key, "ovl peer call v2" | method | node | time | SHA-256(body))`.
//! Response: the callee answers with its node id and
//! `HMAC(peer key, "ovl peer reply v2" | method | node | request MAC | SHA-256(body))`,
//! so a reply is bound to the exact request it answers and can be neither
//! forged, altered, nor replayed from another call by anyone without the
//! join token. Bodies are hashed as prost encodes them; maps are generated
//! as `BTreeMap`, so the encoding is canonical on both sides. The time
//! window (60 s) bounds request replays: Pull is read-only, Notify only
//! triggers a pull, and a replayed RequestSpace can only move free space
//! between members.

use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;
use ring::{digest, hmac};
use tonic::metadata::MetadataMap;

use crate::ids::{NodeId, decode_hex, encode_hex};
use crate::token::ClusterKeys;

const CALL: &[u8] = b"ovl peer call v2";
const REPLY: &[u8] = b"ovl peer reply v2";
const NODE: &str = "ovl-node";
const TIME: &str = "ovl-time";
const MAC: &str = "ovl-mac";
const WINDOW_MS: u64 = 60_000;

pub type Mac = [u8; 32];

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn body_hash(body: &impl Message) -> digest::Digest {
    digest::digest(&digest::SHA256, &body.encode_to_vec())
}

/// Length-prefixed concatenation: no two part lists encode alike.
fn message(parts: &[&[u8]]) -> Vec<u8> {
    let mut m = Vec::with_capacity(parts.iter().map(|p| p.len() + 4).sum());
    for p in parts {
        m.extend_from_slice(&(p.len() as u32).to_be_bytes());
        m.extend_from_slice(p);
    }
    m
}

fn sign(keys: &ClusterKeys, parts: &[&[u8]]) -> Mac {
    let mut out = [0u8; 32];
    out.copy_from_slice(hmac::sign(&keys.peer_auth, &message(parts)).as_ref());
    out
}

/// Constant-time check of `mac` over `parts`.
fn check(keys: &ClusterKeys, parts: &[&[u8]], mac: &Mac) -> Result<(), AuthError> {
    hmac::verify(&keys.peer_auth, &message(parts), mac).map_err(|_| AuthError::BadMac)
}

fn put(md: &mut MetadataMap, key: &'static str, value: String) {
    // Hex and decimal strings are always valid ASCII metadata.
    if let Ok(v) = value.parse() {
        md.insert(key, v);
    }
}

fn get<'a>(md: &'a MetadataMap, key: &str) -> Result<&'a str, AuthError> {
    md.get(key)
        .and_then(|v| v.to_str().ok())
        .ok_or(AuthError::Malformed)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing or malformed peer credentials")]
    Malformed,
    #[error("peer credentials outside the time window (replay or clock skew)")]
    Stale,
    #[error("peer credentials do not verify under the cluster key")]
    BadMac,
    #[error("answered by node {0}, not the node called")]
    WrongPeer(NodeId),
}

/// Stamps a request; returns its MAC, which the reply must be bound to.
pub fn stamp_request<M: Message>(
    req: &mut tonic::Request<M>,
    keys: &ClusterKeys,
    me: NodeId,
    method: &str,
) -> Mac {
    let ts = now_ms();
    let hash = body_hash(req.get_ref());
    let mac = sign(
        keys,
        &[
            CALL,
            method.as_bytes(),
            me.as_bytes(),
            &ts.to_be_bytes(),
            hash.as_ref(),
        ],
    );
    let md = req.metadata_mut();
    put(md, NODE, me.to_string());
    put(md, TIME, ts.to_string());
    put(md, MAC, encode_hex(&mac));
    mac
}

/// Verifies a request; returns the caller and the request MAC.
pub fn verify_request<M: Message>(
    req: &tonic::Request<M>,
    keys: &ClusterKeys,
    method: &str,
) -> Result<(NodeId, Mac), AuthError> {
    let md = req.metadata();
    let node: NodeId = get(md, NODE)?.parse().map_err(|_| AuthError::Malformed)?;
    let ts: u64 = get(md, TIME)?.parse().map_err(|_| AuthError::Malformed)?;
    let mac = decode_hex::<32>(get(md, MAC)?).map_err(|_| AuthError::Malformed)?;
    if now_ms().abs_diff(ts) > WINDOW_MS {
        return Err(AuthError::Stale);
    }
    let hash = body_hash(req.get_ref());
    check(
        keys,
        &[
            CALL,
            method.as_bytes(),
            node.as_bytes(),
            &ts.to_be_bytes(),
            hash.as_ref(),
        ],
        &mac,
    )?;
    Ok((node, mac))
}

/// Stamps a reply to the request whose MAC is `request_mac`.
pub fn stamp_response<M: Message>(
    resp: &mut tonic::Response<M>,
    keys: &ClusterKeys,
    me: NodeId,
    method: &str,
    request_mac: &Mac,
) {
    let hash = body_hash(resp.get_ref());
    let mac = sign(
        keys,
        &[
            REPLY,
            method.as_bytes(),
            me.as_bytes(),
            request_mac,
            hash.as_ref(),
        ],
    );
    let md = resp.metadata_mut();
    put(md, NODE, me.to_string());
    put(md, MAC, encode_hex(&mac));
}

/// Verifies that `resp` comes from `peer` and answers our request.
pub fn verify_response<M: Message>(
    resp: &tonic::Response<M>,
    keys: &ClusterKeys,
    method: &str,
    peer: NodeId,
    request_mac: &Mac,
) -> Result<(), AuthError> {
    let md = resp.metadata();
    let node: NodeId = get(md, NODE)?.parse().map_err(|_| AuthError::Malformed)?;
    let mac = decode_hex::<32>(get(md, MAC)?).map_err(|_| AuthError::Malformed)?;
    let hash = body_hash(resp.get_ref());
    check(
        keys,
        &[
            REPLY,
            method.as_bytes(),
            node.as_bytes(),
            request_mac,
            hash.as_ref(),
        ],
        &mac,
    )?;
    if node != peer {
        return Err(AuthError::WrongPeer(node));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::JoinToken;
    use ovl_proto::peer::{PullRequest, PullResponse};
    use ring::rand::SystemRandom;

    fn setup() -> (ClusterKeys, ClusterKeys, NodeId, NodeId) {
        let rng = SystemRandom::new();
        (
            JoinToken::generate(&rng).unwrap().keys(),
            JoinToken::generate(&rng).unwrap().keys(),
            NodeId::random(&rng).unwrap(),
            NodeId::random(&rng).unwrap(),
        )
    }

    #[test]
    fn requests_verify_only_with_the_same_key_method_and_body() {
        let (k1, k2, me, _) = setup();
        let mut req = tonic::Request::new(PullRequest { since: 5 });
        let mac = stamp_request(&mut req, &k1, me, "pull");
        assert_eq!(verify_request(&req, &k1, "pull"), Ok((me, mac)));
        assert_eq!(verify_request(&req, &k1, "notify"), Err(AuthError::BadMac));
        assert_eq!(verify_request(&req, &k2, "pull"), Err(AuthError::BadMac));
        req.get_mut().since = 0;
        assert_eq!(verify_request(&req, &k1, "pull"), Err(AuthError::BadMac));
        let bare = tonic::Request::new(PullRequest { since: 5 });
        assert_eq!(
            verify_request(&bare, &k1, "pull"),
            Err(AuthError::Malformed)
        );
        let mut old = tonic::Request::new(PullRequest { since: 5 });
        stamp_request(&mut old, &k1, me, "pull");
        put(
            old.metadata_mut(),
            TIME,
            (now_ms() - WINDOW_MS - 1000).to_string(),
        );
        assert_eq!(verify_request(&old, &k1, "pull"), Err(AuthError::Stale));
    }

    #[test]
    fn replies_are_bound_to_their_request_peer_and_body() {
        let (k1, k2, me, peer) = setup();
        let mut req = tonic::Request::new(PullRequest { since: 1 });
        let req_mac = stamp_request(&mut req, &k1, me, "pull");
        let body = PullResponse {
            owner: peer.as_bytes().to_vec(),
            version: 3,
            full: false,
            entries: vec![],
        };
        let mut resp = tonic::Response::new(body.clone());
        stamp_response(&mut resp, &k1, peer, "pull", &req_mac);
        assert_eq!(verify_response(&resp, &k1, "pull", peer, &req_mac), Ok(()));
        assert_eq!(
            verify_response(&resp, &k1, "pull", me, &req_mac),
            Err(AuthError::WrongPeer(peer))
        );
        assert_eq!(
            verify_response(&resp, &k2, "pull", peer, &req_mac),
            Err(AuthError::BadMac)
        );
        assert_eq!(
            verify_response(&resp, &k1, "pull", peer, &[0u8; 32]),
            Err(AuthError::BadMac)
        );
        resp.get_mut().version = 4;
        assert_eq!(
            verify_response(&resp, &k1, "pull", peer, &req_mac),
            Err(AuthError::BadMac)
        );
        let bare = tonic::Response::new(body);
        assert_eq!(
            verify_response(&bare, &k1, "pull", peer, &req_mac),
            Err(AuthError::Malformed)
        );
    }
}
