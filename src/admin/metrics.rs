//! The Prometheus recorder: installed once per process, rendered at `GET /metrics`.
//! Names follow Prometheus conventions: `smartrelay_` prefix, `_total` counters, base
//! units in `_seconds` and `_bytes`; labels take values from small fixed sets only.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
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
        "smartrelay_connections_accepted_total",
        "smartrelay_messages_accepted_total",
        "smartrelay_received_bytes_total",
        "smartrelay_queue_retries_total",
        "smartrelay_queue_write_errors_total",
        "smartrelay_spool_commits_total",
        "smartrelay_spool_records_total",
        "smartrelay_messages_expired_total",
        "smartrelay_trusted_new_entries_total",
        "smartrelay_events_dropped_total",
        "smartrelay_session_panics_total",
        "smartrelay_sessions_too_slow_total",
    ] {
        metrics::counter!(name).absolute(0);
    }
    for reason in [
        "ip_not_allowed",
        "limit",
        "tls_required",
        "shared_ranges_unresolved",
    ] {
        metrics::counter!("smartrelay_connections_refused_total", "reason" => reason).absolute(0);
    }
    for action in ["failed", "delayed", "relayed"] {
        metrics::counter!("smartrelay_dsn_sent_total", "action" => action).absolute(0);
    }
    metrics::gauge!("smartrelay_sessions_active").set(0.0);
}

fn describe() {
    describe_counter!(
        "smartrelay_connections_accepted_total",
        "SMTP connections admitted to a session"
    );
    describe_counter!(
        "smartrelay_connections_refused_total",
        "SMTP connections refused, by reason (ip_not_allowed, limit, tls_required, shared_ranges_unresolved)"
    );
    describe_counter!(
        "smartrelay_tenant_checks_total",
        "Messages from shared-platform ranges checked for tenant proof, by platform and proof (dkim, tenant_id, header, none)"
    );
    describe_gauge!(
        "smartrelay_shared_range_networks",
        "Networks of a shared range last resolved from its SPF record"
    );
    describe_counter!(
        "smartrelay_shared_range_refresh_failures_total",
        "Failed refreshes of a shared range from SPF (the last good list stays in force)"
    );
    describe_gauge!("smartrelay_sessions_active", "SMTP sessions in progress");
    describe_counter!(
        "smartrelay_trusted_observations_dropped_total",
        "Trusted-list observations dropped because the store was unavailable longer than trusted.buffer_limit allows"
    );
    describe_gauge!(
        "smartrelay_trusted_buffered_observations",
        "Trusted-list observations waiting for the store (a PostgreSQL outage)"
    );
    describe_counter!(
        "smartrelay_proxy_header_failures_total",
        "Connections from a server.proxy_protocol.trusted balancer closed without a valid PROXY header (reason: timeout, invalid, closed)"
    );
    describe_counter!(
        "smartrelay_proxy_health_checks_total",
        "PROXY v2 LOCAL (and v1 UNKNOWN) connections: balancer health checks, never counted as sources"
    );
    describe_counter!(
        "smartrelay_config_reload_failures_total",
        "Reloads (SIGHUP, POST /api/v1/reload) refused because the file was not valid; the previous configuration stays in force"
    );
    describe_counter!(
        "smartrelay_config_reloads_total",
        "Reloads that put a configuration in force"
    );
    describe_gauge!(
        "smartrelay_config_info",
        "1 for the SHA-256 (label hash) of the configuration file in force, 0 for one replaced"
    );
    describe_gauge!(
        "smartrelay_config_loaded_timestamp_seconds",
        Unit::Seconds,
        "When the configuration in force was loaded, in seconds since the epoch"
    );
    describe_gauge!(
        "smartrelay_config_restart_required",
        "Changed keys that take effect only at the next restart (listen addresses, spool, databases, workers)"
    );
    describe_gauge!(
        "smartrelay_tls_certificate_expiry_timestamp_seconds",
        Unit::Seconds,
        "notAfter of the certificate served for STARTTLS and implicit TLS, in seconds since the epoch"
    );
    describe_counter!(
        "smartrelay_sessions_too_slow_total",
        "DATA or BDAT senders closed with 421 4.4.2 for falling below server.min_data_rate"
    );
    describe_counter!(
        "smartrelay_session_panics_total",
        "Session tasks that panicked (the client got 421 4.3.0 where the socket allowed it)"
    );
    describe_counter!(
        "smartrelay_messages_accepted_total",
        "Messages queued (250 after fsync)"
    );
    describe_counter!(
        "smartrelay_messages_refused_total",
        "Commands refused at MAIL, RCPT or DATA, by stage and enhanced status code"
    );
    describe_counter!(
        "smartrelay_received_bytes_total",
        Unit::Bytes,
        "Octets of message data queued"
    );
    describe_histogram!(
        "smartrelay_accept_latency_seconds",
        Unit::Seconds,
        "From end of data to the 250 reply (includes fsync)"
    );
    describe_gauge!("smartrelay_queue_messages", "Messages in the queue");
    describe_gauge!(
        "smartrelay_queue_recipients",
        "Recipients still pending in the queue"
    );
    describe_gauge!(
        "smartrelay_queue_oldest_age_seconds",
        Unit::Seconds,
        "Age of the oldest queued message"
    );
    describe_counter!(
        "smartrelay_queue_retries_total",
        "Delivery attempts that left recipients for a retry"
    );
    describe_counter!(
        "smartrelay_queue_write_errors_total",
        "Failed spool writes (the client got 452)"
    );
    describe_histogram!(
        "smartrelay_spool_sync_seconds",
        Unit::Seconds,
        "One spool commit: appending a batch and its fdatasync"
    );
    describe_counter!(
        "smartrelay_spool_commits_total",
        "Spool commits (one fdatasync each)"
    );
    describe_counter!(
        "smartrelay_spool_records_total",
        "Spool records written (messages, states, removals); over commits, the batch size"
    );
    describe_gauge!("smartrelay_spool_segments", "Spool segment files on disk");
    describe_gauge!("smartrelay_spool_bytes", "Octets in spool segment files");
    describe_counter!(
        "smartrelay_trusted_deliveries_recorded_total",
        "Delivery reports the trusted-sender recorder has processed"
    );
    describe_gauge!(
        "smartrelay_spool_live_bytes",
        "Octets of spool records that are still the latest for a queued message"
    );
    describe_counter!(
        "smartrelay_spool_compacted_bytes_total",
        Unit::Bytes,
        "Octets of live records copied forward by compaction"
    );
    describe_gauge!(
        "smartrelay_spool_free_bytes",
        Unit::Bytes,
        "Octets free for the relay on the spool's file system"
    );
    describe_gauge!(
        "smartrelay_queue_accepting",
        "1 while the spool has room (queue.min_free, queue.max_size), 0 while MAIL gets 452"
    );
    describe_counter!(
        "smartrelay_queue_refusals_total",
        "MAIL commands refused with 452 4.3.1 because the queue takes no mail, by reason"
    );
    describe_gauge!(
        "smartrelay_queue_cached_bytes",
        Unit::Bytes,
        "Octets of message bodies kept in memory for their first attempt"
    );
    describe_counter!(
        "smartrelay_queue_bodies_not_cached_total",
        "Messages whose body was left on disk because the memory budget was spent"
    );
    describe_counter!(
        "smartrelay_messages_expired_total",
        "Messages that reached queue.max_age"
    );
    describe_counter!(
        "smartrelay_dsn_sent_total",
        "Delivery status notifications queued, by action"
    );
    describe_counter!(
        "smartrelay_delivery_recipients_total",
        "Recipient outcomes per route and smart host (delivered, deferred, bounced)"
    );
    describe_histogram!(
        "smartrelay_upstream_transaction_seconds",
        Unit::Seconds,
        "One upstream mail transaction, MAIL to final reply"
    );
    describe_counter!(
        "smartrelay_upstream_connections_total",
        "Upstream sessions opened, by route and whether TLS was used"
    );
    describe_counter!(
        "smartrelay_upstream_connection_failures_total",
        "Smart hosts that could not take a delivery (connect, TLS, timeout, 421)"
    );
    describe_counter!(
        "smartrelay_routing_decisions_total",
        "Routing decisions by route and SPF outcome"
    );
    describe_gauge!(
        "smartrelay_trusted_entries",
        "Entries in the trusted-sender list"
    );
    describe_counter!(
        "smartrelay_trusted_new_entries_total",
        "Trusted-sender entries created"
    );
    describe_gauge!(
        "smartrelay_onboarding_spf_valid",
        "1 when the domain's SPF record passes the gateway validation"
    );
    describe_gauge!(
        "smartrelay_onboarding_outbound_ips_confirmed",
        "1 when the configured outbound IP ranges are confirmed"
    );
    describe_gauge!(
        "smartrelay_onboarding_connector_verified",
        "1 when the last connector verification succeeded"
    );
    describe_counter!(
        "smartrelay_events_dropped_total",
        "In-process events a lossy subscriber missed"
    );
}
