//! How many sessions one smart host gets at once: `max_connections_per_host` always
//! (`delivery.concurrency = "fixed"`, the default), or a limit that adapts to the host
//! (`"adaptive"`).
//!
//! A fixed number is wrong in one direction or the other. Across a WAN a gateway takes
//! more sessions than any sensible default, each waiting on round trips; a host that is
//! busy only queues the extra sessions, and every message then waits behind the
//! others. The adaptive limit follows TCP Vegas as Netflix's concurrency-limits applies
//! it to requests: transactions that take longer than the host's unloaded time mean
//! sessions are queueing there, and the limit goes down; while they stay near that
//! time, it goes up, up to `max_connections_per_host`. Unlike Postfix's slow start,
//! which grows on any success, it stops growing where the host starts to queue.
//!
//! A transaction's time is measured by the relay, so a relay short of CPU makes every
//! transaction look slow too. Read naively (window averages against the least window
//! seen), that lowered the limit although the host could take more: about 20 % less
//! end to end with plain 1 KiB over 200 ingress sessions to a local sink. Hence a
//! window counts by its quickest transaction, which the relay's scattered delays mostly
//! spare while a queue at the host delays them all, against the median of a probe at a
//! quarter of the limit; only transactions begun after the limit last moved count. It
//! stays opt-in: on the two-core bench it ends at the ceiling against the TLS sink and
//! changes nothing there, and it has not met a real gateway.
//!
//! Written here rather than taken from a tower middleware crate: the limit governs the
//! pool's checkouts, which are not service calls, and the arithmetic is a page.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use crate::config::ConcurrencyMode;

/// Samples in a window. A window counts by its quickest transaction: queueing at the
/// host delays every transaction in it, while the relay's own delays (a busy CPU) fall
/// on some and not others, and the quickest one is mostly free of them.
const WINDOW: usize = 10;
/// How often the host's unloaded time is measured afresh, so that a host that became
/// slower for good is learned instead of being taken for a congested one forever.
const PROBE_EVERY: Duration = Duration::from_secs(10);
/// Where an adaptive limit starts, and the least it goes to.
const INITIAL: usize = 8;
const FLOOR: usize = 2;

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// The limit is down to a quarter for one window of samples taken with no more
    /// sessions than that, whose median becomes the unloaded time (BBR's ProbeRTT:
    /// resetting it to a sample taken under load would ratchet the limit up). The
    /// median errs high against the windows' quickest, so that the relay's own delays
    /// read as room to grow, and only a clear queue at the host lowers the limit.
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
    window: Vec<Duration>,
    peak_inflight: usize,
    /// When the limit last moved: a transaction begun before ran under the old limit
    /// (right after growing from a probe, with few sessions ahead of it) and says
    /// nothing about the new one.
    moved: Option<Instant>,
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
            window: Vec::with_capacity(WINDOW),
            peak_inflight: 0,
            moved: None,
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
        if self
            .moved
            .is_some_and(|at| now.checked_sub(took).is_none_or(|began| began < at))
        {
            return self.limit;
        }
        self.window.push(took);
        self.peak_inflight = self.peak_inflight.max(inflight);
        if self.window.len() < WINDOW {
            return self.limit;
        }
        self.window.sort_unstable();
        let (quickest, median) = (self.window[0], self.window[WINDOW / 2]);
        let peak = self.peak_inflight;
        self.window.clear();
        self.peak_inflight = 0;
        let before = self.limit;
        match self.phase {
            Phase::Probing { resume } => {
                self.noload = median;
                self.limit = resume;
                self.phase = Phase::Steady {
                    next_probe: now + PROBE_EVERY,
                };
            }
            Phase::Steady { next_probe } if now >= next_probe => {
                self.phase = Phase::Probing { resume: self.limit };
                self.limit = probe_limit(self.limit, self.floor);
            }
            Phase::Steady { .. } => self.adjust(quickest, peak),
        }
        if self.limit != before {
            self.moved = Some(now);
        }
        self.limit
    }

    /// The host turned a session away (connection refused, 421): sessions beyond what
    /// it allows only fail, so the limit falls by a quarter at once.
    pub fn refused(&mut self, now: Instant) -> usize {
        let cut = |l: usize| (l * 3 / 4).max(self.floor);
        match &mut self.phase {
            Phase::Probing { resume } => *resume = cut(*resume),
            Phase::Steady { .. } => {
                let before = self.limit;
                self.limit = cut(before);
                if self.limit != before {
                    self.moved = Some(now);
                }
            }
        }
        self.limit
    }

    fn adjust(&mut self, quickest: Duration, peak: usize) {
        // The unloaded time is the probe's alone, not the least window since: the least
        // of many windows is below their usual time even with no queue at the host, and
        // would read as sessions queueing there.
        let limit = self.limit as f64;
        // Sessions waiting at the host rather than being served.
        let queued =
            (limit * (1.0 - self.noload.as_secs_f64() / quickest.as_secs_f64().max(1e-9))).ceil();
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

impl Slot {
    /// This session's transaction took `took` (counted while the place is still held,
    /// among the sessions in use). The new limit when it moved.
    pub fn took(&self, took: Duration) -> Option<usize> {
        self.gate.took(took)
    }
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

    /// A transaction with the host took `took`. The new limit when it moved.
    pub fn took(&self, took: Duration) -> Option<usize> {
        self.adjust(|v, inflight| v.sample(took, inflight, Instant::now()))
    }

    /// The host turned a session away. The new limit when it moved.
    pub fn refused(&self) -> Option<usize> {
        self.adjust(|v, _| v.refused(Instant::now()))
    }

    fn adjust(&self, f: impl FnOnce(&mut Vegas, usize) -> usize) -> Option<usize> {
        // A fixed gate has nothing to learn: no lock, no clock.
        let vegas = self.vegas.as_ref()?;
        // Resizing under the lock keeps `size` and the semaphore in step.
        let mut v = vegas.lock().unwrap_or_else(|e| e.into_inner());
        let next = f(&mut v, self.inflight.load(Ordering::Relaxed));
        let size = self.size.swap(next, Ordering::Relaxed);
        if next == size {
            return None;
        }
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
        Some(next)
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

    /// The same noise on every run (xorshift), up to `max`.
    fn noise(max: Duration) -> impl Fn() -> Duration {
        let seed = std::cell::Cell::new(7u64);
        move || {
            let mut x = seed.get();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            seed.set(x);
            Duration::from_nanos(x % max.as_nanos() as u64)
        }
    }

    /// A relay short of CPU itself: every transaction is delayed by a varying amount
    /// that has nothing to do with how many sessions the host has. The limit must not
    /// read that as queueing at the host.
    #[test]
    fn the_relay_s_own_delays_do_not_lower_the_limit() {
        let lag = noise(20 * MS);
        let mut r = Run::new(32, |_| MS + lag());
        let limits: Vec<usize> = (0..1000).map(|_| r.windows(1)).collect();
        let low = limits[100..].iter().filter(|&&l| l < 16).count();
        assert!(low < 90, "below 16 in {low} of 900 windows");
    }

    /// Through those delays a host that queues is still seen.
    #[test]
    fn a_host_that_queues_is_seen_through_the_relay_s_delays() {
        let lag = noise(4 * MS);
        let mut r = Run::new(32, |sessions| MS * sessions.max(2) as u32 + lag());
        let limits: Vec<usize> = (0..1000).map(|_| r.windows(1)).collect();
        let high = limits[100..].iter().filter(|&&l| l > 16).count();
        assert!(high < 90, "above 16 in {high} of 900 windows");
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

    /// Right after the probe the limit grows, and the first transactions to finish
    /// began with few sessions ahead of them: quick, they would read as room to grow.
    #[test]
    fn samples_begun_before_the_limit_moved_do_not_count() {
        let mut v = Vegas::new(32);
        let t0 = Instant::now();
        for _ in 0..WINDOW {
            v.sample(40 * MS, FLOOR, t0);
        }
        assert_eq!(v.limit(), INITIAL);
        let t1 = t0 + 10 * MS;
        for _ in 0..5 * WINDOW {
            v.sample(20 * MS, INITIAL, t1);
        }
        assert_eq!(v.limit(), INITIAL, "quick samples begun before the move");
        let t2 = t0 + 200 * MS;
        for _ in 0..WINDOW {
            v.sample(20 * MS, INITIAL, t2);
        }
        assert!(v.limit() > INITIAL, "those begun after it count");
    }

    #[test]
    fn refusals_cut_a_quarter_down_to_the_floor() {
        let mut r = Run::new(32, |_| 80 * MS);
        r.windows(10);
        assert_eq!(r.v.refused(r.now), 24);
        for _ in 0..20 {
            r.v.refused(r.now);
        }
        assert_eq!(r.v.limit(), FLOOR);
        assert_eq!(Vegas::new(1).refused(Instant::now()), 1);
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
        let moved: Vec<usize> = (0..WINDOW).filter_map(|_| gate.took(MS)).collect();
        assert_eq!(moved, [INITIAL], "one move, reported once");
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
            assert_eq!(gate.took(Duration::from_secs(1)), None);
            assert_eq!(gate.refused(), None);
        }
        assert_eq!(gate.limit(), 32);
        assert_eq!(gate.permits.available_permits(), 32);
    }
}
