//! The trusted-sender list on PostgreSQL, shared by every node: the same tables as the
//! SQLite file. Each batch is folded in memory first and written with multi-row upserts
//! that add counts and keep the earliest first and latest last sighting, so nodes
//! writing at once never conflict and never lose a count.

use std::collections::BTreeMap;

use std::sync::Arc;

use super::model::{
    Counts, Origin, Page, Query, Suspected, TrustedError, TrustedRecipient, DAY_MS,
};
use super::policy::Observation;
use crate::envelope::{Millis, Settle};
use crate::store::{values_list, Postgres, ROWS_PER_STATEMENT as CHUNK};
use tokio_postgres::types::ToSql;

#[derive(Clone)]
pub struct PgTrusted {
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

impl PgTrusted {
    pub fn new(pg: Postgres) -> PgTrusted {
        PgTrusted { pg }
    }
}

impl super::Backend for PgTrusted {
    async fn record(&self, batch: Arc<Vec<Observation>>) -> Result<u64, TrustedError> {
        if batch.is_empty() {
            return Ok(0);
        }
        let mut rcpts: BTreeMap<&str, (&str, Agg)> = BTreeMap::new();
        let mut pairs: BTreeMap<(&str, &str), Agg> = BTreeMap::new();
        let mut deliveries: BTreeMap<i64, i64> = BTreeMap::new();
        for o in batch.iter() {
            let at = o.at as i64;
            rcpts
                .entry(&o.recipient)
                .or_insert((&o.domain, Agg::default()))
                .1
                .add(at);
            pairs.entry((&o.sender, &o.recipient)).or_default().add(at);
            *deliveries.entry(at / DAY_MS as i64).or_default() += 1;
        }
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await?;
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
            for row in tx.query(&sql, &params).await? {
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
            tx.execute(&sql, &params).await?;
        }
        for (day, n) in &deliveries {
            let added = added_per_day.get(day).copied().unwrap_or(0);
            tx.execute(
                "INSERT INTO daily(day, added, deliveries) VALUES($1, $2, $3)
                 ON CONFLICT(day) DO UPDATE SET added = daily.added + excluded.added,
                    deliveries = daily.deliveries + excluded.deliveries",
                &[day, &added, n],
            )
            .await?;
        }
        if let Some(first) = batch.iter().map(|o| o.at).min() {
            tx.execute(
                "INSERT INTO trusted_meta(key, value) VALUES('first_delivery', $1)
                 ON CONFLICT(key) DO UPDATE SET value =
                    LEAST(trusted_meta.value::BIGINT, excluded.value::BIGINT)::TEXT",
                &[&first.to_string()],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(added_per_day.values().sum::<i64>() as u64)
    }

    async fn prune(&self, cutoff: Millis) -> Result<u64, TrustedError> {
        let cutoff = cutoff as i64;
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await?;
        let n = tx
            .execute("DELETE FROM recipients WHERE last_seen < $1", &[&cutoff])
            .await?;
        tx.execute("DELETE FROM pairs WHERE last_seen < $1", &[&cutoff])
            .await?;
        tx.commit().await?;
        Ok(n)
    }

    async fn count(&self) -> Result<u64, TrustedError> {
        let c = self.pg.client().await?;
        let row = c.query_one("SELECT COUNT(*) FROM recipients", &[]).await?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    async fn list(&self, q: Query) -> Result<Page, TrustedError> {
        let sql = if q.sender.is_some() {
            "SELECT r.address, r.domain, p.count, p.first_seen, p.last_seen, 1::BIGINT, r.origin
             FROM pairs p JOIN recipients r ON r.address = p.recipient
             WHERE p.sender = $1 AND ($2::TEXT IS NULL OR r.domain = $2) AND ($3::BIGINT IS NULL OR p.last_seen >= $3)
               AND ($4::BIGINT IS NULL OR p.count >= $4) AND ($5::TEXT IS NULL OR r.address > $5 COLLATE \"C\")
               AND ($7 OR r.origin <> 'suspect')
             ORDER BY r.address COLLATE \"C\" LIMIT $6"
        } else {
            "SELECT r.address, r.domain, r.count, r.first_seen, r.last_seen,
                    (SELECT COUNT(*) FROM pairs p WHERE p.recipient = r.address), r.origin
             FROM recipients r
             WHERE $1::TEXT IS NULL AND ($2::TEXT IS NULL OR r.domain = $2) AND ($3::BIGINT IS NULL OR r.last_seen >= $3)
               AND ($4::BIGINT IS NULL OR r.count >= $4) AND ($5::TEXT IS NULL OR r.address > $5 COLLATE \"C\")
               AND ($7 OR r.origin <> 'suspect')
             ORDER BY r.address COLLATE \"C\" LIMIT $6"
        };
        let c = self.pg.client().await?;
        let rows = c
            .query(
                sql,
                &[
                    &q.sender,
                    &q.domain,
                    &q.since,
                    &q.min_count,
                    &q.cursor,
                    &q.take(),
                    &q.include_suspect,
                ],
            )
            .await?;
        let entries: Vec<TrustedRecipient> = rows
            .iter()
            .map(|r| TrustedRecipient {
                address: r.get(0),
                domain: r.get(1),
                count: r.get::<_, i64>(2) as u64,
                first_seen: r.get::<_, i64>(3) as u64,
                last_seen: r.get::<_, i64>(4) as u64,
                senders: r.get::<_, i64>(5) as u64,
                origin: Origin::parse(r.get(6)),
            })
            .collect();
        Ok(Page::cut(entries, q.limit))
    }

    async fn counts(&self) -> Result<Counts, TrustedError> {
        let c = self.pg.client().await?;
        let row = c
            .query_one(
                "SELECT (SELECT COUNT(*) FROM recipients), (SELECT COUNT(DISTINCT domain) FROM recipients),
                        (SELECT COUNT(*) FROM pairs),
                        (SELECT value FROM trusted_meta WHERE key = 'first_delivery')",
                &[],
            )
            .await?;
        let days = c
            .query(
                "SELECT day, added, deliveries FROM daily ORDER BY day DESC LIMIT 30",
                &[],
            )
            .await?
            .iter()
            .map(|r| {
                (
                    r.get::<_, i64>(0) as u64,
                    r.get::<_, i64>(1) as u64,
                    r.get::<_, i64>(2) as u64,
                )
            })
            .collect();
        Ok(Counts {
            recipients: row.get::<_, i64>(0) as u64,
            domains: row.get::<_, i64>(1) as u64,
            pairs: row.get::<_, i64>(2) as u64,
            first_delivery: row.get::<_, Option<String>>(3).and_then(|v| v.parse().ok()),
            days,
        })
    }

    async fn import(&self, addresses: Vec<String>, now: Millis) -> Result<u64, TrustedError> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await?;
        let st = tx
            .prepare(
                "INSERT INTO recipients(address, domain, count, first_seen, last_seen, origin)
                 VALUES($1, $2, 0, $3, $3, 'imported') ON CONFLICT(address) DO NOTHING",
            )
            .await?;
        let mut added = 0;
        let at = now as i64;
        for addr in &addresses {
            let domain = crate::envelope::domain_of(addr);
            added += tx.execute(&st, &[addr, &domain, &at]).await?;
        }
        tx.commit().await?;
        Ok(added)
    }

    async fn mark_suspect(
        &self,
        suspected: Suspected,
        tag: String,
        since: Millis,
    ) -> Result<u64, TrustedError> {
        let (sql, who) = match suspected {
            Suspected::Sender(s) => (
                "UPDATE recipients SET origin = 'suspect', suspect = $1
                 WHERE origin = 'learned' AND first_seen >= $2
                   AND address IN (SELECT recipient FROM pairs WHERE lower(sender) = $3)",
                s,
            ),
            Suspected::Domain(d) => (
                "UPDATE recipients SET origin = 'suspect', suspect = $1
                 WHERE origin = 'learned' AND first_seen >= $2
                   AND address IN (SELECT recipient FROM pairs
                                   WHERE lower(right(sender, length($3) + 1)) = '@' || $3)",
                d,
            ),
        };
        let c = self.pg.client().await?;
        Ok(c.execute(sql, &[&tag, &(since as i64), &who]).await?)
    }

    async fn clear_suspect(&self, tag: String, how: Settle) -> Result<u64, TrustedError> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await?;
        let n = match how {
            Settle::Release => {
                tx.execute(
                    "UPDATE recipients SET origin = 'learned', suspect = NULL WHERE suspect = $1",
                    &[&tag],
                )
                .await?
            }
            Settle::Discard => {
                tx.execute(
                    "DELETE FROM pairs WHERE recipient IN
                     (SELECT address FROM recipients WHERE suspect = $1)",
                    &[&tag],
                )
                .await?;
                tx.execute("DELETE FROM recipients WHERE suspect = $1", &[&tag])
                    .await?
            }
        };
        tx.commit().await?;
        Ok(n)
    }
}
