//! The relay's periodic work, each on a task the shared [`Tasks`] owns: systemd's
//! notifications, the pruners, the gauges, the limits' sync and the store's late
//! migration.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::admin::activity::Activity;
use crate::events::Event;
use crate::limits::Limits;
use crate::queue::file::FileSpool;
use crate::queue::Queue;
use crate::smtp::body::Bodies;
use crate::store::Postgres;
use crate::tasks::Tasks;
use crate::tenant::replay;
use crate::tracking;
use crate::trusted::{self, TrustedError};

/// Under systemd (`Type=notify`): READY once the listeners are bound and the spool
/// recovered, and the watchdog pinged at half its interval when one is set. Outside
/// systemd (no `NOTIFY_SOCKET`) this does nothing.
pub(super) fn notify_systemd(tasks: &Tasks) {
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "systemd notification failed");
    }
    if let Some(every) = sd_notify::watchdog_enabled() {
        tasks.every((every / 2).max(Duration::from_millis(500)), || {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            std::future::ready(())
        });
    }
}

pub(super) fn spawn_pruner(
    tasks: &Tasks,
    store: trusted::Store,
    retention: Duration,
    every: Duration,
) {
    tasks.every(every.max(Duration::from_secs(1)), move || {
        let s = store.clone();
        async move {
            let result = async {
                let removed = s.prune(retention, crate::envelope::now_ms()).await?;
                Ok::<_, TrustedError>((removed, s.count().await?))
            }
            .await;
            match result {
                Ok((removed, total)) => {
                    metrics::gauge!(crate::telemetry::TRUSTED_ENTRIES).set(total as f64);
                    if removed > 0 {
                        tracing::info!(removed, "trusted-sender entries expired");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "trusted-sender pruning failed"),
            }
        }
    });
}

/// Until the shared database has answered once, its schema is applied every 5 s.
/// The limits' first sync (restrictions from the store), the restrictions the held
/// mail itself records, then a sync every `every` (lifts made elsewhere settle this
/// node's held mail), the bounce counter and the hourly pruner.
pub(super) async fn start_limits(
    tasks: &Tasks,
    limits: &Arc<Limits>,
    queue: &Arc<Queue<FileSpool>>,
    bounces: Option<tokio::sync::mpsc::Receiver<Arc<Event>>>,
    every: Duration,
) {
    if limits.is_empty() {
        return;
    }
    for (reason, since) in queue.hold_reasons() {
        limits.restore(&reason, since);
    }
    let sync = {
        let (limits, queue) = (limits.clone(), queue.clone());
        move || {
            let (limits, queue) = (limits.clone(), queue.clone());
            async move {
                let _settling = limits.settling().await;
                for l in limits.sync().await {
                    queue.settle_held(l.key, &l.value, l.how).await;
                }
            }
        }
    };
    sync().await;
    tasks.every(every, sync);
    let pruning = limits.clone();
    tasks.every(Duration::from_secs(3600), move || {
        let limits = pruning.clone();
        async move {
            if let Err(e) = limits.prune().await {
                tracing::warn!(error = %e, "limits not pruned");
            }
        }
    });
    if let Some(mut rx) = bounces {
        let limits = limits.clone();
        tasks.spawn(async move {
            while let Some(ev) = rx.recv().await {
                if let Event::Delivery(report) = ev.as_ref() {
                    limits.delivered(report);
                }
            }
        });
    }
}

pub(super) fn spawn_ingress_gauge(tasks: &Tasks, bodies: Arc<Bodies>, budget: u64) {
    tasks.every(Duration::from_secs(1), move || {
        let held = budget.saturating_sub(bodies.memory().available());
        async move {
            metrics::gauge!(crate::telemetry::INGRESS_MEMORY_BYTES).set(held as f64);
        }
    });
}

pub(super) fn spawn_tracking_pruner(tasks: &Tasks, store: tracking::Store, retention: Duration) {
    tasks.every(Duration::from_secs(3600), move || {
        let store = store.clone();
        async move {
            match store.prune(retention).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(messages = n, "tracking records pruned"),
                Err(e) => tracing::warn!(error = %e, "tracking records not pruned"),
            }
        }
    });
}

pub(super) fn spawn_migration_retry(tasks: &Tasks, pg: Postgres) {
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tasks.every(Duration::from_secs(5), move || {
        let (pg, done) = (pg.clone(), done.clone());
        async move {
            if done.load(Ordering::Relaxed) {
                return;
            }
            match pg.migrate(crate::store::schema::ALL).await {
                Ok(()) => {
                    done.store(true, Ordering::Relaxed);
                    tracing::info!("PostgreSQL store reachable: schema applied");
                }
                Err(e) => tracing::warn!(error = %e, "PostgreSQL store still not reachable"),
            }
        }
    });
}

/// Signatures older than `access.dkim_replay.max_age` prove nothing any more (the
/// freshness rule refuses them), so the memory forgets them, hourly.
pub(super) fn spawn_signature_pruner(tasks: &Tasks, store: replay::Store, max_age: Duration) {
    tasks.every(Duration::from_secs(3600), move || {
        let store = store.clone();
        async move {
            let before = crate::envelope::now_ms()
                .saturating_sub(u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX));
            match store.prune(before).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    forgotten = n,
                    "DKIM signatures past access.dkim_replay.max_age forgotten"
                ),
                Err(e) => tracing::warn!(error = %e, "DKIM signature memory not pruned"),
            }
        }
    });
}

/// `admin.retention` for the state database: flow counters and sources older than
/// it are dropped hourly (and once at start).
pub(super) fn spawn_activity_pruner(tasks: &Tasks, activity: Arc<Activity>, retention: Duration) {
    tasks.every(Duration::from_secs(3600), move || {
        let a = activity.clone();
        async move {
            match a.prune(retention, crate::envelope::now_ms()).await {
                Ok(0) => {}
                Ok(removed) => {
                    tracing::info!(removed, "state database rows past admin.retention pruned")
                }
                Err(e) => tracing::warn!(error = %e, "state database pruning failed"),
            }
        }
    });
}
