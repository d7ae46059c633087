//! Tracking in its own SQLite file (`tracking.database`).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use rusqlite::{params, params_from_iter, Connection, OptionalExtension};

use super::model::{
    lines_json, parse_lines, summarize, Change, Query, RecipientStatus, Record, Rows, Status,
    Summary,
};
use super::sql::{self, Param};
use crate::envelope::Millis;
use crate::store::schema;
use crate::store::sqlite::Db;
use crate::store::StoreError;

pub struct SqliteTracking {
    db: Arc<Db>,
    /// To the writer thread: it ends when this is dropped.
    writes: std::sync::mpsc::Sender<Write>,
}

/// A batch for the writer, and where its result goes.
struct Write {
    batch: Arc<Vec<Change>>,
    answer: tokio::sync::oneshot::Sender<Result<u64, StoreError>>,
}

/// How much the writer yields the CPU (a nice value, added to the process's).
const WRITER_NICENESS: libc::c_int = 10;

/// WAL pages between checkpoints (SQLite's default is 1,000). Tracking writes about
/// 2 KB a message, so at the default a busy relay checkpointed several times a second,
/// and each checkpoint's fsync queued on the same disk as the spool's fdatasync that
/// every `250` waits for. At 16,384 (64 MiB of WAL) it is every few seconds.
const CHECKPOINT_PAGES: i64 = 16_384;

impl SqliteTracking {
    pub fn open(path: &Path) -> Result<SqliteTracking, StoreError> {
        let db = Db::open(path, &[&schema::TRACKING], false)?;
        db.lock()
            .pragma_update(None, "wal_autocheckpoint", CHECKPOINT_PAGES)
            .map_err(|e| StoreError::sqlite(path, e))?;
        let db = Arc::new(db);
        let writer = db.clone();
        let writes = crate::store::sqlite::writer("tracking", move |queue| serve(&writer, &queue))?;
        Ok(SqliteTracking { db, writes })
    }
}

/// The writer: batches in arrival order, on a thread that yields the CPU to the
/// sessions and deliveries. On a saturated node the relay's own threads come first and
/// tracking catches up when they idle: meanwhile its events wait on the bus, and past
/// the bus's bound the deliveries publishing them wait (tracking loses no line). A node
/// with CPU to spare sees no difference.
fn serve(db: &Db, queue: &std::sync::mpsc::Receiver<Write>) {
    yield_cpu();
    while let Ok(w) = queue.recv() {
        let done = apply(&mut db.lock(), &w.batch).map_err(|e| StoreError::sqlite(db.path(), e));
        let _ = w.answer.send(done);
    }
}

/// Lowers this thread's priority. Linux's nice value is per thread, so the relay's
/// other threads keep theirs. A failure leaves the thread as it was: it costs speed
/// under load, never a record.
fn yield_cpu() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain system calls on this thread's own id, no memory involved.
        // (Reading its own thread's priority cannot fail.)
        let (tid, current) = unsafe {
            let tid = libc::gettid();
            (
                tid,
                libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t),
            )
        };
        // SAFETY: as above.
        let r = unsafe {
            libc::setpriority(
                libc::PRIO_PROCESS,
                tid as libc::id_t,
                current.saturating_add(WRITER_NICENESS).min(19),
            )
        };
        if r != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "tracking writer keeps its priority");
        }
    }
}

impl rusqlite::ToSql for Param {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        match self {
            Param::Text(t) => t.to_sql(),
            Param::Int(i) => i.to_sql(),
        }
    }
}

fn status_of(text: &str) -> Status {
    Status::parse(text).unwrap_or(Status::Queued)
}

fn apply(c: &mut Connection, batch: &[Change]) -> rusqlite::Result<u64> {
    let tx = c.transaction()?;
    let mut touched = BTreeSet::new();
    {
        let mut msg = tx.prepare_cached(
            "INSERT OR IGNORE INTO tracked_messages(queue_id, node, received_at, client, helo, tls,
                proof, sender, message_id, size, subject, status)
             VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        )?;
        let mut rcpt = tx.prepare_cached(
            "INSERT OR IGNORE INTO tracked_recipients(queue_id, address, status) VALUES(?1, ?2, ?3)",
        )?;
        let mut ev =
            tx.prepare_cached("INSERT INTO tracked_lines(queue_id, at, lines) VALUES(?1, ?2, ?3)")?;
        let mut set = tx.prepare_cached(
            "UPDATE tracked_recipients SET status = ?3 WHERE queue_id = ?1 AND address = ?2",
        )?;
        for change in batch {
            match change {
                Change::Message(m) => {
                    msg.execute(params![
                        m.id.as_str(),
                        m.node,
                        m.received_at as i64,
                        m.client,
                        m.helo,
                        m.tls,
                        m.proof,
                        m.sender.to_ascii_lowercase(),
                        m.message_id,
                        m.size as i64,
                        m.subject,
                        m.status.label()
                    ])?;
                    for (r, status) in &m.recipients {
                        rcpt.execute(params![
                            m.id.as_str(),
                            r.to_ascii_lowercase(),
                            status.label()
                        ])?;
                    }
                }
                Change::Lines { id, lines } => {
                    let at = lines.first().map_or(0, |l| l.at);
                    ev.execute(params![id.as_str(), at as i64, lines_json(lines)])?;
                }
                Change::Recipient {
                    id,
                    address,
                    status,
                } => {
                    set.execute(params![
                        id.as_str(),
                        address.to_ascii_lowercase(),
                        status.label()
                    ])?;
                    touched.insert(id.as_str().to_string());
                }
                Change::Move { id, from, to } => {
                    for f in from.iter() {
                        tx.execute(
                            "UPDATE tracked_recipients SET status = ?3 WHERE queue_id = ?1 AND status = ?2",
                            params![id.as_str(), f.label(), to.label()],
                        )?;
                    }
                    touched.insert(id.as_str().to_string());
                }
            }
        }
        let mut statuses =
            tx.prepare_cached("SELECT status FROM tracked_recipients WHERE queue_id = ?1")?;
        let mut sum =
            tx.prepare_cached("UPDATE tracked_messages SET status = ?2 WHERE queue_id = ?1")?;
        for id in &touched {
            let all: Vec<Status> = statuses
                .query_map([id], |r| r.get::<_, String>(0))?
                .filter_map(Result::ok)
                .map(|s| status_of(&s))
                .collect();
            if !all.is_empty() {
                sum.execute(params![id, summarize(&all).label()])?;
            }
        }
    }
    tx.commit()?;
    Ok(batch.len() as u64)
}

fn recipients(c: &Connection, id: &str) -> rusqlite::Result<Vec<(String, Status)>> {
    let mut st = c.prepare_cached(
        "SELECT address, status FROM tracked_recipients WHERE queue_id = ?1 ORDER BY address",
    )?;
    let rows = st.query_map([id], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
    })?;
    rows.map(|r| r.map(|(a, s)| (a, status_of(&s)))).collect()
}

fn search(c: &Connection, q: &Query) -> rusqlite::Result<Vec<Summary>> {
    let (sql, params) = sql::search(q, |n| format!("?{n}"));
    let mut st = c.prepare_cached(&sql)?;
    let rows = st.query_map(params_from_iter(params.iter()), |r| {
        Ok(Summary {
            queue_id: r.get(0)?,
            node: r.get(1)?,
            received_at: r.get::<_, i64>(2)?.max(0) as Millis,
            sender: r.get(3)?,
            message_id: r.get(4)?,
            status: status_of(&r.get::<_, String>(5)?),
            recipients: Vec::new(),
        })
    })?;
    let mut out: Vec<Summary> = rows.collect::<rusqlite::Result<_>>()?;
    for m in &mut out {
        m.recipients = recipients(c, &m.queue_id)?
            .into_iter()
            .map(|(address, status)| RecipientStatus { address, status })
            .collect();
    }
    Ok(out)
}

fn show(c: &Connection, id: &str) -> rusqlite::Result<Option<Rows>> {
    let message = c
        .query_row(
            "SELECT queue_id, node, received_at, client, helo, tls, proof, sender, message_id,
                    size, subject, status
             FROM tracked_messages WHERE queue_id = ?1",
            [id],
            |r| {
                Ok(Record {
                    queue_id: r.get(0)?,
                    node: r.get(1)?,
                    received_at: r.get::<_, i64>(2)?.max(0) as Millis,
                    client: r.get(3)?,
                    helo: r.get(4)?,
                    tls: r.get(5)?,
                    proof: r.get(6)?,
                    sender: r.get(7)?,
                    message_id: r.get(8)?,
                    size: r.get::<_, i64>(9)?.max(0) as u64,
                    subject: r.get(10)?,
                    status: status_of(&r.get::<_, String>(11)?),
                    recipients: Vec::new(),
                    dsns: Vec::new(),
                    holds: Vec::new(),
                    events: Vec::new(),
                })
            },
        )
        .optional()?;
    let Some(message) = message else {
        return Ok(None);
    };
    let mut st =
        c.prepare_cached("SELECT lines FROM tracked_lines WHERE queue_id = ?1 ORDER BY id")?;
    let mut events = Vec::new();
    for lines in st.query_map([id], |r| r.get::<_, String>(0))? {
        events.extend(parse_lines(&lines?));
    }
    Ok(Some(Rows {
        recipients: recipients(c, id)?,
        message,
        events,
    }))
}

impl super::model::Backend for SqliteTracking {
    async fn apply(&self, batch: Arc<Vec<Change>>) -> Result<u64, StoreError> {
        let (answer, done) = tokio::sync::oneshot::channel();
        self.writes
            .send(Write { batch, answer })
            .map_err(|_| StoreError::Task("tracking writer stopped".into()))?;
        done.await
            .map_err(|_| StoreError::Task("tracking writer stopped".into()))?
    }

    async fn search(&self, q: Query) -> Result<Vec<Summary>, StoreError> {
        self.db.run(move |c| search(c, &q)).await
    }

    async fn show(&self, id: String) -> Result<Option<Rows>, StoreError> {
        self.db.run(move |c| show(c, &id)).await
    }

    async fn prune(&self, before: Millis) -> Result<u64, StoreError> {
        self.db
            .run(move |c| {
                let tx = c.transaction()?;
                let before = before as i64;
                tx.execute(
                    "DELETE FROM tracked_recipients WHERE queue_id IN
                     (SELECT queue_id FROM tracked_messages WHERE received_at < ?1)",
                    [before],
                )?;
                // Lines of messages never recorded (our own DSNs) go by their age.
                tx.execute(
                    "DELETE FROM tracked_lines WHERE at < ?1 OR queue_id IN
                     (SELECT queue_id FROM tracked_messages WHERE received_at < ?1)",
                    [before],
                )?;
                let n = tx.execute(
                    "DELETE FROM tracked_messages WHERE received_at < ?1",
                    [before],
                )?;
                tx.commit()?;
                Ok(n as u64)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::QueueId;
    use crate::tracking::model::{Backend, Detail, EventType, Line};

    /// A file written by a relay before timelines were kept as arrays: its lines are
    /// read back the same after the migration, and new ones follow them.
    #[tokio::test]
    async fn lines_kept_one_per_row_survive_the_migration() {
        let dir = crate::scratch::dir("tracking-migration");
        let path = dir.join("tracking.sqlite3");
        let id = QueueId::generate();
        {
            let c = Connection::open(&path).unwrap();
            let first = schema::TRACKING.migrations.first().unwrap();
            c.execute_batch(first.sqlite).unwrap();
            c.execute_batch(&format!(
                "CREATE TABLE schema_versions(name TEXT PRIMARY KEY, version INTEGER NOT NULL);
                 INSERT INTO schema_versions VALUES('tracking', 1);
                 INSERT INTO tracked_messages VALUES('{id}', 'n', 5, '127.0.0.1', 'h', NULL,
                    'dedicated', 'a@example.test', 'm@x', 10, NULL, 'deferred');
                 INSERT INTO tracked_recipients VALUES('{id}', 'b@p.test', 'deferred');
                 INSERT INTO tracked_events(queue_id, at, type, recipient, detail)
                    VALUES('{id}', 5, 'received', NULL, '{{\"size\":10}}'),
                          ('{id}', 6, 'deferred', 'b@p.test',
                           '{{\"reply\":\"451 4.3.0 later\",\"host\":null,\"tls\":false}}');",
                id = id.as_str()
            ))
            .unwrap();
        }
        let store = SqliteTracking::open(&path).unwrap();
        let rows = store.show(id.as_str().into()).await.unwrap().unwrap();
        let kinds: Vec<&str> = rows.events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["received", "deferred"]);
        assert_eq!(rows.events[0].detail["size"], 10);
        assert!(rows.events[0].recipient.is_none());
        assert_eq!(rows.events[1].recipient.as_deref(), Some("b@p.test"));
        assert_eq!(rows.events[1].detail["reply"], "451 4.3.0 later");
        assert!(rows.events[1].detail.contains_key("host"));
        let later = vec![Change::Lines {
            id: id.clone(),
            lines: vec![Line {
                at: 9,
                kind: EventType::Delivered,
                recipient: Some("b@p.test".into()),
                detail: Detail::Empty {},
            }],
        }];
        store.apply(Arc::new(later)).await.unwrap();
        let rows = store.show(id.as_str().into()).await.unwrap().unwrap();
        let kinds: Vec<&str> = rows.events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["received", "deferred", "delivered"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
