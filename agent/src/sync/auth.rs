//! Authentication of peer calls: the caller stamps each request with its
//! node id, the time, and an HMAC of both and the method under the cluster's
//! peer key. A process without the join token cannot read tables or ask for
//! address space. The time window bounds replays (60 s); Pull is read-only,
//! and a replayed RequestSpace can only move free space between members.

use std::time::{SystemTime, UNIX_EPOCH};

use ring::hmac;
use tonic::metadata::MetadataMap;

use crate::ids::{NodeId, decode_hex, encode_hex};
use crate::token::ClusterKeys;

const LABEL: &[u8] = b"ovl peer call v1";
const NODE: &str = "ovl-node";
const TIME: &str = "ovl-time";
const MAC: &str = "ovl-mac";
const WINDOW_MS: u64 = 60_000;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn input(method: &str, node: NodeId, ts: u64) -> Vec<u8> {
    [
        LABEL,
        method.as_bytes(),
        b"|",
        node.as_bytes(),
        &ts.to_be_bytes(),
    ]
    .concat()
}

/// Adds the caller's credentials for `method` to `md`.
pub fn stamp(md: &mut MetadataMap, keys: &ClusterKeys, me: NodeId, method: &str) {
    let ts = now_ms();
    let tag = hmac::sign(&keys.peer_auth, &input(method, me, ts));
    // Hex strings are always valid ASCII metadata values.
    if let (Ok(n), Ok(t), Ok(m)) = (
        me.to_string().parse(),
        ts.to_string().parse(),
        encode_hex(tag.as_ref()).parse(),
    ) {
        md.insert(NODE, n);
        md.insert(TIME, t);
        md.insert(MAC, m);
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing or malformed peer credentials")]
    Malformed,
    #[error("peer credentials outside the time window (replay or clock skew)")]
    Stale,
    #[error("peer credentials do not verify under the cluster key")]
    BadMac,
}

/// Verifies the caller's credentials for `method`; returns its node id.
pub fn verify(md: &MetadataMap, keys: &ClusterKeys, method: &str) -> Result<NodeId, AuthError> {
    let get = |k| {
        md.get(k)
            .and_then(|v| v.to_str().ok())
            .ok_or(AuthError::Malformed)
    };
    let node: NodeId = get(NODE)?.parse().map_err(|_| AuthError::Malformed)?;
    let ts: u64 = get(TIME)?.parse().map_err(|_| AuthError::Malformed)?;
    let mac = decode_hex::<32>(get(MAC)?).map_err(|_| AuthError::Malformed)?;
    if now_ms().abs_diff(ts) > WINDOW_MS {
        return Err(AuthError::Stale);
    }
    hmac::verify(&keys.peer_auth, &input(method, node, ts), &mac).map_err(|_| AuthError::BadMac)?;
    Ok(node)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::JoinToken;
    use ring::rand::SystemRandom;

    #[test]
    fn stamped_calls_verify_only_for_the_same_key_and_method() {
        let rng = SystemRandom::new();
        let k1 = JoinToken::generate(&rng).unwrap().keys();
        let k2 = JoinToken::generate(&rng).unwrap().keys();
        let me = NodeId::random(&rng).unwrap();
        let mut md = MetadataMap::new();
        stamp(&mut md, &k1, me, "pull");
        assert_eq!(verify(&md, &k1, "pull"), Ok(me));
        assert_eq!(verify(&md, &k1, "request_space"), Err(AuthError::BadMac));
        assert_eq!(verify(&md, &k2, "pull"), Err(AuthError::BadMac));
        assert_eq!(
            verify(&MetadataMap::new(), &k1, "pull"),
            Err(AuthError::Malformed)
        );
        let mut old = md.clone();
        old.insert(
            TIME,
            (now_ms() - WINDOW_MS - 1000).to_string().parse().unwrap(),
        );
        assert_eq!(verify(&old, &k1, "pull"), Err(AuthError::Stale));
    }
}
