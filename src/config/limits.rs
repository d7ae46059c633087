//! `[[limits]]`: how much one sender, sender domain or client may send. Without the
//! key, two rules that a normal user never meets apply; `limits = []` turns limits off.

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::envelope::LimitKey;
use crate::rate::Rate;

/// What happens past a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitAction {
    /// `451 4.7.1` at the MAIL or RCPT that would go over.
    Defer,
    /// Accept, keep, deliver nothing; the key value is restricted until an
    /// administrator releases or discards its mail.
    Hold,
}

impl LimitAction {
    pub fn label(self) -> &'static str {
        match self {
            LimitAction::Defer => "defer",
            LimitAction::Hold => "hold",
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    pub name: String,
    pub key: LimitKey,
    pub messages: Option<Rate>,
    pub recipients: Option<Rate>,
    /// Recipients the smart host refused with 5xx.
    pub bounces: Option<Rate>,
    pub action: LimitAction,
    /// Sender addresses (or `*@domain`) this rule never counts.
    #[serde(default)]
    pub exempt: Vec<String>,
}

/// The rules in force when the file has no `limits` key.
pub fn default_limits() -> Vec<LimitConfig> {
    let rate = |count, secs| Rate {
        count,
        period: Duration::from_secs(secs),
    };
    vec![
        LimitConfig {
            name: "sender-daily".into(),
            key: LimitKey::Sender,
            messages: None,
            recipients: Some(rate(10_000, 86_400)),
            bounces: None,
            action: LimitAction::Hold,
            exempt: Vec::new(),
        },
        LimitConfig {
            name: "sender-bounces".into(),
            key: LimitKey::Sender,
            messages: None,
            recipients: None,
            bounces: Some(rate(100, 3600)),
            action: LimitAction::Hold,
            exempt: Vec::new(),
        },
    ]
}

pub(super) fn resolve_limits(
    raw: Option<Vec<LimitConfig>>,
) -> Result<Vec<LimitConfig>, (String, String)> {
    let Some(rules) = raw else {
        return Ok(default_limits());
    };
    let mut names: Vec<&str> = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        let key = |k: &str| format!("limits[{i}].{k}");
        let valid_name = !r.name.is_empty()
            && r.name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid_name {
            return Err((key("name"), format!("`{}`: use [a-z0-9-]+", r.name)));
        }
        if names.contains(&r.name.as_str()) {
            return Err((key("name"), format!("`{}` is used by another rule", r.name)));
        }
        names.push(&r.name);
        if r.messages.is_none() && r.recipients.is_none() && r.bounces.is_none() {
            return Err((
                format!("limits[{i}]"),
                "needs at least one of messages, recipients, bounces".into(),
            ));
        }
        if r.bounces.is_some() && r.action != LimitAction::Hold {
            return Err((
                key("action"),
                "bounces are known only after delivery, so a bounces rule needs action = \"hold\""
                    .into(),
            ));
        }
        for p in &r.exempt {
            let (local, domain) = p.rsplit_once('@').unwrap_or(("", ""));
            if local.is_empty() || domain.is_empty() {
                return Err((
                    key("exempt"),
                    format!("`{p}` is neither an address nor `*@domain`"),
                ));
            }
        }
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<LimitConfig>, (String, String)> {
        #[derive(Deserialize)]
        struct Doc {
            limits: Option<Vec<LimitConfig>>,
        }
        let doc: Doc = toml::from_str(text).map_err(|e| ("toml".to_string(), e.to_string()))?;
        resolve_limits(doc.limits)
    }

    #[test]
    fn defaults_unless_set_and_off_when_empty() {
        assert_eq!(parse("").unwrap(), default_limits());
        assert_eq!(parse("limits = []").unwrap(), Vec::new());
        let rules = parse(
            "[[limits]]\nname = \"burst\"\nkey = \"sender_domain\"\nmessages = \"5/2s\"\naction = \"defer\"\nexempt = [\"*@bulk.example.test\"]\n",
        )
        .unwrap();
        assert_eq!(rules[0].key, LimitKey::SenderDomain);
        assert_eq!(rules[0].messages.unwrap().count, 5);
    }

    #[test]
    fn mistakes_name_their_key() {
        let rule = |body: &str| format!("[[limits]]\nname = \"r\"\nkey = \"sender\"\n{body}\n");
        for (body, key) in [
            ("action = \"defer\"", "limits[0]"),
            ("bounces = \"1/1h\"\naction = \"defer\"", "limits[0].action"),
            (
                "messages = \"1/1h\"\naction = \"hold\"\nexempt = [\"bulk\"]",
                "limits[0].exempt",
            ),
        ] {
            assert_eq!(parse(&rule(body)).unwrap_err().0, key, "{body}");
        }
        let dup =
            "[[limits]]\nname = \"a\"\nkey = \"client\"\nmessages = \"1/1m\"\naction = \"defer\"\n"
                .repeat(2);
        assert_eq!(parse(&dup).unwrap_err().0, "limits[1].name");
        let bad = "[[limits]]\nname = \"A b\"\nkey = \"client\"\nmessages = \"1/1m\"\naction = \"defer\"\n";
        assert_eq!(parse(bad).unwrap_err().0, "limits[0].name");
        assert!(parse(
            "[[limits]]\nname = \"a\"\nkey = \"ip\"\nmessages = \"1/1m\"\naction = \"defer\"\n"
        )
        .is_err());
    }
}
