//! The compactor thread: picks the oldest run of segments worth copying forward and
//! reads its live records, off the commit path; the committer appends them.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};

use super::{lock_index, read_span, Copy, Job, Locations, Span, PASS_BYTES, RECLAIM_FACTOR};
use crate::envelope::QueueId;

/// Picks what to copy forward and reads it, off the commit path.
pub(super) struct Compactor {
    index: Arc<Mutex<Locations>>,
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
    pub(super) fn new(
        index: Arc<Mutex<Locations>>,
        jobs: std_mpsc::Sender<Job>,
        stopping: Arc<AtomicBool>,
    ) -> Compactor {
        Compactor {
            index,
            jobs,
            stopping,
            target: None,
        }
    }

    pub(super) fn run(mut self, wake: std_mpsc::Receiver<()>) {
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
