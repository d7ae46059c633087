//! The `[[limits]]` rules as the relay applies them: which key value a message counts
//! under, which senders a rule never counts, and which rate a measure is held to.

use std::net::IpAddr;
use std::time::Duration;

use serde::Serialize;

use crate::config::{LimitAction, LimitConfig};
use crate::envelope::LimitKey;
use crate::rate::Rate;

/// What a rate counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Measure {
    Messages,
    Recipients,
    /// Recipients the smart host refused with 5xx.
    Bounces,
}

impl Measure {
    pub const ALL: [Measure; 3] = [Measure::Messages, Measure::Recipients, Measure::Bounces];

    pub fn label(self) -> &'static str {
        match self {
            Measure::Messages => "messages",
            Measure::Recipients => "recipients",
            Measure::Bounces => "bounces",
        }
    }

    pub fn parse(text: &str) -> Option<Measure> {
        Measure::ALL.into_iter().find(|m| m.label() == text)
    }
}

/// Who a message is from, as far as the rules care.
#[derive(Debug, Clone, Copy)]
pub struct Who<'a> {
    /// Envelope sender; empty for `<>`.
    pub sender: &'a str,
    pub client: IpAddr,
    /// Our own DSNs and the onboarding Share mail: nobody's sending, so never counted
    /// under the sender keys.
    pub ours: bool,
}

#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub key: LimitKey,
    pub action: LimitAction,
    pub messages: Option<Rate>,
    pub recipients: Option<Rate>,
    pub bounces: Option<Rate>,
    /// Lower-case addresses or `*@domain`.
    exempt: Vec<String>,
}

impl Rule {
    pub fn new(c: &LimitConfig) -> Rule {
        Rule {
            name: c.name.clone(),
            key: c.key,
            action: c.action,
            messages: c.messages,
            recipients: c.recipients,
            bounces: c.bounces,
            exempt: c
                .exempt
                .iter()
                .map(|p| p.trim().to_ascii_lowercase())
                .collect(),
        }
    }

    pub fn rate(&self, m: Measure) -> Option<&Rate> {
        match m {
            Measure::Messages => self.messages.as_ref(),
            Measure::Recipients => self.recipients.as_ref(),
            Measure::Bounces => self.bounces.as_ref(),
        }
    }

    /// The longest period among its rates: what "recently" means when the rule fires.
    pub fn window(&self) -> Duration {
        Measure::ALL
            .iter()
            .filter_map(|m| self.rate(*m))
            .map(|r| r.period)
            .max()
            .unwrap_or_default()
    }

    /// The key value `who` counts under, or `None` when this rule does not count it.
    pub fn value(&self, who: &Who<'_>) -> Option<String> {
        let sender = who.sender.trim().to_ascii_lowercase();
        if !sender.is_empty() && self.exempted(&sender) {
            return None;
        }
        match self.key {
            LimitKey::Client => Some(key_ip(who.client)),
            _ if sender.is_empty() || who.ours => None,
            LimitKey::Sender => Some(sender),
            LimitKey::SenderDomain => Some(crate::envelope::domain_of(&sender).to_string()),
        }
    }

    fn exempted(&self, sender: &str) -> bool {
        let domain = crate::envelope::domain_of(sender);
        self.exempt.iter().any(|p| match p.strip_prefix("*@") {
            Some(d) => d == domain,
            None => p == sender,
        })
    }
}

/// A client address as a key value: an IPv4 address mapped into IPv6 is the IPv4 one.
fn key_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or_else(|| v6.to_string(), |v4| v4.to_string()),
        IpAddr::V4(v4) => v4.to_string(),
    }
}

/// Parses `key=value` as the CLI takes it (`sender=alice@contoso.test`).
pub fn parse_key_value(text: &str) -> Option<(LimitKey, String)> {
    let (key, value) = text.split_once('=')?;
    let key = LimitKey::parse(key.trim())?;
    let value = value.trim().to_ascii_lowercase();
    (!value.is_empty()).then_some((key, value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rate::Rate;

    fn rule(key: LimitKey, exempt: &[&str]) -> Rule {
        Rule::new(&LimitConfig {
            name: "r".into(),
            key,
            messages: Some(Rate::parse("5/1m").unwrap()),
            recipients: Some(Rate::parse("100/1h").unwrap()),
            bounces: None,
            action: LimitAction::Defer,
            exempt: exempt.iter().map(|s| s.to_string()).collect(),
        })
    }

    fn who(sender: &str) -> Who<'_> {
        Who {
            sender,
            client: "192.0.2.7".parse().unwrap(),
            ours: false,
        }
    }

    #[test]
    fn values_by_key() {
        assert_eq!(
            rule(LimitKey::Sender, &[])
                .value(&who("Alice@Contoso.test"))
                .as_deref(),
            Some("alice@contoso.test")
        );
        assert_eq!(
            rule(LimitKey::SenderDomain, &[])
                .value(&who("alice@Contoso.test"))
                .as_deref(),
            Some("contoso.test")
        );
        assert_eq!(
            rule(LimitKey::Client, &[]).value(&who("")).as_deref(),
            Some("192.0.2.7")
        );
        let mapped = Who {
            client: "::ffff:192.0.2.8".parse().unwrap(),
            ..who("a@b.test")
        };
        assert_eq!(
            rule(LimitKey::Client, &[]).value(&mapped).as_deref(),
            Some("192.0.2.8")
        );
        assert_eq!(
            rule(LimitKey::Client, &[]).window(),
            Duration::from_secs(3600)
        );
    }

    #[test]
    fn the_null_sender_and_our_own_mail_count_only_by_client() {
        for key in [LimitKey::Sender, LimitKey::SenderDomain] {
            assert_eq!(rule(key, &[]).value(&who("")), None);
            let ours = Who {
                ours: true,
                ..who("postmaster@contoso.test")
            };
            assert_eq!(rule(key, &[]).value(&ours), None);
        }
        let ours = Who {
            ours: true,
            ..who("postmaster@contoso.test")
        };
        assert!(rule(LimitKey::Client, &[]).value(&ours).is_some());
    }

    #[test]
    fn exempt_senders_are_never_counted() {
        let r = rule(
            LimitKey::Client,
            &["newsletter@contoso.test", "*@bulk.contoso.test"],
        );
        assert_eq!(r.value(&who("Newsletter@contoso.test")), None);
        assert_eq!(r.value(&who("x@bulk.contoso.test")), None);
        assert!(r.value(&who("x@contoso.test")).is_some());
        assert!(r.value(&who("x@sub.bulk.contoso.test")).is_some());
    }

    #[test]
    fn key_values_as_the_cli_writes_them() {
        assert_eq!(
            parse_key_value("sender=Alice@contoso.test"),
            Some((LimitKey::Sender, "alice@contoso.test".into()))
        );
        assert_eq!(
            parse_key_value("client=192.0.2.7"),
            Some((LimitKey::Client, "192.0.2.7".into()))
        );
        for bad in ["sender", "ip=1.2.3.4", "sender="] {
            assert_eq!(parse_key_value(bad), None, "{bad}");
        }
    }
}
