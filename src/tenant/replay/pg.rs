//! The signature memory in the cluster's PostgreSQL: one statement, one round trip,
//! per DKIM-proved message. Two nodes seeing a signature at once both get the row the
//! first one wrote (the upsert waits for the other's commit).

use super::{Key, Seen};
use crate::envelope::Millis;
use crate::store::{Postgres, StoreError};

#[derive(Clone)]
pub struct PgSignatures {
    pg: Postgres,
}

impl PgSignatures {
    pub fn new(pg: Postgres) -> PgSignatures {
        PgSignatures { pg }
    }
}

/// The signature row (inserted, or the existing one through a no-op update), how many
/// of the recipients were known before, and the recipients added while the signature is
/// within its window. Data-modifying CTEs see the snapshot before the statement, so
/// `known` counts what was there before this use.
const REMEMBER: &str = "
WITH sig AS (
    INSERT INTO dkim_signatures(hash, domain, first_seen, node) VALUES($1, $2, $3, $4)
    ON CONFLICT(hash) DO UPDATE SET hash = excluded.hash
    RETURNING first_seen, node, (xmax = 0) AS inserted
), known AS (
    SELECT COUNT(*) AS n FROM dkim_recipients WHERE hash = $1 AND recipient = ANY($5)
), added AS (
    INSERT INTO dkim_recipients(hash, recipient)
    SELECT $1, r FROM unnest($5::TEXT[]) AS r, sig WHERE sig.first_seen >= $6
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT sig.first_seen, sig.node, sig.inserted, known.n, (SELECT COUNT(*) FROM added)
FROM sig, known";

impl super::Backend for PgSignatures {
    async fn remember(
        &self,
        key: Key,
        domain: &str,
        recipients: Vec<String>,
        now: Millis,
        window_start: Millis,
        node: &str,
    ) -> Result<Seen, StoreError> {
        let c = self.pg.client().await?;
        let row = c
            .query_one(
                REMEMBER,
                &[
                    &&key[..],
                    &domain,
                    &(now as i64),
                    &node,
                    &recipients,
                    &(window_start as i64),
                ],
            )
            .await?;
        Ok(Seen {
            first_seen: row.get::<_, i64>(0) as u64,
            node: row.get(1),
            inserted: row.get(2),
            known: usize::try_from(row.get::<_, i64>(3)).unwrap_or(0),
        })
    }

    async fn prune(&self, before: Millis) -> Result<u64, StoreError> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await?;
        let before = before as i64;
        tx.execute(
            "DELETE FROM dkim_recipients WHERE hash IN (SELECT hash FROM dkim_signatures WHERE first_seen < $1)",
            &[&before],
        )
        .await?;
        let n = tx
            .execute(
                "DELETE FROM dkim_signatures WHERE first_seen < $1",
                &[&before],
            )
            .await?;
        tx.commit().await?;
        Ok(n)
    }
}
