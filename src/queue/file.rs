//! The file spool: one file per message, written to `tmp/`, fsynced, renamed into `msg/`,
//! and made durable by an fsync of `msg/` that concurrent writers share (group commit).
//!
//! ```text
//! <dir>/lock          held (flock) while a relay uses the spool
//! <dir>/tmp/          staging; anything here at start-up is an interrupted write
//! <dir>/msg/<ID>      "SRQ1\n" <envelope length> "\n" <envelope JSON> <message data>
//! <dir>/msg/<ID>.st   delivery state (JSON), replaced atomically
//! <dir>/corrupt/      entries that could not be read, kept for a human
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

use super::spool::{Recovered, Spool, SpoolError};
use crate::envelope::{DeliveryState, Envelope, QueueId};

const MAGIC: &[u8] = b"SRQ1\n";

pub struct FileSpool {
    dir: PathBuf,
    tmp: PathBuf,
    msg: PathBuf,
    dir_sync: DirSync,
    _lock: File,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SpoolError {
    let what = what.into();
    move |source| SpoolError::Io { what, source }
}

impl FileSpool {
    pub fn open(dir: &Path) -> Result<FileSpool, SpoolError> {
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
        let msg_dir = File::open(&msg).map_err(io(msg.display().to_string()))?;
        Ok(FileSpool {
            dir: dir.to_owned(),
            tmp,
            msg,
            dir_sync: DirSync::new(msg_dir),
            _lock: lock,
        })
    }

    fn msg_path(&self, id: &QueueId) -> PathBuf {
        self.msg.join(id.as_str())
    }

    fn state_path(&self, id: &QueueId) -> PathBuf {
        self.msg.join(format!("{id}.st"))
    }

    /// Writes `parts` to a staging file, fsyncs it and renames it to `dest`.
    fn write_durably(&self, name: &str, parts: &[&[u8]], dest: &Path) -> Result<(), SpoolError> {
        let tmp = self.tmp.join(name);
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(io(tmp.display().to_string()))?;
            for p in parts {
                f.write_all(p).map_err(io(tmp.display().to_string()))?;
            }
            f.sync_all().map_err(io(tmp.display().to_string()))?;
            fs::rename(&tmp, dest).map_err(io(dest.display().to_string()))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
            return result;
        }
        self.dir_sync
            .sync()
            .map_err(io(self.msg.display().to_string()))
    }

    fn read_entry(&self, path: &Path) -> Result<(Envelope, Vec<u8>), String> {
        let mut raw = Vec::new();
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut raw))
            .map_err(|e| e.to_string())?;
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

fn decode(raw: &[u8]) -> Result<(Envelope, Vec<u8>), String> {
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
    fn store(&self, envelope: &Envelope, data: &[u8]) -> Result<(), SpoolError> {
        let head = encode_header(envelope)?;
        let dest = self.msg_path(&envelope.id);
        self.write_durably(envelope.id.as_str(), &[&head, data], &dest)
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
                reason,
            })
    }

    fn save_state(&self, id: &QueueId, state: &DeliveryState) -> Result<(), SpoolError> {
        let json = serde_json::to_vec(state).map_err(|e| SpoolError::Corrupt {
            id: id.to_string(),
            reason: e.to_string(),
        })?;
        self.write_durably(&format!("{id}.st"), &[&json], &self.state_path(id))
    }

    fn remove(&self, id: &QueueId) -> Result<(), SpoolError> {
        // Message first: a state file left alone is cleaned up at start-up, whereas a
        // message left without its state would only be delivered once more.
        match fs::remove_file(self.msg_path(id)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(id.to_string())(e)),
        }
        let _ = fs::remove_file(self.state_path(id));
        Ok(())
    }

    fn recover(&self) -> Result<Vec<Recovered>, SpoolError> {
        // Interrupted writes never reached msg/: they were never acknowledged.
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
                if !names.iter().any(|n| n == id) {
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
                Err(reason) => self.set_aside(name, &reason),
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

/// Group commit for the directory fsync: a writer whose rename happened before a sync
/// started need not sync again; one sync covers every rename that came before it.
struct DirSync {
    dir: File,
    state: Mutex<SyncState>,
    done: Condvar,
}

#[derive(Default)]
struct SyncState {
    /// Renames so far (each writer takes a ticket after its rename).
    requested: u64,
    /// Every ticket up to this one is durable.
    synced: u64,
    running: bool,
}

impl DirSync {
    fn new(dir: File) -> DirSync {
        DirSync {
            dir,
            state: Mutex::new(SyncState::default()),
            done: Condvar::new(),
        }
    }

    fn sync(&self) -> std::io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.requested += 1;
        let ticket = st.requested;
        loop {
            if st.synced >= ticket {
                return Ok(());
            }
            if !st.running {
                break;
            }
            st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.running = true;
        let target = st.requested;
        drop(st);
        let result = self.dir.sync_all();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.running = false;
        if result.is_ok() {
            st.synced = st.synced.max(target);
        }
        self.done.notify_all();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{ClientInfo, Recipient};

    fn envelope(data: &[u8]) -> Envelope {
        Envelope {
            id: QueueId::generate(),
            sender: "a@example.test".into(),
            recipients: vec![Recipient {
                address: "b@x.test".into(),
                notify: None,
                orcpt: None,
            }],
            body: Default::default(),
            smtputf8: false,
            ret: None,
            envid: None,
            client: ClientInfo {
                ip: "127.0.0.1".parse().unwrap(),
                helo: "c".into(),
                tls: None,
            },
            received_at: 1,
            size: data.len() as u64,
            message_id: None,
            flags: Default::default(),
            generated_dsn: false,
        }
    }

    fn tempdir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("smartrelay-spool-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn store_load_state_remove() {
        let dir = tempdir("basic");
        let spool = FileSpool::open(&dir).unwrap();
        let data = b"Subject: x\r\n\r\n\0binary\xff\r\n";
        let env = envelope(data);
        spool.store(&env, data).unwrap();
        assert_eq!(spool.load(&env.id).unwrap(), data);
        let mut st = DeliveryState::new(1, 5);
        st.attempts = 3;
        spool.save_state(&env.id, &st).unwrap();
        let rec = spool.recover().unwrap();
        assert_eq!(rec.len(), 1);
        assert_eq!(rec[0].envelope, env);
        assert_eq!(rec[0].state.as_ref().unwrap().attempts, 3);
        spool.remove(&env.id).unwrap();
        assert!(spool.recover().unwrap().is_empty());
        assert!(matches!(spool.load(&env.id), Err(SpoolError::NotFound(_))));
    }

    #[test]
    fn second_instance_is_locked_out() {
        let dir = tempdir("lock");
        let _a = FileSpool::open(&dir).unwrap();
        assert!(matches!(FileSpool::open(&dir), Err(SpoolError::Locked(_))));
    }

    #[test]
    fn recovery_purges_staging_and_sets_aside_corrupt_entries() {
        let dir = tempdir("recover");
        let spool = FileSpool::open(&dir).unwrap();
        let env = envelope(b"ok\r\n");
        spool.store(&env, b"ok\r\n").unwrap();
        fs::write(dir.join("tmp").join("0000000000000000000A"), b"half").unwrap();
        let bad = QueueId::generate();
        let mut truncated = encode_header(&envelope(b"0123456789")).unwrap();
        truncated.extend_from_slice(b"01234");
        fs::write(dir.join("msg").join(bad.as_str()), truncated).unwrap();
        fs::write(dir.join("msg").join("FFFFFFFFFFFFFFFFFFFF.st"), b"{}").unwrap();
        let rec = spool.recover().unwrap();
        assert_eq!(rec.len(), 1);
        assert_eq!(rec[0].envelope.id, env.id);
        assert!(rec[0].state.is_none());
        assert_eq!(fs::read_dir(dir.join("tmp")).unwrap().count(), 0);
        assert!(dir.join("corrupt").join(bad.as_str()).exists());
        assert!(!dir.join("msg").join("FFFFFFFFFFFFFFFFFFFF.st").exists());
    }

    #[test]
    fn concurrent_stores_share_directory_syncs() {
        let dir = tempdir("group");
        let spool = std::sync::Arc::new(FileSpool::open(&dir).unwrap());
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let s = spool.clone();
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        let e = envelope(b"x\r\n");
                        s.store(&e, b"x\r\n").unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(spool.recover().unwrap().len(), 160);
        let st = spool.dir_sync.state.lock().unwrap();
        assert_eq!(st.requested, 160);
        assert_eq!(st.synced, 160);
    }
}
