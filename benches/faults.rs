//! The fault suite: the relay (release binary) under the faults of a bad day, each
//! scenario bounded in count and time, stopping by itself and printing its figures.
//!
//!   cargo bench --bench faults                     (all five)
//!   cargo bench --bench faults -- kill outage      (some; names below)
//!
//! - `kill`:   5 × kill -9 under a steady load (≥ 1,000 msg/s asked): 0 lost, duplicates counted.
//! - `outage`: the smart host down, then back: nothing lost, all delivered after a flush.
//! - `disk`:   the spool on a small tmpfs (needs root for the mount): 452 4.3.1, the relay
//!   stays up, and accepts again when space returns.
//! - `slow`:   1,000 idle sessions and 100 senders dripping DATA at 1 octet/s: normal
//!   clients still served (p50/p99 accept latency), peak RSS, drips cut by min_data_rate.
//! - `admin`:  oversized bodies, bad paths, bad JSON, no token: 4xx answers, no panic.
//!
//! Loopback only. Writes benches/results/faults.md.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;

/// A client that survives the relay dying under it: any error drops the session and
/// the next message opens a new one.
struct Client {
    addr: SocketAddr,
    from: IpAddr,
    conn: Option<(BufReader<TcpStream>, TcpStream)>,
}

impl Client {
    fn new(addr: SocketAddr, from: IpAddr) -> Client {
        Client {
            addr,
            from,
            conn: None,
        }
    }

    fn reply(r: &mut BufReader<TcpStream>) -> Option<(u16, String)> {
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).ok()? == 0 {
                return None;
            }
            let code = line.get(..3)?.parse().ok()?;
            if line.as_bytes().get(3) != Some(&b'-') {
                return Some((code, line));
            }
        }
    }

    fn open(&mut self) -> Option<()> {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
        socket.bind(&SocketAddr::new(self.from, 0).into()).ok()?;
        socket
            .connect_timeout(&self.addr.into(), Duration::from_secs(2))
            .ok()?;
        let s: TcpStream = socket.into();
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        s.set_nodelay(true).ok()?;
        let mut r = BufReader::new(s.try_clone().ok()?);
        let mut w = s;
        if Client::reply(&mut r)?.0 != 220 {
            return None;
        }
        w.write_all(b"EHLO load.test\r\n").ok()?;
        if Client::reply(&mut r)?.0 != 250 {
            return None;
        }
        self.conn = Some((r, w));
        Some(())
    }

    /// One message; `Some(reply)` when the relay answered the end of data.
    fn send(&mut self, id: &str, body: &[u8]) -> Option<(u16, String)> {
        if self.conn.is_none() {
            self.open()?;
        }
        let result = (|| {
            let (r, w) = self.conn.as_mut()?;
            w.write_all(b"MAIL FROM:<alice@example.test>\r\n").ok()?;
            let m = Client::reply(r)?;
            if m.0 != 250 {
                return Some(m);
            }
            w.write_all(b"RCPT TO:<bob@partner.test>\r\nDATA\r\n")
                .ok()?;
            Client::reply(r)?;
            if Client::reply(r)?.0 != 354 {
                return None;
            }
            let mut msg = format!("Message-ID: <{id}>\r\nSubject: fault\r\n\r\n").into_bytes();
            msg.extend_from_slice(body);
            msg.extend_from_slice(b"\r\n.\r\n");
            w.write_all(&msg).ok()?;
            Client::reply(r)
        })();
        if result.is_none() {
            self.conn = None;
        }
        result
    }
}

fn node_cfg(dir: &Path, sink: &str, port: u16) -> Cfg {
    Cfg::new(dir, sink)
        // Thousands from one sender: no limits, stated.
        .set("", "limits", "[]")
        .set("server", "listen", &format!("[\"127.0.0.1:{port}\"]"))
        .set("queue", "min_free", "0")
}

fn message_ids(sink: &Sink) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for d in sink.dumps() {
        if let Some(id) = d
            .lines()
            .find_map(|l| l.strip_prefix("Message-ID: <"))
            .and_then(|l| l.strip_suffix('>'))
        {
            *seen.entry(id.to_string()).or_default() += 1;
        }
    }
    seen
}

fn vm(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Load from `threads` clients until `stop`; every acknowledged id is recorded.
fn steady_load(
    addr: SocketAddr,
    threads: usize,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<BTreeSet<String>>>,
    tag: &'static str,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..threads)
        .map(|t| {
            let (stop, acked) = (stop.clone(), acked.clone());
            std::thread::spawn(move || {
                let mut c = Client::new(addr, IpAddr::from([127, 0, 0, 2 + t as u8]));
                let mut seq = 0;
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("{tag}-{t}-{seq}@load.test");
                    match c.send(&id, &[b'x'; 1024]) {
                        Some((250, _)) => {
                            acked.lock().unwrap_or_else(|e| e.into_inner()).insert(id);
                            seq += 1;
                        }
                        // Refused or cut: the same id is never reused, so a lost ack
                        // can only show as a duplicate, never as a loss.
                        _ => {
                            seq += 1;
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                }
            })
        })
        .collect()
}

fn kill(out: &mut String) {
    let dir = tmpdir("faults-kill");
    let sink = Sink::start(&dir, &[]);
    let port = free_port();
    let cfg = node_cfg(&dir, &sink.addr(), port);
    let mut relay = Relay::start(&cfg);
    let (stop, acked) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(Mutex::new(BTreeSet::new())),
    );
    let started = Instant::now();
    let load = steady_load(relay.smtp, 16, stop.clone(), acked.clone(), "kill");
    let mut rates = Vec::new();
    for _ in 0..5 {
        let before = acked.lock().map(|a| a.len()).unwrap_or(0);
        std::thread::sleep(Duration::from_secs(2));
        let after = acked.lock().map(|a| a.len()).unwrap_or(0);
        rates.push((after - before) as f64 / 2.0);
        relay.kill9();
        relay.restart();
    }
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    for t in load {
        let _ = t.join();
    }
    let elapsed = started.elapsed().as_secs_f64();
    relay.post("/api/v1/queue/flush");
    let acked = acked.lock().map(|a| a.clone()).unwrap_or_default();
    let delivered_all = wait_until(Duration::from_secs(120), || {
        let seen = message_ids(&sink);
        acked.iter().all(|id| seen.contains_key(id))
    });
    let seen = message_ids(&sink);
    let lost = acked.iter().filter(|id| !seen.contains_key(*id)).count();
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    let unacked_delivered = seen.keys().filter(|id| !acked.contains(*id)).count();
    let line = format!(
        "| kill -9 ×5 under load | {} acknowledged in {elapsed:.0} s; accept rate between kills {} msg/s | lost {lost}; duplicates {duplicates}; delivered without a 250 (cut before the reply) {unacked_delivered} | {} |\n",
        acked.len(),
        rates.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", "),
        if lost == 0 && delivered_all { "pass" } else { "FAIL" }
    );
    print!("{line}");
    out.push_str(&line);
}

fn outage(out: &mut String) {
    let dir = tmpdir("faults-outage");
    let sink_port = free_port();
    let sink_addr = format!("127.0.0.1:{sink_port}");
    let relay = Relay::start(&node_cfg(&dir, &sink_addr, free_port()));
    // Down: nothing listens on the smart host's port.
    let mut c = Client::new(relay.smtp, IpAddr::from([127, 0, 0, 2]));
    let mut acked = Vec::new();
    for i in 0..300 {
        let id = format!("outage-{i}@load.test");
        if let Some((250, _)) = c.send(&id, b"during the outage") {
            acked.push(id);
        }
    }
    let queued = wait_until(Duration::from_secs(30), || {
        relay.queue().len() == acked.len()
    });
    let depth = relay.queue().len();
    std::thread::sleep(Duration::from_secs(5));
    // Back, on the same port.
    let sink = Sink::start_on(&dir, sink_port, &[]);
    let flushed = Instant::now();
    relay.post("/api/v1/queue/flush");
    let all = wait_until(Duration::from_secs(60), || {
        let seen = message_ids(&sink);
        acked.iter().all(|id| seen.contains_key(id))
    });
    let took = flushed.elapsed().as_secs_f64();
    let seen = message_ids(&sink);
    let lost = acked.iter().filter(|id| !seen.contains_key(*id)).count();
    let line = format!(
        "| smart host down 5 s+, then back | {} accepted while down (queue depth {depth}) | lost {lost}; all delivered {took:.1} s after the flush | {} |\n",
        acked.len(),
        if lost == 0 && all && queued { "pass" } else { "FAIL" }
    );
    print!("{line}");
    out.push_str(&line);
}

fn disk(out: &mut String) {
    let dir = tmpdir("faults-disk");
    let spool = dir.join("tmpfs");
    std::fs::create_dir_all(&spool).unwrap_or_default();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(&spool)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        let line =
            "| spool on a full tmpfs | skipped: mounting a tmpfs needs root | — | skipped |\n";
        print!("{line}");
        out.push_str(line);
        return;
    }
    let sink = Sink::start(&dir, &[]);
    let cfg = node_cfg(&dir, &sink.addr(), free_port())
        .set(
            "queue",
            "dir",
            &format!("\"{}\"", spool.join("spool").display()),
        )
        .set("queue", "min_free", "4194304")
        .set("queue", "segment_size", "1048576");
    let relay = Relay::start(&cfg);
    // Fill the file system to just under min_free.
    let filler = spool.join("filler");
    let _ = Command::new("dd")
        .args([
            "if=/dev/zero",
            &format!("of={}", filler.display()),
            "bs=1M",
            "count=13",
        ])
        .stderr(std::process::Stdio::null())
        .status();
    let refused = wait_until(Duration::from_secs(10), || {
        let mut c = Client::new(relay.smtp, IpAddr::from([127, 0, 0, 2]));
        matches!(c.send("probe@load.test", b"x"), Some((452, _)))
    });
    let mut c = Client::new(relay.smtp, IpAddr::from([127, 0, 0, 2]));
    let reply = c
        .send("full@load.test", b"x")
        .map(|r| r.1)
        .unwrap_or_default();
    let alive = http_text("GET", &relay.url("/healthz"), None).0 == 200;
    let _ = std::fs::remove_file(&filler);
    let back = Instant::now();
    let accepts = wait_until(Duration::from_secs(10), || {
        let mut c = Client::new(relay.smtp, IpAddr::from([127, 0, 0, 2]));
        matches!(c.send("after@load.test", b"x"), Some((250, _)))
    });
    let took = back.elapsed().as_secs_f64();
    drop(relay);
    let _ = Command::new("umount").arg(&spool).status();
    let line = format!(
        "| spool on a full 16 MiB tmpfs | refused with `{}`; relay up: {alive} | accepting again {took:.1} s after space returned | {} |\n",
        reply.trim(),
        if refused && alive && accepts && reply.starts_with("452 4.3.1") { "pass" } else { "FAIL" }
    );
    print!("{line}");
    out.push_str(&line);
}

fn slow(out: &mut String) {
    let dir = tmpdir("faults-slow");
    let sink = Sink::start(&dir, &[]);
    let cfg = node_cfg(&dir, &sink.addr(), free_port())
        .set("server", "max_connections", "3000")
        .set("server", "max_connections_per_ip", "1200");
    let relay = Relay::start(&cfg);
    let rss_before = vm(relay.pid(), "VmRSS:");
    let addr = relay.smtp;
    // 1,000 idle sessions (greeted, EHLO, then nothing).
    let mut idle = Vec::new();
    for i in 0..1000 {
        let mut c = Client::new(addr, IpAddr::from([127, 0, 1, (i % 250) as u8 + 1]));
        if c.open().is_some() {
            idle.push(c);
        }
    }
    // 100 drips: DATA at one octet a second.
    let cut = Arc::new(AtomicUsize::new(0));
    let drips: Vec<_> = (0..100)
        .map(|i| {
            let cut = cut.clone();
            std::thread::spawn(move || {
                let mut c = Client::new(addr, IpAddr::from([127, 0, 2, i as u8 + 1]));
                if c.open().is_none() {
                    return;
                }
                let Some((r, w)) = c.conn.as_mut() else {
                    return;
                };
                let _ = w.write_all(
                    b"MAIL FROM:<a@example.test>\r\nRCPT TO:<b@partner.test>\r\nDATA\r\n",
                );
                for _ in 0..3 {
                    let _ = Client::reply(r);
                }
                let started = Instant::now();
                while started.elapsed() < Duration::from_secs(30) {
                    if w.write_all(b"x").is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                    let _ = r.get_ref().set_nonblocking(true);
                    let mut b = [0u8; 256];
                    let n = r.get_mut().read(&mut b);
                    let _ = r.get_ref().set_nonblocking(false);
                    match n {
                        Ok(n) if n > 0 && b.starts_with(b"421 4.4.2") => {
                            cut.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Ok(0) => break,
                        _ => {}
                    }
                }
            })
        })
        .collect();
    // Normal clients meanwhile: 2,000 messages from 4 sessions, each DATA end timed.
    std::thread::sleep(Duration::from_secs(1));
    let mut latencies = Vec::new();
    let mut c = Client::new(addr, IpAddr::from([127, 0, 3, 1]));
    for i in 0..2000 {
        let t = Instant::now();
        if let Some((250, _)) = c.send(&format!("normal-{i}@load.test"), &[b'y'; 5120]) {
            latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    for d in drips {
        let _ = d.join();
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    let peak = vm(relay.pid(), "VmHWM:");
    let line = format!(
        "| 1,000 idle sessions + 100 drips at 1 octet/s | {} idle held; normal client: {} of 2000 accepted, transaction p50 {:.2} ms, p99 {:.2} ms (whole MAIL..250, one session) | drips cut with 421 4.4.2: {} of 100; RSS {} → peak {} MiB | {} |\n",
        idle.len(),
        latencies.len(),
        pct(0.5),
        pct(0.99),
        cut.load(Ordering::Relaxed),
        rss_before / 1024,
        peak / 1024,
        if latencies.len() == 2000 && cut.load(Ordering::Relaxed) == 100 && peak < 256 * 1024 { "pass" } else { "FAIL" }
    );
    print!("{line}");
    out.push_str(&line);
}

fn admin(out: &mut String) {
    let dir = tmpdir("faults-admin");
    let sink = Sink::start(&dir, &[]);
    let cfg = node_cfg(&dir, &sink.addr(), free_port()).set("admin", "token", "\"s3cret\"");
    let relay = Relay::start(&cfg);
    let raw = |request: &[u8]| -> u16 {
        let Ok(mut s) = TcpStream::connect(relay.admin) else {
            return 0;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = s.write_all(request);
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap_or(0);
        String::from_utf8_lossy(buf.get(..n).unwrap_or_default())
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    };
    let big = vec![b'{'; 8 << 20];
    let mut oversized = format!(
        "POST /api/v1/onboarding/share HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        big.len()
    )
    .into_bytes();
    oversized.extend_from_slice(&big);
    let cases: Vec<(&str, u16)> = vec![
        ("no token", raw(b"GET /api/v1/queue HTTP/1.1\r\nHost: x\r\n\r\n")),
        ("wrong token", raw(b"GET /api/v1/queue HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\n\r\n")),
        ("bad path", raw(b"GET /api/v1/nothing HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n\r\n")),
        ("bad queue id", raw(b"GET /api/v1/queue/..%2f..%2fetc HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n\r\n")),
        ("bad JSON", raw(b"POST /api/v1/onboarding/share HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\n{nope")),
        ("oversized body (8 MiB)", raw(&oversized)),
        ("garbage request line", raw(b"\x00\x01\x02 / HTTP/9\r\n\r\n")),
    ];
    let alive = http_text("GET", &relay.url("/healthz"), None).0 == 200;
    let ok = alive && cases.iter().all(|(_, c)| (400..500).contains(c));
    let line = format!(
        "| admin API abuse | {} | no panic, /healthz {} afterwards | {} |\n",
        cases
            .iter()
            .map(|(what, code)| format!("{what}: {code}"))
            .collect::<Vec<_>>()
            .join("; "),
        if alive { "200" } else { "down" },
        if ok { "pass" } else { "FAIL" }
    );
    print!("{line}");
    out.push_str(&line);
}

fn main() {
    let asked: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want = |name: &str| asked.is_empty() || asked.iter().any(|a| a == name);
    let mut rows = String::new();
    type Scenario = fn(&mut String);
    let scenarios: [(&str, Scenario); 5] = [
        ("kill", kill),
        ("outage", outage),
        ("disk", disk),
        ("slow", slow),
        ("admin", admin),
    ];
    for (name, run) in scenarios {
        if want(name) {
            run(&mut rows);
        }
    }
    let table = format!(
        "# Fault suite\n\n`cargo bench --bench faults` (release build, this machine: 2 cores, loopback)\n\n\
         | scenario | load | outcome | verdict |\n|---|---|---|---|\n{rows}"
    );
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results");
    let _ = std::fs::create_dir_all(&out);
    if asked.is_empty() {
        let _ = std::fs::write(out.join("faults.md"), &table);
    }
    print!("\n{table}");
}
