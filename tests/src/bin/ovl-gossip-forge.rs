//! A member turned attacker, for the end-to-end tests of issue 6: sends
//! correctly sealed gossip datagrams (it holds the join token and a
//! member's identity key) that speak for another node.
//!
//! ```text
//! ovl-gossip-forge --token T --key STATE_DIR/identity.pk8 --to IP:PORT \
//!     --victim NODE_ID:GENERATION:IP:PORT --mode MODE [--count N] [--interval-ms MS]
//! ```
//! Modes (each one datagram chitchat applies without having asked for it:
//! an Ack, whose delta goes straight in and which draws no reply, so the
//! agent's reflection check, which binds Syn and SynAck to the sender's own
//! gossip address, lets it through from this tool's port to the checks
//! under test; `huge-heartbeat` needs a digest, so it is a SynAck and meets
//! that check first):
//! - `newer-left-unsigned`: a newer incarnation of the victim with the old
//!   plain `left=1` key-value (the attack that worked before records were
//!   signed);
//! - `newer-left-signed`: a newer incarnation with a record claiming the
//!   victim's id, `left` set, signed by the attacker's own key;
//! - `newer-addrs-signed`: the same with changed addresses;
//! - `newer-keys-signed`: the same with the victim's addresses and
//!   key-exchange keys of the attacker's choosing for the epochs around now
//!   (`--key-period-ms`, default 5000): a man in the middle's first step;
//! - `trip-assert`: a delta whose `SetMaxVersion` is below its key-value's
//!   version (tripped an `assert!` in chitchat 0.11.2);
//! - `huge-heartbeat`: the victim's current incarnation with a heartbeat of
//!   `u64::MAX - 1` (would make every real heartbeat look old);
//! - `replay`: one valid, empty Syn, sealed once and sent `--count` times
//!   byte for byte (a captured datagram replayed).
//! - `fresh-identity`: a removed node's way back in. Mints a fresh identity
//!   (its key written to `--mint PATH`, its id printed), and gossips that
//!   identity's own correctly signed record, sealed with the cluster's
//!   first key (the one the old `--token` gives, which members keep
//!   opening for a while after `node rm` rotated it). `--key` and
//!   `--victim` are not used; `--gossip-addr` is the address the identity
//!   claims.
//!
//! Prints one line per datagram sent. Only for tests: it sends to the one
//! address given, inside the test's namespaces.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use ovl_agent::ids::ClusterId;
use ovl_agent::keys::identity::node_id_of;
use ovl_agent::keys::token::JoinToken;
use ovl_agent::membership::record::{self, NodeFacts, RECORD_KEY};
use ovl_agent::membership::transport::signed_plaintext;
use ovl_agent::membership::wire::{DeltaOp, DigestEntry, Kind, WireId, encode_message};
use ovl_agent::membership::{seal, sealer};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair};

struct Args {
    token: JoinToken,
    key: Ed25519KeyPair,
    /// Where each datagram goes (`--to` may be given more than once).
    to: Vec<SocketAddr>,
    /// The forged node (the victim; for `fresh-identity`, the fresh one).
    victim: WireId,
    mode: String,
    count: u32,
    interval: Duration,
    key_period_ms: u64,
}

/// X25519 keys the attacker holds the secrets of, for the previous,
/// current and next epoch.
fn attacker_keys(period_ms: u64) -> Vec<(u64, [u8; 32])> {
    let now = ovl_agent::keys::pair::epoch_at(unix_ms(), period_ms);
    (now.saturating_sub(1)..=now + 1)
        .map(|e| {
            let secret = ovl_agent::keys::pair::EpochSecret::from_random(e, [0x5a; 32]);
            (e, secret.public())
        })
        .collect()
}

fn parse_args() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let (mut token, mut key, mut victim, mut mode) = (None, None, None, None);
    let mut to = Vec::new();
    let (mut mint, mut gossip_addr): (Option<String>, Option<SocketAddr>) = (None, None);
    let (mut count, mut interval) = (1u32, Duration::from_millis(100));
    let mut key_period_ms = 5_000u64;
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--token" => token = Some(value.parse::<JoinToken>()?),
            "--key" => {
                let pk8 = std::fs::read(&value).with_context(|| format!("reading {value}"))?;
                key = Some(
                    Ed25519KeyPair::from_pkcs8(&pk8)
                        .map_err(|_| anyhow::anyhow!("{value}: not an Ed25519 PKCS#8 key"))?,
                );
            }
            "--to" => to.push(value.parse()?),
            "--victim" => victim = Some(parse_victim(&value)?),
            "--mode" => mode = Some(value),
            "--count" => count = value.parse()?,
            "--interval-ms" => interval = Duration::from_millis(value.parse()?),
            "--key-period-ms" => key_period_ms = value.parse()?,
            "--mint" => mint = Some(value),
            "--gossip-addr" => gossip_addr = Some(value.parse()?),
            _ => bail!("unknown flag {flag}"),
        }
    }
    if let Some(path) = mint {
        // A fresh identity: its key, and the slot it gossips itself in.
        let pk8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| anyhow::anyhow!("random source failed"))?;
        std::fs::write(&path, pk8.as_ref()).with_context(|| format!("writing {path}"))?;
        let fresh = Ed25519KeyPair::from_pkcs8(pk8.as_ref())
            .map_err(|_| anyhow::anyhow!("a minted key does not parse"))?;
        let id = node_id_of(fresh.public_key().as_ref());
        println!("minted node {id}");
        victim = Some(WireId {
            node_id: id.to_string(),
            generation: unix_ms(),
            gossip_addr: gossip_addr.context("--mint needs --gossip-addr")?,
        });
        key = Some(fresh);
    }
    Ok(Args {
        token: token.context("--token is required")?,
        key: key.context("--key is required")?,
        to: if to.is_empty() {
            bail!("--to is required")
        } else {
            to
        },
        victim: victim.context("--victim is required")?,
        mode: mode.context("--mode is required")?,
        count,
        interval,
        key_period_ms,
    })
}

/// `NODE_ID:GENERATION:IP:PORT`
fn parse_victim(s: &str) -> Result<WireId> {
    let mut parts = s.splitn(3, ':');
    let (Some(id), Some(generation), Some(addr)) = (parts.next(), parts.next(), parts.next())
    else {
        bail!("--victim wants NODE_ID:GENERATION:IP:PORT, got {s:?}");
    };
    Ok(WireId {
        node_id: id.to_string(),
        generation: generation.parse()?,
        gossip_addr: addr.parse()?,
    })
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn node_op(id: &WireId) -> DeltaOp {
    DeltaOp::Node {
        id: id.clone(),
        last_gc_version: 0,
        from_version: 0,
    }
}

fn kv(key: &str, value: String, version: u64) -> DeltaOp {
    DeltaOp::KeyValue {
        key: key.to_string(),
        value,
        version,
        status: 0,
    }
}

/// The chitchat message of one forged datagram.
fn forged(args: &Args) -> Result<Vec<u8>> {
    let cluster: ClusterId = args.token.cluster_id();
    let mut newer = args.victim.clone();
    newer.generation += 1;
    // A newer incarnation of the victim whose record (claiming the
    // victim's id) is signed with the attacker's own key.
    let newer_signed = |addr: String, left: bool, keys: Vec<(u64, [u8; 32])>| {
        let value = record::sign(
            &args.key,
            cluster,
            newer.generation,
            1,
            newer.gossip_addr,
            &NodeFacts {
                name: "forged".into(),
                advertise_addr: addr.clone(),
                data_path_addr: addr,
                left,
                encrypted_port: if keys.is_empty() { 0 } else { 4500 },
                exchange_keys: keys,
                ..NodeFacts::default()
            },
        );
        encode_message(Kind::Ack, &[], &[node_op(&newer), kv(RECORD_KEY, value, 1)])
    };
    let ip = args.victim.gossip_addr.ip().to_string();
    Ok(match args.mode.as_str() {
        "newer-left-unsigned" => encode_message(
            Kind::Ack,
            &[],
            &[node_op(&newer), kv("left", "1".into(), 1)],
        ),
        "newer-left-signed" => newer_signed(ip, true, Vec::new()),
        "newer-addrs-signed" => newer_signed("198.18.0.99".into(), false, Vec::new()),
        "newer-keys-signed" => newer_signed(ip, false, attacker_keys(args.key_period_ms)),
        "trip-assert" => encode_message(
            Kind::Ack,
            &[],
            &[
                node_op(&args.victim),
                kv(RECORD_KEY, "x".into(), 1_000_000),
                DeltaOp::SetMaxVersion(5),
            ],
        ),
        "replay" => encode_message(Kind::Syn, &[], &[]),
        "fresh-identity" => {
            // The identity's own record, signed by its own key: exactly
            // what a joining node gossips.
            let me = &args.victim;
            let value = record::sign(
                &args.key,
                cluster,
                me.generation,
                1,
                me.gossip_addr,
                &NodeFacts {
                    name: "fresh-identity".into(),
                    advertise_addr: ip.clone(),
                    data_path_addr: ip,
                    ..NodeFacts::default()
                },
            );
            encode_message(
                Kind::SynAck,
                &[DigestEntry {
                    id: me.clone(),
                    heartbeat: unix_ms(),
                    last_gc_version: 0,
                    max_version: 1,
                }],
                &[node_op(me), kv(RECORD_KEY, value, 1)],
            )
        }
        "huge-heartbeat" => encode_message(
            Kind::SynAck,
            &[DigestEntry {
                id: args.victim.clone(),
                heartbeat: u64::MAX - 1,
                last_gc_version: 0,
                max_version: 1,
            }],
            &[],
        ),
        other => bail!("unknown --mode {other}"),
    })
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let rng = SystemRandom::new();
    // The cluster's first key: the forging tests run before any rotation.
    let sealer = sealer(args.token.first_cluster_key());
    // A fresh identity gossips from the address it claims, as a real
    // joining node does (so its Syn/SynAck passes the reflection check).
    let bind: SocketAddr = if args.mode == "fresh-identity" {
        args.victim.gossip_addr
    } else if args.to[0].is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(bind).context("bind UDP")?;
    let (mut plain, mut sealed) = (Vec::new(), Vec::new());
    for i in 0..args.count {
        // A replay sends the first datagram again, byte for byte.
        if i == 0 || args.mode != "replay" {
            let msg = forged(&args)?;
            let now = unix_ms();
            signed_plaintext(&args.key, args.token.cluster_id(), now, &msg, &mut plain);
            let mut nonce = [0u8; 12];
            rng.fill(&mut nonce)
                .map_err(|_| anyhow::anyhow!("random source failed"))?;
            sealer.seal(now, nonce, &plain, &mut sealed);
        }
        if sealed.len() > seal::MAX_DATAGRAM {
            bail!("datagram too large");
        }
        for to in &args.to {
            socket
                .send_to(&sealed, to)
                .with_context(|| format!("send to {to}"))?;
        }
        println!(
            "sent {} datagram {} ({} bytes) to {:?}",
            args.mode,
            i + 1,
            sealed.len(),
            args.to
        );
        if i + 1 < args.count {
            std::thread::sleep(args.interval);
        }
    }
    Ok(())
}
