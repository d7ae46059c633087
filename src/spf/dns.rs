//! The DNS questions SPF asks, behind a trait so the walker and the evaluator are
//! testable with a zone in memory; the real implementation is hickory's resolver.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::TokioResolver;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsFailure {
    /// NXDOMAIN: the name does not exist.
    NxDomain,
    /// The name exists but has no record of that type.
    NoData,
    Timeout,
    /// SERVFAIL, refused, network trouble.
    Other(String),
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

#[derive(Clone)]
pub struct HickoryDns {
    resolver: TokioResolver,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot build DNS resolver: {0}")]
pub struct ResolverError(String);

impl HickoryDns {
    /// Name servers from `[dns]` (with their ports), or the system's when none are set.
    pub fn new(nameservers: &[SocketAddr], timeout: Duration) -> Result<HickoryDns, ResolverError> {
        let mut builder = if nameservers.is_empty() {
            TokioResolver::builder_tokio().map_err(|e| ResolverError(e.to_string()))?
        } else {
            let servers = nameservers
                .iter()
                .map(|sa| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = sa.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = sa.port();
                    NameServerConfig::new(sa.ip(), true, vec![udp, tcp])
                })
                .collect();
            TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            )
        };
        let opts = builder.options_mut();
        opts.timeout = timeout;
        opts.attempts = 1;
        // SPF names are absolute: no search-domain expansion.
        opts.ndots = 0;
        let resolver = builder.build().map_err(|e| ResolverError(e.to_string()))?;
        Ok(HickoryDns { resolver })
    }

    /// The resolver itself, for the other lookups that go through `[dns]` (DKIM keys).
    pub fn resolver(&self) -> TokioResolver {
        self.resolver.clone()
    }

    async fn query(&self, name: &str, rtype: RecordType) -> Result<(Vec<RData>, u32), DnsFailure> {
        // Labels go on the wire as they are: SPF domain-specs may hold any visible
        // character (`foo:bar/baz.example.com`), which a host-name parser refuses. A name
        // DNS cannot carry at all (an empty or a 64-octet label) cannot exist.
        let labels = name.trim_end_matches('.').split('.').map(str::as_bytes);
        let Ok(name) = Name::from_labels(labels) else {
            return Err(DnsFailure::NxDomain);
        };
        match self.resolver.lookup(name, rtype).await {
            Ok(lookup) => {
                let ttl = lookup.answers().iter().map(|r| r.ttl).min().unwrap_or(0);
                let data: Vec<RData> = lookup
                    .answers()
                    .iter()
                    .filter(|r| r.record_type() == rtype)
                    .map(|r| r.data.clone())
                    .collect();
                if data.is_empty() {
                    Err(DnsFailure::NoData)
                } else {
                    Ok((data, ttl))
                }
            }
            Err(e) if e.is_nx_domain() => Err(DnsFailure::NxDomain),
            Err(e) if e.is_no_records_found() => Err(DnsFailure::NoData),
            Err(e) => {
                let text = e.to_string();
                if text.to_ascii_lowercase().contains("timed out") || text.contains("timeout") {
                    Err(DnsFailure::Timeout)
                } else {
                    Err(DnsFailure::Other(text))
                }
            }
        }
    }
}

impl SpfDns for HickoryDns {
    async fn txt(&self, name: &str) -> Result<TxtAnswer, DnsFailure> {
        let (data, ttl) = self.query(name, RecordType::TXT).await?;
        let records = data
            .into_iter()
            .filter_map(|d| match d {
                RData::TXT(txt) => Some(txt.txt_data.iter().map(|s| s.to_vec()).collect()),
                _ => None,
            })
            .collect();
        Ok(TxtAnswer { records, ttl })
    }

    async fn a(&self, name: &str) -> Result<Vec<Ipv4Addr>, DnsFailure> {
        let (data, _) = self.query(name, RecordType::A).await?;
        Ok(data
            .into_iter()
            .filter_map(|d| match d {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect())
    }

    async fn aaaa(&self, name: &str) -> Result<Vec<Ipv6Addr>, DnsFailure> {
        let (data, _) = self.query(name, RecordType::AAAA).await?;
        Ok(data
            .into_iter()
            .filter_map(|d| match d {
                RData::AAAA(a) => Some(a.0),
                _ => None,
            })
            .collect())
    }

    async fn ptr(&self, ip: IpAddr) -> Result<Vec<String>, DnsFailure> {
        let (data, _) = self.query(&reverse_name(ip), RecordType::PTR).await?;
        Ok(data
            .into_iter()
            .filter_map(|d| match d {
                RData::PTR(p) => Some(p.0.to_utf8().trim_end_matches('.').to_string()),
                _ => None,
            })
            .collect())
    }

    async fn mx(&self, name: &str) -> Result<Vec<String>, DnsFailure> {
        let (data, _) = self.query(name, RecordType::MX).await?;
        Ok(data
            .into_iter()
            .filter_map(|d| match d {
                RData::MX(mx) => Some(mx.exchange.to_utf8().trim_end_matches('.').to_string()),
                _ => None,
            })
            .collect())
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
