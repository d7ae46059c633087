//! The onboarding "Share" mail, from outside: `POST /api/v1/onboarding/share`, the
//! dashboard's form and `smartrelay onboarding share` queue a message through the
//! relay's own spool; it reaches a real upstream (aiosmtpd) and is read back with a real
//! MIME parser (mail-parser).

mod support;

use std::time::Duration;

use mail_parser::{MessageParser, MimeHeaders};
use serde_json::{json, Value};
use support::dns::Dns;
use support::*;

const T: Duration = Duration::from_secs(20);
const RECOMMENDED_OTHER: &str = "v=spf1 include:eu._netblocks.mimecast.com ip4:192.0.2.10 ~all";

fn dns() -> Dns {
    Dns::start(&[
        (
            "mimecast.com",
            "eu._netblocks IN TXT \"v=spf1 ip4:198.51.100.0/24 ~all\"\n",
        ),
        (
            "test",
            concat!(
                "example IN TXT \"v=spf1 include:eu._netblocks.mimecast.com -all\"\n",
                // The include is not first: a finding, and a recommended record.
                "other IN TXT \"v=spf1 ip4:192.0.2.10 include:eu._netblocks.mimecast.com ~all\"\n",
            ),
        ),
    ])
}

fn start(dir: &std::path::Path, dns: &Dns, up: &Upstream) -> Relay {
    let cfg = Cfg::new(dir, &up.addr())
        .set("access", "domains", "[\"example.test\", \"other.test\"]")
        .set("dns", "nameservers", &format!("[\"{}\"]", dns.addr));
    Relay::start(&cfg)
}

#[test]
fn share_mails_every_domains_instructions_as_text_and_html() {
    let dir = tmpdir("share-api");
    let (dns, up) = (dns(), Upstream::start(&dir, &[]));
    let relay = start(&dir, &dns, &up);

    let (status, v) = post_json(
        &relay.url("/api/v1/onboarding/share"),
        &json!({"to": "dns-admin@partner.test"}),
    );
    assert_eq!(status, 202, "{v}");
    let queue_id = v["queue_id"].as_str().unwrap().to_string();
    assert_eq!(v["domains"], json!(["example.test", "other.test"]));

    let got = up.wait_messages(1, T);
    assert_eq!(got.len(), 1);
    let (envelope, data) = &got[0];
    assert_eq!(
        envelope["mail_from"], "postmaster@example.test",
        "{envelope}"
    );
    assert_eq!(envelope["rcpt_tos"], json!(["dns-admin@partner.test"]));

    let msg = MessageParser::default()
        .parse(data)
        .expect("a MIME message");
    let from = msg.from().and_then(|a| a.first()).unwrap();
    assert_eq!(from.address(), Some("postmaster@example.test"));
    assert_eq!(
        msg.to().and_then(|a| a.first()).unwrap().address(),
        Some("dns-admin@partner.test")
    );
    let message_id = msg.message_id().expect("Message-ID");
    assert!(message_id.starts_with(&queue_id), "{message_id}");
    assert!(msg.date().is_some(), "Date");
    assert_eq!(
        msg.header_raw("Auto-Submitted").map(str::trim),
        Some("auto-generated")
    );
    // multipart/alternative: a text part and an HTML part.
    let ct = msg.content_type().unwrap();
    assert_eq!(
        (ct.ctype(), ct.subtype()),
        ("multipart", Some("alternative"))
    );
    let text = msg.body_text(0).expect("text part").into_owned();
    let html = msg.body_html(0).expect("HTML part").into_owned();
    assert!(msg.text_bodies().count() == 1 && msg.html_bodies().count() == 1);
    // Each domain: its record, what is wrong, the record to publish, how to verify.
    let (_, example) = relay.get("/api/v1/onboarding/spf/example.test");
    let (_, other) = relay.get("/api/v1/onboarding/spf/other.test");
    assert_eq!(other["recommended"], RECOMMENDED_OTHER, "{other}");
    for report in [&example, &other] {
        let domain = report["domain"].as_str().unwrap();
        let recommended = report["recommended"].as_str().unwrap();
        assert!(text.contains(&format!("SPF for {domain}")), "{text}");
        assert!(text.lines().any(|l| l.trim() == recommended), "{text}");
        assert!(text.contains(&format!("dig +short TXT {domain}")), "{text}");
        for record in report["records"].as_array().unwrap() {
            assert!(text.contains(record.as_str().unwrap()), "{text}");
        }
        assert!(
            html.contains(&format!("<pre class=\"recommended\">{recommended}</pre>")),
            "{html}"
        );
    }
    let not_first = other["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["code"] == "gateway_include_not_first")
        .expect("the not-first finding");
    assert!(
        text.contains(not_first["message"].as_str().unwrap()),
        "{text}"
    );

    // System mail: delivered, and nobody became a trusted sender through it.
    assert!(relay.wait_queue_empty(T));
    assert!(wait_until(T, || relay.trusted_recorded() >= 1.0));
    let (_, trusted) = relay.get("/api/v1/trusted-senders");
    assert_eq!(trusted["entries"], json!([]), "{trusted}");
}

#[test]
fn bad_input_is_400_and_nothing_is_queued() {
    let dir = tmpdir("share-bad");
    let (dns, up) = (dns(), Upstream::start(&dir, &[]));
    let relay = start(&dir, &dns, &up);
    let url = relay.url("/api/v1/onboarding/share");
    for (body, says) in [
        (json!({}), "\"to\" is required"),
        (json!({"to": "dns-admin"}), "not a valid address"),
        (
            json!({"to": "dns admin@partner.test"}),
            "not a valid address",
        ),
        (
            json!({"to": "dns-admin@partner.test", "domains": ["unknown.test"]}),
            "unknown.test is not one of the relay's domains",
        ),
    ] {
        let (status, v) = post_json(&url, &body);
        assert_eq!(status, 400, "{body} -> {v}");
        assert!(v["error"].as_str().unwrap().contains(says), "{body} -> {v}");
    }
    let (status, _) = post_body(&url, "application/json", "{not json");
    assert_eq!(status, 400);
    assert!(relay.queue().is_empty());
    let out = relay.cli(&["onboarding", "share", "--to", "nobody"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("400"));
    assert!(relay.queue().is_empty());
    assert!(up.messages().is_empty());
}

#[test]
fn the_cli_and_the_dashboard_form_share_chosen_domains() {
    let dir = tmpdir("share-cli");
    let (dns, up) = (dns(), Upstream::start(&dir, &[]));
    let relay = start(&dir, &dns, &up);

    let out = relay.cli(&[
        "onboarding",
        "share",
        "--to",
        "dns-admin@partner.test",
        "--domain",
        "other.test",
    ]);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.starts_with("SPF instructions for other.test queued for dns-admin@partner.test as "),
        "{said}"
    );
    let got = up.wait_messages(1, T);
    let msg = MessageParser::default().parse(&got[0].1).unwrap();
    assert_eq!(
        msg.from().and_then(|a| a.first()).unwrap().address(),
        Some("postmaster@other.test")
    );
    let text = msg.body_text(0).unwrap();
    assert!(text.contains(RECOMMENDED_OTHER));
    assert!(
        !text.contains("SPF for example.test"),
        "only the chosen domain"
    );

    // The dashboard shows the form, and the form posts what a browser sends.
    let (_, page) = http_text("GET", &relay.url("/"), None);
    assert!(
        page.contains(
            "<form method=\"post\" action=\"/api/v1/onboarding/share\" id=\"share-form\">"
        ),
        "{page}"
    );
    let dashboard = Dashboard::open(&relay, None);
    let (status, answer) = dashboard.post_form(
        "/api/v1/onboarding/share",
        &[
            ("to", "hostmaster@partner.test"),
            ("domains", "example.test"),
        ],
    );
    assert_eq!(status, 202, "{answer}");
    assert!(
        answer.contains("queued for hostmaster@partner.test"),
        "{answer}"
    );
    let got = up.wait_messages(2, T);
    assert_eq!(got.len(), 2);
    let v: Value = got[1].0.clone();
    assert_eq!(v["rcpt_tos"], json!(["hostmaster@partner.test"]));
}
