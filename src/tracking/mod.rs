//! Message tracking: what happened to message X, on any node. Every message's life
//! (received or refused, routed, each attempt with the upstream's full reply, DSNs,
//! holds and releases, expiry, removal) is recorded from the event bus, off the accept
//! path, in batches; and searched by Message-ID, queue id, sender, recipient, status
//! and time. SQLite on one node (`tracking.database`); with `[store] kind =
//! "postgres"` the cluster's database, so any node answers for every node.

pub mod model;
pub mod pg;
pub mod recorder;
pub mod sql;
pub mod sqlite;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::envelope::{now_ms, Millis};
use crate::store::StoreError;
use model::{Backend, Change, Filter, Page, Query, Record, TrackingError};

/// Where the records are kept.
#[derive(Clone)]
pub enum Store {
    Sqlite(Arc<sqlite::SqliteTracking>),
    Postgres(pg::PgTracking),
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Ok(Store::Sqlite(Arc::new(sqlite::SqliteTracking::open(path)?)))
    }

    pub fn shared(pg: crate::store::Postgres) -> Store {
        Store::Postgres(pg::PgTracking::new(pg))
    }

    pub async fn apply(&self, batch: Arc<Vec<Change>>) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(s) => s.apply(batch).await,
            Store::Postgres(p) => p.apply(batch).await,
        }
    }

    /// Newest first, a page at a time.
    pub async fn search(&self, f: &Filter) -> Result<Page, TrackingError> {
        let q = Query::of(f)?;
        let limit = q.limit;
        let rows = match self {
            Store::Sqlite(s) => s.search(q).await?,
            Store::Postgres(p) => p.search(q).await?,
        };
        Ok(model::page(rows, limit))
    }

    /// A message's whole record; `None` for an id never recorded.
    pub async fn show(&self, id: &str) -> Result<Option<Record>, TrackingError> {
        let stored = match self {
            Store::Sqlite(s) => s.show(id.to_string()).await?,
            Store::Postgres(p) => p.show(id.to_string()).await?,
        };
        Ok(stored.map(model::Rows::into_record))
    }

    /// Forgets messages received more than `retention` before now; returns how many.
    pub async fn prune(&self, retention: Duration) -> Result<u64, StoreError> {
        let cutoff: Millis =
            now_ms().saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
        match self {
            Store::Sqlite(s) => s.prune(cutoff).await,
            Store::Postgres(p) => p.prune(cutoff).await,
        }
    }
}
