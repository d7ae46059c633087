//! Tenant binding for shared-platform sources, through the real binary: messages signed
//! by a real DKIM signer (dkimpy) with keys served by the in-process DNS server, sent
//! from 127.0.0.2 (the "shared platform") and from 127.0.0.1 (a dedicated server).

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use support::dkim::{Algo, Key};
use support::dns::Dns;
use support::*;

const T: Duration = Duration::from_secs(20);
const TENANT: &str = "3f2a9c1e-7b4d-4e8a-9c61-2d5e8f0a1b7c";
const SECRET: &str = "k9X-route-s3cret";

fn shared_ip() -> IpAddr {
    "127.0.0.2".parse().unwrap()
}

fn message(from: &str, subject: &str) -> Vec<u8> {
    format!(
        "From: {from}\r\nTo: bob@partner.test\r\nSubject: {subject}\r\nDate: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{subject}@example.test>\r\n\r\nHello Bob,\r\nthe figures are attached.\r\n"
    )
    .into_bytes()
}

struct World {
    _dns: Dns,
    relay: Relay,
    rsa: Key,
    ed: Key,
    foreign: Key,
    /// Last, so that it goes after the relay has stopped.
    _dir: TestDir,
}

/// DNS publishes an RSA and an Ed25519 key for example.test (the organization's domain,
/// the RSA one also signing for a subdomain), the Ed25519 one for the tenant's
/// onmicrosoft-style domain too, and a key for a foreign domain. 127.0.0.2 is a shared o365 range with every proof set;
/// 127.0.0.1 stays dedicated.
fn world(name: &str, upstream: &str) -> World {
    let dir = tmpdir(name);
    let keys = dir.join("keys");
    let rsa = Key::generate(&keys, "rsa", Algo::RsaSha256);
    let ed = Key::generate(&keys, "ed", Algo::Ed25519Sha256);
    let foreign = Key::generate(&keys, "foreign", Algo::RsaSha256);
    let dns = Dns::start(&[
        (
            "example.test",
            &format!(
                "{}sel1._domainkey.mail IN TXT {}\n{}",
                rsa.record("sel1"),
                rsa.txt,
                ed.record("ed1")
            ),
        ),
        ("contoso.onmicrosoft.test", &ed.record("selector1")),
        ("foreign.test", &foreign.record("s")),
    ]);
    let cfg = Cfg::new(&dir, upstream)
        .set("access", "allowed_ranges", "[\"127.0.0.1/32\"]")
        .set(
            "access",
            "shared_ranges",
            &format!(
                "[{{ platform = \"o365\", ranges = [\"127.0.0.2/32\", \"::1/128\"], tenant_id = \"{TENANT}\", dkim_domains = [\"contoso.onmicrosoft.test\"], header = {{ name = \"X-Contoso-Route\", secret_env = \"CONTOSO_ROUTE_SECRET\" }} }}]"
            ),
        )
        .set("dns", "nameservers", &format!("[\"{}\"]", dns.addr));
    let path = cfg.write();
    let relay = Relay::start_with(&dir, &path, &[("CONTOSO_ROUTE_SECRET", SECRET)])
        .unwrap_or_else(|e| panic!("relay did not start: {e}"));
    World {
        _dns: dns,
        relay,
        rsa,
        ed,
        foreign,
        _dir: dir,
    }
}

fn held(name: &str) -> World {
    world(name, &format!("127.0.0.1:{}", free_port()))
}

/// One DATA transaction from `from_ip`; returns the final reply.
fn send_from(addr: SocketAddr, from_ip: IpAddr, sender: &str, data: &[u8]) -> Reply {
    let mut c = Smtp::connect_from(from_ip, addr);
    c.greet();
    c.expect(&format!("MAIL FROM:<{sender}>"), 250);
    c.expect("RCPT TO:<bob@partner.test>", 250);
    c.expect("DATA", 354);
    c.send(data);
    c.send(b".\r\n");
    let r = c.reply();
    c.cmd("QUIT");
    r
}

fn spooled(w: &World, r: &Reply) -> Vec<u8> {
    let id = queued_id(r);
    spool_message(&w.relay.dir.join("spool"), &id)
        .expect("message on disk")
        .1
}

#[test]
fn each_proof_is_accepted() {
    let w = held("tenant-proofs");
    let addr = w.relay.smtp;
    let m = message("alice@example.test", "rsa-relaxed");
    let signed = w
        .rsa
        .sign(&m, "example.test", "sel1", ("relaxed", "relaxed"));
    assert_eq!(
        send_from(addr, shared_ip(), "alice@example.test", &signed).code,
        250,
        "rsa-sha256 relaxed"
    );

    let m = message("alice@example.test", "rsa-simple-sub");
    let signed = w
        .rsa
        .sign(&m, "mail.example.test", "sel1", ("simple", "simple"));
    let r = send_from(addr, shared_ip(), "alice@example.test", &signed);
    assert_eq!(
        r.code,
        250,
        "subdomain, simple: {}",
        w.relay.logs().join("\n")
    );

    let m = message("alice@example.test", "ed25519");
    let signed = w.ed.sign(&m, "example.test", "ed1", ("relaxed", "simple"));
    assert_eq!(
        send_from(addr, shared_ip(), "alice@example.test", &signed).code,
        250,
        "ed25519-sha256"
    );

    let mut m = format!(
        "X-MS-Exchange-CrossTenant-Id: {}\r\n",
        TENANT.to_uppercase()
    )
    .into_bytes();
    m.extend(message("alice@example.test", "tenant"));
    assert_eq!(
        send_from(addr, shared_ip(), "alice@example.test", &m).code,
        250,
        "tenant id"
    );

    let mut m = format!("X-Contoso-Route: {SECRET}\r\n").into_bytes();
    m.extend(message("alice@example.test", "header"));
    assert_eq!(
        send_from(addr, shared_ip(), "alice@example.test", &m).code,
        250,
        "route header"
    );

    let proofs = [
        "proof=dkim (d=example.test, first use)",
        "proof=dkim (d=mail.example.test, first use)",
        "proof=tenant_id",
        "proof=header",
    ];
    let logs = w.relay.logs_when(|l| proofs.iter().all(|p| l.contains(p)));
    assert!(!logs.contains(SECRET), "the secret reached the log");
    let (_, metrics) = http_text("GET", &w.relay.url("/metrics"), None);
    assert!(
        metrics.contains("smartrelay_tenant_checks_total{platform=\"o365\",proof=\"dkim\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("smartrelay_tenant_checks_total{platform=\"o365\",proof=\"tenant_id\"} 1")
    );
    assert!(
        metrics.contains("smartrelay_tenant_checks_total{platform=\"o365\",proof=\"header\"} 1")
    );
}

#[test]
fn messages_without_proof_are_refused_and_nothing_is_queued() {
    let w = held("tenant-refused");
    let addr = w.relay.smtp;
    // (what, envelope sender, message, what the reply says)
    let mut cases: Vec<(&str, &str, Vec<u8>, &str)> = Vec::new();
    const NOT_BOUND: &str = "not bound to this organization";

    let wrong = TENANT.replace("3f2a", "0000");
    let mut m = format!("X-MS-Exchange-CrossTenant-Id: {wrong}\r\n").into_bytes();
    m.extend(message("alice@example.test", "wrong-tenant"));
    cases.push(("wrong tenant id", "alice@example.test", m, "another tenant"));

    let mut m = format!(
        "X-MS-Exchange-CrossTenant-Id: {TENANT}\r\nX-MS-Exchange-CrossTenant-Id: {wrong}\r\n"
    )
    .into_bytes();
    m.extend(message("alice@example.test", "two-tenants"));
    cases.push((
        "two tenant id headers",
        "alice@example.test",
        m,
        "another tenant",
    ));

    let mut m = b"X-Contoso-Route: guess\r\n".to_vec();
    m.extend(message("alice@example.test", "wrong-secret"));
    cases.push(("wrong secret", "alice@example.test", m, NOT_BOUND));

    let m = message("ceo@foreign.test", "foreign");
    cases.push((
        "foreign signature",
        "alice@example.test",
        w.foreign
            .sign(&m, "foreign.test", "s", ("relaxed", "relaxed")),
        NOT_BOUND,
    ));

    // The tenant's onmicrosoft-style signature verifies, but it is not of the From:
    // address's domain: a replayed one could carry any From.
    let m = message("alice@example.test", "onmicrosoft");
    cases.push((
        "signature of another domain than From",
        "alice@example.test",
        w.ed.sign(
            &m,
            "contoso.onmicrosoft.test",
            "selector1",
            ("relaxed", "simple"),
        ),
        "not of the From: address's domain",
    ));

    let m = message("alice@example.test", "changed");
    let mut signed = w
        .rsa
        .sign(&m, "example.test", "sel1", ("relaxed", "relaxed"));
    let at = signed.windows(7).position(|x| x == b"figures").unwrap();
    signed[at..at + 7].copy_from_slice(b"invoice");
    cases.push((
        "changed after signing",
        "alice@example.test",
        signed,
        NOT_BOUND,
    ));

    // EchoSpoofing: the null sender and a forged From, from the shared platform.
    cases.push((
        "null sender, forged From",
        "",
        message("ceo@bank.test", "spoof"),
        NOT_BOUND,
    ));

    for (what, sender, data, says) in &cases {
        let r = send_from(addr, shared_ip(), sender, data);
        assert_eq!(
            (r.code, r.text().contains("5.7.1")),
            (550, true),
            "{what}: {}",
            r.text()
        );
        assert!(r.text().contains(says), "{what}: {}", r.text());
    }
    assert!(
        spool_ids(&w.relay.dir.join("spool")).is_empty(),
        "nothing is queued"
    );
    let (_, metrics) = http_text("GET", &w.relay.url("/metrics"), None);
    let n = cases.len();
    assert!(
        metrics.contains(&format!(
            "smartrelay_tenant_checks_total{{platform=\"o365\",proof=\"none\"}} {n}"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "smartrelay_messages_refused_total{{stage=\"data\",reason=\"5.7.1\"}} {n}"
        )),
        "{metrics}"
    );
    for (reason, count) in [("other_tenant", 2), ("unaligned", 1)] {
        assert!(
            metrics.contains(&format!(
                "smartrelay_dkim_replay_refusals_total{{platform=\"o365\",reason=\"{reason}\"}} {count}"
            )),
            "{reason}: {metrics}"
        );
    }

    // Onboarding: the tenant step is failing and names the last source and sender.
    assert!(wait_until(T, || {
        let (_, v) = w.relay.get("/api/v1/onboarding");
        v["steps"].as_array().unwrap().iter().any(|s| {
            s["id"] == "tenant"
                && s["state"] == "failing"
                && s["reason"]
                    .as_str()
                    .unwrap()
                    .contains(&format!("{n} message(s)"))
                && s["reason"].as_str().unwrap().contains("127.0.0.2")
                && s["reason"].as_str().unwrap().contains("sender <>")
        })
    }));
}

#[test]
fn dedicated_ranges_are_unchanged() {
    let w = held("tenant-dedicated");
    let local: IpAddr = "127.0.0.1".parse().unwrap();
    let r = send_from(
        w.relay.smtp,
        local,
        "",
        &message("mailer-daemon@example.test", "ndr"),
    );
    assert_eq!(r.code, 250, "{}", r.text());
    let r = send_from(
        w.relay.smtp,
        local,
        "alice@example.test",
        &message("alice@example.test", "plain"),
    );
    assert_eq!(r.code, 250);
    // Both messages' acceptance lines are out, so a tenant line would be too.
    let logs = w
        .relay
        .logs_when(|l| l.matches("accepted client=").count() >= 2);
    assert!(
        !logs.contains("tenant"),
        "no tenant check for dedicated sources"
    );
}

#[test]
fn route_header_is_removed_and_the_rest_is_byte_exact() {
    let dir = tmpdir("tenant-strip-up");
    let up = Upstream::start(&dir, &[]);
    let w = world("tenant-strip", &up.addr());
    let body = message("alice@example.test", "strip");
    let mut m = b"Subject-Line-Before: x\r\n".to_vec();
    m.extend_from_slice(format!("X-Contoso-Route: {SECRET}\r\n").as_bytes());
    m.extend_from_slice(&body);
    let r = send_from(w.relay.smtp, shared_ip(), "alice@example.test", &m);
    assert_eq!(r.code, 250, "{}", r.text());
    let on_disk = spooled(&w, &r);
    let got = up.wait_messages(1, T);
    assert_eq!(got.len(), 1);
    let data = &got[0].1;
    let mut expected = b"Subject-Line-Before: x\r\n".to_vec();
    expected.extend_from_slice(&body);
    // Our Received: first, then the client's bytes, less the route header.
    let start = data
        .windows(expected.len())
        .position(|x| x == expected.as_slice());
    assert!(start.is_some(), "{}", String::from_utf8_lossy(data));
    let head = &data[..start.unwrap()];
    assert!(
        head.starts_with(b"Received: from client.test"),
        "{}",
        String::from_utf8_lossy(head)
    );
    let head = String::from_utf8_lossy(head);
    let lines: Vec<&str> = head.trim_end_matches("\r\n").split("\r\n").collect();
    assert!(
        lines.iter().skip(1).all(|l| l.starts_with('\t')),
        "only our Received header precedes: {head}"
    );
    assert!(!String::from_utf8_lossy(data).contains(SECRET));
    assert!(!String::from_utf8_lossy(&on_disk).contains("X-Contoso-Route"));
    // The lines about this message are out (its proof and its acceptance) and none
    // holds the secret.
    let logs = w
        .relay
        .logs_when(|l| l.contains("proof=header") && l.contains("accepted client="));
    assert!(!logs.contains(SECRET));
}

#[test]
fn bdat_needs_proof_too() {
    let w = held("tenant-bdat");
    let bdat = |data: &[u8]| -> Reply {
        let mut c = Smtp::connect_from(shared_ip(), w.relay.smtp);
        c.greet();
        c.expect("MAIL FROM:<alice@example.test>", 250);
        c.expect("RCPT TO:<bob@partner.test>", 250);
        let (a, b) = data.split_at(data.len() / 2);
        c.send(format!("BDAT {}\r\n", a.len()).as_bytes());
        c.send(a);
        assert_eq!(c.reply().code, 250);
        c.send(format!("BDAT {} LAST\r\n", b.len()).as_bytes());
        c.send(b);
        c.reply()
    };
    let signed = w.rsa.sign(
        &message("alice@example.test", "bdat"),
        "example.test",
        "sel1",
        ("relaxed", "relaxed"),
    );
    assert_eq!(bdat(&signed).code, 250);
    let r = bdat(&message("alice@example.test", "bdat-unsigned"));
    assert_eq!(r.code, 550, "{}", r.text());
    assert_eq!(spool_ids(&w.relay.dir.join("spool")).len(), 1);
}

#[test]
fn ipv6_shared_range_and_an_ipv4_mapped_client() {
    let dir = tmpdir("tenant-v6");
    let dns = Dns::start(&[]);
    let cfg = Cfg::new(&dir, &format!("127.0.0.1:{}", free_port()))
        // Dual stack: IPv4 clients arrive as ::ffff:a.b.c.d.
        .set("server", "listen", "[\"[::]:0\"]")
        .set("access", "allowed_ranges", "[\"127.0.0.1/32\"]")
        .set(
            "access",
            "shared_ranges",
            "[{ platform = \"gsuite\", ranges = [\"::1/128\", \"127.0.0.2/32\"] }]",
        )
        .set("dns", "nameservers", &format!("[\"{}\"]", dns.addr));
    let relay = Relay::start(&cfg);
    let port = relay.smtp.port();
    let v6: SocketAddr = format!("[::1]:{port}").parse().unwrap();
    let mut c = Smtp::connect(v6);
    c.greet();
    let r = c.mail(
        "alice@example.test",
        &["bob@partner.test"],
        "Subject: v6\r\n\r\nhi",
    );
    assert_eq!(r.code, 550, "IPv6 ::1 is shared: {}", r.text());
    let v4: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let r = send_from(
        v4,
        shared_ip(),
        "alice@example.test",
        b"Subject: mapped\r\n\r\nhi\r\n",
    );
    assert_eq!(
        r.code,
        550,
        "::ffff:127.0.0.2 is matched as 127.0.0.2: {}",
        r.text()
    );
    let r = send_from(
        v4,
        "127.0.0.1".parse().unwrap(),
        "alice@example.test",
        b"Subject: dedicated\r\n\r\nhi\r\n",
    );
    assert_eq!(r.code, 250, "::ffff:127.0.0.1 is dedicated");
    relay.logs_when(|l| l.contains("client=[::1]") && l.contains("client=[127.0.0.2]"));
}

fn spf_zone(ip: &str) -> String {
    // A one-second TTL: the relay's resolver caches answers, and the test changes them.
    format!("spf 1 IN TXT \"v=spf1 ip4:{ip}/32 -all\"\n")
}

fn shared_ranges(relay: &Relay) -> serde_json::Value {
    relay.get("/api/v1/access/shared-ranges").1
}

/// A relay whose only shared range comes from `spf.platform.test`.
fn spf_cfg(dir: &std::path::Path, dns_addr: SocketAddr) -> Cfg {
    Cfg::new(dir, &format!("127.0.0.1:{}", free_port()))
        .set("access", "allowed_ranges", "[\"127.0.0.1/32\"]")
        .set(
            "access",
            "shared_ranges",
            "[{ platform = \"other\", ranges_from_spf = \"spf.platform.test\" }]",
        )
        .set("dns", "nameservers", &format!("[\"{dns_addr}\"]"))
}

#[test]
fn ranges_from_spf_refresh_and_survive_a_dns_outage() {
    let dir = tmpdir("tenant-spf");
    let dns = Dns::start(&[("platform.test", &spf_zone("127.0.0.2"))]);
    let dns_addr = dns.addr;
    let cfg = spf_cfg(&dir, dns_addr);
    let mut relay = Relay::start(&cfg);
    assert!(wait_until(T, || shared_ranges(&relay)[0]["resolved"]
        ["nets"]
        == serde_json::json!(["127.0.0.2/32"])));
    let greet = |relay: &Relay, ip: &str| -> u16 {
        let mut c = Smtp::connect_from(ip.parse().unwrap(), relay.smtp);
        c.reply().code
    };
    assert_eq!(greet(&relay, "127.0.0.2"), 220);
    assert_eq!(greet(&relay, "127.0.0.3"), 554);
    let r = send_from(
        relay.smtp,
        shared_ip(),
        "alice@example.test",
        &message("alice@example.test", "spf"),
    );
    assert_eq!(r.code, 550, "a resolved range is shared: {}", r.text());

    // The platform moves: after a refresh the new address is shared, the old one is not.
    drop(dns);
    let dns = Dns::start_on(dns_addr, &[("platform.test", &spf_zone("127.0.0.3"))]);
    assert!(wait_until(T, || {
        let (s, v) = relay.post("/api/v1/access/shared-ranges/refresh");
        s == 200 && v[0]["resolved"]["nets"] == serde_json::json!(["127.0.0.3/32"])
    }));
    assert_eq!(greet(&relay, "127.0.0.3"), 220);
    assert_eq!(greet(&relay, "127.0.0.2"), 554);

    // DNS goes away: a refresh fails and keeps the last good list, and a restart
    // without DNS still knows it (persisted in the state database).
    drop(dns);
    assert!(wait_until(T, || {
        let (_, v) = relay.post("/api/v1/access/shared-ranges/refresh");
        v[0]["last_error"].is_string()
            && v[0]["resolved"]["nets"] == serde_json::json!(["127.0.0.3/32"])
    }));
    relay.restart();
    assert_eq!(
        shared_ranges(&relay)[0]["resolved"]["nets"],
        serde_json::json!(["127.0.0.3/32"])
    );
    assert_eq!(greet(&relay, "127.0.0.3"), 220);

    // A relay that never resolved the list cannot tell: 421, never 220 or 554 — for
    // an address of allowed_ranges too, which may be one of the platform's.
    let fresh = tmpdir("tenant-spf-fresh");
    let cfg = spf_cfg(&fresh, dns_addr);
    let relay2 = Relay::start(&cfg);
    for ip in ["127.0.0.3", "127.0.0.1"] {
        let mut c = Smtp::connect_from(ip.parse().unwrap(), relay2.smtp);
        let r = c.reply();
        assert_eq!(r.code, 421, "{ip}: {}", r.text());
        assert!(r.text().starts_with("4.3.0"), "{}", r.text());
    }
}

#[test]
fn onboarding_tenant_step_done_with_proven_mail() {
    let w = held("tenant-onboarding");
    let (_, v) = w.relay.get("/api/v1/onboarding");
    let step = |v: &serde_json::Value| {
        v["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == "tenant")
            .cloned()
            .unwrap()
    };
    assert_eq!(step(&v)["state"], "todo", "{v}");
    let mut m = format!("X-MS-Exchange-CrossTenant-Id: {TENANT}\r\n").into_bytes();
    m.extend(message("alice@example.test", "onboard"));
    assert_eq!(
        send_from(w.relay.smtp, shared_ip(), "alice@example.test", &m).code,
        250
    );
    assert!(wait_until(T, || step(&w.relay.get("/api/v1/onboarding").1)
        ["state"]
        == "done"));
    let (_, text) = http_text(
        "GET",
        &w.relay.url("/api/v1/onboarding/instructions?platform=o365"),
        None,
    );
    assert!(
        text.contains("tenant_id") && text.contains("DKIM"),
        "{text}"
    );
}

#[test]
fn check_config_validates_shared_ranges_and_warns() {
    let dir = tmpdir("tenant-check");
    let base = Cfg::new(&dir, "127.0.0.1:25");
    let check = |cfg: &Cfg| {
        let path = cfg.write();
        std::process::Command::new(bin())
            .args(["check-config", "--config"])
            .arg(path)
            .env_remove("CONTOSO_ROUTE_SECRET")
            .output()
            .unwrap()
    };
    let warn = check(&base.clone().set(
        "access",
        "shared_ranges",
        "[{ platform = \"o365\", ranges = [\"40.92.0.0/15\"] }]",
    ));
    let out = String::from_utf8_lossy(&warn.stdout);
    assert!(warn.status.success(), "{out}");
    assert!(
        out.contains("warning: access.shared_ranges[0]") && out.contains("tenant_id"),
        "{out}"
    );
    for (value, key) in [
        ("[{ platform = \"o365\", ranges = [\"40.92.0.0/15\"], tenant_id = \"not-a-guid\" }]", "access.shared_ranges[0].tenant_id"),
        ("[{ platform = \"o365\" }]", "access.shared_ranges[0].ranges"),
        ("[{ platform = \"aol\", ranges = [\"40.92.0.0/15\"] }]", "platform"),
        ("[{ platform = \"gsuite\", ranges = [\"1.2.3.4/33\"] }]", "access.shared_ranges[0].ranges"),
        ("[{ platform = \"gsuite\", ranges = [\"40.92.0.0/15\"], header = { name = \"X-R\", secret_env = \"CONTOSO_ROUTE_SECRET\" } }]", "access.shared_ranges[0].header.secret_env"),
    ] {
        let out = check(&base.clone().set("access", "shared_ranges", value));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{value} accepted");
        assert!(err.contains(key), "{value}: {err}");
    }
}
