use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use ovl_agent::api;
use ovl_agent::cluster::Cluster;
use ovl_agent::config::{Config, Options};
use ovl_agent::core::{Core, Ipam};
use ovl_agent::dataplane::encrypted::{EncryptedVtep, Engine, EngineConfig};
use ovl_agent::dataplane::{Dataplane, DataplaneConfig, NetworkMode, VxlanConfig};
use ovl_agent::keys::identity::Identity;
use ovl_agent::metrics::Counters;
use ovl_agent::peer::{self, TlsIdentity};
use ovl_agent::store::Store;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing::{error, info};

fn main() -> ExitCode {
    let options = Options::parse();
    if let Some(dir) = &options.generate_assets {
        return match write_assets(dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!(
                    "ovl-agent: error: generate assets in {}: {e}",
                    dir.display()
                );
                ExitCode::FAILURE
            }
        };
    }
    let config = match Config::load(options) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ovl-agent: error: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(&config.log_level);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ovl-agent: error: start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("ovl-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Packaging: DIR/man/ovl-agent.8 (a daemon: section 8) and the bash, zsh
/// and fish completions, generated from the clap definitions.
fn write_assets(dir: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    let mut cmd = Options::command();
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .section("8")
        .render(&mut page)?;
    std::fs::write(man.join("ovl-agent.8"), page)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd, "ovl-agent", &completions)?;
    }
    Ok(())
}

/// Why a supervised task ended, for the exit message.
fn task_end<T: std::fmt::Debug, E: std::fmt::Display>(
    name: &str,
    r: Result<Result<T, E>, tokio::task::JoinError>,
) -> String {
    match r {
        Ok(Ok(v)) => format!("{name} task ended unexpectedly ({v:?})"),
        Ok(Err(e)) => format!("{name} task failed: {e}"),
        Err(e) if e.is_panic() => format!("{name} task panicked"),
        Err(e) => format!("{name} task was cancelled: {e}"),
    }
}

/// A socket file left behind would make dockerd (or ovlctl) wait on a
/// dead path instead of failing at once.
fn remove_sockets(api: &std::path::Path, docker: Option<&std::path::Path>) {
    let _ = std::fs::remove_file(api);
    if let Some(p) = docker {
        let _ = std::fs::remove_file(p);
    }
}

fn init_tracing(level: &str) {
    let filter = std::env::var("OVL_LOG")
        .ok()
        .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| {
            tracing_subscriber::EnvFilter::try_new(format!("warn,ovl_agent={level}"))
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,ovl_agent=info"))
        });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

async fn run(config: Config) -> anyhow::Result<()> {
    let rng = ring::rand::SystemRandom::new();
    let identity = Identity::load_or_create(&config.state_dir, &rng)?;
    // The peer channel's certificate: self-signed by the identity key,
    // pinned by peers to our node id.
    let tls = Arc::new(TlsIdentity::from_pkcs8(identity.pkcs8()).context("peer TLS certificate")?);
    let peer_tls = tls.server_config().context("peer TLS configuration")?;
    info!(node = %identity.node_id, name = %config.node_name, advertise = %config.advertise_addr,
          data_path = %config.data_path_addr, state_dir = %config.state_dir.display(), "agent starting");

    // Bind everything before joining, so a port or socket clash fails the
    // start instead of leaving a half-running member.
    let peer_addr = config.gossip_addr();
    let peer_listener = tokio::net::TcpListener::bind(peer_addr)
        .await
        .with_context(|| format!("bind peer gRPC {peer_addr}/tcp"))?;
    let api_listener = api::bind_socket(&config.socket)?;
    let metrics_listener = match config.metrics_addr {
        Some(addr) => Some(ovl_agent::exporter::bind(addr).await?),
        None => None,
    };
    let docker_listener = match &config.docker_plugin {
        Some(path) => Some(
            ovl_agent::docker::server::bind(path)
                .with_context(|| format!("bind the Docker plugin socket {}", path.display()))?,
        ),
        None => None,
    };
    let socket_path = config.socket.clone();
    let docker_socket = config.docker_plugin.clone();

    let counters = Arc::new(Counters::default());
    let state_dir = config.state_dir.clone();
    let default_pool = config.default_address_pool;
    let node_id = identity.node_id;
    let store = Store::load(&state_dir, node_id, counters.clone())?;
    let ipam = Ipam::load(&state_dir, identity.key.clone())?;
    let mut dataplane = Dataplane::new(DataplaneConfig {
        vxlan: VxlanConfig {
            port: config.data_path_port,
        },
        firewall_recheck: config.firewall_recheck,
        ..DataplaneConfig::new(config.sandbox_dir.clone())
    })
    .await
    .context("open netlink")?;
    // Encrypted networks: the userspace VTEP, bound before joining like
    // every other socket (a taken port fails the start).
    let engine = Engine::start(EngineConfig {
        bind: std::net::SocketAddr::new(config.data_path_addr, config.encrypted_port),
        workers: std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
        netns: None,
    })
    .context("start the encrypted data plane")?;
    let encrypted = EncryptedVtep::new(engine.clone());
    dataplane.set_vtep(NetworkMode::Encrypted, encrypted.clone());
    let key_rotation = config.key_rotation;
    let mut config = config;
    // Read before the cluster starts: its first record states it.
    match dataplane.refresh_underlay(config.data_path_addr).await {
        Ok(mtu) => config.data_path_mtu_at_start = mtu,
        Err(e) => {
            tracing::warn!(error = %e, "data-path interface not readable at start; its MTU is published once it is")
        }
    }
    let channels = Arc::new(peer::Channels::new(tls, counters.clone()));
    let cluster = Cluster::start(config, identity, counters.clone(), channels.clone()).await?;
    let core = Core::new(
        cluster.view(),
        store,
        counters.clone(),
        dataplane,
        ipam,
        default_pool,
    );
    core.set_channels(channels.clone());
    core.set_engine(engine.clone());
    if let Err(e) = core.refresh_underlay().await {
        tracing::warn!(error = %e, "reading the data-path interface failed; the reconciler retries");
    }
    let mut sync_task = tokio::spawn(ovl_agent::sync::run(core.clone(), channels));
    let mut reconcile_task = tokio::spawn(ovl_agent::reconcile::run(core.clone()));
    // Not supervised: without miss notifications the periodic pass still
    // repairs everything, only later (it logs why it stopped).
    tokio::spawn(ovl_agent::repair::run(core.clone()));
    let mut gossip_fatal = cluster.fatal();
    let mut keying_task = tokio::spawn(ovl_agent::keying::run(
        cluster.view(),
        encrypted.peers(),
        encrypted.clone(),
        key_rotation,
        counters.clone(),
    ));
    let mut engine_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        while engine.healthy() {
            tick.tick().await;
        }
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let peer_server = ovl_agent::peer_api::server()
        .add_service(ovl_agent::peer_api::service(
            core.clone(),
            cluster.clone(),
            counters.clone(),
        ))
        .serve_with_incoming_shutdown(
            peer::incoming(peer_listener, peer_tls, counters.clone()),
            stopped(stop_rx.clone()),
        );
    let api_server = api::serve(
        api_listener,
        core.clone(),
        cluster.clone(),
        counters,
        stopped(stop_rx.clone()),
    );
    let mut metrics_task = tokio::spawn({
        let core = core.clone();
        async move {
            match metrics_listener {
                Some(l) => ovl_agent::exporter::serve(l, core).await,
                None => std::future::pending().await,
            }
        }
    });
    let docker_plugin = match docker_listener {
        Some(l) => Some((
            l,
            Arc::new(
                ovl_agent::docker::Plugin::load(core.clone(), &state_dir)
                    .context("load the Docker plugin's state")?,
            ),
        )),
        None => None,
    };
    let mut docker_task = tokio::spawn(async move {
        match docker_plugin {
            Some((l, plugin)) => ovl_agent::docker::server::serve(l, plugin).await,
            None => std::future::pending().await,
        }
    });
    let mut peer_task = tokio::spawn(peer_server);
    let mut api_task = tokio::spawn(api_server);
    info!(socket = %socket_path.display(), peer = %peer_addr, "agent ready");

    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    // Every long-running task is supervised: one that ends on its own is a
    // bug or a broken socket, and an agent running on without it would be a
    // zombie (a frozen view, a deaf server). Exit non-zero instead, so
    // systemd restarts us (DESIGN.md "Agent internals").
    let died = tokio::select! {
        _ = term.recv() => { info!("SIGTERM: shutting down"); None }
        _ = int.recv() => { info!("SIGINT: shutting down"); None }
        r = &mut sync_task => Some(task_end("table sync", r.map(Ok::<(), String>))),
        r = &mut reconcile_task => Some(task_end("reconciler", r.map(Ok::<(), String>))),
        r = &mut keying_task => Some(task_end("key schedule", r.map(Ok::<(), String>))),
        r = &mut engine_task => Some(task_end("encrypted data plane (a worker thread died)", r.map(Ok::<(), String>))),
        r = &mut metrics_task => Some(task_end("metrics endpoint", r.map(Ok::<(), String>))),
        r = &mut docker_task => Some(task_end("Docker plugin", r.map(Ok::<(), String>))),
        r = &mut peer_task => Some(task_end("peer server", r.map(|r| r.map_err(|e| e.to_string())))),
        r = &mut api_task => Some(task_end("API server", r.map(|r| r.map_err(|e| e.to_string())))),
        r = gossip_fatal.wait_for(Option::is_some) => Some(match r {
            Ok(reason) => format!("gossip task died: {}", reason.clone().unwrap_or_default()),
            Err(_) => "gossip supervisor gone".to_string(),
        }),
    };
    if let Some(why) = died {
        error!(reason = %why, "a supervised task ended; exiting so the service manager restarts the agent");
        remove_sockets(&socket_path, docker_socket.as_deref());
        anyhow::bail!("{why}");
    }
    let _ = stop_tx.send(true);
    cluster.shutdown().await;
    let (p, a) = tokio::join!(peer_task, api_task);
    if let Ok(Err(e)) = p {
        error!(error = %e, "peer server stopped with an error");
    }
    if let Ok(Err(e)) = a {
        error!(error = %e, "API server stopped with an error");
    }
    remove_sockets(&socket_path, docker_socket.as_deref());
    info!("agent stopped");
    Ok(())
}
