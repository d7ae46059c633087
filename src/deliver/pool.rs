//! Upstream sessions kept open for reuse, at most `max_connections_per_host` per host,
//! each retired after `connection_max_messages` messages or `connection_max_age`, and
//! closed when idle for `idle_timeout`. Hosts that fail are skipped for a back-off period.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::connection::Connection;
use crate::regions::{HostPort, RouteTarget};

#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub max_per_host: usize,
    pub max_messages: u32,
    pub max_age: Duration,
    pub idle_timeout: Duration,
    pub backoff: Duration,
}

struct HostSlot {
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<Connection>>,
    down_until: Mutex<Option<Instant>>,
}

pub struct Pool {
    settings: PoolSettings,
    slots: Mutex<HashMap<(String, HostPort), Arc<HostSlot>>>,
    round_robin: Mutex<HashMap<String, Arc<AtomicUsize>>>,
}

/// A session checked out of the pool, with the permit that counts it.
pub struct Lease {
    pub conn: Option<Connection>,
    pub fresh: bool,
    _permit: OwnedSemaphorePermit,
}

impl Pool {
    pub fn new(settings: PoolSettings) -> Pool {
        Pool {
            settings,
            slots: Mutex::new(HashMap::new()),
            round_robin: Mutex::new(HashMap::new()),
        }
    }

    fn slot(&self, route: &str, host: &HostPort) -> Arc<HostSlot> {
        let mut map = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        map.entry((route.to_string(), host.clone()))
            .or_insert_with(|| {
                Arc::new(HostSlot {
                    permits: Arc::new(Semaphore::new(self.settings.max_per_host)),
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

    /// Waits for a permit, then hands out an idle session if a usable one exists.
    pub async fn checkout(&self, route: &str, host: &HostPort) -> Lease {
        let slot = self.slot(route, host);
        let permit = slot
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("pool semaphores are never closed");
        let now = Instant::now();
        let mut idle = slot.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(conn) = idle.pop() {
            if self.usable(&conn, now) {
                return Lease {
                    conn: Some(conn),
                    fresh: false,
                    _permit: permit,
                };
            }
            retire(conn);
        }
        Lease {
            conn: None,
            fresh: true,
            _permit: permit,
        }
    }

    /// Returns a session for reuse (the lease's permit is released either way).
    pub fn checkin(&self, route: &str, host: &HostPort, mut lease: Lease) {
        let Some(mut conn) = lease.conn.take() else {
            return;
        };
        let now = Instant::now();
        conn.last_used = now;
        if self.usable(&conn, now) {
            let slot = self.slot(route, host);
            slot.idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(conn);
        } else {
            retire(conn);
        }
    }

    fn usable(&self, c: &Connection, now: Instant) -> bool {
        c.messages < self.settings.max_messages
            && now.duration_since(c.created) < self.settings.max_age
            && now.duration_since(c.last_used) < self.settings.idle_timeout
    }

    /// Closes sessions idle for longer than `idle_timeout`, with a QUIT.
    pub fn reap(&self) {
        let now = Instant::now();
        let slots: Vec<Arc<HostSlot>> = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for slot in slots {
            let mut idle = slot.idle.lock().unwrap_or_else(|e| e.into_inner());
            let (keep, old): (Vec<Connection>, Vec<Connection>) =
                idle.drain(..).partition(|c| self.usable(c, now));
            *idle = keep;
            old.into_iter().for_each(retire);
        }
    }
}

/// Says goodbye politely without making anyone wait for it.
fn retire(conn: Connection) {
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), conn.client.quit()).await;
        });
    }
}
