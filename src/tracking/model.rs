//! What tracking records of a message and how it is asked, whatever keeps it: the
//! changes a batch of events makes (pure), the statuses and their summary, and the
//! searches.

use std::collections::HashMap;
use std::future::Future;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::envelope::{HoldReason, Millis, QueueId};
use crate::events::{Event, Outcome};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum TrackingError {
    /// A search the caller got wrong.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where one recipient of a message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Queued,
    Deferred,
    Delivered,
    Bounced,
    Held,
    Expired,
    Removed,
    /// Read and refused (the message was never queued).
    Refused,
    /// A message's summary only: final results of more than one kind.
    Partial,
}

impl Status {
    pub const ALL: [Status; 9] = [
        Status::Queued,
        Status::Deferred,
        Status::Delivered,
        Status::Bounced,
        Status::Held,
        Status::Expired,
        Status::Removed,
        Status::Refused,
        Status::Partial,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Deferred => "deferred",
            Status::Delivered => "delivered",
            Status::Bounced => "bounced",
            Status::Held => "held",
            Status::Expired => "expired",
            Status::Removed => "removed",
            Status::Refused => "refused",
            Status::Partial => "partial",
        }
    }

    pub fn parse(text: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.label() == text)
    }

    /// Still to be decided: the message is in some queue.
    fn pending(self) -> bool {
        matches!(self, Status::Queued | Status::Deferred | Status::Held)
    }
}

/// A message's status from its recipients': theirs when they agree; while any is
/// pending, the most telling pending one (held, then deferred, then queued); once all
/// are final and differ, partial.
pub fn summarize(recipients: &[Status]) -> Status {
    let Some(first) = recipients.first() else {
        return Status::Queued;
    };
    if recipients.iter().all(|s| s == first) {
        return *first;
    }
    for s in [Status::Held, Status::Deferred, Status::Queued] {
        if recipients.contains(&s) {
            return s;
        }
    }
    if recipients.iter().any(|s| s.pending()) {
        return Status::Queued;
    }
    Status::Partial
}

/// What happened, in a message's timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    Received,
    Refused,
    Routed,
    Attempt,
    Deferred,
    Delivered,
    Bounced,
    Dsn,
    Held,
    Released,
    Expired,
    Removed,
}

impl EventType {
    pub fn label(self) -> &'static str {
        match self {
            EventType::Received => "received",
            EventType::Refused => "refused",
            EventType::Routed => "routed",
            EventType::Attempt => "attempt",
            EventType::Deferred => "deferred",
            EventType::Delivered => "delivered",
            EventType::Bounced => "bounced",
            EventType::Dsn => "dsn",
            EventType::Held => "held",
            EventType::Released => "released",
            EventType::Expired => "expired",
            EventType::Removed => "removed",
        }
    }
}

/// A new message row.
#[derive(Debug, Clone, PartialEq)]
pub struct NewMessage {
    pub id: QueueId,
    pub node: String,
    pub received_at: Millis,
    pub client: String,
    pub helo: String,
    pub tls: Option<String>,
    pub proof: String,
    pub sender: String,
    pub message_id: Option<String>,
    pub size: u64,
    pub subject: Option<String>,
    /// Each recipient and where it stands when the row is written.
    pub recipients: Vec<(String, Status)>,
    /// The message's summary of them.
    pub status: Status,
}

/// A timeline line's own fields, stored as a JSON object. Typed rather than built as a
/// `serde_json::Value`: the recorder writes several of these per message, and a map of
/// boxed values cost it more than the rows' inserts.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Detail {
    Received {
        size: u64,
    },
    Refused {
        reply: String,
    },
    Held {
        reason: HoldReason,
    },
    Routed {
        route: String,
        spf: &'static str,
    },
    /// One connection's try for some recipients.
    Attempt {
        route: String,
        host: Option<String>,
        tls: bool,
        duration_ms: u64,
        recipients: usize,
    },
    /// One recipient's result of an attempt (or its expiry).
    Result {
        route: Option<String>,
        host: Option<String>,
        tls: bool,
        reply: String,
        duration_ms: u64,
    },
    Dsn {
        dsn_id: QueueId,
        action: &'static str,
    },
    /// Released or removed: the type says it all.
    Empty {},
}

/// One line of a timeline, stored as the API shows it: `at`, `type`, the recipient
/// (lower-case) when the line is about one, and the type's own fields.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Line {
    pub at: Millis,
    #[serde(rename = "type")]
    pub kind: EventType,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    #[serde(flatten)]
    pub detail: Detail,
}

/// Lines as they are stored: one JSON array per message and batch.
pub fn lines_json(lines: &[Line]) -> String {
    // Plain fields only: serializing cannot fail.
    serde_json::to_string(lines).unwrap_or_else(|_| "[]".into())
}

/// The lines of one stored array; a line that is not an object with `at` and `type`
/// (which no relay writes) is left out rather than failing the whole record.
pub fn parse_lines(text: &str) -> Vec<TimelineEvent> {
    let Ok(lines) = serde_json::from_str::<Vec<serde_json::Map<String, Value>>>(text) else {
        return Vec::new();
    };
    lines
        .into_iter()
        .filter_map(|mut line| {
            let at = line.remove("at")?.as_u64()?;
            let kind = line.remove("type")?.as_str()?.to_string();
            let recipient = match line.remove("recipient") {
                Some(Value::String(r)) => Some(r),
                _ => None,
            };
            Some(TimelineEvent {
                at,
                kind,
                recipient,
                detail: line,
            })
        })
        .collect()
}

/// One change a batch makes to the store, in event order.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Message(Box<NewMessage>),
    /// Lines of a message's timeline, in order: one as an event makes them, all of a
    /// batch's once folded.
    Lines {
        id: QueueId,
        lines: Vec<Line>,
    },
    /// One recipient's new status.
    Recipient {
        id: QueueId,
        address: String,
        status: Status,
    },
    /// Every recipient of `id` whose status is one of `from` goes to `to`.
    Move {
        id: QueueId,
        from: &'static [Status],
        to: Status,
    },
}

impl Change {
    pub fn id(&self) -> &QueueId {
        match self {
            Change::Message(m) => &m.id,
            Change::Lines { id, .. } | Change::Recipient { id, .. } | Change::Move { id, .. } => id,
        }
    }
}

/// What to keep that the events do not decide.
#[derive(Debug, Clone)]
pub struct Keep {
    /// This node (`server.hostname`).
    pub node: String,
    /// `tracking.subjects`.
    pub subjects: bool,
}

fn bare_id(id: &Option<String>) -> Option<String> {
    id.as_deref()
        .map(|m| {
            m.trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_string()
        })
        .filter(|m| !m.is_empty())
}

fn event(
    id: &QueueId,
    at: Millis,
    kind: EventType,
    recipient: Option<&str>,
    detail: Detail,
) -> Change {
    Change::Lines {
        id: id.clone(),
        lines: vec![Line {
            at,
            kind,
            recipient: recipient.map(str::to_ascii_lowercase),
            detail,
        }],
    }
}

/// The changes one bus event makes; empty for the kinds tracking does not follow.
pub fn changes(ev: &Event, keep: &Keep, out: &mut Vec<Change>) {
    match ev {
        Event::Accepted(a) => {
            let status = if a.held.is_some() {
                Status::Held
            } else {
                Status::Queued
            };
            out.push(Change::Message(Box::new(NewMessage {
                id: a.id.clone(),
                node: keep.node.clone(),
                received_at: a.at,
                client: a.ip.to_string(),
                helo: a.helo.clone(),
                tls: a.tls.clone(),
                proof: a.proof.label().to_string(),
                sender: a.sender.clone(),
                message_id: bare_id(&a.message_id),
                size: a.size,
                subject: a.subject.clone().filter(|_| keep.subjects),
                recipients: a.recipients.iter().map(|r| (r.clone(), status)).collect(),
                status,
            })));
            out.push(event(
                &a.id,
                a.at,
                EventType::Received,
                None,
                Detail::Received { size: a.size },
            ));
            if let Some(reason) = &a.held {
                out.push(event(
                    &a.id,
                    a.at,
                    EventType::Held,
                    None,
                    Detail::Held {
                        reason: reason.clone(),
                    },
                ));
            }
        }
        Event::Refused(r) => {
            out.push(Change::Message(Box::new(NewMessage {
                id: r.id.clone(),
                node: keep.node.clone(),
                received_at: r.at,
                client: r.ip.to_string(),
                helo: r.helo.clone(),
                tls: r.tls.clone(),
                proof: "none".into(),
                sender: r.sender.clone(),
                message_id: bare_id(&r.message_id),
                size: r.size,
                subject: r.subject.clone().filter(|_| keep.subjects),
                recipients: r
                    .recipients
                    .iter()
                    .map(|a| (a.clone(), Status::Refused))
                    .collect(),
                status: Status::Refused,
            })));
            out.push(event(
                &r.id,
                r.at,
                EventType::Refused,
                None,
                Detail::Refused {
                    reply: r.reply.to_string(),
                },
            ));
        }
        Event::Routed { id, route, spf, at } => out.push(event(
            id,
            *at,
            EventType::Routed,
            None,
            Detail::Routed {
                route: route.clone(),
                spf: spf.label(),
            },
        )),
        Event::Delivery(r) => {
            if !r.expired {
                if let Some(route) = &r.route {
                    out.push(event(
                        &r.id,
                        r.at,
                        EventType::Attempt,
                        None,
                        Detail::Attempt {
                            route: route.clone(),
                            host: r.host.clone(),
                            tls: r.tls,
                            duration_ms: r.duration_ms,
                            recipients: r.results.len(),
                        },
                    ));
                }
            }
            for res in &r.results {
                let (kind, status) = match (r.expired, res.outcome) {
                    (true, _) => (EventType::Expired, Status::Expired),
                    (false, Outcome::Delivered) => (EventType::Delivered, Status::Delivered),
                    (false, Outcome::Deferred) => (EventType::Deferred, Status::Deferred),
                    (false, Outcome::Bounced) => (EventType::Bounced, Status::Bounced),
                };
                out.push(Change::Recipient {
                    id: r.id.clone(),
                    address: res.address.clone(),
                    status,
                });
                out.push(event(
                    &r.id,
                    r.at,
                    kind,
                    Some(&res.address),
                    Detail::Result {
                        route: r.route.clone(),
                        host: r.host.clone(),
                        tls: r.tls,
                        reply: res.reply.to_string(),
                        duration_ms: r.duration_ms,
                    },
                ));
            }
        }
        Event::Dsn {
            id,
            dsn_id,
            action,
            at,
        } => out.push(event(
            id,
            *at,
            EventType::Dsn,
            None,
            Detail::Dsn {
                dsn_id: dsn_id.clone(),
                action,
            },
        )),
        Event::Held { id, reason, at } => {
            out.push(Change::Move {
                id: id.clone(),
                from: &[Status::Queued, Status::Deferred],
                to: Status::Held,
            });
            out.push(event(
                id,
                *at,
                EventType::Held,
                None,
                Detail::Held {
                    reason: reason.clone(),
                },
            ));
        }
        Event::Released { id, at } => {
            out.push(Change::Move {
                id: id.clone(),
                from: &[Status::Held],
                to: Status::Queued,
            });
            out.push(event(id, *at, EventType::Released, None, Detail::Empty {}));
        }
        Event::Removed { id, at } => {
            out.push(Change::Move {
                id: id.clone(),
                from: &[Status::Queued, Status::Deferred, Status::Held],
                to: Status::Removed,
            });
            out.push(event(id, *at, EventType::Removed, None, Detail::Empty {}));
        }
        _ => {}
    }
}

/// A batch as the store should write it, with fewer rows. Most messages are received
/// and delivered within one batch, and every row saved is an insert or an update into
/// pages the store writes:
/// - a message's timeline lines of the batch become one array, one row;
/// - a recipient's new status, or a move of several, is folded into its message's row
///   when that row is written in the same batch (saving, besides the update, a read of
///   the message's recipients and an update of its summary).
///
/// What cannot be folded (the row was written by an earlier batch) is left as it was,
/// in order.
pub fn fold(batch: Vec<Change>) -> Vec<Change> {
    let mut out: Vec<Change> = Vec::with_capacity(batch.len());
    // Where each message's row, and each message's lines, sit in `out`.
    let mut rows: HashMap<QueueId, usize> = HashMap::with_capacity(batch.len() / 4);
    let mut timelines: HashMap<QueueId, usize> = HashMap::with_capacity(batch.len() / 4);
    // Rows that took a status: their summaries are made once, at the end.
    let mut summed: Vec<usize> = Vec::new();
    for change in batch {
        if let Change::Lines { id, lines } = change {
            match timelines.get(&id).and_then(|&i| out.get_mut(i)) {
                Some(Change::Lines { lines: first, .. }) => first.extend(lines),
                _ => {
                    timelines.insert(id.clone(), out.len());
                    out.push(Change::Lines { id, lines });
                }
            }
            continue;
        }
        let at = rows.get(change.id()).copied().unwrap_or(usize::MAX);
        let row = match out.get_mut(at) {
            Some(Change::Message(m)) => m,
            _ => {
                if let Change::Message(m) = &change {
                    rows.insert(m.id.clone(), out.len());
                }
                out.push(change);
                continue;
            }
        };
        let folded = match &change {
            Change::Recipient {
                address, status, ..
            } => {
                let mut found = false;
                for (a, s) in row.recipients.iter_mut() {
                    if a.eq_ignore_ascii_case(address) {
                        *s = *status;
                        found = true;
                    }
                }
                found
            }
            Change::Move { from, to, .. } => {
                for (_, s) in row.recipients.iter_mut() {
                    if from.contains(s) {
                        *s = *to;
                    }
                }
                true
            }
            Change::Message(_) | Change::Lines { .. } => false,
        };
        if folded {
            summed.push(at);
        } else {
            out.push(change);
        }
    }
    // A folded row's summary, once per row whatever number of statuses went into it.
    summed.sort_unstable();
    summed.dedup();
    let mut all: Vec<Status> = Vec::new();
    for i in summed {
        if let Some(Change::Message(m)) = out.get_mut(i) {
            all.clear();
            all.extend(m.recipients.iter().map(|(_, s)| *s));
            m.status = summarize(&all);
        }
    }
    out
}

/// A search as the caller asks it.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Filter {
    pub message_id: Option<String>,
    pub queue_id: Option<String>,
    pub sender: Option<String>,
    pub recipient: Option<String>,
    pub status: Option<String>,
    pub since: Option<Millis>,
    pub until: Option<Millis>,
    pub limit: Option<usize>,
    pub cursor: Option<String>,
}

/// A search as both backends run it: values normalized, the cursor split.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    pub message_id: Option<String>,
    pub queue_id: Option<String>,
    /// Lower case.
    pub sender: Option<String>,
    /// Lower case.
    pub recipient: Option<String>,
    pub status: Option<Status>,
    pub since: Option<i64>,
    pub until: Option<i64>,
    /// (received_at, queue id) of the last message of the previous page.
    pub after: Option<(i64, String)>,
    pub limit: usize,
}

pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;

fn some(v: &Option<String>) -> Option<String> {
    v.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

impl Query {
    pub fn of(f: &Filter) -> Result<Query, TrackingError> {
        let status = match some(&f.status) {
            Some(s) => Some(Status::parse(&s).ok_or_else(|| {
                TrackingError::Invalid(format!(
                    "status `{s}` is not one of {}",
                    Status::ALL.map(Status::label).join(", ")
                ))
            })?),
            None => None,
        };
        let queue_id = match some(&f.queue_id) {
            Some(q) => Some(
                QueueId::parse(&q)
                    .ok_or_else(|| TrackingError::Invalid(format!("`{q}` is not a queue id")))?
                    .as_str()
                    .to_string(),
            ),
            None => None,
        };
        let after = match some(&f.cursor) {
            Some(c) => {
                let parsed = c
                    .split_once(':')
                    .and_then(|(at, id)| Some((at.parse::<i64>().ok()?, QueueId::parse(id)?)));
                let (at, id) = parsed
                    .ok_or_else(|| TrackingError::Invalid(format!("`{c}` is not a cursor")))?;
                Some((at, id.as_str().to_string()))
            }
            None => None,
        };
        let limit = f.limit.unwrap_or(DEFAULT_LIMIT);
        if limit == 0 || limit > MAX_LIMIT {
            return Err(TrackingError::Invalid(format!(
                "limit must be between 1 and {MAX_LIMIT}"
            )));
        }
        if let (Some(s), Some(u)) = (f.since, f.until) {
            if s > u {
                return Err(TrackingError::Invalid("since is after until".into()));
            }
        }
        Ok(Query {
            message_id: bare_id(&some(&f.message_id)),
            queue_id,
            sender: some(&f.sender).map(|s| s.to_ascii_lowercase()),
            recipient: some(&f.recipient).map(|s| s.to_ascii_lowercase()),
            status,
            since: f.since.map(|s| s as i64),
            until: f.until.map(|u| u as i64),
            after,
            limit,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecipientStatus {
    pub address: String,
    pub status: Status,
}

/// One message in a search's answer.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub queue_id: String,
    pub node: String,
    pub received_at: Millis,
    pub sender: String,
    pub message_id: Option<String>,
    pub status: Status,
    pub recipients: Vec<RecipientStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Page {
    pub messages: Vec<Summary>,
    pub next_cursor: Option<String>,
}

/// One line of a timeline as the store returns it.
#[derive(Debug, Clone, Serialize)]
pub struct TimelineEvent {
    pub at: Millis,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    #[serde(flatten)]
    pub detail: serde_json::Map<String, Value>,
}

/// One attempt at one recipient.
#[derive(Debug, Clone, Serialize)]
pub struct Attempt {
    pub at: Millis,
    pub route: Value,
    pub host: Value,
    pub tls: Value,
    pub reply: Value,
    pub duration_ms: Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct RecipientRecord {
    pub address: String,
    pub status: Status,
    pub attempts: Vec<Attempt>,
}

/// A message's whole record.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub queue_id: String,
    pub node: String,
    pub received_at: Millis,
    pub client: String,
    pub helo: String,
    pub tls: Option<String>,
    pub proof: String,
    pub sender: String,
    pub message_id: Option<String>,
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub status: Status,
    pub recipients: Vec<RecipientRecord>,
    /// The queue ids of the DSNs sent about it.
    pub dsns: Vec<String>,
    /// Held (and by what) and released, in order.
    pub holds: Vec<Value>,
    pub events: Vec<TimelineEvent>,
}

/// The message row and the stored lines, as both backends read them.
pub struct Rows {
    pub message: Record,
    pub recipients: Vec<(String, Status)>,
    pub events: Vec<TimelineEvent>,
}

impl Rows {
    /// Attempts per recipient, DSNs and holds, drawn from the timeline.
    pub fn into_record(self) -> Record {
        let mut m = self.message;
        m.recipients = self
            .recipients
            .into_iter()
            .map(|(address, status)| {
                let attempts = self
                    .events
                    .iter()
                    .filter(|e| e.recipient.as_deref() == Some(address.as_str()))
                    .filter(|e| matches!(e.kind.as_str(), "delivered" | "deferred" | "bounced"))
                    .map(|e| {
                        let get = |k: &str| e.detail.get(k).cloned().unwrap_or(Value::Null);
                        Attempt {
                            at: e.at,
                            route: get("route"),
                            host: get("host"),
                            tls: get("tls"),
                            reply: get("reply"),
                            duration_ms: get("duration_ms"),
                        }
                    })
                    .collect();
                RecipientRecord {
                    address,
                    status,
                    attempts,
                }
            })
            .collect();
        m.dsns = self
            .events
            .iter()
            .filter(|e| e.kind == "dsn")
            .filter_map(|e| {
                e.detail
                    .get("dsn_id")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .collect();
        m.holds = self
            .events
            .iter()
            .filter(|e| matches!(e.kind.as_str(), "held" | "released"))
            .map(|e| json!({"at": e.at, "type": e.kind, "reason": e.detail.get("reason")}))
            .collect();
        m.events = self.events;
        m
    }
}

pub trait Backend: Send + Sync + 'static {
    /// Applies a batch in one transaction; returns how many changes were applied.
    fn apply(
        &self,
        batch: std::sync::Arc<Vec<Change>>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Newest first, one row more than `q.limit`.
    fn search(&self, q: Query) -> impl Future<Output = Result<Vec<Summary>, StoreError>> + Send;
    fn show(&self, id: String) -> impl Future<Output = Result<Option<Rows>, StoreError>> + Send;
    /// Forgets messages received before `before`; returns how many.
    fn prune(&self, before: Millis) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// A page from one row more than `limit`: that row says a next page exists.
pub fn page(mut rows: Vec<Summary>, limit: usize) -> Page {
    let next_cursor = if rows.len() > limit {
        rows.truncate(limit);
        rows.last()
            .map(|m| format!("{}:{}", m.received_at, m.queue_id))
    } else {
        None
    };
    Page {
        messages: rows,
        next_cursor,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_status_sums_its_recipients() {
        use Status::*;
        assert_eq!(summarize(&[Delivered, Delivered]), Delivered);
        assert_eq!(summarize(&[Delivered, Deferred]), Deferred);
        assert_eq!(summarize(&[Held, Deferred, Queued]), Held);
        assert_eq!(summarize(&[Delivered, Queued]), Queued);
        assert_eq!(summarize(&[Delivered, Bounced]), Partial);
        assert_eq!(summarize(&[Bounced, Expired]), Partial);
        assert_eq!(summarize(&[Refused]), Refused);
        assert_eq!(summarize(&[]), Queued);
    }

    #[test]
    fn searches_are_checked_and_normalized() {
        let q = Query::of(&Filter {
            message_id: Some("<abc@x.test>".into()),
            sender: Some("Alice@Contoso.test".into()),
            status: Some("delivered".into()),
            ..Filter::default()
        })
        .unwrap();
        assert_eq!(q.message_id.as_deref(), Some("abc@x.test"));
        assert_eq!(q.sender.as_deref(), Some("alice@contoso.test"));
        assert_eq!(q.status, Some(Status::Delivered));
        assert_eq!(q.limit, DEFAULT_LIMIT);
        for bad in [
            Filter {
                status: Some("lost".into()),
                ..Filter::default()
            },
            Filter {
                queue_id: Some("../etc".into()),
                ..Filter::default()
            },
            Filter {
                cursor: Some("x".into()),
                ..Filter::default()
            },
            Filter {
                limit: Some(0),
                ..Filter::default()
            },
            Filter {
                since: Some(10),
                until: Some(5),
                ..Filter::default()
            },
        ] {
            assert!(
                matches!(Query::of(&bad), Err(TrackingError::Invalid(_))),
                "{bad:?}"
            );
        }
    }

    fn message(id: &QueueId, rcpts: &[&str]) -> Change {
        Change::Message(Box::new(NewMessage {
            id: id.clone(),
            node: "n".into(),
            received_at: 1,
            client: "127.0.0.1".into(),
            helo: "h".into(),
            tls: None,
            proof: "dedicated".into(),
            sender: "a@example.test".into(),
            message_id: None,
            size: 10,
            subject: None,
            recipients: rcpts
                .iter()
                .map(|r| (r.to_string(), Status::Queued))
                .collect(),
            status: Status::Queued,
        }))
    }

    fn line(id: &QueueId, at: Millis, kind: EventType) -> Change {
        event(id, at, kind, None, Detail::Empty {})
    }

    fn set(id: &QueueId, address: &str, status: Status) -> Change {
        Change::Recipient {
            id: id.clone(),
            address: address.into(),
            status,
        }
    }

    #[test]
    fn a_batch_folds_into_one_row_per_message_and_one_array_of_lines() {
        let (a, b) = (QueueId::generate(), QueueId::generate());
        let batch = vec![
            message(&a, &["x@p.test", "Y@p.test"]),
            line(&a, 1, EventType::Received),
            line(&b, 2, EventType::Attempt),
            set(&b, "z@p.test", Status::Delivered),
            set(&a, "x@p.test", Status::Delivered),
            line(&a, 3, EventType::Delivered),
            set(&a, "y@p.test", Status::Deferred),
            line(&a, 4, EventType::Deferred),
            set(&a, "nobody@p.test", Status::Bounced),
        ];
        let out = fold(batch);
        // b's row was written by an earlier batch: its update stays, in order.
        assert_eq!(out.len(), 5, "{out:#?}");
        let Change::Message(m) = &out[0] else {
            panic!("{out:#?}")
        };
        assert_eq!(
            m.recipients,
            vec![
                ("x@p.test".to_string(), Status::Delivered),
                ("Y@p.test".to_string(), Status::Deferred)
            ]
        );
        assert_eq!(m.status, Status::Deferred);
        let Change::Lines { id, lines } = &out[1] else {
            panic!("{out:#?}")
        };
        assert_eq!(id, &a);
        let kinds: Vec<EventType> = lines.iter().map(|l| l.kind).collect();
        assert_eq!(
            kinds,
            [
                EventType::Received,
                EventType::Delivered,
                EventType::Deferred
            ]
        );
        assert!(matches!(&out[2], Change::Lines { id, .. } if id == &b));
        assert_eq!(out[3], set(&b, "z@p.test", Status::Delivered));
        // An address the row does not have is not invented: the update stays.
        assert_eq!(out[4], set(&a, "nobody@p.test", Status::Bounced));
    }

    #[test]
    fn a_move_folds_into_its_row() {
        let a = QueueId::generate();
        let out = fold(vec![
            message(&a, &["x@p.test"]),
            Change::Move {
                id: a.clone(),
                from: &[Status::Queued, Status::Deferred],
                to: Status::Held,
            },
        ]);
        assert_eq!(out.len(), 1);
        let Change::Message(m) = &out[0] else {
            panic!("{out:#?}")
        };
        assert_eq!(m.status, Status::Held);
        assert_eq!(m.recipients[0].1, Status::Held);
    }

    #[test]
    fn lines_are_stored_as_the_api_shows_them() {
        let id = QueueId::generate();
        let Change::Lines { lines, .. } = event(
            &id,
            7,
            EventType::Delivered,
            Some("Bob@P.test"),
            Detail::Result {
                route: Some("eu".into()),
                host: None,
                tls: true,
                reply: "250 Ok [Aj3Q.us32]".into(),
                duration_ms: 12,
            },
        ) else {
            panic!()
        };
        let text = lines_json(&lines);
        let back = parse_lines(&text);
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].at, 7);
        assert_eq!(back[0].kind, "delivered");
        assert_eq!(back[0].recipient.as_deref(), Some("bob@p.test"));
        assert_eq!(back[0].detail["reply"], "250 Ok [Aj3Q.us32]");
        assert_eq!(back[0].detail["host"], Value::Null);
        assert!(!back[0].detail.contains_key("at"));
        // What no relay writes is left out, not a failure.
        assert!(parse_lines("not json").is_empty());
        assert_eq!(
            parse_lines(r#"[{"type":"x"},{"at":1,"type":"held"}]"#).len(),
            1
        );
    }
}
