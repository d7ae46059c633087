//! SPF (RFC 7208): `record` and `macros` are the pure parser, `dns` the lookups, `walk`
//! the evaluation over DNS, `validate` the gateway's onboarding rules. The routing stage
//! reaches this module only through [`SpfLookup`](crate::pipeline::SpfLookup).

pub mod dns;
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

    /// The onboarding report for `domain` against `region`'s include.
    pub async fn check(&self, domain: &str, region: &str) -> validate::Report {
        validate::validate(self.walk(domain).await, region)
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
            via: "root",
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
        Ok(GatewayAuthorization {
            include: w.authorized(),
            // Bounded so a zero TTL does not mean a lookup per message, nor a long one
            // that a fixed record stays unnoticed for hours.
            ttl: Duration::from_secs(u64::from(w.ttl).clamp(30, 3600)),
        })
    }
}
