//! The message as every stage sees it: the envelope taken at ingress (immutable once
//! queued) and the delivery state the scheduler keeps beside it.

use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch: the one time unit stored on disk and in the APIs.
pub type Millis = u64;

pub fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// `Sun, 29 Nov 2026 16:40:06 +0000`, for Date, Received and DSN fields.
pub fn rfc5322_date(ms: Millis) -> String {
    mail_parser::DateTime::from_timestamp((ms / 1000) as i64).to_rfc822()
}

/// `2026-11-29T16:40:06Z`
pub fn rfc3339(ms: Millis) -> String {
    let d = mail_parser::DateTime::from_timestamp((ms / 1000) as i64);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        d.year, d.month, d.day, d.hour, d.minute, d.second
    )
}

/// Queue identifier: 13 hex digits of microseconds then 7 of a per-process counter, so IDs
/// sort by arrival and never repeat within a process (the spool lock keeps it to one).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct QueueId(String);

static ID_COUNTER: AtomicU32 = AtomicU32::new(0);

impl QueueId {
    pub fn generate() -> QueueId {
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros())
            .unwrap_or(0);
        let n = ID_COUNTER.fetch_add(1, Ordering::Relaxed) & 0x0FFF_FFFF;
        QueueId(format!("{:013X}{n:07X}", micros & 0x1F_FFFF_FFFF_FFFF))
    }

    /// Accepts only what `generate` makes, so an ID from a URL or file name cannot
    /// name a path outside the spool.
    pub fn parse(text: &str) -> Option<QueueId> {
        (text.len() == 20
            && text
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_lowercase()))
        .then(|| QueueId(text.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The `BODY=` parameter (RFC 6152, RFC 3030).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BodyType {
    #[default]
    #[serde(rename = "7bit")]
    SevenBit,
    #[serde(rename = "8bitmime")]
    EightBitMime,
    #[serde(rename = "binarymime")]
    BinaryMime,
}

impl BodyType {
    pub fn keyword(self) -> &'static str {
        match self {
            BodyType::SevenBit => "7BIT",
            BodyType::EightBitMime => "8BITMIME",
            BodyType::BinaryMime => "BINARYMIME",
        }
    }
}

/// `RET=` of RFC 3461: what a failure DSN carries of the original.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ret {
    Full,
    Hdrs,
}

/// `NOTIFY=` of RFC 3461. `None` in a recipient means the parameter was absent, which
/// is treated as `FAILURE,DELAY` (RFC 3461 §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Notify {
    pub success: bool,
    pub failure: bool,
    pub delay: bool,
}

impl Notify {
    pub const NEVER: Notify = Notify {
        success: false,
        failure: false,
        delay: false,
    };

    pub fn keyword(&self) -> String {
        let mut parts = Vec::new();
        if self.success {
            parts.push("SUCCESS");
        }
        if self.failure {
            parts.push("FAILURE");
        }
        if self.delay {
            parts.push("DELAY");
        }
        if parts.is_empty() {
            "NEVER".into()
        } else {
            parts.join(",")
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    /// As the client wrote it (local part untouched), without angle brackets.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<Notify>,
    /// `ORCPT=` exactly as received (xtext encoded), e.g. `rfc822;bob@example.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orcpt: Option<String>,
}

impl Recipient {
    pub fn wants_failure_dsn(&self) -> bool {
        self.notify.is_none_or(|n| n.failure)
    }
    pub fn wants_delay_dsn(&self) -> bool {
        self.notify.is_none_or(|n| n.delay)
    }
    pub fn wants_success_dsn(&self) -> bool {
        self.notify.is_some_and(|n| n.success)
    }
    pub fn domain(&self) -> &str {
        domain_of(&self.address)
    }
}

/// The connection a message came in on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    pub ip: IpAddr,
    pub helo: String,
    /// Negotiated TLS version and cipher, when the session was encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
}

/// What later stages need to know about the content without parsing it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ContentFlags {
    /// Auto-Submitted other than `no`, Precedence bulk/junk/list/auto_reply, or an
    /// autoresponder marker: never teaches the trusted-sender list.
    pub auto_reply: bool,
    /// multipart/report (DSN, MDN): a machine-made report.
    pub report: bool,
    /// Any byte outside ASCII in header or body: needs 8BITMIME or BINARYMIME upstream.
    pub eight_bit: bool,
}

/// The envelope fixed at ingress, stored beside the message data.
/// What a rule counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum LimitKey {
    /// The envelope MAIL FROM address.
    Sender,
    /// Its domain.
    SenderDomain,
    /// The client's address (the PROXY header's, behind a balancer).
    Client,
}

impl LimitKey {
    pub fn label(self) -> &'static str {
        match self {
            LimitKey::Sender => "sender",
            LimitKey::SenderDomain => "sender_domain",
            LimitKey::Client => "client",
        }
    }

    pub fn parse(text: &str) -> Option<LimitKey> {
        match text {
            "sender" => Some(LimitKey::Sender),
            "sender_domain" => Some(LimitKey::SenderDomain),
            "client" => Some(LimitKey::Client),
            _ => None,
        }
    }
}

/// What becomes of the mail held under one key value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Settle {
    /// Delivered as if never held; its lifetime counts from now.
    Release,
    /// Removed without delivery and without a DSN.
    Discard,
}

impl Settle {
    pub fn label(self) -> &'static str {
        match self {
            Settle::Release => "released",
            Settle::Discard => "discarded",
        }
    }
}

/// Why a message is held: never tried until it is released.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum HoldReason {
    /// An operator held it (`POST /api/v1/queue/{id}/hold`).
    Manual,
    /// A `[[limits]]` rule fired for this key value, or it was already restricted.
    Limit {
        limit: String,
        key: LimitKey,
        value: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: QueueId,
    /// Empty for the null reverse path `<>`.
    pub sender: String,
    pub recipients: Vec<Recipient>,
    #[serde(default)]
    pub body: BodyType,
    #[serde(default)]
    pub smtputf8: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ret: Option<Ret>,
    /// `ENVID=` as received (xtext).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envid: Option<String>,
    pub client: ClientInfo,
    pub received_at: Millis,
    /// Stored size of the message data in octets (with our Received header).
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    #[serde(default)]
    pub flags: ContentFlags,
    /// Set on delivery status notifications this relay generated itself.
    #[serde(default)]
    pub generated_dsn: bool,
    /// Composed by the relay for an operator (the onboarding Share mail): nobody wrote
    /// it, so its recipients never become trusted senders.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub system: bool,
    /// Held from the start (a limit): stays queued, undelivered, until released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<HoldReason>,
}

impl Envelope {
    /// A plain envelope for unit tests: 7-bit, no DSN parameters, from 127.0.0.1.
    #[cfg(test)]
    pub(crate) fn for_test(sender: &str, recipients: &[&str], size: u64) -> Envelope {
        Envelope {
            id: QueueId::generate(),
            sender: sender.into(),
            recipients: recipients
                .iter()
                .map(|a| Recipient {
                    address: a.to_string(),
                    notify: None,
                    orcpt: None,
                })
                .collect(),
            body: BodyType::SevenBit,
            smtputf8: false,
            ret: None,
            envid: None,
            client: ClientInfo {
                ip: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
                helo: "client.test".into(),
                tls: None,
            },
            received_at: 0,
            size,
            message_id: None,
            flags: ContentFlags::default(),
            generated_dsn: false,
            system: false,
            held: None,
        }
    }

    pub fn is_null_sender(&self) -> bool {
        self.sender.is_empty()
    }
    pub fn sender_domain(&self) -> Option<&str> {
        (!self.sender.is_empty()).then(|| domain_of(&self.sender))
    }
}

/// A reply from an upstream server (or one we made up for a local failure).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub code: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub esc: Option<String>,
    pub text: String,
}

impl Reply {
    pub fn new(code: u16, esc: &str, text: impl Into<String>) -> Reply {
        Reply {
            code,
            esc: (!esc.is_empty()).then(|| esc.to_string()),
            text: text.into(),
        }
    }
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }
    /// Enhanced status for DSNs: the upstream's, else derived from the class.
    pub fn status(&self) -> String {
        self.esc.clone().unwrap_or_else(|| match self.code {
            200..=299 => "2.0.0".into(),
            400..=499 => "4.0.0".into(),
            _ => "5.0.0".into(),
        })
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.esc {
            Some(esc) => write!(f, "{} {} {}", self.code, esc, self.text),
            None => write!(f, "{} {}", self.code, self.text),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RcptState {
    #[default]
    Pending,
    Delivered,
    Failed,
}

/// Where one recipient stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RcptStatus {
    pub state: RcptState,
    /// Last reply seen for this recipient (upstream, or local such as an SPF deferral).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<Reply>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<Millis>,
    /// A failure DSN has been queued for this recipient (or none was wanted).
    #[serde(default)]
    pub dsn_done: bool,
}

/// Mutable delivery bookkeeping for one queued message, stored next to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DeliveryState {
    pub rcpts: Vec<RcptStatus>,
    pub attempts: u32,
    pub next_attempt: Millis,
    #[serde(default)]
    pub held: bool,
    /// Why, while `held` (absent in states written before reasons were kept: manual).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_reason: Option<HoldReason>,
    /// When the message's lifetime (`queue.max_age`) counts from, when not its arrival:
    /// the release of a hold, which never eats into it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Millis>,
    #[serde(default)]
    pub delay_dsn_sent: bool,
}

impl DeliveryState {
    pub fn new(recipients: usize, now: Millis) -> DeliveryState {
        DeliveryState {
            rcpts: vec![RcptStatus::default(); recipients],
            attempts: 0,
            next_attempt: now,
            held: false,
            hold_reason: None,
            since: None,
            delay_dsn_sent: false,
        }
    }
    pub fn pending(&self) -> Vec<usize> {
        (0..self.rcpts.len())
            .filter(|&i| self.rcpts[i].state == RcptState::Pending)
            .collect()
    }
    pub fn is_finished(&self) -> bool {
        self.rcpts.iter().all(|r| r.state != RcptState::Pending)
    }
}

/// Domain part of an address (after the last `@`), or "" when there is none.
pub fn domain_of(address: &str) -> &str {
    address.rsplit_once('@').map(|(_, d)| d).unwrap_or("")
}

/// A host name per RFC 1035/5321 (letters, digits, hyphens; labels up to 63 octets), or
/// a U-label name (any non-ASCII allowed inside a label) as SMTPUTF8 permits.
pub fn is_valid_domain(domain: &str) -> bool {
    let d = domain.strip_suffix('.').unwrap_or(domain);
    if d.is_empty() || d.len() > 253 {
        return false;
    }
    d.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || !c.is_ascii())
    })
}

/// Whether `domain` is one of `list` (already lower-case), ignoring case and a trailing dot.
pub fn domain_in(domain: &str, list: &[String]) -> bool {
    let d = domain.trim_end_matches('.');
    list.iter().any(|x| x.eq_ignore_ascii_case(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_ids_sort_unique_and_parse_back() {
        let a = QueueId::generate();
        let b = QueueId::generate();
        assert!(a < b);
        assert_eq!(QueueId::parse(a.as_str()), Some(a));
        assert_eq!(QueueId::parse("../../etc/passwd"), None);
        assert_eq!(QueueId::parse("0123456789abcdef0123"), None);
    }

    #[test]
    fn domains() {
        assert!(is_valid_domain("example.test"));
        assert!(is_valid_domain("xn--bcher-kva.example"));
        assert!(is_valid_domain("bücher.example"));
        assert!(!is_valid_domain("-bad.example"));
        assert!(!is_valid_domain("a..b"));
        assert!(!is_valid_domain(""));
        assert!(domain_in("Example.TEST.", &["example.test".into()]));
        assert_eq!(domain_of("\"a@b\"@c.test"), "c.test");
    }

    #[test]
    fn notify_defaults() {
        let r = Recipient {
            address: "a@b.c".into(),
            notify: None,
            orcpt: None,
        };
        assert!(r.wants_failure_dsn() && r.wants_delay_dsn() && !r.wants_success_dsn());
        let never = Recipient {
            notify: Some(Notify::NEVER),
            ..r
        };
        assert!(!never.wants_failure_dsn() && !never.wants_delay_dsn());
    }
}
