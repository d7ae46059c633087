//! The relay state in the cluster's PostgreSQL: batches are written as multi-row
//! upserts that add counts, so nodes writing at once never conflict.

use std::sync::Arc;

use tokio_postgres::types::ToSql;

use super::{Batch, Source, TENANT_REFUSAL_KEY};
use crate::store::{values_list, Postgres, StoreError, ROWS_PER_STATEMENT as PG_CHUNK};

pub(super) struct PgActivity {
    pg: Postgres,
}

impl PgActivity {
    pub(super) fn new(pg: Postgres) -> PgActivity {
        PgActivity { pg }
    }
}

impl super::Backend for PgActivity {
    async fn write(&self, batch: Arc<Batch>) -> Result<(), StoreError> {
        let mut c = self.pg.client().await?;
        write(&mut c, &batch).await
    }

    async fn sources(&self) -> Result<Vec<Source>, StoreError> {
        let c = self.pg.client().await?;
        Ok(c.query(
            "SELECT ip, connections, refused, messages, first_seen, last_seen FROM sources ORDER BY last_seen DESC LIMIT 1000",
            &[],
        )
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
    }

    async fn flow(
        &self,
        since_hour: i64,
        metric: Option<&'static str>,
    ) -> Result<Vec<(String, String, u64)>, StoreError> {
        let c = self.pg.client().await?;
        Ok(c.query(
            "SELECT metric, key, SUM(count)::BIGINT FROM flow WHERE hour >= $1 AND ($2::TEXT IS NULL OR metric = $2)
             GROUP BY metric, key",
            &[&since_hour, &metric],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get::<_, i64>(2) as u64))
        .collect())
    }

    async fn meta(&self, key: &'static str) -> Result<Option<String>, StoreError> {
        let c = self.pg.client().await?;
        Ok(
            c.query_opt("SELECT value FROM meta WHERE key = $1", &[&key])
                .await?
                .map(|r| r.get(0)),
        )
    }

    async fn set_meta(&self, key: &'static str, json: String) -> Result<(), StoreError> {
        let c = self.pg.client().await?;
        c.execute(
            "INSERT INTO meta(key, value) VALUES($1, $2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            &[&key, &json],
        )
        .await?;
        Ok(())
    }

    async fn prune(&self, cutoff_hour: i64, cutoff: i64) -> Result<usize, StoreError> {
        let c = self.pg.client().await?;
        let flow = c
            .execute("DELETE FROM flow WHERE hour < $1", &[&cutoff_hour])
            .await?;
        let sources = c
            .execute("DELETE FROM sources WHERE last_seen < $1", &[&cutoff])
            .await?;
        Ok((flow + sources) as usize)
    }
}

/// Multi-row upserts that add counts, so nodes writing at once never conflict.
async fn write(c: &mut deadpool_postgres::Object, b: &Batch) -> Result<(), StoreError> {
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
