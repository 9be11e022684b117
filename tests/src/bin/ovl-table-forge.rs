//! A member turned attacker, for the end-to-end tests of issue 6: adds an
//! endpoint record to a stopped agent's own table (`STATE_DIR/table.pb`),
//! so that the agent, once restarted, serves it to its peers through the
//! real peer API, exactly as it would serve its own honest rows.
//!
//! ```text
//! ovl-table-forge --table STATE_DIR/table.pb --network NETWORK_ID --id ENDPOINT_ID \
//!     --name NAME --ip IP --mac MAC --vtep IP
//! ```
//! Only for tests.

use anyhow::{Context, Result, bail};
use ovl_agent::ids::{EndpointId, NetworkId};
use ovl_agent::store::{Table, key};
use ovl_proto::records::{EndpointRecord, TableSnapshot, table_entry::Value};
use prost::Message;

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
    let network: NetworkId = get("--network")?.parse()?;
    let id: EndpointId = get("--id")?.parse()?;
    let raw = std::fs::read(&path).with_context(|| format!("reading {path}"))?;
    let snapshot = TableSnapshot::decode(raw.as_slice()).context("decoding the table")?;
    let owner = snapshot.owner.clone();
    let mut table = Table::from_snapshot(snapshot);
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
    if !table.put(&key::endpoint(id), Value::Endpoint(record)) {
        bail!("the table already holds that record");
    }
    std::fs::write(&path, table.snapshot(&owner).encode_to_vec())
        .with_context(|| format!("writing {path}"))?;
    println!(
        "forged endpoint {id} into {path} (table version {})",
        table.version()
    );
    Ok(())
}
