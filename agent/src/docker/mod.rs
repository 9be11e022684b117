//! Docker's remote network driver and remote IPAM driver, both named
//! `ovl`, served by the agent on a unix socket
//! (`--docker-plugin /run/docker/plugins/ovl.sock`). A Docker network
//! stands for an ovl network (`-o network=NAME`): creating it on a host
//! creates the ovl network or adopts the existing one, so the same
//! command on every host joins one cluster-wide network. Addresses come
//! from ovl's distributed IPAM; `Join` hands Docker a veth whose other
//! end is on the network's bridge. See docs/docker.md.

pub mod protocol;
pub mod server;
pub mod state;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::core::{AttachSpec, Core, CoreError, CreateSpec, NetnsRef};
use crate::ids::{EndpointId, MacAddr};
use crate::metrics::{Counter, RateLimit};
use crate::store::NetworkView;
use protocol::*;
use state::{DockerEndpoint, PluginState, Reservation, STATE_FILE, short};

static REFUSED_LOG: RateLimit = RateLimit::new(Duration::from_secs(10));

#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("Docker plugin state {0}: {1}")]
    State(PathBuf, String),
}

/// A refusal: its text is what `docker` prints.
type Refusal = String;

fn bad<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> Refusal + '_ {
    move |e| format!("{what}: {e}")
}

fn decode<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, Refusal> {
    // Activate and GetCapabilities carry `null` or nothing.
    if body.iter().all(u8::is_ascii_whitespace) || body == b"null" {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(bad("malformed request"))
}

/// `IP` or `IP/len` (Docker writes both) as an address.
fn parse_ip(s: &str) -> Result<Ipv4Addr, Refusal> {
    let ip = s.split_once('/').map_or(s, |(ip, _)| ip);
    ip.parse()
        .map_err(|_| format!("{s:?} is not an IPv4 address"))
}

/// The veth end Docker moves into the container: `ovd` + 12 hex of the
/// Docker endpoint id (15 characters, the kernel's limit).
fn handoff_ifname(endpoint: &str) -> String {
    format!("ovd{}", short(endpoint))
}

/// Docker ids are hex; anything else never names a device or an endpoint.
fn check_id(what: &str, id: &str) -> Result<(), Refusal> {
    if id.len() < 12 || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{what} {id:?} is not a Docker id"));
    }
    Ok(())
}

pub struct Plugin {
    core: Arc<Core>,
    file: PathBuf,
    state: Mutex<PluginState>,
}

impl Plugin {
    /// Reads the plugin's state from the agent's state directory.
    pub fn load(core: Arc<Core>, state_dir: &Path) -> Result<Self, DockerError> {
        let file = state_dir.join(STATE_FILE);
        let err = |e: String| DockerError::State(file.clone(), e);
        let state = match crate::persist::read_optional(&file).map_err(|e| err(e.to_string()))? {
            Some(bytes) => PluginState::parse(&bytes).map_err(|e| err(e.to_string()))?,
            None => PluginState::default(),
        };
        info!(
            networks = state.networks.len(),
            endpoints = state.endpoints.len(),
            reservations = state.reservations.len(),
            "Docker plugin state loaded"
        );
        Ok(Self {
            core,
            file,
            state: Mutex::new(state),
        })
    }

    /// Persist before replying: what Docker was told survives a crash.
    fn save(&self, s: &PluginState) -> Result<(), Refusal> {
        crate::persist::write_atomic(&self.file, &s.to_bytes())
            .map_err(|e| format!("saving the plugin state: {e}"))
    }

    /// One request: the URL path names the call, the body is its JSON.
    /// Returns the reply's JSON; a refusal becomes `{"Err": …}`.
    pub async fn handle(&self, call: &str, body: &[u8]) -> Value {
        match self.dispatch(call, body).await {
            Ok(v) => v,
            Err(e) => {
                self.core.counters.inc(Counter::DockerRefused);
                if let Some(suppressed) = REFUSED_LOG.check(Instant::now()) {
                    warn!(call, error = %e, suppressed, "Docker plugin request refused");
                }
                json!({ "Err": e })
            }
        }
    }

    async fn dispatch(&self, call: &str, body: &[u8]) -> Result<Value, Refusal> {
        match call {
            "/Plugin.Activate" => Ok(json!({"Implements": ["NetworkDriver", "IpamDriver"]})),
            // Local scope: every host runs its own agent and plugin, and
            // the ovl network (not Docker) spans the cluster.
            "/NetworkDriver.GetCapabilities" => {
                Ok(json!({"Scope": "local", "ConnectivityScope": "local"}))
            }
            "/IpamDriver.GetCapabilities" => {
                Ok(json!({"RequiresMACAddress": false, "RequiresRequestReplay": false}))
            }
            "/IpamDriver.GetDefaultAddressSpaces" => Ok(json!({
                "LocalDefaultAddressSpace": ADDRESS_SPACE,
                "GlobalDefaultAddressSpace": ADDRESS_SPACE,
            })),
            "/IpamDriver.RequestPool" => self.request_pool(decode(body)?),
            "/IpamDriver.ReleasePool" => {
                let r: ReleasePool = decode(body)?;
                info!(pool = %r.pool_id, "Docker released IPAM pool");
                Ok(json!({}))
            }
            "/IpamDriver.RequestAddress" => self.request_address(decode(body)?).await,
            "/IpamDriver.ReleaseAddress" => self.release_address(decode(body)?).await,
            "/NetworkDriver.CreateNetwork" => self.create_network(decode(body)?).await,
            "/NetworkDriver.DeleteNetwork" => self.delete_network(decode(body)?).await,
            "/NetworkDriver.CreateEndpoint" => self.create_endpoint(decode(body)?).await,
            "/NetworkDriver.DeleteEndpoint" => self.delete_endpoint(decode(body)?).await,
            "/NetworkDriver.Join" => self.join(decode(body)?).await,
            "/NetworkDriver.Leave" => self.leave(decode(body)?).await,
            "/NetworkDriver.EndpointOperInfo" => Ok(json!({"Value": {}})),
            "/NetworkDriver.DiscoverNew"
            | "/NetworkDriver.DiscoverDelete"
            | "/NetworkDriver.ProgramExternalConnectivity"
            | "/NetworkDriver.RevokeExternalConnectivity" => Ok(json!({})),
            "/NetworkDriver.AllocateNetwork" | "/NetworkDriver.FreeNetwork" => Err(
                "ovl's Docker plugin serves local-scope networks: create the network on each host (swarm-scoped networks are not supported)".into(),
            ),
            other => Err(format!("unknown plugin call {other:?}")),
        }
    }

    fn request_pool(&self, r: RequestPool) -> Result<Value, Refusal> {
        if r.v6 {
            return Err("ovl networks are IPv4 only: leave --ipv6 off".into());
        }
        if r.pool.is_empty() {
            return Err("give --subnet: ovl's IPAM serves the subnet of the ovl network named by -o network=NAME".into());
        }
        if !r.sub_pool.is_empty() {
            return Err("--ip-range is not taken by the Docker plugin: create the ovl network with `ovlctl network create --ip-range` first; Docker then adopts it".into());
        }
        let subnet: Ipv4Network = r.pool.parse().map_err(bad("--subnet"))?;
        if subnet.ip() != subnet.network() {
            return Err(format!(
                "--subnet {subnet}: host bits set (did you mean {}/{}?)",
                subnet.network(),
                subnet.prefix()
            ));
        }
        // The pool id is the subnet: a restarted dockerd or agent finds
        // the same pool without any state of its own.
        Ok(serde_json::to_value(PoolReply {
            pool_id: subnet.to_string(),
            pool: subnet.to_string(),
            data: Default::default(),
        })
        .unwrap_or_default())
    }

    /// Active ovl networks on `subnet`.
    async fn networks_on(&self, subnet: &str) -> Vec<NetworkView> {
        self.core
            .network_list()
            .await
            .into_iter()
            .map(|i| i.view)
            .filter(|v| v.conflict.is_none() && v.pool.subnet.to_string() == subnet)
            .collect()
    }

    async fn request_address(&self, r: RequestAddress) -> Result<Value, Refusal> {
        let subnet: Ipv4Network = r.pool_id.parse().map_err(bad("pool"))?;
        let prefix = subnet.prefix();
        let asked = match r.address.as_str() {
            "" => None,
            a => Some(parse_ip(a)?),
        };
        if r.options.get(REQUEST_ADDRESS_TYPE).map(String::as_str) == Some(GATEWAY_ADDRESS_TYPE) {
            return self.gateway_address(&r.pool_id, subnet, asked).await;
        }
        let ovl = self.state.lock().await.ovl_of_pool(&r.pool_id)?.to_string();
        // No lock across the allocation: it may ask a peer for space.
        let (id, ip, _) = self
            .core
            .reserve_address(&ovl, asked)
            .await
            .map_err(|e| e.to_string())?;
        let mut s = self.state.lock().await;
        s.reservations.insert(
            ip,
            Reservation {
                ovl: ovl.clone(),
                endpoint: id.to_string(),
            },
        );
        if let Err(e) = self.save(&s) {
            s.reservations.remove(&ip);
            drop(s);
            let _ = self.core.release_reserved(&ovl, ip).await;
            return Err(e);
        }
        Ok(serde_json::to_value(AddressReply {
            address: format!("{ip}/{prefix}"),
            data: Default::default(),
        })
        .unwrap_or_default())
    }

    /// The network's gateway: ovl serves it on every host, so it is never
    /// allocated. An existing ovl network on the subnet decides it.
    async fn gateway_address(
        &self,
        pool: &str,
        subnet: Ipv4Network,
        asked: Option<Ipv4Addr>,
    ) -> Result<Value, Refusal> {
        let existing = self.networks_on(pool).await;
        let gw = match (existing.as_slice(), asked) {
            ([], Some(gw)) => gw,
            ([], None) => subnet
                .nth(1)
                .ok_or_else(|| format!("--subnet {subnet} has no host addresses"))?,
            ([net], Some(gw)) if gw != net.pool.gateway => {
                return Err(format!(
                    "--gateway {gw}: ovl network {:?} on {subnet} has gateway {}",
                    net.name(),
                    net.pool.gateway
                ));
            }
            ([net], _) => net.pool.gateway,
            (many, _) => {
                let names: Vec<&str> = many.iter().map(|n| n.name()).collect();
                return Err(format!(
                    "several ovl networks use {subnet} ({}): give each its own subnet on a Docker host",
                    names.join(", ")
                ));
            }
        };
        Ok(json!({"Address": format!("{gw}/{}", subnet.prefix()), "Data": {}}))
    }

    async fn release_address(&self, r: ReleaseAddress) -> Result<Value, Refusal> {
        let ip = parse_ip(&r.address)?;
        let mut s = self.state.lock().await;
        // The gateway was never allocated; an attached endpoint's address
        // was freed by its detach: only a reservation is given back.
        let Some(res) = s.reservations.remove(&ip) else {
            return Ok(json!({}));
        };
        self.save(&s)?;
        drop(s);
        self.core
            .release_reserved(&res.ovl, ip)
            .await
            .map_err(|e| e.to_string())?;
        Ok(json!({}))
    }

    async fn create_network(&self, r: CreateNetwork) -> Result<Value, Refusal> {
        check_id("network", &r.network_id)?;
        let opts = NetworkOptions::parse(&r.options).map_err(|e| e.to_string())?;
        if !r.ipv6_data.is_empty() {
            return Err("ovl networks are IPv4 only: leave --ipv6 off".into());
        }
        let [v4] = r.ipv4_data.as_slice() else {
            return Err("give exactly one --subnet".into());
        };
        if v4.address_space != ADDRESS_SPACE {
            return Err("use --ipam-driver ovl: Docker's default IPAM would hand out the same addresses on every host".into());
        }
        let subnet: Ipv4Network = v4.pool.parse().map_err(bad("--subnet"))?;
        let gateway = parse_ip(&v4.gateway)?;
        // Refused before anything is created.
        self.state
            .lock()
            .await
            .clone()
            .bind_network(&r.network_id, &opts.name, &v4.pool)
            .map_err(|e| e.to_string())?;
        let adopted = match self.core.find_network_synced(&opts.name).await {
            Ok(net) => {
                check_adoptable(&net, subnet, gateway, &opts)?;
                true
            }
            Err(CoreError::NoNetwork(_)) => {
                self.core
                    .network_create(CreateSpec {
                        name: opts.name.clone(),
                        subnet: subnet.to_string(),
                        gateway: gateway.to_string(),
                        ip_range: String::new(),
                        vni: 0,
                        mtu: opts.mtu,
                        encrypted: opts.encrypted,
                        attachable: true,
                        internal: opts.internal,
                        labels: Default::default(),
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                false
            }
            Err(e) => return Err(e.to_string()),
        };
        let mut s = self.state.lock().await;
        s.bind_network(&r.network_id, &opts.name, &v4.pool)
            .map_err(|e| e.to_string())?;
        self.save(&s)?;
        info!(docker_network = %short(&r.network_id), network = %opts.name, subnet = %subnet, adopted,
              "Docker network bound to the ovl network");
        Ok(json!({}))
    }

    async fn delete_network(&self, r: NetworkRef) -> Result<Value, Refusal> {
        let mut s = self.state.lock().await;
        if let Some(n) = s.networks.remove(&r.network_id) {
            self.save(&s)?;
            // The ovl network is cluster-wide: other hosts may still use it.
            info!(docker_network = %short(&r.network_id), network = %n.ovl,
                  "Docker network removed; the ovl network stays (`ovlctl network rm` removes it)");
        }
        Ok(json!({}))
    }

    async fn create_endpoint(&self, r: CreateEndpoint) -> Result<Value, Refusal> {
        check_id("endpoint", &r.endpoint_id)?;
        let mut s = self.state.lock().await;
        let net = s.network(&r.network_id).map_err(|e| e.to_string())?.clone();
        let iface = r
            .interface
            .ok_or("no address from the IPAM: create the network with --ipam-driver ovl")?;
        if !iface.address_ipv6.is_empty() {
            return Err("ovl networks are IPv4 only".into());
        }
        let ip = parse_ip(&iface.address)?;
        let res = match s.reservations.get(&ip) {
            Some(res) if res.ovl == net.ovl => res.clone(),
            _ => return Err(state::StateError::NotReserved(ip).to_string()),
        };
        let (mac, reply) = match iface.mac_address.as_str() {
            "" => {
                let mac = MacAddr::from_ipv4(ip).to_string();
                (mac.clone(), json!({"Interface": {"MacAddress": mac}}))
            }
            m => {
                let mac: MacAddr = m.parse().map_err(bad("--mac-address"))?;
                (mac.to_string(), json!({}))
            }
        };
        s.endpoints.insert(
            r.endpoint_id.clone(),
            DockerEndpoint {
                network: r.network_id.clone(),
                ovl: net.ovl.clone(),
                endpoint: res.endpoint,
                ip,
                mac,
                joined: false,
            },
        );
        self.save(&s)?;
        Ok(reply)
    }

    async fn join(&self, r: Join) -> Result<Value, Refusal> {
        let ep = self
            .state
            .lock()
            .await
            .endpoints
            .get(&r.endpoint_id)
            .cloned()
            .ok_or_else(|| state::StateError::UnknownEndpoint(short(&r.endpoint_id)).to_string())?;
        let id: EndpointId = ep.endpoint.parse().map_err(bad("plugin state"))?;
        let ifname = handoff_ifname(&r.endpoint_id);
        let info = self
            .core
            .attach(AttachSpec {
                network: ep.ovl.clone(),
                netns: NetnsRef::HandOff {
                    sandbox: r.sandbox_key.clone(),
                },
                name: short(&r.endpoint_id),
                ip: String::new(),
                mac: ep.mac.clone(),
                aliases: Vec::new(),
                ifname: ifname.clone(),
                reserved: Some((id, ep.ip)),
            })
            .await
            .map_err(|e| e.to_string())?;
        let mut s = self.state.lock().await;
        s.reservations.remove(&ep.ip);
        if let Some(e) = s.endpoints.get_mut(&r.endpoint_id) {
            e.joined = true;
        }
        self.save(&s)?;
        drop(s);
        let net = self.core.find_network(&ep.ovl).map_err(|e| e.to_string())?;
        let gateway = if net.record.internal {
            String::new()
        } else {
            net.pool.gateway.to_string()
        };
        info!(network = %ep.ovl, endpoint = %id, docker_endpoint = %short(&r.endpoint_id), ip = %ep.ip,
              sandbox = %r.sandbox_key, lagging = info.lagging.len(), "Docker endpoint joined");
        Ok(serde_json::to_value(JoinReply {
            interface_name: InterfaceName {
                src_name: ifname,
                dst_prefix: "eth".into(),
            },
            gateway,
            disable_gateway_service: true,
        })
        .unwrap_or_default())
    }

    /// Detaches the ovl endpoint of a joined Docker endpoint; one already
    /// gone (the orphan sweep saw its namespace vanish) is fine.
    async fn detach(&self, ep: &DockerEndpoint) -> Result<(), Refusal> {
        match self.core.detach(&ep.ovl, &ep.endpoint).await {
            Ok(_) | Err(CoreError::NoEndpoint(..)) | Err(CoreError::NoNetwork(_)) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn leave(&self, r: EndpointRef) -> Result<Value, Refusal> {
        let Some(ep) = self
            .state
            .lock()
            .await
            .endpoints
            .get(&r.endpoint_id)
            .cloned()
        else {
            return Ok(json!({}));
        };
        if ep.joined {
            self.detach(&ep).await?;
            let mut s = self.state.lock().await;
            if let Some(e) = s.endpoints.get_mut(&r.endpoint_id) {
                e.joined = false;
            }
            self.save(&s)?;
        }
        Ok(json!({}))
    }

    async fn delete_endpoint(&self, r: EndpointRef) -> Result<Value, Refusal> {
        let Some(ep) = self
            .state
            .lock()
            .await
            .endpoints
            .get(&r.endpoint_id)
            .cloned()
        else {
            return Ok(json!({}));
        };
        if ep.joined {
            self.detach(&ep).await?;
        }
        // A never-joined endpoint's address stays reserved until Docker's
        // ReleaseAddress, which follows.
        let mut s = self.state.lock().await;
        s.endpoints.remove(&r.endpoint_id);
        self.save(&s)?;
        Ok(json!({}))
    }
}

/// An existing ovl network is adopted only as it is.
fn check_adoptable(
    net: &NetworkView,
    subnet: Ipv4Network,
    gateway: Ipv4Addr,
    opts: &NetworkOptions,
) -> Result<(), Refusal> {
    let name = net.name();
    if net.pool.subnet != subnet {
        return Err(format!(
            "ovl network {name:?} exists with subnet {}, not {subnet}",
            net.pool.subnet
        ));
    }
    if net.pool.gateway != gateway {
        return Err(format!(
            "ovl network {name:?} exists with gateway {}, not {gateway}",
            net.pool.gateway
        ));
    }
    if net.record.encrypted != opts.encrypted || net.record.internal != opts.internal {
        return Err(format!(
            "ovl network {name:?} exists with encrypted={} internal={}: give the same options",
            net.record.encrypted, net.record.internal
        ));
    }
    if let Some(reason) = &net.conflict {
        return Err(format!("ovl network {name:?} is not usable: {reason}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_ids_name_devices_within_the_kernels_limit() {
        let id = "0123456789abcdef".repeat(4);
        assert!(check_id("endpoint", &id).is_ok());
        assert_eq!(handoff_ifname(&id), "ovd0123456789ab");
        assert!(handoff_ifname(&id).len() <= 15);
        assert!(check_id("endpoint", "../../etc").is_err());
        assert!(check_id("endpoint", "abc").is_err());
    }

    #[test]
    fn addresses_parse_with_or_without_a_prefix() {
        assert_eq!(parse_ip("198.18.0.2/24"), Ok("198.18.0.2".parse().unwrap()));
        assert_eq!(parse_ip("198.18.0.2"), Ok("198.18.0.2".parse().unwrap()));
        assert!(parse_ip("fe80::1/64").is_err());
        assert!(decode::<ReleaseAddress>(b"{not json").is_err());
        assert!(decode::<ReleasePool>(b"null").is_ok());
    }
}
