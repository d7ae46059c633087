//! Tenant binding: mail from a shared platform's addresses (Microsoft 365, Google
//! Workspace) is relayed only when it proves it is this organization's.
//!
//! The platform's address proves the platform, never the tenant: every tenant sends
//! from the same ranges ("EchoSpoofing", 2024). So at the end of DATA and at BDAT LAST,
//! a message from a shared range needs one proof: a verifying DKIM signature of one of
//! the organization's domains, the Microsoft 365 tenant id, or a secret header added by
//! the organization's own routing rule. `headers` reads and removes header fields,
//! `sources` knows which addresses are shared, `dkim` asks mail-auth.

pub mod dkim;
pub mod headers;
pub mod sources;

use std::time::Duration;

use subtle::ConstantTimeEq;

use crate::config::SharedRange;
use crate::events::TenantProof;
use dkim::{DkimVerdict, DkimVerifier};

/// The header Exchange Online stamps with the sending tenant's GUID.
pub const TENANT_ID_HEADER: &str = "X-MS-Exchange-CrossTenant-Id";

/// What the check found, for the session's reply, the log and the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Proven(TenantProof),
    /// No proof; the text says why (for the log, never for the client).
    NotProven(String),
    /// A DKIM key could not be fetched (DNS failure) and nothing else proved the
    /// message: the client should try again rather than bounce.
    TryLater(String),
}

#[derive(Debug, Clone)]
pub struct Binding {
    pub verdict: Verdict,
    /// What proved it, for the log: `d=contoso.com`, `tenant id`, the header's name.
    pub detail: String,
    /// The message without the route header, when it carried one: the secret never
    /// reaches the spool, the smart host or a log.
    pub stripped: Option<Vec<u8>>,
}

/// Checks messages from the configured shared ranges.
pub struct TenantBinder {
    ranges: Vec<SharedRange>,
    /// The organization's domains: their DKIM signatures prove the tenant everywhere.
    domains: Vec<String>,
    dkim: DkimVerifier,
    dkim_timeout: Duration,
}

impl TenantBinder {
    pub fn new(
        ranges: Vec<SharedRange>,
        domains: Vec<String>,
        dkim: DkimVerifier,
        dkim_timeout: Duration,
    ) -> TenantBinder {
        TenantBinder {
            ranges,
            domains,
            dkim,
            dkim_timeout,
        }
    }

    pub fn range(&self, source: usize) -> Option<&SharedRange> {
        self.ranges.get(source)
    }

    /// The cheap proofs first (header secret, tenant id), then DKIM, which may need DNS.
    pub async fn bind(&self, source: usize, message: &[u8]) -> Binding {
        let Some(range) = self.ranges.get(source) else {
            return Binding {
                verdict: Verdict::NotProven("unknown shared range".into()),
                detail: String::new(),
                stripped: None,
            };
        };
        let parsed = headers::Headers::parse(message);
        let stripped = range.header.as_ref().and_then(|h| parsed.without(&h.name));
        if let Some(h) = &range.header {
            if route_secret_matches(&parsed, &h.name, &h.secret) {
                return Binding {
                    verdict: Verdict::Proven(TenantProof::Header),
                    detail: h.name.clone(),
                    stripped,
                };
            }
        }
        if let Some(tenant) = &range.tenant_id {
            if tenant_id_matches(&parsed, tenant) {
                return Binding {
                    verdict: Verdict::Proven(TenantProof::TenantId),
                    detail: format!("tenant {tenant}"),
                    stripped,
                };
            }
        }
        let accepted = |d: &str| {
            self.domains
                .iter()
                .chain(&range.dkim_domains)
                .any(|own| is_or_under(d, own))
        };
        let dkim = match tokio::time::timeout(self.dkim_timeout, self.dkim.verify(message)).await {
            Ok(v) => v,
            Err(_) => DkimVerdict::timed_out(),
        };
        let (verdict, detail) = match dkim.passing.iter().find(|d| accepted(d)) {
            Some(d) => (Verdict::Proven(TenantProof::Dkim), format!("d={d}")),
            None => {
                let mut why = Vec::new();
                if range.header.is_some() {
                    why.push("no route header with the right secret");
                }
                if range.tenant_id.is_some() {
                    why.push("no single matching tenant id");
                }
                let dkim_why = dkim.explain();
                let text = format!(
                    "{}{}{dkim_why}",
                    why.join(", "),
                    if why.is_empty() { "" } else { ", " }
                );
                if dkim.temporary && dkim.passing.is_empty() {
                    (Verdict::TryLater(text), String::new())
                } else {
                    (Verdict::NotProven(text), String::new())
                }
            }
        };
        Binding {
            verdict,
            detail,
            stripped,
        }
    }
}

/// `domain` is `own` or a subdomain of it (labels, not characters: `evilcontoso.com`
/// is not under `contoso.com`). Both are lower-case, without trailing dot.
fn is_or_under(domain: &str, own: &str) -> bool {
    domain == own
        || domain
            .strip_suffix(own)
            .is_some_and(|prefix| prefix.ends_with('.'))
}

/// Exactly one tenant id header, equal to ours (GUIDs compare case-insensitively). A
/// second copy may have been put there by the sender: it proves nothing.
pub fn tenant_id_matches(headers: &headers::Headers<'_>, tenant: &str) -> bool {
    match headers.values(TENANT_ID_HEADER).as_slice() {
        [one] => one.eq_ignore_ascii_case(tenant.as_bytes()),
        _ => false,
    }
}

/// One route header whose value equals the secret, compared in constant time so the
/// reply's timing says nothing about how much of a guess was right.
pub fn route_secret_matches(headers: &headers::Headers<'_>, name: &str, secret: &[u8]) -> bool {
    match headers.values(name).as_slice() {
        [one] => bool::from(one.as_slice().ct_eq(secret)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant_id_matches(m: &[u8], t: &str) -> bool {
        super::tenant_id_matches(&headers::Headers::parse(m), t)
    }

    fn route_secret_matches(m: &[u8], name: &str, secret: &[u8]) -> bool {
        super::route_secret_matches(&headers::Headers::parse(m), name, secret)
    }

    #[test]
    fn tenant_id_needs_exactly_one_matching_header() {
        let t = "3f2a9c1e-7b4d-4e8a-9c61-2d5e8f0a1b7c";
        let one = b"X-MS-Exchange-CrossTenant-Id: 3F2A9C1E-7B4D-4E8A-9C61-2D5E8F0A1B7C\r\n\r\nb";
        assert!(tenant_id_matches(one, t));
        let wrong = b"X-MS-Exchange-CrossTenant-Id: 00000000-7b4d-4e8a-9c61-2d5e8f0a1b7c\r\n\r\nb";
        assert!(!tenant_id_matches(wrong, t));
        let two = b"X-MS-Exchange-CrossTenant-Id: 3f2a9c1e-7b4d-4e8a-9c61-2d5e8f0a1b7c\r\nx-ms-exchange-crosstenant-id: 00000000-7b4d-4e8a-9c61-2d5e8f0a1b7c\r\n\r\nb";
        assert!(!tenant_id_matches(two, t));
        let same_twice = b"X-MS-Exchange-CrossTenant-Id: 3f2a9c1e-7b4d-4e8a-9c61-2d5e8f0a1b7c\r\nX-MS-Exchange-CrossTenant-Id: 3f2a9c1e-7b4d-4e8a-9c61-2d5e8f0a1b7c\r\n\r\nb";
        assert!(!tenant_id_matches(same_twice, t));
        assert!(!tenant_id_matches(b"Subject: x\r\n\r\nb", t));
    }

    #[test]
    fn subdomains_by_label() {
        assert!(is_or_under("contoso.com", "contoso.com"));
        assert!(is_or_under("mail.contoso.com", "contoso.com"));
        assert!(!is_or_under("evilcontoso.com", "contoso.com"));
        assert!(!is_or_under("contoso.com.evil.test", "contoso.com"));
    }

    #[test]
    fn route_secret_is_exact() {
        let m = b"X-Contoso-Route: s3cret\r\n\r\nb";
        assert!(route_secret_matches(m, "x-contoso-route", b"s3cret"));
        assert!(!route_secret_matches(m, "x-contoso-route", b"s3cre"));
        assert!(!route_secret_matches(m, "x-contoso-route", b"s3cret!"));
        assert!(!route_secret_matches(m, "x-other", b"s3cret"));
    }
}
