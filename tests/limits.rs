//! Outbound abuse control from outside (issue 23): `[[limits]]` through the binary,
//! with aiosmtpd upstreams (one refusing chosen recipients with 550), the admin API, the
//! CLI, a restart, and two nodes on one PostgreSQL.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use support::cluster::Pg;
use support::*;

const T: Duration = Duration::from_secs(30);

fn letter(from: &str, subject: &str) -> String {
    format!(
        "From: {from}\r\nTo: someone@partner.test\r\nSubject: {subject}\r\nMessage-ID: <{subject}@contoso.test>\r\n\r\nHello.\r\n"
    )
}

/// One message per transaction over one session; the final replies.
fn send_many(addr: SocketAddr, sender: &str, rcpts: &[String]) -> Vec<Reply> {
    let mut c = Smtp::connect(addr);
    c.greet();
    let mut out = Vec::new();
    for (i, r) in rcpts.iter().enumerate() {
        out.push(c.mail(sender, &[r.as_str()], &letter(sender, &format!("m{i}"))));
    }
    c.cmd("QUIT");
    out
}

fn rcpts(prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{prefix}{i}@partner.test"))
        .collect()
}

fn cfg(dir: &std::path::Path, up: &str, limits: &str) -> Cfg {
    Cfg::new(dir, up)
        .set("access", "domains", "[\"contoso.test\"]")
        .append(limits)
}

fn held(relay: &Relay, sender: &str) -> Vec<Value> {
    let (_, v) = relay.get(&format!("/api/v1/queue?held=true&sender={sender}"));
    v["messages"].as_array().cloned().unwrap_or_default()
}

fn restricted(relay: &Relay) -> Vec<Value> {
    relay
        .get("/api/v1/restricted")
        .1
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn lift(relay: &Relay, action: &str, key: &str, value: &str) -> Value {
    let (status, v) = post_json(
        &relay.url(&format!("/api/v1/restricted/{action}")),
        &json!({ "key": key, "value": value }),
    );
    assert_eq!(status, 200, "{v}");
    v
}

/// The 451 comes at the MAIL or RCPT that would go over, names the limit and never the
/// address, counts nothing, and the sender may go on once the period has refilled.
#[test]
fn a_defer_rule_answers_451_at_the_command_that_goes_over() {
    let dir = tmpdir("limits-defer");
    let up = Upstream::start(&dir, &[]);
    let relay = Relay::start(&cfg(
        &dir,
        &up.addr(),
        "[[limits]]\nname = \"burst\"\nkey = \"sender\"\nmessages = \"5/2s\"\nrecipients = \"8/2s\"\naction = \"defer\"\nexempt = [\"newsletter@contoso.test\"]\n",
    ));
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    for i in 0..5 {
        let r = c.mail(
            "alice@contoso.test",
            &["b@partner.test"],
            &letter("alice@contoso.test", &format!("d{i}")),
        );
        assert_eq!(r.code, 250);
    }
    let r = c.cmd("MAIL FROM:<alice@contoso.test>");
    assert_eq!((r.code, r.text().get(..5)), (451, Some("4.7.1")), "{r:?}");
    assert!(
        r.text().contains("burst") && !r.text().contains("alice"),
        "{r:?}"
    );
    // Another sender, the exempt one and the null sender are not alice.
    for sender in ["bob@contoso.test", "newsletter@contoso.test", ""] {
        let r = c.mail(
            sender,
            &["b@partner.test"],
            &letter("x@contoso.test", "other"),
        );
        assert_eq!(r.code, 250, "{sender}: {r:?}");
    }
    // The period refills the burst: alice may send again (a 451 counts nothing, so
    // asking again does not push it further away).
    assert!(wait_until(Duration::from_secs(5), || {
        let r = c.cmd("MAIL FROM:<alice@contoso.test>");
        if r.code == 250 {
            c.cmd("RSET");
        }
        r.code == 250
    }));
    // Recipients: the RCPT that goes over is refused, the ones before it stay.
    std::thread::sleep(Duration::from_millis(2100));
    c.expect("MAIL FROM:<bob@contoso.test>", 250);
    for i in 0..8 {
        c.expect(&format!("RCPT TO:<r{i}@partner.test>"), 250);
    }
    let r = c.cmd("RCPT TO:<r9@partner.test>");
    assert_eq!(r.code, 451, "{r:?}");
    c.expect("DATA", 354);
    c.send(letter("bob@contoso.test", "eight").as_bytes());
    assert_eq!(c.cmd(".").code, 250);
    assert!(relay.wait_queue_empty(T));
    let last = up.messages().pop().unwrap();
    assert_eq!(last.0["rcpt_tos"].as_array().unwrap().len(), 8);
    assert!(relay
        .metric("smartrelay_limit_exceeded_total{limit=\"burst\",action=\"defer\"}")
        .is_some_and(|n| n >= 2.0));
}

/// A hold rule fires mid-stream: the message over the limit and every later one of
/// the sender are accepted and held, never delivered, even across a restart; release
/// delivers each exactly once; discard removes them with no DSN.
#[test]
fn a_hold_rule_holds_until_released_or_discarded() {
    let dir = tmpdir("limits-hold");
    let up = Upstream::start(&dir, &[]);
    let mut relay = Relay::start(&cfg(
        &dir,
        &up.addr(),
        "[[limits]]\nname = \"sender-hourly\"\nkey = \"sender\"\nrecipients = \"10/1h\"\naction = \"hold\"\n",
    ));
    let replies = send_many(relay.smtp, "alice@contoso.test", &rcpts("a", 15));
    assert!(replies.iter().all(|r| r.code == 250), "{replies:?}");
    assert!(wait_until(T, || up.messages().len() == 10));
    assert_eq!(held(&relay, "alice@contoso.test").len(), 5);
    let m = &held(&relay, "alice@contoso.test")[0];
    assert_eq!(
        m["hold_reason"],
        json!({"kind": "limit", "limit": "sender-hourly", "key": "sender", "value": "alice@contoso.test"})
    );
    let r = restricted(&relay);
    assert_eq!(r.len(), 1);
    assert_eq!(
        (
            r[0]["key"].as_str(),
            r[0]["value"].as_str(),
            r[0]["limit"].as_str()
        ),
        (
            Some("sender"),
            Some("alice@contoso.test"),
            Some("sender-hourly")
        )
    );
    assert_eq!(r[0]["held"], 5);
    relay.logs_when(|l| {
        l.lines()
            .any(|l| l.contains("key value restricted") && l.contains("alice@contoso.test"))
    });
    assert_eq!(
        relay.metric("smartrelay_restricted_keys"),
        Some(1.0),
        "{}",
        relay
            .metrics()
            .lines()
            .filter(|l| l.contains("restrict"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        relay.metric("smartrelay_limit_exceeded_total{limit=\"sender-hourly\",action=\"hold\"}"),
        Some(1.0)
    );

    // A restart keeps the restriction: new mail of alice's is held whatever the counts.
    relay.restart();
    assert_eq!(restricted(&relay).len(), 1);
    assert_eq!(
        send_many(relay.smtp, "alice@contoso.test", &rcpts("late", 1))[0].code,
        250
    );
    assert!(wait_until(T, || held(&relay, "alice@contoso.test").len() == 6));
    assert!(wait_until(T, || relay
        .metric("smartrelay_queue_held_messages")
        == Some(6.0)));
    assert_eq!(up.messages().len(), 10, "held mail is never delivered");

    // The CLI lists it and releases it: every held message goes out once.
    let cli = |args: &[&str]| {
        let out = relay.cli(args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert!(cli(&["restricted", "list"]).contains("alice@contoso.test"));
    let said = cli(&["restricted", "release", "sender=alice@contoso.test"]);
    assert!(said.contains("6 held message(s) released"), "{said}");
    assert!(relay.wait_queue_empty(T));
    let got = up.wait_messages(16, T);
    assert_eq!(got.len(), 16);
    let mut to: Vec<String> = got
        .iter()
        .map(|(e, _)| e["rcpt_tos"][0].as_str().unwrap().to_string())
        .collect();
    to.sort();
    to.dedup();
    assert_eq!(to.len(), 16, "each exactly once");
    assert!(restricted(&relay).is_empty());
    // Counts started again: alice may send her ten.
    let replies = send_many(relay.smtp, "alice@contoso.test", &rcpts("again", 3));
    assert!(replies.iter().all(|r| r.code == 250));
    assert!(relay.wait_queue_empty(T));
    assert!(held(&relay, "alice@contoso.test").is_empty());

    // Bob goes over; discard removes his held mail, and nobody is told.
    send_many(relay.smtp, "bob@contoso.test", &rcpts("b", 12));
    assert!(wait_until(T, || held(&relay, "bob@contoso.test").len() == 2));
    let before = up.messages().len();
    let v = lift(&relay, "discard", "sender", "bob@contoso.test");
    assert_eq!(
        (v["restricted"].as_bool(), v["messages"].as_u64()),
        (Some(true), Some(2))
    );
    assert!(relay.wait_queue_empty(T));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(up.messages().len(), before, "no DSN, nothing delivered");
    relay.logs_when(|l| l.contains("held mail discarded"));
}

/// What the smart host refuses with 5xx counts: past the bounce rule the sender is
/// restricted, and its next message is held.
#[test]
fn bounces_restrict_a_sender() {
    let dir = tmpdir("limits-bounces");
    let mut args = Vec::new();
    for i in 0..4 {
        args.push("--reply".to_string());
        args.push(format!("bad{i}@partner.test=550 5.1.1 No such user"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let up = Upstream::start(&dir, &args);
    let relay = Relay::start(&cfg(
        &dir,
        &up.addr(),
        "[[limits]]\nname = \"bounces\"\nkey = \"sender\"\nbounces = \"3/1h\"\naction = \"hold\"\n",
    ));
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    let bad = rcpts("bad", 4);
    let bad: Vec<&str> = bad.iter().map(String::as_str).collect();
    assert_eq!(
        c.mail(
            "carol@contoso.test",
            &bad,
            &letter("carol@contoso.test", "bad")
        )
        .code,
        250
    );
    c.cmd("QUIT");
    assert!(wait_until(T, || restricted(&relay).len() == 1));
    assert_eq!(restricted(&relay)[0]["limit"], "bounces");
    send_many(relay.smtp, "carol@contoso.test", &rcpts("good", 1));
    assert!(wait_until(T, || held(&relay, "carol@contoso.test").len() == 1));
    // The bounce for carol's message went to her (not counted: the null sender).
    assert!(restricted(&relay).len() == 1);
}

/// Once a sender is restricted, what it taught the trusted list within the rule's
/// window is suspect: out of the list and its export unless asked for, and a release
/// keeps the entries.
#[test]
fn suspect_trusted_entries_are_left_out_until_released() {
    let dir = tmpdir("limits-suspect");
    let up = Upstream::start(&dir, &[]);
    let relay = Relay::start(&cfg(
        &dir,
        &up.addr(),
        "[[limits]]\nname = \"sender-hourly\"\nkey = \"sender\"\nrecipients = \"5/1h\"\naction = \"hold\"\n",
    ));
    // Dave's normal mail first: learned, not suspect (another sender).
    send_many(relay.smtp, "dave@contoso.test", &rcpts("friend", 2));
    send_many(relay.smtp, "eve@contoso.test", &rcpts("spam", 7));
    assert!(wait_until(T, || restricted(&relay).len() == 1));
    assert!(wait_until(T, || held(&relay, "eve@contoso.test").len() == 2));
    assert!(wait_until(T, || relay.trusted_recorded() >= 7.0));
    let listed = |q: &str| -> Vec<(String, String)> {
        let (_, v) = relay.get(&format!("/api/v1/trusted-senders{q}"));
        v["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["address"].as_str().unwrap().to_string(),
                    e["origin"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    assert!(wait_until(T, || listed("?include_suspect=true")
        .iter()
        .filter(|(_, o)| o == "suspect")
        .count()
        == 5));
    let shown = listed("");
    assert_eq!(shown.len(), 2, "{shown:?}");
    assert!(shown.iter().all(|(a, _)| a.starts_with("friend")));
    let export = |extra: &[&str]| {
        let out = Command::new(bin())
            .args(["trusted", "export", "--format", "csv"])
            .args(extra)
            .arg("--config")
            .arg(&relay.config)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(!export(&[]).contains("spam"));
    let all = export(&["--include-suspect"]);
    assert_eq!(
        all.lines()
            .filter(|l| l.contains("spam") && l.contains("suspect"))
            .count(),
        5,
        "{all}"
    );

    // Released from the dashboard's own form.
    let (_, page) = http_text("GET", &relay.url("/"), None);
    assert!(page.contains("Restricted senders") && page.contains("eve@contoso.test"));
    let dash = Dashboard::open(&relay, None);
    let (status, _) = dash.post_form(
        "/api/v1/restricted/release",
        &[("key", "sender"), ("value", "eve@contoso.test")],
    );
    assert_eq!(status, 303);
    assert!(restricted(&relay).is_empty());
    assert!(wait_until(T, || listed("").len() == 7 + 2));
    assert!(listed("").iter().all(|(_, o)| o == "learned"));
}

/// Two nodes on one PostgreSQL: one sender's messages on both count against one limit;
/// a restriction made on one holds the sender's mail on the other within 5 s, and a
/// release on one delivers the mail the other holds.
#[test]
fn two_nodes_share_counts_restrictions_and_releases() {
    let dir = tmpdir("limits-nodes");
    let pg = Pg::start("limits");
    let up = Upstream::start(&dir, &[]);
    let rules = "[[limits]]\nname = \"burst\"\nkey = \"sender\"\nmessages = \"6/1h\"\naction = \"defer\"\n\n[[limits]]\nname = \"hourly\"\nkey = \"sender_domain\"\nrecipients = \"20/1h\"\naction = \"hold\"\n";
    let node = |name: &str| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        Relay::start(
            &cfg(&d, &up.addr(), rules)
                .set("server", "hostname", &format!("\"{name}.relay.test\""))
                .set("store", "kind", "\"postgres\"")
                .set("store", "url", &format!("\"{}\"", pg.url())),
        )
    };
    let (a, b) = (node("a"), node("b"));
    for relay in [&a, &b] {
        let replies = send_many(relay.smtp, "frank@contoso.test", &rcpts("f", 3));
        assert!(replies.iter().all(|r| r.code == 250), "{replies:?}");
    }
    // After a sync both know the sum: six of six.
    std::thread::sleep(Duration::from_millis(2500));
    for relay in [&a, &b] {
        let mut c = Smtp::connect(relay.smtp);
        c.greet();
        assert_eq!(c.cmd("MAIL FROM:<frank@contoso.test>").code, 451);
    }
    // Twenty recipients of contoso.test across both nodes, then one more on A: held,
    // and the domain is restricted on B too.
    send_many(a.smtp, "g@contoso.test", &rcpts("g", 5));
    send_many(b.smtp, "h@contoso.test", &rcpts("h", 5));
    std::thread::sleep(Duration::from_millis(2500));
    send_many(a.smtp, "i@contoso.test", &rcpts("i", 5));
    assert!(wait_until(T, || restricted(&a).len() == 1
        || !held(&a, "i@contoso.test").is_empty()));
    assert!(
        wait_until(Duration::from_secs(5), || restricted(&b).len() == 1),
        "restriction on B within 5 s"
    );
    send_many(b.smtp, "j@contoso.test", &rcpts("j", 1));
    assert!(wait_until(T, || held(&b, "j@contoso.test").len() == 1));
    let on_a = a.get("/api/v1/queue?held=true").1["count"]
        .as_u64()
        .unwrap();
    assert!(on_a >= 1);
    // Released on A: B delivers what it holds within 5 s.
    lift(&a, "release", "sender_domain", "contoso.test");
    assert!(
        wait_until(Duration::from_secs(5), || b
            .get("/api/v1/queue?held=true")
            .1["count"]
            == 0),
        "B released within 5 s"
    );
    assert!(restricted(&b).is_empty());
    assert!(a.wait_queue_empty(T) && b.wait_queue_empty(T));
}
