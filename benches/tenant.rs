//! The cost of tenant proof: the accept rate of DKIM-signed 5 KiB messages from a
//! shared range against unsigned ones from a dedicated range, in the same run and
//! against the same release binary, smart host (smtp-sink) and DNS server; and the same
//! signed load through a second relay with the DKIM replay guard off, which shows what
//! the guard itself costs. The signed message is the same each time, to the same
//! recipient: after its first use the guard answers it as a retry.
//!
//!   cargo bench --bench tenant            (MESSAGES=4000 SESSIONS=20 ROUNDS=3)
//!
//! Loopback only; bounded by MESSAGES × ROUNDS; writes benches/results/tenant.md.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use support::dkim::{Algo, Key};
use support::dns::Dns;
use support::*;

/// A 5 KiB message (header and body), CRLF line endings, without the final dot.
fn message() -> Vec<u8> {
    let mut m = b"From: alice@example.test\r\nTo: bob@partner.test\r\nSubject: quarterly figures\r\nDate: Tue, 01 Dec 2026 10:00:00 +0000\r\nMessage-ID: <bench@example.test>\r\n\r\n".to_vec();
    let line = b"The quick brown fox jumps over the lazy dog, and the figures follow.\r\n";
    while m.len() + line.len() <= 5120 {
        m.extend_from_slice(line);
    }
    m
}

/// `sessions` connections from `from`, `total` messages in all; returns msg/s.
fn load(addr: SocketAddr, from: IpAddr, data: &Arc<Vec<u8>>, total: usize, sessions: usize) -> f64 {
    let started = Instant::now();
    let threads: Vec<_> = (0..sessions)
        .map(|i| {
            let data = data.clone();
            let n = total / sessions + usize::from(i < total % sessions);
            std::thread::spawn(move || {
                let mut c = Smtp::connect_from(from, addr);
                // Body and final dot go in one write: split, Nagle and delayed ACKs
                // would cost 40 ms a message and measure the client, not the relay.
                c.stream.set_nodelay(true).expect("TCP_NODELAY");
                let mut payload = data.to_vec();
                payload.extend_from_slice(b".\r\n");
                c.greet();
                for _ in 0..n {
                    c.expect("MAIL FROM:<alice@example.test>", 250);
                    c.expect("RCPT TO:<bob@partner.test>", 250);
                    c.expect("DATA", 354);
                    c.send(&payload);
                    let r = c.reply();
                    assert_eq!(r.code, 250, "{}", r.text());
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let total = env_count("MESSAGES", 4000);
    let sessions = env_count("SESSIONS", 20);
    let rounds = env_count("ROUNDS", 3);
    let dir = tmpdir("bench-tenant");
    let key = Key::generate(&dir.join("keys"), "rsa", Algo::RsaSha256);
    let dns = Dns::start(&[("example.test", &key.record("sel1"))]);
    // A smart host that accepts and forgets (no dump files competing with the spool).
    let sink_port = free_port();
    let mut sink = std::process::Command::new("/usr/sbin/smtp-sink")
        .args(["-u", "nobody", &format!("127.0.0.1:{sink_port}"), "256"])
        .spawn()
        .expect("smtp-sink (Debian postfix)");
    let config = |dir: &std::path::Path| {
        Cfg::new(dir, &format!("127.0.0.1:{sink_port}"))
            // Thousands from one sender: no limits, stated.
            .set("", "limits", "[]")
            .set("access", "allowed_ranges", "[\"127.0.0.1/32\"]")
            .set(
                "access",
                "shared_ranges",
                "[{ platform = \"o365\", ranges = [\"127.0.0.2/32\"], dkim_domains = [\"example.test\"] }]",
            )
            .set("dns", "nameservers", &format!("[\"{}\"]", dns.addr))
    };
    let relay = Relay::start(&config(&dir));
    let unguarded_dir = dir.join("guard-off");
    std::fs::create_dir_all(&unguarded_dir).expect("a folder for the second relay");
    let unguarded =
        Relay::start(&config(&unguarded_dir).set("access.dkim_replay", "enabled", "false"));
    let plain = Arc::new(message());
    let signed = Arc::new(key.sign(&plain, "example.test", "sel1", ("relaxed", "relaxed")));
    let dedicated: IpAddr = "127.0.0.1".parse().unwrap();
    let shared: IpAddr = "127.0.0.2".parse().unwrap();
    // Warm-up: the key lookup and the connection paths.
    load(relay.smtp, shared, &signed, 200, 4);
    load(unguarded.smtp, shared, &signed, 200, 4);
    load(relay.smtp, dedicated, &plain, 200, 4);
    let (mut d, mut s, mut u) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        // Rotate the order so a slow minute of the disk does not favour one side.
        for k in 0..3 {
            match (round + k) % 3 {
                0 => d.push(load(relay.smtp, dedicated, &plain, total, sessions)),
                1 => s.push(load(relay.smtp, shared, &signed, total, sessions)),
                _ => u.push(load(unguarded.smtp, shared, &signed, total, sessions)),
            }
        }
        println!(
            "round {round}: dedicated {:.0}/s, shared+DKIM {:.0}/s, guard off {:.0}/s",
            d[round], s[round], u[round]
        );
    }
    let (md, ms, mu) = (median(d.clone()), median(s.clone()), median(u.clone()));
    let ratio = ms / md;
    let table = format!(
        "# Tenant proof: accept rate\n\n`MESSAGES={total} SESSIONS={sessions} ROUNDS={rounds} cargo bench --bench tenant` \
         (release build, this machine, loopback; medians of {rounds} alternating rounds; 5 KiB messages, \
         rsa-sha256 2048-bit, relaxed/relaxed; smart host smtp-sink)\n\n\
         | source | accept/s (median) | rounds | vs dedicated |\n|---|---:|---|---:|\n\
         | dedicated range, unsigned | {md:.0} | {} | 1.00 |\n\
         | shared range, DKIM-verified | {ms:.0} | {} | {ratio:.2} |\n\
         | same, DKIM replay guard off | {mu:.0} | {} | {:.2} |\n\n\
         The guard against its absence, same run: {:.2}.\n\n\
         Target: shared ≥ 0.70 of dedicated — {}.\n",
        d.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", "),
        s.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", "),
        u.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(", "),
        mu / md,
        ms / mu,
        if ratio >= 0.70 { "met" } else { "not met" }
    );
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results");
    std::fs::create_dir_all(&out).expect("benches/results");
    std::fs::write(out.join("tenant.md"), &table).expect("write result");
    print!("{table}");
    drop(relay);
    drop(unguarded);
    let _ = sink.kill();
    let _ = sink.wait();
}
