//! Where the limits keep what must outlive a process and reach every node: SQLite on
//! one node, PostgreSQL for several, behind one trait (`model::Backend`).

use std::sync::Arc;

use super::counts::Slot;
use super::model::{Added, Backend, Restriction, Row};
use super::pg::PgLimits;
use super::sqlite::SqliteLimits;
use crate::envelope::{LimitKey, Millis, Settle};
use crate::store::StoreError;

#[derive(Clone)]
pub enum Store {
    Sqlite(Arc<SqliteLimits>),
    Postgres(PgLimits),
}

impl Store {
    pub fn open(path: &std::path::Path) -> Result<Store, StoreError> {
        Ok(Store::Sqlite(Arc::new(SqliteLimits::open(path)?)))
    }

    pub fn shared(pg: crate::store::Postgres) -> Store {
        Store::Postgres(PgLimits::new(pg))
    }

    pub async fn add(
        &self,
        added: Vec<Added>,
        now_us: u64,
        now: Millis,
    ) -> Result<Vec<(Slot, u64)>, StoreError> {
        match self {
            Store::Sqlite(s) => s.add(added, now_us, now).await,
            Store::Postgres(p) => p.add(added, now_us, now).await,
        }
    }

    pub async fn changed_cells(&self, since: Millis) -> Result<Vec<(Slot, u64)>, StoreError> {
        match self {
            Store::Sqlite(s) => s.changed_cells(since).await,
            Store::Postgres(p) => p.changed_cells(since).await,
        }
    }

    pub async fn reset(&self, rules: Vec<String>, value: String) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.reset(rules, value).await,
            Store::Postgres(p) => p.reset(rules, value).await,
        }
    }

    pub async fn restrict(&self, r: Restriction, now: Millis) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => s.restrict(r, now).await,
            Store::Postgres(p) => p.restrict(r, now).await,
        }
    }

    pub async fn lift(
        &self,
        key: LimitKey,
        value: String,
        how: Settle,
        now: Millis,
    ) -> Result<Option<Restriction>, StoreError> {
        match self {
            Store::Sqlite(s) => s.lift(key, value, how, now).await,
            Store::Postgres(p) => p.lift(key, value, how, now).await,
        }
    }

    pub async fn changed_rows(&self, since: Millis) -> Result<Vec<Row>, StoreError> {
        match self {
            Store::Sqlite(s) => s.changed_rows(since).await,
            Store::Postgres(p) => p.changed_rows(since).await,
        }
    }

    pub async fn prune(&self, before: Millis) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(s) => s.prune(before).await,
            Store::Postgres(p) => p.prune(before).await,
        }
    }
}
