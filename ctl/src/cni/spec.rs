//! The CNI protocol, sans-IO: the environment and network configuration a
//! runtime hands a plugin, the results and errors it reads back (CNI spec
//! 1.0 and 1.1, <https://github.com/containernetworking/cni/blob/main/SPEC.md>).
//! Bytes and key/value pairs in, typed values or a spec error out; no
//! process environment, no stdin, no agent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The versions this plugin speaks (SPEC.md "Version"). Configs naming
/// another are refused with code 1.
pub const SUPPORTED: [&str; 2] = ["1.0.0", "1.1.0"];
/// The version a plugin answers VERSION in.
pub const NEWEST: &str = "1.1.0";

/// Error codes of SPEC.md "Error": 1-99 are the spec's, 100+ the plugin's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnv = 4,
    Io = 5,
    Decode = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    /// STATUS: the plugin cannot serve ADDs (SPEC.md "STATUS").
    NotAvailable = 50,
    /// ovl's own: the agent refused the request (the message says why).
    AgentRefused = 100,
}

/// A spec error: printed as JSON on stdout with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: Code,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    pub fn to_json(&self, version: &str) -> Value {
        let mut v = json!({"cniVersion": version, "code": self.code as u32, "msg": self.msg});
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {})", self.msg, self.code as u32)
    }
}

/// `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    fn parse(s: &str) -> Result<Self, CniError> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            other => {
                return Err(CniError::new(
                    Code::InvalidEnv,
                    format!("CNI_COMMAND {other:?} is not ADD, DEL, CHECK, STATUS, GC or VERSION"),
                ));
            }
        })
    }
}

/// What the runtime says about the attachment (SPEC.md "Parameters").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    /// Empty: no namespace (DEL may come without one, containerd does).
    pub netns: String,
    pub ifname: String,
    /// `CNI_ARGS`, `K=V;K=V`.
    pub args: BTreeMap<String, String>,
}

/// Longest container id accepted (runtimes use 64 hex digits).
const MAX_CONTAINER_ID: usize = 255;

impl Env {
    /// Reads the `CNI_*` variables from `get`; checks what `command` needs.
    pub fn parse(get: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let var = |k: &str| get(k).unwrap_or_default();
        let command = match get("CNI_COMMAND") {
            Some(c) => Command::parse(&c)?,
            None => return Err(CniError::new(Code::InvalidEnv, "CNI_COMMAND is not set")),
        };
        let env = Env {
            command,
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: parse_args(&var("CNI_ARGS"))?,
        };
        if matches!(command, Command::Add | Command::Del | Command::Check) {
            env.check_attachment()?;
        }
        if matches!(command, Command::Add | Command::Check) && env.netns.is_empty() {
            return Err(CniError::new(
                Code::InvalidEnv,
                "CNI_NETNS is required for ADD and CHECK",
            ));
        }
        Ok(env)
    }

    fn check_attachment(&self) -> Result<(), CniError> {
        let id = &self.container_id;
        // SPEC.md "CNI_CONTAINERID": alphanumeric first, then [A-Za-z0-9_.-].
        let ok_id = id.len() <= MAX_CONTAINER_ID
            && id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !ok_id {
            return Err(CniError::new(
                Code::InvalidEnv,
                format!(
                    "CNI_CONTAINERID {id:?} is not 1-255 of [A-Za-z0-9_.-], alphanumeric first"
                ),
            ));
        }
        // SPEC.md "CNI_IFNAME": at most 15 bytes, not "." or "..", no
        // '/', ':' or white space.
        let ok_if = !self.ifname.is_empty()
            && self.ifname != "."
            && self.ifname != ".."
            && self.ifname.len() <= 15
            && !self
                .ifname
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
        if !ok_if {
            return Err(CniError::new(
                Code::InvalidEnv,
                format!("CNI_IFNAME {:?} is not a valid interface name", self.ifname),
            ));
        }
        Ok(())
    }

    /// The ovl endpoint an attachment is (see [`endpoint_name`]).
    pub fn endpoint_name(&self) -> String {
        endpoint_name(&self.container_id, &self.ifname)
    }
}

/// The ovl endpoint of an attachment: `cni-` and 16 hex digits of
/// SHA-256 over the container id and interface. Derived, so DEL and GC
/// find it with nothing but those two (no state file, no `prevResult`);
/// hashed, because endpoint names are cluster-wide, at most 63 bytes, and
/// container ids are up to 255 bytes of which no prefix is unique.
pub fn endpoint_name(container_id: &str, ifname: &str) -> String {
    let d = ring::digest::digest(
        &ring::digest::SHA256,
        format!("{container_id}/{ifname}").as_bytes(),
    );
    let hex: String = d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{ENDPOINT_PREFIX}{hex}")
}

/// What every endpoint this plugin makes is named from (GC removes only
/// those).
pub const ENDPOINT_PREFIX: &str = "cni-";

/// `CNI_ARGS`: `K=V` pairs separated by `;` (SPEC.md: "Extra arguments").
pub fn parse_args(s: &str) -> Result<BTreeMap<String, String>, CniError> {
    let mut out = BTreeMap::new();
    for part in s.split(';').filter(|p| !p.is_empty()) {
        let Some((k, v)) = part.split_once('=') else {
            return Err(CniError::new(
                Code::InvalidEnv,
                format!("CNI_ARGS entry {part:?} is not K=V"),
            ));
        };
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// The network configuration on stdin (one plugin of a conflist, as the
/// runtime hands it over).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// The ovl network; defaults to `name`.
    #[serde(default)]
    pub network: Option<String>,
    /// The agent's API socket.
    #[serde(default)]
    pub socket: Option<String>,
    #[serde(default)]
    pub prev_result: Option<Value>,
    #[serde(default)]
    pub runtime_config: RuntimeConfig,
    /// GC (spec 1.1): the attachments the runtime still has.
    #[serde(default, rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConfig {
    /// podman's network aliases (capability `aliases`): keyed by network.
    #[serde(default)]
    pub aliases: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// Largest config read from stdin.
pub const MAX_CONFIG: usize = 1 << 20;

impl NetConf {
    pub fn parse(bytes: &[u8]) -> Result<Self, CniError> {
        if bytes.len() > MAX_CONFIG {
            return Err(CniError::new(
                Code::InvalidConfig,
                format!("network configuration over {MAX_CONFIG} bytes"),
            ));
        }
        let conf: NetConf = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(Code::Decode, "network configuration is not valid JSON")
                .with_details(e.to_string())
        })?;
        if !SUPPORTED.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                Code::IncompatibleVersion,
                format!(
                    "cniVersion {:?} is not supported (supported: {})",
                    conf.cni_version,
                    SUPPORTED.join(", ")
                ),
            ));
        }
        if conf.network().is_empty() {
            return Err(CniError::new(
                Code::InvalidConfig,
                "the configuration names no ovl network (\"network\" or \"name\")",
            ));
        }
        Ok(conf)
    }

    /// The ovl network this config attaches to.
    pub fn network(&self) -> &str {
        self.network.as_deref().unwrap_or(&self.name)
    }

    /// Aliases the runtime asks for in this network (those ovl cannot
    /// hold as names are left out rather than failing the ADD).
    pub fn aliases(&self) -> Vec<String> {
        self.runtime_config
            .aliases
            .get(&self.name)
            .into_iter()
            .flatten()
            .filter(|a| valid_alias(a))
            .cloned()
            .collect()
    }
}

/// What ovl accepts as an endpoint name or alias: 1-63 of [A-Za-z0-9_.-],
/// alphanumeric first (the agent checks the same).
pub fn valid_alias(s: &str) -> bool {
    s.len() <= 63
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// The static address and MAC a runtime asks for in `CNI_ARGS` (podman:
/// `IP=`, `MAC=`; with `IgnoreUnknown=1` other keys are ignored, without
/// it an unknown key is an error, SPEC.md "CNI_ARGS").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wanted {
    pub ip: Option<String>,
    pub mac: Option<String>,
    pub name: Option<String>,
}

/// Keys this plugin reads from `CNI_ARGS`.
const KNOWN_ARGS: [&str; 5] = [
    "IgnoreUnknown",
    "IP",
    "MAC",
    "K8S_POD_NAME",
    "K8S_POD_NAMESPACE",
];

pub fn wanted(args: &BTreeMap<String, String>) -> Result<Wanted, CniError> {
    let ignore = args
        .get("IgnoreUnknown")
        .is_some_and(|v| v.eq_ignore_ascii_case("1") || v.eq_ignore_ascii_case("true"));
    if !ignore && let Some(k) = args.keys().find(|k| !KNOWN_ARGS.contains(&k.as_str())) {
        return Err(CniError::new(
            Code::InvalidEnv,
            format!("CNI_ARGS key {k:?} is unknown (pass IgnoreUnknown=1 to ignore it)"),
        ));
    }
    let non_empty = |k: &str| args.get(k).filter(|v| !v.is_empty()).cloned();
    Ok(Wanted {
        // podman passes the address without a prefix; an IP=a.b.c.d/len is
        // accepted too (the network fixes the prefix).
        ip: non_empty("IP").map(|ip| ip.split('/').next().unwrap_or_default().to_string()),
        mac: non_empty("MAC"),
        name: non_empty("K8S_POD_NAME").filter(|n| valid_alias(n)),
    })
}

/// What an ADD returns (SPEC.md "Success").
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AddResult {
    pub cni_version: String,
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Dns,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub mac: String,
    /// The container's namespace path.
    pub sandbox: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct IpConfig {
    /// CIDR: the container's address and the network's prefix.
    pub address: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub gateway: String,
    /// Index into `interfaces`.
    pub interface: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Route {
    pub dst: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub gw: String,
}

#[derive(Debug, Clone, Serialize, Default, PartialEq, Eq)]
pub struct Dns {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
}

/// What ADD learned from the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    pub ifname: String,
    pub mac: String,
    pub ip: String,
    pub subnet: String,
    pub gateway: String,
    pub mtu: u32,
    pub resolver: String,
    /// The network is `--internal`: no default route.
    pub internal: bool,
}

/// Builds the ADD result in the config's version.
pub fn add_result(version: &str, netns: &str, a: &Attached) -> Result<AddResult, CniError> {
    let prefix = a
        .subnet
        .split_once('/')
        .map(|(_, p)| p)
        .filter(|p| p.parse::<u8>().is_ok_and(|p| p <= 32))
        .ok_or_else(|| {
            CniError::new(
                Code::AgentRefused,
                format!("the agent reported subnet {:?}", a.subnet),
            )
        })?;
    Ok(AddResult {
        cni_version: version.to_string(),
        interfaces: vec![Interface {
            name: a.ifname.clone(),
            mac: a.mac.clone(),
            sandbox: netns.to_string(),
            // `mtu` joined the interface object in spec 1.1.
            mtu: (a.mtu != 0 && version != "1.0.0").then_some(a.mtu),
        }],
        ips: vec![IpConfig {
            address: format!("{}/{prefix}", a.ip),
            gateway: a.gateway.clone(),
            interface: 0,
        }],
        // The subnet is on-link; everything else goes via the gateway,
        // which every host serves in the network's sandbox (none on an
        // `--internal` network: it has no way out).
        routes: std::iter::once(Route {
            dst: a.subnet.clone(),
            gw: String::new(),
        })
        .chain((!a.internal).then(|| Route {
            dst: "0.0.0.0/0".into(),
            gw: a.gateway.clone(),
        }))
        .collect(),
        dns: Dns {
            nameservers: if a.resolver.is_empty() {
                Vec::new()
            } else {
                vec![a.resolver.clone()]
            },
        },
    })
}

/// The VERSION answer (SPEC.md "VERSION").
pub fn version_json() -> Value {
    json!({"cniVersion": NEWEST, "supportedVersions": SUPPORTED})
}

#[cfg(test)]
mod tests;
