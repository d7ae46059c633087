//! The file spool: one file per message, made durable before anyone is told so.
//!
//! All durable writes go through one committer thread that takes whatever is pending
//! as a batch. Message files are written in place under `msg/` and made durable,
//! content and directory entry together, by one `syncfs` for the whole batch (an fsync
//! per file and one of `msg/` where there is no syncfs). Under load one journal commit
//! covers many messages, and no session waits on a thread of its own.
//!
//! A message file ends with a CRC-32 of everything before it, so a file a crash cut
//! short or left with unwritten blocks is never taken for a message: it was never
//! acknowledged either, because the answer only goes out after the sync. State files
//! replace an existing file, so they are written to `tmp/`, synced, renamed and the
//! directory synced.
//!
//! ```text
//! <dir>/lock          held (flock) while a relay uses the spool
//! <dir>/tmp/          staging for state files; leftovers are interrupted writes
//! <dir>/msg/<ID>      "SRQ2\n" <envelope length> "\n" <envelope JSON> <data> <trailer>
//!                     trailer: "\0SRQ" and the CRC-32 (big-endian) of all before it
//! <dir>/msg/<ID>.st   delivery state (JSON), replaced atomically
//! <dir>/corrupt/      entries that could not be read, kept for a human
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{IoSlice, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::spool::{Recovered, Spool, SpoolError};
use crate::config::SyncMode;
use crate::envelope::{DeliveryState, Envelope, QueueId};

const MAGIC: &[u8] = b"SRQ2\n";
const TRAILER: &[u8] = b"\0SRQ";
/// Most files one commit takes; more wait for the next.
const MAX_BATCH: usize = 256;
/// Committer threads: while one waits for its journal commit, the next batch is written
/// and queued behind it instead of waiting for it to finish.
const COMMITTERS: usize = 1;

pub struct FileSpool {
    dir: PathBuf,
    tmp: PathBuf,
    msg: PathBuf,
    jobs: mpsc::Sender<Job>,
    _lock: File,
}

/// One file to make durable under `msg/`.
struct Job {
    name: String,
    parts: [Bytes; 3],
    /// Replaces an existing file: staged in `tmp/` and renamed once synced.
    replace: bool,
    done: oneshot::Sender<Result<(), SpoolError>>,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SpoolError {
    let what = what.into();
    move |source| SpoolError::Io { what, source }
}

impl FileSpool {
    pub fn open(dir: &Path, sync: SyncMode) -> Result<FileSpool, SpoolError> {
        let tmp = dir.join("tmp");
        let msg = dir.join("msg");
        for d in [dir, &tmp, &msg] {
            fs::create_dir_all(d).map_err(io(d.display().to_string()))?;
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
        let (jobs, rx) = mpsc::channel(4 * MAX_BATCH);
        let rx = Arc::new(Mutex::new(rx));
        for n in 0..COMMITTERS {
            let committer = Committer {
                sync,
                tmp: tmp.clone(),
                msg: msg.clone(),
                msg_dir: File::open(&msg).map_err(io(msg.display().to_string()))?,
            };
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("spool-commit-{n}"))
                .spawn(move || committer.run(&rx))
                .map_err(io("committer thread"))?;
        }
        Ok(FileSpool {
            dir: dir.to_owned(),
            tmp,
            msg,
            jobs,
            _lock: lock,
        })
    }

    fn msg_path(&self, id: &QueueId) -> PathBuf {
        self.msg.join(id.as_str())
    }

    fn state_path(&self, id: &QueueId) -> PathBuf {
        self.msg.join(format!("{id}.st"))
    }

    async fn commit(
        &self,
        name: String,
        parts: [Bytes; 3],
        replace: bool,
    ) -> Result<(), SpoolError> {
        let (done, wait) = oneshot::channel();
        let gone = || SpoolError::Io {
            what: "spool committer".into(),
            source: std::io::Error::other("committer thread stopped"),
        };
        self.jobs
            .send(Job {
                name,
                parts,
                replace,
                done,
            })
            .await
            .map_err(|_| gone())?;
        wait.await.map_err(|_| gone())?
    }

    fn read_entry(&self, path: &Path) -> Result<(Envelope, Vec<u8>), Unreadable> {
        let mut raw = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut raw))
            .map_err(|e| Unreadable::Corrupt(e.to_string()))?;
        decode(&raw)
    }

    fn set_aside(&self, name: &str, reason: &str) {
        let corrupt = self.dir.join("corrupt");
        let _ = fs::create_dir_all(&corrupt);
        tracing::error!(
            entry = name,
            reason,
            "spool entry unreadable, moved to corrupt/"
        );
        let _ = fs::rename(self.msg.join(name), corrupt.join(name));
    }
}

struct Committer {
    sync: SyncMode,
    tmp: PathBuf,
    msg: PathBuf,
    msg_dir: File,
}

impl Committer {
    fn run(self, rx: &Mutex<mpsc::Receiver<Job>>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        loop {
            {
                // One committer takes a batch at a time; the lock is released before
                // the slow part, so the other can take the next batch meanwhile.
                let mut rx = rx.lock().unwrap_or_else(|e| e.into_inner());
                // Ends when the spool (the only sender) is dropped.
                let Some(first) = rx.blocking_recv() else {
                    return;
                };
                batch.push(first);
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
            }
            self.commit(&mut batch);
        }
    }

    /// Writes and syncs a batch; every job gets its own answer.
    fn commit(&self, batch: &mut Vec<Job>) {
        let mut written: Vec<(Job, PathBuf, File)> = Vec::with_capacity(batch.len());
        for job in batch.drain(..) {
            let path = if job.replace {
                self.tmp.join(&job.name)
            } else {
                self.msg.join(&job.name)
            };
            match write_file(&path, &job.parts) {
                Ok(f) => written.push((job, path, f)),
                Err(e) => {
                    let _ = fs::remove_file(&path);
                    let _ = job.done.send(Err(e));
                }
            }
        }
        if written.is_empty() {
            return;
        }
        if let Err(e) = sync_files(self.sync, written.iter().map(|(_, _, f)| f), &self.msg_dir) {
            // Unknown what reached the disk: take it all back, so nothing that was
            // refused is delivered later.
            return fail_all(written.into_iter().map(|(j, p, _)| (j, p)), &e);
        }
        let (staged, direct): (Vec<_>, Vec<_>) =
            written.into_iter().partition(|(j, _, _)| j.replace);
        for (job, _, _) in direct {
            let _ = job.done.send(Ok(()));
        }
        if staged.is_empty() {
            return;
        }
        let mut renamed = Vec::with_capacity(staged.len());
        for (job, tmp, file) in staged {
            drop(file);
            let dest = self.msg.join(&job.name);
            match fs::rename(&tmp, &dest) {
                Ok(()) => renamed.push((job, dest)),
                Err(e) => {
                    let _ = fs::remove_file(&tmp);
                    let _ = job.done.send(Err(io(dest.display().to_string())(e)));
                }
            }
        }
        let synced = self.msg_dir.sync_all();
        for (job, dest) in renamed {
            let _ = job
                .done
                .send(synced.as_ref().map(|_| ()).map_err(|e| SpoolError::Io {
                    what: dest.display().to_string(),
                    source: std::io::Error::new(e.kind(), e.to_string()),
                }));
        }
    }
}

fn write_file(path: &Path, parts: &[Bytes; 3]) -> Result<File, SpoolError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io(path.display().to_string()))?;
    let slices = [
        IoSlice::new(&parts[0]),
        IoSlice::new(&parts[1]),
        IoSlice::new(&parts[2]),
    ];
    let written = f
        .write_vectored(&slices)
        .map_err(io(path.display().to_string()))?;
    // Short writes are rare; finish by hand if one happens.
    let all: usize = parts.iter().map(Bytes::len).sum();
    if written < all {
        let rest: Vec<u8> = parts
            .iter()
            .flat_map(|p| p.iter())
            .skip(written)
            .copied()
            .collect();
        f.write_all(&rest).map_err(io(path.display().to_string()))?;
    }
    Ok(f)
}

/// Makes every file of the batch durable, content and directory entry.
fn sync_files<'a>(
    mode: SyncMode,
    files: impl Iterator<Item = &'a File> + Clone,
    dir: &File,
) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        if mode == SyncMode::Filesystem {
            // syncfs writes back every dirty page, inode and directory entry of the
            // file system and waits for it: one journal commit for the whole batch,
            // where per-file fsyncs would each wait for one of their own. It reports
            // writeback errors (Linux >= 5.8).
            // SAFETY: `dir` is an open file descriptor for the duration of the call.
            let rc = unsafe { libc::syncfs(dir.as_raw_fd()) };
            return if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            };
        }
        // Start writeback of the whole batch first, so the first fdatasync's commit
        // covers every file and the others find their work done. A hint only: the
        // fdatasync calls below are what the durability rests on.
        for f in files.clone() {
            // SAFETY: an open file descriptor; offset 0 and length 0 mean the whole file.
            unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = mode;
    for f in files {
        f.sync_data()?;
    }
    dir.sync_all()
}

fn fail_all(items: impl IntoIterator<Item = (Job, PathBuf)>, e: &std::io::Error) {
    for (job, path) in items {
        let _ = fs::remove_file(&path);
        let _ = job.done.send(Err(SpoolError::Io {
            what: path.display().to_string(),
            source: std::io::Error::new(e.kind(), e.to_string()),
        }));
    }
}

fn encode_header(envelope: &Envelope) -> Result<Vec<u8>, SpoolError> {
    let json = serde_json::to_vec(envelope).map_err(|e| SpoolError::Corrupt {
        id: envelope.id.to_string(),
        reason: e.to_string(),
    })?;
    let mut head = Vec::with_capacity(json.len() + 16);
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(json.len().to_string().as_bytes());
    head.push(b'\n');
    head.extend_from_slice(&json);
    Ok(head)
}

fn trailer(head: &[u8], data: &[u8]) -> Bytes {
    let mut crc = crc32fast::Hasher::new();
    crc.update(head);
    crc.update(data);
    let mut t = TRAILER.to_vec();
    t.extend_from_slice(&crc.finalize().to_be_bytes());
    Bytes::from(t)
}

/// Why a spool file is not a message.
#[derive(Debug)]
enum Unreadable {
    /// The write never finished (short, no trailer, or blocks never written): the
    /// message was never acknowledged, because the answer waits for the sync.
    Incomplete(&'static str),
    /// Complete but not understood: kept for a human.
    Corrupt(String),
}

impl std::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unreadable::Incomplete(why) => write!(f, "incomplete write: {why}"),
            Unreadable::Corrupt(why) => f.write_str(why),
        }
    }
}

fn decode(raw: &[u8]) -> Result<(Envelope, Vec<u8>), Unreadable> {
    let split = raw
        .len()
        .checked_sub(TRAILER.len() + 4)
        .ok_or(Unreadable::Incomplete("too short"))?;
    let (body, tail) = raw.split_at(split);
    if !tail.starts_with(TRAILER) {
        return Err(Unreadable::Incomplete("no trailer"));
    }
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&tail[TRAILER.len()..]);
    if crc32fast::hash(body) != u32::from_be_bytes(crc) {
        return Err(Unreadable::Incomplete("checksum mismatch"));
    }
    parse_body(body).map_err(Unreadable::Corrupt)
}

fn parse_body(raw: &[u8]) -> Result<(Envelope, Vec<u8>), String> {
    let rest = raw.strip_prefix(MAGIC).ok_or("bad magic")?;
    let nl = memchr::memchr(b'\n', rest).ok_or("no length line")?;
    let len: usize = std::str::from_utf8(&rest[..nl])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or("bad length")?;
    let body_start = nl + 1 + len;
    if rest.len() < body_start {
        return Err("truncated envelope".into());
    }
    let envelope: Envelope =
        serde_json::from_slice(&rest[nl + 1..body_start]).map_err(|e| e.to_string())?;
    let data = rest[body_start..].to_vec();
    if data.len() as u64 != envelope.size {
        return Err(format!(
            "data is {} octets, envelope says {}",
            data.len(),
            envelope.size
        ));
    }
    Ok((envelope, data))
}

impl Spool for FileSpool {
    async fn store(&self, envelope: &Envelope, data: Bytes) -> Result<(), SpoolError> {
        let head = encode_header(envelope)?;
        let tail = trailer(&head, &data);
        self.commit(
            envelope.id.to_string(),
            [Bytes::from(head), data, tail],
            false,
        )
        .await
    }

    async fn save_state(&self, id: &QueueId, state: &DeliveryState) -> Result<(), SpoolError> {
        let json = serde_json::to_vec(state).map_err(|e| SpoolError::Corrupt {
            id: id.to_string(),
            reason: e.to_string(),
        })?;
        self.commit(
            format!("{id}.st"),
            [Bytes::from(json), Bytes::new(), Bytes::new()],
            true,
        )
        .await
    }

    fn load(&self, id: &QueueId) -> Result<Vec<u8>, SpoolError> {
        let path = self.msg_path(id);
        if !path.exists() {
            return Err(SpoolError::NotFound(id.to_string()));
        }
        self.read_entry(&path)
            .map(|(_, data)| data)
            .map_err(|reason| SpoolError::Corrupt {
                id: id.to_string(),
                reason: reason.to_string(),
            })
    }

    fn remove(&self, id: &QueueId, state: bool) -> Result<(), SpoolError> {
        // Message first: a state file left alone is cleaned up at start-up, whereas a
        // message left without its state would only be delivered once more.
        match fs::remove_file(self.msg_path(id)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(id.to_string())(e)),
        }
        if state {
            let _ = fs::remove_file(self.state_path(id));
        }
        Ok(())
    }

    fn recover(&self) -> Result<Vec<Recovered>, SpoolError> {
        // Interrupted state writes never replaced anything: drop them.
        for entry in fs::read_dir(&self.tmp).map_err(io("tmp"))?.flatten() {
            let _ = fs::remove_file(entry.path());
        }
        let mut names: Vec<String> = fs::read_dir(&self.msg)
            .map_err(io("msg"))?
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        let mut out = Vec::new();
        for name in &names {
            if let Some(id) = name.strip_suffix(".st") {
                if names.binary_search_by(|n| n.as_str().cmp(id)).is_err() {
                    let _ = fs::remove_file(self.msg.join(name));
                }
                continue;
            }
            let Some(id) = QueueId::parse(name) else {
                self.set_aside(name, "not a queue ID");
                continue;
            };
            match self.read_entry(&self.msg.join(name)) {
                Ok((envelope, _)) if envelope.id == id => {
                    let state = fs::read(self.state_path(&id))
                        .ok()
                        .and_then(|raw| serde_json::from_slice::<DeliveryState>(&raw).ok())
                        .filter(|s| s.rcpts.len() == envelope.recipients.len());
                    out.push(Recovered { envelope, state });
                }
                Ok(_) => self.set_aside(name, "envelope ID does not match file name"),
                Err(Unreadable::Incomplete(why)) => {
                    tracing::warn!(entry = %name, why, "interrupted write removed (it was never acknowledged)");
                    let _ = fs::remove_file(self.msg.join(name));
                }
                Err(Unreadable::Corrupt(reason)) => self.set_aside(name, &reason),
            }
        }
        Ok(out)
    }

    fn probe(&self) -> Result<(), SpoolError> {
        let path = self.tmp.join("probe");
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

    #[tokio::test]
    async fn store_load_state_remove() {
        let dir = tempdir("basic");
        let spool = FileSpool::open(&dir, SyncMode::Filesystem).unwrap();
        let data: &[u8] = b"Subject: x\r\n\r\n\0binary\xff\r\n";
        let env = envelope(data);
        spool.store(&env, Bytes::from_static(data)).await.unwrap();
        assert_eq!(spool.load(&env.id).unwrap(), data);
        let mut st = DeliveryState::new(1, 5);
        st.attempts = 3;
        spool.save_state(&env.id, &st).await.unwrap();
        let rec = spool.recover().unwrap();
        assert_eq!(rec.len(), 1);
        assert_eq!(rec[0].envelope, env);
        assert_eq!(rec[0].state.as_ref().unwrap().attempts, 3);
        spool.remove(&env.id, true).unwrap();
        assert!(spool.recover().unwrap().is_empty());
        assert!(matches!(spool.load(&env.id), Err(SpoolError::NotFound(_))));
    }

    #[tokio::test]
    async fn second_instance_is_locked_out() {
        let dir = tempdir("lock");
        let _a = FileSpool::open(&dir, SyncMode::Filesystem).unwrap();
        assert!(matches!(
            FileSpool::open(&dir, SyncMode::Files),
            Err(SpoolError::Locked(_))
        ));
    }

    #[tokio::test]
    async fn recovery_removes_interrupted_writes_and_sets_aside_corrupt_entries() {
        let dir = tempdir("recover");
        let spool = FileSpool::open(&dir, SyncMode::Filesystem).unwrap();
        let env = envelope(b"ok\r\n");
        spool
            .store(&env, Bytes::from_static(b"ok\r\n"))
            .await
            .unwrap();
        fs::write(dir.join("tmp").join("0000000000000000000A"), b"half").unwrap();
        // A file the crash cut short, and one with the right length but a block that
        // was never written: neither passes for a message.
        let bad = QueueId::generate();
        let mut truncated = encode_header(&envelope(b"0123456789")).unwrap();
        truncated.extend_from_slice(b"01234");
        fs::write(dir.join("msg").join(bad.as_str()), truncated).unwrap();
        let holed = envelope(b"0123456789");
        let head = encode_header(&holed).unwrap();
        let mut zeroed = head.clone();
        zeroed.extend_from_slice(&[0u8; 10]);
        zeroed.extend_from_slice(&trailer(&head, b"0123456789"));
        fs::write(dir.join("msg").join(holed.id.as_str()), zeroed).unwrap();
        fs::write(dir.join("msg").join("FFFFFFFFFFFFFFFFFFFF.st"), b"{}").unwrap();
        let rec = spool.recover().unwrap();
        assert_eq!(rec.len(), 1);
        assert_eq!(rec[0].envelope.id, env.id);
        assert!(rec[0].state.is_none());
        assert_eq!(fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
        assert!(!dir.join("msg").join(bad.as_str()).exists());
        assert!(!dir.join("msg").join(holed.id.as_str()).exists());
        assert!(
            !dir.join("corrupt").exists(),
            "interrupted writes are removed, not kept"
        );
        // A complete file that does not parse is kept for a human.
        let odd = QueueId::generate();
        let head = b"SRQ2\n2\n{}".to_vec();
        let mut file = head.clone();
        file.extend_from_slice(&trailer(&head, b""));
        fs::write(dir.join("msg").join(odd.as_str()), file).unwrap();
        assert_eq!(spool.recover().unwrap().len(), 1);
        assert!(dir.join("corrupt").join(odd.as_str()).exists());
        assert!(!dir.join("msg").join("FFFFFFFFFFFFFFFFFFFF.st").exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_stores_are_all_committed() {
        for (n, mode) in [SyncMode::Filesystem, SyncMode::Files]
            .into_iter()
            .enumerate()
        {
            concurrent_stores(&tempdir(&format!("group{n}")), mode).await;
        }
    }

    async fn concurrent_stores(dir: &Path, mode: SyncMode) {
        let spool = Arc::new(FileSpool::open(dir, mode).unwrap());
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
        let recovered: Vec<QueueId> = spool
            .recover()
            .unwrap()
            .into_iter()
            .map(|r| r.envelope.id)
            .collect();
        assert_eq!(recovered.len(), 160);
        assert!(ids.iter().all(|id| recovered.contains(id)));
        assert_eq!(fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_failed_write_leaves_nothing_behind() {
        let dir = tempdir("fail");
        let spool = FileSpool::open(&dir, SyncMode::Filesystem).unwrap();
        // A directory where the file would go makes the write fail.
        let env = envelope(b"x\r\n");
        let blocker = dir.join("msg").join(env.id.as_str());
        fs::create_dir(&blocker).unwrap();
        assert!(spool
            .store(&env, Bytes::from_static(b"x\r\n"))
            .await
            .is_err());
        fs::remove_dir(&blocker).unwrap();
        // The next message is unaffected.
        let ok = envelope(b"y\r\n");
        spool
            .store(&ok, Bytes::from_static(b"y\r\n"))
            .await
            .unwrap();
        assert_eq!(spool.recover().unwrap().len(), 1);
    }
}
