//! What the relay has seen, for onboarding: source addresses (allowed and refused), the
//! outbound flow in hourly buckets, and the administrator's confirmations. Recorded from
//! the event stream in batches into SQLite (`admin.database`), or into the cluster's
//! PostgreSQL (`[store] kind = "postgres"`), where every node's view is the same.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::envelope::{now_ms, Millis};
use crate::events::{Event, Outcome, RefusalReason, TenantProof};
use crate::store::{values_list, Postgres, ROWS_PER_STATEMENT as PG_CHUNK};

#[derive(Debug, thiserror::Error)]
pub enum ActivityError {
    #[error("state database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("state database task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Shared(#[from] crate::store::StoreError),
}

impl From<tokio_postgres::Error> for ActivityError {
    fn from(e: tokio_postgres::Error) -> ActivityError {
        ActivityError::Shared(e.into())
    }
}

pub struct Activity {
    backend: Backend,
}

enum Backend {
    Sqlite(Mutex<Connection>),
    Postgres(Postgres),
}

const SCHEMA_VERSION: i64 = 1;

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
const TENANT_REFUSAL_KEY: &str = "tenant_last_refusal";

/// The last message refused for want of tenant proof.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TenantRefusal {
    pub range: String,
    pub ip: String,
    pub sender: String,
    pub at: Millis,
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
    pub fn open(path: &Path) -> Result<Activity, ActivityError> {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // Statistics: a power cut may cost the last second of counts, never mail.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version < 1 {
            conn.execute_batch(
                "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
                 CREATE TABLE IF NOT EXISTS sources(
                    ip TEXT PRIMARY KEY,
                    connections INTEGER NOT NULL DEFAULT 0,
                    refused INTEGER NOT NULL DEFAULT 0,
                    messages INTEGER NOT NULL DEFAULT 0,
                    first_seen INTEGER NOT NULL,
                    last_seen INTEGER NOT NULL);
                 CREATE TABLE IF NOT EXISTS flow(
                    hour INTEGER NOT NULL, metric TEXT NOT NULL, key TEXT NOT NULL,
                    count INTEGER NOT NULL, PRIMARY KEY(hour, metric, key)) WITHOUT ROWID;",
            )?;
            conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        }
        Ok(Activity {
            backend: Backend::Sqlite(Mutex::new(conn)),
        })
    }

    /// The cluster's shared database (migrated by the caller).
    pub fn shared(pg: Postgres) -> Activity {
        Activity {
            backend: Backend::Postgres(pg),
        }
    }

    /// Runs `f` on the SQLite connection on the blocking pool; `pg` on PostgreSQL.
    async fn run<T: Send + 'static, F, Fut>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Connection) -> Result<T, rusqlite::Error> + Send + 'static,
        pg: F,
    ) -> Result<T, ActivityError>
    where
        F: FnOnce(deadpool_postgres::Object) -> Fut,
        Fut: std::future::Future<Output = Result<T, ActivityError>>,
    {
        match &self.backend {
            Backend::Sqlite(_) => {
                let this = self.clone();
                tokio::task::spawn_blocking(move || {
                    let Backend::Sqlite(conn) = &this.backend else {
                        unreachable!("matched above")
                    };
                    let mut conn = conn.lock().unwrap_or_else(|e| e.into_inner());
                    f(&mut conn).map_err(ActivityError::from)
                })
                .await
                .map_err(|e| ActivityError::Task(e.to_string()))?
            }
            Backend::Postgres(p) => pg(p.client().await?).await,
        }
    }

    /// Consumes events until the bus closes, writing one transaction per batch.
    pub async fn record(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<Arc<Event>>,
        mut stop: watch::Receiver<bool>,
    ) {
        let wait = Duration::from_millis(500);
        while let Some(events) = crate::events::next_batch(&mut rx, &mut stop, 512, wait).await {
            let batch = Arc::new(aggregate(&events));
            let for_pg = batch.clone();
            let written = self
                .run(
                    move |c| write_sqlite(c, &batch),
                    |mut c| async move { write_pg(&mut c, &for_pg).await },
                )
                .await;
            if let Err(e) = written {
                tracing::warn!(error = %e, "activity batch not recorded");
            }
        }
    }

    pub async fn sources(self: &Arc<Self>) -> Result<Vec<Source>, ActivityError> {
        const SQL: &str = "SELECT ip, connections, refused, messages, first_seen, last_seen FROM sources ORDER BY last_seen DESC LIMIT 1000";
        self.run(
            |c| {
                let mut st = c.prepare(SQL)?;
                let rows = st.query_map([], |r| {
                    Ok(Source {
                        ip: r.get(0)?,
                        connections: r.get::<_, i64>(1)? as u64,
                        refused: r.get::<_, i64>(2)? as u64,
                        messages: r.get::<_, i64>(3)? as u64,
                        first_seen: r.get::<_, i64>(4)? as u64,
                        last_seen: r.get::<_, i64>(5)? as u64,
                    })
                })?;
                rows.collect()
            },
            |c| async move {
                Ok(c.query(SQL, &[])
                    .await?
                    .iter()
                    .map(|r| Source {
                        ip: r.get(0),
                        connections: r.get::<_, i64>(1) as u64,
                        refused: r.get::<_, i64>(2) as u64,
                        messages: r.get::<_, i64>(3) as u64,
                        first_seen: r.get::<_, i64>(4) as u64,
                        last_seen: r.get::<_, i64>(5) as u64,
                    })
                    .collect())
            },
        )
        .await
    }

    pub async fn summary(self: &Arc<Self>, window: Duration) -> Result<Summary, ActivityError> {
        let hours = window.as_secs().div_ceil(3600).max(1);
        let since = now_ms().saturating_sub(window.as_millis() as u64);
        let since_hour = (since / 3_600_000) as i64;
        let rows: Vec<(String, String, u64)> = self
            .run(
                move |c| {
                    let mut st = c.prepare(
                        "SELECT metric, key, SUM(count) FROM flow WHERE hour >= ?1 GROUP BY metric, key",
                    )?;
                    let rows = st.query_map([since_hour], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
                    })?;
                    rows.collect()
                },
                |c| async move {
                    Ok(c.query(
                        "SELECT metric, key, SUM(count)::BIGINT FROM flow WHERE hour >= $1 GROUP BY metric, key",
                        &[&since_hour],
                    )
                    .await?
                    .iter()
                    .map(|r| (r.get(0), r.get(1), r.get::<_, i64>(2) as u64))
                    .collect())
                },
            )
            .await?;
        Ok(summarize(rows, hours, since))
    }

    pub async fn meta<T: for<'de> Deserialize<'de> + Send + 'static>(
        self: &Arc<Self>,
        key: &'static str,
    ) -> Result<Option<T>, ActivityError> {
        let raw: Option<String> = self
            .run(
                move |c| {
                    c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                        .optional()
                },
                |c| async move {
                    Ok(
                        c.query_opt("SELECT value FROM meta WHERE key = $1", &[&key])
                            .await?
                            .map(|r| r.get(0)),
                    )
                },
            )
            .await?;
        Ok(raw.and_then(|s| serde_json::from_str(&s).ok()))
    }

    pub async fn set_meta<T: Serialize>(
        self: &Arc<Self>,
        key: &'static str,
        value: &T,
    ) -> Result<(), ActivityError> {
        let json = serde_json::to_string(value).unwrap_or_else(|_| "null".into());
        let for_pg = json.clone();
        self.run(
            move |c| {
                c.execute(
                    "INSERT INTO meta(key, value) VALUES(?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    params![key, json],
                )
                .map(|_| ())
            },
            |c| async move {
                c.execute(
                    "INSERT INTO meta(key, value) VALUES($1, $2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    &[&key, &for_pg],
                )
                .await?;
                Ok(())
            },
        )
        .await
    }

    /// Tenant checks over the window, as (range, proof label, count).
    pub async fn tenant_checks(
        self: &Arc<Self>,
        window: Duration,
    ) -> Result<Vec<(String, String, u64)>, ActivityError> {
        let since_hour = (now_ms().saturating_sub(window.as_millis() as u64) / 3_600_000) as i64;
        let rows: Vec<(String, u64)> = self
            .run(
                move |c| {
                    let mut st = c.prepare(
                        "SELECT key, SUM(count) FROM flow WHERE hour >= ?1 AND metric = ?2 GROUP BY key",
                    )?;
                    let rows = st.query_map(params![since_hour, TENANT_METRIC], |r| {
                        Ok((r.get(0)?, r.get::<_, i64>(1)? as u64))
                    })?;
                    rows.collect()
                },
                |c| async move {
                    Ok(c.query(
                        "SELECT key, SUM(count)::BIGINT FROM flow WHERE hour >= $1 AND metric = $2 GROUP BY key",
                        &[&since_hour, &TENANT_METRIC],
                    )
                    .await?
                    .iter()
                    .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
                    .collect())
                },
            )
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(key, n)| {
                let (range, proof) = key.rsplit_once(':')?;
                Some((range.to_string(), proof.to_string(), n))
            })
            .collect())
    }

    pub async fn last_tenant_refusal(
        self: &Arc<Self>,
    ) -> Result<Option<TenantRefusal>, ActivityError> {
        self.meta(TENANT_REFUSAL_KEY).await
    }

    /// Drops what is older than `keep` (`admin.retention`) at `now`: hourly flow
    /// buckets, and sources not seen since (a scanner refused once is not kept for
    /// good). Returns the rows removed.
    pub async fn prune(
        self: &Arc<Self>,
        keep: Duration,
        now: Millis,
    ) -> Result<usize, ActivityError> {
        let cutoff_ms = now.saturating_sub(u64::try_from(keep.as_millis()).unwrap_or(u64::MAX));
        let cutoff_hour = (cutoff_ms / 3_600_000) as i64;
        let cutoff = cutoff_ms as i64;
        self.run(
            move |c| {
                let flow = c.execute("DELETE FROM flow WHERE hour < ?1", [cutoff_hour])?;
                let sources = c.execute("DELETE FROM sources WHERE last_seen < ?1", [cutoff])?;
                Ok(flow + sources)
            },
            |c| async move {
                let flow = c
                    .execute("DELETE FROM flow WHERE hour < $1", &[&cutoff_hour])
                    .await?;
                let sources = c
                    .execute("DELETE FROM sources WHERE last_seen < $1", &[&cutoff])
                    .await?;
                Ok((flow + sources) as usize)
            },
        )
        .await
    }
}

/// One batch of events folded into the rows it changes.
#[derive(Debug, Default)]
struct Batch {
    /// ip → (connections, refused, messages, first seen, last seen)
    sources: BTreeMap<String, (i64, i64, i64, i64, i64)>,
    /// (hour, metric, key) → count
    flow: BTreeMap<(i64, &'static str, String), i64>,
    /// The last tenant refusal, as JSON.
    tenant_refusal: Option<String>,
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
            Event::Accepted {
                ip,
                sender_domain,
                at,
                ..
            } => {
                source(ip, *at, 0, 0, 1);
                bump(*at, "accepted", String::new());
                bump(*at, "accepted_by_source", ip_key(ip));
                let domain = if sender_domain.is_empty() {
                    "<>".to_string()
                } else {
                    sender_domain.clone()
                };
                bump(*at, "accepted_by_domain", domain);
            }
            Event::Routed { spf, at, .. } => bump(*at, "spf", spf.label().into()),
            Event::TenantCheck {
                range,
                proof,
                ip,
                sender,
                at,
            } => {
                bump(*at, TENANT_METRIC, format!("{range}:{}", proof.label()));
                if *proof == TenantProof::None {
                    let last = TenantRefusal {
                        range: range.clone(),
                        ip: ip_key(ip),
                        sender: sender.clone(),
                        at: *at,
                    };
                    tenant_refusal = serde_json::to_string(&last).ok();
                }
            }
            Event::Delivery(r) => {
                for res in &r.results {
                    let metric = res.outcome.label();
                    bump(r.at, metric, String::new());
                    let route = if r.route.is_empty() {
                        "(none)".to_string()
                    } else {
                        r.route.clone()
                    };
                    let host = if r.host.is_empty() {
                        "(none)".to_string()
                    } else {
                        r.host.clone()
                    };
                    bump(r.at, route_metric(res.outcome), route);
                    bump(r.at, host_metric(res.outcome), host);
                    bump(r.at, "reply", normalize_reply(&res.reply.to_string()));
                }
            }
        }
    }
    b.flow = flow;
    b.tenant_refusal = tenant_refusal;
    b
}

fn write_sqlite(c: &mut Connection, b: &Batch) -> Result<(), rusqlite::Error> {
    let tx = c.transaction()?;
    {
        let mut flow = tx.prepare_cached(
            "INSERT INTO flow(hour, metric, key, count) VALUES(?1, ?2, ?3, ?4)
             ON CONFLICT(hour, metric, key) DO UPDATE SET count = count + excluded.count",
        )?;
        let mut src = tx.prepare_cached(
            "INSERT INTO sources(ip, connections, refused, messages, first_seen, last_seen) VALUES(?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(ip) DO UPDATE SET connections = connections + excluded.connections,
                refused = refused + excluded.refused, messages = messages + excluded.messages,
                first_seen = MIN(first_seen, excluded.first_seen),
                last_seen = MAX(last_seen, excluded.last_seen)",
        )?;
        for (ip, (conns, refs, msgs, first, last)) in &b.sources {
            src.execute(params![ip, conns, refs, msgs, first, last])?;
        }
        for ((hour, metric, key), n) in &b.flow {
            flow.execute(params![hour, metric, key, n])?;
        }
        if let Some(json) = &b.tenant_refusal {
            tx.execute(
                "INSERT INTO meta(key, value) VALUES(?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![TENANT_REFUSAL_KEY, json],
            )?;
        }
    }
    tx.commit()
}

/// Multi-row upserts that add counts, so nodes writing at once never conflict.
async fn write_pg(c: &mut deadpool_postgres::Object, b: &Batch) -> Result<(), ActivityError> {
    use tokio_postgres::types::ToSql;
    let tx = c.transaction().await?;
    let sources: Vec<_> = b.sources.iter().collect();
    for chunk in sources.chunks(PG_CHUNK) {
        let mut sql = format!(
            "INSERT INTO sources(ip, connections, refused, messages, first_seen, last_seen) VALUES {}",
            values_list(chunk.len(), 6)
        );
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
        for (ip, (conns, refs, msgs, first, last)) in chunk {
            params.extend([*ip as &(dyn ToSql + Sync), conns, refs, msgs, first, last]);
        }
        sql.push_str(
            " ON CONFLICT(ip) DO UPDATE SET connections = sources.connections + excluded.connections,
               refused = sources.refused + excluded.refused, messages = sources.messages + excluded.messages,
               first_seen = LEAST(sources.first_seen, excluded.first_seen),
               last_seen = GREATEST(sources.last_seen, excluded.last_seen)",
        );
        tx.execute(&sql, &params).await?;
    }
    let flow: Vec<_> = b.flow.iter().collect();
    for chunk in flow.chunks(PG_CHUNK) {
        let mut sql = format!(
            "INSERT INTO flow(hour, metric, key, count) VALUES {}",
            values_list(chunk.len(), 4)
        );
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
        for ((hour, metric, key), n) in chunk {
            params.extend([hour as &(dyn ToSql + Sync), metric, key, *n]);
        }
        sql.push_str(
            " ON CONFLICT(hour, metric, key) DO UPDATE SET count = flow.count + excluded.count",
        );
        tx.execute(&sql, &params).await?;
    }
    if let Some(json) = &b.tenant_refusal {
        tx.execute(
            "INSERT INTO meta(key, value) VALUES($1, $2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            &[&TENANT_REFUSAL_KEY, json],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
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
        let task = tokio::spawn(a.clone().record(rx, stop_rx));
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
        let dir = std::env::temp_dir().join(format!("smartrelay-activity-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
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
            Arc::new(Event::Accepted {
                id: QueueId::generate(),
                ip,
                sender_domain: "example.test".into(),
                recipients: 2,
                size: 10,
                at: now,
            }),
            Arc::new(Event::Delivery(DeliveryReport {
                id: QueueId::generate(),
                sender: "a@example.test".into(),
                flags: Default::default(),
                generated_dsn: false,
                system: false,
                route: "eu".into(),
                host: "127.0.0.1:2526".into(),
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
        let dir = std::env::temp_dir().join(format!("smartrelay-retention-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
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
