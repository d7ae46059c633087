//! The gateway's onboarding rules on top of an RFC 7208 evaluation: the region's include
//! present, first among the mechanisms and before `all`; a `~all` or `-all` terminator;
//! the lookup budget after adding the include. Produces the report behind the green
//! tick or the red exclamation, and a recommended record that itself validates.

use serde::Serialize;

use super::gateway::{self, GatewayPass, Verdict};
use super::record::{self, Mechanism, Qualifier, Record, Term};
use super::walk::{Node, SpfStatus, Via, Walk, LOOKUP_LIMIT};
use super::{Finding, Severity};
use crate::regions::{self, classify_include, GatewayInclude, GLOBAL_INCLUDE};

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub domain: String,
    pub region: String,
    /// The include this region needs (`include:<this>`).
    pub include: String,
    pub valid: bool,
    pub status: SpfStatus,
    pub records: Vec<String>,
    pub findings: Vec<Finding>,
    pub lookups: u32,
    pub void_lookups: u32,
    pub tree: Node,
    pub recommended: String,
    /// Lookups the recommended record would cost.
    pub recommended_lookups: u32,
    /// Whether receivers pass mail the gateway relays, range by range.
    pub gateway_pass: GatewayPass,
}

impl Report {
    /// Adds the receivers' verdict. A record that does not evaluate at all already has
    /// its error; otherwise each range that does not pass is one, with the term that
    /// decides it.
    pub fn with_gateway_pass(mut self, pass: GatewayPass) -> Report {
        if self.status == SpfStatus::Ok {
            self.findings
                .extend(gateway::findings(&pass, &self.domain, &self.include));
        }
        self.valid = !self.findings.iter().any(|f| f.severity == Severity::Error);
        self.gateway_pass = pass;
        self
    }

    pub fn errors(&self) -> impl Iterator<Item = &Finding> {
        self.findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
    }
}

pub fn validate(walk: Walk, region: &str) -> Report {
    let expected = regions::spf_include_for(region).to_string();
    let mut findings = walk.findings.clone();
    let mut add = |severity, code: &'static str, message: String, term: Option<String>| {
        findings.push(Finding {
            severity,
            code,
            message,
            term,
            domain: walk.domain.clone(),
        })
    };
    if regions::preset(region).is_none() {
        add(
            Severity::Error,
            "unknown_region",
            format!("`{region}` is not a known region"),
            None,
        );
    }
    let root = walk.root.as_ref().filter(|_| walk.records.len() == 1);
    let mut projected = walk.lookups;
    if let Some(rec) = root {
        let dirs: Vec<(&record::Parsed, Qualifier, &Mechanism)> = rec.directives().collect();
        let all_at = dirs.iter().position(|(_, _, m)| **m == Mechanism::All);
        let is = |m: &Mechanism, name: &str| matches!(m, Mechanism::Include(t) if t.trim_end_matches('.').eq_ignore_ascii_case(name));
        let regional = dirs.iter().position(|(_, _, m)| is(m, &expected));
        let global = dirs.iter().position(|(_, _, m)| is(m, GLOBAL_INCLUDE));
        let found = regional.or(global);
        if regional.is_none() && global.is_some() && expected != GLOBAL_INCLUDE {
            let cost = walk
                .gateway
                .iter()
                .find(|g| g.include == GatewayInclude::Global)
                .map_or(0, |g| g.lookups);
            add(
                Severity::Warning,
                "global_include",
                format!(
                    "the global include:{GLOBAL_INCLUDE} is accepted but costs {cost} DNS lookups; include:{expected} costs 1"
                ),
                Some(format!("include:{GLOBAL_INCLUDE}")),
            );
        }
        match found {
            None => {
                let nested = walk.gateway.iter().find(|g| g.depth > 0 && g.effective);
                match nested {
                    Some(g) => add(
                        Severity::Error,
                        "gateway_include_nested",
                        format!("include:{} is only reached through another include; list include:{expected} directly, as the first mechanism", g.name),
                        None,
                    ),
                    None => add(
                        Severity::Error,
                        "gateway_include_missing",
                        format!("the record does not contain include:{expected}; add it as the first mechanism"),
                        None,
                    ),
                }
                for (p, _, m) in &dirs {
                    if let Mechanism::Include(t) = m {
                        if let Some(GatewayInclude::Region(r)) = classify_include(t) {
                            if r != region {
                                add(
                                    Severity::Info,
                                    "other_region_include",
                                    format!("the record authorizes the `{r}` region's hosts, not `{region}`"),
                                    Some(p.text.clone()),
                                );
                            }
                        }
                    }
                }
                projected += 1;
            }
            Some(p) => {
                let (term, q, _) = &dirs[p];
                if all_at.is_some_and(|a| p > a) {
                    add(
                        Severity::Error,
                        "gateway_include_after_all",
                        format!("`{}` stands after `all`, so it is never evaluated; move it to the front", term.text),
                        Some(term.text.clone()),
                    );
                } else if p != 0 {
                    add(
                        Severity::Error,
                        "gateway_include_not_first",
                        format!(
                            "`{}` must be the first mechanism; `{}` comes before it",
                            term.text, dirs[0].0.text
                        ),
                        Some(term.text.clone()),
                    );
                }
                if *q != Qualifier::Pass {
                    add(
                        Severity::Error,
                        "gateway_include_qualifier",
                        format!("`{}` must not carry a qualifier: only `+` (the default) authorizes the hosts", term.text),
                        Some(term.text.clone()),
                    );
                }
            }
        }
        match effective_all(rec, &walk.tree) {
            Some(Qualifier::Pass) => add(
                Severity::Error,
                "all_pass",
                "`+all` authorizes every host on the Internet; end with `~all` or `-all`".into(),
                Some("+all".into()),
            ),
            Some(Qualifier::Neutral) => add(
                Severity::Error,
                "all_neutral",
                "`?all` says nothing about other hosts; end with `~all` or `-all`".into(),
                Some("?all".into()),
            ),
            Some(_) => {}
            None => add(
                Severity::Error,
                "no_terminator",
                "the record has no `all` (nor a redirect to a record with one); end with `~all` or `-all`".into(),
                None,
            ),
        }
    }
    if projected > LOOKUP_LIMIT && walk.lookups <= LOOKUP_LIMIT {
        add(
            Severity::Error,
            "lookup_limit_after_include",
            format!("adding include:{expected} makes {projected} DNS lookups, over the limit of {LOOKUP_LIMIT}"),
            None,
        );
    } else if (8..=LOOKUP_LIMIT).contains(&walk.lookups) {
        add(
            Severity::Warning,
            "lookups_near_limit",
            format!("{} of {LOOKUP_LIMIT} DNS lookups used", walk.lookups),
            None,
        );
    }
    let (recommended, recommended_lookups) = recommend(root, &walk, &expected);
    if recommended_lookups > LOOKUP_LIMIT {
        add(
            Severity::Warning,
            "recommended_over_limit",
            format!("even the recommended record needs {recommended_lookups} lookups: remove or flatten some includes"),
            None,
        );
    }
    let valid = !findings.iter().any(|f| f.severity == Severity::Error);
    Report {
        domain: walk.domain.clone(),
        region: region.to_string(),
        include: expected,
        valid,
        status: walk.status,
        records: walk.records.clone(),
        findings,
        lookups: walk.lookups,
        void_lookups: walk.void_lookups,
        tree: walk.tree,
        recommended,
        recommended_lookups,
        gateway_pass: GatewayPass {
            verdict: Verdict::Unknown,
            ranges: Vec::new(),
        },
    }
}

/// The `all` that ends evaluation: this record's, or the one a redirect leads to.
fn effective_all(rec: &Record, node: &Node) -> Option<Qualifier> {
    if let Some((_, q, _)) = rec.directives().find(|(_, _, m)| **m == Mechanism::All) {
        return Some(q);
    }
    rec.redirect()?;
    let child = node.children.iter().find(|c| c.via == Via::Redirect)?;
    let text = child.record.as_ref()?;
    effective_all(&record::parse(text), child)
}

/// The regional include first, the existing mechanisms in order without gateway
/// includes and duplicates, one `~all`/`-all`, then the modifiers worth keeping.
fn recommend(root: Option<&Record>, walk: &Walk, include: &str) -> (String, u32) {
    let mut parts = vec!["v=spf1".to_string(), format!("include:{include}")];
    let mut lookups = 1 + subtree_cost(&walk.tree, include);
    let mut seen: Vec<String> = Vec::new();
    let mut terminator = Qualifier::SoftFail;
    let mut modifiers = Vec::new();
    if let Some(rec) = root {
        for p in &rec.terms {
            match &p.term {
                Term::Directive {
                    mechanism: Mechanism::All,
                    qualifier,
                } => {
                    if matches!(qualifier, Qualifier::Fail | Qualifier::SoftFail) {
                        terminator = *qualifier;
                    }
                }
                Term::Directive { mechanism, .. } => {
                    if let Mechanism::Include(t) = mechanism {
                        if classify_include(t).is_some() {
                            continue;
                        }
                    }
                    let key = p.text.trim_start_matches('+').to_ascii_lowercase();
                    if seen.contains(&key) {
                        continue;
                    }
                    seen.push(key);
                    if mechanism.queries_dns() {
                        lookups += 1;
                        if let Mechanism::Include(t) = mechanism {
                            lookups += subtree_cost(&walk.tree, t);
                        }
                    }
                    parts.push(p.text.clone());
                }
                Term::Redirect(target) => {
                    // A redirect is ignored once there is an `all`: keep what it
                    // authorized as an include, and its terminator.
                    if rec.all_position().is_none() {
                        parts.push(format!("include:{target}"));
                        lookups += 1 + subtree_cost(&walk.tree, target);
                        if let Some(q) = effective_all(rec, &walk.tree) {
                            if matches!(q, Qualifier::Fail | Qualifier::SoftFail) {
                                terminator = q;
                            }
                        }
                    }
                }
                Term::Exp(_) | Term::Unknown { .. } => modifiers.push(p.text.clone()),
            }
        }
    }
    parts.push(format!("{}all", terminator.symbol()));
    parts.extend(modifiers);
    (parts.join(" "), lookups)
}

/// Lookups below an include/redirect target already walked (0 when unknown).
fn subtree_cost(node: &Node, domain: &str) -> u32 {
    let d = domain.trim_end_matches('.').to_ascii_lowercase();
    if node.domain == d && node.via != Via::Root {
        return node.total_lookups;
    }
    node.children
        .iter()
        .map(|c| subtree_cost(c, &d))
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spf::walk::{tests::Zone, walk};

    fn check(zone: &Zone, domain: &str) -> Report {
        let w = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(walk(zone, domain));
        validate(w, "eu")
    }

    fn errors(r: &Report) -> Vec<&'static str> {
        r.errors().map(|f| f.code).collect()
    }

    fn zone() -> Zone {
        Zone::default()
            .with(
                "eu._netblocks.mimecast.com",
                "v=spf1 ip4:198.51.100.0/24 ~all",
            )
            .with(
                "_netblocks.mimecast.com",
                "v=spf1 include:eu._netblocks.mimecast.com include:de._netblocks.mimecast.com ~all",
            )
            .with(
                "de._netblocks.mimecast.com",
                "v=spf1 ip4:203.0.113.0/24 ~all",
            )
            .with("_spf.google.com", "v=spf1 ip4:192.0.2.0/24 ~all")
    }

    #[test]
    fn valid_regional_record() {
        let z = zone().with(
            "ok.test",
            "v=spf1 include:eu._netblocks.mimecast.com ip4:192.0.2.1 -all",
        );
        let r = check(&z, "ok.test");
        assert!(r.valid, "{:?}", r.findings);
        assert_eq!(
            r.recommended,
            "v=spf1 include:eu._netblocks.mimecast.com ip4:192.0.2.1 -all"
        );
    }

    #[test]
    fn not_first_missing_after_all() {
        let z = zone()
            .with(
                "second.test",
                "v=spf1 include:_spf.google.com include:eu._netblocks.mimecast.com ~all",
            )
            .with("missing.test", "v=spf1 include:_spf.google.com ~all")
            .with(
                "after.test",
                "v=spf1 ip4:192.0.2.1 ~all include:eu._netblocks.mimecast.com",
            );
        let r = check(&z, "second.test");
        assert_eq!(errors(&r), ["gateway_include_not_first"]);
        assert_eq!(
            r.recommended,
            "v=spf1 include:eu._netblocks.mimecast.com include:_spf.google.com ~all"
        );
        assert_eq!(
            errors(&check(&z, "missing.test")),
            ["gateway_include_missing"]
        );
        let after = check(&z, "after.test");
        assert_eq!(errors(&after), ["gateway_include_after_all"]);
        assert!(after.findings.iter().any(|f| f.code == "terms_after_all"));
    }

    #[test]
    fn terminators() {
        let z = zone()
            .with(
                "pass.test",
                "v=spf1 include:eu._netblocks.mimecast.com +all",
            )
            .with(
                "neutral.test",
                "v=spf1 include:eu._netblocks.mimecast.com ?all",
            )
            .with("none.test", "v=spf1 include:eu._netblocks.mimecast.com")
            .with(
                "redir.test",
                "v=spf1 include:eu._netblocks.mimecast.com redirect=_spf.google.com",
            );
        assert_eq!(errors(&check(&z, "pass.test")), ["all_pass"]);
        assert_eq!(errors(&check(&z, "neutral.test")), ["all_neutral"]);
        let none = check(&z, "none.test");
        assert_eq!(errors(&none), ["no_terminator"]);
        assert_eq!(
            none.recommended,
            "v=spf1 include:eu._netblocks.mimecast.com ~all"
        );
        let redir = check(&z, "redir.test");
        assert!(redir.valid, "{:?}", redir.findings);
        assert_eq!(
            redir.recommended,
            "v=spf1 include:eu._netblocks.mimecast.com include:_spf.google.com ~all"
        );
    }

    #[test]
    fn global_include_is_a_warning() {
        let z = zone().with("g.test", "v=spf1 include:_netblocks.mimecast.com -all");
        let r = check(&z, "g.test");
        assert!(r.valid);
        let g = r
            .findings
            .iter()
            .find(|f| f.code == "global_include")
            .unwrap();
        assert_eq!(g.severity, Severity::Warning);
        assert!(g.message.contains("costs 3 DNS lookups"), "{}", g.message);
        assert_eq!(
            r.recommended,
            "v=spf1 include:eu._netblocks.mimecast.com -all"
        );
    }

    #[test]
    fn recommended_record_drops_duplicates_and_validates() {
        let z = zone().with(
            "messy.test",
            "v=spf1 a ptr include:_spf.google.com a +a include:de._netblocks.mimecast.com ?all exp=explain.%{d}",
        );
        let r = check(&z, "messy.test");
        assert!(!r.valid);
        assert_eq!(
            r.recommended,
            "v=spf1 include:eu._netblocks.mimecast.com a ptr include:_spf.google.com ~all exp=explain.%{d}"
        );
        let mut z2 = zone().with("messy.test", &r.recommended);
        z2.addresses.push("messy.test".into());
        let again = check(&z2, "messy.test");
        assert!(again.valid, "{:?}", again.findings);
    }

    #[test]
    fn lookup_budget_after_adding_the_include() {
        let mut z = zone();
        let terms: Vec<String> = (0..10).map(|i| format!("include:s{i}.test")).collect();
        for i in 0..10 {
            z = z.with(&format!("s{i}.test"), "v=spf1 ip4:192.0.2.1 ~all");
        }
        z = z.with("full.test", &format!("v=spf1 {} ~all", terms.join(" ")));
        let r = check(&z, "full.test");
        assert!(
            errors(&r).contains(&"lookup_limit_after_include"),
            "{:?}",
            r.findings
        );
        assert_eq!(r.recommended_lookups, 11);
    }
}
