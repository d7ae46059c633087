//! Delivery to the smart hosts: pooled upstream sessions, round-robin with failover
//! within a route, and one reply per recipient for the queue to act on.

pub mod concurrency;
pub mod connection;
pub mod pool;
pub mod probe;
pub mod stream;
pub mod tls;
pub mod transaction;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::envelope::{Envelope, Reply};
use crate::pipeline::{Courier, LegOutcome};
use crate::regions::{HostPort, RouteTarget};
use connection::{open, ClientSettings, UpstreamError};
use pool::{Pool, PoolSettings};
use tls::Connectors;

/// Bodies up to this size time the smart host for its session limit.
const SAMPLED_BODY: usize = 256 << 10;

pub struct Deliverer {
    settings: ClientSettings,
    pool: Pool<connection::Connection>,
    connectors: Connectors,
}

impl Deliverer {
    pub fn new(settings: ClientSettings, pool: PoolSettings) -> Deliverer {
        Deliverer {
            settings,
            pool: Pool::new(pool),
            connectors: Connectors::new(),
        }
    }

    pub fn settings(&self) -> &ClientSettings {
        &self.settings
    }

    pub fn connectors(&self) -> &Connectors {
        &self.connectors
    }

    /// At shutdown, after the last attempt: idle upstream sessions say QUIT.
    pub async fn close(&self, within: Duration) {
        self.pool.close(within).await;
    }

    /// Closes idle sessions now and then, for as long as the deliverer lives.
    pub fn spawn_reaper(self: &Arc<Self>, tasks: &crate::tasks::Tasks, every: Duration) {
        let weak = Arc::downgrade(self);
        tasks.every(every.max(Duration::from_millis(200)), move || {
            if let Some(d) = weak.upgrade() {
                d.pool.reap();
            }
            std::future::ready(())
        });
    }

    async fn on_host(
        &self,
        route: &RouteTarget,
        host: &HostPort,
        env: &Envelope,
        data: &Bytes,
        rcpts: &[usize],
    ) -> Result<(transaction::TxOutcome, bool), UpstreamError> {
        let mut lease = tokio::select! {
            lease = self.pool.checkout(&route.name, host) => lease,
            _ = self.settings.stopping.cancelled() => {
                let stop = Reply::new(451, "4.3.2", "relay shutting down; not sent");
                let out = transaction::TxOutcome {
                    replies: rcpts.iter().map(|&i| (i, stop.clone())).collect(),
                    reusable: false,
                    dsn_passed: false,
                };
                return Ok((out, false));
            }
        };
        loop {
            let mut conn = match lease.conn.take() {
                Some(c) => c,
                None => {
                    let c = open(host, route, &self.settings, &self.connectors).await?;
                    metrics::counter!(crate::telemetry::UPSTREAM_CONNECTIONS_TOTAL,
                        "route" => route.name.clone(), "tls" => if c.tls.is_some() { "yes" } else { "no" })
                    .increment(1);
                    lease.fresh = true;
                    c
                }
            };
            let started = Instant::now();
            match transaction::send(&mut conn, env, data, rcpts, &self.settings).await {
                Ok(out) => {
                    let took = started.elapsed();
                    metrics::histogram!(crate::telemetry::UPSTREAM_TRANSACTION_SECONDS, "route" => route.name.clone())
                        .record(took.as_secs_f64());
                    // A large body's time is the link's, not the host's queue.
                    if data.len() <= SAMPLED_BODY {
                        self.pool.took(&route.name, host, &lease, took);
                    }
                    let tls = conn.tls.is_some();
                    if out.reusable {
                        lease.conn = Some(conn);
                        self.pool.checkin(&route.name, host, lease);
                    }
                    return Ok((out, tls));
                }
                // A pooled session the server has meanwhile closed: one fresh try.
                Err(e) if !lease.fresh => {
                    tracing::debug!(%host, error = %e, "pooled session failed, reconnecting");
                    lease.fresh = true;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Courier for Deliverer {
    async fn deliver(
        &self,
        route: &RouteTarget,
        env: &Envelope,
        data: &Bytes,
        rcpts: &[usize],
    ) -> LegOutcome {
        let queue_id = env.id.to_string();
        over_hosts(&self.pool, route, &queue_id, rcpts, |host| async move {
            self.on_host(route, &host, env, data, rcpts).await
        })
        .await
    }
}

/// Failover within a route: the hosts in the pool's order (round-robin, hosts in
/// back-off last), the first that takes the transaction wins; a host that fails is put
/// in back-off and the next is tried. When none can, every recipient gets the last
/// host's temporary reply.
async fn over_hosts<C, F, Fut>(
    pool: &Pool<C>,
    route: &RouteTarget,
    queue_id: &str,
    rcpts: &[usize],
    mut attempt: F,
) -> LegOutcome
where
    C: pool::Pooled,
    F: FnMut(HostPort) -> Fut,
    Fut: std::future::Future<Output = Result<(transaction::TxOutcome, bool), UpstreamError>>,
{
    let mut last: Option<(HostPort, UpstreamError)> = None;
    for host in pool.order(route) {
        match attempt(host.clone()).await {
            Ok((out, tls)) => {
                pool.mark_up(&route.name, &host);
                return LegOutcome {
                    host: Some(host.to_string()),
                    replies: out.replies,
                    tls,
                    dsn_passed: out.dsn_passed,
                };
            }
            Err(e) => {
                tracing::warn!(queue_id, route = %route.name, %host, error = %e, "smart host failed, trying the next");
                metrics::counter!(crate::telemetry::UPSTREAM_CONNECTION_FAILURES_TOTAL,
                    "route" => route.name.clone(), "host" => host.to_string())
                .increment(1);
                if matches!(e, UpstreamError::Refused(_)) {
                    // Often "too many connections": fewer sessions, not only a pause.
                    pool.refused(&route.name, &host);
                }
                pool.mark_down(&route.name, &host);
                last = Some((host, e));
            }
        }
    }
    let reply = match &last {
        Some((host, e)) => e.reply(host),
        None => Reply::new(451, "4.4.1", "route has no hosts"),
    };
    LegOutcome {
        host: None,
        replies: rcpts.iter().map(|&i| (i, reply.clone())).collect(),
        tls: false,
        dsn_passed: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::time::Instant;

    /// No session at all: the failover loop never touches one.
    struct Nothing;

    impl pool::Pooled for Nothing {
        fn created(&self) -> Instant {
            Instant::now()
        }
        fn last_used(&self) -> Instant {
            Instant::now()
        }
        fn messages(&self) -> u32 {
            0
        }
        fn used(&mut self, _: Instant) {}
        fn retire(self) -> impl std::future::Future<Output = ()> + Send + 'static {
            std::future::ready(())
        }
    }

    fn route(hosts: &[&str]) -> RouteTarget {
        RouteTarget {
            name: "eu".into(),
            hosts: hosts
                .iter()
                .map(|h| HostPort::parse(&format!("{h}:25")).unwrap())
                .collect(),
            tls: crate::regions::TlsMode::Opportunistic,
            ca_file: None,
            tls_name: None,
            auth: None,
        }
    }

    fn pool() -> Pool<Nothing> {
        Pool::new(PoolSettings {
            max_per_host: 2,
            concurrency: concurrency::ConcurrencyMode::Fixed,
            max_messages: 100,
            max_age: Duration::from_secs(600),
            idle_timeout: Duration::from_secs(60),
            backoff: Duration::from_secs(30),
        })
    }

    fn accepted(rcpts: &[usize]) -> transaction::TxOutcome {
        transaction::TxOutcome {
            replies: rcpts
                .iter()
                .map(|&i| (i, Reply::new(250, "2.0.0", "queued")))
                .collect(),
            reusable: true,
            dsn_passed: false,
        }
    }

    /// Runs one leg, failing on the hosts in `down`, and returns the hosts tried.
    async fn leg(
        pool: &Pool<Nothing>,
        r: &RouteTarget,
        down: &[&str],
    ) -> (LegOutcome, Vec<String>) {
        let tried = Mutex::new(Vec::new());
        let out = over_hosts(pool, r, "Q1", &[0, 1], |host| {
            let name = host.host.clone();
            tried.lock().unwrap().push(name.clone());
            let fails = down.contains(&name.as_str());
            async move {
                if fails {
                    Err(UpstreamError::Connect("refused".into()))
                } else {
                    Ok((accepted(&[0, 1]), true))
                }
            }
        })
        .await;
        (out, tried.into_inner().unwrap())
    }

    #[tokio::test(start_paused = true)]
    async fn failover_backoff_and_recovery() {
        let p = pool();
        let r = route(&["a.test", "b.test"]);
        // a fails: b takes it, in the same leg.
        let (out, tried) = leg(&p, &r, &["a.test"]).await;
        assert_eq!(tried, ["a.test", "b.test"]);
        assert_eq!(out.host.as_deref(), Some("b.test:25"));
        assert!(out.replies.iter().all(|(_, rep)| rep.code == 250));
        // While a is in back-off it is tried last, whatever the round-robin says.
        for _ in 0..3 {
            let (_, tried) = leg(&p, &r, &[]).await;
            assert_eq!(tried, ["b.test"]);
        }
        // After the back-off, a is back in rotation.
        tokio::time::advance(Duration::from_secs(31)).await;
        let mut firsts = Vec::new();
        for _ in 0..2 {
            firsts.push(leg(&p, &r, &[]).await.1[0].clone());
        }
        firsts.sort();
        assert_eq!(firsts, ["a.test", "b.test"], "round-robin over both");
    }

    #[tokio::test(start_paused = true)]
    async fn every_host_down_gives_each_recipient_the_last_temporary_reply() {
        let p = pool();
        let r = route(&["a.test", "b.test"]);
        let (out, tried) = leg(&p, &r, &["a.test", "b.test"]).await;
        assert_eq!(tried.len(), 2);
        assert_eq!(out.host, None);
        assert_eq!(out.replies.len(), 2);
        for (_, rep) in &out.replies {
            assert_eq!((rep.code, rep.esc.as_deref()), (451, Some("4.4.1")));
            assert!(rep.text.contains(&tried[1]), "{}", rep.text);
        }
        // Both in back-off: still tried (last), not skipped, on the next leg.
        let (out, tried) = leg(&p, &r, &[]).await;
        assert_eq!(tried.len(), 1);
        assert!(out.replies.iter().all(|(_, rep)| rep.code == 250));
        let empty = route(&[]);
        let (out, _) = leg(&p, &empty, &[]).await;
        assert_eq!(out.replies[0].1.text, "route has no hosts");
    }
}
