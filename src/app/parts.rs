//! What the stages are built from, at start and at each reload: the session's
//! settings, the rules of a session, the routes and the trust policy.

use std::sync::Arc;

use hickory_resolver::TokioResolver;

use crate::config::Config;
use crate::events::EventBus;
use crate::limits::gate::Limited;
use crate::queue::file::FileSpool;
use crate::queue::Queue;
use crate::route::cache::SpfCache;
use crate::route::SpfRouter;
use crate::smtp::body::Bodies;
use crate::smtp::conn::Context;
use crate::smtp::listener::{Access, Listener, ProxyTrust, Rules};
use crate::smtp::session::SessionConfig;
use crate::smtp::tls::{acceptor, TlsError};
use crate::spf::hickory::HickoryDns;
use crate::spf::SpfService;
use crate::tenant::dkim::DkimVerifier;
use crate::tenant::replay::{self, ReplayGuard};
use crate::tenant::sources::SharedSources;
use crate::tenant::TenantBinder;
use crate::trusted::TrustPolicy;

pub(super) fn session_config(cfg: &Config) -> SessionConfig {
    SessionConfig {
        hostname: cfg.server.hostname.clone(),
        max_message_size: cfg.server.max_message_size,
        max_recipients: cfg.server.max_recipients,
        max_line_length: cfg.server.max_line_length,
        hop_limit: cfg.server.hop_limit,
        max_errors: cfg.server.max_errors,
        bare_line_endings: cfg.server.bare_line_endings,
        domains: cfg.access.domains.clone(),
        postmaster_domain: cfg.access.domains[0].clone(),
        starttls: cfg.tls.is_some(),
        tls_required: cfg.tls.as_ref().is_some_and(|t| t.require),
        check_sender: cfg.routing.spf_aware
            && cfg.routing.on_unauthorized == crate::config::OnUnauthorized::Reject,
        limits: cfg
            .limits
            .iter()
            .any(|l| l.action == crate::config::LimitAction::Defer),
    }
}

pub(super) type SpfRoutes = SpfRouter<SpfService<HickoryDns>>;

pub(super) type Intake = Limited<Queue<FileSpool>>;

pub(super) type Ingress = Listener<Intake, SpfRoutes>;

/// What the rules of a session are built from, at start and at each reload.
pub(super) struct Parts {
    pub(super) intake: Arc<Intake>,
    pub(super) bus: EventBus,
    pub(super) dkim_dns: TokioResolver,
    /// The memory of DKIM signatures that proved a message (`access.dkim_replay`).
    pub(super) signatures: replay::Store,
    /// Bodies in flight (`server.ingress_memory`, files in the spool's `incoming/`).
    pub(super) bodies: Arc<Bodies>,
}

impl Parts {
    pub(super) fn rules(
        &self,
        cfg: &Config,
        sources: Arc<SharedSources>,
        router: Arc<SpfRoutes>,
    ) -> Result<Rules<Intake, SpfRoutes>, TlsError> {
        // Read from disk each time: a reload is how a rotated certificate is picked up.
        let tls = match &cfg.tls {
            Some(t) => Some(acceptor(&t.cert, &t.key)?),
            None => None,
        };
        let r = cfg.access.dkim_replay;
        let replay = r.enabled.then(|| {
            Arc::new(ReplayGuard {
                store: self.signatures.clone(),
                window: r.window.0,
                max_age: r.max_age.0,
                node: cfg.server.hostname.clone(),
            })
        });
        let tenant = Arc::new(TenantBinder::new(
            cfg.access.shared_ranges.clone(),
            cfg.access.domains.clone(),
            DkimVerifier::new(self.dkim_dns.clone()),
            cfg.dns.spf_timeout.0,
            replay,
        ));
        Ok(Rules {
            context: Arc::new(Context {
                cfg: Arc::new(session_config(cfg)),
                intake: self.intake.clone(),
                policy: router,
                events: self.bus.clone(),
                tenant,
                command_timeout: cfg.server.command_timeout.0,
                data_timeout: cfg.server.data_timeout.0,
                session_timeout: cfg.server.session_timeout.0,
                min_data_rate: cfg.server.min_data_rate,
                bodies: self.bodies.clone(),
            }),
            access: Access {
                allowed: cfg.access.allowed_ranges.clone(),
                sources,
            },
            tls,
            proxy: ProxyTrust {
                trusted: cfg.server.proxy_protocol.trusted.clone(),
                timeout: cfg.server.proxy_protocol.timeout.0,
            },
        })
    }
}

pub(super) fn trust_policy(cfg: &Config) -> TrustPolicy {
    TrustPolicy::new(
        &cfg.access.internal_domains,
        &cfg.trusted.exclude_senders,
        &cfg.trusted.exclude_recipient_domains,
    )
}

/// `cache` outlives reloads (`[dns]` cannot change without a restart): the answers and
/// the last known ones that carry routing through a DNS failure stay.
pub(super) fn spf_routes(
    cfg: &Config,
    spf: &Arc<SpfService<HickoryDns>>,
    cache: &Arc<SpfCache>,
) -> SpfRoutes {
    SpfRouter::new(
        &cfg.routing,
        cfg.access.internal_domains.clone(),
        spf.clone(),
        cache.clone(),
    )
}
