//! The Prometheus recorder: installed once per process, rendered at `GET /metrics`.
//! What it describes is `crate::telemetry`'s table.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{describe_counter, describe_gauge, describe_histogram};

use crate::telemetry::{self as T, Kind};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

const SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Installs the recorder on first call; later calls return the same handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
                .and_then(|b| b.install_recorder())
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder().handle());
            describe();
            zero();
            handle
        })
        .clone()
}

/// Histograms need their buckets drained now and then.
pub fn spawn_upkeep(tasks: &crate::tasks::Tasks, handle: PrometheusHandle) {
    tasks.every(Duration::from_secs(5), move || {
        handle.run_upkeep();
        std::future::ready(())
    });
}

/// Series that exist from the start, so a dashboard shows 0 rather than "no data".
fn zero() {
    for name in [
        T::CONNECTIONS_ACCEPTED_TOTAL,
        T::MESSAGES_ACCEPTED_TOTAL,
        T::RECEIVED_BYTES_TOTAL,
        T::QUEUE_RETRIES_TOTAL,
        T::QUEUE_WRITE_ERRORS_TOTAL,
        T::SPOOL_COMMITS_TOTAL,
        T::SPOOL_RECORDS_TOTAL,
        T::MESSAGES_EXPIRED_TOTAL,
        T::TRUSTED_NEW_ENTRIES_TOTAL,
        T::EVENTS_DROPPED_TOTAL,
        T::SESSION_PANICS_TOTAL,
        T::SESSIONS_TOO_SLOW_TOTAL,
    ] {
        metrics::counter!(name).absolute(0);
    }
    for reason in [
        "ip_not_allowed",
        "limit",
        "tls_required",
        "shared_ranges_unresolved",
    ] {
        metrics::counter!(T::CONNECTIONS_REFUSED_TOTAL, "reason" => reason).absolute(0);
    }
    for action in ["failed", "delayed", "relayed"] {
        metrics::counter!(T::DSN_SENT_TOTAL, "action" => action).absolute(0);
    }
    metrics::gauge!(T::SESSIONS_ACTIVE).set(0.0);
}

fn describe() {
    for m in crate::telemetry::ALL {
        match (m.kind, m.unit) {
            (Kind::Counter, Some(u)) => describe_counter!(m.name, u, m.help),
            (Kind::Counter, None) => describe_counter!(m.name, m.help),
            (Kind::Gauge, Some(u)) => describe_gauge!(m.name, u, m.help),
            (Kind::Gauge, None) => describe_gauge!(m.name, m.help),
            (Kind::Histogram, Some(u)) => describe_histogram!(m.name, u, m.help),
            (Kind::Histogram, None) => describe_histogram!(m.name, m.help),
        }
    }
}
