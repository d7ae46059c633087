//! Drives deliveries: picks due messages (bounded concurrency; the rest waits on disk),
//! asks the router for a plan, hands each leg to the courier, records per-recipient
//! results, sends DSNs, and reschedules or removes the message.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::task::TaskTracker;

use super::dsn::{self, DsnKind};
use super::spool::{Spool, SpoolError};
use super::Queue;
use crate::envelope::{DeliveryState, Envelope, Millis, QueueId, RcptState, Reply};
use crate::events::{DeliveryReport, Event, Outcome, RcptResult};
use crate::message::Data;
use crate::pipeline::{Courier, PlanItem, Router};
use crate::tasks::CancellationToken;

impl<S: Spool> Queue<S> {
    /// Starts due attempts until `stop` fires, then returns at once; the attempts it
    /// started are on `attempts`, which the caller waits on (see [`Self::wind_down`]).
    pub async fn run<R: Router, C: Courier>(
        self: Arc<Self>,
        router: Arc<R>,
        courier: Arc<C>,
        attempts: TaskTracker,
        stop: CancellationToken,
    ) {
        loop {
            if stop.is_cancelled() {
                return;
            }
            let permit = tokio::select! {
                p = self.slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                _ = stop.cancelled() => return,
            };
            match self.take_due(self.now()) {
                Due::Now(id) => {
                    let (q, r, c) = (self.clone(), router.clone(), courier.clone());
                    attempts.spawn(async move {
                        q.attempt(&id, &*r, &*c).await;
                        drop(permit);
                    });
                }
                Due::At(when) => {
                    drop(permit);
                    let wait = Duration::from_millis(when.saturating_sub(self.now()));
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
        }
    }

    /// Shutdown of deliveries: attempts in flight have until `deadline` to finish and
    /// record their results; then `cut` tells the courier to stop each remaining one
    /// before its data goes out (they stay queued), and those past that point get
    /// `grace` more for their final reply. Returns how many were still running.
    pub async fn wind_down(
        &self,
        attempts: &TaskTracker,
        deadline: tokio::time::Instant,
        grace: Duration,
        cut: &CancellationToken,
    ) -> usize {
        attempts.close();
        if tokio::time::timeout_at(deadline, attempts.wait())
            .await
            .is_ok()
        {
            return 0;
        }
        tracing::warn!(
            in_flight = attempts.len(),
            "deliveries still running at the deadline: cutting them before their data"
        );
        cut.cancel();
        if tokio::time::timeout(grace, attempts.wait()).await.is_ok() {
            return 0;
        }
        let left = attempts.len();
        tracing::error!(
            in_flight = left,
            "deliveries still waiting for their final reply: they may be sent again after the restart"
        );
        left
    }

    fn take_due(&self, now: Millis) -> Due {
        let mut idx = self.lock();
        while let Some((at, id)) = idx.timers.first().cloned() {
            if at > now {
                return Due::At(at);
            }
            idx.timers.pop_first();
            if let Some(e) = idx.entries.get_mut(&id) {
                // Stale timers (rescheduled, held or running) are skipped.
                if e.state.next_attempt == at && !e.state.held && !e.in_flight {
                    e.in_flight = true;
                    return Due::Now(id);
                }
            }
        }
        Due::At(now + 3_600_000)
    }

    async fn attempt<R: Router, C: Courier>(&self, id: &QueueId, router: &R, courier: &C) {
        let Some(size) = self.lock().entries.get(id).map(|e| e.envelope.size) else {
            return;
        };
        // The body is in memory for the whole attempt: room for it first, so a burst of
        // large messages waits here rather than reading them all back at once.
        let _room = self.sending.take(size).await;
        let Some((env, cached, mut state)) = ({
            let mut idx = self.lock();
            let cached = idx.take_data(id);
            idx.entries
                .get(id)
                .map(|e| (e.envelope.clone(), cached, e.state.clone()))
        }) else {
            return;
        };
        let data = match cached {
            Some(d) => d,
            None => match self.load(id).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(queue_id = %id, error = %e, "cannot read queued message");
                    // A corrupt record has been set aside by the spool: it can never
                    // be delivered as received.
                    if matches!(e, SpoolError::NotFound(_) | SpoolError::Corrupt { .. }) {
                        self.lock().remove(id);
                    } else {
                        self.reschedule(id, state, self.now() + 60_000);
                    }
                    return;
                }
            },
        };
        let now = self.now();
        let pending = state.pending();
        let mut reports = Vec::new();
        if !pending.is_empty() {
            for item in router.plan(&env, &pending).await {
                reports.push(self.run_item(&env, &data, item, &mut state, courier).await);
            }
        }
        state.attempts += 1;
        let now_after = self.now();
        if !state.pending().is_empty()
            && self
                .settings
                .retry
                .expired(state.since.unwrap_or(env.received_at), now_after)
        {
            reports.push(expire(&env, &mut state, now_after));
        }
        self.send_dsns(&env, &data, &mut state, now).await;
        for r in &reports {
            log_report(r);
            metrics_report(r);
        }
        if state.is_finished() && all_dsns_done(&state) {
            self.finish(id).await;
        } else {
            let next = self.settings.retry.next_attempt(state.attempts, now_after);
            state.next_attempt = next;
            if let Err(e) = self.spool.save_state(id, &state).await {
                tracing::error!(queue_id = %id, error = %e, "cannot save delivery state");
            }
            metrics::counter!(crate::telemetry::QUEUE_RETRIES_TOTAL).increment(1);
            self.reschedule(id, state, next);
        }
        for r in reports {
            self.events.publish(Event::Delivery(r)).await;
        }
    }

    async fn run_item<C: Courier>(
        &self,
        env: &Envelope,
        data: &Bytes,
        item: PlanItem,
        state: &mut DeliveryState,
        courier: &C,
    ) -> DeliveryReport {
        let now = self.now();
        let (route_name, host, replies, dsn_passed, tls) = match item {
            PlanItem::Leg {
                route,
                recipients,
                spf,
            } => {
                tracing::info!(
                    queue_id = %env.id, route = %route.name, spf = spf.label(),
                    nrcpt = recipients.len(), "routed"
                );
                self.events
                    .publish(Event::Routed {
                        id: env.id.clone(),
                        route: route.name.clone(),
                        spf,
                        at: now,
                    })
                    .await;
                let out = courier.deliver(&route, env, data, &recipients).await;
                (
                    Some(route.name.clone()),
                    out.host,
                    out.replies,
                    out.dsn_passed,
                    out.tls,
                )
            }
            PlanItem::Refuse { recipients, reply } => (
                None,
                None,
                recipients.into_iter().map(|i| (i, reply.clone())).collect(),
                false,
                false,
            ),
        };
        let at = self.now();
        let mut results = Vec::with_capacity(replies.len());
        for (i, reply) in replies {
            let Some(st) = state.rcpts.get_mut(i) else {
                continue;
            };
            let outcome = if reply.is_positive() {
                st.state = RcptState::Delivered;
                // The upstream carries NOTIFY on; a success notice is no longer ours.
                st.dsn_done = dsn_passed;
                Outcome::Delivered
            } else if reply.is_permanent() {
                st.state = RcptState::Failed;
                Outcome::Bounced
            } else {
                Outcome::Deferred
            };
            st.reply = Some(reply.clone());
            st.host = host.clone();
            st.route = route_name.clone();
            st.at = Some(at);
            results.push(RcptResult {
                address: env.recipients[i].address.clone(),
                outcome,
                reply,
            });
        }
        DeliveryReport {
            id: env.id.clone(),
            sender: env.sender.clone(),
            flags: env.flags,
            generated_dsn: env.generated_dsn,
            system: env.system,
            client: env.client.ip,
            tls,
            duration_ms: at.saturating_sub(now),
            expired: false,
            route: route_name,
            host,
            at,
            results,
        }
    }

    /// Queues the failure, delay and success notices this attempt calls for. A DSN is
    /// stored durably before the original's state says it was sent.
    async fn send_dsns(&self, env: &Envelope, data: &[u8], state: &mut DeliveryState, now: Millis) {
        // Never for the null sender: a DSN about a DSN could loop (RFC 3461 §6.2).
        let may_notify = !env.is_null_sender() && !env.generated_dsn;
        let failed: Vec<usize> = (0..state.rcpts.len())
            .filter(|&i| state.rcpts[i].state == RcptState::Failed && !state.rcpts[i].dsn_done)
            .collect();
        let want_failed: Vec<usize> = failed
            .iter()
            .copied()
            .filter(|&i| may_notify && env.recipients[i].wants_failure_dsn())
            .collect();
        if self
            .inject_dsn(DsnKind::Failed, env, data, state, &want_failed, now)
            .await
        {
            for i in failed {
                state.rcpts[i].dsn_done = true;
            }
        }
        let delayed: Vec<usize> = state
            .pending()
            .into_iter()
            .filter(|&i| may_notify && env.recipients[i].wants_delay_dsn())
            .collect();
        if !state.delay_dsn_sent
            && !delayed.is_empty()
            && self
                .settings
                .retry
                .delay_warning_due(state.since.unwrap_or(env.received_at), now)
            && self
                .inject_dsn(DsnKind::Delayed, env, data, state, &delayed, now)
                .await
        {
            state.delay_dsn_sent = true;
        }
        // SUCCESS was asked but the upstream could not carry NOTIFY on: say "relayed".
        let relayed: Vec<usize> = (0..state.rcpts.len())
            .filter(|&i| {
                may_notify
                    && state.rcpts[i].state == RcptState::Delivered
                    && !state.rcpts[i].dsn_done
                    && env.recipients[i].wants_success_dsn()
            })
            .collect();
        if self
            .inject_dsn(DsnKind::Relayed, env, data, state, &relayed, now)
            .await
        {
            for i in relayed {
                state.rcpts[i].dsn_done = true;
            }
        }
    }

    /// True when there was nothing to send or the DSN is safely queued.
    async fn inject_dsn(
        &self,
        kind: DsnKind,
        env: &Envelope,
        data: &[u8],
        state: &DeliveryState,
        rcpts: &[usize],
        now: Millis,
    ) -> bool {
        if rcpts.is_empty() {
            return true;
        }
        let (dsn_env, dsn_data) =
            dsn::build(kind, env, data, state, rcpts, &self.settings.hostname, now);
        let dsn_id = dsn_env.id.clone();
        match self
            .store(dsn_env, Data::Memory(Bytes::from(dsn_data)), None)
            .await
        {
            Ok(()) => {
                tracing::info!(queue_id = %env.id, dsn_id = %dsn_id, kind = kind.action(), "sender notified");
                self.events.publish_now(Event::Dsn {
                    id: env.id.clone(),
                    dsn_id: dsn_id.clone(),
                    action: kind.action(),
                    at: now,
                });
                metrics::counter!(crate::telemetry::DSN_SENT_TOTAL, "action" => kind.action())
                    .increment(1);
                true
            }
            Err(e) => {
                tracing::error!(queue_id = %env.id, error = %e, "cannot queue DSN; will retry");
                false
            }
        }
    }

    async fn finish(&self, id: &QueueId) {
        self.lock().remove(id);
        if let Err(e) = self.spool.remove(id) {
            tracing::error!(queue_id = %id, error = %e, "cannot remove a finished message; it may be delivered again");
        }
        tracing::info!(queue_id = %id, "removed");
    }

    fn reschedule(&self, id: &QueueId, state: DeliveryState, at: Millis) {
        let mut idx = self.lock();
        let held = state.held;
        let Some(e) = idx.entries.get_mut(id) else {
            return;
        };
        // An operator may have held the message while it was in flight.
        let held = held || e.state.held;
        e.state = state;
        e.state.held = held;
        e.in_flight = false;
        if !held {
            idx.schedule(id, at);
        }
        drop(idx);
        // The scheduler may be asleep until a later timer (or an hour, when this was
        // the only message): it must see this one.
        self.wake.notify_one();
    }

    async fn load(&self, id: &QueueId) -> Result<Bytes, SpoolError> {
        let spool = self.spool.clone();
        let id = id.clone();
        tokio::task::spawn_blocking(move || spool.load(&id))
            .await
            .map_err(|e| SpoolError::Io {
                what: "load task".into(),
                source: std::io::Error::other(e.to_string()),
            })?
    }
}

enum Due {
    Now(QueueId),
    At(Millis),
}

fn all_dsns_done(state: &DeliveryState) -> bool {
    state
        .rcpts
        .iter()
        .all(|r| r.state != RcptState::Failed || r.dsn_done)
}

/// Gives up on every pending recipient of a message past `queue.max_age`.
fn expire(env: &Envelope, state: &mut DeliveryState, now: Millis) -> DeliveryReport {
    let mut results = Vec::new();
    for i in state.pending() {
        let last = state.rcpts[i].reply.clone();
        let text = match &last {
            Some(r) => format!("Delivery time expired; last reply: {r}"),
            None => "Delivery time expired".to_string(),
        };
        let status = last
            .as_ref()
            .and_then(|r| r.esc.clone())
            .filter(|e| e.starts_with('4'))
            .unwrap_or_else(|| "4.4.7".into());
        let reply = Reply {
            code: 554,
            esc: Some(status),
            text,
        };
        let st = &mut state.rcpts[i];
        st.state = RcptState::Failed;
        st.reply = Some(reply.clone());
        st.at = Some(now);
        results.push(RcptResult {
            address: env.recipients[i].address.clone(),
            outcome: Outcome::Bounced,
            reply,
        });
    }
    tracing::info!(queue_id = %env.id, "expired");
    metrics::counter!(crate::telemetry::MESSAGES_EXPIRED_TOTAL).increment(1);
    DeliveryReport {
        id: env.id.clone(),
        sender: env.sender.clone(),
        flags: env.flags,
        generated_dsn: env.generated_dsn,
        system: env.system,
        client: env.client.ip,
        tls: false,
        duration_ms: 0,
        expired: true,
        route: None,
        host: None,
        at: now,
        results,
    }
}

/// Postfix-style: one line per recipient, keyed by queue ID.
fn log_report(r: &DeliveryReport) {
    for res in &r.results {
        let status = match res.outcome {
            Outcome::Delivered => "sent",
            Outcome::Deferred => "deferred",
            Outcome::Bounced => "bounced",
        };
        tracing::info!(
            queue_id = %r.id, to = %res.address, route = r.route.as_deref().unwrap_or("none"),
            relay = r.host.as_deref().unwrap_or("none"), status, reply = %res.reply, "delivery"
        );
    }
}

fn metrics_report(r: &DeliveryReport) {
    for res in &r.results {
        metrics::counter!(crate::telemetry::DELIVERY_RECIPIENTS_TOTAL,
            "route" => r.route.clone().unwrap_or_else(|| "none".into()),
            "host" => r.host.clone().unwrap_or_else(|| "none".into()),
            "outcome" => res.outcome.label())
        .increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventBus;
    use crate::pipeline::{Intake, Submission};
    use crate::queue::retry::RetryPolicy;
    use crate::queue::testing::{MemSpool, OneRoute, ScriptedCourier};
    use crate::queue::QueueSettings;

    const MIN: u64 = 60;

    struct Harness {
        queue: Arc<Queue<MemSpool>>,
        spool: Arc<MemSpool>,
        courier: Arc<ScriptedCourier>,
        t0: tokio::time::Instant,
        stop: CancellationToken,
        attempts: TaskTracker,
    }

    async fn harness(retry: RetryPolicy, courier: ScriptedCourier) -> Harness {
        let spool = Arc::new(MemSpool::default());
        let queue = Queue::recover(
            spool.clone(),
            QueueSettings {
                retry,
                concurrency: 4,
                hostname: "relay.test".into(),
                memory_budget: 1 << 20,
                min_free: 0,
                max_size: None,
            },
            EventBus::new(),
        )
        .await
        .unwrap();
        let courier = Arc::new(courier);
        let (stop, attempts) = (CancellationToken::new(), TaskTracker::new());
        tokio::spawn(queue.clone().run(
            Arc::new(OneRoute::default()),
            courier.clone(),
            attempts.clone(),
            stop.clone(),
        ));
        Harness {
            queue,
            spool,
            courier,
            t0: tokio::time::Instant::now(),
            stop,
            attempts,
        }
    }

    impl Harness {
        async fn submit(&self, sender: &str, rcpts: &[&str]) -> QueueId {
            let data = Bytes::from_static(b"Subject: t\r\n\r\nbody\r\n");
            let mut envelope = Envelope::for_test(sender, rcpts, data.len() as u64);
            envelope.received_at = self.queue.now();
            let id = envelope.id.clone();
            self.queue
                .submit(Submission {
                    envelope,
                    data: Data::Memory(data),
                    proof: crate::events::TenantProof::Dedicated,
                    subject: None,
                })
                .await
                .unwrap();
            id
        }

        /// Seconds after the start of each courier call for `id`.
        fn times(&self, id: &QueueId) -> Vec<u64> {
            self.courier
                .calls_for(id)
                .iter()
                .map(|c| c.at.duration_since(self.t0).as_secs())
                .collect()
        }

        async fn stop(self) {
            self.stop.cancel();
            let cut = CancellationToken::new();
            assert_eq!(
                self.queue
                    .wind_down(
                        &self.attempts,
                        tokio::time::Instant::now() + Duration::from_secs(5),
                        Duration::from_secs(5),
                        &cut,
                    )
                    .await,
                0
            );
        }
    }

    fn policy(retry: &[u64], max_age: u64, delay_warning: Option<u64>) -> RetryPolicy {
        RetryPolicy {
            retry: retry.iter().map(|s| Duration::from_secs(*s)).collect(),
            max_age: Duration::from_secs(max_age),
            delay_warning: delay_warning.map(Duration::from_secs),
        }
    }

    fn ok() -> Reply {
        Reply::new(250, "2.0.0", "Ok")
    }

    fn later() -> Reply {
        Reply::new(451, "4.3.0", "try later")
    }

    /// A recipient that keeps deferring is tried on the retry schedule (the last wait
    /// repeats) until `max_age`, then fails; the sender gets a failure DSN that is
    /// itself delivered, and nothing is left queued.
    #[tokio::test(start_paused = true)]
    async fn retry_schedule_then_expiry_and_a_failure_dsn() {
        let h = harness(
            policy(&[MIN, 5 * MIN], 20 * MIN, None),
            ScriptedCourier::new(|env, _, _| if env.sender.is_empty() { ok() } else { later() }),
        )
        .await;
        let id = h.submit("alice@example.test", &["bob@partner.test"]).await;
        tokio::time::sleep(Duration::from_secs(30 * MIN)).await;
        assert_eq!(h.times(&id), [0, 60, 360, 660, 960, 1260]);
        let dsns: Vec<_> = h
            .courier
            .calls()
            .into_iter()
            .filter(|c| c.sender.is_empty())
            .collect();
        assert_eq!(dsns.len(), 1);
        let text = String::from_utf8_lossy(&dsns[0].data).into_owned();
        assert!(text.contains("Action: failed"), "{text}");
        assert!(text.contains("Delivery time expired"), "{text}");
        assert!(h.spool.ids().is_empty());
        assert!(h.queue.is_empty());
        h.stop().await;
    }

    /// Per-recipient results: the one that was taken is not sent again; only the
    /// deferred one is retried, and the message leaves the queue once both are done.
    #[tokio::test(start_paused = true)]
    async fn only_pending_recipients_are_retried() {
        let h = harness(
            policy(&[MIN], 3600, None),
            ScriptedCourier::new(|_, rcpt, attempt| {
                if rcpt == 1 && attempt == 0 {
                    later()
                } else {
                    ok()
                }
            }),
        )
        .await;
        let id = h.submit("a@example.test", &["x@p.test", "y@p.test"]).await;
        tokio::time::sleep(Duration::from_secs(5 * MIN)).await;
        let calls = h.courier.calls_for(&id);
        let legs: Vec<Vec<usize>> = calls.iter().map(|c| c.recipients.clone()).collect();
        assert_eq!(legs, [vec![0, 1], vec![1]]);
        assert_eq!(h.times(&id), [0, 60]);
        assert!(h.spool.ids().is_empty());
        h.stop().await;
    }

    /// A held message is not tried however long it waits; release sends it at once,
    /// and so does a flush. The state on disk says what the queue says.
    #[tokio::test(start_paused = true)]
    async fn hold_release_and_flush() {
        let h = harness(
            policy(&[10 * MIN], 86_400, None),
            ScriptedCourier::new(|_, _, _| later()),
        )
        .await;
        let id = h.submit("a@example.test", &["x@p.test"]).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(h.times(&id), [0]);
        let item = h.queue.hold(&id).await.unwrap();
        assert!(item.held);
        assert!(h.spool.state(&id).is_some_and(|s| s.held));
        tokio::time::sleep(Duration::from_secs(120 * MIN)).await;
        assert_eq!(h.times(&id), [0], "a held message was tried");
        h.queue.release(&id).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(h.times(&id), [0, 7201]);
        assert_eq!(h.queue.flush(), 1);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(h.times(&id), [0, 7201, 7201]);
        assert_eq!(h.spool.state(&id).map(|s| s.attempts), Some(3));
        h.stop().await;
    }

    /// `delay_warning`: one "delayed" DSN once the message is that old, not one per
    /// attempt.
    #[tokio::test(start_paused = true)]
    async fn one_delay_dsn_when_the_warning_is_due() {
        let h = harness(
            policy(&[10 * MIN], 86_400, Some(30 * MIN)),
            ScriptedCourier::new(|env, _, _| if env.sender.is_empty() { ok() } else { later() }),
        )
        .await;
        let id = h.submit("a@example.test", &["x@p.test"]).await;
        tokio::time::sleep(Duration::from_secs(95 * MIN)).await;
        assert_eq!(h.times(&id).len(), 10);
        let delayed: Vec<_> = h
            .courier
            .calls()
            .into_iter()
            .filter(|c| c.sender.is_empty())
            .collect();
        assert_eq!(delayed.len(), 1);
        assert_eq!(delayed[0].at.duration_since(h.t0).as_secs(), 30 * MIN);
        assert!(String::from_utf8_lossy(&delayed[0].data).contains("Action: delayed"));
        assert_eq!(h.spool.ids(), [id]);
        h.stop().await;
    }

    /// Shutdown waits for an attempt in flight; one still running at the deadline is
    /// left to the cut.
    #[tokio::test(start_paused = true)]
    async fn wind_down_waits_for_attempts_in_flight() {
        let h = harness(
            policy(&[MIN], 3600, None),
            ScriptedCourier::new(|_, _, _| ok()),
        )
        .await;
        let attempts = TaskTracker::new();
        attempts.spawn(tokio::time::sleep(Duration::from_secs(3)));
        let cut = CancellationToken::new();
        let started = tokio::time::Instant::now();
        assert_eq!(
            h.queue
                .wind_down(
                    &attempts,
                    started + Duration::from_secs(10),
                    Duration::from_secs(5),
                    &cut
                )
                .await,
            0
        );
        assert_eq!(started.elapsed().as_secs(), 3);
        assert!(!cut.is_cancelled());
        let stuck = TaskTracker::new();
        stuck.spawn(std::future::pending::<()>());
        assert_eq!(
            h.queue
                .wind_down(
                    &stuck,
                    started + Duration::from_secs(13),
                    Duration::from_secs(5),
                    &cut
                )
                .await,
            1
        );
        assert!(
            cut.is_cancelled(),
            "the courier was not told to stop before DATA"
        );
        h.stop().await;
    }
}
