//! The file spool: an append-only log of checksummed records in segment files, made
//! durable before anyone is told so.
//!
//! One committer thread owns the open segment. It takes whatever writes are pending
//! as a batch, appends them with one write and makes them durable with one
//! `fdatasync`; only then does each waiting session get its answer. Appending to one
//! file needs no new inode or directory entry per message, so a commit is a data
//! flush, not a file-system journal commit, and under load one flush covers many
//! messages. A new segment's directory entry is synced before anything is written
//! to it.
//!
//! Delivery states and removals are records too; the last record for an ID wins. A
//! removal is not synced on its own (a crash before it reaches the disk only means
//! the message is delivered once more). Segments are deleted oldest first, once none
//! of their messages is still queued, so a removal record never outlives the message
//! it removes.
//!
//! Compaction: a compactor thread copies the live records of the oldest segments
//! forward only when that frees at least [`RECLAIM_FACTOR`] times what it copies: it
//! commits to the shortest run of oldest segments whose dead octets are at least
//! `RECLAIM_FACTOR` times their live ones, and empties that run. Every copied octet
//! is paid for by two freed ones, and each octet is freed once, so copies are at
//! most half of all octets written: write amplification is at most 2.0 over what
//! was accepted (state records aside), and a backlog that is all live is never
//! copied at all. When no run qualifies, dead octets are under twice the live ones,
//! so the spool stays under three times its live records plus the open segment. The
//! compactor reads on its own thread and hands passes of at most [`PASS_BYTES`] to
//! the committer, which appends them after answering the batch at hand, without a
//! sync of their own: they reach the disk with the next commit (or after
//! [`IDLE_SYNC`] of quiet), and the segments they empty are deleted only then.
//!
//! Start-up reads each record's head and envelope and skips message data, except
//! where the log shows a crash (a head that does not parse), where it falls back to
//! checking every record's checksum. Data is checked when it is read for delivery.
//!
//! ```text
//! <dir>/lock             held (flock) while a relay uses the spool
//! <dir>/log/<seq>.seg    segments, 16 hex digits, written in order
//! <dir>/corrupt/         records that check out but cannot be read, kept for a human
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self as std_mpsc, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::record::{self, Kind, Record, Scanned};
use super::spool::{Recovered, Spool, SpoolError};
use crate::envelope::{DeliveryState, Envelope, QueueId};

/// A segment is closed once it reaches this size (`queue.segment_size`).
const SEGMENT_BYTES: u64 = 64 << 20;
/// An open segment with nothing queued in it is closed (and so deleted) once it is
/// this large, so a drained queue gives its disk space back.
const CLOSE_EMPTY_BYTES: u64 = 1 << 20;
/// Most writes one commit takes; more wait for the next.
const MAX_BATCH: usize = 256;
/// Octets after which a batch takes no more writes (a single larger one still goes).
const MAX_BATCH_BYTES: usize = 16 << 20;
/// Capacity the batch buffer keeps between batches.
const KEEP_BUFFER: usize = 1 << 20;
/// A segment is copied forward only when that frees this many times what it copies.
pub const RECLAIM_FACTOR: u64 = 2;
/// Most octets one compaction pass copies, so a pass never holds up many commits.
const PASS_BYTES: u64 = 4 << 20;
/// Octets read at each record at start-up: the head, the ID and most envelopes.
const PEEK_BYTES: usize = 4096;
/// How long writes that nobody waits for may stay unsynced when the spool is idle.
const IDLE_SYNC: Duration = Duration::from_millis(50);

pub struct FileSpool {
    dir: PathBuf,
    index: Arc<Mutex<Index>>,
    /// What the start-up scan decoded, handed out once by `recover`.
    found: Mutex<Option<Found>>,
    /// Taken on drop, which lets the committer finish what was sent and stop.
    jobs: Option<std_mpsc::Sender<Job>>,
    committer: Option<std::thread::JoinHandle<()>>,
    compactor: Option<std::thread::JoinHandle<()>>,
    compactor_wake: std_mpsc::SyncSender<()>,
    stopping: Arc<AtomicBool>,
    _lock: File,
}

/// Envelopes and latest states of the messages found at start-up.
type Found = HashMap<QueueId, (Envelope, Option<DeliveryState>)>;

/// Where every queued message is; shared by the committer (the only writer), the
/// compactor and the readers.
#[derive(Default)]
struct Index {
    segments: BTreeMap<u64, Segment>,
    entries: HashMap<QueueId, Loc>,
    /// The segment records are appended to: never compacted or deleted.
    current: Option<u64>,
}

struct Segment {
    file: Arc<File>,
    /// Queued messages whose record is in this segment.
    live: usize,
    /// Octets of the records in this segment that are still the latest for a
    /// queued message (its message record and its latest state).
    live_bytes: u64,
    /// Octets written.
    len: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    seg: u64,
    at: u64,
    len: u64,
}

#[derive(Debug, Clone, Copy)]
struct Loc {
    msg: Span,
    state: Option<Span>,
}

impl Index {
    fn hold(&mut self, span: Span, message: bool) {
        if let Some(s) = self.segments.get_mut(&span.seg) {
            s.live_bytes += span.len;
            s.live += usize::from(message);
        }
    }

    fn release(&mut self, span: Span, message: bool) {
        if let Some(s) = self.segments.get_mut(&span.seg) {
            s.live_bytes = s.live_bytes.saturating_sub(span.len);
            s.live = s.live.saturating_sub(usize::from(message));
        }
    }

    /// A message record: new, or a copy of a queued one, which keeps its state.
    fn place_message(&mut self, id: QueueId, msg: Span) {
        let state = match self.entries.get(&id).copied() {
            Some(old) => {
                self.release(old.msg, true);
                old.state
            }
            None => None,
        };
        self.hold(msg, true);
        self.entries.insert(id, Loc { msg, state });
    }

    fn place_state(&mut self, id: &QueueId, span: Span) {
        let Some(loc) = self.entries.get_mut(id) else {
            return;
        };
        let old = loc.state.replace(span);
        if let Some(old) = old {
            self.release(old, false);
        }
        self.hold(span, false);
    }

    fn remove(&mut self, id: &QueueId) -> bool {
        let Some(loc) = self.entries.remove(id) else {
            return false;
        };
        self.release(loc.msg, true);
        if let Some(s) = loc.state {
            self.release(s, false);
        }
        true
    }
}

/// Work for the committer.
enum Job {
    /// One record to append; `record` is `None` for a barrier (nothing appended, the
    /// batch is synced all the same), `done` is `None` for a removal nobody waits for.
    Write {
        record: Option<(Kind, QueueId)>,
        parts: [Bytes; 3],
        done: Option<oneshot::Sender<Result<(), SpoolError>>>,
    },
    /// A compaction pass: copies to append unless their message changed meanwhile.
    Copy {
        copies: Vec<Copy>,
        done: std_mpsc::SyncSender<()>,
    },
}

/// A live message record (and its latest state record) read for copying forward.
struct Copy {
    id: QueueId,
    msg: Span,
    state: Option<Span>,
    /// The message record, then the state record, as they are on disk.
    raw: Vec<u8>,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SpoolError {
    let what = what.into();
    move |source| SpoolError::Io { what, source }
}

fn stopped() -> SpoolError {
    SpoolError::Io {
        what: "spool committer".into(),
        source: std::io::Error::other("committer thread stopped"),
    }
}

/// Fuzzing entry point: recovers a spool whose only segment holds `segment`, then
/// reads back every message it recovered. Any outcome but a panic is acceptable.
#[doc(hidden)]
pub fn fuzz_recover(segment: &[u8]) {
    let dir = std::env::temp_dir().join(format!("smartrelay-fuzz-spool-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let log = dir.join("log");
    if fs::create_dir_all(&log).is_err() || fs::write(log.join(segment_name(1)), segment).is_err() {
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
    let _ = fs::remove_dir_all(&dir);
}

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
        out.push((envelope, data));
    }
    out.sort_by(|a, b| a.0.id.as_str().cmp(b.0.id.as_str()));
    Ok(out)
}

fn segment_name(seq: u64) -> String {
    format!("{seq:016X}.seg")
}

fn lock_index(index: &Mutex<Index>) -> MutexGuard<'_, Index> {
    index.lock().unwrap_or_else(|e| e.into_inner())
}

/// Where the tests stop the committer, as a `kill -9` would stop the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    CopiesWritten,
    CopiesIndexed,
    Synced,
    SegmentDeleted,
}

/// Test-only fault injection: the committer dies at the `halt_at`-th step it passes.
#[derive(Default)]
struct Faults {
    #[cfg(test)]
    halt_at: std::sync::atomic::AtomicUsize,
    #[cfg(test)]
    passed: std::sync::atomic::AtomicUsize,
}

impl Faults {
    #[cfg(test)]
    fn step(&self, step: Step) {
        let n = self.passed.fetch_add(1, Ordering::SeqCst) + 1;
        if n == self.halt_at.load(Ordering::SeqCst) {
            // Unwinds the committer thread and nothing else: the files stay exactly
            // as this step left them, as after a kill.
            std::panic::panic_any(format!("fault injected after {step:?}"));
        }
    }

    #[cfg(not(test))]
    #[inline(always)]
    fn step(&self, _: Step) {}
}

impl FileSpool {
    /// Opens (or creates) the spool and indexes every record in it.
    pub fn open(dir: &Path) -> Result<FileSpool, SpoolError> {
        FileSpool::open_sized(dir, SEGMENT_BYTES)
    }

    /// As `open`, closing segments at `segment_bytes` (`queue.segment_size`).
    pub fn open_sized(dir: &Path, segment_bytes: u64) -> Result<FileSpool, SpoolError> {
        FileSpool::open_with(dir, segment_bytes, Arc::default())
    }

    fn open_with(
        dir: &Path,
        segment_bytes: u64,
        faults: Arc<Faults>,
    ) -> Result<FileSpool, SpoolError> {
        let log = dir.join("log");
        for d in [dir, &log] {
            fs::create_dir_all(d).map_err(io(d.display().to_string()))?;
        }
        // A freshly made spool's directories must survive a crash as its first
        // segment will.
        for d in [dir.parent(), Some(dir)].into_iter().flatten() {
            if let Ok(f) = File::open(d) {
                f.sync_all().map_err(io(d.display().to_string()))?;
            }
        }
        let lock_path = dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(lock_path.display().to_string()))?;
        lock.try_lock()
            .map_err(|_| SpoolError::Locked(dir.display().to_string()))?;
        let (index, found, next_seq) = load_index(dir, &log)?;
        let index = Arc::new(Mutex::new(index));
        let (jobs, rx) = std_mpsc::channel();
        let (compactor_wake, wake_rx) = std_mpsc::sync_channel(1);
        let stopping = Arc::new(AtomicBool::new(false));
        let mut committer = Committer {
            log_dir: File::open(&log).map_err(io(log.display().to_string()))?,
            log,
            index: index.clone(),
            current: None,
            next_seq,
            segment_bytes,
            buf: Vec::new(),
            unsynced: Vec::new(),
            copies_unsynced: false,
            compactor: compactor_wake.clone(),
            faults,
        };
        committer.collect_garbage();
        committer.publish_size();
        let committer = std::thread::Builder::new()
            .name("spool-commit".into())
            .spawn(move || committer.run(rx))
            .map_err(io("committer thread"))?;
        let compactor = Compactor {
            index: index.clone(),
            jobs: jobs.clone(),
            stopping: stopping.clone(),
            target: None,
        };
        let compactor = std::thread::Builder::new()
            .name("spool-compact".into())
            .spawn(move || compactor.run(wake_rx))
            .map_err(io("compactor thread"))?;
        // Whatever the last run left to compact.
        let _ = compactor_wake.try_send(());
        Ok(FileSpool {
            dir: dir.to_owned(),
            index,
            found: Mutex::new(Some(found)),
            jobs: Some(jobs),
            committer: Some(committer),
            compactor: Some(compactor),
            compactor_wake,
            stopping,
            _lock: lock,
        })
    }

    fn send(&self, job: Job) -> Result<(), SpoolError> {
        self.jobs
            .as_ref()
            .and_then(|j| j.send(job).ok())
            .ok_or_else(stopped)
    }

    async fn commit(
        &self,
        record: Option<(Kind, QueueId)>,
        parts: [Bytes; 3],
    ) -> Result<(), SpoolError> {
        let (done, wait) = oneshot::channel();
        self.send(Job::Write {
            record,
            parts,
            done: Some(done),
        })?;
        wait.await.map_err(|_| stopped())?
    }

    /// The segment and span of a message's record (or of its latest state), taken
    /// together: a segment deleted after this is still read through its open file.
    fn locate(&self, id: &QueueId, state: bool) -> Option<(Arc<File>, Span)> {
        let index = lock_index(&self.index);
        let loc = index.entries.get(id)?;
        let span = if state { loc.state? } else { loc.msg };
        let file = index.segments.get(&span.seg)?.file.clone();
        Some((file, span))
    }

    fn read_message(&self, id: &QueueId) -> Result<(Envelope, Vec<u8>), SpoolError> {
        let (file, span) = self
            .locate(id, false)
            .ok_or_else(|| SpoolError::NotFound(id.to_string()))?;
        let corrupt = |reason: String| SpoolError::Corrupt {
            id: id.to_string(),
            reason,
        };
        let raw = read_span(&file, span).map_err(corrupt)?;
        let Some((rec, _)) = record::decode(&raw) else {
            self.set_aside(id, &raw, "checksum mismatch");
            return Err(corrupt("checksum mismatch".into()));
        };
        match parse_message(&rec, id) {
            Ok(m) => Ok(m),
            Err(reason) => {
                self.set_aside(id, &raw, &reason);
                Err(corrupt(reason))
            }
        }
    }

    /// Keeps an unreadable message's record for a human and drops it from the queue:
    /// it can never be delivered as it was received.
    fn set_aside(&self, id: &QueueId, raw: &[u8], reason: &str) {
        tracing::error!(queue_id = %id, reason, "spool entry unreadable, copied to corrupt/");
        keep_corrupt(&self.dir, id.as_str(), raw);
        let _ = self.remove(id);
    }
}

fn keep_corrupt(dir: &Path, name: &str, raw: &[u8]) {
    let corrupt = dir.join("corrupt");
    let _ = fs::create_dir_all(&corrupt);
    let _ = fs::write(corrupt.join(name), raw);
}

fn read_span(file: &File, span: Span) -> Result<Vec<u8>, String> {
    let len = usize::try_from(span.len).map_err(|e| e.to_string())?;
    let mut raw = vec![0u8; len];
    file.read_exact_at(&mut raw, span.at)
        .map_err(|e| e.to_string())?;
    Ok(raw)
}

fn parse_message(rec: &Record<'_>, id: &QueueId) -> Result<(Envelope, Vec<u8>), String> {
    let (json, data) = record::split_message(rec.payload).ok_or("truncated envelope")?;
    let envelope = parse_envelope(json, id, data.len() as u64)?;
    Ok((envelope, data.to_vec()))
}

fn parse_envelope(json: &[u8], id: &QueueId, data_len: u64) -> Result<Envelope, String> {
    let envelope: Envelope = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    if envelope.id != *id {
        return Err("envelope ID does not match the record".into());
    }
    if data_len != envelope.size {
        return Err(format!(
            "data is {data_len} octets, envelope says {}",
            envelope.size
        ));
    }
    Ok(envelope)
}

/// Scans every segment in order and replays its records; returns the index, what it
/// decoded and the number for the next segment. New mail always goes to a new
/// segment, so nothing is ever appended after an interrupted write.
fn load_index(dir: &Path, log: &Path) -> Result<(Index, Found, u64), SpoolError> {
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
        index: Index::default(),
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
    index: Index,
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

/// The segment new records go to.
struct Current {
    seq: u64,
    file: Arc<File>,
    len: u64,
}

struct Committer {
    log: PathBuf,
    log_dir: File,
    index: Arc<Mutex<Index>>,
    current: Option<Current>,
    next_seq: u64,
    segment_bytes: u64,
    buf: Vec<u8>,
    /// Segments with appends that were not synced (removals, copies).
    unsynced: Vec<(u64, Arc<File>)>,
    /// Copies were appended since the last sync: the segments they emptied stay.
    copies_unsynced: bool,
    compactor: std_mpsc::SyncSender<()>,
    faults: Arc<Faults>,
}

impl Committer {
    fn run(mut self, rx: std_mpsc::Receiver<Job>) {
        let mut writes = Vec::with_capacity(MAX_BATCH);
        let mut passes = Vec::new();
        // Ends when every sender (the spool and the compactor) is gone.
        loop {
            let first = if self.unsynced.is_empty() {
                match rx.recv() {
                    Ok(job) => job,
                    Err(_) => break,
                }
            } else {
                match rx.recv_timeout(IDLE_SYNC) {
                    Ok(job) => job,
                    Err(RecvTimeoutError::Timeout) => {
                        self.sync_idle();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            };
            let mut bytes = 0;
            let mut next = Some(first);
            while let Some(job) = next.take() {
                match job {
                    Job::Write { .. } => {
                        bytes += job.len();
                        writes.push(job);
                    }
                    Job::Copy { copies, done } => passes.push((copies, done)),
                }
                if writes.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                    next = rx.try_recv().ok();
                }
            }
            if !writes.is_empty() {
                metrics::counter!("smartrelay_spool_records_total").increment(writes.len() as u64);
                self.commit(&mut writes);
            }
            // After the answers: a pending 250 never waits for a copy.
            for (copies, done) in passes.drain(..) {
                self.copy(copies);
                let _ = done.send(());
            }
            self.collect_garbage();
            self.publish_size();
            let _ = self.compactor.try_send(());
        }
        self.sync_idle();
    }

    fn sync_idle(&mut self) {
        if let Err(e) = self.sync_unsynced() {
            tracing::error!(error = %e, "cannot sync the spool");
        }
        self.collect_garbage();
        self.publish_size();
        let _ = self.compactor.try_send(());
    }

    /// Syncs every segment with unsynced appends.
    fn sync_unsynced(&mut self) -> std::io::Result<()> {
        while let Some((_, file)) = self.unsynced.last() {
            file.sync_data()?;
            self.unsynced.pop();
        }
        if self.copies_unsynced {
            self.copies_unsynced = false;
            self.faults.step(Step::Synced);
        }
        Ok(())
    }

    fn publish_size(&self) {
        let index = lock_index(&self.index);
        let bytes: u64 = index.segments.values().map(|s| s.len).sum();
        let live: u64 = index.segments.values().map(|s| s.live_bytes).sum();
        metrics::gauge!("smartrelay_spool_segments").set(index.segments.len() as f64);
        metrics::gauge!("smartrelay_spool_bytes").set(bytes as f64);
        metrics::gauge!("smartrelay_spool_live_bytes").set(live as f64);
    }

    fn current(&mut self) -> std::io::Result<&mut Current> {
        if self.current.is_none() {
            // A failed attempt never reuses its number: the file may exist.
            let seq = self.next_seq;
            self.next_seq += 1;
            let path = self.log.join(segment_name(seq));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)?;
            // The segment's directory entry is durable before any record in it is
            // acknowledged.
            if let Err(e) = self.log_dir.sync_all() {
                let _ = fs::remove_file(&path);
                return Err(e);
            }
            let file = Arc::new(file);
            let mut index = lock_index(&self.index);
            index.segments.insert(
                seq,
                Segment {
                    file: file.clone(),
                    live: 0,
                    live_bytes: 0,
                    len: 0,
                },
            );
            index.current = Some(seq);
            drop(index);
            self.current = Some(Current { seq, file, len: 0 });
        }
        self.current
            .as_mut()
            .ok_or_else(|| std::io::Error::other("no segment"))
    }

    /// Appends the records in `buf` and syncs them when `durable`; on failure the
    /// segment is cut back, so nothing that was refused is found at the next start.
    fn append(&mut self, durable: bool) -> std::io::Result<(u64, u64)> {
        let buf = std::mem::take(&mut self.buf);
        let result = self.write_out(&buf, durable);
        self.buf = buf;
        self.buf.clear();
        // One large message must not keep its size in memory for good.
        self.buf.shrink_to(KEEP_BUFFER);
        let full = self
            .current
            .as_ref()
            .is_some_and(|c| c.len >= self.segment_bytes);
        if full {
            self.current = None;
            lock_index(&self.index).current = None;
        }
        result
    }

    fn write_out(&mut self, buf: &[u8], durable: bool) -> std::io::Result<(u64, u64)> {
        if buf.is_empty() {
            // A barrier alone: earlier appends may still be unsynced.
            if durable {
                self.sync_unsynced()?;
            }
            return Ok(self.current.as_ref().map_or((0, 0), |c| (c.seq, c.len)));
        }
        let started = std::time::Instant::now();
        let cur = self.current()?;
        let base = cur.len;
        let (seq, file) = (cur.seq, cur.file.clone());
        let written = file.write_all_at(buf, base).and_then(|()| {
            if !self.unsynced.iter().any(|(s, _)| *s == seq) {
                self.unsynced.push((seq, file.clone()));
            }
            if durable {
                self.sync_unsynced()
            } else {
                Ok(())
            }
        });
        match written {
            Ok(()) => {
                let len = base + buf.len() as u64;
                if let Some(cur) = self.current.as_mut() {
                    cur.len = len;
                }
                if durable {
                    metrics::histogram!("smartrelay_spool_sync_seconds")
                        .record(started.elapsed().as_secs_f64());
                    metrics::counter!("smartrelay_spool_commits_total").increment(1);
                }
                if let Some(s) = lock_index(&self.index).segments.get_mut(&seq) {
                    s.len = len;
                }
                Ok((seq, base))
            }
            Err(e) => {
                if file.set_len(base).is_err() {
                    // Cannot cut it back: leave it and start a fresh one.
                    tracing::error!(segment = seq, "cannot truncate a failed write");
                    self.current = None;
                    lock_index(&self.index).current = None;
                }
                Err(e)
            }
        }
    }

    fn commit(&mut self, batch: &mut Vec<Job>) {
        self.buf.clear();
        let mut offsets = Vec::with_capacity(batch.len());
        for job in batch.iter() {
            offsets.push(self.buf.len() as u64);
            if let Job::Write { parts, .. } = job {
                for p in parts {
                    self.buf.extend_from_slice(p);
                }
            }
        }
        let durable = batch
            .iter()
            .any(|j| matches!(j, Job::Write { done: Some(_), .. }));
        let appended = self.append(durable);
        let mut index = lock_index(&self.index);
        let mut answers = Vec::with_capacity(batch.len());
        for (job, off) in batch.drain(..).zip(offsets) {
            let len = job.len() as u64;
            let Job::Write { record, done, .. } = job else {
                continue;
            };
            match (&appended, record) {
                // Removals apply even when their record was not written: at worst the
                // message comes back after a crash and is delivered once more.
                (_, Some((Kind::Removed, id))) => {
                    index.remove(&id);
                }
                (Ok(_), None) => answers.push((done, Ok(()))),
                (Ok((seg, base)), Some((kind, id))) => {
                    let span = Span {
                        seg: *seg,
                        at: base + off,
                        len,
                    };
                    if kind == Kind::Message {
                        index.place_message(id, span);
                    } else {
                        index.place_state(&id, span);
                    }
                    answers.push((done, Ok(())));
                }
                (Err(e), _) => {
                    let err = SpoolError::Io {
                        what: "spool segment".into(),
                        source: std::io::Error::new(e.kind(), e.to_string()),
                    };
                    answers.push((done, Err(err)));
                }
            }
        }
        drop(index);
        for (done, answer) in answers {
            if let Some(done) = done {
                let _ = done.send(answer);
            }
        }
    }

    /// Appends a compaction pass, skipping any message removed or given a new state
    /// since it was read (the compactor takes it again in its next pass).
    fn copy(&mut self, copies: Vec<Copy>) {
        self.buf.clear();
        // (id, offset of the message record in buf, its length, the state's)
        let mut placed = Vec::with_capacity(copies.len());
        {
            let index = lock_index(&self.index);
            for c in copies {
                let unchanged = index
                    .entries
                    .get(&c.id)
                    .is_some_and(|l| l.msg == c.msg && l.state == c.state);
                if !unchanged {
                    continue;
                }
                let at = self.buf.len() as u64;
                self.buf.extend_from_slice(&c.raw);
                placed.push((c.id, at, c.msg.len, c.state.map(|s| s.len)));
            }
        }
        if placed.is_empty() {
            return;
        }
        let moved = placed.len();
        let copied = self.buf.len() as u64;
        match self.append(false) {
            Ok((seg, base)) => {
                self.copies_unsynced = true;
                self.faults.step(Step::CopiesWritten);
                let mut index = lock_index(&self.index);
                for (id, at, msg_len, state_len) in placed {
                    let msg = Span {
                        seg,
                        at: base + at,
                        len: msg_len,
                    };
                    index.place_message(id.clone(), msg);
                    if let Some(len) = state_len {
                        let state = Span {
                            seg,
                            at: msg.at + msg_len,
                            len,
                        };
                        index.place_state(&id, state);
                    }
                }
                drop(index);
                self.faults.step(Step::CopiesIndexed);
                metrics::counter!("smartrelay_spool_compacted_bytes_total").increment(copied);
                tracing::debug!(messages = moved, "copied queued messages forward");
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot copy queued messages forward; will retry")
            }
        }
    }

    /// Deletes the oldest segments while none of their messages is queued, unless a
    /// copy out of them may not be on the disk yet.
    fn collect_garbage(&mut self) {
        if self.copies_unsynced {
            return;
        }
        let mut index = lock_index(&self.index);
        let emptied = self.current.as_ref().is_some_and(|c| {
            c.len >= CLOSE_EMPTY_BYTES.min(self.segment_bytes / 4)
                && index.segments.get(&c.seq).is_some_and(|s| s.live == 0)
        });
        if emptied {
            self.current = None;
            index.current = None;
        }
        while let Some((&seq, seg)) = index.segments.first_key_value() {
            if seg.live > 0 || Some(seq) == index.current {
                break;
            }
            index.segments.remove(&seq);
            let path = self.log.join(segment_name(seq));
            if let Err(e) = fs::remove_file(&path) {
                tracing::error!(segment = %path.display(), error = %e, "cannot delete spool segment");
            }
            self.faults.step(Step::SegmentDeleted);
        }
    }
}

/// Picks what to copy forward and reads it, off the commit path.
struct Compactor {
    index: Arc<Mutex<Index>>,
    jobs: std_mpsc::Sender<Job>,
    stopping: Arc<AtomicBool>,
    /// The last segment of the run being emptied: once worth it, the whole run goes.
    target: Option<u64>,
}

/// A live message chosen for copying, with the files its records are in.
struct Moving {
    id: QueueId,
    msg: Span,
    msg_file: Arc<File>,
    state: Option<(Span, Arc<File>)>,
}

impl Compactor {
    fn run(mut self, wake: std_mpsc::Receiver<()>) {
        while wake.recv().is_ok() {
            while !self.stopping.load(Ordering::Relaxed) {
                let Some(pass) = self.plan() else {
                    break;
                };
                let Some(copies) = read_pass(pass) else {
                    break;
                };
                let (done, applied) = std_mpsc::sync_channel(1);
                if self.jobs.send(Job::Copy { copies, done }).is_err() || applied.recv().is_err() {
                    return;
                }
            }
            if self.stopping.load(Ordering::Relaxed) {
                return;
            }
        }
    }

    /// The next pass: up to [`PASS_BYTES`] of the oldest segment's live messages, in
    /// file order, while it is in the run being emptied.
    fn plan(&mut self) -> Option<Vec<Moving>> {
        let index = lock_index(&self.index);
        let (&oldest, seg) = index.segments.first_key_value()?;
        if Some(oldest) == index.current || seg.live == 0 {
            // Empty: the committer deletes it once its copies are synced.
            return None;
        }
        if self.target.is_none_or(|end| oldest > end) {
            let (mut live, mut dead) = (0u64, 0u64);
            let mut end = None;
            for (&s, sg) in &index.segments {
                if Some(s) == index.current {
                    break;
                }
                live += sg.live_bytes;
                dead += sg.len.saturating_sub(sg.live_bytes);
                if live.saturating_mul(RECLAIM_FACTOR) <= dead {
                    end = Some(s);
                    break;
                }
            }
            let end = end?;
            tracing::info!(
                from = oldest,
                to = end,
                live_bytes = live,
                freed_bytes = dead,
                "compacting the oldest spool segments"
            );
            self.target = Some(end);
        }
        let mut moving: Vec<Moving> = index
            .entries
            .iter()
            .filter(|(_, l)| l.msg.seg == oldest)
            .map(|(id, l)| Moving {
                id: id.clone(),
                msg: l.msg,
                msg_file: seg.file.clone(),
                state: l
                    .state
                    .and_then(|s| Some((s, index.segments.get(&s.seg)?.file.clone()))),
            })
            .collect();
        moving.sort_unstable_by_key(|m| m.msg.at);
        let mut bytes = 0u64;
        let mut pass = Vec::new();
        for m in moving {
            let len = m.msg.len + m.state.as_ref().map_or(0, |(s, _)| s.len);
            if !pass.is_empty() && bytes + len > PASS_BYTES {
                break;
            }
            bytes += len;
            pass.push(m);
        }
        Some(pass)
    }
}

fn read_pass(pass: Vec<Moving>) -> Option<Vec<Copy>> {
    let mut copies = Vec::with_capacity(pass.len());
    for m in pass {
        let mut raw = match read_span(&m.msg_file, m.msg) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(queue_id = %m.id, error = %e, "cannot read a message to copy it forward");
                return None;
            }
        };
        if let Some((span, file)) = &m.state {
            match read_span(file, *span) {
                Ok(s) => raw.extend_from_slice(&s),
                Err(e) => {
                    tracing::error!(queue_id = %m.id, error = %e, "cannot read a state to copy it forward");
                    return None;
                }
            }
        }
        copies.push(Copy {
            id: m.id,
            msg: m.msg,
            state: m.state.map(|(s, _)| s),
            raw,
        });
    }
    Some(copies)
}

impl Drop for FileSpool {
    /// Stops the compactor, then waits for what was sent (removals included) to be
    /// written, so the lock is not released while the committer still writes.
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        let _ = self.compactor_wake.try_send(());
        if let Some(c) = self.compactor.take() {
            let _ = c.join();
        }
        self.jobs = None;
        if let Some(c) = self.committer.take() {
            let _ = c.join();
        }
    }
}

impl Job {
    fn len(&self) -> usize {
        match self {
            Job::Write { parts, .. } => parts.iter().map(Bytes::len).sum(),
            Job::Copy { copies, .. } => copies.iter().map(|c| c.raw.len()).sum(),
        }
    }
}

fn unrecordable(id: &QueueId) -> impl FnOnce(record::RecordError) -> SpoolError + '_ {
    move |e| SpoolError::Corrupt {
        id: id.to_string(),
        reason: e.to_string(),
    }
}

impl Spool for FileSpool {
    async fn store(&self, envelope: &Envelope, data: Bytes) -> Result<(), SpoolError> {
        let id = &envelope.id;
        let prefix = record::message_prefix(envelope).map_err(unrecordable(id))?;
        let head = record::head(Kind::Message, id.as_str(), &[&prefix, &data])
            .map_err(unrecordable(id))?;
        self.commit(
            Some((Kind::Message, id.clone())),
            [Bytes::from(head), Bytes::from(prefix), data],
        )
        .await
    }

    async fn save_state(&self, id: &QueueId, state: &DeliveryState) -> Result<(), SpoolError> {
        let json = serde_json::to_vec(state).map_err(|e| SpoolError::Corrupt {
            id: id.to_string(),
            reason: e.to_string(),
        })?;
        let head = record::head(Kind::State, id.as_str(), &[&json]).map_err(unrecordable(id))?;
        self.commit(
            Some((Kind::State, id.clone())),
            [Bytes::from(head), Bytes::from(json), Bytes::new()],
        )
        .await
    }

    async fn flush(&self) -> Result<(), SpoolError> {
        self.commit(None, [Bytes::new(), Bytes::new(), Bytes::new()])
            .await
    }

    fn load(&self, id: &QueueId) -> Result<Vec<u8>, SpoolError> {
        self.read_message(id).map(|(_, data)| data)
    }

    fn remove(&self, id: &QueueId) -> Result<(), SpoolError> {
        let head = record::head(Kind::Removed, id.as_str(), &[]).map_err(unrecordable(id))?;
        self.send(Job::Write {
            record: Some((Kind::Removed, id.clone())),
            parts: [Bytes::from(head), Bytes::new(), Bytes::new()],
            done: None,
        })
    }

    fn recover(&self, found: &mut dyn FnMut(Recovered) -> bool) -> Result<(), SpoolError> {
        let taken = self.found.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(map) = taken else {
            return Ok(());
        };
        let mut all: Vec<(QueueId, (Envelope, Option<DeliveryState>))> = map.into_iter().collect();
        // Oldest first (IDs sort by arrival), so the first to be sent again are the
        // ones that waited longest.
        all.sort_unstable_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        for (_, (envelope, state)) in all {
            let state = state.filter(|s| s.rcpts.len() == envelope.recipients.len());
            if !found(Recovered { envelope, state }) {
                break;
            }
        }
        Ok(())
    }

    fn probe(&self) -> Result<(), SpoolError> {
        // Where segments are created: a full or read-only file system fails here.
        let path = self.dir.join("log").join("probe");
        let result = File::create(&path)
            .and_then(|mut f| f.write_all(b"probe"))
            .map_err(io(path.display().to_string()));
        let _ = fs::remove_file(&path);
        result
    }

    fn size(&self) -> u64 {
        lock_index(&self.index)
            .segments
            .values()
            .map(|s| s.len)
            .sum()
    }

    fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(data: &[u8]) -> Envelope {
        let mut e = Envelope::for_test("a@example.test", &["b@x.test"], data.len() as u64);
        e.received_at = 1;
        e
    }

    /// Appends what a crash can leave of a commit: a message record whose head and
    /// envelope reached the disk, but whose data blocks did not (zeros).
    fn append_holed(f: &mut File) -> Envelope {
        let holed = envelope(b"abcdefghij");
        let prefix = record::message_prefix(&holed).unwrap();
        let head =
            record::head(Kind::Message, holed.id.as_str(), &[&prefix, b"abcdefghij"]).unwrap();
        f.write_all(&head).unwrap();
        f.write_all(&prefix).unwrap();
        f.write_all(&[0u8; 10]).unwrap();
        holed
    }

    fn tempdir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("smartrelay-spool-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn recovered(spool: &FileSpool) -> Vec<Recovered> {
        let mut out = Vec::new();
        spool
            .recover(&mut |r| {
                out.push(r);
                true
            })
            .unwrap();
        out
    }

    /// Segment files and their total size.
    fn disk(dir: &Path) -> (usize, u64) {
        let s = segments(dir);
        let bytes = s
            .iter()
            .map(|p| fs::metadata(p).map_or(0, |m| m.len()))
            .sum();
        (s.len(), bytes)
    }

    /// Waits until the compactor and the collector have brought the segments to
    /// what `done` expects (a barrier each round makes the copies durable, which
    /// lets the emptied segments go).
    async fn settle(spool: &FileSpool, dir: &Path, done: impl Fn(usize, u64) -> bool) {
        for _ in 0..1000 {
            spool.flush().await.unwrap();
            let (n, bytes) = disk(dir);
            if done(n, bytes) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (n, bytes) = disk(dir);
        panic!("segments never settled: {n} files, {bytes} octets");
    }

    fn segments(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(dir.join("log"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn store_load_state_remove_and_reopen() {
        let dir = tempdir("basic");
        let data: &[u8] = b"Subject: x\r\n\r\n\0binary\xff SRL1\r\n";
        let env = envelope(data);
        let gone = envelope(b"y");
        {
            let spool = FileSpool::open(&dir).unwrap();
            spool.store(&env, Bytes::from_static(data)).await.unwrap();
            spool.store(&gone, Bytes::from_static(b"y")).await.unwrap();
            assert_eq!(spool.load(&env.id).unwrap(), data);
            let mut st = DeliveryState::new(1, 5);
            st.attempts = 3;
            spool.save_state(&env.id, &st).await.unwrap();
            spool.remove(&gone.id).unwrap();
            spool.flush().await.unwrap();
            assert!(matches!(spool.load(&gone.id), Err(SpoolError::NotFound(_))));
        }
        // A new process finds the same queue.
        let spool = FileSpool::open(&dir).unwrap();
        let rec = recovered(&spool);
        assert_eq!(rec.len(), 1);
        assert_eq!(rec[0].envelope, env);
        assert_eq!(rec[0].state.as_ref().unwrap().attempts, 3);
        assert_eq!(spool.load(&env.id).unwrap(), data);
    }

    #[tokio::test]
    async fn second_instance_is_locked_out() {
        let dir = tempdir("lock");
        let _a = FileSpool::open(&dir).unwrap();
        assert!(matches!(FileSpool::open(&dir), Err(SpoolError::Locked(_))));
    }

    #[tokio::test]
    async fn interrupted_writes_are_skipped_and_unreadable_records_set_aside() {
        let dir = tempdir("recover");
        let ok = envelope(b"ok\r\n");
        {
            let spool = FileSpool::open(&dir).unwrap();
            spool
                .store(&ok, Bytes::from_static(b"ok\r\n"))
                .await
                .unwrap();
        }
        // What a crash can leave at the end of a segment: a record cut short, then a
        // record of the right length whose data blocks were never written.
        let seg = segments(&dir).pop().unwrap();
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        let torn = envelope(b"0123456789");
        let prefix = record::message_prefix(&torn).unwrap();
        let head =
            record::head(Kind::Message, torn.id.as_str(), &[&prefix, b"0123456789"]).unwrap();
        f.write_all(&head).unwrap();
        f.write_all(&prefix).unwrap();
        f.write_all(b"01234").unwrap();
        append_holed(&mut f);
        // A record that checks out but whose envelope is not one.
        let odd = QueueId::generate();
        let prefix = record::message_prefix(&serde_json::json!({})).unwrap();
        let head = record::head(Kind::Message, odd.as_str(), &[&prefix]).unwrap();
        f.write_all(&head).unwrap();
        f.write_all(&prefix).unwrap();
        drop(f);
        let spool = FileSpool::open(&dir).unwrap();
        let rec = recovered(&spool);
        assert_eq!(rec.len(), 1);
        assert_eq!(rec[0].envelope.id, ok.id);
        assert!(rec[0].state.is_none());
        assert!(dir.join("corrupt").join(odd.as_str()).exists());
        assert!(dir.join("corrupt").read_dir().unwrap().count() == 1);
        // Set aside for good: not found again at the next start.
        drop(spool);
        let spool = FileSpool::open(&dir).unwrap();
        assert_eq!(recovered(&spool).len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_stores_are_all_committed() {
        let dir = tempdir("group");
        let spool = Arc::new(FileSpool::open(&dir).unwrap());
        let tasks: Vec<_> = (0..160)
            .map(|_| {
                let s = spool.clone();
                tokio::spawn(async move {
                    let e = envelope(b"x\r\n");
                    s.store(&e, Bytes::from_static(b"x\r\n"))
                        .await
                        .map(|_| e.id)
                })
            })
            .collect();
        let mut ids = Vec::new();
        for t in tasks {
            ids.push(t.await.unwrap().unwrap());
        }
        drop(spool);
        let spool = FileSpool::open(&dir).unwrap();
        let recovered: Vec<QueueId> = recovered(&spool)
            .into_iter()
            .map(|r| r.envelope.id)
            .collect();
        assert_eq!(recovered.len(), 160);
        assert!(ids.iter().all(|id| recovered.contains(id)));
    }

    #[tokio::test]
    async fn old_segments_are_deleted_or_compacted() {
        let dir = tempdir("segments");
        let spool = FileSpool::open_with(&dir, 64 << 10, Arc::default()).unwrap();
        // Ten segments' worth of 4 KiB messages; the first one stays queued.
        let big = Bytes::from(vec![b'x'; 4 << 10]);
        let kept = envelope(&big);
        spool.store(&kept, big.clone()).await.unwrap();
        let mut st = DeliveryState::new(1, 5);
        st.attempts = 2;
        spool.save_state(&kept.id, &st).await.unwrap();
        for _ in 0..160 {
            let e = envelope(&big);
            spool.store(&e, big.clone()).await.unwrap();
            spool.remove(&e.id).unwrap();
        }
        // The kept message's segment is nearly all dead: it is copied forward and
        // every segment behind it goes.
        settle(&spool, &dir, |n, _| n <= 2).await;
        assert_eq!(spool.load(&kept.id).unwrap(), big);
        drop(spool);
        let spool = FileSpool::open(&dir).unwrap();
        let rec = recovered(&spool);
        assert_eq!(rec.len(), 1);
        assert_eq!(rec[0].envelope.id, kept.id);
        assert_eq!(rec[0].state.as_ref().unwrap().attempts, 2);
    }

    /// Many writers, deferrals and removals over small segments, so segments roll,
    /// are deleted and are copied forward all along: after a restart exactly the
    /// queued messages are there, each with its latest state and its own data.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn interleaved_traffic_survives_rolling_compaction_and_restart() {
        let dir = tempdir("interleaved");
        let spool = Arc::new(FileSpool::open_with(&dir, 16 << 10, Arc::default()).unwrap());
        let tasks: Vec<_> = (0..8u64)
            .map(|w| {
                let s = spool.clone();
                tokio::spawn(async move {
                    let mut kept = HashMap::new();
                    let mut seed = w * 7919 + 1;
                    for n in 0..150u64 {
                        seed = seed
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let body =
                            Bytes::from(format!("w{w} n{n} {}", "x".repeat((seed % 900) as usize)));
                        let e = envelope(&body);
                        s.store(&e, body.clone()).await.unwrap();
                        match seed >> 60 {
                            // Deferred: a state or two, and it stays.
                            0..=2 => {
                                let mut st = DeliveryState::new(1, 5);
                                for a in 1..=(seed >> 62) as u32 + 1 {
                                    st.attempts = a;
                                    s.save_state(&e.id, &st).await.unwrap();
                                }
                                kept.insert(e.id.clone(), (body, Some(st.attempts)));
                            }
                            // Waiting for its first attempt.
                            3 => {
                                kept.insert(e.id.clone(), (body, None));
                            }
                            // Delivered.
                            _ => s.remove(&e.id).unwrap(),
                        }
                        // A deferred message delivered later.
                        if n % 10 == 9 {
                            if let Some(id) = kept.keys().next().cloned() {
                                s.remove(&id).unwrap();
                                kept.remove(&id);
                            }
                        }
                    }
                    kept
                })
            })
            .collect();
        let mut expected = HashMap::new();
        for t in tasks {
            expected.extend(t.await.unwrap());
        }
        spool.flush().await.unwrap();
        for (id, (body, _)) in &expected {
            assert_eq!(&spool.load(id).unwrap()[..], &body[..]);
        }
        drop(spool);
        let spool = FileSpool::open_with(&dir, 16 << 10, Arc::default()).unwrap();
        let rec = recovered(&spool);
        assert_eq!(rec.len(), expected.len());
        for r in rec {
            let (body, attempts) = &expected[&r.envelope.id];
            assert_eq!(r.state.map(|s| s.attempts), *attempts);
            assert_eq!(&spool.load(&r.envelope.id).unwrap()[..], &body[..]);
        }
        // What compaction guarantees: under three times the live records, plus the
        // open segment and the one being emptied.
        let live: u64 = lock_index(&spool.index)
            .segments
            .values()
            .map(|s| s.live_bytes)
            .sum();
        let (_, bytes) = disk(&dir);
        assert!(
            bytes <= 3 * live + 2 * (16 << 10),
            "{bytes} octets on disk for {live} live"
        );
    }

    #[tokio::test]
    async fn a_failed_write_is_taken_back() {
        let dir = tempdir("fail");
        let spool = FileSpool::open(&dir).unwrap();
        let ok = envelope(b"y\r\n");
        spool
            .store(&ok, Bytes::from_static(b"y\r\n"))
            .await
            .unwrap();
        // Make the open segment refuse writes, as a full disk would.
        let seg = segments(&dir).pop().unwrap();
        let len = fs::metadata(&seg).unwrap().len();
        {
            let index = lock_index(&spool.index);
            let (_, s) = index.segments.last_key_value().unwrap();
            let ro = File::open(&seg).unwrap();
            // SAFETY: both are open descriptors; dup2 swaps what the segment's
            // descriptor refers to for a read-only one.
            unsafe {
                use std::os::fd::AsRawFd;
                libc::dup2(ro.as_raw_fd(), s.file.as_raw_fd());
            }
        }
        let bad = envelope(b"x\r\n");
        assert!(spool
            .store(&bad, Bytes::from_static(b"x\r\n"))
            .await
            .is_err());
        assert_eq!(fs::metadata(&seg).unwrap().len(), len);
        drop(spool);
        let spool = FileSpool::open(&dir).unwrap();
        let rec = recovered(&spool);
        assert_eq!(rec.len(), 1);
        assert_eq!(rec[0].envelope.id, ok.id);
    }

    /// A backlog that is all live is never copied: disk use stays what was written.
    /// Once most of it is delivered, the spool shrinks to a small multiple of what
    /// is still queued.
    #[tokio::test]
    async fn live_backlog_is_not_copied_and_a_delivered_one_shrinks() {
        let dir = tempdir("ratio");
        let spool = FileSpool::open_with(&dir, 64 << 10, Arc::default()).unwrap();
        let body = Bytes::from(vec![b'y'; 3000]);
        let mut ids = Vec::new();
        for _ in 0..300 {
            let e = envelope(&body);
            spool.store(&e, body.clone()).await.unwrap();
            ids.push(e.id);
        }
        spool.flush().await.unwrap();
        let (_, written) = disk(&dir);
        let accepted = 300 * body.len() as u64;
        // Record heads and envelopes (about 320 octets each) only, no second copy.
        assert!(
            written < accepted + 300 * 400,
            "{written} octets for {accepted}"
        );
        // Deliver nine in ten, scattered over every segment.
        let mut live = 0u64;
        for (n, id) in ids.iter().enumerate() {
            if n % 10 == 0 {
                live += body.len() as u64;
            } else {
                spool.remove(id).unwrap();
            }
        }
        settle(&spool, &dir, |_, bytes| bytes <= 3 * live + (64 << 10) * 2).await;
        for (n, id) in ids.iter().enumerate() {
            if n % 10 == 0 {
                assert_eq!(spool.load(id).unwrap(), body);
            }
        }
        drop(spool);
        let spool = FileSpool::open(&dir).unwrap();
        assert_eq!(recovered(&spool).len(), 30);
    }

    /// The committer is stopped at every step of compaction in turn (copies written,
    /// indexed, synced, a segment deleted), as a kill would stop it. Whatever the
    /// step, a restart finds every message that was acknowledged and not delivered,
    /// with its data and its latest acknowledged state, and nothing that was never
    /// acknowledged.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn compaction_killed_at_any_step_loses_nothing() {
        let mut halted_somewhere = 0;
        for halt_at in 1..=60 {
            let dir = tempdir(&format!("kill{halt_at}"));
            let faults = Arc::new(Faults::default());
            faults.halt_at.store(halt_at, Ordering::SeqCst);
            let spool = FileSpool::open_with(&dir, 16 << 10, faults.clone()).unwrap();
            // id -> (data, last acknowledged attempts, last one tried, delivered)
            let mut acked: HashMap<QueueId, (Bytes, Option<u32>, Option<u32>, bool)> =
                HashMap::new();
            // A commit cut between its sync and its answer leaves a message the
            // client was never told about: it may come back (the client sends it
            // again, as after any crash there), but whole.
            let mut never_acked = HashMap::new();
            for n in 0..400u32 {
                let body = Bytes::from(format!("{n} {}", "z".repeat((n as usize * 37) % 900)));
                let e = envelope(&body);
                if spool.store(&e, body.clone()).await.is_err() {
                    never_acked.insert(e.id, body);
                    continue;
                }
                let mut entry = (body, None, None, false);
                if n % 7 == 0 {
                    // Deferred, with a state or two.
                    let mut st = DeliveryState::new(1, 5);
                    for a in 1..=(n % 3 + 1) {
                        st.attempts = a;
                        entry.2 = Some(a);
                        if spool.save_state(&e.id, &st).await.is_ok() {
                            entry.1 = Some(a);
                        }
                    }
                } else {
                    entry.3 = spool.remove(&e.id).is_ok();
                }
                acked.insert(e.id, entry);
            }
            let _ = spool.flush().await;
            let halted = faults.passed.load(Ordering::SeqCst) >= halt_at;
            drop(spool);
            let spool = FileSpool::open(&dir).unwrap();
            let found: HashMap<QueueId, Recovered> = recovered(&spool)
                .into_iter()
                .map(|r| (r.envelope.id.clone(), r))
                .collect();
            for (id, (body, attempts, tried, delivered)) in &acked {
                match found.get(id) {
                    Some(r) => {
                        assert_eq!(&spool.load(id).unwrap()[..], &body[..], "step {halt_at}");
                        // The acknowledged state, or one synced but not yet answered.
                        let got = r.state.as_ref().map(|s| s.attempts);
                        assert!(
                            got >= *attempts && got <= *tried,
                            "step {halt_at}: state {got:?}, acknowledged {attempts:?}"
                        );
                    }
                    // Only a delivered message may be gone.
                    None => assert!(*delivered, "step {halt_at}: lost {id}"),
                }
            }
            for (id, body) in &never_acked {
                if found.contains_key(id) {
                    assert_eq!(&spool.load(id).unwrap()[..], &body[..], "step {halt_at}");
                }
            }
            drop(spool);
            let _ = fs::remove_dir_all(&dir);
            if !halted {
                break;
            }
            halted_somewhere += 1;
        }
        assert!(
            halted_somewhere >= 4,
            "only {halted_somewhere} steps exercised"
        );
    }

    /// A record whose head reached the disk but whose data did not (never
    /// acknowledged: its commit was cut short) is found at start-up without its data
    /// being read, and set aside when it is read for delivery: never delivered.
    #[tokio::test]
    async fn a_message_whose_data_never_reached_the_disk_is_set_aside() {
        let dir = tempdir("holed");
        {
            let spool = FileSpool::open(&dir).unwrap();
            let ok = envelope(b"ok\r\n");
            spool
                .store(&ok, Bytes::from_static(b"ok\r\n"))
                .await
                .unwrap();
        }
        let seg = segments(&dir).pop().unwrap();
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        let holed = append_holed(&mut f);
        drop(f);
        let spool = FileSpool::open(&dir).unwrap();
        assert_eq!(recovered(&spool).len(), 2);
        assert!(matches!(
            spool.load(&holed.id),
            Err(SpoolError::Corrupt { .. })
        ));
        assert!(dir.join("corrupt").join(holed.id.as_str()).exists());
        spool.flush().await.unwrap();
        drop(spool);
        let spool = FileSpool::open(&dir).unwrap();
        let rec = recovered(&spool);
        assert_eq!(rec.len(), 1);
        assert_ne!(rec[0].envelope.id, holed.id);
    }
}
