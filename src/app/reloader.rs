//! Reloads: SIGHUP and the admin API ask, one task applies them in turn.

use std::sync::Arc;

use tokio::sync::watch;

use super::parts::{spf_routes, trust_policy, Ingress, Parts, SpfRoutes};
use crate::admin::{self, Admin};
use crate::config::Config;
use crate::live::Live;
use crate::reload::{self, Effect, LogLevelSetter, Origin, Outcome, ReloadError, Reloads};
use crate::route::cache::SpfCache;
use crate::spf::hickory::HickoryDns;
use crate::spf::SpfService;
use crate::tasks::Tasks;
use crate::tenant::sources::SharedSources;
use crate::trusted::TrustPolicy;

/// SIGHUP (systemd's `ExecReload`) must not end the relay, as its default action would:
/// it asks for a reload like the admin API does.
pub(super) fn watch_hangup(tasks: &Tasks, reloads: Reloads) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        tracing::warn!("SIGHUP handler not installed");
        return;
    };
    tasks.spawn(async move {
        while hangups.recv().await.is_some() {
            // The outcome is logged by the reloader.
            let _ = reloads.request(Origin::Signal).await;
        }
    });
}

/// The one task that applies reloads, so two never interleave.
pub(super) struct Reloader {
    pub(super) path: Option<std::path::PathBuf>,
    /// The file as the process started with it.
    pub(super) started_text: String,
    /// The file whose applicable keys are in force.
    pub(super) applied_text: String,
    pub(super) hash: String,
    /// The configuration in force (restart-only keys as started).
    pub(super) running: Arc<Config>,
    pub(super) listener: Arc<Ingress>,
    pub(super) router: Arc<Live<SpfRoutes>>,
    pub(super) trust: Option<Arc<Live<TrustPolicy>>>,
    pub(super) sources: Arc<Live<SharedSources>>,
    pub(super) admin: Admin,
    pub(super) parts: Parts,
    pub(super) spf: Arc<SpfService<HickoryDns>>,
    pub(super) spf_cache: Arc<SpfCache>,
    pub(super) set_log_level: Option<LogLevelSetter>,
    pub(super) tasks: Tasks,
}

impl Reloader {
    pub(super) async fn serve(
        mut self,
        mut requests: tokio::sync::mpsc::Receiver<reload::Request>,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            let request = tokio::select! {
                r = requests.recv() => match r {
                    Some(r) => r,
                    None => return,
                },
                _ = stop.changed() => return,
            };
            let outcome = self.reload().await;
            match &outcome {
                Ok(o) => {
                    metrics::counter!(crate::telemetry::CONFIG_RELOADS_TOTAL).increment(1);
                    tracing::info!(origin = request.origin.label(), hash = %o.hash, applied = ?o.applied, restart_required = ?o.restart_required, "configuration reloaded");
                    for key in &o.restart_required {
                        tracing::warn!(key = %key, "configuration changed: restart required for it to take effect");
                    }
                }
                Err(e) => {
                    metrics::counter!(crate::telemetry::CONFIG_RELOAD_FAILURES_TOTAL).increment(1);
                    tracing::error!(origin = request.origin.label(), error = %e, "configuration not reloaded; running on the previous one");
                }
            }
            let _ = request.reply.send(outcome);
        }
    }

    async fn reload(&mut self) -> Result<Outcome, ReloadError> {
        let Some(path) = self.path.clone() else {
            return Err(ReloadError::Invalid(
                "the relay was started without a configuration file".into(),
            ));
        };
        let text = tokio::fs::read_to_string(&path)
            .await
            .map_err(|e| ReloadError::Invalid(format!("cannot read {}: {e}", path.display())))?;
        let parsed =
            Config::parse(&text, &path).map_err(|e| ReloadError::Invalid(e.to_string()))?;
        let applied: Vec<String> = reload::changed_keys(&self.applied_text, &text)
            .map_err(ReloadError::Invalid)?
            .into_iter()
            .filter(|k| reload::effect(k) == Effect::Applied)
            .collect();
        let restart_required: Vec<String> = reload::changed_keys(&self.started_text, &text)
            .map_err(ReloadError::Invalid)?
            .into_iter()
            .filter(|k| reload::effect(k) == Effect::RestartRequired)
            .collect();
        let cfg = reload::effective(&self.running, parsed);
        // Everything that can fail is built before anything is swapped.
        let old_sources = self.sources.get();
        let sources_changed = applied.iter().any(|k| k == "access.shared_ranges");
        let sources = if sources_changed {
            let s = Arc::new(SharedSources::new(&cfg.access.shared_ranges));
            s.restore(old_sources.resolved());
            s
        } else {
            old_sources
        };
        let routes = Arc::new(spf_routes(&cfg, &self.spf, &self.spf_cache));
        let rules = self
            .parts
            .rules(&cfg, sources.clone(), routes.clone())
            .map_err(|e| ReloadError::Invalid(e.to_string()))?;
        if applied.iter().any(|k| k == "log.level") {
            if let Some(set) = &self.set_log_level {
                set(&cfg.log.level).map_err(ReloadError::Invalid)?;
            }
        }

        self.listener.rules.set(Arc::new(rules));
        self.listener
            .gate
            .set_max_per_ip(cfg.server.max_connections_per_ip);
        self.router.set(routes);
        if sources_changed {
            self.sources.set(sources);
        }
        if let Some(trust) = &self.trust {
            trust.set(Arc::new(trust_policy(&cfg)));
        }
        let cfg = Arc::new(cfg);
        self.admin.config.set(cfg.clone());
        self.running = cfg;
        self.applied_text = text;
        metrics::gauge!(crate::telemetry::CONFIG_RESTART_REQUIRED)
            .set(restart_required.len() as f64);
        self.publish_info();
        // Changed ranges void the confirmation: the gauge says so now, not in 15 minutes.
        let admin = self.admin.clone();
        self.tasks.spawn(async move {
            let _ = admin::onboarding::compute_steps(&admin).await;
        });
        Ok(Outcome {
            hash: self.hash.clone(),
            applied,
            restart_required,
        })
    }

    /// `smartrelay_config_info{hash}` is 1 for the configuration in force (0 for one
    /// replaced), with the time it was loaded.
    pub(super) fn publish_info(&mut self) {
        let hash = reload::fingerprint(self.applied_text.as_bytes());
        if !self.hash.is_empty() && self.hash != hash {
            metrics::gauge!(crate::telemetry::CONFIG_INFO, "hash" => self.hash.clone()).set(0.0);
        }
        metrics::gauge!(crate::telemetry::CONFIG_INFO, "hash" => hash.clone()).set(1.0);
        metrics::gauge!(crate::telemetry::CONFIG_LOADED_TIMESTAMP_SECONDS)
            .set(crate::envelope::now_ms() as f64 / 1000.0);
        self.hash = hash;
    }
}
