//! The TOML configuration: the user-facing contract.
//!
//! Every table rejects unknown keys and every value is checked before anything binds a
//! socket, so a typo is an error naming the key and line instead of a silently ignored
//! setting. Sizes are plain byte counts; durations are strings such as `"5m"`.

mod access;
mod delivery;
mod limits;
mod routing;
mod server;
mod state;

use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;

use access::{resolve_access, RawAccess};
use delivery::{validate_delivery, validate_queue};
use limits::resolve_limits;
use routing::{resolve_routing, RawRouting};
use server::validate_server;

pub use crate::dur::Dur;
pub use access::{AccessConfig, DkimReplayConfig, RouteHeader, SharedPlatform, SharedRange};
pub use delivery::{ConcurrencyMode, DeliveryConfig, DnsConfig, QueueConfig};
pub use limits::{default_limits, LimitAction, LimitConfig, LimitKey};
pub use routing::{OnUnauthorized, RoutingConfig};
pub use server::{BareLineEndings, ProxyProtocolConfig, ServerConfig, TlsConfig};
pub use state::{
    AdminConfig, LogConfig, LogFormat, StoreConfig, StoreKind, StoreTls, TrackingConfig,
    TrustedConfig,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: ServerConfig,
    tls: Option<TlsConfig>,
    access: RawAccess,
    #[serde(default)]
    queue: QueueConfig,
    #[serde(default)]
    routing: RawRouting,
    #[serde(default)]
    delivery: DeliveryConfig,
    #[serde(default)]
    dns: DnsConfig,
    #[serde(default)]
    admin: AdminConfig,
    #[serde(default)]
    trusted: TrustedConfig,
    #[serde(default)]
    tracking: TrackingConfig,
    #[serde(default)]
    store: StoreConfig,
    #[serde(default)]
    log: LogConfig,
    /// Absent: the default rules; `[]`: none.
    limits: Option<Vec<LimitConfig>>,
}

/// The whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub server: ServerConfig,
    pub tls: Option<TlsConfig>,
    pub access: AccessConfig,
    pub queue: QueueConfig,
    pub routing: RoutingConfig,
    pub delivery: DeliveryConfig,
    pub dns: DnsConfig,
    pub admin: AdminConfig,
    pub trusted: TrustedConfig,
    pub tracking: TrackingConfig,
    pub store: StoreConfig,
    pub log: LogConfig,
    pub limits: Vec<LimitConfig>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: key.to_string(),
            message,
        };
        validate_server(&raw.server).map_err(|(k, m)| invalid(k, m))?;
        let access = resolve_access(raw.access).map_err(|(k, m)| invalid(&k, m))?;
        validate_queue(&raw.queue).map_err(|(k, m)| invalid(k, m))?;
        let routing = resolve_routing(raw.routing).map_err(|(k, m)| invalid(&k, m))?;
        validate_delivery(&raw.delivery).map_err(|(k, m)| invalid(k, m))?;
        let limits = resolve_limits(raw.limits).map_err(|(k, m)| invalid(&k, m))?;
        if raw.tracking.retention.0.is_zero() {
            return Err(invalid(
                "tracking.retention",
                "must be longer than zero".into(),
            ));
        }
        if raw.store.sync_interval.0.is_zero() {
            return Err(invalid(
                "store.sync_interval",
                "must be longer than zero".into(),
            ));
        }
        if let Some(admin_listen) = raw.admin.listen {
            let has_token = raw.admin.token.as_deref().is_some_and(|t| !t.is_empty());
            if !admin_listen.ip().is_loopback() && !has_token {
                return Err(invalid(
                    "admin.token",
                    format!(
                        "required because admin.listen ({admin_listen}) is not a loopback address"
                    ),
                ));
            }
        }
        if raw.tls.is_none() && !raw.server.listen_tls.is_empty() {
            return Err(invalid(
                "server.listen_tls",
                "implicit TLS listeners need a [tls] table with cert and key".into(),
            ));
        }
        for pattern in &raw.trusted.exclude_senders {
            if !pattern.contains('@') {
                return Err(invalid(
                    "trusted.exclude_senders",
                    format!("`{pattern}` is neither an address nor `*@domain`"),
                ));
            }
        }
        if raw.trusted.batch_size == 0 {
            return Err(invalid("trusted.batch_size", "must be at least 1".into()));
        }
        if tracing_subscriber::EnvFilter::try_new(&raw.log.level).is_err() {
            return Err(invalid(
                "log.level",
                format!("`{}` is not a level or filter", raw.log.level),
            ));
        }
        if raw.store.kind == StoreKind::Postgres {
            match raw.store.resolved_url() {
                None => {
                    return Err(invalid(
                        "store.url",
                        "kind = \"postgres\" needs url (or url_env naming a set variable)".into(),
                    ))
                }
                Some(u) if u.parse::<tokio_postgres::Config>().is_err() => {
                    return Err(invalid(
                        "store.url",
                        "not a PostgreSQL connection URL (postgres://user@host:port/db)".into(),
                    ))
                }
                Some(_) => {}
            }
            if let Some(ca) = &raw.store.ca_file {
                if let Err(e) = crate::client_tls::ca_file(ca) {
                    return Err(invalid("store.ca_file", e));
                }
            }
        }
        Ok(Config {
            path: path.to_owned(),
            server: raw.server,
            tls: raw.tls,
            access,
            queue: raw.queue,
            routing,
            delivery: raw.delivery,
            dns: raw.dns,
            admin: raw.admin,
            trusted: raw.trusted,
            tracking: raw.tracking,
            store: raw.store,
            log: raw.log,
            limits,
        })
    }

    /// Settings that are valid but probably not what the administrator wants; printed by
    /// `check-config` and logged at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, r) in self.access.shared_ranges.iter().enumerate() {
            out.extend(
                self.allowed_overlap(&format!("access.shared_ranges[{i}].ranges"), &r.ranges),
            );
        }
        for (i, r) in self.access.shared_ranges.iter().enumerate() {
            if r.platform == SharedPlatform::O365
                && r.tenant_id.is_none()
                && r.dkim_domains.is_empty()
            {
                out.push(format!(
                    "access.shared_ranges[{i}]: an o365 range without tenant_id or dkim_domains: \
                     only mail DKIM-signed by {} is proof, so mail Microsoft 365 signs only \
                     with the tenant's onmicrosoft.com key will be refused",
                    self.access.domains.join(", ")
                ));
            }
            for d in &r.dkim_domains {
                if !self
                    .access
                    .domains
                    .iter()
                    .any(|own| d == own || d.ends_with(&format!(".{own}")))
                {
                    out.push(format!(
                        "access.shared_ranges[{i}].dkim_domains: a signature of d={d} proves only \
                         mail whose From: address is under {d} (alignment), and such a From: must \
                         also be in access.domains; sign with the organization's own domain or add \
                         a route header"
                    ));
                }
            }
        }
        out
    }

    /// Warnings for `allowed_ranges` entries that overlap `nets` (a shared range's
    /// networks, named `what`): such addresses are held to the shared rule, and
    /// listing them as dedicated suggests a mistake.
    pub fn allowed_overlap(&self, what: &str, nets: &[IpNet]) -> Vec<String> {
        let mut out = Vec::new();
        for a in &self.access.allowed_ranges {
            if let Some(n) = nets.iter().find(|n| n.contains(a) || a.contains(*n)) {
                out.push(format!(
                    "access.allowed_ranges: {a} overlaps {what} ({n}): a shared platform's \
                     addresses are every tenant's, and they are held to tenant proof, never \
                     relayed as the organization's own"
                ));
            }
        }
        out
    }

    /// Name used in our EHLO to upstreams.
    pub fn helo_name(&self) -> &str {
        self.delivery
            .helo_name
            .as_deref()
            .unwrap_or(&self.server.hostname)
    }
}

pub(super) fn normalize_domain(d: &str) -> String {
    d.trim().trim_end_matches('.').to_ascii_lowercase()
}

/// A CIDR range or a single address (taken as /32 or /128).
pub fn parse_range(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if let Ok(net) = text.parse::<IpNet>() {
        if net.trunc() != net {
            return Err(format!(
                "`{text}` has host bits set (did you mean {}?)",
                net.trunc()
            ));
        }
        return Ok(net);
    }
    text.parse::<std::net::IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("`{text}` is not an address or CIDR range"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::regions::{self, TlsMode};

    const MINIMAL: &str = r#"
[access]
allowed_ranges = ["127.0.0.0/8"]
domains = ["Example.TEST"]
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("t.toml"))
    }

    #[test]
    fn minimal_config_gets_defaults_and_presets() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.access.domains, vec!["example.test"]);
        assert_eq!(c.access.internal_domains, c.access.domains);
        assert_eq!(c.server.max_line_length, 512);
        assert_eq!(
            c.routing.default_route().hosts[0].host,
            "eu-smtp-outbound-1.mimecast.com"
        );
        assert_eq!(c.routing.regions.len(), regions::PRESETS.len());
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = parse(&format!("{MINIMAL}\n[server]\nlisten_on = []\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen_on"), "{err}");
        assert!(err.contains("line 7"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases = [
            ("[server]\ncommand_timeout = \"5 min\"\n", "command_timeout"),
            ("[routing]\nregion = \"mars\"\n", "routing.region"),
            ("[queue]\nretry = [\"10s\"]\n", "queue.retry"),
            ("[admin]\nlisten = \"0.0.0.0:8025\"\n", "admin.token"),
            (
                "[routing.regions.eu]\nhosts = [\"no port\"]\n",
                "routing.regions.eu.hosts",
            ),
            (
                "[routing]\non_unauthorized = \"fallback\"\n",
                "routing.on_unauthorized",
            ),
        ];
        for (extra, key) in cases {
            let err = parse(&format!("{MINIMAL}{extra}")).unwrap_err().to_string();
            assert!(err.contains(key), "{extra}: {err}");
        }
        let err = parse("[access]\nallowed_ranges = [\"10.0.0.1/8\"]\ndomains=[\"a.test\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("access.allowed_ranges") && err.contains("10.0.0.0/8"),
            "{err}"
        );
    }

    #[test]
    fn preset_override_keeps_unset_fields() {
        let c = parse(&format!(
            "{MINIMAL}[routing.regions.de]\nhosts = [\"127.0.0.1:2526\"]\n"
        ))
        .unwrap();
        let de = &c.routing.regions["de"];
        assert_eq!(de.hosts[0].to_string(), "127.0.0.1:2526");
        assert_eq!(de.tls, TlsMode::Required);
    }
}
