//! Scale-out, from outside: two relay nodes behind a real HAProxy (TCP, PROXY v2) with
//! their shared state on a real PostgreSQL (a throwaway `initdb` cluster), each with
//! its own spool. Everything on loopback.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use support::cluster::{Haproxy, Pg};
use support::*;

const T: Duration = Duration::from_secs(60);

fn node(dir: &Path, name: &str, upstream: &str, pg: &Pg, port: u16) -> Relay {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let cfg = Cfg::new(&d, upstream)
        .set("server", "hostname", &format!("\"{name}.relay.test\""))
        .set("server", "listen", &format!("[\"127.0.0.1:{port}\"]"))
        .set("access", "allowed_ranges", "[\"127.0.0.0/8\"]")
        .set("server.proxy_protocol", "trusted", "[\"127.0.0.1/32\"]")
        .set("store", "kind", "\"postgres\"")
        .set("store", "url", &format!("\"{}\"", pg.url()));
    Relay::start(&cfg)
}

/// `n` messages from `threads` sessions through `to`, recipient i % 50, each with its
/// own Message-ID; returns how many were accepted. From 127.0.0.2: 127.0.0.1 is the
/// balancer's address, whose connections must start with a PROXY header.
fn send(to: SocketAddr, first: usize, n: usize, threads: usize) -> usize {
    let out = python(&format!(
        r#"
import smtplib, threading
ok = []
def run(t):
    s = smtplib.SMTP("127.0.0.1", {port}, timeout=60, source_address=("127.0.0.2", 0))
    s.ehlo("client.test")
    for i in range({first} + t, {first} + {n}, {threads}):
        s.sendmail("alice@example.test", ["r%d@partner.test" % (i % 50)],
                   "Subject: m%d\r\nMessage-ID: <m%d@client.test>\r\n\r\nbody %d\r\n" % (i, i, i))
        ok.append(i)
    s.quit()
ts = [threading.Thread(target=run, args=(t,)) for t in range({threads})]
[t.start() for t in ts]
[t.join() for t in ts]
print(len(ok))
"#,
        port = to.port()
    ));
    out.trim().parse().unwrap()
}

fn message_ids(up: &Upstream) -> Vec<String> {
    up.messages()
        .iter()
        .filter_map(|(_, data)| {
            let text = String::from_utf8_lossy(data);
            text.lines()
                .find_map(|l| l.strip_prefix("Message-ID: "))
                .map(str::to_string)
        })
        .collect()
}

fn sources(relay: &Relay) -> Vec<String> {
    let (_, v) = relay.get("/api/v1/onboarding/outbound-ips");
    v["sources"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["ip"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn exactly_once(ids: &[String], expected: usize) {
    let distinct: BTreeSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), expected, "every message arrived");
    assert_eq!(ids.len(), expected, "none arrived twice");
}

#[test]
fn two_nodes_behind_haproxy_share_state_and_deliver_exactly_once() {
    let dir = tmpdir("cluster-two");
    let pg = Pg::start("two");
    let up_port = free_port();
    let mut up = Upstream::start_on(&dir, up_port, &[]);
    let (pa, pb) = (free_port(), free_port());
    let mut a = node(&dir, "a", &up.addr(), &pg, pa);
    let b = node(&dir, "b", &up.addr(), &pg, pb);
    let lb = Haproxy::start(&dir, &[a.smtp, b.smtp]);

    // 2,000 messages through the balancer: each delivered once, both nodes used.
    assert_eq!(send(lb.addr(), 0, 2000, 8), 2000);
    assert!(wait_until(T, || up.messages().len() >= 2000));
    exactly_once(&message_ids(&up), 2000);
    let (on_a, on_b) = (
        a.metric("smartrelay_messages_accepted_total")
            .unwrap_or(0.0),
        b.metric("smartrelay_messages_accepted_total")
            .unwrap_or(0.0),
    );
    assert_eq!(on_a + on_b, 2000.0);
    assert!(on_a > 0.0 && on_b > 0.0, "a {on_a}, b {on_b}");

    // The trusted list in PostgreSQL: every delivery counted once, by both nodes.
    assert!(wait_until(T, || {
        pg.query("SELECT COALESCE(SUM(count), 0) FROM recipients") == "2000"
    }));
    assert_eq!(pg.query("SELECT COUNT(*) FROM recipients"), "50");
    assert_eq!(pg.query("SELECT SUM(count) FROM pairs"), "2000");
    let (_, stats) = b.get("/api/v1/trusted-senders/stats");
    assert_eq!(stats["recipients"], 50, "{stats}");

    // A source first seen on node A shows on node B's onboarding page.
    let mut direct = Smtp::connect(a.smtp);
    direct.send(b"PROXY TCP4 127.0.0.77 127.0.0.1 40000 25\r\n");
    direct.greet();
    direct.expect("QUIT", 221);
    assert!(wait_until(T, || sources(&b).contains(&"127.0.0.77".to_string())));

    // Smart host down: both nodes queue. Then node A dies; the balancer sends the
    // next messages to B.
    drop(up);
    for i in 0..20 {
        assert_eq!(send(lb.addr(), 2000 + i, 1, 1), 1);
    }
    assert!(wait_until(T, || !a.queue().is_empty() && !b.queue().is_empty()));
    let queued_on_a = a.queue().len();
    // The queue API is one node's, and says which.
    assert_eq!(a.get("/api/v1/queue").1["node"], "a.relay.test");
    a.kill9();
    for i in 0..10 {
        assert_eq!(send(lb.addr(), 2020 + i, 1, 1), 1, "B takes what A cannot");
    }
    assert_eq!(b.queue().len(), 20 - queued_on_a + 10);

    // The smart host is back; B delivers, and A's spool is delivered when A returns.
    up = Upstream::start_on(&dir, up_port, &[]);
    b.post("/api/v1/queue/flush");
    assert!(b.wait_queue_empty(T));
    a.restart();
    assert_eq!(a.queue().len(), queued_on_a, "A's spool survived kill -9");
    a.post("/api/v1/queue/flush");
    assert!(a.wait_queue_empty(T));
    assert!(wait_until(T, || up.messages().len() >= 2030));
    exactly_once(&message_ids(&up), 2030);
}

#[test]
fn a_postgresql_outage_never_stops_mail() {
    let dir = tmpdir("cluster-outage");
    let pg = Pg::start("outage");
    let up = Upstream::start(&dir, &[]);
    let relay = node(&dir, "solo", &up.addr(), &pg, free_port());
    assert_eq!(send(relay.smtp, 0, 50, 2), 50);
    assert!(wait_until(T, || pg
        .query("SELECT COALESCE(SUM(count), 0) FROM recipients")
        == "50"));
    let (status, _) = relay.get("/readyz");
    assert_eq!(status, 200);

    pg.stop();
    // Mail keeps flowing while the store is gone, from a source it has not seen yet
    // too.
    assert_eq!(send(relay.smtp, 50, 100, 2), 100);
    let mut newcomer = Smtp::connect_from("127.0.0.9".parse().unwrap(), relay.smtp);
    newcomer.greet();
    newcomer.expect("QUIT", 221);
    assert!(wait_until(T, || up.messages().len() >= 150));
    let (status, v) = relay.get("/readyz");
    assert_eq!(status, 503, "{v}");
    let failing: Vec<Value> = v["failing"].as_array().cloned().unwrap_or_default();
    assert!(
        failing
            .iter()
            .any(|f| f.as_str().is_some_and(|s| s.starts_with("store: "))),
        "{v}"
    );

    // Back: what was buffered is recorded, nothing counted twice.
    pg.restart();
    assert!(wait_until(T, || pg
        .query("SELECT COALESCE(SUM(count), 0) FROM recipients")
        == "150"));
    assert!(wait_until(T, || relay.get("/readyz").0 == 200));
    assert_eq!(
        relay
            .metric("smartrelay_trusted_observations_dropped_total")
            .unwrap_or(0.0),
        0.0
    );
    // The flow counters and the sources seen during the outage were held and written:
    // the onboarding summary counts all 150 messages, once each.
    assert!(
        wait_until(T, || {
            let (_, v) = relay.get("/api/v1/onboarding/summary?window=24h");
            v["accepted"] == 150 && v["delivered"] == 150
        }),
        "{}",
        relay.get("/api/v1/onboarding/summary?window=24h").1
    );
    assert!(sources(&relay).contains(&"127.0.0.9".to_string()));
    assert_eq!(
        relay
            .metric("smartrelay_activity_events_dropped_total")
            .unwrap_or(0.0),
        0.0
    );
}
