//! Tracking in the cluster's PostgreSQL: every node writes its messages there, so any
//! node answers for all of them.

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio_postgres::types::ToSql;

use super::model::{
    lines_json, parse_lines, summarize, Change, Query, RecipientStatus, Record, Rows, Status,
    Summary,
};
use super::sql::{self, Param};
use crate::envelope::Millis;
use crate::store::{Postgres, StoreError};

#[derive(Clone)]
pub struct PgTracking {
    pg: Postgres,
}

impl PgTracking {
    pub fn new(pg: Postgres) -> PgTracking {
        PgTracking { pg }
    }
}

fn status_of(text: &str) -> Status {
    Status::parse(text).unwrap_or(Status::Queued)
}

async fn recipients(
    c: &impl deadpool_postgres::GenericClient,
    id: &str,
) -> Result<Vec<(String, Status)>, StoreError> {
    let rows = c
        .query(
            "SELECT address, status FROM tracked_recipients WHERE queue_id = $1 ORDER BY address",
            &[&id],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, String>(0), status_of(r.get(1))))
        .collect())
}

impl super::model::Backend for PgTracking {
    async fn apply(&self, batch: Arc<Vec<Change>>) -> Result<u64, StoreError> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await?;
        let msg = tx
            .prepare(
                "INSERT INTO tracked_messages(queue_id, node, received_at, client, helo, tls,
                    proof, sender, message_id, size, subject, status)
                 VALUES($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                 ON CONFLICT(queue_id) DO NOTHING",
            )
            .await?;
        let rcpt = tx
            .prepare(
                "INSERT INTO tracked_recipients(queue_id, address, status) VALUES($1, $2, $3)
                 ON CONFLICT DO NOTHING",
            )
            .await?;
        let ev = tx
            .prepare("INSERT INTO tracked_lines(queue_id, at, lines) VALUES($1, $2, $3)")
            .await?;
        let set = tx
            .prepare(
                "UPDATE tracked_recipients SET status = $3 WHERE queue_id = $1 AND address = $2",
            )
            .await?;
        let mv = tx
            .prepare("UPDATE tracked_recipients SET status = $3 WHERE queue_id = $1 AND status = ANY($2)")
            .await?;
        let mut touched = BTreeSet::new();
        for change in batch.iter() {
            match change {
                Change::Message(m) => {
                    tx.execute(
                        &msg,
                        &[
                            &m.id.as_str(),
                            &m.node,
                            &(m.received_at as i64),
                            &m.client,
                            &m.helo,
                            &m.tls,
                            &m.proof,
                            &m.sender.to_ascii_lowercase(),
                            &m.message_id,
                            &(m.size as i64),
                            &m.subject,
                            &m.status.label(),
                        ],
                    )
                    .await?;
                    for (r, status) in &m.recipients {
                        tx.execute(
                            &rcpt,
                            &[&m.id.as_str(), &r.to_ascii_lowercase(), &status.label()],
                        )
                        .await?;
                    }
                }
                Change::Lines { id, lines } => {
                    let at = lines.first().map_or(0, |l| l.at) as i64;
                    tx.execute(&ev, &[&id.as_str(), &at, &lines_json(lines)])
                        .await?;
                }
                Change::Recipient {
                    id,
                    address,
                    status,
                } => {
                    tx.execute(
                        &set,
                        &[&id.as_str(), &address.to_ascii_lowercase(), &status.label()],
                    )
                    .await?;
                    touched.insert(id.as_str().to_string());
                }
                Change::Move { id, from, to } => {
                    let from: Vec<&str> = from.iter().map(|s| s.label()).collect();
                    tx.execute(&mv, &[&id.as_str(), &from, &to.label()]).await?;
                    touched.insert(id.as_str().to_string());
                }
            }
        }
        for id in &touched {
            let all: Vec<Status> = recipients(&tx, id)
                .await?
                .into_iter()
                .map(|(_, s)| s)
                .collect();
            if !all.is_empty() {
                tx.execute(
                    "UPDATE tracked_messages SET status = $2 WHERE queue_id = $1",
                    &[id, &summarize(&all).label()],
                )
                .await?;
            }
        }
        tx.commit().await?;
        Ok(batch.len() as u64)
    }

    async fn search(&self, q: Query) -> Result<Vec<Summary>, StoreError> {
        let (sql, params) = sql::search(&q, |n| format!("${n}"));
        let values: Vec<Box<dyn ToSql + Sync + Send>> = params
            .into_iter()
            .map(|p| -> Box<dyn ToSql + Sync + Send> {
                match p {
                    Param::Text(t) => Box::new(t),
                    Param::Int(i) => Box::new(i),
                }
            })
            .collect();
        let refs: Vec<&(dyn ToSql + Sync)> = values
            .iter()
            .map(|v| v.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let c = self.pg.client().await?;
        let rows = c.query(&sql, &refs).await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let queue_id: String = r.get(0);
            let recipients = recipients(&c, &queue_id)
                .await?
                .into_iter()
                .map(|(address, status)| RecipientStatus { address, status })
                .collect();
            out.push(Summary {
                queue_id,
                node: r.get(1),
                received_at: r.get::<_, i64>(2).max(0) as Millis,
                sender: r.get(3),
                message_id: r.get(4),
                status: status_of(r.get(5)),
                recipients,
            });
        }
        Ok(out)
    }

    async fn show(&self, id: String) -> Result<Option<Rows>, StoreError> {
        let c = self.pg.client().await?;
        let Some(r) = c
            .query_opt(
                "SELECT queue_id, node, received_at, client, helo, tls, proof, sender, message_id,
                        size, subject, status
                 FROM tracked_messages WHERE queue_id = $1",
                &[&id],
            )
            .await?
        else {
            return Ok(None);
        };
        let message = Record {
            queue_id: r.get(0),
            node: r.get(1),
            received_at: r.get::<_, i64>(2).max(0) as Millis,
            client: r.get(3),
            helo: r.get(4),
            tls: r.get(5),
            proof: r.get(6),
            sender: r.get(7),
            message_id: r.get(8),
            size: r.get::<_, i64>(9).max(0) as u64,
            subject: r.get(10),
            status: status_of(r.get(11)),
            recipients: Vec::new(),
            dsns: Vec::new(),
            holds: Vec::new(),
            events: Vec::new(),
        };
        let events = c
            .query(
                "SELECT lines FROM tracked_lines WHERE queue_id = $1 ORDER BY id",
                &[&id],
            )
            .await?
            .iter()
            .flat_map(|r| parse_lines(r.get::<_, &str>(0)))
            .collect();
        Ok(Some(Rows {
            recipients: recipients(&c, &id).await?,
            message,
            events,
        }))
    }

    async fn prune(&self, before: Millis) -> Result<u64, StoreError> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await?;
        let before = before as i64;
        tx.execute(
            "DELETE FROM tracked_recipients WHERE queue_id IN
             (SELECT queue_id FROM tracked_messages WHERE received_at < $1)",
            &[&before],
        )
        .await?;
        tx.execute(
            "DELETE FROM tracked_lines WHERE at < $1 OR queue_id IN
             (SELECT queue_id FROM tracked_messages WHERE received_at < $1)",
            &[&before],
        )
        .await?;
        let n = tx
            .execute(
                "DELETE FROM tracked_messages WHERE received_at < $1",
                &[&before],
            )
            .await?;
        tx.commit().await?;
        Ok(n)
    }
}
