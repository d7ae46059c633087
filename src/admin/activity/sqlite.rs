//! The relay state in the node's SQLite file (`admin.database`, WAL,
//! `synchronous=NORMAL`: statistics, a power cut may cost the last second of counts,
//! never mail). The tables are in `store::schema::STATE`.

use std::path::Path;
use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension};

use super::{Batch, Source, TENANT_REFUSAL_KEY};
use crate::store::schema;
use crate::store::sqlite::Db;
use crate::store::StoreError;

pub(super) struct SqliteActivity {
    db: Arc<Db>,
}

impl SqliteActivity {
    pub(super) fn open(path: &Path) -> Result<SqliteActivity, StoreError> {
        Ok(SqliteActivity {
            db: Arc::new(Db::open(path, &[&schema::STATE], false)?),
        })
    }
}

const SOURCES: &str = "SELECT ip, connections, refused, messages, first_seen, last_seen FROM sources ORDER BY last_seen DESC LIMIT 1000";

impl super::Backend for SqliteActivity {
    async fn write(&self, batch: Arc<Batch>) -> Result<(), StoreError> {
        self.db.run(move |c| write(c, &batch)).await
    }

    async fn sources(&self) -> Result<Vec<Source>, StoreError> {
        self.db
            .run(|c| {
                let mut st = c.prepare(SOURCES)?;
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
            })
            .await
    }

    async fn flow(
        &self,
        since_hour: i64,
        metric: Option<&'static str>,
    ) -> Result<Vec<(String, String, u64)>, StoreError> {
        self.db
            .run(move |c| {
                let mut st = c.prepare(
                    "SELECT metric, key, SUM(count) FROM flow WHERE hour >= ?1 AND (?2 IS NULL OR metric = ?2)
                     GROUP BY metric, key",
                )?;
                let rows = st.query_map(params![since_hour, metric], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
                })?;
                rows.collect()
            })
            .await
    }

    async fn meta(&self, key: &'static str) -> Result<Option<String>, StoreError> {
        self.db
            .run(move |c| {
                c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                    .optional()
            })
            .await
    }

    async fn set_meta(&self, key: &'static str, json: String) -> Result<(), StoreError> {
        self.db
            .run(move |c| {
                c.execute(
                    "INSERT INTO meta(key, value) VALUES(?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    params![key, json],
                )
                .map(|_| ())
            })
            .await
    }

    async fn prune(&self, cutoff_hour: i64, cutoff: i64) -> Result<usize, StoreError> {
        self.db
            .run(move |c| {
                let flow = c.execute("DELETE FROM flow WHERE hour < ?1", [cutoff_hour])?;
                let sources = c.execute("DELETE FROM sources WHERE last_seen < ?1", [cutoff])?;
                Ok(flow + sources)
            })
            .await
    }
}

fn write(c: &mut Connection, b: &Batch) -> Result<(), rusqlite::Error> {
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
