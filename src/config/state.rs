//! `[admin]`, `[trusted]`, `[store]` and `[log]`: where the relay keeps and shows what
//! it learns.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::Dur;
use crate::rate::Rate;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub listen: Option<SocketAddr>,
    pub token: Option<String>,
    /// Relay state: observed sources, flow counters, onboarding confirmations.
    pub database: PathBuf,
    /// Flow counters and sources older than this are pruned from `database`.
    pub retention: Dur,
    /// Host names the admin is reached by (a request naming another `Host` gets 421):
    /// besides its listen address, any address literal on a wildcard listener, and
    /// `localhost` on loopback.
    pub hosts: Vec<String>,
    /// How long a dashboard session lasts after signing in.
    pub session_ttl: Dur,
    /// Onboarding Share mails the relay sends at most (429 beyond).
    pub share_rate: Rate,
    /// Rows of flow counters and sources (hourly, folded) held while the store cannot
    /// be written; beyond them what arrives is dropped and counted.
    pub buffer_limit: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: Some("127.0.0.1:8025".parse().expect("literal address")),
            token: None,
            database: "var/state.sqlite3".into(),
            retention: Dur(Duration::from_secs(30 * 86_400)),
            hosts: Vec::new(),
            session_ttl: Dur(Duration::from_secs(12 * 3600)),
            share_rate: Rate {
                count: 10,
                period: Duration::from_secs(3600),
            },
            buffer_limit: 100_000,
        }
    }
}

/// `[tracking]`: the record of every message's life, searchable by id, sender and
/// recipient.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrackingConfig {
    pub enabled: bool,
    /// Records of messages received longer ago are pruned (hourly).
    pub retention: Dur,
    /// Keep each message's Subject (personal data: off by default).
    pub subjects: bool,
    /// The SQLite file on one node; with `[store] kind = "postgres"` the shared database.
    pub database: PathBuf,
}

impl Default for TrackingConfig {
    fn default() -> Self {
        TrackingConfig {
            enabled: true,
            retention: Dur(Duration::from_secs(30 * 86_400)),
            subjects: false,
            database: "var/tracking.sqlite3".into(),
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// How often the limits' counters and restrictions are exchanged with the store.
    pub sync_interval: Dur,
    /// `postgres://user@host:port/db`; the password from `PGPASSWORD` when the URL has
    /// none.
    pub url: Option<String>,
    /// An environment variable holding the whole URL (secrets stay out of the file).
    pub url_env: Option<String>,
    /// `None`: `verify-full`, or `disable` for a Unix socket or a loopback host.
    pub tls: Option<StoreTls>,
    /// The CAs `verify-full` trusts instead of the system's (PEM).
    pub ca_file: Option<PathBuf>,
}

/// `[store] tls`: how the connection to PostgreSQL is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StoreTls {
    /// Clear text: only for a Unix socket or a loopback host.
    Disable,
    /// Encrypted; the certificate is not checked (a passive eavesdropper sees nothing,
    /// an active one can).
    Require,
    /// Encrypted; the chain against `ca_file` or the system roots, and the host name.
    VerifyFull,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::Sqlite,
            sync_interval: Dur(Duration::from_secs(1)),
            url: None,
            url_env: None,
            tls: None,
            ca_file: None,
        }
    }
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
