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
    /// To the writer thread, which owns the checks: it ends when this is dropped.
    checks: std::sync::mpsc::Sender<Check>,
}

/// One use of a signature to check and remember, and where its answer goes.
struct Check {
    key: Key,
    domain: String,
    recipients: Vec<String>,
    now: Millis,
    window_start: Millis,
    node: String,
    answer: tokio::sync::oneshot::Sender<Result<Seen, StoreError>>,
}

/// Checks that arrive together share one transaction, up to this many.
const GROUP: usize = 128;

impl SqliteSignatures {
    /// Its own connection to the file: a check never waits behind a batch of the
    /// activity recorder.
    pub fn open(path: &Path) -> Result<SqliteSignatures, StoreError> {
        let db = Arc::new(Db::open(path, &[&schema::SIGNATURES], false)?);
        let writer = db.clone();
        let checks =
            crate::store::sqlite::writer("dkim-signatures", move |queue| serve(&writer, &queue))?;
        Ok(SqliteSignatures { db, checks })
    }
}

/// The writer: every session of a busy shared range checks a signature per message,
/// and one transaction (one WAL commit) for all the checks waiting costs little more
/// than one for each. Checks run in arrival order inside it, so two uses of the same
/// signature in one group see each other.
fn serve(db: &Db, queue: &std::sync::mpsc::Receiver<Check>) {
    while let Ok(first) = queue.recv() {
        let mut group = vec![first];
        while group.len() < GROUP {
            match queue.try_recv() {
                Ok(c) => group.push(c),
                Err(_) => break,
            }
        }
        let mut conn = db.lock();
        // Most uses of a busy signature change nothing (a retry to recipients it was
        // accepted for): those are answered from a read, without the write lock the
        // activity recorder's batches also take.
        let refs: Vec<&Check> = group.iter().collect();
        if let Ok(Some(seen)) = read_only(&mut conn, &refs) {
            for (c, s) in group.into_iter().zip(seen) {
                let _ = c.answer.send(Ok(s));
            }
            continue;
        }
        let together = (|| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let seen = group
                .iter()
                .map(|c| remember(&tx, c))
                .collect::<Result<Vec<_>, _>>()?;
            tx.commit()?;
            Ok::<_, rusqlite::Error>(seen)
        })();
        match together {
            Ok(seen) => {
                for (c, s) in group.into_iter().zip(seen) {
                    let _ = c.answer.send(Ok(s));
                }
            }
            // Each on its own, so each gets its own answer.
            Err(_) => {
                for c in group {
                    let alone = (|| {
                        let tx = conn
                            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                        let s = remember(&tx, &c)?;
                        tx.commit()?;
                        Ok::<_, rusqlite::Error>(s)
                    })();
                    let _ = c
                        .answer
                        .send(alone.map_err(|e| StoreError::sqlite(db.path(), e)));
                }
            }
        }
    }
}

/// Every check answered from a read, or `None` when one of them would write (a first
/// use, or new recipients within the window).
fn read_only(
    conn: &mut rusqlite::Connection,
    group: &[&Check],
) -> Result<Option<Vec<Seen>>, rusqlite::Error> {
    let tx = conn.transaction()?;
    let mut answers = Vec::with_capacity(group.len());
    for c in group {
        let Some(seen) = lookup(&tx, c)? else {
            return Ok(None);
        };
        if seen.first_seen >= c.window_start && seen.known < c.recipients.len() {
            return Ok(None);
        }
        answers.push(seen);
    }
    Ok(Some(answers))
}

/// What the memory holds for the check's signature: when and where it was first seen
/// and how many of the check's recipients it was accepted for; `None` if never.
fn lookup(tx: &rusqlite::Transaction<'_>, c: &Check) -> Result<Option<Seen>, rusqlite::Error> {
    let found: Option<(i64, String)> = tx
        .prepare_cached("SELECT first_seen, node FROM dkim_signatures WHERE hash = ?1")?
        .query_row([&c.key[..]], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let Some((first_seen, node)) = found else {
        return Ok(None);
    };
    let mut known = 0;
    let mut st =
        tx.prepare_cached("SELECT 1 FROM dkim_recipients WHERE hash = ?1 AND recipient = ?2")?;
    for r in &c.recipients {
        known += usize::from(
            st.query_row(params![&c.key[..], r], |_| Ok(()))
                .optional()?
                .is_some(),
        );
    }
    Ok(Some(Seen {
        first_seen: first_seen as u64,
        node,
        inserted: false,
        known,
    }))
}

/// One check inside the writer's transaction. IMMEDIATE (above): the read must not be
/// upgraded to a write after the activity recorder (another connection to the same
/// file) wrote, which SQLite answers with "busy" at once, whatever the busy timeout.
fn remember(tx: &rusqlite::Transaction<'_>, c: &Check) -> Result<Seen, rusqlite::Error> {
    let seen = match lookup(tx, c)? {
        Some(seen) => seen,
        None => {
            tx.prepare_cached(
                "INSERT INTO dkim_signatures(hash, domain, first_seen, node) VALUES(?1, ?2, ?3, ?4)",
            )?
            .execute(params![&c.key[..], c.domain, c.now as i64, c.node])?;
            Seen {
                first_seen: c.now,
                node: c.node.clone(),
                inserted: true,
                known: 0,
            }
        }
    };
    if seen.first_seen >= c.window_start {
        let mut st = tx.prepare_cached(
            "INSERT INTO dkim_recipients(hash, recipient) VALUES(?1, ?2) ON CONFLICT DO NOTHING",
        )?;
        for r in &c.recipients {
            st.execute(params![&c.key[..], r])?;
        }
    }
    Ok(seen)
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
        let (answer, answered) = tokio::sync::oneshot::channel();
        let check = Check {
            key,
            domain: domain.to_string(),
            recipients,
            now,
            window_start,
            node: node.to_string(),
            answer,
        };
        let stopped = || StoreError::Task("the signature writer stopped".into());
        self.checks.send(check).map_err(|_| stopped())?;
        answered.await.map_err(|_| stopped())?
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

#[cfg(test)]
mod tests {
    use super::super::Backend;
    use super::*;

    fn store(name: &str) -> Arc<SqliteSignatures> {
        let dir = crate::scratch::dir(&format!("sigs-{name}"));
        Arc::new(SqliteSignatures::open(&dir.join("state.sqlite3")).unwrap())
    }

    /// Many sessions at once with the same new signature: the checks that arrive
    /// together share a transaction, and still exactly one of them is the first use.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_first_use_among_concurrent_checks() {
        let s = store("concurrent");
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(async move {
                    s.remember(
                        [7; 32],
                        "contoso.test",
                        vec![format!("r{i}@x.test")],
                        1000,
                        0,
                        "a",
                    )
                    .await
                    .unwrap()
                })
            })
            .collect();
        let mut firsts = 0;
        for t in tasks {
            let seen = t.await.unwrap();
            assert_eq!(seen.first_seen, 1000);
            firsts += usize::from(seen.inserted);
        }
        assert_eq!(firsts, 1);
    }

    /// A retry is answered from a read; a new recipient within the window is
    /// remembered; after the window it is not.
    #[tokio::test]
    async fn retries_read_new_recipients_write_within_the_window() {
        let s = store("retry");
        let r = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let first = s
            .remember([1; 32], "d", r(&["a"]), 10, 0, "n")
            .await
            .unwrap();
        assert!(first.inserted);
        let again = s
            .remember([1; 32], "d", r(&["a"]), 20, 0, "n")
            .await
            .unwrap();
        assert_eq!((again.inserted, again.known), (false, 1));
        let more = s
            .remember([1; 32], "d", r(&["a", "b"]), 30, 0, "n")
            .await
            .unwrap();
        assert_eq!(more.known, 1);
        let known = s
            .remember([1; 32], "d", r(&["b"]), 40, 0, "n")
            .await
            .unwrap();
        assert_eq!(known.known, 1, "b was remembered within the window");
        // window_start past first_seen: after the window nothing new is remembered.
        let late = s
            .remember([1; 32], "d", r(&["c"]), 50, 11, "n")
            .await
            .unwrap();
        assert_eq!(late.known, 0);
        let late = s
            .remember([1; 32], "d", r(&["c"]), 60, 11, "n")
            .await
            .unwrap();
        assert_eq!(late.known, 0, "c was not remembered after the window");
    }
}
