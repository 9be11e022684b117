//! The CNI plugin `ovl` (binary `ovl-cni`): a runtime's ADD, DEL, CHECK,
//! STATUS, GC and VERSION become calls to the local agent (`spec` holds
//! the protocol, sans-IO; this module the I/O). The agent does the work
//! (its IPAM, its data plane), so the plugin keeps no state: an
//! attachment's endpoint name is derived from the container id and
//! interface (`spec::endpoint_name`).

pub mod spec;

use std::collections::HashSet;
use std::path::PathBuf;

use ovl_proto::api::cluster_client::ClusterClient;
use ovl_proto::api::endpoints_client::EndpointsClient;
use ovl_proto::api::networks_client::NetworksClient;
use ovl_proto::api::*;
use serde_json::Value;
use tonic::Code as Grpc;
use tonic::transport::Channel;

use crate::client;
use spec::{Attached, CniError, Code, Command, Env, NetConf};

/// Where the agent listens unless the config or `OVL_SOCKET` says.
pub const DEFAULT_SOCKET: &str = "/run/ovl/ovl.sock";

/// Runs one invocation; `Ok(Some(json))` is printed on stdout.
pub async fn run(
    env: &Env,
    stdin: &[u8],
    socket_env: Option<String>,
) -> Result<Option<Value>, CniError> {
    if env.command == Command::Version {
        return Ok(Some(spec::version_json()));
    }
    let conf = NetConf::parse(stdin)?;
    let socket = PathBuf::from(
        conf.socket
            .clone()
            .or(socket_env)
            .unwrap_or_else(|| DEFAULT_SOCKET.to_string()),
    );
    let channel = match client::connect(&socket).await {
        Ok(c) => c,
        Err(e) if env.command == Command::Status => {
            return Err(CniError::new(Code::NotAvailable, e));
        }
        Err(e) => return Err(CniError::new(Code::TryAgainLater, e)),
    };
    match env.command {
        Command::Add => add(env, &conf, channel).await.map(Some),
        Command::Del => del(env, &conf, channel).await.map(|()| None),
        Command::Check => check(env, &conf, channel).await.map(|()| None),
        Command::Status => status(&conf, channel).await.map(|()| None),
        Command::Gc => gc(&conf, channel).await.map(|()| None),
        Command::Version => Ok(Some(spec::version_json())),
    }
}

/// An agent refusal as a CNI error: what the runtime may retry (11) apart
/// from what a config or request got wrong (7) and the rest (100).
fn refused(what: &str, s: &tonic::Status) -> CniError {
    let code = match s.code() {
        Grpc::Unavailable | Grpc::FailedPrecondition | Grpc::DeadlineExceeded => {
            Code::TryAgainLater
        }
        Grpc::NotFound | Grpc::InvalidArgument => Code::InvalidConfig,
        _ => Code::AgentRefused,
    };
    CniError::new(code, format!("{what}: {}", s.message()))
}

async fn add(env: &Env, conf: &NetConf, channel: Channel) -> Result<Value, CniError> {
    let wanted = spec::wanted(&env.args)?;
    let network = conf.network().to_string();
    // The network first: a config naming a missing one creates nothing.
    let net = NetworksClient::new(channel.clone())
        .inspect(InspectNetworkRequest {
            name: network.clone(),
        })
        .await
        .map_err(|s| refused(&format!("network {network}"), &s))?
        .into_inner()
        .network
        .ok_or_else(|| CniError::new(Code::AgentRefused, "the agent returned no network"))?;
    let mut aliases = conf.aliases();
    aliases.extend(wanted.name.clone());
    aliases.sort();
    aliases.dedup();
    let name = env.endpoint_name();
    let ep = EndpointsClient::new(channel.clone())
        .attach(AttachRequest {
            network: network.clone(),
            netns: env.netns.clone(),
            pid: 0,
            name: name.clone(),
            ip: wanted.ip.unwrap_or_default(),
            mac: wanted.mac.unwrap_or_default(),
            aliases,
            ifname: env.ifname.clone(),
        })
        .await
        .map_err(|s| refused(&format!("attaching to {network}"), &s))?
        .into_inner();
    let attached = Attached {
        ifname: env.ifname.clone(),
        mac: ep.mac,
        ip: ep.ip,
        subnet: net.subnet,
        gateway: net.gateway,
        mtu: net.mtu,
        resolver: ep.resolver,
        internal: net.internal,
    };
    match spec::add_result(&conf.cni_version, &env.netns, &attached) {
        Ok(r) => serde_json::to_value(r)
            .map_err(|e| CniError::new(Code::AgentRefused, format!("encoding the result: {e}"))),
        Err(e) => {
            // Nothing left behind on a failed ADD.
            let _ = detach(&channel, &network, &name).await;
            Err(e)
        }
    }
}

/// Detaches `name`; an endpoint or network that is already gone is done.
async fn detach(channel: &Channel, network: &str, name: &str) -> Result<(), CniError> {
    match EndpointsClient::new(channel.clone())
        .detach(DetachRequest {
            network: network.to_string(),
            name: name.to_string(),
        })
        .await
    {
        Ok(_) => Ok(()),
        Err(s) if s.code() == Grpc::NotFound => Ok(()),
        Err(s) => Err(refused(&format!("detaching {name} from {network}"), &s)),
    }
}

/// DEL is idempotent and needs neither the namespace nor `prevResult`
/// (SPEC.md "DEL").
async fn del(env: &Env, conf: &NetConf, channel: Channel) -> Result<(), CniError> {
    detach(&channel, conf.network(), &env.endpoint_name()).await
}

/// The error CHECK reports for a difference (the plugin's own range).
const CHECK_FAILED: Code = Code::AgentRefused;

async fn check(env: &Env, conf: &NetConf, channel: Channel) -> Result<(), CniError> {
    let network = conf.network();
    let name = env.endpoint_name();
    let problems = EndpointsClient::new(channel)
        .check(CheckEndpointRequest {
            network: network.to_string(),
            name: name.clone(),
        })
        .await
        .map_err(|s| refused(&format!("checking {name} in {network}"), &s))?
        .into_inner()
        .problems;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CniError::new(
            CHECK_FAILED,
            format!("{name} in {network} is not as attached"),
        )
        .with_details(problems.join("; ")))
    }
}

/// Ready for ADDs: the agent is in a cluster and knows the network.
async fn status(conf: &NetConf, channel: Channel) -> Result<(), CniError> {
    let st = ClusterClient::new(channel.clone())
        .status(StatusRequest {})
        .await
        .map_err(|s| CniError::new(Code::NotAvailable, s.message().to_string()))?
        .into_inner();
    if st.state != "active" {
        return Err(CniError::new(
            Code::NotAvailable,
            format!("the agent is {} (not in a cluster yet)", st.state),
        ));
    }
    NetworksClient::new(channel)
        .inspect(InspectNetworkRequest {
            name: conf.network().to_string(),
        })
        .await
        .map_err(|s| CniError::new(Code::NotAvailable, s.message().to_string()))?;
    Ok(())
}

/// GC (spec 1.1): detaches this host's endpoints that this plugin made in
/// the network and the runtime no longer lists. Its scope is the ovl
/// network on this host: two runtimes sharing one ovl network on one host
/// would collect each other's attachments (give each its own network).
async fn gc(conf: &NetConf, channel: Channel) -> Result<(), CniError> {
    let network = conf.network();
    let Some(valid) = &conf.valid_attachments else {
        return Err(CniError::new(
            Code::InvalidConfig,
            "GC needs cni.dev/valid-attachments (an empty list removes every attachment)",
        ));
    };
    let keep: HashSet<String> = valid
        .iter()
        .map(|a| spec::endpoint_name(&a.container_id, &a.ifname))
        .collect();
    let me = ClusterClient::new(channel.clone())
        .status(StatusRequest {})
        .await
        .map_err(|s| refused("agent status", &s))?
        .into_inner()
        .node_id;
    let eps = EndpointsClient::new(channel.clone())
        .list(ListEndpointsRequest {
            network: network.to_string(),
        })
        .await
        .map_err(|s| refused(&format!("listing {network}"), &s))?
        .into_inner()
        .endpoints;
    for ep in eps.iter().filter(|e| {
        e.node == me && e.name.starts_with(spec::ENDPOINT_PREFIX) && !keep.contains(&e.name)
    }) {
        detach(&channel, network, &ep.name).await?;
    }
    Ok(())
}
