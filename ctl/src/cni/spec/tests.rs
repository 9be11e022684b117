use std::collections::HashMap;

use super::*;

fn env(vars: &[(&str, &str)]) -> Result<Env, CniError> {
    let m: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Env::parse(|k| m.get(k).cloned())
}

const CID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

#[test]
fn add_needs_the_attachment_and_a_namespace() {
    let e = env(&[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", CID),
        ("CNI_NETNS", "/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;IP=198.19.0.9;MAC=02:42:00:00:00:09",
        ),
    ])
    .unwrap();
    assert_eq!(e.command, Command::Add);
    let name = e.endpoint_name();
    assert!(name.starts_with("cni-") && name.len() == 20, "{name}");
    assert!(crate::cni::spec::valid_alias(&name));
    assert_eq!(e.args["IP"], "198.19.0.9");
    for (k, v) in [
        ("CNI_NETNS", ""),
        ("CNI_IFNAME", ""),
        ("CNI_IFNAME", "a/b"),
        ("CNI_CONTAINERID", ""),
        ("CNI_CONTAINERID", "a b"),
        ("CNI_CONTAINERID", "-abc"),
        ("CNI_IFNAME", ".."),
        ("CNI_COMMAND", "ATTACH"),
        ("CNI_ARGS", "novalue"),
    ] {
        let mut vars = vec![
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", CID),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
        ];
        vars.retain(|(kk, _)| *kk != k);
        vars.push((k, v));
        let err = env(&vars).unwrap_err();
        assert_eq!(err.code, Code::InvalidEnv, "{k}={v:?}: {err}");
    }
    assert_eq!(env(&[]).unwrap_err().code, Code::InvalidEnv);
}

#[test]
fn del_works_without_a_namespace_and_version_needs_nothing() {
    let e = env(&[
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", CID),
        ("CNI_NETNS", ""),
        ("CNI_IFNAME", "net1"),
    ])
    .unwrap();
    assert_ne!(e.endpoint_name(), endpoint_name(CID, "eth0"));
    // No prefix of an id is unique, and the interface is not just appended.
    assert_ne!(
        endpoint_name("my-container-1", "eth0"),
        endpoint_name("my-container-2", "eth0")
    );
    assert_ne!(
        endpoint_name("ab", "cd-eth0"),
        endpoint_name("ab-cd", "eth0")
    );
    assert_eq!(endpoint_name("x", "eth0"), endpoint_name("x", "eth0"));
    assert_eq!(
        env(&[("CNI_COMMAND", "VERSION")]).unwrap().command,
        Command::Version
    );
    let v = version_json();
    assert_eq!(v["supportedVersions"], json!(["1.0.0", "1.1.0"]));
}

#[test]
fn configs_name_a_supported_version_and_a_network() {
    let long = "a".repeat(64);
    let c = NetConf::parse(
        format!(
            r#"{{"cniVersion":"1.0.0","name":"web","type":"ovl","network":"front",
            "runtimeConfig":{{"aliases":{{"web":["www","{long}","-x"]}}}},"prevResult":{{"ips":[]}}}}"#
        )
        .as_bytes(),
    )
    .unwrap();
    assert_eq!(c.network(), "front");
    assert_eq!(
        c.aliases(),
        vec!["www".to_string()],
        "names ovl cannot hold are left out"
    );
    assert!(c.prev_result.is_some());
    let c = NetConf::parse(br#"{"cniVersion":"1.1.0","name":"web","type":"ovl"}"#).unwrap();
    assert_eq!(
        c.network(),
        "web",
        "the network defaults to the config's name"
    );
    let gc = NetConf::parse(
        br#"{"cniVersion":"1.1.0","name":"web","type":"ovl",
            "cni.dev/valid-attachments":[{"containerID":"abc","ifname":"eth0"}]}"#,
    )
    .unwrap();
    assert_eq!(
        gc.valid_attachments,
        Some(vec![Attachment {
            container_id: "abc".into(),
            ifname: "eth0".into()
        }])
    );
    let code = |b: &[u8]| NetConf::parse(b).unwrap_err().code;
    assert_eq!(code(b"{"), Code::Decode);
    assert_eq!(code(br#"{"name":"web","type":"ovl"}"#), Code::Decode);
    assert_eq!(
        code(br#"{"cniVersion":"0.3.1","name":"web","type":"ovl"}"#),
        Code::IncompatibleVersion
    );
    assert_eq!(
        code(br#"{"cniVersion":"1.0.0","name":"","type":"ovl"}"#),
        Code::InvalidConfig
    );
    assert_eq!(code(&vec![b' '; MAX_CONFIG + 1]), Code::InvalidConfig);
}

#[test]
fn cni_args_give_static_ip_and_mac_and_refuse_unknown_keys_unless_told() {
    let a =
        parse_args("IgnoreUnknown=1;K8S_POD_NAME=db;IP=198.19.0.7/24;MAC=02:42:c6:13:00:07;X=1")
            .unwrap();
    let w = wanted(&a).unwrap();
    assert_eq!(w.ip.as_deref(), Some("198.19.0.7"));
    assert_eq!(w.mac.as_deref(), Some("02:42:c6:13:00:07"));
    assert_eq!(w.name.as_deref(), Some("db"));
    let a = parse_args("X=1").unwrap();
    assert_eq!(wanted(&a).unwrap_err().code, Code::InvalidEnv);
    assert_eq!(wanted(&BTreeMap::new()).unwrap(), Wanted::default());
}

#[test]
fn the_add_result_carries_interface_ip_gateway_route_and_dns() {
    let a = Attached {
        ifname: "eth0".into(),
        mac: "02:42:c6:13:00:05".into(),
        ip: "198.19.0.5".into(),
        subnet: "198.19.0.0/24".into(),
        gateway: "198.19.0.1".into(),
        mtu: 1450,
        resolver: "198.19.0.1".into(),
        internal: false,
    };
    let r = serde_json::to_value(add_result("1.0.0", "/run/netns/x", &a).unwrap()).unwrap();
    assert_eq!(
        r,
        json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "mac": "02:42:c6:13:00:05", "sandbox": "/run/netns/x"}],
            "ips": [{"address": "198.19.0.5/24", "gateway": "198.19.0.1", "interface": 0}],
            "routes": [{"dst": "198.19.0.0/24"}, {"dst": "0.0.0.0/0", "gw": "198.19.0.1"}],
            "dns": {"nameservers": ["198.19.0.1"]},
        })
    );
    let r = serde_json::to_value(add_result("1.1.0", "/run/netns/x", &a).unwrap()).unwrap();
    assert_eq!(r["interfaces"][0]["mtu"], 1450, "a 1.1 field");
    let internal = Attached {
        internal: true,
        ..a.clone()
    };
    let r = serde_json::to_value(add_result("1.0.0", "/x", &internal).unwrap()).unwrap();
    assert_eq!(r["routes"], json!([{"dst": "198.19.0.0/24"}]), "no way out");
    let bad = Attached {
        subnet: "nonsense".into(),
        ..a
    };
    assert_eq!(
        add_result("1.0.0", "/x", &bad).unwrap_err().code,
        Code::AgentRefused
    );
}

#[test]
fn errors_are_the_specs_json() {
    let e = CniError::new(Code::TryAgainLater, "agent down").with_details("socket /x");
    assert_eq!(
        e.to_json("1.0.0"),
        json!({"cniVersion": "1.0.0", "code": 11, "msg": "agent down", "details": "socket /x"})
    );
    let e = CniError::new(Code::InvalidConfig, "no network");
    assert!(e.to_json("1.1.0").get("details").is_none());
}
