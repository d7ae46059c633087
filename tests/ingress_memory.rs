//! Bodies in flight from outside: many large messages held open at once take the relay's
//! memory only up to `server.ingress_memory` (the rest waits in files), and each one is
//! delivered to a real upstream octet for octet.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Barrier};
use std::time::Duration;

use support::*;

const MIB: u64 = 1 << 20;

/// Session `i`'s message: `size` octets of header and lines that are long, start with
/// a dot now and then (stuffed on the wire) and carry 8-bit text; produced a piece at a
/// time so the test does not hold them either.
struct Body {
    session: usize,
    size: usize,
    line: usize,
}

impl Body {
    fn new(session: usize, size: usize) -> Body {
        Body {
            session,
            size,
            line: 0,
        }
    }

    fn header(&self) -> Vec<u8> {
        format!(
            "From: a@example.test\r\nTo: b@x.test\r\nSubject: large {}\r\nX-Session: {}\r\n\r\n",
            self.session, self.session
        )
        .into_bytes()
    }

    /// The next line as the message has it (not stuffed), or `None` at the end.
    fn next_line(&mut self, so_far: usize) -> Option<Vec<u8>> {
        if so_far >= self.size {
            return None;
        }
        self.line += 1;
        let mut l = if self.line.is_multiple_of(997) {
            format!(".{:02} {:08} dot", self.session, self.line).into_bytes()
        } else {
            format!("{:02} {:08} caf\u{e9} ", self.session, self.line).into_bytes()
        };
        while l.len() < 996 {
            l.push(b'a' + (self.line % 26) as u8);
        }
        l.extend_from_slice(b"\r\n");
        Some(l)
    }
}

/// Sends DATA's body for session `i`; returns the checksum and length of the message
/// as the relay must deliver it (after its own Received header).
fn send_body(stream: &mut TcpStream, i: usize, size: usize) -> (u32, usize) {
    let mut body = Body::new(i, size);
    let mut crc = crc32fast::Hasher::new();
    let head = body.header();
    crc.update(&head);
    let mut len = head.len();
    let mut wire = head;
    while let Some(line) = body.next_line(len) {
        crc.update(&line);
        len += line.len();
        if line.first() == Some(&b'.') {
            wire.push(b'.');
        }
        wire.extend_from_slice(&line);
        if wire.len() >= 1 << 20 {
            stream.write_all(&wire).unwrap();
            wire.clear();
        }
    }
    stream.write_all(&wire).unwrap();
    (crc.finalize(), len)
}

fn reply(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match stream.read(&mut b) {
            Ok(1) => {
                out.push(b[0]);
                let line_start = out[..out.len() - 1]
                    .iter()
                    .rposition(|&c| c == b'\n')
                    .map_or(0, |p| p + 1);
                if b[0] == b'\n' && out.get(line_start + 3) == Some(&b' ') {
                    return String::from_utf8_lossy(&out).into_owned();
                }
            }
            _ => return String::from_utf8_lossy(&out).into_owned(),
        }
    }
}

fn expect(stream: &mut TcpStream, line: &str, code: &str) {
    stream.write_all(format!("{line}\r\n").as_bytes()).unwrap();
    let r = reply(stream);
    assert!(r.starts_with(code), "{line} -> {r}");
}

fn vm_hwm(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib * 1024
}

/// 40 sessions each hold a 40 MB message open at once (all of it sent, the final dot
/// not yet); then all end together. The relay's peak resident memory stays under
/// `server.ingress_memory` + `queue.memory_budget` + 64 MiB, where holding the bodies
/// would take 1.6 GB; every message reaches the upstream octet for octet.
#[test]
fn forty_large_messages_at_once_stay_within_the_memory_budgets() {
    const SESSIONS: usize = 40;
    const SIZE: usize = 40_000_000;
    let (ingress, budget) = (64 * MIB, 64 * MIB);
    let dir = tmpdir("ingress-memory");
    let up = Upstream::start(&dir, &["--data-size-limit", "100000000"]);
    let cfg = Cfg::new(&dir, &up.addr())
        .set("server", "ingress_memory", &ingress.to_string())
        .set("server", "max_message_size", "50000000")
        .set("queue", "memory_budget", &budget.to_string())
        .set("delivery", "data_timeout", "\"120s\"");
    let relay = Relay::start(&cfg);
    let all_sent = Arc::new(Barrier::new(SESSIONS + 1));
    let clients: Vec<_> = (0..SESSIONS)
        .map(|i| {
            let all_sent = all_sent.clone();
            let addr = relay.smtp;
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
                assert!(reply(&mut s).starts_with("220"));
                expect(&mut s, "EHLO client.test", "250");
                expect(&mut s, "MAIL FROM:<a@example.test> BODY=8BITMIME", "250");
                expect(&mut s, "RCPT TO:<b@x.test>", "250");
                expect(&mut s, "DATA", "354");
                let sent = send_body(&mut s, i, SIZE);
                all_sent.wait();
                s.write_all(b".\r\n").unwrap();
                let r = reply(&mut s);
                assert!(r.starts_with("250"), "session {i}: {r}");
                expect(&mut s, "QUIT", "221");
                sent
            })
        })
        .collect();
    // Every body is on the relay's side, none finished: the moment it holds most.
    all_sent.wait();
    let in_flight = vm_hwm(relay.pid());
    let sent: Vec<(u32, usize)> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    assert!(
        relay.wait_queue_empty(Duration::from_secs(600)),
        "not all delivered"
    );
    let peak = vm_hwm(relay.pid());
    let bound = ingress + budget + 64 * MIB;
    eprintln!(
        "peak RSS with all bodies in flight {} MiB, after delivery {} MiB (bound {} MiB)",
        in_flight / MIB,
        peak / MIB,
        bound / MIB
    );
    assert!(peak < bound, "peak RSS {peak} over {bound}");

    let messages = up.messages();
    assert_eq!(messages.len(), SESSIONS);
    let mut seen = [false; SESSIONS];
    for (_, data) in &messages {
        let at = memchr::memmem::find(data, b"From: a@example.test\r\n").expect("the header");
        let body = &data[at..];
        let session: usize = String::from_utf8_lossy(body)
            .lines()
            .find_map(|l| {
                l.strip_prefix("X-Session: ")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap();
        let (crc, len) = sent[session];
        assert_eq!(body.len(), len, "session {session}: length");
        let mut h = crc32fast::Hasher::new();
        h.update(body);
        assert_eq!(h.finalize(), crc, "session {session}: octets");
        seen[session] = true;
    }
    assert!(seen.iter().all(|s| *s));
    // Nothing is left beside the spool once the messages are stored.
    let incoming = std::fs::read_dir(dir.join("spool/incoming"))
        .unwrap()
        .count();
    assert_eq!(incoming, 0);
    assert!(
        relay
            .metric("smartrelay_ingress_bodies_spilled_total")
            .unwrap_or(0.0)
            >= SESSIONS as f64
    );
}
