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
//! The work is split by job: `replay` rebuilds the index at start-up, `committer`
//! owns the writes, `compactor` plans and reads compaction passes; this module holds the
//! index they share and the `Spool` face the queue sees.
//!
//! ```text
//! <dir>/lock             held (flock) while a relay uses the spool
//! <dir>/log/<seq>.seg    segments, 16 hex digits, written in order
//! <dir>/corrupt/         records that check out but cannot be read, kept for a human
//! ```

mod committer;
mod compactor;
#[cfg(test)]
mod hooks;
mod replay;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::record::{self, Kind, Record};
use super::spool::{Recovered, Spool, SpoolError};
use crate::envelope::{DeliveryState, Envelope, QueueId};
use crate::message::{Data, Spill};
use committer::Committer;
use compactor::Compactor;
#[cfg(test)]
use hooks::Faults;
use replay::load_index;
pub use replay::snapshot;

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
    index: Arc<Mutex<Locations>>,
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
struct Locations {
    segments: BTreeMap<u64, Segment>,
    entries: HashMap<QueueId, Loc>,
    /// The segment records are appended to: never compacted or deleted.
    current: Option<u64>,
    /// The last segment of the run the compactor is emptying: once a run is worth it,
    /// the whole run goes.
    compacting: Option<u64>,
}

/// A run of oldest segments worth emptying: its last segment, and its live and dead
/// octets.
struct Run {
    end: u64,
    live: u64,
    dead: u64,
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

impl Locations {
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

    /// The oldest segment, when it can be compacted: not the open one, and with
    /// messages still queued in it (an empty one waits for the committer to delete it).
    fn oldest_to_compact(&self) -> Option<u64> {
        let (&oldest, seg) = self.segments.first_key_value()?;
        (Some(oldest) != self.current && seg.live > 0).then_some(oldest)
    }

    /// The shortest run of oldest segments, the open one excluded, whose dead octets
    /// are at least [`RECLAIM_FACTOR`] times their live ones.
    fn run_worth_emptying(&self) -> Option<Run> {
        let (mut live, mut dead) = (0u64, 0u64);
        for (&s, sg) in &self.segments {
            if Some(s) == self.current {
                return None;
            }
            live += sg.live_bytes;
            dead += sg.len.saturating_sub(sg.live_bytes);
            if live.saturating_mul(RECLAIM_FACTOR) <= dead {
                return Some(Run { end: s, live, dead });
            }
        }
        None
    }

    /// Whether the compactor has a pass to make: the committer wakes it only then,
    /// since after most batches it has none.
    fn pass_due(&self) -> bool {
        self.oldest_to_compact().is_some_and(|oldest| {
            self.compacting.is_some_and(|end| oldest <= end) || self.run_worth_emptying().is_some()
        })
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
        /// A body in a file, appended after `parts`.
        tail: Option<Arc<Spill>>,
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

fn segment_name(seq: u64) -> String {
    format!("{seq:016X}.seg")
}

fn lock_index(index: &Mutex<Locations>) -> MutexGuard<'_, Locations> {
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

/// Outside the tests no fault is ever injected: every step passes.
#[cfg(not(test))]
#[derive(Default)]
struct Faults;

#[cfg(not(test))]
impl Faults {
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
        let log_dir = File::open(&log).map_err(io(log.display().to_string()))?;
        let committer = Committer::new(
            log,
            log_dir,
            index.clone(),
            next_seq,
            segment_bytes,
            compactor_wake.clone(),
            faults,
        );
        let committer = std::thread::Builder::new()
            .name("spool-commit".into())
            .spawn(move || committer.run(rx))
            .map_err(io("committer thread"))?;
        let compactor = Compactor::new(index.clone(), jobs.clone(), stopping.clone());
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
        tail: Option<Arc<Spill>>,
    ) -> Result<(), SpoolError> {
        let (done, wait) = oneshot::channel();
        self.send(Job::Write {
            record,
            parts,
            tail,
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

    fn read_message(&self, id: &QueueId) -> Result<(Envelope, Bytes), SpoolError> {
        let (file, span) = self
            .locate(id, false)
            .ok_or_else(|| SpoolError::NotFound(id.to_string()))?;
        let corrupt = |reason: String| SpoolError::Corrupt {
            id: id.to_string(),
            reason,
        };
        let raw = read_span(&file, span).map_err(corrupt)?;
        let Some((rec, len)) = record::decode(&raw) else {
            self.set_aside(id, &raw, "checksum mismatch");
            return Err(corrupt("checksum mismatch".into()));
        };
        match parse_message(&rec, id) {
            // The data ends the record: hand out that part of the read without a copy.
            Ok((envelope, data)) => {
                let from = len - data.len();
                Ok((envelope, Bytes::from(raw).slice(from..len)))
            }
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

fn parse_message<'a>(rec: &Record<'a>, id: &QueueId) -> Result<(Envelope, &'a [u8]), String> {
    let (json, data) = record::split_message(rec.payload).ok_or("truncated envelope")?;
    let envelope = parse_envelope(json, id, data.len() as u64)?;
    Ok((envelope, data))
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
            Job::Write { parts, tail, .. } => {
                parts.iter().map(Bytes::len).sum::<usize>()
                    + tail
                        .as_ref()
                        .map_or(0, |t| usize::try_from(t.len()).unwrap_or(usize::MAX))
            }
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
    async fn store(&self, envelope: &Envelope, data: Data) -> Result<(), SpoolError> {
        let id = &envelope.id;
        let prefix = record::message_prefix(envelope).map_err(unrecordable(id))?;
        let (data, tail) = match data {
            Data::Memory(b) => (b, None),
            Data::Spilled { prefix, file } => (prefix, Some(file)),
        };
        let head = record::head_with_tail(
            Kind::Message,
            id.as_str(),
            &[&prefix, &data],
            tail.as_ref().map(|t| (t.len(), t.crc())),
        )
        .map_err(unrecordable(id))?;
        self.commit(
            Some((Kind::Message, id.clone())),
            [Bytes::from(head), Bytes::from(prefix), data],
            tail,
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
            None,
        )
        .await
    }

    async fn flush(&self) -> Result<(), SpoolError> {
        self.commit(None, [Bytes::new(), Bytes::new(), Bytes::new()], None)
            .await
    }

    fn load(&self, id: &QueueId) -> Result<Bytes, SpoolError> {
        self.read_message(id).map(|(_, data)| data)
    }

    fn remove(&self, id: &QueueId) -> Result<(), SpoolError> {
        let head = record::head(Kind::Removed, id.as_str(), &[]).map_err(unrecordable(id))?;
        self.send(Job::Write {
            record: Some((Kind::Removed, id.clone())),
            parts: [Bytes::from(head), Bytes::new(), Bytes::new()],
            tail: None,
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
