//! The host's upstream resolvers: `nameserver` lines of the host
//! namespace's `/etc/resolv.conf`, read once at start, or `--dns-upstream`.

use std::net::{IpAddr, SocketAddr};

/// DNS port (RFC 1035 §4.2).
pub const PORT: u16 = 53;

/// The `nameserver` addresses in resolv.conf text, in order. Lines that do
/// not parse are skipped (glibc does the same). Loopback resolvers (a local
/// stub such as systemd-resolved's 127.0.0.53) stay: forwarding runs in
/// the host namespace, where they are reachable.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next()? == "nameserver").then_some(())?;
            // A scoped IPv6 address (fe80::1%eth0) cannot be used from here.
            let ip: IpAddr = w.next()?.parse().ok()?;
            Some(SocketAddr::new(ip, PORT))
        })
        .collect()
}

/// `--dns-upstream` values: `IP` or `IP:PORT`.
pub fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, PORT)))
        .map_err(|_| format!("--dns-upstream {s:?}: expected IP or IP:PORT"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_nameservers_in_order_and_skips_the_rest() {
        let t = "# c\nsearch example\nnameserver 198.18.0.1\nnameserver  ::1 \nnameserver bogus\noptions ndots:2\nnameserver fe80::1%eth0\n";
        assert_eq!(
            parse_resolv_conf(t),
            vec![
                "198.18.0.1:53".parse().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn upstream_flag_accepts_ip_or_socket_address() {
        assert_eq!(
            parse_upstream("198.18.0.1").unwrap(),
            "198.18.0.1:53".parse().unwrap()
        );
        assert_eq!(
            parse_upstream("198.18.0.1:5353").unwrap(),
            "198.18.0.1:5353".parse().unwrap()
        );
        assert!(parse_upstream("x").is_err());
    }
}
