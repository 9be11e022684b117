//! The resolver core: a query's bytes, a network's [`NameTable`] and the
//! rotation state in, an [`Outcome`] out. No sockets, no clock (DESIGN.md,
//! "Names"; STYLE.md, "Sans-IO where the logic is subtle").
//!
//! Rules, in order:
//! - not a standard query with one question: FORMERR / NOTIMP / REFUSED;
//! - a name of this network (endpoint name or alias, any case, trailing
//!   dot or not): A answers every address, rotated per name so each holder
//!   of a shared alias is first in turn (Docker's `--net-alias`); AAAA and
//!   other types get an empty NOERROR (endpoints are IPv4 only);
//! - a PTR for an address in the network's subnet: the endpoint's name, or
//!   NXDOMAIN for a free address (never forwarded: it is ours);
//! - any other single-label name: NXDOMAIN, never forwarded (it can only
//!   mean a container name, and another network's must not be guessed at);
//! - everything else: forwarded to the host's upstream resolvers.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use super::table::{NameTable, normalize};

/// Answers carry no lifetime worth caching: names follow attaches and
/// detaches within the replication latency, and a cached answer would
/// outlive a detach.
pub const TTL: u32 = 0;

/// What to do with one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Reply with these bytes.
    Reply { bytes: Vec<u8>, kind: ReplyKind },
    /// Not ours: send the query, unchanged, to an upstream resolver.
    Forward,
    /// Not a DNS message at all (too short for a header): drop it.
    Malformed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// A name of this network (with records or an empty NOERROR).
    Answer,
    NxDomain,
    /// FORMERR, NOTIMP or REFUSED: the query was not one we serve.
    Refused,
    /// The header parsed but the message did not (FORMERR).
    Malformed,
}

/// Per-name rotation: the index of the address to put first next time.
/// Holds only names of the current table (`retain` after a swap), so its
/// size is bounded by the network's names.
#[derive(Debug, Default)]
pub struct Rotor {
    next: HashMap<String, usize>,
}

impl Rotor {
    /// The offset for `key` this time, advancing it.
    fn take(&mut self, key: &str, n: usize) -> usize {
        let slot = match self.next.get_mut(key) {
            Some(s) => s,
            None => self.next.entry(key.to_owned()).or_insert(0),
        };
        let at = *slot % n.max(1);
        *slot = (at + 1) % n.max(1);
        at
    }

    /// Forgets names no longer in `table` (after a table swap).
    pub fn retain(&mut self, table: &NameTable) {
        self.next.retain(|k, _| table.contains(k));
    }

    pub fn len(&self) -> usize {
        self.next.len()
    }

    pub fn is_empty(&self) -> bool {
        self.next.is_empty()
    }
}

/// The response to `query` from `table`, or what else to do with it.
pub fn resolve(table: &NameTable, rotor: &mut Rotor, query: &[u8]) -> Outcome {
    let msg = match Message::from_vec(query) {
        Ok(m) => m,
        Err(_) => {
            return match header_id(query) {
                Some(id) => error_reply(
                    id,
                    OpCode::Query,
                    false,
                    ResponseCode::FormErr,
                    ReplyKind::Malformed,
                ),
                None => Outcome::Malformed,
            };
        }
    };
    let rd = msg.recursion_desired();
    if msg.message_type() != MessageType::Query {
        // A response sent to a server: never answered (no reflection).
        return Outcome::Malformed;
    }
    if msg.op_code() != OpCode::Query {
        return error_reply(
            msg.id(),
            msg.op_code(),
            rd,
            ResponseCode::NotImp,
            ReplyKind::Refused,
        );
    }
    let [q] = msg.queries() else {
        return error_reply(
            msg.id(),
            OpCode::Query,
            rd,
            ResponseCode::FormErr,
            ReplyKind::Refused,
        );
    };
    let qname = q.name().to_ascii();
    let key = normalize(&qname);
    let ours_class = matches!(q.query_class(), DNSClass::IN | DNSClass::ANY);

    let mut answers = Vec::new();
    let code;
    if let Some(ips) = table.lookup(&key) {
        if !ours_class {
            return error_reply(
                msg.id(),
                OpCode::Query,
                rd,
                ResponseCode::Refused,
                ReplyKind::Refused,
            );
        }
        if matches!(q.query_type(), RecordType::A | RecordType::ANY) {
            let first = rotor.take(&key, ips.len());
            for ip in ips[first..].iter().chain(&ips[..first]) {
                answers.push(Record::from_rdata(q.name().clone(), TTL, RData::A(A(*ip))));
            }
        }
        code = ResponseCode::NoError;
    } else if let Some(ip) = in_addr_arpa(&key) {
        if !table.subnet.is_some_and(|s| s.contains(ip)) {
            return Outcome::Forward;
        }
        match table.reverse(ip) {
            Some(name) if ours_class => {
                if matches!(q.query_type(), RecordType::PTR | RecordType::ANY) {
                    let Ok(target) = Name::from_ascii(format!("{name}.")) else {
                        return error_reply(
                            msg.id(),
                            OpCode::Query,
                            rd,
                            ResponseCode::ServFail,
                            ReplyKind::Refused,
                        );
                    };
                    answers.push(Record::from_rdata(
                        q.name().clone(),
                        TTL,
                        RData::PTR(PTR(target)),
                    ));
                }
                code = ResponseCode::NoError;
            }
            Some(_) => {
                return error_reply(
                    msg.id(),
                    OpCode::Query,
                    rd,
                    ResponseCode::Refused,
                    ReplyKind::Refused,
                );
            }
            None => code = ResponseCode::NXDomain,
        }
    } else if !key.is_empty() && !key.contains('.') {
        code = ResponseCode::NXDomain;
    } else {
        return Outcome::Forward;
    }

    let mut reply = Message::new();
    reply
        .set_id(msg.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_authoritative(true)
        .set_recursion_desired(rd)
        .set_recursion_available(true)
        .set_response_code(code);
    reply.add_query(q.clone());
    reply.add_answers(answers);
    let kind = if code == ResponseCode::NXDomain {
        ReplyKind::NxDomain
    } else {
        ReplyKind::Answer
    };
    match reply.to_vec() {
        Ok(bytes) => Outcome::Reply { bytes, kind },
        Err(_) => error_reply(
            msg.id(),
            OpCode::Query,
            rd,
            ResponseCode::ServFail,
            ReplyKind::Refused,
        ),
    }
}

/// SERVFAIL for `query` (an upstream failed or timed out); `None` if the
/// query has no header to answer.
pub fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    let id = header_id(query)?;
    let rd = query.get(2).is_some_and(|b| b & 0x01 != 0);
    let mut m = Message::error_msg(id, OpCode::Query, ResponseCode::ServFail);
    m.set_recursion_desired(rd).set_recursion_available(true);
    // Echo the question when it parses, as resolvers match on it.
    if let Ok(q) = Message::from_vec(query)
        && let [q] = q.queries()
    {
        m.add_query(q.clone());
    }
    m.to_vec().ok()
}

/// The message ID of a query that has at least a DNS header (RFC 1035
/// §4.1.1: 12 bytes, ID first). A response (QR set) has none to answer.
pub fn header_id(query: &[u8]) -> Option<u16> {
    let h = query.get(..12)?;
    (h[2] & 0x80 == 0).then(|| u16::from_be_bytes([h[0], h[1]]))
}

fn error_reply(id: u16, op: OpCode, rd: bool, code: ResponseCode, kind: ReplyKind) -> Outcome {
    let mut m = Message::error_msg(id, op, code);
    m.set_recursion_desired(rd).set_recursion_available(true);
    match m.to_vec() {
        Ok(bytes) => Outcome::Reply { bytes, kind },
        Err(_) => Outcome::Malformed,
    }
}

/// `d.c.b.a.in-addr.arpa` (normalized) → `a.b.c.d`; `None` for anything
/// else, including partial reverse names (those are forwarded).
fn in_addr_arpa(key: &str) -> Option<Ipv4Addr> {
    let rest = key.strip_suffix(".in-addr.arpa")?;
    let mut octets = [0u8; 4];
    let mut labels = rest.split('.');
    for o in octets.iter_mut().rev() {
        let l = labels.next()?;
        // Canonical decimal only: "010" is not an octet label.
        if l.is_empty() || l.len() > 3 || (l.len() > 1 && l.starts_with('0')) {
            return None;
        }
        *o = l.parse().ok()?;
    }
    labels.next().is_none().then(|| Ipv4Addr::from(octets))
}

#[cfg(test)]
mod tests;
