//! ovlctl: the operator's CLI. A thin client of the local agent's gRPC API
//! over its Unix socket; every error is one line and a non-zero exit.

mod assets;
mod encryption;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use ovl_proto::api::*;

use output::Format;
use ovlctl::client;

#[derive(Parser)]
#[command(
    name = "ovlctl",
    version = concat!(env!("CARGO_PKG_VERSION"), " (git ", env!("OVL_GIT_REVISION"), ")"),
    about = "Control the local ovl agent"
)]
struct Cli {
    /// The agent's API socket.
    #[arg(
        long,
        env = "OVL_SOCKET",
        default_value = "/run/ovl/ovl.sock",
        global = true
    )]
    socket: PathBuf,
    /// Output format.
    #[arg(long, value_enum, default_value_t = FormatArg::Table, global = true)]
    format: FormatArg,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Cluster membership.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Overlay networks.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Endpoints: network namespaces attached to networks.
    #[command(subcommand)]
    Endpoint(EndpointCmd),
    /// Nodes of the cluster.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Diagnostic: a network's desired FDB/neighbour entries next to the kernel's.
    Fdb { network: String },
    /// Peer hosts of the encrypted data plane: key epoch in use, next
    /// rotation, key fingerprints, traffic and drops per host, and totals.
    Peers,
    /// Packaging only: write man pages and shell completions into DIR.
    #[command(hide = true)]
    GenerateAssets { dir: PathBuf },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Remove a node (like `docker node rm`): members refuse its gossip and
    /// peer calls, its endpoints are withdrawn everywhere, and the join
    /// token is rotated. NODE is a node id, an id prefix or a name.
    Rm { node: String },
}

#[derive(Subcommand)]
enum NetworkCmd {
    /// Create an overlay network, replicated to every agent.
    Create {
        name: String,
        /// IPv4 subnet (CIDR) [default: a free /24 of the agent's default pool].
        #[arg(long)]
        subnet: Option<String>,
        /// Gateway address (reserved, never given to an endpoint) [default: first host].
        #[arg(long)]
        gateway: Option<String>,
        /// Allocate endpoint addresses only from this part of the subnet.
        #[arg(long)]
        ip_range: Option<String>,
        /// VXLAN network id, 1-16777215 [default: allocated].
        #[arg(long)]
        vni: Option<u64>,
        /// Endpoint MTU [default: data-path interface MTU - 50, or - 78 with
        /// --encrypted].
        #[arg(long)]
        mtu: Option<u32>,
        /// Encrypt traffic between hosts (userspace AES-256-GCM data plane);
        /// fixed at creation.
        #[arg(long)]
        encrypted: bool,
        /// Allow standalone attaches (recorded for runtimes).
        #[arg(long)]
        attachable: bool,
        /// No external access (recorded for runtimes).
        #[arg(long)]
        internal: bool,
        /// KEY=VALUE (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
    },
    /// List networks.
    Ls,
    /// Show a network, its hosts and endpoints.
    Inspect { name: String },
    /// Remove a network (refused while it has endpoints, unless --force).
    Rm {
        name: String,
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand)]
enum EndpointCmd {
    /// Attach a network namespace to a network.
    Attach {
        network: String,
        /// Namespace file, e.g. /run/netns/NAME or /proc/PID/ns/net.
        #[arg(long, conflicts_with = "pid", required_unless_present = "pid")]
        netns: Option<String>,
        /// Process whose network namespace to attach.
        #[arg(long)]
        pid: Option<u32>,
        #[arg(long)]
        name: Option<String>,
        /// Address to use [default: allocated].
        #[arg(long)]
        ip: Option<String>,
        /// MAC address [default: derived from the IP].
        #[arg(long)]
        mac: Option<String>,
        #[arg(long = "alias")]
        aliases: Vec<String>,
        /// Interface name inside the namespace.
        #[arg(long, default_value = "eth0")]
        ifname: String,
    },
    /// Detach an endpoint (on the host it lives on).
    Detach { network: String, name: String },
    /// List endpoints cluster-wide.
    Ls {
        #[arg(long)]
        network: Option<String>,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Make this agent a one-node cluster and print its join token.
    Init,
    /// Join the cluster of SEED (IP or IP:PORT of an agent in it).
    Join {
        /// Join token printed by `cluster init` or `cluster join-token`.
        #[arg(
            long,
            env = "OVL_JOIN_TOKEN",
            hide_env_values = true,
            required_unless_present = "token_file"
        )]
        token: Option<String>,
        /// File holding the join token (so it is on no command line).
        #[arg(long, value_name = "PATH", conflicts_with = "token")]
        token_file: Option<std::path::PathBuf>,
        #[arg(required = true, value_name = "SEED")]
        seeds: Vec<String>,
    },
    /// Print the cluster's join token again.
    JoinToken,
    /// Replace the join token: the new one (printed) admits new nodes, the
    /// old one stops admitting, members stay.
    RotateToken,
    /// Leave the cluster cleanly (peers list this node as left).
    Leave,
    /// This agent's state, and why it is in it.
    Status,
    /// Every node of the cluster and whether it is alive.
    Nodes,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::GenerateAssets { dir } = &cli.command {
        return match assets::write(Cli::command(), dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&format!("generate assets in {}: {e}", dir.display())),
        };
    }
    let format = match cli.format {
        FormatArg::Table => Format::Table,
        FormatArg::Json => Format::Json,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return fail(&format!("start runtime: {e}")),
    };
    match runtime.block_on(run(cli.socket, format, cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(msg: &str) -> ExitCode {
    // One line, whatever the cause said.
    let line = msg.replace('\n', " ");
    eprintln!("ovlctl: error: {}", output::escape(&line));
    ExitCode::FAILURE
}

async fn run(socket: PathBuf, format: Format, command: Command) -> Result<(), String> {
    let channel = client::connect(&socket).await?;
    let mut c = ovl_proto::api::cluster_client::ClusterClient::new(channel.clone());
    let mut n = ovl_proto::api::networks_client::NetworksClient::new(channel.clone());
    let mut e = ovl_proto::api::endpoints_client::EndpointsClient::new(channel);
    match command {
        Command::Network(cmd) => match cmd {
            NetworkCmd::Create {
                name,
                subnet,
                gateway,
                ip_range,
                vni,
                mtu,
                encrypted,
                attachable,
                internal,
                labels,
            } => {
                if vni == Some(0) {
                    return Err("--vni must be between 1 and 16777215, got 0".into());
                }
                let labels = labels
                    .iter()
                    .map(|l| match l.split_once('=') {
                        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
                        _ => Err(format!("--label {l:?}: expected KEY=VALUE")),
                    })
                    .collect::<Result<_, _>>()?;
                let r = client::call(n.create(CreateNetworkRequest {
                    name,
                    subnet: subnet.unwrap_or_default(),
                    gateway: gateway.unwrap_or_default(),
                    ip_range: ip_range.unwrap_or_default(),
                    vni: vni.unwrap_or(0),
                    mtu: mtu.unwrap_or(0),
                    encrypted,
                    attachable,
                    internal,
                    labels,
                }))
                .await?;
                output::network(format, &r);
            }
            NetworkCmd::Ls => {
                let r = client::call(n.list(ListNetworksRequest {})).await?;
                output::networks(format, &r.networks);
            }
            NetworkCmd::Inspect { name } => {
                let r = client::call(n.inspect(InspectNetworkRequest { name })).await?;
                output::network_detail(format, &r);
            }
            NetworkCmd::Rm { name, force } => {
                let r = client::call(n.remove(RemoveNetworkRequest { name, force })).await?;
                output::message(format, &format!("removed network {}", r.id));
            }
        },
        Command::Endpoint(cmd) => match cmd {
            EndpointCmd::Attach {
                network,
                netns,
                pid,
                name,
                ip,
                mac,
                aliases,
                ifname,
            } => {
                let r = client::call(e.attach(AttachRequest {
                    network,
                    netns: netns.unwrap_or_default(),
                    pid: pid.unwrap_or(0),
                    name: name.unwrap_or_default(),
                    ip: ip.unwrap_or_default(),
                    mac: mac.unwrap_or_default(),
                    aliases,
                    ifname,
                }))
                .await?;
                output::endpoint(format, &r);
                output::lagging(&format!("attached endpoint {}", r.id), &r.lagging);
            }
            EndpointCmd::Detach { network, name } => {
                let r = client::call(e.detach(DetachRequest { network, name })).await?;
                output::message(format, &format!("detached endpoint {}", r.id));
                output::lagging(&format!("detached endpoint {}", r.id), &r.lagging);
            }
            EndpointCmd::Ls { network } => {
                let r = client::call(e.list(ListEndpointsRequest {
                    network: network.unwrap_or_default(),
                }))
                .await?;
                output::endpoints(format, &r.endpoints);
            }
        },
        Command::Node(NodeCmd::Rm { node }) => {
            let r = client::call(c.remove_node(RemoveNodeRequest { node })).await?;
            output::node_removed(format, &r);
        }
        Command::GenerateAssets { .. } => return Err("generate-assets needs no agent".to_owned()),
        Command::Peers => {
            let r = client::call(n.peers(PeersRequest {})).await?;
            output::peers(format, &r);
        }
        Command::Fdb { network } => {
            let r = client::call(n.fdb(FdbRequest { name: network })).await?;
            output::fdb(format, &r);
        }
        Command::Cluster(cmd) => match cmd {
            ClusterCmd::Init => {
                let r = client::call(c.init(InitRequest {})).await?;
                output::init(format, &r);
            }
            ClusterCmd::Join {
                token,
                token_file,
                seeds,
            } => {
                let token = match (token, token_file) {
                    (Some(t), _) => t,
                    (None, Some(path)) => std::fs::read_to_string(&path)
                        .map_err(|e| format!("--token-file {}: {e}", path.display()))?
                        .trim()
                        .to_string(),
                    (None, None) => return Err("give --token or --token-file".into()),
                };
                let r = client::call(c.join(JoinRequest {
                    join_token: token,
                    seeds,
                }))
                .await?;
                output::join(format, &r);
            }
            ClusterCmd::JoinToken => {
                let r = client::call(c.join_token(JoinTokenRequest {})).await?;
                output::join_token(format, &r);
            }
            ClusterCmd::RotateToken => {
                let r = client::call(c.rotate_token(RotateTokenRequest {})).await?;
                output::join_token(format, &r);
            }
            ClusterCmd::Leave => {
                client::call(c.leave(LeaveRequest {})).await?;
                output::message(format, "left the cluster");
            }
            ClusterCmd::Status => {
                let r = client::call(c.status(StatusRequest {})).await?;
                output::status(format, &r);
            }
            ClusterCmd::Nodes => {
                let r = client::call(c.nodes(NodesRequest {})).await?;
                output::nodes(format, &r.nodes);
            }
        },
    }
    Ok(())
}
