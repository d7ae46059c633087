//! Which deliveries teach the trusted-sender list: a recipient the upstream accepted, of
//! a message an internal user wrote, outside the organization and the exclusions.

use crate::envelope::{domain_in, Millis};
use crate::events::{DeliveryReport, Outcome};

#[derive(Debug, Clone)]
pub struct TrustPolicy {
    pub internal_domains: Vec<String>,
    /// Lower-case addresses, or `*@domain`.
    pub exclude_senders: Vec<String>,
    pub exclude_recipient_domains: Vec<String>,
}

/// One (internal sender, external recipient) observation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub sender: String,
    pub recipient: String,
    pub domain: String,
    pub at: Millis,
}

impl TrustPolicy {
    pub fn new(
        internal: &[String],
        exclude_senders: &[String],
        exclude_domains: &[String],
    ) -> TrustPolicy {
        TrustPolicy {
            internal_domains: internal.to_vec(),
            exclude_senders: exclude_senders
                .iter()
                .filter_map(|s| {
                    normalize(s).or_else(|| s.starts_with("*@").then(|| s.to_ascii_lowercase()))
                })
                .collect(),
            exclude_recipient_domains: exclude_domains
                .iter()
                .filter_map(|d| normalize_domain(d))
                .collect(),
        }
    }

    pub fn observations(&self, r: &DeliveryReport) -> Vec<Observation> {
        // Bounces (null sender), our own DSNs and mail, and automatic replies never make
        // anyone trusted: nobody wrote to that address.
        if r.sender.is_empty()
            || r.generated_dsn
            || r.system
            || r.flags.auto_reply
            || r.flags.report
        {
            return Vec::new();
        }
        let Some(sender) = normalize(&r.sender) else {
            return Vec::new();
        };
        if self.sender_excluded(&sender) {
            return Vec::new();
        }
        r.results
            .iter()
            .filter(|res| res.outcome == Outcome::Delivered)
            .filter_map(|res| normalize(&res.address))
            .filter_map(|recipient| {
                let domain = crate::envelope::domain_of(&recipient).to_string();
                let skip = domain_in(&domain, &self.internal_domains)
                    || self
                        .exclude_recipient_domains
                        .iter()
                        .any(|d| domain == *d || domain.ends_with(&format!(".{d}")));
                (!skip).then(|| Observation {
                    sender: sender.clone(),
                    recipient,
                    domain,
                    at: r.at,
                })
            })
            .collect()
    }

    fn sender_excluded(&self, sender: &str) -> bool {
        let domain = crate::envelope::domain_of(sender);
        self.exclude_senders
            .iter()
            .any(|p| match p.strip_prefix("*@") {
                Some(d) => d.eq_ignore_ascii_case(domain),
                None => p == sender,
            })
    }
}

/// The domain lower-cased and in its ASCII (IDNA) form; the local part as written.
pub fn normalize(address: &str) -> Option<String> {
    let (local, domain) = address.trim().rsplit_once('@')?;
    if local.is_empty() {
        return None;
    }
    Some(format!("{local}@{}", normalize_domain(domain)?))
}

pub fn normalize_domain(domain: &str) -> Option<String> {
    let d = domain.trim().trim_end_matches('.');
    if d.is_empty() {
        return None;
    }
    idna::domain_to_ascii(d).ok().filter(|a| !a.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{ContentFlags, QueueId, Reply};
    use crate::events::RcptResult;

    fn report(sender: &str, results: &[(&str, Outcome)]) -> DeliveryReport {
        DeliveryReport {
            id: QueueId::generate(),
            client: std::net::IpAddr::from([127, 0, 0, 1]),
            tls: false,
            duration_ms: 0,
            expired: false,
            sender: sender.into(),
            flags: ContentFlags::default(),
            generated_dsn: false,
            system: false,
            route: Some("eu".into()),
            host: Some("h:25".into()),
            at: 1000,
            results: results
                .iter()
                .map(|(a, o)| RcptResult {
                    address: a.to_string(),
                    outcome: *o,
                    reply: Reply::new(250, "", "ok"),
                })
                .collect(),
        }
    }

    fn policy() -> TrustPolicy {
        TrustPolicy::new(
            &["example.test".into()],
            &["noreply@example.test".into(), "*@bulk.example.test".into()],
            &["freemail.test".into()],
        )
    }

    #[test]
    fn only_accepted_external_recipients() {
        let r = report(
            "Alice@Example.TEST",
            &[
                ("Bob@Partner.TEST", Outcome::Delivered),
                ("carol@partner.test", Outcome::Bounced),
                ("dave@partner.test", Outcome::Deferred),
                ("colleague@example.test", Outcome::Delivered),
                ("x@freemail.test", Outcome::Delivered),
                ("y@mx.freemail.test", Outcome::Delivered),
                ("zoë@bücher.test", Outcome::Delivered),
            ],
        );
        let obs = policy().observations(&r);
        let rcpts: Vec<&str> = obs.iter().map(|o| o.recipient.as_str()).collect();
        assert_eq!(rcpts, ["Bob@partner.test", "zoë@xn--bcher-kva.test"]);
        assert_eq!(obs[0].sender, "Alice@example.test");
    }

    #[test]
    fn automatic_and_excluded_traffic_teaches_nothing() {
        let p = policy();
        assert!(p
            .observations(&report("", &[("b@p.test", Outcome::Delivered)]))
            .is_empty());
        assert!(p
            .observations(&report(
                "noreply@example.test",
                &[("b@p.test", Outcome::Delivered)]
            ))
            .is_empty());
        assert!(p
            .observations(&report(
                "x@BULK.example.test",
                &[("b@p.test", Outcome::Delivered)]
            ))
            .is_empty());
        let mut auto = report("a@example.test", &[("b@p.test", Outcome::Delivered)]);
        auto.flags.auto_reply = true;
        assert!(p.observations(&auto).is_empty());
        let mut dsn = report("a@example.test", &[("b@p.test", Outcome::Delivered)]);
        dsn.flags.report = true;
        assert!(p.observations(&dsn).is_empty());
    }
}
