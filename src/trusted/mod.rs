//! The trusted-sender list the gateway learns from outbound mail: every external
//! recipient an internal user's message was delivered to, with counts and times.
//! `policy` decides what counts, `recorder` feeds the list from the delivery events,
//! `export` turns it into CSV or JSON. The list is kept by a [`Backend`]: the node's
//! SQLite file (`sqlite`) or the cluster's PostgreSQL (`pg`), behind one [`Store`].

pub mod export;
pub mod model;
pub mod pg;
pub mod policy;
pub mod recorder;
pub mod sqlite;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::envelope::{Millis, Settle};
use model::{Counts, Query};
pub use model::{Filter, Origin, Page, Stats, Suspected, TrustedError, TrustedRecipient};
use policy::Observation;
pub use policy::TrustPolicy;

/// What keeps the list. Addresses and filters arrive normalized ([`Query`]).
pub trait Backend: Send + Sync + 'static {
    /// Records a batch in one transaction; returns how many addresses are new.
    fn record(
        &self,
        batch: Arc<Vec<Observation>>,
    ) -> impl Future<Output = Result<u64, TrustedError>> + Send;
    /// Drops what nothing was delivered to since `cutoff`.
    fn prune(&self, cutoff: Millis) -> impl Future<Output = Result<u64, TrustedError>> + Send;
    fn count(&self) -> impl Future<Output = Result<u64, TrustedError>> + Send;
    /// One row more than `q.limit`, in address order.
    fn list(&self, q: Query) -> impl Future<Output = Result<Page, TrustedError>> + Send;
    fn counts(&self) -> impl Future<Output = Result<Counts, TrustedError>> + Send;
    /// Adds addresses (normalized); existing entries are left as they are.
    fn import(
        &self,
        addresses: Vec<String>,
        now: Millis,
    ) -> impl Future<Output = Result<u64, TrustedError>> + Send;
    /// Marks `suspect` (tagged `tag`) the learned entries first seen since `since` that
    /// the `suspected` senders wrote to; returns how many.
    fn mark_suspect(
        &self,
        suspected: Suspected,
        tag: String,
        since: Millis,
    ) -> impl Future<Output = Result<u64, TrustedError>> + Send;
    /// A release makes the entries tagged `tag` learned again; a discard deletes them.
    fn clear_suspect(
        &self,
        tag: String,
        how: Settle,
    ) -> impl Future<Output = Result<u64, TrustedError>> + Send;
}

/// The list where it is kept: the node's SQLite file, or the cluster's PostgreSQL.
#[derive(Clone)]
pub enum Store {
    Sqlite(Arc<sqlite::SqliteTrusted>),
    Postgres(pg::PgTrusted),
}

impl Store {
    /// The embedded file.
    pub fn open(path: &Path) -> Result<Store, TrustedError> {
        Ok(Store::Sqlite(Arc::new(sqlite::SqliteTrusted::open(path)?)))
    }

    /// The cluster's database (its schema applied by the caller).
    pub fn shared(pg: crate::store::Postgres) -> Store {
        Store::Postgres(pg::PgTrusted::new(pg))
    }

    pub async fn record(&self, batch: Arc<Vec<Observation>>) -> Result<u64, TrustedError> {
        match self {
            Store::Sqlite(s) => s.record(batch).await,
            Store::Postgres(p) => p.record(batch).await,
        }
    }

    /// Removes what nothing was delivered to for `retention` before `now`.
    pub async fn prune(&self, retention: Duration, now: Millis) -> Result<u64, TrustedError> {
        let cutoff = now.saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
        match self {
            Store::Sqlite(s) => s.prune(cutoff).await,
            Store::Postgres(p) => p.prune(cutoff).await,
        }
    }

    pub async fn count(&self) -> Result<u64, TrustedError> {
        match self {
            Store::Sqlite(s) => s.count().await,
            Store::Postgres(p) => p.count().await,
        }
    }

    pub async fn list(&self, f: Filter) -> Result<Page, TrustedError> {
        let q = Query::of(f)?;
        match self {
            Store::Sqlite(s) => s.list(q).await,
            Store::Postgres(p) => p.list(q).await,
        }
    }

    pub async fn stats(&self, now: Millis, learning_days: u32) -> Result<Stats, TrustedError> {
        let counts = match self {
            Store::Sqlite(s) => s.counts().await?,
            Store::Postgres(p) => p.counts().await?,
        };
        Ok(counts.stats(now, learning_days))
    }

    pub async fn mark_suspect(
        &self,
        suspected: Suspected,
        tag: String,
        since: Millis,
    ) -> Result<u64, TrustedError> {
        match self {
            Store::Sqlite(s) => s.mark_suspect(suspected, tag, since).await,
            Store::Postgres(p) => p.mark_suspect(suspected, tag, since).await,
        }
    }

    pub async fn clear_suspect(&self, tag: String, how: Settle) -> Result<u64, TrustedError> {
        match self {
            Store::Sqlite(s) => s.clear_suspect(tag, how).await,
            Store::Postgres(p) => p.clear_suspect(tag, how).await,
        }
    }

    /// Adds addresses gathered elsewhere (anything that is not an address is skipped);
    /// returns how many were new.
    pub async fn import(&self, addresses: Vec<String>, now: Millis) -> Result<u64, TrustedError> {
        let addresses: Vec<String> = addresses
            .iter()
            .filter_map(|a| policy::normalize(a))
            .collect();
        match self {
            Store::Sqlite(s) => s.import(addresses, now).await,
            Store::Postgres(p) => p.import(addresses, now).await,
        }
    }
}
