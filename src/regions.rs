//! The gateway's regions: smart hosts and SPF include names, from
//! `reference/mimecast.md`. Shared by routing (which region a sender's SPF authorizes),
//! delivery (where to connect) and onboarding (what record to publish).

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The global include: every regional record, about six lookups instead of one.
pub const GLOBAL_INCLUDE: &str = "_netblocks.mimecast.com";

/// Which sending platform's smart-host variant to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    /// Exchange Server and anything else that is not a Microsoft 365 tenant.
    #[default]
    Exchange,
    /// Microsoft 365 tenants have their own outbound hosts in most regions.
    O365,
    Gsuite,
}

/// How a route's connections to its upstream are protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    None,
    /// STARTTLS when offered, without certificate checks (RFC 7435).
    Opportunistic,
    /// STARTTLS is mandatory and the certificate must verify.
    Required,
}

impl fmt::Display for TlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsMode::None => "none",
            TlsMode::Opportunistic => "opportunistic",
            TlsMode::Required => "required",
        })
    }
}

/// `host:port` of an upstream; the host is a name or an address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl HostPort {
    pub fn parse(text: &str) -> Result<HostPort, String> {
        let bad = || format!("`{text}` is not host:port");
        let (host, port) = if let Some(rest) = text.strip_prefix('[') {
            let (h, p) = rest.split_once("]:").ok_or_else(bad)?;
            h.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
            (h, p)
        } else if let Some((h, p)) = text.rsplit_once(':') {
            (h, p)
        } else {
            (text, "25")
        };
        let port: u16 = port.parse().map_err(|_| bad())?;
        let ok_host = host.parse::<IpAddr>().is_ok() || crate::envelope::is_valid_domain(host);
        if !ok_host || port == 0 {
            return Err(bad());
        }
        Ok(HostPort {
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpstreamAuth {
    pub username: String,
    /// Environment variable holding the password, so it stays out of config files.
    pub password_env: String,
}

/// Where one group of recipients goes: a region's smart hosts, the internal route or the
/// fallback route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouteTarget {
    pub name: String,
    pub hosts: Vec<HostPort>,
    pub tls: TlsMode,
    pub ca_file: Option<PathBuf>,
    pub tls_name: Option<String>,
    pub auth: Option<UpstreamAuth>,
}

/// One row of the region table.
#[derive(Debug, Clone, Copy)]
pub struct Preset {
    pub key: &'static str,
    pub who: &'static str,
    pub hosts: [&'static str; 2],
    pub o365_hosts: Option<[&'static str; 2]>,
    /// The domain in `include:<domain>` that authorizes this region's hosts.
    pub spf_include: Option<&'static str>,
}

impl Preset {
    pub fn route(&self, platform: Platform) -> RouteTarget {
        let hosts = match (platform, self.o365_hosts) {
            (Platform::O365, Some(h)) => h,
            _ => self.hosts,
        };
        RouteTarget {
            name: self.key.to_string(),
            hosts: hosts
                .iter()
                .map(|h| HostPort {
                    host: h.to_string(),
                    port: 25,
                })
                .collect(),
            tls: TlsMode::Required,
            ca_file: None,
            tls_name: None,
            auth: None,
        }
    }
}

pub const PRESETS: &[Preset] = &[
    Preset {
        key: "eu",
        who: "Europe except Germany",
        hosts: [
            "eu-smtp-outbound-1.mimecast.com",
            "eu-smtp-outbound-2.mimecast.com",
        ],
        o365_hosts: Some([
            "eu-smtp-o365-outbound-1.mimecast.com",
            "eu-smtp-o365-outbound-2.mimecast.com",
        ]),
        spf_include: Some("eu._netblocks.mimecast.com"),
    },
    Preset {
        key: "de",
        who: "Germany",
        hosts: [
            "de-smtp-outbound-1.mimecast.com",
            "de-smtp-outbound-2.mimecast.com",
        ],
        o365_hosts: Some([
            "de-smtp-o365-outbound-1.mimecast.com",
            "de-smtp-o365-outbound-2.mimecast.com",
        ]),
        spf_include: Some("de._netblocks.mimecast.com"),
    },
    Preset {
        key: "us",
        who: "USA, A grid",
        hosts: [
            "us-smtp-outbound-1.mimecast.com",
            "us-smtp-outbound-2.mimecast.com",
        ],
        o365_hosts: Some([
            "us-smtp-o365-outbound-1.mimecast.com",
            "us-smtp-o365-outbound-2.mimecast.com",
        ]),
        spf_include: Some("us._netblocks.mimecast.com"),
    },
    Preset {
        key: "usb",
        who: "USA, B grid",
        hosts: [
            "usb-smtp-outbound-1.mimecast.com",
            "usb-smtp-outbound-2.mimecast.com",
        ],
        o365_hosts: None,
        spf_include: Some("usb._netblocks.mimecast.com"),
    },
    Preset {
        key: "uspcom",
        who: "US public sector",
        hosts: [
            "uspcom-smtp-outbound-1.mimecast-pscom-us.com",
            "uspcom-smtp-outbound-2.mimecast-pscom-us.com",
        ],
        o365_hosts: None,
        spf_include: Some("uspcom._netblocks.mimecast-pscom-us.com"),
    },
    Preset {
        key: "ca",
        who: "Canada",
        hosts: [
            "ca-smtp-outbound-1.mimecast.com",
            "ca-smtp-outbound-2.mimecast.com",
        ],
        o365_hosts: None,
        // Not confirmed by the vendor; the pattern every other region follows.
        spf_include: Some("ca._netblocks.mimecast.com"),
    },
    Preset {
        key: "za",
        who: "South Africa",
        hosts: [
            "za-smtp-outbound-1.mimecast.co.za",
            "za-smtp-outbound-2.mimecast.co.za",
        ],
        o365_hosts: Some([
            "za-smtp-o365-outbound-1.mimecast.co.za",
            "za-smtp-o365-outbound-2.mimecast.co.za",
        ]),
        spf_include: Some("za._netblocks.mimecast.com"),
    },
    Preset {
        key: "au",
        who: "Australia",
        hosts: [
            "au-smtp-outbound-1.mimecast.com",
            "au-smtp-outbound-2.mimecast.com",
        ],
        o365_hosts: Some([
            "au-smtp-o365-outbound-1.mimecast.com",
            "au-smtp-o365-outbound-2.mimecast.com",
        ]),
        spf_include: Some("au._netblocks.mimecast.com"),
    },
    Preset {
        key: "je",
        who: "Offshore (Jersey)",
        hosts: [
            "je-smtp-outbound-1.mimecast-offshore.com",
            "je-smtp-outbound-2.mimecast-offshore.com",
        ],
        o365_hosts: Some([
            "je-smtp-o365-outbound-1.mimecast-offshore.com",
            "je-smtp-o365-outbound-2.mimecast-offshore.com",
        ]),
        spf_include: None,
    },
];

pub fn preset(key: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.key == key)
}

/// The include to publish for a region: its own, or the global one where the vendor
/// publishes none (`je`).
pub fn spf_include_for(region: &str) -> &'static str {
    preset(region)
        .and_then(|p| p.spf_include)
        .unwrap_or(GLOBAL_INCLUDE)
}

/// What an SPF include name authorizes, if it is one of the gateway's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatewayInclude {
    Region(&'static str),
    Global,
}

pub fn classify_include(domain: &str) -> Option<GatewayInclude> {
    let d = domain.trim_end_matches('.').to_ascii_lowercase();
    if d == GLOBAL_INCLUDE {
        return Some(GatewayInclude::Global);
    }
    PRESETS
        .iter()
        .find(|p| p.spf_include == Some(d.as_str()))
        .map(|p| GatewayInclude::Region(p.key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_names_map_to_regions() {
        assert_eq!(
            classify_include("EU._netblocks.mimecast.com."),
            Some(GatewayInclude::Region("eu"))
        );
        assert_eq!(
            classify_include("uspcom._netblocks.mimecast-pscom-us.com"),
            Some(GatewayInclude::Region("uspcom"))
        );
        assert_eq!(
            classify_include("_netblocks.mimecast.com"),
            Some(GatewayInclude::Global)
        );
        assert_eq!(classify_include("_spf.google.com"), None);
    }

    #[test]
    fn o365_variant_where_it_exists() {
        let eu = preset("eu").unwrap().route(Platform::O365);
        assert_eq!(eu.hosts[0].host, "eu-smtp-o365-outbound-1.mimecast.com");
        let usb = preset("usb").unwrap().route(Platform::O365);
        assert_eq!(usb.hosts[1].host, "usb-smtp-outbound-2.mimecast.com");
        assert!(eu.hosts.iter().all(|h| h.port == 25));
    }

    #[test]
    fn host_port_parsing() {
        assert_eq!(HostPort::parse("127.0.0.1:2526").unwrap().port, 2526);
        assert_eq!(HostPort::parse("[::1]:25").unwrap().to_string(), "[::1]:25");
        assert_eq!(
            HostPort::parse("Mx.Example.com").unwrap().to_string(),
            "mx.example.com:25"
        );
        assert!(HostPort::parse("no port").is_err());
        assert!(HostPort::parse("host:99999").is_err());
        assert!(HostPort::parse("host:0").is_err());
    }
}
