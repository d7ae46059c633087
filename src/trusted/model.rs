//! What the trusted-sender list holds and how it is asked, whatever keeps it.

use serde::Serialize;

use crate::envelope::Millis;

#[derive(Debug, thiserror::Error)]
pub enum TrustedError {
    /// A filter the caller got wrong (a `sender` that is not an address).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl From<tokio_postgres::Error> for TrustedError {
    fn from(e: tokio_postgres::Error) -> TrustedError {
        TrustedError::Store(e.into())
    }
}

pub const DAY_MS: Millis = 86_400_000;

/// Where an entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Delivered mail an internal user wrote.
    Learned,
    /// `smartrelay trusted import`.
    Imported,
    /// Learned from a sender a limit then restricted, within the rule's window: left
    /// out of listings and exports unless asked for, until a release clears it.
    Suspect,
}

impl Origin {
    pub fn label(self) -> &'static str {
        match self {
            Origin::Learned => "learned",
            Origin::Imported => "imported",
            Origin::Suspect => "suspect",
        }
    }

    /// The column's value; anything unknown reads as learned, the default it had.
    pub fn parse(text: &str) -> Origin {
        match text {
            "imported" => Origin::Imported,
            "suspect" => Origin::Suspect,
            _ => Origin::Learned,
        }
    }
}

/// The senders a restriction was for, as the list records them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Suspected {
    /// One address (lower case).
    Sender(String),
    /// Every address at a domain (lower case).
    Domain(String),
}

/// One external address on the list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrustedRecipient {
    pub address: String,
    pub domain: String,
    pub count: u64,
    pub first_seen: Millis,
    pub last_seen: Millis,
    /// Internal senders who wrote to this address.
    pub senders: u64,
    pub origin: Origin,
}

/// A listing as the caller asks for it.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub sender: Option<String>,
    pub domain: Option<String>,
    pub since: Option<Millis>,
    pub min_count: Option<u64>,
    pub limit: usize,
    /// Address after which the page starts (the last address of the previous page).
    pub cursor: Option<String>,
    /// Suspect entries too (`include_suspect`).
    pub include_suspect: bool,
}

/// A filter in the form both backends query with: sender and domain normalized as
/// the list stores them, the limit clamped.
#[derive(Debug, Clone)]
pub struct Query {
    pub sender: Option<String>,
    pub domain: Option<String>,
    pub since: Option<i64>,
    pub min_count: Option<i64>,
    pub cursor: Option<String>,
    pub limit: usize,
    pub include_suspect: bool,
}

impl Query {
    pub fn of(f: Filter) -> Result<Query, TrustedError> {
        let sender = match &f.sender {
            Some(s) => Some(
                super::policy::normalize(s)
                    .ok_or_else(|| TrustedError::Invalid("sender must be an address".into()))?,
            ),
            None => None,
        };
        Ok(Query {
            sender,
            domain: f
                .domain
                .as_deref()
                .and_then(super::policy::normalize_domain),
            since: f.since.map(|s| s as i64),
            min_count: f.min_count.map(|c| c as i64),
            cursor: f.cursor,
            limit: f.limit.clamp(1, 100_000),
            include_suspect: f.include_suspect,
        })
    }

    /// Rows to read: one more than the page, which says whether a next page exists.
    pub fn take(&self) -> i64 {
        (self.limit + 1) as i64
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Page {
    pub entries: Vec<TrustedRecipient>,
    pub next_cursor: Option<String>,
}

impl Page {
    /// `entries` was read with one row more than `limit`: that extra row says whether
    /// a next page exists, and the last kept address is where it starts.
    pub fn cut(mut entries: Vec<TrustedRecipient>, limit: usize) -> Page {
        let next_cursor = if entries.len() > limit {
            entries.truncate(limit);
            entries.last().map(|e| e.address.clone())
        } else {
            None
        };
        Page {
            entries,
            next_cursor,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DayCount {
    pub day: String,
    pub added: u64,
    pub deliveries: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub recipients: u64,
    pub domains: u64,
    pub pairs: u64,
    pub first_delivery: Option<Millis>,
    pub days_observed: u64,
    pub learning_days: u32,
    pub ready: bool,
    pub added_per_day: Vec<DayCount>,
}

/// What both backends count; the rest of `Stats` follows from it.
pub struct Counts {
    pub recipients: u64,
    pub domains: u64,
    pub pairs: u64,
    pub first_delivery: Option<Millis>,
    /// (day number, added, deliveries), newest first.
    pub days: Vec<(u64, u64, u64)>,
}

impl Counts {
    pub fn stats(self, now: Millis, learning_days: u32) -> Stats {
        let days_observed = self
            .first_delivery
            .map_or(0, |f| now.saturating_sub(f) / DAY_MS);
        Stats {
            recipients: self.recipients,
            domains: self.domains,
            pairs: self.pairs,
            first_delivery: self.first_delivery,
            days_observed,
            learning_days,
            ready: days_observed >= u64::from(learning_days),
            added_per_day: self
                .days
                .into_iter()
                .map(|(day, added, deliveries)| DayCount {
                    day: day_string(day),
                    added,
                    deliveries,
                })
                .collect(),
        }
    }
}

/// "2026-11-29" for a day number since the epoch.
pub fn day_string(day: u64) -> String {
    let dt = mail_parser::DateTime::from_timestamp((day * 86_400) as i64);
    format!("{:04}-{:02}-{:02}", dt.year, dt.month, dt.day)
}
