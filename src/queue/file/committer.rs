//! The committer thread: the only writer. It appends each batch of records with one
//! write and one `fdatasync`, answers the sessions waiting on it, appends compaction
//! passes, and deletes segments nothing is queued in any more.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::mpsc::{self as std_mpsc, RecvTimeoutError};
use std::sync::{Arc, Mutex};

use super::{
    lock_index, segment_name, Copy, Faults, Job, Locations, Segment, Span, Step, CLOSE_EMPTY_BYTES,
    IDLE_SYNC, KEEP_BUFFER, MAX_BATCH, MAX_BATCH_BYTES,
};
use crate::message::Spill;
use crate::queue::record::Kind;
use crate::queue::spool::SpoolError;

/// Octets of a spilled body copied into a segment at a time.
const COPY_CHUNK: usize = 1 << 20;

/// The segment new records go to.
struct Current {
    seq: u64,
    file: Arc<File>,
    len: u64,
}

pub(super) struct Committer {
    log: PathBuf,
    log_dir: File,
    index: Arc<Mutex<Locations>>,
    current: Option<Current>,
    next_seq: u64,
    segment_bytes: u64,
    buf: Vec<u8>,
    /// Bodies in files that go into the batch at these offsets of `buf`.
    tails: Vec<(usize, Arc<Spill>)>,
    /// Where a spilled body passes on its way into a segment.
    scratch: Vec<u8>,
    /// Segments with appends that were not synced (removals, copies).
    unsynced: Vec<(u64, Arc<File>)>,
    /// Copies were appended since the last sync: the segments they emptied stay.
    copies_unsynced: bool,
    compactor: std_mpsc::SyncSender<()>,
    faults: Arc<Faults>,
}

impl Committer {
    /// Deletes what the last run left collectable before the first commit.
    pub(super) fn new(
        log: PathBuf,
        log_dir: File,
        index: Arc<Mutex<Locations>>,
        next_seq: u64,
        segment_bytes: u64,
        compactor: std_mpsc::SyncSender<()>,
        faults: Arc<Faults>,
    ) -> Committer {
        let mut committer = Committer {
            log,
            log_dir,
            index,
            current: None,
            next_seq,
            segment_bytes,
            buf: Vec::new(),
            tails: Vec::new(),
            scratch: Vec::new(),
            unsynced: Vec::new(),
            copies_unsynced: false,
            compactor,
            faults,
        };
        committer.collect_garbage();
        committer.publish_size();
        committer
    }

    pub(super) fn run(mut self, rx: std_mpsc::Receiver<Job>) {
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
                metrics::counter!(crate::telemetry::SPOOL_RECORDS_TOTAL)
                    .increment(writes.len() as u64);
                self.commit(&mut writes);
            }
            // After the answers: a pending 250 never waits for a copy.
            for (copies, done) in passes.drain(..) {
                self.copy(copies);
                let _ = done.send(());
            }
            self.collect_garbage();
            self.publish_size();
            self.wake_compactor();
        }
        self.sync_idle();
    }

    /// Wakes the compactor when it has a pass to make: a thread woken after every batch
    /// to find nothing took about 4 % of the relay's CPU samples under load.
    fn wake_compactor(&self) {
        if lock_index(&self.index).pass_due() {
            let _ = self.compactor.try_send(());
        }
    }

    fn sync_idle(&mut self) {
        if let Err(e) = self.sync_unsynced() {
            tracing::error!(error = %e, "cannot sync the spool");
        }
        self.collect_garbage();
        self.publish_size();
        self.wake_compactor();
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
        metrics::gauge!(crate::telemetry::SPOOL_SEGMENTS).set(index.segments.len() as f64);
        metrics::gauge!(crate::telemetry::SPOOL_BYTES).set(bytes as f64);
        metrics::gauge!(crate::telemetry::SPOOL_LIVE_BYTES).set(live as f64);
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
        let tails = std::mem::take(&mut self.tails);
        let result = self.write_out(&buf, &tails, durable);
        self.buf = buf;
        self.buf.clear();
        // The spilled files go with their last handle, once the sessions let go too.
        drop(tails);
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

    fn write_out(
        &mut self,
        buf: &[u8],
        tails: &[(usize, Arc<Spill>)],
        durable: bool,
    ) -> std::io::Result<(u64, u64)> {
        if buf.is_empty() && tails.is_empty() {
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
        let mut scratch = std::mem::take(&mut self.scratch);
        let written = write_pieces(&file, base, buf, tails, &mut scratch);
        self.scratch = scratch;
        let written = written.and_then(|len| {
            if !self.unsynced.iter().any(|(s, _)| *s == seq) {
                self.unsynced.push((seq, file.clone()));
            }
            if durable {
                self.sync_unsynced()?;
            }
            Ok(len)
        });
        match written {
            Ok(written) => {
                let len = base + written;
                if let Some(cur) = self.current.as_mut() {
                    cur.len = len;
                }
                if durable {
                    metrics::histogram!(crate::telemetry::SPOOL_SYNC_SECONDS)
                        .record(started.elapsed().as_secs_f64());
                    metrics::counter!(crate::telemetry::SPOOL_COMMITS_TOTAL).increment(1);
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
        self.tails.clear();
        let mut offsets = Vec::with_capacity(batch.len());
        let mut spilled = 0u64;
        for job in batch.iter() {
            offsets.push(self.buf.len() as u64 + spilled);
            if let Job::Write { parts, tail, .. } = job {
                for p in parts {
                    self.buf.extend_from_slice(p);
                }
                if let Some(t) = tail {
                    self.tails.push((self.buf.len(), t.clone()));
                    spilled += t.len();
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
                metrics::counter!(crate::telemetry::SPOOL_COMPACTED_BYTES_TOTAL).increment(copied);
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

/// Writes `buf` at `base` with each spilled body copied in at its place; returns the
/// octets written.
fn write_pieces(
    file: &File,
    base: u64,
    buf: &[u8],
    tails: &[(usize, Arc<Spill>)],
    scratch: &mut Vec<u8>,
) -> std::io::Result<u64> {
    let mut at = base;
    let mut from = 0;
    for (to, spill) in tails {
        let piece = buf
            .get(from..*to)
            .ok_or_else(|| std::io::Error::other("tail outside the batch"))?;
        file.write_all_at(piece, at)?;
        at += piece.len() as u64;
        from = *to;
        scratch.resize(COPY_CHUNK, 0);
        let mut done = 0u64;
        while done < spill.len() {
            let n = usize::try_from((spill.len() - done).min(COPY_CHUNK as u64))
                .map_err(std::io::Error::other)?;
            let chunk = &mut scratch[..n];
            spill.read_at(chunk, done)?;
            file.write_all_at(chunk, at)?;
            done += n as u64;
            at += n as u64;
        }
    }
    let rest = buf
        .get(from..)
        .ok_or_else(|| std::io::Error::other("tail outside the batch"))?;
    file.write_all_at(rest, at)?;
    Ok(at + rest.len() as u64 - base)
}
