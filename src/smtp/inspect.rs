//! What ingress learns from the message header: the hop count (mail loops), the
//! Message-ID, and whether it is an automatic message (never a trusted-sender signal).
//! Also builds our own `Received:` trace header (RFC 5321 §4.4).

use std::net::IpAddr;
use std::sync::OnceLock;

use mail_parser::{HeaderName, HeaderValue, MessageParser};

use crate::envelope::{rfc5322_date, ContentFlags, Millis, QueueId};

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Inspection {
    pub received_count: usize,
    pub message_id: Option<String>,
    /// For tracking (recorded only with `tracking.subjects`).
    pub subject: Option<String>,
    pub flags: ContentFlags,
}

fn parser() -> &'static MessageParser {
    static PARSER: OnceLock<MessageParser> = OnceLock::new();
    // Only the few headers we read are parsed; the rest are skipped cheaply but still
    // listed, which is all the hop count needs.
    PARSER.get_or_init(|| {
        MessageParser::default()
            .header_id(HeaderName::MessageId)
            .header_text(HeaderName::Subject)
            .header_content_type(HeaderName::ContentType)
            .ignore_header(HeaderName::Received)
            .default_header_raw()
    })
}

pub fn inspect(data: &[u8]) -> Inspection {
    let mut out = Inspection {
        flags: ContentFlags {
            eight_bit: !data.is_ascii(),
            ..ContentFlags::default()
        },
        ..Inspection::default()
    };
    let Some(message) = parser().parse_headers(data) else {
        return out;
    };
    for header in message.headers() {
        match &header.name {
            HeaderName::Received => out.received_count += 1,
            HeaderName::MessageId => {
                if let HeaderValue::Text(id) = &header.value {
                    out.message_id = Some(id.to_string());
                }
            }
            HeaderName::Subject => {
                if let HeaderValue::Text(s) = &header.value {
                    out.subject.get_or_insert_with(|| s.to_string());
                }
            }
            HeaderName::ContentType => {
                if let HeaderValue::ContentType(ct) = &header.value {
                    let is = |a: &str, b: &str| {
                        ct.ctype().eq_ignore_ascii_case(a)
                            && ct.subtype().is_some_and(|s| s.eq_ignore_ascii_case(b))
                    };
                    if is("multipart", "report") || is("message", "disposition-notification") {
                        out.flags.report = true;
                    }
                }
            }
            other => {
                let name = other.as_str();
                let value = header.value.as_text().unwrap_or("").trim();
                if is_auto_marker(name, value) {
                    out.flags.auto_reply = true;
                }
            }
        }
    }
    out
}

/// Automatic-message markers: RFC 3834 Auto-Submitted, the Precedence convention, and the
/// headers autoresponders (Exchange, Gmail vacation, vacation(1)) add.
fn is_auto_marker(name: &str, value: &str) -> bool {
    let value = value.to_ascii_lowercase();
    if name.eq_ignore_ascii_case("Auto-Submitted") {
        let keyword = value.split(';').next().unwrap_or("").trim();
        return !keyword.is_empty() && keyword != "no";
    }
    if name.eq_ignore_ascii_case("Precedence") {
        return matches!(value.as_str(), "bulk" | "junk" | "list" | "auto_reply");
    }
    ["X-Autoreply", "X-Autorespond", "X-Auto-Response"]
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h))
        && !value.is_empty()
        && value != "no"
}

/// Everything the trace header records about the hop.
pub struct Trace<'a> {
    pub helo: &'a str,
    pub ip: IpAddr,
    pub hostname: &'a str,
    pub esmtp: bool,
    pub tls: Option<&'a str>,
    pub smtputf8: bool,
    pub id: &'a QueueId,
    /// Named in a `for` clause only when there is exactly one (RFC 5321 §4.4 privacy).
    pub single_recipient: Option<&'a str>,
    pub now: Millis,
}

pub fn received_header(t: &Trace<'_>) -> Vec<u8> {
    let protocol = match (t.smtputf8, t.esmtp, t.tls.is_some()) {
        (true, _, true) => "UTF8SMTPS",
        (true, _, false) => "UTF8SMTP",
        (false, true, true) => "ESMTPS",
        (false, true, false) => "ESMTP",
        (false, false, true) => "SMTPS",
        (false, false, false) => "SMTP",
    };
    let ip = match t.ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("IPv6:{v6}"),
    };
    let mut h = format!("Received: from {} ([{ip}])\r\n\tby {}", t.helo, t.hostname);
    if let Some(tls) = t.tls {
        h.push_str(&format!(" ({tls})"));
    }
    h.push_str(&format!(" with {protocol} id {}", t.id));
    if let Some(rcpt) = t.single_recipient {
        h.push_str(&format!("\r\n\tfor <{rcpt}>"));
    }
    h.push_str(";\r\n\t");
    h.push_str(&rfc5322_date(t.now));
    h.push_str("\r\n");
    h.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_hops_and_reads_message_id() {
        let msg = b"Received: from a\r\nReceived: from b\r\n by c; x\r\nMessage-ID: <abc@d.test>\r\nSubject: hi\r\n\r\nReceived: not a header\r\n";
        let i = inspect(msg);
        assert_eq!(i.received_count, 2);
        assert_eq!(i.message_id.as_deref(), Some("abc@d.test"));
        assert!(!i.flags.auto_reply && !i.flags.report && !i.flags.eight_bit);
    }

    #[test]
    fn automatic_messages() {
        for header in [
            "Auto-Submitted: auto-replied",
            "Auto-Submitted: auto-generated; owner-email=\"x@y\"",
            "Precedence: bulk",
            "precedence: JUNK",
            "X-Autoreply: yes",
        ] {
            let msg = format!("{header}\r\nSubject: x\r\n\r\nbody\r\n");
            assert!(inspect(msg.as_bytes()).flags.auto_reply, "{header}");
        }
        for header in ["Auto-Submitted: no", "Precedence: first-class"] {
            let msg = format!("{header}\r\n\r\nbody\r\n");
            assert!(!inspect(msg.as_bytes()).flags.auto_reply, "{header}");
        }
        let dsn =
            b"Content-Type: multipart/report; report-type=delivery-status; boundary=x\r\n\r\n";
        assert!(inspect(dsn).flags.report);
        assert!(
            inspect("Subject: caf\u{e9}\r\n\r\n".as_bytes())
                .flags
                .eight_bit
        );
    }

    #[test]
    fn received_header_shape() {
        let id = QueueId::parse("0123456789ABCDEF0123").unwrap();
        let h = received_header(&Trace {
            helo: "exch.example.test",
            ip: "192.0.2.7".parse().unwrap(),
            hostname: "relay.example.test",
            esmtp: true,
            tls: Some("TLSv1.3"),
            smtputf8: false,
            id: &id,
            single_recipient: Some("bob@ext.test"),
            now: 1_796_000_000_000,
        });
        let h = String::from_utf8(h).unwrap();
        assert!(h.starts_with("Received: from exch.example.test ([192.0.2.7])\r\n\tby relay.example.test (TLSv1.3) with ESMTPS id 0123456789ABCDEF0123\r\n\tfor <bob@ext.test>;\r\n\t"), "{h}");
        assert!(h.ends_with("+0000\r\n"), "{h}");
        assert_eq!(inspect(h.as_bytes()).received_count, 1);
    }
}
