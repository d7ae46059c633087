//! The trusted-sender list on PostgreSQL, shared by every node: the same tables as the
//! SQLite file. Each batch is folded in memory first and written with multi-row upserts
//! that add counts and keep the earliest first and latest last sighting, so nodes
//! writing at once never conflict and never lose a count.

use std::collections::BTreeMap;
use std::time::Duration;

use super::policy::Observation;
use super::store::{DayCount, Entry, Filter, Page, Stats, StoreError, DAY_MS};
use crate::envelope::Millis;
use crate::store::{values_list, Postgres, ROWS_PER_STATEMENT as CHUNK};
use tokio_postgres::types::ToSql;

#[derive(Clone)]
pub struct PgStore {
    pg: Postgres,
}

#[derive(Default, Clone, Copy)]
struct Agg {
    count: i64,
    first: i64,
    last: i64,
}

impl Agg {
    fn add(&mut self, at: i64) {
        if self.count == 0 {
            (self.first, self.last) = (at, at);
        }
        self.count += 1;
        self.first = self.first.min(at);
        self.last = self.last.max(at);
    }
}

fn pg(e: impl Into<crate::store::StoreError>) -> StoreError {
    StoreError::Shared(e.into())
}

impl PgStore {
    pub fn new(pg: Postgres) -> PgStore {
        PgStore { pg }
    }

    pub async fn record(&self, batch: &[Observation]) -> Result<u64, StoreError> {
        if batch.is_empty() {
            return Ok(0);
        }
        let mut rcpts: BTreeMap<&str, (&str, Agg)> = BTreeMap::new();
        let mut pairs: BTreeMap<(&str, &str), Agg> = BTreeMap::new();
        let mut deliveries: BTreeMap<i64, i64> = BTreeMap::new();
        for o in batch {
            let at = o.at as i64;
            rcpts
                .entry(&o.recipient)
                .or_insert((&o.domain, Agg::default()))
                .1
                .add(at);
            pairs.entry((&o.sender, &o.recipient)).or_default().add(at);
            *deliveries.entry(at / DAY_MS as i64).or_default() += 1;
        }
        let mut c = self.pg.client().await.map_err(pg)?;
        let tx = c.transaction().await.map_err(pg)?;
        let mut added_per_day: BTreeMap<i64, i64> = BTreeMap::new();
        let rows: Vec<_> = rcpts.iter().collect();
        for chunk in rows.chunks(CHUNK) {
            let mut sql = format!(
                "INSERT INTO recipients(address, domain, count, first_seen, last_seen) VALUES {}",
                values_list(chunk.len(), 5)
            );
            let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
            for (addr, (domain, agg)) in chunk {
                params.extend([
                    *addr as &(dyn ToSql + Sync),
                    domain,
                    &agg.count,
                    &agg.first,
                    &agg.last,
                ]);
            }
            // xmax = 0 only on a row this statement inserted: the new addresses.
            sql.push_str(
                " ON CONFLICT(address) DO UPDATE SET count = recipients.count + excluded.count,
                   first_seen = LEAST(recipients.first_seen, excluded.first_seen),
                   last_seen = GREATEST(recipients.last_seen, excluded.last_seen)
                 RETURNING (xmax = 0), first_seen",
            );
            for row in tx.query(&sql, &params).await.map_err(pg)? {
                let inserted: bool = row.get(0);
                let first: i64 = row.get(1);
                if inserted {
                    *added_per_day.entry(first / DAY_MS as i64).or_default() += 1;
                }
            }
        }
        let rows: Vec<_> = pairs.iter().collect();
        for chunk in rows.chunks(CHUNK) {
            let mut sql = format!(
                "INSERT INTO pairs(sender, recipient, count, first_seen, last_seen) VALUES {}",
                values_list(chunk.len(), 5)
            );
            let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
            for ((sender, rcpt), agg) in chunk {
                params.extend([
                    sender as &(dyn ToSql + Sync),
                    rcpt,
                    &agg.count,
                    &agg.first,
                    &agg.last,
                ]);
            }
            sql.push_str(
                " ON CONFLICT(sender, recipient) DO UPDATE SET count = pairs.count + excluded.count,
                   first_seen = LEAST(pairs.first_seen, excluded.first_seen),
                   last_seen = GREATEST(pairs.last_seen, excluded.last_seen)",
            );
            tx.execute(&sql, &params).await.map_err(pg)?;
        }
        for (day, n) in &deliveries {
            let added = added_per_day.get(day).copied().unwrap_or(0);
            tx.execute(
                "INSERT INTO daily(day, added, deliveries) VALUES($1, $2, $3)
                 ON CONFLICT(day) DO UPDATE SET added = daily.added + excluded.added,
                    deliveries = daily.deliveries + excluded.deliveries",
                &[day, &added, n],
            )
            .await
            .map_err(pg)?;
        }
        if let Some(first) = batch.iter().map(|o| o.at).min() {
            tx.execute(
                "INSERT INTO trusted_meta(key, value) VALUES('first_delivery', $1)
                 ON CONFLICT(key) DO UPDATE SET value =
                    LEAST(trusted_meta.value::BIGINT, excluded.value::BIGINT)::TEXT",
                &[&first.to_string()],
            )
            .await
            .map_err(pg)?;
        }
        tx.commit().await.map_err(pg)?;
        Ok(added_per_day.values().sum::<i64>() as u64)
    }

    pub async fn prune(&self, retention: Duration, now: Millis) -> Result<u64, StoreError> {
        let cutoff = now.saturating_sub(retention.as_millis() as u64) as i64;
        let mut c = self.pg.client().await.map_err(pg)?;
        let tx = c.transaction().await.map_err(pg)?;
        let n = tx
            .execute("DELETE FROM recipients WHERE last_seen < $1", &[&cutoff])
            .await
            .map_err(pg)?;
        tx.execute("DELETE FROM pairs WHERE last_seen < $1", &[&cutoff])
            .await
            .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        Ok(n)
    }

    pub async fn count(&self) -> Result<u64, StoreError> {
        let c = self.pg.client().await.map_err(pg)?;
        let row = c
            .query_one("SELECT COUNT(*) FROM recipients", &[])
            .await
            .map_err(pg)?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    pub async fn list(
        &self,
        f: &Filter,
        sender: Option<String>,
        domain: Option<String>,
    ) -> Result<Page, StoreError> {
        let limit = f.limit.clamp(1, 100_000);
        let sql = if sender.is_some() {
            "SELECT r.address, r.domain, p.count, p.first_seen, p.last_seen, 1::BIGINT, r.origin
             FROM pairs p JOIN recipients r ON r.address = p.recipient
             WHERE p.sender = $1 AND ($2::TEXT IS NULL OR r.domain = $2) AND ($3::BIGINT IS NULL OR p.last_seen >= $3)
               AND ($4::BIGINT IS NULL OR p.count >= $4) AND ($5::TEXT IS NULL OR r.address > $5 COLLATE \"C\")
             ORDER BY r.address COLLATE \"C\" LIMIT $6"
        } else {
            "SELECT r.address, r.domain, r.count, r.first_seen, r.last_seen,
                    (SELECT COUNT(*) FROM pairs p WHERE p.recipient = r.address), r.origin
             FROM recipients r
             WHERE $1::TEXT IS NULL AND ($2::TEXT IS NULL OR r.domain = $2) AND ($3::BIGINT IS NULL OR r.last_seen >= $3)
               AND ($4::BIGINT IS NULL OR r.count >= $4) AND ($5::TEXT IS NULL OR r.address > $5 COLLATE \"C\")
             ORDER BY r.address COLLATE \"C\" LIMIT $6"
        };
        let since = f.since.map(|s| s as i64);
        let min_count = f.min_count.map(|c| c as i64);
        let take = (limit + 1) as i64;
        let c = self.pg.client().await.map_err(pg)?;
        let rows = c
            .query(
                sql,
                &[&sender, &domain, &since, &min_count, &f.cursor, &take],
            )
            .await
            .map_err(pg)?;
        let entries: Vec<Entry> = rows
            .iter()
            .map(|r| Entry {
                address: r.get(0),
                domain: r.get(1),
                count: r.get::<_, i64>(2) as u64,
                first_seen: r.get::<_, i64>(3) as u64,
                last_seen: r.get::<_, i64>(4) as u64,
                senders: r.get::<_, i64>(5) as u64,
                origin: r.get(6),
            })
            .collect();
        Ok(Page::cut(entries, limit))
    }

    pub async fn stats(&self, now: Millis, learning_days: u32) -> Result<Stats, StoreError> {
        let c = self.pg.client().await.map_err(pg)?;
        let row = c
            .query_one(
                "SELECT (SELECT COUNT(*) FROM recipients), (SELECT COUNT(DISTINCT domain) FROM recipients),
                        (SELECT COUNT(*) FROM pairs),
                        (SELECT value FROM trusted_meta WHERE key = 'first_delivery')",
                &[],
            )
            .await
            .map_err(pg)?;
        let first_delivery: Option<Millis> =
            row.get::<_, Option<String>>(3).and_then(|v| v.parse().ok());
        let days_observed = first_delivery.map_or(0, |f| now.saturating_sub(f) / DAY_MS);
        let added_per_day = c
            .query(
                "SELECT day, added, deliveries FROM daily ORDER BY day DESC LIMIT 30",
                &[],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| DayCount {
                day: super::store::day_string(r.get::<_, i64>(0) as u64),
                added: r.get::<_, i64>(1) as u64,
                deliveries: r.get::<_, i64>(2) as u64,
            })
            .collect();
        Ok(Stats {
            recipients: row.get::<_, i64>(0) as u64,
            domains: row.get::<_, i64>(1) as u64,
            pairs: row.get::<_, i64>(2) as u64,
            first_delivery,
            days_observed,
            learning_days,
            ready: days_observed >= u64::from(learning_days),
            added_per_day,
        })
    }

    pub async fn import(&self, addresses: &[String], now: Millis) -> Result<u64, StoreError> {
        let mut c = self.pg.client().await.map_err(pg)?;
        let tx = c.transaction().await.map_err(pg)?;
        let st = tx
            .prepare(
                "INSERT INTO recipients(address, domain, count, first_seen, last_seen, origin)
                 VALUES($1, $2, 0, $3, $3, 'imported') ON CONFLICT(address) DO NOTHING",
            )
            .await
            .map_err(pg)?;
        let mut added = 0;
        let at = now as i64;
        for a in addresses {
            let Some(addr) = super::policy::normalize(a) else {
                continue;
            };
            let domain = crate::envelope::domain_of(&addr).to_string();
            added += tx.execute(&st, &[&addr, &domain, &at]).await.map_err(pg)?;
        }
        tx.commit().await.map_err(pg)?;
        Ok(added)
    }
}
