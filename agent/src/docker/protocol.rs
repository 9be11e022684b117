//! Docker's plugin protocol for a remote network driver and a remote IPAM
//! driver, as the engine sends it (libnetwork `drivers/remote/api` and
//! `ipams/remote/api`; RUNTIMES.md records the requests seen on the
//! wire). Sans-IO: JSON in, typed requests and replies out.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Every plugin reply's content type (the plugin API's v1 media type).
pub const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1+json";

/// The generic options `docker network create -o k=v` become, inside a
/// CreateNetwork request's `Options` (libnetwork `netlabel.GenericData`).
pub const GENERIC_OPTIONS: &str = "com.docker.network.generic";
/// `docker network create --internal` (libnetwork `netlabel.Internal`).
pub const INTERNAL_OPTION: &str = "com.docker.network.internal";
/// `-o com.docker.network.driver.mtu=N` (libnetwork `netlabel.DriverMTU`).
pub const MTU_OPTION: &str = "com.docker.network.driver.mtu";
/// `RequestAddress` for the network's gateway carries this type.
pub const REQUEST_ADDRESS_TYPE: &str = "RequestAddressType";
pub const GATEWAY_ADDRESS_TYPE: &str = "com.docker.network.gateway";

/// Go encodes a nil slice or map as `null`: read it as empty.
fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// The one address space ovl's IPAM serves (Docker requires a name).
pub const ADDRESS_SPACE: &str = "ovl";

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct RequestPool {
    pub address_space: String,
    pub pool: String,
    pub sub_pool: String,
    #[serde(deserialize_with = "null_default")]
    pub options: BTreeMap<String, String>,
    #[serde(rename = "V6")]
    pub v6: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct PoolReply {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    pub pool: String,
    pub data: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ReleasePool {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct RequestAddress {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    pub address: String,
    #[serde(deserialize_with = "null_default")]
    pub options: BTreeMap<String, String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct AddressReply {
    /// `IP/prefix`.
    pub address: String,
    pub data: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct ReleaseAddress {
    #[serde(rename = "PoolID")]
    pub pool_id: String,
    pub address: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct IpamData {
    pub address_space: String,
    pub pool: String,
    pub gateway: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CreateNetwork {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(deserialize_with = "null_default")]
    pub options: BTreeMap<String, Value>,
    #[serde(rename = "IPv4Data")]
    #[serde(deserialize_with = "null_default")]
    pub ipv4_data: Vec<IpamData>,
    #[serde(rename = "IPv6Data")]
    #[serde(deserialize_with = "null_default")]
    pub ipv6_data: Vec<IpamData>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct NetworkRef {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct EndpointInterface {
    pub address: String,
    #[serde(rename = "AddressIPv6")]
    pub address_ipv6: String,
    pub mac_address: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct CreateEndpoint {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    /// Absent when the IPAM gave nothing (never with ovl's IPAM).
    pub interface: Option<EndpointInterface>,
}

/// Leave, DeleteEndpoint, EndpointOperInfo, (Program|Revoke)External
/// Connectivity all name just the endpoint.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct EndpointRef {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Join {
    #[serde(rename = "NetworkID")]
    pub network_id: String,
    #[serde(rename = "EndpointID")]
    pub endpoint_id: String,
    pub sandbox_key: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct InterfaceName {
    pub src_name: String,
    pub dst_prefix: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct JoinReply {
    pub interface_name: InterfaceName,
    /// Empty on an `--internal` network: no default route.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub gateway: String,
    /// ovl serves the gateway itself: no `docker_gwbridge`.
    pub disable_gateway_service: bool,
}

/// The reply of a failed request; Docker shows `Err` to the user.
#[derive(Debug, Serialize)]
pub struct ErrorReply {
    #[serde(rename = "Err")]
    pub err: String,
}

/// What `docker network create -d ovl` asks for, read from its options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkOptions {
    /// The ovl network's name (`-o network=NAME`): Docker never sends
    /// the name given to `docker network create`.
    pub name: String,
    pub encrypted: bool,
    pub internal: bool,
    pub mtu: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionsError {
    #[error(
        "ovl needs the ovl network's name as an option: docker network create -d ovl --ipam-driver ovl --subnet SUBNET -o network=NAME NAME (Docker does not pass the network name to drivers)"
    )]
    NoName,
    #[error("option {0}={1:?}: {2}")]
    Bad(&'static str, String, &'static str),
}

fn truthy(v: &str) -> Option<bool> {
    match v {
        "" | "true" | "1" | "yes" => Some(true),
        "false" | "0" | "no" => Some(false),
        _ => None,
    }
}

impl NetworkOptions {
    /// Reads a CreateNetwork request's options. Unknown generic options
    /// are refused: a typo would otherwise create a network other than
    /// the one asked for.
    pub fn parse(options: &BTreeMap<String, Value>) -> Result<Self, OptionsError> {
        let generic: BTreeMap<String, String> = match options.get(GENERIC_OPTIONS) {
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (k.clone(), v)
                })
                .collect(),
            _ => BTreeMap::new(),
        };
        let internal = matches!(options.get(INTERNAL_OPTION), Some(Value::Bool(true)));
        let mut out = NetworkOptions {
            name: String::new(),
            encrypted: false,
            internal,
            mtu: 0,
        };
        for (k, v) in generic {
            match k.as_str() {
                "network" => out.name = v,
                "encrypted" => {
                    out.encrypted =
                        truthy(&v).ok_or(OptionsError::Bad("encrypted", v, "use true or false"))?
                }
                MTU_OPTION => {
                    out.mtu = v
                        .parse()
                        .map_err(|_| OptionsError::Bad(MTU_OPTION, v, "not a number"))?
                }
                _ => {
                    return Err(OptionsError::Bad(
                        "-o",
                        k,
                        "unknown option (ovl takes network, encrypted and com.docker.network.driver.mtu)",
                    ));
                }
            }
        }
        if out.name.is_empty() {
            return Err(OptionsError::NoName);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(json: &str) -> BTreeMap<String, Value> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn the_name_and_flags_come_from_the_generic_options() {
        let o = NetworkOptions::parse(&opts(
            r#"{"com.docker.network.enable_ipv6":false,"com.docker.network.generic":{"network":"web","encrypted":"","com.docker.network.driver.mtu":"1400"},"com.docker.network.internal":true}"#,
        ))
        .unwrap();
        assert_eq!(
            o,
            NetworkOptions {
                name: "web".into(),
                encrypted: true,
                internal: true,
                mtu: 1400
            }
        );
    }

    #[test]
    fn a_missing_name_or_an_unknown_option_is_a_clear_error() {
        assert_eq!(
            NetworkOptions::parse(&opts(r#"{"com.docker.network.generic":{}}"#)),
            Err(OptionsError::NoName)
        );
        assert_eq!(
            NetworkOptions::parse(&opts("{}")),
            Err(OptionsError::NoName)
        );
        let e = NetworkOptions::parse(&opts(
            r#"{"com.docker.network.generic":{"network":"web","encrypt":"true"}}"#,
        ))
        .unwrap_err();
        assert!(e.to_string().contains("encrypt"), "{e}");
        let e = NetworkOptions::parse(&opts(
            r#"{"com.docker.network.generic":{"network":"web","com.docker.network.driver.mtu":"big"}}"#,
        ))
        .unwrap_err();
        assert!(e.to_string().contains("not a number"), "{e}");
    }

    #[test]
    fn requests_as_docker_sends_them_decode() {
        let r: CreateNetwork = serde_json::from_str(
            r#"{"NetworkID":"ab","Options":{},"IPv4Data":[{"AddressSpace":"ovl","Pool":"198.18.100.0/24","Gateway":"198.18.100.1/24"}],"IPv6Data":null}"#,
        )
        .unwrap();
        assert_eq!(r.ipv4_data[0].gateway, "198.18.100.1/24");
        let e: CreateEndpoint = serde_json::from_str(
            r#"{"NetworkID":"ab","EndpointID":"cd","Interface":{"Address":"198.18.100.2/24","AddressIPv6":"","MacAddress":""},"Options":{}}"#,
        )
        .unwrap();
        assert_eq!(e.interface.unwrap().address, "198.18.100.2/24");
        let j = JoinReply {
            interface_name: InterfaceName {
                src_name: "ovd1".into(),
                dst_prefix: "eth".into(),
            },
            gateway: String::new(),
            disable_gateway_service: true,
        };
        assert_eq!(
            serde_json::to_string(&j).unwrap(),
            r#"{"InterfaceName":{"SrcName":"ovd1","DstPrefix":"eth"},"DisableGatewayService":true}"#
        );
    }
}
