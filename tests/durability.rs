//! Nothing that got a 250 is ever lost: restart and kill -9 against the real binary.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;

#[test]
fn queued_mail_survives_a_restart_and_is_then_delivered() {
    let dir = tmpdir("restart");
    let port = free_port();
    let cfg = Cfg::new(&dir, &format!("127.0.0.1:{port}"));
    let mut relay = Relay::start(&cfg);
    let mut ids = Vec::new();
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    for i in 0..5 {
        let r = c.mail(
            "a@example.test",
            &["b@partner.test"],
            &format!("Subject: m{i}\r\n\r\nbody {i}"),
        );
        ids.push(queued_id(&r));
    }
    drop(c);
    assert!(relay.stop().success());
    relay.restart();
    let queued: Vec<String> = relay
        .queue()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(queued, ids);
    // The smart host comes back; a flush sends everything, byte for byte.
    let upstream = Upstream::start_on(&dir, port, &[]);
    assert_eq!(relay.post("/api/v1/queue/flush").0, 200);
    let got = upstream.wait_messages(5, Duration::from_secs(20));
    assert_eq!(got.len(), 5);
    for (i, id) in ids.iter().enumerate() {
        let (_, data) = got
            .iter()
            .find(|(_, d)| String::from_utf8_lossy(d).contains(&format!("id {id}")))
            .expect("delivered");
        assert!(
            String::from_utf8_lossy(data).ends_with(&format!("Subject: m{i}\r\n\r\nbody {i}\r\n"))
        );
    }
    assert!(relay.wait_queue_empty(Duration::from_secs(10)));
    assert!(spool_ids(&dir.join("spool")).is_empty());
    // Delivered is final: after a clean stop nothing comes back to be sent again.
    relay.restart();
    assert!(relay.queue().is_empty());
    assert_eq!(upstream.messages().len(), 5);
}

#[test]
fn kill_9_during_a_burst_loses_no_acknowledged_message() {
    let dir = tmpdir("kill9");
    let cfg = Cfg::new(&dir, &format!("127.0.0.1:{}", free_port()));
    let mut relay = Relay::start(&cfg);
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..6)
        .map(|w| {
            let (acked, stop, addr) = (acked.clone(), stop.clone(), relay.smtp);
            std::thread::spawn(move || {
                let mut n = 0;
                'session: while !stop.load(Ordering::SeqCst) {
                    let Ok(stream) = std::net::TcpStream::connect(addr) else { return };
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut c = Smtp::from_stream(stream);
                    if c.try_reply().map(|r| r.code) != Some(220) {
                        return;
                    }
                    c.send(b"EHLO burst.test\r\n");
                    if c.try_reply().is_none() {
                        return;
                    }
                    for _ in 0..20 {
                        n += 1;
                        let msg = format!(
                            "MAIL FROM:<w{w}@example.test>\r\nRCPT TO:<r@partner.test>\r\nDATA\r\nSubject: {w}-{n}\r\n\r\n{}\r\n.\r\n",
                            "payload ".repeat(200)
                        );
                        c.send(&msg.into_bytes());
                        let codes: Vec<Option<Reply>> = (0..4).map(|_| c.try_reply()).collect();
                        match codes.last().cloned().flatten() {
                            Some(r) if r.code == 250 => acked.lock().unwrap().push(queued_id(&r)),
                            _ => continue 'session,
                        }
                    }
                }
            })
        })
        .collect();
    assert!(wait_until(Duration::from_secs(30), || acked
        .lock()
        .unwrap()
        .len()
        >= 300));
    relay.kill9();
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        let _ = w.join();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 300);
    relay.restart();
    let queued: std::collections::HashSet<String> = relay
        .queue()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    let missing: Vec<&String> = acked.iter().filter(|id| !queued.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged messages lost: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    // Whatever is queued is whole: recovered messages have their full body.
    for id in queued.iter().take(50) {
        let (env, data) = spool_message(&dir.join("spool"), id).unwrap();
        assert_eq!(env["size"].as_u64().unwrap() as usize, data.len());
        assert!(
            String::from_utf8_lossy(&data).ends_with(&format!("{}\r\n", "payload ".repeat(200)))
        );
    }
    assert!(
        !dir.join("spool/corrupt").exists(),
        "no entry was unreadable"
    );
}

/// SIGTERM while deliveries wait on a slow smart host (3 s per DATA): shutdown lets
/// them finish and records their results, so after a restart and a flush every
/// message has been delivered once, none twice and none lost.
#[test]
fn sigterm_with_deliveries_in_flight_delivers_nothing_twice() {
    let dir = tmpdir("sigterm-inflight");
    let upstream = Upstream::start(&dir, &["--data-delay", "3"]);
    let cfg = Cfg::new(&dir, &upstream.addr()).set("server", "shutdown_timeout", "\"10s\"");
    let mut relay = Relay::start(&cfg);
    let mut c = Smtp::connect(relay.smtp);
    c.greet();
    for i in 0..30 {
        let r = c.mail(
            "a@example.test",
            &["b@partner.test"],
            &format!("Subject: inflight {i}\r\n\r\nbody {i}"),
        );
        assert_eq!(r.code, 250);
    }
    c.cmd("QUIT");
    // The first ones have reached the smart host and wait for its answer.
    assert!(!upstream
        .wait_messages(1, Duration::from_secs(20))
        .is_empty());
    assert!(relay.stop().success());
    relay.restart();
    assert_eq!(relay.post("/api/v1/queue/flush").0, 200);
    assert!(relay.wait_queue_empty(Duration::from_secs(60)));
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for (_, data) in upstream.messages() {
        let text = String::from_utf8_lossy(&data).into_owned();
        if let Some(subject) = text.lines().find(|l| l.starts_with("Subject: inflight ")) {
            *seen.entry(subject.to_string()).or_default() += 1;
        }
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered twice: {twice:?}");
    assert_eq!(seen.len(), 30, "lost: {} of 30 delivered", seen.len());
}
