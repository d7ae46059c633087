//! Feeds the store from the delivery events off the hot path: observations are batched
//! (one transaction per `batch_size` or `flush_interval`), and what is pending is written
//! when the event stream closes at shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::policy::{Observation, TrustPolicy};
use super::store::Store;
use crate::events::Event;
use crate::live::Live;

/// `policy` is read once per batch, so a reload's exclusions apply from the next one.
pub async fn record(
    store: Arc<Store>,
    policy: Arc<Live<TrustPolicy>>,
    mut rx: mpsc::Receiver<Arc<Event>>,
    batch_size: usize,
    flush_interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    // At shutdown the last batch still comes through, so it is written before the end.
    while let Some(events) =
        crate::events::next_batch(&mut rx, &mut stop, batch_size, flush_interval).await
    {
        let mut batch = Vec::new();
        let policy = policy.get();
        for ev in &events {
            collect(&policy, ev, &mut batch);
        }
        flush(&store, &mut batch).await;
        // Once this moves, every delivery up to here is in the list (or excluded by
        // policy): what a test or an operator waits for instead of a sleep.
        metrics::counter!("smartrelay_trusted_deliveries_recorded_total")
            .increment(events.len() as u64);
    }
}

fn collect(policy: &TrustPolicy, ev: &Event, batch: &mut Vec<Observation>) {
    if let Event::Delivery(report) = ev {
        batch.extend(policy.observations(report));
    }
}

async fn flush(store: &Arc<Store>, batch: &mut Vec<Observation>) {
    if batch.is_empty() {
        return;
    }
    let items = std::mem::take(batch);
    let s = store.clone();
    let n = items.len();
    match tokio::task::spawn_blocking(move || s.record(&items)).await {
        Ok(Ok(added)) => {
            metrics::counter!("smartrelay_trusted_new_entries_total").increment(added);
            // The gauge is set from the table at start and after each prune.
            metrics::gauge!("smartrelay_trusted_entries").increment(added as f64);
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, observations = n, "trusted-sender batch not recorded")
        }
        Err(e) => tracing::error!(error = %e, "trusted-sender writer failed"),
    }
}
