//! Scale-out costs, measured in one run against references from the same run:
//!
//! 1. Recording the trusted-sender list: observations per second into PostgreSQL (a
//!    throwaway `initdb` cluster on loopback) against the embedded SQLite file, through
//!    the same `trusted::Store` calls the recorder makes (batches of 512).
//! 2. End to end: accepted messages per second through HAProxy (PROXY v2) to two nodes
//!    against one node direct, both nodes on the same PostgreSQL and smtp-sink.
//!
//!   cargo bench --bench scale_out        (OBSERVATIONS=100000 MESSAGES=6000 SESSIONS=20)
//!
//! Loopback only; writes benches/results/scale_out.md.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use smartrelay::trusted::policy::Observation;
use smartrelay::trusted::Store;
use support::cluster::{Haproxy, Pg};
use support::*;

fn observations(n: usize) -> Vec<Observation> {
    (0..n)
        .map(|i| Observation {
            sender: format!("user{}@example.test", i % 200),
            recipient: format!("r{}@partner{}.test", i % 20_000, i % 100),
            domain: format!("partner{}.test", i % 100),
            at: 1_796_000_000_000 + i as u64,
        })
        .collect()
}

async fn record_rate(store: &Store, obs: &[Observation]) -> f64 {
    let started = Instant::now();
    for batch in obs.chunks(512) {
        store
            .record(std::sync::Arc::new(batch.to_vec()))
            .await
            .expect("record");
    }
    obs.len() as f64 / started.elapsed().as_secs_f64()
}

/// `sessions` connections from `from`, `total` 2 KiB messages in all; returns msg/s.
fn load(addr: SocketAddr, from: IpAddr, total: usize, sessions: usize) -> f64 {
    let mut payload = b"Subject: bench\r\n\r\n".to_vec();
    payload.extend(std::iter::repeat_n(b'x', 2048));
    payload.extend_from_slice(b"\r\n.\r\n");
    let payload = std::sync::Arc::new(payload);
    let started = Instant::now();
    let threads: Vec<_> = (0..sessions)
        .map(|i| {
            let payload = payload.clone();
            let n = total / sessions + usize::from(i < total % sessions);
            std::thread::spawn(move || {
                let mut c = Smtp::connect_from(from, addr);
                c.stream.set_nodelay(true).expect("TCP_NODELAY");
                c.greet();
                for k in 0..n {
                    c.expect("MAIL FROM:<alice@example.test>", 250);
                    c.expect(&format!("RCPT TO:<r{}@partner.test>", k % 500), 250);
                    c.expect("DATA", 354);
                    c.send(&payload);
                    assert_eq!(c.reply().code, 250);
                }
                c.cmd("QUIT");
            })
        })
        .collect();
    for t in threads {
        t.join().expect("load thread");
    }
    total as f64 / started.elapsed().as_secs_f64()
}

fn node(dir: &std::path::Path, name: &str, sink: &str, pg: &Pg) -> Relay {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).expect("node dir");
    let cfg = Cfg::new(&d, sink)
        // Thousands from one sender: no limits, stated.
        .set("", "limits", "[]")
        .set(
            "server",
            "listen",
            &format!("[\"127.0.0.1:{}\"]", free_port()),
        )
        .set("server", "hostname", &format!("\"{name}.relay.test\""))
        .set("server.proxy_protocol", "trusted", "[\"127.0.0.1/32\"]")
        .set("store", "kind", "\"postgres\"")
        .set("store", "url", &format!("\"{}\"", pg.url()));
    Relay::start(&cfg)
}

fn main() {
    let n_obs = env_count("OBSERVATIONS", 100_000);
    let messages = env_count("MESSAGES", 6000);
    let sessions = env_count("SESSIONS", 20);
    let dir = tmpdir("bench-scale-out");
    // Durable, like the SQLite side (synchronous=FULL): fsync on.
    let pg = Pg::start_with("bench", true);
    let rt = tokio::runtime::Runtime::new().expect("runtime");

    // 1. Recording.
    let obs = observations(n_obs);
    let (sqlite_rate, pg_rate) = rt.block_on(async {
        let sqlite = Store::open(&dir.join("trusted.sqlite3")).expect("sqlite");
        let cfg = smartrelay::config::StoreConfig {
            kind: smartrelay::config::StoreKind::Postgres,
            url: Some(pg.url()),
            ..Default::default()
        };
        let shared = smartrelay::store::Postgres::new(&cfg).expect("pool");
        shared
            .migrate(smartrelay::store::schema::ALL)
            .await
            .expect("migrate");
        let postgres = Store::shared(shared);
        // Alternate so neither side gets the warmer disk.
        let s1 = record_rate(&sqlite, &obs).await;
        let p1 = record_rate(&postgres, &obs).await;
        let p2 = record_rate(&postgres, &obs).await;
        let s2 = record_rate(&sqlite, &obs).await;
        ((s1 + s2) / 2.0, (p1 + p2) / 2.0)
    });
    println!("recording: sqlite {sqlite_rate:.0}/s, postgres {pg_rate:.0}/s");

    // 2. End to end.
    let sink_port = free_port();
    let mut sink = std::process::Command::new("/usr/sbin/smtp-sink")
        .args(["-u", "nobody", &format!("127.0.0.1:{sink_port}"), "256"])
        .spawn()
        .expect("smtp-sink (Debian postfix)");
    let sink_addr = format!("127.0.0.1:{sink_port}");
    let a = node(&dir, "a", &sink_addr, &pg);
    let b = node(&dir, "b", &sink_addr, &pg);
    let lb = Haproxy::start(&dir, &[a.smtp, b.smtp]);
    let client: IpAddr = "127.0.0.2".parse().expect("address");
    load(a.smtp, client, 500, 4);
    load(lb.addr(), client, 500, 4);
    let direct1 = load(a.smtp, client, messages, sessions);
    let balanced1 = load(lb.addr(), client, messages, sessions);
    let balanced2 = load(lb.addr(), client, messages, sessions);
    let direct2 = load(a.smtp, client, messages, sessions);
    let (direct, balanced) = ((direct1 + direct2) / 2.0, (balanced1 + balanced2) / 2.0);
    println!("end to end: one node direct {direct:.0}/s, two nodes via HAProxy {balanced:.0}/s");

    let table = format!(
        "# Scale-out\n\n`OBSERVATIONS={n_obs} MESSAGES={messages} SESSIONS={sessions} cargo bench --bench scale_out` \
         (release build, this machine: 2 cores, loopback; each figure the mean of two alternating runs)\n\n\
         ## Recording the trusted-sender list (batches of 512 observations)\n\n\
         | store | observations/s | vs SQLite |\n|---|---:|---:|\n\
         | SQLite (embedded, synchronous=FULL) | {sqlite_rate:.0} | 1.00 |\n\
         | PostgreSQL 15 (loopback, fsync on) | {pg_rate:.0} | {:.2} |\n\n\
         ## End to end (2 KiB messages, smart host smtp-sink, shared state on PostgreSQL)\n\n\
         | path | accepted msg/s | vs one node direct |\n|---|---:|---:|\n\
         | one node, direct | {direct:.0} | 1.00 |\n\
         | HAProxy (PROXY v2) → two nodes | {balanced:.0} | {:.2} |\n\n\
         On two cores both nodes, HAProxy and the load client share the same CPUs: no gain \
         is expected here; a second node pays off with its own cores and disk.\n",
        pg_rate / sqlite_rate,
        balanced / direct
    );
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results");
    std::fs::create_dir_all(&out).expect("benches/results");
    std::fs::write(out.join("scale_out.md"), &table).expect("write result");
    print!("{table}");
    drop(lb);
    drop(a);
    drop(b);
    let _ = sink.kill();
    let _ = sink.wait();
}
