//! An embedded SQLite file for one node's shared state: opened in WAL mode with its
//! schemas migrated, and used from async code on the blocking pool.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension};

use super::schema::Schema;
use super::StoreError;

/// One connection to one file. Calls are short and serialized by the mutex; they run
/// on tokio's blocking pool through [`Db::run`].
pub struct Db {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl Db {
    /// Opens (or creates) the file and applies what each schema has not applied yet.
    /// `durable`: `synchronous=FULL`, for what a batch promised to keep; otherwise
    /// `NORMAL`, where a power cut may cost the last second of counters, never mail.
    pub fn open(path: &Path, schemas: &[&Schema], durable: bool) -> Result<Db, StoreError> {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let err = |e| StoreError::sqlite(path, e);
        let mut conn = Connection::open(path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", if durable { "FULL" } else { "NORMAL" })
            .map_err(err)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(err)?;
        for schema in schemas {
            migrate(&mut conn, schema).map_err(|e| match e {
                Migrate::Sql(e) => err(e),
                Migrate::Newer(found) => StoreError::Newer {
                    schema: schema.name,
                    found,
                    known: schema.migrations.len(),
                },
            })?;
        }
        Ok(Db {
            path: path.to_owned(),
            conn: Mutex::new(conn),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` with the connection on the blocking pool.
    pub async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Connection) -> Result<T, rusqlite::Error> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = db.lock();
            f(&mut conn).map_err(|e| StoreError::sqlite(&db.path, e))
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

/// A store's writer thread: it owns `serve`, which takes requests from the returned
/// sender until every clone of it is dropped (the store with it), and then ends.
pub fn writer<T: Send + 'static>(
    name: &str,
    serve: impl FnOnce(std::sync::mpsc::Receiver<T>) + Send + 'static,
) -> Result<std::sync::mpsc::Sender<T>, StoreError> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || serve(rx))
        .map_err(|e| StoreError::Task(format!("{name} writer not started: {e}")))?;
    Ok(tx)
}

enum Migrate {
    Sql(rusqlite::Error),
    Newer(i64),
}

impl From<rusqlite::Error> for Migrate {
    fn from(e: rusqlite::Error) -> Migrate {
        Migrate::Sql(e)
    }
}

fn migrate(conn: &mut Connection, schema: &Schema) -> Result<(), Migrate> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_versions(name TEXT PRIMARY KEY, version INTEGER NOT NULL)",
    )?;
    let recorded: Option<i64> = tx
        .query_row(
            "SELECT version FROM schema_versions WHERE name = ?1",
            [schema.name],
            |r| r.get(0),
        )
        .optional()?;
    let version = match recorded {
        Some(v) => v,
        None => {
            let legacy: i64 = tx.query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
                [schema.probe],
                |r| r.get(0),
            )?;
            legacy.min(1)
        }
    };
    let done = usize::try_from(version).unwrap_or(usize::MAX);
    if done > schema.migrations.len() {
        return Err(Migrate::Newer(version));
    }
    for m in schema.migrations.iter().skip(done) {
        tx.execute_batch(m.sqlite)?;
    }
    tx.execute(
        "INSERT INTO schema_versions(name, version) VALUES(?1, ?2)
         ON CONFLICT(name) DO UPDATE SET version = excluded.version",
        rusqlite::params![schema.name, schema.migrations.len() as i64],
    )?;
    tx.commit()?;
    Ok(())
}
