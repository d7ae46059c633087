//! Macro strings and domain-specs (RFC 7208 §7, §4.6.1): one tokenizer behind both the
//! syntax check and the expansion, so what the parser accepts is what gets expanded.
//! Pure: the values (including `%{p}`, which needs DNS) come in a [`MacroContext`].

use std::net::IpAddr;

use super::dns::nibbles;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(String),
    Macro(MacroExpand),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct MacroExpand {
    /// Lower-cased letter.
    letter: char,
    /// An upper-case letter asks for the value URL-escaped (§7.3).
    escape: bool,
    keep: Option<usize>,
    reverse: bool,
    delimiters: String,
}

fn tokens(s: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut literal = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            literal.push(c);
            continue;
        }
        match chars.next() {
            Some('%') => literal.push('%'),
            Some('_') => literal.push(' '),
            Some('-') => literal.push_str("%20"),
            Some('{') => {
                let mut inner = String::new();
                let mut closed = false;
                for c in chars.by_ref() {
                    if c == '}' {
                        closed = true;
                        break;
                    }
                    inner.push(c);
                }
                if !closed {
                    return Err(format!("unterminated macro in `{s}`"));
                }
                if !literal.is_empty() {
                    out.push(Token::Literal(std::mem::take(&mut literal)));
                }
                out.push(Token::Macro(macro_expand(&inner)?));
            }
            Some(c) => {
                return Err(format!(
                    "`%{c}` is not a macro (use %%, %_, %- or %{{...}})"
                ))
            }
            None => return Err("`%` at the end of a macro string".into()),
        }
    }
    if !literal.is_empty() {
        out.push(Token::Literal(literal));
    }
    Ok(out)
}

/// The part between `%{` and `}`: letter, optional digits, optional `r`, delimiters.
fn macro_expand(inner: &str) -> Result<MacroExpand, String> {
    let mut chars = inner.chars().peekable();
    let raw = chars
        .next()
        .ok_or_else(|| "empty macro `%{}`".to_string())?;
    let letter = raw.to_ascii_lowercase();
    if !"slodiphvcrt".contains(letter) || !raw.is_ascii_alphabetic() {
        return Err(format!("unknown macro letter `{raw}`"));
    }
    let mut digits = String::new();
    while let Some(d) = chars.next_if(char::is_ascii_digit) {
        digits.push(d);
    }
    let keep = if digits.is_empty() {
        None
    } else {
        // More parts than a name can have means "all of them".
        let n = digits.parse::<usize>().unwrap_or(usize::MAX);
        if n == 0 {
            return Err(format!("bad digit transformer `{digits}`"));
        }
        Some(n)
    };
    let reverse = chars.next_if(|c| *c == 'r' || *c == 'R').is_some();
    let delimiters: String = chars.collect();
    if let Some(bad) = delimiters.chars().find(|c| !".-+,/_=".contains(*c)) {
        return Err(format!("bad macro delimiter `{bad}`"));
    }
    Ok(MacroExpand {
        letter,
        escape: raw.is_ascii_uppercase(),
        keep,
        reverse,
        delimiters,
    })
}

/// Checks a macro-string. `explanation` allows the letters `c r t`, which RFC 7208 §7.2
/// reserves for explanation strings, and spaces.
pub fn check_macro_string(s: &str, explanation: bool) -> Result<(), String> {
    if let Some(c) = s
        .chars()
        .find(|c| !(('\x21'..='\x7e').contains(c) || (explanation && *c == ' ')))
    {
        return Err(format!("character {c:?} not allowed in `{s}`"));
    }
    if !s.contains('%') {
        return Ok(());
    }
    for t in tokens(s)? {
        if let Token::Macro(m) = t {
            if !explanation && "crt".contains(m.letter) {
                return Err(format!(
                    "macro letter `{}` is only allowed in explanation strings",
                    m.letter
                ));
            }
        }
    }
    Ok(())
}

/// The values the macro letters stand for, in one `check_host()` call.
#[derive(Debug, Clone)]
pub struct MacroContext<'a> {
    /// `s`: the sender, `local@domain`.
    pub sender: &'a str,
    /// `l`
    pub local: &'a str,
    /// `o`
    pub sender_domain: &'a str,
    /// `d`: the domain whose record is being evaluated.
    pub domain: &'a str,
    /// `i`, `c` and `v`.
    pub ip: IpAddr,
    /// `h`
    pub helo: &'a str,
    /// `p`: the validated name, or "unknown".
    pub validated: &'a str,
    /// `r`
    pub receiver: &'a str,
    /// `t`
    pub timestamp: u64,
}

/// Whether expanding `s` needs the `%{p}` value (which costs DNS queries).
pub fn uses_validated_name(s: &str) -> bool {
    tokens(s).is_ok_and(|ts| {
        ts.iter()
            .any(|t| matches!(t, Token::Macro(m) if m.letter == 'p'))
    })
}

/// Expands a macro-string (§7.3, §7.4). `explanation` allows `c r t`.
pub fn expand(s: &str, ctx: &MacroContext<'_>, explanation: bool) -> Result<String, String> {
    if !s.contains('%') {
        return Ok(s.to_string());
    }
    let mut out = String::new();
    for t in tokens(s)? {
        match t {
            Token::Literal(l) => out.push_str(&l),
            Token::Macro(m) => {
                let value = match m.letter {
                    's' => ctx.sender.to_string(),
                    'l' => ctx.local.to_string(),
                    'o' => ctx.sender_domain.to_string(),
                    'd' => ctx.domain.to_string(),
                    'i' => dotted(ctx.ip),
                    'p' => ctx.validated.to_string(),
                    'v' => match ctx.ip {
                        IpAddr::V4(_) => "in-addr".into(),
                        IpAddr::V6(_) => "ip6".into(),
                    },
                    'h' => ctx.helo.to_string(),
                    'c' if explanation => ctx.ip.to_string(),
                    'r' if explanation => ctx.receiver.to_string(),
                    't' if explanation => ctx.timestamp.to_string(),
                    other => {
                        return Err(format!(
                            "macro letter `{other}` is only allowed in explanation strings"
                        ))
                    }
                };
                let value = transform(&value, &m);
                if m.escape {
                    url_escape(&value, &mut out);
                } else {
                    out.push_str(&value);
                }
            }
        }
    }
    Ok(out)
}

/// `%{i}`: dotted quad, or dot-separated nibbles for IPv6 (§7.3).
fn dotted(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => nibbles(v6)
            .iter()
            // Upper-case hex: the case is unspecified, and the RFC 7208 test suite's
            // explanations expect it.
            .map(|n| {
                char::from_digit(u32::from(*n), 16)
                    .unwrap_or('0')
                    .to_ascii_uppercase()
                    .to_string()
            })
            .collect::<Vec<_>>()
            .join("."),
    }
}

/// Split on the delimiters, optionally reverse, keep the rightmost parts, join with dots.
fn transform(value: &str, m: &MacroExpand) -> String {
    if m.keep.is_none() && !m.reverse && m.delimiters.chars().all(|c| c == '.') {
        return value.to_string();
    }
    let delimiters = if m.delimiters.is_empty() {
        "."
    } else {
        m.delimiters.as_str()
    };
    let mut parts: Vec<&str> = value.split(|c| delimiters.contains(c)).collect();
    if m.reverse {
        parts.reverse();
    }
    if let Some(n) = m.keep {
        let skip = parts.len().saturating_sub(n);
        parts.drain(..skip);
    }
    parts.join(".")
}

/// RFC 3986 percent-encoding of everything but the unreserved characters.
fn url_escape(value: &str, out: &mut String) {
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// §7.3: an expanded name longer than 253 octets loses labels from the left until it
/// fits.
pub fn truncate_name(name: &str) -> &str {
    let mut rest = name;
    while rest.len() > 253 {
        match rest.split_once('.') {
            Some((_, tail)) => rest = tail,
            None => return "",
        }
    }
    rest
}

pub fn has_macros(s: &str) -> bool {
    s.contains('%')
}

/// RFC 7208 §7.1 `toplabel`: letters, digits and inner hyphens, not all digits.
pub fn is_toplabel(top: &str) -> bool {
    !top.is_empty()
        && top.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
        && !top.starts_with('-')
        && !top.ends_with('-')
        && (top.bytes().any(|c| c.is_ascii_alphabetic()) || top.contains('-'))
}

/// A domain-spec: a macro-string ending in `.toplabel` (optionally a final dot) or in a
/// macro expansion.
pub fn check_domain_spec(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("missing domain".into());
    }
    check_macro_string(s, false)?;
    // A trailing dot is ignored for domains, after a macro as after a toplabel.
    let d = s.strip_suffix('.').unwrap_or(s);
    if d.ends_with('}') {
        return Ok(());
    }
    let labels: Vec<&str> = d.split('.').collect();
    if labels.len() < 2 {
        return Err(format!("`{s}` is not a multi-label domain name"));
    }
    let top = labels.last().copied().unwrap_or("");
    if !is_toplabel(top) {
        return Err(format!("`{top}` is not a valid top label in `{s}`"));
    }
    if !has_macros(d) {
        for label in &labels {
            if label.is_empty() {
                return Err(format!("empty label in `{s}`"));
            }
            if label.len() > 63 {
                return Err(format!("label longer than 63 octets in `{s}`"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macro_strings() {
        assert!(check_macro_string("%{i}._spf.%{d}", false).is_ok());
        assert!(check_macro_string("%{ir}.%{v}._spf.%{d2}", false).is_ok());
        assert!(check_macro_string("%{l1r-}.%{S}", false).is_ok());
        assert!(check_macro_string("a%%b%_c%-d", false).is_ok());
        assert!(check_macro_string("%{x}", false).is_err());
        assert!(check_macro_string("%{c}", false).is_err());
        assert!(check_macro_string("%{c} %{r} %{t}", true).is_ok());
        assert!(check_macro_string("%{d", false).is_err());
        assert!(check_macro_string("%d", false).is_err());
        assert!(check_macro_string("%", false).is_err());
        assert!(check_macro_string("%{d0}", false).is_err());
        assert!(check_macro_string("%{d2r!}", false).is_err());
        assert!(check_macro_string("%{}", false).is_err());
    }

    #[test]
    fn domain_specs() {
        assert!(check_domain_spec("_spf.google.com").is_ok());
        assert!(check_domain_spec("example.com.").is_ok());
        assert!(check_domain_spec("%{i}.bl.%{d}").is_ok());
        assert!(check_domain_spec("%{d}").is_ok());
        assert!(check_domain_spec("com").is_err());
        assert!(check_domain_spec("example.123").is_err());
        assert!(check_domain_spec("a..example.com").is_err());
        assert!(check_domain_spec("").is_err());
        assert!(check_domain_spec("exa mple.com").is_err());
    }
}
