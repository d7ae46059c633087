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
pub mod keys;
pub mod replay;
pub mod sources;

use std::sync::Arc;
use std::time::Duration;

use subtle::ConstantTimeEq;

use crate::config::SharedRange;
use crate::envelope::{domain_of, Millis};
use crate::events::{TenantProof, Unbound};
use dkim::{DkimVerdict, DkimVerifier, Passed};
use replay::{ReplayGuard, Use};

/// The header Exchange Online stamps with the sending tenant's GUID.
pub const TENANT_ID_HEADER: &str = "X-MS-Exchange-CrossTenant-Id";

/// RFC 5322 §3.6: fields a message has at most one of. A second copy is how a sender
/// puts its own `From:` above a signed one.
pub const ONE_OF_EACH: &[&str] = &[
    "From",
    "Sender",
    "Reply-To",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
];

/// What the check found, for the session's reply, the log and the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Proven(TenantProof),
    /// No proof; the kind decides the reply, the text says why (for the log, never for
    /// the client).
    NotProven(Unbound, String),
    /// A DKIM key could not be fetched (DNS failure), or the signature memory could not
    /// be asked, and nothing else proved the message: the client should try again
    /// rather than bounce.
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
    /// DKIM signatures left unverified past the per-message bound.
    pub skipped: usize,
}

impl Binding {
    fn not(kind: Unbound, why: String, stripped: Option<Vec<u8>>) -> Binding {
        Binding {
            verdict: Verdict::NotProven(kind, why),
            detail: String::new(),
            stripped,
            skipped: 0,
        }
    }
}

/// Checks messages from the configured shared ranges.
pub struct TenantBinder {
    ranges: Vec<SharedRange>,
    /// The organization's domains: their DKIM signatures prove the tenant everywhere.
    domains: Vec<String>,
    dkim: DkimVerifier,
    dkim_timeout: Duration,
    /// The replay rules; `None` with `access.dkim_replay.enabled = false`.
    replay: Option<Arc<ReplayGuard>>,
}

impl TenantBinder {
    pub fn new(
        ranges: Vec<SharedRange>,
        domains: Vec<String>,
        dkim: DkimVerifier,
        dkim_timeout: Duration,
        replay: Option<Arc<ReplayGuard>>,
    ) -> TenantBinder {
        TenantBinder {
            ranges,
            domains,
            dkim,
            dkim_timeout,
            replay,
        }
    }

    pub fn range(&self, source: usize) -> Option<&SharedRange> {
        self.ranges.get(source)
    }

    /// The header rules first (one of each, another tenant's stamp), then the cheap
    /// proofs (header secret, tenant id), then DKIM, which may need DNS and the
    /// signature memory. `recipients` are the transaction's, `now` the time of the
    /// check.
    pub async fn bind(
        &self,
        source: usize,
        message: &[u8],
        recipients: &[String],
        now: Millis,
    ) -> Binding {
        let Some(range) = self.ranges.get(source) else {
            return Binding::not(Unbound::NoProof, "unknown shared range".into(), None);
        };
        let parsed = headers::Headers::parse(message);
        let stripped = range.header.as_ref().and_then(|h| parsed.without(&h.name));
        if let Some(name) = ONE_OF_EACH.iter().find(|n| parsed.values(n).len() > 1) {
            return Binding::not(
                Unbound::DuplicateHeader,
                format!("more than one {name}: header"),
                stripped,
            );
        }
        if let Some(tenant) = &range.tenant_id {
            if let Some(other) = parsed
                .values(TENANT_ID_HEADER)
                .iter()
                .find(|v| !v.eq_ignore_ascii_case(tenant.as_bytes()))
            {
                return Binding::not(
                    Unbound::OtherTenant,
                    format!(
                        "{TENANT_ID_HEADER}: {} is another tenant's",
                        String::from_utf8_lossy(other)
                    ),
                    stripped,
                );
            }
        }
        if let Some(h) = &range.header {
            if route_secret_matches(&parsed, &h.name, &h.secret) {
                return Binding {
                    verdict: Verdict::Proven(TenantProof::Header),
                    detail: h.name.clone(),
                    stripped,
                    skipped: 0,
                };
            }
        }
        if let Some(tenant) = &range.tenant_id {
            if tenant_id_matches(&parsed, tenant) {
                return Binding {
                    verdict: Verdict::Proven(TenantProof::TenantId),
                    detail: format!("tenant {tenant}"),
                    stripped,
                    skipped: 0,
                };
            }
        }
        let accepted = |d: &str| {
            self.domains
                .iter()
                .chain(&range.dkim_domains)
                .any(|own| is_or_under(d, own))
        };
        let dkim = match tokio::time::timeout(
            self.dkim_timeout,
            self.dkim.verify(message, accepted),
        )
        .await
        {
            Ok(v) => v,
            Err(_) => DkimVerdict::timed_out(),
        };
        let mut binding = self
            .judge_dkim(range, &dkim, recipients, now)
            .await
            .unwrap_or_else(|(kind, why)| {
                let mut why = why;
                if kind == Unbound::NoProof {
                    let mut parts = Vec::new();
                    if range.header.is_some() {
                        parts.push("no route header with the right secret".to_string());
                    }
                    if range.tenant_id.is_some() {
                        parts.push("no single matching tenant id".to_string());
                    }
                    parts.push(why);
                    why = parts.join(", ");
                }
                Binding::not(kind, why, None)
            });
        binding.stripped = stripped;
        binding.skipped = dkim.skipped;
        binding
    }

    /// The DKIM rules on what the verifier found: a signature of the organization's,
    /// aligned with `From:`, fresh, and not replayed.
    async fn judge_dkim(
        &self,
        range: &SharedRange,
        dkim: &DkimVerdict,
        recipients: &[String],
        now: Millis,
    ) -> Result<Binding, (Unbound, String)> {
        let roots = || self.domains.iter().chain(&range.dkim_domains);
        let ours: Vec<&Passed> = dkim
            .passing
            .iter()
            .filter(|s| roots().any(|own| is_or_under(&s.domain, own)))
            .collect();
        if ours.is_empty() {
            if dkim.temporary {
                return Ok(Binding {
                    verdict: Verdict::TryLater(dkim.explain()),
                    detail: String::new(),
                    stripped: None,
                    skipped: 0,
                });
            }
            return Err((Unbound::NoProof, dkim.explain()));
        }
        // Relaxed alignment (as DMARC): the From: domain is the organization's, and the
        // signature's d= is under the same configured domain.
        let from = single_domain(&dkim.from);
        let aligned: Vec<&Passed> = ours
            .iter()
            .copied()
            .filter(|s| {
                from.as_deref().is_some_and(|f| {
                    self.domains.iter().any(|own| is_or_under(f, own))
                        && roots().any(|root| is_or_under(f, root) && is_or_under(&s.domain, root))
                })
            })
            .collect();
        if aligned.is_empty() {
            return Err((
                Unbound::Unaligned,
                format!(
                    "DKIM signature of d={} does not match the From: address ({})",
                    ours[0].domain,
                    if dkim.from.is_empty() {
                        "none".to_string()
                    } else {
                        dkim.from.join(", ")
                    }
                ),
            ));
        }
        let Some(guard) = &self.replay else {
            return Ok(proven(aligned[0], "".into()));
        };
        let fresh: Vec<&Passed> = aligned
            .iter()
            .copied()
            .filter(|s| {
                replay::signed_at(s, dkim.date).is_none_or(|t| replay::fresh(t, now, guard.max_age))
            })
            .collect();
        if fresh.is_empty() {
            let s = aligned[0];
            let at = replay::signed_at(s, dkim.date).unwrap_or(0);
            return Err((
                Unbound::Stale,
                format!(
                    "DKIM signature of d={} made at {} is older than access.dkim_replay.max_age ({}) or too far ahead",
                    s.domain,
                    crate::envelope::rfc5322_date(at),
                    crate::config::Dur(guard.max_age)
                ),
            ));
        }
        let mut replayed = None;
        for s in fresh {
            match guard.check(s, recipients, now).await {
                Ok(u) if u.proves() => {
                    let how = match u {
                        Use::First => "first use",
                        Use::Within => "within its window",
                        _ => "a retry to the same recipients",
                    };
                    return Ok(proven(s, how.into()));
                }
                Ok(Use::Replayed { first_seen, node }) => {
                    replayed = Some((s, first_seen, node));
                }
                Ok(_) => {}
                Err(e) => {
                    return Ok(Binding {
                        verdict: Verdict::TryLater(format!(
                            "the DKIM signature memory cannot be asked: {e}"
                        )),
                        detail: String::new(),
                        stripped: None,
                        skipped: 0,
                    })
                }
            }
        }
        let (s, first_seen, node) = replayed.ok_or((
            Unbound::NoProof,
            "no DKIM signature could be checked".to_string(),
        ))?;
        Err((
            Unbound::Replayed,
            format!(
                "DKIM signature of d={} already used: first seen {} on {node}, now with new recipients",
                s.domain,
                crate::envelope::rfc5322_date(first_seen)
            ),
        ))
    }
}

fn proven(s: &Passed, how: String) -> Binding {
    let detail = if how.is_empty() {
        format!("d={}", s.domain)
    } else {
        format!("d={}, {how}", s.domain)
    };
    Binding {
        verdict: Verdict::Proven(TenantProof::Dkim),
        detail,
        stripped: None,
        skipped: 0,
    }
}

/// The one domain of the `From:` addresses (lower-case), when they share one.
fn single_domain(from: &[String]) -> Option<String> {
    let mut domains = from
        .iter()
        .map(|a| domain_of(a).trim_end_matches('.').to_ascii_lowercase());
    let first = domains.next()?;
    domains.all(|d| d == first).then_some(first)
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
