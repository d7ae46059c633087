//! Upstream sessions kept open for reuse, as many per host as its gate allows (at most
//! `max_connections_per_host`; see `concurrency`), each retired after
//! `connection_max_messages` messages or `connection_max_age`, and closed when idle for
//! `idle_timeout`. Hosts that fail are skipped for a back-off period.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::task::TaskTracker;
// tokio's clock: the unit tests below run back-off and retirement on the paused clock.
use tokio::time::Instant;

use super::concurrency::{ConcurrencyMode, Gate, Slot};
use crate::regions::{HostPort, RouteTarget};

/// What the pool needs of a session: its age, use and a way to close it. Upstream
/// `connection::Connection`s in the relay, a recording double in the tests.
pub trait Pooled: Send + 'static {
    fn created(&self) -> Instant;
    fn last_used(&self) -> Instant;
    fn messages(&self) -> u32;
    fn used(&mut self, now: Instant);
    /// The goodbye (QUIT); the pool runs it on a task it owns and waits for at close.
    fn retire(self) -> impl std::future::Future<Output = ()> + Send + 'static;
}

#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub max_per_host: usize,
    pub concurrency: ConcurrencyMode,
    pub max_messages: u32,
    pub max_age: Duration,
    pub idle_timeout: Duration,
    pub backoff: Duration,
}

struct HostSlot<C> {
    gate: Arc<Gate>,
    idle: Mutex<Vec<C>>,
    down_until: Mutex<Option<Instant>>,
}

/// Sessions by (route, host).
type Slots<C> = HashMap<(String, HostPort), Arc<HostSlot<C>>>;

pub struct Pool<C> {
    settings: PoolSettings,
    slots: Mutex<Slots<C>>,
    round_robin: Mutex<HashMap<String, Arc<AtomicUsize>>>,
    /// The QUITs of retired sessions in flight.
    retiring: TaskTracker,
}

/// A session checked out of the pool, with its place at the host.
pub struct Lease<C> {
    pub conn: Option<C>,
    pub fresh: bool,
    slot: Slot,
}

fn publish(route: &str, host: &HostPort, limit: usize) {
    tracing::debug!(route, %host, limit, "upstream session limit");
    metrics::gauge!(crate::telemetry::UPSTREAM_SESSION_LIMIT,
        "route" => route.to_string(), "host" => host.to_string())
    .set(limit as f64);
}

impl<C: Pooled> Pool<C> {
    pub fn new(settings: PoolSettings) -> Pool<C> {
        Pool {
            settings,
            slots: Mutex::new(HashMap::new()),
            round_robin: Mutex::new(HashMap::new()),
            retiring: TaskTracker::new(),
        }
    }

    fn all_slots(&self) -> Vec<Arc<HostSlot<C>>> {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn retire(&self, conn: C) {
        self.retiring.spawn(conn.retire());
    }

    /// At shutdown: every idle session says QUIT, and the goodbyes in flight finish,
    /// within `within`.
    pub async fn close(&self, within: Duration) {
        let slots = self.all_slots();
        for slot in slots {
            let idle: Vec<C> = slot
                .idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain(..)
                .collect();
            idle.into_iter().for_each(|c| self.retire(c));
        }
        self.retiring.close();
        if tokio::time::timeout(within, self.retiring.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = self.retiring.len(),
                "upstream sessions not closed in time"
            );
        }
    }

    fn slot(&self, route: &str, host: &HostPort) -> Arc<HostSlot<C>> {
        let mut map = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        map.entry((route.to_string(), host.clone()))
            .or_insert_with(|| {
                let gate = Gate::new(self.settings.concurrency, self.settings.max_per_host);
                publish(route, host, gate.limit());
                Arc::new(HostSlot {
                    gate,
                    idle: Mutex::new(Vec::new()),
                    down_until: Mutex::new(None),
                })
            })
            .clone()
    }

    /// The route's hosts in the order to try: round-robin start (both hosts are
    /// primary), hosts in back-off last.
    pub fn order(&self, route: &RouteTarget) -> Vec<HostPort> {
        let counter = {
            let mut rr = self.round_robin.lock().unwrap_or_else(|e| e.into_inner());
            rr.entry(route.name.clone()).or_default().clone()
        };
        let n = route.hosts.len();
        let start = counter.fetch_add(1, Ordering::Relaxed) % n.max(1);
        let now = Instant::now();
        let (mut up, down): (Vec<HostPort>, Vec<HostPort>) = (0..n)
            .map(|k| route.hosts[(start + k) % n].clone())
            .partition(|h| !self.is_down(&route.name, h, now));
        up.extend(down);
        up
    }

    fn is_down(&self, route: &str, host: &HostPort, now: Instant) -> bool {
        let slot = self.slot(route, host);
        let until = *slot.down_until.lock().unwrap_or_else(|e| e.into_inner());
        until.is_some_and(|t| now < t)
    }

    pub fn mark_down(&self, route: &str, host: &HostPort) {
        let slot = self.slot(route, host);
        *slot.down_until.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Instant::now() + self.settings.backoff);
        // Sessions to a failing host are not worth keeping.
        slot.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    pub fn mark_up(&self, route: &str, host: &HostPort) {
        let slot = self.slot(route, host);
        *slot.down_until.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Waits for a place at the host, then hands out an idle session if a usable one
    /// exists.
    pub async fn checkout(&self, route: &str, host: &HostPort) -> Lease<C> {
        let slot = self.slot(route, host);
        let place = slot.gate.acquire().await;
        let now = Instant::now();
        let mut idle = slot.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(conn) = idle.pop() {
            if self.usable(&conn, now) {
                return Lease {
                    conn: Some(conn),
                    fresh: false,
                    slot: place,
                };
            }
            self.retire(conn);
        }
        Lease {
            conn: None,
            fresh: true,
            slot: place,
        }
    }

    /// The leased session's transaction took `took`: through the lease's own place at
    /// the host, with no lookup per message.
    pub fn took(&self, route: &str, host: &HostPort, lease: &Lease<C>, took: Duration) {
        if let Some(limit) = lease.slot.took(took) {
            publish(route, host, limit);
        }
    }

    /// The host turned a session away.
    pub fn refused(&self, route: &str, host: &HostPort) {
        if let Some(limit) = self.slot(route, host).gate.refused() {
            publish(route, host, limit);
        }
    }

    /// Returns a session for reuse (the lease's place is given up either way).
    pub fn checkin(&self, route: &str, host: &HostPort, mut lease: Lease<C>) {
        let Some(mut conn) = lease.conn.take() else {
            return;
        };
        let now = Instant::now();
        conn.used(now);
        if self.usable(&conn, now) {
            let slot = self.slot(route, host);
            slot.idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(conn);
        } else {
            self.retire(conn);
        }
    }

    fn usable(&self, c: &C, now: Instant) -> bool {
        c.messages() < self.settings.max_messages
            && now.duration_since(c.created()) < self.settings.max_age
            && now.duration_since(c.last_used()) < self.settings.idle_timeout
    }

    /// Closes sessions idle for longer than `idle_timeout`, with a QUIT.
    pub fn reap(&self) {
        let now = Instant::now();
        let slots = self.all_slots();
        for slot in slots {
            let mut idle = slot.idle.lock().unwrap_or_else(|e| e.into_inner());
            let (keep, old): (Vec<C>, Vec<C>) = idle.drain(..).partition(|c| self.usable(c, now));
            *idle = keep;
            old.into_iter().for_each(|c| self.retire(c));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::regions::TlsMode;
    use std::collections::BTreeSet;

    /// A session that only counts: which one it is, and whether it was retired.
    struct Fake {
        n: u32,
        created: Instant,
        last_used: Instant,
        messages: u32,
        retired: Arc<Mutex<Vec<u32>>>,
    }

    impl Pooled for Fake {
        fn created(&self) -> Instant {
            self.created
        }
        fn last_used(&self) -> Instant {
            self.last_used
        }
        fn messages(&self) -> u32 {
            self.messages
        }
        fn used(&mut self, now: Instant) {
            self.last_used = now;
        }
        fn retire(self) -> impl std::future::Future<Output = ()> + Send + 'static {
            self.retired.lock().unwrap().push(self.n);
            std::future::ready(())
        }
    }

    fn settings() -> PoolSettings {
        PoolSettings {
            max_per_host: 2,
            concurrency: ConcurrencyMode::Fixed,
            max_messages: 3,
            max_age: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(60),
            backoff: Duration::from_secs(30),
        }
    }

    fn host(name: &str) -> HostPort {
        HostPort::parse(&format!("{name}:25")).unwrap()
    }

    fn fake(n: u32, retired: &Arc<Mutex<Vec<u32>>>) -> Fake {
        let now = Instant::now();
        Fake {
            n,
            created: now,
            last_used: now,
            messages: 0,
            retired: retired.clone(),
        }
    }

    /// At most `max_per_host` sessions at once; the next waits for a lease to end.
    #[tokio::test(start_paused = true)]
    async fn sessions_per_host_are_limited() {
        let pool: Arc<Pool<Fake>> = Arc::new(Pool::new(settings()));
        let h = host("a.test");
        let a = pool.checkout("r", &h).await;
        let _b = pool.checkout("r", &h).await;
        let third = {
            let (pool, h) = (pool.clone(), h.clone());
            tokio::spawn(async move { pool.checkout("r", &h).await.fresh })
        };
        tokio::task::yield_now().await;
        assert!(!third.is_finished(), "a third session was handed out");
        // Another host has its own limit.
        assert!(pool.checkout("r", &host("b.test")).await.fresh);
        drop(a);
        assert!(third.await.unwrap());
    }

    /// A session comes back for the next message until it has carried
    /// `max_messages`, reached `max_age` or sat idle past `idle_timeout`.
    #[tokio::test(start_paused = true)]
    async fn reuse_and_retirement() {
        let pool: Pool<Fake> = Pool::new(settings());
        let retired = Arc::new(Mutex::new(Vec::new()));
        let h = host("a.test");
        let mut lease = pool.checkout("r", &h).await;
        assert!(lease.fresh);
        lease.conn = Some(fake(1, &retired));
        pool.checkin("r", &h, lease);
        for used in 1..=3 {
            let mut lease = pool.checkout("r", &h).await;
            assert!(!lease.fresh, "session 1 not reused");
            if let Some(c) = lease.conn.as_mut() {
                c.messages = used;
            }
            pool.checkin("r", &h, lease);
        }
        assert_eq!(*retired.lock().unwrap(), [1], "retired after 3 messages");
        assert!(pool.checkout("r", &h).await.fresh);

        let mut lease = pool.checkout("r", &h).await;
        lease.conn = Some(fake(2, &retired));
        pool.checkin("r", &h, lease);
        tokio::time::sleep(Duration::from_secs(61)).await;
        pool.reap();
        assert_eq!(*retired.lock().unwrap(), [1, 2], "idle session reaped");

        let mut lease = pool.checkout("r", &h).await;
        lease.conn = Some(fake(3, &retired));
        pool.checkin("r", &h, lease);
        for _ in 0..11 {
            tokio::time::sleep(Duration::from_secs(55)).await;
            let lease = pool.checkout("r", &h).await;
            if lease.fresh {
                break;
            }
            pool.checkin("r", &h, lease);
        }
        assert_eq!(*retired.lock().unwrap(), [1, 2, 3], "retired at max_age");
    }

    /// Failover order: a host in back-off goes last until its back-off ends; a host
    /// that answers again is first in turn at once.
    #[tokio::test(start_paused = true)]
    async fn back_off_moves_a_failing_host_last() {
        let pool: Pool<Fake> = Pool::new(settings());
        let route = RouteTarget {
            name: "r".into(),
            hosts: vec![host("a.test"), host("b.test")],
            tls: TlsMode::None,
            ca_file: None,
            tls_name: None,
            auth: None,
        };
        let firsts: Vec<String> = (0..4).map(|_| pool.order(&route)[0].host.clone()).collect();
        assert_eq!(
            firsts,
            ["a.test", "b.test", "a.test", "b.test"],
            "round robin"
        );
        pool.mark_down("r", &host("a.test"));
        for _ in 0..4 {
            assert_eq!(pool.order(&route)[0].host, "b.test");
            assert_eq!(
                pool.order(&route).len(),
                2,
                "a host in back-off is still a last resort"
            );
        }
        tokio::time::sleep(Duration::from_secs(31)).await;
        let firsts: BTreeSet<String> = (0..2).map(|_| pool.order(&route)[0].host.clone()).collect();
        assert!(firsts.contains("a.test"), "back-off never ended");
        pool.mark_down("r", &host("b.test"));
        pool.mark_up("r", &host("b.test"));
        let firsts: BTreeSet<String> = (0..2).map(|_| pool.order(&route)[0].host.clone()).collect();
        assert!(firsts.contains("b.test"));
    }
}
