//! What happened to connections and messages, published in-process for the consumers
//! that keep records: the trusted-sender list and the flow summary. Stages publish; they
//! never know who listens.

use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::envelope::{
    domain_of, ContentFlags, HoldReason, LimitKey, Millis, QueueId, Reply, Settle,
};

/// Why a connection was turned away before its first command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalReason {
    IpNotAllowed,
    Limit,
    /// Possibly a shared platform's address, but its `ranges_from_spf` list has never
    /// been resolved: refused for now (421), not for good.
    SharedRangesUnresolved,
}

impl RefusalReason {
    pub fn label(self) -> &'static str {
        match self {
            RefusalReason::IpNotAllowed => "ip_not_allowed",
            RefusalReason::Limit => "limit",
            RefusalReason::SharedRangesUnresolved => "shared_ranges_unresolved",
        }
    }
}

/// How the sender's SPF record decided the route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SpfOutcome {
    /// The record includes a region's (or the global) gateway include.
    Authorized,
    /// No gateway include, or no record at all.
    Unauthorized,
    /// The lookup failed; a cached or default answer was used.
    DnsError,
    /// Not looked up: null sender, SPF-aware routing off, or the internal route.
    NotChecked,
}

impl SpfOutcome {
    pub fn label(self) -> &'static str {
        match self {
            SpfOutcome::Authorized => "authorized",
            SpfOutcome::Unauthorized => "unauthorized",
            SpfOutcome::DnsError => "dns_error",
            SpfOutcome::NotChecked => "not_checked",
        }
    }
}

/// What proved that a message from a shared platform is the organization's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TenantProof {
    /// From the organization's own ranges: nothing more to prove.
    Dedicated,
    Dkim,
    TenantId,
    Header,
    /// Nothing did: the message was refused.
    None,
}

impl TenantProof {
    pub fn label(self) -> &'static str {
        match self {
            TenantProof::Dedicated => "dedicated",
            TenantProof::Dkim => "dkim",
            TenantProof::TenantId => "tenant_id",
            TenantProof::Header => "header",
            TenantProof::None => "none",
        }
    }
}

/// Why a message from a shared range proved nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unbound {
    /// No route header, tenant id or DKIM signature of the organization's.
    NoProof,
    /// An `X-MS-Exchange-CrossTenant-Id` of another tenant.
    OtherTenant,
    /// Its DKIM signature was made longer ago than `dkim_replay.max_age`.
    Stale,
    /// Its DKIM signature already proved a message for other recipients.
    Replayed,
    /// More than one From, Sender, Reply-To, To, Cc, Subject, Date or Message-ID.
    DuplicateHeader,
    /// The signature's `d=` is not the `From:` address's domain (or a parent).
    Unaligned,
}

impl Unbound {
    pub fn label(self) -> &'static str {
        match self {
            Unbound::NoProof => "no_proof",
            Unbound::OtherTenant => "other_tenant",
            Unbound::Stale => "stale",
            Unbound::Replayed => "replayed",
            Unbound::DuplicateHeader => "duplicate_header",
            Unbound::Unaligned => "unaligned",
        }
    }

    /// One of the rules against replayed signatures and forged headers (counted in
    /// `smartrelay_dkim_replay_refusals_total`), rather than plain missing proof.
    pub fn is_replay_rule(self) -> bool {
        self != Unbound::NoProof
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Delivered,
    Deferred,
    Bounced,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Deferred => "deferred",
            Outcome::Bounced => "bounced",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RcptResult {
    pub address: String,
    pub outcome: Outcome,
    pub reply: Reply,
}

/// The result of one attempt to hand a group of recipients to one route.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryReport {
    pub id: QueueId,
    /// Empty for the null sender.
    pub sender: String,
    pub flags: ContentFlags,
    pub generated_dsn: bool,
    /// The relay's own mail (see `Envelope::system`).
    pub system: bool,
    /// Where the message came from (the limits count bounces by client too).
    pub client: IpAddr,
    /// The upstream session was encrypted.
    pub tls: bool,
    /// How long the attempt took, connection included.
    pub duration_ms: u64,
    /// Given up on at `queue.max_age` (the results say bounced), not tried.
    pub expired: bool,
    /// `None` when no route was taken (SPF refused the smart hosts, or the message
    /// expired).
    pub route: Option<String>,
    /// The upstream that gave the replies (host:port); `None` when none was reached.
    pub host: Option<String>,
    pub at: Millis,
    pub results: Vec<RcptResult>,
}

/// What tracking keeps of a message taken into the queue.
#[derive(Debug, Clone, Serialize)]
pub struct Accepted {
    pub id: QueueId,
    pub ip: IpAddr,
    pub helo: String,
    /// The TLS version of the client's session, when it had one.
    pub tls: Option<String>,
    pub proof: TenantProof,
    /// Empty for `<>`.
    pub sender: String,
    pub message_id: Option<String>,
    /// Only with `tracking.subjects`.
    pub subject: Option<String>,
    pub recipients: Vec<String>,
    pub size: u64,
    /// Held at intake (a limit).
    pub held: Option<HoldReason>,
    pub at: Millis,
}

impl Accepted {
    pub fn sender_domain(&self) -> String {
        if self.sender.is_empty() {
            String::new()
        } else {
            domain_of(&self.sender).to_ascii_lowercase()
        }
    }
}

/// A message refused after its content was read. Its id has the queue-id form though
/// it was never queued.
#[derive(Debug, Clone, Serialize)]
pub struct RefusedMessage {
    pub id: QueueId,
    pub ip: IpAddr,
    pub helo: String,
    pub tls: Option<String>,
    pub sender: String,
    pub message_id: Option<String>,
    pub subject: Option<String>,
    pub recipients: Vec<String>,
    pub size: u64,
    pub reply: Reply,
    pub at: Millis,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Connection {
        ip: IpAddr,
        at: Millis,
        refused: Option<RefusalReason>,
    },
    /// A message on disk (the client has its 250).
    Accepted(Box<Accepted>),
    /// A message refused after its content was read (tenant proof, replay, size, a
    /// loop): never queued, but tracked.
    Refused(Box<RefusedMessage>),
    Routed {
        id: QueueId,
        route: String,
        spf: SpfOutcome,
        at: Millis,
    },
    Delivery(DeliveryReport),
    /// A message from a shared range was checked for tenant proof.
    TenantCheck {
        /// The `access.shared_ranges` entry's name.
        range: String,
        proof: TenantProof,
        /// Why there was no proof, when there was none.
        unbound: Option<Unbound>,
        ip: IpAddr,
        /// Envelope sender, empty for `<>`.
        sender: String,
        at: Millis,
    },
    /// A DSN of ours about message `id` was queued as `dsn_id`.
    Dsn {
        id: QueueId,
        dsn_id: QueueId,
        /// `failed`, `delayed` or `delivered`.
        action: &'static str,
        at: Millis,
    },
    /// An operator or a limit held a queued message (one held at intake says so in
    /// its `Accepted`).
    Held {
        id: QueueId,
        reason: HoldReason,
        at: Millis,
    },
    Released {
        id: QueueId,
        at: Millis,
    },
    /// Removed without delivery: by an operator, or a limit's discard.
    Removed {
        id: QueueId,
        at: Millis,
    },
    /// A limit restricted a key value: its later mail is held. What it taught the
    /// trusted list since `window_start` is suspect.
    Restricted {
        key: LimitKey,
        value: String,
        limit: String,
        window_start: Millis,
        at: Millis,
    },
    /// An administrator released or discarded a restricted key value's mail.
    Lifted {
        key: LimitKey,
        value: String,
        how: Settle,
        at: Millis,
    },
}

/// What an event is about, for subscribing to some kinds only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Connection,
    Accepted,
    Routed,
    Delivery,
    TenantCheck,
    /// `Restricted` and `Lifted`.
    Restriction,
    Refused,
    /// What happened to a queued message besides delivery: `Dsn`, `Held`, `Released`,
    /// `Removed`.
    Lifecycle,
}

impl EventKind {
    pub const ALL: &'static [EventKind] = &[
        EventKind::Connection,
        EventKind::Accepted,
        EventKind::Routed,
        EventKind::Delivery,
        EventKind::TenantCheck,
        EventKind::Restriction,
        EventKind::Refused,
        EventKind::Lifecycle,
    ];
}

impl Event {
    pub fn kind(&self) -> EventKind {
        match self {
            Event::Connection { .. } => EventKind::Connection,
            Event::Accepted(_) => EventKind::Accepted,
            Event::Refused(_) => EventKind::Refused,
            Event::Dsn { .. }
            | Event::Held { .. }
            | Event::Released { .. }
            | Event::Removed { .. } => EventKind::Lifecycle,
            Event::Routed { .. } => EventKind::Routed,
            Event::Delivery(_) => EventKind::Delivery,
            Event::TenantCheck { .. } => EventKind::TenantCheck,
            Event::Restricted { .. } | Event::Lifted { .. } => EventKind::Restriction,
        }
    }
}

/// Fan-out to a fixed set of subscribers, each with its own bounded queue and the
/// kinds of event it takes.
#[derive(Clone, Default)]
pub struct EventBus {
    subscribers: Vec<Subscriber>,
}

#[derive(Clone)]
struct Subscriber {
    tx: mpsc::Sender<Arc<Event>>,
    /// A lossless subscriber slows publishers of its kinds down when it falls behind
    /// instead of missing events (the trusted list must see every delivery); so the
    /// kinds it takes are kept to what it needs, and ingress never waits on it.
    lossless: bool,
    kinds: &'static [EventKind],
}

impl EventBus {
    pub fn new() -> EventBus {
        EventBus::default()
    }

    pub fn subscribe(
        &mut self,
        capacity: usize,
        lossless: bool,
        kinds: &'static [EventKind],
    ) -> mpsc::Receiver<Arc<Event>> {
        let (tx, rx) = mpsc::channel(capacity);
        self.subscribers.push(Subscriber {
            tx,
            lossless,
            kinds,
        });
        rx
    }

    /// Whether anyone waits on events of this kind when it falls behind.
    pub fn blocks_on(&self, kind: EventKind) -> bool {
        self.subscribers
            .iter()
            .any(|s| s.lossless && s.kinds.contains(&kind))
    }

    /// Publishes without ever waiting: for high-volume events (connections) that must
    /// not slow the accept loop. A full queue drops the event, even for a lossless
    /// subscriber; use [`EventBus::publish`] for what must arrive.
    pub fn publish_now(&self, event: Event) {
        if self.subscribers.is_empty() {
            return;
        }
        let kind = event.kind();
        let event = Arc::new(event);
        for s in self.subscribers.iter().filter(|s| s.kinds.contains(&kind)) {
            if let Err(mpsc::error::TrySendError::Full(_)) = s.tx.try_send(event.clone()) {
                metrics::counter!(crate::telemetry::EVENTS_DROPPED_TOTAL).increment(1);
            }
        }
    }

    pub async fn publish(&self, event: Event) {
        if self.subscribers.is_empty() {
            return;
        }
        let kind = event.kind();
        let event = Arc::new(event);
        for s in self.subscribers.iter().filter(|s| s.kinds.contains(&kind)) {
            match s.tx.try_send(event.clone()) {
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
                Err(mpsc::error::TrySendError::Full(ev)) => {
                    if s.lossless {
                        let _ = s.tx.send(ev).await;
                    } else {
                        metrics::counter!(crate::telemetry::EVENTS_DROPPED_TOTAL).increment(1);
                    }
                }
            }
        }
    }
}

/// Waits for the next event, then takes what else arrives within `wait`, up to `max`.
/// `None` when the bus is closed or `stop` fires and nothing is left; on stop, what is
/// already queued is still returned, so a consumer can write it before it ends.
pub async fn next_batch(
    rx: &mut mpsc::Receiver<Arc<Event>>,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    max: usize,
    wait: std::time::Duration,
) -> Option<Vec<Arc<Event>>> {
    next_batch_or_wake(rx, stop, max, wait, None).await
}

/// As [`next_batch`], but an empty batch comes back at `wake` when no event arrived
/// by then (a recorder with work of its own to retry).
pub async fn next_batch_or_wake(
    rx: &mut mpsc::Receiver<Arc<Event>>,
    stop: &mut tokio::sync::watch::Receiver<bool>,
    max: usize,
    wait: std::time::Duration,
    wake: Option<tokio::time::Instant>,
) -> Option<Vec<Arc<Event>>> {
    let mut batch = Vec::new();
    let woken = async {
        match wake {
            Some(t) => tokio::time::sleep_until(t).await,
            None => std::future::pending().await,
        }
    };
    let first = if *stop.borrow() {
        None
    } else {
        tokio::select! {
            ev = rx.recv() => ev,
            _ = stop.changed() => None,
            _ = woken => return Some(batch),
        }
    };
    let Some(first) = first else {
        while let Ok(ev) = rx.try_recv() {
            batch.push(ev);
        }
        return (!batch.is_empty()).then_some(batch);
    };
    batch.push(first);
    let deadline = tokio::time::Instant::now() + wait;
    while batch.len() < max {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(ev)) => batch.push(ev),
            Ok(None) | Err(_) => break,
        }
    }
    Some(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lossless_subscriber_sees_everything_lossy_may_not() {
        let mut bus = EventBus::new();
        let mut lossless = bus.subscribe(1, true, EventKind::ALL);
        let mut lossy = bus.subscribe(1, false, EventKind::ALL);
        let reader = tokio::spawn(async move {
            let mut n = 0;
            while lossless.recv().await.is_some() {
                n += 1;
            }
            n
        });
        for _ in 0..10 {
            bus.publish(Event::Connection {
                ip: "127.0.0.1".parse().unwrap(),
                at: 0,
                refused: None,
            })
            .await;
        }
        drop(bus);
        assert_eq!(reader.await.unwrap(), 10);
        let mut m = 0;
        while lossy.try_recv().is_ok() {
            m += 1;
        }
        assert_eq!(m, 1);
    }

    /// A lossless subscriber of deliveries never holds up an accepted message: its
    /// queue is full, and publishing an accept still returns at once.
    #[tokio::test]
    async fn subscribers_get_only_their_kinds() {
        let mut bus = EventBus::new();
        let mut deliveries = bus.subscribe(1, true, &[EventKind::Delivery]);
        let mut all = bus.subscribe(16, false, EventKind::ALL);
        assert!(bus.blocks_on(EventKind::Delivery));
        assert!(!bus.blocks_on(EventKind::Accepted));
        let delivery = || {
            Event::Delivery(DeliveryReport {
                id: QueueId::generate(),
                client: std::net::IpAddr::from([127, 0, 0, 1]),
                tls: false,
                duration_ms: 0,
                expired: false,
                sender: String::new(),
                flags: ContentFlags::default(),
                generated_dsn: false,
                system: false,
                route: None,
                host: None,
                at: 0,
                results: Vec::new(),
            })
        };
        bus.publish(delivery()).await;
        let accepted = Event::Connection {
            ip: "127.0.0.1".parse().unwrap(),
            at: 0,
            refused: None,
        };
        // `deliveries` is full; this would wait forever if it were offered to it.
        tokio::time::timeout(std::time::Duration::from_secs(5), bus.publish(accepted))
            .await
            .expect("publishing a kind nobody lossless takes never waits");
        assert_eq!(
            deliveries.recv().await.map(|e| e.kind()),
            Some(EventKind::Delivery)
        );
        assert!(deliveries.try_recv().is_err());
        assert_eq!(
            all.recv().await.map(|e| e.kind()),
            Some(EventKind::Delivery)
        );
        assert_eq!(
            all.recv().await.map(|e| e.kind()),
            Some(EventKind::Connection)
        );
    }

    #[tokio::test]
    async fn batches_end_with_what_was_queued_at_stop() {
        let (tx, mut rx) = mpsc::channel(16);
        let (stop_tx, mut stop) = tokio::sync::watch::channel(false);
        let ev = || {
            Arc::new(Event::Connection {
                ip: "127.0.0.1".parse().unwrap(),
                at: 0,
                refused: None,
            })
        };
        for _ in 0..3 {
            tx.send(ev()).await.unwrap();
        }
        let b = next_batch(&mut rx, &mut stop, 2, std::time::Duration::from_millis(10)).await;
        assert_eq!(b.map(|b| b.len()), Some(2), "capped at max");
        stop_tx.send(true).unwrap();
        let b = next_batch(&mut rx, &mut stop, 2, std::time::Duration::from_millis(10)).await;
        assert_eq!(
            b.map(|b| b.len()),
            Some(1),
            "what was queued is still handed out"
        );
        assert!(
            next_batch(&mut rx, &mut stop, 2, std::time::Duration::from_millis(10))
                .await
                .is_none()
        );
    }
}
