//! ovl-peer-probe: a test-only peer client for the issue 6 acceptance
//! tests. It calls an agent's peer API (7946/tcp) with a key and claims of
//! the test's choosing, the way an attacker would: a member's key claiming
//! another node, a fresh key of no member, the old plaintext gRPC, or a raw
//! replay of bytes it recorded from a real call. It prints one JSON line
//! (`ok`, `detail`, and for a replay `received`) and exits 0 only when the
//! call succeeded.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use ovl_agent::ids::{NetworkId, NodeId};
use ovl_agent::metrics::Counters;
use ovl_agent::peer::{Channels, TlsIdentity};
use ovl_proto::peer::peer_client::PeerClient;
use ovl_proto::peer::{PullRequest, SpaceRequest};
use ring::rand::SystemRandom;
use ring::signature::Ed25519KeyPair;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
struct Args {
    /// PKCS#8 Ed25519 key file (e.g. a member's state-dir identity.pk8), or
    /// "new" for a fresh key no member has.
    #[arg(long)]
    key: Option<String>,
    /// The agent's peer address (IP:7946).
    #[arg(long)]
    addr: SocketAddr,
    /// The node id the callee's certificate must have (TLS pin).
    #[arg(long)]
    expect: Option<NodeId>,
    /// The node id to claim in the call's metadata (default: the key's).
    #[arg(long)]
    claim: Option<NodeId>,
    /// pull | notify | space | big (a RequestSpace of --size bytes) |
    /// fetch-key (FetchClusterKey)
    #[arg(long, default_value = "pull")]
    call: String,
    /// The address text's length in a `big` call.
    #[arg(long, default_value_t = 1 << 20)]
    size: usize,
    /// Network id (hex) for `space`.
    #[arg(long)]
    network: Option<NetworkId>,
    /// Plain HTTP/2 gRPC without TLS, as agents spoke before issue 6.
    #[arg(long)]
    plaintext: bool,
    /// Relay the call through a local TCP proxy and save the bytes the
    /// client sent in this file.
    #[arg(long)]
    record: Option<PathBuf>,
    /// Send the bytes saved by --record to --addr on a fresh connection
    /// and report what came back.
    #[arg(long)]
    replay: Option<PathBuf>,
    /// Open this many TCP connections to --addr at once and report how
    /// many the agent keeps open for a second (`received`: that number).
    #[arg(long)]
    conns: Option<usize>,
}

fn report(ok: bool, detail: &str, received: Option<usize>) -> std::process::ExitCode {
    let mut v = serde_json::json!({ "ok": ok, "detail": detail });
    if let Some(n) = received {
        v["received"] = n.into();
    }
    println!("{v}");
    if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(n) = args.conns {
        return match flood(args.addr, n).await {
            Ok(held) => report(
                true,
                &format!("{held} of {n} connections held open"),
                Some(held),
            ),
            Err(e) => report(false, &format!("{e:#}"), Some(0)),
        };
    }
    if let Some(path) = &args.replay {
        return match replay(args.addr, path).await {
            Ok(n) => report(false, "replayed bytes got no call through", Some(n)),
            Err(e) => report(false, &format!("{e:#}"), Some(0)),
        };
    }
    match call(&args).await {
        Ok(detail) => report(true, &detail, None),
        Err(e) => report(false, &format!("{e:#}"), None),
    }
}

fn load_key(spec: &str) -> Result<Vec<u8>> {
    if spec == "new" {
        let pk8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| anyhow::anyhow!("random source failed"))?;
        return Ok(pk8.as_ref().to_vec());
    }
    std::fs::read(spec).with_context(|| format!("read key {spec}"))
}

async fn call(args: &Args) -> Result<String> {
    if args.plaintext {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", args.addr))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(3))
            .connect()
            .await
            .context("plaintext connect")?;
        let r = PeerClient::new(channel)
            .pull(PullRequest { since: 0 })
            .await
            .map_err(|s| anyhow::anyhow!("plaintext pull: {:?}: {}", s.code(), s.message()))?;
        return Ok(format!(
            "plaintext pull answered {} entries",
            r.get_ref().entries.len()
        ));
    }
    let key = load_key(args.key.as_deref().context("--key is required")?)?;
    let tls = Arc::new(TlsIdentity::from_pkcs8(&key)?);
    let expect = args.expect.context("--expect is required")?;
    let mut channels = Channels::new(tls.clone(), Arc::new(Counters::default()));
    if let Some(claim) = args.claim {
        channels = channels.claiming(claim);
    }
    let (target, recorded) = match &args.record {
        Some(_) => {
            let (addr, rec) = relay(args.addr).await?;
            (addr, Some(rec))
        }
        None => (args.addr, None),
    };
    let result = match args.call.as_str() {
        "pull" => channels.pull(target, expect, 0).await.map(|r| {
            format!(
                "pull answered {} entries, version {}",
                r.entries.len(),
                r.version
            )
        }),
        "notify" => channels
            .notify(target, expect, u64::MAX / 2)
            .await
            .map(|()| "notify accepted".to_string()),
        "space" => {
            let network = args.network.context("--network is required for space")?;
            channels
                .request_space(
                    target,
                    expect,
                    SpaceRequest {
                        network_id: network.as_bytes().to_vec(),
                        exact_ip: String::new(),
                    },
                )
                .await
                .map(|g| format!("space granted ({} bytes of grant)", g.grant_json.len()))
        }
        "big" => channels
            .request_space(
                target,
                expect,
                SpaceRequest {
                    network_id: vec![0; 16],
                    exact_ip: "1".repeat(args.size),
                },
            )
            .await
            .map(|_| format!("a request of {} bytes was served", args.size)),
        "fetch-key" => channels
            .fetch_cluster_key(target, expect)
            .await
            .map(|k| format!("cluster key of epoch {} handed over", k.epoch)),
        other => bail!("unknown call {other:?}"),
    };
    if let (Some(path), Some(rec)) = (&args.record, recorded) {
        // Let the relay copy the last bytes.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let bytes = rec.lock().unwrap_or_else(|e| e.into_inner()).clone();
        std::fs::write(path, &bytes).with_context(|| format!("write {}", path.display()))?;
    }
    result.map_err(|e| anyhow::anyhow!("{} as node {}: {e}", args.call, tls.node_id))
}

type Recorded = Arc<Mutex<Vec<u8>>>;

/// A local TCP relay to `upstream` that keeps the bytes the client sends
/// on its first connection.
async fn relay(upstream: SocketAddr) -> Result<(SocketAddr, Recorded)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let rec: Recorded = Arc::default();
    let keep = rec.clone();
    tokio::spawn(async move {
        let mut first = true;
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(upstream).await else {
                continue;
            };
            let keep = first.then(|| keep.clone());
            first = false;
            tokio::spawn(pipe(client, server, keep));
        }
    });
    Ok((addr, rec))
}

async fn pipe(client: TcpStream, server: TcpStream, keep: Option<Recorded>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = async move {
        let mut buf = [0u8; 16384];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Some(k) = &keep {
                k.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&buf[..n]);
            }
            if sw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = sw.shutdown().await;
    };
    let down = async move {
        let _ = tokio::io::copy(&mut sr, &mut cw).await;
    };
    tokio::join!(up, down);
}

/// Sends recorded bytes on a fresh connection; returns how many bytes the
/// server sent back before closing.
async fn replay(addr: SocketAddr, path: &PathBuf) -> Result<usize> {
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    if bytes.is_empty() {
        bail!("{} is empty: nothing recorded", path.display());
    }
    let mut tcp = TcpStream::connect(addr).await.context("connect")?;
    // Errors writing are expected: the server may close on the first
    // record it cannot authenticate.
    let _ = tcp.write_all(&bytes).await;
    let mut received = 0;
    let mut buf = [0u8; 16384];
    loop {
        match tokio::time::timeout(Duration::from_secs(3), tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => received += n,
        }
    }
    Ok(received)
}

/// Opens `n` TCP connections at once and counts those still open a second
/// later (the agent closes refused ones at once; it gives a handshake 5 s).
async fn flood(addr: SocketAddr, n: usize) -> Result<usize> {
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(TcpStream::connect(addr).await.context("connect")?);
    }
    let checks = conns.iter_mut().map(|c| async move {
        let mut b = [0u8; 1];
        // Open after a second: held. Closed (EOF or reset): refused.
        tokio::time::timeout(Duration::from_secs(1), c.read(&mut b))
            .await
            .is_err()
    });
    let held = futures::future::join_all(checks)
        .await
        .into_iter()
        .filter(|h| *h)
        .count();
    Ok(held)
}
