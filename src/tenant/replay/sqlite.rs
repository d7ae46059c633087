//! The signature memory in the node's state file (`admin.database`).

use std::path::Path;
use std::sync::Arc;

use rusqlite::{params, OptionalExtension};

use super::{Key, Seen};
use crate::envelope::Millis;
use crate::store::schema;
use crate::store::sqlite::Db;
use crate::store::StoreError;

pub struct SqliteSignatures {
    db: Arc<Db>,
}

impl SqliteSignatures {
    /// Its own connection to the file: a check never waits behind a batch of the
    /// activity recorder.
    pub fn open(path: &Path) -> Result<SqliteSignatures, StoreError> {
        Ok(SqliteSignatures {
            db: Arc::new(Db::open(path, &[&schema::SIGNATURES], false)?),
        })
    }
}

impl super::Backend for SqliteSignatures {
    async fn remember(
        &self,
        key: Key,
        domain: &str,
        recipients: Vec<String>,
        now: Millis,
        window_start: Millis,
        node: &str,
    ) -> Result<Seen, StoreError> {
        let (domain, node) = (domain.to_string(), node.to_string());
        self.db
            .run(move |c| {
                // IMMEDIATE: the read below must not be upgraded to a write after the
                // activity recorder (another connection to the same file) wrote, which
                // SQLite answers with "busy" at once, whatever the busy timeout.
                let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                let found: Option<(i64, String)> = tx
                    .query_row(
                        "SELECT first_seen, node FROM dkim_signatures WHERE hash = ?1",
                        [&key[..]],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                let seen = match found {
                    Some((first_seen, node)) => {
                        let mut known = 0;
                        {
                            let mut st = tx.prepare_cached(
                                "SELECT 1 FROM dkim_recipients WHERE hash = ?1 AND recipient = ?2",
                            )?;
                            for r in &recipients {
                                known += usize::from(
                                    st.query_row(params![&key[..], r], |_| Ok(()))
                                        .optional()?
                                        .is_some(),
                                );
                            }
                        }
                        Seen {
                            first_seen: first_seen as u64,
                            node,
                            inserted: false,
                            known,
                        }
                    }
                    None => {
                        tx.execute(
                            "INSERT INTO dkim_signatures(hash, domain, first_seen, node) VALUES(?1, ?2, ?3, ?4)",
                            params![&key[..], domain, now as i64, node],
                        )?;
                        Seen {
                            first_seen: now,
                            node,
                            inserted: true,
                            known: 0,
                        }
                    }
                };
                if seen.first_seen >= window_start {
                    let mut st = tx.prepare_cached(
                        "INSERT INTO dkim_recipients(hash, recipient) VALUES(?1, ?2) ON CONFLICT DO NOTHING",
                    )?;
                    for r in &recipients {
                        st.execute(params![&key[..], r])?;
                    }
                }
                tx.commit()?;
                Ok(seen)
            })
            .await
    }

    async fn prune(&self, before: Millis) -> Result<u64, StoreError> {
        self.db
            .run(move |c| {
                let tx = c.transaction()?;
                tx.execute(
                    "DELETE FROM dkim_recipients WHERE hash IN (SELECT hash FROM dkim_signatures WHERE first_seen < ?1)",
                    [before as i64],
                )?;
                let n = tx.execute(
                    "DELETE FROM dkim_signatures WHERE first_seen < ?1",
                    [before as i64],
                )?;
                tx.commit()?;
                Ok(n as u64)
            })
            .await
    }
}
