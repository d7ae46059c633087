//! Delivery: SPF-aware routing, failover, retries, per-recipient results, DSNs and queue
//! management, against real upstreams (aiosmtpd, smtp-sink, a second smartrelay) and a
//! real DNS server.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::dns::Dns;
use support::*;

const T: Duration = Duration::from_secs(20);

/// SPF records for the routing tests.
fn zones() -> Dns {
    Dns::start(&[
        (
            "mimecast.com",
            r#"
eu._netblocks IN TXT "v=spf1 ip4:198.51.100.0/24 ~all"
de._netblocks IN TXT "v=spf1 ip4:203.0.113.0/24 ~all"
us._netblocks IN TXT "v=spf1 ip4:192.0.2.128/25 ~all"
_netblocks IN TXT "v=spf1 include:eu._netblocks.mimecast.com include:de._netblocks.mimecast.com ~all"
"#,
        ),
        (
            "test",
            r#"
alpha IN TXT "v=spf1 include:de._netblocks.mimecast.com ~all"
bravo IN TXT "v=spf1 include:_spf.bravo.test -all"
_spf.bravo IN TXT "v=spf1 include:us._netblocks.mimecast.com ~all"
charlie IN TXT "v=spf1 include:_netblocks.mimecast.com ~all"
none IN TXT "v=spf1 ip4:192.0.2.1 -all"
example IN TXT "v=spf1 include:eu._netblocks.mimecast.com -all"
denied IN TXT "v=spf1 -ip4:198.51.100.0/24 include:eu._netblocks.mimecast.com -all"
"#,
        ),
    ])
}

fn spf_cfg(dir: &std::path::Path, dns: &Dns, eu: &str) -> Cfg {
    Cfg::new(dir, eu)
        .set(
            "access",
            "domains",
            "[\"example.test\", \"alpha.test\", \"bravo.test\", \"charlie.test\", \"none.test\"]",
        )
        .set("routing", "spf_aware", "true")
        .set("dns", "nameservers", &format!("[\"{}\"]", dns.addr))
}

/// A path as a TOML string.
fn toml_path(p: &std::path::Path) -> String {
    format!("\"{}\"", p.display())
}

fn send(relay: &Relay, from: &str, to: &[&str], body: &str) -> String {
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    queued_id(&c.mail(from, to, body))
}

#[test]
fn region_follows_each_domains_spf_include() {
    let dir = tmpdir("spf-routing");
    let dns = zones();
    let (eu, de, us) = (
        Upstream::start(&dir, &[]),
        Upstream::start(&dir, &[]),
        Upstream::start(&dir, &[]),
    );
    let cfg = spf_cfg(&dir, &dns, &eu.addr())
        .set(
            "routing.regions.de",
            "hosts",
            &format!("[\"{}\"]", de.addr()),
        )
        .set("routing.regions.de", "tls", "\"none\"")
        .set(
            "routing.regions.us",
            "hosts",
            &format!("[\"{}\"]", us.addr()),
        )
        .set("routing.regions.us", "tls", "\"none\"");
    let relay = Relay::start(&cfg);
    send(
        &relay,
        "a@alpha.test",
        &["x@partner.test"],
        "Subject: alpha\r\n\r\nde",
    );
    send(
        &relay,
        "b@bravo.test",
        &["x@partner.test"],
        "Subject: bravo\r\n\r\nus via a nested include",
    );
    send(
        &relay,
        "c@charlie.test",
        &["x@partner.test"],
        "Subject: charlie\r\n\r\nglobal include: default region",
    );
    assert_eq!(de.wait_messages(1, T)[0].0["mail_from"], "a@alpha.test");
    assert_eq!(us.wait_messages(1, T)[0].0["mail_from"], "b@bravo.test");
    assert_eq!(eu.wait_messages(1, T)[0].0["mail_from"], "c@charlie.test");
    // Empty queue: every attempt is over, so no further delivery can come.
    assert!(relay.wait_queue_empty(T));
    assert_eq!(
        (
            eu.messages().len(),
            de.messages().len(),
            us.messages().len()
        ),
        (1, 1, 1)
    );
    assert!(wait_until(T, || relay
        .log_json()
        .iter()
        .filter(|l| l["message"] == "routed")
        .count()
        >= 3));
    let routed: Vec<(String, String)> = relay
        .log_json()
        .iter()
        .filter(|l| l["message"] == "routed")
        .map(|l| {
            (
                l["route"].as_str().unwrap().to_string(),
                l["spf"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        routed.contains(&("de".into(), "authorized".into())),
        "{routed:?}"
    );
    assert!(routed.contains(&("us".into(), "authorized".into())));
}

#[test]
fn unauthorized_policy_default_and_fallback() {
    let dir = tmpdir("unauth-default");
    let dns = zones();
    let (eu, fb) = (Upstream::start(&dir, &[]), Upstream::start(&dir, &[]));
    let relay = Relay::start(&spf_cfg(&dir, &dns, &eu.addr()));
    send(
        &relay,
        "n@none.test",
        &["x@partner.test"],
        "Subject: d\r\n\r\nx",
    );
    assert_eq!(
        eu.wait_messages(1, T).len(),
        1,
        "default: relayed via the default region"
    );
    assert!(relay.wait_log(T, |l| l["message"] == "routed"
        && l["spf"] == "unauthorized"));

    let dir = tmpdir("unauth-fallback");
    let cfg = spf_cfg(&dir, &dns, &eu.addr())
        .set("routing", "on_unauthorized", "\"fallback\"")
        .set("routing.fallback", "hosts", &format!("[\"{}\"]", fb.addr()))
        .set("routing.fallback", "tls", "\"none\"");
    let relay = Relay::start(&cfg);
    send(
        &relay,
        "n@none.test",
        &["x@partner.test"],
        "Subject: f\r\n\r\nx",
    );
    assert_eq!(fb.wait_messages(1, T)[0].0["mail_from"], "n@none.test");
    // Authorized domains still go to their region.
    send(
        &relay,
        "e@example.test",
        &["x@partner.test"],
        "Subject: e\r\n\r\nx",
    );
    assert!(eu
        .wait_messages(2, T)
        .iter()
        .any(|(m, _)| m["mail_from"] == "e@example.test"));
    assert_eq!(fb.messages().len(), 1);
}

#[test]
fn unauthorized_policy_defer_and_reject() {
    let dir = tmpdir("unauth-defer");
    let dns = zones();
    let eu = Upstream::start(&dir, &[]);
    let relay = Relay::start(&spf_cfg(&dir, &dns, &eu.addr()).set(
        "routing",
        "on_unauthorized",
        "\"defer\"",
    ));
    let id = send(
        &relay,
        "n@none.test",
        &["x@partner.test"],
        "Subject: d\r\n\r\nx",
    );
    assert!(wait_until(T, || {
        let (_, m) = relay.get(&format!("/api/v1/queue/{id}"));
        m["attempts"].as_u64() >= Some(1)
    }));
    let (_, m) = relay.get(&format!("/api/v1/queue/{id}"));
    let reply = &m["recipients"][0]["reply"];
    assert_eq!(reply["code"], 451, "{m}");
    assert!(reply["text"]
        .as_str()
        .unwrap()
        .contains("include:eu._netblocks.mimecast.com"));
    assert_eq!(m["recipients"][0]["state"], "pending");
    assert!(eu.messages().is_empty());

    let dir = tmpdir("unauth-reject");
    let relay = Relay::start(&spf_cfg(&dir, &dns, &eu.addr()).set(
        "routing",
        "on_unauthorized",
        "\"reject\"",
    ));
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    let r = c.cmd("MAIL FROM:<n@none.test>");
    assert_eq!(r.code, 550);
    assert!(
        r.text().starts_with("5.7.1") && r.text().contains("include:eu._netblocks.mimecast.com"),
        "{r:?}"
    );
    c.expect("MAIL FROM:<e@example.test>", 250);
    c.expect("RSET", 250);
    // Naming the include is not enough: this record fails every gateway address, so
    // receivers would fail what the gateway relays.
    let r = c.cmd("MAIL FROM:<d@denied.test>");
    assert_eq!(r.code, 550, "{r:?}");
    c.expect("MAIL FROM:<>", 250);
}

#[test]
fn failover_when_the_first_host_is_down() {
    let dir = tmpdir("failover");
    let up = Upstream::start(&dir, &[]);
    let dead = free_port();
    let cfg = Cfg::new(&dir, "unused:25").set(
        "routing.regions.eu",
        "hosts",
        &format!("[\"127.0.0.1:{dead}\", \"{}\"]", up.addr()),
    );
    let relay = Relay::start(&cfg);
    for i in 0..4 {
        send(
            &relay,
            "a@example.test",
            &["x@partner.test"],
            &format!("Subject: {i}\r\n\r\nx"),
        );
    }
    assert_eq!(up.wait_messages(4, T).len(), 4);
    assert!(relay.wait_queue_empty(T));
    assert!(
        relay.wait_log(T, |l| l["message"] == "smart host failed, trying the next"
            && l["host"] == format!("127.0.0.1:{dead}").as_str())
    );
}

#[test]
fn greylisting_defers_then_the_retry_delivers() {
    let dir = tmpdir("greylist");
    let up = Upstream::start(&dir, &["--greylist"]);
    let relay = Relay::start(&Cfg::new(&dir, &up.addr()));
    let id = send(
        &relay,
        "a@example.test",
        &["x@partner.test"],
        "Subject: g\r\n\r\nx",
    );
    assert!(wait_until(T, || relay
        .get(&format!("/api/v1/queue/{id}"))
        .1["attempts"]
        == 1));
    let (_, m) = relay.get(&format!("/api/v1/queue/{id}"));
    assert_eq!(m["recipients"][0]["reply"]["code"], 451);
    let wait = m["next_attempt"].as_u64().unwrap() - m["received_at"].as_u64().unwrap();
    assert!(
        wait >= 60_000,
        "first retry after at least a minute, got {wait} ms"
    );
    assert!(up.messages().is_empty());
    // An operator does not wait the minute out: flush retries now.
    let out = relay.cli(&["queue", "flush"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(up.wait_messages(1, T).len(), 1);
    assert!(relay.wait_queue_empty(T));
}

/// Parses a DSN with Python's email package.
fn parse_dsn(data: &[u8], dir: &std::path::Path) -> Value {
    let path = dir.join("dsn.eml");
    std::fs::write(&path, data).unwrap();
    let out = python(&format!(
        r#"
import email, json
from email import policy
m = email.message_from_bytes(open(r"{}", "rb").read(), policy=policy.compat32)
parts = [p.get_content_type() for p in m.walk()]
status = [p for p in m.walk() if p.get_content_type() == "message/delivery-status"][0]
blocks = [dict(b.items()) for b in status.get_payload()]
orig = [p for p in m.walk() if p.get_content_type() in ("message/rfc822", "text/rfc822-headers")][0]
print(json.dumps({{"type": m.get_content_type(), "report_type": m.get_param("report-type"),
  "from": m["From"], "to": m["To"], "subject": m["Subject"], "auto": m["Auto-Submitted"],
  "parts": parts, "blocks": blocks, "original": orig.as_string()}}))
"#,
        path.display()
    ));
    serde_json::from_str(&out).unwrap()
}

#[test]
fn mixed_recipient_results_and_the_failure_dsn() {
    let dir = tmpdir("mixed");
    let up = Upstream::start(
        &dir,
        &[
            "--reply",
            "bad@partner.test=550 5.1.1 No such user",
            "--reply",
            "full@partner.test=452 4.2.2 Mailbox full",
        ],
    );
    let relay = Relay::start(&Cfg::new(&dir, &up.addr()));
    let id = send(
        &relay,
        "alice@example.test",
        &["good@partner.test", "bad@partner.test", "full@partner.test"],
        "Subject: mixed\r\nMessage-ID: <mixed@example.test>\r\n\r\nhello",
    );
    let got = up.wait_messages(2, T);
    let original = got
        .iter()
        .find(|(m, _)| m["mail_from"] == "alice@example.test")
        .expect("delivered");
    assert_eq!(
        original.0["rcpt_tos"],
        serde_json::json!(["good@partner.test"]),
        "one refusal did not block the others"
    );
    // aiosmtpd shows the null reverse path as "<>".
    let (meta, dsn) = got
        .iter()
        .find(|(m, _)| m["mail_from"] == "<>")
        .expect("a DSN to the sender");
    assert_eq!(meta["rcpt_tos"], serde_json::json!(["alice@example.test"]));
    let d = parse_dsn(dsn, &dir);
    assert_eq!(d["type"], "multipart/report");
    assert_eq!(d["report_type"], "delivery-status");
    assert_eq!(d["auto"], "auto-replied");
    let blocks = d["blocks"].as_array().unwrap();
    assert_eq!(blocks[0]["Reporting-MTA"], "dns; relay.test");
    let rcpt = &blocks[1];
    assert_eq!(rcpt["Final-Recipient"], "rfc822; bad@partner.test");
    assert_eq!(rcpt["Action"], "failed");
    assert_eq!(rcpt["Status"], "5.1.1");
    assert_eq!(rcpt["Diagnostic-Code"], "smtp; 550 5.1.1 No such user");
    assert_eq!(blocks.len(), 2, "only the failed recipient is reported");
    assert!(d["original"]
        .as_str()
        .unwrap()
        .contains("Message-ID: <mixed@example.test>"));
    // The deferred recipient stays queued for that recipient only.
    let (_, m) = relay.get(&format!("/api/v1/queue/{id}"));
    let states: Vec<&str> = m["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["delivered", "failed", "pending"]);
    assert_eq!(m["recipients"][2]["reply"]["code"], 452);
}

#[test]
fn no_dsn_for_the_null_sender() {
    let dir = tmpdir("null-dsn");
    let up = Upstream::start(
        &dir,
        &["--reply", "bad@partner.test=550 5.1.1 No such user"],
    );
    let relay = Relay::start(&Cfg::new(&dir, &up.addr()));
    send(
        &relay,
        "",
        &["bad@partner.test", "ok@partner.test"],
        "Subject: ndr\r\n\r\nx",
    );
    up.wait_messages(1, T);
    // A DSN is queued before the message it reports on leaves the queue, so an empty
    // queue means none was made.
    assert!(relay.wait_queue_empty(T));
    let msgs = up.messages();
    assert_eq!(msgs.len(), 1, "only the NDR itself, no bounce of a bounce");
    assert!(relay.wait_log(T, |l| l["status"] == "bounced"
        && l["to"] == "bad@partner.test"));
    assert!(!relay
        .log_json()
        .iter()
        .any(|l| l["message"] == "sender notified"));
}

#[test]
fn internal_recipients_take_the_internal_route() {
    let dir = tmpdir("internal");
    let (ext, int) = (Upstream::start(&dir, &[]), Upstream::start(&dir, &[]));
    let cfg = Cfg::new(&dir, &ext.addr())
        .set(
            "routing.internal",
            "hosts",
            &format!("[\"{}\"]", int.addr()),
        )
        .set("routing.internal", "tls", "\"none\"");
    let relay = Relay::start(&cfg);
    send(
        &relay,
        "a@example.test",
        &["colleague@example.test", "x@partner.test"],
        "Subject: split\r\n\r\nx",
    );
    assert_eq!(
        int.wait_messages(1, T)[0].0["rcpt_tos"],
        serde_json::json!(["colleague@example.test"])
    );
    assert_eq!(
        ext.wait_messages(1, T)[0].0["rcpt_tos"],
        serde_json::json!(["x@partner.test"])
    );
}

#[test]
fn the_message_arrives_byte_for_byte() {
    let dir = tmpdir("byte-exact");
    let up = Upstream::start(&dir, &[]);
    let relay = Relay::start(&Cfg::new(&dir, &up.addr()));
    let body = "Subject: exact\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nline after a lone dot\r\ncaf\u{e9} \u{2603}\r\n\r\n\r\ntrailing blank lines\r\n";
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    c.expect("MAIL FROM:<a@example.test> BODY=8BITMIME", 250);
    c.expect("RCPT TO:<x@partner.test>", 250);
    c.expect("DATA", 354);
    let stuffed = body.replace("\r\n.", "\r\n..");
    c.send(stuffed.as_bytes());
    c.send(b".\r\n");
    let id = queued_id(&c.reply());
    let got = up.wait_messages(1, T);
    let data = &got[0].1;
    // Exactly our trace header, then exactly what the client sent (unstuffed).
    assert!(
        data.ends_with(body.as_bytes()),
        "{}",
        String::from_utf8_lossy(data)
    );
    let trace = String::from_utf8_lossy(&data[..data.len() - body.len()]).into_owned();
    assert!(
        trace.starts_with("Received: from client.test ([127.0.0.1])"),
        "{trace}"
    );
    assert!(
        trace.contains(&format!("id {id}")) && trace.ends_with("+0000\r\n"),
        "{trace}"
    );
    assert_eq!(
        trace.matches("\r\n").count(),
        4,
        "one header of four lines: {trace}"
    );
    let opts = got[0].0["mail_options"].as_array().unwrap();
    assert!(opts.iter().any(|o| o == "BODY=8BITMIME"), "{opts:?}");
    assert!(
        opts.contains(&Value::String(format!("SIZE={}", data.len()))),
        "{opts:?}"
    );
}

#[test]
fn tls_to_the_upstream_opportunistic_required_and_failing() {
    let dir = tmpdir("upstream-tls");
    let certs = certs(&dir);
    let good = Upstream::start(
        &dir,
        &[
            "--cert",
            certs.cert.to_str().unwrap(),
            "--key",
            certs.key.to_str().unwrap(),
        ],
    );
    let rogue = Upstream::start(
        &dir,
        &[
            "--cert",
            certs.rogue_cert.to_str().unwrap(),
            "--key",
            certs.rogue_key.to_str().unwrap(),
        ],
    );
    // Opportunistic: STARTTLS with any certificate.
    let relay = Relay::start(&Cfg::new(&dir, &rogue.addr()).set(
        "routing.regions.eu",
        "tls",
        "\"opportunistic\"",
    ));
    send(
        &relay,
        "a@example.test",
        &["x@partner.test"],
        "Subject: o\r\n\r\nx",
    );
    assert_eq!(rogue.wait_messages(1, T)[0].0["tls"], true);
    // Required: verified against the route's CA.
    let dir2 = tmpdir("upstream-tls-req");
    let cfg = Cfg::new(&dir2, &good.addr())
        .set("routing.regions.eu", "tls", "\"required\"")
        .set("routing.regions.eu", "ca_file", &toml_path(&certs.ca))
        .set("delivery", "idle_timeout", "\"1s\"");
    let relay = Relay::start(&cfg);
    send(
        &relay,
        "a@example.test",
        &["x@partner.test"],
        "Subject: r\r\n\r\nx",
    );
    assert_eq!(good.wait_messages(1, T)[0].0["tls"], true);
    assert_eq!(
        relay.metric("smartrelay_upstream_tls_handshakes_total{kind=\"full\"}"),
        Some(1.0)
    );
    // A new connection to the same host resumes the session it issued (a TLS 1.3
    // ticket): the pool's idle session says QUIT after idle_timeout.
    assert!(wait_until(T, || good
        .rcpt_log()
        .iter()
        .any(|e| e["event"] == "quit")));
    send(
        &relay,
        "a@example.test",
        &["y@partner.test"],
        "Subject: r2\r\n\r\nx",
    );
    assert_eq!(good.wait_messages(2, T).len(), 2);
    assert_eq!(
        relay.metric("smartrelay_upstream_tls_handshakes_total{kind=\"resumed\"}"),
        Some(1.0),
        "{}",
        relay.metrics()
    );
    // Required, and the certificate does not verify: deferred, never sent in clear.
    let dir3 = tmpdir("upstream-tls-bad");
    let cfg = Cfg::new(&dir3, &rogue.addr())
        .set("routing.regions.eu", "tls", "\"required\"")
        .set("routing.regions.eu", "ca_file", &toml_path(&certs.ca));
    let relay = Relay::start(&cfg);
    let id = send(
        &relay,
        "a@example.test",
        &["x@partner.test"],
        "Subject: bad\r\n\r\nx",
    );
    assert!(wait_until(T, || relay
        .get(&format!("/api/v1/queue/{id}"))
        .1["attempts"]
        == 1));
    let (_, m) = relay.get(&format!("/api/v1/queue/{id}"));
    assert_eq!(m["recipients"][0]["reply"]["code"], 451, "{m}");
    assert_eq!(m["recipients"][0]["reply"]["esc"], "4.7.5");
    assert_eq!(
        rogue.messages().len(),
        1,
        "nothing more reached the unverified host"
    );
}

#[test]
fn smtputf8_message_to_an_upstream_without_it_bounces_with_5_6_7() {
    let dir = tmpdir("smtputf8");
    let sink = Sink::start(&dir, &[]);
    let relay = Relay::start(&Cfg::new(&dir, &sink.addr()));
    let out = python(&format!(
        r#"
import smtplib
s = smtplib.SMTP("127.0.0.1", {})
s.ehlo("c.test")
s.sendmail("alice@example.test", ["jos\u00e9@partner.test"], "Subject: caf\u00e9\r\n\r\nol\u00e1\r\n".encode(), mail_options=["SMTPUTF8"])
s.quit()
"#,
        relay.smtp.port()
    ));
    let _ = out;
    assert!(relay.wait_log(T, |l| l["status"] == "bounced"
        && l["reply"].as_str().unwrap_or("").contains("5.6.7")));
    // The DSN about it goes out (as UTF-8, to the same upstream) ...
    assert!(relay.wait_log(T, |l| l["message"] == "sender notified"));
}

#[test]
fn dsn_parameters_are_passed_to_a_dsn_capable_upstream() {
    let dir = tmpdir("dsn-params");
    let sink = Sink::start(&dir, &[]);
    let relay = Relay::start(&Cfg::new(&dir, &sink.addr()));
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    c.expect("MAIL FROM:<a@example.test> RET=HDRS ENVID=env+2B42", 250);
    c.expect(
        "RCPT TO:<x@partner.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@partner.test",
        250,
    );
    c.expect("DATA", 354);
    c.send(b"Subject: dsn\r\n\r\nx\r\n.\r\n");
    assert_eq!(c.reply().code, 250);
    assert!(wait_until(T, || sink.count() == 1));
    let dump = &sink.dumps()[0];
    assert!(
        dump.contains("RET=HDRS") && dump.contains("ENVID=env+2B42"),
        "{dump}"
    );
    assert!(
        dump.contains("NOTIFY=SUCCESS,FAILURE") && dump.contains("ORCPT=rfc822;x@partner.test"),
        "{dump}"
    );
    assert!(
        !dump.contains("SIZE="),
        "smtp-sink offers no SIZE, so none is sent: {dump}"
    );
}

#[test]
fn binarymime_goes_out_with_bdat_to_a_chunking_upstream() {
    // The upstream is a second smartrelay: a real server with CHUNKING and BINARYMIME.
    let dir_b = tmpdir("bdat-upstream");
    let relay_b = Relay::start(&Cfg::new(&dir_b, &format!("127.0.0.1:{}", free_port())));
    let dir_a = tmpdir("bdat-relay");
    let relay_a = Relay::start(&Cfg::new(&dir_a, &relay_b.smtp.to_string()));
    let payload: &[u8] = b"Subject: bin\r\nContent-Type: application/octet-stream\r\n\r\n\x00\x01\x02\r\n.\r\n\n.\nend\xff";
    let mut c = Smtp::connect(relay_a.smtp);
    c.greet();
    c.expect("MAIL FROM:<a@example.test> BODY=BINARYMIME", 250);
    c.expect("RCPT TO:<x@partner.test>", 250);
    c.send(format!("BDAT {} LAST\r\n", payload.len()).as_bytes());
    c.send(payload);
    queued_id(&c.reply());
    assert!(wait_until(T, || relay_b.queue().len() == 1));
    let q = relay_b.queue();
    let (env_b, data_b) =
        spool_message(&dir_b.join("spool"), q[0]["id"].as_str().unwrap()).unwrap();
    assert_eq!(env_b["body"], "binarymime");
    assert!(
        data_b.ends_with(payload),
        "the binary body crossed byte for byte"
    );
    assert!(relay_a.wait_queue_empty(T));
}

#[test]
fn expiry_and_delay_warning_dsns() {
    let dir = tmpdir("expiry");
    let dead = free_port();
    let cfg = Cfg::new(&dir, &format!("127.0.0.1:{dead}"))
        .set("queue", "max_age", "\"3s\"")
        .set("queue", "delay_warning", "\"1s\"");
    let relay = Relay::start(&cfg);
    let id = send(
        &relay,
        "alice@example.test",
        &["x@partner.test"],
        "Subject: late\r\n\r\nx",
    );
    std::thread::sleep(Duration::from_millis(1500));
    relay.post("/api/v1/queue/flush");
    assert!(relay.wait_log(T, |l| l["message"] == "sender notified"
        && l["kind"] == "delayed"));
    std::thread::sleep(Duration::from_millis(2000));
    relay.post("/api/v1/queue/flush");
    assert!(relay.wait_log(T, |l| l["message"] == "sender notified"
        && l["kind"] == "failed"));
    assert!(relay.wait_log(T, |l| l["message"] == "expired"
        && l["queue_id"] == id.as_str()));
    // What is left are the two DSNs, waiting for the same dead route.
    assert!(wait_until(T, || relay
        .queue()
        .iter()
        .all(|m| m["id"] != id.as_str())));
    let q = relay.queue();
    assert_eq!(q.len(), 2);
    assert!(q
        .iter()
        .all(|m| m["sender"] == "" && m["recipients"][0]["address"] == "alice@example.test"));
}

#[test]
fn queue_management_from_the_cli() {
    let dir = tmpdir("queue-cli");
    let port = free_port();
    let relay = Relay::start(&Cfg::new(&dir, &format!("127.0.0.1:{port}")));
    let a = send(
        &relay,
        "a@example.test",
        &["x@partner.test"],
        "Subject: a\r\n\r\nx",
    );
    let b = send(
        &relay,
        "a@example.test",
        &["y@partner.test"],
        "Subject: b\r\n\r\nx",
    );
    let list = relay.cli(&["queue", "list"]);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.status.success() && text.contains(&a) && text.contains(&b),
        "{text}"
    );
    assert!(relay.cli(&["queue", "hold", &a]).status.success());
    let show = relay.cli(&["queue", "show", &a, "--json"]);
    let v: Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(v["held"], true);
    assert!(relay.cli(&["queue", "remove", &b]).status.success());
    assert_eq!(relay.get(&format!("/api/v1/queue/{b}")).0, 404);
    let missing = relay.cli(&["queue", "show", "00000000000000000000"]);
    assert!(!missing.status.success());
    // The smart host comes up; the held message stays until released.
    let up = Upstream::start_on(&dir, port, &[]);
    let (_, flushed) = relay.post("/api/v1/queue/flush");
    assert_eq!(
        flushed["rescheduled"], 0,
        "a flush does not touch held messages"
    );
    assert!(up.messages().is_empty(), "held messages are not sent");
    assert!(relay.cli(&["queue", "release", &a]).status.success());
    assert_eq!(up.wait_messages(1, T).len(), 1);
    assert!(relay.wait_queue_empty(T));
}

#[test]
fn smtp_auth_to_the_upstream() {
    let dir = tmpdir("upstream-auth");
    let up = Upstream::start(&dir, &["--auth", "relay:s3cret"]);
    let cfg = Cfg::new(&dir, &up.addr()).set(
        "routing.regions.eu",
        "auth",
        "{ username = \"relay\", password_env = \"SR_TEST_PASSWORD\" }",
    );
    let path = cfg.write();
    let relay = Relay::start_with(&dir, &path, &[("SR_TEST_PASSWORD", "s3cret")]).unwrap();
    send(
        &relay,
        "a@example.test",
        &["x@partner.test"],
        "Subject: auth\r\n\r\nx",
    );
    assert_eq!(up.wait_messages(1, T)[0].0["auth"], "relay");
    drop(relay);
    // A wrong password defers (4.7.8) and sends nothing.
    let dir2 = tmpdir("upstream-auth-bad");
    let path = Cfg::new(&dir2, &up.addr())
        .set(
            "routing.regions.eu",
            "auth",
            "{ username = \"relay\", password_env = \"SR_TEST_PASSWORD\" }",
        )
        .write();
    let relay = Relay::start_with(&dir2, &path, &[("SR_TEST_PASSWORD", "wrong")]).unwrap();
    let id = send(
        &relay,
        "a@example.test",
        &["y@partner.test"],
        "Subject: auth\r\n\r\nx",
    );
    let tried = wait_until(T, || {
        relay.get(&format!("/api/v1/queue/{id}")).1["attempts"] == 1
    });
    let (_, m) = relay.get(&format!("/api/v1/queue/{id}"));
    assert!(tried, "{m:#}\n{}", relay.logs().join("\n"));
    assert_eq!(m["recipients"][0]["reply"]["esc"], "4.7.8", "{m}");
    assert_eq!(up.messages().len(), 1);
    // And a password variable that is not set is a configuration error.
    let out = Command::new(bin())
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("SR_TEST_PASSWORD"));
}

#[test]
fn a_host_that_never_greets_times_out_and_the_next_one_delivers() {
    let dir = tmpdir("greeting-timeout");
    // The kernel completes the handshake, nobody ever says 220.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up = Upstream::start(&dir, &[]);
    let cfg = Cfg::new(&dir, "x:25")
        .set(
            "routing.regions.eu",
            "hosts",
            &format!("[\"{}\", \"{}\"]", silent.local_addr().unwrap(), up.addr()),
        )
        .set("delivery", "connect_timeout", "\"1s\"");
    let relay = Relay::start(&cfg);
    let started = std::time::Instant::now();
    send(
        &relay,
        "a@example.test",
        &["x@partner.test"],
        "Subject: slow\r\n\r\nx",
    );
    assert_eq!(up.wait_messages(1, T).len(), 1);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "the silent host was tried first"
    );
    assert!(relay.wait_log(T, |l| l["error"]
        .as_str()
        .unwrap_or("")
        .contains("timed out during greeting")));
}

/// A reload keeps what SPF said: with DNS gone, mail of a domain learned before the
/// reload still goes to the region its record named, not to the default one.
#[test]
fn a_reload_keeps_the_spf_answers_through_a_dns_outage() {
    let dir = tmpdir("spf-reload");
    let dns = zones();
    let (eu, de) = (Upstream::start(&dir, &[]), Upstream::start(&dir, &[]));
    let cfg = spf_cfg(&dir, &dns, &eu.addr())
        .set(
            "routing.regions.de",
            "hosts",
            &format!("[\"{}\"]", de.addr()),
        )
        .set("routing.regions.de", "tls", "\"none\"");
    let relay = Relay::start(&cfg);
    send(
        &relay,
        "a@alpha.test",
        &["x@partner.test"],
        "Subject: one\r\n\r\nde",
    );
    assert_eq!(de.wait_messages(1, T).len(), 1);
    drop(dns);
    let (status, v) = relay.post("/api/v1/reload");
    assert_eq!(status, 200, "{v}");
    send(
        &relay,
        "a@alpha.test",
        &["x@partner.test"],
        "Subject: two\r\n\r\nstill de",
    );
    assert_eq!(de.wait_messages(2, T).len(), 2);
    assert!(relay.wait_queue_empty(T));
    assert!(
        eu.messages().is_empty(),
        "nothing went to the default region"
    );
}

/// Queues `n` messages over `sessions` parallel ingress sessions, faster than the smart
/// host takes them, so that every session the relay may open to it is in use.
fn flood(relay: &Relay, n: usize, sessions: usize) {
    let addr = relay.smtp;
    let workers: Vec<_> = (0..sessions)
        .map(|w| {
            std::thread::spawn(move || {
                let mut c = Smtp::connect(addr);
                c.greet();
                for i in (w..n).step_by(sessions) {
                    let r = c.mail(
                        "a@example.test",
                        &["x@partner.test"],
                        &format!("Subject: {i}\r\n\r\nx"),
                    );
                    assert_eq!(r.code, 250, "{r:?}");
                }
                c.cmd("QUIT");
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
}

fn session_limit(relay: &Relay, up: &Upstream) -> Option<f64> {
    relay.metric(&format!(
        "smartrelay_upstream_session_limit{{route=\"eu\",host=\"{}\"}}",
        up.addr()
    ))
}

/// `delivery.concurrency = "adaptive"`: a smart host that serves one message at a
/// time (each waits for the ones before it) keeps few sessions, where the fixed limit
/// opens all 32; a host whose time does not change with load (a far gateway) gets all
/// 32. Every message arrives either way.
#[test]
fn adaptive_concurrency_follows_the_smart_host() {
    let dir = tmpdir("adaptive-concurrency");
    let run = |name: &str, mode: &str, args: &[&str], n: usize| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let up = Upstream::start(&d, args);
        let cfg = Cfg::new(&d, &up.addr())
            .set("delivery", "max_connections_per_host", "32")
            .set("delivery", "concurrency", &format!("\"{mode}\""));
        let relay = Relay::start(&cfg);
        flood(&relay, n, 8);
        assert_eq!(up.wait_messages(n, Duration::from_secs(60)).len(), n);
        assert!(relay.wait_queue_empty(T));
        let opened = relay
            .metric("smartrelay_upstream_connections_total{route=\"eu\",tls=\"no\"}")
            .unwrap_or(0.0);
        (session_limit(&relay, &up), opened)
    };
    let serial = ["--data-delay", "0.02", "--serial"];

    let (limit, opened) = run("serial-adaptive", "adaptive", &serial, 300);
    let limit = limit.expect("the limit is published");
    // It overshoots once (the first transactions after the probe meet a short queue),
    // then settles where the host's queue stays short.
    assert!((2.0..=12.0).contains(&limit), "limit {limit}");
    assert!(opened < 20.0, "{opened} sessions opened");

    let (limit, opened) = run("serial-fixed", "fixed", &serial, 300);
    assert_eq!(limit, Some(32.0));
    assert!(opened > 24.0, "{opened} sessions opened");

    let (limit, _) = run("far-adaptive", "adaptive", &["--data-delay", "0.2"], 400);
    assert_eq!(limit, Some(32.0));
}
