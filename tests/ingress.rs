//! Ingress: the SMTP server as the organization's platforms see it, driven by real
//! clients (swaks, Python smtplib, a raw socket) against the real binary.

mod support;

use std::net::IpAddr;
use std::process::Command;
use std::time::Duration;

use support::*;

/// A relay whose smart host is a closed port: accepted mail stays in the queue.
/// The directory comes first so that it goes last, after the relay has stopped.
fn held_relay(name: &str) -> (TestDir, Relay, Cfg) {
    let dir = tmpdir(name);
    let cfg = Cfg::new(&dir, &format!("127.0.0.1:{}", free_port()));
    let relay = Relay::start(&cfg);
    (dir, relay, cfg)
}

#[test]
fn swaks_session_is_queued_with_received_header() {
    let (_dir, relay, cfg) = held_relay("swaks");
    let out = Command::new("swaks")
        .args([
            "--server",
            &relay.smtp.to_string(),
            "--from",
            "alice@example.test",
            "--to",
            "bob@partner.test",
        ])
        .args([
            "--helo",
            "exch01.example.test",
            "--header",
            "Subject: hello",
            "--body",
            "Hi Bob",
        ])
        .output()
        .expect("swaks");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let id = text
        .lines()
        .find_map(|l| l.split("queued as ").nth(1))
        .expect("250 with queue ID")
        .trim()
        .to_string();
    let (env, data) = spool_message(&cfg.dir.join("spool"), &id).expect("message on disk");
    assert_eq!(env["sender"], "alice@example.test");
    assert_eq!(env["recipients"][0]["address"], "bob@partner.test");
    assert_eq!(env["client"]["helo"], "exch01.example.test");
    let data = String::from_utf8(data).unwrap();
    assert!(
        data.starts_with(
            "Received: from exch01.example.test ([127.0.0.1])\r\n\tby relay.test with ESMTP id "
        ),
        "{data}"
    );
    assert!(data.contains(&format!("id {id}\r\n\tfor <bob@partner.test>;")));
    assert!(data.contains("Subject: hello\r\n") && data.contains("Hi Bob"));
    assert_eq!(env["size"].as_u64().unwrap() as usize, data.len());
}

#[test]
fn client_outside_allowed_ranges_cannot_queue_anything() {
    let dir = tmpdir("allowlist");
    let cfg = Cfg::new(&dir, &format!("127.0.0.1:{}", free_port())).set(
        "access",
        "allowed_ranges",
        "[\"127.0.0.1/32\"]",
    );
    let relay = Relay::start(&cfg);
    let mut c = Smtp::connect_from("127.0.0.2".parse::<IpAddr>().unwrap(), relay.smtp);
    let banner = c.reply();
    assert_eq!(banner.code, 554);
    assert!(banner.text().starts_with("5.7.1"), "{banner:?}");
    // Nothing the client sends is executed: every command but QUIT gets 503.
    c.send(b"EHLO evil.test\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<b@ext.test>\r\nDATA\r\n");
    for _ in 0..4 {
        assert_eq!(c.reply().code, 503);
    }
    assert_eq!(c.cmd("QUIT").code, 221);
    assert!(relay.queue().is_empty());
    assert!(spool_ids(&dir.join("spool")).is_empty());
    // The allowed address still gets in.
    let mut ok = Smtp::connect_from("127.0.0.1".parse::<IpAddr>().unwrap(), relay.smtp);
    ok.greet();
    // The refused source is remembered for the onboarding step.
    assert!(wait_until(Duration::from_secs(5), || {
        let (_, v) = relay.get("/api/v1/onboarding/outbound-ips");
        v["sources"].as_array().is_some_and(|s| {
            s.iter().any(|x| {
                x["ip"] == "127.0.0.2" && x["refused"].as_u64() >= Some(1) && x["allowed"] == false
            })
        })
    }));
    assert!(relay.log_json().iter().any(|l| l["message"]
        .as_str()
        .unwrap_or("")
        .contains("connection refused")
        && l["client"] == "127.0.0.2"));
}

#[test]
fn sender_domain_policy_and_null_sender() {
    let (_dir, relay, _) = held_relay("senders");
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    let r = c.cmd("MAIL FROM:<mallory@elsewhere.test>");
    assert_eq!(r.code, 550);
    assert!(r.text().starts_with("5.7.1"));
    c.expect("MAIL FROM:<Alice@EXAMPLE.Test>", 250);
    c.expect("RSET", 250);
    // Exchange sends its NDRs with the null sender.
    let r = c.mail(
        "",
        &["bob@partner.test"],
        "Subject: NDR\r\n\r\nundeliverable",
    );
    assert_eq!(r.code, 250);
    let q = relay.queue();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0]["sender"], "");
}

#[test]
fn size_and_recipient_limits() {
    let dir = tmpdir("limits");
    let cfg = Cfg::new(&dir, &format!("127.0.0.1:{}", free_port()))
        .set("server", "max_message_size", "2000")
        .set("server", "max_recipients", "3");
    let relay = Relay::start(&cfg);
    let mut c = Smtp::connect(relay.smtp);
    let ehlo = c.greet();
    assert!(ehlo.lines.iter().any(|l| l == "SIZE 2000"), "{ehlo:?}");
    let r = c.cmd("MAIL FROM:<a@example.test> SIZE=2001");
    assert_eq!((r.code, r.text().starts_with("5.3.4")), (552, true));
    c.expect("MAIL FROM:<a@example.test> SIZE=100", 250);
    for i in 0..3 {
        c.expect(&format!("RCPT TO:<r{i}@partner.test>"), 250);
    }
    let r = c.cmd("RCPT TO:<r9@partner.test>");
    assert_eq!((r.code, r.text().starts_with("4.5.3")), (452, true));
    // The declared size lied: the limit holds while reading.
    c.expect("DATA", 354);
    c.send(format!("Subject: big\r\n\r\n{}\r\n.\r\n", "x".repeat(5000)).as_bytes());
    let r = c.reply();
    assert_eq!((r.code, r.text().starts_with("5.3.4")), (552, true));
    // The session is still in step.
    c.expect("NOOP", 250);
    assert!(relay.queue().is_empty());
}

#[test]
fn bdat_binarymime_is_stored_byte_for_byte() {
    let (_dir, relay, cfg) = held_relay("bdat");
    let mut c = Smtp::connect(relay.smtp);
    let ehlo = c.greet();
    assert!(
        ehlo.lines.iter().any(|l| l == "CHUNKING") && ehlo.lines.iter().any(|l| l == "BINARYMIME")
    );
    let chunk1: &[u8] =
        b"Subject: binary\r\nContent-Type: application/octet-stream\r\n\r\n\x00\x01\r\n.\r\n";
    let chunk2: &[u8] = b"\n.\nQUIT\r\n\xff\xfe bare\rCR";
    // Pipelined, as Exchange does: MAIL, RCPT and both chunks in one write.
    let mut batch =
        b"MAIL FROM:<a@example.test> BODY=BINARYMIME\r\nRCPT TO:<b@partner.test>\r\n".to_vec();
    batch.extend_from_slice(format!("BDAT {}\r\n", chunk1.len()).as_bytes());
    batch.extend_from_slice(chunk1);
    batch.extend_from_slice(format!("BDAT {} LAST\r\n", chunk2.len()).as_bytes());
    batch.extend_from_slice(chunk2);
    c.send(&batch);
    assert_eq!(c.reply().code, 250);
    assert_eq!(c.reply().code, 250);
    assert_eq!(c.reply().code, 250, "first chunk");
    let id = queued_id(&c.reply());
    assert_eq!(c.cmd("QUIT").code, 221);
    let (env, data) = spool_message(&cfg.dir.join("spool"), &id).unwrap();
    assert_eq!(env["body"], "binarymime");
    let mut original = chunk1.to_vec();
    original.extend_from_slice(chunk2);
    assert!(data.ends_with(&original), "the chunks are stored exactly");
    assert!(data.starts_with(b"Received: "));
    // DATA is refused for BINARYMIME.
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    c.expect("MAIL FROM:<a@example.test> BODY=BINARYMIME", 250);
    c.expect("RCPT TO:<b@partner.test>", 250);
    c.expect("DATA", 503);
}

#[test]
fn bdat_chunk_without_recipients_is_consumed_and_refused() {
    let (_dir, relay, _) = held_relay("bdat-norcpt");
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    // The chunk's bytes look like commands; they must be swallowed as data.
    let chunk = b"MAIL FROM:<x@example.test>\r\n";
    c.send(format!("BDAT {} LAST\r\n", chunk.len()).as_bytes());
    c.send(chunk);
    assert_eq!(c.reply().code, 503);
    c.expect("NOOP", 250);
    assert!(relay.queue().is_empty());
}

#[test]
fn smuggling_variants_never_produce_two_messages() {
    let (_dir, relay, cfg) = held_relay("smuggling");
    for sep in ["\n.\n", "\r.\r", "\n.\r\n", "\r\n.\n"] {
        let mut c = Smtp::connect(relay.smtp);
        c.greet();
        c.expect("MAIL FROM:<a@example.test>", 250);
        c.expect("RCPT TO:<b@partner.test>", 250);
        c.expect("DATA", 354);
        let payload = format!(
            "Subject: first\r\n\r\nhello{sep}MAIL FROM:<boss@example.test>\r\nRCPT TO:<victim@partner.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nsmuggled\r\n.\r\n"
        );
        c.send(payload.as_bytes());
        let id = queued_id(&c.reply());
        // Exactly one reply: the next one answers our NOOP.
        assert_eq!(c.cmd("NOOP").code, 250, "separator {sep:?}");
        let (env, data) = spool_message(&cfg.dir.join("spool"), &id).unwrap();
        assert_eq!(env["recipients"].as_array().unwrap().len(), 1);
        assert_eq!(env["recipients"][0]["address"], "b@partner.test");
        let data = String::from_utf8_lossy(&data);
        assert!(
            data.contains("smuggled\r\n"),
            "the smuggled text stays inside the message"
        );
        let bare = data.replace("\r\n", "");
        assert!(
            !bare.contains('\n') && !bare.contains('\r'),
            "bare LF and bare CR normalized to CRLF: {data:?}"
        );
    }
    let queued = relay.queue();
    assert_eq!(queued.len(), 4, "one message per session, never two");
    assert!(queued
        .iter()
        .all(|m| m["recipients"][0]["address"] == "b@partner.test"));
}

#[test]
fn bare_line_endings_can_be_refused() {
    let dir = tmpdir("bare-reject");
    let cfg = Cfg::new(&dir, &format!("127.0.0.1:{}", free_port())).set(
        "server",
        "bare_line_endings",
        "\"reject\"",
    );
    let relay = Relay::start(&cfg);
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    let r = c.mail(
        "a@example.test",
        &["b@partner.test"],
        "Subject: x\r\n\r\nline\nline",
    );
    assert_eq!(r.code, 550, "{r:?}");
    assert!(r.text().starts_with("5.6.0"));
    // A bare CR is a line ending too (RFC 5321 §2.3.8), refused the same way.
    let r = c.mail(
        "a@example.test",
        &["b@partner.test"],
        "Subject: x\r\n\r\nline\rline",
    );
    assert_eq!(r.code, 550, "bare CR: {r:?}");
    assert!(r.text().starts_with("5.6.0"));
    let r = c.mail(
        "a@example.test",
        &["b@partner.test"],
        "Subject: x\r\n\r\nclean",
    );
    assert_eq!(r.code, 250);
    assert_eq!(relay.queue().len(), 1);
}

#[test]
fn pipelined_session_gets_every_reply_in_order() {
    let (_dir, relay, _) = held_relay("pipelining");
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    c.send(b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@partner.test>\r\nRCPT TO:<bad address>\r\nRCPT TO:<c@partner.test>\r\nDATA\r\n");
    let codes: Vec<u16> = (0..5).map(|_| c.reply().code).collect();
    assert_eq!(codes, [250, 250, 501, 250, 354]);
    c.send(b"Subject: p\r\n\r\nbody\r\n.\r\nMAIL FROM:<a@example.test>\r\nRCPT TO:<d@partner.test>\r\nDATA\r\nSubject: q\r\n\r\nsecond\r\n.\r\nQUIT\r\n");
    assert_eq!(c.reply().code, 250);
    assert_eq!(c.reply().code, 250);
    assert_eq!(c.reply().code, 250);
    assert_eq!(c.reply().code, 354);
    assert_eq!(c.reply().code, 250);
    assert_eq!(c.reply().code, 221);
    let q = relay.queue();
    assert_eq!(q.len(), 2);
    assert_eq!(q[0]["recipients"].as_array().unwrap().len(), 2);
}

#[test]
fn starttls_injection_is_discarded() {
    let dir = tmpdir("starttls-inject");
    let certs = certs(&dir);
    let cfg = Cfg::new(&dir, &format!("127.0.0.1:{}", free_port()))
        .set("tls", "cert", &format!("\"{}\"", certs.cert.display()))
        .set("tls", "key", &format!("\"{}\"", certs.key.display()));
    let relay = Relay::start(&cfg);
    let out = python(&format!(
        r#"
import socket, ssl
s = socket.create_connection(("127.0.0.1", {port}))
f = s.makefile("rb")
def reply():
    lines = []
    while True:
        l = f.readline().decode()
        lines.append(l.strip())
        if l[3:4] != "-": return lines
reply()
s.sendall(b"EHLO c.test\r\n"); reply()
# The injected MAIL FROM rides in the same packet as STARTTLS.
s.sendall(b"STARTTLS\r\nMAIL FROM:<a@example.test>\r\n")
print(reply()[0])
ctx = ssl.create_default_context(cafile=r"{ca}")
t = ctx.wrap_socket(s, server_hostname="localhost")
f = t.makefile("rb")
t.sendall(b"EHLO c.test\r\n"); print(reply()[0])
t.sendall(b"RCPT TO:<b@partner.test>\r\n"); print(reply()[0])
t.sendall(b"MAIL FROM:<a@example.test>\r\n"); print(reply()[0])
print(t.version())
"#,
        port = relay.smtp.port(),
        ca = certs.ca.display()
    ));
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("220"), "{out}");
    assert!(
        lines[1].starts_with("250-relay.test"),
        "EHLO is the first reply inside TLS: {out}"
    );
    assert!(
        lines[2].starts_with("503"),
        "the injected MAIL was never executed: {out}"
    );
    assert!(lines[3].starts_with("250"), "{out}");
    assert!(lines[4].starts_with("TLSv1."), "{out}");
}

#[test]
fn tls_required_before_mail() {
    let dir = tmpdir("tls-require");
    let certs = certs(&dir);
    let cfg = Cfg::new(&dir, &format!("127.0.0.1:{}", free_port()))
        .set("tls", "cert", &format!("\"{}\"", certs.cert.display()))
        .set("tls", "key", &format!("\"{}\"", certs.key.display()))
        .set("tls", "require", "true");
    let relay = Relay::start(&cfg);
    let mut c = Smtp::connect(relay.smtp);
    let ehlo = c.greet();
    assert!(ehlo.lines.iter().any(|l| l == "STARTTLS"));
    let r = c.cmd("MAIL FROM:<a@example.test>");
    assert_eq!((r.code, r.text().starts_with("5.7.0")), (530, true));
    let out = python(&format!(
        r#"
import smtplib, ssl
s = smtplib.SMTP("127.0.0.1", {port})
s.ehlo("c.test")
s.starttls(context=ssl.create_default_context(cafile=r"{ca}"))
s.ehlo("c.test")
print(s.sendmail("a@example.test", ["b@partner.test"], b"Subject: tls\r\n\r\nsecret\r\n"))
s.quit()
"#,
        port = relay.smtp.port(),
        ca = certs.ca.display()
    ));
    assert_eq!(out.trim(), "{}");
    let q = relay.queue();
    assert_eq!(q.len(), 1);
    let (env, data) = spool_message(&dir.join("spool"), q[0]["id"].as_str().unwrap()).unwrap();
    assert!(env["client"]["tls"].as_str().unwrap().contains("TLSv1."));
    assert!(String::from_utf8_lossy(&data).contains("with ESMTPS id"));
}

#[test]
fn implicit_tls_listener() {
    let dir = tmpdir("implicit-tls");
    let certs = certs(&dir);
    let cfg = Cfg::new(&dir, &format!("127.0.0.1:{}", free_port()))
        .set("server", "listen", "[]")
        .set("server", "listen_tls", "[\"127.0.0.1:0\"]")
        .set("tls", "cert", &format!("\"{}\"", certs.cert.display()))
        .set("tls", "key", &format!("\"{}\"", certs.key.display()));
    let relay = Relay::start(&cfg);
    let out = python(&format!(
        r#"
import smtplib, ssl
s = smtplib.SMTP_SSL("127.0.0.1", {port}, context=ssl.create_default_context(cafile=r"{ca}"))
code, msg = s.ehlo("c.test")
print("STARTTLS" in msg.decode())
print(s.sendmail("a@example.test", ["b@partner.test"], b"Subject: tls\r\n\r\nx\r\n"))
"#,
        port = relay.smtp.port(),
        ca = certs.ca.display()
    ));
    assert_eq!(out.lines().collect::<Vec<_>>(), ["False", "{}"]);
    assert_eq!(relay.queue().len(), 1);
}

#[test]
fn hop_limit_stops_loops() {
    let dir = tmpdir("hops");
    let cfg = Cfg::new(&dir, &format!("127.0.0.1:{}", free_port())).set("server", "hop_limit", "5");
    let relay = Relay::start(&cfg);
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    let looped = format!(
        "{}Subject: loop\r\n\r\nround and round",
        "Received: from a by b; Sun, 29 Nov 2026 10:00:00 +0000\r\n".repeat(6)
    );
    let r = c.mail("a@example.test", &["b@partner.test"], &looped);
    assert_eq!(
        (r.code, r.text().starts_with("5.4.6")),
        (554, true),
        "{r:?}"
    );
    let ok = format!(
        "{}Subject: fine\r\n\r\nx",
        "Received: from a by b; Sun, 29 Nov 2026 10:00:00 +0000\r\n".repeat(5)
    );
    assert_eq!(c.mail("a@example.test", &["b@partner.test"], &ok).code, 250);
}

#[test]
fn bad_input_gets_correct_codes_then_421() {
    let dir = tmpdir("bad-input");
    let cfg =
        Cfg::new(&dir, &format!("127.0.0.1:{}", free_port())).set("server", "max_errors", "6");
    let relay = Relay::start(&cfg);
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    assert_eq!(
        c.cmd(&format!("NOOP {}", "x".repeat(600))).code,
        500,
        "line over 512 octets"
    );
    assert_eq!(c.cmd("FROBNICATE").code, 500);
    assert_eq!(c.cmd("MAIL FROM:missing-brackets@example.test").code, 501);
    assert_eq!(c.cmd("RCPT TO:<b@partner.test>").code, 503);
    assert_eq!(c.cmd("AUTH PLAIN AAAA").code, 502);
    // Garbage bytes are just another bad command; the relay does not fall over.
    c.send(b"\x00\xff\xfe\x01garbage\r\n");
    let last = c.reply();
    assert_eq!(last.code, 421, "error budget spent: {last:?}");
    assert!(c.closed());
    // A line far beyond any limit, without a line end, is drained and refused.
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    c.send(&vec![b'A'; 100_000]);
    c.send(b"\r\n");
    assert_eq!(c.reply().code, 500);
    c.expect("NOOP", 250);
}

#[test]
fn connection_limits_answer_421() {
    let dir = tmpdir("conn-limits");
    let cfg = Cfg::new(&dir, &format!("127.0.0.1:{}", free_port()))
        .set("server", "max_connections", "3")
        .set("server", "max_connections_per_ip", "2");
    let relay = Relay::start(&cfg);
    let local = |ip: &str| ip.parse::<IpAddr>().unwrap();
    let mut a = Smtp::connect_from(local("127.0.0.1"), relay.smtp);
    let mut b = Smtp::connect_from(local("127.0.0.1"), relay.smtp);
    assert_eq!(a.reply().code, 220);
    assert_eq!(b.reply().code, 220);
    let mut c = Smtp::connect_from(local("127.0.0.1"), relay.smtp);
    let r = c.reply();
    assert_eq!(
        (r.code, r.text().starts_with("4.7.0")),
        (421, true),
        "per-IP limit"
    );
    let mut d = Smtp::connect_from(local("127.0.0.3"), relay.smtp);
    assert_eq!(d.reply().code, 220);
    let mut e = Smtp::connect_from(local("127.0.0.4"), relay.smtp);
    assert_eq!(e.reply().code, 421, "global limit");
    drop(a);
    assert!(wait_until(Duration::from_secs(5), || {
        let mut f = Smtp::connect_from(local("127.0.0.1"), relay.smtp);
        f.reply().code == 220
    }));
}

#[test]
fn idle_client_times_out_with_421() {
    let dir = tmpdir("timeout");
    let cfg = Cfg::new(&dir, &format!("127.0.0.1:{}", free_port())).set(
        "server",
        "command_timeout",
        "\"1s\"",
    );
    let relay = Relay::start(&cfg);
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    // Silent after EHLO. (A line dripped an octet at a time is cut a command_timeout
    // after its first octet: `smtp::conn::tests`, on the paused clock.)
    let r = c.reply();
    assert_eq!(
        (r.code, r.text().starts_with("4.4.2")),
        (421, true),
        "{r:?}"
    );
    assert!(c.closed());
}

#[test]
fn sigterm_lets_a_transaction_finish_then_closes_with_421() {
    let (_dir, mut relay, _) = held_relay("sigterm");
    let mut idle = Smtp::connect(relay.smtp);
    idle.greet();
    let mut busy = Smtp::connect(relay.smtp);
    busy.greet();
    busy.expect("MAIL FROM:<a@example.test>", 250);
    busy.expect("RCPT TO:<b@partner.test>", 250);
    busy.expect("DATA", 354);
    busy.send(b"Subject: in flight\r\n\r\nfirst half\r\n");
    let pid = relay.pid();
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let r = idle.reply();
    assert_eq!(
        (r.code, r.text().starts_with("4.3.0")),
        (421, true),
        "idle session told at once: {r:?}"
    );
    busy.send(b"second half\r\n.\r\n");
    let done = busy.reply();
    assert_eq!(
        done.code, 250,
        "the transaction in progress completes: {done:?}"
    );
    busy.send(b"MAIL FROM:<a@example.test>\r\n");
    assert_eq!(busy.reply().code, 421);
    assert!(relay.stop().success());
    // New connections are refused once stopping.
    assert!(std::net::TcpStream::connect(relay.smtp).is_err());
    let id = queued_id(&done);
    relay.restart();
    assert!(relay.queue().iter().any(|m| m["id"] == id.as_str()));
}

#[test]
fn invalid_configuration_exits_before_binding() {
    let dir = tmpdir("bad-config");
    let port = free_port();
    let cfg = Cfg::new(&dir, "127.0.0.1:2")
        .set("server", "listen", &format!("[\"127.0.0.1:{port}\"]"))
        .set("server", "max_recipent", "10");
    let path = cfg.write();
    let out = Command::new(bin())
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("max_recipent") && err.contains("line"),
        "{err}"
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    let check = Command::new(bin())
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!check.status.success());
    let bad_value = Cfg::new(&dir, "127.0.0.1:2").set("queue", "max_age", "\"five days\"");
    let check = Command::new(bin())
        .args(["check-config", "--config"])
        .arg(bad_value.write())
        .output()
        .unwrap();
    assert!(!check.status.success());
    assert!(String::from_utf8_lossy(&check.stderr).contains("max_age"));
}

#[test]
fn full_disk_answers_452_and_the_relay_keeps_running() {
    let dir = tmpdir("full-disk");
    let cfg = Cfg::new(&dir, &format!("127.0.0.1:{}", free_port()));
    let path = cfg.write();
    // A file-size limit makes spool writes over 512 KiB fail (EFBIG) as on a full disk
    // (the state database stays below it); SIGXFSZ is ignored so the write error is what
    // the relay sees.
    let script = format!(
        "trap '' XFSZ; exec prlimit --fsize=524288 -- {} run --config {} --log-format json",
        bin(),
        path.display()
    );
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script]);
    let relay = Relay::start_command(&dir, &path, cmd).expect("relay under prlimit");
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    // Larger than the limit, smaller than server.spill_threshold: it reaches the spool.
    let big = format!("Subject: big\r\n\r\n{}", "y".repeat(700_000));
    let r = c.mail("a@example.test", &["b@partner.test"], &big);
    assert_eq!(
        (r.code, r.text().starts_with("4.3.1")),
        (452, true),
        "{r:?}"
    );
    // Nothing half-written is left to be delivered.
    assert!(spool_ids(&dir.join("spool")).is_empty());
    // Right after a failed write the relay sheds load at MAIL...
    let shed = c.cmd("MAIL FROM:<a@example.test>");
    assert_eq!(shed.code, 452);
    // ...and takes mail again once the disk has room.
    assert!(wait_until(Duration::from_secs(10), || {
        let mut c = Smtp::connect(relay.smtp);
        c.greet();
        c.cmd("MAIL FROM:<a@example.test>").code == 250
            && c.cmd("RCPT TO:<b@partner.test>").code == 250
            && c.cmd("DATA").code == 354
            && {
                c.send(b"Subject: small\r\n\r\nok\r\n.\r\n");
                c.reply().code == 250
            }
    }));
    assert_eq!(relay.queue().len(), 1);
}

#[test]
fn shipped_example_configurations_are_valid() {
    let dir = tmpdir("example-configs");
    for file in ["config/smartrelay.toml", "config/production.example.toml"] {
        let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let mut text = std::fs::read_to_string(&shipped).unwrap();
        // check-config resolves the shared ranges' SPF names: through a loopback port
        // where nothing answers, never the system's resolver.
        if !text.contains("\n[dns]") {
            text.push_str("\n[dns]\nnameservers = [\"127.0.0.1:1\"]\ntimeout = \"1s\"\n");
        }
        let path = dir.join(shipped.file_name().unwrap());
        std::fs::write(&path, text).unwrap();
        let out = Command::new(bin())
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A DATA sender dripping a byte a second is cut off by `server.min_data_rate` after
/// the grace, with 421 4.4.2; so is a BDAT chunk that trickles in.
#[test]
fn slow_data_senders_are_cut_off() {
    let (_dir, relay, _cfg) = held_relay("min-data-rate");
    for bdat in [false, true] {
        let mut c = Smtp::connect(relay.smtp);
        c.greet();
        c.expect("MAIL FROM:<alice@example.test>", 250);
        c.expect("RCPT TO:<bob@partner.test>", 250);
        if bdat {
            c.send(b"BDAT 100000 LAST\r\n");
        } else {
            c.expect("DATA", 354);
        }
        c.stream
            .set_read_timeout(Some(Duration::from_millis(1000)))
            .unwrap();
        let started = std::time::Instant::now();
        let reply = loop {
            assert!(started.elapsed() < Duration::from_secs(30), "never cut off");
            // One byte, then wait up to a second for the relay's verdict.
            if std::io::Write::write_all(&mut c.stream, b"x").is_err() {
                break c.try_reply();
            }
            if let Some(r) = c.try_reply() {
                break Some(r);
            }
        };
        let r = reply.expect("a 421 before the close");
        assert_eq!(r.code, 421, "{}", r.text());
        assert!(r.text().starts_with("4.4.2"), "{}", r.text());
        assert!(
            started.elapsed() >= Duration::from_secs(4),
            "the grace is kept"
        );
    }
    let (_, metrics) = http_text("GET", &relay.url("/metrics"), None);
    assert!(
        metrics.contains("smartrelay_sessions_too_slow_total 2"),
        "{metrics}"
    );
}
