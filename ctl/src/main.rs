//! ovlctl: the operator's CLI. A thin client of the local agent's gRPC API
//! over its Unix socket; every error is one line and a non-zero exit.

mod client;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use ovl_proto::api::*;

use output::Format;

#[derive(Parser)]
#[command(name = "ovlctl", version, about = "Control the local ovl agent")]
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
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Make this agent a one-node cluster and print its join token.
    Init,
    /// Join the cluster of SEED (IP or IP:PORT of an agent in it).
    Join {
        /// Join token printed by `cluster init` or `cluster join-token`.
        #[arg(long, env = "OVL_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        #[arg(required = true, value_name = "SEED")]
        seeds: Vec<String>,
    },
    /// Print the cluster's join token again.
    JoinToken,
    /// Leave the cluster cleanly (peers list this node as left).
    Leave,
    /// This agent's state, and why it is in it.
    Status,
    /// Every node of the cluster and whether it is alive.
    Nodes,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    eprintln!("ovlctl: error: {line}");
    ExitCode::FAILURE
}

async fn run(socket: PathBuf, format: Format, command: Command) -> Result<(), String> {
    let mut c = client::connect(&socket).await?;
    match command {
        Command::Cluster(cmd) => match cmd {
            ClusterCmd::Init => {
                let r = client::call(c.init(InitRequest {})).await?;
                output::init(format, &r);
            }
            ClusterCmd::Join { token, seeds } => {
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
