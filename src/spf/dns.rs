//! The DNS questions SPF asks, behind a trait so the walker and the evaluator are
//! testable with a zone in memory; the real implementation is `hickory`.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsFailure {
    /// NXDOMAIN: the name does not exist.
    NxDomain,
    /// The name exists but has no record of that type.
    NoData,
    Timeout,
    /// SERVFAIL, refused, network trouble.
    Other(String),
    /// The answer holds a record with empty RDATA, which hickory's decoder refuses:
    /// for TXT, asked again without it (`lenient`).
    EmptyRecord,
}

impl DnsFailure {
    /// RFC 7208 §4.6.4 "void lookup": NXDOMAIN or an empty answer.
    pub fn is_void(&self) -> bool {
        matches!(self, DnsFailure::NxDomain | DnsFailure::NoData)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TxtAnswer {
    /// Each TXT record as its list of character-strings.
    pub records: Vec<Vec<Vec<u8>>>,
    pub ttl: u32,
}

pub trait SpfDns: Send + Sync + 'static {
    fn txt(&self, name: &str) -> impl Future<Output = Result<TxtAnswer, DnsFailure>> + Send;
    fn a(&self, name: &str) -> impl Future<Output = Result<Vec<Ipv4Addr>, DnsFailure>> + Send;
    fn aaaa(&self, name: &str) -> impl Future<Output = Result<Vec<Ipv6Addr>, DnsFailure>> + Send;
    /// MX exchange names, without the trailing dot.
    fn mx(&self, name: &str) -> impl Future<Output = Result<Vec<String>, DnsFailure>> + Send;
    /// PTR names of an address (the `in-addr.arpa`/`ip6.arpa` question), without the
    /// trailing dot.
    fn ptr(&self, ip: IpAddr) -> impl Future<Output = Result<Vec<String>, DnsFailure>> + Send;

    /// Number of A and AAAA records: whether a name exists as a host, for the walker.
    fn addresses(&self, name: &str) -> impl Future<Output = Result<usize, DnsFailure>> + Send {
        async move {
            let v4 = self.a(name).await;
            if let Err(e) = &v4 {
                if !e.is_void() {
                    return Err(e.clone());
                }
            }
            let v6 = self.aaaa(name).await;
            match (v4, v6) {
                (Ok(a), Ok(b)) => Ok(a.len() + b.len()),
                (Ok(a), Err(_)) => Ok(a.len()),
                (Err(_), Ok(b)) => Ok(b.len()),
                (Err(e), Err(DnsFailure::NoData)) => Err(e),
                (Err(_), Err(e)) => Err(e),
            }
        }
    }
}

/// The PTR question for an address: `4.3.2.1.in-addr.arpa`, or 32 nibbles under
/// `ip6.arpa`.
pub fn reverse_name(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            format!("{d}.{c}.{b}.{a}.in-addr.arpa")
        }
        IpAddr::V6(v6) => {
            let mut out = String::with_capacity(72);
            for n in nibbles(v6).iter().rev() {
                out.push(char::from_digit(u32::from(*n), 16).unwrap_or('0'));
                out.push('.');
            }
            out.push_str("ip6.arpa");
            out
        }
    }
}

/// The 32 nibbles of an IPv6 address, most significant first.
pub fn nibbles(v6: Ipv6Addr) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, byte) in v6.octets().iter().enumerate() {
        out[2 * i] = byte >> 4;
        out[2 * i + 1] = byte & 0x0f;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_names() {
        assert_eq!(
            reverse_name("192.0.2.3".parse().unwrap()),
            "3.2.0.192.in-addr.arpa"
        );
        assert_eq!(
            reverse_name("2001:db8::cb01".parse().unwrap()),
            "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
        );
    }
}
