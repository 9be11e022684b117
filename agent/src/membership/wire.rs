//! Chitchat 0.11.2's wire format, read (and, for the digest, written) by
//! us before chitchat sees a datagram (sans-IO).
//!
//! Chitchat's message types keep their fields crate-private, so the only
//! place ovl can check what a member says about other nodes is the bytes.
//! The layout mirrors chitchat 0.11.2's `message.rs`, `digest.rs`,
//! `delta.rs` and `serialize.rs` (integers little-endian, strings `u16`
//! length + UTF-8, addresses `4|6` + octets + port):
//!
//! ```text
//! message = magic u16 (45139) | protocol u8 (0) | type u8 | body
//!   Syn    (0): digest | cluster id (string)
//!   SynAck (1): digest | delta
//!   Ack    (2): delta
//!   BadCluster (3)
//! digest  = count u16 | (chitchat id | heartbeat u64 | last gc version u64 | max version u64)*
//! chitchat id = node id (string) | generation u64 | gossip addr
//! delta   = blocks: (1 | len u16 | zstd) or (2 | len u16 | raw), ended by 0;
//!           the decompressed stream is a sequence of ops:
//!   0 Node: chitchat id | last gc version u64 | from version u64
//!   1 KeyValue: key (string) | value (string) | version u64 | status u8
//!   2 SetMaxVersion: version u64
//! ```
//! The pin to `=0.11.2` in Cargo.toml keeps this honest; the unit tests
//! round-trip real chitchat messages through it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

const MAGIC: u16 = 45_139;
const PROTOCOL_V0: u8 = 0;
/// Bound on a delta's decompressed size. A 64 KB datagram of real state
/// decompresses to a few hundred KB at most; chitchat itself has no bound
/// (a zstd bomb inflates a datagram to hundreds of MB).
pub const MAX_DECOMPRESSED: usize = 1 << 20;
const BLOCK_MAX: usize = u16::MAX as usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("truncated or malformed chitchat message")]
    Malformed,
    #[error("not a chitchat v0 message")]
    BadHeader,
    #[error("delta decompresses past {MAX_DECOMPRESSED} bytes")]
    TooLarge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Syn,
    SynAck,
    Ack,
    BadCluster,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct WireId {
    pub node_id: String,
    pub generation: u64,
    pub gossip_addr: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestEntry {
    pub id: WireId,
    pub heartbeat: u64,
    pub last_gc_version: u64,
    pub max_version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeltaOp {
    Node {
        id: WireId,
        last_gc_version: u64,
        from_version: u64,
    },
    KeyValue {
        key: String,
        value: String,
        version: u64,
        status: u8,
    },
    SetMaxVersion(u64),
}

/// A parsed message: the digest (if any) is ours to rewrite; the bytes
/// after it are kept as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    pub kind: Kind,
    pub digest: Vec<DigestEntry>,
    pub delta: Vec<DeltaOp>,
    /// Everything after the digest (Syn: the cluster id; SynAck: the delta),
    /// or after the header (Ack: the delta).
    pub tail: &'a [u8],
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Malformed);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn string(&mut self) -> Result<String, WireError> {
        let n = self.u16()? as usize;
        std::str::from_utf8(self.take(n)?)
            .map(str::to_string)
            .map_err(|_| WireError::Malformed)
    }
    fn addr(&mut self) -> Result<SocketAddr, WireError> {
        let ip = match self.u8()? {
            4 => {
                let mut a = [0u8; 4];
                a.copy_from_slice(self.take(4)?);
                IpAddr::V4(Ipv4Addr::from(a))
            }
            6 => {
                let mut a = [0u8; 16];
                a.copy_from_slice(self.take(16)?);
                IpAddr::V6(Ipv6Addr::from(a))
            }
            _ => return Err(WireError::Malformed),
        };
        Ok(SocketAddr::new(ip, self.u16()?))
    }
    fn id(&mut self) -> Result<WireId, WireError> {
        Ok(WireId {
            node_id: self.string()?,
            generation: self.u64()?,
            gossip_addr: self.addr()?,
        })
    }
}

/// Parses a whole message, decompressing its delta within the bound.
pub fn parse(bytes: &[u8]) -> Result<Message<'_>, WireError> {
    parse_with(bytes, true)
}

/// Parses the header and digest only (for our own outgoing messages).
pub fn parse_head(bytes: &[u8]) -> Result<Message<'_>, WireError> {
    parse_with(bytes, false)
}

fn parse_with(bytes: &[u8], whole: bool) -> Result<Message<'_>, WireError> {
    let mut r = Reader(bytes);
    if r.u16()? != MAGIC || r.u8()? != PROTOCOL_V0 {
        return Err(WireError::BadHeader);
    }
    let kind = match r.u8()? {
        0 => Kind::Syn,
        1 => Kind::SynAck,
        2 => Kind::Ack,
        3 => Kind::BadCluster,
        _ => return Err(WireError::BadHeader),
    };
    let digest = match kind {
        Kind::Syn | Kind::SynAck => parse_digest(&mut r)?,
        _ => Vec::new(),
    };
    let tail = r.0;
    if !whole {
        return Ok(Message {
            kind,
            digest,
            delta: Vec::new(),
            tail,
        });
    }
    let delta = match kind {
        Kind::SynAck | Kind::Ack => parse_delta(&mut r)?,
        Kind::Syn => {
            r.string()?;
            Vec::new()
        }
        Kind::BadCluster => Vec::new(),
    };
    if !r.0.is_empty() {
        return Err(WireError::Malformed);
    }
    Ok(Message {
        kind,
        digest,
        delta,
        tail,
    })
}

fn parse_digest(r: &mut Reader<'_>) -> Result<Vec<DigestEntry>, WireError> {
    let n = r.u16()?;
    let mut out = Vec::with_capacity(usize::from(n).min(1024));
    for _ in 0..n {
        out.push(DigestEntry {
            id: r.id()?,
            heartbeat: r.u64()?,
            last_gc_version: r.u64()?,
            max_version: r.u64()?,
        });
    }
    Ok(out)
}

fn parse_delta(r: &mut Reader<'_>) -> Result<Vec<DeltaOp>, WireError> {
    let mut stream = Vec::new();
    let mut block = vec![0u8; BLOCK_MAX];
    loop {
        match r.u8()? {
            0 => break,
            1 => {
                let n = r.u16()? as usize;
                let compressed = r.take(n)?;
                let len = zstd::bulk::decompress_to_buffer(compressed, &mut block[..])
                    .map_err(|_| WireError::Malformed)?;
                push_bounded(&mut stream, &block[..len])?;
            }
            2 => {
                let n = r.u16()? as usize;
                push_bounded(&mut stream, r.take(n)?)?;
            }
            _ => return Err(WireError::Malformed),
        }
    }
    let mut s = Reader(&stream);
    let mut ops = Vec::new();
    while !s.0.is_empty() {
        ops.push(match s.u8()? {
            0 => DeltaOp::Node {
                id: s.id()?,
                last_gc_version: s.u64()?,
                from_version: s.u64()?,
            },
            1 => DeltaOp::KeyValue {
                key: s.string()?,
                value: s.string()?,
                version: s.u64()?,
                status: s.u8()?,
            },
            2 => DeltaOp::SetMaxVersion(s.u64()?),
            _ => return Err(WireError::Malformed),
        });
    }
    Ok(ops)
}

fn push_bounded(stream: &mut Vec<u8>, data: &[u8]) -> Result<(), WireError> {
    if stream.len() + data.len() > MAX_DECOMPRESSED {
        return Err(WireError::TooLarge);
    }
    stream.extend_from_slice(data);
    Ok(())
}

struct Writer<'a>(&'a mut Vec<u8>);

impl Writer<'_> {
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn string(&mut self, s: &str) {
        // Strings came from a parse (or from our own code, short).
        self.u16(u16::try_from(s.len()).unwrap_or(u16::MAX));
        self.0.extend_from_slice(s.as_bytes());
    }
    fn addr(&mut self, a: SocketAddr) {
        match a.ip() {
            IpAddr::V4(ip) => {
                self.0.push(4);
                self.0.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                self.0.push(6);
                self.0.extend_from_slice(&ip.octets());
            }
        }
        self.u16(a.port());
    }
    fn id(&mut self, id: &WireId) {
        self.string(&id.node_id);
        self.u64(id.generation);
        self.addr(id.gossip_addr);
    }
}

/// Writes `msg` back with `digest` in place of the one received: the
/// message chitchat gets after the guard had its say.
pub fn write_with_digest(msg: &Message<'_>, digest: &[DigestEntry], out: &mut Vec<u8>) {
    out.clear();
    let mut w = Writer(out);
    w.u16(MAGIC);
    w.0.push(PROTOCOL_V0);
    w.0.push(match msg.kind {
        Kind::Syn => 0,
        Kind::SynAck => 1,
        Kind::Ack => 2,
        Kind::BadCluster => 3,
    });
    if matches!(msg.kind, Kind::Syn | Kind::SynAck) {
        // At most as many entries as were parsed from a u16 count.
        w.u16(u16::try_from(digest.len()).unwrap_or(u16::MAX));
        for e in digest {
            w.id(&e.id);
            w.u64(e.heartbeat);
            w.u64(e.last_gc_version);
            w.u64(e.max_version);
        }
    }
    w.0.extend_from_slice(msg.tail);
}

/// Encodes a delta as one uncompressed block: for tests and the forging
/// tool of the end-to-end tests (chitchat accepts uncompressed blocks).
pub fn encode_delta(ops: &[DeltaOp], out: &mut Vec<u8>) {
    let mut stream = Vec::new();
    let mut w = Writer(&mut stream);
    for op in ops {
        match op {
            DeltaOp::Node {
                id,
                last_gc_version,
                from_version,
            } => {
                w.0.push(0);
                w.id(id);
                w.u64(*last_gc_version);
                w.u64(*from_version);
            }
            DeltaOp::KeyValue {
                key,
                value,
                version,
                status,
            } => {
                w.0.push(1);
                w.string(key);
                w.string(value);
                w.u64(*version);
                w.0.push(*status);
            }
            DeltaOp::SetMaxVersion(v) => {
                w.0.push(2);
                w.u64(*v);
            }
        }
    }
    let mut w = Writer(out);
    for chunk in stream.chunks(BLOCK_MAX) {
        w.0.push(2);
        w.u16(chunk.len() as u16);
        w.0.extend_from_slice(chunk);
    }
    w.0.push(0);
}

/// A whole SynAck or Ack message with the given digest and delta.
pub fn encode_message(kind: Kind, digest: &[DigestEntry], delta: &[DeltaOp]) -> Vec<u8> {
    let mut tail = Vec::new();
    match kind {
        Kind::SynAck | Kind::Ack => encode_delta(delta, &mut tail),
        Kind::Syn => Writer(&mut tail).string(""),
        Kind::BadCluster => {}
    }
    let msg = Message {
        kind,
        digest: Vec::new(),
        delta: Vec::new(),
        tail: &tail,
    };
    let mut out = Vec::new();
    write_with_digest(&msg, digest, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chitchat::{ChitchatMessage, Deserializable, Serializable};

    fn id(n: &str, g: u64) -> WireId {
        WireId {
            node_id: n.into(),
            generation: g,
            gossip_addr: "198.18.0.11:7946".parse().unwrap(),
        }
    }

    #[test]
    fn our_encoding_is_what_chitchat_decodes_and_reencodes() {
        let digest = vec![DigestEntry {
            id: id("a", 3),
            heartbeat: 9,
            last_gc_version: 0,
            max_version: 4,
        }];
        let delta = vec![
            DeltaOp::Node {
                id: id("b", 2),
                last_gc_version: 0,
                from_version: 0,
            },
            DeltaOp::KeyValue {
                key: "rec".into(),
                value: "x".repeat(300),
                version: 1,
                status: 0,
            },
        ];
        let bytes = encode_message(Kind::SynAck, &digest, &delta);
        let parsed = parse(&bytes).unwrap();
        assert_eq!(parsed.kind, Kind::SynAck);
        assert_eq!(parsed.digest, digest);
        assert_eq!(parsed.delta, delta);
        assert!(ChitchatMessage::deserialize(&mut bytes.as_slice()).is_ok());
        // The same delta in a zstd block, as chitchat sends it: both read it.
        let mut plain = Vec::new();
        encode_delta(&delta, &mut plain);
        let stream = &plain[3..plain.len() - 1];
        let packed = zstd::bulk::compress(stream, 0).unwrap();
        let mut z = encode_message(Kind::Ack, &[], &[]);
        z.truncate(4);
        z.push(1);
        z.extend_from_slice(&(packed.len() as u16).to_le_bytes());
        z.extend_from_slice(&packed);
        z.push(0);
        assert_eq!(parse(&z).unwrap().delta, delta);
        assert!(ChitchatMessage::deserialize(&mut z.as_slice()).is_ok());
        // A real chitchat message, written by chitchat itself.
        let bad_cluster = ChitchatMessage::BadCluster;
        let mut real = Vec::new();
        bad_cluster.serialize(&mut real);
        assert_eq!(parse(&real).unwrap().kind, Kind::BadCluster);
    }

    #[test]
    fn the_digest_rewrite_keeps_the_tail_and_chitchat_accepts_it() {
        let digest = vec![
            DigestEntry {
                id: id("a", 3),
                heartbeat: 9,
                last_gc_version: 0,
                max_version: 4,
            },
            DigestEntry {
                id: id("b", 1),
                heartbeat: 1,
                last_gc_version: 0,
                max_version: 1,
            },
        ];
        let bytes = encode_message(Kind::Syn, &digest, &[]);
        let parsed = parse(&bytes).unwrap();
        let mut out = Vec::new();
        write_with_digest(&parsed, &digest[1..], &mut out);
        let reparsed = parse(&out).unwrap();
        assert_eq!(reparsed.digest, digest[1..].to_vec());
        assert!(ChitchatMessage::deserialize(&mut out.as_slice()).is_ok());
    }

    #[test]
    fn truncations_and_bombs_are_errors_not_panics() {
        let bytes = encode_message(
            Kind::Ack,
            &[],
            &[DeltaOp::Node {
                id: id("a", 1),
                last_gc_version: 0,
                from_version: 0,
            }],
        );
        for n in 0..bytes.len() {
            assert!(parse(&bytes[..n]).is_err(), "prefix {n}");
        }
        // Zeros compress ~1000:1: enough blocks inflate past the bound.
        let zeros = vec![0u8; BLOCK_MAX];
        let block = zstd::bulk::compress(&zeros, 0).unwrap();
        let mut bomb = MAGIC.to_le_bytes().to_vec();
        bomb.extend_from_slice(&[PROTOCOL_V0, 2]);
        for _ in 0..(MAX_DECOMPRESSED / BLOCK_MAX + 1) {
            bomb.push(1);
            bomb.extend_from_slice(&(block.len() as u16).to_le_bytes());
            bomb.extend_from_slice(&block);
        }
        bomb.push(0);
        assert_eq!(parse(&bomb), Err(WireError::TooLarge));
    }
}
