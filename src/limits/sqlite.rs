//! The limits' state in the node's state file (`admin.database`).

use std::path::Path;
use std::sync::Arc;

use rusqlite::{params, OptionalExtension};

use super::counts::Slot;
use super::model::{cell_of, row_of, Added, Restriction, Row, RowState};
use crate::envelope::{LimitKey, Millis, Settle};
use crate::store::schema;
use crate::store::sqlite::Db;
use crate::store::StoreError;

pub struct SqliteLimits {
    db: Arc<Db>,
}

impl SqliteLimits {
    /// Its own connection to the file: a sync never waits behind the activity
    /// recorder's batch.
    pub fn open(path: &Path) -> Result<SqliteLimits, StoreError> {
        Ok(SqliteLimits {
            db: Arc::new(Db::open(path, &[&schema::LIMITS], false)?),
        })
    }
}

fn immediate(c: &mut rusqlite::Connection) -> rusqlite::Result<rusqlite::Transaction<'_>> {
    // Written at once: a read upgraded to a write after another connection wrote is
    // "busy" whatever the timeout.
    c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
}

impl super::model::Backend for SqliteLimits {
    async fn add(
        &self,
        added: Vec<Added>,
        now_us: u64,
        now: Millis,
    ) -> Result<Vec<(Slot, u64)>, StoreError> {
        self.db
            .run(move |c| {
                let tx = immediate(c)?;
                let mut out = Vec::with_capacity(added.len());
                {
                    let mut st = tx.prepare_cached(
                        "INSERT INTO limit_counters(rule, measure, value, tat, updated)
                         VALUES(?1, ?2, ?3, ?4 + ?5 * ?6, ?7)
                         ON CONFLICT(rule, measure, value) DO UPDATE
                         SET tat = MAX(tat, ?4) + ?5 * ?6, updated = ?7
                         RETURNING tat",
                    )?;
                    for a in added {
                        let tat: i64 = st.query_row(
                            params![
                                a.slot.rule,
                                a.slot.measure.label(),
                                a.slot.value,
                                now_us as i64,
                                a.units as i64,
                                a.interval_us as i64,
                                now as i64
                            ],
                            |r| r.get(0),
                        )?;
                        out.push((a.slot, tat.max(0) as u64));
                    }
                }
                tx.commit()?;
                Ok(out)
            })
            .await
    }

    async fn changed_cells(&self, since: Millis) -> Result<Vec<(Slot, u64)>, StoreError> {
        self.db
            .run(move |c| {
                let mut st = c.prepare_cached(
                    "SELECT rule, measure, value, tat FROM limit_counters WHERE updated >= ?1",
                )?;
                let rows = st.query_map([since as i64], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get(2)?,
                        r.get(3)?,
                    ))
                })?;
                let mut out = Vec::new();
                for row in rows {
                    let (rule, measure, value, tat) = row?;
                    out.extend(cell_of(rule, &measure, value, tat));
                }
                Ok(out)
            })
            .await
    }

    async fn reset(&self, rules: Vec<String>, value: String) -> Result<(), StoreError> {
        self.db
            .run(move |c| {
                let tx = immediate(c)?;
                for rule in &rules {
                    tx.execute(
                        "DELETE FROM limit_counters WHERE rule = ?1 AND value = ?2",
                        params![rule, value],
                    )?;
                }
                tx.commit()
            })
            .await
    }

    async fn restrict(&self, r: Restriction, now: Millis) -> Result<(), StoreError> {
        self.db
            .run(move |c| {
                c.execute(
                    "INSERT INTO restricted(key, value, rule, since, count, state, updated)
                     VALUES(?1, ?2, ?3, ?4, ?5, 'restricted', ?6)
                     ON CONFLICT(key, value) DO UPDATE SET rule = excluded.rule,
                        since = excluded.since, count = excluded.count,
                        state = 'restricted', updated = excluded.updated
                     WHERE restricted.state <> 'restricted'",
                    params![
                        r.key.label(),
                        r.value,
                        r.limit,
                        r.since as i64,
                        r.count as i64,
                        now as i64
                    ],
                )?;
                Ok(())
            })
            .await
    }

    async fn lift(
        &self,
        key: LimitKey,
        value: String,
        how: Settle,
        now: Millis,
    ) -> Result<Option<Restriction>, StoreError> {
        self.db
            .run(move |c| {
                c.query_row(
                    "UPDATE restricted SET state = ?1, updated = ?2
                     WHERE key = ?3 AND value = ?4 AND state = 'restricted'
                     RETURNING rule, since, count",
                    params![
                        RowState::Lifted(how).label(),
                        now as i64,
                        key.label(),
                        value
                    ],
                    |r| {
                        Ok(Restriction {
                            key,
                            value: value.clone(),
                            limit: r.get(0)?,
                            since: r.get::<_, i64>(1)?.max(0) as Millis,
                            count: r.get::<_, i64>(2)?.max(0) as u64,
                        })
                    },
                )
                .optional()
            })
            .await
    }

    async fn changed_rows(&self, since: Millis) -> Result<Vec<Row>, StoreError> {
        self.db
            .run(move |c| {
                let mut st = c.prepare_cached(
                    "SELECT key, value, rule, since, count, state, updated FROM restricted
                     WHERE updated >= ?1",
                )?;
                let rows = st.query_map([since as i64], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get::<_, String>(5)?,
                        r.get(6)?,
                    ))
                })?;
                let mut out = Vec::new();
                for row in rows {
                    let (key, value, rule, since, count, state, updated) = row?;
                    out.extend(row_of(&key, value, rule, since, count, &state, updated));
                }
                Ok(out)
            })
            .await
    }

    async fn prune(&self, before: Millis) -> Result<u64, StoreError> {
        self.db
            .run(move |c| {
                let tx = immediate(c)?;
                let rows = tx.execute(
                    "DELETE FROM restricted WHERE state <> 'restricted' AND updated < ?1",
                    [before as i64],
                )?;
                let cells = tx.execute(
                    "DELETE FROM limit_counters WHERE tat < ?1",
                    [(before as i64).saturating_mul(1000)],
                )?;
                tx.commit()?;
                Ok((rows + cells) as u64)
            })
            .await
    }
}
