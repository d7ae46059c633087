//! The three DNS questions SPF asks, behind a trait so the walker is testable with a
//! zone in memory; the real implementation is hickory's resolver.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
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
    /// Number of A and AAAA records.
    fn addresses(&self, name: &str) -> impl Future<Output = Result<usize, DnsFailure>> + Send;
    /// MX exchange names.
    fn mx(&self, name: &str) -> impl Future<Output = Result<Vec<String>, DnsFailure>> + Send;
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
        let fqdn = if name.ends_with('.') {
            name.to_string()
        } else {
            format!("{name}.")
        };
        match self.resolver.lookup(fqdn.as_str(), rtype).await {
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

    async fn addresses(&self, name: &str) -> Result<usize, DnsFailure> {
        let v4 = self.query(name, RecordType::A).await;
        if let Err(e) = &v4 {
            if !e.is_void() {
                return Err(e.clone());
            }
        }
        let v6 = self.query(name, RecordType::AAAA).await;
        match (v4, v6) {
            (Ok((a, _)), Ok((b, _))) => Ok(a.len() + b.len()),
            (Ok((a, _)), Err(_)) => Ok(a.len()),
            (Err(_), Ok((b, _))) => Ok(b.len()),
            (Err(e), Err(DnsFailure::NoData)) => Err(e),
            (Err(_), Err(e)) => Err(e),
        }
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
