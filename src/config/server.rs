//! `[server]`, `[server.proxy_protocol]` and `[tls]`: the SMTP listeners and the limits
//! every session is held to.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

use super::{parse_range, Dur};

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
    /// Octets of bodies in flight all sessions together may hold in memory; a session
    /// that finds it spent writes its body to a file and stops reading until room is
    /// free (TCP backpressure).
    pub ingress_memory: u64,
    /// A body larger than this is written to a file beside the spool as it arrives.
    pub spill_threshold: u64,
    /// After SIGTERM or `POST /api/v1/drain`: how long the listeners stay open answering
    /// `421 4.3.0`, so the balancer's checks see the node leave before it closes.
    pub drain_delay: Dur,
    /// After the drain delay: how long sessions and deliveries in flight get to finish
    /// before they are closed with 421 and cut.
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
            ingress_memory: 256 << 20,
            spill_threshold: 1 << 20,
            drain_delay: Dur(Duration::ZERO),
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

pub(super) fn validate_server(s: &ServerConfig) -> Result<(), (&'static str, String)> {
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
    if s.ingress_memory < 1 << 20 {
        return Err((
            "server.ingress_memory",
            "must be at least 1 MiB (1048576)".into(),
        ));
    }
    if s.spill_threshold < 64 << 10 || s.spill_threshold > s.ingress_memory {
        return Err((
            "server.spill_threshold",
            "must be at least 64 KiB (65536) and at most server.ingress_memory".into(),
        ));
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
