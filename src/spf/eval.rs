//! RFC 7208 `check_host()`: does this domain's policy authorize this client address for
//! this sender? The receiver's question, answered with the same parser and DNS layer as
//! the onboarding walker. Limits (§4.6.4) count across the whole evaluation, includes
//! and redirects included.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;

use ipnet::{Ipv4Net, Ipv6Net};
use serde::Serialize;

use super::dns::{DnsFailure, SpfDns};
use super::macros::{self, MacroContext};
use super::record::{self, is_spf_record, Mechanism, Qualifier, Record, Term};
use super::walk::{LOOKUP_LIMIT, MX_LIMIT, VOID_LIMIT};

/// The seven results of §2.6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SpfResult {
    Pass,
    Fail,
    SoftFail,
    Neutral,
    None,
    PermError,
    TempError,
}

impl SpfResult {
    pub fn as_str(self) -> &'static str {
        match self {
            SpfResult::Pass => "pass",
            SpfResult::Fail => "fail",
            SpfResult::SoftFail => "softfail",
            SpfResult::Neutral => "neutral",
            SpfResult::None => "none",
            SpfResult::PermError => "permerror",
            SpfResult::TempError => "temperror",
        }
    }

    fn of(q: Qualifier) -> SpfResult {
        match q {
            Qualifier::Pass => SpfResult::Pass,
            Qualifier::Fail => SpfResult::Fail,
            Qualifier::SoftFail => SpfResult::SoftFail,
            Qualifier::Neutral => SpfResult::Neutral,
        }
    }
}

impl std::fmt::Display for SpfResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `check_host()` is asked (§4.1).
#[derive(Debug, Clone)]
pub struct Query {
    pub ip: IpAddr,
    /// The MAIL FROM address; empty for the null sender.
    pub sender: String,
    /// The HELO/EHLO name: the identity checked for a null sender (§2.4), and `%{h}`.
    pub helo: String,
    /// `%{r}`: the checking host's name.
    pub receiver: String,
    /// `%{t}`, seconds since the epoch.
    pub timestamp: u64,
}

/// The answer, as `smartrelay spf eval --json` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Evaluation {
    pub result: SpfResult,
    /// The explanation of a `fail` (from `exp=`, or the default); empty otherwise.
    pub explanation: String,
    /// The term that decided the result, as published; `None` when nothing matched.
    pub mechanism: Option<String>,
    /// The domain whose policy was checked.
    pub domain: String,
    pub lookups: u32,
    pub void_lookups: u32,
}

/// The explanation when the domain publishes none, or its `exp` cannot be used (§6.2).
pub const DEFAULT_EXPLANATION: &str = "%{o} does not designate %{c} as a permitted sender";

/// Runs `check_host()` for `query`.
pub async fn check_host<D: SpfDns>(dns: &D, query: &Query) -> Evaluation {
    let ip = query.ip.to_canonical();
    let (local, domain) = identity(query);
    let mut e = Evaluator {
        dns,
        ip,
        sender: format!("{local}@{domain}"),
        local,
        sender_domain: domain.clone(),
        helo: query.helo.clone(),
        receiver: query.receiver.clone(),
        timestamp: query.timestamp,
        lookups: 0,
        voids: 0,
        validated: None,
    };
    let outcome = if valid_name(&domain) {
        e.check(domain.to_ascii_lowercase(), true).await
    } else {
        Outcome::plain(SpfResult::None)
    };
    Evaluation {
        result: outcome.result,
        explanation: outcome.explanation.unwrap_or_default(),
        mechanism: outcome.term,
        domain,
        lookups: e.lookups,
        void_lookups: e.voids,
    }
}

/// The identity checked: `(local part, domain)`. §4.3: a sender without a local part is
/// postmaster; the null sender is the HELO identity, as `postmaster@<helo>` (§2.4).
pub fn identity(query: &Query) -> (String, String) {
    let (local, domain) = match query.sender.rsplit_once('@') {
        _ if query.sender.is_empty() => ("postmaster", query.helo.as_str()),
        Some(("", d)) => ("postmaster", d),
        Some((l, d)) => (l, d),
        None => ("postmaster", query.sender.as_str()),
    };
    (local.to_string(), domain.trim_end_matches('.').to_string())
}

/// §4.3: a domain the check can start from: labels of 1 to 63 octets, at most 253 in
/// all, more than one label. Anything else is "none".
fn valid_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    name.len() <= 253
        && name.split('.').all(|l| !l.is_empty() && l.len() <= 63)
        && name
            .rsplit_once('.')
            .is_some_and(|(_, top)| macros::is_toplabel(top))
}

struct Outcome {
    result: SpfResult,
    term: Option<String>,
    explanation: Option<String>,
}

impl Outcome {
    fn plain(result: SpfResult) -> Outcome {
        Outcome {
            result,
            term: None,
            explanation: None,
        }
    }
}

/// How one mechanism came out.
enum Match {
    Yes,
    No,
    /// Evaluation stops with this result (temperror, permerror).
    Abort(SpfResult),
}

struct Evaluator<'d, D> {
    dns: &'d D,
    ip: IpAddr,
    sender: String,
    local: String,
    sender_domain: String,
    helo: String,
    receiver: String,
    timestamp: u64,
    lookups: u32,
    voids: u32,
    /// The client's validated names, looked up once for `%{p}`.
    validated: Option<Vec<String>>,
}

type Boxed<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

impl<'d, D: SpfDns> Evaluator<'d, D> {
    /// One `check_host()` level. `explain`: whether this level's `exp` may be used
    /// (not inside an include, §6.2).
    fn check(&mut self, domain: String, explain: bool) -> Boxed<'_, Outcome> {
        Box::pin(async move {
            let record = match self.record(&domain).await {
                Ok(r) => r,
                Err(result) => return Outcome::plain(result),
            };
            let parsed = record::parse(&record);
            if let Some(first) = parsed.errors.first() {
                return Outcome {
                    result: SpfResult::PermError,
                    term: Some(first.term.clone()),
                    explanation: None,
                };
            }
            for (p, qualifier, mechanism) in parsed.directives() {
                match self.mechanism(mechanism, &domain).await {
                    Match::No => continue,
                    Match::Abort(result) => {
                        return Outcome {
                            result,
                            term: Some(p.text.clone()),
                            explanation: None,
                        }
                    }
                    Match::Yes => {
                        let result = SpfResult::of(qualifier);
                        let explanation = if result == SpfResult::Fail && explain {
                            Some(self.explanation(&parsed, &domain).await)
                        } else {
                            None
                        };
                        return Outcome {
                            result,
                            term: Some(p.text.clone()),
                            explanation,
                        };
                    }
                }
            }
            // §6.1: redirect only applies when no `all` is in the record (which would
            // have matched by now).
            if let Some(spec) = parsed.redirect() {
                if parsed.all_position().is_none() {
                    return self.redirect(spec, &domain, explain).await;
                }
            }
            Outcome::plain(SpfResult::Neutral)
        })
    }

    /// §4.4, §4.5: the one SPF record of `domain`.
    async fn record(&mut self, domain: &str) -> Result<String, SpfResult> {
        let answer = match self.dns.txt(domain).await {
            Ok(a) => a,
            Err(e) if e.is_void() => return Err(SpfResult::None),
            Err(_) => return Err(SpfResult::TempError),
        };
        let mut spf = answer
            .records
            .iter()
            .map(|strings| String::from_utf8_lossy(&strings.concat()).into_owned())
            .filter(|t| is_spf_record(t));
        match (spf.next(), spf.next()) {
            (None, _) => Err(SpfResult::None),
            (Some(r), None) => Ok(r),
            (Some(_), Some(_)) => Err(SpfResult::PermError),
        }
    }

    async fn redirect(&mut self, spec: &str, domain: &str, explain: bool) -> Outcome {
        if let Err(r) = self.count_lookup() {
            return Outcome {
                result: r,
                term: Some(format!("redirect={spec}")),
                explanation: None,
            };
        }
        let Some(target) = self.target(spec, domain).await else {
            return Outcome {
                result: SpfResult::PermError,
                term: Some(format!("redirect={spec}")),
                explanation: None,
            };
        };
        let mut outcome = self.check(target, explain).await;
        if outcome.result == SpfResult::None {
            // §6.1: a redirect to a domain without a record is the publisher's error.
            outcome.result = SpfResult::PermError;
            outcome.term = Some(format!("redirect={spec}"));
        }
        outcome
    }

    async fn mechanism(&mut self, m: &Mechanism, domain: &str) -> Match {
        if m.queries_dns() {
            if let Err(r) = self.count_lookup() {
                return Match::Abort(r);
            }
        }
        match m {
            Mechanism::All => Match::Yes,
            Mechanism::Ip4 { addr, prefix } => {
                match (self.ip, Ipv4Net::new(*addr, prefix.unwrap_or(32))) {
                    (IpAddr::V4(ip), Ok(net)) if net.contains(&ip) => Match::Yes,
                    _ => Match::No,
                }
            }
            Mechanism::Ip6 { addr, prefix } => {
                match (self.ip, Ipv6Net::new(*addr, prefix.unwrap_or(128))) {
                    (IpAddr::V6(ip), Ok(net)) if net.contains(&ip) => Match::Yes,
                    _ => Match::No,
                }
            }
            Mechanism::Include(spec) => {
                let Some(target) = self.target(spec, domain).await else {
                    return Match::Abort(SpfResult::PermError);
                };
                // §5.2: only a pass matches; a missing or broken policy is the
                // including domain's permerror.
                match self.check(target, false).await.result {
                    SpfResult::Pass => Match::Yes,
                    SpfResult::Fail | SpfResult::SoftFail | SpfResult::Neutral => Match::No,
                    SpfResult::TempError => Match::Abort(SpfResult::TempError),
                    SpfResult::PermError | SpfResult::None => Match::Abort(SpfResult::PermError),
                }
            }
            Mechanism::A {
                domain: spec,
                cidr4,
                cidr6,
            } => {
                let Some(target) = self.optional_target(spec.as_deref(), domain).await else {
                    return Match::No;
                };
                // §5.3: the client's address family only.
                match self.addresses_match(&target, *cidr4, *cidr6).await {
                    Ok(true) => Match::Yes,
                    Ok(false) => Match::No,
                    Err(e) => self.failed(e),
                }
            }
            Mechanism::Mx {
                domain: spec,
                cidr4,
                cidr6,
            } => {
                let Some(target) = self.optional_target(spec.as_deref(), domain).await else {
                    return Match::No;
                };
                let names = match self.dns.mx(&target).await {
                    Ok(n) => n,
                    Err(e) => return self.failed(e),
                };
                if names.len() > MX_LIMIT {
                    return Match::Abort(SpfResult::PermError);
                }
                for name in names.iter().filter(|n| !n.is_empty()) {
                    match self.addresses_match(name, *cidr4, *cidr6).await {
                        Ok(true) => return Match::Yes,
                        Ok(false) => {}
                        // An exchange without addresses is not a void lookup of the
                        // term: the MX question itself had an answer.
                        Err(e) if e.is_void() => {}
                        Err(_) => return Match::Abort(SpfResult::TempError),
                    }
                }
                Match::No
            }
            Mechanism::Ptr(spec) => {
                let Some(target) = self.optional_target(spec.as_deref(), domain).await else {
                    return Match::No;
                };
                let names = self.validated_names().await;
                let target = target.to_ascii_lowercase();
                if names.iter().any(|n| is_within(n, &target)) {
                    Match::Yes
                } else {
                    Match::No
                }
            }
            Mechanism::Exists(spec) => {
                let Some(target) = self.target(spec, domain).await else {
                    return Match::No;
                };
                // §5.7: always an A query, whatever the client's address family.
                match self.dns.a(&target).await {
                    Ok(a) if !a.is_empty() => Match::Yes,
                    Ok(_) => self.failed(DnsFailure::NoData),
                    Err(e) => self.failed(e),
                }
            }
        }
    }

    /// A failed lookup of a term: void lookups count (and may exceed the limit), other
    /// failures are temperror.
    fn failed(&mut self, e: DnsFailure) -> Match {
        if !e.is_void() {
            return Match::Abort(SpfResult::TempError);
        }
        self.voids += 1;
        if self.voids > VOID_LIMIT {
            Match::Abort(SpfResult::PermError)
        } else {
            Match::No
        }
    }

    fn count_lookup(&mut self) -> Result<(), SpfResult> {
        self.lookups += 1;
        if self.lookups > LOOKUP_LIMIT {
            Err(SpfResult::PermError)
        } else {
            Ok(())
        }
    }

    async fn addresses_match(
        &self,
        name: &str,
        cidr4: Option<u8>,
        cidr6: Option<u8>,
    ) -> Result<bool, DnsFailure> {
        match self.ip {
            IpAddr::V4(ip) => {
                let addrs = self.dns.a(name).await?;
                Ok(addrs
                    .iter()
                    .any(|a| Ipv4Net::new(*a, cidr4.unwrap_or(32)).is_ok_and(|n| n.contains(&ip))))
            }
            IpAddr::V6(ip) => {
                let addrs = self.dns.aaaa(name).await?;
                Ok(addrs
                    .iter()
                    .any(|a| Ipv6Net::new(*a, cidr6.unwrap_or(128)).is_ok_and(|n| n.contains(&ip))))
            }
        }
    }

    /// §5.5: the client's PTR names (at most 10) whose forward lookup gives the client's
    /// address back. Errors mean no names, never a temperror.
    async fn validated_names(&mut self) -> Vec<String> {
        if let Some(v) = &self.validated {
            return v.clone();
        }
        let mut out = Vec::new();
        if let Ok(names) = self.dns.ptr(self.ip).await {
            for name in names.iter().take(MX_LIMIT) {
                if let Ok(true) = self.addresses_match(name, None, None).await {
                    out.push(name.to_ascii_lowercase());
                }
            }
        }
        self.validated = Some(out.clone());
        out
    }

    /// `%{p}` for `domain` (§7.3): the domain itself if validated, else a validated
    /// subdomain of it, else any validated name, else "unknown".
    async fn validated_for(&mut self, domain: &str) -> String {
        let names = self.validated_names().await;
        let domain = domain.to_ascii_lowercase();
        names
            .iter()
            .find(|n| **n == domain)
            .or_else(|| names.iter().find(|n| is_within(n, &domain)))
            .or_else(|| names.first())
            .cloned()
            .unwrap_or_else(|| "unknown".into())
    }

    async fn context_values(&mut self, spec: &str, domain: &str) -> String {
        if macros::uses_validated_name(spec) {
            self.validated_for(domain).await
        } else {
            "unknown".into()
        }
    }

    fn context<'a>(&'a self, domain: &'a str, validated: &'a str) -> MacroContext<'a> {
        MacroContext {
            sender: &self.sender,
            local: &self.local,
            sender_domain: &self.sender_domain,
            domain,
            ip: self.ip,
            helo: &self.helo,
            validated,
            receiver: &self.receiver,
            timestamp: self.timestamp,
        }
    }

    /// A domain-spec expanded to the name to query (§4.8, §7.3), or `None` when the
    /// result is not a usable name.
    async fn target(&mut self, spec: &str, domain: &str) -> Option<String> {
        let validated = self.context_values(spec, domain).await;
        let expanded = macros::expand(spec, &self.context(domain, &validated), false).ok()?;
        let name = macros::truncate_name(expanded.trim_end_matches('.'));
        let usable = !name.is_empty() && name.split('.').all(|l| !l.is_empty() && l.len() <= 63);
        usable.then(|| name.to_ascii_lowercase())
    }

    async fn optional_target(&mut self, spec: Option<&str>, domain: &str) -> Option<String> {
        match spec {
            Some(s) => self.target(s, domain).await,
            None => Some(domain.to_string()),
        }
    }

    /// §6.2: the `exp` text of this record, expanded, or the default explanation when
    /// there is none or it cannot be used. The lookup does not count towards the limits.
    async fn explanation(&mut self, parsed: &Record, domain: &str) -> String {
        let published = match parsed.terms.iter().find_map(|p| match &p.term {
            Term::Exp(spec) => Some(spec.clone()),
            _ => None,
        }) {
            Some(spec) => self.published_explanation(&spec, domain).await,
            None => None,
        };
        match published {
            Some(text) => text,
            None => {
                let ctx = self.context(domain, "unknown");
                macros::expand(DEFAULT_EXPLANATION, &ctx, true)
                    .unwrap_or_else(|_| DEFAULT_EXPLANATION.to_string())
            }
        }
    }

    async fn published_explanation(&mut self, spec: &str, domain: &str) -> Option<String> {
        let target = self.target(spec, domain).await?;
        let answer = self.dns.txt(&target).await.ok()?;
        let [strings] = answer.records.as_slice() else {
            return None;
        };
        let text = String::from_utf8(strings.concat()).ok()?;
        macros::check_macro_string(&text, true).ok()?;
        let validated = self.context_values(&text, domain).await;
        macros::expand(&text, &self.context(domain, &validated), true).ok()
    }
}

/// `name` is `domain` or a subdomain of it.
fn is_within(name: &str, domain: &str) -> bool {
    name == domain
        || name
            .strip_suffix(domain)
            .is_some_and(|head| head.ends_with('.'))
}
