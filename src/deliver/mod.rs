//! Delivery to the smart hosts: pooled upstream sessions, round-robin with failover
//! within a route, and one reply per recipient for the queue to act on.

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

pub struct Deliverer {
    settings: ClientSettings,
    pool: Pool,
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
                    metrics::counter!("smartrelay_upstream_connections_total",
                        "route" => route.name.clone(), "tls" => if c.tls.is_some() { "yes" } else { "no" })
                    .increment(1);
                    lease.fresh = true;
                    c
                }
            };
            let started = Instant::now();
            match transaction::send(&mut conn, env, data, rcpts, &self.settings).await {
                Ok(out) => {
                    metrics::histogram!("smartrelay_upstream_transaction_seconds", "route" => route.name.clone())
                        .record(started.elapsed().as_secs_f64());
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
        let mut last: Option<(HostPort, UpstreamError)> = None;
        for host in self.pool.order(route) {
            match self.on_host(route, &host, env, data, rcpts).await {
                Ok((out, tls)) => {
                    self.pool.mark_up(&route.name, &host);
                    return LegOutcome {
                        host: host.to_string(),
                        replies: out.replies,
                        tls,
                        dsn_passed: out.dsn_passed,
                    };
                }
                Err(e) => {
                    tracing::warn!(queue_id = %env.id, route = %route.name, %host, error = %e, "smart host failed, trying the next");
                    metrics::counter!("smartrelay_upstream_connection_failures_total",
                        "route" => route.name.clone(), "host" => host.to_string())
                    .increment(1);
                    self.pool.mark_down(&route.name, &host);
                    last = Some((host, e));
                }
            }
        }
        let reply = match &last {
            Some((host, e)) => e.reply(host),
            None => Reply::new(451, "4.4.1", "route has no hosts"),
        };
        LegOutcome {
            host: String::new(),
            replies: rcpts.iter().map(|&i| (i, reply.clone())).collect(),
            tls: false,
            dsn_passed: false,
        }
    }
}
