//! SPF record syntax (RFC 7208 §4.5, §4.6, §5, §6): a strict parser that keeps every
//! term's text and position so findings can point at it. No I/O.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use serde::Serialize;

use super::macros::{check_domain_spec, check_macro_string};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Qualifier {
    Pass,
    Fail,
    SoftFail,
    Neutral,
}

impl Qualifier {
    pub fn symbol(self) -> char {
        match self {
            Qualifier::Pass => '+',
            Qualifier::Fail => '-',
            Qualifier::SoftFail => '~',
            Qualifier::Neutral => '?',
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mechanism {
    All,
    Include(String),
    A {
        domain: Option<String>,
        cidr4: Option<u8>,
        cidr6: Option<u8>,
    },
    Mx {
        domain: Option<String>,
        cidr4: Option<u8>,
        cidr6: Option<u8>,
    },
    Ptr(Option<String>),
    Ip4 {
        addr: Ipv4Addr,
        prefix: Option<u8>,
    },
    Ip6 {
        addr: Ipv6Addr,
        prefix: Option<u8>,
    },
    Exists(String),
}

impl Mechanism {
    /// Terms that cost a DNS query and count towards the limit of 10 (§4.6.4).
    pub fn queries_dns(&self) -> bool {
        matches!(
            self,
            Mechanism::Include(_)
                | Mechanism::A { .. }
                | Mechanism::Mx { .. }
                | Mechanism::Ptr(_)
                | Mechanism::Exists(_)
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Term {
    Directive {
        qualifier: Qualifier,
        mechanism: Mechanism,
    },
    Redirect(String),
    Exp(String),
    /// Unknown modifiers are ignored by evaluation but must be well-formed.
    Unknown {
        name: String,
        value: String,
    },
}

/// A term as it appears in the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub term: Term,
    pub text: String,
    pub offset: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SyntaxError {
    /// Stable code, `syntax_*`.
    pub code: &'static str,
    pub message: String,
    pub term: String,
    /// Byte offset of the term in the record.
    pub offset: usize,
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (term `{}` at offset {})",
            self.message, self.term, self.offset
        )
    }
}

/// A parsed record: the well-formed terms and every syntax error. Any error makes the
/// record a permerror.
#[derive(Debug, Clone, Default)]
pub struct Record {
    pub terms: Vec<Parsed>,
    pub errors: Vec<SyntaxError>,
}

impl Record {
    pub fn directives(&self) -> impl Iterator<Item = (&Parsed, Qualifier, &Mechanism)> {
        self.terms.iter().filter_map(|p| match &p.term {
            Term::Directive {
                qualifier,
                mechanism,
            } => Some((p, *qualifier, mechanism)),
            _ => None,
        })
    }

    pub fn redirect(&self) -> Option<&str> {
        self.terms.iter().find_map(|p| match &p.term {
            Term::Redirect(d) => Some(d.as_str()),
            _ => None,
        })
    }

    /// Index (in `terms`) of the first `all`, if any.
    pub fn all_position(&self) -> Option<usize> {
        self.terms.iter().position(|p| {
            matches!(
                p.term,
                Term::Directive {
                    mechanism: Mechanism::All,
                    ..
                }
            )
        })
    }
}

/// RFC 7208 §4.5: "v=spf1" exactly, then a space or the end; case-insensitive.
pub fn is_spf_record(txt: &str) -> bool {
    let b = txt.as_bytes();
    b.get(..6)
        .is_some_and(|v| v.eq_ignore_ascii_case(b"v=spf1"))
        && matches!(b.get(6), None | Some(b' '))
}

pub fn parse(record: &str) -> Record {
    let mut out = Record::default();
    if !is_spf_record(record) {
        out.errors.push(SyntaxError {
            code: "syntax_bad_version",
            message: "the record must start with `v=spf1`".into(),
            term: record.split(' ').next().unwrap_or("").into(),
            offset: 0,
        });
        return out;
    }
    let mut offset = 6;
    let mut seen_redirect = false;
    let mut seen_exp = false;
    for raw in record.get(6..).unwrap_or("").split(' ') {
        let here = offset;
        offset += raw.len() + 1;
        if raw.is_empty() {
            continue; // 1*SP between terms, trailing spaces allowed
        }
        let err = |code: &'static str, message: String| SyntaxError {
            code,
            message,
            term: raw.to_string(),
            offset: here,
        };
        match parse_term(raw) {
            Ok(term) => {
                match &term {
                    Term::Redirect(_) if seen_redirect => {
                        out.errors.push(err(
                            "syntax_duplicate_modifier",
                            "`redirect` appears more than once".into(),
                        ));
                        continue;
                    }
                    Term::Exp(_) if seen_exp => {
                        out.errors.push(err(
                            "syntax_duplicate_modifier",
                            "`exp` appears more than once".into(),
                        ));
                        continue;
                    }
                    Term::Redirect(_) => seen_redirect = true,
                    Term::Exp(_) => seen_exp = true,
                    _ => {}
                }
                out.terms.push(Parsed {
                    term,
                    text: raw.to_string(),
                    offset: here,
                });
            }
            Err((code, message)) => out.errors.push(err(code, message)),
        }
    }
    out
}

type TermError = (&'static str, String);

fn parse_term(raw: &str) -> Result<Term, TermError> {
    if !raw.bytes().all(|b| (0x21..=0x7E).contains(&b)) {
        return Err((
            "syntax_bad_character",
            "only visible ASCII is allowed in a term".into(),
        ));
    }
    // A modifier is `name=...` where the name ends before any ':' or '/'.
    let first = raw.find([':', '/', '=']);
    if let Some(i) = first.filter(|&i| raw.as_bytes()[i] == b'=') {
        return parse_modifier(&raw[..i], &raw[i + 1..]);
    }
    let (qualifier, body) = match raw.as_bytes()[0] {
        b'+' => (Qualifier::Pass, &raw[1..]),
        b'-' => (Qualifier::Fail, &raw[1..]),
        b'~' => (Qualifier::SoftFail, &raw[1..]),
        b'?' => (Qualifier::Neutral, &raw[1..]),
        _ => (Qualifier::Pass, raw),
    };
    let split = body.find([':', '/']).unwrap_or(body.len());
    let (name, arg) = body.split_at(split);
    let mechanism = match name.to_ascii_lowercase().as_str() {
        "all" => {
            if !arg.is_empty() {
                return Err((
                    "syntax_unexpected_argument",
                    "`all` takes no argument".into(),
                ));
            }
            Mechanism::All
        }
        "include" => Mechanism::Include(domain_arg(name, arg)?),
        "exists" => Mechanism::Exists(domain_arg(name, arg)?),
        "a" | "mx" => {
            let (domain, cidr4, cidr6) = dual_cidr_arg(arg)?;
            if name.eq_ignore_ascii_case("a") {
                Mechanism::A {
                    domain,
                    cidr4,
                    cidr6,
                }
            } else {
                Mechanism::Mx {
                    domain,
                    cidr4,
                    cidr6,
                }
            }
        }
        "ptr" => {
            if arg.starts_with('/') {
                return Err(("syntax_bad_cidr", "`ptr` takes no CIDR length".into()));
            }
            let domain = match arg.strip_prefix(':') {
                Some(d) => {
                    check_domain_spec(d).map_err(|m| ("syntax_bad_domain", m))?;
                    Some(d.to_string())
                }
                None => None,
            };
            Mechanism::Ptr(domain)
        }
        "ip4" => {
            let value = arg.strip_prefix(':').filter(|v| !v.is_empty()).ok_or((
                "syntax_missing_argument",
                "`ip4` needs an address".to_string(),
            ))?;
            let (addr, prefix) = split_cidr(value, 32, "ip4")?;
            let addr: Ipv4Addr = addr
                .parse()
                .map_err(|_| ("syntax_bad_ip4", format!("`{addr}` is not an IPv4 address")))?;
            Mechanism::Ip4 { addr, prefix }
        }
        "ip6" => {
            let value = arg.strip_prefix(':').filter(|v| !v.is_empty()).ok_or((
                "syntax_missing_argument",
                "`ip6` needs an address".to_string(),
            ))?;
            let (addr, prefix) = split_cidr(value, 128, "ip6")?;
            let addr: Ipv6Addr = addr
                .parse()
                .map_err(|_| ("syntax_bad_ip6", format!("`{addr}` is not an IPv6 address")))?;
            Mechanism::Ip6 { addr, prefix }
        }
        other => {
            let hint = match other {
                "ipv4" | "ip" => " (did you mean `ip4`?)",
                "ipv6" => " (did you mean `ip6`?)",
                "prt" => " (did you mean `ptr`?)",
                "all." => " (a stray dot after `all`)",
                "includes" | "inlcude" => " (did you mean `include`?)",
                _ => "",
            };
            return Err((
                "syntax_unknown_mechanism",
                format!("unknown mechanism `{other}`{hint}"),
            ));
        }
    };
    Ok(Term::Directive {
        qualifier,
        mechanism,
    })
}

fn parse_modifier(name: &str, value: &str) -> Result<Term, TermError> {
    let valid_name = name.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !valid_name {
        return Err((
            "syntax_bad_modifier",
            format!("`{name}` is not a valid modifier name"),
        ));
    }
    match name.to_ascii_lowercase().as_str() {
        "redirect" => {
            check_domain_spec(value).map_err(|m| ("syntax_bad_domain", m))?;
            Ok(Term::Redirect(value.to_string()))
        }
        "exp" => {
            check_domain_spec(value).map_err(|m| ("syntax_bad_domain", m))?;
            Ok(Term::Exp(value.to_string()))
        }
        _ => {
            check_macro_string(value, false).map_err(|m| ("syntax_bad_macro", m))?;
            Ok(Term::Unknown {
                name: name.to_string(),
                value: value.to_string(),
            })
        }
    }
}

fn domain_arg(name: &str, arg: &str) -> Result<String, TermError> {
    let d = arg.strip_prefix(':').ok_or((
        "syntax_missing_argument",
        format!("`{name}` needs `:domain`"),
    ))?;
    if let Err(m) = check_domain_spec(d) {
        let code = if m.contains("macro") || m.contains('%') {
            "syntax_bad_macro"
        } else {
            "syntax_bad_domain"
        };
        return Err((code, m));
    }
    Ok(d.to_string())
}

/// `[:domain-spec][/cidr4][//cidr6]`
/// A domain-spec and the IPv4 and IPv6 CIDR lengths of `a` and `mx`.
type DualCidr = (Option<String>, Option<u8>, Option<u8>);

fn dual_cidr_arg(arg: &str) -> Result<DualCidr, TermError> {
    // The lengths are a suffix of digits after `/` and `//`; a `/` followed by anything
    // else belongs to the domain-spec, which may hold any visible character.
    let (rest, cidr6) = match cidr_suffix(arg, "//") {
        Some((rest, len)) => (rest, Some(cidr_len(len, 128)?)),
        None => (arg, None),
    };
    let (rest, cidr4) = match cidr_suffix(rest, "/") {
        Some((rest, len)) => (rest, Some(cidr_len(len, 32)?)),
        None => (rest, None),
    };
    let domain = match rest {
        "" => None,
        d => {
            let d = d
                .strip_prefix(':')
                .ok_or(("syntax_bad_domain", format!("unexpected `{d}`")))?;
            if let Err(m) = check_domain_spec(d) {
                let code = if m.contains("macro") || m.contains('%') {
                    "syntax_bad_macro"
                } else {
                    "syntax_bad_domain"
                };
                return Err((code, m));
            }
            Some(d.to_string())
        }
    };
    Ok((domain, cidr4, cidr6))
}

/// `(head, digits)` when `s` ends with `sep` and digits (or `sep` and nothing, which is
/// then a bad length).
fn cidr_suffix<'a>(s: &'a str, sep: &str) -> Option<(&'a str, &'a str)> {
    let (head, tail) = s.rsplit_once(sep)?;
    if !tail.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // `a//64` must not read as a domain `/` with an IPv4 length `64`.
    if sep == "/" && head.ends_with('/') {
        return None;
    }
    Some((head, tail))
}

fn split_cidr<'a>(value: &'a str, max: u8, what: &str) -> Result<(&'a str, Option<u8>), TermError> {
    match value.split_once('/') {
        Some((addr, len)) => {
            let n = cidr_len(len, max).map_err(|(c, m)| (c, format!("{what}: {m}")))?;
            Ok((addr, Some(n)))
        }
        None => Ok((value, None)),
    }
}

/// A CIDR length: digits without a leading zero, at most `max`.
fn cidr_len(s: &str, max: u8) -> Result<u8, TermError> {
    let ok_digits =
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    match s.parse::<u16>() {
        Ok(n) if ok_digits && n <= max as u16 => Ok(n as u8),
        _ => Err((
            "syntax_bad_cidr",
            format!("CIDR length `/{s}` must be 0 to {max}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codes(r: &str) -> Vec<&'static str> {
        parse(r).errors.iter().map(|e| e.code).collect()
    }

    #[test]
    fn version_selection() {
        assert!(is_spf_record("v=spf1"));
        assert!(is_spf_record("V=SPF1 -all"));
        assert!(!is_spf_record("v=spf10 -all"));
        assert!(!is_spf_record("v=spf2.0/pra"));
        assert!(!is_spf_record("spf1"));
    }

    #[test]
    fn every_mechanism_parses() {
        let r = parse("v=spf1 include:eu._netblocks.mimecast.com a a:mail.example.com/24 mx//64 mx:%{d}/24//64 ptr ptr:example.org ip4:192.0.2.0/24 ip6:2001:db8::/32 exists:%{i}._spf.%{d} -all redirect=_spf.example.com exp=explain._spf.%{d} custom=%{l}x");
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(r.terms.len(), 14);
        assert!(
            matches!(&r.terms[2].term, Term::Directive { mechanism: Mechanism::A { domain: Some(d), cidr4: Some(24), cidr6: None }, .. } if d == "mail.example.com")
        );
        assert!(matches!(
            &r.terms[3].term,
            Term::Directive {
                mechanism: Mechanism::Mx {
                    domain: None,
                    cidr4: None,
                    cidr6: Some(64)
                },
                ..
            }
        ));
        assert!(matches!(
            &r.terms[10].term,
            Term::Directive {
                qualifier: Qualifier::Fail,
                mechanism: Mechanism::All
            }
        ));
        assert_eq!(r.redirect(), Some("_spf.example.com"));
        assert_eq!(r.terms[1].offset, 42);
    }

    #[test]
    fn addresses_and_cidrs() {
        assert_eq!(codes("v=spf1 ip4:999.1.1.1 -all"), ["syntax_bad_ip4"]);
        assert_eq!(codes("v=spf1 ip4:192.0.2.0/33 -all"), ["syntax_bad_cidr"]);
        assert_eq!(codes("v=spf1 ip4:192.0.2.0/08 -all"), ["syntax_bad_cidr"]);
        assert_eq!(codes("v=spf1 ip4:01.2.3.4 -all"), ["syntax_bad_ip4"]);
        assert_eq!(codes("v=spf1 ip6:2001:db8::/129 -all"), ["syntax_bad_cidr"]);
        assert_eq!(codes("v=spf1 ip6:2001:db8:::1 -all"), ["syntax_bad_ip6"]);
        assert_eq!(codes("v=spf1 a/33 -all"), ["syntax_bad_cidr"]);
        assert_eq!(codes("v=spf1 mx//129 -all"), ["syntax_bad_cidr"]);
        assert_eq!(codes("v=spf1 ip4: -all"), ["syntax_missing_argument"]);
        assert!(codes("v=spf1 ip4:0.0.0.0/0 ip6:::/0 -all").is_empty());
    }

    #[test]
    fn names_typos_and_modifiers() {
        assert_eq!(
            codes("v=spf1 ipv4:192.0.2.1 -all"),
            ["syntax_unknown_mechanism"]
        );
        assert_eq!(codes("v=spf1 prt -all"), ["syntax_unknown_mechanism"]);
        assert_eq!(codes("v=spf1 -all."), ["syntax_unknown_mechanism"]);
        assert_eq!(codes("v=spf1 all:foo"), ["syntax_unexpected_argument"]);
        assert_eq!(codes("v=spf1 include -all"), ["syntax_missing_argument"]);
        assert_eq!(codes("v=spf1 include:com -all"), ["syntax_bad_domain"]);
        assert_eq!(
            codes("v=spf1 redirect=a.example redirect=b.example"),
            ["syntax_duplicate_modifier"]
        );
        assert_eq!(
            codes("v=spf1 exp=a.example exp=b.example -all"),
            ["syntax_duplicate_modifier"]
        );
        assert_eq!(codes("v=spf1 1bad=x -all"), ["syntax_bad_modifier"]);
        assert_eq!(codes("v=spf1 +redirect=x.example"), ["syntax_bad_modifier"]);
        assert_eq!(codes("v=spf1 foo=%{z} -all"), ["syntax_bad_macro"]);
        assert_eq!(
            codes("v=spf1 exists:%{q}.example.com -all"),
            ["syntax_bad_macro"]
        );
        assert_eq!(
            codes("v=spf1 exists:%{c}.example.com -all"),
            ["syntax_bad_macro"]
        );
        assert!(
            codes("v=spf1   a   -all  ").is_empty(),
            "extra spaces are allowed"
        );
        assert_eq!(codes("v=spf1 a\t-all"), ["syntax_bad_character"]);
    }

    #[test]
    fn error_points_at_the_term() {
        let r = parse("v=spf1 a ip4:1.2.3.999 -all");
        assert_eq!(r.errors[0].term, "ip4:1.2.3.999");
        assert_eq!(r.errors[0].offset, 9);
    }
}
