//! Customers' addresses: which peer may vouch for another address (`X-Forwarded-For` from the
//! configured trusted proxies only), and the key an address is counted under (IPv6 per /64, the
//! block one customer's line usually gets).

use axum::http::HeaderMap;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;

/// A network, `10.0.0.0/8` or `2001:db8::/32`; a plain address is a network of one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{0}` is not an address or network (expected e.g. 10.0.0.0/8, 192.168.1.5 or 2001:db8::/32)")]
pub struct CidrError(String);

impl FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let bad = || CidrError(s.chars().take(80).collect());
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s.trim(), None),
        };
        let net = canonical(addr.parse::<IpAddr>().map_err(|_| bad())?);
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr { net, prefix })
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// An IPv4 address written as IPv6 (`::ffff:1.2.3.4`, as dual-stack sockets report them) is IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// `X-Forwarded-For` longer than this is not read (no proxy chain is that long).
const MAX_FORWARDED_BYTES: usize = 2048;

/// The customer's address. Only a peer in `trusted` may name another one: the list in
/// `X-Forwarded-For` is read from the right (the entry our proxy added) past every trusted proxy,
/// and the first address not in `trusted` is the customer. With no trusted proxies (the default),
/// or an unreadable header, it is the peer itself: anyone can write that header.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[Cidr]) -> IpAddr {
    let peer = canonical(peer);
    if !trusted.iter().any(|c| c.contains(peer)) {
        return peer;
    }
    let mut hops: Vec<&str> = Vec::new();
    let mut total = 0;
    for value in headers.get_all("x-forwarded-for") {
        total += value.len();
        let Ok(v) = value.to_str() else { return peer };
        if total > MAX_FORWARDED_BYTES {
            return peer;
        }
        hops.extend(v.split(','));
    }
    let mut client = peer;
    for hop in hops.iter().rev() {
        let Ok(ip) = hop.trim().parse::<IpAddr>() else { return client };
        client = canonical(ip);
        if !trusted.iter().any(|c| c.contains(client)) {
            break;
        }
    }
    client
}

/// The address a customer is counted under: IPv4 as it is, IPv6 by its /64 (one line's block;
/// counting per /128 would let one customer use 2^64 addresses).
pub fn counted(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & (u128::MAX << 64))),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_parse_and_contain() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains(ip("10.200.1.1")) && !c.contains(ip("11.0.0.1")));
        assert!(c.contains(ip("::ffff:10.1.2.3")), "IPv4 written as IPv6");
        let one: Cidr = "192.168.1.5".parse().unwrap();
        assert!(one.contains(ip("192.168.1.5")) && !one.contains(ip("192.168.1.6")));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")) && !v6.contains(ip("2001:db9::1")));
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(ip("8.8.8.8")));
        for bad in ["10.0.0.0/33", "nonsense", "10.0.0.0/x", "::/129", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let proxy: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        // Nobody is trusted by default: the header is ignored.
        assert_eq!(client_ip(ip("203.0.113.9"), &headers(&["1.2.3.4"]), &[]), ip("203.0.113.9"));
        // From an untrusted peer it is ignored too.
        assert_eq!(client_ip(ip("203.0.113.9"), &headers(&["1.2.3.4"]), &proxy), ip("203.0.113.9"));
        // Through our proxy: the entry it added, not the one the client wrote in front of it.
        assert_eq!(client_ip(ip("10.0.0.2"), &headers(&["6.6.6.6, 198.51.100.7"]), &proxy), ip("198.51.100.7"));
        // Through two of our proxies (one header each).
        assert_eq!(
            client_ip(ip("10.0.0.2"), &headers(&["6.6.6.6, 198.51.100.7", "10.0.0.3"]), &proxy),
            ip("198.51.100.7")
        );
        // Garbage stops the walk at the last address we could vouch for.
        assert_eq!(client_ip(ip("10.0.0.2"), &headers(&["198.51.100.7, bogus"]), &proxy), ip("10.0.0.2"));
        // Without the header the proxy itself is the client.
        assert_eq!(client_ip(ip("10.0.0.2"), &headers(&[]), &proxy), ip("10.0.0.2"));
        // A header longer than any real chain is not read.
        let long = vec!["1.1.1.1"; 400].join(",");
        assert_eq!(client_ip(ip("10.0.0.2"), &headers(&[&long]), &proxy), ip("10.0.0.2"));
    }

    #[test]
    fn ipv6_is_counted_per_64() {
        assert_eq!(counted(ip("2001:db8:1:2:aaaa::1")), counted(ip("2001:db8:1:2:bbbb::9")));
        assert_ne!(counted(ip("2001:db8:1:2::1")), counted(ip("2001:db8:1:3::1")));
        assert_eq!(counted(ip("::ffff:1.2.3.4")), ip("1.2.3.4"));
        assert_eq!(counted(ip("1.2.3.4")), ip("1.2.3.4"));
    }
}
