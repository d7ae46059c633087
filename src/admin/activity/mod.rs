//! What the relay has seen, for onboarding: source addresses (allowed and refused), the
//! outbound flow in hourly buckets, and the administrator's confirmations. Recorded from
//! the event stream in batches, by a [`Backend`]: the node's SQLite file
//! (`admin.database`, `sqlite`) or the cluster's PostgreSQL (`pg`), where every node's
//! view is the same.

mod pg;
mod sqlite;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::envelope::{now_ms, Millis};
use crate::events::{Event, Outcome, RefusalReason, TenantProof, Unbound};
use crate::store::{Postgres, StoreError};

/// What keeps the state.
pub trait Backend: Send + Sync + 'static {
    /// One batch of events, folded, in one transaction.
    fn write(&self, batch: Arc<Batch>) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The 1,000 sources seen last.
    fn sources(&self) -> impl Future<Output = Result<Vec<Source>, StoreError>> + Send;
    /// Flow counters since `since_hour`, summed per (metric, key); one metric or all.
    fn flow(
        &self,
        since_hour: i64,
        metric: Option<&'static str>,
    ) -> impl Future<Output = Result<Vec<(String, String, u64)>, StoreError>> + Send;
    fn meta(
        &self,
        key: &'static str,
    ) -> impl Future<Output = Result<Option<String>, StoreError>> + Send;
    fn set_meta(
        &self,
        key: &'static str,
        json: String,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Drops flow buckets before `cutoff_hour` and sources not seen since `cutoff`;
    /// returns the rows removed.
    fn prune(
        &self,
        cutoff_hour: i64,
        cutoff: i64,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send;
}

pub struct Activity {
    kept: Kept,
}

enum Kept {
    Sqlite(sqlite::SqliteActivity),
    Postgres(pg::PgActivity),
}

/// Calls the backend in use.
macro_rules! kept {
    ($self:expr, $b:ident => $call:expr) => {
        match &$self.kept {
            Kept::Sqlite($b) => $call.await,
            Kept::Postgres($b) => $call.await,
        }
    };
}

/// A source address as seen on the SMTP port.
#[derive(Debug, Clone, Serialize)]
pub struct Source {
    pub ip: String,
    pub connections: u64,
    pub refused: u64,
    pub messages: u64,
    pub first_seen: Millis,
    pub last_seen: Millis,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Confirmation {
    pub ranges: Vec<String>,
    pub confirmed_at: Millis,
}

/// Flow metric of tenant checks; keys are `range:proof`.
const TENANT_METRIC: &str = "tenant";
/// Flow metric of refusals for want of tenant proof; keys are the reason.
const UNBOUND_METRIC: &str = "tenant_unbound";
const TENANT_REFUSAL_KEY: &str = "tenant_last_refusal";

/// The last message refused for want of tenant proof.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TenantRefusal {
    pub range: String,
    pub ip: String,
    pub sender: String,
    pub at: Millis,
    /// Why (absent in what older relays recorded).
    #[serde(default)]
    pub reason: Option<Unbound>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Count {
    pub key: String,
    pub count: u64,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Breakdown {
    pub key: String,
    pub delivered: u64,
    pub deferred: u64,
    pub bounced: u64,
}

/// The outbound mail flow over a window.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Summary {
    pub window_hours: u64,
    pub since: Millis,
    pub accepted: u64,
    pub delivered: u64,
    pub deferred: u64,
    pub bounced: u64,
    pub refused_connections: u64,
    pub by_source: Vec<Count>,
    pub by_sender_domain: Vec<Count>,
    pub by_route: Vec<Breakdown>,
    pub by_smart_host: Vec<Breakdown>,
    pub spf_outcomes: Vec<Count>,
    pub top_replies: Vec<Count>,
}

impl Activity {
    pub fn open(path: &Path) -> Result<Activity, StoreError> {
        Ok(Activity {
            kept: Kept::Sqlite(sqlite::SqliteActivity::open(path)?),
        })
    }

    /// The cluster's shared database (migrated by the caller).
    pub fn shared(pg: Postgres) -> Activity {
        Activity {
            kept: Kept::Postgres(pg::PgActivity::new(pg)),
        }
    }

    /// Consumes events until the bus closes, writing one transaction per batch. While
    /// the store cannot be written (a PostgreSQL outage) the batches fold into one held
    /// in memory, up to `buffer_limit` rows, written when it answers again; what would
    /// go past the limit is dropped and counted. At the stop, one last try.
    pub async fn record(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<Arc<Event>>,
        mut stop: watch::Receiver<bool>,
        buffer_limit: usize,
    ) {
        let wait = Duration::from_millis(500);
        let mut held = Batch::default();
        let mut retry_at = tokio::time::Instant::now();
        loop {
            let wake = (!held.is_empty()).then_some(retry_at);
            let Some(events) =
                crate::events::next_batch_or_wake(&mut rx, &mut stop, 512, wait, wake).await
            else {
                break;
            };
            let batch = aggregate(&events);
            if held.rows() + batch.rows() > buffer_limit && !held.is_empty() {
                metrics::counter!(crate::telemetry::ACTIVITY_EVENTS_DROPPED_TOTAL)
                    .increment(events.len() as u64);
            } else {
                held.absorb(batch);
            }
            // While the store is down, each try costs up to its connect timeout: the
            // batches fold in between.
            if held.is_empty() || tokio::time::Instant::now() < retry_at {
                metrics::gauge!(crate::telemetry::ACTIVITY_BUFFERED_ROWS).set(held.rows() as f64);
                continue;
            }
            held = self.write_held(held, &mut retry_at).await;
        }
        if !held.is_empty() {
            self.write_held(held, &mut retry_at).await;
        }
    }

    /// Writes `held`; gives it back, with the next try's time set, when the store fails.
    async fn write_held(&self, held: Batch, retry_at: &mut tokio::time::Instant) -> Batch {
        let batch = Arc::new(held);
        let result = kept!(self, b => b.write(batch.clone()));
        let held = Arc::try_unwrap(batch).unwrap_or_else(|shared| (*shared).clone());
        match result {
            Ok(()) => {
                metrics::gauge!(crate::telemetry::ACTIVITY_BUFFERED_ROWS).set(0.0);
                Batch::default()
            }
            Err(e) => {
                tracing::warn!(error = %e, rows = held.rows(), "flow counters and sources held until the store answers");
                metrics::gauge!(crate::telemetry::ACTIVITY_BUFFERED_ROWS).set(held.rows() as f64);
                *retry_at = tokio::time::Instant::now() + Duration::from_secs(2);
                held
            }
        }
    }

    pub async fn sources(&self) -> Result<Vec<Source>, StoreError> {
        kept!(self, b => b.sources())
    }

    pub async fn summary(&self, window: Duration) -> Result<Summary, StoreError> {
        let hours = window.as_secs().div_ceil(3600).max(1);
        let since = now_ms().saturating_sub(window.as_millis() as u64);
        let since_hour = (since / 3_600_000) as i64;
        let rows = kept!(self, b => b.flow(since_hour, None))?;
        Ok(summarize(rows, hours, since))
    }

    pub async fn meta<T: for<'de> Deserialize<'de>>(
        &self,
        key: &'static str,
    ) -> Result<Option<T>, StoreError> {
        let raw = kept!(self, b => b.meta(key))?;
        Ok(raw.and_then(|s| serde_json::from_str(&s).ok()))
    }

    pub async fn set_meta<T: Serialize>(
        &self,
        key: &'static str,
        value: &T,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(value).unwrap_or_else(|_| "null".into());
        kept!(self, b => b.set_meta(key, json))
    }

    /// Tenant checks over the window, as (range, proof label, count).
    pub async fn tenant_checks(
        &self,
        window: Duration,
    ) -> Result<Vec<(String, String, u64)>, StoreError> {
        let since_hour = (now_ms().saturating_sub(window.as_millis() as u64) / 3_600_000) as i64;
        let rows = kept!(self, b => b.flow(since_hour, Some(TENANT_METRIC)))?;
        Ok(rows
            .into_iter()
            .filter_map(|(_, key, n)| {
                let (range, proof) = key.rsplit_once(':')?;
                Some((range.to_string(), proof.to_string(), n))
            })
            .collect())
    }

    /// Refusals for want of tenant proof over the window, by reason.
    pub async fn tenant_refusals(
        &self,
        window: Duration,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let since_hour = (now_ms().saturating_sub(window.as_millis() as u64) / 3_600_000) as i64;
        let rows = kept!(self, b => b.flow(since_hour, Some(UNBOUND_METRIC)))?;
        Ok(rows.into_iter().map(|(_, key, n)| (key, n)).collect())
    }

    pub async fn last_tenant_refusal(&self) -> Result<Option<TenantRefusal>, StoreError> {
        self.meta(TENANT_REFUSAL_KEY).await
    }

    /// Drops what is older than `keep` (`admin.retention`) at `now`: hourly flow
    /// buckets, and sources not seen since (a scanner refused once is not kept for
    /// good). Returns the rows removed.
    pub async fn prune(&self, keep: Duration, now: Millis) -> Result<usize, StoreError> {
        let cutoff_ms = now.saturating_sub(u64::try_from(keep.as_millis()).unwrap_or(u64::MAX));
        let cutoff_hour = (cutoff_ms / 3_600_000) as i64;
        kept!(self, b => b.prune(cutoff_hour, cutoff_ms as i64))
    }
}

/// One batch of events folded into the rows it changes.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    /// ip → (connections, refused, messages, first seen, last seen)
    sources: BTreeMap<String, (i64, i64, i64, i64, i64)>,
    /// (hour, metric, key) → count
    flow: BTreeMap<(i64, &'static str, String), i64>,
    /// The last tenant refusal, as JSON.
    tenant_refusal: Option<String>,
}

impl Batch {
    fn rows(&self) -> usize {
        self.sources.len() + self.flow.len()
    }

    fn is_empty(&self) -> bool {
        self.rows() == 0 && self.tenant_refusal.is_none()
    }

    /// Folds a later batch in: counts add up, first and last sightings widen.
    fn absorb(&mut self, later: Batch) {
        for (ip, (c, r, m, first, last)) in later.sources {
            let e = self.sources.entry(ip).or_insert((0, 0, 0, first, last));
            e.0 += c;
            e.1 += r;
            e.2 += m;
            e.3 = e.3.min(first);
            e.4 = e.4.max(last);
        }
        for (k, n) in later.flow {
            *self.flow.entry(k).or_default() += n;
        }
        if later.tenant_refusal.is_some() {
            self.tenant_refusal = later.tenant_refusal;
        }
    }
}

fn aggregate(events: &[Arc<Event>]) -> Batch {
    let mut b = Batch::default();
    let mut source = |ip: &IpAddr, at: Millis, conns: i64, refs: i64, msgs: i64| {
        let at = at as i64;
        let e = b.sources.entry(ip_key(ip)).or_insert((0, 0, 0, at, at));
        e.0 += conns;
        e.1 += refs;
        e.2 += msgs;
        e.3 = e.3.min(at);
        e.4 = e.4.max(at);
    };
    let mut flow: BTreeMap<(i64, &'static str, String), i64> = BTreeMap::new();
    let mut bump = |at: Millis, metric: &'static str, key: String| {
        *flow
            .entry(((at / 3_600_000) as i64, metric, key))
            .or_default() += 1;
    };
    let mut tenant_refusal = None;
    for ev in events {
        match ev.as_ref() {
            Event::Connection { ip, at, refused } => {
                let (conns, refs) = if refused.is_some() { (0, 1) } else { (1, 0) };
                source(ip, *at, conns, refs, 0);
                if let Some(reason) = refused {
                    bump(*at, "refused", reason_key(*reason).into());
                    bump(*at, "refused_by_source", ip_key(ip));
                }
            }
            Event::Accepted(a) => {
                let at = &a.at;
                source(&a.ip, *at, 0, 0, 1);
                bump(*at, "accepted", String::new());
                bump(*at, "accepted_by_source", ip_key(&a.ip));
                let domain = if a.sender.is_empty() {
                    "<>".to_string()
                } else {
                    a.sender_domain()
                };
                bump(*at, "accepted_by_domain", domain);
            }
            Event::Routed { spf, at, .. } => bump(*at, "spf", spf.label().into()),
            Event::TenantCheck {
                range,
                proof,
                unbound,
                ip,
                sender,
                at,
            } => {
                bump(*at, TENANT_METRIC, format!("{range}:{}", proof.label()));
                if let Some(why) = unbound {
                    bump(*at, UNBOUND_METRIC, why.label().to_string());
                }
                if *proof == TenantProof::None {
                    let last = TenantRefusal {
                        range: range.clone(),
                        ip: ip_key(ip),
                        sender: sender.clone(),
                        at: *at,
                        reason: *unbound,
                    };
                    tenant_refusal = serde_json::to_string(&last).ok();
                }
            }
            Event::Delivery(r) => {
                for res in &r.results {
                    let metric = res.outcome.label();
                    bump(r.at, metric, String::new());
                    let route = r.route.clone().unwrap_or_else(|| "(none)".into());
                    let host = r.host.clone().unwrap_or_else(|| "(none)".into());
                    bump(r.at, route_metric(res.outcome), route);
                    bump(r.at, host_metric(res.outcome), host);
                    bump(r.at, "reply", normalize_reply(&res.reply.to_string()));
                }
            }
            Event::Restricted { limit, at, .. } => bump(*at, "restricted", limit.clone()),
            // Tracking's: flow counts come from connections, acceptances and deliveries.
            Event::Refused(_)
            | Event::Dsn { .. }
            | Event::Held { .. }
            | Event::Released { .. }
            | Event::Removed { .. } => {}
            Event::Lifted { how, at, .. } => bump(*at, "lifted", how.label().into()),
        }
    }
    b.flow = flow;
    b.tenant_refusal = tenant_refusal;
    b
}

fn ip_key(ip: &IpAddr) -> String {
    ip.to_canonical().to_string()
}

fn reason_key(r: RefusalReason) -> &'static str {
    r.label()
}

fn route_metric(o: Outcome) -> &'static str {
    match o {
        Outcome::Delivered => "delivered_by_route",
        Outcome::Deferred => "deferred_by_route",
        Outcome::Bounced => "bounced_by_route",
    }
}

fn host_metric(o: Outcome) -> &'static str {
    match o {
        Outcome::Delivered => "delivered_by_host",
        Outcome::Deferred => "deferred_by_host",
        Outcome::Bounced => "bounced_by_host",
    }
}

/// Replies differ by queue IDs and numbers; what matters is the kind of reply.
pub fn normalize_reply(text: &str) -> String {
    let words: Vec<String> = text
        .split_whitespace()
        .take(8)
        .map(|w| {
            let digits = w.bytes().filter(u8::is_ascii_digit).count();
            if w.len() > 12 || (digits > 0 && digits * 2 >= w.len() && w.len() > 5) {
                "…".to_string()
            } else {
                w.to_string()
            }
        })
        .collect();
    let mut s = words.join(" ");
    s.truncate(80);
    s
}

fn summarize(rows: Vec<(String, String, u64)>, hours: u64, since: Millis) -> Summary {
    let mut s = Summary {
        window_hours: hours,
        since,
        ..Summary::default()
    };
    let mut routes: BTreeMap<String, Breakdown> = BTreeMap::new();
    let mut hosts: BTreeMap<String, Breakdown> = BTreeMap::new();
    for (metric, key, n) in rows {
        match metric.as_str() {
            "accepted" => s.accepted += n,
            "delivered" => s.delivered += n,
            "deferred" => s.deferred += n,
            "bounced" => s.bounced += n,
            "refused" => s.refused_connections += n,
            "accepted_by_source" => s.by_source.push(Count { key, count: n }),
            "accepted_by_domain" => s.by_sender_domain.push(Count { key, count: n }),
            "spf" => s.spf_outcomes.push(Count { key, count: n }),
            "reply" => s.top_replies.push(Count { key, count: n }),
            m => {
                let (map, field) = match m {
                    "delivered_by_route" => (&mut routes, 0),
                    "deferred_by_route" => (&mut routes, 1),
                    "bounced_by_route" => (&mut routes, 2),
                    "delivered_by_host" => (&mut hosts, 0),
                    "deferred_by_host" => (&mut hosts, 1),
                    "bounced_by_host" => (&mut hosts, 2),
                    _ => continue,
                };
                let b = map.entry(key.clone()).or_insert_with(|| Breakdown {
                    key: key.clone(),
                    ..Breakdown::default()
                });
                match field {
                    0 => b.delivered += n,
                    1 => b.deferred += n,
                    _ => b.bounced += n,
                }
            }
        }
    }
    s.by_route = routes.into_values().collect();
    s.by_smart_host = hosts.into_values().collect();
    for list in [
        &mut s.by_source,
        &mut s.by_sender_domain,
        &mut s.top_replies,
        &mut s.spf_outcomes,
    ] {
        list.sort_by(|a, b| b.count.cmp(&a.count).then(a.key.cmp(&b.key)));
        list.truncate(20);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{QueueId, Reply};
    use crate::events::{DeliveryReport, RcptResult};

    /// Runs the recorder over `events` until it has written them all.
    async fn record_all(a: &Arc<Activity>, events: Vec<Arc<Event>>) {
        let (tx, rx) = mpsc::channel(16);
        let (_stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(a.clone().record(rx, stop_rx, 100_000));
        for e in events {
            tx.send(e).await.unwrap();
        }
        drop(tx);
        task.await.unwrap();
    }

    #[test]
    fn replies_lose_their_ids() {
        assert_eq!(
            normalize_reply("250 2.0.0 Ok: queued as 4Fh2Zk1y0Qz8wJ"),
            "250 2.0.0 Ok: queued as …"
        );
        assert_eq!(
            normalize_reply("451 4.7.1 Greylisted, try again in 60 seconds"),
            "451 4.7.1 Greylisted, try again in 60 seconds"
        );
    }

    #[tokio::test]
    async fn flow_is_summarized() {
        let dir = crate::scratch::dir("activity");
        let a = Arc::new(Activity::open(&dir.join("state.sqlite3")).unwrap());
        let now = now_ms();
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let events: Vec<Arc<Event>> = vec![
            Arc::new(Event::Connection {
                ip,
                at: now,
                refused: None,
            }),
            Arc::new(Event::Connection {
                ip: "192.0.2.9".parse().unwrap(),
                at: now,
                refused: Some(RefusalReason::IpNotAllowed),
            }),
            Arc::new(Event::Accepted(Box::new(crate::events::Accepted {
                id: QueueId::generate(),
                ip,
                helo: "c.test".into(),
                tls: None,
                proof: crate::events::TenantProof::Dedicated,
                sender: "a@example.test".into(),
                message_id: None,
                subject: None,
                recipients: vec!["b@x.test".into(), "c@x.test".into()],
                size: 10,
                held: None,
                at: now,
            }))),
            Arc::new(Event::Delivery(DeliveryReport {
                id: QueueId::generate(),
                client: std::net::IpAddr::from([127, 0, 0, 1]),
                tls: false,
                duration_ms: 0,
                expired: false,
                sender: "a@example.test".into(),
                flags: Default::default(),
                generated_dsn: false,
                system: false,
                route: Some("eu".into()),
                host: Some("127.0.0.1:2526".into()),
                at: now,
                results: vec![
                    RcptResult {
                        address: "x@y.test".into(),
                        outcome: Outcome::Delivered,
                        reply: Reply::new(250, "2.0.0", "Ok: queued as ABCDEF0123456"),
                    },
                    RcptResult {
                        address: "z@y.test".into(),
                        outcome: Outcome::Bounced,
                        reply: Reply::new(550, "5.1.1", "unknown"),
                    },
                ],
            })),
        ];
        record_all(&a, events).await;
        let s = a.summary(Duration::from_secs(86_400)).await.unwrap();
        assert_eq!(
            (s.accepted, s.delivered, s.bounced, s.refused_connections),
            (1, 1, 1, 1)
        );
        assert_eq!(s.by_route[0].key, "eu");
        assert_eq!((s.by_route[0].delivered, s.by_route[0].bounced), (1, 1));
        assert_eq!(s.by_source[0].key, "10.1.2.3");
        let sources = a.sources().await.unwrap();
        assert_eq!(sources.len(), 2);
        let refused = sources.iter().find(|s| s.ip == "192.0.2.9").unwrap();
        assert_eq!((refused.refused, refused.connections), (1, 0));
    }

    /// `admin.retention`: rows older than it go, younger ones stay.
    #[tokio::test]
    async fn retention_prunes_old_sources_and_flow() {
        let dir = crate::scratch::dir("activity-retention");
        let a = Arc::new(Activity::open(&dir.join("state.sqlite3")).unwrap());
        let day = 86_400_000u64;
        let now = now_ms();
        let old = now - 40 * day;
        let events: Vec<Arc<Event>> = [("198.51.100.7", old), ("10.1.2.3", now - day)]
            .into_iter()
            .map(|(ip, at)| {
                Arc::new(Event::Connection {
                    ip: ip.parse().unwrap(),
                    at,
                    refused: Some(RefusalReason::IpNotAllowed),
                })
            })
            .collect();
        record_all(&a, events).await;
        assert_eq!(a.sources().await.unwrap().len(), 2);
        let removed = a
            .prune(Duration::from_secs(30 * 86_400), now)
            .await
            .unwrap();
        // The old source and its two flow buckets (refused, refused_by_source).
        assert_eq!(removed, 3);
        let left = a.sources().await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].ip, "10.1.2.3");
        assert_eq!(
            a.prune(Duration::from_secs(30 * 86_400), now)
                .await
                .unwrap(),
            0
        );
    }
}
