//! Delivery status notifications (RFC 3464 multipart/report, RFC 3461 semantics).

use crate::envelope::{
    rfc5322_date, BodyType, ClientInfo, ContentFlags, DeliveryState, Envelope, Millis, QueueId,
    Recipient, Ret,
};

/// Above this, a message whose sender did not ask for RET=FULL is returned as headers.
const FULL_RETURN_LIMIT: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DsnKind {
    Failed,
    Delayed,
    Relayed,
}

impl DsnKind {
    pub fn action(self) -> &'static str {
        match self {
            DsnKind::Failed => "failed",
            DsnKind::Delayed => "delayed",
            DsnKind::Relayed => "relayed",
        }
    }
}

/// Builds the DSN for `rcpts` of `env` as a new message from `<>` to the original sender.
pub fn build(
    kind: DsnKind,
    env: &Envelope,
    data: &[u8],
    state: &DeliveryState,
    rcpts: &[usize],
    hostname: &str,
    now: Millis,
) -> (Envelope, Vec<u8>) {
    let id = QueueId::generate();
    let boundary = format!("{id}/{hostname}");
    let message_id = format!("{id}.dsn@{hostname}");
    let utf8 = env.smtputf8;
    let subject = match kind {
        DsnKind::Failed => "Undelivered Mail Returned to Sender",
        DsnKind::Delayed => "Delayed Mail (still being retried)",
        DsnKind::Relayed => "Successful Mail Relay Notification",
    };
    let mut m = String::new();
    m.push_str(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"
    ));
    m.push_str(&format!("To: <{}>\r\n", env.sender));
    m.push_str(&format!("Subject: {subject}\r\n"));
    m.push_str(&format!("Date: {}\r\n", rfc5322_date(now)));
    m.push_str(&format!("Message-ID: <{message_id}>\r\n"));
    // RFC 3834 §5: so that autoresponders and the trusted list leave it alone.
    m.push_str("Auto-Submitted: auto-replied\r\n");
    m.push_str("MIME-Version: 1.0\r\n");
    m.push_str(&format!(
        "Content-Type: multipart/report; report-type={}; boundary=\"{boundary}\"\r\n",
        if utf8 {
            "global-delivery-status"
        } else {
            "delivery-status"
        }
    ));
    m.push_str("\r\nThis is a MIME-encapsulated message.\r\n\r\n");

    // Part 1: for people.
    m.push_str(&format!("--{boundary}\r\n"));
    m.push_str(
        "Content-Type: text/plain; charset=utf-8\r\nContent-Description: Notification\r\n\r\n",
    );
    m.push_str(&format!(
        "This is the mail system at host {hostname}.\r\n\r\n"
    ));
    m.push_str(match kind {
        DsnKind::Failed => "Your message could not be delivered to one or more recipients.\r\nIt is attached below.\r\n",
        DsnKind::Delayed => "Your message has not been delivered yet to one or more recipients.\r\nThe mail system will keep trying; you do not need to send it again.\r\n",
        DsnKind::Relayed => "Your message was relayed to a system that does not send delivery notifications.\r\n",
    });
    m.push_str("\r\n");
    for &i in rcpts {
        let r = &env.recipients[i];
        let why = state.rcpts[i]
            .reply
            .as_ref()
            .map(|r| r.to_string())
            .unwrap_or_default();
        m.push_str(&format!("<{}>: {}\r\n", r.address, why));
    }
    m.push_str("\r\n");

    // Part 2: for machines.
    m.push_str(&format!("--{boundary}\r\n"));
    m.push_str(&format!(
        "Content-Type: message/{}delivery-status\r\n\r\n",
        if utf8 { "global-" } else { "" }
    ));
    m.push_str(&format!("Reporting-MTA: dns; {hostname}\r\n"));
    if let Some(envid) = &env.envid {
        m.push_str(&format!("Original-Envelope-Id: {envid}\r\n"));
    }
    m.push_str(&format!(
        "Arrival-Date: {}\r\n",
        rfc5322_date(env.received_at)
    ));
    for &i in rcpts {
        m.push_str("\r\n");
        m.push_str(&recipient_fields(kind, &env.recipients[i], state, i, now));
    }
    m.push_str("\r\n");

    // Part 3: the original, as RET asks.
    m.push_str(&format!("--{boundary}\r\n"));
    let mut out = m.into_bytes();
    let full = match env.ret {
        Some(Ret::Full) => env.body != BodyType::BinaryMime,
        Some(Ret::Hdrs) => false,
        None => {
            kind == DsnKind::Failed
                && data.len() <= FULL_RETURN_LIMIT
                && env.body != BodyType::BinaryMime
        }
    };
    if full {
        let ctype = if utf8 {
            "message/global"
        } else {
            "message/rfc822"
        };
        out.extend_from_slice(
            format!("Content-Type: {ctype}\r\nContent-Description: Undelivered Message\r\n\r\n")
                .as_bytes(),
        );
        out.extend_from_slice(data);
        if !data.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
    } else {
        let ctype = if utf8 {
            "message/global-headers"
        } else {
            "text/rfc822-headers"
        };
        out.extend_from_slice(
            format!(
                "Content-Type: {ctype}\r\nContent-Description: Undelivered Message Headers\r\n\r\n"
            )
            .as_bytes(),
        );
        out.extend_from_slice(header_section(data));
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());

    let eight_bit = !out.is_ascii();
    let envelope = Envelope {
        id,
        sender: String::new(),
        recipients: vec![Recipient {
            address: env.sender.clone(),
            notify: None,
            orcpt: None,
        }],
        body: if eight_bit {
            BodyType::EightBitMime
        } else {
            BodyType::SevenBit
        },
        smtputf8: utf8,
        ret: None,
        envid: None,
        client: ClientInfo {
            ip: std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            helo: hostname.to_string(),
            tls: None,
        },
        received_at: now,
        size: out.len() as u64,
        message_id: Some(message_id),
        flags: ContentFlags {
            auto_reply: true,
            report: true,
            eight_bit,
        },
        generated_dsn: true,
        system: false,
        held: None,
    };
    (envelope, out)
}

fn recipient_fields(
    kind: DsnKind,
    r: &Recipient,
    state: &DeliveryState,
    i: usize,
    now: Millis,
) -> String {
    let st = &state.rcpts[i];
    let mut f = String::new();
    if let Some(orcpt) = &r.orcpt {
        if let Some((kind, addr)) = orcpt.split_once(';') {
            f.push_str(&format!(
                "Original-Recipient: {kind}; {}\r\n",
                xtext_decode(addr)
            ));
        }
    }
    let addr_type = if r.address.is_ascii() {
        "rfc822"
    } else {
        "utf-8"
    };
    f.push_str(&format!("Final-Recipient: {addr_type}; {}\r\n", r.address));
    f.push_str(&format!("Action: {}\r\n", kind.action()));
    let status = match (&st.reply, kind) {
        (Some(reply), DsnKind::Failed) => {
            let s = reply.status();
            // Action failed carries a permanent class even when the cause was expiry.
            if let Some(rest) = s.strip_prefix('4') {
                format!("5{rest}")
            } else {
                s
            }
        }
        (Some(reply), DsnKind::Delayed) => reply.status(),
        (_, DsnKind::Relayed) => "2.0.0".into(),
        (None, DsnKind::Failed) => "5.0.0".into(),
        (None, DsnKind::Delayed) => "4.0.0".into(),
    };
    f.push_str(&format!("Status: {status}\r\n"));
    if let Some(host) = &st.host {
        let name = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
        f.push_str(&format!(
            "Remote-MTA: dns; {}\r\n",
            name.trim_matches(['[', ']'])
        ));
    }
    if let Some(reply) = &st.reply {
        if st.host.is_some() {
            f.push_str(&format!("Diagnostic-Code: smtp; {reply}\r\n"));
        } else {
            f.push_str(&format!("Diagnostic-Code: X-smartrelay; {reply}\r\n"));
        }
    }
    f.push_str(&format!(
        "Last-Attempt-Date: {}\r\n",
        rfc5322_date(st.at.unwrap_or(now))
    ));
    f
}

/// The header section of a message (up to and including the blank line).
fn header_section(data: &[u8]) -> &[u8] {
    match data.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(p) => &data[..p + 2],
        None => data,
    }
}

fn xtext_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'+' {
            if let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{RcptState, RcptStatus, Reply};

    fn original() -> (Envelope, Vec<u8>) {
        let data =
            b"Received: from x\r\nSubject: hello\r\nMessage-ID: <m@a.test>\r\n\r\nbody line\r\n"
                .to_vec();
        let mut env = Envelope::for_test(
            "alice@example.test",
            &["bob@ext.test", "carol@ext.test"],
            data.len() as u64,
        );
        env.recipients[0].orcpt = Some("rfc822;Bob+2Bx@ext.test".into());
        env.envid = Some("ENV1".into());
        env.received_at = 1_700_000_000_000;
        env.message_id = Some("m@a.test".into());
        (env, data)
    }

    #[test]
    fn failure_report_fields() {
        let (env, data) = original();
        let mut state = DeliveryState::new(2, 0);
        state.rcpts[0] = RcptStatus {
            state: RcptState::Failed,
            reply: Some(Reply::new(550, "5.1.1", "User unknown")),
            host: Some("127.0.0.1:2526".into()),
            ..Default::default()
        };
        let (dsn, bytes) = build(
            DsnKind::Failed,
            &env,
            &data,
            &state,
            &[0],
            "relay.test",
            1_700_000_100_000,
        );
        let text = String::from_utf8(bytes).unwrap();
        assert!(dsn.sender.is_empty());
        assert_eq!(dsn.recipients[0].address, "alice@example.test");
        assert!(dsn.generated_dsn);
        for needle in [
            "Content-Type: multipart/report; report-type=delivery-status",
            "Reporting-MTA: dns; relay.test",
            "Original-Envelope-Id: ENV1",
            "Original-Recipient: rfc822; Bob+x@ext.test",
            "Final-Recipient: rfc822; bob@ext.test",
            "Action: failed",
            "Status: 5.1.1",
            "Remote-MTA: dns; 127.0.0.1",
            "Diagnostic-Code: smtp; 550 5.1.1 User unknown",
            "Content-Type: message/rfc822",
            "Subject: hello",
            "Auto-Submitted: auto-replied",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        assert!(
            !text.contains("carol"),
            "only the failed recipient is reported"
        );
        assert_eq!(dsn.size as usize, text.len());
    }

    #[test]
    fn ret_hdrs_returns_only_headers() {
        let (mut env, data) = original();
        env.ret = Some(Ret::Hdrs);
        let mut state = DeliveryState::new(2, 0);
        state.rcpts[1].reply = Some(Reply::new(451, "4.7.1", "Greylisted"));
        let (_, bytes) = build(DsnKind::Delayed, &env, &data, &state, &[1], "relay.test", 0);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.contains("Action: delayed") && text.contains("Status: 4.7.1"));
        assert!(text.contains("text/rfc822-headers"));
        assert!(!text.contains("body line"));
    }

    #[test]
    fn expired_temporary_status_becomes_permanent_class() {
        let (env, data) = original();
        let mut state = DeliveryState::new(2, 0);
        state.rcpts[1] = RcptStatus {
            state: RcptState::Failed,
            reply: Some(Reply::new(554, "4.4.7", "Delivery time expired")),
            ..Default::default()
        };
        let (_, bytes) = build(DsnKind::Failed, &env, &data, &state, &[1], "relay.test", 0);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.contains("Status: 5.4.7"), "{text}");
        assert!(text.contains("Diagnostic-Code: X-smartrelay; 554 4.4.7"));
    }
}
