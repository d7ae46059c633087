//! Tracking in its own SQLite file (`tracking.database`).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use rusqlite::{params, params_from_iter, Connection, OptionalExtension};

use super::model::{
    summarize, Change, Query, RecipientStatus, Record, Rows, Status, Summary, TimelineEvent,
};
use super::sql::{self, Param};
use crate::envelope::Millis;
use crate::store::schema;
use crate::store::sqlite::Db;
use crate::store::StoreError;

pub struct SqliteTracking {
    db: Arc<Db>,
}

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
        Ok(SqliteTracking { db: Arc::new(db) })
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
        let mut ev = tx.prepare_cached(
            "INSERT INTO tracked_events(queue_id, at, type, recipient, detail) VALUES(?1, ?2, ?3, ?4, ?5)",
        )?;
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
                    for r in &m.recipients {
                        rcpt.execute(params![
                            m.id.as_str(),
                            r.to_ascii_lowercase(),
                            m.status.label()
                        ])?;
                    }
                }
                Change::Event {
                    id,
                    at,
                    kind,
                    recipient,
                    detail,
                } => {
                    ev.execute(params![
                        id.as_str(),
                        *at as i64,
                        kind.label(),
                        recipient.as_ref().map(|r| r.to_ascii_lowercase()),
                        detail.to_string()
                    ])?;
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
    let mut st = c.prepare_cached(
        "SELECT at, type, recipient, detail FROM tracked_events WHERE queue_id = ?1 ORDER BY id",
    )?;
    let events = st
        .query_map([id], |r| {
            let detail: String = r.get(3)?;
            Ok(TimelineEvent {
                at: r.get::<_, i64>(0)?.max(0) as Millis,
                kind: r.get(1)?,
                recipient: r.get(2)?,
                detail: serde_json::from_str(&detail).unwrap_or_default(),
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Some(Rows {
        recipients: recipients(c, id)?,
        message,
        events,
    }))
}

impl super::model::Backend for SqliteTracking {
    async fn apply(&self, batch: Arc<Vec<Change>>) -> Result<u64, StoreError> {
        self.db.run(move |c| apply(c, &batch)).await
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
                    "DELETE FROM tracked_events WHERE at < ?1 OR queue_id IN
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
