//! The address grammar of RFC 5321 §4.1.2 (`Mailbox`, `Path`), below every stage that
//! takes an address from outside: ingress's `MAIL`/`RCPT`, and the admin's Share. Pure:
//! bytes in, an address or the reason it is not one out.

/// Parses `<[source-route:]local@domain>` and returns `local@domain` as written.
pub fn parse_path(path: &str) -> Result<String, &'static str> {
    let inner = path
        .strip_prefix('<')
        .and_then(|p| p.strip_suffix('>'))
        .ok_or("Address must be enclosed in <>")?;
    if inner.len() > 254 {
        return Err("Address too long");
    }
    // A source route (`@a,@b:`) is obsolete; RFC 5321 §4.1.1.3 says accept and ignore it.
    let mailbox = if inner.starts_with('@') {
        inner.split_once(':').ok_or("Bad source route")?.1
    } else {
        inner
    };
    let at = find_local_end(mailbox).ok_or("Address needs local@domain")?;
    let (local, domain) = (&mailbox[..at], &mailbox[at + 1..]);
    check_local(local)?;
    if !(crate::envelope::is_valid_domain(domain) || is_address_literal(domain)) {
        return Err("Invalid domain in address");
    }
    if domain.ends_with('.') {
        return Err("Invalid domain in address");
    }
    Ok(mailbox.to_string())
}

/// Position of the `@` that separates local part and domain (outside quotes).
fn find_local_end(mailbox: &str) -> Option<usize> {
    if mailbox.starts_with('"') {
        let b = mailbox.as_bytes();
        let mut i = 1;
        while i < b.len() {
            match b[i] {
                b'\\' => i += 1,
                b'"' => return (b.get(i + 1) == Some(&b'@')).then_some(i + 1),
                _ => {}
            }
            i += 1;
        }
        None
    } else {
        mailbox.rfind('@')
    }
}

fn check_local(local: &str) -> Result<(), &'static str> {
    if local.is_empty() {
        return Err("Empty local part");
    }
    if local.len() > 64 {
        return Err("Local part longer than 64 octets");
    }
    if let Some(q) = local.strip_prefix('"') {
        let body = q
            .strip_suffix('"')
            .ok_or("Unterminated quoted local part")?;
        let b = body.as_bytes();
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'\\' => {
                    if !matches!(b.get(i + 1), Some(32..=126)) {
                        return Err("Bad quoted-pair in local part");
                    }
                    i += 2;
                }
                32 | 33 | 35..=91 | 93..=126 => i += 1,
                c if c >= 0x80 => i += 1,
                _ => return Err("Bad character in quoted local part"),
            }
        }
        return Ok(());
    }
    for atom in local.split('.') {
        if atom.is_empty() {
            return Err("Empty atom in local part");
        }
        if !atom.chars().all(is_atext) {
            return Err("Bad character in local part");
        }
    }
    Ok(())
}

fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

/// A bare mailbox (`local@domain`, no angle brackets) by the same rules as a path, as
/// an operator types it.
pub fn parse_mailbox(mailbox: &str) -> Result<String, &'static str> {
    if mailbox.starts_with('<') || mailbox.starts_with('@') {
        return Err("Give the address as local@domain");
    }
    parse_path(&format!("<{mailbox}>"))
}

/// `[192.0.2.1]` or `[IPv6:2001:db8::1]`.
pub fn is_address_literal(s: &str) -> bool {
    let Some(inner) = s.strip_prefix('[').and_then(|s| s.strip_suffix(']')) else {
        return false;
    };
    if let Some(v6) = inner
        .strip_prefix("IPv6:")
        .or_else(|| inner.strip_prefix("ipv6:"))
    {
        return v6.parse::<std::net::Ipv6Addr>().is_ok();
    }
    inner.parse::<std::net::Ipv4Addr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailboxes() {
        assert_eq!(
            parse_mailbox("dns@example.test").unwrap(),
            "dns@example.test"
        );
        assert_eq!(parse_mailbox("zoë@bücher.test").unwrap(), "zoë@bücher.test");
        assert!(parse_mailbox("x@victim.test.").is_err(), "a trailing dot");
        assert!(parse_mailbox("<x@y.test>").is_err());
        assert!(parse_mailbox("x").is_err());
        assert!(parse_mailbox("a b@c.test").is_err());
        assert!(parse_mailbox(&format!("{}@c.test", "a".repeat(65))).is_err());
        assert_eq!(parse_path("<@relay.test:a@b.test>").unwrap(), "a@b.test");
        assert!(is_address_literal("[IPv6:2001:db8::1]"));
        assert!(!is_address_literal("[300.1.1.1]"));
    }
}
