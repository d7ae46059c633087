//! SPF (RFC 7208): `record` and `macros` are the pure parser, `dns` the lookups, `walk`
//! the evaluation over DNS, `validate` the gateway's onboarding rules. The routing stage
//! reaches this module only through [`SpfLookup`](crate::pipeline::SpfLookup).

pub mod dns;
pub mod eval;
pub mod gateway;
pub mod hickory;
pub mod lenient;
pub mod macros;
pub mod record;
pub mod validate;
pub mod walk;

use std::time::Duration;

use serde::Serialize;

use crate::pipeline::{GatewayAuthorization, SpfLookup, SpfLookupError};
use dns::SpfDns;
use walk::{Node, SpfStatus, Walk};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
    Info,
}

/// One observation about a record, with a stable `code` for machines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub code: &'static str,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub term: Option<String>,
    /// The record (domain) the finding is about.
    pub domain: String,
}

/// Evaluations over one resolver, bounded by the whole-evaluation timeout.
pub struct SpfService<D> {
    dns: D,
    timeout: Duration,
}

impl<D: SpfDns> SpfService<D> {
    pub fn new(dns: D, timeout: Duration) -> SpfService<D> {
        SpfService { dns, timeout }
    }

    pub async fn walk(&self, domain: &str) -> Walk {
        match tokio::time::timeout(self.timeout, walk::walk(&self.dns, domain)).await {
            Ok(w) => w,
            Err(_) => timed_out(domain, self.timeout),
        }
    }

    /// RFC 7208 `check_host()` for one message, bounded by the whole-evaluation timeout
    /// (a temperror when it runs out).
    pub async fn evaluate(&self, query: &eval::Query) -> eval::Evaluation {
        match tokio::time::timeout(self.timeout, eval::check_host(&self.dns, query)).await {
            Ok(e) => e,
            Err(_) => eval::Evaluation {
                result: eval::SpfResult::TempError,
                explanation: format!(
                    "SPF evaluation did not finish within {}s",
                    self.timeout.as_secs()
                ),
                mechanism: None,
                domain: eval::identity(query).1,
                lookups: 0,
                void_lookups: 0,
            },
        }
    }

    /// The onboarding report for `domain` against `region`'s include, with the
    /// receivers' verdict for each address range the gateway publishes for the region.
    pub async fn check(&self, domain: &str, region: &str) -> validate::Report {
        let report = validate::validate(self.walk(domain).await, region);
        let pass = self.gateway_pass(domain, region).await;
        report.with_gateway_pass(pass)
    }

    /// `check_host()` of `domain`'s record for one address of each of the region's
    /// ranges, as a receiver of gateway-relayed mail from `postmaster@<domain>` runs it.
    pub async fn gateway_pass(&self, domain: &str, region: &str) -> gateway::GatewayPass {
        self.gateway_pass_for(domain, crate::regions::spf_include_for(region))
            .await
    }

    /// The same for the ranges of one gateway include name.
    async fn gateway_pass_for(&self, domain: &str, include: &str) -> gateway::GatewayPass {
        let published = self.walk(include).await;
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut checks = Vec::new();
        for range in authorized_networks(&published)
            .into_iter()
            .take(gateway::MAX_RANGES)
        {
            let address = gateway::probe_address(&range);
            let query = eval::Query {
                ip: address,
                sender: format!("postmaster@{domain}"),
                helo: domain.to_string(),
                receiver: "unknown".into(),
                timestamp,
            };
            checks.push((range, address, self.evaluate(&query).await));
        }
        gateway::summarize(checks)
    }
}

/// The addresses a record tree authorizes outright: every `+ip4`/`+ip6` before the
/// `all` of each record met (includes and redirects followed). This is how a platform
/// publishes its sending ranges (`spf.protection.outlook.com`, `_spf.google.com`).
pub fn authorized_networks(walk: &Walk) -> Vec<ipnet::IpNet> {
    fn visit(node: &Node, out: &mut Vec<ipnet::IpNet>) {
        if let Some(text) = &node.record {
            let parsed = record::parse(text);
            let end = parsed.all_position().unwrap_or(usize::MAX);
            for p in parsed.terms.iter().take(end) {
                let record::Term::Directive {
                    qualifier: record::Qualifier::Pass,
                    mechanism,
                } = &p.term
                else {
                    continue;
                };
                let net = match mechanism {
                    record::Mechanism::Ip4 { addr, prefix } => {
                        ipnet::Ipv4Net::new(*addr, prefix.unwrap_or(32))
                            .ok()
                            .map(ipnet::IpNet::V4)
                    }
                    record::Mechanism::Ip6 { addr, prefix } => {
                        ipnet::Ipv6Net::new(*addr, prefix.unwrap_or(128))
                            .ok()
                            .map(ipnet::IpNet::V6)
                    }
                    _ => None,
                };
                if let Some(net) = net.map(|n| n.trunc()) {
                    if !out.contains(&net) {
                        out.push(net);
                    }
                }
            }
        }
        for child in &node.children {
            visit(child, out);
        }
    }
    let mut out = Vec::new();
    visit(&walk.tree, &mut out);
    out
}

fn timed_out(domain: &str, after: Duration) -> Walk {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    Walk {
        domain: domain.clone(),
        status: SpfStatus::TempError,
        records: Vec::new(),
        root: None,
        tree: Node {
            domain: domain.clone(),
            via: walk::Via::Root,
            record: None,
            lookups: 0,
            total_lookups: 0,
            error: Some("evaluation timed out".into()),
            children: Vec::new(),
        },
        lookups: 0,
        void_lookups: 0,
        findings: vec![Finding {
            severity: Severity::Error,
            code: "dns_timeout",
            message: format!(
                "SPF evaluation did not finish within {}s: temperror",
                after.as_secs()
            ),
            term: None,
            domain,
        }],
        ttl: 60,
        gateway: Vec::new(),
    }
}

impl<D: SpfDns> SpfLookup for SpfService<D> {
    async fn gateway_authorization(
        &self,
        domain: &str,
    ) -> Result<GatewayAuthorization, SpfLookupError> {
        let w = self.walk(domain).await;
        if w.status == SpfStatus::TempError {
            let reason = w
                .findings
                .iter()
                .find(|f| f.severity == Severity::Error)
                .map(|f| f.message.clone())
                .unwrap_or_else(|| "temperror".into());
            return Err(SpfLookupError {
                domain: domain.to_string(),
                reason,
            });
        }
        // The include names the region; the evaluator decides whether receivers pass
        // what the gateway relays, the same check_host() as `spf eval`.
        let mut include = w.authorized();
        if let Some(found) = include {
            let name = match found {
                crate::regions::GatewayInclude::Region(r) => crate::regions::spf_include_for(r),
                crate::regions::GatewayInclude::Global => crate::regions::GLOBAL_INCLUDE,
            };
            let pass = self.gateway_pass_for(domain, name).await;
            let temp = !pass.ranges.is_empty()
                && pass
                    .ranges
                    .iter()
                    .all(|r| r.result == eval::SpfResult::TempError);
            if temp {
                return Err(SpfLookupError {
                    domain: domain.to_string(),
                    reason: "temperror evaluating the record for the gateway's addresses".into(),
                });
            }
            match pass.verdict {
                gateway::Verdict::None => {
                    tracing::warn!(
                        domain,
                        "the SPF record names the gateway's include but fails every gateway range"
                    );
                    include = None;
                }
                gateway::Verdict::Some => {
                    tracing::warn!(domain, "the SPF record fails some of the gateway's ranges");
                }
                gateway::Verdict::All | gateway::Verdict::Unknown => {}
            }
        }
        Ok(GatewayAuthorization {
            include,
            // Bounded so a zero TTL does not mean a lookup per message, nor a long one
            // that a fixed record stays unnoticed for hours.
            ttl: Duration::from_secs(u64::from(w.ttl).clamp(30, 3600)),
        })
    }
}
