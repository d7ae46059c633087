//! The durable queue: takes messages from ingress (`Intake`), keeps an in-memory index of
//! what is on disk, and offers the operations the admin API needs. The scheduler that
//! drives deliveries lives in `scheduler`, the bounce messages in `dsn`.

pub mod dsn;
pub mod file;
mod hold;
pub mod record;
pub mod retry;
pub mod scheduler;
pub mod spool;
#[cfg(test)]
pub mod testing;

pub mod space;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{mpsc, Notify, Semaphore};

use crate::budget::MemoryBudget;
use crate::envelope::{
    now_ms, DeliveryState, Envelope, HoldReason, Millis, QueueId, RcptState, Reply,
};
use crate::events::{Accepted, Event, EventBus};
use crate::message::Data;
use crate::pipeline::{Backpressure, Intake, IntakeError, Stored, Submission};
use retry::RetryPolicy;
use spool::{Recovered, Spool, SpoolError};

/// How long ingress answers 4xx after a failed write before trying the disk again.
const UNHEALTHY_FOR_MS: Millis = 5_000;
/// What one queued message's index entry costs (envelope, state, map and timer
/// slots), on the high side (measured: about 1.1 KiB for one recipient); counted
/// against `memory_budget`.
const ENTRY_BYTES: u64 = 1536;
/// Recovered messages in flight from the spool scan to the index.
const RECOVERY_CHANNEL: usize = 1024;

pub struct QueueSettings {
    pub retry: RetryPolicy,
    pub concurrency: usize,
    /// Our host name, for DSNs.
    pub hostname: String,
    /// Half of it is for the index and cached bodies; the other half for the bodies
    /// of deliveries in flight.
    pub memory_budget: u64,
    pub min_free: u64,
    pub max_size: Option<u64>,
}

struct Queued {
    envelope: Arc<Envelope>,
    state: DeliveryState,
    /// Kept from ingress until the first attempt while the memory budget allows, so
    /// a fresh message is not read back.
    data: Option<Bytes>,
    in_flight: bool,
}

#[derive(Default)]
struct Index {
    entries: HashMap<QueueId, Queued>,
    /// (next attempt, id); stale pairs are skipped when popped.
    timers: BTreeSet<(Millis, QueueId)>,
    /// Octets of the bodies kept in `entries`.
    cached: u64,
    /// Which entries keep their body; IDs sort by arrival, so the last is the newest.
    cached_ids: BTreeSet<QueueId>,
}

impl Index {
    fn schedule(&mut self, id: &QueueId, at: Millis) {
        self.timers.insert((at, id.clone()));
    }

    /// Whether a body of `len` octets may be kept in memory: the index and the
    /// cached bodies share half of the budget.
    fn may_cache(&self, len: u64, budget: u64) -> bool {
        let index = self.entries.len() as u64 * ENTRY_BYTES;
        index + self.cached + len <= budget / 2
    }

    fn insert(&mut self, id: QueueId, entry: Queued) {
        if let Some(d) = &entry.data {
            self.cached += d.len() as u64;
            self.cached_ids.insert(id.clone());
        }
        if let Some(old) = self.entries.insert(id, entry) {
            self.cached -= old.data.map_or(0, |d| d.len() as u64);
        }
    }

    fn remove(&mut self, id: &QueueId) -> Option<Queued> {
        let e = self.entries.remove(id)?;
        if let Some(d) = &e.data {
            self.cached -= d.len() as u64;
            self.cached_ids.remove(id);
        }
        Some(e)
    }

    fn take_data(&mut self, id: &QueueId) -> Option<Bytes> {
        let data = self.entries.get_mut(id)?.data.take()?;
        self.cached -= data.len() as u64;
        self.cached_ids.remove(id);
        Some(data)
    }

    /// Drops cached bodies, newest first (the oldest go out first), until the index
    /// and the cache fit their half of the budget again: a growing queue takes the
    /// memory its bodies had. Returns how many were dropped.
    fn evict(&mut self, budget: u64) -> usize {
        let mut n = 0;
        while self.entries.len() as u64 * ENTRY_BYTES + self.cached > budget / 2 {
            let Some(id) = self.cached_ids.pop_last() else {
                break;
            };
            if let Some(d) = self.entries.get_mut(&id).and_then(|e| e.data.take()) {
                self.cached -= d.len() as u64;
                n += 1;
            }
        }
        n
    }
}

/// The queue's time: wall-clock milliseconds when it opened, advanced by tokio's
/// monotonic clock. Schedules do not jump when the system clock is set, and unit
/// tests drive retries and expiry with tokio's paused clock.
struct Clock {
    epoch_ms: Millis,
    epoch: tokio::time::Instant,
}

impl Clock {
    fn new() -> Clock {
        Clock {
            epoch_ms: now_ms(),
            epoch: tokio::time::Instant::now(),
        }
    }

    fn now(&self) -> Millis {
        self.epoch_ms + u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX / 2)
    }
}

pub struct Queue<S: Spool> {
    clock: Clock,
    spool: Arc<S>,
    index: Mutex<Index>,
    wake: Notify,
    settings: QueueSettings,
    events: EventBus,
    slots: Arc<Semaphore>,
    /// Bodies out for delivery (read back or taken from the cache): the other half of
    /// `memory_budget`.
    sending: MemoryBudget,
    unhealthy_until: AtomicU64,
    /// A `Backpressure` from the last space check, or `SPACE_OK`.
    space: AtomicU8,
}

const SPACE_OK: u8 = 0;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("no message {0} in the queue")]
    NotFound(String),
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

/// A queued message as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct QueueItem {
    pub id: QueueId,
    pub sender: String,
    pub received_at: Millis,
    pub size: u64,
    pub attempts: u32,
    pub next_attempt: Millis,
    pub held: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_reason: Option<HoldReason>,
    pub in_flight: bool,
    pub recipients: Vec<RecipientView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_reply: Option<Reply>,
    pub client: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RecipientView {
    pub address: String,
    pub state: RcptState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply: Option<Reply>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
}

impl<S: Spool> Queue<S> {
    /// Opens the queue over a spool and loads everything it holds. The spool is
    /// read on a blocking thread and handed over through a bounded channel, so the
    /// runtime keeps serving while a large queue loads.
    pub async fn recover(
        spool: Arc<S>,
        settings: QueueSettings,
        events: EventBus,
    ) -> Result<Arc<Queue<S>>, SpoolError> {
        let slots = Arc::new(Semaphore::new(settings.concurrency));
        let sending = MemoryBudget::new(settings.memory_budget / 2);
        let queue = Arc::new(Queue {
            clock: Clock::new(),
            spool: spool.clone(),
            index: Mutex::new(Index::default()),
            wake: Notify::new(),
            settings,
            events,
            slots,
            sending,
            unhealthy_until: AtomicU64::new(0),
            space: AtomicU8::new(SPACE_OK),
        });
        let (tx, mut rx) = mpsc::channel::<Recovered>(RECOVERY_CHANNEL);
        let reader = tokio::task::spawn_blocking(move || {
            spool.recover(&mut |r| tx.blocking_send(r).is_ok())
        });
        let mut n = 0usize;
        while let Some(r) = rx.recv().await {
            queue.insert_recovered(r);
            n += 1;
        }
        reader.await.map_err(|e| SpoolError::Io {
            what: "spool recovery".into(),
            source: std::io::Error::other(e.to_string()),
        })??;
        if n > 0 {
            tracing::info!(messages = n, "recovered queued messages");
        }
        queue.update_gauges();
        queue.check_space();
        Ok(queue)
    }

    fn insert_recovered(&self, r: Recovered) {
        // A message never attempted goes in arrival order; a deferred one keeps its
        // schedule (a greylisting upstream would refuse an early retry).
        let state = r.state.unwrap_or_else(|| {
            let mut state = DeliveryState::new(r.envelope.recipients.len(), r.envelope.received_at);
            state.held = r.envelope.held.is_some();
            state.hold_reason = r.envelope.held.clone();
            state
        });
        let id = r.envelope.id.clone();
        let mut idx = self.lock();
        idx.evict(self.settings.memory_budget);
        idx.schedule(&id, state.next_attempt);
        idx.insert(
            id,
            Queued {
                envelope: Arc::new(r.envelope),
                state,
                data: None,
                in_flight: false,
            },
        );
    }

    /// Refreshes the queue gauges and the free-space check every second: one pass
    /// over the index per tick, not per message.
    pub fn spawn_gauges(self: &Arc<Self>, tasks: &crate::tasks::Tasks) {
        let weak = Arc::downgrade(self);
        tasks.every(std::time::Duration::from_secs(1), move || {
            let q = weak.upgrade();
            async move {
                if let Some(q) = q {
                    q.update_gauges();
                    let _ = tokio::task::spawn_blocking(move || q.check_space()).await;
                }
            }
        });
    }

    /// Measures the spool against `min_free` and `max_size`; ingress refuses MAIL
    /// until there is room again.
    pub fn check_space(&self) -> space::SpaceReport {
        let report = space::SpaceReport::measure(
            self.spool.dir(),
            self.spool.size(),
            self.settings.min_free,
            self.settings.max_size,
        );
        let was = self.space.swap(
            report.refusing.map_or(SPACE_OK, |b| b as u8),
            Ordering::Relaxed,
        );
        report.publish();
        if was == SPACE_OK && report.refusing.is_some() {
            tracing::warn!(%report, "spool short of room: MAIL refused with 452 until there is room");
        } else if was != SPACE_OK && report.refusing.is_none() {
            tracing::info!(%report, "spool has room again: accepting mail");
        }
        report
    }

    /// Milliseconds since the epoch, on the queue's clock.
    pub fn now(&self) -> Millis {
        self.clock.now()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Durably stores a message (ingress or a DSN of ours) and schedules it. `accepted`
    /// is announced once it is on disk and before anything can deliver it, so whoever
    /// follows a message sees it arrive before it leaves.
    async fn store(
        &self,
        envelope: Envelope,
        data: Data,
        accepted: Option<Event>,
    ) -> Result<(), SpoolError> {
        let env = Arc::new(envelope);
        // A body that came in a file was too large to keep in memory anyway.
        let cached = match &data {
            Data::Memory(b) => Some(b.clone()),
            Data::Spilled { .. } => None,
        };
        let result = self.spool.store(&env, data).await;
        if let Err(e) = &result {
            self.unhealthy_until
                .store(self.now() + UNHEALTHY_FOR_MS, Ordering::Relaxed);
            metrics::counter!(crate::telemetry::QUEUE_WRITE_ERRORS_TOTAL).increment(1);
            tracing::error!(queue_id = %env.id, error = %e, "spool write failed");
            return result;
        }
        if let Some(ev) = accepted {
            // Never waits: the 250 waits on the spool commit and nothing else.
            self.events.publish_now(ev);
        }
        let now = self.now();
        {
            let mut idx = self.lock();
            let id = env.id.clone();
            idx.schedule(&id, now);
            let rcpts = env.recipients.len();
            let mut state = DeliveryState::new(rcpts, now);
            if let Some(reason) = &env.held {
                state.held = true;
                state.hold_reason = Some(reason.clone());
                metrics::counter!(crate::telemetry::QUEUE_HELD_AT_INTAKE_TOTAL).increment(1);
            }
            let keep = cached
                .as_ref()
                .is_some_and(|d| idx.may_cache(d.len() as u64, self.settings.memory_budget));
            if !keep {
                metrics::counter!(crate::telemetry::QUEUE_BODIES_NOT_CACHED_TOTAL).increment(1);
            }
            idx.insert(
                id,
                Queued {
                    envelope: env,
                    state,
                    data: cached.filter(|_| keep),
                    in_flight: false,
                },
            );
            let evicted = idx.evict(self.settings.memory_budget);
            if evicted > 0 {
                metrics::counter!(crate::telemetry::QUEUE_BODIES_EVICTED_TOTAL)
                    .increment(evicted as u64);
            }
        }
        self.wake.notify_one();
        Ok(())
    }

    pub fn list(&self) -> Vec<QueueItem> {
        let idx = self.lock();
        let mut items: Vec<QueueItem> = idx.entries.values().map(view).collect();
        items.sort_by(|a, b| a.id.cmp(&b.id));
        items
    }

    pub fn show(&self, id: &QueueId) -> Option<QueueItem> {
        self.lock().entries.get(id).map(view)
    }

    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Everything not held is tried now. Returns how many messages were rescheduled.
    pub fn flush(&self) -> usize {
        let now = self.now();
        let mut n = 0;
        {
            let mut guard = self.lock();
            let idx = &mut *guard;
            for (id, e) in idx.entries.iter_mut() {
                if !e.state.held && !e.in_flight {
                    e.state.next_attempt = now;
                    idx.timers.insert((now, id.clone()));
                    n += 1;
                }
            }
        }
        self.wake.notify_one();
        n
    }

    /// Deletes a message without delivering it and without a DSN (an operator's call).
    pub async fn remove(&self, id: &QueueId) -> Result<(), QueueError> {
        if self.lock().remove(id).is_none() {
            return Err(QueueError::NotFound(id.to_string()));
        }
        self.spool.remove(id)?;
        tracing::info!(queue_id = %id, "removed by administrator");
        self.events.publish_now(Event::Removed {
            id: id.clone(),
            at: self.now(),
        });
        Ok(())
    }

    /// Makes the queue's last changes durable, so a clean stop is followed by no
    /// repeated delivery.
    pub async fn close(&self) {
        if let Err(e) = self.spool.flush().await {
            tracing::error!(error = %e, "cannot flush the spool; some messages may be delivered again");
        }
    }

    /// Whether the spool directory takes writes (for readiness checks).
    pub async fn writable(&self) -> Result<(), SpoolError> {
        let spool = self.spool.clone();
        tokio::task::spawn_blocking(move || spool.probe())
            .await
            .map_err(|e| SpoolError::Io {
                what: "probe task".into(),
                source: std::io::Error::other(e.to_string()),
            })?
    }

    fn update_gauges(&self) {
        let idx = self.lock();
        let now = self.now();
        let mut rcpts = 0usize;
        let mut oldest = now;
        let mut held = 0usize;
        for e in idx.entries.values() {
            if e.state.held {
                // Waiting on a person, not on delivery: not the queue's age.
                held += 1;
                continue;
            }
            rcpts += e
                .state
                .rcpts
                .iter()
                .filter(|r| r.state == RcptState::Pending)
                .count();
            oldest = oldest.min(e.envelope.received_at);
        }
        metrics::gauge!(crate::telemetry::QUEUE_MESSAGES).set(idx.entries.len() as f64);
        metrics::gauge!(crate::telemetry::QUEUE_HELD_MESSAGES).set(held as f64);
        metrics::gauge!(crate::telemetry::QUEUE_CACHED_BYTES).set(idx.cached as f64);
        metrics::gauge!(crate::telemetry::QUEUE_RECIPIENTS).set(rcpts as f64);
        metrics::gauge!(crate::telemetry::QUEUE_OLDEST_AGE_SECONDS)
            .set(now.saturating_sub(oldest) as f64 / 1000.0);
    }
}

fn view(e: &Queued) -> QueueItem {
    let env = &e.envelope;
    QueueItem {
        id: env.id.clone(),
        sender: env.sender.clone(),
        received_at: env.received_at,
        size: env.size,
        attempts: e.state.attempts,
        next_attempt: e.state.next_attempt,
        held: e.state.held,
        // A hold from before reasons were kept is an operator's.
        hold_reason: e
            .state
            .held
            .then(|| e.state.hold_reason.clone().unwrap_or(HoldReason::Manual)),
        in_flight: e.in_flight,
        recipients: env
            .recipients
            .iter()
            .zip(&e.state.rcpts)
            .map(|(r, s)| RecipientView {
                address: r.address.clone(),
                state: s.state,
                reply: s.reply.clone(),
                host: s.host.clone(),
                route: s.route.clone(),
            })
            .collect(),
        last_reply: e
            .state
            .rcpts
            .iter()
            .filter_map(|r| r.reply.clone())
            .next_back(),
        client: env.client.ip.to_string(),
        message_id: env.message_id.clone(),
    }
}

impl<S: Spool> Intake for Queue<S> {
    async fn submit(&self, msg: Submission) -> Result<Stored, IntakeError> {
        let env = &msg.envelope;
        let held = env.held.clone();
        let accepted = Event::Accepted(Box::new(Accepted {
            id: env.id.clone(),
            ip: env.client.ip,
            helo: env.client.helo.clone(),
            tls: env.client.tls.clone(),
            proof: msg.proof,
            sender: env.sender.clone(),
            message_id: env.message_id.clone(),
            subject: msg.subject,
            recipients: env.recipients.iter().map(|r| r.address.clone()).collect(),
            size: env.size,
            held: held.clone(),
            at: env.received_at,
        }));
        self.store(msg.envelope, msg.data, Some(accepted))
            .await
            .map_err(|e| IntakeError::Unavailable(e.to_string()))?;
        Ok(Stored { held })
    }

    fn admission(&self) -> Result<(), Backpressure> {
        if self.now() < self.unhealthy_until.load(Ordering::Relaxed) {
            return Err(Backpressure::WriteFailed);
        }
        match Backpressure::from_code(self.space.load(Ordering::Relaxed)) {
            Some(b) => Err(b),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(len: usize) -> (QueueId, Queued) {
        let env = Envelope::for_test("a@example.test", &["b@x.test"], len as u64);
        let id = env.id.clone();
        (
            id,
            Queued {
                envelope: Arc::new(env),
                state: DeliveryState::new(1, 0),
                data: Some(Bytes::from(vec![b'x'; len])),
                in_flight: false,
            },
        )
    }

    /// As the queue grows, bodies are dropped newest first, so what is sent next
    /// stays in memory and the index plus the cache stay within half the budget.
    #[test]
    fn cache_is_evicted_newest_first_as_the_index_grows() {
        let budget = 2 * (10 * ENTRY_BYTES + 4 * 1000);
        let mut idx = Index::default();
        let mut ids = Vec::new();
        for _ in 0..10 {
            let (id, e) = entry(1000);
            idx.insert(id.clone(), e);
            idx.evict(budget);
            ids.push(id);
        }
        assert_eq!(idx.cached, 4 * 1000);
        assert!(idx.entries.len() as u64 * ENTRY_BYTES + idx.cached <= budget / 2);
        let kept: Vec<bool> = ids
            .iter()
            .map(|id| idx.entries[id].data.is_some())
            .collect();
        assert_eq!(
            kept,
            [true, true, true, true, false, false, false, false, false, false]
        );
        // Taking a body for delivery and removing an entry keep the count right.
        assert!(idx.take_data(&ids[0]).is_some());
        idx.remove(&ids[1]);
        assert_eq!(idx.cached, 2 * 1000);
        assert_eq!(idx.cached_ids.len(), 2);
    }
}
