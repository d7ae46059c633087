//! Feeds the store from the delivery events off the hot path: observations are batched
//! (one transaction per `batch_size` or `flush_interval`), and what is pending is written
//! when the event stream closes at shutdown. A restriction marks what its sender taught
//! the list recently as suspect (and again after each batch while it stands, for the
//! deliveries still in flight when it came); a release clears the mark, a discard
//! deletes those entries.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::policy::{Observation, TrustPolicy};
use super::{Store, Suspected};
use crate::envelope::{LimitKey, Millis, Settle};
use crate::events::Event;
use crate::live::Live;

/// `policy` is read once per batch, so a reload's exclusions apply from the next one.
/// When the store cannot be written (a PostgreSQL outage) the observations wait, up to
/// `buffer_limit`, and go with the next batch; mail never waits on them.
pub async fn record(
    store: Store,
    policy: Arc<Live<TrustPolicy>>,
    mut rx: mpsc::Receiver<Arc<Event>>,
    batch_size: usize,
    flush_interval: Duration,
    buffer_limit: usize,
    mut stop: watch::Receiver<bool>,
) {
    let mut pending: Vec<Observation> = Vec::new();
    let mut suspects: Vec<Suspect> = Vec::new();
    // After a failed write the store is left alone for a while: events keep being
    // drained into `pending`, so the bus never backs up into deliveries.
    let mut retry_at: Option<tokio::time::Instant> = None;
    // At shutdown the last batch still comes through, so it is written before the end.
    loop {
        let wake = retry_at.filter(|_| !pending.is_empty());
        let Some(events) =
            crate::events::next_batch_or_wake(&mut rx, &mut stop, batch_size, flush_interval, wake)
                .await
        else {
            break;
        };
        let mut batch = Vec::new();
        let mut restrictions = Vec::new();
        let policy = policy.get();
        for ev in &events {
            collect(&policy, ev, &mut batch);
            if matches!(ev.as_ref(), Event::Restricted { .. } | Event::Lifted { .. }) {
                restrictions.push(ev.clone());
            }
        }
        let learned = !batch.is_empty();
        pending.extend(batch);
        let over = pending.len().saturating_sub(buffer_limit);
        if over > 0 {
            pending.drain(..over);
            metrics::counter!(crate::telemetry::TRUSTED_OBSERVATIONS_DROPPED_TOTAL)
                .increment(over as u64);
            tracing::warn!(
                dropped = over,
                "trusted-sender store unavailable too long: oldest observations dropped"
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
        for ev in restrictions {
            apply(&store, &ev, &mut suspects).await;
        }
        if learned && retry_at.is_none() {
            for s in &suspects {
                mark(&store, s).await;
            }
        }
        // Once this moves, every delivery up to here is in the list (or excluded by
        // policy): what a test or an operator waits for instead of a sleep.
        let deliveries = events
            .iter()
            .filter(|e| matches!(e.as_ref(), Event::Delivery(_)))
            .count();
        metrics::counter!(crate::telemetry::TRUSTED_DELIVERIES_RECORDED_TOTAL)
            .increment(deliveries as u64);
    }
    // Stopping: one last try for what waited on the store.
    flush(&store, &mut pending).await;
}

/// A restriction in force, as the list matches its senders.
struct Suspect {
    suspected: Suspected,
    tag: String,
    since: Millis,
}

async fn mark(store: &Store, s: &Suspect) {
    match store
        .mark_suspect(s.suspected.clone(), s.tag.clone(), s.since)
        .await
    {
        Ok(0) => {}
        Ok(n) => {
            tracing::info!(restriction = %s.tag, entries = n, "trusted entries marked suspect")
        }
        Err(e) => tracing::error!(error = %e, restriction = %s.tag, "suspect entries not marked"),
    }
}

async fn apply(store: &Store, ev: &Event, suspects: &mut Vec<Suspect>) {
    match ev {
        Event::Restricted {
            key,
            value,
            window_start,
            ..
        } => {
            let suspected = match key {
                LimitKey::Sender => Suspected::Sender(value.clone()),
                LimitKey::SenderDomain => Suspected::Domain(value.clone()),
                // The list does not know which server wrote what.
                LimitKey::Client => return,
            };
            let s = Suspect {
                suspected,
                tag: tag(*key, value),
                since: *window_start,
            };
            mark(store, &s).await;
            suspects.retain(|o| o.tag != s.tag);
            suspects.push(s);
        }
        Event::Lifted {
            key, value, how, ..
        } => {
            let t = tag(*key, value);
            suspects.retain(|o| o.tag != t);
            match store.clear_suspect(t.clone(), *how).await {
                Ok(n) => {
                    if *how == Settle::Discard {
                        metrics::gauge!(crate::telemetry::TRUSTED_ENTRIES).decrement(n as f64);
                    }
                    tracing::info!(restriction = %t, entries = n, "suspect trusted entries {}", how.label());
                }
                Err(e) => {
                    tracing::error!(error = %e, restriction = %t, "suspect entries not cleared")
                }
            }
        }
        _ => {}
    }
}

/// How a restriction names the entries it marked: `sender=alice@contoso.test`.
fn tag(key: LimitKey, value: &str) -> String {
    format!("{}={value}", key.label())
}

fn collect(policy: &TrustPolicy, ev: &Event, batch: &mut Vec<Observation>) {
    if let Event::Delivery(report) = ev {
        batch.extend(policy.observations(report));
    }
}

/// How long a store that failed a write is left alone.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// Whether the store took what was pending.
async fn flush(store: &Store, pending: &mut Vec<Observation>) -> bool {
    if pending.is_empty() {
        return true;
    }
    let items = Arc::new(std::mem::take(pending));
    let n = items.len();
    match store.record(items.clone()).await {
        Ok(added) => {
            metrics::gauge!(crate::telemetry::TRUSTED_BUFFERED_OBSERVATIONS).set(0.0);
            metrics::counter!(crate::telemetry::TRUSTED_NEW_ENTRIES_TOTAL).increment(added);
            // The gauge is set from the table at start and after each prune.
            metrics::gauge!(crate::telemetry::TRUSTED_ENTRIES).increment(added as f64);
            true
        }
        Err(e) => {
            // Back in line, in order, for the next attempt (no copy once the store let go).
            *pending = Arc::try_unwrap(items).unwrap_or_else(|shared| (*shared).clone());
            metrics::gauge!(crate::telemetry::TRUSTED_BUFFERED_OBSERVATIONS).set(n as f64);
            tracing::error!(error = %e, observations = n, "trusted-sender batch not recorded; kept for the next attempt");
            false
        }
    }
}
