//! Start-up: every segment is scanned in order and its records replayed into the
//! index. Heads and envelopes are read; message data only where the log shows a crash.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use super::{
    io, keep_corrupt, parse_envelope, parse_message, read_span, segment_name, Found, Locations,
    Segment, Span, PEEK_BYTES,
};
use crate::envelope::{Envelope, QueueId};
use crate::queue::record::{self, Kind, Record, Scanned};
use crate::queue::spool::SpoolError;

/// Every queued message of the spool at `dir` with its data, read as start-up would
/// read it, without taking the lock: for tests and tooling that look at a running
/// relay's spool. A record being written at that moment may be missed.
pub fn snapshot(dir: &Path) -> Result<Vec<(Envelope, Vec<u8>)>, SpoolError> {
    let (index, found, _) = load_index(dir, &dir.join("log"))?;
    let mut out = Vec::with_capacity(found.len());
    for (id, (envelope, _)) in found {
        let Some(loc) = index.entries.get(&id) else {
            continue;
        };
        let Some(seg) = index.segments.get(&loc.msg.seg) else {
            continue;
        };
        let corrupt = |reason: String| SpoolError::Corrupt {
            id: id.to_string(),
            reason,
        };
        let raw = read_span(&seg.file, loc.msg).map_err(corrupt)?;
        let (rec, _) = record::decode(&raw).ok_or_else(|| corrupt("checksum mismatch".into()))?;
        let (_, data) = parse_message(&rec, &id).map_err(corrupt)?;
        out.push((envelope, data.to_vec()));
    }
    out.sort_by(|a, b| a.0.id.as_str().cmp(b.0.id.as_str()));
    Ok(out)
}

/// Scans every segment in order and replays its records; returns the index, what it
/// decoded and the number for the next segment. New mail always goes to a new
/// segment, so nothing is ever appended after an interrupted write.
pub(super) fn load_index(dir: &Path, log: &Path) -> Result<(Locations, Found, u64), SpoolError> {
    let mut seqs: Vec<u64> = fs::read_dir(log)
        .map_err(io(log.display().to_string()))?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            u64::from_str_radix(name.strip_suffix(".seg")?, 16).ok()
        })
        .collect();
    seqs.sort_unstable();
    let mut replay = Replay {
        dir,
        index: Locations::default(),
        found: Found::new(),
    };
    for &seq in &seqs {
        let path = log.join(segment_name(seq));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io(path.display().to_string()))?;
        let len = file
            .metadata()
            .map_err(io(path.display().to_string()))?
            .len();
        let file = Arc::new(file);
        replay.index.segments.insert(
            seq,
            Segment {
                file: file.clone(),
                live: 0,
                live_bytes: 0,
                len,
            },
        );
        replay
            .segment(seq, &file, len)
            .map_err(io(path.display().to_string()))?;
    }
    let next = seqs.last().map_or(1, |s| s + 1);
    Ok((replay.index, replay.found, next))
}

/// One record as the fast start-up path read it.
enum Fast {
    Message {
        id: QueueId,
        span: Span,
        envelope: Box<Envelope>,
    },
    /// Read whole, to be checked by its checksum.
    Checked(Vec<u8>),
    /// No record head here: the rest of the segment is scanned record by record.
    Broken,
}

/// The start-up scan's state: the index being rebuilt and what it decoded.
struct Replay<'a> {
    dir: &'a Path,
    index: Locations,
    found: Found,
}

impl Replay<'_> {
    /// Replays one segment, reading data only where it must be checked.
    fn segment(&mut self, seq: u64, file: &File, len: u64) -> std::io::Result<()> {
        let mut peek = vec![0u8; PEEK_BYTES];
        let mut pos = 0u64;
        // A message read from its head and envelope alone counts once the next head
        // (or the end of the segment) shows it was not cut short. Its data is checked
        // when it is read for delivery: a record whose data never reached the disk
        // (never acknowledged) is set aside then.
        let mut pending: Option<(QueueId, Span, Box<Envelope>)> = None;
        while pos < len {
            let fast = self.fast_record(seq, file, pos, len, &mut peek)?;
            let checked = match fast {
                Fast::Message { id, span, envelope } => {
                    if let Some((id, span, envelope)) = pending.take() {
                        self.place(id, span, envelope);
                    }
                    pos = span.at + span.len;
                    pending = Some((id, span, envelope));
                    continue;
                }
                Fast::Checked(raw) => Some(raw),
                Fast::Broken => None,
            };
            let Some(raw) = checked else {
                let from = pending.as_ref().map_or(pos, |(_, span, _)| span.at);
                return self.checked_rest(seq, file, from, len);
            };
            let Some((rec, total)) = record::decode(&raw) else {
                let from = pending.as_ref().map_or(pos, |(_, span, _)| span.at);
                return self.checked_rest(seq, file, from, len);
            };
            if let Some((id, span, envelope)) = pending.take() {
                self.place(id, span, envelope);
            }
            self.apply(seq, pos, &rec, &raw);
            pos += total as u64;
        }
        if let Some((id, span, envelope)) = pending {
            self.place(id, span, envelope);
        }
        Ok(())
    }

    fn place(&mut self, id: QueueId, span: Span, envelope: Box<Envelope>) {
        self.index.place_message(id.clone(), span);
        self.found.insert(id, (*envelope, None));
    }

    /// Reads the record at `pos`: a new message from its head and envelope, anything
    /// else whole.
    fn fast_record(
        &mut self,
        seq: u64,
        file: &File,
        pos: u64,
        len: u64,
        peek: &mut [u8],
    ) -> std::io::Result<Fast> {
        let want = usize::try_from((len - pos).min(peek.len() as u64)).unwrap_or(peek.len());
        let Some(buf) = peek.get_mut(..want) else {
            return Ok(Fast::Broken);
        };
        file.read_exact_at(buf, pos)?;
        let Some(head) = record::parse_head(buf) else {
            return Ok(Fast::Broken);
        };
        let Some(total) = head.total() else {
            return Ok(Fast::Broken);
        };
        if total as u64 > len - pos {
            return Ok(Fast::Broken);
        }
        let span = Span {
            seg: seq,
            at: pos,
            len: total as u64,
        };
        let whole = |file: &File| {
            read_span(file, span)
                .map(Fast::Checked)
                .map_err(std::io::Error::other)
        };
        let id = buf
            .get(record::HEAD_LEN..record::HEAD_LEN + head.id_len)
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(QueueId::parse);
        // A copy, a state or a removal is read whole: a copy whose octets never
        // reached the disk must not replace the original, and the others are small.
        let Some(id) =
            id.filter(|id| head.kind == Kind::Message && !self.index.entries.contains_key(id))
        else {
            return whole(file);
        };
        let json_at = record::HEAD_LEN + head.id_len;
        let Some(json_len) = buf
            .get(json_at..json_at + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .and_then(|b| usize::try_from(u32::from_be_bytes(b)).ok())
        else {
            return whole(file);
        };
        let Some(data_len) = head.payload_len.checked_sub(4 + json_len) else {
            return whole(file);
        };
        let json_start = json_at + 4;
        let json = match buf.get(json_start..json_start + json_len) {
            Some(j) => j.to_vec(),
            None => {
                let mut j = vec![0u8; json_len];
                file.read_exact_at(&mut j, pos + json_start as u64)?;
                j
            }
        };
        match parse_envelope(&json, &id, data_len as u64) {
            Ok(envelope) => Ok(Fast::Message {
                id,
                span,
                envelope: Box::new(envelope),
            }),
            // Not an envelope: damage, or a head whose data never reached the disk.
            // The checksum tells which.
            Err(_) => whole(file),
        }
    }

    /// From `pos` on, the log shows an interrupted write: every record is checked.
    fn checked_rest(&mut self, seq: u64, file: &File, pos: u64, len: u64) -> std::io::Result<()> {
        let size = usize::try_from(len - pos).map_err(std::io::Error::other)?;
        let mut raw = vec![0u8; size];
        file.read_exact_at(&mut raw, pos)?;
        for step in record::scan(&raw) {
            match step {
                Scanned::Record { at, record } => {
                    let end = at + record::HEAD_LEN + record.id.len() + record.payload.len();
                    let bytes = raw.get(at..end).unwrap_or_default();
                    self.apply(seq, pos + at as u64, &record, bytes);
                }
                Scanned::Garbage { at, len } => tracing::warn!(
                    segment = seq,
                    at = pos + at as u64,
                    len,
                    "skipped octets that are not a whole record (an interrupted write, never acknowledged)"
                ),
            }
        }
        Ok(())
    }

    /// Replays one record whose checksum was checked.
    fn apply(&mut self, seq: u64, at: u64, rec: &Record<'_>, raw: &[u8]) {
        let span = Span {
            seg: seq,
            at,
            len: raw.len() as u64,
        };
        let Some(id) = std::str::from_utf8(rec.id).ok().and_then(QueueId::parse) else {
            // Checksummed but not an ID of ours: keep the octets for a human.
            keep_corrupt(self.dir, &format!("{seq:016X}-{at}"), rec.payload);
            tracing::error!(segment = seq, at, "record with a malformed ID set aside");
            return;
        };
        match rec.kind {
            Kind::Message => {
                if self.index.entries.contains_key(&id) {
                    // A copy made by compaction: same envelope, same state.
                    self.index.place_message(id, span);
                    return;
                }
                match parse_message(rec, &id) {
                    Ok((envelope, _)) => {
                        self.index.place_message(id.clone(), span);
                        self.found.insert(id, (envelope, None));
                    }
                    Err(reason) => {
                        tracing::error!(queue_id = %id, reason, "spool entry unreadable, copied to corrupt/");
                        keep_corrupt(self.dir, id.as_str(), raw);
                    }
                }
            }
            Kind::State => {
                let Some((_, state)) = self.found.get_mut(&id) else {
                    return;
                };
                match serde_json::from_slice(rec.payload) {
                    Ok(s) => {
                        *state = Some(s);
                        self.index.place_state(&id, span);
                    }
                    Err(e) => {
                        tracing::warn!(queue_id = %id, error = %e, "unreadable delivery state skipped")
                    }
                }
            }
            Kind::Removed => {
                self.index.remove(&id);
                self.found.remove(&id);
            }
        }
    }
}
