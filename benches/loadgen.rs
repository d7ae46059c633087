//! A rate-limited SMTP load generator: sends COUNT messages of SIZE octets to ADDR at
//! RATE messages per second in all, over SESSIONS sessions, and times each message from
//! the end of its data (the final dot written) to the `250`. smtp-source sends as fast
//! as it can; latency is only meaningful below saturation, so this paces itself.
//!
//!   cargo bench --bench loadgen -- ADDR RATE COUNT SIZE SESSIONS
//!
//! Prints one line: `sent=N p50_ms=… p99_ms=… max_ms=… achieved_rate=…`. Loopback
//! addresses only.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

fn reply(r: &mut BufReader<TcpStream>) -> u16 {
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return 0;
        }
        let code = line.get(..3).and_then(|c| c.parse().ok()).unwrap_or(0);
        if line.as_bytes().get(3) != Some(&b'-') {
            return code;
        }
    }
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, what: &str) -> T {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("argument {i}: {what} (ADDR RATE COUNT SIZE SESSIONS)"))
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let addr: SocketAddr = arg(&args, 0, "ADDR");
    assert!(addr.ip().is_loopback(), "loopback only");
    let rate: f64 = arg(&args, 1, "RATE");
    let count: usize = arg(&args, 2, "COUNT");
    let size: usize = arg(&args, 3, "SIZE");
    let sessions: usize = arg::<usize>(&args, 4, "SESSIONS").max(1);
    let mut body =
        b"From: bench@example.test\r\nTo: rcpt@partner.test\r\nSubject: paced\r\n\r\n".to_vec();
    while body.len() < size {
        body.extend_from_slice(b"The quick brown fox jumps over the lazy dog, paced.\r\n");
    }
    body.truncate(size.max(64));
    body.extend_from_slice(b"\r\n.\r\n");
    let body = std::sync::Arc::new(body);
    // Each session sends every SESSIONS-th slot of one global schedule.
    let interval = Duration::from_secs_f64(sessions as f64 / rate);
    let start = Instant::now() + Duration::from_millis(200);
    let threads: Vec<_> = (0..sessions)
        .map(|s| {
            let body = body.clone();
            let n = count / sessions + usize::from(s < count % sessions);
            let offset = Duration::from_secs_f64(s as f64 / rate);
            std::thread::spawn(move || {
                let stream = TcpStream::connect(addr).expect("connect");
                stream.set_nodelay(true).expect("nodelay");
                let mut r = BufReader::new(stream.try_clone().expect("clone"));
                let mut w = stream;
                assert_eq!(reply(&mut r), 220, "greeting");
                w.write_all(b"EHLO loadgen.test\r\n").expect("write");
                assert_eq!(reply(&mut r), 250, "EHLO");
                let mut times = Vec::with_capacity(n);
                for k in 0..n {
                    let due = start + offset + interval * k as u32;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    w.write_all(b"MAIL FROM:<bench@example.test>\r\nRCPT TO:<rcpt@partner.test>\r\nDATA\r\n")
                        .expect("write");
                    let (m, rc, d) = (reply(&mut r), reply(&mut r), reply(&mut r));
                    assert!(m == 250 && rc == 250 && d == 354, "{m} {rc} {d}");
                    w.write_all(&body).expect("write");
                    let sent = Instant::now();
                    let code = reply(&mut r);
                    assert_eq!(code, 250, "end of data");
                    times.push(sent.elapsed().as_secs_f64() * 1000.0);
                }
                let _ = w.write_all(b"QUIT\r\n");
                times
            })
        })
        .collect();
    let mut all: Vec<f64> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("session"))
        .collect();
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "sent={} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} achieved_rate={:.0}",
        all.len(),
        pct(0.50),
        pct(0.99),
        all.last().copied().unwrap_or(f64::NAN),
        all.len() as f64 / elapsed
    );
}
