//! Where a body goes while it is received: into memory while it is small, then into a
//! file beside the spool. All sessions share one budget for what they hold in memory
//! (`server.ingress_memory`); a session that finds it spent writes what it holds to
//! its file and stops reading until room is free, so the sender meets TCP backpressure
//! rather than the relay allocating.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use crate::budget::{Held, MemoryBudget};
use crate::message::Spill;

/// Room a session takes before each read of a body.
const ROOM: usize = 64 * 1024;
/// Once a body is in a file, what it keeps in memory before writing it out.
const FLUSH_AT: usize = 256 * 1024;
/// The header section read back from a file for the checks that look at headers.
const HEAD_MAX: usize = 64 * 1024;

/// What every session's bodies share.
#[derive(Debug)]
pub struct Bodies {
    memory: MemoryBudget,
    dir: PathBuf,
    /// A body larger than this goes to a file.
    spill_at: usize,
    next: AtomicU64,
}

impl Bodies {
    /// Bodies in `dir` (emptied: what is there was left by an earlier run and belongs
    /// to no message).
    pub fn new(dir: PathBuf, memory: u64, spill_at: u64) -> std::io::Result<Bodies> {
        std::fs::create_dir_all(&dir)?;
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
        Ok(Bodies {
            memory: MemoryBudget::new(memory),
            dir,
            spill_at: usize::try_from(spill_at).unwrap_or(usize::MAX).max(ROOM),
            next: AtomicU64::new(0),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn memory(&self) -> &MemoryBudget {
        &self.memory
    }

    pub fn sink(self: &Arc<Self>) -> BodySink {
        BodySink {
            held: self.memory.empty(),
            bodies: self.clone(),
            buf: Vec::new(),
            file: None,
            eight_bit: false,
        }
    }

    fn new_path(&self) -> PathBuf {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("{}-{n}.body", std::process::id()))
    }
}

/// A body received completely.
#[derive(Debug)]
pub enum Body {
    Memory(Vec<u8>),
    Spilled {
        /// The start of the message, its header section at most: what the header
        /// checks read.
        head: Vec<u8>,
        file: Arc<Spill>,
        /// Some octet of the body is not ASCII.
        eight_bit: bool,
    },
}

impl Body {
    pub fn len(&self) -> u64 {
        match self {
            Body::Memory(b) => b.len() as u64,
            Body::Spilled { file, .. } => file.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The part the header checks read.
    pub fn head(&self) -> &[u8] {
        match self {
            Body::Memory(b) => b,
            Body::Spilled { head, .. } => head,
        }
    }
}

struct Writer {
    file: tokio::fs::File,
    path: PathBuf,
    len: u64,
    crc: crc32fast::Hasher,
}

/// One body being received. Dropping it (the transaction reset, the session gone)
/// removes its file.
pub struct BodySink {
    bodies: Arc<Bodies>,
    held: Held,
    buf: Vec<u8>,
    file: Option<Writer>,
    eight_bit: bool,
}

impl Drop for BodySink {
    fn drop(&mut self) {
        if let Some(w) = &self.file {
            let _ = std::fs::remove_file(&w.path);
        }
    }
}

impl BodySink {
    /// Where the receiver appends the body's octets.
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Octets received so far.
    pub fn len(&self) -> u64 {
        self.file.as_ref().map_or(0, |w| w.len) + self.buf.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// After octets were appended: past the threshold they go to the file, and what is
    /// still in memory must be covered by the budget, or it goes to the file too.
    pub async fn settle(&mut self) -> std::io::Result<()> {
        let limit = if self.file.is_some() {
            FLUSH_AT
        } else {
            self.bodies.spill_at
        };
        if self.buf.len() >= limit || !self.held.try_grow_to(self.buf.capacity() as u64) {
            self.write_out().await?;
        }
        Ok(())
    }

    /// Room for the next read; returns how long it waited for it. While the budget is
    /// spent, this session holds nothing (so it cannot block the others) and reads
    /// nothing.
    pub async fn room(&mut self) -> std::io::Result<Duration> {
        let want = self.buf.len() + ROOM;
        if self.held.try_grow_to(want as u64) {
            self.buf.reserve(ROOM);
            self.held.try_grow_to(self.buf.capacity() as u64);
            return Ok(Duration::ZERO);
        }
        self.write_out().await?;
        self.buf = Vec::new();
        self.held.shrink_to(0);
        // What it held may be room enough again, now that it is on disk.
        if self.held.try_grow_to(ROOM as u64) {
            self.buf.reserve_exact(ROOM);
            return Ok(Duration::ZERO);
        }
        let started = Instant::now();
        self.held.grow_to(ROOM as u64).await;
        self.buf.reserve_exact(ROOM);
        let waited = started.elapsed();
        metrics::histogram!(crate::telemetry::INGRESS_MEMORY_WAIT_SECONDS)
            .record(waited.as_secs_f64());
        Ok(waited)
    }

    async fn write_out(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            self.shrink();
            return Ok(());
        }
        let w = match &mut self.file {
            Some(w) => w,
            None => {
                metrics::counter!(crate::telemetry::INGRESS_BODIES_SPILLED_TOTAL).increment(1);
                let path = self.bodies.new_path();
                let file = tokio::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .await?;
                self.file.insert(Writer {
                    file,
                    path,
                    len: 0,
                    crc: crc32fast::Hasher::new(),
                })
            }
        };
        self.eight_bit |= !self.buf.is_ascii();
        w.crc.update(&self.buf);
        w.file.write_all(&self.buf).await?;
        w.len += self.buf.len() as u64;
        self.buf.clear();
        self.shrink();
        Ok(())
    }

    fn shrink(&mut self) {
        self.buf.shrink_to(FLUSH_AT);
        self.held.shrink_to(self.buf.capacity() as u64);
    }

    /// The whole body, and the room that still covers it in memory (given back when
    /// the message is stored).
    pub async fn finish(mut self) -> std::io::Result<(Body, Held)> {
        if self.file.is_none() {
            let body = std::mem::take(&mut self.buf);
            let held = std::mem::replace(&mut self.held, self.bodies.memory.empty());
            return Ok((Body::Memory(body), held));
        }
        self.write_out().await?;
        self.buf = Vec::new();
        self.held.shrink_to(0);
        let Some(mut w) = self.file.take() else {
            return Err(std::io::Error::other("body file gone"));
        };
        w.file.flush().await?;
        let file = w.file.into_std().await;
        let spill = Arc::new(Spill::new(file, w.path, w.len, w.crc));
        let head = tokio::task::spawn_blocking({
            let spill = spill.clone();
            move || read_head(&spill)
        })
        .await
        .map_err(std::io::Error::other)??;
        let held = std::mem::replace(&mut self.held, self.bodies.memory.empty());
        Ok((
            Body::Spilled {
                head,
                file: spill,
                eight_bit: self.eight_bit,
            },
            held,
        ))
    }
}

/// The header section of a spilled body (at most [`HEAD_MAX`] octets).
fn read_head(spill: &Spill) -> std::io::Result<Vec<u8>> {
    let n = usize::try_from(spill.len().min(HEAD_MAX as u64)).map_err(std::io::Error::other)?;
    let mut head = vec![0u8; n];
    spill.read_at(&mut head, 0)?;
    if let Some(end) = memchr::memmem::find(&head, b"\r\n\r\n") {
        head.truncate(end + 4);
    }
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bodies(name: &str, memory: u64, spill_at: u64) -> Arc<Bodies> {
        let dir = crate::scratch::dir(&format!("body-{name}"));
        Arc::new(Bodies::new(dir, memory, spill_at).unwrap())
    }

    fn files(b: &Bodies) -> usize {
        std::fs::read_dir(b.dir()).unwrap().count()
    }

    /// Appends `octets` as a session would, a read at a time; returns the time waited.
    async fn fill(sink: &mut BodySink, octets: &[u8]) -> Duration {
        let mut waited = Duration::ZERO;
        for piece in octets.chunks(10_000) {
            waited += sink.room().await.unwrap();
            sink.buffer().extend_from_slice(piece);
            sink.settle().await.unwrap();
        }
        waited
    }

    #[tokio::test]
    async fn a_small_body_stays_in_memory_and_holds_its_room() {
        let b = bodies("small", 1 << 20, 256 << 10);
        let mut sink = b.sink();
        fill(&mut sink, b"Subject: s\r\n\r\nsmall\r\n").await;
        let (body, held) = sink.finish().await.unwrap();
        assert!(matches!(&body, Body::Memory(m) if m == b"Subject: s\r\n\r\nsmall\r\n"));
        assert!(held.bytes() >= 21);
        assert_eq!(files(&b), 0);
        drop(held);
        assert_eq!(b.memory().available(), 1 << 20);
    }

    #[tokio::test]
    async fn a_large_body_goes_to_a_file_that_goes_with_it() {
        let b = bodies("large", 1 << 20, 256 << 10);
        let mut octets = b"Subject: big\r\nX: \xc3\xa9\r\n\r\n".to_vec();
        while octets.len() < 3 << 20 {
            octets.extend_from_slice(b"0123456789abcdefghijklmnopqrstuvwxyz\r\n");
        }
        let mut sink = b.sink();
        fill(&mut sink, &octets).await;
        assert_eq!(sink.len(), octets.len() as u64);
        let (body, held) = sink.finish().await.unwrap();
        let Body::Spilled {
            head,
            file,
            eight_bit,
        } = &body
        else {
            panic!("kept in memory");
        };
        assert_eq!(&head[..], b"Subject: big\r\nX: \xc3\xa9\r\n\r\n");
        assert!(eight_bit);
        assert_eq!(file.read_all().unwrap(), octets);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&octets);
        assert_eq!(file.crc().clone().finalize(), crc.finalize());
        assert_eq!(held.bytes(), 0, "nothing of it is in memory");
        assert_eq!(files(&b), 1);
        drop(body);
        assert_eq!(files(&b), 0);
    }

    #[tokio::test]
    async fn a_body_given_up_leaves_no_file() {
        let b = bodies("dropped", 1 << 20, 64 << 10);
        let mut sink = b.sink();
        fill(&mut sink, &[b'x'; 200_000]).await;
        assert_eq!(files(&b), 1);
        drop(sink);
        assert_eq!(files(&b), 0);
        assert_eq!(b.memory().available(), 1 << 20);
    }

    #[tokio::test(start_paused = true)]
    async fn a_spent_budget_stops_a_new_body_until_room_is_free() {
        let b = bodies("spent", 512 << 10, 1 << 20);
        let mut first = b.sink();
        fill(&mut first, &[b'a'; 100_000]).await;
        let mut hog = b.memory().take(b.memory().available()).await;
        let waiting = tokio::spawn({
            let mut second = b.sink();
            async move {
                let waited = fill(&mut second, &[b'b'; 30_000]).await;
                (waited, second)
            }
        });
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(!waiting.is_finished(), "read on with the budget spent");
        hog.shrink_to(0);
        let (waited, second) = waiting.await.unwrap();
        assert!(waited >= Duration::from_secs(3));
        let (body, _) = second.finish().await.unwrap();
        assert!(matches!(body, Body::Memory(m) if m == [b'b'; 30_000]));
        drop(first);
    }

    #[tokio::test]
    async fn a_body_the_budget_cannot_cover_goes_to_its_file_without_waiting() {
        let b = bodies("tight", 512 << 10, 1 << 20);
        let _hog = b.memory().take(384 << 10).await;
        let mut sink = b.sink();
        let mut octets = Vec::new();
        for i in 0..300_000u32 {
            octets.push(b'a' + (i % 26) as u8);
        }
        let waited = fill(&mut sink, &octets).await;
        assert_eq!(waited, Duration::ZERO, "its own room is enough to go on");
        assert_eq!(files(&b), 1, "under the 1 MiB threshold, yet written out");
        let (body, held) = sink.finish().await.unwrap();
        let Body::Spilled { file, .. } = &body else {
            panic!("kept in memory");
        };
        assert_eq!(file.read_all().unwrap(), octets);
        assert_eq!(held.bytes(), 0);
    }
}
