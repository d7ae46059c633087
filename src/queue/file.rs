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
//! it removes; live messages that hold an old segment back are copied forward.
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
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::record::{self, Kind, Record, Scanned};
use super::spool::{Recovered, Spool, SpoolError};
use crate::envelope::{DeliveryState, Envelope, QueueId};

/// A segment is closed once it reaches this size.
const SEGMENT_BYTES: u64 = 64 << 20;
/// Most writes one commit takes; more wait for the next.
const MAX_BATCH: usize = 256;
/// Octets after which a batch takes no more writes (a single larger one still goes).
const MAX_BATCH_BYTES: usize = 16 << 20;
/// Capacity the batch buffer keeps between batches.
const KEEP_BUFFER: usize = 1 << 20;
/// Closed segments kept behind the oldest one before its live messages are copied
/// forward, so a long-deferred message does not hold back the disk space of all the
/// mail that came after it.
const COMPACT_BEHIND: usize = 4;

pub struct FileSpool {
    dir: PathBuf,
    index: Arc<Mutex<Index>>,
    /// Taken on drop, which lets the committer finish what was sent and stop.
    jobs: Option<mpsc::UnboundedSender<Job>>,
    committer: Option<std::thread::JoinHandle<()>>,
    _lock: File,
}

/// Where every queued message is; shared by the committer (the only writer) and the
/// readers.
#[derive(Default)]
struct Index {
    segments: BTreeMap<u64, Segment>,
    entries: HashMap<QueueId, Loc>,
}

struct Segment {
    file: Arc<File>,
    /// Queued messages whose record is in this segment.
    live: usize,
    /// Octets written.
    len: u64,
}

#[derive(Debug, Clone, Copy)]
struct Span {
    seg: u64,
    at: u64,
    len: u64,
}

struct Loc {
    msg: Span,
    state: Option<Span>,
}

/// One record for the committer to append.
struct Job {
    /// `None` for a barrier: no record, the batch is synced all the same.
    record: Option<(Kind, QueueId)>,
    parts: [Bytes; 3],
    /// `None` for a removal: nobody waits for it.
    done: Option<oneshot::Sender<Result<(), SpoolError>>>,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SpoolError {
    let what = what.into();
    move |source| SpoolError::Io { what, source }
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
        if let Ok(recovered) = spool.recover() {
            for r in recovered {
                let _ = spool.load(&r.envelope.id);
            }
        }
    }
    let _ = fs::remove_dir_all(&dir);
}

fn segment_name(seq: u64) -> String {
    format!("{seq:016X}.seg")
}

fn lock_index(index: &Mutex<Index>) -> MutexGuard<'_, Index> {
    index.lock().unwrap_or_else(|e| e.into_inner())
}

impl FileSpool {
    /// Opens (or creates) the spool and indexes every record in it.
    pub fn open(dir: &Path) -> Result<FileSpool, SpoolError> {
        FileSpool::open_with(dir, SEGMENT_BYTES)
    }

    fn open_with(dir: &Path, segment_bytes: u64) -> Result<FileSpool, SpoolError> {
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
        let (index, next_seq) = load_index(dir, &log)?;
        let index = Arc::new(Mutex::new(index));
        let (jobs, rx) = mpsc::unbounded_channel();
        let committer = Committer {
            log_dir: File::open(&log).map_err(io(log.display().to_string()))?,
            log,
            index: index.clone(),
            current: None,
            next_seq,
            segment_bytes,
            buf: Vec::new(),
        };
        committer.collect_garbage();
        committer.publish_size();
        let committer = std::thread::Builder::new()
            .name("spool-commit".into())
            .spawn(move || committer.run(rx))
            .map_err(io("committer thread"))?;
        Ok(FileSpool {
            dir: dir.to_owned(),
            index,
            jobs: Some(jobs),
            committer: Some(committer),
            _lock: lock,
        })
    }

    fn send(&self, job: Job) -> Result<(), SpoolError> {
        self.jobs
            .as_ref()
            .and_then(|j| j.send(job).ok())
            .ok_or_else(|| SpoolError::Io {
                what: "spool committer".into(),
                source: std::io::Error::other("committer thread stopped"),
            })
    }

    async fn commit(
        &self,
        record: Option<(Kind, QueueId)>,
        parts: [Bytes; 3],
    ) -> Result<(), SpoolError> {
        let (done, wait) = oneshot::channel();
        self.send(Job {
            record,
            parts,
            done: Some(done),
        })?;
        wait.await.map_err(|_| SpoolError::Io {
            what: "spool committer".into(),
            source: std::io::Error::other("committer thread stopped"),
        })?
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
        let (rec, _) = record::decode(&raw).ok_or_else(|| corrupt("checksum mismatch".into()))?;
        parse_message(&rec, id).map_err(corrupt)
    }

    fn read_state(&self, id: &QueueId) -> Option<DeliveryState> {
        let (file, span) = self.locate(id, true)?;
        let raw = read_span(&file, span).ok()?;
        let (rec, _) = record::decode(&raw)?;
        serde_json::from_slice(rec.payload).ok()
    }

    /// Keeps an unreadable message's record for a human and drops it from the queue.
    fn set_aside(&self, id: &QueueId, reason: &str) {
        tracing::error!(queue_id = %id, reason, "spool entry unreadable, copied to corrupt/");
        let corrupt = self.dir.join("corrupt");
        let raw = self
            .locate(id, false)
            .and_then(|(file, span)| read_span(&file, span).ok());
        if let Some(raw) = raw {
            let _ = fs::create_dir_all(&corrupt);
            let _ = fs::write(corrupt.join(id.as_str()), raw);
        }
        let _ = self.remove(id);
    }
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
    let envelope: Envelope = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    if envelope.id != *id {
        return Err("envelope ID does not match the record".into());
    }
    if data.len() as u64 != envelope.size {
        return Err(format!(
            "data is {} octets, envelope says {}",
            data.len(),
            envelope.size
        ));
    }
    Ok((envelope, data.to_vec()))
}

/// Scans every segment in order and replays its records; returns the index and the
/// number for the next segment. New mail always goes to a new segment, so nothing is
/// ever appended after an interrupted write.
fn load_index(dir: &Path, log: &Path) -> Result<(Index, u64), SpoolError> {
    let mut seqs: Vec<u64> = fs::read_dir(log)
        .map_err(io(log.display().to_string()))?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            u64::from_str_radix(name.strip_suffix(".seg")?, 16).ok()
        })
        .collect();
    seqs.sort_unstable();
    let mut index = Index::default();
    for &seq in &seqs {
        let path = log.join(segment_name(seq));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io(path.display().to_string()))?;
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut &file, &mut raw).map_err(io(path.display().to_string()))?;
        for step in record::scan(&raw) {
            match step {
                Scanned::Record { at, record } => replay(&mut index, dir, seq, at, &record),
                Scanned::Garbage { at, len } => tracing::warn!(
                    segment = %path.display(),
                    at,
                    len,
                    "skipped octets that are not a whole record (an interrupted write, never acknowledged)"
                ),
            }
        }
        index.segments.insert(
            seq,
            Segment {
                file: Arc::new(file),
                live: 0,
                len: raw.len() as u64,
            },
        );
    }
    for loc in index.entries.values() {
        if let Some(s) = index.segments.get_mut(&loc.msg.seg) {
            s.live += 1;
        }
    }
    let next = seqs.last().map_or(1, |s| s + 1);
    Ok((index, next))
}

fn replay(index: &mut Index, dir: &Path, seq: u64, at: usize, rec: &Record<'_>) {
    let span = Span {
        seg: seq,
        at: at as u64,
        len: (record::HEAD_LEN + rec.id.len() + rec.payload.len()) as u64,
    };
    let Some(id) = std::str::from_utf8(rec.id).ok().and_then(QueueId::parse) else {
        // Checksummed but not an ID of ours: keep the octets for a human.
        let corrupt = dir.join("corrupt");
        let _ = fs::create_dir_all(&corrupt);
        let _ = fs::write(corrupt.join(format!("{seq:016X}-{at}")), rec.payload);
        tracing::error!(segment = seq, at, "record with a malformed ID set aside");
        return;
    };
    match rec.kind {
        Kind::Message => {
            // A second copy comes from copying a live message forward; it keeps its state.
            let state = index.entries.get(&id).and_then(|l| l.state);
            index.entries.insert(id, Loc { msg: span, state });
        }
        Kind::State => {
            if let Some(l) = index.entries.get_mut(&id) {
                l.state = Some(span);
            }
        }
        Kind::Removed => {
            index.entries.remove(&id);
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
}

impl Committer {
    fn run(mut self, mut rx: mpsc::UnboundedReceiver<Job>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        // Ends when the spool (the only sender) is dropped.
        while let Some(first) = rx.blocking_recv() {
            let mut bytes = first.len();
            batch.push(first);
            while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(job) => {
                        bytes += job.len();
                        batch.push(job);
                    }
                    Err(_) => break,
                }
            }
            metrics::counter!("smartrelay_spool_records_total").increment(batch.len() as u64);
            self.commit(&mut batch);
            self.collect_garbage();
            self.compact();
            self.publish_size();
        }
    }

    fn publish_size(&self) {
        let index = lock_index(&self.index);
        let bytes: u64 = index.segments.values().map(|s| s.len).sum();
        metrics::gauge!("smartrelay_spool_segments").set(index.segments.len() as f64);
        metrics::gauge!("smartrelay_spool_bytes").set(bytes as f64);
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
            lock_index(&self.index).segments.insert(
                seq,
                Segment {
                    file: file.clone(),
                    live: 0,
                    len: 0,
                },
            );
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
        }
        result
    }

    fn write_out(&mut self, buf: &[u8], durable: bool) -> std::io::Result<(u64, u64)> {
        if buf.is_empty() {
            // A barrier alone: earlier appends may still be unsynced.
            return match &self.current {
                Some(cur) if durable => cur.file.sync_data().map(|()| (cur.seq, cur.len)),
                Some(cur) => Ok((cur.seq, cur.len)),
                None => Ok((0, 0)),
            };
        }
        let started = std::time::Instant::now();
        let cur = self.current()?;
        let base = cur.len;
        let written = cur.file.write_all_at(buf, base).and_then(|()| {
            if durable {
                cur.file.sync_data()
            } else {
                Ok(())
            }
        });
        match written {
            Ok(()) => {
                cur.len += buf.len() as u64;
                let (seq, len) = (cur.seq, cur.len);
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
                if cur.file.set_len(base).is_err() {
                    // Cannot cut it back: leave it and start a fresh one.
                    tracing::error!(segment = cur.seq, "cannot truncate a failed write");
                    self.current = None;
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
            for p in &job.parts {
                self.buf.extend_from_slice(p);
            }
        }
        let durable = batch.iter().any(|j| j.done.is_some());
        let appended = self.append(durable);
        let mut index = lock_index(&self.index);
        let mut answers = Vec::with_capacity(batch.len());
        for (job, off) in batch.drain(..).zip(offsets) {
            let len = job.len() as u64;
            match (&appended, job.record) {
                // Removals apply even when their record was not written: at worst the
                // message comes back after a crash and is delivered once more.
                (_, Some((Kind::Removed, id))) => {
                    if let Some(loc) = index.entries.remove(&id) {
                        if let Some(s) = index.segments.get_mut(&loc.msg.seg) {
                            s.live = s.live.saturating_sub(1);
                        }
                    }
                }
                (Ok(_), None) => answers.push((job.done, Ok(()))),
                (Ok((seg, base)), Some((kind, id))) => {
                    let span = Span {
                        seg: *seg,
                        at: base + off,
                        len,
                    };
                    if kind == Kind::Message {
                        index.entries.insert(
                            id,
                            Loc {
                                msg: span,
                                state: None,
                            },
                        );
                        if let Some(s) = index.segments.get_mut(seg) {
                            s.live += 1;
                        }
                    } else if let Some(loc) = index.entries.get_mut(&id) {
                        loc.state = Some(span);
                    }
                    answers.push((job.done, Ok(())));
                }
                (Err(e), _) => {
                    let err = SpoolError::Io {
                        what: "spool segment".into(),
                        source: std::io::Error::new(e.kind(), e.to_string()),
                    };
                    answers.push((job.done, Err(err)));
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

    /// Deletes the oldest segments while none of their messages is queued.
    fn collect_garbage(&self) {
        let current = self.current.as_ref().map(|c| c.seq);
        let mut index = lock_index(&self.index);
        while let Some((&seq, seg)) = index.segments.first_key_value() {
            if seg.live > 0 || Some(seq) == current {
                break;
            }
            index.segments.remove(&seq);
            let path = self.log.join(segment_name(seq));
            if let Err(e) = fs::remove_file(&path) {
                tracing::error!(segment = %path.display(), error = %e, "cannot delete spool segment");
            }
        }
    }

    /// Copies the live messages of the oldest segment forward once enough closed
    /// segments wait behind it; it is deleted at the next collection.
    fn compact(&mut self) {
        let current = self.current.as_ref().map(|c| c.seq);
        let (oldest, file, moving) = {
            let index = lock_index(&self.index);
            let closed = index.segments.len() - usize::from(current.is_some());
            let Some((&oldest, seg)) = index.segments.first_key_value() else {
                return;
            };
            if closed <= COMPACT_BEHIND || Some(oldest) == current {
                return;
            }
            let moving: Vec<Moving> = index
                .entries
                .iter()
                .filter(|(_, l)| l.msg.seg == oldest)
                .map(|(id, l)| Moving {
                    id: id.clone(),
                    msg: l.msg,
                    state: l
                        .state
                        .and_then(|s| index.segments.get(&s.seg).map(|sg| (sg.file.clone(), s))),
                })
                .collect();
            (oldest, seg.file.clone(), moving)
        };
        // (id, offset in buf of the message, its length, offset of the state, its length)
        let mut placed = Vec::with_capacity(moving.len());
        self.buf.clear();
        for Moving { id, msg, state } in moving {
            let Ok(raw) = read_span(&file, msg) else {
                tracing::error!(queue_id = %id, "cannot read a message to copy it forward");
                return;
            };
            let msg_at = self.buf.len() as u64;
            self.buf.extend_from_slice(&raw);
            let state_at = state.and_then(|(f, s)| {
                let raw = read_span(&f, s).ok()?;
                let at = self.buf.len() as u64;
                self.buf.extend_from_slice(&raw);
                Some((at, s.len))
            });
            placed.push((id, msg_at, msg.len, state_at));
        }
        let moved = placed.len();
        match self.append(true) {
            Ok((seg, base)) => {
                let mut index = lock_index(&self.index);
                for (id, msg_at, msg_len, state_at) in placed {
                    if let Some(loc) = index.entries.get_mut(&id) {
                        loc.msg = Span {
                            seg,
                            at: base + msg_at,
                            len: msg_len,
                        };
                        loc.state = state_at.map(|(at, len)| Span {
                            seg,
                            at: base + at,
                            len,
                        });
                    }
                }
                if let Some(s) = index.segments.get_mut(&oldest) {
                    s.live = 0;
                }
                if let Some(s) = index.segments.get_mut(&seg) {
                    s.live += moved;
                }
                drop(index);
                tracing::info!(
                    segment = oldest,
                    messages = moved,
                    "copied queued messages forward from an old spool segment"
                );
                self.collect_garbage();
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot copy queued messages forward; will retry")
            }
        }
    }
}

/// A live message copied forward out of the oldest segment, with its latest state.
struct Moving {
    id: QueueId,
    msg: Span,
    state: Option<(Arc<File>, Span)>,
}

impl Drop for FileSpool {
    /// Waits for what was sent (removals included) to be written, so the lock is not
    /// released while the committer still writes.
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(c) = self.committer.take() {
            let _ = c.join();
        }
    }
}

impl Job {
    fn len(&self) -> usize {
        self.parts.iter().map(Bytes::len).sum()
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
        self.send(Job {
            record: Some((Kind::Removed, id.clone())),
            parts: [Bytes::from(head), Bytes::new(), Bytes::new()],
            done: None,
        })
    }

    fn recover(&self) -> Result<Vec<Recovered>, SpoolError> {
        let mut ids: Vec<QueueId> = lock_index(&self.index).entries.keys().cloned().collect();
        ids.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            match self.read_message(&id) {
                Ok((envelope, _)) => {
                    let state = self
                        .read_state(&id)
                        .filter(|s| s.rcpts.len() == envelope.recipients.len());
                    out.push(Recovered { envelope, state });
                }
                Err(SpoolError::NotFound(_)) => {}
                Err(e) => self.set_aside(&id, &e.to_string()),
            }
        }
        Ok(out)
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(data: &[u8]) -> Envelope {
        let mut e = Envelope::for_test("a@example.test", &["b@x.test"], data.len() as u64);
        e.received_at = 1;
        e
    }

    fn tempdir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("smartrelay-spool-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
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
        let rec = spool.recover().unwrap();
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
        let holed = envelope(b"abcdefghij");
        let prefix = record::message_prefix(&holed).unwrap();
        let head =
            record::head(Kind::Message, holed.id.as_str(), &[&prefix, b"abcdefghij"]).unwrap();
        f.write_all(&head).unwrap();
        f.write_all(&prefix).unwrap();
        f.write_all(&[0u8; 10]).unwrap();
        // A record that checks out but whose envelope is not one.
        let odd = QueueId::generate();
        let prefix = record::message_prefix(&serde_json::json!({})).unwrap();
        let head = record::head(Kind::Message, odd.as_str(), &[&prefix]).unwrap();
        f.write_all(&head).unwrap();
        f.write_all(&prefix).unwrap();
        drop(f);
        let spool = FileSpool::open(&dir).unwrap();
        let rec = spool.recover().unwrap();
        assert_eq!(rec.len(), 1);
        assert_eq!(rec[0].envelope.id, ok.id);
        assert!(rec[0].state.is_none());
        assert!(dir.join("corrupt").join(odd.as_str()).exists());
        assert!(dir.join("corrupt").read_dir().unwrap().count() == 1);
        // Set aside for good: not found again at the next start.
        drop(spool);
        let spool = FileSpool::open(&dir).unwrap();
        assert_eq!(spool.recover().unwrap().len(), 1);
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
        let recovered: Vec<QueueId> = spool
            .recover()
            .unwrap()
            .into_iter()
            .map(|r| r.envelope.id)
            .collect();
        assert_eq!(recovered.len(), 160);
        assert!(ids.iter().all(|id| recovered.contains(id)));
    }

    #[tokio::test]
    async fn old_segments_are_deleted_or_compacted() {
        let dir = tempdir("segments");
        let spool = FileSpool::open_with(&dir, 64 << 10).unwrap();
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
        spool.flush().await.unwrap();
        let n = segments(&dir).len();
        assert!(
            n <= COMPACT_BEHIND + 2,
            "{n} segments left for one queued message"
        );
        assert_eq!(spool.load(&kept.id).unwrap(), big);
        drop(spool);
        let spool = FileSpool::open(&dir).unwrap();
        let rec = spool.recover().unwrap();
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
        let spool = Arc::new(FileSpool::open_with(&dir, 16 << 10).unwrap());
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
        let spool = FileSpool::open_with(&dir, 16 << 10).unwrap();
        let rec = spool.recover().unwrap();
        assert_eq!(rec.len(), expected.len());
        for r in rec {
            let (body, attempts) = &expected[&r.envelope.id];
            assert_eq!(r.state.map(|s| s.attempts), *attempts);
            assert_eq!(&spool.load(&r.envelope.id).unwrap()[..], &body[..]);
        }
        // Deleted as they empty out: far fewer segments than were made (their names
        // are sequence numbers).
        let names = segments(&dir);
        let made = names
            .last()
            .and_then(|p| p.file_stem()?.to_str().map(String::from))
            .and_then(|n| u64::from_str_radix(&n, 16).ok())
            .unwrap();
        assert!(
            (names.len() as u64) < made / 3,
            "{} of {made} segments left",
            names.len()
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
        let rec = spool.recover().unwrap();
        assert_eq!(rec.len(), 1);
        assert_eq!(rec[0].envelope.id, ok.id);
    }
}
