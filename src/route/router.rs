//! Which route each recipient takes. Recipients in `internal_domains` take the internal
//! route when one is configured; the others go to the smart hosts of the region the
//! sender domain's SPF record authorizes, or wherever `on_unauthorized` says.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use super::cache::{Cached, SpfCache};
use crate::config::{OnUnauthorized, RoutingConfig};
use crate::envelope::{domain_in, Envelope, Reply};
use crate::events::SpfOutcome;
use crate::pipeline::{PlanItem, Router, SenderPolicy, SenderVerdict, SpfLookup};
use crate::regions::{GatewayInclude, RouteTarget};

/// Where a sender domain's external mail goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Route(Arc<RouteTarget>, SpfOutcome),
    /// Do not send; record this reply (4xx: keep retrying, 5xx: bounce).
    Refuse(Reply),
}

pub struct SpfRouter<L> {
    lookup: Arc<L>,
    routes: HashMap<String, Arc<RouteTarget>>,
    default_region: String,
    internal: Option<Arc<RouteTarget>>,
    fallback: Option<Arc<RouteTarget>>,
    spf_aware: bool,
    on_unauthorized: OnUnauthorized,
    internal_domains: Vec<String>,
    /// Shared with the router a reload replaces: its answers, and the last known ones a
    /// DNS failure falls back on, outlive the configuration.
    cache: Arc<SpfCache>,
}

impl<L: SpfLookup> SpfRouter<L> {
    pub fn new(
        routing: &RoutingConfig,
        internal_domains: Vec<String>,
        lookup: Arc<L>,
        cache: Arc<SpfCache>,
    ) -> SpfRouter<L> {
        SpfRouter {
            lookup,
            routes: routing
                .regions
                .iter()
                .map(|(k, v)| (k.clone(), Arc::new(v.clone())))
                .collect(),
            default_region: routing.region.clone(),
            internal: routing.internal.clone().map(Arc::new),
            fallback: routing.fallback.clone().map(Arc::new),
            spf_aware: routing.spf_aware,
            on_unauthorized: routing.on_unauthorized,
            internal_domains,
            cache,
        }
    }

    fn default_route(&self) -> Arc<RouteTarget> {
        self.routes[&self.default_region].clone()
    }

    fn route_for(&self, include: GatewayInclude) -> Arc<RouteTarget> {
        match include {
            GatewayInclude::Region(r) => self
                .routes
                .get(r)
                .cloned()
                .unwrap_or_else(|| self.default_route()),
            // The global record authorizes every region; ours is the configured one.
            GatewayInclude::Global => self.default_route(),
        }
    }

    fn required_include(&self) -> String {
        crate::regions::spf_include_for(&self.default_region).to_string()
    }

    /// The gateway include in the domain's SPF tree: cached, else looked up; a DNS
    /// failure falls back on the last known answer. `Err` when there is none.
    async fn authorization(
        &self,
        domain: &str,
    ) -> Result<Option<GatewayInclude>, Option<GatewayInclude>> {
        let now = Instant::now();
        let stale = match self.cache.get(domain, now) {
            Cached::Fresh(answer) => return Ok(answer),
            Cached::Stale(answer) => Some(answer),
            Cached::Missing => None,
        };
        match self.lookup.gateway_authorization(domain).await {
            Ok(auth) => {
                self.cache
                    .put(domain, auth.include, auth.ttl, Instant::now());
                tracing::info!(domain, include = ?auth.include, ttl = auth.ttl.as_secs(), "SPF looked up");
                Ok(auth.include)
            }
            Err(e) => {
                tracing::warn!(domain, error = %e, last_known = ?stale, "SPF lookup failed");
                Err(stale.flatten())
            }
        }
    }

    pub async fn decide(&self, sender_domain: Option<&str>) -> Decision {
        let Some(domain) = sender_domain.filter(|_| self.spf_aware) else {
            return Decision::Route(self.default_route(), SpfOutcome::NotChecked);
        };
        let domain = domain.to_ascii_lowercase();
        match self.authorization(&domain).await {
            Ok(Some(include)) => {
                return Decision::Route(self.route_for(include), SpfOutcome::Authorized)
            }
            Ok(None) => {}
            // DNS never blocks mail: the last answer, else the default region.
            Err(last) => {
                let route = last.map_or_else(|| self.default_route(), |i| self.route_for(i));
                return Decision::Route(route, SpfOutcome::DnsError);
            }
        }
        let include = self.required_include();
        match self.on_unauthorized {
            OnUnauthorized::Default => Decision::Route(self.default_route(), SpfOutcome::Unauthorized),
            OnUnauthorized::Fallback => Decision::Route(
                self.fallback.clone().unwrap_or_else(|| self.default_route()),
                SpfOutcome::Unauthorized,
            ),
            OnUnauthorized::Defer => Decision::Refuse(Reply::new(
                451,
                "4.7.1",
                format!("SPF record of {domain} does not authorize the smart hosts: publish include:{include}; delivery will be retried"),
            )),
            OnUnauthorized::Reject => Decision::Refuse(Reply::new(
                550,
                "5.7.1",
                format!("SPF record of {domain} does not authorize the smart hosts: publish include:{include}"),
            )),
        }
    }

    pub fn is_internal(&self, domain: &str) -> bool {
        self.internal.is_some() && domain_in(domain, &self.internal_domains)
    }
}

impl<L: SpfLookup> Router for SpfRouter<L> {
    async fn plan(&self, env: &Envelope, pending: &[usize]) -> Vec<PlanItem> {
        let (internal, external): (Vec<usize>, Vec<usize>) = pending
            .iter()
            .partition(|&&i| self.is_internal(env.recipients[i].domain()));
        let mut plan = Vec::new();
        if let (false, Some(route)) = (internal.is_empty(), &self.internal) {
            count(&route.name, SpfOutcome::NotChecked);
            plan.push(PlanItem::Leg {
                route: route.clone(),
                recipients: internal,
                spf: SpfOutcome::NotChecked,
            });
        }
        if !external.is_empty() {
            match self.decide(env.sender_domain()).await {
                Decision::Route(route, spf) => {
                    count(&route.name, spf);
                    plan.push(PlanItem::Leg {
                        route,
                        recipients: external,
                        spf,
                    });
                }
                Decision::Refuse(reply) => {
                    count("none", SpfOutcome::Unauthorized);
                    plan.push(PlanItem::Refuse {
                        recipients: external,
                        reply,
                    });
                }
            }
        }
        plan
    }
}

fn count(route: &str, spf: SpfOutcome) {
    metrics::counter!(crate::telemetry::ROUTING_DECISIONS_TOTAL,
        "route" => route.to_string(), "spf" => spf.label())
    .increment(1);
}

impl<L: SpfLookup> SenderPolicy for SpfRouter<L> {
    async fn check_sender(&self, domain: &str) -> SenderVerdict {
        if self.on_unauthorized != OnUnauthorized::Reject || !self.spf_aware {
            return SenderVerdict::Accept;
        }
        match self.decide(Some(domain)).await {
            Decision::Refuse(reply) => {
                tracing::info!(
                    domain,
                    "sender refused: SPF does not authorize the smart hosts"
                );
                SenderVerdict::Reject(format!("{} (mail would fail SPF at receivers)", reply.text))
            }
            Decision::Route(..) => SenderVerdict::Accept,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    use crate::pipeline::{GatewayAuthorization, SpfLookupError};
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    struct FakeSpf {
        answers: HashMap<&'static str, Option<GatewayInclude>>,
        down: AtomicBool,
        calls: AtomicUsize,
    }

    impl SpfLookup for FakeSpf {
        async fn gateway_authorization(
            &self,
            domain: &str,
        ) -> Result<GatewayAuthorization, SpfLookupError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                return Err(SpfLookupError {
                    domain: domain.into(),
                    reason: "timeout".into(),
                });
            }
            Ok(GatewayAuthorization {
                include: self.answers.get(domain).copied().flatten(),
                ttl: Duration::from_millis(0),
            })
        }
    }

    fn router(policy: &str) -> SpfRouter<FakeSpf> {
        let cfg = Config::parse(
            &format!(
                r#"
[access]
allowed_ranges = ["127.0.0.1"]
domains = ["de.test", "us.test", "none.test", "glob.test"]
[routing]
region = "eu"
on_unauthorized = "{policy}"
[routing.internal]
hosts = ["127.0.0.1:2600"]
[routing.fallback]
hosts = ["127.0.0.1:2700"]
"#
            ),
            Path::new("t"),
        )
        .unwrap();
        let fake = FakeSpf {
            answers: HashMap::from([
                ("de.test", Some(GatewayInclude::Region("de"))),
                ("us.test", Some(GatewayInclude::Region("us"))),
                ("glob.test", Some(GatewayInclude::Global)),
                ("none.test", None),
            ]),
            down: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
        };
        SpfRouter::new(
            &cfg.routing,
            cfg.access.internal_domains.clone(),
            Arc::new(fake),
            Arc::default(),
        )
    }

    fn route_name(d: Decision) -> String {
        match d {
            Decision::Route(r, _) => r.name.clone(),
            Decision::Refuse(r) => format!("refuse {}", r.code),
        }
    }

    #[tokio::test]
    async fn region_from_spf() {
        let r = router("default");
        assert_eq!(route_name(r.decide(Some("de.test")).await), "de");
        assert_eq!(route_name(r.decide(Some("US.test")).await), "us");
        assert_eq!(route_name(r.decide(Some("glob.test")).await), "eu");
        assert_eq!(route_name(r.decide(None).await), "eu");
    }

    #[tokio::test]
    async fn unauthorized_policies() {
        assert_eq!(
            route_name(router("default").decide(Some("none.test")).await),
            "eu"
        );
        assert_eq!(
            route_name(router("fallback").decide(Some("none.test")).await),
            "fallback"
        );
        assert_eq!(
            route_name(router("defer").decide(Some("none.test")).await),
            "refuse 451"
        );
        assert_eq!(
            route_name(router("reject").decide(Some("none.test")).await),
            "refuse 550"
        );
        let verdict = router("reject").check_sender("none.test").await;
        assert!(
            matches!(verdict, SenderVerdict::Reject(t) if t.contains("include:eu._netblocks.mimecast.com"))
        );
        assert_eq!(
            router("reject").check_sender("de.test").await,
            SenderVerdict::Accept
        );
        assert_eq!(
            router("defer").check_sender("none.test").await,
            SenderVerdict::Accept
        );
    }

    #[tokio::test]
    async fn dns_failure_uses_last_answer_then_default() {
        let r = router("reject");
        assert_eq!(route_name(r.decide(Some("de.test")).await), "de");
        r.lookup.down.store(true, Ordering::SeqCst);
        assert!(
            matches!(r.decide(Some("de.test")).await, Decision::Route(rt, SpfOutcome::DnsError) if rt.name == "de")
        );
        assert!(
            matches!(r.decide(Some("us.test")).await, Decision::Route(rt, SpfOutcome::DnsError) if rt.name == "eu")
        );
        assert_eq!(
            r.check_sender("none.test").await,
            SenderVerdict::Accept,
            "DNS trouble never blocks mail"
        );
    }

    #[tokio::test]
    async fn internal_recipients_split_off() {
        let r = router("default");
        let env = Envelope::for_test("a@de.test", &["x@ext.test", "y@us.test", "z@other.test"], 0);
        let plan = r.plan(&env, &[0, 1, 2]).await;
        let legs: Vec<(String, Vec<usize>)> = plan
            .into_iter()
            .map(|p| match p {
                PlanItem::Leg {
                    route, recipients, ..
                } => (route.name.clone(), recipients),
                PlanItem::Refuse { .. } => panic!(),
            })
            .collect();
        assert_eq!(
            legs,
            vec![
                ("internal".to_string(), vec![1]),
                ("de".to_string(), vec![0, 2])
            ]
        );
    }
}
