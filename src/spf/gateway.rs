//! Will receivers pass mail the gateway relays for a domain? For each address range the
//! gateway publishes for its region (the `ip4`/`ip6` of `<region>._netblocks.mimecast.com`
//! and its includes), one address of the range is evaluated against the domain's record
//! with `check_host()`, as a receiver would. Pure: the evaluations come in.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use super::eval::{Evaluation, SpfResult};
use super::{Finding, Severity};

/// The receivers' verdict on gateway-relayed mail, over all published ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Every range passes.
    All,
    Some,
    None,
    /// The gateway's ranges could not be read, so nothing was evaluated.
    Unknown,
}

/// One range's evaluation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RangeCheck {
    pub range: IpNet,
    /// The address evaluated.
    pub address: IpAddr,
    pub result: SpfResult,
    /// The term that decided it; `None` when nothing matched.
    pub mechanism: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GatewayPass {
    pub verdict: Verdict,
    pub ranges: Vec<RangeCheck>,
}

/// Ranges evaluated per domain: the regions publish a handful; more means a record that
/// is not the gateway's, and each costs DNS.
pub const MAX_RANGES: usize = 64;

/// The address of a range a receiver sees: its first host (the network address itself
/// for a single-address range).
pub fn probe_address(range: &IpNet) -> IpAddr {
    range.hosts().next().unwrap_or_else(|| range.network())
}

pub fn summarize(checks: Vec<(IpNet, IpAddr, Evaluation)>) -> GatewayPass {
    let ranges: Vec<RangeCheck> = checks
        .into_iter()
        .map(|(range, address, e)| RangeCheck {
            range,
            address,
            result: e.result,
            mechanism: e.mechanism,
        })
        .collect();
    let passing = ranges
        .iter()
        .filter(|r| r.result == SpfResult::Pass)
        .count();
    let verdict = match passing {
        _ if ranges.is_empty() => Verdict::Unknown,
        n if n == ranges.len() => Verdict::All,
        0 => Verdict::None,
        _ => Verdict::Some,
    };
    GatewayPass { verdict, ranges }
}

/// What to tell the operator: an error for each range that does not pass, naming the
/// term that breaks it; a warning when the ranges could not be read.
pub fn findings(pass: &GatewayPass, domain: &str, include: &str) -> Vec<Finding> {
    if pass.verdict == Verdict::Unknown {
        return vec![Finding {
            severity: Severity::Warning,
            code: "gateway_ranges_unknown",
            message: format!(
                "the address ranges of include:{include} could not be read, so whether receivers pass gateway-relayed mail was not checked"
            ),
            term: None,
            domain: domain.to_string(),
        }];
    }
    pass.ranges
        .iter()
        .filter(|r| r.result != SpfResult::Pass)
        .map(|r| {
            let why = match &r.mechanism {
                Some(term) => format!(" (decided by `{term}`)"),
                None => " (no term matched)".to_string(),
            };
            Finding {
                severity: Severity::Error,
                code: "gateway_not_passing",
                message: format!(
                    "mail the gateway relays from {} ({}) gets `{}` at receivers{why}",
                    r.address, r.range, r.result
                ),
                term: r.mechanism.clone(),
                domain: domain.to_string(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(result: SpfResult, term: Option<&str>) -> Evaluation {
        Evaluation {
            result,
            explanation: String::new(),
            mechanism: term.map(str::to_string),
            domain: "example.com".into(),
            lookups: 1,
            void_lookups: 0,
        }
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn probe_is_inside_the_range() {
        for r in [
            "198.51.100.0/24",
            "203.0.113.7/32",
            "2001:db8::/32",
            "192.0.2.0/31",
        ] {
            let n = net(r);
            assert!(n.contains(&probe_address(&n)), "{r}");
        }
    }

    #[test]
    fn verdicts_and_findings() {
        let a = net("198.51.100.0/24");
        let b = net("203.0.113.0/24");
        let ip = |n: &IpNet| probe_address(n);
        let all = summarize(vec![
            (a, ip(&a), eval(SpfResult::Pass, Some("include:x"))),
            (b, ip(&b), eval(SpfResult::Pass, Some("include:x"))),
        ]);
        assert_eq!(all.verdict, Verdict::All);
        assert!(findings(&all, "example.com", "x").is_empty());

        let some = summarize(vec![
            (a, ip(&a), eval(SpfResult::Pass, Some("include:x"))),
            (
                b,
                ip(&b),
                eval(SpfResult::Fail, Some("-ip4:203.0.113.0/24")),
            ),
        ]);
        assert_eq!(some.verdict, Verdict::Some);
        let f = findings(&some, "example.com", "x");
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].code, "gateway_not_passing");
        assert_eq!(f[0].term.as_deref(), Some("-ip4:203.0.113.0/24"));
        assert!(f[0].message.contains("203.0.113.1"), "{}", f[0].message);

        let none = summarize(vec![(a, ip(&a), eval(SpfResult::Neutral, None))]);
        assert_eq!(none.verdict, Verdict::None);
        assert!(findings(&none, "example.com", "x")[0]
            .message
            .contains("no term matched"));

        let unknown = summarize(Vec::new());
        assert_eq!(unknown.verdict, Verdict::Unknown);
        assert_eq!(
            findings(&unknown, "example.com", "x")[0].severity,
            Severity::Warning
        );
    }
}
