//! The attack pass's holes, from outside through the binary (issue 22): refused clients
//! cannot take the organization's slots; no fail-open while a shared range is not
//! resolved; one deadline per command line and per data progress; DKIM work bounded;
//! Share addresses by ingress's rules; BDAT bodies normalized and an empty one refused;
//! CSV cells that look like formulas guarded. (The admin face is in `admin_face.rs`,
//! bodies in flight in `ingress_memory.rs`.)

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use support::dkim::{Algo, Key};
use support::dns::Dns;
use support::*;

const T: Duration = Duration::from_secs(30);
const TENANT: &str = "3f2a9c1e-7b4d-4e8a-9c61-2d5e8f0a1b7c";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn letter(from: &str, subject: &str) -> String {
    format!(
        "From: {from}\r\nTo: bob@partner.test\r\nSubject: {subject}\r\nDate: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{subject}@example.test>\r\n\r\nHello Bob.\r\n"
    )
}

fn send_from(addr: SocketAddr, from_ip: IpAddr, sender: &str, data: &str) -> Reply {
    let mut c = Smtp::connect_from(from_ip, addr);
    c.greet();
    let r = c.mail(sender, &["bob@partner.test"], data);
    c.cmd("QUIT");
    r
}

/// Twice `max_connections` silent connections from an address in no range: the
/// organization's servers and the shared platform still relay, and not one of their
/// connections is turned away with 421.
#[test]
fn refused_clients_never_take_the_organizations_slots() {
    let dir = tmpdir("hardening-slots");
    let up = Upstream::start(&dir, &[]);
    let cfg = Cfg::new(&dir, &up.addr())
        .set("server", "max_connections", "20")
        .set("server", "max_connections_per_ip", "10")
        .set("access", "allowed_ranges", "[\"127.0.0.1/32\"]")
        .set(
            "access",
            "shared_ranges",
            &format!("[{{ platform = \"o365\", ranges = [\"127.0.0.2/32\"], tenant_id = \"{TENANT}\" }}]"),
        );
    let relay = Relay::start(&cfg);
    // Silent: they connect and never read or write.
    let silent: Vec<TcpStream> = (0..40)
        .filter_map(|_| {
            let socket =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
            socket
                .bind(&SocketAddr::new(ip("127.0.0.9"), 0).into())
                .ok()?;
            socket.connect(&relay.smtp.into()).ok()?;
            Some(socket.into())
        })
        .collect();
    assert_eq!(silent.len(), 40);
    assert!(wait_until(T, || relay
        .metric("smartrelay_connections_refused_total{reason=\"ip_not_allowed\"}")
        .unwrap_or(0.0)
        >= 40.0));
    let proof = format!("X-MS-Exchange-CrossTenant-Id: {TENANT}\r\n");
    for i in 0..10 {
        let r = send_from(
            relay.smtp,
            ip("127.0.0.1"),
            "alice@example.test",
            &letter("alice@example.test", &format!("own-{i}")),
        );
        assert_eq!(r.code, 250, "dedicated {i}: {}", r.text());
        let body = proof.clone() + &letter("alice@example.test", &format!("shared-{i}"));
        let r = send_from(relay.smtp, ip("127.0.0.2"), "alice@example.test", &body);
        assert_eq!(r.code, 250, "shared {i}: {}", r.text());
    }
    assert_eq!(
        relay
            .metric("smartrelay_connections_refused_total{reason=\"limit\"}")
            .unwrap_or(0.0),
        0.0,
        "no client of the organization met the connection limit"
    );
    // Each refused client heard why (or will, within its budget), from its own few slots.
    let mut heard = 0;
    for mut s in silent {
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut b = [0u8; 3];
        if s.read_exact(&mut b).is_ok() && &b == b"554" {
            heard += 1;
        }
    }
    assert_eq!(heard, 40, "every refused client is told 554");
    assert!(up.wait_messages(20, T).len() == 20);
}

/// An address of allowed_ranges that a shared range's SPF list also names: while the
/// list has never resolved (DNS failing at start) it gets 421 4.3.0, never the
/// dedicated treatment; once resolved, unsigned mail claiming any From is refused.
/// check-config says the two overlap.
#[test]
fn no_fail_open_while_a_shared_range_is_unresolved() {
    let dir = tmpdir("hardening-fail-open");
    let up = Upstream::start(&dir, &[]);
    let dns_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let cfg = Cfg::new(&dir, &up.addr())
        .set("access", "allowed_ranges", "[\"127.0.0.0/8\"]")
        .set(
            "access",
            "shared_ranges",
            &format!("[{{ platform = \"o365\", ranges_from_spf = \"spf.platform.test\", tenant_id = \"{TENANT}\" }}]"),
        )
        .set("dns", "nameservers", &format!("[\"{dns_addr}\"]"));
    let relay = Relay::start(&cfg);
    let forged = "From: ceo@bank.test\r\nTo: bob@partner.test\r\nSubject: wire\r\n\r\nPay now.\r\n";
    for from in ["127.0.0.2", "127.0.0.1"] {
        let mut c = Smtp::connect_from(ip(from), relay.smtp);
        let r = c.reply();
        assert_eq!(r.code, 421, "{from}: {}", r.text());
        assert!(r.text().starts_with("4.3.0"), "{}", r.text());
    }
    assert!(relay.queue().is_empty());

    let _dns = Dns::start_on(
        dns_addr,
        &[(
            "platform.test",
            "spf 1 IN TXT \"v=spf1 ip4:127.0.0.2/32 -all\"\n",
        )],
    );
    assert!(wait_until(T, || {
        let (s, v) = relay.post("/api/v1/access/shared-ranges/refresh");
        s == 200 && v[0]["resolved"]["nets"] == json!(["127.0.0.2/32"])
    }));
    let mut c = Smtp::connect_from(ip("127.0.0.2"), relay.smtp);
    c.greet();
    let r = c.mail("", &["bob@partner.test"], forged);
    assert_eq!(r.code, 550, "shared, unsigned: {}", r.text());
    // The organization's own server, outside the platform's list, is dedicated again.
    let r = send_from(
        relay.smtp,
        ip("127.0.0.1"),
        "alice@example.test",
        &letter("alice@example.test", "dedicated"),
    );
    assert_eq!(r.code, 250, "{}", r.text());

    let out = Command::new(bin())
        .args(["check-config", "--config"])
        .arg(&relay.config)
        .output()
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("127.0.0.2/32") && said.contains("overlap"),
        "{said}"
    );
}

/// Writes `line` one octet a second; returns how many octets went out before the
/// relay's reply came, and the reply.
fn drip(s: &mut TcpStream, line: &[u8]) -> (usize, String) {
    s.set_read_timeout(Some(Duration::from_millis(1000)))
        .unwrap();
    let mut got = Vec::new();
    for (i, b) in line.iter().enumerate() {
        if s.write_all(std::slice::from_ref(b)).is_err() {
            return (i, String::from_utf8_lossy(&got).into_owned());
        }
        let mut buf = [0u8; 256];
        if let Ok(n) = s.read(&mut buf) {
            if n > 0 {
                got.extend_from_slice(&buf[..n]);
                return (i + 1, String::from_utf8_lossy(&got).into_owned());
            }
        }
    }
    (line.len(), String::from_utf8_lossy(&got).into_owned())
}

fn read_reply(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\r\n") {
        match s.read(&mut b) {
            Ok(1) => got.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// A command line dripped an octet a second, each read well inside the 3 s
/// `command_timeout`, is cut with 421 4.4.2 long before it is complete; inside DATA,
/// the same drip is cut by `data_timeout`, which single octets do not renew.
#[test]
fn a_drip_is_cut_by_one_deadline_per_line_and_per_progress() {
    let dir = tmpdir("hardening-drip");
    let up = Upstream::start(&dir, &[]);
    let cfg = Cfg::new(&dir, &up.addr())
        .set("server", "command_timeout", "\"3s\"")
        .set("server", "data_timeout", "\"3s\"")
        .set("server", "min_data_rate", "0");
    let relay = Relay::start(&cfg);

    let mut s = TcpStream::connect(relay.smtp).unwrap();
    assert!(read_reply(&mut s).starts_with("220"));
    let (sent, reply) = drip(&mut s, b"EHLO a-client-that-drips-its-command.test\r\n");
    assert!(reply.starts_with("421 4.4.2"), "{reply:?}");
    assert!(sent < 10, "cut after {sent} octets");

    let mut s = TcpStream::connect(relay.smtp).unwrap();
    assert!(read_reply(&mut s).starts_with("220"));
    for (line, code) in [
        ("EHLO c.test", "250"),
        ("MAIL FROM:<a@example.test>", "250"),
        ("RCPT TO:<b@partner.test>", "250"),
        ("DATA", "354"),
    ] {
        s.write_all(format!("{line}\r\n").as_bytes()).unwrap();
        let mut r = read_reply(&mut s);
        while r.as_bytes().get(3) == Some(&b'-') {
            r = read_reply(&mut s);
        }
        assert!(r.starts_with(code), "{line}: {r}");
    }
    let (sent, reply) = drip(&mut s, &[b'x'; 30]);
    assert!(reply.starts_with("421 4.4.2"), "{reply:?}");
    assert!(sent < 10, "cut after {sent} octets");
    assert!(relay.queue().is_empty());
}

/// 300 DKIM-Signature headers, each with a correct body hash and a domain of its own:
/// at most 10 are verified (the aligned one first, so the message is still proven),
/// at most 10 keys are asked of DNS, and the 290 others are counted as skipped.
#[test]
fn dkim_work_is_bounded() {
    let dir = tmpdir("hardening-dkim");
    let key = Key::generate(&dir.join("keys"), "k", Algo::RsaSha256);
    let dns = Dns::start(&[("example.test", &key.record("sel"))]);
    let up = Upstream::start(&dir, &[]);
    let cfg = Cfg::new(&dir, &up.addr())
        .set("access", "allowed_ranges", "[\"127.0.0.1/32\"]")
        .set(
            "access",
            "shared_ranges",
            &format!("[{{ platform = \"o365\", ranges = [\"127.0.0.2/32\"], tenant_id = \"{TENANT}\" }}]"),
        )
        .set("dns", "nameservers", &format!("[\"{}\"]", dns.addr));
    let relay = Relay::start(&cfg);
    let m = letter("alice@example.test", "fan-out");
    let signed = key.sign(m.as_bytes(), "example.test", "sel", ("relaxed", "relaxed"));
    let signed = String::from_utf8(signed).unwrap();
    let (real, rest) = signed.split_once("\r\nFrom: ").unwrap();
    // The same signature claimed for 299 other domains: body hashes that match, keys
    // the sender chose to have looked up.
    let mut message = String::new();
    for i in 0..299 {
        message.push_str(&real.replace("d=example.test", &format!("d=fan{i}.test")));
        message.push_str("\r\n");
    }
    message.push_str(real);
    message.push_str("\r\nFrom: ");
    message.push_str(rest);
    let before = dns.asked().len();
    let r = send_from(relay.smtp, ip("127.0.0.2"), "alice@example.test", &message);
    assert_eq!(r.code, 250, "{}", r.text());
    let mut keys: Vec<String> = dns.asked()[before..]
        .iter()
        .filter(|n| n.contains("._domainkey."))
        .cloned()
        .collect();
    // The resolver asks a name that gets no answer twice; the bound is on names.
    keys.sort();
    keys.dedup();
    assert!(keys.len() <= 10, "{} keys looked up: {keys:?}", keys.len());
    assert!(
        keys.iter().any(|k| k == "sel._domainkey.example.test."),
        "{keys:?}"
    );
    assert_eq!(
        relay.metric("smartrelay_dkim_signatures_skipped_total"),
        Some(290.0)
    );
}

/// Share takes an address only if ingress would: a trailing dot is refused; a
/// non-ASCII address goes upstream with SMTPUTF8.
#[test]
fn share_addresses_follow_ingress_rules() {
    let dir = tmpdir("hardening-share");
    let dns = Dns::start(&[(
        "test",
        "example IN TXT \"v=spf1 include:eu._netblocks.mimecast.com -all\"\n",
    )]);
    let up = Upstream::start(&dir, &[]);
    let cfg = Cfg::new(&dir, &up.addr()).set("dns", "nameservers", &format!("[\"{}\"]", dns.addr));
    let relay = Relay::start(&cfg);
    let url = relay.url("/api/v1/onboarding/share");
    for bad in [
        "x@victim.test.",
        "x..y@partner.test",
        "x@-bad.test",
        "x@partner..test",
    ] {
        let (status, v) = post_json(&url, &json!({ "to": bad }));
        assert_eq!(status, 400, "{bad} -> {v}");
    }
    assert!(relay.queue().is_empty());
    let (status, v) = post_json(&url, &json!({ "to": "zoë@exämple.test" }));
    assert_eq!(status, 202, "{v}");
    let got = up.wait_messages(1, T);
    assert_eq!(got.len(), 1);
    let (envelope, _) = &got[0];
    assert_eq!(envelope["rcpt_tos"], json!(["zoë@exämple.test"]));
    assert!(
        envelope["mail_options"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o == "SMTPUTF8"),
        "{envelope}"
    );
}

fn bdat(s: &mut Smtp, chunk: &[u8], last: bool) -> Reply {
    let verb = if last {
        format!("BDAT {} LAST\r\n", chunk.len())
    } else {
        format!("BDAT {}\r\n", chunk.len())
    };
    s.send(verb.as_bytes());
    s.send(chunk);
    s.reply()
}

/// BDAT text bodies get DATA's line-ending rule: bare CR and LF become CRLF (a CRLF
/// split between chunks stays one), or the message is refused under `reject`;
/// `BDAT 0 LAST` with nothing before it is an empty message.
#[test]
fn bdat_bodies_are_normalized_like_data() {
    let dir = tmpdir("hardening-bdat");
    let up = Upstream::start(&dir, &[]);
    let relay = Relay::start(&Cfg::new(&dir, &up.addr()));
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    c.expect("MAIL FROM:<a@example.test>", 250);
    c.expect("RCPT TO:<b@partner.test>", 250);
    assert_eq!(bdat(&mut c, b"Subject: bdat\nX-A: 1\r", false).code, 250);
    assert_eq!(bdat(&mut c, b"\n\r\nline one\rline two\n", true).code, 250);
    c.expect("MAIL FROM:<a@example.test>", 250);
    c.expect("RCPT TO:<b@partner.test>", 250);
    let r = bdat(&mut c, b"", true);
    assert_eq!(
        (r.code, r.text().get(..5)),
        (554, Some("5.6.0")),
        "{}",
        r.text()
    );
    c.cmd("QUIT");
    let got = up.wait_messages(1, T);
    let (_, data) = &got[0];
    assert!(
        data.ends_with(b"Subject: bdat\r\nX-A: 1\r\n\r\nline one\r\nline two\r\n"),
        "{}",
        String::from_utf8_lossy(data)
    );
    assert!(relay.wait_queue_empty(T));
    assert_eq!(up.messages().len(), 1, "the empty message was not queued");

    let dir = tmpdir("hardening-bdat-reject");
    let relay =
        Relay::start(&Cfg::new(&dir, &up.addr()).set("server", "bare_line_endings", "\"reject\""));
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    c.expect("MAIL FROM:<a@example.test>", 250);
    c.expect("RCPT TO:<b@partner.test>", 250);
    assert_eq!(
        bdat(&mut c, b"Subject: r\r\n\r\nbare\nlf\r\n", false).code,
        250
    );
    let r = bdat(&mut c, b"end\r\n", true);
    assert_eq!(
        (r.code, r.text().get(..5)),
        (550, Some("5.6.0")),
        "{}",
        r.text()
    );
    c.expect("MAIL FROM:<a@example.test>", 250);
    c.expect("RCPT TO:<b@partner.test>", 250);
    assert_eq!(bdat(&mut c, b"Subject: ok\r\n\r\nfine\r\n", true).code, 250);
    assert!(relay.wait_queue_empty(T));
}

/// Recipients whose address begins with `=`, `+` or `-` are exported with a leading
/// `'` in CSV (API and CLI), so a spreadsheet shows them as text; an import of that
/// export gives the addresses back unchanged.
#[test]
fn csv_cells_that_look_like_formulas_are_guarded() {
    let dir = tmpdir("hardening-csv");
    let up = Upstream::start(&dir, &[]);
    let relay = Relay::start(&Cfg::new(&dir, &up.addr()));
    let rcpts = [
        "=cmd|'/Ccalc'!A0@x.test",
        "+sum@x.test",
        "-neg@x.test",
        "plain@x.test",
    ];
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    let r = c.mail(
        "alice@example.test",
        &rcpts,
        &letter("alice@example.test", "csv"),
    );
    assert_eq!(r.code, 250, "{}", r.text());
    assert!(relay.wait_queue_empty(T));
    assert!(wait_until(T, || relay.trusted_recorded() >= 1.0));
    let (status, csv) = http_text(
        "GET",
        &relay.url("/api/v1/trusted-senders?format=csv"),
        None,
    );
    assert_eq!(status, 200);
    let out = Command::new(bin())
        .args(["trusted", "export", "--format", "csv", "--config"])
        .arg(&relay.config)
        .output()
        .unwrap();
    assert!(out.status.success());
    let cli = String::from_utf8(out.stdout).unwrap();
    for export in [&csv, &cli] {
        let first: Vec<&str> = export
            .lines()
            .skip(1)
            .map(|l| l.split(',').next().unwrap())
            .collect();
        for guarded in [
            "'=cmd|'/Ccalc'!A0@x.test",
            "'+sum@x.test",
            "'-neg@x.test",
            "plain@x.test",
        ] {
            assert!(
                first.iter().any(|c| c.trim_matches('"') == guarded),
                "{guarded} in {export}"
            );
        }
        assert!(
            !first
                .iter()
                .any(|c| c.trim_matches('"').starts_with(['=', '+', '-', '@'])),
            "{export}"
        );
    }
    // The export imports into another list as the addresses they were.
    let file = dir.join("export.csv");
    std::fs::write(&file, &cli).unwrap();
    let other = tmpdir("hardening-csv-import");
    let other_cfg = Cfg::new(&other, &up.addr()).write();
    let out = Command::new(bin())
        .args(["trusted", "import"])
        .arg(&file)
        .arg("--config")
        .arg(&other_cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(bin())
        .args(["trusted", "export", "--format", "json", "--config"])
        .arg(&other_cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for r in rcpts {
        assert!(text.contains(&format!("\"{r}\"")), "{r} in {text}");
    }
}
