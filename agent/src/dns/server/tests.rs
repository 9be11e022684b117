//! Real sockets on loopback: the server, a fake upstream, real clients.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use super::*;
use crate::dns::table::{NameTable, NamedEndpoint};
use crate::metrics::{Counter, Counters};

fn table(names: &[(&str, &str)]) -> NameTable {
    let eps: Vec<_> = names
        .iter()
        .map(|(n, ip)| NamedEndpoint {
            name: n.to_string(),
            aliases: vec![],
            ip: ip.parse().unwrap(),
        })
        .collect();
    NameTable::new(Some("198.18.5.0/24".parse().unwrap()), &eps)
}

fn query(id: u16, name: &str) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    m.to_vec().unwrap()
}

async fn udp_ask(server: SocketAddr, id: u16, name: &str) -> Message {
    let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    c.send_to(&query(id, name), server).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), c.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(m.id(), id);
    m
}

fn first_a(m: &Message) -> Option<Ipv4Addr> {
    m.answers().iter().find_map(|r| match r.data() {
        RData::A(a) => Some(a.0),
        _ => None,
    })
}

/// A fake upstream on loopback UDP answering every A query with 198.18.9.9.
async fn fake_upstream() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        loop {
            let (n, from) = s.recv_from(&mut buf).await.unwrap();
            let q = Message::from_vec(&buf[..n]).unwrap();
            let mut r = Message::new();
            r.set_id(q.id())
                .set_message_type(MessageType::Response)
                .set_recursion_available(true);
            r.add_query(q.queries()[0].clone());
            r.add_answer(Record::from_rdata(
                q.queries()[0].name().clone(),
                60,
                RData::A(A::new(198, 18, 9, 9)),
            ));
            s.send_to(&r.to_vec().unwrap(), from).await.unwrap();
        }
    });
    addr
}

fn start(t: NameTable, config: Config) -> (Server, Arc<Counters>) {
    let counters = Arc::new(Counters::default());
    let shared = Shared::new(config, counters.clone());
    let server = Server::spawn(bind("127.0.0.1:0".parse().unwrap()).unwrap(), t, shared).unwrap();
    (server, counters)
}

#[tokio::test]
async fn answers_names_and_follows_updates_live() {
    let (server, counters) = start(table(&[("c1", "198.18.5.2")]), Config::default());
    let m = udp_ask(server.addr, 1, "c1").await;
    assert_eq!(first_a(&m), Some("198.18.5.2".parse().unwrap()));
    assert!(server.update(table(&[("c2", "198.18.5.3")])));
    assert!(!server.update(table(&[("c2", "198.18.5.3")])));
    assert_eq!(
        udp_ask(server.addr, 2, "c1").await.response_code(),
        ResponseCode::NXDomain
    );
    assert_eq!(
        first_a(&udp_ask(server.addr, 3, "c2").await),
        Some("198.18.5.3".parse().unwrap())
    );
    assert_eq!(counters.get(Counter::DnsQueries), 3);
    assert_eq!(counters.get(Counter::DnsAnswers), 2);
    assert_eq!(counters.get(Counter::DnsNxdomain), 1);
}

#[tokio::test]
async fn tcp_queries_are_answered() {
    let (server, _) = start(table(&[("c1", "198.18.5.2")]), Config::default());
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    for id in 1..4u16 {
        let q = query(id, "C1.");
        s.write_u16(q.len() as u16).await.unwrap();
        s.write_all(&q).await.unwrap();
        let n = s.read_u16().await.unwrap();
        let mut buf = vec![0u8; n as usize];
        s.read_exact(&mut buf).await.unwrap();
        let m = Message::from_vec(&buf).unwrap();
        assert_eq!(
            (m.id(), first_a(&m)),
            (id, Some("198.18.5.2".parse().unwrap()))
        );
    }
}

#[tokio::test]
async fn other_names_go_upstream_and_fail_as_servfail() {
    let up = fake_upstream().await;
    // A bound socket that never answers: the first upstream times out.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let config = Config {
        upstreams: vec![dead.local_addr().unwrap(), up],
        timeout: Duration::from_millis(300),
        ..Config::default()
    };
    let (server, counters) = start(table(&[("c1", "198.18.5.2")]), config);
    let m = udp_ask(server.addr, 7, "example.com.").await;
    assert_eq!(first_a(&m), Some("198.18.9.9".parse().unwrap()));
    assert_eq!(counters.get(Counter::DnsForwarded), 1);

    let only_dead = Config {
        upstreams: vec![dead.local_addr().unwrap()],
        timeout: Duration::from_millis(200),
        ..Config::default()
    };
    let (server, counters) = start(table(&[]), only_dead);
    assert_eq!(
        udp_ask(server.addr, 8, "example.com.")
            .await
            .response_code(),
        ResponseCode::ServFail
    );
    assert_eq!(counters.get(Counter::DnsUpstreamFailures), 1);
    // Single labels never leave: NXDOMAIN even with a dead upstream.
    assert_eq!(
        udp_ask(server.addr, 9, "c1").await.response_code(),
        ResponseCode::NXDomain
    );
}

#[tokio::test]
async fn over_the_forward_cap_is_servfail_and_counted() {
    let up = fake_upstream().await;
    let config = Config {
        upstreams: vec![up],
        max_inflight: 0,
        ..Config::default()
    };
    let (server, counters) = start(table(&[]), config);
    assert_eq!(
        udp_ask(server.addr, 1, "example.com.")
            .await
            .response_code(),
        ResponseCode::ServFail
    );
    assert_eq!(counters.get(Counter::DnsOverloaded), 1);
}

#[tokio::test]
async fn dropping_the_server_frees_the_port() {
    let (server, _) = start(table(&[]), Config::default());
    let addr = server.addr;
    drop(server);
    tokio::time::sleep(Duration::from_millis(50)).await;
    bind(addr).unwrap();
}
