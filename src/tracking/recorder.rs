//! Feeds tracking from the event bus off the accept path: events become changes, and
//! the changes go to the store in batches (one transaction per `batch_size` events or
//! per second). While the store cannot be written (a PostgreSQL outage) the changes wait,
//! up to a bound, and the oldest are dropped and counted beyond it. A crash loses at
//! most the changes of the last second, never mail.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::model::{changes, fold, Change, Keep};
use super::Store;
use crate::events::Event;

/// Events per batch.
pub const BATCH: usize = 16_384;
/// How long a batch waits to fill.
pub const FLUSH: Duration = Duration::from_secs(1);
/// Changes kept while the store is down.
pub const BUFFER: usize = 200_000;
/// How long a store that failed a write is left alone.
const RETRY_AFTER: Duration = Duration::from_secs(5);

pub async fn record(
    store: Store,
    keep: Keep,
    mut rx: mpsc::Receiver<Arc<Event>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut pending: Vec<Change> = Vec::new();
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        let wake = retry_at.filter(|_| !pending.is_empty());
        let Some(events) =
            crate::events::next_batch_or_wake(&mut rx, &mut stop, BATCH, FLUSH, wake).await
        else {
            break;
        };
        let before = pending.len();
        for ev in &events {
            changes(ev, &keep, &mut pending);
        }
        metrics::counter!(crate::telemetry::TRACKING_EVENTS_TOTAL)
            .increment((pending.len() - before) as u64);
        let over = pending.len().saturating_sub(BUFFER);
        if over > 0 {
            pending.drain(..over);
            metrics::counter!(crate::telemetry::TRACKING_EVENTS_DROPPED_TOTAL)
                .increment(over as u64);
            tracing::warn!(
                dropped = over,
                "tracking store unavailable too long: oldest tracking changes dropped"
            );
        }
        let now = tokio::time::Instant::now();
        if retry_at.is_none_or(|t| now >= t) {
            retry_at = if flush(&store, &mut pending).await {
                None
            } else {
                Some(now + RETRY_AFTER)
            };
        }
    }
    flush(&store, &mut pending).await;
}

async fn flush(store: &Store, pending: &mut Vec<Change>) -> bool {
    if pending.is_empty() {
        return true;
    }
    // The next batch is likely about as large: growing it again costs page faults.
    let next = Vec::with_capacity(pending.len());
    let batch = Arc::new(fold(std::mem::replace(pending, next)));
    let started = Instant::now();
    match store.apply(batch.clone()).await {
        Ok(_) => {
            metrics::histogram!(crate::telemetry::TRACKING_WRITE_SECONDS)
                .record(started.elapsed().as_secs_f64());
            true
        }
        Err(e) => {
            tracing::error!(error = %e, changes = batch.len(), "tracking batch not written; kept for the next attempt");
            *pending = Arc::try_unwrap(batch).unwrap_or_else(|shared| (*shared).clone());
            false
        }
    }
}
