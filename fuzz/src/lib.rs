//! The fuzz targets, one per parser. Each takes arbitrary bytes and either returns or
//! panics; a panic is a bug (the binaries under `fuzz_targets/` hand them to AFL++, and
//! `tests/fuzz_replay.rs` in the main crate replays every corpus file through them).
//! Besides "no panic", each checks the property its parser promises.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use smartrelay::config::{BareLineEndings, Config};
use smartrelay::queue::record::{self, Kind, Scanned};
use smartrelay::smtp::command;
use smartrelay::smtp::data::DataReceiver;
use smartrelay::smtp::session::{Action, Completed, Session, SessionConfig, SourceKind};
use smartrelay::spf::{macros, record as spf_record};
use smartrelay::tenant::headers;

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
    let mut pos = 0;
    for &n in reads {
        let chunk = input.get(pos..pos + n)?;
        if let Some(k) = rx.feed(chunk) {
            let end = pos + k;
            return Some((end, rx.finish().map_err(|e| format!("{e:?}"))));
        }
        pos += n;
    }
    None
}

fn session_config() -> SessionConfig {
    SessionConfig {
        hostname: "relay.test".into(),
        max_message_size: 4096,
        max_recipients: 4,
        max_line_length: 512,
        hop_limit: 5,
        max_errors: 1000,
        bare_line_endings: BareLineEndings::Normalize,
        domains: vec!["example.test".into()],
        postmaster_domain: "example.test".into(),
        starttls: false,
        tls_required: false,
        check_sender: false,
    }
}

/// The session over BDAT: input is command lines; after each `BDAT n`, up to `n` of
/// the following octets are the chunk. A completed message holds exactly the kept
/// chunks' octets after our Received: header.
pub fn bdat(data: &[u8]) {
    let ip: IpAddr = "127.0.0.1".parse().expect("literal");
    let mut s = Session::new(Arc::new(session_config()), ip, SourceKind::Dedicated, None);
    let _ = s.command(b"EHLO client.test", true);
    let mut rest = data;
    let mut kept: Vec<u8> = Vec::new();
    while !rest.is_empty() {
        let (line, after) = match rest.iter().position(|&b| b == b'\n') {
            Some(k) => (&rest[..k], &rest[k + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        rest = after;
        match s.command(line, true) {
            Action::ReadChunk { size, last, keep } => {
                let take = usize::try_from(size).unwrap_or(usize::MAX).min(rest.len());
                let (chunk, after) = rest.split_at(take);
                rest = after;
                if keep {
                    if let Some(buf) = s.chunk_buffer() {
                        buf.extend_from_slice(chunk);
                        kept.extend_from_slice(chunk);
                    }
                }
                match s.chunk_done(take as u64, last, 0) {
                    Completed::Submit(sub) => {
                        assert!(sub.data.ends_with(&kept[..]), "message is the kept chunks");
                        kept.clear();
                    }
                    Completed::Reply(_) | Completed::Prove(_) => {
                        if last {
                            kept.clear();
                        }
                    }
                }
            }
            Action::ReadData { .. } => {
                let _ = s.data_done(Ok(rest.to_vec()), 0);
                rest = &rest[rest.len()..];
            }
            _ => {}
        }
    }
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
    let _ = macros::check_macro_string(text, false);
    let _ = macros::check_macro_string(text, true);
    let _ = macros::check_domain_spec(text);
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
    smartrelay::queue::file::fuzz_recover(&segment);
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
