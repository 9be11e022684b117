//! A member turned attacker, for the end-to-end tests of issue 6: adds an
//! endpoint record to a stopped agent's own table (`STATE_DIR/table.pb`
//! and the change log `table.log` beside it),
//! so that the agent, once restarted, serves it to its peers through the
//! real peer API, exactly as it would serve its own honest rows.
//!
//! ```text
//! ovl-table-forge --table STATE_DIR/table.pb --network NETWORK_ID --id ENDPOINT_ID \
//!     --name NAME --ip IP --mac MAC --vtep IP
//! ovl-table-forge --table STATE_DIR/table.pb --network NETWORK_ID --steal BLOCK \
//!     --key STATE_DIR/identity.pk8
//! ovl-table-forge --table STATE_DIR/table.pb --clash NAME --id NETWORK_ID \
//!     --vni VNI --subnet CIDR
//! ovl-table-forge --table STATE_DIR/table.pb --network NETWORK_ID --flood N \
//!     --name-bytes B --first I
//! ```
//! The `--flood` form (issue 8) adds N endpoint records (numbered from I)
//! with names of B bytes and no valid address: a member publishing more
//! than any member may. Without an address its own agent never takes them
//! for endpoints of its own (it would withdraw them as orphans).
//! The second form rewrites the agent's published IPAM ring view so that
//! `BLOCK` (an entry of another host's) belongs to the agent itself one
//! version up, signed with the agent's own identity key: the forgery a
//! member can make. The third adds a network of the agent's own named
//! `NAME`, back-dated to `created_at_ms = 0`, with the agent's witness of
//! it at 0 and of every other network named `NAME` at `u64::MAX` (it
//! claims it saw its own first and the victim's never). Only for tests.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use ovl_agent::ids::{EndpointId, NetworkId};
use ovl_agent::ipam::{RangeEntry, Ring, Signer};
use ovl_agent::keys::identity::node_id_of;
use ovl_agent::store::{Table, key, log};
use ovl_proto::records::{
    EndpointRecord, IpamRing, NetworkRecord, NetworkWitness, table_entry::Value,
};
use prost::Message;
use ring::signature::KeyPair;

/// Rewrites the ring view in `table` so that `block` is the signer's.
fn steal(table: &mut Table, network: NetworkId, block: &str, signer: &Signer) -> Result<()> {
    let Some(Value::Ipam(r)) = table.get(&key::ipam(network)).cloned() else {
        bail!("the table holds no IPAM ring for {network}");
    };
    let ring: Ring = serde_json::from_slice(&r.ring_json).context("decoding the ring")?;
    let block: ipnetwork::Ipv4Network = block.parse()?;
    let Some(victim) = ring.entries().iter().find(|e| e.block == block).copied() else {
        bail!("{block} is not an entry of the ring");
    };
    let mut entries: Vec<RangeEntry> = ring
        .entries()
        .iter()
        .filter(|e| e.block != block)
        .copied()
        .collect();
    let version = victim.version + 1;
    entries.push(RangeEntry {
        block,
        owner: signer.id(),
        version,
        proof: signer.sign(block, signer.id(), version),
    });
    let forged = Ring::from_parts(ring.pool().cloned(), entries, ring.reports().clone())
        .context("rebuilding the ring")?;
    let json = serde_json::to_vec(&forged)?;
    table.put(
        &key::ipam(network),
        Value::Ipam(IpamRing {
            network_id: r.network_id,
            ring_json: json,
        }),
    );
    println!(
        "{block}: {} v{} -> {} v{version}",
        victim.owner,
        victim.version,
        signer.id()
    );
    Ok(())
}

/// Adds a back-dated network `name` of the table's owner, and its lies.
fn clash(table: &mut Table, owner: &[u8], name: &str, id: NetworkId, vni: u32, subnet: &str) {
    let victims: Vec<NetworkId> = table
        .live(key::NETWORK)
        .filter_map(|(_, v)| match v {
            Value::Network(r) if r.name == name => <[u8; 16]>::try_from(r.id.as_slice())
                .ok()
                .map(NetworkId::from_bytes),
            _ => None,
        })
        .collect();
    let witness = |id: NetworkId, at| {
        Value::Witness(NetworkWitness {
            network_id: id.as_bytes().to_vec(),
            first_seen_ms: at,
        })
    };
    for v in victims {
        table.put(&key::witness(v), witness(v, u64::MAX));
        println!("witness of {v} (named {name}) set to never");
    }
    table.put(&key::witness(id), witness(id, 0));
    table.put(
        &key::network(id),
        Value::Network(NetworkRecord {
            id: id.as_bytes().to_vec(),
            name: name.into(),
            vni,
            subnet: subnet.into(),
            created_at_ms: 0,
            creator: owner.to_vec(),
            ..Default::default()
        }),
    );
    println!("forged network {id} named {name}, vni {vni}, {subnet}, created_at_ms 0");
}

/// Adds endpoint records numbered `ids` in `network` named with `name_bytes` bytes
/// (at least a unique 8-digit suffix), ids from a fixed pattern.
fn flood(table: &mut Table, network: NetworkId, ids: std::ops::Range<usize>, name_bytes: usize) {
    for i in ids {
        let mut id = [0xf1u8; 16];
        id[8..].copy_from_slice(&(i as u64).to_be_bytes());
        let suffix = format!("{i:08}");
        let name = format!(
            "{}{suffix}",
            "f".repeat(name_bytes.saturating_sub(suffix.len()))
        );
        let record = EndpointRecord {
            id: id.to_vec(),
            network_id: network.as_bytes().to_vec(),
            name,
            aliases: Vec::new(),
            ip: String::new(),
            prefix_len: 24,
            mac: format!(
                "02:f1:{:02x}:{:02x}:{:02x}:{:02x}",
                (i >> 24) & 0xff,
                (i >> 16) & 0xff,
                (i >> 8) & 0xff,
                i & 0xff
            ),
            vtep: "198.18.0.99".into(),
            ifname: "eth0".into(),
            netns: "/run/netns/forged".into(),
            created_at_ms: 1,
        };
        table.put(
            &key::endpoint(EndpointId::from_bytes(id)),
            Value::Endpoint(record),
        );
    }
}

/// The agent's own table as it loads it: the snapshot at `path` and the
/// changes logged after it (`table.log` beside it).
/// The agent writes a snapshot only once its log has grown (store::writer),
/// so a young state dir has the log alone; the owner is then the node whose
/// identity key is beside it.
fn load(path: &str) -> Result<(Vec<u8>, Table)> {
    let (owner, mut table) = match std::fs::read(path) {
        Ok(raw) => {
            let snap = log::SnapshotFile::decode(raw.as_slice()).context("decoding the table")?;
            let table = log::decode_snapshot(&raw).context("decoding the table")?;
            (snap.owner, table)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key_path = std::path::Path::new(path).with_file_name("identity.pk8");
            let pk8 = std::fs::read(&key_path)
                .with_context(|| format!("reading {}", key_path.display()))?;
            let key = ring::signature::Ed25519KeyPair::from_pkcs8(&pk8)
                .map_err(|_| anyhow::anyhow!("bad identity key {}", key_path.display()))?;
            let owner = node_id_of(key.public_key().as_ref()).as_bytes().to_vec();
            (owner, Table::default())
        }
        Err(e) => return Err(e).with_context(|| format!("reading {path}")),
    };
    let log_path = std::path::Path::new(path).with_file_name("table.log");
    if let Ok(raw) = std::fs::read(&log_path) {
        log::replay(&mut table, log::decode_log(&raw).records);
    }
    Ok((owner, table))
}

/// Writes the table back as one snapshot, with an empty log.
fn save(path: &str, owner: &[u8], table: &Table) -> Result<()> {
    std::fs::write(path, log::encode_snapshot(owner, table))
        .with_context(|| format!("writing {path}"))?;
    let log_path = std::path::Path::new(path).with_file_name("table.log");
    match std::fs::remove_file(&log_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", log_path.display()))
        }
        _ => Ok(()),
    }
}

fn main() -> Result<()> {
    let mut it = std::env::args().skip(1);
    let mut opts = std::collections::BTreeMap::new();
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        opts.insert(flag, value);
    }
    let get = |k: &str| {
        opts.get(k)
            .cloned()
            .with_context(|| format!("{k} is required"))
    };
    let path = get("--table")?;
    let (owner, mut table) = load(&path)?;
    if let Ok(name) = get("--clash") {
        let id: NetworkId = get("--id")?.parse()?;
        let vni: u32 = get("--vni")?.parse()?;
        clash(&mut table, &owner, &name, id, vni, &get("--subnet")?);
        save(&path, &owner, &table)?;
        return Ok(());
    }
    let network: NetworkId = get("--network")?.parse()?;
    if let Ok(n) = get("--flood") {
        let n: usize = n.parse()?;
        let name_bytes: usize = get("--name-bytes")?.parse()?;
        let first: usize = get("--first").map_or(Ok(0), |v| v.parse())?;
        flood(&mut table, network, first..first + n, name_bytes);
        save(&path, &owner, &table)?;
        println!(
            "{n} endpoint records with {name_bytes}-byte names added (table version {})",
            table.version()
        );
        return Ok(());
    }
    if let Ok(block) = get("--steal") {
        let pk8 = std::fs::read(get("--key")?).context("reading the identity key")?;
        let key = ring::signature::Ed25519KeyPair::from_pkcs8(&pk8)
            .map_err(|_| anyhow::anyhow!("bad identity key"))?;
        steal(
            &mut table,
            network,
            &block,
            &Signer::new(Arc::new(key), network),
        )?;
        save(&path, &owner, &table)?;
        return Ok(());
    }
    let id: EndpointId = get("--id")?.parse()?;
    let record = EndpointRecord {
        id: id.as_bytes().to_vec(),
        network_id: network.as_bytes().to_vec(),
        name: get("--name")?,
        aliases: Vec::new(),
        ip: get("--ip")?,
        prefix_len: 24,
        mac: get("--mac")?,
        vtep: get("--vtep")?,
        ifname: "eth0".into(),
        netns: "/run/netns/forged".into(),
        created_at_ms: 1,
    };
    if table
        .put(&key::endpoint(id), Value::Endpoint(record))
        .is_none()
    {
        bail!("the table already holds that record");
    }
    save(&path, &owner, &table)?;
    println!(
        "forged endpoint {id} into {path} (table version {})",
        table.version()
    );
    Ok(())
}
