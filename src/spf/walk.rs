//! Evaluates a domain's SPF policy over DNS the way a receiver would, without a client
//! address: selects the record, follows `include` and `redirect`, counts DNS-querying
//! terms across the whole tree (limit 10), void lookups (limit 2) and MX names (limit 10
//! per term), detects loops, and applies the include result mapping. It reports what it
//! found as findings and a tree of the includes.

use std::future::Future;
use std::pin::Pin;

use serde::Serialize;

use super::dns::{DnsFailure, SpfDns};
use super::record::{self, is_spf_record, Mechanism, Qualifier, Record, Term};
use super::{Finding, Severity};
use crate::regions::{classify_include, GatewayInclude};

pub const LOOKUP_LIMIT: u32 = 10;
pub const VOID_LIMIT: u32 = 2;
pub const MX_LIMIT: usize = 10;
/// Past this many lookups the walker stops following includes (it has already failed).
const HARD_STOP: u32 = 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SpfStatus {
    /// A record was found and evaluates within the rules.
    Ok,
    /// No SPF record (or the domain does not exist).
    None,
    PermError,
    TempError,
}

/// How a record was reached from the one above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// The domain's own record.
    Root,
    Include,
    Redirect,
}

impl Via {
    pub fn label(self) -> &'static str {
        match self {
            Via::Root => "root",
            Via::Include => "include",
            Via::Redirect => "redirect",
        }
    }

    /// The finding code for a target without a record.
    fn no_record(self) -> &'static str {
        match self {
            Via::Redirect => "redirect_no_record",
            Via::Root | Via::Include => "include_no_record",
        }
    }
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// One record in the include tree.
#[derive(Debug, Clone, Serialize)]
pub struct Node {
    pub domain: String,
    pub via: Via,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record: Option<String>,
    /// DNS-querying terms of this record itself.
    pub lookups: u32,
    /// The same, with everything below it.
    pub total_lookups: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<Node>,
}

impl Node {
    fn new(domain: &str, via: Via) -> Node {
        Node {
            domain: domain.to_string(),
            via,
            record: None,
            lookups: 0,
            total_lookups: 0,
            error: None,
            children: Vec::new(),
        }
    }
}

/// A gateway include met during the walk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GatewayHit {
    #[serde(skip)]
    pub include: GatewayInclude,
    pub name: String,
    /// 0 when it is in the domain's own record.
    pub depth: u32,
    /// Evaluated with a `+` qualifier, before any `all`: it authorizes the hosts.
    pub effective: bool,
    /// Lookups the include costs (itself and everything below it).
    pub lookups: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Walk {
    pub domain: String,
    pub status: SpfStatus,
    /// The SPF records published at the domain itself.
    pub records: Vec<String>,
    #[serde(skip)]
    pub root: Option<Record>,
    pub tree: Node,
    pub lookups: u32,
    pub void_lookups: u32,
    pub findings: Vec<Finding>,
    /// Smallest TTL seen, for caching.
    pub ttl: u32,
    pub gateway: Vec<GatewayHit>,
}

impl Walk {
    /// The include that routes this domain: the first effective gateway include, and only
    /// when the policy as a whole evaluates (a permerror authorizes nobody).
    pub fn authorized(&self) -> Option<GatewayInclude> {
        if self.status != SpfStatus::Ok {
            return None;
        }
        self.gateway.iter().find(|g| g.effective).map(|g| g.include)
    }
}

struct Walker<'d, D> {
    dns: &'d D,
    lookups: u32,
    voids: u32,
    stack: Vec<String>,
    findings: Vec<Finding>,
    perm: bool,
    temp: bool,
    ttl: u32,
    gateway: Vec<GatewayHit>,
}

pub async fn walk<D: SpfDns>(dns: &D, domain: &str) -> Walk {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let mut w = Walker {
        dns,
        lookups: 0,
        voids: 0,
        stack: Vec::new(),
        findings: Vec::new(),
        perm: false,
        temp: false,
        ttl: u32::MAX,
        gateway: Vec::new(),
    };
    let mut records = Vec::new();
    let mut root = None;
    let tree = w
        .walk_domain(&domain, Via::Root, 0, true, Some((&mut records, &mut root)))
        .await;
    let status = if w.temp {
        SpfStatus::TempError
    } else if w.perm {
        SpfStatus::PermError
    } else if records.is_empty() {
        SpfStatus::None
    } else {
        SpfStatus::Ok
    };
    Walk {
        domain,
        status,
        records,
        root,
        tree,
        lookups: w.lookups,
        void_lookups: w.voids,
        findings: w.findings,
        ttl: if w.ttl == u32::MAX { 300 } else { w.ttl },
        gateway: w.gateway,
    }
}

type RootOut<'o> = Option<(&'o mut Vec<String>, &'o mut Option<Record>)>;

impl<D: SpfDns> Walker<'_, D> {
    fn find(
        &mut self,
        severity: Severity,
        code: &'static str,
        message: String,
        term: Option<&str>,
        domain: &str,
    ) {
        if severity == Severity::Error {
            self.perm = true;
        }
        self.record_finding(severity, code, message, term, domain);
    }

    /// The domain asked about has no SPF policy at all: an error for onboarding, but
    /// check_host's result is "none", not permerror (RFC 7208 §4.5).
    fn no_policy(&mut self, code: &'static str, message: String, domain: &str) {
        self.record_finding(Severity::Error, code, message, None, domain);
    }

    fn record_finding(
        &mut self,
        severity: Severity,
        code: &'static str,
        message: String,
        term: Option<&str>,
        domain: &str,
    ) {
        self.findings.push(Finding {
            severity,
            code,
            message,
            term: term.map(str::to_string),
            domain: domain.to_string(),
        });
    }

    fn temp_error(&mut self, what: &str, domain: &str, term: Option<&str>, failure: &DnsFailure) {
        self.temp = true;
        let (code, why) = match failure {
            DnsFailure::Timeout => ("dns_timeout", "timed out".to_string()),
            DnsFailure::Other(e) => ("dns_error", e.clone()),
            other => ("dns_error", format!("{other:?}")),
        };
        self.findings.push(Finding {
            severity: Severity::Error,
            code,
            message: format!("DNS {what} lookup for {domain} failed ({why}): temperror"),
            term: term.map(str::to_string),
            domain: domain.to_string(),
        });
    }

    /// Counts one DNS-querying term; false once the walk should stop following.
    fn count(&mut self, term: &str, domain: &str) -> bool {
        self.lookups += 1;
        if self.lookups == LOOKUP_LIMIT + 1 {
            self.find(
                Severity::Error,
                "lookup_limit",
                format!("more than {LOOKUP_LIMIT} DNS-querying terms (RFC 7208 §4.6.4): permerror"),
                Some(term),
                domain,
            );
        }
        self.lookups < HARD_STOP
    }

    fn void(&mut self, term: &str, domain: &str, target: &str) {
        self.voids += 1;
        self.find(
            Severity::Info,
            "void_lookup",
            format!("{target} has no records (void lookup {})", self.voids),
            Some(term),
            domain,
        );
        if self.voids == VOID_LIMIT + 1 {
            self.find(
                Severity::Error,
                "void_limit",
                format!("more than {VOID_LIMIT} void lookups (RFC 7208 §4.6.4): permerror"),
                Some(term),
                domain,
            );
        }
    }

    fn walk_domain<'a>(
        &'a mut self,
        domain: &'a str,
        via: Via,
        depth: u32,
        root: bool,
        root_out: RootOut<'a>,
    ) -> Pin<Box<dyn Future<Output = Node> + Send + 'a>>
    where
        D: SpfDns,
    {
        Box::pin(async move {
            let mut node = Node::new(domain, via);
            let answer = match self.dns.txt(domain).await {
                Ok(a) => a,
                Err(f) if f.is_void() => {
                    let (code, what) = match (root, f == DnsFailure::NxDomain) {
                        (true, true) => ("nxdomain", format!("{domain} does not exist (NXDOMAIN)")),
                        (true, false) => ("no_record", format!("{domain} publishes no SPF record")),
                        (false, _) => (
                            via.no_record(),
                            format!("{via} target {domain} has no SPF record: permerror"),
                        ),
                    };
                    if root {
                        self.no_policy(code, what.clone(), domain);
                    } else {
                        self.void(&format!("{via}:{domain}"), domain, domain);
                        self.find(Severity::Error, code, what.clone(), None, domain);
                    }
                    node.error = Some(what);
                    return node;
                }
                Err(f) => {
                    self.temp_error("TXT", domain, None, &f);
                    node.error = Some("DNS lookup failed (temperror)".into());
                    return node;
                }
            };
            self.ttl = self.ttl.min(answer.ttl);
            let joined: Vec<(String, usize)> = answer
                .records
                .iter()
                .map(|strings| {
                    (
                        String::from_utf8_lossy(&strings.concat()).into_owned(),
                        strings.len(),
                    )
                })
                .collect();
            let spf: Vec<&(String, usize)> =
                joined.iter().filter(|(t, _)| is_spf_record(t)).collect();
            if root {
                let total: usize = answer.records.iter().flatten().map(|s| s.len() + 1).sum();
                self.size_findings(domain, &spf, total);
            }
            if spf.is_empty() {
                let (code, what) = if root {
                    ("no_record", format!("{domain} publishes no SPF record"))
                } else {
                    (
                        via.no_record(),
                        format!("{via} target {domain} has no SPF record: permerror"),
                    )
                };
                if root {
                    self.no_policy(code, what.clone(), domain);
                } else {
                    self.find(Severity::Error, code, what.clone(), None, domain);
                }
                node.error = Some(what);
                return node;
            }
            if spf.len() > 1 {
                self.find(
                    Severity::Error,
                    "multiple_records",
                    format!(
                        "{domain} publishes {} SPF records; exactly one is allowed: permerror",
                        spf.len()
                    ),
                    None,
                    domain,
                );
                node.error = Some("multiple SPF records".into());
                if let Some((recs, _)) = root_out {
                    recs.extend(spf.iter().map(|(t, _)| t.clone()));
                }
                return node;
            }
            let text = spf[0].0.clone();
            node.record = Some(text.clone());
            let parsed = record::parse(&text);
            for e in &parsed.errors {
                self.find(
                    Severity::Error,
                    e.code,
                    format!("{}: permerror", e.message),
                    Some(&e.term),
                    domain,
                );
            }
            if !parsed.errors.is_empty() {
                node.error = Some("syntax error".into());
            }
            self.stack.push(domain.to_string());
            let before = self.lookups;
            self.walk_terms(domain, &parsed, depth, &mut node).await;
            self.stack.pop();
            node.total_lookups = self.lookups - before;
            if let Some((recs, rec)) = root_out {
                recs.push(text);
                *rec = Some(parsed);
            }
            node
        })
    }

    fn size_findings(&mut self, domain: &str, spf: &[&(String, usize)], total: usize) {
        for (text, strings) in spf {
            if *strings > 1 {
                self.find(
                    Severity::Info,
                    "split_strings",
                    format!("the record is split into {strings} strings, joined without spaces"),
                    None,
                    domain,
                );
            }
            if text.len() > 255 {
                self.find(
                    Severity::Warning,
                    "record_over_255",
                    format!("the record is {} octets: longer than one 255-octet string, so it must be split", text.len()),
                    None,
                    domain,
                );
            }
        }
        if total > 512 {
            self.find(
                Severity::Warning,
                "txt_answer_over_512",
                format!("the TXT answer is about {total} octets, over 512: it no longer fits a plain UDP DNS reply"),
                None,
                domain,
            );
        } else if total > 450 {
            self.find(
                Severity::Warning,
                "txt_answer_over_450",
                format!("the TXT answer is about {total} octets, close to the 512-octet UDP limit (RFC 7208 §3.4)"),
                None,
                domain,
            );
        }
    }

    async fn walk_terms(&mut self, domain: &str, rec: &Record, depth: u32, node: &mut Node) {
        let all_at = rec.all_position();
        let mut warned_after_all = false;
        let mut seen = Vec::new();
        for (i, p) in rec.terms.iter().enumerate() {
            if all_at.is_some_and(|a| i > a) {
                let Term::Directive { mechanism, .. } = &p.term else {
                    continue;
                };
                if !warned_after_all {
                    self.find(
                        Severity::Warning,
                        "terms_after_all",
                        "terms after `all` are never evaluated".into(),
                        Some(&p.text),
                        domain,
                    );
                    warned_after_all = true;
                }
                // A gateway include after `all` is noted: it authorizes nothing.
                if let Mechanism::Include(t) = mechanism {
                    if let Some(g) = classify_include(t) {
                        self.gateway.push(GatewayHit {
                            include: g,
                            name: t.to_ascii_lowercase(),
                            depth,
                            effective: false,
                            lookups: 0,
                        });
                    }
                }
                continue;
            }
            let lowered = p.text.to_ascii_lowercase();
            if seen.contains(&lowered) {
                self.find(
                    Severity::Warning,
                    "duplicate_term",
                    format!("`{}` appears more than once", p.text),
                    Some(&p.text),
                    domain,
                );
            }
            seen.push(lowered);
            let Term::Directive {
                qualifier,
                mechanism,
            } = &p.term
            else {
                if let Term::Unknown { name, .. } = &p.term {
                    self.find(
                        Severity::Info,
                        "unknown_modifier",
                        format!("unknown modifier `{name}` is ignored"),
                        Some(&p.text),
                        domain,
                    );
                }
                continue;
            };
            if mechanism.queries_dns() {
                node.lookups += 1;
                if !self.count(&p.text, domain) {
                    return;
                }
            }
            match mechanism {
                Mechanism::Include(target) => {
                    self.include(domain, &p.text, target, *qualifier, depth, node).await;
                }
                Mechanism::A { domain: d, .. } => {
                    let target = d.clone().unwrap_or_else(|| domain.to_string());
                    self.check_addresses(domain, &p.text, &target).await;
                }
                Mechanism::Mx { domain: d, .. } => {
                    let target = d.clone().unwrap_or_else(|| domain.to_string());
                    self.check_mx(domain, &p.text, &target).await;
                }
                Mechanism::Ptr(_) => self.find(
                    Severity::Warning,
                    "ptr_used",
                    "`ptr` is deprecated (RFC 7208 §5.5): slow, unreliable, ignored by some receivers".into(),
                    Some(&p.text),
                    domain,
                ),
                Mechanism::Exists(target) => {
                    self.check_addresses(domain, &p.text, target).await;
                }
                Mechanism::All | Mechanism::Ip4 { .. } | Mechanism::Ip6 { .. } => {}
            }
        }
        if let Some(target) = rec.redirect() {
            let term = format!("redirect={target}");
            if all_at.is_some() {
                self.find(
                    Severity::Warning,
                    "redirect_ignored",
                    "`redirect` is ignored because the record has `all` (RFC 7208 §6.1)".into(),
                    Some(&term),
                    domain,
                );
                return;
            }
            node.lookups += 1;
            if !self.count(&term, domain) {
                return;
            }
            // A macro target depends on each message: `eval` follows it per address.
            if super::macros::has_macros(target) {
                return;
            }
            let target = target.trim_end_matches('.').to_ascii_lowercase();
            if self.stack.contains(&target) {
                self.find(
                    Severity::Error,
                    "redirect_loop",
                    format!("redirect to {target} loops back: permerror"),
                    Some(&term),
                    domain,
                );
                return;
            }
            // What the redirect target authorizes, this record does.
            let child = self
                .walk_domain(&target, Via::Redirect, depth + 1, false, None)
                .await;
            node.children.push(child);
        }
    }

    async fn include(
        &mut self,
        domain: &str,
        term: &str,
        target: &str,
        q: Qualifier,
        depth: u32,
        node: &mut Node,
    ) {
        // A macro target depends on each message: `eval` follows it per address.
        if super::macros::has_macros(target) {
            return;
        }
        let target = target.trim_end_matches('.').to_ascii_lowercase();
        let hit_at = classify_include(&target).map(|g| {
            self.gateway.push(GatewayHit {
                include: g,
                name: target.clone(),
                depth,
                effective: q == Qualifier::Pass,
                lookups: 0,
            });
            self.gateway.len() - 1
        });
        if self.stack.contains(&target) {
            self.find(
                Severity::Error,
                "include_loop",
                format!(
                    "include of {target} loops back to a record already being evaluated: permerror"
                ),
                Some(term),
                domain,
            );
            return;
        }
        let before = self.lookups;
        let child = self
            .walk_domain(&target, Via::Include, depth + 1, false, None)
            .await;
        if let Some(i) = hit_at {
            self.gateway[i].lookups = 1 + self.lookups - before;
            if child.error.is_some() {
                self.gateway[i].effective = false;
            }
        }
        node.children.push(child);
    }

    async fn check_addresses(&mut self, domain: &str, term: &str, target: &str) {
        // A macro target depends on each message: `eval` follows it per address.
        if super::macros::has_macros(target) {
            return;
        }
        match self.dns.addresses(target).await {
            Ok(_) => {}
            Err(f) if f.is_void() => self.void(term, domain, target),
            Err(f) => self.temp_error("A/AAAA", target, Some(term), &f),
        }
    }

    async fn check_mx(&mut self, domain: &str, term: &str, target: &str) {
        // A macro target depends on each message: `eval` follows it per address.
        if super::macros::has_macros(target) {
            return;
        }
        match self.dns.mx(target).await {
            Ok(names) => {
                if names.len() > MX_LIMIT {
                    self.find(
                        Severity::Error,
                        "mx_limit",
                        format!("{target} has {} MX hosts; `mx` may look up at most {MX_LIMIT}: permerror", names.len()),
                        Some(term),
                        domain,
                    );
                }
                for name in names.iter().take(MX_LIMIT) {
                    if let Err(f) = self.dns.addresses(name).await {
                        if !f.is_void() {
                            self.temp_error("A/AAAA", name, Some(term), &f);
                        }
                    }
                }
            }
            Err(f) if f.is_void() => self.void(term, domain, target),
            Err(f) => self.temp_error("MX", target, Some(term), &f),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::spf::dns::TxtAnswer;
    use std::collections::HashMap;

    /// A zone in memory: name → TXT strings; names listed in `addresses` have A records.
    #[derive(Default)]
    pub struct Zone {
        pub txt: HashMap<String, Vec<Vec<String>>>,
        pub addresses: Vec<String>,
        pub mx: HashMap<String, Vec<String>>,
        pub broken: Vec<String>,
    }

    impl Zone {
        pub fn with(mut self, name: &str, record: &str) -> Zone {
            self.txt
                .entry(name.into())
                .or_default()
                .push(vec![record.into()]);
            self
        }
    }

    impl SpfDns for Zone {
        async fn txt(&self, name: &str) -> Result<TxtAnswer, DnsFailure> {
            if self.broken.iter().any(|b| b == name) {
                return Err(DnsFailure::Timeout);
            }
            match self.txt.get(name) {
                Some(recs) => Ok(TxtAnswer {
                    records: recs
                        .iter()
                        .map(|r| r.iter().map(|s| s.as_bytes().to_vec()).collect())
                        .collect(),
                    ttl: 60,
                }),
                None => Err(DnsFailure::NxDomain),
            }
        }
        async fn a(&self, name: &str) -> Result<Vec<std::net::Ipv4Addr>, DnsFailure> {
            if self.addresses.iter().any(|a| a == name) {
                Ok(vec![std::net::Ipv4Addr::new(192, 0, 2, 1)])
            } else {
                Err(DnsFailure::NxDomain)
            }
        }
        async fn aaaa(&self, _name: &str) -> Result<Vec<std::net::Ipv6Addr>, DnsFailure> {
            Err(DnsFailure::NoData)
        }
        async fn ptr(&self, _ip: std::net::IpAddr) -> Result<Vec<String>, DnsFailure> {
            Err(DnsFailure::NxDomain)
        }
        async fn mx(&self, name: &str) -> Result<Vec<String>, DnsFailure> {
            self.mx.get(name).cloned().ok_or(DnsFailure::NxDomain)
        }
    }

    fn codes(w: &Walk) -> Vec<&'static str> {
        w.findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .map(|f| f.code)
            .collect()
    }

    fn run(zone: &Zone, domain: &str) -> Walk {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(walk(zone, domain))
    }

    #[test]
    fn nested_gateway_include_found() {
        let zone = Zone::default()
            .with("example.test", "v=spf1 include:_spf.example.test ~all")
            .with(
                "_spf.example.test",
                "v=spf1 include:de._netblocks.mimecast.com -all",
            )
            .with("de._netblocks.mimecast.com", "v=spf1 ip4:192.0.2.0/24 ~all");
        let w = run(&zone, "example.test");
        assert_eq!(w.status, SpfStatus::Ok);
        assert_eq!(w.authorized(), Some(GatewayInclude::Region("de")));
        assert_eq!(w.lookups, 2);
        assert_eq!(
            w.tree.children[0].children[0].domain,
            "de._netblocks.mimecast.com"
        );
    }

    #[test]
    fn lookup_limit_across_nested_includes() {
        let mut zone =
            Zone::default().with("big.test", "v=spf1 include:n1.test include:n2.test ~all");
        for i in 1..=2 {
            let inner: Vec<String> = (0..5).map(|k| format!("include:leaf{i}{k}.test")).collect();
            zone = zone.with(
                &format!("n{i}.test"),
                &format!("v=spf1 {} ~all", inner.join(" ")),
            );
            for k in 0..5 {
                zone = zone.with(&format!("leaf{i}{k}.test"), "v=spf1 ip4:192.0.2.1 ~all");
            }
        }
        let w = run(&zone, "big.test");
        assert_eq!(w.lookups, 12);
        assert_eq!(w.status, SpfStatus::PermError);
        assert_eq!(codes(&w), ["lookup_limit"]);
    }

    #[test]
    fn loops_voids_and_missing_targets() {
        let zone = Zone::default()
            .with("loop.test", "v=spf1 include:loop2.test ~all")
            .with("loop2.test", "v=spf1 include:loop.test ~all");
        assert_eq!(codes(&run(&zone, "loop.test")), ["include_loop"]);

        let zone = Zone::default().with("void.test", "v=spf1 a:v1.test a:v2.test a:v3.test ~all");
        let w = run(&zone, "void.test");
        assert_eq!(w.void_lookups, 3);
        assert_eq!(codes(&w), ["void_limit"]);

        let zone = Zone::default().with("r.test", "v=spf1 redirect=nothing.test");
        assert_eq!(codes(&run(&zone, "r.test")), ["redirect_no_record"]);

        let zone = Zone::default().with("i.test", "v=spf1 include:nothing.test -all");
        assert_eq!(run(&zone, "i.test").status, SpfStatus::PermError);
    }

    #[test]
    fn record_selection() {
        let mut zone = Zone::default()
            .with("two.test", "v=spf1 -all")
            .with("two.test", "v=spf1 ~all")
            .with("other.test", "google-site-verification=abc");
        zone.txt.insert(
            "split.test".into(),
            vec![vec![
                "v=spf1 ip4:192.0.2.1".into(),
                " include:eu._netblocks.mimecast.com ~all".into(),
            ]],
        );
        zone = zone.with(
            "eu._netblocks.mimecast.com",
            "v=spf1 ip4:198.51.100.0/24 ~all",
        );
        assert_eq!(codes(&run(&zone, "two.test")), ["multiple_records"]);
        let none = run(&zone, "other.test");
        assert_eq!(none.status, SpfStatus::None);
        assert_eq!(codes(&none), ["no_record"]);
        let nx = run(&zone, "absent.test");
        assert_eq!(nx.status, SpfStatus::None);
        assert_eq!(codes(&nx), ["nxdomain"]);
        let split = run(&zone, "split.test");
        assert_eq!(
            split.records,
            ["v=spf1 ip4:192.0.2.1 include:eu._netblocks.mimecast.com ~all"]
        );
        assert_eq!(split.authorized(), Some(GatewayInclude::Region("eu")));
    }

    #[test]
    fn temperror_and_ineffective_includes() {
        let mut zone = Zone::default().with("t.test", "v=spf1 include:slow.test ~all");
        zone.broken.push("slow.test".into());
        let w = run(&zone, "t.test");
        assert_eq!(w.status, SpfStatus::TempError);
        assert!(codes(&w).contains(&"dns_timeout"));

        let zone = Zone::default()
            .with(
                "after.test",
                "v=spf1 ~all include:eu._netblocks.mimecast.com",
            )
            .with(
                "minus.test",
                "v=spf1 -include:eu._netblocks.mimecast.com ~all",
            )
            .with(
                "eu._netblocks.mimecast.com",
                "v=spf1 ip4:198.51.100.0/24 ~all",
            );
        assert_eq!(run(&zone, "after.test").authorized(), None);
        assert_eq!(run(&zone, "minus.test").authorized(), None);
    }

    #[test]
    fn mx_limit() {
        let mut zone = Zone::default().with("mx.test", "v=spf1 mx -all");
        zone.mx.insert(
            "mx.test".into(),
            (0..11).map(|i| format!("mx{i}.test")).collect(),
        );
        assert_eq!(codes(&run(&zone, "mx.test")), ["mx_limit"]);
    }
}
