//! The compactor thread: picks the oldest run of segments worth copying forward and
//! reads its live records, off the commit path; the committer appends them.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};

use super::{lock_index, read_span, Copy, Job, Locations, Span, PASS_BYTES};
use crate::envelope::QueueId;

/// Picks what to copy forward and reads it, off the commit path.
pub(super) struct Compactor {
    index: Arc<Mutex<Locations>>,
    jobs: std_mpsc::Sender<Job>,
    stopping: Arc<AtomicBool>,
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
        }
    }

    pub(super) fn run(self, wake: std_mpsc::Receiver<()>) {
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
    fn plan(&self) -> Option<Vec<Moving>> {
        let mut index = lock_index(&self.index);
        let oldest = index.oldest_to_compact()?;
        if index.compacting.is_none_or(|end| oldest > end) {
            let run = index.run_worth_emptying()?;
            tracing::info!(
                from = oldest,
                to = run.end,
                live_bytes = run.live,
                freed_bytes = run.dead,
                "compacting the oldest spool segments"
            );
            index.compacting = Some(run.end);
        }
        let seg = index.segments.get(&oldest)?;
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
