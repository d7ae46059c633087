//! Puts the stages together and runs them: everything that can fail (certificates,
//! spool lock, databases, binding) fails before the first connection is accepted.
//! Then it waits for SIGTERM and stops in order under one deadline.

mod background;
mod parts;
mod reloader;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::admin::access_api::SHARED_RANGES_KEY;
use crate::admin::activity::Activity;
use crate::admin::{self, AdminState};
use crate::config::{Config, StoreKind};
use crate::deliver::connection::ClientSettings;
use crate::deliver::pool::PoolSettings;
use crate::deliver::Deliverer;
use crate::events::{EventBus, EventKind};
use crate::lifecycle::{DrainOrigin, Lifecycle, Phase};
use crate::limits::gate::Limited;
use crate::limits::{self, Limits};
use crate::live::Live;
use crate::queue::file::FileSpool;
use crate::queue::retry::RetryPolicy;
use crate::queue::spool::SpoolError;
use crate::queue::{Queue, QueueSettings};
use crate::reload::{LogLevelSetter, Reloads};
use crate::route::cache::SpfCache;
use crate::smtp::body::Bodies;
use crate::smtp::listener::{Gate, Listener};
use crate::smtp::tls::TlsError;
use crate::spf::hickory::{HickoryDns, ResolverError};
use crate::spf::SpfService;
use crate::store::Postgres;
use crate::tasks::{CancellationToken, Tasks};
use crate::tenant::replay::{self};
use crate::tenant::sources::{self, Resolved, SharedSources};
use crate::tracking;
use crate::trusted::TrustedError;
use crate::trusted::{self};
use tokio_util::task::TaskTracker;

use background::{
    notify_systemd, spawn_activity_pruner, spawn_ingress_gauge, spawn_migration_retry,
    spawn_pruner, spawn_signature_pruner, spawn_tracking_pruner, start_limits,
};
use parts::{spf_routes, trust_policy, Ingress, Parts};
use reloader::{watch_hangup, Reloader};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Resolver(#[from] ResolverError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error(transparent)]
    Trusted(#[from] TrustedError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("cannot prepare {dir} for bodies in flight: {source}")]
    Incoming {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

/// How the binary runs the relay, beyond its configuration.
#[derive(Default)]
pub struct Options {
    /// The file to re-read on reload; `None`: reload answers that there is none.
    pub config_path: Option<std::path::PathBuf>,
    /// Applies a reloaded `log.level` to the process's subscriber.
    pub set_log_level: Option<LogLevelSetter>,
}

/// What the stop deadline allows after `server.shutdown_timeout`: the cut deliveries'
/// final replies, the upstream QUITs, the spool's last sync and the recorders' flush.
pub const STOP_SLACK: Duration = Duration::from_secs(5);

/// The end of the stop deadline kept for the runtime's shutdown after `run` returns
/// (`main` gives blocking tasks less than this).
pub const RUNTIME_EXIT: Duration = Duration::from_millis(500);

/// Runs the relay until `shutdown` completes, then stops gracefully.
pub async fn run(
    cfg: Config,
    options: Options,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let cfg = Arc::new(cfg);
    // The file as it was when the process started: what "restart required" compares to.
    let started_text = match &options.config_path {
        Some(p) => std::fs::read_to_string(p).unwrap_or_default(),
        None => String::new(),
    };
    for w in cfg.warnings() {
        tracing::warn!("configuration: {w}");
    }
    // Periodic work (gauges, pruning, reaping); stopped last, after the recorders.
    let tasks = Tasks::new();
    let metrics = admin::metrics::install();
    admin::metrics::spawn_upkeep(&tasks, metrics.clone());

    let dns = HickoryDns::new(&cfg.dns.nameservers, cfg.dns.timeout.0)?;
    let dns_for_dkim = dns.resolver();
    let (spool_dir, segment_size) = (cfg.queue.dir.clone(), cfg.queue.segment_size);
    // Indexing a large spool reads every record head: not on the runtime.
    let spool =
        tokio::task::spawn_blocking(move || FileSpool::open_sized(&spool_dir, segment_size))
            .await
            .map_err(|e| SpoolError::Io {
                what: "spool open".into(),
                source: std::io::Error::other(e.to_string()),
            })??;
    let spool = Arc::new(spool);
    // Shared state: embedded files, or the cluster's PostgreSQL. A database that is
    // down at start does not stop the relay taking mail: the schema is applied when it
    // answers, and until then recording waits (bounded) and /readyz says so.
    let shared_store = match cfg.store.kind {
        StoreKind::Sqlite => None,
        StoreKind::Postgres => Some(Postgres::new(&cfg.store)?),
    };
    let activity = Arc::new(match &shared_store {
        None => Activity::open(&cfg.admin.database)?,
        Some(pg) => Activity::shared(pg.clone()),
    });
    let signatures = match &shared_store {
        None => replay::Store::open(&cfg.admin.database)?,
        Some(pg) => replay::Store::shared(pg.clone()),
    };
    let tracking_store = match (&shared_store, cfg.tracking.enabled) {
        (_, false) => None,
        (None, true) => Some(tracking::Store::open(&cfg.tracking.database)?),
        (Some(pg), true) => Some(tracking::Store::shared(pg.clone())),
    };
    let trusted_store = match (&shared_store, cfg.trusted.enabled) {
        (_, false) => None,
        (None, true) => Some(trusted::Store::open(&cfg.trusted.database)?),
        (Some(pg), true) => Some(trusted::Store::shared(pg.clone())),
    };
    if let Some(pg) = &shared_store {
        if let Err(e) = pg.migrate(crate::store::schema::ALL).await {
            tracing::error!(error = %e, "PostgreSQL store not reachable at start; mail is taken, shared state waits for it");
            spawn_migration_retry(&tasks, pg.clone());
        }
    }

    let mut smtp_listeners: Vec<(TcpListener, bool)> = Vec::new();
    for addr in &cfg.server.listen {
        smtp_listeners.push((bind(*addr).await?, false));
    }
    for addr in &cfg.server.listen_tls {
        smtp_listeners.push((bind(*addr).await?, true));
    }
    let admin_listener = match cfg.admin.listen {
        Some(a) => Some(bind(a).await?),
        None => None,
    };

    let mut bus = EventBus::new();
    let activity_rx = bus.subscribe(65_536, false, EventKind::ALL);
    // The trusted list learns from deliveries only, so an accepted message's 250
    // never waits on it.
    let trusted_rx = trusted_store
        .as_ref()
        .map(|_| bus.subscribe(8192, true, &[EventKind::Delivery, EventKind::Restriction]));
    // Tracking follows each message; deliveries wait for it rather than lose its lines.
    let tracking_rx = tracking_store.as_ref().map(|_| {
        bus.subscribe(
            65_536,
            true,
            &[
                EventKind::Accepted,
                EventKind::Refused,
                EventKind::Routed,
                EventKind::Delivery,
                EventKind::Lifecycle,
            ],
        )
    });
    // Bounces count toward the limits from the delivery reports.
    let limits_rx = cfg
        .limits
        .iter()
        .any(|l| l.bounces.is_some())
        .then(|| bus.subscribe(8192, false, &[EventKind::Delivery]));

    let queue = Queue::recover(
        spool,
        QueueSettings {
            retry: RetryPolicy {
                retry: cfg.queue.retry.iter().map(|d| d.0).collect(),
                max_age: cfg.queue.max_age.0,
                delay_warning: cfg.queue.delay_warning.map(|d| d.0),
            },
            concurrency: cfg.queue.concurrency,
            hostname: cfg.server.hostname.clone(),
            memory_budget: cfg.queue.memory_budget,
            min_free: cfg.queue.min_free,
            max_size: cfg.queue.max_size,
        },
        bus.clone(),
    )
    .await?;
    queue.spawn_gauges(&tasks);
    let spf = Arc::new(SpfService::new(dns, cfg.dns.spf_timeout.0));
    let spf_cache = Arc::new(SpfCache::default());
    let routes = Arc::new(spf_routes(&cfg, &spf, &spf_cache));
    // Delivery attempts plan with the routes in force when they start.
    let router = Arc::new(Live::from_arc(routes.clone()));
    let d = &cfg.delivery;
    let (scheduling, cut) = (CancellationToken::new(), CancellationToken::new());
    let deliverer = Arc::new(Deliverer::new(
        ClientSettings {
            helo_name: cfg.helo_name().to_string(),
            connect_timeout: d.connect_timeout.0,
            command_timeout: d.command_timeout.0,
            data_timeout: d.data_timeout.0,
            stopping: scheduling.clone(),
            cut: cut.clone(),
        },
        PoolSettings {
            max_per_host: d.max_connections_per_host,
            concurrency: d.concurrency,
            max_messages: d.connection_max_messages,
            max_age: d.connection_max_age.0,
            idle_timeout: d.idle_timeout.0,
            backoff: d.host_backoff.0,
        },
    ));
    deliverer.spawn_reaper(&tasks, d.idle_timeout.0 / 2);

    // The recorders and the shared-range refresher stop on `stop_tx`, after the queue.
    let (stop_tx, stop_rx) = watch::channel(false);
    let attempts = TaskTracker::new();
    let scheduler = tokio::spawn(queue.clone().run(
        router.clone(),
        deliverer.clone(),
        attempts.clone(),
        scheduling.clone(),
    ));
    let activity_task = tokio::spawn(activity.clone().record(
        activity_rx,
        stop_rx.clone(),
        cfg.admin.buffer_limit,
    ));
    let tracking_task = match (&tracking_store, tracking_rx) {
        (Some(store), Some(rx)) => {
            spawn_tracking_pruner(&tasks, store.clone(), cfg.tracking.retention.0);
            let keep = tracking::model::Keep {
                node: cfg.server.hostname.clone(),
                subjects: cfg.tracking.subjects,
            };
            Some(tokio::spawn(tracking::recorder::record(
                store.clone(),
                keep,
                rx,
                stop_rx.clone(),
            )))
        }
        _ => None,
    };
    let mut trust = None;
    let trusted_task = match (&trusted_store, trusted_rx) {
        (Some(store), Some(rx)) => {
            if let Ok(n) = store.count().await {
                metrics::gauge!(crate::telemetry::TRUSTED_ENTRIES).set(n as f64);
            }
            let policy = Arc::new(Live::new(trust_policy(&cfg)));
            trust = Some(policy.clone());
            spawn_pruner(
                &tasks,
                store.clone(),
                cfg.trusted.retention.0,
                cfg.trusted.prune_interval.0,
            );
            Some(tokio::spawn(trusted::recorder::record(
                store.clone(),
                policy,
                rx,
                cfg.trusted.batch_size,
                cfg.trusted.flush_interval.0,
                cfg.trusted.buffer_limit,
                stop_rx.clone(),
            )))
        }
        _ => None,
    };

    let shared_sources = Arc::new(SharedSources::new(&cfg.access.shared_ranges));
    if !shared_sources.is_empty() {
        match activity.meta::<Vec<Resolved>>(SHARED_RANGES_KEY).await {
            Ok(Some(saved)) => shared_sources.restore(saved),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "persisted shared ranges not read"),
        }
    }
    let sources = Arc::new(Live::from_arc(shared_sources.clone()));
    let persist_activity = activity.clone();
    let ranges_task = tokio::spawn(sources::follow(
        sources.subscribe(),
        spf.clone(),
        {
            let tasks = tasks.clone();
            move |resolved| {
                let a = persist_activity.clone();
                tasks.spawn(async move {
                    if let Err(e) = a.set_meta(SHARED_RANGES_KEY, &resolved).await {
                        tracing::warn!(error = %e, "shared ranges not persisted");
                    }
                });
            }
        },
        stop_rx.clone(),
    ));
    spawn_signature_pruner(&tasks, signatures.clone(), cfg.access.dkim_replay.max_age.0);
    let incoming = cfg.queue.dir.join("incoming");
    let bodies = Bodies::new(
        incoming.clone(),
        cfg.server.ingress_memory,
        cfg.server.spill_threshold,
    )
    .map_err(|source| StartError::Incoming {
        dir: incoming,
        source,
    })?;
    let bodies = Arc::new(bodies);
    spawn_ingress_gauge(&tasks, bodies.clone(), cfg.server.ingress_memory);
    let limits = Arc::new(Limits::new(
        &cfg.limits,
        match &shared_store {
            None => limits::Store::open(&cfg.admin.database)?,
            Some(pg) => limits::Store::shared(pg.clone()),
        },
        bus.clone(),
    ));
    start_limits(
        &tasks,
        &limits,
        &queue,
        limits_rx,
        cfg.store.sync_interval.0,
    )
    .await;
    let parts = Parts {
        intake: Arc::new(Limited::new(queue.clone(), limits.clone())),
        bus: bus.clone(),
        dkim_dns: dns_for_dkim,
        signatures,
        bodies,
    };

    let lifecycle = Arc::new(Lifecycle::new());
    let gate = Arc::new(Gate::new(
        cfg.server.max_connections,
        cfg.server.max_connections_per_ip,
    ));
    let listener: Arc<Ingress> = Arc::new(Listener {
        rules: Live::new(parts.rules(&cfg, shared_sources, routes)?),
        gate: gate.clone(),
        sessions: TaskTracker::new(),
    });
    let mut bound = Vec::new();
    let mut serving = Vec::new();
    for (l, implicit) in smtp_listeners {
        if let Ok(addr) = l.local_addr() {
            tracing::info!(%addr, implicit_tls = implicit, "smtp listening");
            bound.push(addr);
        }
        serving.push(tokio::spawn(listener.clone().serve(
            l,
            implicit,
            lifecycle.subscribe(),
        )));
    }
    let smtp_addrs = bound.clone();
    let (reloads, reload_rx) = Reloads::channel();
    let state = Arc::new(AdminState {
        config: Live::from_arc(cfg.clone()),
        reloads: reloads.clone(),
        queue: queue.clone(),
        limits: limits.clone(),
        spf,
        deliverer: deliverer.clone(),
        activity: activity.clone(),
        trusted: trusted_store.clone(),
        tracking: tracking_store.clone(),
        shared_store: shared_store.clone(),
        metrics,
        shared_sources: sources.clone(),
        listening: false.into(),
        smtp_addrs,
        admin_addr: admin_listener.as_ref().and_then(|l| l.local_addr().ok()),
        guard: admin::guard::Guard::new(),
        share_cell: Default::default(),
        lifecycle: lifecycle.clone(),
    });
    state.listening.store(true, Ordering::Relaxed);
    admin::onboarding::spawn_gauge_refresh(&tasks, state.clone(), Duration::from_secs(900));
    spawn_activity_pruner(&tasks, activity.clone(), cfg.admin.retention.0);
    let (admin_stop_tx, mut admin_stop_rx) = watch::channel(false);
    let admin_task = admin_listener.map(|l| {
        if let Ok(addr) = l.local_addr() {
            tracing::info!(%addr, "admin listening");
        }
        let app = admin::router(state.clone());
        tokio::spawn(async move {
            let stop = async move {
                let _ = admin_stop_rx.changed().await;
            };
            // The peer's address, for the sign-in back-off.
            let app = app.into_make_service_with_connect_info::<SocketAddr>();
            if let Err(e) = axum::serve(l, app).with_graceful_shutdown(stop).await {
                tracing::error!(error = %e, "admin server failed");
            }
        })
    });
    tracing::info!(queued = queue.len(), "ready");
    notify_systemd(&tasks);
    let mut reloader = Reloader {
        path: options.config_path,
        applied_text: started_text.clone(),
        started_text,
        hash: String::new(),
        running: cfg.clone(),
        listener: listener.clone(),
        router,
        trust,
        sources,
        admin: state.clone(),
        parts,
        spf: state.spf.clone(),
        spf_cache,
        set_log_level: options.set_log_level,
        tasks: tasks.clone(),
    };
    reloader.publish_info();
    watch_hangup(&tasks, reloads);
    let reload_task = tokio::spawn(reloader.serve(reload_rx, stop_rx.clone()));

    shutdown.await;
    // One deadline for the whole stop, whatever hangs (a silent smart host, a client
    // that never sends, a database that does not answer): this function enforces it,
    // and a watchdog thread stands behind it in case the runtime itself is wedged.
    let server = &cfg.server;
    let began = Instant::now();
    let hard = began + server.drain_delay.0 + server.shutdown_timeout.0 + STOP_SLACK;
    crate::lifecycle::watchdog(hard.duration_since(began));
    let draining_since = lifecycle.drain(DrainOrigin::Signal);
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    // A drain the API began earlier counts toward the delay.
    let drained = (draining_since + server.drain_delay.0).min(began + server.drain_delay.0);
    tokio::time::sleep_until(drained).await;
    let ordered = async {
        tracing::info!("stopping: no new connections; sessions may finish");
        lifecycle.advance(Phase::Closing);
        let deadline = Instant::now() + server.shutdown_timeout.0;
        if !gate.wait_idle(deadline.into_std()).await {
            tracing::warn!(
                active = gate.active(),
                "sessions still open at the deadline: closing them with 421"
            );
            lifecycle.advance(Phase::Stop);
        }
        // The accept loops have returned on Closing; the session tasks end with their
        // sessions (told to stop above when the deadline passed).
        for s in serving {
            let _ = s.await;
        }
        listener.sessions.close();
        if tokio::time::timeout(Duration::from_secs(1), listener.sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = listener.sessions.len(),
                "session tasks still running"
            );
        }
        // Deliveries: no new attempts; those in flight finish (or are cut before their
        // data) and record their results before the spool's last sync.
        scheduling.cancel();
        let _ = scheduler.await;
        let left = queue
            .wind_down(&attempts, deadline, Duration::from_secs(2), &cut)
            .await;
        if left == 0 {
            tracing::info!("deliveries finished");
        }
        deliverer.close(Duration::from_secs(1)).await;
        queue.close().await;
        // The recorders flush what they hold, then the periodic tasks stop.
        let _ = stop_tx.send(true);
        if let Some(t) = trusted_task {
            let _ = t.await;
        }
        if let Some(t) = tracking_task {
            let _ = t.await;
        }
        let _ = ranges_task.await;
        let _ = reload_task.await;
        let _ = activity_task.await;
        let _ = admin_stop_tx.send(true);
        if let Some(t) = admin_task {
            let _ = tokio::time::timeout(Duration::from_secs(1), t).await;
        }
        tasks.shutdown().await;
    };
    // The runtime's own shutdown (main's) comes after: it gets the last moments.
    if tokio::time::timeout_at(hard - RUNTIME_EXIT, ordered)
        .await
        .is_err()
    {
        tracing::error!(
            "the stop deadline (server.drain_delay + server.shutdown_timeout + 5 s) passed: exiting with work left; what was acknowledged is on disk"
        );
        return Ok(());
    }
    tracing::info!("stopped");
    Ok(())
}
