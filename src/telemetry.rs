//! Every metric the relay emits, in one table: the name each call site uses (a
//! constant here), its kind, unit and help text. `admin::metrics` describes them all
//! from this table, so a metric cannot be emitted without a description, and a name
//! is spelled once. Names follow Prometheus conventions: the `smartrelay_` prefix,
//! `_total` counters, base units in `_seconds` and `_bytes`; label values come from
//! small fixed sets only (never addresses or queue IDs).

use metrics::Unit;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Debug, Clone, Copy)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub unit: Option<Unit>,
    pub help: &'static str,
}

/// Declares each metric's constant and its row in [`ALL`].
macro_rules! metrics {
    ($($id:ident: $kind:ident $(($unit:ident))? = $name:literal, $help:literal;)*) => {
        $(pub const $id: &str = $name;)*

        /// Every metric, in name order.
        pub const ALL: &[Metric] = &[$(Metric {
            name: $name,
            kind: Kind::$kind,
            unit: metrics!(@unit $($unit)?),
            help: $help,
        }),*];
    };
    (@unit) => { None };
    (@unit $unit:ident) => { Some(Unit::$unit) };
}

metrics! {
    ACTIVITY_EVENTS_DROPPED_TOTAL: Counter = "smartrelay_activity_events_dropped_total",
        "Events not counted in the flow summary or the sources seen because the store was unavailable longer than admin.buffer_limit allows";
    ACTIVITY_BUFFERED_ROWS: Gauge = "smartrelay_activity_buffered_rows",
        "Flow counter and source rows held until the store can be written";
    ADMIN_LOGIN_FAILURES_TOTAL: Counter = "smartrelay_admin_login_failures_total",
        "Wrong admin tokens presented (sign-in form or bearer); each makes that client wait longer before the next try";
    ADMIN_REQUESTS_REFUSED_TOTAL: Counter = "smartrelay_admin_requests_refused_total",
        "Admin requests refused by reason: host (not this listener's Host, 421), origin (from another origin), csrf (no valid CSRF token), throttled (sign-in back-off), share_rate (admin.share_rate)";
    ACCEPT_LATENCY_SECONDS: Histogram(Seconds) = "smartrelay_accept_latency_seconds",
        "From end of data to the 250 reply (includes fsync)";
    CONFIG_INFO: Gauge = "smartrelay_config_info",
        "1 for the SHA-256 (label hash) of the configuration file in force, 0 for one replaced";
    CONFIG_LOADED_TIMESTAMP_SECONDS: Gauge(Seconds) = "smartrelay_config_loaded_timestamp_seconds",
        "When the configuration in force was loaded, in seconds since the epoch";
    CONFIG_RELOAD_FAILURES_TOTAL: Counter = "smartrelay_config_reload_failures_total",
        "Reloads (SIGHUP, POST /api/v1/reload) refused because the file was not valid; the previous configuration stays in force";
    CONFIG_RELOADS_TOTAL: Counter = "smartrelay_config_reloads_total",
        "Reloads that put a configuration in force";
    CONFIG_RESTART_REQUIRED: Gauge = "smartrelay_config_restart_required",
        "Changed keys that take effect only at the next restart (listen addresses, spool, databases, workers)";
    CONNECTIONS_ACCEPTED_TOTAL: Counter = "smartrelay_connections_accepted_total",
        "SMTP connections admitted to a session";
    CONNECTIONS_REFUSED_TOTAL: Counter = "smartrelay_connections_refused_total",
        "SMTP connections refused, by reason (ip_not_allowed, limit, tls_required, shared_ranges_unresolved)";
    DELIVERY_RECIPIENTS_TOTAL: Counter = "smartrelay_delivery_recipients_total",
        "Recipient outcomes per route and smart host (delivered, deferred, bounced)";
    DKIM_REPLAY_REFUSALS_TOTAL: Counter = "smartrelay_dkim_replay_refusals_total",
        "Messages from shared ranges refused by the DKIM replay and header rules, by platform and reason (other_tenant, stale, replayed, duplicate_header, unaligned)";
    DKIM_SIGNATURES_SKIPPED_TOTAL: Counter = "smartrelay_dkim_signatures_skipped_total",
        "DKIM signatures left unverified because a message carried more than the per-message bound (10)";
    DRAINING: Gauge = "smartrelay_draining",
        "1 from SIGTERM or POST /api/v1/drain: new connections get 421 4.3.0 and /readyz 503";
    DSN_SENT_TOTAL: Counter = "smartrelay_dsn_sent_total",
        "Delivery status notifications queued, by action";
    EVENTS_DROPPED_TOTAL: Counter = "smartrelay_events_dropped_total",
        "In-process events a lossy subscriber missed";
    INGRESS_BODIES_SPILLED_TOTAL: Counter = "smartrelay_ingress_bodies_spilled_total",
        "Bodies written to a file while received (larger than server.spill_threshold, or the ingress memory was spent)";
    INGRESS_MEMORY_BYTES: Gauge(Bytes) = "smartrelay_ingress_memory_bytes",
        "Octets of bodies in flight that sessions hold in memory (at most server.ingress_memory)";
    INGRESS_MEMORY_WAIT_SECONDS: Histogram(Seconds) = "smartrelay_ingress_memory_wait_seconds",
        "Time a session waited, reading nothing, for room in server.ingress_memory";
    LIMIT_EXCEEDED_TOTAL: Counter = "smartrelay_limit_exceeded_total",
        "Times a [[limits]] rule was exceeded, by rule and action (defer: a 451; hold: a key value restricted)";
    MESSAGES_ACCEPTED_TOTAL: Counter = "smartrelay_messages_accepted_total",
        "Messages queued (250 after fsync)";
    MESSAGES_EXPIRED_TOTAL: Counter = "smartrelay_messages_expired_total",
        "Messages that reached queue.max_age";
    MESSAGES_REFUSED_TOTAL: Counter = "smartrelay_messages_refused_total",
        "Commands refused at MAIL, RCPT or DATA, by stage and enhanced status code";
    ONBOARDING_CONNECTOR_VERIFIED: Gauge = "smartrelay_onboarding_connector_verified",
        "1 when the last connector verification succeeded";
    ONBOARDING_OUTBOUND_IPS_CONFIRMED: Gauge = "smartrelay_onboarding_outbound_ips_confirmed",
        "1 when the configured outbound IP ranges are confirmed";
    ONBOARDING_SPF_VALID: Gauge = "smartrelay_onboarding_spf_valid",
        "1 when the domain's SPF record passes the gateway validation";
    PROXY_HEADER_FAILURES_TOTAL: Counter = "smartrelay_proxy_header_failures_total",
        "Connections from a server.proxy_protocol.trusted balancer closed without a valid PROXY header (reason: timeout, invalid, closed)";
    PROXY_HEALTH_CHECKS_TOTAL: Counter = "smartrelay_proxy_health_checks_total",
        "PROXY v2 LOCAL (and v1 UNKNOWN) connections: balancer health checks, never counted as sources";
    QUEUE_ACCEPTING: Gauge = "smartrelay_queue_accepting",
        "1 while the spool has room (queue.min_free, queue.max_size), 0 while MAIL gets 452";
    QUEUE_BODIES_EVICTED_TOTAL: Counter = "smartrelay_queue_bodies_evicted_total",
        "Cached message bodies dropped from memory (newest first) as the queue grew; they are read back from disk for delivery";
    QUEUE_BODIES_NOT_CACHED_TOTAL: Counter = "smartrelay_queue_bodies_not_cached_total",
        "Messages whose body was left on disk because the memory budget was spent";
    QUEUE_CACHED_BYTES: Gauge(Bytes) = "smartrelay_queue_cached_bytes",
        "Octets of message bodies kept in memory for their first attempt";
    QUEUE_HELD_AT_INTAKE_TOTAL: Counter = "smartrelay_queue_held_at_intake_total",
        "Messages accepted and held at once (a limit fired, or the key value was restricted)";
    QUEUE_HELD_MESSAGES: Gauge = "smartrelay_queue_held_messages",
        "Messages held (by an operator or a limit): queued, never tried until released";
    QUEUE_MESSAGES: Gauge = "smartrelay_queue_messages",
        "Messages in the queue";
    QUEUE_OLDEST_AGE_SECONDS: Gauge(Seconds) = "smartrelay_queue_oldest_age_seconds",
        "Age of the oldest queued message";
    QUEUE_RECIPIENTS: Gauge = "smartrelay_queue_recipients",
        "Recipients still pending in the queue";
    QUEUE_REFUSALS_TOTAL: Counter = "smartrelay_queue_refusals_total",
        "MAIL commands refused with 452 4.3.1 because the queue takes no mail, by reason";
    QUEUE_RETRIES_TOTAL: Counter = "smartrelay_queue_retries_total",
        "Delivery attempts that left recipients for a retry";
    QUEUE_WRITE_ERRORS_TOTAL: Counter = "smartrelay_queue_write_errors_total",
        "Failed spool writes (the client got 452)";
    RECEIVED_BYTES_TOTAL: Counter(Bytes) = "smartrelay_received_bytes_total",
        "Octets of message data queued";
    RESTRICTED_KEYS: Gauge = "smartrelay_restricted_keys",
        "Key values restricted by a limit: their mail is held until an administrator acts";
    ROUTING_DECISIONS_TOTAL: Counter = "smartrelay_routing_decisions_total",
        "Routing decisions by route and SPF outcome";
    SESSION_PANICS_TOTAL: Counter = "smartrelay_session_panics_total",
        "Session tasks that panicked (the client got 421 4.3.0 where the socket allowed it)";
    SESSIONS_ACTIVE: Gauge = "smartrelay_sessions_active",
        "SMTP sessions in progress";
    SESSIONS_TOO_SLOW_TOTAL: Counter = "smartrelay_sessions_too_slow_total",
        "DATA or BDAT senders closed with 421 4.4.2 for falling below server.min_data_rate";
    SHARED_RANGE_NETWORKS: Gauge = "smartrelay_shared_range_networks",
        "Networks of a shared range last resolved from its SPF record";
    SHARED_RANGE_REFRESH_FAILURES_TOTAL: Counter = "smartrelay_shared_range_refresh_failures_total",
        "Failed refreshes of a shared range from SPF (the last good list stays in force)";
    SPOOL_BYTES: Gauge = "smartrelay_spool_bytes",
        "Octets in spool segment files";
    SPOOL_COMMITS_TOTAL: Counter = "smartrelay_spool_commits_total",
        "Spool commits (one fdatasync each)";
    SPOOL_COMPACTED_BYTES_TOTAL: Counter(Bytes) = "smartrelay_spool_compacted_bytes_total",
        "Octets of live records copied forward by compaction";
    SPOOL_FREE_BYTES: Gauge(Bytes) = "smartrelay_spool_free_bytes",
        "Octets free for the relay on the spool's file system";
    SPOOL_LIVE_BYTES: Gauge = "smartrelay_spool_live_bytes",
        "Octets of spool records that are still the latest for a queued message";
    SPOOL_RECORDS_TOTAL: Counter = "smartrelay_spool_records_total",
        "Spool records written (messages, states, removals); over commits, the batch size";
    SPOOL_SEGMENTS: Gauge = "smartrelay_spool_segments",
        "Spool segment files on disk";
    SPOOL_SYNC_SECONDS: Histogram(Seconds) = "smartrelay_spool_sync_seconds",
        "One spool commit: appending a batch and its fdatasync";
    TENANT_CHECKS_TOTAL: Counter = "smartrelay_tenant_checks_total",
        "Messages from shared-platform ranges checked for tenant proof, by platform and proof (dkim, tenant_id, header, none)";
    TLS_CERTIFICATE_EXPIRY_TIMESTAMP_SECONDS: Gauge(Seconds) = "smartrelay_tls_certificate_expiry_timestamp_seconds",
        "notAfter of the certificate served for STARTTLS and implicit TLS, in seconds since the epoch";
    TRACKING_EVENTS_DROPPED_TOTAL: Counter = "smartrelay_tracking_events_dropped_total",
        "Tracking changes dropped because the tracking store could not be written for too long";
    TRACKING_EVENTS_TOTAL: Counter = "smartrelay_tracking_events_total",
        "Changes to message records taken from the event bus (a line of a timeline, a recipient's status)";
    TRACKING_WRITE_SECONDS: Histogram(Seconds) = "smartrelay_tracking_write_seconds",
        "Time to write one batch of tracking changes";
    TRUSTED_BUFFERED_OBSERVATIONS: Gauge = "smartrelay_trusted_buffered_observations",
        "Trusted-list observations waiting for the store (a PostgreSQL outage)";
    TRUSTED_DELIVERIES_RECORDED_TOTAL: Counter = "smartrelay_trusted_deliveries_recorded_total",
        "Delivery reports the trusted-sender recorder has processed";
    TRUSTED_ENTRIES: Gauge = "smartrelay_trusted_entries",
        "Entries in the trusted-sender list";
    TRUSTED_NEW_ENTRIES_TOTAL: Counter = "smartrelay_trusted_new_entries_total",
        "Trusted-sender entries created";
    TRUSTED_OBSERVATIONS_DROPPED_TOTAL: Counter = "smartrelay_trusted_observations_dropped_total",
        "Trusted-list observations dropped because the store was unavailable longer than trusted.buffer_limit allows";
    UPSTREAM_CONNECTION_FAILURES_TOTAL: Counter = "smartrelay_upstream_connection_failures_total",
        "Smart hosts that could not take a delivery (connect, TLS, timeout, 421)";
    UPSTREAM_CONNECTIONS_TOTAL: Counter = "smartrelay_upstream_connections_total",
        "Upstream sessions opened, by route and whether TLS was used";
    UPSTREAM_SESSION_LIMIT: Gauge = "smartrelay_upstream_session_limit",
        "Sessions a smart host may have at once, as delivery.concurrency = \"adaptive\" has set it from the host's transaction times";
    UPSTREAM_TLS_HANDSHAKES_TOTAL: Counter = "smartrelay_upstream_tls_handshakes_total",
        "TLS handshakes with smart hosts by kind: full, or resumed from a session the host issued before";
    UPSTREAM_TRANSACTION_SECONDS: Histogram(Seconds) = "smartrelay_upstream_transaction_seconds",
        "One upstream mail transaction, MAIL to final reply";
}
