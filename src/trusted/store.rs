//! The trusted-sender list in SQLite (WAL): one row per external address with its
//! aggregate, one per (internal sender, external recipient) pair, and per-day counts for
//! the learning progress. Usable with the `sqlite3` shell:
//!
//! ```text
//! recipients(address, domain, count, first_seen, last_seen, origin)
//! pairs(sender, recipient, count, first_seen, last_seen)
//! daily(day, added, deliveries)
//! meta(key, value)
//! ```
//! Times are Unix milliseconds.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use super::pg::PgStore;
use super::policy::Observation;
use crate::envelope::Millis;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("trusted-sender database {path}: {source}")]
    Sql {
        path: String,
        source: rusqlite::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Shared(#[from] crate::store::StoreError),
    #[error("trusted-sender store task failed: {0}")]
    Task(String),
}

pub(super) const DAY_MS: Millis = 86_400_000;

/// Migrations, applied in order at open; `PRAGMA user_version` says how many ran.
const MIGRATIONS: &[&str] = &[
    "CREATE TABLE recipients(
        address TEXT PRIMARY KEY,
        domain TEXT NOT NULL,
        count INTEGER NOT NULL,
        first_seen INTEGER NOT NULL,
        last_seen INTEGER NOT NULL,
        origin TEXT NOT NULL DEFAULT 'learned') WITHOUT ROWID;
     CREATE INDEX recipients_domain ON recipients(domain);
     CREATE INDEX recipients_last_seen ON recipients(last_seen);
     CREATE TABLE pairs(
        sender TEXT NOT NULL,
        recipient TEXT NOT NULL,
        count INTEGER NOT NULL,
        first_seen INTEGER NOT NULL,
        last_seen INTEGER NOT NULL,
        PRIMARY KEY(sender, recipient)) WITHOUT ROWID;
     CREATE INDEX pairs_recipient ON pairs(recipient);
     CREATE INDEX pairs_last_seen ON pairs(last_seen);
     CREATE TABLE daily(day INTEGER PRIMARY KEY, added INTEGER NOT NULL, deliveries INTEGER NOT NULL);
     CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);",
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    pub address: String,
    pub domain: String,
    pub count: u64,
    pub first_seen: Millis,
    pub last_seen: Millis,
    /// Internal senders who wrote to this address.
    pub senders: u64,
    /// "learned" from delivered mail or "imported".
    pub origin: String,
}

#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub sender: Option<String>,
    pub domain: Option<String>,
    pub since: Option<Millis>,
    pub min_count: Option<u64>,
    pub limit: usize,
    /// Address after which the page starts (the last address of the previous page).
    pub cursor: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Page {
    pub entries: Vec<Entry>,
    pub next_cursor: Option<String>,
}

impl Page {
    /// `entries` was read with one row more than `limit`: that extra row says whether
    /// a next page exists, and the last kept address is where it starts.
    pub(super) fn cut(mut entries: Vec<Entry>, limit: usize) -> Page {
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

/// The list where it is kept: the node's SQLite file, or the cluster's PostgreSQL.
/// Every call is async; SQLite's run on the blocking pool.
#[derive(Clone)]
pub enum Store {
    Sqlite(Arc<SqliteStore>),
    Postgres(PgStore),
}

impl Store {
    /// The embedded file.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Ok(Store::Sqlite(Arc::new(SqliteStore::open(path)?)))
    }

    async fn blocking<T: Send + 'static>(
        s: &Arc<SqliteStore>,
        f: impl FnOnce(&SqliteStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let s = s.clone();
        tokio::task::spawn_blocking(move || f(&s))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Records a batch; returns how many addresses are new.
    pub async fn record(&self, batch: Arc<Vec<Observation>>) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(s) => Store::blocking(s, move |s| s.record(&batch)).await,
            Store::Postgres(p) => p.record(&batch).await,
        }
    }

    pub async fn prune(&self, retention: Duration, now: Millis) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(s) => Store::blocking(s, move |s| s.prune(retention, now)).await,
            Store::Postgres(p) => p.prune(retention, now).await,
        }
    }

    pub async fn count(&self) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(s) => Store::blocking(s, |s| s.count()).await,
            Store::Postgres(p) => p.count().await,
        }
    }

    pub async fn list(&self, f: Filter) -> Result<Page, StoreError> {
        match self {
            Store::Sqlite(s) => Store::blocking(s, move |s| s.list(&f)).await,
            Store::Postgres(p) => {
                let sender = f.sender.as_deref().and_then(super::policy::normalize);
                if f.sender.is_some() && sender.is_none() {
                    return Err(StoreError::Invalid("sender must be an address".into()));
                }
                let domain = f
                    .domain
                    .as_deref()
                    .and_then(super::policy::normalize_domain);
                p.list(&f, sender, domain).await
            }
        }
    }

    pub async fn stats(&self, now: Millis, learning_days: u32) -> Result<Stats, StoreError> {
        match self {
            Store::Sqlite(s) => Store::blocking(s, move |s| s.stats(now, learning_days)).await,
            Store::Postgres(p) => p.stats(now, learning_days).await,
        }
    }

    pub async fn import(&self, addresses: Vec<String>, now: Millis) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(s) => Store::blocking(s, move |s| s.import(&addresses, now)).await,
            Store::Postgres(p) => p.import(&addresses, now).await,
        }
    }
}

pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let err = |source| StoreError::Sql {
            path: path.display().to_string(),
            source,
        };
        let mut conn = Connection::open(path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        // Each batch commit is durable: a crash loses at most the batch being built.
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(err)?;
        let version: usize = conn
            .pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))
            .map_err(err)? as usize;
        if version > MIGRATIONS.len() {
            return Err(StoreError::Invalid(format!(
                "{} has schema version {version}, newer than this relay knows ({})",
                path.display(),
                MIGRATIONS.len()
            )));
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = conn.transaction().map_err(err)?;
            tx.execute_batch(m).map_err(err)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)
                .map_err(err)?;
            tx.commit().map_err(err)?;
        }
        Ok(SqliteStore {
            path: path.to_owned(),
            conn: Mutex::new(conn),
        })
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        move |source| StoreError::Sql {
            path: self.path.display().to_string(),
            source,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a batch in one transaction; returns how many addresses are new.
    pub fn record(&self, batch: &[Observation]) -> Result<u64, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(self.err())?;
        let mut added = 0u64;
        {
            let mut exists = tx
                .prepare_cached("SELECT 1 FROM recipients WHERE address = ?1")
                .map_err(self.err())?;
            let mut rcpt = tx
                .prepare_cached(
                    "INSERT INTO recipients(address, domain, count, first_seen, last_seen) VALUES(?1, ?2, 1, ?3, ?3)
                     ON CONFLICT(address) DO UPDATE SET count = count + 1,
                        first_seen = MIN(first_seen, excluded.first_seen),
                        last_seen = MAX(last_seen, excluded.last_seen)",
                )
                .map_err(self.err())?;
            let mut pair = tx
                .prepare_cached(
                    "INSERT INTO pairs(sender, recipient, count, first_seen, last_seen) VALUES(?1, ?2, 1, ?3, ?3)
                     ON CONFLICT(sender, recipient) DO UPDATE SET count = count + 1,
                        first_seen = MIN(first_seen, excluded.first_seen),
                        last_seen = MAX(last_seen, excluded.last_seen)",
                )
                .map_err(self.err())?;
            let mut daily = tx
                .prepare_cached(
                    "INSERT INTO daily(day, added, deliveries) VALUES(?1, ?2, 1)
                     ON CONFLICT(day) DO UPDATE SET added = added + excluded.added, deliveries = deliveries + 1",
                )
                .map_err(self.err())?;
            for o in batch {
                let is_new = exists
                    .query_row([&o.recipient], |_| Ok(()))
                    .optional()
                    .map_err(self.err())?
                    .is_none();
                rcpt.execute(params![o.recipient, o.domain, o.at as i64])
                    .map_err(self.err())?;
                pair.execute(params![o.sender, o.recipient, o.at as i64])
                    .map_err(self.err())?;
                daily
                    .execute(params![(o.at / DAY_MS) as i64, is_new as i64])
                    .map_err(self.err())?;
                added += is_new as u64;
            }
            if let Some(first) = batch.iter().map(|o| o.at).min() {
                tx.execute(
                    "INSERT INTO meta(key, value) VALUES('first_delivery', ?1)
                     ON CONFLICT(key) DO UPDATE SET value = MIN(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))",
                    [first.to_string()],
                )
                .map_err(self.err())?;
            }
        }
        tx.commit().map_err(self.err())?;
        Ok(added)
    }

    /// Drops what nothing was delivered to for `retention` before `now`.
    pub fn prune(&self, retention: Duration, now: Millis) -> Result<u64, StoreError> {
        let cutoff = now.saturating_sub(retention.as_millis() as u64) as i64;
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(self.err())?;
        let n = tx
            .execute("DELETE FROM recipients WHERE last_seen < ?1", [cutoff])
            .map_err(self.err())?;
        tx.execute("DELETE FROM pairs WHERE last_seen < ?1", [cutoff])
            .map_err(self.err())?;
        tx.commit().map_err(self.err())?;
        Ok(n as u64)
    }

    pub fn count(&self) -> Result<u64, StoreError> {
        self.lock()
            .query_row("SELECT COUNT(*) FROM recipients", [], |r| {
                r.get::<_, i64>(0)
            })
            .map(|n| n as u64)
            .map_err(self.err())
    }

    /// A page of entries in address order (stable across pages).
    pub fn list(&self, f: &Filter) -> Result<Page, StoreError> {
        let limit = f.limit.clamp(1, 100_000);
        let conn = self.lock();
        let (sql, by_sender) = match &f.sender {
            // Per internal user: the pair's own counts and times.
            Some(_) => (
                "SELECT r.address, r.domain, p.count, p.first_seen, p.last_seen, 1, r.origin
                 FROM pairs p JOIN recipients r ON r.address = p.recipient
                 WHERE p.sender = ?1 AND (?2 IS NULL OR r.domain = ?2) AND (?3 IS NULL OR p.last_seen >= ?3)
                   AND (?4 IS NULL OR p.count >= ?4) AND (?5 IS NULL OR r.address > ?5)
                 ORDER BY r.address LIMIT ?6",
                true,
            ),
            None => (
                "SELECT r.address, r.domain, r.count, r.first_seen, r.last_seen,
                        (SELECT COUNT(*) FROM pairs p WHERE p.recipient = r.address), r.origin
                 FROM recipients r
                 WHERE ?1 IS NULL AND (?2 IS NULL OR r.domain = ?2) AND (?3 IS NULL OR r.last_seen >= ?3)
                   AND (?4 IS NULL OR r.count >= ?4) AND (?5 IS NULL OR r.address > ?5)
                 ORDER BY r.address LIMIT ?6",
                false,
            ),
        };
        let sender = f.sender.as_deref().and_then(super::policy::normalize);
        if by_sender && sender.is_none() {
            return Err(StoreError::Invalid("sender must be an address".into()));
        }
        let domain = f
            .domain
            .as_deref()
            .and_then(super::policy::normalize_domain);
        let mut st = conn.prepare(sql).map_err(self.err())?;
        let rows = st
            .query_map(
                params![
                    sender,
                    domain,
                    f.since.map(|s| s as i64),
                    f.min_count.map(|c| c as i64),
                    f.cursor,
                    (limit + 1) as i64
                ],
                |r| {
                    Ok(Entry {
                        address: r.get(0)?,
                        domain: r.get(1)?,
                        count: r.get::<_, i64>(2)? as u64,
                        first_seen: r.get::<_, i64>(3)? as u64,
                        last_seen: r.get::<_, i64>(4)? as u64,
                        senders: r.get::<_, i64>(5)? as u64,
                        origin: r.get(6)?,
                    })
                },
            )
            .map_err(self.err())?;
        let entries: Vec<Entry> = rows.collect::<Result<_, _>>().map_err(self.err())?;
        Ok(Page::cut(entries, limit))
    }

    pub fn stats(&self, now: Millis, learning_days: u32) -> Result<Stats, StoreError> {
        let conn = self.lock();
        let one = |sql: &str| {
            conn.query_row(sql, [], |r| r.get::<_, i64>(0))
                .map(|n| n as u64)
        };
        let recipients = one("SELECT COUNT(*) FROM recipients").map_err(self.err())?;
        let domains = one("SELECT COUNT(DISTINCT domain) FROM recipients").map_err(self.err())?;
        let pairs = one("SELECT COUNT(*) FROM pairs").map_err(self.err())?;
        let first_delivery: Option<Millis> = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'first_delivery'",
                [],
                |r| r.get::<_, String>(0),
            )
            .optional()
            .map_err(self.err())?
            .and_then(|v| v.parse().ok());
        let days_observed = first_delivery.map_or(0, |f| now.saturating_sub(f) / DAY_MS);
        let mut st = conn
            .prepare("SELECT day, added, deliveries FROM daily ORDER BY day DESC LIMIT 30")
            .map_err(self.err())?;
        let added_per_day = st
            .query_map([], |r| {
                Ok(DayCount {
                    day: day_string(r.get::<_, i64>(0)? as u64),
                    added: r.get::<_, i64>(1)? as u64,
                    deliveries: r.get::<_, i64>(2)? as u64,
                })
            })
            .map_err(self.err())?
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.err())?;
        Ok(Stats {
            recipients,
            domains,
            pairs,
            first_delivery,
            days_observed,
            learning_days,
            ready: days_observed >= u64::from(learning_days),
            added_per_day,
        })
    }

    /// Adds addresses gathered elsewhere; existing entries are left as they are.
    pub fn import(&self, addresses: &[String], now: Millis) -> Result<u64, StoreError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(self.err())?;
        let mut added = 0;
        {
            let mut ins = tx
                .prepare_cached(
                    "INSERT INTO recipients(address, domain, count, first_seen, last_seen, origin)
                     VALUES(?1, ?2, 0, ?3, ?3, 'imported') ON CONFLICT(address) DO NOTHING",
                )
                .map_err(self.err())?;
            for a in addresses {
                let Some(addr) = super::policy::normalize(a) else {
                    continue;
                };
                let domain = crate::envelope::domain_of(&addr).to_string();
                added += ins
                    .execute(params![addr, domain, now as i64])
                    .map_err(self.err())? as u64;
            }
        }
        tx.commit().map_err(self.err())?;
        Ok(added)
    }
}

/// "2026-11-29" for a day number since the epoch.
pub(super) fn day_string(day: u64) -> String {
    let dt = mail_parser::DateTime::from_timestamp((day * 86_400) as i64);
    format!("{:04}-{:02}-{:02}", dt.year, dt.month, dt.day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(name: &str) -> SqliteStore {
        let p = std::env::temp_dir().join(format!(
            "smartrelay-trusted-{name}-{}.sqlite3",
            std::process::id()
        ));
        for ext in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{ext}", p.display()));
        }
        SqliteStore::open(&p).unwrap()
    }

    fn obs(sender: &str, rcpt: &str, at: Millis) -> Observation {
        Observation {
            sender: sender.into(),
            recipient: rcpt.into(),
            domain: crate::envelope::domain_of(rcpt).into(),
            at,
        }
    }

    #[test]
    fn counts_times_and_pairs() {
        let s = store("counts");
        let day = DAY_MS;
        assert_eq!(
            s.record(&[
                obs("a@o.test", "x@p.test", day),
                obs("b@o.test", "x@p.test", 2 * day)
            ])
            .unwrap(),
            1
        );
        assert_eq!(
            s.record(&[
                obs("a@o.test", "x@p.test", 3 * day),
                obs("a@o.test", "y@q.test", 3 * day)
            ])
            .unwrap(),
            1
        );
        let page = s
            .list(&Filter {
                limit: 10,
                ..Filter::default()
            })
            .unwrap();
        let x = &page.entries[0];
        assert_eq!(
            (
                x.address.as_str(),
                x.count,
                x.first_seen,
                x.last_seen,
                x.senders
            ),
            ("x@p.test", 3, day, 3 * day, 2)
        );
        let by_a = s
            .list(&Filter {
                sender: Some("a@O.test".into()),
                limit: 10,
                ..Filter::default()
            })
            .unwrap();
        assert_eq!(
            by_a.entries
                .iter()
                .map(|e| (e.address.as_str(), e.count))
                .collect::<Vec<_>>(),
            [("x@p.test", 2), ("y@q.test", 1)]
        );
        let stats = s.stats(4 * day + 1, 3).unwrap();
        assert_eq!(
            (
                stats.recipients,
                stats.domains,
                stats.pairs,
                stats.days_observed,
                stats.ready
            ),
            (2, 2, 3, 3, true)
        );
        assert!(!s.stats(2 * day, 3).unwrap().ready);
    }

    #[test]
    fn paging_is_stable_and_complete() {
        let s = store("paging");
        let batch: Vec<Observation> = (0..25)
            .map(|i| obs("a@o.test", &format!("r{i:02}@p.test"), 5))
            .collect();
        s.record(&batch).unwrap();
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let page = s
                .list(&Filter {
                    limit: 10,
                    cursor: cursor.clone(),
                    ..Filter::default()
                })
                .unwrap();
            seen.extend(page.entries.iter().map(|e| e.address.clone()));
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(seen.len(), 25);
        assert!(seen.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn expiry_uses_the_given_clock() {
        let s = store("expiry");
        s.record(&[
            obs("a@o.test", "old@p.test", 0),
            obs("a@o.test", "new@p.test", 100 * DAY_MS),
        ])
        .unwrap();
        let retention = Duration::from_millis(120 * DAY_MS);
        assert_eq!(s.prune(retention, 119 * DAY_MS).unwrap(), 0);
        assert_eq!(s.prune(retention, 121 * DAY_MS).unwrap(), 1);
        let left = s
            .list(&Filter {
                limit: 10,
                ..Filter::default()
            })
            .unwrap();
        assert_eq!(left.entries.len(), 1);
        assert_eq!(left.entries[0].address, "new@p.test");
    }

    #[test]
    fn import_keeps_existing() {
        let s = store("import");
        s.record(&[obs("a@o.test", "x@p.test", 5)]).unwrap();
        assert_eq!(
            s.import(&["x@P.test".into(), "new@q.test".into(), "junk".into()], 9)
                .unwrap(),
            1
        );
        let page = s
            .list(&Filter {
                limit: 10,
                ..Filter::default()
            })
            .unwrap();
        assert_eq!(page.entries.len(), 2);
        assert_eq!(page.entries[0].origin, "imported");
        assert_eq!(page.entries[1].count, 1);
    }
}
