//! The cluster's PostgreSQL: a connection pool that connects lazily (a relay starts and
//! takes mail while the database is down), the schemas' migrations under an advisory
//! lock, and a ping for `/readyz`.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::NoTls;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::schema::Schema;
use super::StoreError;
use crate::config::{StoreConfig, StoreTls};

/// A pool of connections to the shared database.
#[derive(Clone)]
pub struct Postgres {
    pool: Pool,
    tls: StoreTls,
}

/// `store.tls` as it applies to these hosts: unset is `verify-full`, except that a
/// Unix socket or a loopback host has nothing on the wire to protect.
pub fn effective_tls(cfg: &StoreConfig, pg: &tokio_postgres::Config) -> StoreTls {
    if let Some(t) = cfg.tls {
        return t;
    }
    let local = !pg.get_hosts().is_empty()
        && pg.get_hosts().iter().all(|h| match h {
            Host::Unix(_) => true,
            Host::Tcp(name) => {
                name.eq_ignore_ascii_case("localhost")
                    || name
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
        });
    if local {
        StoreTls::Disable
    } else {
        StoreTls::VerifyFull
    }
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
        let tls = effective_tls(cfg, &pg);
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        // The URL's own sslmode does not decide: `store.tls` does, and a mode that
        // asks for TLS never falls back to clear text.
        let manager = match tls {
            StoreTls::Disable => {
                pg.ssl_mode(SslMode::Disable);
                Manager::from_config(pg, NoTls, manager_config)
            }
            StoreTls::Require | StoreTls::VerifyFull => {
                pg.ssl_mode(SslMode::Require);
                let client = match (tls, &cfg.ca_file) {
                    (StoreTls::Require, _) => crate::client_tls::unverified(),
                    (_, Some(ca)) => crate::client_tls::ca_file(ca).map_err(StoreError::Config)?,
                    (_, None) => crate::client_tls::system_roots().map_err(StoreError::Config)?,
                };
                Manager::from_config(pg, MakeRustlsConnect::new(client), manager_config)
            }
        };
        let pool = Pool::builder(manager)
            .max_size(8)
            .wait_timeout(Some(Duration::from_secs(2)))
            .create_timeout(Some(Duration::from_secs(2)))
            .recycle_timeout(Some(Duration::from_secs(2)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Pool(e.to_string()))?;
        Ok(Postgres { pool, tls })
    }

    pub fn tls(&self) -> StoreTls {
        self.tls
    }

    pub async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.pool.get().await?)
    }

    /// Applies what each schema has not applied yet. Several nodes starting at once
    /// take an advisory lock, so each step runs once.
    pub async fn migrate(&self, schemas: &[&Schema]) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock(7130501)", &[])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS smartrelay_schema_versions(name TEXT PRIMARY KEY, version BIGINT NOT NULL)",
        )
        .await?;
        for schema in schemas {
            let recorded = tx
                .query_opt(
                    "SELECT version FROM smartrelay_schema_versions WHERE name = $1",
                    &[&schema.name],
                )
                .await?;
            let version: i64 = match recorded {
                Some(r) => r.get(0),
                // A database a relay made before versions were kept per schema.
                None => tx
                    .query_one("SELECT COUNT(*) FROM pg_tables WHERE schemaname = current_schema() AND tablename = $1", &[&schema.probe])
                    .await?
                    .get::<_, i64>(0)
                    .min(1),
            };
            let done = usize::try_from(version).unwrap_or(usize::MAX);
            if done > schema.migrations.len() {
                return Err(StoreError::Newer {
                    schema: schema.name,
                    found: version,
                    known: schema.migrations.len(),
                });
            }
            for m in schema.migrations.iter().skip(done) {
                tx.batch_execute(m.postgres).await?;
            }
            tx.execute(
                "INSERT INTO smartrelay_schema_versions(name, version) VALUES($1, $2)
                 ON CONFLICT(name) DO UPDATE SET version = excluded.version",
                &[&schema.name, &(schema.migrations.len() as i64)],
            )
            .await?;
        }
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
