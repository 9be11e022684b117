//! Pure construction of a network's egress firewall: nftables rulesets
//! (the `nftables` crate's typed JSON, applied with `nft -j`) and the
//! `iptables` arguments that open Docker's FORWARD chain. No process is
//! started here (see `egress.rs`).
//!
//! Egress is NAT twice (DESIGN.md, "Gateway and egress"): the sandbox
//! masquerades container traffic to its transit address, so the host sees
//! one unique source per network even when two networks share a subnet;
//! the host masquerades that to its uplink address. Each table is replaced
//! whole in one nft transaction (add, delete, add: atomic and idempotent).

use std::borrow::Cow;

use nftables::expr::{CT, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField};
use nftables::schema::{Chain, NfCmd, NfListObject, NfObject, Nftables, Rule, Table};
use nftables::stmt::{Counter, Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use super::transit::{HOST_PREFIX, SANDBOX_END};
use crate::ids::Vni;

/// The sandbox's own table (one per namespace).
pub const SANDBOX_TABLE: &str = "ovl";

/// The host's table of network `vni`: `ovl-<vni>`, removed with it.
pub fn host_table(vni: Vni) -> String {
    format!("ovl-{vni}")
}

/// The host end of network `vni`'s transit: `ovltr-<vni>`.
pub fn host_end(vni: Vni) -> String {
    format!("{HOST_PREFIX}{vni}")
}

/// nft's interface-name wildcard for every transit host end.
fn any_host_end() -> String {
    format!("{HOST_PREFIX}*")
}

fn meta(key: MetaKey, op: Operator, value: String) -> Statement<'static> {
    Statement::Match(Match {
        left: Expression::Named(NamedExpression::Meta(Meta { key })),
        right: Expression::String(Cow::Owned(value)),
        op,
    })
}

fn ct_state_in(states: &[&'static str]) -> Statement<'static> {
    Statement::Match(Match {
        left: Expression::Named(NamedExpression::CT(CT {
            key: Cow::Borrowed("state"),
            family: None,
            dir: None,
        })),
        right: Expression::List(
            states
                .iter()
                .map(|s| Expression::String(Cow::Borrowed(s)))
                .collect(),
        ),
        op: Operator::IN,
    })
}

fn base_chain(
    table: &str,
    name: &'static str,
    kind: NfChainType,
    hook: NfHook,
    prio: i32,
) -> NfObject<'static> {
    NfObject::CmdObject(NfCmd::Add(NfListObject::Chain(Chain {
        family: NfFamily::IP,
        table: Cow::Owned(table.to_owned()),
        name: Cow::Borrowed(name),
        _type: Some(kind),
        hook: Some(hook),
        prio: Some(prio),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    })))
}

fn rule(table: &str, chain: &'static str, expr: Vec<Statement<'static>>) -> NfObject<'static> {
    NfObject::CmdObject(NfCmd::Add(NfListObject::Rule(Rule {
        family: NfFamily::IP,
        table: Cow::Owned(table.to_owned()),
        chain: Cow::Borrowed(chain),
        expr: Cow::Owned(expr),
        ..Rule::default()
    })))
}

fn table(name: &str) -> NfListObject<'static> {
    NfListObject::Table(Table {
        family: NfFamily::IP,
        name: Cow::Owned(name.to_owned()),
        handle: None,
    })
}

/// Add (a no-op if it exists), delete, add: the table is replaced whole.
fn replace_table(name: &str) -> Vec<NfObject<'static>> {
    vec![
        NfObject::CmdObject(NfCmd::Add(table(name))),
        NfObject::CmdObject(NfCmd::Delete(table(name))),
        NfObject::CmdObject(NfCmd::Add(table(name))),
    ]
}

// Priorities of nft's named ones: `srcnat` = 100, `filter` = 0.
const SRCNAT: i32 = 100;
const FILTER: i32 = 0;

/// The sandbox's table: masquerade to the transit address what leaves
/// through it, and let in through it only replies (nothing from the host
/// side starts a connection into the overlay).
pub fn sandbox_ruleset() -> Nftables<'static> {
    let t = SANDBOX_TABLE;
    let mut objects = replace_table(t);
    objects.push(base_chain(
        t,
        "postrouting",
        NfChainType::NAT,
        NfHook::Postrouting,
        SRCNAT,
    ));
    objects.push(rule(
        t,
        "postrouting",
        vec![
            meta(MetaKey::Oifname, Operator::EQ, SANDBOX_END.into()),
            Statement::Masquerade(None),
        ],
    ));
    objects.push(base_chain(
        t,
        "forward",
        NfChainType::Filter,
        NfHook::Forward,
        FILTER,
    ));
    objects.push(rule(
        t,
        "forward",
        vec![
            meta(MetaKey::Iifname, Operator::EQ, SANDBOX_END.into()),
            ct_state_in(&["established", "related"]),
            Statement::Accept(None),
        ],
    ));
    objects.push(rule(
        t,
        "forward",
        vec![
            meta(MetaKey::Iifname, Operator::EQ, SANDBOX_END.into()),
            Statement::Drop(None),
        ],
    ));
    Nftables {
        objects: Cow::Owned(objects),
    }
}

/// The sandbox's table that holds DNS queries while the agent restarts.
pub const RESTART_HOLD_TABLE: &str = "ovl-dns";

/// Drops the ICMP port-unreachable errors the sandbox itself sends. Only
/// the network's resolver listens on UDP in a sandbox, and while the agent
/// restarts nothing does: the kernel would refuse each query at once and
/// the client would give up (glibc and dig fail on the first refusal). A
/// dropped error makes the client retry after its timeout instead (5 s by
/// default in glibc), and by then the new agent answers. Forwarded
/// traffic's ICMP errors pass through `forward`, not `output`, and are
/// untouched. On every network, `--internal` ones too.
pub fn restart_hold_ruleset() -> Nftables<'static> {
    let t = RESTART_HOLD_TABLE;
    let mut objects = replace_table(t);
    objects.push(base_chain(
        t,
        "output",
        NfChainType::Filter,
        NfHook::Output,
        FILTER,
    ));
    let icmp = |field: &'static str, value: &'static str| {
        Statement::Match(Match {
            left: Expression::Named(NamedExpression::Payload(Payload::PayloadField(
                PayloadField {
                    protocol: Cow::Borrowed("icmp"),
                    field: Cow::Borrowed(field),
                },
            ))),
            right: Expression::String(Cow::Borrowed(value)),
            op: Operator::EQ,
        })
    };
    objects.push(rule(
        t,
        "output",
        vec![
            icmp("type", "destination-unreachable"),
            icmp("code", "port-unreachable"),
            Statement::Counter(Counter::Anonymous(None)),
            Statement::Drop(None),
        ],
    ));
    Nftables {
        objects: Cow::Owned(objects),
    }
}

/// The host's table of network `vni`: masquerade what arrives from its
/// transit and leaves elsewhere, and drop what it sends towards another
/// network's transit (nothing routes between two ovl networks).
pub fn host_ruleset(vni: Vni) -> Nftables<'static> {
    let t = host_table(vni);
    let end = host_end(vni);
    let mut objects = replace_table(&t);
    objects.push(base_chain(
        &t,
        "postrouting",
        NfChainType::NAT,
        NfHook::Postrouting,
        SRCNAT,
    ));
    objects.push(rule(
        &t,
        "postrouting",
        vec![
            meta(MetaKey::Iifname, Operator::EQ, end.clone()),
            meta(MetaKey::Oifname, Operator::NEQ, any_host_end()),
            Statement::Masquerade(None),
        ],
    ));
    objects.push(base_chain(
        &t,
        "forward",
        NfChainType::Filter,
        NfHook::Forward,
        FILTER,
    ));
    objects.push(rule(
        &t,
        "forward",
        vec![
            meta(MetaKey::Iifname, Operator::EQ, end),
            meta(MetaKey::Oifname, Operator::EQ, any_host_end()),
            Statement::Drop(None),
        ],
    ));
    Nftables {
        objects: Cow::Owned(objects),
    }
}

/// Deletes the host's table of network `vni` (add first: deleting a table
/// that does not exist would fail the transaction).
pub fn host_removal(vni: Vni) -> Nftables<'static> {
    let t = host_table(vni);
    Nftables {
        objects: Cow::Owned(vec![
            NfObject::CmdObject(NfCmd::Add(table(&t))),
            NfObject::CmdObject(NfCmd::Delete(table(&t))),
        ]),
    }
}

/// The rules (after `iptables -C|-I|-D FORWARD`) that let network `vni`'s
/// egress through a FORWARD chain whose policy is DROP, as Docker sets it:
/// out through its transit, and replies back in. An nftables accept
/// cannot override another table's drop, so these go into the iptables
/// chain itself, as flannel's and Docker's own rules do.
pub fn forward_accepts(vni: Vni) -> [Vec<String>; 2] {
    let end = host_end(vni);
    let comment = format!("ovl network {vni} egress");
    let rule = |matches: &[&str]| {
        let tail = ["-m", "comment", "--comment", &comment, "-j", "ACCEPT"];
        matches
            .iter()
            .chain(tail.iter())
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
    };
    [
        rule(&["-i", &end]),
        rule(&[
            "-o",
            &end,
            "-m",
            "conntrack",
            "--ctstate",
            "RELATED,ESTABLISHED",
        ]),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(n: &Nftables) -> serde_json::Value {
        serde_json::to_value(n).unwrap()
    }

    #[test]
    fn the_sandbox_masquerades_out_of_its_transit_and_admits_only_replies() {
        let v = json(&sandbox_ruleset());
        let cmds = v["nftables"].as_array().unwrap();
        // Replaced whole: add, delete, add the table first.
        assert!(cmds[0]["add"]["table"]["name"] == "ovl");
        assert!(cmds[1]["delete"]["table"]["name"] == "ovl");
        let text = v.to_string();
        assert!(text.contains(r#""masquerade":null"#), "{text}");
        assert!(text.contains(r#""right":"ovltr0""#), "{text}");
        assert!(text.contains(r#""established""#), "{text}");
        assert!(text.contains(r#""hook":"postrouting""#), "{text}");
    }

    #[test]
    fn the_restart_hold_drops_only_the_sandboxs_own_port_unreachables() {
        let v = json(&restart_hold_ruleset());
        let cmds = v["nftables"].as_array().unwrap();
        assert!(cmds[0]["add"]["table"]["name"] == "ovl-dns");
        assert!(cmds[1]["delete"]["table"]["name"] == "ovl-dns");
        let text = v.to_string();
        assert!(text.contains(r#""hook":"output""#), "{text}");
        assert!(!text.contains(r#""hook":"forward""#), "{text}");
        assert!(text.contains(r#""right":"port-unreachable""#), "{text}");
        assert!(
            text.contains(r#""right":"destination-unreachable""#),
            "{text}"
        );
        assert!(text.contains(r#""drop":null"#), "{text}");
    }

    #[test]
    fn the_host_table_is_per_network_and_never_routes_between_networks() {
        let vni = Vni::new(4097).unwrap();
        let text = json(&host_ruleset(vni)).to_string();
        assert!(text.contains(r#""name":"ovl-4097""#), "{text}");
        assert!(text.contains(r#""right":"ovltr-4097""#), "{text}");
        assert!(text.contains(r#""op":"!=","right":"ovltr-*""#), "{text}");
        assert!(text.contains(r#""drop":null"#), "{text}");
        let rm = json(&host_removal(vni)).to_string();
        assert!(rm.contains(r#""delete":{"table""#), "{rm}");
        let [out, back] = forward_accepts(vni);
        assert_eq!(&out[..2], ["-i", "ovltr-4097"]);
        assert!(back.contains(&"RELATED,ESTABLISHED".to_string()));
    }
}
