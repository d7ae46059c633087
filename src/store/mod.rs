//! The shared-state store below `trusted` and `admin`: embedded SQLite files for one
//! node (each owner opens its own, as before), or one PostgreSQL database for several
//! nodes. This module holds what both owners need for PostgreSQL: the connection pool,
//! the schema and its migrations, and a health check for `/readyz`.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use crate::config::StoreConfig;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Config(String),
    #[error("PostgreSQL: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("PostgreSQL pool: {0}")]
    Pool(String),
    #[error("PostgreSQL store has schema version {found}, newer than this relay knows ({known})")]
    Newer { found: i64, known: usize },
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> StoreError {
        StoreError::Pool(e.to_string())
    }
}

/// Each step runs once, in a transaction, in order; `smartrelay_schema` says how many
/// did. The tables are those of the two SQLite files, under the same names, so an
/// operator reads them the same way.
const MIGRATIONS: &[&str] = &["
    CREATE TABLE recipients(
        address TEXT PRIMARY KEY,
        domain TEXT NOT NULL,
        count BIGINT NOT NULL,
        first_seen BIGINT NOT NULL,
        last_seen BIGINT NOT NULL,
        origin TEXT NOT NULL DEFAULT 'learned');
    CREATE INDEX recipients_domain ON recipients(domain);
    CREATE INDEX recipients_last_seen ON recipients(last_seen);
    CREATE TABLE pairs(
        sender TEXT NOT NULL,
        recipient TEXT NOT NULL,
        count BIGINT NOT NULL,
        first_seen BIGINT NOT NULL,
        last_seen BIGINT NOT NULL,
        PRIMARY KEY(sender, recipient));
    CREATE INDEX pairs_recipient ON pairs(recipient);
    CREATE INDEX pairs_last_seen ON pairs(last_seen);
    CREATE TABLE daily(day BIGINT PRIMARY KEY, added BIGINT NOT NULL, deliveries BIGINT NOT NULL);
    CREATE TABLE trusted_meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE sources(
        ip TEXT PRIMARY KEY,
        connections BIGINT NOT NULL DEFAULT 0,
        refused BIGINT NOT NULL DEFAULT 0,
        messages BIGINT NOT NULL DEFAULT 0,
        first_seen BIGINT NOT NULL,
        last_seen BIGINT NOT NULL);
    CREATE TABLE flow(
        hour BIGINT NOT NULL, metric TEXT NOT NULL, key TEXT NOT NULL,
        count BIGINT NOT NULL, PRIMARY KEY(hour, metric, key));
"];

/// Rows per multi-row statement: well under PostgreSQL's 65,535 parameters.
pub const ROWS_PER_STATEMENT: usize = 1000;

/// `($1, $2, $3), ($4, $5, $6)` for `rows` rows of `cols` parameters: the VALUES of a
/// multi-row INSERT.
pub fn values_list(rows: usize, cols: usize) -> String {
    (0..rows)
        .map(|r| {
            let cells: Vec<String> = (1..=cols).map(|c| format!("${}", r * cols + c)).collect();
            format!("({})", cells.join(", "))
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// A pool of connections to the shared database.
#[derive(Clone)]
pub struct Postgres {
    pool: Pool,
}

impl Postgres {
    /// Builds the pool; connects lazily, so a relay starts (and takes mail) while the
    /// database is down. `migrate` needs it up.
    pub fn new(cfg: &StoreConfig) -> Result<Postgres, StoreError> {
        let url = cfg
            .resolved_url()
            .ok_or_else(|| StoreError::Config("store.url is not set".into()))?;
        let mut pg: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| StoreError::Config(e.to_string()))?;
        if pg.get_password().is_none() {
            if let Ok(p) = std::env::var("PGPASSWORD") {
                pg.password(p);
            }
        }
        // Short: while the database is down, each attempt costs the recorder this long.
        pg.connect_timeout(Duration::from_secs(2));
        pg.application_name("smartrelay");
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(8)
            .wait_timeout(Some(Duration::from_secs(2)))
            .create_timeout(Some(Duration::from_secs(2)))
            .recycle_timeout(Some(Duration::from_secs(2)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Pool(e.to_string()))?;
        Ok(Postgres { pool })
    }

    pub async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.pool.get().await?)
    }

    /// Applies the migrations not applied yet. Several nodes starting at once take an
    /// advisory lock, so each step runs once.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock(7130501)", &[])
            .await?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS smartrelay_schema(version BIGINT NOT NULL)")
            .await?;
        let row = tx
            .query_opt("SELECT version FROM smartrelay_schema", &[])
            .await?;
        let version: i64 = match row {
            Some(r) => r.get(0),
            None => {
                tx.execute("INSERT INTO smartrelay_schema(version) VALUES(0)", &[])
                    .await?;
                0
            }
        };
        let done = usize::try_from(version).unwrap_or(usize::MAX);
        if done > MIGRATIONS.len() {
            return Err(StoreError::Newer {
                found: version,
                known: MIGRATIONS.len(),
            });
        }
        for m in MIGRATIONS.iter().skip(done) {
            tx.batch_execute(m).await?;
        }
        tx.execute(
            "UPDATE smartrelay_schema SET version = $1",
            &[&(MIGRATIONS.len() as i64)],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// For `/readyz`: the database answers within two seconds.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let check = async {
            let c = self.client().await?;
            c.simple_query("SELECT 1").await?;
            Ok::<_, StoreError>(())
        };
        tokio::time::timeout(Duration::from_secs(2), check)
            .await
            .map_err(|_| StoreError::Pool("no answer within 2s".into()))?
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn values_list_numbers_every_parameter_once() {
        assert_eq!(super::values_list(2, 3), "($1, $2, $3),($4, $5, $6)");
        assert_eq!(super::values_list(0, 3), "");
    }
}
