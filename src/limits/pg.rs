//! The limits' state in the cluster's PostgreSQL: one statement adds every node's
//! counts of a sync and returns the shared cells.

use super::counts::Slot;
use super::model::{cell_of, row_of, Added, Restriction, Row, RowState};
use crate::envelope::{LimitKey, Millis, Settle};
use crate::store::{Postgres, StoreError};

#[derive(Clone)]
pub struct PgLimits {
    pg: Postgres,
}

impl PgLimits {
    pub fn new(pg: Postgres) -> PgLimits {
        PgLimits { pg }
    }
}

/// `excluded.tat - $4` is the units times the interval this node adds: on top of the
/// shared cell, or of now when the cell's burst is whole again.
const ADD: &str = "
INSERT INTO limit_counters(rule, measure, value, tat, updated)
SELECT r, m, v, $4 + u * i, $5
FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $6::BIGINT[], $7::BIGINT[]) AS t(r, m, v, u, i)
ON CONFLICT(rule, measure, value) DO UPDATE
SET tat = GREATEST(limit_counters.tat, $4) + (excluded.tat - $4), updated = $5
RETURNING rule, measure, value, tat";

impl super::model::Backend for PgLimits {
    async fn add(
        &self,
        added: Vec<Added>,
        now_us: u64,
        now: Millis,
    ) -> Result<Vec<(Slot, u64)>, StoreError> {
        if added.is_empty() {
            return Ok(Vec::new());
        }
        let mut rules = Vec::with_capacity(added.len());
        let mut measures = Vec::with_capacity(added.len());
        let mut values = Vec::with_capacity(added.len());
        let mut units = Vec::with_capacity(added.len());
        let mut intervals = Vec::with_capacity(added.len());
        for a in added {
            rules.push(a.slot.rule);
            measures.push(a.slot.measure.label());
            values.push(a.slot.value);
            units.push(a.units as i64);
            intervals.push(a.interval_us as i64);
        }
        let c = self.pg.client().await?;
        let rows = c
            .query(
                ADD,
                &[
                    &rules,
                    &measures,
                    &values,
                    &(now_us as i64),
                    &(now as i64),
                    &units,
                    &intervals,
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| cell_of(r.get(0), r.get::<_, &str>(1), r.get(2), r.get(3)))
            .collect())
    }

    async fn changed_cells(&self, since: Millis) -> Result<Vec<(Slot, u64)>, StoreError> {
        let c = self.pg.client().await?;
        let rows = c
            .query(
                "SELECT rule, measure, value, tat FROM limit_counters WHERE updated >= $1",
                &[&(since as i64)],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| cell_of(r.get(0), r.get::<_, &str>(1), r.get(2), r.get(3)))
            .collect())
    }

    async fn reset(&self, rules: Vec<String>, value: String) -> Result<(), StoreError> {
        let c = self.pg.client().await?;
        c.execute(
            "DELETE FROM limit_counters WHERE value = $1 AND rule = ANY($2)",
            &[&value, &rules],
        )
        .await?;
        Ok(())
    }

    async fn restrict(&self, r: Restriction, now: Millis) -> Result<(), StoreError> {
        let c = self.pg.client().await?;
        c.execute(
            "INSERT INTO restricted(key, value, rule, since, count, state, updated)
             VALUES($1, $2, $3, $4, $5, 'restricted', $6)
             ON CONFLICT(key, value) DO UPDATE SET rule = excluded.rule,
                since = excluded.since, count = excluded.count,
                state = 'restricted', updated = excluded.updated
             WHERE restricted.state <> 'restricted'",
            &[
                &r.key.label(),
                &r.value,
                &r.limit,
                &(r.since as i64),
                &(r.count as i64),
                &(now as i64),
            ],
        )
        .await?;
        Ok(())
    }

    async fn lift(
        &self,
        key: LimitKey,
        value: String,
        how: Settle,
        now: Millis,
    ) -> Result<Option<Restriction>, StoreError> {
        let c = self.pg.client().await?;
        let row = c
            .query_opt(
                "UPDATE restricted SET state = $1, updated = $2
                 WHERE key = $3 AND value = $4 AND state = 'restricted'
                 RETURNING rule, since, count",
                &[
                    &RowState::Lifted(how).label(),
                    &(now as i64),
                    &key.label(),
                    &value,
                ],
            )
            .await?;
        Ok(row.map(|r| Restriction {
            key,
            value,
            limit: r.get(0),
            since: r.get::<_, i64>(1).max(0) as Millis,
            count: r.get::<_, i64>(2).max(0) as u64,
        }))
    }

    async fn changed_rows(&self, since: Millis) -> Result<Vec<Row>, StoreError> {
        let c = self.pg.client().await?;
        let rows = c
            .query(
                "SELECT key, value, rule, since, count, state, updated FROM restricted
                 WHERE updated >= $1",
                &[&(since as i64)],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                row_of(
                    r.get::<_, &str>(0),
                    r.get(1),
                    r.get(2),
                    r.get(3),
                    r.get(4),
                    r.get::<_, &str>(5),
                    r.get(6),
                )
            })
            .collect())
    }

    async fn prune(&self, before: Millis) -> Result<u64, StoreError> {
        let c = self.pg.client().await?;
        let rows = c
            .execute(
                "DELETE FROM restricted WHERE state <> 'restricted' AND updated < $1",
                &[&(before as i64)],
            )
            .await?;
        let cells = c
            .execute(
                "DELETE FROM limit_counters WHERE tat < $1",
                &[&(before as i64).saturating_mul(1000)],
            )
            .await?;
        Ok(rows + cells)
    }
}
