//! ovl-flood: the hostile stranger of the issue 8 flood test. For `--secs`
//! it sends, to every `--target` at once:
//! - random and truncated UDP datagrams at the gossip port (7946) and at
//!   the encrypted data-plane port (4500), paced at `--udp-pps` in total;
//! - garbage bytes on fresh TCP connections to 7946, and half-open
//!   connections (a TLS record header, then silence);
//! - `--streams` concurrent gRPC calls of the largest request the peer API
//!   decodes (256 KiB), over TLS with a fresh key no member has (no
//!   credentials: every call must be refused from its headers);
//! - `--idle` idle TCP connections, held open until the end.
//!
//! TCP connections are spread over the `--sources` addresses. At the end
//! it prints one JSON line of what it sent and how the agents answered.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use ovl_agent::ids::NodeId;
use ovl_agent::metrics::Counters;
use ovl_agent::peer::{Channels, TlsIdentity};
use ovl_proto::peer::SpaceRequest;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::Ed25519KeyPair;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

#[derive(Parser)]
struct Args {
    /// Agents' addresses (their advertise addresses).
    #[arg(long, value_delimiter = ',')]
    targets: Vec<IpAddr>,
    /// The node id of each target, in order (the TLS pin of the gRPC calls).
    #[arg(long, value_delimiter = ',')]
    ids: Vec<NodeId>,
    /// Source addresses for TCP (held by the namespace this runs in).
    #[arg(long, value_delimiter = ',')]
    sources: Vec<IpAddr>,
    #[arg(long, default_value_t = 30)]
    secs: u64,
    #[arg(long, default_value_t = 4000)]
    udp_pps: u64,
    #[arg(long, default_value_t = 200)]
    streams: usize,
    #[arg(long, default_value_t = 5000)]
    idle: usize,
    #[arg(long, default_value_t = 7946)]
    gossip_port: u16,
    #[arg(long, default_value_t = 4500)]
    encrypted_port: u16,
}

/// Largest request the peer API decodes (peer_api::MAX_REQUEST_BYTES).
const MAX_REQUEST: usize = 256 * 1024;

#[derive(Default)]
struct Tally {
    udp_sent: AtomicU64,
    garbage_conns: AtomicU64,
    garbage_refused: AtomicU64,
    half_open: AtomicU64,
    calls: AtomicU64,
    calls_ok: AtomicU64,
    idle_opened: AtomicU64,
    idle_refused: AtomicU64,
}

fn random(rng: &SystemRandom, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    let _ = rng.fill(&mut v);
    v
}

async fn connect(src: Option<IpAddr>, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    if let Some(ip) = src {
        s.bind(SocketAddr::new(ip, 0))?;
    }
    tokio::time::timeout(Duration::from_secs(2), s.connect(to))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

async fn udp(args: Arc<Args>, tally: Arc<Tally>, until: Instant) -> Result<()> {
    let sock = UdpSocket::bind("0.0.0.0:0").await?;
    let rng = SystemRandom::new();
    let dests: Vec<SocketAddr> = args
        .targets
        .iter()
        .flat_map(|ip| {
            [args.gossip_port, args.encrypted_port]
                .into_iter()
                .map(|p| SocketAddr::new(*ip, p))
        })
        .collect();
    // Paced in 10 ms ticks.
    let per_tick = (args.udp_pps / 100).max(1);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut len_seed = [0u8; 2];
    let mut i = 0usize;
    while Instant::now() < until {
        tick.tick().await;
        for _ in 0..per_tick {
            let _ = rng.fill(&mut len_seed);
            let r = u16::from_le_bytes(len_seed) as usize;
            // Half truncated (shorter than any header), half random of any
            // size up to the underlay MTU.
            let len = if i.is_multiple_of(2) {
                r % 48
            } else {
                r % 1472
            };
            let to = dests[i % dests.len()];
            i += 1;
            if sock.send_to(&random(&rng, len), to).await.is_ok() {
                tally.udp_sent.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}

fn source(args: &Args, i: usize) -> Option<IpAddr> {
    (!args.sources.is_empty()).then(|| args.sources[i % args.sources.len()])
}

async fn garbage(args: Arc<Args>, tally: Arc<Tally>, until: Instant, worker: usize) {
    let rng = SystemRandom::new();
    let mut i = worker;
    while Instant::now() < until {
        let to = SocketAddr::new(args.targets[i % args.targets.len()], args.gossip_port);
        let src = source(&args, i);
        i += 7;
        match connect(src, to).await {
            Ok(mut s) => {
                tally.garbage_conns.fetch_add(1, Ordering::Relaxed);
                let n = 1 + (i * 131) % 4096;
                let _ = s.write_all(&random(&rng, n)).await;
                drop(s);
            }
            Err(_) => {
                tally.garbage_refused.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Half-open: a TLS handshake record header and nothing more, again and
/// again (the agent must drop each after its handshake timeout).
async fn half_open(args: Arc<Args>, tally: Arc<Tally>, until: Instant, worker: usize) {
    let mut i = worker;
    while Instant::now() < until {
        let to = SocketAddr::new(args.targets[i % args.targets.len()], args.gossip_port);
        let src = source(&args, i);
        i += 5;
        if let Ok(mut s) = connect(src, to).await {
            tally.half_open.fetch_add(1, Ordering::Relaxed);
            let _ = s.write_all(&[0x16, 0x03, 0x01, 0x02]).await;
            let hold = until.saturating_duration_since(Instant::now());
            tokio::time::sleep(hold.min(Duration::from_secs(8))).await;
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `--streams` concurrent calls of the largest request, per target, over
/// and over, from a key no member has.
async fn streams(args: Arc<Args>, tally: Arc<Tally>, until: Instant) -> Result<()> {
    let pk8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .map_err(|_| anyhow::anyhow!("random source failed"))?;
    let tls = Arc::new(TlsIdentity::from_pkcs8(pk8.as_ref())?);
    let channels = Arc::new(Channels::new(tls, Arc::new(Counters::default())));
    while Instant::now() < until {
        let mut calls = Vec::new();
        for (ip, id) in args.targets.iter().zip(&args.ids) {
            for _ in 0..args.streams {
                let (channels, tally) = (channels.clone(), tally.clone());
                let (to, id) = (SocketAddr::new(*ip, args.gossip_port), *id);
                calls.push(tokio::spawn(async move {
                    tally.calls.fetch_add(1, Ordering::Relaxed);
                    let r = channels
                        .request_space(
                            to,
                            id,
                            SpaceRequest {
                                network_id: vec![0; 16],
                                exact_ip: "1".repeat(MAX_REQUEST - 32),
                            },
                        )
                        .await;
                    if r.is_ok() {
                        tally.calls_ok.fetch_add(1, Ordering::Relaxed);
                    }
                }));
            }
        }
        for c in calls {
            let _ = c.await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Opens `--idle` connections (spread over targets and sources) and
/// holds what the agents accept until the end.
async fn idle(args: Arc<Args>, tally: Arc<Tally>, until: Instant) -> Vec<TcpStream> {
    let mut held = Vec::new();
    for i in 0..args.idle {
        if Instant::now() >= until {
            break;
        }
        let to = SocketAddr::new(args.targets[i % args.targets.len()], args.gossip_port);
        match connect(source(&args, i / args.targets.len()), to).await {
            Ok(s) => {
                tally.idle_opened.fetch_add(1, Ordering::Relaxed);
                held.push(s);
            }
            Err(_) => {
                tally.idle_refused.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    held
}

fn raise_fd_limit() {
    let lim = libc::rlimit {
        rlim_cur: 65536,
        rlim_max: 65536,
    };
    // SAFETY: setrlimit reads a valid rlimit; failure only leaves the
    // default limit (fewer idle connections).
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    raise_fd_limit();
    let args = Arc::new(Args::parse());
    anyhow::ensure!(!args.targets.is_empty(), "--targets is required");
    anyhow::ensure!(
        args.ids.len() == args.targets.len(),
        "one --ids entry per target"
    );
    let tally = Arc::new(Tally::default());
    let start = Instant::now();
    let until = start + Duration::from_secs(args.secs);
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(udp(args.clone(), tally.clone(), until)));
    for w in 0..4 {
        let (a, t) = (args.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            garbage(a, t, until, w).await;
            Ok(())
        }));
    }
    for w in 0..8 {
        let (a, t) = (args.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            half_open(a, t, until, w).await;
            Ok(())
        }));
    }
    tasks.push(tokio::spawn(streams(args.clone(), tally.clone(), until)));
    let held = tokio::spawn(idle(args.clone(), tally.clone(), until));
    println!(
        "flooding {} targets for {} s",
        args.targets.len(),
        args.secs
    );
    for t in tasks {
        t.await.context("flood task")??;
    }
    let held = held.await.context("idle task")?;
    let still_open = held.len();
    drop(held);
    let t = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "{}",
        serde_json::json!({
            "secs": start.elapsed().as_secs_f64(),
            "udp_sent": t(&tally.udp_sent),
            "garbage_conns": t(&tally.garbage_conns),
            "garbage_refused": t(&tally.garbage_refused),
            "half_open": t(&tally.half_open),
            "calls": t(&tally.calls),
            "calls_ok": t(&tally.calls_ok),
            "idle_opened": t(&tally.idle_opened),
            "idle_refused": t(&tally.idle_refused),
            "idle_held_at_end": still_open,
        })
    );
    Ok(())
}
