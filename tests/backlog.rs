//! The worst day, in small: the spool's size cap, bodies read back from disk, and a
//! long-deferred message that outlives many segments, against the real binary.

mod support;

use std::time::Duration;

use support::*;

const T: Duration = Duration::from_secs(30);

/// `queue.max_size` refuses MAIL with 452 4.3.1 (and says why on /readyz) while the
/// spool is over it, and mail is taken again once delivery has made room.
#[test]
fn the_size_cap_refuses_mail_with_452_and_recovers() {
    let dir = tmpdir("max-size");
    let port = free_port();
    let cfg = Cfg::new(&dir, &format!("127.0.0.1:{port}"))
        .set("queue", "max_size", "200000")
        .set("queue", "segment_size", "65536");
    let relay = Relay::start(&cfg);
    let body = format!(
        "Subject: big\r\n\r\n{}",
        "0123456789abcdef\r\n".repeat(2800)
    );
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    // The smart host is down: each message stays queued.
    for _ in 0..5 {
        assert_eq!(
            c.mail("a@example.test", &["b@partner.test"], &body).code,
            250
        );
    }
    assert!(
        wait_until(T, || {
            let (code, ready) = relay.get("/readyz");
            code == 503 && ready["failing"].to_string().contains("queue.max_size")
        }),
        "readyz never named the size cap: {:?}",
        relay.get("/readyz")
    );
    let r = c.cmd("MAIL FROM:<a@example.test>");
    assert_eq!((r.code, r.text().contains("4.3.1")), (452, true), "{r:?}");
    assert!(relay
        .metrics()
        .contains("smartrelay_queue_refusals_total{reason=\"max_size\"} "));
    assert!(relay.metrics().contains("smartrelay_queue_accepting 0"));

    // The smart host is back: the queue drains, the spool gives its room back.
    let upstream = Upstream::start_on(&dir, port, &[]);
    assert_eq!(relay.post("/api/v1/queue/flush").0, 200);
    assert_eq!(upstream.wait_messages(5, T).len(), 5);
    assert!(relay.wait_queue_empty(T));
    assert!(
        wait_until(T, || relay.get("/readyz").0 == 200),
        "{:?}",
        relay.get("/readyz")
    );
    c.cmd("RSET");
    assert_eq!(
        c.mail("a@example.test", &["b@partner.test"], &body).code,
        250
    );
    assert_eq!(upstream.wait_messages(6, T).len(), 6);
}

/// With no memory budget for bodies, every message is read back from its segment
/// for delivery, and arrives exactly as it was received.
#[test]
fn a_body_not_kept_in_memory_is_delivered_byte_exact() {
    let dir = tmpdir("no-cache");
    let upstream = Upstream::start(&dir, &[]);
    let cfg = Cfg::new(&dir, &upstream.addr()).set("queue", "memory_budget", "0");
    let relay = Relay::start(&cfg);
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    let mut bodies = Vec::new();
    for i in 0..3 {
        // Dot-stuffing, 8-bit text, a long line and trailing spaces.
        let body = format!(
            "Subject: exact {i}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n..leading dot\r\nGr\u{fc}\u{df}e {i} \r\n{}\r\n.\r\n.x\r\n",
            "y".repeat(900)
        );
        let stuffed = body.replace("\r\n.", "\r\n..");
        let r = c.mail("a@example.test", &["b@partner.test"], &stuffed);
        assert_eq!(r.code, 250, "{r:?}");
        bodies.push(body);
    }
    let got = upstream.wait_messages(3, T);
    assert_eq!(got.len(), 3);
    for body in &bodies {
        let found = got.iter().any(|(_, data)| {
            // Our Received header goes first; everything after it is the client's.
            let text = String::from_utf8_lossy(data);
            text.ends_with(&format!("{body}\r\n")) || text.ends_with(body.as_str())
        });
        assert!(found, "not delivered byte for byte: {body:?}");
    }
    let m = relay.metrics();
    let not_cached = m
        .lines()
        .find_map(|l| l.strip_prefix("smartrelay_queue_bodies_not_cached_total "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert_eq!(
        not_cached,
        Some(3.0),
        "bodies were kept in memory after all"
    );
}

/// A message deferred while hundreds of others pass through small segments is
/// copied forward by compaction, delivered once when its recipient takes it, and not
/// again after a restart.
#[test]
fn a_deferred_message_across_many_segments_is_delivered_exactly_once() {
    let dir = tmpdir("deferred-compacted");
    let port = free_port();
    let upstream = Upstream::start_on(
        &dir,
        port,
        &[
            "--reply",
            "later@partner.test=451 4.2.0 Mailbox busy, try later",
        ],
    );
    let cfg = Cfg::new(&dir, &format!("127.0.0.1:{port}")).set("queue", "segment_size", "65536");
    let mut relay = Relay::start(&cfg);
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    let r = c.mail(
        "a@example.test",
        &["later@partner.test"],
        "Subject: the long wait\r\n\r\nstill here",
    );
    let id = queued_id(&r);
    assert!(wait_until(T, || upstream
        .rcpt_log()
        .iter()
        .any(|l| l["to"] == "later@partner.test")));
    let filler = format!("{}\r\n", "f".repeat(78)).repeat(50);
    for i in 0..300 {
        let r = c.mail(
            "a@example.test",
            &["now@partner.test"],
            &format!("Subject: filler {i}\r\n\r\n{filler}"),
        );
        assert_eq!(r.code, 250);
    }
    assert_eq!(upstream.wait_messages(300, T).len(), 300);
    assert!(
        relay.wait_log(T, |l| l["message"]
            == "compacting the oldest spool segments"),
        "the deferred message's segment was never compacted"
    );
    assert!(wait_until(T, || relay.queue().len() == 1));
    // The recipient takes mail again.
    drop(upstream);
    let upstream = Upstream::start_on(&dir, port, &[]);
    assert_eq!(relay.post("/api/v1/queue/flush").0, 200);
    assert!(relay.wait_queue_empty(T));
    let count = |u: &Upstream| {
        u.messages()
            .iter()
            .filter(|(_, d)| String::from_utf8_lossy(d).contains("the long wait"))
            .count()
    };
    assert_eq!(count(&upstream), 1);
    assert!(relay.stop().success());
    relay.restart();
    assert!(relay.queue().is_empty(), "{id} came back after a restart");
}

/// A relay restarted on a spool of 20,000 queued messages is ready with every one of
/// them indexed, and takes new mail. The spool is filled through the library from a
/// real message's envelope, as fast as the disk allows.
#[test]
fn a_restart_on_a_large_queue_indexes_it_and_serves_smtp() {
    use smartrelay::envelope::{Envelope, QueueId};
    use smartrelay::queue::file::FileSpool;
    use smartrelay::queue::spool::Spool;

    let dir = tmpdir("large-restart");
    let port = free_port();
    let cfg = Cfg::new(&dir, &format!("127.0.0.1:{port}"));
    let mut relay = Relay::start(&cfg);
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    let r = c.mail(
        "a@example.test",
        &["b@partner.test"],
        "Subject: model\r\n\r\nmodel",
    );
    let model = queued_id(&r);
    c.cmd("QUIT");
    assert!(relay.stop().success());
    let spool = dir.join("spool");
    let (env, data) = spool_message(&spool, &model).expect("the model message");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let s = std::sync::Arc::new(FileSpool::open(&spool).unwrap());
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let (s, env, data) = (s.clone(), env.clone(), data.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..1000 {
                    let mut v = env.clone();
                    v["id"] = serde_json::Value::String(QueueId::generate().as_str().into());
                    let e: Envelope = serde_json::from_value(v).unwrap();
                    s.store(
                        &e,
                        smartrelay::message::Data::Memory(bytes::Bytes::from(data.clone())),
                    )
                    .await
                    .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    relay.restart();
    assert!(relay
        .log_json()
        .iter()
        .any(|l| l["message"] == "ready" && l["queued"] == 20_001));
    assert_eq!(relay.queue().len(), 20_001);
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    let r = c.mail(
        "a@example.test",
        &["b@partner.test"],
        "Subject: after\r\n\r\nnew",
    );
    assert_eq!(r.code, 250);
}
