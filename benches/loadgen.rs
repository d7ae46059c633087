//! An SMTP load generator, plain or with STARTTLS (rustls, ring): COUNT messages of SIZE
//! octets to ADDR over SESSIONS concurrent sessions, each message's MAIL, RCPT and DATA
//! pipelined, timed from its final dot to the `250`.
//!
//!   cargo bench --bench loadgen -- ADDR COUNT SIZE SESSIONS [--rate R] [--starttls]
//!                                  [--ca FILE] [--per-connection]
//!
//! - sessions reuse their connection for every message, unless `--per-connection`:
//!   then each message has a connection (and a TLS handshake) of its own, as many
//!   platforms send; a client-side session cache resumes TLS sessions as theirs do;
//! - without `--rate` it sends as fast as the server takes; with it, a paced schedule
//!   of R messages a second in all (latency is only meaningful below saturation);
//! - `--starttls` encrypts each session: `--ca FILE` verifies the server's certificate
//!   against FILE (its name: the IP); without it the certificate is not checked.
//!
//! Prints one line: `sent=N elapsed_s=… rate=… p50_ms=… p99_ms=… max_ms=…
//! connections=… started_at=…` (the first message's start, in Unix seconds, for an
//! end-to-end clock outside). Loopback addresses only.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;

struct Options {
    addr: SocketAddr,
    count: usize,
    size: usize,
    sessions: usize,
    rate: Option<f64>,
    per_connection: bool,
    tls: Option<Arc<rustls::ClientConfig>>,
}

fn options() -> Options {
    let mut positional = Vec::new();
    let (mut ca, mut rate, mut per_connection, mut starttls) = (None, None, false, false);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--ca" => ca = args.next(),
            "--rate" => rate = args.next().and_then(|r| r.parse().ok()),
            "--per-connection" => per_connection = true,
            "--starttls" => starttls = true,
            // cargo bench passes --bench.
            _ if a.starts_with("--") => {}
            _ => positional.push(a),
        }
    }
    let get = |i: usize, what: &str| {
        positional
            .get(i)
            .cloned()
            .unwrap_or_else(|| panic!("{what} (ADDR COUNT SIZE SESSIONS)"))
    };
    let addr: SocketAddr = get(0, "ADDR").parse().expect("ADDR");
    assert!(addr.ip().is_loopback(), "loopback only");
    // The relay's own client configurations: the same rustls, ring provider and
    // session cache as its connections to the smart hosts.
    let tls = starttls.then(|| {
        Arc::new(match &ca {
            Some(path) => smartrelay::client_tls::ca_file(std::path::Path::new(path))
                .unwrap_or_else(|e| panic!("--ca: {e}")),
            None => smartrelay::client_tls::unverified(),
        })
    });
    Options {
        addr,
        count: get(1, "COUNT").parse().expect("COUNT"),
        size: get(2, "SIZE").parse().expect("SIZE"),
        sessions: get(3, "SESSIONS")
            .parse::<usize>()
            .expect("SESSIONS")
            .max(1),
        rate,
        per_connection,
        tls,
    }
}

/// Reads one reply (possibly multi-line); its code, 0 at end of stream.
fn reply(r: &mut impl BufRead) -> u16 {
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

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

/// A session after EHLO (and STARTTLS and the second EHLO, with TLS).
fn open(o: &Options) -> BufReader<Box<dyn Stream + Send>> {
    let tcp = TcpStream::connect(o.addr).expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let mut r = BufReader::new(Box::new(tcp) as Box<dyn Stream + Send>);
    assert_eq!(reply(&mut r), 220, "greeting");
    r.get_mut()
        .write_all(b"EHLO loadgen.test\r\n")
        .expect("write");
    assert_eq!(reply(&mut r), 250, "EHLO");
    let Some(config) = &o.tls else {
        return r;
    };
    r.get_mut().write_all(b"STARTTLS\r\n").expect("write");
    assert_eq!(reply(&mut r), 220, "STARTTLS");
    assert!(r.buffer().is_empty(), "nothing may follow 220 before TLS");
    let plain = r.into_inner();
    let name = ServerName::IpAddress(o.addr.ip().into());
    let conn = rustls::ClientConnection::new(config.clone(), name).expect("TLS client");
    let mut r =
        BufReader::new(Box::new(rustls::StreamOwned::new(conn, plain)) as Box<dyn Stream + Send>);
    r.get_mut()
        .write_all(b"EHLO loadgen.test\r\n")
        .expect("write");
    assert_eq!(reply(&mut r), 250, "EHLO after STARTTLS");
    r
}

fn close(mut r: BufReader<Box<dyn Stream + Send>>) {
    let _ = r.get_mut().write_all(b"QUIT\r\n");
    let _ = reply(&mut r);
}

fn main() {
    let o = Arc::new(options());
    let mut body =
        b"From: bench@example.test\r\nTo: rcpt@partner.test\r\nSubject: load\r\n\r\n".to_vec();
    while body.len() < o.size {
        body.extend_from_slice(b"The quick brown fox jumps over the lazy dog, loaded.\r\n");
    }
    body.truncate(o.size.max(64));
    body.extend_from_slice(b"\r\n.\r\n");
    let body = Arc::new(body);
    // Every session starts together, once all threads are up.
    let start = Instant::now() + Duration::from_millis(200);
    let started_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() + 0.2)
        .unwrap_or(0.0);
    let threads: Vec<_> = (0..o.sessions)
        .map(|s| {
            let (o, body) = (o.clone(), body.clone());
            let n = o.count / o.sessions + usize::from(s < o.count % o.sessions);
            std::thread::spawn(move || {
                let schedule = o.rate.map(|rate| {
                    (
                        Duration::from_secs_f64(o.sessions as f64 / rate),
                        Duration::from_secs_f64(s as f64 / rate),
                    )
                });
                if let Some(wait) = start.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let mut times = Vec::with_capacity(n);
                let mut connections = 0usize;
                let mut session = None;
                for k in 0..n {
                    if let Some((interval, offset)) = schedule {
                        let due = start + offset + interval * k as u32;
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                    }
                    let r = session.get_or_insert_with(|| {
                        connections += 1;
                        open(&o)
                    });
                    r.get_mut()
                        .write_all(b"MAIL FROM:<bench@example.test>\r\nRCPT TO:<rcpt@partner.test>\r\nDATA\r\n")
                        .expect("write");
                    let (m, rc, d) = (reply(r), reply(r), reply(r));
                    assert!(m == 250 && rc == 250 && d == 354, "{m} {rc} {d}");
                    r.get_mut().write_all(&body).expect("write");
                    let sent = Instant::now();
                    assert_eq!(reply(r), 250, "end of data");
                    times.push(sent.elapsed().as_secs_f64() * 1000.0);
                    if o.per_connection {
                        if let Some(r) = session.take() {
                            close(r);
                        }
                    }
                }
                if let Some(r) = session.take() {
                    close(r);
                }
                (times, connections)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut connections = 0;
    for t in threads {
        let (times, c) = t.join().expect("session");
        all.extend(times);
        connections += c;
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "sent={} elapsed_s={:.3} rate={:.0} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} connections={} started_at={:.3}",
        all.len(),
        elapsed,
        all.len() as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        all.last().copied().unwrap_or(f64::NAN),
        connections,
        started_at
    );
}
