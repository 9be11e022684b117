//! Raw data-path packets for the end-to-end tests of encrypted networks:
//! an underlay attacker's tools and a container-side listener.
//!
//! ```text
//! ovl-wire vxlan --to IP:PORT --vni N --dst-mac MAC --src-ip IP --dst-ip IP --port P --payload TEXT
//!     one cleartext VXLAN datagram (RFC 7348) carrying Ethernet/IPv4/UDP
//!     to P with TEXT as payload (the injection a plain VXLAN device accepts)
//! ovl-wire replay --pcap FILE --port P [--flip OFFSET] [--limit N]
//!     sends again, to their original destination, the UDP payloads of the
//!     datagrams to port P in a tcpdump capture (-w, Ethernet or Linux cooked);
//!     with --flip, byte OFFSET of each payload is inverted first (tamper)
//! ovl-wire send --to IP:PORT --payload TEXT [--count N] [--interval-ms MS]
//!     plain UDP datagrams (run inside a container namespace)
//! ovl-wire listen --port P --secs S
//!     counts UDP datagrams arriving on 0.0.0.0:P for S seconds, prints
//!     `received N` and each payload (run inside a container namespace)
//! ```
//! Only for tests: it sends inside the test's namespaces.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (cmd, rest) = args
        .split_first()
        .context("usage: ovl-wire vxlan|replay|listen ...")?;
    let flags = Flags::parse(rest)?;
    match cmd.as_str() {
        "vxlan" => vxlan(&flags),
        "replay" => replay(&flags),
        "listen" => listen(&flags),
        "send" => send(&flags),
        other => bail!("unknown command {other:?}"),
    }
}

struct Flags(Vec<(String, String)>);

impl Flags {
    fn parse(rest: &[String]) -> Result<Self> {
        let mut out = Vec::new();
        let mut it = rest.iter();
        while let Some(flag) = it.next() {
            let value = it.next().with_context(|| format!("{flag} needs a value"))?;
            out.push((flag.trim_start_matches("--").to_string(), value.clone()));
        }
        Ok(Self(out))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn req<T: std::str::FromStr>(&self, name: &str) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        let v = self
            .get(name)
            .with_context(|| format!("--{name} is required"))?;
        v.parse()
            .map_err(|e| anyhow::anyhow!("--{name} {v:?}: {e}"))
    }
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("MAC {s:?}"))?;
    parts
        .try_into()
        .map_err(|_| anyhow::anyhow!("MAC {s:?} is not 6 bytes"))
}

/// RFC 791 header checksum.
fn ip_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn vxlan(f: &Flags) -> Result<()> {
    let to: SocketAddr = f.req("to")?;
    let vni: u32 = f.req("vni")?;
    let dst_mac = parse_mac(f.get("dst-mac").context("--dst-mac is required")?)?;
    let src_ip: Ipv4Addr = f.req("src-ip")?;
    let dst_ip: Ipv4Addr = f.req("dst-ip")?;
    let port: u16 = f.req("port")?;
    let payload = f.get("payload").unwrap_or("ovl-wire").as_bytes();
    let count: u32 = f.get("count").map_or(Ok(1), str::parse)?;

    let mut udp = Vec::new();
    udp.extend_from_slice(&40000u16.to_be_bytes());
    udp.extend_from_slice(&port.to_be_bytes());
    udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&0u16.to_be_bytes()); // no checksum (RFC 768)
    udp.extend_from_slice(payload);
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&((20 + udp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&src_ip.octets());
    ip.extend_from_slice(&dst_ip.octets());
    let c = ip_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut frame = Vec::new();
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&[0x02, 0x42, 0xc6, 0x13, 0xee, 0xee]);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&udp);
    // VXLAN header: I flag, VNI in bytes 4..7 (RFC 7348 §5).
    let mut dgram = vec![0x08, 0, 0, 0];
    dgram.extend_from_slice(&(vni << 8).to_be_bytes());
    dgram.extend_from_slice(&frame);
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    for _ in 0..count {
        sock.send_to(&dgram, to)
            .with_context(|| format!("send to {to}"))?;
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "sent {count} VXLAN datagram(s) of {} bytes to {to}",
        dgram.len()
    );
    Ok(())
}

/// (destination, UDP payload) of each IPv4/UDP packet in a pcap file.
fn pcap_datagrams(bytes: &[u8]) -> Result<Vec<(SocketAddrV4, Vec<u8>)>> {
    if bytes.len() < 24 {
        bail!("not a pcap file (short)");
    }
    let magic = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let le = match magic {
        0xa1b2c3d4 | 0xa1b23c4d => true,
        0xd4c3b2a1 | 0x4d3cb2a1 => false,
        _ => bail!("not a pcap file (magic {magic:08x})"),
    };
    let u32_at = |b: &[u8], i: usize| {
        let a = [b[i], b[i + 1], b[i + 2], b[i + 3]];
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let link = u32_at(bytes, 20);
    let l2 = match link {
        1 => 14,   // Ethernet
        113 => 16, // Linux cooked (SLL)
        276 => 20, // Linux cooked v2
        _ => bail!("pcap link type {link} not handled"),
    };
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let caplen = u32_at(bytes, at + 8) as usize;
        let start = at + 16;
        let end = start + caplen;
        if end > bytes.len() {
            break;
        }
        let pkt = &bytes[start..end];
        at = end;
        let Some(ip) = pkt.get(l2..) else { continue };
        if ip.len() < 28 || ip[0] >> 4 != 4 || ip[9] != 17 {
            continue;
        }
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let Some(udp) = ip.get(ihl..) else { continue };
        if udp.len() < 8 {
            continue;
        }
        let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        let dport = u16::from_be_bytes([udp[2], udp[3]]);
        out.push((SocketAddrV4::new(dst, dport), udp[8..].to_vec()));
    }
    Ok(out)
}

fn replay(f: &Flags) -> Result<()> {
    let path: String = f.req("pcap")?;
    let port: u16 = f.req("port")?;
    let flip: Option<usize> = f.get("flip").map(str::parse).transpose()?;
    let limit: usize = f.get("limit").map_or(Ok(usize::MAX), str::parse)?;
    let bytes = std::fs::read(&path).with_context(|| format!("read {path}"))?;
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    let mut sent = 0;
    for (dst, mut payload) in pcap_datagrams(&bytes)?
        .into_iter()
        .filter(|(d, _)| d.port() == port)
        .take(limit)
    {
        if let Some(b) = flip.and_then(|i| payload.get_mut(i)) {
            *b ^= 0xff;
        }
        sock.send_to(&payload, dst)
            .with_context(|| format!("send to {dst}"))?;
        sent += 1;
    }
    println!("replayed {sent} datagram(s) to port {port}");
    if sent == 0 {
        bail!("the capture holds no datagram to port {port}");
    }
    Ok(())
}

fn send(f: &Flags) -> Result<()> {
    let to: SocketAddr = f.req("to")?;
    let payload = f.get("payload").unwrap_or("ovl-wire");
    let count: u32 = f.get("count").map_or(Ok(1), str::parse)?;
    let gap = Duration::from_millis(f.get("interval-ms").map_or(Ok(20), str::parse)?);
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    for _ in 0..count {
        sock.send_to(payload.as_bytes(), to)
            .with_context(|| format!("send to {to}"))?;
        std::thread::sleep(gap);
    }
    println!("sent {count} datagram(s) to {to}");
    Ok(())
}

fn listen(f: &Flags) -> Result<()> {
    let port: u16 = f.req("port")?;
    let secs: u64 = f.req("secs")?;
    let sock = UdpSocket::bind(("0.0.0.0", port)).with_context(|| format!("bind :{port}"))?;
    let deadline = Instant::now() + Duration::from_secs(secs);
    // Ready: the test starts sending only after it reads this line.
    println!("listening on {port}");
    let mut buf = [0u8; 65536];
    let mut n = 0;
    let mut payloads = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        match sock.recv_from(&mut buf) {
            Ok((len, _)) => {
                n += 1;
                payloads.push(String::from_utf8_lossy(&buf[..len]).into_owned());
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.into()),
        }
    }
    println!("received {n}");
    for p in payloads {
        println!("payload {p}");
    }
    Ok(())
}
