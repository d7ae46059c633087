//! The DNS questions SPF asks, answered by hickory's resolver through `[dns]`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::proto::serialize::binary::DecodeError;
use hickory_resolver::proto::ProtoError;
use hickory_resolver::TokioResolver;

use super::dns::{reverse_name, DnsFailure, SpfDns, TxtAnswer};

#[derive(Clone)]
pub struct HickoryDns {
    resolver: TokioResolver,
    /// The servers the resolver asks, for the rare question asked without it.
    servers: Vec<SocketAddr>,
    timeout: Duration,
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
        let servers = if nameservers.is_empty() {
            hickory_resolver::system_conf::read_system_conf()
                .map(|(cfg, _)| {
                    cfg.name_servers()
                        .iter()
                        .map(|ns| SocketAddr::new(ns.ip, 53))
                        .collect()
                })
                .unwrap_or_default()
        } else {
            nameservers.to_vec()
        };
        Ok(HickoryDns {
            resolver,
            servers,
            timeout,
        })
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
            Err(NetError::Proto(ProtoError::Decode(DecodeError::InvalidEmptyRecord))) => {
                Err(DnsFailure::EmptyRecord)
            }
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
        let (data, ttl) = match self.query(name, RecordType::TXT).await {
            Err(DnsFailure::EmptyRecord) => return self.txt_leniently(name).await,
            other => other?,
        };
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
                RData::PTR(p) => dotted(&p.0),
                _ => None,
            })
            .collect())
    }

    async fn mx(&self, name: &str) -> Result<Vec<String>, DnsFailure> {
        let (data, _) = self.query(name, RecordType::MX).await?;
        Ok(data
            .into_iter()
            .filter_map(|d| match d {
                RData::MX(mx) => dotted(&mx.exchange),
                _ => None,
            })
            .collect())
    }
}

/// A name DNS returned, as the labels it holds joined by dots: a label may carry any
/// octet (`foo:bar/baz`), and is looked up again as it came, not as a host name or an
/// IDN. `None` for a label with a dot in it, which the dotted form cannot carry.
fn dotted(name: &Name) -> Option<String> {
    let mut labels = Vec::new();
    for label in name.iter() {
        if label.contains(&b'.') {
            return None;
        }
        labels.push(String::from_utf8_lossy(label).into_owned());
    }
    Some(labels.join("."))
}

impl HickoryDns {
    /// A TXT question the resolver could not read (a record without strings), asked
    /// again of each server in turn and read record by record.
    async fn txt_leniently(&self, name: &str) -> Result<TxtAnswer, DnsFailure> {
        let labels = name.trim_end_matches('.').split('.').map(str::as_bytes);
        let Ok(mut fqdn) = Name::from_labels(labels) else {
            return Err(DnsFailure::NxDomain);
        };
        fqdn.set_fqdn(true);
        let mut last = DnsFailure::Other("no DNS server configured".into());
        for server in &self.servers {
            match super::lenient::txt(*server, &fqdn, self.timeout).await {
                Ok(a) => return Ok(a),
                Err(e) if e.is_void() => return Err(e),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}
