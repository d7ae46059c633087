//! The file spool against a real directory: durability, recovery, compaction and
//! fault injection at every step of the committer.

use super::*;
use crate::message::Data;

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
    let head = record::head(Kind::Message, holed.id.as_str(), &[&prefix, b"abcdefghij"]).unwrap();
    f.write_all(&head).unwrap();
    f.write_all(&prefix).unwrap();
    f.write_all(&[0u8; 10]).unwrap();
    holed
}

fn tempdir(name: &str) -> PathBuf {
    crate::scratch::dir(&format!("spool-{name}"))
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
        spool
            .store(&env, Data::Memory(Bytes::from_static(data)))
            .await
            .unwrap();
        spool
            .store(&gone, Data::Memory(Bytes::from_static(b"y")))
            .await
            .unwrap();
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

/// A body in a file: the record is the same as if it had been in memory, it is read
/// back whole after a restart, and it goes into one batch with small messages.
#[tokio::test]
async fn a_spilled_body_is_stored_from_its_file() {
    let dir = tempdir("spilled");
    let mut body = b"Subject: big\r\n\r\n".to_vec();
    while body.len() < (3 << 20) + 17 {
        body.extend_from_slice(b"0123456789 spilled body line\r\n");
    }
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join("body");
    fs::write(&path, &body).unwrap();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&body);
    let spill = Arc::new(Spill::new(
        File::open(&path).unwrap(),
        path.clone(),
        body.len() as u64,
        crc,
    ));
    let trace: &[u8] = b"Received: from c.test\r\n";
    let mut whole = trace.to_vec();
    whole.extend_from_slice(&body);
    let big = envelope(&whole);
    let small = envelope(b"s\r\n");
    {
        let spool = FileSpool::open(&dir).unwrap();
        let data = Data::Spilled {
            prefix: Bytes::from_static(trace),
            file: spill,
        };
        let (a, b) = tokio::join!(
            spool.store(&big, data),
            spool.store(&small, Data::Memory(Bytes::from_static(b"s\r\n")))
        );
        a.unwrap();
        b.unwrap();
        assert!(!path.exists(), "the file goes once the spool has its copy");
        assert_eq!(spool.load(&big.id).unwrap(), whole);
        assert_eq!(spool.load(&small.id).unwrap(), &b"s\r\n"[..]);
    }
    let spool = FileSpool::open(&dir).unwrap();
    assert_eq!(recovered(&spool).len(), 2);
    assert_eq!(spool.load(&big.id).unwrap(), whole);
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
            .store(&ok, Data::Memory(Bytes::from_static(b"ok\r\n")))
            .await
            .unwrap();
    }
    // What a crash can leave at the end of a segment: a record cut short, then a
    // record of the right length whose data blocks were never written.
    let seg = segments(&dir).pop().unwrap();
    let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
    let torn = envelope(b"0123456789");
    let prefix = record::message_prefix(&torn).unwrap();
    let head = record::head(Kind::Message, torn.id.as_str(), &[&prefix, b"0123456789"]).unwrap();
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
                s.store(&e, Data::Memory(Bytes::from_static(b"x\r\n")))
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
    spool.store(&kept, Data::Memory(big.clone())).await.unwrap();
    let mut st = DeliveryState::new(1, 5);
    st.attempts = 2;
    spool.save_state(&kept.id, &st).await.unwrap();
    for _ in 0..160 {
        let e = envelope(&big);
        spool.store(&e, Data::Memory(big.clone())).await.unwrap();
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
                    s.store(&e, Data::Memory(body.clone())).await.unwrap();
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
        .store(&ok, Data::Memory(Bytes::from_static(b"y\r\n")))
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
        .store(&bad, Data::Memory(Bytes::from_static(b"x\r\n")))
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
        spool.store(&e, Data::Memory(body.clone())).await.unwrap();
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
        let mut acked: HashMap<QueueId, (Bytes, Option<u32>, Option<u32>, bool)> = HashMap::new();
        // A commit cut between its sync and its answer leaves a message the
        // client was never told about: it may come back (the client sends it
        // again, as after any crash there), but whole.
        let mut never_acked = HashMap::new();
        for n in 0..400u32 {
            let body = Bytes::from(format!("{n} {}", "z".repeat((n as usize * 37) % 900)));
            let e = envelope(&body);
            if spool.store(&e, Data::Memory(body.clone())).await.is_err() {
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
            .store(&ok, Data::Memory(Bytes::from_static(b"ok\r\n")))
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

/// Segments 1..: (live messages, live octets, octets written); the last one is open.
fn locations(segs: &[(usize, u64, u64)], compacting: Option<u64>) -> Locations {
    let file = Arc::new(File::create(tempdir("locations").join("seg")).unwrap());
    let segments: BTreeMap<u64, Segment> = segs
        .iter()
        .zip(1u64..)
        .map(|(&(live, live_bytes, len), n)| {
            let file = file.clone();
            (
                n,
                Segment {
                    file,
                    live,
                    live_bytes,
                    len,
                },
            )
        })
        .collect();
    Locations {
        current: segments.keys().next_back().copied(),
        segments,
        entries: HashMap::new(),
        compacting,
    }
}

/// The committer wakes the compactor only when a pass is due: a run of oldest
/// segments with twice as many dead octets as live, or the rest of a run begun.
#[test]
fn a_pass_is_due_only_when_worth_it() {
    // Mostly live: nothing to gain.
    assert!(!locations(&[(9, 900, 1000), (1, 10, 10)], None).pass_due());
    // Two thirds dead in the oldest segment.
    assert!(locations(&[(1, 300, 1000), (1, 10, 10)], None).pass_due());
    // Not enough in the first, enough once the second is counted in.
    assert!(locations(&[(5, 500, 1000), (1, 10, 1000), (1, 10, 10)], None).pass_due());
    // The open segment is never compacted, however dead.
    assert!(!locations(&[(1, 10, 1000)], None).pass_due());
    // An empty oldest segment waits for the committer to delete it.
    assert!(!locations(&[(0, 0, 1000), (1, 10, 10)], None).pass_due());
    // A run begun goes on to its end, though the rest of it alone would not qualify.
    assert!(locations(&[(9, 900, 1000), (1, 10, 10)], Some(1)).pass_due());
    // A run that ended before the oldest segment no longer counts.
    assert!(!locations(&[(9, 900, 1000), (9, 900, 1000), (1, 10, 10)], Some(0)).pass_due());
}
