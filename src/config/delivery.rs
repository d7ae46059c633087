//! `[queue]`, `[delivery]` and `[dns]`: the spool and its retries, the upstream
//! sessions, and the resolver.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::Dur;

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

/// `delivery.concurrency`: how many sessions each smart host gets (`deliver::concurrency`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConcurrencyMode {
    /// From a few sessions up to `max_connections_per_host`, as long as the host keeps
    /// up: fewer when its transactions slow down with more sessions.
    Adaptive,
    /// Always up to `max_connections_per_host` (the default).
    Fixed,
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
    pub concurrency: ConcurrencyMode,
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
            concurrency: ConcurrencyMode::Fixed,
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

pub(super) fn validate_queue(q: &QueueConfig) -> Result<(), (&'static str, String)> {
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

pub(super) fn validate_delivery(d: &DeliveryConfig) -> Result<(), (&'static str, String)> {
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
