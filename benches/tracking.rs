//! Tracking at scale, on the SQLite store as the relay writes it: MESSAGES (default
//! 100,000) tracked messages of three recipients each (received, routed, an attempt
//! and a delivery per recipient), then searches by recipient, sender and Message-ID.
//!
//!   cargo bench --bench tracking            (MESSAGES=100000 ROUNDS=20)
//!
//! Reports the database's size per message, and each search's median time against the
//! same search written so that no index can serve it (a full scan), in the same run.
//! Results: benches/results/tracking.md.

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smartrelay::envelope::{ContentFlags, QueueId, Reply};
use smartrelay::events::{
    Accepted, DeliveryReport, Event, Outcome, RcptResult, SpfOutcome, TenantProof,
};
use smartrelay::tracking::model::{changes, fold, Filter, Keep};
use smartrelay::tracking::recorder;
use smartrelay::tracking::Store;

fn events(i: usize, at: u64) -> Vec<Event> {
    let id = QueueId::generate();
    let rcpts: Vec<String> = (0..3)
        .map(|k| format!("r{}@partner{}.test", i * 3 + k, (i + k) % 500))
        .collect();
    let client: IpAddr = [127, 0, 0, 1].into();
    vec![
        Event::Accepted(Box::new(Accepted {
            id: id.clone(),
            ip: client,
            helo: "exchange.example.test".into(),
            tls: Some("TLSv1.3".into()),
            proof: TenantProof::Dedicated,
            sender: format!("user{}@example.test", i % 2000),
            message_id: Some(format!("m{i}@example.test")),
            subject: None,
            recipients: rcpts.clone(),
            size: 5120,
            held: None,
            at,
        })),
        Event::Routed {
            id: id.clone(),
            route: "eu".into(),
            spf: SpfOutcome::Authorized,
            at,
        },
        Event::Delivery(DeliveryReport {
            id,
            sender: format!("user{}@example.test", i % 2000),
            flags: ContentFlags::default(),
            generated_dsn: false,
            system: false,
            client,
            tls: true,
            duration_ms: 40,
            expired: false,
            route: Some("eu".into()),
            host: Some("eu-smtp-o365-outbound-1.mimecast.example:25".into()),
            at: at + 40,
            results: rcpts
                .iter()
                .map(|r| RcptResult {
                    address: r.clone(),
                    outcome: Outcome::Delivered,
                    reply: Reply::new(250, "", "Ok [Aj3QXapeMpqZYaeFwWhjzw.us32]"),
                })
                .collect(),
        }),
    ]
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn size_of(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn main() {
    let n = support::env_count("MESSAGES", 100_000);
    let rounds = support::env_count("ROUNDS", 20);
    let dir = support::tmpdir("bench-tracking");
    let db_dir = dir.join("db");
    std::fs::create_dir_all(&db_dir).unwrap();
    let path = db_dir.join("tracking.sqlite3");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = Store::open(&path).unwrap();
    let keep = Keep {
        node: "relay.bench".into(),
        subjects: false,
    };
    let t0 = Instant::now();
    let now = smartrelay::envelope::now_ms();
    let mut batch = Vec::new();
    let mut taken = 0;
    rt.block_on(async {
        for i in 0..n {
            for ev in events(i, now - (n - i) as u64) {
                changes(&ev, &keep, &mut batch);
                taken += 1;
            }
            // As the recorder writes: a batch of events, folded.
            if taken >= recorder::BATCH {
                taken = 0;
                store
                    .apply(Arc::new(fold(std::mem::take(&mut batch))))
                    .await
                    .unwrap();
            }
        }
        store.apply(Arc::new(fold(batch))).await.unwrap();
    });
    let write = t0.elapsed();
    drop(store);
    // The write-ahead log folded in, as a checkpoint leaves it.
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap();
    }
    let bytes = size_of(&db_dir);
    let store = Store::open(&path).unwrap();
    let conn = rusqlite::Connection::open(&path).unwrap();

    let mut rows = Vec::new();
    let cases: [(&str, Filter, &str); 3] = [
        (
            "recipient",
            Filter {
                recipient: Some(format!("r{}@partner{}.test", (n / 2) * 3, (n / 2) % 500)),
                ..Filter::default()
            },
            "SELECT queue_id FROM tracked_messages WHERE queue_id IN (SELECT queue_id FROM tracked_recipients WHERE lower(address) || '' = ?1) ORDER BY received_at DESC LIMIT 101",
        ),
        (
            "sender",
            Filter {
                sender: Some("user1234@example.test".into()),
                ..Filter::default()
            },
            "SELECT queue_id FROM tracked_messages WHERE lower(sender) || '' = ?1 ORDER BY received_at DESC LIMIT 101",
        ),
        (
            "Message-ID",
            Filter {
                message_id: Some(format!("m{}@example.test", n / 3)),
                ..Filter::default()
            },
            "SELECT queue_id FROM tracked_messages WHERE message_id || '' = ?1 ORDER BY received_at DESC LIMIT 101",
        ),
    ];
    for (name, filter, scan) in cases {
        let value = filter
            .recipient
            .clone()
            .or(filter.sender.clone())
            .or(filter.message_id.clone())
            .unwrap_or_default();
        let mut indexed = Vec::new();
        let mut found = 0;
        for _ in 0..rounds {
            let t = Instant::now();
            let page = rt.block_on(store.search(&filter)).unwrap();
            indexed.push(t.elapsed());
            found = page.messages.len();
        }
        assert!(found >= 1, "{name}: nothing found");
        let mut scanned = Vec::new();
        let mut st = conn.prepare(scan).unwrap();
        for _ in 0..rounds.min(5) {
            let t = Instant::now();
            let n: usize = st.query_map([&value], |_| Ok(())).unwrap().count();
            scanned.push(t.elapsed());
            assert!(n >= 1);
        }
        let (i, s) = (median(indexed), median(scanned));
        println!("search by {name}: {i:?} (full scan {s:?}), {found} found");
        rows.push(format!(
            "| {name} | {:.2} ms | {:.1} ms | {:.4} |",
            i.as_secs_f64() * 1e3,
            s.as_secs_f64() * 1e3,
            i.as_secs_f64() / s.as_secs_f64()
        ));
    }
    let per = bytes as f64 / n as f64;
    println!("{n} messages written in {write:?}; {bytes} bytes on disk, {per:.0} per message");
    let out = format!(
        "# Tracking at scale\n\nCommand: `MESSAGES={n} ROUNDS={rounds} cargo bench --bench tracking` ({} cores, {}). {n} tracked messages of three recipients (received, routed, one attempt, three deliveries each) in the SQLite store as the relay writes it.\n\n- Size: {bytes} bytes, **{per:.0} bytes per message** ({:.2} of a 5 KiB message's spool record).\n- Written in {:.1} s ({:.0} messages/s in folded batches of {} events, as the recorder writes).\n\nSearches, median of {rounds}, against the same search written so that no index can serve it (median of {}), same run:\n\n| search by | indexed | full scan | ratio |\n|---|---:|---:|---:|\n{}\n",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        smartrelay::envelope::rfc3339(smartrelay::envelope::now_ms()),
        per / 5120.0,
        write.as_secs_f64(),
        n as f64 / write.as_secs_f64(),
        recorder::BATCH,
        rounds.min(5),
        rows.join("\n")
    );
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::write(root.join("benches/results/tracking.md"), out).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
