//! How many sessions one smart host gets at once: `max_connections_per_host` always
//! (`delivery.concurrency = "fixed"`, the default), or a limit that adapts to the host
//! (`"adaptive"`).
//!
//! A fixed number is wrong in one direction or the other. Across a WAN a gateway takes
//! more sessions than any sensible default, each waiting on round trips; a host that is
//! busy (or shares the relay's CPU) only queues the extra sessions, and every message
//! then waits behind the others: on two cores, 32 sessions to a local TLS sink moved
//! 30 % fewer messages than 8. The adaptive limit follows TCP Vegas as Netflix's
//! concurrency-limits applies it to requests: a transaction that takes longer than the
//! host's unloaded time means sessions are queueing there, and the limit goes down;
//! while transactions stay near that time, it goes up, up to `max_connections_per_host`.
//! Unlike Postfix's slow start, which grows on any success, it stops growing where more
//! sessions stop moving more mail.
//!
//! It is not the default because a transaction's time is measured by the relay, and a
//! relay short of CPU itself makes every transaction look slow: the limit then falls
//! although the host could take more, and the queue drains slower just when it is
//! fullest (plain SMTP to a fast local sink with 200 ingress sessions: about 20 % less
//! end to end than fixed). Telling the host's delay from the relay's own, for instance
//! with kernel receive timestamps, would lift that.
//!
//! Written here rather than taken from a tower middleware crate: the limit governs the
//! pool's checkouts, which are not service calls, and the arithmetic is a page.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use crate::config::ConcurrencyMode;

/// Samples averaged before the limit moves: single transactions are too noisy.
const WINDOW: u32 = 10;
/// How often the host's unloaded time is measured afresh. Between measurements the
/// shortest window seen stands for it; a measurement lets a host that became slower
/// for good be learned, instead of being taken for a congested one forever.
const PROBE_EVERY: Duration = Duration::from_secs(10);
/// Where an adaptive limit starts, and the least it goes to.
const INITIAL: usize = 8;
const FLOOR: usize = 2;

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// The limit is down to a quarter for one window of samples taken with no more
    /// sessions than that, whose average becomes the unloaded time (BBR's ProbeRTT:
    /// resetting it to a sample taken under load would ratchet the limit up).
    Probing {
        resume: usize,
    },
    Steady {
        next_probe: Instant,
    },
}

/// The limit's arithmetic, without locks; time comes in with each sample.
#[derive(Debug)]
pub struct Vegas {
    limit: usize,
    floor: usize,
    max: usize,
    phase: Phase,
    noload: Duration,
    sum: Duration,
    n: u32,
    peak_inflight: usize,
}

impl Vegas {
    /// Starts with a probe, so the first unloaded time is measured at few sessions.
    pub fn new(max: usize) -> Vegas {
        let max = max.max(1);
        let floor = FLOOR.min(max);
        let resume = INITIAL.min(max);
        Vegas {
            limit: probe_limit(resume, floor),
            floor,
            max,
            phase: Phase::Probing { resume },
            noload: Duration::MAX,
            sum: Duration::ZERO,
            n: 0,
            peak_inflight: 0,
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// One transaction took `took` while `inflight` sessions (itself included) were
    /// busy with the host. The limit moves when a window of samples is complete.
    pub fn sample(&mut self, took: Duration, inflight: usize, now: Instant) -> usize {
        if matches!(self.phase, Phase::Probing { .. }) && inflight > self.limit {
            // Started before the probe began: it says nothing about few sessions.
            return self.limit;
        }
        self.sum += took;
        self.n += 1;
        self.peak_inflight = self.peak_inflight.max(inflight);
        if self.n < WINDOW {
            return self.limit;
        }
        let average = self.sum / self.n;
        let peak = self.peak_inflight;
        (self.sum, self.n, self.peak_inflight) = (Duration::ZERO, 0, 0);
        match self.phase {
            Phase::Probing { resume } => {
                self.noload = average;
                self.limit = resume;
                self.phase = Phase::Steady {
                    next_probe: now + PROBE_EVERY,
                };
            }
            Phase::Steady { next_probe } if now >= next_probe => {
                self.phase = Phase::Probing { resume: self.limit };
                self.limit = probe_limit(self.limit, self.floor);
            }
            Phase::Steady { .. } => self.window(average, peak),
        }
        self.limit
    }

    /// The host turned a session away (connection refused, 421): sessions beyond what
    /// it allows only fail, so the limit falls by a quarter at once.
    pub fn refused(&mut self) -> usize {
        let cut = |l: usize| (l * 3 / 4).max(self.floor);
        match &mut self.phase {
            Phase::Probing { resume } => *resume = cut(*resume),
            Phase::Steady { .. } => self.limit = cut(self.limit),
        }
        self.limit
    }

    fn window(&mut self, average: Duration, peak: usize) {
        if average < self.noload {
            self.noload = average;
            return;
        }
        let limit = self.limit as f64;
        // Sessions waiting at the host rather than being served.
        let queued =
            (limit * (1.0 - self.noload.as_secs_f64() / average.as_secs_f64().max(1e-9))).ceil();
        let step = limit.log10().floor().max(1.0);
        let (alpha, beta) = (3.0 * step, 6.0 * step);
        // Growth only while the sessions were in use: idle ones say nothing of more.
        let busy = peak * 2 >= self.limit;
        let next = if queued <= step && busy {
            limit + beta
        } else if queued < alpha && busy {
            limit + step
        } else if queued > beta {
            limit - step
        } else {
            limit
        };
        self.limit = (next as usize).clamp(self.floor, self.max);
    }
}

fn probe_limit(limit: usize, floor: usize) -> usize {
    (limit / 4).max(floor)
}

/// The sessions a host may have at once: a semaphore whose size follows the limit.
/// A shrinking limit takes free permits at once and the rest as leases end.
pub struct Gate {
    permits: Arc<Semaphore>,
    vegas: Option<Mutex<Vegas>>,
    /// The limit the semaphore's size stands for.
    size: AtomicUsize,
    /// Permits still to be taken out of circulation as leases end.
    debt: AtomicUsize,
    inflight: AtomicUsize,
}

/// One session's place at the host.
pub struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    gate: Arc<Gate>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gate.inflight.fetch_sub(1, Ordering::Relaxed);
        let owed = self
            .gate
            .debt
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| d.checked_sub(1))
            .is_ok();
        if let (true, Some(p)) = (owed, self.permit.take()) {
            p.forget();
        }
    }
}

impl Gate {
    pub fn new(mode: ConcurrencyMode, max: usize) -> Arc<Gate> {
        let vegas = (mode == ConcurrencyMode::Adaptive).then(|| Vegas::new(max));
        let size = vegas.as_ref().map_or(max, Vegas::limit);
        Arc::new(Gate {
            permits: Arc::new(Semaphore::new(size)),
            vegas: vegas.map(Mutex::new),
            size: AtomicUsize::new(size),
            debt: AtomicUsize::new(0),
            inflight: AtomicUsize::new(0),
        })
    }

    pub fn limit(&self) -> usize {
        self.size.load(Ordering::Relaxed)
    }

    pub async fn acquire(self: &Arc<Self>) -> Slot {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("gate semaphores are never closed");
        self.inflight.fetch_add(1, Ordering::Relaxed);
        Slot {
            permit: Some(permit),
            gate: self.clone(),
        }
    }

    /// A transaction with the host took `took`.
    pub fn took(&self, took: Duration) {
        let now = Instant::now();
        self.adjust(|v, inflight| v.sample(took, inflight, now));
    }

    /// The host turned a session away.
    pub fn refused(&self) {
        self.adjust(|v, _| v.refused());
    }

    fn adjust(&self, f: impl FnOnce(&mut Vegas, usize) -> usize) {
        let Some(vegas) = &self.vegas else {
            return;
        };
        // Resizing under the lock keeps `size` and the semaphore in step.
        let mut v = vegas.lock().unwrap_or_else(|e| e.into_inner());
        let next = f(&mut v, self.inflight.load(Ordering::Relaxed));
        let size = self.size.swap(next, Ordering::Relaxed);
        if next > size {
            let mut add = next - size;
            let repaid = self
                .debt
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                    Some(d - d.min(add))
                })
                .map_or(0, |d| d.min(add));
            add -= repaid;
            self.permits.add_permits(add);
        } else if next < size {
            let cut = size - next;
            let taken = self.permits.forget_permits(cut);
            self.debt.fetch_add(cut - taken, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A host and a clock: transactions take what `took(sessions)` says, with every
    /// session the limit allows in use, and each window moves the clock by 100 ms.
    struct Run<F: Fn(usize) -> Duration> {
        v: Vegas,
        now: Instant,
        took: F,
    }

    impl<F: Fn(usize) -> Duration> Run<F> {
        fn new(max: usize, took: F) -> Self {
            Run {
                v: Vegas::new(max),
                now: Instant::now(),
                took,
            }
        }
        fn windows(&mut self, count: usize) -> usize {
            for _ in 0..count {
                for _ in 0..WINDOW {
                    let busy = self.v.limit();
                    self.v.sample((self.took)(busy), busy, self.now);
                }
                self.now += 100 * MS;
            }
            self.v.limit()
        }
    }

    /// A host far away whose time does not change with load (a WAN round trip): the
    /// limit climbs to the ceiling, and stays there apart from the short probes.
    #[test]
    fn a_host_that_keeps_up_gets_every_session() {
        let mut r = Run::new(32, |_| 80 * MS);
        assert_eq!(r.v.limit(), FLOOR, "starts by measuring");
        assert_eq!(r.windows(1), INITIAL);
        assert_eq!(r.windows(10), 32);
        let at_ceiling = (0..1000).filter(|_| r.windows(1) == 32).count();
        assert!(at_ceiling > 980, "{at_ceiling} of 1000 windows");
    }

    /// A saturated host serves two transactions at a time in 2 ms; more sessions only
    /// wait (time = sessions × 1 ms). The limit stays near what it can serve.
    #[test]
    fn a_host_that_queues_holds_the_limit_down() {
        let mut r = Run::new(32, |sessions| MS * sessions.max(2) as u32);
        let limits: Vec<usize> = (0..1000).map(|_| r.windows(1)).collect();
        let most = limits.iter().max().copied().unwrap_or(0);
        assert!(most <= 12, "limit reached {most}");
        assert!(limits.iter().all(|&l| l >= FLOOR));
    }

    /// Sessions that were not all in use say nothing about more of them.
    #[test]
    fn an_idle_limit_does_not_grow() {
        let mut v = Vegas::new(32);
        let now = Instant::now();
        for _ in 0..WINDOW {
            v.sample(5 * MS, 1, now);
        }
        assert_eq!(v.limit(), INITIAL);
        for _ in 0..20 * WINDOW {
            v.sample(5 * MS, 1, now);
        }
        assert_eq!(v.limit(), INITIAL);
    }

    /// A host that became slower for good is measured again at the next probe, and
    /// the limit grows back.
    #[test]
    fn a_slower_host_is_learned_again() {
        let slow = std::cell::Cell::new(false);
        let mut r = Run::new(32, |_| if slow.get() { 20 * MS } else { MS });
        assert_eq!(r.windows(10), 32);
        slow.set(true);
        let low = r.windows(5);
        assert!(low < 32, "limit {low}");
        assert_eq!(r.windows(200), 32);
    }

    /// Samples from sessions that began before a probe do not count for it.
    #[test]
    fn a_probe_counts_only_few_sessions() {
        let mut v = Vegas::new(32);
        let now = Instant::now();
        for _ in 0..10 * WINDOW {
            v.sample(500 * MS, 32, now);
        }
        assert_eq!(v.limit(), FLOOR, "still probing");
        for _ in 0..WINDOW {
            v.sample(MS, FLOOR, now);
        }
        assert_eq!(v.limit(), INITIAL);
        assert_eq!(v.noload, MS);
    }

    #[test]
    fn refusals_cut_a_quarter_down_to_the_floor() {
        let mut r = Run::new(32, |_| 80 * MS);
        r.windows(10);
        assert_eq!(r.v.refused(), 24);
        for _ in 0..20 {
            r.v.refused();
        }
        assert_eq!(r.v.limit(), FLOOR);
        assert_eq!(Vegas::new(1).refused(), 1);
    }

    /// The semaphore follows the limit both ways, including while every session is
    /// out: the excess goes as those sessions end.
    #[tokio::test]
    async fn the_gate_follows_the_limit() {
        let gate = Gate::new(ConcurrencyMode::Adaptive, 32);
        assert_eq!(gate.limit(), FLOOR);
        let mut held = Vec::new();
        for _ in 0..FLOOR {
            held.push(gate.acquire().await);
        }
        assert_eq!(gate.permits.available_permits(), 0);
        // The probe ends: the limit goes to its start and new sessions may begin.
        for _ in 0..WINDOW {
            gate.took(MS);
        }
        assert_eq!(gate.limit(), INITIAL);
        assert_eq!(gate.permits.available_permits(), INITIAL - FLOOR);
        while held.len() < INITIAL {
            held.push(gate.acquire().await);
        }
        // Refusals while every session is out: the cut waits for them to end.
        for _ in 0..10 {
            gate.refused();
        }
        assert_eq!(gate.limit(), FLOOR);
        assert_eq!(gate.permits.available_permits(), 0);
        drop(held);
        assert_eq!(gate.permits.available_permits(), FLOOR);
        assert_eq!(gate.debt.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_fixed_gate_never_moves() {
        let gate = Gate::new(ConcurrencyMode::Fixed, 32);
        for _ in 0..100 {
            gate.took(Duration::from_secs(1));
            gate.refused();
        }
        assert_eq!(gate.limit(), 32);
        assert_eq!(gate.permits.available_permits(), 32);
    }
}
