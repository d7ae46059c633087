//! The fuzz targets, one per parser. Each takes arbitrary bytes and either returns or
//! panics; a panic is a bug (the binaries under `fuzz_targets/` hand them to AFL++, and
//! `tests/fuzz_replay.rs` in the main crate replays every corpus file through them).
//! Besides "no panic", each checks the property its parser promises.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use smartrelay::config::{BareLineEndings, Config};
use smartrelay::envelope::BodyType;
use smartrelay::message::Data;
use smartrelay::queue::record::{self, Kind, Scanned};
use smartrelay::smtp::body::Body;
use smartrelay::smtp::command;
use smartrelay::smtp::data::{DataReceiver, LineEndings};
use smartrelay::smtp::session::{Action, Completed, Session, SessionConfig, SourceKind};
use smartrelay::spf::{macros, record as spf_record};
use smartrelay::tenant::headers;

/// PROXY headers (v1 and v2) as a trusted balancer's connection starts: framing reads
/// exactly one header and never asks for an octet past its end, whatever follows.
pub fn proxy(data: &[u8]) {
    use smartrelay::smtp::proxy::{needed, parse};
    let mut len = 0;
    loop {
        let Some(prefix) = data.get(..len) else {
            return;
        };
        match needed(prefix) {
            Ok(0) => break,
            Ok(more) => len += more,
            Err(_) => return,
        }
    }
    let Some(header) = data.get(..len) else {
        return;
    };
    // Every shorter prefix asked for no more than the header holds.
    for k in 0..len {
        if let Some(Ok(more)) = data.get(..k).map(needed) {
            assert!(more > 0 && k + more <= len, "asked past the header at {k}");
        }
    }
    let _ = parse(header);
}

/// Command lines: a parsed command encodes to a line that parses back to it.
pub fn command(data: &[u8]) {
    if let Ok(cmd) = command::parse(data) {
        let line = cmd.encode();
        assert_eq!(
            command::parse(line.as_bytes()).as_ref(),
            Ok(&cmd),
            "{line:?}"
        );
    }
}

/// DATA bodies: the first byte picks the bare-line-ending policy, the size limit and a
/// split point; the result must not depend on how the input was split into reads, and
/// the end of data is only ever found right after CRLF.CRLF.
pub fn data_reader(data: &[u8]) {
    let Some((&ctl, input)) = data.split_first() else {
        return;
    };
    let policy = if ctl & 1 == 0 {
        BareLineEndings::Normalize
    } else {
        BareLineEndings::Reject
    };
    let max = if ctl & 2 == 0 { u64::MAX } else { 64 };
    let whole = feed_all(input, policy, max, &[input.len()]);
    // Every split point for short inputs, a few derived from the control byte else.
    let splits: Vec<usize> = if input.len() <= 64 {
        (0..=input.len()).collect()
    } else {
        (0..8)
            .map(|k| (usize::from(ctl) * 131 + k * 977) % input.len())
            .collect()
    };
    for at in splits {
        let split = feed_all(input, policy, max, &[at, input.len() - at]);
        assert_eq!(split, whole, "split at {at}");
    }
    let bytewise = feed_all(input, policy, max, &vec![1; input.len()]);
    assert_eq!(bytewise, whole, "byte by byte");
    if let Some((end, _)) = &whole {
        assert!(input[..*end].ends_with(b"\r\n.\r\n") || *end == 3 && input.starts_with(b".\r\n"));
    }
}

type Fed = Option<(usize, Result<Vec<u8>, String>)>;

fn feed_all(input: &[u8], policy: BareLineEndings, max: u64, reads: &[usize]) -> Fed {
    let mut rx = DataReceiver::new(max, policy);
    let mut out = Vec::new();
    let mut pos = 0;
    for &n in reads {
        let chunk = input.get(pos..pos + n)?;
        if let Some(k) = rx.feed(chunk, &mut out) {
            let end = pos + k;
            let finished = rx.finish();
            if finished.is_ok() {
                assert_eq!(rx.len(), out.len() as u64, "the count is what was kept");
            }
            return Some((end, finished.map(|()| out).map_err(|e| format!("{e:?}"))));
        }
        pos += n;
    }
    None
}

fn session_config() -> SessionConfig {
    SessionConfig {
        max_message_size: 4096,
        max_recipients: 4,
        hop_limit: 5,
        max_errors: 1000,
        ..SessionConfig::for_tests()
    }
}

/// The session over BDAT: input is command lines; after each `BDAT n`, up to `n` of
/// the following octets are the chunk. The chunks are kept as the driver keeps them
/// (line endings made CRLF for a text body); a completed message holds exactly those
/// octets after our Received: header, and never a bare CR or LF unless BINARYMIME.
pub fn bdat(data: &[u8]) {
    let ip: IpAddr = "127.0.0.1".parse().expect("literal");
    let mut s = Session::new(Arc::new(session_config()), ip, SourceKind::Dedicated, None);
    let _ = s.command(b"EHLO client.test", Ok(()));
    let mut rest = data;
    let mut kept: Option<(Vec<u8>, Option<LineEndings>)> = None;
    while !rest.is_empty() {
        let (line, after) = match rest.iter().position(|&b| b == b'\n') {
            Some(k) => (&rest[..k], &rest[k + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        rest = after;
        let action = s.command(line, Ok(()));
        if !s.chunking() {
            kept = None;
        }
        match action {
            Action::ReadChunk {
                size,
                last,
                keep,
                text,
            } => {
                let take = usize::try_from(size).unwrap_or(usize::MAX).min(rest.len());
                let (chunk, after) = rest.split_at(take);
                rest = after;
                if keep {
                    let (buf, fix) = kept.get_or_insert_with(|| {
                        (
                            Vec::new(),
                            text.then(|| LineEndings::new(BareLineEndings::Normalize)),
                        )
                    });
                    match fix {
                        Some(f) => f.feed(chunk, buf),
                        None => buf.extend_from_slice(chunk),
                    }
                }
                let body = match (keep && last).then(|| kept.take()).flatten() {
                    Some((mut buf, fix)) => {
                        let finished = match fix {
                            Some(mut f) => f.finish(&mut buf),
                            None => Ok(()),
                        };
                        Some(finished.map(|()| Body::Memory(buf)))
                    }
                    None => None,
                };
                let expected = match &body {
                    Some(Ok(Body::Memory(b))) => Some(b.clone()),
                    _ => None,
                };
                match s.chunk_done(take as u64, last, body, 0) {
                    Completed::Submit(sub) => {
                        let Data::Memory(data) = &sub.data else {
                            panic!("a chunked test body in a file");
                        };
                        let expected = expected.expect("a message is what was kept");
                        assert!(data.ends_with(&expected), "message is the kept chunks");
                        if sub.envelope.body != BodyType::BinaryMime {
                            assert!(no_bare_line_endings(data), "bare CR or LF stored");
                        }
                    }
                    Completed::Reply(_) | Completed::Refused { .. } | Completed::Prove(_) => {}
                }
            }
            Action::ReadData { .. } => {
                let _ = s.data_done(Ok(Body::Memory(rest.to_vec())), 0);
                rest = &rest[rest.len()..];
            }
            _ => {}
        }
    }
}

fn no_bare_line_endings(data: &[u8]) -> bool {
    data.iter().enumerate().all(|(i, &b)| match b {
        b'\r' => data.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && data.get(i - 1) == Some(&b'\r'),
        _ => true,
    })
}

/// SPF records, macro strings and domain-specs.
pub fn spf(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let rec = spf_record::parse(text);
    let _ = rec.all_position();
    let _ = rec.redirect();
    let _ = spf_record::is_spf_record(text);
    let _ = macros::check_domain_spec(text);
    // One tokenizer behind both: what the syntax check accepts always expands.
    let ctx = |ip: IpAddr| macros::MacroContext {
        sender: "jo-ann+tag@sub.example.com",
        local: "jo-ann+tag",
        sender_domain: "sub.example.com",
        domain: "sub.example.com",
        ip,
        helo: "mail.example.net",
        validated: "unknown",
        receiver: "mx.example.org",
        timestamp: 1_700_000_000,
    };
    for explanation in [false, true] {
        if macros::check_macro_string(text, explanation).is_ok() {
            for ip in ["192.0.2.1", "2001:db8::1"] {
                let ip: IpAddr = ip.parse().expect("literal");
                let out = macros::expand(text, &ctx(ip), explanation);
                assert!(out.is_ok(), "{text:?} checks but does not expand: {out:?}");
                if let Ok(name) = out {
                    assert!(macros::truncate_name(&name).len() <= 253);
                }
            }
        }
    }
}

/// `check_host()` over a zone where every name publishes the input as its one TXT
/// record (so includes and redirects recurse into it), and every name has addresses
/// and an MX. The first byte picks the client address. Whatever the record, the
/// evaluation ends within the limits, and a record with a syntax error is a permerror.
pub fn spf_eval(data: &[u8]) {
    use smartrelay::spf::dns::{DnsFailure, SpfDns, TxtAnswer};
    use smartrelay::spf::eval::{check_host, Query, SpfResult};
    use std::net::{Ipv4Addr, Ipv6Addr};

    struct Echo(Vec<u8>);
    impl SpfDns for Echo {
        async fn txt(&self, name: &str) -> Result<TxtAnswer, DnsFailure> {
            if name.starts_with("void") {
                return Err(DnsFailure::NxDomain);
            }
            if name.starts_with("err") {
                return Err(DnsFailure::Other("servfail".into()));
            }
            Ok(TxtAnswer {
                records: vec![self.0.chunks(255).map(<[u8]>::to_vec).collect()],
                ttl: 60,
            })
        }
        async fn a(&self, name: &str) -> Result<Vec<Ipv4Addr>, DnsFailure> {
            if name.starts_with("void") {
                return Err(DnsFailure::NxDomain);
            }
            Ok(vec![
                Ipv4Addr::new(192, 0, 2, 1),
                Ipv4Addr::new(198, 51, 100, 1),
            ])
        }
        async fn aaaa(&self, _: &str) -> Result<Vec<Ipv6Addr>, DnsFailure> {
            Ok(vec![Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)])
        }
        async fn mx(&self, name: &str) -> Result<Vec<String>, DnsFailure> {
            Ok(vec![format!("mx.{name}"), "void.example".into()])
        }
        async fn ptr(&self, _: IpAddr) -> Result<Vec<String>, DnsFailure> {
            Ok(vec!["mail.example.com".into()])
        }
    }

    let Some((pick, record)) = data.split_first() else {
        return;
    };
    let ip: IpAddr = match pick % 4 {
        0 => "192.0.2.1",
        1 => "203.0.113.9",
        2 => "2001:db8::1",
        _ => "::ffff:192.0.2.1",
    }
    .parse()
    .expect("literal");
    let zone = Echo(record.to_vec());
    let query = Query {
        ip,
        sender: "jo@example.com".into(),
        helo: "mail.example.com".into(),
        receiver: "mx.example.org".into(),
        timestamp: 0,
    };
    let e = block_on(check_host(&zone, &query));
    assert!(e.lookups <= 11, "{e:?}");
    assert!(e.void_lookups <= 3, "{e:?}");
    let text = String::from_utf8_lossy(record);
    if spf_record::is_spf_record(&text) && !spf_record::parse(&text).errors.is_empty() {
        assert_eq!(e.result, SpfResult::PermError, "{text:?}");
    }
}

/// The evaluator over an in-memory zone never waits: poll it to completion.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

/// Spool segments: the input becomes records with valid checksums around arbitrary
/// payloads (split at 0xFF octets; the first byte of each piece picks the kind), with
/// the raw input appended as damage. Recovery over that segment must not panic, and
/// scanning must cover every octet exactly once.
pub fn spool(data: &[u8]) {
    let mut segment = Vec::new();
    for (i, piece) in data.split(|&b| b == 0xFF).enumerate() {
        let (kind, payload) = match piece.split_first() {
            Some((k, p)) => (
                match k % 3 {
                    0 => Kind::Message,
                    1 => Kind::State,
                    _ => Kind::Removed,
                },
                p,
            ),
            None => (Kind::Removed, piece),
        };
        // Few IDs, so states and removals meet the messages they belong to.
        let id = format!("{:012X}{:08X}", i % 4, 0x5EED);
        if let Ok(head) = record::head(kind, &id, &[payload]) {
            segment.extend_from_slice(&head);
            segment.extend_from_slice(payload);
        }
    }
    segment.extend_from_slice(data);
    let mut covered = 0;
    for step in record::scan(&segment) {
        match step {
            Scanned::Record { at, record } => {
                assert_eq!(at, covered);
                covered += record::HEAD_LEN + record.id.len() + record.payload.len();
                let _ = record::split_message(record.payload);
            }
            Scanned::Garbage { at, len } => {
                assert_eq!(at, covered);
                assert!(len > 0);
                covered += len;
            }
        }
    }
    assert_eq!(covered, segment.len());
    recover(&segment);
}

/// Recovers a spool whose only segment holds `segment` (as the first segment a relay
/// writes is named), then reads back every message it recovered.
fn recover(segment: &[u8]) {
    use smartrelay::queue::file::FileSpool;
    use smartrelay::queue::spool::Spool;
    let dir = std::env::temp_dir().join(format!("smartrelay-fuzz-spool-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let log = dir.join("log");
    let first = log.join(format!("{:016X}.seg", 1));
    if std::fs::create_dir_all(&log).is_err() || std::fs::write(first, segment).is_err() {
        return;
    }
    if let Ok(spool) = FileSpool::open(&dir) {
        let mut ids = Vec::new();
        let _ = spool.recover(&mut |r| {
            ids.push(r.envelope.id);
            true
        });
        for id in ids {
            let _ = spool.load(&id);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The configuration loader: any text is a config or an error naming what is wrong.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::parse(text, Path::new("fuzz.toml"));
    }
}

/// Header fields: a removal takes out exactly the fields named, and what is left has
/// none of them.
pub fn header_fields(data: &[u8]) {
    let parsed = headers::Headers::parse(data);
    let values = parsed.values("x-route");
    match parsed.without("x-route") {
        Some(out) => {
            assert!(!values.is_empty());
            assert!(out.len() < data.len());
            assert!(headers::values(&out, "x-route").is_empty());
        }
        None => assert!(values.is_empty()),
    }
}

/// A DNS answer to a TXT question, read record by record where hickory's decoder
/// refuses the whole message (`spf::lenient`). The first two octets are the question's
/// ID. An answer to another ID is never read as this one's.
pub fn dns_txt(data: &[u8]) {
    use smartrelay::spf::lenient::{parse, Parsed};
    let Some((id, answer)) = data.split_first_chunk::<2>() else {
        return;
    };
    let id = u16::from_be_bytes(*id);
    if let Ok(Parsed::Answer(a)) = parse(answer, id) {
        assert!(!a.records.is_empty(), "an answer has at least one record");
        assert_eq!(answer.get(..2), Some(&id.to_be_bytes()[..]));
    }
}

/// The admin's request parsing (`admin::guard`): cookies, `Host`, `Origin`/`Referer`
/// and the CSRF field of a form. No input panics; a `Host` is only the admin's own when
/// it names the listener's port (or none), and an origin only matches a host it ends
/// with.
pub fn admin(data: &[u8]) {
    use smartrelay::admin::guard::{
        cookie, form_csrf, host_allowed, origin_of, same_origin, split_host,
    };
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let (a, b, c) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let _ = cookie([a, b].into_iter(), "smartrelay_session");
    let _ = form_csrf(c.as_bytes());
    let listen: std::net::SocketAddr = "127.0.0.1:8025".parse().expect("literal");
    if host_allowed(a, listen, &[b.to_string()]) {
        if let Some((_, Some(port))) = split_host(a) {
            assert_eq!(port, 8025, "{a:?} allowed on another port");
        }
    }
    if let Some(o) = origin_of(b) {
        assert!(b.trim().starts_with(o), "{o:?} is not a prefix of {b:?}");
    }
    if same_origin(b, a) {
        assert!(origin_of(b).is_some());
    }
}

/// JSON values alike, numbers that are not integers within rounding: serde_json's
/// default float reading is not always correctly rounded (the relay stores integers).
fn same_json(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y))
            if x.as_f64().is_some() && !x.is_u64() && !x.is_i64() =>
        {
            let (x, y) = (x.as_f64().unwrap_or(0.0), y.as_f64().unwrap_or(0.0));
            (x - y).abs() <= x.abs().max(y.abs()) * 1e-12
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

/// A timeline's stored lines as the tracking store reads them back
/// (`tracking::model::parse_lines`). No input panics; a line read keeps no `at`, `type`
/// or `recipient` among its own fields, and what was read, written out as the API shows
/// it, reads back the same.
pub fn tracking_lines(data: &[u8]) {
    use smartrelay::tracking::model::parse_lines;
    let text = String::from_utf8_lossy(data);
    let lines = parse_lines(&text);
    for l in &lines {
        for key in ["at", "type", "recipient"] {
            assert!(!l.detail.contains_key(key), "{key} left in {:?}", l.detail);
        }
    }
    let shown = serde_json::to_string(&lines).expect("lines read are plain JSON");
    let again = parse_lines(&shown);
    assert_eq!(again.len(), lines.len(), "{shown}");
    for (a, b) in lines.iter().zip(&again) {
        assert_eq!((a.at, &a.kind, &a.recipient), (b.at, &b.kind, &b.recipient));
        let (x, y) = (
            serde_json::Value::Object(a.detail.clone()),
            serde_json::Value::Object(b.detail.clone()),
        );
        assert!(same_json(&x, &y), "{x} read back as {y}");
    }
}
