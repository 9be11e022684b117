//! Agent options: command line, `OVL_*` environment, and an optional TOML
//! file (`--config`) whose keys are the long option names with `_` for `-`.
//! The command line wins over the file.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

use crate::keys::token::{JoinToken, TokenError};

pub const DEFAULT_GOSSIP_PORT: u16 = 7946;

#[derive(Parser, Debug, Default, Deserialize)]
#[command(
    name = "ovl-agent",
    version = concat!(env!("CARGO_PKG_VERSION"), " (git ", env!("OVL_GIT_REVISION"), ")"),
    about = "ovl overlay network agent (one per host)"
)]
#[serde(deny_unknown_fields, default)]
pub struct Options {
    /// TOML file with any of these options (keys use `_`, e.g. advertise_addr).
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Control-plane address peers reach this agent at (gossip, peer gRPC).
    #[arg(long, value_name = "IP")]
    pub advertise_addr: Option<IpAddr>,
    /// Data-path (VTEP) address [default: the advertise address].
    #[arg(long, value_name = "IP")]
    pub data_path_addr: Option<IpAddr>,
    /// Gossip (UDP) and peer gRPC (TCP) port [default: 7946].
    #[arg(long, value_name = "PORT")]
    pub gossip_port: Option<u16>,
    /// VXLAN port of plain networks [default: 4789].
    #[arg(long, value_name = "PORT")]
    pub data_path_port: Option<u16>,
    /// UDP port of the encrypted data plane [default: 4500].
    #[arg(long, value_name = "PORT")]
    pub encrypted_port: Option<u16>,
    /// Where the node identity and cluster membership persist [default: /var/lib/ovl].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Local API socket, root only [default: /run/ovl/ovl.sock].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Where networks' sandbox namespaces are mounted, as `ovl-<VNI>`
    /// [default: /run/netns, so `ip netns exec ovl-<VNI>` reaches them].
    #[arg(long, value_name = "DIR")]
    pub sandbox_dir: Option<PathBuf>,
    /// Agent of the cluster to join at start: IP or IP:PORT (repeatable).
    #[arg(long = "seed", value_name = "IP[:PORT]")]
    #[serde(alias = "seeds")]
    pub seed: Vec<String>,
    /// Join token for an unattended join (with --seed).
    #[arg(
        long,
        env = "OVL_JOIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub join_token: Option<String>,
    /// File holding the join token (so it is on no command line); exclusive
    /// with --join-token.
    #[arg(long, value_name = "PATH", conflicts_with = "join_token")]
    pub join_token_file: Option<PathBuf>,
    /// Data key rotation interval, e.g. 12h, 30m, 10s [default: 12h].
    #[arg(long, value_name = "DURATION")]
    pub key_rotation: Option<String>,
    /// How often egress firewall rules are checked and put back when
    /// something removed them (a firewall reload, `iptables -F`) [default: 30s].
    #[arg(long, value_name = "DURATION")]
    pub firewall_recheck: Option<String>,
    /// Name shown in node lists [default: the host name].
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,
    /// Log level (error, warn, info, debug, trace); OVL_LOG takes a full filter.
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Pool that networks created without --subnet take a /24 from [default: 10.0.0.0/8].
    #[arg(long, value_name = "CIDR")]
    pub default_address_pool: Option<String>,
    /// How long `endpoint attach`/`detach` wait for the network's live hosts
    /// to program the change before returning with a warning naming the
    /// lagging hosts; 0 returns at once [default: 1s].
    #[arg(long, value_name = "DURATION")]
    pub attach_wait: Option<String>,
    /// Serve Prometheus metrics (OpenMetrics text) at http://ADDR/metrics,
    /// e.g. 127.0.0.1:9946 [default: off].
    #[arg(long, value_name = "IP:PORT")]
    pub metrics_addr: Option<SocketAddr>,
    /// Serve the Docker network and IPAM plugin "ovl" on this unix
    /// socket, e.g. /run/docker/plugins/ovl.sock (docs/docker.md) [default: off].
    #[arg(long, value_name = "PATH")]
    pub docker_plugin: Option<PathBuf>,
    /// Gossip round interval; death is detected after ~10-15 rounds [default: 200ms].
    #[arg(long, value_name = "DURATION", hide = true)]
    pub gossip_interval: Option<String>,
    /// Upstream resolver for names the networks' embedded DNS does not
    /// hold (repeatable) [default: the nameservers of /etc/resolv.conf].
    #[arg(long = "dns-upstream", value_name = "IP[:PORT]")]
    pub dns_upstream: Vec<String>,
    /// Packaging only: write the man page and shell completions generated
    /// from these definitions into DIR, then exit.
    #[arg(long, value_name = "DIR", hide = true)]
    #[serde(skip)]
    pub generate_assets: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("--advertise-addr is required: the address other agents reach this one at")]
    NoAdvertiseAddr,
    #[error("--{0} {1} is not usable: give a concrete unicast address of this host")]
    BadAddr(&'static str, IpAddr),
    #[error("--{0} must not be 0")]
    ZeroPort(&'static str),
    #[error("--seed {0:?}: expected IP or IP:PORT")]
    BadSeed(String),
    #[error("--join-token: {0}")]
    Token(#[from] TokenError),
    #[error("--{0} {1:?}: {2}")]
    Duration(&'static str, String, String),
    #[error("--default-address-pool {0:?}: expected an IPv4 CIDR with prefix /8 to /24")]
    BadPool(String),
    #[error("--node-name must be 1-63 printable characters")]
    BadName,
    #[error("--join-token-file {path}: {source}")]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("give either --join-token or --join-token-file, not both")]
    TwoTokens,
    #[error("{0}")]
    BadUpstream(String),
}

/// Validated configuration the agent runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub advertise_addr: IpAddr,
    pub data_path_addr: IpAddr,
    pub gossip_port: u16,
    pub data_path_port: u16,
    pub encrypted_port: u16,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub sandbox_dir: PathBuf,
    pub seeds: Vec<SocketAddr>,
    pub join_token: Option<JoinToken>,
    pub key_rotation: Duration,
    pub firewall_recheck: Duration,
    pub node_name: String,
    pub log_level: String,
    pub gossip_interval: Duration,
    pub attach_wait: Duration,
    pub default_address_pool: ipnetwork::Ipv4Network,
    /// `None`: no metrics endpoint.
    pub metrics_addr: Option<SocketAddr>,
    /// `None`: no Docker plugin socket.
    pub docker_plugin: Option<PathBuf>,
    /// Where the embedded DNS forwards names it does not hold.
    pub dns_upstreams: Vec<SocketAddr>,
    /// MTU of the data-path interface as read at start (0: not read), so
    /// the first signed record already states it: a restarted host that
    /// published 0 until its first reconcile would move the MTU of every
    /// network it is in, twice.
    pub data_path_mtu_at_start: u32,
}

impl Config {
    pub fn gossip_addr(&self) -> SocketAddr {
        SocketAddr::new(self.advertise_addr, self.gossip_port)
    }

    /// Reads the file named by `--config`, if any, under the command line.
    pub fn load(cli: Options) -> Result<Self, ConfigError> {
        let file = match &cli.config {
            Some(path) => read_file(path)?,
            None => Options::default(),
        };
        Self::resolve(cli.overlay(file))
    }

    pub fn resolve(o: Options) -> Result<Self, ConfigError> {
        let advertise_addr = o.advertise_addr.ok_or(ConfigError::NoAdvertiseAddr)?;
        check_addr("advertise-addr", advertise_addr)?;
        let data_path_addr = o.data_path_addr.unwrap_or(advertise_addr);
        check_addr("data-path-addr", data_path_addr)?;
        let gossip_port = port("gossip-port", o.gossip_port, DEFAULT_GOSSIP_PORT)?;
        let seeds = o
            .seed
            .iter()
            .map(|s| parse_seed(s, gossip_port).ok_or_else(|| ConfigError::BadSeed(s.clone())))
            .collect::<Result<_, _>>()?;
        let node_name = match o.node_name {
            Some(n) => n,
            None => hostname(),
        };
        if node_name.is_empty() || node_name.len() > 63 || node_name.chars().any(|c| c.is_control())
        {
            return Err(ConfigError::BadName);
        }
        Ok(Self {
            advertise_addr,
            data_path_addr,
            gossip_port,
            data_path_port: port("data-path-port", o.data_path_port, 4789)?,
            encrypted_port: port("encrypted-port", o.encrypted_port, 4500)?,
            state_dir: o.state_dir.unwrap_or_else(|| "/var/lib/ovl".into()),
            socket: o.socket.unwrap_or_else(|| "/run/ovl/ovl.sock".into()),
            sandbox_dir: o.sandbox_dir.unwrap_or_else(|| "/run/netns".into()),
            seeds,
            join_token: match (o.join_token, o.join_token_file) {
                (Some(_), Some(_)) => return Err(ConfigError::TwoTokens),
                (Some(t), None) => Some(t.parse()?),
                (None, Some(path)) => Some(
                    std::fs::read_to_string(&path)
                        .map_err(|source| ConfigError::TokenFile { path, source })?
                        .parse()?,
                ),
                (None, None) => None,
            },
            key_rotation: duration(
                "key-rotation",
                o.key_rotation,
                "12h",
                Duration::from_secs(1),
            )?,
            firewall_recheck: duration(
                "firewall-recheck",
                o.firewall_recheck,
                "30s",
                Duration::from_secs(1),
            )?,
            node_name,
            log_level: o.log_level.unwrap_or_else(|| "info".into()),
            default_address_pool: parse_pool(
                o.default_address_pool.as_deref().unwrap_or("10.0.0.0/8"),
            )?,
            gossip_interval: duration(
                "gossip-interval",
                o.gossip_interval,
                "200ms",
                Duration::from_millis(10),
            )?,
            attach_wait: duration("attach-wait", o.attach_wait, "1s", Duration::ZERO)?,
            metrics_addr: o.metrics_addr,
            docker_plugin: o.docker_plugin,
            dns_upstreams: if o.dns_upstream.is_empty() {
                // Read once at start, in the host namespace (the agent's).
                std::fs::read_to_string("/etc/resolv.conf")
                    .map(|t| crate::resolv_conf::parse_resolv_conf(&t))
                    .unwrap_or_default()
            } else {
                o.dns_upstream
                    .iter()
                    .map(|u| crate::resolv_conf::parse_upstream(u))
                    .collect::<Result<_, _>>()
                    .map_err(ConfigError::BadUpstream)?
            },
            data_path_mtu_at_start: 0,
        })
    }
}

impl Options {
    /// `self` (command line) over `file`.
    fn overlay(self, file: Options) -> Options {
        Options {
            config: self.config,
            advertise_addr: self.advertise_addr.or(file.advertise_addr),
            data_path_addr: self.data_path_addr.or(file.data_path_addr),
            gossip_port: self.gossip_port.or(file.gossip_port),
            data_path_port: self.data_path_port.or(file.data_path_port),
            encrypted_port: self.encrypted_port.or(file.encrypted_port),
            state_dir: self.state_dir.or(file.state_dir),
            socket: self.socket.or(file.socket),
            sandbox_dir: self.sandbox_dir.or(file.sandbox_dir),
            seed: if self.seed.is_empty() {
                file.seed
            } else {
                self.seed
            },
            join_token: self.join_token.or(file.join_token),
            join_token_file: self.join_token_file.or(file.join_token_file),
            key_rotation: self.key_rotation.or(file.key_rotation),
            firewall_recheck: self.firewall_recheck.or(file.firewall_recheck),
            node_name: self.node_name.or(file.node_name),
            log_level: self.log_level.or(file.log_level),
            gossip_interval: self.gossip_interval.or(file.gossip_interval),
            attach_wait: self.attach_wait.or(file.attach_wait),
            default_address_pool: self.default_address_pool.or(file.default_address_pool),
            metrics_addr: self.metrics_addr.or(file.metrics_addr),
            docker_plugin: self.docker_plugin.or(file.docker_plugin),
            dns_upstream: if self.dns_upstream.is_empty() {
                file.dns_upstream
            } else {
                self.dns_upstream
            },
            generate_assets: self.generate_assets,
        }
    }
}

fn read_file(path: &Path) -> Result<Options, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

fn parse_pool(s: &str) -> Result<ipnetwork::Ipv4Network, ConfigError> {
    let bad = || ConfigError::BadPool(s.to_string());
    let n: ipnetwork::Ipv4Network = s.parse().map_err(|_| bad())?;
    if !(8..=24).contains(&n.prefix()) || n.ip() != n.network() {
        return Err(bad());
    }
    Ok(n)
}

fn check_addr(flag: &'static str, ip: IpAddr) -> Result<(), ConfigError> {
    if ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::from([255, 255, 255, 255]) {
        return Err(ConfigError::BadAddr(flag, ip));
    }
    Ok(())
}

fn port(flag: &'static str, v: Option<u16>, default: u16) -> Result<u16, ConfigError> {
    match v.unwrap_or(default) {
        0 => Err(ConfigError::ZeroPort(flag)),
        p => Ok(p),
    }
}

/// `IP` or `IP:PORT` (`[v6]:PORT` for IPv6 with a port).
pub fn parse_seed(s: &str, default_port: u16) -> Option<SocketAddr> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return (sa.port() != 0 && !sa.ip().is_unspecified()).then_some(sa);
    }
    let ip = s.parse::<IpAddr>().ok()?;
    (!ip.is_unspecified()).then_some(SocketAddr::new(ip, default_port))
}

fn duration(
    flag: &'static str,
    v: Option<String>,
    default: &str,
    min: Duration,
) -> Result<Duration, ConfigError> {
    let raw = v.unwrap_or_else(|| default.to_string());
    let d = humantime::parse_duration(&raw)
        .map_err(|e| ConfigError::Duration(flag, raw.clone(), e.to_string()))?;
    if d < min {
        return Err(ConfigError::Duration(
            flag,
            raw,
            format!("must be at least {min:?}"),
        ));
    }
    Ok(d)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "ovl-node".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(args: &[&str]) -> Options {
        Options::try_parse_from(std::iter::once("ovl-agent").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn defaults_follow_the_design() {
        let c = Config::resolve(opts(&["--advertise-addr", "198.18.0.1"])).unwrap();
        assert_eq!(c.data_path_addr, c.advertise_addr);
        assert_eq!(
            (c.gossip_port, c.data_path_port, c.encrypted_port),
            (7946, 4789, 4500)
        );
        assert_eq!(c.key_rotation, Duration::from_secs(12 * 3600));
        assert_eq!(c.socket, PathBuf::from("/run/ovl/ovl.sock"));
        assert_eq!(c.attach_wait, Duration::from_secs(1));
    }

    #[test]
    fn attach_wait_may_be_zero_but_must_parse() {
        let c = Config::resolve(opts(&[
            "--advertise-addr",
            "198.18.0.1",
            "--attach-wait",
            "0s",
        ]))
        .unwrap();
        assert_eq!(c.attach_wait, Duration::ZERO);
        let e = Config::resolve(opts(&[
            "--advertise-addr",
            "198.18.0.1",
            "--attach-wait",
            "soon",
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("--attach-wait"), "{e}");
    }

    #[test]
    fn bad_values_are_refused_with_the_flag_named() {
        for (args, want) in [
            (vec![], "--advertise-addr is required"),
            (
                vec!["--advertise-addr", "0.0.0.0"],
                "--advertise-addr 0.0.0.0",
            ),
            (
                vec!["--advertise-addr", "198.18.0.1", "--gossip-port", "0"],
                "--gossip-port",
            ),
            (
                vec!["--advertise-addr", "198.18.0.1", "--seed", "host"],
                "--seed",
            ),
            (
                vec!["--advertise-addr", "198.18.0.1", "--join-token", "x"],
                "malformed join token",
            ),
            (
                vec!["--advertise-addr", "198.18.0.1", "--key-rotation", "soon"],
                "--key-rotation",
            ),
            (
                vec!["--advertise-addr", "198.18.0.1", "--key-rotation", "1ms"],
                "at least",
            ),
        ] {
            let err = Config::resolve(opts(&args)).unwrap_err().to_string();
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }

    #[test]
    fn the_join_token_can_come_from_a_file() {
        let dir = std::env::temp_dir().join(format!("ovl-token-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        let token = "OVLTKN-1-00000000000000000000000000000001-0000000000000000000000000000000000000000000000000000000000000002";
        std::fs::write(&path, format!("{token}\n")).unwrap();
        let p = path.display().to_string();
        let c = Config::resolve(opts(&[
            "--advertise-addr",
            "198.18.0.1",
            "--join-token-file",
            &p,
        ]))
        .unwrap();
        assert_eq!(c.join_token.map(|t| t.reveal()).as_deref(), Some(token));
        let missing = dir.join("nope").display().to_string();
        let e = Config::resolve(opts(&[
            "--advertise-addr",
            "198.18.0.1",
            "--join-token-file",
            &missing,
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("--join-token-file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn seeds_take_the_gossip_port_by_default() {
        assert_eq!(
            parse_seed("198.18.0.2", 7946),
            Some("198.18.0.2:7946".parse().unwrap())
        );
        assert_eq!(
            parse_seed("198.18.0.2:8000", 7946),
            Some("198.18.0.2:8000".parse().unwrap())
        );
        assert_eq!(
            parse_seed("[2001:db8::1]:8000", 7946),
            Some("[2001:db8::1]:8000".parse().unwrap())
        );
        assert_eq!(parse_seed("0.0.0.0", 7946), None);
        assert_eq!(parse_seed("198.18.0.2:0", 7946), None);
    }

    #[test]
    fn command_line_wins_over_file() {
        let file: Options = toml::from_str(
            "advertise_addr = \"198.18.0.9\"\ngossip_port = 9000\nseeds = [\"198.18.0.1\"]\n",
        )
        .unwrap();
        let c = Config::resolve(opts(&["--gossip-port", "9001"]).overlay(file)).unwrap();
        assert_eq!(c.advertise_addr, "198.18.0.9".parse::<IpAddr>().unwrap());
        assert_eq!(c.gossip_port, 9001);
        assert_eq!(c.seeds, vec!["198.18.0.1:9001".parse().unwrap()]);
        assert!(toml::from_str::<Options>("bogus = 1").is_err());
    }
}
