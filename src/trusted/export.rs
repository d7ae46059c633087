//! CSV and JSON forms of the list, and reading address lists for import.
//!
//! CSV columns: `address,domain,count,first_seen,last_seen,senders,origin`, times in
//! RFC 3339 UTC.

use super::model::TrustedRecipient;
use crate::envelope::Millis;

pub const CSV_HEADER: &str = "address,domain,count,first_seen,last_seen,senders,origin";

/// Parses `2026-11-01`, `2026-11-01T12:00:00Z`, or a duration back from now (`7d`).
pub fn parse_since(text: &str, now: Millis) -> Result<Millis, String> {
    let t = text.trim();
    if let Ok(d) = crate::config::Dur::parse(t) {
        return Ok(now.saturating_sub(d.0.as_millis() as u64));
    }
    let full = if t.len() == 10 {
        format!("{t}T00:00:00Z")
    } else {
        t.to_string()
    };
    mail_parser::DateTime::parse_rfc3339(&full)
        .map(|d| (d.to_timestamp().max(0) as u64) * 1000)
        .ok_or_else(|| {
            format!("`{t}` is neither a date (2026-11-01, RFC 3339) nor a duration (7d)")
        })
}

/// Cells a spreadsheet would run as a formula (`=cmd|'/C calc'!A0`) begin with these.
const FORMULA_START: &[char] = &['=', '+', '-', '@', '\t', '\r'];

/// One CSV cell. A value that begins like a formula gets a leading `'`, so a
/// spreadsheet shows it as text (CSV injection); `read_addresses` takes it off again.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(FORMULA_START) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// The value of a cell `csv_field` wrote.
fn unguarded(cell: String) -> String {
    match cell.strip_prefix('\'') {
        Some(rest) if rest.starts_with(FORMULA_START) => rest.to_string(),
        _ => cell,
    }
}

pub fn csv_row(e: &TrustedRecipient) -> String {
    format!(
        "{},{},{},{},{},{},{}\r\n",
        csv_field(&e.address),
        csv_field(&e.domain),
        e.count,
        crate::envelope::rfc3339(e.first_seen),
        crate::envelope::rfc3339(e.last_seen),
        e.senders,
        e.origin.label()
    )
}

/// First field of each CSV line that looks like an address (a header line is skipped).
pub fn read_addresses(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| first_field(line.trim()))
        .map(unguarded)
        .filter(|f| f.contains('@'))
        .collect()
}

fn first_field(line: &str) -> Option<String> {
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    if let Some(rest) = line.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = rest.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    out.push('"');
                    chars.next();
                } else {
                    return Some(out);
                }
            } else {
                out.push(c);
            }
        }
        return None;
    }
    Some(line.split(',').next().unwrap_or("").trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_round_trip_of_addresses() {
        let e = TrustedRecipient {
            address: "\"a,b\"@x.test".into(),
            domain: "x.test".into(),
            count: 2,
            first_seen: 0,
            last_seen: 86_400_000,
            senders: 1,
            origin: super::super::model::Origin::Learned,
        };
        let text = format!(
            "{CSV_HEADER}\r\n{}plain@y.test,y.test,1\r\n# comment\r\n",
            csv_row(&e)
        );
        assert_eq!(
            read_addresses(&text),
            vec!["\"a,b\"@x.test".to_string(), "plain@y.test".to_string()]
        );
        assert!(csv_row(&e).contains("1970-01-02T00:00:00Z"));
    }

    /// A recipient a spreadsheet would run as a formula is written as text, and read
    /// back as it was.
    #[test]
    fn formula_cells_are_guarded() {
        let e = |address: &str| TrustedRecipient {
            address: address.into(),
            domain: "x.test".into(),
            count: 1,
            first_seen: 0,
            last_seen: 0,
            senders: 1,
            origin: super::super::model::Origin::Learned,
        };
        let evil = "=cmd|'/Ccalc'!A0@x.test";
        let row = csv_row(&e(evil));
        assert!(row.starts_with("'=cmd|"), "{row}");
        for start in ["+", "-", "@", "\t", "\r"] {
            let row = csv_row(&e(&format!("{start}a@x.test")));
            let cell = row.trim_start_matches('"');
            assert!(cell.starts_with('\''), "{start:?}: {row:?}");
        }
        assert_eq!(read_addresses(&row), vec![evil.to_string()]);
        assert_eq!(
            read_addresses(&csv_row(&e("'quoted@x.test"))),
            vec!["'quoted@x.test".to_string()],
            "a quote that guards nothing stays"
        );
    }

    #[test]
    fn since_forms() {
        let now = 10 * 86_400_000;
        assert_eq!(parse_since("7d", now).unwrap(), 3 * 86_400_000);
        assert_eq!(parse_since("1970-01-03", now).unwrap(), 2 * 86_400_000);
        assert_eq!(
            parse_since("1970-01-03T00:00:10Z", now).unwrap(),
            2 * 86_400_000 + 10_000
        );
        assert!(parse_since("last week", now).is_err());
    }
}
