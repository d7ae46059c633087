//! Message tracking from outside (issue 24): what happened to message X, through the
//! API, the CLI and the dashboard, with aiosmtpd upstreams, real SQLite and two nodes on
//! one PostgreSQL.

mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde_json::Value;
use support::cluster::Pg;
use support::*;

const T: Duration = Duration::from_secs(30);
const TENANT: &str = "3f2a9c1e-7b4d-4e8a-9c61-2d5e8f0a1b7c";
const GATEWAY_REPLY: &str = "250 Ok [Aj3QXapeMpqZYaeFwWhjzw.us32]";

fn letter(from: &str, subject: &str, id: &str) -> String {
    format!(
        "From: {from}\r\nTo: bob@partner.test\r\nSubject: {subject}\r\nMessage-ID: <{id}>\r\n\r\nHello Bob.\r\n"
    )
}

fn send(addr: SocketAddr, from_ip: &str, sender: &str, rcpts: &[&str], data: &str) -> Reply {
    let ip: IpAddr = from_ip.parse().unwrap();
    let mut c = Smtp::connect_from(ip, addr);
    c.greet();
    c.expect(&format!("MAIL FROM:<{sender}>"), 250);
    for r in rcpts {
        c.expect(&format!("RCPT TO:<{r}>"), 250);
    }
    c.expect("DATA", 354);
    c.send(data.as_bytes());
    c.send(b".\r\n");
    let r = c.reply();
    c.cmd("QUIT");
    r
}

fn search(relay: &Relay, query: &str) -> Vec<Value> {
    let (s, v) = relay.get(&format!("/api/v1/messages?{query}"));
    assert_eq!(s, 200, "{v}");
    v["messages"].as_array().cloned().unwrap_or_default()
}

fn record(relay: &Relay, id: &str) -> Value {
    let (s, v) = relay.get(&format!("/api/v1/messages/{id}"));
    assert_eq!(s, 200, "{v}");
    v
}

/// Waits until the record of `id` satisfies `ok` (tracking writes a batch a second).
fn wait_record(relay: &Relay, id: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let found = wait_until(T, || {
        let (s, v) = relay.get(&format!("/api/v1/messages/{id}"));
        last = v;
        s == 200 && ok(&last)
    });
    assert!(found, "{last}");
    last
}

fn types(r: &Value) -> Vec<String> {
    r["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_string())
        .collect()
}

/// Found by Message-ID, by sender and by recipient; the gateway's reply and its
/// reference kept word for word; the subject only when asked for.
#[test]
fn a_delivered_message_is_found_with_the_gateways_reply() {
    let dir = tmpdir("tracking-delivered");
    let up = Upstream::start(&dir, &["--data-reply", GATEWAY_REPLY]);
    let relay = Relay::start(&Cfg::new(&dir, &up.addr()));
    let r = send(
        relay.smtp,
        "127.0.0.1",
        "Alice@example.test",
        &["bob@partner.test", "carol@partner.test"],
        &letter("alice@example.test", "Quarterly figures", "q4@example.test"),
    );
    let id = queued_id(&r);
    let rec = wait_record(&relay, &id, |v| v["status"] == "delivered");
    assert_eq!(rec["node"], "relay.test");
    assert_eq!(rec["sender"], "alice@example.test");
    assert_eq!(rec["message_id"], "q4@example.test");
    assert_eq!(rec["proof"], "dedicated");
    assert_eq!(rec["client"], "127.0.0.1");
    assert_eq!(rec["helo"], "client.test");
    assert!(rec.get("subject").is_none(), "subjects are off by default");
    let bob = &rec["recipients"][0];
    assert_eq!(bob["address"], "bob@partner.test");
    assert_eq!(bob["status"], "delivered");
    assert_eq!(bob["attempts"][0]["reply"], GATEWAY_REPLY);
    assert_eq!(bob["attempts"][0]["route"], "eu");
    assert_eq!(bob["attempts"][0]["host"], up.addr());
    assert!(bob["attempts"][0]["duration_ms"].is_u64());
    let t = types(&rec);
    assert_eq!(&t[..3], ["received", "routed", "attempt"], "{t:?}");
    assert_eq!(t.iter().filter(|e| *e == "delivered").count(), 2);

    for q in [
        "message_id=%3Cq4%40example.test%3E",
        "sender=alice%40example.test",
        "recipient=CAROL%40partner.test",
        "status=delivered",
    ] {
        let found = search(&relay, q);
        assert_eq!(found.len(), 1, "{q}: {found:?}");
        assert_eq!(found[0]["queue_id"], id.as_str());
        assert_eq!(found[0]["status"], "delivered");
        assert_eq!(found[0]["recipients"].as_array().unwrap().len(), 2);
    }
    assert!(search(&relay, "recipient=nobody%40partner.test").is_empty());
    for bad in [
        "status=lost",
        "since=yesterdayish",
        "limit=0",
        "cursor=x",
        "colour=red",
    ] {
        let (s, v) = relay.get(&format!("/api/v1/messages?{bad}"));
        assert_eq!(s, 400, "{bad}: {v}");
    }
    let (s, _) = relay.get("/api/v1/messages/0000000000000000000F");
    assert_eq!(s, 404);

    // The CLI: one match prints the timeline.
    let out = relay.cli(&["trace", "--message-id", "q4@example.test"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&id) && text.contains("delivered") && text.contains(GATEWAY_REPLY),
        "{text}"
    );
    // The dashboard: the search page lists it and links its timeline.
    let (_, page) = http_text(
        "GET",
        &relay.url("/messages?sender=alice%40example.test"),
        None,
    );
    assert!(page.contains(&format!("href=\"/messages/{id}\"")), "{page}");
    let (_, timeline) = http_text("GET", &relay.url(&format!("/messages/{id}")), None);
    assert!(
        timeline.contains("Aj3QXapeMpqZYaeFwWhjzw.us32"),
        "{timeline}"
    );
    let (_, main) = http_text("GET", &relay.url("/"), None);
    assert!(main.contains("href=\"/messages\""));

    // With subjects on, the subject is kept.
    let dir = tmpdir("tracking-subjects");
    let relay = Relay::start(&Cfg::new(&dir, &up.addr()).set("tracking", "subjects", "true"));
    let r = send(
        relay.smtp,
        "127.0.0.1",
        "alice@example.test",
        &["bob@partner.test"],
        &letter("alice@example.test", "Quarterly figures", "s@example.test"),
    );
    let rec = wait_record(&relay, &queued_id(&r), |v| v["status"] == "delivered");
    assert_eq!(rec["subject"], "Quarterly figures");
}

/// A greylisting upstream: the first attempt is deferred, the second delivers; both
/// attempts are on the recipient, in order.
#[test]
fn deferred_then_delivered_keeps_both_attempts() {
    let dir = tmpdir("tracking-deferred");
    let up = Upstream::start(&dir, &["--greylist"]);
    let relay = Relay::start(&Cfg::new(&dir, &up.addr()));
    let r = send(
        relay.smtp,
        "127.0.0.1",
        "alice@example.test",
        &["bob@partner.test"],
        &letter("alice@example.test", "retry", "retry@example.test"),
    );
    let id = queued_id(&r);
    wait_record(&relay, &id, |v| v["status"] == "deferred");
    // The retry, now rather than in a minute.
    assert_eq!(relay.post("/api/v1/queue/flush").0, 200);
    let rec = wait_record(&relay, &id, |v| v["status"] == "delivered");
    let attempts = rec["recipients"][0]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{rec}");
    assert!(
        attempts[0]["reply"].as_str().unwrap().starts_with("451"),
        "{rec}"
    );
    assert!(
        attempts[1]["reply"].as_str().unwrap().starts_with("250"),
        "{rec}"
    );
    assert!(attempts[0]["at"].as_u64() <= attempts[1]["at"].as_u64());
    let t = types(&rec);
    let deferred = t.iter().position(|e| e == "deferred").unwrap();
    let delivered = t.iter().position(|e| e == "delivered").unwrap();
    assert!(deferred < delivered, "{t:?}");
}

/// A bounce, and the queue id of the DSN sent for it.
#[test]
fn a_bounce_names_its_dsn() {
    let dir = tmpdir("tracking-bounce");
    let up = Upstream::start(
        &dir,
        &["--reply", "nobody@partner.test=550 5.1.1 No such user"],
    );
    let relay = Relay::start(&Cfg::new(&dir, &up.addr()));
    let r = send(
        relay.smtp,
        "127.0.0.1",
        "alice@example.test",
        &["nobody@partner.test"],
        &letter("alice@example.test", "bounce", "b@example.test"),
    );
    let rec = wait_record(&relay, &queued_id(&r), |v| {
        v["status"] == "bounced" && !v["dsns"].as_array().unwrap().is_empty()
    });
    let dsn = rec["dsns"][0].as_str().unwrap();
    assert_eq!(dsn.len(), 20);
    assert!(rec["recipients"][0]["attempts"][0]["reply"]
        .as_str()
        .unwrap()
        .contains("No such user"));
    assert!(types(&rec).contains(&"dsn".to_string()));
    // The DSN itself went to alice.
    assert!(up
        .wait_messages(1, T)
        .iter()
        .any(|(e, _)| e["rcpt_tos"][0] == "alice@example.test"));
}

/// A message from a shared range without tenant proof is refused after DATA, and its
/// record is found by sender with the reply it got.
#[test]
fn a_message_refused_for_tenant_proof_is_found_by_sender() {
    let dir = tmpdir("tracking-refused");
    let up = Upstream::start(&dir, &[]);
    let relay = Relay::start(
        &Cfg::new(&dir, &up.addr())
            .set("access", "allowed_ranges", "[\"127.0.0.1/32\"]")
            .set(
                "access",
                "shared_ranges",
                &format!("[{{ platform = \"o365\", ranges = [\"127.0.0.2/32\"], tenant_id = \"{TENANT}\" }}]"),
            ),
    );
    let r = send(
        relay.smtp,
        "127.0.0.2",
        "mallory@example.test",
        &["bob@partner.test"],
        &letter("mallory@example.test", "unproven", "u@example.test"),
    );
    assert_eq!(r.code, 550);
    let mut found = Vec::new();
    assert!(wait_until(T, || {
        found = search(&relay, "sender=mallory%40example.test");
        !found.is_empty()
    }));
    assert_eq!(found[0]["status"], "refused");
    let rec = record(&relay, found[0]["queue_id"].as_str().unwrap());
    assert_eq!(rec["client"], "127.0.0.2");
    assert_eq!(rec["message_id"], "u@example.test");
    assert_eq!(rec["recipients"][0]["status"], "refused");
    let refused = &rec["events"][0];
    assert_eq!(refused["type"], "refused");
    assert!(
        refused["reply"].as_str().unwrap().starts_with("550 5.7.1"),
        "{rec}"
    );
    assert!(relay.queue().is_empty());
}

/// An operator holds a waiting message and releases it: both in its timeline.
#[test]
fn a_manual_hold_and_release_are_recorded() {
    let dir = tmpdir("tracking-hold");
    let port = free_port();
    let relay = Relay::start(&Cfg::new(&dir, &format!("127.0.0.1:{port}")));
    let r = send(
        relay.smtp,
        "127.0.0.1",
        "alice@example.test",
        &["bob@partner.test"],
        &letter("alice@example.test", "hold", "h@example.test"),
    );
    let id = queued_id(&r);
    wait_record(&relay, &id, |v| v["status"] == "deferred");
    let (s, _) = relay.post(&format!("/api/v1/queue/{id}/hold"));
    assert_eq!(s, 200);
    let rec = wait_record(&relay, &id, |v| v["status"] == "held");
    assert_eq!(rec["holds"][0]["reason"]["kind"], "manual");
    // Up comes the smart host; the release delivers.
    let up = Upstream::start_on(&dir, port, &[]);
    let (s, _) = relay.post(&format!("/api/v1/queue/{id}/release"));
    assert_eq!(s, 200);
    let rec = wait_record(&relay, &id, |v| v["status"] == "delivered");
    let t = types(&rec);
    let held = t.iter().position(|e| e == "held").unwrap();
    let released = t.iter().position(|e| e == "released").unwrap();
    assert!(
        held < released && released < t.iter().rposition(|e| e == "delivered").unwrap(),
        "{t:?}"
    );
    assert_eq!(up.messages().len(), 1);
    assert_eq!(search(&relay, "status=delivered").len(), 1);
}

/// Records older than `tracking.retention` are pruned (at start, then hourly).
#[test]
fn old_records_are_pruned() {
    let dir = tmpdir("tracking-prune");
    let up = Upstream::start(&dir, &[]);
    let mut relay =
        Relay::start(&Cfg::new(&dir, &up.addr()).set("tracking", "retention", "\"2s\""));
    let r = send(
        relay.smtp,
        "127.0.0.1",
        "alice@example.test",
        &["bob@partner.test"],
        &letter("alice@example.test", "old", "old@example.test"),
    );
    let id = queued_id(&r);
    wait_record(&relay, &id, |v| v["status"] == "delivered");
    std::thread::sleep(Duration::from_millis(2500));
    relay.restart();
    assert!(wait_until(T, || relay
        .get(&format!("/api/v1/messages/{id}"))
        .0
        == 404));
    assert!(search(&relay, "sender=alice%40example.test").is_empty());
}

/// Two nodes on one PostgreSQL: node B answers for a message node A took.
#[test]
fn any_node_answers_for_every_node() {
    let dir = tmpdir("tracking-nodes");
    let pg = Pg::start("tracking");
    let up = Upstream::start(&dir, &["--data-reply", GATEWAY_REPLY]);
    let node = |name: &str| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        Relay::start(
            &Cfg::new(&d, &up.addr())
                .set("server", "hostname", &format!("\"{name}.relay.test\""))
                .set("store", "kind", "\"postgres\"")
                .set("store", "url", &format!("\"{}\"", pg.url())),
        )
    };
    let (a, b) = (node("a"), node("b"));
    let r = send(
        a.smtp,
        "127.0.0.1",
        "alice@example.test",
        &["bob@partner.test"],
        &letter("alice@example.test", "nodes", "n@example.test"),
    );
    let id = queued_id(&r);
    let rec = wait_record(&b, &id, |v| v["status"] == "delivered");
    assert_eq!(rec["node"], "a.relay.test");
    assert_eq!(rec["recipients"][0]["attempts"][0]["reply"], GATEWAY_REPLY);
    let found = search(&b, "message_id=n%40example.test");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0]["node"], "a.relay.test");
}

/// A PostgreSQL database written before timelines were kept as arrays: the lines it
/// holds read back the same through the API once a relay has migrated it.
#[test]
fn lines_kept_one_per_row_survive_the_postgres_migration() {
    let dir = tmpdir("tracking-pg-migration");
    let pg = Pg::start("tracking-migration");
    let first = smartrelay::store::schema::TRACKING.migrations[0].postgres;
    let id = "661F95FE027980000000";
    // Recent: the relay prunes what is older than its retention when it starts.
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    pg.query(&format!(
        "{first};
         CREATE TABLE smartrelay_schema_versions(name TEXT PRIMARY KEY, version BIGINT NOT NULL);
         INSERT INTO smartrelay_schema_versions VALUES('tracking', 1);
         INSERT INTO tracked_messages VALUES('{id}', 'old.relay.test', {at}, '127.0.0.1', 'h',
            NULL, 'dedicated', 'a@example.test', 'm@x', 10, NULL, 'deferred');
         INSERT INTO tracked_recipients VALUES('{id}', 'b@p.test', 'deferred');
         INSERT INTO tracked_events(queue_id, at, type, recipient, detail)
            VALUES('{id}', {at}, 'received', NULL, '{{\"size\":10}}'),
                  ('{id}', {at} + 1, 'deferred', 'b@p.test',
                   '{{\"reply\":\"451 4.3.0 later\",\"host\":null,\"tls\":false}}');"
    ));
    let up = Upstream::start(&dir, &[]);
    let relay = Relay::start(
        &Cfg::new(&dir, &up.addr())
            .set("store", "kind", "\"postgres\"")
            .set("store", "url", &format!("\"{}\"", pg.url())),
    );
    let rec = record(&relay, id);
    assert_eq!(types(&rec), ["received", "deferred"], "{rec}");
    assert_eq!(rec["events"][0]["size"], 10);
    assert_eq!(rec["events"][1]["recipient"], "b@p.test");
    assert_eq!(rec["events"][1]["reply"], "451 4.3.0 later");
    assert_eq!(
        rec["recipients"][0]["attempts"][0]["reply"],
        "451 4.3.0 later"
    );
    // New lines get ids after the ones carried over.
    assert_eq!(
        pg.query("SELECT nextval(pg_get_serial_sequence('tracked_lines', 'id')) > 2"),
        "t"
    );
    assert_eq!(
        pg.query("SELECT to_regclass('tracked_events') IS NULL"),
        "t"
    );
}
