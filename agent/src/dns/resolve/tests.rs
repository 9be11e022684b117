use std::collections::HashMap;
use std::net::Ipv4Addr;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

use super::*;
use crate::dns::table::{NameTable, NamedEndpoint};

fn ep(name: &str, aliases: &[&str], ip: &str) -> NamedEndpoint {
    NamedEndpoint {
        name: name.into(),
        aliases: aliases.iter().map(|a| a.to_string()).collect(),
        ip: ip.parse().unwrap(),
    }
}

fn table(eps: &[NamedEndpoint]) -> NameTable {
    NameTable::new(Some("198.18.5.0/24".parse().unwrap()), eps)
}

fn query(name: &str, t: RecordType) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(0x4242)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    m.to_vec().unwrap()
}

/// The reply's code and answer data, or `None` when not a reply.
fn ask(
    t: &NameTable,
    rotor: &mut Rotor,
    name: &str,
    rt: RecordType,
) -> Option<(ResponseCode, Vec<RData>)> {
    match resolve(t, rotor, &query(name, rt)) {
        Outcome::Reply { bytes, .. } => {
            let m = Message::from_vec(&bytes).unwrap();
            assert_eq!(m.id(), 0x4242);
            assert_eq!(m.message_type(), MessageType::Response);
            Some((
                m.response_code(),
                m.answers().iter().map(|r| r.data().clone()).collect(),
            ))
        }
        _ => None,
    }
}

fn a_ips(data: &[RData]) -> Vec<Ipv4Addr> {
    data.iter()
        .map(|d| match d {
            RData::A(a) => a.0,
            other => panic!("not an A record: {other:?}"),
        })
        .collect()
}

#[test]
fn answers_a_for_names_any_case_with_or_without_dot() {
    let t = table(&[ep("c1", &[], "198.18.5.2"), ep("C2", &["db"], "198.18.5.3")]);
    let mut r = Rotor::default();
    for name in [
        "c2",
        "c2.",
        "C2",
        "c2.".to_uppercase().as_str(),
        "db.",
        "DB",
    ] {
        let (code, data) = ask(&t, &mut r, name, RecordType::A).unwrap();
        assert_eq!(code, ResponseCode::NoError, "{name}");
        assert_eq!(
            a_ips(&data),
            vec!["198.18.5.3".parse::<Ipv4Addr>().unwrap()],
            "{name}"
        );
    }
}

#[test]
fn aaaa_for_a_known_name_is_empty_noerror() {
    let t = table(&[ep("c1", &[], "198.18.5.2")]);
    let (code, data) = ask(&t, &mut Rotor::default(), "c1", RecordType::AAAA).unwrap();
    assert_eq!(code, ResponseCode::NoError);
    assert!(data.is_empty());
}

#[test]
fn ptr_returns_the_endpoint_name() {
    let t = table(&[ep("c1", &["web"], "198.18.5.2")]);
    let mut r = Rotor::default();
    let (code, data) = ask(&t, &mut r, "2.5.18.198.in-addr.arpa.", RecordType::PTR).unwrap();
    assert_eq!(code, ResponseCode::NoError);
    match data.as_slice() {
        [RData::PTR(p)] => assert_eq!(p.0.to_ascii(), "c1."),
        other => panic!("{other:?}"),
    }
    // A free address of the subnet is ours: NXDOMAIN, never forwarded.
    let (code, data) = ask(&t, &mut r, "9.5.18.198.in-addr.arpa.", RecordType::PTR).unwrap();
    assert_eq!(code, ResponseCode::NXDomain);
    assert!(data.is_empty());
    // Outside the subnet: upstream's business.
    assert_eq!(
        resolve(
            &t,
            &mut r,
            &query("1.0.0.127.in-addr.arpa.", RecordType::PTR)
        ),
        Outcome::Forward
    );
    assert_eq!(
        resolve(
            &t,
            &mut r,
            &query("5.18.198.in-addr.arpa.", RecordType::PTR)
        ),
        Outcome::Forward
    );
}

#[test]
fn unknown_single_label_is_nxdomain_and_dotted_names_are_forwarded() {
    let t = table(&[ep("c1", &[], "198.18.5.2")]);
    let mut r = Rotor::default();
    assert_eq!(
        ask(&t, &mut r, "c9", RecordType::A).unwrap().0,
        ResponseCode::NXDomain
    );
    assert_eq!(
        ask(&t, &mut r, "c9.", RecordType::AAAA).unwrap().0,
        ResponseCode::NXDomain
    );
    assert_eq!(
        resolve(&t, &mut r, &query("example.com.", RecordType::A)),
        Outcome::Forward
    );
    assert_eq!(
        resolve(&t, &mut r, &query("c1.example.com", RecordType::A)),
        Outcome::Forward
    );
}

#[test]
fn dotted_endpoint_names_are_answered() {
    let t = table(&[ep("api.v1", &["x.y"], "198.18.5.7")]);
    let mut r = Rotor::default();
    assert_eq!(
        a_ips(&ask(&t, &mut r, "API.v1.", RecordType::A).unwrap().1).len(),
        1
    );
    assert_eq!(
        a_ips(&ask(&t, &mut r, "x.y", RecordType::A).unwrap().1).len(),
        1
    );
}

#[test]
fn bad_queries_are_refused_or_dropped() {
    let t = table(&[ep("c1", &[], "198.18.5.2")]);
    let mut r = Rotor::default();
    assert_eq!(resolve(&t, &mut r, &[1, 2, 3]), Outcome::Malformed);
    // A header, then garbage: FORMERR with the same ID.
    let mut junk = vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    junk.extend_from_slice(&[0xff; 7]);
    match resolve(&t, &mut r, &junk) {
        Outcome::Reply {
            bytes,
            kind: ReplyKind::Malformed,
        } => {
            let m = Message::from_vec(&bytes).unwrap();
            assert_eq!((m.id(), m.response_code()), (0x1234, ResponseCode::FormErr));
        }
        other => panic!("{other:?}"),
    }
    // A response sent to us is never answered (no reflection loops).
    let mut resp = Message::from_vec(&query("c1", RecordType::A)).unwrap();
    resp.set_message_type(MessageType::Response);
    assert_eq!(
        resolve(&t, &mut r, &resp.to_vec().unwrap()),
        Outcome::Malformed
    );
    // Two questions: FORMERR.
    let mut two = Message::from_vec(&query("c1", RecordType::A)).unwrap();
    two.add_query(Query::query(Name::from_ascii("c1").unwrap(), RecordType::A));
    match resolve(&t, &mut r, &two.to_vec().unwrap()) {
        Outcome::Reply {
            bytes,
            kind: ReplyKind::Refused,
        } => {
            assert_eq!(
                Message::from_vec(&bytes).unwrap().response_code(),
                ResponseCode::FormErr
            )
        }
        other => panic!("{other:?}"),
    }
    // Another opcode: NOTIMP.
    let mut upd = Message::from_vec(&query("c1", RecordType::A)).unwrap();
    upd.set_op_code(OpCode::Update);
    match resolve(&t, &mut r, &upd.to_vec().unwrap()) {
        Outcome::Reply {
            bytes,
            kind: ReplyKind::Refused,
        } => {
            assert_eq!(
                Message::from_vec(&bytes).unwrap().response_code(),
                ResponseCode::NotImp
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn servfail_keeps_id_and_question() {
    let q = query("example.com.", RecordType::A);
    let m = Message::from_vec(&servfail(&q).unwrap()).unwrap();
    assert_eq!(
        (m.id(), m.response_code()),
        (0x4242, ResponseCode::ServFail)
    );
    assert_eq!(m.queries().len(), 1);
    assert!(servfail(&[0; 5]).is_none());
}

/// A small deterministic generator: the properties below run over many
/// seeded cases without a new dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Property: whatever the interleaving of queries over several shared
/// aliases, every query returns all holders, and per alias each holder is
/// first equally often (within one over any prefix of the queries).
#[test]
fn round_robin_is_fair_per_name_under_interleaving() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _case in 0..200 {
        let aliases = 1 + rng.below(4) as usize;
        let mut eps = Vec::new();
        let mut holders: HashMap<String, Vec<Ipv4Addr>> = HashMap::new();
        for a in 0..aliases {
            let n = 1 + rng.below(6) as usize;
            for i in 0..n {
                let ip = Ipv4Addr::new(198, 18, 5, (2 + a * 10 + i) as u8);
                let alias = format!("web{a}");
                eps.push(ep(&format!("e{a}x{i}"), &[&alias], &ip.to_string()));
                holders.entry(alias).or_default().push(ip);
            }
        }
        let t = table(&eps);
        let mut rotor = Rotor::default();
        let mut firsts: HashMap<String, HashMap<Ipv4Addr, u32>> = HashMap::new();
        for _ in 0..300 {
            let a = format!("web{}", rng.below(aliases as u64));
            let shown = if rng.below(2) == 0 {
                a.to_uppercase()
            } else {
                format!("{a}.")
            };
            let (code, data) = ask(&t, &mut rotor, &shown, RecordType::A).unwrap();
            assert_eq!(code, ResponseCode::NoError);
            let ips = a_ips(&data);
            let mut sorted = ips.clone();
            sorted.sort();
            let mut want = holders[&a].clone();
            want.sort();
            assert_eq!(sorted, want, "every holder answered, once");
            *firsts
                .entry(a.clone())
                .or_default()
                .entry(ips[0])
                .or_default() += 1;
            let counts = &firsts[&a];
            let max = holders[&a]
                .iter()
                .map(|ip| counts.get(ip).copied().unwrap_or(0))
                .max()
                .unwrap();
            let min = holders[&a]
                .iter()
                .map(|ip| counts.get(ip).copied().unwrap_or(0))
                .min()
                .unwrap();
            assert!(max - min <= 1, "unfair rotation for {a}: {counts:?}");
        }
        assert!(rotor.len() <= aliases);
    }
}

/// Property: a network's resolver never answers another network's names
/// with that network's addresses: single labels are NXDOMAIN, the rest is
/// forwarded, never answered from the other table.
#[test]
fn no_cross_network_leak() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for _case in 0..200 {
        let n = 1 + rng.below(5);
        let mine: Vec<_> = (0..n)
            .map(|i| {
                ep(
                    &format!("a{i}"),
                    &["shared-a"],
                    &format!("198.18.5.{}", 2 + i),
                )
            })
            .collect();
        let theirs: Vec<_> = (0..n)
            .map(|i| {
                ep(
                    &format!("b{}", rng.below(1000)),
                    &["svc.b"],
                    &format!("198.18.6.{}", 2 + i),
                )
            })
            .collect();
        let t = table(&mine);
        let mut r = Rotor::default();
        for e in &theirs {
            assert_eq!(
                ask(&t, &mut r, &e.name, RecordType::A).unwrap().0,
                ResponseCode::NXDomain
            );
            assert_eq!(
                resolve(&t, &mut r, &query("svc.b", RecordType::A)),
                Outcome::Forward
            );
            let ptr = format!("{}.6.18.198.in-addr.arpa.", e.ip.octets()[3]);
            assert_eq!(
                resolve(&t, &mut r, &query(&ptr, RecordType::PTR)),
                Outcome::Forward
            );
        }
    }
}

#[test]
fn rotor_forgets_names_that_left() {
    let t = table(&[
        ep("c1", &["web"], "198.18.5.2"),
        ep("c2", &["web"], "198.18.5.3"),
    ]);
    let mut r = Rotor::default();
    ask(&t, &mut r, "web", RecordType::A).unwrap();
    ask(&t, &mut r, "c1", RecordType::A).unwrap();
    assert_eq!(r.len(), 2);
    let t2 = table(&[ep("c2", &[], "198.18.5.3")]);
    r.retain(&t2);
    assert!(r.is_empty());
    assert_eq!(
        ask(&t2, &mut r, "web", RecordType::A).unwrap().0,
        ResponseCode::NXDomain
    );
}

/// Random bytes never panic the parser path.
#[test]
fn random_bytes_never_panic() {
    let t = table(&[ep("c1", &[], "198.18.5.2")]);
    let mut r = Rotor::default();
    let mut rng = Rng(42);
    let seed = query("c1", RecordType::A);
    for _ in 0..5000 {
        let mut b = seed.clone();
        for _ in 0..1 + rng.below(6) {
            let i = rng.below(b.len() as u64) as usize;
            b[i] = rng.next() as u8;
        }
        b.truncate(rng.below(b.len() as u64 + 1) as usize);
        let _ = resolve(&t, &mut r, &b);
        let _ = servfail(&b);
    }
}
