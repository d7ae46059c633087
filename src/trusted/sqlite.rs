//! The trusted-sender list in the node's SQLite file (`trusted.database`, WAL,
//! `synchronous=FULL`): a crash loses at most the batch being built. Usable with the
//! `sqlite3` shell; the tables are in `store::schema::TRUSTED`.

use std::path::Path;
use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension};

use super::model::{
    Counts, Origin, Page, Query, Suspected, TrustedError, TrustedRecipient, DAY_MS,
};
use super::policy::Observation;
use crate::envelope::{Millis, Settle};
use crate::store::schema;
use crate::store::sqlite::Db;

pub struct SqliteTrusted {
    db: Arc<Db>,
}

impl SqliteTrusted {
    pub fn open(path: &Path) -> Result<SqliteTrusted, TrustedError> {
        Ok(SqliteTrusted {
            db: Arc::new(Db::open(path, &[&schema::TRUSTED], true)?),
        })
    }
}

impl super::Backend for SqliteTrusted {
    async fn record(&self, batch: Arc<Vec<Observation>>) -> Result<u64, TrustedError> {
        Ok(self.db.run(move |c| record(c, &batch)).await?)
    }

    async fn prune(&self, cutoff: Millis) -> Result<u64, TrustedError> {
        let cutoff = cutoff as i64;
        Ok(self
            .db
            .run(move |c| {
                let tx = c.transaction()?;
                let n = tx.execute("DELETE FROM recipients WHERE last_seen < ?1", [cutoff])?;
                tx.execute("DELETE FROM pairs WHERE last_seen < ?1", [cutoff])?;
                tx.commit()?;
                Ok(n as u64)
            })
            .await?)
    }

    async fn count(&self) -> Result<u64, TrustedError> {
        Ok(self
            .db
            .run(|c| {
                c.query_row("SELECT COUNT(*) FROM recipients", [], |r| {
                    r.get::<_, i64>(0)
                })
                .map(|n| n as u64)
            })
            .await?)
    }

    async fn list(&self, q: Query) -> Result<Page, TrustedError> {
        let limit = q.limit;
        let entries = self.db.run(move |c| list(c, &q)).await?;
        Ok(Page::cut(entries, limit))
    }

    async fn counts(&self) -> Result<Counts, TrustedError> {
        Ok(self.db.run(counts).await?)
    }

    async fn import(&self, addresses: Vec<String>, now: Millis) -> Result<u64, TrustedError> {
        Ok(self
            .db
            .run(move |c| {
                let tx = c.transaction()?;
                let mut added = 0;
                {
                    let mut ins = tx.prepare_cached(
                        "INSERT INTO recipients(address, domain, count, first_seen, last_seen, origin)
                         VALUES(?1, ?2, 0, ?3, ?3, 'imported') ON CONFLICT(address) DO NOTHING",
                    )?;
                    for addr in &addresses {
                        let domain = crate::envelope::domain_of(addr);
                        added += ins.execute(params![addr, domain, now as i64])? as u64;
                    }
                }
                tx.commit()?;
                Ok(added)
            })
            .await?)
    }

    async fn mark_suspect(
        &self,
        suspected: Suspected,
        tag: String,
        since: Millis,
    ) -> Result<u64, TrustedError> {
        Ok(self
            .db
            .run(move |c| {
                let (sql, who) = match suspected {
                    Suspected::Sender(s) => (MARK_SENDER, s),
                    Suspected::Domain(d) => (MARK_DOMAIN, d),
                };
                c.execute(sql, params![tag, since as i64, who])
                    .map(|n| n as u64)
            })
            .await?)
    }

    async fn clear_suspect(&self, tag: String, how: Settle) -> Result<u64, TrustedError> {
        Ok(self
            .db
            .run(move |c| {
                let tx = c.transaction()?;
                let n = match how {
                    Settle::Release => tx.execute(
                        "UPDATE recipients SET origin = 'learned', suspect = NULL WHERE suspect = ?1",
                        [&tag],
                    )?,
                    Settle::Discard => {
                        tx.execute(
                            "DELETE FROM pairs WHERE recipient IN
                             (SELECT address FROM recipients WHERE suspect = ?1)",
                            [&tag],
                        )?;
                        tx.execute("DELETE FROM recipients WHERE suspect = ?1", [&tag])?
                    }
                };
                tx.commit()?;
                Ok(n as u64)
            })
            .await?)
    }
}

const MARK_SENDER: &str = "UPDATE recipients SET origin = 'suspect', suspect = ?1
     WHERE origin = 'learned' AND first_seen >= ?2
       AND address IN (SELECT recipient FROM pairs WHERE lower(sender) = ?3)";
const MARK_DOMAIN: &str = "UPDATE recipients SET origin = 'suspect', suspect = ?1
     WHERE origin = 'learned' AND first_seen >= ?2
       AND address IN (SELECT recipient FROM pairs
                       WHERE lower(substr(sender, -(length(?3) + 1))) = '@' || ?3)";

/// One transaction per batch; returns how many addresses are new.
fn record(c: &mut Connection, batch: &[Observation]) -> Result<u64, rusqlite::Error> {
    let tx = c.transaction()?;
    let mut added = 0u64;
    {
        let mut exists = tx.prepare_cached("SELECT 1 FROM recipients WHERE address = ?1")?;
        let mut rcpt = tx.prepare_cached(
            "INSERT INTO recipients(address, domain, count, first_seen, last_seen) VALUES(?1, ?2, 1, ?3, ?3)
             ON CONFLICT(address) DO UPDATE SET count = count + 1,
                first_seen = MIN(first_seen, excluded.first_seen),
                last_seen = MAX(last_seen, excluded.last_seen)",
        )?;
        let mut pair = tx.prepare_cached(
            "INSERT INTO pairs(sender, recipient, count, first_seen, last_seen) VALUES(?1, ?2, 1, ?3, ?3)
             ON CONFLICT(sender, recipient) DO UPDATE SET count = count + 1,
                first_seen = MIN(first_seen, excluded.first_seen),
                last_seen = MAX(last_seen, excluded.last_seen)",
        )?;
        let mut daily = tx.prepare_cached(
            "INSERT INTO daily(day, added, deliveries) VALUES(?1, ?2, 1)
             ON CONFLICT(day) DO UPDATE SET added = added + excluded.added, deliveries = deliveries + 1",
        )?;
        for o in batch {
            let is_new = exists
                .query_row([&o.recipient], |_| Ok(()))
                .optional()?
                .is_none();
            rcpt.execute(params![o.recipient, o.domain, o.at as i64])?;
            pair.execute(params![o.sender, o.recipient, o.at as i64])?;
            daily.execute(params![(o.at / DAY_MS) as i64, is_new as i64])?;
            added += is_new as u64;
        }
        if let Some(first) = batch.iter().map(|o| o.at).min() {
            tx.execute(
                "INSERT INTO meta(key, value) VALUES('first_delivery', ?1)
                 ON CONFLICT(key) DO UPDATE SET value = MIN(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))",
                [first.to_string()],
            )?;
        }
    }
    tx.commit()?;
    Ok(added)
}

/// A page in address order (stable across pages), one row more than asked.
fn list(c: &mut Connection, q: &Query) -> Result<Vec<TrustedRecipient>, rusqlite::Error> {
    let sql = if q.sender.is_some() {
        // Per internal user: the pair's own counts and times.
        "SELECT r.address, r.domain, p.count, p.first_seen, p.last_seen, 1, r.origin
         FROM pairs p JOIN recipients r ON r.address = p.recipient
         WHERE p.sender = ?1 AND (?2 IS NULL OR r.domain = ?2) AND (?3 IS NULL OR p.last_seen >= ?3)
           AND (?4 IS NULL OR p.count >= ?4) AND (?5 IS NULL OR r.address > ?5)
           AND (?7 OR r.origin <> 'suspect')
         ORDER BY r.address LIMIT ?6"
    } else {
        "SELECT r.address, r.domain, r.count, r.first_seen, r.last_seen,
                (SELECT COUNT(*) FROM pairs p WHERE p.recipient = r.address), r.origin
         FROM recipients r
         WHERE ?1 IS NULL AND (?2 IS NULL OR r.domain = ?2) AND (?3 IS NULL OR r.last_seen >= ?3)
           AND (?4 IS NULL OR r.count >= ?4) AND (?5 IS NULL OR r.address > ?5)
           AND (?7 OR r.origin <> 'suspect')
         ORDER BY r.address LIMIT ?6"
    };
    let mut st = c.prepare(sql)?;
    let rows = st.query_map(
        params![
            q.sender,
            q.domain,
            q.since,
            q.min_count,
            q.cursor,
            q.take(),
            q.include_suspect
        ],
        |r| {
            Ok(TrustedRecipient {
                address: r.get(0)?,
                domain: r.get(1)?,
                count: r.get::<_, i64>(2)? as u64,
                first_seen: r.get::<_, i64>(3)? as u64,
                last_seen: r.get::<_, i64>(4)? as u64,
                senders: r.get::<_, i64>(5)? as u64,
                origin: Origin::parse(&r.get::<_, String>(6)?),
            })
        },
    )?;
    rows.collect()
}

fn counts(c: &mut Connection) -> Result<Counts, rusqlite::Error> {
    let one = |sql: &str| {
        c.query_row(sql, [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
    };
    let recipients = one("SELECT COUNT(*) FROM recipients")?;
    let domains = one("SELECT COUNT(DISTINCT domain) FROM recipients")?;
    let pairs = one("SELECT COUNT(*) FROM pairs")?;
    let first_delivery = c
        .query_row(
            "SELECT value FROM meta WHERE key = 'first_delivery'",
            [],
            |r| r.get::<_, String>(0),
        )
        .optional()?
        .and_then(|v| v.parse().ok());
    let mut st =
        c.prepare("SELECT day, added, deliveries FROM daily ORDER BY day DESC LIMIT 30")?;
    let days = st
        .query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)? as u64,
                r.get::<_, i64>(1)? as u64,
                r.get::<_, i64>(2)? as u64,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Counts {
        recipients,
        domains,
        pairs,
        first_delivery,
        days,
    })
}

#[cfg(test)]
mod tests {
    use super::super::model::Filter;
    use super::super::Store;
    use super::*;
    use std::time::Duration;

    fn store(name: &str) -> Store {
        let p = crate::scratch::dir(&format!("trusted-{name}")).join("trusted.sqlite3");
        Store::open(&p).unwrap()
    }

    fn obs(sender: &str, rcpt: &str, at: Millis) -> Observation {
        Observation {
            sender: sender.into(),
            recipient: rcpt.into(),
            domain: crate::envelope::domain_of(rcpt).into(),
            at,
        }
    }

    fn all() -> Filter {
        Filter {
            limit: 10,
            ..Filter::default()
        }
    }

    #[tokio::test]
    async fn counts_times_and_pairs() {
        let s = store("counts");
        let day = DAY_MS;
        let batch = vec![
            obs("a@o.test", "x@p.test", day),
            obs("b@o.test", "x@p.test", 2 * day),
        ];
        assert_eq!(s.record(Arc::new(batch)).await.unwrap(), 1);
        let batch = vec![
            obs("a@o.test", "x@p.test", 3 * day),
            obs("a@o.test", "y@q.test", 3 * day),
        ];
        assert_eq!(s.record(Arc::new(batch)).await.unwrap(), 1);
        let page = s.list(all()).await.unwrap();
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
            .list(Filter {
                sender: Some("a@O.test".into()),
                ..all()
            })
            .await
            .unwrap();
        assert_eq!(
            by_a.entries
                .iter()
                .map(|e| (e.address.as_str(), e.count))
                .collect::<Vec<_>>(),
            [("x@p.test", 2), ("y@q.test", 1)]
        );
        let stats = s.stats(4 * day + 1, 3).await.unwrap();
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
        assert!(!s.stats(2 * day, 3).await.unwrap().ready);
        assert!(matches!(
            s.list(Filter {
                sender: Some("not an address".into()),
                ..all()
            })
            .await,
            Err(TrustedError::Invalid(_))
        ));
    }

    #[tokio::test]
    async fn paging_is_stable_and_complete() {
        let s = store("paging");
        let batch: Vec<Observation> = (0..25)
            .map(|i| obs("a@o.test", &format!("r{i:02}@p.test"), 5))
            .collect();
        s.record(Arc::new(batch)).await.unwrap();
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let page = s
                .list(Filter {
                    cursor: cursor.clone(),
                    ..all()
                })
                .await
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

    #[tokio::test]
    async fn expiry_uses_the_given_clock() {
        let s = store("expiry");
        let batch = vec![
            obs("a@o.test", "old@p.test", 0),
            obs("a@o.test", "new@p.test", 100 * DAY_MS),
        ];
        s.record(Arc::new(batch)).await.unwrap();
        let retention = Duration::from_millis(120 * DAY_MS);
        assert_eq!(s.prune(retention, 119 * DAY_MS).await.unwrap(), 0);
        assert_eq!(s.prune(retention, 121 * DAY_MS).await.unwrap(), 1);
        let left = s.list(all()).await.unwrap();
        assert_eq!(left.entries.len(), 1);
        assert_eq!(left.entries[0].address, "new@p.test");
    }

    #[tokio::test]
    async fn import_keeps_existing() {
        let s = store("import");
        s.record(Arc::new(vec![obs("a@o.test", "x@p.test", 5)]))
            .await
            .unwrap();
        let added = s
            .import(
                vec!["x@P.test".into(), "new@q.test".into(), "junk".into()],
                9,
            )
            .await
            .unwrap();
        assert_eq!(added, 1);
        let page = s.list(all()).await.unwrap();
        assert_eq!(page.entries.len(), 2);
        assert_eq!(page.entries[0].origin, Origin::Imported);
        assert_eq!(page.entries[1].count, 1);
    }
}
