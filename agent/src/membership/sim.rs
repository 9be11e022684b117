//! Many members in one process over real loopback UDP, with the production
//! transport and tuning: measures how long a cluster takes to converge and to
//! report a silent member dead. Used by a test (correctness at 50 agents) and
//! a benchmark (sizes side by side).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ring::rand::SystemRandom;

use super::{Membership, MembershipConfig, NodeStatus, Tuning, sealer};
use crate::ids::NodeId;
use crate::keys::token::JoinToken;
use crate::metrics::Counters;

#[derive(Debug, Clone)]
pub struct SimReport {
    pub nodes: usize,
    /// From the last start until every member lists every member alive.
    pub converge: Duration,
    /// From one member going silent until every other lists it dead.
    pub detect: Duration,
    pub gossip_interval: Duration,
}

impl SimReport {
    pub fn converge_rounds(&self) -> f64 {
        self.converge.as_secs_f64() / self.gossip_interval.as_secs_f64()
    }
    pub fn detect_rounds(&self) -> f64 {
        self.detect.as_secs_f64() / self.gossip_interval.as_secs_f64()
    }
}

/// Distinct loopback addresses; the port keeps concurrent runs apart.
fn addr(i: usize, port: u16) -> SocketAddr {
    let ip = Ipv4Addr::new(127, 77, (i / 250) as u8, (i % 250 + 1) as u8);
    SocketAddr::new(IpAddr::V4(ip), port)
}

pub async fn run(n: usize, tuning: Tuning, limit: Duration) -> Result<SimReport, String> {
    if n < 2 {
        return Err("a simulation needs at least 2 members".into());
    }
    let rng = SystemRandom::new();
    let token = JoinToken::generate(&rng).map_err(|_| "random source failed")?;
    let port = 20_000 + (std::process::id() % 30_000) as u16;
    let mut members: Vec<(NodeId, Membership)> = Vec::with_capacity(n);
    for i in 0..n {
        let pk8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| "random source failed")?;
        let identity = ring::signature::Ed25519KeyPair::from_pkcs8(pk8.as_ref())
            .map_err(|_| "generated key does not load")?;
        let node_id = crate::keys::identity::node_id_of(
            ring::signature::KeyPair::public_key(&identity).as_ref(),
        );
        let m = Membership::start(MembershipConfig {
            node_id,
            generation: 1,
            cluster_id: token.cluster_id(),
            gossip_addr: addr(i, port),
            seeds: if i == 0 { vec![] } else { vec![addr(0, port)] },
            facts: super::NodeFacts {
                name: format!("sim{i}"),
                ..Default::default()
            },
            identity: Arc::new(identity),
            sealer: sealer(token.first_cluster_key()),
            counters: Arc::new(Counters::default()),
            tuning: tuning.clone(),
            removed: Default::default(),
            key_events: tokio::sync::mpsc::channel(1).0,
        })
        .await
        .map_err(|e| e.to_string())?;
        members.push((node_id, m));
    }
    let result = measure(&members, n, limit).await;
    for (_, m) in &members {
        m.shutdown().await;
    }
    let (converge, detect) = result?;
    Ok(SimReport {
        nodes: n,
        converge,
        detect,
        gossip_interval: tuning.gossip_interval,
    })
}

async fn measure(
    members: &[(NodeId, Membership)],
    n: usize,
    limit: Duration,
) -> Result<(Duration, Duration), String> {
    let t0 = Instant::now();
    poll(limit, "converge", || async {
        for (_, m) in members {
            let alive = m
                .nodes()
                .await
                .iter()
                .filter(|v| v.status == NodeStatus::Alive)
                .count();
            if alive != n {
                return (false, format!("a member sees {alive} of {n} alive"));
            }
        }
        (true, String::new())
    })
    .await?;
    let converge = t0.elapsed();

    let (victim_id, victim) = &members[n - 1];
    victim.shutdown().await;
    let t1 = Instant::now();
    poll(limit, "detect the silent member", || async {
        for (_, m) in &members[..n - 1] {
            let st = m
                .nodes()
                .await
                .iter()
                .find(|v| v.id == *victim_id)
                .map(|v| v.status);
            if st != Some(NodeStatus::Dead) {
                return (false, format!("a member still sees it as {st:?}"));
            }
        }
        (true, String::new())
    })
    .await?;
    Ok((converge, t1.elapsed()))
}

async fn poll<F, Fut>(limit: Duration, what: &str, mut check: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = (bool, String)>,
{
    let start = Instant::now();
    loop {
        let (done, state) = check().await;
        if done {
            return Ok(());
        }
        if start.elapsed() > limit {
            return Err(format!("did not {what} within {limit:?}: {state}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
