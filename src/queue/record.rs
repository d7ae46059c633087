//! The spool's record format, as pure code: the file spool appends these records to
//! its segment files and scans them back at start-up.
//!
//! ```text
//! offset  size  field
//! 0       4     "SRL1"
//! 4       1     kind: 1 message, 2 delivery state, 3 removed
//! 5       1     ID length
//! 6       4     payload length (big-endian)
//! 10      4     CRC-32 (big-endian) of bytes 4..10, the ID and the payload
//! 14      n     ID
//! ..      m     payload
//!               message: envelope length (4, big-endian), envelope JSON, data
//!               state:   delivery state JSON
//!               removed: empty
//! ```
//!
//! The checksum is what makes an interrupted append harmless: a record the crash cut
//! short, or whose blocks never reached the disk, fails it and is skipped.

use memchr::memmem;

pub const MAGIC: &[u8; 4] = b"SRL1";
pub const HEAD_LEN: usize = 14;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Message = 1,
    State = 2,
    Removed = 3,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Message),
            2 => Some(Kind::State),
            3 => Some(Kind::Removed),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("record payload of {0} octets is over the format's 4 GiB limit")]
    TooLarge(usize),
    #[error("record ID longer than 255 octets")]
    IdTooLong,
    #[error("envelope cannot be serialized: {0}")]
    Envelope(String),
}

/// Everything that goes before the payload parts of a record, checksum included.
pub fn head(kind: Kind, id: &str, payload: &[&[u8]]) -> Result<Vec<u8>, RecordError> {
    head_with_tail(kind, id, payload, None)
}

/// [`head`] of a record whose payload ends with `tail`: its length and the checksum
/// of its octets, which are not in memory (a body spilled to a file).
pub fn head_with_tail(
    kind: Kind,
    id: &str,
    payload: &[&[u8]],
    tail: Option<(u64, &crc32fast::Hasher)>,
) -> Result<Vec<u8>, RecordError> {
    let id_len = u8::try_from(id.len()).map_err(|_| RecordError::IdTooLong)?;
    let tail_len = tail.map_or(0, |(n, _)| n);
    let total = usize::try_from(tail_len)
        .ok()
        .and_then(|t| t.checked_add(payload.iter().map(|p| p.len()).sum()))
        .unwrap_or(usize::MAX);
    let len = u32::try_from(total).map_err(|_| RecordError::TooLarge(total))?;
    let mut out = Vec::with_capacity(HEAD_LEN + id.len());
    out.extend_from_slice(MAGIC);
    out.push(kind as u8);
    out.push(id_len);
    out.extend_from_slice(&len.to_be_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&out[4..10]);
    crc.update(id.as_bytes());
    for p in payload {
        crc.update(p);
    }
    if let Some((_, tail)) = tail {
        crc.combine(tail);
    }
    out.extend_from_slice(&crc.finalize().to_be_bytes());
    out.extend_from_slice(id.as_bytes());
    Ok(out)
}

/// The part of a message payload before its data: the envelope serialized straight
/// after room for its length, so it is not copied again.
pub fn message_prefix<T: serde::Serialize>(envelope: &T) -> Result<Vec<u8>, RecordError> {
    let mut out = vec![0u8; 4];
    serde_json::to_writer(&mut out, envelope).map_err(|e| RecordError::Envelope(e.to_string()))?;
    let len = out.len() - 4;
    let len = u32::try_from(len).map_err(|_| RecordError::TooLarge(len))?;
    out[..4].copy_from_slice(&len.to_be_bytes());
    Ok(out)
}

/// Splits a message payload into envelope JSON and data.
pub fn split_message(payload: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = payload.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
    (rest.len() >= len).then(|| rest.split_at(len))
}

#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub kind: Kind,
    /// Not validated here: a checksummed ID is what was written, but the caller decides
    /// whether it is one.
    pub id: &'a [u8],
    pub payload: &'a [u8],
}

/// A record's fixed head, read without its ID and payload, so start-up can skip a
/// message's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub kind: Kind,
    pub id_len: usize,
    pub payload_len: usize,
    crc: u32,
}

impl Head {
    /// Octets of the whole record, head included.
    pub fn total(&self) -> Option<usize> {
        HEAD_LEN
            .checked_add(self.id_len)?
            .checked_add(self.payload_len)
    }

    /// Whether `body` (the ID and payload that follow the head in `raw`) matches the
    /// checksum; `raw` is the whole record.
    pub fn verify(&self, raw: &[u8]) -> bool {
        let (Some(fields), Some(total)) = (raw.get(4..10), self.total()) else {
            return false;
        };
        let Some(body) = raw.get(HEAD_LEN..total) else {
            return false;
        };
        let mut h = crc32fast::Hasher::new();
        h.update(fields);
        h.update(body);
        h.finalize() == self.crc
    }
}

/// The head at the start of `buf`, when its magic and kind are right (the checksum
/// is not checked: it covers the payload too).
pub fn parse_head(buf: &[u8]) -> Option<Head> {
    let head = buf.get(..HEAD_LEN)?;
    if &head[..4] != MAGIC {
        return None;
    }
    Some(Head {
        kind: Kind::from_byte(head[4])?,
        id_len: usize::from(head[5]),
        payload_len: usize::try_from(u32::from_be_bytes([head[6], head[7], head[8], head[9]]))
            .ok()?,
        crc: u32::from_be_bytes([head[10], head[11], head[12], head[13]]),
    })
}

/// Decodes the record at the start of `buf`, with its total length.
pub fn decode(buf: &[u8]) -> Option<(Record<'_>, usize)> {
    let head = parse_head(buf)?;
    let total = head.total()?;
    let raw = buf.get(..total)?;
    if !head.verify(raw) {
        return None;
    }
    let (id, payload) = raw.get(HEAD_LEN..)?.split_at(head.id_len);
    Some((
        Record {
            kind: head.kind,
            id,
            payload,
        },
        total,
    ))
}

/// One step of a scan through a segment.
#[derive(Debug, PartialEq, Eq)]
pub enum Scanned<'a> {
    Record {
        at: usize,
        record: Record<'a>,
    },
    /// Octets that are not a whole record: an interrupted append, or damage. The scan
    /// picks up again at the next record that checks out.
    Garbage {
        at: usize,
        len: usize,
    },
}

/// Every record in a segment, in the order written.
pub fn scan(buf: &[u8]) -> impl Iterator<Item = Scanned<'_>> {
    let finder = memmem::Finder::new(MAGIC);
    let mut pos = 0;
    std::iter::from_fn(move || {
        if pos >= buf.len() {
            return None;
        }
        let rest = &buf[pos..];
        if let Some((record, len)) = decode(rest) {
            let at = pos;
            pos += len;
            return Some(Scanned::Record { at, record });
        }
        // Resynchronize on the next candidate that decodes; a false candidate in the
        // garbage is rejected by its checksum.
        let mut next = pos + 1;
        loop {
            match finder.find(&buf[next..]) {
                Some(off) if decode(&buf[next + off..]).is_some() => {
                    next += off;
                    break;
                }
                Some(off) => next += off + 1,
                None => {
                    next = buf.len();
                    break;
                }
            }
        }
        let at = pos;
        pos = next;
        Some(Scanned::Garbage { at, len: next - at })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: Kind, id: &str, payload: &[&[u8]]) -> Vec<u8> {
        let mut out = head(kind, id, payload).unwrap();
        for p in payload {
            out.extend_from_slice(p);
        }
        out
    }

    #[test]
    fn a_tail_checksummed_apart_makes_the_same_record() {
        let prefix = message_prefix(&serde_json::json!({"a": 1})).unwrap();
        let (trace, body): (&[u8], &[u8]) = (b"Received: r\r\n", b"Subject: x\r\n\r\nbig\r\n");
        let whole = record(Kind::Message, "ID1", &[&prefix, trace, body]);
        let mut crc = crc32fast::Hasher::new();
        crc.update(body);
        let mut raw = head_with_tail(
            Kind::Message,
            "ID1",
            &[&prefix, trace],
            Some((body.len() as u64, &crc)),
        )
        .unwrap();
        raw.extend_from_slice(&prefix);
        raw.extend_from_slice(trace);
        raw.extend_from_slice(body);
        assert_eq!(raw, whole);
        assert!(decode(&raw).is_some());
    }

    #[test]
    fn round_trip_of_a_message() {
        let prefix = message_prefix(&serde_json::json!({"a": 1})).unwrap();
        let data: &[u8] = b"Subject: x\r\n\r\n\0SRL1 binary\xff\r\n";
        let raw = record(Kind::Message, "ID1", &[&prefix, data]);
        let (rec, len) = decode(&raw).unwrap();
        assert_eq!(len, raw.len());
        assert_eq!((rec.kind, rec.id), (Kind::Message, &b"ID1"[..]));
        assert_eq!(split_message(rec.payload), Some((&br#"{"a":1}"#[..], data)));
    }

    #[test]
    fn any_damage_fails_the_checksum() {
        let raw = record(Kind::State, "ID", &[b"{}"]);
        for i in 4..raw.len() {
            let mut bad = raw.clone();
            bad[i] ^= 0x40;
            assert!(decode(&bad).is_none(), "flip at {i} went unnoticed");
        }
        assert!(decode(&raw[..raw.len() - 1]).is_none());
    }

    #[test]
    fn scan_skips_torn_and_damaged_records() {
        let a = record(
            Kind::Message,
            "A",
            &[&message_prefix(&serde_json::json!({})).unwrap(), b"x"],
        );
        let b = record(Kind::State, "A", &[b"{}"]);
        let c = record(Kind::Removed, "A", &[]);
        let mut seg = a.clone();
        // A record torn in the middle, then a damaged one, then a good one.
        seg.extend_from_slice(&b[..b.len() - 3]);
        let mut damaged = b.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        seg.extend_from_slice(&damaged);
        seg.extend_from_slice(&c);
        seg.extend_from_slice(&[0u8; 100]);
        let steps: Vec<Scanned> = scan(&seg).collect();
        assert_eq!(steps.len(), 4, "{steps:?}");
        assert!(
            matches!(&steps[0], Scanned::Record { at: 0, record } if record.kind == Kind::Message)
        );
        assert_eq!(
            steps[1],
            Scanned::Garbage {
                at: a.len(),
                len: 2 * b.len() - 3
            }
        );
        assert!(
            matches!(&steps[2], Scanned::Record { record, .. } if record.kind == Kind::Removed)
        );
        assert!(matches!(steps[3], Scanned::Garbage { len: 100, .. }));
    }

    #[test]
    fn a_message_quoting_the_magic_is_one_record() {
        let data = record(Kind::Removed, "B", &[]);
        let raw = record(
            Kind::Message,
            "A",
            &[&message_prefix(&serde_json::json!({})).unwrap(), &data],
        );
        let steps: Vec<Scanned> = scan(&raw).collect();
        assert_eq!(steps.len(), 1);
    }

    #[test]
    fn limits_are_errors() {
        assert_eq!(
            head(Kind::State, &"x".repeat(256), &[]),
            Err(RecordError::IdTooLong)
        );
        assert!(split_message(&[0, 0, 0, 9, b'x']).is_none());
    }

    /// decode(encode(r)) == r over generated records (every kind, IDs of 0 to 255
    /// octets, payloads in up to three parts), and a run of them scans back in order.
    #[test]
    fn records_round_trip() {
        let mut seed = 0x853c_49e6_748f_ea9bu64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let mut segment = Vec::new();
        let mut written = Vec::new();
        for _ in 0..2000 {
            let kind = [Kind::Message, Kind::State, Kind::Removed][next(3) as usize];
            let id: String = (0..next(256))
                .map(|_| char::from(b'A' + next(26) as u8))
                .collect();
            let parts: Vec<Vec<u8>> = (0..next(4))
                .map(|_| (0..next(300)).map(|_| next(256) as u8).collect())
                .collect();
            let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
            let mut raw = head(kind, &id, &refs).unwrap();
            for p in &parts {
                raw.extend_from_slice(p);
            }
            let payload = parts.concat();
            let (rec, len) = decode(&raw).unwrap();
            assert_eq!(len, raw.len());
            assert_eq!(
                rec,
                Record {
                    kind,
                    id: id.as_bytes(),
                    payload: &payload
                }
            );
            written.push((kind, id, payload));
            segment.extend_from_slice(&raw);
        }
        let scanned: Vec<_> = scan(&segment)
            .map(|s| match s {
                Scanned::Record { record, .. } => {
                    (record.kind, record.id.to_vec(), record.payload.to_vec())
                }
                Scanned::Garbage { .. } => panic!("garbage in a clean segment"),
            })
            .collect();
        let expected: Vec<_> = written
            .into_iter()
            .map(|(k, id, p)| (k, id.into_bytes(), p))
            .collect();
        assert_eq!(scanned, expected);
    }
}
