//! Which address a request comes from: the TCP peer, or — only when the peer is a trusted proxy
//! (`trusted_proxies`) — the right-most untrusted address of `X-Forwarded-For`.
//!
//! Proxies append the address they received a request from, so the entries a client cannot
//! forge are the right-most ones, up to and including the first one a trusted proxy appended
//! about an untrusted peer. Entries left of that are whatever the client chose to send and are
//! never used. Addresses are compared in canonical form (`::ffff:10.0.0.1` is `10.0.0.1`).

use std::net::IpAddr;

/// A list of trusted proxy addresses and networks (`trusted_proxies`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    nets: Vec<Net>,
}

/// One address or CIDR network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl Net {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Why a `trusted_proxies` list was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{entry:?} is not an IP address or CIDR network (e.g. 10.0.0.0/8, fd00::/8)")]
pub struct ParseError {
    /// The entry that did not parse.
    pub entry: String,
}

impl TrustedProxies {
    /// Parses a comma-separated list of IP addresses and CIDR networks; empty trusts nobody.
    pub fn parse(list: &str) -> Result<Self, ParseError> {
        let mut nets = Vec::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let bad = || ParseError {
                entry: entry.to_owned(),
            };
            let (addr, prefix) = match entry.split_once('/') {
                Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| bad())?)),
                None => (entry, None),
            };
            let addr = addr.parse::<IpAddr>().map_err(|_| bad())?.to_canonical();
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let prefix = prefix.unwrap_or(max);
            if prefix > max {
                return Err(bad());
            }
            nets.push(Net { addr, prefix });
        }
        Ok(Self { nets })
    }

    /// True when `ip` is a trusted proxy.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|n| n.contains(ip))
    }

    /// The client address of a request from `peer` carrying these `X-Forwarded-For` values (in
    /// header order). An untrusted peer is the client, whatever the header says. Behind trusted
    /// proxies it is the right-most entry that is not itself trusted; when every entry is trusted
    /// (or one does not parse), the left-most trusted one reached.
    pub fn client_ip<'a>(
        &self,
        peer: IpAddr,
        forwarded_for: impl DoubleEndedIterator<Item = &'a str>,
    ) -> IpAddr {
        let mut client = peer.to_canonical();
        if !self.contains(client) {
            return client;
        }
        for value in forwarded_for.rev() {
            for entry in value.rsplit(',') {
                let Some(ip) = parse_entry(entry) else {
                    return client;
                };
                client = ip;
                if !self.contains(ip) {
                    return client;
                }
            }
        }
        client
    }
}

/// One `X-Forwarded-For` entry: an address, optionally with a port (`1.2.3.4:80`, `[::1]:80`).
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
        .map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_addresses_and_networks() {
        let t = TrustedProxies::parse(" 10.0.0.0/8, 192.168.1.7 ,fd00::/8,").unwrap();
        assert!(t.contains(ip("10.200.3.4")));
        assert!(t.contains(ip("::ffff:10.1.1.1")), "mapped v4 is canonical");
        assert!(t.contains(ip("192.168.1.7")));
        assert!(!t.contains(ip("192.168.1.8")));
        assert!(t.contains(ip("fd12::1")));
        assert!(!t.contains(ip("fe80::1")));
        assert!(!TrustedProxies::parse("").unwrap().contains(ip("10.0.0.1")));
        assert!(
            TrustedProxies::parse("0.0.0.0/0")
                .unwrap()
                .contains(ip("8.8.8.8"))
        );
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "example.com",
            "10.0.0.1/x",
            "1.2.3",
        ] {
            assert_eq!(
                TrustedProxies::parse(bad),
                Err(ParseError { entry: bad.into() }),
                "{bad}"
            );
        }
    }

    #[test]
    fn forwarded_for_is_honoured_only_from_trusted_peers() {
        let none = TrustedProxies::default();
        let xff = ["10.9.9.9"];
        assert_eq!(
            none.client_ip(ip("127.0.0.1"), xff.into_iter()),
            ip("127.0.0.1")
        );
        let t = TrustedProxies::parse("127.0.0.1,10.0.0.0/8").unwrap();
        // untrusted peer: the header is ignored
        assert_eq!(t.client_ip(ip("1.2.3.4"), xff.into_iter()), ip("1.2.3.4"));
        // trusted peer, no header: the peer
        assert_eq!(
            t.client_ip(ip("127.0.0.1"), std::iter::empty()),
            ip("127.0.0.1")
        );
        // the right-most untrusted entry; a forged left part is ignored
        assert_eq!(
            t.client_ip(
                ip("127.0.0.1"),
                ["6.6.6.6, 5.5.5.5", "10.1.1.1:443"].into_iter()
            ),
            ip("5.5.5.5")
        );
        assert_eq!(
            t.client_ip(ip("127.0.0.1"), ["[2001:db8::1]:80"].into_iter()),
            ip("2001:db8::1")
        );
        // every entry trusted: the left-most
        assert_eq!(
            t.client_ip(ip("127.0.0.1"), ["10.0.0.2, 10.0.0.3"].into_iter()),
            ip("10.0.0.2")
        );
        // garbage stops the walk at the last trusted hop
        assert_eq!(
            t.client_ip(ip("127.0.0.1"), ["7.7.7.7, junk, 10.0.0.3"].into_iter()),
            ip("10.0.0.3")
        );
    }
}
