//! DKIM replay, from outside through the real binary: messages signed by dkimpy the way
//! Exchange Online signs (`h=From:Date:Subject:Message-ID:Content-Type:MIME-Version`,
//! no `t=`, no `x=`), keys served by the in-process DNS server, sent from 127.0.0.2 as a
//! shared Microsoft 365 range. Windows are short (`window = "2s"`).

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::cluster::Pg;
use support::dkim::{Algo, Key, Sign, Stamp, EXCHANGE_HEADERS};
use support::dns::Dns;
use support::*;

const T: Duration = Duration::from_secs(20);
const TENANT: &str = "3f2a9c1e-7b4d-4e8a-9c61-2d5e8f0a1b7c";
const WINDOW: Duration = Duration::from_secs(2);

fn shared() -> IpAddr {
    "127.0.0.2".parse().unwrap()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An RFC 5322 date `secs` seconds from now (negative: in the past), through Python.
fn date(offset_secs: i64) -> String {
    python(&format!(
        "import email.utils,time; print(email.utils.formatdate(time.time() + {offset_secs}))"
    ))
    .trim()
    .to_string()
}

fn message(from: &str, subject: &str, date: &str) -> Vec<u8> {
    format!(
        "From: {from}\r\nTo: bob@partner.test\r\nSubject: {subject}\r\nDate: {date}\r\nMessage-ID: <{subject}@contoso.test>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\nQuarterly figures attached.\r\n"
    )
    .into_bytes()
}

struct World {
    dns: Dns,
    key: Key,
    dir: support::TestDir,
}

fn world(name: &str) -> World {
    let dir = tmpdir(name);
    let key = Key::generate(&dir.join("keys"), "k", Algo::RsaSha256);
    let dns = Dns::start(&[("contoso.test", &key.record("selector1"))]);
    World { dns, key, dir }
}

fn cfg(w: &World, dir: &Path, upstream: &str) -> Cfg {
    Cfg::new(dir, upstream)
        .set("access", "allowed_ranges", "[\"127.0.0.1/32\"]")
        .set("access", "domains", "[\"contoso.test\"]")
        .set(
            "access",
            "shared_ranges",
            &format!("[{{ platform = \"o365\", ranges = [\"127.0.0.2/32\"], tenant_id = \"{TENANT}\" }}]"),
        )
        .set("access.dkim_replay", "window", "\"2s\"")
        .set("access.dkim_replay", "max_age", "\"1d\"")
        .set("dns", "nameservers", &format!("[\"{}\"]", w.dns.addr))
}

/// One transaction from the shared range; the final reply.
fn send(addr: SocketAddr, sender: &str, rcpts: &[&str], data: &[u8]) -> Reply {
    let mut c = Smtp::connect_from(shared(), addr);
    c.greet();
    c.expect(&format!("MAIL FROM:<{sender}>"), 250);
    for r in rcpts {
        c.expect(&format!("RCPT TO:<{r}>"), 250);
    }
    c.expect("DATA", 354);
    c.send(data);
    c.send(b".\r\n");
    let r = c.reply();
    c.cmd("QUIT");
    r
}

fn refused(r: &Reply, says: &str) {
    assert_eq!(r.code, 550, "{}", r.text());
    assert!(r.text().starts_with("5.7.1"), "{}", r.text());
    assert!(r.text().contains(says), "{}", r.text());
}

fn refusals(relay: &Relay, reason: &str) -> f64 {
    relay
        .metric(&format!(
            "smartrelay_dkim_replay_refusals_total{{platform=\"o365\",reason=\"{reason}\"}}"
        ))
        .unwrap_or(0.0)
}

fn after_the_window() {
    // The rule is about elapsed time: the window must really be over.
    std::thread::sleep(WINDOW + Duration::from_millis(300));
}

#[test]
fn a_signature_proves_one_message_once() {
    let w = world("replay-once");
    let relay = Relay::start(&cfg(&w, &w.dir, "127.0.0.1:9"));
    let addr = relay.smtp;
    let m = w.key.sign_like_exchange(
        &message("alice@contoso.test", "once", &date(0)),
        "contoso.test",
        "selector1",
    );

    // Split over two transactions within the window, disjoint recipients: both go.
    assert_eq!(
        send(addr, "alice@contoso.test", &["a@partner.test"], &m).code,
        250
    );
    assert_eq!(
        send(
            addr,
            "alice@contoso.test",
            &["b@partner.test", "c@partner.test"],
            &m
        )
        .code,
        250
    );
    after_the_window();
    // A retry to recipients it was accepted for: still proof.
    assert_eq!(
        send(
            addr,
            "alice@contoso.test",
            &["b@partner.test", "a@partner.test"],
            &m
        )
        .code,
        250,
        "a retry after the window"
    );
    let queued = spool_ids(&relay.dir.join("spool")).len();
    // One new recipient after the window: a replay, refused, nothing queued.
    let r = send(addr, "", &["a@partner.test", "victim@elsewhere.test"], &m);
    refused(&r, "already used");
    assert_eq!(
        spool_ids(&relay.dir.join("spool")).len(),
        queued,
        "nothing queued"
    );
    assert_eq!(refusals(&relay, "replayed"), 1.0);
    assert!(relay.wait_log(T, |l| {
        l["reason"] == "replayed"
            && l["message"].as_str().is_some_and(|m| {
                m.contains("d=contoso.test") && m.contains("first seen") && m.contains("relay.test")
            })
    }));
    // The null sender with 50 recipients in one transaction: the same.
    let many: Vec<String> = (0..50).map(|i| format!("r{i}@spam.test")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    refused(&send(addr, "", &many, &m), "already used");
    assert_eq!(refusals(&relay, "replayed"), 2.0);
    // Onboarding names the reason.
    assert!(wait_until(T, || {
        let (_, v) = relay.get("/api/v1/onboarding");
        v["steps"].as_array().unwrap().iter().any(|s| {
            s["id"] == "tenant"
                && s["state"] == "failing"
                && s["reason"].as_str().unwrap().contains("replayed: 2")
        })
    }));
}

/// Many sessions at once, with the activity recorder writing to the same state file:
/// every check gets its answer (no "database is busy" turned into a 451).
#[test]
fn concurrent_checks_all_get_an_answer() {
    let w = world("replay-concurrent");
    let relay =
        Relay::start(&cfg(&w, &w.dir, "127.0.0.1:9").set("access.dkim_replay", "window", "\"1h\""));
    let m = std::sync::Arc::new(w.key.sign_like_exchange(
        &message("alice@contoso.test", "busy", &date(0)),
        "contoso.test",
        "selector1",
    ));
    let addr = relay.smtp;
    let threads: Vec<_> = (0..12)
        .map(|i| {
            let m = m.clone();
            std::thread::spawn(move || {
                (0..40)
                    .map(|k| {
                        send(
                            addr,
                            "alice@contoso.test",
                            &[&format!("r{i}-{k}@partner.test")],
                            &m,
                        )
                        .code
                    })
                    .collect::<Vec<u16>>()
            })
        })
        .collect();
    for t in threads {
        let codes = t.join().unwrap();
        assert!(
            codes.iter().all(|c| *c == 250),
            "{codes:?}: {}",
            relay
                .logs()
                .iter()
                .filter(|l| l.contains("not proven") || l.contains("not verifiable"))
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

#[test]
fn old_signatures_and_another_tenants_stamp_prove_nothing() {
    let w = world("replay-stale");
    let relay = Relay::start(&cfg(&w, &w.dir, "127.0.0.1:9"));
    let addr = relay.smtp;
    let two_days = 2 * 86_400;

    // t= older than max_age.
    let m = w.key.sign_with(
        &message("alice@contoso.test", "old-t", &date(0)),
        "contoso.test",
        "selector1",
        &Sign {
            canon: ("relaxed", "relaxed"),
            headers: EXCHANGE_HEADERS,
            t: Stamp::At(unix_now() - two_days),
            x: None,
        },
    );
    refused(
        &send(addr, "alice@contoso.test", &["a@partner.test"], &m),
        "too old",
    );
    // No t=, and a signed Date: older than max_age (a 2019 Date, say).
    let m = w.key.sign_like_exchange(
        &message(
            "alice@contoso.test",
            "old-date",
            "Tue, 01 Oct 2019 10:00:00 +0000",
        ),
        "contoso.test",
        "selector1",
    );
    refused(
        &send(addr, "alice@contoso.test", &["a@partner.test"], &m),
        "too old",
    );
    // A signed Date: far in the future is no better.
    let m = w.key.sign_like_exchange(
        &message("alice@contoso.test", "future", &date(3600)),
        "contoso.test",
        "selector1",
    );
    refused(
        &send(addr, "alice@contoso.test", &["a@partner.test"], &m),
        "too old",
    );
    assert_eq!(refusals(&relay, "stale"), 3.0);

    // An expired x= proves nothing either (the verifier's own rule).
    let m = w.key.sign_with(
        &message("alice@contoso.test", "expired", &date(0)),
        "contoso.test",
        "selector1",
        &Sign {
            canon: ("relaxed", "relaxed"),
            headers: EXCHANGE_HEADERS,
            t: Stamp::At(unix_now() - 7200),
            x: Some(unix_now() - 3600),
        },
    );
    refused(
        &send(addr, "alice@contoso.test", &["a@partner.test"], &m),
        "not bound to this organization",
    );

    // A valid, fresh signature through another tenant: Exchange Online stamps the
    // sending tenant's id.
    let mut m = b"X-MS-Exchange-CrossTenant-Id: 11111111-2222-3333-4444-555555555555\r\n".to_vec();
    m.extend(message("alice@contoso.test", "other-tenant", &date(0)));
    let m = w.key.sign_like_exchange(&m, "contoso.test", "selector1");
    refused(
        &send(addr, "alice@contoso.test", &["a@partner.test"], &m),
        "another tenant",
    );
    assert_eq!(refusals(&relay, "other_tenant"), 1.0);

    // The same signature with our tenant's stamp is fine.
    let mut m = format!("X-MS-Exchange-CrossTenant-Id: {TENANT}\r\n").into_bytes();
    m.extend(message("alice@contoso.test", "own-tenant", &date(0)));
    let m = w.key.sign_like_exchange(&m, "contoso.test", "selector1");
    assert_eq!(
        send(addr, "alice@contoso.test", &["a@partner.test"], &m).code,
        250
    );
    assert!(
        spool_ids(&relay.dir.join("spool")).len() == 1,
        "only the last one is queued"
    );
}

#[test]
fn one_header_of_each_and_the_from_aligned_with_the_signature() {
    let w = world("replay-headers");
    let relay = Relay::start(&cfg(&w, &w.dir, "127.0.0.1:9"));
    let addr = relay.smtp;
    // A From: and a Subject: prepended above the signed ones: the signature still
    // verifies (DKIM signs the bottom-most), the smart host would see two From:.
    let signed = w.key.sign_like_exchange(
        &message("alice@contoso.test", "prepended", &date(0)),
        "contoso.test",
        "selector1",
    );
    let mut m = b"From: helpdesk@bank.test\r\nSubject: Urgent: verify your account\r\n".to_vec();
    m.extend_from_slice(&signed);
    refused(
        &send(addr, "alice@contoso.test", &["a@partner.test"], &m),
        "more than one From",
    );
    assert_eq!(refusals(&relay, "duplicate_header"), 1.0);

    // A From: of another domain under a valid d=contoso.test signature.
    let m = w.key.sign_like_exchange(
        &message("ceo@bank.test", "unaligned", &date(0)),
        "contoso.test",
        "selector1",
    );
    refused(
        &send(addr, "", &["a@partner.test"], &m),
        "not of the From: address's domain",
    );
    assert_eq!(refusals(&relay, "unaligned"), 1.0);

    // A rewritten To/Cc and an added Reply-To do not break the signature, but a
    // second To: is refused all the same.
    let signed = w.key.sign_like_exchange(
        &message("alice@contoso.test", "two-to", &date(0)),
        "contoso.test",
        "selector1",
    );
    let mut m = b"To: victim@elsewhere.test\r\n".to_vec();
    m.extend_from_slice(&signed);
    refused(
        &send(addr, "alice@contoso.test", &["a@partner.test"], &m),
        "more than one",
    );
    assert!(spool_ids(&relay.dir.join("spool")).is_empty());
}

#[test]
fn the_memory_survives_a_restart() {
    let w = world("replay-restart");
    let mut relay = Relay::start(&cfg(&w, &w.dir, "127.0.0.1:9"));
    let m = w.key.sign_like_exchange(
        &message("alice@contoso.test", "restart", &date(0)),
        "contoso.test",
        "selector1",
    );
    assert_eq!(
        send(relay.smtp, "alice@contoso.test", &["a@partner.test"], &m).code,
        250
    );
    relay.restart();
    after_the_window();
    refused(
        &send(relay.smtp, "alice@contoso.test", &["new@partner.test"], &m),
        "already used",
    );
    assert_eq!(
        send(relay.smtp, "alice@contoso.test", &["a@partner.test"], &m).code,
        250,
        "the recipient it was accepted for before the restart"
    );
}

#[test]
fn a_replay_through_another_node_is_caught() {
    let w = world("replay-nodes");
    let pg = Pg::start("replay");
    let node = |name: &str| {
        let d = w.dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let c = cfg(&w, &d, "127.0.0.1:9")
            .set("server", "hostname", &format!("\"{name}.relay.test\""))
            .set("store", "kind", "\"postgres\"")
            .set("store", "url", &format!("\"{}\"", pg.url()));
        Relay::start(&c)
    };
    let a = node("a");
    let b = node("b");
    let m = w.key.sign_like_exchange(
        &message("alice@contoso.test", "nodes", &date(0)),
        "contoso.test",
        "selector1",
    );
    assert_eq!(
        send(a.smtp, "alice@contoso.test", &["a@partner.test"], &m).code,
        250
    );
    // Within the window, node B takes the rest of the same message.
    assert_eq!(
        send(b.smtp, "alice@contoso.test", &["b@partner.test"], &m).code,
        250
    );
    after_the_window();
    refused(
        &send(b.smtp, "alice@contoso.test", &["c@partner.test"], &m),
        "already used",
    );
    assert!(b.wait_log(T, |l| l["reason"] == "replayed"
        && l["message"]
            .as_str()
            .is_some_and(|m| m.contains("on a.relay.test"))));
    assert_eq!(
        send(
            b.smtp,
            "alice@contoso.test",
            &["a@partner.test", "b@partner.test"],
            &m
        )
        .code,
        250,
        "a retry on another node to the recipients of both"
    );
    assert_eq!(
        pg.query("SELECT COUNT(*) FROM dkim_recipients"),
        "2",
        "recipients after the window are not added"
    );
}

#[test]
fn check_config_validates_the_replay_keys() {
    let w = world("replay-config");
    let check = |cfg: &Cfg| {
        let path = cfg.write();
        std::process::Command::new(bin())
            .args(["check-config", "--config"])
            .arg(path)
            .output()
            .unwrap()
    };
    let base = cfg(&w, &w.dir, "127.0.0.1:9");
    assert!(check(&base).status.success());
    for (key, value, named) in [
        ("window", "\"0s\"", "access.dkim_replay.window"),
        ("max_age", "\"1s\"", "access.dkim_replay.max_age"),
        ("window", "\"soon\"", "window"),
        ("enabeld", "true", "enabeld"),
    ] {
        let out = check(&base.clone().set("access.dkim_replay", key, value));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{key} = {value} accepted");
        assert!(err.contains(named), "{key}: {err}");
    }
}
