//! Macro strings and domain-specs (RFC 7208 §7.1, §4.6.1): syntax only, no expansion.

/// Checks a macro-string. `explanation` allows the letters `c r t`, which RFC 7208 §7.2
/// reserves for explanation strings.
pub fn check_macro_string(s: &str, explanation: bool) -> Result<(), String> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => match b.get(i + 1) {
                Some(b'%' | b'_' | b'-') => i += 2,
                Some(b'{') => {
                    let close = s[i..]
                        .find('}')
                        .map(|k| i + k)
                        .ok_or_else(|| format!("unterminated macro in `{s}`"))?;
                    check_macro_expand(&s[i + 2..close], explanation)?;
                    i = close + 1;
                }
                Some(c) => {
                    return Err(format!(
                        "`%{}` is not a macro (use %%, %_, %- or %{{...}})",
                        *c as char
                    ))
                }
                None => return Err("`%` at the end of a macro string".into()),
            },
            0x21..=0x7E => i += 1,
            b' ' if explanation => i += 1,
            c => return Err(format!("character 0x{c:02x} not allowed in `{s}`")),
        }
    }
    Ok(())
}

/// The part between `%{` and `}`: letter, optional digits, optional `r`, delimiters.
fn check_macro_expand(inner: &str, explanation: bool) -> Result<(), String> {
    let mut chars = inner.chars();
    let letter = chars
        .next()
        .ok_or_else(|| "empty macro `%{}`".to_string())?
        .to_ascii_lowercase();
    match letter {
        's' | 'l' | 'o' | 'd' | 'i' | 'p' | 'h' | 'v' => {}
        'c' | 'r' | 't' if explanation => {}
        'c' | 'r' | 't' => {
            return Err(format!(
                "macro letter `{letter}` is only allowed in explanation strings"
            ))
        }
        other => return Err(format!("unknown macro letter `{other}`")),
    }
    let rest: &str = chars.as_str();
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits > 0
        && rest[..digits]
            .parse::<u32>()
            .map_or(true, |n| n == 0 || n > 128)
    {
        return Err(format!("bad digit transformer `{}`", &rest[..digits]));
    }
    let mut rest = &rest[digits..];
    if let Some(r) = rest.strip_prefix(['r', 'R']) {
        rest = r;
    }
    if let Some(bad) = rest.chars().find(|c| !".-+,/_=".contains(*c)) {
        return Err(format!("bad macro delimiter `{bad}`"));
    }
    Ok(())
}

pub fn has_macros(s: &str) -> bool {
    s.contains('%')
}

/// A domain-spec: a macro-string ending in `.toplabel` (optionally a final dot) or in a
/// macro expansion.
pub fn check_domain_spec(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("missing domain".into());
    }
    check_macro_string(s, false)?;
    if s.ends_with('}') {
        return Ok(());
    }
    let d = s.strip_suffix('.').unwrap_or(s);
    let labels: Vec<&str> = d.split('.').collect();
    if labels.len() < 2 {
        return Err(format!("`{s}` is not a multi-label domain name"));
    }
    let top = labels[labels.len() - 1];
    let top_ok = !top.is_empty()
        && top.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
        && !top.starts_with('-')
        && !top.ends_with('-')
        && (top.bytes().any(|c| c.is_ascii_alphabetic()) || top.contains('-'));
    if !top_ok {
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
