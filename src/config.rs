//! The TOML configuration: the user-facing contract.
//!
//! Every table rejects unknown keys and every value is checked before anything binds a
//! socket, so a typo is an error naming the key and line instead of a silently ignored
//! setting. Sizes are plain byte counts; durations are strings such as `"5m"`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

use crate::regions::{self, Platform, RouteTarget, TlsMode, UpstreamAuth};

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

/// A duration written as `"500ms"`, `"30s"`, `"5m"`, `"2h"` or `"5d"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("`{text}` has no unit (use ms, s, m, h or d)"))?;
        let (digits, unit) = text.split_at(split);
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("`{text}` is not a duration such as \"30s\" or \"5m\""))?;
        let secs = |k: u64| n.checked_mul(k).map(Duration::from_secs);
        let value = match unit {
            "ms" => Some(Duration::from_millis(n)),
            "s" => secs(1),
            "m" => secs(60),
            "h" => secs(3600),
            "d" => secs(86_400),
            _ => {
                return Err(format!(
                    "`{text}`: unknown unit `{unit}` (use ms, s, m, h or d)"
                ))
            }
        };
        value
            .map(Dur)
            .ok_or_else(|| format!("`{text}` is too large"))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        let units = [
            (86_400_000, "d"),
            (3_600_000, "h"),
            (60_000, "m"),
            (1000, "s"),
        ];
        for (size, unit) in units {
            if ms >= size && ms.is_multiple_of(size) {
                return write!(f, "{}{unit}", ms / size);
            }
        }
        write!(f, "{ms}ms")
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Dur::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// What to do with a bare CR or LF inside DATA (never a line end: SMTP smuggling).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BareLineEndings {
    /// Rewrite each bare CR or LF to CRLF in the stored message.
    Normalize,
    /// Refuse the message with `554 5.6.0` after reading it to its real end.
    Reject,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub hostname: String,
    pub listen: Vec<SocketAddr>,
    pub listen_tls: Vec<SocketAddr>,
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub command_timeout: Dur,
    pub data_timeout: Dur,
    /// Upper bound on one whole session, whatever it does (slow-drip clients).
    pub session_timeout: Dur,
    /// Octets per second a DATA or BDAT sender must keep up after a short grace
    /// (Postfix's `smtpd_min_data_rate`); 0 turns the check off.
    pub min_data_rate: u64,
    pub hop_limit: usize,
    /// Longest command line in octets including CRLF (RFC 5321 §4.5.3.1.4). MAIL and RCPT
    /// may be longer by the DSN allowance (RFC 3461 §4: 100 and 500 octets).
    pub max_line_length: usize,
    /// Protocol errors tolerated in one session before `421` and close.
    pub max_errors: u32,
    pub bare_line_endings: BareLineEndings,
    /// How long running sessions get to finish after SIGTERM before they are closed with 421.
    pub shutdown_timeout: Dur,
    pub proxy_protocol: ProxyProtocolConfig,
}

/// `[server.proxy_protocol]`: load balancers whose PROXY header (v1 or v2) names the
/// real client. A connection from one of them must start with the header.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyProtocolConfig {
    #[serde(deserialize_with = "ranges")]
    pub trusted: Vec<IpNet>,
    /// For the header to arrive.
    pub timeout: Dur,
}

impl Default for ProxyProtocolConfig {
    fn default() -> Self {
        ProxyProtocolConfig {
            trusted: Vec::new(),
            timeout: Dur(Duration::from_secs(5)),
        }
    }
}

fn ranges<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|t| parse_range(t).map_err(serde::de::Error::custom))
        .collect()
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            hostname: "localhost".into(),
            listen: vec!["127.0.0.1:2525".parse().expect("literal address")],
            listen_tls: Vec::new(),
            max_message_size: 52_428_800,
            max_recipients: 1000,
            max_connections: 2000,
            max_connections_per_ip: 200,
            command_timeout: Dur(Duration::from_secs(300)),
            data_timeout: Dur(Duration::from_secs(600)),
            session_timeout: Dur(Duration::from_secs(3600)),
            min_data_rate: 500,
            hop_limit: 50,
            max_line_length: 512,
            max_errors: 10,
            bare_line_endings: BareLineEndings::Normalize,
            shutdown_timeout: Dur(Duration::from_secs(30)),
            proxy_protocol: ProxyProtocolConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default)]
    pub require: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccess {
    #[serde(default)]
    allowed_ranges: Vec<String>,
    #[serde(default)]
    domains: Vec<String>,
    internal_domains: Option<Vec<String>>,
    #[serde(default)]
    shared_ranges: Vec<RawSharedRange>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSharedRange {
    platform: SharedPlatform,
    #[serde(default)]
    ranges: Vec<String>,
    ranges_from_spf: Option<String>,
    tenant_id: Option<String>,
    #[serde(default)]
    dkim_domains: Vec<String>,
    header: Option<RawRouteHeader>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouteHeader {
    name: String,
    secret_env: String,
}

/// A platform that sends for many organizations from the same addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SharedPlatform {
    O365,
    Gsuite,
    Other,
}

impl SharedPlatform {
    pub fn label(self) -> &'static str {
        match self {
            SharedPlatform::O365 => "o365",
            SharedPlatform::Gsuite => "gsuite",
            SharedPlatform::Other => "other",
        }
    }
}

/// A header a routing rule adds with a secret value; the value is read from the
/// environment at load time and never printed.
#[derive(Clone)]
pub struct RouteHeader {
    pub name: String,
    pub secret_env: String,
    pub secret: Vec<u8>,
}

impl fmt::Debug for RouteHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteHeader")
            .field("name", &self.name)
            .field("secret_env", &self.secret_env)
            .finish_non_exhaustive()
    }
}

/// `[[access.shared_ranges]]`: sources many organizations send from. Mail from them is
/// accepted only with proof that it is this organization's.
#[derive(Debug, Clone)]
pub struct SharedRange {
    /// Stable label for metrics, logs and onboarding: the platform, numbered from the
    /// second range of the same platform on (`o365`, `o365-2`).
    pub name: String,
    pub platform: SharedPlatform,
    pub ranges: Vec<IpNet>,
    /// Lower-case, without trailing dot.
    pub ranges_from_spf: Option<String>,
    /// Lower-case GUID.
    pub tenant_id: Option<String>,
    /// Lower-case, without trailing dot.
    pub dkim_domains: Vec<String>,
    pub header: Option<RouteHeader>,
}

/// Who may relay, and for which sender domains.
#[derive(Debug, Clone)]
pub struct AccessConfig {
    pub allowed_ranges: Vec<IpNet>,
    /// Lower-case, without trailing dot.
    pub domains: Vec<String>,
    pub internal_domains: Vec<String>,
    pub shared_ranges: Vec<SharedRange>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    pub dir: PathBuf,
    pub retry: Vec<Dur>,
    pub max_age: Dur,
    pub delay_warning: Option<Dur>,
    /// Deliveries in flight at once across all routes.
    pub concurrency: usize,
    /// Octets of memory the queue may use: its index and the bodies it keeps from
    /// ingress until their first attempt; beyond it, bodies are read back from disk.
    pub memory_budget: u64,
    /// MAIL gets 452 while the spool's file system has less free space than this.
    pub min_free: u64,
    /// MAIL gets 452 while the spool takes more than this on disk (no cap if unset).
    pub max_size: Option<u64>,
    /// Octets after which a spool segment is closed and a new one begun.
    pub segment_size: u64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        let retry = ["1m", "5m", "15m", "30m", "1h", "2h", "4h"]
            .iter()
            .map(|s| Dur::parse(s).expect("literal duration"))
            .collect();
        QueueConfig {
            dir: "var/spool".into(),
            retry,
            max_age: Dur(Duration::from_secs(5 * 86_400)),
            delay_warning: None,
            concurrency: 200,
            memory_budget: 256 << 20,
            min_free: 1 << 30,
            max_size: None,
            segment_size: 64 << 20,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUnauthorized {
    Default,
    Fallback,
    Defer,
    Reject,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    username: String,
    password_env: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    hosts: Option<Vec<String>>,
    tls: Option<TlsMode>,
    ca_file: Option<PathBuf>,
    /// Name the upstream certificate must carry when hosts are given as addresses.
    tls_name: Option<String>,
    auth: Option<RawAuth>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouting {
    #[serde(default = "default_region")]
    region: String,
    #[serde(default)]
    platform: Platform,
    #[serde(default = "yes")]
    spf_aware: bool,
    #[serde(default = "default_on_unauthorized")]
    on_unauthorized: OnUnauthorized,
    #[serde(default)]
    regions: BTreeMap<String, RawRoute>,
    internal: Option<RawRoute>,
    fallback: Option<RawRoute>,
}

impl Default for RawRouting {
    fn default() -> Self {
        RawRouting {
            region: default_region(),
            platform: Platform::default(),
            spf_aware: true,
            on_unauthorized: OnUnauthorized::Default,
            regions: BTreeMap::new(),
            internal: None,
            fallback: None,
        }
    }
}

fn default_region() -> String {
    "eu".into()
}
fn default_on_unauthorized() -> OnUnauthorized {
    OnUnauthorized::Default
}
fn yes() -> bool {
    true
}

/// Routes resolved from presets and overrides.
#[derive(Debug, Clone)]
pub struct RoutingConfig {
    pub region: String,
    pub platform: Platform,
    pub spf_aware: bool,
    pub on_unauthorized: OnUnauthorized,
    /// Every known region (presets, overridden where configured), keyed by region name.
    pub regions: BTreeMap<String, RouteTarget>,
    pub internal: Option<RouteTarget>,
    pub fallback: Option<RouteTarget>,
}

impl RoutingConfig {
    pub fn default_route(&self) -> &RouteTarget {
        // Validated at load: the default region is one of `regions`.
        &self.regions[&self.region]
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Name sent in EHLO to the smart hosts; defaults to `server.hostname`.
    pub helo_name: Option<String>,
    pub connect_timeout: Dur,
    pub command_timeout: Dur,
    pub data_timeout: Dur,
    pub max_connections_per_host: usize,
    pub connection_max_messages: u32,
    pub connection_max_age: Dur,
    pub idle_timeout: Dur,
    /// How long a host that failed at connection level is skipped.
    pub host_backoff: Dur,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            helo_name: None,
            connect_timeout: Dur(Duration::from_secs(30)),
            command_timeout: Dur(Duration::from_secs(300)),
            data_timeout: Dur(Duration::from_secs(600)),
            max_connections_per_host: 32,
            connection_max_messages: 1000,
            connection_max_age: Dur(Duration::from_secs(300)),
            idle_timeout: Dur(Duration::from_secs(30)),
            host_backoff: Dur(Duration::from_secs(60)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    pub nameservers: Vec<SocketAddr>,
    pub timeout: Dur,
    /// Whole SPF evaluation budget (RFC 7208 §4.6.4 asks for at least 20 s).
    pub spf_timeout: Dur,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            timeout: Dur(Duration::from_secs(5)),
            spf_timeout: Dur(Duration::from_secs(20)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: Option<SocketAddr>,
    pub token: Option<String>,
    /// Relay state: observed sources, flow counters, onboarding confirmations.
    pub database: PathBuf,
    /// Flow counters and sources older than this are pruned from `database`.
    pub retention: Dur,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: Some("127.0.0.1:8025".parse().expect("literal address")),
            token: None,
            database: "var/state.sqlite3".into(),
            retention: Dur(Duration::from_secs(30 * 86_400)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrustedConfig {
    pub enabled: bool,
    pub database: PathBuf,
    pub retention: Dur,
    pub learning_days: u32,
    pub exclude_senders: Vec<String>,
    pub exclude_recipient_domains: Vec<String>,
    pub prune_interval: Dur,
    /// Recording batches: at most this many events, or this long, per transaction.
    pub batch_size: usize,
    pub flush_interval: Dur,
    /// Observations held while the store cannot be written (a PostgreSQL outage);
    /// beyond this the oldest are dropped and counted.
    pub buffer_limit: usize,
}

impl Default for TrustedConfig {
    fn default() -> Self {
        TrustedConfig {
            enabled: true,
            database: "var/trusted.sqlite3".into(),
            retention: Dur(Duration::from_secs(120 * 86_400)),
            learning_days: 3,
            exclude_senders: Vec::new(),
            exclude_recipient_domains: Vec::new(),
            prune_interval: Dur(Duration::from_secs(3600)),
            batch_size: 512,
            flush_interval: Dur(Duration::from_secs(1)),
            buffer_limit: 100_000,
        }
    }
}

/// Where the shared state lives: the trusted-sender list, onboarding confirmations,
/// observed sources, flow counters and persisted shared ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// Embedded files (`admin.database`, `trusted.database`): one node.
    #[default]
    Sqlite,
    /// One database shared by every node.
    Postgres,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// `postgres://user@host:port/db`; the password from `PGPASSWORD` when the URL has
    /// none.
    pub url: Option<String>,
    /// An environment variable holding the whole URL (secrets stay out of the file).
    pub url_env: Option<String>,
}

impl StoreConfig {
    /// The URL in force: `url_env`'s value when set, else `url`.
    pub fn resolved_url(&self) -> Option<String> {
        self.url_env
            .as_deref()
            .and_then(|v| std::env::var(v).ok())
            .filter(|u| !u.is_empty())
            .or_else(|| self.url.clone())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
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
    store: StoreConfig,
    #[serde(default)]
    log: LogConfig,
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
    pub store: StoreConfig,
    pub log: LogConfig,
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
            store: raw.store,
            log: raw.log,
        })
    }

    /// Settings that are valid but probably not what the administrator wants; printed by
    /// `check-config` and logged at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
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

fn validate_server(s: &ServerConfig) -> Result<(), (&'static str, String)> {
    if s.hostname.is_empty() || s.hostname.contains(char::is_whitespace) {
        return Err(("server.hostname", "must be a host name".into()));
    }
    if s.listen.is_empty() && s.listen_tls.is_empty() {
        return Err(("server.listen", "at least one listener is needed".into()));
    }
    let positive = [
        ("server.max_message_size", s.max_message_size as usize),
        ("server.max_recipients", s.max_recipients),
        ("server.max_connections", s.max_connections),
        ("server.max_connections_per_ip", s.max_connections_per_ip),
        ("server.hop_limit", s.hop_limit),
        ("server.max_errors", s.max_errors as usize),
    ];
    for (key, value) in positive {
        if value == 0 {
            return Err((key, "must be at least 1".into()));
        }
    }
    if s.max_line_length < 512 {
        return Err((
            "server.max_line_length",
            "RFC 5321 requires at least 512 octets".into(),
        ));
    }
    for (key, d) in [
        ("server.proxy_protocol.timeout", s.proxy_protocol.timeout),
        ("server.command_timeout", s.command_timeout),
        ("server.data_timeout", s.data_timeout),
        ("server.session_timeout", s.session_timeout),
    ] {
        if d.0.is_zero() {
            return Err((key, "must be longer than zero".into()));
        }
    }
    Ok(())
}

fn normalize_domain(d: &str) -> String {
    d.trim().trim_end_matches('.').to_ascii_lowercase()
}

fn resolve_access(raw: RawAccess) -> Result<AccessConfig, (String, String)> {
    let mut ranges = Vec::new();
    for text in &raw.allowed_ranges {
        let net = parse_range(text).map_err(|m| ("access.allowed_ranges".to_string(), m))?;
        ranges.push(net);
    }
    if ranges.is_empty() && raw.shared_ranges.is_empty() {
        return Err((
            "access.allowed_ranges".into(),
            "list at least one range: without it the relay accepts nobody".into(),
        ));
    }
    let check_domains = |key: &str, list: &[String]| -> Result<Vec<String>, (String, String)> {
        list.iter()
            .map(|d| {
                let n = normalize_domain(d);
                if crate::envelope::is_valid_domain(&n) {
                    Ok(n)
                } else {
                    Err((key.to_string(), format!("`{d}` is not a domain name")))
                }
            })
            .collect()
    };
    let domains = check_domains("access.domains", &raw.domains)?;
    if domains.is_empty() {
        return Err((
            "access.domains".into(),
            "list the organization's validated domains".into(),
        ));
    }
    let internal_domains = match raw.internal_domains {
        Some(list) => check_domains("access.internal_domains", &list)?,
        None => domains.clone(),
    };
    let mut shared_ranges: Vec<SharedRange> = Vec::new();
    for (i, r) in raw.shared_ranges.into_iter().enumerate() {
        let key = format!("access.shared_ranges[{i}]");
        let same = shared_ranges
            .iter()
            .filter(|s| s.platform == r.platform)
            .count();
        let name = match same {
            0 => r.platform.label().to_string(),
            n => format!("{}-{}", r.platform.label(), n + 1),
        };
        shared_ranges.push(resolve_shared_range(&key, name, r)?);
    }
    Ok(AccessConfig {
        allowed_ranges: ranges,
        domains,
        internal_domains,
        shared_ranges,
    })
}

fn resolve_shared_range(
    key: &str,
    name: String,
    raw: RawSharedRange,
) -> Result<SharedRange, (String, String)> {
    let mut ranges = Vec::new();
    for text in &raw.ranges {
        ranges.push(parse_range(text).map_err(|m| (format!("{key}.ranges"), m))?);
    }
    let ranges_from_spf = match raw.ranges_from_spf {
        Some(d) => {
            let n = normalize_domain(&d);
            if !crate::envelope::is_valid_domain(&n) {
                return Err((
                    format!("{key}.ranges_from_spf"),
                    format!("`{d}` is not a domain name"),
                ));
            }
            Some(n)
        }
        None => None,
    };
    if ranges.is_empty() && ranges_from_spf.is_none() {
        return Err((
            format!("{key}.ranges"),
            "list the platform's ranges, or name the SPF record that publishes them in ranges_from_spf".into(),
        ));
    }
    let tenant_id = match raw.tenant_id {
        Some(t) if is_guid(t.trim()) => Some(t.trim().to_ascii_lowercase()),
        Some(t) => {
            return Err((
                format!("{key}.tenant_id"),
                format!("`{t}` is not a tenant GUID such as 3f2a9c1e-7b4d-4e8a-9c61-2d5e8f0a1b7c"),
            ))
        }
        None => None,
    };
    if tenant_id.is_some() && raw.platform != SharedPlatform::O365 {
        return Err((
            format!("{key}.tenant_id"),
            "only Microsoft 365 (platform = \"o365\") stamps a tenant id".into(),
        ));
    }
    let mut dkim_domains = Vec::new();
    for d in &raw.dkim_domains {
        let n = normalize_domain(d);
        if !crate::envelope::is_valid_domain(&n) {
            return Err((
                format!("{key}.dkim_domains"),
                format!("`{d}` is not a domain name"),
            ));
        }
        dkim_domains.push(n);
    }
    let header = match raw.header {
        Some(h) => {
            let valid_name =
                !h.name.is_empty() && h.name.bytes().all(|b| (33..=126).contains(&b) && b != b':');
            if !valid_name {
                return Err((
                    format!("{key}.header.name"),
                    format!("`{}` is not a header field name", h.name),
                ));
            }
            let secret = std::env::var_os(&h.secret_env).unwrap_or_default();
            if secret.is_empty() {
                return Err((
                    format!("{key}.header.secret_env"),
                    format!("environment variable {} is not set or empty", h.secret_env),
                ));
            }
            Some(RouteHeader {
                name: h.name,
                secret_env: h.secret_env,
                secret: secret.into_encoded_bytes(),
            })
        }
        None => None,
    };
    Ok(SharedRange {
        name,
        platform: raw.platform,
        ranges,
        ranges_from_spf,
        tenant_id,
        dkim_domains,
        header,
    })
}

impl SharedRange {
    /// The proofs this range accepts, in words: the organization's own DKIM always.
    pub fn proofs(&self, org_domains: &[String]) -> Vec<String> {
        let mut out = vec![format!("DKIM of {}", org_domains.join(", "))];
        out.extend(self.dkim_domains.iter().map(|d| format!("DKIM of {d}")));
        if self.tenant_id.is_some() {
            out.push("tenant id".into());
        }
        if let Some(h) = &self.header {
            out.push(format!("header {}", h.name));
        }
        out
    }
}

/// 8-4-4-4-12 hexadecimal digits.
fn is_guid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
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

fn validate_queue(q: &QueueConfig) -> Result<(), (&'static str, String)> {
    if q.retry.is_empty() {
        return Err(("queue.retry", "give at least one interval".into()));
    }
    if q.retry[0].0 < Duration::from_secs(60) {
        // Greylisting smart hosts refuse a retry inside the first minute.
        return Err((
            "queue.retry",
            "the first retry must be at least 1m (greylisting)".into(),
        ));
    }
    if q.max_age.0.is_zero() {
        return Err(("queue.max_age", "must be longer than zero".into()));
    }
    if q.concurrency == 0 {
        return Err(("queue.concurrency", "must be at least 1".into()));
    }
    if !(64 << 10..=1 << 30).contains(&q.segment_size) {
        return Err((
            "queue.segment_size",
            "must be from 65536 to 1073741824".into(),
        ));
    }
    if q.max_size == Some(0) {
        return Err(("queue.max_size", "must be more than zero, or unset".into()));
    }
    Ok(())
}

fn validate_delivery(d: &DeliveryConfig) -> Result<(), (&'static str, String)> {
    if d.max_connections_per_host == 0 {
        return Err((
            "delivery.max_connections_per_host",
            "must be at least 1".into(),
        ));
    }
    if d.connection_max_messages == 0 {
        return Err((
            "delivery.connection_max_messages",
            "must be at least 1".into(),
        ));
    }
    Ok(())
}

fn resolve_route(
    key: &str,
    name: &str,
    base: Option<RouteTarget>,
    raw: RawRoute,
) -> Result<RouteTarget, (String, String)> {
    let hosts = match raw.hosts {
        Some(hosts) => {
            let mut parsed = Vec::new();
            for h in hosts {
                let host = regions::HostPort::parse(&h).map_err(|m| (format!("{key}.hosts"), m))?;
                parsed.push(host);
            }
            parsed
        }
        None => match &base {
            Some(b) => b.hosts.clone(),
            None => return Err((format!("{key}.hosts"), "missing".into())),
        },
    };
    if hosts.is_empty() {
        return Err((format!("{key}.hosts"), "list at least one host".into()));
    }
    let tls = raw
        .tls
        .or(base.as_ref().map(|b| b.tls))
        .unwrap_or(TlsMode::Opportunistic);
    if let Some(ca) = &raw.ca_file {
        if !ca.exists() {
            return Err((
                format!("{key}.ca_file"),
                format!("{} does not exist", ca.display()),
            ));
        }
    }
    let auth = match raw.auth {
        Some(a) => {
            if std::env::var_os(&a.password_env).is_none() {
                return Err((
                    format!("{key}.auth.password_env"),
                    format!("environment variable {} is not set", a.password_env),
                ));
            }
            Some(UpstreamAuth {
                username: a.username,
                password_env: a.password_env,
            })
        }
        None => base.as_ref().and_then(|b| b.auth.clone()),
    };
    Ok(RouteTarget {
        name: name.to_string(),
        hosts,
        tls,
        ca_file: raw
            .ca_file
            .or(base.as_ref().and_then(|b| b.ca_file.clone())),
        tls_name: raw
            .tls_name
            .or(base.as_ref().and_then(|b| b.tls_name.clone())),
        auth,
    })
}

fn resolve_routing(raw: RawRouting) -> Result<RoutingConfig, (String, String)> {
    let mut regions_map = BTreeMap::new();
    for preset in regions::PRESETS {
        regions_map.insert(preset.key.to_string(), preset.route(raw.platform));
    }
    for (name, route) in raw.regions {
        let key = format!("routing.regions.{name}");
        let base = regions_map.get(&name).cloned();
        let resolved = resolve_route(&key, &name, base, route)?;
        regions_map.insert(name, resolved);
    }
    if !regions_map.contains_key(&raw.region) {
        return Err((
            "routing.region".into(),
            format!(
                "unknown region `{}` (known: {})",
                raw.region,
                regions_map.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    let internal = raw
        .internal
        .map(|r| resolve_route("routing.internal", "internal", None, r))
        .transpose()?;
    let fallback = raw
        .fallback
        .map(|r| resolve_route("routing.fallback", "fallback", None, r))
        .transpose()?;
    if raw.on_unauthorized == OnUnauthorized::Fallback && fallback.is_none() {
        return Err((
            "routing.on_unauthorized".into(),
            "\"fallback\" needs a [routing.fallback] table".into(),
        ));
    }
    Ok(RoutingConfig {
        region: raw.region,
        platform: raw.platform,
        spf_aware: raw.spf_aware,
        on_unauthorized: raw.on_unauthorized,
        regions: regions_map,
        internal,
        fallback,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[access]
allowed_ranges = ["127.0.0.0/8"]
domains = ["Example.TEST"]
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("t.toml"))
    }

    #[test]
    fn durations_parse_and_print() {
        assert_eq!(Dur::parse("5m").unwrap().0, Duration::from_secs(300));
        assert_eq!(Dur::parse("250ms").unwrap().0, Duration::from_millis(250));
        assert_eq!(Dur::parse("5d").unwrap().to_string(), "5d");
        assert_eq!(Dur::parse("90s").unwrap().to_string(), "90s");
        assert!(Dur::parse("5").is_err());
        assert!(Dur::parse("5 parsecs").is_err());
        assert!(Dur::parse("m").is_err());
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
